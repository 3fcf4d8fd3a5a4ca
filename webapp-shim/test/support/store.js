// A real redux store with the bridge installed, which remembers every action it saw so a test
// can wait for the one it expects.

import { applyMiddleware, createStore } from 'redux'
import { waitFor } from './stack.js'

/**
 * @param {import('redux').Middleware} bridgeMiddleware
 * @returns {{store: import('redux').Store, seen: any[], waitForAction: (match: (a: any) => boolean, o?: {from?: number, what?: string, timeoutMs?: number}) => Promise<any>}}
 */
export function recordingStore (bridgeMiddleware) {
  const seen = []
  // First in the chain: it sees what the test dispatches and what the bridge dispatches.
  const record = () => next => action => {
    seen.push(action)
    return next(action)
  }
  const reducer = (state = { status: null }, action) =>
    action.type === '@@patchbay/STATUS' ? { status: action.payload.status } : state
  const store = createStore(reducer, applyMiddleware(record, bridgeMiddleware))
  return {
    store,
    seen,
    /** The first action at or after index `from` that `match`es. */
    waitForAction (match, { from = 0, what = 'an action', timeoutMs } = {}) {
      return waitFor(() => seen.slice(from).find(match), {
        what: () => `${what} (seen since: ${seen.slice(from).map(a => a.type).join(', ') || 'nothing'})`,
        timeoutMs
      })
    }
  }
}
