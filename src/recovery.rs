//! Recovering a room (contract section 8): what a SUBSCRIBE with `since`, or a handshake with
//! `?since=` for the identity room, gets. The connection joins the room with its live actions
//! held back ([`crate::rooms::Rooms::join_recovering`]); the room's history after `since` is
//! read; then the answer, the replay (paced into the send queue) and what was held back,
//! without what the replay already carried, are queued in that order.

use serde_json::{Map, Value, json};

use crate::app::App;
use crate::history::{MemoryHistory, Position, Reason, Replay};
use crate::outbox::Text;
use crate::protocol;
use crate::rooms::ConnId;

/// How long a paced replay waits for room in a full send queue.
const PACE: std::time::Duration = std::time::Duration::from_millis(2);

/// The outcome of reading a room's history after a client's position.
pub struct Recovery {
    /// Where the room stands (after the replay).
    pub position: Position,
    /// Why nothing is replayed; `None`: recovered.
    pub reason: Option<Reason>,
    /// The actions to replay, in offset order.
    pub replay: Replay,
}

impl Recovery {
    /// Reads `room`'s history after `since`.
    pub fn read(history: &MemoryHistory, room: &str, since: &Position) -> Recovery {
        match history.lock().read(room, since) {
            Ok((replay, position)) => Recovery {
                position,
                reason: None,
                replay,
            },
            Err((reason, position)) => Recovery {
                position,
                reason: Some(reason),
                replay: Vec::new(),
            },
        }
    }

    /// The answer's fields: `position`, `recovered`, `reason` when not, `replayed`.
    pub fn fields(&self, payload: &mut Map<String, Value>) {
        payload.insert("position".into(), self.position.to_json());
        payload.insert("recovered".into(), Value::Bool(self.reason.is_none()));
        if let Some(reason) = self.reason {
            payload.insert("reason".into(), json!(reason.as_str()));
        }
        payload.insert("replayed".into(), json!(self.replay.len()));
    }

    /// Queues `answer`, then the replay (each action with `meta.replayed`), waiting for room
    /// in the send queue rather than overflowing it, then what was held back for the room
    /// while this ran; and lets the room's live actions through again.
    pub async fn send(self, app: &App, conn: ConnId, room: &str, answer: String) {
        send_all(app, conn, answer, vec![(room.to_string(), self)]).await;
    }
}

/// [`Recovery::send`] for several rooms answered at once (a batch SUBSCRIBE): the answer,
/// each room's replay in turn (an action stored in several of them only the first time),
/// then what was held back for each.
pub async fn send_all(
    app: &App,
    conn: ConnId,
    answer: String,
    recoveries: Vec<(String, Recovery)>,
) {
    let rooms = app.hub.rooms();
    if let Some(outbox) = rooms.outbox(conn) {
        // An action stored in several of the rooms goes out once, through the first, with its
        // offsets in the others.
        let mut elsewhere: std::collections::HashMap<&str, Map<String, Value>> =
            std::collections::HashMap::new();
        let mut first_room: std::collections::HashMap<&str, &str> =
            std::collections::HashMap::new();
        for (room, recovery) in &recoveries {
            for (offset, stored) in &recovery.replay {
                if first_room.entry(stored.id.as_str()).or_insert(room) != room {
                    elsewhere
                        .entry(stored.id.as_str())
                        .or_default()
                        .insert(room.clone(), json!(offset));
                }
            }
        }
        let mut texts = vec![Text::from(answer)];
        for (room, recovery) in &recoveries {
            for (offset, stored) in &recovery.replay {
                if first_room.get(stored.id.as_str()) != Some(&room.as_str()) {
                    continue;
                }
                let stamp = protocol::Stamp {
                    id: Some(&stored.id),
                    offset: Some(*offset),
                    replayed: true,
                    offsets: elsewhere.get(stored.id.as_str()),
                };
                texts.push(protocol::server_action(&stored.action, room, &stamp).into());
            }
        }
        drop((elsewhere, first_room));
        push_paced(&outbox, texts).await;
    }
    // Held-back actions up to where each replay stands were just sent; after a refused
    // recovery the client refetches and goes on from `position`.
    for (room, recovery) in &recoveries {
        rooms.end_recovery(conn, room, recovery.position.offset);
    }
}

/// Queues `texts` in order, waiting for room in the send queue rather than overflowing it
/// (a replay never closes a connection as slow). A frame larger than the whole queue is never
/// for this connection, as when live, and is skipped.
async fn push_paced(outbox: &crate::outbox::Outbox, texts: Vec<Text>) {
    for text in texts {
        if !outbox.fits(text.len()) {
            continue;
        }
        let mut text = text;
        loop {
            match outbox.try_push(text) {
                Ok(()) => break,
                Err(Some(back)) => {
                    text = back;
                    tokio::time::sleep(PACE).await;
                }
                // The connection is closing.
                Err(None) => return,
            }
        }
    }
}
