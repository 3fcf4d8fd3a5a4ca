// The shim installed each way an app can get it (a tarball from `npm pack`, a linked folder, a
// folder copied with --install-links, an npm workspace, pnpm) into a scratch TypeScript app
// with Redux Toolkit, and type-checked with `tsc --strict` and `skipLibCheck: false`: the
// declarations resolve however the shim is installed, and dispatch stays typed (the app holds
// `@ts-expect-error` lines that fail the check if anything turns into `any`).
//
// Each app also generates its types module from the manifests with the installed
// `patchbay-shim types` and type-checks typed requests, replies, matchers and an RTK Query API.
//
// Needs the npm registry (typescript, @reduxjs/toolkit, redux, json-schema-to-typescript and
// pnpm are installed into the scratch apps).

import { test } from 'node:test'
import assert from 'node:assert/strict'
import { cp, mkdir, mkdtemp, readdir, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { dirname, join, resolve } from 'node:path'
import { fileURLToPath } from 'node:url'
import { sh } from './support/stack.js'

const shimDir = resolve(dirname(fileURLToPath(import.meta.url)), '..')
const manifestDir = resolve(shimDir, '..', 'actions')
const DEPENDENCIES = { typescript: '^5.9.3', '@reduxjs/toolkit': '^2.11.2', redux: '^5.0.1', 'json-schema-to-typescript': '^16.0.0' }


const TSCONFIG = {
  compilerOptions: {
    strict: true,
    skipLibCheck: false,
    noEmit: true,
    target: 'es2022',
    module: 'esnext',
    moduleResolution: 'bundler',
    resolveJsonModule: true,
    lib: ['es2022', 'dom'],
    types: []
  },
  include: ['app.ts', 'typed.ts', 'patchbay.ts']
}

// What an app does with the shim; every line must type-check, and every `@ts-expect-error`
// must meet an error.
const APP = `
import { configureStore, legacy_createStore, applyMiddleware, type UnknownAction } from '@reduxjs/toolkit'
import { createPatchbay, unwrap, PatchbayError, type PatchbayDispatch, type ReplyAction, type StatusAction } from 'patchbay-webapp-shim'
import manifest from './actions.json'

export const bridge = createPatchbay({ url: 'ws://127.0.0.1:8080/ws', apiUrl: 'http://127.0.0.1:8000', manifest, autoConnect: false })
const reducer = (state: string[] = [], action: UnknownAction) => [...state, action.type]

const prepended = configureStore({ reducer, middleware: getDefault => getDefault().prepend(bridge.middleware) })
const concatenated = configureStore({ reducer, middleware: getDefault => getDefault().concat(bridge.middleware) })
const plain = legacy_createStore(reducer, applyMiddleware(bridge.middleware))

export type AppDispatch = PatchbayDispatch<typeof manifest> & typeof concatenated.dispatch

export async function run (): Promise<void> {
  for (const dispatch of [prepended.dispatch as AppDispatch, concatenated.dispatch as AppDispatch, plain.dispatch as PatchbayDispatch<typeof manifest> & typeof plain.dispatch]) {
    const reply = await dispatch({ type: 'NOTES_FETCH_REQUEST', payload: {} })
    const asAction: UnknownAction = reply
    const typed: ReplyAction = reply
    if (reply.error) {
      const code: string = reply.payload.code
      void code
    }
    const payload: unknown = await dispatch({ type: 'NOTE_ADD_REQUEST', payload: { text: 'hi' } }).unwrap()
    // @ts-expect-error a reply is not a number: dispatch is typed, not any
    const wrong: number = await dispatch({ type: 'NOTES_FETCH_REQUEST' })
    const other = dispatch({ type: 'SOMETHING_ELSE' })
    void [asAction, typed, payload, wrong, other]
  }
  const thunked: number = concatenated.dispatch(() => 42)
  const status: StatusAction = { type: '@@patchbay/STATUS', payload: { status: 'fallback', transport: 'websocket', reason: 'refused' } }
  const statusAsAction: UnknownAction = status
  try {
    await unwrap(bridge.request('NOTES_FETCH_REQUEST', {}, { signal: AbortSignal.timeout(1000) }))
  } catch (e) {
    if (e instanceof PatchbayError) console.log(e.code, e.status)
  }
  // @ts-expect-error not a request of the manifest
  bridge.request('NOTEZ_FETCH_REQUEST', {})
  const stop = bridge.subscribe(state => console.log(state.status, state.reason, state.socket))
  stop()
  void [thunked, statusAsAction]
}
`

// The same app with the module `patchbay-shim types` wrote from the manifests: typed
// creators, payloads and replies, matchers in a slice, and an RTK Query API over the bridge.
const TYPED = `
import { configureStore, createSlice, isAnyOf } from '@reduxjs/toolkit'
import { createApi } from '@reduxjs/toolkit/query'
import { createPatchbay, patchbayBaseQuery } from 'patchbay-webapp-shim'
import {
  manifest, notesFetch, noteAdd, isNotesFetchSuccess, isNoteAddSuccess, isNoteAddFailure, NOTE_ADD_SUCCESS,
  type AppPatchbayDispatch, type Note, type NotesFetchResponse, type NoteAddPayload
} from './patchbay'

const bridge = createPatchbay({ url: 'ws://127.0.0.1:8080/ws', apiUrl: 'http://127.0.0.1:8000', manifest, autoConnect: false })

export const notesApi = createApi({
  reducerPath: 'notesApi',
  baseQuery: patchbayBaseQuery(bridge),
  endpoints: build => ({
    notes: build.query<NotesFetchResponse, void>({ query: () => notesFetch() }),
    addNote: build.mutation<Note, NoteAddPayload>({ query: payload => noteAdd(payload) })
  })
})

const slice = createSlice({
  name: 'notes',
  initialState: { notes: [] as Note[], failed: 0 },
  reducers: {},
  extraReducers: builder => {
    builder.addMatcher(isNotesFetchSuccess, (state, action) => { state.notes = action.payload.notes })
    builder.addMatcher(isAnyOf(isNoteAddSuccess), (state, action) => { state.notes.unshift(action.payload) })
    builder.addMatcher(isNoteAddFailure, state => { state.failed++ })
  }
})

const store = configureStore({
  reducer: { notes: slice.reducer, [notesApi.reducerPath]: notesApi.reducer },
  middleware: getDefault => getDefault().concat(bridge.middleware, notesApi.middleware)
})
type AppDispatch = AppPatchbayDispatch & typeof store.dispatch
const dispatch = store.dispatch as AppDispatch

export async function typed (): Promise<void> {
  const reply = await dispatch(notesFetch())
  if (!reply.error) {
    const notes: Note[] = reply.payload.notes
    void notes
  }
  const note: Note = await dispatch(noteAdd({ text: 'hi' })).unwrap()
  const id: string = note.id
  // @ts-expect-error text must be a string
  noteAdd({ text: 5 })
  // @ts-expect-error NOTE_ADD's payload is required
  noteAdd()
  // @ts-expect-error a note has no title
  void note.title
  const constant: 'NOTE_ADD_SUCCESS' = NOTE_ADD_SUCCESS
  void store.dispatch(notesApi.endpoints.notes.initiate())
  void [id, constant]
}
`

/** A scratch app in `dir`, depending on the shim as `shim` says. */
async function scratchApp (dir, shim) {
  await mkdir(dir, { recursive: true })
  const pkg = { name: 'scratch-app', private: true, type: 'module', dependencies: { ...DEPENDENCIES, ...(shim ? { 'patchbay-webapp-shim': shim } : {}) } }
  await writeFile(join(dir, 'package.json'), JSON.stringify(pkg, null, 2))
  await writeFile(join(dir, 'tsconfig.json'), JSON.stringify(TSCONFIG, null, 2))
  await writeFile(join(dir, 'app.ts'), APP)
  // The manifests merged, as an app bundles them.
  const { readFile } = await import('node:fs/promises')
  const merged = {}
  for (const file of (await readdir(manifestDir)).filter(f => f.endsWith('.json')).sort()) {
    Object.assign(merged, JSON.parse(await readFile(join(manifestDir, file), 'utf8')))
  }
  await writeFile(join(dir, 'actions.json'), JSON.stringify(merged, null, 2))
}

/** `tsc -p .` in `dir`, with the TypeScript installed there (or hoisted above it). */
async function typeCheck (dir, bin = join(dir, 'node_modules', '.bin')) {
  // The types module from the manifests, by the installed shim's own command.
  await writeFile(join(dir, 'typed.ts'), TYPED)
  await sh(dir, join(bin, 'patchbay-shim'), ['types', '--actions', manifestDir, '--out', 'patchbay.ts'])
  await sh(dir, join(bin, 'tsc'), ['-p', '.'])
}

test('the shim installs and type-checks strictly however an app gets it', { timeout: 600000 }, async t => {
  const root = await mkdtemp(join(tmpdir(), 'patchbay-shim-install-'))
  t.after(() => rm(root, { recursive: true, force: true }))
  const { stdout } = await sh(shimDir, 'npm', ['pack', '--silent', '--pack-destination', root])
  const tarball = join(root, stdout.trim().split('\n').at(-1))

  await t.test('a tarball from npm pack', async () => {
    const dir = join(root, 'tarball')
    await scratchApp(dir, `file:${tarball}`)
    await sh(dir, 'npm', ['install'])
    await typeCheck(dir)
  })

  await t.test('a linked folder (npm install path/to/webapp-shim)', async () => {
    const dir = join(root, 'linked')
    await scratchApp(dir, null)
    await sh(dir, 'npm', ['install'])
    await sh(dir, 'npm', ['install', shimDir])
    await typeCheck(dir)
  })

  await t.test('a copied folder (npm install --install-links path/to/webapp-shim)', async () => {
    const dir = join(root, 'copied')
    await scratchApp(dir, null)
    await sh(dir, 'npm', ['install'])
    await sh(dir, 'npm', ['install', '--install-links', shimDir])
    await typeCheck(dir)
  })

  await t.test('an npm workspace holding both', async () => {
    const dir = join(root, 'workspace')
    await mkdir(join(dir, 'packages'), { recursive: true })
    await writeFile(join(dir, 'package.json'), JSON.stringify({ name: 'monorepo', private: true, workspaces: ['packages/*'] }))
    for (const part of ['src', 'bin']) {
      await cp(join(shimDir, part), join(dir, 'packages', 'shim', part), { recursive: true })
    }
    await cp(join(shimDir, 'package.json'), join(dir, 'packages', 'shim', 'package.json'))
    await scratchApp(join(dir, 'packages', 'app'), '*')
    await sh(dir, 'npm', ['install'])
    await typeCheck(join(dir, 'packages', 'app'), join(dir, 'node_modules', '.bin'))
  })

  await t.test('pnpm', async () => {
    const dir = join(root, 'pnpm')
    await scratchApp(dir, `file:${tarball}`)
    await sh(dir, 'npx', ['--yes', 'pnpm@9', 'install', '--config.auto-install-peers=true'])
    await typeCheck(dir)
  })

  assert.ok(tarball.endsWith('.tgz'))
})
