use super::*;

impl OriginCore {
    pub fn create_snapshot(&self, of: Option<u32>, memo: &str) -> Result<u32> {
        if memo.len() > MAX_MEMO {
            return Err(Error::InvalidArgument(format!(
                "memo of {} bytes is longer than {MAX_MEMO}",
                memo.len()
            )));
        }
        let _ops = lock(&self.ops);
        self.check_alive()?;
        let birth = now_secs();
        let epoch = match of {
            None => {
                // A chain node assumes the origin only changes by writes; a rollback in
                // progress changes it wholesale, so origin snapshots wait for it to finish.
                if let Some(r) = self.rollback.load().as_ref() {
                    return Err(Error::Busy(format!(
                        "origin {} is rolling back to snapshot {} ({} of {} chunks done); snapshot it when the rollback finishes",
                        self.id,
                        r.tag,
                        r.done.load(SeqCst),
                        r.total
                    )));
                }
                let _closed = self.gate.close();
                self.settle_overlays()?;
                // The snapshot holds every write completed before it: make those durable, as
                // its chunks still on the origin are read from there.
                self.io(
                    || format!("syncing origin {} before a snapshot", self.origin.name()),
                    self.origin.sync(),
                )?;
                let mut m = self.store.lock_meta();
                let tag = self.next_tag.load(SeqCst);
                let seq = self
                    .newest
                    .load(SeqCst)
                    .checked_add(1)
                    .filter(|&s| s < u32::MAX - 4 && tag < u32::MAX - 4)
                    .ok_or_else(|| {
                        Error::Limit(format!("origin {} has used every snapshot number", self.id))
                    })?;
                let chain = self.push_node(
                    &mut m,
                    NodeMeta {
                        kind: NodeKind::Chain,
                        dead: false,
                        parent: ROOT,
                        seq,
                        tag,
                        parent_tag: 0,
                        birth,
                        memo: String::new(),
                    },
                )?;
                self.add_snapshot(&mut m, chain, tag, 0, birth, memo)?;
                self.newest.store(seq, SeqCst);
                (m.epoch, tag)
            }
            Some(parent) => {
                let ps = self.snap(parent)?;
                let _closed = ps.gate.close();
                let mut m = self.store.lock_meta();
                let tag = self.next_tag.load(SeqCst);
                if tag >= u32::MAX - 4 {
                    return Err(Error::Limit(format!(
                        "origin {} has used every snapshot number",
                        self.id
                    )));
                }
                let frozen = self.freeze(&mut m, &ps)?;
                self.add_snapshot(&mut m, frozen, tag, parent, birth, memo)?;
                (m.epoch, tag)
            }
        };
        self.commit(epoch.0)?;
        Ok(epoch.1)
    }

    pub fn delete_snapshot(&self, tag: u32) -> Result<()> {
        let _ops = lock(&self.ops);
        self.check_alive()?;
        let s = self.snap(tag)?;
        let epoch = {
            let _closed = s.gate.close();
            s.deleted.store(true, SeqCst);
            let mut m = self.store.lock_meta();
            if let Some(n) = self.node(s.leaf.load(SeqCst)) {
                n.dead.store(true, SeqCst);
            }
            let mut snaps = lock(&self.snaps);
            snaps.remove(&tag);
            self.live_snaps.store(snaps.len(), SeqCst);
            drop(snaps);
            m.pending.push(Record::DeleteTag {
                slot: self.slot,
                tag,
            });
            m.epoch
        };
        self.commit(epoch)?;
        self.reclaim_needed.store(true, SeqCst);
        self.store.wake_worker();
        Ok(())
    }

    pub fn snapshots(&self) -> Vec<SnapshotInfo> {
        let exclusive = self.exclusive_chunks();
        let snaps: Vec<Arc<SnapRt>> = lock(&self.snaps).values().cloned().collect();
        snaps
            .iter()
            .filter_map(|s| {
                let n = self.node(s.leaf.load(SeqCst))?;
                Some(SnapshotInfo {
                    tag: s.tag,
                    parent: (n.parent_tag != 0).then_some(n.parent_tag),
                    memo: n.memo.clone(),
                    birth_unix_secs: n.birth,
                    exclusive_chunks: exclusive.get(&s.tag).copied().unwrap_or(0),
                })
            })
            .collect()
    }

    pub fn status(&self) -> OriginStatus {
        let reclaim_pending_chunks = self.garbage_estimate();
        OriginStatus {
            origin_id: self.id.clone(),
            origin_path: self.origin.name().to_string(),
            size: self.size,
            snapshots: lock(&self.snaps).len(),
            rollback: self.rollback_progress(),
            reclaim_pending_chunks,
        }
    }

    pub fn has_snapshots(&self) -> bool {
        !lock(&self.snaps).is_empty() || self.rollback.load().is_some()
    }

    /// Frees everything once the last snapshot is gone, so the origin can be unbound.
    pub fn prepare_unbind(&self) -> Result<()> {
        let _ops = lock(&self.ops);
        if self.has_snapshots() {
            return Err(Error::HasSnapshots(self.id.clone()));
        }
        self.settle_overlays()?;
        self.reclaim()?;
        Ok(())
    }

    pub fn can_unbind(&self) -> bool {
        !self.has_snapshots()
            && self
                .map
                .iter()
                .all(|s| s.load().as_ref().is_none_or(|l| l.is_empty()))
    }

    pub fn mark_unbound(&self) {
        self.unbound.store(true, SeqCst);
    }
}
