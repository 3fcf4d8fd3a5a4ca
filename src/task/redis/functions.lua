#!lua name=patchbay

-- patchbay's task queue on Redis: every step of a task is one FCALL, atomic, so a worker in
-- any language needs one command per step. patchbay loads this library at start-up (and again
-- when Redis lost it). Keys, for a prefix P (PATCHBAY_REDIS_PREFIX):
--
--   P:task:<id>                 hash: the task's fields (params, progress, result and error as
--                               raw JSON, never decoded and re-encoded, so numbers and empty
--                               arrays survive exactly), its settings, its lease
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

local function now()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000), tonumber(t[2])
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

local function load(key)
  local flat = redis.call('HGETALL', key)
  if #flat == 0 then return nil end
  local h = {}
  for i = 1, #flat, 2 do h[flat[i]] = flat[i + 1] end
  return h
end

local function task_json(h)
  local user = 'null'
  if h.owner ~= '' then user = cjson.encode(h.owner) end
  return '{"id":' .. cjson.encode(h.id) .. ',"queue":' .. cjson.encode(h.queue) ..
    ',"userId":' .. user .. ',"status":"' .. h.status .. '","params":' .. h.params ..
    ',"progress":' .. (h.progress or 'null') .. ',"result":' .. (h.result or 'null') ..
    ',"error":' .. (h.error or 'null') .. ',"attempts":' .. h.attempts ..
    ',"maxAttempts":' .. h.max .. ',"createdAt":"' .. h.created .. '","updatedAt":"' ..
    h.updated .. '","cancelRequested":' .. (h.cancel == '1' and 'true' or 'false') .. '}'
end

-- Saves the changed fields, publishes the task's TASK_PROGRESS (unless `quiet`) and returns
-- its JSON.
local function save(P, key, h, fields, quiet)
  local flat, gone = {}, {}
  for _, f in ipairs(fields) do
    if h[f] == nil then
      table.insert(gone, f)
    else
      table.insert(flat, f)
      table.insert(flat, h[f])
    end
  end
  if #gone > 0 then redis.call('HDEL', key, unpack(gone)) end
  local v = tonumber(h.v or '0') + 1
  h.v = tostring(v)
  table.insert(flat, 'v')
  table.insert(flat, h.v)
  redis.call('HSET', key, unpack(flat))
  local json = task_json(h)
  if quiet then return json end
  local action = '{"type":"TASK_PROGRESS","payload":' .. json .. '}'
  local task_room = 'task:' .. h.id
  if h.owner == '' then
    redis.call('PUBLISH', P .. ':room:' .. task_room, action)
  else
    local user_room = 'user:' .. h.owner
    local envelope = '{"id":' .. cjson.encode('task/' .. h.id .. '/' .. v) .. ',"rooms":[' ..
      cjson.encode(task_room) .. ',' .. cjson.encode(user_room) .. '],"action":' .. action .. '}'
    redis.call('PUBLISH', P .. ':room:' .. task_room, envelope)
    redis.call('PUBLISH', P .. ':room:' .. user_room, envelope)
  end
  return json
end

-- Creates the stream and its group when the stream does not exist (a fresh queue, or Redis
-- lost it); a worker that finds the group missing creates it too (NOGROUP).
local function ensure_group(stream)
  if redis.call('EXISTS', stream) == 0 then
    redis.call('XGROUP', 'CREATE', stream, GROUP, '0', 'MKSTREAM')
  end
end

-- `fresh`: a new task's first entry. Its stream may be made here without the group: patchbay
-- creates every queue's group at start-up and workers create it on NOGROUP, both from id 0,
-- so the entry is read either way. A job queued again checks, as Redis may have lost both.
local function queue_job(P, h, fresh)
  local stream = P .. ':q:' .. h.queue
  if not fresh then ensure_group(stream) end
  redis.call('XADD', stream, '*', 'id', h.id)
end

-- A task reached its final status: it leaves the active set and the lease index, and it and
-- its request id expire after the retention.
local function finalize(P, key, h)
  redis.call('SREM', P .. ':active:' .. h.queue .. ':' .. (h.scope or ('u:' .. h.owner)), h.id)
  redis.call('ZREM', P .. ':leases:' .. h.queue, h.id)
  redis.call('HINCRBY', P .. ':stats:' .. h.queue, h.status, 1)
  local retention = tonumber(h.retention)
  redis.call('EXPIRE', key, retention)
  if h.req then redis.call('EXPIRE', h.req, retention) end
end

local function error_json(code, message)
  return '{"code":' .. cjson.encode(code) .. ',"message":' .. cjson.encode(message) .. '}'
end

local function is_json(raw)
  local ok, v = pcall(cjson.decode, raw)
  return ok, v
end

-- The lease holder's task, or an error reply: STALE when the token is not the current lease.
local function held(key, token)
  local h = load(key)
  if not h then return nil, redis.error_reply('NOT_FOUND no such task') end
  if h.status ~= 'running' or h.token ~= token then
    return nil, redis.error_reply('STALE this worker no longer holds the task')
  end
  return h
end

local function visible(key, queue, owner)
  local h = load(key)
  if not h or h.owner ~= owner or (queue ~= '' and h.queue ~= queue) then return nil end
  return h
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
    local h = existing and load(P .. ':task:' .. existing)
    if h then return task_json(h) end
    return redis.error_reply('LIMIT ' .. limit)
  end
  -- One call claims the request id, or tells which task already has it.
  local existing = redis.call('SET', req, id, 'NX', 'GET')
  if existing then
    local h = load(P .. ':task:' .. existing)
    if h then return task_json(h) end
    redis.call('SET', req, id) -- its task expired: this request starts a new one
  end
  local ms = now()
  local at = rfc3339(ms)
  local h = {
    id = id, queue = queue, owner = owner, scope = scope, status = 'queued', params = params,
    attempts = '0', max = args[7], created = at, updated = at, cancel = '0',
    timeout = args[8], lease = args[9], backoff = args[10], retention = args[11], req = req,
  }
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
  redis.call('ZADD', list, seq, id)
  redis.call('EXPIRE', list, tonumber(args[11]) + 86400)
  -- An anonymous task's new room has no member yet and it has no user room: nothing to tell.
  local json = save(P, key, h, { 'id', 'queue', 'owner', 'scope', 'status', 'params', 'attempts',
    'max', 'created', 'updated', 'cancel', 'timeout', 'lease', 'backoff', 'retention', 'req' },
    owner == '')
  queue_job(P, h, true)
  return json
end

-- start: KEYS[1] = P:task:<id>, KEYS[2] = P:q:<queue>; ARGV = stream entry id, consumer.
-- The entry is acknowledged whatever happens (the maintainer trims acknowledged entries).
-- Returns nil when the task cannot start (cancelled, expired), else
-- {task JSON, lease token, leaseMs, timeoutMs}.
local function start(keys, args)
  local P = prefix_of(keys[1], 'task')
  redis.call('XACK', keys[2], GROUP, args[1])
  local h = load(keys[1])
  if not h or h.status ~= 'queued' then return nil end
  local ms = now()
  h.status = 'running'
  h.attempts = tostring(tonumber(h.attempts) + 1)
  h.updated = rfc3339(ms)
  h.token = tostring(redis.call('INCR', P .. ':seq'))
  h['until'] = tostring(ms + tonumber(h.lease))
  h.consumer = args[2]
  redis.call('ZADD', P .. ':leases:' .. h.queue, h['until'], h.id)
  local json = save(P, keys[1], h, { 'status', 'attempts', 'updated', 'token', 'until', 'consumer' })
  return { json, h.token, tonumber(h.lease), tonumber(h.timeout) }
end

-- renew: KEYS[1] = P:task:<id>; ARGV = token. Returns 1 when a cancel was asked, else 0.
local function renew(keys, args)
  local P = prefix_of(keys[1], 'task')
  local h, err = held(keys[1], args[1])
  if not h then return err end
  local ms = now()
  local lease_end = ms + tonumber(h.lease)
  redis.call('HSET', keys[1], 'until', lease_end)
  redis.call('ZADD', P .. ':leases:' .. h.queue, lease_end, h.id)
  return h.cancel == '1' and 1 or 0
end

-- progress: KEYS[1] = P:task:<id>; ARGV = token, a JSON object of at most 16 KiB.
local function progress(keys, args)
  local P = prefix_of(keys[1], 'task')
  local h, err = held(keys[1], args[1])
  if not h then return err end
  local raw = args[2]
  local ok, v = is_json(raw)
  if not ok or type(v) ~= 'table' or not string.find(raw, '^%s*{') then
    return redis.error_reply('INVALID progress must be a JSON object')
  end
  if #raw > MAX_PROGRESS then
    return redis.error_reply('INVALID progress is larger than 16384 bytes')
  end
  h.progress = raw
  h.updated = rfc3339(now())
  save(P, keys[1], h, { 'progress', 'updated' })
  return 1
end

-- succeed: KEYS[1] = P:task:<id>; ARGV = token, the result as JSON (at most 1 MiB).
local function succeed(keys, args)
  local P = prefix_of(keys[1], 'task')
  local h, err = held(keys[1], args[1])
  if not h then return err end
  local raw = args[2]
  if not is_json(raw) then return redis.error_reply('INVALID the result must be JSON') end
  if #raw > MAX_RESULT then return redis.error_reply('INVALID the result is larger than 1 MiB') end
  local fields = { 'status', 'result', 'updated' }
  -- An error left by a failed attempt goes; most tasks never had one.
  if h.error then table.insert(fields, 'error') end
  h.status = 'succeeded'
  h.result = raw
  h.error = nil
  h.updated = rfc3339(now())
  finalize(P, keys[1], h)
  return save(P, keys[1], h, fields)
end

-- fail: KEYS[1] = P:task:<id>; ARGV = token, error code, message. The attempt failed: a
-- retry after the backoff (delayed), or failed after maxAttempts; cancelled if a cancel was
-- asked.
local function fail(keys, args)
  local P = prefix_of(keys[1], 'task')
  local h, err = held(keys[1], args[1])
  if not h then return err end
  if not ERROR_CODES[args[2]] then
    return redis.error_reply('INVALID error code must be failed, timeout, output_too_large or worker_lost')
  end
  local ms, usec = now()
  h.updated = rfc3339(ms)
  h.token = nil
  h['until'] = nil
  redis.call('ZREM', P .. ':leases:' .. h.queue, h.id)
  if h.cancel == '1' then
    h.status = 'cancelled'
  else
    h.error = error_json(args[2], string.sub(args[3] or '', 1, 4096))
    local attempts = tonumber(h.attempts)
    if attempts >= tonumber(h.max) then
      h.status = 'failed'
    else
      h.status = 'delayed'
      local nominal = math.min(tonumber(h.backoff) * 2 ^ math.min(attempts - 1, 30), MAX_BACKOFF)
      local jitter = 0.8 + 0.4 * ((usec % 1000) / 1000)
      local due = ms + math.floor(math.min(nominal * jitter, MAX_BACKOFF))
      redis.call('ZADD', P .. ':delayed:' .. h.queue, due, h.id)
    end
  end
  if FINAL[h.status] then finalize(P, keys[1], h) end
  return save(P, keys[1], h, { 'status', 'error', 'updated', 'token', 'until' })
end

-- handback: KEYS[1] = P:task:<id>; ARGV = token. The worker is stopping: the job is queued
-- again without counting the attempt (cancelled if a cancel was asked).
local function handback(keys, args)
  local P = prefix_of(keys[1], 'task')
  local h, err = held(keys[1], args[1])
  if not h then return err end
  h.updated = rfc3339(now())
  h.token = nil
  h['until'] = nil
  redis.call('ZREM', P .. ':leases:' .. h.queue, h.id)
  if h.cancel == '1' then
    h.status = 'cancelled'
    finalize(P, keys[1], h)
  else
    h.status = 'queued'
    h.attempts = tostring(math.max(tonumber(h.attempts) - 1, 0))
    queue_job(P, h)
  end
  return save(P, keys[1], h, { 'status', 'attempts', 'updated', 'token', 'until' })
end

-- get: KEYS[1] = P:task:<id>; ARGV = queue ('' for any), owner. The task JSON, or NOT_FOUND.
local function get(keys, args)
  local h = visible(keys[1], args[1], args[2])
  if not h then return redis.error_reply('NOT_FOUND no such task') end
  return task_json(h)
end

-- cancel: KEYS[1] = P:task:<id>; ARGV = queue ('' for any), owner. The task after the
-- cancel; NOT_FOUND; CONFLICT when it has finished.
local function cancel(keys, args)
  local P = prefix_of(keys[1], 'task')
  local h = visible(keys[1], args[1], args[2])
  if not h then return redis.error_reply('NOT_FOUND no such task') end
  if FINAL[h.status] then return redis.error_reply('CONFLICT the task has already finished') end
  h.updated = rfc3339(now())
  if h.status == 'running' then
    h.cancel = '1'
  else
    -- Its stream entry stays: `start` skips it.
    if h.status == 'delayed' then redis.call('ZREM', P .. ':delayed:' .. h.queue, h.id) end
    h.status = 'cancelled'
    finalize(P, keys[1], h)
  end
  return save(P, keys[1], h, { 'status', 'cancel', 'updated', 'token', 'until' })
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
      local h = load(P .. ':task:' .. id)
      if h and (not wanted or wanted[h.status]) and #out < limit then
        table.insert(out, task_json(h))
      end
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
    local h = load(key)
    if h and h.status == 'delayed' then
      h.status = 'queued'
      h.updated = rfc3339(ms)
      save(P, key, h, { 'status', 'updated' })
      queue_job(P, h)
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
  local ms = now()
  local lapsed = redis.call('ZRANGEBYSCORE', keys[1], '-inf', ms, 'LIMIT', 0, 100)
  local changed = 0
  for _, id in ipairs(lapsed) do
    local key = P .. ':task:' .. id
    local h = load(key)
    if not h or h.status ~= 'running' then
      redis.call('ZREM', keys[1], id)
    elseif tonumber(h.lease) < healthy_for and tonumber(h['until'] or '0') <= ms then
      redis.call('ZREM', keys[1], id)
      h.updated = rfc3339(ms)
      h.token = nil
      h['until'] = nil
      h.error = error_json('worker_lost', 'the worker running it stopped answering')
      if h.cancel == '1' then
        h.status = 'cancelled'
      elseif tonumber(h.attempts) >= tonumber(h.max) then
        h.status = 'lost'
      else
        h.status = 'queued'
        queue_job(P, h)
      end
      if FINAL[h.status] then finalize(P, key, h) end
      save(P, key, h, { 'status', 'error', 'updated', 'token', 'until' })
      changed = changed + 1
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
      local key = P .. ':task:' .. fields[2]
      local h = load(key)
      if h and h.status == 'queued' then queue_job(P, h) end
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

-- stats: KEYS[1] = P:q:<queue>. {queued entries, running, delayed, consumers, succeeded,
-- failed, cancelled, lost}.
local function stats(keys, args)
  local P = prefix_of(keys[1], 'q')
  local queue = string.sub(keys[1], #P + 4)
  local consumers = 0
  local ok, info = pcall(redis.call, 'XINFO', 'CONSUMERS', keys[1], GROUP)
  if ok then consumers = #info end
  local s = redis.call('HMGET', P .. ':stats:' .. queue, 'succeeded', 'failed', 'cancelled', 'lost')
  return { redis.call('XLEN', keys[1]), redis.call('ZCARD', P .. ':leases:' .. queue),
    redis.call('ZCARD', P .. ':delayed:' .. queue), consumers,
    tonumber(s[1] or 0), tonumber(s[2] or 0), tonumber(s[3] or 0), tonumber(s[4] or 0) }
end

-- The library's version: patchbay loads it only over an older one. Raise it (and
-- FUNCTIONS_VERSION in mod.rs) with every change.
local function version() return 2 end

redis.register_function('patchbay_enqueue', enqueue)
redis.register_function('patchbay_start', start)
redis.register_function('patchbay_renew', renew)
redis.register_function('patchbay_progress', progress)
redis.register_function('patchbay_succeed', succeed)
redis.register_function('patchbay_fail', fail)
redis.register_function('patchbay_handback', handback)
redis.register_function{ function_name = 'patchbay_get', callback = get, flags = { 'no-writes' } }
redis.register_function('patchbay_cancel', cancel)
redis.register_function{ function_name = 'patchbay_list', callback = list, flags = { 'no-writes' } }
redis.register_function('patchbay_promote', promote)
redis.register_function('patchbay_reap', reap)
redis.register_function('patchbay_reclaim', reclaim)
redis.register_function('patchbay_sweep', sweep)
redis.register_function('patchbay_trim', trim)
redis.register_function('patchbay_retire', retire)
redis.register_function{ function_name = 'patchbay_stats', callback = stats, flags = { 'no-writes' } }
redis.register_function('patchbay_version', version)
