//! [`MetaState::validate`]: every invariant of the metadata (open and check), and repair's rebuild.

use super::*;

impl MetaState {
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
                if n.memo.len() > MAX_MEMO {
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
                    if *store == ZERO_CHUNK {
                        // A zero exception: no data chunk.
                    } else if *store >= self.data_chunks {
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
                } else if o.shares(*chunk, *store) {
                    // The chain node of a snapshot cut while the write was pending owns it too.
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
                for (_, s) in list.iter().filter(|(_, s)| *s != ZERO_CHUNK) {
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
