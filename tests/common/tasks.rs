//! Helpers for the task-manager tests: manifests with one queue `q`, users, and reading
//! `TASK_PROGRESS` to a task's end.

use serde_json::{Value, json};

use super::{Bridge, Client, jwt, now};

/// The enqueue spec of queue `q` whose jobs run `script` under `/bin/sh -c`, with short
/// leases and backoffs, and `settings` added.
pub fn sh_task(script: &str, settings: Value) -> Value {
    let mut task = json!({
        "queue": "q",
        "command": ["/bin/sh", "-c", script],
        "leaseMs": 2000,
        "backoffMs": 100,
        "graceMs": 300,
    });
    task.as_object_mut()
        .unwrap()
        .extend(settings.as_object().unwrap().clone());
    task
}

/// `JOB_START` with the enqueue spec `task` (on queue `q`), and `JOB_GET`, `JOB_CANCEL`,
/// `JOBS_LIST` for it.
pub fn task_manifest(task: Value) -> String {
    json!({
        "JOB_START": {"task": task, "payload": {"type": "object"}},
        "JOB_GET": {"task": {"queue": "q", "op": "get"}},
        "JOB_CANCEL": {"task": {"queue": "q", "op": "cancel"}},
        "JOBS_LIST": {"task": {"queue": "q", "op": "list"}},
    })
    .to_string()
}

/// Connects as user `sub`.
pub async fn connect_as(bridge: &Bridge, sub: &str) -> Client {
    let token = jwt(json!({"sub": sub, "exp": now() + 600}));
    let mut client = bridge
        .connect_with(&[("authorization", &format!("Bearer {token}"))])
        .await
        .expect("handshake accepted");
    let hello = client.recv().await;
    assert_eq!(hello["type"], "@@patchbay/CONNECTED", "{hello}");
    client
}

/// Reads `TASK_PROGRESS` for `id` in room `task:<id>` until one has a final status; returns
/// every one seen.
pub async fn until_final(client: &mut Client, id: &str) -> Vec<Value> {
    let mut seen = Vec::new();
    loop {
        let m = client.recv().await;
        if m["type"] != "TASK_PROGRESS" || m["payload"]["id"] != id {
            continue;
        }
        if m["meta"]["room"] != format!("task:{id}") {
            continue; // the same change through the user's room
        }
        let status = m["payload"]["status"].as_str().unwrap().to_string();
        seen.push(m);
        if ["succeeded", "failed", "cancelled", "lost"].contains(&status.as_str()) {
            return seen;
        }
    }
}

/// Starts a job; returns the success.
pub async fn start_job(client: &mut Client, params: Value) -> Value {
    let reply = client.request("JOB_START", params).await;
    assert_eq!(reply["type"], "JOB_START_SUCCESS", "{reply}");
    reply
}

/// The id in a success or a task.
pub fn id_of(reply: &Value) -> String {
    reply["payload"]["id"].as_str().unwrap().to_string()
}

/// Whether process `pid` still runs (a zombie does not count).
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            stat.rsplit_once(')')
                .map(|(_, rest)| rest.trim().to_string())
        })
        .is_some_and(|rest| !rest.starts_with('Z'))
}

/// Two anonymous connections, `one` having started task `id`: either may read it (it belongs
/// to no user), but each lists only what it started, and a request id is each one's own.
pub async fn assert_anonymous_connections_apart(one: &mut Client, two: &mut Client, id: &str) {
    let got = two.request("JOB_GET", json!({"id": id})).await;
    assert_eq!(
        got["payload"]["id"], id,
        "any anonymous connection that knows the id"
    );
    let mine = one.request("JOBS_LIST", json!({})).await;
    assert_eq!(mine["payload"]["tasks"][0]["id"], id, "{mine}");
    let theirs = two.request("JOBS_LIST", json!({})).await;
    assert_eq!(theirs["payload"]["tasks"], json!([]), "{theirs}");
    let same = json!({"type": "JOB_START_REQUEST", "payload": {}, "meta": {"requestId": "same"}});
    one.send(same.clone()).await;
    two.send(same).await;
    let mut ids = Vec::new();
    for client in [one, two] {
        loop {
            let m = client.recv().await;
            if m["type"] == "JOB_START_SUCCESS" {
                ids.push(id_of(&m));
                break;
            }
        }
    }
    assert_ne!(
        ids[0], ids[1],
        "one request id, two anonymous connections: two tasks"
    );
}

/// Polls `/metrics` until it shows every line of `want` (queue counts refresh every second).
pub async fn metrics_show(bridge: &Bridge, want: &[&str]) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let (_, _, body) = super::http_raw("GET", &bridge.http_url("/metrics"), &[], "").await;
        let text = String::from_utf8_lossy(&body).to_string();
        if want.iter().all(|w| text.contains(w)) {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "{want:?} in {text}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// Reads until a `TASK_PROGRESS` whose progress has `key` set to 1 (what the test jobs report
/// once they are under way).
pub async fn until_progress(client: &mut Client, key: &str) {
    loop {
        let m = client.recv().await;
        if m["payload"]["progress"][key] == 1 {
            return;
        }
    }
}

/// A job that reports at once and ends: its first progress can reach the instance while the
/// success is still being made.
pub const FAST_JOB: &str = r#"read -r job; echo '{"progress":{"started":1}}'; echo '{"result":1}'"#;

/// Thirty [`FAST_JOB`]s in turn, each checked: nothing of its room before the success that
/// names it, then its state (live or as a snapshot) up to the final one, and nothing of the
/// room after the final state.
pub async fn assert_fast_jobs_in_order(bridge: &Bridge) {
    let mut client = connect_as(bridge, "7").await;
    for n in 0..30 {
        let request_id = format!("job-{n}");
        client
            .send(json!({"type": "JOB_START_REQUEST", "payload": {}, "meta": {"requestId": request_id}}))
            .await;
        let id = loop {
            let m = client.recv().await;
            let room = m["meta"]["room"].as_str().unwrap_or_default();
            assert!(!room.starts_with("task:"), "before the success: {m}");
            if m["meta"]["requestId"] == request_id.as_str() {
                assert_eq!(m["type"], "JOB_START_SUCCESS", "{m}");
                break id_of(&m);
            }
        };
        let first = client.recv().await;
        assert_eq!(
            first["meta"]["room"],
            format!("task:{id}"),
            "the snapshot: {first}"
        );
        if first["payload"]["status"] != "succeeded" {
            until_final(&mut client, &id).await;
        }
        // Everything the room sent before this answer: nothing after the final state.
        let get = format!("get-{n}");
        client
            .send(json!({"type": "JOB_GET_REQUEST", "payload": {"id": id}, "meta": {"requestId": get}}))
            .await;
        loop {
            let m = client.recv().await;
            if m["meta"]["requestId"] == get.as_str() {
                assert_eq!(m["payload"]["status"], "succeeded", "{m}");
                break;
            }
            if m["meta"]["room"] == format!("task:{id}") {
                assert_eq!(
                    m["payload"]["status"], "succeeded",
                    "after the final state: {m}"
                );
            }
        }
    }
}
