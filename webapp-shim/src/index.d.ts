// Self-contained: nothing here imports redux, so the types are the same however the shim is
// installed (a tarball, a linked folder, a workspace, pnpm) and whichever copy of redux the
// app has. Actions are object types, so they are valid Redux Toolkit `UnknownAction`s.

/** Where the bridge's requests go: `open` over the socket, otherwise straight to the API
 *  (`idle`: `autoConnect: false` and `connect()` not called yet). */
export type Status = 'idle' | 'connecting' | 'open' | 'fallback'

/** Why the socket is down, once the shim found out: the server cannot be reached (or
 *  something between breaks websockets), it refuses this page (its Origin, a full or draining
 *  server), or it refuses the credentials. */
export type DownReason = 'unreachable' | 'refused' | 'auth'

/** The `client.poll` setting of an action that has `subscribe` (read by the shim only). */
export interface PollSpec {
  /** Manifest action called over REST with the room's template fields, e.g. `TASK_FETCH`. */
  action: string
  /** Delay between two polls; default 3000. */
  intervalMs?: number
  /** Type of the action dispatched with each polled result; default `<action>_SUCCESS`. */
  as?: string
  /** Stop polling (and forget the room) once `result[field]` is one of `in`. */
  until?: { field: string, in: readonly unknown[] }
}

/** One entry of the manifest (`actions/*.json`, or `GET /actions`). */
export interface ActionSpec {
  description?: string
  http?: { method: string, path: string }
  /** JSON Schema of the payload; enforced by patchbay, and by the API in fallback. */
  payload?: unknown
  timeoutMs?: number
  /** Room template filled from the success payload, e.g. `task:{id}`. */
  subscribe?: string
  /** Settings for this shim; the server ignores them. */
  client?: { poll?: PollSpec, [key: string]: unknown }
  /** A `task` action (patchbay's task manager): no REST fallback. */
  task?: unknown
  [key: string]: unknown
}

export type Manifest = Record<string, ActionSpec>

export type FailureCode =
  | 'unknown_action' | 'invalid_payload' | 'forbidden' | 'rate_limited' | 'too_many_requests'
  | 'upstream_unavailable' | 'upstream_timeout' | 'upstream_error' | 'internal'
  /** the shim's own: no answer within `requestTimeoutMs` */
  | 'timeout'
  /** the shim's own: the request's `meta.signal` aborted */
  | 'aborted'
  /** from an `@@patchbay/ERROR` answering the request */
  | 'invalid_action' | 'bad_json'

export interface Failure {
  code: FailureCode
  message: string
  /** HTTP status: the API's for `upstream_error`, 502 / 503 / 504 for the other upstream codes. */
  status?: number
  /** For `upstream_error`: the API's body (parsed JSON, else text); for schema errors: `[{pointer, message}]`. */
  details?: unknown
}

export type SuccessAction<P = unknown> = {
  type: `${string}_SUCCESS`
  payload: P
  error?: undefined
  meta: {
    requestId: string
    /** The API's HTTP status (actions with `http`). */
    status?: number
    /** Over the socket only: the room the connection joined (manifest `subscribe`). */
    subscribed?: string
    /** Over the socket only: token that lets this user rejoin `subscribed` later. */
    roomToken?: string
    /** A SUBSCRIBE / UNSUBSCRIBE answered while the socket was down; carried out on reconnect. */
    deferred?: true
    [key: string]: unknown
  }
}

export type FailureAction = {
  type: `${string}_FAILURE`
  error: true
  payload: Failure
  meta: { requestId: string }
}

/** What `dispatch(X_REQUEST)` resolves to; it is also dispatched to reducers. Never rejects. */
export type ReplyAction<P = unknown> = SuccessAction<P> | FailureAction

export type StatusAction = { type: '@@patchbay/STATUS', payload: { status: Status, transport: 'websocket' | 'sse', reason?: DownReason } }
/** The server refused to let the connection back into a room after a reconnect (an expired
 *  room token, a revoked grant); the room is polled where its action says how. */
export type RejoinFailedAction = { type: '@@patchbay/REJOIN_FAILED', payload: { room: string, code?: FailureCode, message?: string } }
export type AuthExpiredAction = { type: '@@patchbay/AUTH_EXPIRED' }
/** Where a client stands in a room's history: after `offset` of `epoch`. */
export interface Position { epoch: string, offset: number }
/** Why a recovery replayed nothing. */
export type RecoveryReason = 'not_kept' | 'unavailable' | 'epoch_changed' | 'too_old' | 'too_many'
export type ConnectedAction = {
  type: '@@patchbay/CONNECTED'
  payload: {
    protocol: number
    connectionId: string
    userId: string | null
    rooms: string[]
    /** Where the identity's room stands, when it keeps history. */
    positions?: Record<string, Position>
    /** How the recovery asked for by the reconnect went. */
    recovery?: { room: string, recovered: boolean, reason?: RecoveryReason, replayed: number }
  }
}
/**
 * What a room missed while the socket was down could not be replayed (or the server missed it
 * itself): refetch what you show of `room`; pushes go on from `position`.
 */
/** One user present in a room. */
export interface PresentUser { userId: string, state: Record<string, unknown>, since: string }
/** Who is in a room: from a SUBSCRIBE success (the first or a reconnect's rejoin). Replace the
 *  room's presence with it; then apply the PRESENCE_* events the bridge lets through (it drops
 *  those not newer than what the store has seen). */
export type PresenceSnapshotAction = { type: '@@patchbay/PRESENCE_SNAPSHOT', payload: { room: string, version: number, users: PresentUser[] } }
export type PresenceJoinAction = { type: '@@patchbay/PRESENCE_JOIN', payload: { room: string, userId: string, state: Record<string, unknown>, version: number }, meta: { room: string } }
export type PresenceLeaveAction = { type: '@@patchbay/PRESENCE_LEAVE', payload: { room: string, userId: string, version: number, reason: 'left' | 'timeout' }, meta: { room: string } }
export type PresenceStateAction = { type: '@@patchbay/PRESENCE_STATE', payload: { room: string, userId: string, state: Record<string, unknown>, version: number }, meta: { room: string } }
export type ResyncAction = { type: '@@patchbay/RESYNC', payload: { room: string, reason: RecoveryReason, position: Position | null } }
/** A result of `client.poll`, dispatched as `poll.as`. */
export type PolledAction<P = unknown> = { type: string, payload: P, meta: { room: string, polled: true } }
/** Pushed by the server into a room the connection is in. */
export type ServerAction<P = unknown> = {
  type: string
  payload?: P
  meta: {
    room: string
    /** The action's id, the same in every room (rooms that keep history). */
    id?: string
    /** Its place in `room`'s history. */
    offset?: number
    /** Its places in the other rooms of this connection it was stored in. */
    offsets?: Record<string, number>
    /** Sent by a recovery. */
    replayed?: true
    [key: string]: unknown
  }
}

/** The request types the middleware answers: the manifest's, and the built-ins. */
export type RequestType<M = Manifest> = `${Extract<keyof M, string>}_REQUEST` | `@@patchbay/${string}_REQUEST`

export type RequestAction<M = Manifest> = {
  type: RequestType<M>
  /** Absent is sent as `{}`. */
  payload?: unknown
  /** `requestId` (`[A-Za-z0-9._:-]{1,128}`, ideally a uuid) is kept; otherwise a uuid is made.
   *  `signal` aborts it: answered at once with `aborted` (the reducers get the action without
   *  the signal, so put the middleware before a serializability check: `.prepend`). */
  meta?: { requestId?: string, signal?: AbortSignal, [key: string]: unknown }
}

/** A request's reply; `unwrap()` gives its payload or throws a `PatchbayError`. */
export interface ReplyPromise<P = unknown> extends Promise<ReplyAction<P>> {
  unwrap (): Promise<P>
}

/** The success payload of request `A` given `Replies` (action name → payload type, as the
 *  type generator writes it), else `unknown`. */
export type ReplyPayload<A, Replies> = A extends { type: `${infer N}_REQUEST` } ? (N extends keyof Replies ? Replies[N] : unknown) : unknown

/** What the middleware adds to `dispatch`: a request returns the promise of its reply. Put it
 *  first in your dispatch type, so that its overload is the one TypeScript picks for requests
 *  whatever the middleware order (`.prepend`, `.concat`, `applyMiddleware`):
 *  `type AppDispatch = PatchbayDispatch<typeof manifest> & typeof store.dispatch`. */
export type PatchbayDispatch<M = Manifest, Replies = {}> = {
  <A extends RequestAction<M>>(action: A): ReplyPromise<ReplyPayload<A, Replies>>
}

/** Redux middleware, typed without importing redux. */
export type PatchbayMiddleware = (api: { dispatch: (action: any) => any, getState: () => any }) =>
  (next: (action: unknown) => unknown) => (action: unknown) => unknown

/** What `subscribe` listeners get. */
export interface BridgeState {
  status: Status
  transport: 'websocket' | 'sse'
  reason: DownReason | null
  /** Requests sent over the socket and over REST so far. */
  socket: number
  rest: number
}

/** What `unwrap` throws for a `_FAILURE`. */
export class PatchbayError extends Error {
  readonly code: FailureCode
  readonly status?: number
  readonly details?: unknown
  readonly action: FailureAction
}

/** The payload of a reply (or of the promise of one); throws a `PatchbayError` for a failure. */
export function unwrap<P = unknown> (reply: ReplyAction<P> | Promise<ReplyAction<P>>): Promise<P>

/** Why a socket to `socketUrl` did not open (see `DownReason`), asked with `fetch`. */
export function diagnose (fetch: (input: string, init: RequestInit) => Promise<Response>, socketUrl: string): Promise<DownReason>

/** The parts of a WebSocket the shim uses (the browser's, or the `ws` package's). */
export interface WebSocketLike {
  readonly readyState: number
  send (data: string): void
  close (code?: number, reason?: string): void
  onopen: ((event: any) => void) | null
  onmessage: ((event: { data: any }) => void) | null
  onclose: ((event: { code: number }) => void) | null
  onerror: ((event: any) => void) | null
}

export interface PatchbayOptions<M extends Manifest = Manifest> {
  /** The patchbay websocket, e.g. `wss://app.example.com/ws`. */
  url: string
  /** Base URL of the REST API for fallback calls (the server's `PATCHBAY_API_URL` as the browser reaches it). */
  apiUrl: string
  /** The JSON of `actions/` (bundled, or fetched from `GET /actions`). Default `{}`. */
  manifest?: M
  /** Default `globalThis.WebSocket`. */
  WebSocket?: new (url: string) => WebSocketLike
  /** Default `globalThis.fetch`. */
  fetch?: (input: string, init: RequestInit) => Promise<Response>
  /** How long a request sent over the socket waits for its answer; default 15000. */
  requestTimeoutMs?: number
  /** First reconnect delay (halved at random for jitter); default 250. */
  minBackoffMs?: number
  /** Largest reconnect delay; default 10000. */
  maxBackoffMs?: number
  /** Interval of application pings; default 20000. */
  pingMs?: number
  /** How long the server may stay silent after a ping before the socket is dropped; default 10000. */
  pongTimeoutMs?: number
  /** How long a request made before the first connection opened or failed waits for it
   *  before going over REST; default 2000. */
  connectWaitMs?: number
  /** `auto` (default): the websocket, and SSE (`GET /sse`) after two websocket attempts in a
   *  row that never opened (and back likewise); REST while neither is open. */
  transport?: 'auto' | 'websocket' | 'sse'
  /** Connect at once (default); `false`: on `connect()`, so a store can be built where there
   *  is no WebSocket (SSR, tests) and requests go over REST meanwhile. */
  autoConnect?: boolean
  /** After three refused attempts in a row (`refused`, `auth`), wait this long between
   *  attempts; default 60000. */
  refusedBackoffMs?: number
  /** Ask why an attempt that never opened failed (two small requests, see `diagnose`) and
   *  say it in `@@patchbay/STATUS`'s `reason`; default true. */
  diagnose?: boolean
  /** Warn once (console.warn) about each `*_REQUEST` that is not in the manifest; default true. */
  warnUnknown?: boolean
}

export interface Patchbay<M extends Manifest = Manifest> {
  /** Redux middleware: `applyMiddleware(bridge.middleware)`, or RTK's `.prepend` / `.concat`. */
  middleware: PatchbayMiddleware
  /** The current status (also dispatched as `@@patchbay/STATUS`). */
  readonly status: Status
  /** Starts connecting (with `autoConnect: false`); does nothing once started. */
  connect (): void
  /** Calls `listener` at every change of status or counts; returns the function that stops it. */
  subscribe (listener: (state: BridgeState) => void): () => void
  /** Sends a request without passing it through the store (what the RTK Query base query
   *  does): its reply is returned, and dispatched like any other. */
  request<P = unknown> (type: RequestType<M>, payload?: unknown, options?: { requestId?: string, signal?: AbortSignal }): ReplyPromise<P>
  /** How many requests went over the socket and over REST (retries count in both). */
  readonly stats: { readonly socket: number, readonly rest: number }
  /** Who is in `room` as the store has seen it (its snapshot and the newer events), or null
   *  for a room without presence. */
  presence(room: string): { version: number, users: PresentUser[] } | null
  /** Drops the socket, if any, and connects again now: after re-authenticating (`AUTH_EXPIRED`). */
  reconnect (): void
  /** Closes the socket for good, stops every timer, answers requests in flight with `upstream_unavailable`. */
  close (): void
}

export function createPatchbay<M extends Manifest> (options: PatchbayOptions<M>): Patchbay<M>

/** What `patchbayBaseQuery` takes: a request (`{ type: 'X_REQUEST', payload }`) or its type. */
export type BaseQueryRequest<M = Manifest> = RequestType<M> | { type: RequestType<M>, payload?: unknown, meta?: { requestId?: string, signal?: AbortSignal } }

/** A Redux Toolkit Query base query over the bridge (requests over the socket, or the API
 *  while it is down): `createApi({ baseQuery: patchbayBaseQuery(bridge), … })`. */
export function patchbayBaseQuery<M extends Manifest> (bridge: Patchbay<M>): (
  request: BaseQueryRequest<M>,
  api?: { signal?: AbortSignal }
) => Promise<{ data: unknown, error?: undefined, meta: SuccessAction['meta'] } | { error: Failure, data?: undefined, meta: FailureAction['meta'] }>

/** Percent-encodes a path segment or query key/value: all but `A-Z a-z 0-9 - . _ ~` become `%XX`. */
export function encode (text: string): string

/** Method, path with query string, and JSON body of an `http` spec's call; throws on an invalid payload. */
export function buildRequest (http: { method: string, path: string }, payload: unknown): { method: string, path: string, body: string | undefined }

/** The query string of a GET or DELETE (without `?`): fields not in `skip`, sorted by key. */
export function queryString (payload: Record<string, unknown>, skip: readonly string[]): string
