//! Abuse limits a client meets: the frame rate, flooding, and what `subscribe` may grant.

mod common;

use common::*;
use futures_util::SinkExt;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn frames_over_the_rate_are_rate_limited_and_a_flood_is_closed_with_4029() {
    let upstream = Upstream::start().await;
    let bridge = Bridge::start(MANIFEST, Some(upstream.url()), |c| {
        c.rate_per_sec = 1.0;
        c.rate_burst = 5;
    })
    .await;
    let mut flooder = bridge.connect().await;
    let mut other = bridge.connect().await;

    for i in 0..5 {
        let reply = flooder.request("@@patchbay/PING", json!({})).await;
        assert_eq!(
            reply["type"], "@@patchbay/PING_SUCCESS",
            "frame {i} is within the burst: {reply}"
        );
    }
    let reply = flooder.request("ECHO_LIST", json!({})).await;
    let payload = assert_failure(&reply, "ECHO_LIST", "rate_limited");
    assert!(
        payload["message"].as_str().unwrap().contains("per second"),
        "{reply}"
    );
    assert!(
        upstream.recorded().is_empty(),
        "a rate-limited request is not executed"
    );

    // Another connection has its own bucket.
    let reply = other.request("ECHO_LIST", json!({})).await;
    assert_eq!(reply["type"], "ECHO_LIST_SUCCESS", "{reply}");

    // Keep flooding: a whole further burst while limited closes the connection.
    for _ in 0..10 {
        if flooder
            .ws
            .send(Message::Text(
                r#"{"type":"@@patchbay/PING_REQUEST"}"#.into(),
            ))
            .await
            .is_err()
        {
            break;
        }
    }
    let close = flooder.closed().await.expect("a close frame");
    assert_eq!(u16::from(close.code), 4029);
    assert_answers_ping(&mut other).await;
}

#[tokio::test]
async fn a_flood_from_one_client_leaves_others_served() {
    let upstream = Upstream::start().await;
    let bridge = Bridge::with_upstream(&upstream).await;
    let mut flooder = bridge.connect().await;
    let mut other = bridge.connect().await;
    let flood = tokio::spawn(async move {
        let frame = r#"{"type":"@@patchbay/PING_REQUEST"}"#;
        let mut sent = 0;
        for _ in 0..10_000 {
            if flooder.ws.feed(Message::Text(frame.into())).await.is_err() {
                break;
            }
            sent += 1;
        }
        let _ = flooder.ws.flush().await;
        let close = flooder.closed().await;
        (sent, close.map(|f| u16::from(f.code)))
    });
    for _ in 0..20 {
        let reply = other.request("ECHO_LIST", json!({"q": 1})).await;
        assert_eq!(reply["type"], "ECHO_LIST_SUCCESS", "{reply}");
    }
    let (sent, code) = flood.await.unwrap();
    assert!(sent > 400, "the flood was sent ({sent} frames)");
    assert_eq!(code, Some(4029), "the flooding client is closed");
}

#[tokio::test]
async fn subscribe_values_cannot_name_another_kind_of_room() {
    let upstream = Upstream::start().await;
    let bridge = Bridge::with_upstream(&upstream).await;
    let mut client = bridge.connect().await;
    // The test API echoes the client's `id`, as a careless API might.
    let reply = client
        .request("TASK_ENQUEUE", json!({"id": "1:user:42"}))
        .await;
    assert_eq!(
        reply["type"], "TASK_ENQUEUE_SUCCESS",
        "the API's success is still reported: {reply}"
    );
    assert!(reply["meta"].get("subscribed").is_none(), "{reply}");
    assert!(reply["meta"].get("roomToken").is_none(), "{reply}");
    let reply = client
        .request("@@patchbay/SUBSCRIBE", json!({"room": "task:1:user:42"}))
        .await;
    assert_failure(&reply, "@@patchbay/SUBSCRIBE", "forbidden");
    let reply = client.request("TASK_ENQUEUE", json!({"id": "a-1"})).await;
    assert_eq!(reply["meta"]["subscribed"], "task:a-1", "{reply}");
}

#[tokio::test]
async fn an_absent_payload_is_the_empty_object() {
    let upstream = Upstream::start().await;
    let bridge = Bridge::with_upstream(&upstream).await;
    let mut client = bridge.connect().await;
    // TASKS_FETCH has an object schema; redux actions often carry no payload at all.
    client
        .send(json!({"type": "TASKS_FETCH_REQUEST", "meta": {"requestId": "r1"}}))
        .await;
    let reply = client.recv().await;
    assert_eq!(reply["type"], "TASKS_FETCH_SUCCESS", "{reply}");
    client
        .send(json!({"type": "ECHO_POST_REQUEST", "meta": {"requestId": "r2"}}))
        .await;
    let reply = client.recv().await;
    assert_eq!(reply["payload"]["body"], json!({}), "{reply}");
}

#[tokio::test]
async fn header_injection_through_the_request_id_is_refused() {
    let upstream = Upstream::start().await;
    let bridge = Bridge::with_upstream(&upstream).await;
    let mut client = bridge.connect().await;
    for id in ["a\r\nX-Evil: 1", "a\nb", "a\u{0}b", "a b"] {
        client
            .send(json!({"type": "ECHO_POST_REQUEST", "payload": {}, "meta": {"requestId": id}}))
            .await;
        let reply = client.recv().await;
        assert_eq!(reply["type"], "@@patchbay/ERROR", "{reply}");
        assert_eq!(reply["payload"]["code"], "invalid_action", "{reply}");
    }
    assert!(upstream.recorded().is_empty(), "nothing reached the API");
}
