//! The seam between the device and what it serves: the [`BlockDisk`] trait and its errors.

use std::io::{IoSlice, IoSliceMut};

/// A boxed error from the layer below the device.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Why a disk operation failed, as far as the device needs to know.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// The backing store has no free space for the write.
    #[error("{disk}: store full: {source}")]
    NoSpace {
        /// The disk that failed.
        disk: String,
        /// The underlying error.
        #[source]
        source: BoxError,
    },
    /// Any other failure.
    #[error("{disk}: {source}")]
    Failed {
        /// The disk that failed.
        disk: String,
        /// The underlying error.
        #[source]
        source: BoxError,
    },
}

/// The block device the vhost-user-blk device serves. Offsets and lengths are bytes, multiples
/// of 512 and inside the disk (the device checks before calling).
///
/// Implementations are called from several queue threads at once.
pub trait BlockDisk: Send + Sync + 'static {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Reads `bufs.len()` buffers' worth of bytes starting at `offset`.
    fn read_vectored(&self, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> Result<(), DiskError>;
    /// Writes the buffers, in order, starting at `offset`.
    fn write_vectored(&self, offset: u64, bufs: &[IoSlice<'_>]) -> Result<(), DiskError>;
    /// Makes every completed write durable.
    fn flush(&self) -> Result<(), DiskError>;
    /// Deallocates a range; it reads back as zeroes afterwards.
    fn discard(&self, offset: u64, len: u64) -> Result<(), DiskError>;
    /// Writes zeroes over a range.
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), DiskError>;
    /// A human name, e.g. "origin /x" or "snapshot 3 of /x".
    fn name(&self) -> String;
    /// The physical block size the guest should align to (bytes, power of two >= 512).
    fn physical_block_size(&self) -> u32;
    /// Where the bytes `[offset, offset+len)` lie, for the device to read them with io_uring
    /// (see `snapmv_engine::Volume::read_mapping`); `None`: read through `read_vectored`.
    fn read_mapping(&self, offset: u64, len: u64) -> Option<snapmv_engine::ReadMapping> {
        let _ = (offset, len);
        None
    }
}
