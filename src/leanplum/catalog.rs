//! The message and A/B-test catalog: what a `.m<id>` message is (email, push or in-app), its
//! name, subject and campaign, and the names of A/B tests and their variants (SPEC section 5).
//!
//! Each catalog file comes in either of two forms, told apart by its first byte:
//! - flat, written by hand or by a script: a JSON array,
//!   `[{"id", "channel", "name", "subject", "campaign_id", "campaign_name"}]` and
//!   `[{"id", "name", "variants": [{"id", "name"}]}]`;
//! - Leanplum's `getMessages` / `getAbTests` API response saved verbatim: a JSON object,
//!   `{"response": [{"success": true, "messages": [{"id", "name", "messageType", "campaignID",
//!   "campaignName", "subject"}]}]}` and `{"response": [{"success": true, "abTests": [...]}]}`.
//!
//! Ids are read with [`Id`], never through an f64: they exceed 2^53.

use super::{Id, lenient_string};
use crate::event::Text;
use serde::{Deserialize, Deserializer};
use serde_json::Value;
use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};

/// What the agent knows about messages and A/B tests, by id.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Catalog {
    messages: HashMap<Id, Message>,
    abtests: HashMap<Id, AbTest>,
}

/// One Leanplum message (an email, a push notification, or an in-app message).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Message {
    pub id: Id,
    pub channel: MessageKind,
    pub name: Option<Text>,
    /// Email subject; an empty subject in the file counts as absent.
    pub subject: Option<Text>,
    pub campaign_id: Option<Id>,
    pub campaign_name: Option<Text>,
}

/// The kind of a message, which decides the Segment spec its engagements follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum MessageKind {
    Email,
    Push,
    /// Any Leanplum `messageType` other than "Email" and "Push Notification" (in-app messages,
    /// webhooks, newsfeed, ...): Segment has no spec for them, so their events are skipped.
    InApp,
}

/// One A/B test and the names of its variants.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct AbTest {
    pub id: Id,
    pub name: Option<Text>,
    pub variants: HashMap<Id, Option<Text>>,
}

/// A catalog file that exists but cannot be used.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CatalogError {
    /// The file is there but cannot be read: permissions, a directory in its place, or the
    /// catalog directory itself is a file.
    #[error("cannot read catalog file {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    /// The file is not a catalog in either form; `reason` carries serde_json's line and column.
    #[error("bad catalog file {}: {reason}", path.display())]
    Parse { path: PathBuf, reason: String },
}

impl Catalog {
    /// A catalog that knows nothing: every message is unknown, every name absent.
    pub(crate) fn empty() -> Catalog {
        Catalog::default()
    }

    /// Loads `dir/messages.json` and `dir/abtests.json`. A missing file, or a missing directory,
    /// is an empty part: a deployment may only care about messages, or only about A/B tests.
    pub(crate) fn load_dir(dir: &Path) -> Result<Catalog, CatalogError> {
        let messages = load_file(&dir.join("messages.json"), Catalog::parse_messages)?;
        let abtests = load_file(&dir.join("abtests.json"), Catalog::parse_abtests)?;
        Ok(Catalog::from_parts(messages, abtests))
    }

    /// Parses a `messages.json` in either form.
    pub(crate) fn parse_messages(json: &[u8]) -> Result<Vec<Message>, String> {
        let json = strip_bom(json);
        let entries = match form(json)? {
            Form::Flat => from_json::<Vec<MessageEntry>>(json)?,
            Form::Api => {
                let api = from_json::<ApiResponse<MessagesResult>>(json)?;
                api_lists(api.response, "messages")?
            }
        };
        entries
            .into_iter()
            .map(MessageEntry::into_message)
            .collect()
    }

    /// Parses an `abtests.json` in either form.
    pub(crate) fn parse_abtests(json: &[u8]) -> Result<Vec<AbTest>, String> {
        let json = strip_bom(json);
        let entries = match form(json)? {
            Form::Flat => from_json::<Vec<AbTestEntry>>(json)?,
            Form::Api => {
                let api = from_json::<ApiResponse<AbTestsResult>>(json)?;
                api_lists(api.response, "abTests")?
            }
        };
        Ok(entries.into_iter().map(AbTestEntry::into_abtest).collect())
    }

    /// Builds a catalog; a later entry with the same id replaces an earlier one.
    pub(crate) fn from_parts(messages: Vec<Message>, abtests: Vec<AbTest>) -> Catalog {
        Catalog {
            messages: messages.into_iter().map(|m| (m.id, m)).collect(),
            abtests: abtests.into_iter().map(|t| (t.id, t)).collect(),
        }
    }

    pub(crate) fn message(&self, id: Id) -> Option<&Message> {
        self.messages.get(&id)
    }

    pub(crate) fn abtest(&self, id: Id) -> Option<&AbTest> {
        self.abtests.get(&id)
    }

    pub(crate) fn len_messages(&self) -> usize {
        self.messages.len()
    }

    pub(crate) fn len_abtests(&self) -> usize {
        self.abtests.len()
    }

    /// Every message, in id order.
    pub(crate) fn messages(&self) -> Vec<&Message> {
        let mut all: Vec<&Message> = self.messages.values().collect();
        all.sort_by_key(|m| m.id);
        all
    }

    /// Every A/B test, in id order.
    pub(crate) fn abtests(&self) -> Vec<&AbTest> {
        let mut all: Vec<&AbTest> = self.abtests.values().collect();
        all.sort_by_key(|t| t.id);
        all
    }

    /// Adds or replaces one message.
    pub(crate) fn insert_message(&mut self, message: Message) {
        self.messages.insert(message.id, message);
    }

    /// `self` with every entry of `over` laid on top: an id in both takes `over`'s entry.
    pub(crate) fn overlaid(&self, over: &Catalog) -> Catalog {
        let mut merged = self.clone();
        merged
            .messages
            .extend(over.messages.iter().map(|(k, v)| (*k, v.clone())));
        merged
            .abtests
            .extend(over.abtests.iter().map(|(k, v)| (*k, v.clone())));
        merged
    }

    /// The catalog in the flat form, `{"messages": [...], "abtests": [...]}`, which
    /// [`Catalog::parse_messages`] and [`Catalog::parse_abtests`] read back (the cache format).
    pub(crate) fn to_flat_json(&self) -> (Vec<u8>, Vec<u8>) {
        let messages: Vec<FlatMessage> =
            self.messages().into_iter().map(FlatMessage::from).collect();
        let abtests: Vec<FlatAbTest> = self.abtests().into_iter().map(FlatAbTest::from).collect();
        (
            serde_json::to_vec(&messages).expect("plain data serializes"),
            serde_json::to_vec(&abtests).expect("plain data serializes"),
        )
    }

    /// Parses Leanplum's `getMessage` response for one id: `Ok(Some)` with the message,
    /// `Ok(None)` when Leanplum says there is no such message, `Err` for anything else (an error
    /// that may pass, or a response we cannot read).
    ///
    /// Leanplum documents no distinct error code for an unknown id. It answers `"success":
    /// false` with a message naming the problem, or a success without a message; both are read
    /// as "does not exist" only when the message says so (`not found`, `does not exist`, `no
    /// such`, `invalid`), so an outage or a quota error never turns into a wrong mapping.
    pub(crate) fn parse_message_lookup(json: &[u8]) -> Result<Option<Message>, LookupError> {
        let api = from_json::<ApiResponse<MessageLookupResult>>(strip_bom(json))
            .map_err(LookupError::Malformed)?;
        let Some(result) = api.response.into_iter().next() else {
            return Err(LookupError::Malformed("empty \"response\" list".to_owned()));
        };
        if result.success == Some(false) {
            let message = api_error_message(result.error.as_ref());
            return if says_not_found(&message) {
                Ok(None)
            } else {
                Err(LookupError::Leanplum(message))
            };
        }
        let entry = match (result.message, result.messages) {
            (Some(m), _) => Some(m),
            (None, Some(list)) => list.into_iter().next(),
            (None, None) => None,
        };
        match entry {
            Some(e) => e.into_message().map(Some).map_err(LookupError::Malformed),
            None => Ok(None),
        }
    }
}

/// Whether Leanplum's error message says the asked message does not exist (any letter case):
/// `Message not found.` is what the real API answers, with HTTP 404, for a deleted message.
pub(crate) fn says_not_found(message: &str) -> bool {
    let lower = message.to_lowercase();
    [
        "not found",
        "does not exist",
        "doesn't exist",
        "no such",
        "invalid message",
        "invalid id",
    ]
    .iter()
    .any(|p| lower.contains(p))
}

/// Why a `getMessage` answer could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum LookupError {
    /// Leanplum answered `"success": false` for a reason other than an unknown id.
    #[error("Leanplum says: {0}")]
    Leanplum(String),
    #[error("malformed response: {0}")]
    Malformed(String),
}

#[derive(Deserialize)]
struct MessageLookupResult {
    success: Option<bool>,
    error: Option<Value>,
    message: Option<MessageEntry>,
    messages: Option<Vec<MessageEntry>>,
}

/// A message in the flat form; ids as strings, so nothing reading the cache loses a digit.
#[derive(serde::Serialize)]
struct FlatMessage {
    id: String,
    channel: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    subject: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    campaign_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    campaign_name: Option<String>,
}

impl From<&Message> for FlatMessage {
    fn from(m: &Message) -> Self {
        FlatMessage {
            id: m.id.to_string(),
            channel: m.channel.as_str(),
            name: m.name.as_deref().map(str::to_owned),
            subject: m.subject.as_deref().map(str::to_owned),
            campaign_id: m.campaign_id.map(|c| c.to_string()),
            campaign_name: m.campaign_name.as_deref().map(str::to_owned),
        }
    }
}

#[derive(serde::Serialize)]
struct FlatAbTest {
    id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    variants: Vec<FlatVariant>,
}

#[derive(serde::Serialize)]
struct FlatVariant {
    id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<String>,
}

impl From<&AbTest> for FlatAbTest {
    fn from(t: &AbTest) -> Self {
        let mut variants: Vec<FlatVariant> = t
            .variants
            .iter()
            .map(|(id, name)| FlatVariant {
                id: id.to_string(),
                name: name.as_deref().map(str::to_owned),
            })
            .collect();
        variants.sort_by(|a, b| a.id.cmp(&b.id));
        FlatAbTest {
            id: t.id.to_string(),
            name: t.name.as_deref().map(str::to_owned),
            variants,
        }
    }
}

impl MessageKind {
    /// The flat form's `channel` value.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            MessageKind::Email => "email",
            MessageKind::Push => "push",
            MessageKind::InApp => "in-app",
        }
    }
}

/// Reads and parses one catalog file; a file that does not exist is an empty list.
fn load_file<T>(
    path: &Path,
    parse: fn(&[u8]) -> Result<Vec<T>, String>,
) -> Result<Vec<T>, CatalogError> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(CatalogError::Read {
                path: path.to_owned(),
                source,
            });
        }
    };
    parse(&bytes).map_err(|reason| CatalogError::Parse {
        path: path.to_owned(),
        reason,
    })
}

/// Which of the two file forms a catalog file is in.
enum Form {
    Flat,
    Api,
}

fn form(json: &[u8]) -> Result<Form, String> {
    match json.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'[') => Ok(Form::Flat),
        Some(b'{') => Ok(Form::Api),
        _ => Err(
            "expected a JSON array (flat form) or an object with \"response\" (Leanplum API form)"
                .to_owned(),
        ),
    }
}

/// Editors on some platforms save UTF-8 with a byte-order mark, which serde_json refuses.
fn strip_bom(json: &[u8]) -> &[u8] {
    json.strip_prefix(b"\xEF\xBB\xBF".as_slice())
        .unwrap_or(json)
}

fn from_json<'a, T: Deserialize<'a>>(json: &'a [u8]) -> Result<T, String> {
    serde_json::from_slice(json).map_err(|e| describe_json_error(&e))
}

/// The longest value from a catalog file (or an API response) that an error message quotes. A
/// catalog file may hold anything (an HTML error page a sync job saved, a blob): a longer value
/// is named by its length only, so errors, logs and `status` never carry a file's content.
const MAX_QUOTED_CHARS: usize = 40;

/// serde_json's message for `e`, quoting at most [`MAX_QUOTED_CHARS`] of any value. Syntax and
/// end-of-file errors quote nothing (serde_json says what it expected, and where); data errors
/// quote the offending value (`invalid type: string "..."`, `id "..." is not an integer`), which
/// is cut here when long.
fn describe_json_error(e: &serde_json::Error) -> String {
    let text = e.to_string();
    match e.classify() {
        serde_json::error::Category::Data => elide_long_quotes(&text),
        _ => text,
    }
}

/// `text` with each double-quoted part (Rust's `{:?}` escaping, so one line) longer than
/// [`MAX_QUOTED_CHARS`] replaced by `[N characters]`; an unclosed quote runs to the end.
fn elide_long_quotes(text: &str) -> String {
    let mut out = String::with_capacity(text.len().min(256));
    let mut rest = text;
    while let Some(open) = rest.find('"') {
        out.push_str(&rest[..open]);
        let body = &rest[open + 1..];
        let mut escaped = false;
        let close = body.char_indices().find_map(|(i, c)| {
            let end = !escaped && c == '"';
            escaped = !escaped && c == '\\';
            end.then_some(i)
        });
        let (quoted, after) = match close {
            Some(i) => (&body[..i], &body[i + 1..]),
            None => (body, ""),
        };
        let n = quoted.chars().count();
        if n <= MAX_QUOTED_CHARS {
            out.push('"');
            out.push_str(quoted);
            out.push('"');
        } else {
            out.push_str(&format!("[{n} characters]"));
        }
        rest = after;
    }
    out.push_str(rest);
    out
}

/// A value from a file for an error message: `{:?}`-quoted when short, else its length.
fn quote_value(value: &str) -> String {
    let n = value.chars().count();
    if n <= MAX_QUOTED_CHARS {
        format!("{value:?}")
    } else {
        format!("[{n} characters]")
    }
}

/// The longest error message from Leanplum an error quotes (as one line).
const MAX_API_MESSAGE_CHARS: usize = 200;

/// Leanplum's API envelope: `{"response": [ {...}, ... ]}`, one result per API action.
#[derive(Deserialize)]
struct ApiResponse<R> {
    response: Vec<R>,
}

#[derive(Deserialize)]
struct MessagesResult {
    success: Option<bool>,
    error: Option<Value>,
    messages: Option<Vec<MessageEntry>>,
}

#[derive(Deserialize)]
struct AbTestsResult {
    success: Option<bool>,
    error: Option<Value>,
    // Leanplum's own spelling is `abTests`; the others are what people write by hand.
    #[serde(rename = "abTests", alias = "abtests", alias = "experiments")]
    ab_tests: Option<Vec<AbTestEntry>>,
}

/// One result of an API response, reduced to what is checked: its status and its list.
struct ApiOutcome<T> {
    success: Option<bool>,
    error: Option<Value>,
    list: Option<Vec<T>>,
}

impl From<MessagesResult> for ApiOutcome<MessageEntry> {
    fn from(r: MessagesResult) -> Self {
        ApiOutcome {
            success: r.success,
            error: r.error,
            list: r.messages,
        }
    }
}

impl From<AbTestsResult> for ApiOutcome<AbTestEntry> {
    fn from(r: AbTestsResult) -> Self {
        ApiOutcome {
            success: r.success,
            error: r.error,
            list: r.ab_tests,
        }
    }
}

/// How a parse error for a response that reports `"success": false` begins; Leanplum's own
/// message follows (the API client tells it apart from a malformed response by this).
pub(crate) const API_FAILURE: &str = "Leanplum API response reports failure: ";

/// Collects the lists of every result in an API response. A failed call saved to disk is an
/// error quoting Leanplum's message, and so is a response without the expected list (for
/// instance a `getAbTests` response saved as `messages.json`).
fn api_lists<R: Into<ApiOutcome<T>>, T>(results: Vec<R>, list_key: &str) -> Result<Vec<T>, String> {
    if results.is_empty() {
        return Err("Leanplum API response has an empty \"response\" list".to_owned());
    }
    let mut all = Vec::new();
    for result in results {
        let outcome = result.into();
        if outcome.success == Some(false) {
            return Err(format!(
                "{API_FAILURE}{}",
                api_error_message(outcome.error.as_ref())
            ));
        }
        match outcome.list {
            Some(list) => all.extend(list),
            None => {
                return Err(format!(
                    "Leanplum API response has no {list_key:?} list (wrong file?)"
                ));
            }
        }
    }
    Ok(all)
}

/// Leanplum writes `"error": {"message": "..."}`; tolerate a bare string too.
fn api_error_message(error: Option<&Value>) -> String {
    let message = match error {
        Some(Value::String(s)) => Some(s.as_str()),
        Some(e) => e.get("message").and_then(Value::as_str),
        None => None,
    };
    let message = message.unwrap_or("no error message given");
    // One line, and not a page: a proxy's error text can end up here.
    let flat: String = message
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let flat = flat.trim();
    if flat.chars().count() <= MAX_API_MESSAGE_CHARS {
        flat.to_owned()
    } else {
        let mut cut: String = flat.chars().take(MAX_API_MESSAGE_CHARS).collect();
        cut.push('…');
        cut
    }
}

/// One message as either form writes it: the flat form's snake_case names and the API's
/// camelCase ones are aliases of the same fields.
#[derive(Deserialize)]
struct MessageEntry {
    id: Id,
    #[serde(default, deserialize_with = "lenient_string")]
    channel: Option<String>,
    #[serde(default, rename = "messageType", deserialize_with = "lenient_string")]
    message_type: Option<String>,
    #[serde(default, deserialize_with = "lenient_string")]
    name: Option<String>,
    #[serde(default, deserialize_with = "lenient_string")]
    subject: Option<String>,
    #[serde(
        default,
        alias = "campaignID",
        alias = "campaignId",
        deserialize_with = "optional_id"
    )]
    campaign_id: Option<Id>,
    #[serde(default, alias = "campaignName", deserialize_with = "lenient_string")]
    campaign_name: Option<String>,
}

impl MessageEntry {
    fn into_message(self) -> Result<Message, String> {
        let channel = message_kind(
            self.id,
            self.channel.as_deref(),
            self.message_type.as_deref(),
        )?;
        Ok(Message {
            id: self.id,
            channel,
            name: self.name.map(Text::from),
            subject: self.subject.map(Text::from),
            campaign_id: self.campaign_id,
            campaign_name: self.campaign_name.map(Text::from),
        })
    }
}

/// The flat form's `channel` is checked strictly, because a typo there would silently turn an
/// email into a skipped message; the API's `messageType` has many values we do not map, all
/// in-app for our purpose.
fn message_kind(
    id: Id,
    channel: Option<&str>,
    message_type: Option<&str>,
) -> Result<MessageKind, String> {
    if let Some(channel) = channel {
        return match channel.trim().to_ascii_lowercase().as_str() {
            "email" => Ok(MessageKind::Email),
            "push" => Ok(MessageKind::Push),
            "in-app" | "inapp" | "in_app" | "in app" => Ok(MessageKind::InApp),
            other => Err(format!(
                "message {id}: unknown channel {} (expected \"email\", \"push\" or \"in-app\")",
                quote_value(other)
            )),
        };
    }
    match message_type.map(str::trim) {
        Some(t) if t.eq_ignore_ascii_case("Email") => Ok(MessageKind::Email),
        Some(t) if t.eq_ignore_ascii_case("Push Notification") => Ok(MessageKind::Push),
        Some(_) => Ok(MessageKind::InApp),
        None => Err(format!(
            "message {id} has neither \"channel\" nor \"messageType\""
        )),
    }
}

#[derive(Deserialize)]
struct AbTestEntry {
    id: Id,
    #[serde(default, deserialize_with = "lenient_string")]
    name: Option<String>,
    #[serde(default)]
    variants: Vec<VariantEntry>,
}

#[derive(Deserialize)]
struct VariantEntry {
    id: Id,
    #[serde(default, deserialize_with = "lenient_string")]
    name: Option<String>,
}

impl AbTestEntry {
    fn into_abtest(self) -> AbTest {
        AbTest {
            id: self.id,
            name: self.name.map(Text::from),
            variants: self
                .variants
                .into_iter()
                .map(|v| (v.id, v.name.map(Text::from)))
                .collect(),
        }
    }
}

/// An optional id where `null` and `""` both mean "none" (a message outside any campaign).
/// serde_json's `Value` keeps integers as u64, so no digit is lost on the way.
fn optional_id<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Id>, D::Error> {
    use serde::de::Error;
    match Option::<Value>::deserialize(d)? {
        None => Ok(None),
        Some(Value::String(s)) if s.trim().is_empty() => Ok(None),
        Some(Value::String(s)) => s
            .parse::<Id>()
            .map(Some)
            .map_err(|_| D::Error::custom(format!("id {s:?} is not an integer"))),
        Some(Value::Number(n)) => n
            .as_u64()
            .map(|v| Some(Id(v)))
            .ok_or_else(|| D::Error::custom(format!("id {n} is not a non-negative integer"))),
        Some(other) => Err(D::Error::custom(format!("id {other} is not an integer"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds(json: &str) -> Vec<(u64, MessageKind)> {
        Catalog::parse_messages(json.as_bytes())
            .unwrap()
            .iter()
            .map(|m| (m.id.0, m.channel))
            .collect()
    }

    #[test]
    fn flat_messages_parse_every_field() {
        let json = r#"[
            {"id": 9178288208762825810, "channel": "email", "name": "Spring", "subject": "Hi",
             "campaign_id": "9178288208762825811", "campaign_name": "Launch"},
            {"id": "12", "channel": "push", "name": "Ping"}
        ]"#;
        let messages = Catalog::parse_messages(json.as_bytes()).unwrap();
        assert_eq!(
            messages[0],
            Message {
                id: Id(9178288208762825810),
                channel: MessageKind::Email,
                name: Some("Spring".into()),
                subject: Some("Hi".into()),
                campaign_id: Some(Id(9178288208762825811)),
                campaign_name: Some("Launch".into()),
            }
        );
        assert_eq!(
            messages[1],
            Message {
                id: Id(12),
                channel: MessageKind::Push,
                name: Some("Ping".into()),
                subject: None,
                campaign_id: None,
                campaign_name: None,
            }
        );
    }

    #[test]
    fn empty_subject_and_empty_campaign_id_count_as_absent() {
        let json = r#"[{"id": 1, "channel": "email", "name": "N", "subject": "",
                        "campaign_id": "", "campaign_name": null}]"#;
        let m = &Catalog::parse_messages(json.as_bytes()).unwrap()[0];
        assert_eq!(m.subject, None);
        assert_eq!(m.campaign_id, None);
        assert_eq!(m.campaign_name, None);
    }

    #[test]
    fn flat_channel_is_checked() {
        let table = [
            (r#"[{"id": 1, "channel": "EMAIL"}]"#, MessageKind::Email),
            (r#"[{"id": 1, "channel": " push "}]"#, MessageKind::Push),
            (r#"[{"id": 1, "channel": "in-app"}]"#, MessageKind::InApp),
        ];
        for (json, kind) in table {
            assert_eq!(kinds(json), vec![(1, kind)], "{json}");
        }
        let err = Catalog::parse_messages(br#"[{"id": 7, "channel": "emial"}]"#).unwrap_err();
        assert!(err.contains("message 7") && err.contains("emial"), "{err}");
        let err = Catalog::parse_messages(br#"[{"id": 7, "name": "x"}]"#).unwrap_err();
        assert!(err.contains("neither"), "{err}");
    }

    #[test]
    fn api_messages_map_message_type() {
        let json = r#"{"response": [{"success": true, "messages": [
            {"id": 9178288208762825810, "name": "Mail", "messageType": "Email",
             "campaignID": 9178288208762825811, "campaignName": "C", "subject": "S",
             "created": 1700000000, "active": true},
            {"id": "2", "name": "Buzz", "messageType": "Push Notification"},
            {"id": 3, "name": "Popup", "messageType": "Center Popup"},
            {"id": 4, "name": "Hook", "messageType": "Webhook", "campaignID": null}
        ]}]}"#;
        let messages = Catalog::parse_messages(json.as_bytes()).unwrap();
        let summary: Vec<_> = messages.iter().map(|m| (m.id.0, m.channel)).collect();
        assert_eq!(
            summary,
            vec![
                (9178288208762825810, MessageKind::Email),
                (2, MessageKind::Push),
                (3, MessageKind::InApp),
                (4, MessageKind::InApp),
            ]
        );
        assert_eq!(messages[0].campaign_id, Some(Id(9178288208762825811)));
        assert_eq!(messages[0].campaign_name.as_deref(), Some("C"));
        assert_eq!(messages[0].subject.as_deref(), Some("S"));
        assert_eq!(messages[3].campaign_id, None);
    }

    #[test]
    fn api_failure_quotes_leanplum_error() {
        let json = r#"{"response": [{"success": false, "error": {"message": "Invalid key"}}]}"#;
        let err = Catalog::parse_messages(json.as_bytes()).unwrap_err();
        assert!(err.contains("Invalid key"), "{err}");
        let err = Catalog::parse_abtests(json.as_bytes()).unwrap_err();
        assert!(err.contains("Invalid key"), "{err}");
    }

    #[test]
    fn api_response_without_its_list_is_an_error() {
        let abtests = r#"{"response": [{"success": true, "abTests": []}]}"#;
        let err = Catalog::parse_messages(abtests.as_bytes()).unwrap_err();
        assert!(err.contains("\"messages\""), "{err}");
        let err = Catalog::parse_messages(br#"{"response": []}"#).unwrap_err();
        assert!(err.contains("empty"), "{err}");
    }

    #[test]
    fn abtests_parse_in_every_form() {
        let flat = r#"[{"id": 9178288208762825810, "name": "T",
                        "variants": [{"id": "9178288208762825811", "name": "A"}, {"id": 5}]}]"#;
        let api = |key: &str| {
            format!(
                r#"{{"response": [{{"success": true, "{key}": [{{"id": 9178288208762825810,
                    "name": "T", "variants": [{{"id": 9178288208762825811, "name": "A"}},
                    {{"id": "5", "name": ""}}]}}]}}]}}"#
            )
        };
        let forms = [
            flat.to_owned(),
            api("abTests"),
            api("abtests"),
            api("experiments"),
        ];
        for json in forms {
            let tests = Catalog::parse_abtests(json.as_bytes()).unwrap();
            assert_eq!(tests.len(), 1, "{json}");
            let t = &tests[0];
            assert_eq!(t.id, Id(9178288208762825810));
            assert_eq!(t.name.as_deref(), Some("T"));
            assert_eq!(t.variants.len(), 2);
            assert_eq!(t.variants[&Id(9178288208762825811)].as_deref(), Some("A"));
            assert_eq!(t.variants[&Id(5)], None);
        }
    }

    #[test]
    fn parse_errors_carry_line_and_column() {
        let err =
            Catalog::parse_messages(b"[\n{\"id\": 1.5, \"channel\": \"email\"}]").unwrap_err();
        assert!(err.contains("line 2"), "{err}");
        let err = Catalog::parse_abtests(b"\"nope\"").unwrap_err();
        assert!(err.contains("flat form"), "{err}");
    }

    /// A file that is not a catalog (an HTML error page a sync job saved, JSON holding one)
    /// is refused with an error that says what is wrong and where, and quotes none of it.
    #[test]
    fn parse_errors_never_quote_a_page() {
        let page = "<!DOCTYPE html><html><head><title>502 Bad Gateway</title></head>\n\
                    <body><h1>Bad Gateway</h1><p>upstream token=abc123</p></body></html>\n";
        let long = "x".repeat(MAX_QUOTED_CHARS + 1);
        let cases = [
            page.to_owned(),
            format!("  \n{page}"),
            format!("[{page:?}]"),
            format!("{{\"response\": {page:?}}}"),
            format!("[{{\"id\": {page:?}, \"channel\": \"email\"}}]"),
            format!("[{{\"id\": 1, \"channel\": {page:?}}}]"),
            format!("[{{\"id\": 1, \"campaign_id\": {page:?}, \"channel\": \"email\"}}]"),
            format!("[{{\"id\": 1, \"channel\": \"{long}\"}}]"),
            "[{\"id\": 1, \"channel\": \"email\"}, <html>".to_owned(),
        ];
        for (i, json) in cases.iter().enumerate() {
            for err in [
                Catalog::parse_messages(json.as_bytes()).unwrap_err(),
                Catalog::parse_abtests(json.as_bytes())
                    .err()
                    .unwrap_or_default(),
            ] {
                for needle in ["Bad Gateway", "token", "DOCTYPE", &long] {
                    assert!(!err.contains(needle), "case {i}: {err}");
                }
                assert!(!err.contains('\n'), "case {i}: one line: {err}");
            }
        }
        // Leanplum's own error message (a failed call saved to the file) is quoted, as one
        // line and cut short.
        let failed = format!(
            "{{\"response\": [{{\"success\": false, \"error\": {{\"message\": {:?}}}}}]}}",
            page.repeat(5)
        );
        let err = Catalog::parse_messages(failed.as_bytes()).unwrap_err();
        assert!(err.starts_with(API_FAILURE), "{err}");
        assert!(!err.contains('\n'), "{err}");
        assert!(
            err.chars().count() <= API_FAILURE.len() + MAX_API_MESSAGE_CHARS + 1,
            "{err}"
        );
        // A short value is worth quoting: it is the typo to fix.
        let err = Catalog::parse_messages(br#"[{"id": 1, "channel": "emial"}]"#).unwrap_err();
        assert!(err.contains(r#""emial""#), "{err}");
        let err = Catalog::parse_messages(br#"[{"id": "12x", "channel": "push"}]"#).unwrap_err();
        assert!(err.contains(r#""12x""#), "{err}");
    }

    #[test]
    fn long_quotes_are_cut_and_escapes_respected() {
        let long = "y".repeat(50);
        assert_eq!(
            elide_long_quotes(&format!(r#"a "short" b "{long}" c "x\"y" d"#)),
            r#"a "short" b [50 characters] c "x\"y" d"#
        );
        assert_eq!(
            elide_long_quotes(&format!(r#"open "{long}"#)),
            "open [50 characters]"
        );
    }

    #[test]
    fn byte_order_mark_is_ignored() {
        let json = b"\xEF\xBB\xBF[{\"id\": 1, \"channel\": \"push\"}]";
        assert_eq!(Catalog::parse_messages(json).unwrap().len(), 1);
    }

    #[test]
    fn load_dir_treats_missing_files_as_empty() {
        let missing = Path::new(env!("CARGO_MANIFEST_DIR")).join("no-such-catalog-dir");
        let catalog = Catalog::load_dir(&missing).unwrap();
        assert_eq!((catalog.len_messages(), catalog.len_abtests()), (0, 0));

        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("abtests.json"),
            r#"[{"id": 1, "name": "T", "variants": []}]"#,
        )
        .unwrap();
        let catalog = Catalog::load_dir(dir.path()).unwrap();
        assert_eq!((catalog.len_messages(), catalog.len_abtests()), (0, 1));
        assert_eq!(catalog.abtest(Id(1)).unwrap().name.as_deref(), Some("T"));
    }

    #[test]
    fn load_dir_names_the_bad_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("messages.json"), "[{\"id\": }]").unwrap();
        let err = Catalog::load_dir(dir.path()).unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, CatalogError::Parse { .. }));
        assert!(
            text.contains("messages.json") && text.contains("line 1"),
            "{text}"
        );
    }

    #[test]
    fn shipped_example_catalog_loads() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/catalog");
        let catalog = Catalog::load_dir(&dir).unwrap();
        assert_eq!(catalog.len_messages(), 40);
        assert_eq!(catalog.len_abtests(), 6);
        let m = catalog.message(Id(5217074304371284)).unwrap();
        assert_eq!(m.channel, MessageKind::Email);
        assert_eq!(m.subject, None);
        assert_eq!(m.campaign_id, Some(Id(4929197427157317)));
    }

    #[test]
    fn later_entries_replace_earlier_ones() {
        let messages = Catalog::parse_messages(
            br#"[{"id": 1, "channel": "email", "name": "old"},
                 {"id": 1, "channel": "push", "name": "new"}]"#,
        )
        .unwrap();
        let catalog = Catalog::from_parts(messages, Vec::new());
        assert_eq!(catalog.len_messages(), 1);
        assert_eq!(catalog.message(Id(1)).unwrap().channel, MessageKind::Push);
        assert!(Catalog::empty().message(Id(1)).is_none());
    }

    #[test]
    fn message_lookup_answers_found_missing_or_error() {
        let found = br#"{"response":[{"success":true,"message":{"id":"9178288208762825810","messageType":"Email","name":"N"}}]}"#;
        let m = Catalog::parse_message_lookup(found).unwrap().unwrap();
        assert_eq!(
            (m.id, m.channel),
            (Id(9178288208762825810), MessageKind::Email)
        );
        let listed = br#"{"response":[{"success":true,"messages":[{"id":5,"messageType":"Push Notification"}]}]}"#;
        assert_eq!(
            Catalog::parse_message_lookup(listed)
                .unwrap()
                .unwrap()
                .channel,
            MessageKind::Push
        );
        let rows: &[(&[u8], Result<bool, &str>)] = &[
            (br#"{"response":[{"success":false,"error":{"message":"Message not found."}}]}"#, Ok(false)),
            (br#"{"response":[{"success":false,"error":{"message":"Message 5 does not exist"}}]}"#, Ok(false)),
            (br#"{"response":[{"success":true}]}"#, Ok(false)),
            (br#"{"response":[{"success":false,"error":{"message":"Too many requests"}}]}"#, Err("Leanplum says: Too many requests")),
            (br#"{"response":[]}"#, Err("malformed")),
            (b"<html>", Err("malformed")),
        ];
        for (body, want) in rows {
            let got = Catalog::parse_message_lookup(body);
            match want {
                Ok(found) => assert_eq!(got.as_ref().map(Option::is_some), Ok(*found), "{got:?}"),
                Err(text) => assert!(
                    got.as_ref().is_err_and(|e| e.to_string().contains(text)),
                    "{got:?}"
                ),
            }
        }
    }

    #[test]
    fn flat_json_reads_back_the_same_catalog() {
        let big = Id(u64::MAX - 1);
        let catalog = Catalog::from_parts(
            vec![
                Message {
                    id: big,
                    channel: MessageKind::InApp,
                    name: Some("In \"app\"".into()),
                    subject: None,
                    campaign_id: Some(Id(1 << 60)),
                    campaign_name: Some("C".into()),
                },
                Message {
                    id: Id(2),
                    channel: MessageKind::Push,
                    name: None,
                    subject: None,
                    campaign_id: None,
                    campaign_name: None,
                },
            ],
            vec![AbTest {
                id: big,
                name: Some("T".into()),
                variants: HashMap::from([(Id(1), Some("A".into())), (Id(2), None)]),
            }],
        );
        let (m, t) = catalog.to_flat_json();
        let back = Catalog::from_parts(
            Catalog::parse_messages(&m).unwrap(),
            Catalog::parse_abtests(&t).unwrap(),
        );
        assert_eq!(back, catalog);
    }

    #[test]
    fn overlay_takes_the_upper_entry() {
        let msg = |id, name: &str| Message {
            id: Id(id),
            channel: MessageKind::Email,
            name: Some(name.into()),
            subject: None,
            campaign_id: None,
            campaign_name: None,
        };
        let api = Catalog::from_parts(vec![msg(1, "api"), msg(2, "api")], vec![]);
        let files = Catalog::from_parts(vec![msg(2, "file"), msg(3, "file")], vec![]);
        let merged = api.overlaid(&files);
        let names: Vec<_> = merged
            .messages()
            .iter()
            .map(|m| (m.id.0, m.name.clone().unwrap()))
            .collect();
        assert_eq!(
            names,
            vec![(1, "api".into()), (2, "file".into()), (3, "file".into())]
        );
    }
}
