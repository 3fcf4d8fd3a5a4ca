//! The task manager on Redis, against private `redis-server`s: patchbay instances and
//! `patchbay worker` processes sharing queues, workers killed, paused and restarted, Redis
//! restarted, and the known pitfalls of queues on Redis streams, each pinned by a test.

mod common;

use std::collections::HashSet;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::tasks::*;
use common::workers::*;
use common::*;
use patchbay::task::{ErrorCode, Finish, Queue, QueueError, TaskError};
use serde_json::{Value, json};

#[tokio::test]
async fn jobs_run_on_redis_and_every_change_reaches_the_user() {
    let redis = RedisServer::start().await;
    let script = r#"read -r job; echo '{"progress":{"percent":50}}'; sleep 0.3; echo '{"result":{"n":12345678901234567890,"empty":[]}}'"#;
    let bridge = redis_bridge(&redis, sh_task(script, json!({}))).await;
    let mut client = connect_as(&bridge, "7").await;
    // Another tab of the same user, in no task room: it hears through `user:7`.
    let mut tab = connect_as(&bridge, "7").await;
    let reply = start_job(
        &mut client,
        json!({"list": [], "big": 12345678901234567890u64}),
    )
    .await;
    let id = id_of(&reply);
    assert_eq!(reply["meta"]["subscribed"], format!("task:{id}"));
    assert_eq!(
        reply["payload"]["params"]["list"],
        json!([]),
        "params kept exactly"
    );
    let snapshot = client.recv().await;
    assert_eq!(snapshot["type"], "TASK_PROGRESS", "{snapshot}");
    let seen = until_final(&mut client, &id).await;
    let end = &seen.last().unwrap()["payload"];
    assert_eq!(end["status"], "succeeded");
    assert_eq!(end["attempts"], 1);
    assert_eq!(end["progress"], json!({"percent": 50}));
    assert_eq!(
        end["result"].to_string(),
        r#"{"empty":[],"n":12345678901234567890}"#,
        "the result kept exactly"
    );
    loop {
        let m = tab.recv().await;
        if m["payload"]["status"] == "succeeded" {
            assert_eq!(m["meta"]["room"], "user:7");
            break;
        }
    }
    let listed = client.request("JOBS_LIST", json!({})).await;
    assert_eq!(listed["payload"]["tasks"][0]["id"], id.as_str(), "{listed}");
    let got = client.request("JOB_GET", json!({"id": id})).await;
    assert_eq!(got["payload"]["status"], "succeeded");
    let mut bob = connect_as(&bridge, "bob").await;
    let got = bob.request("JOB_GET", json!({"id": id})).await;
    assert_failure(&got, "JOB_GET", "not_found");
    let again = client.request("JOB_CANCEL", json!({"id": id})).await;
    assert_failure(&again, "JOB_CANCEL", "conflict");
    // The queue's counts come from Redis: finished tasks and the group's consumers.
    let want = [
        r#"patchbay_queue_finished_tasks{queue="q",status="succeeded"} 1"#,
        r#"patchbay_queue_workers{queue="q"} 1"#,
    ];
    metrics_show(&bridge, &want).await;
}

#[tokio::test]
async fn a_fast_jobs_room_says_nothing_before_the_success_and_ends_on_its_final_state() {
    let redis = RedisServer::start().await;
    let bridge = redis_bridge(&redis, sh_task(FAST_JOB, json!({}))).await;
    assert_fast_jobs_in_order(&bridge).await;
}

#[tokio::test]
async fn enqueue_is_idempotent_across_instances() {
    let redis = RedisServer::start().await;
    let task = queue_only(json!({}));
    let a = redis_bridge(&redis, task.clone()).await;
    let b = redis_bridge(&redis, task).await;
    let mut clients = Vec::new();
    for i in 0..10 {
        clients.push(connect_as(if i % 2 == 0 { &a } else { &b }, "7").await);
    }
    let send = json!({"type": "JOB_START_REQUEST", "payload": {}, "meta": {"requestId": "one-id"}});
    for client in &mut clients {
        for _ in 0..10 {
            client.send(send.clone()).await;
        }
    }
    let mut ids = HashSet::new();
    for client in &mut clients {
        let mut answered = 0;
        while answered < 10 {
            let m = client.recv().await;
            assert_ne!(m["type"], "JOB_START_FAILURE", "{m}");
            if m["type"] == "JOB_START_SUCCESS" {
                ids.insert(id_of(&m));
                answered += 1;
            }
        }
    }
    assert_eq!(ids.len(), 1, "100 enqueues, one task: {ids:?}");
    let mut other = connect_as(&b, "8").await;
    let theirs = id_of(&start_job(&mut other, json!({})).await);
    assert!(!ids.contains(&theirs), "another user, another task");
}

#[tokio::test]
async fn a_sigkilled_worker_loses_its_job_to_another_within_the_lease() {
    let redis = RedisServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let pids = dir.path().join("pids");
    // The first attempt notes its pid and hangs; the second succeeds at once.
    let script = format!(
        r#"if [ "$PATCHBAY_TASK_ATTEMPT" = 1 ]; then echo $$ > {p}; echo '{{"progress":{{"started":1}}}}'; sleep 60; fi; echo '{{"result":"done"}}'"#,
        p = pids.display()
    );
    let bridge = redis_bridge(&redis, queue_only(json!({"leaseMs": 2000}))).await;
    let mut workers = vec![worker(&redis, &script, 1), worker(&redis, &script, 1)];
    let mut client = connect_as(&bridge, "7").await;
    let id = id_of(&start_job(&mut client, json!({})).await);
    until_progress(&mut client, "started").await;
    let child: u32 = std::fs::read_to_string(&pids)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let holder = parent_of(child).unwrap();
    let index = workers.iter().position(|w| w.id() == holder).unwrap();
    let killed_at = Instant::now();
    sigkill(&mut workers[index]);
    eventually(
        Duration::from_secs(1),
        "the job's process dies with its worker",
        || !alive(child),
    )
    .await;
    let seen = until_final(&mut client, &id).await;
    let elapsed = killed_at.elapsed();
    let end = &seen.last().unwrap()["payload"];
    assert_eq!(end["status"], "succeeded", "{end}");
    assert_eq!(end["attempts"], 2);
    assert_eq!(end["result"], "done");
    assert!(
        elapsed < Duration::from_millis(2000 + 2000),
        "the next attempt within leaseMs + 2 s: {elapsed:?}"
    );
    let finals = seen
        .iter()
        .filter(|m| m["payload"]["status"] == "succeeded")
        .count();
    assert_eq!(finals, 1, "one final TASK_PROGRESS");
    for w in &mut workers {
        let _ = w.kill();
        let _ = w.wait();
    }
}

#[tokio::test]
async fn a_worker_paused_past_its_lease_is_refused_when_it_wakes() {
    let redis = RedisServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let pids = dir.path().join("pids");
    // Attempt 1 reports, then works for a while; attempt 2 is quick. Each result says which.
    let script = format!(
        r#"if [ "$PATCHBAY_TASK_ATTEMPT" = 1 ]; then echo $$ > {p}; echo '{{"progress":{{"started":1}}}}'; sleep 10; fi; echo "{{\"result\":$PATCHBAY_TASK_ATTEMPT}}""#,
        p = pids.display()
    );
    // A lease long enough that a busy machine (the whole suite runs in parallel) never lets it
    // lapse before the worker is paused on purpose.
    let bridge = redis_bridge(&redis, queue_only(json!({"leaseMs": 3000}))).await;
    let mut workers = vec![worker(&redis, &script, 1), worker(&redis, &script, 1)];
    let mut client = connect_as(&bridge, "7").await;
    let id = id_of(&start_job(&mut client, json!({})).await);
    until_progress(&mut client, "started").await;
    let child: u32 = std::fs::read_to_string(&pids)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let holder = parent_of(child).expect("attempt 1 still runs");
    let index = workers.iter().position(|w| w.id() == holder).unwrap();
    signal(&workers[index], "-STOP");
    let seen = until_final(&mut client, &id).await;
    let end = seen.last().unwrap()["payload"].clone();
    assert_eq!(
        (end["status"].as_str(), end["result"].as_i64()),
        (Some("succeeded"), Some(2)),
        "{end}"
    );
    signal(&workers[index], "-CONT");
    // The paused worker wakes with a stale lease: whatever it reports (its job ends by 10 s)
    // is refused.
    eventually(Duration::from_secs(15), "attempt 1's process ends", || {
        !alive(child)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let got = client.request("JOB_GET", json!({"id": id})).await;
    assert_eq!(got["payload"], end, "the late finish changed nothing");
    for _ in 0..3 {
        let m = tokio::time::timeout(Duration::from_millis(200), client.recv()).await;
        if let Ok(m) = m {
            assert_ne!(
                m["payload"]["id"],
                id.as_str(),
                "no change after the end: {m}"
            );
        }
    }
    for w in &mut workers {
        let _ = w.kill();
        let _ = w.wait();
    }
}

#[tokio::test]
async fn failing_jobs_fail_after_their_attempts_and_worker_killers_are_lost() {
    let redis = RedisServer::start().await;
    // Always fails: three attempts with growing delays, then failed.
    let failing = redis_bridge(
        &redis,
        // Each attempt runs a moment, so its start is seen (live, or in the snapshot).
        sh_task(
            "sleep 0.3; exit 1",
            json!({"maxAttempts": 3, "backoffMs": 200}),
        ),
    )
    .await;
    let mut client = connect_as(&failing, "7").await;
    let id = id_of(&start_job(&mut client, json!({})).await);
    let mut started = Vec::new();
    let end = loop {
        let m = client.recv().await;
        if m["payload"]["id"] != id.as_str() || m["meta"]["room"] != format!("task:{id}") {
            continue;
        }
        let p = &m["payload"];
        if p["status"] == "running" && p["attempts"].as_u64().unwrap() as usize > started.len() {
            started.push(Instant::now());
        }
        if p["status"] == "failed" {
            break p.clone();
        }
    };
    assert_eq!(end["attempts"], 3);
    assert_eq!(end["error"]["code"], "failed");
    assert_eq!(started.len(), 3);
    let (first, second) = (started[1] - started[0], started[2] - started[1]);
    assert!(
        first >= Duration::from_millis(150) && second >= Duration::from_millis(300),
        "{first:?} {second:?}"
    );
    assert!(second > first, "growing delays");
    drop(client);
    drop(failing);

    // Kills its worker every time: handed out three times, then lost, never looping.
    let redis = RedisServer::start().await;
    let killers = redis_bridge(
        &redis,
        queue_only(json!({"maxAttempts": 3, "leaseMs": 1000})),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let starts = dir.path().join("starts");
    let script = format!("echo x >> {}; kill -9 $PPID; sleep 5", starts.display());
    let mut client = connect_as(&killers, "7").await;
    let id = id_of(&start_job(&mut client, json!({})).await);
    let mut current = worker(&redis, &script, 1);
    let end = loop {
        // A supervisor's job: start a worker again whenever one died.
        if let Ok(Some(_)) = current.try_wait() {
            current = worker(&redis, &script, 1);
        }
        match tokio::time::timeout(Duration::from_millis(100), client.recv()).await {
            Ok(m) if m["payload"]["id"] == id.as_str() && m["payload"]["status"] == "lost" => {
                break m["payload"].clone();
            }
            _ => {}
        }
    };
    assert_eq!(end["attempts"], 3);
    assert_eq!(end["error"]["code"], "worker_lost");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let deliveries = std::fs::read_to_string(&starts).unwrap().lines().count();
    assert_eq!(deliveries, 3, "three deliveries, no more");
    let _ = current.kill();
    let _ = current.wait();
}

#[tokio::test]
async fn redis_restarts_do_not_stop_workers_and_queued_jobs_survive_with_persistence() {
    let dir = tempfile::tempdir().unwrap();
    let mut redis = persistent_redis(dir.path()).await;
    let bridge = redis_bridge(&redis, queue_only(json!({"leaseMs": 2000}))).await;
    let mut w = worker(&redis, r#"echo '{"result":1}'"#, 2);
    let mut client = connect_as(&bridge, "7").await;
    // The worker works before the restart.
    let first = id_of(&start_job(&mut client, json!({})).await);
    let end = until_final(&mut client, &first).await;
    assert_eq!(end.last().unwrap()["payload"]["status"], "succeeded");

    redis.kill();
    let refused = client.request("JOB_START", json!({})).await;
    assert_failure(&refused, "JOB_START", "upstream_unavailable");
    // A job queued straight into Redis's persisted state while the worker cannot see it:
    // stop the worker, restart Redis, enqueue, restart Redis again.
    redis.restart().await;
    signal(&w, "-STOP");
    let queued = loop {
        let r = client.request("JOB_START", json!({})).await;
        if r["type"] == "JOB_START_SUCCESS" {
            break id_of(&r);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    redis.kill();
    redis.restart().await;
    let back = Instant::now();
    signal(&w, "-CONT");
    // The job queued before the outage runs once Redis is back, on the same worker process.
    succeeded_within(&redis, &queued, Duration::from_secs(10)).await;
    assert!(
        back.elapsed() < Duration::from_secs(2),
        "consumed again soon after Redis came back: {:?}",
        back.elapsed()
    );
    assert!(
        w.try_wait().unwrap().is_none(),
        "the worker never restarted"
    );
    sigkill(&mut w);
}

#[tokio::test]
async fn pitfall_a_finish_by_a_worker_that_lost_its_lease_is_refused() {
    // XACK alone would succeed for a worker that no longer holds the job; the lease token
    // fences every report.
    let redis = RedisServer::start().await;
    let q = queue_on(&redis).await;
    let id = enqueue(&q, "r").await;
    let lease = q
        .take("q", "w1", Duration::from_secs(1))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(lease.task.id, id);
    // The lease lapses; the maintainer gives the job its next attempt.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let reaped: i64 = redis_cmd(
        &redis,
        &["FCALL", "patchbay_reap", "1", "patchbay:leases:q", "60000"],
    )
    .await;
    assert_eq!(reaped, 1);
    let second = q
        .take("q", "w2", Duration::from_secs(1))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(second.task.attempts, 2);
    let late = q
        .finish(&id, lease.token, Finish::Succeeded(json!(1)))
        .await;
    assert_eq!(late.unwrap_err(), QueueError::StaleLease);
    assert_eq!(
        q.renew(&id, lease.token).await.unwrap_err(),
        QueueError::StaleLease
    );
    let done = q
        .finish(&id, second.token, Finish::Succeeded(json!(2)))
        .await
        .unwrap();
    assert_eq!(done.result, Some(json!(2)));
}

#[tokio::test]
async fn pitfall_after_an_outage_longer_than_a_lease_running_jobs_are_not_reaped_at_once() {
    // Every lease looks lapsed after a long outage; a lease is judged only once the
    // maintainer has been connected for longer than it, so workers renew first.
    let redis = RedisServer::start().await;
    let q = queue_on(&redis).await;
    let id = enqueue(&q, "r").await;
    let lease = q
        .take("q", "w1", Duration::from_secs(1))
        .await
        .unwrap()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let reaped: i64 = redis_cmd(
        &redis,
        &["FCALL", "patchbay_reap", "1", "patchbay:leases:q", "500"],
    )
    .await;
    assert_eq!(
        reaped, 0,
        "connected for 500 ms: a 1000 ms lease is not judged yet"
    );
    q.renew(&id, lease.token)
        .await
        .expect("the worker renews in time");
    let reaped: i64 = redis_cmd(
        &redis,
        &["FCALL", "patchbay_reap", "1", "patchbay:leases:q", "60000"],
    )
    .await;
    assert_eq!(reaped, 0, "renewed: not lapsed");
}

#[tokio::test]
async fn pitfall_reclaim_follows_the_cursor_and_survives_deleted_entries() {
    // XAUTOCLAIM looks at part of the pending list per call and reports deleted entries;
    // entries read by a worker that died before starting them must all be queued again.
    let redis = RedisServer::start().await;
    let q = queue_on(&redis).await;
    let mut ids = Vec::new();
    for i in 0..250 {
        ids.push(enqueue(&q, &i.to_string()).await);
    }
    // A worker reads every entry and dies without starting any.
    {
        let mut conn = redis.connection().await.unwrap();
        type Reply = Vec<(String, Vec<(String, Vec<String>)>)>;
        let read: Reply = redis::cmd("XREADGROUP")
            .arg(&[
                "GROUP",
                "workers",
                "dead",
                "COUNT",
                "300",
                "STREAMS",
                "patchbay:q:q",
                ">",
            ])
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(read[0].1.len(), 250, "the dead worker read every entry");
    }
    // Ten of the pending entries are deleted from the stream meanwhile.
    let pending: Vec<(String, String, u64, u64)> = {
        let mut conn = redis.connection().await.unwrap();
        redis::cmd("XPENDING")
            .arg(&["patchbay:q:q", "workers", "-", "+", "300"])
            .query_async(&mut conn)
            .await
            .unwrap()
    };
    assert_eq!(pending.len(), 250);
    for (entry, ..) in pending.iter().take(10) {
        let _: i64 = redis_cmd(&redis, &["XDEL", "patchbay:q:q", entry]).await;
    }
    let mut cursor = "0-0".to_string();
    let mut handled = 0;
    let mut calls = 0;
    loop {
        let (next, n): (String, i64) = redis_cmd(
            &redis,
            &[
                "FCALL",
                "patchbay_reclaim",
                "1",
                "patchbay:q:q",
                "0",
                &cursor,
            ],
        )
        .await;
        handled += n;
        calls += 1;
        if next == "0-0" {
            break;
        }
        cursor = next;
    }
    assert!(calls >= 3, "one call does not see 250 entries: {calls}");
    assert_eq!(handled, 250);
    let left: Vec<Value> = {
        let mut conn = redis.connection().await.unwrap();
        let v: Vec<redis::Value> = redis::cmd("XPENDING")
            .arg(&["patchbay:q:q", "workers", "-", "+", "300"])
            .query_async(&mut conn)
            .await
            .unwrap();
        v.iter().map(|_| Value::Null).collect()
    };
    assert!(left.is_empty(), "nothing left pending");
    // 240 jobs are queued again. A deleted entry no longer names its task: those ten stay
    // queued without an entry (only something outside patchbay deletes queue entries; the
    // README tells operators never to XDEL or XTRIM a queue's stream).
    let xlen: i64 = redis_cmd(&redis, &["XLEN", "patchbay:q:q"]).await;
    assert_eq!(xlen, 240);
    let mut started = HashSet::new();
    while let Some(lease) = q.take("q", "w", Duration::from_millis(200)).await.unwrap() {
        started.insert(lease.task.id);
    }
    assert_eq!(started.len(), 240);
}

#[tokio::test]
async fn pitfall_consumers_are_deleted_only_with_nothing_pending_and_trimming_spares_pending_entries()
 {
    // XGROUP DELCONSUMER drops the consumer's pending entries: the sweep deletes only idle
    // consumers with nothing pending. MAXLEN trimming deletes unacknowledged entries: the
    // queue never uses it; its trim stops at the first entry still pending or not yet read.
    let redis = RedisServer::start().await;
    let q = queue_on(&redis).await;
    for i in 0..2000 {
        enqueue(&q, &format!("job-{i}")).await;
    }
    let xlen: i64 = redis_cmd(&redis, &["XLEN", "patchbay:q:q"]).await;
    assert_eq!(xlen, 2000, "nothing trimmed by enqueues");
    // Worker `w` starts and ends two jobs; then `busy` reads one and holds it; then `w` starts
    // a fourth.
    let fail = || {
        Finish::Failed(TaskError {
            code: ErrorCode::Failed,
            message: "no".into(),
        })
    };
    for _ in 0..2 {
        let lease = q
            .take("q", "w", Duration::from_secs(1))
            .await
            .unwrap()
            .unwrap();
        q.finish(&lease.task.id, lease.token, fail()).await.unwrap();
    }
    let mut conn = redis.connection().await.unwrap();
    type Reply = Vec<(String, Vec<(String, Vec<String>)>)>;
    let read: Reply = redis::cmd("XREADGROUP")
        .arg(&[
            "GROUP",
            "workers",
            "busy",
            "COUNT",
            "1",
            "STREAMS",
            "patchbay:q:q",
            ">",
        ])
        .query_async(&mut conn)
        .await
        .unwrap();
    let held = read[0].1[0].0.clone();
    q.take("q", "w", Duration::from_secs(1))
        .await
        .unwrap()
        .unwrap();
    let _: redis::Value = redis::cmd("XGROUP")
        .arg(&["CREATECONSUMER", "patchbay:q:q", "workers", "idle"])
        .query_async(&mut conn)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let deleted: i64 = redis_cmd(
        &redis,
        &["FCALL", "patchbay_sweep", "1", "patchbay:q:q", "10"],
    )
    .await;
    assert_eq!(
        deleted, 2,
        "`idle` and `w` (nothing pending) go, `busy` stays"
    );
    let pending: redis::Value = redis_cmd(&redis, &["XPENDING", "patchbay:q:q", "workers"]).await;
    assert!(format!("{pending:?}").contains("busy"), "{pending:?}");
    // The trim takes the two finished entries and stops at the one `busy` holds.
    let trimmed: i64 = redis_cmd(&redis, &["FCALL", "patchbay_trim", "1", "patchbay:q:q"]).await;
    assert_eq!(trimmed, 2);
    let still: Vec<redis::Value> =
        redis_cmd(&redis, &["XRANGE", "patchbay:q:q", &held, &held]).await;
    assert_eq!(still.len(), 1, "the pending entry survives the trim");
    let xlen: i64 = redis_cmd(&redis, &["XLEN", "patchbay:q:q"]).await;
    assert_eq!(xlen, 1998);
}

#[tokio::test]
async fn a_python_worker_written_from_the_readme_runs_jobs() {
    let redis = RedisServer::start().await;
    let bridge = redis_bridge(
        &redis,
        queue_only(json!({"leaseMs": 1500, "maxAttempts": 2, "backoffMs": 100})),
    )
    .await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/python_worker.py");
    let mut python = Proc(
        Command::new("python3")
            .args([script, "--redis", &redis.url(), "--queue", "q"])
            .stdout(Stdio::null())
            .spawn()
            .expect("python3 runs (the test suite's set-up installs its `redis` package)"),
    );
    let mut client = connect_as(&bridge, "7").await;

    let id = id_of(&start_job(&mut client, json!({"steps": 3})).await);
    let seen = until_final(&mut client, &id).await;
    let end = &seen.last().unwrap()["payload"];
    assert_eq!(end["status"], "succeeded", "{end}");
    assert_eq!(end["result"], json!({"steps": 3, "worker": "python"}));
    assert!(
        seen.iter()
            .any(|m| m["payload"]["progress"]["percent"] == 33),
        "progress reported: {seen:?}"
    );

    let id = id_of(&start_job(&mut client, json!({"steps": 1, "fail": true})).await);
    let seen = until_final(&mut client, &id).await;
    let end = &seen.last().unwrap()["payload"];
    assert_eq!(
        (end["status"].as_str(), end["attempts"].as_u64()),
        (Some("failed"), Some(2)),
        "{end}"
    );
    assert_eq!(end["error"]["message"], "asked to fail");

    // A long job: cancelled while it runs.
    let id = id_of(&start_job(&mut client, json!({"steps": 100})).await);
    loop {
        let m = client.recv().await;
        if m["payload"]["id"] == id.as_str() && m["payload"]["progress"].is_object() {
            break;
        }
    }
    let reply = client.request("JOB_CANCEL", json!({"id": id})).await;
    assert_eq!(reply["payload"]["cancelRequested"], true, "{reply}");
    let seen = until_final(&mut client, &id).await;
    assert_eq!(seen.last().unwrap()["payload"]["status"], "cancelled");

    // SIGTERM mid-job: handed back without counting the attempt; the worker exits 0.
    let id = id_of(&start_job(&mut client, json!({"steps": 100})).await);
    loop {
        let m = client.recv().await;
        if m["payload"]["id"] == id.as_str() && m["payload"]["progress"].is_object() {
            break;
        }
    }
    signal(&python, "-TERM");
    assert!(python.wait().unwrap().success());
    let got = client.request("JOB_GET", json!({"id": id})).await;
    assert_eq!(got["payload"]["status"], "queued", "{got}");
    assert_eq!(got["payload"]["attempts"], 0);
    let consumers: Vec<redis::Value> =
        redis_cmd(&redis, &["XINFO", "CONSUMERS", "patchbay:q:q", "workers"]).await;
    assert!(
        consumers.is_empty(),
        "it retired its consumer: {consumers:?}"
    );
}

#[tokio::test]
async fn maintenance_moves_to_another_instance_when_its_holder_goes() {
    let redis = RedisServer::start().await;
    let task = queue_only(json!({"leaseMs": 1000}));
    let mut first = redis_bridge(&redis, task.clone()).await;
    // The first instance takes the maintainer's lock.
    let start = Instant::now();
    loop {
        let holder: Option<String> = redis_cmd(&redis, &["GET", "patchbay:tasks:maintainer"]).await;
        if holder.is_some() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "someone maintains the queues"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let second = redis_bridge(&redis, task).await;
    first.shutdown().await;
    first.stopped().await;
    // A worker takes a job and dies holding it: only a maintainer gives it its next attempt.
    let q = queue_on(&redis).await;
    let mut client = connect_as(&second, "7").await;
    let id = id_of(&start_job(&mut client, json!({})).await);
    let lease = q
        .take("q", "doomed", Duration::from_secs(1))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(lease.task.id, id);
    let mut w = worker(&redis, r#"echo '{"result":"second"}'"#, 1);
    let seen = until_final(&mut client, &id).await;
    let end = &seen.last().unwrap()["payload"];
    assert_eq!(
        (end["status"].as_str(), end["attempts"].as_u64()),
        (Some("succeeded"), Some(2)),
        "{end}"
    );
    assert_eq!(end["result"], "second");
    sigkill(&mut w);
}

#[tokio::test]
async fn anonymous_connections_are_kept_apart_on_redis() {
    let redis = RedisServer::start().await;
    let url = redis.url();
    let bridge = Bridge::start(&task_manifest(queue_only(json!({}))), None, move |c| {
        c.redis_url = Some(url);
    })
    .await;
    let mut one = bridge.connect().await;
    let mut two = bridge.connect().await;
    let id = id_of(&start_job(&mut one, json!({})).await);
    assert_anonymous_connections_apart(&mut one, &mut two, &id).await;
}

#[tokio::test]
async fn a_job_running_across_a_redis_restart_finishes_once() {
    // With persistence the running job's lease survives; its worker renews once Redis is back
    // and reports the end: one attempt, succeeded.
    let dir = tempfile::tempdir().unwrap();
    let mut redis = persistent_redis(dir.path()).await;
    let bridge = redis_bridge(&redis, queue_only(json!({"leaseMs": 3000}))).await;
    let mut w = worker(
        &redis,
        r#"echo '{"progress":{"started":1}}'; sleep 2; echo '{"result":"done"}'"#,
        1,
    );
    let mut client = connect_as(&bridge, "7").await;
    let id = id_of(&start_job(&mut client, json!({})).await);
    until_progress(&mut client, "started").await;
    redis.kill();
    tokio::time::sleep(Duration::from_millis(500)).await;
    redis.restart().await;
    let task = succeeded_within(&redis, &id, Duration::from_secs(10)).await;
    assert_eq!(task["attempts"], 1, "{task}");
    assert_eq!(task["result"], "done");
    sigkill(&mut w);
}

#[tokio::test]
async fn a_worker_recreates_the_group_after_redis_lost_everything() {
    // Without persistence a restart loses the stream, the group and the functions: the worker
    // recreates the group on its next read and consumes jobs enqueued afterwards.
    // No patchbay yet: only the worker can make the group.
    let mut redis = RedisServer::start().await;
    let mut w = worker(&redis, r#"echo '{"result":1}'"#, 1);
    reading(&redis, &w).await;
    redis.kill();
    redis.restart().await;
    // The worker reads before anything recreates the stream: NOGROUP, then it makes the group.
    let start = Instant::now();
    loop {
        let groups: Result<redis::Value, _> = {
            let mut conn = redis.connection().await.unwrap();
            redis::cmd("XINFO")
                .arg(&["GROUPS", "patchbay:q:q"])
                .query_async::<redis::Value>(&mut conn)
                .await
        };
        if groups.is_ok_and(|g| format!("{g:?}").contains("workers")) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the worker recreated the group"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let bridge = redis_bridge(&redis, queue_only(json!({}))).await;
    let mut client = connect_as(&bridge, "7").await;
    let id = id_of(&start_job(&mut client, json!({})).await);
    let seen = until_final(&mut client, &id).await;
    assert_eq!(seen.last().unwrap()["payload"]["status"], "succeeded");
    assert!(
        w.try_wait().unwrap().is_none(),
        "the worker never restarted"
    );
    sigkill(&mut w);
}

#[tokio::test]
async fn an_outage_longer_than_a_lease_does_not_take_running_jobs_from_their_workers() {
    // Every lease looks lapsed when Redis comes back; the maintainer judges none until it has
    // been connected for a lease's length, and by then the workers have renewed their own.
    let dir = tempfile::tempdir().unwrap();
    let mut redis = persistent_redis(dir.path()).await;
    let bridge = redis_bridge(&redis, queue_only(json!({"leaseMs": 2000}))).await;
    let mut w = worker(
        &redis,
        r#"echo '{"progress":{"started":1}}'; sleep 7; echo '{"result":"kept"}'"#,
        1,
    );
    let mut client = connect_as(&bridge, "7").await;
    let id = id_of(&start_job(&mut client, json!({})).await);
    until_progress(&mut client, "started").await;
    // The worker is held back until a second after Redis returns, so only the maintainer's
    // patience keeps the job from being given away.
    signal(&w, "-STOP");
    redis.kill();
    tokio::time::sleep(Duration::from_millis(3000)).await; // longer than the lease
    redis.restart().await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    signal(&w, "-CONT");
    let task = succeeded_within(&redis, &id, Duration::from_secs(15)).await;
    assert_eq!(task["attempts"], 1, "never taken from its worker: {task}");
    assert_eq!(task["result"], "kept");
    sigkill(&mut w);
}

#[tokio::test]
async fn tasks_written_by_the_previous_function_library_keep_working_after_an_upgrade() {
    // Version 2 of the library kept every field of a task apart; version 3 reads a `head`
    // and a `cfg`, makes them for an old task when it reads one, and stores them at the
    // first step that writes.
    let redis = RedisServer::start().await;
    let q = queue_on(&redis).await;
    let id = "old-task";
    let key = format!("patchbay:task:{id}");
    old_task(
        &redis,
        id,
        &[
            ("owner", "7"),
            ("scope", "u:7"),
            ("params", r#"{"n":[1,2.50]}"#),
            ("req", "patchbay:req:q:3:u:7:r"),
            ("v", "1"),
        ],
    )
    .await;
    let _: i64 = redis_cmd(&redis, &["SADD", "patchbay:active:q:u:7", id]).await;
    let _: String = redis_cmd(&redis, &["XADD", "patchbay:q:q", "*", "id", id]).await;

    let got = q.get(Some("q"), id, Some("7")).await.unwrap();
    assert_eq!(got.status, patchbay::task::Status::Queued);
    assert_eq!(got.params, json!({"n": [1, 2.50]}));
    assert_eq!(got.max_attempts, 3);
    assert_eq!(got.user_id.as_deref(), Some("7"));
    assert_eq!(
        q.get(Some("q"), id, Some("8")).await.unwrap_err(),
        QueueError::NotFound
    );

    let lease = q
        .take("q", "w1", Duration::from_secs(1))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(lease.task.id, id);
    assert_eq!(lease.task.attempts, 1);
    assert_eq!(lease.lease, Duration::from_millis(1000));
    // `get` only reads; the first step that writes stores the new fields.
    let raw: Option<String> = redis_cmd(&redis, &["HGET", &key, "params"]).await;
    assert_eq!(raw, None, "the old fields have gone into `head`");
    let cfg: String = redis_cmd(&redis, &["HGET", &key, "cfg"]).await;
    assert_eq!(cfg, "3 60000 1000 0 3600");
    let done = q
        .finish(id, lease.token, Finish::Succeeded(json!("ok")))
        .await
        .unwrap();
    assert_eq!(done.status, patchbay::task::Status::Succeeded);
    assert_eq!(done.created_at, "2026-12-01T10:00:00.000Z");
    let active: i64 = redis_cmd(&redis, &["SCARD", "patchbay:active:q:u:7"]).await;
    assert_eq!(active, 0, "the finished task left the active set");
    let ttl: i64 = redis_cmd(&redis, &["TTL", &key]).await;
    assert!(
        (1..=3600).contains(&ttl),
        "expires after its retention: {ttl}"
    );
}

/// A task hash as version 2 of the function library wrote it: an anonymous, queued task of
/// queue `q`, with `fields` over those defaults.
async fn old_task(redis: &RedisServer, id: &str, fields: &[(&str, &str)]) {
    let key = format!("patchbay:task:{id}");
    let defaults = [
        ("id", id),
        ("queue", "q"),
        ("owner", ""),
        ("scope", "c:conn"),
        ("status", "queued"),
        ("params", "{}"),
        ("attempts", "0"),
        ("max", "3"),
        ("created", "2026-12-01T10:00:00.000Z"),
        ("updated", "2026-12-01T10:00:00.000Z"),
        ("cancel", "0"),
        ("timeout", "60000"),
        ("lease", "1000"),
        ("backoff", "0"),
        ("retention", "3600"),
    ];
    // HSET takes the last value of a field named twice.
    let mut args = vec!["HSET", key.as_str()];
    for (k, v) in defaults.iter().chain(fields) {
        args.extend([*k, *v]);
    }
    let _: i64 = redis_cmd(redis, &args).await;
}

/// [`old_task`] running under lease token 5 until `until` (ms), in the active set and the
/// lease index.
async fn old_running_task(redis: &RedisServer, id: &str, until: u64) {
    let until = until.to_string();
    let fields = [
        ("status", "running"),
        ("attempts", "1"),
        ("token", "5"),
        ("until", until.as_str()),
        ("consumer", "w0"),
    ];
    old_task(redis, id, &fields).await;
    let _: i64 = redis_cmd(redis, &["SADD", "patchbay:active:q:c:conn", id]).await;
    let _: i64 = redis_cmd(redis, &["ZADD", "patchbay:leases:q", &until, id]).await;
}

#[tokio::test]
async fn running_tasks_of_the_previous_function_library_renew_fail_retry_and_are_reaped() {
    let redis = RedisServer::start().await;
    let q = queue_on(&redis).await;
    let far = 4_000_000_000_000u64;

    // Renewed, then failed: a retry after the (zero) backoff, promoted, then cancelled.
    old_running_task(&redis, "a", far).await;
    assert!(!q.renew("a", 5).await.unwrap().cancel_requested);
    assert_eq!(q.renew("a", 6).await.unwrap_err(), QueueError::StaleLease);
    let failed = q
        .finish(
            "a",
            5,
            Finish::Failed(TaskError {
                code: ErrorCode::Failed,
                message: "exit 1".into(),
            }),
        )
        .await
        .unwrap();
    assert_eq!(failed.status, patchbay::task::Status::Delayed);
    assert_eq!(failed.error.unwrap().message, "exit 1");
    let promoted: i64 = redis_cmd(
        &redis,
        &["FCALL", "patchbay_promote", "1", "patchbay:delayed:q"],
    )
    .await;
    assert_eq!(promoted, 1);
    let queued = q.get(Some("q"), "a", None).await.unwrap();
    assert_eq!(queued.status, patchbay::task::Status::Queued);
    let cancelled = q.cancel(Some("q"), "a", None).await.unwrap();
    assert_eq!(cancelled.status, patchbay::task::Status::Cancelled);

    // A lapsed lease: the maintainer queues the next attempt.
    old_running_task(&redis, "b", 1).await;
    let reaped: i64 = redis_cmd(
        &redis,
        &["FCALL", "patchbay_reap", "1", "patchbay:leases:q", "60000"],
    )
    .await;
    assert_eq!(reaped, 1);
    let b = q.get(Some("q"), "b", None).await.unwrap();
    assert_eq!(b.status, patchbay::task::Status::Queued);
    assert_eq!(b.error.unwrap().code, ErrorCode::WorkerLost);

    // A running one cancelled, then handed back by its worker: cancelled, listed as such.
    old_running_task(&redis, "c", far).await;
    let asked = q.cancel(Some("q"), "c", None).await.unwrap();
    assert!(asked.cancel_requested);
    assert!(q.renew("c", 5).await.unwrap().cancel_requested);
    let ended = q.finish("c", 5, Finish::HandBack).await.unwrap();
    assert_eq!(ended.status, patchbay::task::Status::Cancelled);
    let _: i64 = redis_cmd(&redis, &["ZADD", "patchbay:tasks:q:c:conn", "1", "c"]).await;
    let listed: String = redis_cmd(
        &redis,
        &[
            "FCALL",
            "patchbay_list",
            "1",
            "patchbay:tasks:q:c:conn",
            "",
            "10",
            "",
        ],
    )
    .await;
    let listed: Value = serde_json::from_str(&listed).unwrap();
    assert_eq!(listed[0]["id"], "c");
    assert_eq!(listed[0]["status"], "cancelled");
    assert_eq!(listed[0]["params"], json!({}));
}

/// The function library reads `P:history` at most once a second for the task steps (a read
/// per publish was a measurable part of a job's cost): a change of what is kept, as an
/// instance writes it at start-up, still takes effect for the steps after that second.
#[tokio::test]
async fn a_change_of_what_history_keeps_reaches_the_task_steps_within_a_second() {
    let redis = RedisServer::start().await;
    let q = queue_on(&redis).await;
    let _: i64 = redis_cmd(&redis, &["HSET", "patchbay:history", "rooms", ""]).await;
    let a = enqueue(&q, "a").await;
    let kept: i64 = redis_cmd(&redis, &["XLEN", &format!("patchbay:h:task:{a}")]).await;
    assert_eq!(kept, 0, "nothing is kept yet");
    let _: i64 = redis_cmd(
        &redis,
        &[
            "HSET",
            "patchbay:history",
            "rooms",
            "task:*",
            "size",
            "10",
            "ttl",
            "60",
            "keep",
            "86400",
        ],
    )
    .await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let b = enqueue(&q, "b").await;
    let kept: i64 = redis_cmd(&redis, &["XLEN", &format!("patchbay:h:task:{b}")]).await;
    assert_eq!(kept, 1, "the queued state is kept in task:{b}");
}
