//! Spool -> Segment. One coordinator task claims batches from the spool in FIFO order, keeps up
//! to `concurrency` requests in flight, and applies the response table (SPEC section 6).
//!
//! Memory is bounded by `concurrency` batches whatever the backlog: a failed batch waits in
//! `retry` (it still counts against `concurrency`), and no new batch is claimed while one is
//! waiting to be retried. During an outage the agent therefore sends at most `concurrency`
//! requests per backoff period, never a storm.
//!
//! # Ordering
//! Events of one file are claimed in file order (spool keys are FIFO). With `concurrency` > 1,
//! batches are in flight together and may land in any order; a failed batch is re-sent after
//! later ones may have succeeded. Segment orders by `timestamp`, not arrival, so this only
//! matters to consumers of the raw stream.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::segment::batch::{encode_body, event_budget};
use crate::segment::client::{Answer, Client};
use crate::segment::retry::{Backoff, RetryAction, retry_action};
use crate::segment::rfc3339_millis;
use crate::spool::{Queued, Spool, now_ms};
use crate::stats::Stats;

/// How long in-flight requests get to finish once shutdown starts.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct DrainSettings {
    pub max_batch_bytes: usize,
    pub max_batch_events: usize,
    pub flush_interval: Duration,
    pub concurrency: usize,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
}

impl DrainSettings {
    pub fn from_config(c: &crate::config::Config) -> DrainSettings {
        DrainSettings {
            max_batch_bytes: c.segment.max_batch_bytes,
            max_batch_events: c.segment.max_batch_events,
            flush_interval: Duration::from_millis(c.segment.flush_interval_ms),
            concurrency: c.segment.concurrency,
            initial_backoff: Duration::from_millis(c.retry.initial_backoff_ms),
            max_backoff: Duration::from_secs(c.retry.max_backoff_secs),
        }
    }
}

/// The drain's state as `status` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryState {
    #[default]
    Running,
    BackingOff,
    AuthFailed,
    Rejected,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct DrainStatus {
    pub state: DeliveryState,
    pub last_success_ms: Option<u64>,
    pub last_error: Option<String>,
    /// The wait in force now, if any.
    pub current_backoff_ms: Option<u64>,
    /// HTTP status of the last request Segment refused for good (401/403, other 4xx, 501...).
    pub last_rejected_status: Option<u16>,
}

/// What a reload may change: the limits and timers, and the client (endpoint, key, timeout,
/// gzip). Sent through a watch channel; the drain picks it up between requests.
#[derive(Debug, Clone)]
pub struct DrainConfig {
    pub settings: DrainSettings,
    pub client: Client,
}

/// Handles the rest of the agent uses to talk to the drain.
#[derive(Debug, Clone, Default)]
pub struct DrainHandle {
    /// Last time (ms since the epoch) the drain loop went round: the watchdog's proof of life.
    pub heartbeat_ms: Arc<std::sync::atomic::AtomicU64>,
    /// Wakes the drain: new events were committed.
    pub wake: Arc<tokio::sync::Notify>,
    /// SIGUSR1: skip the current backoff wait.
    pub kick: Arc<tokio::sync::Notify>,
    pub status: Arc<Mutex<DrainStatus>>,
}

struct Batch {
    items: Vec<Queued>,
}

type Flight = (Batch, Answer);

pub struct Drain {
    spool: Arc<Spool>,
    config: tokio::sync::watch::Receiver<DrainConfig>,
    stats: Arc<Stats>,
    handle: DrainHandle,
    /// File ids whose events are all delivered, for `after_ingest`.
    files_delivered: Option<tokio::sync::mpsc::UnboundedSender<u64>>,
}

impl Drain {
    pub fn new(
        spool: Arc<Spool>,
        config: tokio::sync::watch::Receiver<DrainConfig>,
        stats: Arc<Stats>,
        handle: DrainHandle,
        files_delivered: Option<tokio::sync::mpsc::UnboundedSender<u64>>,
    ) -> Drain {
        Drain {
            spool,
            config,
            stats,
            handle,
            files_delivered,
        }
    }

    /// Runs until `shutdown`; then lets in-flight requests finish for up to
    /// [`SHUTDOWN_GRACE`] and returns. Unfinished batches stay in the spool.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut current = self.config.borrow_and_update().clone();
        let mut s = current.settings.clone();
        let mut backoff = Backoff::new(s.initial_backoff, s.max_backoff);
        let mut cursor: Option<u64> = None;
        let mut retry: VecDeque<Batch> = VecDeque::new();
        let mut flights: JoinSet<Flight> = JoinSet::new();
        let mut not_before = Instant::now();
        let mut budget = event_budget(s.max_batch_bytes);

        loop {
            if shutdown.is_cancelled() {
                break;
            }
            self.handle
                .heartbeat_ms
                .store(now_ms(), std::sync::atomic::Ordering::Relaxed);
            if self.config.has_changed().unwrap_or(false) {
                current = self.config.borrow_and_update().clone();
                s = current.settings.clone();
                budget = event_budget(s.max_batch_bytes);
                // A new endpoint or key deserves a fresh try; new limits apply from here.
                backoff = Backoff::new(s.initial_backoff, s.max_backoff);
                not_before = Instant::now();
                tracing::info!(endpoint = %current.client.url(), "delivery settings reloaded");
            }
            // Fill free slots: retries first (they are older), then new batches, but never
            // new ones while a retry waits, so an outage cannot grow memory.
            let mut partial_wait: Option<Instant> = None;
            while flights.len() < s.concurrency && Instant::now() >= not_before {
                if let Some(batch) = retry.pop_front() {
                    launch(&current.client, &mut flights, batch);
                    continue;
                }
                let peeked = match self.spool.peek(cursor, s.max_batch_events, budget) {
                    Ok(p) => p,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot read the spool");
                        not_before = Instant::now() + s.max_backoff.min(Duration::from_secs(5));
                        break;
                    }
                };
                let Some(first) = peeked.items.first() else {
                    break;
                };
                if !peeked.full {
                    // A partial batch goes once its oldest event has waited flush_interval.
                    let waited = now_ms().saturating_sub(first.enqueued_ms);
                    let interval = s.flush_interval.as_millis() as u64;
                    if waited < interval {
                        partial_wait =
                            Some(Instant::now() + Duration::from_millis(interval - waited));
                        break;
                    }
                }
                cursor = peeked.items.last().map(|q| q.key);
                launch(
                    &current.client,
                    &mut flights,
                    Batch {
                        items: peeked.items,
                    },
                );
            }

            let wake_at = if Instant::now() < not_before {
                Some(not_before)
            } else {
                partial_wait
            };
            // Go round at least every second, so the heartbeat proves the loop is alive.
            let heartbeat = Instant::now() + Duration::from_secs(1);
            let wake_at = Some(wake_at.map_or(heartbeat, |w| w.min(heartbeat)));
            tokio::select! {
                Some(done) = flights.join_next() => {
                    if let Ok((batch, answer)) = done {
                        self.settle(batch, answer, &mut backoff, &mut retry, &mut not_before);
                    }
                }
                _ = self.handle.wake.notified() => {}
                _ = self.handle.kick.notified() => {
                    if Instant::now() < not_before {
                        tracing::info!("backoff skipped on request");
                        not_before = Instant::now();
                    }
                }
                _ = sleep_until_opt(wake_at) => {}
                _ = shutdown.cancelled() => {}
            }
        }

        if !flights.is_empty() {
            tracing::info!(
                in_flight = flights.len(),
                "waiting for in-flight batches before exit"
            );
        }
        let deadline = Instant::now() + SHUTDOWN_GRACE;
        while !flights.is_empty() {
            match tokio::time::timeout_at(deadline, flights.join_next()).await {
                Ok(Some(Ok((batch, answer)))) => {
                    let mut ignore = VecDeque::new();
                    self.settle(batch, answer, &mut backoff, &mut ignore, &mut not_before);
                }
                Ok(_) => {}
                Err(_) => {
                    tracing::warn!(
                        in_flight = flights.len(),
                        "in-flight batches abandoned at shutdown; they stay spooled and are sent again at the next start"
                    );
                    flights.abort_all();
                    break;
                }
            }
        }
    }

    /// Applies the response table to one finished request.
    fn settle(
        &self,
        batch: Batch,
        answer: Answer,
        backoff: &mut Backoff,
        retry: &mut VecDeque<Batch>,
        not_before: &mut Instant,
    ) {
        let n = batch.items.len() as u64;
        match retry_action(answer.status) {
            RetryAction::Delivered => {
                match self.spool.ack(&batch.items) {
                    Ok(done) => {
                        for id in done {
                            if let Some(tx) = &self.files_delivered {
                                let _ = tx.send(id);
                            }
                        }
                    }
                    Err(e) => {
                        // The events stay queued and will be sent again: harmless, Segment
                        // dedupes by messageId.
                        tracing::error!(error = %e, "cannot remove delivered events from the spool");
                    }
                }
                Stats::add(&self.stats.events_delivered, n);
                let now = now_ms();
                for q in &batch.items {
                    self.stats
                        .delivery_latency
                        .observe_ms(now.saturating_sub(q.enqueued_ms));
                }
                backoff.reset();
                let mut st = self.lock_status();
                if st.state != DeliveryState::Running {
                    tracing::info!(events = n, "delivery resumed");
                }
                st.state = DeliveryState::Running;
                st.current_backoff_ms = None;
                st.last_success_ms = Some(now_ms());
                tracing::debug!(events = n, "batch delivered");
            }
            RetryAction::Split => {
                if batch.items.len() == 1 {
                    tracing::warn!(detail = %answer.detail, "Segment rejected an event; dead-lettered");
                    match self
                        .spool
                        .dead_letter(&batch.items, &answer.detail, answer.status)
                    {
                        Ok(_) => Stats::add(&self.stats.dead_lettered, 1),
                        Err(e) => {
                            tracing::error!(error = %e, "cannot dead-letter an event; it stays queued");
                        }
                    }
                } else {
                    // Bisect: both halves go to the front, in order, without a backoff.
                    let mut items = batch.items;
                    let second = items.split_off(items.len() / 2);
                    retry.push_front(Batch { items: second });
                    retry.push_front(Batch { items });
                }
            }
            action => {
                let (state, delay) = match action {
                    RetryAction::AuthFailed => {
                        backoff.next_delay(None);
                        (DeliveryState::AuthFailed, backoff.max())
                    }
                    RetryAction::Rejected => {
                        backoff.next_delay(None);
                        (DeliveryState::Rejected, backoff.max())
                    }
                    _ => (
                        DeliveryState::BackingOff,
                        backoff.next_delay(answer.retry_after),
                    ),
                };
                let until = Instant::now() + delay;
                if until > *not_before {
                    *not_before = until;
                }
                // Keep batches in claim order so a retry re-sends the oldest first.
                let pos = retry
                    .iter()
                    .position(|b| b.items[0].key > batch.items[0].key)
                    .unwrap_or(retry.len());
                retry.insert(pos, batch);
                let mut st = self.lock_status();
                if st.state != state || st.last_error.as_deref() != Some(&answer.detail) {
                    tracing::warn!(
                        detail = %answer.detail,
                        events = n,
                        retry_in_ms = delay.as_millis() as u64,
                        state = ?state,
                        "delivery failed; will retry"
                    );
                }
                st.state = state;
                if matches!(state, DeliveryState::AuthFailed | DeliveryState::Rejected) {
                    st.last_rejected_status = answer.status;
                }
                st.last_error = Some(answer.detail);
                st.current_backoff_ms = Some(delay.as_millis() as u64);
            }
        }
    }

    fn lock_status(&self) -> std::sync::MutexGuard<'_, DrainStatus> {
        self.handle.status.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Sends one batch in its own task; the answer comes back through `flights`.
fn launch(client: &Client, flights: &mut JoinSet<Flight>, batch: Batch) {
    let client = client.clone();
    flights.spawn(async move {
        // sentAt is fresh on every attempt and never stored.
        let sent_at = rfc3339_millis(now_ms() as i64);
        let body = encode_body(batch.items.iter().map(|q| q.json.as_ref()), &sent_at);
        let answer = client.send(body).await;
        (batch, answer)
    });
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
