//! The shared state of one patchbay instance, built once from a validated [`Config`] and a
//! loaded [`Registry`], and the lifecycle that graceful shutdown drives.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::{Authenticator, DelegatedAuth, JwtVerifier, RoomTokens};
use crate::bus::{Bus, MemoryBus, RedisBus};
use crate::config::Config;
use crate::dispatch::Dispatcher;
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::rooms::{ConnId, Rooms};
use crate::upstream;

/// Why an instance cannot start with this configuration.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The Redis URL cannot be used.
    #[error("PATCHBAY_REDIS_URL: {0}")]
    RedisUrl(String),
    /// Some `http` action exists but no API URL is configured.
    #[error("PATCHBAY_API_URL: required because some actions use the `http` handler")]
    MissingApiUrl,
    /// A URL the HTTP client cannot use.
    #[error("{0}: {1}")]
    BadUrl(&'static str, String),
    /// A `task` action, which needs the task manager.
    #[error(
        "action {0} is a `task` action: the task manager is not in this version of patchbay; remove the task actions"
    )]
    TaskManagerMissing(String),
}

/// Everything a connection or an HTTP route needs, shared behind an `Arc`.
pub struct App {
    /// The configuration.
    pub config: Config,
    /// The actions.
    pub registry: Registry,
    /// Runs actions.
    pub dispatcher: Dispatcher,
    /// Rooms and the bus: joining, leaving, delivering, publishing.
    pub hub: Arc<Hub>,
    /// Signs room tokens.
    pub room_tokens: RoomTokens,
    /// Decides who a handshake is.
    pub authenticator: Authenticator,
    /// Draining state, open connections and session tasks.
    pub lifecycle: Lifecycle,
    /// Prometheus metrics.
    pub metrics: Metrics,
    next_conn_id: AtomicU64,
}

impl App {
    /// Builds an instance: the Redis bus when `PATCHBAY_REDIS_URL` is set (its worker is
    /// spawned, so call this inside a tokio runtime), else the in-memory bus.
    pub fn new(config: Config, registry: Registry) -> Result<Arc<App>, StartError> {
        if registry.needs_api_url() && config.api_url.is_none() {
            return Err(StartError::MissingApiUrl);
        }
        if let Some(action) = registry.first_task_action() {
            return Err(StartError::TaskManagerMissing(action.to_string()));
        }
        let rooms = Arc::new(Rooms::default());
        let bus: Arc<dyn Bus> = match &config.redis_url {
            None => Arc::new(MemoryBus::new(rooms.clone())),
            Some(url) => Arc::new(
                RedisBus::start(
                    url,
                    &config.redis_prefix,
                    &config.task_channels,
                    config.max_publish_rooms,
                    rooms.clone(),
                )
                .map_err(|e| StartError::RedisUrl(e.to_string()))?,
            ),
        };
        let client = upstream::Client::new();
        let base = |name: &'static str, url: &Option<String>| {
            url.as_deref()
                .map(upstream::Base::parse)
                .transpose()
                .map_err(|e| StartError::BadUrl(name, e))
        };
        let api = base("PATCHBAY_API_URL", &config.api_url)?;
        let auth = base("PATCHBAY_AUTH_URL", &config.auth_url)?;
        let lifecycle = Lifecycle::default();
        let authenticator = Authenticator::new(
            config
                .jwt_secret
                .as_ref()
                .map(|s| JwtVerifier::new(s.as_bytes(), config.jwt_leeway)),
            auth.map(|url| DelegatedAuth::new(client.clone(), url, config.auth_timeout)),
            config.allow_anonymous,
        );
        Ok(Arc::new(App {
            metrics: Metrics::new(lifecycle.connections.clone(), rooms.clone(), bus.clone()),
            lifecycle,
            dispatcher: Dispatcher::new(api, client),
            authenticator,
            room_tokens: RoomTokens::new(&config.room_secret),
            config,
            registry,
            hub: Arc::new(Hub::new(rooms, bus)),
            next_conn_id: AtomicU64::new(1),
        }))
    }

    /// A fresh process-local connection id.
    pub fn next_conn_id(&self) -> ConnId {
        self.next_conn_id.fetch_add(1, Ordering::Relaxed)
    }
}

/// Graceful-shutdown state and connection accounting.
#[derive(Default)]
pub struct Lifecycle {
    /// Cancelled when shutdown starts: sessions stop reading, finish in-flight requests, close.
    drain: CancellationToken,
    /// Every websocket session task, so shutdown can wait for them.
    sessions: TaskTracker,
    /// Open websocket connections, for `PATCHBAY_MAX_CONNECTIONS`.
    connections: Arc<AtomicUsize>,
}

impl Lifecycle {
    /// Whether shutdown has started.
    pub fn is_draining(&self) -> bool {
        self.drain.is_cancelled()
    }

    /// Starts shutdown: `/readyz` turns 503 and sessions begin to drain.
    pub fn begin_drain(&self) {
        self.drain.cancel();
        self.sessions.close();
    }

    /// Resolves when shutdown starts.
    pub fn drain_started(&self) -> tokio_util::sync::WaitForCancellationFuture<'_> {
        self.drain.cancelled()
    }

    /// The tracker session tasks are spawned on.
    pub fn sessions(&self) -> &TaskTracker {
        &self.sessions
    }

    /// Takes a connection slot, or `None` when `max` connections are open.
    pub fn try_connect(&self, max: usize) -> Option<ConnectionSlot> {
        let counter = self.connections.clone();
        counter
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| ConnectionSlot(counter))
    }

    /// Open websocket connections.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::Acquire)
    }
}

/// One open connection; the count drops when this does.
#[derive(Debug)]
pub struct ConnectionSlot(Arc<AtomicUsize>);

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_slots_are_capped_and_released() {
        let l = Lifecycle::default();
        let a = l.try_connect(2).unwrap();
        let _b = l.try_connect(2).unwrap();
        assert!(l.try_connect(2).is_none());
        drop(a);
        assert_eq!(l.connections(), 1);
        assert!(l.try_connect(2).is_some());
    }

    #[test]
    fn task_actions_stop_start_up_until_the_task_manager_exists() {
        let r = Registry::from_sources([(
            std::path::Path::new("a.json"),
            r#"{"EXPORT_START":{"task":{"queue":"exports"}}}"#,
        )])
        .unwrap();
        let e = App::new(Config::default(), r).err().expect("refused");
        assert!(
            matches!(e, StartError::TaskManagerMissing(ref a) if a == "EXPORT_START"),
            "{e}"
        );
    }

    #[test]
    fn an_http_action_needs_an_api_url() {
        let r = Registry::from_sources([(
            std::path::Path::new("a.json"),
            r#"{"X":{"http":{"method":"GET","path":"/x"}}}"#,
        )])
        .unwrap();
        assert!(matches!(
            App::new(Config::default(), r),
            Err(StartError::MissingApiUrl)
        ));
    }
}
