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
        let rooms = app.hub.rooms();
        if let Some(outbox) = rooms.outbox(conn) {
            let replay = self.replay.iter().map(|(offset, stored)| {
                let stamp = protocol::Stamp {
                    id: Some(&stored.id),
                    offset: Some(*offset),
                    replayed: true,
                    offsets: None,
                };
                Text::from(protocol::server_action(&stored.action, room, &stamp))
            });
            let mut texts = std::iter::once(Text::from(answer)).chain(replay);
            let mut next = texts.next();
            while let Some(text) = next.take() {
                if !outbox.fits(text.len()) {
                    // Larger than the whole queue: never for this connection, as when live.
                    next = texts.next();
                    continue;
                }
                match outbox.try_push(text) {
                    Ok(()) => next = texts.next(),
                    Err(Some(text)) => {
                        next = Some(text);
                        tokio::time::sleep(PACE).await;
                    }
                    // The connection is closing.
                    Err(None) => break,
                }
            }
        }
        // Held-back actions up to where the replay stands were just sent; after a refused
        // recovery the client refetches and goes on from `position`.
        rooms.end_recovery(conn, room, self.position.offset);
    }
}
