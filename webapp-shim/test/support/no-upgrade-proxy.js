// A reverse proxy in front of patchbay that passes plain HTTP (streams included) and refuses
// every websocket upgrade, as some corporate proxies do: what the SSE fallback is for.

import { createServer, request } from 'node:http'

/**
 * Starts the proxy on a free port of 127.0.0.1, forwarding to `target` (`host:port`).
 * @returns {Promise<{ addr: string, upgradesRefused: () => number, close: () => Promise<void> }>}
 */
export async function startNoUpgradeProxy (target) {
  const [host, port] = target.split(':')
  let refused = 0
  const server = createServer((req, res) => {
    const upstream = request({ host, port: Number(port), method: req.method, path: req.url, headers: req.headers }, up => {
      res.writeHead(up.statusCode ?? 502, up.headers)
      // Stream through as it comes: an SSE response never ends on its own.
      up.pipe(res)
    })
    upstream.on('error', () => {
      if (!res.headersSent) res.writeHead(502)
      res.end()
    })
    res.on('close', () => upstream.destroy())
    req.pipe(upstream)
  })
  server.on('upgrade', (req, socket) => {
    refused++
    socket.end('HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n')
  })
  await new Promise(resolve => server.listen(0, '127.0.0.1', resolve))
  const { port: own } = server.address()
  return {
    addr: `127.0.0.1:${own}`,
    upgradesRefused: () => refused,
    close: () => new Promise(resolve => {
      server.closeAllConnections()
      server.close(() => resolve())
    })
  }
}
