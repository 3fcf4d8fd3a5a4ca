//! JWTs (contract section 5), verified with `jsonwebtoken`: HS256 with `PATCHBAY_JWT_SECRET`,
//! or the asymmetric keys (RS256, ES256, …) of an identity provider's `PATCHBAY_JWKS_URL`
//! ([`super::jwks`]). The algorithm is pinned — HS256 for the secret, each key's own for a
//! key set — so a token whose header names any other `alg`, `none` included, is refused, and
//! a public key is never used as an HMAC secret. `exp` is required and checked with our own
//! leeway, as is `nbf` when present; `iss` and `aud` when `PATCHBAY_JWT_ISSUER` /
//! `PATCHBAY_JWT_AUDIENCE` are set; `sub` is the user id (never empty), `rooms` an optional
//! grant list.

use std::sync::Arc;
use std::time::Duration;

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use super::Identity;
use super::jwks::{Jwks, Lookup};
use crate::rooms::{RoomPattern, valid_room};

#[derive(Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
    #[serde(default)]
    rooms: Vec<String>,
}

/// Why a token is not accepted.
#[derive(Debug, PartialEq, Eq)]
pub enum JwtError {
    /// The token is not valid: 401.
    Invalid(String),
    /// Its key cannot be known now (the key set was never fetched): 503.
    Unavailable,
}

/// What every token must also satisfy.
#[derive(Debug, Clone, Default)]
pub struct Checks {
    /// Clock skew allowed on `exp` and `nbf`.
    pub leeway: Duration,
    /// The `iss` required, if any.
    pub issuer: Option<String>,
    /// An `aud` required, if any.
    pub audience: Option<String>,
}

/// Verifies tokens signed with `PATCHBAY_JWT_SECRET` or by a key of `PATCHBAY_JWKS_URL`
/// (with both, by the method the token's header names: HS256 the secret, anything else the
/// key set).
pub struct JwtVerifier {
    secret: Option<DecodingKey>,
    set: Option<Arc<Jwks>>,
    checks: Checks,
}

impl JwtVerifier {
    /// HS256 tokens signed with `secret`.
    pub fn hs256(secret: &[u8], checks: Checks) -> JwtVerifier {
        JwtVerifier {
            secret: Some(DecodingKey::from_secret(secret)),
            set: None,
            checks,
        }
    }

    /// The verifier of the configured methods; `None` when neither is.
    pub fn new(secret: Option<&[u8]>, set: Option<Arc<Jwks>>, checks: Checks) -> Option<Self> {
        (secret.is_some() || set.is_some()).then(|| JwtVerifier {
            secret: secret.map(DecodingKey::from_secret),
            set,
            checks,
        })
    }

    /// Tokens signed by a key of `jwks`.
    pub fn jwks(jwks: Arc<Jwks>, checks: Checks) -> JwtVerifier {
        JwtVerifier {
            secret: None,
            set: Some(jwks),
            checks,
        }
    }

    /// The key set, when tokens are checked against one (kept fresh in the background).
    pub fn key_set(&self) -> Option<&Arc<Jwks>> {
        self.set.as_ref()
    }

    fn validation(&self, alg: Algorithm) -> Validation {
        let mut validation = Validation::new(alg);
        // The library's default is 60 s; the contract's is ours (5 s by default).
        validation.leeway = self.checks.leeway.as_secs();
        // A token issued for later is not valid yet: `nbf` is checked with the same leeway.
        validation.validate_nbf = true;
        let mut required = vec!["exp", "sub"];
        match &self.checks.audience {
            Some(aud) => {
                validation.set_audience(&[aud]);
                required.push("aud");
            }
            None => validation.validate_aud = false,
        }
        if let Some(iss) = &self.checks.issuer {
            validation.set_issuer(&[iss]);
            required.push("iss");
        }
        validation.set_required_spec_claims(&required);
        validation
    }

    /// The identity in `token`, or why it is refused.
    pub async fn verify(&self, token: &str) -> Result<Identity, JwtError> {
        let invalid = |e: &dyn std::fmt::Display| JwtError::Invalid(e.to_string());
        let hs256 = |key: &DecodingKey| {
            jsonwebtoken::decode::<Claims>(token, key, &self.validation(Algorithm::HS256))
                .map(|t| t.claims)
                .map_err(|e| invalid(&e))
        };
        let claims = match (&self.secret, &self.set) {
            (Some(key), None) => hs256(key)?,
            (None, None) => return Err(JwtError::Invalid("no JWT method is set".into())),
            (secret, Some(jwks)) => {
                let header = jsonwebtoken::decode_header(token).map_err(|e| invalid(&e))?;
                if let (Algorithm::HS256, Some(key)) = (header.alg, secret) {
                    return self.identity(hs256(key)?);
                }
                let key = match jwks.key(header.kid.as_deref()).await {
                    Ok(key) => key,
                    Err(Lookup::Unavailable) => return Err(JwtError::Unavailable),
                    Err(Lookup::Unknown) => {
                        return Err(JwtError::Invalid(format!(
                            "no key {} in the JWKS",
                            header.kid.as_deref().unwrap_or("(the token names none)")
                        )));
                    }
                };
                if header.alg != key.alg {
                    return Err(JwtError::Invalid(format!(
                        "the token says {:?}, its key is {:?} only",
                        header.alg, key.alg
                    )));
                }
                jsonwebtoken::decode::<Claims>(token, &key.key, &self.validation(key.alg))
                    .map_err(|e| invalid(&e))?
                    .claims
            }
        };
        self.identity(claims)
    }

    /// The identity `claims` name, or why they are refused.
    fn identity(&self, claims: Claims) -> Result<Identity, JwtError> {
        if claims.sub.is_empty() {
            return Err(JwtError::Invalid("`sub` is empty".into()));
        }
        if !valid_room(&format!("user:{}", claims.sub)) {
            return Err(JwtError::Invalid(
                "`sub` must be 1-123 bytes of printable ASCII without spaces".into(),
            ));
        }
        let grants = claims
            .rooms
            .iter()
            .map(|r| RoomPattern::parse(r))
            .collect::<Result<_, _>>()
            .map_err(JwtError::Invalid)?;
        Ok(Identity {
            user_id: Some(claims.sub),
            grants,
            expires_at: Some(claims.exp.saturating_add(self.checks.leeway.as_secs())),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::now_secs;
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use jsonwebtoken::{EncodingKey, Header, encode};
    use serde_json::json;

    const SECRET: &[u8] = b"a test secret of enough length";

    fn sign(claims: serde_json::Value) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(SECRET),
        )
        .unwrap()
    }

    fn verifier() -> JwtVerifier {
        JwtVerifier::hs256(
            SECRET,
            Checks {
                leeway: Duration::from_secs(5),
                ..Checks::default()
            },
        )
    }

    #[tokio::test]
    async fn accepts_a_valid_token() {
        let exp = now_secs() + 60;
        let id = verifier()
            .verify(&sign(
                json!({"sub": "42", "exp": exp, "rooms": ["org:7", "task:10*"]}),
            ))
            .await
            .unwrap();
        assert_eq!(id.user_id.as_deref(), Some("42"));
        assert_eq!(id.grants.len(), 2);
        assert_eq!(id.expires_at, Some(exp + 5));
    }

    #[tokio::test]
    async fn refuses_bad_tokens() {
        let v = verifier();
        let exp = now_secs() + 60;
        let good = sign(json!({"sub": "42", "exp": exp}));
        let (head_and_claims, _) = good.rsplit_once('.').unwrap();
        let forged = format!("{head_and_claims}.{}", URL_SAFE_NO_PAD.encode([0u8; 32]));
        let none_alg = format!(
            "{}.{}.",
            URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#),
            URL_SAFE_NO_PAD.encode(json!({"sub": "42", "exp": exp}).to_string())
        );
        let rs256_header = format!(
            "{}.{}.{}",
            URL_SAFE_NO_PAD.encode(br#"{"alg":"RS256","typ":"JWT"}"#),
            URL_SAFE_NO_PAD.encode(json!({"sub": "42", "exp": exp}).to_string()),
            good.rsplit_once('.').unwrap().1
        );
        let other_secret = encode(
            &Header::new(Algorithm::HS256),
            &json!({"sub": "42", "exp": exp}),
            &EncodingKey::from_secret(b"another secret"),
        )
        .unwrap();
        let hs512 = encode(
            &Header::new(Algorithm::HS512),
            &json!({"sub": "42", "exp": exp}),
            &EncodingKey::from_secret(SECRET),
        )
        .unwrap();
        for (what, token) in [
            ("forged signature", forged),
            ("alg none", none_alg),
            ("RS256 header", rs256_header),
            ("other secret", other_secret),
            ("HS512", hs512),
            (
                "expired beyond leeway",
                sign(json!({"sub": "42", "exp": now_secs() - 10})),
            ),
            ("no exp", sign(json!({"sub": "42"}))),
            ("no sub", sign(json!({"exp": exp}))),
            ("empty sub", sign(json!({"sub": "", "exp": exp}))),
            (
                "not valid for an hour",
                sign(json!({"sub": "42", "exp": exp + 7200, "nbf": now_secs() + 3600})),
            ),
            ("bad sub", sign(json!({"sub": "a b", "exp": exp}))),
            (
                "bad rooms",
                sign(json!({"sub": "42", "exp": exp, "rooms": ["has space"]})),
            ),
            ("garbage", "not.a.jwt".to_string()),
        ] {
            assert!(v.verify(&token).await.is_err(), "{what} must be refused");
        }
        assert!(
            v.verify(&sign(json!({"sub": "42", "exp": now_secs() - 2})))
                .await
                .is_ok(),
            "within the leeway"
        );
        assert!(
            v.verify(&sign(
                json!({"sub": "42", "exp": exp, "nbf": now_secs() + 2})
            ))
            .await
            .is_ok(),
            "nbf within the leeway"
        );
    }

    #[tokio::test]
    async fn issuer_and_audience_are_required_when_set() {
        let v = JwtVerifier::hs256(
            SECRET,
            Checks {
                leeway: Duration::from_secs(5),
                issuer: Some("https://id.example.com/".into()),
                audience: Some("patchbay".into()),
            },
        );
        let exp = now_secs() + 60;
        let good =
            json!({"sub": "42", "exp": exp, "iss": "https://id.example.com/", "aud": "patchbay"});
        assert!(v.verify(&sign(good.clone())).await.is_ok());
        let in_a_list = json!({"sub": "42", "exp": exp, "iss": "https://id.example.com/", "aud": ["other", "patchbay"]});
        assert!(v.verify(&sign(in_a_list)).await.is_ok());
        for (claim, value) in [
            ("iss", json!("https://evil.example/")),
            ("aud", json!("other")),
        ] {
            let mut bad = good.clone();
            bad[claim] = value;
            assert!(v.verify(&sign(bad)).await.is_err(), "wrong {claim}");
            let mut missing = good.clone();
            missing.as_object_mut().unwrap().remove(claim);
            assert!(v.verify(&sign(missing)).await.is_err(), "no {claim}");
        }
    }
}
