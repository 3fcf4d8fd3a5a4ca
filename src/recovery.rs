//! Recovering a room (contract section 8): what a SUBSCRIBE with `since`, or a handshake with
//! `?since=` for the identity room, gets. The connection joins the room with its live actions
//! held back ([`crate::rooms::Rooms::join_recovering`]); the room's history after `since` is
//! read; then the answer, the replay (paced into the send queue) and what was held back,
//! without what the replay already carried, are queued in that order.

use serde_json::{Map, Value, json};

use crate::app::App;
use std::collections::{HashMap, HashSet};

use crate::error::Disconnect;
use crate::history::{History, Logs, MemoryHistory, Position, Reason, Replay};
use crate::outbox::{Outbox, Text};
use crate::protocol;
use crate::rooms::{ConnId, Held};

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
        Self::read_locked(&mut history.lock(), room, since)
    }

    /// [`Recovery::read`] under a lock the caller holds: several rooms read at one instant.
    pub fn read_locked(logs: &mut Logs<'_>, room: &str, since: &Position) -> Recovery {
        match logs.read(room, since) {
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

    /// A client at `since` recovering from `read`.
    pub fn from_read(read: &crate::history::Read, since: &Position, max: usize) -> Recovery {
        let (reason, replay) = match read.after(since, max) {
            Ok(replay) => (None, replay),
            Err(reason) => (Some(reason), Vec::new()),
        };
        Recovery {
            position: read.position.clone(),
            reason,
            replay,
        }
    }

    /// History cannot be read: the client stays where it is.
    pub fn unavailable(since: &Position) -> Recovery {
        Recovery {
            position: since.clone(),
            reason: Some(Reason::Unavailable),
            replay: Vec::new(),
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

    /// Queues `answer`, then the replay (each action with `meta.replayed`), then what was held
    /// back for the room while this ran; and lets the room's live actions through again.
    pub async fn send(self, app: &App, conn: ConnId, room: &str, answer: String) {
        send_all(
            app,
            conn,
            answer,
            vec![(room.to_string(), self)],
            Vec::new(),
        )
        .await;
    }
}

/// What joining a history room answers: a recovery (asked with `since`), or where the room
/// stands (`None` when history cannot be read now).
pub enum Standing {
    /// Where the room stands.
    Position(Option<Position>),
    /// What a client that asked with `since` gets.
    Recovery(Recovery),
}

/// Reads the history of each room asked, with the client's `since` or for its position. The
/// embedded history reads every room at one instant; in Redis each room's read is shared
/// with the other recoveries of that room on this instance.
pub async fn read_all(history: &History, asks: &[(&str, Option<&Position>)]) -> Vec<Standing> {
    match history {
        History::Memory(h) => {
            let mut logs = h.lock();
            asks.iter()
                .map(|(room, since)| match since {
                    Some(since) => {
                        Standing::Recovery(Recovery::read_locked(&mut logs, room, since))
                    }
                    None => Standing::Position(Some(logs.position(room))),
                })
                .collect()
        }
        History::Redis(h) => {
            let max = h.config().recover_max;
            let reads = asks.iter().map(|(room, since)| async move {
                match (h.recover(room, *since).await, since) {
                    (Ok(read), Some(since)) => {
                        Standing::Recovery(Recovery::from_read(&read, since, max))
                    }
                    (Ok(read), None) => Standing::Position(Some(read.position.clone())),
                    (Err(e), since) => {
                        tracing::warn!(%room, error = %e, "history cannot be read");
                        match since {
                            Some(since) => Standing::Recovery(Recovery::unavailable(since)),
                            None => Standing::Position(None),
                        }
                    }
                }
            });
            futures_util::future::join_all(reads).await
        }
    }
}

/// [`Recovery::send`] for several rooms answered at once (a batch SUBSCRIBE): the answer,
/// each room's replay in turn (an action stored in several of them only the first time),
/// then `after` (task snapshots), then what was held back for each. Everything is paced into
/// the send queue: a replay never closes the connection as slow.
pub async fn send_all(
    app: &App,
    conn: ConnId,
    answer: String,
    recoveries: Vec<(String, Recovery)>,
    after: Vec<String>,
) {
    let rooms = app.hub.rooms();
    let Some(outbox) = rooms.outbox(conn) else {
        for (room, _) in &recoveries {
            flush_held(app, conn, room, &Skip::nothing(), None, false).await;
        }
        return;
    };
    // A client that reads nothing for the idle timeout is closed as idle, as it would be.
    let deadline = tokio::time::Instant::now() + app.config.idle_timeout;
    let mut texts = vec![Text::from(answer)];
    {
        // An action stored in several of the rooms goes out once, through the first, with
        // its offsets in the others.
        let mut elsewhere: HashMap<&str, Map<String, Value>> = HashMap::new();
        let mut first_room: HashMap<&str, &str> = HashMap::new();
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
    }
    // The task snapshots next, before what was held back: the snapshot was read before the
    // hold ends, so a held action is at most as old as it and anything newer still follows.
    texts.extend(after.into_iter().map(Text::from));
    let mut open = push_paced(&outbox, texts, deadline).await;
    // What was held back: without the stored actions the replay already carried (through
    // this room by offset, through another room of the batch by id); after a refused recovery
    // all of it (the client refetches, and misses nothing it was sent).
    let replayed: HashSet<&str> = recoveries
        .iter()
        .flat_map(|(_, r)| r.replay.iter().map(|(_, stored)| stored.id.as_str()))
        .collect();
    for (room, recovery) in &recoveries {
        let skip = Skip {
            upto: recovery
                .reason
                .is_none()
                .then_some(recovery.position.offset),
            ids: &replayed,
        };
        open = flush_held(app, conn, room, &skip, Some((&outbox, deadline)), open).await;
    }
}

/// What of the held-back frames a replay already carried.
struct Skip<'a> {
    /// Stored actions up to this offset in the room.
    upto: Option<u64>,
    /// Actions with these ids.
    ids: &'a HashSet<&'a str>,
}

impl Skip<'_> {
    fn nothing() -> Skip<'static> {
        static NONE: std::sync::LazyLock<HashSet<&'static str>> =
            std::sync::LazyLock::new(HashSet::new);
        Skip {
            upto: None,
            ids: &NONE,
        }
    }

    fn skips(&self, held: &Held) -> bool {
        matches!((held.offset, self.upto), (Some(o), Some(upto)) if o <= upto)
            || held.id.as_deref().is_some_and(|id| self.ids.contains(id))
    }
}

/// Lets what was held back for `room` through, all of it (a recovery that could not start).
pub async fn release_held(app: &App, conn: ConnId, room: &str) {
    let outbox = app.hub.rooms().outbox(conn);
    let deadline = tokio::time::Instant::now() + app.config.idle_timeout;
    let open = outbox.is_some();
    let to = outbox.as_ref().map(|o| (o, deadline));
    flush_held(app, conn, room, &Skip::nothing(), to, open).await;
}

/// Queues, paced into `to`, what was held back for `room` — without what `skip` says the
/// replay carried — until nothing is left, which ends the hold-back. With nowhere to queue
/// (or once the connection is closing, `open` false) it is dropped. Returns whether the
/// connection is still open.
async fn flush_held(
    app: &App,
    conn: ConnId,
    room: &str,
    skip: &Skip<'_>,
    to: Option<(&Outbox, tokio::time::Instant)>,
    mut open: bool,
) -> bool {
    let rooms = app.hub.rooms();
    while let Some(held) = rooms.take_held(conn, room) {
        let Some((outbox, deadline)) = to.filter(|_| open) else {
            continue;
        };
        let texts = held
            .into_iter()
            .filter(|held| !skip.skips(held))
            .map(|held| held.text)
            .collect();
        open = push_paced(outbox, texts, deadline).await;
    }
    open
}

/// Queues `texts` in order, waiting for room in the send queue rather than overflowing it. A
/// frame larger than the whole queue is never for this connection, as when live, and is
/// skipped. Returns false once the connection is closing (closed here as idle when the client
/// has read nothing until `deadline`).
async fn push_paced(outbox: &Outbox, texts: Vec<Text>, deadline: tokio::time::Instant) -> bool {
    for text in texts {
        if !outbox.fits(text.len()) {
            continue;
        }
        let mut text = text;
        loop {
            match outbox.try_push(text) {
                Ok(()) => break,
                Err(Some(back)) => {
                    if tokio::time::Instant::now() >= deadline {
                        outbox.closer().close(Disconnect::Idle);
                        return false;
                    }
                    text = back;
                    tokio::time::sleep(PACE).await;
                }
                Err(None) => return false,
            }
        }
    }
    true
}
