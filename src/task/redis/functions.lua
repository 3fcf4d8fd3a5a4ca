#!lua name=patchbay

-- patchbay's task queue on Redis: every step of a task is one FCALL, atomic, so a worker in
-- any language needs one command per step. patchbay loads this library at start-up (and again
-- when Redis lost it). Keys, for a prefix P (PATCHBAY_REDIS_PREFIX):
--
--   P:task:<id>                 hash: the task (see FIELDS below); params, progress, result
--                               and error are raw JSON, never decoded and re-encoded, so
--                               numbers and empty arrays survive exactly
--   P:q:<queue>                 stream of jobs to start (field `id`), consumer group `workers`;
--                               entries every worker is done with are trimmed by `trim`
--   P:delayed:<queue>           zset: retries by due time (ms)
--   P:leases:<queue>            zset: running tasks by lease end (ms)
--   P:active:<queue>:<scope>    set: the scope's queued, delayed and running tasks
--   P:tasks:<queue>:<scope>     zset: the scope's tasks in enqueue order, for `list`
--   P:req:<queue>:<n>:<scope>:<rid>  the task a request id started (n: the scope's length)
--   P:stats:<queue>             hash: finished tasks by final status
--   P:seq                       counter: enqueue order and lease tokens
--
-- The owner is the user id, or the empty string for an anonymous connection: who may read and
-- cancel the task. The scope is `u:<user id>`, or `c:<connection id>` for an anonymous
-- connection: what enqueues are idempotent in, what `list` shows and what the limit counts. Every change is
-- published as TASK_PROGRESS on P:room:task:<id> (and P:room:user:<owner>), as an envelope
-- when it goes to both rooms, so every patchbay instance delivers it once per connection.
-- Times are Redis's own clock (TIME), in milliseconds.

local GROUP = 'workers'
local MAX_PROGRESS = 16384
local MAX_RESULT = 1048576
local MAX_BACKOFF = 600000
local ERROR_CODES = { failed = true, timeout = true, output_too_large = true, worker_lost = true }
local FINAL = { succeeded = true, failed = true, cancelled = true, lost = true }

-- FIELDS of P:task:<id>. Written once by enqueue:
--   head      the task object's fixed part, as JSON without its closing brace:
--             {"id":…,"queue":…,"userId":…,"params":…,"maxAttempts":…,"createdAt":…
--   cfg       "<maxAttempts> <timeoutMs> <leaseMs> <backoffMs> <retentionSecs>"
--   owner     the user id, '' for an anonymous connection
--   queue, scope, req (the request id's key)
-- Changed by the steps: status, attempts, updated, cancel ('1' once asked), token and until
-- (the lease: its fencing token and end in ms), consumer, progress, result and error (raw
-- JSON), v (the version of a user's task: the id of its envelopes).
-- Each step reads only the fields it needs (HMGET) and writes only those it changes: the Lua
-- around the Redis calls, not the calls, is most of what a step costs.

-- An integer as a string. Lua's own number-to-string conversion (`..`, tostring, a number
-- passed to redis.call) formats a double with `%.14g`, several times the instructions of an
-- integer's `%d`: the hot steps pass integers as strings made here.
local function int(n)
  return string.format('%d', n)
end

-- The time the running call last read (ms), nil until it reads it: every entry point below
-- is wrapped by `entry`, which forgets the last call's.
local call_ms = nil

local function now()
  local t = redis.call('TIME')
  local ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  call_ms = ms
  return ms, tonumber(t[2])
end

-- The last second formatted, kept between calls: most steps fall in the same second.
local cached_sec, cached_prefix = -1, ''

-- RFC 3339 in UTC with milliseconds, from a Unix time in ms (days to civil date after
-- Howard Hinnant's algorithm).
local function rfc3339(ms)
  local secs = math.floor(ms / 1000)
  if secs == cached_sec then
    return cached_prefix .. string.format('%03dZ', ms % 1000)
  end
  local days = math.floor(secs / 86400)
  local rem = secs - days * 86400
  local z = days + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524) - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local d = doy - math.floor((153 * mp + 2) / 5) + 1
  local m = mp < 10 and mp + 3 or mp - 9
  local y = yoe + era * 400
  if m <= 2 then y = y + 1 end
  cached_sec = secs
  cached_prefix = string.format('%04d-%02d-%02dT%02d:%02d:%02d.', y, m, d,
    math.floor(rem / 3600), math.floor((rem % 3600) / 60), rem % 60)
  return cached_prefix .. string.format('%03dZ', ms % 1000)
end

-- `P` from a key `P:<kind>:<rest>`.
local function prefix_of(key, kind)
  local at = string.find(key, ':' .. kind .. ':', 1, true)
  if not at then error({ err = 'ERR not a ' .. kind .. ' key: ' .. key }) end
  return string.sub(key, 1, at - 1)
end

-- The task id of a key `P:task:<id>`.
local function id_of(P, key)
  return string.sub(key, #P + 7)
end

-- From `cfg`: maxAttempts, timeoutMs, leaseMs, backoffMs, retentionSecs as numbers; or
-- just what a step needs.
local function settings(cfg)
  local max, timeout, lease, backoff, retention =
    string.match(cfg, '^(%d+) (%d+) (%d+) (%d+) (%d+)$')
  return tonumber(max), tonumber(timeout), tonumber(lease), tonumber(backoff), tonumber(retention)
end

local function lease_of(cfg)
  return tonumber(string.match(cfg, '^%d+ %d+ (%d+)'))
end

-- retentionSecs, as the string EXPIRE takes.
local function retention_of(cfg)
  return string.match(cfg, '(%d+)$')
end

-- A task written by version 2 of this library kept every field apart: its fields with
-- `head` and `cfg` made from them (and written, unless `readonly`: get and list only read).
-- nil for no task.
local function upgrade(key, readonly)
  local flat = redis.call('HGETALL', key)
  if #flat == 0 then return nil end
  local h = {}
  for i = 1, #flat, 2 do h[flat[i]] = flat[i + 1] end
  if h.head then return h end
  local user = 'null'
  if h.owner ~= '' then user = cjson.encode(h.owner) end
  h.head = '{"id":' .. cjson.encode(h.id) .. ',"queue":' .. cjson.encode(h.queue) ..
    ',"userId":' .. user .. ',"params":' .. h.params .. ',"maxAttempts":' .. h.max ..
    ',"createdAt":"' .. h.created .. '"'
  h.cfg = h.max .. ' ' .. h.timeout .. ' ' .. h.lease .. ' ' .. h.backoff .. ' ' .. h.retention
  h.scope = h.scope or ('u:' .. h.owner)
  if readonly then return h end
  redis.call('HSET', key, 'head', h.head, 'cfg', h.cfg, 'scope', h.scope)
  redis.call('HDEL', key, 'id', 'params', 'max', 'created', 'timeout', 'lease', 'backoff', 'retention')
  return h
end

-- HMGET of `fields` (the first must be `head`), for a task of version 2 too. nil when there
-- is no task.
local function read(key, fields, readonly)
  local f = redis.call('HMGET', key, unpack(fields))
  if f[1] then return f end
  local h = upgrade(key, readonly)
  if not h then return nil end
  for i, name in ipairs(fields) do f[i] = h[name] or false end
  return f
end

-- The task object: its fixed head and its current state.
local function task_json(head, status, progress, result, err, attempts, updated, cancel)
  return head .. ',"status":"' .. status .. '","progress":' .. (progress or 'null') ..
    ',"result":' .. (result or 'null') .. ',"error":' .. (err or 'null') ..
    ',"attempts":' .. attempts .. ',"updatedAt":"' .. updated ..
    '","cancelRequested":' .. (cancel == '1' and 'true' or 'false') .. '}'
end

-- The fields `current` reads, and the task object from them.
local VIEW = { 'head', 'status', 'progress', 'result', 'error', 'attempts', 'updated', 'cancel' }
local function view_json(f)
  return task_json(f[1], f[2], f[3], f[4], f[5], f[6], f[7], f[8])
end

-- History (contract section 8). patchbay writes what is kept to P:history at start-up:
--   rooms   the room patterns that keep history, space-separated (`name` or `prefix*`)
--   size    actions kept per room; ttl: seconds a room's actions live after its last append;
--   keep    seconds its epoch and last offset live (at least a day)
-- and each room R that keeps history has
--   P:h:R    stream of its actions: entry id `<offset>-0`, fields `i` (meta.id), `a` (action)
--   P:hm:R   hash: `epoch`, `top` (the last offset), `run` (the run_id of the Redis server
--            that wrote it: a server that restarted, or a replica promoted in a failover,
--            has another, and the room starts a new epoch instead of reusing offsets)
-- Appending and publishing happen in one call: an action's offset order is its delivery
-- order. What is published on each target room's channel is one envelope
--   {"id":…,"rooms":[…],"action":…,"positions":{"<room>":"<epoch>:<offset>",…}}
-- with `positions` for the rooms that stored it.

local run_id = nil
local function server_run()
  if not run_id then
    run_id = string.match(redis.call('INFO', 'server'), 'run_id:(%w+)') or 'unknown'
  end
  return run_id
end

local cached_rooms, cached_patterns = nil, {}
-- P -> { at = ms, cfg = config or false }: what history_config read last for P. The Lua
-- state is the server's, not a database's: one prefix belongs to one deployment per server.
local config_cache = {}

-- The config in P:history's fields (rooms, size, ttl, keep), its patterns parsed once per
-- change.
local function history_parse(c)
  if c[1] ~= cached_rooms then
    local patterns = {}
    for p in string.gmatch(c[1], '%S+') do
      if string.sub(p, -1) == '*' then
        patterns[#patterns + 1] = { prefix = true, s = string.sub(p, 1, -2) }
      else
        patterns[#patterns + 1] = { prefix = false, s = p }
      end
    end
    cached_rooms, cached_patterns = c[1], patterns
  end
  return { patterns = cached_patterns, size = tonumber(c[2]) or 100,
    ttl = tonumber(c[3]) or 300, keep = tonumber(c[4]) or 86400 }
end

-- What P:history says: the patterns, size, ttl and keep; nil when nothing keeps history.
-- A call that has read the time (every task step, before it publishes) reuses what was read
-- less than a second before: patchbay writes P:history at start-up and again every few
-- seconds, and reading it for each publish was about 4% of the instructions of a job.
local function history_config(P)
  local cached = call_ms and config_cache[P]
  if cached and call_ms >= cached.at and call_ms - cached.at < 1000 then
    return cached.cfg or nil
  end
  local cfg = nil
  local c = redis.call('HMGET', P .. ':history', 'rooms', 'size', 'ttl', 'keep')
  if c[1] and c[1] ~= '' then
    cfg = history_parse(c)
  end
  if call_ms then config_cache[P] = { at = call_ms, cfg = cfg or false } end
  return cfg
end

local function keeps(cfg, room)
  for _, p in ipairs(cfg.patterns) do
    if p.prefix then
      if string.sub(room, 1, #p.s) == p.s then return true end
    elseif room == p.s then
      return true
    end
  end
  return false
end

-- Where room R stands: epoch, top, the keys, and `true` when the room is new on this Redis
-- server (a new epoch; its old stream, if any, dropped). A new room's meta is written here
-- when `write_new`, else by the caller with its first append (one write, not two).
local function room_position(P, room, cfg, write_new)
  local mk, sk = P .. ':hm:' .. room, P .. ':h:' .. room
  local m = redis.call('HMGET', mk, 'epoch', 'top', 'run')
  local run = server_run()
  if m[1] and m[3] == run then return m[1], tonumber(m[2]) or 0, mk, sk end
  local epoch = string.sub(run, 1, 12) .. '-' .. int(redis.call('INCR', P .. ':hseq'))
  redis.call('DEL', sk)
  if write_new then
    redis.call('HSET', mk, 'epoch', epoch, 'top', '0', 'run', run)
    redis.call('EXPIRE', mk, int(cfg.keep))
  end
  return epoch, 0, mk, sk, true
end

-- Stores `action` (with meta.id `id`) in `room`: its epoch and offset.
local function append(P, room, id, action, cfg)
  local epoch, top, mk, sk, new = room_position(P, room, cfg, false)
  top = top + 1
  redis.call('XADD', sk, 'MAXLEN', int(cfg.size), int(top) .. '-0', 'i', id, 'a', action)
  redis.call('EXPIRE', sk, int(cfg.ttl))
  if new then
    redis.call('HSET', mk, 'epoch', epoch, 'top', int(top), 'run', server_run())
  else
    redis.call('HSET', mk, 'top', int(top))
  end
  redis.call('EXPIRE', mk, int(cfg.keep))
  return epoch, top
end

-- Appends `action` (already checked: an object with a string `type`) to the rooms among
-- `rooms` that store it, and publishes the envelope on every room's channel. A `user:` room keeps only a task's final
-- state: its progress is kept in `task:<id>`. `except` (a JSON array of rooms, or nil): the
-- members of those rooms do not get it (in the envelope; history keeps the action only).
-- `progress`: for a TASK_PROGRESS, its task's status (false when it names none); nil for any
-- other action.
local function publish_stored(P, id, action, rooms, except, progress)
  local cfg = history_config(P)
  local positions = ''
  if cfg then
    local stored = {}
    for _, room in ipairs(rooms) do
      if keeps(cfg, room) then
        if progress == nil or string.sub(room, 1, 5) ~= 'user:' or FINAL[progress] == true then
          local epoch, offset = append(P, room, id, action, cfg)
          stored[#stored + 1] = cjson.encode(room) .. ':"' .. epoch .. ':' .. int(offset) .. '"'
        end
      end
    end
    positions = table.concat(stored, ',')
  end
  local names = cjson.encode(rooms[1])
  if #rooms > 1 then
    local quoted = {}
    for i, room in ipairs(rooms) do quoted[i] = cjson.encode(room) end
    names = table.concat(quoted, ',')
  end
  local envelope = '{"id":' .. cjson.encode(id) .. ',"rooms":[' .. names .. '],"action":' .. action ..
    ',"positions":{' .. positions .. '}' .. (except and (',"except":' .. except) or '') .. '}'
  for _, room in ipairs(rooms) do
    redis.call('PUBLISH', P .. ':room:' .. room, envelope)
  end
  return '{' .. positions .. '}'
end

-- publish: KEYS[1] = P:history; ARGV = dedupe, id, action, room, [room...]. Publishes a
-- server-fired action to the rooms, stored in those that keep history: what POST /publish
-- does, for any service. `dedupe` ('' for none): the same non-empty value within a minute
-- publishes only once (how every instance ingests the same task message and it is stored
-- once). `id` ('' for a new one) is its meta.id. Returns its positions as JSON
-- ({"<room>":"<epoch>:<offset>"}), or nil when `dedupe` had been seen.
local function publish_rooms(keys, args, except)
  local P = string.sub(keys[1], 1, -9)
  local dedupe, id, action = args[1], args[2], args[3]
  if not action or not args[4] then error({ err = 'INVALID publish takes dedupe, id, action and at least one room' }) end
  local ok, decoded = pcall(cjson.decode, action)
  if not ok or type(decoded) ~= 'table' or type(decoded.type) ~= 'string' or
    string.sub(action, 1, 1) ~= '{' then
    error({ err = 'INVALID the action must be a JSON object with a string "type"' })
  end
  local rooms = {}
  for i = 4, #args do
    local room = args[i]
    if #room > 128 or not string.find(room, '^[!-~]+$') then
      error({ err = 'INVALID not a room name: ' .. string.sub(room, 1, 64) })
    end
    rooms[#rooms + 1] = room
  end
  if dedupe ~= '' then
    local key = P .. ':in:' .. redis.sha1hex(dedupe .. '\n' .. action .. '\n' .. table.concat(rooms, ' '))
    if not redis.call('SET', key, '1', 'NX', 'EX', 60) then return nil end
  end
  if id == '' then id = string.sub(server_run(), 1, 12) .. '-' .. redis.call('INCR', P .. ':hseq') end
  local progress = nil
  if decoded.type == 'TASK_PROGRESS' then
    progress = type(decoded.payload) == 'table' and decoded.payload.status or false
  end
  return publish_stored(P, id, action, rooms, except, progress)
end

local function publish_fn(keys, args)
  return publish_rooms(keys, args, nil)
end

-- publish_except: KEYS[1] = P:history; ARGV = except, dedupe, id, action, room, [room...].
-- publish, except that the members of the rooms of `except` (a JSON array of room names) do
-- not get the action (a socket.io emitter's `except`).
local function publish_except_fn(keys, args)
  local except = table.remove(args, 1)
  local ok, names = pcall(cjson.decode, except or '')
  if not ok or type(names) ~= 'table' or string.sub(except, 1, 1) ~= '[' then
    error({ err = 'INVALID except must be a JSON array of room names' })
  end
  for _, room in ipairs(names) do
    if type(room) ~= 'string' then error({ err = 'INVALID except must be a JSON array of room names' }) end
  end
  if #names == 0 then except = nil end
  return publish_rooms(keys, args, except)
end

-- read: KEYS[1] = P:history; ARGV = room, after, limit. Where the room stands and what it
-- keeps after offset `after`, at most the last `limit`:
-- {epoch, top, oldest kept offset (top + 1 when none), offset, id, action, offset, ...}.
local function read_fn(keys, args)
  local P = string.sub(keys[1], 1, -9)
  local cfg = history_config(P) or { keep = 86400 }
  local room, after, limit = args[1], tonumber(args[2]) or 0, tonumber(args[3]) or 0
  local epoch, top, _, sk = room_position(P, room, cfg, true)
  local first = redis.call('XRANGE', sk, '-', '+', 'COUNT', 1)
  local oldest = top + 1
  if #first > 0 then oldest = tonumber(string.match(first[1][1], '^(%d+)')) end
  local out = { epoch, top, oldest }
  local from = math.max(after, top - limit) + 1
  if limit > 0 and from <= top then
    for _, e in ipairs(redis.call('XRANGE', sk, from .. '-0', '+')) do
      local f = e[2]
      local fields = {}
      for i = 1, #f, 2 do fields[f[i]] = f[i + 1] end
      out[#out + 1] = tonumber(string.match(e[1], '^(%d+)'))
      out[#out + 1] = fields.i or ''
      out[#out + 1] = fields.a or '{}'
    end
  end
  return out
end

-- Publishes TASK_PROGRESS with the task object to task:<id> and, for a user's task, to
-- user:<owner> as well, in one envelope whose id is the task's new version (so each instance
-- delivers it once per connection), stored in the rooms that keep history.
local function publish(P, key, id, owner, json, status)
  local action = '{"type":"TASK_PROGRESS","payload":' .. json .. '}'
  local v = int(redis.call('HINCRBY', key, 'v', '1'))
  local rooms = { 'task:' .. id }
  if owner ~= '' then rooms[2] = 'user:' .. owner end
  publish_stored(P, 'task/' .. id .. '/' .. v, action, rooms, nil, status)
end

-- Creates the stream and its group when the stream does not exist (a fresh queue, or Redis
-- lost it); a worker that finds the group missing creates it too (NOGROUP).
local function ensure_group(stream)
  if redis.call('EXISTS', stream) == 0 then
    redis.call('XGROUP', 'CREATE', stream, GROUP, '0', 'MKSTREAM')
  end
end

-- Queues the task's job again (a retry, a hand-back, a lapsed lease). Redis may have lost
-- the stream and group meanwhile, so this checks; a new task's first entry does not
-- (patchbay and the workers make every queue's group, from id 0).
local function queue_again(P, queue, id)
  local stream = P .. ':q:' .. queue
  ensure_group(stream)
  redis.call('XADD', stream, '*', 'id', id)
end

-- A task reached its final status: it leaves the active set and the lease index, and it and
-- its request id expire after the retention.
local function finalize(P, key, id, queue, scope, req, status, retention)
  redis.call('SREM', P .. ':active:' .. queue .. ':' .. scope, id)
  redis.call('ZREM', P .. ':leases:' .. queue, id)
  redis.call('HINCRBY', P .. ':stats:' .. queue, status, '1')
  redis.call('EXPIRE', key, retention)
  if req then redis.call('EXPIRE', req, retention) end
end

local function error_json(code, message)
  return '{"code":' .. cjson.encode(code) .. ',"message":' .. cjson.encode(message) .. '}'
end

-- The lease holder's fields `fields` (after `head`, `status` and `token`, which it checks), or
-- an error reply: STALE when the token is not the current lease.
local function held(key, token, fields)
  local f = read(key, fields)
  if not f then return nil, redis.error_reply('NOT_FOUND no such task') end
  if f[2] ~= 'running' or f[3] ~= token then
    return nil, redis.error_reply('STALE this worker no longer holds the task')
  end
  return f
end

-- enqueue: KEYS[1] = P:q:<queue>; ARGV = queue, owner, scope, request id, params JSON, new
-- id, maxAttempts, timeoutMs, leaseMs, backoffMs, retentionSecs, perUserLimit.
-- Returns the task JSON (the existing task for a repeated request id); LIMIT when the scope
-- has perUserLimit active tasks.
local function enqueue(keys, args)
  local P = prefix_of(keys[1], 'q')
  local queue, owner, scope, rid, params, id = args[1], args[2], args[3], args[4], args[5], args[6]
  -- The scope's length keeps scope `a:b` with request `c` apart from scope `a` with `b:c`.
  local req = P .. ':req:' .. queue .. ':' .. #scope .. ':' .. scope .. ':' .. rid
  local active = P .. ':active:' .. queue .. ':' .. scope
  local limit = tonumber(args[12])
  if redis.call('SCARD', active) >= limit then
    -- At the limit, a repeated request still gets its task.
    local existing = redis.call('GET', req)
    local f = existing and read(P .. ':task:' .. existing, VIEW)
    if f then return view_json(f) end
    return redis.error_reply('LIMIT ' .. limit)
  end
  -- One call claims the request id, or tells which task already has it.
  local existing = redis.call('SET', req, id, 'NX', 'GET')
  if existing then
    local f = read(P .. ':task:' .. existing, VIEW)
    if f then return view_json(f) end
    redis.call('SET', req, id) -- its task expired: this request starts a new one
  end
  local at = rfc3339(now())
  local user = 'null'
  if owner ~= '' then user = cjson.encode(owner) end
  local head = '{"id":' .. cjson.encode(id) .. ',"queue":' .. cjson.encode(queue) ..
    ',"userId":' .. user .. ',"params":' .. params .. ',"maxAttempts":' .. args[7] ..
    ',"createdAt":"' .. at .. '"'
  local key = P .. ':task:' .. id
  redis.call('SADD', active, id)
  local list = P .. ':tasks:' .. queue .. ':' .. scope
  local seq = redis.call('INCR', P .. ':seq')
  -- Index entries of expired tasks go a few at a time (every 16th enqueue looks at the 16
  -- oldest); an idle index expires whole.
  if seq % 16 == 0 then
    for _, old in ipairs(redis.call('ZRANGE', list, 0, 15)) do
      if redis.call('EXISTS', P .. ':task:' .. old) == 0 then redis.call('ZREM', list, old) end
    end
  end
  redis.call('ZADD', list, int(seq), id)
  redis.call('EXPIRE', list, int(tonumber(args[11]) + 86400))
  redis.call('HSET', key, 'head', head,
    'cfg', args[7] .. ' ' .. args[8] .. ' ' .. args[9] .. ' ' .. args[10] .. ' ' .. args[11],
    'owner', owner, 'queue', queue, 'scope', scope, 'req', req,
    'status', 'queued', 'attempts', '0', 'updated', at)
  local json = task_json(head, 'queued', nil, nil, nil, '0', at, nil)
  -- An anonymous task's new room has no member yet and it has no user room: nothing to tell.
  if owner ~= '' then publish(P, key, id, owner, json, 'queued') end
  redis.call('XADD', keys[1], '*', 'id', id)
  return json
end

-- start: KEYS[1] = P:task:<id>, KEYS[2] = P:q:<queue>; ARGV = stream entry id, consumer.
-- The entry is acknowledged whatever happens (the maintainer trims acknowledged entries).
-- Returns nil when the task cannot start (cancelled, expired), else
-- {task JSON, lease token, leaseMs, timeoutMs}.
local function start(keys, args)
  local P = prefix_of(keys[1], 'task')
  redis.call('XACK', keys[2], GROUP, args[1])
  local f = read(keys[1], { 'head', 'status', 'owner', 'queue', 'cfg', 'attempts', 'progress',
    'result', 'error', 'cancel' })
  if not f or f[2] ~= 'queued' then return nil end
  local id = id_of(P, keys[1])
  local ms = now()
  local timeout, lease = string.match(f[5], '^%d+ (%d+) (%d+)')
  lease = tonumber(lease)
  local attempts = int(tonumber(f[6]) + 1)
  local updated = rfc3339(ms)
  local token = int(redis.call('INCR', P .. ':seq'))
  local lease_end = int(ms + lease)
  redis.call('ZADD', P .. ':leases:' .. f[4], lease_end, id)
  redis.call('HSET', keys[1], 'status', 'running', 'attempts', attempts, 'updated', updated,
    'token', token, 'until', lease_end, 'consumer', args[2])
  local json = task_json(f[1], 'running', f[7], f[8], f[9], attempts, updated, f[10])
  publish(P, keys[1], id, f[3], json, 'running')
  return { json, token, lease, tonumber(timeout) }
end

-- renew: KEYS[1] = P:task:<id>; ARGV = token. Returns 1 when a cancel was asked, else 0.
local function renew(keys, args)
  local P = prefix_of(keys[1], 'task')
  local f, err = held(keys[1], args[1], { 'head', 'status', 'token', 'queue', 'cfg', 'cancel' })
  if not f then return err end
  local lease_end = int(now() + lease_of(f[5]))
  redis.call('HSET', keys[1], 'until', lease_end)
  redis.call('ZADD', P .. ':leases:' .. f[4], lease_end, id_of(P, keys[1]))
  return f[6] == '1' and 1 or 0
end

-- progress: KEYS[1] = P:task:<id>; ARGV = token, a JSON object of at most 16 KiB.
local function progress(keys, args)
  local P = prefix_of(keys[1], 'task')
  local f, err = held(keys[1], args[1], { 'head', 'status', 'token', 'owner', 'result', 'error',
    'attempts', 'cancel' })
  if not f then return err end
  local raw = args[2]
  local ok, v = pcall(cjson.decode, raw)
  if not ok or type(v) ~= 'table' or not string.find(raw, '^%s*{') then
    return redis.error_reply('INVALID progress must be a JSON object')
  end
  if #raw > MAX_PROGRESS then
    return redis.error_reply('INVALID progress is larger than 16384 bytes')
  end
  local updated = rfc3339(now())
  redis.call('HSET', keys[1], 'progress', raw, 'updated', updated)
  publish(P, keys[1], id_of(P, keys[1]), f[4],
    task_json(f[1], 'running', raw, f[5], f[6], f[7], updated, f[8]), 'running')
  return 1
end

-- succeed: KEYS[1] = P:task:<id>; ARGV = token, the result as JSON (at most 1 MiB).
local function succeed(keys, args)
  local P = prefix_of(keys[1], 'task')
  local f, err = held(keys[1], args[1], { 'head', 'status', 'token', 'owner', 'queue', 'scope',
    'req', 'cfg', 'progress', 'error', 'attempts', 'cancel' })
  if not f then return err end
  local raw = args[2]
  if not pcall(cjson.decode, raw) then return redis.error_reply('INVALID the result must be JSON') end
  if #raw > MAX_RESULT then return redis.error_reply('INVALID the result is larger than 1 MiB') end
  local id = id_of(P, keys[1])
  local updated = rfc3339(now())
  -- An error left by a failed attempt goes; most tasks never had one.
  if f[10] then redis.call('HDEL', keys[1], 'error') end
  redis.call('HSET', keys[1], 'status', 'succeeded', 'result', raw, 'updated', updated)
  finalize(P, keys[1], id, f[5], f[6], f[7], 'succeeded', retention_of(f[8]))
  local json = task_json(f[1], 'succeeded', f[9], raw, nil, f[11], updated, f[12])
  publish(P, keys[1], id, f[4], json, 'succeeded')
  return json
end

-- What fail, handback and reap read, in this order after `head`, `status` and `token`.
local ENDING = { 'head', 'status', 'token', 'owner', 'queue', 'scope', 'req', 'cfg', 'progress',
  'result', 'error', 'attempts', 'cancel', 'until' }

-- Ends the current attempt of a task whose ENDING fields are `f`, with `status` (queued for
-- another attempt at once, delayed for a retry after the backoff, or final), `attempts` and
-- `err` (the error JSON). Publishes and returns the task JSON.
local function end_attempt(P, key, f, ms, usec, status, attempts, err)
  local id = id_of(P, key)
  local queue = f[5]
  local _, _, _, backoff = settings(f[8])
  local retention = retention_of(f[8])
  local updated = rfc3339(ms)
  redis.call('ZREM', P .. ':leases:' .. queue, id)
  redis.call('HDEL', key, 'token', 'until')
  if err ~= f[11] then
    redis.call('HSET', key, 'status', status, 'attempts', attempts, 'updated', updated, 'error', err)
  else
    redis.call('HSET', key, 'status', status, 'attempts', attempts, 'updated', updated)
  end
  if status == 'delayed' then
    local nominal = math.min(backoff * 2 ^ math.min(tonumber(attempts) - 1, 30), MAX_BACKOFF)
    local jitter = 0.8 + 0.4 * ((usec % 1000) / 1000)
    local due = ms + math.floor(math.min(nominal * jitter, MAX_BACKOFF))
    redis.call('ZADD', P .. ':delayed:' .. queue, due, id)
  elseif status == 'queued' then
    queue_again(P, queue, id)
  else
    finalize(P, key, id, queue, f[6], f[7], status, retention)
  end
  local json = task_json(f[1], status, f[9], f[10], err, attempts, updated, f[13])
  publish(P, key, id, f[4], json, status)
  return json
end

-- fail: KEYS[1] = P:task:<id>; ARGV = token, error code, message. The attempt failed: a
-- retry after the backoff (delayed), or failed after maxAttempts; cancelled if a cancel was
-- asked.
local function fail(keys, args)
  local P = prefix_of(keys[1], 'task')
  local f, err = held(keys[1], args[1], ENDING)
  if not f then return err end
  if not ERROR_CODES[args[2]] then
    return redis.error_reply('INVALID error code must be failed, timeout, output_too_large or worker_lost')
  end
  local ms, usec = now()
  if f[13] == '1' then
    return end_attempt(P, keys[1], f, ms, usec, 'cancelled', f[12], f[11])
  end
  local max = settings(f[8])
  local status = tonumber(f[12]) >= max and 'failed' or 'delayed'
  return end_attempt(P, keys[1], f, ms, usec, status, f[12],
    error_json(args[2], string.sub(args[3] or '', 1, 4096)))
end

-- handback: KEYS[1] = P:task:<id>; ARGV = token. The worker is stopping: the job is queued
-- again without counting the attempt (cancelled if a cancel was asked).
local function handback(keys, args)
  local P = prefix_of(keys[1], 'task')
  local f, err = held(keys[1], args[1], ENDING)
  if not f then return err end
  local ms, usec = now()
  if f[13] == '1' then
    return end_attempt(P, keys[1], f, ms, usec, 'cancelled', f[12], f[11])
  end
  local attempts = int(math.max(tonumber(f[12]) - 1, 0))
  return end_attempt(P, keys[1], f, ms, usec, 'queued', attempts, f[11])
end

-- The task of `key` if `owner` may see it (and it is of `queue`, unless that is ''): the VIEW
-- fields, then owner, queue, scope, req, cfg. nil otherwise.
local function visible(key, queue, owner)
  local f = read(key, { 'head', 'status', 'progress', 'result', 'error', 'attempts', 'updated',
    'cancel', 'owner', 'queue', 'scope', 'req', 'cfg' })
  if not f or f[9] ~= owner or (queue ~= '' and f[10] ~= queue) then return nil end
  return f
end

-- get: KEYS[1] = P:task:<id>; ARGV = queue ('' for any), owner. The task JSON, or NOT_FOUND.
local function get(keys, args)
  local f = read(keys[1], { 'head', 'status', 'progress', 'result', 'error', 'attempts',
    'updated', 'cancel', 'owner', 'queue' }, true)
  if not f or f[9] ~= args[2] or (args[1] ~= '' and f[10] ~= args[1]) then
    return redis.error_reply('NOT_FOUND no such task')
  end
  return view_json(f)
end

-- cancel: KEYS[1] = P:task:<id>; ARGV = queue ('' for any), owner. The task after the
-- cancel; NOT_FOUND; CONFLICT when it has finished.
local function cancel(keys, args)
  local P = prefix_of(keys[1], 'task')
  local f = visible(keys[1], args[1], args[2])
  if not f then return redis.error_reply('NOT_FOUND no such task') end
  local status = f[2]
  if FINAL[status] then return redis.error_reply('CONFLICT the task has already finished') end
  local id = id_of(P, keys[1])
  local updated = rfc3339(now())
  if status == 'running' then
    -- The worker learns it at its next renewal and stops the job.
    redis.call('HSET', keys[1], 'cancel', '1', 'updated', updated)
  else
    -- Its stream entry stays: `start` skips it.
    if status == 'delayed' then redis.call('ZREM', P .. ':delayed:' .. f[10], id) end
    status = 'cancelled'
    redis.call('HSET', keys[1], 'status', status, 'updated', updated)
    finalize(P, keys[1], id, f[10], f[11], f[12], status, retention_of(f[13]))
  end
  local json = task_json(f[1], status, f[3], f[4], f[5], f[6], updated, status == 'running' and '1' or f[8])
  publish(P, keys[1], id, f[9], json, status)
  return json
end

-- list: KEYS[1] = P:tasks:<queue>:<scope>; ARGV = statuses (comma-separated, '' for all),
-- limit, before ('' for none). A JSON array, newest first.
local function list(keys, args)
  local P = prefix_of(keys[1], 'tasks')
  local wanted = nil
  if args[1] ~= '' then
    wanted = {}
    for s in string.gmatch(args[1], '[^,]+') do wanted[s] = true end
  end
  local limit = tonumber(args[2])
  local from = 0
  if args[3] ~= '' then
    local rank = redis.call('ZREVRANK', keys[1], args[3])
    if not rank then return '[]' end
    from = rank + 1
  end
  local out = {}
  local scanned = 0
  while #out < limit and scanned < 1000 do
    local ids = redis.call('ZREVRANGE', keys[1], from, from + 99)
    if #ids == 0 then break end
    for _, id in ipairs(ids) do
      if #out >= limit then break end
      local f = read(P .. ':task:' .. id, VIEW, true)
      if f and (not wanted or wanted[f[2]]) then table.insert(out, view_json(f)) end
    end
    scanned = scanned + #ids
    from = from + #ids
  end
  return '[' .. table.concat(out, ',') .. ']'
end

-- promote: KEYS[1] = P:delayed:<queue>. Due retries are queued again. Returns how many.
local function promote(keys, args)
  local P = prefix_of(keys[1], 'delayed')
  local ms = now()
  local due = redis.call('ZRANGEBYSCORE', keys[1], '-inf', ms, 'LIMIT', 0, 100)
  for _, id in ipairs(due) do
    redis.call('ZREM', keys[1], id)
    local key = P .. ':task:' .. id
    local f = read(key, { 'head', 'status', 'progress', 'result', 'error', 'attempts', 'updated',
      'cancel', 'owner', 'queue' })
    if f and f[2] == 'delayed' then
      local updated = rfc3339(ms)
      redis.call('HSET', key, 'status', 'queued', 'updated', updated)
      publish(P, key, id, f[9], task_json(f[1], 'queued', f[3], f[4], f[5], f[6], updated, f[8]), 'queued')
      queue_again(P, f[10], id)
    end
  end
  return #due
end

-- reap: KEYS[1] = P:leases:<queue>; ARGV = how long the caller has seen Redis answer without
-- a break (ms). Leases that lapsed: the next attempt is queued at once, or the task is lost
-- after maxAttempts deliveries. A lease is only judged once the caller has been connected for
-- longer than it, so after an outage workers get to renew their own leases first.
local function reap(keys, args)
  local P = prefix_of(keys[1], 'leases')
  local healthy_for = tonumber(args[1])
  local ms, usec = now()
  local lapsed = redis.call('ZRANGEBYSCORE', keys[1], '-inf', ms, 'LIMIT', 0, 100)
  local changed = 0
  for _, id in ipairs(lapsed) do
    local key = P .. ':task:' .. id
    local f = read(key, ENDING)
    if not f or f[2] ~= 'running' then
      redis.call('ZREM', keys[1], id)
    else
      local max, _, lease = settings(f[8])
      if lease < healthy_for and tonumber(f[14] or '0') <= ms then
        if f[13] == '1' then
          -- A cancelled task keeps the error it had, as when its worker reports the stop.
          end_attempt(P, key, f, ms, usec, 'cancelled', f[12], f[11])
        else
          local status = tonumber(f[12]) >= max and 'lost' or 'queued'
          end_attempt(P, key, f, ms, usec, status, f[12],
            error_json('worker_lost', 'the worker running it stopped answering'))
        end
        changed = changed + 1
      end
    end
  end
  return changed
end

-- reclaim: KEYS[1] = P:q:<queue>; ARGV = min idle ms, cursor. Entries a worker read but never
-- started (it died in between) are queued again; follow the returned cursor until '0-0'.
-- Returns {next cursor, entries handled}.
local function reclaim(keys, args)
  local P = prefix_of(keys[1], 'q')
  ensure_group(keys[1])
  local reply = redis.call('XAUTOCLAIM', keys[1], GROUP, 'patchbay-reaper', args[1], args[2], 'COUNT', 100)
  local handled = 0
  for _, entry in ipairs(reply[2]) do
    -- A deleted entry comes back as nil fields (Redis 7 also lists it in reply[3]).
    redis.call('XACK', keys[1], GROUP, entry[1])
    redis.call('XDEL', keys[1], entry[1])
    local fields = entry[2]
    if type(fields) == 'table' and fields[1] == 'id' then
      local f = read(P .. ':task:' .. fields[2], { 'head', 'status', 'queue' })
      if f and f[2] == 'queued' then queue_again(P, f[3], fields[2]) end
    end
    handled = handled + 1
  end
  for _, id in ipairs(reply[3] or {}) do
    redis.call('XACK', keys[1], GROUP, id)
    handled = handled + 1
  end
  -- Everything it claimed is acknowledged: the reaper's consumer leaves nothing behind.
  pcall(redis.call, 'XGROUP', 'DELCONSUMER', keys[1], GROUP, 'patchbay-reaper')
  return { reply[1], handled }
end
-- trim: KEYS[1] = P:q:<queue>. Deletes the entries every worker is done with: those before
-- both the first pending entry and the group's last delivered one (never an entry not yet
-- read or still pending, unlike MAXLEN trimming). Returns how many.
local function trim(keys, args)
  local ok, groups = pcall(redis.call, 'XINFO', 'GROUPS', keys[1])
  if not ok then return 0 end
  local last = nil
  for _, g in ipairs(groups) do
    local info = {}
    for i = 1, #g, 2 do info[g[i]] = g[i + 1] end
    if info.name == GROUP then last = info['last-delivered-id'] end
  end
  if not last or last == '0-0' then return 0 end
  local ms, seq = string.match(last, '^(%d+)-(%d+)$')
  local min_id = ms .. '-' .. (tonumber(seq) + 1)
  local pending = redis.call('XPENDING', keys[1], GROUP)
  if pending[2] then min_id = pending[2] end
  return redis.call('XTRIM', keys[1], 'MINID', min_id)
end

-- sweep: KEYS[1] = P:q:<queue>; ARGV = idle ms. Deletes consumers with nothing pending that
-- have been idle that long (a live worker is re-created by its next read). Returns how many.
local function sweep(keys, args)
  local ok, consumers = pcall(redis.call, 'XINFO', 'CONSUMERS', keys[1], GROUP)
  if not ok then return 0 end
  local idle_ms = tonumber(args[1])
  local deleted = 0
  for _, c in ipairs(consumers) do
    local info = {}
    for i = 1, #c, 2 do info[c[i]] = c[i + 1] end
    if tonumber(info.pending) == 0 and tonumber(info.idle) >= idle_ms then
      redis.call('XGROUP', 'DELCONSUMER', keys[1], GROUP, info.name)
      deleted = deleted + 1
    end
  end
  return deleted
end

-- retire: KEYS[1] = P:q:<queue>; ARGV = consumer. A worker leaving for good deletes its
-- consumer, unless it still has entries pending (they would be dropped with it).
local function retire(keys, args)
  local ok, pending = pcall(redis.call, 'XPENDING', keys[1], GROUP, '-', '+', 1, args[1])
  if not ok or #pending > 0 then return 0 end
  return redis.call('XGROUP', 'DELCONSUMER', keys[1], GROUP, args[1])
end

-- stats: KEYS[1] = P:q:<queue>. {queued, running, delayed, consumers, succeeded,
-- failed, cancelled, lost}.
local function stats(keys, args)
  local P = prefix_of(keys[1], 'q')
  local queue = string.sub(keys[1], #P + 4)
  local consumers = 0
  local ok, info = pcall(redis.call, 'XINFO', 'CONSUMERS', keys[1], GROUP)
  if ok then consumers = #info end
  -- Queued: entries not yet read by any worker, and read but not started. Started entries
  -- stay in the stream until the maintainer trims them, so its length says more.
  local queued = nil
  local found, groups = pcall(redis.call, 'XINFO', 'GROUPS', keys[1])
  if found then
    for _, g in ipairs(groups) do
      local info = {}
      for i = 1, #g, 2 do info[g[i]] = g[i + 1] end
      if info.name == GROUP and type(info.lag) == 'number' then queued = info.lag + info.pending end
    end
  end
  if not queued then queued = redis.call('XLEN', keys[1]) end
  local s = redis.call('HMGET', P .. ':stats:' .. queue, 'succeeded', 'failed', 'cancelled', 'lost')
  return { queued, redis.call('ZCARD', P .. ':leases:' .. queue),
    redis.call('ZCARD', P .. ':delayed:' .. queue), consumers,
    tonumber(s[1] or 0), tonumber(s[2] or 0), tonumber(s[3] or 0), tonumber(s[4] or 0) }
end

-- Presence (contract section 9). For a room R:
--   P:pu:R           hash: user → "<since>\n<state JSON>", for each user present in R
--   P:pt:R           hash: user → its connections in R, on every instance
--   P:pc:R:<inst>    hash: connection → user, for the connections of instance <inst> in R
--   P:prooms:<inst>  set: the rooms where instance <inst> has connections
--   P:plive          zset: instance → the end of its lease (ms); patchbay renews its own
--   P:pver           counter: presence versions, one sequence for every room (from the
--                    clock in ms when created, so it never goes back after a loss)
-- Events go out as envelopes on R's channel (id `presence/<version>`), never into history.
-- When an instance's lease lapses, whichever instance sweeps first takes its connections out,
-- each user whose last connection it was leaving with `timeout`, once.

-- The next presence version. A counter Redis lost (a restart without persistence) starts
-- again from the clock in ms, above every version given out before: clients drop events
-- not newer than their snapshot, so versions must never go back.
local function presence_version(P)
  local key = P .. ':pver'
  if redis.call('EXISTS', key) == 0 then redis.call('SET', key, (now())) end
  return redis.call('INCR', key)
end

local function presence_fire(P, room, version, ty, payload)
  local envelope = '{"id":"presence/' .. version .. '","rooms":[' .. cjson.encode(room) ..
    '],"action":{"type":"@@patchbay/' .. ty .. '","payload":' .. payload .. '}}'
  redis.call('PUBLISH', P .. ':room:' .. room, envelope)
end

local function presence_snapshot(P, room)
  local flat = redis.call('HGETALL', P .. ':pu:' .. room)
  local ids = {}
  local entries = {}
  for i = 1, #flat, 2 do
    ids[#ids + 1] = flat[i]
    entries[flat[i]] = flat[i + 1]
  end
  table.sort(ids)
  local users = {}
  for i, user in ipairs(ids) do
    local since, state = string.match(entries[user], '^([^\n]*)\n(.*)$')
    users[i] = '{"userId":' .. cjson.encode(user) .. ',"state":' .. (state or '{}') ..
      ',"since":"' .. (since or '') .. '"}'
  end
  local version = redis.call('GET', P .. ':pver') or '0'
  return '{"version":' .. version .. ',"users":[' .. table.concat(users, ',') .. ']}'
end

-- One connection fewer for `user` in `room`: when it was the user's last, the user leaves.
local function presence_drop(P, room, user, reason)
  local left = redis.call('HINCRBY', P .. ':pt:' .. room, user, -1)
  if left > 0 then return 0 end
  redis.call('HDEL', P .. ':pt:' .. room, user)
  redis.call('HDEL', P .. ':pu:' .. room, user)
  local version = presence_version(P)
  presence_fire(P, room, version, 'PRESENCE_LEAVE', '{"room":' .. cjson.encode(room) ..
    ',"userId":' .. cjson.encode(user) .. ',"version":' .. version .. ',"reason":"' .. reason .. '"}')
  return version
end

-- presence_join: KEYS[1] = P:plive; ARGV = room, user, instance, connection. The snapshot
-- after the join (a JOIN is published when it is the user's first connection).
local function presence_join(keys, args)
  local P = string.sub(keys[1], 1, -7)
  local room, user, inst, conn = args[1], args[2], args[3], args[4]
  if redis.call('HSETNX', P .. ':pc:' .. room .. ':' .. inst, conn, user) == 1 then
    redis.call('SADD', P .. ':prooms:' .. inst, room)
    if redis.call('HINCRBY', P .. ':pt:' .. room, user, 1) == 1 then
      local since = rfc3339(now())
      redis.call('HSET', P .. ':pu:' .. room, user, since .. '\n{}')
      local version = presence_version(P)
      presence_fire(P, room, version, 'PRESENCE_JOIN', '{"room":' .. cjson.encode(room) ..
        ',"userId":' .. cjson.encode(user) .. ',"state":{},"version":' .. version .. '}')
    end
  end
  return presence_snapshot(P, room)
end

-- presence_leave: KEYS[1] = P:plive; ARGV = room, user, instance, connection, reason (`left`
-- or `timeout`). The LEAVE's version when the user left, else 0.
local function presence_leave(keys, args)
  local P = string.sub(keys[1], 1, -7)
  local room, user, inst, conn, reason = args[1], args[2], args[3], args[4], args[5]
  local pc = P .. ':pc:' .. room .. ':' .. inst
  if redis.call('HDEL', pc, conn) == 0 then return 0 end
  if redis.call('HLEN', pc) == 0 then redis.call('SREM', P .. ':prooms:' .. inst, room) end
  return presence_drop(P, room, user, reason)
end

-- presence_set: KEYS[1] = P:plive; ARGV = room, user, state (a JSON object, checked by the
-- caller). The STATE's version; error NOTIN when the user is not present.
local function presence_set(keys, args)
  local P = string.sub(keys[1], 1, -7)
  local room, user, state = args[1], args[2], args[3]
  local entry = redis.call('HGET', P .. ':pu:' .. room, user)
  if not entry then return redis.error_reply('NOTIN the user is not present in the room') end
  local since = string.match(entry, '^([^\n]*)\n') or ''
  redis.call('HSET', P .. ':pu:' .. room, user, since .. '\n' .. state)
  local version = presence_version(P)
  presence_fire(P, room, version, 'PRESENCE_STATE', '{"room":' .. cjson.encode(room) ..
    ',"userId":' .. cjson.encode(user) .. ',"state":' .. state .. ',"version":' .. version .. '}')
  return version
end

-- presence_get: KEYS[1] = P:plive; ARGV = room. Its snapshot.
local function presence_get(keys, args)
  return presence_snapshot(string.sub(keys[1], 1, -7), args[1])
end

-- presence_renew: KEYS[1] = P:plive; ARGV = instance, lease (ms). The instance is alive.
-- 1 when it had no lease (its first renewal, or its lease lapsed and it was swept, or Redis
-- lost it): then the instance joins its connections' presences again.
local function presence_renew(keys, args)
  return redis.call('ZADD', keys[1], now() + tonumber(args[2]), args[1])
end

-- presence_sweep: KEYS[1] = P:plive. Takes out the connections of every instance whose lease
-- lapsed; returns how many users left.
local function presence_sweep(keys, args)
  local P = string.sub(keys[1], 1, -7)
  local left = 0
  for _, inst in ipairs(redis.call('ZRANGEBYSCORE', keys[1], '-inf', (now()))) do
    local rooms_key = P .. ':prooms:' .. inst
    for _, room in ipairs(redis.call('SMEMBERS', rooms_key)) do
      local pc = P .. ':pc:' .. room .. ':' .. inst
      local flat = redis.call('HGETALL', pc)
      for i = 2, #flat, 2 do
        if presence_drop(P, room, flat[i], 'timeout') > 0 then left = left + 1 end
      end
      redis.call('DEL', pc)
    end
    redis.call('DEL', rooms_key)
    redis.call('ZREM', keys[1], inst)
  end
  return left
end

-- The library's version: patchbay loads it only over an older one. Raise it (and
-- FUNCTIONS_VERSION in mod.rs) with every change.
local function version() return 9 end

-- Every entry point, with its flag when it only reads. Each is registered wrapped: the time
-- read by the previous call is forgotten.
local ENTRY_POINTS = {
  { 'patchbay_enqueue', enqueue },
  { 'patchbay_start', start },
  { 'patchbay_renew', renew },
  { 'patchbay_progress', progress },
  { 'patchbay_succeed', succeed },
  { 'patchbay_fail', fail },
  { 'patchbay_handback', handback },
  { 'patchbay_get', get, 'no-writes' },
  { 'patchbay_cancel', cancel },
  { 'patchbay_list', list, 'no-writes' },
  { 'patchbay_promote', promote },
  { 'patchbay_reap', reap },
  { 'patchbay_reclaim', reclaim },
  { 'patchbay_sweep', sweep },
  { 'patchbay_trim', trim },
  { 'patchbay_retire', retire },
  { 'patchbay_stats', stats, 'no-writes' },
  { 'patchbay_version', version },
  { 'patchbay_publish', publish_fn },
  { 'patchbay_publish_except', publish_except_fn },
  { 'patchbay_read', read_fn },
  { 'patchbay_presence_join', presence_join },
  { 'patchbay_presence_leave', presence_leave },
  { 'patchbay_presence_set', presence_set },
  { 'patchbay_presence_get', presence_get, 'no-writes' },
  { 'patchbay_presence_renew', presence_renew },
  { 'patchbay_presence_sweep', presence_sweep },
}

-- (At load time only `redis` is there: no `ipairs`.)
for i = 1, #ENTRY_POINTS do
  local e = ENTRY_POINTS[i]
  local fn = e[2]
  redis.register_function{
    function_name = e[1],
    callback = function(keys, args)
      call_ms = nil
      return fn(keys, args)
    end,
    flags = e[3] and { e[3] } or {},
  }
end
