//! Streaming reader of one Leanplum CSV export table file (SPEC section 4, format 4), plain or
//! gzipped, with the `csv` crate. Like [`super::Reader`] it yields one row at a time with the
//! decompressed byte offset just past it (the csv reader's `Position::byte()`, plus where it
//! started), the line the row starts on, and whether the row was terminated; a bad row is an
//! item carrying its reason, never an error that ends the file.
//!
//! Resuming at a committed offset reads the header from the start of the stream, then reads
//! through the stream up to the offset counting its lines, and parses on from there.
//!
//! Memory: a 128 KiB read buffer and one row (the csv crate grows its row buffer to the longest
//! row; Leanplum's rows are short, but a row longer than [`MAX_ROW_BYTES`] is a bad
//! record, its content not kept).

use std::fs::File;
use std::io::{self, BufReader, Read};
use std::path::Path;

use crate::leanplum::csv_export::{self, Columns, Row, Table, TableFile};

use super::detect::BOM;
use super::{BAD_RECORD_RAW_BYTES, BadRecord, InputError};

/// The longest row read (the default `watch.max_line_bytes`); a longer one is a bad record.
const MAX_ROW_BYTES: usize = 64 << 20;

const STREAM_BUFFER_BYTES: usize = 128 << 10;

/// One row, good or bad, with where it ends.
#[derive(Debug, Clone)]
pub(crate) struct TableItem {
    /// 1-based line the row starts on.
    pub line: u64,
    /// Offset in the decompressed stream just past the row (and its line ending).
    pub end_offset: u64,
    /// False only for a last row with no line ending: its writer may still be appending.
    pub complete: bool,
    pub result: Result<Row, BadRecord>,
}

/// Counts what the csv reader pulled from the stream: how many bytes, the last one, and whether
/// the end was reached (to tell a last row with no line ending).
struct Tap<R> {
    inner: R,
    bytes: u64,
    last: Option<u8>,
    eof: bool,
}

impl<R: Read> Read for Tap<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 && !buf.is_empty() {
            self.eof = true;
        } else if n > 0 {
            self.bytes += n as u64;
            self.last = Some(buf[n - 1]);
        }
        Ok(n)
    }
}

type Stream = Box<dyn Read + Send>;

/// A reader over one table file.
pub(crate) struct TableReader {
    file: TableFile,
    gzip: bool,
    columns: Columns,
    csv: csv::Reader<Tap<Stream>>,
    /// Offset in the decompressed stream where `csv` started, and the lines before it.
    base_offset: u64,
    base_line: u64,
    row: csv::ByteRecord,
    /// Rows end at `\n` (else at `\r`: a CRLF file, whose `\n` the csv reader takes as the
    /// start of the next row). Decided from the header; used to tell the line a row starts on.
    lf: bool,
    done: bool,
}

/// What the file's name says, if it is named like a table of a CSV export job.
pub(crate) fn table_file(path: &Path) -> Option<TableFile> {
    csv_export::table_file(&path.file_name()?.to_string_lossy())
}

impl TableReader {
    /// Opens a file named like a CSV export table (see [`table_file`]) at `start_offset` (0, or
    /// an `end_offset` returned before). `Ok(None)`: not named like one. A header that is not the
    /// named table's is [`InputError::UnknownFormat`] with the reason.
    pub(crate) fn open(path: &Path, start_offset: u64) -> Result<Option<TableReader>, InputError> {
        let Some(file) = table_file(path) else {
            return Ok(None);
        };
        let (stream, gzip) = open_stream(path)?;
        let mut csv = csv_reader(stream);
        let mut header = csv::ByteRecord::new();
        let columns = loop {
            match csv.read_byte_record(&mut header) {
                Ok(true) => {}
                Ok(false) => return Err(InputError::Empty),
                Err(e) => return Err(csv_error(e, gzip, 0)),
            }
            if is_blank(&header) {
                continue;
            }
            let mut names = Vec::with_capacity(header.len());
            for (i, cell) in header.iter().enumerate() {
                let cell = if i == 0 {
                    cell.strip_prefix(BOM).unwrap_or(cell)
                } else {
                    cell
                };
                names.push(
                    std::str::from_utf8(cell).map_err(|_| InputError::UnknownFormat {
                        reason: "binary data (the CSV header is not UTF-8)".into(),
                    })?,
                );
            }
            break Columns::new(file.table, &names)
                .map_err(|reason| InputError::UnknownFormat { reason })?;
        };
        let header_end = csv.position().byte();
        let lf = csv.position().line().saturating_sub(newlines(&header)) > 1;
        let mut reader = TableReader {
            file,
            gzip,
            columns,
            csv,
            base_offset: 0,
            base_line: 0,
            row: csv::ByteRecord::new(),
            lf,
            done: false,
        };
        if start_offset == 0 || start_offset == header_end {
            return Ok(Some(reader));
        }
        if start_offset < header_end {
            return Err(InputError::BadOffset {
                offset: start_offset,
                reason: "inside the CSV header",
            });
        }
        // Read through the stream up to the offset, counting its lines, then parse from there.
        let (mut stream, _) = open_stream(path)?;
        let (skipped, lines, last) =
            skip(&mut stream, start_offset).map_err(|e| super::classify(e, gzip, 0))?;
        if skipped < start_offset {
            return Err(InputError::BadOffset {
                offset: start_offset,
                reason: "past the end of the data",
            });
        }
        let mut stream: Stream = stream;
        if !matches!(last, Some(b'\n' | b'\r')) {
            // A partial last row committed once the file settled: fine only if nothing follows.
            let mut probe = [0u8; 1];
            if stream
                .read(&mut probe)
                .map_err(|e| super::classify(e, gzip, 0))?
                > 0
            {
                return Err(InputError::BadOffset {
                    offset: start_offset,
                    reason: "not at the start of a line",
                });
            }
        }
        reader.csv = csv_reader(stream);
        reader.base_offset = start_offset;
        reader.base_line = lines;
        Ok(Some(reader))
    }

    pub(crate) fn file(&self) -> &TableFile {
        &self.file
    }

    pub(crate) fn table(&self) -> Table {
        self.file.table
    }

    /// Decompressed bytes consumed: after `next_item` returned `None`, the stream's length.
    pub(crate) fn offset(&self) -> u64 {
        self.base_offset + self.csv.position().byte()
    }

    /// The next row, or `None` at the end. An `Err` (I/O, truncated or corrupt gzip) is
    /// returned once, then `None`.
    pub(crate) fn next_item(&mut self) -> Option<Result<TableItem, InputError>> {
        while !self.done {
            match self.csv.read_byte_record(&mut self.row) {
                Ok(true) => {}
                Ok(false) => break,
                Err(e) => {
                    self.done = true;
                    let at = self.offset();
                    return Some(Err(csv_error(e, self.gzip, at)));
                }
            }
            if is_blank(&self.row) {
                continue;
            }
            let end_offset = self.offset();
            let tap = self.csv.get_ref();
            let complete = !(tap.eof
                && tap.bytes == self.csv.position().byte()
                && !matches!(tap.last, Some(b'\n' | b'\r')));
            // The csv reader skips blank lines before a row, so its start position may be one
            // of them: count back from where the row ended instead.
            let terminator = u64::from(complete && self.lf);
            let line = self.base_line
                + self
                    .csv
                    .position()
                    .line()
                    .saturating_sub(newlines(&self.row) + terminator)
                    .max(1);
            let result = self.parse();
            return Some(Ok(TableItem {
                line,
                end_offset,
                complete,
                result,
            }));
        }
        self.done = true;
        None
    }

    fn parse(&self) -> Result<Row, BadRecord> {
        let raw = || {
            let mut raw = Vec::new();
            for (i, cell) in self.row.iter().enumerate() {
                if i > 0 {
                    raw.push(b',');
                }
                raw.extend_from_slice(cell);
                if raw.len() >= BAD_RECORD_RAW_BYTES {
                    raw.truncate(BAD_RECORD_RAW_BYTES);
                    break;
                }
            }
            raw
        };
        if self.row.as_slice().len() > MAX_ROW_BYTES {
            return Err(BadRecord {
                reason: "record exceeds 1 MiB".into(),
                raw: raw(),
            });
        }
        let mut cells = Vec::with_capacity(self.row.len());
        for cell in self.row.iter() {
            match std::str::from_utf8(cell) {
                Ok(c) => cells.push(c),
                Err(e) => {
                    return Err(BadRecord {
                        reason: format!("invalid UTF-8 at byte {} of a field", e.valid_up_to()),
                        raw: raw(),
                    });
                }
            }
        }
        csv_export::parse_row(self.file.table, &self.columns, &cells)
            .map_err(|reason| BadRecord { reason, raw: raw() })
    }
}

fn csv_reader(stream: Stream) -> csv::Reader<Tap<Stream>> {
    csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .buffer_capacity(STREAM_BUFFER_BYTES)
        .from_reader(Tap {
            inner: stream,
            bytes: 0,
            last: None,
            eof: false,
        })
}

fn open_stream(path: &Path) -> Result<(Stream, bool), InputError> {
    let mut file = File::open(path)?;
    let gzip = super::starts_with_gzip_magic(&mut file)?;
    let stream: Stream = super::decoded(file, gzip);
    Ok((
        Box::new(BufReader::with_capacity(STREAM_BUFFER_BYTES, stream)),
        gzip,
    ))
}

/// Reads up to `n` bytes of `r`: how many there were, the newlines among them and the last one.
fn skip(r: &mut Stream, n: u64) -> io::Result<(u64, u64, Option<u8>)> {
    let mut buf = vec![0u8; 64 << 10];
    let (mut done, mut lines, mut last) = (0u64, 0u64, None);
    while done < n {
        let want = ((n - done) as usize).min(buf.len());
        let got = match r.read(&mut buf[..want]) {
            Ok(0) => break,
            Ok(got) => got,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        lines += memchr::memchr_iter(b'\n', &buf[..got]).count() as u64;
        last = Some(buf[got - 1]);
        done += got as u64;
    }
    Ok((done, lines, last))
}

/// Newlines inside a row's (quoted) fields.
fn newlines(r: &csv::ByteRecord) -> u64 {
    memchr::memchr_iter(b'\n', r.as_slice()).count() as u64
}

fn is_blank(r: &csv::ByteRecord) -> bool {
    r.iter().all(|c| c.trim_ascii().is_empty())
}

fn csv_error(e: csv::Error, gzip: bool, at: u64) -> InputError {
    match e.into_kind() {
        csv::ErrorKind::Io(io) => super::classify(io, gzip, at),
        other => InputError::Io {
            source: io::Error::other(format!("{other:?}")),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::leanplum::Id;
    use flate2::Compression;
    use flate2::write::GzEncoder;
    use std::io::Write;
    use std::path::PathBuf;

    const EVENTS: &str = "eventId,stateId,sessionId,eventName,start,value,info,timeUntilFirstForUser\n\
        9007199254740993,-4,11,\".m5 Click\",1.591474962721E9,0,,\n\
        2,-1,11,\"Buy, \"\"now\"\"\n(promo)\",1591474962.5,1.5,\"a\nb\",\n\
        3,7,12,.m6 Open,2020-06-06 20:22:42.721 UTC,,,\n";

    fn write(dir: &tempfile::TempDir, name: &str, bytes: &[u8]) -> PathBuf {
        let p = dir.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }

    fn gz(bytes: &[u8]) -> Vec<u8> {
        let mut e = GzEncoder::new(Vec::new(), Compression::default());
        e.write_all(bytes).unwrap();
        e.finish().unwrap()
    }

    fn items(path: &Path, offset: u64) -> Vec<TableItem> {
        let mut r = TableReader::open(path, offset).unwrap().unwrap();
        std::iter::from_fn(|| r.next_item())
            .map(|i| i.unwrap())
            .collect()
    }

    fn event(item: &TableItem) -> &csv_export::EventRow {
        match &item.result {
            Ok(Row::Event(e)) => e,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn quoted_fields_ids_and_times() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(&dir, "export-1-j-outputevents-0", EVENTS.as_bytes());
        let all = items(&path, 0);
        assert_eq!(all.len(), 3);
        assert_eq!(event(&all[0]).event_id, Id(9_007_199_254_740_993));
        assert_eq!(event(&all[0]).time.millis(), 1_591_474_962_721);
        assert_eq!(event(&all[1]).name, "Buy, \"now\"\n(promo)");
        assert_eq!(event(&all[2]).time.millis(), 1_591_474_962_721);
        let lines: Vec<u64> = all.iter().map(|i| i.line).collect();
        assert_eq!(lines, [2, 3, 6]);
        let crlf = write(
            &dir,
            "export-1-j-outputevents-1",
            EVENTS.replace('\n', "\r\n").as_bytes(),
        );
        let lines: Vec<u64> = items(&crlf, 0).iter().map(|i| i.line).collect();
        assert_eq!(lines, [2, 3, 6]);
        assert_eq!(all[2].end_offset, EVENTS.len() as u64);
        assert!(all.iter().all(|i| i.complete));
    }

    #[test]
    fn resuming_at_every_end_offset_yields_exactly_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let crlf = EVENTS.replace('\n', "\r\n");
        let bad = format!("{EVENTS}x,1\n\n4,1,13,.m7 Open,1,,,\n");
        for (name, bytes) in [
            ("export-1-j-outputevents-0", EVENTS.as_bytes().to_vec()),
            ("export-1-j-outputevents-1.gz", gz(EVENTS.as_bytes())),
            ("export-1-j-outputevents-2", crlf.as_bytes().to_vec()),
            ("export-1-j-outputevents-3", bad.as_bytes().to_vec()),
            ("export-1-j-outputevents-4.gz", gz(bad.as_bytes())),
        ] {
            let path = write(&dir, name, &bytes);
            let all = items(&path, 0);
            let shown = |v: &[TableItem]| format!("{v:?}");
            for (i, item) in all.iter().enumerate() {
                let rest = items(&path, item.end_offset);
                assert_eq!(shown(&rest), shown(&all[i + 1..]), "{name} after {i}");
            }
        }
        let all = items(&dir.path().join("export-1-j-outputevents-3"), 0);
        assert_eq!(all.len(), 5);
        let Err(b) = &all[3].result else { panic!() };
        assert!(b.reason.contains("2 fields"), "{}", b.reason);
        assert_eq!(b.raw, b"x,1");
        assert_eq!((all[3].line, all[4].line), (7, 9));
    }

    #[test]
    fn offsets_that_do_not_fit_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(&dir, "export-1-j-outputevents-0", EVENTS.as_bytes());
        for (offset, why) in [
            (3, "inside the CSV header"),
            (EVENTS.len() as u64 + 5, "past the end"),
            (EVENTS.len() as u64 - 4, "not at the start of a line"),
        ] {
            match TableReader::open(&path, offset) {
                Err(e) => assert!(e.to_string().contains(why), "{offset}: {e}"),
                Ok(_) => panic!("{offset} accepted"),
            }
        }
    }

    #[test]
    fn a_last_row_without_a_newline_is_incomplete() {
        let dir = tempfile::tempdir().unwrap();
        let text = EVENTS.trim_end();
        let path = write(&dir, "export-1-j-outputevents-0", text.as_bytes());
        let all = items(&path, 0);
        let complete: Vec<bool> = all.iter().map(|i| i.complete).collect();
        assert_eq!(complete, [true, true, false]);
        assert_eq!(all[2].end_offset, text.len() as u64);
        assert!(items(&path, all[2].end_offset).is_empty());
    }

    #[test]
    fn names_and_headers_decide() {
        let dir = tempfile::tempdir().unwrap();
        // Not named like a table: not ours, whatever the content.
        let p = write(&dir, "events.csv", EVENTS.as_bytes());
        assert!(TableReader::open(&p, 0).unwrap().is_none());
        // Named like one with another table's header.
        let p = write(&dir, "export-1-j-outputsessions-0", EVENTS.as_bytes());
        let err = TableReader::open(&p, 0).err().unwrap();
        assert!(err.to_string().contains("`sessions`"), "{err}");
        // A BOM, columns in another order, an extra column; states and userattributes.
        let p = write(
            &dir,
            "export-1-j-outputeventparameters-0.gz",
            &gz(b"\xEF\xBB\xBFvalue,name,eventId,x\n\"https://a.test/?q=\"\"1\"\",2\",url,5,\n"),
        );
        let all = items(&p, 0);
        let Ok(Row::Param(param)) = &all[0].result else {
            panic!("{:?}", all[0].result)
        };
        assert_eq!(param.value, "https://a.test/?q=\"1\",2");
        assert_eq!((param.name.as_str(), param.event_id), ("url", Id(5)));
        for t in ["states", "userattributes"] {
            let p = write(
                &dir,
                &format!("export-1-j-output{t}-0"),
                b"sessionId,stateId,name,value\n1,-2,a,b\n1,3,c,d\n",
            );
            let all = items(&p, 0);
            assert_eq!(all.len(), 2);
            assert!(all.iter().all(|i| matches!(i.result, Ok(Row::Other))));
        }
        let p = write(&dir, "export-1-j-outputevents-9", b"");
        assert!(matches!(
            TableReader::open(&p, 0).err().unwrap(),
            InputError::Empty
        ));
    }

    #[test]
    fn a_truncated_gzip_yields_the_rows_before_the_cut_then_one_error() {
        let dir = tempfile::tempdir().unwrap();
        let mut text = String::from("eventId,sessionId,eventName,start\n");
        for i in 0..4000 {
            text.push_str(&format!(
                "{i},{},.m{} Open,{}\n",
                i * 7919,
                i * 31,
                1.5e9 + i as f64
            ));
        }
        let full = gz(text.as_bytes());
        let p = write(
            &dir,
            "export-1-j-outputevents-0.gz",
            &full[..full.len() / 2],
        );
        let mut r = TableReader::open(&p, 0).unwrap().unwrap();
        let mut good = 0;
        let err = loop {
            match r.next_item() {
                Some(Ok(i)) => {
                    assert!(i.result.is_ok());
                    good += 1;
                }
                Some(Err(e)) => break e,
                None => panic!("no error"),
            }
        };
        assert!(good > 100 && good < 4000, "{good}");
        assert!(matches!(err, InputError::TruncatedGzip { .. }), "{err}");
        assert!(r.next_item().is_none());
    }
}
