//! A little-endian encoder and a decoder that fails instead of panicking.

use super::{FORMAT_VERSION, OLDEST_VERSION};

/// Why bytes read back do not decode: each variant says what and where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The structure ends before a field it needs.
    #[error("{what} truncated at byte {at} (wanted {wanted} more of {len})")]
    Truncated {
        /// The structure.
        what: &'static str,
        /// Where the field starts.
        at: usize,
        /// Bytes the field needs.
        wanted: usize,
        /// Bytes of the structure.
        len: usize,
    },
    /// A length-prefixed field is longer than its limit.
    #[error("{what} has a {len}-byte field at byte {at} (limit {limit})")]
    FieldTooLong {
        /// The structure.
        what: &'static str,
        /// The field's length.
        len: usize,
        /// Where the field's bytes start.
        at: usize,
        /// The limit.
        limit: usize,
    },
    /// A string field is not UTF-8.
    #[error("{what} has invalid UTF-8 at byte {at}")]
    BadUtf8 {
        /// The structure.
        what: &'static str,
        /// Where the field starts.
        at: usize,
    },
    /// A superblock slot does not start with the snapmv magic.
    #[error("bad magic (not a snapmv store)")]
    NotAStore,
    /// A checkpoint does not start with its magic.
    #[error("checkpoint has a bad magic")]
    BadCheckpointMagic,
    /// The format version is not one this build reads.
    #[error("format version {0} is not supported (this build reads {OLDEST_VERSION} to {FORMAT_VERSION})")]
    UnsupportedVersion(u32),
    /// The superblock's checksum does not match.
    #[error("checksum mismatch")]
    Checksum,
    /// A node kind byte is not a kind.
    #[error("unknown node kind")]
    UnknownNodeKind(u8),
    /// A record type byte is not a record type.
    #[error("unknown record type {0}")]
    UnknownRecord(u8),
    /// A field holds a value outside its range, or fields contradict each other.
    #[error("{0}")]
    Invalid(String),
}

/// A little-endian writer.
#[derive(Default)]
pub struct Enc(pub Vec<u8>);

impl Enc {
    pub fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    pub fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub fn bytes(&mut self, v: &[u8]) {
        self.u32(v.len() as u32);
        self.0.extend_from_slice(v);
    }
    pub fn str(&mut self, v: &str) {
        self.bytes(v.as_bytes());
    }
}

/// A little-endian reader that fails instead of panicking on short input.
pub struct Dec<'a> {
    buf: &'a [u8],
    pub(super) pos: usize,
    what: &'static str,
}

impl<'a> Dec<'a> {
    pub fn new(buf: &'a [u8], what: &'static str) -> Self {
        Dec { buf, pos: 0, what }
    }
    pub(super) fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        match end {
            Some(end) => {
                let s = &self.buf[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None => Err(DecodeError::Truncated {
                what: self.what,
                at: self.pos,
                wanted: n,
                len: self.buf.len(),
            }),
        }
    }
    pub fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    pub fn u32(&mut self) -> Result<u32, DecodeError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    pub fn u64(&mut self) -> Result<u64, DecodeError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    pub fn bytes(&mut self, max: usize) -> Result<&'a [u8], DecodeError> {
        let n = self.u32()? as usize;
        if n > max {
            return Err(DecodeError::FieldTooLong {
                what: self.what,
                len: n,
                at: self.pos,
                limit: max,
            });
        }
        self.take(n)
    }
    pub fn string(&mut self, max: usize) -> Result<String, DecodeError> {
        let pos = self.pos;
        let b = self.bytes(max)?;
        String::from_utf8(b.to_vec()).map_err(|_| DecodeError::BadUtf8 {
            what: self.what,
            at: pos,
        })
    }
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
}
