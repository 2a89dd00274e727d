//! The `/v1/batch` request body: `{"batch":[...],"sentAt":"..."}`, its exact size before
//! sending, and gzip.
//!
//! Events are stored serialized, so a body is their concatenation inside the envelope: nothing
//! is parsed or re-encoded. With gzip, [`Bodies`] keeps the compressors (zlib-rs, level 1, see
//! BENCHMARKS.md "delivery's CPU") and the plain-body buffers of finished requests for the
//! next ones: a fresh compressor is a few hundred KB of zeroed tables, and allocating that and
//! a body for each request cost more page faults than the copying.

use std::sync::Mutex;

use flate2::{Compress, Compression, FlushCompress, Status};

/// Bytes of the envelope around the events: `{"batch":[` + `],"sentAt":"` + 24-char timestamp
/// + `"}`. `sentAt` is always `YYYY-MM-DDTHH:MM:SS.mmmZ`, 24 characters.
pub(crate) const ENVELOPE_BYTES: usize = r#"{"batch":[],"sentAt":""}"#.len() + 24;

/// The JSON budget for events in a batch of at most `max_batch_bytes`, counting each event as
/// its length plus one separator (one more than the commas actually needed, so never over).
pub(crate) fn event_budget(max_batch_bytes: usize) -> usize {
    max_batch_bytes.saturating_sub(ENVELOPE_BYTES)
}

/// The request body for `events` (each a serialized track event) sent at `sent_at`.
pub(crate) fn encode_body<'a, I>(events: I, sent_at: &str) -> Vec<u8>
where
    I: IntoIterator<Item = &'a [u8]>,
    I::IntoIter: Clone,
{
    let mut body = Vec::new();
    encode_body_into(&mut body, events, sent_at);
    body
}

/// [`encode_body`] into `body` (cleared first), reserving its exact size at once.
fn encode_body_into<'a, I>(body: &mut Vec<u8>, events: I, sent_at: &str)
where
    I: IntoIterator<Item = &'a [u8]>,
    I::IntoIter: Clone,
{
    let events = events.into_iter();
    let size = ENVELOPE_BYTES + events.clone().map(|e| e.len() + 1).sum::<usize>();
    body.clear();
    body.reserve(size);
    body.extend_from_slice(br#"{"batch":["#);
    for (i, e) in events.enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(e);
    }
    body.extend_from_slice(br#"],"sentAt":""#);
    body.extend_from_slice(sent_at.as_bytes());
    body.extend_from_slice(br#""}"#);
}

/// A request body as it goes on the wire.
#[derive(Debug)]
pub(crate) struct Body {
    pub bytes: Vec<u8>,
    /// `Content-Encoding: gzip`.
    pub gzipped: bool,
}

/// Builds request bodies, gzipped or not (`segment.gzip`); shared by the requests of one
/// client. Keeps at most one idle compressor per core: a body is compressed without an await
/// in between, so no more than the runtime's worker threads (one per core) compress at once.
#[derive(Debug)]
pub(crate) struct Bodies {
    gzip: bool,
    idle: Mutex<Vec<Gzipper>>,
    keep: usize,
}

/// A gzip compressor and the buffer the plain body is built in, reused together.
struct Gzipper {
    deflate: Compress,
    plain: Vec<u8>,
}

impl std::fmt::Debug for Gzipper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gzipper").finish_non_exhaustive()
    }
}

impl Bodies {
    pub(crate) fn new(gzip: bool) -> Bodies {
        Bodies {
            gzip,
            idle: Mutex::new(Vec::new()),
            keep: std::thread::available_parallelism().map_or(2, |n| n.get()),
        }
    }

    /// The body for `events` sent at `sent_at`: gzipped when the client gzips (and, should the
    /// compressor ever fail, plain rather than not at all).
    pub(crate) fn build<'a, I>(&self, events: I, sent_at: &str) -> Body
    where
        I: IntoIterator<Item = &'a [u8]>,
        I::IntoIter: Clone,
    {
        if !self.gzip {
            return Body {
                bytes: encode_body(events, sent_at),
                gzipped: false,
            };
        }
        let mut g = self.take();
        encode_body_into(&mut g.plain, events, sent_at);
        match gzip(&mut g.deflate, &g.plain) {
            Ok(bytes) => {
                self.put(g);
                Body {
                    bytes,
                    gzipped: true,
                }
            }
            // The compressor's state is unknown: it is not kept.
            Err(_) => Body {
                bytes: g.plain,
                gzipped: false,
            },
        }
    }

    fn take(&self) -> Gzipper {
        self.lock().pop().unwrap_or_else(|| Gzipper {
            deflate: Compress::new_gzip(Compression::fast(), 15),
            plain: Vec::new(),
        })
    }

    fn put(&self, g: Gzipper) {
        let mut idle = self.lock();
        if idle.len() < self.keep {
            idle.push(g);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Gzipper>> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// `plain` as one gzip member (header, deflate stream, CRC-32 and size), with `deflate` reset
/// first so it can be used again.
fn gzip(deflate: &mut Compress, plain: &[u8]) -> Result<Vec<u8>, flate2::CompressError> {
    deflate.reset();
    // Request bodies compress about tenfold at level 1; the vector grows if one does not.
    let mut out = Vec::with_capacity(plain.len() / 8 + 1024);
    loop {
        let read = deflate.total_in() as usize;
        match deflate.compress_vec(&plain[read..], &mut out, FlushCompress::Finish)? {
            Status::StreamEnd => return Ok(out),
            Status::Ok | Status::BufError => out.reserve(out.capacity().max(4096)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn body_is_valid_json_and_its_size_is_predicted() {
        let sent_at = crate::event::rfc3339_millis(1_793_534_899_612);
        let events: Vec<&[u8]> = vec![br#"{"a":1}"#, br#"{"b":2}"#];
        let body = encode_body(events.iter().copied(), &sent_at);
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["batch"].as_array().unwrap().len(), 2);
        assert_eq!(v["sentAt"], sent_at.as_str());
        let predicted = ENVELOPE_BYTES + events.iter().map(|e| e.len() + 1).sum::<usize>();
        assert_eq!(body.len() + 1, predicted);
        assert_eq!(encode_body([], &sent_at).len(), ENVELOPE_BYTES);
    }

    fn gunzip(z: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(z)
            .read_to_end(&mut out)
            .unwrap();
        out
    }

    #[test]
    fn gzip_round_trips_with_compressors_reused() {
        let bodies = Bodies::new(true);
        let sent_at = "2026-11-01T12:08:19.612Z";
        // Larger than the first guess of the output's size when it does not compress.
        let mut rng = fastrand::Rng::with_seed(7);
        let noise: Vec<u8> = (0..200_000).map(|_| rng.alphanumeric() as u8).collect();
        let batches: Vec<Vec<&[u8]>> = vec![
            vec![b"{}"],
            vec![br#"{"a":1}"#; 3000],
            vec![&noise[..]],
            vec![br#"{"b":2}"#],
        ];
        for events in &batches {
            let body = bodies.build(events.iter().copied(), sent_at);
            assert!(body.gzipped);
            assert_eq!(
                gunzip(&body.bytes),
                encode_body(events.iter().copied(), sent_at)
            );
        }
        // One request at a time: one compressor, used for all of them.
        assert_eq!(bodies.lock().len(), 1);
    }

    #[test]
    fn without_gzip_the_body_is_plain() {
        let body = Bodies::new(false).build([&b"{}"[..]], "2026-11-01T12:08:19.612Z");
        assert!(!body.gzipped);
        assert_eq!(
            body.bytes,
            br#"{"batch":[{}],"sentAt":"2026-11-01T12:08:19.612Z"}"#
        );
    }
}
