//! The processes of a run: a private redis-server, the server under test pinned to core 0, and
//! what is read about them from /proc (CPU time, RSS).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where the server and the load run.
#[derive(Debug, Clone)]
pub struct Pinning {
    /// `taskset -c 0` in front of every server command.
    pub server_prefix: Vec<String>,
    /// What the report says about it.
    pub note: String,
}

impl Pinning {
    /// Pins this process (the load: clients, publisher, upstream, and the redis-server it
    /// starts) to core 1 and servers to core 0, when there are two cores and taskset.
    pub fn setup(wanted: bool) -> Pinning {
        let none = |note: &str| Pinning {
            server_prefix: Vec::new(),
            note: note.to_string(),
        };
        if !wanted {
            return none("not pinned (--no-pin)");
        }
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        if cores < 2 {
            return none("not pinned: fewer than 2 cores, server and load share the CPU");
        }
        let own = std::process::id().to_string();
        // Before the runtime starts: threads created later inherit the mask.
        let pinned = Command::new("taskset")
            .args(["-acp", "1", &own])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !pinned {
            return none("not pinned: taskset is missing or failed (install util-linux)");
        }
        Pinning {
            server_prefix: vec!["taskset".into(), "-c".into(), "0".into()],
            note: "server on core 0, load (clients, publisher, upstream, redis) on core 1".into(),
        }
    }
}

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free local port")
}

/// A child process that is killed when dropped.
pub struct Proc {
    pub child: Child,
    pub name: String,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails if the process already exited (with its exit status).
    pub fn check_alive(&mut self) -> Result<(), String> {
        match self.child.try_wait() {
            Ok(Some(status)) => Err(format!("{} exited early ({status})", self.name)),
            _ => Ok(()),
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Spawns `argv` (after the pinning prefix) with `env`, output discarded unless `log` is set.
pub fn spawn(
    name: &str,
    prefix: &[String],
    argv: &[String],
    env: &[(String, String)],
    cwd: Option<&Path>,
    log: Option<&Path>,
) -> Result<Proc, String> {
    let full: Vec<&String> = prefix.iter().chain(argv.iter()).collect();
    let mut cmd = Command::new(full[0]);
    cmd.args(&full[1..]).stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    if let Some(dir) = cwd {
        cmd.current_dir(dir);
    }
    match log.map(std::fs::File::create) {
        Some(Ok(f)) => {
            let f2 = f.try_clone().map_err(|e| e.to_string())?;
            cmd.stdout(f).stderr(f2);
        }
        _ => {
            cmd.stdout(Stdio::null()).stderr(Stdio::null());
        }
    }
    let child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {name} ({}): {e}", argv[0]))?;
    Ok(Proc {
        child,
        name: name.to_string(),
    })
}

/// Waits until `addr` accepts TCP connections.
pub async fn wait_listening(
    proc: &mut Proc,
    addr: SocketAddr,
    timeout: Duration,
) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        proc.check_alive()?;
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "{} did not listen on {addr} within {timeout:?}",
                proc.name
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One blocking HTTP/1.0 GET; the whole response as text. For readiness checks only.
pub fn http_get(addr: SocketAddr, path: &str) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

/// One blocking HTTP/1.0 JSON POST with a bearer token; the response status.
pub fn http_post(addr: SocketAddr, path: &str, token: &str, body: &str) -> Result<u16, String> {
    let mut s =
        TcpStream::connect_timeout(&addr, Duration::from_secs(1)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(|e| e.to_string())?;
    write!(
        s,
        "POST {path} HTTP/1.0\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .map_err(|e| e.to_string())?;
    let mut out = String::new();
    s.read_to_string(&mut out).map_err(|e| e.to_string())?;
    out.split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| format!("not an HTTP answer: {out:.80}"))
}

/// A private redis-server on a free port, without persistence.
pub async fn start_redis() -> Result<(Proc, String), String> {
    start_redis_under(&[]).await
}

/// [`start_redis`], run under `prefix` (a profiler, for example).
pub async fn start_redis_under(prefix: &[String]) -> Result<(Proc, String), String> {
    start_redis_with(prefix, free_port(), &[]).await
}

/// A private redis-server on `port`, under `prefix`, with `extra` arguments.
async fn start_redis_with(
    prefix: &[String],
    port: u16,
    extra: &[String],
) -> Result<(Proc, String), String> {
    let mut argv: Vec<String> = [
        "redis-server",
        "--port",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    argv.extend_from_slice(extra);
    let mut proc = spawn("redis-server", prefix, &argv, &[], None, None)
        .map_err(|e| format!("{e}: install redis-server (apt-get install redis-server)"))?;
    wait_listening(
        &mut proc,
        SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_secs(10),
    )
    .await?;
    Ok((proc, format!("redis://127.0.0.1:{port}/")))
}

/// A private redis-server with a TLS port beside its plain one, its certificate made with
/// `openssl` (a CA, and a server certificate for `localhost`) in `dir/tls`: the server, its
/// plain URL, its `rediss://localhost` URL, and the CA file.
pub async fn start_redis_tls(
    dir: &std::path::Path,
) -> Result<(Proc, String, String, std::path::PathBuf), String> {
    let tls = dir.join("tls");
    std::fs::create_dir_all(&tls).map_err(|e| e.to_string())?;
    let openssl = |args: &[&str]| -> Result<(), String> {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(&tls)
            .output()
            .map_err(|e| format!("openssl: {e}: install openssl"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    };
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=bench ca",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
    ])?;
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=localhost",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
    ])?;
    std::fs::write(tls.join("san.ext"), "subjectAltName=DNS:localhost\n")
        .map_err(|e| e.to_string())?;
    openssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "san.ext",
        "-out",
        "server.pem",
    ])?;
    let tls_port = free_port();
    let path = |name: &str| tls.join(name).display().to_string();
    let extra: Vec<String> = [
        "--tls-port",
        &tls_port.to_string(),
        "--tls-cert-file",
        &path("server.pem"),
        "--tls-key-file",
        &path("server.key"),
        "--tls-ca-cert-file",
        &path("ca.pem"),
        "--tls-auth-clients",
        "no",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let (proc, plain) = start_redis_with(&[], free_port(), &extra).await?;
    Ok((
        proc,
        plain,
        format!("rediss://localhost:{tls_port}/"),
        tls.join("ca.pem"),
    ))
}

/// Clock ticks per second of /proc/<pid>/stat times.
pub fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// User + system CPU time of `pid` (all its threads), in clock ticks.
pub fn cpu_ticks(pid: u32) -> u64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    // The command name, in parentheses, may contain spaces: fields are counted after it.
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
        return 0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state); utime and stime are fields 14 and 15.
    let utime: u64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0);
    let stime: u64 = fields.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    utime + stime
}

/// Resident set size of `pid`, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmRSS:")
}

/// The kernel's memory that sockets take, machine-wide, in KiB: the slab caches (socket
/// structures, their files and epoll entries) and the pages of socket buffers (`mem` of TCP
/// in /proc/net/sockstat). 0 where unreadable.
pub fn kernel_socket_kib() -> u64 {
    let slab = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Slab:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .unwrap_or(0);
    let buffer_pages = std::fs::read_to_string("/proc/net/sockstat")
        .ok()
        .and_then(|s| {
            let tcp = s.lines().find(|l| l.starts_with("TCP:"))?.to_owned();
            let mut words = tcp.split_whitespace();
            words.find(|w| *w == "mem")?;
            words.next()?.parse::<u64>().ok()
        })
        .unwrap_or(0);
    slab + buffer_pages * 4
}

/// The peak resident set size of `pid` so far, in KiB.
pub fn peak_rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmHWM:")
}

fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// The `patchbay` binary: `--patchbay PATH`, else next to this executable (cargo puts both in
/// `target/<profile>/`), else the other profile's.
pub fn find_patchbay(explicit: Option<&PathBuf>) -> Result<PathBuf, String> {
    if let Some(p) = explicit {
        return if p.is_file() {
            Ok(p.clone())
        } else {
            Err(format!("--patchbay {}: no such file", p.display()))
        };
    }
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let dir = exe.parent().ok_or("no executable directory")?;
    let mut candidates = vec![dir.join("patchbay")];
    if let Some(target) = dir.parent() {
        for profile in ["release", "debug"] {
            candidates.push(target.join(profile).join("patchbay"));
        }
    }
    candidates
        .into_iter()
        .find(|p| p.is_file())
        .ok_or_else(|| {
            format!(
                "the patchbay binary is not built next to the bench ({}): run `cargo build --release` (or `cargo build` for a debug run) first, or pass --patchbay PATH",
                dir.display()
            )
        })
}

/// Machine description for the report.
pub fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    // Counted from /proc, not from the affinity mask: this process is pinned to one core.
    let cores = cpuinfo
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count()
        .max(1);
    let model = Some(cpuinfo)
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    format!("{cores} cores, {model}")
}
