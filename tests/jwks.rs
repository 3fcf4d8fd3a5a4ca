//! JWTs as identity providers issue them: RS256 and ES256, signed with keys the test makes
//! (`openssl`), published as a JWKS by a small HTTP server the test runs. Keys are pinned to
//! their algorithm (`none`, a public key used as an HMAC secret and a key of the wrong type are
//! refused), an unknown `kid` fetches the set again at most once per interval, a rotated key
//! is found, and an unreachable provider is 503, not 401.

mod common;

use std::convert::Infallible;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use common::*;
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Error as WsError;

/// A key made by `openssl`: its signing key and its public JWK.
struct TestKey {
    encoding: EncodingKey,
    jwk: Jwk,
    alg: Algorithm,
    /// The public key in PEM, for the HMAC-with-public-key forgery.
    public_pem: Vec<u8>,
}

fn openssl(dir: &std::path::Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run openssl ({e}): install it with `apt-get install openssl`")
        });
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl TestKey {
    /// `alg` RS256 (an RSA key) or ES256 (a P-256 key), with `kid`; `with_alg`: whether its
    /// JWK says its algorithm (providers often leave it out).
    fn make(alg: Algorithm, kid: &str, with_alg: bool) -> TestKey {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let encoding = match alg {
            Algorithm::RS256 => {
                openssl(
                    d,
                    &[
                        "genpkey",
                        "-algorithm",
                        "RSA",
                        "-pkeyopt",
                        "rsa_keygen_bits:2048",
                        "-out",
                        "k.pem",
                    ],
                );
                openssl(
                    d,
                    &[
                        "rsa",
                        "-in",
                        "k.pem",
                        "-traditional",
                        "-outform",
                        "DER",
                        "-out",
                        "k.der",
                    ],
                );
                EncodingKey::from_rsa_der(&std::fs::read(d.join("k.der")).unwrap())
            }
            Algorithm::ES256 => {
                openssl(
                    d,
                    &[
                        "genpkey",
                        "-algorithm",
                        "EC",
                        "-pkeyopt",
                        "ec_paramgen_curve:P-256",
                        "-out",
                        "k.pem",
                    ],
                );
                openssl(
                    d,
                    &[
                        "pkcs8", "-topk8", "-nocrypt", "-in", "k.pem", "-outform", "DER", "-out",
                        "k.der",
                    ],
                );
                EncodingKey::from_ec_der(&std::fs::read(d.join("k.der")).unwrap())
            }
            other => panic!("no test keys for {other:?}"),
        };
        openssl(d, &["pkey", "-in", "k.pem", "-pubout", "-out", "pub.pem"]);
        let mut jwk = match alg {
            // The public point is the last 64 bytes of the P-256 SubjectPublicKeyInfo.
            Algorithm::ES256 => {
                openssl(
                    d,
                    &[
                        "pkey", "-in", "k.pem", "-pubout", "-outform", "DER", "-out", "pub.der",
                    ],
                );
                let der = std::fs::read(d.join("pub.der")).unwrap();
                let point = &der[der.len() - 64..];
                serde_json::from_value(json!({
                    "kty": "EC", "crv": "P-256", "alg": "ES256",
                    "x": URL_SAFE_NO_PAD.encode(&point[..32]),
                    "y": URL_SAFE_NO_PAD.encode(&point[32..]),
                }))
                .unwrap()
            }
            _ => Jwk::from_encoding_key(&encoding, alg).unwrap(),
        };
        jwk.common.key_id = Some(kid.to_string());
        if !with_alg {
            jwk.common.key_algorithm = None;
        }
        TestKey {
            encoding,
            jwk,
            alg,
            public_pem: std::fs::read(d.join("pub.pem")).unwrap(),
        }
    }

    fn sign(&self, claims: &Value) -> String {
        let mut header = Header::new(self.alg);
        header.kid = self.jwk.common.key_id.clone();
        jsonwebtoken::encode(&header, claims, &self.encoding).unwrap()
    }
}

/// The provider: `GET /jwks.json` answers the set it holds now; requests are counted.
struct Provider {
    addr: std::net::SocketAddr,
    set: Arc<Mutex<String>>,
    fetches: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Provider {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Provider {
    async fn start(keys: &[&TestKey]) -> Provider {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let set = Arc::new(Mutex::new(String::new()));
        let fetches = Arc::new(AtomicUsize::new(0));
        let (s, f) = (set.clone(), fetches.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (s, f) = (s.clone(), f.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |_req| {
                        f.fetch_add(1, Ordering::SeqCst);
                        let body = s.lock().unwrap().clone();
                        async move {
                            Ok::<_, Infallible>(
                                hyper::Response::builder()
                                    .header("content-type", "application/json")
                                    .body(Full::new(Bytes::from(body)))
                                    .unwrap(),
                            )
                        }
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        let provider = Provider {
            addr,
            set,
            fetches,
            task,
        };
        provider.publish(keys);
        provider
    }

    fn publish(&self, keys: &[&TestKey]) {
        let set = JwkSet {
            keys: keys.iter().map(|k| k.jwk.clone()).collect(),
        };
        *self.set.lock().unwrap() = serde_json::to_string(&set).unwrap();
    }

    fn url(&self) -> String {
        format!("http://{}/jwks.json", self.addr)
    }

    fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }
}

async fn bridge(jwks_url: String, refetch_after: Duration) -> Bridge {
    Bridge::start("{}", None, |c| {
        c.jwks_url = Some(jwks_url);
        c.jwks_refetch_after = refetch_after;
        c.allow_anonymous = false;
    })
    .await
}

/// The handshake with `token`: the user id it is accepted as, or the refusal's status.
async fn handshake(bridge: &Bridge, token: &str) -> Result<String, u16> {
    match bridge
        .connect_with(&[("authorization", &format!("Bearer {token}"))])
        .await
    {
        Ok(mut client) => {
            let hello = client.recv().await;
            assert_eq!(hello["type"], "@@patchbay/CONNECTED", "{hello}");
            Ok(hello["payload"]["userId"].as_str().unwrap().to_string())
        }
        Err(WsError::Http(response)) => Err(response.status().as_u16()),
        Err(e) => panic!("{e}"),
    }
}

fn claims(sub: &str) -> Value {
    json!({"sub": sub, "exp": now() + 600})
}

/// Waits until the provider has been asked `n` times (the start-up fetch runs in the
/// background).
async fn fetched(provider: &Provider, n: usize) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while provider.fetches() < n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the JWKS was fetched {} times, not {n}",
            provider.fetches()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn provider_tokens_are_accepted_and_forgeries_refused() {
    let rsa = TestKey::make(Algorithm::RS256, "r", true);
    let ec = TestKey::make(Algorithm::ES256, "e", false);
    let provider = Provider::start(&[&rsa, &ec]).await;
    let bridge = bridge(provider.url(), Duration::from_secs(60)).await;
    fetched(&provider, 1).await;

    assert_eq!(
        handshake(&bridge, &rsa.sign(&claims("42"))).await,
        Ok("42".into())
    );
    assert_eq!(
        handshake(&bridge, &ec.sign(&claims("43"))).await,
        Ok("43".into()),
        "ES256, alg derived from the curve"
    );

    let exp = now() + 600;
    let body = URL_SAFE_NO_PAD.encode(json!({"sub": "42", "exp": exp}).to_string());
    let none = format!(
        "{}.{body}.",
        URL_SAFE_NO_PAD.encode(br#"{"alg":"none","kid":"r"}"#)
    );
    // HS256 with the RSA public key as the HMAC secret: the classic algorithm confusion.
    let mut hs = Header::new(Algorithm::HS256);
    hs.kid = Some("r".into());
    let confused = jsonwebtoken::encode(
        &hs,
        &claims("42"),
        &EncodingKey::from_secret(&rsa.public_pem),
    )
    .unwrap();
    // RS256 naming the EC key; a valid signature by another RSA key naming `r`.
    let mut wrong_type = Header::new(Algorithm::RS256);
    wrong_type.kid = Some("e".into());
    let wrong_type = jsonwebtoken::encode(&wrong_type, &claims("42"), &rsa.encoding).unwrap();
    let impostor = TestKey::make(Algorithm::RS256, "r", true).sign(&claims("42"));
    let expired = rsa.sign(&json!({"sub": "42", "exp": now() - 60}));
    for (what, token) in [
        ("alg none", none),
        ("HS256 with the public key", confused),
        ("RS256 naming an EC key", wrong_type),
        ("another key's signature", impostor),
        ("expired", expired),
    ] {
        assert_eq!(handshake(&bridge, &token).await, Err(401), "{what}");
    }
    let before = provider.fetches();
    // Unknown `kid`s fetch the set again at most once a minute, however many arrive.
    for n in 0..3 {
        let stranger = TestKey::make(Algorithm::ES256, &format!("unknown-{n}"), true);
        assert_eq!(
            handshake(&bridge, &stranger.sign(&claims("42"))).await,
            Err(401)
        );
    }
    assert!(
        provider.fetches() - before <= 1,
        "{} fetches for unknown kids",
        provider.fetches() - before
    );
}

#[tokio::test]
async fn a_rotated_key_is_fetched_when_a_token_names_it() {
    let old = TestKey::make(Algorithm::RS256, "2026-11", true);
    let new = TestKey::make(Algorithm::ES256, "2026-12", true);
    let provider = Provider::start(&[&old]).await;
    let bridge = bridge(provider.url(), Duration::from_millis(200)).await;
    fetched(&provider, 1).await;
    assert_eq!(
        handshake(&bridge, &old.sign(&claims("7"))).await,
        Ok("7".into())
    );
    provider.publish(&[&old, &new]);
    tokio::time::sleep(Duration::from_millis(250)).await;
    let before = provider.fetches();
    assert_eq!(
        handshake(&bridge, &new.sign(&claims("8"))).await,
        Ok("8".into())
    );
    assert_eq!(provider.fetches(), before + 1, "one fetch for the new kid");
    assert_eq!(
        handshake(&bridge, &new.sign(&claims("9"))).await,
        Ok("9".into())
    );
    assert_eq!(provider.fetches(), before + 1, "then it is known");
}

#[tokio::test]
async fn an_unreachable_provider_is_503_not_401() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let bridge = bridge(
        format!("http://{closed}/jwks.json"),
        Duration::from_millis(100),
    )
    .await;
    let key = TestKey::make(Algorithm::RS256, "r", true);
    assert_eq!(handshake(&bridge, &key.sign(&claims("42"))).await, Err(503));
}

#[tokio::test]
async fn with_both_methods_a_token_is_checked_by_the_one_its_header_names() {
    let rsa = TestKey::make(Algorithm::RS256, "r", true);
    let provider = Provider::start(&[&rsa]).await;
    let bridge = Bridge::start("{}", None, |c| {
        c.jwks_url = Some(provider.url());
        c.jwt_secret = Some(SECRET.into());
        c.allow_anonymous = false;
    })
    .await;
    fetched(&provider, 1).await;
    assert_eq!(
        handshake(&bridge, &rsa.sign(&claims("42"))).await,
        Ok("42".into())
    );
    assert_eq!(
        handshake(&bridge, &jwt(claims("43"))).await,
        Ok("43".into()),
        "HS256 by the secret"
    );
    let mut hs = Header::new(Algorithm::HS256);
    hs.kid = Some("r".into());
    let confused = jsonwebtoken::encode(
        &hs,
        &claims("44"),
        &EncodingKey::from_secret(&rsa.public_pem),
    )
    .unwrap();
    assert_eq!(
        handshake(&bridge, &confused).await,
        Err(401),
        "HS256 is the secret's, never a key's"
    );
}
