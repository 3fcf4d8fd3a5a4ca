// One websocket to patchbay, kept open: reconnects with capped exponential backoff and jitter,
// pings at the application level (browsers hide websocket pings from scripts), and honours
// the close codes of the contract.

/** Close code after which reconnecting is pointless until the user re-authenticates. */
const AUTH_EXPIRED = 4401
/** Refusals in a row (`refused`, `auth`) after which reconnects wait `refusedBackoffMs`. */
const REFUSALS_BEFORE_LONG_BACKOFF = 3
/** Request ids of our own pings; their replies are not the application's business. */
const PING_PREFIX = 'ping-'

/**
 * @typedef {'connecting' | 'open' | 'fallback'} Status
 */

export class Connection {
  /**
   * @param {object} o
   * @param {string | (() => string)} o.url  (a function: asked again at every connect)
   * @param {typeof WebSocket} o.WebSocket
   * @param {any} [o.SseSocket] the same interface over SSE ([`sseSocket`](./sse.js)), or null
   * @param {'auto' | 'websocket' | 'sse'} [o.transport] `auto`: the websocket, and SSE after
   *   two websocket attempts in a row that never opened (and back again likewise)
   * @param {number} o.minBackoffMs first reconnect delay
   * @param {number} o.maxBackoffMs largest reconnect delay; a socket that stayed open this long
   *   counts as a success and the next reconnect starts again from `minBackoffMs`
   * @param {number} o.pingMs interval of application pings
   * @param {number} o.pongTimeoutMs how long the server may stay silent after a ping
   * @param {number} [o.refusedBackoffMs] the reconnect delay after repeated refusals
   * @param {((url: string, transport: 'websocket' | 'sse') => Promise<'unreachable' | 'refused' | 'auth'>) | null} [o.diagnose]
   *   asked why an attempt that never opened failed
   * @param {(status: Status, transport: 'websocket' | 'sse', reason: string | null) => void} o.onStatus
   * @param {(message: any) => void} o.onMessage
   * @param {() => void} o.onOpen
   * @param {() => void} o.onDown the socket closed or failed (open or not)
   * @param {() => void} o.onAuthExpired
   */
  constructor (o) {
    this.o = o
    this.ws = null
    this.status = null
    this.attempt = 0
    this.stopped = false
    this.closed = false
    this.reconnectTimer = null
    this.pingTimer = null
    this.pongTimer = null
    this.openedAt = 0
    this.heard = false
    this.pings = 0
    /** The transport of the current (or next) attempt. */
    this.transport = o.transport === 'sse' && o.SseSocket ? 'sse' : 'websocket'
    /** Attempts in a row that never opened, on this transport. */
    this.unopened = 0
    /** Why the socket is down, once known. */
    this.reason = null
    /** Attempts in a row that were refused (`refused`, `auth`). */
    this.refusals = 0
    /** Counts attempts, so that a diagnosis that comes back late is ignored. */
    this.attempts = 0
    this.lastUrl = null
  }

  get isOpen () {
    return this.ws !== null && this.ws.readyState === 1 && this.status === 'open'
  }

  start () {
    this.setStatus('connecting')
    this.open()
  }

  setStatus (status, reason = null) {
    if (this.status === status && this.reason === reason) return
    this.status = status
    this.reason = reason
    this.o.onStatus(status, this.transport, reason)
  }

  open () {
    this.reconnectTimer = null
    if (this.stopped || this.ws) return
    this.attempts++
    let ws
    try {
      const Transport = this.transport === 'sse' ? this.o.SseSocket : this.o.WebSocket
      this.lastUrl = typeof this.o.url === 'function' ? this.o.url() : this.o.url
      ws = new Transport(this.lastUrl)
    } catch {
      this.down(1006)
      return
    }
    this.ws = ws
    ws.onopen = () => {
      if (this.ws !== ws) return
      this.unopened = 0
      this.refusals = 0
      this.openedAt = Date.now()
      this.setStatus('open')
      this.pingTimer = setInterval(() => this.ping(), this.o.pingMs)
      this.o.onOpen()
    }
    ws.onmessage = (event) => {
      if (this.ws !== ws) return
      this.heard = true
      let message
      try {
        message = JSON.parse(typeof event.data === 'string' ? event.data : String(event.data))
      } catch {
        return
      }
      const id = message?.meta?.requestId
      if (message?.type === '@@patchbay/PING_SUCCESS' && typeof id === 'string' && id.startsWith(PING_PREFIX)) return
      this.o.onMessage(message)
    }
    ws.onclose = (event) => {
      if (this.ws === ws) this.down(event?.code)
    }
    // An error is always followed by a close event; nothing to do here.
    ws.onerror = () => {}
  }

  ping () {
    // One ping at a time: while one is unanswered, the pong timer is what decides.
    if (this.pongTimer) return
    this.heard = false
    this.send({ type: '@@patchbay/PING_REQUEST', payload: {}, meta: { requestId: PING_PREFIX + ++this.pings } })
    this.pongTimer = setTimeout(() => {
      this.pongTimer = null
      if (this.heard) return
      // Nothing heard since the ping: the network is gone even if the socket does not know
      // it yet (browsers can take minutes to notice on their own).
      const ws = this.ws
      this.down(1006)
      try { ws?.close() } catch {}
    }, this.o.pongTimeoutMs)
  }

  /** @returns {boolean} whether the message was handed to an open socket */
  send (message) {
    if (!this.isOpen) return false
    try {
      this.ws.send(JSON.stringify(message))
      return true
    } catch {
      return false
    }
  }

  /** Forgets the current socket (if any) without reacting to its events any more. */
  detach () {
    const ws = this.ws
    this.ws = null
    clearInterval(this.pingTimer)
    clearTimeout(this.pongTimer)
    this.pingTimer = this.pongTimer = null
    if (ws) ws.onopen = ws.onmessage = ws.onclose = null
    return ws
  }

  down (code) {
    this.detach()
    if (this.stopped) return
    const opened = this.openedAt !== 0
    const tried = this.transport
    // A socket that lived a while was a success: start the backoff again. One that the
    // server closes right after opening (1011, 4029, ...) keeps growing it.
    if (this.openedAt && Date.now() - this.openedAt >= this.o.maxBackoffMs) this.attempt = 0
    // Where websockets cannot get through (a proxy that refuses upgrades), SSE may: after two
    // attempts in a row that never opened, the other transport gets its turn.
    if (!this.openedAt && ++this.unopened >= 2 && (this.o.transport ?? 'auto') === 'auto' && this.o.SseSocket) {
      this.transport = this.transport === 'websocket' ? 'sse' : 'websocket'
      this.unopened = 0
      this.attempt = 0
    }
    this.openedAt = 0
    if (code === AUTH_EXPIRED) {
      this.setStatus('fallback', 'auth')
      this.o.onDown()
      this.stopped = true
      this.o.onAuthExpired()
      return
    }
    // Why, when known: kept while still down, forgotten once a socket has opened.
    this.setStatus('fallback', opened ? null : this.reason)
    this.o.onDown()
    // A listener may have reconnected (or closed) already.
    if (this.ws || this.stopped || this.reconnectTimer) return
    if (opened || !this.o.diagnose || !this.lastUrl) return this.scheduleReconnect()
    // An attempt that never opened: ask why (the server unreachable, refusing this page or
    // its credentials) before waiting for the next one.
    const attempt = this.attempts
    const asked = this.o.diagnose(this.lastUrl, tried).catch(() => 'unreachable')
    asked.then(reason => {
      if (this.stopped || this.attempts !== attempt || this.ws) return
      this.refusals = reason === 'unreachable' ? 0 : this.refusals + 1
      this.setStatus('fallback', reason)
      this.scheduleReconnect()
    })
  }

  scheduleReconnect () {
    if (this.reconnectTimer) return
    // After repeated refusals retrying fast only adds load: wait long (a deploy, a fixed
    // configuration or a new login is what changes the answer).
    const refused = this.refusals >= REFUSALS_BEFORE_LONG_BACKOFF && this.o.refusedBackoffMs
    const base = refused ? this.o.refusedBackoffMs : Math.min(this.o.maxBackoffMs, this.o.minBackoffMs * 2 ** this.attempt)
    this.attempt = Math.min(this.attempt + 1, 30)
    // Jitter in [0.5, 1): clients that lost the same server do not all return at once.
    const delay = base / 2 + Math.random() * base / 2
    this.reconnectTimer = setTimeout(() => this.open(), delay)
  }

  /** Drops the current socket, if any, and connects again now (after re-authenticating). */
  reconnect () {
    if (this.closed) return
    clearTimeout(this.reconnectTimer)
    const ws = this.detach()
    try { ws?.close(1000) } catch {}
    this.stopped = false
    this.attempt = 0
    this.refusals = 0
    this.openedAt = 0
    if (ws) {
      this.setStatus('fallback')
      this.o.onDown()
    }
    this.open()
  }

  /** Closes for good. */
  close () {
    this.closed = this.stopped = true
    clearTimeout(this.reconnectTimer)
    const ws = this.detach()
    try { ws?.close(1000) } catch {}
  }
}
