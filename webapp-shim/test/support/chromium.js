// Finds a Chromium to drive with playwright-core (which brings no browser of its own).

import { accessSync, constants } from 'node:fs'
import { mkdtemp, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { delimiter, join } from 'node:path'

const NAMES = ['chromium', 'chromium-browser', 'google-chrome', 'google-chrome-stable']

function executable (path) {
  try {
    accessSync(path, constants.X_OK)
    return true
  } catch {
    return false
  }
}

/**
 * `$CHROMIUM` when set, else the distribution's chromium, else the first of the usual names
 * on PATH. Throws how to install one when there is none: a browser test must never pass by
 * not running.
 */
export function findChromium () {
  const chosen = process.env.CHROMIUM
  if (chosen) {
    if (executable(chosen)) return chosen
    throw new Error(`CHROMIUM=${chosen} is not an executable file`)
  }
  const candidates = ['/usr/bin/chromium', ...NAMES.flatMap(name =>
    (process.env.PATH ?? '').split(delimiter).filter(Boolean).map(dir => join(dir, name)))]
  const found = candidates.find(executable)
  if (found) return found
  throw new Error('no Chromium found (looked for $CHROMIUM, then ' + NAMES.join(', ') + ' on PATH). ' +
    'Install it, for example with `apt-get install chromium` on Debian or `apt-get install ' +
    'chromium-browser` on Ubuntu, or point CHROMIUM at a Chromium or Chrome executable.')
}

/** Flags for a headless browser in a container or CI: no sandbox, no GPU, no calls home. */
export const CHROMIUM_ARGS = [
  '--no-sandbox',
  '--headless',
  '--disable-gpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync'
]

/**
 * A headless Chromium with a fresh profile, closed (and the profile removed) after the test.
 * `explain(error)` adds a screenshot (kept in a temporary directory) and the browser console
 * to a failure.
 */
export async function openBrowser (t, { timeoutMs }) {
  const { chromium } = await import('playwright-core')
  const executablePath = findChromium()
  const profile = await mkdtemp(join(tmpdir(), 'patchbay-browser-'))
  let context = null
  // One hook, in this order: the browser writes to its profile until it has exited.
  t.after(async () => {
    await context?.close().catch(() => {})
    await rm(profile, { recursive: true, force: true, maxRetries: 5, retryDelay: 100 })
  })
  context = await chromium.launchPersistentContext(profile, {
    executablePath,
    args: CHROMIUM_ARGS,
    headless: true,
    timeout: timeoutMs
  })
  const page = context.pages()[0] ?? await context.newPage()
  page.setDefaultTimeout(timeoutMs)
  const errors = []
  const console = []
  page.on('pageerror', e => errors.push(e))
  page.on('console', m => console.push(`${m.type()}: ${m.text()}`))
  return {
    page,
    /** Uncaught exceptions of the page so far. */
    errors,
    async explain (error) {
      const dir = await mkdtemp(join(tmpdir(), 'patchbay-browser-failure-'))
      const shot = join(dir, 'page.png')
      const taken = await page.screenshot({ path: shot, fullPage: true }).then(() => true, () => false)
      error.message += `\n${taken ? `screenshot: ${shot}` : 'no screenshot could be taken'}` +
        `\n--- browser console\n${console.join('\n')}`
      return error
    }
  }
}
