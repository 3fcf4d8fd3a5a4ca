//! One client session, whatever carries it: its loop, admission and cleanup.
//!
//! A transport ([`crate::ws`]) turns what the client sends into [`Inbound`] events and writes
//! the session's [`Outbox`]; the session knows nothing of frames. Its loop `select!`s over the
//! close signal, shutdown, finished requests and the next event. Admission (the frame rate,
//! requests in flight) is decided here; what a request means is [`crate::cmd`]'s. Requests run
//! concurrently as futures owned by the loop, so per-connection state (granted rooms, the
//! in-flight count) needs no lock. Cleanup happens once, after the loop.

use std::collections::HashSet;
use std::pin::Pin;
use std::sync::Arc;

use futures_util::future::BoxFuture;
use futures_util::stream::FuturesUnordered;
use futures_util::{Stream, StreamExt};
use hyper::HeaderMap;
use serde_json::{Map, Value, json};
use tokio::time::{Instant, Sleep, sleep, sleep_until};

use crate::app::App;
use crate::auth::Identity;
use crate::cmd::{Allowed, Applied, Command, Outcome, Parsed};
use crate::error::{ActionError, Code, Disconnect};
use crate::outbox::{CloseSignal, Outbox, Text};
use crate::presence::Leave;
use crate::protocol::{self, FrameError, Request};
use crate::ratelimit::{RateLimiter, Verdict};
use crate::recovery::{Recovery, Standing};
use crate::rooms::ConnId;

/// Most rooms a connection may be granted by `subscribe`, as a multiple of
/// `PATCHBAY_MAX_ROOMS`: grants outlive leaving a room, so they need their own bound.
const GRANTS_PER_ROOM_LIMIT: usize = 4;

/// Who is on the other end of a new session.
#[derive(Debug, Clone)]
pub struct Peer {
    /// Process-local id, for the room registry.
    pub conn_id: ConnId,
    /// The id sent to the client in `@@patchbay/CONNECTED`; finds the session in the hub
    /// (made by [`crate::hub::Hub::connection_id`]).
    pub connection_id: String,
    /// The authenticated identity.
    pub identity: Identity,
    /// Handshake headers forwarded upstream.
    pub forwarded: Arc<HeaderMap>,
    /// `?since=<epoch>:<offset>`: recover the identity room from there (section 8); an
    /// unreadable value is a position of no sequence (`epoch_changed`).
    pub since: Option<crate::history::Position>,
    /// The client's address (behind `PATCHBAY_TRUSTED_PROXIES`, the one they forwarded).
    pub client: Option<std::net::IpAddr>,
}

impl Peer {
    /// The span of the session's log lines: its id, transport, client address and user.
    pub fn span(&self, transport: &'static str) -> tracing::Span {
        let client = self.client.map(|c| c.to_string());
        tracing::info_span!(
            "conn",
            id = %self.connection_id,
            transport,
            client = client.as_deref().unwrap_or("-"),
            user = self.identity.user_id.as_deref().unwrap_or("-"),
        )
    }
}

/// The session's last log line: how it ended and how long it lasted.
pub fn log_end(reason: Option<Disconnect>, opened: std::time::Instant) {
    let seconds = opened.elapsed().as_secs();
    match reason {
        Some(reason) => tracing::info!(
            code = reason.code(),
            reason = reason.reason(),
            seconds,
            "disconnected"
        ),
        None => tracing::info!(seconds, "disconnected by the client"),
    }
}

/// What a client sent, as the session sees it.
#[derive(Debug)]
pub enum Inbound {
    /// A text message: one request.
    Text(Text),
    /// A binary message: refused, the protocol is JSON text.
    Binary,
    /// A keepalive the transport answered itself.
    Ping,
    /// The answer to one of our own keepalives (not rate-limited).
    Pong,
    /// The client closed the session.
    Close,
    /// The transport failed: close with this reason, or just end when the client is gone.
    Failed(Option<Disconnect>),
}

/// Runs one session until it closes, writing to `outbox`. Never panics on client input.
pub async fn run<S>(inbound: S, outbox: Outbox, app: Arc<App>, peer: Box<Peer>)
where
    S: Stream<Item = Inbound> + Unpin,
{
    let closer = outbox.close_signal();
    app.hub
        .register(peer.conn_id, &peer.connection_id, outbox.clone());
    let registration = Registration {
        app: app.clone(),
        conn_id: peer.conn_id,
        closer: closer.clone(),
        user: peer.identity.user_id.clone(),
    };
    let mut session = Session {
        rate: RateLimiter::new(
            app.config.rate_per_sec,
            app.config.rate_burst,
            Instant::now(),
        ),
        app,
        peer,
        outbox,
        grants: HashSet::new(),
        pending: None,
        actions_in_flight: 0,
        closed_by_client: false,
    };
    // Boxed: greeting (and recovering) runs once, and its state inline would be part of the
    // future of every idle session for the whole of its life.
    if Box::pin(session.start()).await {
        session.read_loop(inbound).await;
    }
    // Cleanup, once: leave every room (the outbox the hub held goes with it).
    let how = match session.closed_by_client {
        true => Leave::Left,
        false => Leave::Timeout,
    };
    let Session { app, peer, .. } = session;
    leave_presence(&app, peer.conn_id, peer.identity.user_id.as_deref(), how);
    app.hub.leave_all(peer.conn_id).await;
    drop(registration);
}

/// Undoes the session's registration in the hub even if the session task panics: without it,
/// the room entries would keep the writer alive and the socket open forever.
struct Registration {
    app: Arc<App>,
    conn_id: ConnId,
    closer: CloseSignal,
    user: Option<String>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.closer.close(Disconnect::Internal);
            let user = self.user.as_deref();
            leave_presence(&self.app, self.conn_id, user, Leave::Timeout);
        }
        // After a normal exit the session has already left everything, and this finds nothing.
        self.app.hub.leave_all_detached(self.conn_id);
    }
}

struct Session {
    app: Arc<App>,
    peer: Box<Peer>,
    outbox: Outbox,
    /// Rooms granted on this connection by a successful action's `subscribe`.
    grants: HashSet<String>,
    /// Requests in flight, polled by the read loop.
    /// Made by the first request and let go when the last finishes: its set allocates, and
    /// most connections are idle most of the time.
    pending: Option<FuturesUnordered<BoxFuture<'static, Outcome>>>,
    /// Manifest actions among `pending` (built-ins do not count towards the cap).
    actions_in_flight: usize,
    /// Every client message counts against it.
    rate: RateLimiter,
    /// The client closed the session itself (a close frame): its presences leave at once,
    /// where a dropped connection's wait out the grace.
    closed_by_client: bool,
}

impl Session {
    /// Joins the identity's room and greets the client: with history, `positions`, and with
    /// `?since=` the recovery of that room, whose replay follows the greeting. Returns false
    /// if the session is already closing.
    async fn start(&mut self) -> bool {
        let conn = self.peer.conn_id;
        let Some(room) = self.peer.identity.user_room() else {
            let hello = protocol::connected(&self.peer.connection_id, None, &[], None);
            return self.outbox.push(hello.into());
        };
        let history = self.app.history.clone().filter(|h| h.keeps(&room));
        let asked = self.peer.since.take();
        let not_kept = asked.is_some() && history.is_none();
        let since = asked.filter(|_| history.is_some());
        let rooms = self.app.hub.rooms();
        let joined = match since {
            Some(_) => rooms.join_recovering(conn, &room, usize::MAX),
            None => rooms.join(conn, &room, usize::MAX),
        };
        let mut subscribed = true;
        if let Ok(added) = joined
            && let Err(e) = self.app.hub.confirm(&room, added).confirmed.await
        {
            tracing::warn!(%room, error = %e, "bus subscribe failed");
            subscribed = false;
        }
        let mut extra = Map::new();
        let (recovery, position) = match &history {
            // Without the subscription nothing can be promised: the client keeps its
            // position and hears that history is unavailable.
            Some(_) if !subscribed => (since.as_ref().map(Recovery::unavailable), None),
            Some(history) => {
                let ask = [(room.as_str(), since.as_ref())];
                match crate::recovery::read_all(history, &ask).await.pop() {
                    Some(Standing::Recovery(recovery)) => {
                        let position = Some(recovery.position.clone());
                        (Some(recovery), position)
                    }
                    Some(Standing::Position(position)) => (None, position),
                    None => (None, None),
                }
            }
            None => (None, None),
        };
        if let Some(position) = position {
            extra.insert("positions".into(), json!({ &room: position.to_json() }));
        }
        let user = self.peer.identity.user_id.as_deref();
        if not_kept {
            extra.insert(
                "recovery".into(),
                json!({"room": &room, "recovered": false, "reason": "not_kept", "replayed": 0}),
            );
        }
        let Some(recovery) = recovery else {
            let hello = protocol::connected(&self.peer.connection_id, user, &[room], Some(extra));
            return self.outbox.push(hello.into());
        };
        let mut fields = Map::new();
        fields.insert("room".into(), Value::String(room.clone()));
        recovery.fields(&mut fields);
        fields.remove("position");
        extra.insert("recovery".into(), Value::Object(fields));
        let hello = protocol::connected(
            &self.peer.connection_id,
            user,
            std::slice::from_ref(&room),
            Some(extra),
        );
        recovery.send(&self.app, conn, &room, hello).await;
        self.outbox.closer().reason().is_none()
    }

    async fn read_loop<S>(&mut self, mut inbound: S)
    where
        S: Stream<Item = Inbound> + Unpin,
    {
        let closer = self.outbox.close_signal();
        // One timer for the two things that happen with time on a quiet connection: the
        // transport's keepalive (a websocket ping every `ping_interval`) and the idle timeout
        // (no message from the client for `idle_timeout`). A message only moves `heard`; the
        // timer finds out when it fires.
        let idle_timeout = self.app.config.idle_timeout;
        let ping_every = self.app.config.ping_interval;
        let pings = self.outbox.pings();
        let mut heard = Instant::now();
        let mut next_ping = heard + ping_every;
        let due = |heard: Instant, next_ping: Instant, draining: bool| match (pings, draining) {
            (true, true) => next_ping,
            (true, false) => next_ping.min(heard + idle_timeout),
            (false, _) => heard + idle_timeout,
        };
        let timer = sleep_until(due(heard, next_ping, false));
        tokio::pin!(timer);
        // Every waiter and timer is created once for the whole loop, not at every iteration:
        // this loop runs for every message and every finished request. The two timers most
        // connections never need (credentials that expire, the shutdown grace) live on the
        // heap, and only when needed: inline, they would be part of every idle session.
        let mut expired = crate::auth::expires_in(&self.peer.identity)
            .map(|d| Box::pin(sleep_until(Instant::now() + d)));
        let mut grace: Option<Pin<Box<Sleep>>> = None;
        let app = self.app.clone();
        let closed = closer.fired();
        let drain = app.lifecycle.drain_started();
        tokio::pin!(closed, drain);
        let mut draining = false;
        loop {
            tokio::select! {
                biased;
                _ = &mut closed => return,
                _ = &mut drain, if !draining => {
                    draining = true;
                    grace = Some(Box::pin(sleep(app.config.shutdown_grace)));
                }
                Some(done) = next_done(&mut self.pending), if self.pending.is_some() => {
                    self.finish(done);
                    if self.pending.as_ref().is_some_and(FuturesUnordered::is_empty) {
                        self.pending = None;
                    }
                }
                _ = fire(&mut grace), if grace.is_some() => {
                    tracing::warn!(abandoned = self.pending.as_ref().map_or(0, FuturesUnordered::len), "shutdown grace ran out with requests in flight");
                    break;
                }
                _ = fire(&mut expired), if expired.is_some() => {
                    tracing::info!("credentials expired: closing with 4401");
                    closer.close(Disconnect::Expired);
                    return;
                }
                _ = &mut timer, if pings || !draining => {
                    let now = Instant::now();
                    if !draining && now >= heard + idle_timeout {
                        closer.close(Disconnect::Idle);
                        return;
                    }
                    if pings && now >= next_ping {
                        self.outbox.ping();
                        next_ping = now + ping_every;
                    }
                    timer.as_mut().reset(due(heard, next_ping, draining));
                }
                event = inbound.next(), if !draining => {
                    let now = Instant::now();
                    heard = now;
                    let verdict = match &event {
                        // Answers to our own keepalives, and failures, are not the client's rate.
                        Some(Inbound::Pong | Inbound::Failed(_)) | None => Verdict::Allow,
                        Some(_) => self.rate.check(now),
                    };
                    if verdict == Verdict::Disconnect {
                        tracing::info!("closing a client that kept flooding");
                        closer.close(Disconnect::Flood);
                        return;
                    }
                    match event {
                        Some(Inbound::Text(text)) => self.on_text(text.as_str(), verdict == Verdict::Limit),
                        Some(Inbound::Binary) => self.send(protocol::frame_error(&FrameError::binary())),
                        Some(Inbound::Ping | Inbound::Pong) => {}
                        Some(Inbound::Close) => {
                            self.closed_by_client = true;
                            return;
                        }
                        None => return,
                        Some(Inbound::Failed(reason)) => {
                            if let Some(reason) = reason {
                                closer.close(reason);
                            }
                            return;
                        }
                    }
                }
            }
            if draining && self.pending.is_none() {
                break;
            }
        }
        // Only shutdown leaves the loop with `break`.
        closer.close(Disconnect::Shutdown);
    }

    fn send(&self, text: String) {
        self.outbox.push(text.into());
    }

    /// Fails a request before it ran; a manifest request (or one that is not a built-in) is
    /// counted in the metrics.
    fn refuse(&self, req: &Request, err: ActionError) {
        if req.builtin.is_none() {
            self.count_refusal(req, &err);
        }
        self.send(protocol::failure(&req.name, &req.request_id, &err));
    }

    /// Counts a refused request under its manifest name, or `unknown` (labels stay bounded).
    fn count_refusal(&self, req: &Request, err: &ActionError) {
        let label = if self.app.registry.get(&req.name).is_some() {
            req.name.as_str()
        } else {
            "unknown"
        };
        self.app.metrics.action(label, err.code.as_str());
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
            // Counted whatever it was, built-ins included, as before commands existed.
            self.count_refusal(&req, &err);
            return self.send(protocol::failure(&req.name, &req.request_id, &err));
        }
        let allowed = Allowed {
            identity: &self.peer.identity,
            grants: &self.grants,
        };
        let command = match Command::parse(&req, &self.app, &allowed) {
            Ok(command) => command,
            Err(err) => return self.refuse(&req, err),
        };
        let parsed = Parsed {
            request: req,
            command,
        };
        if parsed.command.is_action() {
            if self.actions_in_flight >= self.app.config.max_inflight {
                let err = ActionError::new(
                    Code::TooManyRequests,
                    format!(
                        "more than {} requests in flight on this connection",
                        self.app.config.max_inflight
                    ),
                );
                return self.refuse(&parsed.request, err);
            }
            self.actions_in_flight += 1;
        }
        match parsed.apply(&self.app, self.peer.conn_id, &self.peer) {
            Applied::Now(reply) => self.send(reply),
            Applied::Later(future) => self.pending.get_or_insert_default().push(future),
            Applied::Nothing => {}
        }
    }

    fn finish(&mut self, outcome: Outcome) {
        if outcome.action {
            self.actions_in_flight -= 1;
        }
        if let Some(room) = outcome.granted
            && self.grants.len() < GRANTS_PER_ROOM_LIMIT * self.app.config.max_rooms
        {
            self.grants.insert(room);
        }
        if !outcome.reply.is_empty() {
            self.send(outcome.reply);
        }
        if let Some(then) = outcome.then {
            self.send(then);
        }
    }
}

/// The user of a closing connection leaves the presence of every room it was in.
fn leave_presence(app: &App, conn: ConnId, user: Option<&str>, how: Leave) {
    let (Some(presence), Some(user)) = (&app.presence, user) else {
        return;
    };
    for room in app.hub.rooms().rooms_of(conn) {
        if presence.tracks(&room) {
            presence.leave(&room, user, conn, how);
        }
    }
}

/// The next finished request, if there are requests.
async fn next_done(
    pending: &mut Option<FuturesUnordered<BoxFuture<'static, Outcome>>>,
) -> Option<Outcome> {
    pending.as_mut()?.next().await
}

/// Waits for an optional timer; never resolves without one.
async fn fire(timer: &mut Option<Pin<Box<Sleep>>>) {
    match timer {
        Some(timer) => timer.as_mut().await,
        None => std::future::pending().await,
    }
}
