//! patchbay behind a real nginx running the repository's `deploy/nginx.conf` (its addresses
//! and port swapped for the test's): websockets and SSE pass, the Origin rule holds with the
//! browser's Host, the client address is the browser's (`PATCHBAY_TRUSTED_PROXIES`) and
//! a spoofed one is not believed, and a draining instance's handshakes go to the other one.
//!
//! nginx connects to patchbay from 127.0.0.2 (`proxy_bind`) and the test's clients connect
//! from 127.0.0.3, so the proxy, the client and a direct caller all have addresses of their own.

mod common;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// nginx with the repository's server block in front of `backends`; stopped on drop.
struct Nginx {
    port: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Nginx {
    async fn start(backends: &[SocketAddr]) -> Nginx {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let documented =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/nginx.conf"))
                .unwrap();
        let servers: String = backends
            .iter()
            .map(|b| format!("    server {b} max_fails=0;\n"))
            .collect();
        let mut conf = String::new();
        let mut replaced = false;
        for line in documented.lines() {
            if line.trim_start().starts_with("server 10.0.0.") {
                if !replaced {
                    conf.push_str(&servers);
                    replaced = true;
                }
            } else if line.trim() == "listen 80;" {
                conf.push_str(&format!("    listen 127.0.0.1:{port};\n"));
            } else {
                conf.push_str(line);
                conf.push('\n');
            }
        }
        assert!(
            replaced,
            "deploy/nginx.conf names its upstream servers as the test expects"
        );
        let d = dir.path().display();
        std::fs::write(dir.path().join("patchbay.conf"), conf).unwrap();
        std::fs::write(
            dir.path().join("nginx.conf"),
            format!(
                "daemon off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log info;\n{user}\
                 events {{ worker_connections 512; }}\n\
                 http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
                 fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
                 proxy_bind 127.0.0.2;\n  include {d}/patchbay.conf;\n}}\n",
                user = if unsafe { libc::geteuid() } == 0 { "user root;\n" } else { "" },
            ),
        )
        .unwrap();
        let child = Command::new("nginx")
            .args(["-c", &format!("{d}/nginx.conf"), "-p", &format!("{d}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run nginx ({e}): the proxy tests need it on PATH; install it with `apt-get install nginx`"));
        let deadline = Instant::now() + WAIT;
        while TcpStream::connect(("127.0.0.1", port)).await.is_err() {
            assert!(
                Instant::now() < deadline,
                "nginx did not start: {}",
                std::fs::read_to_string(dir.path().join("error.log")).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Nginx {
            port,
            child,
            _dir: dir,
        }
    }

    fn origin(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// A TCP connection to nginx from 127.0.0.3.
    async fn tcp(&self) -> TcpStream {
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.3:0".parse().unwrap()).unwrap();
        socket
            .connect(([127, 0, 0, 1], self.port).into())
            .await
            .unwrap()
    }

    /// A websocket through nginx from 127.0.0.3, with extra handshake headers.
    async fn ws(
        &self,
        headers: &[(&str, &str)],
    ) -> Result<Client, tokio_tungstenite::tungstenite::Error> {
        let url = format!("ws://127.0.0.1:{}/ws", self.port);
        ws_over(self.tcp().await, &url, headers).await
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A websocket handshake over `stream` to `url`, with extra headers.
async fn ws_over(
    stream: TcpStream,
    url: &str,
    headers: &[(&str, &str)],
) -> Result<Client, tokio_tungstenite::tungstenite::Error> {
    let mut req = url.into_client_request().unwrap();
    for (k, v) in headers {
        req.headers_mut().insert(
            hyper::header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    let (ws, _) = tokio_tungstenite::client_async(req, stream).await?;
    Ok(Client { ws })
}

async fn bridge(upstream: &Upstream) -> Bridge {
    Bridge::start(MANIFEST, Some(upstream.url()), |c| {
        c.trusted_proxies = patchbay::client_addr::TrustedProxies::parse("127.0.0.2").unwrap();
    })
    .await
}

/// The `X-Forwarded-For` of the last request the API received.
fn last_forwarded_for(upstream: &Upstream) -> String {
    let recorded = upstream.recorded();
    let last = recorded.last().expect("the API was called");
    last.headers["x-forwarded-for"]
        .to_str()
        .unwrap()
        .to_string()
}

#[tokio::test]
async fn websockets_pass_nginx_with_the_browsers_host_and_address() {
    let upstream = Upstream::start().await;
    let patchbay = bridge(&upstream).await;
    let nginx = Nginx::start(&[patchbay.addr]).await;
    let origin = nginx.origin();
    // A page of nginx's own origin: the Origin rule compares it with the Host nginx passes on.
    // The client claims another address; nginx appends the one it saw, which patchbay
    // believes because the request came from the trusted proxy.
    let mut client = nginx
        .ws(&[("origin", &origin), ("x-forwarded-for", "6.6.6.6")])
        .await
        .expect("the handshake passes nginx");
    assert_eq!(client.recv().await["type"], "@@patchbay/CONNECTED");
    let reply = client.request("ECHO_GET", json!({"id": 1})).await;
    assert_eq!(reply["type"], "ECHO_GET_SUCCESS", "{reply}");
    assert_eq!(last_forwarded_for(&upstream), "127.0.0.3");

    // Another origin is still refused behind the proxy.
    let refused = nginx.ws(&[("origin", "http://evil.example")]).await;
    assert!(
        matches!(&refused, Err(tokio_tungstenite::tungstenite::Error::Http(r)) if r.status() == 403),
        "{:?}",
        refused.err()
    );

    // Straight to patchbay, the same claims are not believed: the address is the caller's,
    // and X-Forwarded-Host does not make a foreign origin same-host.
    let direct = TcpStream::connect(patchbay.addr).await.unwrap();
    let mut client = ws_over(
        direct,
        &patchbay.ws_url(),
        &[("x-forwarded-for", "6.6.6.6")],
    )
    .await
    .unwrap();
    assert_eq!(client.recv().await["type"], "@@patchbay/CONNECTED");
    client.request("ECHO_GET", json!({"id": 2})).await;
    assert_eq!(last_forwarded_for(&upstream), "127.0.0.1");
    let direct = TcpStream::connect(patchbay.addr).await.unwrap();
    let spoofed = ws_over(
        direct,
        &patchbay.ws_url(),
        &[
            ("origin", "http://evil.example"),
            ("x-forwarded-host", "evil.example"),
        ],
    )
    .await;
    assert!(
        spoofed.is_err(),
        "a direct caller's X-Forwarded-Host is ignored"
    );
}

#[tokio::test]
async fn sse_streams_through_nginx_unbuffered() {
    let upstream = Upstream::start().await;
    let patchbay = bridge(&upstream).await;
    let nginx = Nginx::start(&[patchbay.addr]).await;
    let mut stream = nginx.tcp().await;
    let request = format!(
        "GET /sse HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nOrigin: {}\r\nAccept: text/event-stream\r\n\r\n",
        nginx.port,
        nginx.origin()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    // The first event arrives at once (nginx does not hold it back in a buffer), while the
    // stream stays open.
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(3);
    while !String::from_utf8_lossy(&seen).contains("@@patchbay/CONNECTED") {
        let mut buf = [0u8; 4096];
        let n = tokio::time::timeout_at(deadline, stream.read(&mut buf))
            .await
            .expect("the first event within 3 s")
            .unwrap();
        assert!(
            n > 0,
            "the stream ended: {}",
            String::from_utf8_lossy(&seen)
        );
        seen.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&seen);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
}

#[tokio::test]
async fn a_draining_instances_handshakes_go_to_the_other_one() {
    let upstream = Upstream::start().await;
    let mut a = Bridge::start(MANIFEST, Some(upstream.url()), |c| {
        c.shutdown_grace = Duration::from_secs(3);
    })
    .await;
    let b = bridge(&upstream).await;
    let nginx = Nginx::start(&[a.addr, b.addr]).await;
    let origin = nginx.origin();
    // A client on `a` keeps it draining for a while (its request takes 2 s).
    let held = TcpStream::connect(a.addr).await.unwrap();
    held.set_nodelay(true).unwrap();
    let mut on_a = ws_over(held, &a.ws_url(), &[]).await.unwrap();
    assert_eq!(on_a.recv().await["type"], "@@patchbay/CONNECTED");
    on_a.send(json!({"type": "SLOW_REQUEST", "payload": {"ms": 1500}, "meta": {"requestId": "r"}}))
        .await;
    a.shutdown().await;
    wait_ready_status(&a, "draining").await;
    for n in 0..10 {
        let mut client = nginx
            .ws(&[("origin", &origin)])
            .await
            .unwrap_or_else(|e| panic!("handshake {n} while one instance drains: {e}"));
        assert_eq!(client.recv().await["type"], "@@patchbay/CONNECTED");
    }
}
