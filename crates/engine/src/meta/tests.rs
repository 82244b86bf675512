use super::apply::RecordError;
use super::*;

fn leaf(parent: u32, tag: u32) -> NodeMeta {
    NodeMeta {
        kind: NodeKind::Leaf,
        dead: false,
        parent,
        seq: 0,
        tag,
        parent_tag: 0,
        birth: 0,
        memo: String::new(),
    }
}

fn chain(seq: u32, tag: u32) -> NodeMeta {
    NodeMeta {
        kind: NodeKind::Chain,
        seq,
        ..leaf(ROOT, tag)
    }
}

fn state_with_snapshot() -> MetaState {
    let mut m = MetaState::new(4096, 100);
    for r in [
        Record::BindOrigin {
            slot: 0,
            id: "o".into(),
            size: 8 * 4096,
        },
        Record::NewNode {
            slot: 0,
            node: 1,
            meta: chain(1, 1),
        },
        Record::NewNode {
            slot: 0,
            node: 2,
            meta: leaf(1, 1),
        },
        Record::AddException {
            slot: 0,
            chunk: 3,
            node: 1,
            store: 7,
        },
    ] {
        m.apply(&r).unwrap();
    }
    m
}

#[test]
fn apply_builds_a_valid_state() {
    let m = state_with_snapshot();
    assert_eq!(m.validate(), Vec::<String>::new());
    assert!(bit_get(&m.alloc, 7));
    assert_eq!(m.origins[&0].tags[&1], 2);
}

#[test]
fn apply_refuses_records_that_do_not_fit() {
    let mut m = state_with_snapshot();
    // The same store chunk twice, a node out of order, a chain seq skipped, unknown slot.
    assert!(m
        .apply(&Record::AddException {
            slot: 0,
            chunk: 4,
            node: 2,
            store: 7
        })
        .is_err());
    assert!(m
        .apply(&Record::NewNode {
            slot: 0,
            node: 9,
            meta: leaf(1, 2)
        })
        .is_err());
    assert!(m
        .apply(&Record::NewNode {
            slot: 0,
            node: 3,
            meta: chain(5, 2)
        })
        .is_err());
    assert!(m.apply(&Record::DeleteTag { slot: 1, tag: 1 }).is_err());
    assert!(m
        .apply(&Record::AddException {
            slot: 0,
            chunk: 99,
            node: 2,
            store: 8
        })
        .is_err());
    assert!(
        m.apply(&Record::UnbindOrigin { slot: 0 }).is_err(),
        "unbind with snapshots"
    );
    assert_eq!(
        m.apply(&Record::DeleteTag { slot: 1, tag: 1 }),
        Err(RecordError::UnknownSlot(1))
    );
    let e = m.apply(&Record::UnbindOrigin { slot: 0 }).unwrap_err();
    assert_eq!(e, RecordError::UnbindWithSnapshots(0));
    assert_eq!(
        e.to_string(),
        "origin slot 0 unbound while it has snapshots"
    );
    assert_eq!(
        m.validate(),
        Vec::<String>::new(),
        "refused records change nothing"
    );
}

#[test]
fn validate_finds_leaks_double_references_and_bad_trees_and_rebuild_fixes_alloc() {
    let mut m = state_with_snapshot();
    bit_set(&mut m.alloc, 9, true);
    let p = m.validate();
    assert!(
        p.iter()
            .any(|s| s.contains("store chunk 9") && s.contains("leaked")),
        "{p:?}"
    );
    assert_eq!(m.rebuild_alloc(), 1);
    assert!(m.validate().is_empty());

    let mut m = state_with_snapshot();
    m.origins
        .get_mut(&0)
        .unwrap()
        .exceptions
        .insert(5, vec![(2, 7)]);
    assert!(m.validate().iter().any(|s| s.contains("referenced twice")));

    let mut m = state_with_snapshot();
    m.origins.get_mut(&0).unwrap().nodes[2].parent = 2;
    assert!(m.validate().iter().any(|s| s.contains("not older")));

    let mut m = state_with_snapshot();
    m.origins.get_mut(&0).unwrap().tags.insert(1, 1);
    assert!(m
        .validate()
        .iter()
        .any(|s| s.contains("snapshot 1 points at node 1")));
}

#[test]
fn delete_and_free_return_the_chunk() {
    let mut m = state_with_snapshot();
    m.apply(&Record::DeleteTag { slot: 0, tag: 1 }).unwrap();
    m.apply(&Record::FreeException {
        slot: 0,
        chunk: 3,
        node: 1,
    })
    .unwrap();
    assert!(!bit_get(&m.alloc, 7));
    assert!(m.origins[&0].nodes[2].dead);
    m.apply(&Record::UnbindOrigin { slot: 0 }).unwrap();
    assert!(m.origins.is_empty());
    assert!(m.validate().is_empty());
}
