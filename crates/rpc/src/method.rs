//! One type per management method, tying its name to its parameter and result types. The
//! client calls `RpcClient::call::<M>(&params)`; the daemon builds its dispatch table from the
//! same types, so the two cannot disagree on a name or a shape.

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::methods::{self as m, names};

/// A management method.
pub trait Method {
    /// The method's name on the wire.
    const NAME: &'static str;
    /// Its parameters (an object; methods without parameters take [`m::NoParams`]).
    type Params: Serialize + DeserializeOwned;
    /// Its result.
    type Result: Serialize + DeserializeOwned;
}

macro_rules! methods {
    ($($(#[$doc:meta])* $ty:ident = $name:path, $params:ty => $result:ty;)*) => {
        $(
            $(#[$doc])*
            #[derive(Debug, Clone, Copy)]
            pub enum $ty {}

            impl Method for $ty {
                const NAME: &'static str = $name;
                type Params = $params;
                type Result = $result;
            }
        )*

        /// Every method's name, in the order of the table above (the order of [`names::ALL`]).
        pub const NAMES: &[&str] = &[$(<$ty as Method>::NAME),*];
    };
}

methods! {
    /// `origin_create`: export an origin, opening (and optionally formatting) its store.
    OriginCreate = names::ORIGIN_CREATE, m::OriginCreateParams => m::ExportInfo;
    /// `snapshot_export`: export a snapshot.
    SnapshotExport = names::SNAPSHOT_EXPORT, m::SnapshotExportParams => m::ExportInfo;
    /// `export_remove`: stop serving an export.
    ExportRemove = names::EXPORT_REMOVE, m::ExportRemoveParams => m::Done;
    /// `snapshot_create`: take a snapshot of what an export serves.
    SnapshotCreate = names::SNAPSHOT_CREATE, m::SnapshotCreateParams => m::SnapshotCreateResult;
    /// `snapshot_delete`: delete a snapshot.
    SnapshotDelete = names::SNAPSHOT_DELETE, m::SnapshotDeleteParams => m::Done;
    /// `origin_delete`: unbind an origin from its store and stop its export.
    OriginDelete = names::ORIGIN_DELETE, m::ExportRemoveParams => m::Done;
    /// `snapshot_rollback`: roll an origin back to a snapshot.
    SnapshotRollback = names::SNAPSHOT_ROLLBACK, m::SnapshotRollbackParams => m::SnapshotRollbackResult;
    /// `snapshot_list`: the snapshot trees.
    SnapshotList = names::SNAPSHOT_LIST, m::OptionalNameParams => m::SnapshotList;
    /// `export_list`: the exports.
    ExportList = names::EXPORT_LIST, m::NoParams => m::ExportList;
    /// `status`: stores and origins.
    Status = names::STATUS, m::OptionalNameParams => m::Status;
    /// `snapshot_diff`: the chunks that may differ between two versions.
    SnapshotDiff = names::SNAPSHOT_DIFF, m::SnapshotDiffParams => m::SnapshotDiffResult;
    /// `snapshot_stream`: stream a version into a FIFO or a file.
    SnapshotStream = names::SNAPSHOT_STREAM, m::SnapshotStreamParams => m::SnapshotStreamResult;
    /// `stats`: per-export I/O statistics and per-store space.
    Stats = names::STATS, m::OptionalNameParams => m::Stats;
    /// `snapshot_memo`: change a snapshot's memo.
    SnapshotMemo = names::SNAPSHOT_MEMO, m::SnapshotMemoParams => m::SnapshotMemoResult;
    /// `export_rename`: rename an export (socket path and disk serial kept).
    ExportRename = names::EXPORT_RENAME, m::ExportRenameParams => m::ExportInfo;
    /// `export_release`: hand an origin's store over (live migration, source side).
    ExportRelease = names::EXPORT_RELEASE, m::ExportReleaseParams => m::ExportReleaseResult;
    /// `export_acquire`: take a store over (live migration, destination side).
    ExportAcquire = names::EXPORT_ACQUIRE, m::ExportAcquireParams => m::ExportInfo;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_method_has_a_type() {
        assert_eq!(NAMES, names::ALL);
    }
}
