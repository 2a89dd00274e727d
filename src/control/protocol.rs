//! The control socket's protocol: what the commands ask a running agent ([`Request`]) and what
//! it answers ([`Answer`]), as serde types, and the one client call, [`ask`].
//!
//! # Wire format
//!
//! One request per connection. The client writes the [`Request`] as one line of JSON
//! (`{"request":"files","state":"held"}`); the agent answers one line of JSON and closes: the
//! [`Answer`] (`{"answer":"files","value":[...]}`), or `{"error":"..."}` when it cannot
//! answer. Client and agent are the same binary, but during a package upgrade the new
//! `status` may meet the old agent still running, which knew only the line `status` (answered
//! with the bare report) and answers anything else with `{"error":"unknown request"}`: `ask`
//! then asks for the status that older way.
//!
//! The values inside the answers are the documented JSON outputs (`status --json`: the
//! [`StatusReport`]; `files --json`: [`FileEntry`]; `dead-letter list --json`:
//! [`crate::deadletter::Entry`]; ...), so the commands print them as they come.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::files::FileEntry;
use super::socket::{QueryError, exchange};
use super::status::StatusReport;
use crate::deadletter::{self, RetryOutcome};

/// What a command asks the running agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "kebab-case")]
pub(crate) enum Request {
    /// `status`: the [`StatusReport`].
    Status,
    /// `files [--state STATE]`.
    Files { state: Option<String> },
    /// `replay PATH...`, the paths absolute.
    Replay { paths: Vec<PathBuf> },
    /// `dead-letter list | show | retry | purge`.
    DeadLetter(DeadLetterRequest),
    /// `catalog show [ID]`.
    CatalogShow { id: Option<u64> },
}

/// The `dead-letter` requests; answered by the agent, or on a stopped agent's spool, by
/// [`crate::deadletter::answer`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "kebab-case")]
pub(crate) enum DeadLetterRequest {
    List,
    Show {
        id: u64,
    },
    /// All entries when `ids` is empty.
    Retry {
        ids: Vec<u64>,
    },
    /// All entries when `ids` is empty.
    Purge {
        ids: Vec<u64>,
    },
}

/// What the agent answers, one variant per request (an error travels beside it, see the
/// module doc).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "answer", content = "value", rename_all = "kebab-case")]
pub(crate) enum Answer {
    Status(Box<StatusReport>),
    Files(Vec<FileEntry>),
    Replay(Replayed),
    DeadLetters(Vec<deadletter::Entry>),
    DeadLetter(Box<deadletter::Shown>),
    Retried(RetryOutcome),
    Purged(u64),
    Catalog(Box<crate::catalog::Shown>),
}

/// The answer to a replay: the files handed to the reader, and why the rest were not.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Replayed {
    pub started: Vec<ReplayStarted>,
    /// Set when a file could not be handed over; the files after it were not tried.
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ReplayStarted {
    pub path: PathBuf,
    /// The file's id in the spool (see `files`).
    pub id: u64,
}

/// The answer the agent could not give, as it travels.
#[derive(Serialize, Deserialize)]
struct Refusal {
    error: String,
}

/// The line the agent writes for `answer` (without its newline).
pub(crate) fn encode_answer(answer: &Result<Answer, String>) -> Vec<u8> {
    let encoded = match answer {
        Ok(a) => serde_json::to_vec(a),
        Err(error) => serde_json::to_vec(&Refusal {
            error: error.clone(),
        }),
    };
    encoded.unwrap_or_else(|_| br#"{"error":"cannot encode the answer"}"#.to_vec())
}

/// The request in a line the agent read; `Err` is the error to answer with.
pub(crate) fn decode_request(line: &[u8]) -> Result<Request, String> {
    serde_json::from_slice(line.trim_ascii()).map_err(|_| UNKNOWN_REQUEST.to_owned())
}

/// What the agent said in `line`: its answer, or the error it answered with.
fn decode_answer(line: &[u8]) -> Result<Result<Answer, String>, String> {
    if line.is_empty() {
        return Err("the connection closed without an answer".into());
    }
    let value: serde_json::Value =
        serde_json::from_slice(line).map_err(|e| format!("not JSON ({e})"))?;
    if let Some(err) = value.get("error") {
        return Ok(Err(err
            .as_str()
            .map_or_else(|| err.to_string(), str::to_owned)));
    }
    serde_json::from_value(value)
        .map(Ok)
        .map_err(|e| format!("not an answer ({e})"))
}

/// Sends `request` to the agent on the socket at `path` and decodes its answer (blocking; for
/// the commands). `timeout` bounds each read and write. An error answer is
/// [`QueryError::Agent`]; no agent at all is [`QueryError::NoDaemon`].
pub(crate) fn ask(path: &Path, request: &Request, timeout: Duration) -> Result<Answer, QueryError> {
    let line = serde_json::to_string(request).expect("a request serializes");
    let reply = exchange(path, &line, timeout)?;
    let answer = match decode_answer(&reply) {
        Ok(Err(message)) if message == UNKNOWN_REQUEST && *request == Request::Status => {
            // An agent from before this protocol (see the module doc).
            decode_legacy_status(&exchange(path, "status", timeout)?)
                .map(|report| Ok(Answer::Status(Box::new(report))))
        }
        decoded => decoded,
    };
    match answer {
        Ok(Ok(answer)) => Ok(answer),
        Ok(Err(message)) => Err(QueryError::Agent {
            path: path.to_path_buf(),
            message,
        }),
        Err(detail) => Err(QueryError::Protocol {
            path: path.to_path_buf(),
            detail,
        }),
    }
}

/// What an agent answers a line it cannot parse, older agents included.
const UNKNOWN_REQUEST: &str = "unknown request";

/// The bare [`StatusReport`] an agent from before this protocol answers `status` with. Its
/// fields all have defaults (for version skew), so `state` is what tells a report from any
/// other object.
fn decode_legacy_status(line: &[u8]) -> Result<StatusReport, String> {
    let value: serde_json::Value =
        serde_json::from_slice(line).map_err(|e| format!("not JSON ({e})"))?;
    if !value.get("state").is_some_and(serde_json::Value::is_string) {
        return Err("not a status report: no \"state\" field".into());
    }
    serde_json::from_value(value).map_err(|e| format!("not a status report ({e})"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip_request(r: Request) {
        let line = serde_json::to_vec(&r).unwrap();
        assert!(!line.contains(&b'\n'), "one line");
        assert_eq!(decode_request(&line), Ok(r));
    }

    #[test]
    fn every_request_goes_through_the_wire_unchanged() {
        round_trip_request(Request::Status);
        round_trip_request(Request::Files { state: None });
        round_trip_request(Request::Files {
            state: Some("held".into()),
        });
        round_trip_request(Request::Replay {
            paths: vec!["/data/a b.json".into(), "/data/dir".into()],
        });
        round_trip_request(Request::DeadLetter(DeadLetterRequest::List));
        round_trip_request(Request::DeadLetter(DeadLetterRequest::Show { id: 7 }));
        round_trip_request(Request::DeadLetter(DeadLetterRequest::Retry {
            ids: vec![],
        }));
        round_trip_request(Request::DeadLetter(DeadLetterRequest::Purge {
            ids: vec![1, u64::MAX],
        }));
        round_trip_request(Request::CatalogShow { id: None });
        round_trip_request(Request::CatalogShow {
            id: Some(5175843646007627),
        });
    }

    #[test]
    fn the_request_names_are_readable() {
        let line = serde_json::to_string(&Request::Files {
            state: Some("held".into()),
        })
        .unwrap();
        assert_eq!(line, r#"{"request":"files","state":"held"}"#);
        let line =
            serde_json::to_string(&Request::DeadLetter(DeadLetterRequest::Show { id: 3 })).unwrap();
        assert_eq!(line, r#"{"request":"dead-letter","action":"show","id":3}"#);
    }

    #[test]
    fn every_answer_goes_through_the_wire_unchanged() {
        let entry = deadletter::Entry {
            id: 9,
            kind: "dead-letter".into(),
            time: "2026-01-01T00:00:00.000Z".into(),
            file: Some("a.json".into()),
            line: Some(3),
            reason: "refused".into(),
            status: Some(400),
            message_id: Some("lp-e-1".into()),
        };
        let answers = [
            Answer::Status(Box::new(StatusReport {
                state: "running".into(),
                pid: Some(7),
                notes: vec!["hello".into()],
                ..StatusReport::default()
            })),
            Answer::Files(vec![FileEntry {
                id: 1,
                path: "in/a.json".into(),
                format: Some("sessions".into()),
                gzip: true,
                size: 10,
                offset: 10,
                line: 2,
                events_read: 3,
                events_queued: 1,
                events_delivered: 2,
                state: "done".into(),
                reason: None,
                replay: false,
            }]),
            Answer::Replay(Replayed {
                started: vec![ReplayStarted {
                    path: "/data/a.json".into(),
                    id: 4,
                }],
                error: Some("/data/b.json: gone".into()),
            }),
            Answer::DeadLetters(vec![entry.clone()]),
            Answer::DeadLetter(Box::new(deadletter::Shown {
                entry,
                content_kind: "event".into(),
                content: "{}".into(),
            })),
            Answer::Retried(RetryOutcome {
                requeued: 1,
                recovered: 2,
                still_bad: vec![(5, "still bad".into())],
            }),
            Answer::Purged(3),
            Answer::Catalog(Box::default()),
        ];
        for a in answers {
            let line = encode_answer(&Ok(a.clone()));
            assert_eq!(decode_answer(&line), Ok(Ok(a)));
        }
    }

    #[test]
    fn errors_and_garbage_are_told_apart() {
        let line = encode_answer(&Err("no entry 5".into()));
        assert_eq!(line, br#"{"error":"no entry 5"}"#);
        assert_eq!(decode_answer(&line), Ok(Err("no entry 5".into())));
        assert!(decode_answer(b"").is_err());
        assert!(decode_answer(b"HTTP/1.0 400 Bad Request").is_err());
        assert!(decode_answer(br#"{"answer":"nonsense"}"#).is_err());
        assert_eq!(decode_request(b"status\n"), Err("unknown request".into()));
    }

    /// An agent from before this protocol, on a real socket: it knows only the line `status`.
    #[test]
    fn status_from_an_older_agent() {
        use std::io::{BufRead as _, Write as _};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let report = StatusReport {
            state: "running".into(),
            pid: Some(7),
            ..StatusReport::default()
        };
        let old = {
            let line = serde_json::to_string(&report).unwrap();
            std::thread::spawn(move || {
                for _ in 0..2 {
                    let (conn, _) = listener.accept().unwrap();
                    let mut request = String::new();
                    std::io::BufReader::new(&conn)
                        .read_line(&mut request)
                        .unwrap();
                    let answer = match request.trim() {
                        "status" => line.clone(),
                        _ => r#"{"error":"unknown request"}"#.to_owned(),
                    };
                    (&conn).write_all(format!("{answer}\n").as_bytes()).unwrap();
                }
            })
        };
        let got = ask(&path, &Request::Status, Duration::from_secs(5)).unwrap();
        assert_eq!(got, Answer::Status(Box::new(report)));
        old.join().unwrap();
    }

    #[test]
    fn an_older_agents_bare_report_is_read() {
        let report = StatusReport {
            state: "running".into(),
            pid: Some(7),
            ..StatusReport::default()
        };
        let line = serde_json::to_vec(&report).unwrap();
        assert_eq!(decode_legacy_status(&line), Ok(report));
        assert!(decode_legacy_status(b"{}").is_err());
        assert!(decode_legacy_status(b"[1]").is_err());
    }
}
