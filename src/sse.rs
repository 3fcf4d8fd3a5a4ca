//! The SSE transport (contract section 11), for networks and proxies that break websockets:
//! `GET /sse` streams every server → client action as one event, `POST /sse/<connectionId>`
//! carries client → server actions. Admission ([`handshake::admit`]), the session
//! ([`session::run`]) and the send queue are the websocket's; only the framing differs. With
//! [`crate::ws`], the only code that knows a transport.
//!
//! A stream's client actions reach its session through a bounded channel registered under the
//! connection id ([`Streams`]); the stream ending (the client went away) removes it, which
//! ends the session as a dropped websocket does.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{HeaderMap, StatusCode};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tracing::Instrument;
use warp::Reply;

use crate::app::App;
use crate::error::Disconnect;
use crate::handshake::{self, Admitted, Refusal};
use crate::http::{Response, error_response, json_response};
use crate::outbox::{CloseSignal, Inbox, Outbox, QueueLimits, Text};
use crate::session::{self, Inbound};

/// Client actions waiting for their session, per stream: a client that posts faster than its
/// session takes them is told 429.
const INBOUND_QUEUE: usize = 256;

/// The open streams of this instance, by connection id.
#[derive(Default)]
pub struct Streams {
    streams: Mutex<HashMap<String, Stream>>,
}

pub(crate) struct Stream {
    inbound: mpsc::Sender<Inbound>,
    /// The stream's user; `None` for an anonymous stream.
    user: Option<String>,
}

impl Streams {
    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Stream>> {
        self.streams.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The sender of stream `id` when `user` may post to it.
    fn sender(&self, id: &str, user: Option<&str>) -> Option<mpsc::Sender<Inbound>> {
        let streams = self.lock();
        let stream = streams.get(id)?;
        (stream.user.as_deref() == user).then(|| stream.inbound.clone())
    }

    /// Client actions another instance forwarded (`{"id","user","actions":[…]}`) for one of
    /// this instance's streams; `false` when that stream is not here (any more).
    pub fn forwarded(&self, message: &[u8]) -> bool {
        #[derive(serde::Deserialize)]
        struct Forwarded {
            id: String,
            user: String,
            actions: Vec<Box<serde_json::value::RawValue>>,
        }
        let Ok(forwarded) = serde_json::from_slice::<Forwarded>(message) else {
            return false;
        };
        let user = Some(forwarded.user.as_str()).filter(|u| !u.is_empty());
        let Some(sender) = self.sender(&forwarded.id, user) else {
            return false;
        };
        for action in forwarded.actions {
            let text = Text::from(String::from(Box::<str>::from(action)));
            if sender.try_send(Inbound::Text(text)).is_err() {
                break;
            }
        }
        true
    }

    /// Open streams.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no stream is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Removes the stream from [`Streams`] when the response body is dropped (the client went
/// away, or the stream ended): the session's inbound ends with it.
struct Registered {
    app: Arc<App>,
    id: String,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.app.sse.lock().remove(&self.id);
        let (app, id) = (self.app.clone(), std::mem::take(&mut self.id));
        tokio::spawn(async move { app.hub.bus().sse_unregister(&id).await });
    }
}

/// `GET /sse`: admits the client as `/ws` does, then streams its session.
pub async fn open(
    app: Arc<App>,
    headers: HeaderMap,
    query: Option<String>,
    remote: Option<IpAddr>,
) -> Response {
    let refuse = |r: Refusal| error_response(r.status, r.code, r.message);
    let admitted = handshake::admit(&app, &headers, query.as_deref(), remote).await;
    let Admitted { peer, slot } = match admitted {
        Ok(admitted) => admitted,
        Err(refusal) => return refuse(refusal),
    };
    let (outbox, inbox) = Outbox::new(QueueLimits {
        frames: app.config.send_queue,
        bytes: app.config.send_queue_bytes,
    });
    let (tx, mut rx) = mpsc::channel(INBOUND_QUEUE);
    let id = peer.connection_id.clone();
    app.sse.lock().insert(
        id.clone(),
        Stream {
            inbound: tx,
            user: peer.identity.user_id.clone(),
        },
    );
    let registered = Registered {
        app: app.clone(),
        id: id.clone(),
    };
    // Other instances forward what is posted to them for this stream.
    app.hub
        .bus()
        .sse_register(&id, peer.identity.user_id.as_deref())
        .await;
    let closer = outbox.close_signal();
    let span = peer.span("sse");
    let (session_app, session_closer) = (app.clone(), closer.clone());
    app.lifecycle.sessions().spawn(
        async move {
            let _slot = slot;
            let opened = std::time::Instant::now();
            tracing::info!("connected");
            let inbound = Box::pin(futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx)));
            session::run(inbound, outbox, session_app.clone(), peer).await;
            if let Some(reason) = session_closer.reason() {
                session_app.metrics.disconnect(reason);
            }
            session::log_end(session_closer.reason(), opened);
        }
        .instrument(span),
    );
    let keep_alive = warp::sse::keep_alive()
        .interval(app.config.sse_heartbeat)
        .text(" ping")
        .stream(events(inbox, closer, registered));
    let mut resp = warp::sse::reply(keep_alive).into_response();
    resp.headers_mut()
        .insert("x-accel-buffering", HeaderValue::from_static("no"));
    resp
}

/// Where the event stream is.
enum Phase {
    /// Writing what the session queues.
    Live,
    /// The session closed the connection for this reason: what was queued first (unless the
    /// client was too slow to read it), then `@@patchbay/CLOSED`.
    Closing(Disconnect),
    Done,
}

/// What the session writes, as events: each action one `data:` event; when the session closes
/// the connection, `@@patchbay/CLOSED {"code","reason"}` and the end of the stream.
fn events(
    inbox: Inbox,
    closer: CloseSignal,
    registered: Registered,
) -> impl futures_util::Stream<Item = Result<warp::sse::Event, std::convert::Infallible>> + Send {
    futures_util::stream::unfold(
        (inbox, closer, registered, Phase::Live),
        |(mut inbox, closer, registered, phase)| async move {
            match phase {
                Phase::Done => None,
                Phase::Closing(reason) => {
                    if reason.drains_queue()
                        && let Some(text) = inbox.try_recv()
                    {
                        return Some((Ok(event(&text)), (inbox, closer, registered, phase)));
                    }
                    let closed = closed_event(reason);
                    Some((Ok(closed), (inbox, closer, registered, Phase::Done)))
                }
                Phase::Live => {
                    let next = tokio::select! {
                        biased;
                        text = inbox.recv() => Some(text),
                        _ = closer.fired() => None,
                    };
                    match next {
                        Some(Some(text)) => {
                            Some((Ok(event(&text)), (inbox, closer, registered, Phase::Live)))
                        }
                        // Every outbox dropped: the session is over; with a close reason
                        // (shutdown, ...), the client hears it.
                        Some(None) => {
                            let reason = closer.reason()?;
                            let closed = closed_event(reason);
                            Some((Ok(closed), (inbox, closer, registered, Phase::Done)))
                        }
                        None => {
                            let reason = closer.reason().unwrap_or(Disconnect::Shutdown);
                            let phase = Phase::Closing(reason);
                            // The close comes at the next step, after what was queued.
                            let first = inbox.try_recv().filter(|_| reason.drains_queue());
                            match first {
                                Some(text) => {
                                    Some((Ok(event(&text)), (inbox, closer, registered, phase)))
                                }
                                None => {
                                    let closed = closed_event(reason);
                                    Some((Ok(closed), (inbox, closer, registered, Phase::Done)))
                                }
                            }
                        }
                    }
                }
            }
        },
    )
}

/// `@@patchbay/CLOSED {"code","reason"}`: what a websocket's close frame would say.
fn closed_event(reason: Disconnect) -> warp::sse::Event {
    let closed = json!({
        "type": "@@patchbay/CLOSED",
        "payload": {"code": reason.code(), "reason": reason.reason()},
    });
    warp::sse::Event::default().data(closed.to_string())
}

fn event(text: &Text) -> warp::sse::Event {
    warp::sse::Event::default().data(text.as_str())
}

/// CORS for a page on another origin that the Origin rule allows (a page served by the app,
/// patchbay on its own port): the stream and the posts are readable by it, with credentials
/// (cookies). Nothing is added for a request without `Origin` or from a refused one.
pub fn with_cors(
    mut resp: Response,
    headers: &HeaderMap,
    app: &App,
    remote: Option<IpAddr>,
) -> Response {
    let Some(origin) = headers.get(hyper::header::ORIGIN).cloned() else {
        return resp;
    };
    if !app.origin_allowed(headers, remote) {
        return resp;
    }
    let h = resp.headers_mut();
    h.insert(hyper::header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    h.insert(
        hyper::header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
        HeaderValue::from_static("true"),
    );
    h.append(hyper::header::VARY, HeaderValue::from_static("origin"));
    resp
}

/// `OPTIONS /sse/<connectionId>`: the preflight of a JSON post from another allowed origin.
pub fn preflight(app: &App, headers: &HeaderMap, remote: Option<IpAddr>) -> Response {
    let mut resp = Response::new(bytes::Bytes::new().into());
    *resp.status_mut() = StatusCode::NO_CONTENT;
    let allowed = app.origin_allowed(headers, remote);
    if allowed {
        let h = resp.headers_mut();
        h.insert(
            hyper::header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static("POST"),
        );
        h.insert(
            hyper::header::ACCESS_CONTROL_ALLOW_HEADERS,
            HeaderValue::from_static("content-type, authorization"),
        );
        h.insert(
            hyper::header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from_static("600"),
        );
    }
    with_cors(resp, headers, app, remote)
}

fn unknown_connection() -> Response {
    error_response(
        StatusCode::NOT_FOUND,
        "unknown_connection",
        "no such stream",
    )
}

/// `POST /sse/<connectionId>`: client actions for a stream of this instance, or forwarded to
/// the instance that holds it.
pub async fn post(
    app: Arc<App>,
    id: String,
    headers: HeaderMap,
    query: Option<String>,
    body: Option<bytes::Bytes>,
    remote: Option<IpAddr>,
) -> Response {
    if !app.origin_allowed(&headers, remote) {
        return error_response(
            StatusCode::FORBIDDEN,
            "forbidden_origin",
            "this origin may not post to a stream here",
        );
    }
    let identity = match app
        .authenticator
        .authenticate(&headers, query.as_deref(), &HeaderMap::new(), None)
        .await
    {
        Ok(identity) => identity,
        Err(reject) => return error_response(reject.status(), reject.code(), reject.message()),
    };
    let json = headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(';')
                .next()
                .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"))
        });
    if !json {
        return error_response(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send Content-Type: application/json",
        );
    }
    let Some(body) = body else {
        return error_response(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            "the body is larger than PATCHBAY_MAX_FRAME_BYTES",
        );
    };
    let actions: Vec<Value> = match serde_json::from_slice::<Value>(&body) {
        Ok(Value::Array(actions)) => actions,
        Ok(action) => vec![action],
        Err(_) => {
            return error_response(
                StatusCode::BAD_REQUEST,
                "invalid_json",
                "the body is not JSON",
            );
        }
    };
    let user = identity.user_id.as_deref();
    let Some(sender) = app.sse.sender(&id, user) else {
        // Not here: the instance that holds the stream gets them through the bus.
        let count = actions.len();
        let all = Value::Array(actions).to_string();
        return match app.hub.bus().sse_forward(&id, user, all).await {
            Ok(true) => json_response(StatusCode::ACCEPTED, &json!({ "accepted": count })),
            Ok(false) => unknown_connection(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot forward client actions to another instance");
                error_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "upstream_unavailable",
                    "the bus is unavailable; try again",
                )
            }
        };
    };
    let mut accepted = 0;
    for action in actions {
        let text = Text::from(action.to_string());
        match sender.try_send(Inbound::Text(text)) {
            Ok(()) => accepted += 1,
            Err(mpsc::error::TrySendError::Full(_)) => {
                return error_response(
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate_limited",
                    "the stream's session has not taken the previous actions yet",
                );
            }
            Err(mpsc::error::TrySendError::Closed(_)) => break,
        }
    }
    json_response(StatusCode::ACCEPTED, &json!({ "accepted": accepted }))
}
