//! Who a connection is and where it may go (contract section 5): the handshake's Origin rule,
//! the connection's identity, room access, and room tokens.
//!
//! Credentials (JWT, delegated auth) are not implemented yet: every connection is anonymous
//! and start-up refuses a configuration that asks for authentication.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, KeyInit, Mac};
use hyper::HeaderMap;
use hyper::header::{HOST, ORIGIN};
use sha2::Sha256;

use crate::config::AllowedOrigins;
use crate::rooms::RoomPattern;

/// How long a room token stays valid.
pub const ROOM_TOKEN_TTL: Duration = Duration::from_secs(24 * 3600);

/// Whether a handshake's `Origin` may open a websocket: no `Origin` (not a browser), an
/// origin whose host equals the `Host` header, or an allowed origin.
pub fn origin_allowed(headers: &HeaderMap, allowed: &AllowedOrigins) -> bool {
    let Some(origin) = headers.get(ORIGIN) else {
        return true;
    };
    let Ok(origin) = origin.to_str() else {
        return false;
    };
    let origin = origin.trim().to_ascii_lowercase();
    if let Some(host) = headers.get(HOST).and_then(|h| h.to_str().ok())
        && origin_host(&origin) == Some(host.trim().to_ascii_lowercase().as_str())
    {
        return true;
    }
    match allowed {
        AllowedOrigins::Any => true,
        AllowedOrigins::List(list) => list.contains(&origin),
    }
}

/// The `host[:port]` of a serialized origin `scheme://host[:port]`.
pub fn origin_host(origin: &str) -> Option<&str> {
    let (scheme, rest) = origin.split_once("://")?;
    if !matches!(scheme, "http" | "https") || rest.is_empty() || rest.contains(['/', '@', '?', '#'])
    {
        return None;
    }
    Some(rest)
}

/// The authenticated identity of a connection.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Identity {
    /// The user id; `None` for anonymous connections.
    pub user_id: Option<String>,
    /// Rooms granted by the credentials (JWT `rooms`, delegated auth).
    pub grants: Vec<RoomPattern>,
}

impl Identity {
    /// The room every authenticated connection is in from the start.
    pub fn user_room(&self) -> Option<String> {
        self.user_id.as_ref().map(|id| format!("user:{id}"))
    }

    /// Whether this identity may join `room` without a token or a per-connection grant.
    pub fn may_join(&self, room: &str, public: &[RoomPattern]) -> bool {
        self.user_room().as_deref() == Some(room)
            || self.grants.iter().chain(public).any(|p| p.matches(room))
    }
}

/// Signs and checks room tokens: `<expiry unix secs>.<HMAC-SHA256 of room, user, expiry>`.
#[derive(Clone)]
pub struct RoomTokens {
    key: Hmac<Sha256>,
}

impl std::fmt::Debug for RoomTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RoomTokens(..)")
    }
}

impl RoomTokens {
    /// Tokens signed with `secret` (`PATCHBAY_ROOM_SECRET`).
    pub fn new(secret: &[u8]) -> RoomTokens {
        RoomTokens {
            key: Hmac::new_from_slice(secret).expect("HMAC takes keys of any length"),
        }
    }

    fn mac(&self, room: &str, user: Option<&str>, expires: u64) -> Hmac<Sha256> {
        let mut mac = self.key.clone();
        // Length-prefixed fields: no two (room, user) pairs produce the same input.
        let user = match user {
            Some(u) => format!("u{}:{u}", u.len()),
            None => "anonymous".to_string(),
        };
        mac.update(
            format!("patchbay-room-v1\n{}:{room}\n{user}\n{expires}", room.len()).as_bytes(),
        );
        mac
    }

    /// A token letting `user` (or an anonymous connection) join `room` for 24 hours.
    pub fn issue(&self, room: &str, user: Option<&str>) -> String {
        self.issue_at(room, user, now_secs() + ROOM_TOKEN_TTL.as_secs())
    }

    /// A token expiring at `expires` (unix seconds): for tests and tools that need a chosen
    /// expiry. Servers use [`RoomTokens::issue`].
    pub fn issue_at(&self, room: &str, user: Option<&str>, expires: u64) -> String {
        let tag = self.mac(room, user, expires).finalize().into_bytes();
        format!("{expires}.{}", URL_SAFE_NO_PAD.encode(tag))
    }

    /// Whether `token` lets `user` join `room` now.
    pub fn verify(&self, token: &str, room: &str, user: Option<&str>) -> bool {
        let Some((expires, tag)) = token.split_once('.') else {
            return false;
        };
        // Canonical digits only, so that a token has exactly one spelling.
        if expires.is_empty()
            || expires.starts_with('0')
            || !expires.bytes().all(|b| b.is_ascii_digit())
        {
            return false;
        }
        let Ok(expires) = expires.parse::<u64>() else {
            return false;
        };
        let Ok(tag) = URL_SAFE_NO_PAD.decode(tag) else {
            return false;
        };
        // verify_slice compares in constant time.
        expires >= now_secs() && self.mac(room, user, expires).verify_slice(&tag).is_ok()
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn origin_rule() {
        let none = AllowedOrigins::List(vec![]);
        assert!(
            origin_allowed(&headers(&[("host", "bridge:8080")]), &none),
            "no Origin: not a browser"
        );
        assert!(origin_allowed(
            &headers(&[("host", "bridge:8080"), ("origin", "http://bridge:8080")]),
            &none
        ));
        assert!(origin_allowed(
            &headers(&[("host", "Bridge:8080"), ("origin", "https://bridge:8080")]),
            &none
        ));
        assert!(!origin_allowed(
            &headers(&[("host", "bridge:8080"), ("origin", "http://evil.example")]),
            &none
        ));
        assert!(!origin_allowed(
            &headers(&[("host", "bridge:8080"), ("origin", "http://bridge:8081")]),
            &none
        ));
        assert!(!origin_allowed(
            &headers(&[("host", "bridge"), ("origin", "null")]),
            &none
        ));
        assert!(!origin_allowed(
            &headers(&[("host", "bridge"), ("origin", "http://user@bridge")]),
            &none
        ));
        let listed = AllowedOrigins::List(vec!["https://app.example.com".into()]);
        assert!(origin_allowed(
            &headers(&[("host", "bridge"), ("origin", "https://APP.example.com")]),
            &listed
        ));
        assert!(!origin_allowed(
            &headers(&[
                ("host", "bridge"),
                ("origin", "https://app.example.com.evil")
            ]),
            &listed
        ));
        assert!(origin_allowed(
            &headers(&[("host", "bridge"), ("origin", "http://anything")]),
            &AllowedOrigins::Any
        ));
    }

    #[test]
    fn room_access() {
        let anon = Identity::default();
        let public = vec![
            RoomPattern::parse("lobby").unwrap(),
            RoomPattern::parse("news:*").unwrap(),
        ];
        assert!(anon.may_join("lobby", &public));
        assert!(anon.may_join("news:today", &public));
        assert!(!anon.may_join("task:1", &public));
        assert!(!anon.may_join("user:", &public));
        let user = Identity {
            user_id: Some("42".into()),
            grants: vec![RoomPattern::parse("task:10*").unwrap()],
        };
        assert!(user.may_join("user:42", &[]));
        assert!(!user.may_join("user:43", &[]));
        assert!(!user.may_join("user:420", &[]));
        assert!(user.may_join("task:1055", &[]));
        assert!(!user.may_join("task:1", &[]));
    }

    #[test]
    fn room_tokens() {
        let t = RoomTokens::new(b"secret");
        let token = t.issue("task:1", Some("42"));
        assert!(t.verify(&token, "task:1", Some("42")));
        assert!(!t.verify(&token, "task:2", Some("42")), "bound to the room");
        assert!(!t.verify(&token, "task:1", Some("43")), "bound to the user");
        assert!(
            !t.verify(&token, "task:1", None),
            "a user's token is not an anonymous one"
        );
        assert!(
            !RoomTokens::new(b"other").verify(&token, "task:1", Some("42")),
            "bound to the secret"
        );
        let anon = t.issue("task:1", None);
        assert!(t.verify(&anon, "task:1", None));
        assert!(!t.verify(&anon, "task:1", Some("anonymous")));
        let expired = t.issue_at("task:1", None, now_secs() - 1);
        assert!(!t.verify(&expired, "task:1", None));
        let (exp, tag) = token.split_once('.').unwrap();
        let extended = format!("{}.{tag}", exp.parse::<u64>().unwrap() + 1000);
        assert!(
            !t.verify(&extended, "task:1", Some("42")),
            "expiry is signed"
        );
        let (exp, tag) = token.split_once('.').unwrap();
        assert!(
            !t.verify(&format!("+{exp}.{tag}"), "task:1", Some("42")),
            "one spelling per token"
        );
        assert!(
            !t.verify(&format!("0{exp}.{tag}"), "task:1", Some("42")),
            "one spelling per token"
        );
        let (exp, tag) = token.split_once('.').unwrap();
        assert!(
            !t.verify(&format!("+{exp}.{tag}"), "task:1", Some("42")),
            "one spelling per token"
        );
        assert!(
            !t.verify(&format!("0{exp}.{tag}"), "task:1", Some("42")),
            "one spelling per token"
        );
        for junk in ["", ".", "x.y", "1.!!", "99999999999999999999999.abc"] {
            assert!(!t.verify(junk, "task:1", None), "{junk}");
        }
    }
}
