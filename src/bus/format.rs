//! What travels on a networked bus, shared by every bus and driver: the channel of a room, an
//! action or a multi-room envelope with its de-duplication, and task progress from an external
//! task manager (contract section 4).

use std::collections::{HashMap, HashSet, VecDeque};

use serde_json::value::RawValue;
use serde_json::{Map, Value, json};

use crate::history::Position;
use crate::protocol::{check_action_object, check_server_action};
use crate::rooms::valid_room;

/// Envelope ids remembered for de-duplication. An envelope is published once per target room;
/// its copies arrive back to back, so a few thousand ids are plenty.
pub const DEDUPE_IDS: usize = 8192;

/// The channel of `room` under `prefix`.
pub fn room_channel(prefix: &str, room: &str) -> String {
    format!("{prefix}:room:{room}")
}

/// The message to publish: one envelope `{"id","rooms","action"}`, published on each room's
/// channel (receivers de-duplicate by id, and the id is the action's `meta.id`).
pub fn encode(id: &str, rooms: &[String], action: Map<String, Value>) -> String {
    json!({"id": id, "rooms": rooms, "action": action}).to_string()
}

/// A server-fired action to deliver to the local members of `rooms`.
#[derive(Debug, PartialEq)]
pub struct Incoming {
    /// The target rooms.
    pub rooms: Vec<String>,
    /// The action.
    pub action: Map<String, Value>,
    /// Its `meta.id`, when it came in an envelope.
    pub id: Option<String>,
    /// Where it was stored, one per room (`None` where it was not); empty when nowhere.
    pub positions: Vec<Option<Position>>,
    /// Rooms whose members do not get it (a socket.io emitter's `except`).
    pub except: Vec<String>,
}

impl Incoming {
    /// An action that was not stored.
    pub fn live(rooms: Vec<String>, action: Map<String, Value>) -> Incoming {
        Incoming {
            rooms,
            action,
            id: None,
            positions: Vec::new(),
            except: Vec::new(),
        }
    }
}

/// What a received room message asks for.
#[derive(Debug, PartialEq)]
pub enum Received {
    /// Deliver it.
    Deliver(Incoming),
    /// A copy of an envelope already delivered: nothing to do.
    Repeat,
    /// Neither an action nor an envelope: dropped and counted.
    Malformed,
}

/// Recently delivered envelope ids.
#[derive(Default)]
pub struct Dedupe {
    ids: HashSet<String>,
    order: VecDeque<String>,
}

impl Dedupe {
    /// Whether `id` was delivered recently.
    pub fn contains(&self, id: &str) -> bool {
        self.ids.contains(id)
    }

    /// Records a delivered `id`, forgetting the oldest beyond [`DEDUPE_IDS`].
    pub fn insert(&mut self, id: String) {
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
    #[serde(default, borrow)]
    positions: Option<&'a RawValue>,
    #[serde(default, borrow)]
    except: Option<&'a RawValue>,
}

/// Decodes a message received on `room`'s channel: an action, or an envelope naming at most
/// `max_rooms` rooms. An envelope arrives once per target room this instance is subscribed
/// to: only its id is read before the de-duplication check, so the repeats cost a scan, not a
/// parse.
pub fn decode_room_message(
    room: &str,
    bytes: &[u8],
    seen: &mut Dedupe,
    max_rooms: usize,
) -> Received {
    let Ok(probe) = serde_json::from_slice::<Probe<'_>>(bytes) else {
        return Received::Malformed;
    };
    if probe.ty.is_some() {
        return match serde_json::from_slice::<Map<String, Value>>(bytes) {
            Ok(obj) if check_action_object(&obj).is_ok() => {
                Received::Deliver(Incoming::live(vec![room.to_string()], obj))
            }
            _ => Received::Malformed,
        };
    }
    let (Some(id), Some(rooms), Some(action)) = (probe.id, probe.rooms, probe.action) else {
        return Received::Malformed;
    };
    let Ok(id) = serde_json::from_str::<String>(id.get()) else {
        return Received::Malformed;
    };
    if seen.contains(&id) {
        return Received::Repeat;
    }
    let (Ok(rooms), Ok(action)) = (
        serde_json::from_str::<Vec<String>>(rooms.get()),
        serde_json::from_str::<Value>(action.get()),
    ) else {
        return Received::Malformed;
    };
    if rooms.len() > max_rooms
        || !rooms.iter().all(|r| valid_room(r))
        || check_server_action(&action).is_err()
    {
        return Received::Malformed;
    }
    let Value::Object(action) = action else {
        return Received::Malformed;
    };
    // Where it was stored: `{"<room>":"<epoch>:<offset>"}`, written by the function library.
    let positions = match probe.positions {
        None => Vec::new(),
        Some(raw) => match serde_json::from_str::<HashMap<String, String>>(raw.get()) {
            Ok(map) if map.is_empty() => Vec::new(),
            Ok(map) => rooms
                .iter()
                .map(|r| map.get(r).and_then(|p| Position::from_query(p)))
                .collect(),
            Err(_) => return Received::Malformed,
        },
    };
    let except = match probe.except {
        None => Vec::new(),
        Some(raw) => match serde_json::from_str::<Vec<String>>(raw.get()) {
            Ok(except) => except,
            Err(_) => return Received::Malformed,
        },
    };
    seen.insert(id.clone());
    Received::Deliver(Incoming {
        rooms,
        action,
        id: Some(id),
        positions,
        except,
    })
}

/// The part of `channel` matched by the single `*` of `pattern`.
pub fn task_id<'a>(pattern: &str, channel: &'a str) -> Option<&'a str> {
    let (prefix, suffix) = pattern.split_once('*')?;
    channel
        .strip_prefix(prefix)?
        .strip_suffix(suffix)
        .filter(|id| !id.is_empty())
}

/// Task progress in the Patchbay task-manager format, published on a task channel: a
/// `TASK_PROGRESS` for `task:<id>` and, when the task names a user, `user:<userId>`. `None`
/// when the message is not a JSON object or the rooms would be invalid.
pub fn task_progress(id: &str, bytes: &[u8]) -> Option<(Vec<String>, Map<String, Value>)> {
    let task: Value = serde_json::from_slice(bytes).ok()?;
    if !task.is_object() {
        return None;
    }
    let task_room = format!("task:{id}");
    if !valid_room(&task_room) {
        return None;
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
    Some((rooms, action))
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
    fn envelopes_round_trip_once_and_actions_pass_through() {
        let action = json!({"type": "A", "payload": 1})
            .as_object()
            .unwrap()
            .clone();
        let rooms = vec!["a".to_string(), "b".to_string()];
        let envelope = encode("e1", &rooms, action.clone());
        let mut seen = Dedupe::default();
        let delivered = |rooms: &[&str], id: Option<&str>, positions| {
            Received::Deliver(Incoming {
                rooms: rooms.iter().map(|r| r.to_string()).collect(),
                action: action.clone(),
                id: id.map(str::to_string),
                positions,
                except: Vec::new(),
            })
        };
        assert_eq!(
            decode_room_message("a", envelope.as_bytes(), &mut seen, 10),
            delivered(&["a", "b"], Some("e1"), Vec::new())
        );
        assert_eq!(
            decode_room_message("b", envelope.as_bytes(), &mut seen, 10),
            Received::Repeat
        );
        assert_eq!(
            decode_room_message("c", envelope.as_bytes(), &mut Dedupe::default(), 1),
            Received::Malformed,
            "more rooms than allowed"
        );
        let single = encode("e2", &rooms[..1], action.clone());
        assert_eq!(
            decode_room_message("a", single.as_bytes(), &mut seen, 10),
            delivered(&["a"], Some("e2"), Vec::new())
        );
        let raw = Value::Object(action.clone()).to_string();
        assert_eq!(
            decode_room_message("a", raw.as_bytes(), &mut seen, 10),
            delivered(&["a"], None, Vec::new()),
            "an action published by anyone"
        );
        let stored = br#"{"id":"e3","rooms":["a","b"],"action":{"type":"A","payload":1},"positions":{"b":"ep-1:7"}}"#;
        assert_eq!(
            decode_room_message("a", stored, &mut seen, 10),
            delivered(
                &["a", "b"],
                Some("e3"),
                vec![
                    None,
                    Some(Position {
                        epoch: "ep-1".into(),
                        offset: 7
                    })
                ]
            )
        );
        for bad in [
            &b"nope"[..],
            b"[]",
            br#"{"id":"x","rooms":["a b"],"action":{"type":"A"}}"#,
        ] {
            assert_eq!(
                decode_room_message("a", bad, &mut seen, 10),
                Received::Malformed
            );
        }
    }

    #[test]
    fn task_progress_reaches_the_task_and_its_user() {
        let (rooms, action) = task_progress("42", br#"{"id":"42","userId":7}"#).unwrap();
        assert_eq!(rooms, vec!["task:42".to_string(), "user:7".to_string()]);
        assert_eq!(action["type"], "TASK_PROGRESS");
        assert!(task_progress("42", b"[1]").is_none());
    }
}
