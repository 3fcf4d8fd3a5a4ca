// The real thing for the shim's integration and browser tests: the compiled `patchbay` binary
// in front of the demo's REST API (the demo binary with `--no-bridge`, which also serves the
// demo page), on free ports of 127.0.0.1. Every child process is killed when the test ends,
// whether it passed or not, and even when the test runner itself exits early.

import { spawn } from 'node:child_process'
import { existsSync } from 'node:fs'
import { createServer } from 'node:net'
import { tmpdir } from 'node:os'
import { dirname, join, resolve } from 'node:path'
import { randomBytes } from 'node:crypto'
import { fileURLToPath } from 'node:url'

export const repoRoot = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..', '..')

/** The longest any single start-up or state change may take before a test fails. */
export const WAIT_MS = 15000

const exe = process.platform === 'win32' ? '.exe' : ''
export const binaries = {
  patchbay: join(repoRoot, 'target', 'debug', `patchbay${exe}`),
  demo: join(repoRoot, 'target', 'debug', 'examples', `demo${exe}`)
}

/** Fails with what to do when the Rust binaries have not been built. */
export function requireBinaries () {
  const missing = Object.values(binaries).filter(p => !existsSync(p))
  if (missing.length > 0) {
    throw new Error(`missing ${missing.join(' and ')}: build them first with ` +
      '`cargo build --bins --examples` in the repository root (scripts/test.sh does)')
  }
}

/** A port that was free a moment ago (the OS picks it). */
export function freePort () {
  return new Promise((resolve, reject) => {
    const server = createServer()
    server.unref()
    server.on('error', reject)
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address()
      server.close(() => resolve(port))
    })
  })
}

/**
 * Polls `check` until it returns something truthy, for at most `timeoutMs`.
 * `what` (a string, or a function called on timeout) names what was awaited.
 */
export async function waitFor (check, { what, timeoutMs = WAIT_MS, everyMs = 25 } = {}) {
  const deadline = Date.now() + timeoutMs
  for (;;) {
    const value = await check()
    if (value) return value
    if (Date.now() > deadline) {
      const label = typeof what === 'function' ? what() : what
      throw new Error(`timed out after ${timeoutMs} ms waiting for ${label ?? 'a condition'}`)
    }
    await new Promise(resolve => setTimeout(resolve, everyMs))
  }
}

const children = new Set()
// A test that throws, or a runner that exits or is interrupted, must not leave servers behind.
const killAll = () => {
  for (const child of children) child.kill('SIGKILL')
}
process.on('exit', killAll)
for (const signal of ['SIGINT', 'SIGTERM', 'SIGHUP']) {
  process.once(signal, () => {
    killAll()
    // The default action, now that the handler is gone: exit by this signal.
    process.kill(process.pid, signal)
  })
}

/** The environment of a child: ours, minus any PATCHBAY_* setting that would change it. */
function childEnv (extra) {
  const env = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith('PATCHBAY_')))
  return { ...env, ...extra }
}

/**
 * Spawns a program and waits until its output matches `ready`.
 * @returns {Promise<{child, match: RegExpMatchArray, output: () => string, kill: (signal?: string) => Promise<void>}>}
 */
export async function launch (name, file, args, { env, ready }) {
  // A scratch working directory: patchbay would load a developer's ./.env from its own.
  const child = spawn(file, args, { cwd: tmpdir(), env: childEnv(env), stdio: ['ignore', 'pipe', 'pipe'] })
  children.add(child)
  let output = ''
  let exited = null
  const exit = new Promise(resolve => {
    const gone = (code, signal) => {
      children.delete(child)
      exited ??= { code, signal }
      resolve()
    }
    child.once('exit', gone)
    // A program that cannot be started emits no 'exit', only this.
    child.once('error', e => {
      output += `\n[${name} could not start: ${e.message}]`
      gone(null, null)
    })
  })
  const proc = {
    child,
    name,
    match: null,
    output: () => `--- ${name} output\n${output}`,
    async kill (signal = 'SIGKILL') {
      if (exited === null) child.kill(signal)
      await exit
    }
  }
  for (const stream of [child.stdout, child.stderr]) {
    stream.setEncoding('utf8')
    stream.on('data', chunk => { output += chunk })
  }
  try {
    proc.match = await waitFor(() => {
      if (exited !== null) throw new Error(`${name} exited (${exited.signal ?? exited.code}) before it was ready`)
      return output.match(ready)
    }, { what: `${name} to start` })
  } catch (e) {
    await proc.kill()
    e.message += `\n${proc.output()}`
    throw e
  }
  return proc
}

/**
 * patchbay and the demo API, wired to each other:
 *
 * - `apiUrl`: the REST API, which also serves the demo page at `/` and the manifests at `/actions`
 * - `wsUrl`: patchbay's websocket
 * - `killPatchbay()`: SIGKILL, as when the machine or the process dies, and wait until it is gone
 * - `startPatchbay()`: start it again on the same port, with the same room secret
 * - `stop()`: kill everything
 *
 * With `{ redis: true }` it runs a private `redis-server` as patchbay's bus and history, and a
 * second patchbay instance on it (`publishAddr`) that stays up while the first is killed.
 */
export async function startStack ({ redis: withRedis = false } = {}) {
  requireBinaries()
  // patchbay's port is chosen first: the API must know where to publish progress, and a
  // restarted patchbay must come back on the same address for clients to reconnect.
  const port = await freePort()
  const bridgeAddr = `127.0.0.1:${port}`
  const publishToken = randomBytes(16).toString('hex')
  // The demo signs its visitors' tokens with it; patchbay verifies them.
  const jwtSecret = randomBytes(32).toString('hex')
  const api = await launch('demo API', binaries.demo,
    ['--no-bridge', '--api-listen', '127.0.0.1:0', '--bridge-addr', bridgeAddr, '--publish-token', publishToken],
    { env: { PATCHBAY_LOG: 'warn', PATCHBAY_JWT_SECRET: jwtSecret }, ready: /open (http:\/\/127\.0\.0\.1:\d+)\/ in a browser/ })
  const apiUrl = api.match[1]
  const env = {
    PATCHBAY_LISTEN: bridgeAddr,
    PATCHBAY_API_URL: apiUrl,
    PATCHBAY_ACTIONS: join(repoRoot, 'actions'),
    PATCHBAY_PUBLISH_TOKEN: publishToken,
    // The same secret after a restart keeps room tokens valid, so clients rejoin their rooms.
    PATCHBAY_ROOM_SECRET: randomBytes(32).toString('hex'),
    // The demo page is served by the API, on another port than patchbay.
    PATCHBAY_ALLOWED_ORIGINS: apiUrl,
    // The demo page's visitors (tests connect anonymously) and who watches which task.
    PATCHBAY_JWT_SECRET: jwtSecret,
    PATCHBAY_ALLOW_ANONYMOUS: 'true',
    PATCHBAY_PRESENCE_ROOMS: 'watch:*',
    // Rooms any connection may join that keep history, for the recovery tests.
    PATCHBAY_PUBLIC_ROOMS: 'feed:*,watch:*',
    PATCHBAY_HISTORY_ROOMS: 'task:*,user:*,feed:*',
    PATCHBAY_LOG: 'info'
  }
  let redis = null
  if (withRedis) {
    const port = await freePort()
    redis = await launch('redis-server', 'redis-server',
      ['--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no'],
      { env: {}, ready: /Ready to accept connections/ })
    env.PATCHBAY_REDIS_URL = `redis://127.0.0.1:${port}`
  }
  let patchbay = null
  let second = null
  const logs = []
  const stack = {
    apiUrl,
    wsUrl: `ws://${bridgeAddr}/ws`,
    bridgeAddr,
    publishToken,
    /** The second instance's address, with `{ redis: true }`. */
    publishAddr: null,
    async startPatchbay () {
      if (patchbay) throw new Error('patchbay is already running')
      patchbay = await launch('patchbay', binaries.patchbay, [], { env, ready: /listening on (\S+)/ })
      logs.push(patchbay)
      if (patchbay.match[1] !== bridgeAddr) throw new Error(`patchbay listens on ${patchbay.match[1]}, not ${bridgeAddr}`)
    },
    async killPatchbay () {
      const p = patchbay
      patchbay = null
      await p?.kill('SIGKILL')
    },
    /** Every process's output so far, for failure messages. */
    output: () => [api, ...logs, ...(redis ? [redis] : [])].map(p => p.output()).join('\n'),
    async stop () {
      await Promise.all([api.kill(), patchbay?.kill(), second?.kill()])
      await redis?.kill()
      patchbay = null
    }
  }
  try {
    await stack.startPatchbay()
    if (withRedis) {
      second = await launch('patchbay (second instance)', binaries.patchbay, [],
        { env: { ...env, PATCHBAY_LISTEN: '127.0.0.1:0' }, ready: /listening on (\S+)/ })
      logs.push(second)
      stack.publishAddr = second.match[1]
    }
  } catch (e) {
    await stack.stop()
    throw e
  }
  return stack
}

/**
 * The whole demo as a user runs it (`cargo run --example demo`): patchbay in-process, which
 * the page's buttons (and `control('stop' | 'start')`) stop and start, behind the API and the
 * page; on free ports. `args` are more of the demo's arguments, such as `--redis`.
 */
export async function startDemo (args = []) {
  requireBinaries()
  const demo = await launch('demo', binaries.demo, ['--api-listen', '127.0.0.1:0', ...args], {
    env: { PATCHBAY_LISTEN: '127.0.0.1:0', PATCHBAY_LOG: 'warn' },
    // Once its scripted client is done: stopping patchbay under it would fail the script.
    ready: /open (http:\/\/127\.0\.0\.1:\d+)\/ in a browser[\s\S]*patchbay +ws:\/\/(\S+)\/ws[\s\S]*Press ctrl-c to stop/
  })
  const apiUrl = demo.match[1]
  return {
    apiUrl,
    bridgeAddr: demo.match[2],
    wsUrl: `ws://${demo.match[2]}/ws`,
    output: demo.output,
    /** The demo's own stop and start of its patchbay, as the page's buttons do it. */
    async control (action) {
      const response = await fetch(`${apiUrl}/demo/patchbay/${action}`, {
        method: 'POST', headers: { 'Content-Type': 'application/json' }, body: '{}'
      })
      if (!response.ok) throw new Error(`${action} answered ${response.status}: ${await response.text()}`)
      return response.json()
    },
    /** SIGTERM, so that it stops its redis-server and workers too; SIGKILL if it hangs. */
    async stop () {
      const killer = setTimeout(() => demo.child.kill('SIGKILL'), WAIT_MS)
      await demo.kill('SIGTERM')
      clearTimeout(killer)
    }
  }
}

/** Runs `command` with `args` in `cwd` (npm quiet about audits and funding): its output, or an
 *  error that carries it. */
export async function sh (cwd, command, args, { timeoutMs = 300000 } = {}) {
  const { execFile } = await import('node:child_process')
  const { promisify } = await import('node:util')
  try {
    return await promisify(execFile)(command, args, { cwd, timeout: timeoutMs, maxBuffer: 16 << 20, env: { ...process.env, npm_config_audit: 'false', npm_config_fund: 'false', npm_config_update_notifier: 'false' } })
  } catch (e) {
    throw new Error(`${command} ${args.join(' ')} failed in ${cwd}:\n${e.stdout}\n${e.stderr}`)
  }
}
