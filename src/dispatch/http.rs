//! The `http` handler: one REST call on the user's behalf (contract section 3).
//!
//! One pooled client for the process; redirects are never followed; the whole exchange,
//! body included, is bounded by the action's timeout; bodies over 1 MiB are refused.

use std::time::Duration;

use bytes::BytesMut;
use hyper::header::{ACCEPT, CONTENT_LENGTH, CONTENT_TYPE, HeaderName};
use serde_json::{Map, Value};

use super::{CallContext, Success};
use crate::error::{ActionError, Code};
use crate::registry::HttpAction;
use crate::template::{self, path_segment};

/// Largest upstream response body accepted.
pub const MAX_RESPONSE_BYTES: usize = 1024 * 1024;

const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

/// The process's one pooled HTTP client, shared by actions and delegated auth: redirects are
/// never followed.
pub fn client() -> reqwest::Client {
    // reqwest is built without a bundled crypto provider; ring is ours. Installing twice
    // (several servers in one process, as in tests) is harmless.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .pool_idle_timeout(Duration::from_secs(90))
        .tcp_nodelay(true)
        .build()
        .expect("the HTTP client configuration is static and valid")
}

/// Calls the REST API.
#[derive(Debug, Clone)]
pub struct HttpDispatcher {
    client: reqwest::Client,
    api_url: Option<String>,
}

enum BodyError {
    TooLarge,
    Broken(reqwest::Error),
}

impl HttpDispatcher {
    /// A dispatcher for `api_url` (no trailing slash) using the process's `client`.
    pub fn new(api_url: Option<String>, client: reqwest::Client) -> HttpDispatcher {
        HttpDispatcher { client, api_url }
    }

    /// Calls the upstream and maps the outcome to a success or a failure code.
    pub async fn call(
        &self,
        action: &HttpAction,
        timeout: Duration,
        payload: &Value,
        ctx: &CallContext,
    ) -> Result<Success, ActionError> {
        let Some(api_url) = &self.api_url else {
            return Err(ActionError::internal(
                "an http action ran without PATCHBAY_API_URL",
            ));
        };
        let url = build_url(api_url, action, payload)?;
        let mut req = self
            .client
            .request(action.method.as_http(), url)
            .header(ACCEPT, "application/json");
        for (name, value) in ctx.forwarded.iter() {
            req = req.header(name, value);
        }
        req = req.header(X_REQUEST_ID, &ctx.request_id);
        if action.method != crate::registry::Method::Get {
            req = req.header(IDEMPOTENCY_KEY, &ctx.request_id);
        }
        if !action.method.uses_query() && !payload.is_null() {
            let body = serde_json::to_vec(payload).expect("JSON values always serialize");
            req = req.header(CONTENT_TYPE, "application/json").body(body);
        }
        let exchange = async {
            let resp = req.send().await.map_err(|e| unavailable(&e))?;
            let status = resp.status().as_u16();
            let body = read_capped(resp).await;
            Ok::<_, ActionError>((status, body))
        };
        let (status, body) = tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| {
                ActionError::new(
                    Code::UpstreamTimeout,
                    format!("the API did not answer within {} ms", timeout.as_millis()),
                )
                .with_status(504)
            })??;
        let success = (200..300).contains(&status);
        let body = match body {
            Ok(body) => body,
            Err(BodyError::TooLarge) => {
                return Err(ActionError::new(
                    Code::UpstreamError,
                    format!("the API's response is larger than {MAX_RESPONSE_BYTES} bytes"),
                )
                .with_status(status));
            }
            Err(BodyError::Broken(e)) => return Err(unavailable(&e)),
        };
        let parsed = parse_body(&body);
        if success {
            let meta = Map::from_iter([("status".to_string(), Value::from(status))]);
            return Ok(Success {
                payload: parsed,
                meta,
            });
        }
        let mut err = ActionError::new(Code::UpstreamError, format!("the API answered {status}"))
            .with_status(status);
        if !body.is_empty() {
            err = err.with_details(parsed);
        }
        Err(err)
    }
}

fn unavailable(e: &reqwest::Error) -> ActionError {
    tracing::warn!(error = %e, "API unreachable");
    ActionError::new(Code::UpstreamUnavailable, "the API is unreachable").with_status(502)
}

/// `api_url` + filled path + query string (GET and DELETE).
fn build_url(api_url: &str, action: &HttpAction, payload: &Value) -> Result<String, ActionError> {
    let invalid = |m: String| ActionError::new(Code::InvalidPayload, m);
    let empty = Map::new();
    let fields = match payload {
        Value::Object(map) => map,
        Value::Null => &empty,
        _ if action.path.fields().next().is_none() && !action.method.uses_query() => &empty,
        _ => {
            return Err(invalid(
                "payload must be an object: its fields fill the path and query string".into(),
            ));
        }
    };
    let path = action
        .path
        .fill(fields, path_segment)
        .map_err(|e| invalid(format!("path {e}")))?;
    let mut url = format!("{api_url}{path}");
    if action.method.uses_query() {
        let used: Vec<&str> = action.path.fields().collect();
        let query = template::query_string(fields, &used).map_err(invalid)?;
        if !query.is_empty() {
            url.push('?');
            url.push_str(&query);
        }
    }
    Ok(url)
}

async fn read_capped(mut resp: reqwest::Response) -> Result<bytes::Bytes, BodyError> {
    let declared = resp
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
    if declared.is_some_and(|n| n > MAX_RESPONSE_BYTES) {
        return Err(BodyError::TooLarge);
    }
    let mut body = BytesMut::with_capacity(declared.unwrap_or(0));
    while let Some(chunk) = resp.chunk().await.map_err(BodyError::Broken)? {
        if body.len() + chunk.len() > MAX_RESPONSE_BYTES {
            return Err(BodyError::TooLarge);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

/// Empty → `null`; JSON → the value; anything else → the text as a JSON string.
fn parse_body(body: &[u8]) -> Value {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Value::Null;
    }
    serde_json::from_slice(body)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(body).into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::Method;
    use crate::template::Template;
    use serde_json::json;

    fn action(method: Method, path: &str) -> HttpAction {
        HttpAction {
            method,
            path: Template::parse(path).unwrap(),
        }
    }

    #[test]
    fn urls_follow_path_and_query_rules() {
        let get = action(Method::Get, "/tasks/{id}");
        assert_eq!(
            build_url(
                "http://api",
                &get,
                &json!({"id": "a/b", "q": "x y", "page": 2})
            )
            .unwrap(),
            "http://api/tasks/a%2Fb?page=2&q=x%20y"
        );
        assert_eq!(
            build_url("http://api", &action(Method::Get, "/tasks"), &Value::Null).unwrap(),
            "http://api/tasks"
        );
        let post = action(Method::Post, "/tasks/{id}");
        assert_eq!(
            build_url("http://api", &post, &json!({"id": 1, "title": "t"})).unwrap(),
            "http://api/tasks/1"
        );
        assert_eq!(
            build_url(
                "http://api",
                &action(Method::Post, "/tasks"),
                &json!([1, 2])
            )
            .unwrap(),
            "http://api/tasks"
        );
        let e = build_url("http://api", &get, &json!({"id": ".."})).unwrap_err();
        assert_eq!(e.code, Code::InvalidPayload);
        let e = build_url(
            "http://api",
            &action(Method::Get, "/tasks"),
            &json!({"filter": {"a": 1}}),
        )
        .unwrap_err();
        assert_eq!(e.code, Code::InvalidPayload);
        let e =
            build_url("http://api", &action(Method::Delete, "/tasks"), &json!([1])).unwrap_err();
        assert_eq!(e.code, Code::InvalidPayload);
    }

    #[test]
    fn bodies_are_parsed_leniently() {
        assert_eq!(parse_body(b""), Value::Null);
        assert_eq!(parse_body(b" \n"), Value::Null);
        assert_eq!(parse_body(br#"{"a":1}"#), json!({"a": 1}));
        assert_eq!(parse_body(b"plain text"), json!("plain text"));
        assert_eq!(parse_body(b"\xff\xfe"), json!("\u{fffd}\u{fffd}"));
    }
}
