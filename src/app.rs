//! The shared state of one patchbay instance, built once from a validated [`Config`] and a
//! loaded [`Registry`], and the lifecycle that graceful shutdown drives.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::jwks::Jwks;
use crate::auth::{Authenticator, Checks, DelegatedAuth, JwtVerifier, RoomTokens};
use crate::bus::{Bus, MemoryBus, RedisBus, RedisTarget};
use crate::config::Config;
use crate::dispatch::Dispatcher;
use crate::history::{History, MemoryHistory, RedisHistory};
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::presence::{MemoryPresence, Presence, RedisPresence};
use crate::registry::Registry;
use crate::rooms::{ConnId, Rooms};
use crate::task::worker::{Worker, worker_id};
use crate::task::{EmbeddedQueues, Publish, Queue, RedisQueue, Task};
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
    /// History, when some room keeps it: embedded, or in Redis.
    pub history: Option<History>,
    /// Presence, when some room tracks it: embedded, or in Redis.
    pub presence: Option<Presence>,
    /// The open SSE streams of this instance.
    pub sse: Arc<crate::sse::Streams>,
    /// The embedded task queue, when some action is a `task` action and Redis is not set.
    embedded: Option<Arc<EmbeddedQueues>>,
    /// The Redis task queue, when some action is a `task` action and Redis is set.
    on_redis: Option<Arc<RedisQueue>>,
    next_conn_id: AtomicU64,
}

/// How often the queues' counts in `/metrics` are refreshed.
const QUEUE_COUNTS_EVERY: std::time::Duration = std::time::Duration::from_secs(1);
/// How often the Redis history checks that Redis has its functions and settings.
const HISTORY_PREPARE_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// How often the embedded history forgets what expired.
const HISTORY_SWEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(30);
/// How long serving waits for Redis to take the history settings at start-up.
const PREPARE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

/// How often the embedded queue looks for lapsed leases and expired tasks.
const REAP_EVERY: std::time::Duration = std::time::Duration::from_millis(250);

/// Publishes each change of an embedded task on the in-memory bus, synchronously (the queue
/// calls it under its lock, so changes leave in order).
fn publisher(bus: &Arc<MemoryBus>) -> Publish {
    let bus = bus.clone();
    Box::new(move |task: &Task| {
        bus.publish_now(
            crate::task::progress_rooms(task),
            crate::task::progress_action(task),
        );
    })
}

impl App {
    /// Builds an instance: the Redis bus when `PATCHBAY_REDIS_URL` is set (its worker is
    /// spawned, so call this inside a tokio runtime), else the in-memory bus.
    pub fn new(config: Config, registry: Registry) -> Result<Arc<App>, StartError> {
        if registry.needs_api_url() && config.api_url.is_none() {
            return Err(StartError::MissingApiUrl);
        }
        let rooms = Arc::new(Rooms::default());
        // History: embedded with the in-memory bus, in Redis with the Redis bus.
        let embedded_history = config
            .history
            .clone()
            .filter(|_| config.redis_url.is_none())
            .map(|h| Arc::new(MemoryHistory::new(h)));
        // Where Redis is: every Redis connection of the instance goes there.
        let target = config
            .redis_url
            .as_deref()
            .map(|url| RedisTarget::open(url, &config.redis_options))
            .transpose()
            .map_err(|e| StartError::RedisUrl(e.to_string()))?;
        let redis_history = match (&target, &config.history) {
            (Some(target), Some(h)) => Some(Arc::new(RedisHistory::open(
                target,
                &config.redis_prefix,
                h.clone(),
            ))),
            _ => None,
        };
        let history = match (&embedded_history, &redis_history) {
            (Some(h), _) => Some(History::Memory(h.clone())),
            (_, Some(h)) => Some(History::Redis(h.clone())),
            _ => None,
        };
        let sse = Arc::new(crate::sse::Streams::default());
        let emitter = config.emitter.as_ref().map(|(key, rules)| {
            Arc::new(crate::emitter::Emitter::new(
                key,
                rules.clone(),
                config.max_frame_bytes,
                config.max_publish_rooms,
            ))
        });
        let memory = config.redis_url.is_none().then(|| {
            Arc::new(MemoryBus::with_history(
                rooms.clone(),
                embedded_history.clone(),
            ))
        });
        let bus: Arc<dyn Bus> = match (&target, &memory) {
            (None, Some(memory)) => memory.clone(),
            (None, None) => unreachable!("made above without Redis"),
            (Some(target), _) => Arc::new(RedisBus::start(
                target,
                &config.redis_prefix,
                &config.task_channels,
                config.max_publish_rooms,
                rooms.clone(),
                crate::bus::Extras {
                    history: redis_history.clone(),
                    sse: sse.clone(),
                    emitter: emitter.clone(),
                },
            )),
        };
        let presence = match (&target, &config.presence) {
            (_, None) => None,
            (None, Some(p)) => Some(Presence::Memory(MemoryPresence::new(
                p.clone(),
                rooms.clone(),
            ))),
            (Some(target), Some(p)) => Some(Presence::Redis(Arc::new(RedisPresence::open(
                target,
                &config.redis_prefix,
                p.clone(),
            )))),
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
        let hub = Arc::new(Hub::new(rooms.clone(), bus.clone()));
        let has_tasks = registry.first_task_action().is_some();
        let (embedded, on_redis) = match (&target, has_tasks) {
            (_, false) => (None, None),
            (None, true) => {
                let slots = registry
                    .task_commands()
                    .into_iter()
                    .map(|(queue, c)| (queue.to_string(), u64::from(c.concurrency)))
                    .collect();
                let memory = memory.as_ref().expect("the in-memory bus without Redis");
                let queue = EmbeddedQueues::new(publisher(memory), slots);
                (Some(Arc::new(queue)), None)
            }
            (Some(target), true) => {
                let queue = RedisQueue::on(target, &config.redis_prefix);
                (None, Some(Arc::new(queue)))
            }
        };
        let tasks: Option<Arc<dyn Queue>> = match (&embedded, &on_redis) {
            (Some(q), _) => Some(q.clone()),
            (_, Some(q)) => Some(q.clone()),
            _ => None,
        };
        let checks = Checks {
            leeway: config.jwt_leeway,
            issuer: config.jwt_issuer.clone(),
            audience: config.jwt_audience.clone(),
        };
        let jwks = base("PATCHBAY_JWKS_URL", &config.jwks_url)?
            .map(|url| Arc::new(Jwks::new(client.clone(), url, config.jwks_refetch_after)));
        let secret = config.jwt_secret.as_deref().map(str::as_bytes);
        let jwt = JwtVerifier::new(secret, jwks, checks);
        let authenticator = Authenticator::new(
            jwt,
            auth.map(|url| DelegatedAuth::new(client.clone(), url, config.auth_timeout)),
            config.allow_anonymous,
        );
        Ok(Arc::new(App {
            metrics: Metrics::new(
                lifecycle.connections.clone(),
                rooms.clone(),
                bus.clone(),
                redis_history.clone(),
                emitter,
            ),
            lifecycle,
            dispatcher: Dispatcher::new(api, client, tasks),
            authenticator,
            room_tokens: RoomTokens::new(&config.room_secret),
            history,
            presence,
            sse,
            config,
            registry,
            hub,
            embedded,
            on_redis,
            next_conn_id: AtomicU64::new(1),
        }))
    }

    /// Tells Redis what history keeps (and loads the function library) before the first
    /// connection, so that the first actions are stored too. Redis that cannot be reached
    /// now delays serving by at most a few seconds; it is tried again in the background.
    pub async fn prepare(&self) {
        let Some(History::Redis(history)) = &self.history else {
            return;
        };
        match tokio::time::timeout(PREPARE_TIMEOUT, history.prepare()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot prepare history in Redis; retrying"),
            Err(_) => tracing::warn!("preparing history in Redis timed out; retrying"),
        }
    }

    /// Starts what runs beside the connections: the embedded queue's reaper and the workers
    /// of every queue with a `command`. They stop when [`Lifecycle::stop_workers`] is called.
    pub fn start_background(self: &Arc<Self>) {
        let stop = || self.lifecycle.workers_stop.clone();
        // The identity provider's keys: now, then every hour (keys rotate).
        if let Some(jwks) = self.authenticator.key_set() {
            let (jwks, stop) = (jwks.clone(), stop());
            self.lifecycle.workers.spawn(async move {
                let mut every = tokio::time::interval(crate::auth::jwks::REFRESH_EVERY);
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        // The first tick fetches (nothing was fetched yet); later ones skip a
                        // set an unknown `kid` fetched within the last minute.
                        _ = every.tick() => jwks.fetch_if(crate::auth::jwks::REFETCH_AFTER).await,
                    }
                }
            });
        }
        match &self.history {
            Some(History::Memory(history)) => {
                let (history, stop) = (history.clone(), stop());
                self.lifecycle.workers.spawn(async move {
                    let mut every = tokio::time::interval(HISTORY_SWEEP_EVERY);
                    loop {
                        tokio::select! {
                            _ = stop.cancelled() => break,
                            _ = every.tick() => history.sweep(),
                        }
                    }
                });
            }
            // Redis forgets the function library and what history keeps when it restarts
            // without persistence: both are put back every few seconds (and at once when a
            // call finds the library missing).
            Some(History::Redis(history)) => {
                let (history, stop) = (history.clone(), stop());
                self.lifecycle.workers.spawn(async move {
                    // The first time was [`App::prepare`], before serving.
                    let mut every = tokio::time::interval_at(
                        tokio::time::Instant::now() + HISTORY_PREPARE_EVERY,
                        HISTORY_PREPARE_EVERY,
                    );
                    let mut failing = false;
                    loop {
                        tokio::select! {
                            _ = stop.cancelled() => break,
                            _ = every.tick() => match history.prepare().await {
                                Ok(()) => failing = false,
                                Err(e) if !failing => {
                                    failing = true;
                                    tracing::warn!(error = %e, "cannot prepare history in Redis; retrying");
                                }
                                Err(_) => {}
                            },
                        }
                    }
                });
            }
            None => {}
        }
        if let Some(Presence::Redis(presence)) = &self.presence {
            let run = presence.clone().run(stop());
            self.lifecycle.workers.spawn(run);
        }
        let Some(queue) = self.dispatcher.tasks() else {
            return;
        };
        if let Some(embedded) = &self.embedded {
            let (embedded, stop) = (embedded.clone(), stop());
            self.lifecycle.workers.spawn(async move {
                let mut every = tokio::time::interval(REAP_EVERY);
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = every.tick() => { embedded.reap(std::time::SystemTime::now()); }
                    }
                }
            });
        }
        if let Some(on_redis) = &self.on_redis {
            let (on_redis, stop) = (on_redis.clone(), stop());
            let queues = self
                .registry
                .task_queues()
                .into_iter()
                .map(str::to_string)
                .collect();
            self.lifecycle
                .workers
                .spawn(async move { on_redis.maintain(queues, worker_id(), stop).await });
        }
        // The queues' counts for /metrics, refreshed every second.
        {
            let (app, queue, stop) = (self.clone(), queue.clone(), stop());
            self.lifecycle.workers.spawn(async move {
                let mut every = tokio::time::interval(QUEUE_COUNTS_EVERY);
                every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = every.tick() => {}
                    }
                    let mut counts = Vec::new();
                    for name in app.registry.task_queues() {
                        if let Ok(stats) = queue.stats(name).await {
                            counts.push((name.to_string(), stats));
                        }
                    }
                    app.metrics.set_queue_counts(counts);
                }
            });
        }
        for (name, command) in self.registry.task_commands() {
            let worker = Worker {
                queue: queue.clone(),
                name: name.to_string(),
                command: command.clone(),
                id: format!("{}-{name}", worker_id()),
                watchdog: crate::task::watchdog::for_this_process(),
                observe: Some({
                    let app = self.clone();
                    Arc::new(move |queue: &str, outcome: &str, took| {
                        app.metrics.task_attempt(queue, outcome, took)
                    })
                }),
            };
            self.lifecycle.workers.spawn(worker.run(stop()));
        }
    }

    /// Whether a page of the request's `Origin` may use this instance: the Origin rule
    /// against the host asked for (`X-Forwarded-Host` when `remote` is a trusted proxy).
    pub fn origin_allowed(
        &self,
        headers: &hyper::HeaderMap,
        remote: Option<std::net::IpAddr>,
    ) -> bool {
        let host = self.config.trusted_proxies.host(remote, headers);
        crate::auth::origin_allowed(headers, host.as_deref(), &self.config.allowed_origins)
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
    /// The task workers and the embedded queue's reaper.
    workers: TaskTracker,
    /// Stops them.
    workers_stop: CancellationToken,
}

impl Lifecycle {
    /// Whether shutdown has started.
    pub fn is_draining(&self) -> bool {
        self.drain.is_cancelled()
    }

    /// Starts shutdown: `/readyz` turns 503, sessions begin to drain, task workers stop
    /// taking jobs and hand their running ones back.
    pub fn begin_drain(&self) {
        self.drain.cancel();
        self.sessions.close();
        // Task workers take no new job from now on; running ones are handed back.
        self.workers_stop.cancel();
    }

    /// Resolves when shutdown starts.
    pub fn drain_started(&self) -> tokio_util::sync::WaitForCancellationFuture<'_> {
        self.drain.cancelled()
    }

    /// The tracker session tasks are spawned on.
    pub fn sessions(&self) -> &TaskTracker {
        &self.sessions
    }

    /// Stops the task workers (running jobs are handed back) and waits for them.
    pub async fn stop_workers(&self) {
        self.workers_stop.cancel();
        self.workers.close();
        self.workers.wait().await;
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
