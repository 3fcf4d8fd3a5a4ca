//! The signing keys of an identity provider, from its JWKS URL (`PATCHBAY_JWKS_URL`): fetched
//! at start-up and every hour, and again when a token names a `kid` not in the set — at most
//! once a minute, so tokens with made-up `kid`s cannot turn patchbay into a flood of requests
//! to the provider. Each key is pinned to one algorithm: its `alg` when the set gives one,
//! else RS256 for RSA and ES256/ES384 for P-256/P-384. Symmetric (`oct`) keys are never taken
//! from a set: a public key used as an HMAC secret is a classic forgery.

use std::sync::RwLock;
use std::time::{Duration, Instant};

use http_body_util::Full;
use hyper::Request;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey};

use crate::upstream::{Base, Client};

/// Largest key set read.
const MAX_SET_BYTES: usize = 256 * 1024;
/// How soon an unknown `kid` may fetch the set again.
pub const REFETCH_AFTER: Duration = Duration::from_secs(60);
/// How often the set is fetched anyway (keys rotate).
pub const REFRESH_EVERY: Duration = Duration::from_secs(3600);
/// How long one fetch may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// How soon a failed fetch may be tried again (a provider that was down is used again
/// within seconds of coming back, not a minute).
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(5);

/// One usable key.
pub struct Key {
    /// Its `kid`, when the set names it.
    pub kid: Option<String>,
    /// The one algorithm it verifies.
    pub alg: Algorithm,
    /// The key.
    pub key: DecodingKey,
}

/// Why no key verifies a token.
#[derive(Debug, PartialEq, Eq)]
pub enum Lookup {
    /// The set does not have it (after fetching again when allowed).
    Unknown,
    /// The set could never be fetched: the provider is unreachable.
    Unavailable,
}

/// The keys of one JWKS URL.
pub struct Jwks {
    client: Client,
    url: hyper::Uri,
    keys: RwLock<Vec<std::sync::Arc<Key>>>,
    /// When the set was last fetched (or tried) and whether that worked; `None` before the
    /// first time. `tokio` lock: one fetch at a time, the others wait for it.
    fetched: tokio::sync::Mutex<Option<(Instant, bool)>>,
    /// Whether any fetch has succeeded.
    loaded: std::sync::atomic::AtomicBool,
    /// [`REFETCH_AFTER`] (tests shorten it).
    refetch_after: Duration,
}

impl Jwks {
    /// The set at `url`, fetched through `client` (nothing is fetched yet); an unknown `kid`
    /// fetches it again at most every `refetch_after`.
    pub fn new(client: Client, url: Base, refetch_after: Duration) -> Jwks {
        Jwks {
            refetch_after,
            client,
            url: url.as_uri(),
            keys: RwLock::default(),
            fetched: tokio::sync::Mutex::new(None),
            loaded: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// The key for a token with header `alg` and `kid`: by `kid`, or the only key when the
    /// token names none. An unknown `kid` fetches the set again if the last fetch is older
    /// than [`REFETCH_AFTER`] (and so does a first token before the set was ever fetched).
    pub async fn key(&self, kid: Option<&str>) -> Result<std::sync::Arc<Key>, Lookup> {
        if let Some(key) = self.find(kid) {
            return Ok(key);
        }
        self.fetch_if(self.refetch_after).await;
        match self.find(kid) {
            Some(key) => Ok(key),
            None if !self.loaded.load(std::sync::atomic::Ordering::Acquire) => {
                Err(Lookup::Unavailable)
            }
            None => Err(Lookup::Unknown),
        }
    }

    fn find(&self, kid: Option<&str>) -> Option<std::sync::Arc<Key>> {
        let keys = self.keys.read().unwrap();
        match kid {
            Some(kid) => keys.iter().find(|k| k.kid.as_deref() == Some(kid)).cloned(),
            None if keys.len() == 1 => keys.first().cloned(),
            None => None,
        }
    }

    /// Fetches the set unless it was fetched (or tried) less than `age` ago.
    pub async fn fetch_if(&self, age: Duration) {
        let mut fetched = self.fetched.lock().await;
        if let Some((at, worked)) = *fetched {
            let age = if worked {
                age
            } else {
                age.min(RETRY_AFTER_FAILURE)
            };
            if at.elapsed() < age {
                return;
            }
        }
        let result = tokio::time::timeout(FETCH_TIMEOUT, self.fetch()).await;
        *fetched = Some((Instant::now(), matches!(result, Ok(Ok(_)))));
        match result {
            Ok(Ok(keys)) => {
                tracing::info!(keys = keys.len(), "fetched the JWKS");
                *self.keys.write().unwrap() = keys.into_iter().map(std::sync::Arc::new).collect();
                self.loaded
                    .store(true, std::sync::atomic::Ordering::Release);
            }
            Ok(Err(e)) => {
                tracing::warn!(url = %self.url, error = %e, "cannot fetch the JWKS; keeping the keys it had")
            }
            Err(_) => {
                tracing::warn!(url = %self.url, "fetching the JWKS timed out; keeping the keys it had")
            }
        }
    }

    async fn fetch(&self) -> Result<Vec<Key>, String> {
        let req = Request::get(self.url.clone())
            .header(hyper::header::ACCEPT, "application/json")
            .body(Full::default())
            .expect("a valid URI and method make a valid request");
        let (parts, body) = self
            .client
            .call(req, MAX_SET_BYTES)
            .await
            .map_err(|e| e.to_string())?;
        if !parts.status.is_success() {
            return Err(format!("answered {}", parts.status.as_u16()));
        }
        let set: JwkSet =
            serde_json::from_slice(&body).map_err(|e| format!("not a JWK set: {e}"))?;
        Ok(usable(&set))
    }
}

/// The keys of `set` patchbay verifies with: signing keys with a known asymmetric algorithm.
pub fn usable(set: &JwkSet) -> Vec<Key> {
    set.keys
        .iter()
        .filter(|jwk| {
            !matches!(
                jwk.common.public_key_use,
                Some(jsonwebtoken::jwk::PublicKeyUse::Encryption)
            )
        })
        .filter_map(|jwk| {
            let alg = pinned(jwk)?;
            let key = DecodingKey::from_jwk(jwk).ok()?;
            Some(Key {
                kid: jwk.common.key_id.clone(),
                alg,
                key,
            })
        })
        .collect()
}

/// The one algorithm a key verifies; `None` for symmetric keys and unknown ones.
fn pinned(jwk: &Jwk) -> Option<Algorithm> {
    let alg = match (&jwk.algorithm, jwk.common.key_algorithm) {
        (AlgorithmParameters::OctetKey(_), _) | (AlgorithmParameters::Other(_), _) => return None,
        (_, Some(alg)) => alg.to_string().parse::<Algorithm>().ok()?,
        (AlgorithmParameters::RSA(_), None) => Algorithm::RS256,
        (AlgorithmParameters::EllipticCurve(ec), None) => match ec.curve {
            EllipticCurve::P256 => Algorithm::ES256,
            EllipticCurve::P384 => Algorithm::ES384,
            _ => return None,
        },
        (AlgorithmParameters::OctetKeyPair(_), None) => Algorithm::EdDSA,
        _ => return None,
    };
    // An `alg` that does not fit the key (HS256 on an RSA key, RS256 on an EC key) is refused.
    let fits = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => matches!(
            alg,
            Algorithm::RS256
                | Algorithm::RS384
                | Algorithm::RS512
                | Algorithm::PS256
                | Algorithm::PS384
                | Algorithm::PS512
        ),
        AlgorithmParameters::EllipticCurve(ec) => matches!(
            (alg, &ec.curve),
            (Algorithm::ES256, EllipticCurve::P256) | (Algorithm::ES384, EllipticCurve::P384)
        ),
        AlgorithmParameters::OctetKeyPair(_) => alg == Algorithm::EdDSA,
        _ => false,
    };
    fits.then_some(alg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn set(keys: serde_json::Value) -> JwkSet {
        serde_json::from_value(json!({ "keys": keys })).unwrap()
    }

    // A P-256 public key (x, y) and an RSA modulus, from test keys.
    const X: &str = "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU";
    const Y: &str = "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0";
    const N: &str = "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw";

    #[test]
    fn keys_are_pinned_to_one_algorithm_and_symmetric_ones_are_never_taken() {
        let keys = usable(&set(json!([
            {"kty": "RSA", "kid": "r", "n": N, "e": "AQAB"},
            {"kty": "EC", "kid": "e", "crv": "P-256", "x": X, "y": Y},
            {"kty": "RSA", "kid": "r5", "alg": "RS512", "n": N, "e": "AQAB"},
            {"kty": "oct", "kid": "h", "k": "c2VjcmV0", "alg": "HS256"},
            {"kty": "RSA", "kid": "rh", "alg": "HS256", "n": N, "e": "AQAB"},
            {"kty": "EC", "kid": "er", "alg": "RS256", "crv": "P-256", "x": X, "y": Y},
            {"kty": "EC", "kid": "e384", "alg": "ES384", "crv": "P-256", "x": X, "y": Y},
            {"kty": "RSA", "kid": "enc", "use": "enc", "n": N, "e": "AQAB"},
        ])));
        let pinned: Vec<(Option<&str>, Algorithm)> =
            keys.iter().map(|k| (k.kid.as_deref(), k.alg)).collect();
        assert_eq!(
            pinned,
            [
                (Some("r"), Algorithm::RS256),
                (Some("e"), Algorithm::ES256),
                (Some("r5"), Algorithm::RS512)
            ]
        );
    }
}
