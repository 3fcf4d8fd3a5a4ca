//! Prometheus metrics (`GET /metrics`, OpenMetrics text) with `prometheus-client`.
//!
//! Label values come only from manifest action names, built-in names, failure codes and close
//! reasons, so no client can blow up the number of series: an unknown action is counted as
//! `unknown`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::bus::Bus;
use crate::emitter::{DropReason, Emitter};
use crate::error::Disconnect;
use crate::history::RedisHistory;
use crate::rooms::Rooms;
use crate::task::QueueStats;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ActionOutcome {
    action: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ActionLabel {
    action: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QueueOutcome {
    queue: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QueueStatus {
    queue: String,
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QueueLabel {
    queue: String,
}

/// The latest counts of every queue, refreshed in the background (reading them may need Redis,
/// which a scrape must not wait for).
pub type QueueCounts = Arc<Mutex<Vec<(String, QueueStats)>>>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Reason {
    reason: String,
}

/// The instance's metrics.
pub struct Metrics {
    registry: Registry,
    actions: Family<ActionOutcome, Counter>,
    upstream: Family<ActionLabel, Histogram>,
    disconnects: Family<Reason, Counter>,
    attempts: Family<QueueOutcome, Histogram>,
    queues: QueueCounts,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics(..)")
    }
}

/// Values read at scrape time from the live state.
struct Live {
    connections: Arc<AtomicUsize>,
    rooms: Arc<Rooms>,
    bus: Arc<dyn Bus>,
    history: Option<Arc<RedisHistory>>,
    emitter: Option<Arc<Emitter>>,
    queues: QueueCounts,
}

impl std::fmt::Debug for Live {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Live(..)")
    }
}

impl Collector for Live {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let gauge = |encoder: &mut DescriptorEncoder, name: &str, help: &str, value: i64| {
            let g = ConstGauge::new(value);
            g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)
        };
        gauge(
            &mut encoder,
            "connections",
            "Open websocket connections",
            self.connections.load(Ordering::Relaxed) as i64,
        )?;
        gauge(
            &mut encoder,
            "rooms",
            "Rooms with at least one local connection",
            self.rooms.room_count() as i64,
        )?;
        let c = self.bus.counters();
        for (name, help, value) in [
            (
                "bus_messages_in",
                "Messages received from the bus",
                &c.received,
            ),
            (
                "bus_messages_out",
                "Messages published on the bus",
                &c.published,
            ),
            (
                "bus_messages_malformed",
                "Bus messages dropped as malformed",
                &c.malformed,
            ),
            (
                "deliveries",
                "Server-fired actions queued for a connection",
                &c.delivered,
            ),
            (
                "deliveries_dropped",
                "Server-fired actions dropped because a connection's queue was full",
                &c.dropped,
            ),
            (
                "deliveries_oversize",
                "Server-fired actions not queued for a connection because they are larger than its whole send queue",
                &c.oversize,
            ),
        ] {
            let counter = ConstCounter::new(value.load(Ordering::Relaxed));
            counter.encode(encoder.encode_descriptor(
                name,
                help,
                None,
                counter.metric_type(),
            )?)?;
        }
        if let Some(history) = &self.history {
            let counter = ConstCounter::new(history.reads());
            counter.encode(encoder.encode_descriptor(
                "history_reads",
                "Reads of a room's history in Redis (recoveries of one room share them)",
                None,
                counter.metric_type(),
            )?)?;
        }
        if let Some(emitter) = &self.emitter {
            let mut family = encoder.encode_descriptor(
                "emitter_dropped",
                "socket.io emitter messages dropped, by reason",
                None,
                MetricType::Counter,
            )?;
            for reason in DropReason::ALL {
                let labels = Reason {
                    reason: reason.as_str().to_string(),
                };
                ConstCounter::new(emitter.drops.get(reason))
                    .encode(family.encode_family(&labels)?)?;
            }
        }
        self.encode_queues(&mut encoder)
    }
}

impl Live {
    fn encode_queues(&self, encoder: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let queues = self.queues.lock().unwrap().clone();
        if queues.is_empty() {
            return Ok(());
        }
        let by_status = |encoder: &mut DescriptorEncoder,
                         name: &str,
                         help: &str,
                         pick: &dyn Fn(&QueueStats) -> Vec<(&'static str, u64)>|
         -> Result<(), std::fmt::Error> {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for (queue, stats) in &queues {
                for (status, value) in pick(stats) {
                    let labels = QueueStatus {
                        queue: queue.clone(),
                        status: status.to_string(),
                    };
                    ConstGauge::new(value as i64).encode(family.encode_family(&labels)?)?;
                }
            }
            Ok(())
        };
        by_status(
            encoder,
            "queue_tasks",
            "Tasks waiting or running, by queue and status",
            &|s| {
                vec![
                    ("queued", s.queued),
                    ("running", s.running),
                    ("delayed", s.delayed),
                ]
            },
        )?;
        by_status(
            encoder,
            "queue_finished_tasks",
            "Tasks that reached a final status since the queue began, by queue and status (failed and lost are the dead letters)",
            &|s| {
                vec![
                    ("succeeded", s.succeeded),
                    ("failed", s.failed),
                    ("cancelled", s.cancelled),
                    ("lost", s.lost),
                ]
            },
        )?;
        let mut family = encoder.encode_descriptor(
            "queue_workers",
            "Workers of the queue (consumers of its Redis group; with the embedded queue, worker slots in this process)",
            None,
            MetricType::Gauge,
        )?;
        for (queue, stats) in &queues {
            let labels = QueueLabel {
                queue: queue.clone(),
            };
            ConstGauge::new(stats.workers as i64).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

impl Metrics {
    /// Metrics over the instance's live state.
    pub fn new(
        connections: Arc<AtomicUsize>,
        rooms: Arc<Rooms>,
        bus: Arc<dyn Bus>,
        history: Option<Arc<RedisHistory>>,
        emitter: Option<Arc<Emitter>>,
    ) -> Metrics {
        let mut registry = Registry::with_prefix("patchbay");
        let actions = Family::<ActionOutcome, Counter>::default();
        registry.register(
            "actions",
            "Requests answered, by action and outcome (success or failure code)",
            actions.clone(),
        );
        let upstream = Family::<ActionLabel, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0005, 2.0, 16))
        });
        registry.register(
            "action_duration_seconds",
            "Time to run an action (schema check and upstream call)",
            upstream.clone(),
        );
        let disconnects = Family::<Reason, Counter>::default();
        registry.register(
            "disconnects",
            "Connections closed by the server, by reason",
            disconnects.clone(),
        );
        let attempts = Family::<QueueOutcome, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.001, 2.0, 20))
        });
        registry.register(
            "task_attempt_duration_seconds",
            "Job attempts run by this process's workers, by queue and how they ended",
            attempts.clone(),
        );
        let queues = QueueCounts::default();
        registry.register_collector(Box::new(Live {
            connections,
            rooms,
            bus,
            history,
            emitter,
            queues: queues.clone(),
        }));
        Metrics {
            registry,
            actions,
            upstream,
            disconnects,
            attempts,
            queues,
        }
    }

    /// Counts one answered request. `action` must be a manifest or built-in name, or
    /// `unknown`; `outcome` is `success` or a failure code.
    pub fn action(&self, action: &str, outcome: &str) {
        self.actions
            .get_or_create(&ActionOutcome {
                action: action.to_string(),
                outcome: outcome.to_string(),
            })
            .inc();
    }

    /// Records how long an action took.
    pub fn action_duration(&self, action: &str, elapsed: Duration) {
        self.upstream
            .get_or_create(&ActionLabel {
                action: action.to_string(),
            })
            .observe(elapsed.as_secs_f64());
    }

    /// Replaces the queues' counts.
    pub fn set_queue_counts(&self, counts: Vec<(String, QueueStats)>) {
        *self.queues.lock().unwrap() = counts;
    }

    /// Records one job attempt run by this process.
    pub fn task_attempt(&self, queue: &str, outcome: &str, elapsed: Duration) {
        self.attempts
            .get_or_create(&QueueOutcome {
                queue: queue.to_string(),
                outcome: outcome.to_string(),
            })
            .observe(elapsed.as_secs_f64());
    }

    /// Counts a connection the server closed.
    pub fn disconnect(&self, reason: Disconnect) {
        let reason = match reason {
            Disconnect::Idle => "idle",
            Disconnect::Shutdown => "shutdown",
            Disconnect::Protocol => "protocol",
            Disconnect::BadUtf8 => "bad_utf8",
            Disconnect::TooLarge => "too_large",
            Disconnect::Internal => "internal",
            Disconnect::Slow => "slow",
            Disconnect::Flood => "flood",
            Disconnect::Expired => "expired",
        };
        self.disconnects
            .get_or_create(&Reason {
                reason: reason.to_string(),
            })
            .inc();
    }

    /// The OpenMetrics text of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}
