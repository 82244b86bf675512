//! Unit tests of request parsing, execution and completion.

use std::io::{IoSlice, IoSliceMut};

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::*;
use crate::vhost_blk::config::MAX_DISCARD_SEG;
use crate::vhost_blk::{BlockDisk, DiskError, MemDisk};
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
