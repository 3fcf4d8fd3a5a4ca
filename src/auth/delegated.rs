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
    #[serde(rename = "userId")]
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
            Ok(Ok(parse_answer(&body)?))
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

fn parse_answer(body: &[u8]) -> Result<Identity, String> {
    let answer: Answer = serde_json::from_slice(body)
        .map_err(|e| format!("answer is not {{\"userId\",\"rooms\"}}: {e}"))?;
    let user = match answer.user_id {
        Value::String(s) => s,
        Value::Number(n) if n.is_i64() || n.is_u64() => n.to_string(),
        _ => return Err("userId must be a string or an integer".into()),
    };
    if !valid_room(&format!("user:{user}")) {
        return Err("userId must be 1-123 bytes of printable ASCII without spaces".into());
    }
    let grants = answer
        .rooms
        .iter()
        .map(|r| RoomPattern::parse(r))
        .collect::<Result<_, _>>()?;
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
        for bad in [
            &br#"{"rooms":[]}"#[..],
            br#"{"userId":null}"#,
            br#"{"userId":"a b"}"#,
            br#"{"userId":"1","rooms":["x y"]}"#,
            b"[]",
            b"nope",
        ] {
            assert!(
                parse_answer(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
