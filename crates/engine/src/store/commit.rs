//! Group commit: journal appends (leader/follower), commit rounds with seals, checkpoints,
//! and the commit-failure state.

use super::*;

/// Why a commit (a journal append, a commit round, a checkpoint) failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CommitError {
    /// Appending a batch to the journal failed.
    #[error("writing journal batch {seq}: {source}")]
    JournalWrite {
        /// The batch's sequence number.
        seq: u64,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Syncing an origin whose restored chunks a batch describes failed.
    #[error("syncing origin {origin}: {source}")]
    OriginSync {
        /// The origin's id.
        origin: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Syncing the store's data before a seal or checkpoint failed.
    #[error("syncing data: {source}")]
    DataSync {
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Syncing a journal seal failed.
    #[error("syncing journal seal {seq}: {source}")]
    SealSync {
        /// The seal's sequence number.
        seq: u64,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Writing a checkpoint failed.
    #[error(transparent)]
    Checkpoint(#[from] ondisk::CheckpointWriteError),
}

impl StoreCore {
    pub(crate) fn check_failed(&self) -> Result<()> {
        if let Some(f) = self
            .failed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            return Err(Error::io(
                format!(
                    "COW store {} stopped after a failed metadata write",
                    self.name
                ),
                std::io::Error::other(f.clone()),
            ));
        }
        Ok(())
    }

    pub(crate) fn request_commit(&self) {
        let mut m = self.lock_meta();
        m.sync_requested = true;
        drop(m);
        self.commit_wake.notify_one();
    }

    /// Waits until batch `epoch` is durable.
    pub(crate) fn wait_durable(&self, epoch: u64) -> Result<()> {
        if self.durable_epoch.load(SeqCst) >= epoch {
            return Ok(());
        }
        // The records may be in the journal already, written early: the committer's next
        // round makes them durable.
        self.commit_wake.notify_one();
        let mut d = self.durable.lock().unwrap_or_else(|e| e.into_inner());
        while *d < epoch {
            self.check_failed()?;
            if self.shutdown.load(SeqCst) {
                return Err(Error::io(
                    format!("COW store {} is closing", self.name),
                    std::io::Error::other("store closed"),
                ));
            }
            d = self
                .durable_cv
                .wait_timeout(d, Duration::from_millis(200))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        Ok(())
    }

    /// Waits until the records of batch `epoch` are in the journal (written, not necessarily
    /// synced), writing them itself if nobody else is: what an acknowledged write needs to
    /// survive the death of the process. Followers of a writer already at it share its write.
    pub(crate) fn wait_written(&self, epoch: u64) -> Result<()> {
        if self.written_epoch.load(SeqCst) >= epoch {
            return Ok(());
        }
        let j = self.journal.lock().unwrap_or_else(|e| e.into_inner());
        if self.written_epoch.load(SeqCst) >= epoch {
            return Ok(());
        }
        self.check_failed()?;
        if let Err(e) = self.write_pending(&j) {
            self.fail(e);
            self.check_failed()?;
        }
        Ok(())
    }

    /// Whether a commit has anything to make durable: records not yet in the journal, or
    /// journal batches not yet vouched for by a sealed one.
    pub(crate) fn needs_commit(&self) -> bool {
        let m = self.lock_meta();
        !m.pending.is_empty() || m.last_records > m.vouched
    }

    /// Appends every pending record to the journal as one batch, without a sync (the journal
    /// lock held). A batch that does not fit is replaced by a checkpoint.
    pub(super) fn write_pending(
        &self,
        _journal: &MutexGuard<'_, ()>,
    ) -> std::result::Result<(), CommitError> {
        let (batch, epoch, seq, pos) = {
            let mut m = self.lock_meta();
            let epoch = m.epoch;
            m.epoch += 1;
            if m.pending.is_empty() {
                // Every record of an earlier batch was taken under this lock and written.
                drop(m);
                self.set_written(epoch);
                return Ok(());
            }
            let records = std::mem::take(&mut m.pending);
            let seq = m.journal_seq;
            let unvouched = (seq as i64 - m.vouched).clamp(0, u32::MAX as i64) as u32;
            let batch = ondisk::encode_batch(m.sb.journal_gen, seq, unvouched, &records);
            (batch, epoch, seq, m.journal_pos)
        };
        // (Replaced by a checkpoint, the records are durable and marked so already.)
        if self.append_batch(&batch, seq, pos, true)? {
            self.set_written(epoch);
        }
        Ok(())
    }

    /// Appends an encoded batch `seq` at journal offset `pos` (the journal lock held). A batch
    /// that does not fit is replaced by a checkpoint of the whole state, which includes its
    /// records (already applied in memory). Returns whether the batch was appended.
    pub(super) fn append_batch(
        &self,
        batch: &[u8],
        seq: u64,
        pos: u64,
        has_records: bool,
    ) -> std::result::Result<bool, CommitError> {
        if pos + batch.len() as u64 > self.layout.journal_size {
            self.checkpoint()?;
            return Ok(false);
        }
        self.storage
            .write_at(batch, self.layout.journal_off + pos)
            .map_err(|source| CommitError::JournalWrite { seq, source })?;
        let mut m = self.lock_meta();
        m.journal_pos = pos + batch.len() as u64;
        m.journal_seq = seq + 1;
        if has_records {
            m.last_records = seq as i64;
        }
        Ok(true)
    }

    pub(super) fn set_written(&self, epoch: u64) {
        if self.written_epoch.fetch_max(epoch, SeqCst) < epoch {
            let _d = self.durable.lock().unwrap_or_else(|e| e.into_inner());
            self.durable_cv.notify_all();
        }
    }

    /// Commits everything pending, including a sync of data written in place, and waits.
    pub(crate) fn commit_sync(&self) -> Result<()> {
        let epoch = {
            let mut m = self.lock_meta();
            m.sync_requested = true;
            m.epoch
        };
        self.commit_wake.notify_one();
        self.wait_durable(epoch)
    }

    pub(super) fn set_durable(&self, epoch: u64) {
        self.written_epoch.fetch_max(epoch, SeqCst);
        let mut d = self.durable.lock().unwrap_or_else(|e| e.into_inner());
        *d = (*d).max(epoch);
        self.durable_epoch.store(*d, SeqCst);
        self.durable_cv.notify_all();
        drop(d);
        if self.dying.load(SeqCst) > 0 {
            self.wake_worker();
        }
    }

    pub(super) fn fail(&self, what: CommitError) {
        log::error!("COW store {}: {what}; refusing further writes", self.name);
        *self.failed.lock().unwrap_or_else(|e| e.into_inner()) = Some(CommitFailed::new(what));
        let _d = self.durable.lock().unwrap_or_else(|e| e.into_inner());
        self.durable_cv.notify_all();
    }

    /// The group-commit loop. A round hands every pending record to the journal (writers that
    /// could not wait may have written some already), syncs the origins whose restored chunks
    /// those records describe and the store, then appends a *seal*, an empty batch vouching
    /// for every batch written before the sync, and syncs again. Only then are the round's
    /// batches durable: after a power cut, replay trusts exactly the vouched-for batches.
    pub(super) fn committer(self: Arc<Self>) {
        loop {
            let need_ckpt = {
                let mut m = self.lock_meta();
                // Batches written early (by writers that could not wait) are made durable too.
                let idle = |m: &MetaCore| {
                    m.pending.is_empty() && !m.sync_requested && m.last_records <= m.vouched
                };
                while idle(&m) && !self.shutdown.load(SeqCst) {
                    m = self
                        .commit_wake
                        .wait_timeout(m, Duration::from_millis(500))
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
                if self.shutdown.load(SeqCst) && idle(&m) {
                    return;
                }
                m.sync_requested = false;
                m.journal_pos > self.layout.journal_size / 2
            };
            let started = std::time::Instant::now();
            let round = self.commit_round();
            if round.is_ok() {
                self.commits.round(started.elapsed());
            }
            let epoch = match round {
                Ok(e) => e,
                Err(e) => {
                    self.fail(e);
                    return;
                }
            };
            self.release_freed(epoch);
            self.set_durable(epoch);
            // Origin writes held back for this batch's copy-outs can go to the origins now.
            let origins: Vec<Arc<dyn AttachedOrigin>> =
                self.lock_meta().origins.values().cloned().collect();
            for o in origins {
                o.drain_overlays(false);
            }
            if need_ckpt {
                let _j = self.journal.lock().unwrap_or_else(|e| e.into_inner());
                if let Err(e) = self.checkpoint() {
                    self.fail(e);
                    return;
                }
            }
        }
    }

    /// One durable round (see `committer`); returns the epoch it made durable.
    pub(super) fn commit_round(&self) -> std::result::Result<u64, CommitError> {
        let (epoch, gen, upto, origin_sync) = {
            let j = self.journal.lock().unwrap_or_else(|e| e.into_inner());
            self.write_pending(&j)?;
            let mut m = self.lock_meta();
            let origin_sync: Vec<Arc<dyn AttachedOrigin>> =
                std::mem::take(&mut m.pending_origin_sync)
                    .iter()
                    .filter_map(|s| m.origins.get(s).cloned())
                    .collect();
            (m.epoch - 1, m.sb.journal_gen, m.last_records, origin_sync)
        };
        for o in &origin_sync {
            o.sync_data().map_err(|source| CommitError::OriginSync {
                origin: o.id().to_string(),
                source,
            })?;
        }
        // Data first: the copies a record points at must be durable before a batch vouches
        // for the record.
        self.storage
            .sync()
            .map_err(|source| CommitError::DataSync { source })?;
        let seal = {
            let _j = self.journal.lock().unwrap_or_else(|e| e.into_inner());
            let m = self.lock_meta();
            if m.sb.journal_gen != gen || m.vouched >= upto {
                // Nothing new to vouch for, or a checkpoint made it all durable meanwhile.
                None
            } else {
                let seq = m.journal_seq;
                let batch = ondisk::encode_batch(gen, seq, (seq as i64 - upto) as u32, &[]);
                let pos = m.journal_pos;
                drop(m);
                self.append_batch(&batch, seq, pos, false)?.then_some(seq)
            }
        };
        if let Some(seq) = seal {
            self.storage
                .sync()
                .map_err(|source| CommitError::SealSync { seq, source })?;
            let mut m = self.lock_meta();
            if m.sb.journal_gen == gen {
                m.vouched = m.vouched.max(upto);
            }
        }
        Ok(epoch)
    }

    pub(super) fn release_freed(&self, epoch: u64) {
        let mut m = self.lock_meta();
        let mut i = 0;
        while i < m.pending_free.len() {
            if m.pending_free[i].0 <= epoch {
                let (_, c) = m.pending_free.swap_remove(i);
                m.free.push(c);
            } else {
                i += 1;
            }
        }
    }

    /// Writes the whole metadata to the inactive checkpoint area and starts a new journal pass
    /// (the caller holds the journal lock).
    pub(super) fn checkpoint(&self) -> std::result::Result<(), CommitError> {
        // Snapshot the state. Records still pending are part of it, so they are dropped from
        // the queue and their batch is made durable by this checkpoint.
        let (state, sb, epoch, origin_sync) = {
            let mut m = self.lock_meta();
            let mut origins = m.dormant.clone();
            for (slot, o) in &m.origins {
                origins.insert(*slot, o.to_meta());
            }
            let state = MetaState {
                chunk_size: self.layout.chunk_size,
                data_chunks: self.layout.data_chunks,
                alloc: m.alloc.clone(),
                origins,
                next_slot: m.next_slot,
            };
            m.pending.clear();
            let epoch = m.epoch;
            m.epoch += 1;
            let origin_sync: Vec<Arc<dyn AttachedOrigin>> =
                std::mem::take(&mut m.pending_origin_sync)
                    .iter()
                    .filter_map(|s| m.origins.get(s).cloned())
                    .collect();
            (state, m.sb, epoch, origin_sync)
        };
        for o in &origin_sync {
            o.sync_data().map_err(|source| CommitError::OriginSync {
                origin: o.id().to_string(),
                source,
            })?;
        }
        self.storage
            .sync()
            .map_err(|source| CommitError::DataSync { source })?;
        let new_sb = ondisk::write_checkpoint(
            self.storage.as_ref(),
            &sb,
            &state,
            self.storage.boot_id(),
            false,
        )?;
        {
            let mut m = self.lock_meta();
            m.sb = new_sb;
            m.journal_pos = 0;
            m.journal_seq = 0;
            m.vouched = -1;
            m.last_records = -1;
        }
        self.release_freed(epoch);
        self.set_durable(epoch);
        log::debug!(
            "COW store {}: checkpoint of {} bytes written",
            self.name,
            new_sb.ckpt_len
        );
        Ok(())
    }
}
