//! SSE against the websocket, on patchbay's embedded bus: idle memory per connection, and CPU
//! per delivery of the fan-out scenario (clients in room `bench`, actions published with
//! `POST /publish`), the same run over each transport.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::Message;

use crate::client::{self, Proto};
use crate::procs;
use crate::scenarios::{Ctx, Target};

/// What one transport measured.
pub struct SseRun {
    pub transport: &'static str,
    pub clients: usize,
    pub idle_kib_per_connection: f64,
    pub expected: u64,
    pub delivered: u64,
    pub cpu_us_per_delivery: f64,
}

/// One connected client of either transport.
enum Conn {
    Ws(Box<client::Ws>),
    /// The stream's body (its connection task owns the socket).
    Sse(Incoming),
}

impl Conn {
    /// The next chunk of text, `None` once the connection ended.
    async fn next(&mut self) -> Option<String> {
        match self {
            Conn::Ws(ws) => loop {
                match ws.next().await? {
                    Ok(Message::Text(t)) => return Some(t.as_str().to_string()),
                    Ok(_) => continue,
                    Err(_) => return None,
                }
            },
            Conn::Sse(body) => loop {
                let frame = body.frame().await?.ok()?;
                if let Ok(data) = frame.into_data() {
                    return Some(String::from_utf8_lossy(&data).into_owned());
                }
            },
        }
    }
}

/// Opens an SSE stream: the connection, its id, and how long its first byte took.
async fn connect_sse(addr: SocketAddr) -> Result<(Conn, String, Duration), String> {
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let _ = tcp.set_nodelay(true);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = Request::get("/sse")
        .header("host", addr.to_string())
        .body(Full::new(Bytes::new()))
        .map_err(|e| e.to_string())?;
    let sent = Instant::now();
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    if resp.status() != 200 {
        return Err(format!("GET /sse answered {}", resp.status()));
    }
    let mut conn = Conn::Sse(resp.into_body());
    let mut seen = conn.next().await.ok_or("the stream ended")?;
    let first_byte = sent.elapsed();
    let id = loop {
        if let Some(at) = seen.find("\"connectionId\":\"") {
            let rest = &seen[at + 16..];
            if let Some(end) = rest.find('"') {
                break rest[..end].to_string();
            }
        }
        seen.push_str(&conn.next().await.ok_or("the stream ended")?);
    };
    Ok((conn, id, first_byte))
}

/// `POST /sse/<id>` of `body` to `addr`.
async fn post(addr: SocketAddr, id: &str, body: String) -> Result<(), String> {
    let path = format!("/sse/{id}");
    let status = tokio::task::spawn_blocking(move || procs::http_post(addr, &path, "", &body))
        .await
        .map_err(|e| e.to_string())??;
    if status != 202 {
        return Err(format!("POST /sse answered {status}"));
    }
    Ok(())
}

/// Opens an SSE stream and joins room `bench` through `POST /sse/<id>`.
async fn open_sse(addr: SocketAddr) -> Result<Conn, String> {
    let (mut conn, id, _) = connect_sse(addr).await?;
    let body = r#"{"type":"@@patchbay/SUBSCRIBE_REQUEST","payload":{"room":"bench"},"meta":{"requestId":"s"}}"#;
    post(addr, &id, body.to_string()).await?;
    let mut seen = String::new();
    while !seen.contains("SUBSCRIBE_SUCCESS") {
        seen.push_str(&conn.next().await.ok_or("the stream ended")?);
    }
    Ok(conn)
}

/// What the SSE timings measured, in microseconds.
pub struct SseTimings {
    /// From `GET /sse` sent to the first byte of the stream.
    pub first_byte: crate::scenarios::Percentiles,
    /// From a `POST /sse/<id>` sent to another instance than the stream's to its reply on
    /// the stream.
    pub forwarded: crate::scenarios::Percentiles,
    pub streams: usize,
    pub posts: usize,
}

/// Two patchbay instances on Redis: `streams` streams opened one after another on the first
/// (time to first byte), then `posts` PINGs posted to the second for a stream of the first,
/// one at a time (time until the reply arrives on the stream).
pub async fn timings(ctx: &Ctx, streams: usize, posts: usize) -> Result<SseTimings, String> {
    let a = ctx
        .start_with(Target::Patchbay, Some(&ctx.redis_url), &[])
        .await?;
    let b = ctx
        .start_with(Target::Patchbay, Some(&ctx.redis_url), &[])
        .await?;
    let mut first = Vec::with_capacity(streams);
    let mut open = Vec::with_capacity(streams);
    for _ in 0..streams {
        let (conn, _, took) = connect_sse(a.addr).await?;
        first.push(took.as_micros().min(u128::from(u32::MAX)) as u32);
        open.push(conn);
    }
    drop(open);
    let (mut conn, id, _) = connect_sse(a.addr).await?;
    let mut forwarded = Vec::with_capacity(posts);
    for n in 0..posts {
        let request_id = format!("f{n}");
        let body = format!(
            r#"{{"type":"@@patchbay/PING_REQUEST","meta":{{"requestId":"{request_id}"}}}}"#
        );
        let sent = Instant::now();
        post(b.addr, &id, body).await?;
        let mut seen = String::new();
        while !seen.contains(&format!("\"{request_id}\"")) {
            let chunk = tokio::time::timeout(Duration::from_secs(5), conn.next())
                .await
                .map_err(|_| "no reply on the stream within 5 s".to_string())?
                .ok_or("the stream ended")?;
            seen.push_str(&chunk);
        }
        forwarded.push(sent.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
    }
    Ok(SseTimings {
        first_byte: crate::scenarios::percentiles(first),
        forwarded: crate::scenarios::percentiles(forwarded),
        streams,
        posts,
    })
}

/// Runs the scenario over `transport` (`"websocket"` or `"sse"`).
pub async fn run(
    ctx: &Ctx,
    transport: &'static str,
    clients: usize,
    rate: f64,
    messages: u64,
) -> Result<SseRun, String> {
    let server = ctx.start_with(Target::Patchbay, None, &[]).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let pid = server.proc.pid();
    let baseline = procs::rss_kib(pid);
    let gate = Arc::new(Semaphore::new(128));
    let mut opening = Vec::with_capacity(clients);
    for _ in 0..clients {
        let (gate, addr) = (gate.clone(), server.addr);
        opening.push(tokio::spawn(async move {
            let _permit = gate.acquire_owned().await.ok()?;
            match transport {
                "sse" => open_sse(addr).await.ok(),
                _ => client::open(addr, Proto::Patchbay, "bench")
                    .await
                    .ok()
                    .map(|ws| Conn::Ws(Box::new(ws))),
            }
        }));
    }
    let mut conns = Vec::with_capacity(clients);
    for o in opening {
        if let Ok(Some(c)) = o.await {
            conns.push(c);
        }
    }
    if conns.len() < clients {
        return Err(format!(
            "only {} of {clients} {transport} clients connected",
            conns.len()
        ));
    }
    let loaded = crate::scenarios::settled_rss_kib(pid).await;
    let total = Arc::new(AtomicU64::new(0));
    let mut readers = Vec::with_capacity(clients);
    for mut conn in conns {
        let total = total.clone();
        readers.push(tokio::spawn(async move {
            while let Some(text) = conn.next().await {
                let n = text.matches("\"seq\":").count() as u64;
                total.fetch_add(n, Ordering::Relaxed);
            }
        }));
    }
    let expected = messages * clients as u64;
    let cpu_before = procs::cpu_ticks(pid);
    crate::scenarios::publish_http(server.addr, rate, messages).await?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while total.load(Ordering::Relaxed) < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let cpu = procs::cpu_ticks(pid) - cpu_before;
    let delivered = total.load(Ordering::Relaxed);
    for r in readers {
        r.abort();
    }
    drop(server);
    Ok(SseRun {
        transport,
        clients,
        idle_kib_per_connection: loaded.saturating_sub(baseline) as f64 / clients as f64,
        expected,
        delivered,
        cpu_us_per_delivery: cpu as f64 / ctx.ticks_per_sec * 1e6 / delivered.max(1) as f64,
    })
}
