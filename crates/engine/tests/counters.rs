//! The engine's counters (`OriginStatus::copy_outs`, overlays; `Store::commit_stats`) equal
//! what a client did: one copy-out per chunk first written after a snapshot, none for a
//! chunk written again or one no snapshot shares; overlays pending until written out; commit
//! rounds counted with their durations.

mod common;

use common::MemStorage;
use snapmv_engine::{FormatOptions, Storage, Store};
use std::sync::Arc;

const CS: u64 = 4096;

#[test]
fn copy_outs_overlays_and_commits_are_counted() {
    let st = MemStorage::new("store", (4 << 20) + 1024 * 4096);
    Store::format_storage(st.as_ref(), &FormatOptions::default()).unwrap();
    let store = Store::open_storage(st as Arc<dyn Storage>).unwrap();
    let o = store
        .bind_origin_storage(
            "o",
            MemStorage::new("o", 64 * CS as usize) as Arc<dyn Storage>,
        )
        .unwrap();
    let v = o.volume();
    // No snapshot: nothing to copy.
    for c in 0..8 {
        v.write(c * CS, &[1u8; CS as usize]).unwrap();
    }
    assert_eq!(o.status().copy_outs, 0);
    o.create_snapshot(None, "").unwrap();
    // Chunks 0..5 first written (a 2-chunk write counts its two chunks), then written again.
    v.write(0, &[2u8; 2 * CS as usize]).unwrap();
    for c in 2..5 {
        v.write(c * CS + 512, &[2u8; 512]).unwrap();
    }
    let s = o.status();
    assert_eq!(s.copy_outs, 5, "{s:?}");
    for c in 0..5 {
        v.write(c * CS, &[3u8; 512]).unwrap();
    }
    assert_eq!(o.status().copy_outs, 5, "a second write copies nothing");
    // A flush writes every overlay out; none is left pending.
    v.flush().unwrap();
    let s = o.status();
    assert_eq!((s.overlay_chunks, s.overlay_bytes), (0, 0), "{s:?}");
    let before = store.commit_stats();
    assert!(before.rounds > 0, "the flush committed: {before:?}");
    o.create_snapshot_sync(None, "").unwrap();
    let after = store.commit_stats();
    assert!(after.rounds > before.rounds, "{before:?} -> {after:?}");
    assert!(
        after.p50_us <= after.p99_us && after.p99_us <= after.max_us,
        "{after:?}"
    );
    assert!(after.mean_us > 0.0, "{after:?}");
    v.write(7 * CS, &[4u8; 512]).unwrap();
    assert_eq!(o.status().copy_outs, 6, "one more for the new snapshot");
}

/// `SnapshotInfo::shared_chunks` beside `exclusive_chunks`: a store chunk read by one snapshot
/// is its own, one read by several counts as shared for each of them.
#[test]
fn shared_and_exclusive_chunks_per_snapshot() {
    let st = MemStorage::new("store", 8 << 20);
    Store::format_storage(st.as_ref(), &FormatOptions::default()).unwrap();
    let store = Store::open_storage(st as Arc<dyn Storage>).unwrap();
    let o = store
        .bind_origin_storage(
            "o",
            MemStorage::new("o", 16 * CS as usize) as Arc<dyn Storage>,
        )
        .unwrap();
    let usage = |t: u32| {
        let s = o.snapshots().into_iter().find(|s| s.tag == t).unwrap();
        (s.exclusive_chunks, s.shared_chunks)
    };
    // Data, not zeros, under the copies: a copy-out of a zero chunk holds no store chunk.
    o.volume().write(0, &[9u8; 4 * CS as usize]).unwrap();
    let a = o.create_snapshot(None, "").unwrap();
    o.volume().write(0, &[1u8; 4 * CS as usize]).unwrap();
    o.volume().flush().unwrap();
    let b = o.create_snapshot(None, "").unwrap();
    o.volume().write(0, &[2u8; 2 * CS as usize]).unwrap();
    o.volume().flush().unwrap();
    // A: its 4 copies; B: the 2 chunks copied since its cut; chunks 2, 3 B reads from the
    // origin (no store chunk).
    assert_eq!((usage(a), usage(b)), ((4, 0), (2, 0)));
    // C, a snapshot of B, reads what B reads: those 2 chunks are shared now.
    let c = o.create_snapshot(Some(b), "").unwrap();
    assert_eq!((usage(a), usage(b), usage(c)), ((4, 0), (0, 2), (0, 2)));
    // C's own write: one chunk of its own.
    o.snapshot_volume(c)
        .unwrap()
        .write(8 * CS, &[3u8; 512])
        .unwrap();
    assert_eq!(usage(c), (1, 2));
}
