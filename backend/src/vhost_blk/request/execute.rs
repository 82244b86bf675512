//! Executing a parsed [`Request`] against a [`BlockDisk`], with the guest's data buffers
//! handed to the disk in place (no copy).

use std::io::{IoSlice, IoSliceMut};

use virtio_bindings::virtio_blk::VIRTIO_BLK_ID_BYTES;

use super::chain::ChainLayout;
use super::error::RequestError;
use super::guest_memory::{host_ranges, mark_written, sub_segs, write_segs, GuestMem};
use super::parse::{Request, HEADER_SIZE};
use crate::vhost_blk::disk::BlockDisk;

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

/// Executes `req`, whose buffers are those of `layout`; returns the bytes written into the
/// data part of the device-writable buffers.
pub fn execute(
    mem: &GuestMem,
    layout: &ChainLayout,
    req: &Request,
    ctx: &RequestContext<'_>,
) -> Result<u32, RequestError> {
    let what = req.kind().name();
    let disk_err = |source| RequestError::Disk { what, source };
    match *req {
        Request::Read { offset, len } => {
            if len == 0 {
                return Ok(0);
            }
            // `parse` checked that the length fits.
            let used = u32::try_from(len).map_err(|_| RequestError::TooLong)?;
            let segs = sub_segs(&layout.writable, 0, len);
            let ranges = host_ranges(mem, &segs)?;
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
            let read = ctx.disk.read_vectored(offset, &mut iov);
            // Even a failed read may have filled part of the buffers.
            mark_written(mem, &segs);
            read.map_err(disk_err)?;
            Ok(used)
        }
        Request::Write { offset, len } => {
            if len == 0 {
                return Ok(0);
            }
            let ranges = host_ranges(mem, &sub_segs(&layout.readable, HEADER_SIZE, len))?;
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
        Request::Flush => {
            ctx.disk.flush().map_err(disk_err)?;
            Ok(0)
        }
        Request::GetId { len } => {
            let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
            let m = ctx.id.len().min(id.len());
            id[..m].copy_from_slice(&ctx.id[..m]);
            let n = len.min(id.len());
            write_segs(mem, &layout.writable, &id[..n])?;
            Ok(n as u32)
        }
        Request::Discard { ref ranges } | Request::WriteZeroes { ref ranges } => {
            let discard = matches!(req, Request::Discard { .. });
            for &(off, len) in ranges {
                if discard {
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
    }
}
