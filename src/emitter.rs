//! socket.io emitter interop (contract section 10): services written for socket.io's Redis
//! emitter (`io.to('user(1)').emit('message', data)`) reach patchbay's connections unchanged.
//!
//! Every instance pattern-subscribes the emitter's channels for the namespace `/`
//! (`<key>#/#` for several rooms, `<key>#/#<room>#` for one) and turns each message into a
//! server-fired action for the mapped rooms. Everything that cannot be delivered is dropped,
//! counted by reason in `/metrics` and logged at most once a minute per reason; decoding is
//! bounded ([`msgpack`]).

pub mod msgpack;

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Map, Value};

use self::msgpack::{Dialect, Refusal};
use crate::protocol::check_action_object;
use crate::rooms::valid_room;
use crate::template::Template;

/// Longest value a `{name}` of a room rule matches.
const FIELD_MAX: usize = 128;

/// socket.io's reserved event names: an emitter cannot send them, nor can patchbay.
const RESERVED_EVENTS: [&str; 6] = [
    "connect",
    "connect_error",
    "disconnect",
    "disconnecting",
    "newListener",
    "removeListener",
];

/// Why an emitter message was dropped (`patchbay_emitter_dropped_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// Not msgpack of `[uid, packet, opts]` as the emitters write it.
    Malformed,
    /// Nested deeper than [`msgpack::MAX_DEPTH`].
    TooDeep,
    /// Larger than `PATCHBAY_MAX_FRAME_BYTES`, or naming more rooms than
    /// `PATCHBAY_MAX_PUBLISH_ROOMS`.
    TooLarge,
    /// It carries binary data.
    Binary,
    /// A namespace other than `/`.
    Namespace,
    /// Not an event packet, or its event name is not a usable action type.
    Event,
    /// A broadcast to everyone: no room.
    NoRooms,
    /// No room maps to a patchbay room.
    Unmapped,
}

impl DropReason {
    /// Every reason, in the order of the metric's lines.
    pub const ALL: [DropReason; 8] = [
        DropReason::Malformed,
        DropReason::TooDeep,
        DropReason::TooLarge,
        DropReason::Binary,
        DropReason::Namespace,
        DropReason::Event,
        DropReason::NoRooms,
        DropReason::Unmapped,
    ];

    /// The metric's `reason` label.
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::Malformed => "malformed",
            DropReason::TooDeep => "too_deep",
            DropReason::TooLarge => "too_large",
            DropReason::Binary => "binary",
            DropReason::Namespace => "namespace",
            DropReason::Event => "event",
            DropReason::NoRooms => "no_rooms",
            DropReason::Unmapped => "unmapped",
        }
    }

    fn index(self) -> usize {
        DropReason::ALL
            .iter()
            .position(|d| *d == self)
            .expect("in ALL")
    }
}

/// What became of one emitter message.
#[derive(Debug, PartialEq)]
pub enum Outcome {
    /// Deliver `action` to the members of `rooms` who are in none of `except`.
    Deliver {
        /// patchbay rooms, without duplicates.
        rooms: Vec<String>,
        /// patchbay rooms whose members do not get it.
        except: Vec<String>,
        /// The server-fired action.
        action: Map<String, Value>,
    },
    /// One of the copies the oldest emitters publish on each room's channel; the copy on the
    /// first room's channel is delivered to all of them.
    Copy,
    /// Dropped.
    Dropped(DropReason, String),
}

/// `PATCHBAY_EMITTER_ROOMS`: each rule maps socket.io rooms matching its left template to
/// the patchbay room of its right one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoomRules(Vec<(Template, Template)>);

/// The characters a `{name}` of a room rule matches.
fn field_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'@')
}

impl RoomRules {
    /// Parses `<socket.io template>=<patchbay template>,…`.
    pub fn parse(s: &str) -> Result<RoomRules, String> {
        let mut rules = Vec::new();
        for rule in s.split(',').map(str::trim).filter(|r| !r.is_empty()) {
            let (from, to) = rule
                .split_once('=')
                .ok_or_else(|| format!("`{rule}` is not `<socket.io room>=<patchbay room>`"))?;
            let from = Template::parse(from.trim()).map_err(|e| format!("`{rule}`: {e}"))?;
            let to = Template::parse(to.trim()).map_err(|e| format!("`{rule}`: {e}"))?;
            if !from.fields_are_delimited(field_char) {
                return Err(format!(
                    "`{rule}`: each {{name}} must be followed by the end or by a character it cannot match (it matches A-Z a-z 0-9 - . _ ~ @)"
                ));
            }
            if let Some(f) = to.fields().find(|f| !from.fields().any(|g| g == *f)) {
                return Err(format!("`{rule}`: {{{f}}} is not in the socket.io room"));
            }
            rules.push((from, to));
        }
        Ok(RoomRules(rules))
    }

    /// The patchbay room of socket.io room `room`: the first matching rule's, else `room`
    /// itself when it is a valid room name.
    pub fn map(&self, room: &str) -> Option<String> {
        for (from, to) in &self.0 {
            if let Some(values) = from.matches(room, field_char, FIELD_MAX) {
                return to
                    .fill(&values, |v| Ok(v.to_string()))
                    .ok()
                    .filter(|r| valid_room(r));
            }
        }
        valid_room(room).then(|| room.to_string())
    }
}

/// Drops by reason, and when each reason was last logged.
#[derive(Debug, Default)]
pub struct Drops {
    counts: [AtomicU64; 8],
    logged: Mutex<[Option<Instant>; 8]>,
}

impl Drops {
    /// Counts a drop, and logs it unless this reason was logged within the last minute.
    pub fn count(&self, reason: DropReason, detail: &str) {
        let i = reason.index();
        let n = self.counts[i].fetch_add(1, Ordering::Relaxed) + 1;
        let mut logged = self.logged.lock().unwrap();
        if logged[i].is_none_or(|at| at.elapsed() >= Duration::from_secs(60)) {
            logged[i] = Some(Instant::now());
            drop(logged);
            tracing::warn!(
                reason = reason.as_str(),
                dropped_so_far = n,
                "dropped a socket.io emitter message: {detail} (logged once a minute per reason)"
            );
        }
    }

    /// The drops of `reason` so far.
    pub fn get(&self, reason: DropReason) -> u64 {
        self.counts[reason.index()].load(Ordering::Relaxed)
    }
}

/// The emitter interop of one instance.
#[derive(Debug)]
pub struct Emitter {
    /// `<key>#/#`: every channel of the namespace `/` starts so.
    prefix: String,
    rules: RoomRules,
    max_bytes: usize,
    max_rooms: usize,
    /// Counted drops.
    pub drops: Drops,
}

impl Emitter {
    /// The interop for emitter key `key`, mapping rooms by `rules`; messages over
    /// `max_bytes` or naming more than `max_rooms` rooms are dropped.
    pub fn new(key: &str, rules: RoomRules, max_bytes: usize, max_rooms: usize) -> Emitter {
        Emitter {
            prefix: format!("{key}#/#"),
            rules,
            max_bytes,
            max_rooms,
            drops: Drops::default(),
        }
    }

    /// The pattern to subscribe: every channel of the namespace `/`, with the key's own
    /// pattern characters escaped.
    pub fn pattern(&self) -> String {
        let mut pattern = String::with_capacity(self.prefix.len() + 1);
        for c in self.prefix.chars() {
            if matches!(c, '*' | '?' | '[' | ']' | '\\') {
                pattern.push('\\');
            }
            pattern.push(c);
        }
        pattern.push('*');
        pattern
    }

    /// Turns the message `bytes` received on `channel` into what to deliver.
    pub fn receive(&self, channel: &str, bytes: &[u8]) -> Outcome {
        match self.read(channel, bytes) {
            Ok(outcome) => outcome,
            Err((reason, detail)) => Outcome::Dropped(reason, detail),
        }
    }

    fn read(&self, channel: &str, bytes: &[u8]) -> Result<Outcome, (DropReason, String)> {
        let fail = |reason, detail: &str| Err((reason, detail.to_string()));
        // The room of a single-room channel (`<key>#/#<room>#`); none on the broadcast one.
        let Some(rest) = channel.strip_prefix(self.prefix.as_str()) else {
            return fail(DropReason::Namespace, "a channel of another namespace");
        };
        let channel_room = match rest {
            "" => None,
            r => match r.strip_suffix('#') {
                Some(room) => Some(room),
                None => return fail(DropReason::Malformed, "not an emitter channel"),
            },
        };
        if bytes.len() > self.max_bytes {
            return fail(DropReason::TooLarge, "larger than PATCHBAY_MAX_FRAME_BYTES");
        }
        let message = decode(bytes).map_err(|r| match r {
            Refusal::Malformed => (
                DropReason::Malformed,
                "not msgpack as the emitters write it".into(),
            ),
            Refusal::TooDeep => (DropReason::TooDeep, "nested deeper than 32".into()),
            Refusal::Binary => (DropReason::Binary, "binary data is not carried".into()),
        })?;
        // `[uid, packet, opts]`; the oldest emitters wrote `[packet, opts]`.
        let (packet, opts) = match message {
            Value::Array(mut a) if a.len() == 3 => {
                let opts = a.pop().expect("3 items");
                (a.pop().expect("2 items"), opts)
            }
            Value::Array(mut a) if a.len() == 2 => {
                let opts = a.pop().expect("2 items");
                (a.pop().expect("1 item"), opts)
            }
            _ => return fail(DropReason::Malformed, "not [uid, packet, opts]"),
        };
        let (Value::Object(mut packet), Value::Object(opts)) = (packet, opts) else {
            return fail(DropReason::Malformed, "packet and opts must be maps");
        };
        match packet.get("nsp") {
            None => {}
            Some(Value::String(nsp)) if nsp == "/" => {}
            Some(_) => return fail(DropReason::Namespace, "a namespace other than /"),
        }
        match packet.get("type").and_then(Value::as_u64) {
            Some(2 | 5) => {}
            Some(_) => return fail(DropReason::Event, "not an event packet (type 2 or 5)"),
            None => return fail(DropReason::Malformed, "the packet has no type"),
        }
        let Some(Value::Array(data)) = packet.remove("data") else {
            return fail(DropReason::Malformed, "the packet has no data");
        };
        let rooms = names(opts.get("rooms"))?;
        let except = names(opts.get("except"))?;
        if rooms.is_empty() {
            return fail(DropReason::NoRooms, "a broadcast to everyone (no room)");
        }
        // socket.io-emitter 1.x–2.x publish a message for several rooms on each room's
        // channel: the copy on the first room's channel is the one delivered.
        if let Some(room) = channel_room
            && rooms.len() > 1
            && rooms.iter().any(|r| r == room)
            && rooms[0] != room
        {
            return Ok(Outcome::Copy);
        }
        if rooms.len() > self.max_rooms {
            return fail(
                DropReason::TooLarge,
                "more rooms than PATCHBAY_MAX_PUBLISH_ROOMS",
            );
        }
        let action = action(data).map_err(|detail| (DropReason::Event, detail))?;
        let mut mapped: Vec<String> = Vec::with_capacity(rooms.len());
        for room in &rooms {
            match self.rules.map(room) {
                Some(r) if !mapped.contains(&r) => mapped.push(r),
                Some(_) => {}
                None => tracing::debug!(%room, "an emitter room maps to no patchbay room"),
            }
        }
        if mapped.is_empty() {
            return fail(
                DropReason::Unmapped,
                "no room maps to a patchbay room (see PATCHBAY_EMITTER_ROOMS)",
            );
        }
        let except = except.iter().filter_map(|r| self.rules.map(r)).collect();
        Ok(Outcome::Deliver {
            rooms: mapped,
            except,
            action,
        })
    }
}

/// Decodes a message in today's msgpack, or in `msgpack-js`'s when it is not well-formed
/// today's way (the oldest emitters: their `undefined` is a buffer's marker today). A message
/// that is well-formed today's way is never read the old way: a buffer in it (which a service
/// may fill with a user's bytes) must not be read as structure.
fn decode(bytes: &[u8]) -> Result<Value, Refusal> {
    match msgpack::decode(bytes, Dialect::Current) {
        Err(Refusal::Malformed) => msgpack::decode(bytes, Dialect::Legacy),
        other => other,
    }
}

/// Room names of `opts.rooms` or `opts.except` (strings; numbers as their text).
fn names(value: Option<&Value>) -> Result<Vec<String>, (DropReason, String)> {
    match value {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.clone()),
                Value::Number(n) => Ok(n.to_string()),
                _ => Err((
                    DropReason::Malformed,
                    "a room that is not a string".to_string(),
                )),
            })
            .collect(),
        Some(_) => Err((DropReason::Malformed, "rooms must be a list".to_string())),
    }
}

/// The action of an event `[name, …args]`.
fn action(mut data: Vec<Value>) -> Result<Map<String, Value>, String> {
    let Some(Value::String(event)) = data.first().cloned() else {
        return Err("the event name is not a string".into());
    };
    if RESERVED_EVENTS.contains(&event.as_str()) {
        return Err(format!("`{event}` is a reserved socket.io event"));
    }
    let mut args = data.split_off(1);
    // `emit('action', {type, …})` delivers that action as it is.
    if event == "action"
        && let [Value::Object(inner)] = args.as_slice()
        && matches!(inner.get("type"), Some(Value::String(_)))
    {
        let Some(Value::Object(inner)) = args.pop() else {
            unreachable!("matched above")
        };
        check_action_object(&inner)?;
        return Ok(inner);
    }
    let mut action = Map::new();
    action.insert("type".into(), Value::String(event));
    match args.len() {
        0 => {}
        1 => {
            action.insert("payload".into(), args.pop().expect("one"));
        }
        _ => {
            action.insert("payload".into(), Value::Array(args));
        }
    }
    check_action_object(&action)?;
    Ok(action)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn room_rules_map_the_first_match_else_the_room_itself() {
        let rules = RoomRules::parse("user({id})=user:{id}, team/{t}/{u}=member:{t}:{u}").unwrap();
        assert_eq!(rules.map("user(1)").as_deref(), Some("user:1"));
        assert_eq!(rules.map("user(a@b.c)").as_deref(), Some("user:a@b.c"));
        assert_eq!(rules.map("team/x/y").as_deref(), Some("member:x:y"));
        // A field takes at least one character, and a rule matches the whole room: these are
        // used as they are.
        assert_eq!(rules.map("user()").as_deref(), Some("user()"));
        assert_eq!(rules.map("user(1)x").as_deref(), Some("user(1)x"));
        assert_eq!(rules.map("lobby").as_deref(), Some("lobby"));
        assert_eq!(rules.map("has space"), None);
        let long = format!("user({})", "a".repeat(129));
        assert_eq!(
            rules.map(&long),
            None,
            "too long for a field, and for a room"
        );
        assert_eq!(rules.map("user(a b)"), None);
        assert_eq!(RoomRules::parse("").unwrap(), RoomRules::default());
    }

    #[test]
    fn bad_room_rules_are_refused() {
        for bad in [
            "user({id})",
            "{a}{b}=x:{a}",
            "{a}.{b}=x:{a}",
            "user({id})=user:{other}",
            "user({id)=x",
        ] {
            assert!(RoomRules::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn events_become_actions() {
        let at = |d: Value| action(serde_json::from_value(d).unwrap());
        assert_eq!(
            at(json!(["ping"])),
            Ok(json!({"type": "ping"}).as_object().unwrap().clone())
        );
        assert_eq!(
            at(json!(["m", 1])).unwrap(),
            json!({"type": "m", "payload": 1})
                .as_object()
                .unwrap()
                .clone()
        );
        assert_eq!(
            at(json!(["m", 1, "b"])).unwrap(),
            json!({"type": "m", "payload": [1, "b"]})
                .as_object()
                .unwrap()
                .clone()
        );
        assert_eq!(
            at(json!(["action", {"type": "T", "payload": 2}])).unwrap(),
            json!({"type": "T", "payload": 2})
                .as_object()
                .unwrap()
                .clone()
        );
        assert_eq!(
            at(json!(["action", {"kind": "T"}])).unwrap(),
            json!({"type": "action", "payload": {"kind": "T"}})
                .as_object()
                .unwrap()
                .clone()
        );
        assert!(at(json!(["disconnect"])).is_err());
        assert!(at(json!([""])).is_err());
        assert!(at(json!([7])).is_err());
        assert!(at(json!([])).is_err());
        assert!(at(json!(["action", {"type": ""}])).is_err());
    }

    /// msgpack of `value`, with `bin` written as a bin 8 where the value has `"<bin>"`.
    fn pack(value: &Value, bin: &[u8], out: &mut Vec<u8>) {
        match value {
            Value::String(s) if s == "<bin>" => {
                out.extend_from_slice(&[0xc4, bin.len() as u8]);
                out.extend_from_slice(bin);
            }
            Value::String(s) => {
                out.push(0xa0 | s.len() as u8);
                out.extend_from_slice(s.as_bytes());
            }
            Value::Number(n) => out.push(n.as_u64().unwrap() as u8),
            Value::Array(items) => {
                out.push(0x90 | items.len() as u8);
                items.iter().for_each(|v| pack(v, bin, out));
            }
            Value::Object(map) => {
                out.push(0x80 | map.len() as u8);
                for (k, v) in map {
                    pack(&Value::String(k.clone()), bin, out);
                    pack(v, bin, out);
                }
            }
            other => panic!("not packed here: {other}"),
        }
    }

    fn packed(value: Value, bin: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        pack(&value, bin, &mut out);
        out
    }

    #[test]
    fn the_oldest_form_without_a_uid_is_read() {
        let e = Emitter::new(
            "socket.io",
            RoomRules::parse("user({id})=user:{id}").unwrap(),
            1 << 16,
            10,
        );
        let message = packed(
            json!([{"type": 2, "data": ["hi", 1], "nsp": "/"}, {"rooms": ["user(4)"], "flags": {}}]),
            &[],
        );
        assert_eq!(
            e.receive("socket.io#/#user(4)#", &message),
            Outcome::Deliver {
                rooms: vec!["user:4".into()],
                except: vec![],
                action: json!({"type": "hi", "payload": 1})
                    .as_object()
                    .unwrap()
                    .clone(),
            }
        );
    }

    #[test]
    fn a_buffer_is_never_read_as_structure() {
        // A service forwards a user's bytes as a buffer: they hold a whole emitter message for
        // another room. The message around them is well-formed, so it is binary, and dropped.
        let e = Emitter::new("socket.io", RoomRules::default(), 1 << 16, 10);
        let forged = packed(
            json!(["emitter", {"type": 2, "data": ["x"], "nsp": "/"}, {"rooms": ["victim"]}]),
            &[],
        );
        let message = packed(
            json!(["emitter", {"type": 2, "data": ["file", "<bin>"], "nsp": "/"}, {"rooms": ["lobby"]}]),
            &forged,
        );
        assert!(matches!(
            e.receive("socket.io#/#lobby#", &message),
            Outcome::Dropped(DropReason::Binary, _)
        ));
    }

    #[test]
    fn the_pattern_escapes_the_key() {
        let e = Emitter::new("a*b", RoomRules::default(), 1024, 10);
        assert_eq!(e.pattern(), "a\\*b#/#*");
        let e = Emitter::new("socket.io", RoomRules::default(), 1024, 10);
        assert_eq!(e.pattern(), "socket.io#/#*");
    }
}
