// patchbay's SSE transport behind the WebSocket interface the connection uses: `GET /sse` read
// as a stream with `fetch` (so it works in browsers and in Node alike, with the same
// credentials as the websocket's URL), and each message sent as `POST /sse/<connectionId>`,
// in order.

/**
 * A class with the part of the WebSocket interface `Connection` uses (`readyState`, `send`,
 * `close`, `onopen`, `onmessage`, `onclose`), over SSE.
 * @param {typeof fetch} fetchImpl
 */
export function sseSocket (fetchImpl) {
  return class SseSocket {
    /** @param {string} url the websocket URL (`ws[s]://host/ws?…`) */
    constructor (url) {
      const u = new URL(url)
      u.protocol = u.protocol === 'wss:' ? 'https:' : 'http:'
      u.pathname = u.pathname.replace(/\/ws$/, '/sse')
      this.url = u.toString()
      this.base = u
      this.readyState = 0
      this.onopen = this.onmessage = this.onclose = this.onerror = null
      this.aborter = new AbortController()
      this.chain = Promise.resolve()
      this.id = null
      this.read()
    }

    async read () {
      let code = 1006
      try {
        const res = await fetchImpl(this.url, { headers: { accept: 'text/event-stream' }, signal: this.aborter.signal, credentials: 'include' })
        if (!res.ok || !res.body) {
          code = res.status === 401 ? 4401 : 1006
          return
        }
        const reader = res.body.getReader()
        const decoder = new TextDecoder()
        let buffer = ''
        for (;;) {
          const { value, done } = await reader.read()
          if (done) break
          buffer += decoder.decode(value, { stream: true })
          let at
          while ((at = buffer.indexOf('\n\n')) >= 0) {
            const block = buffer.slice(0, at)
            buffer = buffer.slice(at + 2)
            const closedWith = this.event(block)
            if (closedWith !== undefined) {
              code = closedWith
              return
            }
          }
        }
      } catch {
        // Aborted by close(), or the network: either way the stream is over.
      } finally {
        this.finish(code)
      }
    }

    /** One event block: a message, a comment (heartbeat), or the close. Returns the close
     *  code when the server closed the stream. */
    event (block) {
      const data = block.split('\n')
        .filter(line => line.startsWith('data:'))
        .map(line => line.slice(line.startsWith('data: ') ? 6 : 5))
        .join('\n')
      if (!data) return undefined
      let message = null
      try { message = JSON.parse(data) } catch {}
      if (message?.type === '@@patchbay/CLOSED') return Number(message.payload?.code) || 1006
      if (this.readyState === 0 && message?.type === '@@patchbay/CONNECTED') {
        this.id = message.payload?.connectionId
        this.readyState = 1
        this.onopen?.({})
      }
      if (this.readyState === 1) this.onmessage?.({ data })
      return undefined
    }

    /** Posts `text` to the stream's session, after what was posted before. */
    send (text) {
      if (this.readyState !== 1) throw new Error('the stream is not open')
      const post = new URL(`/sse/${encodeURIComponent(this.id)}`, this.base)
      post.search = this.base.search
      this.chain = this.chain.then(async () => {
        if (this.readyState !== 1) return
        try {
          const res = await fetchImpl(post.toString(), { method: 'POST', headers: { 'content-type': 'application/json' }, body: text, credentials: 'include' })
          // A stream the server no longer knows is a stream that ended.
          if (res.status === 404) this.close()
        } catch {
          this.close()
        }
      })
    }

    close (code = 1000) {
      if (this.readyState === 3) return
      this.aborter.abort()
      this.finish(code)
    }

    finish (code) {
      if (this.readyState === 3) return
      this.readyState = 3
      this.onclose?.({ code })
    }
  }
}
