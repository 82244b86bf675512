use super::*;

impl OriginCore {
    /// Takes a snapshot (see `Origin::create_snapshot`). `sync`: answer only once the snapshot
    /// survives a host crash holding every write completed before the call (an origin fsync
    /// and a commit round, both with the gate open); otherwise answer once its records are in
    /// the journal (it survives the death of the process) and let the next commit round make
    /// it durable.
    pub fn create_snapshot(&self, of: Option<u32>, memo: &str, sync: bool) -> Result<u32> {
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
                // Overlays survive the cut (`share_overlays`); those an earlier cut took the
                // chunk of and that were not written since get one again first.
                for c in self.detached_overlays() {
                    let _g = self.stripe(c);
                    self.rehome_overlay(c)?;
                }
                if let Some(e) = lock(&self.overlay_error).take() {
                    return Err(Error::io(e, std::io::Error::other("overlay write failed")));
                }
                // No origin fsync here: the snapshot reads its chunks still on the origin from
                // the page cache until a write copies them out (from the page cache too), so a
                // process death keeps the cut exact; a host crash keeps what was flushed
                // (README "Crash behaviour"). `sync` fsyncs after the gate reopens.
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
                self.share_overlays(&mut m, chain, seq);
                self.newest.store(seq, SeqCst);
                if !sync {
                    self.cut_unsynced.store(true, SeqCst);
                }
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
        self.answer(epoch.0, sync, Some(of.is_none()))?;
        Ok(epoch.1)
    }

    /// The end of a create or delete: the records of batch `epoch` are in the journal (a
    /// process death keeps them) and a commit round is on its way; with `sync`, the round is
    /// done, and for a create (`of_origin`: `Some`) the origin is synced first: the pre-cut
    /// writes a snapshot of the origin reads from there, and those of earlier snapshots
    /// taken without a sync that a snapshot of a snapshot may share.
    fn answer(&self, epoch: u64, sync: bool, of_origin: Option<bool>) -> Result<()> {
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
        let s = self.snap(tag)?;
        let epoch = {
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
            m.epoch
        };
        self.answer(epoch, sync, None)?;
        self.finish_deaths();
        self.store.wake_worker();
        Ok(())
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
