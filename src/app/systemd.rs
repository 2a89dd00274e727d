//! systemd's notify protocol (`Type=notify`): READY, RELOADING, STOPPING, STATUS and the
//! watchdog. Every call is a no-op without `$NOTIFY_SOCKET`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::clock::now_ms;
use crate::control;

/// `STATUS=` for `systemctl status`, refreshed every few seconds (only under systemd).
pub(super) async fn status_loop(report: control::ReportFn) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        // Nothing to do, but a supervised task ends only at shutdown (see `app::run`).
        return std::future::pending().await;
    }
    let mut every = tokio::time::interval(Duration::from_secs(10));
    loop {
        every.tick().await;
        let report = report.clone();
        if let Ok(line) = tokio::task::spawn_blocking(move || report().one_line()).await {
            notify(&[sd_notify::NotifyState::Status(&line)]);
        }
    }
}

/// Tells systemd (`Type=notify`) where we are; a no-op without `$NOTIFY_SOCKET`.
pub(super) fn notify(state: &[sd_notify::NotifyState]) {
    if std::env::var_os("NOTIFY_SOCKET").is_some()
        && let Err(e) = sd_notify::notify(false, state)
    {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
}

/// `RELOADING=1` with the `MONOTONIC_USEC` systemd wants beside it (since v253).
pub(super) fn reloading() {
    match sd_notify::NotifyState::monotonic_usec_now() {
        Ok(now) => notify(&[sd_notify::NotifyState::Reloading, now]),
        Err(_) => notify(&[sd_notify::NotifyState::Reloading]),
    }
}

/// The watchdog (`WatchdogSec=`): `WATCHDOG=1` at half the period systemd asked for, sent by
/// the supervision loop (`Agent::supervise`) and only while every heartbeat has moved within
/// that period. A task that ended stops the loop, a hung drain or ingest loop stops the pings,
/// and a runtime too busy to run the loop sends none: systemd then restarts the service.
pub(super) struct Watchdog {
    period: Duration,
    every: tokio::time::Interval,
    heartbeats: Vec<(&'static str, Arc<AtomicU64>)>,
    stale_logged: bool,
}

impl Watchdog {
    /// `None` when systemd asked for no watchdog (`$WATCHDOG_USEC` unset, or for another pid).
    pub(super) fn from_env(heartbeats: Vec<(&'static str, Arc<AtomicU64>)>) -> Option<Watchdog> {
        let mut usec = 0u64;
        if !sd_notify::watchdog_enabled(false, &mut usec) || usec == 0 {
            return None;
        }
        let period = Duration::from_micros(usec);
        Some(Watchdog {
            period,
            every: tokio::time::interval(period / 2),
            heartbeats,
            stale_logged: false,
        })
    }

    /// When the next ping is due; never without a watchdog.
    pub(super) async fn tick(watchdog: &mut Option<Watchdog>) {
        match watchdog {
            Some(w) => {
                w.every.tick().await;
            }
            None => std::future::pending().await,
        }
    }

    /// `WATCHDOG=1` if every heartbeat is fresh; else an error, logged once per stall.
    pub(super) fn ping_if_alive(&mut self) {
        let stale = stale(&self.heartbeats, now_ms(), self.period);
        if stale.is_empty() {
            notify(&[sd_notify::NotifyState::Watchdog]);
            self.stale_logged = false;
        } else if !self.stale_logged {
            tracing::error!(loops = ?stale, "a main loop has not gone round within WatchdogSec; not pinging the watchdog");
            self.stale_logged = true;
        }
    }
}

/// The loops whose heartbeat (ms since the epoch) is older than `period` at `now_ms`.
fn stale(
    heartbeats: &[(&'static str, Arc<AtomicU64>)],
    now_ms: u64,
    period: Duration,
) -> Vec<&'static str> {
    heartbeats
        .iter()
        .filter(|(_, hb)| {
            now_ms.saturating_sub(hb.load(Ordering::Relaxed)) > period.as_millis() as u64
        })
        .map(|(name, _)| *name)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_heartbeat_older_than_the_period_is_stale() {
        let beat = |ms| Arc::new(AtomicU64::new(ms));
        let heartbeats = vec![("drain", beat(100_000)), ("ingest", beat(80_000))];
        let period = Duration::from_secs(30);
        assert!(stale(&heartbeats, 100_000, period).is_empty());
        assert!(stale(&heartbeats, 110_000, period).is_empty());
        assert_eq!(stale(&heartbeats, 110_001, period), vec!["ingest"]);
        assert_eq!(stale(&heartbeats, 130_001, period), vec!["drain", "ingest"]);
        // A heartbeat from a clock that went back is not stale.
        assert!(stale(&heartbeats, 10_000, period).is_empty());
    }

    #[tokio::test]
    async fn without_a_watchdog_no_ping_is_ever_due() {
        let mut none = None;
        let due = tokio::time::timeout(Duration::from_millis(10), Watchdog::tick(&mut none));
        assert!(due.await.is_err());
    }
}
