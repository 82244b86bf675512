//! The virtio-blk request path as a guest drives it: the fuzz input is the guest's memory
//! (descriptor table, avail ring, headers, data), the queue is walked with virtio-queue exactly
//! as the device does (indirect tables, loops and bad addresses included), and every chain is
//! parsed and executed against an in-memory disk. Nothing may panic, and the status byte is
//! written only inside guest memory.
#![no_main]

use libfuzzer_sys::fuzz_target;
use snapmv::vhost_blk::request::{handle_parsed, GuestMem, ParsedChain, RequestContext};
use snapmv::vhost_blk::{BlockDisk, MemDisk};
use std::sync::OnceLock;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress};

/// Two regions with a hole between them, so that addresses in the hole are outside memory.
const R0: (u64, usize) = (0, 0x8000);
const R1: (u64, usize) = (0x10000, 0x8000);
const DESC: u64 = 0x0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;

fn disk() -> &'static MemDisk {
    static D: OnceLock<MemDisk> = OnceLock::new();
    D.get_or_init(|| MemDisk::new("fuzz disk", 64 << 10))
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let (ctl, image) = data.split_at(3);
    let mem = GuestMem::from_ranges(&[(GuestAddress(R0.0), R0.1), (GuestAddress(R1.0), R1.1)])
        .expect("guest memory");
    // The image fills region 0 from the start and region 1 with what is left.
    let n0 = image.len().min(R0.1);
    mem.write_slice(&image[..n0], GuestAddress(R0.0)).unwrap();
    let rest = &image[n0..];
    let n1 = rest.len().min(R1.1);
    mem.write_slice(&rest[..n1], GuestAddress(R1.0)).unwrap();
    // The used ring belongs to the device: start it clean.
    mem.write_slice(&[0u8; 4], GuestAddress(USED)).unwrap();

    let size = 1u16 << (ctl[0] % 9); // 1..=256
    let mut q = Queue::new(256).expect("queue");
    q.set_size(size);
    q.set_desc_table_address(Some(DESC as u32), Some(0));
    q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
    q.set_used_ring_address(Some(USED as u32), Some(0));
    q.set_event_idx(ctl[1] & 1 != 0);
    q.set_ready(true);
    let d = disk();
    let ctx = RequestContext {
        disk: d,
        size: d.size(),
        readonly: ctl[1] & 2 != 0,
        writeback: ctl[1] & 4 != 0,
        id: b"fuzz",
    };
    // A few passes, as successive kicks would.
    for _ in 0..=(ctl[2] % 3) {
        let chains: Vec<(u16, ParsedChain)> = match q.iter(&mem) {
            Ok(it) => it
                .map(|chain| (chain.head_index(), ParsedChain::parse(chain)))
                .collect(),
            Err(_) => return,
        };
        if chains.is_empty() {
            return;
        }
        for (head, chain) in chains {
            let _ = chain.request_type(&mem);
            let done = handle_parsed(&mem, chain, &ctx);
            let _ = q.add_used(&mem, head, done.used_len);
        }
    }
});
