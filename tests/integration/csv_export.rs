//! Leanplum's CSV export (SPEC section 4, format 4) through the real binary: the same generated
//! sessions written as a JSON export and as a CSV export give identical Segment events; a job's
//! tables arriving in the worst order with a `kill -9` in between are delivered exactly once;
//! `states` and `userattributes` are counted, never quarantined.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::Path;

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::util::*;

const APP: &str = "5629499534213120";

/// One table file of a CSV export job.
struct TableFile {
    table: &'static str,
    shard: u32,
    bytes: Vec<u8>,
}

impl TableFile {
    fn name(&self, job: &str) -> String {
        format!("export-{APP}-{job}-output{}-{}", self.table, self.shard)
    }
}

/// Generated sessions, as a JSON export and as a CSV export job, and the `messageId`s of the
/// Segment events they must give.
struct Dataset {
    json: Vec<u8>,
    tables: Vec<TableFile>,
    expected: BTreeSet<String>,
    /// Expected ids by the shard of the session they belong to.
    by_shard: BTreeMap<u32, BTreeSet<String>>,
    /// Message events and impressions (what waits for sessions).
    joined_records: usize,
}

/// Catalog messages (`examples/catalog`) and actions mapping to one Segment event each.
const ACTIONS: [(&str, &str); 5] = [
    ("5680127476129675", "Open"),
    ("5175843646007627", "Delivered"),
    ("4350571203541773", "Open"),
    ("6634839652083743", "Click"),
    ("5217074304371284", "Unsubscribe"),
];

fn csv_cell(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_owned()
    }
}

fn csv_row(out: &mut String, cells: &[String]) {
    let row: Vec<String> = cells.iter().map(|c| csv_cell(c)).collect();
    out.push_str(&row.join(","));
    out.push('\n');
}

/// A time with exactly three decimals, in one of the three forms of the CSV export.
fn csv_time(ms: i64, form: usize) -> String {
    let secs = ms as f64 / 1000.0;
    match form % 3 {
        0 => format!("{secs:E}"),
        1 => format!("{secs}"),
        _ => chrono::DateTime::from_timestamp_millis(ms)
            .unwrap()
            .format("%Y-%m-%d %H:%M:%S%.3f UTC")
            .to_string(),
    }
}

fn short_sha(text: &str) -> String {
    hex::encode(Sha256::digest(text.as_bytes()))[..16].to_owned()
}

/// `n` sessions over two shards, eventIds from `first_event_id` (above 2^53).
fn dataset(n: usize, first_event_id: u64) -> Dataset {
    let mut json_out = Vec::new();
    let mut expected = BTreeSet::new();
    let mut by_shard: BTreeMap<u32, BTreeSet<String>> = BTreeMap::new();
    let mut joined_records = 0;
    let mut sessions: BTreeMap<u32, String> = BTreeMap::new();
    let mut events: BTreeMap<u32, String> = BTreeMap::new();
    let mut params: BTreeMap<u32, String> = BTreeMap::new();
    let mut experiments: BTreeMap<u32, String> = BTreeMap::new();
    for shard in 0..2 {
        sessions.insert(shard, "sessionId,userId,userBucket,userStart,country,region,city,start,duration,lat,lon,locale,timezone,timezoneOffset,appVersion,client,sdkVersion,osName,osVersion,deviceModel,browserName,browserVersion,deviceId,priorEvents,priorSessions,priorTimeSpentInApp,priorStates,isDeveloper,isSession,sourcePublisherId,sourcePublisher,sourceSubPublisher,sourceSite,sourceCampaign,sourceAdGroup,sourceAd\n".into());
        // Columns in another order than the issue lists, and one more.
        events.insert(
            shard,
            "eventId,stateId,sessionId,eventName,start,value,info,timeUntilFirstForUser,extra\n"
                .into(),
        );
        params.insert(shard, "eventId,name,value\n".into());
        experiments.insert(shard, "sessionId,experimentId,variantId\n".into());
    }
    let mut event_id = first_event_id;
    for i in 0..n {
        let shard = (i % 2) as u32;
        let sid = (9_100_000_000_000_000_000u64 + i as u64).to_string();
        let device = format!("DEV-{i:05}");
        // Some users anonymous (userId = deviceId, as Leanplum writes them), some named with
        // a comma and quotes.
        let user = if i % 4 == 0 {
            device.clone()
        } else {
            format!("user, \"{i}\"")
        };
        let start_ms = 1_793_800_000_123i64 + i as i64 * 10_007;
        let city = if i % 3 == 0 {
            "Washington, D.C."
        } else {
            "Berlin"
        };
        let model = "iPhone \"15\", Pro";
        let who = if user != device { &user } else { &device };
        let mut state_events: BTreeMap<i64, Vec<Value>> = BTreeMap::new();
        for j in 0..7usize {
            let id = event_id;
            event_id += 1;
            let ms = start_ms + 1000 + j as i64 * 1500;
            let state = -(i as i64) - 1 + (j as i64 % 2) * (2 * i as i64 + 3);
            let (name, p): (String, Vec<(&str, String)>) = match j {
                // An app event with awkward text and a url parameter nobody maps.
                0 => (
                    "Add, to \"cart\"\nnow".into(),
                    vec![("url", "https://shop.test/x".into()), ("item", "7".into())],
                ),
                // A send: waits like any message event, then is skipped.
                1 => {
                    joined_records += 1;
                    (".m5680127476129675".into(), vec![])
                }
                _ => {
                    let (m, a) = ACTIONS[(i + j) % ACTIONS.len()];
                    let mut p = vec![];
                    if a == "Click" {
                        p.push(("url", format!("https://example.com/a?b={i},c=\"{j}\"\nx")));
                        p.push(("index", format!("{}", j)));
                    }
                    if a == "Open" && i % 2 == 0 {
                        p.push(("email_id", format!("E-{i}")));
                    }
                    joined_records += 1;
                    let mid = format!("lp-e-{id}");
                    expected.insert(mid.clone());
                    by_shard.entry(shard).or_default().insert(mid);
                    (format!(".m{m} {a}"), p)
                }
            };
            let mut ev =
                json!({"eventId": id, "name": name, "time": ms as f64 / 1000.0, "value": 0.0});
            if !p.is_empty() {
                let mut obj = serde_json::Map::new();
                for (k, v) in &p {
                    let v = if *k == "index" {
                        json!(v.parse::<i64>().unwrap())
                    } else {
                        json!(v)
                    };
                    obj.insert((*k).to_owned(), v);
                }
                ev["parameters"] = Value::Object(obj);
            }
            state_events.entry(state).or_default().push(ev);
            let e = events.get_mut(&shard).unwrap();
            csv_row(
                e,
                &[
                    id.to_string(),
                    state.to_string(),
                    sid.clone(),
                    name.clone(),
                    csv_time(ms, i + j),
                    "0".into(),
                    if j == 3 {
                        "line one\nline \"two\"".into()
                    } else {
                        String::new()
                    },
                    String::new(),
                    "x".into(),
                ],
            );
            for (k, v) in &p {
                csv_row(
                    params.get_mut(&shard).unwrap(),
                    &[id.to_string(), (*k).to_owned(), v.clone()],
                );
            }
        }
        let mut xs = Vec::new();
        for (x, variant) in [
            (316_460_575u64, 316_460_576 + (i as u64 % 3)),
            (9_007_199_254_740_993, 9_007_199_254_740_995),
        ] {
            if x > 1 << 53 && i % 2 == 1 {
                continue;
            }
            xs.push(json!({"id": x, "variantId": variant}));
            csv_row(
                experiments.get_mut(&shard).unwrap(),
                &[sid.clone(), x.to_string(), variant.to_string()],
            );
            joined_records += 1;
            let mid = format!("lp-x-{x}-{variant}-{}", short_sha(who));
            expected.insert(mid.clone());
            by_shard.entry(shard).or_default().insert(mid);
        }
        let states: Vec<Value> = state_events
            .into_iter()
            .map(|(id, evs)| json!({"stateId": id, "events": evs}))
            .collect();
        let session = json!({
            "sessionId": sid, "userId": user, "deviceId": device, "time": start_ms as f64 / 1000.0,
            "locale": "en_US", "timezone": "America/New_York", "country": "US", "region": "DC",
            "city": city, "appVersion": "4.2.0", "systemName": "iOS", "systemVersion": "17.1",
            "deviceModel": model, "experiments": xs, "states": states,
        });
        serde_json::to_writer(&mut json_out, &session).unwrap();
        json_out.push(b'\n');
        let s = sessions.get_mut(&shard).unwrap();
        let mut cells: Vec<String> = vec![String::new(); 36];
        cells[0] = sid.clone();
        cells[1] = user.clone();
        cells[2] = "3".into();
        cells[3] = csv_time(start_ms - 86_400_000, i + 1);
        cells[4] = "US".into();
        cells[5] = "DC".into();
        cells[6] = city.into();
        cells[7] = csv_time(start_ms, i);
        cells[8] = "12.5".into();
        cells[9] = "38.9".into();
        cells[10] = "-77.0".into();
        cells[11] = "en_US".into();
        cells[12] = "America/New_York".into();
        cells[13] = "-14400".into();
        cells[14] = "4.2.0".into();
        cells[15] = "ios".into();
        cells[16] = "6.1.0".into();
        cells[17] = "iOS".into();
        cells[18] = "17.1".into();
        cells[19] = model.into();
        cells[22] = device.clone();
        cells[27] = "false".into();
        cells[28] = "true".into();
        csv_row(s, &cells);
    }
    let mut tables = Vec::new();
    for shard in 0..2 {
        for (table, text) in [
            ("sessions", &sessions),
            ("events", &events),
            ("eventparameters", &params),
            ("experiments", &experiments),
        ] {
            tables.push(TableFile {
                table,
                shard,
                bytes: text[&shard].clone().into_bytes(),
            });
        }
        let mut states = String::from("stateId,sessionId,name,start\n");
        let mut attrs = String::from("sessionId,name,value\n");
        for i in 0..3 {
            let _ = writeln!(states, "-{i},9100000000000000000,\"Main, screen\",1.5E9");
            let _ = writeln!(
                attrs,
                "9100000000000000000,\"plan\",\"pro, \"\"yearly\"\"\""
            );
        }
        tables.push(TableFile {
            table: "states",
            shard,
            bytes: states.into_bytes(),
        });
        tables.push(TableFile {
            table: "userattributes",
            shard,
            bytes: attrs.into_bytes(),
        });
    }
    Dataset {
        json: json_out,
        tables,
        expected,
        by_shard,
        joined_records,
    }
}

fn by_message_id(events: Vec<Value>) -> BTreeMap<String, Value> {
    events
        .into_iter()
        .map(|e| (e["messageId"].as_str().unwrap().to_owned(), e))
        .collect()
}

fn write_table(dir: &Path, job: &str, t: &TableFile) {
    write_atomically(&dir.join(t.name(job)), &t.bytes);
}

/// The dry-run of `files`: its events by messageId.
fn dry_run(config: &Path, files: &[std::path::PathBuf]) -> BTreeMap<String, Value> {
    let mut args: Vec<&std::ffi::OsStr> =
        vec!["dry-run".as_ref(), "--config".as_ref(), config.as_os_str()];
    args.extend(files.iter().map(|f| f.as_os_str()));
    let out = run_cli(&args, PATIENCE);
    assert_eq!(out.code(), 0, "{}", out.all_output());
    by_message_id(
        out.stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect(),
    )
}

#[test]
fn one_dataset_as_json_and_as_csv_export_gives_identical_segment_events() {
    let data = dataset(60, 7_300_000_000_000_000_000);
    let job = "0b7c3a52-aaaa-4bbb-8ccc-000000000001";
    let json_env = new_env();
    let csv_env = new_env();
    let json_file = json_env
        .watch_dir()
        .join(format!("export-{APP}-{job}-output-0"));
    write_atomically(&json_file, &data.json);
    // gzip some tables: any may be.
    for (i, t) in data.tables.iter().enumerate() {
        if i % 3 == 1 {
            let path = csv_env.watch_dir().join(format!("{}.gz", t.name(job)));
            write_atomically(&path, &gzip_bytes(&t.bytes));
        } else {
            write_table(csv_env.watch_dir(), job, t);
        }
    }
    let json_agent = json_env.start_agent();
    let csv_agent = csv_env.start_agent();
    let expected: Vec<String> = data.expected.iter().cloned().collect();
    wait_delivered(&json_env, &json_agent, &expected, "JSON export");
    wait_delivered(&csv_env, &csv_agent, &expected, "CSV export");
    assert!(
        json_env
            .server
            .wait_for_quiet(std::time::Duration::from_millis(800), PATIENCE)
    );
    assert!(
        csv_env
            .server
            .wait_for_quiet(std::time::Duration::from_millis(800), PATIENCE)
    );
    assert_exactly_once(&json_env.server, &expected, &json_agent, "JSON export");
    assert_exactly_once(&csv_env.server, &expected, &csv_agent, "CSV export");
    let from_json = by_message_id(json_env.server.accepted_events());
    let from_csv = by_message_id(csv_env.server.accepted_events());
    for (id, ev) in &from_json {
        assert_eq!(Some(ev), from_csv.get(id), "{id} differs");
    }
    assert_eq!(from_json.len(), from_csv.len());
    // The Click's link, quoted with commas, quotes and a newline, came through the join.
    let click = from_csv
        .values()
        .find(|e| e["event"] == "Email Link Clicked")
        .expect("a click");
    assert!(
        click["properties"]["link_url"]
            .as_str()
            .unwrap()
            .contains(",c=\""),
        "{click}"
    );
    assert!(click["properties"]["link_id"].is_i64(), "{click}");
    let status = status_json(&csv_env.config_path);
    assert_eq!(status_u64(&status, "waiting"), 0, "{status}");
    assert_eq!(status_u64(&status, "quarantined"), 0, "{status}");
    assert_eq!(status_u64(&status, "files_failed"), 0, "{status}");
    assert!(quarantine_list(&csv_env.config_path).is_empty());
    drop(csv_agent);
    drop(json_agent);

    // dry-run: the job's CSV files together, in any order, print the same events.
    let mut files: Vec<std::path::PathBuf> = std::fs::read_dir(csv_env.watch_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files.reverse();
    let from_dry_csv = dry_run(&csv_env.config_path, &files);
    let from_dry_json = dry_run(&json_env.config_path, &[json_file]);
    assert_eq!(from_dry_csv.len(), expected.len());
    assert_eq!(from_dry_csv, from_dry_json);
}

#[test]
fn tables_arriving_events_first_sessions_last_with_a_kill_in_between_arrive_exactly_once() {
    let data = dataset(40, 7_310_000_000_000_000_000);
    let job = "0b7c3a52-aaaa-4bbb-8ccc-000000000002";
    let env = new_env();
    let mut agent = env.start_agent();
    // Everything but the sessions, and shard 1's parameters.
    let early: Vec<&TableFile> = data
        .tables
        .iter()
        .filter(|t| t.table != "sessions" && !(t.table == "eventparameters" && t.shard == 1))
        .collect();
    for t in &early {
        write_table(env.watch_dir(), job, t);
    }
    let waiting = data.joined_records as u64;
    wait_for_status(&env.config_path, PATIENCE, |s| {
        status_u64(s, "waiting") == waiting && status_u64(s, "files_done") == early.len() as u64
    })
    .unwrap_or_else(|| panic!("records not waiting:\n{}", agent.log_tail(40)));
    assert_eq!(env.server.accepted_count(), 0);
    let list = dead_letter_list(&env.config_path);
    let waits: Vec<&Value> = list.iter().filter(|e| e["kind"] == "waiting").collect();
    assert!(!waits.is_empty(), "{list:?}");
    // `--kind waiting` lists those and nothing else.
    let only = run_cli(
        &[
            "dead-letter".as_ref(),
            "list".as_ref(),
            "--kind".as_ref(),
            "waiting".as_ref(),
            "--json".as_ref(),
            "--config".as_ref(),
            env.config_path.as_os_str(),
        ],
        PATIENCE,
    );
    assert_eq!(only.code(), 0, "{}", only.all_output());
    let only: Vec<Value> = serde_json::from_str(only.stdout.trim()).unwrap();
    assert_eq!(only.len(), waits.len(), "{only:?}");
    assert!(only.iter().all(|e| e["kind"] == "waiting"), "{only:?}");
    assert!(
        waits.iter().any(|e| e["reason"]
            .as_str()
            .unwrap()
            .contains("wait for their sessions")),
        "{waits:?}"
    );
    agent.kill();

    let agent = env.start_agent();
    for t in data.tables.iter().filter(|t| t.table == "sessions") {
        write_table(env.watch_dir(), job, t);
    }
    // Shard 0 goes; shard 1's message events wait for their parameters, its impressions not.
    let shard0: Vec<String> = data.by_shard[&0].iter().cloned().collect();
    wait_delivered(&env, &agent, &shard0, "shard 0");
    let shard1_events: Vec<&String> = data.by_shard[&1]
        .iter()
        .filter(|id| id.starts_with("lp-e-"))
        .collect();
    // Its sends wait too (one per session of the shard).
    let shard1_waiting = shard1_events.len() as u64 + 20;
    wait_for_status(&env.config_path, PATIENCE, |s| {
        status_u64(s, "waiting") == shard1_waiting
    })
    .unwrap_or_else(|| {
        panic!(
            "shard 1 not waiting for its parameters:\n{}",
            agent.log_tail(40)
        )
    });
    let list = dead_letter_list(&env.config_path);
    assert!(
        list.iter().any(|e| e["kind"] == "waiting"
            && e["file"]
                .as_str()
                .unwrap()
                .ends_with("outputeventparameters-1")),
        "{list:?}"
    );
    let accepted: BTreeSet<String> = env.server.accepted_message_ids().into_iter().collect();
    assert!(shard1_events.iter().all(|id| !accepted.contains(*id)));

    let params1 = data
        .tables
        .iter()
        .find(|t| t.table == "eventparameters" && t.shard == 1)
        .unwrap();
    write_table(env.watch_dir(), job, params1);
    let expected: Vec<String> = data.expected.iter().cloned().collect();
    wait_delivered(&env, &agent, &expected, "the whole job");
    assert!(
        env.server
            .wait_for_quiet(std::time::Duration::from_millis(800), PATIENCE)
    );
    assert_exactly_once(
        &env.server,
        &expected,
        &agent,
        "events first, sessions last",
    );
    let status = status_json(&env.config_path);
    assert_eq!(status_u64(&status, "waiting"), 0, "{status}");
    assert_eq!(status_u64(&status, "quarantined"), 0, "{status}");
    assert_eq!(status_u64(&status, "files_failed"), 0, "{status}");
    assert!(quarantine_list(&env.config_path).is_empty());
    // The states and userattributes files were read (counted), nothing quarantined.
    let logs = agent.logs();
    for t in ["states", "userattributes"] {
        assert!(
            logs.contains(&format!("table={t}")),
            "{t} not read:\n{}",
            agent.log_tail(40)
        );
    }
}
