//! patchbay-bench: drives real websocket clients against patchbay, a minimal tokio-tungstenite
//! reference server and Socket.IO 4, publishing through a private Redis, and prints a table per
//! scenario with the ratios to the reference server. See BENCHMARKS.md.

mod client;
mod emitter_bench;
mod floor;
mod procs;
mod reference;
mod scenarios;
mod sse_bench;
mod storm;
mod tasks;

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::{Command, ExitCode};

use scenarios::{Ctx, DeliveryRun, IdleRun, ReqRespRun, Target};

const USAGE: &str = "\
usage: patchbay-bench <command> [options]

commands:
  fanout      clients in one room, 100-byte actions at a fixed rate
  idle        connected, subscribed, silent clients: server RSS per connection, and the
              kernel's memory per socket (slab and TCP buffers, machine-wide: an estimate)
  targeted    clients each in its own dm:<i> room, actions to random rooms
  reqresp     request/response through patchbay and the reference vs calling the upstream
              directly
  publish     patchbay's peak memory for one POST /publish to many rooms (3,000 rooms x
              42 KB and 10,000 rooms x 145 KB)
  history     the fan-out through POST /publish, on the embedded bus and on Redis, in a plain
              room and in a room that keeps history: what history costs per delivery
  sse         the SSE transport against the websocket on the embedded bus: idle KiB per
              connection and CPU per delivery of the fan-out (2,000 clients, 20 actions/s);
              then, on two instances over Redis, the first byte of GET /sse and a POST to
              the other instance answered on the stream
  emitter     one instance on Redis: CPU per delivery of the fan-out (--clients 1000,
              --rate 50/s) arriving as socket.io emitter messages vs as JSON on the room's
              channel; then 8,000 hostile emitter messages: CPU per message, memory before
              and after
  redis-tls   one instance's bus on a redis-server's plain port, then on its TLS port
              (rediss://, a CA made with openssl): the fan-out's latency and CPU per
              delivery (--clients 2000, --rate 20/s, POST /publish)
  storm       a reconnect storm on Redis: --clients (10000) each recover three history rooms
              (shared, per 100, own) holding --messages (10) actions each, within --seconds
              (5): SUBSCRIBE-to-last-replay latency, history reads, patchbay's CPU
  all         the four delivery scenarios in turn
  ci          a tiny fan-out (50 clients, 10 messages) against patchbay and the reference
              server and a short request/response run through patchbay; exits 1 on any loss
              or failure
  tasks       no-op jobs through patchbay's Redis task queue and through BullMQ on one
              private Redis: jobs/s (--messages jobs, default 100000), Redis CPU per job,
              enqueue-to-start latency at --rate jobs/s (default 1000) for --seconds;
              --clients sets the worker concurrency (default 50)
  tasks-instructions
              the same no-op jobs (--messages, default 2000) against a Redis run under
              valgrind's callgrind: instructions Redis executes per job, the same from run
              to run where CPU time on a shared machine is not (needs valgrind)
  setup       installs the Socket.IO server's and BullMQ's npm packages
  reference   runs the reference server (--listen ADDR --redis URL [--upstream ADDR]); the
              bench starts it itself
  floor       runs the floor (--listen ADDR --redis URL): each action framed once and written
              with one write() to each member's socket, nothing else; the bench starts it

options:
  --targets LIST   comma list of floor,patchbay,reference,socketio (default: all; Socket.IO
                   runs fan-out and idle only, the floor fan-out only)
  --clients N      connections (fanout 2000, idle 15000, targeted 10000, reqresp 100)
  --rate R         fanout/targeted: actions published per second (fanout 20; targeted: the
                   fan-out's deliveries per second, 40000); reqresp: requests per second (2000)
  --seconds S      measured window (10)
  --messages M     fanout/targeted: actions published (default rate x seconds)
  --quick          smaller defaults, for a first look
  --patchbay PATH  the patchbay binary (default: next to this one, target/<profile>/patchbay)
  --no-pin         do not pin the server to core 0 and the load to core 1
  --repeat N       fanout/targeted: run the targets N times in turn and judge the targets by
                   the median of each round's ratios (this machine's CPU per delivery moves
                   from run to run; a ratio taken within one round moves less)

Build first: cargo build --release && cargo build --release -p patchbay-bench";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scenario {
    Fanout,
    Idle,
    Targeted,
    ReqResp,
    Publish,
    History,
    Storm,
    Sse,
    Emitter,
    RedisTls,
}

#[derive(Debug, Default)]
struct Opts {
    targets: Option<Vec<Target>>,
    clients: Option<usize>,
    rate: Option<f64>,
    seconds: Option<f64>,
    messages: Option<u64>,
    quick: bool,
    patchbay: Option<PathBuf>,
    no_pin: bool,
    repeat: usize,
}

fn parse_opts(args: &[String]) -> Result<Opts, String> {
    let mut o = Opts::default();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{name} needs a value"))
        };
        let number = |name: &str, v: String| -> Result<f64, String> {
            v.parse::<f64>()
                .ok()
                .filter(|n| n.is_finite() && *n > 0.0)
                .ok_or_else(|| format!("{name}: `{v}` is not a positive number"))
        };
        match a.as_str() {
            "--targets" => {
                let list = value(a)?;
                let targets: Result<Vec<Target>, String> = list
                    .split(',')
                    .map(|t| {
                        Target::parse(t.trim()).ok_or_else(|| format!("--targets: unknown `{t}`"))
                    })
                    .collect();
                o.targets = Some(targets?);
            }
            "--clients" => o.clients = Some(number(a, value(a)?)? as usize),
            "--rate" => o.rate = Some(number(a, value(a)?)?),
            "--seconds" => o.seconds = Some(number(a, value(a)?)?),
            "--messages" => o.messages = Some(number(a, value(a)?)? as u64),
            "--quick" => o.quick = true,
            "--patchbay" => o.patchbay = Some(PathBuf::from(value(a)?)),
            "--no-pin" => o.no_pin = true,
            "--repeat" => o.repeat = number(a, value(a)?)? as usize,
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown option `{other}`")),
        }
    }
    Ok(o)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(command) = args.first().cloned() else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    let rest = &args[1..];
    let fail = |e: String| {
        eprintln!("patchbay-bench: {e}");
        ExitCode::FAILURE
    };
    let (plan, ci): (Vec<Scenario>, bool) = match command.as_str() {
        "reference" => return reference::main(rest).map_or_else(fail, |()| ExitCode::SUCCESS),
        "floor" => return floor::main(rest).map_or_else(fail, |()| ExitCode::SUCCESS),
        "setup" => {
            return match socketio_dir(true).and_then(|s| Ok((s, tasks::bullmq_dir(true)?))) {
                Ok((socketio, bullmq)) => {
                    println!("Socket.IO server ready in {}", socketio.display());
                    println!("BullMQ ready in {}", bullmq.display());
                    ExitCode::SUCCESS
                }
                Err(e) => fail(e),
            };
        }
        "tasks" => {
            return match parse_opts(rest) {
                Ok(o) => run_tasks(&o).map_or_else(fail, |()| ExitCode::SUCCESS),
                Err(e) => fail(e),
            };
        }
        "tasks-instructions" => {
            return match parse_opts(rest) {
                Ok(o) => run_tasks_instructions(&o).map_or_else(fail, |()| ExitCode::SUCCESS),
                Err(e) => fail(e),
            };
        }
        "fanout" => (vec![Scenario::Fanout], false),
        "idle" => (vec![Scenario::Idle], false),
        "targeted" => (vec![Scenario::Targeted], false),
        "reqresp" => (vec![Scenario::ReqResp], false),
        "publish" => (vec![Scenario::Publish], false),
        "history" => (vec![Scenario::History], false),
        "storm" => (vec![Scenario::Storm], false),
        "sse" => (vec![Scenario::Sse], false),
        "emitter" => (vec![Scenario::Emitter], false),
        "redis-tls" => (vec![Scenario::RedisTls], false),
        "all" => (
            vec![
                Scenario::Fanout,
                Scenario::Idle,
                Scenario::Targeted,
                Scenario::ReqResp,
            ],
            false,
        ),
        "ci" => (vec![Scenario::Fanout, Scenario::ReqResp], true),
        "-h" | "--help" | "help" => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        other => {
            eprintln!("patchbay-bench: unknown command `{other}`\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let opts = match parse_opts(rest) {
        Ok(o) => o,
        Err(e) if e.is_empty() => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("patchbay-bench: {e}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    if plan.len() > 1
        && !ci
        && (opts.clients.is_some() || opts.rate.is_some() || opts.messages.is_some())
    {
        return fail("`all` takes --seconds, --quick and --targets; run one scenario to set --clients, --rate or --messages".into());
    }
    // Before any thread exists, so every thread of the load inherits core 1.
    let pinning = procs::Pinning::setup(!opts.no_pin);
    let nofile = rlimit::increase_nofile_limit(u64::MAX).unwrap_or(1024);
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(format!("cannot start the runtime: {e}")),
    };
    let line = format!("patchbay-bench {}", args.join(" "));
    match runtime.block_on(run(plan, ci, opts, pinning, nofile, line)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => fail(e),
    }
}

/// `patchbay-bench tasks`: both queues, one table.
fn run_tasks(o: &Opts) -> Result<(), String> {
    let jobs = o.messages.unwrap_or(100_000);
    let concurrency = o.clients.unwrap_or(50);
    let rate = o.rate.unwrap_or(1000.0);
    let seconds = o.seconds.unwrap_or(10.0);
    let bullmq = match tasks::bullmq_dir(false) {
        Ok(dir) => Some(dir),
        Err(e) => {
            eprintln!("BullMQ skipped: {e}");
            None
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let runs = runtime.block_on(tasks::run(
        bullmq.as_deref(),
        jobs,
        concurrency,
        rate,
        seconds,
    ))?;
    println!("{}", procs::machine());
    println!(
        "tasks: {jobs} no-op jobs, {concurrency} worker slots; latency at {rate} jobs/s for {seconds} s"
    );
    println!(
        "  {:<10} {:>10} {:>22} {:>12} {:>12}",
        "queue", "jobs/s", "Redis CPU us/job", "start p50", "start p99"
    );
    for (name, r) in &runs {
        println!(
            "  {:<10} {:>10.0} {:>22.1} {:>10.2}ms {:>10.2}ms",
            name, r.jobs_per_sec, r.redis_cpu_us_per_job, r.p50_ms, r.p99_ms
        );
    }
    if let [(_, pb), (_, bull)] = runs.as_slice() {
        println!(
            "  patchbay / BullMQ: {:.2}x the jobs/s, {:.2}x the Redis CPU per job, {:.2}x the p50, {:.2}x the p99",
            pb.jobs_per_sec / bull.jobs_per_sec,
            pb.redis_cpu_us_per_job / bull.redis_cpu_us_per_job,
            pb.p50_ms / bull.p50_ms,
            pb.p99_ms / bull.p99_ms
        );
    }
    Ok(())
}

/// `tasks-instructions`: Redis instructions per job, both queues, under callgrind.
fn run_tasks_instructions(o: &Opts) -> Result<(), String> {
    let jobs = o.messages.unwrap_or(2_000);
    let concurrency = o.clients.unwrap_or(50);
    let bullmq = tasks::bullmq_dir(false)
        .map_err(|e| eprintln!("BullMQ skipped: {e}"))
        .ok();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let counts = runtime.block_on(tasks::instructions(bullmq.as_deref(), jobs, concurrency))?;
    println!(
        "tasks-instructions: {jobs} no-op jobs, {concurrency} worker slots, Redis under callgrind"
    );
    for (name, per_job) in &counts {
        println!("  {name:<20} {per_job:>12.0} instructions per job");
    }
    if let [(_, pb), _, (_, bull)] = counts.as_slice() {
        println!(
            "  patchbay / BullMQ: {:.2}x the instructions per job",
            pb / bull
        );
    }
    Ok(())
}

/// The Socket.IO server's directory, its npm packages installed (when `install`, or on first
/// use).
fn socketio_dir(install: bool) -> Result<PathBuf, String> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("socketio");
    if !dir.join("server.js").is_file() {
        return Err(format!("{} has no server.js", dir.display()));
    }
    let works = |cmd: &str| {
        Command::new(cmd)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !works("node") {
        return Err("node is not installed (Node.js 18 or later is needed for Socket.IO)".into());
    }
    let installed = dir.join("node_modules/socket.io").is_dir()
        && dir.join("node_modules/@socket.io/redis-adapter").is_dir()
        && dir.join("node_modules/redis").is_dir();
    if installed && !install {
        return Ok(dir);
    }
    if !works("npm") {
        return Err("npm is not installed: cannot install socket.io".into());
    }
    eprintln!(
        "installing the Socket.IO server's packages (npm install) in {}",
        dir.display()
    );
    let status = Command::new("npm")
        .args(["install", "--no-audit", "--no-fund"])
        .current_dir(&dir)
        .status()
        .map_err(|e| format!("npm install: {e}"))?;
    if !status.success() {
        return Err(format!("npm install failed ({status})"));
    }
    Ok(dir)
}

struct Params {
    clients: usize,
    rate: f64,
    seconds: f64,
    messages: u64,
}

fn params(s: Scenario, o: &Opts, ci: bool) -> Params {
    let q = o.quick;
    let seconds = o.seconds.unwrap_or(if q { 5.0 } else { 10.0 });
    let (clients, rate) = match s {
        Scenario::Fanout if ci => (50, 20.0),
        Scenario::Fanout | Scenario::History | Scenario::RedisTls => {
            (if q { 500 } else { 2000 }, 20.0)
        }
        Scenario::Idle => (if q { 3000 } else { 15000 }, 0.0),
        // Same deliveries per second as the fan-out, for the p99 comparison.
        Scenario::Targeted => (
            if q { 2000 } else { 10000 },
            if q { 10000.0 } else { 40000.0 },
        ),
        Scenario::ReqResp if ci => (5, 50.0),
        Scenario::ReqResp => (100, 2000.0),
        Scenario::Publish => (0, 0.0),
        Scenario::Storm => (if q { 2000 } else { 10000 }, 0.0),
        Scenario::Sse => (if q { 500 } else { 2000 }, 20.0),
        Scenario::Emitter => (if q { 200 } else { 1000 }, 50.0),
    };
    let clients = o.clients.unwrap_or(clients);
    let rate = o.rate.unwrap_or(rate);
    let messages = match (s, ci) {
        (Scenario::Fanout, true) => o.messages.unwrap_or(10),
        (Scenario::Storm, _) => o.messages.unwrap_or(10),
        _ => o.messages.unwrap_or((rate * seconds).round() as u64),
    };
    let seconds = if ci && s == Scenario::ReqResp {
        1.0
    } else if s == Scenario::Storm {
        o.seconds.unwrap_or(5.0)
    } else {
        seconds
    };
    Params {
        clients,
        rate,
        seconds,
        messages,
    }
}

async fn run(
    plan: Vec<Scenario>,
    ci: bool,
    opts: Opts,
    pinning: procs::Pinning,
    nofile: u64,
    line: String,
) -> Result<bool, String> {
    let targets = opts.targets.clone().unwrap_or(if ci {
        vec![Target::Patchbay, Target::Reference]
    } else {
        vec![
            Target::Floor,
            Target::Patchbay,
            Target::Reference,
            Target::SocketIo,
        ]
    });
    let work_dir = std::env::temp_dir().join(format!("patchbay-bench-{}", std::process::id()));
    std::fs::create_dir_all(&work_dir).map_err(|e| e.to_string())?;
    scenarios::write_actions(&work_dir)?;
    let (_redis, redis_url) = procs::start_redis().await?;
    let wants_socketio = targets.contains(&Target::SocketIo)
        && plan
            .iter()
            .any(|s| matches!(s, Scenario::Fanout | Scenario::Idle));
    let socketio = if wants_socketio {
        socketio_dir(false)
    } else {
        Err("not requested".into())
    };
    let upstream = if plan.contains(&Scenario::ReqResp) {
        Some(client::start_upstream()?)
    } else {
        None
    };
    let ctx = Ctx {
        pinning,
        redis_url,
        patchbay: procs::find_patchbay(opts.patchbay.as_ref()),
        socketio_dir: socketio,
        work_dir: work_dir.clone(),
        upstream,
        ticks_per_sec: procs::clock_ticks(),
    };

    println!("command: {line}");
    println!("machine: {}", procs::machine());
    println!("pinning: {}", ctx.pinning.note);
    match &ctx.patchbay {
        Ok(p) => println!("patchbay: {}", p.display()),
        Err(e) => println!("patchbay: unavailable: {e}"),
    }
    if let (true, Err(e)) = (wants_socketio, &ctx.socketio_dir) {
        println!("socketio: unavailable: {e}");
    }
    println!();

    let mut ok = true;
    let mut fanout_p99: Option<(f64, u32)> = None;
    let mut checks: Vec<String> = Vec::new();
    for scenario in plan {
        let p = params(scenario, &opts, ci);
        if (p.clients as u64) + 256 > nofile {
            let msg = format!(
                "{} clients need about {} open files but the limit is {nofile}: raise the hard limit (ulimit -Hn, or LimitNOFILE / limits.conf) or use fewer --clients",
                p.clients,
                p.clients + 256
            );
            println!("{scenario:?}: skipped: {msg}\n");
            ok = false;
            continue;
        }
        match scenario {
            Scenario::Fanout | Scenario::Targeted => {
                let fan = scenario == Scenario::Fanout;
                let repeat = opts.repeat.max(1);
                let mut rounds = Vec::new();
                for round in 1..=repeat {
                    let mut runs: Vec<Result<DeliveryRun, (Target, String)>> = Vec::new();
                    for &t in &targets {
                        if (t == Target::SocketIo || t == Target::Floor) && !fan {
                            continue;
                        }
                        if t == Target::SocketIo && ctx.socketio_dir.is_err() {
                            runs.push(Err((t, "unavailable".into())));
                            continue;
                        }
                        eprintln!(
                            "  {} {} ...",
                            if fan { "fan-out" } else { "targeted" },
                            t.name()
                        );
                        let r = if fan {
                            scenarios::fanout(&ctx, t, p.clients, p.rate, p.messages).await
                        } else {
                            scenarios::targeted(&ctx, t, p.clients, p.rate, p.messages).await
                        };
                        runs.push(r.map_err(|e| (t, e)));
                    }
                    let round_note = if repeat > 1 {
                        format!(" — round {round} of {repeat}")
                    } else {
                        String::new()
                    };
                    let title = if fan {
                        format!(
                            "fan-out: {} clients in room `bench`, {} actions of {} bytes at {}/s ({} deliveries/s offered)",
                            p.clients,
                            p.messages,
                            scenarios::ACTION_BYTES,
                            p.rate,
                            p.rate * p.clients as f64
                        )
                    } else {
                        format!(
                            "targeted: {} clients each in dm:<i>, {} actions of {} bytes to random rooms at {}/s",
                            p.clients,
                            p.messages,
                            scenarios::ACTION_BYTES,
                            p.rate
                        )
                    };
                    println!("{}", delivery_table(&format!("{title}{round_note}"), &runs));
                    for r in &runs {
                        match r {
                            Ok(run) => {
                                if run.loss() > 0 || run.failed_connects > 0 || run.duplicates > 0 {
                                    ok = false;
                                }
                            }
                            Err((t, _)) if *t != Target::SocketIo => ok = false,
                            Err(_) => {}
                        }
                    }
                    if repeat == 1 {
                        checks.extend(delivery_checks(fan, &runs, &mut fanout_p99));
                    }
                    rounds.push(runs);
                }
                if repeat > 1 {
                    let (summary, round_checks) = rounds_summary(fan, &rounds, &mut fanout_p99);
                    println!("{summary}");
                    checks.extend(round_checks);
                }
            }
            Scenario::History => {
                let mut rows = Vec::new();
                for redis in [false, true] {
                    for history in [false, true] {
                        let bus = if redis { "Redis" } else { "the embedded bus" };
                        let kept = if history { "on" } else { "off" };
                        eprintln!("  fan-out on {bus}, history {kept} ...");
                        let run = scenarios::fanout_published(
                            &ctx, p.clients, p.rate, p.messages, history, redis,
                        )
                        .await;
                        match &run {
                            Ok(r)
                                if r.loss() == 0 && r.duplicates == 0 && r.failed_connects == 0 => {
                            }
                            _ => ok = false,
                        }
                        rows.push((redis, history, run));
                    }
                }
                println!(
                    "history: {} clients in room `bench`, {} actions of {} bytes at {}/s with POST /publish",
                    p.clients,
                    p.messages,
                    scenarios::ACTION_BYTES,
                    p.rate
                );
                println!(
                    "  {:<9} {:<14} {:>7} {:>8} {:>8} {:>7} {:>13}",
                    "bus", "room", "clients", "p50 µs", "p99 µs", "loss", "CPU µs/deliv"
                );
                let mut cpu = [[0.0f64; 2]; 2];
                for (redis, history, run) in &rows {
                    let bus = if *redis { "Redis" } else { "embedded" };
                    let name = if *history { "keeps history" } else { "plain" };
                    match run {
                        Ok(r) => {
                            cpu[usize::from(*redis)][usize::from(*history)] =
                                r.cpu_us_per_delivery();
                            println!(
                                "  {:<9} {:<14} {:>7} {:>8} {:>8} {:>7} {:>13.2}",
                                bus,
                                name,
                                r.clients,
                                r.latency.p50,
                                r.latency.p99,
                                r.loss(),
                                r.cpu_us_per_delivery()
                            );
                        }
                        Err(e) => println!("  {bus:<9} {name:<14} failed: {e}"),
                    }
                }
                for (i, bus) in ["embedded", "Redis"].iter().enumerate() {
                    if cpu[i][0] > 0.0 && cpu[i][1] > 0.0 {
                        println!(
                            "  {bus}: history / plain {:.2}x the CPU per delivery",
                            cpu[i][1] / cpu[i][0]
                        );
                    }
                }
            }
            Scenario::RedisTls => {
                let tls = procs::start_redis_tls(&ctx.work_dir).await;
                let (_tls_redis, plain, rediss, ca) = match tls {
                    Ok(t) => t,
                    Err(e) => {
                        println!("redis-tls: unavailable: {e}\n");
                        ok = false;
                        continue;
                    }
                };
                println!(
                    "redis-tls: {} clients in room `bench`, {} actions of {} bytes at {}/s with POST /publish, patchbay's bus on one redis-server's plain port, then its TLS port",
                    p.clients,
                    p.messages,
                    scenarios::ACTION_BYTES,
                    p.rate
                );
                println!(
                    "  {:<10} {:>7} {:>8} {:>8} {:>7} {:>13}",
                    "bus", "clients", "p50 µs", "p99 µs", "loss", "CPU µs/deliv"
                );
                let mut cpu = Vec::new();
                let ca = ca.display().to_string();
                for (name, url, extra) in [
                    ("redis://", plain.as_str(), vec![]),
                    (
                        "rediss://",
                        rediss.as_str(),
                        vec![("PATCHBAY_REDIS_CA_FILE", ca.as_str())],
                    ),
                ] {
                    eprintln!("  {name} ...");
                    let run = scenarios::fanout_published_on(
                        &ctx, p.clients, p.rate, p.messages, url, &extra,
                    )
                    .await;
                    match run {
                        Ok(r) => {
                            if r.loss() > 0 || r.failed_connects > 0 {
                                ok = false;
                            }
                            cpu.push(r.cpu_us_per_delivery());
                            println!(
                                "  {:<10} {:>7} {:>8} {:>8} {:>7} {:>13.2}",
                                name,
                                r.clients,
                                r.latency.p50,
                                r.latency.p99,
                                r.loss(),
                                r.cpu_us_per_delivery()
                            );
                        }
                        Err(e) => {
                            ok = false;
                            println!("  {name:<10} failed: {e}");
                        }
                    }
                }
                if let [plain, tls] = cpu[..] {
                    println!("  TLS / plain: {:.2}x the CPU per delivery", tls / plain);
                }
                println!();
            }
            Scenario::Sse => {
                let mut runs = Vec::new();
                for transport in ["websocket", "sse"] {
                    eprintln!("  {transport} ...");
                    match sse_bench::run(&ctx, transport, p.clients, p.rate, p.messages).await {
                        Ok(r) => {
                            if r.delivered < r.expected {
                                ok = false;
                            }
                            runs.push(r);
                        }
                        Err(e) => {
                            ok = false;
                            println!("  {transport} failed: {e}");
                        }
                    }
                }
                println!(
                    "sse: patchbay on its embedded bus, {} clients in room `bench`, {} actions of {} bytes at {}/s with POST /publish",
                    p.clients,
                    p.messages,
                    scenarios::ACTION_BYTES,
                    p.rate
                );
                println!(
                    "  {:<10} {:>7} {:>12} {:>10} {:>13}",
                    "transport", "clients", "idle KiB/conn", "loss", "CPU µs/deliv"
                );
                for r in &runs {
                    println!(
                        "  {:<10} {:>7} {:>12.1} {:>10} {:>13.2}",
                        r.transport,
                        r.clients,
                        r.idle_kib_per_connection,
                        r.expected.saturating_sub(r.delivered),
                        r.cpu_us_per_delivery
                    );
                }
                if let [ws, sse] = runs.as_slice() {
                    println!(
                        "  SSE / websocket: {:.2}x the idle memory, {:.2}x the CPU per delivery",
                        sse.idle_kib_per_connection / ws.idle_kib_per_connection.max(1e-9),
                        sse.cpu_us_per_delivery / ws.cpu_us_per_delivery.max(1e-9)
                    );
                }
                eprintln!("  SSE timings on two instances over Redis ...");
                match sse_bench::timings(&ctx, 200, 500).await {
                    Ok(t) => println!(
                        "  first byte of GET /sse ({} streams): p50 {} µs, p99 {} µs; a POST to the other instance answered on the stream ({} posts): p50 {} µs, p99 {} µs",
                        t.streams,
                        t.first_byte.p50,
                        t.first_byte.p99,
                        t.posts,
                        t.forwarded.p50,
                        t.forwarded.p99
                    ),
                    Err(e) => {
                        ok = false;
                        println!("  SSE timings failed: {e}");
                    }
                }
            }
            Scenario::Emitter => {
                eprintln!("  emitter ...");
                match emitter_bench::run(&ctx, p.clients, p.rate, p.messages).await {
                    Ok(r) => {
                        println!(
                            "emitter: patchbay on Redis, {} clients in room `bench`, {} actions of {} bytes at {}/s",
                            r.clients,
                            p.messages,
                            scenarios::ACTION_BYTES,
                            p.rate
                        );
                        println!(
                            "  {:<28} {:>10} {:>13}",
                            "published as", "loss", "CPU µs/deliv"
                        );
                        for v in &r.vias {
                            if v.delivered < v.expected {
                                ok = false;
                            }
                            println!(
                                "  {:<28} {:>10} {:>13.2}",
                                v.name,
                                v.expected.saturating_sub(v.delivered),
                                v.cpu_us_per_delivery
                            );
                        }
                        let h = &r.hostile;
                        if h.counted < h.messages {
                            ok = false;
                        }
                        println!(
                            "  hostile: {} messages (10,000 nested arrays, a length of 2^31, truncated, 60 KB binary), {} counted as dropped; {:.1} µs CPU per message",
                            h.messages, h.counted, h.cpu_us_per_message
                        );
                        println!(
                            "  memory: RSS {} KiB before, {} KiB after; peak {} KiB before, {} KiB after",
                            h.rss_before_kib, h.rss_after_kib, h.peak_before_kib, h.peak_after_kib
                        );
                    }
                    Err(e) => {
                        ok = false;
                        println!("  emitter failed: {e}");
                    }
                }
            }
            Scenario::Storm => {
                eprintln!("  reconnect storm ...");
                let window = std::time::Duration::from_secs_f64(p.seconds);
                match storm::storm(&ctx, p.clients, window, p.messages).await {
                    Ok(r) => {
                        if r.recovered < r.clients {
                            ok = false;
                        }
                        println!(
                            "storm: {} clients × 3 history rooms ({} rooms), {} missed actions per room, SUBSCRIBEs spread over {:.1} s, patchbay on Redis",
                            r.clients, r.rooms, r.missed, p.seconds
                        );
                        println!(
                            "  recovered {}/{} clients; SUBSCRIBE to last replayed action p50 {} µs, p99 {} µs, max {} µs",
                            r.recovered, r.clients, r.latency.p50, r.latency.p99, r.latency.max
                        );
                        println!(
                            "  history reads {} for {} room recoveries ({:.3} per room); patchbay CPU {:.2} s over {:.2} s ({:.0} µs per client)",
                            r.reads,
                            r.clients * 3,
                            r.reads as f64 / r.rooms as f64,
                            r.cpu_seconds,
                            r.elapsed.as_secs_f64(),
                            r.cpu_seconds * 1e6 / r.clients.max(1) as f64
                        );
                        if let Some(e) = r.first_error {
                            println!("  first error: {e}");
                        }
                    }
                    Err(e) => {
                        ok = false;
                        println!("storm failed: {e}");
                    }
                }
            }
            Scenario::Idle => {
                let mut runs: Vec<Result<IdleRun, (Target, String)>> = Vec::new();
                for &t in targets.iter().filter(|t| **t != Target::Floor) {
                    if t == Target::SocketIo && ctx.socketio_dir.is_err() {
                        runs.push(Err((t, "unavailable".into())));
                        continue;
                    }
                    eprintln!("  idle {} ...", t.name());
                    runs.push(
                        scenarios::idle(&ctx, t, p.clients)
                            .await
                            .map_err(|e| (t, e)),
                    );
                }
                println!("{}", idle_table(p.clients, &runs));
                for r in &runs {
                    match r {
                        Ok(run) if run.failed_connects > 0 => ok = false,
                        Err((t, _)) if *t != Target::SocketIo => ok = false,
                        _ => {}
                    }
                    if let Ok(run) = r
                        && run.target == Target::Patchbay
                    {
                        let kib = run.per_connection_kib();
                        checks.push(format!(
                            "idle memory: patchbay {kib:.1} KiB per connection: target <= 8 KiB {}, goal <= 4 KiB {}",
                            met(kib <= 8.0),
                            met(kib <= 4.0)
                        ));
                    }
                }
            }
            Scenario::Publish => {
                let mut table = String::from(
                    "publish: one POST /publish to many rooms; patchbay's peak RSS growth (VmHWM after - VmHWM before)\n  rooms   body      status   time     peak growth\n",
                );
                for (rooms, body_kib) in [(3000, 42), (10000, 145)] {
                    eprintln!("  publish {rooms} rooms x {body_kib} KB ...");
                    match scenarios::publish_wide(&ctx, rooms, body_kib * 1000).await {
                        Ok(r) => {
                            let _ = writeln!(
                                table,
                                "  {rooms:<7} {body_kib:>4} KB   {:<8} {:>5} ms  {:>7.1} MiB",
                                r.status,
                                r.elapsed.as_millis(),
                                r.peak_growth_kib as f64 / 1024.0
                            );
                            if r.status != 202 {
                                ok = false;
                            }
                        }
                        Err(e) => {
                            let _ = writeln!(table, "  {rooms:<7} {body_kib:>4} KB   failed: {e}");
                            ok = false;
                        }
                    }
                }
                println!("{table}");
            }
            Scenario::ReqResp => {
                // CI leaves the reference out: it would add more than 2 s for no check.
                let servers: Vec<Target> = [Target::Patchbay, Target::Reference]
                    .into_iter()
                    .filter(|t| targets.contains(t) && !(ci && *t == Target::Reference))
                    .collect();
                if servers.is_empty() {
                    println!("reqresp: skipped (only patchbay and the reference serve requests)\n");
                    continue;
                }
                eprintln!("  request/response direct ...");
                let direct = scenarios::reqresp(&ctx, None, p.clients, p.rate, p.seconds).await;
                let mut runs = Vec::new();
                for t in servers {
                    eprintln!("  request/response {} ...", t.name());
                    let r = scenarios::reqresp(&ctx, Some(t), p.clients, p.rate, p.seconds).await;
                    runs.push((t, r));
                }
                let title = format!(
                    "request/response: {} connections, {} requests/s in all, {} s measured after 1 s of warm-up",
                    p.clients, p.rate, p.seconds
                );
                println!("{}", reqresp_table(&title, &direct, &runs));
                let Ok(d) = &direct else {
                    ok = false;
                    continue;
                };
                if d.errors > 0 {
                    ok = false;
                }
                for (_, r) in &runs {
                    match r {
                        Ok(v) if v.errors == 0 && v.requests > 0 => {}
                        _ => ok = false,
                    }
                }
                let get = |t: Target| {
                    runs.iter()
                        .find_map(|(rt, r)| r.as_ref().ok().filter(|_| *rt == t))
                };
                if let Some(v) = get(Target::Patchbay) {
                    let added = v.latency.p50 as i64 - d.latency.p50 as i64;
                    let reference = get(Target::Reference).map_or(String::new(), |rf| {
                        format!(
                            ", the reference adds {} µs",
                            rf.latency.p50 as i64 - d.latency.p50 as i64
                        )
                    });
                    checks.push(format!(
                        "request/response: patchbay adds {added} µs at p50 ({} µs at p99) over the direct call at {:.0} requests/s{reference}: target <= 150 µs {}",
                        v.latency.p99 as i64 - d.latency.p99 as i64,
                        v.per_sec(),
                        met(added <= 150)
                    ));
                }
            }
        }
    }
    // The CI run is too small (and unoptimised) for the targets to mean anything.
    if !checks.is_empty() && !ci {
        println!("targets:");
        for c in &checks {
            println!("  - {c}");
        }
        println!();
    }
    if ok {
        let _ = std::fs::remove_dir_all(&work_dir);
    } else {
        println!("server logs kept in {}", work_dir.display());
    }
    if ci {
        println!("ci: {}", if ok { "ok, zero loss" } else { "FAILED" });
    }
    Ok(ok)
}

fn met(yes: bool) -> &'static str {
    if yes { "MET" } else { "NOT MET" }
}

fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 {
        format!("{:.2}x", a / b)
    } else {
        "-".into()
    }
}

/// Target `t`'s run among `runs`, if it ran.
fn run_of(runs: &[Result<DeliveryRun, (Target, String)>], t: Target) -> Option<&DeliveryRun> {
    runs.iter()
        .find_map(|r| r.as_ref().ok().filter(|run| run.target == t))
}

fn delivery_table(title: &str, runs: &[Result<DeliveryRun, (Target, String)>]) -> String {
    let reference = run_of(runs, Target::Reference);
    let mut out = format!("{title}\n");
    let _ = writeln!(
        out,
        "  {:<10} {:>7} {:>13} {:>8} {:>8} {:>8} {:>7} {:>7} {:>13} {:>11} {:>10}",
        "target",
        "clients",
        "deliveries/s",
        "p50 µs",
        "p99 µs",
        "max µs",
        "loss",
        "CPU %",
        "CPU µs/deliv",
        "CPU vs ref",
        "p99 vs ref"
    );
    for r in runs {
        match r {
            Ok(run) => {
                let (cpu_ratio, p99_ratio) = match &reference {
                    Some(rf) => (
                        ratio(run.cpu_us_per_delivery(), rf.cpu_us_per_delivery()),
                        ratio(run.latency.p99 as f64, rf.latency.p99 as f64),
                    ),
                    None => ("-".into(), "-".into()),
                };
                let _ = writeln!(
                    out,
                    "  {:<10} {:>7} {:>13.0} {:>8} {:>8} {:>8} {:>7} {:>7.1} {:>13.2} {:>11} {:>10}",
                    run.target.name(),
                    run.clients,
                    run.per_sec(),
                    run.latency.p50,
                    run.latency.p99,
                    run.latency.max,
                    run.loss(),
                    run.cpu_percent(),
                    run.cpu_us_per_delivery(),
                    cpu_ratio,
                    p99_ratio
                );
                let mut notes = Vec::new();
                if run.failed_connects > 0 {
                    notes.push(format!("{} clients failed to connect", run.failed_connects));
                }
                if run.duplicates > 0 {
                    notes.push(format!("{} duplicates", run.duplicates));
                }
                if run.dropped_connections > 0 {
                    notes.push(format!(
                        "{} connections closed by the server",
                        run.dropped_connections
                    ));
                }
                if !notes.is_empty() {
                    let _ = writeln!(out, "  {:<10} ({})", "", notes.join(", "));
                }
                let _ = writeln!(
                    out,
                    "  {:<10} ({} actions published, {} of {} deliveries in {:.2} s, server CPU {:.2} s)",
                    "",
                    run.published,
                    run.delivered,
                    run.expected,
                    run.window.as_secs_f64(),
                    run.cpu_seconds
                );
            }
            Err((t, e)) => {
                let _ = writeln!(out, "  {:<10} failed: {e}", t.name());
            }
        }
    }
    out
}

/// The median of `v` (the mean of the middle two for an even count).
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Several rounds of the same targets: each target's median CPU per delivery and p99, and
/// patchbay's ratios to the floor and to the reference as the median of each round's ratio
/// (both ran minutes apart at most, under the same conditions); the checks judged on those.
fn rounds_summary(
    fan: bool,
    rounds: &[Vec<Result<DeliveryRun, (Target, String)>>],
    fanout_p99: &mut Option<(f64, u32)>,
) -> (String, Vec<String>) {
    let mut out = format!(
        "over {} rounds (medians; a ratio is the median of the rounds' ratios)\n",
        rounds.len()
    );
    let _ = writeln!(
        out,
        "  {:<10} {:>5} {:>13} {:>15} {:>8} {:>10}",
        "target", "runs", "CPU µs/deliv", "(min - max)", "p99 µs", "loss (all)"
    );
    let targets: Vec<Target> = rounds
        .first()
        .map(|runs| {
            runs.iter()
                .map(|r| match r {
                    Ok(run) => run.target,
                    Err((t, _)) => *t,
                })
                .collect()
        })
        .unwrap_or_default();
    for &t in &targets {
        let runs: Vec<&DeliveryRun> = rounds.iter().filter_map(|r| run_of(r, t)).collect();
        if runs.is_empty() {
            let _ = writeln!(out, "  {:<10} {:>5}", t.name(), 0);
            continue;
        }
        let cpu: Vec<f64> = runs
            .iter()
            .copied()
            .map(DeliveryRun::cpu_us_per_delivery)
            .collect();
        let (lo, hi) = cpu
            .iter()
            .fold((f64::MAX, f64::MIN), |(lo, hi), c| (lo.min(*c), hi.max(*c)));
        let _ = writeln!(
            out,
            "  {:<10} {:>5} {:>13.2} {:>15} {:>8.0} {:>10}",
            t.name(),
            runs.len(),
            median(cpu),
            format!("({lo:.2} - {hi:.2})"),
            median(runs.iter().map(|r| f64::from(r.latency.p99)).collect()),
            runs.iter().copied().map(DeliveryRun::loss).sum::<u64>()
        );
    }
    let mut checks = Vec::new();
    let ratios = |other: Target, value: fn(&DeliveryRun) -> f64| -> Vec<f64> {
        rounds
            .iter()
            .filter_map(|r| {
                Some(value(run_of(r, Target::Patchbay)?) / value(run_of(r, other)?).max(1e-9))
            })
            .collect()
    };
    let list = |v: &[f64]| {
        v.iter()
            .map(|r| format!("{r:.2}x"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let cpu = DeliveryRun::cpu_us_per_delivery;
    let p99 = |r: &DeliveryRun| f64::from(r.latency.p99);
    let mut judge = |what: &str, other: &str, v: Vec<f64>, target: f64| {
        if v.is_empty() {
            return;
        }
        let m = median(v.clone());
        let kind = if fan { "fan-out" } else { "targeted" };
        checks.push(format!(
            "{kind}: patchbay {what} = {m:.2}x the {other}'s, median of {} rounds ({}): target <= {target}x {}",
            v.len(),
            list(&v),
            met(m <= target)
        ));
    };
    if fan {
        judge(
            "CPU per delivery",
            "floor",
            ratios(Target::Floor, cpu),
            1.25,
        );
        judge(
            "CPU per delivery",
            "reference",
            ratios(Target::Reference, cpu),
            1.1,
        );
    } else {
        judge("p99", "reference", ratios(Target::Reference, p99), 1.2);
    }
    let pb: Vec<&DeliveryRun> = rounds
        .iter()
        .filter_map(|r| run_of(r, Target::Patchbay))
        .collect();
    if !pb.is_empty() {
        // The rounds' medians stand for the scenario in the check that compares the two.
        let rate = median(pb.iter().copied().map(DeliveryRun::per_sec).collect());
        let p99 = median(pb.iter().map(|r| f64::from(r.latency.p99)).collect()) as u32;
        if fan {
            *fanout_p99 = Some((rate, p99));
        } else {
            checks.push(targeted_against_fanout(p99, rate, *fanout_p99));
        }
        let loss: u64 = pb.iter().copied().map(DeliveryRun::loss).sum();
        let expected: u64 = pb.iter().map(|r| r.expected).sum();
        checks.push(format!(
            "{}: patchbay loss {loss} of {expected} over {} rounds: zero loss {}",
            if fan { "fan-out" } else { "targeted" },
            pb.len(),
            met(loss == 0)
        ));
    }
    (out, checks)
}

/// Targeted delivery's p99 (`p99` µs at `rate` deliveries/s) against the fan-out's, when the
/// fan-out ran in the same invocation.
fn targeted_against_fanout(p99: u32, rate: f64, fanout: Option<(f64, u32)>) -> String {
    match fanout {
        Some((fan_rate, fan_p99)) => {
            let r = f64::from(p99) / f64::from(fan_p99.max(1));
            format!(
                "targeted: patchbay p99 {p99} µs at {rate:.0} deliveries/s = {r:.2}x the fan-out's {fan_p99} µs at {fan_rate:.0}/s: target <= 2x {}",
                met(r <= 2.0)
            )
        }
        None => format!(
            "targeted: patchbay p99 {p99} µs at {rate:.0} deliveries/s (run `all` to compare it with the fan-out's)"
        ),
    }
}

fn delivery_checks(
    fan: bool,
    runs: &[Result<DeliveryRun, (Target, String)>],
    fanout_p99: &mut Option<(f64, u32)>,
) -> Vec<String> {
    let get = |t: Target| run_of(runs, t);
    let mut checks = Vec::new();
    let Some(pb) = get(Target::Patchbay) else {
        return checks;
    };
    if fan {
        *fanout_p99 = Some((pb.per_sec(), pb.latency.p99));
        if let Some(floor) = get(Target::Floor) {
            let f = floor.cpu_us_per_delivery().max(1e-9);
            let r = pb.cpu_us_per_delivery() / f;
            checks.push(format!(
                "fan-out: patchbay CPU per delivery {:.2} µs = {r:.2}x the floor's {:.2} µs (one write() per delivery): target <= 1.25x {}",
                pb.cpu_us_per_delivery(),
                floor.cpu_us_per_delivery(),
                met(r <= 1.25)
            ));
            if let Some(rf) = get(Target::Reference) {
                checks.push(format!(
                    "fan-out: the reference's CPU per delivery {:.2} µs = {:.2}x the floor's",
                    rf.cpu_us_per_delivery(),
                    rf.cpu_us_per_delivery() / f
                ));
            }
        }
        if let Some(rf) = get(Target::Reference) {
            let r = pb.cpu_us_per_delivery() / rf.cpu_us_per_delivery().max(1e-9);
            checks.push(format!(
                "fan-out: patchbay CPU per delivery {:.2} µs = {r:.2}x the reference's {:.2} µs: target <= 1.1x {}",
                pb.cpu_us_per_delivery(),
                rf.cpu_us_per_delivery(),
                met(r <= 1.1)
            ));
        }
        if let Some(sio) = get(Target::SocketIo) {
            checks.push(format!(
                "fan-out: Socket.IO CPU per delivery {:.2} µs = {:.2}x patchbay's",
                sio.cpu_us_per_delivery(),
                sio.cpu_us_per_delivery() / pb.cpu_us_per_delivery().max(1e-9)
            ));
        }
        checks.push(format!(
            "fan-out: patchbay loss {} of {}: zero loss {}",
            pb.loss(),
            pb.expected,
            met(pb.loss() == 0)
        ));
    } else {
        checks.push(targeted_against_fanout(
            pb.latency.p99,
            pb.per_sec(),
            *fanout_p99,
        ));
        if let Some(rf) = get(Target::Reference) {
            let r = f64::from(pb.latency.p99) / f64::from(rf.latency.p99.max(1));
            checks.push(format!(
                "targeted: patchbay p99 {} µs = {r:.2}x the reference's {} µs: target <= 1.2x {}",
                pb.latency.p99,
                rf.latency.p99,
                met(r <= 1.2)
            ));
        }
        checks.push(format!(
            "targeted: patchbay loss {} of {}: zero loss {}",
            pb.loss(),
            pb.expected,
            met(pb.loss() == 0)
        ));
    }
    checks
}

fn idle_table(clients: usize, runs: &[Result<IdleRun, (Target, String)>]) -> String {
    let reference = runs.iter().find_map(|r| match r {
        Ok(run) if run.target == Target::Reference => Some(run.per_connection_kib()),
        _ => None,
    });
    let mut out = format!(
        "idle memory: {clients} connected, subscribed, silent connections (kernel: the machine's slab and TCP buffer memory, half its growth per connection: one end's share)\n"
    );
    let _ = writeln!(
        out,
        "  {:<10} {:>11} {:>13} {:>11} {:>13} {:>10} {:>16}",
        "target",
        "connections",
        "baseline MiB",
        "loaded MiB",
        "KiB per conn",
        "vs ref",
        "kernel KiB/conn"
    );
    for r in runs {
        match r {
            Ok(run) => {
                let _ = writeln!(
                    out,
                    "  {:<10} {:>11} {:>13.1} {:>11.1} {:>13.2} {:>10} {:>16.2}",
                    run.target.name(),
                    run.connections,
                    run.baseline_kib as f64 / 1024.0,
                    run.loaded_kib as f64 / 1024.0,
                    run.per_connection_kib(),
                    reference.map_or("-".into(), |rf| ratio(run.per_connection_kib(), rf)),
                    run.kernel_per_connection_kib()
                );
                if run.failed_connects > 0 {
                    let _ = writeln!(
                        out,
                        "  {:<10} ({} clients failed to connect)",
                        "", run.failed_connects
                    );
                }
            }
            Err((t, e)) => {
                let _ = writeln!(out, "  {:<10} failed: {e}", t.name());
            }
        }
    }
    out
}

fn reqresp_table(
    title: &str,
    direct: &Result<ReqRespRun, String>,
    via: &[(Target, Result<ReqRespRun, String>)],
) -> String {
    // Latency added over the direct call, at p50 and p99.
    let added = |run: &ReqRespRun| {
        direct.as_ref().ok().map(|d| {
            (
                run.latency.p50 as i64 - d.latency.p50 as i64,
                run.latency.p99 as i64 - d.latency.p99 as i64,
            )
        })
    };
    let reference = via.iter().find_map(|(t, r)| match r {
        Ok(run) if *t == Target::Reference => added(run),
        _ => None,
    });
    let mut out = format!("{title}\n");
    let _ = writeln!(
        out,
        "  {:<10} {:>10} {:>8} {:>8} {:>8} {:>7} {:>11} {:>10} {:>10} {:>13}",
        "path",
        "requests/s",
        "p50 µs",
        "p99 µs",
        "max µs",
        "errors",
        "CPU µs/req",
        "added p50",
        "added p99",
        "added vs ref"
    );
    let mut row = |label: &str, r: &Result<ReqRespRun, String>, extra: [String; 3]| match r {
        Ok(run) => {
            let cpu = run.cpu_seconds.map_or("-".to_string(), |c| {
                format!("{:.1}", c * 1e6 / run.requests.max(1) as f64)
            });
            let [add50, add99, vs_ref] = extra;
            let _ = writeln!(
                out,
                "  {:<10} {:>10.0} {:>8} {:>8} {:>8} {:>7} {:>11} {:>10} {:>10} {:>13}",
                run.label,
                run.per_sec(),
                run.latency.p50,
                run.latency.p99,
                run.latency.max,
                run.errors,
                cpu,
                add50,
                add99,
                vs_ref
            );
            if let Some(e) = &run.first_error {
                let _ = writeln!(out, "  {:<10} (first error: {e})", "");
            }
        }
        Err(e) => {
            let _ = writeln!(out, "  {label:<10} failed: {e}");
        }
    };
    let none = || ["-".to_string(), "-".to_string(), "-".to_string()];
    row("direct", direct, none());
    for (t, r) in via {
        let extra = match r.as_ref().ok().and_then(added) {
            Some((a50, a99)) => {
                let vs_ref = match reference {
                    Some((r50, _)) if *t == Target::Patchbay => ratio(a50 as f64, r50 as f64),
                    _ => "-".into(),
                };
                [a50.to_string(), a99.to_string(), vs_ref]
            }
            None => none(),
        };
        row(t.name(), r, extra);
    }
    out
}
