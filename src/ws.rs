//! The websocket transport: the `GET /ws` upgrade, done at the hyper layer so that patchbay
//! owns tungstenite's [`WebSocketConfig`] (small read buffer, frame and message limits) and the
//! TCP socket; the reader that turns frames into session events; the clean close. With
//! [`crate::writer`], the only code that knows websocket frames.
//!
//! Checks, in order: draining (503), method and websocket headers (400/426), then
//! [`handshake::admit`]: Origin (403), connection limit (503), credentials (401/403/503).
//! Then it answers 101 and runs the session on the upgraded socket.

use std::sync::Arc;
use std::time::Duration;

use std::pin::Pin;
use std::task::{Context, Poll};

use futures_util::{FutureExt, StreamExt};
use hyper::body::Incoming;
use hyper::header::{
    CONNECTION, HeaderValue, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY, SEC_WEBSOCKET_VERSION,
    UPGRADE,
};
use hyper::{HeaderMap, Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedReadHalf;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tracing::Instrument;

use crate::app::App;
use crate::error::Disconnect;
use crate::handshake::{self, Admitted, Refusal};
use crate::http::{Response, error_response};
use crate::outbox::{Closer, Inbox, Outbox, QueueLimits, Text};
use crate::session::{self, Inbound, Peer};
use crate::writer::{self, WsWire};

/// Bytes read from the socket at a time, allocated for every connection for its whole life.
/// Client actions are small: 256 bytes hold a typical one in one read, and idle connections
/// stay small (tungstenite's default of 128 KiB would dominate a server's memory; 1 KiB was a
/// seventh of an idle connection). A larger frame makes room for itself once its header is
/// read, but is still read 256 bytes per `read()`: a 1 MiB message costs 4,096 reads, the
/// price of small idle connections, paid only by large messages.
const READ_BUFFER: usize = 256;
/// Bytes of frames the websocket layer may hold before writing them: none. It writes only
/// the pongs and the answer to a close, each at once into the connection's queue, which
/// bounds them (frames patchbay sends do not pass through it).
const WRITE_BUFFER: usize = 0;
/// Room for the largest control frame and then some.
const CONTROL_FRAME_MAX: usize = 256;

/// The websocket settings of every connection.
fn ws_config(max_message: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER)
        // It only ever holds one control frame: at most 127 bytes.
        .max_write_buffer_size(CONTROL_FRAME_MAX)
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

/// Handles `GET /ws`: the websocket's own checks, then [`handshake::admit`], then 101 and the
/// session on the upgraded socket.
pub async fn upgrade(mut req: Request<Incoming>, app: Arc<App>) -> Response {
    let refuse = |r: Refusal| error_response(r.status, r.code, r.message);
    if app.lifecycle.is_draining() {
        app.metrics.handshake_refused(handshake::DRAINING.code);
        return refuse(handshake::DRAINING);
    }
    let headers = req.headers();
    if req.method() != Method::GET
        || !has_token(headers, UPGRADE, "websocket")
        || !has_token(headers, CONNECTION, "upgrade")
    {
        app.metrics.handshake_refused("not_websocket");
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
    let accept = derive_accept_key(key.as_bytes());
    let remote = req
        .extensions()
        .get::<crate::client_addr::RemoteAddr>()
        .map(|r| r.0.ip());
    let admitted = handshake::admit(&app, headers, req.uri().query(), remote).await;
    let Admitted { peer, slot } = match admitted {
        Ok(admitted) => admitted,
        Err(refusal) => return refuse(refusal),
    };
    let span = peer.span("websocket");
    // Only the upgrade's handle goes into the session's task: the request, kept there, would
    // be part of every idle connection.
    let on_upgrade = hyper::upgrade::on(&mut req);
    let tasks = app.lifecycle.sessions().clone();
    tasks.spawn(
        async move {
            let _slot = slot;
            let upgraded = match on_upgrade.await {
                Ok(u) => u,
                Err(e) => return tracing::debug!(error = %e, "upgrade failed"),
            };
            tracing::info!("connected");
            // Our accept loop serves plain TCP, so the upgraded IO is the TcpStream itself.
            let Ok(parts) = upgraded.downcast::<TokioIo<TcpStream>>() else {
                return tracing::error!("a websocket on something other than a TCP socket");
            };
            // Copy what hyper read past the handshake, then let its 8 KiB read buffer go:
            // kept alive for the session, it would double an idle connection's size.
            let early = parts.read_buf.to_vec();
            drop(parts.read_buf);
            serve(parts.io.into_inner(), early, app, peer).await;
        }
        .instrument(span),
    );
    let mut resp = Response::new(bytes::Bytes::new().into());
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = resp.headers_mut();
    headers.insert(UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
    headers.insert(
        SEC_WEBSOCKET_ACCEPT,
        HeaderValue::from_str(&accept).expect("base64 is a valid header value"),
    );
    resp
}

/// Runs a session over a socket that has just become a websocket (`early`: the bytes read
/// past the handshake): the queue writes frames into the socket itself (a flush task writes
/// what had to wait), the reader turns frames into [`Inbound`] events, and the socket is
/// closed cleanly at the end.
pub async fn serve(socket: TcpStream, early: Vec<u8>, app: Arc<App>, peer: Box<Peer>) {
    let opened = std::time::Instant::now();
    let (read, write) = socket.into_split();
    let wire = Arc::new(WsWire::new(write));
    let (outbox, inbox) = Outbox::with_wire(
        QueueLimits {
            frames: app.config.send_queue,
            bytes: app.config.send_queue_bytes,
        },
        wire.clone(),
    );
    let closer = outbox.close_signal();
    let io = Socket {
        read,
        queue: outbox.clone(),
    };
    let config = ws_config(app.config.max_frame_bytes);
    let mut stream =
        WebSocketStream::from_partially_read(io, early, Role::Server, Some(config)).await;
    let mut client_closed = false;
    let events = (&mut stream).map(|message| {
        client_closed |= matches!(message, Ok(Message::Close(_)));
        inbound(message)
    });
    let session = session::run(events, outbox, app.clone(), peer);
    // A panicking session has left its rooms and set 1011 (its guard): the client still gets
    // the close frame.
    if std::panic::AssertUnwindSafe(session)
        .catch_unwind()
        .await
        .is_err()
    {
        tracing::error!("the session panicked: closed with 1011");
    }
    // Boxed: the closing steps' timers would otherwise be part of the future of every idle
    // session, for the whole of its life.
    Box::pin(close_socket(&wire, inbox, stream, client_closed, &closer)).await;
    if let Some(reason) = closer.reason() {
        app.metrics.disconnect(reason);
    }
    session::log_end(closer.reason(), opened);
}

/// The socket as the websocket layer sees it: it reads the client's frames, and what it
/// writes by itself (pongs, the answer to a client's close) joins the connection's queue like
/// every frame, counted against the same bound.
struct Socket {
    read: OwnedReadHalf,
    /// What it writes goes here (and is refused once the close frame is queued).
    queue: Outbox,
}

impl AsyncRead for Socket {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.read).poll_read(cx, buf)
    }
}

impl AsyncWrite for Socket {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        // The websocket layer writes whole frames in one call. Past the bound the connection
        // closes with 4008, like any client that does not read.
        self.queue.push_raw(bytes::Bytes::copy_from_slice(buf));
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// A websocket message as the session sees it.
fn inbound(message: Result<Message, WsError>) -> Inbound {
    match message {
        Ok(Message::Text(text)) => Inbound::Text(Text::from_validated(text.into())),
        Ok(Message::Binary(_)) => Inbound::Binary,
        // The websocket layer queued the pong itself: 2 bytes of header and the payload.
        Ok(Message::Ping(_)) => Inbound::Ping,
        Ok(Message::Pong(_) | Message::Frame(_)) => Inbound::Pong,
        Ok(Message::Close(_)) => Inbound::Close,
        Err(e) => {
            let reason = read_error_disconnect(&e);
            if let Some(reason) = reason {
                tracing::info!(error = %e, code = reason.code(), "closing after a bad frame");
            }
            Inbound::Failed(reason)
        }
    }
}

/// The close code for a read error, or `None` when the connection is simply gone.
fn read_error_disconnect(e: &WsError) -> Option<Disconnect> {
    use tokio_tungstenite::tungstenite::error::ProtocolError;
    match e {
        WsError::Capacity(_) => Some(Disconnect::TooLarge),
        WsError::Utf8(_) => Some(Disconnect::BadUtf8),
        // A closed tab or a lost network, not a misbehaving client.
        WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => None,
        WsError::Protocol(_) => Some(Disconnect::Protocol),
        _ => None,
    }
}

/// Longest wait for the client to close its side after our close frame.
pub const LINGER: Duration = Duration::from_secs(2);

/// Answers a client's close (the websocket layer writes its answer when flushed; it never
/// waits: the socket's writes go into the queue), closes the way out (what is queued, the
/// close frame, the end of our side, at once), then lingers.
async fn close_socket(
    wire: &WsWire,
    inbox: Inbox,
    mut stream: WebSocketStream<Socket>,
    client_closed: bool,
    closer: &Closer,
) {
    if client_closed {
        let _ = futures_util::SinkExt::flush(&mut stream).await;
    }
    // Read after the answer was queued: had the queue no room for it, the reason is 4008.
    writer::close(wire, inbox, closer.reason()).await;
    linger(&mut stream.get_mut().read).await;
}

/// Reads and discards what the client still sends until it closes too, for at most
/// [`LINGER`], our side already shut down after the close frame: closing a socket with unread
/// bytes makes the kernel send a reset, which can destroy the close frame in the client's
/// buffers.
async fn linger(read: &mut OwnedReadHalf) {
    let _ = tokio::time::timeout(LINGER, async {
        let mut scratch = [0u8; 512];
        while let Ok(1..) = read.read(&mut scratch).await {}
    })
    .await;
}

#[cfg(test)]
mod tests {
    //! Sessions driven in-process over a loopback TCP connection.

    use super::*;
    use crate::auth::Identity;
    use crate::config::Config;
    use crate::registry::Registry;
    use futures_util::SinkExt;
    use serde_json::{Value, json};
    use tokio::time::Instant;

    type Client = WebSocketStream<TcpStream>;

    async fn pair(config: Config) -> (Client, tokio::task::JoinHandle<()>) {
        let app = App::new(config, Registry::default()).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client_io = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server_io, _) = listener.accept().await.unwrap();
        let client = WebSocketStream::from_raw_socket(client_io, Role::Client, None).await;
        let peer = Peer {
            conn_id: 1,
            connection_id: "c1".into(),
            identity: Identity::default(),
            forwarded: Arc::default(),
            since: None,
            client: None,
        };
        (
            client,
            tokio::spawn(serve(server_io, Vec::new(), app, Box::new(peer))),
        )
    }

    async fn next_json(ws: &mut Client) -> Value {
        loop {
            match ws.next().await.expect("open").expect("no error") {
                Message::Text(t) => return serde_json::from_str(t.as_str()).unwrap(),
                Message::Ping(_) | Message::Pong(_) => continue,
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn greets_answers_and_reports_unknown_actions() {
        let (mut ws, _session) = pair(Config::default()).await;
        assert_eq!(next_json(&mut ws).await["payload"]["connectionId"], "c1");
        ws.send(Message::Text(
            r#"{"type":"@@patchbay/PING_REQUEST","meta":{"requestId":"p1"}}"#.into(),
        ))
        .await
        .unwrap();
        assert_eq!(
            next_json(&mut ws).await,
            json!({"type":"@@patchbay/PING_SUCCESS","payload":{},"meta":{"requestId":"p1"}})
        );
        ws.send(Message::Text(
            r#"{"type":"NOPE_REQUEST","meta":{"requestId":"n1"}}"#.into(),
        ))
        .await
        .unwrap();
        let reply = next_json(&mut ws).await;
        assert_eq!(
            (reply["type"].as_str(), reply["payload"]["code"].as_str()),
            (Some("NOPE_FAILURE"), Some("unknown_action"))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_client_is_closed_after_the_idle_timeout() {
        let config = Config {
            idle_timeout: Duration::from_secs(30),
            ping_interval: Duration::from_secs(3600),
            ..Config::default()
        };
        let (mut ws, session) = pair(config).await;
        next_json(&mut ws).await;
        let started = Instant::now();
        let close = loop {
            match ws.next().await {
                Some(Ok(Message::Close(frame))) => break frame,
                Some(Ok(_)) => continue,
                other => panic!("expected a close frame, got {other:?}"),
            }
        };
        assert_eq!(close.map(|f| u16::from(f.code)), Some(1000));
        assert!(started.elapsed() >= Duration::from_secs(30));
        drop(ws);
        session.await.unwrap();
    }

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
