//! Who a connection is and where it may go (contract section 5): the handshake's Origin rule,
//! credentials (HS256 JWT, delegated auth), the connection's identity, room access, and room
//! tokens.

mod delegated;
pub mod jwks;
mod jwt;
mod room_token;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hyper::HeaderMap;
use hyper::StatusCode;
use hyper::header::{AUTHORIZATION, COOKIE, ORIGIN};

pub use delegated::DelegatedAuth;
pub use jwt::{Checks, JwtError, JwtVerifier};
pub use room_token::{ROOM_TOKEN_TTL, RoomTokens};

/// The cookie that may carry a JWT.
pub const TOKEN_COOKIE: &str = "patchbay_token";

/// Seconds since the epoch.
pub(crate) fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Why a handshake is refused; each maps to an HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reject {
    /// 401: missing (when anonymous access is off) or invalid credentials.
    Unauthorized,
    /// 403: the auth service said so.
    Forbidden,
    /// 503: the auth service is unreachable, slow or broken.
    Unavailable,
}

impl Reject {
    /// The handshake's HTTP status.
    pub fn status(self) -> StatusCode {
        match self {
            Reject::Unauthorized => StatusCode::UNAUTHORIZED,
            Reject::Forbidden => StatusCode::FORBIDDEN,
            Reject::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The error code in the JSON body.
    pub fn code(self) -> &'static str {
        match self {
            Reject::Unauthorized => "unauthorized",
            Reject::Forbidden => "forbidden",
            Reject::Unavailable => "auth_unavailable",
        }
    }

    /// The error message in the JSON body.
    pub fn message(self) -> &'static str {
        match self {
            Reject::Unauthorized => "missing or invalid credentials",
            Reject::Forbidden => "the API refused these credentials",
            Reject::Unavailable => "the auth service did not answer; try again",
        }
    }
}

/// Decides who a handshake is, from its credentials.
pub struct Authenticator {
    jwt: Option<JwtVerifier>,
    delegated: Option<DelegatedAuth>,
    allow_anonymous: bool,
}

impl Authenticator {
    /// An authenticator with the configured methods.
    pub fn new(
        jwt: Option<JwtVerifier>,
        delegated: Option<DelegatedAuth>,
        allow_anonymous: bool,
    ) -> Authenticator {
        Authenticator {
            jwt,
            delegated,
            allow_anonymous,
        }
    }

    /// The identity provider's key set, when JWTs are checked against one.
    pub fn key_set(&self) -> Option<&std::sync::Arc<jwks::Jwks>> {
        self.jwt.as_ref().and_then(JwtVerifier::key_set)
    }

    /// The identity of a handshake. `forwarded` are the headers named in
    /// `PATCHBAY_FORWARD_HEADERS` (what the API sees as credentials).
    ///
    /// A JWT, when JWT auth is on, decides alone: valid is in, invalid is 401, never downgraded
    /// to anonymous. Otherwise delegated auth asks the API whenever the handshake carries
    /// credentials. With none at all, the connection is anonymous if that is allowed.
    /// The auth service also gets `X-Forwarded-For: <client>` when the client is known.
    pub async fn authenticate(
        &self,
        headers: &HeaderMap,
        query: Option<&str>,
        forwarded: &HeaderMap,
        client: Option<std::net::IpAddr>,
    ) -> Result<Identity, Reject> {
        if let Some(jwt) = &self.jwt
            && let Some(token) = presented_token(headers, query)
        {
            return jwt.verify(&token).await.map_err(|e| match e {
                JwtError::Invalid(why) => {
                    tracing::info!(reason = %why, "refused a JWT");
                    Reject::Unauthorized
                }
                JwtError::Unavailable => {
                    tracing::warn!("a JWT's key cannot be known: the JWKS was never fetched");
                    Reject::Unavailable
                }
            });
        }
        if let Some(delegated) = &self.delegated
            && !forwarded.is_empty()
        {
            let mut asked = forwarded.clone();
            if let Some(client) = client {
                crate::client_addr::set_forwarded_for(&mut asked, client);
            }
            return delegated.check(&asked).await;
        }
        if self.allow_anonymous {
            Ok(Identity::default())
        } else {
            Err(Reject::Unauthorized)
        }
    }
}

/// A JWT from `?token=`, `Authorization: Bearer`, or the `patchbay_token` cookie, in that order.
pub fn presented_token(headers: &HeaderMap, query: Option<&str>) -> Option<String> {
    let from_query = query.and_then(|q| {
        q.split('&')
            .find_map(|pair| pair.strip_prefix("token="))
            .map(|t| {
                percent_encoding::percent_decode_str(t)
                    .decode_utf8_lossy()
                    .into_owned()
            })
    });
    let from_header = || {
        headers.get(AUTHORIZATION)?.to_str().ok().and_then(|h| {
            let (scheme, token) = h.trim().split_once(' ')?;
            scheme
                .eq_ignore_ascii_case("bearer")
                .then(|| token.trim().to_string())
        })
    };
    let from_cookie = || {
        headers
            .get_all(COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .find_map(|c| {
                let (name, value) = c.trim().split_once('=')?;
                (name == TOKEN_COOKIE).then(|| value.to_string())
            })
    };
    from_query
        .or_else(from_header)
        .or_else(from_cookie)
        .filter(|t| !t.is_empty())
}

/// When a connection's credentials expire, as a delay from now (`None`: never). Capped at a
/// year, so that a far-future `exp` cannot overflow a timer.
pub fn expires_in(identity: &Identity) -> Option<Duration> {
    const YEAR: u64 = 365 * 24 * 3600;
    identity
        .expires_at
        .map(|at| Duration::from_secs(at.saturating_sub(now_secs()).min(YEAR)))
}

use crate::config::AllowedOrigins;
use crate::rooms::RoomPattern;

/// Whether a handshake's `Origin` may open a websocket: no `Origin` (not a browser), an
/// origin whose host equals the `Host` header, or an allowed origin.
pub fn origin_allowed(headers: &HeaderMap, host: Option<&str>, allowed: &AllowedOrigins) -> bool {
    let Some(origin) = headers.get(ORIGIN) else {
        return true;
    };
    let Ok(origin) = origin.to_str() else {
        return false;
    };
    let origin = origin.trim().to_ascii_lowercase();
    if let Some(host) = host
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
    /// When the credentials expire (unix seconds, leeway included): the connection is closed
    /// with 4401 then.
    pub expires_at: Option<u64>,
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

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::HOST;

    /// The Origin rule against the request's own `Host`.
    fn allowed(headers: &HeaderMap, origins: &AllowedOrigins) -> bool {
        let host = headers.get(HOST).and_then(|h| h.to_str().ok());
        origin_allowed(headers, host, origins)
    }

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
            allowed(&headers(&[("host", "bridge:8080")]), &none),
            "no Origin: not a browser"
        );
        assert!(allowed(
            &headers(&[("host", "bridge:8080"), ("origin", "http://bridge:8080")]),
            &none
        ));
        assert!(allowed(
            &headers(&[("host", "Bridge:8080"), ("origin", "https://bridge:8080")]),
            &none
        ));
        assert!(!allowed(
            &headers(&[("host", "bridge:8080"), ("origin", "http://evil.example")]),
            &none
        ));
        assert!(!allowed(
            &headers(&[("host", "bridge:8080"), ("origin", "http://bridge:8081")]),
            &none
        ));
        assert!(!allowed(
            &headers(&[("host", "bridge"), ("origin", "null")]),
            &none
        ));
        assert!(!allowed(
            &headers(&[("host", "bridge"), ("origin", "http://user@bridge")]),
            &none
        ));
        let listed = AllowedOrigins::List(vec!["https://app.example.com".into()]);
        assert!(allowed(
            &headers(&[("host", "bridge"), ("origin", "https://APP.example.com")]),
            &listed
        ));
        assert!(!allowed(
            &headers(&[
                ("host", "bridge"),
                ("origin", "https://app.example.com.evil")
            ]),
            &listed
        ));
        assert!(allowed(
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
            ..Identity::default()
        };
        assert!(user.may_join("user:42", &[]));
        assert!(!user.may_join("user:43", &[]));
        assert!(!user.may_join("user:420", &[]));
        assert!(user.may_join("task:1055", &[]));
        assert!(!user.may_join("task:1", &[]));
    }

    #[test]
    fn tokens_are_found_in_three_places_in_order() {
        let h = headers(&[
            ("authorization", "Bearer from-header"),
            ("cookie", "a=1; patchbay_token=from-cookie"),
        ]);
        assert_eq!(
            presented_token(&h, Some("x=1&token=from%2Dquery")).as_deref(),
            Some("from-query")
        );
        assert_eq!(
            presented_token(&h, Some("x=1")).as_deref(),
            Some("from-header")
        );
        let h = headers(&[
            ("authorization", "Basic abc"),
            ("cookie", "a=1; patchbay_token=from-cookie"),
        ]);
        assert_eq!(presented_token(&h, None).as_deref(), Some("from-cookie"));
        assert_eq!(
            presented_token(&headers(&[("cookie", "patchbay_tokenx=1")]), None),
            None
        );
        assert_eq!(presented_token(&HeaderMap::new(), Some("token=")), None);
    }
}
