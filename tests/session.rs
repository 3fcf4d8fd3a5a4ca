//! One connection's life as a client sees it: the greeting, bad input, limits, keepalive,
//! the handshake's refusals, graceful shutdown, and the plain HTTP routes.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use patchbay::config::AllowedOrigins;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};
use tokio_tungstenite::tungstenite::{Bytes, Error as WsError};

/// The close code the server ends the connection with.
async fn close_code(client: &mut Client) -> u16 {
    let frame = client
        .closed()
        .await
        .expect("the server sends a close frame");
    frame.code.into()
}

/// The HTTP status of a refused handshake.
fn refused_status(res: Result<Client, WsError>) -> u16 {
    match res {
        Err(WsError::Http(resp)) => resp.status().as_u16(),
        Err(e) => panic!("expected an HTTP refusal, got {e:?}"),
        Ok(_) => panic!("expected the handshake to be refused, it was accepted"),
    }
}

async fn bare_bridge(tweak: impl FnOnce(&mut patchbay::Config)) -> Bridge {
    Bridge::start("{}", None, tweak).await
}

fn assert_frame_error(reply: &Value, code: &str) {
    assert_error_action(reply, "@@patchbay/ERROR", code);
}

#[tokio::test]
async fn greeting_has_the_contract_shape() {
    let bridge = bare_bridge(|_| {}).await;
    let mut a = bridge.connect_with(&[]).await.unwrap();
    let hello = a.recv().await;
    assert_eq!(hello["type"], "@@patchbay/CONNECTED", "{hello}");
    let payload = &hello["payload"];
    assert_eq!(payload["protocol"], 1, "{hello}");
    assert_eq!(payload["userId"], Value::Null, "{hello}");
    assert!(
        payload.as_object().unwrap().contains_key("userId"),
        "userId is present even when null: {hello}"
    );
    assert_eq!(payload["rooms"], json!([]), "{hello}");
    let id_a = payload["connectionId"].as_str().expect("a string id");
    uuid::Uuid::parse_str(id_a).expect("connectionId is a uuid");

    let mut b = bridge.connect_with(&[]).await.unwrap();
    let hello_b = b.recv().await;
    assert_ne!(
        hello_b["payload"]["connectionId"], id_a,
        "each connection gets its own id"
    );
}

#[tokio::test]
async fn malformed_messages_get_an_error_and_the_connection_stays_open() {
    let bridge = bare_bridge(|_| {}).await;
    let mut client = bridge.connect().await;
    let cases: &[(&str, &str)] = &[
        ("this is not json", "bad_json"),
        ("{\"type\": \"X_REQUEST\"", "bad_json"),
        ("[1, 2, 3]", "bad_json"),
        ("\"X_REQUEST\"", "bad_json"),
        ("null", "bad_json"),
        ("{\"payload\": {}}", "invalid_action"),
        ("{\"type\": 42}", "invalid_action"),
        ("{\"type\": null}", "invalid_action"),
        (
            "{\"type\": \"@@patchbay/PING_REQUEST\", \"meta\": {\"requestId\": \"has space\"}}",
            "invalid_action",
        ),
        (
            "{\"type\": \"@@patchbay/PING_REQUEST\", \"meta\": {\"requestId\": \"\"}}",
            "invalid_action",
        ),
        (
            "{\"type\": \"@@patchbay/PING_REQUEST\", \"meta\": {\"requestId\": 7}}",
            "invalid_action",
        ),
        (
            "{\"type\": \"@@patchbay/PING_REQUEST\", \"meta\": \"p-1\"}",
            "invalid_action",
        ),
    ];
    for (text, code) in cases {
        client.send_raw(Message::Text((*text).into())).await;
        let reply = client.recv().await;
        assert_frame_error(&reply, code);
        assert_answers_ping(&mut client).await;
    }
    // 129 bytes is over the limit on `type`; 128 is a request like any other.
    let long_type = format!("{}_REQUEST", "A".repeat(121));
    client.send(json!({"type": long_type})).await;
    assert_frame_error(&client.recv().await, "invalid_action");
    let name = "A".repeat(120);
    let reply = client.request(&name, json!({})).await;
    assert_eq!(reply["type"], format!("{name}_FAILURE"), "{reply}");
    assert_eq!(reply["payload"]["code"], "unknown_action", "{reply}");
    let long_id = "a".repeat(129);
    client
        .send(json!({"type": "@@patchbay/PING_REQUEST", "meta": {"requestId": long_id}}))
        .await;
    assert_frame_error(&client.recv().await, "invalid_action");
    assert_answers_ping(&mut client).await;
}

#[tokio::test]
async fn a_rejected_message_executes_nothing() {
    let upstream = Upstream::start().await;
    let bridge = Bridge::with_upstream(&upstream).await;
    let mut client = bridge.connect().await;
    client
        .send(json!({"type": "ECHO_POST_REQUEST", "payload": {"a": 1}, "meta": {"requestId": "no spaces allowed"}}))
        .await;
    assert_frame_error(&client.recv().await, "invalid_action");
    client
        .send_raw(Message::Binary(Bytes::from_static(
            br#"{"type":"ECHO_POST_REQUEST","payload":{"a":1}}"#,
        )))
        .await;
    assert_frame_error(&client.recv().await, "bad_json");
    // A valid request afterwards is the first thing the API sees.
    let reply = client.request("ECHO_POST", json!({"a": 2})).await;
    assert_eq!(reply["type"], "ECHO_POST_SUCCESS", "{reply}");
    let seen = upstream.recorded();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(&seen[0].body[..], br#"{"a":2}"#);
}

#[tokio::test]
async fn binary_frame_is_bad_json_and_the_connection_stays_open() {
    let bridge = bare_bridge(|_| {}).await;
    let mut client = bridge.connect().await;
    client
        .send_raw(Message::Binary(Bytes::from_static(
            br#"{"type":"@@patchbay/PING_REQUEST"}"#,
        )))
        .await;
    assert_frame_error(&client.recv().await, "bad_json");
    assert_answers_ping(&mut client).await;
}

#[tokio::test]
async fn invalid_utf8_in_a_text_frame_closes_with_1007() {
    let bridge = bare_bridge(|_| {}).await;
    let mut client = bridge.connect().await;
    let bytes: &'static [u8] = b"{\"type\":\"\xff\xfe_REQUEST\"}";
    client
        .send_raw(Message::Frame(Frame::message(
            Bytes::from_static(bytes),
            OpCode::Data(Data::Text),
            true,
        )))
        .await;
    assert_eq!(close_code(&mut client).await, 1007);
}

#[tokio::test]
async fn invalid_utf8_across_continuation_frames_closes_with_1007() {
    let bridge = bare_bridge(|_| {}).await;
    let mut client = bridge.connect().await;
    // Each fragment on its own is a prefix of valid UTF-8; together they are not.
    let parts: [&'static [u8]; 3] = [b"{\"type\":\"", b"\xc3", b"(_REQUEST\"}"];
    for (i, part) in parts.iter().enumerate() {
        let opcode = if i == 0 { Data::Text } else { Data::Continue };
        let frame = Frame::message(
            Bytes::from_static(part),
            OpCode::Data(opcode),
            i + 1 == parts.len(),
        );
        if client.ws.send(Message::Frame(frame)).await.is_err() {
            break;
        }
    }
    assert_eq!(close_code(&mut client).await, 1007);
}

#[tokio::test]
async fn deeply_nested_json_is_bad_json_and_the_connection_stays_open() {
    let bridge = bare_bridge(|cfg| cfg.max_frame_bytes = 1024 * 1024).await;
    let mut client = bridge.connect().await;
    client
        .send_raw(Message::Text("[".repeat(100_000).into()))
        .await;
    assert_frame_error(&client.recv().await, "bad_json");
    let nested_object = format!(
        "{{\"type\":\"X_REQUEST\",\"payload\":{}{}}}",
        "{\"a\":".repeat(50_000),
        "}".repeat(50_000)
    );
    client.send_raw(Message::Text(nested_object.into())).await;
    assert_frame_error(&client.recv().await, "bad_json");
    assert_answers_ping(&mut client).await;
}

#[tokio::test]
async fn a_message_over_max_frame_bytes_closes_with_1009() {
    let bridge = bare_bridge(|cfg| cfg.max_frame_bytes = 1024).await;
    let mut client = bridge.connect().await;
    let text = format!(
        "{{\"type\":\"@@patchbay/PING_REQUEST\",\"payload\":\"{}\"}}",
        "x".repeat(2000)
    );
    client.send_raw(Message::Text(text.into())).await;
    assert_eq!(close_code(&mut client).await, 1009);
}

#[tokio::test]
async fn a_message_just_under_max_frame_bytes_is_accepted() {
    let bridge = bare_bridge(|cfg| cfg.max_frame_bytes = 1024).await;
    let mut client = bridge.connect().await;
    let head = "{\"type\":\"@@patchbay/PING_REQUEST\",\"payload\":\"";
    let tail = "\"}";
    let text = format!("{head}{}{tail}", "x".repeat(1024 - head.len() - tail.len()));
    assert_eq!(text.len(), 1024);
    client.send_raw(Message::Text(text.into())).await;
    assert_eq!(client.recv().await["type"], "@@patchbay/PING_SUCCESS");
}

#[tokio::test]
async fn continuation_frames_over_the_limit_close_with_1009() {
    let bridge = bare_bridge(|cfg| cfg.max_frame_bytes = 1024).await;
    let mut client = bridge.connect().await;
    let text = format!(
        "{{\"type\":\"@@patchbay/PING_REQUEST\",\"payload\":\"{}\"}}",
        "x".repeat(1960)
    );
    let chunks: Vec<&[u8]> = text.as_bytes().chunks(500).collect();
    assert!(chunks.len() >= 3 && text.len() > 1024);
    for (i, chunk) in chunks.iter().enumerate() {
        let opcode = if i == 0 { Data::Text } else { Data::Continue };
        let last = i + 1 == chunks.len();
        let frame = Frame::message(Bytes::copy_from_slice(chunk), OpCode::Data(opcode), last);
        // The server may close before the last fragments are written.
        if client.ws.send(Message::Frame(frame)).await.is_err() {
            break;
        }
    }
    assert_eq!(close_code(&mut client).await, 1009);
}

#[tokio::test]
async fn continuation_frames_within_the_limit_are_one_message() {
    let bridge = bare_bridge(|cfg| cfg.max_frame_bytes = 1024).await;
    let mut client = bridge.connect().await;
    let text = r#"{"type":"@@patchbay/PING_REQUEST","meta":{"requestId":"frag-1"}}"#;
    let chunks: Vec<&[u8]> = text.as_bytes().chunks(20).collect();
    for (i, chunk) in chunks.iter().enumerate() {
        let opcode = if i == 0 { Data::Text } else { Data::Continue };
        let frame = Frame::message(
            Bytes::copy_from_slice(chunk),
            OpCode::Data(opcode),
            i + 1 == chunks.len(),
        );
        client.send_raw(Message::Frame(frame)).await;
    }
    let reply = client.recv().await;
    assert_eq!(reply["type"], "@@patchbay/PING_SUCCESS", "{reply}");
    assert_eq!(reply["meta"]["requestId"], "frag-1");
}

#[tokio::test]
async fn ping_is_answered_with_an_empty_payload() {
    let bridge = bare_bridge(|_| {}).await;
    let mut client = bridge.connect().await;
    client
        .send(json!({"type": "@@patchbay/PING_REQUEST", "meta": {"requestId": "p-1"}}))
        .await;
    let reply = client.recv().await;
    assert_eq!(
        reply,
        json!({"type": "@@patchbay/PING_SUCCESS", "payload": {}, "meta": {"requestId": "p-1"}})
    );

    // Without a requestId the server assigns one, and the reply still carries it.
    client
        .send(json!({"type": "@@patchbay/PING_REQUEST"}))
        .await;
    let reply = client.recv().await;
    assert_eq!(reply["type"], "@@patchbay/PING_SUCCESS");
    let assigned = reply["meta"]["requestId"].as_str().expect("a request id");
    uuid::Uuid::parse_str(assigned).expect("the assigned id is a uuid");
}

#[tokio::test]
async fn a_client_close_is_answered_with_a_close() {
    let bridge = bare_bridge(|_| {}).await;
    let mut client = bridge.connect().await;
    client
        .ws
        .close(Some(CloseFrame {
            code: CloseCode::Normal,
            reason: "bye".into(),
        }))
        .await
        .unwrap();
    let reply = tokio::time::timeout(Duration::from_secs(5), client.ws.next())
        .await
        .expect("an answer in time");
    match reply {
        Some(Ok(Message::Close(Some(frame)))) => assert_eq!(u16::from(frame.code), 1000),
        other => panic!("expected the close to be echoed, got {other:?}"),
    }
    // Then the server ends the TCP connection itself (RFC 6455 7.1.1), without waiting for
    // the client to go first: well within the 2 s it would otherwise linger.
    let mut rest = [0u8; 64];
    let end = tokio::time::timeout(
        Duration::from_millis(1500),
        tokio::io::AsyncReadExt::read(client.ws.get_mut(), &mut rest),
    )
    .await
    .expect("the server closes the connection after its answer");
    assert_eq!(
        end.ok(),
        Some(0),
        "the end of the stream, nothing after the close"
    );
}

#[tokio::test]
async fn an_idle_client_is_closed_with_1000() {
    let bridge = bare_bridge(|cfg| {
        cfg.idle_timeout = Duration::from_secs(1);
        cfg.ping_interval = Duration::from_secs(60);
    })
    .await;
    let mut client = bridge.connect().await;
    let started = std::time::Instant::now();
    assert_eq!(close_code(&mut client).await, 1000);
    assert!(
        started.elapsed() >= Duration::from_millis(800),
        "closed too early: {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn the_server_sends_websocket_pings() {
    let bridge = bare_bridge(|cfg| cfg.ping_interval = Duration::from_secs(1)).await;
    let mut client = bridge.connect().await;
    let ping = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match client.ws.next().await {
                Some(Ok(Message::Ping(_))) => return true,
                Some(Ok(_)) => continue,
                _ => return false,
            }
        }
    })
    .await
    .expect("a ping within 5 s");
    assert!(ping, "the connection ended before a ping arrived");
    assert_answers_ping(&mut client).await;
}

#[tokio::test]
async fn answered_pings_keep_an_otherwise_silent_client_open() {
    let bridge = bare_bridge(|cfg| {
        cfg.ping_interval = Duration::from_millis(300);
        cfg.idle_timeout = Duration::from_millis(1500);
    })
    .await;
    let mut client = bridge.connect().await;
    // Reading is enough: the client library answers each ping with a pong.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    let mut pings = 0;
    while let Ok(msg) = tokio::time::timeout_at(deadline, client.ws.next()).await {
        match msg {
            Some(Ok(Message::Ping(_))) => pings += 1,
            other => panic!("expected only pings while silent, got {other:?}"),
        }
    }
    assert!(pings >= 3, "only {pings} pings in 3 s");
    assert_answers_ping(&mut client).await;
}

#[tokio::test]
async fn origin_rules_on_the_handshake() {
    let bridge = bare_bridge(|cfg| {
        cfg.allowed_origins = AllowedOrigins::List(vec!["https://app.example.com".into()]);
    })
    .await;
    let host = bridge.addr.to_string();

    let foreign = bridge
        .connect_with(&[("origin", "http://evil.example")])
        .await;
    assert_eq!(refused_status(foreign), 403);

    let other_port = format!("http://127.0.0.1:{}", bridge.addr.port() + 1);
    let foreign = bridge
        .connect_with(&[("origin", other_port.as_str())])
        .await;
    assert_eq!(
        refused_status(foreign),
        403,
        "a different port is another origin"
    );

    let same_host = format!("http://{host}");
    let mut c = bridge
        .connect_with(&[("origin", same_host.as_str()), ("host", host.as_str())])
        .await
        .expect("a same-host origin is accepted");
    assert_eq!(c.recv().await["type"], "@@patchbay/CONNECTED");

    let mut c = bridge
        .connect_with(&[("origin", "https://app.example.com")])
        .await
        .expect("a listed origin is accepted");
    assert_eq!(c.recv().await["type"], "@@patchbay/CONNECTED");

    let mut c = bridge
        .connect_with(&[])
        .await
        .expect("no Origin is accepted");
    assert_eq!(c.recv().await["type"], "@@patchbay/CONNECTED");
}

#[tokio::test]
async fn a_browser_style_connection_header_is_accepted() {
    let bridge = bare_bridge(|_| {}).await;
    let mut c = bridge
        .connect_with(&[("connection", "keep-alive, Upgrade")])
        .await
        .expect("`Connection: keep-alive, Upgrade` is an upgrade");
    assert_eq!(c.recv().await["type"], "@@patchbay/CONNECTED");
}

#[tokio::test]
async fn any_origin_when_the_list_is_a_star() {
    let bridge = bare_bridge(|cfg| cfg.allowed_origins = AllowedOrigins::Any).await;
    let mut c = bridge
        .connect_with(&[("origin", "http://evil.example")])
        .await
        .expect("`*` allows any origin");
    assert_eq!(c.recv().await["type"], "@@patchbay/CONNECTED");
}

#[tokio::test]
async fn plain_get_on_ws_is_400() {
    let bridge = bare_bridge(|_| {}).await;
    let (status, body) = http_get(&bridge.http_url("/ws")).await;
    assert_eq!(status, 400, "{body}");
}

#[tokio::test]
async fn handshakes_beyond_max_connections_get_503() {
    let bridge = bare_bridge(|cfg| cfg.max_connections = 2).await;
    let first = bridge.connect().await;
    let mut second = bridge.connect().await;
    assert_eq!(refused_status(bridge.connect_with(&[]).await), 503);
    assert_answers_ping(&mut second).await;

    // A slot frees up once a connection is gone.
    drop(first);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match bridge.connect_with(&[]).await {
            Ok(mut c) => {
                assert_eq!(c.recv().await["type"], "@@patchbay/CONNECTED");
                break;
            }
            Err(e) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "slot never freed: {e:?}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

const SLOW_MANIFEST: &str = r#"{
  "SLOW": { "http": { "method": "GET", "path": "/slow/{ms}" }, "timeoutMs": 8000 }
}"#;

#[tokio::test]
async fn graceful_shutdown_finishes_in_flight_requests_then_closes_1001() {
    let upstream = Upstream::start().await;
    let mut bridge = Bridge::start(SLOW_MANIFEST, Some(upstream.url()), |_| {}).await;
    let mut client = bridge.connect().await;
    let mut idle_client = bridge.connect().await;
    client
        .send(json!({"type": "SLOW_REQUEST", "payload": {"ms": 1500}, "meta": {"requestId": "slow-1"}}))
        .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while upstream.recorded().is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the request never reached the API"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    bridge.shutdown().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
    let (status, body) = loop {
        let (status, body) = http_get(&bridge.http_url("/readyz")).await;
        if status != 200 || tokio::time::Instant::now() >= deadline {
            break (status, body);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(status, 503, "{body}");
    assert_eq!(body, json!({"status": "draining", "bus": "memory"}));
    assert_eq!(refused_status(bridge.connect_with(&[]).await), 503);

    // A connection with nothing in flight is closed at once.
    assert_eq!(close_code(&mut idle_client).await, 1001);

    let reply = client.recv().await;
    assert_eq!(reply["type"], "SLOW_SUCCESS", "{reply}");
    assert_eq!(reply["meta"]["requestId"], "slow-1");
    assert_eq!(reply["payload"], json!({"slept": 1500}));
    assert_eq!(close_code(&mut client).await, 1001);
    tokio::time::timeout(Duration::from_secs(5), bridge.stopped())
        .await
        .expect("the server stops soon after its last client closed");
}

#[tokio::test]
async fn shutdown_grace_bounds_a_request_that_does_not_finish() {
    let upstream = Upstream::start().await;
    let mut bridge = Bridge::start(SLOW_MANIFEST, Some(upstream.url()), |cfg| {
        cfg.shutdown_grace = Duration::from_millis(500);
    })
    .await;
    let mut client = bridge.connect().await;
    client
        .send(json!({"type": "SLOW_REQUEST", "payload": {"ms": 6000}}))
        .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while upstream.recorded().is_empty() {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let started = std::time::Instant::now();
    bridge.shutdown().await;
    assert_eq!(close_code(&mut client).await, 1001);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "closed after {:?}",
        started.elapsed()
    );
    tokio::time::timeout(Duration::from_secs(5), bridge.stopped())
        .await
        .expect("the server stops");
}

#[tokio::test]
async fn health_readiness_actions_and_unknown_routes() {
    let upstream = Upstream::start().await;
    let bridge = Bridge::with_upstream(&upstream).await;

    let (status, body) = http_get(&bridge.http_url("/healthz")).await;
    assert_eq!((status, body), (200, json!({"status": "ok"})));

    let (status, body) = http_get(&bridge.http_url("/readyz")).await;
    assert_eq!(
        (status, body),
        (200, json!({"status": "ok", "bus": "memory"}))
    );

    let (status, body) = http_get(&bridge.http_url("/actions")).await;
    assert_eq!(status, 200);
    let written: Value = serde_json::from_str(MANIFEST).unwrap();
    assert_eq!(body, written);

    let (status, _) = http_get(&bridge.http_url("/nope")).await;
    assert_eq!(status, 404);
    let (status, _) = http_get(&bridge.http_url("/healthz/extra")).await;
    assert_eq!(status, 404);

    // HEAD is answered wherever GET is, with the same status and no body.
    for path in ["/healthz", "/readyz", "/actions", "/metrics"] {
        let (status, headers, body) = http_raw("HEAD", &bridge.http_url(path), &[], "").await;
        assert_eq!(status, 200, "HEAD {path}");
        assert!(body.is_empty(), "HEAD {path} has no body");
        assert!(headers.contains_key("content-type"), "HEAD {path}");
    }
    let (status, _, _) = http_raw("HEAD", &bridge.http_url("/nope"), &[], "").await;
    assert_eq!(status, 404);
    let (status, body) = http_call("DELETE", &bridge.http_url("/healthz"), &[], "").await;
    assert_eq!((status, &body["code"]), (405, &json!("method_not_allowed")));
}

#[tokio::test]
async fn pages_of_allowed_origins_may_read_the_manifest() {
    let bridge = bare_bridge(|c| {
        c.allowed_origins = AllowedOrigins::List(vec!["https://app.example.com".into()]);
    })
    .await;
    let url = bridge.http_url("/actions");
    let (status, headers, _) =
        http_raw("GET", &url, &[("origin", "https://app.example.com")], "").await;
    assert_eq!(status, 200);
    assert_eq!(
        headers["access-control-allow-origin"],
        "https://app.example.com"
    );
    assert_eq!(headers["access-control-allow-credentials"], "true");
    assert!(headers["vary"].to_str().unwrap().contains("origin"));
    let (status, headers, _) =
        http_raw("GET", &url, &[("origin", "https://evil.example")], "").await;
    assert_eq!(status, 200, "the manifest is public; only its CORS differs");
    assert!(headers.get("access-control-allow-origin").is_none());
}

#[tokio::test]
async fn a_malformed_websocket_key_is_400_before_anything_else() {
    let bridge = bare_bridge(|c| c.allow_anonymous = false).await;
    let handshake = async |key: &str| {
        let headers = [
            ("connection", "Upgrade"),
            ("upgrade", "websocket"),
            ("sec-websocket-version", "13"),
            ("sec-websocket-key", key),
        ];
        http_raw("GET", &bridge.http_url("/ws"), &headers, "")
            .await
            .0
    };
    for key in [
        "",
        "short",
        "dGhlIHNhbXBsZSBub25jZQ",
        "!!!!!!!!!!!!!!!!!!!!!!!!",
        "dGhlIHNhbXBsZSBub25jZWVl",
    ] {
        assert_eq!(handshake(key).await, 400, "key {key:?}");
    }
    // A valid key gets past the handshake checks to authentication (anonymous is off here).
    assert_eq!(handshake("dGhlIHNhbXBsZSBub25jZQ==").await, 401);
}

#[tokio::test]
async fn actions_merges_every_manifest_file_as_written() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("a.json"),
        r#"{"A_ONE": {"http": {"method": "GET", "path": "/a"}, "client": {"cache": {"ttl": 5}}, "description": "first"}}"#,
    )
    .unwrap();
    std::fs::write(
        dir.path().join("b.json"),
        r#"{"B_TWO": {"http": {"method": "POST", "path": "/b/{id}"}, "timeoutMs": 1234}}"#,
    )
    .unwrap();
    let actions_dir = dir.path().to_path_buf();
    let bridge = Bridge::start("{}", Some("http://127.0.0.1:9".into()), move |cfg| {
        cfg.actions_dir = actions_dir;
    })
    .await;
    let (status, body) = http_get(&bridge.http_url("/actions")).await;
    assert_eq!(status, 200);
    assert_eq!(
        body,
        json!({
            "A_ONE": {"http": {"method": "GET", "path": "/a"}, "client": {"cache": {"ttl": 5}}, "description": "first"},
            "B_TWO": {"http": {"method": "POST", "path": "/b/{id}"}, "timeoutMs": 1234}
        })
    );
}

/// A client busy receiving pushes still gets keepalive pings: pings must not wait until the
/// outbound queue happens to be empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pings_are_not_starved_by_a_steady_stream_of_pushes() {
    let bridge = Bridge::start("{}", None, |c| {
        c.public_rooms = vec![patchbay::rooms::RoomPattern::parse("feed").unwrap()];
        c.ping_interval = Duration::from_millis(500);
        c.idle_timeout = Duration::from_secs(60);
        c.send_queue = 10_000_000;
        c.send_queue_bytes = 1 << 30;
    })
    .await;
    let mut client = bridge.connect().await;
    let reply = client
        .request("@@patchbay/SUBSCRIBE", json!({"room": "feed"}))
        .await;
    assert_eq!(reply["type"], "@@patchbay/SUBSCRIBE_SUCCESS", "{reply}");
    let app = bridge.app.clone();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let publisher = tokio::spawn({
        let stop = stop.clone();
        async move {
            let action = json!({"type": "TICK"});
            let action = action.as_object().unwrap();
            // Faster than a client reads: the queue never runs empty.
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for _ in 0..200 {
                    let _ = app.hub.publish(vec!["feed".into()], action.clone()).await;
                }
                tokio::task::yield_now().await;
            }
        }
    });
    let (mut pings, mut ticks) = (0, 0);
    let deadline = tokio::time::Instant::now() + Duration::from_millis(3000);
    while tokio::time::Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(5), client.ws.next()).await {
            Ok(Some(Ok(Message::Ping(_)))) => pings += 1,
            Ok(Some(Ok(Message::Text(_)))) => ticks += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    publisher.await.unwrap();
    assert!(ticks > 1000, "the stream was steady ({ticks} pushes)");
    assert!(
        pings >= 2,
        "pings kept coming while the queue was busy ({pings} in 3 s)"
    );
}
