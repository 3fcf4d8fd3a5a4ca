//! The demo REST API: an in-memory task store behind plain HTTP/JSON.
//!
//! It knows nothing about websockets. Clients reach it through patchbay (the manifests in
//! `actions/tasks.json` map each action to one of these routes), and it pushes progress to
//! them the way any backend would: `POST /publish` on patchbay with a bearer token, or, with
//! the Redis bus, `PUBLISH tasks.<id> <task JSON>` on Redis like a task worker in any language.
//! It also serves the demo page ([`Site`]), so the page calls it on its own origin.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use redis::aio::MultiplexedConnection;
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use crate::site::Site;

const PAGE_SIZE: usize = 20;
const STEP_EVERY: Duration = Duration::from_millis(300);
const DEFAULT_STEPS: u64 = 5;

/// Where and how to push task progress.
pub enum Publisher {
    /// `POST /publish` on patchbay: `TASK_PROGRESS` into the room `task:<id>`.
    Http { patchbay: SocketAddr, token: String },
    /// `PUBLISH tasks.<id> <task JSON>`: patchbay matches the channel with its task pattern
    /// (default `tasks.*`) and makes the `TASK_PROGRESS` itself.
    Redis(MultiplexedConnection),
}

struct Task {
    id: String,
    title: String,
    status: &'static str,
    step: u64,
    steps: u64,
}

impl Task {
    fn finished(&self) -> bool {
        matches!(self.status, "succeeded" | "cancelled")
    }

    /// The task JSON of Patchbay's task manager, so existing front ends can render it.
    fn to_json(&self) -> Value {
        let progress_status = match self.status {
            "running" => format!("step {} of {}", self.step, self.steps),
            other => other.to_string(),
        };
        json!({
            "id": self.id,
            "title": self.title,
            "userId": null,
            "type": "demo",
            "status": self.status,
            "progress": {
                "percent": self.step * 100 / self.steps,
                "step": self.step,
                "steps": self.steps,
                "status": progress_status,
                "done": self.finished(),
            },
        })
    }
}

#[derive(Default)]
struct Store {
    /// In creation order, which is also the listing order.
    tasks: Vec<Task>,
    /// `Idempotency-Key` → task id: patchbay sends the request id as the key, and a retried
    /// request must not queue a second task.
    keys: HashMap<String, String>,
}

impl Store {
    fn get_mut(&mut self, id: &str) -> Option<&mut Task> {
        self.tasks.iter_mut().find(|t| t.id == id)
    }
}

#[derive(Clone)]
struct Api {
    store: Arc<Mutex<Store>>,
    /// Snapshots to publish. One queue, filled while the store is locked, keeps the pushes
    /// in the same order as the state changes (a step can never overtake a cancel).
    outbox: mpsc::UnboundedSender<Value>,
    site: Arc<Site>,
}

/// Serves the API and the page on `listener` forever.
pub async fn serve(listener: TcpListener, publisher: Publisher, site: Site) {
    let (outbox, queue) = mpsc::unbounded_channel();
    tokio::spawn(publish_loop(queue, publisher));
    let api = Api {
        store: Arc::default(),
        outbox,
        site: Arc::new(site),
    };
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let api = api.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let api = api.clone();
                async move { Ok::<_, Infallible>(api.handle(req).await) }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

impl Api {
    async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let method = req.method().clone();
        let path = req.uri().path().to_string();
        let query = req.uri().query().unwrap_or_default().to_string();
        let key = req
            .headers()
            .get("idempotency-key")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        match (&method, segments.as_slice()) {
            (&Method::GET, ["tasks"]) => self.list(&query),
            (&Method::GET, ["tasks", id]) => self.fetch(id),
            (&Method::POST, ["tasks"]) => {
                let body = req.into_body().collect().await.map(|b| b.to_bytes());
                self.enqueue(&body.unwrap_or_default(), key)
            }
            (&Method::DELETE, ["tasks", id]) => self.cancel(id),
            (&Method::GET, ["demo", "patchbay"]) => self.site.control(None, false).await,
            (&Method::POST, ["demo", "patchbay", action @ ("stop" | "start")]) => {
                let json_body = req
                    .headers()
                    .get("content-type")
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|v| v.starts_with("application/json"));
                self.site.control(Some(action), json_body).await
            }
            (&Method::GET, _) => self
                .site
                .get(&path)
                .unwrap_or_else(|| error(StatusCode::NOT_FOUND, "not_found", "no such route")),
            _ => error(StatusCode::NOT_FOUND, "not_found", "no such route"),
        }
    }

    fn list(&self, query: &str) -> Response<Full<Bytes>> {
        let page = query
            .split('&')
            .find_map(|kv| kv.strip_prefix("page="))
            .map_or(Some(1), |p| p.parse::<usize>().ok().filter(|p| *p >= 1));
        let Some(page) = page else {
            return error(
                StatusCode::BAD_REQUEST,
                "bad_page",
                "page must be 1 or more",
            );
        };
        let store = self.store.lock().unwrap();
        let tasks: Vec<Value> = store
            .tasks
            .iter()
            .skip((page - 1) * PAGE_SIZE)
            .take(PAGE_SIZE)
            .map(Task::to_json)
            .collect();
        let body = json!({"tasks": tasks, "page": page, "total": store.tasks.len()});
        reply(StatusCode::OK, &body)
    }

    fn fetch(&self, id: &str) -> Response<Full<Bytes>> {
        match self.store.lock().unwrap().get_mut(id) {
            Some(task) => reply(StatusCode::OK, &task.to_json()),
            None => not_found(id),
        }
    }

    fn enqueue(&self, body: &[u8], key: Option<String>) -> Response<Full<Bytes>> {
        // Through patchbay the manifest's schema already checked this; the API checks again
        // because clients may also call it directly.
        let (title, steps) = match parse_new_task(body) {
            Ok(t) => t,
            Err(message) => return error(StatusCode::BAD_REQUEST, "invalid_task", &message),
        };
        let mut store = self.store.lock().unwrap();
        if let Some(id) = key.as_ref().and_then(|k| store.keys.get(k)).cloned() {
            let task = store.get_mut(&id).expect("keys point at tasks");
            return reply(StatusCode::CREATED, &task.to_json());
        }
        let id = uuid::Uuid::new_v4().to_string();
        let task = Task {
            id: id.clone(),
            title,
            status: "queued",
            step: 0,
            steps,
        };
        let body = task.to_json();
        store.tasks.push(task);
        if let Some(key) = key {
            store.keys.insert(key, id.clone());
        }
        tokio::spawn(self.clone().work(id));
        reply(StatusCode::CREATED, &body)
    }

    fn cancel(&self, id: &str) -> Response<Full<Bytes>> {
        let mut store = self.store.lock().unwrap();
        let Some(task) = store.get_mut(id) else {
            return not_found(id);
        };
        if task.finished() {
            let message = format!("task {id} is already {}", task.status);
            return error(StatusCode::CONFLICT, "already_finished", &message);
        }
        task.status = "cancelled";
        let body = task.to_json();
        let _ = self.outbox.send(body.clone());
        reply(StatusCode::OK, &body)
    }

    /// The "worker": one step every [`STEP_EVERY`], each step pushed to the task's room.
    async fn work(self, id: String) {
        loop {
            tokio::time::sleep(STEP_EVERY).await;
            let mut store = self.store.lock().unwrap();
            let task = store.get_mut(&id).expect("tasks are never removed");
            if task.finished() {
                return; // cancelled meanwhile; the cancel already pushed the final state
            }
            task.step += 1;
            task.status = if task.step == task.steps {
                "succeeded"
            } else {
                "running"
            };
            let _ = self.outbox.send(task.to_json());
            if task.finished() {
                return;
            }
        }
    }
}

fn parse_new_task(body: &[u8]) -> Result<(String, u64), String> {
    let body: Value = serde_json::from_slice(body).map_err(|e| format!("body is not JSON: {e}"))?;
    let title = match body.get("title") {
        Some(Value::String(t)) if (1..=200).contains(&t.chars().count()) => t.clone(),
        _ => return Err("title must be a string of 1 to 200 characters".into()),
    };
    let steps = match body.get("steps") {
        None | Some(Value::Null) => DEFAULT_STEPS,
        Some(v) => v
            .as_u64()
            .filter(|s| (1..=100).contains(s))
            .ok_or("steps must be an integer from 1 to 100")?,
    };
    Ok((title, steps))
}

/// Sends each snapshot, in order, so that it reaches the room `task:<id>` as `TASK_PROGRESS`.
async fn publish_loop(mut queue: mpsc::UnboundedReceiver<Value>, mut to: Publisher) {
    // While patchbay is stopped every push fails: say so once, not at every step.
    let mut failing = false;
    while let Some(task) = queue.recv().await {
        let id = task["id"].as_str().unwrap_or_default().to_string();
        let sent = match &mut to {
            Publisher::Http { patchbay, token } => {
                let room = format!("task:{id}");
                let action = json!({"type": "TASK_PROGRESS", "payload": task});
                post_publish(*patchbay, token, json!({"rooms": [room], "action": action})).await
            }
            Publisher::Redis(conn) => redis::cmd("PUBLISH")
                .arg(format!("tasks.{id}"))
                .arg(task.to_string())
                .query_async::<i64>(conn)
                .await
                .map(drop)
                .map_err(|e| e.to_string()),
        };
        match sent {
            Err(e) if !failing => {
                failing = true;
                tracing::warn!(error = %e, "publishing task progress failed (pushes are lost until it works again; clients poll meanwhile)");
            }
            Ok(()) if failing => {
                failing = false;
                tracing::info!("publishing task progress works again");
            }
            _ => {}
        }
    }
}

/// Sends one request to `addr` over a fresh HTTP/1 connection, with `Host` set: plain hyper,
/// as any HTTP client in any language would do it.
pub async fn send(
    addr: SocketAddr,
    mut req: Request<Full<Bytes>>,
) -> Result<Response<Incoming>, String> {
    let stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let host = addr
        .to_string()
        .parse()
        .map_err(|_| "bad address".to_string())?;
    req.headers_mut().insert(hyper::header::HOST, host);
    sender.send_request(req).await.map_err(|e| e.to_string())
}

/// `POST /publish` on patchbay with the bearer token.
async fn post_publish(patchbay: SocketAddr, token: &str, body: Value) -> Result<(), String> {
    let req = Request::post("/publish")
        .header("authorization", format!("Bearer {token}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .map_err(|e| e.to_string())?;
    match send(patchbay, req).await?.status() {
        StatusCode::ACCEPTED => Ok(()),
        other => Err(format!("patchbay answered {other}")),
    }
}

fn reply(status: StatusCode, body: &Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("a valid response")
}

fn error(status: StatusCode, code: &str, message: &str) -> Response<Full<Bytes>> {
    reply(status, &json!({"error": code, "message": message}))
}

fn not_found(id: &str) -> Response<Full<Bytes>> {
    error(StatusCode::NOT_FOUND, "not_found", &format!("no task {id}"))
}
