//! The `patchbay` binary as an operator runs it: start-up errors, the listening line, and a
//! graceful exit on SIGTERM.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::tasks::alive;
use common::*;

fn patchbay(envs: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_patchbay"));
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .current_dir(std::env::temp_dir());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd
}

fn fails_with(envs: &[(&str, &str)]) -> String {
    let out = patchbay(envs).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "start-up must fail: {out:?}");
    String::from_utf8(out.stderr).unwrap()
}

#[test]
fn bad_configuration_stops_start_up_naming_the_culprit() {
    let dir = tempfile::tempdir().unwrap();
    let actions = dir.path().to_str().unwrap();
    let err = fails_with(&[
        ("PATCHBAY_ACTIONS", actions),
        ("PATCHBAY_MAX_INFLIGHT", "lots"),
    ]);
    assert!(err.contains("PATCHBAY_MAX_INFLIGHT"), "{err}");
    let err = fails_with(&[("PATCHBAY_ACTIONS", actions), ("PATCHBAY_LOG", "[[[")]);
    assert!(err.contains("PATCHBAY_LOG"), "{err}");
    let err = fails_with(&[("PATCHBAY_ACTIONS", "/nonexistent/patchbay-actions")]);
    assert!(
        err.contains("/nonexistent/patchbay-actions") && err.contains("cannot read"),
        "{err}"
    );

    std::fs::write(
        dir.path().join("tasks.json"),
        r#"{"TASK_FETCH": {"http": {"method": "FETCH", "path": "/tasks/{id}"}}}"#,
    )
    .unwrap();
    let err = fails_with(&[
        ("PATCHBAY_ACTIONS", actions),
        ("PATCHBAY_API_URL", "http://127.0.0.1:1"),
    ]);
    assert!(
        err.contains("tasks.json") && err.contains("TASK_FETCH") && err.contains("http.method"),
        "{err}"
    );

    std::fs::write(
        dir.path().join("tasks.json"),
        r#"{"TASK_FETCH": {"http": {"method": "GET", "path": "/tasks/{id}"}}}"#,
    )
    .unwrap();
    let err = fails_with(&[("PATCHBAY_ACTIONS", actions)]);
    assert!(err.contains("PATCHBAY_API_URL"), "{err}");
    let err = fails_with(&[
        ("PATCHBAY_ACTIONS", actions),
        ("PATCHBAY_API_URL", "http://127.0.0.1:1"),
        ("PATCHBAY_REDIS_URL", "not a url"),
    ]);
    assert!(err.contains("PATCHBAY_REDIS_URL"), "{err}");

    // A misspelt variable never silently turns a feature off.
    let err = fails_with(&[
        ("PATCHBAY_ACTIONS", actions),
        (
            "PATCHBAY_JWT_SECERT",
            "a secret that would have been long enough",
        ),
    ]);
    assert!(
        err.contains("unknown variable PATCHBAY_JWT_SECERT (did you mean PATCHBAY_JWT_SECRET?)"),
        "{err}"
    );
    let err = fails_with(&[
        ("PATCHBAY_ACTIONS", actions),
        ("PATCHBAY_JWT_SECRET", "short"),
    ]);
    assert!(
        err.contains("PATCHBAY_JWT_SECRET") && err.contains("32 bytes"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "one line: {err}");

    let out = patchbay(&[]).arg("bogus").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn start_up_logs_the_effective_modes_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = patchbay(&[
        ("PATCHBAY_ACTIONS", dir.path().to_str().unwrap()),
        ("PATCHBAY_LISTEN", "127.0.0.1:0"),
        ("PATCHBAY_PUBLISH_TOKEN", "a publish token, long enough"),
    ])
    .stdout(Stdio::piped())
    .spawn()
    .unwrap();
    let line = first_line(&mut child, |l| {
        l.contains(" modes: ").then(|| l.to_string())
    });
    let line = line.recv_timeout(Duration::from_secs(20));
    let _ = child.kill();
    let _ = child.wait();
    let line = line.expect("a modes line");
    for part in [
        "bus=memory",
        "auth=none",
        "anonymous=allowed",
        "publish=on",
        "origins=same-host",
    ] {
        assert!(line.contains(part), "{part} in {line}");
    }
    assert!(!line.contains("long enough"), "no secret in {line}");
}

#[test]
fn json_logs_are_one_object_per_line() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = patchbay(&[
        ("PATCHBAY_ACTIONS", dir.path().to_str().unwrap()),
        ("PATCHBAY_LISTEN", "127.0.0.1:0"),
        ("PATCHBAY_LOG_FORMAT", "json"),
    ])
    .stdout(Stdio::piped())
    .spawn()
    .unwrap();
    let line = first_line(&mut child, |l| l.contains("modes").then(|| l.to_string()));
    let line = line.recv_timeout(Duration::from_secs(20));
    let _ = child.kill();
    let _ = child.wait();
    let line = line.expect("a modes line");
    let log: serde_json::Value = serde_json::from_str(&line).expect("a JSON object");
    assert_eq!(log["level"], "INFO", "{line}");
    assert!(log["timestamp"].is_string(), "{line}");
    assert!(
        log["fields"]["message"].as_str().unwrap().contains("modes"),
        "{line}"
    );
    let e = fails_with(&[("PATCHBAY_LOG_FORMAT", "yaml")]);
    assert!(e.starts_with("patchbay: PATCHBAY_LOG_FORMAT:"), "{e}");
}

/// Reads the child's stdout in a thread and sends what `pick` finds in its lines.
fn first_line(
    child: &mut Child,
    pick: impl Fn(&str) -> Option<String> + Send + 'static,
) -> std::sync::mpsc::Receiver<String> {
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in stdout.lines().map_while(Result::ok) {
            if let Some(found) = pick(&line) {
                let _ = tx.send(found);
            }
        }
    });
    rx
}

/// Starts the binary on a free port and returns it with its address.
fn spawn_listening(actions: &str) -> (Child, String) {
    let mut child = patchbay(&[
        ("PATCHBAY_ACTIONS", actions),
        ("PATCHBAY_LISTEN", "127.0.0.1:0"),
        ("PATCHBAY_SHUTDOWN_GRACE_SECS", "2"),
    ])
    .stdout(Stdio::piped())
    .stderr(Stdio::inherit())
    .spawn()
    .unwrap();
    let addr = first_line(&mut child, |l| {
        l.split("listening on ")
            .nth(1)
            .map(|a| a.trim().to_string())
    })
    .recv_timeout(Duration::from_secs(20))
    .expect("the binary logs `listening on <addr>`");
    (child, addr)
}

#[test]
fn version_prints_the_version() {
    for flag in ["--version", "-V"] {
        let out = patchbay(&[]).arg(flag).output().unwrap();
        assert_eq!(out.status.code(), Some(0));
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            format!("patchbay {}\n", env!("CARGO_PKG_VERSION"))
        );
    }
}

#[tokio::test]
async fn sigterm_closes_clients_with_1001_and_exits_0() {
    drains_on("TERM").await;
}

#[tokio::test]
async fn sighup_drains_like_sigterm() {
    drains_on("HUP").await;
}

/// Signal `signal`: the client is closed with 1001 and the process exits 0.
async fn drains_on(signal: &str) {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, addr) = spawn_listening(dir.path().to_str().unwrap());
    let (status, body) = http_get(&format!("http://{addr}/readyz")).await;
    assert_eq!(
        (status, body),
        (200, serde_json::json!({"status": "ok", "bus": "memory"}))
    );

    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws"))
        .await
        .unwrap();
    use futures_util::StreamExt;
    let hello = ws.next().await.unwrap().unwrap();
    assert!(hello.to_text().unwrap().contains("@@patchbay/CONNECTED"));

    let kill = Command::new("kill")
        .args([format!("-{signal}"), child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let close = tokio::time::timeout(WAIT, async {
        loop {
            match ws.next().await {
                Some(Ok(tokio_tungstenite::tungstenite::Message::Close(frame))) => return frame,
                Some(Ok(_)) => continue,
                _ => return None,
            }
        }
    })
    .await
    .expect("closed in time");
    assert_eq!(close.map(|f| u16::from(f.code)), Some(1001));
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0));
}

#[tokio::test]
async fn a_killed_patchbay_takes_its_jobs_process_groups_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let pids = dir.path().join("pids");
    // The job and a grandchild that ignores SIGTERM each note their pid, then wait.
    let script = format!(
        "echo $$ >> {p}; (trap '' TERM; sleep 60) & echo $! >> {p}; wait",
        p = pids.display()
    );
    let manifest = serde_json::json!({
        "JOB_START": {"task": {"queue": "q", "command": ["/bin/sh", "-c", script]}}
    });
    std::fs::write(dir.path().join("jobs.json"), manifest.to_string()).unwrap();
    let (mut child, addr) = spawn_listening(dir.path().to_str().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws"))
        .await
        .unwrap();
    use futures_util::SinkExt;
    ws.send(tokio_tungstenite::tungstenite::Message::Text(
        r#"{"type":"JOB_START_REQUEST","meta":{"requestId":"r1"}}"#.into(),
    ))
    .await
    .unwrap();
    let started = std::time::Instant::now();
    let job_pids: Vec<u32> = loop {
        let text = std::fs::read_to_string(&pids).unwrap_or_default();
        let found: Vec<u32> = text.lines().filter_map(|l| l.trim().parse().ok()).collect();
        if found.len() == 2 {
            break found;
        }
        assert!(started.elapsed() < WAIT, "the job started: {text:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(job_pids.iter().all(|&p| alive(p)));

    child.kill().unwrap(); // SIGKILL: no chance to clean up
    child.wait().unwrap();
    let killed = std::time::Instant::now();
    while job_pids.iter().any(|&p| alive(p)) && killed.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        job_pids.iter().all(|&p| !alive(p)),
        "the job and its grandchild died with patchbay"
    );
    assert!(
        killed.elapsed() < Duration::from_secs(1),
        "{:?}",
        killed.elapsed()
    );
}

/// What an on-call engineer reads: every connection's `connected` and `disconnected` at
/// info with its client address and user, and every refused handshake with the client, the
/// status and the code.
#[tokio::test]
async fn connections_and_refusals_are_logged_with_the_client_and_the_user() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = patchbay(&[
        ("PATCHBAY_ACTIONS", dir.path().to_str().unwrap()),
        ("PATCHBAY_LISTEN", "127.0.0.1:0"),
        ("PATCHBAY_LOG_FORMAT", "json"),
        ("PATCHBAY_JWT_SECRET", SECRET),
    ])
    .stdout(Stdio::piped())
    .spawn()
    .unwrap();
    let lines = first_line(&mut child, |l| Some(l.to_string()));
    let next = |what: &str| -> serde_json::Value {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let line = lines
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no log line {what}"));
            let log: serde_json::Value = serde_json::from_str(&line).expect("a JSON line");
            let message = log["fields"]["message"].as_str().unwrap_or_default();
            if message == what || message.starts_with(&format!("{what} ")) {
                return log;
            }
        }
    };
    let listening = next("listening");
    let addr = listening["fields"]["message"]
        .as_str()
        .unwrap()
        .trim_start_matches("listening on ")
        .to_string();
    let token = jwt(serde_json::json!({"sub": "42", "exp": now() + 60}));
    let url = format!("ws://{addr}/ws?token={token}");
    let (mut ws, _) = tokio_tungstenite::connect_async(url.as_str())
        .await
        .unwrap();
    let connected = next("connected");
    assert_eq!(connected["level"], "INFO", "{connected}");
    assert_eq!(connected["span"]["client"], "127.0.0.1", "{connected}");
    assert_eq!(connected["span"]["user"], "42", "{connected}");
    assert_eq!(connected["span"]["transport"], "websocket", "{connected}");
    ws.close(None).await.unwrap();
    let ended = next("disconnected by the client");
    assert_eq!(ended["span"]["id"], connected["span"]["id"], "{ended}");
    assert!(ended["fields"]["seconds"].is_u64(), "{ended}");
    let refused = tokio_tungstenite::connect_async(format!("ws://{addr}/ws?token=bad")).await;
    assert!(refused.is_err());
    let log = next("handshake refused");
    assert_eq!(log["level"], "INFO", "{log}");
    assert_eq!(log["fields"]["client"], "127.0.0.1", "{log}");
    assert_eq!(log["fields"]["status"], 401, "{log}");
    assert_eq!(log["fields"]["code"], "unauthorized", "{log}");
    let _ = child.kill();
    let _ = child.wait();
}

/// With fewer file descriptors than `PATCHBAY_MAX_CONNECTIONS` allows for, patchbay says so at
/// start-up and lowers the limit: handshakes past it get 503 `too_many_connections` while
/// probes still answer; and when descriptors do run out, a waiting connection is answered 503
/// at once instead of hanging in the listen backlog.
#[tokio::test]
async fn at_the_file_descriptor_limit_handshakes_and_probes_answer_instead_of_hanging() {
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = patchbay(&[
        ("PATCHBAY_ACTIONS", dir.path().to_str().unwrap()),
        ("PATCHBAY_LISTEN", "127.0.0.1:0"),
    ]);
    // 64 descriptors, soft and hard: patchbay cannot raise them.
    unsafe {
        cmd.pre_exec(|| {
            let limit = libc::rlimit {
                rlim_cur: 64,
                rlim_max: 64,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.stdout(Stdio::piped()).spawn().unwrap();
    let lines = first_line(&mut child, |l| Some(l.to_string()));
    let mut warned = false;
    let addr = loop {
        let line = lines.recv_timeout(WAIT).expect("it starts");
        warned |= line.contains("open-file limit is 64: at most 32 connections");
        if let Some(addr) = line.split("listening on ").nth(1) {
            break addr.trim().to_string();
        }
    };
    assert!(warned, "the lowered limit is logged at start-up");
    // 40 handshakes: 32 sessions, then 503 — every one answered.
    let mut held = Vec::new();
    let mut refused = 0;
    for _ in 0..40 {
        let url = format!("ws://{addr}/ws");
        match tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url.as_str()))
            .await
            .expect("a handshake is answered, never left hanging")
        {
            Ok((ws, _)) => held.push(ws),
            Err(tokio_tungstenite::tungstenite::Error::Http(r)) => {
                assert_eq!(r.status(), 503);
                refused += 1;
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!((held.len(), refused), (32, 8));
    let (status, _) = tokio::time::timeout(WAIT, http_get(&format!("http://{addr}/healthz")))
        .await
        .expect("/healthz answers at the connection limit");
    assert_eq!(status, 200);
    // Now use up the descriptors with connections that send nothing: the next request is
    // still answered, with 503, in well under the 10 s header timeout that would free them.
    let mut idle = Vec::new();
    for _ in 0..40 {
        idle.push(tokio::net::TcpStream::connect(&addr).await.unwrap());
    }
    let started = std::time::Instant::now();
    let (status, body) = tokio::time::timeout(
        Duration::from_secs(5),
        http_get(&format!("http://{addr}/healthz")),
    )
    .await
    .expect("answered while out of descriptors");
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["code"], "too_many_connections");
    assert!(started.elapsed() < Duration::from_secs(5));
    let _ = child.kill();
    let _ = child.wait();
}
