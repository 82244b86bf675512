//! A COW store: format, open (checkpoint + journal replay), group commit, checkpoints, the
//! background worker, and origin binding.

use crate::error::{Error, Result};
use crate::format::{self, Layout, Record, Superblock, BATCH_HEADER, JOURNAL_ALIGN, SB_SLOT};
use crate::meta::{bit_get, bit_set, MetaState, OriginMeta};
use crate::origin::{OriginCore, OriginStatus};
use crate::storage::{FileStorage, Storage};
use crate::Origin;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::thread::JoinHandle;
use std::time::Duration;

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

/// Space and origins of a store.
#[derive(Debug, Clone)]
pub struct StoreStatus {
    /// The store's name (path).
    pub path: String,
    /// Chunk size in bytes.
    pub chunk_size: u32,
    /// Data chunks in all.
    pub chunks_total: u64,
    /// Data chunks holding snapshot data.
    pub chunks_used: u64,
    /// Data chunks free (freed chunks count once their release is committed).
    pub chunks_free: u64,
    /// Origins opened by this process.
    pub origins: Vec<OriginStatus>,
    /// Ids of origins bound but not opened.
    pub dormant_origins: Vec<String>,
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
    pub origins: BTreeMap<u32, Arc<OriginCore>>,
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
    /// Highest batch whose records are in the journal (written, perhaps not yet synced): what
    /// a killed process's successor replays, since the page cache outlives the process.
    pub written_epoch: AtomicU64,
    /// Held while records are taken from `pending` and appended to the journal, so that the
    /// journal keeps mutation order with several writers (lock order: journal, then meta).
    pub journal: Mutex<()>,
    /// Set when a commit failed: the store refuses further writes.
    pub failed: Mutex<Option<String>>,
    pub shutdown: AtomicBool,
    pub worker_wake: Condvar,
    pub worker_lock: Mutex<bool>,
    threads: Mutex<Vec<JoinHandle<()>>>,
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

fn io_err(store: &str, what: &str, e: std::io::Error) -> Error {
    Error::io(format!("COW store {store}: {what}"), e)
}

fn corrupt(store: &str, what: impl Into<String>) -> Error {
    Error::Corrupt {
        store: store.to_string(),
        what: what.into(),
    }
}

/// Reads and validates the current superblock.
pub(crate) fn read_superblock(storage: &dyn Storage) -> Result<Superblock> {
    let name = storage.name().to_string();
    let mut best: Option<Superblock> = None;
    let mut errors = Vec::new();
    for slot in 0..2u64 {
        let mut buf = vec![0u8; SB_SLOT as usize];
        storage
            .read_at(&mut buf, slot * SB_SLOT)
            .map_err(|e| io_err(&name, "reading the superblock", e))?;
        match Superblock::decode(&buf) {
            Ok(sb) => {
                if best.is_none_or(|b| sb.generation > b.generation) {
                    best = Some(sb);
                }
            }
            Err(e) => errors.push(format!(
                "superblock slot {slot} at byte {}: {e}",
                slot * SB_SLOT
            )),
        }
    }
    let sb = best.ok_or_else(|| corrupt(&name, errors.join("; ")))?;
    let len = storage
        .len()
        .map_err(|e| io_err(&name, "reading its size", e))?;
    let end = sb.layout.data_off + sb.layout.data_chunks * sb.layout.chunk_size as u64;
    if len < end {
        return Err(corrupt(
            &name,
            format!("it is {len} bytes but its superblock describes {end} bytes (truncated?)"),
        ));
    }
    Ok(sb)
}

/// What replaying a journal found.
pub(crate) struct Replay {
    pub meta: MetaState,
    /// Where the next batch goes, and its sequence number.
    pub pos: u64,
    pub seq: u64,
}

/// Loads the metadata: checkpoint plus journal replay.
///
/// Every valid batch of the pass is replayed when the store is read in the boot that wrote
/// the pass (a killed process leaves its writes in the page cache). After a reboot only the
/// batches some batch vouches for are (see [`format::encode_batch`]): the rest may name
/// data that never reached the media.
pub(crate) fn load_meta(storage: &dyn Storage, sb: &Superblock) -> Result<Replay> {
    let name = storage.name().to_string();
    let l = &sb.layout;
    let mut ck = vec![0u8; sb.ckpt_len as usize];
    storage
        .read_at(&mut ck, l.ckpt_area(sb.ckpt_slot))
        .map_err(|e| io_err(&name, "reading the checkpoint", e))?;
    if crc32c::crc32c(&ck) != sb.ckpt_crc {
        return Err(corrupt(
            &name,
            format!(
                "checkpoint in area {} at byte {} fails its checksum",
                sb.ckpt_slot,
                l.ckpt_area(sb.ckpt_slot)
            ),
        ));
    }
    let mut meta = format::decode_checkpoint(&ck, l.chunk_size).map_err(|e| {
        corrupt(
            &name,
            format!("checkpoint at byte {}: {e}", l.ckpt_area(sb.ckpt_slot)),
        )
    })?;
    if meta.data_chunks != l.data_chunks {
        return Err(corrupt(
            &name,
            "checkpoint and superblock disagree on the number of chunks",
        ));
    }
    let same_boot = sb.boot != [0; 16] && sb.boot == storage.boot_id();
    // Read the batches of this pass, in sequence, until the first that is not one.
    let mut batches = Vec::new();
    let mut pos = 0u64;
    let mut seq = sb.journal_seq;
    let mut head = vec![0u8; BATCH_HEADER];
    let mut vouched: i128 = sb.journal_seq as i128 - 1;
    while pos + BATCH_HEADER as u64 <= l.journal_size {
        storage
            .read_at(&mut head, l.journal_off + pos)
            .map_err(|e| io_err(&name, "reading the journal", e))?;
        let Some(h) = format::decode_batch_header(&head) else {
            break;
        };
        if h.gen != sb.journal_gen || h.seq != seq {
            break;
        }
        let total =
            (BATCH_HEADER as u64 + h.payload_len as u64).div_ceil(JOURNAL_ALIGN) * JOURNAL_ALIGN;
        if pos + total > l.journal_size {
            break;
        }
        let mut payload = vec![0u8; h.payload_len as usize];
        storage
            .read_at(&mut payload, l.journal_off + pos + BATCH_HEADER as u64)
            .map_err(|e| io_err(&name, "reading the journal", e))?;
        let Some(records) = format::decode_batch_payload(&head, &payload, &h) else {
            break;
        };
        vouched = vouched.max(h.vouched_upto());
        batches.push((pos, seq, records));
        pos += total;
        seq += 1;
    }
    // A batch is trusted if it was written in this boot, or if a later one vouches for it.
    let trusted = if same_boot {
        batches.len()
    } else {
        batches
            .iter()
            .take_while(|(_, s, _)| (*s as i128) <= vouched)
            .count()
    };
    let dropped = (batches.len() - trusted) as u64;
    for (at, s, records) in &batches[..trusted] {
        for r in records {
            meta.apply(r).map_err(|e| {
                corrupt(
                    &name,
                    format!("journal batch {s} at byte {}: {e}", l.journal_off + at),
                )
            })?;
        }
    }
    // A valid batch of this pass after the stop that vouches for the stopped one means a
    // damaged batch in the middle (an unvouched one may follow a lost one after a power cut).
    if let Some((at, later)) = later_batch(storage, sb, pos, seq)? {
        if same_boot || later.vouched_upto() >= seq as i128 {
            return Err(corrupt(
                &name,
                format!(
                    "journal batch {seq} at byte {} is damaged but a later batch follows at byte {}",
                    l.journal_off + pos,
                    l.journal_off + at
                ),
            ));
        }
    }
    if dropped > 0 {
        log::warn!(
            "COW store {name}: {dropped} journal batch(es) written before a reboot were never \
             synced and are not replayed (writes that were not flushed)"
        );
    }
    let (pos, seq) = match batches.get(trusted) {
        Some((at, s, _)) => (*at, *s),
        None => (pos, seq),
    };
    Ok(Replay { meta, pos, seq })
}

/// Looks for a valid batch of the current pass with a sequence number above `seq`, after `pos`.
fn later_batch(
    storage: &dyn Storage,
    sb: &Superblock,
    pos: u64,
    seq: u64,
) -> Result<Option<(u64, format::BatchHeader)>> {
    let l = &sb.layout;
    let name = storage.name().to_string();
    const WINDOW: u64 = 1 << 20;
    let mut at = pos + JOURNAL_ALIGN;
    while at + BATCH_HEADER as u64 <= l.journal_size {
        let len = WINDOW.min(l.journal_size - at) as usize;
        let mut buf = vec![0u8; len];
        storage
            .read_at(&mut buf, l.journal_off + at)
            .map_err(|e| io_err(&name, "reading the journal", e))?;
        for off in (0..len).step_by(JOURNAL_ALIGN as usize) {
            let Some(h) = format::decode_batch_header(&buf[off..]) else {
                continue;
            };
            if h.gen != sb.journal_gen || h.seq <= seq {
                continue;
            }
            let p = at + off as u64;
            if p + BATCH_HEADER as u64 + h.payload_len as u64 > l.journal_size {
                continue;
            }
            let mut payload = vec![0u8; h.payload_len as usize];
            storage
                .read_at(&mut payload, l.journal_off + p + BATCH_HEADER as u64)
                .map_err(|e| io_err(&name, "reading the journal", e))?;
            if format::decode_batch_payload(&buf[off..], &payload, &h).is_some() {
                return Ok(Some((p, h)));
            }
        }
        at += len as u64;
    }
    Ok(None)
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
        let ck = format::encode_checkpoint(&meta);
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
            written_epoch: AtomicU64::new(0),
            journal: Mutex::new(()),
            failed: Mutex::new(None),
            shutdown: AtomicBool::new(false),
            worker_wake: Condvar::new(),
            worker_lock: Mutex::new(false),
            threads: Mutex::new(Vec::new()),
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

    /// Binds a new origin file or device under `origin_id`.
    pub fn bind_origin(&self, origin_id: &str, origin_path: &Path, direct: bool) -> Result<Origin> {
        let st = FileStorage::open(origin_path, direct)
            .map_err(|e| Error::io(format!("opening origin {}", origin_path.display()), e))?;
        self.bind_origin_storage(origin_id, Arc::new(st))
    }

    /// Binds any storage as a new origin.
    pub fn bind_origin_storage(&self, origin_id: &str, origin: Arc<dyn Storage>) -> Result<Origin> {
        let core = &self.guard.core;
        if origin_id.is_empty() || origin_id.len() > format::MAX_ORIGIN_ID {
            return Err(Error::InvalidArgument(format!(
                "origin id {origin_id:?} must be 1 to {} bytes",
                format::MAX_ORIGIN_ID
            )));
        }
        let size = origin
            .len()
            .map_err(|e| Error::io(format!("reading the size of origin {}", origin.name()), e))?;
        if size == 0 || size % 512 != 0 {
            return Err(Error::InvalidArgument(format!(
                "origin {} is {size} bytes; it must be a non-empty multiple of 512",
                origin.name()
            )));
        }
        let epoch;
        let oc;
        {
            let mut m = core.lock_meta();
            if m.dormant.values().any(|o| o.id == origin_id)
                || m.origins.values().any(|o| o.id == origin_id)
            {
                return Err(Error::AlreadyExists(format!(
                    "origin {origin_id} in COW store {}",
                    core.name
                )));
            }
            let slot = m.next_slot;
            m.next_slot += 1;
            m.pending.push(Record::BindOrigin {
                slot,
                id: origin_id.to_string(),
                size,
            });
            let om = OriginMeta::new(origin_id.to_string(), size);
            oc = OriginCore::build(core.clone(), slot, &om, origin)?;
            m.origins.insert(slot, oc.clone());
            epoch = m.epoch;
        }
        core.request_commit();
        core.wait_durable(epoch)?;
        Ok(Origin::new(oc, self.guard.clone()))
    }

    /// Opens an origin bound earlier (by this or an earlier process).
    pub fn open_origin(&self, origin_id: &str, origin_path: &Path, direct: bool) -> Result<Origin> {
        let st = FileStorage::open(origin_path, direct)
            .map_err(|e| Error::io(format!("opening origin {}", origin_path.display()), e))?;
        self.open_origin_storage(origin_id, Arc::new(st))
    }

    /// Opens an origin bound earlier, on any storage.
    pub fn open_origin_storage(&self, origin_id: &str, origin: Arc<dyn Storage>) -> Result<Origin> {
        let core = &self.guard.core;
        let mut m = core.lock_meta();
        if let Some(o) = m.origins.values().find(|o| o.id == origin_id) {
            return Ok(Origin::new(o.clone(), self.guard.clone()));
        }
        let (slot, om) = m
            .dormant
            .iter()
            .find(|(_, o)| o.id == origin_id)
            .map(|(s, o)| (*s, o.clone()))
            .ok_or_else(|| {
                Error::NotFound(format!("origin {origin_id} in COW store {}", core.name))
            })?;
        let size = origin
            .len()
            .map_err(|e| Error::io(format!("reading the size of origin {}", origin.name()), e))?;
        if size != om.size {
            return Err(Error::InvalidArgument(format!(
                "origin {origin_id} ({}) is {size} bytes but was {} bytes when bound",
                origin.name(),
                om.size
            )));
        }
        let oc = OriginCore::build(core.clone(), slot, &om, origin)?;
        if om.overlays.is_empty() {
            m.dormant.remove(&slot);
            m.origins.insert(slot, oc.clone());
            drop(m);
        } else {
            // Writes a previous process acknowledged but had not yet put on the origin: their
            // copy-outs are durable (opening the store wrote a checkpoint), so they go onto the
            // origin now, before it is served.
            drop(m);
            oc.write_recovered(&om.overlays)?;
            let mut m = core.lock_meta();
            if m.origins.values().any(|o| o.id == origin_id) {
                return Err(Error::Busy(format!(
                    "origin {origin_id} in COW store {} was opened twice at once",
                    core.name
                )));
            }
            for (&chunk, &s) in &om.overlays {
                StoreCore::note_free(&mut m, s);
                m.pending.push(Record::OverlayDone { slot, chunk });
            }
            m.dormant.remove(&slot);
            m.origins.insert(slot, oc.clone());
            drop(m);
            core.commit_sync()?;
        }
        core.wake_worker();
        Ok(Origin::new(oc, self.guard.clone()))
    }

    /// Ids of every bound origin.
    pub fn origin_ids(&self) -> Vec<String> {
        let m = self.guard.core.lock_meta();
        m.dormant
            .values()
            .map(|o| o.id.clone())
            .chain(m.origins.values().map(|o| o.id.clone()))
            .collect()
    }

    /// Unbinds an origin with no snapshots. Its handles stop working.
    pub fn unbind_origin(&self, origin_id: &str) -> Result<()> {
        let core = &self.guard.core;
        let opened = core
            .lock_meta()
            .origins
            .values()
            .find(|o| o.id == origin_id)
            .cloned();
        if let Some(o) = opened {
            o.prepare_unbind()?;
        }
        let epoch;
        {
            let mut m = core.lock_meta();
            let slot = if let Some((s, o)) = m.dormant.iter().find(|(_, o)| o.id == origin_id) {
                if !o.tags.is_empty() || !o.exceptions.is_empty() {
                    return Err(Error::HasSnapshots(origin_id.to_string()));
                }
                if !o.overlays.is_empty() {
                    return Err(Error::Busy(format!(
                        "origin {origin_id} has {} acknowledged chunk write(s) not yet on it; open (export) it once so that they are written, then unbind it",
                        o.overlays.len()
                    )));
                }
                *s
            } else if let Some((s, o)) = m.origins.iter().find(|(_, o)| o.id == origin_id) {
                if !o.can_unbind() {
                    return Err(Error::HasSnapshots(origin_id.to_string()));
                }
                o.mark_unbound();
                *s
            } else {
                return Err(Error::NotFound(format!(
                    "origin {origin_id} in COW store {}",
                    core.name
                )));
            };
            m.dormant.remove(&slot);
            m.origins.remove(&slot);
            m.pending.push(Record::UnbindOrigin { slot });
            epoch = m.epoch;
        }
        core.request_commit();
        core.wait_durable(epoch)
    }

    /// Space and origins.
    pub fn status(&self) -> StoreStatus {
        let core = &self.guard.core;
        let (origins, dormant, used, free) = {
            let m = core.lock_meta();
            (
                m.origins.values().cloned().collect::<Vec<_>>(),
                m.dormant.values().map(|o| o.id.clone()).collect(),
                m.used,
                m.free.len() as u64,
            )
        };
        StoreStatus {
            path: core.name.clone(),
            chunk_size: core.layout.chunk_size,
            chunks_total: core.layout.data_chunks,
            chunks_used: used,
            chunks_free: free,
            origins: origins.iter().map(|o| o.status()).collect(),
            dormant_origins: dormant,
        }
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
    fn write_pending(&self, _journal: &MutexGuard<'_, ()>) -> std::result::Result<(), String> {
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
            let batch = format::encode_batch(m.sb.journal_gen, seq, unvouched, &records);
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
    fn append_batch(
        &self,
        batch: &[u8],
        seq: u64,
        pos: u64,
        has_records: bool,
    ) -> std::result::Result<bool, String> {
        if pos + batch.len() as u64 > self.layout.journal_size {
            self.checkpoint()?;
            return Ok(false);
        }
        self.storage
            .write_at(batch, self.layout.journal_off + pos)
            .map_err(|e| format!("writing journal batch {seq}: {e}"))?;
        let mut m = self.lock_meta();
        m.journal_pos = pos + batch.len() as u64;
        m.journal_seq = seq + 1;
        if has_records {
            m.last_records = seq as i64;
        }
        Ok(true)
    }

    fn set_written(&self, epoch: u64) {
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

    /// Takes a free store chunk, or says the store is full.
    pub(crate) fn alloc_chunk(&self, what: impl FnOnce() -> String) -> Result<u64> {
        Ok(self.alloc_chunks(1, what)?.pop().unwrap_or_default())
    }

    /// Takes `n` free store chunks at once, or none. Chunks freed but not yet committed can
    /// not be reused before their free is durable; when only they would make room, commit
    /// first rather than fail a write while `status` already counts them free.
    pub(crate) fn alloc_chunks(&self, n: usize, what: impl FnOnce() -> String) -> Result<Vec<u64>> {
        for first in [true, false] {
            let mut m = self.lock_meta();
            if m.free.len() >= n {
                let at = m.free.len() - n;
                return Ok(m.free.split_off(at));
            }
            if !first || m.free.len() + m.pending_free.len() < n {
                break;
            }
            drop(m);
            self.commit_sync()?;
        }
        Err(Error::NoSpace {
            store: self.name.clone(),
            what: what(),
        })
    }

    /// Returns a chunk taken by `alloc_chunk` that was never recorded.
    pub(crate) fn unalloc_chunk(&self, c: u64) {
        self.lock_meta().free.push(c);
    }

    pub(crate) fn wake_worker(&self) {
        let mut w = self.worker_lock.lock().unwrap_or_else(|e| e.into_inner());
        *w = true;
        self.worker_wake.notify_all();
    }

    fn set_durable(&self, epoch: u64) {
        self.written_epoch.fetch_max(epoch, SeqCst);
        let mut d = self.durable.lock().unwrap_or_else(|e| e.into_inner());
        *d = (*d).max(epoch);
        self.durable_epoch.store(*d, SeqCst);
        self.durable_cv.notify_all();
    }

    fn fail(&self, what: String) {
        log::error!("COW store {}: {what}; refusing further writes", self.name);
        *self.failed.lock().unwrap_or_else(|e| e.into_inner()) = Some(what);
        let _d = self.durable.lock().unwrap_or_else(|e| e.into_inner());
        self.durable_cv.notify_all();
    }

    /// The group-commit loop. A round hands every pending record to the journal (writers that
    /// could not wait may have written some already), syncs the origins whose restored chunks
    /// those records describe and the store, then appends a *seal*, an empty batch vouching
    /// for every batch written before the sync, and syncs again. Only then are the round's
    /// batches durable: after a power cut, replay trusts exactly the vouched-for batches.
    fn committer(self: Arc<Self>) {
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
            let epoch = match self.commit_round() {
                Ok(e) => e,
                Err(e) => {
                    self.fail(e);
                    return;
                }
            };
            self.release_freed(epoch);
            self.set_durable(epoch);
            // Origin writes held back for this batch's copy-outs can go to the origins now.
            let origins: Vec<Arc<OriginCore>> =
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
    fn commit_round(&self) -> std::result::Result<u64, String> {
        let (epoch, gen, upto, origin_sync) = {
            let j = self.journal.lock().unwrap_or_else(|e| e.into_inner());
            self.write_pending(&j)?;
            let mut m = self.lock_meta();
            let origin_sync: Vec<Arc<OriginCore>> = std::mem::take(&mut m.pending_origin_sync)
                .iter()
                .filter_map(|s| m.origins.get(s).cloned())
                .collect();
            (m.epoch - 1, m.sb.journal_gen, m.last_records, origin_sync)
        };
        for o in &origin_sync {
            o.sync_origin()
                .map_err(|e| format!("syncing origin {}: {e}", o.id))?;
        }
        // Data first: the copies a record points at must be durable before a batch vouches
        // for the record.
        self.storage
            .sync()
            .map_err(|e| format!("syncing data: {e}"))?;
        let seal = {
            let _j = self.journal.lock().unwrap_or_else(|e| e.into_inner());
            let m = self.lock_meta();
            if m.sb.journal_gen != gen || m.vouched >= upto {
                // Nothing new to vouch for, or a checkpoint made it all durable meanwhile.
                None
            } else {
                let seq = m.journal_seq;
                let batch = format::encode_batch(gen, seq, (seq as i64 - upto) as u32, &[]);
                let pos = m.journal_pos;
                drop(m);
                self.append_batch(&batch, seq, pos, false)?.then_some(seq)
            }
        };
        if let Some(seq) = seal {
            self.storage
                .sync()
                .map_err(|e| format!("syncing journal seal {seq}: {e}"))?;
            let mut m = self.lock_meta();
            if m.sb.journal_gen == gen {
                m.vouched = m.vouched.max(upto);
            }
        }
        Ok(epoch)
    }

    fn release_freed(&self, epoch: u64) {
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
    fn checkpoint(&self) -> std::result::Result<(), String> {
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
            let origin_sync: Vec<Arc<OriginCore>> = std::mem::take(&mut m.pending_origin_sync)
                .iter()
                .filter_map(|s| m.origins.get(s).cloned())
                .collect();
            (state, m.sb, epoch, origin_sync)
        };
        for o in &origin_sync {
            o.sync_origin()
                .map_err(|e| format!("syncing origin {}: {e}", o.id))?;
        }
        self.storage
            .sync()
            .map_err(|e| format!("syncing data: {e}"))?;
        let ck = format::encode_checkpoint(&state);
        if ck.len() as u64 > self.layout.ckpt_size {
            return Err(format!(
                "metadata ({} bytes) outgrew the checkpoint area ({} bytes)",
                ck.len(),
                self.layout.ckpt_size
            ));
        }
        let slot = 1 - sb.ckpt_slot;
        self.storage
            .write_at(&ck, self.layout.ckpt_area(slot))
            .map_err(|e| format!("writing checkpoint: {e}"))?;
        self.storage
            .sync()
            .map_err(|e| format!("syncing checkpoint: {e}"))?;
        let new_sb = Superblock {
            generation: sb.generation + 1,
            layout: sb.layout,
            ckpt_slot: slot,
            ckpt_len: ck.len() as u64,
            ckpt_crc: crc32c::crc32c(&ck),
            journal_gen: sb.journal_gen.wrapping_add(1),
            journal_seq: 0,
            boot: self.storage.boot_id(),
        };
        self.storage
            .write_at(&new_sb.encode(), (new_sb.generation % 2) * SB_SLOT)
            .map_err(|e| format!("writing superblock: {e}"))?;
        self.storage
            .sync()
            .map_err(|e| format!("syncing superblock: {e}"))?;
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
            ck.len()
        );
        Ok(())
    }

    /// Final commit and thread shutdown.
    fn close(&self) {
        if self.shutdown.load(SeqCst) {
            return;
        }
        let _ = self.commit_sync();
        // Acknowledged origin writes still held in overlays go to their origins, and every
        // origin is synced: a clean close loses nothing.
        let origins: Vec<Arc<OriginCore>> = self.lock_meta().origins.values().cloned().collect();
        for o in origins {
            o.drain_overlays(true);
            if let Err(e) = o.sync_origin() {
                log::error!("origin {}: sync at close: {e}", o.id);
            }
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

    /// Marks allocation of a recorded exception (under the metadata lock).
    pub(crate) fn note_alloc(m: &mut MetaCore, c: u64) {
        bit_set(&mut m.alloc, c, true);
        m.used += 1;
    }

    /// Marks a freed exception's chunk; reusable after its batch is durable.
    pub(crate) fn note_free(m: &mut MetaCore, c: u64) {
        bit_set(&mut m.alloc, c, false);
        m.used -= 1;
        let e = m.epoch;
        m.pending_free.push((e, c));
    }
}

/// Background work: rollback copy-back and reclaim of what deleted snapshots used.
fn worker_loop(store: Weak<StoreCore>) {
    loop {
        let Some(core) = store.upgrade() else { return };
        if core.shutdown.load(SeqCst) {
            return;
        }
        let origins: Vec<Arc<OriginCore>> = core.lock_meta().origins.values().cloned().collect();
        let mut busy = false;
        for o in &origins {
            if core.shutdown.load(SeqCst) {
                return;
            }
            match o.background_step() {
                Ok(more) => busy |= more,
                Err(e) => log::error!("origin {}: background work failed: {e}", o.id),
            }
        }
        drop(origins);
        if !busy {
            let mut w = core.worker_lock.lock().unwrap_or_else(|e| e.into_inner());
            if !*w {
                w = core
                    .worker_wake
                    .wait_timeout(w, Duration::from_millis(1000))
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
            *w = false;
        }
    }
}
