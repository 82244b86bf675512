//! The byte-addressed storage under origins and stores.
//!
//! The engine never touches a file directly: everything goes through [`Storage`], so that tests
//! can substitute a recording layer that simulates crashes below the page cache.

use std::fs::{File, OpenOptions};
use std::io::{self, IoSlice, IoSliceMut};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

/// Positional, thread-safe storage.
pub trait Storage: Send + Sync + std::fmt::Debug {
    /// Reads exactly `buf.len()` bytes at `offset` (zeros past the end of a short file).
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes all of `buf` at `offset`.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Reads into the buffers in order, starting at `offset`.
    fn read_vectored_at(&self, bufs: &mut [IoSliceMut<'_>], offset: u64) -> io::Result<()> {
        let mut off = offset;
        for b in bufs.iter_mut() {
            self.read_at(b, off)?;
            off += b.len() as u64;
        }
        Ok(())
    }
    /// Writes the buffers in order, starting at `offset`.
    fn write_vectored_at(&self, bufs: &[IoSlice<'_>], offset: u64) -> io::Result<()> {
        let mut off = offset;
        for b in bufs {
            self.write_at(b, off)?;
            off += b.len() as u64;
        }
        Ok(())
    }
    /// Makes every completed write durable.
    fn sync(&self) -> io::Result<()>;
    /// Size in bytes.
    fn len(&self) -> io::Result<u64>;
    /// Whether the storage is empty.
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }
    /// A name for messages (the path).
    fn name(&self) -> &str;
}

/// A regular file or block device.
#[derive(Debug)]
pub struct FileStorage {
    file: File,
    path: PathBuf,
    name: String,
}

impl FileStorage {
    /// Opens an existing file or block device read-write (`direct`: O_DIRECT).
    pub fn open(path: &Path, direct: bool) -> io::Result<Self> {
        let mut opts = OpenOptions::new();
        opts.read(true).write(true);
        if direct {
            opts.custom_flags(libc::O_DIRECT);
        }
        let file = opts.open(path)?;
        Ok(FileStorage {
            file,
            path: path.to_path_buf(),
            name: path.display().to_string(),
        })
    }

    /// The path it was opened with.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn short_io(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, what.to_string())
}

impl Storage for FileStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => {
                    buf[done..].fill(0);
                    return Ok(());
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    fn read_vectored_at(&self, bufs: &mut [IoSliceMut<'_>], offset: u64) -> io::Result<()> {
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        if bufs.len() > 1024 {
            return self.read_vectored_slow(bufs, offset);
        }
        // SAFETY: IoSliceMut is ABI-compatible with iovec; the buffers are valid and mutable for
        // the duration of the call and the count is at most IOV_MAX.
        let n = unsafe {
            libc::preadv(
                self.file.as_raw_fd(),
                bufs.as_ptr() as *const libc::iovec,
                bufs.len() as libc::c_int,
                offset as libc::off_t,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                return self.read_vectored_slow(bufs, offset);
            }
            return Err(e);
        }
        if n as usize == total {
            return Ok(());
        }
        // Short read (end of file or a signal): finish buffer by buffer.
        self.read_vectored_slow(bufs, offset)
    }

    fn write_vectored_at(&self, bufs: &[IoSlice<'_>], offset: u64) -> io::Result<()> {
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        if bufs.len() <= 1024 {
            // SAFETY: IoSlice is ABI-compatible with iovec; the buffers are valid for the call.
            let n = unsafe {
                libc::pwritev(
                    self.file.as_raw_fd(),
                    bufs.as_ptr() as *const libc::iovec,
                    bufs.len() as libc::c_int,
                    offset as libc::off_t,
                )
            };
            if n >= 0 && n as usize == total {
                return Ok(());
            }
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
        let mut off = offset;
        for b in bufs {
            self.write_at(b, off)?;
            off += b.len() as u64;
        }
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn len(&self) -> io::Result<u64> {
        let meta = self.file.metadata()?;
        if meta.file_type().is_file() {
            return Ok(meta.len());
        }
        // A block device: its size is where the end is.
        use std::io::Seek;
        let mut f = &self.file;
        f.seek(io::SeekFrom::End(0))
    }

    fn name(&self) -> &str {
        &self.name
    }
}

impl FileStorage {
    fn read_vectored_slow(&self, bufs: &mut [IoSliceMut<'_>], offset: u64) -> io::Result<()> {
        let mut off = offset;
        for b in bufs.iter_mut() {
            self.read_at(b, off)?;
            off += b.len() as u64;
        }
        if off < offset {
            return Err(short_io("offset overflow"));
        }
        Ok(())
    }
}
