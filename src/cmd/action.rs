//! A manifest action: its handler runs (see [`crate::dispatch`]), then, on success, the
//! connection joins the room its `subscribe` template names and is granted it.

use std::sync::Arc;
use std::time::Instant;

use serde_json::{Map, Value};
use tracing::Instrument;

use super::{Applied, Outcome};
use crate::app::App;
use crate::dispatch::{CallContext, Success};
use crate::protocol;
use crate::registry::ActionSpec;
use crate::rooms::{ConnId, valid_room};
use crate::session::Peer;
use crate::template::room_part;

/// Runs the action; the future answers `X_SUCCESS` or `X_FAILURE`.
pub fn run(
    app: &Arc<App>,
    conn: ConnId,
    peer: &Peer,
    spec: Arc<ActionSpec>,
    payload: Value,
    request_id: String,
) -> Applied {
    let app = app.clone();
    let user = peer.identity.user_id.clone();
    let ctx = CallContext {
        user: user.clone(),
        connection_id: peer.connection_id.clone(),
        request_id,
        forwarded: peer.forwarded.clone(),
        client: peer.client,
    };
    let span = tracing::info_span!("request", action = %spec.name, request_id = %ctx.request_id);
    Applied::Later(Box::pin(
        async move {
            let started = Instant::now();
            let result = app.dispatcher.run(&spec, &payload, &ctx).await;
            app.metrics.action_duration(&spec.name, started.elapsed());
            let outcome = match &result {
                Ok(_) => "success",
                Err(e) => e.code.as_str(),
            };
            app.metrics.action(&spec.name, outcome);
            let elapsed_ms = started.elapsed().as_millis() as u64;
            match result {
                Err(e) => {
                    tracing::debug!(elapsed_ms, code = ?e.code, "failed");
                    Outcome {
                        reply: protocol::failure(&spec.name, &ctx.request_id, &e),
                        then: None,
                        granted: None,
                        action: true,
                    }
                }
                Ok(success) => {
                    tracing::debug!(elapsed_ms, "ok");
                    succeed(&app, conn, user.as_deref(), &spec, ctx.request_id, success).await
                }
            }
        }
        .instrument(span),
    ))
}

/// The success, after joining the manifest's `subscribe` room if it has one. The API already
/// did the work, so a room that cannot be filled or joined is logged and the success sent
/// without `meta.subscribed`; a bus that cannot confirm keeps the room (it is subscribed again
/// when the bus reconnects). A task room's live actions are held back from the join until the
/// success and the task's snapshot are queued: a fast worker's first progress never goes out
/// before the success that names the task.
async fn succeed(
    app: &App,
    conn: ConnId,
    user: Option<&str>,
    spec: &ActionSpec,
    request_id: String,
    mut success: Success,
) -> Outcome {
    let Some(room) = subscribe_room(spec, &success) else {
        return reply(spec, &request_id, success, None);
    };
    let held = super::room::has_snapshot(app, &room);
    let rooms = app.hub.rooms();
    let joined = if held {
        rooms.join_recovering(conn, &room, app.config.max_rooms)
    } else {
        rooms.join(conn, &room, app.config.max_rooms)
    };
    let added = match joined {
        Ok(added) => added,
        Err(e) => {
            tracing::warn!(%room, error = %e, "cannot join the `subscribe` room");
            return reply(spec, &request_id, success, None);
        }
    };
    let token = app.room_tokens.issue(&room, user);
    success
        .meta
        .insert("subscribed".into(), Value::String(room.clone()));
    success
        .meta
        .insert("roomToken".into(), Value::String(token));
    // Present there too, like a SUBSCRIBE (its snapshot comes with the next SUBSCRIBE of the
    // room, such as a rejoin: an action's success has no place for it).
    super::room::presence_join(app, &room, user, conn);
    if let Err(e) = app.hub.confirm(&room, added).confirmed.await {
        tracing::warn!(%room, error = %e, "the bus could not confirm a subscription");
    }
    super::room::presence_join_shared(app, &room, user, conn).await;
    if !held {
        return reply(spec, &request_id, success, Some(room));
    }
    let success = protocol::success(&spec.name, &request_id, &success.payload, success.meta);
    super::room::send_with_task_state(app, conn, user, &room, success).await;
    Outcome {
        reply: String::new(),
        then: None,
        granted: Some(room),
        action: true,
    }
}

/// The success as the session writes it.
fn reply(
    spec: &ActionSpec,
    request_id: &str,
    success: Success,
    granted: Option<String>,
) -> Outcome {
    Outcome {
        reply: protocol::success(&spec.name, request_id, &success.payload, success.meta),
        then: None,
        granted,
        action: true,
    }
}

/// The room the manifest's `subscribe` template names for this success, if any.
fn subscribe_room(spec: &ActionSpec, success: &Success) -> Option<String> {
    let template = spec.subscribe.as_ref()?;
    // Parsed only here, for the template's fields.
    let filled = match serde_json::from_str::<Map<String, Value>>(success.payload.get()) {
        Ok(fields) => template.fill(&fields, room_part).map_err(|e| e.to_string()),
        Err(_) => Err("the success payload is not an object".to_string()),
    };
    match filled {
        Ok(room) if valid_room(&room) => Some(room),
        Ok(room) => {
            tracing::warn!(action = %spec.name, room = %crate::error::clip(&room), "`subscribe` made an invalid room name: not subscribing");
            None
        }
        Err(e) => {
            tracing::warn!(action = %spec.name, error = %e, "cannot fill the `subscribe` room: not subscribing");
            None
        }
    }
}
