//! Runs one action: validates its payload against the compiled schema, then hands it to the
//! handler kind named in its manifest. The only place handler kinds are matched.

mod http;

use std::sync::Arc;

use hyper::HeaderMap;
use serde_json::{Map, Value};

use crate::error::{ActionError, Code};
use crate::registry::{ActionSpec, Handler};

pub use http::HttpDispatcher;

/// What a successful action answers: the `X_SUCCESS` payload and extra `meta` fields.
#[derive(Debug, Clone, PartialEq)]
pub struct Success {
    /// The success payload.
    pub payload: Value,
    /// Extra meta fields (`status` for `http`).
    pub meta: Map<String, Value>,
}

/// What a handler knows about the request beyond its payload.
#[derive(Debug, Clone)]
pub struct CallContext {
    /// The request id: sent upstream as `X-Request-Id` and `Idempotency-Key`.
    pub request_id: String,
    /// The handshake headers named in `PATCHBAY_FORWARD_HEADERS`.
    pub forwarded: Arc<HeaderMap>,
}

/// Runs actions of every handler kind.
#[derive(Debug, Clone)]
pub struct Dispatcher {
    http: HttpDispatcher,
}

impl Dispatcher {
    /// A dispatcher calling the REST API at `api_url` (if any) with one pooled client.
    pub fn new(api_url: Option<String>) -> Dispatcher {
        Dispatcher {
            http: HttpDispatcher::new(api_url),
        }
    }

    /// Validates the payload, then runs the action.
    pub async fn run(
        &self,
        spec: &ActionSpec,
        payload: &Value,
        ctx: &CallContext,
    ) -> Result<Success, ActionError> {
        check_payload(spec, payload)?;
        match &spec.handler {
            Handler::Http(http) => self.http.call(http, spec.timeout, payload, ctx).await,
        }
    }
}

/// Checks a payload against the action's schema; each violation is listed with its pointer.
pub fn check_payload(spec: &ActionSpec, payload: &Value) -> Result<(), ActionError> {
    let Some(schema) = &spec.schema else {
        return Ok(());
    };
    let violations: Vec<Value> = schema
        .iter_errors(payload)
        .map(|e| serde_json::json!({"pointer": e.instance_path().as_str(), "message": e.to_string()}))
        .collect();
    if violations.is_empty() {
        return Ok(());
    }
    Err(ActionError::new(
        Code::InvalidPayload,
        format!("payload does not match the schema of {}", spec.name),
    )
    .with_details(Value::Array(violations)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::Registry;
    use std::path::Path;

    #[test]
    fn violations_carry_json_pointers() {
        let r = Registry::from_sources([(
            Path::new("a.json"),
            r#"{"X": {"http": {"method": "GET", "path": "/x"}, "payload": {"type": "object", "required": ["id"],
                "properties": {"page": {"type": "integer", "minimum": 1}, "id": {"type": "string"}}}}}"#,
        )])
        .unwrap();
        let spec = r.get("X").unwrap();
        assert!(check_payload(spec, &serde_json::json!({"id": "a", "page": 2})).is_ok());
        let e = check_payload(spec, &serde_json::json!({"page": 0})).unwrap_err();
        assert_eq!(e.code, Code::InvalidPayload);
        let details = e.details.unwrap();
        let pointers: Vec<&str> = details
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["pointer"].as_str().unwrap())
            .collect();
        assert!(
            pointers.contains(&"/page") && pointers.contains(&""),
            "{pointers:?}"
        );
    }
}
