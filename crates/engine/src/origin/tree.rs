use super::*;

/// A version node at run time. Only `kind`, `dead` and `exceptions` change after creation.
pub(crate) struct NodeRt {
    pub(super) kind: AtomicU8,
    pub(super) dead: AtomicBool,
    pub(super) parent: u32,
    pub(super) seq: u32,
    pub(super) tag: u32,
    pub(super) parent_tag: u32,
    pub(super) birth: u64,
    pub(super) memo: String,
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
            memo: m.memo.clone(),
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
            memo: self.memo.clone(),
        }
    }

    pub(super) fn kind(&self) -> NodeKind {
        NodeKind::from_u8(self.kind.load(SeqCst)).unwrap_or(NodeKind::Frozen)
    }
}

impl OriginCore {
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

    pub(super) fn push_node(&self, m: &mut MetaCore, meta: NodeMeta) -> Result<u32> {
        let id = self.nodes.count();
        if id >= (u32::MAX - 4) as usize {
            return Err(Error::Limit(format!(
                "origin {} has used every version number",
                self.id
            )));
        }
        let is_chain = meta.kind == NodeKind::Chain;
        let got = self.nodes.push(NodeRt::from_meta(&meta));
        debug_assert_eq!(got, id);
        if is_chain {
            self.chain.push(got as u32);
        }
        m.pending.push(Record::NewNode {
            slot: self.slot,
            node: got as u32,
            meta,
        });
        Ok(got as u32)
    }

    /// Freezes snapshot `ps`'s leaf and gives the tag a fresh leaf below it (gate closed,
    /// metadata lock held). Returns the frozen node.
    pub(super) fn freeze(&self, m: &mut MetaCore, ps: &SnapRt) -> Result<u32> {
        let old = ps.leaf.load(SeqCst);
        let n = self
            .node(old)
            .ok_or_else(|| Error::NotFound(format!("node {old} of origin {}", self.id)))?;
        let meta = NodeMeta {
            kind: NodeKind::Leaf,
            dead: false,
            parent: old,
            seq: 0,
            tag: ps.tag,
            parent_tag: n.parent_tag,
            birth: n.birth,
            memo: n.memo.clone(),
        };
        n.kind.store(NodeKind::Frozen as u8, SeqCst);
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
