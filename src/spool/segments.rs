//! Event payloads outside sled: append-only segment files (format version 3).
//!
//! sled 0.34 keeps in memory, and rescans at every open, bookkeeping that grows with the bytes
//! it has written; with the events inside sled that made the agent's memory and its restart
//! time grow with the backlog. So the packets (see `packet.rs`) go to plain files, and sled's
//! `queue` tree keeps only where each one is: a few dozen bytes per packet instead of the
//! packet.
//!
//! Layout under `spool.dir/segments/`: `<id>.seg` (20 decimal digits), ids from 1 up. A segment
//! is a run of records `[crc32 u32 BE][packet]`, each packet encoded as in `packet.rs`; the
//! writer starts a new segment once the current one is past [`SEGMENT_BYTES`].
//!
//! # Commit and crash
//!
//! A commit appends its packets at the active segment's end, `fdatasync`s the segment, and
//! only then runs the sled transaction that adds the packets' locations to `queue` and moves
//! the committed end (`meta/segment_end`: segment id, offset). So a location sled has
//! committed always points at bytes already on disk. The writer appends at its pending end:
//! the committed end, or past the bytes of a commit still under way (a file's next chunk is
//! appended while the one before is synced and committed, see `commit.rs`). Bytes past the
//! committed end belong to a commit that did not finish; when it fails the pending end goes
//! back to the committed one ([`Writer::abandon`]) and the next commit writes over them, and
//! an agent opening the spool cuts them off and deletes segments past the committed one.
//! The drain's [`Reader`] keeps what it read ahead from one peek to the next, but only the
//! bytes below the committed end as it was when it read them: those never change.
//!
//! # Reclaiming disk
//!
//! Packets are appended in key order and the drain removes them mostly in order, so a segment
//! is deleted once every packet in it is gone, which is when the first packet still queued
//! lies in a later segment (or nothing is queued and a later segment is being written).

use std::fs::{self, File};
use std::io::IoSlice;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{Error, io_err, sync_dir};

/// A segment is closed once it holds this much; the next commit starts a new one. (Unit tests
/// use small ones, to see segments roll over and go.)
#[cfg(not(test))]
pub(super) const SEGMENT_BYTES: u64 = 32 << 20;
#[cfg(test)]
pub const SEGMENT_BYTES: u64 = 1 << 20;
/// The drain reads ahead this much at a time (whole packets are sliced out of it).
const READ_AHEAD: usize = 256 << 10;
/// Marks a `queue` value holding a location rather than a packet (packets start with 1 or 2).
pub(super) const LOCATION: u8 = 3;
const LOCATION_LEN: usize = 1 + 8 + 8 + 4 + 2 + 8;
/// A [`Location`] as stored in the `queue` tree.
pub(super) type LocationBytes = [u8; LOCATION_LEN];
const RECORD_HEADER: u64 = 4;

/// At most this many buffers go to one `pwritev` (Linux's `IOV_MAX`).
const MAX_IOVECS: usize = 1024;

/// Writes all of `bufs`, one after the other, at `offset` of `file` (`pwritev`, going on after
/// a short write).
fn write_all_vectored_at(
    file: &File,
    mut bufs: &mut [IoSlice<'_>],
    mut offset: u64,
) -> std::io::Result<()> {
    while !bufs.is_empty() {
        let n = match rustix::io::pwritev(file, &bufs[..bufs.len().min(MAX_IOVECS)], offset) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => n,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        };
        offset += n as u64;
        IoSlice::advance_slices(&mut bufs, n);
    }
    Ok(())
}

/// Where a packet is: segment, offset of its record, packet bytes (without the record header),
/// its number of events (so the next key is known without reading the packet) and its file
/// (so a packet lost to damage on disk can still be accounted to it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Location {
    pub segment: u64,
    pub offset: u64,
    pub len: u32,
    pub events: u16,
    pub file_id: u64,
}

impl Location {
    pub(super) fn encode(&self) -> LocationBytes {
        let mut v = [0u8; LOCATION_LEN];
        v[0] = LOCATION;
        v[1..9].copy_from_slice(&self.segment.to_be_bytes());
        v[9..17].copy_from_slice(&self.offset.to_be_bytes());
        v[17..21].copy_from_slice(&self.len.to_be_bytes());
        v[21..23].copy_from_slice(&self.events.to_be_bytes());
        v[23..31].copy_from_slice(&self.file_id.to_be_bytes());
        v
    }

    pub(super) fn decode(v: &[u8]) -> Option<Location> {
        if v.len() != LOCATION_LEN || v[0] != LOCATION {
            return None;
        }
        Some(Location {
            segment: u64::from_be_bytes(v[1..9].try_into().ok()?),
            offset: u64::from_be_bytes(v[9..17].try_into().ok()?),
            len: u32::from_be_bytes(v[17..21].try_into().ok()?),
            events: u16::from_be_bytes(v[21..23].try_into().ok()?),
            file_id: u64::from_be_bytes(v[23..31].try_into().ok()?),
        })
    }
}

/// The committed end of the segments: the active segment and the offset past its last
/// committed record. `segment == 0`: nothing written yet.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct End {
    pub segment: u64,
    pub offset: u64,
}

impl End {
    pub(super) fn encode(&self) -> [u8; 16] {
        let mut v = [0u8; 16];
        v[..8].copy_from_slice(&self.segment.to_be_bytes());
        v[8..].copy_from_slice(&self.offset.to_be_bytes());
        v
    }

    pub(super) fn decode(v: &[u8]) -> Option<End> {
        Some(End {
            segment: u64::from_be_bytes(v.get(..8)?.try_into().ok()?),
            offset: u64::from_be_bytes(v.get(8..16)?.try_into().ok()?),
        })
    }
}

/// The directory of segments under `spool.dir`.
pub(super) fn dir(spool_dir: &Path) -> PathBuf {
    spool_dir.join("segments")
}

fn path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:020}.seg"))
}

fn segment_id(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".seg")?;
    (digits.len() == 20 && digits.bytes().all(|b| b.is_ascii_digit()))
        .then(|| digits.parse().ok())
        .flatten()
}

/// Ids of the segments present, ascending.
fn list(dir: &Path) -> Vec<u64> {
    let mut ids: Vec<u64> = fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| segment_id(&e.file_name().to_string_lossy()))
                .collect()
        })
        .unwrap_or_default();
    ids.sort_unstable();
    ids
}

/// Bytes the segment files take.
pub(super) fn disk_bytes(dir: &Path) -> u64 {
    list(dir)
        .into_iter()
        .filter_map(|id| fs::metadata(path(dir, id)).ok())
        .map(|m| m.len())
        .sum()
}

/// Cuts off what an unfinished commit left past the committed `end`, and deletes segments past
/// it (an agent opening the spool; the caller holds the lock). Returns the bytes cut.
pub(super) fn repair(dir: &Path, end: End) -> Result<u64, Error> {
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    let mut cut = 0;
    for id in list(dir) {
        let p = path(dir, id);
        if id > end.segment {
            cut += fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
            fs::remove_file(&p).map_err(io_err(&p))?;
        } else if id == end.segment {
            let f = fs::OpenOptions::new()
                .write(true)
                .open(&p)
                .map_err(io_err(&p))?;
            let len = f.metadata().map_err(io_err(&p))?.len();
            if len > end.offset {
                f.set_len(end.offset).map_err(io_err(&p))?;
                f.sync_all().map_err(io_err(&p))?;
                cut += len - end.offset;
            }
        }
    }
    sync_dir(dir)?;
    Ok(cut)
}

/// Deletes the segments below `first_live` (their packets are all gone). Returns how many.
pub(super) fn remove_below(dir: &Path, first_live: u64) -> usize {
    let mut n = 0;
    for id in list(dir).into_iter().take_while(|id| *id < first_live) {
        let p = path(dir, id);
        match fs::remove_file(&p) {
            Ok(()) => n += 1,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(path = %p.display(), error = %e, "cannot remove a drained spool segment");
            }
        }
    }
    n
}

/// A packet to append, with its file: its header, then its events' JSON, written from where
/// they are (a commit's events are megabytes: copied into one buffer first, that copy was a
/// tenth of the committing thread's time).
pub(super) struct Packet<'a> {
    pub head: Vec<u8>,
    /// The events' JSON, one slice each.
    pub body: Vec<&'a [u8]>,
    pub file_id: u64,
}

impl Packet<'_> {
    /// The packet's length (without the record header).
    fn len(&self) -> usize {
        self.head.len() + self.body.iter().map(|e| e.len()).sum::<usize>()
    }

    /// The CRC-32 of the packet's bytes: the record header.
    fn crc(&self) -> u32 {
        let mut h = crc32fast::Hasher::new();
        h.update(&self.head);
        for e in &self.body {
            h.update(e);
        }
        h.finalize()
    }
}

/// Appends packets to the active segment. Owned by the spool's writer (under its lock).
#[derive(Debug)]
pub(super) struct Writer {
    dir: PathBuf,
    /// The committed end.
    end: End,
    /// Where the next append goes: the committed end, or past appends whose commits are under
    /// way.
    pending: End,
    /// The segment of `pending`, open for writing (`None` until the first append).
    file: Option<Arc<File>>,
}

/// A segment an append wrote to, to be made durable before the transaction naming its bytes.
#[derive(Debug)]
pub(super) struct ToSync {
    file: Arc<File>,
    path: PathBuf,
}

impl ToSync {
    /// `fdatasync`s the segment (what other appends wrote to it too).
    pub(super) fn sync(&self) -> Result<(), Error> {
        self.file.sync_data().map_err(io_err(&self.path))
    }
}

impl Writer {
    /// A writer continuing at the committed `end` (after [`repair`], or on a look-only spool
    /// that never writes).
    pub(super) fn new(dir: &Path, end: End) -> Writer {
        Writer {
            dir: dir.to_owned(),
            end,
            pending: end,
            file: None,
        }
    }

    /// Writes `packets` at the pending end, not synced. Returns each packet's location, the end
    /// to commit, and the segment to sync before the transaction that commits them; nothing
    /// counts as written until [`Writer::committed`] is called with that end, after sled's
    /// transaction. Nothing to write: no I/O, the pending end.
    pub(super) fn append(
        &mut self,
        packets: &[Packet],
    ) -> Result<(Vec<Location>, End, Option<ToSync>), Error> {
        if packets.is_empty() {
            return Ok((Vec::new(), self.pending, None));
        }
        let mut at = self.pending;
        if at.segment == 0 || at.offset >= SEGMENT_BYTES {
            // A new segment; a leftover of an unfinished commit under that id is overwritten.
            at = End {
                segment: at.segment + 1,
                offset: 0,
            };
            let p = path(&self.dir, at.segment);
            fs::create_dir_all(&self.dir).map_err(io_err(&self.dir))?;
            let f = fs::OpenOptions::new()
                .create(true)
                .truncate(true)
                .write(true)
                .open(&p)
                .map_err(io_err(&p))?;
            sync_dir(&self.dir)?;
            self.file = Some(Arc::new(f));
        } else if self.file.is_none() {
            let p = path(&self.dir, at.segment);
            match fs::OpenOptions::new().write(true).open(&p) {
                Ok(f) => self.file = Some(Arc::new(f)),
                // Retired (see `Writer::retire`) before a restart: start the next one.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    self.pending.offset = SEGMENT_BYTES;
                    return self.append(packets);
                }
                Err(e) => return Err(io_err(&p)(e)),
            }
        }
        // Each record's header, then the records written from where they are (not copied into
        // one buffer first: a commit's packets are megabytes).
        let headers: Vec<[u8; RECORD_HEADER as usize]> =
            packets.iter().map(|p| p.crc().to_be_bytes()).collect();
        let slices: usize = packets.iter().map(|p| 2 + p.body.len()).sum();
        let mut records = Vec::with_capacity(slices);
        let mut locations = Vec::with_capacity(packets.len());
        let mut len = 0u64;
        for (p, header) in packets.iter().zip(&headers) {
            let bytes = p.len();
            locations.push(Location {
                segment: at.segment,
                offset: at.offset + len,
                len: bytes as u32,
                events: p.body.len() as u16,
                file_id: p.file_id,
            });
            records.push(IoSlice::new(header));
            records.push(IoSlice::new(&p.head));
            records.extend(p.body.iter().map(|e| IoSlice::new(e)));
            len += RECORD_HEADER + bytes as u64;
        }
        let p = path(&self.dir, at.segment);
        let file = self.file.clone().expect("opened above");
        if let Err(e) = write_all_vectored_at(&file, &mut records, at.offset) {
            // Reopen next time: the error may have left the handle unusable.
            self.file = None;
            return Err(io_err(&p)(e));
        }
        at.offset += len;
        self.pending = at;
        Ok((locations, at, Some(ToSync { file, path: p })))
    }

    /// Records that sled committed the locations [`Writer::append`] returned with `end`
    /// (commits are committed in the order of their appends).
    pub(super) fn committed(&mut self, end: End) {
        self.end = end;
    }

    /// Forgets the appends not committed (a commit failed, and those after it were
    /// abandoned): the next append writes over them, at the committed end, or, when they had
    /// started a new segment, by starting that segment again (a full or retired end always
    /// starts a new one).
    pub(super) fn abandon(&mut self) {
        self.pending = self.end;
        // Reopened at the next append: the error may have left the handle unusable, or it is
        // a later segment's.
        self.file = None;
    }

    /// Lets go of the segment being written when everything in it is delivered (the caller
    /// checked that nothing is queued, holding the writer lock): the next append starts a new
    /// segment, and the returned one can be deleted. `None` when no segment holds anything.
    pub(super) fn retire(&mut self) -> Option<u64> {
        debug_assert_eq!(self.pending, self.end, "retired with a commit under way");
        if self.end.segment == 0 || self.end.offset == 0 {
            return None;
        }
        self.file = None;
        self.end.offset = self.end.offset.max(SEGMENT_BYTES);
        self.pending = self.end;
        Some(self.end.segment)
    }
}

/// Reads packets, with a read-ahead buffer: the drain reads consecutive packets of a segment,
/// so one `pread` serves many. The drain keeps one across its peeks (see `Queue::peek`), so
/// what one peek read ahead serves the next: each byte is read once, into a buffer kept for
/// that, and copied once, into the `IVec` the packets are sliced from.
#[derive(Default)]
pub(super) struct Reader {
    /// Segment, offset of the buffer's first byte, and the bytes; only bytes that were
    /// committed when they were read, so they cannot change afterwards.
    buf: Option<(u64, u64, sled::IVec)>,
    file: Option<(u64, File)>,
    /// Where a `pread` lands: allocated and zeroed once, reused by every read.
    scratch: Vec<u8>,
}

impl Reader {
    /// The packet at `loc`, checked against its checksum. `Ok(None)`: missing or damaged.
    /// `committed` is the segments' committed end, or any earlier one: bytes read past it are
    /// not kept for later reads (a commit may still be writing them, or write over them).
    pub(super) fn read(
        &mut self,
        dir: &Path,
        loc: &Location,
        committed: End,
    ) -> Result<Option<sled::IVec>, Error> {
        let need = RECORD_HEADER + u64::from(loc.len);
        let covered = self.buf.as_ref().is_some_and(|(seg, off, b)| {
            *seg == loc.segment && loc.offset >= *off && loc.offset + need <= off + b.len() as u64
        });
        if !covered {
            self.buf = None;
            let p = path(dir, loc.segment);
            if self.file.as_ref().is_none_or(|(id, _)| *id != loc.segment) {
                match File::open(&p) {
                    Ok(f) => self.file = Some((loc.segment, f)),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                    Err(e) => return Err(io_err(&p)(e)),
                }
            }
            let (_, f) = self.file.as_ref().expect("opened above");
            let want = (need as usize).max(READ_AHEAD);
            if self.scratch.len() < want {
                self.scratch.resize(want, 0);
            }
            let buf = &mut self.scratch[..want];
            let mut got = 0;
            while got < want {
                match f.read_at(&mut buf[got..], loc.offset + got as u64) {
                    Ok(0) => break,
                    Ok(n) => got += n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(io_err(&p)(e)),
                }
            }
            if (got as u64) < need {
                return Ok(None);
            }
            // `loc` itself is committed; past the committed end, nothing is kept.
            let keep = if loc.segment < committed.segment {
                got as u64
            } else {
                (committed.offset.saturating_sub(loc.offset)).clamp(need, got as u64)
            };
            self.buf = Some((
                loc.segment,
                loc.offset,
                sled::IVec::from(&buf[..keep as usize]),
            ));
        }
        let (_, off, b) = self.buf.as_ref().expect("filled above");
        let at = (loc.offset - off) as usize;
        let crc = u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"));
        let packet = b.subslice(at + 4, loc.len as usize);
        Ok((crc32fast::hash(&packet) == crc).then_some(packet))
    }

    /// Closes the segment file (a deleted segment's space is given back once no one has it
    /// open); the buffer stays.
    pub(super) fn close(&mut self) {
        self.file = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Packets of one event each, of these sizes (leaked: a test's few bytes).
    fn packets(sizes: &[usize]) -> Vec<Packet<'static>> {
        sizes
            .iter()
            .enumerate()
            .map(|(i, n)| Packet {
                head: Vec::new(),
                body: vec![&*Box::leak(vec![i as u8; *n].into_boxed_slice())],
                file_id: 9,
            })
            .collect()
    }

    /// Appends packets of these sizes and syncs them, as a commit does before its transaction.
    fn append(w: &mut Writer, sizes: &[usize]) -> (Vec<Location>, End) {
        let (locs, end, to_sync) = w.append(&packets(sizes)).unwrap();
        to_sync.unwrap().sync().unwrap();
        (locs, end)
    }

    /// A segment writer in a new directory that has committed packets of these sizes: the
    /// directory (kept while it lives), the segments' directory, the writer, the packets'
    /// locations and the committed end.
    fn committed_writer(
        sizes: &[usize],
    ) -> (tempfile::TempDir, PathBuf, Writer, Vec<Location>, End) {
        let tmp = tempfile::tempdir().unwrap();
        let dir = dir(tmp.path());
        let mut w = Writer::new(&dir, End::default());
        let (locs, end) = append(&mut w, sizes);
        w.committed(end);
        (tmp, dir, w, locs, end)
    }

    #[test]
    fn locations_round_trip() {
        let l = Location {
            segment: 7,
            offset: 1 << 40,
            len: 4100,
            events: 64,
            file_id: u64::MAX,
        };
        assert_eq!(Location::decode(&l.encode()), Some(l));
        assert_eq!(Location::decode(&l.encode()[..30]), None);
        let e = End {
            segment: 3,
            offset: 99,
        };
        assert_eq!(End::decode(&e.encode()), Some(e));
    }

    #[test]
    fn a_vectored_write_of_more_buffers_than_one_call_takes_writes_them_all_in_order() {
        let tmp = tempfile::tempdir().unwrap();
        let f = fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(tmp.path().join("v"))
            .unwrap();
        let parts: Vec<Vec<u8>> = (0..3 * MAX_IOVECS + 7)
            .map(|i| vec![i as u8; 1 + i % 5])
            .collect();
        let mut slices: Vec<IoSlice> = parts.iter().map(|p| IoSlice::new(p)).collect();
        write_all_vectored_at(&f, &mut slices, 3).unwrap();
        let mut back = vec![0u8; 3 + parts.iter().map(Vec::len).sum::<usize>()];
        f.read_exact_at(&mut back, 0).unwrap();
        assert_eq!(&back[3..], parts.concat().as_slice());
    }

    #[test]
    fn appended_packets_read_back_and_damage_is_seen() {
        let (_tmp, dir, _, locs, end) = committed_writer(&[10, 300_000, 5]);
        assert_eq!(end.segment, 1);
        assert_eq!(end.offset, 10 + 300_000 + 5 + 12);
        let mut r = Reader::default();
        for (i, l) in locs.iter().enumerate() {
            let p = r.read(&dir, l, end).unwrap().unwrap();
            assert!(p.iter().all(|b| *b == i as u8) && p.len() == l.len as usize);
        }
        // A flipped byte fails the checksum.
        let f = fs::OpenOptions::new()
            .write(true)
            .open(path(&dir, 1))
            .unwrap();
        f.write_all_at(&[0xff], locs[2].offset + 6).unwrap();
        assert_eq!(Reader::default().read(&dir, &locs[2], end).unwrap(), None);
        // A missing segment reads as nothing.
        let gone = Location {
            segment: 9,
            ..locs[0]
        };
        assert_eq!(Reader::default().read(&dir, &gone, end).unwrap(), None);
    }

    #[test]
    fn uncommitted_bytes_are_cut_and_later_segments_deleted() {
        let (_tmp, dir, mut w, _, end) = committed_writer(&[100]);
        // Appended, never committed (the sled transaction did not happen).
        let (_, lost) = append(&mut w, &[50]);
        assert!(lost.offset > end.offset);
        fs::write(path(&dir, 2), b"debris").unwrap();
        assert_eq!(repair(&dir, end).unwrap(), 54 + 6);
        assert_eq!(list(&dir), vec![1]);
        assert_eq!(fs::metadata(path(&dir, 1)).unwrap().len(), end.offset);
        // The next writer continues at the committed end.
        let mut w = Writer::new(&dir, end);
        let (locs, end2) = append(&mut w, &[7]);
        assert_eq!(locs[0].offset, end.offset);
        assert_eq!(end2.offset, end.offset + 11);
    }

    #[test]
    fn a_failed_commit_of_a_new_segment_starts_it_again() {
        let (_tmp, dir, mut w, _, _) = committed_writer(&[10]);
        w.end.offset = SEGMENT_BYTES; // as if full
        w.pending = w.end;
        // The append starts segment 2; sled's transaction then fails.
        let (locs, attempted) = append(&mut w, &[500]);
        assert_eq!(locs[0].segment, 2);
        assert_eq!(attempted.segment, 2);
        // Nothing committed: the retry writes segment 2 from its start, over what the failed
        // one left.
        w.abandon();
        let (locs, end) = append(&mut w, &[20]);
        w.committed(end);
        assert_eq!((locs[0].segment, locs[0].offset), (2, 0));
        assert_eq!(fs::metadata(path(&dir, 2)).unwrap().len(), 24);
        let p = Reader::default()
            .read(&dir, &locs[0], end)
            .unwrap()
            .unwrap();
        assert_eq!(p.len(), 20);
    }

    #[test]
    fn a_kept_reader_reads_again_what_was_past_the_committed_end() {
        let (_tmp, dir, mut w, first, end) = committed_writer(&[10]);
        // A commit that fails after its bytes are written: they lie past the committed end.
        let (failed, _) = append(&mut w, &[500]);
        let mut r = Reader::default();
        assert_eq!(r.read(&dir, &first[0], end).unwrap().unwrap().len(), 10);
        // The retry writes over them; the reader does not serve the old bytes.
        w.abandon();
        let (locs, end) = append(&mut w, &[20, 30]);
        w.committed(end);
        assert_eq!(locs[0].offset, failed[0].offset);
        for (l, n) in locs.iter().zip([20, 30]) {
            let p = r.read(&dir, l, end).unwrap().unwrap();
            assert_eq!(p.len(), n);
            assert!(p.iter().all(|b| *b == (n / 30) as u8));
        }
        // What it read after that commit serves later reads, the segment closed or not.
        r.close();
        assert_eq!(r.read(&dir, &locs[1], end).unwrap().unwrap().len(), 30);
    }

    #[test]
    fn a_full_segment_rolls_over_and_drained_ones_go() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = dir(tmp.path());
        let mut w = Writer::new(
            &dir,
            End {
                segment: 0,
                offset: 0,
            },
        );
        let (_, end) = append(&mut w, &[10]);
        w.committed(end);
        w.end.offset = SEGMENT_BYTES; // as if full
        w.pending = w.end;
        let (locs, end) = append(&mut w, &[10]);
        w.committed(end);
        assert_eq!((locs[0].segment, locs[0].offset), (2, 0));
        assert_eq!(list(&dir), vec![1, 2]);
        assert_eq!(remove_below(&dir, 2), 1);
        assert_eq!(list(&dir), vec![2]);
        assert_eq!(disk_bytes(&dir), 14);
        // Retired with all its packets delivered: deleted, and the next append starts anew,
        // also in a writer that only knows the committed end (a restart).
        assert_eq!(w.retire(), Some(2));
        assert_eq!(w.retire(), Some(2), "again: the same one");
        assert_eq!(remove_below(&dir, 3), 1);
        let mut restarted = Writer::new(&dir, end);
        let (locs, end) = append(&mut restarted, &[10]);
        assert_eq!((locs[0].segment, end.segment), (3, 3));
        let (locs, _) = append(&mut w, &[10]);
        assert_eq!(locs[0].segment, 3);
    }
}
