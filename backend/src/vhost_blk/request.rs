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
    /// The code below the device panicked (a bug); reported as IOERR.
    #[error("request handling panicked: {0}")]
    Panicked(String),
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

    /// True when the disk below failed (as opposed to a request the device refused).
    pub fn is_disk_failure(&self) -> bool {
        matches!(self, RequestError::Disk { .. } | RequestError::Panicked(_))
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

/// A chain whose descriptors have been read (owned, so it can move to another thread).
#[derive(Debug)]
pub struct ParsedChain {
    /// What the descriptors looked like.
    pub layout: ChainLayout,
    /// Why the chain is malformed, if it is.
    pub fault: Option<RequestError>,
}

impl ParsedChain {
    /// Reads the descriptors of one chain.
    pub fn parse(descs: impl Iterator<Item = Descriptor>) -> ParsedChain {
        match ChainLayout::collect(descs) {
            Ok(layout) => ParsedChain {
                layout,
                fault: None,
            },
            Err((layout, e)) => ParsedChain {
                layout,
                fault: Some(e),
            },
        }
    }

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

/// Parses and executes one chain. Never panics on guest input.
pub fn handle_chain(
    mem: &GuestMem,
    descs: impl Iterator<Item = Descriptor>,
    ctx: &RequestContext<'_>,
) -> Completion {
    handle_parsed(mem, ParsedChain::parse(descs), ctx)
}

/// Executes a parsed chain and writes its status. Never panics on guest input; a panic in the
/// disk below is caught and reported as IOERR, so that the queue keeps being served.
pub fn handle_parsed(mem: &GuestMem, chain: ParsedChain, ctx: &RequestContext<'_>) -> Completion {
    let ParsedChain { layout, fault } = chain;
    let Some(status_addr) = layout.status_addr() else {
        return Completion {
            used_len: 0,
            error: Some(fault.unwrap_or(RequestError::NoStatus)),
        };
    };
    let (result, data_written) = match fault {
        Some(e) => (Err(e), 0),
        None => {
            let run = std::panic::AssertUnwindSafe(|| execute(mem, &layout, ctx));
            match std::panic::catch_unwind(run) {
                Ok(Ok(n)) => (Ok(()), n),
                Ok(Err(e)) => (Err(e), 0),
                Err(panic) => {
                    let why = panic
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "unknown panic".into());
                    (Err(RequestError::Panicked(why)), 0)
                }
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vhost_blk::MemDisk;
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};

    const N: u16 = VRING_DESC_F_NEXT as u16;
    const W: u16 = VRING_DESC_F_WRITE as u16;

    fn desc(addr: u64, len: u32, flags: u16) -> Descriptor {
        Descriptor::new(addr, len, flags, 0)
    }

    /// Two adjacent regions: [0, 64 KiB) and [64 KiB, 128 KiB).
    fn mem() -> GuestMem {
        GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x1_0000),
            (GuestAddress(0x1_0000), 0x1_0000),
        ])
        .unwrap()
    }

    fn header(mem: &GuestMem, at: u64, t: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&t.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&h, GuestAddress(at)).unwrap();
    }

    fn ctx<'a>(disk: &'a MemDisk, readonly: bool, id: &'a [u8]) -> RequestContext<'a> {
        RequestContext {
            disk,
            size: disk.size(),
            readonly,
            writeback: true,
            id,
        }
    }

    #[test]
    fn collect_detects_truncation_order_and_empty() {
        let ok = ChainLayout::collect(
            [desc(0, 16, N), desc(0x100, 512, W | N), desc(0x400, 1, W)].into_iter(),
        )
        .unwrap();
        assert_eq!(ok.readable.len(), 1);
        assert_eq!(ok.writable.len(), 2);
        assert_eq!(ok.status_addr(), Some(GuestAddress(0x400)));

        let (_, e) =
            ChainLayout::collect([desc(0, 16, N), desc(0x400, 1, W | N)].into_iter()).unwrap_err();
        assert!(matches!(e, RequestError::Truncated(2)), "{e}");

        let (l, e) = ChainLayout::collect(
            [desc(0, 16, N), desc(0x100, 512, W | N), desc(0x400, 1, 0)].into_iter(),
        )
        .unwrap_err();
        assert!(matches!(e, RequestError::Order), "{e}");
        assert_eq!(l.status_addr(), Some(GuestAddress(0x100 + 511)));

        let (_, e) = ChainLayout::collect(std::iter::empty()).unwrap_err();
        assert!(matches!(e, RequestError::Empty));

        let long = (0..=MAX_CHAIN_DESCS).map(|_| desc(0, 1, N));
        let (_, e) = ChainLayout::collect(long).unwrap_err();
        assert!(matches!(e, RequestError::TooLong));
    }

    #[test]
    fn status_skips_trailing_zero_length_descriptors() {
        let l = ChainLayout::collect(
            [desc(0, 16, N), desc(0x400, 1, W | N), desc(0x800, 0, W)].into_iter(),
        )
        .unwrap();
        assert_eq!(l.status_addr(), Some(GuestAddress(0x400)));
        let l = ChainLayout::collect([desc(0, 16, N), desc(0x800, 0, W)].into_iter()).unwrap();
        assert_eq!(l.status_addr(), None);
    }

    #[test]
    fn sub_segs_skips_and_takes_across_segments() {
        let segs = [
            Seg {
                addr: GuestAddress(0x1000),
                len: 10,
            },
            Seg {
                addr: GuestAddress(0x2000),
                len: 20,
            },
            Seg {
                addr: GuestAddress(0x3000),
                len: 30,
            },
        ];
        assert_eq!(
            sub_segs(&segs, 15, 20),
            vec![
                Seg {
                    addr: GuestAddress(0x2005),
                    len: 15
                },
                Seg {
                    addr: GuestAddress(0x3000),
                    len: 5
                }
            ]
        );
        assert_eq!(sub_segs(&segs, 60, 5), vec![]);
        assert_eq!(sub_segs(&segs, 0, 0), vec![]);
        // An overflowing address becomes one no memory holds.
        let top = [Seg {
            addr: GuestAddress(u64::MAX - 1),
            len: 10,
        }];
        assert_eq!(sub_segs(&top, 5, 1)[0].addr, GuestAddress(u64::MAX));
    }

    #[test]
    fn host_ranges_split_a_buffer_spanning_two_regions() {
        let m = mem();
        let r = host_ranges(
            &m,
            &[Seg {
                addr: GuestAddress(0xF000),
                len: 0x2000,
            }],
        )
        .unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].1 + r[1].1, 0x2000);
        assert!(host_ranges(
            &m,
            &[Seg {
                addr: GuestAddress(0x1_F000),
                len: 0x2000,
            }],
        )
        .is_err());
    }

    #[test]
    fn write_then_read_across_regions() {
        let m = mem();
        let disk = MemDisk::new("t", 1 << 20);
        let c = ctx(&disk, false, b"t");
        // Data buffer [0xF000, 0x11000) crosses the region boundary.
        let pattern: Vec<u8> = (0..0x2000u32).map(|i| (i * 7 % 251) as u8).collect();
        m.write_slice(&pattern, GuestAddress(0xF000)).unwrap();
        header(&m, 0, VIRTIO_BLK_T_OUT, 8);
        let done = handle_chain(
            &m,
            [desc(0, 16, N), desc(0xF000, 0x2000, N), desc(0x100, 1, W)].into_iter(),
            &c,
        );
        assert!(done.error.is_none(), "{:?}", done.error);
        assert_eq!(done.used_len, 1);
        assert_eq!(m.read_obj::<u8>(GuestAddress(0x100)).unwrap(), 0);
        assert_eq!(disk.snapshot(8 * 512, 0x2000), pattern);

        header(&m, 0, VIRTIO_BLK_T_IN, 8);
        m.write_slice(&vec![0u8; 0x2000], GuestAddress(0x1_2000))
            .unwrap();
        let done = handle_chain(
            &m,
            [
                desc(0, 16, N),
                desc(0x1_2000, 0x2000, W | N),
                desc(0x100, 1, W),
            ]
            .into_iter(),
            &c,
        );
        assert!(done.error.is_none());
        assert_eq!(done.used_len, 0x2001);
        let mut back = vec![0u8; 0x2000];
        m.read_slice(&mut back, GuestAddress(0x1_2000)).unwrap();
        assert_eq!(back, pattern);
    }

    #[test]
    fn header_and_data_may_share_a_descriptor() {
        // No framing assumption: header and payload in one readable buffer.
        let m = mem();
        let disk = MemDisk::new("t", 1 << 20);
        let c = ctx(&disk, false, b"t");
        header(&m, 0x1000, VIRTIO_BLK_T_OUT, 1);
        m.write_slice(&[0x3Cu8; 512], GuestAddress(0x1010)).unwrap();
        let done = handle_chain(
            &m,
            [desc(0x1000, 528, N), desc(0x100, 1, W)].into_iter(),
            &c,
        );
        assert!(done.error.is_none(), "{:?}", done.error);
        assert_eq!(disk.snapshot(512, 512), vec![0x3C; 512]);
    }

    fn status_of(
        m: &GuestMem,
        c: &RequestContext<'_>,
        descs: Vec<Descriptor>,
    ) -> (u8, Option<RequestError>) {
        m.write_obj(0xFFu8, GuestAddress(0x100)).unwrap();
        let done = handle_chain(m, descs.into_iter(), c);
        (m.read_obj::<u8>(GuestAddress(0x100)).unwrap(), done.error)
    }

    #[test]
    fn refusals_map_to_statuses() {
        let m = mem();
        let disk = MemDisk::new("t", 1 << 20);
        let ro = ctx(&disk, true, b"t");
        header(&m, 0, VIRTIO_BLK_T_OUT, 0);
        let (st, e) = status_of(
            &m,
            &ro,
            vec![desc(0, 16, N), desc(0x200, 512, N), desc(0x100, 1, W)],
        );
        assert_eq!(st, VIRTIO_BLK_S_IOERR as u8);
        assert!(matches!(e, Some(RequestError::ReadOnly(_))));

        let rw = ctx(&disk, false, b"t");
        header(&m, 0, 0xDEAD, 0);
        let (st, e) = status_of(&m, &rw, vec![desc(0, 16, N), desc(0x100, 1, W)]);
        assert_eq!(st, VIRTIO_BLK_S_UNSUPP as u8);
        assert!(matches!(e, Some(RequestError::Unsupported(0xDEAD))));

        header(&m, 0, VIRTIO_BLK_T_IN, 2047);
        let (st, e) = status_of(
            &m,
            &rw,
            vec![desc(0, 16, N), desc(0x200, 1024, W | N), desc(0x100, 1, W)],
        );
        assert_eq!(st, VIRTIO_BLK_S_IOERR as u8);
        assert!(matches!(e, Some(RequestError::OutOfRange { .. })));

        disk.set_no_space(true);
        header(&m, 0, VIRTIO_BLK_T_OUT, 0);
        let (st, e) = status_of(
            &m,
            &rw,
            vec![desc(0, 16, N), desc(0x200, 512, N), desc(0x100, 1, W)],
        );
        assert_eq!(st, VIRTIO_BLK_S_IOERR as u8);
        assert!(matches!(
            e,
            Some(RequestError::Disk {
                source: DiskError::NoSpace { .. },
                ..
            })
        ));
    }

    #[test]
    fn discard_and_write_zeroes_segments() {
        let m = mem();
        let disk = MemDisk::new("t", 1 << 20);
        disk.write_vectored(0, &[IoSlice::new(&[0xAAu8; 8192])])
            .unwrap();
        let c = ctx(&disk, false, b"t");
        let seg = |sector: u64, num: u32, flags: u32| {
            let mut s = [0u8; 16];
            s[0..8].copy_from_slice(&sector.to_le_bytes());
            s[8..12].copy_from_slice(&num.to_le_bytes());
            s[12..16].copy_from_slice(&flags.to_le_bytes());
            s
        };
        // Two segments in one request.
        m.write_slice(&seg(1, 1, 0), GuestAddress(0x200)).unwrap();
        m.write_slice(&seg(4, 2, 0), GuestAddress(0x210)).unwrap();
        header(&m, 0, VIRTIO_BLK_T_DISCARD, 0);
        let (st, e) = status_of(
            &m,
            &c,
            vec![desc(0, 16, N), desc(0x200, 32, N), desc(0x100, 1, W)],
        );
        assert_eq!(st, 0, "{e:?}");
        let d = disk.snapshot(0, 8192);
        assert!(d[..512].iter().all(|&b| b == 0xAA));
        assert!(d[512..1024].iter().all(|&b| b == 0));
        assert!(d[1024..2048].iter().all(|&b| b == 0xAA));
        assert!(d[2048..3072].iter().all(|&b| b == 0));
        // UNMAP is fine for write-zeroes, not for discard.
        m.write_slice(
            &seg(10, 1, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP),
            GuestAddress(0x200),
        )
        .unwrap();
        header(&m, 0, VIRTIO_BLK_T_WRITE_ZEROES, 0);
        let (st, _) = status_of(
            &m,
            &c,
            vec![desc(0, 16, N), desc(0x200, 16, N), desc(0x100, 1, W)],
        );
        assert_eq!(st, 0);
        assert!(disk.snapshot(10 * 512, 512).iter().all(|&b| b == 0));
        header(&m, 0, VIRTIO_BLK_T_DISCARD, 0);
        let (st, _) = status_of(
            &m,
            &c,
            vec![desc(0, 16, N), desc(0x200, 16, N), desc(0x100, 1, W)],
        );
        assert_eq!(st, VIRTIO_BLK_S_UNSUPP as u8);
        // Payload not a multiple of 16, and too many segments.
        let (st, _) = status_of(
            &m,
            &c,
            vec![desc(0, 16, N), desc(0x200, 20, N), desc(0x100, 1, W)],
        );
        assert_eq!(st, VIRTIO_BLK_S_IOERR as u8);
        let many = 16 * (MAX_DISCARD_SEG + 1);
        let (st, _) = status_of(
            &m,
            &c,
            vec![desc(0, 16, N), desc(0x1000, many, N), desc(0x100, 1, W)],
        );
        assert_eq!(st, VIRTIO_BLK_S_IOERR as u8);
        // Nothing is changed when one segment of the request is bad.
        disk.write_vectored(0, &[IoSlice::new(&[0xBBu8; 512])])
            .unwrap();
        m.write_slice(&seg(0, 1, 0), GuestAddress(0x200)).unwrap();
        m.write_slice(&seg(1 << 40, 1, 0), GuestAddress(0x210))
            .unwrap();
        let (st, _) = status_of(
            &m,
            &c,
            vec![desc(0, 16, N), desc(0x200, 32, N), desc(0x100, 1, W)],
        );
        assert_eq!(st, VIRTIO_BLK_S_IOERR as u8);
        assert!(disk.snapshot(0, 512).iter().all(|&b| b == 0xBB));
    }

    #[test]
    fn get_id_is_truncated_to_twenty_bytes_and_to_the_buffer() {
        let m = mem();
        let disk = MemDisk::new("t", 1 << 20);
        let id = b"a-very-long-export-name-indeed";
        let c = ctx(&disk, false, &id[..20]);
        header(&m, 0, VIRTIO_BLK_T_GET_ID, 0);
        let done = handle_chain(
            &m,
            [desc(0, 16, N), desc(0x200, 32, W | N), desc(0x100, 1, W)].into_iter(),
            &c,
        );
        assert_eq!(done.used_len, 21);
        let mut got = [0u8; 20];
        m.read_slice(&mut got, GuestAddress(0x200)).unwrap();
        assert_eq!(&got, &id[..20]);
        // A short buffer gets what fits.
        let done = handle_chain(
            &m,
            [desc(0, 16, N), desc(0x300, 5, W | N), desc(0x100, 1, W)].into_iter(),
            &c,
        );
        assert_eq!(done.used_len, 6);
        let mut got = [0u8; 5];
        m.read_slice(&mut got, GuestAddress(0x300)).unwrap();
        assert_eq!(&got, b"a-ver");
    }

    #[test]
    fn write_through_mode_flushes_after_writes() {
        #[derive(Default)]
        struct CountFlush(std::sync::atomic::AtomicU32);
        impl BlockDisk for CountFlush {
            fn size(&self) -> u64 {
                1 << 20
            }
            fn read_vectored(&self, _: u64, _: &mut [IoSliceMut<'_>]) -> Result<(), DiskError> {
                Ok(())
            }
            fn write_vectored(&self, _: u64, _: &[IoSlice<'_>]) -> Result<(), DiskError> {
                Ok(())
            }
            fn flush(&self) -> Result<(), DiskError> {
                self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                Ok(())
            }
            fn discard(&self, _: u64, _: u64) -> Result<(), DiskError> {
                Ok(())
            }
            fn write_zeroes(&self, _: u64, _: u64) -> Result<(), DiskError> {
                Ok(())
            }
            fn name(&self) -> String {
                "count".into()
            }
            fn physical_block_size(&self) -> u32 {
                512
            }
        }
        let disk = CountFlush::default();
        let m = mem();
        header(&m, 0, VIRTIO_BLK_T_OUT, 0);
        let mut c = RequestContext {
            disk: &disk,
            size: 1 << 20,
            readonly: false,
            writeback: true,
            id: b"",
        };
        let chain = || [desc(0, 16, N), desc(0x200, 512, N), desc(0x100, 1, W)].into_iter();
        assert!(handle_chain(&m, chain(), &c).error.is_none());
        assert_eq!(disk.0.load(std::sync::atomic::Ordering::SeqCst), 0);
        c.writeback = false;
        assert!(handle_chain(&m, chain(), &c).error.is_none());
        assert_eq!(disk.0.load(std::sync::atomic::Ordering::SeqCst), 1);
    }
}
