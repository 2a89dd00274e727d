//! Bounded record framing over a decompressed byte stream: splits it into newline-terminated
//! records (or CSV records, whose quoted fields may hold newlines) while counting byte offsets
//! and line numbers, and never holding more than its limit (`watch.max_line_bytes`) of one
//! record in memory.

use std::io::{self, BufRead};

/// The record buffer keeps at most this much capacity between records: after a longer record
/// it is given back (see [`LineReader::release_large_buffer`]), so one huge session does not pin
/// its size in memory for the rest of the file.
pub(crate) const KEEP_BUFFER_BYTES: usize = 1 << 20;

/// Of a record over the limit, this much of its start stays in the buffer (for the quarantine);
/// the rest is dropped as soon as the overflow is seen.
pub(crate) const OVERFLOW_KEEP_BYTES: usize = 8 << 10;

/// Where a record ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framing {
    /// At the next `\n`.
    Lines,
    /// At the next `\n` outside a quoted field (RFC 4180 quoting, `""` escapes a quote).
    Csv,
}

/// One framed record; its bytes (without the terminating `\n`, at most the limit of them) are in
/// [`LineReader::record`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RawRecord {
    /// Offset of the record's first byte in the stream.
    pub start: u64,
    /// 1-based line number of the record's first line.
    pub line: u64,
    /// False when the stream ended before the record's `\n`.
    pub terminated: bool,
    /// The record was longer than the limit; only its first [`OVERFLOW_KEEP_BYTES`] are in
    /// the buffer, the rest was read past without being stored.
    pub overflow: bool,
    /// The record's full length in bytes, without its `\n` (over the limit too).
    pub len: u64,
}

/// Frames records from a `BufRead`, tracking the stream offset and the newlines consumed.
pub(crate) struct LineReader<R> {
    inner: R,
    /// Reused for every record so the steady state allocates nothing; never more than `limit`
    /// bytes long.
    buf: Vec<u8>,
    /// The longest record kept (`watch.max_line_bytes`).
    limit: usize,
    /// Bytes consumed from the stream so far.
    offset: u64,
    /// `\n` bytes consumed so far, so the next record starts on line `newlines + 1`.
    newlines: u64,
    /// The last byte consumed, to tell whether a resume offset sits at the start of a line.
    last_byte: Option<u8>,
}

impl<R: BufRead> LineReader<R> {
    /// Frames `inner`, keeping records of at most `limit` bytes (at least 1).
    pub(crate) fn new(inner: R, limit: usize) -> Self {
        LineReader {
            inner,
            buf: Vec::new(),
            limit: limit.max(1),
            offset: 0,
            newlines: 0,
            last_byte: None,
        }
    }

    /// Bytes consumed so far: the end offset of the last record returned.
    pub(crate) fn offset(&self) -> u64 {
        self.offset
    }

    pub(crate) fn last_byte(&self) -> Option<u8> {
        self.last_byte
    }

    /// The bytes of the record last returned by [`Self::read_record`].
    pub(crate) fn record(&self) -> &[u8] {
        &self.buf
    }

    #[cfg(test)]
    pub(crate) fn buffer_capacity(&self) -> usize {
        self.buf.capacity()
    }

    /// Gives the record buffer's memory back when a long record made it grow past
    /// [`KEEP_BUFFER_BYTES`]. Call it once the last record's bytes are no longer needed.
    pub(crate) fn release_large_buffer(&mut self) {
        if self.buf.capacity() > KEEP_BUFFER_BYTES {
            self.buf = Vec::new();
        }
    }

    /// True when the stream has no more bytes.
    pub(crate) fn at_eof(&mut self) -> io::Result<bool> {
        loop {
            match self.inner.fill_buf() {
                Ok(chunk) => return Ok(chunk.is_empty()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Reads the next record into [`Self::record`], or `None` at the end of the stream. An error
    /// leaves the reader mid-record; the caller stops reading.
    pub(crate) fn read_record(&mut self, framing: Framing) -> io::Result<Option<RawRecord>> {
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        let result = self.read_record_into(framing, &mut buf);
        self.buf = buf;
        result
    }

    /// Reads the next record onto the end of `out`, keeping what `out` already holds (a batch
    /// of records framed for parsing elsewhere, see `Reader::fill_batch`): the same framing,
    /// limit and offsets as [`Self::read_record`], without copying the record again. After
    /// an error `out` may hold part of a record past its old length.
    pub(crate) fn read_record_into(
        &mut self,
        framing: Framing,
        out: &mut Vec<u8>,
    ) -> io::Result<Option<RawRecord>> {
        // The record's first byte in `out`: the limit applies to what comes after it.
        let base = out.len();
        let start = self.offset;
        let line = self.newlines + 1;
        let mut scan = CsvScan::StartOfField;
        let mut overflow = false;
        let mut any = false;
        let mut len = 0u64;
        loop {
            let chunk = match self.inner.fill_buf() {
                Ok(chunk) => chunk,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if chunk.is_empty() {
                return Ok(any.then_some(RawRecord {
                    start,
                    line,
                    terminated: false,
                    overflow,
                    len,
                }));
            }
            any = true;
            let end = match framing {
                Framing::Lines => memchr::memchr(b'\n', chunk),
                Framing::Csv => scan.find_end(chunk),
            };
            let content_len = end.unwrap_or(chunk.len());
            len += content_len as u64;
            if !overflow {
                // Past the limit the rest is only scanned, never stored: a 2 GB line costs at
                // most the limit, and only until the overflow is seen.
                let content = &chunk[..content_len];
                let stored = out.len() - base;
                if content.len() > self.limit - stored {
                    overflow = true;
                    // Only the start is kept, for the quarantine; the memory goes back now.
                    let keep = OVERFLOW_KEEP_BYTES.min(self.limit);
                    let more = keep.saturating_sub(stored);
                    out.extend_from_slice(&content[..more]);
                    out.truncate(base + keep);
                    out.shrink_to(base + keep);
                } else {
                    store(out, base, self.limit, content);
                }
            }
            let consumed = end.map_or(chunk.len(), |i| i + 1);
            self.newlines += match framing {
                Framing::Lines => u64::from(end.is_some()),
                // Quoted newlines are lines too: line numbers must match what an editor shows.
                Framing::Csv => count_newlines(&chunk[..consumed]),
            };
            self.last_byte = chunk[..consumed].last().copied().or(self.last_byte);
            self.inner.consume(consumed);
            self.offset += consumed as u64;
            if end.is_some() {
                return Ok(Some(RawRecord {
                    start,
                    line,
                    terminated: true,
                    overflow,
                    len,
                }));
            }
        }
    }

    /// At the very start of the stream, steps over a UTF-8 byte order mark, so record framing
    /// (CSV quotes) starts at the first real character. The BOM still counts in offsets.
    pub(crate) fn skip_bom(&mut self) -> io::Result<()> {
        if self.offset == 0 && self.inner.fill_buf()?.starts_with(b"\xEF\xBB\xBF") {
            self.skip_to(3)?;
        }
        Ok(())
    }

    /// Reads past bytes until the stream offset is `target`, counting newlines on the way.
    /// Returns false if the stream ended first.
    pub(crate) fn skip_to(&mut self, target: u64) -> io::Result<bool> {
        while self.offset < target {
            let chunk = match self.inner.fill_buf() {
                Ok(chunk) => chunk,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if chunk.is_empty() {
                return Ok(false);
            }
            let want = usize::try_from(target - self.offset).unwrap_or(usize::MAX);
            let n = want.min(chunk.len());
            self.newlines += count_newlines(&chunk[..n]);
            self.last_byte = chunk[..n].last().copied().or(self.last_byte);
            self.inner.consume(n);
            self.offset += n as u64;
        }
        Ok(true)
    }
}

/// Appends `content` to the record that starts at `base` in `buf`, never growing the record
/// past `limit`. Up to [`KEEP_BUFFER_BYTES`] it grows by doubling. A record longer than that is a
/// long one (a session of megabytes): the buffer then reserves room for the whole limit at once,
/// so it is never copied to grow again, since each copy would hold the record twice at its
/// peak. The pages the record does not fill are never touched and cost no memory; the buffer is
/// given back after the record (see [`LineReader::release_large_buffer`]; a batch is dropped
/// once parsed). If the system refuses that much address space, growth goes on by doubling.
fn store(buf: &mut Vec<u8>, base: usize, limit: usize, content: &[u8]) {
    let needed = buf.len() + content.len();
    if needed > buf.capacity() {
        let at_once = needed - base > KEEP_BUFFER_BYTES
            && buf.try_reserve_exact(base + limit - buf.len()).is_ok();
        if !at_once {
            let target = needed.max(buf.capacity() * 2).min(base + limit);
            buf.reserve_exact(target - buf.len());
        }
    }
    buf.extend_from_slice(content);
}

fn count_newlines(bytes: &[u8]) -> u64 {
    memchr::memchr_iter(b'\n', bytes).count() as u64
}

/// Where a CSV scanner stands inside the current field. The same machine splits cells in
/// `input::csv`, so framing and splitting always agree on what is quoted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CsvScan {
    StartOfField,
    Unquoted,
    Quoted,
    /// A `"` inside a quoted field: either the closing quote or the first half of `""`.
    QuoteInQuoted,
}

impl CsvScan {
    /// The state after `b`.
    pub(crate) fn step(self, b: u8) -> CsvScan {
        match (self, b) {
            (CsvScan::Quoted, b'"') => CsvScan::QuoteInQuoted,
            (CsvScan::Quoted, _) => CsvScan::Quoted,
            (CsvScan::QuoteInQuoted, b'"') => CsvScan::Quoted,
            (_, b',') => CsvScan::StartOfField,
            (CsvScan::StartOfField, b'"') => CsvScan::Quoted,
            // A quote in the middle of an unquoted field, or text after a closing quote, is kept
            // literally (as the `csv` crate does) rather than opening a quoted section.
            _ => CsvScan::Unquoted,
        }
    }

    /// The index of the `\n` that ends the record in `chunk`, if any; the state carries over to
    /// the next chunk otherwise.
    fn find_end(&mut self, chunk: &[u8]) -> Option<usize> {
        for (i, &b) in chunk.iter().enumerate() {
            if b == b'\n' && *self != CsvScan::Quoted {
                *self = CsvScan::StartOfField;
                return Some(i);
            }
            *self = self.step(b);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufReader;

    /// A reader that hands out one byte per read, to exercise records split across chunks.
    struct Trickle<'a>(&'a [u8]);

    impl io::Read for Trickle<'_> {
        fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
            match (self.0.split_first(), out.first_mut()) {
                (Some((&b, rest)), Some(slot)) => {
                    *slot = b;
                    self.0 = rest;
                    Ok(1)
                }
                _ => Ok(0),
            }
        }
    }

    fn frame(data: &[u8], framing: Framing) -> Vec<(Vec<u8>, RawRecord, u64)> {
        let mut r = LineReader::new(BufReader::with_capacity(1, Trickle(data)), 1 << 20);
        let mut out = Vec::new();
        while let Some(rec) = r.read_record(framing).unwrap() {
            out.push((r.record().to_vec(), rec, r.offset()));
        }
        out
    }

    #[test]
    fn lines_carry_offsets_and_line_numbers_across_tiny_chunks() {
        let got = frame(b"ab\n\nc\r\nd", Framing::Lines);
        let texts: Vec<&[u8]> = got.iter().map(|(t, _, _)| t.as_slice()).collect();
        assert_eq!(texts, [&b"ab"[..], b"", b"c\r", b"d"]);
        let ends: Vec<u64> = got.iter().map(|g| g.2).collect();
        assert_eq!(ends, [3, 4, 7, 8]);
        let lines: Vec<u64> = got.iter().map(|g| g.1.line).collect();
        assert_eq!(lines, [1, 2, 3, 4]);
        assert!(got[2].1.terminated && !got[3].1.terminated);
    }

    #[test]
    fn csv_framing_keeps_quoted_newlines_inside_the_record() {
        let got = frame(b"a,\"x\ny\"\"\n\",b\nc,d\"e\nf\n", Framing::Csv);
        let texts: Vec<&[u8]> = got.iter().map(|(t, _, _)| t.as_slice()).collect();
        assert_eq!(texts, [&b"a,\"x\ny\"\"\n\",b"[..], b"c,d\"e", b"f"]);
        let lines: Vec<u64> = got.iter().map(|g| g.1.line).collect();
        assert_eq!(lines, [1, 4, 5]);
    }

    #[test]
    fn skip_to_counts_newlines_and_reports_a_short_stream() {
        let mut r = LineReader::new(BufReader::new(&b"a\nb\nc\n"[..]), 1 << 20);
        assert!(r.skip_to(4).unwrap());
        assert_eq!((r.offset(), r.last_byte()), (4, Some(b'\n')));
        let rec = r.read_record(Framing::Lines).unwrap().unwrap();
        assert_eq!((rec.line, r.record()), (3, &b"c"[..]));
        assert!(!r.skip_to(100).unwrap());
    }
}
