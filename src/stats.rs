//! Counters shared by the tasks and read by `status`: plain atomics, bumped once per chunk or
//! batch rather than per record where that is possible.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// Process-lifetime counters (since this start). Spool depth lives in the spool itself.
#[derive(Debug, Default)]
pub struct Stats {
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
    pub files_seen: AtomicU64,
    pub files_done: AtomicU64,
    pub files_failed: AtomicU64,
    pub batches_sent: AtomicU64,
    pub requests_failed: AtomicU64,
    /// Engagements not sent, by Leanplum action name (SPEC section 5).
    pub skipped: Mutex<BTreeMap<String, u64>>,
}

impl Stats {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    pub fn add_skipped(&self, skipped: &BTreeMap<String, u64>) {
        if skipped.is_empty() {
            return;
        }
        let mut all = self.skipped.lock().unwrap_or_else(|e| e.into_inner());
        for (k, v) in skipped {
            *all.entry(k.clone()).or_default() += v;
        }
    }

    pub fn skipped_total(&self) -> u64 {
        let all = self.skipped.lock().unwrap_or_else(|e| e.into_inner());
        all.values().sum()
    }
}
