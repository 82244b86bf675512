use super::*;
use crate::meta::ZERO_CHUNK;

/// One exception: `node`'s copy of the chunk is store chunk `store`. `seq` caches the node's
/// chain order (0 for non-chain nodes) so lookups need not touch the node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Ex {
    pub node: u32,
    pub seq: u32,
    pub store: u64,
}

/// The exceptions of one origin chunk. Replaced whole (RCU), never changed in place.
pub(crate) type ExList = Vec<Ex>;

/// Where a version reads one chunk from: the answer of a lookup, taken from one loaded
/// exception list; the I/O happens afterwards, outside any lock.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Mapping {
    /// The origin device, as it is now.
    Origin,
    /// A store chunk.
    Store(u64),
    /// The origin's pending overlay (in memory; no other version reads it).
    Overlay,
    /// Zeros: a zero exception, no store chunk.
    Zero,
}

impl OriginCore {
    /// Where version `node` reads the chunk whose exceptions are `list`.
    pub(super) fn map_version(&self, node: u32, list: Option<&ExList>) -> Mapping {
        match self.resolve(node, list) {
            Some(ZERO_CHUNK) => Mapping::Zero,
            Some(s) => Mapping::Store(s),
            None => Mapping::Origin,
        }
    }

    /// Where the origin volume reads chunk `c` (exceptions `list`): its overlay if one is
    /// pending, the rollback source's view if a rollback has not copied it back yet, else the
    /// origin device.
    pub(super) fn map_origin(&self, c: u64, list: Option<&ExList>) -> Mapping {
        if self.overlay_flag[c as usize].load(SeqCst) {
            return Mapping::Overlay;
        }
        if let Some(rb) = self.rollback.load().as_ref() {
            if !rb.is_restored(c) {
                // Not copied back yet: the origin reads as the rollback source.
                return self.map_version(rb.source, list);
            }
        }
        Mapping::Origin
    }

    /// Reads `node`'s view of chunk `c`, bytes `[within, within+buf.len())`, consistently with
    /// concurrent origin writes (retrying if a copy-out raced the origin read).
    pub fn read_view(
        &self,
        node: u32,
        c: u64,
        within: u64,
        bufs: &mut [std::io::IoSliceMut<'_>],
    ) -> Result<()> {
        loop {
            let list = self.map[c as usize].load();
            match self.map_version(node, list.as_deref()) {
                Mapping::Zero => {
                    for b in bufs.iter_mut() {
                        b.fill(0);
                    }
                    return Ok(());
                }
                Mapping::Store(s) => {
                    let off = self.store_off(s) + within;
                    return self.io(
                        || format!("reading COW store {} at {off}", self.store.name),
                        self.store.storage.read_vectored_at(bufs, off),
                    );
                }
                Mapping::Origin | Mapping::Overlay => {
                    let off = c * self.cs + within;
                    self.io(
                        || format!("reading origin {} at {off}", self.origin.name()),
                        self.origin.read_vectored_at(bufs, off),
                    )?;
                    // A copy-out publishes its exception before the origin is overwritten: if
                    // the list did not change, what we read is still this version's data.
                    let after = self.map[c as usize].load();
                    let same = match (list.as_ref(), after.as_ref()) {
                        (None, None) => true,
                        (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                        _ => false,
                    };
                    if same {
                        return Ok(());
                    }
                }
            }
        }
    }

    /// Publishes an exception and queues its record (metadata lock held).
    pub(super) fn publish(&self, m: &mut MetaCore, c: u64, ex: Ex) {
        self.publish_as(m, c, ex, false)
    }

    /// `publish`; `shared`: the store chunk is the pending overlay's of `c` (a snapshot cut
    /// while it is pending), already allocated, and the record is `ShareOverlay`.
    pub(super) fn publish_as(&self, m: &mut MetaCore, c: u64, ex: Ex, shared: bool) {
        let old = self.map[c as usize].load_full();
        let mut l: ExList = old.as_deref().cloned().unwrap_or_default();
        // A write over the node's zero exception replaces it (`AddException` does the same).
        let was_zero = l.len();
        l.retain(|e| !(e.node == ex.node && e.store == ZERO_CHUNK));
        let was_zero = l.len() != was_zero;
        if was_zero {
            StoreCore::note_zero(m, false);
            if let Some(n) = self.node(ex.node) {
                n.exceptions.fetch_sub(1, SeqCst);
            }
        }
        l.push(ex);
        self.map[c as usize].store(Some(Arc::new(l)));
        lock(&self.excepted).insert(c);
        if let Some(n) = self.node(ex.node) {
            n.exceptions.fetch_add(1, SeqCst);
        }
        self.note_record(m);
        if shared {
            m.pending.push(Record::ShareOverlay {
                slot: self.slot,
                chunk: c,
                node: ex.node,
            });
            return;
        }
        if ex.store == ZERO_CHUNK {
            StoreCore::note_zero(m, true);
            m.pending.push(Record::ZeroException {
                slot: self.slot,
                chunk: c,
                node: ex.node,
            });
            return;
        }
        StoreCore::note_alloc(m, ex.store);
        m.pending.push(Record::AddException {
            slot: self.slot,
            chunk: c,
            node: ex.node,
            store: ex.store,
        });
    }

    pub(super) fn own(list: Option<&ExList>, leaf: u32) -> Option<u64> {
        list?.iter().find(|e| e.node == leaf).map(|e| e.store)
    }

    /// Sets leaf `leaf`'s own exception of chunk `c` to zeros (`zero`), or drops it (metadata
    /// lock held, the chunk's stripe lock too). A data chunk it held is freed through the
    /// deferred-free path: reused only once the record is durable.
    pub(super) fn set_own_zero(&self, m: &mut MetaCore, c: u64, leaf: u32, zero: bool) {
        let old = self.map[c as usize].load_full();
        let mut l: ExList = old.as_deref().cloned().unwrap_or_default();
        let prev = l.iter().position(|e| e.node == leaf).map(|i| l.remove(i));
        if let Some(p) = prev {
            if p.store == ZERO_CHUNK {
                StoreCore::note_zero(m, false);
            } else {
                StoreCore::note_free(m, p.store);
            }
            if let Some(n) = self.node(leaf) {
                n.exceptions.fetch_sub(1, SeqCst);
            }
        }
        if zero {
            l.push(Ex {
                node: leaf,
                seq: 0,
                store: ZERO_CHUNK,
            });
            StoreCore::note_zero(m, true);
            if let Some(n) = self.node(leaf) {
                n.exceptions.fetch_add(1, SeqCst);
            }
            m.pending.push(Record::ZeroException {
                slot: self.slot,
                chunk: c,
                node: leaf,
            });
        } else if prev.is_some() {
            m.pending.push(Record::FreeException {
                slot: self.slot,
                chunk: c,
                node: leaf,
            });
        }
        if l.is_empty() {
            lock(&self.excepted).remove(&c);
            self.map[c as usize].store(None);
        } else {
            lock(&self.excepted).insert(c);
            self.map[c as usize].store(Some(Arc::new(l)));
        }
        self.note_record(m);
    }
}
