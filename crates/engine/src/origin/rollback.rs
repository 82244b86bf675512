use super::*;

/// Rollback in progress.
pub(crate) struct RollbackRt {
    pub tag: u32,
    pub source: u32,
    pub(super) restored: Vec<AtomicU64>,
    pub(super) done: AtomicU64,
    pub(super) total: u64,
    pub(super) cursor: AtomicU64,
    /// Why the copy-back cannot go on (the store is full); cleared by progress.
    pub(super) stalled: Mutex<Option<Error>>,
}

impl RollbackRt {
    pub(super) fn is_restored(&self, c: u64) -> bool {
        self.restored[(c / 64) as usize].load(SeqCst) & (1 << (c % 64)) != 0
    }
    pub(super) fn set_restored(&self, c: u64) {
        self.restored[(c / 64) as usize].fetch_or(1 << (c % 64), SeqCst);
        self.done.fetch_add(1, SeqCst);
    }
}

impl OriginCore {
    /// Copies the rollback source's chunk `c` back onto the origin (idempotent).
    pub(super) fn restore_chunk(&self, rb: &RollbackRt, c: u64) -> Result<()> {
        if rb.is_restored(c) {
            return Ok(());
        }
        let _g = self.stripe(c);
        if rb.is_restored(c) {
            return Ok(());
        }
        // Where the source reads the origin itself, the origin already holds its data.
        if self
            .resolve(rb.source, self.map.list(c).as_deref())
            .is_some()
            && self.others_share_origin(rb)
        {
            // The origin chunk is about to change: save it for the snapshots that share it.
            let newest = self.newest.load(SeqCst);
            let e = self.copy_out_locked(c, newest)?;
            self.store.wait_durable(e)?;
        }
        let list = self.map.list(c);
        let copied = self.resolve(rb.source, list.as_deref());
        if let Some(s) = copied {
            let len = self.chunk_len(c) as usize;
            let mut buf = vec![0u8; len];
            // A zero exception: the buffer's zeros are the source's data.
            if s != crate::meta::ZERO_CHUNK {
                self.io(
                    || {
                        format!(
                            "reading COW store {} chunk {s} for rollback",
                            self.store.name
                        )
                    },
                    self.store.storage.read_at(&mut buf, self.store_off(s)),
                )?;
            }
            self.io(
                || {
                    format!(
                        "writing origin {} chunk {c} for rollback",
                        self.origin.name()
                    )
                },
                self.origin.write_at(&buf, c * self.cs),
            )?;
        }
        rb.set_restored(c);
        let mut m = self.store.lock_meta();
        self.note_record(&m);
        m.pending.push(Record::Restored {
            slot: self.slot,
            chunk: c,
        });
        if copied.is_some() {
            // The origin must hold the data before the record saying so is durable.
            m.pending_origin_sync.insert(self.slot);
        }
        Ok(())
    }

    /// Whether any snapshot other than the rollback's own may read the origin's data.
    pub(super) fn others_share_origin(&self, rb: &RollbackRt) -> bool {
        lock(&self.snaps).keys().any(|t| *t != rb.tag)
    }

    pub fn rollback(&self, tag: u32) -> Result<()> {
        let _ops = lock(&self.ops);
        self.check_alive()?;
        if let Some(r) = self.rollback.load().as_ref() {
            return Err(Error::Busy(format!(
                "origin {} is still rolling back to snapshot {} ({} of {} chunks done)",
                self.id,
                r.tag,
                r.done.load(SeqCst),
                r.total
            )));
        }
        let s = self.snap(tag)?;
        let epoch = {
            let _c1 = self.gate.close();
            let _c2 = s.gate.close();
            self.settle_overlays()?;
            let mut m = self.store.lock_meta();
            let seq = self
                .newest
                .load(SeqCst)
                .checked_add(1)
                .filter(|&s| s < u32::MAX - 4)
                .ok_or_else(|| {
                    Error::Limit(format!("origin {} has used every snapshot number", self.id))
                })?;
            // Freeze the source so later writes to the snapshot do not reach the origin.
            let source = self.freeze(&mut m, &s)?;
            // A hidden image of the origin as it is now protects every other snapshot: the
            // copy-back overwrites origin chunks they may still share.
            self.push_node(
                &mut m,
                NodeMeta {
                    kind: NodeKind::Chain,
                    dead: false,
                    parent: ROOT,
                    seq,
                    tag: 0,
                    parent_tag: 0,
                    birth: now_secs(),
                    memo: String::new(),
                },
            )?;
            self.newest.store(seq, SeqCst);
            m.pending.push(Record::RollbackStart {
                slot: self.slot,
                tag,
                source,
            });
            let words = self.nchunks.div_ceil(64) as usize;
            self.rollback.store(Some(Arc::new(RollbackRt {
                tag,
                source,
                restored: (0..words).map(|_| AtomicU64::new(0)).collect(),
                done: AtomicU64::new(0),
                total: self.nchunks,
                cursor: AtomicU64::new(0),
                stalled: Mutex::new(None),
            })));
            m.epoch
        };
        // The source may read chunks from the origin that a snapshot taken without a sync
        // left in the page cache only: the rollback is durable with them.
        self.sync_for_snapshots()?;
        self.commit(epoch)?;
        self.store.wake_worker();
        Ok(())
    }

    /// Why the rollback cannot progress, if it cannot.
    pub fn rollback_stalled(&self) -> Option<Error> {
        let rb = self.rollback.load_full()?;
        let s = lock(&rb.stalled);
        s.as_ref().map(|e| match e {
            Error::NoSpace { store, what } => Error::NoSpace {
                store: store.clone(),
                what: what.clone(),
            },
            other => Error::Busy(other.to_string()),
        })
    }

    pub fn rollback_progress(&self) -> Option<RollbackProgress> {
        self.rollback.load().as_ref().map(|r| RollbackProgress {
            tag: r.tag,
            chunks_done: r.done.load(SeqCst),
            chunks_total: r.total,
        })
    }

    pub(super) fn rollback_step(&self, rb: &Arc<RollbackRt>) -> Result<()> {
        // Up to BATCH chunks that need a copy, scanning at most SCAN chunks, per step: one
        // commit covers the step's copy-outs.
        const BATCH: usize = 2048;
        const SCAN: u64 = 1 << 16;
        let _pass = self.gate.enter();
        let start = rb.cursor.load(SeqCst);
        let mut end = start;
        let mut copies = 0;
        while end < self.nchunks && end - start < SCAN && copies < BATCH {
            if !rb.is_restored(end)
                && self
                    .resolve(rb.source, self.map.list(end).as_deref())
                    .is_some()
            {
                copies += 1;
            }
            end += 1;
        }
        // Copy out what the other versions still need first, all in one commit.
        let newest = self.newest.load(SeqCst);
        let protect = self.others_share_origin(rb);
        let mut wait = 0;
        for c in start..end {
            if protect
                && !rb.is_restored(c)
                && self
                    .resolve(rb.source, self.map.list(c).as_deref())
                    .is_some()
            {
                wait = wait.max(self.ensure_copied(c, newest)?);
            }
        }
        self.store.wait_durable(wait)?;
        for c in start..end {
            self.restore_chunk(rb, c)?;
        }
        rb.cursor.store(end, SeqCst);
        if end >= self.nchunks {
            drop(_pass);
            self.finish_rollback(rb)?;
        }
        Ok(())
    }

    pub(super) fn finish_rollback(&self, rb: &Arc<RollbackRt>) -> Result<()> {
        if rb.done.load(SeqCst) < rb.total {
            rb.cursor.store(0, SeqCst);
            return Ok(());
        }
        let _ops = lock(&self.ops);
        let _closed = self.gate.close();
        let epoch = {
            let mut m = self.store.lock_meta();
            m.pending_origin_sync.insert(self.slot);
            m.pending.push(Record::RollbackDone { slot: self.slot });
            self.rollback.store(None);
            m.epoch
        };
        self.commit(epoch)?;
        log::info!(
            "origin {}: rollback to snapshot {} finished",
            self.id,
            rb.tag
        );
        self.reclaim_needed.store(true, SeqCst);
        Ok(())
    }
}
