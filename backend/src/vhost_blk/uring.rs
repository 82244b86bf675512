//! Reads through io_uring: a read whose bytes the disk maps to O_DIRECT files
//! ([`BlockDisk::read_mapping`]) is submitted as one read per file piece straight into the
//! guest's buffers, and completed from the completion queue; the queue's thread meanwhile takes
//! and starts more requests, so a queue keeps as many reads at the device as the guest has in
//! flight (a synchronous read holds a thread for its whole duration).
//!
//! Anything unusual takes the synchronous path ([`handle_parsed`]) instead: a request that is
//! not a well-formed read, a read the disk does not map, buffers that an O_DIRECT file cannot
//! take, and, after the fact, a read that failed, came back short or raced a copy-out
//! ([`ReadMapping::still_valid`]): it is read again synchronously before it completes, so
//! errors are reported (and named) by one path.

use std::sync::Arc;
use std::time::Instant;

use io_uring::{opcode, types, IoUring};
use snapmv_engine::{ReadMapping, ReadSource};
use virtio_bindings::virtio_blk::VIRTIO_BLK_T_IN;

use super::dispatch::Done;
use super::request::{
    complete_read, handle_parsed, host_ranges, sub_segs, GuestMem, ParsedChain, Request,
    RequestContext,
};

/// Submission queue entries per queue (completion queue: twice that); a read of more pieces
/// than this takes the synchronous path.
const RING_ENTRIES: u32 = 256;

/// One read at the device.
struct Pending {
    head: u16,
    chain: ParsedChain,
    /// Keeps the guest memory the reads land in mapped.
    mem: Arc<GuestMem>,
    /// Keeps the files open, and says afterwards whether the data is exact.
    mapping: ReadMapping,
    /// The iovec arrays of the vectored reads; the kernel reads them until completion.
    _iovecs: Vec<Vec<libc::iovec>>,
    /// Bytes each submitted read must return.
    expect: Vec<u32>,
    left: usize,
    failed: bool,
    len: u64,
    taken: Instant,
}

/// One queue's ring and the reads it has at the device.
pub(crate) struct UringQueue {
    ring: IoUring,
    slots: Vec<Option<Pending>>,
    free: Vec<usize>,
    in_flight: usize,
    /// The disk's files are buffered, not O_DIRECT: its reads stay synchronous. From the page
    /// cache a synchronous read on the queue's thread is the fastest (a few microseconds; the
    /// ring's round trip measured slower), and reads that reach the device run on the I/O
    /// pool (`dispatch.rs`). A disk's files keep their mode while it is served.
    buffered_files: bool,
}

// SAFETY: the raw pointers a `UringQueue` holds (in its pending reads' iovec arrays) point
// into guest memory that the same pending read keeps mapped (its `Arc<GuestMem>`); they are
// only handed to the kernel, never dereferenced by Rust, so moving the queue to another thread
// (behind the dispatcher's mutex, one thread at a time) is sound.
unsafe impl Send for UringQueue {}

/// A run of guest memory: host address and length.
type Piece = (*mut u8, usize);

/// The pieces of `ranges` covering bytes `[at, at+len)`.
fn pieces_of(ranges: &[Piece], mut at: usize, mut len: usize) -> Vec<Piece> {
    let mut out = Vec::new();
    for &(p, n) in ranges {
        if len == 0 {
            break;
        }
        if at >= n {
            at -= n;
            continue;
        }
        let take = (n - at).min(len);
        // `at < n` keeps the pointer inside the range.
        out.push((p.wrapping_add(at), take));
        len -= take;
        at = 0;
    }
    out
}

impl UringQueue {
    /// A ring for one queue; an error means io_uring cannot be used here (old kernel,
    /// seccomp): every read then takes the synchronous path.
    pub(crate) fn new() -> std::io::Result<UringQueue> {
        let ring = IoUring::builder()
            .setup_cqsize(RING_ENTRIES * 2)
            .build(RING_ENTRIES)?;
        Ok(UringQueue {
            ring,
            slots: Vec::new(),
            free: Vec::new(),
            in_flight: 0,
            buffered_files: false,
        })
    }

    /// Free submission queue entries.
    fn sq_room(&mut self) -> usize {
        let sq = self.ring.submission();
        sq.capacity() - sq.len()
    }

    /// Reads at the device.
    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Starts `chain` if it is a read that can go through the ring (see the module's
    /// comment); otherwise gives it back for the synchronous path. A read made only of zeros
    /// completes at once, into `out`.
    pub(crate) fn try_start(
        &mut self,
        mem: &Arc<GuestMem>,
        head: u16,
        chain: ParsedChain,
        ctx: &RequestContext<'_>,
        taken: Instant,
        out: &mut Vec<(Done, Instant)>,
    ) -> Result<(), ParsedChain> {
        if self.buffered_files || chain.request_type(mem) != Some(VIRTIO_BLK_T_IN) {
            return Err(chain);
        }
        let Ok(Request::Read { offset, len }) =
            Request::parse(mem, &chain.layout, ctx.size, ctx.readonly)
        else {
            return Err(chain);
        };
        if len == 0 {
            return Err(chain);
        }
        let Ok(ranges) = host_ranges(mem, &sub_segs(&chain.layout.writable, 0, len)) else {
            return Err(chain);
        };
        let Some(mapping) = ctx.disk.read_mapping(offset, len) else {
            return Err(chain);
        };
        if mapping
            .segments()
            .iter()
            .any(|s| matches!(s.source, ReadSource::File { fd, .. } if fd.align <= 1))
        {
            // Buffered: see `buffered_files`.
            self.buffered_files = true;
            return Err(chain);
        }
        // Plan every piece before touching anything, so that a refusal leaves no trace.
        let mut reads: Vec<(i32, u64, Vec<Piece>, u32)> = Vec::new();
        let mut zeros: Vec<Piece> = Vec::new();
        let mut at = 0usize;
        for seg in mapping.segments() {
            let Ok(n) = usize::try_from(seg.len) else {
                return Err(chain);
            };
            let pieces = pieces_of(&ranges, at, n);
            at += n;
            match seg.source {
                ReadSource::Zeros => zeros.extend(pieces),
                ReadSource::File { fd, offset } => {
                    let a = fd.align.max(1);
                    let aligned = offset % a as u64 == 0
                        && pieces
                            .iter()
                            .all(|&(p, l)| (p as usize) % a == 0 && l % a == 0);
                    let Ok(expect) = u32::try_from(n) else {
                        return Err(chain);
                    };
                    if !aligned || pieces.len() > libc::UIO_MAXIOV as usize {
                        return Err(chain);
                    }
                    reads.push((fd.fd, offset, pieces, expect));
                }
            }
        }
        if at as u64 != len || reads.len() > RING_ENTRIES as usize {
            return Err(chain);
        }
        if self.sq_room() < reads.len() {
            // Hand the queued entries to the kernel to make room.
            if self.ring.submit().is_err() || self.sq_room() < reads.len() {
                return Err(chain);
            }
        }
        for (p, n) in zeros {
            // SAFETY: `p..p+n` is inside a guest memory region mapped by `mem` (host_ranges
            // checked it); the guest owns these bytes as a DMA target and they are written
            // as raw bytes, never read as a Rust value.
            unsafe { std::ptr::write_bytes(p, 0, n) };
        }
        let slot = self.free.pop().unwrap_or_else(|| {
            self.slots.push(None);
            self.slots.len() - 1
        });
        let mut iovecs = Vec::new();
        let mut expect = Vec::new();
        for (i, (fd, off, pieces, n)) in reads.into_iter().enumerate() {
            let user_data = ((slot as u64) << 32) | i as u64;
            let entry = if let [(p, l)] = pieces[..] {
                opcode::Read::new(types::Fd(fd), p, l as u32)
                    .offset(off)
                    .build()
            } else {
                let v: Vec<libc::iovec> = pieces
                    .iter()
                    .map(|&(p, l)| libc::iovec {
                        iov_base: p.cast(),
                        iov_len: l,
                    })
                    .collect();
                let e = opcode::Readv::new(types::Fd(fd), v.as_ptr(), v.len() as u32)
                    .offset(off)
                    .build();
                // The vector's heap buffer does not move when the vector does.
                iovecs.push(v);
                e
            };
            // SAFETY: the entry's buffers (guest memory kept mapped by `mem`, iovec arrays
            // kept in the pending read) and its file (kept open by `mapping`) stay valid until
            // its completion is reaped: the slot holds them, and the queue is drained before
            // it is dropped. There is room (checked above).
            let pushed = unsafe { self.ring.submission().push(&entry.user_data(user_data)) };
            if pushed.is_err() {
                // Cannot happen (room was checked); the read then fails and is redone.
                expect.push(u32::MAX);
                continue;
            }
            expect.push(n);
        }
        let left = expect.iter().filter(|&&e| e != u32::MAX).count();
        let pending = Pending {
            head,
            chain,
            mem: mem.clone(),
            mapping,
            _iovecs: iovecs,
            failed: expect.contains(&u32::MAX),
            expect,
            left,
            len,
            taken,
        };
        if left == 0 {
            self.free.push(slot);
            out.push((Self::finish(pending, ctx), taken));
            return Ok(());
        }
        self.slots[slot] = Some(pending);
        self.in_flight += 1;
        Ok(())
    }

    /// Completes a read whose pieces are all back.
    fn finish(p: Pending, ctx: &RequestContext<'_>) -> Done {
        let completion = if p.failed || !p.mapping.still_valid() {
            // Read again, synchronously: the error (named by the disk) or the exact data.
            handle_parsed(&p.mem, p.chain, ctx)
        } else {
            complete_read(&p.mem, &p.chain, p.len)
        };
        Done {
            head: p.head,
            completion,
            finished: Instant::now(),
        }
    }

    /// Submits what is queued and collects completed reads into `out` (with when each was
    /// taken); `wait`: wait for at least one completion if reads are in flight.
    pub(crate) fn reap(
        &mut self,
        wait: bool,
        ctx: &RequestContext<'_>,
        out: &mut Vec<(Done, Instant)>,
    ) {
        if self.in_flight == 0 {
            return;
        }
        let want = usize::from(wait);
        loop {
            match self.ring.submit_and_wait(want) {
                Ok(_) => break,
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                // EBUSY: the completion queue is full; reaping below makes room.
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => break,
                Err(e) => {
                    // The ring is unusable; the submitted reads still complete (the kernel
                    // owns them), so keep waiting for them without blocking forever here.
                    log::error!("io_uring wait failed: {e}");
                    break;
                }
            }
        }
        let cqes: Vec<(u64, i32)> = self
            .ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        for (user_data, result) in cqes {
            let slot = (user_data >> 32) as usize;
            let i = (user_data & 0xffff_ffff) as usize;
            let Some(Some(p)) = self.slots.get_mut(slot) else {
                continue;
            };
            if u32::try_from(result).ok() != p.expect.get(i).copied() {
                p.failed = true;
            }
            p.left -= 1;
            if p.left == 0 {
                if let Some(p) = self.slots[slot].take() {
                    self.free.push(slot);
                    self.in_flight -= 1;
                    let taken = p.taken;
                    out.push((Self::finish(p, ctx), taken));
                }
            }
        }
    }
}

impl Drop for UringQueue {
    fn drop(&mut self) {
        // The kernel may still write into guest memory and read iovec arrays the pending
        // reads hold: wait for every submitted entry before they go.
        let mut waits = 0;
        while self.slots.iter().any(Option::is_some) && waits < 10_000 {
            waits += 1;
            if self.ring.submit_and_wait(1).is_err() {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            let done: Vec<u64> = self.ring.completion().map(|c| c.user_data()).collect();
            for user_data in done {
                if let Some(Some(p)) = self.slots.get_mut((user_data >> 32) as usize) {
                    p.left = p.left.saturating_sub(1);
                    if p.left == 0 {
                        self.slots[(user_data >> 32) as usize] = None;
                    }
                }
            }
        }
        // Reads that never came back (a broken ring): keep their memory mapped for good.
        std::mem::forget(std::mem::take(&mut self.slots));
    }
}
