//! `Volume::read_mapping`: the pieces a caller reads with its own I/O (the daemon's io_uring)
//! give exactly what `Volume::read` gives, and a mapping that a copy-out overtook says so.

use snapmv_engine::{FormatOptions, ReadMapping, ReadSource, Store, Volume};
use std::os::fd::BorrowedFd;

const CS: u64 = 4096;

/// Reads a mapping's pieces with plain `pread` on the descriptors it names.
fn read_through(m: &ReadMapping) -> Vec<u8> {
    let mut out = Vec::new();
    for seg in m.segments() {
        let mut buf = vec![0u8; seg.len as usize];
        match seg.source {
            ReadSource::Zeros => {}
            ReadSource::File { fd, offset } => {
                // SAFETY: the mapping keeps its origin, and so this descriptor, open.
                let fd = unsafe { BorrowedFd::borrow_raw(fd.fd) };
                let n = rustix::io::pread(fd, &mut buf, offset).unwrap();
                assert_eq!(n, buf.len(), "short read at {offset}");
            }
        }
        out.extend(buf);
    }
    out
}

fn read(v: &Volume, off: u64, len: u64) -> Vec<u8> {
    let mut b = vec![0u8; len as usize];
    v.read(off, &mut b).unwrap();
    b
}

#[test]
fn mapped_reads_match_volume_reads_and_a_copy_out_invalidates() {
    let dir = tempfile::tempdir().unwrap();
    let (opath, spath) = (dir.path().join("origin"), dir.path().join("store"));
    std::fs::File::create(&opath)
        .unwrap()
        .set_len(16 * CS)
        .unwrap();
    std::fs::File::create(&spath)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    Store::format(&spath, &FormatOptions::default()).unwrap();
    let store = Store::open(&spath, false).unwrap();
    let o = store.bind_origin("o", &opath, false).unwrap();
    let v = o.volume();
    for c in 0..16u64 {
        v.write(c * CS, &vec![c as u8 + 1; CS as usize]).unwrap();
    }

    // No snapshot: one piece, the origin file at the same offset.
    let m = v
        .read_mapping(CS + 512, 3 * CS)
        .expect("origin read is mapped");
    assert_eq!(m.segments().len(), 1);
    assert_eq!(read_through(&m), read(&v, CS + 512, 3 * CS));
    assert!(m.still_valid());
    // A bad range is not mapped (the synchronous path reports it).
    assert!(v.read_mapping(15 * CS, 2 * CS).is_none());
    assert!(v.read_mapping(1, 512).is_none());

    let s1 = o.create_snapshot(None, "s1").unwrap();
    let sv = o.snapshot_volume(s1).unwrap();
    v.write(2 * CS, &vec![0xee; CS as usize]).unwrap();
    // Written out: the origin now holds the new data, the store the snapshot's copy.
    v.flush().unwrap();
    let m = sv.read_mapping(0, 4 * CS).expect("snapshot read is mapped");
    // Origin chunks 0-1, the store's copy of chunk 2, origin chunk 3.
    assert_eq!(m.segments().len(), 3, "{m:?}");
    let want: Vec<u8> = (0..4u8).flat_map(|c| vec![c + 1; CS as usize]).collect();
    assert_eq!(read_through(&m), want);
    assert_eq!(read(&sv, 0, 4 * CS), want);
    assert!(m.still_valid());
    let om = v.read_mapping(0, 4 * CS).unwrap();
    assert_eq!(
        &read_through(&om)[2 * CS as usize..3 * CS as usize],
        &[0xee; CS as usize][..]
    );

    // A mapping taken before a copy-out of one of its chunks is no longer valid, and the
    // synchronous read still gives the snapshot's data.
    let stale = sv.read_mapping(5 * CS, CS).unwrap();
    assert!(stale.still_valid());
    v.write(5 * CS, &vec![0x55; CS as usize]).unwrap();
    assert!(!stale.still_valid());
    assert_eq!(read(&sv, 5 * CS, CS), vec![6u8; CS as usize]);
    let fresh = sv.read_mapping(5 * CS, CS).unwrap();
    assert_eq!(read_through(&fresh), vec![6u8; CS as usize]);

    // A deleted snapshot is not mapped (its reads fail on the synchronous path).
    o.delete_snapshot(s1).unwrap();
    assert!(sv.read_mapping(0, CS).is_none());
}
