//! The store's metadata as plain data: what a checkpoint holds and what journal records change.
//!
//! Opening a store decodes a checkpoint into a [`MetaState`], applies the journal's records
//! with [`MetaState::apply`], checks every invariant with [`MetaState::validate`], and only then
//! builds the lock-free runtime structures from it. `check` runs the same code.

use std::collections::{BTreeMap, HashSet};

mod apply;
mod limits;
mod record;
#[cfg(test)]
mod tests;
mod validate;

pub use limits::{MAX_MEMO, MAX_ORIGIN_ID};
pub use record::Record;

/// Node id of the origin itself in every version tree.
pub const ROOT: u32 = 0;

/// The store chunk of a *zero exception* (format 4): the version reads zeros there and no data
/// chunk is used (not in the allocation bitmap, never freed).
pub const ZERO_CHUNK: u64 = u64::MAX;

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

impl OriginMeta {
    /// Whether an exception of origin chunk `chunk` uses store chunk `store` (a pending write
    /// shares its chunk with the chain node of a snapshot cut while it was pending).
    pub fn shares(&self, chunk: u64, store: u64) -> bool {
        self.exceptions
            .get(&chunk)
            .is_some_and(|l| l.iter().any(|(_, s)| *s == store))
    }
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
}
