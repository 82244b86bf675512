//! The vhost-user-blk device: configuration space, request parsing and execution, and the
//! `VhostUserBackend` implementation with one worker thread per queue.
//!
//! The device serves anything implementing [`BlockDisk`]; the engine's `Volume` is the real
//! one, [`MemDisk`] is an in-memory disk for tests.
//!
//! Modules, each depending only on those listed before it:
//! - [`disk`]: the [`BlockDisk`] seam and its errors; [`MemDisk`] and the engine's `Volume`
//!   implement it (`memdisk.rs`, `volume.rs`);
//! - [`config`]: the configuration space, feature bits and device limits;
//! - [`request`]: one request, from descriptor chain to status byte (parse, execute, complete);
//! - [`inflight`]: the layout of the inflight region shared with the frontend;
//! - [`handover`]: a disk whose volume arrives later (the destination of a live migration);
//! - [`metrics`]: per-export counters and latency histograms ([`ExportStats`]);
//! - `export_state.rs`: what an export keeps across connections (cache mode, counters);
//! - `persist.rs`: each queue's inflight bookkeeping, to resume after a backend restart;
//! - `pool.rs`, `uring.rs`, `dispatch.rs`: where the requests of a batch run (reads through
//!   the queue's io_uring, the rest on the queue thread or the I/O pool);
//! - `event_handler.rs`: one queue's work on a kick: take chains, run them, complete them;
//! - `device.rs`: [`BlkBackend`], the `VhostUserBackend` implementation.

pub mod config;
pub(crate) mod device;
pub mod disk;
mod dispatch;
mod event_handler;
pub(crate) mod export_state;
pub mod handover;
pub mod inflight;
mod memdisk;
pub mod metrics;
mod persist;
mod pool;
pub mod request;
mod uring;
mod volume;

pub use device::{BlkBackend, DeviceOptions};
pub use disk::{BlockDisk, BoxError, DiskError};
pub use handover::HandoverDisk;
pub use memdisk::MemDisk;
pub use metrics::{ExportMetrics, ExportStats};
