//! The vhost-user-blk device: configuration space, request parsing and execution, and the
//! `VhostUserBackend` implementation with one worker thread per queue.
//!
//! The device serves anything implementing [`BlockDisk`]; the engine's `Volume` is the real
//! one, [`MemDisk`] is an in-memory disk for tests.

pub mod config;
pub(crate) mod device;
pub mod disk;
pub mod inflight;
mod memdisk;
mod pool;
pub mod request;
mod volume;

pub use device::{BlkBackend, DeviceOptions};
pub use disk::{BlockDisk, BoxError, DiskError};
pub use memdisk::MemDisk;

