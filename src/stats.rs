//! Counters shared by the tasks and read by `status`: plain atomics, bumped once per chunk or
//! batch rather than per record where that is possible.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// Process-lifetime counters (since this start). Spool depth lives in the spool itself.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    /// Records (sessions, engagement rows) read from files.
    pub records_read: AtomicU64,
    /// Events committed to the spool.
    pub events_spooled: AtomicU64,
    /// Events Segment accepted (2xx).
    pub events_delivered: AtomicU64,
    /// Events not spooled because their messageId was already seen within the dedupe window.
    pub duplicates_skipped: AtomicU64,
    /// Records or lines put in quarantine (bad input).
    pub quarantined: AtomicU64,
    /// Events Segment rejected for good, or too large to send.
    pub dead_lettered: AtomicU64,
    /// Engagements not sent, by Leanplum action name (SPEC section 5).
    pub skipped: Mutex<BTreeMap<String, u64>>,
    /// Time from spooling to Segment's 2xx, per event.
    pub delivery_latency: Histogram,
}

/// Upper bounds (seconds) of the delivery latency buckets: from a normal flush to a day-long
/// outage.
pub(crate) const LATENCY_BUCKETS_SECS: [f64; 12] = [
    0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 21600.0, 86400.0,
];

/// A Prometheus-style cumulative histogram on atomics.
#[derive(Debug, Default)]
pub(crate) struct Histogram {
    /// Observations at or below each bound of [`LATENCY_BUCKETS_SECS`] (not cumulative).
    buckets: [AtomicU64; LATENCY_BUCKETS_SECS.len()],
    count: AtomicU64,
    sum_ms: AtomicU64,
}

impl Histogram {
    pub(crate) fn observe_ms(&self, ms: u64) {
        let secs = ms as f64 / 1000.0;
        if let Some(i) = LATENCY_BUCKETS_SECS.iter().position(|b| secs <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_ms.fetch_add(ms, Ordering::Relaxed);
    }

    /// Cumulative counts per bound, the total count, and the sum in seconds.
    pub(crate) fn snapshot(&self) -> (Vec<(f64, u64)>, u64, f64) {
        let mut running = 0;
        let cumulative = LATENCY_BUCKETS_SECS
            .iter()
            .zip(&self.buckets)
            .map(|(b, c)| {
                running += c.load(Ordering::Relaxed);
                (*b, running)
            })
            .collect();
        (
            cumulative,
            self.count.load(Ordering::Relaxed),
            self.sum_ms.load(Ordering::Relaxed) as f64 / 1000.0,
        )
    }
}

impl Stats {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    pub(crate) fn add_skipped(&self, skipped: &BTreeMap<String, u64>) {
        if skipped.is_empty() {
            return;
        }
        let mut all = self.skipped.lock().unwrap_or_else(|e| e.into_inner());
        for (k, v) in skipped {
            *all.entry(k.clone()).or_default() += v;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative() {
        let h = Histogram::default();
        for ms in [100, 700, 700, 4000, 100_000_000] {
            h.observe_ms(ms);
        }
        let (buckets, count, sum) = h.snapshot();
        assert_eq!(count, 5);
        assert_eq!(buckets[0], (0.5, 1));
        assert_eq!(buckets[1], (1.0, 3));
        assert_eq!(buckets[3], (5.0, 4));
        // Beyond the last bound only +Inf (the count) holds it.
        assert_eq!(buckets.last().unwrap().1, 4);
        assert!((sum - 100_005.5).abs() < 1e-6);
    }
}
