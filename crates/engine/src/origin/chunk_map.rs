use super::*;
use crate::meta::ZERO_CHUNK;
use std::collections::hash_map::RandomState;
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

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

/// What the map knows of one origin chunk. A chunk with no exception and no overlay has no
/// entry: every version reads the origin device there, and it costs nothing.
#[derive(Clone, Default)]
struct Entry {
    /// The exceptions (RCU: a reader keeps the `Arc` it loaded; a change stores a new list).
    list: Option<Arc<ExList>>,
    /// Seq of the newest chain node holding a copy (0: none).
    top: u32,
    /// The commit batch that made that copy durable.
    copy_epoch: u64,
    /// An overlay is pending (see `overlay.rs`).
    overlay: bool,
}

impl Entry {
    fn is_empty(&self) -> bool {
        self.list.as_ref().is_none_or(|l| l.is_empty()) && !self.overlay && self.top == 0
    }
}

/// Shards of the map: a lookup read-locks one (a shared lock, no waiting unless its shard is
/// being changed), so readers of different chunks never contend on one cache line for long.
const SHARDS: usize = 256;

type Shard = HashMap<u64, Entry, RandomState>;

/// The exceptions, copy marks and overlay flags of one origin's chunks, holding only the
/// chunks that have any: its memory follows what changed, not the origin's size (a 1 TiB
/// origin with no snapshot data costs a few KiB). Changes of one chunk happen under its
/// stripe lock (and, for exception lists, the metadata lock); the shard lock only makes each
/// change atomic for lock-free-ish readers.
pub(crate) struct ChunkMap {
    shards: Box<[RwLock<Shard>]>,
    /// Raised overlay flags: incremented before a flag is raised, decremented after it is
    /// cleared, so `0` means "no flag set" and the common case needs no lookup.
    pub(super) overlays: AtomicUsize,
}

impl Default for ChunkMap {
    fn default() -> Self {
        ChunkMap {
            shards: (0..SHARDS)
                .map(|_| RwLock::new(HashMap::with_hasher(RandomState::new())))
                .collect(),
            overlays: AtomicUsize::new(0),
        }
    }
}

impl ChunkMap {
    fn shard(&self, c: u64) -> RwLockReadGuard<'_, Shard> {
        self.shards[(c % SHARDS as u64) as usize]
            .read()
            .unwrap_or_else(|e| e.into_inner())
    }

    fn shard_mut(&self, c: u64) -> RwLockWriteGuard<'_, Shard> {
        self.shards[(c % SHARDS as u64) as usize]
            .write()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Changes chunk `c`'s entry, creating it if absent and dropping it once empty.
    fn update<R>(&self, c: u64, f: impl FnOnce(&mut Entry) -> R) -> R {
        let mut s = self.shard_mut(c);
        let e = s.entry(c).or_default();
        let r = f(e);
        if e.is_empty() {
            s.remove(&c);
        }
        r
    }

    /// The exceptions of chunk `c`.
    pub(super) fn list(&self, c: u64) -> Option<Arc<ExList>> {
        self.shard(c).get(&c).and_then(|e| e.list.clone())
    }

    /// Replaces chunk `c`'s exceptions; its copy mark stays (a copy-out sets it with
    /// `set_copied` once the copy's batch is known).
    pub(super) fn set_list(&self, c: u64, list: Option<Arc<ExList>>) {
        self.update(c, |e| e.list = list.filter(|l| !l.is_empty()))
    }

    /// Replaces chunk `c`'s exceptions and sets its copy mark to the newest chain copy among
    /// them (reclaim, open); the mark's batch stays (a reclaim only drops copies, and the
    /// ones it keeps are no newer than the dropped).
    pub(super) fn set_list_top(&self, c: u64, list: Option<Arc<ExList>>) {
        let list = list.filter(|l| !l.is_empty());
        let top = list
            .as_ref()
            .and_then(|l| l.iter().map(|e| e.seq).max())
            .unwrap_or(0);
        self.update(c, |e| {
            e.list = list;
            e.top = top;
        })
    }

    /// `Some(batch)` if the chain node of seq `newest` holds a copy of chunk `c`, made durable
    /// by commit batch `batch`.
    pub(super) fn copied(&self, c: u64, newest: u32) -> Option<u64> {
        let s = self.shard(c);
        let e = s.get(&c)?;
        (e.top == newest).then_some(e.copy_epoch)
    }

    /// Notes that chain seq `top` holds a copy of chunk `c`, durable with batch `epoch`.
    pub(super) fn set_copied(&self, c: u64, top: u32, epoch: u64) {
        self.update(c, |e| {
            e.top = top;
            e.copy_epoch = epoch;
        })
    }

    /// The commit batch of chunk `c`'s newest chain copy (0: none, or durable since open).
    pub(super) fn copy_epoch(&self, c: u64) -> u64 {
        self.shard(c).get(&c).map_or(0, |e| e.copy_epoch)
    }

    /// Whether an overlay of chunk `c` is pending (no lookup while none is, anywhere).
    pub(super) fn overlay(&self, c: u64) -> bool {
        if self.overlays.load(SeqCst) == 0 {
            return false;
        }
        self.shard(c).get(&c).is_some_and(|e| e.overlay)
    }

    /// Raises or clears chunk `c`'s overlay flag.
    pub(super) fn set_overlay(&self, c: u64, on: bool) {
        if on {
            self.overlays.fetch_add(1, SeqCst);
        }
        let was = self.update(c, |e| std::mem::replace(&mut e.overlay, on));
        if was {
            // Cleared, or raised twice (undo the extra count): one flag less.
            self.overlays.fetch_sub(1, SeqCst);
        }
    }

    /// Chunks with exceptions, with their lists, ascending: what a diff, a reclaim pass, a
    /// census or a checkpoint visits. A snapshot of the map, taken one shard at a time (each
    /// list is one that was current while its shard was read).
    pub(super) fn lists(&self) -> Vec<(u64, Arc<ExList>)> {
        let mut out = Vec::new();
        for s in self.shards.iter() {
            let s = s.read().unwrap_or_else(|e| e.into_inner());
            out.extend(
                s.iter()
                    .filter_map(|(c, e)| e.list.as_ref().map(|l| (*c, l.clone()))),
            );
        }
        out.sort_unstable_by_key(|(c, _)| *c);
        out
    }

    /// Whether any chunk has exceptions.
    pub(super) fn has_lists(&self) -> bool {
        self.shards.iter().any(|s| {
            s.read()
                .unwrap_or_else(|e| e.into_inner())
                .values()
                .any(|e| e.list.is_some())
        })
    }

    /// Chunks with an entry (exceptions, a copy mark or an overlay).
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.read().unwrap_or_else(|e| e.into_inner()).len())
            .sum()
    }
}

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
        if self.map.overlay(c) {
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
            let list = self.map.list(c);
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
                    let after = self.map.list(c);
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
        let old = self.map.list(c);
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
        self.map.set_list(c, Some(Arc::new(l)));
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
        let old = self.map.list(c);
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
        self.map.set_list(c, Some(Arc::new(l)));
        self.note_record(m);
    }
}
