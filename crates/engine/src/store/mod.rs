//! A COW store: format, open (checkpoint + journal replay), group commit, checkpoints, the
//! background worker, and origin binding.

use crate::error::{CommitFailed, Error, Result};
use crate::meta::Record;
use crate::meta::{bit_get, bit_set, MetaState, OriginMeta};
use crate::ondisk::{self, Layout, Superblock, JOURNAL_ALIGN, SB_SLOT};
use crate::recovery::{corrupt, io_err, load_meta, read_superblock, Replay};
use crate::storage::{FileStorage, Storage};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::thread::JoinHandle;
use std::time::Duration;

mod alloc;
mod commit;
mod counters;
pub use counters::CommitStats;

mod worker;

use worker::worker_loop;

/// What the store's threads need of an opened origin. `origin::OriginCore` implements it; the
/// store never names that type, so this module does not depend on `origin`.
pub(crate) trait AttachedOrigin: Send + Sync {
    /// The origin's id, for messages.
    fn id(&self) -> &str;
    /// The origin's metadata, for a checkpoint (called with the metadata lock held).
    fn to_meta(&self) -> OriginMeta;
    /// Syncs the origin's data (before a batch that says restored chunks are on it).
    fn sync_data(&self) -> std::io::Result<()>;
    /// Writes out overlays whose copy-out is durable (after a commit round, and at close with
    /// `wait`: take every chunk lock).
    fn drain_overlays(&self, wait: bool);
    /// One slice of background work (reclaim, rollback copy-back, origin sync); returns whether
    /// more is waiting.
    fn background_step(&self) -> Result<bool>;
    /// For the registry above this module, which hands out the concrete origin.
    fn into_any(self: Arc<Self>) -> Arc<dyn std::any::Any + Send + Sync>;
}

/// How to format a store.
#[derive(Debug, Clone)]
pub struct FormatOptions {
    /// Chunk size in bytes: a power of two from 4 KiB to 1 MiB.
    pub chunk_size: u32,
    /// Overwrite a store that already holds a valid superblock.
    pub force: bool,
}

impl Default for FormatOptions {
    fn default() -> Self {
        FormatOptions {
            chunk_size: 4096,
            force: false,
        }
    }
}

/// State changed only under the metadata lock. Every mutation of metadata (in-memory maps,
/// version trees, allocation) happens with this lock held and pushes its journal records in
/// the same critical section, so journal order is mutation order.
pub(crate) struct MetaCore {
    pub pending: Vec<Record>,
    /// Origins whose data must be synced before the pending batch (restored chunks).
    pub pending_origin_sync: BTreeSet<u32>,
    /// Number of the batch being filled.
    pub epoch: u64,
    pub free: Vec<u64>,
    pub alloc: Vec<u64>,
    pub used: u64,
    /// Zero exceptions (no data chunk). Each counts against the store's chunks all the same,
    /// so that the checkpoint, sized for one exception per chunk, always holds every exception
    /// (`alloc_chunks`, `note_zero`).
    pub zeros: u64,
    /// Chunks freed in batch `epoch`, reusable once it is durable.
    pub pending_free: Vec<(u64, u64)>,
    pub sb: Superblock,
    pub journal_pos: u64,
    pub journal_seq: u64,
    /// Highest batch of this journal pass known durable with the data it names (-1: none).
    pub vouched: i64,
    /// Last batch of this pass that carries records (seals carry none; -1: none).
    pub last_records: i64,
    pub next_slot: u32,
    /// Bound origins nobody has opened yet, with their metadata.
    pub dormant: BTreeMap<u32, OriginMeta>,
    /// Opened origins.
    pub origins: BTreeMap<u32, Arc<dyn AttachedOrigin>>,
    pub sync_requested: bool,
}

/// Shared by every handle of one open store.
pub(crate) struct StoreCore {
    pub storage: Arc<dyn Storage>,
    pub name: String,
    pub layout: Layout,
    pub meta: Mutex<MetaCore>,
    /// Wakes the committer.
    pub commit_wake: Condvar,
    pub durable: Mutex<u64>,
    pub durable_cv: Condvar,
    pub durable_epoch: AtomicU64,
    /// Snapshot deletes waiting for durability before their leaves die: the worker is woken
    /// after each commit round while there are any.
    pub dying: std::sync::atomic::AtomicUsize,
    /// Highest batch whose records are in the journal (written, perhaps not yet synced): what
    /// a killed process's successor replays, since the page cache outlives the process.
    pub written_epoch: AtomicU64,
    /// Held while records are taken from `pending` and appended to the journal, so that the
    /// journal keeps mutation order with several writers (lock order: journal, then meta).
    pub journal: Mutex<()>,
    /// Set when a commit failed: the store refuses further writes.
    pub failed: Mutex<Option<CommitFailed>>,
    pub shutdown: AtomicBool,
    pub worker_wake: Condvar,
    pub worker_lock: Mutex<bool>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// Commit rounds and their duration, for `stats`.
    pub commits: counters::CommitCounters,
}

/// Closes the store when the last handle of any kind is dropped.
pub(crate) struct Guard {
    pub core: Arc<StoreCore>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.core.close();
    }
}

/// An open COW store. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    pub(crate) guard: Arc<Guard>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Store({})", self.guard.core.name)
    }
}

impl Store {
    /// Formats the file or device at `path` as an empty store.
    pub fn format(path: &Path, opts: &FormatOptions) -> Result<()> {
        let st = FileStorage::open(path, false)
            .map_err(|e| Error::io(format!("opening COW store {}", path.display()), e))?;
        Self::format_storage(&st, opts)
    }

    /// Formats any storage as an empty store.
    pub fn format_storage(storage: &dyn Storage, opts: &FormatOptions) -> Result<()> {
        let name = storage.name().to_string();
        if !opts.force {
            if let Ok(sb) = read_superblock(storage) {
                let _ = sb;
                return Err(Error::AlreadyExists(format!("a snapmv store in {name}")));
            }
        }
        let size = storage
            .len()
            .map_err(|e| io_err(&name, "reading its size", e))?;
        let layout = Layout::compute(size, opts.chunk_size)
            .map_err(|e| Error::InvalidArgument(e.to_string()))?;
        let meta = MetaState::new(layout.chunk_size, layout.data_chunks);
        let ck = ondisk::encode_checkpoint(&meta);
        storage
            .write_at(&ck, layout.ckpt_area(0))
            .map_err(|e| io_err(&name, "writing the checkpoint", e))?;
        // A fresh journal pass number, so that batches left by an earlier format are stale.
        let journal_gen = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
            | 1;
        let sb = Superblock {
            generation: 1,
            layout,
            ckpt_slot: 0,
            ckpt_len: ck.len() as u64,
            ckpt_crc: crc32c::crc32c(&ck),
            journal_gen,
            journal_seq: 0,
            boot: storage.boot_id(),
        };
        storage
            .write_at(&vec![0u8; JOURNAL_ALIGN as usize], layout.journal_off)
            .map_err(|e| io_err(&name, "clearing the journal", e))?;
        storage.sync().map_err(|e| io_err(&name, "syncing", e))?;
        // Both slots, each where its generation belongs (`generation % 2`), describing the
        // same empty store: one damaged slot is survivable from the first moment, and the
        // first checkpoint (generation 3) overwrites the older copy, not the only one.
        for generation in [1, 2] {
            let copy = Superblock { generation, ..sb };
            storage
                .write_at(&copy.encode(), (generation % 2) * SB_SLOT)
                .map_err(|e| io_err(&name, "writing the superblock", e))?;
        }
        storage.sync().map_err(|e| io_err(&name, "syncing", e))?;
        Ok(())
    }

    /// Opens the store at `path` (`direct`: O_DIRECT — not yet supported, see docs/design.md).
    pub fn open(path: &Path, direct: bool) -> Result<Store> {
        let st = FileStorage::open(path, direct)
            .map_err(|e| Error::io(format!("opening COW store {}", path.display()), e))?;
        Self::open_storage(Arc::new(st))
    }

    /// Opens a store on any storage.
    pub fn open_storage(storage: Arc<dyn Storage>) -> Result<Store> {
        let name = storage.name().to_string();
        let sb = read_superblock(storage.as_ref())?;
        let Replay {
            meta,
            pos: journal_pos,
            seq: journal_seq,
            ..
        } = load_meta(storage.as_ref(), &sb)?;
        let problems = meta.validate();
        if !problems.is_empty() {
            return Err(corrupt(
                &name,
                format!(
                    "{} problem(s), first: {} (run `snapmv check`)",
                    problems.len(),
                    problems[0]
                ),
            ));
        }
        let l = sb.layout;
        let mut free = Vec::new();
        let mut used = 0;
        for c in (0..l.data_chunks).rev() {
            if bit_get(&meta.alloc, c) {
                used += 1;
            } else {
                free.push(c);
            }
        }
        let zeros = meta
            .origins
            .values()
            .flat_map(|o| o.exceptions.values())
            .flatten()
            .filter(|(_, s)| *s == crate::meta::ZERO_CHUNK)
            .count() as u64;
        let core = Arc::new(StoreCore {
            storage,
            name,
            layout: l,
            meta: Mutex::new(MetaCore {
                pending: Vec::new(),
                pending_origin_sync: BTreeSet::new(),
                epoch: 1,
                free,
                alloc: meta.alloc.clone(),
                used,
                zeros,
                pending_free: Vec::new(),
                sb,
                journal_pos,
                journal_seq,
                vouched: -1,
                last_records: -1,
                next_slot: meta.next_slot,
                dormant: meta.origins,
                origins: BTreeMap::new(),
                sync_requested: false,
            }),
            commit_wake: Condvar::new(),
            durable: Mutex::new(0),
            durable_cv: Condvar::new(),
            durable_epoch: AtomicU64::new(0),
            dying: std::sync::atomic::AtomicUsize::new(0),
            written_epoch: AtomicU64::new(0),
            journal: Mutex::new(()),
            failed: Mutex::new(None),
            shutdown: AtomicBool::new(false),
            worker_wake: Condvar::new(),
            worker_lock: Mutex::new(false),
            threads: Mutex::new(Vec::new()),
            commits: counters::CommitCounters::new(),
        });
        // Start a new journal pass in this boot at once: what was replayed becomes durable
        // (batches a killed process left unsynced included), batches not replayed can never
        // be read again, and the superblock names the boot the new pass is written in.
        {
            let _j = core.journal.lock().unwrap_or_else(|e| e.into_inner());
            core.checkpoint().map_err(|e| {
                Error::io(
                    format!("COW store {}: writing a checkpoint at open", core.name),
                    std::io::Error::other(e),
                )
            })?;
        }
        let weak = Arc::downgrade(&core);
        let c2 = core.clone();
        let committer = std::thread::Builder::new()
            .name("snapmv-commit".into())
            .spawn(move || c2.committer())
            .map_err(|e| Error::io("starting the commit thread", e))?;
        let worker = std::thread::Builder::new()
            .name("snapmv-worker".into())
            .spawn(move || worker_loop(weak))
            .map_err(|e| Error::io("starting the background worker", e))?;
        core.threads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend([committer, worker]);
        Ok(Store {
            guard: Arc::new(Guard { core }),
        })
    }

    /// The store's name (its path).
    pub fn path(&self) -> &str {
        &self.guard.core.name
    }

    /// Chunk size in bytes.
    pub fn chunk_size(&self) -> u32 {
        self.guard.core.layout.chunk_size
    }

    /// Makes everything done so far durable (a checkpoint-free commit).
    pub fn sync(&self) -> Result<()> {
        self.guard.core.commit_sync()
    }
}

impl StoreCore {
    pub(crate) fn lock_meta(&self) -> MutexGuard<'_, MetaCore> {
        self.meta.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Final commit and thread shutdown.
    fn close(&self) {
        if self.shutdown.load(SeqCst) {
            return;
        }
        let _ = self.commit_sync();
        // Acknowledged origin writes still held in overlays go to their origins: a clean close
        // loses nothing. The origins are not synced: what the guests flushed is durable
        // already, the rest is in the page cache, which outlives the process (as after a
        // kill), and an fsync here would make the stop last as long as the kernel takes to
        // write (and, on a sparse file, allocate) every dirty page. The next open counts its
        // origins as not synced since their snapshots were cut (`cut_unsynced`).
        let origins: Vec<Arc<dyn AttachedOrigin>> =
            self.lock_meta().origins.values().cloned().collect();
        for o in origins {
            o.drain_overlays(true);
        }
        // The records saying the overlays are on their origins.
        let _ = self.commit_sync();
        self.shutdown.store(true, SeqCst);
        self.commit_wake.notify_all();
        self.wake_worker();
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|e| e.into_inner()));
        for t in threads {
            let _ = t.join();
        }
        // Break the store ↔ origin reference cycle.
        let mut m = self.lock_meta();
        m.origins.clear();
    }
}
