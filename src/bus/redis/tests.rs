//! Several instances in one process, over the in-process [`LocalRedis`]; the same
//! behaviour is tested against a real `redis-server` in `tests/redis_bus.rs`.

use super::*;
use crate::outbox::{Inbox, Outbox, QueueLimits};
use serde_json::json;

struct Instance {
    bus: RedisBus,
    rooms: Arc<Rooms>,
}

fn instance(redis: &LocalRedis) -> Instance {
    let rooms = Arc::new(Rooms::default());
    let bus = RedisBus::with_driver(
        Arc::new(redis.clone()),
        "patchbay",
        "tasks.*",
        100,
        rooms.clone(),
    );
    Instance { bus, rooms }
}

async fn member(i: &Instance, id: u64, rooms: &[&str]) -> Inbox {
    let (out, inbox) = Outbox::new(QueueLimits {
        frames: 64,
        bytes: 1 << 20,
    });
    i.rooms.register(id, out);
    for room in rooms {
        i.rooms.join(id, room, 10).unwrap();
        i.bus.subscribe(room).await.unwrap();
    }
    inbox
}

async fn connected(i: &Instance) {
    for _ in 0..200 {
        if i.bus.status() == BusStatus::Connected {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the bus did not connect");
}

async fn next(inbox: &mut Inbox) -> Value {
    let text = tokio::time::timeout(Duration::from_secs(5), inbox.recv())
        .await
        .expect("delivered in time")
        .expect("open");
    serde_json::from_str(text.as_str()).unwrap()
}

fn action(ty: &str) -> Map<String, Value> {
    json!({ "type": ty }).as_object().unwrap().clone()
}

#[tokio::test]
async fn three_instances_deliver_once_per_connection() {
    let redis = LocalRedis::new();
    let (a, b, c) = (instance(&redis), instance(&redis), instance(&redis));
    for i in [&a, &b, &c] {
        connected(i).await;
    }
    let mut on_b = member(&b, 1, &["r1", "r2"]).await;
    let mut on_c = member(&c, 1, &["r2"]).await;
    a.bus
        .publish(vec!["r1".into(), "r2".into()], action("WIDE"))
        .await
        .unwrap();
    assert_eq!(next(&mut on_b).await["meta"]["room"], "r1");
    assert_eq!(next(&mut on_c).await["meta"]["room"], "r2");
    a.bus
        .publish(vec!["r2".into()], action("AFTER"))
        .await
        .unwrap();
    assert_eq!(
        next(&mut on_b).await["type"],
        "AFTER",
        "the envelope came once"
    );
    assert_eq!(next(&mut on_c).await["type"], "AFTER");
    // Task progress reaches the task's and the user's rooms on every instance.
    let mut task = member(&c, 2, &["task:9"]).await;
    let mut user = member(&b, 2, &["user:7"]).await;
    redis
        .publish(vec!["tasks.9".into()], r#"{"id":"9","userId":"7"}"#.into())
        .await
        .unwrap();
    assert_eq!(next(&mut task).await["type"], "TASK_PROGRESS");
    assert_eq!(next(&mut user).await["meta"]["room"], "user:7");
}

#[tokio::test]
async fn an_outage_disconnects_then_every_room_is_subscribed_again() {
    let redis = LocalRedis::new();
    let (a, b) = (instance(&redis), instance(&redis));
    connected(&a).await;
    connected(&b).await;
    let mut inbox = member(&b, 1, &["r"]).await;
    redis.set_down(true);
    for _ in 0..200 {
        if b.bus.status() == BusStatus::Disconnected {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(b.bus.status(), BusStatus::Disconnected);
    assert!(
        a.bus
            .publish(vec!["r".into()], action("LOST"))
            .await
            .is_err()
    );
    assert!(b.bus.subscribe("other").await.is_err());
    redis.set_down(false);
    // The command side comes back on its next check (every 5 s), the pub/sub side sooner.
    tokio::time::pause();
    for _ in 0..100 {
        if b.bus.status() == BusStatus::Connected {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::resume();
    assert_eq!(b.bus.status(), BusStatus::Connected);
    a.bus
        .publish(vec!["r".into()], action("BACK"))
        .await
        .unwrap();
    assert_eq!(next(&mut inbox).await["type"], "BACK");
}

#[test]
fn jitter_stays_within_half_to_full() {
    for _ in 0..100 {
        let j = jitter(Duration::from_secs(4));
        assert!(
            j >= Duration::from_secs(2) && j < Duration::from_secs(4),
            "{j:?}"
        );
    }
}
