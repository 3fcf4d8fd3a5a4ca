//! The demo a newcomer runs first (`cargo run --example demo`) must keep working: run the
//! compiled example with `--once` and check the whole scripted conversation succeeded, with
//! the in-memory bus and with `--redis` (a private `redis-server`, which must be installed).
//!
//! `cargo test --all-targets` (and plain `cargo test`) builds the examples before running
//! tests, into `target/<profile>/examples/`. Cargo gives integration tests no variable
//! pointing at example binaries, so the binary is found next to this test's own executable,
//! which lives in `target/<profile>/deps/`.

use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The scripted client waits at most 10 s per step; the whole run takes about 3 s.
const DEADLINE: Duration = Duration::from_secs(90);

fn demo_binary() -> PathBuf {
    let test_exe = std::env::current_exe().expect("the test knows its own path");
    let profile_dir = test_exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("tests run from target/<profile>/deps");
    let bin = profile_dir
        .join("examples")
        .join(format!("demo{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.exists(),
        "the demo example is not built ({} is missing): run `cargo build --examples` \
         or `cargo test --all-targets`",
        bin.display()
    );
    bin
}

/// Reads a child's pipe to the end on a thread, so a full pipe never blocks the child.
fn drain(mut pipe: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut out = String::new();
        let _ = pipe.read_to_string(&mut out);
        out
    })
}

/// Runs the demo with `args` until it exits; returns its stdout and a report of both pipes.
fn run_demo(args: &[&str]) -> (String, String) {
    let mut child = Command::new(demo_binary())
        .args(args)
        // Port 0: never collide with a running patchbay or another test.
        .env("PATCHBAY_LISTEN", "127.0.0.1:0")
        .env("PATCHBAY_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the demo starts");
    let stdout = drain(child.stdout.take().unwrap());
    let stderr = drain(child.stderr.take().unwrap());

    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if started.elapsed() > DEADLINE {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stdout = stdout.join().unwrap();
    let stderr = stderr.join().unwrap();
    let report = format!("--- stdout\n{stdout}\n--- stderr\n{stderr}");

    let status =
        status.unwrap_or_else(|| panic!("the demo did not exit within {DEADLINE:?}\n{report}"));
    assert!(status.success(), "the demo failed ({status})\n{report}");
    (stdout, report)
}

/// Every step of the scripted client showed what it should.
fn assert_whole_script(stdout: &str, report: &str) {
    assert!(
        stdout.contains("@@patchbay/CONNECTED"),
        "no greeting\n{report}"
    );
    assert!(
        stdout.contains("TASK_ENQUEUE_SUCCESS") && stdout.contains("\"subscribed\""),
        "no subscribed enqueue\n{report}"
    );
    assert!(
        stdout.contains("[####################] 100%"),
        "progress never reached 100%\n{report}"
    );
    assert!(
        stdout.contains("TASK_CANCEL_SUCCESS") && stdout.contains("final status: cancelled"),
        "no cancel\n{report}"
    );
    assert!(
        stdout.contains("TASK_ENQUEUE_FAILURE") && stdout.contains("\"code\":\"invalid_payload\""),
        "no invalid_payload failure\n{report}"
    );
}

#[test]
fn demo_once_runs_the_whole_script() {
    let (stdout, report) = run_demo(&["--once"]);
    assert!(
        stdout.contains("bus       in-memory"),
        "no in-memory bus in the banner\n{report}"
    );
    assert_whole_script(&stdout, &report);
}

#[test]
fn demo_once_with_redis_runs_the_whole_script() {
    // Fail, never skip: a missing redis-server would otherwise hide a broken Redis demo.
    if let Err(e) = Command::new("redis-server").arg("--version").output() {
        panic!(
            "cannot run redis-server ({e}): this test needs it on PATH; install it with \
             `apt-get install redis-server` (Debian/Ubuntu) or `brew install redis`"
        );
    }
    let (stdout, report) = run_demo(&["--once", "--redis"]);
    assert!(
        stdout.contains("(a private redis-server, stopped on exit)"),
        "no private Redis in the banner\n{report}"
    );
    assert!(
        stdout.contains("PUBLISH tasks."),
        "progress was not published on Redis\n{report}"
    );
    assert_whole_script(&stdout, &report);

    // The demo stops its redis-server before exiting.
    let port = stdout
        .split("redis://127.0.0.1:")
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|port| port.parse::<u16>().ok())
        .unwrap_or_else(|| panic!("no Redis URL in the banner\n{report}"));
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "redis-server still answers on port {port} after the demo exited\n{report}"
    );
}
