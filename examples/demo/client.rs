//! The scripted client: what a webapp does over the websocket, printed step by step.
//!
//! Everything on the wire is a redux action (`{"type","payload"?,"error"?,"meta"?}`): the
//! client sends `X_REQUEST`, patchbay answers `X_SUCCESS` or `X_FAILURE` with the same
//! `meta.requestId`, and server-fired actions such as `TASK_PROGRESS` arrive in between.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// How long any step may wait for its answer before the script gives up.
const WAIT: Duration = Duration::from_secs(10);

type Step<T = ()> = Result<T, String>;

struct Client {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    /// The latest TASK_PROGRESS payload per task id: progress may arrive while we wait for
    /// a reply, and must not be lost.
    progress: HashMap<String, Value>,
}

/// Runs the whole script against patchbay at `addr`; `redis` says how the API publishes.
pub async fn run(addr: SocketAddr, redis: bool) -> Step {
    let url = format!("ws://{addr}/ws");
    println!("1. connect to {url}");
    let (ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(&url))
        .await
        .map_err(|_| "no websocket handshake in time".to_string())?
        .map_err(|e| format!("cannot connect: {e}"))?;
    let mut c = Client {
        ws,
        progress: HashMap::new(),
    };
    let hello = c.recv().await?;
    println!("   <- {}", show(&hello));
    expect_type(&hello, "@@patchbay/CONNECTED")?;

    println!("\n2. list tasks (TASKS_FETCH calls GET /tasks?page=1 on the API)");
    let reply = c.request("TASKS_FETCH", json!({"page": 1})).await?;
    expect_type(&reply, "TASKS_FETCH_SUCCESS")?;

    println!("\n3. enqueue a task; the manifest's `subscribe` puts us in the room task:<id>");
    let reply = c
        .request("TASK_ENQUEUE", json!({"title": "demo task", "steps": 5}))
        .await?;
    expect_type(&reply, "TASK_ENQUEUE_SUCCESS")?;
    let id = task_id(&reply)?;
    println!("   meta.subscribed = {}", reply["meta"]["subscribed"]);
    println!(
        "   meta.roomToken  = {} (rejoins the room after a reconnect)",
        reply["meta"]["roomToken"]
    );

    if redis {
        println!(
            "\n4. the API publishes the task JSON with PUBLISH tasks.{id} on Redis, like any task \
             worker;\n   patchbay turns each message into TASK_PROGRESS for the room task:{id}"
        );
    } else {
        println!("\n4. the API pushes TASK_PROGRESS into task:{id} through POST /publish");
    }
    let last = c.until_done(&id).await?;
    println!(
        "   final status: {}",
        last["status"].as_str().unwrap_or("?")
    );
    if last["status"] != "succeeded" {
        return Err(format!("task {id} ended {}", last["status"]));
    }

    println!("\n5. fetch it once more (TASK_FETCH calls GET /tasks/{{id}})");
    let reply = c.request("TASK_FETCH", json!({"id": id})).await?;
    expect_type(&reply, "TASK_FETCH_SUCCESS")?;

    println!("\n6. enqueue a long task and cancel it (TASK_CANCEL calls DELETE /tasks/{{id}})");
    let reply = c
        .request(
            "TASK_ENQUEUE",
            json!({"title": "task to cancel", "steps": 50}),
        )
        .await?;
    expect_type(&reply, "TASK_ENQUEUE_SUCCESS")?;
    let id = task_id(&reply)?;
    c.until(|c| c.progress.contains_key(&id)).await?;
    let reply = c.request("TASK_CANCEL", json!({"id": id})).await?;
    expect_type(&reply, "TASK_CANCEL_SUCCESS")?;
    let last = c.until_done(&id).await?;
    println!(
        "   final status: {}",
        last["status"].as_str().unwrap_or("?")
    );
    if last["status"] != "cancelled" {
        return Err(format!("task {id} ended {}", last["status"]));
    }

    println!("\n7. an invalid request: the manifest's schema rejects it, the API is never called");
    let reply = c.request("TASK_ENQUEUE", json!({"steps": 3})).await?;
    expect_type(&reply, "TASK_ENQUEUE_FAILURE")?;
    if reply["payload"]["code"] != "invalid_payload" {
        return Err(format!(
            "expected invalid_payload, got {}",
            reply["payload"]
        ));
    }

    let _ = c.ws.close(None).await;
    Ok(())
}

impl Client {
    /// Sends `<name>_REQUEST` and returns the reply with the same request id, printing
    /// (and remembering) any TASK_PROGRESS that arrives meanwhile.
    async fn request(&mut self, name: &str, payload: Value) -> Step<Value> {
        // Use uuids: patchbay passes the id upstream as the `Idempotency-Key`.
        let request_id = uuid::Uuid::new_v4().to_string();
        let msg = json!({
            "type": format!("{name}_REQUEST"),
            "payload": payload,
            "meta": {"requestId": request_id},
        });
        println!("   -> {}", show(&msg));
        self.ws
            .send(Message::text(msg.to_string()))
            .await
            .map_err(|e| format!("send failed: {e}"))?;
        loop {
            let msg = self.recv().await?;
            if msg["meta"]["requestId"] == request_id.as_str() {
                println!("   <- {}", show(&msg));
                return Ok(msg);
            }
            self.other(msg);
        }
    }

    /// Reads messages until `done(self)` holds.
    async fn until(&mut self, done: impl Fn(&Self) -> bool) -> Step {
        while !done(self) {
            let msg = self.recv().await?;
            self.other(msg);
        }
        Ok(())
    }

    /// Waits for the TASK_PROGRESS that says task `id` is done, and returns it.
    async fn until_done(&mut self, id: &str) -> Step<Value> {
        self.until(|c| {
            c.progress
                .get(id)
                .is_some_and(|t| t["progress"]["done"] == true)
        })
        .await?;
        Ok(self.progress[id].clone())
    }

    /// A message that is not the reply being waited for.
    fn other(&mut self, msg: Value) {
        if msg["type"] != "TASK_PROGRESS" {
            println!("   <- {}", show(&msg));
            return;
        }
        let task = &msg["payload"];
        let p = &task["progress"];
        let percent = p["percent"].as_u64().unwrap_or(0);
        let filled = (percent / 5) as usize;
        println!(
            "   <- TASK_PROGRESS [{}{}] {percent:>3}%  {:<14} room {}",
            "#".repeat(filled),
            ".".repeat(20 - filled.min(20)),
            p["status"].as_str().unwrap_or_default(),
            msg["meta"]["room"].as_str().unwrap_or_default(),
        );
        if let Some(id) = task["id"].as_str() {
            self.progress.insert(id.to_string(), task.clone());
        }
    }

    /// The next JSON text message, within [`WAIT`].
    async fn recv(&mut self) -> Step<Value> {
        loop {
            let msg = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .map_err(|_| format!("nothing received within {} s", WAIT.as_secs()))?;
            match msg {
                Some(Ok(Message::Text(t))) => {
                    return serde_json::from_str(t.as_str())
                        .map_err(|e| format!("patchbay sent invalid JSON: {e}"));
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                other => return Err(format!("the connection ended: {other:?}")),
            }
        }
    }
}

/// The message as sent on the wire, but with its keys in the usual FSA order.
fn show(msg: &Value) -> String {
    let fields: Vec<String> = ["type", "payload", "error", "meta"]
        .iter()
        .filter(|k| !msg[**k].is_null())
        .map(|k| format!("\"{k}\":{}", msg[*k]))
        .collect();
    format!("{{{}}}", fields.join(","))
}

fn expect_type(msg: &Value, expected: &str) -> Step {
    if msg["type"] == expected {
        Ok(())
    } else {
        Err(format!("expected {expected}, got {msg}"))
    }
}

fn task_id(reply: &Value) -> Step<String> {
    reply["payload"]["id"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| format!("the task has no id: {reply}"))
}
