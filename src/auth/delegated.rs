//! Delegated authentication (contract section 5, as high-templar does it): the API says who the
//! handshake's credentials belong to. `GET PATCHBAY_AUTH_URL` with the forwarded headers, no
//! redirects, a short timeout; 2xx `{"userId","rooms"}` accepts, 401/403 are mirrored, anything
//! else is 503. Nothing is cached: every handshake asks.

use std::time::Duration;

use http_body_util::Full;
use hyper::{HeaderMap, Request};
use serde::Deserialize;
use serde_json::Value;

use super::{Identity, Reject};
use crate::rooms::{RoomPattern, valid_room};
use crate::upstream::{Base, Client};

/// Largest answer read from the auth endpoint.
const MAX_ANSWER_BYTES: usize = 64 * 1024;

#[derive(Deserialize)]
struct Answer {
    #[serde(rename = "userId", default)]
    user_id: Value,
    #[serde(default)]
    rooms: Vec<String>,
}

/// Asks the API who a handshake is.
pub struct DelegatedAuth {
    client: Client,
    url: hyper::Uri,
    timeout: Duration,
}

impl DelegatedAuth {
    /// Delegates to `url` through the process's HTTP client.
    pub fn new(client: Client, url: Base, timeout: Duration) -> DelegatedAuth {
        DelegatedAuth {
            client,
            url: url.as_uri(),
            timeout,
        }
    }

    /// The identity the API assigns to these handshake headers.
    pub async fn check(&self, forwarded: &HeaderMap) -> Result<Identity, Reject> {
        let call = async {
            let mut req = Request::get(self.url.clone())
                .body(Full::default())
                .expect("a valid URI and method make a valid request");
            *req.headers_mut() = forwarded.clone();
            let (parts, body) = self
                .client
                .call(req, MAX_ANSWER_BYTES)
                .await
                .map_err(|e| e.to_string())?;
            let status = parts.status.as_u16();
            if status == 401 || status == 403 {
                return Ok(Err(status));
            }
            if !parts.status.is_success() {
                return Err(format!("answered {status}"));
            }
            match parse_answer(&body) {
                Ok(identity) => Ok(Ok(identity)),
                // The API answered but named nobody: that is a refusal, not an outage.
                Err(BadAnswer::NoUser) => Ok(Err(401)),
                Err(BadAnswer::Malformed(why)) => Err(why),
            }
        };
        match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(Ok(identity))) => Ok(identity),
            Ok(Ok(Err(401))) => Err(Reject::Unauthorized),
            Ok(Ok(Err(_))) => Err(Reject::Forbidden),
            Ok(Err(why)) => {
                tracing::warn!(reason = %why, "auth service failed");
                Err(Reject::Unavailable)
            }
            Err(_) => {
                tracing::warn!(
                    timeout_ms = self.timeout.as_millis() as u64,
                    "auth service timed out"
                );
                Err(Reject::Unavailable)
            }
        }
    }
}

/// Why a 2xx answer of the auth service gives no identity.
#[derive(Debug, PartialEq, Eq)]
enum BadAnswer {
    /// `userId` is missing, null or empty: the handshake is refused with 401.
    NoUser,
    /// Anything else: the service is broken, so the handshake gets 503.
    Malformed(String),
}

fn parse_answer(body: &[u8]) -> Result<Identity, BadAnswer> {
    let bad = BadAnswer::Malformed;
    let not_an_answer =
        |e: serde_json::Error| bad(format!("answer is not {{\"userId\",\"rooms\"}}: {e}"));
    // An object first: serde would also read a struct from an array such as `[]`.
    let object: serde_json::Map<String, Value> =
        serde_json::from_slice(body).map_err(not_an_answer)?;
    let answer: Answer = serde_json::from_value(Value::Object(object)).map_err(not_an_answer)?;
    let user = match answer.user_id {
        Value::Null => return Err(BadAnswer::NoUser),
        Value::String(s) if s.is_empty() => return Err(BadAnswer::NoUser),
        Value::String(s) => s,
        Value::Number(n) if n.is_i64() || n.is_u64() => n.to_string(),
        _ => return Err(bad("userId must be a string or an integer".into())),
    };
    if !valid_room(&format!("user:{user}")) {
        return Err(bad(
            "userId must be 1-123 bytes of printable ASCII without spaces".into(),
        ));
    }
    let grants = answer
        .rooms
        .iter()
        .map(|r| RoomPattern::parse(r))
        .collect::<Result<_, _>>()
        .map_err(bad)?;
    Ok(Identity {
        user_id: Some(user),
        grants,
        expires_at: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers() {
        let id = parse_answer(br#"{"userId":"42","rooms":["org:7","task:*"]}"#).unwrap();
        assert_eq!((id.user_id.as_deref(), id.grants.len()), (Some("42"), 2));
        assert_eq!(
            parse_answer(br#"{"userId":7}"#).unwrap().user_id.as_deref(),
            Some("7")
        );
        for no_user in [
            &br#"{"rooms":[]}"#[..],
            br#"{"userId":null}"#,
            br#"{"userId":""}"#,
        ] {
            assert_eq!(parse_answer(no_user).unwrap_err(), BadAnswer::NoUser);
        }
        for bad in [
            &br#"{"userId":"a b"}"#[..],
            br#"{"userId":"1","rooms":["x y"]}"#,
            b"[]",
            b"nope",
        ] {
            assert!(
                matches!(parse_answer(bad), Err(BadAnswer::Malformed(_))),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
