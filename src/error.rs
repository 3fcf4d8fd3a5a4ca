//! What a client sees when something goes wrong, decided in one place.
//!
//! Two kinds, as in the contract: an [`ActionError`] answers one request with `X_FAILURE`
//! and the session stays open; a [`Disconnect`] closes the websocket with a close code.
//! Anything unexpected becomes `internal`, with details only in the logs.

use serde::Serialize;
use serde_json::Value;

/// The stable failure codes of contract section 2.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Code {
    /// No manifest or built-in action of that name.
    UnknownAction,
    /// The payload failed the action's schema or its path/query rules.
    InvalidPayload,
    /// The connection may not do this (e.g. join that room).
    Forbidden,
    /// The connection's frame rate is over its token bucket.
    RateLimited,
    /// More than `PATCHBAY_MAX_INFLIGHT` requests in flight on this connection.
    TooManyRequests,
    /// The upstream refused or broke the connection.
    UpstreamUnavailable,
    /// The upstream did not answer within the action's timeout.
    UpstreamTimeout,
    /// The upstream answered with a non-2xx status, or an unusable body.
    UpstreamError,
    /// No such task, or not this user's (the two are not told apart).
    NotFound,
    /// The task has already finished (a cancel came too late).
    Conflict,
    /// The user has as many active tasks on the queue as its `perUserLimit`.
    LimitReached,
    /// A bug or an unexpected condition in patchbay.
    Internal,
}

impl Code {
    /// The code as the client sees it.
    pub fn as_str(self) -> &'static str {
        match self {
            Code::UnknownAction => "unknown_action",
            Code::InvalidPayload => "invalid_payload",
            Code::Forbidden => "forbidden",
            Code::RateLimited => "rate_limited",
            Code::TooManyRequests => "too_many_requests",
            Code::UpstreamUnavailable => "upstream_unavailable",
            Code::UpstreamTimeout => "upstream_timeout",
            Code::UpstreamError => "upstream_error",
            Code::NotFound => "not_found",
            Code::Conflict => "conflict",
            Code::LimitReached => "limit_reached",
            Code::Internal => "internal",
        }
    }
}

/// A failed request: becomes the payload of `X_FAILURE`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ActionError {
    /// Stable machine-readable code.
    pub code: Code,
    /// Human-readable explanation.
    pub message: String,
    /// HTTP status, for upstream failures.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// Structured details (schema violations, the upstream body).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub details: Option<Value>,
}

impl ActionError {
    /// An error with a code and message only.
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        ActionError {
            code,
            message: message.into(),
            status: None,
            details: None,
        }
    }

    /// Adds the HTTP status.
    pub fn with_status(mut self, status: u16) -> Self {
        self.status = Some(status);
        self
    }

    /// Adds details.
    pub fn with_details(mut self, details: Value) -> Self {
        self.details = Some(details);
        self
    }

    /// An internal error: the cause is logged here (cut to [`MAX_LOGGED_BYTES`], since it may
    /// quote client input) and never sent to the client.
    pub fn internal(cause: impl std::fmt::Display) -> Self {
        let cause = cause.to_string();
        tracing::error!(cause = %clip(&cause), "internal error");
        ActionError::new(Code::Internal, "internal error")
    }
}

/// Most bytes of a client-influenced value written into one log line.
pub const MAX_LOGGED_BYTES: usize = 256;

/// `text` cut to [`MAX_LOGGED_BYTES`] at a character boundary, with a note of how long it was:
/// logs never echo unbounded client data.
pub fn clip(text: &str) -> std::borrow::Cow<'_, str> {
    if text.len() <= MAX_LOGGED_BYTES {
        return text.into();
    }
    let mut end = MAX_LOGGED_BYTES;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes)", &text[..end], text.len()).into()
}

/// Why the server closes a websocket; each maps to one close code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disconnect {
    /// 1000: no frame from the client within the idle timeout.
    Idle,
    /// 1001: the server is shutting down.
    Shutdown,
    /// 1002: the client broke the websocket protocol.
    Protocol,
    /// 1007: a text frame that is not UTF-8.
    BadUtf8,
    /// 1009: a message over `PATCHBAY_MAX_FRAME_BYTES`.
    TooLarge,
    /// 1011: an internal error.
    Internal,
    /// 4008: the outbound queue overflowed.
    Slow,
    /// 4029: kept flooding after `rate_limited`.
    Flood,
    /// 4401: credentials expired.
    Expired,
}

impl Disconnect {
    /// The websocket close code.
    pub fn code(self) -> u16 {
        match self {
            Disconnect::Idle => 1000,
            Disconnect::Shutdown => 1001,
            Disconnect::Protocol => 1002,
            Disconnect::BadUtf8 => 1007,
            Disconnect::TooLarge => 1009,
            Disconnect::Internal => 1011,
            Disconnect::Slow => 4008,
            Disconnect::Flood => 4029,
            Disconnect::Expired => 4401,
        }
    }

    /// The short reason sent with the close frame.
    pub fn reason(self) -> &'static str {
        match self {
            Disconnect::Idle => "idle timeout",
            Disconnect::Shutdown => "server shutting down",
            Disconnect::Protocol => "protocol error",
            Disconnect::BadUtf8 => "text frame is not valid UTF-8",
            Disconnect::TooLarge => "message too large",
            Disconnect::Internal => "internal error",
            Disconnect::Slow => "outbound queue overflow",
            Disconnect::Flood => "rate limit exceeded repeatedly",
            Disconnect::Expired => "credentials expired",
        }
    }

    /// Whether replies already queued should still be written before the close frame.
    /// A slow client is closed at once (its queue is the problem), and so is an idle one (it
    /// answers nothing, not even pings).
    pub fn drains_queue(self) -> bool {
        !matches!(self, Disconnect::Slow | Disconnect::Idle)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_payload_shape() {
        let e = ActionError::new(Code::UpstreamError, "upstream answered 500")
            .with_status(500)
            .with_details(serde_json::json!({"error": "boom"}));
        assert_eq!(
            serde_json::to_value(&e).unwrap(),
            serde_json::json!({"code": "upstream_error", "message": "upstream answered 500", "status": 500, "details": {"error": "boom"}})
        );
        let e = ActionError::new(Code::TooManyRequests, "x");
        assert_eq!(
            serde_json::to_value(&e).unwrap(),
            serde_json::json!({"code": "too_many_requests", "message": "x"})
        );
    }

    #[test]
    fn logged_values_are_clipped() {
        assert_eq!(clip("short"), "short");
        let long = "é".repeat(1000);
        let clipped = clip(&long);
        assert!(clipped.len() < MAX_LOGGED_BYTES + 32, "{clipped}");
        assert!(clipped.ends_with("(2000 bytes)"), "{clipped}");
    }

    #[test]
    fn internal_errors_hide_their_cause() {
        let e = ActionError::internal("database password is hunter2");
        assert_eq!(e.code, Code::Internal);
        assert!(!e.message.contains("hunter2"));
    }

    #[test]
    fn close_codes_match_the_contract() {
        assert_eq!(Disconnect::Shutdown.code(), 1001);
        assert_eq!(Disconnect::TooLarge.code(), 1009);
        assert_eq!(Disconnect::Internal.code(), 1011);
        assert_eq!(Disconnect::Slow.code(), 4008);
        assert_eq!(Disconnect::Flood.code(), 4029);
        assert_eq!(Disconnect::Expired.code(), 4401);
        assert!(!Disconnect::Slow.drains_queue());
        for code in [
            Code::UnknownAction,
            Code::RateLimited,
            Code::UpstreamError,
            Code::Internal,
        ] {
            assert_eq!(
                serde_json::to_value(code).unwrap(),
                code.as_str(),
                "as_str matches the wire"
            );
        }
        assert!(Disconnect::Shutdown.drains_queue());
    }
}
