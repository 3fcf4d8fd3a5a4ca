//! Room tokens (contract section 5): `meta.roomToken` lets the same user rejoin a room granted
//! by `subscribe`, after a reconnect and on any instance sharing `PATCHBAY_ROOM_SECRET`.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::now_secs;

/// How long a room token stays valid.
pub const ROOM_TOKEN_TTL: Duration = Duration::from_secs(24 * 3600);

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

#[cfg(test)]
mod tests {
    use super::*;

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
        for junk in ["", ".", "x.y", "1.!!", "99999999999999999999999.abc"] {
            assert!(!t.verify(junk, "task:1", None), "{junk}");
        }
    }
}
