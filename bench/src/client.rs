//! The load side: websocket clients speaking patchbay's protocol or Socket.IO's, the fast HTTP
//! upstream of the request/response scenario, and a direct HTTP client of that upstream.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// What a client speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    /// patchbay's protocol (the reference server speaks its SUBSCRIBE and ECHO_REQUEST parts).
    Patchbay,
    /// engine.io 4 / socket.io 4 over a raw websocket.
    SocketIo,
}

pub type Ws = WebSocketStream<TcpStream>;

/// Unix time in nanoseconds: publisher and clients share the machine's clock.
pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

fn config() -> WebSocketConfig {
    // A small read buffer: 15,000 clients with tungstenite's default would take 2 GB here.
    WebSocketConfig::default()
        .read_buffer_size(4 * 1024)
        .write_buffer_size(4 * 1024)
}

/// Connects and joins `room`, retrying a refused connect a few times (a full accept backlog).
pub async fn open(addr: SocketAddr, proto: Proto, room: &str) -> Result<Ws, String> {
    let mut last = String::new();
    for attempt in 0..4 {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(100 << attempt)).await;
        }
        match try_open(addr, proto, room).await {
            Ok(ws) => return Ok(ws),
            Err(e) => last = e,
        }
    }
    Err(last)
}

async fn try_open(addr: SocketAddr, proto: Proto, room: &str) -> Result<Ws, String> {
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let url = match proto {
        Proto::Patchbay => format!("ws://{addr}/ws"),
        Proto::SocketIo => format!("ws://{addr}/socket.io/?EIO=4&transport=websocket"),
    };
    let (mut ws, _) = tokio_tungstenite::client_async_with_config(url, tcp, Some(config()))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let step = Duration::from_secs(30);
    match proto {
        Proto::Patchbay => {
            let sub = serde_json::json!({
                "type": "@@patchbay/SUBSCRIBE_REQUEST",
                "payload": {"room": room},
                "meta": {"requestId": "s"},
            });
            send(&mut ws, sub.to_string()).await?;
            wait_for(&mut ws, proto, step, |t| {
                if t.contains("SUBSCRIBE_FAILURE") {
                    Err(format!("subscribe refused: {t}"))
                } else {
                    Ok(t.contains("SUBSCRIBE_SUCCESS"))
                }
            })
            .await?;
        }
        Proto::SocketIo => {
            // engine.io open packet `0{...}`, then socket.io CONNECT `40` both ways.
            wait_for(&mut ws, proto, step, |t| Ok(t.starts_with('0'))).await?;
            send(&mut ws, "40".into()).await?;
            wait_for(&mut ws, proto, step, |t| Ok(t.starts_with("40"))).await?;
            send(
                &mut ws,
                format!("42[\"subscribe\",{}]", serde_json::json!(room)),
            )
            .await?;
            wait_for(&mut ws, proto, step, |t| {
                Ok(t.starts_with("42[\"subscribed\""))
            })
            .await?;
        }
    }
    Ok(ws)
}

async fn send(ws: &mut Ws, text: String) -> Result<(), String> {
    ws.send(Message::text(text))
        .await
        .map_err(|e| format!("send: {e}"))
}

/// Reads text frames until `done` says so (answering engine.io pings meanwhile).
async fn wait_for(
    ws: &mut Ws,
    proto: Proto,
    timeout: Duration,
    mut done: impl FnMut(&str) -> Result<bool, String>,
) -> Result<(), String> {
    let read = async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(t))) => {
                    if proto == Proto::SocketIo && t.as_str() == "2" {
                        send(ws, "3".into()).await?;
                    } else if done(t.as_str())? {
                        return Ok(());
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(format!("read: {e}")),
                None => return Err("closed by the server".into()),
            }
        }
    };
    tokio::time::timeout(timeout, read)
        .await
        .map_err(|_| "timed out waiting for the server".to_string())?
}

/// What one receiving client saw.
#[derive(Debug, Default)]
pub struct Received {
    /// Distinct bench messages received.
    pub count: u64,
    /// Messages received more than once.
    pub duplicates: u64,
    /// Publisher timestamp → receipt, microseconds.
    pub latencies_us: Vec<u32>,
    /// The server closed the connection or it failed before the stop signal.
    pub dropped: bool,
}

/// Receives bench messages until `stop` fires. With `expected > 0`, sequence numbers are checked
/// against `0..expected` (fan-out); otherwise every message counts (targeted, idle).
pub async fn receive(
    mut ws: Ws,
    proto: Proto,
    expected: usize,
    total: Arc<AtomicU64>,
    mut stop: watch::Receiver<bool>,
) -> (Received, Ws) {
    let mut seen = vec![false; expected];
    let mut out = Received {
        latencies_us: Vec::with_capacity(expected),
        ..Received::default()
    };
    loop {
        tokio::select! {
            biased;
            _ = stop.changed() => break,
            msg = ws.next() => match msg {
                Some(Ok(Message::Text(t))) => {
                    if proto == Proto::SocketIo && t.as_str() == "2" {
                        let _ = ws.send(Message::text("3")).await;
                        continue;
                    }
                    let Some((seq, ts)) = parse_bench_message(t.as_str()) else { continue };
                    let now = now_ns();
                    if expected > 0 {
                        match seen.get_mut(seq as usize) {
                            Some(s) if !*s => *s = true,
                            _ => {
                                out.duplicates += 1;
                                continue;
                            }
                        }
                    }
                    out.latencies_us.push((now.saturating_sub(ts) / 1000).min(u32::MAX as u64) as u32);
                    out.count += 1;
                    total.fetch_add(1, Ordering::Relaxed);
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => {
                    out.dropped = true;
                    break;
                }
            }
        }
    }
    (out, ws)
}

/// `"seq":N` and `"ts":T` out of any of the three servers' framings, without a JSON parse
/// (the clients share one core with the publisher; parsing must stay cheap).
pub fn parse_bench_message(text: &str) -> Option<(u64, u64)> {
    Some((
        number_after(text, "\"seq\":")?,
        number_after(text, "\"ts\":")?,
    ))
}

fn number_after(text: &str, key: &str) -> Option<u64> {
    let start = text.find(key)? + key.len();
    let digits = text[start..]
        .bytes()
        .take_while(u8::is_ascii_digit)
        .fold((0u64, 0usize), |(n, len), b| {
            (n * 10 + u64::from(b - b'0'), len + 1)
        });
    (digits.1 > 0).then_some(digits.0)
}

/// A bench action of about `size` bytes: `{"type":"B","payload":{"seq":N,"ts":T,"pad":"…"}}`.
pub fn bench_action(seq: u64, ts: u64, size: usize) -> String {
    let bare = format!(r#"{{"type":"B","payload":{{"seq":{seq},"ts":{ts},"pad":""}}}}"#);
    let pad = "x".repeat(size.saturating_sub(bare.len()));
    format!(r#"{{"type":"B","payload":{{"seq":{seq},"ts":{ts},"pad":"{pad}"}}}}"#)
}

/// The request/response upstream: `POST /echo` answers its JSON body, anything else `{}`.
/// Runs on its own thread and runtime, so it is never queued behind the websocket clients.
pub fn start_upstream() -> Result<SocketAddr, String> {
    let std_listener =
        std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| format!("upstream bind: {e}"))?;
    std_listener
        .set_nonblocking(true)
        .map_err(|e| e.to_string())?;
    let addr = std_listener.local_addr().map_err(|e| e.to_string())?;
    std::thread::Builder::new()
        .name("upstream".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("upstream runtime");
            rt.block_on(async move {
                let listener = TcpListener::from_std(std_listener).expect("upstream listener");
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    let _ = stream.set_nodelay(true);
                    tokio::spawn(async move {
                        let service = hyper::service::service_fn(echo);
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    });
                }
            });
        })
        .map_err(|e| e.to_string())?;
    Ok(addr)
}

async fn echo(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => Bytes::from_static(b"{}"),
    };
    let body = if body.is_empty() {
        Bytes::from_static(b"{}")
    } else {
        body
    };
    Ok(Response::builder()
        .header("content-type", "application/json")
        .body(Full::new(body))
        .expect("static response parts"))
}

/// One keep-alive HTTP/1.1 connection to the upstream, as patchbay's client would hold.
pub struct Direct {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    host: String,
}

impl Direct {
    pub async fn connect(addr: SocketAddr) -> Result<Direct, String> {
        let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let _ = tcp.set_nodelay(true);
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        Ok(Direct {
            sender,
            host: addr.to_string(),
        })
    }

    /// `POST /echo` with the headers patchbay would send; returns the body.
    pub async fn echo(&mut self, request_id: &str, body: String) -> Result<Bytes, String> {
        let req = Request::post("/echo")
            .header("host", &self.host)
            .header("content-type", "application/json")
            .header("x-request-id", request_id)
            .header("idempotency-key", request_id)
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| e.to_string())?;
        let resp = self
            .sender
            .send_request(req)
            .await
            .map_err(|e| e.to_string())?;
        if !resp.status().is_success() {
            return Err(format!("upstream answered {}", resp.status()));
        }
        resp.into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .map_err(|e| e.to_string())
    }
}

/// One websocket request of the request/response scenario: sends `ECHO_REQUEST`, waits for
/// its `ECHO_SUCCESS`.
pub async fn ws_echo(ws: &mut Ws, request_id: &str, payload: &str) -> Result<(), String> {
    let frame = format!(
        r#"{{"type":"ECHO_REQUEST","payload":{payload},"meta":{{"requestId":"{request_id}"}}}}"#
    );
    send(ws, frame).await?;
    let marker = format!(r#""requestId":"{request_id}""#);
    wait_for(ws, Proto::Patchbay, Duration::from_secs(10), |t| {
        if !t.contains(&marker) {
            return Ok(false);
        }
        if t.contains("ECHO_SUCCESS") {
            Ok(true)
        } else {
            Err(format!("request failed: {t}"))
        }
    })
    .await
}

/// Connects without joining a room (request/response clients); `greeted`: waits for patchbay's
/// `@@patchbay/CONNECTED` (the reference sends none).
pub async fn open_plain(addr: SocketAddr, greeted: bool) -> Result<Ws, String> {
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let (mut ws, _) =
        tokio_tungstenite::client_async_with_config(format!("ws://{addr}/ws"), tcp, Some(config()))
            .await
            .map_err(|e| format!("handshake: {e}"))?;
    if greeted {
        wait_for(&mut ws, Proto::Patchbay, Duration::from_secs(10), |t| {
            Ok(t.contains("@@patchbay/CONNECTED"))
        })
        .await?;
    }
    Ok(ws)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_framing() {
        let a = bench_action(7, 1_700_000_000_000_000_000, 100);
        assert_eq!(a.len(), 100);
        assert_eq!(
            parse_bench_message(&a),
            Some((7, 1_700_000_000_000_000_000))
        );
        let sio = r#"42["B",{"seq":3,"ts":42,"pad":"x"}]"#;
        assert_eq!(parse_bench_message(sio), Some((3, 42)));
        assert_eq!(parse_bench_message(r#"{"type":"X"}"#), None);
    }
}
