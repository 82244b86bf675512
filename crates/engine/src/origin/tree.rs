use super::*;

/// A version node at run time. Only `kind`, `dead`, `exceptions` and a leaf's `memo` change
/// after creation.
pub(crate) struct NodeRt {
    pub(super) kind: AtomicU8,
    pub(super) dead: AtomicBool,
    pub(super) parent: u32,
    pub(super) seq: u32,
    pub(super) tag: u32,
    pub(super) parent_tag: u32,
    pub(super) birth: u64,
    /// Replaced whole by a memo edit (`set_memo`), read without a lock.
    pub(super) memo: arc_swap::ArcSwap<String>,
    /// Exceptions labelled with this node (for "exclusive chunks" and reclaim progress).
    pub(super) exceptions: AtomicU64,
}

impl NodeRt {
    pub(super) fn from_meta(m: &NodeMeta) -> Self {
        NodeRt {
            kind: AtomicU8::new(m.kind as u8),
            dead: AtomicBool::new(m.dead),
            parent: m.parent,
            seq: m.seq,
            tag: m.tag,
            parent_tag: m.parent_tag,
            birth: m.birth,
            memo: arc_swap::ArcSwap::from_pointee(m.memo.clone()),
            exceptions: AtomicU64::new(0),
        }
    }

    pub(super) fn to_meta(&self) -> NodeMeta {
        NodeMeta {
            kind: NodeKind::from_u8(self.kind.load(SeqCst)).unwrap_or(NodeKind::Frozen),
            dead: self.dead.load(SeqCst),
            parent: self.parent,
            seq: self.seq,
            tag: self.tag,
            parent_tag: self.parent_tag,
            birth: self.birth,
            memo: self.memo(),
        }
    }

    pub(super) fn memo(&self) -> String {
        self.memo.load().as_ref().clone()
    }

    pub(super) fn kind(&self) -> NodeKind {
        NodeKind::from_u8(self.kind.load(SeqCst)).unwrap_or(NodeKind::Frozen)
    }
}

/// An origin's version tree: an append-only node arena (lock-free reads) and the chain nodes
/// by seq. Pure data — no I/O, no locks: changes are serialised by the caller (the metadata
/// lock), lookups run concurrently with them.
pub(crate) struct VersionTree {
    nodes: boxcar::Vec<NodeRt>,
    /// Chain node ids by seq - 1.
    chain: boxcar::Vec<u32>,
}

/// Node ids and chain seqs stop short of `u32::MAX` (a margin for sentinels).
pub(crate) const MAX_IDS: u32 = u32::MAX - 4;

impl VersionTree {
    /// The tree of a checkpoint's (or a new origin's) nodes.
    pub fn new(nodes: &[NodeMeta]) -> Self {
        let t = VersionTree {
            nodes: boxcar::Vec::new(),
            chain: boxcar::Vec::new(),
        };
        for n in nodes {
            let i = t.nodes.push(NodeRt::from_meta(n));
            if n.kind == NodeKind::Chain {
                t.chain.push(i as u32);
            }
        }
        t
    }

    /// Node `i`, if it exists.
    pub fn node(&self, i: u32) -> Option<&NodeRt> {
        self.nodes.get(i as usize)
    }

    /// Nodes in the tree.
    pub fn count(&self) -> usize {
        self.nodes.count()
    }

    /// Chain nodes in the tree (the newest chain seq).
    pub fn chain_count(&self) -> usize {
        self.chain.count()
    }

    /// The chain node of seq `seq` (1-based).
    pub fn chain_node(&self, seq: u32) -> Option<u32> {
        self.chain.get((seq as usize).checked_sub(1)?).copied()
    }

    /// Appends a node; returns its id, or `None` when every id is used.
    pub fn push(&self, meta: &NodeMeta) -> Option<u32> {
        if self.nodes.count() >= MAX_IDS as usize {
            return None;
        }
        let id = self.nodes.push(NodeRt::from_meta(meta));
        if meta.kind == NodeKind::Chain {
            self.chain.push(id as u32);
        }
        Some(id as u32)
    }

    /// Freezes leaf `leaf` (it stops taking writes) and returns the node to add below it for
    /// its tag's later writes; `None` if there is no such node.
    pub fn freeze(&self, leaf: u32) -> Option<NodeMeta> {
        let n = self.node(leaf)?;
        let meta = NodeMeta {
            kind: NodeKind::Leaf,
            dead: false,
            parent: leaf,
            seq: 0,
            tag: n.tag,
            parent_tag: n.parent_tag,
            birth: n.birth,
            memo: n.memo(),
        };
        n.kind.store(NodeKind::Frozen as u8, SeqCst);
        Some(meta)
    }

    /// The nodes as metadata, for a checkpoint.
    pub fn to_meta(&self) -> Vec<NodeMeta> {
        (0..self.nodes.count())
            .filter_map(|i| self.nodes.get(i).map(|n| n.to_meta()))
            .collect()
    }

    /// Where `node` finds chunk `c`: a store chunk, or `None` for the origin device.
    ///
    /// Walk up from `node` to the first version with an exception. Once the walk reaches a
    /// chain node of seq `s`, the answer is the chain exception with the smallest seq ≥ `s`:
    /// a chain node inherits from every newer one.
    pub fn resolve(&self, mut node: u32, list: Option<&ExList>) -> Option<u64> {
        let list = list?;
        loop {
            let n = self.node(node)?;
            match n.kind() {
                NodeKind::Chain => {
                    return list
                        .iter()
                        .filter(|e| e.seq >= n.seq && e.seq > 0)
                        .min_by_key(|e| e.seq)
                        .map(|e| e.store);
                }
                NodeKind::Origin => return None,
                NodeKind::Leaf | NodeKind::Frozen => {
                    if let Some(e) = list.iter().find(|e| e.node == node) {
                        return Some(e.store);
                    }
                    node = n.parent;
                }
            }
        }
    }
}

impl OriginCore {
    /// Where `node` finds chunk `c` (see [`VersionTree::resolve`]).
    pub fn resolve(&self, node: u32, list: Option<&ExList>) -> Option<u64> {
        self.tree.resolve(node, list)
    }

    pub(super) fn push_node(&self, m: &mut MetaCore, meta: NodeMeta) -> Result<u32> {
        let node = self.tree.push(&meta).ok_or_else(|| {
            Error::Limit(format!("origin {} has used every version number", self.id))
        })?;
        m.pending.push(Record::NewNode {
            slot: self.slot,
            node,
            meta,
        });
        Ok(node)
    }

    /// Freezes snapshot `ps`'s leaf and gives the tag a fresh leaf below it (gate closed,
    /// metadata lock held). Returns the frozen node.
    pub(super) fn freeze(&self, m: &mut MetaCore, ps: &SnapRt) -> Result<u32> {
        let old = ps.leaf.load(SeqCst);
        let meta = self
            .tree
            .freeze(old)
            .ok_or_else(|| Error::NotFound(format!("node {old} of origin {}", self.id)))?;
        m.pending.push(Record::Freeze {
            slot: self.slot,
            node: old,
        });
        let new_leaf = self.push_node(m, meta)?;
        ps.leaf.store(new_leaf, SeqCst);
        Ok(old)
    }

    /// Adds snapshot `tag`: a leaf below `parent` (metadata lock held).
    pub(super) fn add_snapshot(
        &self,
        m: &mut MetaCore,
        parent: u32,
        tag: u32,
        parent_tag: u32,
        birth: u64,
        memo: &str,
    ) -> Result<()> {
        let leaf = self.push_node(
            m,
            NodeMeta {
                kind: NodeKind::Leaf,
                dead: false,
                parent,
                seq: 0,
                tag,
                parent_tag,
                birth,
                memo: memo.into(),
            },
        )?;
        self.next_tag.store(tag + 1, SeqCst);
        let mut snaps = lock(&self.snaps);
        snaps.insert(
            tag,
            Arc::new(SnapRt {
                tag,
                leaf: AtomicU32::new(leaf),
                gate: IoGate::default(),
                deleted: AtomicBool::new(false),
            }),
        );
        self.live_snaps.store(snaps.len(), SeqCst);
        Ok(())
    }
}
