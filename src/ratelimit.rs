//! The per-connection frame rate limit: a token bucket over every client frame
//! (`PATCHBAY_RATE_PER_SEC`, `PATCHBAY_RATE_BURST`). A frame over the limit is answered
//! `rate_limited`; a client whose refused frames pile up faster than the rate drains them, by a
//! whole further burst, is closed with 4029. Pure logic: the session feeds it the time.

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
    /// Refused frames, drained at `per_sec` like the bucket refills: a client just over the
    /// rate stays near zero, a flood climbs to `burst` within a fraction of a second whatever
    /// the server's speed. (Forgiving every refusal at each allowed frame instead would let a
    /// flood through whenever a token arrives every `burst` frames.)
    refused: f64,
}

impl RateLimiter {
    /// A full bucket of `burst` tokens, refilled at `per_sec`.
    pub fn new(per_sec: f64, burst: u32, now: Instant) -> RateLimiter {
        RateLimiter {
            per_sec,
            burst: f64::from(burst),
            tokens: f64::from(burst),
            last: now,
            refused: 0.0,
        }
    }

    /// Counts one frame arriving at `now`.
    pub fn check(&mut self, now: Instant) -> Verdict {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.per_sec).min(self.burst);
        self.refused = (self.refused - elapsed * self.per_sec).max(0.0);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return Verdict::Allow;
        }
        self.refused += 1.0;
        if self.refused > self.burst {
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
    fn a_flood_is_disconnected_and_refusals_drain_at_the_rate() {
        let t0 = Instant::now();
        let mut r = RateLimiter::new(1.0, 2, t0);
        let at_t0: Vec<Verdict> = (0..5).map(|_| r.check(t0)).collect();
        use Verdict::{Allow, Disconnect, Limit};
        assert_eq!(at_t0, [Allow, Allow, Limit, Limit, Disconnect]);
        // Two seconds later: two tokens back, and two of the three refusals drained.
        let t1 = t0 + Duration::from_secs(2);
        let at_t1: Vec<Verdict> = (0..4).map(|_| r.check(t1)).collect();
        assert_eq!(at_t1, [Allow, Allow, Limit, Disconnect]);
    }

    #[test]
    fn a_client_just_over_the_rate_is_limited_but_kept() {
        let t0 = Instant::now();
        let mut r = RateLimiter::new(10.0, 5, t0);
        let mut verdicts = Vec::new();
        // 15 frames a second for a minute: a third refused, never disconnected.
        for i in 0..900u64 {
            verdicts.push(r.check(t0 + Duration::from_micros(i * 1_000_000 / 15)));
        }
        assert!(!verdicts.contains(&Verdict::Disconnect));
        let limited = verdicts.iter().filter(|v| **v == Verdict::Limit).count();
        assert!((250..=350).contains(&limited), "{limited} limited");
    }

    #[test]
    fn a_flood_with_tokens_trickling_in_is_still_disconnected() {
        // 100/s with a burst of 200, flooded at 20,000 frames/s: a token every 200 frames used
        // to forgive every refusal; now the flood is closed within the second burst.
        let t0 = Instant::now();
        let mut r = RateLimiter::new(100.0, 200, t0);
        let closed_at = (0..10_000u64)
            .position(|i| r.check(t0 + Duration::from_micros(i * 50)) == Verdict::Disconnect);
        assert!(
            closed_at.is_some_and(|i| i < 500),
            "closed at frame {closed_at:?}"
        );
    }
}
