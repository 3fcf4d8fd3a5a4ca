//! Presence on Redis (contract section 9) with several instances on one real `redis-server`:
//! one presence per user however many instances its connections are on, the grace honoured
//! across instances, the presences of a SIGKILLed instance leaving once with `timeout`, and a
//! client's view (snapshot, then newer events) equal to the server's under churn.

mod common;

use std::collections::{HashMap, HashSet};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::tasks::connect_as;
use common::*;
use patchbay::rooms::RoomPattern;
use serde_json::{Value, json};

const GRACE: Duration = Duration::from_millis(400);
const TOKEN: &str = "a publish token of 29 bytes!!";

async fn instance(redis: &RedisServer) -> Bridge {
    let bridge = Bridge::start("{}", None, |c| {
        with_jwt(c);
        c.redis_url = Some(redis.url());
        c.public_rooms = vec![RoomPattern::parse("doc:*").unwrap()];
        c.presence = Some(patchbay::presence::PresenceConfig {
            rooms: vec![RoomPattern::parse("doc:*").unwrap()],
            grace: GRACE,
        });
        c.publish_token = Some(TOKEN.into());
    })
    .await;
    wait_ready_status(&bridge, "ok").await;
    bridge
}

/// A member's view of a room's presence: the snapshot, then every event with a greater version.
#[derive(Default)]
struct View {
    version: u64,
    users: HashMap<String, Value>,
}

impl View {
    fn from_snapshot(snapshot: &Value) -> View {
        View {
            version: snapshot["version"].as_u64().unwrap(),
            users: snapshot["users"]
                .as_array()
                .unwrap()
                .iter()
                .map(|u| {
                    (
                        u["userId"].as_str().unwrap().to_string(),
                        u["state"].clone(),
                    )
                })
                .collect(),
        }
    }

    /// Applies `event` if it is newer; returns whether it was.
    fn apply(&mut self, event: &Value) -> bool {
        let p = &event["payload"];
        let version = p["version"].as_u64().unwrap();
        if version <= self.version {
            return false;
        }
        self.version = version;
        let user = p["userId"].as_str().unwrap().to_string();
        match event["type"].as_str().unwrap() {
            "@@patchbay/PRESENCE_LEAVE" => {
                self.users.remove(&user);
            }
            _ => {
                self.users.insert(user, p["state"].clone());
            }
        }
        true
    }

    fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.users.keys().cloned().collect();
        names.sort();
        names
    }
}

async fn join(client: &mut Client, room: &str) -> View {
    let reply = client
        .request("@@patchbay/SUBSCRIBE", json!({ "room": room }))
        .await;
    assert_eq!(reply["type"], "@@patchbay/SUBSCRIBE_SUCCESS", "{reply}");
    View::from_snapshot(&reply["payload"]["presence"])
}

/// The next presence event newer than `view` (applied to it).
async fn news(client: &mut Client, view: &mut View) -> Value {
    loop {
        let m = client.recv().await;
        if m["type"]
            .as_str()
            .is_some_and(|t| t.starts_with("@@patchbay/PRESENCE_"))
            && view.apply(&m)
        {
            return m["payload"].clone();
        }
    }
}

/// No newer presence event for `client` within `wait` (a ping proves the socket is alive).
async fn no_news(client: &mut Client, view: &mut View, wait: Duration) {
    let deadline = Instant::now() + wait;
    while Instant::now() < deadline {
        let left = deadline - Instant::now();
        match tokio::time::timeout(left, client.recv()).await {
            Ok(m) => assert!(
                !(m["type"]
                    .as_str()
                    .unwrap_or("")
                    .starts_with("@@patchbay/PRESENCE_")
                    && view.apply(&m)),
                "unexpected {m}"
            ),
            Err(_) => break,
        }
    }
}

/// The next text message before `deadline`, or `None`.
async fn recv_until(client: &mut Client, deadline: tokio::time::Instant) -> Option<Value> {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    loop {
        match tokio::time::timeout_at(deadline, client.ws.next()).await {
            Err(_) => return None,
            Ok(Some(Ok(Message::Text(t)))) => {
                return Some(serde_json::from_str(t.as_str()).unwrap());
            }
            Ok(Some(Ok(_))) => continue,
            Ok(other) => panic!("the observer's connection ended: {other:?}"),
        }
    }
}

async fn server_view(bridge: &Bridge, room: &str) -> Value {
    let auth = format!("Bearer {TOKEN}");
    let (status, body) = http_call(
        "GET",
        &bridge.http_url(&format!("/presence/{room}")),
        &[("authorization", &auth)],
        "",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    body
}

#[tokio::test]
async fn a_user_on_several_instances_is_present_once() {
    let redis = RedisServer::start().await;
    let (a, b) = (instance(&redis).await, instance(&redis).await);
    let mut alice = connect_as(&a, "alice").await;
    let mut view = join(&mut alice, "doc:1").await;

    let mut bob_b = connect_as(&b, "bob").await;
    let snapshot = join(&mut bob_b, "doc:1").await;
    assert_eq!(snapshot.names(), ["alice", "bob"]);
    let joined = news(&mut alice, &mut view).await;
    assert_eq!(joined["userId"], "bob");
    assert_eq!(joined["reason"], Value::Null);
    assert_eq!(
        joined["version"], snapshot.version,
        "the same version everywhere"
    );

    // A second connection of bob on the other instance, then the first one leaving: no event.
    let mut bob_a = connect_as(&a, "bob").await;
    join(&mut bob_a, "doc:1").await;
    let left = bob_b
        .request("@@patchbay/UNSUBSCRIBE", json!({"room": "doc:1"}))
        .await;
    assert_eq!(left["type"], "@@patchbay/UNSUBSCRIBE_SUCCESS");
    no_news(&mut alice, &mut view, Duration::from_millis(300)).await;
    assert_eq!(view.names(), ["alice", "bob"]);

    // State set on one instance reaches members on both.
    let reply = bob_a
        .request(
            "@@patchbay/PRESENCE_SET",
            json!({"room": "doc:1", "state": {"typing": true}}),
        )
        .await;
    assert_eq!(reply["type"], "@@patchbay/PRESENCE_SET_SUCCESS", "{reply}");
    let state = news(&mut alice, &mut view).await;
    assert_eq!(state["state"], json!({"typing": true}));
    assert_eq!(state["version"], reply["payload"]["version"]);

    // bob's last connection leaves cleanly: LEAVE `left`, once.
    bob_a.ws.close(None).await.unwrap();
    let leave = news(&mut alice, &mut view).await;
    assert_eq!(
        (leave["userId"].clone(), leave["reason"].clone()),
        (json!("bob"), json!("left"))
    );
    let server = server_view(&b, "doc:1").await;
    assert_eq!(server["version"], view.version);
    assert_eq!(server["users"].as_array().unwrap().len(), 1, "{server}");
    let reply = bob_b
        .request(
            "@@patchbay/PRESENCE_SET",
            json!({"room": "doc:1", "state": {}}),
        )
        .await;
    assert_failure(&reply, "@@patchbay/PRESENCE_SET", "forbidden");
}

#[tokio::test]
async fn a_dropped_user_back_on_another_instance_within_the_grace_never_left() {
    let redis = RedisServer::start().await;
    let (a, b) = (instance(&redis).await, instance(&redis).await);
    let mut alice = connect_as(&a, "alice").await;
    let mut view = join(&mut alice, "doc:2").await;
    let mut bob = connect_as(&a, "bob").await;
    join(&mut bob, "doc:2").await;
    assert_eq!(news(&mut alice, &mut view).await["userId"], "bob");

    drop(bob);
    tokio::time::sleep(GRACE / 4).await;
    let mut bob = connect_as(&b, "bob").await;
    join(&mut bob, "doc:2").await;
    no_news(&mut alice, &mut view, GRACE * 2).await;
    assert_eq!(view.names(), ["alice", "bob"]);

    // Dropped for good: LEAVE `timeout` once the grace has passed.
    let dropped = Instant::now();
    drop(bob);
    let leave = news(&mut alice, &mut view).await;
    assert!(dropped.elapsed() >= GRACE, "{:?}", dropped.elapsed());
    assert_eq!(
        (leave["userId"].clone(), leave["reason"].clone()),
        (json!("bob"), json!("timeout"))
    );
}

/// The patchbay binary on `redis`, with presence in `doc:*`.
fn spawn_instance(redis: &RedisServer) -> (Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_patchbay"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .current_dir(std::env::temp_dir())
        .env("PATCHBAY_ACTIONS", tempfile::tempdir().unwrap().keep())
        .env("PATCHBAY_LISTEN", "127.0.0.1:0")
        .env("PATCHBAY_REDIS_URL", redis.url())
        .env("PATCHBAY_JWT_SECRET", common::SECRET)
        .env("PATCHBAY_PUBLIC_ROOMS", "doc:*")
        .env("PATCHBAY_PRESENCE_ROOMS", "doc:*")
        .env("PATCHBAY_MAX_CONNECTIONS", "2000")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let addr = listening_addr(&mut child);
    (child, addr)
}

async fn connect_to(addr: &str, user: &str) -> Client {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let token = jwt(json!({"sub": user, "exp": now() + 600}));
    let mut req = format!("ws://{addr}/ws").into_client_request().unwrap();
    req.headers_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (ws, _) = tokio_tungstenite::client_async(req, stream).await.unwrap();
    let mut client = Client { ws };
    let hello = client.recv().await;
    assert_eq!(hello["type"], "@@patchbay/CONNECTED", "{hello}");
    client
}

#[tokio::test]
async fn the_presences_of_a_killed_instance_leave_once_with_timeout() {
    let redis = RedisServer::start().await;
    let (b, c) = (instance(&redis).await, instance(&redis).await);
    let rooms = ["doc:k1", "doc:k2", "doc:k3", "doc:k4"];
    let mut observers = Vec::new();
    for bridge in [&b, &c] {
        let mut o = connect_as(bridge, "observer").await;
        let mut views = Vec::new();
        for room in rooms {
            views.push(join(&mut o, room).await);
        }
        observers.push((o, views));
    }
    // 250 users on the doomed instance, each in 4 rooms: 1,000 presences.
    let (mut doomed, addr) = spawn_instance(&redis);
    let mut clients = Vec::new();
    for i in 0..250 {
        let mut client = connect_to(&addr, &format!("u{i}")).await;
        for room in rooms {
            client
                .send(json!({"type": "@@patchbay/SUBSCRIBE_REQUEST", "payload": {"room": room}, "meta": {"requestId": room}}))
                .await;
        }
        clients.push(client);
    }
    for client in &mut clients {
        let mut answered = 0;
        while answered < rooms.len() {
            let m = client.recv().await;
            if m["type"] == "@@patchbay/SUBSCRIBE_SUCCESS" {
                answered += 1;
            }
        }
    }
    for (o, views) in &mut observers {
        while views.iter().any(|v| v.users.len() < 251) {
            let m = o.recv().await;
            if let Some(i) = rooms.iter().position(|r| m["meta"]["room"] == *r) {
                views[i].apply(&m);
            }
        }
    }
    let killed = Instant::now();
    doomed.kill().unwrap();
    doomed.wait().unwrap();
    // Every observer sees each user leave each room once, with `timeout`, within 20 s.
    for (o, views) in &mut observers {
        let mut leaves: HashSet<(String, String)> = HashSet::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(25);
        while leaves.len() < 1000 {
            // Quiet until the lease lapses: longer than a plain `recv` waits.
            let m = recv_until(o, deadline)
                .await
                .expect("every LEAVE within the lease");
            let Some(i) = rooms.iter().position(|r| m["meta"]["room"] == *r) else {
                continue;
            };
            if m["type"] != "@@patchbay/PRESENCE_LEAVE" || !views[i].apply(&m) {
                continue;
            }
            assert_eq!(m["payload"]["reason"], "timeout", "{m}");
            let key = (
                rooms[i].to_string(),
                m["payload"]["userId"].as_str().unwrap().to_string(),
            );
            assert!(leaves.insert(key), "a LEAVE twice: {m}");
        }
        assert!(
            killed.elapsed() < Duration::from_secs(20),
            "{:?}",
            killed.elapsed()
        );
        no_news(o, &mut views[0], Duration::from_millis(300)).await;
        for view in views.iter() {
            assert_eq!(view.names(), ["observer"]);
        }
    }
}

#[tokio::test]
async fn a_view_built_during_churn_equals_the_servers() {
    let redis = RedisServer::start().await;
    let (a, b) = (instance(&redis).await, instance(&redis).await);
    // 100 users joining and leaving on both instances while an observer joins.
    let churn = async {
        let mut clients = Vec::new();
        for i in 0..100 {
            let bridge = if i % 2 == 0 { &a } else { &b };
            let mut client = connect_as(bridge, &format!("u{i}")).await;
            client
                .send(json!({"type": "@@patchbay/SUBSCRIBE_REQUEST", "payload": {"room": "doc:c"}, "meta": {"requestId": "j"}}))
                .await;
            clients.push(client);
        }
        for (i, client) in clients.iter_mut().enumerate() {
            if i % 3 == 0 {
                client
                    .send(json!({"type": "@@patchbay/UNSUBSCRIBE_REQUEST", "payload": {"room": "doc:c"}, "meta": {"requestId": "l"}}))
                    .await;
            }
        }
        clients
    };
    let observe = async {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let mut o = connect_as(&a, "observer").await;
        let view = join(&mut o, "doc:c").await;
        (o, view)
    };
    let (mut clients, (mut o, mut view)) = tokio::join!(churn, observe);
    // Every request answered: the churn is over.
    for (i, client) in clients.iter_mut().enumerate() {
        let mut waiting: HashSet<&str> = HashSet::from(["j"]);
        if i % 3 == 0 {
            waiting.insert("l");
        }
        while !waiting.is_empty() {
            let m = client.recv().await;
            if let Some(id) = m["meta"]["requestId"].as_str() {
                assert!(m["type"].as_str().unwrap().ends_with("_SUCCESS"), "{m}");
                waiting.remove(id);
            }
        }
    }
    // Every event still on its way, applied as a client does (older ones dropped).
    while let Ok(m) = tokio::time::timeout(Duration::from_millis(500), o.recv()).await {
        if m["type"]
            .as_str()
            .unwrap_or("")
            .starts_with("@@patchbay/PRESENCE_")
        {
            view.apply(&m);
        }
    }
    let server = server_view(&b, "doc:c").await;
    let mut names: Vec<String> = server["users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["userId"].as_str().unwrap().to_string())
        .collect();
    names.sort();
    assert_eq!(view.names(), names);
    assert_eq!(view.version, server["version"].as_u64().unwrap());
    assert_eq!(names.len(), 1 + 100 - 34, "{names:?}");
}

#[tokio::test]
async fn an_instance_whose_lease_lapsed_joins_its_presences_again() {
    let redis = RedisServer::start().await;
    let start = || {
        Bridge::start("{}", None, |c| {
            with_jwt(c);
            // The observer watches anonymously: only the holder's instance has presences.
            c.allow_anonymous = true;
            c.redis_url = Some(redis.url());
            c.public_rooms = vec![RoomPattern::parse("doc:*").unwrap()];
            c.presence = Some(patchbay::presence::PresenceConfig {
                rooms: vec![RoomPattern::parse("doc:*").unwrap()],
                grace: GRACE,
            });
        })
    };
    let (holder, watcher) = (start().await, start().await);
    wait_ready_status(&holder, "ok").await;
    wait_ready_status(&watcher, "ok").await;
    let mut alice = connect_as(&holder, "alice").await;
    join(&mut alice, "doc:l").await;
    let mut observer = watcher.connect().await;
    let mut view = join(&mut observer, "doc:l").await;
    assert_eq!(view.names(), ["alice"]);

    // The holder's lease is made to lapse, as if Redis had been out of its reach for 10 s.
    let mut conn = redis.connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("patchbay:prooms:*")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(keys.len(), 1, "{keys:?}");
    let instance = keys[0].trim_start_matches("patchbay:prooms:").to_string();
    let _: i64 = redis::cmd("ZADD")
        .arg("patchbay:plive")
        .arg(1)
        .arg(&instance)
        .query_async(&mut conn)
        .await
        .unwrap();
    // Swept at once, as another instance would (before the holder renews): alice leaves;
    // at its next renewal the holder finds its lease gone and joins her again.
    let left: i64 = redis::cmd("FCALL")
        .arg("patchbay_presence_sweep")
        .arg(1)
        .arg("patchbay:plive")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(left, 1);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let m = recv_until(&mut observer, deadline)
            .await
            .expect("a LEAVE and a JOIN");
        if m["type"]
            .as_str()
            .unwrap_or("")
            .starts_with("@@patchbay/PRESENCE_")
            && view.apply(&m)
        {
            seen.push((m["type"].clone(), m["payload"]["reason"].clone()));
        }
    }
    assert_eq!(
        seen,
        [
            (json!("@@patchbay/PRESENCE_LEAVE"), json!("timeout")),
            (json!("@@patchbay/PRESENCE_JOIN"), Value::Null)
        ]
    );
    assert_eq!(view.names(), ["alice"]);
    assert_eq!(server_view_of(&redis, "doc:l").await, ["alice"]);
}

/// The users Redis lists in `room`.
async fn server_view_of(redis: &RedisServer, room: &str) -> Vec<String> {
    let mut conn = redis.connection().await.unwrap();
    let mut users: Vec<String> = redis::cmd("HKEYS")
        .arg(format!("patchbay:pu:{room}"))
        .query_async(&mut conn)
        .await
        .unwrap();
    users.sort();
    users
}
