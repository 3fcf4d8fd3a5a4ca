//! The SSE transport (contract section 11) with a real HTTP client: `GET /sse` carries the same
//! session as `/ws` (the greeting first, replies and pushes as events), `POST /sse/<id>` its
//! client actions; every refusal of the contract; the heartbeat comment; the close event.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use patchbay::config::AllowedOrigins;
use patchbay::rooms::RoomPattern;
use serde_json::{Value, json};

/// An open `GET /sse`: its headers, and its events as they come.
struct Sse {
    headers: hyper::HeaderMap,
    body: Incoming,
    buffer: String,
}

impl Sse {
    async fn open(bridge: &Bridge, query: &str, headers: &[(&str, &str)]) -> Result<Sse, u16> {
        let stream = tokio::net::TcpStream::connect(bridge.addr).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        let mut req = Request::get(format!("/sse{query}")).header("host", bridge.addr.to_string());
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = sender
            .send_request(req.body(Full::new(Bytes::new())).unwrap())
            .await
            .unwrap();
        if resp.status() != 200 {
            return Err(resp.status().as_u16());
        }
        Ok(Sse {
            headers: resp.headers().clone(),
            body: resp.into_body(),
            buffer: String::new(),
        })
    }

    /// The next block (event or comment), as its text without the blank line.
    async fn block(&mut self) -> String {
        loop {
            if let Some(at) = self.buffer.find("\n\n") {
                let block = self.buffer[..at].to_string();
                self.buffer.drain(..at + 2);
                return block;
            }
            let frame = tokio::time::timeout(WAIT, self.body.frame())
                .await
                .expect("an event in time")
                .expect("the stream is open")
                .unwrap();
            if let Ok(data) = frame.into_data() {
                self.buffer.push_str(std::str::from_utf8(&data).unwrap());
            }
        }
    }

    /// The next event's action (comments skipped).
    async fn event(&mut self) -> Value {
        loop {
            let block = self.block().await;
            if let Some(data) = block.strip_prefix("data:") {
                return serde_json::from_str(data.trim_start()).unwrap();
            }
        }
    }

    /// Events until one of `ty`.
    async fn until(&mut self, ty: &str) -> Value {
        loop {
            let event = self.event().await;
            if event["type"] == ty {
                return event;
            }
        }
    }
}

async fn post(bridge: &Bridge, id: &str, headers: &[(&str, &str)], body: &str) -> (u16, Value) {
    let mut all = vec![("content-type", "application/json")];
    all.extend_from_slice(headers);
    http_call("POST", &bridge.http_url(&format!("/sse/{id}")), &all, body).await
}

async fn sse_bridge(tweak: impl FnOnce(&mut patchbay::Config)) -> Bridge {
    Bridge::start("{}", None, |c| {
        c.public_rooms = vec![RoomPattern::parse("lobby").unwrap()];
        tweak(c);
    })
    .await
}

#[tokio::test]
async fn a_stream_carries_the_same_session_as_the_websocket() {
    let bridge = sse_bridge(|_| {}).await;
    let mut sse = Sse::open(&bridge, "", &[]).await.unwrap();
    assert_eq!(sse.headers["content-type"], "text/event-stream");
    assert_eq!(sse.headers["cache-control"], "no-cache");
    assert_eq!(sse.headers["x-accel-buffering"], "no");
    assert!(sse.headers.get("content-encoding").is_none());
    let hello = sse.event().await;
    assert_eq!(hello["type"], "@@patchbay/CONNECTED", "{hello}");
    let id = hello["payload"]["connectionId"]
        .as_str()
        .unwrap()
        .to_string();

    // One action, then an array of two: replies travel on the stream.
    let (status, body) = post(
        &bridge,
        &id,
        &[],
        r#"{"type":"@@patchbay/PING_REQUEST","meta":{"requestId":"p1"}}"#,
    )
    .await;
    assert_eq!((status, body), (202, json!({"accepted": 1})));
    assert_eq!(sse.event().await["type"], "@@patchbay/PING_SUCCESS");
    let two = json!([
        {"type": "@@patchbay/SUBSCRIBE_REQUEST", "payload": {"room": "lobby"}, "meta": {"requestId": "s1"}},
        {"type": "NOPE_REQUEST", "meta": {"requestId": "n1"}},
    ]);
    let (status, body) = post(&bridge, &id, &[], &two.to_string()).await;
    assert_eq!((status, body), (202, json!({"accepted": 2})));
    let joined = sse.event().await;
    assert_eq!(joined["type"], "@@patchbay/SUBSCRIBE_SUCCESS", "{joined}");
    let unknown = sse.event().await;
    assert_eq!(unknown["payload"]["code"], "unknown_action", "{unknown}");

    // Pushes arrive as events.
    let body = json!({"rooms": ["lobby"], "action": {"type": "HELLO", "payload": 1}});
    bridge
        .app
        .hub
        .publish(
            vec!["lobby".into()],
            body["action"].as_object().unwrap().clone(),
        )
        .await
        .unwrap();
    let pushed = sse.until("HELLO").await;
    assert_eq!(pushed["meta"]["room"], "lobby");

    // Refusals.
    let (status, body) = post(&bridge, "not-a-connection", &[], "{}").await;
    assert_eq!(
        (status, body["code"].clone()),
        (404, json!("unknown_connection"))
    );
    let (status, body) = post(&bridge, &id, &[], "{nope").await;
    assert_eq!((status, body["code"].clone()), (400, json!("invalid_json")));
    let (status, _) = http_call(
        "POST",
        &bridge.http_url(&format!("/sse/{id}")),
        &[("content-type", "text/plain")],
        "{}",
    )
    .await;
    assert_eq!(status, 415);
    let huge = format!(
        r#"{{"type":"X_REQUEST","payload":"{}"}}"#,
        "x".repeat(70_000)
    );
    let (status, _) = post(&bridge, &id, &[], &huge).await;
    assert_eq!(status, 413);
    // The stream still works.
    post(
        &bridge,
        &id,
        &[],
        r#"{"type":"@@patchbay/PING_REQUEST","meta":{"requestId":"p2"}}"#,
    )
    .await;
    assert_eq!(
        sse.until("@@patchbay/PING_SUCCESS").await["meta"]["requestId"],
        "p2"
    );
}

#[tokio::test]
async fn another_users_post_is_404_and_a_foreign_origin_403() {
    let bridge = sse_bridge(|c| {
        with_jwt(c);
        c.allowed_origins = AllowedOrigins::List(vec!["https://app.example.com".into()]);
    })
    .await;
    let alice = format!(
        "Bearer {}",
        jwt(json!({"sub": "alice", "exp": now() + 600}))
    );
    let bob = format!("Bearer {}", jwt(json!({"sub": "bob", "exp": now() + 600})));
    let origin = ("origin", "https://app.example.com");
    assert_eq!(
        Sse::open(
            &bridge,
            "",
            &[
                ("authorization", &alice),
                ("origin", "https://evil.example")
            ]
        )
        .await
        .err(),
        Some(403)
    );
    assert_eq!(Sse::open(&bridge, "", &[origin]).await.err(), Some(401));
    let mut sse = Sse::open(&bridge, "", &[("authorization", &alice), origin])
        .await
        .unwrap();
    // A page of the allowed origin may read the stream and post (CORS, with credentials).
    assert_eq!(
        sse.headers["access-control-allow-origin"],
        "https://app.example.com"
    );
    assert_eq!(sse.headers["access-control-allow-credentials"], "true");
    let (status, headers, _) = http_raw(
        "OPTIONS",
        &bridge.http_url("/sse/x"),
        &[
            origin,
            ("access-control-request-method", "POST"),
            ("access-control-request-headers", "content-type"),
        ],
        "",
    )
    .await;
    assert_eq!(status, 204);
    assert_eq!(
        headers["access-control-allow-origin"],
        "https://app.example.com"
    );
    assert!(
        headers["access-control-allow-headers"]
            .to_str()
            .unwrap()
            .contains("content-type")
    );
    let (_, headers, _) = http_raw(
        "OPTIONS",
        &bridge.http_url("/sse/x"),
        &[("origin", "https://evil.example")],
        "",
    )
    .await;
    assert!(headers.get("access-control-allow-origin").is_none());
    let hello = sse.event().await;
    assert_eq!(hello["payload"]["userId"], "alice");
    let id = hello["payload"]["connectionId"]
        .as_str()
        .unwrap()
        .to_string();
    let ping = r#"{"type":"@@patchbay/PING_REQUEST","meta":{"requestId":"p"}}"#;
    let (status, _) = post(&bridge, &id, &[("authorization", &bob), origin], ping).await;
    assert_eq!(status, 404, "another user's post");
    let (status, _) = post(&bridge, &id, &[origin], ping).await;
    assert_eq!(status, 401, "no credentials");
    let (status, _) = post(
        &bridge,
        &id,
        &[
            ("authorization", &alice),
            ("origin", "https://evil.example"),
        ],
        ping,
    )
    .await;
    assert_eq!(status, 403);
    let (status, _) = post(&bridge, &id, &[("authorization", &alice), origin], ping).await;
    assert_eq!(status, 202);
    assert_eq!(sse.event().await["type"], "@@patchbay/PING_SUCCESS");
}

#[tokio::test]
async fn a_quiet_stream_gets_heartbeats_and_a_close_event_at_shutdown() {
    let mut bridge = sse_bridge(|c| c.sse_heartbeat = Duration::from_secs(1)).await;
    let mut sse = Sse::open(&bridge, "", &[]).await.unwrap();
    assert_eq!(sse.event().await["type"], "@@patchbay/CONNECTED");
    let comment = sse.block().await;
    assert_eq!(comment, ": ping");
    bridge.shutdown().await;
    let closed = sse.until("@@patchbay/CLOSED").await;
    assert_eq!(closed["payload"]["code"], 1001, "{closed}");
}

#[tokio::test]
async fn a_post_to_another_instance_reaches_the_stream_through_redis() {
    let redis = RedisServer::start().await;
    let start = || {
        sse_bridge(|c| {
            with_jwt(c);
            c.redis_url = Some(redis.url());
            c.history = None;
        })
    };
    let (a, b) = (start().await, start().await);
    wait_ready_status(&a, "ok").await;
    wait_ready_status(&b, "ok").await;
    let alice = format!(
        "Bearer {}",
        jwt(json!({"sub": "alice", "exp": now() + 600}))
    );
    let bob = format!("Bearer {}", jwt(json!({"sub": "bob", "exp": now() + 600})));
    let mut sse = Sse::open(&a, "", &[("authorization", &alice)])
        .await
        .unwrap();
    let id = sse.event().await["payload"]["connectionId"]
        .as_str()
        .unwrap()
        .to_string();
    let ping =
        |n: u32| format!(r#"[{{"type":"@@patchbay/PING_REQUEST","meta":{{"requestId":"p{n}"}}}}]"#);
    let (status, body) = post(&b, &id, &[("authorization", &alice)], &ping(1)).await;
    assert_eq!((status, body), (202, json!({"accepted": 1})));
    assert_eq!(
        sse.until("@@patchbay/PING_SUCCESS").await["meta"]["requestId"],
        "p1"
    );
    let (status, _) = post(&b, &id, &[("authorization", &bob)], &ping(2)).await;
    assert_eq!(
        status, 404,
        "another user's post, through the other instance"
    );
    // Once the stream is gone, so is its record.
    drop(sse);
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (status, _) = post(&b, &id, &[("authorization", &alice)], &ping(3)).await;
        if status == 404 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "still {status}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
