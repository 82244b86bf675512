//! [`BlockDisk`] for the engine's [`Volume`]: one-line delegations plus error mapping.

use std::io::{IoSlice, IoSliceMut};

use snapmv_engine::{Error, Volume};

use super::disk::{BlockDisk, DiskError};

fn map(v: &Volume, e: Error) -> DiskError {
    match e {
        Error::NoSpace { .. } => DiskError::NoSpace {
            disk: v.name(),
            source: Box::new(e),
        },
        e => DiskError::Failed {
            disk: v.name(),
            source: Box::new(e),
        },
    }
}

impl BlockDisk for Volume {
    fn size(&self) -> u64 {
        Volume::size(self)
    }

    fn read_vectored(&self, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> Result<(), DiskError> {
        Volume::read_vectored(self, offset, bufs).map_err(|e| map(self, e))
    }

    fn write_vectored(&self, offset: u64, bufs: &[IoSlice<'_>]) -> Result<(), DiskError> {
        Volume::write_vectored(self, offset, bufs).map_err(|e| map(self, e))
    }

    fn flush(&self) -> Result<(), DiskError> {
        Volume::flush(self).map_err(|e| map(self, e))
    }

    fn discard(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        Volume::discard(self, offset, len).map_err(|e| map(self, e))
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        Volume::write_zeroes(self, offset, len).map_err(|e| map(self, e))
    }

    fn name(&self) -> String {
        Volume::name(self)
    }

    fn physical_block_size(&self) -> u32 {
        self.chunk_size().max(512)
    }

    fn read_mapping(&self, offset: u64, len: u64) -> Option<snapmv_engine::ReadMapping> {
        Volume::read_mapping(self, offset, len)
    }
}
