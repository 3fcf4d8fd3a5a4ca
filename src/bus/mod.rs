//! The bus carries server-fired actions to every instance that has members in the target
//! rooms. [`MemoryBus`] serves a single instance; [`RedisBus`] (contract section 4) serves many,
//! behind the same trait, so sessions cannot tell them apart.

mod format;
mod memory;
mod redis;

use std::sync::atomic::AtomicU64;

use futures_util::future::{BoxFuture, FutureExt};
use serde_json::{Map, Value};

pub use self::redis::{
    Commands, Driver, DriverError, Extras, LocalRedis, Msg, RedisBus, RedisDriver, RedisOptions,
    RedisTarget, Subscriptions, connection_config, is_dead, refusal,
};
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

/// Bus traffic counters for operators.
#[derive(Debug, Default)]
pub struct BusCounters {
    /// Messages received from the bus (always 0 for the in-memory bus).
    pub received: AtomicU64,
    /// Received messages dropped because they were neither an action, an envelope nor a task.
    pub malformed: AtomicU64,
    /// Times the bus connected again after losing its connection.
    pub reconnects: AtomicU64,
    /// Messages published (one per room channel on Redis, one per publish in memory).
    pub published: AtomicU64,
    /// Server-fired actions queued for a local connection.
    pub delivered: AtomicU64,
    /// Server-fired actions not queued because the connection's queue was full.
    pub dropped: AtomicU64,
    /// Server-fired actions not queued for a connection because they alone are larger than
    /// its send queue's byte bound (the connection stays open).
    pub oversize: AtomicU64,
}

impl BusCounters {
    /// Adds one fan-out's result.
    pub fn count(&self, delivery: crate::rooms::Delivery) {
        use std::sync::atomic::Ordering::Relaxed;
        self.delivered.fetch_add(delivery.delivered as u64, Relaxed);
        self.dropped.fetch_add(delivery.dropped as u64, Relaxed);
        self.oversize.fetch_add(delivery.oversize as u64, Relaxed);
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

    /// Traffic counters.
    fn counters(&self) -> &BusCounters;

    /// The current connection state.
    fn status(&self) -> BusStatus;

    /// Why the bus's backend refuses this instance (wrong password, missing permission), while
    /// it does: unlike a lost connection, this needs an operator, so `/readyz` fails.
    fn refusal(&self) -> Option<String> {
        None
    }

    /// Makes SSE stream `id` (of `user`) reachable from other instances. Nothing to do on a
    /// bus of one instance.
    fn sse_register(&self, _id: &str, _user: Option<&str>) -> BoxFuture<'_, ()> {
        futures_util::future::ready(()).boxed()
    }

    /// Stream `id` ended.
    fn sse_unregister(&self, _id: &str) -> BoxFuture<'_, ()> {
        futures_util::future::ready(()).boxed()
    }

    /// Hands client actions (`actions`, a JSON array) for stream `id` posted by `user` to the
    /// instance that holds the stream: `true` when one does. Never on a bus of one instance.
    fn sse_forward(
        &self,
        _id: &str,
        _user: Option<&str>,
        _actions: String,
    ) -> BoxFuture<'_, Result<bool, BusError>> {
        futures_util::future::ready(Ok(false)).boxed()
    }
}
