//! Why a request failed, and the virtio status each failure is reported with.

use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP};

use crate::vhost_blk::config::MAX_CHAIN_DESCS;
use crate::vhost_blk::disk::DiskError;

/// Why a request failed; logged with the export's name by the device.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The chain ended early: the descriptor iterator stopped at a descriptor that still had
    /// NEXT set (loop, out-of-table index, unreadable or nested indirect table, length overflow).
    #[error("malformed descriptor chain: stopped after {0} descriptors at a bad next/indirect link, loop or length overflow")]
    Truncated(usize),
    /// The chain has no descriptor at all (bad head or unreadable indirect table).
    #[error("empty descriptor chain (bad head index or unreadable indirect table)")]
    Empty,
    /// More descriptors than the device accepts.
    #[error("descriptor chain has more than {MAX_CHAIN_DESCS} descriptors")]
    TooLong,
    /// A device-readable descriptor follows a device-writable one.
    #[error("device-readable descriptor after a device-writable one")]
    Order,
    /// No device-writable byte for the status.
    #[error("no device-writable status byte in the chain")]
    NoStatus,
    /// The request header is shorter than 16 bytes.
    #[error("request header is {0} bytes, 16 needed")]
    ShortHeader(u64),
    /// A guest address is outside guest memory.
    #[error("guest buffer {addr:#x}+{len} is not inside guest memory: {source}")]
    BadAddress {
        /// Start of the buffer.
        addr: u64,
        /// Its length.
        len: u64,
        /// What vm-memory said.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// Data length is not a multiple of 512.
    #[error("{what} data length {len} is not a multiple of 512")]
    Unaligned {
        /// Request type.
        what: &'static str,
        /// The length.
        len: u64,
    },
    /// The request reaches past the end of the volume.
    #[error("{what} of {len} bytes at sector {sector} is past the end of the {size}-byte volume")]
    OutOfRange {
        /// Request type.
        what: &'static str,
        /// First sector.
        sector: u64,
        /// Length in bytes.
        len: u64,
        /// Volume size.
        size: u64,
    },
    /// Write to a read-only export.
    #[error("{0} on a read-only export")]
    ReadOnly(&'static str),
    /// Malformed DISCARD / WRITE_ZEROES payload.
    #[error("{what}: {why}")]
    BadSegments {
        /// Request type.
        what: &'static str,
        /// What is wrong.
        why: String,
    },
    /// Unknown request type or flag.
    #[error("unsupported request type {0}")]
    Unsupported(u32),
    /// Unsupported flags in a DISCARD / WRITE_ZEROES segment.
    #[error("{what}: unsupported flags {flags:#x}")]
    UnsupportedFlags {
        /// Request type.
        what: &'static str,
        /// The flags.
        flags: u32,
    },
    /// The code below the device panicked (a bug); reported as IOERR.
    #[error("request handling panicked: {0}")]
    Panicked(String),
    /// The disk failed.
    #[error("{what} failed: {source}")]
    Disk {
        /// Request type.
        what: &'static str,
        /// The disk's error.
        #[source]
        source: DiskError,
    },
}

impl RequestError {
    /// The virtio status this error is reported with.
    pub fn status(&self) -> u8 {
        match self {
            RequestError::Unsupported(_) | RequestError::UnsupportedFlags { .. } => {
                VIRTIO_BLK_S_UNSUPP as u8
            }
            _ => VIRTIO_BLK_S_IOERR as u8,
        }
    }

    /// True when the disk below failed (as opposed to a request the device refused).
    pub fn is_disk_failure(&self) -> bool {
        matches!(self, RequestError::Disk { .. } | RequestError::Panicked(_))
    }
}
