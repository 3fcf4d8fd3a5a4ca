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
    handshake_refusals: Family<Reason, Counter>,
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
        {
            let mut family = encoder.encode_descriptor(
                "build_info",
                "patchbay's version (always 1)",
                None,
                MetricType::Gauge,
            )?;
            ConstGauge::new(1)
                .encode(family.encode_family(&[("version", env!("CARGO_PKG_VERSION"))])?)?;
        }
        gauge(
            &mut encoder,
            "bus_connected",
            "1 while the bus is connected (the in-memory bus always is), else 0",
            i64::from(self.bus.status() != crate::bus::BusStatus::Disconnected),
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
                "bus_reconnects",
                "Times the bus connected to Redis again after losing it",
                &c.reconnects,
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
        // The process's own metrics carry the usual unprefixed names (`process_*`); patchbay's
        // are under `patchbay_`.
        let mut root = Registry::default();
        root.register_collector(Box::new(Process));
        let registry = root.sub_registry_with_prefix("patchbay");
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
        let handshake_refusals = Family::<Reason, Counter>::default();
        registry.register(
            "handshake_refusals",
            "Websocket and SSE handshakes refused, by reason (forbidden_origin, unauthorized, too_many_connections, draining, ...)",
            handshake_refusals.clone(),
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
            registry: root,
            actions,
            handshake_refusals,
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

    /// Counts a refused handshake.
    pub fn handshake_refused(&self, code: &str) {
        self.handshake_refusals
            .get_or_create(&Reason {
                reason: code.to_string(),
            })
            .inc();
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

    /// The same in Prometheus's text format 0.0.4, for scrapers and tools that do not ask for
    /// OpenMetrics (see [`to_prometheus_text`]).
    pub fn render_prometheus(&self) -> String {
        to_prometheus_text(&self.render())
    }
}

/// The fields of a `/proc/<pid>/stat` (or `/proc/<pid>/task/<tid>/stat`) line after the
/// command name, which may hold spaces, in parentheses: proc(5)'s field n is at n - 3.
pub(crate) fn stat_fields(stat: &str) -> Vec<&str> {
    stat.rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default()
}

/// Clock ticks per second: the unit of the CPU times in a `stat` line.
pub(crate) fn clock_ticks() -> f64 {
    // SAFETY: sysconf only reads a configuration value.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64
}

/// The process's resident memory, CPU time, file descriptors and start time, read from
/// `/proc` at scrape time (nothing is reported where there is no `/proc`).
#[derive(Debug)]
struct Process;

impl Collector for Process {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
            return Ok(());
        };
        let fields = stat_fields(&stat);
        let field = |n: usize| fields.get(n - 3).and_then(|v| v.parse::<u64>().ok());
        let ticks = clock_ticks();
        // SAFETY: sysconf only reads a configuration value.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as u64;
        if let (Some(utime), Some(stime)) = (field(14), field(15)) {
            let cpu = ConstCounter::new((utime + stime) as f64 / ticks);
            cpu.encode(encoder.encode_descriptor(
                "process_cpu_seconds",
                "User and system CPU time spent, in seconds",
                None,
                cpu.metric_type(),
            )?)?;
        }
        let mut gauge = |name: &str, help: &str, value: f64| {
            let g = ConstGauge::new(value);
            g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)
        };
        if let Some(rss) = field(24) {
            gauge(
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
                (rss * page) as f64,
            )?;
        }
        if let Some(vsize) = field(23) {
            gauge(
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes",
                vsize as f64,
            )?;
        }
        if let (Some(start), Some(boot)) = (field(22), boot_time()) {
            gauge(
                "process_start_time_seconds",
                "Start time of the process since the epoch, in seconds",
                boot + start as f64 / ticks,
            )?;
        }
        if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
            gauge(
                "process_open_fds",
                "Open file descriptors",
                fds.count() as f64,
            )?;
        }
        if let Ok((soft, _)) = rlimit::getrlimit(rlimit::Resource::NOFILE) {
            gauge(
                "process_max_fds",
                "The open file descriptor limit",
                soft as f64,
            )?;
        }
        Ok(())
    }
}

/// The system's boot time, seconds since the epoch.
fn boot_time() -> Option<f64> {
    std::fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()
}

/// OpenMetrics text as Prometheus's text format 0.0.4: a counter family is named by its
/// samples' `_total` name in `# HELP` and `# TYPE`, and `# UNIT` and `# EOF` are left out.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|tag| {
            let rest = line.strip_prefix(tag)?;
            let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
            (counters.contains(name) && !name.ends_with("_total"))
                .then(|| format!("{tag}{name}_total {tail}"))
        });
        match renamed {
            Some(l) => out.push_str(l.trim_end()),
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod text_tests {
    use super::to_prometheus_text;

    #[test]
    fn openmetrics_counters_become_prometheus_counters() {
        let om = "# HELP patchbay_actions Requests answered.\n# TYPE patchbay_actions counter\npatchbay_actions_total{action=\"X\"} 3\n# HELP patchbay_rooms Rooms.\n# TYPE patchbay_rooms gauge\npatchbay_rooms 2\n# UNIT patchbay_rooms rooms\n# EOF\n";
        assert_eq!(
            to_prometheus_text(om),
            "# HELP patchbay_actions_total Requests answered.\n# TYPE patchbay_actions_total counter\npatchbay_actions_total{action=\"X\"} 3\n# HELP patchbay_rooms Rooms.\n# TYPE patchbay_rooms gauge\npatchbay_rooms 2\n"
        );
    }
}
