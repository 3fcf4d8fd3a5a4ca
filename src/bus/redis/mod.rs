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
//! Redis itself is behind the [`Driver`] trait ([`RedisDriver`]; [`LocalRedis`] in-process
//! for tests); the message formats are [`super::format`]'s.
//!
//! An instance subscribes to a room's channel only while at least one of its own connections is
//! in the room. Subscribing to every room on every instance would make each instance receive,
//! parse and drop the traffic of every user in the system; per-room subscriptions keep the work
//! of an instance proportional to its own clients. Task progress is the exception the contract
//! asks for: every instance PSUBSCRIBEs the task pattern and receives all of it, delivering only
//! to its local members of `task:<id>` and `user:<id>`.

mod driver;
mod local;
mod target;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::future::{BoxFuture, FutureExt};
use futures_util::stream::BoxStream;
use serde_json::{Map, Value};
use tokio::sync::{mpsc, oneshot};

use super::format::{self, Dedupe, Incoming, Received};
use super::{Bus, BusCounters, BusError, BusStatus};
use crate::history::{Position, Reason, RedisHistory};
use crate::rooms::Rooms;

pub use driver::{
    Commands, Driver, DriverError, Msg, OP_TIMEOUT, RedisDriver, Subscriptions, connection_config,
    is_dead, refusal,
};
pub use local::LocalRedis;
pub use target::{Options as RedisOptions, Target as RedisTarget};

/// How often both connections are checked: a silent network partition is noticed this fast.
const HEALTH_INTERVAL: Duration = Duration::from_secs(5);
/// First and largest reconnect delay.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// History reads in flight at once when an instance catches up after a reconnect.
const CATCH_UP_READS: usize = 32;
/// Subscription requests applied in one batch.
const SYNC_BATCH: usize = 512;

/// A request to make the Redis subscription of `room` match local membership.
struct Sync {
    room: String,
    done: Option<oneshot::Sender<Result<(), BusError>>>,
}

/// State shared between the bus handle, its worker and its health task.
struct Shared {
    /// The pub/sub connection is up.
    connected: AtomicBool,
    /// Rooms subscribed on the current pub/sub connection; written only by the worker.
    /// `std` lock: held for set operations only, never across an `.await`.
    active: RwLock<HashSet<String>>,
    /// Why Redis refused the pub/sub connection, while it does.
    pubsub_refused: Mutex<Option<String>>,
    /// The last publish (or command health check) succeeded.
    commands_healthy: AtomicBool,
    /// Why Redis refused the last publish or check, while it does.
    commands_refused: Mutex<Option<String>>,
    counters: BusCounters,
}

impl Shared {
    /// Records the outcome of a command.
    fn command_result(&self, result: &Result<(), DriverError>) {
        self.commands_healthy
            .store(result.is_ok(), Ordering::Release);
        *self.commands_refused.lock().unwrap() =
            result.as_ref().err().and_then(|e| e.refusal.clone());
    }
}

/// What a Redis bus serves besides rooms and task progress.
#[derive(Default)]
pub struct Extras {
    /// History in Redis, when some room keeps it.
    pub history: Option<Arc<RedisHistory>>,
    /// This instance's SSE streams, reachable from other instances.
    pub sse: Arc<crate::sse::Streams>,
    /// socket.io emitter interop, when on.
    pub emitter: Option<Arc<crate::emitter::Emitter>>,
}

/// A [`Bus`] over Redis pub/sub.
pub struct RedisBus {
    prefix: String,
    driver: Arc<dyn Driver>,
    /// History in Redis, when some room keeps it: then every publish goes through the
    /// function library, which stores and publishes in one call.
    history: Option<Arc<RedisHistory>>,
    /// Commands beyond publishing (SSE streams' registry), with Redis itself.
    commands: Option<Arc<Commands>>,
    /// This instance's name: its SSE streams are reached on `<prefix>:ssei:<instance>`.
    instance: String,
    shared: Arc<Shared>,
    sync: mpsc::Sender<Sync>,
    /// The worker until it is spawned.
    worker: Mutex<Option<Worker>>,
}

impl RedisBus {
    /// Starts the bus for the Redis `target` names; it connects in the background and keeps
    /// reconnecting. `task_pattern` must contain exactly one `*` (checked by the
    /// configuration); envelopes naming more than `max_rooms` rooms are dropped.
    pub fn start(
        target: &RedisTarget,
        prefix: &str,
        task_pattern: &str,
        max_rooms: usize,
        rooms: Arc<Rooms>,
        extras: Extras,
    ) -> RedisBus {
        let driver = Arc::new(RedisDriver::open(target));
        let mut bus = Self::unstarted(driver, prefix, task_pattern, max_rooms, rooms);
        bus.history = extras.history.clone();
        bus.commands = Some(Arc::new(Commands::new(target.clone())));
        if let Some(worker) = bus.worker.get_mut().unwrap().as_mut() {
            worker.sse = Some((format!("{prefix}:ssei:{}", bus.instance), extras.sse));
            worker.emitter = extras.emitter;
        }
        bus.start_worker(extras.history);
        bus
    }

    /// Starts the bus over any [`Driver`] (an in-process [`LocalRedis`] in tests), without
    /// history.
    pub fn with_driver(
        driver: Arc<dyn Driver>,
        prefix: &str,
        task_pattern: &str,
        max_rooms: usize,
        rooms: Arc<Rooms>,
    ) -> RedisBus {
        let mut bus = Self::unstarted(driver, prefix, task_pattern, max_rooms, rooms);
        bus.start_worker(None);
        bus
    }

    fn unstarted(
        driver: Arc<dyn Driver>,
        prefix: &str,
        task_pattern: &str,
        max_rooms: usize,
        rooms: Arc<Rooms>,
    ) -> RedisBus {
        let shared = Arc::new(Shared {
            connected: AtomicBool::new(false),
            active: RwLock::default(),
            pubsub_refused: Mutex::default(),
            commands_healthy: AtomicBool::new(false),
            commands_refused: Mutex::default(),
            counters: BusCounters::default(),
        });
        tokio::spawn(check_commands(
            Arc::downgrade(&shared),
            driver.clone(),
            format!("{prefix}:health"),
        ));
        let (sync, sync_rx) = mpsc::channel(4096);
        let worker = Worker {
            driver: driver.clone(),
            room_prefix: format!("{prefix}:room:"),
            task_pattern: task_pattern.to_string(),
            max_rooms,
            rooms,
            shared: shared.clone(),
            sync_rx,
            seen: Dedupe::default(),
            history: None,
            occurrences: Occurrences::default(),
            sse: None,
            emitter: None,
        };
        RedisBus {
            prefix: prefix.to_string(),
            driver,
            history: None,
            commands: None,
            instance: uuid::Uuid::new_v4().simple().to_string(),
            shared,
            sync,
            worker: Mutex::new(Some(worker)),
        }
    }

    /// Spawns the pub/sub worker (once).
    fn start_worker(&mut self, history: Option<Arc<RedisHistory>>) {
        if let Some(mut worker) = self.worker.get_mut().unwrap().take() {
            worker.history = history;
            tokio::spawn(worker.run());
        }
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
            let id = uuid::Uuid::new_v4().to_string();
            let result = match &self.history {
                // Stored where kept and published, in one call.
                Some(history) => {
                    let text =
                        serde_json::to_string(&action).expect("JSON values always serialize");
                    let publish = history.publish("", &id, &rooms, &text);
                    match tokio::time::timeout(OP_TIMEOUT * 2, publish).await {
                        Ok(result) => result.map(drop).map_err(DriverError::from),
                        Err(_) => Err(DriverError::unavailable("Redis did not answer in time")),
                    }
                }
                None => {
                    let payload = format::encode(&id, &rooms, action);
                    let channels: Vec<String> = rooms
                        .iter()
                        .map(|r| format::room_channel(&self.prefix, r))
                        .collect();
                    let publish = self.driver.publish(channels, payload);
                    match tokio::time::timeout(OP_TIMEOUT * 2, publish).await {
                        Ok(result) => result,
                        Err(_) => Err(DriverError::unavailable("Redis did not answer in time")),
                    }
                }
            };
            self.shared.command_result(&result);
            match result {
                Ok(()) => {
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
            && self.shared.commands_healthy.load(Ordering::Acquire)
        {
            BusStatus::Connected
        } else {
            BusStatus::Disconnected
        }
    }

    fn refusal(&self) -> Option<String> {
        let pubsub = self.shared.pubsub_refused.lock().unwrap().clone();
        pubsub.or_else(|| self.shared.commands_refused.lock().unwrap().clone())
    }

    fn sse_register(&self, id: &str, user: Option<&str>) -> BoxFuture<'_, ()> {
        let (id, user) = (id.to_string(), user.unwrap_or("").to_string());
        async move {
            let Some(commands) = &self.commands else {
                return;
            };
            let mut cmd = redis::cmd("SET");
            cmd.arg(format!("{}:sse:{id}", self.prefix))
                .arg(format!("{}\t{user}", self.instance));
            if let Err(e) = commands.query::<()>(&cmd).await {
                tracing::warn!(error = %e, "an SSE stream cannot be reached from other instances");
            }
        }
        .boxed()
    }

    fn sse_unregister(&self, id: &str) -> BoxFuture<'_, ()> {
        let id = id.to_string();
        async move {
            if let Some(commands) = &self.commands {
                let mut cmd = redis::cmd("DEL");
                cmd.arg(format!("{}:sse:{id}", self.prefix));
                let _ = commands.query::<i64>(&cmd).await;
            }
        }
        .boxed()
    }

    fn sse_forward(
        &self,
        id: &str,
        user: Option<&str>,
        actions: String,
    ) -> BoxFuture<'_, Result<bool, BusError>> {
        let (id, user) = (id.to_string(), user.unwrap_or("").to_string());
        async move {
            let Some(commands) = &self.commands else {
                return Ok(false);
            };
            // The actions go in raw: they are JSON already.
            let message = format!(
                r#"{{"id":{},"user":{},"actions":{actions}}}"#,
                Value::String(id.clone()),
                Value::String(user.clone())
            );
            let mut cmd = redis::cmd("EVAL");
            cmd.arg(SSE_FORWARD)
                .arg(1)
                .arg(format!("{}:sse:{id}", self.prefix))
                .arg(&user)
                .arg(message)
                .arg(format!("{}:ssei:", self.prefix));
            match commands.query::<i64>(&cmd).await {
                Ok(n) => Ok(n > 0),
                Err(e) => Err(BusError::Unavailable(format!("Redis: {e}"))),
            }
        }
        .boxed()
    }
}

/// Forwards client actions to the instance holding SSE stream `KEYS[1]` (`<prefix>:sse:<id>`
/// = `<instance>\t<user>`), if `ARGV[1]` is its user: the receivers (0: nobody, the stream's
/// record is stale and removed), or -1 when there is no such stream of that user.
const SSE_FORWARD: &str = "local v = redis.call('GET', KEYS[1]) if not v then return -1 end \
    local inst, owner = string.match(v, '^([^\t]*)\t(.*)$') \
    if owner ~= ARGV[1] then return -1 end \
    local n = redis.call('PUBLISH', ARGV[3] .. inst, ARGV[2]) \
    if n == 0 then redis.call('DEL', KEYS[1]) end return n";

/// Exercises the command side every [`HEALTH_INTERVAL`] with what publishing needs (the
/// multi-channel publish, here twice to a channel nobody reads), so readiness reflects it and
/// a connection Redis closed is replaced before a publish needs it. Ends with the bus.
async fn check_commands(shared: std::sync::Weak<Shared>, driver: Arc<dyn Driver>, channel: String) {
    loop {
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let was_healthy = shared.commands_healthy.load(Ordering::Acquire);
        let check = driver.publish(vec![channel.clone(), channel.clone()], String::new());
        let result = match tokio::time::timeout(OP_TIMEOUT * 2, check).await {
            Ok(result) => result,
            Err(_) => Err(DriverError::unavailable("Redis did not answer in time")),
        };
        shared.command_result(&result);
        match result {
            Ok(()) if !was_healthy => tracing::info!("Redis command connection ready"),
            Ok(()) => {}
            Err(e) if was_healthy => {
                tracing::warn!(error = %e, "Redis command connection failed; replacing it")
            }
            Err(e) => tracing::debug!(error = %e, "Redis command connection still failing"),
        }
        drop(shared);
        tokio::time::sleep(HEALTH_INTERVAL).await;
    }
}

/// Why a served connection ended.
enum Ended {
    /// The bus handle is gone: stop for good.
    Stopped,
    /// Redis went away: reconnect.
    Lost(String),
}

struct Worker {
    driver: Arc<dyn Driver>,
    room_prefix: String,
    task_pattern: String,
    /// `PATCHBAY_MAX_PUBLISH_ROOMS`: an envelope naming more rooms is dropped.
    max_rooms: usize,
    rooms: Arc<Rooms>,
    shared: Arc<Shared>,
    sync_rx: mpsc::Receiver<Sync>,
    seen: Dedupe,
    /// History in Redis, when some room keeps it.
    history: Option<Arc<RedisHistory>>,
    /// Task messages ingested lately, for the ingest's de-duplication.
    occurrences: Occurrences,
    /// This instance's SSE channel, and its streams: client actions posted to another
    /// instance arrive there.
    sse: Option<(String, Arc<crate::sse::Streams>)>,
    /// socket.io emitter interop, when on: its pattern is subscribed too.
    emitter: Option<Arc<crate::emitter::Emitter>>,
}

/// How many times each task message was received lately. Every instance receives the same
/// messages in the same order, so "the n-th time these bytes arrived within a minute" names
/// one message on every instance: it is stored once, and the same bytes published again are
/// a new message.
#[derive(Default)]
struct Occurrences {
    seen: HashMap<u64, (u32, std::time::Instant)>,
}

/// How long a task message is remembered for the ingest's de-duplication (the function
/// library keeps its mark as long).
const OCCURRENCE_WINDOW: Duration = Duration::from_secs(60);

impl Occurrences {
    /// Counts one more arrival of `text`: its number within the window.
    fn next(&mut self, text: &str) -> u32 {
        use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
        let now = std::time::Instant::now();
        if self.seen.len() >= 4096 {
            self.seen
                .retain(|_, (_, at)| now.duration_since(*at) < OCCURRENCE_WINDOW);
        }
        let key = BuildHasherDefault::<DefaultHasher>::default().hash_one(text);
        let entry = self.seen.entry(key).or_insert((0, now));
        if now.duration_since(entry.1) >= OCCURRENCE_WINDOW {
            entry.0 = 0;
        }
        *entry = (entry.0 + 1, now);
        entry.0
    }
}

impl Worker {
    async fn run(mut self) {
        let mut delay = BACKOFF_MIN;
        let mut was_connected = true; // so that a first failure is logged
        let mut connected_before = false;
        loop {
            match self.connect().await {
                Ok((sink, stream)) => {
                    *self.shared.pubsub_refused.lock().unwrap() = None;
                    if std::mem::replace(&mut connected_before, true) {
                        self.shared
                            .counters
                            .reconnects
                            .fetch_add(1, Ordering::Relaxed);
                    }
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
                    let why = e.refusal.clone();
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

    /// Opens the pub/sub connection, subscribed to the task pattern and every room in use;
    /// then catches up, from history, with what the rooms it follows missed meanwhile.
    async fn connect(
        &mut self,
    ) -> Result<(Box<dyn Subscriptions>, BoxStream<'static, Msg>), DriverError> {
        let rooms = self.rooms.room_names();
        let mut channels = self.channels(&rooms);
        if let Some((channel, _)) = &self.sse {
            channels.push(channel.clone());
        }
        let mut patterns = vec![self.task_pattern.clone()];
        patterns.extend(self.emitter.as_ref().map(|e| e.pattern()));
        let connect = self.driver.connect(patterns, channels);
        let (mut subscriptions, stream) = tokio::time::timeout(OP_TIMEOUT * 2, connect)
            .await
            .map_err(|_| DriverError::unavailable("connecting timed out"))??;
        let mut active: HashSet<String> = rooms.into_iter().collect();
        *self.shared.active.write().unwrap() = active.clone();
        // Rooms followed before the connection was lost catch up first; until then joins are
        // refused (`connected` is still false), so no recovery is answered from what this
        // instance held before the loss.
        if let Some(history) = &self.history {
            history.unfollow(|room| active.contains(room));
        }
        self.catch_up().await;
        // The others start from here; so do rooms joined below (before they count as active,
        // so that no SUBSCRIBE of theirs is answered before this instance follows them).
        let new: Vec<String> = active.iter().cloned().collect();
        self.follow(&new).await?;
        self.shared.connected.store(true, Ordering::Release);
        // Rooms joined while the connection was being made were refused by `subscribe` (not
        // connected yet) and are not in the list it was made with: subscribe them now. Joins
        // from here on see `connected` and queue their own sync.
        let missed: Vec<String> = self
            .rooms
            .room_names()
            .into_iter()
            .filter(|r| !active.contains(r))
            .collect();
        if !missed.is_empty() {
            let subscribe = subscriptions.subscribe(self.channels(&missed));
            match tokio::time::timeout(OP_TIMEOUT, subscribe).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(e),
                Err(_) => return Err(DriverError::unavailable("subscribing timed out")),
            }
            self.follow(&missed).await?;
            active.extend(missed);
            self.shared
                .active
                .write()
                .unwrap()
                .extend(active.iter().cloned());
        }
        tracing::info!(rooms = active.len(), pattern = %self.task_pattern, "connected to Redis");
        Ok((subscriptions, stream))
    }

    /// Starts following the history rooms among `rooms` it does not follow yet, just
    /// subscribed: where each stands now. What was published before the subscription is not
    /// this instance's to deliver (its members joined after it, and their SUBSCRIBE answers
    /// say where they stand); what arrives from here on is, and a gap after it is filled.
    async fn follow(&mut self, rooms: &[String]) -> Result<(), DriverError> {
        let Some(history) = self.history.clone() else {
            return Ok(());
        };
        let new: Vec<&String> = rooms
            .iter()
            .filter(|r| history.config().keeps(r) && history.followed(r).is_none())
            .collect();
        let reads = new.iter().map(|room| history.read_now(room, None, 0));
        let reads = tokio::time::timeout(OP_TIMEOUT * 2, futures_util::future::try_join_all(reads))
            .await
            .map_err(|_| DriverError::unavailable("reading history positions timed out"))??;
        for (room, read) in new.into_iter().zip(reads) {
            history.follow(room, read.position);
        }
        Ok(())
    }

    /// After a reconnect: delivers, room by room and in order, what each followed room got
    /// while this instance was not listening (or `RESYNC` where history cannot say).
    async fn catch_up(&mut self) {
        let Some(history) = self.history.clone() else {
            return;
        };
        // Read up to CATCH_UP_READS rooms at once; deliver room by room, in order.
        let size = history.config().size;
        let followed = history.followed_rooms();
        let mut reads = futures_util::stream::iter(followed.into_iter().map(|(room, from)| {
            let history = history.clone();
            async move {
                let read = tokio::time::timeout(
                    OP_TIMEOUT * 2,
                    history.read_now(&room, Some(from.offset), size),
                )
                .await;
                (room, from, read)
            }
        }))
        .buffered(CATCH_UP_READS);
        while let Some((room, from, read)) = reads.next().await {
            let read = match read {
                Ok(Ok(read)) => Ok(read),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err("timed out".to_string()),
            };
            self.fill_from(&history, &room, &from, None, read);
        }
    }

    /// Delivers to `room`'s members the stored actions after `from` (before `before`, the
    /// live one that showed the gap, when given), and follows the room from there; or, when
    /// history no longer has them, tells the members to refetch (`@@patchbay/RESYNC`).
    async fn fill(&mut self, room: &str, from: &Position, before: Option<&Position>) {
        let Some(history) = self.history.clone() else {
            return;
        };
        let size = history.config().size;
        let read = match tokio::time::timeout(
            OP_TIMEOUT * 2,
            history.read_now(room, Some(from.offset), size),
        )
        .await
        {
            Ok(Ok(read)) => Ok(read),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("timed out".to_string()),
        };
        self.fill_from(&history, room, from, before, read);
    }

    /// [`Worker::fill`] with the room's history read.
    fn fill_from(
        &mut self,
        history: &RedisHistory,
        room: &str,
        from: &Position,
        before: Option<&Position>,
        read: Result<crate::history::Read, String>,
    ) {
        let size = history.config().size;
        let read = match read {
            Ok(read) => read,
            Err(e) => {
                tracing::warn!(%room, error = %e, "cannot read history to fill a gap");
                return self.resync(room, Reason::Unavailable, before, from.clone());
            }
        };
        match read.after(from, size) {
            Ok(missed) => {
                let upto = before.filter(|b| b.epoch == read.position.epoch);
                let mut filled = 0;
                for (offset, stored) in missed {
                    if upto.is_some_and(|b| offset >= b.offset) {
                        break;
                    }
                    // Kept before it is delivered: a recovery that starts in between
                    // finds it in one or the other (and drops the copy by offset).
                    let at = Position {
                        epoch: read.position.epoch.clone(),
                        offset,
                    };
                    history.delivered(room, &at, &stored);
                    let delivery = self.rooms.deliver_stored(
                        std::slice::from_ref(&room.to_string()),
                        &stored.action,
                        Some(&stored.id),
                        &[Some(offset)],
                    );
                    self.shared.counters.count(delivery);
                    filled += 1;
                }
                if filled > 0 {
                    tracing::info!(%room, filled, "delivered actions this instance missed, from history");
                }
            }
            Err(reason) => {
                tracing::warn!(%room, reason = reason.as_str(), "history cannot fill what this instance missed: members resync");
                self.resync(room, reason, before, read.position);
            }
        }
    }

    /// Sends `room`'s members `@@patchbay/RESYNC`: refetch, and continue from the position
    /// (just before `before`, the live action that follows, else `now`).
    fn resync(&mut self, room: &str, reason: Reason, before: Option<&Position>, now: Position) {
        let position = match before {
            Some(b) => Position {
                epoch: b.epoch.clone(),
                offset: b.offset.saturating_sub(1),
            },
            None => now,
        };
        let action = serde_json::json!({
            "type": "@@patchbay/RESYNC",
            "payload": {"room": room, "reason": reason.as_str(), "position": position.to_json()},
        });
        let Value::Object(action) = action else {
            unreachable!("an object literal")
        };
        let delivery = self
            .rooms
            .deliver(std::slice::from_ref(&room.to_string()), &action);
        self.shared.counters.count(delivery);
        if let Some(history) = &self.history {
            history.restart(room, position);
        }
    }

    async fn serve(
        &mut self,
        mut sink: Box<dyn Subscriptions>,
        mut stream: BoxStream<'static, Msg>,
    ) -> Ended {
        let mut health = tokio::time::interval(HEALTH_INTERVAL);
        health.reset();
        loop {
            tokio::select! {
                biased;
                msg = stream.next() => match msg {
                    Some(msg) => self.on_message(msg).await,
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
                    match tokio::time::timeout(OP_TIMEOUT, sink.ping()).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => return Ended::Lost(format!("ping failed: {e}")),
                        Err(_) => return Ended::Lost("ping timed out".into()),
                    }
                }
            }
        }
    }

    /// Makes the subscriptions of the batch's rooms match current local membership.
    async fn apply(
        &mut self,
        sink: &mut Box<dyn Subscriptions>,
        batch: Vec<Sync>,
    ) -> Result<(), String> {
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
        if let Some(history) = &self.history
            && !remove.is_empty()
        {
            let removed: HashSet<&str> = remove.iter().map(String::as_str).collect();
            history.unfollow(|room| !removed.contains(room));
        }
        let channels = |rooms: &[String]| self.channels(rooms);
        let result = async {
            if !add.is_empty() {
                sink.subscribe(channels(&add)).await?;
            }
            if !remove.is_empty() {
                sink.unsubscribe(channels(&remove)).await?;
            }
            Ok::<_, DriverError>(())
        };
        let mut outcome = match tokio::time::timeout(OP_TIMEOUT, result).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(format!("subscription change failed: {e}")),
            Err(_) => Err("subscription change timed out".to_string()),
        };
        if outcome.is_ok()
            && let Err(e) = self.follow(&add).await
        {
            outcome = Err(format!("reading history positions failed: {e}"));
        }
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

    /// The channels of `rooms`.
    fn channels(&self, rooms: &[String]) -> Vec<String> {
        rooms
            .iter()
            .map(|r| format!("{}{r}", self.room_prefix))
            .collect()
    }

    async fn on_message(&mut self, msg: Msg) {
        self.shared
            .counters
            .received
            .fetch_add(1, Ordering::Relaxed);
        let channel = msg.channel.as_str();
        if let (Some(pattern), Some(emitter)) = (&msg.pattern, self.emitter.clone())
            && *pattern != self.task_pattern
        {
            return self.emitted(&emitter, channel, &msg.payload).await;
        }
        let received = if msg.pattern.is_some() {
            match format::task_id(&self.task_pattern, channel)
                .and_then(|id| format::task_progress(id, &msg.payload))
            {
                Some((rooms, action)) => {
                    return self
                        .ingest(Incoming::live(rooms, action), "a task message")
                        .await;
                }
                None => Received::Malformed,
            }
        } else if let Some(room) = channel.strip_prefix(&self.room_prefix) {
            format::decode_room_message(room, &msg.payload, &mut self.seen, self.max_rooms)
        } else if let Some((_, streams)) = self.sse.as_ref().filter(|(c, _)| c == channel) {
            if !streams.forwarded(&msg.payload) {
                tracing::debug!("dropped client actions forwarded for a stream that is gone");
            }
            return;
        } else {
            Received::Malformed
        };
        match received {
            Received::Deliver(incoming) => self.deliver(incoming).await,
            Received::Repeat => {}
            Received::Malformed => {
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
    }

    /// A message every instance receives (task progress, a socket.io emitter's): when one of
    /// its rooms keeps history, stored once, whichever instance gets there first, and
    /// published on the rooms' channels, from which every instance delivers it with its
    /// offsets; otherwise, or if Redis cannot store it, delivered live from here.
    async fn ingest(&mut self, incoming: Incoming, what: &str) {
        let history = self.history.clone().filter(|h| {
            incoming
                .rooms
                .iter()
                .any(|r| h.config().stores(r, &incoming.action))
        });
        if let Some(history) = history {
            let text =
                serde_json::to_string(&incoming.action).expect("JSON values always serialize");
            // The n-th arrival of the same message names it on every instance.
            let dedupe = if incoming.except.is_empty() {
                self.occurrences.next(&text).to_string()
            } else {
                let except =
                    serde_json::to_string(&incoming.except).expect("strings always serialize");
                let n = self.occurrences.next(&format!("{except}{text}"));
                format!("{n}:{except}")
            };
            let id = uuid::Uuid::new_v4().to_string();
            let stored = tokio::time::timeout(
                OP_TIMEOUT * 2,
                history.publish_except(&dedupe, &id, &incoming.rooms, &incoming.except, &text),
            )
            .await;
            if let Ok(Ok(_)) = stored {
                return;
            }
            tracing::warn!("{what} could not be stored in history: delivered live");
        }
        self.deliver(incoming).await;
    }

    /// A message of a socket.io emitter, for the local members of its rooms (see
    /// [`Worker::ingest`]).
    async fn emitted(&mut self, emitter: &crate::emitter::Emitter, channel: &str, bytes: &[u8]) {
        use crate::emitter::Outcome;
        let (rooms, except, action) = match emitter.receive(channel, bytes) {
            Outcome::Deliver {
                rooms,
                except,
                action,
            } => (rooms, except, action),
            Outcome::Copy => return,
            Outcome::Dropped(reason, detail) => return emitter.drops.count(reason, &detail),
        };
        let mut incoming = Incoming::live(rooms, action);
        incoming.except = except;
        self.ingest(incoming, "a socket.io emitter message").await;
    }

    /// Delivers `incoming` to the local members of its rooms. In a history room this
    /// instance follows, an action whose offset is not the next one first has the gap filled
    /// from history (or a `RESYNC` sent), and one it already delivered is not delivered again.
    async fn deliver(&mut self, incoming: Incoming) {
        let Incoming {
            mut rooms,
            action,
            id,
            mut positions,
            except,
        } = incoming;
        let history = self.history.clone();
        let mut already = Vec::new();
        for (i, position) in positions.iter().enumerate() {
            let (Some(position), Some(room), Some(history)) = (position, rooms.get(i), &history)
            else {
                continue;
            };
            let Some(at) = history.followed(room) else {
                continue;
            };
            if at.epoch != position.epoch {
                let room = room.clone();
                self.resync(&room, Reason::EpochChanged, Some(position), at);
            } else if position.offset <= at.offset {
                already.push(i);
            } else if position.offset > at.offset + 1 {
                let room = room.clone();
                self.fill(&room, &at, Some(position)).await;
            }
        }
        for i in already.into_iter().rev() {
            rooms.remove(i);
            positions.remove(i);
        }
        if rooms.is_empty() {
            return;
        }
        let offsets: Vec<Option<u64>> = positions
            .iter()
            .map(|p| p.as_ref().map(|p| p.offset))
            .collect();
        let (Some(history), Some(id), false) = (&history, id.clone(), positions.is_empty()) else {
            let delivery =
                self.rooms
                    .deliver_except(&rooms, &except, &action, id.as_deref(), &offsets);
            self.shared.counters.count(delivery);
            return;
        };
        // Stored: kept in what this instance follows for recoveries here, then delivered. In
        // that order: a recovery that starts in between finds it in one or the other (and
        // drops the copy by offset), never in neither.
        let stored = Arc::new(crate::history::Stored { id, action });
        for (room, position) in rooms.iter().zip(&positions) {
            if let Some(position) = position {
                history.delivered(room, position, &stored);
            }
        }
        let delivery =
            self.rooms
                .deliver_except(&rooms, &except, &stored.action, Some(&stored.id), &offsets);
        self.shared.counters.count(delivery);
    }
}

fn answer(sync: Sync, result: Result<(), BusError>) {
    if let Some(done) = sync.done {
        let _ = done.send(result);
    }
}

/// `delay` scaled by a random factor in [0.5, 1): instances that lost Redis together do not
/// all come back in the same millisecond.
fn jitter(delay: Duration) -> Duration {
    let random = (uuid::Uuid::new_v4().as_u128() % 1000) as u32;
    delay / 2 + delay * random / 2000
}

#[cfg(test)]
mod tests;
