//! The catalog the mapping uses, kept up to date (SPEC sections 3 and 5).
//!
//! Three layers, merged into the [`Catalog`] published to the mapping:
//! 1. **API**: with a `[leanplum]` section, `getMessages` and `getAbTests` at start and every
//!    `refresh_interval_secs` (and at SIGHUP), plus a `getMessage` lookup for each message an
//!    export names that the catalog does not know yet. What the API said is cached in the spool
//!    (`meta/catalog_cache`), so a restart while Leanplum is unreachable maps as before; until
//!    the first fetch of a run succeeds, this layer's source is `cache`. A refresh adds and
//!    updates entries but drops none: a message Leanplum no longer lists may still be named by
//!    exports not read yet.
//! 2. **Files**: `catalog_dir/messages.json` and `abtests.json`, read at start, at SIGHUP, and
//!    whenever they change ([`files::watch`]). An id in both takes the file's entry: the
//!    operator's word outranks the API's. A rewrite that does not parse is refused: the last
//!    good files stay in use and the error shows in `status` until a good file replaces it.
//!
//! **Waiting on a lookup.** When the API is configured, the reader asks [`CatalogService::must_wait`]
//! before mapping a record that names an unknown message. The answer is "wait" until `getMessage`
//! answers: the file's offset stays before that record (events before it are committed), and the
//! ingest worker offers the file again when the catalog changes ([`CatalogService::generation`]).
//! Only when Leanplum says the message does not exist (HTTP 404 "Message not found.", or a
//! `success: false` saying so) does `unknown_message_channel` apply (parked, by default: see
//! [`parking`]); that answer is remembered until the next full refresh (at most
//! [`MISSING_TTL`]), then asked again. An A/B test the catalog does not
//! know (its Experiment Viewed would go without names) makes the record wait for the next full
//! refresh, asked for at once; a test that refresh does not list either is taken as unknown
//! for [`MISSING_TTL`] and its events go without names. Lookups run one at a time, at most
//! [`LOOKUPS_PER_SEC`] a second; a failed one is retried with backoff, per id. Errors are logged
//! when they first appear and when they change, not at every retry.

pub(crate) mod files;
pub(crate) mod parking;
mod refresh;

pub(crate) use files::{LoadedFiles, load_files};
pub(crate) use refresh::run;

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::clock::now_ms;
use crate::leanplum::Id;
use crate::leanplum::catalog::{AbTest, Catalog, Message};
use crate::mapping::{MappingOptions, MappingState, SharedMapping};
use crate::spool::Spool;

/// How long "Leanplum says this message does not exist" is believed before asking again.
pub(crate) const MISSING_TTL: Duration = Duration::from_secs(15 * 60);
/// The most `getMessage` calls a second.
pub(crate) const LOOKUPS_PER_SEC: u64 = 5;

/// Where an entry, or the API layer as a whole, came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Source {
    Files,
    Api,
    Cache,
}

impl Source {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Source::Files => "files",
            Source::Api => "api",
            Source::Cache => "cache",
        }
    }
}

/// What `getMessage` is being asked, or said.
#[derive(Debug, Clone)]
enum Lookup {
    Pending {
        since_ms: u64,
        /// Files whose reading waits on the answer.
        files: BTreeSet<String>,
        /// This message's own: one id, one caller, nothing to spread (no jitter).
        backoff: crate::backoff::Backoff,
        next_at: Instant,
        error: Option<String>,
    },
    /// Leanplum said there is no such message.
    Missing { until: Instant },
}

/// Everything the service knows; behind one mutex, held briefly.
#[derive(Debug, Default)]
struct State {
    files: Catalog,
    api: Catalog,
    /// `api` overlaid with `files`: what the mapping uses, rebuilt at each publish.
    merged: Arc<Catalog>,
    /// `None` until the API (or its cache) gave something.
    api_source: Option<Source>,
    /// When the API layer was fetched (for a cache: when it was fetched originally).
    fetched_ms: Option<u64>,
    last_attempt_ms: Option<u64>,
    last_error: Option<String>,
    /// The last lookup error logged (each distinct one is logged once).
    last_lookup_error: Option<String>,
    lookups: HashMap<Id, Lookup>,
    /// A/B tests waited for: `Pending` until a full refresh, then `Missing` if not listed.
    abtest_waits: HashMap<Id, Lookup>,
    refresh_requested: bool,
    opts: MappingOptions,
    /// Why the catalog files on disk are not in use (the last good ones are), until good
    /// files replace them.
    files_error: Option<String>,
    /// Moved by each SIGHUP reload, so a watcher's read that raced with one is dropped.
    files_epoch: u64,
}

/// The catalog as the agent keeps it. One per agent, shared by the reader, the refresh task
/// and the control socket.
pub(crate) struct CatalogService {
    state: Mutex<State>,
    mapping: SharedMapping,
    /// Bumped after each publish of a new catalog, so readers waiting on it look again.
    generation: AtomicU64,
    wake: tokio::sync::Notify,
    spool: Option<Arc<Spool>>,
    api_enabled: bool,
}

/// The cache's JSON: the API layer in the flat form, and when it was fetched.
#[derive(Serialize, Deserialize)]
struct Cached {
    fetched_ms: u64,
    messages: Box<serde_json::value::RawValue>,
    abtests: Box<serde_json::value::RawValue>,
}

impl CatalogService {
    /// Builds the service and publishes its first catalog into `mapping`. With the API enabled
    /// and a spool, the cached API layer is loaded first.
    pub(crate) fn new(
        files: Catalog,
        opts: MappingOptions,
        spool: Option<Arc<Spool>>,
        api_enabled: bool,
        mapping: SharedMapping,
    ) -> Arc<CatalogService> {
        let mut state = State {
            files,
            opts,
            ..State::default()
        };
        if api_enabled && let Some(spool) = &spool {
            load_cache(spool, &mut state);
        }
        let service = Arc::new(CatalogService {
            state: Mutex::new(state),
            mapping,
            generation: AtomicU64::new(0),
            wake: tokio::sync::Notify::new(),
            spool,
            api_enabled,
        });
        service.publish(&mut service.lock());
        service
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Merges the layers into the mapping's catalog, then tells waiting readers (in that order:
    /// a reader that saw the old generation is sure to see the change).
    fn publish(&self, st: &mut State) {
        st.merged = Arc::new(st.api.overlaid(&st.files));
        *self.mapping.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(MappingState {
            catalog: st.merged.clone(),
            opts: st.opts,
        });
        self.wake_readers();
    }

    /// Moves the generation, so readers waiting on the catalog look again.
    fn wake_readers(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
    }

    /// Changes with each new catalog.
    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    pub(crate) fn api_enabled(&self) -> bool {
        self.api_enabled
    }

    /// SIGHUP: new catalog files and mapping options; also refetches from the API.
    pub(crate) fn reload(&self, files: Catalog, opts: MappingOptions) {
        let mut st = self.lock();
        st.files = files;
        st.opts = opts;
        st.refresh_requested = true;
        st.files_epoch += 1;
        clear_files_error(&mut st);
        self.publish(&mut st);
        drop(st);
        self.wake.notify_one();
    }

    /// Moves at each SIGHUP reload; see [`CatalogService::reload_files`].
    pub(crate) fn files_epoch(&self) -> u64 {
        self.lock().files_epoch
    }

    /// The catalog files changed and both parse: they become the files layer (mapping options
    /// and the API layer stay as they are). Readers waiting on the catalog look again.
    /// `epoch` is [`CatalogService::files_epoch`] from before the files were read: when a
    /// SIGHUP reload came in between, it read them too, later, and this read is dropped.
    /// A rewrite with the very same entries changes nothing (a debug line).
    pub(crate) fn reload_files(&self, files: Catalog, epoch: u64) {
        let mut st = self.lock();
        if st.files_epoch != epoch {
            return;
        }
        if st.files == files && st.files_error.is_none() {
            tracing::debug!("catalog files rewritten with the same entries");
            return;
        }
        tracing::info!(
            messages = files.len_messages(),
            abtests = files.len_abtests(),
            "catalog files reloaded"
        );
        st.files = files;
        clear_files_error(&mut st);
        self.publish(&mut st);
    }

    /// The catalog files changed but cannot be used (`error` names the file and why, quoting
    /// none of it): the last good files stay in use, and `status` shows the error until good
    /// files replace them. Logged when it first appears and when it changes, not at each
    /// check. `epoch`: as for [`CatalogService::reload_files`].
    pub(crate) fn refuse_files(&self, error: String, epoch: u64) {
        let mut st = self.lock();
        if st.files_epoch != epoch {
            return;
        }
        if st.files_error.as_ref() != Some(&error) {
            tracing::error!(
                error = %error,
                "catalog file refused; the last good catalog stays in use"
            );
            st.files_error = Some(error);
        }
    }

    /// Whether a record naming `messages` and `abtests` (ids the reader's catalog does not know)
    /// must wait. Starts a lookup for each message not asked yet, and a refresh for an A/B test;
    /// `file` is named in status as waiting.
    pub(crate) fn must_wait(&self, messages: &[Id], abtests: &[Id], file: &str) -> bool {
        if !self.api_enabled || (messages.is_empty() && abtests.is_empty()) {
            return false;
        }
        let now = Instant::now();
        let mut guard = self.lock();
        let st = &mut *guard;
        let mut wait = false;
        let mut asked = false;
        for &id in messages {
            let known = st.merged.message(id).is_some();
            let (w, a) = wait_on(&mut st.lookups, id, known, file, now);
            if a {
                tracing::info!(message_id = %id, path = %file, "message not in the catalog; asking Leanplum before reading on");
            }
            wait |= w;
            asked |= a;
        }
        for &id in abtests {
            let known = st.merged.abtest(id).is_some();
            let (w, a) = wait_on(&mut st.abtest_waits, id, known, file, now);
            if a {
                tracing::info!(abtest_id = %id, path = %file, "A/B test not in the catalog; refreshing from Leanplum before reading on");
                st.refresh_requested = true;
            }
            wait |= w;
            asked |= a;
        }
        drop(guard);
        if asked {
            self.wake.notify_one();
        }
        wait
    }

    /// What `status` shows.
    pub(crate) fn status(&self) -> CatalogStatus {
        status_of(&self.lock(), self.api_enabled)
    }

    /// What `catalog show [ID]` prints.
    pub(crate) fn show(&self, id: Option<Id>) -> Shown {
        show_of(&self.lock(), self.api_enabled, id)
    }

    /// Writes the API layer to the spool's cache (called off the async threads).
    fn persist(&self) {
        let Some(spool) = &self.spool else { return };
        let bytes = {
            let st = self.lock();
            let (messages, abtests) = st.api.to_flat_json();
            let raw = |json: Vec<u8>| {
                serde_json::value::RawValue::from_string(
                    String::from_utf8(json).expect("serde_json writes UTF-8"),
                )
                .expect("serde_json writes JSON")
            };
            serde_json::to_vec(&Cached {
                fetched_ms: st.fetched_ms.unwrap_or_else(now_ms),
                messages: raw(messages),
                abtests: raw(abtests),
            })
            .expect("plain data serializes")
        };
        if let Err(e) = spool.meta().store_catalog_cache(&bytes) {
            tracing::warn!(error = %e, "cannot cache the Leanplum catalog in the spool");
        }
    }
}

/// Good files are in use again: the error goes, with a line saying so.
fn clear_files_error(st: &mut State) {
    if let Some(previous) = st.files_error.take() {
        tracing::info!(
            previous_error = %previous,
            "catalog files are good again; their error is cleared"
        );
    }
}

/// One id's part of [`CatalogService::must_wait`]: (must wait, newly asked).
fn wait_on(
    waits: &mut HashMap<Id, Lookup>,
    id: Id,
    known: bool,
    file: &str,
    now: Instant,
) -> (bool, bool) {
    if known {
        // Known since the reader took its catalog: it looks again with the new one.
        return (true, false);
    }
    match waits.get_mut(&id) {
        Some(Lookup::Missing { until }) if *until > now => (false, false),
        Some(Lookup::Pending { files, .. }) => {
            files.insert(file.to_owned());
            (true, false)
        }
        _ => {
            waits.insert(
                id,
                Lookup::Pending {
                    since_ms: now_ms(),
                    files: BTreeSet::from([file.to_owned()]),
                    backoff: refresh::lookup_backoff(),
                    next_at: now,
                    error: None,
                },
            );
            (true, true)
        }
    }
}

/// Loads the cached API layer into `st`; a damaged cache is logged and ignored.
fn load_cache(spool: &Spool, st: &mut State) {
    let bytes = match spool.meta().catalog_cache() {
        Ok(Some(b)) => b,
        Ok(None) => return,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the cached Leanplum catalog");
            return;
        }
    };
    match parse_cache(&bytes) {
        Ok((catalog, fetched_ms)) => {
            tracing::info!(
                messages = catalog.len_messages(),
                abtests = catalog.len_abtests(),
                "Leanplum catalog loaded from the cache"
            );
            st.api = catalog;
            st.api_source = Some(Source::Cache);
            st.fetched_ms = Some(fetched_ms);
        }
        Err(e) => tracing::warn!(error = %e, "cached Leanplum catalog unreadable; ignored"),
    }
}

fn parse_cache(bytes: &[u8]) -> Result<(Catalog, u64), String> {
    let cached: Cached = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    let messages = Catalog::parse_messages(cached.messages.get().as_bytes())?;
    let abtests = Catalog::parse_abtests(cached.abtests.get().as_bytes())?;
    Ok((Catalog::from_parts(messages, abtests), cached.fetched_ms))
}

/// The catalog as `catalog show` sees it with no agent running: the files, and the spool's
/// cache when the API is configured.
pub(crate) fn offline_show(
    files: Catalog,
    spool: Option<&Spool>,
    api_enabled: bool,
    id: Option<Id>,
) -> Shown {
    let mut st = State {
        files,
        ..State::default()
    };
    if let Some(spool) = spool {
        load_cache(spool, &mut st);
    }
    st.merged = Arc::new(st.api.overlaid(&st.files));
    show_of(&st, api_enabled, id)
}

/// The catalog part of `status`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct CatalogStatus {
    /// The layers in use: `files`, `files+api`, `files+cache`.
    pub source: String,
    pub messages: u64,
    pub abtests: u64,
    /// When the API layer was fetched from Leanplum (RFC 3339), and how long ago.
    pub fetched_at: Option<String>,
    pub age_secs: Option<u64>,
    /// The last attempt to refresh from the API.
    pub last_refresh: Option<String>,
    /// The last refresh or lookup error; cleared by a successful refresh.
    pub last_error: Option<String>,
    /// Messages being looked up, with the files that wait on them.
    pub waiting: Vec<WaitingLookup>,
    /// Why the catalog files on disk were refused (a file that does not parse, naming it):
    /// the last good ones are in use. Cleared when good files replace them.
    #[serde(default)]
    pub files_error: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct WaitingLookup {
    /// `message` (looked up with `getMessage`) or `abtest` (waiting for `getAbTests`).
    pub kind: String,
    pub id: String,
    pub since: String,
    pub files: Vec<String>,
    /// Why it has no answer yet: the last error, or "asking Leanplum".
    pub reason: String,
}

fn rfc3339(ms: u64) -> String {
    crate::event::rfc3339_millis(i64::try_from(ms).unwrap_or(i64::MAX))
}

fn status_of(st: &State, api_enabled: bool) -> CatalogStatus {
    let source = match (api_enabled, st.api_source) {
        (true, Some(s)) => format!("files+{}", s.as_str()),
        (true, None) => "files (API not reached yet)".to_owned(),
        (false, _) => "files".to_owned(),
    };
    let pending = |kind: &'static str, waits: &HashMap<Id, Lookup>, default: &str| {
        waits
            .iter()
            .filter_map(|(id, l)| match l {
                Lookup::Pending {
                    since_ms,
                    files,
                    error,
                    ..
                } => Some(WaitingLookup {
                    kind: kind.to_owned(),
                    id: id.to_string(),
                    since: rfc3339(*since_ms),
                    files: files.iter().cloned().collect(),
                    reason: error.clone().unwrap_or_else(|| default.to_owned()),
                }),
                Lookup::Missing { .. } => None,
            })
            .collect::<Vec<_>>()
    };
    let refresh_reason = match &st.last_error {
        Some(e) => e.clone(),
        None => "waiting for Leanplum's A/B tests (getAbTests)".to_owned(),
    };
    let mut waiting = pending("message", &st.lookups, "asking Leanplum (getMessage)");
    waiting.extend(pending("abtest", &st.abtest_waits, &refresh_reason));
    waiting.sort_by(|a, b| (&a.kind, &a.id).cmp(&(&b.kind, &b.id)));
    CatalogStatus {
        source,
        messages: st.merged.len_messages() as u64,
        abtests: st.merged.len_abtests() as u64,
        fetched_at: st.fetched_ms.map(rfc3339),
        age_secs: st.fetched_ms.map(|f| now_ms().saturating_sub(f) / 1000),
        last_refresh: st.last_attempt_ms.map(rfc3339),
        last_error: st.last_error.clone(),
        waiting,
        files_error: st.files_error.clone(),
    }
}

/// What `catalog show [ID]` answers, and `catalog show --json` prints.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct Shown {
    pub status: CatalogStatus,
    /// Every entry, or those with the id asked for.
    pub entries: Vec<ShownEntry>,
    /// For an id asked for and not in the catalog: whether Leanplum is being asked about it, or
    /// said it does not exist.
    pub lookup: Option<String>,
}

/// One entry of `catalog show`; ids are strings (they pass 2^53).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub(crate) enum ShownEntry {
    Message {
        id: String,
        /// `email`, `push` or `in-app`.
        channel: String,
        name: Option<String>,
        subject: Option<String>,
        campaign_id: Option<String>,
        campaign_name: Option<String>,
        /// `files`, `api` or `cache`.
        source: String,
    },
    Abtest {
        id: String,
        name: Option<String>,
        /// By id.
        variants: Vec<ShownVariant>,
        source: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ShownVariant {
    pub id: String,
    pub name: Option<String>,
}

fn message_entry(m: &Message, source: Source) -> ShownEntry {
    ShownEntry::Message {
        id: m.id.to_string(),
        channel: m.channel.as_str().to_owned(),
        name: m.name.as_deref().map(str::to_owned),
        subject: m.subject.as_deref().map(str::to_owned),
        campaign_id: m.campaign_id.map(|c| c.to_string()),
        campaign_name: m.campaign_name.as_deref().map(str::to_owned),
        source: source.as_str().to_owned(),
    }
}

fn abtest_entry(t: &AbTest, source: Source) -> ShownEntry {
    let mut variants: Vec<(Id, Option<String>)> = t
        .variants
        .iter()
        .map(|(k, v)| (*k, v.as_deref().map(str::to_owned)))
        .collect();
    variants.sort_by_key(|(k, _)| *k);
    ShownEntry::Abtest {
        id: t.id.to_string(),
        name: t.name.as_deref().map(str::to_owned),
        variants: variants
            .into_iter()
            .map(|(id, name)| ShownVariant {
                id: id.to_string(),
                name,
            })
            .collect(),
        source: source.as_str().to_owned(),
    }
}

/// Every entry, or those with `id`.
fn show_of(st: &State, api_enabled: bool, id: Option<Id>) -> Shown {
    let api_source = st.api_source.unwrap_or(Source::Api);
    let mut entries = Vec::new();
    let merged = &st.merged;
    let source = |in_files: bool| if in_files { Source::Files } else { api_source };
    let message_source = |mid: Id| source(st.files.message(mid).is_some());
    let abtest_source = |tid: Id| source(st.files.abtest(tid).is_some());
    match id {
        Some(id) => {
            if let Some(m) = merged.message(id) {
                entries.push(message_entry(m, message_source(id)));
            }
            if let Some(t) = merged.abtest(id) {
                entries.push(abtest_entry(t, abtest_source(id)));
            }
        }
        None => {
            entries.extend(
                merged
                    .messages()
                    .into_iter()
                    .map(|m| message_entry(m, message_source(m.id))),
            );
            entries.extend(
                merged
                    .abtests()
                    .into_iter()
                    .map(|t| abtest_entry(t, abtest_source(t.id))),
            );
        }
    }
    let lookup = id.and_then(|id| st.lookups.get(&id)).map(|l| match l {
        Lookup::Missing { .. } => "Leanplum says this message does not exist".to_owned(),
        Lookup::Pending { error, .. } => match error {
            Some(e) => format!("being looked up; last error: {e}"),
            None => "being looked up".to_owned(),
        },
    });
    Shown {
        status: status_of(st, api_enabled),
        entries,
        lookup,
    }
}

/// `catalog show` for people; `id` is the one asked for, if any.
pub(crate) fn render_show(shown: &Shown, id: Option<&str>) -> String {
    let mut out = String::new();
    let status = &shown.status;
    out.push_str(&format!(
        "catalog: {} messages, {} A/B tests; source {}",
        status.messages, status.abtests, status.source
    ));
    if let (Some(at), Some(age)) = (&status.fetched_at, status.age_secs) {
        out.push_str(&format!("; fetched {at} ({age} s ago)"));
    }
    out.push('\n');
    if let Some(e) = &status.files_error {
        out.push_str(&format!(
            "catalog files refused: {e}; the last good catalog is in use\n"
        ));
    }
    if let Some(e) = &status.last_error {
        out.push_str(&format!("last error: {e}\n"));
    }
    for w in &status.waiting {
        out.push_str(&format!(
            "waiting: {} {} since {} ({}); files: {}\n",
            w.kind,
            w.id,
            w.since,
            w.reason,
            w.files.join(", ")
        ));
    }
    for e in &shown.entries {
        out.push_str(&render_entry(e));
    }
    if let Some(id) = id
        && shown.entries.is_empty()
    {
        out.push_str(&format!(
            "{id}: neither a message nor an A/B test in the catalog"
        ));
        match &shown.lookup {
            Some(l) => out.push_str(&format!(" ({l})\n")),
            None => out.push_str(" (its events map with mapping.unknown_message_channel)\n"),
        }
    }
    out
}

fn render_entry(e: &ShownEntry) -> String {
    let quoted = |v: &Option<String>| {
        v.as_ref()
            .map(|v| format!("{v:?}"))
            .unwrap_or_else(|| "-".into())
    };
    match e {
        ShownEntry::Message {
            id,
            channel,
            name,
            subject,
            campaign_id,
            campaign_name,
            source,
        } => {
            let campaign = match campaign_id {
                Some(c) => format!(" campaign {c} {}", quoted(campaign_name)),
                None => String::new(),
            };
            format!(
                "message {id} [{source}] {channel} {}: subject {}{campaign}\n",
                quoted(name),
                quoted(subject),
            )
        }
        ShownEntry::Abtest {
            id,
            name,
            variants,
            source,
        } => {
            let variants: Vec<String> = variants
                .iter()
                .map(|v| format!("{} {}", v.id, quoted(&v.name)))
                .collect();
            format!(
                "abtest {id} [{source}] {}: variants {}\n",
                quoted(name),
                variants.join(", ")
            )
        }
    }
}

/// The optional id of `catalog show`.
pub(crate) fn parse_id(word: Option<&str>) -> Result<Option<Id>, String> {
    match word {
        None => Ok(None),
        Some(w) => w
            .parse::<u64>()
            .map(|v| Some(Id(v)))
            .map_err(|_| format!("{w:?} is not a message or A/B test id (an integer)")),
    }
}

#[cfg(test)]
mod tests;
