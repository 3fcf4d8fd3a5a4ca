//! The reconnect storm (history and recovery, on Redis): `clients` connections each recover
//! three history rooms — one all of them share, one per group of 100, one of their own — with
//! one batch SUBSCRIBE whose `since` is the start of each room, spread over `window`. Every
//! room holds `missed` actions, so each client is replayed `3 × missed`. Reported: the time
//! from a client's SUBSCRIBE to its last replayed action, patchbay's history reads (recoveries
//! of one room share reads) and patchbay's CPU over the storm.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::Message;

use crate::client;
use crate::procs;
use crate::scenarios::{Ctx, Percentiles, Target, percentiles};

/// What one storm measured.
pub struct StormRun {
    pub clients: usize,
    pub rooms: usize,
    pub missed: u64,
    /// Clients that got every action of their three rooms back, `recovered: true`.
    pub recovered: usize,
    pub first_error: Option<String>,
    /// Microseconds from a client's SUBSCRIBE to its last replayed action.
    pub latency: Percentiles,
    /// patchbay's `patchbay_history_reads_total` over the storm.
    pub reads: u64,
    pub cpu_seconds: f64,
    /// From the first SUBSCRIBE to the last replay received.
    pub elapsed: Duration,
}

/// Runs one storm; see the module comment.
pub async fn storm(
    ctx: &Ctx,
    clients: usize,
    window: Duration,
    missed: u64,
) -> Result<StormRun, String> {
    let redis = redis::Client::open(ctx.redis_url.as_str()).map_err(|e| e.to_string())?;
    let mut conn = redis
        .get_multiplexed_async_connection()
        .await
        .map_err(|e| e.to_string())?;
    // A clean Redis: no room of an earlier run.
    redis::cmd("FLUSHALL")
        .query_async::<()>(&mut conn)
        .await
        .map_err(|e| e.to_string())?;
    let server = ctx
        .start_with(
            Target::Patchbay,
            Some(&ctx.redis_url),
            &[
                ("PATCHBAY_HISTORY_ROOMS", "storm:*"),
                ("PATCHBAY_PUBLIC_ROOMS", "storm:*"),
                ("PATCHBAY_HISTORY_SIZE", "100"),
                ("PATCHBAY_RECOVER_MAX", "1000"),
            ],
        )
        .await?;
    let groups = clients.div_ceil(100).max(1);
    let rooms_of = |i: usize| {
        [
            "storm:all".to_string(),
            format!("storm:g{}", i % groups),
            format!("storm:c{i}"),
        ]
    };
    let mut rooms = vec!["storm:all".to_string()];
    rooms.extend((0..groups).map(|g| format!("storm:g{g}")));
    rooms.extend((0..clients).map(|i| format!("storm:c{i}")));

    // patchbay writes what history keeps at start-up: wait for it, then fill every room.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let kept: Option<String> = redis::cmd("HGET")
            .arg("patchbay:history")
            .arg("rooms")
            .query_async(&mut conn)
            .await
            .map_err(|e| e.to_string())?;
        if kept.is_some() {
            break;
        }
        if Instant::now() > deadline {
            return Err("patchbay did not write its history settings to Redis".into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut epochs = std::collections::HashMap::new();
    for chunk in rooms.chunks(1000) {
        let mut pipe = redis::pipe();
        for room in chunk {
            for n in 1..=missed {
                let action = format!(r#"{{"type":"STORM","payload":{n}}}"#);
                pipe.cmd("FCALL")
                    .arg("patchbay_publish")
                    .arg(1)
                    .arg("patchbay:history")
                    .arg("")
                    .arg("")
                    .arg(action)
                    .arg(room)
                    .ignore();
            }
            pipe.cmd("FCALL")
                .arg("patchbay_read")
                .arg(1)
                .arg("patchbay:history")
                .arg(room)
                .arg(0)
                .arg(0);
        }
        let reads: Vec<Vec<redis::Value>> = pipe
            .query_async(&mut conn)
            .await
            .map_err(|e| format!("filling the rooms: {e}"))?;
        for (room, read) in chunk.iter().zip(reads) {
            let epoch = match read.first() {
                Some(redis::Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
                other => return Err(format!("patchbay_read answered {other:?}")),
            };
            epochs.insert(room.clone(), epoch);
        }
    }
    let epochs = Arc::new(epochs);

    // Every client connected before the storm.
    let gate = Arc::new(Semaphore::new(256));
    let mut connecting = Vec::with_capacity(clients);
    for _ in 0..clients {
        let (gate, addr) = (gate.clone(), server.addr);
        connecting.push(tokio::spawn(async move {
            let _permit = gate.acquire_owned().await.ok()?;
            client::open_plain(addr, true).await.ok()
        }));
    }
    let mut sockets = Vec::with_capacity(clients);
    for c in connecting {
        sockets.push(c.await.ok().flatten());
    }
    let connected = sockets.iter().filter(|s| s.is_some()).count();
    if connected < clients {
        return Err(format!("only {connected} of {clients} clients connected"));
    }

    let reads_before = history_reads(server.addr);
    let cpu_before = procs::cpu_ticks(server.proc.pid());
    let start = Instant::now() + Duration::from_millis(200);
    let recovered = Arc::new(AtomicUsize::new(0));
    let first_error: Arc<std::sync::Mutex<Option<String>>> = Arc::default();
    let mut storm = Vec::with_capacity(clients);
    for (i, ws) in sockets.into_iter().enumerate() {
        let mut ws = ws.expect("counted above");
        let asks: Vec<serde_json::Value> = rooms_of(i)
            .iter()
            .map(|r| serde_json::json!({"room": r, "since": {"epoch": epochs[r], "offset": 0}}))
            .collect();
        let (recovered, first_error) = (recovered.clone(), first_error.clone());
        let at = start + window.mul_f64(i as f64 / clients as f64);
        storm.push(tokio::spawn(async move {
            tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await;
            let sent = Instant::now();
            let request = serde_json::json!({"type": "@@patchbay/SUBSCRIBE_REQUEST", "payload": {"rooms": asks}, "meta": {"requestId": "storm"}});
            let outcome = async {
                ws.send(Message::text(request.to_string()))
                    .await
                    .map_err(|e| e.to_string())?;
                let (mut answered, mut replayed) = (false, 0u64);
                while !answered || replayed < 3 * missed {
                    let msg = tokio::time::timeout(Duration::from_secs(60), ws.next())
                        .await
                        .map_err(|_| "no replay within 60 s".to_string())?;
                    let Some(Ok(Message::Text(t))) = msg else {
                        match msg {
                            Some(Ok(_)) => continue,
                            _ => return Err("the connection ended".to_string()),
                        }
                    };
                    if t.contains("\"replayed\":true") {
                        replayed += 1;
                    } else if t.contains("SUBSCRIBE_SUCCESS") {
                        if t.matches("\"recovered\":true").count() != 3 {
                            return Err(format!("not recovered: {}", &t[..t.len().min(300)]));
                        }
                        answered = true;
                    } else if t.contains("SUBSCRIBE_FAILURE") {
                        return Err(format!("refused: {t}"));
                    }
                }
                Ok::<_, String>(sent.elapsed())
            }
            .await;
            match outcome {
                Ok(took) => {
                    recovered.fetch_add(1, Ordering::Relaxed);
                    Some((took, ws))
                }
                Err(e) => {
                    first_error.lock().unwrap().get_or_insert(e);
                    None
                }
            }
        }));
    }
    let mut latencies = Vec::with_capacity(clients);
    let mut keep = Vec::with_capacity(clients);
    for task in storm {
        if let Ok(Some((took, ws))) = task.await {
            latencies.push(took.as_micros().min(u128::from(u32::MAX)) as u32);
            keep.push(ws);
        }
    }
    let elapsed = start.elapsed();
    let cpu = procs::cpu_ticks(server.proc.pid()) - cpu_before;
    let reads = history_reads(server.addr).saturating_sub(reads_before);
    drop(keep);
    let first_error = first_error.lock().unwrap().take();
    Ok(StormRun {
        clients,
        rooms: rooms.len(),
        missed,
        recovered: recovered.load(Ordering::Relaxed),
        first_error,
        latency: percentiles(latencies),
        reads,
        cpu_seconds: cpu as f64 / ctx.ticks_per_sec,
        elapsed,
    })
}

/// `patchbay_history_reads_total` from `/metrics`.
fn history_reads(addr: std::net::SocketAddr) -> u64 {
    procs::http_get(addr, "/metrics")
        .and_then(|body| {
            body.lines()
                .find_map(|l| l.strip_prefix("patchbay_history_reads_total "))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}
