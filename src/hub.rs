//! The hub: local room membership and the bus together, so a connection joins or leaves a room
//! with one call and nothing else has to keep the two in step. It also finds a session by its
//! public `connectionId`, for transports whose client → server messages arrive on another
//! request than the stream (SSE).
//!
//! A `connectionId` is a version-4 uuid whose first half is random and whose second half
//! carries the process-local connection number, masked with a per-process key so it tells
//! clients nothing ([`Hub::connection_id`]): finding a session is one lookup in the membership
//! map and a comparison of the random half, with no second index (which would cost every
//! idle connection its entry).
//!
//! Buses deliver straight into [`Rooms`] (local fan-out needs nothing else); sessions join,
//! leave and publish only through the hub.
//!
//! Joining is local first (synchronous, so the session's later frames already see it) and then
//! confirmed by the bus: [`Join::confirmed`] resolves once actions published to the room reach
//! this instance. Leaving unsubscribes the bus when the last local member goes.

use std::sync::Arc;

use futures_util::future::BoxFuture;
use serde_json::{Map, Value};

use crate::bus::{Bus, BusError};
use crate::outbox::Outbox;
use crate::rooms::{ConnId, JoinError, Rooms};

/// Rooms and bus of one instance.
pub struct Hub {
    rooms: Arc<Rooms>,
    bus: Arc<dyn Bus>,
    /// Masks connection numbers in public ids (below 2^62, so the uuid's variant bits never
    /// hide any of the number).
    key: u64,
}

/// Connection numbers and the key fit in the 62 bits a uuid's variant leaves.
const LOW_62: u64 = u64::MAX >> 2;

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
            key: uuid::Uuid::new_v4().as_u64_pair().0 & LOW_62,
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

    /// The public id of connection `conn` (below 2^62): a version-4 uuid, random in its first
    /// half, the masked number in its second.
    pub fn connection_id(&self, conn: ConnId) -> String {
        let mut bytes = *uuid::Uuid::new_v4().as_bytes();
        bytes[8..].copy_from_slice(&((conn & LOW_62) ^ self.key).to_be_bytes());
        uuid::Builder::from_random_bytes(bytes)
            .into_uuid()
            .to_string()
    }

    /// The random half and the connection number of a public id this hub made.
    fn parse_connection_id(&self, connection_id: &str) -> Option<(u64, ConnId)> {
        let uuid = uuid::Uuid::try_parse(connection_id).ok()?;
        if uuid.get_version_num() != 4 {
            return None;
        }
        let (random, masked) = uuid.as_u64_pair();
        Some((random, (masked & LOW_62) ^ self.key))
    }

    /// Registers a new session (its public id made by [`Hub::connection_id`]) so that it can
    /// join rooms and be found by that id. Any other id registers it unfindable.
    pub fn register(&self, conn: ConnId, connection_id: &str, outbox: Outbox) {
        let secret = self
            .parse_connection_id(connection_id)
            .map_or(0, |(random, _)| random);
        self.rooms.register_with_secret(conn, outbox, secret);
    }

    /// The outbox of the open session with this public id.
    pub fn find(&self, connection_id: &str) -> Option<Outbox> {
        let (random, conn) = self.parse_connection_id(connection_id)?;
        // 0 marks a session registered without a findable id.
        (random != 0).then(|| self.rooms.find(conn, random))?
    }

    /// Adds the connection to `room` now; the returned [`Join::confirmed`] resolves once the
    /// bus subscription is active. The membership stays when the bus cannot confirm: the bus
    /// subscribes every room in use when it reconnects, and the caller decides whether to
    /// [`Hub::leave`].
    pub fn join(&self, conn: ConnId, room: &str, max_rooms: usize) -> Result<Join, JoinError> {
        let added = self.rooms.join(conn, room, max_rooms)?;
        Ok(self.confirm(room, added))
    }

    /// The bus's confirmation of a local join made directly on [`Hub::rooms`] (`added`: whether
    /// that join added the connection).
    pub fn confirm(&self, room: &str, added: bool) -> Join {
        let (bus, room) = (self.bus.clone(), room.to_string());
        Join {
            added,
            confirmed: Box::pin(async move { bus.subscribe(&room).await }),
        }
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

    /// Removes a closing session from every room.
    pub async fn leave_all(&self, conn: ConnId) {
        for room in self.rooms.unregister(conn) {
            if let Err(e) = self.bus.unsubscribe(&room).await {
                tracing::warn!(%room, error = %e, "bus unsubscribe failed");
            }
        }
    }

    /// [`Hub::leave_all`] for a session that can no longer await (it panicked): the bus is
    /// unsubscribed in a task of its own.
    pub fn leave_all_detached(self: &Arc<Self>, conn: ConnId) {
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
        hub.register(1, &hub.connection_id(1), out);
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
        let id = hub.connection_id(7);
        assert!(
            !id.ends_with(&format!("{:012x}", 7)),
            "the number is masked: {id}"
        );
        hub.register(7, &id, out);
        hub.join(7, "r", 10).unwrap();
        assert!(hub.find(&id).is_some());
        assert!(uuid::Uuid::try_parse(&id).unwrap().get_version_num() == 4);
        // Another id of the same connection number (a guess) finds nothing; nor does junk.
        assert!(hub.find(&hub.connection_id(7)).is_none());
        assert!(hub.find("conn-7").is_none());
        hub.leave_all(7).await;
        assert!(hub.find(&id).is_none());
        assert!(!hub.rooms().has_members("r"));
    }
}
