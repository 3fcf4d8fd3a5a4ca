// The demo page: a redux-style store whose requests travel through the patchbay shim, over
// the websocket while patchbay is up and straight to the REST API while it is down.
// Plain ES modules, no build step: the demo server serves the shim at /shim/.

import { createPatchbay } from '/shim/index.js'

const FINAL = ['succeeded', 'cancelled', 'failed']
const LOG_SIZE = 40

/**
 * The part of redux this page needs: reducer, subscribers and middleware with the same
 * `store => next => action` signature, so the shim's middleware plugs in unchanged.
 */
function createStore (reducer, middlewares) {
  let state = reducer(undefined, { type: '@@demo/INIT' })
  const listeners = new Set()
  let dispatch = action => {
    state = reducer(state, action)
    for (const listener of listeners) listener()
    return action
  }
  const api = { getState: () => state, dispatch: action => dispatch(action) }
  dispatch = middlewares.map(m => m(api)).reduceRight((next, m) => m(next), dispatch)
  return { ...api, subscribe (listener) { listeners.add(listener); return () => listeners.delete(listener) } }
}

/** A v4 uuid: request ids double as the API's Idempotency-Key. Works outside secure contexts. */
function uuid () {
  const b = crypto.getRandomValues(new Uint8Array(16))
  b[6] = (b[6] & 0x0f) | 0x40
  b[8] = (b[8] & 0x3f) | 0x80
  const h = [...b].map(x => x.toString(16).padStart(2, '0')).join('')
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`
}

const request = (name, payload) => ({ type: `${name}_REQUEST`, payload, meta: { requestId: uuid() } })

// --- state ---------------------------------------------------------------------------------

const initial = { status: 'connecting', transport: null, order: [], tasks: {}, notes: [], presence: {} }

const isFinal = task => FINAL.includes(task?.status)

/**
 * Keeps the newest state of a task: the reply to an enqueue, the snapshot on joining its room
 * and the pushes may arrive in any order. A final state is never replaced.
 */
function upsert (state, task) {
  if (!task || typeof task.id !== 'string') return state
  const known = state.tasks[task.id]
  if (known && (isFinal(known) || (!isFinal(task) && task.updatedAt < known.updatedAt))) return state
  const order = known ? state.order : [...state.order, task.id]
  return { ...state, order, tasks: { ...state.tasks, [task.id]: task } }
}

function addNote (state, note) {
  if (!note || typeof note.id !== 'string' || state.notes.some(n => n.id === note.id)) return state
  const notes = [...state.notes, note].sort((a, b) => (a.createdAt < b.createdAt ? 1 : -1)).slice(0, 50)
  return { ...state, notes }
}

/** Who is in each watch room: the snapshot of a join, then the newer events (the shim drops
 *  the stale ones). */
function presence (rooms, { type, payload }) {
  const room = payload?.room
  const users = { ...rooms[room] }
  switch (type) {
    case '@@patchbay/PRESENCE_SNAPSHOT':
      return { ...rooms, [room]: Object.fromEntries(payload.users.map(u => [u.userId, u.state ?? {}])) }
    case '@@patchbay/PRESENCE_JOIN':
    case '@@patchbay/PRESENCE_STATE':
      users[payload.userId] = payload.state ?? {}
      return { ...rooms, [room]: users }
    case '@@patchbay/PRESENCE_LEAVE':
      delete users[payload.userId]
      return { ...rooms, [room]: users }
    default:
      return rooms
  }
}

function reducer (state = initial, action) {
  if (action.type.startsWith('@@patchbay/PRESENCE_') && !action.type.startsWith('@@patchbay/PRESENCE_SET')) {
    return { ...state, presence: presence(state.presence, action) }
  }
  switch (action.type) {
    case '@@patchbay/STATUS':
      return { ...state, status: action.payload.status, transport: action.payload.transport ?? null, reason: action.payload.reason ?? null }
    case 'TASKS_FETCH_SUCCESS':
      // Newest first: add the oldest first, so that new rows end up on top.
      return [...(action.payload?.tasks ?? [])].reverse().reduce(upsert, state)
    case 'TASK_ENQUEUE_SUCCESS':
    case 'TASK_FETCH_SUCCESS':
    case 'TASK_CANCEL_SUCCESS':
    case 'TASK_PROGRESS':
      return upsert(state, action.payload)
    case 'demo/TASK_GONE': {
      // The embedded queue lives in patchbay's memory: a restart forgets its tasks.
      const task = state.tasks[action.payload.id]
      if (!task || isFinal(task)) return state
      return { ...state, tasks: { ...state.tasks, [task.id]: { ...task, status: 'gone', progress: { ...task.progress, message: 'patchbay restarted, and its embedded queue with it' } } } }
    }
    case 'NOTES_FETCH_SUCCESS':
      return (action.payload?.notes ?? []).reduce(addNote, state)
    case 'NOTE_ADD_SUCCESS':
    case 'NOTE_ADDED':
      return addNote(state, action.payload)
    default:
      return state
  }
}

// --- the log of actions and how requests travelled -----------------------------------------

const log = []
/** requestId → how the request left: 'socket', 'rest', or 'socket, then rest'. */
const travel = new Map()

function addLog (entry) {
  const last = log[0]
  // Progress of one task replaces its previous line, so the log stays readable.
  if (entry.key && last?.key === entry.key) log[0] = entry
  else log.unshift(entry)
  log.length = Math.min(log.length, LOG_SIZE)
}

const titleOf = task => task?.params?.title ?? task?.id

function describe (action) {
  const p = action.payload
  if (action.type === 'TASK_PROGRESS') return `${titleOf(p)}: ${p?.progress?.percent ?? 0}% ${p?.status ?? ''}`
  if (action.type === '@@patchbay/STATUS') return p?.reason ? `${p.status}: ${p.reason}` : p?.status
  if (action.error) return `${p?.code}${p?.status ? ` (${p.status})` : ''}: ${p?.message}`
  if (action.type.endsWith('_SUCCESS')) {
    if (p?.tasks) return `${p.tasks.length} tasks`
    if (p?.notes) return `${p.notes.length} notes`
    if (p?.queue) return `${titleOf(p)}: ${p.status}`
    if (p?.text) return p.text.slice(0, 80)
  }
  if (action.type === 'NOTE_ADDED') return p?.text?.slice(0, 80)
  return p === undefined ? '' : JSON.stringify(p).slice(0, 120)
}

/** Records every action, and for requests which way the shim sent them. */
const logger = bridge => () => next => action => {
  const id = action.meta?.requestId
  if (action.type.endsWith('_REQUEST')) {
    const before = { ...bridge.stats }
    const result = next(action) // the shim sends (or calls the API) synchronously
    // A request made while the first connection is still opening waits for it (briefly).
    // A task action in fallback is refused at once and goes nowhere.
    const via = bridge.stats.socket > before.socket ? 'socket' : bridge.stats.rest > before.rest ? 'rest' : bridge.status === 'fallback' ? 'not sent' : 'waiting'
    travel.set(id, via)
    addLog({ type: action.type, via, detail: describe(action) })
    return result
  }
  if (action.type === '@@patchbay/STATUS' && action.payload?.status === 'fallback') {
    // The shim re-sends what was pending on the lost socket to the API, same request id.
    for (const [pending, via] of travel) if (via === 'socket') travel.set(pending, 'socket, then rest')
  }
  let via = ''
  let key
  if (action.type === 'TASK_PROGRESS') {
    via = 'push'
    key = `progress:${action.payload?.id}`
  } else if (action.type === 'NOTE_ADDED') {
    via = 'push'
  } else if (id !== undefined && travel.has(id)) {
    via = travel.get(id)
    travel.delete(id)
    if (via === 'waiting') via = bridge.status === 'open' ? 'socket' : 'rest'
  }
  addLog({ type: action.type, via, key, detail: describe(action), error: !!action.error })
  return next(action)
}

// --- rendering -----------------------------------------------------------------------------

const $ = id => document.getElementById(id)

function h (tag, attrs = {}, ...children) {
  const el = document.createElement(tag)
  for (const [k, v] of Object.entries(attrs)) {
    if (k.startsWith('on')) el.addEventListener(k.slice(2), v)
    else el.setAttribute(k, v)
  }
  el.append(...children)
  return el
}

/** One list item per task, updated in place so that a button is never replaced mid-click. */
const rows = new Map()

function taskRow (task, cancel) {
  const title = titleOf(task)
  const fill = h('div', { class: 'fill' })
  const row = h('li', { class: 'task', 'data-task-id': task.id, 'data-title': title },
    h('span', { class: 'title' }, title, h('span', { class: 'state' })),
    h('div', { class: 'bar', role: 'progressbar', 'aria-valuemin': '0', 'aria-valuemax': '100', 'aria-label': `progress of ${title}` }, fill),
    h('span', { class: 'percent' }),
    h('button', { type: 'button', class: 'cancel', onclick: () => cancel(task.id) }, 'Cancel'),
    h('span', { class: 'viewers' }),
    h('a', { class: 'share', href: `/?watch=${encodeURIComponent(task.id)}`, target: '_blank', rel: 'noopener' }, 'watch link'))
  rows.set(task.id, row)
  return row
}

/** "watching: a, b (you)" from a watch room's presence. */
function viewersText (users, me) {
  const names = Object.keys(users ?? {}).sort().map(name => (name === me ? `${name} (you)` : name))
  return names.length ? `watching: ${names.join(', ')}` : ''
}

function renderTask (row, task) {
  const percent = Math.max(0, Math.min(100, Number(task.progress?.percent) || 0))
  row.dataset.status = task.status
  const detail = task.error?.message ?? task.progress?.message
  row.querySelector('.state').textContent = detail ? `${task.status}: ${detail}` : task.status
  row.querySelector('.bar').setAttribute('aria-valuenow', String(percent))
  row.querySelector('.fill').style.width = `${percent}%`
  row.querySelector('.percent').textContent = `${percent}%`
  row.querySelector('.cancel').disabled = isFinal(task) || task.status === 'gone'
}

function render (state, bridge, cancel, me) {
  const status = $('status')
  status.dataset.status = state.status
  status.dataset.transport = state.transport ?? ''
  status.textContent = state.status === 'open' && state.transport
    ? `open (${state.transport})`
    : state.status === 'fallback' && state.reason ? `fallback (${state.reason})` : state.status
  $('via-socket').textContent = String(bridge.stats.socket)
  $('via-rest').textContent = String(bridge.stats.rest)

  const list = $('tasks')
  for (const id of state.order) {
    const task = state.tasks[id]
    let row = rows.get(id)
    if (!row) list.prepend(row = taskRow(task, cancel))
    renderTask(row, task)
    row.querySelector('.viewers').textContent = viewersText(state.presence[`watch:${id}`], me)
  }
  // Tasks of others this page watches (opened through a watch link).
  const watched = Object.keys(state.presence)
    .map(room => room.slice('watch:'.length))
    .filter(id => !state.tasks[id])
  $('watching-section').hidden = watched.length === 0
  $('watching').replaceChildren(...watched.map(id => {
    const users = state.presence[`watch:${id}`]
    const owner = Object.values(users ?? {}).find(u => u.owner)
    return h('li', { class: 'watched', 'data-task-id': id },
      h('strong', {}, owner?.title ?? id), ' ', h('span', { class: 'viewers' }, viewersText(users, me)))
  }))
  $('no-tasks').hidden = state.order.length > 0

  $('notes').replaceChildren(...state.notes.map(note => h('li', { class: 'note', 'data-note-id': note.id }, note.text)))
  $('no-notes').hidden = state.notes.length > 0

  $('log').replaceChildren(...log.map(entry => h('li', { 'data-type': entry.type, 'data-via': entry.via, class: entry.error ? 'error' : '' },
    h('span', { class: 'via', 'data-via': entry.via }, entry.via), ' ', h('strong', {}, entry.type), ' ', entry.detail ?? '')))
}

// --- start ---------------------------------------------------------------------------------

async function getJson (path, init) {
  const response = await fetch(path, init)
  if (!response.ok) throw new Error(`${path} answered ${response.status}`)
  return response.json()
}

async function main () {
  const [config, manifest] = await Promise.all([getJson('/demo/config'), getJson('/actions')])
  $('patchbay-url').textContent = config.patchbay
  // Each tab is a visitor with a name of its own, kept across reloads of the tab: patchbay
  // tells visitors apart by the token the demo signs for that name. Without one the page
  // connects anonymously (and nobody sees it watching).
  const me = sessionStorage.getItem('demo-visitor') ?? `visitor-${uuid().slice(0, 4)}`
  sessionStorage.setItem('demo-visitor', me)
  $('visitor').textContent = me
  const token = await getJson(`/demo/token/${me}`).then(t => t.token, () => null)
  // `?transport=websocket|sse|auto` forces the shim onto one transport; `?via=<host:port>`
  // (this machine only) reaches patchbay through a proxy, such as one that refuses websockets.
  const params = new URLSearchParams(location.search)
  const transport = ['websocket', 'sse', 'auto'].includes(params.get('transport')) ? params.get('transport') : 'auto'
  const patchbay = new URL(config.patchbay)
  const via = params.get('via')
  if (via && /^(127\.0\.0\.1|localhost):\d+$/.test(via)) patchbay.host = via
  $('patchbay-url').textContent = patchbay.toString()
  const url = token ? `${patchbay}?token=${encodeURIComponent(token)}` : patchbay.toString()

  const bridge = createPatchbay({
    url,
    apiUrl: location.origin,
    manifest,
    transport,
    requestTimeoutMs: 10000,
    // Short backoff: the demo is about watching the reconnect happen.
    minBackoffMs: 250,
    maxBackoffMs: 2000,
    pingMs: 10000,
    pongTimeoutMs: 5000
  })
  const store = createStore(reducer, [logger(bridge), bridge.middleware])
  // For people poking around in the devtools console.
  globalThis.demo = { store, bridge }

  const cancel = id => store.dispatch(request('TASK_CANCEL', { id }))
  const showError = (id, reply, what) => {
    const error = $(id)
    error.hidden = !reply?.error
    error.textContent = reply?.error ? `${what}: ${describe(reply)}` : ''
  }
  let queued = false
  store.subscribe(() => {
    if (queued) return
    queued = true
    requestAnimationFrame(() => {
      queued = false
      render(store.getState(), bridge, cancel, me)
    })
  })
  render(store.getState(), bridge, cancel, me)

  // Watching: this page is present in `watch:<id>` for each of its tasks (saying what the
  // task is, for the others) and for each task a watch link opened it for.
  const watching = new Set()
  const watch = async (id, own) => {
    if (watching.has(id)) return
    watching.add(id)
    const room = `watch:${id}`
    const joined = await store.dispatch(request('@@patchbay/SUBSCRIBE', { room }))
    const task = store.getState().tasks[id]
    if (own && !joined?.error) store.dispatch(request('@@patchbay/PRESENCE_SET', { room, state: { owner: true, title: titleOf(task) } }))
  }
  for (const id of new URLSearchParams(location.search).getAll('watch')) watch(id, false)
  store.subscribe(() => {
    for (const id of store.getState().order) watch(id, true)
  })

  $('task-form').addEventListener('submit', async event => {
    event.preventDefault()
    const title = $('title').value.trim()
    const steps = Number($('steps').value)
    showError('form-error', await store.dispatch(request('TASK_ENQUEUE', { title, steps })), 'Not started')
  })
  $('refresh').addEventListener('click', () => store.dispatch(request('TASKS_FETCH', {})))
  $('note-form').addEventListener('submit', async event => {
    event.preventDefault()
    const reply = await store.dispatch(request('NOTE_ADD', { text: $('note').value.trim() }))
    showError('note-error', reply, 'Not added')
    if (!reply?.error) $('note').value = ''
  })

  // Pushes are not kept for a socket that is down: after a reconnect, fetch what may have
  // changed meanwhile. A task the server no longer knows was in the embedded queue of a
  // patchbay that restarted.
  let lastStatus = null
  store.subscribe(() => {
    const state = store.getState()
    if (state.status === lastStatus) return
    // Set first: the requests below run this listener again.
    lastStatus = state.status
    if (state.status !== 'open' && state.status !== 'fallback') return
    store.dispatch(request('NOTES_FETCH', {}))
    if (state.status !== 'open') return
    for (const id of state.order.filter(id => !isFinal(state.tasks[id]) && state.tasks[id].status !== 'gone')) {
      store.dispatch(request('TASK_FETCH', { id })).then(reply => {
        if (reply?.error && reply.payload?.code === 'not_found') store.dispatch({ type: 'demo/TASK_GONE', payload: { id } })
      })
    }
  })

  if (config.controls) {
    $('controls').hidden = false
    const control = async (path, init) => {
      try {
        const state = await getJson(path, init)
        $('patchbay-state').textContent = state.running ? `running on ${state.addr}` : 'stopped'
      } catch (e) {
        $('patchbay-state').textContent = String(e.message)
      }
    }
    // A JSON content type: the server refuses these from other origins' pages.
    const post = { method: 'POST', headers: { 'Content-Type': 'application/json' }, body: '{}' }
    $('stop-patchbay').addEventListener('click', () => control('/demo/patchbay/stop', post))
    $('start-patchbay').addEventListener('click', () => control('/demo/patchbay/start', post))
    control('/demo/patchbay')
  }

}

main().catch(e => {
  const error = $('form-error')
  error.hidden = false
  error.textContent = `The demo could not start: ${e.message}`
})
