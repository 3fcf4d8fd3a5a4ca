//! The demo REST API: a small in-memory board of notes behind plain HTTP/JSON.
//!
//! It knows nothing about websockets. Clients reach it through patchbay (the manifests in
//! `actions/notes.json` map each action to one of these routes) or, while patchbay is down,
//! straight from the shim's REST fallback. It pushes each new note to everyone in the room
//! `notes` the way any backend would: `POST /publish` on patchbay with a bearer token, or,
//! with the Redis bus, `PUBLISH <prefix>:room:notes <action JSON>` on Redis. It also serves
//! the demo page ([`Site`]), so the page calls it on its own origin.
//!
//! The demo's tasks are not the API's business: they are `task` actions, which patchbay's
//! task manager runs itself (see `actions/tasks.json`).

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

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

/// The most notes kept (and listed); older ones are dropped.
const KEEP: usize = 50;
const MAX_TEXT: usize = 500;
/// The room every `NOTES_FETCH` joins and every new note is pushed to.
const ROOM: &str = "notes";

/// Where and how to push new notes.
pub enum Publisher {
    /// `POST /publish` on patchbay, into the room `notes`.
    Http { patchbay: SocketAddr, token: String },
    /// `PUBLISH <prefix>:room:notes <action>` on Redis; every instance delivers it.
    Redis {
        conn: MultiplexedConnection,
        prefix: String,
    },
}

#[derive(Default)]
struct Store {
    /// Newest first.
    notes: VecDeque<Value>,
    /// `Idempotency-Key` → note: patchbay sends the request id as the key (and so does the
    /// shim's fallback), so a retried request adds nothing.
    keys: HashMap<String, Value>,
}

#[derive(Clone)]
struct Api {
    store: Arc<Mutex<Store>>,
    /// Notes to push, in the order they were added.
    outbox: mpsc::UnboundedSender<Value>,
    site: Arc<Site>,
    /// Origins besides the page's whose pages may call the API (CORS, with credentials).
    cors: Arc<Vec<String>>,
}

/// Serves the API and the page on `listener` forever; pages of `cors` origins may call the
/// API from their own origin.
pub async fn serve(listener: TcpListener, publisher: Publisher, site: Site, cors: Vec<String>) {
    let (outbox, queue) = mpsc::unbounded_channel();
    tokio::spawn(publish_loop(queue, publisher));
    let api = Api {
        store: Arc::default(),
        outbox,
        site: Arc::new(site),
        cors: Arc::new(cors),
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
    /// [`Api::route`], with CORS for the `--allow-origin` origins: an app on its own dev
    /// server calls the API as the shim's fallback does.
    async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let origin = req
            .headers()
            .get("origin")
            .and_then(|v| v.to_str().ok())
            .filter(|o| self.cors.iter().any(|c| c == o))
            .map(str::to_string);
        let preflight = req.method() == Method::OPTIONS;
        let mut resp = if preflight {
            let mut r = reply(StatusCode::NO_CONTENT, &Value::Null);
            *r.body_mut() = Full::new(Bytes::new());
            r
        } else {
            self.route(req).await
        };
        if let Some(origin) = origin {
            let h = resp.headers_mut();
            h.insert(
                "access-control-allow-origin",
                origin.parse().expect("a header value"),
            );
            h.insert(
                "access-control-allow-credentials",
                "true".parse().expect("a header value"),
            );
            h.append("vary", "origin".parse().expect("a header value"));
            if preflight {
                h.insert(
                    "access-control-allow-methods",
                    "GET, POST, PUT, PATCH, DELETE"
                        .parse()
                        .expect("a header value"),
                );
                h.insert(
                    "access-control-allow-headers",
                    "content-type, idempotency-key, x-request-id, authorization"
                        .parse()
                        .expect("a header value"),
                );
                h.insert(
                    "access-control-max-age",
                    "600".parse().expect("a header value"),
                );
            }
        }
        resp
    }

    async fn route(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let method = req.method().clone();
        let path = req.uri().path().to_string();
        let key = req
            .headers()
            .get("idempotency-key")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        match (&method, segments.as_slice()) {
            (&Method::GET, ["notes"]) => {
                let notes: Vec<Value> = self.store.lock().unwrap().notes.iter().cloned().collect();
                reply(StatusCode::OK, &json!({ "notes": notes }))
            }
            (&Method::POST, ["notes"]) => {
                let body = req.into_body().collect().await.map(|b| b.to_bytes());
                self.add(&body.unwrap_or_default(), key)
            }
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

    fn add(&self, body: &[u8], key: Option<String>) -> Response<Full<Bytes>> {
        // Through patchbay the manifest's schema already checked this; the API checks again
        // because the shim's fallback calls it directly.
        let text = match parse_text(body) {
            Ok(t) => t,
            Err(message) => return error(StatusCode::BAD_REQUEST, "invalid_note", &message),
        };
        let mut store = self.store.lock().unwrap();
        if let Some(note) = key.as_ref().and_then(|k| store.keys.get(k)) {
            return reply(StatusCode::CREATED, note);
        }
        let note = json!({
            "id": uuid::Uuid::new_v4().to_string(),
            "text": text,
            "createdAt": humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        });
        store.notes.push_front(note.clone());
        if store.notes.len() > KEEP
            && let Some(old) = store.notes.pop_back()
        {
            store.keys.retain(|_, n| n["id"] != old["id"]);
        }
        if let Some(key) = key {
            store.keys.insert(key, note.clone());
        }
        // Queued while the store is locked, so pushes go out in the order notes were added.
        let _ = self.outbox.send(note.clone());
        reply(StatusCode::CREATED, &note)
    }
}

fn parse_text(body: &[u8]) -> Result<String, String> {
    let body: Value = serde_json::from_slice(body).map_err(|e| format!("body is not JSON: {e}"))?;
    match body.get("text") {
        Some(Value::String(t)) if (1..=MAX_TEXT).contains(&t.chars().count()) => Ok(t.clone()),
        _ => Err(format!(
            "text must be a string of 1 to {MAX_TEXT} characters"
        )),
    }
}

/// Pushes each new note, in order, as `NOTE_ADDED` into the room `notes`.
async fn publish_loop(mut queue: mpsc::UnboundedReceiver<Value>, mut to: Publisher) {
    // While patchbay is stopped every push fails: say so once, not at every note.
    let mut failing = false;
    while let Some(note) = queue.recv().await {
        let action = json!({"type": "NOTE_ADDED", "payload": note});
        let sent = match &mut to {
            Publisher::Http { patchbay, token } => {
                post_publish(*patchbay, token, json!({"rooms": [ROOM], "action": action})).await
            }
            Publisher::Redis { conn, prefix } => redis::cmd("PUBLISH")
                .arg(format!("{prefix}:room:{ROOM}"))
                .arg(action.to_string())
                .query_async::<i64>(conn)
                .await
                .map(drop)
                .map_err(|e| e.to_string()),
        };
        match sent {
            Err(e) if !failing => {
                failing = true;
                tracing::warn!(error = %e, "pushing a note failed (pushes are lost until it works again; pages refetch on reconnect)");
            }
            Ok(()) if failing => {
                failing = false;
                tracing::info!("pushing notes works again");
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
