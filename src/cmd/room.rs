//! `@@patchbay/SUBSCRIBE` and `@@patchbay/UNSUBSCRIBE`: who may join which room, and joining
//! or leaving it through the hub.

use std::sync::Arc;

use serde_json::{Map, Value, json};

use super::{Allowed, Applied, Outcome};
use crate::app::App;
use crate::error::{ActionError, Code};
use crate::history::{Position, Reason};
use crate::presence::{Leave, Presence, SetError};
use crate::protocol;
use crate::recovery::{Recovery, Standing, send_all};
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
    let joins: Vec<_> = entries
        .into_iter()
        .map(|entry| {
            entry.and_then(|(room, since)| {
                join_now(app, conn, user.as_deref(), room.clone(), since)
                    .map_err(|e| (Value::String(room), e))
            })
        })
        .collect();
    let app = app.clone();
    Applied::Later(Box::pin(async move {
        let mut settled = settle(&app, conn, user.as_deref(), joins).await;
        let answers: Vec<Value> = std::mem::take(&mut settled.answers)
            .into_iter()
            .map(|answer| match answer {
                Ok(payload) => Value::Object(payload),
                Err((room, err)) => {
                    json!({"room": room, "error": {"code": err.code, "message": err.message}})
                }
            })
            .collect();
        let reply = protocol::success(&name, &request_id, &json!({ "rooms": answers }), Map::new());
        settled.send(&app, conn, reply).await;
        Outcome::reply(String::new())
    }))
}

/// A room joined locally, waiting for the bus to confirm it.
pub struct PendingJoin {
    join: crate::hub::Join,
    room: String,
    /// Recover from here: only for a room that keeps history.
    since: Option<Position>,
    /// `since` given for a room that keeps no history: answered `not_kept`.
    not_kept: bool,
    /// Live actions are held back without a recovery: a task room, whose snapshot goes first.
    held: bool,
    /// The presence snapshot, taken at the join.
    presence: Option<Value>,
}

/// Joins `room` now: locally (holding live actions back when it recovers), and the user's
/// presence there; the bus confirms later ([`settle`]).
fn join_now(
    app: &Arc<App>,
    conn: ConnId,
    user: Option<&str>,
    room: String,
    since: Option<Position>,
) -> Result<PendingJoin, ActionError> {
    let keeps = app.history.as_ref().is_some_and(|h| h.keeps(&room));
    let not_kept = since.is_some() && !keeps;
    let since = since.filter(|_| keeps);
    let held = since.is_none() && has_snapshot(app, &room);
    let rooms = app.hub.rooms();
    let joined = if since.is_some() || held {
        rooms.join_recovering(conn, &room, app.config.max_rooms)
    } else {
        rooms.join(conn, &room, app.config.max_rooms)
    };
    let added = match joined {
        Ok(added) => added,
        Err(e @ JoinError::TooMany(_)) => {
            return Err(ActionError::new(Code::Forbidden, e.to_string()));
        }
        Err(JoinError::Gone) => {
            return Err(ActionError::new(
                Code::Internal,
                "the connection is closing",
            ));
        }
    };
    // In the same step as the room join, so a leave that follows finds the presence too.
    let presence = presence_join(app, &room, user, conn);
    Ok(PendingJoin {
        join: app.hub.confirm(&room, added),
        room,
        since,
        not_kept,
        held,
        presence,
    })
}

/// One room's answer: its success payload, or its entry and the error.
type Answer = Result<Map<String, Value>, (Value, ActionError)>;

/// Joins confirmed: each room's answer, and what to send after the reply.
struct Settled {
    answers: Vec<Answer>,
    recoveries: Vec<(String, Recovery)>,
    /// Task snapshots.
    snapshots: Vec<String>,
    /// Rooms whose live actions were held back for their snapshot, to let through whole
    /// (the room's position is not known: nothing can be told to be older).
    held: Vec<String>,
}

impl Settled {
    /// Queues `reply`, the replays, the snapshots, then what was held back meanwhile.
    async fn send(self, app: &App, conn: ConnId, reply: String) {
        send_all(app, conn, reply, self.recoveries, self.snapshots).await;
        for room in &self.held {
            crate::recovery::release_held(app, conn, room).await;
        }
    }
}

/// Waits for the bus to confirm each join, then reads every history room's history (at one
/// instant when embedded; an action stored in several rooms that one replay carries and
/// another room held back goes out once, by its id) and makes each room's answer; also the
/// recoveries to send and the task snapshots to send after them.
async fn settle(
    app: &Arc<App>,
    conn: ConnId,
    user: Option<&str>,
    joins: Vec<Result<PendingJoin, (Value, ActionError)>>,
) -> Settled {
    let mut confirmed = Vec::with_capacity(joins.len());
    for join in joins {
        let pending = match join {
            Ok(pending) => pending,
            Err(e) => {
                confirmed.push(Err(e));
                continue;
            }
        };
        let PendingJoin {
            join,
            room,
            since,
            not_kept,
            held,
            presence,
        } = pending;
        if let Err(e) = join.confirmed.await {
            tracing::warn!(%room, error = %e, "the bus could not confirm a subscription");
            crate::recovery::release_held(app, conn, &room).await;
            if join.added
                && let Some(left) = app.hub.leave(conn, &room)
            {
                left.await;
                if let (Some(p), Some(user)) = (&app.presence, user)
                    && p.tracks(&room)
                {
                    p.leave(&room, user, conn, Leave::Left);
                }
            }
            let err = ActionError::new(
                Code::UpstreamUnavailable,
                "the bus is unavailable; try again",
            )
            .with_status(503);
            confirmed.push(Err((Value::String(room), err)));
            continue;
        }
        let presence = match presence {
            Some(snapshot) => Some(snapshot),
            None => presence_join_shared(app, &room, user, conn).await,
        };
        confirmed.push(Ok((room, since, not_kept, held, presence)));
    }
    // Every history room's read at once: its recovery, or where it stands.
    let mut reads = match &app.history {
        Some(history) => {
            let asks: Vec<(&str, Option<&Position>)> = confirmed
                .iter()
                .filter_map(|c| c.as_ref().ok())
                .filter(|(room, ..)| history.keeps(room))
                .map(|(room, since, ..)| (room.as_str(), since.as_ref()))
                .collect();
            crate::recovery::read_all(history, &asks).await
        }
        None => Vec::new(),
    }
    .into_iter();
    let mut answers = Vec::with_capacity(confirmed.len());
    let mut recoveries = Vec::new();
    let mut rooms_joined = Vec::new();
    let mut held_rooms = Vec::new();
    for pending in confirmed {
        let (room, _, not_kept, held, presence) = match pending {
            Ok(p) => p,
            Err(e) => {
                answers.push(Err(e));
                continue;
            }
        };
        let mut payload = Map::new();
        payload.insert("room".into(), Value::String(room.clone()));
        if let Some(snapshot) = presence {
            payload.insert("presence".into(), snapshot);
        }
        let mut release = held;
        if app.history.as_ref().is_some_and(|h| h.keeps(&room)) {
            match reads.next() {
                Some(Standing::Recovery(recovery)) => {
                    recovery.fields(&mut payload);
                    recoveries.push((room.clone(), recovery));
                }
                Some(Standing::Position(Some(position))) => {
                    if held && let Some(last) = from_last_state(app, &room, &position).await {
                        payload.insert("position".into(), last.position.to_json());
                        recoveries.push((room.clone(), last));
                        release = false;
                    } else {
                        payload.insert("position".into(), position.to_json());
                    }
                }
                Some(Standing::Position(None)) | None => {}
            }
        }
        if not_kept {
            payload.insert("recovered".into(), Value::Bool(false));
            payload.insert("reason".into(), json!(Reason::NotKept.as_str()));
            payload.insert("replayed".into(), json!(0));
        }
        if release {
            held_rooms.push(room.clone());
        }
        if release || !held {
            rooms_joined.push(room);
        }
        answers.push(Ok(payload));
    }
    let mut snapshots = Vec::new();
    for room in rooms_joined {
        if let Some(s) = snapshot(app, &room, user).await {
            snapshots.push(s);
        }
    }
    Settled {
        answers,
        recoveries,
        snapshots,
        held: held_rooms,
    }
}

/// Joins `room` now; answers once the bus confirms the subscription. If the bus cannot, the
/// client is told to retry (`upstream_unavailable`), and the connection leaves the room again
/// only if this request added it. A history room's success says where the room stands; with
/// `since` it recovers what the client missed: the success, the replay and the live actions
/// that arrived meanwhile are all written here, in that order.
pub fn subscribe(
    app: &Arc<App>,
    conn: ConnId,
    user: Option<String>,
    room: String,
    since: Option<Position>,
    name: String,
    request_id: String,
) -> Applied {
    let join = match join_now(app, conn, user.as_deref(), room, since) {
        Ok(join) => join,
        Err(e) if e.code == Code::Internal => return Applied::Nothing,
        Err(e) => return Applied::Now(protocol::failure(&name, &request_id, &e)),
    };
    let app = app.clone();
    Applied::Later(Box::pin(async move {
        let mut settled = settle(&app, conn, user.as_deref(), vec![Ok(join)]).await;
        let reply = match settled.answers.pop() {
            Some(Ok(payload)) => {
                protocol::success(&name, &request_id, &Value::Object(payload), Map::new())
            }
            Some(Err((_, err))) => protocol::failure(&name, &request_id, &err),
            None => return Outcome::reply(String::new()),
        };
        settled.send(&app, conn, reply).await;
        Outcome::reply(String::new())
    }))
}

/// `@@patchbay/PRESENCE_SET {"room","state"}`: the user's state in a presence room it is in;
/// the success carries the version of the `PRESENCE_STATE` it caused.
pub async fn presence_set(
    app: &App,
    user: Option<&str>,
    room: &str,
    state: &Value,
    name: &str,
    request_id: &str,
) -> String {
    let result = match (&app.presence, user) {
        (Some(presence), Some(user)) if presence.tracks(room) => {
            presence.set(room, user, state).await
        }
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
        Err(SetError::Unavailable) => protocol::failure(
            name,
            request_id,
            &ActionError::new(
                Code::UpstreamUnavailable,
                "presence is unavailable; try again",
            )
            .with_status(503),
        ),
    }
}

/// Joins the user's presence in `room` when it tracks presence and is embedded; the snapshot
/// for the success (also for an anonymous connection, which is not listed itself).
pub(super) fn presence_join(
    app: &App,
    room: &str,
    user: Option<&str>,
    conn: ConnId,
) -> Option<Value> {
    let presence = app.presence.as_ref().filter(|p| p.tracks(room))?;
    presence.join_now(room, user, conn)
}

/// Joins the user's presence in `room` when it tracks presence in Redis, once the room's
/// subscription is active (so the connection gets every event after its snapshot); the
/// snapshot. A connection that left the room meanwhile leaves its presence again.
pub(super) async fn presence_join_shared(
    app: &App,
    room: &str,
    user: Option<&str>,
    conn: ConnId,
) -> Option<Value> {
    let presence = app.presence.as_ref().filter(|p| p.tracks(room))?;
    if !matches!(presence, Presence::Redis(_)) {
        return None;
    }
    let snapshot = presence.join(room, user, conn).await;
    if let Some(user) = user
        && !app.hub.rooms().is_member(conn, room)
    {
        presence.leave(room, user, conn, Leave::Left);
    }
    snapshot
}

/// Whether joining `room` sends a task snapshot: its live actions are then held back until
/// the snapshot is queued, so that nothing newer goes out before it.
pub fn has_snapshot(app: &App, room: &str) -> bool {
    room.starts_with("task:") && app.dispatcher.tasks().is_some()
}

/// A task room that keeps history, at `position` (where this instance stands in it): its
/// snapshot is its last stored state, replayed from there, so that it and what follows
/// are in the room's own order — an action reaching this instance late (through another
/// room) is at most that old, and is dropped instead of undoing a newer snapshot. `None`
/// when the room's last action is not a task's state (or it keeps none now): the task's
/// own snapshot then.
async fn from_last_state(app: &App, room: &str, position: &Position) -> Option<Recovery> {
    let history = app.history.as_ref()?;
    let since = Position {
        epoch: position.epoch.clone(),
        offset: position.offset.checked_sub(1)?,
    };
    let read = crate::recovery::read_all(history, &[(room, Some(&since))]).await;
    match read.into_iter().next() {
        Some(Standing::Recovery(recovery))
            if recovery.reason.is_none()
                && recovery.replay.first().is_some_and(|(offset, stored)| {
                    *offset == position.offset && stored.action["type"] == "TASK_PROGRESS"
                }) =>
        {
            Some(recovery)
        }
        _ => None,
    }
}

/// Queues `reply` for a connection that just joined task room `room` with its live actions
/// held back, then the task's state — its last stored state when the room keeps history
/// ([`from_last_state`]), else its snapshot — then what was held back.
pub async fn send_with_task_state(
    app: &App,
    conn: ConnId,
    user: Option<&str>,
    room: &str,
    reply: String,
) {
    let at = match &app.history {
        Some(history) if history.keeps(room) => {
            crate::recovery::read_all(history, &[(room, None)]).await
        }
        _ => Vec::new(),
    };
    if let Some(Standing::Position(Some(position))) = at.into_iter().next()
        && let Some(last) = from_last_state(app, room, &position).await
    {
        return send_all(app, conn, reply, vec![(room.to_string(), last)], Vec::new()).await;
    }
    let snapshot = snapshot(app, room, user).await;
    send_all(app, conn, reply, Vec::new(), snapshot.into_iter().collect()).await;
    crate::recovery::release_held(app, conn, room).await;
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
