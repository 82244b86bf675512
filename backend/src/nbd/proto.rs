//! The NBD wire format (NetworkBlockDevice/nbd `doc/proto.md`): magics, option and command
//! numbers, the request header, and the pure parsers and checks of what a client sends.

use std::io::{IoSlice, Write};

pub(super) const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub(super) const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub(super) const REP_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub(super) const REQUEST_MAGIC: u32 = 0x2560_9513;
pub(super) const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub(super) const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

pub(super) const FLAG_FIXED_NEWSTYLE: u16 = 1;
pub(super) const FLAG_NO_ZEROES: u16 = 2;
pub(super) const FLAG_C_FIXED_NEWSTYLE: u32 = 1;
pub(super) const FLAG_C_NO_ZEROES: u32 = 2;

pub(super) const OPT_EXPORT_NAME: u32 = 1;
pub(super) const OPT_ABORT: u32 = 2;
pub(super) const OPT_LIST: u32 = 3;
pub(super) const OPT_INFO: u32 = 6;
pub(super) const OPT_GO: u32 = 7;
pub(super) const OPT_STRUCTURED_REPLY: u32 = 8;
pub(super) const OPT_LIST_META_CONTEXT: u32 = 9;
pub(super) const OPT_SET_META_CONTEXT: u32 = 10;

pub(super) const REP_ACK: u32 = 1;
pub(super) const REP_SERVER: u32 = 2;
pub(super) const REP_INFO: u32 = 3;
pub(super) const REP_META_CONTEXT: u32 = 4;
pub(super) const REP_ERR_UNSUP: u32 = 0x8000_0001;
pub(super) const REP_ERR_INVALID: u32 = 0x8000_0003;
pub(super) const REP_ERR_UNKNOWN: u32 = 0x8000_0006;
pub(super) const REP_ERR_TOO_BIG: u32 = 0x8000_0009;

pub(super) const INFO_EXPORT: u16 = 0;
pub(super) const INFO_BLOCK_SIZE: u16 = 3;

pub(super) const TFLAG_HAS_FLAGS: u16 = 1;
pub(super) const TFLAG_READ_ONLY: u16 = 2;
pub(super) const TFLAG_SEND_FLUSH: u16 = 4;
pub(super) const TFLAG_SEND_FUA: u16 = 8;
pub(super) const TFLAG_SEND_TRIM: u16 = 32;
pub(super) const TFLAG_SEND_WRITE_ZEROES: u16 = 64;
pub(super) const TFLAG_SEND_DF: u16 = 128;
pub(super) const TFLAG_CAN_MULTI_CONN: u16 = 256;

/// Request types.
pub const CMD_READ: u16 = 0;
/// Write.
pub const CMD_WRITE: u16 = 1;
/// Disconnect.
pub const CMD_DISC: u16 = 2;
/// Flush.
pub const CMD_FLUSH: u16 = 3;
/// Trim.
pub const CMD_TRIM: u16 = 4;
/// Write zeroes.
pub const CMD_WRITE_ZEROES: u16 = 6;
/// Block status.
pub const CMD_BLOCK_STATUS: u16 = 7;

pub(super) const CMD_FLAG_FUA: u16 = 1;
pub(super) const CMD_FLAG_NO_HOLE: u16 = 2;
pub(super) const CMD_FLAG_DF: u16 = 4;
pub(super) const CMD_FLAG_REQ_ONE: u16 = 8;

pub(super) const REPLY_FLAG_DONE: u16 = 1;
pub(super) const REPLY_TYPE_NONE: u16 = 0;
pub(super) const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub(super) const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub(super) const REPLY_TYPE_ERROR: u16 = 0x8001;

pub(super) const EPERM: u32 = 1;
pub(super) const EIO: u32 = 5;
pub(super) const EINVAL: u32 = 22;
pub(super) const ENOSPC: u32 = 28;
pub(super) const EOVERFLOW: u32 = 75;

pub(super) const STATE_HOLE: u32 = 1;
pub(super) const STATE_ZERO: u32 = 2;

/// Largest read or write a client may ask for (advertised as the maximum block size).
pub const MAX_REQUEST: u32 = 32 << 20;
/// Largest option payload accepted during the handshake.
pub(super) const MAX_OPTION: u32 = 64 << 10;
/// Extents of one block-status reply at most.
pub(super) const MAX_EXTENTS: usize = 4096;

/// Context ids.
pub(super) const CTX_ALLOCATION: u32 = 1;
pub(super) const CTX_CHANGED: u32 = 2;

/// A request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Command flags.
    pub flags: u16,
    /// Type.
    pub kind: u16,
    /// The client's cookie.
    pub cookie: u64,
    /// Offset.
    pub offset: u64,
    /// Length.
    pub length: u32,
}

/// A request header that cannot be trusted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad NBD request magic {0:#010x}")]
pub struct BadMagic(pub u32);

/// Parses the 28-byte request header.
pub fn parse_request(h: &[u8; 28]) -> Result<Request, BadMagic> {
    let magic = u32::from_be_bytes([h[0], h[1], h[2], h[3]]);
    if magic != REQUEST_MAGIC {
        return Err(BadMagic(magic));
    }
    let mut c = [0u8; 8];
    c.copy_from_slice(&h[8..16]);
    let mut o = [0u8; 8];
    o.copy_from_slice(&h[16..24]);
    Ok(Request {
        flags: u16::from_be_bytes([h[4], h[5]]),
        kind: u16::from_be_bytes([h[6], h[7]]),
        cookie: u64::from_be_bytes(c),
        offset: u64::from_be_bytes(o),
        length: u32::from_be_bytes([h[24], h[25], h[26], h[27]]),
    })
}

/// What a request may do, before it touches the disk: `Err(errno)` for a clean error reply.
pub fn check_request(r: &Request, size: u64, readonly: bool) -> Result<(), u32> {
    let known = CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_DF | CMD_FLAG_REQ_ONE;
    if r.flags & !known != 0 {
        return Err(EINVAL);
    }
    let in_range = r
        .offset
        .checked_add(r.length as u64)
        .is_some_and(|e| e <= size);
    match r.kind {
        CMD_READ | CMD_WRITE => {
            if r.length > MAX_REQUEST {
                return Err(EOVERFLOW);
            }
            if !in_range || r.offset % 512 != 0 || r.length % 512 != 0 {
                return Err(EINVAL);
            }
            if r.kind == CMD_WRITE && readonly {
                return Err(EPERM);
            }
        }
        CMD_TRIM | CMD_WRITE_ZEROES => {
            if !in_range || r.offset % 512 != 0 || r.length % 512 != 0 {
                return Err(EINVAL);
            }
            if readonly {
                return Err(EPERM);
            }
        }
        CMD_BLOCK_STATUS => {
            if !in_range || r.length == 0 {
                return Err(EINVAL);
            }
        }
        CMD_FLUSH | CMD_DISC => {}
        _ => return Err(EINVAL),
    }
    Ok(())
}

pub(super) fn be32(b: &[u8], at: usize) -> Option<u32> {
    b.get(at..at + 4)
        .map(|x| u32::from_be_bytes([x[0], x[1], x[2], x[3]]))
}

pub(super) fn be16(b: &[u8], at: usize) -> Option<u16> {
    b.get(at..at + 2).map(|x| u16::from_be_bytes([x[0], x[1]]))
}

/// Parses the name and the info requests of `NBD_OPT_INFO`/`GO`.
pub(super) fn parse_go(d: &[u8]) -> Option<(String, Vec<u16>)> {
    let n = be32(d, 0)? as usize;
    let name = d.get(4..4usize.checked_add(n)?)?;
    let at = 4 + n;
    let k = be16(d, at)? as usize;
    if d.len() != at + 2 + 2 * k {
        return None;
    }
    let infos = (0..k).filter_map(|i| be16(d, at + 2 + 2 * i)).collect();
    Some((String::from_utf8_lossy(name).into_owned(), infos))
}

/// Parses `NBD_OPT_LIST/SET_META_CONTEXT`: export name and queries.
pub(super) fn parse_meta(d: &[u8]) -> Option<(String, Vec<String>)> {
    let n = be32(d, 0)? as usize;
    let name = d.get(4..4usize.checked_add(n)?)?;
    let mut at = 4 + n;
    let k = be32(d, at)? as usize;
    at += 4;
    let mut qs = Vec::new();
    for _ in 0..k {
        let l = be32(d, at)? as usize;
        let q = d.get(at + 4..(at + 4).checked_add(l)?)?;
        qs.push(String::from_utf8_lossy(q).into_owned());
        at += 4 + l;
    }
    if at != d.len() {
        return None;
    }
    Some((String::from_utf8_lossy(name).into_owned(), qs))
}

pub(super) trait WriteAllVectored {
    fn write_all_vectored_compat(&mut self, bufs: &[IoSlice<'_>]) -> std::io::Result<()>;
}

impl<W: Write> WriteAllVectored for W {
    fn write_all_vectored_compat(&mut self, bufs: &[IoSlice<'_>]) -> std::io::Result<()> {
        for b in bufs {
            self.write_all(b)?;
        }
        Ok(())
    }
}
