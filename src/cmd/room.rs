//! `@@patchbay/SUBSCRIBE` and `@@patchbay/UNSUBSCRIBE`: who may join which room, and joining
//! or leaving it through the hub.

use std::sync::Arc;

use serde_json::{Map, Value, json};

use super::{Allowed, Applied, Outcome};
use crate::app::App;
use crate::error::{ActionError, Code};
use crate::history::{MemoryHistory, Position, Reason};
use crate::presence::{Leave, SetError};
use crate::protocol;
use crate::recovery::Recovery;
use crate::rooms::{ConnId, JoinError, valid_room};

/// `{"room": "...", "token"?: "..."}` of SUBSCRIBE and UNSUBSCRIBE.
pub fn room_payload(payload: &Value) -> Result<(String, Option<String>), ActionError> {
    let invalid = |m: &str| ActionError::new(Code::InvalidPayload, m);
    let room = payload
        .get("room")
        .and_then(Value::as_str)
        .ok_or_else(|| invalid("payload.room must be a string"))?;
    if !valid_room(room) {
        return Err(invalid(
            "payload.room must be 1-128 bytes of printable ASCII without whitespace",
        ));
    }
    let token = match payload.get("token") {
        None | Some(Value::Null) => None,
        Some(Value::String(t)) => Some(t.clone()),
        Some(_) => return Err(invalid("payload.token must be a string")),
    };
    Ok((room.to_string(), token))
}

/// The room of a SUBSCRIBE, if this connection may join it: its own user room, a room its
/// credentials grant, a public room, a room granted on this connection, or a room whose
/// token is valid for this user.
pub fn parse_subscribe(
    payload: &Value,
    app: &App,
    allowed: &Allowed<'_>,
) -> Result<(String, Option<Position>), ActionError> {
    let (room, token) = room_payload(payload)?;
    let since = match payload.get("since") {
        None | Some(Value::Null) => None,
        Some(v) => {
            Some(Position::from_json(v).map_err(|e| ActionError::new(Code::InvalidPayload, e))?)
        }
    };
    let user = allowed.identity.user_id.as_deref();
    let may = allowed.identity.may_join(&room, &app.config.public_rooms)
        || allowed.grants.contains(&room)
        || token
            .as_deref()
            .is_some_and(|t| app.room_tokens.verify(t, &room, user));
    if !may {
        return Err(ActionError::new(
            Code::Forbidden,
            format!("this connection may not join {room}"),
        ));
    }
    Ok((room, since))
}

/// One room of a batch SUBSCRIBE: the room and its position to recover from, or its entry
/// (`room` as sent) and why it may not be joined.
pub type BatchEntry = Result<(String, Option<Position>), (Value, ActionError)>;

/// The rooms of a batch SUBSCRIBE, `{"rooms":[{"room","token"?,"since"?}, …]}`: each one
/// checked on its own (a refused room keeps its entry, with the error); at most
/// `PATCHBAY_MAX_ROOMS` entries.
pub fn parse_subscribe_many(
    payload: &Value,
    app: &App,
    allowed: &Allowed<'_>,
) -> Result<Vec<BatchEntry>, ActionError> {
    let invalid = |m: String| ActionError::new(Code::InvalidPayload, m);
    let entries = payload
        .get("rooms")
        .and_then(Value::as_array)
        .ok_or_else(|| {
            invalid("payload.rooms must be an array of {room, token?, since?}".into())
        })?;
    if entries.len() > app.config.max_rooms {
        return Err(invalid(format!(
            "payload.rooms may hold at most {} rooms",
            app.config.max_rooms
        )));
    }
    Ok(entries
        .iter()
        .map(|entry| {
            parse_subscribe(entry, app, allowed)
                .map_err(|e| (entry.get("room").cloned().unwrap_or(Value::Null), e))
        })
        .collect())
}

/// A batch SUBSCRIBE: joins every admitted room now, then answers
/// `{"rooms":[<each room's success payload, or {"room","error"}>]}` once the bus confirms
/// them, followed by the replays of the rooms that recover; an action stored in several of
/// them is replayed once. Task rooms' snapshots follow.
pub fn subscribe_many(
    app: &Arc<App>,
    conn: ConnId,
    user: Option<String>,
    entries: Vec<BatchEntry>,
    name: String,
    request_id: String,
) -> Applied {
    let rooms = app.hub.rooms();
    let mut joins = Vec::with_capacity(entries.len());
    for entry in entries {
        let joined = entry.and_then(|(room, since)| {
            let history = app.history.clone().filter(|h| h.keeps(&room));
            let since = since.filter(|_| history.is_some());
            let joined = match since {
                Some(_) => rooms.join_recovering(conn, &room, app.config.max_rooms),
                None => rooms.join(conn, &room, app.config.max_rooms),
            };
            match joined {
                Ok(added) => Ok((app.hub.confirm(&room, added), room, since, history)),
                Err(JoinError::Gone) => {
                    Err((Value::Null, ActionError::new(Code::Internal, "closing")))
                }
                Err(e) => Err((
                    Value::String(room),
                    ActionError::new(Code::Forbidden, e.to_string()),
                )),
            }
        });
        joins.push(joined);
    }
    let app = app.clone();
    Applied::Later(Box::pin(async move {
        let mut answers = Vec::with_capacity(joins.len());
        let mut recoveries = Vec::new();
        let mut snapshots = Vec::new();
        for joined in joins {
            let (join, room, since, history) = match joined {
                Ok(j) => j,
                Err((room, err)) => {
                    answers.push(
                        json!({"room": room, "error": {"code": err.code, "message": err.message}}),
                    );
                    continue;
                }
            };
            if let Err(e) = join.confirmed.await {
                tracing::warn!(%room, error = %e, "the bus could not confirm a subscription");
                app.hub.rooms().end_recovery(conn, &room, u64::MAX);
                if join.added
                    && let Some(left) = app.hub.leave(conn, &room)
                {
                    left.await;
                }
                answers.push(json!({"room": room, "error": {"code": Code::UpstreamUnavailable, "message": "the bus is unavailable; try again"}}));
                continue;
            }
            let mut payload = Map::new();
            payload.insert("room".into(), Value::String(room.clone()));
            if let Some(snapshot) = presence_join(&app, &room, user.as_deref(), conn) {
                payload.insert("presence".into(), snapshot);
            }
            match (history, since) {
                (Some(history), Some(since)) => {
                    let recovery = Recovery::read(&history, &room, &since);
                    recovery.fields(&mut payload);
                    recoveries.push((room.clone(), recovery));
                }
                (Some(history), None) => {
                    let position = history.lock().position(&room);
                    payload.insert("position".into(), position.to_json());
                }
                (None, _) => {}
            }
            answers.push(Value::Object(payload));
            if let Some(snapshot) = snapshot(&app, &room, user.as_deref()).await {
                snapshots.push(snapshot);
            }
        }
        let reply = protocol::success(&name, &request_id, &json!({ "rooms": answers }), Map::new());
        crate::recovery::send_all(&app, conn, reply, recoveries).await;
        if let Some(outbox) = app.hub.rooms().outbox(conn) {
            for snapshot in snapshots {
                outbox.push(snapshot.into());
            }
        }
        Outcome::reply(String::new())
    }))
}

/// Joins `room` now; answers once the bus confirms the subscription. If the bus cannot, the
/// client is told to retry (`upstream_unavailable`), and the connection leaves the room again
/// only if this request added it. A history room's success says where the room stands; with
/// `since` it recovers what the client missed ([`recover`]).
pub fn subscribe(
    app: &Arc<App>,
    conn: ConnId,
    user: Option<String>,
    room: String,
    since: Option<Position>,
    name: String,
    request_id: String,
) -> Applied {
    let history = app.history.clone().filter(|h| h.keeps(&room));
    let recovering = since.is_some() && history.is_some();
    let rooms = app.hub.rooms();
    let joined = match recovering {
        true => rooms.join_recovering(conn, &room, app.config.max_rooms),
        false => rooms.join(conn, &room, app.config.max_rooms),
    };
    let join = match joined.map(|added| app.hub.confirm(&room, added)) {
        Ok(join) => join,
        Err(e @ JoinError::TooMany(_)) => {
            let err = ActionError::new(Code::Forbidden, e.to_string());
            return Applied::Now(protocol::failure(&name, &request_id, &err));
        }
        // The connection is closing: nothing to answer.
        Err(JoinError::Gone) => return Applied::Nothing,
    };
    let app = app.clone();
    Applied::Later(Box::pin(async move {
        if let Err(e) = join.confirmed.await {
            tracing::warn!(%room, error = %e, "the bus could not confirm a subscription");
            app.hub.rooms().end_recovery(conn, &room, u64::MAX);
            if join.added
                && let Some(left) = app.hub.leave(conn, &room)
            {
                left.await;
            }
            let err = ActionError::new(
                Code::UpstreamUnavailable,
                "the bus is unavailable; try again",
            )
            .with_status(503);
            return Outcome::reply(protocol::failure(&name, &request_id, &err));
        }
        let mut payload = Map::new();
        payload.insert("room".into(), Value::String(room.clone()));
        if let Some(snapshot) = presence_join(&app, &room, user.as_deref(), conn) {
            payload.insert("presence".into(), snapshot);
        }
        let mut outcome = match (history, since) {
            (Some(history), Some(since)) => {
                let at = (room.as_str(), &since);
                recover(&app, &history, conn, at, payload, (&name, &request_id)).await
            }
            (Some(history), None) => {
                let position = history.lock().position(&room);
                payload.insert("position".into(), position.to_json());
                Outcome::reply(protocol::success(
                    &name,
                    &request_id,
                    &Value::Object(payload),
                    Map::new(),
                ))
            }
            (None, since) => {
                if since.is_some() {
                    payload.insert("recovered".into(), Value::Bool(false));
                    payload.insert("reason".into(), json!(Reason::NotKept.as_str()));
                    payload.insert("replayed".into(), json!(0));
                }
                Outcome::reply(protocol::success(
                    &name,
                    &request_id,
                    &Value::Object(payload),
                    Map::new(),
                ))
            }
        };
        outcome.then = snapshot(&app, &room, user.as_deref()).await;
        outcome
    }))
}

/// A recovery (section 8): the success with the recovery's fields, then the replay, then the
/// live actions that waited meanwhile; all written here, in that order.
async fn recover(
    app: &App,
    history: &MemoryHistory,
    conn: ConnId,
    (room, since): (&str, &Position),
    mut payload: Map<String, Value>,
    (name, request_id): (&str, &str),
) -> Outcome {
    let recovery = Recovery::read(history, room, since);
    recovery.fields(&mut payload);
    let reply = protocol::success(name, request_id, &Value::Object(payload), Map::new());
    recovery.send(app, conn, room, reply).await;
    Outcome::reply(String::new())
}

/// `@@patchbay/PRESENCE_SET {"room","state"}`: the user's state in a presence room it is in;
/// the success carries the version of the `PRESENCE_STATE` it caused.
pub fn presence_set(
    app: &App,
    user: Option<&str>,
    room: &str,
    state: &Value,
    name: &str,
    request_id: &str,
) -> String {
    let result = match (&app.presence, user) {
        (Some(presence), Some(user)) if presence.tracks(room) => presence.set(room, user, state),
        _ => Err(SetError::NotIn),
    };
    match result {
        Ok(version) => protocol::success(
            name,
            request_id,
            &json!({"room": room, "version": version}),
            Map::new(),
        ),
        Err(SetError::NotIn) => protocol::failure(
            name,
            request_id,
            &ActionError::new(
                Code::Forbidden,
                format!("this user is not present in {room}"),
            ),
        ),
        Err(SetError::Invalid(why)) => protocol::failure(
            name,
            request_id,
            &ActionError::new(Code::InvalidPayload, why),
        ),
    }
}

/// Joins the user's presence in `room` when it tracks presence; the snapshot for the success
/// (also for an anonymous connection, which is not listed itself).
fn presence_join(app: &App, room: &str, user: Option<&str>, conn: ConnId) -> Option<Value> {
    let presence = app.presence.as_ref().filter(|p| p.tracks(room))?;
    Some(match user {
        Some(user) => presence.join(room, user, conn),
        None => presence.snapshot(room),
    })
}

/// The state of the task whose room `room` is, as the `TASK_PROGRESS` a connection gets
/// right after joining it, so a job that ended before the join still reaches the client.
/// `None` for other rooms, and for tasks of another owner or of an external task manager.
pub async fn snapshot(app: &App, room: &str, user: Option<&str>) -> Option<String> {
    let id = room.strip_prefix("task:")?;
    let queue = app.dispatcher.tasks()?;
    match queue.get(None, id, user).await {
        Ok(task) => Some(protocol::server_action_for_room(
            &crate::task::progress_action(&task),
            room,
        )),
        Err(crate::task::QueueError::NotFound) => None,
        Err(e) => {
            tracing::debug!(%room, error = %e, "no snapshot for the task room");
            None
        }
    }
}

/// Leaves `room` now; answers once the bus is unsubscribed (when this was its last member).
pub fn unsubscribe(
    app: &Arc<App>,
    conn: ConnId,
    user: Option<String>,
    room: String,
    name: String,
    request_id: String,
) -> Applied {
    if let (Some(presence), Some(user)) = (&app.presence, &user)
        && presence.tracks(&room)
    {
        presence.leave(&room, user, conn, Leave::Left);
    }
    let reply = protocol::success(&name, &request_id, &json!({ "room": room }), Map::new());
    match app.hub.leave(conn, &room) {
        Some(left) => Applied::Later(Box::pin(async move {
            left.await;
            Outcome::reply(reply)
        })),
        None => Applied::Now(reply),
    }
}
