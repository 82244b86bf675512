//! Memo edit (`Origin::set_memo`, journal record 17, format 4): durable when it returns — a
//! power cut at that point (any subset of unsynced writes) keeps it, through journal replay
//! and through the checkpoint the reopen writes; it follows the tag across a snapshot of the
//! snapshot (which freezes the tag's leaf); bad tags and long memos are refused.

mod common;

use common::{MemStorage, RecordingStorage};
use snapmv_engine::{ErrorKind, FormatOptions, Origin, Storage, Store};
use std::sync::{Arc, Mutex};

fn memos(o: &Origin) -> Vec<(u32, String)> {
    let mut v: Vec<(u32, String)> = o.snapshots().into_iter().map(|s| (s.tag, s.memo)).collect();
    v.sort();
    v
}

#[test]
fn a_memo_edit_is_durable_and_follows_the_tag() {
    let world = Arc::new(Mutex::new(()));
    let store_rec = RecordingStorage::new(&world, "store", vec![0; 4 << 20]);
    let origin_rec = RecordingStorage::new(&world, "origin", vec![0; 64 * 4096]);
    Store::format_storage(store_rec.as_ref(), &FormatOptions::default()).unwrap();
    let store = Store::open_storage(store_rec.clone() as Arc<dyn Storage>).unwrap();
    let o = store
        .bind_origin_storage("o", origin_rec.clone() as Arc<dyn Storage>)
        .unwrap();
    let t1 = o.create_snapshot(None, "first").unwrap();
    o.volume().write(0, &[7u8; 4096]).unwrap();
    let t2 = o.create_snapshot(None, "second").unwrap();
    o.set_memo(t1, "renamed first").unwrap();
    // A snapshot of t1 freezes its leaf: the memo moves with the tag, the child has its own.
    let t3 = o.create_snapshot(Some(t1), "child").unwrap();
    o.set_memo(t1, "after the branch").unwrap();
    o.set_memo(t2, "").unwrap();
    let want = vec![
        (t1, "after the branch".to_string()),
        (t2, String::new()),
        (t3, "child".to_string()),
    ];
    assert_eq!(memos(&o), want);

    let e = o.set_memo(99, "x").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    let e = o.set_memo(t1, &"m".repeat(257)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
    assert_eq!(memos(&o), want, "a refused edit changed a memo");

    // Power cuts now: whatever unsynced writes land, the edits are there.
    for seed in 0..20 {
        let mut rng = fastrand::Rng::with_seed(seed);
        let (si, oi) = {
            let _w = world.lock().unwrap();
            (
                store_rec.crash_image(&mut rng),
                origin_rec.crash_image(&mut rng),
            )
        };
        let st = MemStorage::from_bytes_rebooted("store-after", si);
        let report = snapmv_engine::check_storage(st.as_ref(), false).unwrap();
        assert!(report.is_clean(), "seed {seed}: {:?}", report.problems);
        let s2 = Store::open_storage(st.clone() as Arc<dyn Storage>).unwrap();
        let o2 = s2
            .open_origin_storage(
                "o",
                MemStorage::from_bytes("origin-after", oi) as Arc<dyn Storage>,
            )
            .unwrap();
        assert_eq!(memos(&o2), want, "seed {seed}: after a power cut");
        // The reopen folded the journal into a checkpoint: edit again, reopen again.
        o2.set_memo(t3, "second life").unwrap();
        drop(o2);
        drop(s2);
        let s3 = Store::open_storage(st as Arc<dyn Storage>).unwrap();
        let o3 = s3
            .open_origin_storage(
                "o",
                MemStorage::new("origin-3", 64 * 4096) as Arc<dyn Storage>,
            )
            .unwrap();
        let mut want3 = want.clone();
        want3[2].1 = "second life".into();
        assert_eq!(memos(&o3), want3, "seed {seed}: after a second reopen");
    }
}
