//! Rooms as a client sees them: joining and leaving, room tokens, server-fired actions
//! through `POST /publish`, once-per-connection delivery, and slow readers.

mod common;

use std::time::Duration;

use common::*;
use futures_util::StreamExt;
use patchbay::auth::RoomTokens;
use patchbay::rooms::RoomPattern;
use serde_json::{Map, Value, json};
use tokio::net::TcpSocket;
use tokio_tungstenite::tungstenite::Message;

const SECRET: &str = "room-secret-for-tests";
const PUBLISH_TOKEN: &str = "tok";

fn public(patterns: &[&str]) -> Vec<RoomPattern> {
    patterns
        .iter()
        .map(|p| RoomPattern::parse(p).unwrap())
        .collect()
}

/// A bridge with the usual manifest, a known room secret, a publish token, and public rooms
/// `lobby`, `a`, `b` and `news:*`.
async fn rooms_bridge(upstream: &Upstream) -> Bridge {
    Bridge::start(MANIFEST, Some(upstream.url()), |cfg| {
        cfg.public_rooms = public(&["lobby", "a", "b", "news:*"]);
        cfg.room_secret = SECRET.as_bytes().to_vec();
        cfg.room_secret_is_random = false;
        cfg.publish_token = Some(PUBLISH_TOKEN.into());
        // Room semantics only: history's meta fields are tests/history.rs's business.
        cfg.history = None;
    })
    .await
}

async fn subscribe(client: &mut Client, payload: Value) -> Value {
    client.request("@@patchbay/SUBSCRIBE", payload).await
}

async fn join(client: &mut Client, room: &str) {
    let reply = subscribe(client, json!({"room": room})).await;
    assert_eq!(reply["type"], "@@patchbay/SUBSCRIBE_SUCCESS", "{reply}");
    assert_eq!(reply["payload"], json!({"room": room}), "{reply}");
}

fn object(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        other => panic!("not an object: {other}"),
    }
}

#[tokio::test]
async fn subscribe_to_a_public_room() {
    let upstream = Upstream::start().await;
    let bridge = rooms_bridge(&upstream).await;
    let mut client = bridge.connect().await;
    let reply = subscribe(&mut client, json!({"room": "lobby"})).await;
    assert_eq!(reply["type"], "@@patchbay/SUBSCRIBE_SUCCESS", "{reply}");
    assert_eq!(reply["payload"], json!({"room": "lobby"}));
    join(&mut client, "news:today").await;
    // Joining again is harmless.
    join(&mut client, "lobby").await;
}

#[tokio::test]
async fn subscribe_to_a_non_public_room_is_forbidden() {
    let upstream = Upstream::start().await;
    let bridge = rooms_bridge(&upstream).await;
    let mut client = bridge.connect().await;
    for room in ["task:77", "user:42", "lobby2", "news", "LOBBY"] {
        let reply = subscribe(&mut client, json!({"room": room})).await;
        assert_failure(&reply, "@@patchbay/SUBSCRIBE", "forbidden");
    }
    // A forbidden room receives nothing.
    let (status, _) = publish(
        &bridge,
        json!({"rooms": ["task:77"], "action": {"type": "TASK_PROGRESS"}}),
    )
    .await;
    assert_eq!(status, 202);
    assert_answers_ping(&mut client).await;
}

#[tokio::test]
async fn invalid_room_names_are_invalid_payload() {
    let upstream = Upstream::start().await;
    let bridge = Bridge::start(MANIFEST, Some(upstream.url()), |cfg| {
        // Even a pattern admitting everything does not make a bad name valid.
        cfg.public_rooms = public(&["*"]);
    })
    .await;
    let mut client = bridge.connect().await;
    let payloads = [
        json!({"room": ""}),
        json!({"room": "a b"}),
        json!({"room": "tab\there"}),
        json!({"room": "é"}),
        json!({"room": "r".repeat(129)}),
        json!({"room": 42}),
        json!({"room": null}),
        json!({"room": ["a"]}),
        json!({}),
        json!("lobby"),
        Value::Null,
    ];
    for payload in &payloads {
        let reply = subscribe(&mut client, payload.clone()).await;
        assert_failure(&reply, "@@patchbay/SUBSCRIBE", "invalid_payload");
        let reply = client
            .request("@@patchbay/UNSUBSCRIBE", payload.clone())
            .await;
        assert_failure(&reply, "@@patchbay/UNSUBSCRIBE", "invalid_payload");
    }
    // 128 bytes is still a valid name.
    join(&mut client, &"r".repeat(128)).await;
}

#[tokio::test]
async fn unsubscribe_stops_deliveries() {
    let upstream = Upstream::start().await;
    let bridge = rooms_bridge(&upstream).await;
    let mut client = bridge.connect().await;
    join(&mut client, "lobby").await;

    let action = json!({"rooms": ["lobby"], "action": {"type": "NEWS", "payload": {"n": 1}}});
    assert_eq!(publish(&bridge, action).await.0, 202);
    let got = client.recv().await;
    assert_eq!(got["type"], "NEWS", "{got}");
    assert_eq!(got["payload"], json!({"n": 1}));
    assert_eq!(got["meta"]["room"], "lobby");

    let reply = client
        .request("@@patchbay/UNSUBSCRIBE", json!({"room": "lobby"}))
        .await;
    assert_eq!(reply["type"], "@@patchbay/UNSUBSCRIBE_SUCCESS", "{reply}");
    assert_eq!(reply["payload"], json!({"room": "lobby"}));

    let action = json!({"rooms": ["lobby"], "action": {"type": "NEWS", "payload": {"n": 2}}});
    assert_eq!(publish(&bridge, action).await.0, 202);
    assert_answers_ping(&mut client).await;

    // Leaving a room one is not in is not an error.
    let reply = client
        .request("@@patchbay/UNSUBSCRIBE", json!({"room": "news:never"}))
        .await;
    assert_eq!(reply["type"], "@@patchbay/UNSUBSCRIBE_SUCCESS", "{reply}");
}

#[tokio::test]
async fn subscribe_action_joins_the_room_and_publish_reaches_it() {
    let upstream = Upstream::start().await;
    let bridge = rooms_bridge(&upstream).await;
    let mut client = bridge.connect().await;
    let reply = client
        .request("TASK_ENQUEUE", json!({"title": "build"}))
        .await;
    assert_eq!(reply["type"], "TASK_ENQUEUE_SUCCESS", "{reply}");
    assert_eq!(reply["payload"]["id"], 77);
    assert_eq!(reply["meta"]["subscribed"], "task:77", "{reply}");
    assert!(
        reply["meta"]["roomToken"]
            .as_str()
            .is_some_and(|t| !t.is_empty()),
        "{reply}"
    );

    let (status, body) = publish(
        &bridge,
        json!({"rooms": ["task:77"], "action": {"type": "TASK_PROGRESS", "payload": {"p": 1}, "meta": {"trace": "x"}}}),
    )
    .await;
    assert_eq!((status, body), (202, json!({"rooms": 1})));
    let got = client.recv().await;
    let id = got["meta"]["id"].clone();
    assert!(
        id.as_str()
            .is_some_and(|i| uuid::Uuid::try_parse(i).is_ok()),
        "{got}"
    );
    assert_eq!(
        got,
        json!({"type": "TASK_PROGRESS", "payload": {"p": 1}, "meta": {"room": "task:77", "trace": "x", "id": id}})
    );

    // A published meta.room does not override the room it was delivered through.
    publish(
        &bridge,
        json!({"rooms": ["task:77"], "action": {"type": "TASK_PROGRESS", "meta": {"room": "elsewhere"}}}),
    )
    .await;
    let got = client.recv().await;
    assert_eq!(got["meta"]["room"], "task:77", "{got}");

    // The grant outlives leaving the room: the same connection may join again without a token.
    let reply = client
        .request("@@patchbay/UNSUBSCRIBE", json!({"room": "task:77"}))
        .await;
    assert_eq!(reply["type"], "@@patchbay/UNSUBSCRIBE_SUCCESS", "{reply}");
    join(&mut client, "task:77").await;

    // Another connection without a token may not.
    let mut other = bridge.connect().await;
    let reply = subscribe(&mut other, json!({"room": "task:77"})).await;
    assert_failure(&reply, "@@patchbay/SUBSCRIBE", "forbidden");
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Changes one character in the middle of the signature.
fn forge(token: &str) -> String {
    let (expires, tag) = token.split_once('.').expect("`expiry.tag`");
    let mut tag: Vec<u8> = tag.bytes().collect();
    let i = tag.len() / 2;
    tag[i] = if tag[i] == b'A' { b'B' } else { b'A' };
    format!("{expires}.{}", String::from_utf8(tag).unwrap())
}

#[tokio::test]
async fn room_tokens_let_the_same_user_rejoin_and_nothing_else() {
    let upstream = Upstream::start().await;
    let bridge = rooms_bridge(&upstream).await;
    let mut first = bridge.connect().await;
    let reply = first.request("TASK_ENQUEUE", json!({})).await;
    assert_eq!(reply["meta"]["subscribed"], "task:77", "{reply}");
    let token = reply["meta"]["roomToken"].as_str().unwrap().to_string();

    let mut second = bridge.connect().await;
    let reply = subscribe(
        &mut second,
        json!({"room": "task:77", "token": forge(&token)}),
    )
    .await;
    assert_failure(&reply, "@@patchbay/SUBSCRIBE", "forbidden");

    let reply = subscribe(&mut second, json!({"room": "task:78", "token": token})).await;
    assert_failure(&reply, "@@patchbay/SUBSCRIBE", "forbidden");

    let tokens = RoomTokens::new(SECRET.as_bytes());
    let for_user_42 = tokens.issue("task:77", Some("42"));
    let reply = subscribe(
        &mut second,
        json!({"room": "task:77", "token": for_user_42}),
    )
    .await;
    assert_failure(&reply, "@@patchbay/SUBSCRIBE", "forbidden");

    let other_secret = RoomTokens::new(b"another secret").issue("task:77", None);
    let reply = subscribe(
        &mut second,
        json!({"room": "task:77", "token": other_secret}),
    )
    .await;
    assert_failure(&reply, "@@patchbay/SUBSCRIBE", "forbidden");

    let expired = tokens.issue_at("task:77", None, now_secs() - 60);
    let reply = subscribe(&mut second, json!({"room": "task:77", "token": expired})).await;
    assert_failure(&reply, "@@patchbay/SUBSCRIBE", "forbidden");

    for junk in [json!(""), json!("garbage"), json!(12)] {
        let reply = subscribe(&mut second, json!({"room": "task:77", "token": junk})).await;
        assert_eq!(reply["type"], "@@patchbay/SUBSCRIBE_FAILURE", "{reply}");
    }

    let reply = subscribe(&mut second, json!({"room": "task:77", "token": token})).await;
    assert_eq!(reply["type"], "@@patchbay/SUBSCRIBE_SUCCESS", "{reply}");
    assert_eq!(reply["payload"], json!({"room": "task:77"}));

    // Both connections are now in the room.
    publish(
        &bridge,
        json!({"rooms": ["task:77"], "action": {"type": "TASK_PROGRESS", "payload": {"p": 2}}}),
    )
    .await;
    for client in [&mut first, &mut second] {
        let got = client.recv().await;
        assert_eq!(got["type"], "TASK_PROGRESS", "{got}");
        assert_eq!(got["meta"]["room"], "task:77");
    }
}

#[tokio::test]
async fn a_token_from_patchbay_works_on_another_instance_with_the_same_secret() {
    let upstream = Upstream::start().await;
    let one = rooms_bridge(&upstream).await;
    let two = rooms_bridge(&upstream).await;
    let mut client = one.connect().await;
    let reply = client.request("TASK_ENQUEUE", json!({"id": 9})).await;
    assert_eq!(reply["meta"]["subscribed"], "task:9", "{reply}");
    let token = reply["meta"]["roomToken"].clone();
    drop(client);

    let mut again = two.connect().await;
    let reply = subscribe(&mut again, json!({"room": "task:9", "token": token})).await;
    assert_eq!(reply["type"], "@@patchbay/SUBSCRIBE_SUCCESS", "{reply}");
}

#[tokio::test]
async fn a_multi_room_action_reaches_each_connection_once() {
    let upstream = Upstream::start().await;
    let bridge = rooms_bridge(&upstream).await;
    let mut both = bridge.connect().await;
    join(&mut both, "a").await;
    join(&mut both, "b").await;
    let mut only_b = bridge.connect().await;
    join(&mut only_b, "b").await;
    let mut neither = bridge.connect().await;
    join(&mut neither, "lobby").await;

    let (status, body) = publish(
        &bridge,
        json!({"rooms": ["a", "b"], "action": {"type": "HELLO", "payload": 1}}),
    )
    .await;
    assert_eq!((status, body), (202, json!({"rooms": 2})));
    let got = both.recv().await;
    assert_eq!(got["type"], "HELLO", "{got}");
    assert_eq!(got["meta"]["room"], "a", "the first target room it is in");
    assert_answers_ping(&mut both).await;
    let got = only_b.recv().await;
    assert_eq!(got["meta"]["room"], "b", "{got}");
    assert_answers_ping(&mut only_b).await;
    assert_answers_ping(&mut neither).await;

    // The order of the target list decides meta.room.
    publish(
        &bridge,
        json!({"rooms": ["b", "a"], "action": {"type": "HELLO", "payload": 2}}),
    )
    .await;
    let got = both.recv().await;
    assert_eq!(
        (got["payload"].clone(), got["meta"]["room"].clone()),
        (json!(2), json!("b"))
    );
    assert_answers_ping(&mut both).await;

    // A room repeated in the list still means one delivery, and counts once.
    let (status, body) = publish(
        &bridge,
        json!({"rooms": ["a", "b", "a"], "action": {"type": "HELLO", "payload": 3}}),
    )
    .await;
    assert_eq!(status, 202);
    let got = both.recv().await;
    assert_eq!(got["payload"], 3, "{got}");
    assert_answers_ping(&mut both).await;
    let got = only_b.recv().await;
    assert_eq!(got["payload"], 2, "{got}");
    let got = only_b.recv().await;
    assert_eq!(got["payload"], 3, "{got}");
    assert_answers_ping(&mut only_b).await;
    assert_eq!(body, json!({"rooms": 2}), "distinct rooms targeted");
}

#[tokio::test]
async fn publish_is_404_without_a_configured_token() {
    let bridge = Bridge::start("{}", None, |_| {}).await;
    let body = json!({"rooms": ["a"], "action": {"type": "X"}});
    let (status, _) = http_call("POST", &bridge.http_url("/publish"), &[], &body.to_string()).await;
    assert_eq!(status, 404);
    let (status, _) = publish(&bridge, body).await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn publish_rejects_bad_requests() {
    let upstream = Upstream::start().await;
    let bridge = rooms_bridge(&upstream).await;
    let url = bridge.http_url("/publish");
    let good = json!({"rooms": ["a"], "action": {"type": "X"}}).to_string();

    for auth in [
        None,
        Some("Bearer wrong"),
        Some("Bearer to"),
        Some("Bearer tokk"),
        Some("tok"),
        Some("Basic tok"),
    ] {
        let headers: Vec<(&str, &str)> = auth.map(|a| ("authorization", a)).into_iter().collect();
        let (status, _) = http_call("POST", &url, &headers, &good).await;
        assert_eq!(status, 401, "authorization {auth:?}");
    }

    // The body must be declared JSON.
    for content_type in [
        None,
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
    ] {
        let mut headers = vec![("authorization", "Bearer tok")];
        headers.extend(content_type.map(|c| ("content-type", c)));
        let (status, body) = http_call("POST", &url, &headers, &good).await;
        assert_eq!(status, 415, "{content_type:?}: {body}");
        assert_eq!(body["code"], "unsupported_media_type");
    }

    let auth = [
        ("authorization", "Bearer tok"),
        ("content-type", "application/json; charset=utf-8"),
    ];
    let huge = format!(
        "{{\"rooms\":[\"a\"],\"action\":{{\"type\":\"X\",\"payload\":\"{}\"}}}}",
        "x".repeat(1024 * 1024)
    );
    let (status, _) = http_call("POST", &url, &auth, &huge).await;
    assert_eq!(status, 413);

    for bad in [
        "not json",
        "{\"rooms\":[\"a\"]",
        "[]",
        "{\"rooms\":[\"a\"]}",
        "{\"action\":{\"type\":\"X\"}}",
        "{\"rooms\":[],\"action\":{\"type\":\"X\"}}",
        "{\"rooms\":[\"bad room\"],\"action\":{\"type\":\"X\"}}",
        "{\"rooms\":[\"a\"],\"action\":{\"payload\":1}}",
        "{\"rooms\":[\"a\"],\"action\":{\"type\":7}}",
        "{\"rooms\":[\"a\"],\"action\":[1]}",
        "{\"rooms\":[\"a\"],\"action\":{\"type\":\"X\",\"meta\":3}}",
    ] {
        let (status, body) = http_call("POST", &url, &auth, bad).await;
        assert_eq!(status, 400, "{bad} -> {body}");
    }

    let (status, body) = http_call("POST", &url, &auth, &good).await;
    assert_eq!((status, body), (202, json!({"rooms": 1})));
    let just_under = format!(
        "{{\"rooms\":[\"a\"],\"action\":{{\"type\":\"X\",\"payload\":\"{}\"}}}}",
        "x".repeat(1000 * 1024)
    );
    let (status, _) = http_call("POST", &url, &auth, &just_under).await;
    assert_eq!(status, 202, "a body under 1 MiB is accepted");
}

#[tokio::test]
async fn publish_refuses_more_rooms_than_max_publish_rooms() {
    let bridge = Bridge::start("{}", None, |c| {
        c.publish_token = Some(PUBLISH_TOKEN.into());
        c.max_publish_rooms = 3;
    })
    .await;
    let rooms = |n: usize| (0..n).map(|i| format!("r{i}")).collect::<Vec<_>>();
    let (status, body) =
        publish(&bridge, json!({"rooms": rooms(4), "action": {"type": "X"}})).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["code"], "too_many_rooms");
    let (status, body) =
        publish(&bridge, json!({"rooms": rooms(3), "action": {"type": "X"}})).await;
    assert_eq!((status, body), (202, json!({"rooms": 3})));
}

/// A websocket client whose receive buffer is tiny, so that the server's writes back up as
/// soon as it stops reading.
async fn slow_client(bridge: &Bridge) -> Client {
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(bridge.addr).await.unwrap();
    let (ws, _) = tokio_tungstenite::client_async(bridge.ws_url(), stream)
        .await
        .unwrap();
    let mut client = Client { ws };
    assert_eq!(client.recv().await["type"], "@@patchbay/CONNECTED");
    client
}

#[tokio::test]
async fn a_slow_reader_is_closed_with_4008_and_the_others_get_everything() {
    let bridge = Bridge::start("{}", None, |cfg| {
        cfg.public_rooms = public(&["lobby"]);
        cfg.send_queue = 8;
    })
    .await;
    let tasks = || {
        tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks()
    };
    let before = tasks();
    let mut slow = slow_client(&bridge).await;
    join(&mut slow, "lobby").await;
    let mut fast = bridge.connect().await;
    join(&mut fast, "lobby").await;

    const TOTAL: u64 = 2000;
    const BURST: u64 = 4;
    let filler = "x".repeat(4096);
    let mut seq = 0;
    while seq < TOTAL {
        // Small bursts: the fast client drains each before the next, so its queue of 8
        // never fills, while the slow one never reads.
        for _ in 0..BURST {
            let action = object(json!({"type": "TICK", "payload": {"seq": seq, "filler": filler}}));
            bridge
                .app
                .hub
                .publish(vec!["lobby".into()], action)
                .await
                .unwrap();
            seq += 1;
        }
        for expected in seq - BURST..seq {
            let got = fast.recv().await;
            assert_eq!(got["type"], "TICK");
            assert_eq!(got["payload"]["seq"], expected, "in order, none missing");
            assert_eq!(got["meta"]["room"], "lobby");
        }
    }
    assert_answers_ping(&mut fast).await;

    // The slow client gets what was already on its way, in order, then the close.
    let mut received = 0u64;
    let close = loop {
        let msg = tokio::time::timeout(Duration::from_secs(5), slow.ws.next())
            .await
            .expect("the slow client is closed in time");
        match msg {
            Some(Ok(Message::Text(t))) => {
                let got: Value = serde_json::from_str(t.as_str()).unwrap();
                assert_eq!(got["payload"]["seq"], received, "a gap-free prefix");
                received += 1;
            }
            Some(Ok(Message::Close(frame))) => break frame,
            Some(Ok(_)) => {}
            other => panic!("expected a close frame, got {other:?}"),
        }
    };
    let close = close.expect("a close frame with a code");
    assert_eq!(u16::from(close.code), 4008, "{close:?}");
    assert!(
        received < TOTAL,
        "the slow client cannot have received everything"
    );

    // Nothing of the closed connection stays behind: its session, and the task that was
    // waiting for its socket to take the frames, are gone.
    drop((slow, fast));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while tasks() > before {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} tasks alive after both clients left, {before} before they came",
            tasks()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Deliveries are written straight into the socket while it takes them; once it blocks they
/// wait in the queue (a frame cut in the middle included) for the writer. A client that stops
/// reading and then reads again must see every frame whole, in order, with the pong to a ping
/// it sent meanwhile in its place between them.
#[tokio::test]
async fn a_reader_that_pauses_gets_every_frame_whole_and_in_order_afterwards() {
    let bridge = Bridge::start("{}", None, |cfg| {
        cfg.public_rooms = public(&["lobby"]);
    })
    .await;
    let mut paused = slow_client(&bridge).await;
    join(&mut paused, "lobby").await;

    const TOTAL: u64 = 300;
    let filler = "x".repeat(4000);
    let publish = |seq: u64| {
        let action = object(json!({"type": "TICK", "payload": {"seq": seq, "filler": filler}}));
        bridge.app.hub.publish(vec!["lobby".into()], action)
    };
    for seq in 0..TOTAL / 2 {
        publish(seq).await.unwrap();
    }
    // The socket's buffers are far smaller than what is queued by now: the pong to this ping
    // waits behind the frames, then the rest of the frames behind it.
    paused.send_raw(Message::Ping(b"mid".to_vec().into())).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    for seq in TOTAL / 2..TOTAL {
        publish(seq).await.unwrap();
    }
    let mut pong_after = None;
    let mut seq = 0;
    while seq < TOTAL {
        let msg = tokio::time::timeout(Duration::from_secs(10), paused.ws.next())
            .await
            .expect("everything arrives in time");
        match msg {
            Some(Ok(Message::Text(t))) => {
                let got: Value = serde_json::from_str(t.as_str()).expect("whole frames");
                assert_eq!(got["payload"]["seq"], seq, "in order, none missing");
                seq += 1;
            }
            Some(Ok(Message::Pong(data))) => {
                assert_eq!(&data[..], b"mid");
                pong_after = Some(seq);
            }
            Some(Ok(Message::Ping(_))) => {}
            other => panic!("expected the deliveries, got {other:?}"),
        }
    }
    let pong_after = pong_after.expect("the ping was answered");
    assert!(
        (TOTAL / 2..TOTAL).contains(&pong_after),
        "the pong waited in line behind the {} deliveries queued before the ping, and came \
         before the end: it came after {pong_after}",
        TOTAL / 2
    );
    assert_answers_ping(&mut paused).await;
}

#[tokio::test]
async fn many_connections_in_one_room_each_get_one_copy() {
    let upstream = Upstream::start().await;
    let bridge = rooms_bridge(&upstream).await;
    let mut clients = Vec::new();
    for _ in 0..50 {
        let mut c = bridge.connect().await;
        join(&mut c, "lobby").await;
        clients.push(c);
    }
    let (status, _) = publish(
        &bridge,
        json!({"rooms": ["lobby"], "action": {"type": "BROADCAST", "payload": {"n": 1}}}),
    )
    .await;
    assert_eq!(status, 202);
    let mut ids = std::collections::HashSet::new();
    for c in &mut clients {
        let got = c.recv().await;
        ids.insert(got["meta"]["id"].as_str().unwrap_or_default().to_string());
        assert_eq!(
            got,
            json!({"type": "BROADCAST", "payload": {"n": 1}, "meta": {"room": "lobby", "id": got["meta"]["id"]}})
        );
        assert_answers_ping(c).await;
    }
    assert_eq!(ids.len(), 1, "one id for every copy: {ids:?}");
}

#[tokio::test]
async fn a_closed_connection_leaves_its_rooms() {
    let upstream = Upstream::start().await;
    let bridge = rooms_bridge(&upstream).await;
    let mut stays = bridge.connect().await;
    join(&mut stays, "lobby").await;
    let mut leaves = bridge.connect().await;
    join(&mut leaves, "lobby").await;
    join(&mut leaves, "news:x").await;
    leaves.ws.close(None).await.unwrap();
    drop(leaves);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while bridge.app.hub.rooms().has_members("news:x") {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the room outlived its only member"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    publish(
        &bridge,
        json!({"rooms": ["lobby"], "action": {"type": "STILL_HERE"}}),
    )
    .await;
    let got = stays.recv().await;
    assert_eq!(got["type"], "STILL_HERE", "{got}");
}

#[tokio::test]
async fn max_rooms_caps_the_rooms_of_one_connection() {
    let bridge = Bridge::start("{}", None, |cfg| {
        cfg.public_rooms = public(&["r:*"]);
        cfg.max_rooms = 2;
    })
    .await;
    let mut client = bridge.connect().await;
    join(&mut client, "r:1").await;
    join(&mut client, "r:2").await;
    let reply = subscribe(&mut client, json!({"room": "r:3"})).await;
    assert_eq!(reply["type"], "@@patchbay/SUBSCRIBE_FAILURE", "{reply}");
    assert_eq!(reply["error"], true, "{reply}");
    // Re-joining a room it is already in is not a new room.
    join(&mut client, "r:2").await;
    // Leaving frees a place.
    let reply = client
        .request("@@patchbay/UNSUBSCRIBE", json!({"room": "r:1"}))
        .await;
    assert_eq!(reply["type"], "@@patchbay/UNSUBSCRIBE_SUCCESS", "{reply}");
    join(&mut client, "r:3").await;
    // Another connection has its own allowance.
    let mut other = bridge.connect().await;
    join(&mut other, "r:1").await;
    join(&mut other, "r:4").await;
}
