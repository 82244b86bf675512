//! Unit tests of the pure parts of an origin — the version tree and the reader census — on
//! hand-built trees. No store, no I/O.

use super::reclaim::Readers;
use super::*;

fn node(kind: NodeKind, parent: u32, seq: u32, tag: u32) -> NodeMeta {
    NodeMeta {
        kind,
        dead: false,
        parent,
        seq,
        tag,
        parent_tag: 0,
        birth: 0,
        memo: String::new(),
    }
}

/// origin (0); chain seq 1 (1) with leaf tag 1 (2); chain seq 2 (3) with leaf tag 2 (4).
fn two_origin_snapshots() -> VersionTree {
    VersionTree::new(&[
        node(NodeKind::Origin, ROOT, 0, 0),
        node(NodeKind::Chain, ROOT, 1, 1),
        node(NodeKind::Leaf, 1, 0, 1),
        node(NodeKind::Chain, ROOT, 2, 2),
        node(NodeKind::Leaf, 3, 0, 2),
    ])
}

fn chain_ex(node: u32, seq: u32, store: u64) -> Ex {
    Ex { node, seq, store }
}

fn own_ex(node: u32, store: u64) -> Ex {
    Ex {
        node,
        seq: 0,
        store,
    }
}

#[test]
fn resolve_walks_to_the_oldest_chain_copy_not_older_than_the_reader() {
    let t = two_origin_snapshots();
    assert_eq!(t.chain_count(), 2);
    assert_eq!(t.chain_node(1), Some(1));
    assert_eq!(t.chain_node(2), Some(3));
    assert_eq!(t.chain_node(0), None);
    assert_eq!(t.chain_node(3), None);
    // No exception: every version reads the origin device.
    assert_eq!(t.resolve(2, None), None);
    assert_eq!(t.resolve(4, Some(&vec![])), None);
    // Only the newest chain node has a copy: the older snapshot inherits it.
    let newest_only = vec![chain_ex(3, 2, 20)];
    assert_eq!(t.resolve(2, Some(&newest_only)), Some(20));
    assert_eq!(t.resolve(4, Some(&newest_only)), Some(20));
    // Both have one: each reads its own chain's.
    let both = vec![chain_ex(1, 1, 10), chain_ex(3, 2, 20)];
    assert_eq!(t.resolve(2, Some(&both)), Some(10));
    assert_eq!(t.resolve(4, Some(&both)), Some(20));
    // Only the older has one: the newer snapshot reads the origin.
    let oldest_only = vec![chain_ex(1, 1, 10)];
    assert_eq!(t.resolve(2, Some(&oldest_only)), Some(10));
    assert_eq!(t.resolve(4, Some(&oldest_only)), None);
    // A leaf's own copy wins over the chain.
    let own = vec![own_ex(2, 5), chain_ex(3, 2, 20)];
    assert_eq!(t.resolve(2, Some(&own)), Some(5));
    assert_eq!(t.resolve(4, Some(&own)), Some(20));
    // The origin itself never resolves to the store.
    assert_eq!(t.resolve(ROOT, Some(&both)), None);
    // An unknown node resolves nowhere.
    assert_eq!(t.resolve(99, Some(&both)), None);
}

#[test]
fn freeze_and_push_give_a_snapshot_of_a_snapshot() {
    let t = two_origin_snapshots();
    // Snapshot of tag 1: freeze its leaf (2), a new leaf (5) for tag 1, a leaf (6) for tag 3.
    let again = t.freeze(2).expect("node 2 exists");
    assert_eq!(again.kind, NodeKind::Leaf);
    assert_eq!((again.parent, again.tag, again.seq), (2, 1, 0));
    assert_eq!(t.node(2).map(|n| n.kind()), Some(NodeKind::Frozen));
    assert_eq!(t.push(&again), Some(5));
    assert_eq!(t.push(&node(NodeKind::Leaf, 2, 0, 3)), Some(6));
    assert_eq!(t.count(), 7);
    assert_eq!(t.chain_count(), 2, "leaves are not chain nodes");
    // What tag 1 wrote before the snapshot (an exception of node 2) both leaves inherit.
    let list = vec![own_ex(2, 7), chain_ex(3, 2, 20)];
    assert_eq!(t.resolve(5, Some(&list)), Some(7));
    assert_eq!(t.resolve(6, Some(&list)), Some(7));
    // A later write of tag 1 goes to its new leaf only.
    let list = vec![own_ex(2, 7), own_ex(5, 8)];
    assert_eq!(t.resolve(5, Some(&list)), Some(8));
    assert_eq!(t.resolve(6, Some(&list)), Some(7));
    // Past the frozen nodes the walk reaches chain seq 1, which inherits from seq 2.
    let list = vec![chain_ex(3, 2, 20)];
    assert_eq!(t.resolve(6, Some(&list)), Some(20));
    assert_eq!(t.freeze(99), None);
    // Round trip through metadata.
    let again = VersionTree::new(&t.to_meta());
    assert_eq!(again.count(), 7);
    assert_eq!(again.node(2).map(|n| n.kind()), Some(NodeKind::Frozen));
    assert_eq!(again.resolve(6, Some(&list)), Some(20));
}

#[test]
fn census_keeps_what_a_live_reader_resolves_to_and_nothing_else() {
    let t = two_origin_snapshots();
    let list = vec![chain_ex(1, 1, 10), chain_ex(3, 2, 20)];
    let r = Readers::census(&t, None);
    assert!(r.needed(&list, &list[0]));
    assert!(r.needed(&list, &list[1]));
    assert_eq!(r.sole_user(&list, &list[0]), Some(1));
    assert_eq!(r.sole_user(&list, &list[1]), Some(2));
    // Shared: with no copy of its own at seq 1, tag 1 reads seq 2's copy too.
    let shared = vec![chain_ex(3, 2, 20)];
    assert!(r.needed(&shared, &shared[0]));
    assert_eq!(r.sole_user(&shared, &shared[0]), None);
    // Snapshot 1 deleted: its chain copy has no reader left; snapshot 2's stays.
    t.node(2).expect("node 2 exists").dead.store(true, SeqCst);
    let r = Readers::census(&t, None);
    assert!(!r.needed(&list, &list[0]));
    assert!(r.needed(&list, &list[1]));
    assert_eq!(r.sole_user(&list, &list[1]), Some(2));
    // Both deleted: nothing is needed.
    t.node(4).expect("node 4 exists").dead.store(true, SeqCst);
    let r = Readers::census(&t, None);
    assert!(list.iter().all(|e| !r.needed(&list, e)));
}

#[test]
fn census_keeps_exceptions_newer_than_itself_and_counts_a_rollback_source() {
    let t = two_origin_snapshots();
    let r = Readers::census(&t, None);
    // A node and a chain seq created after the census: keep their exceptions.
    let newer = vec![own_ex(5, 30), chain_ex(5, 3, 31)];
    assert!(r.needed(&newer, &newer[0]));
    assert!(r.needed(&newer, &newer[1]));
    assert_eq!(r.sole_user(&newer, &newer[0]), None);
    // A leaf's own copy hides the chain copy from it.
    let own = vec![own_ex(2, 5), chain_ex(1, 1, 10)];
    assert!(r.needed(&own, &own[0]));
    assert!(!r.needed(&own, &own[1]));
    // Rollback of tag 1: its old leaf (2) is frozen and is the source; tag 1 has a new leaf.
    let again = t.freeze(2).expect("node 2 exists");
    assert_eq!(t.push(&again), Some(5));
    let r = Readers::census(&t, Some(2));
    // The frozen source's copy is read by it and by tag 1's new leaf: needed, no sole user.
    assert!(r.needed(&own, &own[0]));
    assert_eq!(r.sole_user(&own, &own[0]), None);
    // Without the rollback, tag 1's new leaf still reads it (through its frozen parent).
    let r = Readers::census(&t, None);
    assert_eq!(r.sole_user(&own, &own[0]), Some(1));
    // The source alone reads it once tag 1's new leaf has a copy of its own.
    let own2 = vec![own_ex(2, 5), own_ex(5, 6)];
    let r = Readers::census(&t, Some(2));
    assert!(r.needed(&own2, &own2[0]));
    assert_eq!(r.sole_user(&own2, &own2[0]), None, "a source has no tag");
    let r = Readers::census(&t, None);
    assert!(!r.needed(&own2, &own2[0]));
}

#[test]
fn chunk_map_holds_only_chunks_that_changed() {
    let m = ChunkMap::default();
    // Nothing known: no entry, every version reads the origin, no overlay anywhere.
    assert_eq!(m.len(), 0);
    assert!(m.list(1 << 40).is_none());
    assert_eq!(m.copied(7, 1), None);
    assert!(!m.overlay(7));
    // A copy-out: the list first, then the mark with its batch.
    m.set_list(7, Some(Arc::new(vec![chain_ex(1, 1, 10)])));
    assert_eq!(m.copied(7, 1), None, "the mark waits for set_copied");
    m.set_copied(7, 1, 42);
    assert_eq!(m.copied(7, 1), Some(42));
    assert_eq!(m.copied(7, 2), None, "a newer snapshot needs its own copy");
    m.set_list(3 + (1 << 30), Some(Arc::new(vec![own_ex(2, 11)])));
    assert_eq!(m.len(), 2);
    let keys: Vec<u64> = m.lists().iter().map(|(c, _)| *c).collect();
    assert_eq!(keys, vec![7, 3 + (1 << 30)], "ascending");
    // Reclaim empties chunk 7: its entry goes, and with it the mark.
    m.set_list_top(7, Some(Arc::new(vec![])));
    assert_eq!(m.copied(7, 1), None);
    assert_eq!(m.len(), 1);
    // An overlay keeps an entry alive on its own; the count makes "none" a single load.
    m.set_overlay(9, true);
    m.set_overlay(9, true);
    assert!(m.overlay(9));
    assert_eq!(m.len(), 2);
    m.set_overlay(9, false);
    assert!(!m.overlay(9));
    assert_eq!(
        m.overlays.load(SeqCst),
        0,
        "raised twice, cleared once: none left"
    );
    assert_eq!(m.len(), 1);
    m.set_list_top(3 + (1 << 30), None);
    assert_eq!(m.len(), 0);
}

#[test]
fn chunk_map_rebuild_marks_the_newest_chain_copy() {
    let m = ChunkMap::default();
    m.set_list_top(
        5,
        Some(Arc::new(vec![chain_ex(1, 1, 10), chain_ex(3, 2, 20)])),
    );
    assert_eq!(m.copied(5, 2), Some(0), "durable since open");
    assert_eq!(m.copied(5, 1), None);
    m.set_list_top(5, Some(Arc::new(vec![chain_ex(1, 1, 10)])));
    assert_eq!(m.copied(5, 1), Some(0), "reclaim lowers the mark");
}
