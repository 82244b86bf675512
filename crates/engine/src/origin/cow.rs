use super::overlay::{MAX_OVERLAY_BYTES, NO_CHUNK};
use super::*;
use crate::meta::ZERO_CHUNK;

impl OriginCore {
    /// Makes sure the newest chain node owns a copy of origin chunk `c`; returns the commit
    /// batch to wait for before the origin chunk may be overwritten (0: none).
    pub fn ensure_copied(&self, c: u64, newest: u32) -> Result<u64> {
        if newest == 0 {
            return Ok(0);
        }
        if let Some(e) = self.map.copied(c, newest) {
            return Ok(e);
        }
        let _g = self.stripe(c);
        self.copy_out_locked(c, newest)
    }

    /// `ensure_copied` with the chunk's stripe lock held.
    pub(super) fn copy_out_locked(&self, c: u64, newest: u32) -> Result<u64> {
        if newest == 0 {
            return Ok(0);
        }
        if let Some(e) = self.map.copied(c, newest) {
            return Ok(e);
        }
        let chain_node = self.tree.chain_node(newest).ok_or_else(|| Error::Corrupt {
            store: self.store.name.clone(),
            what: format!("origin {}: chain seq {newest} has no node", self.id),
        })?;
        // Where a snapshot has its own copy of the chunk, this copy may be read by no one: the
        // conservative rule copies anyway (no census on the write path), and the background
        // reclaim frees it (`shadowed`).
        if self
            .map
            .list(c)
            .as_deref()
            .is_some_and(|l| l.iter().any(|e| e.seq == 0))
        {
            self.shadowed.store(true, SeqCst);
        }
        let len = self.chunk_len(c) as usize;
        let mut buf = vec![0u8; self.cs as usize];
        self.origin
            .read_at(&mut buf[..len], c * self.cs)
            .map_err(|e| {
                Error::io(
                    format!(
                        "reading origin {} chunk {c} for copy-out",
                        self.origin.name()
                    ),
                    e,
                )
            })?;
        // A chunk that reads as zeros (a hole, or zeroed) is copied as a zero exception: no
        // data chunk, no data write.
        let zero = is_zero(&buf[..len]);
        let s = if zero {
            let m = self.store.lock_meta();
            if StoreCore::zero_room(&m) {
                Ok(ZERO_CHUNK)
            } else {
                Err(Error::NoSpace {
                    store: self.store.name.clone(),
                    what: format!(
                        "copy-out of origin {} chunk {c} before an origin write (the write fails)",
                        self.id
                    ),
                })
            }
        } else {
            self.store.alloc_chunk(|| {
                format!(
                    "copy-out of origin {} chunk {c} before an origin write (the write fails)",
                    self.id
                )
            })
        };
        let s = match s {
            Ok(s) => s,
            // With no room, look closer (this costs a walk of the live snapshots): if every
            // snapshot that would inherit the copy has its own, the old data is not needed.
            Err(e) if !self.copy_needed(c, newest) => {
                log::debug!("origin {}: chunk {c} needs no copy-out ({e})", self.id);
                return Ok(0);
            }
            Err(e) => return Err(e),
        };
        if !zero {
            if let Err(e) = self.store.storage.write_at(&buf, self.store_off(s)) {
                self.store.unalloc_chunk(s);
                return Err(Error::io(
                    format!("writing COW store {} chunk {s}", self.store.name),
                    e,
                ));
            }
        }
        let epoch = {
            let mut m = self.store.lock_meta();
            self.publish(
                &mut m,
                c,
                Ex {
                    node: chain_node,
                    seq: newest,
                    store: s,
                },
            );
            m.epoch
        };
        self.store.commit_wake.notify_one();
        self.map.set_copied(c, newest, epoch);
        self.copy_outs
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(epoch)
    }

    /// Whether a copy of origin chunk `c` labelled with chain seq `newest` would be read by
    /// any live snapshot (stripe lock held).
    pub(super) fn copy_needed(&self, c: u64, newest: u32) -> bool {
        let Some(node) = self.tree.chain_node(newest) else {
            return true;
        };
        let mut list: ExList = self.map.list(c).as_deref().cloned().unwrap_or_default();
        let probe = Ex {
            node,
            seq: newest,
            store: u64::MAX,
        };
        list.push(probe);
        self.readers().needed(&list, &probe)
    }

    pub fn origin_read(
        &self,
        offset: u64,
        len: u64,
        bufs: &mut [std::io::IoSliceMut<'_>],
    ) -> Result<()> {
        let rb = self.rollback.load_full();
        if rb.is_none() && self.overlay_count.load(SeqCst) == 0 {
            return self.io(
                || format!("reading origin {} at {offset}", self.origin.name()),
                self.origin.read_vectored_at(bufs, offset),
            );
        }
        let mut done = 0u64;
        for c in self.chunks(offset, len) {
            let start = (c * self.cs).max(offset);
            let end = ((c + 1) * self.cs).min(offset + len);
            let mut piece = crate::iov::piece_mut(bufs, done as usize, (end - start) as usize);
            done += end - start;
            let within = (start - c * self.cs) as usize;
            if self.map.overlay(c) {
                let _g = self.stripe(c);
                if let Some(ov) = lock(&self.overlays).get(&c) {
                    let mut at = within;
                    for b in piece.iter_mut() {
                        let n = b.len();
                        b.copy_from_slice(&ov.data[at..at + n]);
                        at += n;
                    }
                    continue;
                }
            }
            match &rb {
                // During a rollback, chunks not yet copied back read as the snapshot's.
                Some(rb) if !rb.is_restored(c) => {
                    self.read_view(rb.source, c, within as u64, &mut piece)?
                }
                _ => self.io(
                    || format!("reading origin {} at {start}", self.origin.name()),
                    self.origin.read_vectored_at(&mut piece, start),
                )?,
            }
        }
        Ok(())
    }

    pub fn origin_write(&self, offset: u64, len: u64, bufs: &[std::io::IoSlice<'_>]) -> Result<()> {
        loop {
            match self.origin_write_once(offset, len, bufs)? {
                // Outside the gate: a snapshot create does not wait for this commit.
                Some(epoch) => self.store.wait_durable(epoch)?,
                None => return Ok(()),
            }
        }
    }

    /// One attempt at an origin write. `Some(epoch)`: nothing of it landed; it must wait for
    /// batch `epoch` (a copy-out it needs an overlay for, and there is no room for one) and
    /// start again.
    fn origin_write_once(
        &self,
        offset: u64,
        len: u64,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Result<Option<u64>> {
        let _pass = self.gate.enter();
        self.check_alive()?;
        let mut newest = self.newest.load(SeqCst);
        if !self.dirty.load(std::sync::atomic::Ordering::Relaxed) {
            self.dirty.store(true, SeqCst);
        }
        let write_all = |bufs: &[std::io::IoSlice<'_>], at: u64| {
            self.io(
                || format!("writing origin {} at {at}", self.origin.name()),
                self.origin.write_vectored_at(bufs, at),
            )
        };
        if let Some(rb) = self.rollback.load_full() {
            // During a rollback: restore first, and wait for copy-outs (no overlays).
            let mut wait = 0;
            for c in self.chunks(offset, len) {
                self.restore_chunk(&rb, c)?;
                wait = wait.max(self.ensure_copied(c, newest)?);
            }
            self.store.wait_durable(wait)?;
            write_all(bufs, offset)?;
            // The restored marks: without them a restart would copy the snapshot's chunk
            // back over this write.
            return self.records_written().map(|_| None);
        }
        if self.live_snaps.load(SeqCst) == 0 && self.dying_count.load(SeqCst) == 0 {
            // No snapshot left (a new one would wait at the gate): nobody needs a copy.
            newest = 0;
        }
        let in_place = |c: u64, durable: u64| {
            !self.map.overlay(c)
                && (newest == 0 || self.map.copied(c, newest).is_some_and(|e| e <= durable))
        };
        let durable = self.store.durable_epoch.load(SeqCst);
        if self.chunks(offset, len).all(|c| in_place(c, durable)) {
            write_all(bufs, offset)?;
            // The fix-ups under the gate: a snapshot cut meanwhile must see this write in any
            // overlay it takes, as it sees it on the origin.
            let wait_records = self.after_direct_write(offset, len, bufs)?;
            drop(_pass);
            if wait_records {
                self.records_written()?;
            }
            return Ok(None);
        }
        // Copy out first, every chunk: a full store fails the write before any of it lands.
        for c in self.chunks(offset, len) {
            self.ensure_copied(c, newest)?;
        }
        // The store chunks of the overlays this write starts, also before any of it lands:
        // with no room for one (the overlay budget spent, or no free chunk) the write waits
        // for its copy-outs' commit outside the gate and starts again, so that a snapshot
        // create never waits behind a commit (the cut stays exact: nothing of it landed).
        let mut spare = match self.overlay_chunks(offset, len, newest) {
            Ok(spare) => spare,
            Err(epoch) => return Ok(Some(epoch)),
        };
        let r = self.write_with_overlays(offset, len, bufs, newest, &mut spare);
        for s in spare {
            self.store.unalloc_chunk(s);
        }
        let wait_records = r?;
        if wait_records {
            drop(_pass);
            self.records_written()?;
        }
        Ok(None)
    }

    /// Store chunks for the overlays an origin write will start (see `origin_write_once`), or
    /// the batch to wait for when there is no room for them.
    fn overlay_chunks(
        &self,
        offset: u64,
        len: u64,
        newest: u32,
    ) -> std::result::Result<Vec<u64>, u64> {
        let durable = self.store.durable_epoch.load(SeqCst);
        let mut need = Vec::new();
        let mut bytes = 0;
        let mut wait = 0;
        for c in self.chunks(offset, len) {
            if newest == 0 || self.map.overlay(c) {
                continue;
            }
            let e = self.map.copied(c, newest).unwrap_or(0);
            if e <= durable {
                continue;
            }
            need.push(c);
            bytes += self.chunk_len(c) as usize;
            wait = wait.max(e);
        }
        if need.is_empty() {
            return Ok(Vec::new());
        }
        if self.overlay_bytes.load(SeqCst) + bytes > MAX_OVERLAY_BYTES {
            return Err(wait);
        }
        self.store
            .alloc_chunks(need.len(), || {
                format!("overlays of origin {} at byte {offset}", self.id)
            })
            .map_err(|_| wait)
    }

    /// The rest of an origin write whose chunks are copied out; `spare`: store chunks for its
    /// overlays. Returns whether overlay records must be waited for.
    fn write_with_overlays(
        &self,
        offset: u64,
        len: u64,
        bufs: &[std::io::IoSlice<'_>],
        newest: u32,
        spare: &mut Vec<u64>,
    ) -> Result<bool> {
        let write_all = |bufs: &[std::io::IoSlice<'_>], at: u64| {
            self.io(
                || format!("writing origin {} at {at}", self.origin.name()),
                self.origin.write_vectored_at(bufs, at),
            )
        };
        let in_place = |c: u64, durable: u64| {
            !self.map.overlay(c)
                && (newest == 0 || self.map.copied(c, newest).is_some_and(|e| e <= durable))
        };
        let mut wait_records = false;
        let mut done = 0u64;
        for c in self.chunks(offset, len) {
            let start = (c * self.cs).max(offset);
            let end = ((c + 1) * self.cs).min(offset + len);
            let piece = crate::iov::piece(bufs, done as usize, (end - start) as usize);
            done += end - start;
            if in_place(c, self.store.durable_epoch.load(SeqCst)) {
                write_all(&piece, start)?;
                wait_records |= self.fix_up_direct(c, start, end - start, &piece)?;
                continue;
            }
            let _g = self.stripe(c);
            // The copy made above, unless reclaim has since found that no version needs it
            // (then nothing needs the old data either).
            let e = self.map.copied(c, newest).unwrap_or(0);
            let within = (start - c * self.cs) as usize;
            let plen = (end - start) as usize;
            let overlay_store = lock(&self.overlays).get_mut(&c).map(|ov| {
                crate::iov::gather(&piece, &mut ov.data[within..within + plen]);
                ov.epoch = ov.epoch.max(e);
                ov.store
            });
            if overlay_store == Some(NO_CHUNK) {
                // A snapshot took the overlay's chunk: the whole overlay (this piece in it)
                // goes to a new one, or onto the origin.
                self.rehome_overlay(c)?;
                wait_records = true;
                continue;
            }
            if let Some(s) = overlay_store {
                // The store's copy of the overlay too (the stripe lock orders these writes).
                let off = self.store_off(s) + within as u64;
                self.io(
                    || format!("writing COW store {} at {off}", self.store.name),
                    self.store.storage.write_vectored_at(&piece, off),
                )?;
                wait_records = true;
                continue;
            }
            if e <= self.store.durable_epoch.load(SeqCst) {
                write_all(&piece, start)?;
                continue;
            }
            let clen = self.chunk_len(c) as usize;
            let store_chunk = match spare.pop() {
                Some(s) => Some(s),
                // An overlay `overlay_chunks` counted on was written out meanwhile (rare).
                None if self.overlay_bytes.load(SeqCst) + clen > MAX_OVERLAY_BYTES => None,
                None => self
                    .store
                    .alloc_chunk(|| format!("overlay of origin {} chunk {c}", self.id))
                    .ok(),
            };
            let Some(s) = store_chunk else {
                // No room for the overlay's store copy: wait for the commit instead (under
                // the gate, as part of this write may have landed; `overlay_chunks` makes
                // this rare).
                self.store.wait_durable(e)?;
                write_all(&piece, start)?;
                continue;
            };
            // Raised before the origin is read: a writer that wrote the origin directly
            // meanwhile sees it afterwards and patches the overlay (`fix_up_direct`).
            self.map.set_overlay(c, true);
            // The origin chunk still holds the data just copied out: start from it.
            let mut data = vec![0u8; clen];
            let r = self
                .io(
                    || format!("reading origin {} chunk {c}", self.origin.name()),
                    self.origin.read_at(&mut data, c * self.cs),
                )
                .and_then(|_| {
                    crate::iov::gather(&piece, &mut data[within..within + plen]);
                    self.io(
                        || format!("writing COW store {} chunk {s}", self.store.name),
                        self.store.storage.write_at(&data, self.store_off(s)),
                    )
                });
            if let Err(err) = r {
                self.map.set_overlay(c, false);
                self.store.unalloc_chunk(s);
                return Err(err);
            }
            {
                let mut m = self.store.lock_meta();
                StoreCore::note_alloc(&mut m, s);
                self.note_record(&m);
                m.pending.push(Record::OverlayAt {
                    slot: self.slot,
                    chunk: c,
                    store: s,
                });
                lock(&self.overlays).insert(
                    c,
                    Overlay {
                        epoch: e,
                        data,
                        store: s,
                    },
                );
            }
            self.overlay_bytes.fetch_add(clen, SeqCst);
            self.overlay_count.fetch_add(1, SeqCst);
            self.store.commit_wake.notify_one();
            wait_records = true;
        }
        Ok(wait_records)
    }

    /// After a write that went straight to the origin (no chunk lock): a writer may have
    /// started an overlay of one of its chunks meanwhile, from origin data read before this
    /// write landed. Patch such overlays (see `fix_up_direct`); returns whether an overlay
    /// record must be in the journal before the write is acknowledged.
    pub(super) fn after_direct_write(
        &self,
        offset: u64,
        len: u64,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Result<bool> {
        let mut wait_records = false;
        let mut done = 0u64;
        for c in self.chunks(offset, len) {
            let start = (c * self.cs).max(offset);
            let end = ((c + 1) * self.cs).min(offset + len);
            if self.map.overlay(c) {
                let piece = crate::iov::piece(bufs, done as usize, (end - start) as usize);
                wait_records |= self.fix_up_direct(c, start, end - start, &piece)?;
            }
            done += end - start;
        }
        Ok(wait_records)
    }

    /// `piece` (bytes `start..start + len` of chunk `c`) was just written straight to the
    /// origin. If an overlay of `c` was started meanwhile, it may lack the piece: put the piece
    /// into the overlay (and its store copy), or, if the overlay was already written out over
    /// it, onto the origin again. Returns whether an overlay record must be waited for.
    pub(super) fn fix_up_direct(
        &self,
        c: u64,
        start: u64,
        len: u64,
        piece: &[std::io::IoSlice<'_>],
    ) -> Result<bool> {
        if !self.map.overlay(c) {
            return Ok(false);
        }
        let _g = self.stripe(c);
        let within = (start - c * self.cs) as usize;
        let store = lock(&self.overlays).get_mut(&c).map(|ov| {
            crate::iov::gather(piece, &mut ov.data[within..within + len as usize]);
            ov.store
        });
        if store == Some(NO_CHUNK) {
            self.rehome_overlay(c)?;
            return Ok(true);
        }
        match store {
            Some(s) => {
                let off = self.store_off(s) + within as u64;
                self.io(
                    || format!("writing COW store {} at {off}", self.store.name),
                    self.store.storage.write_vectored_at(piece, off),
                )?;
                Ok(true)
            }
            None => {
                self.io(
                    || format!("writing origin {} at {start}", self.origin.name()),
                    self.origin.write_vectored_at(piece, start),
                )?;
                Ok(false)
            }
        }
    }

    pub fn snap_read(
        &self,
        snap: &SnapRt,
        offset: u64,
        len: u64,
        bufs: &mut [std::io::IoSliceMut<'_>],
    ) -> Result<()> {
        if snap.deleted.load(SeqCst) {
            return Err(Error::Deleted(format!(
                "snapshot {} of origin {}",
                snap.tag, self.id
            )));
        }
        let leaf = snap.leaf.load(SeqCst);
        let mut done = 0u64;
        for c in self.chunks(offset, len) {
            let start = (c * self.cs).max(offset);
            let end = ((c + 1) * self.cs).min(offset + len);
            let mut piece = crate::iov::piece_mut(bufs, done as usize, (end - start) as usize);
            self.read_view(leaf, c, start - c * self.cs, &mut piece)?;
            done += end - start;
        }
        Ok(())
    }

    pub fn snap_write(
        &self,
        snap: &SnapRt,
        offset: u64,
        len: u64,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Result<()> {
        let _pass = snap.gate.enter();
        if snap.deleted.load(SeqCst) {
            return Err(Error::Deleted(format!(
                "snapshot {} of origin {}",
                snap.tag, self.id
            )));
        }
        self.check_alive()?;
        let leaf = snap.leaf.load(SeqCst);
        // Take every chunk this write may need up front, so that a full store fails the
        // write before any of it lands.
        let need = self
            .chunks(offset, len)
            .filter(|&c| {
                Self::own(self.map.list(c).as_deref(), leaf).is_none_or(|s| s == ZERO_CHUNK)
            })
            .count();
        let mut spare = self.store.alloc_chunks(need, || {
            format!(
                "write of snapshot {} of origin {} at byte {offset} needs {need} new chunks (the write fails)",
                snap.tag, self.id
            )
        })?;
        let mut done = 0u64;
        let mut r = Ok(());
        for c in self.chunks(offset, len) {
            let start = (c * self.cs).max(offset);
            let end = ((c + 1) * self.cs).min(offset + len);
            let piece = crate::iov::piece(bufs, done as usize, (end - start) as usize);
            r = self.snap_write_chunk(leaf, c, start - c * self.cs, &piece, &mut spare);
            if r.is_err() {
                break;
            }
            done += end - start;
        }
        for s in spare {
            self.store.unalloc_chunk(s);
        }
        r?;
        // The exceptions this write (or a concurrent first write to a chunk it wrote in
        // place) created must be in the journal before the write is acknowledged.
        drop(_pass);
        self.records_written()
    }

    pub(super) fn snap_write_chunk(
        &self,
        leaf: u32,
        c: u64,
        within: u64,
        piece: &[std::io::IoSlice<'_>],
        spare: &mut Vec<u64>,
    ) -> Result<()> {
        let in_place = |s: u64| {
            let off = self.store_off(s) + within;
            self.io(
                || format!("writing COW store {} at {off}", self.store.name),
                self.store.storage.write_vectored_at(piece, off),
            )
        };
        // A zero exception has no chunk to write in: the write gives it one, as a first write.
        let own = |l: Option<&ExList>| Self::own(l, leaf).filter(|s| *s != ZERO_CHUNK);
        if let Some(s) = own(self.map.list(c).as_deref()) {
            return in_place(s);
        }
        let _g = self.stripe(c);
        if let Some(s) = own(self.map.list(c).as_deref()) {
            return in_place(s);
        }
        // First write of this snapshot to this chunk: give it a private copy. A chain copy it
        // shadowed may now be read by no one: the background reclaim looks (`shadowed`).
        if self
            .map
            .list(c)
            .as_deref()
            .is_some_and(|l| l.iter().any(|e| e.seq > 0))
        {
            self.shadowed.store(true, SeqCst);
        }
        let s = match spare.pop() {
            Some(s) => s,
            // A concurrent writer of this snapshot took a chunk we counted on: take another.
            None => self.store.alloc_chunk(|| {
                format!(
                    "first write of a snapshot of origin {} to chunk {c} (the write fails)",
                    self.id
                )
            })?,
        };
        let clen = self.chunk_len(c) as usize;
        let plen: usize = piece.iter().map(|b| b.len()).sum();
        let r = (|| {
            let mut buf = vec![0u8; self.cs as usize];
            if plen < clen {
                // Under the stripe lock no copy-out of this chunk can run, so the view is stable.
                self.read_view(
                    leaf,
                    c,
                    0,
                    &mut [std::io::IoSliceMut::new(&mut buf[..clen])],
                )?;
            }
            crate::iov::gather(piece, &mut buf[within as usize..within as usize + plen]);
            self.io(
                || format!("writing COW store {} chunk {s}", self.store.name),
                self.store.storage.write_at(&buf, self.store_off(s)),
            )
        })();
        if let Err(e) = r {
            self.store.unalloc_chunk(s);
            return Err(e);
        }
        let mut m = self.store.lock_meta();
        self.publish(
            &mut m,
            c,
            Ex {
                node: leaf,
                seq: 0,
                store: s,
            },
        );
        Ok(())
    }
}

/// Whether every byte is zero (the first word alone settles most chunks that hold data).
pub(super) fn is_zero(buf: &[u8]) -> bool {
    let (head, rest) = buf.split_at(buf.len().min(8));
    head.iter().all(|b| *b == 0) && rest.iter().fold(0u8, |a, b| a | b) == 0
}
