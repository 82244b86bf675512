use super::*;

impl OriginCore {
    /// Takes a snapshot (see `Origin::create_snapshot`). `sync`: answer only once the snapshot
    /// survives a host crash holding every write completed before the call (an origin fsync
    /// and a commit round, both with the gate open); otherwise answer once its records are in
    /// the journal (it survives the death of the process) and let the next commit round make
    /// it durable.
    pub fn create_snapshot(&self, of: Option<u32>, memo: &str, sync: bool) -> Result<u32> {
        check_memo(memo)?;
        let _ops = lock(&self.ops);
        self.check_alive()?;
        let birth = now_secs();
        let epoch = match of {
            None => {
                self.check_no_rollback()?;
                let _closed = self.gate.close();
                self.before_origin_cut()?;
                let mut m = self.store.lock_meta();
                let tag = self.cut_origin(&mut m, birth, memo, sync)?;
                (m.epoch, tag)
            }
            Some(parent) => {
                let ps = self.snap(parent)?;
                let _closed = ps.gate.close();
                let mut m = self.store.lock_meta();
                let tag = self.cut_snapshot(&mut m, &ps, birth, memo)?;
                (m.epoch, tag)
            }
        };
        self.answer(epoch.0, sync, Some(of.is_none()))?;
        Ok(epoch.1)
    }

    /// A chain node assumes the origin only changes by writes; a rollback in progress changes
    /// it wholesale, so origin snapshots wait for it to finish (`ops` held).
    pub(crate) fn check_no_rollback(&self) -> Result<()> {
        if let Some(r) = self.rollback.load().as_ref() {
            return Err(Error::Busy(format!(
                "origin {} is rolling back to snapshot {} ({} of {} chunks done); snapshot it when the rollback finishes",
                self.id,
                r.tag,
                r.done.load(SeqCst),
                r.total
            )));
        }
        Ok(())
    }

    /// With the origin's gate closed, before a cut of the origin: overlays survive the cut
    /// (`share_overlays`); those an earlier cut took the chunk of and that were not written
    /// since get one again first.
    pub(crate) fn before_origin_cut(&self) -> Result<()> {
        for c in self.detached_overlays() {
            let _g = self.stripe(c);
            self.rehome_overlay(c)?;
        }
        if let Some(e) = lock(&self.overlay_error).take() {
            return Err(Error::io(e, std::io::Error::other("overlay write failed")));
        }
        Ok(())
    }

    /// The cut of the origin (`ops` held, gate closed, `before_origin_cut` done, metadata
    /// lock held): a chain node and the snapshot's leaf; returns the tag.
    ///
    /// No origin fsync here: the snapshot reads its chunks still on the origin from the page
    /// cache until a write copies them out (from the page cache too), so a process death keeps
    /// the cut exact; a host crash keeps what was flushed (README "Crash behaviour"). `sync`
    /// fsyncs after the gate reopens.
    pub(crate) fn cut_origin(
        &self,
        m: &mut MetaCore,
        birth: u64,
        memo: &str,
        sync: bool,
    ) -> Result<u32> {
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
            m,
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
        self.add_snapshot(m, chain, tag, 0, birth, memo)?;
        self.share_overlays(m, chain, seq);
        self.newest.store(seq, SeqCst);
        if !sync {
            self.cut_unsynced.store(true, SeqCst);
        }
        Ok(tag)
    }

    /// The cut of snapshot `ps` (`ops` held, its gate closed, metadata lock held): its leaf
    /// freezes, the tag and the new snapshot get leaves below it; returns the new tag.
    pub(crate) fn cut_snapshot(
        &self,
        m: &mut MetaCore,
        ps: &SnapRt,
        birth: u64,
        memo: &str,
    ) -> Result<u32> {
        let tag = self.next_tag.load(SeqCst);
        if tag >= u32::MAX - 4 {
            return Err(Error::Limit(format!(
                "origin {} has used every snapshot number",
                self.id
            )));
        }
        let frozen = self.freeze(m, ps)?;
        self.add_snapshot(m, frozen, tag, ps.tag, birth, memo)?;
        Ok(tag)
    }

    /// The end of a create or delete: the records of batch `epoch` are in the journal (a
    /// process death keeps them) and a commit round is on its way; with `sync`, the round is
    /// done, and for a create (`of_origin`: `Some`) the origin is synced first: the pre-cut
    /// writes a snapshot of the origin reads from there, and those of earlier snapshots
    /// taken without a sync that a snapshot of a snapshot may share.
    pub(crate) fn answer(&self, epoch: u64, sync: bool, of_origin: Option<bool>) -> Result<()> {
        if !sync {
            self.store.wait_written(epoch)?;
            self.store.request_commit();
            return Ok(());
        }
        match of_origin {
            Some(true) => self.io(
                || format!("syncing origin {} for a snapshot", self.origin.name()),
                self.origin.sync(),
            )?,
            Some(false) => self.sync_for_snapshots()?,
            None => {}
        }
        self.commit(epoch)
    }

    /// Deletes snapshot `tag`; `sync` as in `create_snapshot` (without the origin fsync).
    pub fn delete_snapshot(&self, tag: u32, sync: bool) -> Result<()> {
        let _ops = lock(&self.ops);
        self.check_alive()?;
        let epoch = self.delete_locked(tag)?;
        self.answer(epoch, sync, None)?;
        self.finish_deaths();
        self.store.wake_worker();
        Ok(())
    }

    /// The delete itself (`ops` held): closes the snapshot's gate, queues `DeleteTag`;
    /// returns the batch it is in.
    pub(crate) fn delete_locked(&self, tag: u32) -> Result<u64> {
        let s = self.snap(tag)?;
        let _closed = s.gate.close();
        s.deleted.store(true, SeqCst);
        let mut m = self.store.lock_meta();
        // The leaf dies (for copy-outs and reclaim) once the delete is durable.
        lock(&self.dying).push((m.epoch, s.leaf.load(SeqCst)));
        self.dying_count.fetch_add(1, SeqCst);
        self.store.dying.fetch_add(1, SeqCst);
        let mut snaps = lock(&self.snaps);
        snaps.remove(&tag);
        self.live_snaps.store(snaps.len(), SeqCst);
        drop(snaps);
        m.pending.push(Record::DeleteTag {
            slot: self.slot,
            tag,
        });
        Ok(m.epoch)
    }

    /// Marks the leaves of deleted snapshots dead once their delete is durable, and asks for
    /// a reclaim.
    pub(super) fn finish_deaths(&self) {
        if self.dying_count.load(SeqCst) == 0 {
            return;
        }
        let durable = self.store.durable_epoch.load(SeqCst);
        let _m = self.store.lock_meta();
        let mut dying = lock(&self.dying);
        let before = dying.len();
        dying.retain(|&(epoch, leaf)| {
            if epoch > durable {
                return true;
            }
            if let Some(n) = self.node(leaf) {
                n.dead.store(true, SeqCst);
            }
            false
        });
        let done = before - dying.len();
        if done > 0 {
            self.dying_count.fetch_sub(done, SeqCst);
            self.store.dying.fetch_sub(done, SeqCst);
            self.reclaim_needed.store(true, SeqCst);
        }
    }

    /// Replaces snapshot `tag`'s memo; returns once the change is durable.
    pub fn set_memo(&self, tag: u32, memo: &str) -> Result<()> {
        check_memo(memo)?;
        self.check_alive()?;
        let epoch = {
            // Under the metadata lock: a freeze (which copies the memo to the tag's new leaf)
            // and a delete are ordered with it, in memory and in the journal.
            let mut m = self.store.lock_meta();
            let s = self.snap(tag)?;
            let leaf = s.leaf.load(SeqCst);
            let n = self
                .node(leaf)
                .ok_or_else(|| Error::NotFound(format!("node {leaf} of origin {}", self.id)))?;
            n.memo.store(Arc::new(memo.to_string()));
            m.pending.push(Record::SetMemo {
                slot: self.slot,
                tag,
                memo: memo.to_string(),
            });
            m.epoch
        };
        self.commit(epoch)
    }

    pub fn snapshots(&self) -> Vec<SnapshotInfo> {
        let census = self.chunk_census();
        let snaps: Vec<Arc<SnapRt>> = lock(&self.snaps).values().cloned().collect();
        snaps
            .iter()
            .filter_map(|s| {
                let n = self.node(s.leaf.load(SeqCst))?;
                Some(SnapshotInfo {
                    tag: s.tag,
                    parent: (n.parent_tag != 0).then_some(n.parent_tag),
                    memo: n.memo(),
                    birth_unix_secs: n.birth,
                    exclusive_chunks: census.get(&s.tag).map_or(0, |c| c.0),
                    shared_chunks: census.get(&s.tag).map_or(0, |c| c.1),
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
            copy_outs: self.copy_outs.load(SeqCst),
            overlay_chunks: self.overlay_count.load(SeqCst) as u64,
            overlay_bytes: self.overlay_bytes.load(SeqCst) as u64,
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
        if self.dying_count.load(SeqCst) > 0 {
            self.store.commit_sync()?;
            self.finish_deaths();
        }
        self.reclaim()?;
        Ok(())
    }

    pub fn can_unbind(&self) -> bool {
        !self.has_snapshots() && !self.map.has_lists()
    }

    pub fn mark_unbound(&self) {
        self.unbound.store(true, SeqCst);
    }
}

/// Refuses a memo longer than the format keeps.
pub(crate) fn check_memo(memo: &str) -> Result<()> {
    if memo.len() > MAX_MEMO {
        return Err(Error::InvalidArgument(format!(
            "memo of {} bytes is longer than {MAX_MEMO}",
            memo.len()
        )));
    }
    Ok(())
}
