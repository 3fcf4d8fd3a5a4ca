//! The `http` handler: one REST call on the user's behalf (contract section 3).
//!
//! Through the process's pooled [`Client`]; redirects are never followed; the whole exchange,
//! body included, is bounded by the action's timeout; bodies over 1 MiB are refused.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::Request;
use hyper::header::{ACCEPT, CONTENT_TYPE, HeaderName, HeaderValue};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use super::{CallContext, Success};
use crate::error::{ActionError, Code};
use crate::registry::{HttpAction, Method};
use crate::template::{self, path_segment};
use crate::upstream::{Base, CallError, Client};

/// Largest upstream response body accepted.
pub const MAX_RESPONSE_BYTES: usize = 1024 * 1024;

const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
const JSON: HeaderValue = HeaderValue::from_static("application/json");

/// Calls the REST API.
#[derive(Debug, Clone)]
pub struct HttpDispatcher {
    client: Client,
    api: Option<Base>,
}

impl HttpDispatcher {
    /// A dispatcher for the API at `api` using the process's `client`.
    pub fn new(api: Option<Base>, client: Client) -> HttpDispatcher {
        HttpDispatcher { client, api }
    }

    /// Calls the upstream and maps the outcome to a success or a failure code.
    pub async fn call(
        &self,
        action: &HttpAction,
        timeout: Duration,
        payload: &Value,
        ctx: &CallContext,
    ) -> Result<Success, ActionError> {
        let Some(api) = &self.api else {
            return Err(ActionError::internal(
                "an http action ran without PATCHBAY_API_URL",
            ));
        };
        let path = build_path(action, payload)?;
        let uri = api.uri(&path).map_err(ActionError::internal)?;
        let request_id = HeaderValue::from_str(&ctx.request_id)
            .map_err(|_| ActionError::internal("the request id is not a header value"))?;
        let body = if action.method.uses_query() || payload.is_null() {
            Bytes::new()
        } else {
            Bytes::from(serde_json::to_vec(payload).expect("JSON values always serialize"))
        };
        let has_body = !body.is_empty();
        let mut req = Request::new(Full::new(body));
        *req.method_mut() = action.method.as_http();
        *req.uri_mut() = uri;
        let headers = req.headers_mut();
        headers.reserve(ctx.forwarded.len() + 5);
        headers.insert(ACCEPT, JSON);
        for (name, value) in ctx.forwarded.iter() {
            headers.append(name, value.clone());
        }
        // The API behind patchbay learns who the client is, as from any proxy.
        if let Some(client) = ctx.client {
            crate::client_addr::set_forwarded_for(headers, client);
        }
        if action.method != Method::Get {
            headers.insert(IDEMPOTENCY_KEY, request_id.clone());
        }
        headers.insert(X_REQUEST_ID, request_id);
        if has_body {
            headers.insert(CONTENT_TYPE, JSON);
        }
        let (parts, body) =
            tokio::time::timeout(timeout, self.client.call(req, MAX_RESPONSE_BYTES))
                .await
                .map_err(|_| {
                    ActionError::new(
                        Code::UpstreamTimeout,
                        format!("the API did not answer within {} ms", timeout.as_millis()),
                    )
                    .with_status(504)
                })?
                .map_err(|e| match e {
                    CallError::TooLarge { status, .. } => ActionError::new(
                        Code::UpstreamError,
                        format!("the API's response is larger than {MAX_RESPONSE_BYTES} bytes"),
                    )
                    .with_status(status.as_u16()),
                    e => {
                        tracing::warn!(error = %e, "API unreachable");
                        ActionError::new(Code::UpstreamUnavailable, "the API is unreachable")
                            .with_status(502)
                    }
                })?;
        let status = parts.status.as_u16();
        if parts.status.is_success() {
            let meta = Map::from_iter([("status".to_string(), Value::from(status))]);
            return Ok(Success {
                payload: raw_body(&body),
                meta,
            });
        }
        let mut err = ActionError::new(Code::UpstreamError, format!("the API answered {status}"))
            .with_status(status);
        if !body.is_empty() {
            err = err.with_details(parse_body(&body));
        }
        Err(err)
    }
}

/// Longest upstream path once its fields are filled (contract section 3).
pub const MAX_PATH_BYTES: usize = 8 * 1024;
/// Longest upstream query string. Well under what HTTP servers accept in a request line, and
/// far under what an upstream URI can hold, so a long value is the client's mistake.
pub const MAX_QUERY_BYTES: usize = 16 * 1024;

/// The filled path + query string (GET and DELETE), to append to the API's base URL.
fn build_path(action: &HttpAction, payload: &Value) -> Result<String, ActionError> {
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
    let mut path = action
        .path
        .fill(fields, path_segment)
        .map_err(|e| invalid(format!("path {e}")))?;
    if path.len() > MAX_PATH_BYTES {
        return Err(invalid(format!(
            "the path is {} bytes once filled; at most {MAX_PATH_BYTES} are allowed",
            path.len()
        )));
    }
    if action.method.uses_query() {
        let used: Vec<&str> = action.path.fields().collect();
        let query = template::query_string(fields, &used).map_err(invalid)?;
        if query.len() > MAX_QUERY_BYTES {
            return Err(invalid(format!(
                "the query string is {} bytes; at most {MAX_QUERY_BYTES} are allowed",
                query.len()
            )));
        }
        if !query.is_empty() {
            path.push('?');
            path.push_str(&query);
        }
    }
    Ok(path)
}

/// [`parse_body`]'s rules, without building a value: JSON is checked and kept as text.
fn raw_body(body: &[u8]) -> Box<RawValue> {
    if let Ok(text) = std::str::from_utf8(body) {
        if text.trim_ascii().is_empty() {
            return RawValue::NULL.to_owned();
        }
        if let Ok(raw) = serde_json::from_str::<&RawValue>(text) {
            return raw.to_owned();
        }
    }
    serde_json::value::to_raw_value(&String::from_utf8_lossy(body))
        .expect("a string always serializes")
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
        let base = Base::parse("http://api").unwrap();
        let build_url = |_: &str, action: &HttpAction, payload: &Value| {
            build_path(action, payload).map(|p| base.uri(&p).unwrap().to_string())
        };
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

    #[test]
    fn success_bodies_are_kept_as_json_text_by_the_same_rules() {
        for body in [
            &b""[..],
            b" \n",
            br#"{"a":1}"#,
            b" [1, 2]\n",
            b"plain text",
            b"\xff\xfe",
            br#"{"a":"#,
        ] {
            let raw = raw_body(body);
            let reparsed: Value = serde_json::from_str(raw.get()).unwrap();
            assert_eq!(
                reparsed,
                parse_body(body),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
        assert_eq!(
            raw_body(b" [1, 2]\n").get(),
            "[1, 2]",
            "surrounding blanks dropped"
        );
    }
}
