//! The wire format of contract section 2: parsing client frames into requests (pure, no IO)
//! and serializing the actions the server sends.
//!
//! Every message is a Flux Standard Action `{"type", "payload"?, "error"?, "meta"?}`.

use serde::Serialize;
use serde_json::{Map, Value};

use crate::error::ActionError;

/// Suffix of every client request type.
pub const REQUEST_SUFFIX: &str = "_REQUEST";
/// Longest accepted `type`, in bytes.
pub const MAX_TYPE_BYTES: usize = 128;
/// Longest accepted `meta.requestId`, in bytes.
pub const MAX_REQUEST_ID_BYTES: usize = 128;

/// Type of the greeting sent on open.
pub const CONNECTED: &str = "@@patchbay/CONNECTED";
/// Type of the answer to a frame that is not a valid request.
pub const ERROR: &str = "@@patchbay/ERROR";

/// The built-in actions every connection has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Builtin {
    /// `@@patchbay/SUBSCRIBE`: join a room.
    Subscribe,
    /// `@@patchbay/UNSUBSCRIBE`: leave a room.
    Unsubscribe,
    /// `@@patchbay/PING`: application-level keepalive.
    Ping,
    /// `@@patchbay/PRESENCE_SET`: set the user's presence state in a room.
    PresenceSet,
}

impl Builtin {
    fn from_name(name: &str) -> Option<Builtin> {
        match name {
            "@@patchbay/SUBSCRIBE" => Some(Builtin::Subscribe),
            "@@patchbay/PRESENCE_SET" => Some(Builtin::PresenceSet),
            "@@patchbay/UNSUBSCRIBE" => Some(Builtin::Unsubscribe),
            "@@patchbay/PING" => Some(Builtin::Ping),
            _ => None,
        }
    }
}

/// A well-formed client request.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// The action name: the type without `_REQUEST`. Replies are `<name>_SUCCESS|_FAILURE`.
    pub name: String,
    /// Set when `name` is one of the built-in actions.
    pub builtin: Option<Builtin>,
    /// The payload; `{}` when absent.
    pub payload: Value,
    /// The client's `meta.requestId`, or a fresh uuid.
    pub request_id: String,
}

/// Why a frame is not a request; answered with `@@patchbay/ERROR`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameError {
    /// `bad_json` or `invalid_action`.
    pub code: &'static str,
    /// What is wrong with the frame.
    pub message: String,
    /// The frame's request id, when it had a valid one, so the client can match the error.
    pub request_id: Option<String>,
}

impl FrameError {
    fn bad_json(message: impl Into<String>) -> Self {
        FrameError {
            code: "bad_json",
            message: message.into(),
            request_id: None,
        }
    }
    fn invalid(message: impl Into<String>, request_id: Option<String>) -> Self {
        FrameError {
            code: "invalid_action",
            message: message.into(),
            request_id,
        }
    }
    /// The frame was binary: the protocol is JSON text only.
    pub fn binary() -> Self {
        Self::bad_json("binary frames are not supported: send JSON text frames")
    }
}

/// Whether `id` is a valid `meta.requestId`: `[A-Za-z0-9._:-]{1,128}`.
pub fn valid_request_id(id: &str) -> bool {
    (1..=MAX_REQUEST_ID_BYTES).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

/// Parses one text frame into a request.
pub fn parse_request(text: &str) -> Result<Request, FrameError> {
    let value: Value = serde_json::from_str(text)
        .map_err(|e| FrameError::bad_json(format!("not valid JSON: {e}")))?;
    let Value::Object(mut obj) = value else {
        return Err(FrameError::bad_json("a message must be a JSON object"));
    };
    let request_id = match obj.get("meta") {
        None | Some(Value::Null) => None,
        Some(Value::Object(meta)) => match meta.get("requestId") {
            None | Some(Value::Null) => None,
            Some(Value::String(id)) if valid_request_id(id) => Some(id.clone()),
            Some(_) => {
                return Err(FrameError::invalid(
                    "meta.requestId must match [A-Za-z0-9._:-]{1,128}",
                    None,
                ));
            }
        },
        Some(_) => return Err(FrameError::invalid("meta must be an object", None)),
    };
    let ty = match obj.get("type") {
        Some(Value::String(t)) => t,
        Some(_) => return Err(FrameError::invalid("type must be a string", request_id)),
        None => return Err(FrameError::invalid("missing type", request_id)),
    };
    if ty.len() > MAX_TYPE_BYTES {
        return Err(FrameError::invalid(
            format!("type is longer than {MAX_TYPE_BYTES} bytes"),
            request_id,
        ));
    }
    let Some(name) = ty.strip_suffix(REQUEST_SUFFIX).filter(|n| !n.is_empty()) else {
        return Err(FrameError::invalid(
            format!("type `{ty}` is not a request: it must end in {REQUEST_SUFFIX}"),
            request_id,
        ));
    };
    let name = name.to_string();
    Ok(Request {
        builtin: Builtin::from_name(&name),
        name,
        // Redux actions often carry no payload: an absent one is the empty object, so that
        // object schemas and path/query rules apply as to `{}`. An explicit `null` stays null.
        payload: obj
            .remove("payload")
            .unwrap_or_else(|| Value::Object(Map::new())),
        request_id: request_id.unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
    })
}

#[derive(Serialize)]
struct Outgoing<'a, P: Serialize + ?Sized> {
    #[serde(rename = "type")]
    ty: &'a str,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    error: bool,
    payload: &'a P,
    #[serde(skip_serializing_if = "Option::is_none")]
    meta: Option<&'a Map<String, Value>>,
}

fn encode<P: Serialize + ?Sized>(
    ty: &str,
    error: bool,
    payload: &P,
    meta: Option<&Map<String, Value>>,
) -> String {
    serde_json::to_string(&Outgoing {
        ty,
        error,
        payload,
        meta,
    })
    .expect("JSON values always serialize")
}

fn request_meta(request_id: &str) -> Map<String, Value> {
    let mut meta = Map::new();
    meta.insert("requestId".into(), Value::String(request_id.to_string()));
    meta
}

/// `@@patchbay/CONNECTED` with the connection's id, user and initial rooms.
/// `extra`: more payload fields (history's `positions` and `recovery`).
pub fn connected(
    connection_id: &str,
    user_id: Option<&str>,
    rooms: &[String],
    extra: Option<Map<String, Value>>,
) -> String {
    let mut payload = serde_json::json!({
        "protocol": 1,
        "connectionId": connection_id,
        "userId": user_id,
        "rooms": rooms,
    });
    if let (Some(extra), Some(p)) = (extra, payload.as_object_mut()) {
        p.extend(extra);
    }
    encode(CONNECTED, false, &payload, None)
}

/// `<name>_SUCCESS` with `meta.requestId` plus the given extra meta fields.
pub fn success<P: Serialize + ?Sized>(
    name: &str,
    request_id: &str,
    payload: &P,
    extra_meta: Map<String, Value>,
) -> String {
    let mut meta = request_meta(request_id);
    meta.extend(extra_meta);
    encode(&format!("{name}_SUCCESS"), false, payload, Some(&meta))
}

/// `<name>_FAILURE` with the error as payload.
pub fn failure(name: &str, request_id: &str, err: &ActionError) -> String {
    encode(
        &format!("{name}_FAILURE"),
        true,
        err,
        Some(&request_meta(request_id)),
    )
}

/// `@@patchbay/ERROR` for a frame that is not a valid request.
pub fn frame_error(err: &FrameError) -> String {
    let payload = serde_json::json!({"code": err.code, "message": err.message});
    let meta = err.request_id.as_deref().map(request_meta);
    encode(ERROR, true, &payload, meta.as_ref())
}

/// Checks that a published value is an action the server may fire: an object with a string
/// `type` and, when present, an object `meta`.
pub fn check_server_action(action: &Value) -> Result<(), String> {
    match action {
        Value::Object(obj) => check_action_object(obj),
        _ => Err("action must be a JSON object".into()),
    }
}

/// [`check_server_action`] for a value already known to be an object.
pub fn check_action_object(obj: &Map<String, Value>) -> Result<(), String> {
    match obj.get("type") {
        Some(Value::String(t)) if !t.is_empty() && t.len() <= MAX_TYPE_BYTES => {}
        _ => {
            return Err(format!(
                "action.type must be a string of 1 to {MAX_TYPE_BYTES} bytes"
            ));
        }
    }
    match obj.get("meta") {
        None | Some(Value::Object(_)) => Ok(()),
        Some(_) => Err("action.meta must be an object".into()),
    }
}

/// Serializes a server-fired action for the members reached through `room`: the published
/// action with `meta.room` set and its other meta fields kept.
pub fn server_action_for_room(action: &Map<String, Value>, room: &str) -> String {
    server_action(action, room, &Stamp::default())
}

/// What history adds to a server-fired action's `meta` (contract section 8).
#[derive(Debug, Default, Clone, Copy)]
pub struct Stamp<'a> {
    /// `meta.id`: the same in every room.
    pub id: Option<&'a str>,
    /// `meta.offset`: its position in `meta.room`'s history.
    pub offset: Option<u64>,
    /// `meta.replayed`: sent by a recovery.
    pub replayed: bool,
    /// `meta.offsets`: its offsets in the other rooms of the connection it was stored in.
    pub offsets: Option<&'a Map<String, Value>>,
}

/// [`server_action_for_room`] with history's `meta` keys. The reserved keys a publisher may
/// have set are replaced (or dropped).
pub fn server_action(action: &Map<String, Value>, room: &str, stamp: &Stamp<'_>) -> String {
    let mut meta = match action.get("meta") {
        Some(Value::Object(m)) => m.clone(),
        _ => Map::new(),
    };
    for reserved in [
        "id",
        "offset",
        "offsets",
        "replayed",
        "requestId",
        "status",
        "subscribed",
        "roomToken",
    ] {
        meta.remove(reserved);
    }
    meta.insert("room".into(), Value::String(room.to_string()));
    if let Some(id) = stamp.id {
        meta.insert("id".into(), Value::String(id.to_string()));
    }
    if let Some(offset) = stamp.offset {
        meta.insert("offset".into(), Value::from(offset));
    }
    if stamp.replayed {
        meta.insert("replayed".into(), Value::Bool(true));
    }
    if let Some(offsets) = stamp.offsets {
        meta.insert("offsets".into(), Value::Object(offsets.clone()));
    }
    #[derive(Serialize)]
    struct WithMeta<'a> {
        #[serde(flatten)]
        rest: FilteredAction<'a>,
        meta: &'a Map<String, Value>,
    }
    struct FilteredAction<'a>(&'a Map<String, Value>);
    impl Serialize for FilteredAction<'_> {
        fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            use serde::ser::SerializeMap;
            let mut m = s.serialize_map(None)?;
            for (k, v) in self.0.iter().filter(|(k, _)| k.as_str() != "meta") {
                m.serialize_entry(k, v)?;
            }
            m.end()
        }
    }
    serde_json::to_string(&WithMeta {
        rest: FilteredAction(action),
        meta: &meta,
    })
    .expect("JSON values always serialize")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Code;
    use serde_json::json;

    fn parsed(s: &str) -> Value {
        serde_json::from_str(s).unwrap()
    }

    #[test]
    fn parses_a_request() {
        let r = parse_request(
            r#"{"type":"TASKS_FETCH_REQUEST","payload":{"page":1},"meta":{"requestId":"abc-1"}}"#,
        )
        .unwrap();
        assert_eq!(r.name, "TASKS_FETCH");
        assert_eq!(r.builtin, None);
        assert_eq!(r.payload, json!({"page": 1}));
        assert_eq!(r.request_id, "abc-1");
    }

    #[test]
    fn assigns_a_uuid_when_request_id_is_absent() {
        let r = parse_request(r#"{"type":"@@patchbay/PING_REQUEST"}"#).unwrap();
        assert_eq!(r.builtin, Some(Builtin::Ping));
        assert_eq!(
            r.payload,
            json!({}),
            "an absent payload is the empty object"
        );
        assert!(uuid::Uuid::parse_str(&r.request_id).is_ok());
    }

    #[test]
    fn rejects_malformed_frames() {
        assert_eq!(parse_request("{nope").unwrap_err().code, "bad_json");
        assert_eq!(parse_request("[1,2]").unwrap_err().code, "bad_json");
        assert_eq!(parse_request("\"x\"").unwrap_err().code, "bad_json");
        assert_eq!(
            parse_request(r#"{"payload":1}"#).unwrap_err().code,
            "invalid_action"
        );
        assert_eq!(
            parse_request(r#"{"type":7}"#).unwrap_err().code,
            "invalid_action"
        );
        assert_eq!(
            parse_request(r#"{"type":"X_REQUEST","meta":{"requestId":"has space"}}"#)
                .unwrap_err()
                .code,
            "invalid_action"
        );
        assert_eq!(
            parse_request(r#"{"type":"X_REQUEST","meta":{"requestId":7}}"#)
                .unwrap_err()
                .code,
            "invalid_action"
        );
        assert_eq!(
            parse_request(r#"{"type":"X_REQUEST","meta":[]}"#)
                .unwrap_err()
                .code,
            "invalid_action"
        );
        let long = format!(r#"{{"type":"{}_REQUEST"}}"#, "A".repeat(130));
        assert_eq!(parse_request(&long).unwrap_err().code, "invalid_action");
        let e = parse_request(r#"{"type":"JUST_AN_EVENT","meta":{"requestId":"r1"}}"#).unwrap_err();
        assert_eq!(
            (e.code, e.request_id.as_deref()),
            ("invalid_action", Some("r1"))
        );
        assert_eq!(
            parse_request(r#"{"type":"_REQUEST"}"#).unwrap_err().code,
            "invalid_action"
        );
    }

    #[test]
    fn deep_nesting_is_bad_json_not_a_crash() {
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert_eq!(parse_request(&deep).unwrap_err().code, "bad_json");
    }

    #[test]
    fn request_id_rule() {
        assert!(valid_request_id("6f1c0b7e-1a2b-4c3d-9e8f-001122334455"));
        assert!(valid_request_id("a.b_c:d-e"));
        assert!(!valid_request_id(""));
        assert!(!valid_request_id(&"a".repeat(129)));
        assert!(!valid_request_id("a/b"));
        assert!(!valid_request_id("ü"));
    }

    #[test]
    fn replies_have_the_contract_shape() {
        let s = success(
            "TASKS_FETCH",
            "r1",
            &json!([1]),
            Map::from_iter([("status".to_string(), json!(200))]),
        );
        assert_eq!(
            parsed(&s),
            json!({"type":"TASKS_FETCH_SUCCESS","payload":[1],"meta":{"requestId":"r1","status":200}})
        );
        let s = success("@@patchbay/PING", "r2", &json!({}), Map::new());
        assert_eq!(
            parsed(&s),
            json!({"type":"@@patchbay/PING_SUCCESS","payload":{},"meta":{"requestId":"r2"}})
        );
        let s = success("X", "r3", &Value::Null, Map::new());
        assert_eq!(
            parsed(&s),
            json!({"type":"X_SUCCESS","payload":null,"meta":{"requestId":"r3"}})
        );
        let f = failure(
            "X",
            "r4",
            &ActionError::new(Code::UnknownAction, "no such action"),
        );
        assert_eq!(
            parsed(&f),
            json!({"type":"X_FAILURE","error":true,"payload":{"code":"unknown_action","message":"no such action"},"meta":{"requestId":"r4"}})
        );
        let e = frame_error(&FrameError::bad_json("nope"));
        assert_eq!(
            parsed(&e),
            json!({"type":"@@patchbay/ERROR","error":true,"payload":{"code":"bad_json","message":"nope"}})
        );
        let c = connected("id", None, &["user:1".into()], None);
        assert_eq!(
            parsed(&c),
            json!({"type":"@@patchbay/CONNECTED","payload":{"protocol":1,"connectionId":"id","userId":null,"rooms":["user:1"]}})
        );
    }

    #[test]
    fn server_actions_get_meta_room_and_keep_other_meta() {
        let a = json!({"type":"TASK_PROGRESS","payload":{"p":1},"meta":{"trace":"t1","room":"spoofed"}});
        let s = server_action_for_room(a.as_object().unwrap(), "task:42");
        assert_eq!(
            parsed(&s),
            json!({"type":"TASK_PROGRESS","payload":{"p":1},"meta":{"trace":"t1","room":"task:42"}})
        );
        let a = json!({"type":"PING"});
        assert_eq!(
            parsed(&server_action_for_room(a.as_object().unwrap(), "r")),
            json!({"type":"PING","meta":{"room":"r"}})
        );
    }

    #[test]
    fn server_action_check() {
        assert!(check_server_action(&json!({"type":"A"})).is_ok());
        assert!(check_server_action(&json!({"type":"A","meta":{}})).is_ok());
        assert!(check_server_action(&json!({"type":""})).is_err());
        assert!(check_server_action(&json!({"type":1})).is_err());
        assert!(check_server_action(&json!({"type":"A","meta":1})).is_err());
        assert!(check_server_action(&json!([1])).is_err());
    }
}
