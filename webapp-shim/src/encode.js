// The request-building rules of the patchbay contract (section 3), so that a REST fallback
// call is byte for byte the call patchbay would have made.

/** Bytes that stay as they are; everything else is %XX (space is %20, never +). */
const UNRESERVED = /[A-Za-z0-9\-._~]/

/**
 * Percent-encodes one path segment or query key/value.
 * @param {string} text
 * @returns {string}
 */
export function encode (text) {
  let out = ''
  for (const byte of new TextEncoder().encode(text)) {
    const ch = String.fromCharCode(byte)
    out += byte < 0x80 && UNRESERVED.test(ch) ? ch : '%' + byte.toString(16).toUpperCase().padStart(2, '0')
  }
  return out
}

/** Thrown when a payload cannot fill a request; becomes `invalid_payload`. */
export class PayloadError extends Error {}

/**
 * The `{field}` names of a template, in order.
 * @param {string} template
 * @returns {string[]}
 */
export function templateFields (template) {
  return [...template.matchAll(/\{([A-Za-z_][A-Za-z0-9_]*)\}/g)].map(m => m[1])
}

/**
 * Fills `{field}`s from the top-level string or integer fields of `values`.
 * @param {string} template
 * @param {Record<string, unknown>} values
 * @param {(value: string) => string} map
 * @returns {string}
 */
export function fillTemplate (template, values, map) {
  return template.replace(/\{([A-Za-z_][A-Za-z0-9_]*)\}/g, (_, field) => {
    const value = values?.[field]
    let text
    if (typeof value === 'string') text = value
    else if (Number.isInteger(value)) text = String(value)
    else if (value === undefined || value === null) throw new PayloadError(`field \`${field}\` is missing`)
    else throw new PayloadError(`field \`${field}\` must be a string or an integer`)
    if (text === '' || text === '.' || text === '..') throw new PayloadError(`field \`${field}\` must not be empty, \`.\` or \`..\``)
    return map(text)
  })
}

function scalarText (key, value) {
  if (typeof value === 'string') return value
  if (typeof value === 'number' || typeof value === 'boolean') return JSON.stringify(value)
  throw new PayloadError(`field \`${key}\` must be a scalar or an array of scalars to go in the query string`)
}

/**
 * The query string of a GET or DELETE: fields not used by the path, sorted by key; arrays
 * repeat the key; null is left out; objects are refused.
 * @param {Record<string, unknown>} payload
 * @param {string[]} skip
 * @returns {string}
 */
export function queryString (payload, skip) {
  const parts = []
  // Sort by UTF-8 bytes, as the server does (JS sorts by UTF-16 code units).
  const keys = Object.keys(payload).filter(k => !skip.includes(k))
  const bytes = k => [...new TextEncoder().encode(k)]
  keys.sort((a, b) => {
    const x = bytes(a); const y = bytes(b)
    for (let i = 0; i < Math.min(x.length, y.length); i++) if (x[i] !== y[i]) return x[i] - y[i]
    return x.length - y.length
  })
  for (const key of keys) {
    const value = payload[key]
    const values = Array.isArray(value) ? value : [value]
    for (const v of values) {
      if (v === null || v === undefined) continue
      if (Array.isArray(v)) throw new PayloadError(`field \`${key}\` must be a scalar or an array of scalars to go in the query string`)
      parts.push(`${encode(key)}=${encode(scalarText(key, v))}`)
    }
  }
  return parts.join('&')
}

/**
 * Method, URL path (with query) and body of the call for an `http` spec.
 * @param {{method: string, path: string}} http
 * @param {unknown} payload
 * @returns {{method: string, path: string, body: string | undefined}}
 */
export function buildRequest (http, payload) {
  const usesQuery = http.method === 'GET' || http.method === 'DELETE'
  const fields = templateFields(http.path)
  const isObject = payload !== null && typeof payload === 'object' && !Array.isArray(payload)
  if (!isObject && payload !== null && (fields.length > 0 || usesQuery)) {
    throw new PayloadError('payload must be an object: its fields fill the path and query string')
  }
  const values = isObject ? payload : {}
  let path
  try {
    path = fillTemplate(http.path, values, encode)
  } catch (e) {
    // Worded as patchbay words it, so both paths give the same failure.
    throw new PayloadError(`path ${e.message}`)
  }
  if (usesQuery) {
    const query = queryString(values, fields)
    if (query) path += '?' + query
  }
  const body = !usesQuery && payload !== null ? JSON.stringify(payload) : undefined
  return { method: http.method, path, body }
}
