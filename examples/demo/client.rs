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
    /// The ids of the notes pushed to us.
    notes: Vec<Value>,
}

/// Runs the whole script against patchbay at `addr`.
pub async fn run(addr: SocketAddr) -> Step {
    let url = format!("ws://{addr}/ws");
    println!("1. connect to {url}");
    let (ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(&url))
        .await
        .map_err(|_| "no websocket handshake in time".to_string())?
        .map_err(|e| format!("cannot connect: {e}"))?;
    let mut c = Client {
        ws,
        progress: HashMap::new(),
        notes: Vec::new(),
    };
    let hello = c.recv().await?;
    println!("   <- {}", show(&hello));
    expect_type(&hello, "@@patchbay/CONNECTED")?;

    println!(
        "\n2. an `http` action: NOTES_FETCH calls GET /notes on the REST API; its manifest's \
         `subscribe` puts us in the room `notes`"
    );
    let reply = c.request("NOTES_FETCH", json!({})).await?;
    expect_type(&reply, "NOTES_FETCH_SUCCESS")?;

    println!("\n3. NOTE_ADD calls POST /notes; the API pushes NOTE_ADDED into the room `notes`");
    let reply = c
        .request(
            "NOTE_ADD",
            json!({"text": "hello from the scripted client"}),
        )
        .await?;
    expect_type(&reply, "NOTE_ADD_SUCCESS")?;
    let note = reply["payload"]["id"].clone();
    c.until(|c| c.notes.contains(&note)).await?;

    println!(
        "\n4. a `task` action: TASK_ENQUEUE queues a job on patchbay's task manager and puts us \
         in the room task:<id>;\n   a worker runs the queue's command (a shell script) with \
         the job as JSON on stdin, and each\n   progress line it prints becomes a TASK_PROGRESS"
    );
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
    let last = c.until_final(&id).await?;
    println!(
        "   final status: {}, result: {}",
        last["status"].as_str().unwrap_or("?"),
        last["result"]
    );
    if last["status"] != "succeeded" {
        return Err(format!("task {id} ended {}", last["status"]));
    }

    println!("\n5. read it again (TASK_FETCH), and list our tasks (TASKS_FETCH)");
    let reply = c.request("TASK_FETCH", json!({"id": id})).await?;
    expect_type(&reply, "TASK_FETCH_SUCCESS")?;
    let reply = c.request("TASKS_FETCH", json!({"limit": 5})).await?;
    expect_type(&reply, "TASKS_FETCH_SUCCESS")?;
    let listed = reply["payload"]["tasks"].as_array().map_or(0, Vec::len);
    if listed == 0 {
        return Err("the list does not show the task".into());
    }

    println!("\n6. enqueue a long task and cancel it while it runs: its process group is stopped");
    let reply = c
        .request(
            "TASK_ENQUEUE",
            json!({"title": "task to cancel", "steps": 50}),
        )
        .await?;
    expect_type(&reply, "TASK_ENQUEUE_SUCCESS")?;
    let id = task_id(&reply)?;
    c.until(|c| {
        c.progress
            .get(&id)
            .is_some_and(|t| t["status"] == "running")
    })
    .await?;
    let reply = c.request("TASK_CANCEL", json!({"id": id})).await?;
    expect_type(&reply, "TASK_CANCEL_SUCCESS")?;
    let last = c.until_final(&id).await?;
    println!(
        "   final status: {}",
        last["status"].as_str().unwrap_or("?")
    );
    if last["status"] != "cancelled" {
        return Err(format!("task {id} ended {}", last["status"]));
    }
    println!("   cancelling it again is a conflict:");
    let reply = c.request("TASK_CANCEL", json!({"id": id})).await?;
    expect_code(&reply, "TASK_CANCEL_FAILURE", "conflict")?;

    println!("\n7. an invalid request: the manifest's schema rejects it, nothing is queued");
    let reply = c.request("TASK_ENQUEUE", json!({"steps": 3})).await?;
    expect_code(&reply, "TASK_ENQUEUE_FAILURE", "invalid_payload")?;

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

    /// Waits for the TASK_PROGRESS with task `id`'s final status, and returns the task.
    async fn until_final(&mut self, id: &str) -> Step<Value> {
        self.until(|c| c.progress.get(id).is_some_and(is_final))
            .await?;
        Ok(self.progress[id].clone())
    }

    /// A message that is not the reply being waited for.
    fn other(&mut self, msg: Value) {
        if msg["type"] == "NOTE_ADDED" {
            self.notes.push(msg["payload"]["id"].clone());
        }
        if msg["type"] != "TASK_PROGRESS" {
            println!("   <- {}", show(&msg));
            return;
        }
        let task = &msg["payload"];
        let p = &task["progress"];
        let percent = p["percent"].as_u64().unwrap_or(0);
        let filled = (percent / 5) as usize;
        println!(
            "   <- TASK_PROGRESS [{}{}] {percent:>3}%  {:<9} {:<14} room {}",
            "#".repeat(filled),
            ".".repeat(20 - filled.min(20)),
            task["status"].as_str().unwrap_or_default(),
            p["message"].as_str().unwrap_or_default(),
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

fn expect_code(msg: &Value, expected: &str, code: &str) -> Step {
    expect_type(msg, expected)?;
    if msg["payload"]["code"] == code {
        Ok(())
    } else {
        Err(format!("expected the code {code}, got {}", msg["payload"]))
    }
}

fn is_final(task: &Value) -> bool {
    matches!(
        task["status"].as_str(),
        Some("succeeded" | "failed" | "cancelled" | "lost")
    )
}

fn task_id(reply: &Value) -> Step<String> {
    reply["payload"]["id"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| format!("the task has no id: {reply}"))
}
