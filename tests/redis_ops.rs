//! Production Redis set-ups, against real `redis-server` processes: TLS (`rediss://`) with a
//! certificate made by the test, and Sentinel (`redis+sentinel://`) followed through a
//! failover; a URL that points at a Sentinel or a replica is refused with the reason.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use patchbay::rooms::RoomPattern;
use serde_json::{Value, json};
use tokio::time::Instant;

/// A CA and a server certificate it signed for `localhost` (only), made with the
/// `openssl` command; and a second CA that signed nothing here.
struct Certs {
    dir: tempfile::TempDir,
}

impl Certs {
    fn make() -> Certs {
        let dir = tempfile::tempdir().unwrap();
        let run = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(dir.path())
                .output()
                .unwrap_or_else(|e| panic!("cannot run openssl ({e}): the TLS tests make their certificates with it; install it with `apt-get install openssl`"));
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        for ca in ["ca", "other-ca"] {
            run(&[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "2",
                "-subj",
                &format!("/CN=patchbay {ca}"),
                "-keyout",
                &format!("{ca}.key"),
                "-out",
                &format!("{ca}.pem"),
            ]);
        }
        run(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
        ]);
        std::fs::write(dir.path().join("san.ext"), "subjectAltName=DNS:localhost\n").unwrap();
        run(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "san.ext",
            "-out",
            "server.pem",
        ]);
        Certs { dir }
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }

    fn pem(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.dir.path().join(name)).unwrap()
    }
}

/// Redis with a TLS port beside its plain one (the test's own connection uses the plain one).
async fn tls_redis(certs: &Certs) -> (RedisServer, u16) {
    let tls_port = free_port().to_string();
    let (cert, key, ca) = (
        certs.path("server.pem"),
        certs.path("server.key"),
        certs.path("ca.pem"),
    );
    let args = [
        "--tls-port",
        &tls_port,
        "--tls-cert-file",
        &cert,
        "--tls-key-file",
        &key,
        "--tls-ca-cert-file",
        &ca,
        "--tls-auth-clients",
        "no",
    ];
    (
        RedisServer::start_with(&args, None).await,
        tls_port.parse().unwrap(),
    )
}

/// An instance on the Redis `url` names, with room `lobby` public and `POST /publish` on.
async fn bridge(url: String, ca: Option<Vec<u8>>) -> Bridge {
    Bridge::start("{}", None, |c| {
        c.redis_url = Some(url);
        c.redis_options.ca = ca;
        c.history = None;
        c.public_rooms = vec![RoomPattern::parse("lobby").unwrap()];
        c.publish_token = Some("tok".into());
    })
    .await
}

async fn join_lobby(client: &mut Client) {
    let r = client
        .request("@@patchbay/SUBSCRIBE", json!({"room": "lobby"}))
        .await;
    assert_eq!(r["type"], "@@patchbay/SUBSCRIBE_SUCCESS", "{r}");
}

/// Polls `/readyz` until its `status` is `failed`; the body.
async fn readiness_failure(bridge: &Bridge) -> Value {
    let (code, body) = readyz_until(bridge, WAIT, |_, b| b["status"] == "failed").await;
    assert_eq!(code, 503, "{body}");
    body
}

#[tokio::test]
async fn rediss_with_a_private_ca_carries_actions_between_instances() {
    let certs = Certs::make();
    let (_redis, tls_port) = tls_redis(&certs).await;
    let url = format!("rediss://localhost:{tls_port}");
    let a = bridge(url.clone(), Some(certs.pem("ca.pem"))).await;
    let b = bridge(url, Some(certs.pem("ca.pem"))).await;
    assert_eq!(wait_ready_status(&a, "ok").await["bus"], "connected");
    assert_eq!(wait_ready_status(&b, "ok").await["bus"], "connected");
    let mut client = b.connect().await;
    join_lobby(&mut client).await;
    let (status, body) = publish(
        &a,
        json!({"rooms": ["lobby"], "action": {"type": "HELLO", "payload": 1}}),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    let m = client.recv().await;
    assert_eq!(
        (&m["type"], &m["payload"]),
        (&json!("HELLO"), &json!(1)),
        "{m}"
    );
}

#[tokio::test]
async fn rediss_trusts_the_platforms_store_without_a_ca_file() {
    // The binary, as an operator runs it, with the test's CA as the platform's trust store
    // (SSL_CERT_FILE is where the platform's store is read from) and no PATCHBAY_REDIS_CA_FILE.
    let certs = Certs::make();
    let (_redis, tls_port) = tls_redis(&certs).await;
    let actions = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_patchbay"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("PATCHBAY_ACTIONS", actions.path())
        .env("PATCHBAY_LISTEN", "127.0.0.1:0")
        .env(
            "PATCHBAY_REDIS_URL",
            format!("rediss://localhost:{tls_port}"),
        )
        .env("SSL_CERT_FILE", certs.path("ca.pem"))
        .current_dir(actions.path())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let addr = listening_addr(&mut child);
    let deadline = Instant::now() + WAIT;
    let body = loop {
        let (_, body) = http_get(&format!("http://{addr}/readyz")).await;
        if body["status"] == "ok" || Instant::now() > deadline {
            break body;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(body, json!({"status": "ok", "bus": "connected"}));
}

#[tokio::test]
async fn an_untrusted_redis_certificate_fails_readiness_with_the_reason() {
    let certs = Certs::make();
    let (_redis, tls_port) = tls_redis(&certs).await;
    // The platform's trust store does not know the test's CA; nor does another CA; and the
    // certificate does not name the host asked for.
    for (url, ca) in [
        (format!("rediss://localhost:{tls_port}"), None),
        (
            format!("rediss://localhost:{tls_port}"),
            Some(certs.pem("other-ca.pem")),
        ),
        (
            format!("rediss://127.0.0.1:{tls_port}"),
            Some(certs.pem("ca.pem")),
        ),
    ] {
        let bridge = bridge(url.clone(), ca).await;
        let body = readiness_failure(&bridge).await;
        let reason = body["reason"].as_str().unwrap();
        assert!(
            reason.contains("TLS certificate is not trusted"),
            "{url}: {reason}"
        );
        assert!(reason.contains("PATCHBAY_REDIS_CA_FILE"), "{url}: {reason}");
    }
}

/// `redis-server --sentinel` (what `redis-sentinel` is) watching master `m`; killed on drop.
struct Sentinel {
    port: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Sentinel {
    async fn start(master_port: u16) -> Sentinel {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let conf = dir.path().join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbind 127.0.0.1\ndir {dir}\n\
                 sentinel monitor m 127.0.0.1 {master_port} 1\n\
                 sentinel down-after-milliseconds m 400\n\
                 sentinel failover-timeout m 2000\n",
                dir = dir.path().display()
            ),
        )
        .unwrap();
        let child = Command::new("redis-server")
            .arg(&conf)
            .arg("--sentinel")
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server runs as a Sentinel");
        let sentinel = Sentinel {
            port,
            child,
            _dir: dir,
        };
        eventually(WAIT, "the Sentinel knows the master", async || {
            sentinel.master().await == Some(master_port)
        })
        .await;
        sentinel
    }

    /// The master's port as the Sentinel tells it.
    async fn master(&self) -> Option<u16> {
        let client = redis::Client::open(format!("redis://127.0.0.1:{}", self.port)).ok()?;
        let mut conn = client.get_multiplexed_async_connection().await.ok()?;
        let addr: Vec<String> = redis::cmd("SENTINEL")
            .arg("get-master-addr-by-name")
            .arg("m")
            .query_async(&mut conn)
            .await
            .ok()?;
        addr.get(1)?.parse().ok()
    }
}

impl Drop for Sentinel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `check` every 50 ms until it holds; fails the test after `limit`.
async fn eventually(limit: Duration, what: &str, check: impl AsyncFn() -> bool) {
    let deadline = Instant::now() + limit;
    while !check().await {
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A replica of `master`, once it has synchronised.
async fn replica_of(master: &RedisServer) -> RedisServer {
    let port = master.port.to_string();
    let replica = RedisServer::start_with(&["--replicaof", "127.0.0.1", &port], None).await;
    let conn = replica.connection().await.unwrap();
    eventually(WAIT, "the replica syncs", async || {
        let mut conn = conn.clone();
        let info: String = redis::cmd("INFO")
            .arg("replication")
            .query_async(&mut conn)
            .await
            .unwrap();
        info.contains("master_link_status:up")
    })
    .await;
    replica
}

#[tokio::test]
async fn sentinel_names_the_master_and_a_failover_is_followed_without_a_restart() {
    let mut master = RedisServer::start().await;
    let replica = replica_of(&master).await;
    let sentinel = Sentinel::start(master.port).await;
    let url = format!("redis+sentinel://127.0.0.1:{}/m", sentinel.port);
    let a = bridge(url.clone(), None).await;
    let b = bridge(url, None).await;
    assert_eq!(wait_ready_status(&a, "ok").await["bus"], "connected");
    assert_eq!(wait_ready_status(&b, "ok").await["bus"], "connected");
    let mut client = b.connect().await;
    join_lobby(&mut client).await;
    let hello = |n: u32| json!({"rooms": ["lobby"], "action": {"type": "HELLO", "payload": n}});
    assert_eq!(publish(&a, hello(1)).await.0, 202);
    assert_eq!(client.recv().await["payload"], 1);

    // The master dies; the Sentinel promotes the replica; both instances find it by asking
    // the Sentinel again, and the client, still connected, hears the next publish.
    let killed = Instant::now();
    master.kill();
    eventually(
        Duration::from_secs(20),
        "the Sentinel promotes the replica",
        async || sentinel.master().await == Some(replica.port),
    )
    .await;
    let promoted = killed.elapsed();
    // What is published while an instance has no pub/sub connection is not delivered (no
    // history here): publish once both are connected to the new master.
    for bridge in [&a, &b] {
        assert_eq!(wait_ready_status(bridge, "ok").await["bus"], "connected");
    }
    let mut n = 2;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, _) = publish(&a, hello(n)).await;
        if status == 202 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "publishing never worked again: {status}"
        );
        n += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let m = loop {
        let m = client.recv().await;
        if m["type"] == "HELLO" {
            break m;
        }
    };
    assert_eq!(
        m["payload"], n,
        "the publish that Redis took reaches the client: {m}"
    );
    println!(
        "failover: promoted {promoted:?} after the kill; delivering again {:?} after it",
        killed.elapsed()
    );
    assert_eq!(wait_ready_status(&b, "ok").await["bus"], "connected");
}

#[tokio::test]
async fn a_url_that_points_at_a_sentinel_or_a_replica_is_refused_with_the_reason() {
    let master = RedisServer::start().await;
    let replica = replica_of(&master).await;
    let sentinel = Sentinel::start(master.port).await;
    for (url, says) in [
        (
            format!("redis://127.0.0.1:{}", sentinel.port),
            "redis+sentinel://",
        ),
        (replica.url(), "read-only replica"),
    ] {
        let bridge = bridge(url.clone(), None).await;
        let body = readiness_failure(&bridge).await;
        let reason = body["reason"].as_str().unwrap();
        assert!(reason.contains(says), "{url}: {reason}");
    }
}
