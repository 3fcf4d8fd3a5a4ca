//! The accept loop and graceful shutdown.
//!
//! patchbay accepts TCP itself (TCP_NODELAY on every socket) and serves each connection with
//! hyper's HTTP/1 server; `/ws` upgrades leave hyper for [`crate::session`].
//!
//! Shutdown: `/readyz` turns 503 `draining` and new handshakes get 503 while sessions finish
//! their in-flight requests (up to `PATCHBAY_SHUTDOWN_GRACE_SECS`) and close with 1001; then
//! the listener closes and idle HTTP connections are shut down.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::app::App;

/// How long a client may take to send request headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Extra time after the grace period for sessions to write their close frames and let their
/// clients close: the writer's close budget, the linger, and a second to spare.
const CLOSE_ALLOWANCE: Duration =
    Duration::from_secs(crate::writer::CLOSE_TIMEOUT.as_secs() + crate::ws::LINGER.as_secs() + 1);

/// Binds `addr` with SO_REUSEADDR, so a restarted instance can rebind at once.
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

/// Serves `listener` until `shutdown` resolves, then drains and returns.
pub async fn run(listener: TcpListener, app: Arc<App>, shutdown: impl Future<Output = ()>) {
    let http_stop = CancellationToken::new();
    let http_conns = TaskTracker::new();
    let mut spare = Spare::new();
    let mut accept = |stream: io::Result<(TcpStream, SocketAddr)>| match stream {
        Ok((stream, _)) => {
            http_conns.spawn(serve_connection(stream, app.clone(), http_stop.clone()));
            None
        }
        // Out of file descriptors: the waiting connection gets 503 through the spare one
        // rather than hanging in the backlog.
        Err(e) if spare.shed(&listener, &e) => None,
        // Anything else: back off instead of spinning.
        Err(e) => {
            tracing::warn!(error = %e, "accept failed");
            Some(tokio::time::sleep(Duration::from_millis(100)))
        }
    };

    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            res = listener.accept() => if let Some(backoff) = accept(res) { backoff.await },
        }
    }

    tracing::info!(
        connections = app.lifecycle.connections(),
        "shutting down: draining"
    );
    app.lifecycle.begin_drain();
    let sessions_done = tokio::time::timeout(
        app.config.shutdown_grace + CLOSE_ALLOWANCE,
        app.lifecycle.sessions().wait(),
    );
    tokio::pin!(sessions_done);
    // Keep answering HTTP while sessions drain, so probes see `draining` rather than a refusal.
    loop {
        tokio::select! {
            res = &mut sessions_done => {
                if res.is_err() { tracing::warn!("some sessions did not finish in time"); }
                break;
            }
            res = listener.accept() => if let Some(backoff) = accept(res) { backoff.await },
        }
    }
    drop(listener);
    // Jobs still running go back to the queue for another worker.
    app.lifecycle.stop_workers().await;
    http_stop.cancel();
    http_conns.close();
    let _ = tokio::time::timeout(Duration::from_secs(2), http_conns.wait()).await;
    tracing::info!("stopped");
}

/// The answer to a connection accepted when file descriptors ran out.
const OUT_OF_FDS: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: 84\r\n\r\n{\"code\":\"too_many_connections\",\"message\":\"this instance is out of file descriptors\"}";

/// A file descriptor kept in reserve: when `accept` fails for lack of descriptors, it is
/// given up for a moment to accept the waiting connection, answer it 503 and close it.
struct Spare {
    file: Option<std::fs::File>,
    /// When the last warning was logged (at most one a minute).
    warned: Option<std::time::Instant>,
    shed: u64,
}

impl Spare {
    fn new() -> Spare {
        Spare {
            file: std::fs::File::open("/dev/null").ok(),
            warned: None,
            shed: 0,
        }
    }

    /// Whether `e` was the lack of descriptors and was dealt with: the waiting connection
    /// answered, or none waiting (Linux reports the lack even with an empty backlog, as it
    /// takes the descriptor before it looks).
    fn shed(&mut self, listener: &TcpListener, e: &io::Error) -> bool {
        const EMFILE: i32 = 24;
        const ENFILE: i32 = 23;
        if !matches!(e.raw_os_error(), Some(EMFILE | ENFILE)) {
            return false;
        }
        // Lost to another task last time: take one back first.
        if self.file.is_none() {
            self.file = std::fs::File::open("/dev/null").ok();
        }
        if self.file.is_none() {
            return false;
        }
        self.file = None;
        let answered = match listener.accept().now_or_never() {
            Some(Ok((stream, _))) => {
                // Read the request first: closing with it unread would reset the connection,
                // and the client could lose the answer.
                let mut request = [0u8; 4096];
                while matches!(stream.try_read(&mut request), Ok(n) if n > 0) {}
                let _ = stream.try_write(OUT_OF_FDS);
                if let Ok(stream) = stream.into_std() {
                    let _ = stream.shutdown(std::net::Shutdown::Write);
                }
                Some(true)
            }
            // Nobody waiting: the lack was reported for an empty backlog.
            None => Some(false),
            // Still out of descriptors (another task took the spare): back off.
            Some(Err(_)) => None,
        };
        self.file = std::fs::File::open("/dev/null").ok();
        match answered {
            Some(true) => {}
            Some(false) => return true,
            None => return false,
        }
        self.shed += 1;
        if self
            .warned
            .is_none_or(|at| at.elapsed() >= Duration::from_secs(60))
        {
            self.warned = Some(std::time::Instant::now());
            tracing::warn!(
                answered_503 = self.shed,
                "out of file descriptors: new connections are answered 503; raise the open-file limit (LimitNOFILE, ulimit -n) or lower PATCHBAY_MAX_CONNECTIONS"
            );
        }
        true
    }
}

/// The connections an instance can hold with `nofile` file descriptors: a tenth of them (at
/// least 32, at most 1024) stays for Redis, the API, probes and the listener, so that the
/// connection limit answers 503 before descriptors run out.
pub fn connection_cap(configured: usize, nofile: u64) -> usize {
    let reserve = (nofile / 10).clamp(32, 1024);
    let cap = usize::try_from(nofile.saturating_sub(reserve)).unwrap_or(usize::MAX);
    configured.min(cap.max(1))
}

async fn serve_connection(stream: TcpStream, app: Arc<App>, stop: CancellationToken) {
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!(error = %e, "cannot set TCP_NODELAY");
    }
    let remote = stream.peer_addr().ok().map(crate::client_addr::RemoteAddr);
    let routes = warp::service(crate::http::routes(app.clone()));
    let service = service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
        let app = app.clone();
        let mut routes = routes.clone();
        if let Some(remote) = remote {
            req.extensions_mut().insert(remote);
        }
        async move {
            // The websocket upgrade needs the raw request (hyper's upgrade handle): it is the
            // one route outside warp.
            if req.uri().path() == "/ws" {
                return Ok(crate::ws::upgrade(req, app).await);
            }
            tower_service::Service::call(&mut routes, req).await
        }
    });
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = stop.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_connection_limit_leaves_descriptors_for_the_rest() {
        assert_eq!(connection_cap(100_000, 1_048_576), 100_000);
        assert_eq!(connection_cap(100_000, 65_536), 65_536 - 1024);
        assert_eq!(connection_cap(100_000, 1024), 1024 - 102);
        assert_eq!(connection_cap(100_000, 64), 32);
        assert_eq!(connection_cap(10, 64), 10);
        assert_eq!(connection_cap(100, 16), 1);
    }

    #[test]
    fn the_out_of_descriptors_answer_is_complete_http() {
        let text = std::str::from_utf8(OUT_OF_FDS).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(body.len(), length);
        let json: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(json["code"], "too_many_connections");
    }
}
