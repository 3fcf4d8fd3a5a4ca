//! Shared harness for integration tests: a real HTTP upstream, patchbay in-process on port 0,
//! and real websocket clients.
#![allow(dead_code)]

pub mod tasks;
pub mod workers;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{HeaderMap, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use patchbay::Config;
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

/// How long a test waits for anything before failing.
pub const WAIT: Duration = Duration::from_secs(10);

/// Manifests used by most tests, one action per upstream behaviour.
pub const MANIFEST: &str = r#"{
  "ECHO_GET": { "http": { "method": "GET", "path": "/echo/{id}" } },
  "ECHO_LIST": { "http": { "method": "GET", "path": "/echo" } },
  "ECHO_POST": { "http": { "method": "POST", "path": "/echo" } },
  "ECHO_PUT": { "http": { "method": "PUT", "path": "/echo/{id}" } },
  "ECHO_PATCH": { "http": { "method": "PATCH", "path": "/echo/{id}" } },
  "ECHO_DELETE": { "http": { "method": "DELETE", "path": "/echo/{id}" } },
  "TASKS_FETCH": {
    "http": { "method": "GET", "path": "/tasks" },
    "payload": { "type": "object", "properties": { "page": { "type": "integer", "minimum": 1 } }, "additionalProperties": false }
  },
  "TASK_ENQUEUE": { "http": { "method": "POST", "path": "/tasks" }, "subscribe": "task:{id}" },
  "STATUS": { "http": { "method": "GET", "path": "/status/{code}" } },
  "TEXT": { "http": { "method": "GET", "path": "/text" } },
  "EMPTY": { "http": { "method": "GET", "path": "/empty" } },
  "BIG": { "http": { "method": "GET", "path": "/big" } },
  "REDIRECT": { "http": { "method": "GET", "path": "/redirect" } },
  "SLOW": { "http": { "method": "GET", "path": "/slow/{ms}" }, "timeoutMs": 2000 },
  "SLOW_SHORT": { "http": { "method": "GET", "path": "/slow/{ms}" }, "timeoutMs": 200 }
}"#;

/// One request the upstream received.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    /// The raw request target: path and query exactly as sent.
    pub target: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// A small REST API started by the test.
pub struct Upstream {
    pub addr: SocketAddr,
    pub requests: Arc<Mutex<Vec<Recorded>>>,
    task: JoinHandle<()>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Upstream {
    pub async fn start() -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests: Arc<Mutex<Vec<Recorded>>> = Arc::default();
        let log = requests.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let log = log.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| upstream_handle(req, log.clone()));
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Upstream {
            addr,
            requests,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The requests received so far.
    pub fn recorded(&self) -> Vec<Recorded> {
        self.requests.lock().unwrap().clone()
    }
}

fn reply(status: u16, content_type: &str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(body.into()))
        .unwrap()
}

async fn upstream_handle(
    req: Request<Incoming>,
    log: Arc<Mutex<Vec<Recorded>>>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let method = req.method().to_string();
    let target = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_default();
    let headers = req.headers().clone();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    log.lock().unwrap().push(Recorded {
        method: method.clone(),
        target: target.clone(),
        headers: headers.clone(),
        body: body.clone(),
    });
    let path = target.split('?').next().unwrap_or_default().to_string();
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let json_ct = "application/json";
    let resp = match segments.as_slice() {
        ["echo", ..] => {
            let header_map: serde_json::Map<String, Value> = headers
                .iter()
                .map(|(k, v)| {
                    (
                        k.to_string(),
                        Value::String(v.to_str().unwrap_or("").to_string()),
                    )
                })
                .collect();
            let body_json: Value = if body.is_empty() {
                Value::Null
            } else {
                serde_json::from_slice(&body).unwrap_or(Value::Null)
            };
            let out = json!({"method": method, "target": target, "headers": header_map, "body": body_json});
            reply(200, json_ct, out.to_string())
        }
        ["tasks"] if method == "GET" => reply(
            200,
            json_ct,
            r#"{"tasks":[{"id":1,"title":"first"}],"page":1}"#,
        ),
        ["tasks"] if method == "POST" => {
            let mut task: Value = serde_json::from_slice(&body).unwrap_or(json!({}));
            if task.get("id").is_none() {
                task["id"] = json!(77);
            }
            task["status"] = json!("queued");
            reply(201, json_ct, task.to_string())
        }
        ["status", code] => {
            let code: u16 = code.parse().unwrap_or(500);
            reply(
                code,
                json_ct,
                json!({"error": format!("status {code}")}).to_string(),
            )
        }
        ["auth"] => {
            // A delegated-auth endpoint: who the session cookie belongs to.
            let cookie = headers
                .get("cookie")
                .and_then(|c| c.to_str().ok())
                .unwrap_or("")
                .to_string();
            if cookie.contains("sid=good") {
                reply(200, json_ct, r#"{"userId":"7","rooms":["org:7"]}"#)
            } else if cookie.contains("sid=other") {
                reply(200, json_ct, r#"{"userId":8}"#)
            } else if cookie.contains("sid=forbid") {
                reply(403, json_ct, r#"{"error":"forbidden"}"#)
            } else if cookie.contains("sid=slow") {
                tokio::time::sleep(Duration::from_secs(5)).await;
                reply(200, json_ct, r#"{"userId":"7"}"#)
            } else if cookie.contains("sid=nobody") {
                reply(200, json_ct, r#"{"userId":"","rooms":[]}"#)
            } else if cookie.contains("sid=broken") {
                reply(200, "text/plain", "not json")
            } else if cookie.contains("sid=crash") {
                reply(500, json_ct, r#"{"error":"boom"}"#)
            } else {
                reply(401, json_ct, r#"{"error":"who are you"}"#)
            }
        }
        ["notjson"] => reply(500, "text/plain", "oops, not json"),
        ["text"] => reply(200, "text/plain", "hello"),
        ["empty"] => Response::builder()
            .status(204)
            .body(Full::new(Bytes::new()))
            .unwrap(),
        ["big"] => reply(200, json_ct, format!("\"{}\"", "x".repeat(2 * 1024 * 1024))),
        ["redirect"] => Response::builder()
            .status(StatusCode::FOUND)
            .header("location", "/echo")
            .body(Full::new(Bytes::new()))
            .unwrap(),
        ["slow", ms] => {
            let ms: u64 = ms.parse().unwrap_or(0);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            reply(200, json_ct, json!({"slept": ms}).to_string())
        }
        _ => reply(404, json_ct, r#"{"error":"not found"}"#),
    };
    Ok(resp)
}

/// A patchbay instance running in-process on port 0.
pub struct Bridge {
    pub addr: SocketAddr,
    pub app: Arc<patchbay::App>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl Drop for Bridge {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

impl Bridge {
    /// Starts patchbay with `manifest` as its only manifest file, calling `api_url`.
    pub async fn start(
        manifest: &str,
        api_url: Option<String>,
        tweak: impl FnOnce(&mut Config),
    ) -> Bridge {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("actions.json"), manifest).unwrap();
        let mut config = Config {
            listen: "127.0.0.1:0".parse().unwrap(),
            actions_dir: dir.path().to_path_buf(),
            api_url,
            ..Config::default()
        };
        tweak(&mut config);
        let server = patchbay::start(config).expect("patchbay starts");
        let addr = server.local_addr();
        let app = server.app.clone();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(server.run(async move {
            let _ = rx.await;
        }));
        Bridge {
            addr,
            app,
            shutdown: Some(tx),
            task: Some(task),
            _dir: dir,
        }
    }

    /// The usual test bridge: [`MANIFEST`] against `upstream`.
    pub async fn with_upstream(upstream: &Upstream) -> Bridge {
        Self::start(MANIFEST, Some(upstream.url()), |_| {}).await
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    pub fn http_url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Connects and reads the `@@patchbay/CONNECTED` greeting.
    pub async fn connect(&self) -> Client {
        let mut client = self.connect_with(&[]).await.expect("handshake accepted");
        let hello = client.recv().await;
        assert_eq!(hello["type"], "@@patchbay/CONNECTED", "{hello}");
        client
    }

    /// Opens a websocket with extra handshake headers; does not read anything.
    pub async fn connect_with(&self, headers: &[(&str, &str)]) -> Result<Client, WsError> {
        let mut req = self.ws_url().into_client_request().unwrap();
        for (k, v) in headers {
            req.headers_mut().insert(
                hyper::header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        let stream = TcpStream::connect(self.addr).await.unwrap();
        let (ws, _) = tokio_tungstenite::client_async(req, stream).await?;
        Ok(Client { ws })
    }

    /// Triggers graceful shutdown and waits (bounded) for `run` to return.
    pub async fn shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }

    /// Waits for the server task to finish after [`Bridge::shutdown`].
    pub async fn stopped(&mut self) {
        let task = self.task.take().expect("not yet stopped");
        tokio::time::timeout(Duration::from_secs(30), task)
            .await
            .expect("server stops in time")
            .unwrap();
    }
}

/// A websocket client speaking JSON.
pub struct Client {
    pub ws: WebSocketStream<TcpStream>,
}

impl Client {
    pub async fn send(&mut self, v: Value) {
        self.ws
            .send(Message::Text(v.to_string().into()))
            .await
            .unwrap();
    }

    pub async fn send_raw(&mut self, m: Message) {
        self.ws.send(m).await.unwrap();
    }

    /// The next JSON text message (pings and pongs skipped). Panics on close or timeout.
    pub async fn recv(&mut self) -> Value {
        loop {
            let msg = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("a message in time");
            match msg {
                Some(Ok(Message::Text(t))) => {
                    return serde_json::from_str(t.as_str()).expect("server sends JSON");
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                other => panic!("expected a text message, got {other:?}"),
            }
        }
    }

    /// Sends `<name>_REQUEST` and returns the reply carrying the same request id
    /// (other messages in between are returned in the second element).
    pub async fn request(&mut self, name: &str, payload: Value) -> Value {
        let id = uuid::Uuid::new_v4().to_string();
        self.send(json!({"type": format!("{name}_REQUEST"), "payload": payload, "meta": {"requestId": id}})).await;
        loop {
            let m = self.recv().await;
            if m["meta"]["requestId"] == id {
                return m;
            }
        }
    }

    /// Reads until the server closes; returns the close frame (None if the TCP connection
    /// ended without one). Text messages before the close are skipped.
    pub async fn closed(&mut self) -> Option<CloseFrame> {
        loop {
            let msg = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("closed in time");
            match msg {
                Some(Ok(Message::Close(frame))) => return frame,
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return None,
            }
        }
    }
}

/// `POST /publish` with the bearer token `tok` (what the tests configure as the publish token).
pub async fn publish(bridge: &Bridge, body: Value) -> (u16, Value) {
    http_call(
        "POST",
        &bridge.http_url("/publish"),
        &[
            ("authorization", "Bearer tok"),
            ("content-type", "application/json"),
        ],
        &body.to_string(),
    )
    .await
}

/// A GET with no body over a fresh connection: returns status and parsed JSON body.
pub async fn http_get(url: &str) -> (u16, Value) {
    http_call("GET", url, &[], "").await
}

/// One HTTP/1.1 request over a fresh connection: status and parsed JSON body (`null` when the
/// body is not JSON).
pub async fn http_call(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, Value) {
    let (status, _, bytes) = http_raw(method, url, headers, body).await;
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

/// One HTTP/1.1 request over a fresh connection: status, response headers and raw body.
pub async fn http_raw(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, HeaderMap, Bytes) {
    let uri: hyper::Uri = url.parse().unwrap();
    let stream = TcpStream::connect(format!(
        "{}:{}",
        uri.host().unwrap(),
        uri.port_u16().unwrap()
    ))
    .await
    .unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut req = Request::builder()
        .method(method)
        .uri(uri.path_and_query().unwrap().as_str())
        .header("host", uri.authority().unwrap().as_str());
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = sender
        .send_request(req.body(Full::new(Bytes::from(body.to_string()))).unwrap())
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (status, headers, bytes)
}

/// Sends a PING and expects the very next message to be its reply: proves the connection is
/// still open and nothing else was queued before it.
pub async fn assert_answers_ping(client: &mut Client) {
    let id = uuid::Uuid::new_v4().to_string();
    client
        .send(json!({"type": "@@patchbay/PING_REQUEST", "meta": {"requestId": id}}))
        .await;
    let reply = client.recv().await;
    assert_eq!(reply["type"], "@@patchbay/PING_SUCCESS", "{reply}");
    assert_eq!(reply["meta"]["requestId"], id.as_str(), "{reply}");
}

/// Asserts `reply` is an error action of type `ty` whose payload has `code` and a message.
pub fn assert_error_action(reply: &Value, ty: &str, code: &str) {
    assert_eq!(reply["type"], ty, "{reply}");
    assert_eq!(reply["error"], true, "{reply}");
    assert_eq!(reply["payload"]["code"], code, "{reply}");
    assert!(
        reply["payload"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "an error explains itself: {reply}"
    );
}

/// Asserts `reply` is `<name>_FAILURE` with `code` and returns its payload.
pub fn assert_failure<'a>(reply: &'a Value, name: &str, code: &str) -> &'a Value {
    assert_error_action(reply, &format!("{name}_FAILURE"), code);
    assert!(reply["meta"]["requestId"].is_string(), "{reply}");
    &reply["payload"]
}

/// A free port for a private `redis-server`, never handed out twice in this process and outside
/// the kernel's ephemeral range: a test that restarts its Redis must find the port still free,
/// and no other test's Redis (or a connection's local port) may take it in between, else that
/// test's clients would reconnect to another test's Redis.
fn redis_port() -> u16 {
    static TAKEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    let mut taken = TAKEN.lock().unwrap();
    loop {
        let port = 20_000 + (uuid::Uuid::new_v4().as_u128() % 10_000) as u16;
        if taken.contains(&port) {
            continue;
        }
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            taken.push(port);
            return port;
        }
    }
}

/// A private `redis-server` on a free port, killed when dropped.
pub struct RedisServer {
    pub port: u16,
    child: Option<std::process::Child>,
    /// Extra `redis-server` arguments, e.g. `--requirepass`.
    args: Vec<String>,
    /// The password clients must send, if the server requires one.
    password: Option<String>,
    /// Its working directory: a replica writes the master's data there.
    dir: tempfile::TempDir,
}

impl RedisServer {
    /// Starts `redis-server`; fails the test with install instructions if it is missing.
    pub async fn start() -> RedisServer {
        Self::start_with(&[], None).await
    }

    /// Starts `redis-server` with extra arguments; `password` is what `url` then carries.
    pub async fn start_with(args: &[&str], password: Option<&str>) -> RedisServer {
        let port = redis_port();
        let mut server = RedisServer {
            port,
            child: None,
            args: args.iter().map(|a| a.to_string()).collect(),
            password: password.map(str::to_string),
            dir: tempfile::tempdir().unwrap(),
        };
        server.restart().await;
        server
    }

    /// The server's URL, with its password if it has one.
    pub fn url(&self) -> String {
        match &self.password {
            Some(p) => format!("redis://:{p}@127.0.0.1:{}", self.port),
            None => self.url_without_password(),
        }
    }

    pub fn url_without_password(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills the server (SIGKILL: no goodbye to clients) and waits until it is gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port (empty: it keeps nothing on disk).
    pub async fn restart(&mut self) {
        self.kill();
        let child = std::process::Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(&self.args)
            .current_dir(self.dir.path())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run redis-server ({e}): the Redis tests need it on PATH; install it with `apt-get install redis-server` (Debian/Ubuntu) or `brew install redis`")
            });
        self.child = Some(child);
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Ok(mut conn) = self.connection().await
                && redis::cmd("PING")
                    .query_async::<String>(&mut conn)
                    .await
                    .is_ok()
            {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "redis-server did not start on port {}",
                self.port
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A command connection to this server.
    pub async fn connection(&self) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
        redis::Client::open(self.url())?
            .get_multiplexed_async_connection()
            .await
    }

    /// `PUBLISH channel payload` (text or bytes).
    pub async fn publish(&self, channel: &str, payload: impl redis::ToRedisArgs) {
        let mut conn = self.connection().await.unwrap();
        redis::cmd("PUBLISH")
            .arg(channel)
            .arg(payload)
            .query_async::<i64>(&mut conn)
            .await
            .unwrap();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Polls `/readyz` until its `status` is `want`.
pub async fn wait_ready_status(bridge: &Bridge, want: &str) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (code, body) = http_get(&bridge.http_url("/readyz")).await;
        if body["status"] == want {
            assert_eq!(code, if want == "draining" { 503 } else { 200 }, "{body}");
            return body;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "readyz never became {want}: {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The JWT secret tests configure with [`with_jwt`].
pub const SECRET: &str = "the jwt secret of this test suite";

/// Seconds since the epoch.
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A JWT with `claims`, signed with [`SECRET`].
pub fn jwt(claims: Value) -> String {
    use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
    encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

/// JWT auth, with anonymous access off as the configuration defaults it when auth is set.
pub fn with_jwt(c: &mut Config) {
    c.jwt_secret = Some(SECRET.into());
    c.allow_anonymous = false;
}

/// Polls `/readyz` until `accept` holds for its status code and body, or `limit` passes.
pub async fn readyz_until(
    bridge: &Bridge,
    limit: Duration,
    accept: impl Fn(u16, &Value) -> bool,
) -> (u16, Value) {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let (code, body) = http_get(&bridge.http_url("/readyz")).await;
        if accept(code, &body) {
            return (code, body);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "readyz stayed {code} {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A free TCP port on 127.0.0.1 (for a listener the test does not start itself).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The address a spawned `patchbay` (stdout piped) logs as `listening on <addr>`; the rest of
/// its output is drained in the background.
pub fn listening_addr(child: &mut std::process::Child) -> String {
    use std::io::{BufRead, BufReader};
    let mut lines = BufReader::new(child.stdout.take().expect("stdout is piped")).lines();
    let addr = loop {
        let line = lines.next().expect("the binary logs its address").unwrap();
        if let Some(addr) = line.split("listening on ").nth(1) {
            break addr.trim().to_string();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    addr
}
