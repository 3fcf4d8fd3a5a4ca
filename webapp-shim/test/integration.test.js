// The shim against the real patchbay binary and a real REST API (the demo's), with a real
// redux store and the `ws` package as WebSocket: requests over the socket, progress pushes,
// patchbay killed (REST fallback with the same replies, progress by polling), patchbay back
// (the socket is used again and rooms are rejoined).

import { test } from 'node:test'
import assert from 'node:assert/strict'
import WebSocket from 'ws'
import { createPatchbay } from '../src/index.js'
import { startDemo, startStack } from './support/stack.js'
import { recordingStore } from './support/store.js'

/** The JSON type of a value, and for objects the shape of each field. */
function shape (value) {
  if (value === null) return 'null'
  if (Array.isArray(value)) return value.map(shape)
  if (typeof value === 'object') return Object.fromEntries(Object.keys(value).sort().map(k => [k, shape(value[k])]))
  return typeof value
}

/**
 * The `ws` WebSocket with a gate: while `GatedWebSocket.hold()` is in effect, a socket opened
 * keeps its events (open, messages) to itself until `GatedWebSocket.release()`. A test uses it
 * to make "the client is reconnecting" last as long as it needs, instead of racing it.
 */
class GatedWebSocket extends WebSocket {
  static held = null
  static hold () { GatedWebSocket.held ??= [] }
  static release () {
    const held = GatedWebSocket.held ?? []
    GatedWebSocket.held = null
    for (const ws of held) ws.flush()
  }

  constructor (...args) {
    super(...args)
    this.queued = null
    if (GatedWebSocket.held) {
      this.queued = []
      GatedWebSocket.held.push(this)
    }
  }

  emit (event, ...args) {
    if (this.queued) {
      this.queued.push([event, args])
      return true
    }
    return super.emit(event, ...args)
  }

  flush () {
    const queued = this.queued ?? []
    this.queued = null
    for (const [event, args] of queued) super.emit(event, ...args)
  }
}

/** `TICK n` to `room` with `POST /publish` on the patchbay at `addr`. */
const publishTick = (addr, token, room, n) => fetch(`http://${addr}/publish`, {
  method: 'POST',
  headers: { authorization: `Bearer ${token}`, 'content-type': 'application/json' },
  body: JSON.stringify({ rooms: [room], action: { type: 'TICK', payload: n } })
})

const isStatus = status => a => a.type === '@@patchbay/STATUS' && a.payload?.status === status
const progressOf = (id, test = () => true) => a => a.type === 'TASK_PROGRESS' && a.payload?.id === id && test(a)

/**
 * Runs `body` with patchbay (unless `patchbayUp` is false), the API, a bridge and a store;
 * adds every process's output to a failure, and stops everything afterwards either way.
 */
async function withBridge (t, body, { patchbayUp = true, redis = false } = {}) {
  const stack = await startStack({ redis })
  let bridge = null
  // One hook, in this order: a bridge left open would keep trying to reconnect.
  t.after(async () => {
    bridge?.close()
    await stack.stop()
  })
  if (!patchbayUp) await stack.killPatchbay()
  const manifest = await (await fetch(`${stack.apiUrl}/actions`)).json()
  bridge = createPatchbay({
    url: stack.wsUrl,
    apiUrl: stack.apiUrl,
    manifest,
    WebSocket: GatedWebSocket,
    // Quick reconnects keep the test short; the backoff itself is the unit tests' business.
    minBackoffMs: 50,
    maxBackoffMs: 250,
    requestTimeoutMs: 5000
  })
  const recorder = recordingStore(bridge.middleware)
  /** Dispatches `<name>_REQUEST` and says which way it went by the bridge's counters. */
  const send = async (name, payload) => {
    const before = { ...bridge.stats }
    const reply = await recorder.store.dispatch({ type: `${name}_REQUEST`, payload })
    const via = { socket: bridge.stats.socket - before.socket, rest: bridge.stats.rest - before.rest }
    return { reply, via: via.socket === 1 && via.rest === 0 ? 'socket' : via.rest === 1 && via.socket === 0 ? 'rest' : JSON.stringify(via) }
  }
  try {
    await body({ stack, bridge, send, ...recorder })
  } catch (e) {
    e.message += `\n${stack.output()}`
    throw e
  }
}

const noteAdded = id => a => a.type === 'NOTE_ADDED' && a.payload?.id === id
const final = a => ['succeeded', 'failed', 'cancelled', 'lost'].includes(a.payload?.status)

test('requests use the socket, fall back to REST while patchbay is dead, and return to the socket', async t => {
  await withBridge(t, async ({ stack, bridge, send, seen, waitForAction }) => {
    await waitForAction(isStatus('open'), { what: 'the socket to open' })
    assert.equal(bridge.status, 'open')

    // An `http` action over the socket: the API answers, and its push reaches the room.
    const listed = await send('NOTES_FETCH', {})
    assert.equal(listed.via, 'socket')
    assert.equal(listed.reply.type, 'NOTES_FETCH_SUCCESS')
    assert.equal(listed.reply.meta.status, 200)
    assert.equal(listed.reply.meta.subscribed, 'notes')
    const added = await send('NOTE_ADD', { text: 'over the socket' })
    assert.equal(added.via, 'socket')
    assert.equal(added.reply.type, 'NOTE_ADD_SUCCESS', JSON.stringify(added.reply))
    assert.equal(added.reply.meta.status, 201)
    const pushed = await waitForAction(noteAdded(added.reply.payload.id), { what: 'the NOTE_ADDED push' })
    assert.equal(pushed.meta.room, 'notes')
    assert.deepEqual(pushed.payload, added.reply.payload)

    // A `task` action: patchbay's task manager runs the job and pushes its progress.
    const enqueued = await send('TASK_ENQUEUE', { title: 'over the socket', steps: 3 })
    assert.equal(enqueued.via, 'socket')
    assert.equal(enqueued.reply.type, 'TASK_ENQUEUE_SUCCESS', JSON.stringify(enqueued.reply))
    const id = enqueued.reply.payload.id
    assert.equal(enqueued.reply.meta.subscribed, `task:${id}`)
    assert.equal(typeof enqueued.reply.meta.roomToken, 'string')
    assert.deepEqual(enqueued.reply.payload.params, { title: 'over the socket', steps: 3 })
    const done = await waitForAction(progressOf(id, final), { what: `task ${id} to finish` })
    assert.equal(done.payload.status, 'succeeded', JSON.stringify(done.payload))
    assert.deepEqual(done.payload.result, { steps: 3 })
    const pushes = seen.filter(progressOf(id))
    assert.ok(pushes.every(a => a.meta.room === `task:${id}`), 'progress came into the task room')
    const percents = pushes.map(a => a.payload.progress?.percent ?? 0)
    assert.deepEqual(percents, [...percents].sort((a, b) => a - b), 'progress only grows')
    assert.equal(percents.at(-1), 100)
    const fetched = await send('TASK_FETCH', { id })
    assert.equal(fetched.reply.type, 'TASK_FETCH_SUCCESS')
    assert.equal(fetched.reply.payload.status, 'succeeded')
    const conflict = await send('TASK_CANCEL', { id })
    assert.equal(conflict.reply.type, 'TASK_CANCEL_FAILURE')
    assert.equal(conflict.reply.payload.code, 'conflict')

    // patchbay dies.
    const killed = seen.length
    await stack.killPatchbay()
    await waitForAction(isStatus('fallback'), { from: killed, what: 'the fallback status' })
    assert.equal(bridge.status, 'fallback')

    // `http` actions go straight to the API and give the same actions.
    const byRest = await send('NOTE_ADD', { text: 'over REST' })
    assert.equal(byRest.via, 'rest')
    assert.equal(byRest.reply.type, added.reply.type)
    assert.deepEqual(shape(byRest.reply.payload), shape(added.reply.payload))
    assert.equal(byRest.reply.meta.status, added.reply.meta.status)
    assert.equal(typeof byRest.reply.meta.requestId, 'string')
    // Without pushes, the shim polls the room `notes` (the manifest's client.poll): a note
    // someone else adds meanwhile still arrives.
    const other = await (await fetch(`${stack.apiUrl}/notes`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ text: 'from elsewhere' }) })).json()
    const polled = await waitForAction(a => a.type === 'NOTES_FETCH_SUCCESS' && a.meta?.polled && a.payload.notes.some(n => n.id === other.id), { from: killed, what: 'a poll that shows the other note' })
    assert.equal(polled.meta.room, 'notes')

    // `task` actions have no REST twin: a clear failure at once, and the API is not called.
    const before = { ...bridge.stats }
    for (const [name, payload] of [['TASK_ENQUEUE', { title: 'while down', steps: 1 }], ['TASK_FETCH', { id }], ['TASK_CANCEL', { id }], ['TASKS_FETCH', {}]]) {
      const { reply: refused } = await send(name, payload)
      assert.equal(refused.type, `${name}_FAILURE`)
      assert.equal(refused.payload.code, 'upstream_unavailable')
      assert.match(refused.payload.message, /no REST fallback/)
    }
    assert.equal(bridge.stats.rest, before.rest, 'no REST call for task actions')

    // patchbay comes back on the same address.
    const restarted = seen.length
    await stack.startPatchbay()
    await waitForAction(isStatus('open'), { from: restarted, what: 'the socket to reopen' })
    const again = await send('TASK_ENQUEUE', { title: 'after the restart', steps: 2 })
    assert.equal(again.via, 'socket')
    assert.equal(again.reply.type, 'TASK_ENQUEUE_SUCCESS', JSON.stringify(again.reply))
    const after = await waitForAction(progressOf(again.reply.payload.id, final), { from: restarted, what: 'the new task to finish' })
    assert.equal(after.payload.status, 'succeeded')

    // The room `notes` was rejoined with its token: pushes arrive again.
    const third = await send('NOTE_ADD', { text: 'after the restart' })
    assert.equal(third.via, 'socket')
    await waitForAction(noteAdded(third.reply.payload.id), { from: restarted, what: 'the NOTE_ADDED push after the restart' })
  })
})

test('a bridge created while patchbay is down works over REST and connects once it is up', async t => {
  await withBridge(t, async ({ stack, bridge, send, seen, waitForAction }) => {
    await waitForAction(a => isStatus('fallback')(a) && a.payload.reason, { what: 'the fallback status, with why' })
    assert.deepEqual(seen.filter(a => a.type === '@@patchbay/STATUS').map(a => [a.payload.status, a.payload.reason]),
      [['connecting', undefined], ['fallback', undefined], ['fallback', 'unreachable']])

    // Reconnect attempts keep failing meanwhile; requests keep working.
    for (let i = 0; i < 3; i++) {
      const listed = await send('NOTES_FETCH', {})
      assert.equal(listed.via, 'rest')
      assert.equal(listed.reply.type, 'NOTES_FETCH_SUCCESS')
    }
    const invalid = await send('NOTE_ADD', { text: '' })
    assert.equal(invalid.via, 'rest')
    // Documented difference: over REST the API, not patchbay, validates the payload.
    assert.equal(invalid.reply.type, 'NOTE_ADD_FAILURE')
    assert.equal(invalid.reply.payload.code, 'upstream_error')
    assert.equal(invalid.reply.payload.status, 400)

    const started = seen.length
    await stack.startPatchbay()
    await waitForAction(isStatus('open'), { from: started, what: 'the socket to open' })
    assert.equal(bridge.status, 'open')
    const invalidBySocket = await send('NOTE_ADD', { text: '' })
    assert.equal(invalidBySocket.via, 'socket')
    assert.equal(invalidBySocket.reply.payload.code, 'invalid_payload')
    const enqueued = await send('TASK_ENQUEUE', { title: 'after the outage', steps: 2 })
    assert.equal(enqueued.via, 'socket')
    const id = enqueued.reply.payload.id
    await waitForAction(progressOf(id, a => a.payload.status === 'succeeded'), { what: 'pushed progress to the end' })
  }, { patchbayUp: false })
})

test('a handshake patchbay refuses says `auth`; a patchbay that is gone says `unreachable`', async t => {
  const stack = await startStack()
  let bridge = null
  t.after(async () => {
    bridge?.close()
    await stack.stop()
  })
  // The token is not a JWT: patchbay answers the handshake, and GET /sse, with 401.
  bridge = createPatchbay({
    url: `${stack.wsUrl}?token=not-a-jwt`,
    apiUrl: stack.apiUrl,
    WebSocket,
    transport: 'websocket',
    minBackoffMs: 50,
    maxBackoffMs: 250,
    refusedBackoffMs: 300
  })
  const { seen, waitForAction } = recordingStore(bridge.middleware)
  const why = reason => a => isStatus('fallback')(a) && a.payload.reason === reason
  try {
    await waitForAction(why('auth'), { what: 'the reason auth' })
    const from = seen.length
    await stack.killPatchbay()
    await waitForAction(why('unreachable'), { from, what: 'the reason unreachable' })
    assert.equal(bridge.status, 'fallback')
  } catch (e) {
    e.message += `\n${stack.output()}`
    throw e
  }
})

test('over Redis, a task keeps running in its separate worker while patchbay restarts, and its progress resumes on the rejoin', async t => {
  const demo = await startDemo(['--redis'])
  let bridge = null
  t.after(async () => {
    bridge?.close()
    await demo.stop()
  })
  try {
    const manifest = await (await fetch(`${demo.apiUrl}/actions`)).json()
    bridge = createPatchbay({ url: demo.wsUrl, apiUrl: demo.apiUrl, manifest, WebSocket, minBackoffMs: 50, maxBackoffMs: 250, requestTimeoutMs: 5000 })
    const { store, seen, waitForAction } = recordingStore(bridge.middleware)
    await waitForAction(isStatus('open'), { what: 'the socket to open' })
    const reply = await store.dispatch({ type: 'TASK_ENQUEUE_REQUEST', payload: { title: 'across a restart', steps: 20 } })
    assert.equal(reply.type, 'TASK_ENQUEUE_SUCCESS', JSON.stringify(reply))
    const id = reply.payload.id
    await waitForAction(progressOf(id, a => a.payload.progress?.step >= 1), { what: 'the first step' })

    const stopped = seen.length
    await demo.control('stop')
    await waitForAction(isStatus('fallback'), { from: stopped, what: 'the fallback status' })
    // The job goes on meanwhile, in the worker process.
    await new Promise(resolve => setTimeout(resolve, 1500))
    const started = seen.length
    await demo.control('start')
    await waitForAction(isStatus('open'), { from: started, what: 'the socket to reopen' })
    // The rejoin's snapshot comes first, then the pushes go on, up to the end of the same attempt.
    const snapshot = await waitForAction(progressOf(id), { from: started, what: 'the snapshot on the rejoin' })
    const lastBefore = seen.slice(0, stopped).filter(progressOf(id)).at(-1)
    assert.ok(snapshot.payload.progress.step > lastBefore.payload.progress.step, 'the job made progress while patchbay was down')
    const done = await waitForAction(progressOf(id, final), { from: started, what: 'the task to finish' })
    assert.equal(done.payload.status, 'succeeded', JSON.stringify(done.payload))
    assert.equal(done.payload.attempts, 1, 'one attempt: the worker never stopped')
  } catch (e) {
    e.message += `\n${demo.output()}`
    throw e
  }
})

test('reconnects in the middle of a stream lose nothing: the bridge recovers each time', async t => {
  await withBridge(t, async ({ stack, bridge, seen, store, waitForAction }) => {
    await waitForAction(isStatus('open'), { what: 'the socket to open' })
    const joined = await store.dispatch({ type: '@@patchbay/SUBSCRIBE_REQUEST', payload: { room: 'feed:1' } })
    assert.equal(joined.type, '@@patchbay/SUBSCRIBE_SUCCESS', JSON.stringify(joined))
    assert.equal(joined.payload.position.offset, 0)
    const publish = n => publishTick(stack.bridgeAddr, stack.publishToken, 'feed:1', n)
    const TOTAL = 150
    for (let n = 1; n <= TOTAL; n++) {
      assert.equal((await publish(n)).status, 202)
      // Drop the socket twice while the stream runs; the bridge reconnects by itself. The
      // first time, the new socket is held back while five more are published: those can
      // only arrive by recovery. The second time it reconnects as fast as it can.
      if (n === 40) {
        GatedWebSocket.hold()
        bridge.reconnect()
        for (let m = 1; m <= 5; m++) assert.equal((await publish(++n)).status, 202)
        GatedWebSocket.release()
      }
      if (n === 100) bridge.reconnect()
      if (n % 10 === 0) await new Promise(resolve => setTimeout(resolve, 5))
    }
    await waitForAction(a => a.type === 'TICK' && a.payload === TOTAL, { what: `TICK ${TOTAL}` })
    const ticks = seen.filter(a => a.type === 'TICK')
    assert.deepEqual(ticks.map(a => a.payload), Array.from({ length: TOTAL }, (_, i) => i + 1), 'every action once, in order')
    const replayed = ticks.filter(a => a.meta.replayed).map(a => a.payload)
    for (const n of [41, 42, 43, 44, 45]) assert.ok(replayed.includes(n), `${n} came by recovery: ${replayed}`)
    assert.equal(seen.filter(a => a.type === '@@patchbay/RESYNC').length, 0)
  })
})

test('patchbay killed and restarted mid-stream, on Redis: the store ends with every action, once', async t => {
  await withBridge(t, async ({ stack, bridge, seen, store, waitForAction }) => {
    await waitForAction(isStatus('open'), { what: 'the socket to open' })
    const joined = await store.dispatch({ type: '@@patchbay/SUBSCRIBE_REQUEST', payload: { room: 'feed:k' } })
    assert.equal(joined.type, '@@patchbay/SUBSCRIBE_SUCCESS', JSON.stringify(joined))
    // Published through the other instance, which stays up.
    const publish = n => publishTick(stack.publishAddr, stack.publishToken, 'feed:k', n)
    const TOTAL = 120
    for (let n = 1; n <= TOTAL; n++) {
      assert.equal((await publish(n)).status, 202)
      if (n === 40) {
        await stack.killPatchbay()
        await waitForAction(isStatus('fallback'), { what: 'the fallback status' })
      }
      if (n === 60) await stack.startPatchbay()
      if (n % 10 === 0) await new Promise(resolve => setTimeout(resolve, 5))
    }
    await waitForAction(a => a.type === 'TICK' && a.payload === TOTAL, { what: `TICK ${TOTAL}` })
    const ticks = seen.filter(a => a.type === 'TICK')
    assert.deepEqual(ticks.map(a => a.payload), Array.from({ length: TOTAL }, (_, i) => i + 1), 'every action once, in order')
    const replayed = ticks.filter(a => a.meta.replayed).map(a => a.payload)
    for (const n of [41, 50, 60]) assert.ok(replayed.includes(n), `${n} came by recovery: ${replayed}`)
    assert.equal(seen.filter(a => a.type === '@@patchbay/RESYNC').length, 0)
  }, { redis: true })
})

test('where websockets cannot get through, the bridge runs over SSE: requests, pushes, recovery', async t => {
  const stack = await startStack()
  let bridge = null
  t.after(async () => {
    bridge?.close()
    await stack.stop()
  })
  // A network that refuses every websocket.
  class BlockedWebSocket {
    constructor () { throw new Error('websockets are blocked here') }
  }
  const manifest = await (await fetch(`${stack.apiUrl}/actions`)).json()
  bridge = createPatchbay({ url: stack.wsUrl, apiUrl: stack.apiUrl, manifest, WebSocket: BlockedWebSocket, minBackoffMs: 50, maxBackoffMs: 250, requestTimeoutMs: 5000 })
  const { store, seen, waitForAction } = recordingStore(bridge.middleware)
  try {
    const open = await waitForAction(isStatus('open'), { what: 'the stream to open' })
    assert.equal(open.payload.transport, 'sse')
    const joined = await store.dispatch({ type: '@@patchbay/SUBSCRIBE_REQUEST', payload: { room: 'feed:sse' } })
    assert.equal(joined.type, '@@patchbay/SUBSCRIBE_SUCCESS', JSON.stringify(joined))
    const before = bridge.stats.socket
    const notes = await store.dispatch({ type: 'NOTES_FETCH_REQUEST', payload: {} })
    assert.equal(notes.type, 'NOTES_FETCH_SUCCESS', JSON.stringify(notes))
    assert.equal(bridge.stats.socket, before + 1, 'over the stream, not REST')
    for (let n = 1; n <= 5; n++) assert.equal((await publishTick(stack.bridgeAddr, stack.publishToken, 'feed:sse', n)).status, 202)
    await waitForAction(a => a.type === 'TICK' && a.payload === 5, { what: 'TICK 5' })
    // A new stream recovers what was published while there was none.
    bridge.reconnect()
    for (let n = 6; n <= 10; n++) assert.equal((await publishTick(stack.bridgeAddr, stack.publishToken, 'feed:sse', n)).status, 202)
    await waitForAction(a => a.type === 'TICK' && a.payload === 10, { what: 'TICK 10' })
    const ticks = seen.filter(a => a.type === 'TICK').map(a => a.payload)
    assert.deepEqual(ticks, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 'every action once, in order')
  } catch (e) {
    e.message += `\n${stack.output()}`
    throw e
  }
})
