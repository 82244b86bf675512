use super::*;

/// The new content of an origin chunk whose old content was just copied out but whose
/// copy-out record is not durable yet. Reads of the chunk are served from here; the content
/// goes to the origin once batch `epoch` is durable, so the copy always reaches the store's
/// media before the overwrite can reach the origin's. So that an acknowledged write survives
/// the death of the process, the same content is kept in store chunk `store`, named by an
/// OverlayAt record that is in the journal before the write is acknowledged; opening the
/// origin writes any such chunk onto the origin.
///
/// A snapshot cut while the overlay exists gives its store chunk to the new chain node
/// (`ShareOverlay`): `store` becomes `NO_CHUNK`; the journal still names the chunk as the
/// overlay's (a restart writes it onto the origin: it holds the overlay). The next write to the overlay gives it a chunk of its own
/// again (`rehome_overlay`) before it is acknowledged.
pub(super) struct Overlay {
    pub(super) epoch: u64,
    pub(super) data: Vec<u8>,
    pub(super) store: u64,
}

/// `Overlay::store` of an overlay whose chunk a snapshot took.
pub(super) const NO_CHUNK: u64 = u64::MAX;

/// Most memory held by overlays per origin; past it, first writes wait for their commit.
pub(super) const MAX_OVERLAY_BYTES: usize = 64 << 20;

impl OriginCore {
    /// Writes the pending writes a previous process acknowledged (origin chunk → store chunk
    /// holding its content) onto the origin, and syncs it; before the origin is served.
    pub fn write_recovered(&self, pending: &BTreeMap<u64, u64>) -> Result<()> {
        if pending.is_empty() {
            return Ok(());
        }
        let mut buf = vec![0u8; self.cs as usize];
        for (&c, &s) in pending {
            let len = self.chunk_len(c) as usize;
            self.io(
                || format!("reading COW store {} chunk {s}", self.store.name),
                self.store
                    .storage
                    .read_at(&mut buf[..len], self.store_off(s)),
            )?;
            self.io(
                || format!("writing origin {} chunk {c}", self.origin.name()),
                self.origin.write_at(&buf[..len], c * self.cs),
            )?;
        }
        self.io(
            || format!("syncing origin {}", self.origin.name()),
            self.origin.sync(),
        )?;
        log::info!(
            "origin {}: {} acknowledged write(s) of chunks still pending at the last stop written",
            self.id,
            pending.len()
        );
        Ok(())
    }

    /// Writes overlays whose copy-out is durable to the origin. `wait`: take every chunk lock
    /// (callers that hold none); otherwise skip chunks that are busy.
    ///
    /// A chunk keeps its stripe lock and its overlay flag (so no write goes straight to the
    /// origin) until the OverlayDone record is in the journal: a restart must never write the
    /// overlay's store copy over a newer write.
    pub fn drain_overlays(&self, wait: bool) {
        if self.overlay_count.load(SeqCst) == 0 {
            return;
        }
        let durable = self.store.durable_epoch.load(SeqCst);
        let ready: Vec<u64> = lock(&self.overlays)
            .iter()
            .filter(|(_, o)| o.epoch <= durable)
            .map(|(c, _)| *c)
            .collect();
        // Stripes are taken in ascending order, a batch at a time (one journal write each).
        let mut by_stripe: BTreeMap<usize, Vec<u64>> = BTreeMap::new();
        for c in ready {
            by_stripe.entry((c as usize) % STRIPES).or_default().push(c);
        }
        let stripes: Vec<(usize, Vec<u64>)> = by_stripe.into_iter().collect();
        for group in stripes.chunks(64) {
            let mut guards = Vec::with_capacity(group.len());
            let mut done = Vec::new();
            for (stripe, chunks) in group {
                let g = if wait {
                    lock(&self.stripes[*stripe])
                } else {
                    match self.stripes[*stripe].try_lock() {
                        Ok(g) => g,
                        Err(_) => continue,
                    }
                };
                guards.push(g);
                for &c in chunks {
                    let data = match lock(&self.overlays).get(&c) {
                        Some(o) if o.epoch <= durable => o.data.clone(),
                        _ => continue,
                    };
                    if let Err(e) = self.origin.write_at(&data, c * self.cs) {
                        let msg = format!("writing origin {} chunk {c}: {e}", self.origin.name());
                        log::error!("{msg}");
                        *lock(&self.overlay_error) = Some(msg);
                        continue;
                    }
                    done.push((c, data.len()));
                }
            }
            if done.is_empty() {
                continue;
            }
            let epoch = {
                let mut m = self.store.lock_meta();
                let mut ov = lock(&self.overlays);
                for (c, _) in &done {
                    if let Some(o) = ov.remove(c) {
                        // (A shared chunk stays: the snapshot's exception owns it.)
                        if o.store != NO_CHUNK {
                            StoreCore::note_free(&mut m, o.store);
                        }
                        m.pending.push(Record::OverlayDone {
                            slot: self.slot,
                            chunk: *c,
                        });
                    }
                }
                m.epoch
            };
            if let Err(e) = self.store.wait_written(epoch) {
                // The store has failed and refuses every write from now on; the overlays'
                // content is on the origin, where reads find it once the flags drop.
                log::error!("origin {}: recording overlays written: {e}", self.id);
                *lock(&self.overlay_error) = Some(e.to_string());
            }
            for (c, len) in &done {
                self.map.set_overlay(*c, false);
                self.overlay_bytes.fetch_sub(*len, SeqCst);
                self.overlay_count.fetch_sub(1, SeqCst);
            }
            drop(guards);
        }
    }

    /// Gives the overlay of chunk `c`, whose store chunk a snapshot took, a store copy of its
    /// own again (stripe lock of `c` held): a fresh chunk holding the whole overlay, recorded
    /// as `OverlayDone` + `OverlayAt` in one batch (the journal then names the new chunk). With
    /// no free chunk, waits for the chunk's copy-outs to be durable and writes the overlay onto
    /// the origin instead, ending it. Returns the overlay's store chunk, or `None` if it ended;
    /// either way a record must be in the journal before the caller's write is acknowledged.
    pub(super) fn rehome_overlay(&self, c: u64) -> Result<Option<u64>> {
        let (data, epoch) = match lock(&self.overlays).get(&c) {
            Some(o) if o.store == NO_CHUNK => (o.data.clone(), o.epoch),
            Some(o) => return Ok(Some(o.store)),
            None => return Ok(None),
        };
        match self
            .store
            .alloc_chunk(|| format!("overlay of origin {} chunk {c}", self.id))
        {
            Ok(y) => {
                if let Err(e) = self.io(
                    || format!("writing COW store {} chunk {y}", self.store.name),
                    self.store.storage.write_at(&data, self.store_off(y)),
                ) {
                    self.store.unalloc_chunk(y);
                    return Err(e);
                }
                let mut m = self.store.lock_meta();
                let mut ov = lock(&self.overlays);
                let Some(o) = ov.get_mut(&c) else {
                    drop(ov);
                    drop(m);
                    self.store.unalloc_chunk(y);
                    return Err(Error::Corrupt {
                        store: self.store.name.clone(),
                        what: format!("origin {}: overlay of chunk {c} vanished", self.id),
                    });
                };
                StoreCore::note_alloc(&mut m, y);
                self.note_record(&m);
                m.pending.push(Record::OverlayDone {
                    slot: self.slot,
                    chunk: c,
                });
                m.pending.push(Record::OverlayAt {
                    slot: self.slot,
                    chunk: c,
                    store: y,
                });
                o.store = y;
                Ok(Some(y))
            }
            Err(_) => {
                let wait = epoch.max(self.map.copy_epoch(c));
                self.store.wait_durable(wait)?;
                self.io(
                    || format!("writing origin {} chunk {c}", self.origin.name()),
                    self.origin.write_at(&data, c * self.cs),
                )?;
                let epoch = {
                    let mut m = self.store.lock_meta();
                    lock(&self.overlays).remove(&c);
                    m.pending.push(Record::OverlayDone {
                        slot: self.slot,
                        chunk: c,
                    });
                    m.epoch
                };
                self.store.wait_written(epoch)?;
                self.map.set_overlay(c, false);
                self.overlay_bytes.fetch_sub(data.len(), SeqCst);
                self.overlay_count.fetch_sub(1, SeqCst);
                Ok(None)
            }
        }
    }

    /// At a snapshot cut (gate closed, metadata lock held as `m`, chain node `node` of seq
    /// `seq` just pushed): every overlay's store chunk becomes the new node's exception — it
    /// holds exactly the origin's content at the cut — and the overlay keeps its data but
    /// not the chunk (see `Overlay`). Overlays without a chunk must be rehomed first.
    pub(super) fn share_overlays(&self, m: &mut MetaCore, node: u32, seq: u32) {
        let mut ov = lock(&self.overlays);
        for (&c, o) in ov.iter_mut() {
            if o.store == NO_CHUNK {
                debug_assert!(false, "overlay of chunk {c} was not rehomed before the cut");
                continue;
            }
            self.publish_as(
                m,
                c,
                Ex {
                    node,
                    seq,
                    store: o.store,
                },
                true,
            );
            o.store = NO_CHUNK;
            self.map.set_copied(c, seq, m.epoch);
        }
    }

    /// Overlays whose store chunk an earlier snapshot took and that were not written since.
    pub(super) fn detached_overlays(&self) -> Vec<u64> {
        if self.overlay_count.load(SeqCst) == 0 {
            return Vec::new();
        }
        lock(&self.overlays)
            .iter()
            .filter(|(_, o)| o.store == NO_CHUNK)
            .map(|(c, _)| *c)
            .collect()
    }

    /// Commits and writes out every overlay (before an operation that reads the origin device
    /// as the truth: a snapshot, a rollback, a flush).
    pub(super) fn settle_overlays(&self) -> Result<()> {
        if self.overlay_count.load(SeqCst) > 0 {
            self.store.commit_sync()?;
            self.drain_overlays(true);
        }
        if let Some(e) = lock(&self.overlay_error).take() {
            return Err(Error::io(e, std::io::Error::other("overlay write failed")));
        }
        Ok(())
    }

    pub fn origin_flush(&self) -> Result<()> {
        self.check_alive()?;
        self.settle_overlays()?;
        // (Cleared before the sync: a snapshot taken meanwhile raises it again.)
        let cut = self.cut_unsynced.swap(false, SeqCst);
        if let Err(e) = self.io(
            || format!("syncing origin {}", self.origin.name()),
            self.origin.sync(),
        ) {
            if cut {
                self.cut_unsynced.store(true, SeqCst);
            }
            return Err(e);
        }
        // Records an acknowledged write depends on (restored chunks, overlays written) must
        // be durable too, and restored-chunk records with the data they describe.
        if self.store.needs_commit() || self.rollback.load().is_some() {
            self.store.commit_sync()?;
        }
        Ok(())
    }
}
