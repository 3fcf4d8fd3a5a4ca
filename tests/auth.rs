//! Authentication and room authorization as a client meets them: JWTs in each place they may
//! travel, delegated auth against a real HTTP service, room escalation, expiry, and a storm of
//! handshakes without credentials.

mod common;

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use common::*;
use patchbay::Config;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Error as WsError;

fn user_token(sub: &str, rooms: &[&str]) -> String {
    jwt(json!({"sub": sub, "exp": now() + 600, "rooms": rooms}))
}

/// The HTTP status of a refused handshake.
fn refused(res: Result<Client, WsError>) -> u16 {
    match res {
        Err(WsError::Http(resp)) => resp.status().as_u16(),
        Err(e) => panic!("expected an HTTP refusal, got {e}"),
        Ok(_) => panic!("expected the handshake to be refused"),
    }
}

async fn connect_url(
    bridge: &Bridge,
    query: &str,
    headers: &[(&str, &str)],
) -> Result<(Client, Value), WsError> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut req = format!("{}{query}", bridge.ws_url())
        .into_client_request()
        .unwrap();
    for (k, v) in headers {
        req.headers_mut().insert(
            hyper::header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    let stream = tokio::net::TcpStream::connect(bridge.addr).await.unwrap();
    let (ws, _) = tokio_tungstenite::client_async(req, stream).await?;
    let mut client = Client { ws };
    let hello = client.recv().await;
    Ok((client, hello))
}

#[tokio::test]
async fn a_valid_jwt_is_accepted_in_each_of_the_three_places() {
    let bridge = Bridge::start("{}", None, with_jwt).await;
    let token = user_token("42", &[]);
    let places: [(String, Vec<(&str, String)>); 3] = [
        (format!("?token={token}"), vec![]),
        (
            String::new(),
            vec![("authorization", format!("Bearer {token}"))],
        ),
        (
            String::new(),
            vec![("cookie", format!("theme=dark; patchbay_token={token}"))],
        ),
    ];
    for (query, headers) in places {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let (_client, hello) = connect_url(&bridge, &query, &headers)
            .await
            .expect("accepted");
        assert_eq!(hello["payload"]["userId"], "42", "{hello}");
        assert_eq!(hello["payload"]["rooms"], json!(["user:42"]), "{hello}");
    }
}

#[tokio::test]
async fn bad_tokens_are_refused_with_401_even_when_anonymous_access_is_on() {
    let bridge = Bridge::start("{}", None, |c| {
        with_jwt(c);
        c.allow_anonymous = true;
    })
    .await;
    let good = user_token("42", &[]);
    let (head_and_claims, _) = good.rsplit_once('.').unwrap();
    let claims = URL_SAFE_NO_PAD.encode(json!({"sub": "42", "exp": now() + 600}).to_string());
    let cases = [
        (
            "forged signature",
            format!("{head_and_claims}.{}", URL_SAFE_NO_PAD.encode([7u8; 32])),
        ),
        ("expired", jwt(json!({"sub": "42", "exp": now() - 60}))),
        (
            "alg none",
            format!(
                "{}.{claims}.",
                URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#)
            ),
        ),
        (
            "RS256 header with an HS signature",
            format!(
                "{}.{claims}.{}",
                URL_SAFE_NO_PAD.encode(br#"{"alg":"RS256","typ":"JWT"}"#),
                good.rsplit_once('.').unwrap().1
            ),
        ),
        ("missing sub", jwt(json!({"exp": now() + 600}))),
        ("empty sub", jwt(json!({"sub": "", "exp": now() + 600}))),
        (
            "not valid before an hour from now",
            jwt(json!({"sub": "42", "nbf": now() + 3600, "exp": now() + 7200})),
        ),
        ("garbage", "garbage".to_string()),
    ];
    for (what, token) in cases {
        let status = refused(
            bridge
                .connect_with(&[("authorization", &format!("Bearer {token}"))])
                .await,
        );
        assert_eq!(status, 401, "{what}");
    }
    // No credentials at all: anonymous, because it is allowed here.
    let client = bridge.connect().await;
    drop(client);
}

#[tokio::test]
async fn missing_credentials_are_401_when_anonymous_access_is_off() {
    let bridge = Bridge::start("{}", None, with_jwt).await;
    assert_eq!(refused(bridge.connect_with(&[]).await), 401);
    let (status, body) = http_call(
        "GET",
        &bridge.http_url("/ws"),
        &[
            ("upgrade", "websocket"),
            ("connection", "upgrade"),
            ("sec-websocket-version", "13"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ],
        "",
    )
    .await;
    assert_eq!((status, body["code"].as_str()), (401, Some("unauthorized")));
}

#[tokio::test]
async fn rooms_follow_the_grants_and_never_more() {
    let bridge = Bridge::start("{}", None, with_jwt).await;
    let token = user_token("42", &["task:10*", "org:7"]);
    let (mut client, _) = connect_url(&bridge, &format!("?token={token}"), &[])
        .await
        .unwrap();
    let join = |room: &str| json!({"room": room});
    for room in ["user:42", "task:10", "task:1055", "org:7"] {
        let r = client.request("@@patchbay/SUBSCRIBE", join(room)).await;
        assert_eq!(r["type"], "@@patchbay/SUBSCRIBE_SUCCESS", "{room}: {r}");
    }
    for room in [
        "user:43",
        "user:420",
        "user:4",
        "task:1",
        "task:2",
        "org:70",
        "org:",
        "org:7:admin",
    ] {
        let r = client.request("@@patchbay/SUBSCRIBE", join(room)).await;
        assert_failure(&r, "@@patchbay/SUBSCRIBE", "forbidden");
    }
    // Another user's room token does not open the room either.
    let foreign = bridge.app.room_tokens.issue("task:99", Some("43"));
    let r = client
        .request(
            "@@patchbay/SUBSCRIBE",
            json!({"room": "task:99", "token": foreign}),
        )
        .await;
    assert_failure(&r, "@@patchbay/SUBSCRIBE", "forbidden");
    let own = bridge.app.room_tokens.issue("task:99", Some("42"));
    let r = client
        .request(
            "@@patchbay/SUBSCRIBE",
            json!({"room": "task:99", "token": own}),
        )
        .await;
    assert_eq!(r["type"], "@@patchbay/SUBSCRIBE_SUCCESS", "{r}");
}

#[tokio::test]
async fn a_user_receives_what_is_published_to_their_user_room() {
    let bridge = Bridge::start("{}", None, |c| {
        with_jwt(c);
        c.publish_token = Some("tok".into());
    })
    .await;
    let (mut alice, _) = connect_url(&bridge, &format!("?token={}", user_token("42", &[])), &[])
        .await
        .unwrap();
    let (mut bob, _) = connect_url(&bridge, &format!("?token={}", user_token("43", &[])), &[])
        .await
        .unwrap();
    let body = json!({"rooms": ["user:42"], "action": {"type": "NOTIFY", "payload": "hi"}});
    let (status, _) = publish(&bridge, body).await;
    assert_eq!(status, 202);
    // `user:` rooms keep history by default: the action carries its id and offset there.
    let got = alice.recv().await;
    let id = got["meta"]["id"].as_str().unwrap_or_default().to_string();
    assert!(uuid::Uuid::try_parse(&id).is_ok(), "{got}");
    assert_eq!(
        got,
        json!({"type": "NOTIFY", "payload": "hi", "meta": {"room": "user:42", "id": id, "offset": 1}})
    );
    assert_answers_ping(&mut bob).await;
}

#[tokio::test]
async fn an_expiring_token_closes_the_connection_with_4401() {
    let bridge = Bridge::start("{}", None, |c| {
        with_jwt(c);
        c.jwt_leeway = Duration::ZERO;
    })
    .await;
    let token = jwt(json!({"sub": "42", "exp": now() + 2}));
    let (mut client, _) = connect_url(&bridge, &format!("?token={token}"), &[])
        .await
        .unwrap();
    assert_answers_ping(&mut client).await;
    let close = client.closed().await.expect("a close frame");
    assert_eq!(u16::from(close.code), 4401);
}

fn delegated(upstream: &Upstream, c: &mut Config) {
    c.auth_url = Some(format!("{}/auth", upstream.url()));
    c.allow_anonymous = false;
    c.auth_timeout = Duration::from_millis(300);
}

fn auth_calls(upstream: &Upstream) -> usize {
    upstream
        .recorded()
        .iter()
        .filter(|r| r.target == "/auth")
        .count()
}

#[tokio::test]
async fn delegated_auth_accepts_mirrors_and_fails_closed() {
    let upstream = Upstream::start().await;
    let bridge = Bridge::start("{}", None, |c| delegated(&upstream, c)).await;

    let mut good = bridge
        .connect_with(&[("cookie", "sid=good")])
        .await
        .expect("accepted");
    let hello = good.recv().await;
    assert_eq!(
        (
            hello["payload"]["userId"].as_str(),
            &hello["payload"]["rooms"]
        ),
        (Some("7"), &json!(["user:7"]))
    );
    let r = good
        .request("@@patchbay/SUBSCRIBE", json!({"room": "org:7"}))
        .await;
    assert_eq!(r["type"], "@@patchbay/SUBSCRIBE_SUCCESS", "{r}");
    let r = good
        .request("@@patchbay/SUBSCRIBE", json!({"room": "org:8"}))
        .await;
    assert_failure(&r, "@@patchbay/SUBSCRIBE", "forbidden");
    let asked = upstream.recorded();
    let asked = &asked.iter().find(|r| r.target == "/auth").unwrap().headers;
    assert_eq!(asked["cookie"], "sid=good");
    // The auth service learns the client's address too (here the test's own).
    assert_eq!(asked["x-forwarded-for"], "127.0.0.1");

    assert_eq!(
        refused(bridge.connect_with(&[("cookie", "sid=bad")]).await),
        401
    );
    assert_eq!(
        refused(bridge.connect_with(&[("cookie", "sid=forbid")]).await),
        403
    );
    // An answer that names nobody (`"userId": ""`) is a refusal, never user "".
    assert_eq!(
        refused(bridge.connect_with(&[("cookie", "sid=nobody")]).await),
        401
    );
    assert_eq!(
        refused(bridge.connect_with(&[("cookie", "sid=slow")]).await),
        503
    );
    assert_eq!(
        refused(bridge.connect_with(&[("cookie", "sid=broken")]).await),
        503
    );
    assert_eq!(
        refused(bridge.connect_with(&[("cookie", "sid=crash")]).await),
        503
    );
    // No credentials, anonymous off by default when auth is configured.
    assert_eq!(refused(bridge.connect_with(&[]).await), 401);
}

#[tokio::test]
async fn delegated_auth_is_asked_every_time_and_never_mixes_users() {
    let upstream = Upstream::start().await;
    let bridge = Bridge::start("{}", None, |c| delegated(&upstream, c)).await;
    for _ in 0..3 {
        let mut a = bridge
            .connect_with(&[("cookie", "sid=good")])
            .await
            .unwrap();
        let mut b = bridge
            .connect_with(&[("cookie", "sid=other")])
            .await
            .unwrap();
        assert_eq!(a.recv().await["payload"]["userId"], "7");
        assert_eq!(b.recv().await["payload"]["userId"], "8");
    }
    assert_eq!(auth_calls(&upstream), 6, "no answer is cached");
}

#[tokio::test]
async fn an_unreachable_auth_service_is_503() {
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let bridge = Bridge::start("{}", None, |c| {
        c.auth_url = Some(format!("http://{dead}/auth"))
    })
    .await;
    assert_eq!(
        refused(bridge.connect_with(&[("cookie", "sid=good")]).await),
        503
    );
}

#[tokio::test]
async fn a_valid_jwt_needs_no_call_to_the_api_and_an_invalid_one_is_never_retried_there() {
    let upstream = Upstream::start().await;
    let bridge = Bridge::start("{}", None, |c| {
        with_jwt(c);
        delegated(&upstream, c);
    })
    .await;
    let (_client, hello) = connect_url(
        &bridge,
        &format!("?token={}", user_token("42", &[])),
        &[("cookie", "sid=good")],
    )
    .await
    .unwrap();
    assert_eq!(hello["payload"]["userId"], "42");
    assert_eq!(
        refused(
            bridge
                .connect_with(&[("authorization", "Bearer nope"), ("cookie", "sid=good")])
                .await
        ),
        401
    );
    assert_eq!(auth_calls(&upstream), 0);
    // Without a JWT, the API decides.
    let mut client = bridge
        .connect_with(&[("cookie", "sid=good")])
        .await
        .unwrap();
    assert_eq!(client.recv().await["payload"]["userId"], "7");
    assert_eq!(auth_calls(&upstream), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_handshakes_without_credentials_are_refused_and_nothing_breaks() {
    let bridge = std::sync::Arc::new(Bridge::start("{}", None, with_jwt).await);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..1000 {
        let bridge = bridge.clone();
        tasks.spawn(async move { refused(bridge.connect_with(&[]).await) });
    }
    let mut statuses = Vec::new();
    while let Some(s) = tasks.join_next().await {
        statuses.push(s.unwrap());
    }
    assert!(
        statuses.iter().all(|s| *s == 401),
        "{:?}",
        statuses.iter().find(|s| **s != 401)
    );
    assert_eq!(statuses.len(), 1000);
    assert_eq!(
        bridge.app.lifecycle.connections(),
        0,
        "refused handshakes hold no slot"
    );
    let (_client, hello) = connect_url(&bridge, &format!("?token={}", user_token("1", &[])), &[])
        .await
        .unwrap();
    assert_eq!(hello["payload"]["userId"], "1");
    assert_eq!(http_get(&bridge.http_url("/healthz")).await.0, 200);
}

#[tokio::test]
async fn delegated_auth_lets_anonymous_in_only_when_allowed_and_uncredentialed() {
    let upstream = Upstream::start().await;
    let bridge = Bridge::start("{}", None, |c| {
        delegated(&upstream, c);
        c.allow_anonymous = true;
    })
    .await;
    let client = bridge.connect().await;
    drop(client);
    assert_eq!(auth_calls(&upstream), 0, "nothing to ask about");
    // Credentials that the API refuses are never downgraded to anonymous.
    assert_eq!(
        refused(bridge.connect_with(&[("cookie", "sid=bad")]).await),
        401
    );
}
