//! Admitting a new session, whatever its transport: shutdown, the Origin rule, the connection
//! limit, credentials, and the headers to forward upstream. The websocket upgrade
//! ([`crate::ws`]) checks its own headers first, then calls [`admit`]; another transport calls
//! the same function.

use std::net::IpAddr;
use std::sync::Arc;

use hyper::header::{HOST, ORIGIN};
use hyper::{HeaderMap, StatusCode};

use crate::app::{App, ConnectionSlot};
use crate::error::clip;
use crate::session::Peer;

/// An admitted session: who it is, and its place under `PATCHBAY_MAX_CONNECTIONS` (held for
/// the session's life).
pub struct Admitted {
    /// Who is on the other end (boxed: it is handed down through the session's futures,
    /// each of which would otherwise keep a copy of it for the connection's whole life).
    pub peer: Box<Peer>,
    /// Released when dropped.
    pub slot: ConnectionSlot,
}

/// Why a handshake is refused: an HTTP status with a JSON `{code, message}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    /// The HTTP status.
    pub status: StatusCode,
    /// The stable code.
    pub code: &'static str,
    /// What to tell the client.
    pub message: &'static str,
}

/// The refusal while the instance shuts down.
pub const DRAINING: Refusal = Refusal {
    status: StatusCode::SERVICE_UNAVAILABLE,
    code: "draining",
    message: "this instance is shutting down",
};

/// Decides whether a handshake with these headers and query string starts a session.
/// `remote`: the TCP peer; the client's address is worked out from it
/// ([`crate::client_addr`]). Every refusal is counted and logged with the client's address.
pub async fn admit(
    app: &App,
    headers: &HeaderMap,
    query: Option<&str>,
    remote: Option<IpAddr>,
) -> Result<Admitted, Refusal> {
    let trusted = &app.config.trusted_proxies;
    let client = remote.map(|r| trusted.client(r, headers));
    let admitted = check(app, headers, query, remote, client).await;
    if let Err(refusal) = &admitted {
        app.metrics.handshake_refused(refusal.code);
        let client = client.map(|c| c.to_string());
        tracing::info!(
            client = client.as_deref().unwrap_or("-"),
            status = refusal.status.as_u16(),
            code = refusal.code,
            "handshake refused"
        );
    }
    admitted
}

/// [`admit`] without the count of refusals.
async fn check(
    app: &App,
    headers: &HeaderMap,
    query: Option<&str>,
    remote: Option<IpAddr>,
    client: Option<IpAddr>,
) -> Result<Admitted, Refusal> {
    if app.lifecycle.is_draining() {
        return Err(DRAINING);
    }
    if !app.origin_allowed(headers, remote) {
        let host = app.config.trusted_proxies.host(remote, headers);
        let origin = headers
            .get(ORIGIN)
            .map(|v| clip(&String::from_utf8_lossy(v.as_bytes())).into_owned());
        let host = host.as_deref().map(|h| clip(h).into_owned());
        let header = headers
            .get(HOST)
            .map(|v| clip(&String::from_utf8_lossy(v.as_bytes())).into_owned());
        tracing::info!(origin = ?origin, compared_with = ?host, host_header = ?header, "refused a foreign origin: the Origin's host[:port] is not the host asked for (Host, or X-Forwarded-Host from a trusted proxy) nor in PATCHBAY_ALLOWED_ORIGINS");
        return Err(Refusal {
            status: StatusCode::FORBIDDEN,
            code: "forbidden_origin",
            message: "this origin may not open a websocket here",
        });
    }
    let Some(slot) = app.lifecycle.try_connect(app.config.max_connections) else {
        return Err(Refusal {
            status: StatusCode::SERVICE_UNAVAILABLE,
            code: "too_many_connections",
            message: "this instance is at its connection limit",
        });
    };
    // Sized to what it will hold: kept for the connection's life, a map grown by inserting
    // would keep room for 32 headers (600 bytes) for every connection.
    let count = app
        .config
        .forward_headers
        .iter()
        .map(|name| headers.get_all(name).iter().count())
        .sum::<usize>();
    let mut forwarded = HeaderMap::with_capacity(count);
    for name in &app.config.forward_headers {
        for value in headers.get_all(name) {
            forwarded.append(name.clone(), value.clone());
        }
    }
    let identity = app
        .authenticator
        .authenticate(headers, query, &forwarded, client)
        .await
        .map_err(|reject| Refusal {
            status: reject.status(),
            code: reject.code(),
            message: reject.message(),
        })?;
    let conn_id = app.next_conn_id();
    Ok(Admitted {
        peer: Box::new(Peer {
            conn_id,
            connection_id: app.hub.connection_id(conn_id),
            identity,
            forwarded: shared_headers(forwarded),
            since: since_of(query),
            client,
        }),
        slot,
    })
}

/// The headers as kept for the connection's life: no headers (the usual case) are one map
/// shared by every connection, not an allocation each.
fn shared_headers(headers: HeaderMap) -> Arc<HeaderMap> {
    static NONE: std::sync::LazyLock<Arc<HeaderMap>> = std::sync::LazyLock::new(Arc::default);
    match headers.is_empty() {
        true => NONE.clone(),
        false => Arc::new(headers),
    }
}

/// `?since=<epoch>:<offset>` of a handshake. A value that is no position still asks for a
/// recovery: of a sequence that is not the room's, so `epoch_changed`.
fn since_of(query: Option<&str>) -> Option<crate::history::Position> {
    let raw = query?
        .split('&')
        .find_map(|pair| pair.strip_prefix("since="))?;
    let raw = percent_encoding::percent_decode_str(raw).decode_utf8_lossy();
    Some(
        crate::history::Position::from_query(&raw).unwrap_or(crate::history::Position {
            epoch: "-".into(),
            offset: 0,
        }),
    )
}
