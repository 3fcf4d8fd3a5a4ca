//! The task-queue scenario: no-op jobs through patchbay's Redis queue and through BullMQ, on
//! the same private Redis, one after the other (the database flushed in between).
//!
//! patchbay's side speaks the worker protocol of the README from Rust, as any worker would:
//! enqueues are the `patchbay_enqueue` function (what a `task` action calls), pipelined; each
//! worker slot reads with `XREADGROUP`, starts with `patchbay_start` and finishes with
//! `patchbay_succeed`. BullMQ's side is `bench/bullmq/bench.js` (`Queue.addBulk`, a `Worker`
//! with a no-op processor and the same concurrency). Measured: jobs enqueued and completed per
//! second, Redis CPU per job (the redis-server process's user + system time), and the
//! enqueue-to-start latency at a fixed rate.

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;

use crate::procs;

/// patchbay's task functions, exactly as patchbay loads them.
const FUNCTIONS: &str = include_str!("../../src/task/redis/functions.lua");
const QUEUE: &str = "bench";
const STREAM: &str = "patchbay:q:bench";

/// One side's numbers.
#[derive(Debug, Clone, Default)]
pub struct TasksRun {
    pub jobs_per_sec: f64,
    pub redis_cpu_us_per_job: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

/// Runs both sides; `jobs` for throughput, `rate` jobs/s for `seconds` for latency.
pub async fn run(
    bullmq_dir: Option<&Path>,
    jobs: u64,
    concurrency: usize,
    rate: f64,
    seconds: f64,
) -> Result<Vec<(&'static str, TasksRun)>, String> {
    let (mut redis, url) = procs::start_redis().await?;
    let ticks = procs::clock_ticks();
    let cpu = |pid| procs::cpu_ticks(pid) as f64 / ticks;
    let mut out = Vec::new();

    let conn = connect(&url).await?;
    load_functions(&conn).await?;
    let before = cpu(redis.pid());
    let (jobs_per_sec, _) = patchbay_side(&url, jobs, concurrency, None).await?;
    let used = cpu(redis.pid()) - before;
    let mut pb = TasksRun {
        jobs_per_sec,
        redis_cpu_us_per_job: used * 1e6 / jobs as f64,
        ..TasksRun::default()
    };
    cmd(&conn, &mut redis::cmd("FLUSHALL")).await?;
    load_functions(&conn).await?;
    let total = (rate * seconds).round() as u64;
    let (_, latencies) = patchbay_side(&url, total, concurrency, Some(rate)).await?;
    let p = crate::scenarios::percentiles(latencies.iter().map(|d| d.as_micros() as u32).collect());
    pb.p50_ms = p.p50 as f64 / 1000.0;
    pb.p99_ms = p.p99 as f64 / 1000.0;
    out.push(("patchbay", pb));
    redis.check_alive()?;

    if let Some(dir) = bullmq_dir {
        cmd(&conn, &mut redis::cmd("FLUSHALL")).await?;
        let before = cpu(redis.pid());
        let v = node(
            dir,
            &url,
            &["throughput", &jobs.to_string(), &concurrency.to_string()],
        )?;
        let used = cpu(redis.pid()) - before;
        let mut bull = TasksRun {
            jobs_per_sec: v["jobsPerSec"].as_f64().unwrap_or(0.0),
            redis_cpu_us_per_job: used * 1e6 / jobs as f64,
            ..TasksRun::default()
        };
        cmd(&conn, &mut redis::cmd("FLUSHALL")).await?;
        let v = node(
            dir,
            &url,
            &[
                "latency",
                &rate.to_string(),
                &seconds.to_string(),
                &concurrency.to_string(),
            ],
        )?;
        bull.p50_ms = v["p50Ms"].as_f64().unwrap_or(0.0);
        bull.p99_ms = v["p99Ms"].as_f64().unwrap_or(0.0);
        out.push(("bullmq", bull));
    }
    Ok(out)
}

/// Instructions redis-server executes per job, counted by valgrind's callgrind: each side's
/// throughput run (as in [`run`]) against its own Redis under callgrind, minus a run of the
/// same Redis that does no jobs. Unlike CPU time on a shared VM, the count is the same from
/// run to run. Sides without BullMQ installed are left out.
pub async fn instructions(
    bullmq_dir: Option<&Path>,
    jobs: u64,
    concurrency: usize,
) -> Result<Vec<(&'static str, f64)>, String> {
    let mut out = Vec::new();
    let pb = counted(Side::Patchbay, jobs, concurrency).await?;
    let pb_empty = counted(Side::Patchbay, 0, concurrency).await?;
    out.push(("patchbay", (pb - pb_empty) as f64 / jobs as f64));
    // The same with patchbay's default history settings written, as an instance does: each
    // step's TASK_PROGRESS is also appended to the task's room (reported apart: the issue's
    // target is for the queue's own commands).
    let history = counted(Side::PatchbayHistory, jobs, concurrency).await?;
    out.push((
        "patchbay, history on",
        (history - pb_empty) as f64 / jobs as f64,
    ));
    if let Some(dir) = bullmq_dir {
        let bull = counted(Side::Bullmq(dir), jobs, concurrency).await?;
        let empty = counted(Side::Bullmq(dir), 0, concurrency).await?;
        out.push(("bullmq", (bull - empty) as f64 / jobs as f64));
    }
    Ok(out)
}

enum Side<'a> {
    Patchbay,
    /// With `task:* user:*` kept in history.
    PatchbayHistory,
    Bullmq(&'a Path),
}

/// The instructions a Redis under callgrind executes from start to shutdown around `jobs`
/// jobs of `side` (none: only start-up, the library load and shutdown).
async fn counted(side: Side<'_>, jobs: u64, concurrency: usize) -> Result<u64, String> {
    let dir = std::env::temp_dir().join(format!("patchbay-bench-cg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let file = dir.join("callgrind.out");
    let _ = std::fs::remove_file(&file);
    let prefix: Vec<String> = [
        "valgrind",
        "--tool=callgrind",
        &format!("--callgrind-out-file={}", file.display()),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let (mut redis, url) = procs::start_redis_under(&prefix)
        .await
        .map_err(|e| format!("{e} (this needs valgrind: apt-get install valgrind)"))?;
    let conn = connect(&url).await?;
    if let Side::PatchbayHistory = side {
        let mut config = redis::cmd("HSET");
        config.arg("patchbay:history").arg(&[
            "rooms",
            "task:* user:*",
            "size",
            "100",
            "ttl",
            "300",
            "keep",
            "86400",
        ]);
        cmd(&conn, &mut config).await?;
    }
    if let Side::Patchbay | Side::PatchbayHistory = side {
        load_functions(&conn).await?;
        patchbay_side(&url, jobs, concurrency, None).await?;
    } else if let Side::Bullmq(dir) = side
        && jobs > 0
    {
        node(
            dir,
            &url,
            &["throughput", &jobs.to_string(), &concurrency.to_string()],
        )?;
    }
    // Callgrind writes its counts when Redis exits.
    let _ = cmd(&conn, redis::cmd("SHUTDOWN").arg("NOSAVE")).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while redis.child.try_wait().map_err(|e| e.to_string())?.is_none() {
        if Instant::now() > deadline {
            return Err("redis-server under callgrind did not exit".into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let text = std::fs::read_to_string(&file)
        .map_err(|e| format!("no callgrind output at {}: {e}", file.display()))?;
    let _ = std::fs::remove_dir_all(&dir);
    text.lines()
        .find_map(|l| {
            l.strip_prefix("totals:")
                .or_else(|| l.strip_prefix("summary:"))
        })
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .ok_or_else(|| "callgrind wrote no totals".to_string())
}

fn node(dir: &Path, url: &str, args: &[&str]) -> Result<serde_json::Value, String> {
    let out = Command::new("node")
        .arg(dir.join("bench.js"))
        .arg(url)
        .args(args)
        .output()
        .map_err(|e| format!("node: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "the BullMQ run failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().last().unwrap_or_default();
    serde_json::from_str(line).map_err(|e| format!("the BullMQ run printed `{line}`: {e}"))
}

async fn connect(url: &str) -> Result<MultiplexedConnection, String> {
    // A generous timeout: under callgrind Redis runs some fifty times slower.
    let config = redis::AsyncConnectionConfig::new()
        .set_response_timeout(Some(Duration::from_secs(120)))
        .set_connection_timeout(Some(Duration::from_secs(30)));
    redis::Client::open(url)
        .map_err(|e| e.to_string())?
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .map_err(|e| e.to_string())
}

/// Loads patchbay's task functions, as patchbay does at start-up.
async fn load_functions(conn: &MultiplexedConnection) -> Result<(), String> {
    let mut load = redis::cmd("FUNCTION");
    load.arg("LOAD").arg("REPLACE").arg(FUNCTIONS);
    cmd(conn, &mut load).await.map(drop)
}

async fn cmd(conn: &MultiplexedConnection, cmd: &mut redis::Cmd) -> Result<redis::Value, String> {
    let mut conn = conn.clone();
    cmd.query_async(&mut conn).await.map_err(|e| e.to_string())
}

/// Enqueues `jobs` (all at once, pipelined, or at `rate` per second) while `concurrency`
/// worker slots run them; returns jobs/s and each job's enqueue-to-start latency.
async fn patchbay_side(
    url: &str,
    jobs: u64,
    concurrency: usize,
    rate: Option<f64>,
) -> Result<(f64, Vec<Duration>), String> {
    let conn = connect(url).await?;
    cmd(
        &conn,
        redis::cmd("XGROUP").arg(&["CREATE", STREAM, "workers", "0", "MKSTREAM"]),
    )
    .await?;
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let enqueued: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let latencies: Arc<Mutex<Vec<Duration>>> = Arc::default();
    let reader = {
        let (url, done, stop) = (url.to_string(), done.clone(), stop.clone());
        let (enqueued, latencies) = (enqueued.clone(), latencies.clone());
        tokio::spawn(async move {
            worker(
                &url,
                "bench-worker",
                concurrency,
                done,
                stop,
                enqueued,
                latencies,
            )
            .await
        })
    };
    // What patchbay's maintainer does for the queue meanwhile: trim what workers are done with.
    let trimmer = {
        let (conn, stop) = (conn.clone(), stop.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let _ = cmd(
                    &conn,
                    redis::cmd("FCALL").arg(&["patchbay_trim", "1", STREAM]),
                )
                .await;
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        })
    };
    let started = Instant::now();
    let enqueue = |i: u64| {
        let mut c = redis::cmd("FCALL");
        c.arg("patchbay_enqueue")
            .arg(1)
            .arg(STREAM)
            .arg(QUEUE)
            .arg("")
            .arg("c:bench")
            .arg(format!("r{i}"))
            .arg("{}")
            .arg(format!("job-{i}"))
            .arg(&["3", "60000", "30000", "1000", "86400", "1000000"]);
        c
    };
    match rate {
        None => {
            for batch in (0..jobs).collect::<Vec<_>>().chunks(1000) {
                let mut pipe = redis::pipe();
                for &i in batch {
                    pipe.add_command(enqueue(i)).ignore();
                }
                let mut c = conn.clone();
                pipe.query_async::<()>(&mut c)
                    .await
                    .map_err(|e| format!("enqueue: {e}"))?;
            }
        }
        Some(rate) => {
            let every = Duration::from_secs_f64(1.0 / rate);
            let t0 = tokio::time::Instant::now();
            for i in 0..jobs {
                tokio::time::sleep_until(t0 + every * i as u32).await;
                enqueued
                    .lock()
                    .unwrap()
                    .insert(format!("job-{i}"), Instant::now());
                cmd(&conn, &mut enqueue(i)).await?;
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while done.load(Ordering::Relaxed) < jobs {
        if Instant::now() > deadline {
            return Err(format!(
                "only {} of {jobs} jobs completed",
                done.load(Ordering::Relaxed)
            ));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    reader.await.map_err(|e| e.to_string())??;
    let _ = trimmer.await;
    let latencies = std::mem::take(&mut *latencies.lock().unwrap());
    Ok((jobs as f64 / elapsed, latencies))
}

/// One worker, as `patchbay worker --concurrency N` is: one reader asking for as many
/// entries as it has free slots, each job started and finished on a shared connection — the
/// README's protocol, one command per step.
async fn worker(
    url: &str,
    consumer: &str,
    concurrency: usize,
    done: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    enqueued: Arc<Mutex<HashMap<String, Instant>>>,
    latencies: Arc<Mutex<Vec<Duration>>>,
) -> Result<(), String> {
    let mut reader = connect(url).await?;
    let steps = connect(url).await?;
    let slots = Arc::new(tokio::sync::Semaphore::new(concurrency));
    type Reply = Option<Vec<(String, Vec<(String, Vec<String>)>)>>;
    while !stop.load(Ordering::Relaxed) {
        let free = slots.available_permits().max(1);
        let permits = slots
            .clone()
            .acquire_many_owned(1)
            .await
            .map_err(|e| e.to_string())?;
        drop(permits);
        let reply: Reply = redis::cmd("XREADGROUP")
            .arg(&["GROUP", "workers", consumer, "COUNT"])
            .arg(free)
            .arg(&["BLOCK", "100", "STREAMS", STREAM, ">"])
            .query_async(&mut reader)
            .await
            .map_err(|e| format!("read: {e}"))?;
        for (entry, fields) in reply.into_iter().flatten().flat_map(|(_, e)| e) {
            let permit = slots
                .clone()
                .acquire_owned()
                .await
                .map_err(|e| e.to_string())?;
            let mut conn = steps.clone();
            let (done, enqueued, latencies) = (done.clone(), enqueued.clone(), latencies.clone());
            let consumer = consumer.to_string();
            tokio::spawn(async move {
                let id = fields.get(1).cloned().unwrap_or_default();
                let key = format!("patchbay:task:{id}");
                let started: Option<(String, String, u64, u64)> = redis::cmd("FCALL")
                    .arg(&["patchbay_start", "2", &key, STREAM, &entry, &consumer])
                    .query_async(&mut conn)
                    .await
                    .expect("start");
                if let Some((_, token, _, _)) = started {
                    if let Some(at) = enqueued.lock().unwrap().remove(&id) {
                        latencies.lock().unwrap().push(at.elapsed());
                    }
                    let _: String = redis::cmd("FCALL")
                        .arg(&["patchbay_succeed", "1", &key, &token, "null"])
                        .query_async(&mut conn)
                        .await
                        .expect("succeed");
                    done.fetch_add(1, Ordering::Relaxed);
                }
                drop(permit);
            });
        }
    }
    Ok(())
}

/// `bench/bullmq` with its npm packages installed, or why not.
pub fn bullmq_dir(install: bool) -> Result<std::path::PathBuf, String> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("bullmq");
    if dir.join("node_modules/bullmq").is_dir() && !install {
        return Ok(dir);
    }
    let status = Command::new("npm")
        .args(["install", "--no-audit", "--no-fund", "--silent"])
        .current_dir(&dir)
        .status()
        .map_err(|e| format!("npm install (BullMQ): {e}"))?;
    if !status.success() {
        return Err(format!("npm install (BullMQ) failed ({status})"));
    }
    Ok(dir)
}
