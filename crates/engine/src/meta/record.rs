//! Journal records: every metadata change, as data (encoded by `ondisk::journal`).

use super::NodeMeta;

/// A metadata change. Every mutation of the in-memory metadata emits one or more records, in
/// the same critical section, and a batch of records reaches the journal atomically.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// An origin was bound under `slot`.
    BindOrigin { slot: u32, id: String, size: u64 },
    /// The origin in `slot` was unbound.
    UnbindOrigin { slot: u32 },
    /// A version node was created.
    NewNode {
        slot: u32,
        node: u32,
        meta: NodeMeta,
    },
    /// Leaf `node` stopped taking writes (its tag moved to a new leaf).
    Freeze { slot: u32, node: u32 },
    /// Snapshot `tag` was deleted; its leaf is dead.
    DeleteTag { slot: u32, tag: u32 },
    /// Exception: chunk `chunk` of version `node` lives in store chunk `store` (allocated).
    AddException {
        slot: u32,
        chunk: u64,
        node: u32,
        store: u64,
    },
    /// The exception of `node` for `chunk` was dropped and its store chunk freed.
    FreeException { slot: u32, chunk: u64, node: u32 },
    /// Rollback of `tag` from frozen node `source` began.
    RollbackStart { slot: u32, tag: u32, source: u32 },
    /// Origin chunk `chunk` holds the rollback source's data.
    Restored { slot: u32, chunk: u64 },
    /// The rollback finished.
    RollbackDone { slot: u32 },
    /// Origin chunk `chunk`'s newest content, acknowledged but not yet on the origin, is in
    /// store chunk `store` (allocated).
    OverlayAt { slot: u32, chunk: u64, store: u64 },
    /// The pending content of origin chunk `chunk` is on the origin; its store chunk is free,
    /// unless an exception shares it (`ShareOverlay`).
    OverlayDone { slot: u32, chunk: u64 },
    /// Version `node` (a new chain node) takes the store chunk of origin chunk `chunk`'s
    /// pending write as its exception (format 3): a snapshot cut while the overlay exists. The
    /// chunk stays allocated until both the exception and the pending write let go of it.
    ShareOverlay { slot: u32, chunk: u64, node: u32 },
    /// Snapshot `tag`'s memo is now `memo` (format 4; set on the tag's leaf).
    SetMemo { slot: u32, tag: u32, memo: String },
    /// Version `node` reads zeros at `chunk` with no store chunk (format 4): a zero exception
    /// ([`super::ZERO_CHUNK`]). It replaces the node's exception if it has one (whose store
    /// chunk is freed), else it is added.
    ZeroException { slot: u32, chunk: u64, node: u32 },
}
