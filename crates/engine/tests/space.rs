//! Space: discard and write-zeroes give space back, and no copy is kept that no version reads
//! (issue 17). Measured as space (allocated file blocks, store chunks), never as time.

use snapmv_engine::{FormatOptions, Origin, Store};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

const MIB: u64 = 1 << 20;

/// Bytes the file system holds for `p`.
fn allocated(p: &Path) -> u64 {
    std::fs::metadata(p).unwrap().blocks() * 512
}

/// A sparse file of `size` bytes whose every 4 KiB block holds data.
fn data_file(p: &Path, size: u64) {
    let block: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8 + 1).collect();
    let mut all = Vec::with_capacity(size as usize);
    while (all.len() as u64) < size {
        all.extend_from_slice(&block);
    }
    std::fs::write(p, &all).unwrap();
}

fn store_with(dir: &Path, size: u64, chunk_size: u32) -> Store {
    let sp = dir.join("store");
    std::fs::File::create(&sp).unwrap().set_len(size).unwrap();
    Store::format(
        &sp,
        &FormatOptions {
            chunk_size,
            force: false,
        },
    )
    .unwrap();
    Store::open(&sp, false).unwrap()
}

fn bind(store: &Store, dir: &Path, size: u64) -> (Origin, std::path::PathBuf) {
    let op = dir.join("origin");
    data_file(&op, size);
    (store.bind_origin("o", &op, false).unwrap(), op)
}

/// Waits (bounded: 30 s) for the background work to bring `used` to at most `want`.
fn settle_used(store: &Store, want: u64) -> u64 {
    for _ in 0..3000 {
        let u = store.status().chunks_used;
        if u <= want {
            return u;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    store.status().chunks_used
}

#[test]
fn origin_discard_punches_holes() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_with(dir.path(), 64 * MIB, 64 << 10);
    let (o, op) = bind(&store, dir.path(), 64 * MIB);
    let before = allocated(&op);
    assert!(before >= 64 * MIB, "the origin starts fully allocated");
    o.volume().discard(0, 64 * MIB).unwrap();
    let after = allocated(&op);
    eprintln!("origin discard: file allocation {before} -> {after} bytes");
    assert!(
        after <= before / 10,
        "a 64 MiB discard freed {} of {} bytes of the origin",
        before - after,
        before
    );
    let mut buf = vec![1u8; MIB as usize];
    o.volume().read(7 * MIB, &mut buf).unwrap();
    assert!(buf.iter().all(|b| *b == 0), "discarded origin reads zeros");
    assert_eq!(store.status().chunks_used, 0, "no snapshot: nothing copied");
}

#[test]
fn origin_discard_keeps_what_a_snapshot_reads() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_with(dir.path(), 64 * MIB, 64 << 10);
    let (o, op) = bind(&store, dir.path(), 16 * MIB);
    let mut first = vec![0u8; 16 * MIB as usize];
    o.volume().read(0, &mut first).unwrap();
    let a = o.create_snapshot(None, "").unwrap();
    // Half of it zeros (copied out for A as data: 8 MiB in 64 KiB chunks).
    o.volume().write_zeroes(0, 8 * MIB).unwrap();
    assert_eq!(store.status().chunks_used, 128);
    let mut want = vec![0u8; 16 * MIB as usize];
    o.volume().read(0, &mut want).unwrap();
    let b = o.create_snapshot(None, "").unwrap();
    o.volume().discard(0, 16 * MIB).unwrap();
    // For B, the zeroed half is copied as zero exceptions, the other half as data.
    assert_eq!(store.status().chunks_used, 256);
    assert!(allocated(&op) <= MIB, "the origin file is holes");
    let mut got = vec![0u8; 16 * MIB as usize];
    o.snapshot_volume(a).unwrap().read(0, &mut got).unwrap();
    assert!(got == first, "snapshot A still reads its data");
    o.snapshot_volume(b).unwrap().read(0, &mut got).unwrap();
    assert!(got == want, "snapshot B still reads its data");
}

#[test]
fn snapshot_discard_and_write_zeroes_cost_metadata_only() {
    let dir = tempfile::tempdir().unwrap();
    let size = 256 * MIB;
    let store = store_with(dir.path(), 512 * MIB, 64 << 10);
    let (o, _) = bind(&store, dir.path(), size);
    let t = o.create_snapshot(None, "").unwrap();
    let v = o.snapshot_volume(t).unwrap();
    // The snapshot owns some data of its own first.
    v.write(0, &vec![9u8; 32 * MIB as usize]).unwrap();
    v.flush().unwrap();
    let before = store.status().chunks_used;
    assert_eq!(before, 512);
    v.discard(0, size).unwrap();
    v.write_zeroes(0, size).unwrap();
    v.flush().unwrap();
    let after = settle_used(&store, 0);
    let chunks = size / (64 << 10);
    eprintln!("snapshot discard + write-zeroes: store chunks {before} -> {after} (of {chunks})");
    assert!(
        after <= chunks / 100,
        "discard + write-zeroes of a whole {size}-byte snapshot left {after} store chunks (of {chunks})"
    );
    let mut buf = vec![1u8; 4 * MIB as usize];
    for at in [0, 100 * MIB, size - 4 * MIB] {
        v.read(at, &mut buf).unwrap();
        assert!(buf.iter().all(|b| *b == 0), "snapshot reads zeros at {at}");
    }
    // The origin is untouched, and a write after the discard lands.
    o.volume().read(0, &mut buf).unwrap();
    assert!(buf.iter().all(|b| *b != 0));
    v.write(MIB + 512, &[5u8; 512]).unwrap();
    v.read(MIB, &mut buf[..4096]).unwrap();
    assert!(buf[..512].iter().all(|b| *b == 0) && buf[512..1024].iter().all(|b| *b == 5));
}

#[test]
fn zero_exceptions_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let sp = dir.path().join("store");
    let size = 4 * MIB;
    {
        let store = store_with(dir.path(), 64 * MIB, 64 << 10);
        let (o, _) = bind(&store, dir.path(), size);
        let t = o.create_snapshot(None, "").unwrap();
        assert_eq!(t, 1);
        o.snapshot_volume(t).unwrap().discard(MIB, MIB).unwrap();
    }
    let store = Store::open(&sp, false).unwrap();
    let o = store
        .open_origin("o", &dir.path().join("origin"), false)
        .unwrap();
    let mut buf = vec![1u8; size as usize];
    o.snapshot_volume(1).unwrap().read(0, &mut buf).unwrap();
    let m = MIB as usize;
    assert!(buf[m..2 * m].iter().all(|b| *b == 0));
    assert!(buf[..m].iter().all(|b| *b != 0) && buf[2 * m..].iter().all(|b| *b != 0));
    drop(o);
    drop(store);
    let report = snapmv_engine::check(&sp, false).unwrap();
    assert!(report.is_clean(), "{:?}", report.problems);
}

#[test]
fn no_copy_that_no_version_reads() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_with(dir.path(), 128 * MIB, 4096);
    let (o, _) = bind(&store, dir.path(), 32 * MIB);
    let t = o.create_snapshot(None, "").unwrap();
    let data = vec![3u8; 16 * MIB as usize];
    // The snapshot first, then the origin: the origin's copies would be shadowed.
    o.snapshot_volume(t).unwrap().write(0, &data).unwrap();
    o.volume().write(0, &vec![4u8; 16 * MIB as usize]).unwrap();
    o.volume().flush().unwrap();
    let read_by_some = 16 * MIB / 4096;
    let used = settle_used(&store, read_by_some * 5 / 4);
    eprintln!("snapshot then origin, 16 MiB: {used} store chunks for {read_by_some} read");
    assert!(
        used * 4 <= read_by_some * 5,
        "{used} store chunks for {read_by_some} that some version reads (snapshot first)"
    );
    let mut buf = vec![0u8; 16 * MIB as usize];
    o.snapshot_volume(t).unwrap().read(0, &mut buf).unwrap();
    assert!(buf.iter().all(|b| *b == 3));
    o.volume().read(0, &mut buf).unwrap();
    assert!(buf.iter().all(|b| *b == 4));
}

#[test]
fn shadowed_chain_copies_are_reclaimed() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_with(dir.path(), 128 * MIB, 4096);
    let (o, _) = bind(&store, dir.path(), 16 * MIB);
    let t = o.create_snapshot(None, "").unwrap();
    // The origin first (copies out what t reads), then t's own first writes: the copies
    // are shadowed, and the background reclaim frees them without any delete.
    o.volume().write(0, &vec![4u8; 16 * MIB as usize]).unwrap();
    o.volume().flush().unwrap();
    let copies = store.status().chunks_used;
    assert_eq!(copies, 16 * MIB / 4096);
    o.snapshot_volume(t)
        .unwrap()
        .write(0, &vec![5u8; 16 * MIB as usize])
        .unwrap();
    let used = settle_used(&store, copies);
    eprintln!("origin then snapshot, 16 MiB: {used} store chunks for {copies} read");
    assert_eq!(used, copies, "the shadowed copies are freed");
    let mut buf = vec![0u8; 16 * MIB as usize];
    o.snapshot_volume(t).unwrap().read(0, &mut buf).unwrap();
    assert!(buf.iter().all(|b| *b == 5));
    o.volume().read(0, &mut buf).unwrap();
    assert!(buf.iter().all(|b| *b == 4));
}
