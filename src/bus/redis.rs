//! The Redis bus (contract section 4): many instances behind a load balancer, and task workers
//! in any language publishing progress.
//!
//! One pub/sub connection and one command connection per instance, each healing itself: a
//! connection Redis closed (its idle `timeout`, `CLIENT KILL`, a restart) is replaced with
//! backoff and the next command works. A single worker task owns the pub/sub connection: it
//! reads messages and delivers them locally (never waiting on a client: delivery is
//! `try_send`), applies subscription changes in order, pings Redis, and reconnects with capped
//! exponential backoff, re-subscribing every room in use. The command connection is replaced
//! as soon as a command finds it dead (and that command retried once on the new one), and a
//! health task exercises it every few seconds, so readiness covers both connections.
//!
//! A Redis that *refuses* patchbay (wrong password, a missing ACL permission) is not a network
//! blip: the bus reports it as a [`Bus::refusal`], and `/readyz` fails so a bad rollout fails
//! its health checks.
//!
//! Publishing to several rooms sends the envelope once, to a small Lua script that publishes
//! it on each room's channel inside Redis: patchbay's memory for one publish is the body plus
//! the room names, never one copy of the body per room.
//!
//! An instance subscribes to a room's channel only while at least one of its own connections is
//! in the room. Subscribing to every room on every instance would make each instance receive,
//! parse and drop the traffic of every user in the system; per-room subscriptions keep the work
//! of an instance proportional to its own clients. Task progress is the exception the contract
//! asks for: every instance PSUBSCRIBEs the task pattern and receives all of it, delivering only
//! to its local members of `task:<id>` and `user:<id>`.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::future::{BoxFuture, FutureExt};
use redis::aio::{MultiplexedConnection, PubSubSink, PubSubStream};
use serde_json::value::RawValue;
use serde_json::{Map, Value, json};
use tokio::sync::{mpsc, oneshot};

use super::{Bus, BusCounters, BusError, BusStatus};
use crate::protocol::{check_action_object, check_server_action};
use crate::rooms::{Rooms, valid_room};

/// How long one Redis operation (connect, subscribe, ping) may take before the connection is
/// considered dead.
const OP_TIMEOUT: Duration = Duration::from_secs(3);
/// How often the pub/sub connection is pinged: a silent network partition is noticed this fast.
const HEALTH_INTERVAL: Duration = Duration::from_secs(5);
/// First and largest reconnect delay.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Envelope ids remembered for de-duplication. An envelope is published once per target room;
/// its copies arrive back to back, so a few thousand ids are plenty.
const DEDUPE_IDS: usize = 8192;
/// Channels per SUBSCRIBE command when re-subscribing after a reconnect.
const RESUBSCRIBE_CHUNK: usize = 1000;
/// Subscription requests applied in one batch.
const SYNC_BATCH: usize = 512;
/// Publishes `ARGV[1]` on every channel `ARGV[2..]`; returns the receivers. One call carries
/// the message once, however many channels it goes to.
const PUBLISH_ALL: &str =
    "local n = 0 for i = 2, #ARGV do n = n + redis.call('PUBLISH', ARGV[i], ARGV[1]) end return n";

/// A request to make the Redis subscription of `room` match local membership.
struct Sync {
    room: String,
    done: Option<oneshot::Sender<Result<(), BusError>>>,
}

/// State shared between the bus handle and its worker.
struct Shared {
    /// The pub/sub connection is up.
    connected: AtomicBool,
    /// Rooms subscribed on the current pub/sub connection; written only by the worker.
    /// `std` lock: held for set operations only, never across an `.await`.
    active: RwLock<HashSet<String>>,
    /// Why Redis refused the pub/sub connection, while it does.
    pubsub_refused: Mutex<Option<String>>,
    commands: Commands,
    counters: BusCounters,
}

/// The command connection: created on first use, replaced when found dead.
struct Commands {
    client: redis::Client,
    /// `tokio` lock: held across a connect, so concurrent commands that find no connection
    /// wait for one new connection instead of each opening their own.
    slot: tokio::sync::Mutex<Slot>,
    /// The last command (or health check) succeeded.
    healthy: AtomicBool,
    /// Why Redis refused the last command, while it does. `std` lock, never held across an
    /// `.await`.
    refused: Mutex<Option<String>>,
}

/// The command connection and what the last attempt to open one said.
#[derive(Default)]
struct Slot {
    /// The connection and its generation: a command that found generation `n` dead clears the
    /// slot only if it still holds `n`, never a newer connection another command just opened.
    conn: Option<(u64, MultiplexedConnection)>,
    generation: u64,
    /// The last failed connect: commands arriving soon after get its error at once instead of
    /// each waiting out its own connect while Redis is unreachable.
    failed: Option<(tokio::time::Instant, redis::RedisError)>,
}

/// How long a failed connect is answered from memory.
const CONNECT_BACKOFF: Duration = Duration::from_secs(1);

impl Commands {
    /// The current connection with its generation, or a new one; `true` with a new one.
    async fn connection(&self) -> Result<(u64, MultiplexedConnection, bool), redis::RedisError> {
        let mut slot = self.slot.lock().await;
        if let Some((generation, conn)) = slot.conn.as_ref() {
            return Ok((*generation, conn.clone(), false));
        }
        if let Some((at, e)) = &slot.failed
            && at.elapsed() < CONNECT_BACKOFF
        {
            return Err(e.clone());
        }
        let config = connection_config();
        let connect = tokio::time::timeout(
            OP_TIMEOUT,
            self.client
                .get_multiplexed_async_connection_with_config(&config),
        );
        match connect.await.map_err(|_| timed_out()).and_then(|r| r) {
            Ok(conn) => {
                slot.generation += 1;
                slot.conn = Some((slot.generation, conn.clone()));
                slot.failed = None;
                Ok((slot.generation, conn, true))
            }
            Err(e) => {
                slot.failed = Some((tokio::time::Instant::now(), e.clone()));
                Err(e)
            }
        }
    }

    /// Forgets connection `generation` if it is still the current one.
    async fn discard(&self, generation: u64) {
        let mut slot = self.slot.lock().await;
        if slot.conn.as_ref().is_some_and(|(g, _)| *g == generation) {
            slot.conn = None;
        }
    }

    /// Runs `cmd` on the command connection. An existing connection found closed is replaced
    /// and the command tried once more on the new one: Redis closes idle connections by
    /// itself, and the command after that must not fail for it. A command that timed out is
    /// not tried again (Redis may have run it), but its connection is replaced.
    async fn query<T: redis::FromRedisValue>(
        &self,
        cmd: &redis::Cmd,
    ) -> Result<T, redis::RedisError> {
        let mut retried = false;
        loop {
            let mut used: Option<(u64, bool)> = None;
            let result = async {
                let (generation, mut conn, fresh) = self.connection().await?;
                used = Some((generation, fresh));
                tokio::time::timeout(OP_TIMEOUT, cmd.query_async::<T>(&mut conn))
                    .await
                    .map_err(|_| timed_out())?
            }
            .await;
            match result {
                Ok(v) => {
                    self.healthy.store(true, Ordering::Release);
                    *self.refused.lock().unwrap() = None;
                    return Ok(v);
                }
                Err(e) => {
                    if let Some((generation, fresh)) = used
                        && is_dead(&e)
                    {
                        self.discard(generation).await;
                        // Closed before we wrote: nothing ran, so trying again is safe.
                        if !fresh && !retried && !e.is_timeout() {
                            retried = true;
                            continue;
                        }
                    }
                    self.healthy.store(false, Ordering::Release);
                    *self.refused.lock().unwrap() = refusal(&e);
                    return Err(e);
                }
            }
        }
    }
}

/// The error of an operation that took longer than [`OP_TIMEOUT`].
fn timed_out() -> redis::RedisError {
    redis::RedisError::from(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        "Redis did not answer in time",
    ))
}

/// Whether `e` means the connection must be replaced.
fn is_dead(e: &redis::RedisError) -> bool {
    e.is_connection_dropped() || e.is_io_error() || e.is_timeout() || e.is_unrecoverable_error()
}

/// What to tell the operator when `e` says Redis refuses patchbay itself (as opposed to being
/// unreachable): fixing it needs a configuration change, not patience.
fn refusal(e: &redis::RedisError) -> Option<String> {
    use redis::{ErrorKind, ServerErrorKind};
    let detail = e.detail().map(|d| crate::error::clip(d).into_owned());
    match (e.kind(), e.code()) {
        (ErrorKind::AuthenticationFailed, _) | (_, Some("WRONGPASS")) => Some(
            "Redis refused patchbay's credentials: check the user and password in PATCHBAY_REDIS_URL"
                .to_string(),
        ),
        (_, Some("NOAUTH")) => Some(
            "Redis requires authentication: put the user and password in PATCHBAY_REDIS_URL"
                .to_string(),
        ),
        (ErrorKind::Server(ServerErrorKind::NoPerm), _) | (_, Some("NOPERM")) => Some(format!(
            "Redis refused a command for lack of an ACL permission: {}",
            detail.unwrap_or_default()
        )),
        _ => None,
    }
}

/// Timeouts of every connection patchbay opens.
fn connection_config() -> redis::AsyncConnectionConfig {
    redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(OP_TIMEOUT))
        .set_response_timeout(Some(OP_TIMEOUT))
}

/// A [`Bus`] over Redis pub/sub.
pub struct RedisBus {
    prefix: String,
    shared: Arc<Shared>,
    sync: mpsc::Sender<Sync>,
}

impl RedisBus {
    /// Starts the bus worker for `url`; it connects in the background and keeps reconnecting.
    /// `task_pattern` must contain exactly one `*` (checked by the configuration).
    pub fn start(
        url: &str,
        prefix: &str,
        task_pattern: &str,
        max_rooms: usize,
        rooms: Arc<Rooms>,
    ) -> Result<RedisBus, redis::RedisError> {
        let client = redis::Client::open(url)?;
        let shared = Arc::new(Shared {
            connected: AtomicBool::new(false),
            active: RwLock::default(),
            pubsub_refused: Mutex::default(),
            commands: Commands {
                client: client.clone(),
                slot: tokio::sync::Mutex::default(),
                healthy: AtomicBool::new(false),
                refused: Mutex::default(),
            },
            counters: BusCounters::default(),
        });
        tokio::spawn(check_commands(
            Arc::downgrade(&shared),
            format!("{prefix}:health"),
        ));
        let (sync, sync_rx) = mpsc::channel(4096);
        let worker = Worker {
            client,
            room_prefix: format!("{prefix}:room:"),
            task_pattern: task_pattern.to_string(),
            max_rooms,
            rooms,
            shared: shared.clone(),
            sync_rx,
            seen: Dedupe::default(),
        };
        tokio::spawn(worker.run());
        Ok(RedisBus {
            prefix: prefix.to_string(),
            shared,
            sync,
        })
    }

    fn channel(&self, room: &str) -> String {
        format!("{}:room:{room}", self.prefix)
    }

    async fn request_sync(&self, room: &str, wait: bool) -> Result<(), BusError> {
        let (done, rx) = if wait {
            Some(oneshot::channel()).unzip()
        } else {
            (None, None)
        };
        self.sync
            .send(Sync {
                room: room.to_string(),
                done,
            })
            .await
            .map_err(|_| BusError::Unavailable("the Redis bus worker stopped".into()))?;
        match rx {
            Some(rx) => rx.await.unwrap_or_else(|_| {
                Err(BusError::Unavailable("the Redis bus worker stopped".into()))
            }),
            None => Ok(()),
        }
    }
}

fn disconnected() -> BusError {
    BusError::Unavailable("Redis is disconnected".into())
}

impl Bus for RedisBus {
    fn publish(
        &self,
        rooms: Vec<String>,
        action: Map<String, Value>,
    ) -> BoxFuture<'_, Result<(), BusError>> {
        async move {
            // One room: the action itself. Several: one envelope, published on each room's
            // channel by one script call that carries it once; receivers de-duplicate by id.
            let cmd = if let [room] = rooms.as_slice() {
                let mut cmd = redis::cmd("PUBLISH");
                cmd.arg(self.channel(room))
                    .arg(Value::Object(action).to_string());
                cmd
            } else {
                let envelope = json!({"id": uuid::Uuid::new_v4().to_string(), "rooms": rooms, "action": action})
                    .to_string();
                let mut cmd = redis::cmd("EVAL");
                cmd.arg(PUBLISH_ALL).arg(0).arg(envelope);
                for room in &rooms {
                    cmd.arg(self.channel(room));
                }
                cmd
            };
            match self.shared.commands.query::<i64>(&cmd).await {
                Ok(_) => {
                    self.shared
                        .counters
                        .published
                        .fetch_add(rooms.len() as u64, Ordering::Relaxed);
                    Ok(())
                }
                Err(e) => Err(BusError::Unavailable(format!("Redis publish failed: {e}"))),
            }
        }
        .boxed()
    }

    fn subscribe(&self, room: &str) -> BoxFuture<'_, Result<(), BusError>> {
        let room = room.to_string();
        async move {
            if !self.shared.connected.load(Ordering::Acquire) {
                return Err(disconnected());
            }
            // Fast path: subscribed and confirmed. The worker removes a room from `active` before
            // it unsubscribes, and decides every change from current membership, so a queued
            // unsubscribe of this room will now keep it.
            if self.shared.active.read().unwrap().contains(&room) {
                return Ok(());
            }
            self.request_sync(&room, true).await
        }
        .boxed()
    }

    fn unsubscribe(&self, room: &str) -> BoxFuture<'_, Result<(), BusError>> {
        let room = room.to_string();
        async move { self.request_sync(&room, false).await }.boxed()
    }

    fn counters(&self) -> &BusCounters {
        &self.shared.counters
    }

    fn status(&self) -> BusStatus {
        if self.shared.connected.load(Ordering::Acquire)
            && self.shared.commands.healthy.load(Ordering::Acquire)
        {
            BusStatus::Connected
        } else {
            BusStatus::Disconnected
        }
    }

    fn refusal(&self) -> Option<String> {
        let pubsub = self.shared.pubsub_refused.lock().unwrap().clone();
        pubsub.or_else(|| self.shared.commands.refused.lock().unwrap().clone())
    }
}

/// Exercises the command connection every [`HEALTH_INTERVAL`] with what publishing needs
/// (the multi-room script and a PUBLISH, to a channel nobody reads), so readiness reflects it
/// and a connection Redis closed is replaced before a publish needs it. Ends with the bus.
async fn check_commands(shared: std::sync::Weak<Shared>, channel: String) {
    let mut check = redis::cmd("EVAL");
    check.arg(PUBLISH_ALL).arg(0).arg("").arg(&channel);
    loop {
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let was_healthy = shared.commands.healthy.load(Ordering::Acquire);
        match shared.commands.query::<i64>(&check).await {
            Ok(_) if !was_healthy => tracing::info!("Redis command connection ready"),
            Ok(_) => {}
            Err(e) if was_healthy => {
                tracing::warn!(error = %e, "Redis command connection failed; replacing it")
            }
            Err(e) => tracing::debug!(error = %e, "Redis command connection still failing"),
        }
        drop(shared);
        tokio::time::sleep(HEALTH_INTERVAL).await;
    }
}

/// Recently delivered envelope ids.
#[derive(Default)]
struct Dedupe {
    ids: HashSet<String>,
    order: VecDeque<String>,
}

impl Dedupe {
    /// Whether `id` was delivered recently.
    fn contains(&self, id: &str) -> bool {
        self.ids.contains(id)
    }

    /// Records a delivered `id`, forgetting the oldest beyond [`DEDUPE_IDS`].
    fn insert(&mut self, id: String) {
        if self.ids.contains(&id) {
            return;
        }
        if self.order.len() == DEDUPE_IDS
            && let Some(old) = self.order.pop_front()
        {
            self.ids.remove(&old);
        }
        self.ids.insert(id.clone());
        self.order.push_back(id);
    }
}

/// The top-level fields of a room message, borrowed from its bytes: enough to tell an action
/// from an envelope and to check an envelope's id before parsing the rest.
#[derive(serde::Deserialize)]
struct Probe<'a> {
    #[serde(rename = "type", default, borrow)]
    ty: Option<&'a RawValue>,
    #[serde(default, borrow)]
    id: Option<&'a RawValue>,
    #[serde(default, borrow)]
    rooms: Option<&'a RawValue>,
    #[serde(default, borrow)]
    action: Option<&'a RawValue>,
}

/// Why a served connection ended.
enum Ended {
    /// The bus handle is gone: stop for good.
    Stopped,
    /// Redis went away: reconnect.
    Lost(String),
}

struct Worker {
    client: redis::Client,
    room_prefix: String,
    task_pattern: String,
    /// `PATCHBAY_MAX_PUBLISH_ROOMS`: an envelope naming more rooms is dropped.
    max_rooms: usize,
    rooms: Arc<Rooms>,
    shared: Arc<Shared>,
    sync_rx: mpsc::Receiver<Sync>,
    seen: Dedupe,
}

impl Worker {
    async fn run(mut self) {
        let mut delay = BACKOFF_MIN;
        let mut was_connected = true; // so that a first failure is logged
        loop {
            match self.connect().await {
                Ok((sink, stream)) => {
                    *self.shared.pubsub_refused.lock().unwrap() = None;
                    match self.serve(sink, stream).await {
                        Ended::Stopped => return,
                        Ended::Lost(why) => {
                            tracing::warn!(reason = %why, "Redis connection lost; pushes paused, reconnecting")
                        }
                    }
                    self.set_disconnected();
                    was_connected = true;
                    delay = BACKOFF_MIN;
                }
                Err(e) => {
                    let why = refusal(&e);
                    let mut refused = self.shared.pubsub_refused.lock().unwrap();
                    if why.is_some() && *refused != why {
                        tracing::error!(
                            reason = why.as_deref().unwrap_or_default(),
                            "Redis refuses patchbay: /readyz fails until this is fixed"
                        );
                    } else if was_connected {
                        tracing::warn!(error = %e, "cannot connect to Redis; pushes paused, retrying");
                    } else {
                        tracing::debug!(error = %e, "Redis still unreachable");
                    }
                    *refused = why;
                    was_connected = false;
                }
            }
            // Wait before the next attempt, answering subscription requests meanwhile.
            let sleep = tokio::time::sleep(jitter(delay));
            tokio::pin!(sleep);
            loop {
                tokio::select! {
                    _ = &mut sleep => break,
                    sync = self.sync_rx.recv() => match sync {
                        Some(s) => answer(s, Err(disconnected())),
                        None => return,
                    },
                }
            }
            delay = (delay * 2).min(BACKOFF_MAX);
        }
    }

    fn set_disconnected(&self) {
        self.shared.connected.store(false, Ordering::Release);
        self.shared.active.write().unwrap().clear();
    }

    /// Opens the pub/sub connection and subscribes to the task pattern and every room in use.
    async fn connect(&mut self) -> Result<(PubSubSink, PubSubStream), redis::RedisError> {
        let setup = async {
            let (mut sink, stream) = self.client.get_async_pubsub().await?.split();
            sink.psubscribe(&self.task_pattern).await?;
            let rooms = self.rooms.room_names();
            for chunk in rooms.chunks(RESUBSCRIBE_CHUNK) {
                let channels: Vec<String> = chunk
                    .iter()
                    .map(|r| format!("{}{r}", self.room_prefix))
                    .collect();
                sink.subscribe(&channels).await?;
            }
            Ok::<_, redis::RedisError>((sink, stream, rooms))
        };
        let (sink, stream, rooms) = tokio::time::timeout(OP_TIMEOUT * 2, setup)
            .await
            .map_err(|_| timed_out())??;
        let count = rooms.len();
        *self.shared.active.write().unwrap() = rooms.into_iter().collect();
        self.shared.connected.store(true, Ordering::Release);
        tracing::info!(rooms = count, pattern = %self.task_pattern, "connected to Redis");
        Ok((sink, stream))
    }

    async fn serve(&mut self, mut sink: PubSubSink, mut stream: PubSubStream) -> Ended {
        let mut health = tokio::time::interval(HEALTH_INTERVAL);
        health.reset();
        loop {
            tokio::select! {
                biased;
                msg = stream.next() => match msg {
                    Some(msg) => self.on_message(&msg),
                    None => return Ended::Lost("the pub/sub connection closed".into()),
                },
                first = self.sync_rx.recv() => {
                    let Some(first) = first else { return Ended::Stopped };
                    let mut batch = vec![first];
                    while batch.len() < SYNC_BATCH {
                        match self.sync_rx.try_recv() {
                            Ok(s) => batch.push(s),
                            Err(_) => break,
                        }
                    }
                    if let Err(e) = self.apply(&mut sink, batch).await {
                        return Ended::Lost(e);
                    }
                }
                _ = health.tick() => {
                    match tokio::time::timeout(OP_TIMEOUT, sink.ping::<redis::Value>()).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => return Ended::Lost(format!("ping failed: {e}")),
                        Err(_) => return Ended::Lost("ping timed out".into()),
                    }
                }
            }
        }
    }

    /// Makes the subscriptions of the batch's rooms match current local membership.
    async fn apply(&mut self, sink: &mut PubSubSink, batch: Vec<Sync>) -> Result<(), String> {
        let (mut add, mut remove) = (Vec::new(), Vec::new());
        {
            let active = self.shared.active.read().unwrap();
            let mut decided = HashSet::new();
            for s in &batch {
                if !decided.insert(s.room.as_str()) {
                    continue;
                }
                match (self.rooms.has_members(&s.room), active.contains(&s.room)) {
                    (true, false) => add.push(s.room.clone()),
                    (false, true) => remove.push(s.room.clone()),
                    _ => {}
                }
            }
        }
        // Forget removed rooms *before* unsubscribing: a join racing with this batch then
        // misses the fast path in `subscribe` and queues a sync that subscribes the room again.
        {
            let mut active = self.shared.active.write().unwrap();
            for room in &remove {
                active.remove(room);
            }
        }
        let channels = |rooms: &[String]| {
            rooms
                .iter()
                .map(|r| format!("{}{r}", self.room_prefix))
                .collect::<Vec<_>>()
        };
        let result = async {
            if !add.is_empty() {
                sink.subscribe(channels(&add)).await?;
            }
            if !remove.is_empty() {
                sink.unsubscribe(channels(&remove)).await?;
            }
            Ok::<_, redis::RedisError>(())
        };
        let outcome = match tokio::time::timeout(OP_TIMEOUT, result).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(format!("subscription change failed: {e}")),
            Err(_) => Err("subscription change timed out".to_string()),
        };
        // Added rooms count as active only once Redis confirmed them: until then `subscribe`
        // callers wait for their own sync instead of taking the fast path.
        if outcome.is_ok() {
            self.shared.active.write().unwrap().extend(add);
        }
        for s in batch {
            answer(s, outcome.clone().map_err(BusError::Unavailable));
        }
        outcome
    }

    fn on_message(&mut self, msg: &redis::Msg) {
        self.shared
            .counters
            .received
            .fetch_add(1, Ordering::Relaxed);
        let channel = msg.get_channel_name();
        let bytes = msg.get_payload_bytes();
        let delivered = if msg.from_pattern() {
            task_id(&self.task_pattern, channel)
                .zip(serde_json::from_slice(bytes).ok())
                .is_some_and(|(id, task)| self.on_task(id, task))
        } else if let Some(room) = channel.strip_prefix(&self.room_prefix) {
            self.on_room_message(room, bytes)
        } else {
            false
        };
        if !delivered {
            let n = self
                .shared
                .counters
                .malformed
                .fetch_add(1, Ordering::Relaxed)
                + 1;
            // Warn, but never in a hot loop: a broken publisher could send thousands a second.
            if n <= 10 || n.is_power_of_two() {
                tracing::warn!(%channel, dropped_so_far = n, "dropped a malformed bus message");
            }
        }
    }

    /// An action, or an envelope `{"id","rooms","action"}`. Returns false if malformed.
    ///
    /// An envelope arrives once per target room this instance is subscribed to: only its id
    /// is read before the de-duplication check, so the repeats cost a scan, not a parse.
    fn on_room_message(&mut self, room: &str, bytes: &[u8]) -> bool {
        let Ok(probe) = serde_json::from_slice::<Probe<'_>>(bytes) else {
            return false;
        };
        if probe.ty.is_some() {
            let Ok(obj) = serde_json::from_slice::<Map<String, Value>>(bytes) else {
                return false;
            };
            if check_action_object(&obj).is_err() {
                return false;
            }
            self.shared
                .counters
                .count(self.rooms.deliver(&[room.to_string()], &obj));
            return true;
        }
        let (Some(id), Some(rooms), Some(action)) = (probe.id, probe.rooms, probe.action) else {
            return false;
        };
        let Ok(id) = serde_json::from_str::<String>(id.get()) else {
            return false;
        };
        if self.seen.contains(&id) {
            return true;
        }
        let (Ok(rooms), Ok(action)) = (
            serde_json::from_str::<Vec<String>>(rooms.get()),
            serde_json::from_str::<Value>(action.get()),
        ) else {
            return false;
        };
        if rooms.len() > self.max_rooms
            || !rooms.iter().all(|r| valid_room(r))
            || check_server_action(&action).is_err()
        {
            return false;
        }
        let Value::Object(action) = action else {
            return false;
        };
        self.seen.insert(id);
        self.shared
            .counters
            .count(self.rooms.deliver(&rooms, &action));
        true
    }

    /// Task progress in the Patchbay task-manager format. Returns false if malformed.
    fn on_task(&mut self, id: &str, task: Value) -> bool {
        if !task.is_object() {
            return false;
        }
        let task_room = format!("task:{id}");
        if !valid_room(&task_room) {
            return false;
        }
        let mut rooms = vec![task_room];
        let user = match task.get("userId") {
            Some(Value::String(u)) if !u.is_empty() => Some(u.clone()),
            Some(Value::Number(n)) => Some(n.to_string()),
            _ => None,
        };
        if let Some(user_room) = user.map(|u| format!("user:{u}")).filter(|r| valid_room(r)) {
            rooms.push(user_room);
        }
        let action = Map::from_iter([
            ("type".to_string(), json!("TASK_PROGRESS")),
            ("payload".to_string(), task),
        ]);
        self.shared
            .counters
            .count(self.rooms.deliver(&rooms, &action));
        true
    }
}

fn answer(sync: Sync, result: Result<(), BusError>) {
    if let Some(done) = sync.done {
        let _ = done.send(result);
    }
}

/// The part of `channel` matched by the single `*` of `pattern`.
fn task_id<'a>(pattern: &str, channel: &'a str) -> Option<&'a str> {
    let (prefix, suffix) = pattern.split_once('*')?;
    channel
        .strip_prefix(prefix)?
        .strip_suffix(suffix)
        .filter(|id| !id.is_empty())
}

/// `delay` scaled by a random factor in [0.5, 1): instances that lost Redis together do not
/// all come back in the same millisecond.
fn jitter(delay: Duration) -> Duration {
    let random = (uuid::Uuid::new_v4().as_u128() % 1000) as u32;
    delay / 2 + delay * random / 2000
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_ids_come_from_the_star() {
        assert_eq!(task_id("tasks.*", "tasks.42"), Some("42"));
        assert_eq!(task_id("tasks.*", "tasks."), None);
        assert_eq!(task_id("tasks.*", "other.42"), None);
        assert_eq!(task_id("app:*:progress", "app:7:progress"), Some("7"));
    }

    #[test]
    fn dedupe_remembers_a_bounded_window() {
        let mut d = Dedupe::default();
        assert!(!d.contains("a"));
        d.insert("a".into());
        assert!(d.contains("a"));
        d.insert("a".into());
        assert_eq!(d.order.len(), 1, "inserting twice records once");
        for i in 0..DEDUPE_IDS {
            d.insert(i.to_string());
        }
        assert!(!d.contains("a"), "the oldest ids are forgotten");
        assert_eq!(d.ids.len(), DEDUPE_IDS);
    }

    #[test]
    fn refusals_are_told_apart_from_outages() {
        let auth = redis::RedisError::from((redis::ErrorKind::AuthenticationFailed, "nope"));
        assert!(refusal(&auth).unwrap().contains("credentials"));
        let io =
            redis::RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert_eq!(refusal(&io), None);
        assert!(is_dead(&io));
        assert!(is_dead(&timed_out()));
    }

    #[test]
    fn jitter_stays_within_half_to_full() {
        for _ in 0..100 {
            let j = jitter(Duration::from_secs(4));
            assert!(
                j >= Duration::from_secs(2) && j < Duration::from_secs(4),
                "{j:?}"
            );
        }
    }
}
