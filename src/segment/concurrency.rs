//! How many requests may be in flight (SPEC section 6): fixed, or adaptive in the manner of
//! TCP's AIMD and Vector's adaptive request concurrency. Pure: it sees observations (a round
//! trip and what came back, at a time the caller gives) and answers [`Controller::limit`]; no
//! I/O, no clock of its own, so every rule is a unit test below.
//!
//! # The adaptive rule
//! - Start at 1.
//! - Completions are grouped in *windows* about one round trip long (the smoothed round trip,
//!   at least [`MIN_WINDOW`]). At the end of a window with at least one answered request:
//!   - if the window's mean round trip rose above `mean + max(K * deviation, FLOOR * mean)` of
//!     the smoothed round trip ([`DEVIATION_SCALE`], [`RTT_FLOOR`]): halve (the queue is
//!     building somewhere: at Segment, in a proxy, on the link);
//!   - else, if the limit was reached during the window (the pipe was full, so the limit was
//!     what held throughput back): add one, up to the maximum.
//!
//!   Then the smoothed round trip and its deviation take in the window's mean (EWMA with
//!   weight [`EWMA_ALPHA`]). So the limit grows by at most one per round trip.
//! - Every 429, 408, 5xx, timeout or transport error halves the limit at once, down to 1. Unlike
//!   TCP (one reduction per round trip), each such answer counts: a server that answers a burst
//!   of 32 with 32 429s gets one request next, not 16, and recovery is additive anyway. The
//!   window starts again, so no increase follows a decrease within the same round trip.
//! - Answers that say nothing about load (400, 401, 403, other 4xx) count for the round trip
//!   only.
//!
//! The limit never leaves `1..=max`. A fixed setting never moves; the round trip is still
//! measured, for `status`. `Retry-After` and the backoff are the drain's business and win over
//! the limit: nothing is sent while the drain waits, whatever the limit says.

use std::time::{Duration, Instant};

/// Weight of a new window's mean in the smoothed round trip (Vector's default).
pub(crate) const EWMA_ALPHA: f64 = 0.4;
/// A round trip counts as rising beyond `mean + DEVIATION_SCALE * deviation` (Vector's default).
pub(crate) const DEVIATION_SCALE: f64 = 2.5;
/// ... and beyond `mean * (1 + RTT_FLOOR)`: a very steady link (deviation near 0) must not
/// read a millisecond of jitter as congestion.
pub(crate) const RTT_FLOOR: f64 = 0.1;
/// The shortest window, for loopback round trips of a fraction of a millisecond.
pub(crate) const MIN_WINDOW: Duration = Duration::from_millis(5);

/// `segment.concurrency`: a number, or adaptive up to `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    Fixed(usize),
    Adaptive { max: usize },
}

/// What a finished request says about load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// 2xx.
    Success,
    /// An answer that says nothing about load (400, 401, 403, other 4xx): the round trip counts.
    Neutral,
    /// 429, 408, 5xx, a timeout or a transport error: halve.
    Overloaded,
}

#[derive(Debug, Clone)]
pub(crate) struct Controller {
    mode: Mode,
    limit: usize,
    /// Smoothed round trip and its mean deviation, in seconds; `None` before the first window.
    mean: Option<f64>,
    deviation: f64,
    window: Window,
}

#[derive(Debug, Clone, Default)]
struct Window {
    start: Option<Instant>,
    rtt_sum: f64,
    answered: u32,
    /// In-flight requests reached the limit at some launch in this window.
    reached_limit: bool,
}

impl Controller {
    pub(crate) fn new(mode: Mode) -> Controller {
        let limit = match mode {
            Mode::Fixed(n) => n.max(1),
            Mode::Adaptive { .. } => 1,
        };
        Controller {
            mode,
            limit,
            mean: None,
            deviation: 0.0,
            window: Window::default(),
        }
    }

    pub(crate) fn mode(&self) -> Mode {
        self.mode
    }

    /// Requests that may be in flight now.
    pub(crate) fn limit(&self) -> usize {
        self.limit
    }

    /// The most the limit can be: the fixed number, or the adaptive ceiling.
    pub(crate) fn max(&self) -> usize {
        match self.mode {
            Mode::Fixed(n) => n.max(1),
            Mode::Adaptive { max } => max.max(1),
        }
    }

    /// The smoothed round trip, once a window has ended.
    pub(crate) fn rtt(&self) -> Option<Duration> {
        self.mean.map(Duration::from_secs_f64)
    }

    /// A request was launched; `in_flight` counts it.
    pub(crate) fn launched(&mut self, in_flight: usize) {
        if in_flight >= self.limit {
            self.window.reached_limit = true;
        }
    }

    /// A request finished after `rtt` with `outcome`, at `now`.
    pub(crate) fn observe(&mut self, rtt: Duration, outcome: Outcome, now: Instant) {
        let adaptive = matches!(self.mode, Mode::Adaptive { .. });
        if outcome == Outcome::Overloaded {
            if adaptive {
                self.limit = (self.limit / 2).max(1);
            }
            // Start over: what the window saw before the overload says nothing now.
            self.window = Window {
                start: Some(now),
                ..Window::default()
            };
            return;
        }
        // The first window of all starts when its first request was launched.
        let start = *self
            .window
            .start
            .get_or_insert(now.checked_sub(rtt).unwrap_or(now));
        self.window.rtt_sum += rtt.as_secs_f64();
        self.window.answered += 1;
        let length = self
            .mean
            .map_or(rtt, Duration::from_secs_f64)
            .max(MIN_WINDOW);
        if now.saturating_duration_since(start) >= length {
            self.end_window(now);
        }
    }

    fn end_window(&mut self, now: Instant) {
        let w = std::mem::take(&mut self.window);
        self.window.start = Some(now);
        if w.answered == 0 {
            return;
        }
        let current = w.rtt_sum / f64::from(w.answered);
        let Some(mean) = self.mean else {
            self.mean = Some(current);
            self.deviation = current / 2.0;
            if w.reached_limit {
                self.grow();
            }
            return;
        };
        let band = (DEVIATION_SCALE * self.deviation).max(RTT_FLOOR * mean);
        if current > mean + band {
            self.shrink();
        } else if w.reached_limit {
            self.grow();
        }
        self.deviation = (1.0 - EWMA_ALPHA) * self.deviation + EWMA_ALPHA * (current - mean).abs();
        self.mean = Some((1.0 - EWMA_ALPHA) * mean + EWMA_ALPHA * current);
    }

    fn grow(&mut self) {
        if let Mode::Adaptive { max } = self.mode {
            self.limit = (self.limit + 1).min(max.max(1));
        }
    }

    fn shrink(&mut self) {
        if let Mode::Adaptive { .. } = self.mode {
            self.limit = (self.limit / 2).max(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// Drives `c` as a drain with a full spool would: keeps `limit()` requests in flight, each
    /// answered after `rtt(i)` for the i-th round, for `rounds` round trips. Returns the limit
    /// after each round.
    fn rounds(
        c: &mut Controller,
        now: &mut Instant,
        n: usize,
        mut rtt: impl FnMut(usize) -> Duration,
        outcome: Outcome,
    ) -> Vec<usize> {
        let mut limits = Vec::new();
        for i in 0..n {
            let limit = c.limit();
            for k in 1..=limit {
                c.launched(k);
            }
            let r = rtt(i);
            *now += r;
            for _ in 0..limit {
                c.observe(r, outcome, *now);
            }
            limits.push(c.limit());
        }
        limits
    }

    fn adaptive(max: usize) -> Controller {
        Controller::new(Mode::Adaptive { max })
    }

    #[test]
    fn starts_at_one_and_steady_round_trips_grow_it_to_the_max() {
        let mut c = adaptive(32);
        assert_eq!(c.limit(), 1);
        let mut now = Instant::now();
        let limits = rounds(&mut c, &mut now, 60, |_| 150 * MS, Outcome::Success);
        // One more per round trip, never two.
        for pair in limits.windows(2) {
            assert!(pair[1] <= pair[0] + 1, "{limits:?}");
        }
        assert_eq!(*limits.last().unwrap(), 32, "{limits:?}");
        assert!(limits.iter().all(|l| (1..=32).contains(l)));
        let rtt = c.rtt().unwrap();
        assert!(rtt > 149 * MS && rtt < 151 * MS, "{rtt:?}");
    }

    #[test]
    fn small_jitter_is_not_congestion() {
        let mut c = adaptive(16);
        let mut now = Instant::now();
        // 100 ms +- 3 ms, as a real link jitters.
        let limits = rounds(
            &mut c,
            &mut now,
            40,
            |i| Duration::from_micros(100_000 + (i as u64 % 7) * 1000 - 3000),
            Outcome::Success,
        );
        assert_eq!(*limits.last().unwrap(), 16, "{limits:?}");
    }

    #[test]
    fn a_429_halves_and_a_burst_of_them_goes_to_one() {
        let mut c = adaptive(32);
        let mut now = Instant::now();
        rounds(&mut c, &mut now, 40, |_| 50 * MS, Outcome::Success);
        assert_eq!(c.limit(), 32);
        now += 50 * MS;
        c.observe(50 * MS, Outcome::Overloaded, now);
        assert_eq!(c.limit(), 16);
        c.observe(50 * MS, Outcome::Overloaded, now);
        assert_eq!(c.limit(), 8);
        for _ in 0..30 {
            c.observe(50 * MS, Outcome::Overloaded, now);
        }
        assert_eq!(c.limit(), 1, "never below 1");
        // And it grows back, one per round trip.
        let limits = rounds(&mut c, &mut now, 5, |_| 50 * MS, Outcome::Success);
        assert_eq!(limits, [2, 3, 4, 5, 6]);
    }

    #[test]
    fn no_increase_in_the_round_trip_of_a_decrease() {
        let mut c = adaptive(32);
        let mut now = Instant::now();
        rounds(&mut c, &mut now, 10, |_| 100 * MS, Outcome::Success);
        let before = c.limit();
        c.launched(before);
        now += 100 * MS;
        c.observe(100 * MS, Outcome::Overloaded, now);
        // The other requests of that round come back fine just after.
        for _ in 1..before {
            now += MS;
            c.observe(100 * MS, Outcome::Success, now);
        }
        assert_eq!(c.limit(), before / 2);
    }

    #[test]
    fn a_rising_round_trip_backs_off() {
        let mut c = adaptive(32);
        let mut now = Instant::now();
        rounds(&mut c, &mut now, 20, |_| 100 * MS, Outcome::Success);
        let top = c.limit();
        assert!(top >= 16, "{top}");
        // Queueing somewhere: the round trip doubles.
        let limits = rounds(&mut c, &mut now, 2, |_| 200 * MS, Outcome::Success);
        assert!(limits[1] <= top / 2 + 1, "{top} -> {limits:?}");
        assert!(limits.iter().all(|l| *l >= 1));
    }

    #[test]
    fn the_round_trip_tracks_a_new_level_and_growth_resumes() {
        let mut c = adaptive(32);
        let mut now = Instant::now();
        rounds(&mut c, &mut now, 10, |_| 50 * MS, Outcome::Success);
        // A permanently longer path: after some backing off, the mean follows and the limit
        // grows again to the max.
        let limits = rounds(&mut c, &mut now, 80, |_| 300 * MS, Outcome::Success);
        assert_eq!(*limits.last().unwrap(), 32, "{limits:?}");
        let rtt = c.rtt().unwrap();
        assert!(rtt > 290 * MS && rtt < 310 * MS, "{rtt:?}");
    }

    #[test]
    fn an_idle_pipe_does_not_grow_the_limit() {
        let mut c = adaptive(32);
        let mut now = Instant::now();
        // One request at a time although the limit would allow more: no evidence it helps.
        for _ in 0..3 {
            rounds(&mut c, &mut now, 1, |_| 100 * MS, Outcome::Success);
        }
        let after_full = c.limit();
        for _ in 0..20 {
            now += 100 * MS;
            c.launched(1);
            c.observe(100 * MS, Outcome::Success, now);
        }
        assert!(after_full > 1);
        assert_eq!(c.limit(), after_full, "grew while idle");
    }

    #[test]
    fn neutral_answers_count_for_the_round_trip_only() {
        let mut c = adaptive(8);
        let mut now = Instant::now();
        let limits = rounds(&mut c, &mut now, 5, |_| 20 * MS, Outcome::Neutral);
        assert!(limits.iter().all(|l| *l >= 1 && *l <= 8));
        assert!(c.rtt().is_some());
    }

    #[test]
    fn never_above_the_max_nor_below_one() {
        let mut c = adaptive(3);
        let mut now = Instant::now();
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..2000 {
            let outcome = match rng.u8(..10) {
                0 => Outcome::Overloaded,
                1 => Outcome::Neutral,
                _ => Outcome::Success,
            };
            let rtt = Duration::from_millis(rng.u64(1..500));
            now += Duration::from_millis(rng.u64(0..100));
            c.launched(rng.usize(0..5));
            c.observe(rtt, outcome, now);
            assert!((1..=3).contains(&c.limit()), "{}", c.limit());
        }
    }

    #[test]
    fn a_fixed_setting_never_moves() {
        for n in [1, 4, 16] {
            let mut c = Controller::new(Mode::Fixed(n));
            let mut now = Instant::now();
            assert_eq!(c.limit(), n);
            let limits = rounds(&mut c, &mut now, 20, |_| 100 * MS, Outcome::Success);
            assert!(limits.iter().all(|l| *l == n), "{limits:?}");
            rounds(&mut c, &mut now, 5, |_| 900 * MS, Outcome::Success);
            rounds(&mut c, &mut now, 5, |_| 100 * MS, Outcome::Overloaded);
            assert_eq!(c.limit(), n);
            assert_eq!(c.max(), n);
            // The round trip is still measured, for status.
            assert!(c.rtt().is_some());
        }
    }
}
