//! Presence on the embedded bus (contract section 9), through real websocket clients: per
//! user JOIN and LEAVE with versions, the snapshot, state updates, the grace for dropped
//! connections, and `GET /presence/<room>`.

mod common;

use std::time::{Duration, Instant};

use common::tasks::connect_as;
use common::*;
use patchbay::rooms::RoomPattern;
use serde_json::{Value, json};

const GRACE: Duration = Duration::from_millis(300);

async fn presence_bridge() -> Bridge {
    Bridge::start("{}", None, |c| {
        with_jwt(c);
        c.public_rooms = vec![RoomPattern::parse("doc:*").unwrap()];
        c.presence = Some(patchbay::presence::PresenceConfig {
            rooms: vec![RoomPattern::parse("doc:*").unwrap()],
            grace: GRACE,
        });
        c.publish_token = Some("a publish token of 29 bytes!!".into());
    })
    .await
}

async fn join(client: &mut Client, room: &str) -> Value {
    let reply = client
        .request("@@patchbay/SUBSCRIBE", json!({ "room": room }))
        .await;
    assert_eq!(reply["type"], "@@patchbay/SUBSCRIBE_SUCCESS", "{reply}");
    reply["payload"]["presence"].clone()
}

/// The next presence event (other actions skipped).
async fn event(client: &mut Client) -> Value {
    loop {
        let m = client.recv().await;
        if m["type"]
            .as_str()
            .is_some_and(|t| t.starts_with("@@patchbay/PRESENCE_"))
        {
            return m;
        }
    }
}

#[tokio::test]
async fn users_join_and_leave_once_however_many_connections_they_have() {
    let bridge = presence_bridge().await;
    let mut alice = connect_as(&bridge, "alice").await;
    let snapshot = join(&mut alice, "doc:1").await;
    assert_eq!(snapshot["version"], 1);
    assert_eq!(snapshot["users"][0]["userId"], "alice");
    assert_eq!(snapshot["users"][0]["state"], json!({}));
    // Members get events about every user, their own included: alice's own JOIN came just
    // before her success (a client drops events not newer than its snapshot).

    let mut bob = connect_as(&bridge, "bob").await;
    let started = Instant::now();
    let snapshot = join(&mut bob, "doc:1").await;
    let joined = event(&mut alice).await;
    assert!(
        started.elapsed() < Duration::from_millis(100),
        "seen within 100 ms"
    );
    assert_eq!(
        joined["payload"],
        json!({"room": "doc:1", "userId": "bob", "state": {}, "version": 2})
    );
    assert_eq!(snapshot["version"], 2);
    let users: Vec<&str> = snapshot["users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["userId"].as_str().unwrap())
        .collect();
    assert_eq!(users, ["alice", "bob"]);

    // A second tab of bob: no event; closing it: none either.
    let mut bob2 = connect_as(&bridge, "bob").await;
    assert_eq!(join(&mut bob2, "doc:1").await["version"], 2);
    bob2.ws.close(None).await.unwrap();
    // bob's last connection leaves cleanly: LEAVE `left` at once.
    let left = bob
        .request("@@patchbay/UNSUBSCRIBE", json!({"room": "doc:1"}))
        .await;
    assert_eq!(left["type"], "@@patchbay/UNSUBSCRIBE_SUCCESS");
    let leave = event(&mut alice).await;
    assert_eq!(
        leave["payload"],
        json!({"room": "doc:1", "userId": "bob", "version": 3, "reason": "left"})
    );

    let mut carol = connect_as(&bridge, "carol").await;
    join(&mut carol, "doc:1").await;
    assert_eq!(event(&mut alice).await["payload"]["version"], 4);
    carol.ws.close(None).await.unwrap();
    let leave = event(&mut alice).await;
    assert_eq!(
        (
            leave["payload"]["userId"].clone(),
            leave["payload"]["reason"].clone()
        ),
        (json!("carol"), json!("left"))
    );
}

#[tokio::test]
async fn a_dropped_connection_leaves_after_the_grace_unless_its_user_comes_back() {
    let bridge = presence_bridge().await;
    let mut alice = connect_as(&bridge, "alice").await;
    join(&mut alice, "doc:2").await;

    // Dropped (no close frame), back within the grace: no LEAVE, no JOIN.
    let mut bob = connect_as(&bridge, "bob").await;
    join(&mut bob, "doc:2").await;
    assert_eq!(event(&mut alice).await["type"], "@@patchbay/PRESENCE_JOIN");
    drop(bob);
    tokio::time::sleep(GRACE / 3).await;
    let mut bob = connect_as(&bridge, "bob").await;
    let snapshot = join(&mut bob, "doc:2").await;
    assert_eq!(snapshot["version"], 2, "nothing changed: {snapshot}");

    // Dropped for good: LEAVE `timeout` once the grace has passed, not before.
    let dropped = Instant::now();
    drop(bob);
    let leave = event(&mut alice).await;
    assert!(dropped.elapsed() >= GRACE, "{:?}", dropped.elapsed());
    assert_eq!(
        leave["payload"],
        json!({"room": "doc:2", "userId": "bob", "version": 3, "reason": "timeout"})
    );
    assert_answers_ping(&mut alice).await;
}

#[tokio::test]
async fn state_updates_reach_the_members_and_the_snapshot() {
    let bridge = presence_bridge().await;
    let mut alice = connect_as(&bridge, "alice").await;
    join(&mut alice, "doc:3").await;
    // The STATE event goes to every member as the state changes; the success follows.
    alice
        .send(json!({"type": "@@patchbay/PRESENCE_SET_REQUEST", "payload": {"room": "doc:3", "state": {"typing": true}}, "meta": {"requestId": "s1"}}))
        .await;
    let state = event(&mut alice).await;
    let reply = alice.recv().await;
    assert_eq!(reply["type"], "@@patchbay/PRESENCE_SET_SUCCESS", "{reply}");
    assert_eq!(reply["payload"], json!({"room": "doc:3", "version": 2}));
    assert_eq!(
        state["payload"],
        json!({"room": "doc:3", "userId": "alice", "state": {"typing": true}, "version": 2})
    );
    let mut bob = connect_as(&bridge, "bob").await;
    let snapshot = join(&mut bob, "doc:3").await;
    assert_eq!(snapshot["users"][0]["state"], json!({"typing": true}));

    for (payload, code) in [
        (json!({"room": "doc:3", "state": [1]}), "invalid_payload"),
        (
            json!({"room": "doc:3", "state": {"x": "y".repeat(1100)}}),
            "invalid_payload",
        ),
        (json!({"room": "doc:4", "state": {}}), "forbidden"),
        (json!({"room": "plain", "state": {}}), "forbidden"),
    ] {
        let reply = alice.request("@@patchbay/PRESENCE_SET", payload).await;
        assert_failure(&reply, "@@patchbay/PRESENCE_SET", code);
    }

    // Backends read the same snapshot.
    let url = bridge.http_url("/presence/doc:3");
    let (status, _) = http_get(&url).await;
    assert_eq!(status, 401, "the publish token is needed");
    let (status, body) = http_call(
        "GET",
        &url,
        &[("authorization", "Bearer a publish token of 29 bytes!!")],
        "",
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(body["room"], "doc:3");
    assert_eq!(body["version"], 3);
    assert_eq!(body["users"].as_array().unwrap().len(), 2);
    let (status, _) = http_call(
        "GET",
        &bridge.http_url("/presence/plain"),
        &[("authorization", "Bearer a publish token of 29 bytes!!")],
        "",
    )
    .await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn a_room_joined_by_an_action_counts_its_user_present() {
    let upstream = Upstream::start().await;
    let bridge = Bridge::start(MANIFEST, Some(upstream.url()), |c| {
        with_jwt(c);
        c.presence = Some(patchbay::presence::PresenceConfig {
            rooms: vec![RoomPattern::parse("task:*").unwrap()],
            grace: GRACE,
        });
    })
    .await;
    let mut alice = connect_as(&bridge, "alice").await;
    let reply = alice.request("TASK_ENQUEUE", json!({})).await;
    assert_eq!(reply["meta"]["subscribed"], "task:77", "{reply}");
    let token = reply["meta"]["roomToken"].as_str().unwrap().to_string();
    // Bob joins with a room token for himself (issued by the server, as an enqueue of his would).
    let bob_token = bridge.app.room_tokens.issue("task:77", Some("bob"));
    let mut bob = connect_as(&bridge, "bob").await;
    let reply = bob
        .request(
            "@@patchbay/SUBSCRIBE",
            json!({"room": "task:77", "token": bob_token}),
        )
        .await;
    assert_eq!(reply["type"], "@@patchbay/SUBSCRIBE_SUCCESS", "{reply}");
    let users: Vec<&str> = reply["payload"]["presence"]["users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["userId"].as_str().unwrap())
        .collect();
    assert_eq!(users, ["alice", "bob"], "{reply}");
    assert!(!token.is_empty());
    assert_eq!(event(&mut alice).await["payload"]["userId"], "bob");
}
