//! snapmv's multi-version copy-on-write engine.
//!
//! An *origin* keeps its current data in place in its own file or device. A *COW store* holds
//! every snapshot's differing data and all metadata, for one or more origins. Snapshots (of
//! the origin or of other snapshots) are readable and writable, and any of them can be rolled
//! back onto the origin while it is in use. See `docs/design.md` and `docs/format.md`.

mod check;
mod error;
mod gate;
mod iov;
mod meta;
mod ondisk;
mod origin;
mod recovery;
mod storage;
mod store;
#[cfg(feature = "test-support")]
pub mod testing;
mod volume;

pub use check::{check, check_storage, CheckReport};
pub use error::{Error, Result};
pub use origin::{OriginStatus, RollbackProgress, SnapshotInfo};
pub use storage::{current_boot_id, in_use, BootId, FileStorage, InUse, OpenMode, Storage};
pub use store::{FormatOptions, Store, StoreStatus};
pub use volume::Volume;

use origin::OriginCore;
use std::sync::Arc;
use store::Guard;

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
    /// not. Durable when it returns.
    pub fn create_snapshot(&self, of: Option<u32>, memo: &str) -> Result<u32> {
        self.core.create_snapshot(of, memo)
    }

    /// Deletes snapshot `tag`. Its space is reclaimed in the background.
    pub fn delete_snapshot(&self, tag: u32) -> Result<()> {
        self.core.delete_snapshot(tag)
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
