//! Local room membership and delivery: which connections of this instance are in which room.
//!
//! Maps are kept in both directions (room → connections, connection → rooms) so that leaving
//! every room on disconnect is one call. Delivery serializes an action once per target room and
//! shares the bytes with every recipient; each connection receives a multi-room action once.
//! The [`crate::bus`] decides which actions reach this instance; this module only fans out.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::{Arc, Mutex, RwLock};

use crate::outbox::{Outbox, Text};
use crate::protocol;
use serde_json::{Map, Value};

/// Longest room name, in bytes.
pub const MAX_ROOM_BYTES: usize = 128;

/// Identifies a connection inside this process (cheap to hash, never sent to clients).
pub type ConnId = u64;

/// Whether `room` is a valid room name: 1–128 bytes of printable ASCII without whitespace.
pub fn valid_room(room: &str) -> bool {
    (1..=MAX_ROOM_BYTES).contains(&room.len()) && room.bytes().all(|b| b.is_ascii_graphic())
}

/// A room name or a `prefix*` pattern, as in grants and `PATCHBAY_PUBLIC_ROOMS`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RoomPattern {
    /// Exactly this room.
    Exact(String),
    /// Every room starting with this prefix (the pattern without its trailing `*`).
    Prefix(String),
}

impl RoomPattern {
    /// Parses `room` or `prefix*`.
    pub fn parse(s: &str) -> Result<RoomPattern, String> {
        if !valid_room(s) {
            return Err(format!(
                "`{}` is not a room name (1-128 printable ASCII bytes, no spaces)",
                crate::error::clip(s)
            ));
        }
        Ok(match s.strip_suffix('*') {
            Some(prefix) => RoomPattern::Prefix(prefix.to_string()),
            None => RoomPattern::Exact(s.to_string()),
        })
    }

    /// Whether the pattern admits `room`.
    pub fn matches(&self, room: &str) -> bool {
        match self {
            RoomPattern::Exact(r) => r == room,
            RoomPattern::Prefix(p) => room.starts_with(p.as_str()),
        }
    }

    /// Whether the pattern admits some room that starts with `prefix` (`*`, `us*`, `user:*`
    /// and `user:42` all admit a `user:` room).
    pub fn can_match_prefix(&self, prefix: &str) -> bool {
        match self {
            RoomPattern::Exact(r) => r.starts_with(prefix),
            RoomPattern::Prefix(p) => p.starts_with(prefix) || prefix.starts_with(p.as_str()),
        }
    }
}

impl std::fmt::Display for RoomPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RoomPattern::Exact(r) => f.write_str(r),
            RoomPattern::Prefix(p) => write!(f, "{p}*"),
        }
    }
}

/// Why a join was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JoinError {
    /// The connection is already in `PATCHBAY_MAX_ROOMS` rooms.
    #[error("this connection is already in {0} rooms, the most allowed")]
    TooMany(usize),
    /// The connection is not registered (it is closing).
    #[error("connection is closing")]
    Gone,
}

/// How many connections an action reached.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    /// Connections whose queue accepted the action.
    pub delivered: usize,
    /// Connections whose queue was full (they are being closed with 4008).
    pub dropped: usize,
    /// Connections the action was not queued for because it is larger than their whole send
    /// queue (they stay open).
    pub oversize: usize,
}

struct Member {
    outbox: Outbox,
    rooms: HashSet<String>,
    /// The random half of the connection's public id: finding a connection by its id checks
    /// it (see [`crate::hub::Hub::find`]).
    secret: u64,
}

#[derive(Default)]
struct Maps {
    /// Each room's members with their outboxes, so fan-out needs one lookup per room, not one
    /// per recipient.
    rooms: HashMap<String, ConnMap<Outbox>>,
    members: ConnMap<Member>,
    /// Memberships being recovered: what arrives for them waits here, with its offset, until
    /// the replay has been queued ([`Rooms::end_recovery`]). Behind its own lock, as delivery
    /// holds `maps` for reading only.
    recovering: Mutex<HashMap<(ConnId, String), Waiting>>,
}

/// What arrived for a membership being recovered: each frame with its offset in the room and
/// its `meta.id`.
pub type Waiting = Vec<Held>;

/// A frame held back for a recovering membership.
pub struct Held {
    /// Its offset in the room, when stored there.
    pub offset: Option<u64>,
    /// Its `meta.id`.
    pub id: Option<Arc<str>>,
    /// The frame.
    pub text: Text,
}

/// Most frames held back for one recovering membership.
const HELD_MAX: usize = 65_536;

/// A map keyed by connection id with a cheap multiplicative hash: ids are process-local
/// counters, never client input, so a DoS-resistant hash buys nothing on the fan-out path.
type ConnMap<V> = HashMap<ConnId, V, BuildHasherDefault<ConnHasher>>;

#[derive(Default)]
struct ConnHasher(u64);

impl Hasher for ConnHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
    fn write_u64(&mut self, n: u64) {
        // Fibonacci hashing spreads sequential ids over the high bits the table looks at.
        self.0 = n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

/// The room registry of this instance.
#[derive(Default)]
pub struct Rooms {
    /// `std` lock: no `.await` ever happens while it is held, and delivery only `try_send`s.
    maps: RwLock<Maps>,
}

impl Rooms {
    /// Registers a connection so that it can join rooms.
    pub fn register(&self, id: ConnId, outbox: Outbox) {
        self.register_with_secret(id, outbox, 0);
    }

    /// [`Rooms::register`], remembering the random half of the connection's public id.
    pub fn register_with_secret(&self, id: ConnId, outbox: Outbox, secret: u64) {
        self.maps.write().unwrap().members.insert(
            id,
            Member {
                outbox,
                rooms: HashSet::new(),
                secret,
            },
        );
    }

    /// The outbox of connection `id` if its secret is `secret`.
    pub fn find(&self, id: ConnId, secret: u64) -> Option<Outbox> {
        let maps = self.maps.read().unwrap();
        maps.members
            .get(&id)
            .filter(|m| m.secret == secret)
            .map(|m| m.outbox.clone())
    }

    /// Removes a connection from every room; returns the rooms that became empty.
    pub fn unregister(&self, id: ConnId) -> Vec<String> {
        let mut maps = self.maps.write().unwrap();
        let Some(member) = maps.members.remove(&id) else {
            return Vec::new();
        };
        let recovering = maps.recovering.get_mut().unwrap();
        if !recovering.is_empty() {
            recovering.retain(|(conn, _), _| *conn != id);
        }
        member
            .rooms
            .into_iter()
            .filter(|room| remove_from_room(&mut maps.rooms, room, id))
            .collect()
    }

    /// Adds a connection to a room. Returns `true` when this call added it, `false` when it
    /// was already a member.
    pub fn join(&self, id: ConnId, room: &str, max_rooms: usize) -> Result<bool, JoinError> {
        self.join_as(id, room, max_rooms, false)
    }

    /// [`Rooms::join`] for a recovery: from now on what is delivered to the connection through
    /// `room` waits until [`Rooms::end_recovery`], so that the replay can go first.
    pub fn join_recovering(
        &self,
        id: ConnId,
        room: &str,
        max_rooms: usize,
    ) -> Result<bool, JoinError> {
        self.join_as(id, room, max_rooms, true)
    }

    fn join_as(
        &self,
        id: ConnId,
        room: &str,
        max_rooms: usize,
        recovering: bool,
    ) -> Result<bool, JoinError> {
        let mut maps = self.maps.write().unwrap();
        let maps = &mut *maps;
        let member = maps.members.get_mut(&id).ok_or(JoinError::Gone)?;
        let added = !member.rooms.contains(room);
        if added && member.rooms.len() >= max_rooms {
            return Err(JoinError::TooMany(max_rooms));
        }
        if recovering {
            // A second recovery of the room while one runs shares its buffer.
            maps.recovering
                .get_mut()
                .unwrap()
                .entry((id, room.to_string()))
                .or_default();
        }
        if !added {
            return Ok(false);
        }
        member.rooms.insert(room.to_string());
        let outbox = member.outbox.clone();
        maps.rooms
            .entry(room.to_string())
            .or_default()
            .insert(id, outbox);
        Ok(true)
    }

    /// What arrived for connection `id` through `room` while it recovers, taken out; the room
    /// stays held back. `None` once nothing is left: then deliveries go through again, and
    /// the recovery is over. Call until `None`, queueing what comes back in order, so that
    /// live actions never overtake held-back ones.
    pub fn take_held(&self, id: ConnId, room: &str) -> Option<Waiting> {
        let mut maps = self.maps.write().unwrap();
        let recovering = maps.recovering.get_mut().unwrap();
        let key = (id, room.to_string());
        match recovering.get_mut(&key) {
            Some(waiting) if !waiting.is_empty() => Some(std::mem::take(waiting)),
            Some(_) => {
                recovering.remove(&key);
                None
            }
            None => None,
        }
    }

    /// The rooms connection `id` is in.
    pub fn rooms_of(&self, id: ConnId) -> Vec<String> {
        let maps = self.maps.read().unwrap();
        maps.members
            .get(&id)
            .map(|m| m.rooms.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// The outbox of connection `id`.
    pub fn outbox(&self, id: ConnId) -> Option<Outbox> {
        let maps = self.maps.read().unwrap();
        maps.members.get(&id).map(|m| m.outbox.clone())
    }

    /// Removes a connection from a room. Returns `true` when the room became empty.
    pub fn leave(&self, id: ConnId, room: &str) -> bool {
        self.leave_checked(id, room) == Some(true)
    }

    /// Removes a connection from a room: `None` when it was not a member, else whether the
    /// room became empty.
    pub fn leave_checked(&self, id: ConnId, room: &str) -> Option<bool> {
        let mut maps = self.maps.write().unwrap();
        maps.recovering
            .get_mut()
            .unwrap()
            .remove(&(id, room.to_string()));
        let was_member = maps
            .members
            .get_mut(&id)
            .is_some_and(|m| m.rooms.remove(room));
        was_member.then(|| remove_from_room(&mut maps.rooms, room, id))
    }

    /// Whether connection `id` is in `room`.
    pub fn is_member(&self, id: ConnId, room: &str) -> bool {
        let maps = self.maps.read().unwrap();
        maps.members
            .get(&id)
            .is_some_and(|m| m.rooms.contains(room))
    }

    /// Whether at least one local connection is in `room`.
    pub fn has_members(&self, room: &str) -> bool {
        self.maps.read().unwrap().rooms.contains_key(room)
    }

    /// The rooms with local members.
    pub fn room_names(&self) -> Vec<String> {
        self.maps.read().unwrap().rooms.keys().cloned().collect()
    }

    /// Number of rooms with local members.
    pub fn room_count(&self) -> usize {
        self.maps.read().unwrap().rooms.len()
    }

    /// Delivers `action` (an object with a string `type`) to every local connection in at
    /// least one of `targets`, once each; `meta.room` is the first target room the connection
    /// is in. The action is serialized once per target room that has recipients.
    pub fn deliver(&self, targets: &[String], action: &Map<String, Value>) -> Delivery {
        self.deliver_stored(targets, action, None, &[])
    }

    /// [`Rooms::deliver`] of an action history stored: it carries `meta.id` = `id`, and in
    /// each target room the offset it got there (`offsets`, one per target; `None` where it
    /// was not stored).
    pub fn deliver_stored(
        &self,
        targets: &[String],
        action: &Map<String, Value>,
        id: Option<&str>,
        offsets: &[Option<u64>],
    ) -> Delivery {
        self.deliver_except(targets, &[], action, id, offsets)
    }

    /// [`Rooms::deliver_stored`] to the connections in none of the rooms `except`.
    pub fn deliver_except(
        &self,
        targets: &[String],
        except: &[String],
        action: &Map<String, Value>,
        id: Option<&str>,
        offsets: &[Option<u64>],
    ) -> Delivery {
        let maps = self.maps.read().unwrap();
        let mut seen: HashSet<ConnId, BuildHasherDefault<ConnHasher>> = HashSet::default();
        // The excepted connections count as delivered already.
        for room in except {
            if let Some(conns) = maps.rooms.get(room) {
                seen.extend(conns.keys().copied());
            }
        }
        let skip_seen = targets.len() > 1 || !seen.is_empty();
        let mut result = Delivery::default();
        // Held-back memberships are looked up only while some recovery runs.
        let mut recovering = Some(maps.recovering.lock().unwrap()).filter(|r| !r.is_empty());
        let held_id: Option<Arc<str>> = recovering.as_ref().and(id).map(Arc::from);
        // Stored in several rooms: a connection in more than one of them also gets the
        // offsets of the others (`meta.offsets`), so its text is its own.
        let stored_in = offsets.iter().filter(|o| o.is_some()).count();
        for (i, room) in targets.iter().enumerate() {
            let Some(conns) = maps.rooms.get(room) else {
                continue;
            };
            let offset = offsets.get(i).copied().flatten();
            let mut bytes: Option<Text> = None;
            let mut own: Option<Text>;
            for (id_, outbox) in conns {
                if skip_seen && !seen.insert(*id_) {
                    continue;
                }
                let others = (stored_in > 1)
                    .then(|| other_offsets(&maps, *id_, targets, offsets, i))
                    .filter(|others| !others.is_empty());
                let text = match &others {
                    Some(others) => {
                        let stamp = protocol::Stamp {
                            id,
                            offset,
                            replayed: false,
                            offsets: Some(others),
                        };
                        own = Some(protocol::server_action(action, room, &stamp).into());
                        own.as_ref().expect("just set")
                    }
                    None => bytes.get_or_insert_with(|| {
                        let stamp = protocol::Stamp {
                            id,
                            offset,
                            replayed: false,
                            offsets: None,
                        };
                        protocol::server_action(action, room, &stamp).into()
                    }),
                };
                if let Some(waiting) = recovering
                    .as_mut()
                    .and_then(|r| r.get_mut(&(*id_, room.clone())))
                {
                    // A client that cannot take in the live actions while its replay is
                    // queued is as slow as one whose send queue overflows.
                    if waiting.len() >= HELD_MAX {
                        outbox.closer().close(crate::error::Disconnect::Slow);
                        result.dropped += 1;
                        continue;
                    }
                    waiting.push(Held {
                        offset,
                        id: held_id.clone(),
                        text: text.clone(),
                    });
                    continue;
                }
                if !outbox.fits(text.len()) {
                    result.oversize += 1;
                    warn_oversize(action, text.len());
                    continue;
                }
                if outbox.push(text.clone()) {
                    result.delivered += 1;
                } else {
                    result.dropped += 1;
                }
            }
        }
        result
    }
}

/// The offsets of an action in the target rooms after `first` (the one it is delivered
/// through) that connection `id` is also in, by room.
fn other_offsets(
    maps: &Maps,
    id: ConnId,
    targets: &[String],
    offsets: &[Option<u64>],
    first: usize,
) -> Map<String, Value> {
    let Some(member) = maps.members.get(&id) else {
        return Map::new();
    };
    targets
        .iter()
        .zip(offsets)
        .skip(first + 1)
        .filter_map(|(room, offset)| {
            let offset = (*offset)?;
            member
                .rooms
                .contains(room)
                .then(|| (room.clone(), Value::from(offset)))
        })
        .collect()
}

/// Logs an action too large for a send queue, at most once a minute: a publisher that keeps
/// sending them must not flood the log.
fn warn_oversize(action: &Map<String, Value>, len: usize) {
    use std::sync::atomic::{AtomicU64, Ordering};
    static LAST_WARNED: AtomicU64 = AtomicU64::new(0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let last = LAST_WARNED.load(Ordering::Relaxed);
    if now >= last + 60
        && LAST_WARNED
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    {
        let ty = action.get("type").and_then(Value::as_str).unwrap_or("");
        tracing::warn!(
            r#type = %crate::error::clip(ty),
            bytes = len,
            "a server-fired action is larger than a connection's whole send queue (PATCHBAY_SEND_QUEUE_BYTES): dropped for it (logged at most once a minute)"
        );
    }
}

fn remove_from_room(rooms: &mut HashMap<String, ConnMap<Outbox>>, room: &str, id: ConnId) -> bool {
    let Some(conns) = rooms.get_mut(room) else {
        return false;
    };
    conns.remove(&id);
    if conns.is_empty() {
        rooms.remove(room);
        return true;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::QueueLimits;
    use serde_json::json;

    fn limits(frames: usize) -> QueueLimits {
        QueueLimits {
            frames,
            bytes: 1 << 20,
        }
    }

    fn text(t: Text) -> Value {
        serde_json::from_str(t.as_str()).unwrap()
    }

    #[test]
    fn room_names() {
        assert!(valid_room("task:42"));
        assert!(valid_room(&"r".repeat(128)));
        assert!(!valid_room(""));
        assert!(!valid_room(&"r".repeat(129)));
        assert!(!valid_room("a b"));
        assert!(!valid_room("tab\there"));
        assert!(!valid_room("é"));
    }

    #[test]
    fn patterns() {
        let p = RoomPattern::parse("task:10*").unwrap();
        assert!(p.matches("task:10"));
        assert!(p.matches("task:1055"));
        assert!(!p.matches("task:1"));
        let e = RoomPattern::parse("org:7").unwrap();
        assert!(e.matches("org:7"));
        assert!(!e.matches("org:70"));
        assert!(RoomPattern::parse("bad room").is_err());
        for covers_users in ["*", "u*", "user*", "user:*", "user:4*", "user:42"] {
            let p = RoomPattern::parse(covers_users).unwrap();
            assert!(p.can_match_prefix("user:"), "{covers_users}");
            assert_eq!(p.to_string(), covers_users);
        }
        for other in ["users", "dm:*", "lobby", "org:*", "x*"] {
            assert!(
                !RoomPattern::parse(other).unwrap().can_match_prefix("user:"),
                "{other}"
            );
        }
    }

    #[test]
    fn join_leave_keep_both_maps_in_step() {
        let rooms = Rooms::default();
        let (a, _ra) = Outbox::new(limits(8));
        let (b, _rb) = Outbox::new(limits(8));
        rooms.register(1, a);
        rooms.register(2, b);
        assert_eq!(rooms.join(1, "r", 10), Ok(true));
        assert_eq!(rooms.join(2, "r", 10), Ok(true));
        assert_eq!(rooms.join(1, "r", 10), Ok(false), "already a member");
        assert_eq!(rooms.join(1, "s", 10), Ok(true));
        assert_eq!(rooms.join(1, "t", 2), Err(JoinError::TooMany(2)));
        assert_eq!(rooms.join(9, "t", 2), Err(JoinError::Gone));
        assert!(!rooms.leave(2, "r"));
        assert!(!rooms.leave(2, "r"), "leaving twice changes nothing");
        let mut emptied = rooms.unregister(1);
        emptied.sort();
        assert_eq!(emptied, vec!["r".to_string(), "s".to_string()]);
        assert_eq!(rooms.room_count(), 0);
    }

    #[test]
    fn multi_room_delivery_reaches_each_connection_once() {
        let rooms = Rooms::default();
        let (a, mut ra) = Outbox::new(limits(8));
        let (b, mut rb) = Outbox::new(limits(8));
        rooms.register(1, a);
        rooms.register(2, b);
        rooms.join(1, "task:1", 10).unwrap();
        rooms.join(1, "user:1", 10).unwrap();
        rooms.join(2, "user:1", 10).unwrap();
        let action = json!({"type":"TASK_PROGRESS","payload":{"id":1}});
        let d = rooms.deliver(
            &["task:1".into(), "user:1".into()],
            action.as_object().unwrap(),
        );
        assert_eq!(
            d,
            Delivery {
                delivered: 2,
                ..Delivery::default()
            }
        );
        assert_eq!(text(ra.try_recv().unwrap())["meta"]["room"], "task:1");
        assert!(ra.try_recv().is_none(), "connection 1 got it once");
        assert_eq!(text(rb.try_recv().unwrap())["meta"]["room"], "user:1");
        assert!(rb.try_recv().is_none());
    }

    #[test]
    fn a_full_queue_drops_only_that_connection() {
        let rooms = Rooms::default();
        let (slow, _rs) = Outbox::new(limits(1));
        let (fast, mut rf) = Outbox::new(limits(8));
        let slow_closer = slow.close_signal();
        rooms.register(1, slow);
        rooms.register(2, fast);
        rooms.join(1, "r", 10).unwrap();
        rooms.join(2, "r", 10).unwrap();
        let action = json!({"type":"A"});
        rooms.deliver(&["r".into()], action.as_object().unwrap());
        let d = rooms.deliver(&["r".into()], action.as_object().unwrap());
        assert_eq!(
            d,
            Delivery {
                delivered: 1,
                dropped: 1,
                oversize: 0
            }
        );
        assert_eq!(slow_closer.reason(), Some(crate::error::Disconnect::Slow));
        assert!(rf.try_recv().is_some() && rf.try_recv().is_some());
    }

    #[test]
    fn an_action_larger_than_the_queue_is_dropped_and_nobody_is_closed() {
        let rooms = Rooms::default();
        let (small, mut rs) = Outbox::new(QueueLimits {
            frames: 8,
            bytes: 100,
        });
        let closer = small.close_signal();
        rooms.register(1, small);
        rooms.join(1, "r", 10).unwrap();
        let big = json!({"type": "A", "payload": "x".repeat(200)});
        let d = rooms.deliver(&["r".into()], big.as_object().unwrap());
        assert_eq!(
            d,
            Delivery {
                oversize: 1,
                ..Delivery::default()
            }
        );
        assert_eq!(closer.reason(), None, "the connection stays open");
        assert!(rs.try_recv().is_none());
        let small_action = json!({"type": "A"});
        rooms.deliver(&["r".into()], small_action.as_object().unwrap());
        assert!(rs.try_recv().is_some(), "and still receives what fits");
    }
}
