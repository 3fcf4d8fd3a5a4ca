//! The embedded bus of a single instance: publishing is local delivery.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use futures_util::future::{BoxFuture, FutureExt, ready};
use serde_json::{Map, Value};

use super::{Bus, BusCounters, BusError, BusStatus};
use crate::rooms::Rooms;

/// Delivers every publish straight to this instance's rooms.
pub struct MemoryBus {
    rooms: Arc<Rooms>,
    counters: BusCounters,
}

impl MemoryBus {
    /// A bus that delivers into `rooms`.
    pub fn new(rooms: Arc<Rooms>) -> Self {
        MemoryBus {
            rooms,
            counters: BusCounters::default(),
        }
    }
}

impl Bus for MemoryBus {
    fn publish(
        &self,
        rooms: Vec<String>,
        action: Map<String, Value>,
    ) -> BoxFuture<'_, Result<(), BusError>> {
        self.counters.published.fetch_add(1, Ordering::Relaxed);
        let delivery = self.rooms.deliver(&rooms, &action);
        self.counters.count(delivery);
        tracing::debug!(?delivery, rooms = rooms.len(), "published");
        ready(Ok(())).boxed()
    }

    fn subscribe(&self, _room: &str) -> BoxFuture<'_, Result<(), BusError>> {
        ready(Ok(())).boxed()
    }

    fn unsubscribe(&self, _room: &str) -> BoxFuture<'_, Result<(), BusError>> {
        ready(Ok(())).boxed()
    }

    fn counters(&self) -> &BusCounters {
        &self.counters
    }

    fn status(&self) -> BusStatus {
        BusStatus::Memory
    }
}
