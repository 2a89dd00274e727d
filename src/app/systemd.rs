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

/// Sends `WATCHDOG=1` at half the `WatchdogSec` systemd asked for, but only while every
/// heartbeat has moved within that period: a hung drain or ingest loop stops the pings and
/// systemd restarts the service.
pub(super) async fn watchdog_loop(heartbeats: Vec<(&'static str, Arc<AtomicU64>)>) {
    let mut usec = 0u64;
    if !sd_notify::watchdog_enabled(false, &mut usec) || usec == 0 {
        return std::future::pending().await;
    }
    let period = Duration::from_micros(usec);
    let mut every = tokio::time::interval(period / 2);
    let mut stale_logged = false;
    loop {
        every.tick().await;
        let now = now_ms();
        let stale: Vec<&str> = heartbeats
            .iter()
            .filter(|(_, hb)| {
                now.saturating_sub(hb.load(Ordering::Relaxed)) > period.as_millis() as u64
            })
            .map(|(name, _)| *name)
            .collect();
        if stale.is_empty() {
            notify(&[sd_notify::NotifyState::Watchdog]);
            stale_logged = false;
        } else if !stale_logged {
            tracing::error!(loops = ?stale, "a main loop has not gone round within WatchdogSec; not pinging the watchdog");
            stale_logged = true;
        }
    }
}
