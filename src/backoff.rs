//! Exponential backoff with jitter, the one retry timer of every loop that talks to a server:
//! the Segment drain (`segment::drain`, per round of failures), and the Leanplum API refresh
//! and message lookups (`catalog::refresh`). Pure: the random draw is a parameter, the time
//! is the caller's; `Retry-After` parsing is here because every backoff honours it.

use std::time::{Duration, SystemTime};

/// How a delay is drawn under its ceiling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Jitter {
    /// Uniform in `[0, ceiling]` ("full jitter"): many clients failing together spread out.
    Full,
    /// Exactly the ceiling: one caller with nothing to spread (a lookup of one message).
    None,
}

/// Exponential backoff: the `n`th consecutive failure waits up to `initial * 2^n`, capped at
/// `max`, drawn as [`Jitter`] says; a success resets it.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    initial: Duration,
    max: Duration,
    jitter: Jitter,
    failures: u32,
}

impl Backoff {
    /// With full jitter.
    pub(crate) fn new(initial: Duration, max: Duration) -> Backoff {
        Backoff::with_jitter(initial, max, Jitter::Full)
    }

    pub(crate) fn with_jitter(initial: Duration, max: Duration, jitter: Jitter) -> Backoff {
        Backoff {
            initial,
            max,
            jitter,
            failures: 0,
        }
    }

    pub(crate) fn reset(&mut self) {
        self.failures = 0;
    }

    /// Consecutive failures since the last reset.
    #[cfg(test)]
    pub(crate) fn failures(&self) -> u32 {
        self.failures
    }

    pub(crate) fn max(&self) -> Duration {
        self.max
    }

    /// The ceiling of the next draw: `initial * 2^failures`, capped at `max`.
    pub(crate) fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.failures.min(31)).unwrap_or(u32::MAX);
        self.initial.saturating_mul(factor).min(self.max)
    }

    /// Records a failure and returns how long to wait. `retry_after` (from the response) is a
    /// floor, clamped to `max`: a server that asks for a pause gets at least that.
    pub(crate) fn next_delay(&mut self, retry_after: Option<Duration>) -> Duration {
        self.next_delay_drawn(retry_after, |hi| fastrand::u64(0..=hi))
    }

    /// [`Backoff::next_delay`] with the random draw given: `draw(hi)` returns a number in
    /// `[0, hi]` (milliseconds).
    pub(crate) fn next_delay_drawn(
        &mut self,
        retry_after: Option<Duration>,
        draw: impl FnOnce(u64) -> u64,
    ) -> Duration {
        let ceiling = self.ceiling();
        self.failures = self.failures.saturating_add(1);
        let delay = match self.jitter {
            Jitter::Full => {
                let hi = u64::try_from(ceiling.as_millis()).unwrap_or(u64::MAX);
                Duration::from_millis(draw(hi).min(hi))
            }
            Jitter::None => ceiling,
        };
        match retry_after {
            Some(ra) => delay.max(ra.min(self.max)),
            None => delay,
        }
    }
}

/// Parses `Retry-After`: delta-seconds or an HTTP date (RFC 9110 section 10.2.3). A date in the
/// past means "now".
pub(crate) fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: fn(u64) -> Duration = Duration::from_millis;

    #[test]
    fn the_ceiling_doubles_per_failure_up_to_the_cap_and_resets() {
        let mut b = Backoff::new(MS(500), Duration::from_secs(4));
        let ceilings: Vec<u128> = (0..6)
            .map(|_| {
                let c = b.ceiling();
                let d = b.next_delay(None);
                assert!(d <= c, "{d:?} above ceiling {c:?}");
                c.as_millis()
            })
            .collect();
        assert_eq!(ceilings, [500, 1000, 2000, 4000, 4000, 4000]);
        assert_eq!(b.failures(), 6);
        b.reset();
        assert_eq!(b.ceiling(), MS(500));
    }

    #[test]
    fn full_jitter_draws_between_zero_and_the_ceiling() {
        // The draw sees the ceiling as its upper bound; its lowest and highest answers are the
        // bounds of the delay, and a draw out of range is held to the ceiling.
        let mut b = Backoff::new(MS(100), MS(1000));
        let mut seen = Vec::new();
        assert_eq!(
            b.next_delay_drawn(None, |hi| {
                seen.push(hi);
                0
            }),
            MS(0)
        );
        assert_eq!(b.next_delay_drawn(None, |hi| hi), MS(200));
        assert_eq!(b.next_delay_drawn(None, |hi| hi + 5), MS(400));
        assert_eq!(b.next_delay_drawn(None, |hi| hi / 2), MS(400));
        assert_eq!(b.next_delay_drawn(None, |hi| hi), MS(1000));
        assert_eq!(seen, [100]);
        // With a seeded generator, every draw stays within the bounds of its attempt.
        let mut rng = fastrand::Rng::with_seed(7);
        let mut b = Backoff::new(MS(100), MS(10_000));
        for attempt in 0..12u32 {
            let ceiling = MS(100 * 2u64.pow(attempt)).min(MS(10_000));
            let d = b.next_delay_drawn(None, |hi| rng.u64(0..=hi));
            assert!(d <= ceiling, "attempt {attempt}: {d:?} > {ceiling:?}");
        }
    }

    #[test]
    fn full_jitter_spreads_over_the_whole_range() {
        let mut lows = 0;
        for _ in 0..200 {
            let mut b = Backoff::new(MS(1000), Duration::from_secs(10));
            if b.next_delay(None) < MS(500) {
                lows += 1;
            }
        }
        // Uniform on [0, 1000]: about half fall below 500; far from 0 or 200.
        assert!((40..=160).contains(&lows), "{lows} of 200 below half");
    }

    #[test]
    fn without_jitter_the_delay_is_the_ceiling() {
        let mut b = Backoff::with_jitter(
            Duration::from_secs(1),
            Duration::from_secs(60),
            Jitter::None,
        );
        let delays: Vec<u64> = (0..8)
            .map(|_| b.next_delay_drawn(None, |_| unreachable!()).as_secs())
            .collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 32, 60, 60]);
    }

    #[test]
    fn retry_after_wins_over_the_draw_clamped_to_max() {
        let mut b = Backoff::new(MS(1), Duration::from_secs(10));
        assert_eq!(
            b.next_delay_drawn(Some(Duration::from_secs(3)), |_| 0),
            Duration::from_secs(3)
        );
        assert!(b.next_delay(Some(Duration::from_secs(3))) >= Duration::from_secs(3));
        assert_eq!(
            b.next_delay(Some(Duration::from_secs(3600))),
            Duration::from_secs(10)
        );
        // A shorter Retry-After does not cut a longer draw.
        let mut b = Backoff::new(Duration::from_secs(8), Duration::from_secs(10));
        assert_eq!(
            b.next_delay_drawn(Some(Duration::from_secs(1)), |hi| hi),
            Duration::from_secs(8)
        );
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
}
