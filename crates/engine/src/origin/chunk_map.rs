use super::*;

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
}

impl OriginCore {
    /// Where version `node` reads the chunk whose exceptions are `list`.
    pub(super) fn map_version(&self, node: u32, list: Option<&ExList>) -> Mapping {
        match self.resolve(node, list) {
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
}
