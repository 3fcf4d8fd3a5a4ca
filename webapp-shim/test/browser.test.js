// The demo page in headless Chromium: a task's progress fills its bar over the websocket and
// notes are pushed to the page; with the patchbay process killed, notes keep working over REST
// (others' notes by polling) and a new task fails with a clear message; with patchbay back the
// socket reopens and carries the next requests. Then the same outage with the demo's own stop
// and start buttons, on the embedded queue (a running task is forgotten, and the page says
// so) and over Redis (the running task goes on in its worker and its bar fills up).

import { test } from 'node:test'
import assert from 'node:assert/strict'
import { startDemo, startStack, WAIT_MS } from './support/stack.js'
import { openBrowser } from './support/chromium.js'
import { startNoUpgradeProxy } from './support/no-upgrade-proxy.js'

/** Drives the demo page by what a user sees on it. */
function demoPage (page) {
  const row = title => page.locator(`#tasks li[data-title="${title}"]`)
  return {
    status: status => page.locator(`#status[data-status="${status}"]`).waitFor(),
    async start (title, steps) {
      await page.fill('#title', title)
      await page.fill('#steps', String(steps))
      await page.click('#start')
    },
    /** Waits until the task's bar is full and it says it succeeded. */
    async finished (title) {
      await row(title).locator('[role="progressbar"][aria-valuenow="100"]').waitFor()
      await page.locator(`#tasks li[data-title="${title}"][data-status="succeeded"]`).waitFor()
      assert.equal(await row(title).locator('.percent').textContent(), '100%')
    },
    /** How the newest log line of `type` that mentions `text` travelled. */
    async via (type, text) {
      const line = page.locator(`#log li[data-type="${type}"]`, { hasText: text }).first()
      await line.waitFor()
      return line.getAttribute('data-via')
    },
    count: async which => Number(await page.locator(`#via-${which}`).textContent()),
    async addNote (text) {
      await page.fill('#note', text)
      await page.click('#add-note')
      await page.locator('#notes li', { hasText: text }).waitFor()
    },
    note: text => page.locator('#notes li', { hasText: text }).waitFor(),
    /** Waits until the task's row shows `status`. */
    taskStatus: (title, status) => page.locator(`#tasks li[data-title="${title}"][data-status="${status}"]`).waitFor(),
    /** Waits until the task has made at least one step. */
    running: title => row(title).locator('[role="progressbar"]:not([aria-valuenow="0"])').waitFor()
  }
}

test('the demo page works over the socket, over REST while patchbay is dead, and over the socket again', async t => {
  const stack = await startStack()
  t.after(() => stack.stop())
  const browser = await openBrowser(t, { timeoutMs: WAIT_MS })
  const { page } = browser
  const demo = demoPage(page)
  try {
    await page.goto(`${stack.apiUrl}/`)
    await demo.status('open')
    // patchbay runs in its own process here: the page offers no buttons for it.
    assert.equal(await page.locator('#controls').isHidden(), true)

    await demo.start('first, over the socket', 3)
    await demo.finished('first, over the socket')
    assert.equal(await demo.via('TASK_ENQUEUE_SUCCESS', 'first, over the socket'), 'socket')
    assert.equal(await demo.via('TASK_PROGRESS', 'first, over the socket'), 'push')
    await demo.addNote('a note over the socket')
    assert.equal(await demo.via('NOTE_ADD_SUCCESS', 'a note over the socket'), 'socket')
    assert.equal(await demo.via('NOTE_ADDED', 'a note over the socket'), 'push')
    const socketBefore = await demo.count('socket')
    assert.ok(socketBefore >= 2)

    await stack.killPatchbay()
    await demo.status('fallback')
    const restBefore = await demo.count('rest')
    await demo.addNote('a note over REST')
    assert.equal(await demo.via('NOTE_ADD_SUCCESS', 'a note over REST'), 'rest')
    // Someone else's note reaches the page by polling meanwhile.
    const other = await fetch(`${stack.apiUrl}/notes`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ text: 'a note from elsewhere' }) })
    assert.equal(other.status, 201)
    await demo.note('a note from elsewhere')
    // A task needs patchbay: the page says so at once.
    await demo.start('second, while down', 3)
    await page.locator('#form-error', { hasText: 'Not started: upstream_unavailable' }).waitFor()
    assert.equal(await page.locator('#tasks li[data-title="second, while down"]').count(), 0)
    assert.ok(await demo.count('rest') > restBefore)
    assert.equal(await demo.count('socket'), socketBefore)

    await stack.startPatchbay()
    await demo.status('open')
    await demo.start('third, after the restart', 3)
    assert.equal(await demo.via('TASK_ENQUEUE_SUCCESS', 'third, after the restart'), 'socket')
    await demo.finished('third, after the restart')
    assert.equal(await demo.via('TASK_PROGRESS', 'third, after the restart'), 'push')
    assert.equal(await page.locator('#form-error').isHidden(), true)
    assert.ok(await demo.count('socket') > socketBefore)

    assert.deepEqual(browser.errors.map(String), [], 'the page threw')
  } catch (e) {
    await browser.explain(e)
    e.message += `\n${stack.output()}`
    throw e
  }
})

for (const [queue, args] of [['embedded', []], ['Redis', ['--redis']]]) {
  test(`the demo's buttons stop and start its own patchbay (${queue} queue)`, async t => {
    const demoProcess = await startDemo(args)
    t.after(() => demoProcess.stop())
    const browser = await openBrowser(t, { timeoutMs: WAIT_MS })
    const { page } = browser
    const demo = demoPage(page)
    try {
      await page.goto(`${demoProcess.apiUrl}/`)
      await demo.status('open')
      await page.locator('#patchbay-state', { hasText: 'running' }).waitFor()
      await demo.start('across the restart', 15)
      await demo.running('across the restart')

      await page.click('#stop-patchbay')
      await page.locator('#patchbay-state', { hasText: 'stopped' }).waitFor()
      await demo.status('fallback')
      await demo.addNote('while stopped')
      assert.equal(await demo.via('NOTE_ADD_SUCCESS', 'while stopped'), 'rest')

      await page.click('#start-patchbay')
      await page.locator('#patchbay-state', { hasText: `running on ${demoProcess.bridgeAddr}` }).waitFor()
      await demo.status('open')
      if (queue === 'Redis') {
        // The job went on in the worker process; the rejoin brings its progress back.
        await demo.finished('across the restart')
      } else {
        // The embedded queue lived in the stopped patchbay's memory.
        await demo.taskStatus('across the restart', 'gone')
      }
      await demo.start('after start', 2)
      assert.equal(await demo.via('TASK_ENQUEUE_SUCCESS', 'after start'), 'socket')
      await demo.finished('after start')

      assert.deepEqual(browser.errors.map(String), [], 'the page threw')
    } catch (e) {
      await browser.explain(e)
      e.message += `\n${demoProcess.output()}`
      throw e
    }
  })
}

test('each task says who is watching it, and a watch link adds another tab', async t => {
  const demoProcess = await startDemo([])
  t.after(() => demoProcess.stop())
  const browser = await openBrowser(t, { timeoutMs: WAIT_MS })
  const { page } = browser
  const demo = demoPage(page)
  const visitor = async p => {
    await p.waitForFunction(() => document.getElementById('visitor')?.textContent.startsWith('visitor-'))
    return p.locator('#visitor').textContent()
  }
  try {
    await page.goto(`${demoProcess.apiUrl}/`)
    await demo.status('open')
    const me = await visitor(page)
    await demo.start('watched together', 40)
    const row = page.locator('#tasks li[data-title="watched together"]')
    await row.locator('.viewers', { hasText: `watching: ${me} (you)` }).waitFor()

    // Another tab is another visitor; it opens the task's watch link.
    const link = await row.locator('a.share').getAttribute('href')
    const other = await page.context().newPage()
    other.setDefaultTimeout(WAIT_MS)
    await other.goto(`${demoProcess.apiUrl}${link}`)
    const them = await visitor(other)
    assert.notEqual(them, me)
    await row.locator('.viewers', { hasText: them }).waitFor()
    // The watcher sees the task by the title its owner gave it, and who watches it.
    const watched = other.locator('#watching li', { hasText: 'watched together' })
    await watched.locator('.viewers', { hasText: me }).waitFor()
    await watched.locator('.viewers', { hasText: `${them} (you)` }).waitFor()

    // The watcher leaves: the owner's row says so.
    await other.close()
    await page.waitForFunction(([name]) => {
      const viewers = document.querySelector('#tasks li[data-title="watched together"] .viewers')
      return viewers && !viewers.textContent.includes(name)
    }, [them])
    assert.deepEqual(browser.errors.map(String), [], 'the page threw')
  } catch (e) {
    await browser.explain(e)
    e.message += `\n${demoProcess.output()}`
    throw e
  }
})

for (const forced of [null, 'sse', 'websocket']) {
  const title = forced
    ? `the demo page forced onto ${forced === 'sse' ? 'SSE' : 'the websocket'} works the same`
    : 'behind a proxy that refuses websockets, the demo page runs over SSE and still gets pushes'
  test(title, async t => {
    const stack = await startStack()
    t.after(() => stack.stop())
    const proxy = forced ? null : await startNoUpgradeProxy(stack.bridgeAddr)
    t.after(() => proxy?.close())
    const browser = await openBrowser(t, { timeoutMs: WAIT_MS })
    const { page } = browser
    const demo = demoPage(page)
    const query = forced ? `?transport=${forced}` : `?via=${proxy.addr}`
    const expected = forced ?? 'sse'
    try {
      await page.goto(`${stack.apiUrl}/${query}`)
      await page.locator(`#status[data-status="open"][data-transport="${expected}"]`).waitFor()
      await demo.start(`over ${expected}`, 3)
      await demo.finished(`over ${expected}`)
      assert.equal(await demo.via('TASK_ENQUEUE_SUCCESS', `over ${expected}`), 'socket')
      assert.equal(await demo.via('TASK_PROGRESS', `over ${expected}`), 'push')
      await demo.addNote(`a note over ${expected}`)
      assert.equal(await demo.via('NOTE_ADDED', `a note over ${expected}`), 'push')
      if (proxy) assert.ok(proxy.upgradesRefused() >= 2, `${proxy.upgradesRefused()} upgrades refused`)
      assert.deepEqual(browser.errors.map(String), [], 'the page threw')
    } catch (e) {
      await browser.explain(e)
      e.message += `\n${stack.output()}`
      throw e
    }
  })
}
