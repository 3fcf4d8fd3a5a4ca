//! Presence (contract section 9), embedded: which users are in each room matching
//! `PATCHBAY_PRESENCE_ROOMS`, per user (three tabs are one presence), with a version per room
//! that every change increases, so a client that applies a snapshot and then the events with a
//! greater version holds exactly the server's view.
//!
//! A user joins with its first connection in the room and leaves with its last: `left` when
//! the client unsubscribed or closed, `timeout` when the connection dropped and the user did
//! not come back within `PATCHBAY_PRESENCE_GRACE_MS`. Events are server-fired actions to the
//! room's members, the user's own connections included; they are delivered under the presence
//! lock, so their order is their versions' order.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde_json::{Map, Value, json};

use crate::rooms::{ConnId, RoomPattern, Rooms};

mod redis;

pub use redis::RedisPresence;

/// What presence tracks, from the configuration.
#[derive(Debug, Clone)]
pub struct PresenceConfig {
    /// Rooms that track presence.
    pub rooms: Vec<RoomPattern>,
    /// How long a dropped connection's user stays present.
    pub grace: Duration,
}

/// Most bytes of a user's state, as JSON.
pub const MAX_STATE_BYTES: usize = 1024;

/// Why a user left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Leave {
    /// Unsubscribed, or closed the connection.
    Left,
    /// The connection dropped and the grace passed.
    Timeout,
}

struct User {
    /// The user's connections in the room.
    conns: HashSet<ConnId>,
    state: Value,
    since: String,
    /// Bumped by every join and leave of the user, so a grace timer that fires after the user
    /// came back finds a newer generation and does nothing.
    generation: u64,
}

#[derive(Default)]
struct Room {
    version: u64,
    users: HashMap<String, User>,
}

/// Presence: embedded in one process, or in Redis across every instance.
#[derive(Clone)]
pub enum Presence {
    /// The presence of one process.
    Memory(Arc<MemoryPresence>),
    /// Presence kept in Redis.
    Redis(Arc<RedisPresence>),
}

impl Presence {
    /// Whether `room` tracks presence.
    pub fn tracks(&self, room: &str) -> bool {
        let config = match self {
            Presence::Memory(p) => &p.config,
            Presence::Redis(p) => p.config(),
        };
        config.rooms.iter().any(|p| p.matches(room))
    }

    /// The embedded presence joins in the same step as the room (a leave that follows finds
    /// it): the snapshot, or `None` when the join happens later, in [`Presence::join`].
    pub fn join_now(&self, room: &str, user: Option<&str>, conn: ConnId) -> Option<Value> {
        match self {
            Presence::Memory(p) => Some(match user {
                Some(user) => p.join(room, user, conn),
                None => p.snapshot(room),
            }),
            Presence::Redis(_) => None,
        }
    }

    /// Joins `user`'s connection `conn` (or, for an anonymous one, only reads) once the room's
    /// subscription is active: the snapshot, `None` when presence cannot be reached.
    pub async fn join(&self, room: &str, user: Option<&str>, conn: ConnId) -> Option<Value> {
        match self {
            Presence::Memory(_) => self.join_now(room, user, conn),
            Presence::Redis(p) => {
                let result = match user {
                    Some(user) => p.join(room, user, conn).await,
                    None => p.snapshot(room).await,
                };
                result
                    .inspect_err(|e| tracing::warn!(%room, error = %e, "presence join failed"))
                    .ok()
            }
        }
    }

    /// Connection `conn` of `user` left `room`: at once when `how` is [`Leave::Left`], after
    /// the grace when the connection dropped.
    pub fn leave(&self, room: &str, user: &str, conn: ConnId, how: Leave) {
        match self {
            Presence::Memory(p) => p.leave(room, user, conn, how),
            Presence::Redis(p) => p.leave(room, user, conn, how),
        }
    }

    /// `user` sets its state in `room`: the version of the `PRESENCE_STATE`.
    pub async fn set(&self, room: &str, user: &str, state: &Value) -> Result<u64, SetError> {
        if !state.is_object() {
            return Err(SetError::Invalid("state must be a JSON object"));
        }
        let text = serde_json::to_string(state).unwrap_or_default();
        if text.len() > MAX_STATE_BYTES {
            return Err(SetError::Invalid("state must be at most 1 KiB of JSON"));
        }
        match self {
            Presence::Memory(p) => p.set(room, user, state),
            Presence::Redis(p) => p.set(room, user, &text).await,
        }
    }

    /// `{"version","users":[…]}` of `room`; `None` when presence cannot be reached.
    pub async fn snapshot(&self, room: &str) -> Option<Value> {
        match self {
            Presence::Memory(p) => Some(p.snapshot(room)),
            Presence::Redis(p) => p
                .snapshot(room)
                .await
                .inspect_err(|e| tracing::warn!(%room, error = %e, "presence cannot be read"))
                .ok(),
        }
    }
}

/// The presence of every room of this process.
pub struct MemoryPresence {
    config: PresenceConfig,
    rooms: Arc<Rooms>,
    state: Mutex<HashMap<String, Room>>,
    /// Versions come from one counter for every room: a room emptied (and forgotten) and
    /// joined again never sees its version go back.
    versions: std::sync::atomic::AtomicU64,
}

/// Why a state update was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum SetError {
    /// The room tracks no presence, or the user is not in it.
    NotIn,
    /// Not an object of at most [`MAX_STATE_BYTES`].
    Invalid(&'static str),
    /// Presence cannot be reached now (Redis).
    Unavailable,
}

impl MemoryPresence {
    /// Presence delivering its events into `rooms`.
    pub fn new(config: PresenceConfig, rooms: Arc<Rooms>) -> Arc<MemoryPresence> {
        Arc::new(MemoryPresence {
            config,
            rooms,
            state: Mutex::default(),
            versions: std::sync::atomic::AtomicU64::new(0),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Room>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Connection `conn` of `user` is in `room` now: a JOIN unless the user was already present
    /// (on another connection, or within its grace). Returns the snapshot for the
    /// SUBSCRIBE success, taken after the join.
    pub fn join(&self, room: &str, user: &str, conn: ConnId) -> Value {
        let mut rooms = self.lock();
        let r = rooms.entry(room.to_string()).or_default();
        let fresh = !r.users.contains_key(user);
        let u = r.users.entry(user.to_string()).or_insert_with(|| User {
            conns: HashSet::new(),
            state: json!({}),
            since: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            generation: 0,
        });
        u.generation += 1;
        u.conns.insert(conn);
        if fresh {
            r.version = self.next_version();
            let event =
                json!({"room": room, "userId": user, "state": u.state, "version": r.version});
            self.fire(room, "@@patchbay/PRESENCE_JOIN", event);
        }
        snapshot(r)
    }

    /// Connection `conn` of `user` left `room`. A clean leave (`Leave::Left`) takes the user
    /// out at once when it was the last connection; a dropped one only after the grace.
    pub fn leave(self: &Arc<Self>, room: &str, user: &str, conn: ConnId, how: Leave) {
        let mut rooms = self.lock();
        let Some(r) = rooms.get_mut(room) else { return };
        let Some(u) = r.users.get_mut(user) else {
            return;
        };
        if !u.conns.remove(&conn) || !u.conns.is_empty() {
            return;
        }
        if how == Leave::Left {
            self.remove(&mut rooms, room, user, Leave::Left);
            return;
        }
        u.generation += 1;
        let generation = u.generation;
        let (presence, room, user) = (self.clone(), room.to_string(), user.to_string());
        tokio::spawn(async move {
            tokio::time::sleep(presence.config.grace).await;
            let mut rooms = presence.lock();
            let still_gone = rooms
                .get(&room)
                .and_then(|r| r.users.get(&user))
                .is_some_and(|u| u.conns.is_empty() && u.generation == generation);
            if still_gone {
                presence.remove(&mut rooms, &room, &user, Leave::Timeout);
            }
        });
    }

    fn remove(&self, rooms: &mut HashMap<String, Room>, room: &str, user: &str, how: Leave) {
        let Some(r) = rooms.get_mut(room) else { return };
        if r.users.remove(user).is_none() {
            return;
        }
        r.version = self.next_version();
        let reason = match how {
            Leave::Left => "left",
            Leave::Timeout => "timeout",
        };
        let event = json!({"room": room, "userId": user, "version": r.version, "reason": reason});
        self.fire(room, "@@patchbay/PRESENCE_LEAVE", event);
        if r.users.is_empty() {
            rooms.remove(room);
        }
    }

    fn next_version(&self) -> u64 {
        self.versions
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1
    }

    /// `user` (in `room`) sets its state there. Returns the new version.
    pub fn set(&self, room: &str, user: &str, state: &Value) -> Result<u64, SetError> {
        let mut rooms = self.lock();
        let r = rooms.get_mut(room).ok_or(SetError::NotIn)?;
        let u = r
            .users
            .get_mut(user)
            .filter(|u| !u.conns.is_empty())
            .ok_or(SetError::NotIn)?;
        u.state = state.clone();
        r.version = self.next_version();
        let event = json!({"room": room, "userId": user, "state": state, "version": r.version});
        self.fire(room, "@@patchbay/PRESENCE_STATE", event);
        Ok(r.version)
    }

    /// `{"version","users":[{"userId","state","since"}]}` of `room`.
    pub fn snapshot(&self, room: &str) -> Value {
        let rooms = self.lock();
        rooms
            .get(room)
            .map_or_else(|| json!({"version": 0, "users": []}), snapshot)
    }

    fn fire(&self, room: &str, ty: &str, payload: Value) {
        let mut action = Map::new();
        action.insert("type".into(), Value::String(ty.to_string()));
        action.insert("payload".into(), payload);
        self.rooms.deliver(&[room.to_string()], &action);
    }
}

fn snapshot(r: &Room) -> Value {
    let mut users: Vec<Value> = r
        .users
        .iter()
        .map(|(id, u)| json!({"userId": id, "state": u.state, "since": u.since}))
        .collect();
    users.sort_by(|a, b| a["userId"].as_str().cmp(&b["userId"].as_str()));
    json!({"version": r.version, "users": users})
}
