// The shim against the real patchbay binary and a real REST API (the demo's), with a real
// redux store and the `ws` package as WebSocket: requests over the socket, progress pushes,
// patchbay killed (REST fallback with the same replies, progress by polling), patchbay back
// (the socket is used again and rooms are rejoined).

import { test } from 'node:test'
import assert from 'node:assert/strict'
import WebSocket from 'ws'
import { createPatchbay } from '../src/index.js'
import { startStack } from './support/stack.js'
import { recordingStore } from './support/store.js'

/** The JSON type of a value, and for objects the shape of each field. */
function shape (value) {
  if (value === null) return 'null'
  if (Array.isArray(value)) return value.map(shape)
  if (typeof value === 'object') return Object.fromEntries(Object.keys(value).sort().map(k => [k, shape(value[k])]))
  return typeof value
}

const isStatus = status => a => a.type === '@@patchbay/STATUS' && a.payload?.status === status
const progressOf = (id, test = () => true) => a => a.type === 'TASK_PROGRESS' && a.payload?.id === id && test(a)

/**
 * Runs `body` with patchbay (unless `patchbayUp` is false), the API, a bridge and a store;
 * adds every process's output to a failure, and stops everything afterwards either way.
 */
async function withBridge (t, body, { patchbayUp = true } = {}) {
  const stack = await startStack()
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
    WebSocket,
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

test('requests use the socket, fall back to REST while patchbay is dead, and return to the socket', async t => {
  await withBridge(t, async ({ stack, bridge, send, seen, waitForAction }) => {
    await waitForAction(isStatus('open'), { what: 'the socket to open' })
    assert.equal(bridge.status, 'open')

    // Over the socket.
    const listed = await send('TASKS_FETCH', { page: 1 })
    assert.equal(listed.via, 'socket')
    assert.equal(listed.reply.type, 'TASKS_FETCH_SUCCESS')
    assert.equal(listed.reply.meta.status, 200)

    const enqueued = await send('TASK_ENQUEUE', { title: 'over the socket', steps: 3 })
    assert.equal(enqueued.via, 'socket')
    assert.equal(enqueued.reply.type, 'TASK_ENQUEUE_SUCCESS', JSON.stringify(enqueued.reply))
    assert.equal(enqueued.reply.meta.status, 201)
    const id = enqueued.reply.payload.id
    assert.equal(enqueued.reply.meta.subscribed, `task:${id}`)
    assert.equal(typeof enqueued.reply.meta.roomToken, 'string')

    // Progress pushes into the task's room, until it is done.
    await waitForAction(progressOf(id, a => a.payload.status === 'succeeded'), { what: `task ${id} to succeed` })
    const pushes = seen.filter(progressOf(id))
    assert.ok(pushes.every(a => a.meta.room === `task:${id}` && !a.meta.polled), 'progress came as pushes into the room')
    const percents = pushes.map(a => a.payload.progress.percent)
    assert.deepEqual(percents, [...percents].sort((a, b) => a - b), 'progress only grows')
    assert.equal(percents.at(-1), 100)

    // Replies to compare with the same calls over REST.
    const fetchedBySocket = await send('TASK_FETCH', { id })
    assert.equal(fetchedBySocket.via, 'socket')
    const refusedBySocket = await send('TASK_CANCEL', { id })
    assert.equal(refusedBySocket.via, 'socket')
    assert.equal(refusedBySocket.reply.type, 'TASK_CANCEL_FAILURE')
    assert.equal(refusedBySocket.reply.payload.code, 'upstream_error')

    // A long task whose room has to survive the outage.
    const long = await send('TASK_ENQUEUE', { title: 'long', steps: 100 })
    assert.equal(long.via, 'socket')
    const longId = long.reply.payload.id
    await waitForAction(progressOf(longId), { what: 'the long task to make progress' })

    // patchbay dies.
    const killed = seen.length
    await stack.killPatchbay()
    await waitForAction(isStatus('fallback'), { from: killed, what: 'the fallback status' })
    assert.equal(bridge.status, 'fallback')

    // The same calls, straight to the API, give the same actions.
    const fetchedByRest = await send('TASK_FETCH', { id })
    assert.equal(fetchedByRest.via, 'rest')
    assert.deepEqual(
      { type: fetchedByRest.reply.type, payload: fetchedByRest.reply.payload, status: fetchedByRest.reply.meta.status },
      { type: fetchedBySocket.reply.type, payload: fetchedBySocket.reply.payload, status: fetchedBySocket.reply.meta.status })
    assert.equal(typeof fetchedByRest.reply.meta.requestId, 'string')

    const refusedByRest = await send('TASK_CANCEL', { id })
    assert.equal(refusedByRest.via, 'rest')
    const failure = r => ({ type: r.type, error: r.error, code: r.payload.code, status: r.payload.status, details: r.payload.details })
    assert.deepEqual(failure(refusedByRest.reply), failure(refusedBySocket.reply))

    const byRest = await send('TASK_ENQUEUE', { title: 'over REST', steps: 3 })
    assert.equal(byRest.via, 'rest')
    assert.equal(byRest.reply.type, enqueued.reply.type)
    assert.deepEqual(shape(byRest.reply.payload), shape(enqueued.reply.payload))
    assert.equal(byRest.reply.meta.status, enqueued.reply.meta.status)
    assert.equal(byRest.reply.meta.subscribed, undefined, 'no room is joined over REST')
    const restId = byRest.reply.payload.id

    // Without pushes, the shim polls the task (the manifest's client.poll) until it is done.
    const polled = await waitForAction(progressOf(restId, a => a.payload.status === 'succeeded'), { what: `task ${restId} to succeed by polling` })
    assert.equal(polled.meta.polled, true)
    assert.equal(polled.meta.room, `task:${restId}`)
    // The long task's room, joined over the socket, is polled as well.
    await waitForAction(progressOf(longId, a => a.meta.polled === true), { from: killed, what: 'the long task to be polled' })

    // patchbay comes back on the same address.
    const restarted = seen.length
    await stack.startPatchbay()
    await waitForAction(isStatus('open'), { from: restarted, what: 'the socket to reopen' })
    const again = await send('TASKS_FETCH', { page: 1 })
    assert.equal(again.via, 'socket')
    assert.equal(again.reply.type, 'TASKS_FETCH_SUCCESS')

    // The room was rejoined with its token: the long task's progress is pushed again.
    await waitForAction(progressOf(longId, a => !a.meta.polled), { from: restarted, what: 'a pushed TASK_PROGRESS of the long task after the restart' })

    const cancelled = await send('TASK_CANCEL', { id: longId })
    assert.equal(cancelled.via, 'socket')
    assert.equal(cancelled.reply.type, 'TASK_CANCEL_SUCCESS')
    await waitForAction(progressOf(longId, a => a.payload.status === 'cancelled' && !a.meta.polled), { from: restarted, what: 'the pushed cancellation' })
  })
})

test('a bridge created while patchbay is down works over REST and connects once it is up', async t => {
  await withBridge(t, async ({ stack, bridge, send, seen, waitForAction }) => {
    await waitForAction(isStatus('fallback'), { what: 'the fallback status' })
    assert.deepEqual(seen.filter(a => a.type === '@@patchbay/STATUS').map(a => a.payload.status), ['connecting', 'fallback'])

    // Reconnect attempts keep failing meanwhile; requests keep working.
    for (let i = 0; i < 3; i++) {
      const listed = await send('TASKS_FETCH', { page: 1 })
      assert.equal(listed.via, 'rest')
      assert.equal(listed.reply.type, 'TASKS_FETCH_SUCCESS')
    }
    const invalid = await send('TASK_ENQUEUE', { steps: 3 })
    assert.equal(invalid.via, 'rest')
    // Documented difference: over REST the API, not patchbay, validates the payload.
    assert.equal(invalid.reply.type, 'TASK_ENQUEUE_FAILURE')
    assert.equal(invalid.reply.payload.code, 'upstream_error')
    assert.equal(invalid.reply.payload.status, 400)

    const started = seen.length
    await stack.startPatchbay()
    await waitForAction(isStatus('open'), { from: started, what: 'the socket to open' })
    assert.equal(bridge.status, 'open')
    const enqueued = await send('TASK_ENQUEUE', { title: 'after the outage', steps: 2 })
    assert.equal(enqueued.via, 'socket')
    const id = enqueued.reply.payload.id
    await waitForAction(progressOf(id, a => a.payload.status === 'succeeded' && !a.meta.polled), { what: 'pushed progress to 100%' })
  }, { patchbayUp: false })
})
