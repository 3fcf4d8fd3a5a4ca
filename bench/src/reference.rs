//! The reference server: the least a tokio + tokio-tungstenite broadcast server has to do to
//! serve the fan-out, idle and targeted scenarios, and so the ceiling for this stack.
//!
//! One task per connection selects over the socket and a bounded queue; one Redis connection
//! PSUBSCRIBEs `patchbay:room:*`; each message's bytes are shared (`Utf8Bytes` clone, no copy)
//! with every member of the room through `try_send`; the connection task writes everything
//! queued with `feed` and a single `flush`; reads use a 4 KiB buffer. No auth, no request
//! handling, no metrics, and the published action is forwarded as is (patchbay adds
//! `meta.room`, which costs one parse and one serialization per message, not per delivery).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

const CHANNEL_PREFIX: &str = "patchbay:room:";
/// Frames queued per connection, as patchbay's default.
const QUEUE: usize = 1024;
/// Most frames written between two flushes, as patchbay's writer.
const MAX_BATCH: usize = 64;

type Members = Vec<(u64, mpsc::Sender<Utf8Bytes>)>;
type RoomMap = Arc<Mutex<HashMap<String, Members>>>;

/// `reference --listen ADDR --redis URL`: runs until killed.
pub fn main(args: &[String]) -> Result<(), String> {
    let mut listen: Option<SocketAddr> = None;
    let mut redis_url: Option<String> = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--listen" => listen = it.next().and_then(|v| v.parse().ok()),
            "--redis" => redis_url = it.next().cloned(),
            other => return Err(format!("reference: unknown argument `{other}`")),
        }
    }
    let listen = listen.ok_or("reference: --listen ADDR is required")?;
    let redis_url = redis_url.ok_or("reference: --redis URL is required")?;
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    // The same runtime patchbay uses (`Runtime::new()`), so the comparison is of the code, not
    // of the scheduler.
    let rt = tokio::runtime::Runtime::new().map_err(|e| e.to_string())?;
    rt.block_on(serve(listen, redis_url))
}

async fn serve(listen: SocketAddr, redis_url: String) -> Result<(), String> {
    let rooms: RoomMap = Arc::default();
    let client = redis::Client::open(redis_url.as_str()).map_err(|e| e.to_string())?;
    let mut pubsub = client.get_async_pubsub().await.map_err(|e| e.to_string())?;
    pubsub
        .psubscribe(format!("{CHANNEL_PREFIX}*"))
        .await
        .map_err(|e| e.to_string())?;
    let mut messages = pubsub.into_on_message();
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
        tokio::spawn(connection(stream, id, rooms.clone()));
    }
}

fn config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4 * 1024)
        .write_buffer_size(16 * 1024)
        .max_message_size(Some(64 * 1024))
        .max_frame_size(Some(64 * 1024))
}

async fn connection(stream: TcpStream, id: u64, rooms: RoomMap) {
    let Ok(mut ws) = tokio_tungstenite::accept_async_with_config(stream, Some(config())).await
    else {
        return;
    };
    let (tx, mut rx) = mpsc::channel::<Utf8Bytes>(QUEUE);
    let mut joined: Vec<String> = Vec::new();
    loop {
        tokio::select! {
            msg = ws.next() => match msg {
                Some(Ok(Message::Text(text))) => {
                    let Some((room, request_id)) = subscribe_request(&text) else { continue };
                    let reply = serde_json::json!({
                        "type": "@@patchbay/SUBSCRIBE_SUCCESS",
                        "payload": {"room": room},
                        "meta": {"requestId": request_id},
                    });
                    if !joined.contains(&room) {
                        rooms.lock().unwrap().entry(room.clone()).or_default().push((id, tx.clone()));
                        joined.push(room);
                    }
                    if ws.send(Message::text(reply.to_string())).await.is_err() {
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

/// The room and request id of a `@@patchbay/SUBSCRIBE_REQUEST`.
fn subscribe_request(text: &str) -> Option<(String, Value)> {
    let v: Value = serde_json::from_str(text).ok()?;
    if v.get("type")?.as_str()? != "@@patchbay/SUBSCRIBE_REQUEST" {
        return None;
    }
    let room = v.get("payload")?.get("room")?.as_str()?.to_string();
    let request_id = v
        .get("meta")
        .and_then(|m| m.get("requestId"))
        .cloned()
        .unwrap_or(Value::Null);
    Some((room, request_id))
}
