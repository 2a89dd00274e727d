//! The task that talks to Leanplum: full refreshes on a timer, lookups on demand.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::{CatalogService, LOOKUPS_PER_SEC, Lookup, MISSING_TTL, Source, State};
use crate::backoff::{Backoff, Jitter};
use crate::clock::now_ms;
use crate::leanplum::Id;
use crate::leanplum::api::{ApiError, LeanplumApi};
use crate::leanplum::catalog::{Catalog, Message};

/// Backoff of a failed refresh: from this, doubling, up to the refresh interval (at most).
const REFRESH_RETRY_INITIAL: Duration = Duration::from_secs(5);
const REFRESH_RETRY_MAX: Duration = Duration::from_secs(300);
/// Backoff of a failed lookup, per message.
const LOOKUP_RETRY_INITIAL: Duration = Duration::from_secs(1);
const LOOKUP_RETRY_MAX: Duration = Duration::from_secs(60);

/// The backoff of the lookups of one message (doubling, without jitter).
pub(super) fn lookup_backoff() -> Backoff {
    Backoff::with_jitter(LOOKUP_RETRY_INITIAL, LOOKUP_RETRY_MAX, Jitter::None)
}

/// Runs until `stop`: a refresh at once, then every `interval`; lookups as the reader asks.
pub(crate) async fn run(
    service: Arc<CatalogService>,
    api: LeanplumApi,
    interval: Duration,
    stop: CancellationToken,
) {
    let mut backoff = Backoff::new(REFRESH_RETRY_INITIAL, REFRESH_RETRY_MAX.min(interval));
    let mut next_refresh = Instant::now();
    let spacing = Duration::from_millis(1000 / LOOKUPS_PER_SEC);
    loop {
        if stop.is_cancelled() {
            return;
        }
        if std::mem::take(&mut service.lock().refresh_requested) {
            next_refresh = Instant::now();
        }
        if Instant::now() >= next_refresh {
            let wait = tokio::select! {
                _ = stop.cancelled() => return,
                r = refresh(&service, &api) => match r {
                    Ok(()) => {
                        backoff.reset();
                        interval
                    }
                    Err(()) => backoff.next_delay(None).max(Duration::from_secs(1)),
                },
            };
            next_refresh = Instant::now() + wait;
        }
        while let Some(id) = service.next_due_lookup() {
            tokio::select! {
                _ = stop.cancelled() => return,
                r = api.message(id) => service.lookup_answered(id, r).await,
            }
            tokio::time::sleep(spacing).await;
        }
        let until = service
            .next_lookup()
            .map_or(next_refresh, |(at, _)| at.min(next_refresh));
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = service.wake.notified() => {}
            _ = tokio::time::sleep_until(until.into()) => {}
        }
    }
}

/// One full refresh; errors are recorded (and logged when new).
pub(super) async fn refresh(service: &Arc<CatalogService>, api: &LeanplumApi) -> Result<(), ()> {
    service.lock().last_attempt_ms = Some(now_ms());
    let fetched = async { Ok::<_, ApiError>((api.messages().await?, api.abtests().await?)) }.await;
    match fetched {
        Ok((messages, abtests)) => {
            let count = (messages.len(), abtests.len());
            let recovered = {
                let mut st = service.lock();
                let recovered = st.last_error.take();
                // Messages found by lookups stay unless the fresh list has them.
                let mut api_layer = Catalog::from_parts(messages, abtests);
                for m in st.api.messages() {
                    if api_layer.message(m.id).is_none() {
                        api_layer.insert_message(m.clone());
                    }
                }
                st.api = api_layer;
                st.api_source = Some(Source::Api);
                st.fetched_ms = Some(now_ms());
                resolve_known(&mut st);
                service.publish(&mut st);
                recovered
            };
            persist(service).await;
            if let Some(e) = recovered {
                tracing::info!(previous_error = %e, "Leanplum reachable again");
            }
            tracing::info!(
                messages = count.0,
                abtests = count.1,
                "catalog fetched from Leanplum"
            );
            Ok(())
        }
        Err(e) => {
            let text = e.to_string();
            let mut st = service.lock();
            if st.last_error.as_deref() != Some(text.as_str()) {
                let cached = match st.api_source {
                    Some(_) => "mapping goes on with the catalog already known",
                    None => "mapping goes on with the catalog files alone",
                };
                tracing::warn!(error = %text, "cannot fetch the catalog from Leanplum; {cached}; retrying with backoff");
            }
            st.last_error = Some(text);
            Err(())
        }
    }
}

/// Drops the pending lookups the API layer now answers, and asks the others again now: the
/// API just answered, so their backoff is out of date. A/B tests waited for and still not
/// listed are taken as unknown for a while.
fn resolve_known(st: &mut State) {
    let State {
        api,
        lookups,
        abtest_waits,
        ..
    } = st;
    let now = Instant::now();
    // "Does not exist" holds until this refresh: a message the refresh does not list is asked
    // about again when an export names it next.
    lookups.retain(|_, l| !matches!(l, Lookup::Missing { .. }));
    let live = |l: &Lookup| !matches!(l, Lookup::Missing { until } if *until <= now);
    abtest_waits.retain(|_, l| live(l));
    abtest_waits
        .retain(|id, l| !(matches!(l, Lookup::Pending { .. }) && api.abtest(*id).is_some()));
    for (id, l) in abtest_waits.iter_mut() {
        if matches!(l, Lookup::Pending { .. }) {
            tracing::warn!(abtest_id = %id, "Leanplum does not list this A/B test; its Experiment Viewed events go without names");
            *l = Lookup::Missing {
                until: now + MISSING_TTL,
            };
        }
    }
    lookups.retain(|id, l| !(matches!(l, Lookup::Pending { .. }) && api.message(*id).is_some()));
    for l in lookups.values_mut() {
        if let Lookup::Pending { next_at, .. } = l {
            *next_at = now;
        }
    }
}

async fn persist(service: &Arc<CatalogService>) {
    let s = service.clone();
    let _ = tokio::task::spawn_blocking(move || s.persist()).await;
}

impl CatalogService {
    /// The pending lookup due first, if one is due now.
    pub(super) fn next_due_lookup(&self) -> Option<Id> {
        self.next_lookup()
            .filter(|(at, _)| *at <= Instant::now())
            .map(|(_, id)| id)
    }

    /// The pending lookup due first, and when.
    fn next_lookup(&self) -> Option<(Instant, Id)> {
        let st = self.lock();
        st.lookups
            .iter()
            .filter_map(|(id, l)| match l {
                Lookup::Pending { next_at, .. } => Some((*next_at, *id)),
                Lookup::Missing { .. } => None,
            })
            .min()
    }

    pub(super) async fn lookup_answered(
        self: &Arc<Self>,
        id: Id,
        answer: Result<Option<Message>, ApiError>,
    ) {
        match answer {
            Ok(Some(message)) => {
                tracing::info!(message_id = %id, channel = message.channel.as_str(), "message found in Leanplum");
                {
                    let mut st = self.lock();
                    st.last_lookup_error = None;
                    st.lookups.remove(&id);
                    st.api.insert_message(message);
                    if st.api_source.is_none() {
                        st.api_source = Some(Source::Api);
                    }
                    self.publish(&mut st);
                }
                persist(self).await;
            }
            Ok(None) => {
                tracing::warn!(message_id = %id, "Leanplum says this message does not exist; its events map with mapping.unknown_message_channel");
                let mut st = self.lock();
                st.last_lookup_error = None;
                st.lookups.insert(
                    id,
                    Lookup::Missing {
                        until: Instant::now() + MISSING_TTL,
                    },
                );
                // The catalog is unchanged; the readers waiting on this id go on without it.
                self.wake_readers();
            }
            Err(e) => {
                let text = e.to_string();
                let mut st = self.lock();
                // Once per distinct error, not once per message: an outage fails them all.
                if st.last_lookup_error.as_deref() != Some(text.as_str()) {
                    tracing::warn!(message_id = %id, error = %text, "cannot look the message up in Leanplum; reading its file waits; retrying with backoff");
                    st.last_lookup_error = Some(text.clone());
                }
                if let Some(Lookup::Pending {
                    backoff,
                    next_at,
                    error,
                    ..
                }) = st.lookups.get_mut(&id)
                {
                    *next_at = Instant::now() + backoff.next_delay(None);
                    *error = Some(text.clone());
                }
                st.last_error = Some(text);
            }
        }
    }
}
