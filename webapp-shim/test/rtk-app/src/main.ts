// A webapp as the shim's README builds one: Redux Toolkit, an RTK Query API over the bridge,
// the types generated from patchbay's manifests (src/patchbay.ts, written by
// `patchbay-shim types`), a slice fed by the generated matchers, and pushes patching the
// query cache. `?ws=` and `?api=` say where patchbay and the REST API are.

import { configureStore, createListenerMiddleware, createSlice } from '@reduxjs/toolkit'
import { createApi } from '@reduxjs/toolkit/query'
import { createPatchbay, patchbayBaseQuery } from 'patchbay-webapp-shim'
import {
  manifest, notesFetch, noteAdd, isNoteAddSuccess, isNoteAddFailure,
  type AppPatchbayDispatch, type Note, type NoteAddPayload, type NotesFetchResponse
} from './patchbay'

const params = new URLSearchParams(location.search)
const bridge = createPatchbay({
  url: params.get('ws') ?? 'ws://127.0.0.1:8080/ws',
  apiUrl: params.get('api') ?? 'http://127.0.0.1:8000',
  manifest,
  minBackoffMs: 100,
  maxBackoffMs: 500
})

const notesApi = createApi({
  reducerPath: 'notesApi',
  baseQuery: patchbayBaseQuery(bridge),
  endpoints: build => ({
    notes: build.query<NotesFetchResponse, void>({ query: () => notesFetch() }),
    addNote: build.mutation<Note, NoteAddPayload>({ query: payload => noteAdd(payload) })
  })
})

/** What this tab added, from the generated matchers. */
const mine = createSlice({
  name: 'mine',
  initialState: { added: [] as string[], failed: 0 },
  reducers: {},
  extraReducers: builder => {
    builder.addMatcher(isNoteAddSuccess, (state, action) => { state.added.push(action.payload.id) })
    builder.addMatcher(isNoteAddFailure, state => { state.failed++ })
  }
})

const listener = createListenerMiddleware()

const store = configureStore({
  reducer: { mine: mine.reducer, [notesApi.reducerPath]: notesApi.reducer },
  middleware: getDefault => getDefault().prepend(bridge.middleware, listener.middleware).concat(notesApi.middleware)
})
type RootState = ReturnType<typeof store.getState>
type AppDispatch = AppPatchbayDispatch & typeof store.dispatch
const dispatch = store.dispatch as AppDispatch

/** A push of NOTE_ADDED (a server-fired action). */
const isNoteAdded = (action: { type: string }): action is { type: 'NOTE_ADDED', payload: Note } => action.type === 'NOTE_ADDED'

// A push (from anyone) goes into the cached list at once.
listener.startListening.withTypes<RootState, typeof store.dispatch>()({
  predicate: isNoteAdded,
  effect: (action, api) => {
    api.dispatch(notesApi.util.updateQueryData('notes', undefined, draft => {
      if (!draft.notes.some(n => n.id === action.payload.id)) draft.notes.unshift(action.payload)
    }))
  }
})

const $ = (id: string) => document.getElementById(id)!
const selectNotes = notesApi.endpoints.notes.select()

function render (): void {
  $('status').dataset.status = bridge.status
  $('status').textContent = bridge.status
  const notes = selectNotes(store.getState()).data?.notes ?? []
  const list = $('notes')
  list.replaceChildren(...notes.map(note => {
    const li = document.createElement('li')
    li.textContent = note.text
    li.dataset.id = note.id
    li.dataset.mine = String(store.getState().mine.added.includes(note.id))
    return li
  }))
}
store.subscribe(render)
bridge.subscribe(state => {
  render()
  $('reason').textContent = state.reason ?? ''
  $('via-socket').textContent = String(state.socket)
  $('via-rest').textContent = String(state.rest)
})

const notesQuery = dispatch(notesApi.endpoints.notes.initiate())
$('refetch').addEventListener('click', () => { void notesQuery.refetch() })
$('add').addEventListener('submit', event => {
  event.preventDefault()
  const input = $('text') as HTMLInputElement
  const text = input.value
  input.value = ''
  void dispatch(notesApi.endpoints.addNote.initiate({ text })).unwrap()
    .then(added, failed)
})
// The same without RTK Query: the generated creator, and the typed reply of dispatch.
$('quick').addEventListener('click', () => {
  const input = $('text') as HTMLInputElement
  const text = input.value
  input.value = ''
  void dispatch(noteAdd({ text })).unwrap().then(added, failed)
})

function added (note: Note): void {
  $('error').textContent = ''
  $('last-added').textContent = note.text
}

function failed (e: { code?: string, message?: string }): void {
  $('error').textContent = `${e.code}: ${e.message}`
}
render()
