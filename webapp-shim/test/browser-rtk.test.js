// A Redux Toolkit + RTK Query app as a webapp developer builds one (test/rtk-app): installed
// with the shim, its types generated from patchbay's manifests by `patchbay-shim types`,
// type-checked strictly and built with Vite, then served from its own origin and driven in
// headless Chromium against the demo (`--allow-origin`): notes over the socket, over REST while
// patchbay is stopped (the app's own origin calling the API with CORS), and over the socket
// again once it is back.
//
// Needs the npm registry (the app's dependencies are installed into a scratch copy).

import { test } from 'node:test'
import assert from 'node:assert/strict'
import { createServer } from 'node:http'
import { cp, mkdtemp, readFile, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { dirname, extname, join, normalize, resolve } from 'node:path'
import { fileURLToPath } from 'node:url'
import { freePort, sh, startDemo, WAIT_MS } from './support/stack.js'
import { openBrowser } from './support/chromium.js'

const shimDir = resolve(dirname(fileURLToPath(import.meta.url)), '..')
const appDir = join(shimDir, 'test', 'rtk-app')
const manifestDir = resolve(shimDir, '..', 'actions')


/** Installs, generates the types, type-checks and builds the app in a scratch copy: its `dist`. */
async function buildApp (t) {
  const dir = await mkdtemp(join(tmpdir(), 'patchbay-rtk-app-'))
  t.after(() => rm(dir, { recursive: true, force: true }))
  await cp(appDir, dir, { recursive: true, filter: source => !source.includes('node_modules') && !source.endsWith('dist') })
  await sh(dir, 'npm', ['install'])
  await sh(dir, 'npm', ['install', '--install-links', shimDir])
  const bin = join(dir, 'node_modules', '.bin')
  await sh(dir, join(bin, 'patchbay-shim'), ['types', '--actions', manifestDir, '--out', join('src', 'patchbay.ts')])
  await sh(dir, join(bin, 'tsc'), ['-p', '.'])
  await sh(dir, join(bin, 'vite'), ['build', '--logLevel', 'warn'])
  return join(dir, 'dist')
}

const TYPES = { '.html': 'text/html; charset=utf-8', '.js': 'text/javascript; charset=utf-8', '.css': 'text/css' }

/** Serves `dist` on `port`, as any static host would. */
async function serve (t, dist, port) {
  const server = createServer(async (req, res) => {
    const path = normalize(decodeURIComponent(new URL(req.url, 'http://x').pathname)).replace(/^(\.\.[/\\])+/, '')
    const file = join(dist, path === '/' ? 'index.html' : path)
    try {
      const body = await readFile(file)
      res.writeHead(200, { 'content-type': TYPES[extname(file)] ?? 'application/octet-stream' })
      res.end(body)
    } catch {
      res.writeHead(404)
      res.end()
    }
  })
  await new Promise(resolve => server.listen(port, '127.0.0.1', resolve))
  t.after(() => new Promise(resolve => {
    server.close(resolve)
    server.closeAllConnections()
  }))
}

test('an RTK Query app built with Vite on its own origin: over the socket, over REST while patchbay is stopped, and back', { timeout: 600000 }, async t => {
  const dist = await buildApp(t)
  const port = await freePort()
  const origin = `http://127.0.0.1:${port}`
  await serve(t, dist, port)
  const demo = await startDemo(['--allow-origin', origin])
  t.after(() => demo.stop())
  const { page } = await openBrowser(t, { timeoutMs: WAIT_MS })
  const status = s => page.locator(`#status[data-status="${s}"]`).waitFor()
  const note = text => page.locator('#notes li', { hasText: text })
  const count = async which => Number(await page.locator(`#via-${which}`).textContent())
  /** Adds a note (with the RTK Query mutation, or with `dispatch(noteAdd(…))`) and waits
   *  until its reply came back: which way it went, by the bridge's counts. */
  const addAndSee = async (text, button = '#send') => {
    const before = { socket: await count('socket'), rest: await count('rest') }
    await page.fill('#text', text)
    await page.click(button)
    await page.locator('#last-added', { hasText: text }).waitFor()
    assert.equal(await page.locator('#error').textContent(), '')
    const after = { socket: await count('socket'), rest: await count('rest') }
    return after.socket > before.socket && after.rest === before.rest ? 'socket' : after.rest > before.rest && after.socket === before.socket ? 'rest' : JSON.stringify({ before, after })
  }
  try {
    await page.goto(`${origin}/?ws=${encodeURIComponent(demo.wsUrl)}&api=${encodeURIComponent(demo.apiUrl)}`)
    await status('open')

    // Over the socket: the mutation's reply, then the push patches the cached list.
    assert.equal(await addAndSee('over the socket'), 'socket')
    await note('over the socket').waitFor()
    await page.locator('#notes li[data-mine="true"]', { hasText: 'over the socket' }).waitFor()

    // patchbay stopped: the app says why, and RTK Query goes to the API from the app's origin.
    await demo.control('stop')
    await status('fallback')
    await page.locator('#reason', { hasText: 'unreachable' }).waitFor()
    assert.equal(await addAndSee('over rest'), 'rest')
    await page.click('#refetch')
    await note('over rest').waitFor()

    // patchbay back: the socket reopens and carries the next request, typed dispatch this time.
    await demo.control('start')
    await status('open')
    assert.equal(await addAndSee('back on the socket', '#quick'), 'socket')
    await note('back on the socket').waitFor()
  } catch (e) {
    e.message += `\n${demo.output()}`
    throw e
  }
})
