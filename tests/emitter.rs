//! socket.io emitter interop (contract section 10): the golden fixtures the real npm emitters
//! wrote (`tests/emitter/fixtures`, regenerated and compared here) map to the expected actions
//! and rooms; the Messaging service's call reaches user 1 as an ISO date; hostile messages are
//! dropped and counted and never stop the next one; a real emitter process reaches 100
//! clients with 1,000 events; `except` holds across instances, and emitter actions into
//! history rooms are stored once however many instances ingest them.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::tasks::connect_as;
use common::*;
use patchbay::config::Config;
use patchbay::emitter::{DropReason, Emitter, Outcome, RoomRules};
use patchbay::rooms::RoomPattern;
use serde_json::{Map, Value, json};

const RULES: &str = "user({id})=user:{id}";

fn emitter_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/emitter")
}

/// The emitters are installed by the test set-up (`npm ci` in tests/emitter).
fn installed() -> PathBuf {
    let dir = emitter_dir();
    assert!(
        dir.join("node_modules/socket.io-emitter-1.1").is_dir(),
        "the emitters are not installed: run `npm ci` in tests/emitter (scripts/test.sh does)"
    );
    dir
}

struct Fixture {
    package: String,
    scenario: String,
    channel: String,
    bytes: Vec<u8>,
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn fixtures() -> Vec<Fixture> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(emitter_dir().join("fixtures"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    let mut out = Vec::new();
    for file in files {
        let doc: Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
        for m in doc["messages"].as_array().unwrap() {
            out.push(Fixture {
                package: doc["package"].as_str().unwrap().to_string(),
                scenario: m["scenario"].as_str().unwrap().to_string(),
                channel: m["channel"].as_str().unwrap().to_string(),
                bytes: hex(m["bytes"].as_str().unwrap()),
            });
        }
    }
    out
}

fn fixture(package: &str, scenario: &str) -> Fixture {
    fixtures()
        .into_iter()
        .find(|f| f.package == package && f.scenario == scenario)
        .unwrap_or_else(|| panic!("no fixture {package} {scenario}"))
}

fn object(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(o) => o,
        other => panic!("not an object: {other}"),
    }
}

/// What every emitter version's message for `scenario` must become.
fn expected(scenario: &str) -> Outcome {
    let deliver = |rooms: &[&str], except: &[&str], action: Value| Outcome::Deliver {
        rooms: rooms.iter().map(|r| r.to_string()).collect(),
        except: except.iter().map(|r| r.to_string()).collect(),
        action: object(action),
    };
    let dropped = |reason| Outcome::Dropped(reason, String::new());
    match scenario {
        "message_date" => deliver(
            &["user:1"],
            &[],
            json!({"type": "message", "payload": "2026-12-02T10:00:00.000Z"}),
        ),
        "no_args" => deliver(&["lobby"], &[], json!({"type": "ping"})),
        "several_args" => deliver(
            &["lobby"],
            &[],
            json!({"type": "m", "payload": [1, -2, 1.5, "two", true, false, null, {"nested": {"list": [1, "x"]}}]}),
        ),
        "undefined_arg" => deliver(&["lobby"], &[], json!({"type": "m", "payload": null})),
        "action" => deliver(
            &["user:7"],
            &[],
            json!({"type": "TODO_ADDED", "payload": {"id": 1, "title": "Milk"}}),
        ),
        "two_rooms" => deliver(
            &["user:1", "user:2"],
            &[],
            json!({"type": "m", "payload": "both"}),
        ),
        "except" => deliver(&["lobby"], &["user:2"], json!({"type": "m", "payload": 1})),
        "dates" => deliver(
            &["lobby"],
            &[],
            json!({"type": "dates", "payload": [
                "1970-01-01T00:00:00.000Z",
                "1969-12-31T23:59:59.999Z",
                "2026-12-02T10:00:00.050Z",
                "+010000-01-01T00:00:00.000Z",
            ]}),
        ),
        "strings" => deliver(
            &["lobby"],
            &[],
            json!({"type": "s", "payload": ["x".repeat(40), "y".repeat(300), "héllo ✓ 😀"]}),
        ),
        "numbers" => deliver(
            &["lobby"],
            &[],
            json!({"type": "n", "payload": [255, 65535, 4_294_967_296u64, -129, -40000, 0.1]}),
        ),
        "big_integer" => deliver(
            &["lobby"],
            &[],
            json!({"type": "n", "payload": 9_007_199_254_740_992u64}),
        ),
        "namespace" => dropped(DropReason::Namespace),
        "binary" => dropped(DropReason::Binary),
        "broadcast" => dropped(DropReason::NoRooms),
        "reserved" => dropped(DropReason::Event),
        "unmapped" => dropped(DropReason::Unmapped),
        other => panic!("no expectation for scenario {other}"),
    }
}

#[test]
fn every_fixture_maps_to_the_expected_action_and_rooms() {
    let emitter = Emitter::new("socket.io", RoomRules::parse(RULES).unwrap(), 1 << 20, 100);
    let all = fixtures();
    let mut packages: Vec<&str> = all.iter().map(|f| f.package.as_str()).collect();
    packages.dedup();
    assert_eq!(packages.len(), 8, "{packages:?}");
    let mut copies = 0;
    for f in &all {
        let got = match emitter.receive(&f.channel, &f.bytes) {
            // The detail is for the log: compare the reason.
            Outcome::Dropped(reason, _) => Outcome::Dropped(reason, String::new()),
            other => other,
        };
        if got == Outcome::Copy {
            // socket.io-emitter 1.x–2.x publish a two-room message on both rooms' channels.
            assert_eq!(
                (f.scenario.as_str(), f.channel.as_str()),
                ("two_rooms", "socket.io#/#user(2)#"),
                "{}",
                f.package
            );
            copies += 1;
            continue;
        }
        assert_eq!(
            got,
            expected(&f.scenario),
            "{} {} on {}",
            f.package,
            f.scenario,
            f.channel
        );
    }
    assert_eq!(copies, 2, "the two oldest versions publish a copy each");
    // Every version that can express a scenario was captured doing so.
    for package in &packages {
        let scenarios: Vec<&str> = all
            .iter()
            .filter(|f| f.package == *package)
            .map(|f| f.scenario.as_str())
            .collect();
        for s in [
            "message_date",
            "two_rooms",
            "dates",
            "undefined_arg",
            "binary",
            "action",
        ] {
            assert!(scenarios.contains(&s), "{package} has no {s}");
        }
        let modern = package.starts_with("@socket.io/redis-emitter");
        assert_eq!(scenarios.contains(&"except"), modern, "{package}");
        assert_eq!(scenarios.contains(&"reserved"), !modern, "{package}");
    }
}

#[test]
fn the_fixtures_are_what_the_real_emitters_publish() {
    let dir = installed();
    let out = Command::new("node")
        .arg("generate.js")
        .arg("--check")
        .current_dir(&dir)
        .output()
        .expect("node runs");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An instance on `redis` listening to the emitters (key `socket.io`, user rooms mapped);
/// `lobby` is public; `history`: the rooms that keep history.
async fn instance(redis: &RedisServer, history: &[&str], max_frame_bytes: usize) -> Bridge {
    let bridge = Bridge::start("{}", None, |c: &mut Config| {
        with_jwt(c);
        c.redis_url = Some(redis.url());
        c.publish_token = Some("tok".into());
        c.max_frame_bytes = max_frame_bytes;
        c.public_rooms = vec![RoomPattern::parse("lobby").unwrap()];
        c.emitter = Some(("socket.io".into(), RoomRules::parse(RULES).unwrap()));
        c.history = (!history.is_empty()).then(|| patchbay::history::HistoryConfig {
            rooms: history
                .iter()
                .map(|p| RoomPattern::parse(p).unwrap())
                .collect(),
            size: 100,
            ttl: Duration::from_secs(300),
            recover_max: 100,
        });
    })
    .await;
    wait_ready_status(&bridge, "ok").await;
    bridge
}

async fn join_lobby(client: &mut Client) {
    let reply = client
        .request("@@patchbay/SUBSCRIBE", json!({"room": "lobby"}))
        .await;
    assert_eq!(reply["type"], "@@patchbay/SUBSCRIBE_SUCCESS", "{reply}");
}

/// The next action that is not a control message of patchbay's.
async fn next_action(client: &mut Client) -> Value {
    loop {
        let m = client.recv().await;
        if !m["type"].as_str().unwrap_or("").starts_with("@@patchbay/") {
            return m;
        }
    }
}

/// Publishes `MARK` to `room` and checks that it is the next action `client` gets: whatever
/// was published before it for the client did not reach it.
async fn nothing_else_before_mark(bridge: &Bridge, client: &mut Client, room: &str) {
    let (status, reply) =
        publish(bridge, json!({"rooms": [room], "action": {"type": "MARK"}})).await;
    assert_eq!(status, 202, "{reply}");
    let m = next_action(client).await;
    assert_eq!(m["type"], "MARK", "{m}");
}

fn run_emitter(redis: &RedisServer, package: &str, args: &[&str]) {
    let dir = installed();
    let port = redis.url().rsplit(':').next().unwrap().to_string();
    let out = Command::new("node")
        .arg("emit.js")
        .arg(port)
        .arg(package)
        .args(args)
        .current_dir(&dir)
        .output()
        .expect("node runs");
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("done"),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn the_messaging_service_reaches_user_1_as_an_iso_date() {
    let redis = RedisServer::start().await;
    let bridge = instance(&redis, &[], 1 << 20).await;
    let mut one = connect_as(&bridge, "1").await;
    let mut two = connect_as(&bridge, "2").await;
    // `require('socket.io-emitter')(redis).in('user(1)').emit('message', new Date())`, by the
    // version the Messaging service used (its msgpack writes the date as a string) and by
    // today's (a msgpack timestamp, converted by patchbay).
    for package in ["socket.io-emitter-1.1", "redis-emitter-5.1"] {
        run_emitter(&redis, package, &["messaging"]);
        let m = next_action(&mut one).await;
        assert_eq!(
            m,
            json!({"type": "message", "payload": "2026-12-02T10:00:00.000Z", "meta": {"room": "user:1"}}),
            "{package}"
        );
    }
    nothing_else_before_mark(&bridge, &mut two, "user:2").await;
}

#[tokio::test]
async fn hostile_messages_are_dropped_and_counted_and_never_stop_the_next_one() {
    let redis = RedisServer::start().await;
    let bridge = instance(&redis, &[], 64 * 1024).await;
    let mut client = connect_as(&bridge, "1").await;
    join_lobby(&mut client).await;
    let lobby = "socket.io#/#lobby#";
    let mut nested = vec![0x91; 10_000];
    nested.push(0xc0);
    let valid = fixture("@socket.io/redis-emitter@5.1.0", "no_args").bytes;
    // [uid, {type: 2, data: [7], nsp: "/"}, {rooms: ["lobby"]}]: the event is not a string.
    let numeric_event = hex("93a7656d697474657283a47479706502a46461746191\
         07a36e7370a12f81a5726f6f6d7391a56c6f626279");
    let mut too_large = vec![0xc6, 0x00, 0x01, 0x40, 0x00];
    too_large.resize(5 + 0x14000, 0);
    let hostile: Vec<(&str, Vec<u8>, &str)> = vec![
        (lobby, nested, "too_deep"),
        (lobby, hex("93a7656d6974746572dd7fffffff01"), "malformed"),
        (lobby, hex("dc7fff"), "malformed"),
        (lobby, valid[..valid.len() / 2].to_vec(), "malformed"),
        (lobby, b"{\"not\":\"msgpack\"}".to_vec(), "malformed"),
        (lobby, numeric_event, "event"),
        (lobby, too_large, "too_large"),
        (
            lobby,
            fixture("@socket.io/redis-emitter@5.1.0", "binary").bytes,
            "binary",
        ),
        (
            lobby,
            fixture("@socket.io/redis-emitter@5.1.0", "namespace").bytes,
            "namespace",
        ),
        (
            "socket.io#/#",
            fixture("@socket.io/redis-emitter@5.1.0", "broadcast").bytes,
            "no_rooms",
        ),
        (
            "socket.io#/#has space#",
            fixture("@socket.io/redis-emitter@5.1.0", "unmapped").bytes,
            "unmapped",
        ),
        (
            lobby,
            fixture("socket.io-emitter@1.1.0", "reserved").bytes,
            "event",
        ),
    ];
    for (channel, bytes, _) in &hostile {
        redis.publish(channel, bytes).await;
    }
    redis.publish(lobby, &valid).await;
    let m = next_action(&mut client).await;
    assert_eq!(
        m["type"], "ping",
        "the first action after the hostile ones: {m}"
    );
    let mut want = std::collections::BTreeMap::new();
    for (_, _, reason) in &hostile {
        *want.entry(*reason).or_insert(0) += 1;
    }
    let lines: Vec<String> = want
        .iter()
        .map(|(reason, n)| format!("patchbay_emitter_dropped_total{{reason=\"{reason}\"}} {n}"))
        .collect();
    let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
    common::tasks::metrics_show(&bridge, &lines).await;
    // Still serving.
    redis.publish(lobby, &valid).await;
    assert_eq!(next_action(&mut client).await["type"], "ping");
}

#[tokio::test]
async fn a_real_emitter_publishing_1000_events_reaches_100_clients() {
    const CLIENTS: usize = 100;
    const EVENTS: u64 = 1000;
    let redis = RedisServer::start().await;
    let bridge = instance(&redis, &[], 1 << 20).await;
    let mut clients = Vec::new();
    for i in 0..CLIENTS {
        let mut c = connect_as(&bridge, &format!("u{i}")).await;
        join_lobby(&mut c).await;
        clients.push(c);
    }
    let readers: Vec<_> = clients
        .into_iter()
        .map(|mut c| {
            tokio::spawn(async move {
                let mut got = Vec::new();
                while (got.len() as u64) < EVENTS {
                    let m = next_action(&mut c).await;
                    assert_eq!(m["type"], "tick", "{m}");
                    assert_eq!(m["meta"]["room"], "lobby");
                    got.push(m["payload"].as_u64().unwrap());
                }
                got
            })
        })
        .collect();
    let started = Instant::now();
    tokio::task::spawn_blocking({
        let redis_url = redis.url();
        move || {
            let dir = installed();
            let port = redis_url.rsplit(':').next().unwrap().to_string();
            let out = Command::new("node")
                .args([
                    "emit.js",
                    &port,
                    "redis-emitter-5.1",
                    "ticks",
                    "1000",
                    "lobby",
                ])
                .current_dir(&dir)
                .output()
                .expect("node runs");
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    })
    .await
    .unwrap();
    for reader in readers {
        let got = reader.await.unwrap();
        assert_eq!(
            got,
            (0..EVENTS).collect::<Vec<_>>(),
            "every event, in order"
        );
    }
    eprintln!(
        "{EVENTS} events to {CLIENTS} clients delivered in {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn except_holds_across_instances_for_live_delivery() {
    let redis = RedisServer::start().await;
    let a = instance(&redis, &[], 1 << 20).await;
    let b = instance(&redis, &[], 1 << 20).await;
    let mut one = connect_as(&a, "1").await;
    let mut two = connect_as(&b, "2").await;
    let mut three = connect_as(&b, "3").await;
    for c in [&mut one, &mut two, &mut three] {
        join_lobby(c).await;
    }
    // `io.to('lobby').except('user(2)').emit('m', 1)`, as @socket.io/redis-emitter 5 wrote it:
    // user 2 is skipped, user 3 on the same instance is not.
    let except = fixture("@socket.io/redis-emitter@5.1.0", "except");
    redis.publish(&except.channel, &except.bytes).await;
    for c in [&mut one, &mut three] {
        let m = next_action(c).await;
        assert_eq!(
            m,
            json!({"type": "m", "payload": 1, "meta": {"room": "lobby"}})
        );
    }
    nothing_else_before_mark(&b, &mut two, "lobby").await;
}

#[tokio::test]
async fn except_and_history_hold_across_instances_and_store_once() {
    let redis = RedisServer::start().await;
    let history = ["lobby", "user:*"];
    let a = instance(&redis, &history, 1 << 20).await;
    let b = instance(&redis, &history, 1 << 20).await;
    let mut one = connect_as(&a, "1").await;
    let mut two = connect_as(&b, "2").await;
    join_lobby(&mut one).await;
    join_lobby(&mut two).await;
    // `io.to('lobby').except('user(2)').emit('m', 1)`, as @socket.io/redis-emitter 5 wrote it.
    let except = fixture("@socket.io/redis-emitter@5.1.0", "except");
    redis.publish(&except.channel, &except.bytes).await;
    let m = next_action(&mut one).await;
    assert_eq!(
        (m["type"].clone(), m["payload"].clone()),
        (json!("m"), json!(1))
    );
    assert_eq!(m["meta"]["room"], "lobby");
    assert!(m["meta"]["offset"].is_u64(), "stored: {m}");
    nothing_else_before_mark(&b, &mut two, "lobby").await;
    assert_eq!(next_action(&mut one).await["type"], "MARK");
    // socket.io-emitter 1.1 publishes a two-room message on each room's channel.
    for f in fixtures()
        .into_iter()
        .filter(|f| f.package == "socket.io-emitter@1.1.0" && f.scenario == "two_rooms")
    {
        redis.publish(&f.channel, &f.bytes).await;
    }
    for client in [&mut one, &mut two] {
        let m = next_action(client).await;
        assert_eq!(m["payload"], "both", "{m}");
    }
    nothing_else_before_mark(&a, &mut one, "user:1").await;
    nothing_else_before_mark(&b, &mut two, "user:2").await;
    // Both instances ingested every message; each was stored once (the MARKs too).
    let mut conn = redis.connection().await.unwrap();
    for (room, n) in [("lobby", 2), ("user:1", 2), ("user:2", 2)] {
        let len: i64 = redis::cmd("XLEN")
            .arg(format!("patchbay:h:{room}"))
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(len, n, "{room}");
    }
}
