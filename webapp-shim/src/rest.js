// The REST fallback: the same call patchbay would make, made by the browser itself, answered
// with the same SUCCESS / FAILURE actions.

import { buildRequest, PayloadError } from './encode.js'

/** Largest response body accepted, as on the server. */
const MAX_BODY_BYTES = 1024 * 1024
/** Upstream timeout when the manifest sets none, as on the server. */
const DEFAULT_TIMEOUT_MS = 10000

/**
 * A failure action's payload.
 * @param {string} code
 * @param {string} message
 * @param {{status?: number, details?: unknown}} [extra]
 */
export function failurePayload (code, message, extra = {}) {
  const payload = { code, message }
  if (extra.status !== undefined) payload.status = extra.status
  if (extra.details !== undefined) payload.details = extra.details
  return payload
}

function parseBody (text) {
  if (text.trim() === '') return null
  try {
    return JSON.parse(text)
  } catch {
    return text
  }
}

/**
 * Calls the API directly for action `name` and returns its reply action. Never rejects.
 * @param {object} options
 * @param {string} options.apiUrl base URL, without trailing slash
 * @param {string} options.name action name
 * @param {{http: {method: string, path: string}, timeoutMs?: number}} options.spec manifest entry
 * @param {unknown} options.payload the payload as JSON would carry it
 * @param {string} options.requestId
 * @param {typeof fetch} options.fetch
 * @param {Set<() => void>} [options.inFlight] where the call registers its abort while it runs,
 *   so the bridge can cut every call short when it closes
 * @param {AbortSignal} [options.signal] the request's own signal: cuts the call short too
 * @returns {Promise<{type: string, payload: unknown, error?: true, meta: Record<string, unknown>}>}
 */
export async function callRest ({ apiUrl, name, spec, payload, requestId, fetch, inFlight, signal }) {
  const meta = { requestId }
  const failure = (code, message, extra) => ({ type: `${name}_FAILURE`, error: true, payload: failurePayload(code, message, extra), meta })
  let request
  try {
    request = buildRequest(spec.http, payload)
  } catch (e) {
    if (e instanceof PayloadError) return failure('invalid_payload', e.message)
    return failure('internal', 'the request could not be built')
  }
  const headers = { Accept: 'application/json', 'X-Request-Id': requestId }
  if (request.method !== 'GET') headers['Idempotency-Key'] = requestId
  if (request.body !== undefined) headers['Content-Type'] = 'application/json'
  const timeoutMs = spec.timeoutMs ?? DEFAULT_TIMEOUT_MS
  const abort = new AbortController()
  let why = null
  const stop = reason => () => { why ??= reason; abort.abort() }
  // Settles as soon as the call is aborted, even when `fetch` or the body ignores the signal.
  const aborted = new Promise((resolve, reject) => abort.signal.addEventListener('abort', reject, { once: true }))
  aborted.catch(() => {})
  const timer = setTimeout(stop('timeout'), timeoutMs)
  const closed = stop('closed')
  inFlight?.add(closed)
  signal?.addEventListener('abort', closed, { once: true })
  try {
    const response = await Promise.race([fetch(apiUrl + request.path, {
      method: request.method,
      headers,
      body: request.body,
      credentials: 'include',
      redirect: 'manual',
      signal: abort.signal
    }), aborted])
    if (response.type === 'opaqueredirect') {
      // Browsers hide a redirect's status and body from scripts; there is nothing else to report.
      return failure('upstream_error', 'the API answered with a redirect, which is not followed')
    }
    const tooLarge = () => failure('upstream_error', `the API's response is larger than ${MAX_BODY_BYTES} bytes`, { status: response.status })
    if (Number(response.headers.get('content-length')) > MAX_BODY_BYTES) return tooLarge()
    const text = await Promise.race([response.text(), aborted])
    if (new TextEncoder().encode(text).length > MAX_BODY_BYTES) return tooLarge()
    const body = parseBody(text)
    if (response.status >= 200 && response.status < 300) {
      return { type: `${name}_SUCCESS`, payload: body, meta: { requestId, status: response.status } }
    }
    return failure('upstream_error', `the API answered ${response.status}`, { status: response.status, details: text === '' ? undefined : body })
  } catch {
    if (why === 'timeout') return failure('upstream_timeout', `the API did not answer within ${timeoutMs} ms`, { status: 504 })
    if (why === 'closed') return failure('upstream_unavailable', 'the bridge was closed')
    return failure('upstream_unavailable', 'the API is unreachable', { status: 502 })
  } finally {
    clearTimeout(timer)
    inFlight?.delete(closed)
    signal?.removeEventListener('abort', closed)
  }
}
