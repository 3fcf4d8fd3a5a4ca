//! History in Redis, shared by every instance (contract section 8): one stream per room,
//! appended and published in one call of the function library's `patchbay_publish`, read with
//! `patchbay_read` (both documented in `functions.lua`). The library ties each room's epoch to
//! the Redis server's `run_id`, so a restart or a failover starts a new epoch instead of
//! reusing offsets.
//!
//! Recoveries of the same room on one instance share reads: while a room's read is in
//! flight, every recovery of it that arrives waits for the next one, which serves them all —
//! a reconnect storm costs about two reads per room, not one per client. A read that
//! starts after a recovery joined its room is the only kind that may serve it: whatever it
//! misses is held back for the recovery and merged by offset.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::{Map, Value};
use tokio::sync::oneshot;

use super::{HistoryConfig, KEEP_POSITION, Position, Reason, Replay, Stored, judge};
use crate::bus::Commands;
use crate::task::redis::{function_missing, load_functions};

/// What one read of a room found: where it stands, and what it keeps after the position asked.
#[derive(Debug)]
pub struct Read {
    /// The room's epoch and last offset.
    pub position: Position,
    /// The offset of its oldest kept action (`position.offset + 1` when it keeps none).
    pub oldest: u64,
    /// Kept actions after the offset asked (at most the last `PATCHBAY_RECOVER_MAX`), in order.
    pub entries: Replay,
}

impl Read {
    /// What a client at `since` gets: the actions it missed, or why not.
    pub fn after(&self, since: &Position, max: usize) -> Result<Replay, Reason> {
        if let Some(reason) = judge(since, &self.position, self.oldest, max) {
            return Err(reason);
        }
        Ok(self
            .entries
            .iter()
            .filter(|(offset, _)| *offset > since.offset)
            .cloned()
            .collect())
    }
}

type Waiter = oneshot::Sender<Result<Arc<Read>, String>>;

/// Recoveries waiting for a room's next read: the smallest offset one of them stands at.
struct Pending {
    after: Option<u64>,
    waiters: Vec<Waiter>,
}

/// The history of every room, in Redis.
pub struct RedisHistory {
    commands: Commands,
    /// `<prefix>:history`: what is kept, for the function library.
    config_key: String,
    config: HistoryConfig,
    /// Rooms with a read in flight, and the recoveries waiting for the next one.
    reads: Mutex<HashMap<String, Option<Pending>>>,
    /// `patchbay_read` calls made.
    calls: AtomicU64,
}

impl RedisHistory {
    /// The history on the Redis at `url` under `prefix` (nothing is connected yet).
    pub fn open(
        url: &str,
        prefix: &str,
        config: HistoryConfig,
    ) -> Result<RedisHistory, redis::RedisError> {
        Ok(RedisHistory {
            commands: Commands::new(redis::Client::open(url)?),
            config_key: format!("{prefix}:history"),
            config,
            reads: Mutex::default(),
            calls: AtomicU64::new(0),
        })
    }

    /// What it keeps.
    pub fn config(&self) -> &HistoryConfig {
        &self.config
    }

    /// History reads made so far (one per room per batch of recoveries).
    pub fn reads(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    /// Loads the function library and tells it what is kept. Called at start-up and every
    /// few seconds (a Redis that restarted without persistence has forgotten both).
    pub async fn prepare(&self) -> Result<(), redis::RedisError> {
        load_functions(&self.commands).await?;
        self.write_config().await
    }

    async fn write_config(&self) -> Result<(), redis::RedisError> {
        let rooms: Vec<String> = self.config.rooms.iter().map(|p| p.to_string()).collect();
        let keep = KEEP_POSITION.max(self.config.ttl).as_secs();
        let mut cmd = redis::cmd("HSET");
        cmd.arg(&self.config_key)
            .arg("rooms")
            .arg(rooms.join(" "))
            .arg("size")
            .arg(self.config.size)
            .arg("ttl")
            .arg(self.config.ttl.as_secs().max(1))
            .arg("keep")
            .arg(keep);
        self.commands.query::<i64>(&cmd).await.map(drop)
    }

    /// Calls function `name`; when Redis has lost the library (and so what is kept), puts
    /// both back and calls again.
    async fn fcall<T: redis::FromRedisValue>(
        &self,
        name: &str,
        args: &[&str],
    ) -> Result<T, redis::RedisError> {
        let mut cmd = redis::cmd("FCALL");
        cmd.arg(name).arg(1).arg(&self.config_key).arg(args);
        match self.commands.query::<T>(&cmd).await {
            Err(e) if function_missing(&e) => {
                tracing::info!("Redis has no patchbay functions (restarted?): loading them");
                self.prepare().await?;
                self.commands.query::<T>(&cmd).await
            }
            other => other,
        }
    }

    /// Publishes `action` (JSON text of an object with a string `type`) to `rooms`, stored in
    /// those that keep history, with meta.id `id`. With a non-empty `dedupe`, the same message
    /// ingested by several instances is published once: `false` when another one did.
    pub async fn publish(
        &self,
        dedupe: &str,
        id: &str,
        rooms: &[String],
        action: &str,
    ) -> Result<bool, redis::RedisError> {
        let mut args: Vec<&str> = Vec::with_capacity(3 + rooms.len());
        args.extend([dedupe, id, action]);
        args.extend(rooms.iter().map(String::as_str));
        let positions: Option<String> = self.fcall("patchbay_publish", &args).await?;
        Ok(positions.is_some())
    }

    /// Reads `room` now: where it stands and, when `after` is given, what it keeps after that
    /// offset (at most the last `limit`).
    pub async fn read_now(
        &self,
        room: &str,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Read, redis::RedisError> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        let (after, limit) = match after {
            Some(after) => (after, limit),
            None => (0, 0),
        };
        let values: Vec<redis::Value> = self
            .fcall(
                "patchbay_read",
                &[room, &after.to_string(), &limit.to_string()],
            )
            .await?;
        parse_read(values).ok_or_else(|| {
            redis::RedisError::from((
                redis::ErrorKind::UnexpectedReturnType,
                "patchbay_read answered in an unexpected shape",
            ))
        })
    }

    /// Reads `room` for a recovery at offset `after` (or for its position, with `None`),
    /// sharing the read with the other recoveries of the room that wait at the same time.
    pub async fn read(
        self: &Arc<Self>,
        room: &str,
        after: Option<u64>,
    ) -> Result<Arc<Read>, String> {
        let (tx, rx) = oneshot::channel();
        let start = {
            let mut reads = self.reads.lock().unwrap_or_else(|e| e.into_inner());
            let (pending, start) = match reads.get_mut(room) {
                Some(next) => (next, false),
                None => (reads.entry(room.to_string()).or_default(), true),
            };
            let pending = pending.get_or_insert_with(|| Pending {
                after,
                waiters: Vec::new(),
            });
            pending.after = match (pending.after, after) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            pending.waiters.push(tx);
            start
        };
        if start {
            tokio::spawn(self.clone().serve_reads(room.to_string()));
        }
        rx.await
            .unwrap_or_else(|_| Err("the history read was abandoned".into()))
    }

    /// Reads `room` for the recoveries waiting, again and again while more arrive during a
    /// read; then forgets the room.
    async fn serve_reads(self: Arc<Self>, room: String) {
        // Recoveries that arrive in the same moment share this first read.
        tokio::task::yield_now().await;
        loop {
            let pending = {
                let mut reads = self.reads.lock().unwrap_or_else(|e| e.into_inner());
                match reads.get_mut(&room).and_then(Option::take) {
                    Some(pending) => pending,
                    None => {
                        reads.remove(&room);
                        return;
                    }
                }
            };
            let result = self
                .read_now(&room, pending.after, self.config.recover_max)
                .await
                .map(Arc::new)
                .map_err(|e| e.to_string());
            for waiter in pending.waiters {
                let _ = waiter.send(result.clone());
            }
        }
    }
}

/// `{epoch, top, oldest, offset, id, action, …}` as a [`Read`].
fn parse_read(values: Vec<redis::Value>) -> Option<Read> {
    use redis::FromRedisValue;
    let mut values = values.into_iter();
    let mut next = || values.next();
    let epoch = String::from_redis_value(next()?).ok()?;
    let top = u64::from_redis_value(next()?).ok()?;
    let oldest = u64::from_redis_value(next()?).ok()?;
    let mut entries = Vec::new();
    while let Some(offset) = next() {
        let offset = u64::from_redis_value(offset).ok()?;
        let id = String::from_redis_value(next()?).ok()?;
        let text = String::from_redis_value(next()?).ok()?;
        // Checked when it was appended; an entry that does not parse is skipped, not fatal.
        let Ok(action) = serde_json::from_str::<Map<String, Value>>(&text) else {
            tracing::warn!(offset, "a history entry is not a JSON object: skipped");
            continue;
        };
        entries.push((offset, Arc::new(Stored { id, action })));
    }
    Some(Read {
        position: Position { epoch, offset: top },
        oldest,
        entries,
    })
}
