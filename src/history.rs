//! History and recovery (contract section 8), embedded: each room matching
//! `PATCHBAY_HISTORY_ROOMS` keeps its last `PATCHBAY_HISTORY_SIZE` stored actions for
//! `PATCHBAY_HISTORY_TTL_SECS` after its last append, numbered by offsets from 1 within an
//! epoch, so a client that lost its connection gets exactly what it missed, or is told why not.
//!
//! The bus appends and delivers under one lock ([`MemoryHistory::lock`]), so an action's
//! offset order is its delivery order. A room's epoch and last offset outlive its actions by
//! [`KEEP_POSITION`]; when even those expire, the room starts again under a new epoch, and so
//! does every room of a restarted process (the epoch carries a per-process random part).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::{Map, Value, json};

use crate::rooms::RoomPattern;

mod redis;

pub use redis::{Read, RedisHistory};

/// How long a room's epoch and last offset are kept after its last append: a client whose
/// room merely went quiet recovers with nothing to replay.
pub const KEEP_POSITION: Duration = Duration::from_secs(24 * 3600);

/// What history keeps, from the configuration.
#[derive(Debug, Clone)]
pub struct HistoryConfig {
    /// Rooms that keep history.
    pub rooms: Vec<RoomPattern>,
    /// Actions kept per room.
    pub size: usize,
    /// How long a room's actions are kept after its last append.
    pub ttl: Duration,
    /// Most actions replayed to one connection for one SUBSCRIBE.
    pub recover_max: usize,
}

impl HistoryConfig {
    /// Whether `room` keeps history.
    pub fn keeps(&self, room: &str) -> bool {
        self.rooms.iter().any(|p| p.matches(room))
    }

    /// Whether `action` is stored in `room`: a history room keeps every action, except that a
    /// `user:` room keeps only the final state of a task (its progress is kept in `task:<id>`),
    /// so one long task cannot push a user's other actions out of their history. (The Redis
    /// function library applies the same rule.)
    pub fn stores(&self, room: &str, action: &Map<String, Value>) -> bool {
        if !self.keeps(room) {
            return false;
        }
        if room.starts_with("user:")
            && action.get("type").and_then(Value::as_str) == Some("TASK_PROGRESS")
        {
            let status = action
                .get("payload")
                .and_then(|p| p.get("status"))
                .and_then(Value::as_str);
            return matches!(status, Some("succeeded" | "failed" | "cancelled" | "lost"));
        }
        true
    }
}

/// Why a client at `since` cannot recover in a room at `now`, whose oldest kept action has
/// offset `oldest` (`now.offset + 1` when it keeps none): the first reason that applies, or
/// `None` when every action after `since` can be replayed.
pub fn judge(since: &Position, now: &Position, oldest: u64, max: usize) -> Option<Reason> {
    if since.epoch != now.epoch || since.offset > now.offset {
        Some(Reason::EpochChanged)
    } else if oldest > since.offset + 1 {
        Some(Reason::TooOld)
    } else if now.offset - since.offset > max as u64 {
        Some(Reason::TooMany)
    } else {
        None
    }
}

/// Which history a process has: embedded, or in Redis shared by every instance.
#[derive(Clone)]
pub enum History {
    /// The embedded history of one process.
    Memory(Arc<MemoryHistory>),
    /// Streams in Redis.
    Redis(Arc<RedisHistory>),
}

impl History {
    /// What it keeps.
    pub fn config(&self) -> &HistoryConfig {
        match self {
            History::Memory(h) => h.config(),
            History::Redis(h) => h.config(),
        }
    }

    /// Whether `room` keeps history.
    pub fn keeps(&self, room: &str) -> bool {
        self.config().keeps(room)
    }
}

/// Where a client stands in a room's history: after `offset` (0 before the first action) of
/// `epoch`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    /// The room's sequence: `[A-Za-z0-9_-]{1,64}`.
    pub epoch: String,
    /// The last action seen.
    pub offset: u64,
}

impl Position {
    /// `{"epoch","offset"}`.
    pub fn to_json(&self) -> Value {
        json!({"epoch": self.epoch, "offset": self.offset})
    }

    /// A position as a client sends it, `{"epoch":"…","offset":N}`.
    pub fn from_json(value: &Value) -> Result<Position, String> {
        let epoch = value.get("epoch").and_then(Value::as_str);
        let offset = value.get("offset").and_then(Value::as_u64);
        match (epoch, offset) {
            (Some(epoch), Some(offset)) if valid_epoch(epoch) => Ok(Position {
                epoch: epoch.to_string(),
                offset,
            }),
            _ => Err(
                "since must be {\"epoch\": 1-64 of A-Z a-z 0-9 _ -, \"offset\": an integer from 0}"
                    .into(),
            ),
        }
    }

    /// A position in a query string, `<epoch>:<offset>`.
    pub fn from_query(s: &str) -> Option<Position> {
        let (epoch, offset) = s.rsplit_once(':')?;
        Some(Position {
            epoch: valid_epoch(epoch).then(|| epoch.to_string())?,
            offset: offset.parse().ok()?,
        })
    }
}

/// `[A-Za-z0-9_-]{1,64}`.
pub fn valid_epoch(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Why a recovery replays nothing: the first that applies, in this order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The room does not keep history.
    NotKept,
    /// History cannot be read now.
    Unavailable,
    /// The position is not of the room's current sequence (or beyond its last offset).
    EpochChanged,
    /// Some action after the position is no longer kept.
    TooOld,
    /// More than `PATCHBAY_RECOVER_MAX` actions were missed.
    TooMany,
}

impl Reason {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::NotKept => "not_kept",
            Reason::Unavailable => "unavailable",
            Reason::EpochChanged => "epoch_changed",
            Reason::TooOld => "too_old",
            Reason::TooMany => "too_many",
        }
    }
}

/// An action as it was stored: what was published, and the id it carries in every room.
#[derive(Debug)]
pub struct Stored {
    /// `meta.id`.
    pub id: String,
    /// The published action.
    pub action: Map<String, Value>,
}

/// One room's sequence.
struct RoomLog {
    epoch: String,
    /// The last offset given out.
    top: u64,
    /// The kept actions, oldest first, with consecutive offsets ending at `top`.
    entries: VecDeque<(u64, Arc<Stored>)>,
    last_append: Instant,
}

/// The history of every room of this process.
pub struct MemoryHistory {
    config: HistoryConfig,
    logs: Mutex<HashMap<String, RoomLog>>,
    /// Random per process: a restarted process never reuses an epoch.
    process: String,
    /// Numbers the rooms' sequences, so a room that starts again gets a new epoch.
    sequences: AtomicU64,
}

/// The history, locked: appends, positions and reads happen under it, and so does the
/// delivery of what was appended.
pub struct Logs<'a> {
    history: &'a MemoryHistory,
    logs: MutexGuard<'a, HashMap<String, RoomLog>>,
}

/// What a recovery replays: the actions after the client's position, with their offsets.
pub type Replay = Vec<(u64, Arc<Stored>)>;

impl MemoryHistory {
    /// An empty history.
    pub fn new(config: HistoryConfig) -> MemoryHistory {
        MemoryHistory {
            config,
            logs: Mutex::default(),
            process: uuid::Uuid::new_v4().simple().to_string()[..12].to_string(),
            sequences: AtomicU64::new(0),
        }
    }

    /// What it keeps.
    pub fn config(&self) -> &HistoryConfig {
        &self.config
    }

    /// Whether `room` keeps history.
    pub fn keeps(&self, room: &str) -> bool {
        self.config.keeps(room)
    }

    /// Whether `action` is stored in `room` (see [`HistoryConfig::stores`]).
    pub fn stores(&self, room: &str, action: &Map<String, Value>) -> bool {
        self.config.stores(room, action)
    }

    /// Locks the history.
    pub fn lock(&self) -> Logs<'_> {
        Logs {
            history: self,
            logs: self.logs.lock().unwrap_or_else(|e| e.into_inner()),
        }
    }

    /// Forgets what has expired: actions older than the TTL, rooms idle for
    /// [`KEEP_POSITION`]. Called now and then; reads and appends expire lazily as well.
    pub fn sweep(&self) {
        let now = Instant::now();
        let ttl = self.config.ttl;
        self.lock().logs.retain(|_, log| {
            if now.duration_since(log.last_append) >= ttl {
                log.entries.clear();
            }
            now.duration_since(log.last_append) < KEEP_POSITION.max(ttl)
        });
    }

    fn new_epoch(&self) -> String {
        let n = self.sequences.fetch_add(1, Ordering::Relaxed);
        format!("{}-{n}", self.process)
    }
}

impl Logs<'_> {
    /// The room's log, expired parts dropped, made when it has none.
    fn log(&mut self, room: &str) -> &mut RoomLog {
        let now = Instant::now();
        let ttl = self.history.config.ttl;
        let keep = KEEP_POSITION.max(ttl);
        if self
            .logs
            .get(room)
            .is_some_and(|log| now.duration_since(log.last_append) >= keep)
        {
            self.logs.remove(room);
        }
        let history = self.history;
        let log = self
            .logs
            .entry(room.to_string())
            .or_insert_with(|| RoomLog {
                epoch: history.new_epoch(),
                top: 0,
                entries: VecDeque::new(),
                last_append: now,
            });
        if now.duration_since(log.last_append) >= ttl {
            log.entries.clear();
        }
        log
    }

    /// Stores `stored` in `room`; its offset there.
    pub fn append(&mut self, room: &str, stored: &Arc<Stored>) -> u64 {
        let size = self.history.config.size;
        let log = self.log(room);
        log.top += 1;
        log.last_append = Instant::now();
        log.entries.push_back((log.top, stored.clone()));
        while log.entries.len() > size {
            log.entries.pop_front();
        }
        log.top
    }

    /// Where `room` stands now.
    pub fn position(&mut self, room: &str) -> Position {
        let log = self.log(room);
        Position {
            epoch: log.epoch.clone(),
            offset: log.top,
        }
    }

    /// The actions of `room` after `since`, and where the room stands; or why they cannot be
    /// replayed, and where the room stands.
    pub fn read(
        &mut self,
        room: &str,
        since: &Position,
    ) -> Result<(Replay, Position), (Reason, Position)> {
        let max = self.history.config.recover_max;
        let log = self.log(room);
        let now = Position {
            epoch: log.epoch.clone(),
            offset: log.top,
        };
        let oldest = log
            .entries
            .front()
            .map_or(log.top + 1, |(offset, _)| *offset);
        if let Some(reason) = judge(since, &now, oldest, max) {
            return Err((reason, now));
        }
        let replay = log
            .entries
            .iter()
            .filter(|(offset, _)| *offset > since.offset)
            .cloned()
            .collect();
        Ok((replay, now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn history(size: usize, ttl: Duration, recover_max: usize) -> MemoryHistory {
        MemoryHistory::new(HistoryConfig {
            rooms: vec![RoomPattern::parse("h:*").unwrap()],
            size,
            ttl,
            recover_max,
        })
    }

    fn stored(n: u64) -> Arc<Stored> {
        Arc::new(Stored {
            id: format!("id-{n}"),
            action: json!({"type": "A", "payload": n})
                .as_object()
                .unwrap()
                .clone(),
        })
    }

    #[test]
    fn positions_parse_strictly() {
        let p = Position::from_query("abc-1:17").unwrap();
        assert_eq!((p.epoch.as_str(), p.offset), ("abc-1", 17));
        assert_eq!(Position::from_json(&p.to_json()).unwrap(), p);
        for bad in [
            "",
            ":1",
            "abc",
            "abc:-1",
            "abc:x",
            "a b:1",
            &format!("{}:1", "e".repeat(65)),
        ] {
            assert!(Position::from_query(bad).is_none(), "{bad}");
        }
        for bad in [
            json!({}),
            json!({"epoch": "e"}),
            json!({"epoch": "e", "offset": -1}),
            json!({"epoch": "", "offset": 0}),
            json!("e:1"),
        ] {
            assert!(Position::from_json(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_recovery_gets_exactly_what_came_after_its_position() {
        let h = history(10, Duration::from_secs(60), 100);
        assert!(h.keeps("h:1") && !h.keeps("other"));
        let start = h.lock().position("h:1");
        assert_eq!(start.offset, 0);
        for n in 1..=5 {
            assert_eq!(h.lock().append("h:1", &stored(n)), n);
        }
        let (replay, now) = h
            .lock()
            .read(
                "h:1",
                &Position {
                    offset: 2,
                    ..start.clone()
                },
            )
            .unwrap();
        assert_eq!(
            replay.iter().map(|(o, _)| *o).collect::<Vec<_>>(),
            [3, 4, 5]
        );
        assert_eq!(replay[0].1.id, "id-3");
        assert_eq!(
            now,
            Position {
                offset: 5,
                ..start.clone()
            }
        );
        let (replay, _) = h
            .lock()
            .read(
                "h:1",
                &Position {
                    offset: 5,
                    ..start.clone()
                },
            )
            .unwrap();
        assert!(replay.is_empty(), "nothing missed");
        // Another room has its own sequence.
        assert_ne!(h.lock().position("h:2").epoch, start.epoch);
    }

    #[test]
    fn every_reason_when_and_only_when_it_applies() {
        let h = history(3, Duration::from_secs(60), 2);
        let start = h.lock().position("h:1");
        for n in 1..=5 {
            h.lock().append("h:1", &stored(n));
        }
        let at = |offset| Position {
            offset,
            ..start.clone()
        };
        let reason = |p: &Position| h.lock().read("h:1", p).err().map(|(r, _)| r);
        assert_eq!(
            reason(&Position {
                epoch: "other".into(),
                offset: 1
            }),
            Some(Reason::EpochChanged)
        );
        assert_eq!(
            reason(&at(6)),
            Some(Reason::EpochChanged),
            "beyond the last offset"
        );
        // Offsets 3 to 5 are kept: after 1, offset 2 is gone.
        assert_eq!(reason(&at(1)), Some(Reason::TooOld));
        assert_eq!(
            reason(&at(2)),
            Some(Reason::TooMany),
            "3 missed, at most 2 replayed"
        );
        assert_eq!(reason(&at(3)), None);
        let err = h.lock().read("h:1", &at(0)).unwrap_err();
        assert_eq!(
            err,
            (Reason::TooOld, at(5)),
            "the position where the room stands"
        );
    }

    #[test]
    fn actions_expire_but_the_position_stays() {
        let h = history(10, Duration::from_millis(50), 100);
        let start = h.lock().position("h:1");
        h.lock().append("h:1", &stored(1));
        std::thread::sleep(Duration::from_millis(80));
        h.sweep();
        let at = |offset| Position {
            offset,
            ..start.clone()
        };
        // Nothing missed: an idle client recovers with nothing to replay.
        assert!(h.lock().read("h:1", &at(1)).unwrap().0.is_empty());
        assert_eq!(h.lock().read("h:1", &at(0)).unwrap_err().0, Reason::TooOld);
        assert_eq!(
            h.lock().append("h:1", &stored(2)),
            2,
            "the sequence goes on"
        );
    }
}
