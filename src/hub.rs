//! The hub: local room membership and the bus together, so a connection joins or leaves a room
//! with one call and nothing else has to keep the two in step. It also finds a session by its
//! public `connectionId`, for transports whose client → server messages arrive on another
//! request than the stream (SSE).
//!
//! Joining is local first (synchronous, so the session's later frames already see it) and then
//! confirmed by the bus: [`Join::confirmed`] resolves once actions published to the room reach
//! this instance. Leaving unsubscribes the bus when the last local member goes.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use futures_util::future::BoxFuture;
use serde_json::{Map, Value};

use crate::bus::{Bus, BusError};
use crate::outbox::Outbox;
use crate::rooms::{ConnId, Delivery, JoinError, Rooms};

/// Rooms and bus of one instance.
pub struct Hub {
    rooms: Arc<Rooms>,
    bus: Arc<dyn Bus>,
    /// Open sessions by public connection id. `std` lock: held only to insert, remove or look
    /// up, never across an `.await`.
    sessions: RwLock<HashMap<String, Outbox>>,
}

/// A local join, and the bus subscription that confirms it.
pub struct Join {
    /// Whether this call added the connection (false: it was already a member).
    pub added: bool,
    /// Resolves once the bus subscription of the room is active.
    pub confirmed: BoxFuture<'static, Result<(), BusError>>,
}

impl Hub {
    /// A hub over `rooms`, which `bus` delivers into.
    pub fn new(rooms: Arc<Rooms>, bus: Arc<dyn Bus>) -> Hub {
        Hub {
            rooms,
            bus,
            sessions: RwLock::default(),
        }
    }

    /// The bus.
    pub fn bus(&self) -> &dyn Bus {
        &*self.bus
    }

    /// Local membership.
    pub fn rooms(&self) -> &Rooms {
        &self.rooms
    }

    /// Registers a new session so that it can join rooms and be found by `connection_id`.
    pub fn register(&self, conn: ConnId, connection_id: &str, outbox: Outbox) {
        self.rooms.register(conn, outbox.clone());
        self.sessions
            .write()
            .unwrap()
            .insert(connection_id.to_string(), outbox);
    }

    /// The outbox of the open session with this public id.
    pub fn find(&self, connection_id: &str) -> Option<Outbox> {
        self.sessions.read().unwrap().get(connection_id).cloned()
    }

    /// Adds the connection to `room` now; the returned [`Join::confirmed`] resolves once the
    /// bus subscription is active. The membership stays when the bus cannot confirm: the bus
    /// subscribes every room in use when it reconnects, and the caller decides whether to
    /// [`Hub::leave`].
    pub fn join(&self, conn: ConnId, room: &str, max_rooms: usize) -> Result<Join, JoinError> {
        let added = self.rooms.join(conn, room, max_rooms)?;
        let (bus, room) = (self.bus.clone(), room.to_string());
        Ok(Join {
            added,
            confirmed: Box::pin(async move { bus.subscribe(&room).await }),
        })
    }

    /// Removes the connection from `room` now; when it was the last local member, the
    /// returned future unsubscribes the bus. `None` when it was not a member.
    pub fn leave(&self, conn: ConnId, room: &str) -> Option<BoxFuture<'static, ()>> {
        let emptied = self.rooms.leave_checked(conn, room)?;
        let (bus, room) = (self.bus.clone(), room.to_string());
        Some(Box::pin(async move {
            if emptied && let Err(e) = bus.unsubscribe(&room).await {
                tracing::warn!(%room, error = %e, "bus unsubscribe failed");
            }
        }))
    }

    /// Removes a closing session from every room and from the session index.
    pub async fn leave_all(&self, conn: ConnId, connection_id: &str) {
        self.sessions.write().unwrap().remove(connection_id);
        for room in self.rooms.unregister(conn) {
            if let Err(e) = self.bus.unsubscribe(&room).await {
                tracing::warn!(%room, error = %e, "bus unsubscribe failed");
            }
        }
    }

    /// [`Hub::leave_all`] for a session that can no longer await (it panicked): the bus is
    /// unsubscribed in a task of its own.
    pub fn leave_all_detached(self: &Arc<Self>, conn: ConnId, connection_id: &str) {
        self.sessions.write().unwrap().remove(connection_id);
        let emptied = self.rooms.unregister(conn);
        if !emptied.is_empty() {
            let hub = self.clone();
            tokio::spawn(async move {
                for room in emptied {
                    let _ = hub.bus.unsubscribe(&room).await;
                }
            });
        }
    }

    /// Delivers `action` to the local members of `targets` (once per connection) and counts
    /// it on the bus's counters.
    pub fn deliver(&self, targets: &[String], action: &Map<String, Value>) -> Delivery {
        let delivery = self.rooms.deliver(targets, action);
        self.bus.counters().count(delivery);
        delivery
    }

    /// Publishes `action` to `rooms` on every instance.
    pub async fn publish(
        &self,
        rooms: Vec<String>,
        action: Map<String, Value>,
    ) -> Result<(), BusError> {
        self.bus.publish(rooms, action).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::MemoryBus;
    use crate::outbox::QueueLimits;
    use serde_json::json;

    fn hub() -> Arc<Hub> {
        let rooms = Arc::new(Rooms::default());
        let bus: Arc<dyn Bus> = Arc::new(MemoryBus::new(rooms.clone()));
        Arc::new(Hub::new(rooms, bus))
    }

    fn outbox() -> (Outbox, crate::outbox::Inbox) {
        Outbox::new(QueueLimits {
            frames: 8,
            bytes: 1 << 20,
        })
    }

    #[tokio::test]
    async fn join_publish_leave_in_one_place() {
        let hub = hub();
        let (out, mut inbox) = outbox();
        hub.register(1, "c1", out);
        let join = hub.join(1, "r", 10).unwrap();
        assert!(join.added);
        join.confirmed.await.unwrap();
        assert!(!hub.join(1, "r", 10).unwrap().added, "already a member");
        let action = json!({"type": "A"});
        hub.publish(vec!["r".into()], action.as_object().unwrap().clone())
            .await
            .unwrap();
        assert!(inbox.try_recv().is_some());
        hub.leave(1, "r").expect("a member").await;
        assert!(hub.leave(1, "r").is_none(), "not a member any more");
        assert!(!hub.rooms().has_members("r"));
    }

    #[tokio::test]
    async fn sessions_are_found_by_connection_id_until_they_leave() {
        let hub = hub();
        let (out, _inbox) = outbox();
        hub.register(7, "conn-7", out);
        hub.join(7, "r", 10).unwrap();
        assert!(hub.find("conn-7").is_some());
        assert!(hub.find("conn-8").is_none());
        hub.leave_all(7, "conn-7").await;
        assert!(hub.find("conn-7").is_none());
        assert!(!hub.rooms().has_members("r"));
    }
}
