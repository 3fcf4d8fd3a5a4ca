//! The task manager on the embedded queue, as a client meets it: `task` actions over real
//! websockets, jobs run by patchbay itself as real child processes (`task.command`), progress
//! and the final state pushed as `TASK_PROGRESS`, the snapshot on joining a task's room,
//! retries, timeouts, cancels, output bombs and injection attempts.

mod common;

use std::time::{Duration, Instant};

use common::tasks::*;
use common::*;
use serde_json::{Value, json};

fn manifest(script: &str, settings: Value) -> String {
    task_manifest(sh_task(script, settings))
}

async fn bridge(script: &str, settings: Value) -> Bridge {
    Bridge::start(&manifest(script, settings), None, with_jwt).await
}

#[tokio::test]
async fn a_job_runs_reports_progress_and_succeeds() {
    let script = r#"read -r job; echo '{"progress":{"percent":50}}'; sleep 0.2; printf '{"result":{"got":%s}}\n' "$job""#;
    let bridge = bridge(script, json!({})).await;
    let mut client = connect_as(&bridge, "7").await;
    let reply = start_job(&mut client, json!({"format": "csv"})).await;
    let task = &reply["payload"];
    let id = task["id"].as_str().unwrap().to_string();
    assert_eq!(task["userId"], "7");
    assert_eq!(task["params"], json!({"format": "csv"}));
    assert_eq!(task["maxAttempts"], 3);
    assert_eq!(reply["meta"]["subscribed"], format!("task:{id}"));
    assert!(reply["meta"]["roomToken"].is_string(), "{reply}");
    // Right after the success: the snapshot, then every change, to the end.
    let snapshot = client.recv().await;
    assert_eq!(snapshot["type"], "TASK_PROGRESS", "{snapshot}");
    assert_eq!(snapshot["meta"]["room"], format!("task:{id}"));
    let seen = until_final(&mut client, &id).await;
    let last = &seen.last().unwrap()["payload"];
    assert_eq!(last["status"], "succeeded");
    assert_eq!(last["attempts"], 1);
    assert_eq!(last["progress"], json!({"percent": 50}));
    // The job saw exactly what the contract says on stdin.
    let got = &last["result"]["got"];
    assert_eq!(got["id"], id.as_str());
    assert_eq!(got["queue"], "q");
    assert_eq!(got["params"], json!({"format": "csv"}));
    assert_eq!(got["attempt"], 1);
    assert_eq!(got["userId"], "7");
    assert!(
        seen.iter()
            .any(|m| m["payload"]["progress"] == json!({"percent": 50})
                && m["payload"]["status"] == "running"),
        "progress pushed while running: {seen:?}"
    );
    let got = client.request("JOB_GET", json!({"id": id})).await;
    assert_eq!(got["payload"]["status"], "succeeded", "{got}");
    // Operators see the queue in /metrics (its counts are refreshed every second).
    let want = [
        r#"patchbay_queue_finished_tasks{queue="q",status="succeeded"} 1"#,
        r#"patchbay_queue_tasks{queue="q",status="running"} 0"#,
        r#"patchbay_queue_workers{queue="q"} 1"#,
        r#"patchbay_task_attempt_duration_seconds_count{queue="q",outcome="succeeded"} 1"#,
    ];
    metrics_show(&bridge, &want).await;
}

#[tokio::test]
async fn a_job_that_ends_before_the_join_still_reaches_the_client() {
    // A job that ends in a few milliseconds, and a second connection of the same user that
    // rejoins the room with the token after the end: each sees the final state.
    let bridge = bridge(r#"echo '{"result":42}'"#, json!({})).await;
    let mut client = connect_as(&bridge, "7").await;
    let reply = start_job(&mut client, json!({})).await;
    let id = reply["payload"]["id"].as_str().unwrap().to_string();
    let seen = until_final(&mut client, &id).await;
    assert_eq!(seen.last().unwrap()["payload"]["result"], 42);

    let mut again = connect_as(&bridge, "7").await;
    let token = reply["meta"]["roomToken"].as_str().unwrap();
    let room = format!("task:{id}");
    let joined = again
        .request(
            "@@patchbay/SUBSCRIBE",
            json!({"room": room, "token": token}),
        )
        .await;
    assert_eq!(joined["type"], "@@patchbay/SUBSCRIBE_SUCCESS", "{joined}");
    let snapshot = again.recv().await;
    assert_eq!(snapshot["type"], "TASK_PROGRESS", "{snapshot}");
    assert_eq!(snapshot["meta"]["room"], room);
    assert_eq!(snapshot["payload"]["status"], "succeeded");
    assert_eq!(snapshot["payload"]["result"], 42);
}

#[tokio::test]
async fn a_fast_jobs_room_says_nothing_before_the_success_and_ends_on_its_final_state() {
    let bridge = bridge(FAST_JOB, json!({})).await;
    assert_fast_jobs_in_order(&bridge).await;
}

#[tokio::test]
async fn enqueue_is_idempotent_per_user_and_request_id() {
    let bridge = bridge("sleep 5", json!({"concurrency": 1})).await;
    let mut clients = Vec::new();
    for _ in 0..10 {
        clients.push(connect_as(&bridge, "7").await);
    }
    // 100 enqueues with one request id from one user, over ten connections at once.
    let send =
        json!({"type": "JOB_START_REQUEST", "payload": {}, "meta": {"requestId": "same-id"}});
    for client in &mut clients {
        for _ in 0..10 {
            client.send(send.clone()).await;
        }
    }
    let mut ids = std::collections::HashSet::new();
    for client in &mut clients {
        let mut answered = 0;
        while answered < 10 {
            let m = client.recv().await;
            if m["type"] == "JOB_START_SUCCESS" {
                ids.insert(m["payload"]["id"].as_str().unwrap().to_string());
                answered += 1;
            } else {
                assert_ne!(m["type"], "JOB_START_FAILURE", "{m}");
            }
        }
    }
    assert_eq!(ids.len(), 1, "one task: {ids:?}");
    // The same request id from another user is another task.
    let mut other = connect_as(&bridge, "8").await;
    other.send(send).await;
    let theirs = loop {
        let m = other.recv().await;
        if m["type"] == "JOB_START_SUCCESS" {
            break m["payload"]["id"].as_str().unwrap().to_string();
        }
    };
    assert!(!ids.contains(&theirs));
}

#[tokio::test]
async fn users_see_only_their_own_tasks_and_the_limit_holds() {
    let bridge = bridge("sleep 5", json!({"perUserLimit": 2})).await;
    let mut alice = connect_as(&bridge, "alice").await;
    let mut bob = connect_as(&bridge, "bob").await;
    let first = start_job(&mut alice, json!({})).await["payload"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    start_job(&mut alice, json!({})).await;
    let third = alice.request("JOB_START", json!({})).await;
    assert_failure(&third, "JOB_START", "limit_reached");

    // Another user can neither read nor cancel it, nor learn that it exists.
    let got = bob.request("JOB_GET", json!({"id": first})).await;
    assert_failure(&got, "JOB_GET", "not_found");
    let got = bob.request("JOB_CANCEL", json!({"id": first})).await;
    assert_failure(&got, "JOB_CANCEL", "not_found");
    let listed = bob.request("JOBS_LIST", json!({})).await;
    assert_eq!(listed["payload"]["tasks"], json!([]), "{listed}");
    let got = alice
        .request("JOB_GET", json!({"id": "no-such-task"}))
        .await;
    assert_failure(&got, "JOB_GET", "not_found");
    let bad = alice.request("JOB_GET", json!({"id": 7})).await;
    assert_failure(&bad, "JOB_GET", "invalid_payload");
    let bad = alice.request("JOBS_LIST", json!({"limit": 500})).await;
    assert_failure(&bad, "JOBS_LIST", "invalid_payload");

    // Alice's list: newest first; a cancel frees a place under the limit.
    let listed = alice.request("JOBS_LIST", json!({"limit": 10})).await;
    let tasks = listed["payload"]["tasks"].as_array().unwrap();
    assert_eq!(tasks.len(), 2);
    assert_eq!(tasks[1]["id"], first.as_str());
    let queued = tasks[0]["id"].as_str().unwrap();
    let cancelled = alice.request("JOB_CANCEL", json!({"id": queued})).await;
    assert_eq!(cancelled["payload"]["status"], "cancelled", "{cancelled}");
    start_job(&mut alice, json!({})).await;
    let again = alice.request("JOB_CANCEL", json!({"id": queued})).await;
    assert_failure(&again, "JOB_CANCEL", "conflict");
}

#[tokio::test]
async fn failures_are_retried_with_growing_delays_then_fail() {
    let bridge = bridge(
        // Each attempt runs a moment, so its start is seen (live, or in the snapshot).
        "echo oops >&2; sleep 0.3; exit 3",
        json!({"maxAttempts": 3, "backoffMs": 200}),
    )
    .await;
    let mut client = connect_as(&bridge, "7").await;
    let id = start_job(&mut client, json!({})).await["payload"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let mut started = Vec::new();
    let mut last;
    loop {
        let m = client.recv().await;
        if m["type"] != "TASK_PROGRESS" || m["meta"]["room"] != format!("task:{id}") {
            continue;
        }
        last = m["payload"].clone();
        if last["status"] == "running"
            && started.len() < last["attempts"].as_u64().unwrap() as usize
        {
            started.push(Instant::now());
        }
        if last["status"] == "failed" {
            break;
        }
    }
    assert_eq!(last["attempts"], 3);
    assert_eq!(last["error"]["code"], "failed");
    assert!(
        last["error"]["message"].as_str().unwrap().contains("3"),
        "{last}"
    );
    assert_eq!(started.len(), 3);
    // Backoff 200 ms then 400 ms, each ±20 %.
    let first = started[1] - started[0];
    let second = started[2] - started[1];
    assert!(first >= Duration::from_millis(150), "{first:?}");
    assert!(second >= Duration::from_millis(300), "{second:?}");
    assert!(second > first, "growing delays: {first:?} then {second:?}");
}

#[tokio::test]
async fn timeouts_output_bombs_and_injection_attempts_end_as_specified() {
    let dir = tempfile::tempdir().unwrap();
    let pwned = dir.path().join("pwned");
    // The job prints its params back: nothing from them may run.
    let script = r#"read -r job; case "$job" in *sleep*) sleep 30;; *bomb*) yes;; *) printf '{"result":%s}\n' "$job";; esac"#;
    let bridge = bridge(
        script,
        json!({"timeoutMs": 500, "maxAttempts": 1, "outputLimitBytes": 65536}),
    )
    .await;
    let mut client = connect_as(&bridge, "7").await;

    let id = |r: Value| r["payload"]["id"].as_str().unwrap().to_string();
    let slow = id(start_job(&mut client, json!({"mode": "sleep"})).await);
    let seen = until_final(&mut client, &slow).await;
    let end = &seen.last().unwrap()["payload"];
    assert_eq!(
        (end["status"].as_str(), end["error"]["code"].as_str()),
        (Some("failed"), Some("timeout")),
        "{end}"
    );

    let bomb = id(start_job(&mut client, json!({"mode": "bomb"})).await);
    let seen = until_final(&mut client, &bomb).await;
    let end = &seen.last().unwrap()["payload"];
    assert_eq!(end["error"]["code"], "output_too_large", "{end}");

    let hostile = json!({
        "file": format!("; touch {}", pwned.display()),
        "flag": "--help",
        "sub": format!("$(touch {})", pwned.display()),
        "tick": format!("`touch {}`", pwned.display()),
    });
    let evil = id(start_job(&mut client, hostile.clone()).await);
    let seen = until_final(&mut client, &evil).await;
    let end = &seen.last().unwrap()["payload"];
    assert_eq!(end["status"], "succeeded", "{end}");
    assert_eq!(
        end["result"]["params"], hostile,
        "the params arrive as data"
    );
    assert!(!pwned.exists(), "nothing from the payload was executed");
}

#[tokio::test]
async fn cancel_stops_a_running_group_and_a_queued_job_never_starts() {
    let dir = tempfile::tempdir().unwrap();
    let pids = dir.path().join("pids");
    let starts = dir.path().join("starts");
    // Each job notes that it started, then forks a grandchild that ignores SIGTERM.
    let script = format!(
        r#"echo $PATCHBAY_TASK_ID >> {starts}; (trap '' TERM; sleep 30) & echo $! >> {pids}; echo '{{"progress":{{"forked":true}}}}'; wait"#,
        starts = starts.display(),
        pids = pids.display()
    );
    let bridge = bridge(&script, json!({"concurrency": 1, "graceMs": 300})).await;
    let mut client = connect_as(&bridge, "7").await;
    let running = start_job(&mut client, json!({})).await["payload"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let queued = start_job(&mut client, json!({})).await["payload"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    // Wait until the first job has forked (by its file: its progress event may already have
    // passed while the second enqueue waited for its reply).
    let deadline = Instant::now() + WAIT;
    while !std::fs::read_to_string(&pids).is_ok_and(|p| !p.trim().is_empty()) {
        assert!(Instant::now() < deadline, "the first job never forked");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let cancelled = client.request("JOB_CANCEL", json!({"id": queued})).await;
    assert_eq!(cancelled["payload"]["status"], "cancelled", "{cancelled}");

    let asked = Instant::now();
    let reply = client.request("JOB_CANCEL", json!({"id": running})).await;
    assert_eq!(reply["payload"]["status"], "running", "{reply}");
    assert_eq!(reply["payload"]["cancelRequested"], true);
    let seen = until_final(&mut client, &running).await;
    assert_eq!(seen.last().unwrap()["payload"]["status"], "cancelled");
    let grandchild: u32 = std::fs::read_to_string(&pids)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // The cancel reaches the job within a renewal (500 ms), then the grace (300 ms).
    while alive(grandchild) && asked.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!alive(grandchild), "the grandchild is gone");
    assert!(
        asked.elapsed() < Duration::from_millis(300 + 1000),
        "gone within grace + 1 s: {:?}",
        asked.elapsed()
    );
    // The queued job never started.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = std::fs::read_to_string(&starts).unwrap();
    assert!(!started.contains(&queued), "{started}");
    assert_eq!(started.lines().count(), 1);
}

#[tokio::test]
async fn anonymous_tasks_belong_to_no_user() {
    let bridge = Bridge::start(&manifest("sleep 5", json!({})), None, |_| {}).await;
    let mut one = bridge.connect().await;
    let mut two = bridge.connect().await;
    let reply = start_job(&mut one, json!({})).await;
    assert_eq!(reply["payload"]["userId"], Value::Null);
    let id = reply["payload"]["id"].as_str().unwrap();
    assert_anonymous_connections_apart(&mut one, &mut two, id).await;
}

#[tokio::test]
async fn a_result_too_large_for_the_task_fails_the_attempt() {
    // 2 MB of result within a 4 MB output limit: the queue refuses it (at most 1 MiB), so the
    // attempt fails as output_too_large instead of leaving the task running.
    let script = r#"printf '{"result":"%s"}\n' "$(head -c 2000000 /dev/zero | tr '\0' a)""#;
    let bridge = bridge(
        script,
        json!({"maxAttempts": 1, "outputLimitBytes": 4_000_000}),
    )
    .await;
    let mut client = connect_as(&bridge, "7").await;
    let id = id_of(&start_job(&mut client, json!({})).await);
    let seen = until_final(&mut client, &id).await;
    let end = &seen.last().unwrap()["payload"];
    assert_eq!(end["status"], "failed", "{end}");
    assert_eq!(end["error"]["code"], "output_too_large");
}
