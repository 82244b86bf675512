//! Volume handles: the origin or one snapshot, as a block device.

use crate::error::{Error, Result};
use crate::origin::{OriginCore, ReadMapping, SnapRt};
use crate::store::Guard;
use std::io::{IoSlice, IoSliceMut};
use std::sync::atomic::Ordering::SeqCst;
use std::sync::Arc;

/// A block device view of the origin or of one snapshot. Cheap to clone; use from any thread.
#[derive(Clone)]
pub struct Volume {
    pub(crate) core: Arc<OriginCore>,
    pub(crate) snap: Option<Arc<SnapRt>>,
    pub(crate) _guard: Arc<Guard>,
}

impl std::fmt::Debug for Volume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name())
    }
}

impl Volume {
    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.core.size
    }

    /// The store's chunk size in bytes (a good physical block size for guests).
    pub fn chunk_size(&self) -> u32 {
        self.core.chunk_size() as u32
    }

    /// The snapshot's tag, or `None` for the origin.
    pub fn tag(&self) -> Option<u32> {
        self.snap.as_ref().map(|s| s.tag)
    }

    /// The origin's id.
    pub fn origin_id(&self) -> &str {
        &self.core.id
    }

    /// A name for messages.
    pub fn name(&self) -> String {
        match &self.snap {
            None => format!("origin {}", self.core.id),
            Some(s) => format!("snapshot {} of origin {}", s.tag, self.core.id),
        }
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        let end = offset.checked_add(len);
        if offset % 512 != 0 || len % 512 != 0 || end.is_none_or(|e| e > self.core.size) {
            return Err(Error::InvalidArgument(format!(
                "{}: request at byte {offset} for {len} bytes is not 512-byte aligned or ends past its {} bytes",
                self.name(),
                self.core.size
            )));
        }
        Ok(())
    }

    /// Reads `offset..` into the buffers.
    pub fn read_vectored(&self, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> Result<()> {
        let len: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        self.check_range(offset, len)?;
        match &self.snap {
            None => self.core.origin_read(offset, len, bufs),
            Some(s) => {
                // Through the gate: a discard frees the snapshot's chunks with it closed.
                let _pass = s.gate.enter();
                self.core.snap_read(s, offset, len, bufs)
            }
        }
    }

    /// Where the bytes `[offset, offset+len)` lie, for a caller that reads them with its own
    /// asynchronous I/O: `None` when that read must go through [`Volume::read_vectored`] (a
    /// bad range, a storage without a file descriptor, a pending overlay, a rollback, a
    /// deleted snapshot). After the reads complete, [`ReadMapping::still_valid`] says whether
    /// they are exact; if not, read again with [`Volume::read_vectored`].
    pub fn read_mapping(&self, offset: u64, len: u64) -> Option<ReadMapping> {
        self.check_range(offset, len).ok()?;
        self.core.read_mapping(self.snap.as_deref(), offset, len)
    }

    /// Writes the buffers at `offset`.
    pub fn write_vectored(&self, offset: u64, bufs: &[IoSlice<'_>]) -> Result<()> {
        let len: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        match &self.snap {
            None => self.core.origin_write(offset, len, bufs),
            Some(s) => self.core.snap_write(s, offset, len, bufs),
        }
    }

    /// Reads into one buffer.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.read_vectored(offset, &mut [IoSliceMut::new(buf)])
    }

    /// Writes one buffer.
    pub fn write(&self, offset: u64, buf: &[u8]) -> Result<()> {
        self.write_vectored(offset, &[IoSlice::new(buf)])
    }

    /// Makes every completed write of this volume durable.
    pub fn flush(&self) -> Result<()> {
        match &self.snap {
            None => self.core.origin_flush(),
            Some(s) => {
                if s.deleted.load(SeqCst) {
                    return Err(Error::Deleted(self.name()));
                }
                self.core.check_alive()?;
                // What the snapshot still reads from the origin may not be synced yet.
                self.core.sync_for_snapshots()?;
                self.core.store.commit_sync()
            }
        }
    }

    /// Writes zeroes over a range. Whole chunks cost metadata, not data: on the origin the
    /// range becomes a hole (after what snapshots read is copied out), on a snapshot its own
    /// chunks are freed and the range recorded as zeros.
    pub fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        match &self.snap {
            None => self.core.origin_zero(offset, len),
            Some(s) => self.core.snap_zero(s, offset, len),
        }
    }

    /// Discards a range: it reads back as zeroes, and its space is given back as by
    /// [`Volume::write_zeroes`].
    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.write_zeroes(offset, len)
    }
}

impl Volume {
    /// The byte ranges that may differ between snapshot `from` and this volume (see
    /// [`crate::Origin::diff`]).
    pub fn changed_since(&self, from: u32) -> Result<Vec<(u64, u64)>> {
        self.core
            .diff_extents(Some(from), self.snap.as_ref().map(|s| s.tag))
    }
}

impl Volume {
    /// [`crate::Volume::read`] for large sequential reads (exports, backups): a snapshot reads
    /// each run of chunks it shares with the origin device in one request.
    pub fn read_bulk(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let Some(s) = &self.snap else {
            return self.read(offset, buf);
        };
        let len = buf.len() as u64;
        if offset % 512 != 0
            || len % 512 != 0
            || offset.checked_add(len).is_none_or(|e| e > self.core.size)
        {
            return self.read(offset, buf);
        }
        if s.deleted.load(SeqCst) {
            return Err(Error::Deleted(self.name()));
        }
        let _pass = s.gate.enter();
        self.core.snap_read_bulk(s, offset, buf)
    }
}
