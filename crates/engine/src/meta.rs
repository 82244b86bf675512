//! The store's metadata as plain data: what a checkpoint holds and what journal records change.
//!
//! Opening a store decodes a checkpoint into a [`MetaState`], applies the journal's records
//! with [`MetaState::apply`], checks every invariant with [`MetaState::validate`], and only then
//! builds the lock-free runtime structures from it. `check` runs the same code.

use crate::format::Record;
use std::collections::{BTreeMap, HashSet};

/// Node id of the origin itself in every version tree.
pub const ROOT: u32 = 0;

/// What a version node is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum NodeKind {
    /// The origin (node 0): its data is the origin device.
    Origin = 0,
    /// A point-in-time image of the origin. Chain nodes are ordered by `seq`: a chain node
    /// inherits from every newer one, and origin copy-outs are labelled with the newest.
    Chain = 1,
    /// A frozen image of a snapshot (taken by snapshot-of-snapshot or rollback): read-only.
    Frozen = 2,
    /// A snapshot's writable head. Only leaves take writes, so a leaf's exceptions are private.
    Leaf = 3,
}

impl NodeKind {
    /// Decodes a kind byte.
    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            0 => NodeKind::Origin,
            1 => NodeKind::Chain,
            2 => NodeKind::Frozen,
            3 => NodeKind::Leaf,
            _ => return None,
        })
    }
}

/// One version node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeMeta {
    /// Kind.
    pub kind: NodeKind,
    /// A dead leaf (deleted snapshot). Its exceptions are reclaimed in the background.
    pub dead: bool,
    /// Parent node for leaves and frozen nodes; unused (ROOT) for chain nodes.
    pub parent: u32,
    /// Chain order (1, 2, …) for chain nodes; 0 otherwise.
    pub seq: u32,
    /// The snapshot tag this node was made for (0 for the origin and hidden chain nodes).
    pub tag: u32,
    /// For leaves: the tag of the snapshot it was taken of (0 = the origin).
    pub parent_tag: u32,
    /// Birth time, seconds since the Unix epoch.
    pub birth: u64,
    /// The snapshot's memo (leaves only).
    pub memo: String,
}

/// Rollback in progress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RollbackMeta {
    /// The snapshot rolled back to.
    pub tag: u32,
    /// The frozen node whose content the origin takes.
    pub source: u32,
    /// One bit per origin chunk: already copied back.
    pub restored: Vec<u64>,
}

/// One bound origin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OriginMeta {
    /// The origin id (by default its path).
    pub id: String,
    /// Its size in bytes when bound.
    pub size: u64,
    /// Next tag to hand out (tags are never reused).
    pub next_tag: u32,
    /// Seq of the newest chain node (0: none).
    pub newest_seq: u32,
    /// Version nodes, indexed by node id; node 0 is the origin.
    pub nodes: Vec<NodeMeta>,
    /// Live snapshot tag → its leaf node.
    pub tags: BTreeMap<u32, u32>,
    /// Origin chunk → [(node, store chunk)].
    pub exceptions: BTreeMap<u64, Vec<(u32, u64)>>,
    /// Rollback in progress.
    pub rollback: Option<RollbackMeta>,
    /// Origin chunk → store chunk holding its newest content, acknowledged to the guest but
    /// not yet written to the origin (a first write after a snapshot; see docs/design.md,
    /// "Overlays"). Opening the origin writes each onto the origin and frees the store chunk.
    pub overlays: BTreeMap<u64, u64>,
}

/// The whole metadata of a store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaState {
    /// Chunk size in bytes.
    pub chunk_size: u32,
    /// Number of data chunks.
    pub data_chunks: u64,
    /// Allocation bitmap of data chunks.
    pub alloc: Vec<u64>,
    /// Bound origins by slot.
    pub origins: BTreeMap<u32, OriginMeta>,
    /// Next origin slot to hand out.
    pub next_slot: u32,
}

/// Bitmap helpers over `u64` words.
pub fn bit_get(b: &[u64], i: u64) -> bool {
    b.get((i / 64) as usize)
        .is_some_and(|w| w & (1 << (i % 64)) != 0)
}

/// Sets or clears bit `i` (ignored past the end).
pub fn bit_set(b: &mut [u64], i: u64, v: bool) {
    if let Some(w) = b.get_mut((i / 64) as usize) {
        if v {
            *w |= 1 << (i % 64);
        } else {
            *w &= !(1 << (i % 64));
        }
    }
}

/// Words needed for `n` bits.
pub fn bit_words(n: u64) -> usize {
    n.div_ceil(64) as usize
}

impl OriginMeta {
    /// A freshly bound origin: just the root node.
    pub fn new(id: String, size: u64) -> Self {
        OriginMeta {
            id,
            size,
            next_tag: 1,
            newest_seq: 0,
            nodes: vec![NodeMeta {
                kind: NodeKind::Origin,
                dead: false,
                parent: ROOT,
                seq: 0,
                tag: 0,
                parent_tag: 0,
                birth: 0,
                memo: String::new(),
            }],
            tags: BTreeMap::new(),
            exceptions: BTreeMap::new(),
            rollback: None,
            overlays: BTreeMap::new(),
        }
    }

    /// Number of origin chunks.
    pub fn nchunks(&self, chunk_size: u32) -> u64 {
        self.size.div_ceil(chunk_size as u64)
    }
}

impl MetaState {
    /// An empty store.
    pub fn new(chunk_size: u32, data_chunks: u64) -> Self {
        MetaState {
            chunk_size,
            data_chunks,
            alloc: vec![0; bit_words(data_chunks)],
            origins: BTreeMap::new(),
            next_slot: 0,
        }
    }

    fn origin(&mut self, slot: u32) -> Result<&mut OriginMeta, String> {
        self.origins
            .get_mut(&slot)
            .ok_or_else(|| format!("record names origin slot {slot}, which is not bound"))
    }

    /// Applies one journal record, refusing one that does not fit the state.
    pub fn apply(&mut self, r: &Record) -> Result<(), String> {
        let cs = self.chunk_size;
        let data_chunks = self.data_chunks;
        match r {
            Record::BindOrigin { slot, id, size } => {
                if self.origins.contains_key(slot) {
                    return Err(format!("origin slot {slot} bound twice"));
                }
                self.origins
                    .insert(*slot, OriginMeta::new(id.clone(), *size));
                self.next_slot = self.next_slot.max(slot + 1);
            }
            Record::UnbindOrigin { slot } => {
                let o = self.origin(*slot)?;
                if !o.exceptions.is_empty() || !o.tags.is_empty() {
                    return Err(format!("origin slot {slot} unbound while it has snapshots"));
                }
                if !o.overlays.is_empty() {
                    return Err(format!(
                        "origin slot {slot} unbound while writes are pending in the store"
                    ));
                }
                self.origins.remove(slot);
            }
            Record::NewNode { slot, node, meta } => {
                let o = self.origin(*slot)?;
                if *node as usize != o.nodes.len() {
                    return Err(format!(
                        "origin slot {slot}: new node {node} out of order (expected {})",
                        o.nodes.len()
                    ));
                }
                if meta.kind == NodeKind::Chain {
                    if meta.seq != o.newest_seq + 1 {
                        return Err(format!(
                            "origin slot {slot}: chain seq {} out of order",
                            meta.seq
                        ));
                    }
                    o.newest_seq = meta.seq;
                } else if meta.parent >= *node {
                    return Err(format!(
                        "origin slot {slot}: node {node} has parent {} not older",
                        meta.parent
                    ));
                }
                if meta.kind == NodeKind::Leaf {
                    if o.tags.contains_key(&meta.tag) {
                        return Err(format!(
                            "origin slot {slot}: tag {} has two leaves",
                            meta.tag
                        ));
                    }
                    o.tags.insert(meta.tag, *node);
                    o.next_tag = o.next_tag.max(meta.tag + 1);
                }
                o.nodes.push(meta.clone());
            }
            Record::Freeze { slot, node } => {
                let o = self.origin(*slot)?;
                let n = o
                    .nodes
                    .get_mut(*node as usize)
                    .ok_or_else(|| format!("origin slot {slot}: freeze of unknown node {node}"))?;
                if n.kind != NodeKind::Leaf {
                    return Err(format!(
                        "origin slot {slot}: freeze of non-leaf node {node}"
                    ));
                }
                n.kind = NodeKind::Frozen;
                let tag = n.tag;
                if o.tags.get(&tag) == Some(node) {
                    o.tags.remove(&tag);
                }
            }
            Record::DeleteTag { slot, tag } => {
                let o = self.origin(*slot)?;
                let leaf = o
                    .tags
                    .remove(tag)
                    .ok_or_else(|| format!("origin slot {slot}: delete of unknown tag {tag}"))?;
                o.nodes[leaf as usize].dead = true;
            }
            Record::AddException {
                slot,
                chunk,
                node,
                store,
            } => {
                if *store >= data_chunks || bit_get(&self.alloc, *store) {
                    return Err(format!(
                        "exception for origin slot {slot} chunk {chunk} uses store chunk {store}, which is out of range or taken"
                    ));
                }
                let o = self.origin(*slot)?;
                if *chunk >= o.nchunks(cs) || *node as usize >= o.nodes.len() || *node == ROOT {
                    return Err(format!(
                        "exception for origin slot {slot} chunk {chunk} node {node} out of range"
                    ));
                }
                let list = o.exceptions.entry(*chunk).or_default();
                if list.iter().any(|(n, _)| n == node) {
                    return Err(format!(
                        "origin slot {slot} chunk {chunk}: node {node} has two exceptions"
                    ));
                }
                list.push((*node, *store));
                bit_set(&mut self.alloc, *store, true);
            }
            Record::FreeException { slot, chunk, node } => {
                let o = self.origin(*slot)?;
                let list = o.exceptions.get_mut(chunk).ok_or_else(|| {
                    format!("free of missing exception: origin slot {slot} chunk {chunk}")
                })?;
                let i = list.iter().position(|(n, _)| n == node).ok_or_else(|| {
                    format!(
                        "free of missing exception: origin slot {slot} chunk {chunk} node {node}"
                    )
                })?;
                let (_, store) = list.swap_remove(i);
                if list.is_empty() {
                    o.exceptions.remove(chunk);
                }
                bit_set(&mut self.alloc, store, false);
            }
            Record::RollbackStart { slot, tag, source } => {
                let o = self.origin(*slot)?;
                if o.rollback.is_some() {
                    return Err(format!("origin slot {slot}: two rollbacks at once"));
                }
                let n = o.nchunks(cs);
                o.rollback = Some(RollbackMeta {
                    tag: *tag,
                    source: *source,
                    restored: vec![0; bit_words(n)],
                });
            }
            Record::Restored { slot, chunk } => {
                let o = self.origin(*slot)?;
                let r = o.rollback.as_mut().ok_or_else(|| {
                    format!("origin slot {slot}: restored chunk with no rollback")
                })?;
                bit_set(&mut r.restored, *chunk, true);
            }
            Record::RollbackDone { slot } => {
                let o = self.origin(*slot)?;
                if o.rollback.take().is_none() {
                    return Err(format!(
                        "origin slot {slot}: rollback done with no rollback"
                    ));
                }
            }
            Record::OverlayAt { slot, chunk, store } => {
                if *store >= data_chunks || bit_get(&self.alloc, *store) {
                    return Err(format!(
                        "pending write of origin slot {slot} chunk {chunk} uses store chunk {store}, which is out of range or taken"
                    ));
                }
                let o = self.origin(*slot)?;
                if *chunk >= o.nchunks(cs) {
                    return Err(format!(
                        "pending write of origin slot {slot} chunk {chunk} past the origin's end"
                    ));
                }
                if o.overlays.insert(*chunk, *store).is_some() {
                    return Err(format!(
                        "origin slot {slot} chunk {chunk} has two pending writes"
                    ));
                }
                bit_set(&mut self.alloc, *store, true);
            }
            Record::OverlayDone { slot, chunk } => {
                let o = self.origin(*slot)?;
                let store = o.overlays.remove(chunk).ok_or_else(|| {
                    format!("origin slot {slot} chunk {chunk}: no pending write to finish")
                })?;
                bit_set(&mut self.alloc, store, false);
            }
        }
        Ok(())
    }

    /// Every invariant of the metadata; each problem is one sentence naming where.
    pub fn validate(&self) -> Vec<String> {
        let mut p = Vec::new();
        let cs = self.chunk_size;
        if self.alloc.len() != bit_words(self.data_chunks) {
            p.push(format!(
                "allocation bitmap has {} words, expected {}",
                self.alloc.len(),
                bit_words(self.data_chunks)
            ));
        }
        let mut referenced = vec![0u64; bit_words(self.data_chunks)];
        let mut ids = HashSet::new();
        for (slot, o) in &self.origins {
            let who = format!("origin {} (slot {slot})", o.id);
            if !ids.insert(&o.id) {
                p.push(format!("{who}: origin id bound twice"));
            }
            if *slot >= self.next_slot {
                p.push(format!(
                    "{who}: slot is not below next slot {}",
                    self.next_slot
                ));
            }
            if o.nodes.first().map(|n| n.kind) != Some(NodeKind::Origin) {
                p.push(format!("{who}: node 0 is not the origin"));
                continue;
            }
            let mut seq = 0;
            for (i, n) in o.nodes.iter().enumerate().skip(1) {
                match n.kind {
                    NodeKind::Origin => p.push(format!("{who}: node {i} claims to be the origin")),
                    NodeKind::Chain => {
                        if n.seq != seq + 1 {
                            p.push(format!(
                                "{who}: chain node {i} has seq {} after {seq}",
                                n.seq
                            ));
                        }
                        seq = n.seq;
                    }
                    NodeKind::Frozen | NodeKind::Leaf => {
                        if n.parent as usize >= i {
                            p.push(format!(
                                "{who}: node {i} has parent {} that is not older",
                                n.parent
                            ));
                        } else if o.nodes[n.parent as usize].kind == NodeKind::Leaf
                            || o.nodes[n.parent as usize].kind == NodeKind::Origin
                        {
                            p.push(format!(
                                "{who}: node {i} hangs below node {}, a leaf or the origin",
                                n.parent
                            ));
                        }
                    }
                }
                if n.memo.len() > crate::format::MAX_MEMO {
                    p.push(format!("{who}: node {i} memo too long"));
                }
            }
            if seq != o.newest_seq {
                p.push(format!(
                    "{who}: newest chain seq {} but the chain ends at {seq}",
                    o.newest_seq
                ));
            }
            for (tag, leaf) in &o.tags {
                match o.nodes.get(*leaf as usize) {
                    Some(n) if n.kind == NodeKind::Leaf && !n.dead && n.tag == *tag => {}
                    _ => p.push(format!(
                        "{who}: snapshot {tag} points at node {leaf}, which is not its live leaf"
                    )),
                }
                if *tag >= o.next_tag || *tag == 0 {
                    p.push(format!(
                        "{who}: snapshot tag {tag} is not below next tag {}",
                        o.next_tag
                    ));
                }
            }
            for (i, n) in o.nodes.iter().enumerate() {
                if n.kind == NodeKind::Leaf && !n.dead && o.tags.get(&n.tag) != Some(&(i as u32)) {
                    p.push(format!(
                        "{who}: live leaf node {i} (tag {}) is not the tag's leaf",
                        n.tag
                    ));
                }
            }
            let nchunks = o.nchunks(cs);
            for (chunk, list) in &o.exceptions {
                if *chunk >= nchunks {
                    p.push(format!(
                        "{who}: exception for chunk {chunk} past the origin's {nchunks} chunks"
                    ));
                }
                let mut seen = HashSet::new();
                for (node, store) in list {
                    if *node == ROOT || *node as usize >= o.nodes.len() {
                        p.push(format!(
                            "{who}: chunk {chunk} has an exception for invalid node {node}"
                        ));
                    }
                    if !seen.insert(node) {
                        p.push(format!(
                            "{who}: chunk {chunk} has two exceptions for node {node}"
                        ));
                    }
                    if *store >= self.data_chunks {
                        p.push(format!("{who}: chunk {chunk} node {node} maps to store chunk {store}, past the end"));
                    } else if bit_get(&referenced, *store) {
                        p.push(format!("store chunk {store} is referenced twice (again by {who} chunk {chunk} node {node})"));
                    } else {
                        bit_set(&mut referenced, *store, true);
                    }
                }
            }
            for (chunk, store) in &o.overlays {
                if *chunk >= nchunks {
                    p.push(format!(
                        "{who}: pending write of chunk {chunk} past the origin's {nchunks} chunks"
                    ));
                }
                if *store >= self.data_chunks {
                    p.push(format!(
                        "{who}: pending write of chunk {chunk} in store chunk {store}, past the end"
                    ));
                } else if bit_get(&referenced, *store) {
                    p.push(format!("store chunk {store} is referenced twice (again by {who}'s pending write of chunk {chunk})"));
                } else {
                    bit_set(&mut referenced, *store, true);
                }
            }
            if let Some(r) = &o.rollback {
                match o.nodes.get(r.source as usize) {
                    Some(n) if n.kind == NodeKind::Frozen => {}
                    _ => p.push(format!(
                        "{who}: rollback source node {} is not a frozen node",
                        r.source
                    )),
                }
                if r.restored.len() != bit_words(nchunks) {
                    p.push(format!("{who}: rollback bitmap has the wrong length"));
                }
            }
        }
        for c in 0..self.data_chunks {
            let a = bit_get(&self.alloc, c);
            let r = bit_get(&referenced, c);
            if a != r {
                p.push(if a {
                    format!(
                        "store chunk {c} is marked allocated but nothing references it (leaked)"
                    )
                } else {
                    format!("store chunk {c} is referenced but marked free")
                });
                if p.len() > 1000 {
                    p.push("too many problems; stopping".into());
                    break;
                }
            }
        }
        p
    }

    /// Rebuilds the allocation bitmap from the references (what `repair` can derive).
    pub fn rebuild_alloc(&mut self) -> usize {
        let mut alloc = vec![0u64; bit_words(self.data_chunks)];
        for o in self.origins.values() {
            for list in o.exceptions.values() {
                for (_, s) in list {
                    bit_set(&mut alloc, *s, true);
                }
            }
            for s in o.overlays.values() {
                bit_set(&mut alloc, *s, true);
            }
        }
        let changed = (0..self.data_chunks)
            .filter(|&c| bit_get(&alloc, c) != bit_get(&self.alloc, c))
            .count();
        self.alloc = alloc;
        changed
    }
}

#[cfg(test)]
mod tests {
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
}
