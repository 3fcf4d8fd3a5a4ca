//! Redis for `--redis`: a private `redis-server` when no URL is given, and the wait until
//! patchbay has connected to it.

use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::Request;
use serde_json::Value;

/// How long a step of the start-up may take.
const WAIT: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(50);

/// A `redis-server` on a free port of 127.0.0.1 that keeps nothing on disk; killed on drop.
pub struct PrivateServer {
    pub url: String,
    child: Child,
}

impl PrivateServer {
    pub async fn start() -> Result<PrivateServer, String> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| format!("no free port for redis-server: {e}"))?
            .port();
        let mut command = Command::new("redis-server");
        command
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        // Gone with the demo even when the demo is SIGKILLed.
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command.spawn().map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => "redis-server is not installed: install it \
                    (`apt-get install redis-server` on Debian/Ubuntu, `brew install redis` on \
                    macOS) or pass the URL of a running Redis after --redis"
                .to_string(),
            _ => format!("cannot run redis-server: {e}"),
        })?;
        // From here on, dropping `server` kills the child, whatever goes wrong.
        let mut server = PrivateServer {
            url: format!("redis://127.0.0.1:{port}"),
            child,
        };
        let deadline = tokio::time::Instant::now() + WAIT;
        while connect(&server.url).await.is_err() {
            if let Ok(Some(status)) = server.child.try_wait() {
                return Err(format!("redis-server stopped at once ({status})"));
            }
            if tokio::time::Instant::now() > deadline {
                return Err(format!("redis-server did not answer on port {port}"));
            }
            tokio::time::sleep(POLL).await;
        }
        Ok(server)
    }
}

impl Drop for PrivateServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A command connection, or why there is none.
pub async fn connect(url: &str) -> Result<redis::aio::MultiplexedConnection, String> {
    let client = redis::Client::open(url).map_err(|e| format!("bad Redis URL `{url}`: {e}"))?;
    let connecting = client.get_multiplexed_async_connection();
    match tokio::time::timeout(WAIT, connecting).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => {
            // Some Redis errors span lines (a parse error quotes what the server sent).
            let e = e
                .to_string()
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ");
            Err(format!("cannot connect to Redis at {url}: {e}"))
        }
        Err(_) => Err(format!("cannot connect to Redis at {url}: timed out")),
    }
}

/// Polls patchbay's `GET /readyz` until it reports `"bus":"connected"`. Task progress arrives
/// through patchbay's subscription to the task channels, so anything published before it
/// exists would be lost.
pub async fn wait_connected(patchbay: SocketAddr) -> Result<(), String> {
    let mut last = String::from("no answer");
    let poll = async {
        loop {
            match readyz(patchbay).await {
                Ok(v) if v["bus"] == "connected" => return,
                Ok(v) => last = v.to_string(),
                Err(e) => last = e,
            }
            tokio::time::sleep(POLL).await;
        }
    };
    if tokio::time::timeout(WAIT, poll).await.is_err() {
        return Err(format!(
            "patchbay did not connect to Redis within {} s (last /readyz: {last})",
            WAIT.as_secs()
        ));
    }
    Ok(())
}

async fn readyz(patchbay: SocketAddr) -> Result<Value, String> {
    let req = Request::get("/readyz")
        .body(Full::default())
        .map_err(|e| e.to_string())?;
    let resp = crate::api::send(patchbay, req).await?;
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    serde_json::from_slice(&body).map_err(|e| e.to_string())
}
