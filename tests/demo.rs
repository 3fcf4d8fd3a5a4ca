//! The demo a newcomer runs first (`cargo run --example demo`) must keep working: run the
//! compiled example with `--once` and check the whole scripted conversation succeeded, with
//! the in-memory bus and with `--redis` (a private `redis-server`, which must be installed);
//! and run it as a server to check what the demo page relies on: the page and the shim's
//! modules served safely, the manifests, the page's origin admitted by patchbay, and the
//! endpoints that stop and start patchbay. (The page itself is tested in a browser by the
//! shim's tests.)
//!
//! `cargo test --all-targets` (and plain `cargo test`) builds the examples before running
//! tests, into `target/<profile>/examples/`. Cargo gives integration tests no variable
//! pointing at example binaries, so the binary is found next to this test's own executable,
//! which lives in `target/<profile>/deps/`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The scripted client waits at most 10 s per step; the whole run takes about 3 s.
const DEADLINE: Duration = Duration::from_secs(90);
/// An app's dev server the demo is started to allow (`--allow-origin`).
const DEV_SERVER: &str = "http://localhost:5173";

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
        // Port 0: never collide with a running demo, patchbay or another test.
        .args(["--api-listen", "127.0.0.1:0"])
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
        stdout.contains("NOTES_FETCH_SUCCESS") && stdout.contains("\"subscribed\":\"notes\""),
        "the notes list did not join the room `notes`\n{report}"
    );
    assert!(
        stdout.contains("NOTE_ADDED") && stdout.contains("\"room\":\"notes\""),
        "the API's push of the new note never arrived\n{report}"
    );
    assert!(
        stdout.contains("TASK_ENQUEUE_SUCCESS") && stdout.contains("\"subscribed\":\"task:"),
        "no subscribed enqueue\n{report}"
    );
    assert!(
        stdout.contains("succeeded step 5 of 5")
            && stdout.contains("final status: succeeded, result: {\"steps\":5}"),
        "the job's command did not report its steps and result\n{report}"
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
        stdout.contains("TASK_CANCEL_FAILURE") && stdout.contains("\"code\":\"conflict\""),
        "cancelling a finished task was not a conflict\n{report}"
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
        stdout.contains("bus       in-memory")
            && stdout.contains("tasks     patchbay's embedded queue"),
        "no in-memory bus or embedded queue in the banner\n{report}"
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
    assert_whole_script(&stdout, &report);
    // The jobs ran in a separate worker process, which is gone with the demo.
    let worker: i32 = stdout
        .split("run by a separate worker process (pid ")
        .nth(1)
        .and_then(|rest| rest.split(')').next())
        .and_then(|pid| pid.parse().ok())
        .unwrap_or_else(|| panic!("no worker process in the banner\n{report}"));
    assert!(
        !std::path::Path::new(&format!("/proc/{worker}")).exists()
            || std::fs::read_to_string(format!("/proc/{worker}/stat"))
                .is_ok_and(|stat| stat.contains(") Z ")),
        "the worker process {worker} outlived the demo\n{report}"
    );

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

/// The demo running as a server; killed on drop, so a failing test leaves nothing behind.
struct Served {
    child: Child,
    /// The API's address, which also serves the page.
    api: SocketAddr,
    /// patchbay's address.
    patchbay: SocketAddr,
    lines: mpsc::Receiver<String>,
    /// Everything printed so far, for failure messages.
    seen: String,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the demo with `args` (the API on a free port, quiet logs): the process and its
/// stdout's lines.
fn spawn_demo(args: &[&str]) -> (Child, mpsc::Receiver<String>) {
    let mut child = Command::new(demo_binary())
        .args(["--api-listen", "127.0.0.1:0"])
        .args(args)
        .env("PATCHBAY_LISTEN", "127.0.0.1:0")
        .env("PATCHBAY_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("the demo starts");
    let (tx, lines) = mpsc::channel();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    std::thread::spawn(move || {
        for line in stdout.lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (child, lines)
}

impl Served {
    fn start() -> Served {
        let (child, lines) = spawn_demo(&["--allow-origin", DEV_SERVER]);
        let mut served = Served {
            child,
            api: "0.0.0.0:0".parse().unwrap(),
            patchbay: "0.0.0.0:0".parse().unwrap(),
            lines,
            seen: String::new(),
        };
        let page = served.wait_for("open http://");
        served.api = between(&page, "open http://", "/ in a browser");
        let bridge = served.wait_for("patchbay  ws://");
        served.patchbay = between(&bridge, "ws://", "/ws");
        served
    }

    /// The next line of stdout containing `text`.
    fn wait_for(&mut self, text: &str) -> String {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push_str(&line);
                    self.seen.push('\n');
                    if line.contains(text) {
                        return line;
                    }
                }
                Err(_) => panic!("the demo never printed `{text}`\n--- stdout\n{}", self.seen),
            }
        }
    }
}

fn between(line: &str, start: &str, end: &str) -> SocketAddr {
    line.split(start)
        .nth(1)
        .and_then(|rest| rest.split(end).next())
        .and_then(|addr| addr.parse().ok())
        .unwrap_or_else(|| panic!("no address in `{line}`"))
}

struct Reply {
    status: u16,
    head: String,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().find_map(|line| {
            let (k, v) = line.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

/// One HTTP/1.1 exchange on a fresh connection, the request written by hand so that paths
/// reach the server exactly as given (no client normalises `..` away).
fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> std::io::Result<Reply> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        request.push_str(&format!("{k}: {v}\r\n"));
    }
    if method == "POST" {
        request.push_str("Content-Length: 2\r\n\r\n{}");
    } else {
        request.push_str("\r\n");
    }
    stream.write_all(request.as_bytes())?;
    let mut reader = BufReader::new(stream);
    let mut head = String::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" {
            break;
        }
        head.push_str(&line);
    }
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {head:?}"));
    let mut body = String::new();
    // A websocket upgrade keeps the connection open: its head is all there is to read.
    if status != 101 {
        reader.read_to_string(&mut body)?;
    }
    Ok(Reply { status, head, body })
}

fn get(addr: SocketAddr, path: &str) -> Reply {
    http(addr, "GET", path, &[]).unwrap_or_else(|e| panic!("GET {path}: {e}"))
}

fn post_json(addr: SocketAddr, path: &str) -> Reply {
    http(addr, "POST", path, &[("Content-Type", "application/json")])
        .unwrap_or_else(|e| panic!("POST {path}: {e}"))
}

/// A browser's websocket handshake to patchbay from a page of `origin`.
fn handshake(patchbay: SocketAddr, origin: &str) -> u16 {
    let headers = [
        ("Origin", origin),
        ("Upgrade", "websocket"),
        ("Sec-WebSocket-Version", "13"),
        ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
    ];
    // `Connection: close` would contradict the upgrade, so this one is written here.
    let mut stream = TcpStream::connect_timeout(&patchbay, Duration::from_secs(5)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut request = format!("GET /ws HTTP/1.1\r\nHost: {patchbay}\r\nConnection: Upgrade\r\n");
    for (k, v) in headers {
        request.push_str(&format!("{k}: {v}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).unwrap();
    let mut status = String::new();
    BufReader::new(stream).read_line(&mut status).unwrap();
    status
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap()
}

#[test]
fn no_bridge_prints_every_variable_patchbay_needs() {
    let (mut child, lines) = spawn_demo(&[
        "--no-bridge",
        "--bridge-addr",
        "127.0.0.1:9",
        "--publish-token",
        "tok-tok-tok-tok-1",
        "--allow-origin",
        DEV_SERVER,
    ]);
    let mut printed = String::new();
    while !printed.contains("Press ctrl-c") {
        match lines.recv_timeout(DEADLINE) {
            Ok(line) => printed.push_str(&(line + "\n")),
            Err(_) => break,
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    for var in [
        "PATCHBAY_LISTEN=127.0.0.1:9",
        "PATCHBAY_API_URL=http://127.0.0.1:",
        "PATCHBAY_PUBLISH_TOKEN=tok-tok-tok-tok-1",
        "PATCHBAY_JWT_SECRET=",
        "PATCHBAY_ROOM_SECRET=",
        "PATCHBAY_PUBLIC_ROOMS=watch:*",
        "PATCHBAY_PRESENCE_ROOMS=watch:*",
        "PATCHBAY_PRESENCE_GRACE_MS=3000",
        DEV_SERVER,
    ] {
        assert!(printed.contains(var), "{var} missing from:\n{printed}");
    }
}

#[test]
fn demo_serves_the_page_and_stops_and_starts_patchbay() {
    let mut demo = Served::start();
    let (api, patchbay) = (demo.api, demo.patchbay);

    let page = get(api, "/");
    assert_eq!(page.status, 200);
    assert_eq!(
        page.header("content-type"),
        Some("text/html; charset=utf-8")
    );
    assert!(page.body.contains(r#"src="/app.js""#), "{}", page.body);
    let app = get(api, "/app.js");
    assert_eq!(
        app.header("content-type"),
        Some("text/javascript; charset=utf-8")
    );
    assert!(app.body.contains("from '/shim/index.js'"));
    let shim = get(api, "/shim/index.js");
    assert_eq!(shim.status, 200);
    assert_eq!(
        shim.header("content-type"),
        Some("text/javascript; charset=utf-8")
    );
    assert!(shim.body.contains("export function createPatchbay"));
    assert_eq!(
        get(api, "/styles.css").header("content-type"),
        Some("text/css; charset=utf-8")
    );

    // Nothing outside the page's and the shim's directories.
    for path in [
        "/shim/../Cargo.toml",
        "/shim/..%2FCargo.toml",
        "/shim/%2e%2e/Cargo.toml",
        "/..%2fCargo.toml",
        "/../Cargo.toml",
        "/shim/../../Cargo.toml",
        "/Cargo.toml",
        "/shim/index.d.ts",
        "/shim/",
        "/demo/app.js",
    ] {
        assert_eq!(get(api, path).status, 404, "{path} was served");
    }

    // What the page loads before it connects: the manifests (with the polling the fallback
    // uses for notes, and the task actions) and where patchbay is.
    let actions: serde_json::Value = serde_json::from_str(&get(api, "/actions").body).unwrap();
    assert_eq!(
        actions["NOTES_FETCH"]["client"]["poll"]["action"],
        "NOTES_FETCH"
    );
    assert_eq!(actions["TASK_ENQUEUE"]["task"]["queue"], "demo");
    let config: serde_json::Value = serde_json::from_str(&get(api, "/demo/config").body).unwrap();
    assert_eq!(config["patchbay"], format!("ws://{patchbay}/ws"));
    assert_eq!(config["controls"], true);

    // patchbay admits the page's origins, and no other.
    assert_eq!(handshake(patchbay, &format!("http://{api}")), 101);
    assert_eq!(
        handshake(patchbay, &format!("http://localhost:{}", api.port())),
        101
    );
    assert_eq!(handshake(patchbay, "http://evil.example"), 403);

    // An app on its own dev server (`--allow-origin`): patchbay admits it and lets it read
    // the manifests, and the API answers it with CORS, preflights included.
    assert_eq!(handshake(patchbay, DEV_SERVER), 101);
    let from_dev = [("Origin", DEV_SERVER)];
    let manifest = http(patchbay, "GET", "/actions", &from_dev).unwrap();
    assert_eq!(
        manifest.header("access-control-allow-origin"),
        Some(DEV_SERVER)
    );
    let notes = http(api, "GET", "/notes", &from_dev).unwrap();
    assert_eq!(notes.status, 200);
    assert_eq!(
        notes.header("access-control-allow-origin"),
        Some(DEV_SERVER)
    );
    assert_eq!(
        notes.header("access-control-allow-credentials"),
        Some("true")
    );
    let preflight = http(
        api,
        "OPTIONS",
        "/notes",
        &[
            ("Origin", DEV_SERVER),
            ("Access-Control-Request-Method", "POST"),
            (
                "Access-Control-Request-Headers",
                "content-type, idempotency-key",
            ),
        ],
    )
    .unwrap();
    assert_eq!(preflight.status, 204);
    assert!(
        preflight
            .header("access-control-allow-headers")
            .is_some_and(|h| h.contains("idempotency-key") && h.contains("x-request-id"))
    );
    let foreign = http(api, "GET", "/notes", &[("Origin", "http://evil.example")]).unwrap();
    assert_eq!(foreign.header("access-control-allow-origin"), None);

    // Stopping patchbay while the scripted client runs would fail the script: let it finish.
    demo.wait_for("Press ctrl-c to stop.");

    // A foreign page can post a form, but not JSON without a preflight, which is refused.
    let refused = http(
        api,
        "POST",
        "/demo/patchbay/stop",
        &[("Content-Type", "text/plain")],
    )
    .unwrap();
    assert_eq!(refused.status, 415);
    assert_eq!(get(patchbay, "/healthz").status, 200);

    let stopped = post_json(api, "/demo/patchbay/stop");
    assert_eq!(stopped.status, 200, "{}", stopped.body);
    assert!(
        stopped.body.contains(r#""running":false"#),
        "{}",
        stopped.body
    );
    assert!(
        http(patchbay, "GET", "/healthz", &[]).is_err(),
        "patchbay still answers after the stop"
    );
    // The API keeps working without patchbay: that is the page's fallback.
    assert_eq!(get(api, "/notes").status, 200);

    let started = post_json(api, "/demo/patchbay/start");
    assert_eq!(started.status, 200, "{}", started.body);
    assert!(
        started.body.contains(r#""running":true"#),
        "{}",
        started.body
    );
    assert!(
        started.body.contains(&patchbay.to_string()),
        "{}",
        started.body
    );
    assert_eq!(get(patchbay, "/healthz").status, 200);
    assert_eq!(handshake(patchbay, &format!("http://{api}")), 101);
}
