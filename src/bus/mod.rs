//! The bus carries server-fired actions to every instance that has members in the target
//! rooms. [`MemoryBus`] serves a single instance; a Redis bus (contract section 4) slots in
//! behind the same trait, so sessions cannot tell them apart.

mod memory;

use futures_util::future::BoxFuture;
use serde_json::{Map, Value};

pub use memory::MemoryBus;

/// The bus's connection state, as `/readyz` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BusStatus {
    /// The in-memory bus: always up.
    Memory,
    /// A networked bus that is connected.
    Connected,
    /// A networked bus that lost its connection (pushes paused, requests still served).
    Disconnected,
}

impl BusStatus {
    /// The value of `/readyz`'s `bus` field.
    pub fn as_str(self) -> &'static str {
        match self {
            BusStatus::Memory => "memory",
            BusStatus::Connected => "connected",
            BusStatus::Disconnected => "disconnected",
        }
    }
}

/// Why the bus could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// The bus is not connected right now.
    #[error("bus unavailable: {0}")]
    Unavailable(String),
}

/// Where server-fired actions travel between instances.
///
/// Delivery to local connections always goes through [`crate::rooms::Rooms::deliver`]; the bus
/// only decides which actions reach this instance.
pub trait Bus: Send + Sync + 'static {
    /// Publishes `action` (an object with a string `type`) to `rooms` on every instance;
    /// each connection in any of them receives it once.
    fn publish(
        &self,
        rooms: Vec<String>,
        action: Map<String, Value>,
    ) -> BoxFuture<'_, Result<(), BusError>>;

    /// Makes sure actions published to `room` reach this instance. Called on every local join;
    /// resolves once the subscription is active, so `SUBSCRIBE_SUCCESS` never promises pushes
    /// that could still be missed.
    fn subscribe(&self, room: &str) -> BoxFuture<'_, Result<(), BusError>>;

    /// Called when the last local member left `room`: this instance no longer needs it.
    fn unsubscribe(&self, room: &str) -> BoxFuture<'_, Result<(), BusError>>;

    /// The current connection state.
    fn status(&self) -> BusStatus;
}
