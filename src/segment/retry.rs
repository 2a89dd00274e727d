//! What to do with Segment's answer (SPEC section 6), and how long to wait before trying again.
//! Pure: the decision is a table over the status code, tested row by row.

use std::time::{Duration, SystemTime};

/// The decision for one response (or transport failure).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryAction {
    /// 2xx: the events are Segment's now; remove them from the spool.
    Delivered,
    /// Transient: send the same events again after a backoff (or `Retry-After`).
    Retry,
    /// 400: some event in the batch is bad; split the batch to find it.
    Split,
    /// The write key is wrong (401, 403): stop sending, keep everything, retry at max backoff.
    AuthFailed,
    /// Segment refuses this kind of request (other 4xx, 501, 505, 511): same as `AuthFailed`
    /// but reported as `rejected`, since the key is not the problem.
    Rejected,
}

/// The response table of SPEC section 6. `None` is a connect error or a timeout.
pub fn retry_action(status: Option<u16>) -> RetryAction {
    match status {
        None => RetryAction::Retry,
        Some(200..=299) => RetryAction::Delivered,
        Some(400) => RetryAction::Split,
        Some(401 | 403) => RetryAction::AuthFailed,
        Some(408 | 410 | 429 | 460) => RetryAction::Retry,
        Some(501 | 505 | 511) => RetryAction::Rejected,
        Some(500..=599) => RetryAction::Retry,
        // 1xx/3xx should never reach us (reqwest follows redirects); treat as transient.
        Some(100..=399) => RetryAction::Retry,
        Some(_) => RetryAction::Rejected,
    }
}

/// Parses `Retry-After`: delta-seconds or an HTTP date (RFC 9110 section 10.2.3). A date in the
/// past means "now".
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// Exponential backoff with full jitter (a uniform draw in `[0, min(max, initial * 2^n)]`),
/// reset after a success.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    failures: u32,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Backoff {
        Backoff {
            initial,
            max,
            failures: 0,
        }
    }

    pub fn reset(&mut self) {
        self.failures = 0;
    }

    pub fn failures(&self) -> u32 {
        self.failures
    }

    pub fn max(&self) -> Duration {
        self.max
    }

    /// The ceiling of the next draw: `initial * 2^failures`, capped at `max`.
    pub fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.failures.min(31)).unwrap_or(u32::MAX);
        self.initial.saturating_mul(factor).min(self.max)
    }

    /// Records a failure and returns how long to wait. `retry_after` (from the response) is a
    /// floor, clamped to `max`: a server that asks for a pause gets at least that.
    pub fn next_delay(&mut self, retry_after: Option<Duration>) -> Duration {
        let ceiling = self.ceiling();
        self.failures = self.failures.saturating_add(1);
        let jittered = Duration::from_millis(fastrand::u64(0..=ceiling.as_millis() as u64));
        match retry_after {
            Some(ra) => jittered.max(ra.min(self.max)),
            None => jittered,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_response_table() {
        use RetryAction::*;
        let rows: &[(Option<u16>, RetryAction)] = &[
            (Some(200), Delivered),
            (Some(204), Delivered),
            (Some(400), Split),
            (Some(401), AuthFailed),
            (Some(403), AuthFailed),
            (Some(404), Rejected),
            (Some(408), Retry),
            (Some(410), Retry),
            (Some(413), Rejected),
            (Some(429), Retry),
            (Some(460), Retry),
            (Some(500), Retry),
            (Some(501), Rejected),
            (Some(502), Retry),
            (Some(503), Retry),
            (Some(504), Retry),
            (Some(505), Rejected),
            (Some(511), Rejected),
            (Some(599), Retry),
            (None, Retry),
        ];
        for (status, want) in rows {
            assert_eq!(retry_action(*status), *want, "status {status:?}");
        }
    }

    #[test]
    fn retry_after_as_seconds_or_http_date() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_784_000_000);
        assert_eq!(parse_retry_after("7", now), Some(Duration::from_secs(7)));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(30));
        assert_eq!(
            parse_retry_after(&later, now),
            Some(Duration::from_secs(30))
        );
        let earlier = httpdate::fmt_http_date(now - Duration::from_secs(30));
        assert_eq!(parse_retry_after(&earlier, now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon", now), None);
    }

    #[test]
    fn backoff_grows_caps_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(500), Duration::from_secs(4));
        let ceilings: Vec<u128> = (0..6)
            .map(|_| {
                let c = b.ceiling();
                let d = b.next_delay(None);
                assert!(d <= c, "{d:?} above ceiling {c:?}");
                c.as_millis()
            })
            .collect();
        assert_eq!(ceilings, [500, 1000, 2000, 4000, 4000, 4000]);
        b.reset();
        assert_eq!(b.ceiling(), Duration::from_millis(500));
    }

    #[test]
    fn retry_after_is_a_floor_clamped_to_max() {
        let mut b = Backoff::new(Duration::from_millis(1), Duration::from_secs(10));
        assert!(b.next_delay(Some(Duration::from_secs(3))) >= Duration::from_secs(3));
        assert_eq!(
            b.next_delay(Some(Duration::from_secs(3600))),
            Duration::from_secs(10)
        );
    }

    #[test]
    fn full_jitter_spreads_over_the_whole_range() {
        let mut lows = 0;
        for _ in 0..200 {
            let mut b = Backoff::new(Duration::from_millis(1000), Duration::from_secs(10));
            if b.next_delay(None) < Duration::from_millis(500) {
                lows += 1;
            }
        }
        // Uniform on [0, 1000]: about half fall below 500; far from 0 or 200.
        assert!((40..=160).contains(&lows), "{lows} of 200 below half");
    }
}
