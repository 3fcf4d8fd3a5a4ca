//! The task queue on Redis under load: a thousand jobs while workers are SIGKILLed, ten
//! thousand jobs through twenty graceful worker restarts. In a file of their own so that they
//! run after the other Redis task tests, not beside them on the same cores.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::workers::*;
use common::*;
use serde_json::{Value, json};

#[tokio::test]
async fn soak_a_thousand_jobs_while_a_worker_is_killed_every_two_seconds() {
    let redis = RedisServer::start().await;
    let spec = json!({"queue": "q", "leaseMs": 1000, "maxAttempts": 5, "backoffMs": 50, "perUserLimit": 1_000_000});
    let _bridge = redis_bridge(&redis, spec.clone()).await; // the maintainer
    let q = queue_on(&redis).await;
    let dir = tempfile::tempdir().unwrap();
    let ran = dir.path().join("ran");
    let script = format!(
        r#"sleep 0.1$(( $$ % 5 )); echo $PATCHBAY_TASK_ID >> {}; echo '{{"result":1}}'"#,
        ran.display()
    );
    let mut workers: Vec<Proc> = (0..3).map(|_| worker(&redis, &script, 4)).collect();
    let ids = enqueue_many(&q, 1000, &queue_settings(spec)).await;
    let started = Instant::now();
    let mut kills = 0;
    let mut next_kill = Instant::now() + Duration::from_secs(2);
    loop {
        let s = stats(&redis).await;
        if s[4] + s[5] + s[7] >= 1000 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the soak finished: {s:?}"
        );
        if Instant::now() >= next_kill {
            let victim = (started.elapsed().as_millis() as usize) % workers.len();
            sigkill(&mut workers[victim]);
            workers[victim] = worker(&redis, &script, 4);
            kills += 1;
            next_kill += Duration::from_secs(2);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let s = stats(&redis).await;
    assert_eq!(
        (s[4], s[5], s[7]),
        (1000, 0, 0),
        "all succeeded, none failed or lost: {s:?}"
    );
    assert!(kills >= 1, "workers were killed during the soak");
    let mut conn = redis.connection().await.unwrap();
    for id in &ids {
        let json: String = redis::cmd("FCALL")
            .arg(&["patchbay_get", "1", &format!("patchbay:task:{id}"), "q", ""])
            .query_async(&mut conn)
            .await
            .unwrap();
        let task: Value = serde_json::from_str(&json).unwrap();
        assert_eq!(task["status"], "succeeded", "{task}");
    }
    // Every job ran at least once; those cut down by a kill ran again (at least once).
    let ran = std::fs::read_to_string(&ran).unwrap();
    let distinct: HashSet<&str> = ran.lines().collect();
    assert_eq!(distinct.len(), 1000);
    for w in &mut workers {
        let _ = w.kill();
        let _ = w.wait();
    }
}

#[tokio::test]
async fn ten_thousand_jobs_and_twenty_worker_restarts_leave_nothing_behind() {
    let redis = RedisServer::start().await;
    let spec =
        json!({"queue": "q", "leaseMs": 2000, "retentionSecs": 1, "perUserLimit": 1_000_000});
    let _bridge = redis_bridge(&redis, spec.clone()).await;
    let q = queue_on(&redis).await;
    // All queued first, then two workers of two slots each at ~10 ms a job: about half a
    // minute of work, long enough for twenty restarts in its midst.
    let ids = enqueue_many(&q, 10_000, &queue_settings(spec)).await;
    assert_eq!(ids.len(), 10_000);
    let job = "sleep 0.01";
    let mut workers: Vec<Proc> = (0..2).map(|_| worker(&redis, job, 2)).collect();
    let started = Instant::now();
    let mut restarts = 0;
    loop {
        let s = stats(&redis).await;
        if s[4] >= 10_000 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(180),
            "all ran: {s:?}"
        );
        // Graceful restarts (SIGTERM: jobs handed back), twenty in all, while jobs run.
        if restarts < 20 {
            let i = restarts % workers.len();
            reading(&redis, &workers[i]).await;
            signal(&workers[i], "-TERM");
            let status = workers[i].wait().unwrap();
            assert!(status.success(), "a worker exits 0 on SIGTERM: {status:?}");
            workers[i] = worker(&redis, job, 2);
            restarts += 1;
            continue;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(restarts, 20, "the restarts happened while jobs ran");
    let s = stats(&redis).await;
    assert_eq!((s[4], s[5], s[6], s[7]), (10_000, 0, 0, 0), "{s:?}");
    for w in &mut workers {
        reading(&redis, w).await;
        signal(w, "-TERM");
        assert!(w.wait().unwrap().success());
    }
    // Nothing pending, no consumer left by a worker, finished tasks expired.
    let pending: (i64, Option<String>, Option<String>, redis::Value) =
        redis_cmd(&redis, &["XPENDING", "patchbay:q:q", "workers"]).await;
    assert_eq!(pending.0, 0, "{pending:?}");
    let consumers: Vec<redis::Value> =
        redis_cmd(&redis, &["XINFO", "CONSUMERS", "patchbay:q:q", "workers"]).await;
    assert!(consumers.is_empty(), "no orphaned consumers: {consumers:?}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left: Vec<String> = redis_cmd(&redis, &["KEYS", "patchbay:task:*"]).await;
        if left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} tasks did not expire",
            left.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let xlen: i64 = redis_cmd(&redis, &["XLEN", "patchbay:q:q"]).await;
    assert_eq!(xlen, 0, "no entries left");
}
