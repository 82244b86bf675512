//! The store's registry of origins, above `store` and `origin`: binding, opening and
//! unbinding origins, the store's status, and the public [`Origin`] handle.

use crate::error::{Error, Result};
use crate::meta::{OriginMeta, Record, MAX_ORIGIN_ID};
use crate::origin::{GroupError, Member, OriginCore, OriginStatus, RollbackProgress, SnapshotInfo};
use crate::storage::{FileStorage, Storage};
use crate::store::{AttachedOrigin, Guard, Store, StoreCore};
use crate::volume::Volume;
use std::path::Path;
use std::sync::Arc;

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

/// An origin bound to a store. Cheap to clone.
#[derive(Clone)]
pub struct Origin {
    core: Arc<OriginCore>,
    guard: Arc<Guard>,
}

impl std::fmt::Debug for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Origin({})", self.core.id)
    }
}

impl Origin {
    pub(crate) fn new(core: Arc<OriginCore>, guard: Arc<Guard>) -> Self {
        Origin { core, guard }
    }

    /// The origin id.
    pub fn id(&self) -> &str {
        &self.core.id
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.core.size
    }

    /// The origin as a volume.
    pub fn volume(&self) -> Volume {
        Volume {
            core: self.core.clone(),
            snap: None,
            _guard: self.guard.clone(),
        }
    }

    /// Snapshot `tag` as a volume.
    pub fn snapshot_volume(&self, tag: u32) -> Result<Volume> {
        Ok(Volume {
            core: self.core.clone(),
            snap: Some(self.core.snapshot_handle(tag)?),
            _guard: self.guard.clone(),
        })
    }

    /// Takes a snapshot of the origin (`of: None`) or of snapshot `of`; returns its tag.
    /// Writes that completed before the call are in it, writes issued after it returned are
    /// not (a write in flight is wholly in or wholly out). Returns once its records are in the
    /// journal, without a sync: it survives the death of the process as it is; it survives a
    /// host crash once a commit round has run (the next one is requested; any later flush of
    /// a volume of the store waits for one), holding every write *flushed* before the call —
    /// README "Crash behaviour". [`Origin::create_snapshot_sync`] returns once durable.
    pub fn create_snapshot(&self, of: Option<u32>, memo: &str) -> Result<u32> {
        self.core.create_snapshot(of, memo, false)
    }

    /// [`Origin::create_snapshot`], returning once the snapshot survives a host crash holding
    /// every write completed before the call (an origin fsync and a commit round, run after
    /// the origin's writes are let through again).
    pub fn create_snapshot_sync(&self, of: Option<u32>, memo: &str) -> Result<u32> {
        self.core.create_snapshot(of, memo, true)
    }

    /// Deletes snapshot `tag`. Its space is reclaimed in the background. Returns once the
    /// delete is in the journal: a host crash before the next commit round may bring the
    /// snapshot back, whole. [`Origin::delete_snapshot_sync`] returns once durable.
    pub fn delete_snapshot(&self, tag: u32) -> Result<()> {
        self.core.delete_snapshot(tag, false)
    }

    /// [`Origin::delete_snapshot`], returning once the delete survives a host crash.
    pub fn delete_snapshot_sync(&self, tag: u32) -> Result<()> {
        self.core.delete_snapshot(tag, true)
    }

    /// Rolls the origin back to snapshot `tag`. Takes effect when it returns; the copy-back
    /// runs in the background and resumes after a restart.
    pub fn rollback(&self, tag: u32) -> Result<()> {
        self.core.rollback(tag)
    }

    /// Progress of a rollback in progress.
    pub fn rollback_progress(&self) -> Option<RollbackProgress> {
        self.core.rollback_progress()
    }

    /// Waits until no rollback is in progress. Fails with `NoSpace` if the copy-back is
    /// stalled because the store is full (delete a snapshot to let it go on).
    pub fn wait_rollback(&self) -> Result<()> {
        while self.core.rollback_progress().is_some() {
            self.core.check_alive()?;
            if let Some(e) = self.core.rollback_stalled() {
                return Err(e);
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        Ok(())
    }

    /// Replaces snapshot `tag`'s memo (at most 256 bytes); returns once the change survives a
    /// host crash.
    pub fn set_memo(&self, tag: u32, memo: &str) -> Result<()> {
        self.core.set_memo(tag, memo)
    }

    /// Live snapshots, by tag.
    pub fn snapshots(&self) -> Vec<SnapshotInfo> {
        self.core.snapshots()
    }

    /// The store's chunk size in bytes.
    pub fn chunk_size(&self) -> u64 {
        self.core.chunk_size()
    }

    /// Byte ranges `(offset, length)`, sorted and merged, covering every chunk whose content
    /// may differ between version `from` and version `to` (`None`: the origin as it is now),
    /// computed from metadata: no data is read. Never omits a chunk that may differ; leaves
    /// out every chunk both versions read from the same place.
    pub fn diff(&self, from: Option<u32>, to: Option<u32>) -> Result<Vec<(u64, u64)>> {
        self.core.diff_extents(from, to)
    }

    /// State of the origin.
    pub fn status(&self) -> OriginStatus {
        self.core.status()
    }
}

/// Snapshots several volumes at one instant (a consistency group): each `(origin, of)` is the
/// origin (`of: None`) or its snapshot `of`; origins may be in one store or several, one volume
/// per origin. Every volume's writes are held back before any is cut, so a write completed
/// before another was issued (to any member) is in every snapshot that holds the later one.
/// Returns the new tags in the given order, when [`Origin::create_snapshot`] would (with
/// `sync`: [`Origin::create_snapshot_sync`]). All or nothing: on a failure the snapshots
/// already cut are deleted again, and the error names the member. Members in one store are
/// recorded in one journal batch; across stores a death of the process between their
/// batches can leave part of the group (the caller did not get an answer).
pub fn snapshot_group(
    volumes: &[(&Origin, Option<u32>)],
    memo: &str,
    sync: bool,
) -> std::result::Result<Vec<u32>, GroupError> {
    let members: Vec<Member> = volumes
        .iter()
        .map(|(o, of)| Member {
            core: o.core.clone(),
            of: *of,
        })
        .collect();
    crate::origin::snapshot_group(&members, memo, sync)
}

/// The origin behind an entry of the store's map (this module is the only one that inserts,
/// and inserts only `OriginCore`s).
fn core_of(o: &Arc<dyn AttachedOrigin>) -> Arc<OriginCore> {
    match o.clone().into_any().downcast::<OriginCore>() {
        Ok(c) => c,
        Err(_) => unreachable!("the store's origin map holds only OriginCore"),
    }
}

impl Store {
    /// Binds a new origin file or device under `origin_id`.
    pub fn bind_origin(&self, origin_id: &str, origin_path: &Path, direct: bool) -> Result<Origin> {
        let st = FileStorage::open(origin_path, direct)
            .map_err(|e| Error::io(format!("opening origin {}", origin_path.display()), e))?;
        self.bind_origin_storage(origin_id, Arc::new(st))
    }

    /// Binds any storage as a new origin.
    pub fn bind_origin_storage(&self, origin_id: &str, origin: Arc<dyn Storage>) -> Result<Origin> {
        let core = &self.guard.core;
        if origin_id.is_empty() || origin_id.len() > MAX_ORIGIN_ID {
            return Err(Error::InvalidArgument(format!(
                "origin id {origin_id:?} must be 1 to {} bytes",
                MAX_ORIGIN_ID
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
                || m.origins.values().any(|o| o.id() == origin_id)
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
            m.origins
                .insert(slot, oc.clone() as Arc<dyn AttachedOrigin>);
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
        if let Some(o) = m.origins.values().find(|o| o.id() == origin_id) {
            return Ok(Origin::new(core_of(o), self.guard.clone()));
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
            m.origins
                .insert(slot, oc.clone() as Arc<dyn AttachedOrigin>);
            drop(m);
        } else {
            // Writes a previous process acknowledged but had not yet put on the origin: their
            // copy-outs are durable (opening the store wrote a checkpoint), so they go onto the
            // origin now, before it is served.
            drop(m);
            oc.write_recovered(&om.overlays)?;
            let mut m = core.lock_meta();
            if m.origins.values().any(|o| o.id() == origin_id) {
                return Err(Error::Busy(format!(
                    "origin {origin_id} in COW store {} was opened twice at once",
                    core.name
                )));
            }
            for (&chunk, &s) in &om.overlays {
                // (A snapshot's exception may share the chunk: then it stays.)
                if !om.shares(chunk, s) {
                    StoreCore::note_free(&mut m, s);
                }
                m.pending.push(Record::OverlayDone { slot, chunk });
            }
            m.dormant.remove(&slot);
            m.origins
                .insert(slot, oc.clone() as Arc<dyn AttachedOrigin>);
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
            .chain(m.origins.values().map(|o| o.id().to_string()))
            .collect()
    }

    /// Unbinds an origin with no snapshots. Its handles stop working.
    pub fn unbind_origin(&self, origin_id: &str) -> Result<()> {
        let core = &self.guard.core;
        let opened = core
            .lock_meta()
            .origins
            .values()
            .find(|o| o.id() == origin_id)
            .map(core_of);
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
            } else if let Some((s, o)) = m.origins.iter().find(|(_, o)| o.id() == origin_id) {
                let o = core_of(o);
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

    /// Commit rounds since the store was opened, and how long they took.
    pub fn commit_stats(&self) -> crate::store::CommitStats {
        self.guard.core.commits.snapshot()
    }

    /// Data chunks in all and free now: [`Store::status`]'s space without its origins (cheap,
    /// for a watch).
    pub fn space(&self) -> (u64, u64) {
        let core = &self.guard.core;
        let free = core.lock_meta().free.len() as u64;
        (core.layout.data_chunks, free)
    }

    /// Space and origins.
    pub fn status(&self) -> StoreStatus {
        let core = &self.guard.core;
        let (origins, dormant, used, free) = {
            let m = core.lock_meta();
            (
                m.origins.values().map(core_of).collect::<Vec<_>>(),
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
}
