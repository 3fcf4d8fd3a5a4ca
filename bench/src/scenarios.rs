//! The four scenarios, each run against one target (server) at a time.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Semaphore, watch};
use tokio::time::Instant;

use crate::client::{self, Proto, Received, Ws};
use crate::procs::{self, Pinning, Proc};

/// A server under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Patchbay,
    Reference,
    SocketIo,
    /// One `write()` per delivery and nothing else ([`crate::floor`]): fan-out only.
    Floor,
}

impl Target {
    pub fn name(self) -> &'static str {
        match self {
            Target::Patchbay => "patchbay",
            Target::Reference => "reference",
            Target::SocketIo => "socketio",
            Target::Floor => "floor",
        }
    }

    pub fn parse(s: &str) -> Option<Target> {
        match s {
            "patchbay" => Some(Target::Patchbay),
            "reference" => Some(Target::Reference),
            "socketio" | "socket.io" => Some(Target::SocketIo),
            "floor" => Some(Target::Floor),
            _ => None,
        }
    }
}

/// Bytes of every published action, as in the issue's measurements.
pub const ACTION_BYTES: usize = 100;
/// Handshakes in flight at once: well under the servers' accept backlogs.
const CONNECT_CONCURRENCY: usize = 256;
/// How long deliveries may trail the last publish before the rest counts as lost.
const DRAIN: Duration = Duration::from_secs(5);

/// What every run shares.
pub struct Ctx {
    pub pinning: Pinning,
    pub redis_url: String,
    pub patchbay: Result<PathBuf, String>,
    pub socketio_dir: Result<PathBuf, String>,
    pub work_dir: PathBuf,
    pub upstream: Option<SocketAddr>,
    pub ticks_per_sec: f64,
}

/// A started server.
pub struct Server {
    pub proc: Proc,
    pub addr: SocketAddr,
    pub proto: Proto,
}

impl Ctx {
    fn log_path(&self, target: Target) -> PathBuf {
        self.work_dir.join(format!("{}.log", target.name()))
    }

    /// Starts `target` pinned to the server core and waits until it serves.
    pub async fn start(&self, target: Target) -> Result<Server, String> {
        self.start_with(target, Some(&self.redis_url), &[]).await
    }

    /// [`Ctx::start`]; patchbay on `redis` (`None`: its embedded bus) with `extra` settings.
    pub async fn start_with(
        &self,
        target: Target,
        redis: Option<&str>,
        extra: &[(&str, &str)],
    ) -> Result<Server, String> {
        let port = procs::free_port();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let log = self.log_path(target);
        let prefix = &self.pinning.server_prefix;
        let (mut proc, proto) = match target {
            Target::Patchbay => {
                let bin = self.patchbay.clone()?;
                let actions = self.work_dir.join("actions");
                let api = self
                    .upstream
                    .map_or("http://127.0.0.1:9".to_string(), |a| format!("http://{a}"));
                let mut env: Vec<(String, String)> = [
                    ("PATCHBAY_LISTEN", addr.to_string()),
                    ("PATCHBAY_PUBLIC_ROOMS", "bench,dm:*".into()),
                    ("PATCHBAY_ACTIONS", actions.display().to_string()),
                    ("PATCHBAY_API_URL", api),
                    ("PATCHBAY_MAX_CONNECTIONS", "1000000".into()),
                    ("PATCHBAY_RATE_PER_SEC", "100000".into()),
                    ("PATCHBAY_RATE_BURST", "100000".into()),
                    ("PATCHBAY_IDLE_TIMEOUT_SECS", "3600".into()),
                    ("PATCHBAY_PUBLISH_TOKEN", PUBLISH_TOKEN.into()),
                    ("PATCHBAY_MAX_PUBLISH_ROOMS", "10000".into()),
                    ("PATCHBAY_LOG", "warn".into()),
                ]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect();
                if let Some(url) = redis {
                    env.push(("PATCHBAY_REDIS_URL".into(), url.to_string()));
                }
                env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
                // The work directory as cwd, so no developer `.env` changes the settings.
                let p = procs::spawn(
                    "patchbay",
                    prefix,
                    &[bin.display().to_string()],
                    &env,
                    Some(&self.work_dir),
                    Some(&log),
                )?;
                (p, Proto::Patchbay)
            }
            Target::Reference => {
                let exe = std::env::current_exe().map_err(|e| e.to_string())?;
                let mut argv = vec![
                    exe.display().to_string(),
                    "reference".into(),
                    "--listen".into(),
                    addr.to_string(),
                    "--redis".into(),
                    self.redis_url.clone(),
                ];
                if let Some(upstream) = self.upstream {
                    argv.extend(["--upstream".into(), upstream.to_string()]);
                }
                let p = procs::spawn("reference", prefix, &argv, &[], None, Some(&log))?;
                (p, Proto::Patchbay)
            }
            Target::Floor => {
                let exe = std::env::current_exe().map_err(|e| e.to_string())?;
                let argv = vec![
                    exe.display().to_string(),
                    "floor".into(),
                    "--listen".into(),
                    addr.to_string(),
                    "--redis".into(),
                    self.redis_url.clone(),
                ];
                let p = procs::spawn("floor", prefix, &argv, &[], None, Some(&log))?;
                (p, Proto::Patchbay)
            }
            Target::SocketIo => {
                let dir = self.socketio_dir.clone()?;
                let env = vec![
                    ("PORT".to_string(), port.to_string()),
                    ("REDIS_URL".to_string(), self.redis_url.clone()),
                    ("NODE_ENV".to_string(), "production".to_string()),
                ];
                let argv = vec!["node".to_string(), "server.js".to_string()];
                let p = procs::spawn("socketio", prefix, &argv, &env, Some(&dir), Some(&log))?;
                (p, Proto::SocketIo)
            }
        };
        let ready = async {
            procs::wait_listening(&mut proc, addr, Duration::from_secs(20)).await?;
            if target == Target::Patchbay && redis.is_some() {
                // Listening comes before the Redis connection: wait for the bus too, or the
                // first SUBSCRIBEs fail with upstream_unavailable.
                let deadline = Instant::now() + Duration::from_secs(10);
                while !procs::http_get(addr, "/readyz").is_some_and(|r| r.contains("\"connected\""))
                {
                    proc.check_alive()?;
                    if Instant::now() > deadline {
                        return Err("patchbay's Redis bus did not connect".to_string());
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            Ok::<_, String>(())
        };
        if let Err(e) = ready.await {
            let tail = std::fs::read_to_string(&log).unwrap_or_default();
            let tail: String = tail.lines().rev().take(5).collect::<Vec<_>>().join(" | ");
            return Err(format!("{e} (log: {tail})"));
        }
        Ok(Server { proc, addr, proto })
    }

    fn cpu_seconds(&self, ticks: u64) -> f64 {
        ticks as f64 / self.ticks_per_sec
    }
}

/// Latency percentiles in microseconds.
#[derive(Debug, Default, Clone, Copy)]
pub struct Percentiles {
    pub p50: u32,
    pub p99: u32,
    pub max: u32,
}

pub fn percentiles(mut v: Vec<u32>) -> Percentiles {
    if v.is_empty() {
        return Percentiles::default();
    }
    v.sort_unstable();
    let at = |q: f64| v[((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1];
    Percentiles {
        p50: at(0.50),
        p99: at(0.99),
        max: *v.last().unwrap(),
    }
}

/// Result of a fan-out or targeted run against one target.
#[derive(Debug, Clone)]
pub struct DeliveryRun {
    pub target: Target,
    pub clients: usize,
    pub published: u64,
    pub expected: u64,
    pub delivered: u64,
    pub duplicates: u64,
    pub failed_connects: usize,
    pub dropped_connections: usize,
    pub window: Duration,
    pub latency: Percentiles,
    pub cpu_seconds: f64,
}

impl DeliveryRun {
    pub fn loss(&self) -> u64 {
        self.expected.saturating_sub(self.delivered)
    }
    pub fn per_sec(&self) -> f64 {
        self.delivered as f64 / self.window.as_secs_f64().max(1e-9)
    }
    pub fn cpu_us_per_delivery(&self) -> f64 {
        self.cpu_seconds * 1e6 / (self.delivered.max(1) as f64)
    }
    pub fn cpu_percent(&self) -> f64 {
        self.cpu_seconds * 100.0 / self.window.as_secs_f64().max(1e-9)
    }
}

/// Clients connected and subscribed, each receiving in its own task.
struct Crowd {
    tasks: Vec<tokio::task::JoinHandle<Option<(Received, Ws)>>>,
    total: Arc<AtomicU64>,
    stop: watch::Sender<bool>,
    ready: usize,
    failed: usize,
    first_error: Option<String>,
}

impl Crowd {
    /// Connects `n` clients; client `i` joins `room(i)` and then expects `expected` sequence
    /// numbers (0: count everything).
    async fn connect(
        server: &Server,
        n: usize,
        room: impl Fn(usize) -> String,
        expected: usize,
    ) -> Crowd {
        let total = Arc::new(AtomicU64::new(0));
        let (stop, stop_rx) = watch::channel(false);
        let ready = Arc::new(AtomicUsize::new(0));
        let failed = Arc::new(AtomicUsize::new(0));
        let first_error: Arc<Mutex<Option<String>>> = Arc::default();
        let gate = Arc::new(Semaphore::new(CONNECT_CONCURRENCY));
        let mut tasks = Vec::with_capacity(n);
        for i in 0..n {
            let (addr, proto, room) = (server.addr, server.proto, room(i));
            let (total, stop_rx, ready, failed, first_error, gate) = (
                total.clone(),
                stop_rx.clone(),
                ready.clone(),
                failed.clone(),
                first_error.clone(),
                gate.clone(),
            );
            tasks.push(tokio::spawn(async move {
                let permit = gate.acquire_owned().await.ok()?;
                let ws = match client::open(addr, proto, &room).await {
                    Ok(ws) => ws,
                    Err(e) => {
                        first_error.lock().unwrap().get_or_insert(e);
                        failed.fetch_add(1, Ordering::Relaxed);
                        return None;
                    }
                };
                drop(permit);
                ready.fetch_add(1, Ordering::Relaxed);
                Some(client::receive(ws, proto, expected, total, stop_rx).await)
            }));
        }
        let started = Instant::now();
        let mut last_report = Instant::now();
        loop {
            let (r, f) = (
                ready.load(Ordering::Relaxed),
                failed.load(Ordering::Relaxed),
            );
            if r + f >= n {
                break;
            }
            if last_report.elapsed() > Duration::from_secs(5) {
                eprintln!(
                    "    connected {r}/{n} ({f} failed) after {:.0?}",
                    started.elapsed()
                );
                last_report = Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let first_error = first_error.lock().unwrap().take();
        Crowd {
            tasks,
            total,
            stop,
            ready: ready.load(Ordering::Relaxed),
            failed: failed.load(Ordering::Relaxed),
            first_error,
        }
    }

    /// Stops every client; returns what they saw and their sockets (closed by the caller after
    /// the server is gone).
    async fn finish(self) -> (Vec<Received>, Vec<Ws>) {
        let _ = self.stop.send(true);
        let mut seen = Vec::with_capacity(self.tasks.len());
        let mut sockets = Vec::with_capacity(self.tasks.len());
        for t in self.tasks {
            if let Ok(Some((r, ws))) = t.await {
                seen.push(r);
                sockets.push(ws);
            }
        }
        (seen, sockets)
    }
}

/// Publishes `count` bench actions at `rate` per second; `channel(seq)` picks each one's
/// channel.
async fn publish(
    redis_url: &str,
    rate: f64,
    count: u64,
    mut channel: impl FnMut(u64) -> String,
) -> Result<(), String> {
    publish_with(redis_url, rate, count, |seq| {
        let action = client::bench_action(seq, client::now_ns(), ACTION_BYTES);
        (channel(seq), action.into_bytes())
    })
    .await
}

/// Publishes `count` messages at `rate` per second: `message(seq)` is each one's channel and
/// bytes. Messages due together (rates above the timer's 1 ms) go in one pipeline.
pub async fn publish_with(
    redis_url: &str,
    rate: f64,
    count: u64,
    mut message: impl FnMut(u64) -> (String, Vec<u8>),
) -> Result<(), String> {
    let client = redis::Client::open(redis_url).map_err(|e| e.to_string())?;
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .map_err(|e| e.to_string())?;
    let start = Instant::now();
    let mut sent = 0u64;
    while sent < count {
        tokio::time::sleep_until(start + Duration::from_secs_f64(sent as f64 / rate)).await;
        let due = ((start.elapsed().as_secs_f64() * rate) as u64 + 1).min(count);
        let mut pipe = redis::pipe();
        for seq in sent..due.max(sent + 1) {
            let (channel, bytes) = message(seq);
            pipe.cmd("PUBLISH").arg(channel).arg(bytes).ignore();
        }
        pipe.query_async::<()>(&mut conn)
            .await
            .map_err(|e| format!("PUBLISH: {e}"))?;
        sent = due.max(sent + 1);
    }
    Ok(())
}

/// A deterministic xorshift: random users without a dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Fan-out: `clients` in room `bench`, `messages` actions at `rate` per second.
pub async fn fanout(
    ctx: &Ctx,
    target: Target,
    clients: usize,
    rate: f64,
    messages: u64,
) -> Result<DeliveryRun, String> {
    let mut server = ctx.start(target).await?;
    let crowd = Crowd::connect(&server, clients, |_| "bench".into(), messages as usize).await;
    let expected = messages * crowd.ready as u64;
    deliver(
        ctx,
        &mut server,
        target,
        crowd,
        expected,
        messages,
        Via::Redis(|_| "patchbay:room:bench".to_string()),
        rate,
    )
    .await
}

/// Fan-out through `POST /publish`, on patchbay's embedded bus or (`redis`) on Redis, in a room
/// that keeps history (`history`) or not: what history costs per delivery.
pub async fn fanout_published(
    ctx: &Ctx,
    clients: usize,
    rate: f64,
    messages: u64,
    history: bool,
    redis: bool,
) -> Result<DeliveryRun, String> {
    let rooms = if history { "bench" } else { "" };
    let redis = redis.then_some(ctx.redis_url.as_str());
    fanout_on(
        ctx,
        clients,
        rate,
        messages,
        redis,
        &[("PATCHBAY_HISTORY_ROOMS", rooms)],
    )
    .await
}

/// [`fanout_published`] without history, the bus on the Redis at `redis_url` with `extra`
/// settings (a TLS URL and its CA file).
pub async fn fanout_published_on(
    ctx: &Ctx,
    clients: usize,
    rate: f64,
    messages: u64,
    redis_url: &str,
    extra: &[(&str, &str)],
) -> Result<DeliveryRun, String> {
    let mut settings = vec![("PATCHBAY_HISTORY_ROOMS", "")];
    settings.extend_from_slice(extra);
    fanout_on(ctx, clients, rate, messages, Some(redis_url), &settings).await
}

async fn fanout_on(
    ctx: &Ctx,
    clients: usize,
    rate: f64,
    messages: u64,
    redis: Option<&str>,
    settings: &[(&str, &str)],
) -> Result<DeliveryRun, String> {
    let mut server = ctx.start_with(Target::Patchbay, redis, settings).await?;
    let crowd = Crowd::connect(&server, clients, |_| "bench".into(), messages as usize).await;
    let expected = messages * crowd.ready as u64;
    let via: Via<fn(u64) -> String> = Via::Http;
    deliver(
        ctx,
        &mut server,
        Target::Patchbay,
        crowd,
        expected,
        messages,
        via,
        rate,
    )
    .await
}

/// Publishes `count` bench actions to room `bench` at `rate` per second with `POST /publish`.
pub async fn publish_http(addr: SocketAddr, rate: f64, count: u64) -> Result<(), String> {
    let start = Instant::now();
    for seq in 0..count {
        tokio::time::sleep_until(start + Duration::from_secs_f64(seq as f64 / rate)).await;
        let action = client::bench_action(seq, client::now_ns(), ACTION_BYTES);
        let body = format!(r#"{{"rooms":["bench"],"action":{action}}}"#);
        let status = tokio::task::spawn_blocking(move || {
            procs::http_post(addr, "/publish", PUBLISH_TOKEN, &body)
        })
        .await
        .map_err(|e| e.to_string())??;
        if status != 202 {
            return Err(format!("POST /publish answered {status}"));
        }
    }
    Ok(())
}

/// Targeted: `clients` each alone in `dm:<i>`; `messages` actions to random ones of those rooms.
pub async fn targeted(
    ctx: &Ctx,
    target: Target,
    clients: usize,
    rate: f64,
    messages: u64,
) -> Result<DeliveryRun, String> {
    let mut server = ctx.start(target).await?;
    let crowd = Crowd::connect(&server, clients, |i| format!("dm:{i}"), 0).await;
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let n = clients as u64;
    deliver(
        ctx,
        &mut server,
        target,
        crowd,
        messages,
        messages,
        Via::Redis(move |_| format!("patchbay:room:dm:{}", rng.next() % n)),
        rate,
    )
    .await
}

/// How the bench publishes: on Redis (the channel of each action), or with `POST /publish` to
/// the server itself (an instance on its embedded bus) into room `bench`.
enum Via<F> {
    Redis(F),
    Http,
}

#[allow(clippy::too_many_arguments)]
async fn deliver<F: FnMut(u64) -> String>(
    ctx: &Ctx,
    server: &mut Server,
    target: Target,
    crowd: Crowd,
    expected: u64,
    messages: u64,
    via: Via<F>,
    rate: f64,
) -> Result<DeliveryRun, String> {
    if crowd.ready == 0 {
        return Err(format!(
            "no client could connect: {}",
            crowd.first_error.clone().unwrap_or_default()
        ));
    }
    if let Some(e) = &crowd.first_error {
        eprintln!(
            "    {} clients failed to connect; first error: {e}",
            crowd.failed
        );
    }
    // Let the subscriptions and the handshake garbage settle before measuring.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let pid = server.proc.pid();
    let cpu0 = procs::cpu_ticks(pid);
    let t0 = Instant::now();
    match via {
        Via::Redis(channel) => publish(&ctx.redis_url, rate, messages, channel).await?,
        Via::Http => publish_http(server.addr, rate, messages).await?,
    }
    let published_at = Instant::now();
    while crowd.total.load(Ordering::Relaxed) < expected && published_at.elapsed() < DRAIN {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let window = t0.elapsed();
    let cpu1 = procs::cpu_ticks(pid);
    server.proc.check_alive()?;
    let (ready, failed) = (crowd.ready, crowd.failed);
    let (seen, sockets) = crowd.finish().await;
    let mut latencies = Vec::new();
    let (mut delivered, mut duplicates, mut dropped) = (0, 0, 0);
    for r in seen {
        delivered += r.count;
        duplicates += r.duplicates;
        dropped += usize::from(r.dropped);
        latencies.extend(r.latencies_us);
    }
    // The server goes first, so the clients' sockets close without a 15,000-way close storm
    // being measured anywhere.
    let _ = server.proc.child.kill();
    let _ = server.proc.child.wait();
    drop(sockets);
    Ok(DeliveryRun {
        target,
        clients: ready,
        published: messages,
        expected,
        delivered,
        duplicates,
        failed_connects: failed,
        dropped_connections: dropped,
        window,
        latency: percentiles(latencies),
        cpu_seconds: ctx.cpu_seconds(cpu1.saturating_sub(cpu0)),
    })
}

/// Result of the idle-memory scenario against one target.
#[derive(Debug, Clone)]
pub struct IdleRun {
    pub target: Target,
    pub connections: usize,
    pub failed_connects: usize,
    pub baseline_kib: u64,
    pub loaded_kib: u64,
    /// The kernel's socket memory, machine-wide, before and after connecting
    /// ([`procs::kernel_socket_kib`]): both ends of every connection are on this machine.
    pub kernel_before_kib: u64,
    pub kernel_after_kib: u64,
}

impl IdleRun {
    pub fn per_connection_kib(&self) -> f64 {
        self.loaded_kib.saturating_sub(self.baseline_kib) as f64 / self.connections.max(1) as f64
    }

    /// The kernel's memory per connection for one end (the server's): half the growth, as the
    /// clients' ends are the same kind of idle TCP socket. Machine-wide, so only an estimate.
    pub fn kernel_per_connection_kib(&self) -> f64 {
        self.kernel_after_kib.saturating_sub(self.kernel_before_kib) as f64
            / 2.0
            / self.connections.max(1) as f64
    }
}

/// Idle memory: `clients` connected, subscribed to `bench`, silent.
pub async fn idle(ctx: &Ctx, target: Target, clients: usize) -> Result<IdleRun, String> {
    let mut server = ctx.start(target).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let pid = server.proc.pid();
    let baseline = procs::rss_kib(pid);
    let kernel_before = procs::kernel_socket_kib();
    let crowd = Crowd::connect(&server, clients, |_| "bench".into(), 0).await;
    if let Some(e) = &crowd.first_error {
        eprintln!(
            "    {} clients failed to connect; first error: {e}",
            crowd.failed
        );
    }
    let loaded = settled_rss_kib(pid).await;
    let kernel_after = procs::kernel_socket_kib();
    server.proc.check_alive()?;
    let (ready, failed) = (crowd.ready, crowd.failed);
    drop(server);
    let (_, sockets) = crowd.finish().await;
    drop(sockets);
    Ok(IdleRun {
        target,
        connections: ready,
        failed_connects: failed,
        baseline_kib: baseline,
        loaded_kib: loaded,
        kernel_before_kib: kernel_before,
        kernel_after_kib: kernel_after,
    })
}

/// `pid`'s RSS once it has settled: memory after connecting keeps moving a little (allocator,
/// deferred frees), so it is sampled until two readings a second apart agree within 1%, for at
/// most 5 s.
pub async fn settled_rss_kib(pid: u32) -> u64 {
    let mut loaded = procs::rss_kib(pid);
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = procs::rss_kib(pid);
        let stable = now.abs_diff(loaded) * 100 <= loaded;
        loaded = now;
        if stable {
            break;
        }
    }
    loaded
}

/// The publish token the bench configures on patchbay.
const PUBLISH_TOKEN: &str = "patchbay-bench publish token";

/// Result of the publish scenario.
#[derive(Debug, Clone)]
pub struct PublishRun {
    /// HTTP status of the publish.
    pub status: u16,
    /// Time to the answer.
    pub elapsed: Duration,
    /// How far patchbay's peak RSS rose past its peak before the publish.
    pub peak_growth_kib: u64,
}

/// One `POST /publish` of a `body_bytes` payload to `rooms` rooms, on a fresh patchbay: what it
/// costs in memory at its peak. Nobody is subscribed: this is the publisher's cost alone.
pub async fn publish_wide(
    ctx: &Ctx,
    rooms: usize,
    body_bytes: usize,
) -> Result<PublishRun, String> {
    let mut server = ctx.start(Target::Patchbay).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let pid = server.proc.pid();
    let before = procs::peak_rss_kib(pid);
    let body = serde_json::json!({
        "rooms": (0..rooms).map(|i| format!("dm:{i}")).collect::<Vec<_>>(),
        "action": {"type": "BIG", "payload": "x".repeat(body_bytes)},
    })
    .to_string();
    let addr = server.addr;
    let started = Instant::now();
    let status = tokio::task::spawn_blocking(move || {
        procs::http_post(addr, "/publish", PUBLISH_TOKEN, &body)
    })
    .await
    .map_err(|e| e.to_string())??;
    let elapsed = started.elapsed();
    // Let anything still in flight inside patchbay settle before reading the peak.
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.proc.check_alive()?;
    let after = procs::peak_rss_kib(pid);
    Ok(PublishRun {
        status,
        elapsed,
        peak_growth_kib: after.saturating_sub(before),
    })
}

/// Result of the request/response scenario.
#[derive(Debug, Clone)]
pub struct ReqRespRun {
    pub label: &'static str,
    pub requests: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    pub window: Duration,
    pub latency: Percentiles,
    /// The server's CPU over the window (none for the direct calls).
    pub cpu_seconds: Option<f64>,
}

impl ReqRespRun {
    pub fn per_sec(&self) -> f64 {
        self.requests as f64 / self.window.as_secs_f64().max(1e-9)
    }
}

/// Writes the one manifest patchbay needs for request/response.
pub fn write_actions(dir: &Path) -> Result<(), String> {
    let actions = dir.join("actions");
    std::fs::create_dir_all(&actions).map_err(|e| e.to_string())?;
    std::fs::write(
        actions.join("bench.json"),
        r#"{ "ECHO": { "http": { "method": "POST", "path": "/echo" } } }"#,
    )
    .map_err(|e| e.to_string())
}

/// A request client: the direct HTTP connection or a websocket through patchbay or the
/// reference.
enum Caller {
    Direct(client::Direct),
    Ws(Box<Ws>),
}

impl Caller {
    async fn call(&mut self, id: &str, payload: String) -> Result<(), String> {
        match self {
            Caller::Direct(d) => d.echo(id, payload).await.map(|_| ()),
            Caller::Ws(ws) => client::ws_echo(ws, id, &payload).await,
        }
    }
}

/// Request/response: `clients` callers, `rate` requests per second in all, each caller on a
/// fixed schedule (one request at a time), measured after a one-second warm-up. `via` is the
/// server the requests go through (patchbay or the reference), `None` for the direct upstream
/// calls.
pub async fn reqresp(
    ctx: &Ctx,
    via: Option<Target>,
    clients: usize,
    rate: f64,
    seconds: f64,
) -> Result<ReqRespRun, String> {
    let upstream = ctx.upstream.ok_or("no upstream")?;
    let mut server = match via {
        Some(t) => Some(ctx.start(t).await?),
        None => None,
    };
    let mut callers = Vec::with_capacity(clients);
    for _ in 0..clients {
        callers.push(match &server {
            Some(s) => {
                // Only patchbay greets a new connection with `@@patchbay/CONNECTED`.
                let greeted = via == Some(Target::Patchbay);
                Caller::Ws(Box::new(client::open_plain(s.addr, greeted).await?))
            }
            None => Caller::Direct(client::Direct::connect(upstream).await?),
        });
    }
    let warmup = Duration::from_secs(1);
    let period = Duration::from_secs_f64(clients as f64 / rate);
    let start = Instant::now() + Duration::from_millis(100);
    let measure_from = start + warmup;
    let end = measure_from + Duration::from_secs_f64(seconds);
    let errors = Arc::new(AtomicU64::new(0));
    let first_error: Arc<Mutex<Option<String>>> = Arc::default();
    let mut tasks = Vec::with_capacity(clients);
    for (i, mut caller) in callers.into_iter().enumerate() {
        let offset = period.mul_f64(i as f64 / clients as f64);
        let (errors, first_error) = (errors.clone(), first_error.clone());
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let pad = "x".repeat(70);
            for k in 0u64.. {
                let at = start + offset + period * k as u32;
                if at >= end {
                    break;
                }
                tokio::time::sleep_until(at).await;
                let id = format!("c{i}-{k}");
                let payload = format!(r#"{{"n":{k},"pad":"{pad}"}}"#);
                let sent = Instant::now();
                match caller.call(&id, payload).await {
                    Ok(()) if at >= measure_from => {
                        latencies.push(sent.elapsed().as_micros().min(u32::MAX as u128) as u32)
                    }
                    Ok(()) => {}
                    Err(e) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        first_error.lock().unwrap().get_or_insert(e);
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
            latencies
        }));
    }
    tokio::time::sleep_until(measure_from).await;
    let pid = server.as_ref().map(|s| s.proc.pid());
    let cpu0 = pid.map(procs::cpu_ticks);
    let t0 = Instant::now();
    let mut latencies = Vec::new();
    for t in tasks {
        latencies.extend(t.await.map_err(|e| e.to_string())?);
    }
    let window = t0.elapsed();
    let cpu1 = pid.map(procs::cpu_ticks);
    if let Some(s) = server.as_mut() {
        s.proc.check_alive()?;
    }
    drop(server);
    let errors = errors.load(Ordering::Relaxed);
    let first_error = first_error.lock().unwrap().take();
    Ok(ReqRespRun {
        label: via.map_or("direct", Target::name),
        requests: latencies.len() as u64,
        errors,
        first_error,
        window,
        latency: percentiles(latencies),
        cpu_seconds: cpu0
            .zip(cpu1)
            .map(|(a, b)| ctx.cpu_seconds(b.saturating_sub(a))),
    })
}
