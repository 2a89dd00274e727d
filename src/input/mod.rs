//! Reading Leanplum files (SPEC sections 4, 7, 8): content-based format detection (gzip magic,
//! JSON lines, CSV header) and a streaming [`Reader`] that yields one record at a time with the
//! decompressed byte offset just past it, which ingest commits to resume from after a crash.
//!
//! Memory is bounded whatever the file: a 128 KiB read buffer plus one record of at most the
//! reader's limit (`watch.max_line_bytes`, 64 MiB by default: one session is one line, and an
//! active user's is megabytes), parsed while nothing else of the file is held. A longer record
//! is a [`BadRecord`] naming its size; a buffer grown by a long record is given back after it.
//! A bad record is an [`Item`] carrying a [`BadRecord`], never an error that stops the file;
//! only stream-level failures (I/O, truncated or corrupt gzip) end a file.
//!
//! Ingest reads a file on one thread and parses it on several: `Reader::fill_batch` frames
//! records into batches of raw bytes without parsing them, and `Parser::items` turns a batch
//! into the very items `next_item` gives (`batch.rs`). The batches in flight are bounded by
//! the caller (`crate::ingest`); each record in them is still at most the limit.
//!
//! Offsets are positions in the *decompressed* stream, counting every byte (a BOM, blank lines,
//! `\r`). Resuming a gzip file decompresses and discards up to the offset; resuming any file reads
//! through the skipped part to count its lines, so line numbers stay right after a restart.

mod batch;
mod csv;
mod detect;
pub(crate) mod leanplum_csv;
mod lines;

use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::path::Path;

use flate2::read::MultiGzDecoder;

use crate::leanplum::{Engagement, Session};
use batch::is_blank;
pub(crate) use batch::{Filled, Parser, RawBatch};
pub(crate) use detect::detect;
use detect::{BOM, FORMAT_PROBE_BYTES};
use lines::{Framing, LineReader};

/// How much of an offending record a [`BadRecord`] keeps, for the quarantine.
pub(crate) const BAD_RECORD_RAW_BYTES: usize = 4 << 10;

/// Read buffer over the decompressed stream.
const STREAM_BUFFER_BYTES: usize = 128 << 10;

/// The three input formats of SPEC section 4; any of them may be gzipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Format {
    /// Leanplum session export: one session object per line.
    Sessions,
    /// Flat engagement records, one JSON object per line.
    EngagementJson,
    /// Flat engagement records, CSV with a header row.
    EngagementCsv,
}

impl Format {
    /// A stable name for logs and status.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Format::Sessions => "sessions",
            Format::EngagementJson => "engagement-json",
            Format::EngagementCsv => "engagement-csv",
        }
    }
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One parsed record. Serialized only to park it (see `crate::catalog::parking`).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
#[allow(
    clippy::large_enum_variant,
    reason = "records are made one at a time and moved once; boxing engagements too would add an allocation per row for nothing"
)]
pub(crate) enum Record {
    /// Boxed: a session owns its states and events and is the larger of the two.
    Session(Box<Session>),
    Engagement(Engagement),
}

/// A record that could not be parsed; it goes to the quarantine, the file goes on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BadRecord {
    /// One line, naming the problem (serde_json's messages include the column).
    pub reason: String,
    /// The offending record, at most its first [`BAD_RECORD_RAW_BYTES`] bytes.
    pub raw: Vec<u8>,
}

/// One record read from a file, good or bad, with where it ends.
#[derive(Debug, Clone)]
pub(crate) struct Item {
    /// 1-based line number of the record's first line in the decompressed file.
    pub line: u64,
    /// Offset in the decompressed stream just past this record, including its newline: resume
    /// here to read the records after it.
    pub end_offset: u64,
    /// False only for a last line with no terminating newline: the writer may still be
    /// appending to it, so ingest must not commit past it until the file has settled.
    pub complete: bool,
    pub result: Result<Record, BadRecord>,
}

/// Why a file cannot be read (further). The messages do not name the file: callers add the path.
#[derive(thiserror::Error, Debug)]
pub(crate) enum InputError {
    /// Opening or reading the file failed.
    #[error("I/O error: {source}")]
    Io {
        #[from]
        source: io::Error,
    },
    /// No data at all, or only whitespace.
    #[error("file is empty")]
    Empty,
    /// Neither session JSON lines, engagement JSON lines nor engagement CSV (binary files too).
    #[error("unknown format: {reason}")]
    UnknownFormat { reason: String },
    /// The gzip stream ends early (a file still being written, or a cut copy). Everything decoded
    /// before the cut has been yielded.
    #[error("gzip stream is truncated after {decoded_bytes} decompressed bytes")]
    TruncatedGzip { decoded_bytes: u64 },
    /// The gzip stream is damaged (bad deflate data, checksum mismatch, garbage after a member).
    #[error("gzip stream is corrupt after {decoded_bytes} decompressed bytes: {reason}")]
    CorruptGzip { decoded_bytes: u64, reason: String },
    /// A resume offset that does not fit this file: it was truncated, replaced or rewritten.
    #[error("cannot resume at byte {offset}: {reason}")]
    BadOffset { offset: u64, reason: &'static str },
}

/// A streaming reader over one file: detection happened at [`Reader::open`], records come from
/// [`Reader::next_item`].
pub(crate) struct Reader {
    gzip: bool,
    lines: LineReader<BufReader<Box<dyn Read + Send>>>,
    /// The format, the CSV header and the record limit: what parses a framed record.
    parser: Parser,
    /// Set after the end of input or a stream error: nothing more will be read.
    done: bool,
}

impl Reader {
    /// Opens `path`, detects its format by content, and positions it at `start_offset` (a byte
    /// offset in the decompressed stream, previously returned as an `end_offset`; 0 for a new
    /// file). A CSV header is always read from the start of the file first.
    ///
    /// `max_line_bytes` (`watch.max_line_bytes`) is the longest record read: a longer one is a
    /// [`BadRecord`] naming its size, read past without being stored (SPEC section 8).
    pub(crate) fn open(
        path: &Path,
        start_offset: u64,
        max_line_bytes: usize,
    ) -> Result<Reader, InputError> {
        let mut file = File::open(path)?;
        let gzip = starts_with_gzip_magic(&mut file)?;
        let format = detect_file(&file, gzip)?;
        // The probe shared this descriptor's position; rewind for the real pass.
        file.seek(SeekFrom::Start(0))?;
        let mut reader = Reader {
            gzip,
            lines: LineReader::new(
                BufReader::with_capacity(STREAM_BUFFER_BYTES, decoded(file, gzip)),
                max_line_bytes,
            ),
            parser: Parser {
                format,
                header: Vec::new(),
                max_line_bytes,
            },
            done: false,
        };
        if format == Format::EngagementCsv {
            reader.read_header()?;
        }
        reader.skip_to(start_offset)?;
        Ok(reader)
    }

    pub(crate) fn format(&self) -> Format {
        self.parser.format
    }

    pub(crate) fn is_gzip(&self) -> bool {
        self.gzip
    }

    /// Decompressed bytes consumed so far. After `next_item` has returned `None` this is the
    /// length of the decompressed stream, including trailing blank lines that yield no item.
    pub(crate) fn offset(&self) -> u64 {
        self.lines.offset()
    }

    /// The next record, or `None` at the end of input. An `Err` is a stream-level failure (I/O
    /// error, truncated or corrupt gzip): it is returned once, then `None`; items already
    /// returned stay valid.
    pub(crate) fn next_item(&mut self) -> Option<Result<Item, InputError>> {
        let framing = self.framing();
        while !self.done {
            let raw = match self.lines.read_record(framing) {
                Ok(Some(raw)) => raw,
                Ok(None) => break,
                Err(e) => {
                    self.done = true;
                    return Some(Err(self.stream_error(e)));
                }
            };
            let bytes = record_text(self.lines.record(), raw.start);
            if is_blank(&raw, bytes) {
                continue;
            }
            let item = self.parser.item(&raw, bytes, self.lines.offset());
            // The record is parsed into owned values: a buffer a long one grew goes back now,
            // before the record is mapped.
            self.lines.release_large_buffer();
            return Some(Ok(item));
        }
        self.done = true;
        None
    }

    /// Where this format's records end.
    fn framing(&self) -> Framing {
        match self.parser.format {
            Format::EngagementCsv => Framing::Csv,
            Format::Sessions | Format::EngagementJson => Framing::Lines,
        }
    }

    /// Reads the CSV header row (the first non-blank record).
    fn read_header(&mut self) -> Result<(), InputError> {
        // As detection does: the BOM is not part of the first column's framing.
        self.lines.skip_bom().map_err(|e| self.stream_error(e))?;
        loop {
            let raw = match self.lines.read_record(Framing::Csv) {
                Ok(Some(raw)) => raw,
                Ok(None) => return Err(InputError::Empty),
                Err(e) => return Err(self.stream_error(e)),
            };
            let bytes = record_text(self.lines.record(), raw.start);
            if bytes.trim_ascii().is_empty() {
                continue;
            }
            // Detection already vetted this header within the first 64 KiB; these only guard
            // against the file changing between the probe and now.
            let header = match std::str::from_utf8(bytes) {
                Ok(header) if !raw.overflow => header,
                _ => {
                    return Err(InputError::UnknownFormat {
                        reason: "CSV header changed while opening".into(),
                    });
                }
            };
            // Leading blanks before a quoted first name are not part of it (detection skips
            // them too).
            self.parser.header = csv::header_names(header.trim_start());
            return Ok(());
        }
    }

    /// Moves to `target`, which must be a record boundary at or after the current position
    /// (the start, or the end of a CSV header).
    fn skip_to(&mut self, target: u64) -> Result<(), InputError> {
        let here = self.lines.offset();
        if target == here || target == 0 {
            return Ok(());
        }
        if target < here {
            return Err(InputError::BadOffset {
                offset: target,
                reason: "inside the CSV header",
            });
        }
        let reached = self
            .lines
            .skip_to(target)
            .map_err(|e| self.stream_error(e))?;
        if !reached {
            return Err(InputError::BadOffset {
                offset: target,
                reason: "past the end of the data",
            });
        }
        // A committed offset is just past a newline, except after a partial last line that was
        // committed once the file settled: resuming there is fine only if nothing was appended.
        if self.lines.last_byte() != Some(b'\n')
            && !self.lines.at_eof().map_err(|e| self.stream_error(e))?
        {
            return Err(InputError::BadOffset {
                offset: target,
                reason: "not at the start of a line",
            });
        }
        Ok(())
    }

    fn stream_error(&self, e: io::Error) -> InputError {
        classify(e, self.gzip, self.lines.offset())
    }
}

/// The reason of a record over the limit, with both sizes: `line of 70,123,456 bytes is over
/// watch.max_line_bytes (67,108,864)`. [`over_limit_size`] reads the size back.
pub(crate) fn over_limit_reason(what: &str, len: u64, limit: usize) -> String {
    format!(
        "{what} of {} bytes is over watch.max_line_bytes ({})",
        thousands(len),
        thousands(limit as u64)
    )
}

/// The record size a reason built by [`over_limit_reason`] names (also inside a longer reason,
/// `retry failed: line of N bytes ... watch.max_line_bytes ...`); `None` for any other reason.
pub(crate) fn over_limit_size(reason: &str) -> Option<u64> {
    let before = &reason[..reason.find("watch.max_line_bytes")?];
    let (_, size) = before.rsplit_once("of ")?;
    let (digits, _) = size.split_once(" bytes ")?;
    if !digits.bytes().all(|b| b.is_ascii_digit() || b == b',') {
        return None;
    }
    digits.replace(',', "").parse().ok()
}

/// `70123456` -> `70,123,456`.
pub(crate) fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Parses one record of `format` (`header`: the CSV columns, trimmed and lowercased; empty for
/// JSON). Used by the reader, and by `dead-letter retry` on a quarantined line.
pub(crate) fn parse_record(
    format: Format,
    header: &[String],
    bytes: &[u8],
) -> Result<Record, String> {
    let text = std::str::from_utf8(bytes)
        .map_err(|e| format!("invalid UTF-8 at byte {} of the record", e.valid_up_to()))?;
    if format != Format::EngagementCsv && !text.trim_start().starts_with('{') {
        // Serde would read a struct from an array of its fields in order; a line that is not
        // an object is never a session or an engagement.
        return Err(format!(
            "not a JSON object (starts with {:?})",
            text.trim_start().chars().next().unwrap_or(' ')
        ));
    }
    match format {
        Format::Sessions => Session::from_line(text)
            .map(|s| Record::Session(Box::new(s)))
            .map_err(|e| format!("not a session: {e}")),
        Format::EngagementJson => {
            let map = serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(text)
                .map_err(|e| format!("not an engagement object: {e}"))?;
            Engagement::from_json_map(&map).map(Record::Engagement)
        }
        Format::EngagementCsv => {
            let cells = csv::split_record(text);
            if cells.len() != header.len() {
                return Err(format!(
                    "row has {} fields but the header has {}",
                    cells.len(),
                    header.len()
                ));
            }
            let fields: Vec<(String, String)> = header
                .iter()
                .zip(cells)
                .filter(|(_, cell)| !cell.is_empty())
                .map(|(name, cell)| (name.clone(), cell))
                .collect();
            Engagement::from_fields(&fields).map(Record::Engagement)
        }
    }
}

/// Maps a read error to what it means for this file. Reading a plain file never reports
/// `UnexpectedEof` or `InvalidInput`, so for a gzip file those come from the decoder.
fn classify(e: io::Error, gzip: bool, decoded_bytes: u64) -> InputError {
    match e.kind() {
        io::ErrorKind::UnexpectedEof if gzip => InputError::TruncatedGzip { decoded_bytes },
        io::ErrorKind::InvalidInput | io::ErrorKind::InvalidData if gzip => {
            InputError::CorruptGzip {
                decoded_bytes,
                reason: e.to_string(),
            }
        }
        _ => InputError::Io { source: e },
    }
}

/// A record's bytes as parsed: without the BOM at the very start of the file, nor the `\r` of
/// a CRLF line ending.
fn record_text(record: &[u8], start: u64) -> &[u8] {
    let record = if start == 0 {
        record.strip_prefix(BOM).unwrap_or(record)
    } else {
        record
    };
    record.strip_suffix(b"\r").unwrap_or(record)
}

fn bad(reason: impl Into<String>, bytes: &[u8]) -> BadRecord {
    BadRecord {
        reason: reason.into(),
        raw: bytes[..bytes.len().min(BAD_RECORD_RAW_BYTES)].to_vec(),
    }
}

/// gzip's first two bytes (RFC 1952, ID1 ID2).
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// Whether a file whose first bytes are `head` is gzip: the one check, for reading and for
/// file identity. Any format may be gzipped, whatever the name says.
pub(crate) fn is_gzip(head: &[u8]) -> bool {
    head.starts_with(&GZIP_MAGIC)
}

/// Reads the first two bytes and rewinds: [`is_gzip`] on an open file.
fn starts_with_gzip_magic(file: &mut File) -> Result<bool, InputError> {
    let mut magic = [0u8; 2];
    let mut got = 0;
    while got < magic.len() {
        match file.read(&mut magic[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        }
    }
    if got == 0 {
        return Err(InputError::Empty);
    }
    file.seek(SeekFrom::Start(0))?;
    Ok(is_gzip(&magic[..got]))
}

fn decoded(file: File, gzip: bool) -> Box<dyn Read + Send> {
    if gzip {
        // Multi-member: `cat a.gz b.gz` and some exporters write several members per file.
        Box::new(MultiGzDecoder::new(file))
    } else {
        Box::new(file)
    }
}

/// Decompresses the first [`FORMAT_PROBE_BYTES`] through a duplicate descriptor and detects the format.
fn detect_file(file: &File, gzip: bool) -> Result<Format, InputError> {
    let mut probe = decoded(file.try_clone()?, gzip);
    let mut head = vec![0u8; FORMAT_PROBE_BYTES];
    let mut got = 0;
    while got < head.len() {
        match probe.read(&mut head[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            // A gzip cut or damaged early: detect on what decoded; the reading pass meets the
            // same error at the same place and reports it after the good records.
            Err(_) if got > 0 && gzip => break,
            Err(e) => return Err(classify(e, gzip, 0)),
        }
    }
    head.truncate(got);
    match detect(&head) {
        // 64 KiB of whitespace is not an empty file, and not one we understand either.
        Err(InputError::Empty) if got == FORMAT_PROBE_BYTES => Err(InputError::UnknownFormat {
            reason: "more than 64 KiB of leading whitespace".into(),
        }),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::Compression;
    use flate2::write::GzEncoder;
    use std::io::Write;
    use std::path::PathBuf;

    const SESSION_A: &str = r#"{"sessionId":"1","deviceId":"d1","time":1793534899.6,"states":[{"events":[{"eventId":9178288208762825810,"name":".m1 Open","time":1793534900.1}]}]}"#;
    const SESSION_B: &str = r#"{"sessionId":"2","userId":"u2","time":"1.7935349E+09"}"#;
    const ENGAGEMENT: &str =
        r#"{"event":"Open","user_id":"u","timestamp":1793610000123,"message_id":"5"}"#;
    const CSV: &str = "event,user_id,timestamp,message_id\nOpen,u,1793610000123,5\n";
    /// `watch.max_line_bytes` unless a test says otherwise.
    const LIMIT: usize = crate::config::DEFAULT_MAX_LINE_BYTES;

    fn file(dir: &tempfile::TempDir, name: &str, bytes: &[u8]) -> PathBuf {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    }

    fn gz(bytes: &[u8]) -> Vec<u8> {
        let mut enc = GzEncoder::new(Vec::new(), Compression::default());
        enc.write_all(bytes).unwrap();
        enc.finish().unwrap()
    }

    /// Every item from `offset` on; a stream error fails the test.
    fn items(path: &Path, offset: u64) -> Vec<Item> {
        let mut reader = Reader::open(path, offset, LIMIT).unwrap();
        let mut out = Vec::new();
        while let Some(item) = reader.next_item() {
            out.push(item.unwrap());
        }
        out
    }

    /// Items as comparable text (sessions have no `PartialEq`).
    fn shown(items: &[Item]) -> Vec<String> {
        items.iter().map(|i| format!("{i:?}")).collect()
    }

    fn bad_reason(item: &Item) -> &str {
        match &item.result {
            Err(bad) => &bad.reason,
            Ok(record) => panic!("expected a bad record, got {record:?}"),
        }
    }

    fn open_err(path: &Path, offset: u64) -> InputError {
        match Reader::open(path, offset, LIMIT) {
            Err(e) => e,
            Ok(r) => panic!("expected an error, opened as {}", r.format()),
        }
    }

    #[test]
    fn detection_by_content_plain_and_gzipped() {
        let dir = tempfile::tempdir().unwrap();
        let sessions = format!("{SESSION_A}\n{SESSION_B}\n");
        let cases: [(&str, &[u8], Format); 4] = [
            ("s", sessions.as_bytes(), Format::Sessions),
            ("e", ENGAGEMENT.as_bytes(), Format::EngagementJson),
            ("c", CSV.as_bytes(), Format::EngagementCsv),
            (
                "bom",
                &[BOM, CSV.as_bytes()].concat(),
                Format::EngagementCsv,
            ),
        ];
        for (name, bytes, format) in cases {
            for gzip in [false, true] {
                let bytes = if gzip { gz(bytes) } else { bytes.to_vec() };
                // Names carry no hint: `.csv` on a gzipped JSON file changes nothing.
                let path = file(&dir, &format!("{name}-{gzip}.csv"), &bytes);
                let reader = Reader::open(&path, 0, LIMIT).unwrap();
                assert_eq!(
                    (reader.format(), reader.is_gzip()),
                    (format, gzip),
                    "{name}"
                );
            }
        }
        let bom_items = items(&file(&dir, "bom2", &[BOM, CSV.as_bytes()].concat()), 0);
        assert!(bom_items[0].result.is_ok());

        for (name, bytes) in [("empty", &b""[..]), ("ws", b" \n\r\n\t ")] {
            let err = open_err(&file(&dir, name, bytes), 0);
            assert!(matches!(err, InputError::Empty), "{name}: {err}");
            let err = open_err(&file(&dir, &format!("{name}.gz"), &gz(bytes)), 0);
            assert!(matches!(err, InputError::Empty), "{name}.gz: {err}");
        }
        let garbage: Vec<u8> = (0..4096u32).map(|i| (i * 7919 % 251) as u8).collect();
        for (name, bytes) in [
            ("garbage", garbage.as_slice()),
            ("array", br#"[{"event":"Open"}]"#.as_slice()),
            ("no-event-column", b"user_id,timestamp\nu,1\n".as_slice()),
        ] {
            let err = open_err(&file(&dir, name, bytes), 0);
            assert!(
                matches!(err, InputError::UnknownFormat { .. }),
                "{name}: {err}"
            );
        }
        let err = open_err(&dir.path().join("missing"), 0);
        assert!(matches!(err, InputError::Io { .. }), "{err}");
    }

    #[test]
    fn resuming_at_every_end_offset_yields_exactly_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let sessions = format!("{SESSION_A}\n\n{SESSION_B}\r\nnot json\n{SESSION_A}\n  \n");
        let csv = format!("{CSV}\nClick,\"two\nlines\",1793610000,6\r\nbad,1\nOpen,,1,7");
        let cases = [
            ("plain", sessions.as_bytes().to_vec()),
            ("gzip", gz(sessions.as_bytes())),
            ("csv", csv.as_bytes().to_vec()),
            ("csv.gz", gz(csv.as_bytes())),
        ];
        for (name, bytes) in cases {
            let path = file(&dir, name, &bytes);
            let all = items(&path, 0);
            assert_eq!(all.len(), 4, "{name}");
            for (i, item) in all.iter().enumerate() {
                let rest = items(&path, item.end_offset);
                assert_eq!(shown(&rest), shown(&all[i + 1..]), "{name} after item {i}");
            }
        }
        let plain = items(&file(&dir, "p2", sessions.as_bytes()), 0);
        let lines: Vec<u64> = plain.iter().map(|i| i.line).collect();
        assert_eq!(lines, [1, 3, 4, 5]);
        let csv_items = items(&file(&dir, "c2", csv.as_bytes()), 0);
        let lines: Vec<u64> = csv_items.iter().map(|i| i.line).collect();
        assert_eq!(lines, [2, 4, 6, 7]);
        assert_eq!(csv_items[3].end_offset, csv.len() as u64);
        assert!(bad_reason(&csv_items[2]).contains("2 fields but the header has 4"));
    }

    #[test]
    fn offsets_that_do_not_fit_the_file_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let text = format!("{SESSION_A}\n{SESSION_B}\n");
        let path = file(&dir, "s", text.as_bytes());
        let cases = [
            (3, "not at the start of a line"),
            (text.len() as u64 + 1, "past the end"),
        ];
        for (offset, why) in cases {
            let err = open_err(&path, offset);
            assert!(err.to_string().contains(why), "{offset}: {err}");
        }
        let csv = file(&dir, "c", CSV.as_bytes());
        let err = open_err(&csv, 4);
        assert!(err.to_string().contains("inside the CSV header"), "{err}");
        // The end of a partial last line is a valid place to stop, as long as nothing follows.
        let partial = file(&dir, "p", format!("{SESSION_A}\n{SESSION_B}").as_bytes());
        let all = items(&partial, 0);
        assert!(items(&partial, all[1].end_offset).is_empty());
        let mut grown = std::fs::OpenOptions::new()
            .append(true)
            .open(&partial)
            .unwrap();
        grown.write_all(b"xyz\n").unwrap();
        let err = open_err(&partial, all[1].end_offset);
        assert!(
            err.to_string().contains("not at the start of a line"),
            "{err}"
        );
    }

    #[test]
    fn csv_headers_after_blanks_or_a_bom_frame_like_detection_does() {
        // Found by fuzzing: detection skipped these, the reader did not.
        let dir = tempfile::tempdir().unwrap();
        for (name, bytes) in [
            ("blank", &b" \"event\",timestamp\nOpen,1793610000\n"[..]),
            (
                "tab",
                &b"\t\"Event\",\"timestamp\"\r\nOpen,1793610000\r\n"[..],
            ),
            (
                "bom",
                &b"\xEF\xBB\xBF\"a\nb\",event,timestamp\nx,Open,1793610000\n"[..],
            ),
        ] {
            let got = items(&file(&dir, name, bytes), 0);
            assert_eq!(got.len(), 1, "{name}");
            assert!(
                got[0].result.is_ok(),
                "{name}: {:?}",
                got[0].result.as_ref().err()
            );
        }
    }

    #[test]
    fn a_partial_last_line_is_marked_incomplete() {
        let dir = tempfile::tempdir().unwrap();
        let text = format!("{SESSION_A}\n{SESSION_B}");
        for (name, bytes) in [("p", text.as_bytes().to_vec()), ("g", gz(text.as_bytes()))] {
            let all = items(&file(&dir, name, &bytes), 0);
            let complete: Vec<bool> = all.iter().map(|i| i.complete).collect();
            assert_eq!(complete, [true, false]);
            assert_eq!(all[1].end_offset, text.len() as u64);
            assert!(
                all[1].result.is_ok(),
                "a partial line still parses if it can"
            );
        }
    }

    /// Every item of `path` read with the limit `limit`, and the record buffer's capacity after
    /// each one.
    fn items_with_limit(path: &Path, limit: usize) -> Vec<(Item, usize)> {
        let mut reader = Reader::open(path, 0, limit).unwrap();
        let mut out = Vec::new();
        while let Some(item) = reader.next_item() {
            out.push((item.unwrap(), reader.lines.buffer_capacity()));
        }
        out
    }

    /// A session line of `events` app events, each with parameters, then one email open
    /// (`.m5 Open`); about 135 bytes per event.
    fn big_session(events: usize) -> String {
        let mut line = String::from(
            r#"{"sessionId":"9","deviceId":"d9","time":1793534899.6,"states":[{"events":["#,
        );
        for i in 0..events {
            line.push_str(&format!(
                r#"{{"eventId":{i},"name":"Add To Cart","time":1793534900.{i},"parameters":{{"sku":"SKU-{i:08}","price":{i}.99,"note":"{}"}}}},"#,
                "n".repeat(i % 50)
            ));
        }
        line.push_str(r#"{"eventId":99999999,"name":".m5 Open","time":1793534999.5}]}]}"#);
        line
    }

    #[test]
    fn a_line_over_the_limit_is_one_bad_record_naming_its_size() {
        let dir = tempfile::tempdir().unwrap();
        let limit = 100_000;
        let mut text = format!("{SESSION_A}\n").into_bytes();
        let long_start = text.len();
        text.extend(std::iter::repeat_n(b'x', 3 * limit + 7));
        text.push(b'\n');
        let long_end = text.len() as u64;
        text.extend_from_slice(format!("{SESSION_B}\n").as_bytes());
        for (name, bytes) in [("p", text.clone()), ("g", gz(&text))] {
            let all = items_with_limit(&file(&dir, name, &bytes), limit);
            assert_eq!(all.len(), 3, "{name}");
            assert_eq!(
                bad_reason(&all[1].0),
                "line of 300,007 bytes is over watch.max_line_bytes (100,000)"
            );
            let Err(bad) = &all[1].0.result else {
                unreachable!()
            };
            assert_eq!(
                bad.raw,
                &text[long_start..long_start + BAD_RECORD_RAW_BYTES]
            );
            assert_eq!((all[1].0.line, all[1].0.end_offset), (2, long_end));
            assert!(all[2].0.result.is_ok() && all[2].0.line == 3);
            for (item, capacity) in &all {
                assert!(*capacity <= limit, "{name} line {}: {capacity}", item.line);
            }
            // Only the start of the long line stays, for the quarantine.
            assert!(all[1].1 <= lines::OVERFLOW_KEEP_BYTES, "{}", all[1].1);
        }
        // A CSV record says so, and a partial last line is counted to its end.
        let row = format!("Open,u,1,\"{}\"", "y".repeat(1989));
        assert_eq!(row.len(), 2000);
        let csv = format!("{CSV}{row}");
        let all = items_with_limit(&file(&dir, "c", csv.as_bytes()), 1024);
        assert_eq!(
            bad_reason(&all[1].0),
            "record of 2,000 bytes is over watch.max_line_bytes (1,024)"
        );
        assert!(!all[1].0.complete);
    }

    #[test]
    fn a_line_just_at_the_limit_is_read_and_one_byte_more_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let line = big_session(2000);
        let limit = line.len();
        let next = format!("{SESSION_B}\n");
        let at = [format!("{SESSION_A}\n{line}\n"), next.clone()].concat();
        let over = [format!("{SESSION_A}\n {line}\n"), next].concat();
        for (name, text) in [("at", at), ("over", over)] {
            for (gzip, bytes) in [
                (false, text.as_bytes().to_vec()),
                (true, gz(text.as_bytes())),
            ] {
                let all = items_with_limit(&file(&dir, name, &bytes), limit);
                assert_eq!(all.len(), 3, "{name} {gzip}");
                assert!(all[0].0.result.is_ok() && all[2].0.result.is_ok());
                if name == "at" {
                    let Ok(Record::Session(s)) = &all[1].0.result else {
                        panic!("{name}: {:?}", all[1].0.result.as_ref().err())
                    };
                    assert_eq!(s.states[0].events.app_events, 2000);
                    assert_eq!(s.states[0].events.messages[0].name, ".m5 Open");
                } else {
                    assert_eq!(
                        bad_reason(&all[1].0),
                        format!(
                            "line of {} bytes is over watch.max_line_bytes ({})",
                            thousands(limit as u64 + 1),
                            thousands(limit as u64)
                        )
                    );
                }
                // Growing never reserved more than the limit.
                assert!(all.iter().all(|(_, c)| *c <= limit), "{name} {gzip}");
            }
        }
    }

    #[test]
    fn a_session_of_megabytes_is_read_with_the_default_limit_and_its_buffer_given_back() {
        let dir = tempfile::tempdir().unwrap();
        let line = big_session(40_000);
        assert!(line.len() > 4 << 20, "{}", line.len());
        let text = format!("{SESSION_A}\n{line}\n{SESSION_B}\n");
        for (name, bytes) in [("p", text.as_bytes().to_vec()), ("g", gz(text.as_bytes()))] {
            let all = items_with_limit(&file(&dir, name, &bytes), LIMIT);
            assert_eq!(all.len(), 3, "{name}");
            let Ok(Record::Session(s)) = &all[1].0.result else {
                panic!("{name}: {:?}", all[1].0.result.as_ref().err())
            };
            assert_eq!(s.states[0].events.app_events, 40_000);
            assert_eq!(s.states[0].events.messages.len(), 1);
            // The buffer a long line grew is not kept for the lines after it.
            for (item, capacity) in &all {
                assert!(
                    *capacity <= lines::KEEP_BUFFER_BYTES,
                    "{name} line {}: {capacity}",
                    item.line
                );
            }
        }
    }

    #[test]
    fn the_size_in_a_reason_has_thousands_separators() {
        let cases = [
            (0, "0"),
            (999, "999"),
            (1000, "1,000"),
            (67_108_864, "67,108,864"),
            (70_123_456, "70,123,456"),
        ];
        for (n, shown) in cases {
            assert_eq!(thousands(n), shown);
        }
        let reason = over_limit_reason("line", 70_123_456, 67_108_864);
        assert_eq!(
            reason,
            "line of 70,123,456 bytes is over watch.max_line_bytes (67,108,864)"
        );
        assert_eq!(over_limit_size(&reason), Some(70_123_456));
        let again = format!("retry failed: {}", over_limit_reason("record", 1234, 1024));
        assert_eq!(over_limit_size(&again), Some(1234));
        assert_eq!(over_limit_size("not a session: EOF"), None);
        assert_eq!(over_limit_size("watch.max_line_bytes"), None);
        assert_eq!(
            over_limit_size("one of x bytes is over watch.max_line_bytes (1)"),
            None
        );
    }

    #[test]
    fn invalid_utf8_and_malformed_json_are_bad_records_beside_good_ones() {
        let dir = tempfile::tempdir().unwrap();
        let text = [
            SESSION_A.as_bytes(),
            b"\n{\"sessionId\":\"\xff\xfe\"}\n",
            b"{\"sessionId\": }\n",
            br#"{"sessionId":"3","states":[{"events":[{"eventId":1.5,"name":"x","time":1}]}]}"#,
            b"\n[1,2]\n",
            SESSION_B.as_bytes(),
            b"\n",
        ]
        .concat();
        let all = items(&file(&dir, "s", &text), 0);
        assert_eq!(all.len(), 6);
        assert!(all[0].result.is_ok() && all[5].result.is_ok());
        assert_eq!(
            bad_reason(&all[1]),
            "invalid UTF-8 at byte 14 of the record"
        );
        assert!(
            bad_reason(&all[2]).contains("column"),
            "{}",
            bad_reason(&all[2])
        );
        assert!(
            bad_reason(&all[3]).contains("not an integer"),
            "{}",
            bad_reason(&all[3])
        );
        assert_eq!(bad_reason(&all[4]), "not a JSON object (starts with '[')");

        let eng = format!("{ENGAGEMENT}\n[1]\n{{\"event\":\"Open\"}}\n");
        let all = items(&file(&dir, "e", eng.as_bytes()), 0);
        assert!(matches!(all[0].result, Ok(Record::Engagement(_))));
        assert!(bad_reason(&all[1]).contains("not a JSON object"));
        assert_eq!(bad_reason(&all[2]), "timestamp: missing");
    }

    #[test]
    fn a_truncated_gzip_yields_the_records_before_the_cut_then_one_error() {
        let dir = tempfile::tempdir().unwrap();
        // Varied lines, so deflate cannot shrink the whole file into a few bytes.
        let text: String = (0..4000)
            .map(|i| {
                format!(
                    "{{\"sessionId\":\"{i}\",\"deviceId\":\"d{}\",\"time\":{i}}}\n",
                    i * 7919
                )
            })
            .collect();
        let full = gz(text.as_bytes());
        let path = file(&dir, "cut", &full[..full.len() / 2]);
        let mut reader = Reader::open(&path, 0, LIMIT).unwrap();
        let mut good = 0u64;
        let error = loop {
            match reader.next_item() {
                Some(Ok(item)) => {
                    good += 1;
                    assert_eq!(item.line, good);
                    assert!(item.result.is_ok() && item.complete);
                }
                Some(Err(e)) => break e,
                None => panic!("a truncated gzip must end in an error"),
            }
        };
        assert!(good > 100 && good < 4000, "{good}");
        assert!(matches!(error, InputError::TruncatedGzip { .. }), "{error}");
        assert!(reader.next_item().is_none());

        // Cut inside the header, and damaged data.
        let err = open_err(&file(&dir, "hdr", &full[..5]), 0);
        assert!(
            matches!(err, InputError::TruncatedGzip { decoded_bytes: 0 }),
            "{err}"
        );
        let mut damaged = full.clone();
        let n = damaged.len();
        damaged[n - 8] ^= 0xff; // the CRC
        let mut reader = Reader::open(&file(&dir, "crc", &damaged), 0, LIMIT).unwrap();
        let last = std::iter::from_fn(|| reader.next_item()).last();
        assert!(
            matches!(last, Some(Err(InputError::CorruptGzip { .. }))),
            "{last:?}"
        );
    }

    #[test]
    fn a_multi_member_gzip_reads_every_member() {
        let dir = tempfile::tempdir().unwrap();
        let one = format!("{SESSION_A}\n");
        let two = format!("{SESSION_B}\n{SESSION_A}\n");
        let path = file(
            &dir,
            "m",
            &[gz(one.as_bytes()), gz(two.as_bytes())].concat(),
        );
        let all = items(&path, 0);
        assert_eq!(all.len(), 3);
        assert_eq!(all[2].end_offset, (one.len() + two.len()) as u64);
        assert_eq!(shown(&items(&path, all[0].end_offset)), shown(&all[1..]));
    }

    #[test]
    fn a_csv_quoted_newline_stays_in_its_cell_and_counts_as_a_line() {
        let dir = tempfile::tempdir().unwrap();
        let csv = "Event , Email_Subject ,timestamp\r\n\
                   Open,\"Hello,\r\n\"\"world\"\"\",1793610000\r\n\
                   Open,,1793610001\r\n";
        let all = items(&file(&dir, "c", csv.as_bytes()), 0);
        assert_eq!(all.len(), 2);
        let Ok(Record::Engagement(first)) = &all[0].result else {
            panic!("{:?}", all[0].result)
        };
        assert_eq!(first.email_subject.as_deref(), Some("Hello,\r\n\"world\""));
        assert_eq!(first.timestamp_ms, 1_793_610_000_000);
        let Ok(Record::Engagement(second)) = &all[1].result else {
            panic!("{:?}", all[1].result)
        };
        assert_eq!(second.email_subject, None);
        assert_eq!((all[0].line, all[1].line), (2, 4));
    }

    #[test]
    fn the_same_engagement_as_json_and_csv_is_the_same_record() {
        let dir = tempfile::tempdir().unwrap();
        let json = items(&file(&dir, "j", format!("{ENGAGEMENT}\n").as_bytes()), 0);
        let csv = items(&file(&dir, "c", CSV.as_bytes()), 0);
        let (Ok(Record::Engagement(j)), Ok(Record::Engagement(c))) =
            (&json[0].result, &csv[0].result)
        else {
            panic!("{json:?} {csv:?}")
        };
        assert_eq!(j, c);
    }

    /// Every item of `path` from `offset` through [`Reader::fill_batch`] (batches of at least
    /// `batch_bytes`) and [`Parser::items`], then how the stream ended and its length.
    fn batched(
        path: &Path,
        offset: u64,
        limit: usize,
        batch_bytes: usize,
    ) -> (Vec<Item>, Option<String>, u64) {
        let mut reader = Reader::open(path, offset, limit).unwrap();
        let parser = reader.parser().clone();
        let mut out = Vec::new();
        loop {
            let mut batch = RawBatch::default();
            let filled = reader.fill_batch(&mut batch, batch_bytes);
            assert_eq!(batch.len(), parser.items(&batch).count());
            out.extend(parser.items(&batch));
            match filled {
                Filled::Full => assert!(batch.byte_len() >= batch_bytes),
                Filled::End => return (out, None, reader.offset()),
                Filled::Failed(e) => return (out, Some(e.to_string()), reader.offset()),
            }
        }
    }

    #[test]
    fn batches_give_the_items_next_item_gives() {
        let dir = tempfile::tempdir().unwrap();
        let long = format!("{{\"sessionId\":\"{}\"}}", "x".repeat(3000));
        let sessions = [
            BOM,
            SESSION_A.as_bytes(),
            b"\r\n\n   \n{\"sessionId\": }\n",
            long.as_bytes(),
            b"\n",
            SESSION_B.as_bytes(),
            b"\r\n\n",
            SESSION_A.as_bytes(),
        ]
        .concat();
        let csv = format!("{CSV}Open,\"a\nb\",1,5\n\nOpen,u,2,5\r\nbad,row\n");
        let engagements = format!("{ENGAGEMENT}\n[1]\n\n{ENGAGEMENT}\n");
        let cases: [(&str, &[u8]); 3] = [
            ("s", &sessions),
            ("c", csv.as_bytes()),
            ("e", engagements.as_bytes()),
        ];
        for (name, text) in cases {
            for (gzip, bytes) in [(false, text.to_vec()), (true, gz(text))] {
                let path = file(&dir, &format!("{name}-{gzip}"), &bytes);
                let all = items(&path, 0);
                assert!(all.len() >= 3, "{name}");
                // From the start and from each item's end, limits above and below the long
                // line, batches of one record and of several.
                let offsets = std::iter::once(0).chain(all.iter().map(|i| i.end_offset));
                for offset in offsets {
                    for limit in [1024, LIMIT] {
                        let mut expected = Vec::new();
                        let mut reader = Reader::open(&path, offset, limit).unwrap();
                        while let Some(item) = reader.next_item() {
                            expected.push(item.unwrap());
                        }
                        for batch_bytes in [1, 200, 1 << 20] {
                            let (got, error, end) = batched(&path, offset, limit, batch_bytes);
                            let what = format!(
                                "{name} gzip {gzip} from {offset} limit {limit} batch {batch_bytes}"
                            );
                            assert_eq!(shown(&got), shown(&expected), "{what}");
                            assert_eq!((error, end), (None, text.len() as u64), "{what}");
                        }
                    }
                }
            }
        }
        // A gzip stream cut short: the records before the cut, then the error.
        let text: String = (0..4000)
            .map(|i| format!("{{\"sessionId\":\"{i}\",\"deviceId\":\"d{}\"}}\n", i * 7919))
            .collect();
        let full = gz(text.as_bytes());
        let path = file(&dir, "cut", &full[..full.len() / 2]);
        let mut reader = Reader::open(&path, 0, LIMIT).unwrap();
        let mut expected = Vec::new();
        let error = loop {
            match reader.next_item() {
                Some(Ok(item)) => expected.push(item),
                Some(Err(e)) => break e.to_string(),
                None => unreachable!("a truncated gzip ends in an error"),
            }
        };
        let (got, got_error, _) = batched(&path, 0, LIMIT, 4096);
        assert_eq!(shown(&got), shown(&expected));
        assert_eq!(got_error, Some(error));
        // A partial last line is the last item, marked incomplete.
        let path = file(&dir, "p", format!("{SESSION_A}\n{SESSION_B}").as_bytes());
        let (got, _, _) = batched(&path, 0, LIMIT, 1);
        assert_eq!(
            got.iter().map(|i| i.complete).collect::<Vec<_>>(),
            [true, false]
        );
    }

    #[test]
    fn a_reader_can_move_to_a_blocking_thread() {
        fn is_send<T: Send>() {}
        is_send::<Reader>();
        is_send::<Item>();
        is_send::<InputError>();
    }

    fn example(rel: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("examples")
            .join(rel)
    }

    #[test]
    fn the_example_files_read_in_full() {
        let shard =
            "export/20261101/export-5629499534213120-06e7df8e-1eb1-c66e-79f7-4d60ac03031e-output-";
        let cases = [
            (format!("{shard}0"), Format::Sessions, false, 12),
            (format!("{shard}1"), Format::Sessions, true, 12),
            (
                "engagements/postbacks-20261102.jsonl".into(),
                Format::EngagementJson,
                false,
                4,
            ),
            (
                "engagements/feed-20261102.csv".into(),
                Format::EngagementCsv,
                false,
                3,
            ),
        ];
        for (rel, format, gzip, count) in cases {
            let path = example(&rel);
            let reader = Reader::open(&path, 0, LIMIT).unwrap();
            assert_eq!((reader.format(), reader.is_gzip()), (format, gzip), "{rel}");
            let all = items(&path, 0);
            assert_eq!(all.len(), count, "{rel}");
            for item in &all {
                assert!(item.complete, "{rel} line {}", item.line);
                if let Err(bad) = &item.result {
                    panic!("{rel} line {}: {}", item.line, bad.reason);
                }
            }
        }

        let csv = items(&example("engagements/feed-20261102.csv"), 0);
        let Ok(Record::Engagement(bounce)) = &csv[0].result else {
            unreachable!()
        };
        assert_eq!(
            bounce.event_id,
            Some(crate::leanplum::Id(18_446_744_073_709_551_000))
        );
    }
}
