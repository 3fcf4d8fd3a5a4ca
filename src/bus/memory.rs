//! The embedded bus of a single instance: publishing is local delivery, and with history, an
//! append to each history room first, under the history's lock, so offsets follow delivery.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use futures_util::future::{BoxFuture, FutureExt, ready};
use serde_json::{Map, Value};

use super::{Bus, BusCounters, BusError, BusStatus};
use crate::history::{MemoryHistory, Stored};
use crate::rooms::Rooms;

/// Delivers every publish straight to this instance's rooms.
pub struct MemoryBus {
    rooms: Arc<Rooms>,
    history: Option<Arc<MemoryHistory>>,
    counters: BusCounters,
}

impl MemoryBus {
    /// A bus that delivers into `rooms`.
    pub fn new(rooms: Arc<Rooms>) -> Self {
        Self::with_history(rooms, None)
    }

    /// A bus that delivers into `rooms` and stores in `history`.
    pub fn with_history(rooms: Arc<Rooms>, history: Option<Arc<MemoryHistory>>) -> Self {
        MemoryBus {
            rooms,
            history,
            counters: BusCounters::default(),
        }
    }
}

impl MemoryBus {
    /// Publishes at once: stores `action` in the history rooms among `rooms`, then delivers it.
    pub fn publish_now(&self, rooms: Vec<String>, action: Map<String, Value>) {
        self.counters.published.fetch_add(1, Ordering::Relaxed);
        // Which target rooms store it: asked once per room.
        let stores: Vec<bool> = match &self.history {
            Some(history) => rooms.iter().map(|r| history.stores(r, &action)).collect(),
            None => Vec::new(),
        };
        let delivery = match &self.history {
            Some(history) if stores.contains(&true) => {
                let stored = Arc::new(Stored {
                    id: uuid::Uuid::new_v4().to_string(),
                    action,
                });
                let mut logs = history.lock();
                let offsets: Vec<Option<u64>> = rooms
                    .iter()
                    .zip(&stores)
                    .map(|(r, stores)| stores.then(|| logs.append(r, &stored)))
                    .collect();
                self.rooms
                    .deliver_stored(&rooms, &stored.action, Some(&stored.id), &offsets)
            }
            // Every server-fired action carries an id, stored or not.
            _ => {
                let id = uuid::Uuid::new_v4().to_string();
                self.rooms.deliver_stored(&rooms, &action, Some(&id), &[])
            }
        };
        self.counters.count(delivery);
        tracing::debug!(?delivery, rooms = rooms.len(), "published");
    }
}

impl Bus for MemoryBus {
    fn publish(
        &self,
        rooms: Vec<String>,
        action: Map<String, Value>,
    ) -> BoxFuture<'_, Result<(), BusError>> {
        self.publish_now(rooms, action);
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
