//! The Redis bus against a real redis-server.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use futures_util::StreamExt;
use patchbay::bus::{Bus, BusStatus, RedisBus};
use patchbay::outbox::{Outbox, QueueLimits};
use patchbay::rooms::{RoomPattern, Rooms};
use redis::aio::MultiplexedConnection;
use serde_json::{Value, json};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn a_publish_on_one_instance_reaches_a_client_on_another() {
    let redis = RedisServer::start().await;
    let start = || {
        Bridge::start("{}", None, |c| {
            c.redis_url = Some(redis.url());
            c.history = None;
            c.public_rooms = vec![RoomPattern::parse("lobby").unwrap()];
            c.publish_token = Some("tok".into());
        })
    };
    let (a, b) = (start().await, start().await);
    wait_ready_status(&a, "ok").await;
    wait_ready_status(&b, "ok").await;
    let mut ca = a.connect().await;
    let mut cb = b.connect().await;
    for c in [&mut ca, &mut cb] {
        let r = c
            .request("@@patchbay/SUBSCRIBE", json!({"room": "lobby"}))
            .await;
        assert_eq!(r["type"], "@@patchbay/SUBSCRIBE_SUCCESS", "{r}");
    }
    let body = json!({"rooms": ["lobby"], "action": {"type": "HELLO", "payload": 1}});
    let (status, _) = publish(&a, body).await;
    assert_eq!(status, 202);
    let mut ids = Vec::new();
    for c in [&mut ca, &mut cb] {
        let mut m = c.recv().await;
        // Every server-fired action carries an id, the same on every instance.
        let id = m["meta"]
            .as_object_mut()
            .and_then(|meta| meta.remove("id"))
            .unwrap();
        ids.push(id);
        assert_eq!(
            m,
            json!({"type": "HELLO", "payload": 1, "meta": {"room": "lobby"}})
        );
        assert_answers_ping(c).await;
    }
    assert_eq!(ids[0], ids[1]);
    assert!(uuid::Uuid::try_parse(ids[0].as_str().unwrap()).is_ok());
}

/// A bridge on `redis` with `public` rooms, a publish token, and limits high enough that the
/// bulk tests measure the bus, not the per-connection rate limiter.
async fn bridge_on(
    redis: &RedisServer,
    public: &[&str],
    tweak: impl FnOnce(&mut patchbay::Config),
) -> Bridge {
    let url = redis.url();
    let public: Vec<RoomPattern> = public
        .iter()
        .map(|p| RoomPattern::parse(p).unwrap())
        .collect();
    let bridge = Bridge::start("{}", None, |c| {
        c.redis_url = Some(url);
        c.history = None;
        c.public_rooms = public;
        c.publish_token = Some("tok".into());
        c.rate_per_sec = 100_000.0;
        c.rate_burst = 100_000;
        tweak(c);
    })
    .await;
    wait_ready_status(&bridge, "ok").await;
    bridge
}

/// Joins `room` and checks the success.
async fn join(client: &mut Client, room: &str) {
    let r = client
        .request("@@patchbay/SUBSCRIBE", json!({ "room": room }))
        .await;
    assert_eq!(r["type"], "@@patchbay/SUBSCRIBE_SUCCESS", "{r}");
    assert_eq!(r["payload"], json!({ "room": room }), "{r}");
}

/// Sends one request per room without waiting, then collects every reply: many changes reach
/// the bus at once, the way a busy instance sees them.
async fn pipelined(client: &mut Client, name: &str, rooms: Vec<String>) {
    let mut pending = std::collections::HashMap::new();
    for room in &rooms {
        let id = uuid::Uuid::new_v4().to_string();
        client
            .send(json!({"type": format!("{name}_REQUEST"), "payload": {"room": room}, "meta": {"requestId": id}}))
            .await;
        pending.insert(id, room.clone());
    }
    while !pending.is_empty() {
        let m = client.recv().await;
        let id = m["meta"]["requestId"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let room = pending
            .remove(&id)
            .unwrap_or_else(|| panic!("unexpected message {m}"));
        assert_eq!(m["type"], format!("{name}_SUCCESS"), "{m}");
        assert_eq!(m["payload"], json!({ "room": room }), "{m}");
    }
}

/// The next JSON message if one arrives within `limit`: lets a test fail fast, with a useful
/// message, when a push was lost.
async fn recv_within(client: &mut Client, limit: Duration) -> Option<Value> {
    let deadline = Instant::now() + limit;
    loop {
        let msg = tokio::time::timeout_at(deadline, client.ws.next())
            .await
            .ok()?;
        match msg {
            Some(Ok(Message::Text(t))) => return Some(serde_json::from_str(t.as_str()).unwrap()),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            other => panic!("expected a text message, got {other:?}"),
        }
    }
}

/// `PUBLISH` over an existing connection; returns how many subscribers Redis handed it to.
async fn publish_on(conn: &mut MultiplexedConnection, channel: &str, payload: &str) -> i64 {
    redis::cmd("PUBLISH")
        .arg(channel)
        .arg(payload)
        .query_async(conn)
        .await
        .unwrap()
}

/// The channels matching `pattern` that some client is subscribed to, as Redis sees them.
async fn pubsub_channels(conn: &mut MultiplexedConnection, pattern: &str) -> BTreeSet<String> {
    redis::cmd("PUBSUB")
        .arg("CHANNELS")
        .arg(pattern)
        .query_async::<Vec<String>>(conn)
        .await
        .unwrap()
        .into_iter()
        .collect()
}

#[tokio::test]
async fn publishes_reach_each_client_on_every_instance_exactly_once() {
    let redis = RedisServer::start().await;
    let a = bridge_on(&redis, &["lobby", "side"], |_| {}).await;
    let b = bridge_on(&redis, &["lobby", "side"], |_| {}).await;
    let mut ca = a.connect().await;
    let mut cb = b.connect().await;
    join(&mut ca, "lobby").await;
    join(&mut cb, "lobby").await;
    // cb is in both target rooms of the multi-room publish below.
    join(&mut cb, "side").await;

    let publish = |body: Value| {
        let a = &a;
        async move {
            let (status, reply) = common::publish(a, body).await;
            assert_eq!(status, 202, "{reply}");
        }
    };
    publish(json!({"rooms": ["lobby"], "action": {"type": "VIA_HTTP", "payload": 1}})).await;
    for c in [&mut ca, &mut cb] {
        let mut got = c.recv().await;
        assert!(got["meta"]["id"].is_string(), "{got}");
        got["meta"].as_object_mut().unwrap().remove("id");
        assert_eq!(
            got,
            json!({"type": "VIA_HTTP", "payload": 1, "meta": {"room": "lobby"}})
        );
        assert_answers_ping(c).await;
    }

    // Any service can fire an action with a bare PUBLISH on the room's channel.
    redis
        .publish(
            "patchbay:room:lobby",
            r#"{"type":"VIA_REDIS","payload":{"n":2},"meta":{"trace":"x"}}"#,
        )
        .await;
    for c in [&mut ca, &mut cb] {
        assert_eq!(
            c.recv().await,
            json!({"type": "VIA_REDIS", "payload": {"n": 2}, "meta": {"trace": "x", "room": "lobby"}})
        );
        assert_answers_ping(c).await;
    }

    // Several rooms: one envelope per room channel, yet one delivery per connection.
    publish(json!({"rooms": ["lobby", "side"], "action": {"type": "BOTH"}})).await;
    for c in [&mut ca, &mut cb] {
        let mut got = c.recv().await;
        assert!(got["meta"]["id"].is_string(), "{got}");
        got["meta"].as_object_mut().unwrap().remove("id");
        assert_eq!(got, json!({"type": "BOTH", "meta": {"room": "lobby"}}));
        assert_answers_ping(c).await;
    }
}

/// Progress messages in the test of task progress.
const PROGRESS_COUNT: usize = 1000;

/// The `n`th progress report of task 7, as its worker publishes it.
fn progress(n: usize) -> Value {
    json!({"id": "7", "title": "t", "userId": "42", "type": "demo", "status": "running",
           "progress": {"percent": n * 100 / PROGRESS_COUNT, "step": n}})
}

/// Reads every progress report, in order, as reached through `room`, and nothing else.
async fn read_progress(client: &mut Client, room: &str) {
    for n in 0..PROGRESS_COUNT {
        let m = client.recv().await;
        assert_eq!(
            m,
            json!({"type": "TASK_PROGRESS", "payload": progress(n), "meta": {"room": room}}),
            "message {n} in room {room}"
        );
    }
    assert_answers_ping(client).await;
}

#[tokio::test]
async fn a_thousand_task_progress_messages_arrive_in_order_once_per_connection() {
    let redis = RedisServer::start().await;
    let bridge = bridge_on(&redis, &["task:*", "user:*"], |_| {}).await;
    let mut task_only = bridge.connect().await;
    join(&mut task_only, "task:7").await;
    let mut both = bridge.connect().await;
    join(&mut both, "task:7").await;
    join(&mut both, "user:42").await;
    let mut user_only = bridge.connect().await;
    join(&mut user_only, "user:42").await;

    let mut conn = redis.connection().await.unwrap();
    // A worker publishes as fast as one connection allows while the clients are reading.
    let worker = tokio::spawn(async move {
        for n in 0..PROGRESS_COUNT {
            publish_on(&mut conn, "tasks.7", &progress(n).to_string()).await;
        }
    });
    tokio::join!(
        read_progress(&mut task_only, "task:7"),
        read_progress(&mut both, "task:7"),
        read_progress(&mut user_only, "user:42"),
    );
    worker.await.unwrap();
}

#[tokio::test]
async fn a_multi_room_envelope_reaches_each_connection_once_and_repeats_are_ignored() {
    let redis = RedisServer::start().await;
    let bridge = bridge_on(&redis, &["a", "b"], |_| {}).await;
    let mut in_both = bridge.connect().await;
    join(&mut in_both, "a").await;
    join(&mut in_both, "b").await;
    let mut in_b = bridge.connect().await;
    join(&mut in_b, "b").await;
    let mut conn = redis.connection().await.unwrap();

    // An outside service fans out the way the contract says: the same envelope on each channel.
    let envelope = |id: &str, rooms: &[&str], n: i64| {
        json!({"id": id, "rooms": rooms, "action": {"type": "NOTE", "payload": n, "meta": {"trace": id}}}).to_string()
    };
    let fan_out = |conn: &mut MultiplexedConnection,
                   id: &'static str,
                   rooms: &'static [&'static str],
                   n: i64| {
        let payload = envelope(id, rooms, n);
        let mut conn = conn.clone();
        async move {
            for room in rooms {
                publish_on(&mut conn, &format!("patchbay:room:{room}"), &payload).await;
            }
        }
    };
    // The envelope's id is the action's meta.id.
    let expect = |n: i64, id: &str, room: &str| json!({"type": "NOTE", "payload": n, "meta": {"trace": id, "room": room, "id": id}});

    fan_out(&mut conn, "e1", &["a", "b"], 1).await;
    assert_eq!(in_both.recv().await, expect(1, "e1", "a"));
    assert_eq!(in_b.recv().await, expect(1, "e1", "b"));

    // The same id again, on both channels: already delivered.
    fan_out(&mut conn, "e1", &["a", "b"], 1).await;
    // A new id proves the repeats were skipped rather than still in flight; the first target
    // room the connection is in names it, whatever order the channels were published in.
    fan_out(&mut conn, "e2", &["b", "a"], 2).await;
    assert_eq!(in_both.recv().await, expect(2, "e2", "b"));
    assert_eq!(in_b.recv().await, expect(2, "e2", "b"));
    assert_answers_ping(&mut in_both).await;
    assert_answers_ping(&mut in_b).await;
}

/// Messages the bus must drop, each as (channel, payload); none may reach a client or stop the
/// next one.
const MALFORMED: &[(&str, &str)] = &[
    ("patchbay:room:m", "not json"),
    ("patchbay:room:m", "[1,2,3]"),
    ("patchbay:room:m", r#"{"payload":{"no":"type"}}"#),
    (
        "patchbay:room:m",
        r#"{"id":"bad-envelope","rooms":["m","has space"],"action":{"type":"NOPE"}}"#,
    ),
    ("tasks.9", r#"["not","an","object"]"#),
    ("tasks.9", "not json either"),
    (
        "tasks.",
        r#"{"id":"","title":"t","userId":"9u","status":"running"}"#,
    ),
];

#[tokio::test]
async fn malformed_bus_messages_are_dropped_and_delivery_goes_on() {
    let redis = RedisServer::start().await;
    let bridge = bridge_on(&redis, &["m", "task:*", "user:*"], |_| {}).await;
    let mut client = bridge.connect().await;
    // Also in the rooms a careless parser would address: `task:` (an empty task id) and the
    // user of the empty-id task.
    for room in ["m", "task:9", "task:", "user:9u"] {
        join(&mut client, room).await;
    }
    let mut conn = redis.connection().await.unwrap();
    for (i, (channel, payload)) in MALFORMED.iter().enumerate() {
        publish_on(&mut conn, channel, payload).await;
        // After every bad message a good one on each kind of channel still gets through, and
        // nothing else came before it.
        publish_on(
            &mut conn,
            "patchbay:room:m",
            &json!({"type": "OK", "payload": i}).to_string(),
        )
        .await;
        assert_eq!(
            client.recv().await,
            json!({"type": "OK", "payload": i, "meta": {"room": "m"}}),
            "after {payload:?} on {channel}"
        );
        publish_on(
            &mut conn,
            "tasks.9",
            &json!({"id": "9", "step": i}).to_string(),
        )
        .await;
        assert_eq!(
            client.recv().await,
            json!({"type": "TASK_PROGRESS", "payload": {"id": "9", "step": i}, "meta": {"room": "task:9"}}),
            "after {payload:?} on {channel}"
        );
    }
    assert_answers_ping(&mut client).await;
}

/// The `malformed` counter is not reachable through `App` (it holds the bus as `dyn Bus`), so
/// this drives a standalone Redis bus with one registered outbox.
#[tokio::test]
async fn malformed_bus_messages_are_counted() {
    let redis = RedisServer::start().await;
    let rooms = Arc::new(Rooms::default());
    let (outbox, mut rx) = Outbox::new(QueueLimits {
        frames: 64,
        bytes: 1 << 20,
    });
    rooms.register(1, outbox);
    let target = patchbay::bus::RedisTarget::open(&redis.url(), &Default::default()).unwrap();
    let bus = RedisBus::start(
        &target,
        "patchbay",
        "tasks.*",
        1000,
        rooms.clone(),
        Default::default(),
    );
    let deadline = Instant::now() + WAIT;
    while bus.status() != BusStatus::Connected {
        assert!(Instant::now() < deadline, "the bus never connected");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for room in ["m", "task:9", "task:", "user:9u"] {
        rooms.join(1, room, usize::MAX).unwrap();
        bus.subscribe(room).await.unwrap();
    }
    let mut conn = redis.connection().await.unwrap();
    for (channel, payload) in MALFORMED {
        publish_on(&mut conn, channel, payload).await;
    }
    publish_on(&mut conn, "patchbay:room:m", r#"{"type":"OK"}"#).await;
    // One pub/sub connection delivers in order: once OK is out, every bad message was seen.
    let first = tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("OK in time")
        .unwrap();
    assert_eq!(
        first,
        patchbay::outbox::Text::from(r#"{"type":"OK","meta":{"room":"m"}}"#)
    );
    assert!(rx.try_recv().is_none(), "nothing else was delivered");
    let counters = bus.counters();
    assert_eq!(
        counters
            .malformed
            .load(std::sync::atomic::Ordering::Relaxed),
        MALFORMED.len() as u64
    );
    assert_eq!(
        counters.received.load(std::sync::atomic::Ordering::Relaxed),
        MALFORMED.len() as u64 + 1
    );
}

/// Polls `/readyz` until `want` (status and bus) or `limit` passes.
async fn ready_within(bridge: &Bridge, want: Value, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let (code, body) = http_get(&bridge.http_url("/readyz")).await;
        if body == want {
            assert_eq!(code, 200, "{body}");
            return;
        }
        assert!(
            Instant::now() < deadline,
            "readyz is {body}, wanted {want} within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_redis_outage_degrades_then_recovers_without_reconnecting_clients() {
    let mut redis = RedisServer::start().await;
    let upstream = Upstream::start().await;
    let url = redis.url();
    let bridge = Bridge::start(MANIFEST, Some(upstream.url()), |c| {
        c.redis_url = Some(url);
        c.history = None;
        c.public_rooms = vec![RoomPattern::parse("task:*").unwrap()];
    })
    .await;
    ready_within(&bridge, json!({"status": "ok", "bus": "connected"}), WAIT).await;
    let mut client = bridge.connect().await;
    join(&mut client, "task:5").await;
    redis
        .publish("patchbay:room:task:5", r#"{"type":"BEFORE"}"#)
        .await;
    assert_eq!(
        client.recv().await,
        json!({"type": "BEFORE", "meta": {"room": "task:5"}})
    );

    redis.kill();
    ready_within(
        &bridge,
        json!({"status": "degraded", "bus": "disconnected"}),
        WAIT,
    )
    .await;
    // Requests are still served; only pushes pause.
    let r = client.request("TASKS_FETCH", json!({"page": 1})).await;
    assert_eq!(r["type"], "TASKS_FETCH_SUCCESS", "{r}");
    assert_eq!(r["payload"]["page"], 1, "{r}");
    let r = client
        .request("@@patchbay/SUBSCRIBE", json!({"room": "task:6"}))
        .await;
    assert_failure(&r, "@@patchbay/SUBSCRIBE", "upstream_unavailable");

    redis.restart().await;
    // Backoff is capped at 5 s, so reconnecting well within the wait is part of the contract.
    ready_within(&bridge, json!({"status": "ok", "bus": "connected"}), WAIT).await;
    let mut conn = redis.connection().await.unwrap();
    // Only the room still in use is subscribed again, not the one whose join was refused.
    assert_eq!(
        pubsub_channels(&mut conn, "patchbay:room:*").await,
        BTreeSet::from(["patchbay:room:task:5".to_string()])
    );
    publish_on(&mut conn, "patchbay:room:task:5", r#"{"type":"AFTER"}"#).await;
    assert_eq!(
        client.recv().await,
        json!({"type": "AFTER", "meta": {"room": "task:5"}})
    );
    // Joining works again too.
    join(&mut client, "task:6").await;
    publish_on(&mut conn, "patchbay:room:task:6", r#"{"type":"NEW"}"#).await;
    assert_eq!(
        client.recv().await,
        json!({"type": "NEW", "meta": {"room": "task:6"}})
    );
    assert_answers_ping(&mut client).await;
}

/// A SUBSCRIBE refused during an outage must not take the connection out of a room it had
/// already joined: the client was told "try again", not "you left".
#[tokio::test]
async fn a_refused_subscribe_during_an_outage_keeps_rooms_already_joined() {
    let mut redis = RedisServer::start().await;
    let bridge = bridge_on(&redis, &["task:*"], |_| {}).await;
    let mut client = bridge.connect().await;
    join(&mut client, "task:5").await;

    redis.kill();
    wait_ready_status(&bridge, "degraded").await;
    let r = client
        .request("@@patchbay/SUBSCRIBE", json!({"room": "task:5"}))
        .await;
    assert_failure(&r, "@@patchbay/SUBSCRIBE", "upstream_unavailable");

    redis.restart().await;
    wait_ready_status(&bridge, "ok").await;
    let mut conn = redis.connection().await.unwrap();
    publish_on(&mut conn, "patchbay:room:task:5", r#"{"type":"AFTER"}"#).await;
    let got = recv_within(&mut client, Duration::from_secs(3)).await;
    let subscribed = pubsub_channels(&mut conn, "patchbay:room:*").await;
    assert_eq!(
        got,
        Some(json!({"type": "AFTER", "meta": {"room": "task:5"}})),
        "the connection was dropped from task:5; channels subscribed on Redis: {subscribed:?}"
    );
}

#[tokio::test]
async fn subscribe_success_means_the_redis_subscription_is_active() {
    let redis = RedisServer::start().await;
    let bridge = bridge_on(&redis, &["r:*"], |_| {}).await;
    let mut client = bridge.connect().await;
    let mut conn = redis.connection().await.unwrap();
    for i in 0..50 {
        let room = format!("r:{i}");
        join(&mut client, &room).await;
        // Published the moment SUCCESS is read: Redis must already have the subscription.
        let receivers = publish_on(
            &mut conn,
            &format!("patchbay:room:{room}"),
            &json!({"type": "HI", "payload": i}).to_string(),
        )
        .await;
        assert_eq!(
            receivers, 1,
            "room {room} was not subscribed when SUCCESS arrived"
        );
        assert_eq!(
            client.recv().await,
            json!({"type": "HI", "payload": i, "meta": {"room": room}})
        );
    }
    assert_answers_ping(&mut client).await;
}

/// Leaving and at once rejoining a room: the SUCCESS of the rejoin must not be undone by the
/// unsubscribe of the leave that the bus is still carrying out.
#[tokio::test]
async fn leaving_and_rejoining_at_once_keeps_the_room_subscribed() {
    let redis = RedisServer::start().await;
    let bridge = bridge_on(&redis, &["r:*"], |_| {}).await;
    let mut client = bridge.connect().await;
    let mut conn = redis.connection().await.unwrap();
    let started = Instant::now();
    for i in 0..200 {
        let room = format!("r:{i}");
        join(&mut client, &room).await;
        // Both frames back to back, so the leave's unsubscribe is still in flight on the bus
        // when the join asks for the room again.
        client
            .send(json!({"type": "@@patchbay/UNSUBSCRIBE_REQUEST", "payload": {"room": room}, "meta": {"requestId": "u"}}))
            .await;
        client
            .send(json!({"type": "@@patchbay/SUBSCRIBE_REQUEST", "payload": {"room": room}, "meta": {"requestId": "s"}}))
            .await;
        let mut replies = BTreeSet::new();
        while replies.len() < 2 {
            let m = client.recv().await;
            assert!(
                m["type"].as_str().is_some_and(|t| t.ends_with("_SUCCESS")),
                "{m}"
            );
            replies.insert(m["meta"]["requestId"].as_str().unwrap().to_string());
        }
        let payload = json!({"type": "HI", "payload": i}).to_string();
        publish_on(&mut conn, &format!("patchbay:room:{room}"), &payload).await;
        let got = recv_within(&mut client, Duration::from_secs(3)).await;
        let subscribed = pubsub_channels(&mut conn, "patchbay:room:*").await;
        assert_eq!(
            got,
            Some(json!({"type": "HI", "payload": i, "meta": {"room": room}})),
            "iteration {i}: joined {room} again but its pushes are lost; \
             channels subscribed on Redis: {subscribed:?}"
        );
        if started.elapsed() > Duration::from_secs(8) {
            break; // enough attempts on a slow machine
        }
    }
    assert_answers_ping(&mut client).await;
}

#[tokio::test]
async fn redis_subscriptions_follow_the_rooms_in_use() {
    let redis = RedisServer::start().await;
    let bridge = bridge_on(&redis, &["r:*"], |_| {}).await;
    let rooms = |range: std::ops::Range<usize>| range.map(|i| format!("r:{i}")).collect::<Vec<_>>();
    let (mut a, mut b, mut c) = (
        bridge.connect().await,
        bridge.connect().await,
        bridge.connect().await,
    );

    // Overlapping joins, all at once.
    tokio::join!(
        pipelined(&mut a, "@@patchbay/SUBSCRIBE", rooms(0..120)),
        pipelined(&mut b, "@@patchbay/SUBSCRIBE", rooms(80..200)),
        pipelined(&mut c, "@@patchbay/SUBSCRIBE", rooms(40..160)),
    );
    let mut conn = redis.connection().await.unwrap();
    let all: BTreeSet<String> = rooms(0..200)
        .iter()
        .map(|r| format!("patchbay:room:{r}"))
        .collect();
    assert_eq!(pubsub_channels(&mut conn, "patchbay:room:*").await, all);

    // Leaves, a disconnect and joins racing on the same rooms: r:150..160 loses b and c while a
    // joins it.
    drop(c);
    tokio::join!(
        async {
            pipelined(&mut a, "@@patchbay/UNSUBSCRIBE", rooms(0..60)).await;
            pipelined(&mut a, "@@patchbay/SUBSCRIBE", rooms(150..160)).await;
        },
        pipelined(&mut b, "@@patchbay/UNSUBSCRIBE", rooms(150..200)),
    );
    // a: 60..120 and 150..160; b: 80..150.
    let in_use: BTreeSet<String> = rooms(60..160)
        .iter()
        .map(|r| format!("patchbay:room:{r}"))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let channels = pubsub_channels(&mut conn, "patchbay:room:*").await;
        if channels == in_use {
            break;
        }
        if Instant::now() >= deadline {
            let missing: Vec<_> = in_use.difference(&channels).collect();
            let extra: Vec<_> = channels.difference(&in_use).collect();
            panic!(
                "subscribed channels differ from rooms in use: missing {missing:?}, extra {extra:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let numpat: i64 = redis::cmd("PUBSUB")
        .arg("NUMPAT")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(numpat, 1, "only the task pattern");
    assert_answers_ping(&mut a).await;
    assert_answers_ping(&mut b).await;
}

#[tokio::test]
async fn the_redis_prefix_names_the_room_channels() {
    let redis = RedisServer::start().await;
    let bridge = bridge_on(&redis, &["x"], |c| c.redis_prefix = "app1".into()).await;
    let mut client = bridge.connect().await;
    join(&mut client, "x").await;
    let mut conn = redis.connection().await.unwrap();
    let other = publish_on(&mut conn, "patchbay:room:x", r#"{"type":"WRONG"}"#).await;
    assert_eq!(other, 0, "nobody listens on the default prefix");
    publish_on(&mut conn, "app1:room:x", r#"{"type":"RIGHT"}"#).await;
    // RIGHT comes first: WRONG, published before it, never arrives.
    assert_eq!(
        client.recv().await,
        json!({"type": "RIGHT", "meta": {"room": "x"}})
    );
    assert_answers_ping(&mut client).await;
    // The room's channel and the instance's own (SSE posts forwarded from other instances),
    // both under the prefix.
    let channels = pubsub_channels(&mut conn, "*").await;
    assert_eq!(channels.len(), 2, "{channels:?}");
    assert!(channels.contains("app1:room:x"), "{channels:?}");
    assert!(
        channels
            .iter()
            .all(|c| c.starts_with("app1:room:") || c.starts_with("app1:ssei:")),
        "{channels:?}"
    );
}

/// The health check pings Redis every few seconds on the subscribed connection (where Redis
/// answers PING with an array, not a string): the connection must survive it, not be replaced.
#[tokio::test]
async fn the_pubsub_connection_survives_its_health_checks() {
    let redis = RedisServer::start().await;
    let bridge = Bridge::start("{}", None, |c| {
        c.redis_url = Some(redis.url());
        c.history = None;
    })
    .await;
    wait_ready_status(&bridge, "ok").await;
    tokio::time::sleep(Duration::from_millis(6500)).await;
    let mut conn = redis.connection().await.unwrap();
    let clients: String = redis::cmd("CLIENT")
        .arg("LIST")
        .arg("TYPE")
        .arg("pubsub")
        .query_async(&mut conn)
        .await
        .unwrap();
    let ages: Vec<u64> = clients
        .lines()
        .filter_map(|l| l.split(' ').find_map(|kv| kv.strip_prefix("age=")))
        .map(|a| a.parse().unwrap())
        .collect();
    assert_eq!(ages.len(), 1, "one pub/sub connection: {clients}");
    assert!(
        ages[0] >= 6,
        "the pub/sub connection was replaced: {clients}"
    );
    assert_eq!(wait_ready_status(&bridge, "ok").await["bus"], "connected");
}

/// Redis closes idle connections by itself (`timeout`) and operators kill them: the command
/// connection must come back by itself, and the publish after it must not fail.
#[tokio::test]
async fn publish_works_after_redis_closes_the_command_connection() {
    let redis = RedisServer::start().await;
    let bridge = bridge_on(&redis, &["lobby"], |_| {}).await;
    let mut client = bridge.connect().await;
    join(&mut client, "lobby").await;
    let body = |n: u32| json!({"rooms": ["lobby"], "action": {"type": "N", "payload": n}});
    let mut n = 0;
    let mut publish_and_receive = async |what: &str| {
        n += 1;
        let (status, reply) = publish(&bridge, body(n)).await;
        assert_eq!(status, 202, "publish {n} {what}: {reply}");
        assert_eq!(client.recv().await["payload"], n, "{what}");
    };
    publish_and_receive("before anything happens").await;

    let mut admin = redis.connection().await.unwrap();
    let killed: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("normal")
        .query_async(&mut admin)
        .await
        .unwrap();
    assert!(killed >= 1, "the command connection was killed");
    publish_and_receive("right after CLIENT KILL").await;
    publish_and_receive("again").await;

    // Redis's own idle timeout, as production configures it: every idle normal connection
    // is closed after a second (pub/sub connections are exempt).
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("timeout")
        .arg("1")
        .query_async(&mut admin)
        .await
        .unwrap();
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(2500)).await;
        publish_and_receive("after an idle timeout").await;
    }
    let (code, ready) = http_get(&bridge.http_url("/readyz")).await;
    assert_eq!(
        (code, ready),
        (200, json!({"status": "ok", "bus": "connected"}))
    );
}

/// A wrong password or a missing ACL permission is a bad rollout: `/readyz` must fail with
/// the reason (503 `failed`), unlike a network blip (200 `degraded`).
#[tokio::test]
async fn a_redis_that_refuses_patchbay_fails_readiness_with_the_reason() {
    let password = "the-right-password";
    let redis = RedisServer::start_with(&["--requirepass", password], Some(password)).await;
    let failed_with = async |url: String, expect: &str| {
        let bridge = Bridge::start("{}", None, |c| {
            c.redis_url = Some(url);
            c.history = None;
        })
        .await;
        let (code, body) = readyz_until(&bridge, WAIT, |_, b| b["status"] != "ok").await;
        let (code, body) = if body["status"] == "failed" {
            (code, body)
        } else {
            readyz_until(&bridge, WAIT, |_, b| b["status"] == "failed").await
        };
        assert_eq!(code, 503, "{body}");
        assert_eq!(body["bus"], "disconnected", "{body}");
        let reason = body["reason"].as_str().unwrap();
        assert!(reason.contains(expect), "{reason}");
        assert!(!reason.contains(password), "{reason}");
    };
    failed_with(redis.url_without_password(), "requires authentication").await;
    failed_with(
        format!("redis://:wrong-password@127.0.0.1:{}", redis.port),
        "credentials",
    )
    .await;

    // Users without a permission patchbay needs: subscribing, or publishing.
    let mut admin = redis.connection().await.unwrap();
    for (user, rule) in [("nosub", "-psubscribe"), ("nopub", "-eval")] {
        let _: () = redis::cmd("ACL")
            .arg("SETUSER")
            .arg(user)
            .arg("on")
            .arg(">their-password")
            .arg("~*")
            .arg("&*")
            .arg("+@all")
            .arg(rule)
            .query_async(&mut admin)
            .await
            .unwrap();
        failed_with(
            format!("redis://{user}:their-password@127.0.0.1:{}", redis.port),
            "ACL permission",
        )
        .await;
    }

    // The right password: ready.
    let bridge = Bridge::start("{}", None, |c| {
        c.redis_url = Some(redis.url());
        c.history = None;
    })
    .await;
    ready_within(&bridge, json!({"status": "ok", "bus": "connected"}), WAIT).await;
}

/// One publish to many rooms reaches every member once, and travels through Redis as one
/// envelope on each room's channel (patchbay sends it once: see BENCHMARKS.md for its memory).
#[tokio::test]
async fn a_publish_to_a_thousand_rooms_reaches_each_member_once() {
    let redis = RedisServer::start().await;
    let bridge = bridge_on(&redis, &["r:*"], |c| c.max_rooms = 600).await;
    let other = bridge_on(&redis, &["r:*"], |c| c.max_rooms = 600).await;
    let rooms: Vec<String> = (0..1000).map(|i| format!("r:{i}")).collect();
    let mut a = bridge.connect().await;
    let mut b = other.connect().await;
    pipelined(&mut a, "@@patchbay/SUBSCRIBE", rooms[..500].to_vec()).await;
    pipelined(&mut b, "@@patchbay/SUBSCRIBE", rooms[250..750].to_vec()).await;
    let mut watcher = redis::Client::open(redis.url())
        .unwrap()
        .get_async_pubsub()
        .await
        .unwrap();
    watcher.subscribe("patchbay:room:r:999").await.unwrap();

    let filler = "x".repeat(40 * 1024);
    let mut admin = redis.connection().await.unwrap();
    let received_by_redis = async |admin: &mut MultiplexedConnection| -> u64 {
        let info: String = redis::cmd("INFO")
            .arg("stats")
            .query_async(admin)
            .await
            .unwrap();
        info.lines()
            .find_map(|l| l.strip_prefix("total_net_input_bytes:"))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    let before = received_by_redis(&mut admin).await;
    let (status, body) = publish(
        &bridge,
        json!({"rooms": rooms, "action": {"type": "WIDE", "payload": filler}}),
    )
    .await;
    assert_eq!((status, body), (202, json!({"rooms": 1000})));
    // The body travelled to Redis once, not once per room (that would be 40 MB).
    let sent = received_by_redis(&mut admin).await - before;
    assert!(
        sent < 4 * filler.len() as u64,
        "{sent} bytes reached Redis for one publish of {} bytes",
        filler.len()
    );
    for (client, first) in [(&mut a, "r:0"), (&mut b, "r:250")] {
        let got = client.recv().await;
        assert_eq!(got["type"], "WIDE");
        assert_eq!(got["meta"]["room"], first, "the first target room it is in");
        assert_eq!(got["payload"].as_str().unwrap().len(), filler.len());
        assert_answers_ping(client).await;
    }
    // An outside subscriber of one room's channel sees the envelope.
    let msg = tokio::time::timeout(WAIT, watcher.on_message().next())
        .await
        .unwrap()
        .unwrap();
    let envelope: Value = serde_json::from_slice(msg.get_payload_bytes()).unwrap();
    assert_eq!(envelope["rooms"].as_array().unwrap().len(), 1000);
    assert_eq!(envelope["action"]["type"], "WIDE");
    assert!(envelope["id"].is_string());

    // An envelope naming more than PATCHBAY_MAX_PUBLISH_ROOMS rooms is dropped by receivers.
    let too_many: Vec<String> = (0..1001).map(|i| format!("r:{i}")).collect();
    let oversized = json!({"id": "too-many", "rooms": too_many, "action": {"type": "NO"}});
    publish_on(&mut admin, "patchbay:room:r:0", &oversized.to_string()).await;
    publish_on(&mut admin, "patchbay:room:r:0", r#"{"type":"YES"}"#).await;
    assert_eq!(
        a.recv().await["type"],
        "YES",
        "the oversized envelope was dropped"
    );
}

/// An action larger than a connection's whole send queue is dropped for that connection and
/// counted; the connection stays open (it used to be closed with 4008, and so was every
/// other member of the room).
#[tokio::test]
async fn an_action_too_large_for_the_send_queue_is_dropped_not_a_4008() {
    let redis = RedisServer::start().await;
    let bridge = bridge_on(&redis, &["lobby"], |c| c.send_queue_bytes = 64 * 1024).await;
    let mut members = Vec::new();
    for _ in 0..3 {
        let mut client = bridge.connect().await;
        join(&mut client, "lobby").await;
        members.push(client);
    }
    let huge = json!({"type": "HUGE", "payload": "x".repeat(100 * 1024)}).to_string();
    redis.publish("patchbay:room:lobby", &huge).await;
    redis
        .publish("patchbay:room:lobby", r#"{"type":"SMALL"}"#)
        .await;
    for client in &mut members {
        assert_eq!(
            client.recv().await,
            json!({"type": "SMALL", "meta": {"room": "lobby"}}),
            "the huge one was skipped, the next one arrives"
        );
        assert_answers_ping(client).await;
    }
    let metrics = bridge.app.metrics.render();
    assert!(
        metrics.contains("patchbay_deliveries_oversize_total 3"),
        "{metrics}"
    );
    assert!(!metrics.contains(r#"reason="slow""#), "{metrics}");
}
