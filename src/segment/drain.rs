//! Spool -> Segment. One coordinator task claims batches from the spool in FIFO order, keeps up
//! to the concurrency limit of requests in flight, and applies the decision table of SPEC
//! section 6 ([`super::retry::decide`]) to each answer.
//!
//! The limit is fixed or adaptive ([`super::concurrency`]): each request's round trip
//! and answer go to the controller, which says how many may be in flight. Before a batch goes,
//! it takes its events from the `max_events_per_sec` token bucket ([`super::rate`]),
//! and batches are made no larger than that bucket. Backoff and `Retry-After` come first:
//! nothing is launched while the drain waits, whatever the limit and the bucket say.
//!
//! Memory is bounded by the largest limit (the fixed number, or `max_concurrency`) of batches
//! whatever the backlog: a failed batch waits in `retry`, and no new batch is claimed while one
//! is waiting to be retried. During an outage the agent therefore sends at most the limit of
//! requests per backoff period, never a storm (and an adaptive limit halves at each failure).
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

use super::batch::event_budget;
use super::client::{Answer, Client};
use super::concurrency::{Controller, Mode};
use super::rate::TokenBucket;
use super::retry::{Decision, decide};
use crate::backoff::Backoff;
use crate::clock::now_ms;
use crate::event::rfc3339_millis;
use crate::spool::{Queued, Spool};
use crate::stats::Stats;

/// How long in-flight requests get to finish once shutdown starts.
pub(crate) const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub(crate) struct DrainSettings {
    pub max_batch_bytes: usize,
    pub max_batch_events: usize,
    pub flush_interval: Duration,
    pub concurrency: Mode,
    /// 0 = unlimited.
    pub max_events_per_sec: u64,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
}

impl DrainSettings {
    pub(crate) fn from_config(c: &crate::config::Config) -> DrainSettings {
        DrainSettings {
            max_batch_bytes: c.segment.max_batch_bytes,
            max_batch_events: c.segment.max_batch_events,
            flush_interval: Duration::from_millis(c.segment.flush_interval_ms),
            concurrency: match c.segment.concurrency {
                crate::config::Concurrency::Fixed(n) => Mode::Fixed(n),
                crate::config::Concurrency::Adaptive => Mode::Adaptive {
                    max: c.segment.max_concurrency,
                },
            },
            max_events_per_sec: c.segment.max_events_per_sec,
            initial_backoff: Duration::from_millis(c.retry.initial_backoff_ms),
            max_backoff: Duration::from_secs(c.retry.max_backoff_secs),
        }
    }
}

/// The drain's state as `status` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub(crate) enum DeliveryState {
    #[default]
    Running,
    BackingOff,
    AuthFailed,
    Rejected,
}

#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct DrainStatus {
    pub state: DeliveryState,
    pub last_success_ms: Option<u64>,
    pub last_error: Option<String>,
    /// The wait in force now, if any.
    pub current_backoff_ms: Option<u64>,
    /// HTTP status of the last request Segment refused for good (401/403, other 4xx, 501...).
    pub last_rejected_status: Option<u16>,
    /// `segment.concurrency = "adaptive"`.
    pub concurrency_adaptive: bool,
    /// Requests that may be in flight now.
    pub concurrency_limit: usize,
    /// The fixed number, or `max_concurrency`.
    pub max_concurrency: usize,
    pub in_flight: usize,
    /// The smoothed round trip of a request (send to answer, compression included), once known.
    pub rtt_ms: Option<f64>,
    /// `segment.max_events_per_sec` in force (0 = unlimited).
    pub max_events_per_sec: u64,
}

/// What a reload may change: the limits and timers, and the client (endpoint, key, timeout,
/// gzip). Sent through a watch channel; the drain picks it up between requests.
#[derive(Debug, Clone)]
pub(crate) struct DrainConfig {
    pub settings: DrainSettings,
    pub client: Client,
}

/// Handles the rest of the agent uses to talk to the drain.
#[derive(Debug, Clone, Default)]
pub(crate) struct DrainHandle {
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

/// A finished request: the batch, the answer, the round trip (compression included), and when
/// it was launched.
type Flight = (Batch, Answer, Duration, Instant);

/// The backoff, escalated once per round of failures. Requests in flight together fail
/// together (an outage, a burst of 429s): counting each of their failures would take the
/// backoff from its first step to `max_backoff` in one round (32 requests in flight: 500 ms *
/// 2^31), so a short blip would stop delivery for minutes. A failure of a request launched
/// before the last counted failure is part of that round: it waits with it, and only its
/// `Retry-After` (which always wins) can make the wait longer.
#[derive(Debug)]
struct RoundBackoff {
    backoff: Backoff,
    counted: Option<Instant>,
}

impl RoundBackoff {
    fn new(s: &DrainSettings) -> RoundBackoff {
        RoundBackoff {
            backoff: Backoff::new(s.initial_backoff, s.max_backoff),
            counted: None,
        }
    }

    /// How long to wait after a transient failure of a request launched at `launched`.
    fn failed(&mut self, launched: Instant, retry_after: Option<Duration>) -> Duration {
        if self.counted.is_some_and(|t| launched <= t) {
            return retry_after.map_or(Duration::ZERO, |ra| ra.min(self.backoff.max()));
        }
        self.counted = Some(Instant::now());
        self.backoff.next_delay(retry_after)
    }
}

pub(crate) struct Drain {
    spool: Arc<Spool>,
    config: tokio::sync::watch::Receiver<DrainConfig>,
    stats: Arc<Stats>,
    handle: DrainHandle,
    /// File ids whose events are all delivered, for `after_ingest`.
    files_delivered: Option<tokio::sync::mpsc::UnboundedSender<u64>>,
}

impl Drain {
    pub(crate) fn new(
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
    pub(crate) async fn run(mut self, shutdown: CancellationToken) {
        crate::app::failpoint("drain");
        let mut current = self.config.borrow_and_update().clone();
        let mut s = current.settings.clone();
        let mut backoff = RoundBackoff::new(&s);
        let mut cursor: Option<u64> = None;
        let mut retry: VecDeque<Batch> = VecDeque::new();
        let mut flights: JoinSet<Flight> = JoinSet::new();
        let mut not_before = Instant::now();
        let mut budget = event_budget(s.max_batch_bytes);
        let mut limiter = Controller::new(s.concurrency);
        let mut bucket = TokenBucket::new(s.max_events_per_sec, Instant::now().into_std());

        loop {
            if shutdown.is_cancelled() {
                break;
            }
            self.handle
                .heartbeat_ms
                .store(now_ms(), std::sync::atomic::Ordering::Relaxed);
            if self.config.has_changed().unwrap_or(false) {
                let old_url = current.client.url().to_string();
                current = self.config.borrow_and_update().clone();
                let old = std::mem::replace(&mut s, current.settings.clone());
                budget = event_budget(s.max_batch_bytes);
                // A new setting or a new endpoint starts the controller over; anything else
                // keeps what it learnt of the link.
                if old.concurrency != s.concurrency || old_url != current.client.url() {
                    limiter = Controller::new(s.concurrency);
                }
                if old.max_events_per_sec != s.max_events_per_sec {
                    bucket = TokenBucket::new(s.max_events_per_sec, Instant::now().into_std());
                }
                // A new endpoint or key deserves a fresh try; new limits apply from here.
                backoff = RoundBackoff::new(&s);
                not_before = Instant::now();
                tracing::info!(endpoint = %current.client.url(), "delivery settings reloaded");
            }
            // Fill free slots: retries first (they are older), then new batches, but never
            // new ones while a retry waits, so an outage cannot grow memory.
            let mut partial_wait: Option<Instant> = None;
            let mut tokens_wait: Option<Instant> = None;
            // Batches no larger than the bucket: a full bucket always lets one go.
            let max_events = bucket
                .as_ref()
                .map_or(s.max_batch_events, |b| s.max_batch_events.min(b.capacity()));
            while flights.len() < limiter.limit() && Instant::now() >= not_before {
                if let Some(batch) = retry.pop_front() {
                    if let Err(at) = take_tokens(&mut bucket, batch.items.len()) {
                        tokens_wait = Some(at);
                        retry.push_front(batch);
                        break;
                    }
                    launch(&current.client, &mut flights, batch);
                    limiter.launched(flights.len());
                    continue;
                }
                let spool = self.spool.clone();
                let peeked =
                    match blocking(move || spool.queue().peek(cursor, max_events, budget)).await {
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
                if let Err(at) = take_tokens(&mut bucket, peeked.items.len()) {
                    // Claimed only once it can go: peeked again at the next turn.
                    tokens_wait = Some(at);
                    break;
                }
                cursor = peeked.items.last().map(|q| q.key);
                launch(
                    &current.client,
                    &mut flights,
                    Batch {
                        items: peeked.items,
                    },
                );
                limiter.launched(flights.len());
            }
            self.publish_limits(&limiter, flights.len(), s.max_events_per_sec);

            let wake_at = if Instant::now() < not_before {
                Some(not_before)
            } else {
                match (partial_wait, tokens_wait) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                }
            };
            // Go round at least every second, so the heartbeat proves the loop is alive.
            let heartbeat = Instant::now() + Duration::from_secs(1);
            let wake_at = Some(wake_at.map_or(heartbeat, |w| w.min(heartbeat)));
            tokio::select! {
                Some(done) = flights.join_next() => {
                    if let Ok((batch, answer, rtt, launched)) = done {
                        let load = decide(answer.status, batch.items.len()).outcome();
                        limiter.observe(rtt, load, Instant::now().into_std());
                        let flight = (batch, answer, launched);
                        self.settle(flight, &mut backoff, &mut retry, &mut not_before)
                            .await;
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
                Ok(Some(Ok((batch, answer, _, launched)))) => {
                    let mut ignore = VecDeque::new();
                    let flight = (batch, answer, launched);
                    self.settle(flight, &mut backoff, &mut ignore, &mut not_before)
                        .await;
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

    /// Applies the decision table to one finished request. The spool's side (the ack's fsync,
    /// dead-lettering) runs on a blocking thread, never on an async worker.
    async fn settle(
        &self,
        (batch, answer, launched): (Batch, Answer, Instant),
        backoff: &mut RoundBackoff,
        retry: &mut VecDeque<Batch>,
        not_before: &mut Instant,
    ) {
        let n = batch.items.len() as u64;
        match decide(answer.status, batch.items.len()) {
            Decision::Ack => {
                let spool = self.spool.clone();
                let (acked, batch) =
                    blocking(move || (spool.queue().ack(&batch.items), batch)).await;
                match acked {
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
                backoff.backoff.reset();
                let mut st = self.lock_status();
                if st.state != DeliveryState::Running {
                    tracing::info!(events = n, "delivery resumed");
                }
                st.state = DeliveryState::Running;
                st.current_backoff_ms = None;
                st.last_success_ms = Some(now_ms());
                tracing::debug!(events = n, "batch delivered");
            }
            Decision::DeadLetter => {
                tracing::warn!(detail = %answer.detail, "Segment rejected an event; dead-lettered");
                let (spool, detail, status) = (self.spool.clone(), answer.detail, answer.status);
                match blocking(move || spool.queue().dead_letter(&batch.items, &detail, status))
                    .await
                {
                    Ok(_) => Stats::add(&self.stats.dead_lettered, n),
                    Err(e) => {
                        tracing::error!(error = %e, "cannot dead-letter an event; it stays queued");
                    }
                }
            }
            Decision::Bisect => {
                // Both halves go to the front, in order, without a backoff.
                let mut items = batch.items;
                let second = items.split_off(items.len() / 2);
                retry.push_front(Batch { items: second });
                retry.push_front(Batch { items });
            }
            decision => {
                let (state, delay) = match decision {
                    Decision::AuthFailed => {
                        backoff.backoff.next_delay(None);
                        (DeliveryState::AuthFailed, backoff.backoff.max())
                    }
                    Decision::Rejected => {
                        backoff.backoff.next_delay(None);
                        (DeliveryState::Rejected, backoff.backoff.max())
                    }
                    _ => (
                        DeliveryState::BackingOff,
                        backoff.failed(launched, answer.retry_after),
                    ),
                };
                let now = Instant::now();
                if now + delay > *not_before {
                    *not_before = now + delay;
                }
                // The wait in force, which a failure of the same round may not have set.
                let delay = not_before.saturating_duration_since(now);
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

    /// The limit, the round trip and the rate ceiling, for `status` and the metrics.
    fn publish_limits(&self, limiter: &Controller, in_flight: usize, max_events_per_sec: u64) {
        let mut st = self.lock_status();
        st.concurrency_adaptive = matches!(limiter.mode(), Mode::Adaptive { .. });
        st.concurrency_limit = limiter.limit();
        st.max_concurrency = limiter.max();
        st.in_flight = in_flight;
        st.rtt_ms = limiter
            .rtt()
            .map(|d| (d.as_secs_f64() * 10_000.0).round() / 10.0);
        st.max_events_per_sec = max_events_per_sec;
    }

    fn lock_status(&self) -> std::sync::MutexGuard<'_, DrainStatus> {
        self.handle.status.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Sends one batch in its own task; the answer comes back through `flights`. The body is
/// encoded and gzipped inside the task, so the next batches are built while earlier requests
/// are in flight, on whichever worker thread is free.
fn launch(client: &Client, flights: &mut JoinSet<Flight>, batch: Batch) {
    let client = client.clone();
    let launched = Instant::now();
    flights.spawn(async move {
        // The round trip as the controller sees it: compression (about a millisecond for a
        // full batch) and the wait for a pooled connection included.
        let started = Instant::now();
        // sentAt is fresh on every attempt and never stored.
        let sent_at = rfc3339_millis(now_ms() as i64);
        let body = client.body(batch.items.iter().map(|q| q.json.as_ref()), &sent_at);
        let answer = client.send(body).await;
        (batch, answer, started.elapsed(), launched)
    });
}

/// Takes `n` events from the bucket, if there is one; else when they will be there.
fn take_tokens(bucket: &mut Option<TokenBucket>, n: usize) -> Result<(), Instant> {
    match bucket {
        Some(b) => b
            .try_take(n, Instant::now().into_std())
            .map_err(Instant::from_std),
        None => Ok(()),
    }
}

/// Runs `f` (spool reads, fsyncs) on tokio's blocking pool and waits for it, so the async
/// workers (HTTP, timers, the control socket) never stall on the disk. A panic in `f` goes on
/// in the caller, as if `f` had run there.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::task::spawn_blocking(f).await {
        Ok(v) => v,
        Err(e) => match e.try_into_panic() {
            Ok(panic) => std::panic::resume_unwind(panic),
            // Only when the runtime shuts down under us: nothing to go on with.
            Err(e) => panic!("spool work on the blocking pool was cancelled: {e}"),
        },
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_round_of_failures_escalates_the_backoff_once() {
        let s = DrainSettings {
            max_batch_bytes: 475_000,
            max_batch_events: 2500,
            flush_interval: Duration::from_secs(1),
            concurrency: Mode::Adaptive { max: 32 },
            max_events_per_sec: 0,
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(300),
        };
        let mut b = RoundBackoff::new(&s);
        let launched = Instant::now();
        // 32 requests in flight together, all refused: one step, not 32.
        for _ in 0..32 {
            assert!(b.failed(launched, None) <= Duration::from_millis(500));
        }
        assert_eq!(b.backoff.failures(), 1);
        // A Retry-After of the same round still counts, clamped to the maximum.
        assert_eq!(
            b.failed(launched, Some(Duration::from_secs(3))),
            Duration::from_secs(3)
        );
        assert_eq!(
            b.failed(launched, Some(Duration::from_secs(3600))),
            Duration::from_secs(300)
        );
        assert_eq!(b.backoff.failures(), 1);
        // The next round, launched after that failure, escalates once more.
        std::thread::sleep(Duration::from_millis(2));
        let next = Instant::now();
        for _ in 0..32 {
            assert!(b.failed(next, None) <= Duration::from_millis(1000));
        }
        assert_eq!(b.backoff.failures(), 2);
    }
}
