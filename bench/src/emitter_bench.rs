//! socket.io emitter interop on one patchbay instance over Redis: CPU per delivery of the
//! fan-out when the actions arrive as emitter messages (msgpack on `socket.io#/#bench#`) and
//! when they arrive as JSON on the room's own channel; then hostile emitter messages (10,000
//! nested arrays, a declared length of 2^31, truncated messages, 60 KB of binary): patchbay's
//! CPU per message, and its resident and peak memory before and after.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio_tungstenite::tungstenite::Message;

use crate::client::{self, Proto};
use crate::procs;
use crate::scenarios::{self, Ctx, Target};

/// One way in for the same fan-out.
pub struct Via {
    pub name: &'static str,
    pub expected: u64,
    pub delivered: u64,
    pub cpu_us_per_delivery: f64,
}

/// The hostile messages' cost.
pub struct Hostile {
    pub messages: u64,
    pub counted: u64,
    pub cpu_us_per_message: f64,
    pub rss_before_kib: u64,
    pub rss_after_kib: u64,
    pub peak_before_kib: u64,
    pub peak_after_kib: u64,
}

/// What a run measured.
pub struct EmitterRun {
    pub clients: usize,
    pub vias: Vec<Via>,
    pub hostile: Hostile,
}

/// How many of each hostile kind are published.
const HOSTILE_EACH: u64 = 2000;

/// The bench action as `@socket.io/redis-emitter` 5 publishes `to('bench').emit('B', {seq,
/// ts, pad})`: `[uid, packet, opts]` in msgpack, padded like the JSON one.
fn emitter_message(seq: u64, ts: u64) -> Vec<u8> {
    let json = client::bench_action(seq, ts, scenarios::ACTION_BYTES);
    let pad = json.len() - json.find("\"pad\":\"").map_or(0, |at| at + 7) - 3;
    let mut b = Vec::with_capacity(160);
    let w = &mut b;
    rmp::encode::write_array_len(w, 3).unwrap();
    rmp::encode::write_str(w, "emitter").unwrap();
    rmp::encode::write_map_len(w, 3).unwrap();
    rmp::encode::write_str(w, "type").unwrap();
    rmp::encode::write_uint(w, 2).unwrap();
    rmp::encode::write_str(w, "data").unwrap();
    rmp::encode::write_array_len(w, 2).unwrap();
    rmp::encode::write_str(w, "B").unwrap();
    rmp::encode::write_map_len(w, 3).unwrap();
    rmp::encode::write_str(w, "seq").unwrap();
    rmp::encode::write_uint(w, seq).unwrap();
    rmp::encode::write_str(w, "ts").unwrap();
    rmp::encode::write_uint(w, ts).unwrap();
    rmp::encode::write_str(w, "pad").unwrap();
    rmp::encode::write_str(w, &"x".repeat(pad)).unwrap();
    rmp::encode::write_str(w, "nsp").unwrap();
    rmp::encode::write_str(w, "/").unwrap();
    rmp::encode::write_map_len(w, 3).unwrap();
    rmp::encode::write_str(w, "rooms").unwrap();
    rmp::encode::write_array_len(w, 1).unwrap();
    rmp::encode::write_str(w, "bench").unwrap();
    rmp::encode::write_str(w, "flags").unwrap();
    rmp::encode::write_map_len(w, 0).unwrap();
    rmp::encode::write_str(w, "except").unwrap();
    rmp::encode::write_array_len(w, 0).unwrap();
    b
}

/// The `n`-th hostile message: the four kinds in turn.
fn hostile_message(n: u64) -> Vec<u8> {
    match n % 4 {
        0 => {
            let mut nested = vec![0x91; 10_000];
            nested.push(0xc0);
            nested
        }
        1 => vec![0x93, 0xdd, 0x7f, 0xff, 0xff, 0xff, 0x01],
        2 => {
            let whole = emitter_message(n, 0);
            whole[..whole.len() / 2].to_vec()
        }
        _ => {
            let mut m = vec![0x93, 0xa7];
            m.extend_from_slice(b"emitter");
            m.extend_from_slice(&[0xc6, 0x00, 0x00, 0xea, 0x60]);
            m.resize(m.len() + 60_000, 0xab);
            m.push(0xc0);
            m
        }
    }
}

/// The sum of `patchbay_emitter_dropped_total` over its reasons.
fn dropped(addr: std::net::SocketAddr) -> u64 {
    procs::http_get(addr, "/metrics")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("patchbay_emitter_dropped_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

pub async fn run(
    ctx: &Ctx,
    clients: usize,
    rate: f64,
    messages: u64,
) -> Result<EmitterRun, String> {
    let server = ctx
        .start_with(
            Target::Patchbay,
            Some(&ctx.redis_url),
            &[
                ("PATCHBAY_EMITTER_KEY", "socket.io"),
                ("PATCHBAY_HISTORY_ROOMS", ""),
            ],
        )
        .await?;
    let pid = server.proc.pid();
    let mut conns = Vec::with_capacity(clients);
    for _ in 0..clients {
        conns.push(client::open(server.addr, Proto::Patchbay, "bench").await?);
    }
    let total = Arc::new(AtomicU64::new(0));
    let readers: Vec<_> = conns
        .into_iter()
        .map(|mut ws| {
            let total = total.clone();
            tokio::spawn(async move {
                while let Some(Ok(m)) = ws.next().await {
                    if let Message::Text(t) = m {
                        let n = t.as_str().matches("\"seq\":").count() as u64;
                        total.fetch_add(n, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    let mut vias = Vec::new();
    for name in ["room channel, JSON", "socket.io emitter, msgpack"] {
        total.store(0, Ordering::Relaxed);
        let expected = messages * clients as u64;
        let cpu_before = procs::cpu_ticks(pid);
        scenarios::publish_with(&ctx.redis_url, rate, messages, |seq| {
            let ts = client::now_ns();
            if name.starts_with("room") {
                let json = client::bench_action(seq, ts, scenarios::ACTION_BYTES);
                ("patchbay:room:bench".to_string(), json.into_bytes())
            } else {
                ("socket.io#/#bench#".to_string(), emitter_message(seq, ts))
            }
        })
        .await?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while total.load(Ordering::Relaxed) < expected && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let cpu = procs::cpu_ticks(pid) - cpu_before;
        let delivered = total.load(Ordering::Relaxed);
        vias.push(Via {
            name,
            expected,
            delivered,
            cpu_us_per_delivery: cpu as f64 / ctx.ticks_per_sec * 1e6 / delivered.max(1) as f64,
        });
    }
    let rss_before_kib = scenarios::settled_rss_kib(pid).await;
    let peak_before_kib = procs::peak_rss_kib(pid);
    let cpu_before = procs::cpu_ticks(pid);
    let count = HOSTILE_EACH * 4;
    scenarios::publish_with(&ctx.redis_url, 2000.0, count, |n| {
        ("socket.io#/#bench#".to_string(), hostile_message(n))
    })
    .await?;
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut counted = dropped(server.addr);
    while counted < count && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        counted = dropped(server.addr);
    }
    let cpu = procs::cpu_ticks(pid) - cpu_before;
    let hostile = Hostile {
        messages: count,
        counted,
        cpu_us_per_message: cpu as f64 / ctx.ticks_per_sec * 1e6 / count as f64,
        rss_before_kib,
        rss_after_kib: scenarios::settled_rss_kib(pid).await,
        peak_before_kib,
        peak_after_kib: procs::peak_rss_kib(pid),
    };
    for r in readers {
        r.abort();
    }
    drop(server);
    Ok(EmitterRun {
        clients,
        vias,
        hostile,
    })
}
