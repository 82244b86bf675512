//! An in-memory [`BlockDisk`] for tests.

use std::io::{IoSlice, IoSliceMut};
use std::sync::RwLock;

use super::disk::{BlockDisk, DiskError};

/// A disk held in memory. Writes fail with `NoSpace` once `fail_writes_no_space` is set.
#[derive(Debug)]
pub struct MemDisk {
    name: String,
    data: RwLock<Vec<u8>>,
    no_space: std::sync::atomic::AtomicBool,
}

impl MemDisk {
    /// A zero-filled disk of `size` bytes.
    pub fn new(name: &str, size: u64) -> MemDisk {
        MemDisk {
            name: name.to_owned(),
            data: RwLock::new(vec![0; usize::try_from(size).unwrap_or(0)]),
            no_space: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Makes every later write fail as if the store were full.
    pub fn set_no_space(&self, on: bool) {
        self.no_space.store(on, std::sync::atomic::Ordering::SeqCst);
    }

    /// A copy of `len` bytes at `offset` (test inspection).
    pub fn snapshot(&self, offset: u64, len: usize) -> Vec<u8> {
        let d = self.data.read().unwrap_or_else(|e| e.into_inner());
        let start = usize::try_from(offset).unwrap_or(usize::MAX).min(d.len());
        let end = start.saturating_add(len).min(d.len());
        d[start..end].to_vec()
    }

    fn range(&self, offset: u64, len: u64, dlen: usize) -> Result<(usize, usize), DiskError> {
        let end = offset.checked_add(len);
        match end {
            Some(end) if end <= dlen as u64 => Ok((offset as usize, end as usize)),
            _ => Err(DiskError::Failed {
                disk: self.name.clone(),
                source: format!("range {offset}+{len} is past the end ({dlen} bytes)").into(),
            }),
        }
    }

    fn check_space(&self) -> Result<(), DiskError> {
        if self.no_space.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(DiskError::NoSpace {
                disk: self.name.clone(),
                source: "test store marked full".into(),
            });
        }
        Ok(())
    }
}

impl BlockDisk for MemDisk {
    fn size(&self) -> u64 {
        self.data.read().unwrap_or_else(|e| e.into_inner()).len() as u64
    }

    fn read_vectored(&self, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> Result<(), DiskError> {
        let d = self.data.read().unwrap_or_else(|e| e.into_inner());
        let total: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        let (mut pos, _) = self.range(offset, total, d.len())?;
        for b in bufs.iter_mut() {
            let n = b.len();
            b.copy_from_slice(&d[pos..pos + n]);
            pos += n;
        }
        Ok(())
    }

    fn write_vectored(&self, offset: u64, bufs: &[IoSlice<'_>]) -> Result<(), DiskError> {
        self.check_space()?;
        let mut d = self.data.write().unwrap_or_else(|e| e.into_inner());
        let total: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        let dlen = d.len();
        let (mut pos, _) = self.range(offset, total, dlen)?;
        for b in bufs {
            d[pos..pos + b.len()].copy_from_slice(b);
            pos += b.len();
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), DiskError> {
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        self.write_zeroes(offset, len)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        self.check_space()?;
        let mut d = self.data.write().unwrap_or_else(|e| e.into_inner());
        let dlen = d.len();
        let (s, e) = self.range(offset, len, dlen)?;
        d[s..e].fill(0);
        Ok(())
    }

    fn name(&self) -> String {
        self.name.clone()
    }

    fn physical_block_size(&self) -> u32 {
        4096
    }
}
