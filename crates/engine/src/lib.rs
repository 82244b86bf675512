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
mod registry;
mod storage;
mod store;
#[cfg(feature = "test-support")]
pub mod testing;
mod volume;

pub use check::{check, check_storage, CheckReport};
pub use error::{CommitFailed, Error, ErrorKind, Result};
pub use origin::{
    GroupError, OriginStatus, ReadMapping, ReadSegment, ReadSource, RollbackProgress, SnapshotInfo,
};
pub use registry::{snapshot_group, Origin, StoreStatus};
pub use storage::{current_boot_id, in_use, BootId, FileStorage, InUse, OpenMode, ReadFd, Storage};
pub use store::{CommitStats, FormatOptions, Store};
pub use volume::Volume;
