//! A hostile or stale inflight region (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD) meeting a guest's
//! rings after a restart. The input is the region's bytes, the guest's memory (descriptor
//! table, avail and used rings, request headers) and a few control bytes (ring size). The
//! device's recovery must not panic, must never resubmit more requests than the guest has
//! outstanding or a head outside the ring, must resume the available ring exactly after them,
//! and the resubmitted chains must go through the normal (checked) request path; a rejected
//! region, once reset, must recover to "nothing in flight".
#![no_main]

use libfuzzer_sys::fuzz_target;
use snapmv::vhost_blk::inflight::{queue_region_size, split_chain, InflightQueue};
use snapmv::vhost_blk::request::{handle_parsed, GuestMem, ParsedChain, RequestContext};
use snapmv::vhost_blk::{BlockDisk, MemDisk};
use std::sync::OnceLock;
use vm_memory::{Bytes, GuestAddress, VolatileSlice};

const MEM: usize = 0x8000;
const DESC: u64 = 0x0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
/// The region is laid out for this many entries (the frontend's queue size).
const REGION_QSIZE: u16 = 256;

fn disk() -> &'static MemDisk {
    static D: OnceLock<MemDisk> = OnceLock::new();
    D.get_or_init(|| MemDisk::new("fuzz disk", 64 << 10))
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let (ctl, rest) = data.split_at(2);
    let region_len = queue_region_size(REGION_QSIZE);
    let (region_bytes, image) = rest.split_at(rest.len().min(region_len));
    // An 8-byte aligned region, as mmap gives.
    let mut region = vec![0u64; region_len / 8];
    // SAFETY: viewing the u64 buffer as bytes of the same length; u8 has no alignment or
    // validity requirement and `region` is not otherwise used while the view lives.
    let bytes = unsafe {
        std::slice::from_raw_parts_mut(region.as_mut_ptr().cast::<u8>(), region.len() * 8)
    };
    bytes[..region_bytes.len()].copy_from_slice(region_bytes);
    let iq = InflightQueue::new(VolatileSlice::from(bytes), REGION_QSIZE);

    let mem = GuestMem::from_ranges(&[(GuestAddress(0), MEM)]).expect("guest memory");
    mem.write_slice(&image[..image.len().min(MEM)], GuestAddress(0))
        .unwrap();
    let ring_size = 1u16 << (ctl[0] % 10); // 1..=512: larger than the region too
    let used: u16 = mem.read_obj(GuestAddress(USED + 2)).unwrap();
    let avail: u16 = mem.read_obj(GuestAddress(AVAIL + 2)).unwrap();

    let d = disk();
    let ctx = RequestContext {
        disk: d,
        size: d.size(),
        readonly: ctl[1] & 1 != 0,
        writeback: true,
        id: b"fuzz",
    };
    match iq.recover(0, ring_size, used, avail) {
        Ok(r) => {
            let outstanding = avail.wrapping_sub(used);
            let n = r.resubmit.len();
            assert!(n <= usize::from(outstanding), "{n} resubmitted, {outstanding} outstanding");
            assert!(n <= usize::from(ring_size));
            assert_eq!(usize::from(r.next_avail.wrapping_sub(used)), n);
            let mut seen = std::collections::BTreeSet::new();
            for &h in &r.resubmit {
                assert!(h < ring_size, "head {h} outside a ring of {ring_size}");
                assert!(seen.insert(h), "head {h} resubmitted twice");
                let chain = ParsedChain::parse(
                    split_chain(&mem, GuestAddress(DESC), ring_size, h).into_iter(),
                );
                let _ = handle_parsed(&mem, chain, &ctx);
            }
            // The usual life of the resubmitted requests afterwards.
            let mut u = used;
            for &h in &r.resubmit {
                iq.pre_put(h).unwrap();
                u = u.wrapping_add(1);
                iq.post_put(h, u).unwrap();
            }
            let again = iq.recover(0, ring_size, u, avail).expect("a clean region");
            assert!(again.resubmit.is_empty());
        }
        Err(_) => {
            iq.reset(used).unwrap();
            if avail.wrapping_sub(used) <= ring_size && ring_size <= REGION_QSIZE {
                let r = iq.recover(0, ring_size, used, avail).expect("a reset region");
                assert!(r.resubmit.is_empty());
                assert_eq!(r.next_avail, used);
            }
        }
    }
    // Marks on arbitrary heads never panic.
    let h = u16::from_le_bytes([ctl[0], ctl[1]]);
    let _ = iq.set_inflight(h, 7);
    let _ = iq.pre_put(h);
    let _ = iq.post_put(h, used);
});
