//! Consistency groups (`snapshot_group`): a writer's writes to three origins — A and C in one
//! store, B in another — are causally ordered (A_i is acknowledged before B_i is issued, B_i
//! before C_i, C_i before A_{i+1}), each carrying its sequence number. Group snapshots taken
//! under that load must each be one cut: every snapshot holds exactly a prefix of its
//! origin's writes, and the prefixes agree (if B's snapshot holds B_i, A's holds A_i; if C's
//! holds C_i, B's holds B_i; and A's holds nothing past A_{i+1} when C's ends at C_i).
//! `SNAPMV_GROUPS` sets the number of groups (default 1,000).

mod common;

use common::{env_u64, MemStorage};
use snapmv_engine::{snapshot_group, ErrorKind, FormatOptions, Origin, Storage, Store};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::Arc;

const SECTOR: usize = 512;
/// 128 KiB origins: 32 chunks of 4 KiB, so writes keep hitting copied and uncopied chunks.
const SECTORS: u64 = 256;

/// A store for `groups` groups: deleted snapshots keep their (dead) nodes, which the
/// checkpoint area (sized from the store's size) must hold — 4 nodes per group in store1.
fn store(name: &str, groups: u64) -> Store {
    let size = ((4 << 20) + 4096 * 4096).max(groups as usize * (24 << 10));
    let st = MemStorage::new(name, size);
    Store::format_storage(st.as_ref(), &FormatOptions::default()).unwrap();
    Store::open_storage(st as Arc<dyn Storage>).unwrap()
}

fn origin(s: &Store, id: &str) -> Origin {
    s.bind_origin_storage(
        id,
        MemStorage::new(id, (SECTORS as usize) * SECTOR) as Arc<dyn Storage>,
    )
    .unwrap()
}

fn sector(seq: u64) -> Vec<u8> {
    let mut b = vec![0u8; SECTOR];
    for w in b.chunks_mut(8) {
        w.copy_from_slice(&seq.to_le_bytes());
    }
    b
}

/// The writes (1..=n, write i at sector i % SECTORS) a snapshot holds: it must hold exactly a
/// prefix of them; returns that prefix's length.
fn prefix(o: &Origin, tag: u32, what: &str) -> u64 {
    let mut buf = vec![0u8; SECTORS as usize * SECTOR];
    o.snapshot_volume(tag).unwrap().read(0, &mut buf).unwrap();
    let seqs: Vec<u64> = buf
        .chunks(SECTOR)
        .map(|s| {
            let v = u64::from_le_bytes(s[..8].try_into().unwrap());
            assert_eq!(s, &sector(v)[..], "{what}: torn sector");
            v
        })
        .collect();
    let n = seqs.iter().copied().max().unwrap_or(0);
    for (s, &v) in seqs.iter().enumerate() {
        // The newest write i <= n with i % SECTORS == s, or 0 (never written) if none.
        let want = if (s as u64) <= n {
            n - (n - s as u64) % SECTORS
        } else {
            0
        };
        assert_eq!(
            v, want,
            "{what}: sector {s} holds write {v}, not a prefix of {n} writes"
        );
    }
    n
}

#[test]
fn groups_under_causally_ordered_writes_are_one_cut() {
    let groups = env_u64("SNAPMV_GROUPS", 1000);
    let (s1, s2) = (store("store1", groups), store("store2", groups));
    let (a, b, c) = (origin(&s1, "a"), origin(&s2, "b"), origin(&s1, "c"));
    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicU64::new(0));
    let writer = {
        let vols = [a.volume(), b.volume(), c.volume()];
        let (stop, written) = (stop.clone(), written.clone());
        std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(SeqCst) {
                i += 1;
                for v in &vols {
                    v.write((i % SECTORS) * SECTOR as u64, &sector(i)).unwrap();
                }
                written.store(i, SeqCst);
            }
        })
    };
    let mut last = 0;
    for g in 0..groups {
        let tags = snapshot_group(&[(&b, None), (&a, None), (&c, None)], "group", false)
            .unwrap_or_else(|e| panic!("group {g}: {e}"));
        let (nb, na, nc) = (
            prefix(&b, tags[0], "b"),
            prefix(&a, tags[1], "a"),
            prefix(&c, tags[2], "c"),
        );
        // Causal order A_i → B_i → C_i → A_{i+1}: one cut sees a prefix of that sequence.
        assert!(
            na >= nb && nb >= nc && na <= nc + 1,
            "group {g}: cut violated: a holds {na} writes, b {nb}, c {nc}"
        );
        assert!(na >= last, "group {g}: a later group holds fewer writes");
        last = na;
        for (o, t) in [(&b, tags[0]), (&a, tags[1]), (&c, tags[2])] {
            o.delete_snapshot(t).unwrap();
        }
    }
    stop.store(true, SeqCst);
    writer.join().unwrap();
    assert!(
        written.load(SeqCst) > groups,
        "the writer made too little progress to test anything ({} writes for {groups} groups)",
        written.load(SeqCst)
    );
}

#[test]
fn a_group_that_fails_leaves_nothing_and_names_the_member() {
    let (s1, s2) = (store("store1", 0), store("store2", 0));
    let (a, b) = (origin(&s1, "a"), origin(&s2, "b"));
    let ta = a.create_snapshot(None, "old").unwrap();
    // Snapshot 99 of b does not exist.
    let e = snapshot_group(&[(&a, None), (&a, Some(ta)), (&b, None)], "", false).unwrap_err();
    assert_eq!(e.member, Some(1), "two volumes of one origin: {e}");
    let e = snapshot_group(&[(&a, None), (&b, Some(99))], "", false).unwrap_err();
    assert_eq!(e.member, Some(1));
    assert_eq!(e.error.kind(), ErrorKind::NotFound, "{e}");
    assert!(e.to_string().contains("member 1"), "{e}");
    assert_eq!(
        a.snapshots().len(),
        1,
        "a got a snapshot from a failed group"
    );
    assert!(
        b.snapshots().is_empty(),
        "b got a snapshot from a failed group"
    );
    let e = snapshot_group(&[(&a, None)], &"m".repeat(10_000), false).unwrap_err();
    assert_eq!(e.member, None);
    assert!(snapshot_group(&[], "", false).is_err());
    // A snapshot of a snapshot and an origin, durable: both cut, both listed.
    let tags = snapshot_group(&[(&a, Some(ta)), (&b, None)], "pair", true).unwrap();
    let sa = a.snapshots();
    let child = sa
        .iter()
        .find(|s| s.tag == tags[0])
        .expect("a's new snapshot");
    assert_eq!((child.parent, child.memo.as_str()), (Some(ta), "pair"));
    assert_eq!(b.snapshots()[0].tag, tags[1]);
}
