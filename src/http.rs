//! The HTTP surface of contract section 6 as warp filters: one function per route, a plain
//! handler behind each, and one [`handle_rejection`] turning every rejection into the JSON
//! `{"code", "message"}` errors. `GET /ws` is not a filter: the accept loop
//! ([`crate::server`]) hands it to [`crate::ws`] with the raw request, which owns the upgrade.

use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::Arc;

use bytes::{Buf, Bytes};
use futures_util::{Stream, StreamExt};
use hyper::HeaderMap;
use hyper::StatusCode;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use warp::Filter;
use warp::reject::{MethodNotAllowed, Rejection};

use crate::app::App;
use crate::bus::BusStatus;
use crate::protocol::check_action_object;
use crate::rooms::valid_room;

/// Every response patchbay sends, warp's and its own alike.
pub type Response = warp::reply::Response;

/// Largest accepted `POST /publish` body.
pub const MAX_PUBLISH_BYTES: usize = 1024 * 1024;

/// Every route but `/ws`, with errors as JSON.
pub fn routes(app: Arc<App>) -> impl Filter<Extract = (Response,), Error = Infallible> + Clone {
    healthz()
        .or(readyz_route(app.clone()))
        .unify()
        .or(actions(app.clone()))
        .unify()
        .or(metrics(app.clone()))
        .unify()
        .or(publish_route(app.clone()))
        .unify()
        .or(presence_route(app.clone()))
        .unify()
        .or(sse_routes(app))
        .unify()
        .recover(handle_rejection)
        .unify()
}

/// `GET` or `HEAD`: HEAD is answered wherever GET is (same status and headers; hyper sends
/// no body).
fn get_or_head() -> impl Filter<Extract = (), Error = Rejection> + Clone {
    warp::get().or(warp::head()).unify()
}

/// Exactly this path (`warp::path!` would also take `/healthz/`).
fn exact(path: &'static str) -> impl Filter<Extract = (), Error = Rejection> + Clone {
    warp::path::full()
        .and_then(move |full: warp::path::FullPath| async move {
            if full.as_str() == path {
                Ok(())
            } else {
                Err(warp::reject::not_found())
            }
        })
        .untuple_one()
}

/// The TCP peer's address, which the server put in the request's extensions.
fn remote() -> impl Filter<Extract = (Option<IpAddr>,), Error = Infallible> + Clone {
    warp::ext::optional::<crate::client_addr::RemoteAddr>()
        .map(|r: Option<_>| r.map(|r: crate::client_addr::RemoteAddr| r.0.ip()))
}

fn with_app(app: Arc<App>) -> impl Filter<Extract = (Arc<App>,), Error = Infallible> + Clone {
    warp::any().map(move || app.clone())
}

/// `GET /sse`, `POST /sse/<connectionId>` and its CORS preflight ([`crate::sse`]).
fn sse_routes(app: Arc<App>) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    let query = warp::query::raw()
        .map(Some)
        .or(warp::any().map(|| None))
        .unify();
    let stream = exact("/sse")
        .and(warp::get())
        .and(with_app(app.clone()))
        .and(warp::header::headers_cloned())
        .and(query)
        .and(remote())
        .then(
            |app: Arc<App>, headers: hyper::HeaderMap, query: Option<String>, remote| async move {
                let resp = crate::sse::open(app.clone(), headers.clone(), query, remote).await;
                crate::sse::with_cors(resp, &headers, &app, remote)
            },
        );
    let post = warp::path!("sse" / String)
        .and(warp::post())
        .and(with_app(app.clone()))
        .and(warp::header::headers_cloned())
        .and(query)
        .and(remote())
        .and(warp::body::stream())
        .then(
            |id: String,
             app: Arc<App>,
             headers: hyper::HeaderMap,
             query: Option<String>,
             remote: Option<IpAddr>,
             body| async move {
                // Read up to the frame limit only: a longer body is refused unread.
                let body = read_limited(body, app.config.max_frame_bytes)
                    .await
                    .ok()
                    .flatten();
                let resp =
                    crate::sse::post(app.clone(), id, headers.clone(), query, body, remote).await;
                crate::sse::with_cors(resp, &headers, &app, remote)
            },
        );
    let preflight = warp::path!("sse" / String)
        .and(warp::options())
        .and(with_app(app))
        .and(warp::header::headers_cloned())
        .and(remote())
        .map(
            |_id: String, app: Arc<App>, headers: hyper::HeaderMap, remote| {
                crate::sse::preflight(&app, &headers, remote)
            },
        );
    stream.or(post).unify().or(preflight).unify()
}

/// `GET /healthz`.
fn healthz() -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    exact("/healthz")
        .and(get_or_head())
        .map(|| json_response(StatusCode::OK, &json!({"status": "ok"})))
}

/// `GET /readyz`.
fn readyz_route(app: Arc<App>) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    exact("/readyz")
        .and(get_or_head())
        .and(with_app(app))
        .map(|app: Arc<App>| readyz(&app))
}

/// `GET /actions`: the manifests as written, readable by pages of the allowed origins (a
/// webapp fetches it at start-up).
fn actions(app: Arc<App>) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    exact("/actions")
        .and(get_or_head())
        .and(with_app(app))
        .and(warp::header::headers_cloned())
        .and(remote())
        .map(|app: Arc<App>, headers: HeaderMap, remote| {
            let resp = typed(
                Response::new(app.registry.manifest_json().clone().into()),
                "application/json",
            );
            crate::sse::with_cors(resp, &headers, &app, remote)
        })
}

/// `GET /metrics`.
/// `GET /metrics`: OpenMetrics for a scraper that asks for it (`Accept:
/// application/openmetrics-text`, as Prometheus does), otherwise Prometheus's text format
/// 0.0.4, which every tool reads (`promtool check metrics`, curl).
fn metrics(app: Arc<App>) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    exact("/metrics")
        .and(get_or_head())
        .and(with_app(app))
        .and(warp::header::optional::<String>("accept"))
        .map(|app: Arc<App>, accept: Option<String>| {
            if accept.is_some_and(|a| a.contains("application/openmetrics-text")) {
                typed(
                    Response::new(Bytes::from(app.metrics.render()).into()),
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                )
            } else {
                typed(
                    Response::new(Bytes::from(app.metrics.render_prometheus()).into()),
                    "text/plain; version=0.0.4; charset=utf-8",
                )
            }
        })
}

/// `POST /publish`. The handler reads the headers and the body itself, so that the checks
/// happen in the documented order (token, content type, size, body).
fn publish_route(app: Arc<App>) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    exact("/publish")
        .and(warp::post())
        .and(with_app(app))
        .and(warp::header::headers_cloned())
        .and(warp::body::stream())
        .then(
            |app: Arc<App>, headers: hyper::HeaderMap, body| async move {
                publish(&app, &headers, body).await
            },
        )
}

/// `GET /presence/<room>`: the room's presence snapshot, for backends (the publish token).
fn presence_route(app: Arc<App>) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    warp::path::full()
        .and_then(|full: warp::path::FullPath| async move {
            let room = full.as_str().strip_prefix("/presence/").map(|r| {
                percent_encoding::percent_decode_str(r)
                    .decode_utf8_lossy()
                    .into_owned()
            });
            room.ok_or_else(warp::reject::not_found)
        })
        .and(get_or_head())
        .and(with_app(app))
        .and(warp::header::headers_cloned())
        .then(
            |room: String, app: Arc<App>, headers: hyper::HeaderMap| async move {
                if let Some(refused) = publish_token_refusal(
                    &app,
                    &headers,
                    "the presence endpoint needs PATCHBAY_PUBLISH_TOKEN",
                ) {
                    return refused;
                }
                let Some(presence) = app.presence.as_ref().filter(|p| p.tracks(&room)) else {
                    return error_response(
                        StatusCode::NOT_FOUND,
                        "not_found",
                        "this room does not track presence",
                    );
                };
                match presence.snapshot(&room).await {
                    Some(mut body) => {
                        if let Some(b) = body.as_object_mut() {
                            b.insert("room".into(), json!(room));
                        }
                        json_response(StatusCode::OK, &body)
                    }
                    None => error_response(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "upstream_unavailable",
                        "presence cannot be read now; try again",
                    ),
                }
            },
        )
}

/// The one place a rejection becomes an answer: 404 for an unknown route, 405 for a known
/// route with another method.
pub async fn handle_rejection(err: Rejection) -> Result<Response, Infallible> {
    if err.find::<MethodNotAllowed>().is_some() {
        return Ok(error_response(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "method not allowed on this route",
        ));
    }
    if !err.is_not_found() {
        tracing::debug!(rejection = ?err, "unexpected rejection");
    }
    Ok(error_response(
        StatusCode::NOT_FOUND,
        "not_found",
        "no such route",
    ))
}

fn typed(mut resp: Response, content_type: &'static str) -> Response {
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

/// A JSON response.
pub fn json_response(status: StatusCode, body: &Value) -> Response {
    let mut resp = typed(
        Response::new(Bytes::from(body.to_string()).into()),
        "application/json",
    );
    *resp.status_mut() = status;
    resp
}

/// A JSON error `{"code", "message"}`.
pub fn error_response(status: StatusCode, code: &str, message: &str) -> Response {
    json_response(status, &json!({"code": code, "message": message}))
}

fn readyz(app: &App) -> Response {
    let status = app.hub.bus().status();
    let bus = status.as_str();
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
    let status = if status == BusStatus::Disconnected {
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
pub(crate) fn is_json(content_type: Option<&HeaderValue>) -> bool {
    content_type
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"))
}

/// Reads a request body of at most `limit` bytes; `None` when it is larger.
async fn read_limited<S, B>(mut body: S, limit: usize) -> Result<Option<Bytes>, warp::Error>
where
    S: Stream<Item = Result<B, warp::Error>> + Unpin,
    B: Buf,
{
    let mut out = Vec::new();
    while let Some(chunk) = body.next().await {
        let mut chunk = chunk?;
        if out.len() + chunk.remaining() > limit {
            return Ok(None);
        }
        while chunk.has_remaining() {
            let part = chunk.chunk();
            out.extend_from_slice(part);
            let n = part.len();
            chunk.advance(n);
        }
    }
    Ok(Some(Bytes::from(out)))
}

/// The publish token's check, for the routes that backends call: the refusal, if any — 404
/// (`disabled`) without `PATCHBAY_PUBLISH_TOKEN`, 401 without the right bearer token.
fn publish_token_refusal(
    app: &App,
    headers: &hyper::HeaderMap,
    disabled: &str,
) -> Option<Response> {
    let Some(expected) = &app.config.publish_token else {
        return Some(error_response(StatusCode::NOT_FOUND, "not_found", disabled));
    };
    if !token_matches(headers.get(hyper::header::AUTHORIZATION), expected) {
        return Some(error_response(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing or wrong bearer token",
        ));
    }
    None
}

async fn publish<S, B>(app: &App, headers: &hyper::HeaderMap, body: S) -> Response
where
    S: Stream<Item = Result<B, warp::Error>> + Unpin,
    B: Buf,
{
    if let Some(refused) = publish_token_refusal(
        app,
        headers,
        "publishing is disabled: set PATCHBAY_PUBLISH_TOKEN",
    ) {
        return refused;
    }
    if !is_json(headers.get(CONTENT_TYPE)) {
        return error_response(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "the body must be sent as Content-Type: application/json",
        );
    }
    let body = match read_limited(body, MAX_PUBLISH_BYTES).await {
        Ok(Some(b)) => b,
        Ok(None) => {
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
    //! The routes through `warp::test`: no socket.

    use super::*;
    use crate::config::Config;
    use crate::registry::Registry;

    fn app(publish_token: Option<&str>) -> Arc<App> {
        let config = Config {
            publish_token: publish_token.map(str::to_string),
            ..Config::default()
        };
        App::new(config, Registry::default()).unwrap()
    }

    fn body(resp: &hyper::Response<Bytes>) -> Value {
        serde_json::from_slice(resp.body()).unwrap_or(Value::Null)
    }

    #[tokio::test]
    async fn probes_answer_get_and_head_and_errors_are_json() {
        let routes = routes(app(None));
        let resp = warp::test::request().path("/healthz").reply(&routes).await;
        assert_eq!(resp.status(), 200);
        assert_eq!(body(&resp), json!({"status": "ok"}));
        let resp = warp::test::request()
            .method("HEAD")
            .path("/readyz")
            .reply(&routes)
            .await;
        assert_eq!(resp.status(), 200);
        let resp = warp::test::request()
            .method("DELETE")
            .path("/metrics")
            .reply(&routes)
            .await;
        assert_eq!(resp.status(), 405);
        assert_eq!(body(&resp)["code"], "method_not_allowed");
        for path in ["/nowhere", "/healthz/", "/healthz/extra"] {
            let resp = warp::test::request().path(path).reply(&routes).await;
            assert_eq!(resp.status(), 404, "{path}");
        }
        let resp = warp::test::request().path("/nowhere").reply(&routes).await;
        assert_eq!(body(&resp)["code"], "not_found");
        assert_eq!(resp.headers()["content-type"], "application/json");
    }

    #[tokio::test]
    async fn readyz_says_draining_during_shutdown() {
        let app = app(None);
        let routes = routes(app.clone());
        app.lifecycle.begin_drain();
        let resp = warp::test::request().path("/readyz").reply(&routes).await;
        assert_eq!(resp.status(), 503);
        assert_eq!(body(&resp)["status"], "draining");
    }

    #[tokio::test]
    async fn publish_checks_token_type_size_and_body_in_order() {
        let routes = routes(app(Some("a publish token!")));
        let post = || {
            warp::test::request()
                .method("POST")
                .path("/publish")
                .header("authorization", "Bearer a publish token!")
        };
        let good = json!({"rooms": ["a"], "action": {"type": "X"}}).to_string();
        let resp = warp::test::request()
            .method("POST")
            .path("/publish")
            .body(&good)
            .reply(&routes)
            .await;
        assert_eq!(resp.status(), 401);
        let resp = post().body(&good).reply(&routes).await;
        assert_eq!(resp.status(), 415);
        let json = |r: warp::test::RequestBuilder| r.header("content-type", "application/json");
        let resp = json(post())
            .body("x".repeat(MAX_PUBLISH_BYTES + 1))
            .reply(&routes)
            .await;
        assert_eq!(resp.status(), 413);
        let resp = json(post()).body("{").reply(&routes).await;
        assert_eq!(
            (resp.status().as_u16(), body(&resp)["code"].clone()),
            (400, json!("bad_json"))
        );
        let resp = json(post()).body(&good).reply(&routes).await;
        assert_eq!(resp.status(), 202);
        assert_eq!(body(&resp), json!({"rooms": 1}));
        let resp = routes_without_token().await;
        assert_eq!(resp, 404);
    }

    async fn routes_without_token() -> u16 {
        let routes = routes(app(None));
        warp::test::request()
            .method("POST")
            .path("/publish")
            .reply(&routes)
            .await
            .status()
            .as_u16()
    }

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
