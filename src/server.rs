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
    let accept = |stream: io::Result<(TcpStream, SocketAddr)>| match stream {
        Ok((stream, _)) => {
            http_conns.spawn(serve_connection(stream, app.clone(), http_stop.clone()));
            None
        }
        // Out of file descriptors and the like: back off instead of spinning.
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
