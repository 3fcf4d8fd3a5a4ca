//! One websocket connection.
//!
//! The socket is split: a writer task ([`crate::writer`]) drains the connection's bounded
//! [`Outbox`], and the reader loop `select!`s over the close signal, shutdown, finished
//! requests and the next frame. Requests run concurrently as futures owned by the
//! loop, so per-connection state (granted rooms, in-flight count) needs no lock. Cleanup
//! happens once, after the loop. Generic over `Sink`/`Stream` so tests can drive it directly.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::stream::FuturesUnordered;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{FutureExt, Stream, StreamExt};
use hyper::HeaderMap;
use serde_json::{Map, Value, json};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::{Instant, sleep, sleep_until};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tracing::Instrument;

use crate::app::App;
use crate::auth::Identity;
use crate::dispatch::{CallContext, Success};
use crate::error::{ActionError, Code, Disconnect};
use crate::outbox::{Closer, Outbox, QueueLimits};
use crate::protocol::{self, Builtin, Request};
use crate::ratelimit::{RateLimiter, Verdict};
use crate::registry::ActionSpec;
use crate::rooms::{ConnId, JoinError, valid_room};
use crate::template::room_part;
use crate::writer::{CLOSE_TIMEOUT, write_loop};

/// Longest wait for the client to close its side after our close frame.
pub const LINGER: Duration = Duration::from_secs(2);

/// Most rooms a connection may be granted by `subscribe`, as a multiple of
/// `PATCHBAY_MAX_ROOMS`: grants outlive leaving a room, so they need their own bound.
const GRANTS_PER_ROOM_LIMIT: usize = 4;

/// Who is on the other end of a new connection.
#[derive(Debug, Clone)]
pub struct Peer {
    /// Process-local id, for the room registry.
    pub conn_id: ConnId,
    /// The id sent to the client in `@@patchbay/CONNECTED`.
    pub connection_id: String,
    /// The authenticated identity.
    pub identity: Identity,
    /// Handshake headers forwarded upstream.
    pub forwarded: Arc<HeaderMap>,
}

/// What to answer when the bus cannot confirm a subscription (Redis is down). Either way the
/// bus re-subscribes every room in use when it reconnects.
#[derive(Debug, Clone, Copy)]
enum OnBusDown {
    /// An action's `subscribe`: the API already did the work, so keep the room and succeed.
    Succeed,
    /// A SUBSCRIBE request: fail with `upstream_unavailable` so the client retries; leave the
    /// room only if this request added the connection to it.
    Fail { leave: bool },
}

/// A request that finished; the loop turns it into a reply and applies its effects.
enum Done {
    /// Send this and nothing else.
    Reply(String),
    /// A manifest action finished.
    Action {
        spec: Arc<ActionSpec>,
        request_id: String,
        result: Result<Success, ActionError>,
    },
}

/// Runs one connection until it closes. Never panics on client input.
pub async fn run<T>(ws: WebSocketStream<T>, app: Arc<App>, peer: Peer)
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sink, mut stream) = ws.split();
    let limits = QueueLimits {
        frames: app.config.send_queue,
        bytes: app.config.send_queue_bytes,
    };
    let (outbox, rx) = Outbox::new(limits);
    let closer = outbox.closer().clone();
    app.rooms.register(peer.conn_id, outbox.clone());
    let _registration = Registration {
        app: app.clone(),
        conn_id: peer.conn_id,
        closer: closer.clone(),
    };
    let writer = tokio::spawn(
        write_loop(sink, rx, closer.clone(), app.config.ping_interval).in_current_span(),
    );

    let mut session = Session {
        app: app.clone(),
        peer,
        outbox,
        grants: HashSet::new(),
        pending: FuturesUnordered::new(),
        actions_in_flight: 0,
        rate: RateLimiter::new(
            app.config.rate_per_sec,
            app.config.rate_burst,
            Instant::now(),
        ),
    };
    if session.start().await {
        session.read_loop(&mut stream).await;
    }

    // Cleanup, once: leave every room, then let the writer finish.
    let Session { peer, outbox, .. } = session;
    for room in app.rooms.unregister(peer.conn_id) {
        if let Err(e) = app.bus.unsubscribe(&room).await {
            tracing::warn!(%room, error = %e, "bus unsubscribe failed");
        }
    }
    drop(outbox);
    // Boxed: the closing steps' timers and buffer would otherwise be part of the future of
    // every idle session, for the whole of its life.
    Box::pin(close_socket(writer, stream)).await;
    if let Some(reason) = closer.reason() {
        app.metrics.disconnect(reason);
    }
    tracing::debug!(reason = ?closer.reason(), "connection closed");
}

/// Waits for the writer to finish (it writes the close frame), then lingers.
async fn close_socket<T>(
    mut writer: tokio::task::JoinHandle<SplitSink<WebSocketStream<T>, Message>>,
    stream: SplitStream<WebSocketStream<T>>,
) where
    T: AsyncRead + AsyncWrite + Unpin,
{
    match tokio::time::timeout(CLOSE_TIMEOUT + Duration::from_secs(1), &mut writer).await {
        Ok(Ok(sink)) => {
            if let Ok(ws) = sink.reunite(stream) {
                linger(ws).await;
            }
        }
        Ok(Err(_)) => {}
        Err(_) => writer.abort(),
    }
}

/// Closes the socket so that the client reads our close frame rather than a reset: shut down
/// our side (the close frame is already written), then read and discard what the client still
/// sends until it closes too, for at most [`LINGER`]. Closing a socket with unread bytes makes
/// the kernel send a reset, which can destroy the close frame in the client's buffers.
async fn linger<T>(mut ws: WebSocketStream<T>)
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let io = ws.get_mut();
    let _ = tokio::time::timeout(LINGER, async {
        let _ = io.shutdown().await;
        let mut scratch = [0u8; 512];
        while let Ok(1..) = io.read(&mut scratch).await {}
    })
    .await;
}

/// Undoes the connection's registration in [`crate::rooms::Rooms`] even if the session task
/// panics: without it, the room entry would keep the writer alive and the socket open forever.
struct Registration {
    app: Arc<App>,
    conn_id: ConnId,
    closer: Arc<Closer>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.closer.close(Disconnect::Internal);
        }
        // After a normal exit `run` has already unregistered, and this finds nothing.
        let emptied = self.app.rooms.unregister(self.conn_id);
        if !emptied.is_empty() {
            let app = self.app.clone();
            tokio::spawn(async move {
                for room in emptied {
                    let _ = app.bus.unsubscribe(&room).await;
                }
            });
        }
    }
}

struct Session {
    app: Arc<App>,
    peer: Peer,
    outbox: Outbox,
    /// Rooms granted on this connection by a successful action's `subscribe`.
    grants: HashSet<String>,
    /// Requests in flight, polled by the read loop.
    pending: FuturesUnordered<BoxFuture<'static, Done>>,
    /// Manifest actions among `pending` (built-ins do not count towards the cap).
    actions_in_flight: usize,
    /// Every client frame counts against it.
    rate: RateLimiter,
}

impl Session {
    /// Joins the initial rooms and greets the client. Returns false if the connection is
    /// already closing.
    async fn start(&mut self) -> bool {
        let mut initial = Vec::new();
        if let Some(room) = self.peer.identity.user_room() {
            if self
                .app
                .rooms
                .join(self.peer.conn_id, &room, usize::MAX)
                .is_ok()
                && let Err(e) = self.app.bus.subscribe(&room).await
            {
                tracing::warn!(%room, error = %e, "bus subscribe failed");
            }
            initial.push(room);
        }
        let hello = protocol::connected(
            &self.peer.connection_id,
            self.peer.identity.user_id.as_deref(),
            &initial,
        );
        self.outbox.push(hello.into())
    }

    async fn read_loop<R>(&mut self, stream: &mut R)
    where
        R: Stream<Item = Result<Message, WsError>> + Unpin,
    {
        let closer = self.outbox.closer().clone();
        let idle_timeout = self.app.config.idle_timeout;
        let idle = sleep(idle_timeout);
        tokio::pin!(idle);
        let expiry = crate::auth::expires_in(&self.peer.identity).map(|d| Instant::now() + d);
        // Every waiter and timer is created once for the whole loop, not at every iteration:
        // this loop runs for every frame and every finished request.
        let app = self.app.clone();
        let closed = closer.fired();
        let drain = app.lifecycle.drain_started();
        let grace = sleep(Duration::ZERO);
        let expired = sleep_until(expiry.unwrap_or_else(Instant::now));
        tokio::pin!(closed, drain, grace, expired);
        let mut draining = false;
        loop {
            tokio::select! {
                biased;
                _ = &mut closed => return,
                _ = &mut drain, if !draining => {
                    draining = true;
                    grace.as_mut().reset(Instant::now() + app.config.shutdown_grace);
                }
                Some(done) = self.pending.next(), if !self.pending.is_empty() => self.finish(done),
                _ = &mut grace, if draining => {
                    tracing::warn!(abandoned = self.pending.len(), "shutdown grace ran out with requests in flight");
                    break;
                }
                _ = &mut expired, if expiry.is_some() => {
                    tracing::info!("credentials expired: closing with 4401");
                    closer.close(Disconnect::Expired);
                    return;
                }
                _ = &mut idle, if !draining => {
                    closer.close(Disconnect::Idle);
                    return;
                }
                frame = stream.next(), if !draining => {
                    let now = Instant::now();
                    idle.as_mut().reset(now + idle_timeout);
                    let verdict = match &frame {
                        Some(Ok(Message::Pong(_))) => Verdict::Allow, // answers our own pings
                        Some(Ok(_)) => self.rate.check(now),
                        _ => Verdict::Allow,
                    };
                    if verdict == Verdict::Disconnect {
                        tracing::info!("closing a client that kept flooding");
                        closer.close(Disconnect::Flood);
                        return;
                    }
                    let limited = verdict == Verdict::Limit;
                    match frame {
                        Some(Ok(Message::Text(text))) => self.on_text(text.as_str(), limited),
                        Some(Ok(Message::Binary(_))) => self.send(protocol::frame_error(&protocol::FrameError::binary())),
                        Some(Ok(Message::Close(_))) | None => return,
                        // The websocket layer queued the pong itself; it counts against the
                        // send queue like everything else written (2 bytes of frame header).
                        Some(Ok(Message::Ping(data))) => if !self.outbox.charge_control(data.len() + 2) {
                            return;
                        },
                        Some(Ok(_)) => {} // pongs to our own pings
                        Some(Err(e)) => {
                            if let Some(reason) = read_error_disconnect(&e) {
                                tracing::info!(error = %e, code = reason.code(), "closing after a bad frame");
                                closer.close(reason);
                            }
                            return;
                        }
                    }
                }
            }
            if draining && self.pending.is_empty() {
                break;
            }
        }
        // Only shutdown leaves the loop with `break`.
        closer.close(Disconnect::Shutdown);
    }

    fn send(&self, text: String) {
        self.outbox.push(text.into());
    }

    fn fail(&self, name: &str, request_id: &str, err: &ActionError) {
        self.send(protocol::failure(name, request_id, err));
    }

    /// Fails a manifest request before it ran (unknown, rate-limited, too many), and counts it.
    fn refuse(&self, req: &Request, err: ActionError) {
        let label = if self.app.registry.get(&req.name).is_some() {
            req.name.as_str()
        } else {
            "unknown"
        };
        self.app.metrics.action(label, err.code.as_str());
        self.fail(&req.name, &req.request_id, &err);
    }

    fn on_text(&mut self, text: &str, rate_limited: bool) {
        let req = match protocol::parse_request(text) {
            Ok(req) => req,
            Err(e) => return self.send(protocol::frame_error(&e)),
        };
        if rate_limited {
            let err = ActionError::new(
                Code::RateLimited,
                format!(
                    "more than {} messages per second on this connection",
                    self.app.config.rate_per_sec
                ),
            );
            return self.refuse(&req, err);
        }
        match req.builtin {
            Some(Builtin::Ping) => self.send(protocol::success(
                &req.name,
                &req.request_id,
                &json!({}),
                Map::new(),
            )),
            Some(Builtin::Subscribe) => self.on_subscribe(req),
            Some(Builtin::Unsubscribe) => self.on_unsubscribe(req),
            None => self.on_action(req),
        }
    }

    fn on_action(&mut self, req: Request) {
        let Some(spec) = self.app.registry.get(&req.name).cloned() else {
            return self.refuse(
                &req,
                ActionError::new(Code::UnknownAction, format!("no action named {}", req.name)),
            );
        };
        if self.actions_in_flight >= self.app.config.max_inflight {
            let err = ActionError::new(
                Code::TooManyRequests,
                format!(
                    "more than {} requests in flight on this connection",
                    self.app.config.max_inflight
                ),
            );
            return self.refuse(&req, err);
        }
        self.actions_in_flight += 1;
        let app = self.app.clone();
        let ctx = CallContext {
            request_id: req.request_id.clone(),
            forwarded: self.peer.forwarded.clone(),
        };
        let span = tracing::info_span!("request", action = %req.name, request_id = %req.request_id);
        self.pending.push(
            async move {
                let started = Instant::now();
                let result = app.dispatcher.run(&spec, &req.payload, &ctx).await;
                app.metrics.action_duration(&spec.name, started.elapsed());
                match &result {
                    Ok(_) => tracing::debug!(elapsed_ms = started.elapsed().as_millis() as u64, "ok"),
                    Err(e) => tracing::debug!(elapsed_ms = started.elapsed().as_millis() as u64, code = ?e.code, "failed"),
                }
                Done::Action { spec, request_id: req.request_id, result }
            }
            .instrument(span)
            .boxed(),
        );
    }

    fn finish(&mut self, done: Done) {
        match done {
            Done::Reply(text) => self.send(text),
            Done::Action {
                spec,
                request_id,
                result,
            } => {
                self.actions_in_flight -= 1;
                let outcome = match &result {
                    Ok(_) => "success",
                    Err(e) => e.code.as_str(),
                };
                self.app.metrics.action(&spec.name, outcome);
                match result {
                    Err(e) => self.fail(&spec.name, &request_id, &e),
                    Ok(success) => self.on_success(&spec, request_id, success),
                }
            }
        }
    }

    /// Sends a success, first joining the manifest's `subscribe` room if it has one.
    fn on_success(&mut self, spec: &ActionSpec, request_id: String, mut success: Success) {
        let room = spec.subscribe.as_ref().and_then(|t| {
            // Parsed only here, for the template's fields.
            let filled = match serde_json::from_str::<Map<String, Value>>(success.payload.get()) {
                Ok(fields) => t.fill(&fields, room_part).map_err(|e| e.to_string()),
                Err(_) => Err("the success payload is not an object".to_string()),
            };
            match filled {
                Ok(room) if valid_room(&room) => Some(room),
                Ok(room) => {
                    tracing::warn!(action = %spec.name, %room, "`subscribe` made an invalid room name: not subscribing");
                    None
                }
                Err(e) => {
                    tracing::warn!(action = %spec.name, error = %e, "cannot fill the `subscribe` room: not subscribing");
                    None
                }
            }
        });
        let Some(room) = room else {
            return self.send(protocol::success(
                &spec.name,
                &request_id,
                &success.payload,
                success.meta,
            ));
        };
        if let Err(e) = self
            .app
            .rooms
            .join(self.peer.conn_id, &room, self.app.config.max_rooms)
        {
            tracing::warn!(%room, error = %e, "cannot join the `subscribe` room");
            return self.send(protocol::success(
                &spec.name,
                &request_id,
                &success.payload,
                success.meta,
            ));
        }
        if self.grants.len() < GRANTS_PER_ROOM_LIMIT * self.app.config.max_rooms {
            self.grants.insert(room.clone());
        }
        let token = self
            .app
            .room_tokens
            .issue(&room, self.peer.identity.user_id.as_deref());
        success
            .meta
            .insert("subscribed".into(), Value::String(room.clone()));
        success
            .meta
            .insert("roomToken".into(), Value::String(token));
        self.after_bus_subscribe(
            room,
            spec.name.clone(),
            request_id,
            success,
            OnBusDown::Succeed,
        );
    }

    fn on_subscribe(&mut self, req: Request) {
        let (room, token) = match room_payload(&req.payload) {
            Ok(r) => r,
            Err(e) => return self.fail(&req.name, &req.request_id, &e),
        };
        let user = self.peer.identity.user_id.as_deref();
        let allowed = self
            .peer
            .identity
            .may_join(&room, &self.app.config.public_rooms)
            || self.grants.contains(&room)
            || token
                .as_deref()
                .is_some_and(|t| self.app.room_tokens.verify(t, &room, user));
        if !allowed {
            return self.fail(
                &req.name,
                &req.request_id,
                &ActionError::new(
                    Code::Forbidden,
                    format!("this connection may not join {room}"),
                ),
            );
        }
        let added = match self
            .app
            .rooms
            .join(self.peer.conn_id, &room, self.app.config.max_rooms)
        {
            Ok(added) => added,
            Err(e @ JoinError::TooMany(_)) => {
                return self.fail(
                    &req.name,
                    &req.request_id,
                    &ActionError::new(Code::Forbidden, e.to_string()),
                );
            }
            Err(JoinError::Gone) => return,
        };
        let reply = Success {
            payload: serde_json::value::to_raw_value(&json!({ "room": room }))
                .expect("JSON values always serialize"),
            meta: Map::new(),
        };
        self.after_bus_subscribe(
            room,
            req.name,
            req.request_id,
            reply,
            OnBusDown::Fail { leave: added },
        );
    }

    /// Sends `reply` as `<name>_SUCCESS` once the bus confirms the subscription to `room`;
    /// `on_bus_down` says what to do if it cannot.
    fn after_bus_subscribe(
        &mut self,
        room: String,
        name: String,
        request_id: String,
        reply: Success,
        on_bus_down: OnBusDown,
    ) {
        let app = self.app.clone();
        let conn_id = self.peer.conn_id;
        self.pending.push(
            async move {
                if let Err(e) = app.bus.subscribe(&room).await {
                    tracing::warn!(%room, error = %e, "the bus could not confirm a subscription");
                    if let OnBusDown::Fail { leave } = on_bus_down {
                        if leave && app.rooms.leave(conn_id, &room) {
                            let _ = app.bus.unsubscribe(&room).await;
                        }
                        let err = ActionError::new(
                            Code::UpstreamUnavailable,
                            "the bus is unavailable; try again",
                        )
                        .with_status(503);
                        return Done::Reply(protocol::failure(&name, &request_id, &err));
                    }
                }
                Done::Reply(protocol::success(
                    &name,
                    &request_id,
                    &reply.payload,
                    reply.meta,
                ))
            }
            .boxed(),
        );
    }

    fn on_unsubscribe(&mut self, req: Request) {
        let (room, _) = match room_payload(&req.payload) {
            Ok(r) => r,
            Err(e) => return self.fail(&req.name, &req.request_id, &e),
        };
        let reply = protocol::success(
            &req.name,
            &req.request_id,
            &json!({ "room": room }),
            Map::new(),
        );
        if self.app.rooms.leave(self.peer.conn_id, &room) {
            let app = self.app.clone();
            self.pending.push(
                async move {
                    if let Err(e) = app.bus.unsubscribe(&room).await {
                        tracing::warn!(%room, error = %e, "bus unsubscribe failed");
                    }
                    Done::Reply(reply)
                }
                .boxed(),
            );
        } else {
            self.send(reply);
        }
    }
}

/// `{"room": "...", "token"?: "..."}` of SUBSCRIBE / UNSUBSCRIBE.
fn room_payload(payload: &Value) -> Result<(String, Option<String>), ActionError> {
    let invalid = |m: &str| ActionError::new(Code::InvalidPayload, m);
    let room = payload
        .get("room")
        .and_then(Value::as_str)
        .ok_or_else(|| invalid("payload.room must be a string"))?;
    if !valid_room(room) {
        return Err(invalid(
            "payload.room must be 1-128 bytes of printable ASCII without whitespace",
        ));
    }
    let token = match payload.get("token") {
        None | Some(Value::Null) => None,
        Some(Value::String(t)) => Some(t.clone()),
        Some(_) => return Err(invalid("payload.token must be a string")),
    };
    Ok((room.to_string(), token))
}

/// The close code for a read error, or `None` when the connection is simply gone.
fn read_error_disconnect(e: &WsError) -> Option<Disconnect> {
    use tokio_tungstenite::tungstenite::error::ProtocolError;
    match e {
        WsError::Capacity(_) => Some(Disconnect::TooLarge),
        WsError::Utf8(_) => Some(Disconnect::BadUtf8),
        // A closed tab or a lost network, not a misbehaving client.
        WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => None,
        WsError::Protocol(_) => Some(Disconnect::Protocol),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    //! The session driven in-process over an in-memory duplex pipe: no TCP, virtual time.

    use super::*;
    use crate::config::Config;
    use crate::registry::Registry;
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::protocol::Role;

    async fn pair(
        config: Config,
    ) -> (
        WebSocketStream<tokio::io::DuplexStream>,
        tokio::task::JoinHandle<()>,
    ) {
        let app = App::new(config, Registry::default()).unwrap();
        let (server_io, client_io) = tokio::io::duplex(64 * 1024);
        let server = WebSocketStream::from_raw_socket(server_io, Role::Server, None).await;
        let client = WebSocketStream::from_raw_socket(client_io, Role::Client, None).await;
        let peer = Peer {
            conn_id: 1,
            connection_id: "c1".into(),
            identity: Identity::default(),
            forwarded: Arc::default(),
        };
        (client, tokio::spawn(run(server, app, peer)))
    }

    async fn next_json(ws: &mut WebSocketStream<tokio::io::DuplexStream>) -> Value {
        loop {
            match ws.next().await.expect("open").expect("no error") {
                Message::Text(t) => return serde_json::from_str(t.as_str()).unwrap(),
                Message::Ping(_) | Message::Pong(_) => continue,
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn greets_answers_and_reports_unknown_actions() {
        let (mut ws, _session) = pair(Config::default()).await;
        assert_eq!(next_json(&mut ws).await["payload"]["connectionId"], "c1");
        ws.send(Message::Text(
            r#"{"type":"@@patchbay/PING_REQUEST","meta":{"requestId":"p1"}}"#.into(),
        ))
        .await
        .unwrap();
        assert_eq!(
            next_json(&mut ws).await,
            json!({"type":"@@patchbay/PING_SUCCESS","payload":{},"meta":{"requestId":"p1"}})
        );
        ws.send(Message::Text(
            r#"{"type":"NOPE_REQUEST","meta":{"requestId":"n1"}}"#.into(),
        ))
        .await
        .unwrap();
        let reply = next_json(&mut ws).await;
        assert_eq!(
            (reply["type"].as_str(), reply["payload"]["code"].as_str()),
            (Some("NOPE_FAILURE"), Some("unknown_action"))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_client_is_closed_after_the_idle_timeout() {
        let config = Config {
            idle_timeout: Duration::from_secs(30),
            ping_interval: Duration::from_secs(3600),
            ..Config::default()
        };
        let (mut ws, session) = pair(config).await;
        next_json(&mut ws).await;
        let started = Instant::now();
        let close = loop {
            match ws.next().await {
                Some(Ok(Message::Close(frame))) => break frame,
                Some(Ok(_)) => continue,
                other => panic!("expected a close frame, got {other:?}"),
            }
        };
        assert_eq!(close.map(|f| u16::from(f.code)), Some(1000));
        assert!(started.elapsed() >= Duration::from_secs(30));
        drop(ws);
        session.await.unwrap();
    }
}
