//! [`MetaState::apply`]: one journal record onto the state (open and check replay through it).

use super::*;

impl MetaState {
    pub(super) fn origin(&mut self, slot: u32) -> Result<&mut OriginMeta, String> {
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
}
