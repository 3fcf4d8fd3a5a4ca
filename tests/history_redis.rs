//! History and recovery on Redis (contract section 8) with several instances on one real
//! `redis-server`: a client recovers on another instance than the one it left, every reason
//! is given when it applies, a Redis restart is an epoch change and never a false recovery,
//! task messages every instance ingests are stored once, an instance whose pub/sub
//! connection was killed fills the gap itself, and recoveries of one room share reads.

mod common;

use std::time::{Duration, Instant};

use common::*;
use patchbay::config::Config;
use patchbay::rooms::RoomPattern;
use serde_json::{Value, json};

/// An instance on `redis` whose `feed:*` and `task:*` rooms are public and keep history.
async fn instance(redis: &RedisServer, size: usize, recover_max: usize) -> Bridge {
    let bridge = Bridge::start("{}", None, |c: &mut Config| {
        c.redis_url = Some(redis.url());
        c.publish_token = Some("tok".into());
        c.public_rooms = ["feed:*", "task:*", "plain"]
            .iter()
            .map(|p| RoomPattern::parse(p).unwrap())
            .collect();
        c.history = Some(patchbay::history::HistoryConfig {
            rooms: vec![
                RoomPattern::parse("feed:*").unwrap(),
                RoomPattern::parse("task:*").unwrap(),
            ],
            size,
            ttl: Duration::from_secs(300),
            recover_max,
        });
    })
    .await;
    wait_ready_status(&bridge, "ok").await;
    bridge
}

/// `TICK n` published to `room` through `bridge`'s `POST /publish`.
async fn tick(bridge: &Bridge, room: &str, n: u64) {
    let body = json!({"rooms": [room], "action": {"type": "TICK", "payload": n}});
    let (status, reply) = publish(bridge, body).await;
    assert_eq!(status, 202, "{reply}");
}

async fn subscribe(client: &mut Client, payload: Value) -> Value {
    let reply = client.request("@@patchbay/SUBSCRIBE", payload).await;
    assert_eq!(reply["type"], "@@patchbay/SUBSCRIBE_SUCCESS", "{reply}");
    reply["payload"].clone()
}

/// The next `n` TICKs: payloads, offsets, whether replayed.
async fn ticks(client: &mut Client, n: usize) -> Vec<(u64, u64, bool)> {
    let mut got = Vec::new();
    while got.len() < n {
        let m = client.recv().await;
        if m["type"] == "TICK" {
            got.push((
                m["payload"].as_u64().unwrap(),
                m["meta"]["offset"].as_u64().unwrap_or(0),
                m["meta"]["replayed"] == true,
            ));
        } else {
            assert_ne!(m["type"], "@@patchbay/RESYNC", "{m}");
        }
    }
    got
}

#[tokio::test]
async fn a_client_recovers_on_another_instance_exactly_what_it_missed() {
    let redis = RedisServer::start().await;
    let (a, b) = (
        instance(&redis, 100, 1000).await,
        instance(&redis, 100, 1000).await,
    );
    let mut first = a.connect().await;
    let joined = subscribe(&mut first, json!({"room": "feed:1"})).await;
    assert_eq!(joined["position"]["offset"], 0, "{joined}");
    let epoch = joined["position"]["epoch"].clone();
    tick(&b, "feed:1", 1).await;
    tick(&a, "feed:1", 2).await;
    assert_eq!(ticks(&mut first, 2).await, [(1, 1, false), (2, 2, false)]);
    drop(first);
    for n in 3..=5 {
        tick(&a, "feed:1", n).await;
    }

    // On the other instance, from offset 2.
    let mut again = b.connect().await;
    let since = json!({"epoch": epoch, "offset": 2});
    let recovered = subscribe(&mut again, json!({"room": "feed:1", "since": since})).await;
    assert_eq!(
        recovered,
        json!({"room": "feed:1", "position": {"epoch": epoch, "offset": 5}, "recovered": true, "replayed": 3})
    );
    tick(&a, "feed:1", 6).await;
    assert_eq!(
        ticks(&mut again, 4).await,
        [(3, 3, true), (4, 4, true), (5, 5, true), (6, 6, false)]
    );

    // A client that had received nothing recovers from the position it was given.
    let mut silent = a.connect().await;
    let joined = subscribe(&mut silent, json!({"room": "feed:2"})).await;
    let since = joined["position"].clone();
    drop(silent);
    tick(&b, "feed:2", 1).await;
    let mut back = a.connect().await;
    let recovered = subscribe(&mut back, json!({"room": "feed:2", "since": since})).await;
    assert_eq!(recovered["recovered"], true, "{recovered}");
    assert_eq!(ticks(&mut back, 1).await, [(1, 1, true)]);
}

#[tokio::test]
async fn every_reason_on_redis_when_and_only_when_it_applies() {
    let redis = RedisServer::start().await;
    let bridge = instance(&redis, 3, 2).await;
    let mut c = bridge.connect().await;
    let joined = subscribe(&mut c, json!({"room": "feed:r"})).await;
    let epoch = joined["position"]["epoch"].clone();
    for n in 1..=5 {
        tick(&bridge, "feed:r", n).await;
    }
    let at = |offset: u64| json!({"room": "feed:r", "since": {"epoch": epoch, "offset": offset}});
    let reason = |r: &Value| r["reason"].as_str().map(str::to_string);
    let mut other = bridge.connect().await;
    let cases = [
        (
            json!({"room": "plain", "since": {"epoch": "x", "offset": 1}}),
            Some("not_kept"),
        ),
        (
            json!({"room": "feed:r", "since": {"epoch": "other", "offset": 1}}),
            Some("epoch_changed"),
        ),
        (at(6), Some("epoch_changed")),
        (at(1), Some("too_old")),
        (at(2), Some("too_many")),
        (at(3), None),
    ];
    for (ask, want) in cases {
        let got = subscribe(&mut other, ask.clone()).await;
        assert_eq!(reason(&got).as_deref(), want, "{ask} → {got}");
        assert_eq!(got["recovered"], want.is_none(), "{got}");
        if ask["room"] == "feed:r" {
            assert_eq!(
                got["position"],
                json!({"epoch": epoch, "offset": 5}),
                "{got}"
            );
        } else {
            assert!(got.get("position").is_none(), "{got}");
        }
        if want.is_none() {
            assert_eq!(ticks(&mut other, 2).await, [(4, 4, true), (5, 5, true)]);
        }
        let unsubscribed = other
            .request("@@patchbay/UNSUBSCRIBE", json!({"room": ask["room"]}))
            .await;
        assert_eq!(unsubscribed["type"], "@@patchbay/UNSUBSCRIBE_SUCCESS");
    }
    drop(c);
}

#[tokio::test]
async fn a_redis_restart_changes_every_epoch_and_never_recovers_falsely() {
    let mut redis = RedisServer::start().await;
    let bridge = instance(&redis, 100, 1000).await;
    let mut stays = bridge.connect().await;
    let joined = subscribe(&mut stays, json!({"room": "feed:e"})).await;
    let old = joined["position"].clone();
    for n in 1..=3 {
        tick(&bridge, "feed:e", n).await;
    }
    assert_eq!(ticks(&mut stays, 3).await.len(), 3);

    // Redis restarts empty: the offsets will start again from 1.
    redis.restart().await;
    wait_ready_status(&bridge, "ok").await;
    // The connected client is told to refetch (when the instance resubscribes, or at the
    // latest when the first action of the new epoch shows it).
    let mut published = 0;
    let resync = loop {
        if published < 50 {
            published += 1;
            let body = json!({"rooms": ["feed:e"], "action": {"type": "TICK", "payload": 100 + published}});
            let _ = publish(&bridge, body).await;
        }
        let m = stays.recv().await;
        if m["type"] == "@@patchbay/RESYNC" {
            break m;
        }
    };
    assert_eq!(resync["payload"]["room"], "feed:e", "{resync}");
    assert_eq!(resync["payload"]["reason"], "epoch_changed", "{resync}");
    assert_ne!(
        resync["payload"]["position"]["epoch"], old["epoch"],
        "{resync}"
    );

    // A client recovering from before the restart is told so, never "recovered".
    let mut late = bridge.connect().await;
    let since = json!({"epoch": old["epoch"], "offset": 3});
    let got = subscribe(&mut late, json!({"room": "feed:e", "since": since})).await;
    assert_eq!(got["recovered"], false, "{got}");
    assert_eq!(got["reason"], "epoch_changed", "{got}");
    assert_ne!(got["position"]["epoch"], old["epoch"]);
}

#[tokio::test]
async fn task_messages_every_instance_ingests_are_stored_once() {
    let redis = RedisServer::start().await;
    let instances = [
        instance(&redis, 100, 1000).await,
        instance(&redis, 100, 1000).await,
        instance(&redis, 100, 1000).await,
    ];
    let mut clients = Vec::new();
    for bridge in &instances {
        let mut c = bridge.connect().await;
        subscribe(&mut c, json!({"room": "task:9"})).await;
        clients.push(c);
    }
    // The same bytes twice are two messages; a third differs.
    let running = r#"{"id":"9","status":"running","progress":1}"#;
    redis.publish("tasks.9", running).await;
    redis.publish("tasks.9", running).await;
    redis
        .publish("tasks.9", r#"{"id":"9","status":"succeeded"}"#)
        .await;
    for c in &mut clients {
        let mut offsets = Vec::new();
        while offsets.len() < 3 {
            let m = c.recv().await;
            assert_eq!(m["type"], "TASK_PROGRESS", "{m}");
            assert_eq!(m["meta"]["room"], "task:9");
            offsets.push(m["meta"]["offset"].as_u64().unwrap());
        }
        assert_eq!(
            offsets,
            [1, 2, 3],
            "stored once each, whichever instance did"
        );
        assert_answers_ping(c).await;
    }
    let mut late = instances[0].connect().await;
    let position = subscribe(&mut late, json!({"room": "task:9"})).await["position"].clone();
    assert_eq!(position["offset"], 3);
}

#[tokio::test]
async fn an_instance_whose_pubsub_connection_was_killed_fills_the_gap_itself() {
    let redis = RedisServer::start().await;
    let (a, b) = (
        instance(&redis, 1000, 1000).await,
        instance(&redis, 1000, 1000).await,
    );
    let mut on_a = a.connect().await;
    subscribe(&mut on_a, json!({"room": "feed:k"})).await;
    tick(&b, "feed:k", 1).await;
    assert_eq!(ticks(&mut on_a, 1).await, [(1, 1, false)]);

    // For 3 s, kill every pub/sub connection (b's too, which has no member of the room) as
    // soon as it is back, while a publisher goes on through b.
    let mut conn = redis.connection().await.unwrap();
    let killer = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let until = Instant::now() + Duration::from_secs(3);
        while Instant::now() < until {
            let _: i64 = redis::cmd("CLIENT")
                .arg("KILL")
                .arg("TYPE")
                .arg("pubsub")
                .query_async(&mut conn)
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let publisher = async {
        for n in 2..=200 {
            tick(&b, "feed:k", n).await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let publisher = async { tokio::join!(killer, publisher) };
    let (_, got) = tokio::join!(publisher, ticks(&mut on_a, 199));
    let expected: Vec<u64> = (2..=200).collect();
    assert_eq!(
        got.iter().map(|t| t.0).collect::<Vec<_>>(),
        expected,
        "every action once, in order, without reconnecting"
    );
    assert!(
        got.iter().all(|(n, offset, _)| n == offset),
        "offsets follow: {got:?}"
    );
}

#[tokio::test]
async fn recoveries_racing_a_publisher_see_every_offset_once_and_share_reads() {
    let redis = RedisServer::start().await;
    let (a, b) = (
        instance(&redis, 1000, 1000).await,
        instance(&redis, 1000, 1000).await,
    );
    let mut clients = Vec::new();
    let mut epoch = Value::Null;
    for _ in 0..100 {
        let mut c = a.connect().await;
        let joined = subscribe(&mut c, json!({"room": "feed:race"})).await;
        epoch = joined["position"]["epoch"].clone();
        clients.push(c);
    }
    let Some(patchbay::history::History::Redis(history)) = a.app.history.clone() else {
        panic!("history in Redis")
    };
    let reads_before = history.reads();
    // A publisher at about 1,000 actions a second, on the other instance.
    let total = 600u64;
    let publisher = async {
        let mut every = tokio::time::interval(Duration::from_millis(1));
        for n in 1..=total {
            every.tick().await;
            tick(&b, "feed:race", n).await;
        }
    };
    // Meanwhile every client leaves the room and recovers from the last offset it saw.
    let mut seen: Vec<Vec<u64>> = Vec::new();
    let mut asks = Vec::new();
    let recoveries = async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        for c in &mut clients {
            let got = ticks(c, 1).await;
            seen.push(vec![got[0].1]);
        }
        for c in &mut clients {
            // What arrives before the answer is skipped: it is after the position the client
            // recovers from, so the replay carries it again.
            let left = c
                .request("@@patchbay/UNSUBSCRIBE", json!({"room": "feed:race"}))
                .await;
            assert_eq!(left["type"], "@@patchbay/UNSUBSCRIBE_SUCCESS");
            asks.push(uuid::Uuid::new_v4().to_string());
        }
        // All at once, each from its own position.
        for ((c, seen), id) in clients.iter_mut().zip(&seen).zip(&asks) {
            let since = json!({"epoch": epoch, "offset": seen.last().unwrap()});
            c.send(json!({"type": "@@patchbay/SUBSCRIBE_REQUEST", "payload": {"room": "feed:race", "since": since}, "meta": {"requestId": id}})).await;
        }
    };
    tokio::join!(publisher, recoveries);
    for ((c, seen), id) in clients.iter_mut().zip(seen.iter_mut()).zip(&asks) {
        loop {
            let m = c.recv().await;
            if m["meta"]["requestId"] == id.as_str() {
                assert_eq!(m["payload"]["recovered"], true, "{m}");
                break;
            }
            // Nothing arrives between leaving and the answer to rejoining.
            assert_ne!(m["type"], "TICK", "{m}");
        }
        while *seen.last().unwrap() < total {
            let m = c.recv().await;
            assert_eq!(m["type"], "TICK", "{m}");
            seen.push(m["meta"]["offset"].as_u64().unwrap());
        }
        let first = seen[0];
        let expected: Vec<u64> = (first..=total).collect();
        assert_eq!(*seen, expected, "every offset once, in order");
    }
    let reads = history.reads() - reads_before;
    // The instance follows the room: what it delivered answers recoveries from memory.
    assert!(
        reads <= 5,
        "100 recoveries of one room needed {reads} reads of Redis"
    );
}

#[tokio::test]
async fn recoveries_from_before_the_instance_subscribed_read_redis_about_once() {
    let redis = RedisServer::start().await;
    let (a, b) = (
        instance(&redis, 100, 1000).await,
        instance(&redis, 100, 1000).await,
    );
    // 20 actions before anyone is in the room on instance a.
    let mut first = b.connect().await;
    let epoch =
        subscribe(&mut first, json!({"room": "feed:old"})).await["position"]["epoch"].clone();
    for n in 1..=20 {
        tick(&b, "feed:old", n).await;
    }
    let Some(patchbay::history::History::Redis(history)) = a.app.history.clone() else {
        panic!("history in Redis")
    };
    let before = history.reads();
    let mut clients = Vec::new();
    for _ in 0..50 {
        clients.push(a.connect().await);
    }
    // All at once, from the start of the room.
    for c in &mut clients {
        c.send(json!({"type": "@@patchbay/SUBSCRIBE_REQUEST", "payload": {"room": "feed:old", "since": {"epoch": epoch, "offset": 0}}, "meta": {"requestId": "r"}}))
            .await;
    }
    for c in &mut clients {
        let answer = c.recv().await;
        assert_eq!(answer["payload"]["recovered"], true, "{answer}");
        assert_eq!(answer["payload"]["replayed"], 20, "{answer}");
        let got = ticks(c, 20).await;
        assert_eq!(
            got.iter().map(|t| t.1).collect::<Vec<_>>(),
            (1..=20).collect::<Vec<_>>()
        );
    }
    let reads = history.reads() - before;
    // One to follow the room when it is first joined here, about one more for the first
    // recoveries; the rest are answered from what those reads brought.
    assert!(reads <= 4, "50 recoveries needed {reads} reads of Redis");
}

#[tokio::test]
async fn an_idle_client_older_than_the_history_ttl_recovers_with_nothing_to_replay() {
    let redis = RedisServer::start().await;
    let short = || {
        Bridge::start("{}", None, |c: &mut Config| {
            c.redis_url = Some(redis.url());
            c.publish_token = Some("tok".into());
            c.public_rooms = vec![RoomPattern::parse("feed:*").unwrap()];
            c.history = Some(patchbay::history::HistoryConfig {
                rooms: vec![RoomPattern::parse("feed:*").unwrap()],
                size: 100,
                ttl: Duration::from_secs(1),
                recover_max: 1000,
            });
        })
    };
    let (a, b) = (short().await, short().await);
    wait_ready_status(&a, "ok").await;
    wait_ready_status(&b, "ok").await;
    let mut idle = a.connect().await;
    let epoch =
        subscribe(&mut idle, json!({"room": "feed:ttl"})).await["position"]["epoch"].clone();
    tick(&a, "feed:ttl", 1).await;
    assert_eq!(ticks(&mut idle, 1).await, [(1, 1, false)]);
    drop(idle);
    // Longer than the history's TTL: the action is gone from Redis, the position is not.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    // On an instance that never followed the room (nothing of it in memory).
    let mut back = b.connect().await;
    let at = |offset: u64| json!({"room": "feed:ttl", "since": {"epoch": epoch, "offset": offset}});
    let got = subscribe(&mut back, at(1)).await;
    assert_eq!(
        got,
        json!({"room": "feed:ttl", "position": {"epoch": epoch, "offset": 1}, "recovered": true, "replayed": 0})
    );
    let mut older = b.connect().await;
    let got = subscribe(&mut older, at(0)).await;
    assert_eq!(got["reason"], "too_old", "{got}");
}

#[tokio::test]
async fn the_identity_room_recovering_while_redis_is_down_hears_unavailable() {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut redis = RedisServer::start().await;
    let bridge = Bridge::start("{}", None, |c: &mut Config| {
        with_jwt(c);
        c.redis_url = Some(redis.url());
    })
    .await;
    wait_ready_status(&bridge, "ok").await;
    let token = jwt(json!({"sub": "7", "exp": now() + 600}));
    let bridge = &bridge;
    let connect = |query: String| async move {
        let req = format!("{}?{query}", bridge.ws_url())
            .into_client_request()
            .unwrap();
        let stream = tokio::net::TcpStream::connect(bridge.addr).await.unwrap();
        let (ws, _) = tokio_tungstenite::client_async(req, stream).await.unwrap();
        let mut client = Client { ws };
        let hello = client.recv().await;
        assert_eq!(hello["type"], "@@patchbay/CONNECTED", "{hello}");
        hello
    };
    let hello = connect(format!("token={token}")).await;
    let position = hello["payload"]["positions"]["user:7"].clone();
    assert_eq!(position["offset"], 0, "{hello}");

    redis.kill();
    wait_ready_status(bridge, "degraded").await;
    let since = format!("{}:0", position["epoch"].as_str().unwrap());
    let hello = connect(format!("token={token}&since={since}")).await;
    assert_eq!(
        hello["payload"]["recovery"],
        json!({"room": "user:7", "recovered": false, "reason": "unavailable", "replayed": 0}),
        "{hello}"
    );
    assert!(hello["payload"].get("positions").is_none(), "{hello}");
}
