//! The Redis bus (contract section 4): many instances behind a load balancer, and task workers
//! in any language publishing progress.
//!
//! One pub/sub connection and one command connection per instance. A single worker task owns
//! the pub/sub connection: it reads messages and delivers them locally (never waiting on a
//! client: delivery is `try_send`), applies subscription changes in order, pings Redis, and
//! reconnects with capped exponential backoff, re-subscribing every room in use.
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

/// A request to make the Redis subscription of `room` match local membership.
struct Sync {
    room: String,
    done: Option<oneshot::Sender<Result<(), BusError>>>,
}

/// State shared between the bus handle and its worker.
struct Shared {
    connected: AtomicBool,
    /// Rooms subscribed on the current pub/sub connection; written only by the worker.
    /// `std` lock: held for set operations only, never across an `.await`.
    active: RwLock<HashSet<String>>,
    /// The command connection, while connected (cheap to clone, multiplexed).
    commands: Mutex<Option<MultiplexedConnection>>,
    counters: BusCounters,
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
        rooms: Arc<Rooms>,
    ) -> Result<RedisBus, redis::RedisError> {
        let client = redis::Client::open(url)?;
        let shared = Arc::new(Shared {
            connected: AtomicBool::new(false),
            active: RwLock::default(),
            commands: Mutex::default(),
            counters: BusCounters::default(),
        });
        let (sync, sync_rx) = mpsc::channel(4096);
        let worker = Worker {
            client,
            room_prefix: format!("{prefix}:room:"),
            task_pattern: task_pattern.to_string(),
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
            let Some(mut conn) = self.shared.commands.lock().unwrap().clone() else {
                return Err(disconnected());
            };
            // One room: the action itself. Several: one envelope, published on each room's
            // channel; receivers de-duplicate by id.
            let payload = if rooms.len() == 1 {
                Value::Object(action).to_string()
            } else {
                json!({"id": uuid::Uuid::new_v4().to_string(), "rooms": rooms, "action": action})
                    .to_string()
            };
            let mut pipe = redis::pipe();
            for room in &rooms {
                pipe.cmd("PUBLISH")
                    .arg(self.channel(room))
                    .arg(&payload)
                    .ignore();
            }
            match tokio::time::timeout(OP_TIMEOUT, pipe.query_async::<()>(&mut conn)).await {
                Ok(Ok(())) => {
                    self.shared
                        .counters
                        .published
                        .fetch_add(rooms.len() as u64, Ordering::Relaxed);
                    Ok(())
                }
                Ok(Err(e)) => Err(BusError::Unavailable(format!("Redis PUBLISH failed: {e}"))),
                Err(_) => Err(BusError::Unavailable("Redis PUBLISH timed out".into())),
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
        if self.shared.connected.load(Ordering::Acquire) {
            BusStatus::Connected
        } else {
            BusStatus::Disconnected
        }
    }
}

/// Recently delivered envelope ids.
#[derive(Default)]
struct Dedupe {
    ids: HashSet<String>,
    order: VecDeque<String>,
}

impl Dedupe {
    /// Records `id`; returns false if it was already seen.
    fn first_time(&mut self, id: &str) -> bool {
        if self.ids.contains(id) {
            return false;
        }
        if self.order.len() == DEDUPE_IDS
            && let Some(old) = self.order.pop_front()
        {
            self.ids.remove(&old);
        }
        self.ids.insert(id.to_string());
        self.order.push_back(id.to_string());
        true
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
    client: redis::Client,
    room_prefix: String,
    task_pattern: String,
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
                Ok((sink, stream, commands)) => {
                    *self.shared.commands.lock().unwrap() = Some(commands);
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
                    if was_connected {
                        tracing::warn!(error = %e, "cannot connect to Redis; pushes paused, retrying");
                        was_connected = false;
                    } else {
                        tracing::debug!(error = %e, "Redis still unreachable");
                    }
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
        *self.shared.commands.lock().unwrap() = None;
    }

    /// Opens both connections and subscribes to the task pattern and every room in use.
    async fn connect(
        &mut self,
    ) -> Result<(PubSubSink, PubSubStream, MultiplexedConnection), String> {
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(OP_TIMEOUT))
            .set_response_timeout(Some(OP_TIMEOUT));
        let setup = async {
            let commands = self
                .client
                .get_multiplexed_async_connection_with_config(&config)
                .await?;
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
            Ok::<_, redis::RedisError>((sink, stream, commands, rooms))
        };
        let (sink, stream, commands, rooms) = tokio::time::timeout(OP_TIMEOUT * 2, setup)
            .await
            .map_err(|_| "timed out".to_string())?
            .map_err(|e| e.to_string())?;
        let count = rooms.len();
        *self.shared.active.write().unwrap() = rooms.into_iter().collect();
        self.shared.connected.store(true, Ordering::Release);
        tracing::info!(rooms = count, pattern = %self.task_pattern, "connected to Redis");
        Ok((sink, stream, commands))
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
        let parsed: Result<Value, _> = serde_json::from_slice(msg.get_payload_bytes());
        let delivered = if msg.from_pattern() {
            task_id(&self.task_pattern, channel)
                .zip(parsed.ok())
                .is_some_and(|(id, task)| self.on_task(id, task))
        } else if let Some(room) = channel.strip_prefix(&self.room_prefix) {
            parsed.ok().is_some_and(|v| self.on_room_message(room, v))
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
    fn on_room_message(&mut self, room: &str, value: Value) -> bool {
        let Value::Object(mut obj) = value else {
            return false;
        };
        if obj.get("type").is_some_and(Value::is_string) {
            if check_action_object(&obj).is_err() {
                return false;
            }
            self.shared
                .counters
                .count(self.rooms.deliver(&[room.to_string()], &obj));
            return true;
        }
        let (Some(Value::String(id)), Some(Value::Array(rooms)), Some(action)) =
            (obj.remove("id"), obj.remove("rooms"), obj.remove("action"))
        else {
            return false;
        };
        let rooms: Option<Vec<String>> = rooms
            .into_iter()
            .map(|r| r.as_str().filter(|r| valid_room(r)).map(str::to_string))
            .collect();
        let (Some(rooms), Ok(())) = (rooms, check_server_action(&action)) else {
            return false;
        };
        let Value::Object(action) = action else {
            return false;
        };
        if self.seen.first_time(&id) {
            self.shared
                .counters
                .count(self.rooms.deliver(&rooms, &action));
        }
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
        assert!(d.first_time("a"));
        assert!(!d.first_time("a"));
        for i in 0..DEDUPE_IDS {
            d.first_time(&i.to_string());
        }
        assert!(d.first_time("a"), "the oldest ids are forgotten");
        assert_eq!(d.ids.len(), DEDUPE_IDS);
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
