//! Inflight I/O tracking (`VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`) for split virtqueues.
//!
//! The frontend (QEMU) keeps a shared-memory region across backend restarts. For every queue
//! the backend records which descriptor chains it has taken from the available ring and not
//! yet returned on the used ring; after a reconnect the next backend process resubmits exactly
//! those, in the order they were first taken, and resumes the available ring after them.
//!
//! The layout is QEMU's (`VuVirtqInflight` / `VuDescStateSplit` in libvhost-user, the same as
//! `QueueRegionSplit` / `DescStateSplit` in the vhost crate), one region per queue, each
//! `queue_region_size(queue_size)` bytes:
//!
//! ```text
//! 0   u64 features        8  u16 version (1)   10 u16 desc_num
//! 12  u16 last_batch_head 14 u16 used_idx
//! 16 + 16*i: u8 inflight, 5 bytes padding, u16 next, u64 counter   (i < desc_num)
//! ```
//!
//! Protocol (libvhost-user's `vu_queue_inflight_get/pre_put/post_put`):
//! 1. taking chain `h`: `desc[h].counter = counter++`, then `desc[h].inflight = 1`, before
//!    anything of the request is executed;
//! 2. completing it: `last_batch_head = h`; the used element and used index are written
//!    (one request at a time); then `desc[h].inflight = 0` and `used_idx = ` the new used index.
//!
//! Recovery ([`InflightQueue::recover`], libvhost-user's `vu_check_queue_inflights`): if the
//! region's `used_idx` is one behind the ring's, the process died between 2's used-index write
//! and its clearing: `desc[last_batch_head]` was completed and is cleared. Every entry still
//! marked is resubmitted in `counter` order, and the available ring resumes at
//! `used_idx + (number of marked entries)`.
//!
//! The region comes from the frontend (a stale or damaged one is possible, a guest cannot write
//! it): every field read from it is checked against the ring's size and the available index
//! before use; a region that fails a check is reset and ignored for that ring start (the
//! backend then resumes where the frontend said in SET_VRING_BASE, as without the feature).

use std::fs::File;
use std::os::fd::AsFd;
use std::sync::atomic::Ordering;

use vm_memory::{Bytes, FileOffset, MmapRegion, VolatileMemory, VolatileSlice};

/// The only region version defined.
pub const INFLIGHT_VERSION: u16 = 1;
/// Alignment of each queue's part of the region (QEMU's INFLIGHT_ALIGNMENT).
pub const INFLIGHT_ALIGNMENT: u64 = 64;
/// Size of the per-queue header.
pub const QUEUE_HEADER_SIZE: usize = 16;
/// Size of one descriptor state (`DescStateSplit`).
pub const DESC_STATE_SIZE: usize = 16;

const OFF_VERSION: usize = 8;
const OFF_DESC_NUM: usize = 10;
const OFF_LAST_BATCH_HEAD: usize = 12;
const OFF_USED_IDX: usize = 14;
const DESC_OFF_INFLIGHT: usize = 0;
const DESC_OFF_COUNTER: usize = 8;

/// Bytes of one queue's region for `queue_size` descriptors, computed exactly as QEMU and
/// libvhost-user do (`ALIGN_UP(sizeof(VuDescStateSplit) * queue_size + sizeof(uint16_t), 64)`),
/// so a region created by one implementation is laid out alike by another.
pub fn queue_region_size(queue_size: u16) -> usize {
    let raw = DESC_STATE_SIZE as u64 * u64::from(queue_size) + 2;
    (raw.div_ceil(INFLIGHT_ALIGNMENT) * INFLIGHT_ALIGNMENT) as usize
}

/// Why an inflight region cannot be created, mapped or trusted.
#[derive(Debug, thiserror::Error)]
pub enum InflightError {
    /// The request's queue count or size is out of range.
    #[error("inflight region for {num_queues} queues of {queue_size}: {why}")]
    BadRequest {
        /// Queues asked for.
        num_queues: u16,
        /// Queue size asked for.
        queue_size: u16,
        /// What is wrong.
        why: &'static str,
    },
    /// Creating the shared memory failed.
    #[error("cannot create the inflight region: {0}")]
    Create(#[source] std::io::Error),
    /// Mapping the region failed.
    #[error("cannot map the inflight region ({size} bytes at offset {offset}): {why}")]
    Map {
        /// Bytes to map.
        size: u64,
        /// Offset in the file.
        offset: u64,
        /// What failed.
        why: String,
    },
    /// A field of the region is inconsistent with the ring; the region is not used.
    #[error("queue {queue}: inflight region rejected: {why}")]
    Inconsistent {
        /// Queue index.
        queue: u16,
        /// What is wrong.
        why: String,
    },
    /// An access to the region failed (out of bounds or misaligned: a bug or a tiny region).
    #[error("inflight region access failed: {0}")]
    Access(String),
}

/// A mapped inflight region, shared with the frontend.
pub struct InflightRegion {
    map: MmapRegion<()>,
    num_queues: u16,
    queue_size: u16,
    stride: usize,
}

impl std::fmt::Debug for InflightRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InflightRegion")
            .field("num_queues", &self.num_queues)
            .field("queue_size", &self.queue_size)
            .field("bytes", &self.map.size())
            .finish()
    }
}

fn check_request(num_queues: u16, queue_size: u16, max_queues: u16) -> Result<(), InflightError> {
    let bad = |why| InflightError::BadRequest {
        num_queues,
        queue_size,
        why,
    };
    if num_queues == 0 || num_queues > max_queues {
        return Err(bad("queue count out of range"));
    }
    if queue_size == 0 || queue_size > 32768 {
        return Err(bad("queue size out of range 1..=32768"));
    }
    Ok(())
}

impl InflightRegion {
    /// GET_INFLIGHT_FD: a zeroed region for `num_queues` queues of `queue_size` descriptors in
    /// a new sealed memfd, each queue's header initialised (version 1, desc_num). Returns the
    /// region, the file to send and the size to announce.
    pub fn create(
        num_queues: u16,
        queue_size: u16,
        max_queues: u16,
    ) -> Result<(InflightRegion, File, u64), InflightError> {
        check_request(num_queues, queue_size, max_queues)?;
        let stride = queue_region_size(queue_size);
        let size = stride * usize::from(num_queues);
        let fd = rustix::fs::memfd_create(
            "snapmv-inflight",
            rustix::fs::MemfdFlags::CLOEXEC | rustix::fs::MemfdFlags::ALLOW_SEALING,
        )
        .map_err(|e| InflightError::Create(e.into()))?;
        let file = File::from(fd);
        file.set_len(size as u64).map_err(InflightError::Create)?;
        rustix::fs::fcntl_add_seals(
            file.as_fd(),
            rustix::fs::SealFlags::GROW
                | rustix::fs::SealFlags::SHRINK
                | rustix::fs::SealFlags::SEAL,
        )
        .map_err(|e| InflightError::Create(e.into()))?;
        let region = Self::map(&file, size as u64, 0, num_queues, queue_size, max_queues)?;
        for q in 0..num_queues {
            if let Some(iq) = region.queue(q) {
                iq.init(queue_size)?;
            }
        }
        Ok((region, file, size as u64))
    }

    /// SET_INFLIGHT_FD: maps the region the frontend kept. Checks that the file holds
    /// `num_queues` queue regions of `queue_size` where the frontend says.
    pub fn map(
        file: &File,
        mmap_size: u64,
        mmap_offset: u64,
        num_queues: u16,
        queue_size: u16,
        max_queues: u16,
    ) -> Result<InflightRegion, InflightError> {
        check_request(num_queues, queue_size, max_queues)?;
        let stride = queue_region_size(queue_size);
        let need = (stride as u64) * u64::from(num_queues);
        let err = |why: String| InflightError::Map {
            size: mmap_size,
            offset: mmap_offset,
            why,
        };
        if mmap_size < need {
            return Err(err(format!(
                "{need} bytes needed for {num_queues} queues of {queue_size}"
            )));
        }
        let file_len = file
            .metadata()
            .map_err(|e| err(format!("fstat: {e}")))?
            .len();
        match mmap_offset.checked_add(need) {
            Some(end) if end <= file_len => {}
            _ => return Err(err(format!("the file has only {file_len} bytes"))),
        }
        let dup = file.try_clone().map_err(|e| err(format!("dup: {e}")))?;
        // Map only what is used: never more than the file holds.
        let map = MmapRegion::from_file(FileOffset::new(dup, mmap_offset), need as usize)
            .map_err(|e| err(e.to_string()))?;
        Ok(InflightRegion {
            map,
            num_queues,
            queue_size,
            stride,
        })
    }

    /// Number of queues the region covers.
    pub fn num_queues(&self) -> u16 {
        self.num_queues
    }

    /// Descriptor entries per queue.
    pub fn queue_size(&self) -> u16 {
        self.queue_size
    }

    /// The part of queue `q`, if the region covers it.
    pub fn queue(&self, q: u16) -> Option<InflightQueue<'_>> {
        if q >= self.num_queues {
            return None;
        }
        let s = self
            .map
            .get_slice(usize::from(q) * self.stride, self.stride)
            .ok()?;
        Some(InflightQueue::new(s, self.queue_size))
    }
}

/// What recovery decided for one ring.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// Where to resume the available ring.
    pub next_avail: u16,
    /// Heads to execute again before anything new, in their original order.
    pub resubmit: Vec<u16>,
    /// The counter to give the next chain taken.
    pub next_counter: u64,
    /// The head whose completion reached the used ring but not the region (cleared).
    pub completed_at_crash: Option<u16>,
}

/// One queue's part of the region. Every access is bounds-checked; every atomic access is
/// naturally aligned when the slice starts 8-byte aligned (mmap and the 64-byte stride do).
#[derive(Clone, Copy)]
pub struct InflightQueue<'a> {
    s: VolatileSlice<'a, ()>,
    /// Entries this slice can hold, at most the region's queue size.
    entries: u16,
}

impl<'a> InflightQueue<'a> {
    /// A view of one queue's region over `s` with room for `queue_size` entries (fewer if `s`
    /// is shorter).
    pub fn new(s: VolatileSlice<'a, ()>, queue_size: u16) -> InflightQueue<'a> {
        let room = s.len().saturating_sub(QUEUE_HEADER_SIZE) / DESC_STATE_SIZE;
        let entries = u16::try_from(room.min(usize::from(queue_size))).unwrap_or(u16::MAX);
        InflightQueue { s, entries }
    }

    fn err(e: vm_memory::volatile_memory::Error) -> InflightError {
        InflightError::Access(e.to_string())
    }

    fn load16(&self, off: usize) -> Result<u16, InflightError> {
        self.s
            .load::<u16>(off, Ordering::Acquire)
            .map_err(|e| InflightError::Access(e.to_string()))
    }

    fn store16(&self, v: u16, off: usize) -> Result<(), InflightError> {
        self.s
            .store(v, off, Ordering::Release)
            .map_err(|e| InflightError::Access(e.to_string()))
    }

    fn desc_off(&self, head: u16) -> Option<usize> {
        (head < self.entries).then(|| QUEUE_HEADER_SIZE + usize::from(head) * DESC_STATE_SIZE)
    }

    /// Writes version and desc_num of a fresh region.
    pub fn init(&self, queue_size: u16) -> Result<(), InflightError> {
        self.store16(INFLIGHT_VERSION, OFF_VERSION)?;
        self.store16(queue_size.min(self.entries), OFF_DESC_NUM)
    }

    /// Step 1: chain `head` is taken from the available ring. Must happen before any of its
    /// effects. A head outside the region (a broken ring) is not recorded.
    pub fn set_inflight(&self, head: u16, counter: u64) -> Result<(), InflightError> {
        let Some(off) = self.desc_off(head) else {
            return Ok(());
        };
        self.s
            .store(counter, off + DESC_OFF_COUNTER, Ordering::Relaxed)
            .map_err(|e| InflightError::Access(e.to_string()))?;
        // SeqCst: the mark is in memory before the request's first write to the disk.
        self.s
            .store(1u8, off + DESC_OFF_INFLIGHT, Ordering::SeqCst)
            .map_err(|e| InflightError::Access(e.to_string()))
    }

    /// Step 2a, just before the used element and index of `head` are written.
    pub fn pre_put(&self, head: u16) -> Result<(), InflightError> {
        if head >= self.entries {
            return Ok(());
        }
        self.store16(head, OFF_LAST_BATCH_HEAD)
    }

    /// Step 2b, once the used index `used_idx` including `head` is written.
    pub fn post_put(&self, head: u16, used_idx: u16) -> Result<(), InflightError> {
        if let Some(off) = self.desc_off(head) {
            self.s
                .store(0u8, off + DESC_OFF_INFLIGHT, Ordering::SeqCst)
                .map_err(|e| InflightError::Access(e.to_string()))?;
        }
        self.store16(used_idx, OFF_USED_IDX)
    }

    /// True if `head` is marked in flight (tests and diagnostics).
    pub fn is_inflight(&self, head: u16) -> bool {
        self.desc_off(head)
            .and_then(|off| self.s.load::<u8>(off, Ordering::Acquire).ok())
            .is_some_and(|v| v != 0)
    }

    /// The region's used index.
    pub fn used_idx(&self) -> Result<u16, InflightError> {
        self.load16(OFF_USED_IDX)
    }

    /// Forgets every mark (after a rejected region): resumes as without the feature.
    pub fn reset(&self, ring_used_idx: u16) -> Result<(), InflightError> {
        for head in 0..self.entries {
            if let Some(off) = self.desc_off(head) {
                self.s
                    .store(0u8, off + DESC_OFF_INFLIGHT, Ordering::Relaxed)
                    .map_err(Self::err)?;
            }
        }
        self.store16(INFLIGHT_VERSION, OFF_VERSION)?;
        self.store16(self.entries, OFF_DESC_NUM)?;
        self.store16(ring_used_idx, OFF_USED_IDX)
    }

    /// Decides how a ring of `ring_size` descriptors whose used index is `used_idx` and
    /// available index `avail_idx` (both read from guest memory now) resumes. Fixes the region
    /// for a completion that reached the used ring but not the region. Never trusts the
    /// region: any inconsistency is an error and nothing is resubmitted.
    pub fn recover(
        &self,
        queue: u16,
        ring_size: u16,
        used_idx: u16,
        avail_idx: u16,
    ) -> Result<Recovery, InflightError> {
        let bad = |why: String| InflightError::Inconsistent { queue, why };
        if ring_size == 0 || ring_size > self.entries {
            return Err(bad(format!(
                "ring of {ring_size} descriptors, region has room for {}",
                self.entries
            )));
        }
        let outstanding = avail_idx.wrapping_sub(used_idx);
        if outstanding > ring_size {
            return Err(bad(format!(
                "the guest's rings are inconsistent: avail {avail_idx}, used {used_idx}, size {ring_size}"
            )));
        }
        let version = self.load16(OFF_VERSION)?;
        if version == 0 {
            // Never initialised (a frontend-made region): nothing was recorded; whatever the
            // entries hold is not ours.
            self.reset(used_idx)?;
            return Ok(Recovery {
                next_avail: used_idx,
                resubmit: Vec::new(),
                next_counter: 0,
                completed_at_crash: None,
            });
        }
        if version != INFLIGHT_VERSION {
            return Err(bad(format!("unknown version {version}")));
        }
        // Every entry, checked before anything is changed.
        let mut marked: Vec<(u64, u16)> = Vec::new();
        for head in 0..self.entries {
            let off = QUEUE_HEADER_SIZE + usize::from(head) * DESC_STATE_SIZE;
            let flag = self
                .s
                .load::<u8>(off + DESC_OFF_INFLIGHT, Ordering::Acquire)
                .map_err(Self::err)?;
            match flag {
                0 => {}
                1 if head < ring_size => {
                    let counter = self
                        .s
                        .load::<u64>(off + DESC_OFF_COUNTER, Ordering::Acquire)
                        .map_err(Self::err)?;
                    marked.push((counter, head));
                }
                1 => {
                    return Err(bad(format!(
                        "descriptor {head} marked in flight, the ring has {ring_size}"
                    )))
                }
                other => return Err(bad(format!("descriptor {head}: inflight byte {other}"))),
            }
        }
        let region_used = self.load16(OFF_USED_IDX)?;
        let mut completed_at_crash = None;
        match used_idx.wrapping_sub(region_used) {
            0 => {}
            // A new ring (driver restart) or a clean stop: nothing in flight, nothing to fix.
            _ if marked.is_empty() => {}
            1 => {
                // Died after the used index write of `last_batch_head`, before its clearing.
                let lbh = self.load16(OFF_LAST_BATCH_HEAD)?;
                if lbh >= ring_size {
                    return Err(bad(format!("last_batch_head {lbh} outside the ring")));
                }
                marked.retain(|&(_, h)| h != lbh);
                completed_at_crash = Some(lbh);
            }
            d => {
                return Err(bad(format!(
                    "region used index {region_used} is {d} behind the ring's {used_idx} with {} requests marked",
                    marked.len()
                )))
            }
        }
        let inuse = u16::try_from(marked.len()).unwrap_or(u16::MAX);
        if inuse > outstanding {
            return Err(bad(format!(
                "{inuse} requests marked in flight but only {outstanding} available past used index {used_idx}"
            )));
        }
        // Only now change the region.
        if let Some(lbh) = completed_at_crash {
            if let Some(off) = self.desc_off(lbh) {
                self.s
                    .store(0u8, off + DESC_OFF_INFLIGHT, Ordering::SeqCst)
                    .map_err(Self::err)?;
            }
        }
        self.store16(used_idx, OFF_USED_IDX)?;
        marked.sort_unstable();
        let next_counter = marked.last().map(|&(c, _)| c.wrapping_add(1)).unwrap_or(0);
        Ok(Recovery {
            next_avail: used_idx.wrapping_add(inuse),
            resubmit: marked.into_iter().map(|(_, h)| h).collect(),
            next_counter,
            completed_at_crash,
        })
    }
}

/// Reads the descriptors of chain `head` straight from a split ring's descriptor table (for
/// resubmission: the chain is no longer reachable through the available ring). Follows an
/// indirect table like virtio-queue's iterator and, like it, stops silently at a bad link; the
/// caller's chain check reports a truncated or empty chain.
pub fn split_chain<M: Bytes<vm_memory::GuestAddress>>(
    mem: &M,
    desc_table: vm_memory::GuestAddress,
    ring_size: u16,
    head: u16,
) -> Vec<virtio_queue::desc::split::Descriptor> {
    use virtio_queue::desc::split::Descriptor;
    use vm_memory::{Address, GuestAddress};
    let read = |table: GuestAddress, i: u32| -> Option<Descriptor> {
        let addr = table.checked_add(u64::from(i) * 16)?;
        mem.read_obj::<Descriptor>(addr).ok()
    };
    let mut out = Vec::new();
    if head >= ring_size {
        return out;
    }
    let Some(mut d) = read(desc_table, u32::from(head)) else {
        return out;
    };
    let mut table = desc_table;
    let mut size = u32::from(ring_size);
    if d.refers_to_indirect_table() {
        let len = d.len();
        if len == 0 || len % 16 != 0 || len / 16 > u32::from(u16::MAX) + 1 {
            return out;
        }
        table = d.addr();
        size = len / 16;
        d = match read(table, 0) {
            Some(x) if !x.refers_to_indirect_table() => x,
            _ => return out,
        };
    }
    loop {
        out.push(d);
        if !d.has_next() || out.len() > size as usize {
            return out;
        }
        let next = u32::from(d.next());
        if next >= size {
            return out;
        }
        d = match read(table, next) {
            Some(x) if !x.refers_to_indirect_table() => x,
            _ => return out,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn buf(queue_size: u16) -> Vec<u64> {
        vec![0u64; queue_region_size(queue_size) / 8]
    }

    fn view(b: &mut [u64], qs: u16) -> InflightQueue<'_> {
        // SAFETY: reinterpreting a u64 buffer as bytes of the same length; u8 has no alignment
        // or validity requirement and the borrow keeps `b` exclusive for the view's lifetime.
        let bytes =
            unsafe { std::slice::from_raw_parts_mut(b.as_mut_ptr().cast::<u8>(), b.len() * 8) };
        InflightQueue::new(VolatileSlice::from(bytes), qs)
    }

    #[test]
    fn sizes_match_qemu() {
        // ALIGN_UP(16 * n + 2, 64)
        assert_eq!(queue_region_size(128), 2112);
        assert_eq!(queue_region_size(256), 4160);
        assert_eq!(queue_region_size(1), 64);
        assert_eq!(queue_region_size(3), 64);
        for n in [1u16, 2, 3, 5, 7, 128, 1024, 32768] {
            assert!(queue_region_size(n) >= QUEUE_HEADER_SIZE + DESC_STATE_SIZE * usize::from(n));
        }
    }

    #[test]
    fn a_clean_region_resumes_at_the_used_index() {
        let mut b = buf(8);
        let q = view(&mut b, 8);
        q.init(8).unwrap();
        let r = q.recover(0, 8, 5, 7).unwrap();
        assert_eq!(r.next_avail, 5);
        assert!(r.resubmit.is_empty());
    }

    #[test]
    fn marked_requests_come_back_in_counter_order() {
        let mut b = buf(8);
        let q = view(&mut b, 8);
        q.init(8).unwrap();
        // Taken in order 6, 2, 4 (counters 10, 11, 12); 2 completed out of order.
        q.set_inflight(6, 10).unwrap();
        q.set_inflight(2, 11).unwrap();
        q.set_inflight(4, 12).unwrap();
        q.pre_put(2).unwrap();
        q.post_put(2, 1).unwrap();
        let r = q.recover(0, 8, 1, 3).unwrap();
        assert_eq!(r.resubmit, vec![6, 4]);
        assert_eq!(r.next_avail, 3);
        assert_eq!(r.next_counter, 13);
        assert_eq!(r.completed_at_crash, None);
    }

    #[test]
    fn a_completion_that_reached_the_used_ring_only_is_not_resubmitted() {
        let mut b = buf(8);
        let q = view(&mut b, 8);
        q.init(8).unwrap();
        q.set_inflight(3, 0).unwrap();
        q.set_inflight(5, 1).unwrap();
        q.pre_put(3).unwrap();
        // The used index became 1 in guest memory; the process died before post_put.
        let r = q.recover(0, 8, 1, 2).unwrap();
        assert_eq!(r.completed_at_crash, Some(3));
        assert_eq!(r.resubmit, vec![5]);
        assert_eq!(r.next_avail, 2);
        assert!(!q.is_inflight(3));
        assert_eq!(q.used_idx().unwrap(), 1);
    }

    #[test]
    fn hostile_regions_are_rejected_without_resubmitting() {
        let mut b = buf(8);
        let q = view(&mut b, 8);
        q.init(8).unwrap();
        // More marks than the guest has outstanding.
        q.set_inflight(1, 0).unwrap();
        q.set_inflight(2, 1).unwrap();
        assert!(q.recover(0, 8, 0, 1).is_err());
        // A mark beyond a smaller ring.
        let r = q.recover(0, 2, 0, 2);
        assert!(r.is_err(), "{r:?}");
        // A used index far from the ring's with marks.
        assert!(q.recover(0, 8, 5, 8).is_err());
        // An unknown version.
        let mut b2 = buf(8);
        let q2 = view(&mut b2, 8);
        q2.store16(7, OFF_VERSION).unwrap();
        assert!(q2.recover(0, 8, 0, 0).is_err());
        // A ring larger than the region.
        let mut b3 = buf(8);
        let q3 = view(&mut b3, 8);
        q3.init(8).unwrap();
        assert!(q3.recover(0, 16, 0, 0).is_err());
        // An inflight byte that is neither 0 nor 1.
        let mut b4 = buf(8);
        let q4 = view(&mut b4, 8);
        q4.init(8).unwrap();
        q4.s.store(9u8, QUEUE_HEADER_SIZE, Ordering::Relaxed)
            .unwrap();
        assert!(q4.recover(0, 8, 0, 1).is_err());
        // The guest's own indices are broken.
        assert!(q3.recover(0, 8, 0, 9).is_err());
    }

    #[test]
    fn reset_forgets_every_mark() {
        let mut b = buf(4);
        let q = view(&mut b, 4);
        q.init(4).unwrap();
        q.set_inflight(0, 0).unwrap();
        q.set_inflight(3, 1).unwrap();
        q.reset(9).unwrap();
        let r = q.recover(0, 4, 9, 9).unwrap();
        assert!(r.resubmit.is_empty());
        assert_eq!(r.next_avail, 9);
    }

    /// The fuzz target's invariants (fuzz/fuzz_targets/inflight_region.rs) on random regions
    /// biased towards plausible ones: never more resubmitted than outstanding, never a head
    /// outside the ring or twice, the ring resumes right after them, a reset region is clean.
    #[test]
    fn random_regions_keep_the_invariants() {
        let mut rng = fastrand::Rng::with_seed(0x1f1e_2d3c);
        let qs = 32u16;
        for _ in 0..20_000 {
            let mut b = buf(qs);
            let q = view(&mut b, qs);
            if rng.u8(..4) != 0 {
                q.init(qs).unwrap();
            }
            for head in 0..qs {
                let off = QUEUE_HEADER_SIZE + usize::from(head) * DESC_STATE_SIZE;
                let flag = match rng.u8(..10) {
                    0..=6 => 0,
                    7 | 8 => 1,
                    _ => rng.u8(..),
                };
                q.s.store(flag, off, Ordering::Relaxed).unwrap();
                q.s.store(rng.u64(..64), off + 8, Ordering::Relaxed)
                    .unwrap();
            }
            let used = rng.u16(..);
            let region_used = used.wrapping_sub(rng.u16(..3));
            q.store16(region_used, OFF_USED_IDX).unwrap();
            q.store16(rng.u16(..40), OFF_LAST_BATCH_HEAD).unwrap();
            let ring = 1u16 << rng.u8(..7);
            let avail = used.wrapping_add(rng.u16(..70));
            match q.recover(0, ring, used, avail) {
                Ok(r) => {
                    let n = r.resubmit.len();
                    assert!(n <= usize::from(avail.wrapping_sub(used)));
                    assert_eq!(usize::from(r.next_avail.wrapping_sub(used)), n);
                    let mut seen = std::collections::BTreeSet::new();
                    for &h in &r.resubmit {
                        assert!(h < ring && seen.insert(h));
                    }
                }
                Err(_) => {
                    q.reset(used).unwrap();
                    if avail.wrapping_sub(used) <= ring && ring <= qs {
                        let r = q.recover(0, ring, used, avail).unwrap();
                        assert!(r.resubmit.is_empty());
                        assert_eq!(r.next_avail, used);
                    }
                }
            }
        }
    }

    #[test]
    fn regions_are_created_and_mapped_again() {
        let (region, file, size) = InflightRegion::create(2, 128, 4).unwrap();
        assert_eq!(size, 2 * 2112);
        region.queue(1).unwrap().set_inflight(77, 5).unwrap();
        let again = InflightRegion::map(&file, size, 0, 2, 128, 4).unwrap();
        assert!(again.queue(1).unwrap().is_inflight(77));
        assert!(!again.queue(0).unwrap().is_inflight(77));
        assert!(again.queue(2).is_none());
        // Too small, too many queues, past the end of the file.
        assert!(InflightRegion::map(&file, size - 1, 0, 2, 128, 4).is_err());
        assert!(InflightRegion::map(&file, size, 0, 5, 128, 4).is_err());
        assert!(InflightRegion::map(&file, size, 4096, 2, 128, 4).is_err());
        assert!(InflightRegion::create(0, 128, 4).is_err());
        assert!(InflightRegion::create(1, 0, 4).is_err());
    }
}
