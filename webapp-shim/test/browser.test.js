// The demo page in headless Chromium: a task's progress fills its bar over the websocket;
// with the patchbay process killed the page keeps working over REST (progress by polling);
// with patchbay back the socket reopens and carries the next request. Then the same outage
// with the demo's own stop and start buttons.

import { test } from 'node:test'
import assert from 'node:assert/strict'
import { startDemo, startStack, WAIT_MS } from './support/stack.js'
import { openBrowser } from './support/chromium.js'

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
    count: async which => Number(await page.locator(`#via-${which}`).textContent())
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
    const socketBefore = await demo.count('socket')
    assert.ok(socketBefore >= 1)

    await stack.killPatchbay()
    await demo.status('fallback')
    const restBefore = await demo.count('rest')
    await demo.start('second, over REST', 3)
    assert.equal(await demo.via('TASK_ENQUEUE_SUCCESS', 'second, over REST'), 'rest')
    await demo.finished('second, over REST')
    assert.equal(await demo.via('TASK_PROGRESS', 'second, over REST'), 'poll')
    assert.ok(await demo.count('rest') > restBefore)
    assert.equal(await demo.count('socket'), socketBefore)

    await stack.startPatchbay()
    await demo.status('open')
    await demo.start('third, after the restart', 3)
    assert.equal(await demo.via('TASK_ENQUEUE_SUCCESS', 'third, after the restart'), 'socket')
    await demo.finished('third, after the restart')
    assert.equal(await demo.via('TASK_PROGRESS', 'third, after the restart'), 'push')
    assert.ok(await demo.count('socket') > socketBefore)

    assert.deepEqual(browser.errors.map(String), [], 'the page threw')
  } catch (e) {
    await browser.explain(e)
    e.message += `\n${stack.output()}`
    throw e
  }
})

test("the demo's buttons stop and start its own patchbay", async t => {
  const demoProcess = await startDemo()
  t.after(() => demoProcess.stop())
  const browser = await openBrowser(t, { timeoutMs: WAIT_MS })
  const { page } = browser
  const demo = demoPage(page)
  try {
    await page.goto(`${demoProcess.apiUrl}/`)
    await demo.status('open')
    await page.locator('#patchbay-state', { hasText: 'running' }).waitFor()

    await page.click('#stop-patchbay')
    await page.locator('#patchbay-state', { hasText: 'stopped' }).waitFor()
    await demo.status('fallback')
    await demo.start('while stopped', 2)
    assert.equal(await demo.via('TASK_ENQUEUE_SUCCESS', 'while stopped'), 'rest')
    await demo.finished('while stopped')

    await page.click('#start-patchbay')
    await page.locator('#patchbay-state', { hasText: `running on ${demoProcess.bridgeAddr}` }).waitFor()
    await demo.status('open')
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
