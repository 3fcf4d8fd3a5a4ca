//! The reference server: the least a tokio + tokio-tungstenite server has to do to serve the
//! fan-out, idle, targeted and request/response scenarios, and so the ceiling for this stack.
//!
//! One task per connection selects over the socket and a bounded queue; one Redis connection
//! PSUBSCRIBEs `patchbay:room:*`; each message's bytes are shared (`Utf8Bytes` clone, no copy)
//! with every member of the room through `try_send`; the connection task writes everything
//! queued with `feed` and a single `flush`; reads use a 4 KiB buffer. No auth, no metrics, no
//! `@@patchbay/CONNECTED` greeting, and the published action is forwarded as is (patchbay adds
//! `meta.room`, which costs one parse and one serialization per message, not per delivery).
//!
//! Request/response (with `--upstream`): an `ECHO_REQUEST` is POSTed to the upstream's `/echo`
//! with the headers patchbay sends, over one keep-alive HTTP/1 connection per websocket
//! connection (opened on the first request, reopened once closed), and the response body (JSON:
//! the bench's upstream echoes the request) is the `ECHO_SUCCESS` payload, verbatim. The
//! connection task awaits the upstream itself, so a connection has one request in flight at a
//! time and its queue waits meanwhile: the scenario sends one request at a time per connection
//! and joins no room. No action manifest, timeout or body size limit.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

pub const CHANNEL_PREFIX: &str = "patchbay:room:";
/// Frames queued per connection, as patchbay's default.
const QUEUE: usize = 1024;
/// Most frames written between two flushes, as patchbay's writer.
const MAX_BATCH: usize = 64;

type Members = Vec<(u64, mpsc::Sender<Utf8Bytes>)>;
type RoomMap = Arc<Mutex<HashMap<String, Members>>>;

/// `reference --listen ADDR --redis URL [--upstream ADDR]`: runs until killed.
pub fn main(args: &[String]) -> Result<(), String> {
    let mut listen: Option<SocketAddr> = None;
    let mut redis_url: Option<String> = None;
    let mut upstream: Option<SocketAddr> = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--listen" => listen = it.next().and_then(|v| v.parse().ok()),
            "--redis" => redis_url = it.next().cloned(),
            "--upstream" => {
                let v = it.next().ok_or("reference: --upstream needs an ADDR")?;
                let addr = v
                    .parse()
                    .map_err(|_| format!("reference: --upstream `{v}`"))?;
                upstream = Some(addr);
            }
            other => return Err(format!("reference: unknown argument `{other}`")),
        }
    }
    let listen = listen.ok_or("reference: --listen ADDR is required")?;
    let redis_url = redis_url.ok_or("reference: --redis URL is required")?;
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    // The same runtime patchbay uses (`Runtime::new()`), so the comparison is of the code, not
    // of the scheduler.
    let rt = tokio::runtime::Runtime::new().map_err(|e| e.to_string())?;
    rt.block_on(serve(listen, redis_url, upstream))
}

async fn serve(
    listen: SocketAddr,
    redis_url: String,
    upstream: Option<SocketAddr>,
) -> Result<(), String> {
    let rooms: RoomMap = Arc::default();
    let mut messages = room_messages(&redis_url).await?;
    let fanout = rooms.clone();
    tokio::spawn(async move {
        while let Some(msg) = messages.next().await {
            let Some(room) = msg.get_channel_name().strip_prefix(CHANNEL_PREFIX) else {
                continue;
            };
            let Ok(text) = Utf8Bytes::try_from(Bytes::copy_from_slice(msg.get_payload_bytes()))
            else {
                continue;
            };
            let map = fanout.lock().unwrap();
            if let Some(members) = map.get(room) {
                for (_, tx) in members {
                    // A full queue loses the message for that client, which the bench reports.
                    let _ = tx.try_send(text.clone());
                }
            }
        }
        eprintln!("reference: the Redis subscription ended");
        std::process::exit(1);
    });

    let listener = TcpListener::bind(listen).await.map_err(|e| e.to_string())?;
    let ids = AtomicU64::new(0);
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                // Out of file descriptors, typically: back off instead of spinning.
                eprintln!("reference: accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let id = ids.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(connection(stream, id, rooms.clone(), upstream));
    }
}

/// The messages published on every room's channel (`patchbay:room:*`).
pub async fn room_messages(
    redis_url: &str,
) -> Result<impl futures_util::Stream<Item = redis::Msg> + use<>, String> {
    let client = redis::Client::open(redis_url).map_err(|e| e.to_string())?;
    let mut pubsub = client.get_async_pubsub().await.map_err(|e| e.to_string())?;
    pubsub
        .psubscribe(format!("{CHANNEL_PREFIX}*"))
        .await
        .map_err(|e| e.to_string())?;
    Ok(pubsub.into_on_message())
}

fn config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4 * 1024)
        .write_buffer_size(16 * 1024)
        .max_message_size(Some(64 * 1024))
        .max_frame_size(Some(64 * 1024))
}

async fn connection(stream: TcpStream, id: u64, rooms: RoomMap, upstream: Option<SocketAddr>) {
    let Ok(mut ws) = tokio_tungstenite::accept_async_with_config(stream, Some(config())).await
    else {
        return;
    };
    let (tx, mut rx) = mpsc::channel::<Utf8Bytes>(QUEUE);
    let mut joined: Vec<String> = Vec::new();
    let mut upstream = Upstream {
        addr: upstream,
        sender: None,
    };
    loop {
        tokio::select! {
            msg = ws.next() => match msg {
                Some(Ok(Message::Text(text))) => {
                    let Ok(frame) = serde_json::from_str::<Value>(&text) else { continue };
                    let request_id = frame
                        .get("meta")
                        .and_then(|m| m.get("requestId"))
                        .cloned()
                        .unwrap_or(Value::Null);
                    let reply = match frame.get("type").and_then(Value::as_str) {
                        Some("@@patchbay/SUBSCRIBE_REQUEST") => {
                            let Some(room) = frame
                                .get("payload")
                                .and_then(|p| p.get("room"))
                                .and_then(Value::as_str)
                            else {
                                continue;
                            };
                            if !joined.iter().any(|r| r == room) {
                                rooms.lock().unwrap().entry(room.to_string()).or_default().push((id, tx.clone()));
                                joined.push(room.to_string());
                            }
                            json!({
                                "type": "@@patchbay/SUBSCRIBE_SUCCESS",
                                "payload": {"room": room},
                                "meta": {"requestId": request_id},
                            })
                            .to_string()
                        }
                        Some("ECHO_REQUEST") => upstream.echo(frame.get("payload"), &request_id).await,
                        _ => continue,
                    };
                    if ws.send(Message::text(reply)).await.is_err() {
                        break;
                    }
                }
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
                Some(Ok(_)) => {}
            },
            Some(first) = rx.recv() => {
                let batch = async {
                    ws.feed(Message::Text(first)).await?;
                    for _ in 1..MAX_BATCH {
                        match rx.try_recv() {
                            Ok(text) => ws.feed(Message::Text(text)).await?,
                            Err(_) => break,
                        }
                    }
                    ws.flush().await
                };
                if batch.await.is_err() {
                    break;
                }
            }
        }
    }
    let mut map = rooms.lock().unwrap();
    for room in joined {
        if let Some(members) = map.get_mut(&room) {
            members.retain(|(member, _)| *member != id);
            if members.is_empty() {
                map.remove(&room);
            }
        }
    }
}

/// A connection's keep-alive HTTP/1 connection to the request/response upstream.
struct Upstream {
    addr: Option<SocketAddr>,
    sender: Option<SendRequest<Full<Bytes>>>,
}

impl Upstream {
    /// The reply to an `ECHO_REQUEST`: the upstream's answer to `POST /echo` as the
    /// `ECHO_SUCCESS` payload, or an `ECHO_FAILURE`.
    async fn echo(&mut self, payload: Option<&Value>, request_id: &Value) -> String {
        let body = payload.map_or_else(|| "{}".to_string(), Value::to_string);
        let answer = self.post(body, request_id).await.and_then(|bytes| {
            String::from_utf8(bytes.into()).map_err(|_| "the upstream's body is not UTF-8".into())
        });
        match answer {
            // The body is JSON already: it goes into the frame as is.
            Ok(body) => format!(
                r#"{{"type":"ECHO_SUCCESS","payload":{body},"meta":{{"requestId":{request_id}}}}}"#
            ),
            Err(message) => json!({
                "type": "ECHO_FAILURE",
                "payload": {"code": "upstream_unavailable", "message": message},
                "meta": {"requestId": request_id},
            })
            .to_string(),
        }
    }

    /// `POST /echo` with patchbay's headers; the whole response body.
    async fn post(&mut self, body: String, request_id: &Value) -> Result<Bytes, String> {
        let addr = self
            .addr
            .ok_or("the reference was started without --upstream")?;
        let mut sender = match self.sender.take() {
            Some(mut s) => match s.ready().await {
                Ok(()) => s,
                Err(_) => open(addr).await?,
            },
            None => open(addr).await?,
        };
        let id = request_id
            .as_str()
            .map_or_else(|| request_id.to_string(), str::to_string);
        let req = Request::post("/echo")
            .header("host", addr.to_string())
            .header("content-type", "application/json")
            .header("x-request-id", &id)
            .header("idempotency-key", &id)
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| e.to_string())?;
        let resp = sender.send_request(req).await;
        // Kept even after a failure: the next request's `ready()` tells whether it still works.
        self.sender = Some(sender);
        let resp = resp.map_err(|e| format!("the upstream is unreachable: {e}"))?;
        if !resp.status().is_success() {
            return Err(format!("the upstream answered {}", resp.status()));
        }
        let body = resp.into_body().collect().await;
        body.map(|b| b.to_bytes()).map_err(|e| e.to_string())
    }
}

/// A new HTTP/1 connection to the upstream, driven by its own task.
async fn open(addr: SocketAddr) -> Result<SendRequest<Full<Bytes>>, String> {
    let unreachable = |e: &dyn std::fmt::Display| format!("the upstream is unreachable: {e}");
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|e| unreachable(&e))?;
    let _ = tcp.set_nodelay(true);
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| unreachable(&e))?;
    tokio::spawn(conn);
    Ok(sender)
}
