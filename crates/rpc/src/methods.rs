//! Parameters and results of every management method (see `docs/rpc.md`).
//!
//! Defaults and limits of the parameters are in [`crate::limits`].
//!
//! Parameter structs reject unknown fields, so a misspelt parameter is an `invalid params`
//! error rather than a silently ignored option.

use serde::{Deserialize, Serialize};

/// Method names.
pub mod names {
    /// Export an origin, opening (and optionally formatting) its store and binding it.
    pub const ORIGIN_CREATE: &str = "origin_create";
    /// Export a snapshot.
    pub const SNAPSHOT_EXPORT: &str = "snapshot_export";
    /// Stop serving an export.
    pub const EXPORT_REMOVE: &str = "export_remove";
    /// Take a snapshot of what an export serves.
    pub const SNAPSHOT_CREATE: &str = "snapshot_create";
    /// Delete a snapshot.
    pub const SNAPSHOT_DELETE: &str = "snapshot_delete";
    /// Unbind an origin from its store and stop its export.
    pub const ORIGIN_DELETE: &str = "origin_delete";
    /// Roll an origin back to a snapshot.
    pub const SNAPSHOT_ROLLBACK: &str = "snapshot_rollback";
    /// The snapshot trees.
    pub const SNAPSHOT_LIST: &str = "snapshot_list";
    /// The exports.
    pub const EXPORT_LIST: &str = "export_list";
    /// Stores and origins: space, snapshots, rollback and reclaim progress.
    pub const STATUS: &str = "status";

    /// The chunks that may differ between two versions of an origin (from metadata).
    pub const SNAPSHOT_DIFF: &str = "snapshot_diff";
    /// Stream a version (whole, or what changed since another) into a FIFO (see
    /// `docs/format.md`, "Backup streams").
    pub const SNAPSHOT_STREAM: &str = "snapshot_stream";
    /// Per-export I/O statistics and per-store space.
    pub const STATS: &str = "stats";
    /// Change a snapshot's memo.
    pub const SNAPSHOT_MEMO: &str = "snapshot_memo";
    /// Rename an export.
    pub const EXPORT_RENAME: &str = "export_rename";

    /// Live migration, source side: flush an origin's export, stop it and close its store so
    /// that another daemon can take it (docs/migration.md).
    pub const EXPORT_RELEASE: &str = "export_release";
    /// Live migration, destination side: open the store of an export created with
    /// `incoming` (waiting, bounded, for the source to release it) and serve it.
    pub const EXPORT_ACQUIRE: &str = "export_acquire";

    /// Every method, in documentation order.
    pub const ALL: &[&str] = &[
        ORIGIN_CREATE,
        SNAPSHOT_EXPORT,
        EXPORT_REMOVE,
        SNAPSHOT_CREATE,
        SNAPSHOT_DELETE,
        ORIGIN_DELETE,
        SNAPSHOT_ROLLBACK,
        SNAPSHOT_LIST,
        EXPORT_LIST,
        STATUS,
        SNAPSHOT_DIFF,
        SNAPSHOT_STREAM,
        STATS,
        SNAPSHOT_MEMO,
        EXPORT_RENAME,
        EXPORT_RELEASE,
        EXPORT_ACQUIRE,
    ];
}

/// `protocol` value of a vhost-user-blk export (the default).
pub const PROTOCOL_VHOST: &str = "vhost-user-blk";
/// `protocol` value of an NBD export.
pub const PROTOCOL_NBD: &str = "nbd";

/// `origin_create` parameters.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OriginCreateParams {
    /// Export name, `[A-Za-z0-9._-]{1,64}`.
    pub name: String,
    /// Path of the origin file or block device (must exist).
    pub origin: String,
    /// Path of the COW store file or block device (must exist).
    pub cow: String,
    /// Origin id inside the store; default: the origin's file name (characters outside
    /// `[A-Za-z0-9._-]` replaced by `_`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin_id: Option<String>,
    /// Bind the origin to the store (a new binding). Without it the origin must be bound.
    #[serde(default)]
    pub bind: bool,
    /// Format the store first; refused if it already holds a store.
    #[serde(default)]
    pub format: bool,
    /// Format the store first even if it already holds one (destroys its snapshots).
    #[serde(default)]
    pub force_format: bool,
    /// Chunk size when formatting, in 4 KiB pages: a power of two from 1 to 256, default 1
    /// ([`crate::limits`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunk_size: Option<u32>,
    /// Number of virtqueues offered to the guest: 1 to 64, default 4 ([`crate::limits`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_queues: Option<u16>,
    /// Largest virtqueue size: a power of two up to 32768, default 1024 ([`crate::limits`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_size: Option<u16>,
    /// Serve the volume read-only.
    #[serde(default)]
    pub readonly: bool,
    /// Take the origin's and the store's RBD images over from their current owner, believed
    /// dead: its lock is broken and it is blocklisted (fenced) first. `rbd:` images only; not
    /// with `format`/`force_format`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub takeover: bool,
    /// Open the origin and the store with O_DIRECT.
    #[serde(default)]
    pub direct: bool,
    /// Socket path; default `SOCKET_DIR/NAME.sock`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<String>,
    /// Group of the export's socket: a group name (from /etc/group) or a numeric gid
    /// (default: the daemon's `--socket-group`, else the daemon's group).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket_group: Option<String>,
    /// Mode of the export's socket, octal, e.g. `"0660"` (default: the daemon's
    /// `--socket-mode`, else `0600`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket_mode: Option<String>,
    /// `"vhost-user-blk"` (default) or `"nbd"`: serve the export as an NBD server on the
    /// socket, export name NAME (docs/nbd.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    /// The destination of a live migration: serve the socket now (the frontend may connect
    /// and read the configuration space) but open nothing; the store is opened by
    /// `export_acquire` once the source daemon released it. The origin must be bound to the
    /// store already; `chunk_size` is then the store's chunk size (default 1), announced as
    /// the physical block size and checked when the store is opened.
    #[serde(default)]
    pub incoming: bool,
}

/// `export_release` parameters.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportReleaseParams {
    /// The origin's export. Its guest must have stopped using it (QEMU's migration
    /// `completed`): the export is stopped, connected or not.
    pub name: String,
}

/// `export_acquire` parameters.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportAcquireParams {
    /// An export created with `incoming` (or one that could not be re-created at start).
    pub name: String,
    /// How long to wait for another process to release the store, in seconds (default 60).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_secs: Option<u64>,
    /// The guest's cache mode, as `export_release` reported it on the source (`true`:
    /// write-back). Absent: the export keeps its mode (an incoming export starts
    /// write-through, which is safe whatever the guest chose).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub writeback: Option<bool>,
}

/// `export_release` result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExportReleaseResult {
    /// Export name.
    pub name: String,
    /// The cache mode the guest had set (`true`: write-back, `false`: write-through), to give
    /// to `export_acquire` on the destination.
    pub writeback: bool,
}

/// `snapshot_export` parameters. One of `origin_id` and `origin` is required.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotExportParams {
    /// Export name, `[A-Za-z0-9._-]{1,64}`.
    pub name: String,
    /// Origin id inside the store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin_id: Option<String>,
    /// Path of the origin.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
    /// Path of the COW store.
    pub cow: String,
    /// The snapshot's tag.
    pub tag: u32,
    /// Number of virtqueues offered to the guest: 1 to 64, default 4 ([`crate::limits`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_queues: Option<u16>,
    /// Largest virtqueue size: a power of two up to 32768, default 1024 ([`crate::limits`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_size: Option<u16>,
    /// Serve the snapshot read-only.
    #[serde(default)]
    pub readonly: bool,
    /// Open the origin and the store with O_DIRECT when they are not open yet.
    #[serde(default)]
    pub direct: bool,
    /// Socket path; default `SOCKET_DIR/NAME.sock`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<String>,
    /// Group of the export's socket: a group name (from /etc/group) or a numeric gid
    /// (default: the daemon's `--socket-group`, else the daemon's group).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket_group: Option<String>,
    /// Mode of the export's socket, octal, e.g. `"0660"` (default: the daemon's
    /// `--socket-mode`, else `0600`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket_mode: Option<String>,
    /// `"vhost-user-blk"` (default) or `"nbd"`: serve the export as an NBD server on the
    /// socket, export name NAME (docs/nbd.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
}

/// Parameters that are only an export name (`export_remove`, `origin_delete`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NameParams {
    /// Export name.
    pub name: String,
}

/// `export_remove` and `origin_delete` parameters.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportRemoveParams {
    /// Export name.
    pub name: String,
    /// Stop the export even while a client (a guest) is connected: the guest loses its disk.
    #[serde(default)]
    pub force: bool,
}

/// Parameters with an optional export name (`snapshot_list`, `status`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptionalNameParams {
    /// Export name; absent: everything.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// `export_list` parameters (none).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoParams {}

/// `snapshot_create` parameters: `name`, or `names` for a consistency group.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotCreateParams {
    /// Export of the origin (snapshot of the origin) or of a snapshot (snapshot of it).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    /// Instead of `name`: exports of several origins (in one store or several), snapshotted
    /// at one instant, all or nothing (a consistency group; one export per origin).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub names: Vec<String>,
    /// A note stored with the snapshot (with `names`: with each of them).
    #[serde(default)]
    pub memo: String,
    /// Snapshot this snapshot of the origin instead (dm-snap-mv `dms s NAME TAG`): `name` must
    /// then be an export of the origin; snapshot `tag` need not be exported. Not with `names`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<u32>,
    /// Answer only once the snapshot survives a host crash (a commit round; see
    /// docs/rpc.md). Without it the answer comes once the snapshot survives the daemon's death.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub sync: bool,
}

/// `snapshot_create` result: `tag` for `name`, `tags` for `names`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotCreateResult {
    /// The new snapshot's tag (a create with `name`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<u32>,
    /// Each export's new snapshot, in the order of `names` (a create with `names`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tags: Option<Vec<NamedTag>>,
}

/// A snapshot taken through an export.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NamedTag {
    /// The export.
    pub name: String,
    /// The new snapshot's tag.
    pub tag: u32,
}

/// `snapshot_memo` parameters.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotMemoParams {
    /// An export of the origin or of one of its snapshots (names the origin).
    pub name: String,
    /// The snapshot.
    pub tag: u32,
    /// The new memo (at most 256 bytes; empty clears it).
    pub memo: String,
}

/// `snapshot_memo` result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotMemoResult {
    /// The export given.
    pub name: String,
    /// The snapshot.
    pub tag: u32,
    /// Its memo now.
    pub memo: String,
}

/// `export_rename` parameters.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportRenameParams {
    /// The export's name.
    pub name: String,
    /// Its new name.
    pub new_name: String,
}

/// `snapshot_delete` parameters.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotDeleteParams {
    /// Export of the origin.
    pub name: String,
    /// Tag of the snapshot to delete.
    pub tag: u32,
    /// Answer only once the delete survives a host crash (a commit round).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub sync: bool,
}

/// `snapshot_rollback` parameters.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRollbackParams {
    /// Export of the origin.
    pub name: String,
    /// Tag of the snapshot to roll back to.
    pub tag: u32,
    /// Answer only when the copy-back has finished.
    #[serde(default)]
    pub wait: bool,
}

/// Progress of a rollback.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RollbackProgress {
    /// The snapshot being rolled back to.
    pub tag: u32,
    /// Chunks copied back so far.
    pub chunks_done: u64,
    /// Chunks to copy back in all.
    pub chunks_total: u64,
}

/// `snapshot_rollback` result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotRollbackResult {
    /// The snapshot rolled back to.
    pub tag: u32,
    /// Whether the copy-back has finished.
    pub done: bool,
    /// Progress when not finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<RollbackProgress>,
}

/// Result of methods that only acknowledge (`export_remove`, `snapshot_delete`,
/// `origin_delete`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Done {
    /// The export the operation was about.
    pub name: String,
}

/// One export, as returned by `origin_create`, `snapshot_export` and `export_list`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExportInfo {
    /// Export name.
    pub name: String,
    /// vhost-user socket path.
    pub socket: String,
    /// What is served, e.g. `origin /x` or `snapshot 3 of /x`.
    pub volume: String,
    /// COW store path.
    pub cow: String,
    /// Origin path.
    pub origin: String,
    /// Origin id inside the store.
    pub origin_id: String,
    /// Snapshot tag; absent for the origin.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<u32>,
    /// Volume size in bytes (0 when the export could not be re-created).
    pub size: u64,
    /// Number of virtqueues.
    pub num_queues: u16,
    /// Virtqueue size.
    pub queue_size: u16,
    /// Served read-only.
    pub readonly: bool,
    /// A vhost-user frontend is connected.
    pub connected: bool,
    /// Why the export is not being served (it could not be re-created at start).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The disk's serial, when it is not `name` (the export was renamed: the serial is the
    /// name it was created with).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
}

/// `export_list` result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExportList {
    /// Every export, sorted by name.
    pub exports: Vec<ExportInfo>,
}

/// One snapshot in `snapshot_list`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    /// Tag.
    pub tag: u32,
    /// Tag of the parent snapshot; absent: a snapshot of the origin.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<u32>,
    /// Memo given at creation.
    pub memo: String,
    /// Creation time, seconds since the Unix epoch.
    pub birth_unix_secs: u64,
    /// Chunks only this snapshot holds (freed by deleting it).
    pub exclusive_chunks: u64,
    /// Chunks this snapshot reads that other snapshots read too (absent from older daemons).
    #[serde(default)]
    pub shared_chunks: u64,
    /// Exports serving this snapshot.
    pub exported_as: Vec<String>,
}

/// One origin's snapshot tree in `snapshot_list`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OriginSnapshots {
    /// Origin id inside the store.
    pub origin_id: String,
    /// Origin path.
    pub origin: String,
    /// COW store path.
    pub cow: String,
    /// Exports serving the origin.
    pub exported_as: Vec<String>,
    /// Whether this daemon has the origin open. An origin bound in an open store that the
    /// daemon has not opened (nothing exports it) is listed with `open: false`, its path if
    /// the daemon knows it (else empty), and no snapshots: they are read when it is opened.
    #[serde(default = "yes")]
    pub open: bool,
    /// Snapshots, by tag.
    pub snapshots: Vec<SnapshotInfo>,
}

fn yes() -> bool {
    true
}

/// `snapshot_list` result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotList {
    /// One entry per origin.
    pub origins: Vec<OriginSnapshots>,
}

/// One origin in `status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OriginStatus {
    /// Origin id inside the store.
    pub origin_id: String,
    /// Origin path.
    pub origin: String,
    /// Size in bytes.
    pub size: u64,
    /// Number of snapshots.
    pub snapshots: u64,
    /// Rollback in progress, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback: Option<RollbackProgress>,
    /// Chunks of deleted snapshots not reclaimed yet.
    pub reclaim_pending_chunks: u64,
    /// Exports serving this origin or its snapshots.
    pub exported_as: Vec<String>,
    /// Whether this daemon has the origin open; when `false` (bound in the store, not
    /// opened), `size`, `snapshots` and `reclaim_pending_chunks` are 0 because they are not
    /// known until it is opened.
    #[serde(default = "yes")]
    pub open: bool,
}

/// One store in `status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoreStatus {
    /// COW store path.
    pub cow: String,
    /// Chunk size in bytes.
    pub chunk_size: u32,
    /// Chunks in the store.
    pub chunks_total: u64,
    /// Chunks in use.
    pub chunks_used: u64,
    /// Chunks free.
    pub chunks_free: u64,
    /// The low-space threshold, percent of the chunks in use (`serve --low-space-percent`).
    pub low_space_percent: u8,
    /// Chunks in use (not free) are at or past the threshold.
    pub low_space: bool,
    /// Origins bound to the store and known to the daemon.
    pub origins: Vec<OriginStatus>,
}

/// `status` result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// Every open store (or the one `name` uses).
    pub stores: Vec<StoreStatus>,
    /// Stores the daemon knows but could not open, with the reason.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unavailable: Vec<Unavailable>,
}

/// A latency distribution in microseconds (see `docs/rpc.md`, `stats`): percentiles are the
/// middle of the histogram bucket that holds them (±6 %); all 0 when `count` is 0.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencyStats {
    /// Requests measured.
    pub count: u64,
    /// Mean.
    pub mean: f64,
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p99_9: f64,
    /// In the daemon only, never sent: the non-empty histogram buckets as (upper bound in µs,
    /// requests), in increasing order, for an exposition that aggregates (Prometheus).
    #[serde(skip)]
    pub buckets: Vec<(f64, u64)>,
}

/// The latency of each request kind, in microseconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct KindLatencies {
    /// Reads.
    pub read: LatencyStats,
    /// Writes.
    pub write: LatencyStats,
    /// Flushes.
    pub flush: LatencyStats,
    /// Discards.
    pub discard: LatencyStats,
    /// Write-zeroes requests.
    pub write_zeroes: LatencyStats,
}

/// An export's request counters since it started serving: what the device counts, summed over
/// its queues. A request counts in its kind when it succeeds; one that fails counts in
/// `errors` only.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ExportCounters {
    /// Reads completed.
    pub reads: u64,
    /// Writes completed.
    pub writes: u64,
    /// Flushes completed.
    pub flushes: u64,
    /// Discards completed.
    pub discards: u64,
    /// Write-zeroes requests completed.
    pub write_zeroes: u64,
    /// Bytes read.
    pub read_bytes: u64,
    /// Bytes written.
    pub write_bytes: u64,
    /// Bytes discarded.
    pub discard_bytes: u64,
    /// Bytes zeroed by write-zeroes requests.
    pub write_zeroes_bytes: u64,
    /// Requests that failed (any kind).
    pub errors: u64,
    /// Requests taken off the rings and not completed yet.
    pub in_flight: u64,
    /// Latency per kind.
    pub latency_us: KindLatencies,
}

/// One export in `stats`: its requests since it started serving (across its clients'
/// reconnects; from zero again after a daemon restart or `export_remove`). A request counts in
/// its kind when it succeeds; one that fails counts in `errors` only.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ExportStats {
    /// Export name.
    pub name: String,
    /// `vhost-user-blk` or `nbd`.
    pub protocol: String,
    /// The counters (flattened: they sit beside `name` on the wire).
    #[serde(flatten)]
    pub counters: ExportCounters,
    /// Set when the counters are not kept for this export (NBD exports: every counter is 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// One store in `stats`: its space, from the engine's status.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StoreStats {
    /// COW store path.
    pub cow: String,
    /// Chunk size in bytes.
    pub chunk_size: u32,
    /// Chunks in the store.
    pub chunks_total: u64,
    /// Chunks in use.
    pub chunks_used: u64,
    /// Chunks free.
    pub chunks_free: u64,
    /// Chunks of deleted snapshots not reclaimed yet, summed over the open origins.
    pub reclaim_pending_chunks: u64,
    /// The low-space threshold, percent of the chunks in use (`serve --low-space-percent`).
    pub low_space_percent: u8,
    /// Chunks in use (not free) are at or past the threshold.
    pub low_space: bool,
    /// Commit rounds since the store was opened (each makes the journal batches written
    /// before it durable: batch write, data sync, seal, sync).
    pub commits: u64,
    /// How long the commit rounds took, in microseconds (`count` = `commits`).
    pub commit_latency_us: LatencyStats,
    /// The store's open origins (all, or the one `name` uses), by id.
    #[serde(default)]
    pub origins: Vec<OriginCounters>,
}

/// The engine's counters of one open origin, in `stats`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct OriginCounters {
    /// Origin id inside the store.
    pub origin_id: String,
    /// Origin chunks copied to the store before an origin write, since it was opened.
    pub copy_outs: u64,
    /// Origin writes acknowledged and not yet on the origin (overlays), in chunks.
    pub overlay_chunks: u64,
    /// The memory they hold, in bytes.
    pub overlay_bytes: u64,
    /// Chunks of deleted snapshots not reclaimed yet (the reclaim backlog).
    pub reclaim_pending_chunks: u64,
    /// Rollback in progress, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback: Option<RollbackProgress>,
}

/// `stats` result.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    /// Every export being served (or the one `name` names), by name.
    pub exports: Vec<ExportStats>,
    /// Every open store (or the one `name` uses), by path.
    pub stores: Vec<StoreStats>,
}

/// A store the daemon could not open.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Unavailable {
    /// COW store path.
    pub cow: String,
    /// Why it could not be opened.
    pub error: String,
}

/// Checks an export or origin name: `[A-Za-z0-9._-]{1,64}`, and not `.` or `..`.
pub fn validate_name(what: &str, name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 64 {
        return Err(format!(
            "{what} {name:?} must be 1 to 64 characters long (it has {})",
            name.len()
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "{what} {name:?} contains {c:?}; only A-Z, a-z, 0-9, '.', '_' and '-' are allowed"
        ));
    }
    if name == "." || name == ".." {
        return Err(format!("{what} {name:?} is not allowed"));
    }
    Ok(())
}

/// Parses an octal socket mode ("0660"): owner read-write required, no bits beyond 0o777.
pub fn parse_socket_mode(s: &str) -> Result<u32, String> {
    let mode = u32::from_str_radix(s.trim_start_matches("0o"), 8)
        .map_err(|_| format!("socket mode {s:?} is not an octal number such as 0660"))?;
    if mode > 0o777 || mode & 0o600 != 0o600 {
        return Err(format!(
            "socket mode {s} must be at most 0777 and give its owner read and write (e.g. 0600, 0660)"
        ));
    }
    Ok(mode)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn names() {
        assert!(validate_name("export name", "vm-1.disk_0").is_ok());
        assert!(validate_name("export name", &"a".repeat(64)).is_ok());
        assert!(validate_name("export name", &"a".repeat(65)).is_err());
        assert!(validate_name("export name", "").is_err());
        assert!(validate_name("export name", "a/b").is_err());
        assert!(validate_name("export name", "..").is_err());
        assert!(validate_name("export name", "é").is_err());
    }

    #[test]
    fn unknown_params_are_rejected() {
        let r: Result<NameParams, _> = serde_json::from_value(json!({"name": "a", "nmae": 1}));
        assert!(r.is_err());
        let r: Result<SnapshotDeleteParams, _> =
            serde_json::from_value(json!({"name": "a", "tag": -1}));
        assert!(r.is_err());
    }

    #[test]
    fn defaults() {
        let p: OriginCreateParams =
            serde_json::from_value(json!({"name": "a", "origin": "/o", "cow": "/c"})).unwrap();
        assert!(!p.bind && !p.format && !p.force_format && !p.readonly && !p.direct);
        assert_eq!(p.chunk_size, None);
        let p: SnapshotCreateParams = serde_json::from_value(json!({"name": "a"})).unwrap();
        assert_eq!(p.memo, "");
    }
}

/// `snapshot_diff` parameters.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotDiffParams {
    /// An export of the origin or of one of its snapshots (names the origin).
    pub name: String,
    /// The older version: a snapshot tag.
    pub from: u32,
    /// The newer version: a snapshot tag; absent: the origin as it is now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<u32>,
}

/// One byte range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Extent {
    /// First byte.
    pub offset: u64,
    /// Bytes.
    pub length: u64,
}

/// `snapshot_diff` result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotDiffResult {
    /// The store's chunk size in bytes (extents are whole chunks, the last may be short).
    pub chunk_size: u64,
    /// The volume's size in bytes.
    pub size: u64,
    /// Sorted, merged byte ranges covering every chunk that may differ.
    pub extents: Vec<Extent>,
}

/// `snapshot_stream` parameters.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotStreamParams {
    /// An export of the origin or of one of its snapshots (names the origin).
    pub name: String,
    /// Stream only what changed since this snapshot tag; absent: the whole version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<u32>,
    /// The version to stream: a snapshot tag; absent: the origin as it is now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<u32>,
    /// Absolute path of a FIFO the caller reads from (anything else is refused). One of
    /// `fifo` and `fd_socket` is required.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fifo: Option<String>,
    /// Whole versions only: absolute path of a Unix socket the caller listens on. The daemon
    /// connects, receives one open regular file (SCM_RIGHTS), sizes it and writes the version
    /// into it as a raw image (zero chunks skipped: the file must read as zeroes, e.g. just
    /// truncated), sending the bytes covered so far as 8-byte big-endian numbers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fd_socket: Option<String>,
    /// With `fd_socket`: the caller will sync the file when the call returns, so the daemon
    /// starts writing each piece back as it goes (the final sync then has little left to do).
    /// `false` (`snapmv export --no-sync`) leaves the pages to the kernel's own writeback.
    #[serde(default = "yes")]
    pub writeback: bool,
}

/// `snapshot_stream` result, once the stream is complete.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotStreamResult {
    /// Records written (END excluded).
    pub records: u64,
    /// Payload bytes written.
    pub data_bytes: u64,
    /// The volume's size in bytes.
    pub size: u64,
}
