use super::*;
use crate::meta::ZERO_CHUNK;

/// The live readers of an origin's versions at one instant (for reclaim): each live leaf, and
/// the rollback source, with the path a lookup takes from it.
pub(super) struct Readers {
    /// Nodes that existed (newer ones are kept).
    pub(super) n: usize,
    /// Chain nodes that existed.
    pub(super) nchain: usize,
    /// Each reader's path: itself and its frozen ancestors, up to (not including) its chain node.
    pub(super) paths: Vec<Vec<u32>>,
    /// Non-chain node → the readers whose path passes through it.
    pub(super) through: HashMap<u32, Vec<usize>>,
    /// Chain seq → the readers whose path ends at that chain node.
    pub(super) at_chain: Vec<Vec<usize>>,
    /// The snapshot tag of each reader (`None` for a rollback's source).
    pub(super) tags: Vec<Option<u32>>,
}

impl Readers {
    /// The census of `tree`'s readers: its live leaves and, during a rollback, the rollback's
    /// source. Pure: the caller holds whatever keeps the tree still (the metadata lock).
    pub(super) fn census(tree: &VersionTree, rollback_source: Option<u32>) -> Readers {
        let n = tree.count();
        let nchain = tree.chain_count();
        let mut r = Readers {
            n,
            nchain,
            paths: Vec::new(),
            through: HashMap::new(),
            at_chain: vec![Vec::new(); nchain + 1],
            tags: Vec::new(),
        };
        let mut starts: Vec<u32> = (0..n as u32)
            .filter(|&i| {
                tree.node(i)
                    .is_some_and(|nd| nd.kind() == NodeKind::Leaf && !nd.dead.load(SeqCst))
            })
            .collect();
        starts.extend(rollback_source);
        for start in starts {
            let ri = r.paths.len();
            let is_leaf = tree
                .node(start)
                .is_some_and(|nd| nd.kind() == NodeKind::Leaf);
            r.tags
                .push(is_leaf.then(|| tree.node(start).map(|nd| nd.tag)).flatten());
            let mut path = Vec::new();
            let mut x = start;
            // Parents are older than children, so the walk ends; the bound guards a bad tree.
            for _ in 0..=n {
                let Some(nd) = tree.node(x) else { break };
                match nd.kind() {
                    NodeKind::Chain => {
                        if let Some(v) = r.at_chain.get_mut(nd.seq as usize) {
                            v.push(ri);
                        }
                        break;
                    }
                    NodeKind::Origin => break,
                    NodeKind::Leaf | NodeKind::Frozen => {
                        path.push(x);
                        r.through.entry(x).or_default().push(ri);
                        x = nd.parent;
                    }
                }
            }
            r.paths.push(path);
        }
        r
    }

    /// The first node on reader `r`'s path that has an exception in `list`; `None` if the
    /// lookup goes on to the chain.
    pub(super) fn first_labelled(&self, r: usize, list: &ExList) -> Option<u32> {
        self.paths[r]
            .iter()
            .copied()
            .find(|x| list.iter().any(|e| e.node == *x))
    }

    /// The live readers whose lookup of this chunk ends at exception `e`; `None` if the
    /// exception is newer than this census (keep it).
    pub(super) fn users<'a>(
        &'a self,
        list: &'a ExList,
        e: &'a Ex,
    ) -> Option<Box<dyn Iterator<Item = usize> + 'a>> {
        if e.node as usize >= self.n {
            return None;
        }
        if e.seq == 0 {
            let rs = self
                .through
                .get(&e.node)
                .map(|v| v.as_slice())
                .unwrap_or(&[]);
            return Some(Box::new(
                rs.iter()
                    .copied()
                    .filter(move |&r| self.first_labelled(r, list) == Some(e.node)),
            ));
        }
        if e.seq as usize > self.nchain {
            return None;
        }
        // A reader reaching chain node m takes the chain copy with the smallest seq ≥ m.
        let below = list
            .iter()
            .filter(|x| x.seq > 0 && x.seq < e.seq)
            .map(|x| x.seq)
            .max()
            .unwrap_or(0);
        Some(Box::new(
            (below as usize + 1..=e.seq as usize)
                .flat_map(move |m| self.at_chain[m].iter().copied())
                .filter(move |&r| self.first_labelled(r, list).is_none()),
        ))
    }

    /// Whether some live reader's lookup of this chunk ends at exception `e`.
    pub(super) fn needed(&self, list: &ExList, e: &Ex) -> bool {
        self.users(list, e).is_none_or(|mut u| u.next().is_some())
    }

    /// The snapshot that alone reads exception `e`, if exactly one does.
    #[cfg(test)]
    pub(super) fn sole_user(&self, list: &ExList, e: &Ex) -> Option<u32> {
        let mut u = self.users(list, e)?;
        let first = u.next()?;
        if u.next().is_some() {
            return None;
        }
        self.tags[first]
    }
}

impl OriginCore {
    /// The live readers now: live leaves and the rollback source, with their paths. Taken
    /// under the metadata lock, which every change of the tree holds: a census taken between a
    /// leaf's freeze and the creation of its new leaves would miss a reader.
    pub(super) fn readers(&self) -> Readers {
        let _m = self.store.lock_meta();
        let source = self.rollback.load().as_ref().map(|rb| rb.source);
        Readers::census(&self.tree, source)
    }

    /// Store chunks held by exceptions no live snapshot can read any more, while a reclaim is
    /// pending or running (0 otherwise).
    pub(super) fn garbage_estimate(&self) -> u64 {
        if !self.reclaim_needed.load(SeqCst)
            && !self.reclaim_running.load(SeqCst)
            && !self.shadowed.load(SeqCst)
        {
            // A delete not yet durable: its reclaim is still to come.
            return self.dying_count.load(SeqCst).min(1) as u64;
        }
        let readers = self.readers();
        self.map
            .lists()
            .iter()
            .map(|(_, l)| {
                l.iter()
                    .filter(|e| e.store != ZERO_CHUNK && !readers.needed(l, e))
                    .count() as u64
            })
            .sum()
    }

    pub(super) fn reclaim(&self) -> Result<()> {
        self.reclaim_running.store(true, SeqCst);
        let r = self.reclaim_pass();
        self.reclaim_running.store(false, SeqCst);
        r
    }

    /// Frees every exception that no live reader resolves to.
    pub(super) fn reclaim_pass(&self) -> Result<()> {
        let readers = self.readers();
        let garbage = |list: &ExList, e: &Ex| !readers.needed(list, e);
        let mut freed = 0u64;
        for (c, l) in self.map.lists() {
            if !l.iter().any(|e| garbage(&l, e)) {
                continue;
            }
            // A chunk with an overlay keeps its copy until the overlay is written: look again
            // later.
            if self.map.overlay(c) {
                self.shadowed.store(true, SeqCst);
                continue;
            }
            let _g = self.stripe(c);
            if self.map.overlay(c) {
                self.shadowed.store(true, SeqCst);
                continue;
            }
            let mut m = self.store.lock_meta();
            let cur = self.map.list(c);
            let Some(cur) = cur else { continue };
            let (drop_list, keep): (Vec<Ex>, Vec<Ex>) = cur.iter().partition(|e| garbage(&cur, e));
            for e in &drop_list {
                m.pending.push(Record::FreeException {
                    slot: self.slot,
                    chunk: c,
                    node: e.node,
                });
                if e.store == ZERO_CHUNK {
                    StoreCore::note_zero(&mut m, false);
                } else {
                    StoreCore::note_free(&mut m, e.store);
                }
                if let Some(nd) = self.node(e.node) {
                    nd.exceptions.fetch_sub(1, SeqCst);
                }
                freed += 1;
            }
            self.map.set_list_top(c, Some(Arc::new(keep)));
        }
        if freed > 0 {
            log::info!("origin {}: reclaimed {freed} store chunks", self.id);
            self.store.commit_sync()?;
        }
        Ok(())
    }

    /// Per snapshot: the store chunks it alone reads (what deleting it would free), and those
    /// it reads that other versions read too. Zero exceptions hold no chunk.
    pub(super) fn chunk_census(&self) -> HashMap<u32, (u64, u64)> {
        let readers = self.readers();
        let mut out: HashMap<u32, (u64, u64)> = HashMap::new();
        for (_, l) in self.map.lists() {
            for e in l.iter().filter(|e| e.store != ZERO_CHUNK) {
                let Some(users) = readers.users(&l, e) else {
                    continue;
                };
                let users: Vec<usize> = users.collect();
                for r in &users {
                    if let Some(tag) = readers.tags[*r] {
                        let c = out.entry(tag).or_default();
                        if users.len() == 1 {
                            c.0 += 1;
                        } else {
                            c.1 += 1;
                        }
                    }
                }
            }
        }
        out
    }
}
