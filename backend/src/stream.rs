//! Backup streams: a whole version or the changed extents between two versions, as a
//! self-describing byte stream (the format is in `docs/format.md`, "Backup streams").
//!
//! The daemon writes a stream ([`write_stream`]); the CLI reads it ([`StreamReader`]) to
//! write a sparse raw image (`snapmv export`), to save it (`snapmv export-diff`) or to apply it
//! to a raw file or block device (`snapmv import-diff`).

use std::io::{Read, Write};

use snapmv_engine::Origin;

/// Magic at the start of every stream.
pub const MAGIC: &[u8; 8] = b"SNAPMVDF";
/// Stream format version.
pub const VERSION: u32 = 1;
/// Header flag: the stream holds a whole version (no `from`); absent chunks are zeroes.
pub const FLAG_FULL: u32 = 1;
/// Record kinds.
pub const KIND_DATA: u32 = 1;
/// The range reads as zeroes (no payload).
pub const KIND_ZERO: u32 = 2;
/// The last record: `offset` = records before it, `length` = payload bytes before it.
pub const KIND_END: u32 = 0xffff_ffff;
/// Record flag: `from_crc` is the CRC-32C of the `from` version's bytes of the range.
pub const REC_FROM_CRC: u32 = 1;
/// Largest payload of one record.
pub const MAX_RECORD: u64 = 1 << 20;
/// Bytes of a record header.
pub const RECORD_HEADER: usize = 32;
/// Longest origin id in a header.
pub const MAX_ID: usize = 255;

/// What can go wrong producing or reading a stream.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// Reading a version failed.
    #[error("reading {what}: {source}")]
    Engine {
        /// Which version and where.
        what: String,
        /// The engine's error.
        #[source]
        source: snapmv_engine::Error,
    },
    /// Reading or writing the stream, or a file, failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The stream is not a valid snapmv stream (bad magic, checksum, truncated...).
    #[error("invalid stream: {0}")]
    Invalid(String),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> StreamError {
    let what = what.into();
    move |source| StreamError::Io { what, source }
}

/// A stream's header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Origin id inside its store.
    pub origin_id: String,
    /// The version the diff starts from (a snapshot tag); `None`: a whole version.
    pub from: Option<u32>,
    /// The version the stream holds: a snapshot tag, `None`: the origin.
    pub to: Option<u32>,
    /// The volume's size in bytes.
    pub size: u64,
    /// The store's chunk size in bytes.
    pub chunk_size: u32,
}

impl Header {
    /// Encodes the header (with its checksum).
    pub fn encode(&self) -> Vec<u8> {
        let id = &self.origin_id.as_bytes()[..self.origin_id.len().min(MAX_ID)];
        let len = 44 + id.len() + 4;
        let mut b = Vec::with_capacity(len);
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&VERSION.to_le_bytes());
        b.extend_from_slice(&(len as u32).to_le_bytes());
        b.extend_from_slice(&self.size.to_le_bytes());
        b.extend_from_slice(&self.chunk_size.to_le_bytes());
        let flags = if self.from.is_none() { FLAG_FULL } else { 0 };
        b.extend_from_slice(&flags.to_le_bytes());
        b.extend_from_slice(&self.from.unwrap_or(0).to_le_bytes());
        b.extend_from_slice(&self.to.unwrap_or(0).to_le_bytes());
        b.extend_from_slice(&(id.len() as u32).to_le_bytes());
        b.extend_from_slice(id);
        let crc = crc32c::crc32c(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        b
    }

    /// Reads and checks a header.
    pub fn read(r: &mut impl Read) -> Result<Header, StreamError> {
        let mut fixed = [0u8; 44];
        r.read_exact(&mut fixed)
            .map_err(|e| short(e, "the header"))?;
        if &fixed[..8] != MAGIC {
            return Err(StreamError::Invalid(
                "no snapmv stream magic (SNAPMVDF) at the start".into(),
            ));
        }
        let u32_at =
            |b: &[u8], at: usize| u32::from_le_bytes(b[at..at + 4].try_into().unwrap_or([0; 4]));
        let version = u32_at(&fixed, 8);
        if version != VERSION {
            return Err(StreamError::Invalid(format!(
                "stream format version {version}; this snapmv reads version {VERSION}"
            )));
        }
        let len = u32_at(&fixed, 12) as usize;
        let id_len = u32_at(&fixed, 40) as usize;
        if id_len > MAX_ID || len != 44 + id_len + 4 {
            return Err(StreamError::Invalid(format!(
                "header length {len} with an origin id of {id_len} bytes"
            )));
        }
        let mut rest = vec![0u8; id_len + 4];
        r.read_exact(&mut rest)
            .map_err(|e| short(e, "the header"))?;
        let mut all = fixed.to_vec();
        all.extend_from_slice(&rest[..id_len]);
        let crc = u32_at(&rest, id_len);
        if crc32c::crc32c(&all) != crc {
            return Err(StreamError::Invalid("header checksum mismatch".into()));
        }
        let size = u64::from_le_bytes(fixed[16..24].try_into().unwrap_or([0; 8]));
        let chunk_size = u32_at(&fixed, 24);
        let flags = u32_at(&fixed, 28);
        let from = u32_at(&fixed, 32);
        let to = u32_at(&fixed, 36);
        if !chunk_size.is_power_of_two() || chunk_size < 512 {
            return Err(StreamError::Invalid(format!("chunk size {chunk_size}")));
        }
        if flags & !FLAG_FULL != 0 || (flags & FLAG_FULL != 0) != (from == 0) {
            return Err(StreamError::Invalid(format!(
                "flags {flags:#x} with from {from}"
            )));
        }
        Ok(Header {
            origin_id: String::from_utf8_lossy(&rest[..id_len]).into_owned(),
            from: (from != 0).then_some(from),
            to: (to != 0).then_some(to),
            size,
            chunk_size,
        })
    }
}

fn short(e: std::io::Error, what: &str) -> StreamError {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        StreamError::Invalid(format!("truncated in {what}"))
    } else {
        StreamError::Io {
            what: format!("reading {what}"),
            source: e,
        }
    }
}

/// One record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    /// `KIND_DATA`, `KIND_ZERO` or `KIND_END`.
    pub kind: u32,
    /// First byte (END: the number of records before it).
    pub offset: u64,
    /// Bytes (END: the payload bytes before it).
    pub length: u64,
    /// CRC-32C of the `from` version's bytes of the range, when known.
    pub from_crc: Option<u32>,
}

impl Record {
    fn encode(&self, payload: &[u8]) -> [u8; RECORD_HEADER] {
        let mut b = [0u8; RECORD_HEADER];
        b[0..4].copy_from_slice(&self.kind.to_le_bytes());
        let flags = if self.from_crc.is_some() {
            REC_FROM_CRC
        } else {
            0
        };
        b[4..8].copy_from_slice(&flags.to_le_bytes());
        b[8..16].copy_from_slice(&self.offset.to_le_bytes());
        b[16..24].copy_from_slice(&self.length.to_le_bytes());
        b[24..28].copy_from_slice(&self.from_crc.unwrap_or(0).to_le_bytes());
        let crc = crc32c::crc32c_append(crc32c::crc32c(&b[..28]), payload);
        b[28..32].copy_from_slice(&crc.to_le_bytes());
        b
    }
}

/// Counts of a written stream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Records (END excluded).
    pub records: u64,
    /// Payload bytes.
    pub data_bytes: u64,
}

struct Writer<'a, W: Write> {
    out: &'a mut W,
    stats: Stats,
}

impl<W: Write> Writer<'_, W> {
    fn record(&mut self, rec: Record, payload: &[u8]) -> Result<(), StreamError> {
        let h = rec.encode(payload);
        self.out
            .write_all(&h)
            .and_then(|_| self.out.write_all(payload))
            .map_err(io("writing the stream"))?;
        self.stats.records += 1;
        self.stats.data_bytes += payload.len() as u64;
        Ok(())
    }
}

fn version_name(tag: Option<u32>) -> String {
    match tag {
        None => "the origin".into(),
        Some(t) => format!("snapshot {t}"),
    }
}

fn read_version(o: &Origin, tag: Option<u32>, off: u64, buf: &mut [u8]) -> Result<(), StreamError> {
    let v = match tag {
        None => Ok(o.volume()),
        Some(t) => o.snapshot_volume(t),
    };
    v.and_then(|v| v.read_bulk(off, buf))
        .map_err(|source| StreamError::Engine {
            what: format!("{} of origin {} at byte {off}", version_name(tag), o.id()),
            source,
        })
}

/// Whether every byte is zero: most data chunks answer on their first word; the OR over the
/// rest vectorises.
fn is_zero(b: &[u8]) -> bool {
    let head = b.len().min(16);
    b[..head].iter().all(|x| *x == 0) && b[head..].iter().fold(0u8, |a, x| a | x) == 0
}

/// Reads `buf.len()` bytes at `off` and hands out runs of whole chunks that are all zero or
/// not: `(start, end, zero)` relative to `buf`.
fn runs(buf: &[u8], cs: usize) -> Vec<(usize, usize, bool)> {
    let mut out: Vec<(usize, usize, bool)> = Vec::new();
    let mut at = 0;
    while at < buf.len() {
        let end = (at + cs).min(buf.len());
        let zero = is_zero(&buf[at..end]);
        match out.last_mut() {
            Some(r) if r.2 == zero => r.1 = end,
            _ => out.push((at, end, zero)),
        }
        at = end;
    }
    out
}

/// Writes the stream of version `to` (whole when `from` is `None`, else the extents the
/// metadata says may differ since `from`) into `out`. `progress` gets the bytes of the volume
/// covered so far. Reading is not atomic: stream snapshots, not a volume being written.
pub fn write_stream<W: Write>(
    o: &Origin,
    from: Option<u32>,
    to: Option<u32>,
    out: &mut W,
) -> Result<Stats, StreamError> {
    let size = o.size();
    let cs = o.chunk_size();
    let extents: Vec<(u64, u64)> = match from {
        Some(f) => o.diff(Some(f), to).map_err(|source| StreamError::Engine {
            what: format!("the diff from snapshot {f} of origin {}", o.id()),
            source,
        })?,
        None => {
            // Checks that the version exists before anything is written.
            read_version(o, to, 0, &mut [])?;
            vec![(0, size)]
        }
    };
    let header = Header {
        origin_id: o.id().to_string(),
        from,
        to,
        size,
        chunk_size: cs as u32,
    };
    out.write_all(&header.encode())
        .map_err(io("writing the stream header"))?;
    let mut w = Writer {
        out,
        stats: Stats::default(),
    };
    let mut buf = vec![0u8; MAX_RECORD as usize];
    let mut old = vec![0u8; MAX_RECORD as usize];
    for (start, len) in extents {
        let mut off = start;
        while off < start + len {
            let n = (start + len - off).min(MAX_RECORD) as usize;
            read_version(o, to, off, &mut buf[..n])?;
            if from.is_some() {
                read_version(o, from, off, &mut old[..n])?;
            }
            for (a, b, zero) in runs(&buf[..n], cs as usize) {
                let rec = Record {
                    kind: if zero { KIND_ZERO } else { KIND_DATA },
                    offset: off + a as u64,
                    length: (b - a) as u64,
                    from_crc: from.map(|_| crc32c::crc32c(&old[a..b])),
                };
                match (zero, from) {
                    // A whole version leaves zero chunks out: they are holes.
                    (true, None) => {}
                    (true, Some(_)) => w.record(rec, &[])?,
                    (false, _) => w.record(rec, &buf[a..b])?,
                }
            }
            off += n as u64;
        }
    }
    let stats = w.stats;
    w.record(
        Record {
            kind: KIND_END,
            offset: stats.records,
            length: stats.data_bytes,
            from_crc: None,
        },
        &[],
    )?;
    w.out.flush().map_err(io("writing the stream"))?;
    Ok(stats)
}

/// Reads a stream record by record, checking every checksum.
pub struct StreamReader<R: Read> {
    r: R,
    /// The stream's header.
    pub header: Header,
    records: u64,
    data_bytes: u64,
    last_end: u64,
    ended: bool,
}

impl<R: Read> StreamReader<R> {
    /// Reads the header.
    pub fn new(mut r: R) -> Result<Self, StreamError> {
        let header = Header::read(&mut r)?;
        Ok(StreamReader {
            r,
            header,
            records: 0,
            data_bytes: 0,
            last_end: 0,
            ended: false,
        })
    }

    /// The underlying reader.
    pub fn into_inner(self) -> R {
        self.r
    }

    /// The next record and its payload (in `buf`); `None` after the END record.
    pub fn next_record(&mut self, buf: &mut Vec<u8>) -> Result<Option<Record>, StreamError> {
        if self.ended {
            return Ok(None);
        }
        let mut h = [0u8; RECORD_HEADER];
        self.r
            .read_exact(&mut h)
            .map_err(|e| short(e, "a record header (no END record)"))?;
        let u32_at = |at: usize| u32::from_le_bytes(h[at..at + 4].try_into().unwrap_or([0; 4]));
        let u64_at = |at: usize| u64::from_le_bytes(h[at..at + 8].try_into().unwrap_or([0; 8]));
        let kind = u32_at(0);
        let flags = u32_at(4);
        let rec = Record {
            kind,
            offset: u64_at(8),
            length: u64_at(16),
            from_crc: (flags & REC_FROM_CRC != 0).then(|| u32_at(24)),
        };
        let n = self.records;
        let bad = |what: String| StreamError::Invalid(format!("record {n}: {what}"));
        if flags & !REC_FROM_CRC != 0 {
            return Err(bad(format!("unknown flags {flags:#x}")));
        }
        let payload = match kind {
            KIND_DATA => rec.length,
            KIND_ZERO | KIND_END => 0,
            k => return Err(bad(format!("unknown kind {k:#x}"))),
        };
        if kind != KIND_END {
            let end = rec.offset.checked_add(rec.length);
            if rec.length == 0
                || rec.length > MAX_RECORD
                || end.is_none_or(|e| e > self.header.size)
                || rec.offset < self.last_end
            {
                return Err(bad(format!(
                    "range {}+{} is empty, too long, out of order or past the {} bytes of the volume",
                    rec.offset, rec.length, self.header.size
                )));
            }
            if self.header.from.is_some() != rec.from_crc.is_some() {
                return Err(bad(
                    "from checksum present in a whole-version stream, or missing in a diff".into(),
                ));
            }
        }
        buf.resize(payload as usize, 0);
        self.r
            .read_exact(buf)
            .map_err(|e| short(e, "a record's data"))?;
        let crc = crc32c::crc32c_append(crc32c::crc32c(&h[..28]), buf);
        if crc != u32_at(28) {
            return Err(bad(format!("checksum mismatch at byte {}", rec.offset)));
        }
        if kind == KIND_END {
            if rec.offset != self.records || rec.length != self.data_bytes {
                return Err(bad(format!(
                    "END counts {} records and {} bytes; the stream had {} and {}",
                    rec.offset, rec.length, self.records, self.data_bytes
                )));
            }
            self.ended = true;
            return Ok(None);
        }
        self.records += 1;
        self.data_bytes += payload;
        self.last_end = rec.offset + rec.length;
        Ok(Some(rec))
    }
}

/// Asks the kernel to start writing `len` bytes at `off` of `f` back to its device, without
/// waiting (a hint: errors are ignored, the final sync reports them).
fn kick_writeback(f: &std::fs::File, off: u64, len: u64) {
    use std::os::fd::AsRawFd;
    // SAFETY: `sync_file_range` only reads its scalar arguments; the descriptor is borrowed
    // from a live `File` for the duration of the call.
    unsafe {
        libc::sync_file_range(
            f.as_raw_fd(),
            off as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        );
    }
}

/// Writes version `to` whole as a raw image into `out` (a regular file that reads as zeroes
/// where nothing is written: the caller truncated it), with positioned writes; chunks that read
/// as zeroes are skipped (holes). With `writeback`, each piece's writeback starts as soon as it
/// is written (for a caller that syncs the file afterwards). The file is sized to the volume
/// first. `progress` gets the bytes covered so far after each piece. Returns the data bytes
/// written.
pub fn write_raw(
    o: &Origin,
    to: Option<u32>,
    out: &std::fs::File,
    writeback: bool,
    mut progress: impl FnMut(u64),
) -> Result<u64, StreamError> {
    use std::os::unix::fs::FileExt;
    let size = o.size();
    let cs = o.chunk_size() as usize;
    read_version(o, to, 0, &mut [])?;
    out.set_len(size).map_err(io("sizing the output file"))?;
    let mut buf = vec![0u8; MAX_RECORD as usize];
    let mut written = 0u64;
    let mut off = 0u64;
    while off < size {
        let n = (size - off).min(MAX_RECORD) as usize;
        read_version(o, to, off, &mut buf[..n])?;
        for (a, b, zero) in runs(&buf[..n], cs) {
            if !zero {
                out.write_all_at(&buf[a..b], off + a as u64)
                    .map_err(io("writing the output file"))?;
                written += (b - a) as u64;
            }
        }
        // Start writing back what was just written (asynchronously), so that the caller's
        // final sync has little left to do: without this a 512 MiB export spent half its time
        // in that sync, after the copy.
        if writeback {
            kick_writeback(out, off, n as u64);
        }
        off += n as u64;
        progress(off);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips() {
        for h in [
            Header {
                origin_id: "disk.raw".into(),
                from: Some(3),
                to: None,
                size: 1 << 30,
                chunk_size: 4096,
            },
            Header {
                origin_id: String::new(),
                from: None,
                to: Some(9),
                size: 4096,
                chunk_size: 65536,
            },
        ] {
            let b = h.encode();
            assert_eq!(Header::read(&mut &b[..]).unwrap(), h);
            for i in 0..b.len() {
                let mut c = b.clone();
                c[i] ^= 0x40;
                assert!(Header::read(&mut &c[..]).is_err(), "flip at {i} accepted");
            }
            assert!(Header::read(&mut &b[..b.len() - 1]).is_err());
        }
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut rng = fastrand::Rng::with_seed(3);
        let h = Header {
            origin_id: "o".into(),
            from: Some(1),
            to: Some(2),
            size: 1 << 20,
            chunk_size: 4096,
        }
        .encode();
        for _ in 0..2000 {
            let mut b = h.clone();
            let n = rng.usize(0..200);
            b.extend((0..n).map(|_| rng.u8(..)));
            if let Ok(mut r) = StreamReader::new(&b[..]) {
                let mut buf = Vec::new();
                while let Ok(Some(_)) = r.next_record(&mut buf) {}
            }
        }
    }
}
