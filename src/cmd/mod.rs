//! What a client request asks for, as a closed set of commands (the way mini-redis has one).
//!
//! [`Command::parse`] is pure: it turns a well-formed request into a command or the failure to
//! answer, deciding every refusal that depends on the request alone (unknown action, a bad
//! room name, a room the connection may not join) from the request, the registry and what the
//! connection is allowed. Refusals that depend on the moment are decided elsewhere: the rate
//! and the in-flight cap by the session, a full room list when the join is applied. Applying a
//! command ([`Command::apply`]) does the IO: what must happen in order with the connection's
//! next frames (joining or leaving a room locally) happens at once, the rest in the returned
//! future, which yields an [`Outcome`] for the session to write.
//!
//! A new built-in is a variant here and a file beside this one; a new handler kind needs
//! nothing here (see [`crate::dispatch`]).

mod action;
mod room;

use std::collections::HashSet;
use std::sync::Arc;

use futures_util::future::BoxFuture;
use serde_json::{Map, Value, json};

use crate::app::App;
use crate::auth::Identity;
use crate::error::{ActionError, Code};
use crate::protocol::{self, Builtin, Request};
use crate::registry::ActionSpec;
use crate::rooms::ConnId;
use crate::session::Peer;

pub use room::room_payload;

/// One thing a client asked for.
#[derive(Debug)]
pub enum Command {
    /// A manifest action: run its handler with the request's payload, then join its
    /// `subscribe` room.
    Action {
        /// The action.
        spec: Arc<ActionSpec>,
    },
    /// `@@patchbay/SUBSCRIBE`: join a room this connection may join.
    Subscribe {
        /// The room.
        room: String,
        /// Recover what came after this position (section 8).
        since: Option<crate::history::Position>,
    },
    /// `@@patchbay/SUBSCRIBE` of `rooms`, the batch a client rejoins with: each room admitted
    /// or refused on its own, in request order.
    SubscribeMany {
        /// Each room with its position to recover from, or why it may not be joined.
        rooms: Vec<room::BatchEntry>,
    },
    /// `@@patchbay/PRESENCE_SET`: the user's presence state in a room.
    PresenceSet {
        /// The room.
        room: String,
        /// A JSON object of at most 1 KiB.
        state: Value,
    },
    /// `@@patchbay/UNSUBSCRIBE`: leave a room.
    Unsubscribe {
        /// The room.
        room: String,
    },
    /// `@@patchbay/PING`: application-level keepalive.
    Ping,
}

/// What a connection is allowed, for [`Command::parse`]: who it is, and the rooms granted on
/// it so far.
pub struct Allowed<'a> {
    /// The authenticated identity.
    pub identity: &'a Identity,
    /// Rooms granted on this connection by successful actions' `subscribe`.
    pub grants: &'a HashSet<String>,
}

/// A request and its command, ready to apply.
#[derive(Debug)]
pub struct Parsed {
    /// The request: its name and id go into every reply; its payload is an action's input.
    pub request: Request,
    /// What to do.
    pub command: Command,
}

/// What applying a command produced, for the session.
#[derive(Debug)]
pub struct Outcome {
    /// The reply to write; empty when the command wrote it itself (a recovery, which must
    /// order its reply, replay and the live actions that arrived meanwhile).
    pub reply: String,
    /// A frame to write right after the reply: a task's state when its room was joined.
    pub then: Option<String>,
    /// A room granted on this connection (an action's `subscribe`): it may be joined again
    /// without a token.
    pub granted: Option<String>,
    /// Whether this was a manifest action, which frees its place under
    /// `PATCHBAY_MAX_INFLIGHT` now that its reply is written (its outcome is already counted).
    pub action: bool,
}

impl Outcome {
    fn reply(reply: String) -> Outcome {
        Outcome {
            reply,
            then: None,
            granted: None,
            action: false,
        }
    }
}

/// Applying a command: an answer now, or later.
pub enum Applied {
    /// Answered at once.
    Now(String),
    /// Answered when the future finishes.
    Later(BoxFuture<'static, Outcome>),
    /// Not answered: the connection is closing.
    Nothing,
}

impl Command {
    /// Turns a request into a command, or the failure to answer. Pure: no IO, no clock
    /// beyond a room token's expiry.
    pub fn parse(req: &Request, app: &App, allowed: &Allowed<'_>) -> Result<Command, ActionError> {
        match req.builtin {
            Some(Builtin::Ping) => Ok(Command::Ping),
            Some(Builtin::Subscribe) if req.payload.get("rooms").is_some() => {
                room::parse_subscribe_many(&req.payload, app, allowed)
                    .map(|rooms| Command::SubscribeMany { rooms })
            }
            Some(Builtin::Subscribe) => room::parse_subscribe(&req.payload, app, allowed)
                .map(|(room, since)| Command::Subscribe { room, since }),
            Some(Builtin::PresenceSet) => {
                let (room, _) = room_payload(&req.payload)?;
                let state = req.payload.get("state").cloned().unwrap_or(Value::Null);
                Ok(Command::PresenceSet { room, state })
            }
            Some(Builtin::Unsubscribe) => {
                room_payload(&req.payload).map(|(room, _)| Command::Unsubscribe { room })
            }
            None => match app.registry.get(&req.name) {
                Some(spec) => Ok(Command::Action { spec: spec.clone() }),
                None => Err(ActionError::new(
                    Code::UnknownAction,
                    format!("no action named {}", req.name),
                )),
            },
        }
    }

    /// Whether this is a manifest action (which counts towards `PATCHBAY_MAX_INFLIGHT`).
    pub fn is_action(&self) -> bool {
        matches!(self, Command::Action { .. })
    }
}

impl Parsed {
    /// Applies the command for connection `conn` of `peer`.
    pub fn apply(self, app: &Arc<App>, conn: ConnId, peer: &Peer) -> Applied {
        let Parsed {
            request:
                Request {
                    name,
                    request_id,
                    payload,
                    ..
                },
            command,
        } = self;
        match command {
            Command::Ping => Applied::Now(protocol::success(
                &name,
                &request_id,
                &json!({}),
                Map::new(),
            )),
            Command::Subscribe { room, since } => {
                let user = peer.identity.user_id.clone();
                room::subscribe(app, conn, user, room, since, name, request_id)
            }
            Command::SubscribeMany { rooms } => {
                let user = peer.identity.user_id.clone();
                room::subscribe_many(app, conn, user, rooms, name, request_id)
            }
            Command::PresenceSet { room, state } => {
                let user = peer.identity.user_id.clone();
                let app = app.clone();
                Applied::Later(Box::pin(async move {
                    Outcome::reply(
                        room::presence_set(
                            &app,
                            user.as_deref(),
                            &room,
                            &state,
                            &name,
                            &request_id,
                        )
                        .await,
                    )
                }))
            }
            Command::Unsubscribe { room } => {
                let user = peer.identity.user_id.clone();
                room::unsubscribe(app, conn, user, room, name, request_id)
            }
            Command::Action { spec } => action::run(app, conn, peer, spec, payload, request_id),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::registry::Registry;
    use crate::rooms::RoomPattern;

    fn app() -> Arc<App> {
        let registry = Registry::from_sources([(
            std::path::Path::new("a.json"),
            r#"{"ECHO": {"http": {"method": "GET", "path": "/echo"}}}"#,
        )])
        .unwrap();
        let config = Config {
            api_url: Some("http://127.0.0.1:9".into()),
            public_rooms: vec![RoomPattern::parse("lobby").unwrap()],
            ..Config::default()
        };
        App::new(config, registry).unwrap()
    }

    fn request(text: &str) -> Request {
        protocol::parse_request(text).unwrap()
    }

    fn parse(
        app: &App,
        identity: &Identity,
        grants: &HashSet<String>,
        text: &str,
    ) -> Result<Command, ActionError> {
        let allowed = Allowed { identity, grants };
        Command::parse(&request(text), app, &allowed)
    }

    fn code(r: Result<Command, ActionError>) -> Code {
        r.map(|c| panic!("expected a refusal, got {c:?}"))
            .unwrap_err()
            .code
    }

    #[test]
    fn every_refusal_is_decided_by_parse() {
        let app = app();
        let anonymous = Identity::default();
        let user = Identity {
            user_id: Some("42".into()),
            grants: vec![RoomPattern::parse("org:7").unwrap()],
            expires_at: None,
        };
        let none = HashSet::new();
        let p = |id: &Identity, grants: &HashSet<String>, text: &str| parse(&app, id, grants, text);

        assert_eq!(
            code(p(&anonymous, &none, r#"{"type":"NOPE_REQUEST"}"#)),
            Code::UnknownAction
        );
        for bad in [
            r#"{"type":"@@patchbay/SUBSCRIBE_REQUEST"}"#,
            r#"{"type":"@@patchbay/SUBSCRIBE_REQUEST","payload":{"room":""}}"#,
            r#"{"type":"@@patchbay/SUBSCRIBE_REQUEST","payload":{"room":"a b"}}"#,
            r#"{"type":"@@patchbay/SUBSCRIBE_REQUEST","payload":{"room":7}}"#,
            r#"{"type":"@@patchbay/SUBSCRIBE_REQUEST","payload":{"room":"lobby","token":5}}"#,
            r#"{"type":"@@patchbay/UNSUBSCRIBE_REQUEST","payload":{}}"#,
        ] {
            assert_eq!(
                code(p(&anonymous, &none, bad)),
                Code::InvalidPayload,
                "{bad}"
            );
        }
        for (who, grants, room) in [
            (&anonymous, &none, "user:42"),
            (&user, &none, "user:43"),
            (&user, &none, "org:8"),
            (&anonymous, &none, "task:9"),
        ] {
            let text = format!(
                r#"{{"type":"@@patchbay/SUBSCRIBE_REQUEST","payload":{{"room":"{room}"}}}}"#
            );
            assert_eq!(code(p(who, grants, &text)), Code::Forbidden, "{room}");
        }
        let forged = format!(
            r#"{{"type":"@@patchbay/SUBSCRIBE_REQUEST","payload":{{"room":"task:1","token":"{}"}}}}"#,
            app.room_tokens.issue("task:2", None)
        );
        assert_eq!(
            code(p(&anonymous, &none, &forged)),
            Code::Forbidden,
            "a token for another room"
        );
    }

    #[test]
    fn allowed_requests_become_commands() {
        let app = app();
        let user = Identity {
            user_id: Some("42".into()),
            grants: vec![RoomPattern::parse("org:7").unwrap()],
            expires_at: None,
        };
        let granted: HashSet<String> = ["task:9".to_string()].into();
        let token = app.room_tokens.issue("task:1", Some("42"));
        for room_payload in [
            r#"{"room":"user:42"}"#.to_string(),
            r#"{"room":"org:7"}"#.to_string(),
            r#"{"room":"lobby"}"#.to_string(),
            r#"{"room":"task:9"}"#.to_string(),
            format!(r#"{{"room":"task:1","token":"{token}"}}"#),
        ] {
            let text =
                format!(r#"{{"type":"@@patchbay/SUBSCRIBE_REQUEST","payload":{room_payload}}}"#);
            assert!(
                matches!(
                    parse(&app, &user, &granted, &text),
                    Ok(Command::Subscribe { .. })
                ),
                "{room_payload}"
            );
        }
        assert!(matches!(
            parse(
                &app,
                &user,
                &granted,
                r#"{"type":"@@patchbay/PING_REQUEST"}"#
            ),
            Ok(Command::Ping)
        ));
        assert!(matches!(
            parse(&app, &user, &granted, r#"{"type":"ECHO_REQUEST","payload":{"a":1}}"#),
            Ok(Command::Action { spec }) if spec.name == "ECHO"
        ));
        assert!(matches!(
            parse(
                &app,
                &user,
                &granted,
                r#"{"type":"@@patchbay/UNSUBSCRIBE_REQUEST","payload":{"room":"anything"}}"#
            ),
            Ok(Command::Unsubscribe { .. })
        ));
    }
}
