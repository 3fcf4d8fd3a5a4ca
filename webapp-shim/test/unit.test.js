// Unit tests of the shim against a fake WebSocket, a fake fetch and a real redux store.
// Run: node --test test/unit.test.js

import { test } from 'node:test'
import assert from 'node:assert/strict'
import { createStore, applyMiddleware } from 'redux'
import { configureStore, createListenerMiddleware } from '@reduxjs/toolkit'
import { createApi } from '@reduxjs/toolkit/query'
import { createPatchbay, encode, buildRequest, diagnose, unwrap, PatchbayError, patchbayBaseQuery } from 'patchbay-webapp-shim'
import { generateTypes, pascal } from 'patchbay-webapp-shim/types'

const API = 'https://api.test/v1'
const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/

const MANIFEST = {
  TASKS_FETCH: { http: { method: 'GET', path: '/tasks' }, timeoutMs: 5000 },
  TASK_FETCH: { http: { method: 'GET', path: '/tasks/{id}' } },
  TASK_CREATE: { http: { method: 'POST', path: '/tasks' } },
  TASK_UPDATE: { http: { method: 'PUT', path: '/tasks/{id}' } },
  TASK_STEP: { http: { method: 'PATCH', path: '/tasks/{id}/steps/{step}' } },
  TASK_CANCEL: { http: { method: 'DELETE', path: '/tasks/{id}' } },
  SLOW: { http: { method: 'GET', path: '/slow' }, timeoutMs: 30 },
  EXPORT_START: { task: { queue: 'exports' } },
  TASK_ENQUEUE: {
    http: { method: 'POST', path: '/tasks' },
    subscribe: 'task:{id}',
    client: { poll: { action: 'TASK_FETCH', intervalMs: 10, as: 'TASK_PROGRESS', until: { field: 'status', in: ['succeeded', 'cancelled'] } } }
  }
}

// --- fakes -----------------------------------------------------------------------------------

/** A WebSocket class whose instances the test drives: accept, receive, drop with a code. */
function fakeSockets () {
  const sockets = []
  class FakeWebSocket {
    constructor (url) {
      this.url = url
      this.readyState = 0
      this.sent = []
      this.closeCode = null
      sockets.push(this)
    }

    send (text) {
      if (this.readyState !== 1) throw new Error('not open')
      this.sent.push(JSON.parse(text))
    }

    close (code) {
      this.closeCode = code ?? 1005
      this.readyState = 3
    }

    /** The handshake succeeds and the server greets, as patchbay does. */
    accept () {
      this.readyState = 1
      this.onopen?.({})
      this.receive({ type: '@@patchbay/CONNECTED', payload: { protocol: 1, connectionId: `c${sockets.length}`, userId: null, rooms: [] } })
    }

    receive (message) {
      this.onmessage?.({ data: JSON.stringify(message) })
    }

    drop (code = 1006) {
      this.readyState = 3
      this.onclose?.({ code })
    }

    requests (type) {
      return this.sent.filter(m => m.type === type)
    }

    /** Answers the last request of `type` with `X_SUCCESS`. */
    succeed (type, payload, meta = {}) {
      const request = this.requests(type).at(-1)
      this.receive({ type: type.replace(/_REQUEST$/, '_SUCCESS'), payload, meta: { requestId: request.meta.requestId, ...meta } })
      return request
    }
  }
  return { FakeWebSocket, sockets, get last () { return sockets.at(-1) } }
}

const json = (body, status = 200, headers = {}) =>
  new Response(JSON.stringify(body), { status, headers: { 'content-type': 'application/json', ...headers } })

/** A fetch that records its calls and answers with `respond(call)`. */
function fakeFetch (respond = () => json({})) {
  const calls = []
  const fetch = async (url, init) => {
    const call = { url, ...init, header: name => new Headers(init.headers).get(name) }
    calls.push(call)
    return respond(call)
  }
  return { fetch, calls }
}

const never = () => new Promise(() => {})
const tick = () => new Promise(resolve => setImmediate(resolve))
const sleep = ms => new Promise(resolve => setTimeout(resolve, ms))

async function until (check, what = 'the condition') {
  const end = Date.now() + 3000
  while (!check()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`)
    await sleep(2)
  }
}

/** A bridge on a real redux store whose state is the list of actions it reduced. */
function setup (t, options = {}, respond) {
  const ws = fakeSockets()
  const api = fakeFetch(respond)
  const bridge = createPatchbay({
    url: 'ws://patchbay.test/ws',
    apiUrl: API + '/',
    manifest: MANIFEST,
    WebSocket: ws.FakeWebSocket,
    fetch: api.fetch,
    minBackoffMs: 5,
    maxBackoffMs: 20,
    pingMs: 60000,
    pongTimeoutMs: 60000,
    requestTimeoutMs: 3000,
    // Most tests want requests made before any open to go over REST at once.
    connectWaitMs: 0,
    // The fake sockets are websockets; the SSE fallback has tests of its own.
    transport: 'websocket',
    // The fake fetch is the API's; asking why a socket failed has tests of its own.
    diagnose: false,
    ...options
  })
  const reducer = (state = [], action) => action.type.startsWith('@@redux/') ? state : [...state, action]
  const store = createStore(reducer, applyMiddleware(bridge.middleware, ...(options.inner ?? [])))
  t.after(() => bridge.close())
  const of = type => store.getState().filter(a => a.type === type)
  const types = () => store.getState().map(a => a.type)
  const statuses = () => of('@@patchbay/STATUS').map(a => a.payload.status)
  return { bridge, store, dispatch: store.dispatch, ws, api, of, types, statuses }
}

// --- status and transport ------------------------------------------------------------------

test('status actions go connecting → open → fallback → open, and CONNECTED is dispatched', async t => {
  const { bridge, ws, of, statuses } = setup(t)
  await tick()
  assert.equal(bridge.status, 'connecting')
  assert.deepEqual(statuses(), ['connecting'])
  assert.equal(ws.last.url, 'ws://patchbay.test/ws')

  ws.last.accept()
  assert.equal(bridge.status, 'open')
  assert.deepEqual(of('@@patchbay/CONNECTED')[0].payload, { protocol: 1, connectionId: 'c1', userId: null, rooms: [] })

  ws.last.drop(1001)
  assert.equal(bridge.status, 'fallback')
  await until(() => ws.sockets.length === 2, 'a reconnect')
  ws.last.drop(1006) // a failed handshake: still fallback, said once
  await until(() => ws.sockets.length === 3, 'another reconnect')
  ws.last.accept()
  assert.deepEqual(statuses(), ['connecting', 'open', 'fallback', 'open'])
  assert.equal(of('@@patchbay/CONNECTED').length, 2)
})

test('4401 dispatches AUTH_EXPIRED, stops reconnecting, and reconnect() starts again', async t => {
  const { bridge, ws, of, dispatch, api } = setup(t, {}, () => json([]))
  ws.last.accept()
  const inFlight = dispatch({ type: 'TASKS_FETCH_REQUEST', payload: { page: 1 } })
  const { meta } = ws.last.requests('TASKS_FETCH_REQUEST')[0]
  ws.last.drop(4401)
  await tick()
  assert.equal(of('@@patchbay/AUTH_EXPIRED').length, 1)
  assert.equal(bridge.status, 'fallback')
  assert.equal((await inFlight).type, 'TASKS_FETCH_SUCCESS', 'the request in flight went over REST')
  assert.equal(api.calls[0].header('x-request-id'), meta.requestId)
  await sleep(80) // several times the largest backoff
  assert.equal(ws.sockets.length, 1)

  bridge.reconnect()
  assert.equal(ws.sockets.length, 2)
  ws.last.accept()
  assert.equal(bridge.status, 'open')
})

test('other close codes reconnect with a growing, capped, jittered backoff', t => {
  t.mock.timers.enable({ apis: ['setTimeout', 'setInterval', 'Date'] })
  const { ws } = setup(t, { minBackoffMs: 100, maxBackoffMs: 1000 })
  const delay = () => {
    const n = ws.sockets.length
    for (let waited = 1; waited <= 5000; waited++) {
      t.mock.timers.tick(1)
      if (ws.sockets.length > n) return waited
    }
    assert.fail('no reconnect')
  }
  const delays = []
  // Sockets the server closes right after opening them count as failures too.
  for (const [code, opens] of [[1001, true], [1011, true], [4008, true], [4029, true], [1006, false], [1011, true]]) {
    if (opens) ws.last.accept()
    ws.last.drop(code)
    delays.push(delay())
  }
  const bases = [100, 200, 400, 800, 1000, 1000]
  delays.forEach((d, i) => assert.ok(d >= bases[i] / 2 && d <= bases[i], `delay ${i} = ${d} ms, base ${bases[i]}`))

  // A connection that lasted starts the backoff again.
  ws.last.accept()
  t.mock.timers.tick(1000)
  ws.last.drop(1001)
  const d = delay()
  assert.ok(d >= 50 && d <= 100, `delay after a lasting connection = ${d} ms`)
})

test('application pings are sent and answered quietly; a silent socket is dropped', async t => {
  t.mock.timers.enable({ apis: ['setTimeout', 'setInterval', 'Date'] })
  const { bridge, ws, types } = setup(t, { pingMs: 1000, pongTimeoutMs: 500, minBackoffMs: 100, maxBackoffMs: 100 })
  ws.last.accept()
  t.mock.timers.tick(1000)
  const [ping] = ws.last.requests('@@patchbay/PING_REQUEST')
  assert.equal(typeof ping.meta.requestId, 'string')
  ws.last.receive({ type: '@@patchbay/PING_SUCCESS', payload: {}, meta: { requestId: ping.meta.requestId } })
  t.mock.timers.tick(1000)
  assert.equal(ws.last.requests('@@patchbay/PING_REQUEST').length, 2)
  assert.equal(bridge.status, 'open', 'an answered ping keeps the socket')

  t.mock.timers.tick(499)
  assert.equal(bridge.status, 'open')
  t.mock.timers.tick(1)
  assert.equal(bridge.status, 'fallback', 'no answer within pongTimeoutMs')
  assert.notEqual(ws.last.closeCode, null, 'the silent socket was closed')
  t.mock.timers.tick(100)
  assert.equal(ws.sockets.length, 2, 'and a new one opened')
  await tick()
  assert.ok(!types().includes('@@patchbay/PING_SUCCESS'))
})

// --- requests over the socket ----------------------------------------------------------------

test('a request reaches reducers first, goes out with a uuid requestId, and its reply is dispatched and returned', async t => {
  const { bridge, ws, dispatch, store, types, api } = setup(t)
  ws.last.accept()
  const promise = dispatch({ type: 'TASKS_FETCH_REQUEST', payload: { page: 1 } })
  assert.ok(promise instanceof Promise)
  assert.equal(types().at(-1), 'TASKS_FETCH_REQUEST')
  const [sent] = ws.last.requests('TASKS_FETCH_REQUEST')
  assert.deepEqual(sent.payload, { page: 1 })
  assert.match(sent.meta.requestId, UUID)

  const answer = { type: 'TASKS_FETCH_SUCCESS', payload: [{ id: '1' }], meta: { requestId: sent.meta.requestId, status: 200 } }
  ws.last.receive(answer)
  assert.deepEqual(await promise, answer)
  assert.deepEqual(store.getState().at(-1), answer)
  assert.deepEqual(types().slice(-2), ['TASKS_FETCH_REQUEST', 'TASKS_FETCH_SUCCESS'])
  assert.deepEqual(bridge.stats, { socket: 1, rest: 0 })
  assert.equal(api.calls.length, 0)
})

test('a request made while the first connection is being made waits for it and uses the socket', async t => {
  const { ws, dispatch, api, bridge } = setup(t, { connectWaitMs: 1000 })
  const reply = dispatch({ type: 'TASK_FETCH_REQUEST', payload: { id: '1' } })
  await sleep(20)
  assert.equal(api.calls.length, 0, 'nothing went over REST yet')
  ws.last.accept()
  ws.last.succeed('TASK_FETCH_REQUEST', { id: '1' }, { status: 200 })
  assert.equal((await reply).type, 'TASK_FETCH_SUCCESS')
  assert.deepEqual(bridge.stats, { socket: 1, rest: 0 })
})

test('a request made while the first connection fails goes over REST as soon as it fails', async t => {
  const { ws, dispatch, api } = setup(t, { connectWaitMs: 5000 }, () => json({ id: '1' }))
  const reply = dispatch({ type: 'TASK_FETCH_REQUEST', payload: { id: '1' } })
  ws.last.drop(1006)
  assert.equal((await reply).type, 'TASK_FETCH_SUCCESS')
  assert.equal(api.calls.length, 1)
})

test('replies are matched by requestId, in any order', async t => {
  const { ws, dispatch } = setup(t)
  ws.last.accept()
  const a = dispatch({ type: 'TASK_FETCH_REQUEST', payload: { id: 'a' } })
  const b = dispatch({ type: 'TASK_FETCH_REQUEST', payload: { id: 'b' } })
  const [sa, sb] = ws.last.requests('TASK_FETCH_REQUEST')
  assert.notEqual(sa.meta.requestId, sb.meta.requestId)
  ws.last.receive({ type: 'TASK_FETCH_FAILURE', error: true, payload: { code: 'upstream_error', message: 'the API answered 404', status: 404 }, meta: { requestId: sb.meta.requestId } })
  ws.last.receive({ type: 'TASK_FETCH_SUCCESS', payload: { id: 'a' }, meta: { requestId: sa.meta.requestId, status: 200 } })
  assert.deepEqual((await a).payload, { id: 'a' })
  assert.equal((await b).payload.status, 404)
})

test('an @@patchbay/ERROR carrying the requestId becomes X_FAILURE; one without is dispatched as is', async t => {
  const { ws, dispatch, of } = setup(t)
  ws.last.accept()
  const promise = dispatch({ type: 'TASKS_FETCH_REQUEST' })
  const [sent] = ws.last.requests('TASKS_FETCH_REQUEST')
  ws.last.receive({ type: '@@patchbay/ERROR', error: true, payload: { code: 'invalid_action', message: 'type too long' }, meta: { requestId: sent.meta.requestId } })
  assert.deepEqual(await promise, {
    type: 'TASKS_FETCH_FAILURE',
    error: true,
    payload: { code: 'invalid_action', message: 'type too long' },
    meta: { requestId: sent.meta.requestId }
  })
  const bare = { type: '@@patchbay/ERROR', error: true, payload: { code: 'bad_json', message: 'expected value' } }
  ws.last.receive(bare)
  assert.deepEqual(of('@@patchbay/ERROR'), [bare])
})

test('an absent payload is sent as {}; a valid meta.requestId is kept, an invalid one replaced', t => {
  const { ws, dispatch } = setup(t)
  ws.last.accept()
  dispatch({ type: 'TASKS_FETCH_REQUEST' })
  dispatch({ type: 'TASKS_FETCH_REQUEST', payload: null, meta: { requestId: 'mine-1' } })
  dispatch({ type: 'TASKS_FETCH_REQUEST', payload: { at: new Date(0), n: undefined }, meta: { requestId: 'no spaces allowed' } })
  const [a, b, c] = ws.last.requests('TASKS_FETCH_REQUEST')
  assert.deepEqual(a.payload, {})
  assert.equal(b.payload, null)
  assert.equal(b.meta.requestId, 'mine-1')
  assert.deepEqual(c.payload, { at: '1970-01-01T00:00:00.000Z' })
  assert.match(c.meta.requestId, UUID)
})

test('no answer within requestTimeoutMs gives X_FAILURE `timeout`, and a late reply is dropped', async t => {
  const { ws, dispatch, of } = setup(t, { requestTimeoutMs: 30 })
  ws.last.accept()
  const reply = await dispatch({ type: 'TASKS_FETCH_REQUEST', payload: { page: 1 } })
  assert.equal(reply.type, 'TASKS_FETCH_FAILURE')
  assert.equal(reply.error, true)
  assert.equal(reply.payload.code, 'timeout')
  ws.last.succeed('TASKS_FETCH_REQUEST', [])
  await tick()
  assert.equal(of('TASKS_FETCH_SUCCESS').length, 0)
  assert.equal(of('TASKS_FETCH_FAILURE').length, 1)
})

test('server-fired actions are dispatched as they arrive', async t => {
  const { ws, of } = setup(t)
  await tick()
  ws.last.accept()
  const progress = { type: 'TASK_PROGRESS', payload: { id: '42', status: 'running' }, meta: { room: 'task:42' } }
  ws.last.receive(progress)
  ws.last.receive({ ...progress, payload: { id: '42', status: 'succeeded' } })
  assert.deepEqual(of('TASK_PROGRESS').map(a => a.payload.status), ['running', 'succeeded'])
  assert.deepEqual(of('TASK_PROGRESS')[0], progress)
})

test('actions that are not manifest or @@patchbay requests pass through untouched', async t => {
  const inner = () => next => action => action.type === 'MARKED' ? 'from next' : next(action)
  const { ws, dispatch, store, api } = setup(t, { inner: [inner] })
  ws.last.accept()
  const plain = { type: 'SOMETHING_REQUEST', payload: { a: 1 } }
  assert.equal(dispatch(plain), plain)
  assert.equal(dispatch({ type: 'MARKED' }), 'from next')
  const success = { type: 'TASKS_FETCH_SUCCESS', payload: [] }
  assert.equal(dispatch(success), success)
  assert.equal(store.getState().at(-1), success, 'the very same object reaches reducers')
  assert.equal(ws.last.sent.length, 0)
  await tick()
  assert.equal(api.calls.length, 0)
})

// --- the REST fallback -----------------------------------------------------------------------

test('fallback GET: path and query exactly as the contract builds them; headers, credentials, redirects', async t => {
  const { bridge, dispatch, api, types } = setup(t, {}, () => json({ id: 'x' }))
  const reply = await dispatch({
    type: 'TASK_FETCH_REQUEST',
    payload: { id: '../a b', z: 'x y', a: 1, tags: ['b', 'a&c', null], n: null, flag: true, f: 1.5, é: 'ü', B: 'upper' }
  })
  const [call] = api.calls
  assert.equal(call.url, `${API}/tasks/..%2Fa%20b?B=upper&a=1&f=1.5&flag=true&tags=b&tags=a%26c&z=x%20y&%C3%A9=%C3%BC`)
  assert.equal(call.method, 'GET')
  assert.equal(call.body, undefined)
  assert.match(call.header('x-request-id'), UUID)
  assert.equal(call.header('idempotency-key'), null, 'no Idempotency-Key on GET')
  assert.equal(call.credentials, 'include')
  assert.equal(call.redirect, 'manual')
  assert.deepEqual(reply, { type: 'TASK_FETCH_SUCCESS', payload: { id: 'x' }, meta: { requestId: call.header('x-request-id'), status: 200 } })
  assert.deepEqual(types().slice(-2), ['TASK_FETCH_REQUEST', 'TASK_FETCH_SUCCESS'])
  assert.deepEqual(bridge.stats, { socket: 0, rest: 1 })
})

test('fallback DELETE: query string, Idempotency-Key; empty body is null and meta.status is kept', async t => {
  const { dispatch, api } = setup(t, {}, () => new Response(null, { status: 204 }))
  const reply = await dispatch({ type: 'TASK_CANCEL_REQUEST', payload: { id: 7, reason: 'dup' }, meta: { requestId: 'req-1' } })
  const [call] = api.calls
  assert.equal(call.url, `${API}/tasks/7?reason=dup`)
  assert.equal(call.method, 'DELETE')
  assert.equal(call.body, undefined)
  assert.equal(call.header('x-request-id'), 'req-1')
  assert.equal(call.header('idempotency-key'), 'req-1')
  assert.deepEqual(reply, { type: 'TASK_CANCEL_SUCCESS', payload: null, meta: { requestId: 'req-1', status: 204 } })
})

test('fallback POST, PUT and PATCH send the whole payload as JSON; a text answer is a string', async t => {
  const { dispatch, api } = setup(t, {}, call => call.method === 'PUT' ? new Response('plain text', { status: 200 }) : json({ ok: true }, 201))
  const created = await dispatch({ type: 'TASK_CREATE_REQUEST', payload: { title: 'a b', steps: 3 } })
  const updated = await dispatch({ type: 'TASK_UPDATE_REQUEST', payload: { id: 'a/b', title: 't' } })
  await dispatch({ type: 'TASK_STEP_REQUEST', payload: { id: 'x', step: 2, done: true } })
  await dispatch({ type: 'TASK_CREATE_REQUEST', payload: null })
  await dispatch({ type: 'TASK_CREATE_REQUEST' })
  const [post, put, patch, nullBody, absent] = api.calls
  assert.deepEqual([post.method, post.url, post.body], ['POST', `${API}/tasks`, '{"title":"a b","steps":3}'])
  assert.deepEqual([put.method, put.url, put.body], ['PUT', `${API}/tasks/a%2Fb`, '{"id":"a/b","title":"t"}'])
  assert.deepEqual([patch.method, patch.url, patch.body], ['PATCH', `${API}/tasks/x/steps/2`, '{"id":"x","step":2,"done":true}'])
  assert.equal(nullBody.body, undefined, 'no body for an explicit null')
  assert.equal(absent.body, '{}', 'an absent payload is {}')
  for (const call of [post, put, patch]) {
    assert.equal(call.header('content-type'), 'application/json')
    assert.match(call.header('idempotency-key'), UUID)
    assert.equal(call.header('idempotency-key'), call.header('x-request-id'))
  }
  assert.deepEqual(created.payload, { ok: true })
  assert.equal(created.meta.status, 201)
  assert.equal(updated.payload, 'plain text')
})

test('fallback failures: non-2xx is upstream_error with status and details', async t => {
  const answers = [json({ error: 'conflict' }, 409), new Response('boom', { status: 500 }), new Response('', { status: 404 }), new Response(null, { status: 302, headers: { location: '/login' } })]
  const { dispatch } = setup(t, {}, () => answers.shift())
  const conflict = await dispatch({ type: 'TASK_CANCEL_REQUEST', payload: { id: '1' } })
  assert.deepEqual(conflict, {
    type: 'TASK_CANCEL_FAILURE',
    error: true,
    payload: { code: 'upstream_error', message: 'the API answered 409', status: 409, details: { error: 'conflict' } },
    meta: { requestId: conflict.meta.requestId }
  })
  assert.deepEqual((await dispatch({ type: 'TASKS_FETCH_REQUEST' })).payload, { code: 'upstream_error', message: 'the API answered 500', status: 500, details: 'boom' })
  assert.deepEqual((await dispatch({ type: 'TASKS_FETCH_REQUEST' })).payload, { code: 'upstream_error', message: 'the API answered 404', status: 404 })
  const redirect = await dispatch({ type: 'TASKS_FETCH_REQUEST' })
  assert.equal(redirect.payload.code, 'upstream_error')
  assert.equal(redirect.payload.status, 302, 'a redirect is not followed')
})

test('fallback failures: browser opaque redirects and oversized bodies are upstream_error', async t => {
  const answers = [
    { type: 'opaqueredirect', status: 0, headers: new Headers(), text: async () => '' },
    new Response('{}', { status: 200, headers: { 'content-length': String(2 * 1024 * 1024) } }),
    new Response('x'.repeat(1024 * 1024 + 1), { status: 200 })
  ]
  const { dispatch } = setup(t, {}, () => answers.shift())
  const opaque = await dispatch({ type: 'TASKS_FETCH_REQUEST' })
  assert.equal(opaque.payload.code, 'upstream_error')
  assert.equal(opaque.payload.status, undefined, 'the browser hides the status')
  for (let i = 0; i < 2; i++) {
    const large = await dispatch({ type: 'TASKS_FETCH_REQUEST' })
    assert.equal(large.payload.code, 'upstream_error')
    assert.equal(large.payload.status, 200)
  }
})

test('fallback failures: network error is upstream_unavailable 502, no answer in timeoutMs is upstream_timeout 504', async t => {
  const { dispatch, api } = setup(t, {}, call => call.url.endsWith('/slow') ? never() : Promise.reject(new TypeError('fetch failed')))
  const unreachable = await dispatch({ type: 'TASKS_FETCH_REQUEST' })
  assert.deepEqual(unreachable.payload, { code: 'upstream_unavailable', message: 'the API is unreachable', status: 502 })
  const slow = await dispatch({ type: 'SLOW_REQUEST' })
  assert.equal(slow.type, 'SLOW_FAILURE')
  assert.equal(slow.payload.code, 'upstream_timeout')
  assert.equal(slow.payload.status, 504)
  assert.equal(api.calls[1].signal.aborted, true, 'the call itself is aborted')
})

test('fallback: a payload that cannot fill the path or query is invalid_payload, without any fetch', async t => {
  const { dispatch, api } = setup(t)
  for (const payload of [{ id: '..' }, { id: '.' }, { id: '' }, {}, { id: null }, { id: 1.5 }, { id: true }, { id: 'x', filter: { a: 1 } }, { id: 'x', deep: [[1]] }, [1], 'text']) {
    const reply = await dispatch({ type: 'TASK_FETCH_REQUEST', payload })
    assert.equal(reply.type, 'TASK_FETCH_FAILURE', JSON.stringify(payload))
    assert.equal(reply.payload.code, 'invalid_payload', JSON.stringify(payload))
  }
  // Worded as patchbay words it.
  assert.equal((await dispatch({ type: 'TASK_FETCH_REQUEST', payload: { id: '..' } })).payload.message, 'path field `id` must not be empty, `.` or `..`')
  assert.equal((await dispatch({ type: 'TASK_FETCH_REQUEST', payload: { id: 1n } })).payload.code, 'invalid_payload', 'not JSON')
  assert.equal(api.calls.length, 0)
})

test('requests in flight on a socket that dies go over REST with the same requestId, and are answered once', async t => {
  const { ws, dispatch, api, of } = setup(t, {}, call => json({ via: 'rest', method: call.method }))
  ws.last.accept()
  const created = dispatch({ type: 'TASK_CREATE_REQUEST', payload: { title: 't' } })
  const listed = dispatch({ type: 'TASKS_FETCH_REQUEST', payload: { page: 2 } })
  const [c] = ws.last.requests('TASK_CREATE_REQUEST')
  const [l] = ws.last.requests('TASKS_FETCH_REQUEST')
  const dead = ws.last
  const lateDelivery = dead.onmessage
  dead.drop(1006)

  const [cr, lr] = await Promise.all([created, listed])
  assert.deepEqual([cr.payload, cr.meta.requestId], [{ via: 'rest', method: 'POST' }, c.meta.requestId])
  assert.deepEqual([lr.payload, lr.meta.requestId], [{ via: 'rest', method: 'GET' }, l.meta.requestId])
  const post = api.calls.find(x => x.method === 'POST')
  const get = api.calls.find(x => x.method === 'GET')
  assert.equal(post.header('idempotency-key'), c.meta.requestId)
  assert.equal(post.header('x-request-id'), c.meta.requestId)
  assert.equal(get.header('x-request-id'), l.meta.requestId)
  assert.equal(get.url, `${API}/tasks?page=2`)

  // Late replies, on the dead socket or (in theory) on the next one, change nothing.
  lateDelivery?.call(dead, { data: JSON.stringify({ type: 'TASK_CREATE_SUCCESS', payload: 'late', meta: { requestId: c.meta.requestId } }) })
  await until(() => ws.sockets.length === 2, 'a reconnect')
  ws.last.accept()
  ws.last.receive({ type: 'TASKS_FETCH_SUCCESS', payload: 'late', meta: { requestId: l.meta.requestId } })
  await tick()
  assert.equal(of('TASK_CREATE_SUCCESS').length, 1)
  assert.equal(of('TASKS_FETCH_SUCCESS').length, 1)
})

// --- rooms and polling -----------------------------------------------------------------------

test('rooms from meta.subscribed/meta.roomToken and SUBSCRIBE are rejoined quietly with their token after a reconnect', async t => {
  const { ws, dispatch, of } = setup(t, {}, () => json({ id: '7', status: 'running' }))
  ws.last.accept()
  const enqueued = dispatch({ type: 'TASK_ENQUEUE_REQUEST', payload: { title: 't' } })
  ws.last.succeed('TASK_ENQUEUE_REQUEST', { id: '7', status: 'queued' }, { status: 201, subscribed: 'task:7', roomToken: 'tok-7' })
  await enqueued
  const joined = dispatch({ type: '@@patchbay/SUBSCRIBE_REQUEST', payload: { room: 'org:1', token: 'tok-org' } })
  ws.last.succeed('@@patchbay/SUBSCRIBE_REQUEST', { room: 'org:1' })
  await joined
  const left = dispatch({ type: '@@patchbay/SUBSCRIBE_REQUEST', payload: { room: 'org:2' } })
  ws.last.succeed('@@patchbay/SUBSCRIBE_REQUEST', { room: 'org:2' })
  await left
  const unsubscribed = dispatch({ type: '@@patchbay/UNSUBSCRIBE_REQUEST', payload: { room: 'org:2' } })
  ws.last.succeed('@@patchbay/UNSUBSCRIBE_REQUEST', { room: 'org:2' })
  await unsubscribed
  const refused = dispatch({ type: '@@patchbay/SUBSCRIBE_REQUEST', payload: { room: 'user:99' } })
  const r = ws.last.requests('@@patchbay/SUBSCRIBE_REQUEST').at(-1)
  ws.last.receive({ type: '@@patchbay/SUBSCRIBE_FAILURE', error: true, payload: { code: 'forbidden', message: 'no' }, meta: { requestId: r.meta.requestId } })
  assert.equal((await refused).payload.code, 'forbidden')

  ws.last.drop(1011)
  await until(() => ws.sockets.length === 2, 'a reconnect')
  ws.last.accept()
  const rejoins = ws.last.requests('@@patchbay/SUBSCRIBE_REQUEST')
  assert.deepEqual(rejoins.map(m => m.payload), [{ room: 'task:7', token: 'tok-7' }, { room: 'org:1', token: 'tok-org' }])
  for (const m of rejoins) ws.last.receive({ type: '@@patchbay/SUBSCRIBE_SUCCESS', payload: { room: m.payload.room }, meta: { requestId: m.meta.requestId } })
  await tick()
  assert.equal(of('@@patchbay/SUBSCRIBE_REQUEST').length, 3, 'the rejoins are not dispatched')
  assert.equal(of('@@patchbay/SUBSCRIBE_SUCCESS').length, 2, 'nor their answers')
})

test('a push that finishes a polled room leaves it: no rejoin, no poll after the next outage', async t => {
  const { ws, dispatch, api } = setup(t, {}, () => json({ id: '7', status: 'running' }))
  ws.last.accept()
  const enqueued = dispatch({ type: 'TASK_ENQUEUE_REQUEST', payload: { title: 't' } })
  ws.last.succeed('TASK_ENQUEUE_REQUEST', { id: '7', status: 'queued' }, { status: 201, subscribed: 'task:7', roomToken: 'tok-7' })
  await enqueued
  ws.last.receive({ type: 'TASK_PROGRESS', payload: { id: '7', status: 'succeeded' }, meta: { room: 'task:7' } })
  await tick()
  assert.deepEqual(ws.last.requests('@@patchbay/UNSUBSCRIBE_REQUEST').map(m => m.payload), [{ room: 'task:7' }], 'left on the server too')
  ws.last.drop(1011)
  await until(() => ws.sockets.length === 2, 'a reconnect')
  await sleep(50)
  assert.equal(api.calls.length, 0, 'a finished room is not polled')
  ws.last.accept()
  assert.deepEqual(ws.last.requests('@@patchbay/SUBSCRIBE_REQUEST'), [], 'nor rejoined')
})

// --- history and recovery ------------------------------------------------------------------

/** Opens `socket` and greets with a CONNECTED of this payload. */
function acceptWith (socket, payload) {
  socket.readyState = 1
  socket.onopen?.({})
  socket.receive({ type: '@@patchbay/CONNECTED', payload: { protocol: 1, connectionId: 'c', userId: null, rooms: [], ...payload } })
}

const push = (socket, n, meta) => socket.receive({ type: 'TICK', payload: n, meta })

test('a rejoined room recovers from where it stood, and an action seen already is dropped', async t => {
  const { ws, dispatch, of } = setup(t)
  ws.last.accept()
  const joined = dispatch({ type: '@@patchbay/SUBSCRIBE_REQUEST', payload: { room: 'feed:1' } })
  ws.last.succeed('@@patchbay/SUBSCRIBE_REQUEST', { room: 'feed:1', position: { epoch: 'e', offset: 0 } })
  await joined
  push(ws.last, 1, { room: 'feed:1', id: 'i1', offset: 1 })
  push(ws.last, 2, { room: 'feed:1', id: 'i2', offset: 2 })

  ws.last.drop(1006)
  await until(() => ws.sockets.length === 2, 'a reconnect')
  ws.last.accept()
  const rejoin = ws.last.requests('@@patchbay/SUBSCRIBE_REQUEST').at(-1)
  assert.deepEqual(rejoin.payload, { room: 'feed:1', since: { epoch: 'e', offset: 2 } })
  ws.last.receive({ type: '@@patchbay/SUBSCRIBE_SUCCESS', payload: { room: 'feed:1', position: { epoch: 'e', offset: 3 }, recovered: true, replayed: 1 }, meta: { requestId: rejoin.meta.requestId } })
  push(ws.last, 3, { room: 'feed:1', id: 'i3', offset: 3, replayed: true })
  push(ws.last, 2, { room: 'feed:1', id: 'i2', offset: 2, replayed: true })
  await tick()
  assert.deepEqual(of('TICK').map(a => a.payload), [1, 2, 3], 'each action once')
  assert.equal(of('@@patchbay/RESYNC').length, 0)

  // The next reconnect asks from offset 3.
  ws.last.drop(1006)
  await until(() => ws.sockets.length === 3, 'another reconnect')
  ws.last.accept()
  assert.deepEqual(ws.last.requests('@@patchbay/SUBSCRIBE_REQUEST').at(-1).payload.since, { epoch: 'e', offset: 3 })
})

test('a socket lost in the middle of a replay asks again for the rest', async t => {
  const { ws, dispatch, of } = setup(t)
  ws.last.accept()
  const joined = dispatch({ type: '@@patchbay/SUBSCRIBE_REQUEST', payload: { room: 'feed:1' } })
  ws.last.succeed('@@patchbay/SUBSCRIBE_REQUEST', { room: 'feed:1', position: { epoch: 'e', offset: 2 } })
  await joined
  ws.last.drop(1006)
  await until(() => ws.sockets.length === 2, 'a reconnect')
  ws.last.accept()
  let rejoin = ws.last.requests('@@patchbay/SUBSCRIBE_REQUEST').at(-1)
  ws.last.receive({ type: '@@patchbay/SUBSCRIBE_SUCCESS', payload: { room: 'feed:1', position: { epoch: 'e', offset: 5 }, recovered: true, replayed: 3 }, meta: { requestId: rejoin.meta.requestId } })
  push(ws.last, 3, { room: 'feed:1', id: 'i3', offset: 3, replayed: true })
  // Gone before offsets 4 and 5 arrived.
  ws.last.drop(1006)
  await until(() => ws.sockets.length === 3, 'another reconnect')
  ws.last.accept()
  rejoin = ws.last.requests('@@patchbay/SUBSCRIBE_REQUEST').at(-1)
  assert.deepEqual(rejoin.payload.since, { epoch: 'e', offset: 3 })
  assert.deepEqual(of('TICK').map(a => a.payload), [3])
})

test('a recovery that cannot replay dispatches RESYNC with where the room stands', async t => {
  const { ws, dispatch, of } = setup(t)
  ws.last.accept()
  const joined = dispatch({ type: '@@patchbay/SUBSCRIBE_REQUEST', payload: { room: 'feed:1' } })
  ws.last.succeed('@@patchbay/SUBSCRIBE_REQUEST', { room: 'feed:1', position: { epoch: 'e', offset: 5 } })
  await joined
  ws.last.drop(1006)
  await until(() => ws.sockets.length === 2, 'a reconnect')
  ws.last.accept()
  const rejoin = ws.last.requests('@@patchbay/SUBSCRIBE_REQUEST').at(-1)
  ws.last.receive({ type: '@@patchbay/SUBSCRIBE_SUCCESS', payload: { room: 'feed:1', position: { epoch: 'f', offset: 9 }, recovered: false, reason: 'epoch_changed', replayed: 0 }, meta: { requestId: rejoin.meta.requestId } })
  await tick()
  assert.deepEqual(of('@@patchbay/RESYNC').map(a => a.payload), [{ room: 'feed:1', reason: 'epoch_changed', position: { epoch: 'f', offset: 9 } }])
  // A room without history is no reason to refetch.
  ws.last.drop(1006)
  await until(() => ws.sockets.length === 3, 'another reconnect')
  ws.last.accept()
  const again = ws.last.requests('@@patchbay/SUBSCRIBE_REQUEST').at(-1)
  assert.deepEqual(again.payload.since, { epoch: 'f', offset: 9 })
  ws.last.receive({ type: '@@patchbay/SUBSCRIBE_SUCCESS', payload: { room: 'feed:1', recovered: false, reason: 'not_kept', replayed: 0 }, meta: { requestId: again.meta.requestId } })
  await tick()
  assert.equal(of('@@patchbay/RESYNC').length, 1)
})

test('a RESYNC from the server moves the room to its position: the next recovery starts there', async t => {
  const { ws, dispatch, of } = setup(t)
  ws.last.accept()
  const joined = dispatch({ type: '@@patchbay/SUBSCRIBE_REQUEST', payload: { room: 'feed:1' } })
  ws.last.succeed('@@patchbay/SUBSCRIBE_REQUEST', { room: 'feed:1', position: { epoch: 'e', offset: 5 } })
  await joined
  ws.last.receive({ type: '@@patchbay/RESYNC', payload: { room: 'feed:1', reason: 'epoch_changed', position: { epoch: 'g', offset: 2 } }, meta: { room: 'feed:1' } })
  await tick()
  assert.equal(of('@@patchbay/RESYNC').length, 1, 'the app hears it and refetches')
  ws.last.drop(1006)
  await until(() => ws.sockets.length === 2, 'a reconnect')
  ws.last.accept()
  const rejoin = ws.last.requests('@@patchbay/SUBSCRIBE_REQUEST').at(-1)
  assert.deepEqual(rejoin.payload.since, { epoch: 'g', offset: 2 })
})

test('the identity room recovers with the handshake: since in the URL, RESYNC when it cannot', async t => {
  const { ws, of } = setup(t)
  assert.ok(!ws.last.url.includes('since'), ws.last.url)
  acceptWith(ws.last, { userId: '7', rooms: ['user:7'], positions: { 'user:7': { epoch: 'u', offset: 4 } } })
  push(ws.last, 'hi', { room: 'user:7', id: 'x1', offset: 5 })
  push(ws.last, 'both', { room: 'feed:9', id: 'x2', offsets: { 'user:7': 6 } })
  ws.last.drop(1006)
  await until(() => ws.sockets.length === 2, 'a reconnect')
  assert.ok(ws.last.url.endsWith('?since=u%3A6'), ws.last.url)
  acceptWith(ws.last, { userId: '7', rooms: ['user:7'], positions: { 'user:7': { epoch: 'v', offset: 0 } }, recovery: { room: 'user:7', recovered: false, reason: 'epoch_changed', replayed: 0 } })
  await tick()
  assert.deepEqual(of('@@patchbay/RESYNC').map(a => a.payload), [{ room: 'user:7', reason: 'epoch_changed', position: { epoch: 'v', offset: 0 } }])
})

// --- presence --------------------------------------------------------------------------------

test('presence: the snapshot, then only newer events; a rejoin brings a new snapshot', async t => {
  const { ws, dispatch, of, bridge, store } = setup(t)
  ws.last.accept()
  const presenceEvent = (type, payload) => ws.last.receive({ type: `@@patchbay/PRESENCE_${type}`, payload: { room: 'doc:1', ...payload }, meta: { room: 'doc:1' } })
  // Events that arrive while the SUBSCRIBE is under way wait for its snapshot: the user's
  // own JOIN, counted in the snapshot, is dropped; eve's, newer, follows the snapshot.
  const joined = dispatch({ type: '@@patchbay/SUBSCRIBE_REQUEST', payload: { room: 'doc:1' } })
  presenceEvent('JOIN', { userId: 'eve', state: {}, version: 4 })
  presenceEvent('JOIN', { userId: 'alice', state: {}, version: 3 })
  ws.last.succeed('@@patchbay/SUBSCRIBE_REQUEST', { room: 'doc:1', presence: { version: 3, users: [{ userId: 'alice', state: {}, since: 't0' }] } })
  await joined
  presenceEvent('JOIN', { userId: 'bob', state: { x: 1 }, version: 5 })
  presenceEvent('STATE', { userId: 'bob', state: { x: 0 }, version: 5 })
  presenceEvent('LEAVE', { userId: 'alice', version: 6, reason: 'left' })
  await tick()
  const presenceTypes = ['SNAPSHOT', 'JOIN', 'STATE', 'LEAVE'].map(t => `@@patchbay/PRESENCE_${t}`)
  assert.deepEqual(
    store.getState().filter(a => presenceTypes.includes(a.type)).map(a => [a.type.slice('@@patchbay/PRESENCE_'.length), a.payload.version]),
    [['SNAPSHOT', 3], ['JOIN', 4], ['JOIN', 5], ['LEAVE', 6]],
    'the snapshot first, then only newer events, in version order'
  )
  const view = bridge.presence('doc:1')
  assert.equal(view.version, 6)
  assert.deepEqual(view.users.map(u => [u.userId, u.state]).sort(), [['bob', { x: 1 }], ['eve', {}]])

  ws.last.drop(1006)
  await until(() => ws.sockets.length === 2, 'a reconnect')
  ws.last.accept()
  const rejoin = ws.last.requests('@@patchbay/SUBSCRIBE_REQUEST').at(-1)
  ws.last.receive({ type: '@@patchbay/SUBSCRIBE_SUCCESS', payload: { room: 'doc:1', presence: { version: 9, users: [{ userId: 'carol', state: {}, since: 't1' }] } }, meta: { requestId: rejoin.meta.requestId } })
  await tick()
  assert.deepEqual(of('@@patchbay/PRESENCE_SNAPSHOT').map(a => a.payload.version), [3, 9], 'the quiet rejoin still tells the store')
  assert.deepEqual(bridge.presence('doc:1').users.map(u => u.userId), ['carol'])
  assert.equal(bridge.presence('nowhere'), null)
})

test('SUBSCRIBE while in fallback succeeds with meta.deferred and joins on reconnect; other built-ins fail', async t => {
  const { ws, dispatch, api } = setup(t)
  const reply = await dispatch({ type: '@@patchbay/SUBSCRIBE_REQUEST', payload: { room: 'org:1', token: 't1' } })
  assert.deepEqual(reply, { type: '@@patchbay/SUBSCRIBE_SUCCESS', payload: { room: 'org:1' }, meta: { requestId: reply.meta.requestId, deferred: true } })
  const bad = await dispatch({ type: '@@patchbay/SUBSCRIBE_REQUEST', payload: { room: 'has space' } })
  assert.equal(bad.payload.code, 'invalid_payload')
  const ping = await dispatch({ type: '@@patchbay/PING_REQUEST' })
  assert.equal(ping.payload.code, 'upstream_unavailable')

  ws.last.accept()
  assert.deepEqual(ws.last.requests('@@patchbay/SUBSCRIBE_REQUEST').map(m => m.payload), [{ room: 'org:1', token: 't1' }])
  assert.equal(api.calls.length, 0)
})

test('a task action has no REST fallback: with the socket down it fails at once with upstream_unavailable', async t => {
  const { ws, dispatch, api } = setup(t)
  const offline = await dispatch({ type: 'EXPORT_START_REQUEST', payload: { format: 'csv' } })
  assert.equal(offline.type, 'EXPORT_START_FAILURE')
  assert.equal(offline.payload.code, 'upstream_unavailable')
  assert.equal(api.calls.length, 0, 'the API is never called for a task action')

  ws.last.accept()
  const reply = dispatch({ type: 'EXPORT_START_REQUEST', payload: { format: 'csv' } })
  const sent = ws.last.requests('EXPORT_START_REQUEST')
  assert.equal(sent.length, 1, 'with the socket open it goes to patchbay')
  ws.last.receive({ type: 'EXPORT_START_SUCCESS', payload: { id: 't1', status: 'queued' }, meta: { requestId: sent[0].meta.requestId } })
  assert.equal((await reply).type, 'EXPORT_START_SUCCESS')
})

test('in fallback a subscribe room is polled with the `as` action and meta.room until the `until` status', async t => {
  const statuses = ['queued', 'running', 'succeeded']
  const { ws, dispatch, api, of } = setup(t, { minBackoffMs: 60000, maxBackoffMs: 60000 }, call =>
    call.method === 'POST' ? json({ id: '7', status: 'queued' }, 201) : json({ id: '7', status: statuses.shift() ?? 'succeeded' }))
  ws.last.drop(1006)
  const reply = await dispatch({ type: 'TASK_ENQUEUE_REQUEST', payload: { title: 't' } })
  assert.deepEqual(reply.meta, { requestId: reply.meta.requestId, status: 201 })
  await until(() => of('TASK_PROGRESS').some(a => a.payload.status === 'succeeded'), 'the final status')
  const progress = of('TASK_PROGRESS')
  assert.deepEqual(progress.map(a => a.payload.status), ['queued', 'running', 'succeeded'])
  for (const a of progress) assert.deepEqual(a.meta, { room: 'task:7', polled: true })
  const polls = api.calls.filter(c => c.method === 'GET')
  assert.ok(polls.every(c => c.url === `${API}/tasks/7`))
  await sleep(60)
  assert.equal(api.calls.filter(c => c.method === 'GET').length, polls.length, 'polling stopped')
})

test('polling stops once the socket is back and the room rejoined; a refused rejoin keeps polling', async t => {
  const { ws, dispatch, api, of } = setup(t, {}, call =>
    call.method === 'POST' ? json({ id: JSON.parse(call.body).title, status: 'queued' }, 201) : json({ status: 'running' }))
  const gets = room => api.calls.filter(c => c.method === 'GET' && c.url.endsWith(`/tasks/${room}`)).length
  ws.last.drop(1006)
  await dispatch({ type: 'TASK_ENQUEUE_REQUEST', payload: { title: 'a' } })
  await dispatch({ type: 'TASK_ENQUEUE_REQUEST', payload: { title: 'b' } })
  await until(() => gets('a') >= 2 && gets('b') >= 2, 'polling')
  await until(() => ws.sockets.length === 2, 'a reconnect')
  ws.last.accept()
  const [ja, jb] = ws.last.requests('@@patchbay/SUBSCRIBE_REQUEST')
  assert.deepEqual([ja.payload, jb.payload], [{ room: 'task:a' }, { room: 'task:b' }], 'no token was given in fallback')
  ws.last.receive({ type: '@@patchbay/SUBSCRIBE_SUCCESS', payload: { room: 'task:a' }, meta: { requestId: ja.meta.requestId } })
  ws.last.receive({ type: '@@patchbay/SUBSCRIBE_FAILURE', error: true, payload: { code: 'forbidden', message: 'no' }, meta: { requestId: jb.meta.requestId } })
  const [a, b] = [gets('a'), gets('b')]
  await sleep(60)
  assert.equal(gets('a'), a, 'the rejoined room is not polled')
  assert.ok(gets('b') > b, 'the refused room still is')
  assert.ok(of('TASK_PROGRESS').every(x => x.meta.room === 'task:a' || x.meta.room === 'task:b'))
})

test('a subscribe success that arrives over REST after the socket is back joins its room at once', async t => {
  let answer
  const { ws, dispatch } = setup(t, {}, () => new Promise(resolve => { answer = resolve }))
  ws.last.accept()
  const enqueued = dispatch({ type: 'TASK_ENQUEUE_REQUEST', payload: { title: 't' } })
  ws.last.drop(1006)
  await until(() => answer, 'the REST call')
  await until(() => ws.sockets.length === 2, 'a reconnect')
  ws.last.accept()
  answer(json({ id: '9', status: 'queued' }, 201))
  await enqueued
  assert.deepEqual(ws.last.requests('@@patchbay/SUBSCRIBE_REQUEST').map(m => m.payload), [{ room: 'task:9' }])
})

test('room values outside A-Z a-z 0-9 - . _ ~ name no room', async t => {
  const { ws, dispatch, api } = setup(t, {}, () => json({ id: 'user:1', status: 'queued' }, 201))
  ws.last.drop(1006)
  await dispatch({ type: 'TASK_ENQUEUE_REQUEST', payload: { title: 't' } })
  await until(() => ws.sockets.length === 2, 'a reconnect')
  ws.last.accept()
  await sleep(30)
  assert.equal(ws.last.requests('@@patchbay/SUBSCRIBE_REQUEST').length, 0)
  assert.equal(api.calls.length, 1, 'nothing polled')
})

// --- closing ---------------------------------------------------------------------------------

test('close() answers everything in flight, closes the socket and leaves no timer behind', async t => {
  const timers = () => process.getActiveResourcesInfo().filter(r => r === 'Timeout').length
  const before = timers()
  const { bridge, ws, dispatch, api } = setup(t, { pingMs: 20, pongTimeoutMs: 20, connectWaitMs: 0 }, never)
  const overRest = dispatch({ type: 'TASKS_FETCH_REQUEST' })
  await sleep(5) // connectWaitMs: 0 sends it over REST while still connecting
  ws.last.accept()
  const overSocket = dispatch({ type: 'TASK_FETCH_REQUEST', payload: { id: '1' } })
  bridge.close()
  for (const reply of await Promise.all([overRest, overSocket])) {
    assert.equal(reply.error, true)
    assert.equal(reply.payload.code, 'upstream_unavailable')
  }
  assert.equal(ws.last.closeCode, 1000)
  assert.equal(api.calls[0].signal.aborted, true)
  const after = await dispatch({ type: 'TASKS_FETCH_REQUEST' })
  assert.equal(after.payload.code, 'upstream_unavailable')
  assert.equal(api.calls.length, 1)
  await tick()
  assert.equal(timers(), before)
  await sleep(50)
  assert.equal(ws.sockets.length, 1, 'no reconnect after close')
})

// --- why the socket is down, and the helpers around requests ------------------------------------

test('diagnose tells unreachable, auth and refused apart with /readyz and the socket\'s own credentials on GET /sse', async () => {
  const cases = [
    [() => { throw new TypeError('fetch failed') }, null, 'unreachable'],
    [() => json({}), () => json({ code: 'unauthorized' }, 401), 'auth'],
    [() => json({}), () => json({ code: 'forbidden_origin' }, 403), 'refused'],
    [() => json({}), () => json({ code: 'too_many_connections' }, 503), 'unreachable'],
    [() => json({}), () => new Response('bad gateway', { status: 502 }), 'unreachable'],
    [() => json({}), () => { throw new TypeError('a foreign origin cannot read it') }, 'refused'],
    [() => json({}), () => new Response('data: {}\n\n', { status: 200 }), 'unreachable']
  ]
  for (const [readyz, sse, want] of cases) {
    const calls = []
    const fetch = async (url, init) => {
      calls.push({ url, init })
      return url.includes('/readyz') ? readyz() : sse()
    }
    assert.equal(await diagnose(fetch, 'wss://app.test/pb/ws?token=t1&since=e%3A4'), want)
    assert.equal(calls[0].url, 'https://app.test/pb/readyz')
    assert.equal(calls[0].init.mode, 'no-cors')
    if (sse) {
      assert.equal(calls[1].url, 'https://app.test/pb/sse?token=t1', 'the socket\'s own credentials, no recovery')
      assert.equal(calls[1].init.credentials, 'include')
      assert.equal(calls[1].init.signal.aborted, true, 'the stream is not kept open')
    }
  }
})

test('diagnose gives up on a server that does not answer: unreachable', async () => {
  const hang = (url, init) => new Promise((resolve, reject) => init.signal.addEventListener('abort', () => reject(new Error('aborted'))))
  const started = Date.now()
  const slowSse = (url, init) => (url.includes('/readyz') ? Promise.resolve(json({})) : hang(url, init))
  assert.equal(await diagnose(slowSse, 'ws://x.test/ws'), 'unreachable')
  assert.ok(Date.now() - started < 8000)
})

test('a status listener that reconnects does not leave a second socket behind', async t => {
  const { ws, bridge } = setup(t)
  ws.last.accept()
  let once = true
  bridge.subscribe(state => {
    if (state.status === 'fallback' && once) {
      once = false
      bridge.reconnect()
    }
  })
  ws.last.drop(1006)
  assert.equal(ws.sockets.length, 2, 'the listener\'s reconnect opened one')
  await sleep(60)
  assert.equal(ws.sockets.length, 2, 'and no timer opened another')
})

test('a socket that never opens: STATUS says why, and repeated refusals wait refusedBackoffMs', async t => {
  const refused = async url => (url.includes('/readyz') ? json({}) : json({ code: 'forbidden_origin' }, 403))
  const { ws, of } = setup(t, { diagnose: true, refusedBackoffMs: 60000 }, call => refused(call.url))
  for (let i = 1; i <= 3; i++) {
    await until(() => ws.sockets.length === i, `attempt ${i}`)
    ws.last.drop(1006)
    await until(() => of('@@patchbay/STATUS').some(a => a.payload.reason === 'refused'), 'the reason')
  }
  const last = of('@@patchbay/STATUS').at(-1)
  assert.deepEqual(last.payload, { status: 'fallback', transport: 'websocket', reason: 'refused' })
  await sleep(80)
  assert.equal(ws.sockets.length, 3, 'after three refusals the next attempt waits long')
})

test('a socket that opens clears the reason; an unreachable server keeps the short backoff', async t => {
  const { ws, of, bridge } = setup(t, { diagnose: true, refusedBackoffMs: 60000 }, () => { throw new TypeError('fetch failed') })
  const seen = []
  const stop = bridge.subscribe(state => seen.push(state))
  for (let i = 1; i <= 4; i++) {
    await until(() => ws.sockets.length === i, `attempt ${i}`)
    ws.last.drop(1006)
  }
  await until(() => ws.sockets.length === 5, 'unreachable keeps retrying')
  ws.last.accept()
  assert.equal(of('@@patchbay/STATUS').at(-1).payload.reason, undefined)
  assert.ok(seen.some(s => s.status === 'fallback' && s.reason === 'unreachable'), 'subscribers heard why')
  assert.deepEqual(seen.at(-1), { status: 'open', transport: 'websocket', reason: null, socket: 0, rest: 0 })
  stop()
  ws.last.drop(1006)
  await until(() => bridge.status === 'fallback', 'down again')
  assert.equal(seen.at(-1).status, 'open', 'an unsubscribed listener hears nothing more')
})

test('a refused quiet rejoin reaches the store as REJOIN_FAILED', async t => {
  const { ws, dispatch, of } = setup(t)
  ws.last.accept()
  const joining = dispatch({ type: '@@patchbay/SUBSCRIBE_REQUEST', payload: { room: 'org:1', token: 'old' } })
  ws.last.succeed('@@patchbay/SUBSCRIBE_REQUEST', { room: 'org:1' })
  await joining
  ws.last.drop(1006)
  await until(() => ws.sockets.length === 2, 'a reconnect')
  ws.last.accept()
  const rejoin = ws.last.requests('@@patchbay/SUBSCRIBE_REQUEST').at(-1)
  ws.last.receive({ type: '@@patchbay/SUBSCRIBE_FAILURE', error: true, payload: { code: 'forbidden', message: 'the room token expired' }, meta: { requestId: rejoin.meta.requestId } })
  assert.deepEqual(of('@@patchbay/REJOIN_FAILED').map(a => a.payload), [{ room: 'org:1', code: 'forbidden', message: 'the room token expired' }])
})

test('a rejoin patchbay cannot take just now (upstream_unavailable) is tried again, without REJOIN_FAILED', async t => {
  const { ws, dispatch, of } = setup(t)
  ws.last.accept()
  const joining = dispatch({ type: '@@patchbay/SUBSCRIBE_REQUEST', payload: { room: 'org:1' } })
  ws.last.succeed('@@patchbay/SUBSCRIBE_REQUEST', { room: 'org:1' })
  await joining
  ws.last.drop(1006)
  await until(() => ws.sockets.length === 2, 'a reconnect')
  ws.last.accept()
  const first = ws.last.requests('@@patchbay/SUBSCRIBE_REQUEST').at(-1)
  ws.last.receive({ type: '@@patchbay/SUBSCRIBE_FAILURE', error: true, payload: { code: 'upstream_unavailable', message: 'the bus is connecting' }, meta: { requestId: first.meta.requestId } })
  await until(() => ws.last.requests('@@patchbay/SUBSCRIBE_REQUEST').length === 2, 'the rejoin tried again')
  const second = ws.last.requests('@@patchbay/SUBSCRIBE_REQUEST').at(-1)
  assert.deepEqual(second.payload, { room: 'org:1' })
  ws.last.receive({ type: '@@patchbay/SUBSCRIBE_SUCCESS', payload: { room: 'org:1' }, meta: { requestId: second.meta.requestId } })
  assert.equal(of('@@patchbay/REJOIN_FAILED').length, 0)
  await sleep(700)
  assert.equal(ws.last.requests('@@patchbay/SUBSCRIBE_REQUEST').length, 2, 'no more tries once in')
})

test('unwrap: the payload of a success; a failure throws a PatchbayError', async t => {
  const { ws, dispatch } = setup(t)
  ws.last.accept()
  const ok = dispatch({ type: 'TASK_FETCH_REQUEST', payload: { id: '1' } })
  ws.last.succeed('TASK_FETCH_REQUEST', { id: '1', title: 'a' })
  assert.deepEqual(await ok.unwrap(), { id: '1', title: 'a' })
  const bad = dispatch({ type: 'TASK_FETCH_REQUEST', payload: { id: '2' } })
  const request = ws.last.requests('TASK_FETCH_REQUEST').at(-1)
  ws.last.receive({ type: 'TASK_FETCH_FAILURE', error: true, payload: { code: 'upstream_error', message: 'not found', status: 404, details: { id: '2' } }, meta: { requestId: request.meta.requestId } })
  await assert.rejects(bad.unwrap(), e => e instanceof PatchbayError && e.code === 'upstream_error' && e.status === 404 && e.details.id === '2')
  await assert.rejects(unwrap(bad), PatchbayError)
})

test('an aborted request is answered once, locally, with `aborted`; the reducers never see the signal', async t => {
  const { ws, dispatch, of } = setup(t)
  ws.last.accept()
  const abort = new AbortController()
  const pending = dispatch({ type: 'TASK_FETCH_REQUEST', payload: { id: '1' }, meta: { signal: abort.signal } })
  assert.deepEqual(of('TASK_FETCH_REQUEST')[0].meta, {}, 'no signal in the store')
  abort.abort()
  const reply = await pending
  assert.equal(reply.payload.code, 'aborted')
  ws.last.succeed('TASK_FETCH_REQUEST', { id: '1' })
  assert.equal(of('TASK_FETCH_SUCCESS').length, 0, 'the late reply is dropped')
  assert.equal(of('TASK_FETCH_FAILURE').length, 1)
  const already = new AbortController()
  already.abort()
  const before = ws.last.sent.length
  const none = await dispatch({ type: 'TASK_FETCH_REQUEST', payload: { id: '2' }, meta: { signal: already.signal } })
  assert.equal(none.payload.code, 'aborted')
  assert.equal(ws.last.sent.length, before, 'an already aborted request is not sent')
})

test('aborting a request that went over REST cuts its fetch short too', async t => {
  const { ws, dispatch, api } = setup(t, {}, never)
  ws.last.drop(1006)
  const abort = new AbortController()
  const pending = dispatch({ type: 'TASKS_FETCH_REQUEST', meta: { signal: abort.signal } })
  await until(() => api.calls.length === 1, 'the REST call')
  abort.abort()
  assert.equal((await pending).payload.code, 'aborted')
  assert.equal(api.calls[0].signal.aborted, true)
})

test('autoConnect: false connects on connect(); no WebSocket is needed until then', async t => {
  const bridge = createPatchbay({ url: 'ws://x.test/ws', apiUrl: API, manifest: MANIFEST, WebSocket: undefined, autoConnect: false, fetch: async () => json({ ok: true }) })
  t.after(() => bridge.close())
  assert.equal(bridge.status, 'idle')
  const reply = await bridge.request('TASKS_FETCH_REQUEST', {})
  assert.deepEqual(reply.payload, { ok: true }, 'requests go over REST meanwhile')
  assert.throws(() => bridge.connect(), /no WebSocket/)
  const ws = fakeSockets()
  const later = createPatchbay({ url: 'ws://x.test/ws', apiUrl: API, WebSocket: ws.FakeWebSocket, autoConnect: false, diagnose: false })
  t.after(() => later.close())
  assert.equal(ws.sockets.length, 0)
  later.connect()
  later.connect()
  assert.equal(ws.sockets.length, 1, 'connect() is idempotent')
})

test('bridge.request: the request skips the store, its reply is returned and dispatched; an unknown type fails at once', async t => {
  const { ws, bridge, of } = setup(t)
  ws.last.accept()
  const pending = bridge.request('TASK_FETCH_REQUEST', { id: '3' })
  ws.last.succeed('TASK_FETCH_REQUEST', { id: '3' })
  assert.deepEqual(await pending.unwrap(), { id: '3' })
  assert.equal(of('TASK_FETCH_REQUEST').length, 0)
  assert.equal(of('TASK_FETCH_SUCCESS').length, 1)
  const unknown = await bridge.request('TASKZ_FETCH_REQUEST', {})
  assert.equal(unknown.payload.code, 'unknown_action')
})

test('a *_REQUEST not in the manifest is warned about once, and still reaches the reducers', async t => {
  const { dispatch, of } = setup(t)
  const warnings = []
  t.mock.method(console, 'warn', message => warnings.push(message))
  dispatch({ type: 'TASKZ_FETCH_REQUEST' })
  dispatch({ type: 'TASKZ_FETCH_REQUEST' })
  assert.equal(of('TASKZ_FETCH_REQUEST').length, 2)
  assert.equal(warnings.length, 1)
  assert.match(warnings[0], /TASKZ_FETCH_REQUEST is not in the manifest/)
})

// --- Redux Toolkit Query and generated types ---------------------------------------------------

test('RTK Query over the bridge: queries over the socket, over REST while it is down, pushes patch the cache', async t => {
  const ws = fakeSockets()
  const api = fakeFetch(call => json({ notes: [{ id: 'r', text: 'over rest' }] }))
  const bridge = createPatchbay({ url: 'ws://patchbay.test/ws', apiUrl: API, manifest: { NOTES_FETCH: { http: { method: 'GET', path: '/notes' } } }, WebSocket: ws.FakeWebSocket, fetch: api.fetch, transport: 'websocket', diagnose: false, minBackoffMs: 5, maxBackoffMs: 20, connectWaitMs: 0 })
  t.after(() => bridge.close())
  const notesApi = createApi({
    reducerPath: 'notesApi',
    baseQuery: patchbayBaseQuery(bridge),
    endpoints: build => ({ notes: build.query({ query: () => ({ type: 'NOTES_FETCH_REQUEST', payload: {} }) }) })
  })
  // A push (NOTE_ADDED) puts the note into the cached list, as an app's listener would.
  const listener = createListenerMiddleware()
  listener.startListening({
    type: 'NOTE_ADDED',
    effect: (action, { dispatch }) => dispatch(notesApi.util.updateQueryData('notes', undefined, draft => { draft.notes.unshift(action.payload) }))
  })
  const store = configureStore({
    reducer: { [notesApi.reducerPath]: notesApi.reducer },
    middleware: getDefault => getDefault().prepend(bridge.middleware, listener.middleware).concat(notesApi.middleware)
  })
  ws.last.accept()
  const query = store.dispatch(notesApi.endpoints.notes.initiate())
  await until(() => ws.last.requests('NOTES_FETCH_REQUEST').length === 1, 'the query over the socket')
  ws.last.succeed('NOTES_FETCH_REQUEST', { notes: [{ id: 'a', text: 'first' }] })
  const first = await query
  assert.deepEqual(first.data, { notes: [{ id: 'a', text: 'first' }] })
  ws.last.receive({ type: 'NOTE_ADDED', payload: { id: 'b', text: 'pushed' }, meta: { room: 'notes' } })
  await until(() => notesApi.endpoints.notes.select()(store.getState()).data?.notes.length === 2, 'the push in the cache')
  // The socket goes down: a refetch goes to the API, and the query still succeeds.
  ws.last.drop(1006)
  const again = await store.dispatch(notesApi.endpoints.notes.initiate(undefined, { forceRefetch: true }))
  assert.deepEqual(again.data, { notes: [{ id: 'r', text: 'over rest' }] })
  assert.equal(api.calls.length, 1)
  assert.equal(api.calls[0].url, API + '/notes')
  query.unsubscribe()
})

test('RTK Query: a failure is the query\'s error with patchbay\'s code', async t => {
  const ws = fakeSockets()
  const bridge = createPatchbay({ url: 'ws://patchbay.test/ws', apiUrl: API, manifest: { TASK_FETCH: { http: { method: 'GET', path: '/tasks/{id}' } } }, WebSocket: ws.FakeWebSocket, fetch: async () => json({}), transport: 'websocket', diagnose: false })
  t.after(() => bridge.close())
  const tasksApi = createApi({ reducerPath: 'tasksApi', baseQuery: patchbayBaseQuery(bridge), endpoints: build => ({ task: build.query({ query: id => ({ type: 'TASK_FETCH_REQUEST', payload: { id } }) }) }) })
  const store = configureStore({ reducer: { [tasksApi.reducerPath]: tasksApi.reducer }, middleware: g => g().concat(tasksApi.middleware) })
  ws.last.accept()
  const query = store.dispatch(tasksApi.endpoints.task.initiate('9'))
  await until(() => ws.last.requests('TASK_FETCH_REQUEST').length === 1, 'the request')
  const request = ws.last.requests('TASK_FETCH_REQUEST')[0]
  assert.deepEqual(request.payload, { id: '9' })
  ws.last.receive({ type: 'TASK_FETCH_FAILURE', error: true, payload: { code: 'upstream_error', message: 'gone', status: 404 }, meta: { requestId: request.meta.requestId } })
  const result = await query
  assert.equal(result.error.code, 'upstream_error')
  assert.equal(result.error.status, 404)
  query.unsubscribe()
})

test('generated types: constants, creators, guards and Replies for every action, from the schemas', async () => {
  const text = await generateTypes({
    NOTE_ADD: { description: 'Add a note', http: { method: 'POST', path: '/notes' }, payload: { type: 'object', properties: { text: { type: 'string' } }, required: ['text'] }, response: { title: 'Note', type: 'object', properties: { id: { type: 'string' } }, required: ['id'] } },
    NOTES_FETCH: { http: { method: 'GET', path: '/notes' } }
  })
  assert.equal(pascal('NOTES_FETCH'), 'NotesFetch')
  for (const line of [
    'export const manifest = {',
    "export const NOTE_ADD_REQUEST = 'NOTE_ADD_REQUEST'",
    'export interface NoteAddPayload {',
    'text: string',
    'export interface NoteAddResponse {',
    'export type NotesFetchResponse = unknown',
    '/** Add a note */',
    'export const noteAdd = (payload: NoteAddPayload, meta?: RequestMeta): NoteAddRequestAction =>',
    'export const notesFetch = (payload?: NotesFetchPayload',
    'export const isNoteAddSuccess = (action: unknown): action is NoteAddSuccessAction =>',
    '  NOTE_ADD: NoteAddResponse',
    'export type AppPatchbayDispatch = PatchbayDispatch<typeof manifest, Replies>'
  ]) assert.ok(text.includes(line), `missing: ${line}\n${text}`)
  await assert.rejects(generateTypes({ 'bad name': {} }), /not an action name/)
  await assert.rejects(generateTypes([]), /JSON object/)
})

test('generated types from awkward schemas still compile under tsc --strict', async t => {
  const { mkdtemp, writeFile, rm } = await import('node:fs/promises')
  const { execFile } = await import('node:child_process')
  const { promisify } = await import('node:util')
  const shared = { title: 'Shared', type: 'object', properties: { id: { type: 'string' } }, required: ['id'] }
  const manifest = {
    // A reserved word, a root $id and title, an enum, a title two actions share.
    DELETE: { http: { method: 'DELETE', path: '/x' }, payload: { $id: 'https://x.test/del', title: 'Gone', type: 'object', properties: { kind: { enum: ['a', 'b'] } } }, response: { type: 'object', properties: { item: shared } } },
    ITEM_GET: { http: { method: 'GET', path: '/x' }, payload: true, response: shared },
    NOTHING: { http: { method: 'GET', path: '/n' }, payload: false, response: { type: 'array', items: { type: 'integer' } } },
    SCALAR: { http: { method: 'POST', path: '/s' }, payload: { type: 'string' } }
  }
  const text = await generateTypes(manifest)
  assert.equal(text.match(/export interface Shared /g)?.length, 1, 'the shared title is declared once')
  assert.match(text, /export const deleteRequest = /)
  assert.match(text, /export type NothingPayload = never/)
  await assert.rejects(generateTypes({ A_B: {}, A__B: {} }), /would both be named aB/)
  await assert.rejects(generateTypes({
    X: { payload: { type: 'object', properties: { a: { title: 'T', type: 'string' } } } },
    Y: { payload: { type: 'object', properties: { a: { title: 'T', type: 'number' } } } }
  }), /both declare a type T, differently/)
  // Compiled as an app would: strict, no skipped library check.
  const dir = await mkdtemp(new URL('./', import.meta.url).pathname + '.generated-')
  t.after(() => rm(dir, { recursive: true, force: true }))
  await writeFile(`${dir}/patchbay.ts`, text + `
const check: DeleteResponse = { item: { id: 'x' } }
const sure: Shared = check.item!
deleteRequest({ kind: 'a' })
// @ts-expect-error not one of the enum
deleteRequest({ kind: 'c' })
scalar('text')
void sure
`)
  await writeFile(`${dir}/tsconfig.json`, JSON.stringify({ compilerOptions: { strict: true, skipLibCheck: false, noEmit: true, target: 'es2022', module: 'esnext', moduleResolution: 'bundler', lib: ['es2022', 'dom'], types: [] }, include: ['patchbay.ts'] }))
  const tsc = new URL('../node_modules/.bin/tsc', import.meta.url).pathname
  await promisify(execFile)(tsc, ['-p', dir]).catch(e => { throw new Error(`${e.stdout}${e.stderr}`) })
})

// --- encoding helpers --------------------------------------------------------------------------

test('encode keeps only A-Z a-z 0-9 - . _ ~ and buildRequest follows the contract', () => {
  assert.equal(encode('AZaz09-._~'), 'AZaz09-._~')
  assert.equal(encode('a b+c/d?é😀'), 'a%20b%2Bc%2Fd%3F%C3%A9%F0%9F%98%80')
  assert.deepEqual(buildRequest({ method: 'GET', path: '/t/{id}' }, { id: 'x', b: [1, 2], a: false }), { method: 'GET', path: '/t/x?a=false&b=1&b=2', body: undefined })
  assert.deepEqual(buildRequest({ method: 'POST', path: '/t' }, [1, 2]), { method: 'POST', path: '/t', body: '[1,2]' })
  assert.throws(() => buildRequest({ method: 'DELETE', path: '/t' }, [1]))
})
