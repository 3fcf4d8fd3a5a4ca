//! The plain HTTP routes of contract section 6 and the router in front of them.
//!
//! Four small routes need no framework; every error is JSON `{"code", "message"}` built by
//! [`error_response`].

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::app::App;
use crate::bus::BusStatus;
use crate::protocol::check_action_object;
use crate::rooms::valid_room;

/// The response body type of every route.
pub type Body = Full<Bytes>;

/// Largest accepted `POST /publish` body.
pub const MAX_PUBLISH_BYTES: usize = 1024 * 1024;

/// Routes one request.
pub async fn route(req: Request<Incoming>, app: Arc<App>) -> Response<Body> {
    // HEAD is answered wherever GET is: same status and headers, and hyper sends no body.
    let method = match req.method() {
        &Method::HEAD => &Method::GET,
        m => m,
    };
    match (method, req.uri().path()) {
        (_, "/ws") => crate::ws::upgrade(req, app).await,
        (&Method::GET, "/healthz") => json_response(StatusCode::OK, &json!({"status": "ok"})),
        (&Method::GET, "/readyz") => readyz(&app),
        (&Method::GET, "/actions") => {
            let mut resp = Response::new(Full::new(app.registry.manifest_json().clone()));
            resp.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            resp
        }
        (&Method::POST, "/publish") => publish(req, &app).await,
        (&Method::GET, "/metrics") => {
            let mut resp = Response::new(Full::new(Bytes::from(app.metrics.render())));
            resp.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            resp
        }
        (_, "/healthz" | "/readyz" | "/actions" | "/publish" | "/metrics") => error_response(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "method not allowed on this route",
        ),
        _ => error_response(StatusCode::NOT_FOUND, "not_found", "no such route"),
    }
}

/// A JSON response.
pub fn json_response(status: StatusCode, body: &Value) -> Response<Body> {
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// A JSON error `{"code", "message"}`.
pub fn error_response(status: StatusCode, code: &str, message: &str) -> Response<Body> {
    json_response(status, &json!({"code": code, "message": message}))
}

fn readyz(app: &App) -> Response<Body> {
    let bus = app.hub.bus().status().as_str();
    if app.lifecycle.is_draining() {
        return json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({"status": "draining", "bus": bus}),
        );
    }
    // Refused (wrong password, missing ACL permission): a bad rollout, which must fail its
    // health checks. Unreachable: a blip, during which requests are still served.
    if let Some(reason) = app.hub.bus().refusal() {
        return json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({"status": "failed", "bus": bus, "reason": reason}),
        );
    }
    let status = if bus == BusStatus::Disconnected.as_str() {
        "degraded"
    } else {
        "ok"
    };
    json_response(StatusCode::OK, &json!({"status": status, "bus": bus}))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PublishBody {
    rooms: Vec<String>,
    action: Value,
}

/// Constant-time comparison of a presented bearer token with the configured one. Hashing
/// first keeps the time independent of both contents and lengths.
fn token_matches(header: Option<&HeaderValue>, expected: &str) -> bool {
    // The scheme name is case-insensitive (RFC 7235); the token is not.
    let Some(presented) = header
        .map(HeaderValue::as_bytes)
        .filter(|h| h.len() > 7 && h[..7].eq_ignore_ascii_case(b"bearer "))
        .map(|h| &h[7..])
    else {
        return false;
    };
    Sha256::digest(presented)
        .ct_eq(&Sha256::digest(expected.as_bytes()))
        .into()
}

/// Whether a `Content-Type` is `application/json`, parameters (`; charset=utf-8`) allowed.
fn is_json(content_type: Option<&HeaderValue>) -> bool {
    content_type
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"))
}

async fn publish(req: Request<Incoming>, app: &App) -> Response<Body> {
    let Some(expected) = &app.config.publish_token else {
        return error_response(
            StatusCode::NOT_FOUND,
            "not_found",
            "publishing is disabled: set PATCHBAY_PUBLISH_TOKEN",
        );
    };
    if !token_matches(req.headers().get(AUTHORIZATION), expected) {
        return error_response(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing or wrong bearer token",
        );
    }
    if !is_json(req.headers().get(CONTENT_TYPE)) {
        return error_response(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "the body must be sent as Content-Type: application/json",
        );
    }
    let body = match Limited::new(req.into_body(), MAX_PUBLISH_BYTES)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            return error_response(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                "the body is larger than 1 MiB",
            );
        }
        Err(_) => {
            return error_response(
                StatusCode::BAD_REQUEST,
                "bad_request",
                "could not read the body",
            );
        }
    };
    let body: PublishBody = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => {
            return error_response(
                StatusCode::BAD_REQUEST,
                "bad_json",
                &format!("expected {{\"rooms\": [...], \"action\": {{...}}}}: {e}"),
            );
        }
    };
    if body.rooms.len() > app.config.max_publish_rooms {
        return error_response(
            StatusCode::BAD_REQUEST,
            "too_many_rooms",
            &format!(
                "{} rooms; one action may target at most {} (PATCHBAY_MAX_PUBLISH_ROOMS)",
                body.rooms.len(),
                app.config.max_publish_rooms
            ),
        );
    }
    if body.rooms.is_empty() || !body.rooms.iter().all(|r| valid_room(r)) {
        return error_response(
            StatusCode::BAD_REQUEST,
            "invalid_rooms",
            "rooms must be a non-empty list of room names",
        );
    }
    let action = match body.action {
        Value::Object(action) => action,
        _ => {
            return error_response(
                StatusCode::BAD_REQUEST,
                "invalid_action",
                "action must be a JSON object",
            );
        }
    };
    if let Err(m) = check_action_object(&action) {
        return error_response(StatusCode::BAD_REQUEST, "invalid_action", &m);
    }
    // Order matters (`meta.room` is the first target room a connection is in): keep it.
    let mut seen = std::collections::HashSet::new();
    let mut rooms = body.rooms;
    rooms.retain(|r| seen.insert(r.clone()));
    let count = rooms.len();
    match app.hub.publish(rooms, action).await {
        Ok(()) => json_response(StatusCode::ACCEPTED, &json!({"rooms": count})),
        Err(e) => {
            tracing::warn!(error = %e, "publish failed");
            error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "bus_unavailable",
                "the bus is unavailable; try again",
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_content_types() {
        let h = |s: &'static str| HeaderValue::from_static(s);
        assert!(is_json(Some(&h("application/json"))));
        assert!(is_json(Some(&h("Application/JSON; charset=utf-8"))));
        assert!(!is_json(Some(&h("text/plain"))));
        assert!(!is_json(Some(&h("application/jsonp"))));
        assert!(!is_json(None));
    }

    #[test]
    fn bearer_tokens() {
        let h = |s: &'static str| HeaderValue::from_static(s);
        assert!(token_matches(Some(&h("Bearer s3cret")), "s3cret"));
        assert!(!token_matches(Some(&h("Bearer s3cre")), "s3cret"));
        assert!(!token_matches(Some(&h("Bearer s3cret2")), "s3cret"));
        assert!(!token_matches(Some(&h("s3cret")), "s3cret"));
        assert!(!token_matches(Some(&h("Basic s3cret")), "s3cret"));
        assert!(token_matches(Some(&h("bearer s3cret")), "s3cret"));
        assert!(!token_matches(Some(&h("Bearer S3CRET")), "s3cret"));
        assert!(token_matches(Some(&h("bearer s3cret")), "s3cret"));
        assert!(!token_matches(Some(&h("Bearer S3CRET")), "s3cret"));
        assert!(!token_matches(None, "s3cret"));
    }
}
