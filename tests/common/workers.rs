//! Helpers for the task tests on Redis: bridges on a private Redis, `patchbay worker`
//! processes that die with the test, and the queue's functions called directly.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use patchbay::task::{Queue, RedisQueue};
use serde_json::{Value, json};

use super::tasks::task_manifest;
use super::{Bridge, RedisServer, with_jwt};

/// A bridge on `redis` with the JWT auth of the tests and `task` as queue `q`'s spec.
pub async fn redis_bridge(redis: &RedisServer, task: Value) -> Bridge {
    let url = redis.url();
    Bridge::start(&task_manifest(task), None, move |c| {
        with_jwt(c);
        c.redis_url = Some(url);
    })
    .await
}

/// Queue `q`'s settings without a command: jobs are for `patchbay worker` processes.
pub fn queue_only(settings: Value) -> Value {
    let mut task = json!({"queue": "q", "leaseMs": 2000, "backoffMs": 100});
    task.as_object_mut()
        .unwrap()
        .extend(settings.as_object().unwrap().clone());
    task
}

/// A worker process, killed when dropped (a failing test leaves none behind).
pub struct Proc(pub Child);

impl std::ops::Deref for Proc {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Proc {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Polls user 7's task `id` straight from Redis until it has succeeded; returns it.
pub async fn succeeded_within(redis: &RedisServer, id: &str, limit: Duration) -> Value {
    let start = Instant::now();
    loop {
        let json: Option<String> = match redis.connection().await {
            Ok(mut conn) => redis::cmd("FCALL")
                .arg(&[
                    "patchbay_get",
                    "1",
                    &format!("patchbay:task:{id}"),
                    "q",
                    "7",
                ])
                .query_async(&mut conn)
                .await
                .ok(),
            Err(_) => None,
        };
        if let Some(task) = json.and_then(|j| serde_json::from_str::<Value>(&j).ok())
            && task["status"] == "succeeded"
        {
            return task;
        }
        assert!(
            start.elapsed() < limit,
            "task {id} succeeded within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A private Redis that writes every change to its append-only file in `dir`, so a restart
/// keeps everything.
pub async fn persistent_redis(dir: &std::path::Path) -> RedisServer {
    let dir = dir.to_str().unwrap();
    let args = [
        "--appendonly",
        "yes",
        "--appendfsync",
        "always",
        "--dir",
        dir,
    ];
    RedisServer::start_with(&args, None).await
}

/// A `patchbay worker` process for queue `q` running `script` under `/bin/sh -c`.
pub fn worker(redis: &RedisServer, script: &str, concurrency: u32) -> Proc {
    Proc(
        Command::new(env!("CARGO_BIN_EXE_patchbay"))
            .args(["worker", "--queue", "q", "--concurrency"])
            .arg(concurrency.to_string())
            .args(["--grace-ms", "300", "--", "/bin/sh", "-c", script])
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("PATCHBAY_REDIS_URL", redis.url())
            .env("PATCHBAY_LOG", "warn")
            .current_dir(std::env::temp_dir())
            .stdout(Stdio::null())
            .spawn()
            .expect("the patchbay binary runs"),
    )
}

/// Waits until worker `w` reads its queue (its blocking connection, named `<pid>-…`, is
/// there): its signal handlers are installed by then.
pub async fn reading(redis: &RedisServer, w: &Child) {
    let prefix = format!("{}-", w.id());
    let start = Instant::now();
    loop {
        let clients: String = redis_cmd(redis, &["CLIENT", "LIST"]).await;
        if clients.contains(&format!("name={prefix}")) {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "worker {} reads its queue",
            w.id()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn sigkill(child: &mut Child) {
    child.kill().unwrap();
    child.wait().unwrap();
}

pub fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
}

/// The parent of process `pid`.
pub fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// Polls until `f` is true, failing after `limit`.
pub async fn eventually(limit: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < limit, "{what} within {limit:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub async fn redis_cmd<T: redis::FromRedisValue>(redis: &RedisServer, args: &[&str]) -> T {
    let mut conn = redis.connection().await.unwrap();
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    cmd.query_async(&mut conn).await.unwrap()
}

/// A queue on `redis` with the task functions loaded and `q`'s group created.
pub async fn queue_on(redis: &RedisServer) -> RedisQueue {
    let q = RedisQueue::open(&redis.url(), "patchbay").unwrap();
    q.load_functions().await.unwrap();
    q.create_group("q").await.unwrap();
    q
}

pub fn settings() -> patchbay::task::QueueSettings {
    let spec = json!({"queue": "q", "leaseMs": 1000, "backoffMs": 0, "perUserLimit": 1_000_000});
    match patchbay::task::parse(&spec).unwrap() {
        patchbay::registry::Handler::Task(t) => t.settings.unwrap(),
        _ => unreachable!(),
    }
}

pub async fn enqueue(q: &RedisQueue, rid: &str) -> String {
    let s = settings();
    q.enqueue(patchbay::task::NewJob {
        queue: "q",
        settings: &s,
        owner: Some("7"),
        scope: "u:7",
        request_id: rid,
        params: json!({}),
    })
    .await
    .unwrap()
    .id
}

/// Enqueues `n` anonymous jobs on `q` straight through the queue (the same function an
/// enqueue action calls); returns their ids.
pub async fn enqueue_many(
    q: &RedisQueue,
    n: usize,
    settings: &patchbay::task::QueueSettings,
) -> Vec<String> {
    let mut ids = Vec::with_capacity(n);
    for i in 0..n {
        let task = q
            .enqueue(patchbay::task::NewJob {
                queue: "q",
                settings,
                owner: None,
                scope: "c:soak",
                request_id: &format!("soak-{i}"),
                params: json!({"i": i}),
            })
            .await
            .unwrap();
        ids.push(task.id);
    }
    ids
}

pub fn queue_settings(spec: Value) -> patchbay::task::QueueSettings {
    match patchbay::task::parse(&spec).unwrap() {
        patchbay::registry::Handler::Task(t) => t.settings.unwrap(),
        _ => unreachable!(),
    }
}

/// `patchbay_stats` of queue `q`: queued, running, delayed, workers, succeeded, failed,
/// cancelled, lost.
pub async fn stats(redis: &RedisServer) -> Vec<i64> {
    redis_cmd(redis, &["FCALL", "patchbay_stats", "1", "patchbay:q:q"]).await
}
