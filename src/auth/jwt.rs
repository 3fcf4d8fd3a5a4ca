//! HS256 JWTs (contract section 5), verified with `jsonwebtoken`: the algorithm is pinned (a
//! token whose header names any other `alg`, `none` included, is refused), `exp` is required
//! and checked with our own leeway, as is `nbf` when present; `sub` is the user id (never
//! empty), `rooms` an optional grant list.

use std::time::Duration;

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use super::Identity;
use crate::rooms::{RoomPattern, valid_room};

#[derive(Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
    #[serde(default)]
    rooms: Vec<String>,
}

/// Verifies tokens signed with `PATCHBAY_JWT_SECRET`.
pub struct JwtVerifier {
    key: DecodingKey,
    validation: Validation,
    leeway: u64,
}

impl JwtVerifier {
    /// A verifier for `secret`, allowing `leeway` of clock skew on `exp`.
    pub fn new(secret: &[u8], leeway: Duration) -> JwtVerifier {
        let mut validation = Validation::new(Algorithm::HS256);
        // The library's default is 60 s; the contract's is ours (5 s by default).
        validation.leeway = leeway.as_secs();
        validation.validate_aud = false;
        // A token issued for later is not valid yet: `nbf` is checked with the same leeway.
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp", "sub"]);
        JwtVerifier {
            key: DecodingKey::from_secret(secret),
            validation,
            leeway: leeway.as_secs(),
        }
    }

    /// The identity in `token`, or why it is refused.
    pub fn verify(&self, token: &str) -> Result<Identity, String> {
        let claims = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation)
            .map_err(|e| e.to_string())?
            .claims;
        if claims.sub.is_empty() {
            return Err("`sub` is empty".into());
        }
        if !valid_room(&format!("user:{}", claims.sub)) {
            return Err("`sub` must be 1-123 bytes of printable ASCII without spaces".into());
        }
        let grants = claims
            .rooms
            .iter()
            .map(|r| RoomPattern::parse(r))
            .collect::<Result<_, _>>()?;
        Ok(Identity {
            user_id: Some(claims.sub),
            grants,
            expires_at: Some(claims.exp.saturating_add(self.leeway)),
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
        JwtVerifier::new(SECRET, Duration::from_secs(5))
    }

    #[test]
    fn accepts_a_valid_token() {
        let exp = now_secs() + 60;
        let id = verifier()
            .verify(&sign(
                json!({"sub": "42", "exp": exp, "rooms": ["org:7", "task:10*"]}),
            ))
            .unwrap();
        assert_eq!(id.user_id.as_deref(), Some("42"));
        assert_eq!(id.grants.len(), 2);
        assert_eq!(id.expires_at, Some(exp + 5));
    }

    #[test]
    fn refuses_bad_tokens() {
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
            assert!(v.verify(&token).is_err(), "{what} must be refused");
        }
        assert!(
            v.verify(&sign(json!({"sub": "42", "exp": now_secs() - 2})))
                .is_ok(),
            "within the leeway"
        );
        assert!(
            v.verify(&sign(
                json!({"sub": "42", "exp": exp, "nbf": now_secs() + 2})
            ))
            .is_ok(),
            "nbf within the leeway"
        );
    }
}
