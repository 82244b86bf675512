//! One origin at run time. `OriginCore` composes the parts, each in its own file:
//!
//! - `tree.rs`: the [`VersionTree`] (nodes, chain order, `resolve`) — pure, no I/O;
//! - `chunk_map.rs`: the exceptions of each chunk (RCU lists), publishing one, and the
//!   consistent read of a version's view of a chunk;
//! - `cow.rs`: origin and snapshot I/O — copy-out before an origin overwrite, first writes of a
//!   snapshot;
//! - `overlay.rs`: origin writes held in memory (and in the store) until their copy-out is
//!   durable, and their write-out;
//! - `snapshot.rs`: create, delete, list, status, unbind; `group.rs`: several origins' snapshots
//!   cut at one instant;
//! - `rollback.rs`: live rollback and its background copy-back;
//! - `reclaim.rs`: the reader census (`Readers`, pure) and the reclaim of what no reader needs;
//! - `read_map.rs`: a read's pieces (file and offset, or zeros) for asynchronous I/O, and the
//!   check that keeps such a read exact;
//! - `background.rs`: the worker's slice of work per origin; `diff.rs`: changed-block diff;
//! - `zero.rs`: discard and write-zeroes (holes in the origin, zero exceptions).
//!
//! `docs/design.md` explains the rules.
//!
//! # Lock order
//!
//! Take locks only in this order (any may be skipped); the last group are leaves, never held
//! while another lock is taken:
//!
//! 1. `ops` — one snapshot operation (create, delete, rollback, its finish, unbind, reclaim) at
//!    a time per origin;
//! 2. the origin's `gate`, then a snapshot's `gate` (closed by operations; writers hold a pass);
//! 3. `stripes` — per-chunk write locks; several only in ascending stripe order
//!    (`drain_overlays`);
//! 4. the store's `journal` lock (appending records), then the store's metadata lock
//!    (`StoreCore::lock_meta`; every metadata change and its records);
//! 5. leaves: `snaps`, `overlays`, the chunk map's shard locks, `overlay_error`,
//!    `last_sync`, a rollback's `stalled`, and the store's `durable` and `worker_lock`.
//!
//! A consistency group (`group.rs`) holds several origins' `ops`, then their gates: each
//! group in (store name, origin id) order, all `ops` before any gate.
//!
//! Waiting for a commit (`wait_durable`, `wait_written`) may happen with locks of groups 1–3
//! held (the commit thread takes only group 4 and, with `try_lock`, stripes).

use crate::error::{Error, Result};
use crate::gate::IoGate;
use crate::meta::{bit_get, NodeKind, NodeMeta, OriginMeta, RollbackMeta, ROOT};
use crate::meta::{Record, MAX_MEMO};
use crate::storage::Storage;
use crate::store::{MetaCore, StoreCore};
use arc_swap::ArcSwapOption;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{
    AtomicBool, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering::SeqCst,
};
use std::sync::{Arc, Mutex, MutexGuard};

mod background;
mod chunk_map;
mod cow;
mod diff;
mod group;
mod overlay;
mod read_map;
mod reclaim;
mod rollback;
mod snapshot;
#[cfg(test)]
mod tests;
mod tree;
mod zero;

use chunk_map::ChunkMap;
pub(crate) use chunk_map::{Ex, ExList};
pub use group::GroupError;
pub(crate) use group::{snapshot_group, Member};
use overlay::Overlay;
pub use read_map::{ReadMapping, ReadSegment, ReadSource};
pub(crate) use rollback::RollbackRt;
use tree::NodeRt;
pub(crate) use tree::VersionTree;
const STRIPES: usize = 1024;

/// A live snapshot: its tag and the leaf that takes its writes.
pub(crate) struct SnapRt {
    pub tag: u32,
    pub leaf: AtomicU32,
    pub gate: IoGate,
    pub deleted: AtomicBool,
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
    /// Store chunks this snapshot reads that other versions read too.
    pub shared_chunks: u64,
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
    /// Origin chunks copied to the store before an origin write, since the origin was opened.
    pub copy_outs: u64,
    /// Origin writes acknowledged but not yet on the origin (overlays: in memory and in a
    /// store chunk each, until their copy-out is durable): chunks and bytes.
    pub overlay_chunks: u64,
    /// Bytes of memory they hold.
    pub overlay_bytes: u64,
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
    tree: VersionTree,
    /// Per chunk that has any: its exceptions, the newest chain copy and its commit batch,
    /// the overlay flag (see `chunk_map.rs`).
    map: ChunkMap,
    newest: AtomicU32,
    pub gate: IoGate,
    stripes: Box<[Mutex<()>]>,
    ops: Mutex<()>,
    snaps: Mutex<BTreeMap<u32, Arc<SnapRt>>>,
    next_tag: AtomicU32,
    pub rollback: ArcSwapOption<RollbackRt>,
    reclaim_needed: AtomicBool,
    reclaim_running: AtomicBool,
    /// A snapshot's first write may have shadowed a chain copy that no one else reads: the
    /// background runs a reclaim, at most once per `SHADOW_RECLAIM_EVERY` (background.rs).
    shadowed: AtomicBool,
    shadow_reclaimed: Mutex<std::time::Instant>,
    /// Live snapshots (the size of `snaps`), read on the write path without its lock.
    live_snaps: AtomicUsize,
    unbound: AtomicBool,
    /// Origin writes waiting for their chunk's copy-out to become durable (see `Overlay`).
    overlays: Mutex<BTreeMap<u64, Overlay>>,
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
    /// A snapshot of the origin was taken without an origin fsync since the last one: its
    /// chunks still on the origin may be in the page cache only, so a flush of a snapshot
    /// volume fsyncs the origin too (`sync_for_snapshots`).
    cut_unsynced: AtomicBool,
    /// Deleted snapshots whose delete is not durable yet: (batch, leaf). Their leaves stay
    /// alive for copy-out decisions until it is (`finish_deaths`): a host crash may undo the
    /// delete, and the snapshot must then come back whole.
    dying: Mutex<Vec<(u64, u32)>>,
    dying_count: AtomicUsize,
    /// Origin chunks copied to the store before an origin write, since the origin was opened.
    copy_outs: AtomicU64,
}

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
        let tree = VersionTree::new(&m.nodes);
        let map = ChunkMap::default();
        for (chunk, list) in &m.exceptions {
            let mut l = ExList::with_capacity(list.len());
            for (node, s) in list {
                let n = &m.nodes[*node as usize];
                let seq = if n.kind == NodeKind::Chain { n.seq } else { 0 };
                l.push(Ex {
                    node: *node,
                    seq,
                    store: *s,
                });
                if let Some(nr) = tree.node(*node) {
                    nr.exceptions.fetch_add(1, SeqCst);
                }
            }
            map.set_list_top(*chunk, Some(Arc::new(l)));
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
            tree,
            map,
            newest: AtomicU32::new(m.newest_seq),
            gate: IoGate::default(),
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            ops: Mutex::new(()),
            snaps: Mutex::new(snaps),
            next_tag: AtomicU32::new(m.next_tag),
            rollback: ArcSwapOption::new(rollback),
            reclaim_needed: AtomicBool::new(has_dead),
            reclaim_running: AtomicBool::new(false),
            shadowed: AtomicBool::new(false),
            shadow_reclaimed: Mutex::new(std::time::Instant::now()),
            live_snaps: AtomicUsize::new(m.tags.len()),
            unbound: AtomicBool::new(false),
            overlays: Mutex::new(BTreeMap::new()),
            overlay_count: AtomicUsize::new(0),
            overlay_bytes: AtomicUsize::new(0),
            overlay_error: Mutex::new(None),
            record_epoch: AtomicU64::new(0),
            dirty: AtomicBool::new(false),
            // The last process may have left writes in the page cache only (a kill, a clean
            // stop): the first flush of a snapshot volume syncs the origin.
            cut_unsynced: AtomicBool::new(true),
            dying: Mutex::new(Vec::new()),
            dying_count: AtomicUsize::new(0),
            copy_outs: AtomicU64::new(0),
            last_sync: Mutex::new(std::time::Instant::now()),
        }))
    }

    /// The metadata, for a checkpoint (called with the metadata lock held).
    pub fn to_meta(&self) -> OriginMeta {
        let mut nodes = self.tree.to_meta();
        // A deleted snapshot whose leaf still counts as alive for copy-outs is dead in the
        // metadata: its DeleteTag is in the journal before this checkpoint.
        for &(_, leaf) in lock(&self.dying).iter() {
            if let Some(n) = nodes.get_mut(leaf as usize) {
                n.dead = true;
            }
        }
        let tags = lock(&self.snaps)
            .values()
            .map(|s| (s.tag, s.leaf.load(SeqCst)))
            .collect();
        let exceptions = self
            .map
            .lists()
            .into_iter()
            .map(|(c, l)| (c, l.iter().map(|e| (e.node, e.store)).collect()))
            .collect();
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

    fn node(&self, i: u32) -> Option<&NodeRt> {
        self.tree.node(i)
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

    /// Fsyncs the origin if a snapshot was taken since its last fsync (see `cut_unsynced`):
    /// part of a snapshot volume's flush.
    pub(crate) fn sync_for_snapshots(&self) -> Result<()> {
        if !self.cut_unsynced.swap(false, SeqCst) {
            return Ok(());
        }
        let r = self.io(
            || format!("syncing origin {} for its snapshots", self.origin.name()),
            self.origin.sync(),
        );
        if r.is_err() {
            self.cut_unsynced.store(true, SeqCst);
        }
        r
    }

    fn store_off(&self, s: u64) -> u64 {
        self.store.layout.chunk_offset(s)
    }

    fn io<T>(&self, what: impl FnOnce() -> String, r: std::io::Result<T>) -> Result<T> {
        r.map_err(|e| Error::io(what(), e))
    }

    // ---- origin I/O -------------------------------------------------------------------

    fn chunks(&self, offset: u64, len: u64) -> std::ops::Range<u64> {
        if len == 0 {
            return 0..0;
        }
        offset / self.cs..(offset + len).div_ceil(self.cs)
    }

    // ---- snapshot I/O -----------------------------------------------------------------

    // ---- snapshot operations ----------------------------------------------------------

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

    // ---- background work --------------------------------------------------------------
}

/// How the store's commit thread and worker reach an opened origin.
impl crate::store::AttachedOrigin for OriginCore {
    fn id(&self) -> &str {
        &self.id
    }

    fn to_meta(&self) -> OriginMeta {
        OriginCore::to_meta(self)
    }

    fn sync_data(&self) -> std::io::Result<()> {
        self.sync_origin()
    }

    fn drain_overlays(&self, wait: bool) {
        OriginCore::drain_overlays(self, wait)
    }

    fn background_step(&self) -> Result<bool> {
        OriginCore::background_step(self)
    }

    fn into_any(self: Arc<Self>) -> Arc<dyn std::any::Any + Send + Sync> {
        self
    }
}
