//! [`HandoverDisk`]: a disk whose backing volume arrives after the export started, for the
//! destination of a live migration. The frontend (QEMU started with `-incoming`) connects and
//! reads the configuration space long before the source daemon hands the store over; the
//! guest's first requests on this side may come before it too. They wait here — as on a
//! paused disk — until the volume is installed, and fail with a clear error if it never is.

use std::io::{IoSlice, IoSliceMut};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use super::disk::{BlockDisk, DiskError};

/// How long one request waits for the volume before it fails: the bound on a guest that
/// resumed on a daemon that never got the store (the orchestrator's `acquire` has its own,
/// usually shorter, timeout).
pub const REQUEST_WAIT: Duration = Duration::from_secs(300);
/// How often a waiting request looks again.
const POLL: Duration = Duration::from_millis(10);

/// Why a request on a [`HandoverDisk`] could not run.
#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    /// The volume was not installed within [`REQUEST_WAIT`].
    #[error("the COW store was not handed over within {0:?} (incoming migration: the source daemon must release it and `snapmv acquire` run here)")]
    NotHandedOver(Duration),
    /// The handover was abandoned (export removed, or the store could not be opened).
    #[error("no volume: {0}")]
    Abandoned(String),
    /// The volume offered does not match what the frontend was told.
    #[error("the volume is {got} (bytes, block size), but the export announced {announced}")]
    Mismatch {
        /// Size and physical block size of the volume offered.
        got: String,
        /// What the configuration space said.
        announced: String,
    },
}

enum Slot {
    Waiting,
    Ready(Arc<dyn BlockDisk>),
    Abandoned(String),
}

/// A disk that serves nothing until [`HandoverDisk::install`] gives it a volume.
pub struct HandoverDisk {
    name: String,
    size: u64,
    block_size: u32,
    slot: RwLock<Slot>,
}

impl HandoverDisk {
    /// A disk named `name` (for messages) announcing `size` bytes and a physical block size of
    /// `block_size` bytes until its volume comes.
    pub fn new(name: impl Into<String>, size: u64, block_size: u32) -> HandoverDisk {
        HandoverDisk {
            name: name.into(),
            size,
            block_size,
            slot: RwLock::new(Slot::Waiting),
        }
    }

    /// Serves `disk` from now on; waiting requests go on. Refused if its size or block size
    /// differ from what was announced (the guest would see another disk).
    pub fn install(&self, disk: Arc<dyn BlockDisk>) -> Result<(), HandoverError> {
        if disk.size() != self.size || disk.physical_block_size() != self.block_size {
            return Err(HandoverError::Mismatch {
                got: format!("{}, {}", disk.size(), disk.physical_block_size()),
                announced: format!("{}, {}", self.size, self.block_size),
            });
        }
        *self.slot.write().unwrap_or_else(|e| e.into_inner()) = Slot::Ready(disk);
        Ok(())
    }

    /// Gives up waiting: every waiting and later request fails with `why`. Does nothing once
    /// a volume is installed.
    pub fn abandon(&self, why: impl Into<String>) {
        let mut slot = self.slot.write().unwrap_or_else(|e| e.into_inner());
        if matches!(*slot, Slot::Waiting) {
            *slot = Slot::Abandoned(why.into());
        }
    }

    /// True once a volume is installed.
    pub fn is_ready(&self) -> bool {
        matches!(
            *self.slot.read().unwrap_or_else(|e| e.into_inner()),
            Slot::Ready(_)
        )
    }

    /// The volume, waiting for it up to [`REQUEST_WAIT`].
    fn disk(&self) -> Result<Arc<dyn BlockDisk>, DiskError> {
        let start = Instant::now();
        loop {
            let fail = match &*self.slot.read().unwrap_or_else(|e| e.into_inner()) {
                Slot::Ready(d) => return Ok(d.clone()),
                Slot::Abandoned(why) => HandoverError::Abandoned(why.clone()),
                Slot::Waiting if start.elapsed() >= REQUEST_WAIT => {
                    HandoverError::NotHandedOver(REQUEST_WAIT)
                }
                Slot::Waiting => {
                    std::thread::sleep(POLL);
                    continue;
                }
            };
            return Err(DiskError::Failed {
                disk: self.name.clone(),
                source: Box::new(fail),
            });
        }
    }
}

impl BlockDisk for HandoverDisk {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_vectored(&self, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> Result<(), DiskError> {
        self.disk()?.read_vectored(offset, bufs)
    }

    fn write_vectored(&self, offset: u64, bufs: &[IoSlice<'_>]) -> Result<(), DiskError> {
        self.disk()?.write_vectored(offset, bufs)
    }

    fn flush(&self) -> Result<(), DiskError> {
        self.disk()?.flush()
    }

    fn discard(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        self.disk()?.discard(offset, len)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        self.disk()?.write_zeroes(offset, len)
    }

    fn name(&self) -> String {
        match &*self.slot.read().unwrap_or_else(|e| e.into_inner()) {
            Slot::Ready(d) => d.name(),
            _ => self.name.clone(),
        }
    }

    fn physical_block_size(&self) -> u32 {
        self.block_size
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vhost_blk::MemDisk;

    #[test]
    fn requests_wait_for_the_volume_then_reach_it() {
        let d = Arc::new(HandoverDisk::new("incoming", 1 << 20, 4096));
        let waiter = {
            let d = d.clone();
            std::thread::spawn(move || {
                let data = [7u8; 512];
                d.write_vectored(4096, &[IoSlice::new(&data)])
            })
        };
        std::thread::sleep(Duration::from_millis(50));
        assert!(!waiter.is_finished(), "a write ran with no volume");
        let mem = Arc::new(MemDisk::new("vol", 1 << 20));
        d.install(mem.clone()).unwrap();
        waiter.join().unwrap().unwrap();
        assert_eq!(mem.snapshot(4096, 512), vec![7u8; 512]);
        assert!(d.is_ready());
        // Abandoning after the volume came changes nothing.
        d.abandon("too late");
        let mut back = [0u8; 512];
        d.read_vectored(4096, &mut [IoSliceMut::new(&mut back)])
            .unwrap();
        assert_eq!(back, [7u8; 512]);
    }

    #[test]
    fn abandoned_or_mismatched_handovers_fail_clearly() {
        let d = HandoverDisk::new("incoming", 1 << 20, 4096);
        let other = Arc::new(MemDisk::new("vol", 2 << 20));
        let e = d.install(other).unwrap_err();
        assert!(matches!(e, HandoverError::Mismatch { .. }), "{e}");
        d.abandon("export removed");
        let e = d.flush().unwrap_err().to_string();
        assert!(
            e.contains("incoming") && e.contains("export removed"),
            "{e}"
        );
    }
}
