//! The per-connection frame rate limit: a token bucket over every client frame
//! (`PATCHBAY_RATE_PER_SEC`, `PATCHBAY_RATE_BURST`). A frame over the limit is answered
//! `rate_limited`; a client that keeps sending a whole further burst while limited is closed
//! with 4029. Pure logic: the session feeds it the time.

use tokio::time::Instant;

/// What to do with one client frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Within the rate: handle it.
    Allow,
    /// Over the rate: answer `rate_limited`, execute nothing.
    Limit,
    /// Kept flooding after being limited: close with 4029.
    Disconnect,
}

/// A token bucket, refilled continuously.
#[derive(Debug, Clone)]
pub struct RateLimiter {
    per_sec: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
    /// Frames refused since the last allowed one.
    refused: u32,
}

impl RateLimiter {
    /// A full bucket of `burst` tokens, refilled at `per_sec`.
    pub fn new(per_sec: f64, burst: u32, now: Instant) -> RateLimiter {
        RateLimiter {
            per_sec,
            burst: f64::from(burst),
            tokens: f64::from(burst),
            last: now,
            refused: 0,
        }
    }

    /// Counts one frame arriving at `now`.
    pub fn check(&mut self, now: Instant) -> Verdict {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.per_sec).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            self.refused = 0;
            return Verdict::Allow;
        }
        self.refused += 1;
        if f64::from(self.refused) > self.burst {
            Verdict::Disconnect
        } else {
            Verdict::Limit
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn allows_a_burst_then_the_rate() {
        let t0 = Instant::now();
        let mut r = RateLimiter::new(10.0, 3, t0);
        assert_eq!([r.check(t0), r.check(t0), r.check(t0)], [Verdict::Allow; 3]);
        assert_eq!(r.check(t0), Verdict::Limit);
        assert_eq!(
            r.check(t0 + Duration::from_millis(100)),
            Verdict::Allow,
            "one token per 100 ms"
        );
        assert_eq!(r.check(t0 + Duration::from_millis(100)), Verdict::Limit);
        assert_eq!(r.check(t0 + Duration::from_secs(60)), Verdict::Allow);
        assert_eq!(r.check(t0 + Duration::from_secs(60)), Verdict::Allow);
        assert_eq!(r.check(t0 + Duration::from_secs(60)), Verdict::Allow);
        assert_eq!(
            r.check(t0 + Duration::from_secs(60)),
            Verdict::Limit,
            "refill stops at the burst"
        );
    }

    #[test]
    fn a_client_that_keeps_flooding_is_disconnected() {
        let t0 = Instant::now();
        let mut r = RateLimiter::new(1.0, 2, t0);
        r.check(t0);
        r.check(t0);
        assert_eq!(r.check(t0), Verdict::Limit);
        assert_eq!(r.check(t0), Verdict::Limit);
        assert_eq!(r.check(t0), Verdict::Disconnect);
    }

    #[test]
    fn an_allowed_frame_forgives_earlier_refusals() {
        let t0 = Instant::now();
        let mut r = RateLimiter::new(1.0, 2, t0);
        r.check(t0);
        r.check(t0);
        assert_eq!(r.check(t0), Verdict::Limit);
        assert_eq!(r.check(t0 + Duration::from_secs(1)), Verdict::Allow);
        assert_eq!(r.check(t0 + Duration::from_secs(1)), Verdict::Limit);
        assert_eq!(r.check(t0 + Duration::from_secs(1)), Verdict::Limit);
    }
}
