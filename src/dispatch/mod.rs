//! Runs one action: validates its payload against the compiled schema, then hands it to the
//! handler kind named in its manifest. The only place handler kinds are matched.

mod http;

use std::sync::Arc;

use hyper::HeaderMap;
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::error::{ActionError, Code};
use crate::registry::{ActionSpec, Handler};
use crate::task::Queue;
use crate::upstream::{Base, Client};

pub use http::HttpDispatcher;

/// What a successful action answers: the `X_SUCCESS` payload and extra `meta` fields.
#[derive(Debug, Clone)]
pub struct Success {
    /// The success payload as JSON text: written into the reply as it is, never parsed into a
    /// value and serialized again (a list of a thousand records costs one validating scan).
    pub payload: Box<RawValue>,
    /// Extra meta fields (`status` for `http`).
    pub meta: Map<String, Value>,
}

/// What a handler knows about the request beyond its payload.
#[derive(Debug, Clone)]
pub struct CallContext {
    /// The connection's user (`None` for an anonymous connection): a task's owner.
    pub user: Option<String>,
    /// The connection's `connectionId`: an anonymous connection's tasks are scoped to it.
    pub connection_id: String,
    /// The request id: sent upstream as `X-Request-Id` and `Idempotency-Key`.
    pub request_id: String,
    /// The handshake headers named in `PATCHBAY_FORWARD_HEADERS`.
    pub forwarded: Arc<HeaderMap>,
    /// The client's address: sent upstream as `X-Forwarded-For`.
    pub client: Option<std::net::IpAddr>,
}

/// Runs actions of every handler kind.
#[derive(Clone)]
pub struct Dispatcher {
    http: HttpDispatcher,
    tasks: Option<Arc<dyn Queue>>,
}

impl Dispatcher {
    /// A dispatcher calling the REST API at `api` (if any) with the process's `client`, and
    /// running `task` actions on `tasks` (present whenever some action is a `task` action).
    pub fn new(api: Option<Base>, client: Client, tasks: Option<Arc<dyn Queue>>) -> Dispatcher {
        Dispatcher {
            http: HttpDispatcher::new(api, client),
            tasks,
        }
    }

    /// The task queues, when some action is a `task` action.
    pub fn tasks(&self) -> Option<&Arc<dyn Queue>> {
        self.tasks.as_ref()
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
            Handler::Task(task) => {
                let queue = self.tasks.as_deref().ok_or_else(|| {
                    ActionError::internal("a task action ran without a task queue")
                })?;
                let value = crate::task::run(
                    queue,
                    task,
                    ctx.user.as_deref(),
                    &ctx.connection_id,
                    &ctx.request_id,
                    payload,
                )
                .await?;
                Ok(Success {
                    payload: serde_json::value::to_raw_value(&value)
                        .map_err(ActionError::internal)?,
                    meta: Map::new(),
                })
            }
        }
    }
}

/// Most schema violations listed in `details`.
pub const MAX_VIOLATIONS: usize = 20;
/// Longest violation message, in bytes.
pub const MAX_VIOLATION_CHARS: usize = 200;

/// Checks a payload against the action's schema; each violation (up to [`MAX_VIOLATIONS`]) is
/// listed with its pointer.
pub fn check_payload(spec: &ActionSpec, payload: &Value) -> Result<(), ActionError> {
    let Some(schema) = &spec.schema else {
        return Ok(());
    };
    if schema.is_valid(payload) {
        return Ok(());
    }
    // Bounded: a message can quote the offending value, and a client controls its size.
    let violations: Vec<Value> = schema
        .iter_errors(payload)
        .take(MAX_VIOLATIONS)
        .map(|e| {
            let mut message = e.to_string();
            if message.len() > MAX_VIOLATION_CHARS {
                let cut = (0..=MAX_VIOLATION_CHARS)
                    .rev()
                    .find(|&i| message.is_char_boundary(i))
                    .unwrap_or(0);
                message.truncate(cut);
                message.push('…');
            }
            serde_json::json!({"pointer": e.instance_path().as_str(), "message": message})
        })
        .collect();
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

    #[test]
    fn violation_details_are_bounded() {
        let r = Registry::from_sources([(
            Path::new("a.json"),
            r#"{"X": {"http": {"method": "POST", "path": "/x"}, "payload": {"type": "array", "items": {"type": "integer"}}}}"#,
        )])
        .unwrap();
        let long = "y".repeat(10_000);
        let payload = Value::Array((0..100).map(|_| Value::String(long.clone())).collect());
        let e = check_payload(r.get("X").unwrap(), &payload).unwrap_err();
        let details = e.details.unwrap();
        let list = details.as_array().unwrap();
        assert_eq!(list.len(), MAX_VIOLATIONS);
        assert!(
            list.iter()
                .all(|d| d["message"].as_str().unwrap().len() <= MAX_VIOLATION_CHARS + 3)
        );
    }
}
