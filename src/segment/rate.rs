//! `segment.max_events_per_sec`: a token bucket over events sent (SPEC section 6). Pure: the
//! caller passes the time, so the tests run on made-up instants.
//!
//! The bucket holds one second of events (at least one) and starts full. A batch of `n` events
//! takes `n` tokens. A batch larger than the bucket (possible only after a reload lowered the
//! rate, since the drain makes batches no larger than the bucket) waits until the bucket is
//! full and then goes, leaving the bucket in debt: the next batch waits for the debt to be
//! paid, so the rate holds over time and nothing waits forever.

use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub(crate) struct TokenBucket {
    per_sec: u64,
    capacity: f64,
    /// May be negative: the debt of a batch larger than the bucket.
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// `None` for 0: unlimited.
    pub(crate) fn new(per_sec: u64, now: Instant) -> Option<TokenBucket> {
        (per_sec > 0).then(|| {
            let capacity = per_sec as f64;
            TokenBucket {
                per_sec,
                capacity,
                tokens: capacity,
                last: now,
            }
        })
    }

    /// Events the bucket holds when full: the largest batch worth making.
    pub(crate) fn capacity(&self) -> usize {
        self.capacity as usize
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = self.last.max(now);
        self.tokens = (self.tokens + elapsed * self.per_sec as f64).min(self.capacity);
    }

    /// Takes `n` tokens if the batch may go at `now`; otherwise takes nothing and says when it
    /// may.
    pub(crate) fn try_take(&mut self, n: usize, now: Instant) -> Result<(), Instant> {
        self.refill(now);
        let need = (n as f64).min(self.capacity);
        // A hair of tolerance, so a wake-up computed from the rate is never a hair early.
        if self.tokens + 1e-6 >= need {
            self.tokens -= n as f64;
            return Ok(());
        }
        let wait = (need - self.tokens) / self.per_sec as f64;
        Err(now + Duration::from_secs_f64(wait) + Duration::from_micros(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn zero_is_unlimited() {
        assert!(TokenBucket::new(0, Instant::now()).is_none());
    }

    #[test]
    fn starts_full_then_holds_the_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(200, t0).unwrap();
        assert_eq!(b.capacity(), 200);
        // A sender that always has batches of 50 and sends as soon as allowed, for 10 s.
        let (mut now, mut sent) = (t0, 0u64);
        let mut sends = Vec::new();
        while now < t0 + Duration::from_secs(10) {
            match b.try_take(50, now) {
                Ok(()) => {
                    sent += 50;
                    sends.push(now);
                }
                Err(at) => {
                    assert!(at > now, "a wait in the future");
                    now = at;
                }
            }
        }
        // The burst of a full bucket, then 200 a second.
        assert!((2150..=2250).contains(&sent), "{sent}");
        // In any second, at most the bucket plus a second's rate.
        for (i, start) in sends.iter().enumerate() {
            let in_window = sends[i..]
                .iter()
                .take_while(|t| **t < *start + Duration::from_secs(1))
                .count() as u64;
            assert!(
                in_window * 50 <= 400,
                "{} events in a second",
                in_window * 50
            );
        }
    }

    #[test]
    fn a_wait_ends_exactly_when_the_tokens_are_there() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(100, t0).unwrap();
        assert_eq!(b.try_take(100, t0), Ok(()));
        let at = b.try_take(10, t0).unwrap_err();
        assert!(at >= t0 + 100 * MS && at < t0 + 101 * MS, "{:?}", at - t0);
        assert!(b.try_take(10, at - 2 * MS).is_err());
        assert_eq!(b.try_take(10, at), Ok(()));
    }

    #[test]
    fn a_batch_larger_than_the_bucket_waits_for_a_full_bucket_then_goes() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10, t0).unwrap();
        assert_eq!(b.try_take(5, t0), Ok(()));
        // 25 events against a bucket of 10: not now, but once it is full (0.5 s), never later.
        let at = b.try_take(25, t0).unwrap_err();
        assert!(at >= t0 + 500 * MS && at < t0 + 501 * MS, "{:?}", at - t0);
        assert_eq!(b.try_take(25, at), Ok(()));
        // The debt (15) is paid before the next event: 1.5 s, plus 0.1 s for that event.
        let next = b.try_take(1, at).unwrap_err();
        assert!(
            next >= at + 1600 * MS && next < at + 1601 * MS,
            "{:?}",
            next - at
        );
        // Long after, the bucket is full again, not more.
        let later = at + Duration::from_secs(3600);
        assert_eq!(b.try_take(10, later), Ok(()));
        assert!(b.try_take(1, later).is_err());
    }

    #[test]
    fn time_going_backwards_takes_nothing() {
        let t0 = Instant::now() + Duration::from_secs(5);
        let mut b = TokenBucket::new(10, t0).unwrap();
        assert_eq!(b.try_take(10, t0), Ok(()));
        assert!(b.try_take(1, t0 - Duration::from_secs(1)).is_err());
    }
}
