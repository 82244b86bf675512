//! Parsing a well-shaped chain into a [`Request`]: the header, the data lengths and the
//! DISCARD / WRITE_ZEROES segments, each checked against the export (alignment, range,
//! read-only, limits). No disk I/O happens here; every refusal is decided before any.

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};

use super::chain::{ChainLayout, ParsedChain};
use super::error::RequestError;
use super::guest_memory::{read_segs, sub_segs, GuestMem};
use crate::vhost_blk::config::{
    MAX_DISCARD_SECTORS, MAX_DISCARD_SEG, MAX_WRITE_ZEROES_SECTORS, SECTOR_SHIFT, SECTOR_SIZE,
};

/// Size of `struct virtio_blk_outhdr`.
pub const HEADER_SIZE: u64 = 16;
/// Size of one `struct virtio_blk_discard_write_zeroes`.
const DWZ_SEG_SIZE: u64 = 16;

/// The kind of a request, as counted and logged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestKind {
    /// VIRTIO_BLK_T_IN.
    Read,
    /// VIRTIO_BLK_T_OUT.
    Write,
    /// VIRTIO_BLK_T_FLUSH.
    Flush,
    /// VIRTIO_BLK_T_GET_ID.
    GetId,
    /// VIRTIO_BLK_T_DISCARD.
    Discard,
    /// VIRTIO_BLK_T_WRITE_ZEROES.
    WriteZeroes,
}

impl RequestKind {
    /// The kind of a virtio request type, if the device knows it.
    pub fn from_type(t: u32) -> Option<RequestKind> {
        Some(match t {
            VIRTIO_BLK_T_IN => RequestKind::Read,
            VIRTIO_BLK_T_OUT => RequestKind::Write,
            VIRTIO_BLK_T_FLUSH => RequestKind::Flush,
            VIRTIO_BLK_T_GET_ID => RequestKind::GetId,
            VIRTIO_BLK_T_DISCARD => RequestKind::Discard,
            VIRTIO_BLK_T_WRITE_ZEROES => RequestKind::WriteZeroes,
            _ => return None,
        })
    }

    /// The name used in error messages.
    pub fn name(self) -> &'static str {
        match self {
            RequestKind::Read => "read",
            RequestKind::Write => "write",
            RequestKind::Flush => "flush",
            RequestKind::GetId => "get-id",
            RequestKind::Discard => "discard",
            RequestKind::WriteZeroes => "write-zeroes",
        }
    }
}

/// A request checked against the export, ready to execute. Offsets and lengths are bytes.
#[derive(Debug, PartialEq, Eq)]
pub enum Request {
    /// Read `len` bytes at `offset` into the device-writable data buffers.
    Read {
        /// Disk offset.
        offset: u64,
        /// Data length (at most `u32::MAX`).
        len: u64,
    },
    /// Write the `len` bytes of the device-readable data buffers at `offset`.
    Write {
        /// Disk offset.
        offset: u64,
        /// Data length.
        len: u64,
    },
    /// Make every completed write durable.
    Flush,
    /// Answer the first `len` bytes (at most 20) of the device id.
    GetId {
        /// Bytes to write into the data buffers.
        len: usize,
    },
    /// Deallocate each `(offset, len)` range (empty ranges left out).
    Discard {
        /// The ranges, in the guest's order.
        ranges: Vec<(u64, u64)>,
    },
    /// Write zeroes over each `(offset, len)` range (empty ranges left out).
    WriteZeroes {
        /// The ranges, in the guest's order.
        ranges: Vec<(u64, u64)>,
    },
}

impl Request {
    /// The request's kind.
    pub fn kind(&self) -> RequestKind {
        match self {
            Request::Read { .. } => RequestKind::Read,
            Request::Write { .. } => RequestKind::Write,
            Request::Flush => RequestKind::Flush,
            Request::GetId { .. } => RequestKind::GetId,
            Request::Discard { .. } => RequestKind::Discard,
            Request::WriteZeroes { .. } => RequestKind::WriteZeroes,
        }
    }

    /// Bytes of the disk the request covers (0 for flush and get-id).
    pub fn disk_bytes(&self) -> u64 {
        match self {
            Request::Read { len, .. } | Request::Write { len, .. } => *len,
            Request::Discard { ranges } | Request::WriteZeroes { ranges } => {
                ranges.iter().map(|&(_, len)| len).sum()
            }
            Request::Flush | Request::GetId { .. } => 0,
        }
    }

    /// Reads the header and the control data of a well-shaped chain and checks them against
    /// a disk of `size` bytes. The checks run in the order the guest sees their errors.
    pub fn parse(
        mem: &GuestMem,
        layout: &ChainLayout,
        size: u64,
        readonly: bool,
    ) -> Result<Request, RequestError> {
        let rlen = layout.readable_len();
        if rlen < HEADER_SIZE {
            return Err(RequestError::ShortHeader(rlen));
        }
        let mut hdr = [0u8; HEADER_SIZE as usize];
        read_segs(mem, &sub_segs(&layout.readable, 0, HEADER_SIZE), &mut hdr)?;
        let rtype = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
        let sector = u64::from_le_bytes([
            hdr[8], hdr[9], hdr[10], hdr[11], hdr[12], hdr[13], hdr[14], hdr[15],
        ]);
        let Some(kind) = RequestKind::from_type(rtype) else {
            return Err(RequestError::Unsupported(rtype));
        };
        let what = kind.name();
        // Everything writable but the status byte.
        let wdata_len = layout.writable_len() - 1;
        let rdata_len = rlen - HEADER_SIZE;

        match kind {
            RequestKind::Read => {
                if wdata_len % SECTOR_SIZE != 0 {
                    return Err(RequestError::Unaligned {
                        what,
                        len: wdata_len,
                    });
                }
                let offset = byte_range(what, sector, wdata_len, size)?;
                u32::try_from(wdata_len).map_err(|_| RequestError::TooLong)?;
                Ok(Request::Read {
                    offset,
                    len: wdata_len,
                })
            }
            RequestKind::Write => {
                if readonly {
                    return Err(RequestError::ReadOnly(what));
                }
                if rdata_len % SECTOR_SIZE != 0 {
                    return Err(RequestError::Unaligned {
                        what,
                        len: rdata_len,
                    });
                }
                let offset = byte_range(what, sector, rdata_len, size)?;
                Ok(Request::Write {
                    offset,
                    len: rdata_len,
                })
            }
            RequestKind::Flush => Ok(Request::Flush),
            RequestKind::GetId => Ok(Request::GetId {
                len: wdata_len.min(u64::from(VIRTIO_BLK_ID_BYTES)) as usize,
            }),
            RequestKind::Discard | RequestKind::WriteZeroes => {
                if readonly {
                    return Err(RequestError::ReadOnly(what));
                }
                let ranges = parse_segments(mem, layout, kind, rdata_len, size)?;
                Ok(if kind == RequestKind::Discard {
                    Request::Discard { ranges }
                } else {
                    Request::WriteZeroes { ranges }
                })
            }
        }
    }
}

/// Reads and checks the segments of a DISCARD or WRITE_ZEROES request: every segment is
/// checked before the disk is touched.
fn parse_segments(
    mem: &GuestMem,
    layout: &ChainLayout,
    kind: RequestKind,
    rdata_len: u64,
    size: u64,
) -> Result<Vec<(u64, u64)>, RequestError> {
    let what = kind.name();
    let bad = |why: String| RequestError::BadSegments { what, why };
    if rdata_len == 0 || rdata_len % DWZ_SEG_SIZE != 0 {
        return Err(bad(format!(
            "payload of {rdata_len} bytes is not a non-empty array of 16-byte segments"
        )));
    }
    let nseg = rdata_len / DWZ_SEG_SIZE;
    if nseg > u64::from(MAX_DISCARD_SEG) {
        return Err(bad(format!(
            "{nseg} segments, at most {MAX_DISCARD_SEG} allowed"
        )));
    }
    let mut payload = vec![0u8; rdata_len as usize];
    read_segs(
        mem,
        &sub_segs(&layout.readable, HEADER_SIZE, rdata_len),
        &mut payload,
    )?;
    let (max_sectors, allowed_flags) = if kind == RequestKind::Discard {
        (MAX_DISCARD_SECTORS, 0)
    } else {
        (MAX_WRITE_ZEROES_SECTORS, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)
    };
    let mut ranges = Vec::with_capacity(nseg as usize);
    for s in payload.chunks_exact(DWZ_SEG_SIZE as usize) {
        let mut sb = [0u8; 8];
        sb.copy_from_slice(&s[0..8]);
        let sec = u64::from_le_bytes(sb);
        let num = u32::from_le_bytes([s[8], s[9], s[10], s[11]]);
        let flags = u32::from_le_bytes([s[12], s[13], s[14], s[15]]);
        if flags & !allowed_flags != 0 {
            return Err(RequestError::UnsupportedFlags { what, flags });
        }
        if num > max_sectors {
            return Err(bad(format!(
                "segment of {num} sectors exceeds the limit of {max_sectors}"
            )));
        }
        let len = u64::from(num) << SECTOR_SHIFT;
        let off = byte_range(what, sec, len, size)?;
        if len > 0 {
            ranges.push((off, len));
        }
    }
    Ok(ranges)
}

/// The byte offset of `len` bytes at `sector`, if they lie inside a disk of `size` bytes.
fn byte_range(what: &'static str, sector: u64, len: u64, size: u64) -> Result<u64, RequestError> {
    let oob = || RequestError::OutOfRange {
        what,
        sector,
        len,
        size,
    };
    let offset = sector.checked_mul(SECTOR_SIZE).ok_or_else(oob)?;
    let end = offset.checked_add(len).ok_or_else(oob)?;
    if end > size {
        return Err(oob());
    }
    Ok(offset)
}

impl ParsedChain {
    /// The request type in the header, if the chain is well formed and the header readable.
    pub fn request_type(&self, mem: &GuestMem) -> Option<u32> {
        if self.fault.is_some() {
            return None;
        }
        let mut t = [0u8; 4];
        read_segs(mem, &sub_segs(&self.layout.readable, 0, 4), &mut t).ok()?;
        (self.layout.readable_len() >= HEADER_SIZE).then(|| u32::from_le_bytes(t))
    }
}
