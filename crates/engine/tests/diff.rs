//! Changed-block diff: every chunk outside the diff reads the same in both versions (checked
//! byte for byte over random histories with snapshots of snapshots, snapshot writes and
//! rollbacks), simple cases are exact, and a diff of two snapshots 1% apart on a 4 GiB sparse
//! origin is measured.

mod common;

use common::{env_u64, MemStorage};
use snapmv_engine::{FormatOptions, Origin, Storage, Store};
use std::sync::Arc;
use std::time::Instant;

const CS: u64 = 4096;

fn setup(chunks: u64) -> (Store, Origin) {
    let store_st = MemStorage::new("store", 64 << 20);
    let origin_st = MemStorage::new("origin", (chunks * CS) as usize);
    Store::format_storage(store_st.as_ref(), &FormatOptions::default()).unwrap();
    let store = Store::open_storage(store_st as Arc<dyn Storage>).unwrap();
    let origin = store
        .bind_origin_storage("o", origin_st as Arc<dyn Storage>)
        .unwrap();
    (store, origin)
}

fn read_all(o: &Origin, tag: Option<u32>) -> Vec<u8> {
    let v = match tag {
        None => o.volume(),
        Some(t) => o.snapshot_volume(t).unwrap(),
    };
    let mut buf = vec![0u8; o.size() as usize];
    v.read(0, &mut buf).unwrap();
    buf
}

fn chunks_of(extents: &[(u64, u64)]) -> Vec<u64> {
    extents
        .iter()
        .flat_map(|(o, l)| (o / CS)..(o + l).div_ceil(CS))
        .collect()
}

fn fill(o: &Origin, tag: Option<u32>, chunk: u64, byte: u8) {
    let v = match tag {
        None => o.volume(),
        Some(t) => o.snapshot_volume(t).unwrap(),
    };
    v.write(chunk * CS, &vec![byte; CS as usize]).unwrap();
}

/// Checks the diff of every ordered pair of versions against their contents.
fn check_all(o: &Origin, ctx: &str) {
    let tags: Vec<u32> = o.snapshots().iter().map(|s| s.tag).collect();
    let mut versions: Vec<Option<u32>> = tags.iter().map(|t| Some(*t)).collect();
    versions.push(None);
    let data: Vec<Vec<u8>> = versions.iter().map(|v| read_all(o, *v)).collect();
    let n = o.size().div_ceil(CS);
    for (i, a) in versions.iter().enumerate() {
        for (j, b) in versions.iter().enumerate() {
            let ext = o.diff(*a, *b).unwrap();
            // Sorted, merged, inside the volume.
            for w in ext.windows(2) {
                assert!(
                    w[0].0 + w[0].1 < w[1].0,
                    "{ctx}: extents not sorted/merged: {ext:?}"
                );
            }
            assert!(ext
                .iter()
                .all(|(off, len)| *len > 0 && off + len <= o.size()));
            let listed = chunks_of(&ext);
            if a == b {
                assert!(listed.is_empty(), "{ctx}: {a:?} against itself: {ext:?}");
            }
            for c in 0..n {
                let r = (c * CS) as usize..((c + 1) * CS).min(o.size()) as usize;
                if data[i][r.clone()] != data[j][r] {
                    assert!(
                        listed.binary_search(&c).is_ok(),
                        "{ctx}: chunk {c} differs between {a:?} and {b:?} but is not in the diff {ext:?}"
                    );
                }
            }
        }
    }
}

#[test]
fn exact_for_simple_histories() {
    let (_s, o) = setup(64);
    for c in 0..64 {
        fill(&o, None, c, 1);
    }
    let s1 = o.create_snapshot(None, "s1").unwrap();
    assert!(o.diff(Some(s1), None).unwrap().is_empty());
    fill(&o, None, 3, 2);
    fill(&o, None, 7, 2);
    fill(&o, None, 8, 2);
    // Written out first: a snapshot cut while overlays exist owns copies of their chunks,
    // which a diff against the origin reports.
    o.volume().flush().unwrap();
    let s2 = o.create_snapshot(None, "s2").unwrap();
    let want = vec![(3 * CS, CS), (7 * CS, 2 * CS)];
    assert_eq!(o.diff(Some(s1), Some(s2)).unwrap(), want);
    assert_eq!(o.diff(Some(s2), Some(s1)).unwrap(), want);
    assert_eq!(o.diff(Some(s1), None).unwrap(), want);
    assert!(o.diff(Some(s2), None).unwrap().is_empty());
    // A snapshot of a snapshot, then written.
    let s3 = o.create_snapshot(Some(s2), "s3").unwrap();
    assert!(o.diff(Some(s2), Some(s3)).unwrap().is_empty());
    fill(&o, Some(s3), 20, 9);
    assert_eq!(o.diff(Some(s2), Some(s3)).unwrap(), vec![(20 * CS, CS)]);
    assert_eq!(
        o.diff(Some(s1), Some(s3)).unwrap(),
        vec![(3 * CS, CS), (7 * CS, 2 * CS), (20 * CS, CS)]
    );
    // Rolled back to s1: the origin reads as s1 again.
    o.rollback(s1).unwrap();
    check_all(&o, "during/after rollback");
    o.wait_rollback().unwrap();
    check_all(&o, "after rollback");
    let back = chunks_of(&o.diff(Some(s2), None).unwrap());
    for c in [3, 7, 8] {
        assert!(
            back.contains(&c),
            "chunk {c} changed by the rollback: {back:?}"
        );
    }
    assert!(
        o.diff(Some(99), None).is_err(),
        "an unknown tag is an error"
    );
}

#[test]
fn never_omits_a_changed_chunk() {
    let seeds = env_u64("SNAPMV_DIFF_SEEDS", 12);
    for seed in 0..seeds {
        let mut rng = fastrand::Rng::with_seed(seed);
        let n = 24 + rng.u64(0..16);
        let (_s, o) = setup(n);
        for step in 0..60 {
            let tags: Vec<u32> = o.snapshots().iter().map(|s| s.tag).collect();
            let pick = |rng: &mut fastrand::Rng| -> Option<u32> {
                if tags.is_empty() || rng.bool() {
                    None
                } else {
                    Some(tags[rng.usize(0..tags.len())])
                }
            };
            match rng.u8(0..10) {
                0..=4 => {
                    let t = pick(&mut rng);
                    let c = rng.u64(0..n);
                    let v = match t {
                        None => o.volume(),
                        Some(t) => o.snapshot_volume(t).unwrap(),
                    };
                    let len = 512 * rng.u64(1..=8);
                    v.write(c * CS, &vec![rng.u8(..); len as usize]).unwrap();
                }
                5..=6 => {
                    let t = pick(&mut rng);
                    // An origin snapshot is refused while a rollback runs.
                    let _ = o.create_snapshot(t, "x");
                }
                7 if !tags.is_empty() => {
                    let t = tags[rng.usize(0..tags.len())];
                    if o.rollback(t).is_ok() && rng.bool() {
                        o.wait_rollback().unwrap();
                    }
                }
                8 if tags.len() > 2 => {
                    let t = tags[rng.usize(0..tags.len())];
                    let _ = o.delete_snapshot(t);
                }
                _ => {}
            }
            if step % 15 == 14 {
                check_all(&o, &format!("seed {seed} step {step}"));
            }
        }
        o.wait_rollback().unwrap();
        check_all(&o, &format!("seed {seed} end"));
    }
}

/// Two snapshots 1% apart on a 4 GiB sparse origin (1 Mi chunks of 4 KiB).
#[test]
fn four_gib_one_percent_apart() {
    let dir = tempfile::tempdir().unwrap();
    let size: u64 = 4 << 30;
    let opath = dir.path().join("origin.raw");
    let spath = dir.path().join("cow");
    std::fs::File::create(&opath)
        .unwrap()
        .set_len(size)
        .unwrap();
    std::fs::File::create(&spath)
        .unwrap()
        .set_len(512 << 20)
        .unwrap();
    Store::format(&spath, &FormatOptions::default()).unwrap();
    let store = Store::open(&spath, false).unwrap();
    let o = store.bind_origin("o", &opath, false).unwrap();
    let nchunks = size / CS;
    let s1 = o.create_snapshot(None, "s1").unwrap();
    let changed = nchunks / 100;
    let mut rng = fastrand::Rng::with_seed(7);
    let mut want: Vec<u64> = (0..changed).map(|_| rng.u64(0..nchunks)).collect();
    want.sort();
    want.dedup();
    let v = o.volume();
    let block = vec![0xabu8; CS as usize];
    for c in &want {
        v.write(c * CS, &block).unwrap();
    }
    // Written out first: a snapshot cut while overlays exist owns copies of their chunks,
    // which a diff against the origin reports (it compares where data lives, not the data).
    v.flush().unwrap();
    let s2 = o.create_snapshot(None, "s2").unwrap();
    let mut times = Vec::new();
    let mut ext = Vec::new();
    for _ in 0..5 {
        let t0 = Instant::now();
        ext = o.diff(Some(s1), Some(s2)).unwrap();
        times.push(t0.elapsed());
    }
    assert_eq!(chunks_of(&ext), want);
    let mut none = Vec::new();
    for _ in 0..5 {
        let t0 = Instant::now();
        assert!(o.diff(Some(s2), None).unwrap().is_empty());
        none.push(t0.elapsed());
    }
    times.sort();
    none.sort();
    eprintln!(
        "4 GiB origin, {} chunks, {} changed chunks in {} extents: diff s1->s2 min {:?} median {:?}; \
         diff s2->origin (nothing changed) min {:?} median {:?}",
        nchunks,
        want.len(),
        ext.len(),
        times[0],
        times[2],
        none[0],
        none[2]
    );
}
