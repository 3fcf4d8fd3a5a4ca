//! The `http` handler as a client sees it: every reply shape, every failure code a REST call
//! can produce, and exactly what reaches the API (path, query string, body, headers).

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};

/// Asserts `reply` is `<name>_SUCCESS` (with a `payload` key, even when null) and returns it.
fn success<'a>(reply: &'a Value, name: &str) -> &'a Value {
    assert_eq!(reply["type"], format!("{name}_SUCCESS"), "{reply}");
    assert!(
        reply.get("error").is_none_or(|e| e == false),
        "a success is not an error: {reply}"
    );
    assert!(
        reply.as_object().unwrap().contains_key("payload"),
        "a success always carries a payload key: {reply}"
    );
    assert!(reply["meta"]["requestId"].is_string(), "{reply}");
    &reply["payload"]
}

/// Sends `<name>_REQUEST` with the given request id and waits for the reply carrying it.
async fn request_with_id(client: &mut Client, name: &str, payload: Value, id: &str) -> Value {
    client
        .send(json!({"type": format!("{name}_REQUEST"), "payload": payload, "meta": {"requestId": id}}))
        .await;
    loop {
        let m = client.recv().await;
        if m["meta"]["requestId"] == id {
            return m;
        }
    }
}

/// The standard manifest plus `extra` actions.
fn manifest_with(extra: Value) -> String {
    let mut all: Value = serde_json::from_str(MANIFEST).unwrap();
    for (k, v) in extra.as_object().unwrap() {
        all[k] = v.clone();
    }
    all.to_string()
}

fn header<'a>(r: &'a Recorded, name: &str) -> Option<&'a str> {
    r.headers.get(name).map(|v| v.to_str().unwrap())
}

/// An address nobody listens on: bound once by the OS, then released.
fn dead_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    addr
}

/// What a [`RawUpstream`] does once it has written its canned bytes.
#[derive(Clone, Copy)]
enum After {
    Close,
    /// Keep the socket open and silent, so the client waits for bytes that never come.
    Hold,
}

/// A byte-level HTTP server answering every request with the same bytes: for misbehaviour the
/// well-formed test upstream cannot produce (truncated or stalled bodies, chunked oversize).
struct RawUpstream {
    addr: SocketAddr,
    requests: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Drop for RawUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl RawUpstream {
    async fn start(response: Vec<u8>, after: After) -> RawUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(AtomicUsize::new(0));
        let count = requests.clone();
        let response = Arc::new(response);
        let task = tokio::spawn(async move {
            // Owned here so that aborting the accept loop also ends held connections.
            let mut conns = JoinSet::new();
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    continue;
                };
                let count = count.clone();
                let response = response.clone();
                conns.spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    count.fetch_add(1, Ordering::SeqCst);
                    let _ = stream.write_all(&response).await;
                    let _ = stream.flush().await;
                    if let After::Hold = after {
                        tokio::time::sleep(Duration::from_secs(60)).await;
                    }
                });
            }
        });
        RawUpstream {
            addr,
            requests,
            task,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

/// Actions calling a [`RawUpstream`] at `/raw`.
const RAW_MANIFEST: &str = r#"{
  "RAW": { "http": { "method": "GET", "path": "/raw" }, "timeoutMs": 5000 },
  "RAW_SHORT": { "http": { "method": "GET", "path": "/raw" }, "timeoutMs": 300 }
}"#;

/// A 200 response with `body` in chunked encoding, so no Content-Length announces its size.
fn chunked_response(body: &[u8]) -> Vec<u8> {
    let mut out =
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
            .to_vec();
    for chunk in body.chunks(64 * 1024) {
        out.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        out.extend_from_slice(chunk);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}

/// A JSON string literal of exactly `len` bytes.
fn json_string_of_len(len: usize) -> Vec<u8> {
    let mut body = vec![b'x'; len];
    body[0] = b'"';
    body[len - 1] = b'"';
    body
}

// ---------------------------------------------------------------------------------------------
// Failures decided before any upstream call.

#[tokio::test]
async fn unknown_action_fails_without_calling_the_api() {
    let upstream = Upstream::start().await;
    let bridge = Bridge::with_upstream(&upstream).await;
    let mut client = bridge.connect().await;
    let reply = request_with_id(&mut client, "NO_SUCH_THING", json!({"a": 1}), "req-1").await;
    assert_failure(&reply, "NO_SUCH_THING", "unknown_action");
    assert_eq!(reply["meta"]["requestId"], "req-1");
    // Action names are exact: no case folding into a known action.
    let reply = client.request("echo_list", Value::Null).await;
    assert_failure(&reply, "echo_list", "unknown_action");
    assert!(upstream.recorded().is_empty());
    // The connection is still usable.
    let reply = client.request("ECHO_LIST", Value::Null).await;
    success(&reply, "ECHO_LIST");
}

#[tokio::test]
async fn schema_violations_are_listed_with_pointers_and_skip_the_api() {
    let upstream = Upstream::start().await;
    let bridge = Bridge::with_upstream(&upstream).await;
    let mut client = bridge.connect().await;

    let reply = client
        .request("TASKS_FETCH", json!({"page": 0, "extra": true}))
        .await;
    let payload = assert_failure(&reply, "TASKS_FETCH", "invalid_payload");
    let details = payload["details"].as_array().expect("details is a list");
    assert_eq!(details.len(), 2, "one entry per violation: {payload}");
    let pointers: Vec<&str> = details
        .iter()
        .map(|d| d["pointer"].as_str().expect("each violation has a pointer"))
        .collect();
    assert!(pointers.contains(&"/page"), "{pointers:?}");
    assert!(
        details
            .iter()
            .all(|d| d["message"].as_str().is_some_and(|m| !m.is_empty())),
        "{payload}"
    );

    let reply = client.request("TASKS_FETCH", json!({"page": "one"})).await;
    let payload = assert_failure(&reply, "TASKS_FETCH", "invalid_payload");
    assert_eq!(payload["details"][0]["pointer"], "/page", "{payload}");
    assert_eq!(payload["details"].as_array().unwrap().len(), 1);

    let reply = client.request("TASKS_FETCH", json!([1, 2])).await;
    assert_failure(&reply, "TASKS_FETCH", "invalid_payload");

    assert!(
        upstream.recorded().is_empty(),
        "an invalid payload never reaches the API"
    );
    let reply = client.request("TASKS_FETCH", json!({"page": 3})).await;
    success(&reply, "TASKS_FETCH");
    assert_eq!(upstream.recorded().len(), 1);
}

#[tokio::test]
async fn nested_schema_violations_carry_json_pointers() {
    let upstream = Upstream::start().await;
    let manifest = manifest_with(json!({
        "ITEM_CREATE": {
            "http": { "method": "POST", "path": "/echo" },
            "payload": {
                "type": "object",
                "required": ["title"],
                "properties": {
                    "title": { "type": "string", "minLength": 1 },
                    "tags": { "type": "array", "items": { "type": "string" } },
                    "owner": { "type": "object", "properties": { "age": { "type": "integer", "minimum": 0 } } },
                    "a/b": { "type": "integer" },
                    "c~d": { "type": "integer" }
                }
            }
        }
    }));
    let bridge = Bridge::start(&manifest, Some(upstream.url()), |_| {}).await;
    let mut client = bridge.connect().await;

    let reply = client
        .request(
            "ITEM_CREATE",
            json!({"tags": ["ok", 2], "owner": {"age": -1}}),
        )
        .await;
    let payload = assert_failure(&reply, "ITEM_CREATE", "invalid_payload");
    let mut pointers: Vec<&str> = payload["details"]
        .as_array()
        .expect("details is a list")
        .iter()
        .map(|d| d["pointer"].as_str().unwrap())
        .collect();
    pointers.sort();
    assert_eq!(pointers, ["", "/owner/age", "/tags/1"], "{payload}");

    // Pointer tokens escape `/` as `~1` and `~` as `~0` (RFC 6901).
    let reply = client
        .request("ITEM_CREATE", json!({"title": "t", "a/b": "x", "c~d": "y"}))
        .await;
    let payload = assert_failure(&reply, "ITEM_CREATE", "invalid_payload");
    let mut pointers: Vec<&str> = payload["details"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["pointer"].as_str().unwrap())
        .collect();
    pointers.sort();
    assert_eq!(pointers, ["/a~1b", "/c~0d"], "{payload}");

    assert!(upstream.recorded().is_empty());
    let reply = client.request("ITEM_CREATE", json!({"title": "t"})).await;
    success(&reply, "ITEM_CREATE");
    assert_eq!(upstream.recorded().len(), 1);
}

#[tokio::test]
async fn path_fields_that_are_missing_empty_or_dot_segments_are_invalid_payload() {
    let upstream = Upstream::start().await;
    let bridge = Bridge::with_upstream(&upstream).await;
    let mut client = bridge.connect().await;
    for (name, payload) in [
        ("ECHO_GET", json!({})),
        ("ECHO_GET", Value::Null),
        ("ECHO_GET", json!({"other": "x"})),
        ("ECHO_GET", json!({"id": null})),
        ("ECHO_GET", json!({"id": ""})),
        ("ECHO_GET", json!({"id": "."})),
        ("ECHO_GET", json!({"id": ".."})),
        ("ECHO_GET", json!({"id": {"nested": 1}})),
        ("ECHO_GET", json!({"id": ["a"]})),
        ("ECHO_GET", json!({"id": 1.5})),
        ("ECHO_GET", json!({"id": true})),
        ("ECHO_GET", json!("abc")),
        ("ECHO_LIST", json!("abc")),
        ("ECHO_LIST", json!([1, 2])),
        ("ECHO_PUT", json!({"id": ".."})),
        ("ECHO_PATCH", json!({"id": "."})),
        ("ECHO_DELETE", json!({"id": ""})),
        ("ECHO_DELETE", json!({})),
    ] {
        let reply = client.request(name, payload.clone()).await;
        assert_eq!(
            reply["payload"]["code"], "invalid_payload",
            "{name} {payload}: {reply}"
        );
        assert_failure(&reply, name, "invalid_payload");
    }
    assert!(
        upstream.recorded().is_empty(),
        "no request may reach the API: {:?}",
        upstream.recorded()
    );
}

#[tokio::test]
async fn long_path_fields_and_query_values_are_invalid_payload() {
    let upstream = Upstream::start().await;
    let bridge = Bridge::with_upstream(&upstream).await;
    let mut client = bridge.connect().await;
    // 30,000 slashes become 90,000 bytes of `%2F`: far over the 8 KiB path limit.
    for (name, payload) in [
        ("ECHO_GET", json!({"id": "/".repeat(30_000)})),
        ("ECHO_DELETE", json!({"id": "a".repeat(8_200)})),
        ("ECHO_LIST", json!({"q": "/".repeat(20_000)})),
        ("ECHO_GET", json!({"id": "7", "q": "x".repeat(17_000)})),
    ] {
        let reply = client.request(name, payload).await;
        let failure = assert_failure(&reply, name, "invalid_payload");
        assert!(
            failure["message"].as_str().unwrap().len() < 200,
            "the message does not echo the value: {reply}"
        );
    }
    assert!(upstream.recorded().is_empty(), "nothing reached the API");
    // Just under the limits is an ordinary request.
    let id = "a".repeat(8192 - "/echo/".len());
    let reply = client.request("ECHO_GET", json!({ "id": id })).await;
    assert_eq!(reply["type"], "ECHO_GET_SUCCESS", "{reply}");
}

#[tokio::test]
async fn object_values_in_a_query_string_are_invalid_payload() {
    let upstream = Upstream::start().await;
    let bridge = Bridge::with_upstream(&upstream).await;
    let mut client = bridge.connect().await;
    for (name, payload) in [
        ("ECHO_LIST", json!({"filter": {"a": 1}})),
        ("ECHO_LIST", json!({"ok": 1, "filter": {}})),
        ("ECHO_LIST", json!({"tags": [{"a": 1}]})),
        ("ECHO_GET", json!({"id": "7", "filter": {"a": 1}})),
        ("ECHO_DELETE", json!({"id": "7", "filter": {"a": 1}})),
    ] {
        let reply = client.request(name, payload.clone()).await;
        assert_eq!(
            reply["payload"]["code"], "invalid_payload",
            "{name} {payload}: {reply}"
        );
        assert_failure(&reply, name, "invalid_payload");
    }
    assert!(upstream.recorded().is_empty());
    // The same object is fine in a body.
    let reply = client
        .request("ECHO_POST", json!({"filter": {"a": 1}}))
        .await;
    success(&reply, "ECHO_POST");
}

#[tokio::test]
async fn requests_beyond_max_inflight_are_too_many_requests() {
    let upstream = Upstream::start().await;
    let bridge = Bridge::start(MANIFEST, Some(upstream.url()), |cfg| cfg.max_inflight = 2).await;
    let mut client = bridge.connect().await;
    for id in ["r1", "r2", "r3"] {
        client
            .send(
                json!({"type": "SLOW_REQUEST", "payload": {"ms": 500}, "meta": {"requestId": id}}),
            )
            .await;
    }
    let mut replies = std::collections::HashMap::new();
    for _ in 0..3 {
        let m = client.recv().await;
        replies.insert(m["meta"]["requestId"].as_str().unwrap().to_string(), m);
    }
    assert_failure(&replies["r3"], "SLOW", "too_many_requests");
    assert_eq!(success(&replies["r1"], "SLOW"), &json!({"slept": 500}));
    assert_eq!(success(&replies["r2"], "SLOW"), &json!({"slept": 500}));
    assert_eq!(
        upstream.recorded().len(),
        2,
        "the refused request never reaches the API"
    );
    // Finished requests free their slots.
    let reply = client.request("SLOW", json!({"ms": 1})).await;
    success(&reply, "SLOW");
}

// ---------------------------------------------------------------------------------------------
// Failures of the upstream call.

#[tokio::test]
async fn a_refused_connection_is_upstream_unavailable() {
    let addr = dead_addr();
    let bridge = Bridge::start(MANIFEST, Some(format!("http://{addr}")), |_| {}).await;
    let mut client = bridge.connect().await;
    for (name, payload) in [("ECHO_LIST", Value::Null), ("ECHO_POST", json!({"a": 1}))] {
        let reply = client.request(name, payload).await;
        let p = assert_failure(&reply, name, "upstream_unavailable");
        assert_eq!(p["status"], 502, "{reply}");
    }
}

#[tokio::test]
async fn a_broken_connection_is_upstream_unavailable() {
    // Closed without a byte of response.
    let raw = RawUpstream::start(Vec::new(), After::Close).await;
    let bridge = Bridge::start(RAW_MANIFEST, Some(raw.url()), |_| {}).await;
    let mut client = bridge.connect().await;
    let reply = client.request("RAW", Value::Null).await;
    let p = assert_failure(&reply, "RAW", "upstream_unavailable");
    assert_eq!(p["status"], 502, "{reply}");
    assert!(raw.requests() >= 1);

    // Closed in the middle of the announced body.
    let raw = RawUpstream::start(
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"a\":"
            .to_vec(),
        After::Close,
    )
    .await;
    let bridge = Bridge::start(RAW_MANIFEST, Some(raw.url()), |_| {}).await;
    let mut client = bridge.connect().await;
    let reply = client.request("RAW", Value::Null).await;
    let p = assert_failure(&reply, "RAW", "upstream_unavailable");
    assert_eq!(p["status"], 502, "{reply}");
}

#[tokio::test]
async fn an_https_api_that_does_not_speak_tls_is_upstream_unavailable() {
    // The TLS handshake meets a plain HTTP answer: the https path runs and fails cleanly.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut hello = [0u8; 512];
        let n = stream.read(&mut hello).await.unwrap();
        let _ = stream
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")
            .await;
        n
    });
    let bridge = Bridge::start(RAW_MANIFEST, Some(format!("https://{addr}")), |_| {}).await;
    let mut client = bridge.connect().await;
    let reply = client.request("RAW", Value::Null).await;
    let p = assert_failure(&reply, "RAW", "upstream_unavailable");
    assert_eq!(p["status"], 502, "{reply}");
    let first = server.await.unwrap();
    assert!(first > 0, "the client sent a TLS hello");
}

#[tokio::test]
async fn a_slow_api_is_upstream_timeout() {
    let upstream = Upstream::start().await;
    let bridge = Bridge::with_upstream(&upstream).await;
    let mut client = bridge.connect().await;
    let started = Instant::now();
    let reply = client.request("SLOW_SHORT", json!({"ms": 1000})).await;
    let elapsed = started.elapsed();
    let p = assert_failure(&reply, "SLOW_SHORT", "upstream_timeout");
    assert_eq!(p["status"], 504, "{reply}");
    // The manifest allows 200 ms; the API would answer after 1000 ms.
    assert!(
        elapsed < Duration::from_millis(1000),
        "the timeout fired only after {elapsed:?}"
    );
    // Within its timeout the same upstream succeeds.
    let reply = client.request("SLOW_SHORT", json!({"ms": 5})).await;
    assert_eq!(success(&reply, "SLOW_SHORT"), &json!({"slept": 5}));
}

#[tokio::test]
async fn a_stalled_response_body_is_upstream_timeout() {
    let raw = RawUpstream::start(
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 10\r\n\r\n{\"a\""
            .to_vec(),
        After::Hold,
    )
    .await;
    let bridge = Bridge::start(RAW_MANIFEST, Some(raw.url()), |_| {}).await;
    let mut client = bridge.connect().await;
    let started = Instant::now();
    let reply = client.request("RAW_SHORT", Value::Null).await;
    let p = assert_failure(&reply, "RAW_SHORT", "upstream_timeout");
    assert_eq!(p["status"], 504, "{reply}");
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn non_2xx_answers_are_upstream_error_with_the_body_as_details() {
    let upstream = Upstream::start().await;
    let manifest = manifest_with(json!({
        "NOTJSON": { "http": { "method": "GET", "path": "/notjson" } },
        "NOWHERE": { "http": { "method": "GET", "path": "/nowhere" } },
        "STATUS_POST": { "http": { "method": "POST", "path": "/status/{code}" } }
    }));
    let bridge = Bridge::start(&manifest, Some(upstream.url()), |_| {}).await;
    let mut client = bridge.connect().await;

    for code in [500, 404, 400, 409, 422, 503] {
        let reply = client.request("STATUS", json!({"code": code})).await;
        let p = assert_failure(&reply, "STATUS", "upstream_error");
        assert_eq!(p["status"], code, "{reply}");
        assert_eq!(
            p["details"],
            json!({"error": format!("status {code}")}),
            "{reply}"
        );
    }
    let reply = client.request("STATUS_POST", json!({"code": 422})).await;
    let p = assert_failure(&reply, "STATUS_POST", "upstream_error");
    assert_eq!(p["status"], 422);
    assert_eq!(p["details"], json!({"error": "status 422"}));

    let reply = client.request("NOWHERE", Value::Null).await;
    let p = assert_failure(&reply, "NOWHERE", "upstream_error");
    assert_eq!(p["status"], 404);
    assert_eq!(p["details"], json!({"error": "not found"}));

    let reply = client.request("NOTJSON", Value::Null).await;
    let p = assert_failure(&reply, "NOTJSON", "upstream_error");
    assert_eq!(p["status"], 500);
    assert_eq!(p["details"], json!("oops, not json"), "{reply}");
}

#[tokio::test]
async fn redirects_are_not_followed() {
    let upstream = Upstream::start().await;
    let bridge = Bridge::with_upstream(&upstream).await;
    let mut client = bridge.connect().await;
    let reply = client.request("REDIRECT", Value::Null).await;
    let p = assert_failure(&reply, "REDIRECT", "upstream_error");
    assert_eq!(p["status"], 302, "{reply}");
    assert!(
        p.get("details").is_none_or(Value::is_null),
        "an empty body has no details: {reply}"
    );
    let seen = upstream.recorded();
    assert_eq!(seen.len(), 1, "the Location was fetched: {seen:?}");
    assert_eq!(seen[0].target, "/redirect");
}

#[tokio::test]
async fn response_bodies_over_one_mebibyte_are_refused() {
    let upstream = Upstream::start().await;
    let bridge = Bridge::with_upstream(&upstream).await;
    let mut client = bridge.connect().await;
    let reply = client.request("BIG", Value::Null).await;
    let p = assert_failure(&reply, "BIG", "upstream_error");
    assert_eq!(p["status"], 200, "status is the upstream's: {reply}");
    assert!(
        reply.to_string().len() < 64 * 1024,
        "the refused body is not relayed"
    );

    // Without a Content-Length the size is only known while reading.
    let raw = RawUpstream::start(
        chunked_response(&json_string_of_len(1024 * 1024 + 1)),
        After::Close,
    )
    .await;
    let bridge = Bridge::start(RAW_MANIFEST, Some(raw.url()), |_| {}).await;
    let mut client = bridge.connect().await;
    let reply = client.request("RAW", Value::Null).await;
    assert_failure(&reply, "RAW", "upstream_error");
    assert!(reply.to_string().len() < 64 * 1024);
    // The connection survives the refusal.
    let reply = client.request("@@patchbay/PING", Value::Null).await;
    success(&reply, "@@patchbay/PING");
}

#[tokio::test]
async fn a_response_body_of_exactly_one_mebibyte_is_accepted() {
    let body = json_string_of_len(1024 * 1024);
    let mut response = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    response.extend_from_slice(&body);
    let raw = RawUpstream::start(response, After::Close).await;
    let bridge = Bridge::start(RAW_MANIFEST, Some(raw.url()), |_| {}).await;
    let mut client = bridge.connect().await;
    let reply = client.request("RAW", Value::Null).await;
    let payload = success(&reply, "RAW");
    assert_eq!(payload.as_str().map(str::len), Some(1024 * 1024 - 2));

    let raw = RawUpstream::start(
        chunked_response(&json_string_of_len(1024 * 1024)),
        After::Close,
    )
    .await;
    let bridge = Bridge::start(RAW_MANIFEST, Some(raw.url()), |_| {}).await;
    let mut client = bridge.connect().await;
    let reply = client.request("RAW", Value::Null).await;
    let payload = success(&reply, "RAW");
    assert_eq!(payload.as_str().map(str::len), Some(1024 * 1024 - 2));
}

// ---------------------------------------------------------------------------------------------
// Success payloads.

#[tokio::test]
async fn every_2xx_is_a_success_with_meta_status() {
    let upstream = Upstream::start().await;
    let bridge = Bridge::with_upstream(&upstream).await;
    let mut client = bridge.connect().await;
    for code in [200, 201, 202, 299] {
        let reply = client.request("STATUS", json!({"code": code})).await;
        let payload = success(&reply, "STATUS");
        assert_eq!(payload, &json!({"error": format!("status {code}")}));
        assert_eq!(reply["meta"]["status"], code, "{reply}");
    }
}

#[tokio::test]
async fn a_text_body_becomes_a_json_string() {
    let upstream = Upstream::start().await;
    let bridge = Bridge::with_upstream(&upstream).await;
    let mut client = bridge.connect().await;
    let reply = client.request("TEXT", Value::Null).await;
    assert_eq!(success(&reply, "TEXT"), &json!("hello"));
    assert_eq!(reply["meta"]["status"], 200);
}

#[tokio::test]
async fn an_empty_body_is_a_null_payload() {
    let upstream = Upstream::start().await;
    let bridge = Bridge::with_upstream(&upstream).await;
    let mut client = bridge.connect().await;
    let reply = client.request("EMPTY", Value::Null).await;
    assert_eq!(success(&reply, "EMPTY"), &Value::Null);
    assert_eq!(reply["meta"]["status"], 204, "{reply}");
}

// ---------------------------------------------------------------------------------------------
// What reaches the API.

#[tokio::test]
async fn path_values_never_leave_their_segment() {
    let upstream = Upstream::start().await;
    let bridge = Bridge::with_upstream(&upstream).await;
    let mut client = bridge.connect().await;
    for (id, expected) in [
        (json!("../admin"), "/echo/..%2Fadmin"),
        (json!("a/b"), "/echo/a%2Fb"),
        (json!("a b"), "/echo/a%20b"),
        (json!("?"), "/echo/%3F"),
        (json!("x?admin=1"), "/echo/x%3Fadmin%3D1"),
        (json!("#"), "/echo/%23"),
        (json!("%"), "/echo/%25"),
        (json!("%2e%2e"), "/echo/%252e%252e"),
        (json!("a+b&c"), "/echo/a%2Bb%26c"),
        (json!("\\"), "/echo/%5C"),
        (json!("é"), "/echo/%C3%A9"),
        (json!("日本"), "/echo/%E6%97%A5%E6%9C%AC"),
        (json!("A-z.0_9~"), "/echo/A-z.0_9~"),
        (json!("..."), "/echo/..."),
        (json!(42), "/echo/42"),
        (json!(-3), "/echo/-3"),
    ] {
        let reply = client.request("ECHO_GET", json!({ "id": id })).await;
        let payload = success(&reply, "ECHO_GET");
        assert_eq!(payload["target"], expected, "id {id}: {reply}");
        assert_eq!(
            upstream.recorded().last().unwrap().target,
            expected,
            "id {id}"
        );
    }
    for name in ["ECHO_PUT", "ECHO_PATCH", "ECHO_DELETE"] {
        let reply = client.request(name, json!({"id": "../admin"})).await;
        assert_eq!(
            success(&reply, name)["target"],
            "/echo/..%2Fadmin",
            "{reply}"
        );
    }
}

#[tokio::test]
async fn query_strings_follow_the_contract_rules() {
    let upstream = Upstream::start().await;
    let bridge = Bridge::with_upstream(&upstream).await;
    let mut client = bridge.connect().await;
    let payload = json!({
        "z": "a b",
        "a": 1,
        "big": 12345678901234567890u64,
        "flag": true,
        "off": false,
        "f": 1.5,
        "n": null,
        "tags": ["x", "y&z", 2, true],
        "neg": -3,
        "e": "é",
        "empty": "",
        "B": "up",
        "k y": "v=w",
        "none": [],
        "plus": "1+1",
        "path": "a/b?c#d"
    });
    let reply = client.request("ECHO_LIST", payload).await;
    success(&reply, "ECHO_LIST");
    let expected = "/echo?B=up&a=1&big=12345678901234567890&e=%C3%A9&empty=&f=1.5&flag=true\
        &k%20y=v%3Dw&neg=-3&off=false&path=a%2Fb%3Fc%23d&plus=1%2B1\
        &tags=x&tags=y%26z&tags=2&tags=true&z=a%20b";
    assert_eq!(upstream.recorded()[0].target, expected);
    assert!(
        !upstream.recorded()[0].target.contains('+'),
        "space is %20, never +"
    );

    // Path fields are not repeated in the query string.
    let reply = client
        .request("ECHO_GET", json!({"id": "7", "q": "x y"}))
        .await;
    assert_eq!(success(&reply, "ECHO_GET")["target"], "/echo/7?q=x%20y");

    // Nothing to send: no `?` at all.
    for payload in [Value::Null, json!({}), json!({"n": null})] {
        let reply = client.request("ECHO_LIST", payload.clone()).await;
        assert_eq!(success(&reply, "ECHO_LIST")["target"], "/echo", "{payload}");
    }
}

#[tokio::test]
async fn the_path_is_appended_to_an_api_url_with_a_base_path() {
    let upstream = Upstream::start().await;
    let api_url = format!("{}/echo/v1", upstream.url());
    let bridge = Bridge::start(MANIFEST, Some(api_url), |_| {}).await;
    let mut client = bridge.connect().await;
    let reply = client
        .request("ECHO_GET", json!({"id": "a b", "q": 1}))
        .await;
    assert_eq!(
        success(&reply, "ECHO_GET")["target"],
        "/echo/v1/echo/a%20b?q=1"
    );
}

#[tokio::test]
async fn delete_puts_the_payload_in_the_query_string() {
    let upstream = Upstream::start().await;
    let bridge = Bridge::with_upstream(&upstream).await;
    let mut client = bridge.connect().await;
    let reply = client
        .request(
            "ECHO_DELETE",
            json!({"id": "7", "b": 2, "a": "x y", "n": null, "ids": [1, 2]}),
        )
        .await;
    success(&reply, "ECHO_DELETE");
    let seen = &upstream.recorded()[0];
    assert_eq!(seen.method, "DELETE");
    assert_eq!(seen.target, "/echo/7?a=x%20y&b=2&ids=1&ids=2");
    assert!(seen.body.is_empty());
}

#[tokio::test]
async fn body_methods_send_the_whole_payload_as_json() {
    let upstream = Upstream::start().await;
    let bridge = Bridge::with_upstream(&upstream).await;
    let mut client = bridge.connect().await;
    let cases = [
        (
            "ECHO_POST",
            "POST",
            json!({"title": "t", "n": null, "list": [1, "2"], "nested": {"a": {"b": true}}}),
            "/echo",
        ),
        ("ECHO_POST", "POST", json!([1, 2, 3]), "/echo"),
        ("ECHO_POST", "POST", json!("just a string"), "/echo"),
        (
            "ECHO_PUT",
            "PUT",
            json!({"id": "7", "title": "t", "q": "not in the query"}),
            "/echo/7",
        ),
        (
            "ECHO_PATCH",
            "PATCH",
            json!({"id": 8, "done": false, "n": null}),
            "/echo/8",
        ),
    ];
    for (i, (name, method, payload, target)) in cases.into_iter().enumerate() {
        let reply = client.request(name, payload.clone()).await;
        success(&reply, name);
        let seen = &upstream.recorded()[i];
        assert_eq!(seen.method, method);
        assert_eq!(seen.target, target, "a body method has no query string");
        assert_eq!(
            header(seen, "content-type"),
            Some("application/json"),
            "{name}"
        );
        let body: Value = serde_json::from_slice(&seen.body).expect("the body is JSON");
        assert_eq!(
            body, payload,
            "{name}: the whole payload, path fields included"
        );
    }
}

#[tokio::test]
async fn get_and_delete_send_no_body() {
    let upstream = Upstream::start().await;
    let bridge = Bridge::with_upstream(&upstream).await;
    let mut client = bridge.connect().await;
    for (name, payload) in [
        ("ECHO_GET", json!({"id": "1", "a": "b"})),
        ("ECHO_LIST", json!({"a": "b"})),
        ("ECHO_DELETE", json!({"id": "1", "a": "b"})),
    ] {
        let reply = client.request(name, payload).await;
        success(&reply, name);
        let seen = upstream.recorded().pop().unwrap();
        assert!(seen.body.is_empty(), "{name} sent a body: {:?}", seen.body);
        assert_eq!(header(&seen, "content-type"), None, "{name}");
        assert!(
            header(&seen, "content-length").is_none_or(|l| l == "0"),
            "{name}"
        );
    }
}

#[tokio::test]
async fn request_id_and_idempotency_key_reach_the_api() {
    let upstream = Upstream::start().await;
    let bridge = Bridge::with_upstream(&upstream).await;
    let mut client = bridge.connect().await;
    for (name, payload, is_get) in [
        ("ECHO_GET", json!({"id": "1"}), true),
        ("ECHO_LIST", Value::Null, true),
        ("ECHO_POST", json!({"a": 1}), false),
        ("ECHO_PUT", json!({"id": "1"}), false),
        ("ECHO_PATCH", json!({"id": "1"}), false),
        ("ECHO_DELETE", json!({"id": "1"}), false),
    ] {
        let id = uuid::Uuid::new_v4().to_string();
        let reply = request_with_id(&mut client, name, payload, &id).await;
        success(&reply, name);
        assert_eq!(reply["meta"]["requestId"], id.as_str());
        let seen = upstream.recorded().pop().unwrap();
        assert_eq!(header(&seen, "x-request-id"), Some(id.as_str()), "{name}");
        if is_get {
            assert_eq!(header(&seen, "idempotency-key"), None, "{name}");
        } else {
            assert_eq!(
                header(&seen, "idempotency-key"),
                Some(id.as_str()),
                "{name}"
            );
        }
    }
    // A client retrying with the same id gives the API the same key twice.
    let id = "retry-1";
    for _ in 0..2 {
        let reply = request_with_id(&mut client, "ECHO_POST", json!({"a": 1}), id).await;
        success(&reply, "ECHO_POST");
    }
    let seen = upstream.recorded();
    let keys: Vec<_> = seen[seen.len() - 2..]
        .iter()
        .map(|r| header(r, "idempotency-key"))
        .collect();
    assert_eq!(keys, [Some(id), Some(id)]);
}

#[tokio::test]
async fn handshake_headers_are_forwarded_to_the_api() {
    let upstream = Upstream::start().await;
    let bridge = Bridge::with_upstream(&upstream).await;
    let mut client = bridge
        .connect_with(&[
            ("cookie", "sid=1"),
            ("authorization", "Bearer t"),
            ("x-other", "no"),
        ])
        .await
        .expect("handshake accepted");
    let hello = client.recv().await;
    assert_eq!(hello["type"], "@@patchbay/CONNECTED", "{hello}");
    for (name, payload) in [
        ("ECHO_LIST", Value::Null),
        ("ECHO_POST", json!({"a": 1})),
        ("ECHO_DELETE", json!({"id": "1"})),
    ] {
        let reply = client.request(name, payload).await;
        success(&reply, name);
        let seen = upstream.recorded().pop().unwrap();
        assert_eq!(header(&seen, "cookie"), Some("sid=1"), "{name}");
        assert_eq!(header(&seen, "authorization"), Some("Bearer t"), "{name}");
        assert_eq!(header(&seen, "x-other"), None, "{name}");
        for own in ["sec-websocket-key", "sec-websocket-version", "upgrade"] {
            assert_eq!(header(&seen, own), None, "{name} leaked {own}");
        }
    }
    // Headers belong to their own connection.
    let mut other = bridge.connect().await;
    let reply = other.request("ECHO_LIST", Value::Null).await;
    success(&reply, "ECHO_LIST");
    let seen = upstream.recorded().pop().unwrap();
    assert_eq!(header(&seen, "cookie"), None);
    assert_eq!(header(&seen, "authorization"), None);
}

#[tokio::test]
async fn only_the_configured_handshake_headers_are_forwarded() {
    let upstream = Upstream::start().await;
    let bridge = Bridge::start(MANIFEST, Some(upstream.url()), |cfg| {
        cfg.forward_headers = vec![hyper::header::HeaderName::from_static("x-tenant")];
    })
    .await;
    let mut client = bridge
        .connect_with(&[("cookie", "sid=1"), ("x-tenant", "acme")])
        .await
        .expect("handshake accepted");
    let hello = client.recv().await;
    assert_eq!(hello["type"], "@@patchbay/CONNECTED", "{hello}");
    let reply = client.request("ECHO_LIST", Value::Null).await;
    success(&reply, "ECHO_LIST");
    let seen = upstream.recorded().pop().unwrap();
    assert_eq!(header(&seen, "x-tenant"), Some("acme"));
    assert_eq!(header(&seen, "cookie"), None);
}

// ---------------------------------------------------------------------------------------------
// Concurrency.

#[tokio::test]
async fn replies_on_one_connection_may_come_out_of_order() {
    let upstream = Upstream::start().await;
    let bridge = Bridge::with_upstream(&upstream).await;
    let mut client = bridge.connect().await;
    client
        .send(
            json!({"type": "SLOW_REQUEST", "payload": {"ms": 800}, "meta": {"requestId": "slow"}}),
        )
        .await;
    client
        .send(json!({"type": "SLOW_REQUEST", "payload": {"ms": 10}, "meta": {"requestId": "fast"}}))
        .await;
    let first = client.recv().await;
    let second = client.recv().await;
    assert_eq!(first["meta"]["requestId"], "fast", "{first}");
    assert_eq!(success(&first, "SLOW"), &json!({"slept": 10}));
    assert_eq!(second["meta"]["requestId"], "slow", "{second}");
    assert_eq!(success(&second, "SLOW"), &json!({"slept": 800}));
}

#[tokio::test]
async fn a_slow_request_never_delays_another_connection() {
    let upstream = Upstream::start().await;
    let manifest = manifest_with(json!({
        "SLOW_LONG": { "http": { "method": "GET", "path": "/slow/{ms}" }, "timeoutMs": 10000 }
    }));
    let bridge = Bridge::start(&manifest, Some(upstream.url()), |_| {}).await;
    let mut slow = bridge.connect().await;
    let mut quick = bridge.connect().await;
    slow.send(json!({"type": "SLOW_LONG_REQUEST", "payload": {"ms": 3000}, "meta": {"requestId": "long"}}))
        .await;
    // Wait until the slow call is really at the API.
    let deadline = Instant::now() + WAIT;
    while !upstream.recorded().iter().any(|r| r.target == "/slow/3000") {
        assert!(Instant::now() < deadline, "the slow request never arrived");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let started = Instant::now();
    for i in 0..5 {
        let reply = quick.request("ECHO_GET", json!({"id": i})).await;
        success(&reply, "ECHO_GET");
    }
    assert!(
        started.elapsed() < Duration::from_millis(2000),
        "five quick requests took {:?} next to a 3 s one",
        started.elapsed()
    );
    let reply = slow.recv().await;
    assert_eq!(reply["meta"]["requestId"], "long");
    assert_eq!(success(&reply, "SLOW_LONG"), &json!({"slept": 3000}));
}

#[tokio::test]
async fn an_omitted_request_id_is_replaced_by_a_server_uuid() {
    let upstream = Upstream::start().await;
    let bridge = Bridge::with_upstream(&upstream).await;
    let mut client = bridge.connect().await;
    let mut ids = Vec::new();
    for frame in [
        json!({"type": "ECHO_LIST_REQUEST"}),
        json!({"type": "ECHO_LIST_REQUEST", "meta": {}}),
        json!({"type": "ECHO_POST_REQUEST", "payload": {"a": 1}}),
    ] {
        client.send(frame.clone()).await;
        let reply = client.recv().await;
        let name = frame["type"]
            .as_str()
            .unwrap()
            .trim_end_matches("_REQUEST")
            .to_string();
        success(&reply, &name);
        let id = reply["meta"]["requestId"]
            .as_str()
            .expect("every reply carries a request id")
            .to_string();
        assert!(uuid::Uuid::parse_str(&id).is_ok(), "not a uuid: {id}");
        let seen = upstream.recorded().pop().unwrap();
        assert_eq!(header(&seen, "x-request-id"), Some(id.as_str()));
        if name == "ECHO_POST" {
            assert_eq!(header(&seen, "idempotency-key"), Some(id.as_str()));
        }
        ids.push(id);
    }
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 3, "each request gets its own id");

    // Failures carry the assigned id too.
    client.send(json!({"type": "NOPE_REQUEST"})).await;
    let reply = client.recv().await;
    assert_failure(&reply, "NOPE", "unknown_action");
    assert!(uuid::Uuid::parse_str(reply["meta"]["requestId"].as_str().unwrap()).is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_concurrent_connections_all_succeed() {
    const CLIENTS: usize = 200;
    let upstream = Upstream::start().await;
    let bridge = Bridge::with_upstream(&upstream).await;
    let barrier = Arc::new(tokio::sync::Barrier::new(CLIENTS));
    let mut tasks = JoinSet::new();
    for i in 0..CLIENTS {
        let mut client = bridge.connect().await;
        let barrier = barrier.clone();
        tasks.spawn(async move {
            // Everyone fires at once.
            barrier.wait().await;
            let reply = client.request("ECHO_GET", json!({"id": i})).await;
            (i, reply)
        });
    }
    let mut done = 0;
    while let Some(joined) = tasks.join_next().await {
        let (i, reply) = joined.expect("client task did not panic");
        assert_eq!(
            success(&reply, "ECHO_GET")["target"],
            format!("/echo/{i}"),
            "{reply}"
        );
        done += 1;
    }
    assert_eq!(done, CLIENTS);
    let mut targets: Vec<String> = upstream.recorded().into_iter().map(|r| r.target).collect();
    targets.sort();
    targets.dedup();
    assert_eq!(targets.len(), CLIENTS, "each request reached the API once");
}
