//! The floor: the least any server can spend on a fan-out delivery. Each action that arrives
//! (on the room's Redis channel, as for the other servers: once per round, so its cost is
//! spread over every client) is framed once as a websocket text frame and written with one
//! `write()` to each member's non-blocking socket, from the thread that received it. No task
//! per connection, no queue, no wake-up: what is left is the system call. Clients join rooms
//! with the same `@@patchbay/SUBSCRIBE` the reference answers; after that the connection is a
//! bare socket that is never read again.

use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;

use crate::reference::CHANNEL_PREFIX;

type RoomMap = Arc<Mutex<HashMap<String, Vec<std::net::TcpStream>>>>;

/// `floor --listen ADDR --redis URL`: runs until killed.
pub fn main(args: &[String]) -> Result<(), String> {
    let mut listen: Option<SocketAddr> = None;
    let mut redis_url: Option<String> = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--listen" => {
                listen = it.next().and_then(|v| v.parse().ok());
            }
            "--redis" => redis_url = it.next().cloned(),
            other => return Err(format!("floor: unknown argument `{other}`")),
        }
    }
    let listen = listen.ok_or("floor: --listen ADDR is required")?;
    let redis_url = redis_url.ok_or("floor: --redis URL is required")?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(serve(listen, redis_url))
}

/// A websocket text frame from the server (unmasked) holding `payload`.
fn frame(payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(payload.len() + 10);
    f.push(0x81);
    match payload.len() {
        n if n < 126 => f.push(n as u8),
        n if n <= 0xffff => {
            f.push(126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    f.extend_from_slice(payload);
    f
}

async fn serve(listen: SocketAddr, redis_url: String) -> Result<(), String> {
    let rooms: RoomMap = Arc::default();
    let dropped = Arc::new(AtomicU64::new(0));
    let mut messages = Box::pin(crate::reference::room_messages(&redis_url).await?);
    let fanout = rooms.clone();
    tokio::spawn(async move {
        while let Some(msg) = messages.next().await {
            let Some(room) = msg.get_channel_name().strip_prefix(CHANNEL_PREFIX) else {
                continue;
            };
            let bytes = frame(msg.get_payload_bytes());
            let mut map = fanout.lock().unwrap();
            if let Some(members) = map.get_mut(room) {
                // One write per member; a socket that cannot take the whole frame at once
                // (never at the bench's rates) is dropped and counted.
                members.retain(|mut socket| match socket.write(&bytes) {
                    Ok(n) if n == bytes.len() => true,
                    _ => {
                        dropped.fetch_add(1, Ordering::Relaxed);
                        false
                    }
                });
            }
        }
        eprintln!("floor: the Redis subscription ended");
        std::process::exit(1);
    });
    let listener = TcpListener::bind(listen).await.map_err(|e| e.to_string())?;
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("floor: accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(join(stream, rooms.clone()));
    }
}

/// The handshake and one SUBSCRIBE; then the bare socket joins the room.
async fn join(stream: TcpStream, rooms: RoomMap) {
    let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
        return;
    };
    while let Some(Ok(msg)) = ws.next().await {
        let Message::Text(text) = msg else { continue };
        let Ok(frame) = serde_json::from_str::<Value>(&text) else {
            continue;
        };
        if frame["type"] != "@@patchbay/SUBSCRIBE_REQUEST" {
            continue;
        }
        let Some(room) = frame["payload"]["room"].as_str().map(str::to_string) else {
            continue;
        };
        let reply = json!({
            "type": "@@patchbay/SUBSCRIBE_SUCCESS",
            "payload": {"room": room},
            "meta": {"requestId": frame["meta"]["requestId"]},
        });
        if ws.send(Message::text(reply.to_string())).await.is_err() {
            return;
        }
        let Ok(socket) = ws.into_inner().into_std() else {
            return;
        };
        if socket.set_nonblocking(true).is_err() {
            return;
        }
        rooms.lock().unwrap().entry(room).or_default().push(socket);
        return;
    }
}
