//! The `GET /ws` upgrade, done at the hyper layer so that patchbay owns tungstenite's
//! [`WebSocketConfig`] (small read buffer, frame and message limits) and the TCP socket.
//!
//! Checks, in order: draining (503), method and websocket headers (400/426), Origin (403),
//! connection limit (503), credentials (401/403/503). Then it answers 101 and runs the session
//! on the upgraded socket.

use std::sync::Arc;

use hyper::body::Incoming;
use hyper::header::{
    CONNECTION, HeaderValue, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY, SEC_WEBSOCKET_VERSION,
    UPGRADE,
};
use hyper::{HeaderMap, Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tracing::Instrument;

use crate::app::App;
use crate::auth;
use crate::http::{Body, error_response};
use crate::session::{self, Peer};

/// Bytes read from the socket at a time, allocated for every connection for its whole life.
/// Client actions are small: 1 KiB holds a typical one in one read, and idle connections stay
/// small (tungstenite's default of 128 KiB would dominate a server's memory). A larger frame
/// grows the buffer to its size while it is read.
const READ_BUFFER: usize = 1024;
/// Frames are written to the socket once this many bytes are buffered, or on flush.
const WRITE_BUFFER: usize = 16 * 1024;

/// The websocket settings of every connection. `max_queue_bytes` is the send queue's byte
/// bound: no frame is larger, so the websocket layer's own buffer never needs more than that
/// and one batch. Bounding it matters: the pongs it writes by itself would otherwise pile up
/// without limit for a client that pings and never reads.
pub fn ws_config(max_message: usize, max_queue_bytes: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER)
        .max_write_buffer_size(WRITE_BUFFER + max_queue_bytes)
        .max_message_size(Some(max_message))
        .max_frame_size(Some(max_message))
}

fn has_token(headers: &HeaderMap, name: hyper::header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Whether `key` is a valid `Sec-WebSocket-Key`: 16 bytes in base64 (RFC 6455 section 4.1).
fn valid_key(key: &HeaderValue) -> bool {
    use base64::Engine;
    let key = key.as_bytes();
    key.len() == 24
        && base64::engine::general_purpose::STANDARD
            .decode(key)
            .is_ok_and(|k| k.len() == 16)
}

/// Handles `GET /ws`.
pub async fn upgrade(req: Request<Incoming>, app: Arc<App>) -> Response<Body> {
    if app.lifecycle.is_draining() {
        return error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "draining",
            "this instance is shutting down",
        );
    }
    let headers = req.headers();
    if req.method() != Method::GET
        || !has_token(headers, UPGRADE, "websocket")
        || !has_token(headers, CONNECTION, "upgrade")
    {
        return error_response(
            StatusCode::BAD_REQUEST,
            "not_websocket",
            "GET /ws must be a websocket upgrade",
        );
    }
    if headers
        .get(SEC_WEBSOCKET_VERSION)
        .map(HeaderValue::as_bytes)
        != Some(b"13")
    {
        let mut resp = error_response(
            StatusCode::UPGRADE_REQUIRED,
            "bad_version",
            "only websocket version 13 is supported",
        );
        resp.headers_mut()
            .insert(SEC_WEBSOCKET_VERSION, HeaderValue::from_static("13"));
        return resp;
    }
    let Some(key) = headers.get(SEC_WEBSOCKET_KEY).filter(|k| valid_key(k)) else {
        return error_response(
            StatusCode::BAD_REQUEST,
            "not_websocket",
            "Sec-WebSocket-Key must be 16 bytes in base64",
        );
    };
    if !auth::origin_allowed(headers, &app.config.allowed_origins) {
        let header = |name| {
            headers
                .get(name)
                .map(|v| crate::error::clip(&String::from_utf8_lossy(v.as_bytes())).into_owned())
        };
        tracing::info!(
            origin = ?header(hyper::header::ORIGIN),
            host = ?header(hyper::header::HOST),
            "refused a foreign origin"
        );
        return error_response(
            StatusCode::FORBIDDEN,
            "forbidden_origin",
            "this origin may not open a websocket here",
        );
    }
    let Some(slot) = app.lifecycle.try_connect(app.config.max_connections) else {
        return error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "too_many_connections",
            "this instance is at its connection limit",
        );
    };
    let accept = derive_accept_key(key.as_bytes());
    let mut forwarded = HeaderMap::new();
    for name in &app.config.forward_headers {
        for value in headers.get_all(name) {
            forwarded.append(name.clone(), value.clone());
        }
    }
    let identity = match app
        .authenticator
        .authenticate(headers, req.uri().query(), &forwarded)
        .await
    {
        Ok(identity) => identity,
        Err(reject) => {
            return error_response(reject.status(), reject.code(), reject.message());
        }
    };
    let peer = Peer {
        conn_id: app.next_conn_id(),
        connection_id: uuid::Uuid::new_v4().to_string(),
        identity,
        forwarded: Arc::new(forwarded),
    };
    let span = tracing::info_span!("conn", id = %peer.connection_id);
    let config = ws_config(app.config.max_frame_bytes, app.config.send_queue_bytes);
    let tasks = app.lifecycle.sessions().clone();
    tasks.spawn(
        async move {
            let _slot = slot;
            let upgraded = match hyper::upgrade::on(req).await {
                Ok(u) => u,
                Err(e) => return tracing::debug!(error = %e, "upgrade failed"),
            };
            tracing::debug!("connected");
            // Our accept loop serves plain TCP, so the upgraded IO is the TcpStream itself:
            // unwrap it and skip a layer of indirection on every read and write.
            match upgraded.downcast::<TokioIo<TcpStream>>() {
                Ok(parts) => {
                    // Copy what hyper read past the handshake, then let its 8 KiB read buffer
                    // go: kept alive for the session, it would double an idle connection's size.
                    let early = parts.read_buf.to_vec();
                    drop(parts.read_buf);
                    let ws = WebSocketStream::from_partially_read(
                        parts.io.into_inner(),
                        early,
                        Role::Server,
                        Some(config),
                    )
                    .await;
                    session::run(ws, app, peer).await;
                }
                Err(upgraded) => {
                    let ws = WebSocketStream::from_raw_socket(
                        TokioIo::new(upgraded),
                        Role::Server,
                        Some(config),
                    )
                    .await;
                    session::run(ws, app, peer).await;
                }
            }
        }
        .instrument(span),
    );
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(UPGRADE, "websocket")
        .header(CONNECTION, "Upgrade")
        .header(SEC_WEBSOCKET_ACCEPT, accept)
        .body(Body::default())
        .expect("static response parts are valid")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn websocket_keys_are_16_bytes_of_base64() {
        let ok = |k: &'static str| valid_key(&HeaderValue::from_static(k));
        assert!(ok("dGhlIHNhbXBsZSBub25jZQ=="));
        assert!(!ok(""));
        assert!(!ok("not base64 at all, sorry"));
        assert!(!ok("dGhlIHNhbXBsZSBub25jZQ"), "padding is required");
        assert!(!ok("dGhlIHNhbXBsZSBub25jZQ==dGhl"), "too long");
        assert!(!ok("dGhlIHNhbXBsZSBub25jZWVl"), "18 bytes");
    }
}
