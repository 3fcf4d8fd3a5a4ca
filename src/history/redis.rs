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

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::{Map, Value};
use tokio::sync::oneshot;

use super::{HistoryConfig, KEEP_POSITION, Position, Reason, Replay, Stored, judge};
use crate::bus::{Commands, RedisTarget};
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

/// What this instance delivered lately in a history room it follows (is subscribed to): where
/// it stands, and its last stored actions, offsets `base + 1 ..= top` — so recoveries of the
/// room on this instance are answered from memory when it covers their position.
struct Tail {
    epoch: String,
    base: u64,
    top: u64,
    entries: VecDeque<(u64, Arc<Stored>)>,
}

impl Tail {
    fn at(position: Position) -> Tail {
        Tail {
            epoch: position.epoch,
            base: position.offset,
            top: position.offset,
            entries: VecDeque::new(),
        }
    }

    fn position(&self) -> Position {
        Position {
            epoch: self.epoch.clone(),
            offset: self.top,
        }
    }
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
    /// The rooms this instance follows. `std` lock: held for map operations only.
    tails: Mutex<HashMap<String, Tail>>,
}

impl RedisHistory {
    /// The history on the Redis `target` names, under `prefix` (nothing is connected yet).
    pub fn open(target: &RedisTarget, prefix: &str, config: HistoryConfig) -> RedisHistory {
        RedisHistory {
            commands: Commands::new(target.clone()),
            config_key: format!("{prefix}:history"),
            config,
            reads: Mutex::default(),
            calls: AtomicU64::new(0),
            tails: Mutex::default(),
        }
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
        self.publish_except(dedupe, id, rooms, &[], action).await
    }

    /// [`RedisHistory::publish`] whose envelope tells instances not to deliver it to the
    /// members of `except` (history keeps the action alone).
    pub async fn publish_except(
        &self,
        dedupe: &str,
        id: &str,
        rooms: &[String],
        except: &[String],
        action: &str,
    ) -> Result<bool, redis::RedisError> {
        let except = (!except.is_empty())
            .then(|| serde_json::to_string(except).expect("strings always serialize"));
        let mut args: Vec<&str> = Vec::with_capacity(4 + rooms.len());
        args.extend(except.as_deref());
        args.extend([dedupe, id, action]);
        args.extend(rooms.iter().map(String::as_str));
        let name = match except {
            Some(_) => "patchbay_publish_except",
            None => "patchbay_publish",
        };
        let positions: Option<String> = self.fcall(name, &args).await?;
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

/// Following rooms: the bus worker, the only writer, records what it delivers; recoveries read.
impl RedisHistory {
    fn tails(&self) -> std::sync::MutexGuard<'_, HashMap<String, Tail>> {
        self.tails.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Where this instance stands in `room`, when it follows it.
    pub fn followed(&self, room: &str) -> Option<Position> {
        self.tails().get(room).map(Tail::position)
    }

    /// Every room it follows, with where it stands.
    pub fn followed_rooms(&self) -> Vec<(String, Position)> {
        self.tails()
            .iter()
            .map(|(room, tail)| (room.clone(), tail.position()))
            .collect()
    }

    /// Follows `room` from `position` on (unless it already does).
    pub fn follow(&self, room: &str, position: Position) {
        self.tails()
            .entry(room.to_string())
            .or_insert_with(|| Tail::at(position));
    }

    /// Follows `room` from `position` on, forgetting what it had (a `RESYNC`).
    pub fn restart(&self, room: &str, position: Position) {
        self.tails().insert(room.to_string(), Tail::at(position));
    }

    /// Stops following the rooms `keep` says no to.
    pub fn unfollow(&self, keep: impl Fn(&str) -> bool) {
        self.tails().retain(|room, _| keep(room));
    }

    /// `stored` was delivered in `room` at `position`: the next offset, or the tail starts
    /// again from it.
    pub fn delivered(&self, room: &str, position: &Position, stored: &Arc<Stored>) {
        let cap = self.config.size;
        let mut tails = self.tails();
        let Some(tail) = tails.get_mut(room) else {
            return;
        };
        if tail.epoch != position.epoch || position.offset != tail.top + 1 {
            *tail = Tail::at(Position {
                epoch: position.epoch.clone(),
                offset: position.offset.saturating_sub(1),
            });
        }
        tail.top = position.offset;
        tail.entries.push_back((position.offset, stored.clone()));
        while tail.entries.len() > cap {
            if let Some((offset, _)) = tail.entries.pop_front() {
                tail.base = offset;
            }
        }
    }

    /// What a recovery at `since` in `room` (or, with `None`, a join that wants the room's
    /// position) gets: from what this instance delivered when that covers it, else from
    /// Redis — a read shared with the room's other recoveries, which then also extends what
    /// this instance holds.
    pub async fn recover(
        self: &Arc<Self>,
        room: &str,
        since: Option<&Position>,
    ) -> Result<Arc<Read>, String> {
        if let Some(read) = self.read_tail(room, since) {
            return Ok(Arc::new(read));
        }
        let mut read = self.read(room, since.map(|s| s.offset)).await?;
        let mut tails = self.tails();
        // Redis may be ahead of what this instance has delivered: the actions in between will
        // reach the client live, so the answer stops where the instance stands (unless the
        // client stands further still).
        if let Some(tail) = tails.get(room)
            && tail.epoch == read.position.epoch
            && tail.top < read.position.offset
            && since.is_none_or(|s| s.offset <= tail.top)
        {
            read = Arc::new(Read {
                position: tail.position(),
                oldest: read.oldest,
                entries: read
                    .entries
                    .iter()
                    .filter(|(offset, _)| *offset <= tail.top)
                    .cloned()
                    .collect(),
            });
        }
        if let Some(tail) = tails.get_mut(room)
            && tail.epoch == read.position.epoch
            && tail.top == read.position.offset
        {
            // The same sequence up to the same offset: what Redis keeps before the tail's
            // first action goes in front of it.
            let older: Vec<&(u64, Arc<Stored>)> = read
                .entries
                .iter()
                .filter(|(offset, _)| *offset <= tail.base)
                .collect();
            if older.last().is_some_and(|(offset, _)| *offset == tail.base) {
                let room_left = self.config.size.saturating_sub(tail.entries.len());
                for (offset, stored) in older.into_iter().rev().take(room_left) {
                    tail.entries.push_front((*offset, stored.clone()));
                    tail.base = offset - 1;
                }
            }
        }
        Ok(read)
    }

    fn read_tail(&self, room: &str, since: Option<&Position>) -> Option<Read> {
        let tails = self.tails();
        let tail = tails.get(room)?;
        let after = match since {
            None => tail.top,
            Some(since) => {
                let covered = since.epoch == tail.epoch
                    && since.offset >= tail.base
                    && since.offset <= tail.top;
                covered.then_some(since.offset)?
            }
        };
        Some(Read {
            position: tail.position(),
            oldest: tail.base + 1,
            entries: tail
                .entries
                .iter()
                .filter(|(offset, _)| *offset > after)
                .cloned()
                .collect(),
        })
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
