//! Records framed on one thread and parsed on others: ingest reads (and gunzips) a file on one
//! thread, which only frames its records into [`RawBatch`]es, and parses them on several (see
//! `crate::ingest::parallel`). A batch's records are items exactly as [`Reader::next_item`]
//! gives them: same offsets, line numbers, blank lines left out, a line over the limit a bad
//! record naming its size.

use super::lines::RawRecord;
use super::{Format, InputError, Item, Reader, bad, over_limit_reason, record_text};

/// Records framed but not parsed, in file order: their bytes back to back, and where each one
/// is and ends.
#[derive(Debug, Default)]
pub(crate) struct RawBatch {
    bytes: Vec<u8>,
    records: Vec<RawEntry>,
}

#[derive(Debug)]
struct RawEntry {
    /// Where the record's bytes start in [`RawBatch::bytes`]; they end where the next one starts.
    at: usize,
    raw: RawRecord,
    /// The stream offset just past the record.
    end_offset: u64,
}

impl RawBatch {
    /// An empty batch with room for `bytes` of records.
    pub(crate) fn with_capacity(bytes: usize) -> RawBatch {
        RawBatch {
            bytes: Vec::with_capacity(bytes),
            records: Vec::new(),
        }
    }

    /// Records in the batch.
    pub(crate) fn len(&self) -> usize {
        self.records.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Bytes the batch holds.
    pub(crate) fn byte_len(&self) -> usize {
        self.bytes.len()
    }
}

/// How [`Reader::fill_batch`] stopped.
#[derive(Debug)]
pub(crate) enum Filled {
    /// The batch reached its size; more may follow.
    Full,
    /// The end of the input: [`Reader::offset`] is the stream's length.
    End,
    /// A stream error (I/O, truncated or corrupt gzip): the records before it are in the batch,
    /// nothing more will be read.
    Failed(InputError),
}

/// What turns a framed record into an [`Item`]: the reader's own [`Reader::next_item`] and the
/// threads that parse batches share it.
#[derive(Debug, Clone)]
pub(crate) struct Parser {
    pub(super) format: Format,
    /// CSV column names, trimmed and lowercased; empty for JSON formats.
    pub(super) header: Vec<String>,
    /// The longest record read (`watch.max_line_bytes`), for the reason of a longer one.
    pub(super) max_line_bytes: usize,
}

impl Parser {
    /// The item of a framed record; `text` is its bytes as [`record_text`] gives them.
    pub(super) fn item(&self, raw: &RawRecord, text: &[u8], end_offset: u64) -> Item {
        let result = if raw.overflow {
            let what = match self.format {
                Format::EngagementCsv => "record",
                Format::Sessions | Format::EngagementJson => "line",
            };
            Err(bad(
                over_limit_reason(what, raw.len, self.max_line_bytes),
                text,
            ))
        } else {
            super::parse_record(self.format, &self.header, text).map_err(|reason| bad(reason, text))
        };
        Item {
            line: raw.line,
            end_offset,
            complete: raw.terminated,
            result,
        }
    }

    /// The items of `batch`, in order.
    pub(crate) fn items<'a>(&'a self, batch: &'a RawBatch) -> impl Iterator<Item = Item> + 'a {
        let ends = batch
            .records
            .iter()
            .skip(1)
            .map(|e| e.at)
            .chain(std::iter::once(batch.bytes.len()));
        batch.records.iter().zip(ends).map(|(e, end)| {
            let text = record_text(&batch.bytes[e.at..end], e.raw.start);
            self.item(&e.raw, text, e.end_offset)
        })
    }
}

/// A blank record (whitespace only) yields no item.
pub(super) fn is_blank(raw: &RawRecord, text: &[u8]) -> bool {
    !raw.overflow && text.trim_ascii().is_empty()
}

impl Reader {
    /// Frames the next records into `batch` (which should be empty) until it holds at least
    /// `max_bytes`, without parsing them: [`Parser::items`] (with [`Reader::parser`]) turns them
    /// into the items [`Reader::next_item`] would have given. The batch ends with the record
    /// that takes it to `max_bytes`; records are framed in place (a long one is not copied
    /// again) and each is still at most the reader's limit.
    pub(crate) fn fill_batch(&mut self, batch: &mut RawBatch, max_bytes: usize) -> Filled {
        let framing = self.framing();
        while !self.done {
            let at = batch.bytes.len();
            let raw = match self.lines.read_record_into(framing, &mut batch.bytes) {
                Ok(Some(raw)) => raw,
                Ok(None) => break,
                Err(e) => {
                    batch.bytes.truncate(at);
                    self.done = true;
                    return Filled::Failed(self.stream_error(e));
                }
            };
            if is_blank(&raw, record_text(&batch.bytes[at..], raw.start)) {
                batch.bytes.truncate(at);
                continue;
            }
            batch.records.push(RawEntry {
                at,
                raw,
                end_offset: self.lines.offset(),
            });
            if batch.bytes.len() >= max_bytes {
                return Filled::Full;
            }
        }
        self.done = true;
        Filled::End
    }

    /// What parses this reader's records elsewhere (see [`Reader::fill_batch`]).
    pub(crate) fn parser(&self) -> &Parser {
        &self.parser
    }
}
