//! [`MetaState::apply`]: one journal record onto the state (open and check replay through it).

use super::*;

/// Why a journal record does not fit the state it is applied to (replay refuses it: the
/// store is damaged). Each names the origin slot and the object.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// The record names an origin slot that is not bound.
    #[error("record names origin slot {0}, which is not bound")]
    UnknownSlot(u32),
    /// A slot is bound again.
    #[error("origin slot {0} bound twice")]
    BoundTwice(u32),
    /// Unbind of an origin that has snapshots.
    #[error("origin slot {0} unbound while it has snapshots")]
    UnbindWithSnapshots(u32),
    /// Unbind of an origin with acknowledged writes still in the store.
    #[error("origin slot {0} unbound while writes are pending in the store")]
    UnbindWithPendingWrites(u32),
    /// A new node's id is not the next one.
    #[error("origin slot {slot}: new node {node} out of order (expected {expected})")]
    NodeOutOfOrder {
        slot: u32,
        node: u32,
        expected: usize,
    },
    /// A chain node's seq is not the next one.
    #[error("origin slot {slot}: chain seq {seq} out of order")]
    ChainSeqOutOfOrder { slot: u32, seq: u32 },
    /// A node's parent is not older than the node.
    #[error("origin slot {slot}: node {node} has parent {parent} not older")]
    ParentNotOlder { slot: u32, node: u32, parent: u32 },
    /// A second live leaf for one tag.
    #[error("origin slot {slot}: tag {tag} has two leaves")]
    TagHasTwoLeaves { slot: u32, tag: u32 },
    /// Freeze of a node that does not exist.
    #[error("origin slot {slot}: freeze of unknown node {node}")]
    FreezeUnknownNode { slot: u32, node: u32 },
    /// Freeze of a node that is not a leaf.
    #[error("origin slot {slot}: freeze of non-leaf node {node}")]
    FreezeNonLeaf { slot: u32, node: u32 },
    /// Delete of a tag that is not live.
    #[error("origin slot {slot}: delete of unknown tag {tag}")]
    DeleteUnknownTag { slot: u32, tag: u32 },
    #[error("origin slot {slot}: memo of unknown tag {tag}")]
    MemoUnknownTag { slot: u32, tag: u32 },
    /// An exception's store chunk is outside the store or already in use.
    #[error("exception for origin slot {slot} chunk {chunk} uses store chunk {store}, which is out of range or taken")]
    ExceptionStoreChunk { slot: u32, chunk: u64, store: u64 },
    /// An exception's chunk or node is out of range (or the origin node).
    #[error("exception for origin slot {slot} chunk {chunk} node {node} out of range")]
    ExceptionOutOfRange { slot: u32, chunk: u64, node: u32 },
    /// A second exception of one node for one chunk.
    #[error("origin slot {slot} chunk {chunk}: node {node} has two exceptions")]
    TwoExceptions { slot: u32, chunk: u64, node: u32 },
    /// Free of an exception of a chunk that has none.
    #[error("free of missing exception: origin slot {slot} chunk {chunk}")]
    FreeMissingChunk { slot: u32, chunk: u64 },
    /// Free of an exception the node does not have.
    #[error("free of missing exception: origin slot {slot} chunk {chunk} node {node}")]
    FreeMissingNode { slot: u32, chunk: u64, node: u32 },
    /// A rollback starts while one is in progress.
    #[error("origin slot {0}: two rollbacks at once")]
    TwoRollbacks(u32),
    /// A restored chunk with no rollback in progress.
    #[error("origin slot {0}: restored chunk with no rollback")]
    RestoredWithoutRollback(u32),
    /// A rollback finishes with none in progress.
    #[error("origin slot {0}: rollback done with no rollback")]
    DoneWithoutRollback(u32),
    /// A pending write's store chunk is outside the store or already in use.
    #[error("pending write of origin slot {slot} chunk {chunk} uses store chunk {store}, which is out of range or taken")]
    OverlayStoreChunk { slot: u32, chunk: u64, store: u64 },
    /// A pending write past the origin's end.
    #[error("pending write of origin slot {slot} chunk {chunk} past the origin's end")]
    OverlayPastEnd { slot: u32, chunk: u64 },
    /// A second pending write of one chunk.
    #[error("origin slot {slot} chunk {chunk} has two pending writes")]
    TwoOverlays { slot: u32, chunk: u64 },
    /// A pending write finishes that was never recorded.
    #[error("origin slot {slot} chunk {chunk}: no pending write to finish")]
    NoOverlayToFinish { slot: u32, chunk: u64 },
    /// A version takes the store chunk of a pending write that does not exist.
    #[error("origin slot {slot} chunk {chunk}: no pending write for node {node} to share")]
    NoOverlayToShare { slot: u32, chunk: u64, node: u32 },
}

impl MetaState {
    pub(super) fn origin(&mut self, slot: u32) -> Result<&mut OriginMeta, RecordError> {
        self.origins
            .get_mut(&slot)
            .ok_or(RecordError::UnknownSlot(slot))
    }

    /// Applies one journal record, refusing one that does not fit the state.
    pub fn apply(&mut self, r: &Record) -> Result<(), RecordError> {
        let cs = self.chunk_size;
        let data_chunks = self.data_chunks;
        match r {
            Record::BindOrigin { slot, id, size } => {
                if self.origins.contains_key(slot) {
                    return Err(RecordError::BoundTwice(*slot));
                }
                self.origins
                    .insert(*slot, OriginMeta::new(id.clone(), *size));
                self.next_slot = self.next_slot.max(slot + 1);
            }
            Record::UnbindOrigin { slot } => {
                let o = self.origin(*slot)?;
                if !o.exceptions.is_empty() || !o.tags.is_empty() {
                    return Err(RecordError::UnbindWithSnapshots(*slot));
                }
                if !o.overlays.is_empty() {
                    return Err(RecordError::UnbindWithPendingWrites(*slot));
                }
                self.origins.remove(slot);
            }
            Record::NewNode { slot, node, meta } => {
                let o = self.origin(*slot)?;
                if *node as usize != o.nodes.len() {
                    return Err(RecordError::NodeOutOfOrder {
                        slot: *slot,
                        node: *node,
                        expected: o.nodes.len(),
                    });
                }
                if meta.kind == NodeKind::Chain {
                    if meta.seq != o.newest_seq + 1 {
                        return Err(RecordError::ChainSeqOutOfOrder {
                            slot: *slot,
                            seq: meta.seq,
                        });
                    }
                    o.newest_seq = meta.seq;
                } else if meta.parent >= *node {
                    return Err(RecordError::ParentNotOlder {
                        slot: *slot,
                        node: *node,
                        parent: meta.parent,
                    });
                }
                if meta.kind == NodeKind::Leaf {
                    if o.tags.contains_key(&meta.tag) {
                        return Err(RecordError::TagHasTwoLeaves {
                            slot: *slot,
                            tag: meta.tag,
                        });
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
                    .ok_or(RecordError::FreezeUnknownNode {
                        slot: *slot,
                        node: *node,
                    })?;
                if n.kind != NodeKind::Leaf {
                    return Err(RecordError::FreezeNonLeaf {
                        slot: *slot,
                        node: *node,
                    });
                }
                n.kind = NodeKind::Frozen;
                let tag = n.tag;
                if o.tags.get(&tag) == Some(node) {
                    o.tags.remove(&tag);
                }
            }
            Record::DeleteTag { slot, tag } => {
                let o = self.origin(*slot)?;
                let leaf = o.tags.remove(tag).ok_or(RecordError::DeleteUnknownTag {
                    slot: *slot,
                    tag: *tag,
                })?;
                o.nodes[leaf as usize].dead = true;
            }
            Record::AddException {
                slot,
                chunk,
                node,
                store,
            } => {
                if *store >= data_chunks || bit_get(&self.alloc, *store) {
                    return Err(RecordError::ExceptionStoreChunk {
                        slot: *slot,
                        chunk: *chunk,
                        store: *store,
                    });
                }
                let o = self.origin(*slot)?;
                if *chunk >= o.nchunks(cs) || *node as usize >= o.nodes.len() || *node == ROOT {
                    return Err(RecordError::ExceptionOutOfRange {
                        slot: *slot,
                        chunk: *chunk,
                        node: *node,
                    });
                }
                let list = o.exceptions.entry(*chunk).or_default();
                // A first write over a zero exception replaces it (format 4).
                list.retain(|(n, s)| !(n == node && *s == ZERO_CHUNK));
                if list.iter().any(|(n, _)| n == node) {
                    return Err(RecordError::TwoExceptions {
                        slot: *slot,
                        chunk: *chunk,
                        node: *node,
                    });
                }
                list.push((*node, *store));
                bit_set(&mut self.alloc, *store, true);
            }
            Record::FreeException { slot, chunk, node } => {
                let o = self.origin(*slot)?;
                let list = o
                    .exceptions
                    .get_mut(chunk)
                    .ok_or(RecordError::FreeMissingChunk {
                        slot: *slot,
                        chunk: *chunk,
                    })?;
                let i = list.iter().position(|(n, _)| n == node).ok_or(
                    RecordError::FreeMissingNode {
                        slot: *slot,
                        chunk: *chunk,
                        node: *node,
                    },
                )?;
                let (_, store) = list.swap_remove(i);
                if list.is_empty() {
                    o.exceptions.remove(chunk);
                }
                // A pending write sharing the chunk keeps it; a zero exception has none.
                if store != ZERO_CHUNK && o.overlays.get(chunk) != Some(&store) {
                    bit_set(&mut self.alloc, store, false);
                }
            }
            Record::RollbackStart { slot, tag, source } => {
                let o = self.origin(*slot)?;
                if o.rollback.is_some() {
                    return Err(RecordError::TwoRollbacks(*slot));
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
                let r = o
                    .rollback
                    .as_mut()
                    .ok_or(RecordError::RestoredWithoutRollback(*slot))?;
                bit_set(&mut r.restored, *chunk, true);
            }
            Record::RollbackDone { slot } => {
                let o = self.origin(*slot)?;
                if o.rollback.take().is_none() {
                    return Err(RecordError::DoneWithoutRollback(*slot));
                }
            }
            Record::OverlayAt { slot, chunk, store } => {
                if *store >= data_chunks || bit_get(&self.alloc, *store) {
                    return Err(RecordError::OverlayStoreChunk {
                        slot: *slot,
                        chunk: *chunk,
                        store: *store,
                    });
                }
                let o = self.origin(*slot)?;
                if *chunk >= o.nchunks(cs) {
                    return Err(RecordError::OverlayPastEnd {
                        slot: *slot,
                        chunk: *chunk,
                    });
                }
                if o.overlays.insert(*chunk, *store).is_some() {
                    return Err(RecordError::TwoOverlays {
                        slot: *slot,
                        chunk: *chunk,
                    });
                }
                bit_set(&mut self.alloc, *store, true);
            }
            Record::OverlayDone { slot, chunk } => {
                let o = self.origin(*slot)?;
                let store = o
                    .overlays
                    .remove(chunk)
                    .ok_or(RecordError::NoOverlayToFinish {
                        slot: *slot,
                        chunk: *chunk,
                    })?;
                // An exception sharing the chunk keeps it.
                if !o.shares(*chunk, store) {
                    bit_set(&mut self.alloc, store, false);
                }
            }
            Record::ShareOverlay { slot, chunk, node } => {
                let o = self.origin(*slot)?;
                let store = *o.overlays.get(chunk).ok_or(RecordError::NoOverlayToShare {
                    slot: *slot,
                    chunk: *chunk,
                    node: *node,
                })?;
                if *node as usize >= o.nodes.len() || *node == ROOT {
                    return Err(RecordError::ExceptionOutOfRange {
                        slot: *slot,
                        chunk: *chunk,
                        node: *node,
                    });
                }
                let list = o.exceptions.entry(*chunk).or_default();
                if list.iter().any(|(n, s)| n == node || *s == store) {
                    return Err(RecordError::TwoExceptions {
                        slot: *slot,
                        chunk: *chunk,
                        node: *node,
                    });
                }
                list.push((*node, store));
            }
            Record::SetMemo { slot, tag, memo } => {
                let o = self.origin(*slot)?;
                let leaf = *o.tags.get(tag).ok_or(RecordError::MemoUnknownTag {
                    slot: *slot,
                    tag: *tag,
                })?;
                o.nodes[leaf as usize].memo = memo.clone();
            }
            Record::ZeroException { slot, chunk, node } => {
                let o = self.origin(*slot)?;
                if *chunk >= o.nchunks(cs) || *node as usize >= o.nodes.len() || *node == ROOT {
                    return Err(RecordError::ExceptionOutOfRange {
                        slot: *slot,
                        chunk: *chunk,
                        node: *node,
                    });
                }
                let shared = o.overlays.get(chunk).copied();
                let list = o.exceptions.entry(*chunk).or_default();
                let old = match list.iter_mut().find(|(n, _)| n == node) {
                    Some(e) => Some(std::mem::replace(&mut e.1, ZERO_CHUNK)),
                    None => {
                        list.push((*node, ZERO_CHUNK));
                        None
                    }
                };
                // The replaced data chunk is freed, unless a pending write shares it.
                if let Some(s) = old.filter(|s| *s != ZERO_CHUNK && Some(*s) != shared) {
                    bit_set(&mut self.alloc, s, false);
                }
            }
        }
        Ok(())
    }
}
