//! History and recovery on the embedded bus (contract section 8), through real websocket
//! clients: a reconnecting client gets exactly what it missed, every `reason` when and only
//! when it applies, and recoveries racing a publisher see every offset once, in order.

mod common;

use std::time::Duration;

use common::*;
use patchbay::config::Config;
use patchbay::rooms::RoomPattern;
use serde_json::{Map, Value, json};

/// A bridge whose `feed:*` rooms are public and keep history.
async fn history_bridge(size: usize, recover_max: usize) -> Bridge {
    Bridge::start("{}", None, |c: &mut Config| {
        c.public_rooms = vec![
            RoomPattern::parse("feed:*").unwrap(),
            RoomPattern::parse("lobby").unwrap(),
        ];
        c.history = Some(patchbay::history::HistoryConfig {
            rooms: vec![RoomPattern::parse("feed:*").unwrap()],
            size,
            ttl: Duration::from_secs(300),
            recover_max,
        });
    })
    .await
}

fn action(n: u64) -> Map<String, Value> {
    json!({"type": "TICK", "payload": n})
        .as_object()
        .unwrap()
        .clone()
}

async fn publish_n(bridge: &Bridge, room: &str, from: u64, to: u64) {
    for n in from..=to {
        publish_to(bridge, &[room], n).await;
    }
}

/// Action `n` published once to all of `rooms`.
async fn publish_to(bridge: &Bridge, rooms: &[&str], n: u64) {
    let rooms = rooms.iter().map(|r| r.to_string()).collect();
    bridge.app.hub.publish(rooms, action(n)).await.unwrap();
}

async fn subscribe(client: &mut Client, payload: Value) -> Value {
    let reply = client.request("@@patchbay/SUBSCRIBE", payload).await;
    assert_eq!(reply["type"], "@@patchbay/SUBSCRIBE_SUCCESS", "{reply}");
    reply["payload"].clone()
}

#[tokio::test]
async fn a_reconnecting_client_gets_exactly_what_it_missed() {
    let bridge = history_bridge(100, 1000).await;
    let mut first = bridge.connect().await;
    let joined = subscribe(&mut first, json!({"room": "feed:1"})).await;
    let position = joined["position"].clone();
    assert_eq!(position["offset"], 0, "{joined}");
    assert!(joined.get("recovered").is_none(), "{joined}");

    publish_n(&bridge, "feed:1", 1, 2).await;
    for n in 1..=2u64 {
        let got = first.recv().await;
        assert_eq!(got["payload"], n);
        assert_eq!(got["meta"]["offset"], n, "{got}");
        assert_eq!(got["meta"]["room"], "feed:1");
        assert!(uuid::Uuid::try_parse(got["meta"]["id"].as_str().unwrap()).is_ok());
        assert!(got["meta"].get("replayed").is_none());
    }
    drop(first);
    publish_n(&bridge, "feed:1", 3, 5).await;

    let mut again = bridge.connect().await;
    let since = json!({"epoch": position["epoch"], "offset": 2});
    let recovered = subscribe(&mut again, json!({"room": "feed:1", "since": since})).await;
    assert_eq!(
        recovered,
        json!({"room": "feed:1", "position": {"epoch": position["epoch"], "offset": 5}, "recovered": true, "replayed": 3})
    );
    for n in 3..=5u64 {
        let got = again.recv().await;
        assert_eq!(got["payload"], n);
        assert_eq!(got["meta"]["offset"], n);
        assert_eq!(got["meta"]["replayed"], true, "{got}");
    }
    // Live again, not replayed.
    publish_n(&bridge, "feed:1", 6, 6).await;
    let live = again.recv().await;
    assert_eq!(
        (live["payload"].clone(), live["meta"]["offset"].clone()),
        (json!(6), json!(6))
    );
    assert!(live["meta"].get("replayed").is_none());

    // A client that had received nothing recovers from the position its SUBSCRIBE gave.
    let mut idle = bridge.connect().await;
    let since = json!({"epoch": position["epoch"], "offset": 6});
    let nothing = subscribe(&mut idle, json!({"room": "feed:1", "since": since})).await;
    assert_eq!(
        (nothing["recovered"].clone(), nothing["replayed"].clone()),
        (json!(true), json!(0))
    );
    assert_answers_ping(&mut idle).await;
}

#[tokio::test]
async fn every_reason_when_and_only_when_it_applies() {
    // Three actions kept, at most two replayed.
    let bridge = history_bridge(3, 2).await;
    let mut c = bridge.connect().await;
    let epoch = subscribe(&mut c, json!({"room": "feed:r"})).await["position"]["epoch"].clone();
    publish_n(&bridge, "feed:r", 1, 5).await;
    let at = |offset: u64| json!({"epoch": epoch, "offset": offset});
    let cases = [
        (json!({"room": "lobby", "since": at(1)}), Some("not_kept")),
        (
            json!({"room": "feed:r", "since": {"epoch": "another", "offset": 1}}),
            Some("epoch_changed"),
        ),
        (
            json!({"room": "feed:r", "since": at(6)}),
            Some("epoch_changed"),
        ),
        (json!({"room": "feed:r", "since": at(1)}), Some("too_old")),
        (json!({"room": "feed:r", "since": at(2)}), Some("too_many")),
        (json!({"room": "feed:r", "since": at(3)}), None),
    ];
    for (request, reason) in cases {
        let mut client = bridge.connect().await;
        let reply = subscribe(&mut client, request.clone()).await;
        assert_eq!(reply["recovered"], reason.is_none(), "{request} → {reply}");
        assert_eq!(
            reply.get("reason").and_then(Value::as_str),
            reason,
            "{request} → {reply}"
        );
        if reason == Some("not_kept") {
            assert!(reply.get("position").is_none(), "{reply}");
            continue;
        }
        // Where the room stands, also after a refusal: the client refetches and goes on.
        assert_eq!(reply["position"], at(5), "{reply}");
        let replayed = if reason.is_none() { 2 } else { 0 };
        assert_eq!(reply["replayed"], replayed, "{reply}");
        for n in 0..replayed {
            assert_eq!(client.recv().await["meta"]["offset"], 4 + n);
        }
    }
    // A malformed position is refused outright.
    for bad in [
        json!("e:1"),
        json!({"epoch": "a b", "offset": 1}),
        json!({"epoch": "e", "offset": -1}),
    ] {
        let reply = c
            .request(
                "@@patchbay/SUBSCRIBE",
                json!({"room": "feed:r", "since": bad}),
            )
            .await;
        assert_failure(&reply, "@@patchbay/SUBSCRIBE", "invalid_payload");
    }
}

// Several threads, so deliveries really land between a recovery's join, read and replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recoveries_racing_a_publisher_see_every_offset_once_in_order() {
    const ACTIONS: u64 = 400;
    let bridge = history_bridge(1000, 1000).await;
    let mut probe = bridge.connect().await;
    let epoch =
        subscribe(&mut probe, json!({"room": "feed:race"})).await["position"]["epoch"].clone();
    let publisher = {
        let app = bridge.app.clone();
        tokio::spawn(async move {
            for n in 1..=ACTIONS {
                app.hub
                    .publish(vec!["feed:race".into()], action(n))
                    .await
                    .unwrap();
                if n % 2 == 0 {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
        })
    };
    // Clients join at different moments while the publisher runs, each asking for
    // everything since the start.
    // Everything each client receives after asking counts, the success included: an action
    // sent before the success, or twice, is a failure.
    let mut clients = Vec::new();
    for i in 0..40u64 {
        tokio::time::sleep(Duration::from_millis(i % 4)).await;
        let mut client = bridge.connect().await;
        let since = json!({"epoch": epoch, "offset": 0});
        client
            .send(json!({"type": "@@patchbay/SUBSCRIBE_REQUEST", "payload": {"room": "feed:race", "since": since}, "meta": {"requestId": "r"}}))
            .await;
        clients.push(client);
    }
    publisher.await.unwrap();
    for (i, client) in clients.iter_mut().enumerate() {
        let reply = client.recv().await;
        assert_eq!(
            reply["type"], "@@patchbay/SUBSCRIBE_SUCCESS",
            "client {i}: {reply}"
        );
        assert_eq!(reply["payload"]["recovered"], true, "{reply}");
        let mut seen = Vec::new();
        while seen.len() < ACTIONS as usize {
            let got = client.recv().await;
            seen.push(got["meta"]["offset"].as_u64().unwrap());
        }
        let expected: Vec<u64> = (1..=ACTIONS).collect();
        assert_eq!(seen, expected, "client {i} saw every offset once, in order");
        assert_answers_ping(client).await;
    }
}

#[tokio::test]
async fn task_rooms_keep_history_and_user_rooms_keep_only_final_states() {
    // The default PATCHBAY_HISTORY_ROOMS: task:* and user:*.
    let bridge = Bridge::start("{}", None, with_jwt).await;
    assert!(
        bridge
            .app
            .history
            .as_ref()
            .is_some_and(|h| h.keeps("task:1") && h.keeps("user:7"))
    );
    let progress = |status: &str| {
        json!({"type": "TASK_PROGRESS", "payload": {"id": "1", "status": status}})
            .as_object()
            .unwrap()
            .clone()
    };
    let rooms = vec!["task:1".to_string(), "user:7".to_string()];
    for status in ["running", "running", "succeeded"] {
        bridge
            .app
            .hub
            .publish(rooms.clone(), progress(status))
            .await
            .unwrap();
    }
    let Some(patchbay::history::History::Memory(history)) = bridge.app.history.as_ref() else {
        panic!("the embedded history");
    };
    let mut logs = history.lock();
    assert_eq!(logs.position("task:1").offset, 3);
    assert_eq!(logs.position("user:7").offset, 1, "only the final state");
}

/// Connects with `query` (after `?`); returns the client and its CONNECTED.
async fn connect_with_query(bridge: &Bridge, query: &str) -> (Client, Value) {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let req = format!("{}?{query}", bridge.ws_url())
        .into_client_request()
        .unwrap();
    let stream = tokio::net::TcpStream::connect(bridge.addr).await.unwrap();
    let (ws, _) = tokio_tungstenite::client_async(req, stream).await.unwrap();
    let mut client = Client { ws };
    let hello = client.recv().await;
    assert_eq!(hello["type"], "@@patchbay/CONNECTED", "{hello}");
    (client, hello)
}

#[tokio::test]
async fn the_identity_room_recovers_with_the_handshake() {
    let bridge = Bridge::start("{}", None, with_jwt).await;
    let token = jwt(json!({"sub": "7", "exp": now() + 600}));
    let (first, hello) = connect_with_query(&bridge, &format!("token={token}")).await;
    let position = hello["payload"]["positions"]["user:7"].clone();
    assert_eq!(position["offset"], 0, "{hello}");
    assert!(hello["payload"].get("recovery").is_none(), "{hello}");
    drop(first);
    publish_n(&bridge, "user:7", 1, 3).await;

    let since = format!("{}:0", position["epoch"].as_str().unwrap());
    let (mut again, hello) =
        connect_with_query(&bridge, &format!("token={token}&since={since}")).await;
    assert_eq!(
        hello["payload"]["recovery"],
        json!({"room": "user:7", "recovered": true, "replayed": 3}),
        "{hello}"
    );
    assert_eq!(hello["payload"]["positions"]["user:7"]["offset"], 3);
    for n in 1..=3u64 {
        let got = again.recv().await;
        assert_eq!(
            (got["payload"].clone(), got["meta"]["replayed"].clone()),
            (json!(n), json!(true))
        );
    }
    publish_n(&bridge, "user:7", 4, 4).await;
    assert_eq!(again.recv().await["meta"]["offset"], 4);

    // A since of another sequence, or no position at all: told so, nothing replayed.
    for since in ["someone-else:2", "garbage"] {
        let (_c, hello) =
            connect_with_query(&bridge, &format!("token={token}&since={since}")).await;
        assert_eq!(hello["payload"]["recovery"]["recovered"], false, "{hello}");
        assert_eq!(
            hello["payload"]["recovery"]["reason"], "epoch_changed",
            "{hello}"
        );
        assert_eq!(hello["payload"]["positions"]["user:7"]["offset"], 4);
    }
}

#[tokio::test]
async fn an_action_stored_in_several_rooms_of_a_connection_carries_all_its_offsets() {
    let bridge = history_bridge(100, 1000).await;
    let mut both = bridge.connect().await;
    subscribe(&mut both, json!({"room": "feed:a"})).await;
    subscribe(&mut both, json!({"room": "feed:b"})).await;
    let mut only_b = bridge.connect().await;
    subscribe(&mut only_b, json!({"room": "feed:b"})).await;
    publish_n(&bridge, "feed:b", 1, 1).await;
    assert_eq!(both.recv().await["meta"]["offset"], 1);
    assert_eq!(only_b.recv().await["meta"]["offset"], 1);
    publish_to(&bridge, &["feed:a", "feed:b"], 2).await;
    let got = both.recv().await;
    assert_eq!(got["meta"]["room"], "feed:a");
    assert_eq!(got["meta"]["offset"], 1);
    assert_eq!(got["meta"]["offsets"], json!({"feed:b": 2}), "{got}");
    let got_b = only_b.recv().await;
    assert_eq!(got_b["meta"]["room"], "feed:b");
    assert_eq!(got_b["meta"]["offset"], 2);
    assert!(
        got_b["meta"].get("offsets").is_none(),
        "no room of another: {got_b}"
    );
    assert_eq!(
        got["meta"]["id"], got_b["meta"]["id"],
        "one id in every room"
    );
}

#[tokio::test]
async fn a_batch_subscribe_rejoins_every_room_and_replays_a_shared_action_once() {
    let bridge = history_bridge(100, 1000).await;
    let mut first = bridge.connect().await;
    let a = subscribe(&mut first, json!({"room": "feed:a"})).await["position"].clone();
    let b = subscribe(&mut first, json!({"room": "feed:b"})).await["position"].clone();
    drop(first);
    publish_n(&bridge, "feed:a", 1, 1).await;
    publish_to(&bridge, &["feed:a", "feed:b"], 2).await;
    publish_n(&bridge, "feed:b", 3, 3).await;

    let mut again = bridge.connect().await;
    let reply = again
        .request(
            "@@patchbay/SUBSCRIBE",
            json!({"rooms": [
                {"room": "feed:a", "since": a},
                {"room": "secret"},
                {"room": "feed:b", "since": b},
                {"room": "lobby", "since": a},
            ]}),
        )
        .await;
    assert_eq!(reply["type"], "@@patchbay/SUBSCRIBE_SUCCESS", "{reply}");
    let rooms = reply["payload"]["rooms"].as_array().unwrap().clone();
    assert_eq!(rooms.len(), 4, "{reply}");
    assert_eq!(
        (
            rooms[0]["room"].clone(),
            rooms[0]["recovered"].clone(),
            rooms[0]["replayed"].clone()
        ),
        (json!("feed:a"), json!(true), json!(2))
    );
    assert_eq!(rooms[1]["room"], "secret");
    assert_eq!(rooms[1]["error"]["code"], "forbidden", "{reply}");
    assert_eq!(
        (rooms[2]["recovered"].clone(), rooms[2]["replayed"].clone()),
        (json!(true), json!(2)),
        "{reply}"
    );
    assert_eq!(
        rooms[3],
        json!({"room": "lobby", "recovered": false, "reason": "not_kept", "replayed": 0})
    );
    // Three actions missed in all: the one stored in both rooms comes once.
    let mut payloads = Vec::new();
    for _ in 0..3 {
        let got = again.recv().await;
        assert_eq!(got["meta"]["replayed"], true, "{got}");
        if got["payload"] == 2 {
            // Through the first of its rooms, with its offset in the other.
            assert_eq!(got["meta"]["room"], "feed:a", "{got}");
            assert_eq!(got["meta"]["offsets"], json!({"feed:b": 1}), "{got}");
        }
        payloads.push(got["payload"].as_u64().unwrap());
    }
    payloads.sort();
    assert_eq!(payloads, [1, 2, 3]);
    assert_answers_ping(&mut again).await;
    // Every admitted room is joined: live actions flow.
    publish_n(&bridge, "lobby", 9, 9).await;
    assert_eq!(again.recv().await["payload"], 9);

    // Too many entries is refused whole.
    let many: Vec<Value> = (0..300)
        .map(|i| json!({"room": format!("feed:{i}")}))
        .collect();
    let reply = again
        .request("@@patchbay/SUBSCRIBE", json!({ "rooms": many }))
        .await;
    assert_failure(&reply, "@@patchbay/SUBSCRIBE", "invalid_payload");
}
