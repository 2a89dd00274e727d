//! Leanplum records -> Segment `track` events (SPEC section 5): the action table, the email,
//! push and Experiment Viewed properties, identity, context and deterministic `messageId`s.
//! Pure: no I/O and no clock, so every rule is a table test below.

use crate::event::{Context, ContextField, EmailId, Properties, Text, Timestamp, TrackEvent};
use crate::leanplum::catalog::{Catalog, Message, MessageKind};
pub(crate) use crate::leanplum::parse_message_event;
use crate::leanplum::{Channel, Engagement, Event, Experiment, Id, LpTime, Session};
use serde::de::{self, IgnoredAny, MapAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::Arc;

/// `context.library`, as JSON: the crate's name (`leanplum-segment-agent`) and version.
const LIBRARY_JSON: &str = concat!(
    r#"{"name":""#,
    env!("CARGO_PKG_NAME"),
    r#"","version":""#,
    env!("CARGO_PKG_VERSION"),
    r#""}"#
);

/// Skip key for engagements of a message the catalog does not know, when
/// `unknown_message_channel = "skip"` and the action does not decide the channel itself.
pub(crate) const SKIP_UNKNOWN_MESSAGE: &str = "unknown message";
/// Skip key for every event of an in-app message: Segment has no spec for them.
pub(crate) const SKIP_IN_APP: &str = "in-app";
/// Skip key for an impression in a session without a start time to stamp it with.
pub(crate) const SKIP_EXPERIMENT_NO_TIME: &str = "Experiment Viewed (no session time)";

/// What to do with an engagement of a message the catalog does not know (`[mapping]
/// unknown_message_channel`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum UnknownChannel {
    /// Keep the record aside (the quarantine's `parked` kind) and map it again whenever the
    /// catalog changes: a message created after the catalog was written is not lost.
    #[default]
    Park,
    /// Count it as skipped: guessing wrong would put pushes into the email spec or vice versa.
    Skip,
    Email,
    Push,
}

impl UnknownChannel {
    fn channel(self) -> Option<Channel> {
        match self {
            UnknownChannel::Park | UnknownChannel::Skip => None,
            UnknownChannel::Email => Some(Channel::Email),
            UnknownChannel::Push => Some(Channel::Push),
        }
    }
}

/// What `email_subject` holds (`[mapping] email_subject`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum EmailSubject {
    /// The message name in Leanplum, as Leanplum's own Segment source defines it.
    #[default]
    Name,
    /// The catalog's subject where known, else the name.
    Subject,
}

impl EmailSubject {
    /// `email_subject` from what is known of the message: the preferred one, else the other.
    fn choose(self, name: Option<Text>, subject: Option<Text>) -> Option<Text> {
        match self {
            EmailSubject::Name => name.or(subject),
            EmailSubject::Subject => subject.or(name),
        }
    }
}

/// The `[mapping]` settings that change what a record becomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MappingOptions {
    pub unknown_message_channel: UnknownChannel,
    pub send_experiment_viewed: bool,
    pub email_subject: EmailSubject,
}

impl Default for MappingOptions {
    /// The config file's documented defaults.
    fn default() -> Self {
        MappingOptions {
            unknown_message_channel: UnknownChannel::Park,
            send_experiment_viewed: true,
            email_subject: EmailSubject::Name,
        }
    }
}

/// The catalog and options in force; replaced whole on reload (SIGHUP), read by the ingest at
/// the start of each file and by `dead-letter retry`.
#[derive(Debug, Clone, Default)]
pub(crate) struct MappingState {
    pub catalog: Arc<Catalog>,
    pub opts: MappingOptions,
}

/// A [`MappingState`] that can be swapped while readers hold the old one.
pub(crate) type SharedMapping = Arc<std::sync::RwLock<Arc<MappingState>>>;

/// The current mapping state.
pub(crate) fn current(shared: &SharedMapping) -> Arc<MappingState> {
    shared.read().unwrap_or_else(|e| e.into_inner()).clone()
}

/// What mapping produced: events to spool, and counters for status.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Output {
    pub events: Vec<TrackEvent>,
    /// Engagements not sent, by action name (`"Sent"`, `"Held Back"`, `"in-app"`, ...).
    pub skipped: BTreeMap<String, u64>,
    /// Non-message session events (`"Add To Cart"`): not ours to send, only counted.
    pub app_events: u64,
    /// With `unknown_message_channel = "park"`: the unknown messages whose engagements were
    /// held back (one entry per engagement); the caller parks the record (see
    /// [`parked_part`]).
    pub parked: Vec<Id>,
}

impl Output {
    fn skip(&mut self, key: &str) {
        match self.skipped.get_mut(key) {
            Some(n) => *n += 1,
            None => {
                self.skipped.insert(key.to_owned(), 1);
            }
        }
    }
}

/// A record that cannot become any event: it goes to the quarantine (SPEC section 8).
/// An engagement we merely do not send is not an error; it is counted in [`Output::skipped`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum MapError {
    /// Segment needs a `userId` or an `anonymousId`.
    #[error("record has neither a user id nor a device id")]
    NoIdentity,
    /// An engagement record whose `event` is empty.
    #[error("record has no event name")]
    NoEvent,
}

/// Maps one session: an Experiment Viewed per impressed experiment (if enabled), then one event
/// per mappable message event. On error `out` is left untouched.
pub(crate) fn map_session(
    s: &Session,
    catalog: &Catalog,
    opts: &MappingOptions,
    out: &mut Output,
) -> Result<(), MapError> {
    // The one way a session fails, checked before anything is added to `out`.
    let who = Identity::new(s.user_id.as_deref(), s.device_id.as_deref())?;
    let context = Arc::new(session_context(s));
    if opts.send_experiment_viewed {
        for x in &s.experiments {
            experiment_viewed(x, s.time, &who, &context, catalog, out);
        }
    }
    for state in &s.states {
        // App events were counted and dropped as the line was parsed.
        out.app_events += state.events.app_events;
        for event in &state.events.messages {
            session_event(event, &who, &context, catalog, opts, out);
        }
    }
    Ok(())
}

/// Maps one flat engagement record. Its `event` is a Segment event name (any letter case) or a
/// Leanplum action resolved with the record's channel, else the catalog's.
pub(crate) fn map_engagement(
    e: &Engagement,
    catalog: &Catalog,
    opts: &MappingOptions,
    out: &mut Output,
) -> Result<(), MapError> {
    let who = Identity::new(e.user_id.as_deref(), e.device_id.as_deref())?;
    let name = e.event.trim();
    if name.is_empty() {
        return Err(MapError::NoEvent);
    }
    let message = e.message_id.and_then(|id| catalog.message(id));
    // Parked unless the record itself names the message: a record that does was written
    // knowing what it sent, and needs nothing from the catalog.
    if opts.unknown_message_channel == UnknownChannel::Park
        && message.is_none()
        && e.message_name.is_none()
        && let Some(id) = e.message_id
        && (SegmentEvent::from_name(name).is_some() || Action::parse(Some(name)).is_ok())
    {
        out.parked.push(id);
        return Ok(());
    }
    let event = match SegmentEvent::from_name(name) {
        Some(event) => event,
        None => match resolve(Some(name), e.channel, message, opts.unknown_message_channel) {
            Ok(event) => event,
            Err(key) => {
                out.skip(&key);
                return Ok(());
            }
        },
    };
    let facts = engagement_facts(e, message, opts.email_subject);
    let message_id = match e.event_id {
        Some(id) => event_message_id(id),
        None => format!("lp-h-{}", e.canonical_hash),
    };
    out.events.push(track(
        &who,
        message_id,
        event.name(),
        e.timestamp_ms,
        properties(event, facts),
        Arc::new(engagement_context(e)),
    ));
    Ok(())
}

/// The messages a session names, in events that would be sent, that `catalog` does not know:
/// what the reader must look up before mapping it (see `crate::catalog`).
pub(crate) fn session_unknown_messages(s: &Session, catalog: &Catalog) -> Vec<Id> {
    let mut ids: Vec<Id> = s
        .states
        .iter()
        .flat_map(|state| &state.events.messages)
        .filter_map(|e| parse_message_event(&e.name))
        .filter(|(id, action)| Action::parse(*action).is_ok() && catalog.message(*id).is_none())
        .map(|(id, _)| id)
        .collect();
    ids.sort();
    ids.dedup();
    ids
}

/// The part of `record` to park when mapping it gave `parked` ids: an engagement record whole;
/// a session reduced to its identity, context and the events of those messages (its other
/// events are spooled already, its impressions too), so what is kept is small and mapping it
/// again later gives only what was held back, with the same `messageId`s, times and context.
pub(crate) fn parked_part(record: &crate::input::Record, parked: &[Id]) -> crate::input::Record {
    use crate::input::Record;
    match record {
        Record::Engagement(e) => Record::Engagement(e.clone()),
        Record::Session(s) => {
            let events = s
                .states
                .iter()
                .flat_map(|state| &state.events.messages)
                .filter(|e| {
                    parse_message_event(&e.name).is_some_and(|(id, _)| parked.contains(&id))
                })
                .cloned()
                .collect();
            Record::Session(Box::new(Session {
                user_id: s.user_id.clone(),
                device_id: s.device_id.clone(),
                time: s.time,
                locale: s.locale.clone(),
                timezone: s.timezone.clone(),
                country: s.country.clone(),
                region: s.region.clone(),
                city: s.city.clone(),
                app_version: s.app_version.clone(),
                system_name: s.system_name.clone(),
                system_version: s.system_version.clone(),
                device_model: s.device_model.clone(),
                experiments: Vec::new(),
                states: vec![crate::leanplum::State {
                    events: crate::leanplum::Events {
                        messages: events,
                        app_events: 0,
                    },
                }],
            }))
        }
    }
}

/// The A/B tests a session's impressions name that `catalog` does not know (their Experiment
/// Viewed events would go without names); none when Experiment Viewed is not sent.
pub(crate) fn session_unknown_abtests(
    s: &Session,
    catalog: &Catalog,
    opts: &MappingOptions,
) -> Vec<Id> {
    if !opts.send_experiment_viewed {
        return Vec::new();
    }
    let mut ids: Vec<Id> = s
        .experiments
        .iter()
        .filter(|x| x.impressed != Some(false) && catalog.abtest(x.id).is_none())
        .map(|x| x.id)
        .collect();
    ids.sort();
    ids.dedup();
    ids
}

/// The message an engagement record names, when it would be sent and `catalog` does not know
/// it. A record that names its channel still waits: the catalog gives its subject and campaign.
pub(crate) fn engagement_unknown_message(e: &Engagement, catalog: &Catalog) -> Option<Id> {
    let id = e.message_id?;
    let name = e.event.trim();
    let sent = SegmentEvent::from_name(name).is_some() || Action::parse(Some(name)).is_ok();
    (sent && catalog.message(id).is_none()).then_some(id)
}

/// The nine Segment events a message engagement can become.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SegmentEvent {
    EmailBounced,
    EmailDelivered,
    EmailLinkClicked,
    EmailMarkedAsSpam,
    EmailOpened,
    Unsubscribed,
    PushBounced,
    PushReceived,
    PushTapped,
}

impl SegmentEvent {
    const ALL: [SegmentEvent; 9] = [
        SegmentEvent::EmailBounced,
        SegmentEvent::EmailDelivered,
        SegmentEvent::EmailLinkClicked,
        SegmentEvent::EmailMarkedAsSpam,
        SegmentEvent::EmailOpened,
        SegmentEvent::Unsubscribed,
        SegmentEvent::PushBounced,
        SegmentEvent::PushReceived,
        SegmentEvent::PushTapped,
    ];

    /// The canonical spelling of Segment's Email and Push specs.
    fn name(self) -> &'static str {
        match self {
            SegmentEvent::EmailBounced => "Email Bounced",
            SegmentEvent::EmailDelivered => "Email Delivered",
            SegmentEvent::EmailLinkClicked => "Email Link Clicked",
            SegmentEvent::EmailMarkedAsSpam => "Email Marked as Spam",
            SegmentEvent::EmailOpened => "Email Opened",
            SegmentEvent::Unsubscribed => "Unsubscribed",
            SegmentEvent::PushBounced => "Push Notification Bounced",
            SegmentEvent::PushReceived => "Push Notification Received",
            SegmentEvent::PushTapped => "Push Notification Tapped",
        }
    }

    fn channel(self) -> Channel {
        match self {
            SegmentEvent::PushBounced | SegmentEvent::PushReceived | SegmentEvent::PushTapped => {
                Channel::Push
            }
            _ => Channel::Email,
        }
    }

    fn from_name(name: &str) -> Option<SegmentEvent> {
        let name = name.trim();
        SegmentEvent::ALL
            .into_iter()
            .find(|e| e.name().eq_ignore_ascii_case(name))
    }
}

/// The Leanplum actions that become Segment events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Bounce,
    Delivered,
    Click,
    MarkedAsSpam,
    Open,
    Unsubscribe,
    Received,
}

impl Action {
    /// The action of a message event (`None` = the send itself), or the key it is skipped
    /// under: the spec's spelling for the actions it names, else the action lowercased.
    fn parse(action: Option<&str>) -> Result<Action, String> {
        let Some(action) = action else {
            return Err("Send".to_owned());
        };
        let lower = action.trim().to_lowercase();
        match lower.as_str() {
            "bounce" => Ok(Action::Bounce),
            "delivered" => Ok(Action::Delivered),
            "click" => Ok(Action::Click),
            "marked as spam" | "spam" => Ok(Action::MarkedAsSpam),
            "open" => Ok(Action::Open),
            "unsubscribe" => Ok(Action::Unsubscribe),
            "received" => Ok(Action::Received),
            "send" => Err("Send".to_owned()),
            "sent" => Err("Sent".to_owned()),
            "held back" => Err("Held Back".to_owned()),
            "deferred" => Err("Deferred".to_owned()),
            "dropped" => Err("Dropped".to_owned()),
            _ => Err(lower),
        }
    }

    /// Actions that exist in one spec only decide the channel themselves, whatever the
    /// catalog says: a click can only be an email's.
    fn own_channel(self) -> Option<Channel> {
        match self {
            Action::Click | Action::MarkedAsSpam | Action::Unsubscribe => Some(Channel::Email),
            Action::Received => Some(Channel::Push),
            Action::Bounce | Action::Delivered | Action::Open => None,
        }
    }

    /// The action table of SPEC section 5.
    fn on(self, channel: Channel) -> SegmentEvent {
        match (self, self.own_channel().unwrap_or(channel)) {
            (Action::Bounce, Channel::Email) => SegmentEvent::EmailBounced,
            (Action::Bounce, Channel::Push) => SegmentEvent::PushBounced,
            (Action::Delivered, Channel::Email) => SegmentEvent::EmailDelivered,
            (Action::Delivered, Channel::Push) => SegmentEvent::PushReceived,
            (Action::Open, Channel::Email) => SegmentEvent::EmailOpened,
            (Action::Open, Channel::Push) => SegmentEvent::PushTapped,
            (Action::Click, _) => SegmentEvent::EmailLinkClicked,
            (Action::MarkedAsSpam, _) => SegmentEvent::EmailMarkedAsSpam,
            (Action::Unsubscribe, _) => SegmentEvent::Unsubscribed,
            (Action::Received, _) => SegmentEvent::PushReceived,
        }
    }
}

/// Decides what a Leanplum action on a message becomes, or the key it is skipped under.
/// `declared` is the channel a record states itself (engagement records); it outranks the
/// catalog. Channel precedence: the action's own, declared, the catalog's, then the option.
fn resolve(
    action: Option<&str>,
    declared: Option<Channel>,
    message: Option<&Message>,
    unknown: UnknownChannel,
) -> Result<SegmentEvent, String> {
    // Every event of an in-app message is skipped, whatever its action: the catalog says the
    // message belongs to neither spec, which outranks an action's own channel.
    if declared.is_none() && message.is_some_and(|m| m.channel == MessageKind::InApp) {
        return Err(SKIP_IN_APP.to_owned());
    }
    let action = Action::parse(action)?;
    let catalog_channel = message.and_then(|m| match m.channel {
        MessageKind::Email => Some(Channel::Email),
        MessageKind::Push => Some(Channel::Push),
        MessageKind::InApp => None,
    });
    action
        .own_channel()
        .or(declared)
        .or(catalog_channel)
        .or(unknown.channel())
        .map(|channel| action.on(channel))
        .ok_or_else(|| SKIP_UNKNOWN_MESSAGE.to_owned())
}

/// A session's message event (an app event is only counted).
fn session_event(
    event: &Event,
    who: &Identity,
    context: &Arc<Context>,
    catalog: &Catalog,
    opts: &MappingOptions,
    out: &mut Output,
) {
    let Some((message_id, action)) = parse_message_event(&event.name) else {
        out.app_events += 1;
        return;
    };
    let message = catalog.message(message_id);
    if message.is_none()
        && opts.unknown_message_channel == UnknownChannel::Park
        && Action::parse(action).is_ok()
    {
        out.parked.push(message_id);
        return;
    }
    match resolve(action, None, message, opts.unknown_message_channel) {
        Err(key) => out.skip(&key),
        Ok(segment) => {
            // Only email events read their parameters.
            let params = match segment.channel() {
                Channel::Email => event
                    .parameters
                    .as_ref()
                    .map(|raw| Params::parse(raw.get()))
                    .unwrap_or_default(),
                Channel::Push => Params::default(),
            };
            let facts = session_facts(message_id, message, params, opts.email_subject);
            out.events.push(track(
                who,
                event_message_id(event.event_id),
                segment.name(),
                event.time.millis(),
                properties(segment, facts),
                context.clone(),
            ));
        }
    }
}

/// One `experiments[]` entry of a session.
fn experiment_viewed(
    x: &Experiment,
    session_time: Option<LpTime>,
    who: &Identity,
    context: &Arc<Context>,
    catalog: &Catalog,
    out: &mut Output,
) {
    // Absent means impressed; `false` is an assignment the user never saw.
    if x.impressed == Some(false) {
        return;
    }
    let Some(time) = session_time else {
        out.skip(SKIP_EXPERIMENT_NO_TIME);
        return;
    };
    let test = catalog.abtest(x.id);
    let variant_name = test
        .and_then(|t| t.variants.get(&x.variant_id))
        .cloned()
        .flatten();
    let properties = Properties::Experiment {
        experiment_id: x.id,
        experiment_name: test.and_then(|t| t.name.clone()),
        variant_id: x.variant_id,
        variant_name,
    };
    let message_id = format!("lp-x-{}-{}-{}", x.id, x.variant_id, who.dedupe_hash());
    out.events.push(track(
        who,
        message_id,
        "Experiment Viewed",
        time.millis(),
        properties,
        context.clone(),
    ));
}

/// `lp-e-<eventId>`: a message event's `messageId`.
fn event_message_id(id: Id) -> String {
    let mut digits = itoa::Buffer::new();
    let digits = digits.format(id.0);
    let mut text = String::with_capacity(5 + digits.len());
    text.push_str("lp-e-");
    text.push_str(digits);
    text
}

/// First 16 hex digits of SHA-256: keeps user ids out of `messageId` while staying
/// deterministic per user.
fn short_sha256(text: &str) -> String {
    let digest = Sha256::digest(text.as_bytes());
    let mut hex = [0u8; 16];
    hex::encode_to_slice(&digest[..8], &mut hex).expect("8 bytes are 16 hex digits");
    String::from_utf8_lossy(&hex).into_owned()
}

/// Segment's identity fields for one record, shared by all its events.
struct Identity {
    user_id: Option<Text>,
    anonymous_id: Option<Text>,
    /// [`short_sha256`] of [`Identity::dedupe_key`], once per record.
    dedupe_hash: std::cell::OnceCell<String>,
}

impl Identity {
    /// Leanplum fills `userId` with the device id for users it never identified; sending that
    /// as a Segment `userId` would merge every anonymous device into a "user", so it is dropped.
    fn new(user_id: Option<&str>, device_id: Option<&str>) -> Result<Identity, MapError> {
        let device_id = device_id.filter(|d| !d.is_empty());
        let user_id = user_id.filter(|u| !u.is_empty() && Some(*u) != device_id);
        if user_id.is_none() && device_id.is_none() {
            return Err(MapError::NoIdentity);
        }
        Ok(Identity {
            user_id: user_id.map(Text::from),
            anonymous_id: device_id.map(Text::from),
            dedupe_hash: std::cell::OnceCell::new(),
        })
    }

    /// The part of an Experiment Viewed `messageId` that stands for who saw it.
    fn dedupe_hash(&self) -> &str {
        self.dedupe_hash
            .get_or_init(|| short_sha256(self.dedupe_key()))
    }

    /// The Segment userId if set, else the deviceId: who saw an experiment.
    fn dedupe_key(&self) -> &str {
        self.user_id
            .as_deref()
            .or(self.anonymous_id.as_deref())
            .unwrap_or_default()
    }
}

fn track(
    who: &Identity,
    message_id: String,
    event: &'static str,
    timestamp_ms: i64,
    properties: Properties,
    context: Arc<Context>,
) -> TrackEvent {
    TrackEvent {
        message_id,
        event,
        user_id: who.user_id.clone(),
        anonymous_id: who.anonymous_id.clone(),
        timestamp: Timestamp(timestamp_ms),
        properties,
        context,
    }
}

/// What is known about the message an engagement concerns, gathered from the event or record
/// and the catalog, before it is shaped into email or push properties.
#[derive(Debug, Default)]
struct MessageFacts {
    message_id: Option<Id>,
    email_id: Option<Text>,
    subject: Option<Text>,
    name: Option<Text>,
    campaign_id: Option<Id>,
    campaign_name: Option<Text>,
    link_url: Option<Text>,
    link_id: Option<i64>,
}

fn session_facts(
    message_id: Id,
    message: Option<&Message>,
    params: Params,
    email_subject: EmailSubject,
) -> MessageFacts {
    let name = message.and_then(|m| m.name.clone());
    let subject = message.and_then(|m| m.subject.clone());
    MessageFacts {
        message_id: Some(message_id),
        email_id: params.email_id,
        subject: email_subject.choose(name.clone(), subject),
        name,
        campaign_id: message.and_then(|m| m.campaign_id),
        campaign_name: message.and_then(|m| m.campaign_name.clone()),
        link_url: params.link_url,
        link_id: params.link_id,
    }
}

/// The record's own fields win over the catalog's: a postback knows what it sent.
/// A record's `email_subject` is the property itself, so it wins whatever
/// `mapping.email_subject` says.
fn engagement_facts(
    e: &Engagement,
    message: Option<&Message>,
    email_subject: EmailSubject,
) -> MessageFacts {
    let text = |s: &Option<String>| s.as_deref().filter(|s| !s.is_empty()).map(Text::from);
    let name = text(&e.message_name).or_else(|| message.and_then(|m| m.name.clone()));
    let subject = message.and_then(|m| m.subject.clone());
    MessageFacts {
        message_id: e.message_id,
        email_id: text(&e.email_id),
        subject: text(&e.email_subject).or_else(|| email_subject.choose(name.clone(), subject)),
        name,
        campaign_id: e
            .campaign_id
            .or_else(|| message.and_then(|m| m.campaign_id)),
        campaign_name: text(&e.campaign_name)
            .or_else(|| message.and_then(|m| m.campaign_name.clone())),
        link_url: text(&e.link_url),
        link_id: e.link_id,
    }
}

/// What an email event's `parameters` say: its own `email_id`, and the clicked link's URL and
/// index. The rest of the object is skipped without being kept.
#[derive(Debug, Default, PartialEq)]
struct Params {
    email_id: Option<Text>,
    link_url: Option<Text>,
    link_id: Option<i64>,
}

impl Params {
    /// From the raw `parameters` JSON. For each property, the first of its keys present as a
    /// usable value counts (`url` before `link_url`, `index` before `link_id`); when a key is
    /// given twice the last one counts, as in a JSON map. Anything but an object gives nothing.
    fn parse(raw: &str) -> Params {
        let Ok(found) = serde_json::from_str::<ParamValues>(raw) else {
            return Params::default();
        };
        let text = |keys: &[&Option<Value>]| {
            keys.iter().find_map(|v| match v.as_ref()? {
                Value::String(s) if !s.is_empty() => Some(Text::from(s.as_str())),
                Value::Number(n) => Some(Text::from(n.to_string())),
                _ => None,
            })
        };
        // An integer, a whole float or a string of digits (Leanplum writes the link index
        // either way).
        let int = |keys: &[&Option<Value>]| {
            keys.iter().find_map(|v| match v.as_ref()? {
                Value::Number(n) => n.as_i64().or_else(|| {
                    n.as_f64()
                        .filter(|f| f.fract() == 0.0 && f.abs() < 9.0e15)
                        .map(|f| f as i64)
                }),
                Value::String(s) => s.trim().parse::<i64>().ok(),
                _ => None,
            })
        };
        Params {
            email_id: text(&[&found.email_id]),
            link_url: text(&[&found.url, &found.link_url]),
            link_id: int(&[&found.index, &found.link_id]),
        }
    }
}

/// The values of the keys [`Params`] reads, from a parameters object.
#[derive(Default)]
struct ParamValues {
    email_id: Option<Value>,
    url: Option<Value>,
    link_url: Option<Value>,
    index: Option<Value>,
    link_id: Option<Value>,
}

impl<'de> Deserialize<'de> for ParamValues {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ParamValues;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<ParamValues, A::Error> {
                let mut found = ParamValues::default();
                while let Some(key) = map.next_key::<Cow<'de, str>>()? {
                    let slot = match &*key {
                        "email_id" => &mut found.email_id,
                        "url" => &mut found.url,
                        "link_url" => &mut found.link_url,
                        "index" => &mut found.index,
                        "link_id" => &mut found.link_id,
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                            continue;
                        }
                    };
                    *slot = Some(map.next_value()?);
                }
                Ok(found)
            }
        }
        d.deserialize_map(V)
    }
}

fn properties(event: SegmentEvent, facts: MessageFacts) -> Properties {
    match event.channel() {
        Channel::Email => email_properties(event, facts),
        Channel::Push => Properties::Push {
            message_id: facts.message_id,
            message_name: facts.name,
            campaign_id: facts.campaign_id,
            campaign_name: facts.campaign_name,
        },
    }
}

/// Segment's Email spec, as the Leanplum Segment source fills it.
fn email_properties(event: SegmentEvent, f: MessageFacts) -> Properties {
    let email_id = match (f.email_id, f.message_id) {
        (Some(text), _) => Some(EmailId::Param(text)),
        (None, Some(id)) => Some(EmailId::Message(id)),
        (None, None) => None,
    };
    Properties::Email {
        email_id,
        email_subject: f.subject,
        message_id: f.message_id,
        campaign_id: f.campaign_id,
        campaign_name: f.campaign_name,
        link: (event == SegmentEvent::EmailLinkClicked).then_some((f.link_url, f.link_id)),
    }
}

/// Session context: what the export knows about the device, app and place. Keys in sorted
/// order, as a JSON map writes them.
fn session_context(s: &Session) -> Context {
    Context::build(&[
        (
            "app",
            ContextField::Object(&[("version", s.app_version.as_deref())]),
        ),
        (
            "device",
            ContextField::Object(&[
                ("id", s.device_id.as_deref()),
                ("model", s.device_model.as_deref()),
            ]),
        ),
        ("library", ContextField::Raw(LIBRARY_JSON)),
        ("locale", ContextField::Text(s.locale.as_deref())),
        (
            "location",
            ContextField::Object(&[
                ("city", s.city.as_deref()),
                ("country", s.country.as_deref()),
                ("region", s.region.as_deref()),
            ]),
        ),
        (
            "os",
            ContextField::Object(&[
                ("name", s.system_name.as_deref()),
                ("version", s.system_version.as_deref()),
            ]),
        ),
        ("timezone", ContextField::Text(s.timezone.as_deref())),
    ])
}

fn engagement_context(e: &Engagement) -> Context {
    Context::build(&[
        (
            "device",
            ContextField::Object(&[("id", e.device_id.as_deref())]),
        ),
        ("library", ContextField::Raw(LIBRARY_JSON)),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::leanplum::catalog::AbTest;
    use serde_json::Map;
    use serde_json::json;
    use std::collections::{HashMap, HashSet};
    use std::path::Path;

    // Catalog ids above 2^53, so any f64 on the way would show.
    const EMAIL_FULL: u64 = 9_178_288_208_762_825_801; // subject and campaign
    const EMAIL_NAME_ONLY: u64 = 9_178_288_208_762_825_802; // no subject, no campaign
    const EMAIL_BARE: u64 = 9_178_288_208_762_825_803; // neither subject nor name
    const PUSH_FULL: u64 = 9_178_288_208_762_825_804; // name and campaign
    const PUSH_BARE: u64 = 9_178_288_208_762_825_805; // no name, no campaign
    const IN_APP: u64 = 9_178_288_208_762_825_806;
    const UNKNOWN: u64 = 9_178_288_208_762_825_899;
    const CAMPAIGN: u64 = 9_178_288_208_762_825_900;
    const EVENT_ID: u64 = 9_007_199_254_740_993; // 2^53 + 1
    const DEVICE: &str = "6102DD70-63E8-540E-9DD8-904F07489671";
    const DEVICE_HASH: &str = "6de15d86827a5570"; // first 16 hex of SHA-256(DEVICE)
    const USER_HASH: &str = "c581fa4bc78689eb"; // first 16 hex of SHA-256("ü-3")

    fn message(id: u64, channel: MessageKind) -> Message {
        Message {
            id: Id(id),
            channel,
            name: None,
            subject: None,
            campaign_id: None,
            campaign_name: None,
        }
    }

    fn catalog() -> Catalog {
        let messages = vec![
            Message {
                name: Some("Spring".into()),
                subject: Some("Hello".into()),
                campaign_id: Some(Id(CAMPAIGN)),
                campaign_name: Some("Launch".into()),
                ..message(EMAIL_FULL, MessageKind::Email)
            },
            Message {
                name: Some("Digest".into()),
                ..message(EMAIL_NAME_ONLY, MessageKind::Email)
            },
            message(EMAIL_BARE, MessageKind::Email),
            Message {
                name: Some("Ping".into()),
                campaign_id: Some(Id(CAMPAIGN)),
                campaign_name: Some("Launch".into()),
                ..message(PUSH_FULL, MessageKind::Push)
            },
            message(PUSH_BARE, MessageKind::Push),
            Message {
                name: Some("Popup".into()),
                ..message(IN_APP, MessageKind::InApp)
            },
        ];
        let abtests = vec![
            AbTest {
                id: Id(10),
                name: Some("Test ten".into()),
                variants: HashMap::from([(Id(11), Some("Variant A".into())), (Id(12), None)]),
            },
            AbTest {
                id: Id(20),
                name: None,
                variants: HashMap::new(),
            },
        ];
        Catalog::from_parts(messages, abtests)
    }

    fn opts(unknown: UnknownChannel) -> MappingOptions {
        MappingOptions {
            unknown_message_channel: unknown,
            ..MappingOptions::default()
        }
    }

    /// A session of one device with one event per `(name, parameters)`.
    fn session_with(events: &[(&str, Value)]) -> Session {
        let events: Vec<Value> = events
            .iter()
            .enumerate()
            .map(|(i, (name, params))| {
                json!({"eventId": EVENT_ID + i as u64, "name": name,
                       "time": 1793534929.779356, "value": 0.0, "parameters": params})
            })
            .collect();
        serde_json::from_value(json!({
            "deviceId": DEVICE, "time": "1.793534899612E+09",
            "states": [{"events": events}]
        }))
        .unwrap()
    }

    fn map_one(name: &str, params: Value, unknown: UnknownChannel) -> Output {
        let mut out = Output::default();
        map_session(
            &session_with(&[(name, params)]),
            &catalog(),
            &opts(unknown),
            &mut out,
        )
        .unwrap();
        out
    }

    /// The single event `name` maps to, or the single skip key.
    fn outcome(name: &str, unknown: UnknownChannel) -> Result<String, String> {
        let out = map_one(name, Value::Null, unknown);
        match (out.events.as_slice(), out.skipped.len()) {
            ([event], 0) => Ok(event.event.to_owned()),
            ([], 1) => {
                let (key, n) = out.skipped.iter().next().unwrap();
                assert_eq!(*n, 1);
                Err(key.clone())
            }
            _ => panic!("{name}: unexpected output {out:?}"),
        }
    }

    fn props(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn message_event_names_parse() {
        let table = [
            (".m123", Some((123, None))),
            (".m123 Open", Some((123, Some("Open")))),
            (".m123 Held Back", Some((123, Some("Held Back")))),
            (".m123  Open ", Some((123, Some("Open")))),
            (".m123 ", Some((123, None))),
            (".m18446744073709551615", Some((u64::MAX, None))),
            (".m18446744073709551616", None),
            (".m", None),
            (".m12x Open", None),
            ("Add To Cart", None),
        ];
        for (name, expected) in table {
            let got = parse_message_event(name).map(|(id, a)| (id.0, a));
            assert_eq!(got, expected, "{name}");
        }
    }

    #[test]
    fn action_table_for_email_messages() {
        let table = [
            ("Bounce", "Email Bounced"),
            ("Delivered", "Email Delivered"),
            ("Click", "Email Link Clicked"),
            ("Marked as spam", "Email Marked as Spam"),
            ("Spam", "Email Marked as Spam"),
            ("Open", "Email Opened"),
            ("Unsubscribe", "Unsubscribed"),
            // Received exists only for push: it decides the channel, whatever the catalog says.
            ("Received", "Push Notification Received"),
        ];
        for (action, event) in table {
            let name = format!(".m{EMAIL_FULL} {action}");
            assert_eq!(
                outcome(&name, UnknownChannel::Skip),
                Ok(event.into()),
                "{name}"
            );
        }
    }

    #[test]
    fn action_table_for_push_messages() {
        let table = [
            ("Bounce", "Push Notification Bounced"),
            ("Delivered", "Push Notification Received"),
            ("Open", "Push Notification Tapped"),
            ("Received", "Push Notification Received"),
            // Email-only actions decide the channel themselves.
            ("Click", "Email Link Clicked"),
            ("Marked as spam", "Email Marked as Spam"),
            ("Spam", "Email Marked as Spam"),
            ("Unsubscribe", "Unsubscribed"),
        ];
        for (action, event) in table {
            let name = format!(".m{PUSH_FULL} {action}");
            assert_eq!(
                outcome(&name, UnknownChannel::Skip),
                Ok(event.into()),
                "{name}"
            );
        }
    }

    #[test]
    fn actions_match_in_any_letter_case() {
        let table = [
            (EMAIL_FULL, "CLICK", "Email Link Clicked"),
            (EMAIL_FULL, "DELIVERED", "Email Delivered"),
            (EMAIL_FULL, "marked AS SPAM", "Email Marked as Spam"),
            (EMAIL_FULL, "bounce", "Email Bounced"),
            (EMAIL_FULL, "UnSubscribe", "Unsubscribed"),
            (PUSH_FULL, "oPEN", "Push Notification Tapped"),
            (PUSH_FULL, "RECEIVED", "Push Notification Received"),
        ];
        for (id, action, event) in table {
            let name = format!(".m{id} {action}");
            assert_eq!(
                outcome(&name, UnknownChannel::Skip),
                Ok(event.into()),
                "{name}"
            );
        }
    }

    #[test]
    fn skipped_actions_are_counted_by_name() {
        let table = [
            (format!(".m{EMAIL_FULL}"), "Send"),
            (format!(".m{EMAIL_FULL} Send"), "Send"),
            (format!(".m{EMAIL_FULL} SENT"), "Sent"),
            (format!(".m{PUSH_FULL} Held Back"), "Held Back"),
            (format!(".m{EMAIL_FULL} HELD BACK"), "Held Back"),
            (format!(".m{PUSH_FULL} deferred"), "Deferred"),
            (format!(".m{EMAIL_FULL} Dropped"), "Dropped"),
            (format!(".m{EMAIL_FULL} View Source"), "view source"),
            // Known-to-skip actions need no channel, so an unknown message still counts by name.
            (format!(".m{UNKNOWN} Sent"), "Sent"),
        ];
        for (name, key) in &table {
            assert_eq!(
                outcome(name, UnknownChannel::Skip),
                Err((*key).into()),
                "{name}"
            );
        }

        let events: Vec<(&str, Value)> = table
            .iter()
            .map(|(n, _)| (n.as_str(), Value::Null))
            .collect();
        let mut out = Output::default();
        map_session(
            &session_with(&events),
            &catalog(),
            &opts(UnknownChannel::Skip),
            &mut out,
        )
        .unwrap();
        let expected: BTreeMap<String, u64> = [
            ("Send", 2),
            ("Sent", 2),
            ("Held Back", 2),
            ("Deferred", 1),
            ("Dropped", 1),
            ("view source", 1),
        ]
        .into_iter()
        .map(|(k, n)| (k.to_owned(), n))
        .collect();
        assert_eq!(out.skipped, expected);
        assert!(out.events.is_empty());
    }

    #[test]
    fn unknown_messages_follow_the_option() {
        let open = format!(".m{UNKNOWN} Open");
        let table = [
            (UnknownChannel::Skip, Err(SKIP_UNKNOWN_MESSAGE.to_owned())),
            (UnknownChannel::Email, Ok("Email Opened".to_owned())),
            (
                UnknownChannel::Push,
                Ok("Push Notification Tapped".to_owned()),
            ),
        ];
        for (unknown, expected) in table {
            assert_eq!(outcome(&open, unknown), expected, "{unknown:?}");
        }
        // Single-channel actions need no catalog, even under "skip".
        let click = format!(".m{UNKNOWN} Click");
        assert_eq!(
            outcome(&click, UnknownChannel::Skip),
            Ok("Email Link Clicked".into())
        );
        let received = format!(".m{UNKNOWN} Received");
        assert_eq!(
            outcome(&received, UnknownChannel::Push),
            Ok("Push Notification Received".into())
        );
        assert_eq!(
            outcome(&received, UnknownChannel::Email),
            Ok("Push Notification Received".into())
        );
    }

    #[test]
    fn unknown_message_properties_carry_only_the_id() {
        let out = map_one(
            &format!(".m{UNKNOWN} Open"),
            Value::Null,
            UnknownChannel::Email,
        );
        let id = UNKNOWN.to_string();
        assert_eq!(
            out.events[0].properties.to_map(),
            props(json!({"email_id": id, "message_id": id}))
        );
        let out = map_one(
            &format!(".m{UNKNOWN} Open"),
            Value::Null,
            UnknownChannel::Push,
        );
        assert_eq!(
            out.events[0].properties.to_map(),
            props(json!({"campaign": {"message_id": id, "medium": "Push"}}))
        );
    }

    #[test]
    fn in_app_messages_are_skipped_whatever_the_action() {
        for action in ["Open", "Click", "Received", "Sent", "View"] {
            let name = format!(".m{IN_APP} {action}");
            assert_eq!(
                outcome(&name, UnknownChannel::Email),
                Err(SKIP_IN_APP.into()),
                "{name}"
            );
        }
        assert_eq!(
            outcome(&format!(".m{IN_APP}"), UnknownChannel::Skip),
            Err(SKIP_IN_APP.into())
        );
    }

    #[test]
    fn app_events_are_counted_not_sent() {
        let session = session_with(&[
            ("Add To Cart", json!({"sku": "A1"})),
            (".mobile Login", Value::Null),
            (&format!(".m{EMAIL_FULL} Open"), Value::Null),
        ]);
        let mut out = Output::default();
        map_session(&session, &catalog(), &opts(UnknownChannel::Skip), &mut out).unwrap();
        assert_eq!(out.app_events, 2);
        assert_eq!(out.events.len(), 1);
        assert!(out.skipped.is_empty());
    }

    #[test]
    fn email_properties_from_the_catalog() {
        let id = EMAIL_FULL.to_string();
        let out = map_one(
            &format!(".m{EMAIL_FULL} Open"),
            Value::Null,
            UnknownChannel::Skip,
        );
        // email_subject is the message name, as Leanplum's Segment source defines it.
        assert_eq!(
            out.events[0].properties.to_map(),
            props(json!({
                "email_id": id, "email_subject": "Spring", "message_id": id,
                "campaign_id": CAMPAIGN.to_string(), "campaign_name": "Launch"
            }))
        );
        // mapping.email_subject = "subject": the catalog's subject.
        let mut out = Output::default();
        let session = session_with(&[(&format!(".m{EMAIL_FULL} Open"), Value::Null)]);
        let subject_opts = MappingOptions {
            email_subject: EmailSubject::Subject,
            ..opts(UnknownChannel::Skip)
        };
        map_session(&session, &catalog(), &subject_opts, &mut out).unwrap();
        assert_eq!(
            out.events[0].properties.to_map()["email_subject"],
            json!("Hello")
        );
        // No subject: the message name in both modes; no campaign: no campaign keys.
        let mut out = Output::default();
        let session = session_with(&[(&format!(".m{EMAIL_NAME_ONLY} Bounce"), Value::Null)]);
        map_session(&session, &catalog(), &subject_opts, &mut out).unwrap();
        assert_eq!(
            out.events[0].properties.to_map()["email_subject"],
            json!("Digest")
        );
        let id = EMAIL_NAME_ONLY.to_string();
        let out = map_one(
            &format!(".m{EMAIL_NAME_ONLY} Bounce"),
            Value::Null,
            UnknownChannel::Skip,
        );
        assert_eq!(
            out.events[0].properties.to_map(),
            props(json!({"email_id": id, "email_subject": "Digest", "message_id": id}))
        );
        // Neither subject nor name: email_subject omitted.
        let id = EMAIL_BARE.to_string();
        let out = map_one(
            &format!(".m{EMAIL_BARE} Delivered"),
            Value::Null,
            UnknownChannel::Skip,
        );
        assert_eq!(
            out.events[0].properties.to_map(),
            props(json!({"email_id": id, "message_id": id}))
        );
    }

    #[test]
    fn parameters_read_as_a_json_map_reads_them() {
        let params = |raw: &str| {
            let p = Params::parse(raw);
            (
                p.email_id.as_deref().map(str::to_owned),
                p.link_url.as_deref().map(str::to_owned),
                p.link_id,
            )
        };
        let some = |s: &str| Some(s.to_owned());
        // The first key present with a usable value counts; a key given twice, its last value.
        assert_eq!(
            params(r#"{"url":"","link_url":"b","index":"x","link_id":2.0,"email_id":7}"#),
            (some("7"), some("b"), Some(2))
        );
        assert_eq!(
            params(r#"{"url":"a","url":"c","index":1,"index":" 5 ","other":{"url":"z"}}"#),
            (None, some("c"), Some(5))
        );
        assert_eq!(
            params(r#"{"email_id":1.5,"index":2.5}"#),
            (some("1.5"), None, None)
        );
        assert_eq!(
            params(r#"{"email_id":"e\"1","link_id":-4}"#),
            (some("e\"1"), None, Some(-4))
        );
        // Not an object, or a value that is not JSON: nothing.
        for raw in [
            r#"["url","a"]"#,
            "null",
            "7",
            r#"{"url":"a","index":1e999}"#,
        ] {
            assert_eq!(params(raw), (None, None, None), "{raw}");
        }
    }

    #[test]
    fn email_id_parameter_overrides_the_message_id() {
        let name = format!(".m{EMAIL_BARE} Open");
        for (param, expected) in [
            (json!("e-77"), "e-77"),
            (json!(9178288208762825810u64), "9178288208762825810"),
        ] {
            let out = map_one(&name, json!({"email_id": param}), UnknownChannel::Skip);
            assert_eq!(
                out.events[0].properties.to_map()["email_id"],
                json!(expected)
            );
            assert_eq!(
                out.events[0].properties.to_map()["message_id"],
                json!(EMAIL_BARE.to_string())
            );
        }
        // An empty parameter is no parameter.
        let out = map_one(&name, json!({"email_id": ""}), UnknownChannel::Skip);
        assert_eq!(
            out.events[0].properties.to_map()["email_id"],
            json!(EMAIL_BARE.to_string())
        );
    }

    #[test]
    fn link_properties_only_on_link_clicked() {
        let click = format!(".m{EMAIL_BARE} Click");
        let table = [
            (
                json!({"url": "https://x/a", "index": 0}),
                Some("https://x/a"),
                Some(0),
            ),
            (
                json!({"link_url": "https://x/b", "link_id": "3"}),
                Some("https://x/b"),
                Some(3),
            ),
            (
                json!({"url": "https://x/c", "index": 2.0}),
                Some("https://x/c"),
                Some(2),
            ),
            (json!({"index": " 4 "}), None, Some(4)),
            (
                json!({"url": "https://x/d", "index": "first"}),
                Some("https://x/d"),
                None,
            ),
            (json!({}), None, None),
            (Value::Null, None, None),
        ];
        for (params, url, index) in table {
            let out = map_one(&click, params.clone(), UnknownChannel::Skip);
            let p = &out.events[0].properties.to_map();
            assert_eq!(p.get("link_url"), url.map(Value::from).as_ref(), "{params}");
            assert_eq!(
                p.get("link_id"),
                index.map(Value::from).as_ref(),
                "{params}"
            );
            if let Some(link_id) = p.get("link_id") {
                assert!(link_id.is_i64(), "link_id must be an integer: {link_id}");
            }
        }
        let open = format!(".m{EMAIL_BARE} Open");
        let out = map_one(
            &open,
            json!({"url": "https://x/a", "index": 1}),
            UnknownChannel::Skip,
        );
        let p = &out.events[0].properties.to_map();
        assert!(!p.contains_key("link_url") && !p.contains_key("link_id"));
    }

    #[test]
    fn push_properties_from_the_catalog() {
        let out = map_one(
            &format!(".m{PUSH_FULL} Open"),
            Value::Null,
            UnknownChannel::Skip,
        );
        assert_eq!(
            out.events[0].properties.to_map(),
            props(json!({"campaign": {
                "message_id": PUSH_FULL.to_string(), "message_name": "Ping", "medium": "Push",
                "id": CAMPAIGN.to_string(), "name": "Launch"
            }}))
        );
        // Unknown name and no campaign: only what is known.
        let out = map_one(
            &format!(".m{PUSH_BARE} Bounce"),
            Value::Null,
            UnknownChannel::Skip,
        );
        assert_eq!(
            out.events[0].properties.to_map(),
            props(json!({"campaign": {"message_id": PUSH_BARE.to_string(), "medium": "Push"}}))
        );
    }

    #[test]
    fn envelope_of_a_session_event() {
        let out = map_one(
            &format!(".m{PUSH_FULL} Open"),
            Value::Null,
            UnknownChannel::Skip,
        );
        let e = &out.events[0];
        assert!(e.to_json().starts_with(br#"{"type":"track","#));
        assert_eq!(e.message_id, format!("lp-e-{EVENT_ID}"));
        assert_eq!(e.timestamp, "2026-11-01T12:08:49.779Z");
        assert_eq!(e.anonymous_id.as_deref(), Some(DEVICE));
        assert_eq!(e.user_id, None);
    }

    #[test]
    fn event_ids_and_times_as_strings() {
        let session: Session = serde_json::from_value(json!({
            "deviceId": "d",
            "states": [{"events": [{
                "eventId": "18446744073709551615", "name": format!(".m{EMAIL_FULL} Open"),
                "time": "1.793534899612E+09"
            }]}]
        }))
        .unwrap();
        let mut out = Output::default();
        map_session(&session, &catalog(), &opts(UnknownChannel::Skip), &mut out).unwrap();
        assert_eq!(out.events[0].message_id, "lp-e-18446744073709551615");
        assert_eq!(out.events[0].timestamp, "2026-11-01T12:08:19.612Z");
    }

    #[test]
    fn identity_rules() {
        let table = [
            (Some("u-1"), None, Some("u-1"), None),
            (None, Some("d-1"), None, Some("d-1")),
            (Some("d-1"), Some("d-1"), None, Some("d-1")),
            (Some("u-1"), Some("d-1"), Some("u-1"), Some("d-1")),
            (Some(""), Some("d-1"), None, Some("d-1")),
        ];
        for (user, device, want_user, want_anon) in table {
            let session = Session {
                user_id: user.map(str::to_owned),
                device_id: device.map(str::to_owned),
                ..session_with(&[(&format!(".m{EMAIL_FULL} Open"), Value::Null)])
            };
            let mut out = Output::default();
            map_session(&session, &catalog(), &opts(UnknownChannel::Skip), &mut out).unwrap();
            let e = &out.events[0];
            assert_eq!(e.user_id.as_deref(), want_user, "{user:?} {device:?}");
            assert_eq!(e.anonymous_id.as_deref(), want_anon, "{user:?} {device:?}");
        }
    }

    #[test]
    fn no_identity_is_an_error_and_leaves_output_untouched() {
        let mut out = Output {
            app_events: 7,
            skipped: BTreeMap::from([("Sent".to_owned(), 1)]),
            ..Output::default()
        };
        let before = out.clone();
        let session: Session = serde_json::from_value(json!({
            "time": 1793534899.612,
            "experiments": [{"id": 10, "variantId": 11}],
            "states": [{"events": [
                {"eventId": 1, "name": format!(".m{EMAIL_FULL} Open"), "time": 1793534900},
                {"eventId": 2, "name": "Login", "time": 1793534900},
                {"eventId": 3, "name": format!(".m{EMAIL_FULL} Sent"), "time": 1793534900}
            ]}]
        }))
        .unwrap();
        let result = map_session(&session, &catalog(), &opts(UnknownChannel::Skip), &mut out);
        assert_eq!(result, Err(MapError::NoIdentity));
        assert_eq!(out, before);

        let engagement = Engagement {
            event: "Email Opened".into(),
            ..Engagement::default()
        };
        let result = map_engagement(
            &engagement,
            &catalog(),
            &opts(UnknownChannel::Skip),
            &mut out,
        );
        assert_eq!(result, Err(MapError::NoIdentity));
        assert_eq!(out, before);
    }

    #[test]
    fn session_context_carries_what_is_known() {
        let session: Session = serde_json::from_value(json!({
            "deviceId": "d-1", "deviceModel": "iPhone15,2", "systemName": "iOS",
            "systemVersion": "17.1", "appVersion": "2.0.1", "locale": "en_US",
            "timezone": "America/Los_Angeles", "country": "US", "region": "CA",
            "city": "San Francisco",
            "states": [{"events": [
                {"eventId": 1, "name": format!(".m{EMAIL_FULL} Open"), "time": 1}
            ]}]
        }))
        .unwrap();
        let mut out = Output::default();
        map_session(&session, &catalog(), &opts(UnknownChannel::Skip), &mut out).unwrap();
        assert_eq!(
            out.events[0].context.to_map(),
            props(json!({
                "library": {"name": "leanplum-segment-agent", "version": env!("CARGO_PKG_VERSION")},
                "device": {"id": "d-1", "model": "iPhone15,2"},
                "os": {"name": "iOS", "version": "17.1"},
                "app": {"version": "2.0.1"},
                "locale": "en_US",
                "timezone": "America/Los_Angeles",
                "location": {"country": "US", "region": "CA", "city": "San Francisco"}
            }))
        );

        // Only a user id and a country: no empty objects.
        let session: Session = serde_json::from_value(json!({
            "userId": "u-1", "country": "FR",
            "states": [{"events": [
                {"eventId": 1, "name": format!(".m{EMAIL_FULL} Open"), "time": 1}
            ]}]
        }))
        .unwrap();
        let mut out = Output::default();
        map_session(&session, &catalog(), &opts(UnknownChannel::Skip), &mut out).unwrap();
        assert_eq!(
            out.events[0].context.to_map(),
            props(json!({
                "library": {"name": "leanplum-segment-agent", "version": env!("CARGO_PKG_VERSION")},
                "location": {"country": "FR"}
            }))
        );
    }

    fn experiments_session(user: Option<&str>, time: Value, experiments: Value) -> Session {
        serde_json::from_value(json!({
            "userId": user, "deviceId": DEVICE, "time": time, "experiments": experiments
        }))
        .unwrap()
    }

    fn map_experiments(session: &Session, send: bool) -> Output {
        let opts = MappingOptions {
            unknown_message_channel: UnknownChannel::Skip,
            send_experiment_viewed: send,
            email_subject: EmailSubject::Name,
        };
        let mut out = Output::default();
        map_session(session, &catalog(), &opts, &mut out).unwrap();
        out
    }

    #[test]
    fn experiment_viewed_only_for_impressed_entries() {
        let session = experiments_session(
            None,
            json!("1.793534899612E+09"),
            json!([
                {"id": 10, "variantId": 11, "impressed": true},
                {"id": 10, "variantId": 12, "impressed": false},
                {"id": "10", "variantId": "13"}
            ]),
        );
        let out = map_experiments(&session, true);
        let ids: Vec<&str> = out.events.iter().map(|e| e.message_id.as_str()).collect();
        assert_eq!(
            ids,
            vec![
                format!("lp-x-10-11-{DEVICE_HASH}"),
                format!("lp-x-10-13-{DEVICE_HASH}")
            ]
        );
        let e = &out.events[0];
        assert_eq!(e.event, "Experiment Viewed");
        assert_eq!(e.timestamp, "2026-11-01T12:08:19.612Z");
        assert_eq!(
            e.properties.to_map(),
            props(json!({"experiment_id": "10", "experiment_name": "Test ten",
                         "variant_id": "11", "variant_name": "Variant A"}))
        );
        assert_eq!(e.context.to_map()["device"], json!({"id": DEVICE}));
        assert!(map_experiments(&session, false).events.is_empty());
    }

    #[test]
    fn experiment_names_the_catalog_does_not_know_are_omitted() {
        let session = experiments_session(
            None,
            json!(1793534899.612),
            json!([
                {"id": 10, "variantId": 12},
                {"id": 10, "variantId": 99},
                {"id": 20, "variantId": 21},
                {"id": 9178288208762825810u64, "variantId": 9178288208762825811u64}
            ]),
        );
        let out = map_experiments(&session, true);
        let properties: Vec<Map<String, Value>> = out
            .events
            .into_iter()
            .map(|e| e.properties.to_map())
            .collect();
        assert_eq!(
            properties,
            vec![
                props(
                    json!({"experiment_id": "10", "experiment_name": "Test ten", "variant_id": "12"})
                ),
                props(
                    json!({"experiment_id": "10", "experiment_name": "Test ten", "variant_id": "99"})
                ),
                props(json!({"experiment_id": "20", "variant_id": "21"})),
                props(json!({"experiment_id": "9178288208762825810",
                             "variant_id": "9178288208762825811"})),
            ]
        );
    }

    #[test]
    fn experiment_message_id_hashes_the_segment_user_id_else_the_device_id() {
        let table = [
            (Some("ü-3"), USER_HASH),
            (Some(DEVICE), DEVICE_HASH), // userId equal to deviceId is no userId
            (None, DEVICE_HASH),
        ];
        for (user, hash) in table {
            let session = experiments_session(user, json!(1), json!([{"id": 10, "variantId": 11}]));
            let out = map_experiments(&session, true);
            assert_eq!(
                out.events[0].message_id,
                format!("lp-x-10-11-{hash}"),
                "{user:?}"
            );
        }
    }

    #[test]
    fn experiment_without_session_time_is_skipped_and_counted() {
        let session = experiments_session(
            None,
            Value::Null,
            json!([{"id": 10, "variantId": 11}, {"id": 20, "variantId": 21, "impressed": false}]),
        );
        let out = map_experiments(&session, true);
        assert!(out.events.is_empty());
        assert_eq!(out.skipped.get(SKIP_EXPERIMENT_NO_TIME), Some(&1));
    }

    fn engagement(event: &str) -> Engagement {
        Engagement {
            event: event.into(),
            user_id: Some("user-7".into()),
            device_id: Some("dev-7".into()),
            timestamp_ms: 1793610000123,
            event_id: Some(Id(EVENT_ID)),
            canonical_hash: "0123456789abcdef0123456789abcdef".into(),
            ..Engagement::default()
        }
    }

    fn map_engagement_one(e: &Engagement, unknown: UnknownChannel) -> Output {
        let mut out = Output::default();
        map_engagement(e, &catalog(), &opts(unknown), &mut out).unwrap();
        out
    }

    fn engagement_outcome(e: &Engagement, unknown: UnknownChannel) -> Result<String, String> {
        let out = map_engagement_one(e, unknown);
        match (out.events.as_slice(), out.skipped.len()) {
            ([event], 0) => Ok(event.event.to_owned()),
            ([], 1) => Err(out.skipped.keys().next().unwrap().clone()),
            _ => panic!("unexpected output {out:?}"),
        }
    }

    #[test]
    fn engagement_segment_names_in_any_case_become_canonical() {
        let table = [
            ("email opened", "Email Opened"),
            ("EMAIL LINK CLICKED", "Email Link Clicked"),
            ("Email Marked As Spam", "Email Marked as Spam"),
            ("email bounced", "Email Bounced"),
            ("Email Delivered", "Email Delivered"),
            ("unsubscribed", "Unsubscribed"),
            ("push notification bounced", "Push Notification Bounced"),
            ("Push Notification Received", "Push Notification Received"),
            (" push notification tapped ", "Push Notification Tapped"),
        ];
        for (event, canonical) in table {
            // Even for a message nobody knows, under "skip": the record names the spec.
            let e = Engagement {
                message_id: Some(Id(UNKNOWN)),
                ..engagement(event)
            };
            assert_eq!(
                engagement_outcome(&e, UnknownChannel::Skip),
                Ok(canonical.into())
            );
        }
    }

    #[test]
    fn engagement_actions_resolve_by_channel() {
        let with = |event: &str, message: Option<u64>, channel: Option<Channel>| Engagement {
            message_id: message.map(Id),
            channel,
            ..engagement(event)
        };
        let table = [
            // The record's channel.
            (with("Open", None, Some(Channel::Email)), "Email Opened"),
            (
                with("DELIVERED", None, Some(Channel::Push)),
                "Push Notification Received",
            ),
            // The record's channel outranks the catalog's.
            (
                with("Open", Some(PUSH_FULL), Some(Channel::Email)),
                "Email Opened",
            ),
            (
                with("Open", Some(IN_APP), Some(Channel::Push)),
                "Push Notification Tapped",
            ),
            // No channel on the record: the catalog's.
            (
                with("Bounce", Some(PUSH_FULL), None),
                "Push Notification Bounced",
            ),
            (with("bounce", Some(EMAIL_FULL), None), "Email Bounced"),
            // Single-channel actions decide, whatever the record says.
            (
                with("Click", None, Some(Channel::Push)),
                "Email Link Clicked",
            ),
            (
                with("Spam", Some(PUSH_FULL), Some(Channel::Push)),
                "Email Marked as Spam",
            ),
            (with("Unsubscribe", None, None), "Unsubscribed"),
            (
                with("Received", Some(EMAIL_FULL), Some(Channel::Email)),
                "Push Notification Received",
            ),
        ];
        for (e, expected) in table {
            assert_eq!(
                engagement_outcome(&e, UnknownChannel::Skip),
                Ok(expected.into()),
                "{e:?}"
            );
        }
    }

    #[test]
    fn engagement_skips_are_counted_like_session_ones() {
        let with = |event: &str, message: Option<u64>| Engagement {
            message_id: message.map(Id),
            ..engagement(event)
        };
        let table = [
            (with("Sent", Some(EMAIL_FULL)), UnknownChannel::Skip, "Sent"),
            (
                with("held back", Some(EMAIL_FULL)),
                UnknownChannel::Skip,
                "Held Back",
            ),
            (
                with("Whatever", Some(EMAIL_FULL)),
                UnknownChannel::Skip,
                "whatever",
            ),
            (
                with("Open", Some(UNKNOWN)),
                UnknownChannel::Skip,
                SKIP_UNKNOWN_MESSAGE,
            ),
            (
                with("Open", None),
                UnknownChannel::Skip,
                SKIP_UNKNOWN_MESSAGE,
            ),
            (
                with("Open", Some(IN_APP)),
                UnknownChannel::Email,
                SKIP_IN_APP,
            ),
        ];
        for (e, unknown, key) in table {
            assert_eq!(engagement_outcome(&e, unknown), Err(key.into()), "{e:?}");
        }
        let e = with("Open", Some(UNKNOWN));
        assert_eq!(
            engagement_outcome(&e, UnknownChannel::Push),
            Ok("Push Notification Tapped".into())
        );
    }

    #[test]
    fn engagement_record_fields_override_the_catalog() {
        let e = Engagement {
            message_id: Some(Id(EMAIL_FULL)),
            email_id: Some("e-1".into()),
            email_subject: Some("Record subject".into()),
            campaign_id: Some(Id(77)),
            campaign_name: Some("Record campaign".into()),
            link_url: Some("https://x/spring".into()),
            link_id: Some(2),
            ..engagement("Click")
        };
        let out = map_engagement_one(&e, UnknownChannel::Skip);
        assert_eq!(
            out.events[0].properties.to_map(),
            props(json!({
                "email_id": "e-1", "email_subject": "Record subject",
                "message_id": EMAIL_FULL.to_string(), "campaign_id": "77",
                "campaign_name": "Record campaign", "link_url": "https://x/spring", "link_id": 2
            }))
        );
        // Without record fields, the catalog fills in; link fields only on clicks.
        let e = Engagement {
            message_id: Some(Id(EMAIL_FULL)),
            link_url: Some("https://x/spring".into()),
            link_id: Some(2),
            ..engagement("Open")
        };
        let out = map_engagement_one(&e, UnknownChannel::Skip);
        let id = EMAIL_FULL.to_string();
        assert_eq!(
            out.events[0].properties.to_map(),
            props(json!({
                "email_id": id, "email_subject": "Spring", "message_id": id,
                "campaign_id": CAMPAIGN.to_string(), "campaign_name": "Launch"
            }))
        );
        // The record's message name stands in for a missing subject before the catalog's name.
        let e = Engagement {
            message_id: Some(Id(EMAIL_NAME_ONLY)),
            message_name: Some("Record name".into()),
            ..engagement("Open")
        };
        let out = map_engagement_one(&e, UnknownChannel::Skip);
        assert_eq!(
            out.events[0].properties.to_map()["email_subject"],
            json!("Record name")
        );
    }

    #[test]
    fn engagement_push_properties() {
        let e = Engagement {
            message_id: Some(Id(PUSH_FULL)),
            message_name: Some("Record push".into()),
            ..engagement("Open")
        };
        let out = map_engagement_one(&e, UnknownChannel::Skip);
        assert_eq!(
            out.events[0].properties.to_map(),
            props(json!({"campaign": {
                "message_id": PUSH_FULL.to_string(), "message_name": "Record push",
                "medium": "Push", "id": CAMPAIGN.to_string(), "name": "Launch"
            }}))
        );
    }

    #[test]
    fn engagement_email_event_without_message_id_still_emits() {
        let out = map_engagement_one(&engagement("Email Opened"), UnknownChannel::Skip);
        assert_eq!(out.events[0].event, "Email Opened");
        assert!(out.events[0].properties.to_map().is_empty());
        let e = Engagement {
            email_subject: Some("S".into()),
            ..engagement("Email Opened")
        };
        let out = map_engagement_one(&e, UnknownChannel::Skip);
        assert_eq!(
            out.events[0].properties.to_map(),
            props(json!({"email_subject": "S"}))
        );
    }

    #[test]
    fn engagement_envelope() {
        let e = Engagement {
            message_id: Some(Id(EMAIL_FULL)),
            ..engagement("Open")
        };
        let out = map_engagement_one(&e, UnknownChannel::Skip);
        let event = &out.events[0];
        assert!(event.to_json().starts_with(br#"{"type":"track","#));
        assert_eq!(event.message_id, format!("lp-e-{EVENT_ID}"));
        assert_eq!(event.timestamp, "2026-11-02T09:00:00.123Z");
        assert_eq!(event.user_id.as_deref(), Some("user-7"));
        assert_eq!(event.anonymous_id.as_deref(), Some("dev-7"));
        assert_eq!(
            event.context.to_map(),
            props(json!({
                "library": {"name": "leanplum-segment-agent", "version": env!("CARGO_PKG_VERSION")},
                "device": {"id": "dev-7"}
            }))
        );

        // Without an event id the canonical hash makes the messageId; without a device, no
        // device context.
        let e = Engagement {
            event_id: None,
            device_id: None,
            message_id: Some(Id(EMAIL_FULL)),
            ..engagement("Open")
        };
        let out = map_engagement_one(&e, UnknownChannel::Skip);
        let event = &out.events[0];
        assert_eq!(event.message_id, "lp-h-0123456789abcdef0123456789abcdef");
        assert_eq!(event.anonymous_id, None);
        assert!(!event.context.to_map().contains_key("device"));
    }

    #[test]
    fn engagement_identity_follows_the_session_rule() {
        let e = Engagement {
            user_id: Some("dev-7".into()),
            ..engagement("Email Opened")
        };
        let out = map_engagement_one(&e, UnknownChannel::Skip);
        assert_eq!(out.events[0].user_id, None);
        assert_eq!(out.events[0].anonymous_id.as_deref(), Some("dev-7"));
    }

    #[test]
    fn engagement_without_event_name_is_an_error() {
        let mut out = Output::default();
        let result = map_engagement(
            &engagement("  "),
            &catalog(),
            &opts(UnknownChannel::Skip),
            &mut out,
        );
        assert_eq!(result, Err(MapError::NoEvent));
        assert_eq!(out, Output::default());
    }

    /// The shipped example export against the reference output (`tests/data`).
    #[test]
    fn golden_example_export_matches_expected_events() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let export = std::fs::read_to_string(root.join(
            "examples/export/20261101/export-5629499534213120-06e7df8e-1eb1-c66e-79f7-4d60ac03031e-output-0",
        ))
        .unwrap();
        let catalog = Catalog::load_dir(&root.join("examples/catalog")).unwrap();
        let mut out = Output::default();
        for line in export.lines().filter(|l| !l.trim().is_empty()) {
            let session: Session = serde_json::from_str(line).unwrap();
            map_session(&session, &catalog, &MappingOptions::default(), &mut out).unwrap();
        }
        let mut actual: HashMap<String, TrackEvent> = HashMap::new();
        for event in out.events {
            actual.entry(event.message_id.clone()).or_insert(event);
        }

        let expected_text =
            std::fs::read_to_string(root.join("tests/data/expected-segment-events.jsonl")).unwrap();
        let expected: Vec<Value> = expected_text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let expected_ids: HashSet<&str> = expected
            .iter()
            .map(|e| e["messageId"].as_str().unwrap())
            .collect();
        let actual_ids: HashSet<&str> = actual.keys().map(String::as_str).collect();
        assert_eq!(actual_ids, expected_ids);

        let millis = |t: &str| {
            chrono::DateTime::parse_from_rfc3339(t)
                .unwrap()
                .timestamp_millis()
        };
        for want in &expected {
            let id = want["messageId"].as_str().unwrap();
            let got = &actual[id];
            assert_eq!(got.event, want["event"].as_str().unwrap(), "{id}");
            assert_eq!(got.user_id.as_deref(), want["userId"].as_str(), "{id}");
            assert_eq!(
                got.anonymous_id.as_deref(),
                want["anonymousId"].as_str(),
                "{id}"
            );
            assert_eq!(
                &Value::Object(got.properties.to_map()),
                &want["properties"],
                "{id}"
            );
            assert_eq!(
                got.timestamp.0,
                millis(want["timestamp"].as_str().unwrap()),
                "{id}"
            );
        }
    }
}
