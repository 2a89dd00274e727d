//! The wall clock, in one place: "now" and the ages and times of files, as milliseconds since
//! the Unix epoch where they are stored or shown. A clock set before 1970 reads as 0, never as
//! an error. Monotonic deadlines (`Instant`) are not here: they measure waits, not dates.
//! Formatting times for Segment is the event's business, not the clock's.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Now, as a `SystemTime` (for arithmetic with dates read from elsewhere, e.g. `Retry-After`).
pub(crate) fn now() -> SystemTime {
    SystemTime::now()
}

/// Now, in milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> u64 {
    ms_since_epoch(now())
}

/// `t` in milliseconds since the Unix epoch (0 before it).
pub(crate) fn ms_since_epoch(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A file's modification time in milliseconds since the Unix epoch (0 when unknown).
pub(crate) fn mtime_ms(meta: &std::fs::Metadata) -> u64 {
    meta.modified().map_or(0, ms_since_epoch)
}

/// How long ago `t` was; `None` for a time ahead of now (a clock that stepped back).
pub(crate) fn age(t: SystemTime) -> Option<Duration> {
    now().duration_since(t).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_before_the_epoch_or_ahead_of_now_read_as_zero() {
        assert_eq!(ms_since_epoch(UNIX_EPOCH - Duration::from_secs(1)), 0);
        assert_eq!(
            ms_since_epoch(UNIX_EPOCH + Duration::from_millis(1500)),
            1500
        );
        assert_eq!(age(now() + Duration::from_secs(3600)), None);
        assert!(age(UNIX_EPOCH).is_some());
        assert!(now_ms() > 1_700_000_000_000);
    }
}
