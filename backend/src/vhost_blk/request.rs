//! Parsing a virtio-blk descriptor chain and executing it against a [`BlockDisk`].
//!
//! Nothing the guest writes into its rings can make this code panic: every address goes
//! through guest-memory lookups, every length through checked arithmetic, and any malformed
//! chain ends as an IOERR (or UNSUPP) status, or, when the chain has no writable status byte,
//! as a used entry of length 0.

use std::io::{IoSlice, IoSliceMut};

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::config::{
    MAX_DISCARD_SECTORS, MAX_DISCARD_SEG, MAX_WRITE_ZEROES_SECTORS, SECTOR_SHIFT, SECTOR_SIZE,
};
use super::{BlockDisk, DiskError};

/// Guest memory as the device sees it.
pub type GuestMem = GuestMemoryMmap<()>;

/// Size of `struct virtio_blk_outhdr`.
pub const HEADER_SIZE: u64 = 16;
/// Size of one `struct virtio_blk_discard_write_zeroes`.
const DWZ_SEG_SIZE: u64 = 16;
/// Most descriptors accepted in one chain (IOV_MAX, the limit of preadv/pwritev).
pub const MAX_CHAIN_DESCS: usize = 1024;

/// A piece of guest memory named by a descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Seg {
    /// Guest physical address.
    pub addr: GuestAddress,
    /// Length in bytes.
    pub len: u64,
}

/// Why a request failed; logged with the export's name by the device.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The chain ended early: the descriptor iterator stopped at a descriptor that still had
    /// NEXT set (loop, out-of-table index, unreadable or nested indirect table, length overflow).
    #[error("malformed descriptor chain: stopped after {0} descriptors at a bad next/indirect link, loop or length overflow")]
    Truncated(usize),
    /// The chain has no descriptor at all (bad head or unreadable indirect table).
    #[error("empty descriptor chain (bad head index or unreadable indirect table)")]
    Empty,
    /// More descriptors than the device accepts.
    #[error("descriptor chain has more than {MAX_CHAIN_DESCS} descriptors")]
    TooLong,
    /// A device-readable descriptor follows a device-writable one.
    #[error("device-readable descriptor after a device-writable one")]
    Order,
    /// No device-writable byte for the status.
    #[error("no device-writable status byte in the chain")]
    NoStatus,
    /// The request header is shorter than 16 bytes.
    #[error("request header is {0} bytes, 16 needed")]
    ShortHeader(u64),
    /// A guest address is outside guest memory.
    #[error("guest buffer {addr:#x}+{len} is not inside guest memory: {source}")]
    BadAddress {
        /// Start of the buffer.
        addr: u64,
        /// Its length.
        len: u64,
        /// What vm-memory said.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// Data length is not a multiple of 512.
    #[error("{what} data length {len} is not a multiple of 512")]
    Unaligned {
        /// Request type.
        what: &'static str,
        /// The length.
        len: u64,
    },
    /// The request reaches past the end of the volume.
    #[error("{what} of {len} bytes at sector {sector} is past the end of the {size}-byte volume")]
    OutOfRange {
        /// Request type.
        what: &'static str,
        /// First sector.
        sector: u64,
        /// Length in bytes.
        len: u64,
        /// Volume size.
        size: u64,
    },
    /// Write to a read-only export.
    #[error("{0} on a read-only export")]
    ReadOnly(&'static str),
    /// Malformed DISCARD / WRITE_ZEROES payload.
    #[error("{what}: {why}")]
    BadSegments {
        /// Request type.
        what: &'static str,
        /// What is wrong.
        why: String,
    },
    /// Unknown request type or flag.
    #[error("unsupported request type {0}")]
    Unsupported(u32),
    /// Unsupported flags in a DISCARD / WRITE_ZEROES segment.
    #[error("{what}: unsupported flags {flags:#x}")]
    UnsupportedFlags {
        /// Request type.
        what: &'static str,
        /// The flags.
        flags: u32,
    },
    /// The disk failed.
    #[error("{what} failed: {source}")]
    Disk {
        /// Request type.
        what: &'static str,
        /// The disk's error.
        #[source]
        source: DiskError,
    },
}

impl RequestError {
    /// The virtio status this error is reported with.
    pub fn status(&self) -> u8 {
        match self {
            RequestError::Unsupported(_) | RequestError::UnsupportedFlags { .. } => {
                VIRTIO_BLK_S_UNSUPP as u8
            }
            _ => VIRTIO_BLK_S_IOERR as u8,
        }
    }

    /// True when the guest sent something malformed (as opposed to a disk failure or an
    /// ordinary refused request).
    pub fn is_guest_fault(&self) -> bool {
        !matches!(
            self,
            RequestError::Disk { .. }
                | RequestError::OutOfRange { .. }
                | RequestError::ReadOnly(_)
                | RequestError::Unsupported(_)
                | RequestError::UnsupportedFlags { .. }
        )
    }
}

/// The descriptors of one chain, sorted into the device-readable and device-writable parts.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ChainLayout {
    /// Device-readable buffers, in order.
    pub readable: Vec<Seg>,
    /// Device-writable buffers, in order.
    pub writable: Vec<Seg>,
}

impl ChainLayout {
    /// Walks the descriptors and checks the chain's shape. The crate's iterator stops silently
    /// on a bad link: a chain is complete only if its last descriptor has no NEXT flag.
    ///
    /// On a malformed chain the error comes with what was seen so far, so that the caller can
    /// still report IOERR in the last writable byte the guest offered.
    pub fn collect(
        descs: impl Iterator<Item = Descriptor>,
    ) -> Result<ChainLayout, (ChainLayout, RequestError)> {
        let mut layout = ChainLayout::default();
        let mut count = 0usize;
        let mut last_has_next = false;
        for d in descs {
            count += 1;
            if count > MAX_CHAIN_DESCS {
                return Err((layout, RequestError::TooLong));
            }
            last_has_next = d.has_next();
            let seg = Seg {
                addr: d.addr(),
                len: u64::from(d.len()),
            };
            if d.is_write_only() {
                layout.writable.push(seg);
            } else {
                if !layout.writable.is_empty() {
                    return Err((layout, RequestError::Order));
                }
                layout.readable.push(seg);
            }
        }
        if count == 0 {
            return Err((layout, RequestError::Empty));
        }
        if last_has_next {
            return Err((layout, RequestError::Truncated(count)));
        }
        Ok(layout)
    }

    /// Address of the status byte: the last byte of the device-writable part.
    pub fn status_addr(&self) -> Option<GuestAddress> {
        let last = self.writable.iter().rev().find(|s| s.len > 0)?;
        last.addr.checked_add(last.len - 1)
    }

    fn readable_len(&self) -> u64 {
        self.readable.iter().map(|s| s.len).sum()
    }

    fn writable_len(&self) -> u64 {
        self.writable.iter().map(|s| s.len).sum()
    }
}

/// The `take` bytes that start `skip` bytes into `segs`.
pub fn sub_segs(segs: &[Seg], mut skip: u64, mut take: u64) -> Vec<Seg> {
    let mut out = Vec::new();
    for s in segs {
        if take == 0 {
            break;
        }
        if skip >= s.len {
            skip -= s.len;
            continue;
        }
        let n = (s.len - skip).min(take);
        // An address that overflows becomes one no memory region holds, so the access fails.
        let addr = s.addr.checked_add(skip).unwrap_or(GuestAddress(u64::MAX));
        out.push(Seg { addr, len: n });
        take -= n;
        skip = 0;
    }
    out
}

fn bad_address(seg: &Seg, source: vm_memory::GuestMemoryError) -> RequestError {
    RequestError::BadAddress {
        addr: seg.addr.raw_value(),
        len: seg.len,
        source,
    }
}

/// Host addresses of the buffers, one entry per piece inside one memory region (a buffer that
/// spans two regions is split, not refused).
pub fn host_ranges(mem: &GuestMem, segs: &[Seg]) -> Result<Vec<(*mut u8, usize)>, RequestError> {
    let mut out = Vec::with_capacity(segs.len());
    for seg in segs {
        let len = usize::try_from(seg.len)
            .map_err(|_| bad_address(seg, vm_memory::GuestMemoryError::GuestAddressOverflow))?;
        for slice in mem.get_slices(seg.addr, len) {
            let slice = slice.map_err(|e| bad_address(seg, e))?;
            out.push((slice.ptr_guard_mut().as_ptr(), slice.len()));
        }
    }
    Ok(out)
}

/// Copies `segs` (small control data) out of guest memory.
fn read_segs(mem: &GuestMem, segs: &[Seg], out: &mut [u8]) -> Result<(), RequestError> {
    let mut pos = 0usize;
    for seg in segs {
        let n = seg.len as usize;
        mem.read_slice(&mut out[pos..pos + n], seg.addr)
            .map_err(|e| bad_address(seg, e))?;
        pos += n;
    }
    Ok(())
}

/// Copies `data` into guest memory over `segs` (which must cover at least `data.len()`).
fn write_segs(mem: &GuestMem, segs: &[Seg], data: &[u8]) -> Result<(), RequestError> {
    let mut pos = 0usize;
    for seg in segs {
        if pos >= data.len() {
            break;
        }
        let n = (seg.len as usize).min(data.len() - pos);
        mem.write_slice(&data[pos..pos + n], seg.addr)
            .map_err(|e| bad_address(seg, e))?;
        pos += n;
    }
    Ok(())
}

/// What the device knows when executing a request.
pub struct RequestContext<'a> {
    /// The disk served.
    pub disk: &'a dyn BlockDisk,
    /// Its size in bytes (cached).
    pub size: u64,
    /// Refuse writes.
    pub readonly: bool,
    /// Write-back cache on; when off every write is followed by a flush.
    pub writeback: bool,
    /// Answer to GET_ID (at most 20 bytes).
    pub id: &'a [u8],
}

/// The outcome of one chain: the status written (if any) and the used length to report.
#[derive(Debug)]
pub struct Completion {
    /// Bytes written into the device-writable part, status byte included.
    pub used_len: u32,
    /// The error, if the request failed.
    pub error: Option<RequestError>,
}

fn kind_name(t: u32) -> &'static str {
    match t {
        VIRTIO_BLK_T_IN => "read",
        VIRTIO_BLK_T_OUT => "write",
        VIRTIO_BLK_T_FLUSH => "flush",
        VIRTIO_BLK_T_GET_ID => "get-id",
        VIRTIO_BLK_T_DISCARD => "discard",
        VIRTIO_BLK_T_WRITE_ZEROES => "write-zeroes",
        _ => "unknown request",
    }
}

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

/// Parses and executes one chain. Never panics on guest input.
pub fn handle_chain(
    mem: &GuestMem,
    descs: impl Iterator<Item = Descriptor>,
    ctx: &RequestContext<'_>,
) -> Completion {
    let (layout, fault) = match ChainLayout::collect(descs) {
        Ok(l) => (l, None),
        Err((l, e)) => (l, Some(e)),
    };
    let Some(status_addr) = layout.status_addr() else {
        return Completion {
            used_len: 0,
            error: Some(fault.unwrap_or(RequestError::NoStatus)),
        };
    };
    let (result, data_written) = match fault {
        Some(e) => (Err(e), 0),
        None => match execute(mem, &layout, ctx) {
            Ok(n) => (Ok(()), n),
            Err(e) => (Err(e), 0),
        },
    };
    let status = match &result {
        Ok(()) => VIRTIO_BLK_S_OK as u8,
        Err(e) => e.status(),
    };
    if let Err(e) = mem.write_obj(status, status_addr) {
        return Completion {
            used_len: 0,
            error: Some(result.err().unwrap_or(RequestError::BadAddress {
                addr: status_addr.raw_value(),
                len: 1,
                source: e,
            })),
        };
    }
    Completion {
        used_len: data_written.saturating_add(1),
        error: result.err(),
    }
}

/// Executes a well-shaped request; returns the bytes written into the data part.
fn execute(
    mem: &GuestMem,
    layout: &ChainLayout,
    ctx: &RequestContext<'_>,
) -> Result<u32, RequestError> {
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
    let what = kind_name(rtype);
    // Everything writable but the status byte.
    let wdata_len = layout.writable_len() - 1;
    let rdata_len = rlen - HEADER_SIZE;
    let disk_err = |source| RequestError::Disk { what, source };

    match rtype {
        VIRTIO_BLK_T_IN => {
            if wdata_len % SECTOR_SIZE != 0 {
                return Err(RequestError::Unaligned {
                    what,
                    len: wdata_len,
                });
            }
            let offset = byte_range(what, sector, wdata_len, ctx.size)?;
            let used = u32::try_from(wdata_len).map_err(|_| RequestError::TooLong)?;
            if wdata_len == 0 {
                return Ok(0);
            }
            let ranges = host_ranges(mem, &sub_segs(&layout.writable, 0, wdata_len))?;
            let mut iov: Vec<IoSliceMut<'_>> = ranges
                .iter()
                .map(|&(p, n)| {
                    // SAFETY: `p..p+n` lies inside a guest memory region mapped by `mem`
                    // (checked by get_slices), which outlives `iov` since `mem` is borrowed
                    // for this whole function. The guest owns this memory and may touch it
                    // concurrently; it is only handed to the disk as a raw byte buffer
                    // (as a DMA target would be) and never interpreted as a Rust value.
                    IoSliceMut::new(unsafe { std::slice::from_raw_parts_mut(p, n) })
                })
                .collect();
            ctx.disk.read_vectored(offset, &mut iov).map_err(disk_err)?;
            Ok(used)
        }
        VIRTIO_BLK_T_OUT => {
            if ctx.readonly {
                return Err(RequestError::ReadOnly(what));
            }
            if rdata_len % SECTOR_SIZE != 0 {
                return Err(RequestError::Unaligned {
                    what,
                    len: rdata_len,
                });
            }
            let offset = byte_range(what, sector, rdata_len, ctx.size)?;
            if rdata_len == 0 {
                return Ok(0);
            }
            let ranges = host_ranges(mem, &sub_segs(&layout.readable, HEADER_SIZE, rdata_len))?;
            let iov: Vec<IoSlice<'_>> = ranges
                .iter()
                .map(|&(p, n)| {
                    // SAFETY: as for reads: `p..p+n` is inside a mapped guest region that
                    // outlives `iov`; the bytes are only copied out as raw data.
                    IoSlice::new(unsafe { std::slice::from_raw_parts(p as *const u8, n) })
                })
                .collect();
            ctx.disk.write_vectored(offset, &iov).map_err(disk_err)?;
            if !ctx.writeback {
                ctx.disk.flush().map_err(disk_err)?;
            }
            Ok(0)
        }
        VIRTIO_BLK_T_FLUSH => {
            ctx.disk.flush().map_err(disk_err)?;
            Ok(0)
        }
        VIRTIO_BLK_T_GET_ID => {
            let n = wdata_len.min(u64::from(VIRTIO_BLK_ID_BYTES)) as usize;
            let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
            let m = ctx.id.len().min(id.len());
            id[..m].copy_from_slice(&ctx.id[..m]);
            write_segs(mem, &layout.writable, &id[..n])?;
            Ok(n as u32)
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            if ctx.readonly {
                return Err(RequestError::ReadOnly(what));
            }
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
            let (max_sectors, allowed_flags) = if rtype == VIRTIO_BLK_T_DISCARD {
                (MAX_DISCARD_SECTORS, 0)
            } else {
                (MAX_WRITE_ZEROES_SECTORS, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)
            };
            // Check every segment before touching the disk.
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
                let off = byte_range(what, sec, len, ctx.size)?;
                if len > 0 {
                    ranges.push((off, len));
                }
            }
            for (off, len) in ranges {
                if rtype == VIRTIO_BLK_T_DISCARD {
                    ctx.disk.discard(off, len).map_err(disk_err)?;
                } else {
                    // UNMAP only permits deallocation; writing zeroes is always correct and
                    // the engine frees what it can on its own.
                    ctx.disk.write_zeroes(off, len).map_err(disk_err)?;
                }
            }
            if !ctx.writeback {
                ctx.disk.flush().map_err(disk_err)?;
            }
            Ok(0)
        }
        other => Err(RequestError::Unsupported(other)),
    }
}
