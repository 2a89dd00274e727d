//! The fast path of reading a session export line: a scanner over the line's bytes, made for
//! the shape Leanplum writes (compact JSON, app events that are read only to be counted), that
//! gives exactly the [`Session`] serde would give, or gives up.
//!
//! It gives up (`None`) on anything it does not handle itself, and the caller then reads the
//! line with serde as before: a line that is not valid JSON, a field of an unexpected type, a
//! duplicate field, an id written as a string, a control character anywhere, nesting deeper
//! than [`MAX_DEPTH`]. So a bad line always gets serde's own error, and a good line the same
//! session either way: the tests below check that against serde on generated and mutated
//! lines. What it saves is serde's generic work per app event (field identifiers, number and
//! float conversions, visitor calls): most of a line is app events, of which only the name is
//! needed (to tell message events from app events), while the rest is checked, not converted.

use crate::event::special;

use super::{Event, Events, Experiment, Id, LpTime, RawJson, Session, State, parse_message_event};

/// Values nested deeper than this are left to serde (which limits nesting to 128).
const MAX_DEPTH: usize = 64;

/// The session of `text` (one line, valid UTF-8), or `None`: read it with serde.
pub(crate) fn session(text: &str) -> Option<Session> {
    let mut s = Scanner {
        text,
        b: text.as_bytes(),
        at: 0,
    };
    let session = s.session()?;
    s.ws();
    (s.at == s.b.len()).then_some(session)
}

struct Scanner<'a> {
    text: &'a str,
    b: &'a [u8],
    at: usize,
}

/// The fields of a session, as bits of a "seen" mask (a field given twice is serde's error).
const USER_ID: u32 = 1;
const DEVICE_ID: u32 = 1 << 1;
const TIME: u32 = 1 << 2;
const LOCALE: u32 = 1 << 3;
const TIMEZONE: u32 = 1 << 4;
const COUNTRY: u32 = 1 << 5;
const REGION: u32 = 1 << 6;
const CITY: u32 = 1 << 7;
const APP_VERSION: u32 = 1 << 8;
const SYSTEM_NAME: u32 = 1 << 9;
const SYSTEM_VERSION: u32 = 1 << 10;
const DEVICE_MODEL: u32 = 1 << 11;
const EXPERIMENTS: u32 = 1 << 12;
const STATES: u32 = 1 << 13;

impl<'a> Scanner<'a> {
    #[inline(always)]
    fn peek(&self) -> Option<u8> {
        self.b.get(self.at).copied()
    }

    #[inline(always)]
    fn ws(&mut self) {
        while self.peek() == Some(b' ') {
            self.at += 1;
        }
    }

    /// Skips whitespace and takes `byte`.
    #[inline(always)]
    fn eat(&mut self, byte: u8) -> Option<()> {
        self.ws();
        (self.peek()? == byte).then(|| self.at += 1)
    }

    /// After whitespace: takes `byte` if it is next.
    #[inline(always)]
    fn next_is(&mut self, byte: u8) -> bool {
        self.ws();
        if self.peek() == Some(byte) {
            self.at += 1;
            true
        } else {
            false
        }
    }

    /// Calls `member` for each key of an object (the key given as it is written, escapes and
    /// all: a key with an escape matches no field and is skipped as unknown, which is right
    /// only if its decoded text is not a field name either, so such a key gives up).
    fn object(&mut self, mut member: impl FnMut(&mut Self, &'a [u8]) -> Option<()>) -> Option<()> {
        self.eat(b'{')?;
        if self.next_is(b'}') {
            return Some(());
        }
        loop {
            self.ws();
            let (key, escaped) = self.string_span()?;
            if escaped {
                return None;
            }
            self.eat(b':')?;
            self.ws();
            let b = self.b;
            member(self, &b[key.0..key.1])?;
            if self.next_is(b',') {
                continue;
            }
            return self.eat(b'}');
        }
    }

    /// Calls `element` for each element of an array.
    fn array(&mut self, mut element: impl FnMut(&mut Self) -> Option<()>) -> Option<()> {
        self.eat(b'[')?;
        if self.next_is(b']') {
            return Some(());
        }
        loop {
            self.ws();
            element(self)?;
            if self.next_is(b',') {
                continue;
            }
            return self.eat(b']');
        }
    }

    /// A string at the cursor: the span of its contents and whether it holds an escape. A
    /// control character in it (which JSON forbids) gives up.
    #[inline(always)]
    fn string_span(&mut self) -> Option<((usize, usize), bool)> {
        if self.peek()? != b'"' {
            return None;
        }
        let start = self.at + 1;
        let mut at = start;
        let mut escaped = false;
        loop {
            at = special(self.b, at)?;
            match self.b[at] {
                b'"' => {
                    self.at = at + 1;
                    return Some(((start, at), escaped));
                }
                b'\\' => {}
                _ => return None,
            }
            escaped = true;
            // As serde checks an escape it skips: one of `"\/bfnrt`, or `u` and 4 hex digits.
            match *self.b.get(at + 1)? {
                b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => at += 2,
                b'u' => {
                    let hex = self.b.get(at + 2..at + 6)?;
                    if !hex.iter().all(u8::is_ascii_hexdigit) {
                        return None;
                    }
                    at += 6;
                }
                _ => return None,
            }
        }
    }

    /// A string's text: borrowed when it has no escape, else decoded by serde (which also
    /// refuses what it would refuse in place, such as a lone surrogate).
    fn text(&mut self) -> Option<std::borrow::Cow<'a, str>> {
        let start = self.at;
        let ((from, to), escaped) = self.string_span()?;
        if escaped {
            serde_json::from_str::<String>(&self.text[start..self.at])
                .ok()
                .map(Into::into)
        } else {
            Some(self.text[from..to].into())
        }
    }

    /// A number at the cursor, checked against JSON's grammar: its span, and whether it is
    /// written with an exponent.
    #[inline(always)]
    fn number_span(&mut self) -> Option<((usize, usize), bool)> {
        let start = self.at;
        let b = self.b;
        let mut at = start;
        if b.get(at) == Some(&b'-') {
            at += 1;
        }
        let digits = |at: &mut usize| {
            let from = *at;
            while b.get(*at).is_some_and(u8::is_ascii_digit) {
                *at += 1;
            }
            *at - from
        };
        match b.get(at)? {
            b'0' => at += 1,
            b'1'..=b'9' => {
                digits(&mut at);
            }
            _ => return None,
        }
        if b.get(at) == Some(&b'.') {
            at += 1;
            if digits(&mut at) == 0 {
                return None;
            }
        }
        let exponent = matches!(b.get(at), Some(b'e' | b'E'));
        if exponent {
            at += 1;
            if matches!(b.get(at), Some(b'+' | b'-')) {
                at += 1;
            }
            if digits(&mut at) == 0 {
                return None;
            }
        }
        self.at = at;
        Some(((start, at), exponent))
    }

    /// Skips any value, checking it as serde checks what it ignores.
    fn skip(&mut self, depth: usize) -> Option<()> {
        if depth > MAX_DEPTH {
            return None;
        }
        self.ws();
        match self.peek()? {
            b'"' => self.string_span().map(drop),
            b'{' => self.object(|s, _| s.skip(depth + 1)),
            b'[' => self.array(|s| s.skip(depth + 1)),
            b't' => self.literal(b"true"),
            b'f' => self.literal(b"false"),
            b'n' => self.literal(b"null"),
            _ => self.number_span().map(drop),
        }
    }

    /// The span of any value.
    fn value_span(&mut self) -> Option<(usize, usize)> {
        self.ws();
        let start = self.at;
        self.skip(1)?;
        Some((start, self.at))
    }

    #[inline(always)]
    fn literal(&mut self, word: &[u8]) -> Option<()> {
        self.b[self.at..]
            .starts_with(word)
            .then(|| self.at += word.len())
    }

    #[inline(always)]
    fn null(&mut self) -> bool {
        self.ws();
        self.literal(b"null").is_some()
    }

    /// A non-negative integer written as a number that fits a u64 (anything else: serde).
    #[inline(always)]
    fn id(&mut self) -> Option<Id> {
        self.ws();
        let start = self.at;
        let mut n: u64 = 0;
        while let Some(d) = self.peek().filter(u8::is_ascii_digit) {
            n = n.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
            self.at += 1;
        }
        // One digit at least, no leading zero, and not the start of a fraction or exponent.
        let digits = self.at - start;
        let leading_zero = digits > 1 && self.b[start] == b'0';
        let more = matches!(self.peek(), Some(b'.' | b'e' | b'E'));
        (digits > 0 && !leading_zero && !more).then_some(Id(n))
    }

    /// A time written as a number, with its value as serde reads it.
    fn time(&mut self) -> Option<LpTime> {
        self.ws();
        let ((from, to), _) = self.number_span()?;
        serde_json::from_str::<LpTime>(&self.text[from..to]).ok()
    }

    /// A time that is only checked: a plain decimal is always a finite f64; anything with an
    /// exponent or very long is read as [`Scanner::time`] reads it.
    #[inline(always)]
    fn time_checked(&mut self) -> Option<()> {
        self.ws();
        let ((from, to), exponent) = self.number_span()?;
        if exponent || to - from > 300 {
            serde_json::from_str::<LpTime>(&self.text[from..to]).ok()?;
        }
        Some(())
    }

    /// `lenient_string`, for strings and `null` (`""` is absent too); numbers are left to
    /// serde.
    fn lenient(&mut self) -> Option<Option<String>> {
        if self.null() {
            return Some(None);
        }
        let text = self.text()?;
        Some((!text.is_empty()).then(|| text.into_owned()))
    }

    fn session(&mut self) -> Option<Session> {
        let mut s = Session::default();
        let mut seen = 0u32;
        self.object(|p, key| {
            let field = match key {
                b"userId" => USER_ID,
                b"deviceId" => DEVICE_ID,
                b"time" => TIME,
                b"locale" => LOCALE,
                b"timezone" => TIMEZONE,
                b"country" => COUNTRY,
                b"region" => REGION,
                b"city" => CITY,
                b"appVersion" => APP_VERSION,
                b"systemName" => SYSTEM_NAME,
                b"systemVersion" => SYSTEM_VERSION,
                b"deviceModel" => DEVICE_MODEL,
                b"experiments" => EXPERIMENTS,
                b"states" => STATES,
                _ => return p.skip(1),
            };
            if seen & field != 0 {
                return None;
            }
            seen |= field;
            match field {
                USER_ID => s.user_id = p.lenient()?,
                DEVICE_ID => s.device_id = p.lenient()?,
                TIME => s.time = if p.null() { None } else { Some(p.time()?) },
                LOCALE => s.locale = p.lenient()?,
                TIMEZONE => s.timezone = p.lenient()?,
                COUNTRY => s.country = p.lenient()?,
                REGION => s.region = p.lenient()?,
                CITY => s.city = p.lenient()?,
                APP_VERSION => s.app_version = p.lenient()?,
                SYSTEM_NAME => s.system_name = p.lenient()?,
                SYSTEM_VERSION => s.system_version = p.lenient()?,
                DEVICE_MODEL => s.device_model = p.lenient()?,
                EXPERIMENTS => p.array(|p| {
                    s.experiments.push(p.experiment()?);
                    Some(())
                })?,
                _ => p.array(|p| {
                    s.states.push(p.state()?);
                    Some(())
                })?,
            }
            Some(())
        })?;
        Some(s)
    }

    fn experiment(&mut self) -> Option<Experiment> {
        let (mut id, mut variant_id, mut impressed) = (None, None, None);
        self.object(|p, key| match key {
            b"id" if id.is_none() => {
                id = Some(p.id()?);
                Some(())
            }
            b"variantId" if variant_id.is_none() => {
                variant_id = Some(p.id()?);
                Some(())
            }
            b"impressed" if impressed.is_none() => {
                p.ws();
                impressed = Some(if p.literal(b"true").is_some() {
                    Some(true)
                } else if p.literal(b"false").is_some() {
                    Some(false)
                } else {
                    p.literal(b"null")?;
                    None
                });
                Some(())
            }
            b"id" | b"variantId" | b"impressed" => None,
            _ => p.skip(1),
        })?;
        Some(Experiment {
            id: id?,
            variant_id: variant_id?,
            impressed: impressed.flatten(),
        })
    }

    fn state(&mut self) -> Option<State> {
        let mut events: Option<Events> = None;
        self.object(|p, key| match key {
            b"events" if events.is_none() => {
                let mut kept = Events::default();
                p.array(|p| {
                    match p.event()? {
                        Some(event) => kept.messages.push(event),
                        None => kept.app_events += 1,
                    }
                    Some(())
                })?;
                events = Some(kept);
                Some(())
            }
            b"events" => None,
            _ => p.skip(1),
        })?;
        Some(State {
            events: events.unwrap_or_default(),
        })
    }

    /// One event: `Some` if it is a message event (kept), `None` if it is an app event (only
    /// checked); the outer `None` gives up.
    fn event(&mut self) -> Option<Option<Event>> {
        let mut event_id: Option<Id> = None;
        let mut name: Option<std::borrow::Cow<'a, str>> = None;
        // The time's span, read as a value only for a message event.
        let mut time: Option<(usize, usize)> = None;
        let mut parameters: Option<Option<(usize, usize)>> = None;
        self.object(|p, key| {
            match key {
                b"eventId" if event_id.is_none() => event_id = Some(p.id()?),
                b"name" if name.is_none() => {
                    p.ws();
                    name = Some(p.text()?);
                }
                b"time" if time.is_none() => {
                    p.ws();
                    let start = p.at;
                    p.time_checked()?;
                    time = Some((start, p.at));
                }
                b"parameters" if parameters.is_none() => {
                    parameters = Some(if p.null() {
                        None
                    } else {
                        Some(p.value_span()?)
                    });
                }
                b"eventId" | b"name" | b"time" | b"parameters" => return None,
                _ => p.skip(1)?,
            }
            Some(())
        })?;
        let (event_id, name, time) = (event_id?, name?, time?);
        if parse_message_event(&name).is_none() {
            return Some(None);
        }
        let time = serde_json::from_str::<LpTime>(&self.text[time.0..time.1]).ok()?;
        let parameters = match parameters.flatten() {
            // Checked as it was skipped.
            Some((from, to)) => Some(RawJson::checked(&self.text[from..to])),
            None => None,
        };
        Some(Some(Event {
            event_id,
            name: name.into_owned(),
            time,
            parameters,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The session serde reads, as text that shows every field (app-event counts included).
    fn serde(line: &str) -> Option<String> {
        serde_json::from_str::<Session>(line)
            .ok()
            .map(|s| format!("{s:?}"))
    }

    fn fast(line: &str) -> Option<String> {
        session(line).map(|s| format!("{s:?}"))
    }

    /// Whenever the scanner gives a session, serde gives the same one.
    fn agrees(line: &str) -> bool {
        match fast(line) {
            Some(ours) => {
                assert_eq!(Some(&ours), serde(line).as_ref(), "{line}");
                true
            }
            None => false,
        }
    }

    const LINE: &str = r#"{"sessionId":"368189982983273475","deviceId":"DEV-1","userId":"user-1","time":1793542645.826006,"isSession":true,"duration":325.202,"country":"US","region":"CA","city":"San Francisco","locale":"en_US","timezone":"America/Los_Angeles","appVersion":"2.0.1","systemName":"iOS","systemVersion":"17.1","deviceModel":"iPhone15,2","userAttributes":{"plan":"pro","visits":32,"tags":[1,-2.5e-3,true,false,null,{}]},"experiments":[{"id":491150281,"variantId":491150284,"impressed":true},{"id":7,"variantId":8}],"states":[{"stateId":-5153964132142657942,"events":[{"eventId":7000000000000000001,"name":".m6476125751676605 Unsubscribe","time":1793542721.205003,"value":0.0,"parameters":{"url":"https://example.com/p/311","index":4}},{"eventId":7000000000000000002,"name":"Add To Cart","time":1793542942.544715,"value":7.36,"parameters":{"sku":"A52","qty":4}},{"parameters":{"x":[]},"name":".m5","eventId":3,"time":17}]},{"events":[]},{}]}"#;

    #[test]
    fn a_typical_line_is_read_as_serde_reads_it() {
        assert!(agrees(LINE));
        let s = session(LINE).unwrap();
        assert_eq!(s.states[0].events.messages.len(), 2);
        assert_eq!(s.states[0].events.app_events, 1);
        assert_eq!(
            s.states[0].events.messages[0]
                .parameters
                .as_ref()
                .unwrap()
                .get(),
            r#"{"url":"https://example.com/p/311","index":4}"#
        );
    }

    #[test]
    fn every_field_of_a_session_is_read() {
        // Written without `..Default::default()`: a field added to `Session` fails to compile
        // here until it is given a value, and then this test fails until the scanner reads it.
        let text = |s: &str| Some(s.to_owned());
        let full = Session {
            user_id: text("u"),
            device_id: text("d"),
            time: Some(LpTime(1793542645.826006)),
            locale: text("en_US"),
            timezone: text("Europe/Paris"),
            country: text("FR"),
            region: text("IDF"),
            city: text("Paris"),
            app_version: text("2.0.1"),
            system_name: text("iOS"),
            system_version: text("17.1"),
            device_model: text("iPhone15,2"),
            experiments: vec![Experiment {
                id: Id(1),
                variant_id: Id(2),
                impressed: Some(true),
            }],
            states: vec![State {
                events: Events {
                    messages: vec![Event {
                        event_id: Id(3),
                        name: ".m4 Open".into(),
                        time: LpTime(1793542700.5),
                        parameters: Some(RawJson::new(r#"{"a":1}"#.into()).unwrap()),
                    }],
                    app_events: 0,
                },
            }],
        };
        let line = serde_json::to_string(&full).unwrap();
        assert!(agrees(&line), "{line}");
        assert_eq!(fast(&line), Some(format!("{full:?}")));
    }

    #[test]
    fn what_the_scanner_does_not_handle_goes_to_serde() {
        let cases = [
            // Not JSON, or not a session.
            r#"{"userId":"u""#,
            r#"{"userId":"u"} x"#,
            r#"{"userId":"u",}"#,
            r#"{"states":[{"events":[{"eventId":1,"name":"A","time":01}]}]}"#,
            r#"{"states":[{"events":[{"eventId":1,"name":"A","time":1.}]}]}"#,
            r#"{"states":[{"events":[{"eventId":1,"name":"A","time":1e}]}]}"#,
            r#"{"states":[{"events":[{"eventId":1,"name":"A","time":1,"value":tru}]}]}"#,
            r#"{"states":[{"events":[{"eventId":1,"name":"A","time":1,"x":"\q"}]}]}"#,
            r#"{"states":[{"events":[{"eventId":1,"name":"A","time":1,"x":"\u12G4"}]}]}"#,
            // Valid, but left to serde: types, duplicates, control characters, depth.
            r#"{"userId":5}"#,
            r#"{"userId":"a","userId":"b"}"#,
            "{\"userId\":\"a\tb\"}",
            "{\"userId\":\"a\"}\r",
            r#"{"experiments":[{"id":"1","variantId":2}]}"#,
            r#"{"experiments":null}"#,
            r#"{"states":[{"events":null}]}"#,
            r#"{"states":[{"events":[[1,"A",1]]}]}"#,
            r#"{"states":[{"events":[{"eventId":-1,"name":"A","time":1}]}]}"#,
            r#"{"states":[{"events":[{"eventId":1.5,"name":"A","time":1}]}]}"#,
            r#"{"states":[{"events":[{"eventId":18446744073709551616,"name":"A","time":1}]}]}"#,
            r#"{"states":[{"events":[{"eventId":1,"name":"A","time":"1"}]}]}"#,
            r#"{"states":[{"events":[{"eventId":1,"name":"A","time":1e400}]}]}"#,
            r#"{"states":[{"events":[{"eventId":1,"name":"A"}]}]}"#,
            r#"{"states":[{"events":[{"eventId":1,"name":"A","name":"B","time":1}]}]}"#,
            r#"{"u\u0073erId":"x"}"#,
        ];
        for case in cases {
            assert_eq!(fast(case), None, "{case}");
        }
        let deep = format!("{{\"x\":{}{}}}", "[".repeat(100), "]".repeat(100));
        assert_eq!(fast(&deep), None);
        assert!(serde(&deep).is_some());
    }

    #[test]
    fn escapes_nulls_and_empty_strings_read_as_serde_reads_them() {
        for line in [
            r#"{"userId":"","deviceId":null,"locale":"fr\u00e9\"\\\/","time":null}"#,
            r#"{"states":[{"events":[{"eventId":2,"name":".m\u0035 Open","time":2,"parameters":null}]}]}"#,
            r#"{"states":[{"events":[{"eventId":2,"name":"App \ud83d\ude00","time":2.5E+2,"parameters":{"a":"\n"}}]}]}"#,
            r#" { "userId" : "u" , "states" : [ { "events" : [ { "eventId" : 1 , "name" : ".m1" , "time" : 1 } ] } ] } "#,
            r#"{"experiments":[{"id":1,"variantId":2,"impressed":false},{"variantId":3,"id":4,"impressed":null}]}"#,
            r#"{}"#,
        ] {
            assert!(agrees(line), "{line}");
        }
        // A lone surrogate in a name: serde refuses it, and so does the scanner.
        let lone = r#"{"states":[{"events":[{"eventId":2,"name":"\ud800","time":2}]}]}"#;
        assert_eq!((fast(lone), serde(lone)), (None, None));
    }

    #[test]
    fn mutated_lines_are_never_read_differently() {
        // Every way of cutting a byte out of, or putting a byte into, a typical line: the
        // scanner either agrees with serde or leaves the line to it.
        let mut rng = fastrand::Rng::with_seed(13);
        let alphabet = b"{}[],:\"\\ 0123456789.eE+-truefalsnul.maxyz\t\x01\x7f";
        let mut read = 0;
        for _ in 0..20_000 {
            let mut bytes = LINE.as_bytes().to_vec();
            for _ in 0..rng.usize(1..4) {
                let at = rng.usize(0..bytes.len());
                match rng.u8(0..3) {
                    0 => {
                        bytes.remove(at);
                    }
                    1 => bytes.insert(at, alphabet[rng.usize(0..alphabet.len())]),
                    _ => bytes[at] = alphabet[rng.usize(0..alphabet.len())],
                }
            }
            if let Ok(line) = std::str::from_utf8(&bytes) {
                read += usize::from(agrees(line));
            }
        }
        // Some mutations leave a valid session (a digit changed, a space added).
        assert!(read > 1000, "{read}");
    }
}
