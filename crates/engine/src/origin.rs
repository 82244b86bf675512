//! One origin at run time: its version tree, its lock-free chunk map, copy-out, snapshot
//! operations, live rollback and reclaim. `docs/design.md` explains the rules.

use crate::error::{Error, Result};
use crate::format::{Record, MAX_MEMO};
use crate::gate::IoGate;
use crate::meta::{bit_get, NodeKind, NodeMeta, OriginMeta, RollbackMeta, ROOT};
use crate::storage::Storage;
use crate::store::{MetaCore, StoreCore};
use arc_swap::ArcSwapOption;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{
    AtomicBool, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering::SeqCst,
};
use std::sync::{Arc, Mutex, MutexGuard};

mod diff;
const STRIPES: usize = 1024;

/// A version node at run time. Only `kind`, `dead` and `exceptions` change after creation.
pub(crate) struct NodeRt {
    kind: AtomicU8,
    dead: AtomicBool,
    parent: u32,
    seq: u32,
    tag: u32,
    parent_tag: u32,
    birth: u64,
    memo: String,
    /// Exceptions labelled with this node (for "exclusive chunks" and reclaim progress).
    exceptions: AtomicU64,
}

impl NodeRt {
    fn from_meta(m: &NodeMeta) -> Self {
        NodeRt {
            kind: AtomicU8::new(m.kind as u8),
            dead: AtomicBool::new(m.dead),
            parent: m.parent,
            seq: m.seq,
            tag: m.tag,
            parent_tag: m.parent_tag,
            birth: m.birth,
            memo: m.memo.clone(),
            exceptions: AtomicU64::new(0),
        }
    }

    fn to_meta(&self) -> NodeMeta {
        NodeMeta {
            kind: NodeKind::from_u8(self.kind.load(SeqCst)).unwrap_or(NodeKind::Frozen),
            dead: self.dead.load(SeqCst),
            parent: self.parent,
            seq: self.seq,
            tag: self.tag,
            parent_tag: self.parent_tag,
            birth: self.birth,
            memo: self.memo.clone(),
        }
    }

    fn kind(&self) -> NodeKind {
        NodeKind::from_u8(self.kind.load(SeqCst)).unwrap_or(NodeKind::Frozen)
    }
}

/// A live snapshot: its tag and the leaf that takes its writes.
pub(crate) struct SnapRt {
    pub tag: u32,
    pub leaf: AtomicU32,
    pub gate: IoGate,
    pub deleted: AtomicBool,
}

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

/// Rollback in progress.
pub(crate) struct RollbackRt {
    pub tag: u32,
    pub source: u32,
    restored: Vec<AtomicU64>,
    done: AtomicU64,
    total: u64,
    cursor: AtomicU64,
    /// Why the copy-back cannot go on (the store is full); cleared by progress.
    stalled: Mutex<Option<Error>>,
}

impl RollbackRt {
    fn is_restored(&self, c: u64) -> bool {
        self.restored[(c / 64) as usize].load(SeqCst) & (1 << (c % 64)) != 0
    }
    fn set_restored(&self, c: u64) {
        self.restored[(c / 64) as usize].fetch_or(1 << (c % 64), SeqCst);
        self.done.fetch_add(1, SeqCst);
    }
}

/// Rollback progress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RollbackProgress {
    /// The snapshot the origin is rolled back to.
    pub tag: u32,
    /// Chunks copied back (or found identical) so far.
    pub chunks_done: u64,
    /// Chunks of the origin.
    pub chunks_total: u64,
}

/// A snapshot as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// Tag.
    pub tag: u32,
    /// The snapshot it was taken of; `None`: the origin.
    pub parent: Option<u32>,
    /// Memo.
    pub memo: String,
    /// Birth time, seconds since the Unix epoch.
    pub birth_unix_secs: u64,
    /// Store chunks that only this snapshot reads: what deleting it would free.
    pub exclusive_chunks: u64,
}

/// An origin's state.
#[derive(Debug, Clone)]
pub struct OriginStatus {
    /// The origin id.
    pub origin_id: String,
    /// The origin's file or device.
    pub origin_path: String,
    /// Size in bytes.
    pub size: u64,
    /// Live snapshots.
    pub snapshots: usize,
    /// Rollback in progress.
    pub rollback: Option<RollbackProgress>,
    /// Store chunks still held by deleted snapshots, to be freed by the background reclaim.
    pub reclaim_pending_chunks: u64,
}

/// One opened origin.
pub(crate) struct OriginCore {
    pub store: Arc<StoreCore>,
    pub slot: u32,
    pub id: String,
    pub size: u64,
    pub nchunks: u64,
    cs: u64,
    pub origin: Arc<dyn Storage>,
    nodes: boxcar::Vec<NodeRt>,
    /// Chain node ids by seq - 1.
    chain: boxcar::Vec<u32>,
    map: Box<[ArcSwapOption<ExList>]>,
    /// The chunks whose exception list is not empty: what a diff visits, so that its cost
    /// follows the exceptions rather than the origin's size (updated under the metadata lock).
    excepted: Mutex<std::collections::BTreeSet<u64>>,
    /// Per chunk: seq of the newest chain node holding a copy of it.
    top: Box<[AtomicU32]>,
    /// Per chunk: the commit batch that made that copy durable.
    copy_epoch: Box<[AtomicU64]>,
    newest: AtomicU32,
    pub gate: IoGate,
    stripes: Box<[Mutex<()>]>,
    ops: Mutex<()>,
    snaps: Mutex<BTreeMap<u32, Arc<SnapRt>>>,
    next_tag: AtomicU32,
    pub rollback: ArcSwapOption<RollbackRt>,
    reclaim_needed: AtomicBool,
    reclaim_running: AtomicBool,
    /// Live snapshots (the size of `snaps`), read on the write path without its lock.
    live_snaps: AtomicUsize,
    unbound: AtomicBool,
    /// Origin writes waiting for their chunk's copy-out to become durable (see `Overlay`).
    overlays: Mutex<BTreeMap<u64, Overlay>>,
    overlay_flag: Box<[AtomicBool]>,
    overlay_count: AtomicUsize,
    overlay_bytes: AtomicUsize,
    /// An overlay that could not be written to the origin: reported by the next flush.
    overlay_error: Mutex<Option<String>>,
    /// The newest commit batch holding a record that an acknowledged write of this origin or
    /// its snapshots depends on (an exception, an overlay, a restored chunk): a write waits
    /// until that batch is in the journal before it is acknowledged.
    record_epoch: AtomicU64,
    /// Written since the background sync last ran (that sync keeps the dirty data a snapshot
    /// must sync small).
    dirty: AtomicBool,
    last_sync: Mutex<std::time::Instant>,
}

/// The new content of an origin chunk whose old content was just copied out but whose
/// copy-out record is not durable yet. Reads of the chunk are served from here; the content
/// goes to the origin once batch `epoch` is durable, so the copy always reaches the store's
/// media before the overwrite can reach the origin's. So that an acknowledged write survives
/// the death of the process, the same content is kept in store chunk `store`, named by an
/// OverlayAt record (batch `rec_epoch`) that is in the journal before the write is
/// acknowledged; opening the origin again writes any such chunk onto the origin.
struct Overlay {
    epoch: u64,
    data: Vec<u8>,
    store: u64,
}

/// Most memory held by overlays per origin; past it, first writes wait for their commit.
const MAX_OVERLAY_BYTES: usize = 64 << 20;

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl OriginCore {
    /// Builds the run-time structures from metadata.
    pub fn build(
        store: Arc<StoreCore>,
        slot: u32,
        m: &OriginMeta,
        origin: Arc<dyn Storage>,
    ) -> Result<Arc<Self>> {
        let cs = store.layout.chunk_size as u64;
        let nchunks = m.nchunks(cs as u32);
        let nodes = boxcar::Vec::new();
        let chain = boxcar::Vec::new();
        for n in &m.nodes {
            let i = nodes.push(NodeRt::from_meta(n));
            if n.kind == NodeKind::Chain {
                chain.push(i as u32);
            }
        }
        let map: Box<[ArcSwapOption<ExList>]> =
            (0..nchunks).map(|_| ArcSwapOption::empty()).collect();
        let mut excepted = std::collections::BTreeSet::new();
        let top: Box<[AtomicU32]> = (0..nchunks).map(|_| AtomicU32::new(0)).collect();
        let copy_epoch: Box<[AtomicU64]> = (0..nchunks).map(|_| AtomicU64::new(0)).collect();
        for (chunk, list) in &m.exceptions {
            let mut l = ExList::with_capacity(list.len());
            let mut t = 0;
            for (node, s) in list {
                let n = &m.nodes[*node as usize];
                let seq = if n.kind == NodeKind::Chain { n.seq } else { 0 };
                t = t.max(seq);
                l.push(Ex {
                    node: *node,
                    seq,
                    store: *s,
                });
                if let Some(nr) = nodes.get(*node as usize) {
                    nr.exceptions.fetch_add(1, SeqCst);
                }
            }
            map[*chunk as usize].store(Some(Arc::new(l)));
            excepted.insert(*chunk);
            top[*chunk as usize].store(t, SeqCst);
        }
        let snaps = m
            .tags
            .iter()
            .map(|(tag, leaf)| {
                (
                    *tag,
                    Arc::new(SnapRt {
                        tag: *tag,
                        leaf: AtomicU32::new(*leaf),
                        gate: IoGate::default(),
                        deleted: AtomicBool::new(false),
                    }),
                )
            })
            .collect();
        let rollback = m.rollback.as_ref().map(|r| {
            let restored: Vec<AtomicU64> = r.restored.iter().map(|w| AtomicU64::new(*w)).collect();
            let done = (0..nchunks).filter(|c| bit_get(&r.restored, *c)).count() as u64;
            Arc::new(RollbackRt {
                tag: r.tag,
                source: r.source,
                restored,
                done: AtomicU64::new(done),
                total: nchunks,
                cursor: AtomicU64::new(0),
                stalled: Mutex::new(None),
            })
        });
        let has_dead = m.nodes.iter().any(|n| n.dead);
        Ok(Arc::new(OriginCore {
            store,
            slot,
            id: m.id.clone(),
            size: m.size,
            nchunks,
            cs,
            origin,
            nodes,
            chain,
            map,
            excepted: Mutex::new(excepted),
            top,
            copy_epoch,
            newest: AtomicU32::new(m.newest_seq),
            gate: IoGate::default(),
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            ops: Mutex::new(()),
            snaps: Mutex::new(snaps),
            next_tag: AtomicU32::new(m.next_tag),
            rollback: ArcSwapOption::new(rollback),
            reclaim_needed: AtomicBool::new(has_dead),
            reclaim_running: AtomicBool::new(false),
            live_snaps: AtomicUsize::new(m.tags.len()),
            unbound: AtomicBool::new(false),
            overlays: Mutex::new(BTreeMap::new()),
            overlay_flag: (0..nchunks).map(|_| AtomicBool::new(false)).collect(),
            overlay_count: AtomicUsize::new(0),
            overlay_bytes: AtomicUsize::new(0),
            overlay_error: Mutex::new(None),
            record_epoch: AtomicU64::new(0),
            dirty: AtomicBool::new(false),
            last_sync: Mutex::new(std::time::Instant::now()),
        }))
    }

    /// The metadata, for a checkpoint (called with the metadata lock held).
    pub fn to_meta(&self) -> OriginMeta {
        let nodes: Vec<NodeMeta> = (0..self.nodes.count())
            .filter_map(|i| self.nodes.get(i).map(|n| n.to_meta()))
            .collect();
        let tags = lock(&self.snaps)
            .values()
            .map(|s| (s.tag, s.leaf.load(SeqCst)))
            .collect();
        let mut exceptions = BTreeMap::new();
        for (c, slot) in self.map.iter().enumerate() {
            if let Some(l) = slot.load().as_ref() {
                if !l.is_empty() {
                    exceptions.insert(c as u64, l.iter().map(|e| (e.node, e.store)).collect());
                }
            }
        }
        let rollback = self.rollback.load().as_ref().map(|r| RollbackMeta {
            tag: r.tag,
            source: r.source,
            restored: r.restored.iter().map(|w| w.load(SeqCst)).collect(),
        });
        // Overlays enter and leave this map in the metadata lock's critical section that
        // records it, so the map matches the records.
        let overlays = lock(&self.overlays)
            .iter()
            .map(|(c, o)| (*c, o.store))
            .collect();
        OriginMeta {
            id: self.id.clone(),
            size: self.size,
            next_tag: self.next_tag.load(SeqCst),
            newest_seq: self.newest.load(SeqCst),
            nodes,
            tags,
            exceptions,
            rollback,
            overlays,
        }
    }

    /// Notes that an acknowledged write depends on a record queued now (metadata lock held).
    fn note_record(&self, m: &MetaCore) {
        self.record_epoch.fetch_max(m.epoch, SeqCst);
    }

    /// Waits until every record an acknowledged write may depend on is in the journal.
    fn records_written(&self) -> Result<()> {
        self.store.wait_written(self.record_epoch.load(SeqCst))
    }

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

    fn node(&self, i: u32) -> Option<&NodeRt> {
        self.nodes.get(i as usize)
    }

    fn stripe(&self, c: u64) -> MutexGuard<'_, ()> {
        lock(&self.stripes[(c as usize) % STRIPES])
    }

    /// Bytes of origin chunk `c` (the last may be short).
    pub fn chunk_len(&self, c: u64) -> u64 {
        (self.size - c * self.cs).min(self.cs)
    }

    pub fn chunk_size(&self) -> u64 {
        self.cs
    }

    pub fn check_alive(&self) -> Result<()> {
        if self.unbound.load(SeqCst) {
            return Err(Error::Deleted(format!("origin {}", self.id)));
        }
        self.store.check_failed()
    }

    pub fn sync_origin(&self) -> std::io::Result<()> {
        self.origin.sync()
    }

    /// Where `node` finds chunk `c`: a store chunk, or `None` for the origin device.
    ///
    /// Walk up from `node` to the first version with an exception. Once the walk reaches a
    /// chain node of seq `s`, the answer is the chain exception with the smallest seq ≥ `s`:
    /// a chain node inherits from every newer one.
    pub fn resolve(&self, mut node: u32, list: Option<&ExList>) -> Option<u64> {
        let list = list?;
        loop {
            let n = self.node(node)?;
            match n.kind() {
                NodeKind::Chain => {
                    return list
                        .iter()
                        .filter(|e| e.seq >= n.seq && e.seq > 0)
                        .min_by_key(|e| e.seq)
                        .map(|e| e.store);
                }
                NodeKind::Origin => return None,
                NodeKind::Leaf | NodeKind::Frozen => {
                    if let Some(e) = list.iter().find(|e| e.node == node) {
                        return Some(e.store);
                    }
                    node = n.parent;
                }
            }
        }
    }

    fn store_off(&self, s: u64) -> u64 {
        self.store.layout.chunk_offset(s)
    }

    fn io<T>(&self, what: impl FnOnce() -> String, r: std::io::Result<T>) -> Result<T> {
        r.map_err(|e| Error::io(what(), e))
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
            match self.resolve(node, list.as_deref()) {
                Some(s) => {
                    let off = self.store_off(s) + within;
                    return self.io(
                        || format!("reading COW store {} at {off}", self.store.name),
                        self.store.storage.read_vectored_at(bufs, off),
                    );
                }
                None => {
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
    fn publish(&self, m: &mut MetaCore, c: u64, ex: Ex) {
        let old = self.map[c as usize].load_full();
        let mut l: ExList = old.as_deref().cloned().unwrap_or_default();
        l.push(ex);
        self.map[c as usize].store(Some(Arc::new(l)));
        lock(&self.excepted).insert(c);
        if let Some(n) = self.node(ex.node) {
            n.exceptions.fetch_add(1, SeqCst);
        }
        StoreCore::note_alloc(m, ex.store);
        self.note_record(m);
        m.pending.push(Record::AddException {
            slot: self.slot,
            chunk: c,
            node: ex.node,
            store: ex.store,
        });
    }

    /// Makes sure the newest chain node owns a copy of origin chunk `c`; returns the commit
    /// batch to wait for before the origin chunk may be overwritten (0: none).
    pub fn ensure_copied(&self, c: u64, newest: u32) -> Result<u64> {
        if newest == 0 {
            return Ok(0);
        }
        if self.top[c as usize].load(SeqCst) == newest {
            return Ok(self.copy_epoch[c as usize].load(SeqCst));
        }
        let _g = self.stripe(c);
        self.copy_out_locked(c, newest)
    }

    /// `ensure_copied` with the chunk's stripe lock held.
    fn copy_out_locked(&self, c: u64, newest: u32) -> Result<u64> {
        if newest == 0 {
            return Ok(0);
        }
        if self.top[c as usize].load(SeqCst) == newest {
            return Ok(self.copy_epoch[c as usize].load(SeqCst));
        }
        let chain_node = *self
            .chain
            .get(newest as usize - 1)
            .ok_or_else(|| Error::Corrupt {
                store: self.store.name.clone(),
                what: format!("origin {}: chain seq {newest} has no node", self.id),
            })?;
        let s = match self.store.alloc_chunk(|| {
            format!(
                "copy-out of origin {} chunk {c} before an origin write (the write fails)",
                self.id
            )
        }) {
            Ok(s) => s,
            // With no room, look closer (this costs a walk of the live snapshots): if every
            // snapshot that would inherit the copy has its own, the old data is not needed.
            Err(e) if !self.copy_needed(c, newest) => {
                log::debug!("origin {}: chunk {c} needs no copy-out ({e})", self.id);
                return Ok(0);
            }
            Err(e) => return Err(e),
        };
        let len = self.chunk_len(c) as usize;
        let mut buf = vec![0u8; self.cs as usize];
        let r = self
            .origin
            .read_at(&mut buf[..len], c * self.cs)
            .map_err(|e| {
                Error::io(
                    format!(
                        "reading origin {} chunk {c} for copy-out",
                        self.origin.name()
                    ),
                    e,
                )
            })
            .and_then(|_| {
                self.store
                    .storage
                    .write_at(&buf, self.store_off(s))
                    .map_err(|e| {
                        Error::io(
                            format!("writing COW store {} chunk {s}", self.store.name),
                            e,
                        )
                    })
            });
        if let Err(e) = r {
            self.store.unalloc_chunk(s);
            return Err(e);
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
        self.copy_epoch[c as usize].store(epoch, SeqCst);
        self.top[c as usize].store(newest, SeqCst);
        Ok(epoch)
    }

    /// Whether a copy of origin chunk `c` labelled with chain seq `newest` would be read by
    /// any live snapshot (stripe lock held).
    fn copy_needed(&self, c: u64, newest: u32) -> bool {
        let Some(&node) = self.chain.get(newest as usize - 1) else {
            return true;
        };
        let mut list: ExList = self.map[c as usize]
            .load()
            .as_deref()
            .cloned()
            .unwrap_or_default();
        let probe = Ex {
            node,
            seq: newest,
            store: u64::MAX,
        };
        list.push(probe);
        self.readers().needed(&list, &probe)
    }

    /// Copies the rollback source's chunk `c` back onto the origin (idempotent).
    fn restore_chunk(&self, rb: &RollbackRt, c: u64) -> Result<()> {
        if rb.is_restored(c) {
            return Ok(());
        }
        let _g = self.stripe(c);
        if rb.is_restored(c) {
            return Ok(());
        }
        // Where the source reads the origin itself, the origin already holds its data.
        if self
            .resolve(rb.source, self.map[c as usize].load().as_deref())
            .is_some()
            && self.others_share_origin(rb)
        {
            // The origin chunk is about to change: save it for the snapshots that share it.
            let newest = self.newest.load(SeqCst);
            let e = self.copy_out_locked(c, newest)?;
            self.store.wait_durable(e)?;
        }
        let list = self.map[c as usize].load();
        let copied = self.resolve(rb.source, list.as_deref());
        if let Some(s) = copied {
            let len = self.chunk_len(c) as usize;
            let mut buf = vec![0u8; len];
            self.io(
                || {
                    format!(
                        "reading COW store {} chunk {s} for rollback",
                        self.store.name
                    )
                },
                self.store.storage.read_at(&mut buf, self.store_off(s)),
            )?;
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
    fn others_share_origin(&self, rb: &RollbackRt) -> bool {
        lock(&self.snaps).keys().any(|t| *t != rb.tag)
    }

    // ---- origin I/O -------------------------------------------------------------------

    fn chunks(&self, offset: u64, len: u64) -> std::ops::Range<u64> {
        if len == 0 {
            return 0..0;
        }
        offset / self.cs..(offset + len).div_ceil(self.cs)
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
            let mut piece = crate::volume::piece_mut(bufs, done as usize, (end - start) as usize);
            done += end - start;
            let within = (start - c * self.cs) as usize;
            if self.overlay_flag[c as usize].load(SeqCst) {
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
            return self.records_written();
        }
        if self.live_snaps.load(SeqCst) == 0 {
            // No snapshot left (a new one would wait at the gate): nobody needs a copy.
            newest = 0;
        }
        let in_place = |c: u64, durable: u64| {
            !self.overlay_flag[c as usize].load(SeqCst)
                && (newest == 0
                    || (self.top[c as usize].load(SeqCst) == newest
                        && self.copy_epoch[c as usize].load(SeqCst) <= durable))
        };
        let durable = self.store.durable_epoch.load(SeqCst);
        if self.chunks(offset, len).all(|c| in_place(c, durable)) {
            write_all(bufs, offset)?;
            drop(_pass);
            return self.after_direct_write(offset, len, bufs);
        }
        // Copy out first, every chunk: a full store fails the write before any of it lands.
        for c in self.chunks(offset, len) {
            self.ensure_copied(c, newest)?;
        }
        let mut wait_records = false;
        let mut done = 0u64;
        for c in self.chunks(offset, len) {
            let start = (c * self.cs).max(offset);
            let end = ((c + 1) * self.cs).min(offset + len);
            let piece = crate::volume::piece(bufs, done as usize, (end - start) as usize);
            done += end - start;
            if in_place(c, self.store.durable_epoch.load(SeqCst)) {
                write_all(&piece, start)?;
                wait_records |= self.fix_up_direct(c, start, end - start, &piece)?;
                continue;
            }
            let _g = self.stripe(c);
            // The copy made above, unless reclaim has since found that no version needs it
            // (then nothing needs the old data either).
            let e = if self.top[c as usize].load(SeqCst) == newest {
                self.copy_epoch[c as usize].load(SeqCst)
            } else {
                0
            };
            let within = (start - c * self.cs) as usize;
            let plen = (end - start) as usize;
            let overlay_store = lock(&self.overlays).get_mut(&c).map(|ov| {
                crate::volume::gather(&piece, &mut ov.data[within..within + plen]);
                ov.epoch = ov.epoch.max(e);
                ov.store
            });
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
            let store_chunk = if self.overlay_bytes.load(SeqCst) + clen > MAX_OVERLAY_BYTES {
                None
            } else {
                // No room for the overlay's store copy: wait for the commit instead.
                self.store
                    .alloc_chunk(|| format!("overlay of origin {} chunk {c}", self.id))
                    .ok()
            };
            let Some(s) = store_chunk else {
                self.store.wait_durable(e)?;
                write_all(&piece, start)?;
                continue;
            };
            // Raised before the origin is read: a writer that wrote the origin directly
            // meanwhile sees it afterwards and patches the overlay (`fix_up_direct`).
            self.overlay_flag[c as usize].store(true, SeqCst);
            // The origin chunk still holds the data just copied out: start from it.
            let mut data = vec![0u8; clen];
            let r = self
                .io(
                    || format!("reading origin {} chunk {c}", self.origin.name()),
                    self.origin.read_at(&mut data, c * self.cs),
                )
                .and_then(|_| {
                    crate::volume::gather(&piece, &mut data[within..within + plen]);
                    self.io(
                        || format!("writing COW store {} chunk {s}", self.store.name),
                        self.store.storage.write_at(&data, self.store_off(s)),
                    )
                });
            if let Err(err) = r {
                self.overlay_flag[c as usize].store(false, SeqCst);
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
        if wait_records {
            drop(_pass);
            self.records_written()?;
        }
        Ok(())
    }

    /// After a write that went straight to the origin (no chunk lock): a writer may have
    /// started an overlay of one of its chunks meanwhile, from origin data read before this
    /// write landed. Patch such overlays (see `fix_up_direct`).
    fn after_direct_write(
        &self,
        offset: u64,
        len: u64,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Result<()> {
        let mut wait_records = false;
        let mut done = 0u64;
        for c in self.chunks(offset, len) {
            let start = (c * self.cs).max(offset);
            let end = ((c + 1) * self.cs).min(offset + len);
            if self.overlay_flag[c as usize].load(SeqCst) {
                let piece = crate::volume::piece(bufs, done as usize, (end - start) as usize);
                wait_records |= self.fix_up_direct(c, start, end - start, &piece)?;
            }
            done += end - start;
        }
        if wait_records {
            self.records_written()?;
        }
        Ok(())
    }

    /// `piece` (bytes `start..start + len` of chunk `c`) was just written straight to the
    /// origin. If an overlay of `c` was started meanwhile, it may lack the piece: put the piece
    /// into the overlay (and its store copy), or, if the overlay was already written out over
    /// it, onto the origin again. Returns whether an overlay record must be waited for.
    fn fix_up_direct(
        &self,
        c: u64,
        start: u64,
        len: u64,
        piece: &[std::io::IoSlice<'_>],
    ) -> Result<bool> {
        if !self.overlay_flag[c as usize].load(SeqCst) {
            return Ok(false);
        }
        let _g = self.stripe(c);
        let within = (start - c * self.cs) as usize;
        let store = lock(&self.overlays).get_mut(&c).map(|ov| {
            crate::volume::gather(piece, &mut ov.data[within..within + len as usize]);
            ov.store
        });
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
                        StoreCore::note_free(&mut m, o.store);
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
                self.overlay_flag[*c as usize].store(false, SeqCst);
                self.overlay_bytes.fetch_sub(*len, SeqCst);
                self.overlay_count.fetch_sub(1, SeqCst);
            }
            drop(guards);
        }
    }

    /// Commits and writes out every overlay (before an operation that reads the origin device
    /// as the truth: a snapshot, a rollback, a flush).
    fn settle_overlays(&self) -> Result<()> {
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
        self.io(
            || format!("syncing origin {}", self.origin.name()),
            self.origin.sync(),
        )?;
        // Records an acknowledged write depends on (restored chunks, overlays written) must
        // be durable too, and restored-chunk records with the data they describe.
        if self.store.needs_commit() || self.rollback.load().is_some() {
            self.store.commit_sync()?;
        }
        Ok(())
    }

    // ---- snapshot I/O -----------------------------------------------------------------

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
            let mut piece = crate::volume::piece_mut(bufs, done as usize, (end - start) as usize);
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
            .filter(|&c| Self::own(self.map[c as usize].load().as_deref(), leaf).is_none())
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
            let piece = crate::volume::piece(bufs, done as usize, (end - start) as usize);
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

    fn own(list: Option<&ExList>, leaf: u32) -> Option<u64> {
        list?.iter().find(|e| e.node == leaf).map(|e| e.store)
    }

    fn snap_write_chunk(
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
        if let Some(s) = Self::own(self.map[c as usize].load().as_deref(), leaf) {
            return in_place(s);
        }
        let _g = self.stripe(c);
        if let Some(s) = Self::own(self.map[c as usize].load().as_deref(), leaf) {
            return in_place(s);
        }
        // First write of this snapshot to this chunk: give it a private copy.
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
            crate::volume::gather(piece, &mut buf[within as usize..within as usize + plen]);
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

    // ---- snapshot operations ----------------------------------------------------------

    fn push_node(&self, m: &mut MetaCore, meta: NodeMeta) -> Result<u32> {
        let id = self.nodes.count();
        if id >= (u32::MAX - 4) as usize {
            return Err(Error::Limit(format!(
                "origin {} has used every version number",
                self.id
            )));
        }
        let is_chain = meta.kind == NodeKind::Chain;
        let got = self.nodes.push(NodeRt::from_meta(&meta));
        debug_assert_eq!(got, id);
        if is_chain {
            self.chain.push(got as u32);
        }
        m.pending.push(Record::NewNode {
            slot: self.slot,
            node: got as u32,
            meta,
        });
        Ok(got as u32)
    }

    fn snap(&self, tag: u32) -> Result<Arc<SnapRt>> {
        lock(&self.snaps)
            .get(&tag)
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("snapshot {tag} of origin {}", self.id)))
    }

    pub fn snapshot_handle(&self, tag: u32) -> Result<Arc<SnapRt>> {
        self.snap(tag)
    }

    fn commit(&self, epoch: u64) -> Result<()> {
        self.store.request_commit();
        self.store.wait_durable(epoch)
    }

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

    /// Adds snapshot `tag`: a leaf below `parent` (metadata lock held).
    fn add_snapshot(
        &self,
        m: &mut MetaCore,
        parent: u32,
        tag: u32,
        parent_tag: u32,
        birth: u64,
        memo: &str,
    ) -> Result<()> {
        let leaf = self.push_node(
            m,
            NodeMeta {
                kind: NodeKind::Leaf,
                dead: false,
                parent,
                seq: 0,
                tag,
                parent_tag,
                birth,
                memo: memo.into(),
            },
        )?;
        self.next_tag.store(tag + 1, SeqCst);
        let mut snaps = lock(&self.snaps);
        snaps.insert(
            tag,
            Arc::new(SnapRt {
                tag,
                leaf: AtomicU32::new(leaf),
                gate: IoGate::default(),
                deleted: AtomicBool::new(false),
            }),
        );
        self.live_snaps.store(snaps.len(), SeqCst);
        Ok(())
    }

    /// Freezes snapshot `ps`'s leaf and gives the tag a fresh leaf below it (gate closed,
    /// metadata lock held). Returns the frozen node.
    fn freeze(&self, m: &mut MetaCore, ps: &SnapRt) -> Result<u32> {
        let old = ps.leaf.load(SeqCst);
        let n = self
            .node(old)
            .ok_or_else(|| Error::NotFound(format!("node {old} of origin {}", self.id)))?;
        let meta = NodeMeta {
            kind: NodeKind::Leaf,
            dead: false,
            parent: old,
            seq: 0,
            tag: ps.tag,
            parent_tag: n.parent_tag,
            birth: n.birth,
            memo: n.memo.clone(),
        };
        n.kind.store(NodeKind::Frozen as u8, SeqCst);
        m.pending.push(Record::Freeze {
            slot: self.slot,
            node: old,
        });
        let new_leaf = self.push_node(m, meta)?;
        ps.leaf.store(new_leaf, SeqCst);
        Ok(old)
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

    /// Store chunks each snapshot alone reads (what deleting it would free).
    fn exclusive_chunks(&self) -> HashMap<u32, u64> {
        let readers = self.readers();
        let mut out = HashMap::new();
        for slot in self.map.iter() {
            if let Some(l) = slot.load().as_ref() {
                for e in l.iter() {
                    if let Some(tag) = readers.sole_user(l, e) {
                        *out.entry(tag).or_insert(0) += 1;
                    }
                }
            }
        }
        out
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

    // ---- background work --------------------------------------------------------------

    /// Syncs the origin about once a second while it is written, so that the sync a snapshot
    /// needs finds little to write.
    fn background_sync(&self) {
        let mut last = lock(&self.last_sync);
        if last.elapsed() < std::time::Duration::from_secs(1) || !self.dirty.swap(false, SeqCst) {
            return;
        }
        *last = std::time::Instant::now();
        if let Err(e) = self.origin.sync() {
            log::warn!("origin {}: background sync: {e}", self.id);
        }
    }

    /// One slice of background work. Returns whether more is waiting.
    pub fn background_step(&self) -> Result<bool> {
        if self.unbound.load(SeqCst) || self.store.check_failed().is_err() {
            return Ok(false);
        }
        self.drain_overlays(false);
        self.background_sync();
        // Running is raised before needed is cleared, so that `status` never sees neither
        // while a reclaim is about to start (it would report nothing pending).
        self.reclaim_running.store(true, SeqCst);
        if self.reclaim_needed.swap(false, SeqCst) {
            let _ops = lock(&self.ops);
            self.reclaim()?;
        } else {
            self.reclaim_running.store(false, SeqCst);
        }
        if let Some(rb) = self.rollback.load_full() {
            return match self.rollback_step(&rb) {
                Ok(()) => {
                    *lock(&rb.stalled) = None;
                    Ok(true)
                }
                Err(e @ Error::NoSpace { .. }) => {
                    // Wait for space (a delete wakes the worker); say so once.
                    let mut st = lock(&rb.stalled);
                    if st.is_none() {
                        log::error!("origin {}: rollback stalled: {e}", self.id);
                    }
                    *st = Some(e);
                    Ok(false)
                }
                Err(e) => Err(e),
            };
        }
        Ok(false)
    }

    fn rollback_step(&self, rb: &Arc<RollbackRt>) -> Result<()> {
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
                    .resolve(rb.source, self.map[end as usize].load().as_deref())
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
                    .resolve(rb.source, self.map[c as usize].load().as_deref())
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

    fn finish_rollback(&self, rb: &Arc<RollbackRt>) -> Result<()> {
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

    /// The live readers now: live leaves and the rollback source, with their paths. Taken
    /// under the metadata lock, which every change of the tree holds: a census taken between a
    /// leaf's freeze and the creation of its new leaves would miss a reader.
    fn readers(&self) -> Readers {
        let _m = self.store.lock_meta();
        let n = self.nodes.count();
        let nchain = self.chain.count();
        let mut r = Readers {
            n,
            nchain,
            paths: Vec::new(),
            through: HashMap::new(),
            at_chain: vec![Vec::new(); nchain + 1],
            tags: Vec::new(),
        };
        let mut starts: Vec<u32> = (0..n)
            .filter(|&i| {
                self.nodes
                    .get(i)
                    .is_some_and(|nd| nd.kind() == NodeKind::Leaf && !nd.dead.load(SeqCst))
            })
            .map(|i| i as u32)
            .collect();
        if let Some(rb) = self.rollback.load().as_ref() {
            starts.push(rb.source);
        }
        for start in starts {
            let ri = r.paths.len();
            let is_leaf = self
                .node(start)
                .is_some_and(|nd| nd.kind() == NodeKind::Leaf);
            r.tags
                .push(is_leaf.then(|| self.node(start).map(|nd| nd.tag)).flatten());
            let mut path = Vec::new();
            let mut x = start;
            // Parents are older than children, so the walk ends; the bound guards a bad tree.
            for _ in 0..=n {
                let Some(nd) = self.node(x) else { break };
                match nd.kind() {
                    NodeKind::Chain => {
                        if let Some(v) = r.at_chain.get_mut(nd.seq as usize) {
                            v.push(ri);
                        }
                        break;
                    }
                    NodeKind::Origin => break,
                    NodeKind::Leaf | NodeKind::Frozen => {
                        path.push(x);
                        r.through.entry(x).or_default().push(ri);
                        x = nd.parent;
                    }
                }
            }
            r.paths.push(path);
        }
        r
    }

    /// Store chunks held by exceptions no live snapshot can read any more, while a reclaim is
    /// pending or running (0 otherwise).
    fn garbage_estimate(&self) -> u64 {
        if !self.reclaim_needed.load(SeqCst) && !self.reclaim_running.load(SeqCst) {
            return 0;
        }
        let readers = self.readers();
        self.map
            .iter()
            .map(|slot| {
                slot.load().as_ref().map_or(0, |l| {
                    l.iter().filter(|e| !readers.needed(l, e)).count() as u64
                })
            })
            .sum()
    }

    fn reclaim(&self) -> Result<()> {
        self.reclaim_running.store(true, SeqCst);
        let r = self.reclaim_pass();
        self.reclaim_running.store(false, SeqCst);
        r
    }

    /// Frees every exception that no live reader resolves to.
    fn reclaim_pass(&self) -> Result<()> {
        let readers = self.readers();
        let garbage = |list: &ExList, e: &Ex| !readers.needed(list, e);
        let mut freed = 0u64;
        for c in 0..self.nchunks {
            let list = self.map[c as usize].load();
            let Some(l) = list.as_ref() else { continue };
            // A chunk with an overlay keeps its copy until the overlay is written.
            if self.overlay_flag[c as usize].load(SeqCst) || !l.iter().any(|e| garbage(l, e)) {
                continue;
            }
            let _g = self.stripe(c);
            if self.overlay_flag[c as usize].load(SeqCst) {
                continue;
            }
            let mut m = self.store.lock_meta();
            let cur = self.map[c as usize].load_full();
            let Some(cur) = cur else { continue };
            let (drop_list, keep): (Vec<Ex>, Vec<Ex>) = cur.iter().partition(|e| garbage(&cur, e));
            for e in &drop_list {
                m.pending.push(Record::FreeException {
                    slot: self.slot,
                    chunk: c,
                    node: e.node,
                });
                StoreCore::note_free(&mut m, e.store);
                if let Some(nd) = self.node(e.node) {
                    nd.exceptions.fetch_sub(1, SeqCst);
                }
                freed += 1;
            }
            let t = keep.iter().map(|e| e.seq).max().unwrap_or(0);
            if keep.is_empty() {
                lock(&self.excepted).remove(&c);
            }
            self.map[c as usize].store(if keep.is_empty() {
                None
            } else {
                Some(Arc::new(keep))
            });
            if self.top[c as usize].load(SeqCst) != t {
                self.top[c as usize].store(t, SeqCst);
            }
        }
        if freed > 0 {
            log::info!("origin {}: reclaimed {freed} store chunks", self.id);
            self.store.commit_sync()?;
        }
        Ok(())
    }
}

/// The live readers of an origin's versions at one instant (for reclaim): each live leaf, and
/// the rollback source, with the path a lookup takes from it.
struct Readers {
    /// Nodes that existed (newer ones are kept).
    n: usize,
    /// Chain nodes that existed.
    nchain: usize,
    /// Each reader's path: itself and its frozen ancestors, up to (not including) its chain node.
    paths: Vec<Vec<u32>>,
    /// Non-chain node → the readers whose path passes through it.
    through: HashMap<u32, Vec<usize>>,
    /// Chain seq → the readers whose path ends at that chain node.
    at_chain: Vec<Vec<usize>>,
    /// The snapshot tag of each reader (`None` for a rollback's source).
    tags: Vec<Option<u32>>,
}

impl Readers {
    /// The first node on reader `r`'s path that has an exception in `list`; `None` if the
    /// lookup goes on to the chain.
    fn first_labelled(&self, r: usize, list: &ExList) -> Option<u32> {
        self.paths[r]
            .iter()
            .copied()
            .find(|x| list.iter().any(|e| e.node == *x))
    }

    /// The live readers whose lookup of this chunk ends at exception `e`; `None` if the
    /// exception is newer than this census (keep it).
    fn users<'a>(
        &'a self,
        list: &'a ExList,
        e: &'a Ex,
    ) -> Option<Box<dyn Iterator<Item = usize> + 'a>> {
        if e.node as usize >= self.n {
            return None;
        }
        if e.seq == 0 {
            let rs = self
                .through
                .get(&e.node)
                .map(|v| v.as_slice())
                .unwrap_or(&[]);
            return Some(Box::new(
                rs.iter()
                    .copied()
                    .filter(move |&r| self.first_labelled(r, list) == Some(e.node)),
            ));
        }
        if e.seq as usize > self.nchain {
            return None;
        }
        // A reader reaching chain node m takes the chain copy with the smallest seq ≥ m.
        let below = list
            .iter()
            .filter(|x| x.seq > 0 && x.seq < e.seq)
            .map(|x| x.seq)
            .max()
            .unwrap_or(0);
        Some(Box::new(
            (below as usize + 1..=e.seq as usize)
                .flat_map(move |m| self.at_chain[m].iter().copied())
                .filter(move |&r| self.first_labelled(r, list).is_none()),
        ))
    }

    /// Whether some live reader's lookup of this chunk ends at exception `e`.
    fn needed(&self, list: &ExList, e: &Ex) -> bool {
        self.users(list, e).is_none_or(|mut u| u.next().is_some())
    }

    /// The snapshot that alone reads exception `e`, if exactly one does.
    fn sole_user(&self, list: &ExList, e: &Ex) -> Option<u32> {
        let mut u = self.users(list, e)?;
        let first = u.next()?;
        if u.next().is_some() {
            return None;
        }
        self.tags[first]
    }
}
