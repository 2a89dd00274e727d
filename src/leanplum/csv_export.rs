//! Leanplum's CSV export (`exportData` with `exportFormat=csv`, SPEC section 4 format 4): a job
//! writes, per shard `<n>`, one file per table, `export-<appId>-<jobId>-output<table>-<n>`, each
//! CSV with a header row. This module names the tables, reads a file name, checks a header and
//! turns one row into a typed [`Row`]; joining the tables back into sessions is
//! `crate::ingest::join`'s job.
//!
//! Columns are read by header name (trimmed, any letter case), in any order, extra columns
//! ignored. Ids are 64-bit integers read from their digits, never through an f64; `stateId`
//! (negative at times) is not read at all. Times are accepted in the three forms Leanplum
//! writes: `1.591474962721E9`, `1591474962.721` and `2020-06-06 20:22:42.721 UTC`.

use super::{Experiment, Id, LpTime, Session};

/// The tables of a CSV export job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Table {
    Sessions,
    States,
    Events,
    EventParameters,
    Experiments,
    UserAttributes,
}

impl Table {
    /// The table as it appears in file names (`...-output<name>-<n>`).
    pub(crate) fn name(self) -> &'static str {
        match self {
            Table::Sessions => "sessions",
            Table::States => "states",
            Table::Events => "events",
            Table::EventParameters => "eventparameters",
            Table::Experiments => "experiments",
            Table::UserAttributes => "userattributes",
        }
    }

    fn from_name(name: &str) -> Option<Table> {
        Some(match name {
            "sessions" => Table::Sessions,
            "states" => Table::States,
            "events" => Table::Events,
            "eventparameters" => Table::EventParameters,
            "experiments" => Table::Experiments,
            "userattributes" => Table::UserAttributes,
            _ => return None,
        })
    }
}

impl std::fmt::Display for Table {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What a file name says: the job (`<appId>-<jobId>`), the table and the shard.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct TableFile {
    pub job: String,
    pub table: Table,
    pub shard: u32,
}

/// Reads `export-<appId>-<jobId>-output<table>-<n>`, optionally with `.gz` (the public pipeline
/// that used this format matched `export-.*-output([a-z0-9]+)-([0-9]+)$`). `None` for any other
/// name, the JSON export's `...-output-<n>` included.
pub(crate) fn table_file(file_name: &str) -> Option<TableFile> {
    let name = file_name.strip_suffix(".gz").unwrap_or(file_name);
    let rest = name.strip_prefix("export-")?;
    let at = rest.rfind("-output")?;
    let job = &rest[..at];
    let tail = &rest[at + "-output".len()..];
    let (table, shard) = tail.split_once('-')?;
    if job.is_empty()
        || table.is_empty()
        || !table
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        || shard.is_empty()
        || !shard.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    Some(TableFile {
        job: job.to_owned(),
        table: Table::from_name(table)?,
        shard: shard.parse().ok()?,
    })
}

/// The name of the `eventparameters` file of `job`'s shard (for messages and manifests).
pub(crate) fn parameters_file_name(job: &str, shard: u32) -> String {
    format!("export-{job}-outputeventparameters-{shard}")
}

/// Where the columns a table's rows need are, by header name. Built from the header row.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Columns {
    /// Number of columns in the header: every row must have as many.
    pub width: usize,
    session_id: Option<usize>,
    event_id: Option<usize>,
    experiment_id: Option<usize>,
    variant_id: Option<usize>,
    event_name: Option<usize>,
    start: Option<usize>,
    name: Option<usize>,
    value: Option<usize>,
    user_id: Option<usize>,
    device_id: Option<usize>,
    locale: Option<usize>,
    timezone: Option<usize>,
    country: Option<usize>,
    region: Option<usize>,
    city: Option<usize>,
    app_version: Option<usize>,
    os_name: Option<usize>,
    os_version: Option<usize>,
    device_model: Option<usize>,
}

impl Columns {
    /// Finds the columns `table` needs in `header` (names as written; matched trimmed and
    /// case-insensitively). `Err` names the first required column missing: a file named like a
    /// table whose header is not that table's.
    pub(crate) fn new(table: Table, header: &[&str]) -> Result<Columns, String> {
        let names: Vec<String> = header.iter().map(|h| h.trim().to_lowercase()).collect();
        let find = |n: &str| names.iter().position(|h| h == n);
        let c = Columns {
            width: names.len(),
            session_id: find("sessionid"),
            event_id: find("eventid"),
            experiment_id: find("experimentid"),
            variant_id: find("variantid"),
            event_name: find("eventname"),
            start: find("start"),
            name: find("name"),
            value: find("value"),
            user_id: find("userid"),
            device_id: find("deviceid"),
            locale: find("locale"),
            timezone: find("timezone"),
            country: find("country"),
            region: find("region"),
            city: find("city"),
            app_version: find("appversion"),
            os_name: find("osname"),
            os_version: find("osversion"),
            device_model: find("devicemodel"),
        };
        let required: &[(&str, Option<usize>)] = match table {
            Table::Sessions => &[
                ("sessionId", c.session_id),
                ("start", c.start),
                ("userId", c.user_id),
                ("deviceId", c.device_id),
            ],
            Table::Events => &[
                ("eventId", c.event_id),
                ("sessionId", c.session_id),
                ("eventName", c.event_name),
                ("start", c.start),
            ],
            Table::EventParameters => &[
                ("eventId", c.event_id),
                ("name", c.name),
                ("value", c.value),
            ],
            Table::Experiments => &[
                ("experimentId", c.experiment_id),
                ("sessionId", c.session_id),
                ("variantId", c.variant_id),
            ],
            // Not joined: any header will do, as long as there is one.
            Table::States | Table::UserAttributes => &[],
        };
        if let Some((missing, _)) = required.iter().find(|(_, at)| at.is_none()) {
            return Err(format!(
                "named like a Leanplum CSV export `{table}` table, but its header has no `{missing}` column"
            ));
        }
        if names.iter().all(|n| n.is_empty()) {
            return Err("empty CSV header".into());
        }
        Ok(c)
    }
}

/// A session as the `sessions` table gives it: its id, and its identity and context as a
/// [`Session`] with no states and no experiments (the JSON export's fields: `start` is `time`,
/// `osName` / `osVersion` are `systemName` / `systemVersion`).
#[derive(Debug, Clone)]
pub(crate) struct SessionRow {
    pub session_id: String,
    pub session: Session,
}

/// One `events` row.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct EventRow {
    pub event_id: Id,
    pub session_id: String,
    pub name: String,
    pub time: LpTime,
}

/// One `eventparameters` row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ParamRow {
    pub event_id: Id,
    pub name: String,
    pub value: String,
}

/// One `experiments` row: an impression.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ExperimentRow {
    pub session_id: String,
    pub experiment_id: Id,
    pub variant_id: Id,
}

impl ExperimentRow {
    /// As the JSON export's `experiments[]` entry (a row is an impression: `impressed` absent).
    pub(crate) fn experiment(&self) -> Experiment {
        Experiment {
            id: self.experiment_id,
            variant_id: self.variant_id,
            impressed: None,
        }
    }
}

/// One parsed row.
#[derive(Debug, Clone)]
pub(crate) enum Row {
    Session(Box<SessionRow>),
    Event(EventRow),
    Param(ParamRow),
    Experiment(ExperimentRow),
    /// A `states` or `userattributes` row: counted, nothing else.
    Other,
}

/// Parses one row of `table`; `cells` are the row's fields as text, in header order.
pub(crate) fn parse_row(table: Table, cols: &Columns, cells: &[&str]) -> Result<Row, String> {
    if cells.len() != cols.width {
        return Err(format!(
            "row has {} fields but the header has {}",
            cells.len(),
            cols.width
        ));
    }
    let cell = |at: Option<usize>| at.and_then(|i| cells.get(i)).map_or("", |c| c.trim());
    let text = |at: Option<usize>| {
        let c = at.and_then(|i| cells.get(i)).copied().unwrap_or("");
        (!c.is_empty()).then(|| c.to_owned())
    };
    let id = |at: Option<usize>, what: &str| -> Result<Id, String> {
        let c = cell(at);
        if c.is_empty() {
            return Err(format!("{what}: missing"));
        }
        c.parse::<Id>()
            .map_err(|_| format!("{what}: {c:?} is not an integer id"))
    };
    let session_id = |what: &str| -> Result<String, String> {
        let c = cell(cols.session_id);
        if c.is_empty() {
            Err(format!("{what}: missing"))
        } else {
            Ok(c.to_owned())
        }
    };
    Ok(match table {
        Table::Sessions => {
            let time = match cell(cols.start) {
                "" => None,
                t => Some(parse_time(t).map_err(|e| format!("start: {e}"))?),
            };
            Row::Session(Box::new(SessionRow {
                session_id: session_id("sessionId")?,
                session: Session {
                    user_id: text(cols.user_id),
                    device_id: text(cols.device_id),
                    time,
                    locale: text(cols.locale),
                    timezone: text(cols.timezone),
                    country: text(cols.country),
                    region: text(cols.region),
                    city: text(cols.city),
                    app_version: text(cols.app_version),
                    system_name: text(cols.os_name),
                    system_version: text(cols.os_version),
                    device_model: text(cols.device_model),
                    experiments: Vec::new(),
                    states: Vec::new(),
                },
            }))
        }
        Table::Events => Row::Event(EventRow {
            event_id: id(cols.event_id, "eventId")?,
            session_id: session_id("sessionId")?,
            name: cells[cols.event_name.unwrap_or(0)].to_owned(),
            time: parse_time(cell(cols.start)).map_err(|e| format!("start: {e}"))?,
        }),
        Table::EventParameters => Row::Param(ParamRow {
            event_id: id(cols.event_id, "eventId")?,
            name: cell(cols.name).to_owned(),
            value: cells[cols.value.unwrap_or(0)].to_owned(),
        }),
        Table::Experiments => Row::Experiment(ExperimentRow {
            session_id: session_id("sessionId")?,
            experiment_id: id(cols.experiment_id, "experimentId")?,
            variant_id: id(cols.variant_id, "variantId")?,
        }),
        Table::States | Table::UserAttributes => Row::Other,
    })
}

/// A time as Leanplum's CSV export writes it: seconds since the epoch as a double
/// (`1.591474962721E9`, `1591474962.721`) or `YYYY-MM-DD HH:MM:SS[.fff] UTC` (a `T` between
/// date and time, and `Z` or no zone, are accepted too; any other zone is refused).
pub(crate) fn parse_time(text: &str) -> Result<LpTime, String> {
    let t = text.trim();
    if t.is_empty() {
        return Err("missing".into());
    }
    let b = t.as_bytes();
    if b.len() >= 10 && b[4] == b'-' && b[7] == b'-' {
        return parse_datetime(t).ok_or_else(|| format!("{t:?} is not a time"));
    }
    match t.parse::<f64>() {
        Ok(s) if s.is_finite() => Ok(LpTime(s)),
        _ => Err(format!("{t:?} is not a time")),
    }
}

fn parse_datetime(t: &str) -> Option<LpTime> {
    let t = t
        .strip_suffix("UTC")
        .or_else(|| t.strip_suffix('Z'))
        .unwrap_or(t)
        .trim_end();
    let (date, time) = t.split_once([' ', 'T'])?;
    let mut d = date.split('-');
    let year: i64 = digits(d.next()?, 4)?;
    let month: i64 = digits(d.next()?, 2)?;
    let day: i64 = digits(d.next()?, 2)?;
    if d.next().is_some() || !(1..=12).contains(&month) || !(1..=31).contains(&day) {
        return None;
    }
    let (hms, frac) = match time.trim().split_once('.') {
        Some((hms, frac)) => (hms, Some(frac)),
        None => (time.trim(), None),
    };
    let mut h = hms.split(':');
    let hour: i64 = digits(h.next()?, 2)?;
    let minute: i64 = digits(h.next()?, 2)?;
    let second: i64 = digits(h.next()?, 2)?;
    if h.next().is_some() || hour > 23 || minute > 59 || second > 60 {
        return None;
    }
    let fraction = match frac {
        Some(f) if !f.is_empty() && f.bytes().all(|b| b.is_ascii_digit()) => {
            format!("0.{f}").parse::<f64>().ok()?
        }
        Some(_) => return None,
        None => 0.0,
    };
    let secs = days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second;
    Some(LpTime(secs as f64 + fraction))
}

fn digits(s: &str, len: usize) -> Option<i64> {
    (s.len() == len && s.bytes().all(|b| b.is_ascii_digit()))
        .then(|| s.parse().ok())
        .flatten()
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's `days_from_civil`).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The parameters the mapping reads (SPEC section 5: `email_id`, the clicked link's `url` /
/// `link_url` and `index` / `link_id`): the join keeps only these.
pub(crate) const MAPPED_PARAMETERS: [&str; 5] = ["email_id", "url", "link_url", "index", "link_id"];

/// An event's parameters as the JSON export writes them (`{"url": "...", "index": 2}`), from its
/// `eventparameters` rows. A link index that is an integer becomes a JSON number, as Leanplum
/// writes it; every other value stays text (the mapping reads both the same way).
pub(crate) fn parameters_json(params: &[(String, String)]) -> Option<super::RawJson> {
    if params.is_empty() {
        return None;
    }
    let mut m = serde_json::Map::new();
    for (name, value) in params {
        let v = match name.as_str() {
            "index" | "link_id" => match value.trim().parse::<i64>() {
                Ok(n) => serde_json::Value::from(n),
                Err(_) => serde_json::Value::from(value.as_str()),
            },
            _ => serde_json::Value::from(value.as_str()),
        };
        m.insert(name.clone(), v);
    }
    serde_json::value::to_raw_value(&m).ok().map(Into::into)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_of_a_csv_job() {
        let f = table_file("export-5629499534213120-06e7df8e-1eb1-outputevents-3").unwrap();
        assert_eq!(
            f,
            TableFile {
                job: "5629499534213120-06e7df8e-1eb1".into(),
                table: Table::Events,
                shard: 3
            }
        );
        let g = table_file("export-1-j-outputeventparameters-12.gz").unwrap();
        assert_eq!((g.table, g.shard), (Table::EventParameters, 12));
        for t in [
            "sessions",
            "states",
            "experiments",
            "userattributes",
            "events",
        ] {
            let n = format!("export-1-j-output{t}-0");
            assert_eq!(table_file(&n).unwrap().table.name(), t);
        }
        for not in [
            "export-1-j-output-0",
            "export-1-j-output-manifest",
            "export-1-j-outputevents-",
            "export-1-j-outputevents-1a",
            "export-1-j-outputEvents-1",
            "export-1-j-outputwidgets-1",
            "export--outputevents-1",
            "feed.csv",
            "outputevents-1",
        ] {
            assert!(table_file(not).is_none(), "{not}");
        }
    }

    #[test]
    fn the_three_time_forms() {
        for (text, ms) in [
            ("1.591474962721E9", 1_591_474_962_721),
            ("1591474962.721", 1_591_474_962_721),
            ("1591474962", 1_591_474_962_000),
            ("2020-06-06 20:22:42.721 UTC", 1_591_474_962_721),
            ("2020-06-06 20:22:42 UTC", 1_591_474_962_000),
            ("2020-06-06T20:22:42.7215Z", 1_591_474_962_722),
            ("2020-06-06 20:22:42.7", 1_591_474_962_700),
            ("1970-01-01 00:00:00 UTC", 0),
            ("2000-02-29 12:00:00 UTC", 951_825_600_000),
            (" 1.7935349E+09 ", 1_793_534_900_000),
        ] {
            assert_eq!(parse_time(text).unwrap().millis(), ms, "{text}");
        }
        for bad in [
            "",
            "soon",
            "2020-13-01 00:00:00 UTC",
            "2020-06-06 25:00:00 UTC",
            "2020-06-06 20:22:42.x UTC",
            "2020-06-06 20:22:42 +02:00",
            "NaN",
            "inf",
        ] {
            assert!(parse_time(bad).is_err(), "{bad:?}");
        }
    }

    fn cols(table: Table, header: &str) -> Columns {
        Columns::new(table, &header.split(',').collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn rows_by_header_name_in_any_order_with_extra_columns() {
        let c = cols(
            Table::Events,
            "extra,start,eventName,sessionId,stateId,eventId,value,info",
        );
        let Row::Event(e) = parse_row(
            Table::Events,
            &c,
            &[
                "x",
                "2020-06-06 20:22:42.721 UTC",
                ".m42 Click",
                "77",
                "-5",
                "18446744073709551615",
                "",
                "",
            ],
        )
        .unwrap() else {
            panic!()
        };
        assert_eq!(e.event_id, Id(u64::MAX));
        assert_eq!(e.session_id, "77");
        assert_eq!(e.name, ".m42 Click");
        assert_eq!(e.time.millis(), 1_591_474_962_721);

        let c = cols(
            Table::Sessions,
            "SessionId,userId,deviceId,start,osName,osVersion,locale,country,appVersion",
        );
        let Row::Session(s) = parse_row(
            Table::Sessions,
            &c,
            &["9", "", "dev", "1.5E9", "iOS", "17.1", "en_US", "US", "2.0"],
        )
        .unwrap() else {
            panic!()
        };
        assert_eq!(s.session_id, "9");
        assert_eq!(s.session.user_id, None);
        assert_eq!(s.session.device_id.as_deref(), Some("dev"));
        assert_eq!(s.session.system_name.as_deref(), Some("iOS"));
        assert_eq!(s.session.system_version.as_deref(), Some("17.1"));
        assert_eq!(s.session.time.unwrap().millis(), 1_500_000_000_000);

        let c = cols(Table::Experiments, "variantId,experimentId,sessionId");
        let Row::Experiment(x) =
            parse_row(Table::Experiments, &c, &["9007199254740993", "5", "9"]).unwrap()
        else {
            panic!()
        };
        assert_eq!(x.variant_id, Id(9_007_199_254_740_993));
    }

    #[test]
    fn bad_rows_say_why() {
        let c = cols(Table::Events, "eventId,stateId,sessionId,eventName,start");
        for (cells, why) in [
            (vec!["1.5E18", "1", "2", "x", "1"], "not an integer id"),
            (vec!["", "1", "2", "x", "1"], "eventId: missing"),
            (vec!["1", "1", "", "x", "1"], "sessionId: missing"),
            (vec!["1", "1", "2", "x", "later"], "start:"),
            (vec!["1", "1"], "row has 2 fields but the header has 5"),
            (vec!["-1", "1", "2", "x", "1"], "not an integer id"),
        ] {
            let err = parse_row(Table::Events, &c, &cells).unwrap_err();
            assert!(err.contains(why), "{cells:?}: {err}");
        }
        let err = Columns::new(Table::Events, &["eventId", "sessionId", "start"]).unwrap_err();
        assert!(err.contains("`eventName`"), "{err}");
        assert!(Columns::new(Table::States, &["anything"]).is_ok());
    }

    #[test]
    fn parameters_as_the_json_export_writes_them() {
        let raw = parameters_json(&[
            ("url".into(), "https://x.test/?a=1,b=\"2\"".into()),
            ("index".into(), "2".into()),
        ])
        .unwrap();
        assert_eq!(
            raw.get(),
            r#"{"index":2,"url":"https://x.test/?a=1,b=\"2\""}"#
        );
        assert!(parameters_json(&[]).is_none());
    }
}
