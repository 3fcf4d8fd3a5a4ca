// patchbay's redux middleware: actions named in the manifest travel over the patchbay
// websocket when it is open, and straight to the REST API when it is not; either way the
// store receives the same X_SUCCESS / X_FAILURE action.

import { Connection } from './socket.js'
import { sseSocket } from './sse.js'
import { callRest, failurePayload } from './rest.js'
import { fillTemplate, templateFields, PayloadError } from './encode.js'

export { encode, buildRequest, queryString } from './encode.js'

const REQUEST = '_REQUEST'
const BUILTIN = '@@patchbay/'
const SUBSCRIBE = BUILTIN + 'SUBSCRIBE'
const UNSUBSCRIBE = BUILTIN + 'UNSUBSCRIBE'
const REQUEST_ID = /^[A-Za-z0-9._:-]{1,128}$/
/** Room template values may only hold these, as on the server. */
const ROOM_PART = /^[A-Za-z0-9\-._~]+$/
/** Room names, as on the server: printable ASCII without whitespace. */
const ROOM = /^[\x21-\x7e]{1,128}$/
/** How many ids of requests answered some other way are kept, to drop late socket replies. */
const LATE_IDS = 1000
/** How many `meta.id`s of server-fired actions are remembered to drop a repeat. */
const SEEN_IDS = 2000
/** Most presence events kept for one room while its SUBSCRIBE is under way. */
const EARLY_EVENTS = 10000
const RESYNC = BUILTIN + 'RESYNC'
/** Refusals of a rejoin that may not hold a moment later: the rejoin is tried again. */
const TRANSIENT = new Set(['upstream_unavailable', 'rate_limited', 'too_many_requests'])
const PRESENCE_SNAPSHOT = BUILTIN + 'PRESENCE_SNAPSHOT'
const PRESENCE_EVENTS = new Set([BUILTIN + 'PRESENCE_JOIN', BUILTIN + 'PRESENCE_LEAVE', BUILTIN + 'PRESENCE_STATE'])

/** A position as the server sends it, `{epoch, offset}`, or null. */
const positionOf = p => (p && typeof p.epoch === 'string' && Number.isSafeInteger(p.offset) ? { epoch: p.epoch, offset: p.offset } : null)

/** `url` with `since=<epoch>:<offset>` added to its query. */
function withSince (url, position) {
  return `${url}${url.includes('?') ? '&' : '?'}since=${encodeURIComponent(`${position.epoch}:${position.offset}`)}`
}

function uuid () {
  if (globalThis.crypto?.randomUUID) return globalThis.crypto.randomUUID()
  const b = globalThis.crypto.getRandomValues(new Uint8Array(16))
  b[6] = (b[6] & 0x0f) | 0x40
  b[8] = (b[8] & 0x3f) | 0x80
  const h = [...b].map(x => x.toString(16).padStart(2, '0')).join('')
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`
}

const isRoom = room => typeof room === 'string' && ROOM.test(room)
const isSignal = s => typeof s?.aborted === 'boolean' && typeof s.addEventListener === 'function'
const isRoomOp = entry => entry.name === SUBSCRIBE || entry.name === UNSUBSCRIBE

function untilReached (until, payload) {
  if (!until || payload === null || typeof payload !== 'object') return false
  return Array.isArray(until.in) && until.in.includes(payload[until.field])
}

/** How long each of the diagnosis's requests may take. */
const DIAGNOSE_TIMEOUT_MS = 5000

/** Why the socket is down, found out with two plain requests: `/readyz` (any answer means
 *  something answers at that address), then `GET /sse` with the socket's own credentials
 *  (401: `auth`; 403, or an answer this page may not read: `refused`; admitted, or a server
 *  error on the way: something between the page and patchbay is the trouble, `unreachable`).
 *  The second opens an SSE session, closed as soon as its headers arrive. */
export async function diagnose (fetch, socketUrl) {
  const url = new URL(socketUrl)
  url.protocol = url.protocol === 'wss:' ? 'https:' : 'http:'
  url.searchParams.delete('since')
  const base = url.pathname.replace(/\/(ws|sse)$/, '')
  const limit = () => AbortSignal.timeout(DIAGNOSE_TIMEOUT_MS)
  try {
    await fetch(`${url.origin}${base}/readyz`, { mode: 'no-cors', cache: 'no-store', signal: limit() })
  } catch {
    return 'unreachable'
  }
  const abort = new AbortController()
  const timer = setTimeout(() => abort.abort(), DIAGNOSE_TIMEOUT_MS)
  try {
    const res = await fetch(`${url.origin}${base}/sse${url.search}`, { credentials: 'include', cache: 'no-store', signal: abort.signal, headers: { accept: 'text/event-stream' } })
    if (res.status === 401) return 'auth'
    if (res.status === 403) return 'refused'
    return 'unreachable'
  } catch {
    // Answered, but not readable from this page: patchbay sends CORS only to the origins it
    // allows (a proxy's error page without CORS reads the same).
    return abort.signal.aborted ? 'unreachable' : 'refused'
  } finally {
    clearTimeout(timer)
    abort.abort()
  }
}

/** The error `unwrap` throws for a `_FAILURE`: its payload's fields, and the action. */
export class PatchbayError extends Error {
  constructor (action) {
    super(action.payload?.message ?? 'request failed')
    this.name = 'PatchbayError'
    this.code = action.payload?.code
    this.status = action.payload?.status
    this.details = action.payload?.details
    this.action = action
  }
}

/** The payload of a reply (or of the promise of one), or a thrown `PatchbayError`. */
export async function unwrap (reply) {
  const action = await reply
  if (action?.error) throw new PatchbayError(action)
  return action?.payload
}

/** A request's promise, with `.unwrap()` as Redux Toolkit's thunks have it. */
function unwrappable (promise) {
  promise.unwrap = () => unwrap(promise)
  return promise
}

/**
 * A Redux Toolkit Query base query over the bridge: an endpoint's `query` returns a request
 * (`{ type: 'X_REQUEST', payload }`, or what a generated creator makes), which travels over
 * the socket, or to the API while the socket is down, like any other. A success is
 * `{ data: payload }`, a failure `{ error: { code, message, status?, details? } }`; RTK
 * Query's signal aborts the request.
 */
export function patchbayBaseQuery (bridge) {
  return async (request, api) => {
    const { type, payload, meta } = typeof request === 'string' ? { type: request } : request ?? {}
    const reply = await bridge.request(type, payload, { requestId: meta?.requestId, signal: api?.signal ?? meta?.signal })
    return reply.error ? { error: reply.payload, meta: reply.meta } : { data: reply.payload, meta: reply.meta }
  }
}

/** The payload exactly as the socket would carry it (dates as strings, no undefined, no NaN). */
function asJson (payload) {
  const text = JSON.stringify(payload === undefined ? {} : payload)
  if (text === undefined) throw new TypeError('not JSON')
  return JSON.parse(text)
}

/**
 * Creates the bridge. See index.d.ts for the options.
 * @param {import('./index.js').PatchbayOptions} options
 */
export function createPatchbay (options) {
  const {
    url,
    apiUrl,
    manifest = {},
    WebSocket = globalThis.WebSocket,
    fetch = (...args) => globalThis.fetch(...args),
    requestTimeoutMs = 15000,
    minBackoffMs = 250,
    maxBackoffMs = 10000,
    pingMs = 20000,
    pongTimeoutMs = 10000,
    connectWaitMs = 2000,
    transport = 'auto',
    autoConnect = true,
    refusedBackoffMs = 60000,
    warnUnknown = true
  } = options ?? {}
  if (!url || !apiUrl) throw new TypeError('createPatchbay needs `url` (ws://…/ws) and `apiUrl`')
  const noWebSocket = () => new TypeError('no WebSocket: pass one in the options (e.g. from the `ws` package)')
  if (autoConnect && typeof WebSocket !== 'function') throw noWebSocket()
  const check = options?.diagnose ?? true
  const api = String(apiUrl).replace(/\/+$/, '')

  // Actions emitted before the store can take them (status changes while redux is still
  // building its middleware chain, which forbids dispatching) wait here.
  let dispatch = null
  let ready = false
  const early = []
  /** Most actions kept for a store that is not there yet (a bridge used only through
   *  `bridge.request`, say): the oldest go first. */
  const EARLY_MAX = 1000
  const emit = action => {
    if (ready) return dispatch(action)
    early.push(action)
    if (early.length > EARLY_MAX) early.shift()
  }
  function flush () {
    if (ready || !dispatch) return
    ready = true
    for (const action of early.splice(0)) dispatch(action)
  }

  /** requestId → a request sent over the socket and not yet answered. */
  const pending = new Map()
  /** Requests made while the first connection was still being made. */
  const waiting = new Set()
  /** Requests whose REST call is under way. */
  const inRest = new Set()
  /** Ids of requests sent over the socket but answered otherwise: a late reply is dropped. */
  const late = new Set()
  /** room → { token, poll, live, timer, chain, position }: rooms to rejoin after a reconnect
   *  (recovering from `position` where the room keeps history), or to poll. */
  const rooms = new Map()
  /** The identity's own room (`user:<id>`) and where it stands: recovered with the handshake. */
  let identity = null
  /** `meta.id`s of the server-fired actions dispatched lately, oldest first. */
  const seenIds = new Set()
  /** room → { version, users: Map(userId → { userId, state, since }) }: presence as the store
   *  has seen it, from snapshots and the events newer than them. */
  const presence = new Map()
  /** room → presence events that arrived while a SUBSCRIBE of the room was under way. */
  const beforeSnapshot = new Map()
  const stats = { socket: 0, rest: 0 }
  /** Listeners of `subscribe`. */
  const listeners = new Set()
  /** Request types not in the manifest that were warned about. */
  const warned = new Set()
  let started = false
  let reason = null
  let via = transport === 'sse' ? 'sse' : 'websocket'
  function notify () {
    if (listeners.size === 0) return
    const state = snapshotState()
    for (const listener of [...listeners]) {
      try { listener(state) } catch (e) { queueMicrotask(() => { throw e }) }
    }
  }
  function snapshotState () {
    return { status: connection.status ?? 'idle', transport: via, reason, socket: stats.socket, rest: stats.rest }
  }
  /** Aborts of the REST calls under way, all cut short by `close()`. */
  const inFlight = new Set()
  let closed = false

  function entryFor (name, payload, requestId, extra = {}) {
    return { name, payload, requestId, builtin: name.startsWith(BUILTIN), spec: manifest[name], done: false, sent: false, timer: null, resolve: () => {}, ...extra }
  }

  function failure (entry, code, message) {
    return { type: `${entry.name}_FAILURE`, error: true, payload: failurePayload(code, message), meta: { requestId: entry.requestId } }
  }

  /** The answer to a SUBSCRIBE or UNSUBSCRIBE that the next connection will carry out. */
  function deferred (entry) {
    return { type: `${entry.name}_SUCCESS`, payload: { room: entry.payload.room }, meta: { requestId: entry.requestId, deferred: true } }
  }

  /** Answers a request exactly once: dispatched (unless quiet) and resolved. */
  function settle (entry, reply, fromSocket = false) {
    if (entry.done) return
    entry.done = true
    clearTimeout(entry.timer)
    pending.delete(entry.requestId)
    inRest.delete(entry)
    if (entry.sent && !fromSocket) {
      late.add(entry.requestId)
      if (late.size > LATE_IDS) late.delete(late.values().next().value)
    }
    track(entry, reply, fromSocket)
    if (!entry.quiet) emit(reply)
    entry.resolve(reply)
  }

  const failNow = (entry, code, message) => settle(entry, failure(entry, code, message))

  /** Keeps `rooms` up to date with what a reply says about them. */
  function track (entry, reply, fromSocket) {
    const room = entry.payload?.room
    if (entry.name === SUBSCRIBE && !reply.error && reply.payload?.presence) snapshot(room, reply.payload.presence)
    if (entry.name === SUBSCRIBE) flushBeforeSnapshot(room)
    if (entry.rejoin) {
      const state = entry.rejoin
      if (rooms.get(room) !== state) return
      state.live = !reply.error
      if (state.live) {
        state.retries = 0
        stopPolling(state)
        recovered(room, state, reply.payload, positionOf(entry.payload?.since))
      } else if (fromSocket && TRANSIENT.has(reply.payload?.code) && connection.isOpen) {
        // patchbay cannot take the room just now (its bus is still connecting after a
        // restart, say): try again shortly, polling meanwhile where the room says how.
        retryJoin(room, state)
        startPolling(room, state)
      } else {
        // The server refused to let the connection back into the room (an expired token,
        // a revoked grant): the store hears of it; the room is polled where it can be.
        if (fromSocket) emit({ type: BUILTIN + 'REJOIN_FAILED', payload: { room, code: reply.payload?.code, message: reply.payload?.message } })
        startPolling(room, state)
      }
    } else if (entry.name === SUBSCRIBE) {
      const state = rooms.get(room)
      if (!state) return
      if (!reply.error && !reply.meta?.deferred) {
        state.live = true
        stopPolling(state)
        state.position = positionOf(reply.payload?.position) ?? state.position
      } else if (reply.error && state === entry.added) {
        forget(room)
      }
    } else if (!entry.builtin && !reply.error) {
      remember(entry.spec, reply)
    }
  }

  /** A presence snapshot (a SUBSCRIBE's, the first or a rejoin's) replaces what the store
   *  holds for the room: dispatched as `@@patchbay/PRESENCE_SNAPSHOT`. */
  function snapshot (room, given) {
    if (!Number.isSafeInteger(given?.version) || !Array.isArray(given.users)) return
    const users = new Map(given.users.filter(u => typeof u?.userId === 'string').map(u => [u.userId, u]))
    presence.set(room, { version: given.version, users })
    emit({ type: PRESENCE_SNAPSHOT, payload: { room, version: given.version, users: [...users.values()] } })
  }

  /** Whether a presence event is news: newer than the room's snapshot and events so far
   *  (an older one, such as the user's own JOIN just before its snapshot, is dropped). */
  function presenceNews (message) {
    const room = message.payload?.room ?? message.meta?.room
    // A SUBSCRIBE of the room is under way: its snapshot decides what is news.
    const waiting = beforeSnapshot.get(room)
    if (waiting) {
      if (waiting.length < EARLY_EVENTS) waiting.push(message)
      return false
    }
    const version = message.payload?.version
    const known = presence.get(room)
    if (!known || !Number.isSafeInteger(version)) return true
    if (version <= known.version) return false
    known.version = version
    const { userId, state } = message.payload
    if (message.type === BUILTIN + 'PRESENCE_LEAVE') known.users.delete(userId)
    else if (message.type === BUILTIN + 'PRESENCE_JOIN') known.users.set(userId, { userId, state, since: new Date().toISOString() })
    else if (known.users.has(userId)) known.users.get(userId).state = state
    return true
  }

  /** A rejoin's answer: where the room stands now, and a RESYNC when what was missed could
   *  not be replayed (the app refetches what it shows of the room). */
  function recovered (room, state, payload, since) {
    state.position = resumed(payload, since)
    if (payload?.recovered === false && payload.reason !== 'not_kept') {
      emit({ type: RESYNC, payload: { room, reason: payload.reason, position: state.position } })
    }
  }

  /** Where a room stands for us after a recovery's answer: with `recovered`, still where we
   *  asked from (the replay that follows moves it, action by action, so a socket lost in the
   *  middle of it asks again for the rest); otherwise where the server says the room is. */
  function resumed (answer, since) {
    const position = positionOf(answer?.position)
    if (answer?.recovered === true && since && position && since.epoch === position.epoch) return { ...since }
    return position
  }

  /** Moves the positions of the rooms a server-fired action was stored in. */
  function advance (meta) {
    const move = (room, offset) => {
      if (!Number.isSafeInteger(offset)) return
      for (const position of [identity && room === identity.room ? identity.position : null, rooms.get(room)?.position]) {
        if (position && offset > position.offset) position.offset = offset
      }
    }
    move(meta.room, meta.offset)
    if (meta.offsets && typeof meta.offsets === 'object') {
      for (const [room, offset] of Object.entries(meta.offsets)) move(room, offset)
    }
  }

  /** The server could not deliver what a room missed (its own connection to Redis dropped
   *  and history no longer had it): the app refetches, and the room goes on from there. */
  function resynced (payload) {
    const position = positionOf(payload?.position)
    if (!position || typeof payload.room !== 'string') return
    if (identity && identity.room === payload.room) identity.position = { ...position }
    const state = rooms.get(payload.room)
    if (state) state.position = { ...position }
  }

  /** The greeting: where the identity's room stands, and how its recovery went. */
  function greeted (payload) {
    const room = Array.isArray(payload?.rooms) ? payload.rooms[0] : undefined
    const asked = identity && identity.room === room ? identity.position : null
    const answer = { ...payload?.recovery, position: typeof room === 'string' ? payload.positions?.[room] : undefined }
    const position = resumed(answer, asked)
    identity = position ? { room, position } : null
    const recovery = payload?.recovery
    if (recovery && recovery.recovered === false && recovery.reason !== 'not_kept') {
      emit({ type: RESYNC, payload: { room: recovery.room, reason: recovery.reason, position } })
    }
  }

  /** After a success, keeps the room it joined (or would have joined) for later. */
  function remember (spec, reply) {
    if (!spec?.subscribe && !reply.meta?.subscribed) return
    let room = typeof reply.meta?.subscribed === 'string' ? reply.meta.subscribed : null
    let fields = null
    try {
      const filled = fillTemplate(spec.subscribe, reply.payload, part => {
        if (!ROOM_PART.test(part)) throw new PayloadError('not a room part')
        return part
      })
      room ??= filled
      fields = Object.fromEntries(templateFields(spec.subscribe).map(n => [n, reply.payload[n]]))
    } catch {
      // The payload cannot name the room: nothing to poll, and in fallback nothing to join.
    }
    if (!room) return
    const state = rooms.get(room) ?? { token: null, poll: null, live: false, timer: null, chain: null, position: null }
    rooms.set(room, state)
    if (typeof reply.meta?.roomToken === 'string') state.token = reply.meta.roomToken
    if (spec.client?.poll && fields) state.poll = { ...spec.client.poll, fields }
    if (reply.meta?.subscribed) {
      state.live = true
      stopPolling(state)
    } else if (!state.live) {
      // Answered over REST: join now if the socket is back, else poll until it is.
      if (connection.isOpen) join(room, state)
      else startPolling(room, state)
    }
  }

  function viaRest (entry) {
    stats.rest++
    notify()
    inRest.add(entry)
    callRest({ apiUrl: api, name: entry.name, spec: entry.spec, payload: entry.payload, requestId: entry.requestId, fetch, inFlight, signal: entry.signal })
      .then(reply => settle(entry, reply))
  }

  /** Presence events that arrived for `room` while its SUBSCRIBE was under way, after its
   *  snapshot (if any): those newer than it, in version order. */
  function flushBeforeSnapshot (room) {
    const waiting = beforeSnapshot.get(room)
    if (!waiting) return
    beforeSnapshot.delete(room)
    waiting.sort((a, b) => (a.payload?.version ?? 0) - (b.payload?.version ?? 0))
    for (const message of waiting) if (presenceNews(message)) emit(message)
  }

  function send (entry) {
    const sent = connection.send({ type: entry.name + REQUEST, payload: entry.payload, meta: { requestId: entry.requestId } })
    if (!sent) return false
    if (entry.name === SUBSCRIBE && typeof entry.payload?.room === 'string' && !beforeSnapshot.has(entry.payload.room)) {
      beforeSnapshot.set(entry.payload.room, [])
    }
    if (!entry.quiet) {
      stats.socket++
      notify()
    }
    entry.sent = true
    pending.set(entry.requestId, entry)
    entry.timer = setTimeout(() => failNow(entry, 'timeout', `no answer within ${requestTimeoutMs} ms`), requestTimeoutMs)
    return true
  }

  function request (name, payload, requestId, signal) {
    return new Promise(resolve => {
      const entry = entryFor(name, payload, requestId, { resolve, signal })
      if (closed) return failNow(entry, 'upstream_unavailable', 'the bridge was closed')
      if (signal) {
        const abort = () => cancel(entry)
        if (signal.aborted) return abort()
        signal.addEventListener('abort', abort, { once: true })
        const resolved = entry.resolve
        entry.resolve = reply => {
          signal.removeEventListener('abort', abort)
          resolved(reply)
        }
      }
      try {
        entry.payload = asJson(payload)
      } catch {
        return failNow(entry, 'invalid_payload', 'the payload cannot be written as JSON')
      }
      // While the first connection is being made, wait for it (briefly) rather than fall back
      // at once: a request sent at page load should get the socket and its room tokens.
      if (connection.status === 'connecting') {
        waiting.add(entry)
        entry.timer = setTimeout(() => release(entry), connectWaitMs)
        return
      }
      route(entry)
    })
  }

  function route (entry) {
    if (entry.builtin) return builtinRequest(entry)
    if (send(entry)) return
    if (entry.spec?.http) return viaRest(entry)
    failNow(entry, 'upstream_unavailable', 'patchbay is not connected and this action has no REST fallback')
  }

  /** A request whose signal aborted: answered now, locally, with `aborted`; a reply that
   *  still comes from the socket or the API is dropped. */
  function cancel (entry) {
    if (entry.done) return
    waiting.delete(entry)
    failNow(entry, 'aborted', 'the request was aborted')
  }

  /** Sends a request that waited for the first connection, over whatever is available now. */
  function release (entry) {
    if (!waiting.delete(entry)) return
    clearTimeout(entry.timer)
    entry.timer = null
    route(entry)
  }

  /** Built-ins; while the socket is down, rooms are remembered and joined on reconnect. */
  function builtinRequest (entry) {
    const room = entry.payload?.room
    if (isRoomOp(entry) && isRoom(room)) {
      if (entry.name === UNSUBSCRIBE) forget(room)
      else if (!rooms.has(room)) rooms.set(room, entry.added = { token: null, poll: null, live: false, timer: null, chain: null, position: null })
      const token = entry.payload.token
      if (entry.name === SUBSCRIBE && typeof token === 'string') rooms.get(room).token = token
    }
    if (!send(entry)) answerOffline(entry)
  }

  /** A built-in that cannot reach patchbay: room changes wait for the next connection. */
  function answerOffline (entry) {
    if (!isRoomOp(entry)) return failNow(entry, 'upstream_unavailable', 'patchbay is not connected')
    if (!isRoom(entry.payload?.room)) return failNow(entry, 'invalid_payload', '`room` must be 1 to 128 printable ASCII characters without spaces')
    settle(entry, deferred(entry))
  }

  function forget (room) {
    const state = rooms.get(room)
    if (state) {
      stopPolling(state)
      clearTimeout(state.retry)
    }
    rooms.delete(room)
    presence.delete(room)
  }

  /** Joins `room` again after a transient refusal, with a growing delay (0.5 s, doubling up
   *  to 8 s), while the socket stays open. */
  function retryJoin (room, state) {
    clearTimeout(state.retry)
    const delay = Math.min(8000, 500 * 2 ** (state.retries ?? 0))
    state.retries = (state.retries ?? 0) + 1
    state.retry = setTimeout(() => {
      state.retry = null
      if (!closed && rooms.get(room) === state && !state.live && connection.isOpen) join(room, state)
    }, delay)
  }

  /** Quietly (re)joins a remembered room, presenting its token; a refusal falls back to polling. */
  function join (room, state) {
    const payload = state.token ? { room, token: state.token } : { room }
    if (state.position) payload.since = { ...state.position }
    const entry = entryFor(SUBSCRIBE, payload, uuid(), { quiet: true, rejoin: state })
    if (!send(entry)) startPolling(room, state)
  }

  function startPolling (room, state) {
    if (state.chain || state.live || !state.poll || closed) return
    const { action, intervalMs = 3000, as = `${action}_SUCCESS`, until, fields } = state.poll
    const spec = manifest[action]
    if (!spec?.http) return
    const chain = state.chain = {}
    const alive = () => state.chain === chain && rooms.get(room) === state && !state.live && !closed
    const tick = async () => {
      state.timer = null
      if (!alive()) return
      const reply = await callRest({ apiUrl: api, name: action, spec, payload: fields, requestId: uuid(), fetch, inFlight })
      if (!alive()) return
      if (!reply.error) {
        emit({ type: as, payload: reply.payload, meta: { room, polled: true } })
        if (untilReached(until, reply.payload)) return forget(room)
      }
      if (alive()) state.timer = setTimeout(tick, intervalMs)
    }
    // Spread the first polls: after an outage, every remembered room starts polling at once.
    state.timer = setTimeout(tick, Math.random() * Math.min(intervalMs, 1000))
  }

  function stopPolling (state) {
    clearTimeout(state.timer)
    state.timer = null
    state.chain = null
  }

  function onMessage (message) {
    if (typeof message?.type !== 'string') return
    const id = message.meta?.requestId
    const entry = typeof id === 'string' ? pending.get(id) : undefined
    if (entry) {
      const reply = message.type === BUILTIN + 'ERROR'
        ? { type: `${entry.name}_FAILURE`, error: true, payload: failurePayload(message.payload?.code ?? 'invalid_action', message.payload?.message ?? 'refused'), meta: { requestId: id } }
        : message
      return settle(entry, reply, true)
    }
    // A reply to a request that already timed out or was answered over REST.
    if (late.delete(id)) return
    if (message.type === BUILTIN + 'CONNECTED') greeted(message.payload)
    if (message.type === RESYNC) resynced(message.payload)
    const meta = message.meta
    if (meta && typeof meta === 'object') {
      // Positions move even with a repeat: it may carry offsets of other rooms.
      advance(meta)
      // A recovery may replay what another room's recovery (or the live stream) brought.
      if (typeof meta.id === 'string') {
        if (seenIds.has(meta.id)) return
        seenIds.add(meta.id)
        if (seenIds.size > SEEN_IDS) seenIds.delete(seenIds.values().next().value)
      }
    }
    if (PRESENCE_EVENTS.has(message.type) && !presenceNews(message)) return
    emit(message)
    finishedByPush(message)
  }

  /** A push that says a polled room is done (e.g. a final TASK_PROGRESS): leave the room, so
   *  finished rooms are not rejoined, polled or counted against the server's room limit. */
  function finishedByPush (message) {
    const room = message.meta?.room
    const state = typeof room === 'string' ? rooms.get(room) : undefined
    const poll = state?.poll
    if (!poll || message.type !== (poll.as ?? `${poll.action}_SUCCESS`) || !untilReached(poll.until, message.payload)) return
    forget(room)
    send(entryFor(UNSUBSCRIBE, { room }, uuid(), { quiet: true }))
  }

  function onDown () {
    // Requests that were on the dead socket go to the API instead, with the same requestId,
    // so an API that honours Idempotency-Key runs each of them once.
    for (const entry of [...pending.values()]) {
      pending.delete(entry.requestId)
      clearTimeout(entry.timer)
      if (entry.quiet) settle(entry, failure(entry, 'upstream_unavailable', 'the connection to patchbay was lost'))
      else if (entry.builtin) answerOffline(entry)
      else if (entry.spec?.http) viaRest(entry)
      else failNow(entry, 'upstream_unavailable', 'the connection to patchbay was lost')
    }
    for (const [room, state] of rooms) {
      state.live = false
      startPolling(room, state)
    }
  }

  const connection = new Connection({
    // The identity's room recovers with the handshake, from where it stood.
    url: () => (identity ? withSince(url, identity.position) : url),
    WebSocket,
    SseSocket: sseSocket(fetch),
    transport,
    minBackoffMs,
    maxBackoffMs,
    pingMs,
    pongTimeoutMs,
    onStatus: (status, transport, why) => {
      via = transport
      reason = why
      emit({ type: '@@patchbay/STATUS', payload: why ? { status, transport, reason: why } : { status, transport } })
      notify()
    },
    refusedBackoffMs,
    diagnose: check ? socketUrl => diagnose(fetch, socketUrl) : null,
    onMessage,
    onOpen: () => {
      for (const [room, state] of rooms) join(room, state)
      for (const entry of [...waiting]) release(entry)
    },
    onDown: () => {
      onDown()
      for (const entry of [...waiting]) release(entry)
    },
    onAuthExpired: () => emit({ type: '@@patchbay/AUTH_EXPIRED' })
  })
  function connect () {
    if (started || closed) return
    if (typeof WebSocket !== 'function') throw noWebSocket()
    started = true
    connection.start()
  }
  if (autoConnect) connect()

  const middleware = store => {
    dispatch = store.dispatch
    // Redux forbids dispatching while it builds the middleware chain: deliver queued actions
    // once it is done, or with the first action, whichever comes first.
    queueMicrotask(flush)
    return next => action => {
      flush()
      const type = action?.type
      if (typeof type !== 'string' || !type.endsWith(REQUEST)) return next(action)
      const name = type.slice(0, -REQUEST.length)
      if (!name.startsWith(BUILTIN) && !Object.hasOwn(manifest, name)) {
        // Nothing will answer it: say so once, in development (a manifest copy that is older
        // than the server's, a typo).
        if (warnUnknown && !warned.has(type)) {
          warned.add(type)
          console.warn(`patchbay: ${type} is not in the manifest: it goes to the reducers, and nothing will answer it`)
        }
        return next(action)
      }
      // An AbortSignal is not state: the reducers get the action without it.
      const signal = action.meta?.signal
      if (signal !== undefined) {
        const { signal: _, ...meta } = action.meta
        action = { ...action, meta }
      }
      next(action)
      const given = action.meta?.requestId
      // A given id is kept unless a request with that id is still waiting for its answer.
      const requestId = typeof given === 'string' && REQUEST_ID.test(given) && !pending.has(given) ? given : uuid()
      return unwrappable(request(name, action.payload, requestId, isSignal(signal) ? signal : undefined))
    }
  }

  return {
    middleware,
    get status () { return connection.status ?? 'idle' },
    stats,
    connect,
    /** Calls `listener` with `{status, transport, reason, socket, rest}` at every change;
     *  returns the function that stops it. */
    subscribe (listener) {
      listeners.add(listener)
      return () => listeners.delete(listener)
    },
    /** Sends a request without passing it through the store (the RTK Query base query uses
     *  it): the reply is returned, and dispatched as usual. */
    request (type, payload, { requestId, signal } = {}) {
      if (typeof type !== 'string' || !type.endsWith(REQUEST)) throw new TypeError('request needs an X_REQUEST type')
      const name = type.slice(0, -REQUEST.length)
      if (!name.startsWith(BUILTIN) && !Object.hasOwn(manifest, name)) {
        return unwrappable(Promise.resolve({ type: `${name}_FAILURE`, error: true, payload: failurePayload('unknown_action', `${type} is not in the manifest`), meta: { requestId: requestId ?? uuid() } }))
      }
      const id = typeof requestId === 'string' && REQUEST_ID.test(requestId) && !pending.has(requestId) ? requestId : uuid()
      return unwrappable(request(name, payload, id, isSignal(signal) ? signal : undefined))
    },
    /** Who is in `room` as the store has seen it (snapshot and newer events), or null. */
    presence (room) {
      const known = presence.get(room)
      return known ? { version: known.version, users: [...known.users.values()].map(u => ({ ...u })) } : null
    },
    reconnect () {
      if (!closed) connection.reconnect()
    },
    close () {
      if (closed) return
      closed = true
      listeners.clear()
      connection.close()
      for (const abort of [...inFlight]) abort()
      for (const state of rooms.values()) {
        stopPolling(state)
        clearTimeout(state.retry)
      }
      for (const entry of [...pending.values(), ...inRest, ...waiting]) failNow(entry, 'upstream_unavailable', 'the bridge was closed')
      waiting.clear()
    }
  }
}
