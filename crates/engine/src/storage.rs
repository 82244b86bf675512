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
    /// Makes `offset..offset + len` read as zeros, freeing its space where the storage can
    /// (a hole in a file, an unmap on a device). Like a write: durable after `sync`. The
    /// default writes zeros.
    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        write_zeros(self, offset, len)
    }
    /// Makes every completed write durable.
    fn sync(&self) -> io::Result<()>;
    /// Writes cached data of bytes `[offset, offset + len)` back and waits for it, without a
    /// durability promise (no device cache flush, no metadata): keeps the dirty data a later
    /// `sync` must write small. Storages without a cache of their own do nothing.
    fn write_back(&self, offset: u64, len: u64) -> io::Result<()> {
        let _ = (offset, len);
        Ok(())
    }
    /// Size in bytes.
    fn len(&self) -> io::Result<u64>;
    /// Whether the storage is empty.
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }
    /// A name for messages (the path).
    fn name(&self) -> &str;
    /// The boot this storage's unsynced writes belong to: writes made in the boot that reads
    /// them back are there even if never synced (the page cache outlives a killed process);
    /// after a reboot only synced writes are. Real files: the machine's boot id.
    fn boot_id(&self) -> BootId {
        current_boot_id()
    }
    /// The file descriptor that callers may read with their own (asynchronous) I/O, with its
    /// alignment needs; `None` when reads must go through this trait (the default: test
    /// storages that record or simulate I/O).
    fn read_fd(&self) -> Option<ReadFd> {
        None
    }
}

/// A storage's file descriptor for reads outside the [`Storage`] trait (see
/// [`Storage::read_fd`]). Valid while the storage lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadFd {
    /// The descriptor.
    pub fd: std::os::unix::io::RawFd,
    /// Offsets, lengths and buffer addresses must be multiples of this (512 with O_DIRECT,
    /// else 1); a read that is not aligned must take the storage's own path (it bounces).
    pub align: usize,
}

/// Writes zeros over `offset..offset + len` (the fallback of [`Storage::zero_range`]).
pub fn write_zeros<S: Storage + ?Sized>(s: &S, offset: u64, len: u64) -> io::Result<()> {
    static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];
    let mut at = offset;
    while at < offset + len {
        let n = (offset + len - at).min(ZEROS.len() as u64);
        s.write_at(&ZEROS[..n as usize], at)?;
        at += n;
    }
    Ok(())
}

/// Identifies one boot of the machine (`/proc/sys/kernel/random/boot_id`); all zeros when
/// unknown, which never matches, so only synced writes are trusted then.
pub type BootId = [u8; 16];

/// This machine's current boot id, read once.
pub fn current_boot_id() -> BootId {
    static BOOT: std::sync::OnceLock<BootId> = std::sync::OnceLock::new();
    *BOOT.get_or_init(|| {
        let text = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
        parse_boot_id(&text).unwrap_or_else(|| {
            log::warn!(
                "cannot read /proc/sys/kernel/random/boot_id: acknowledged writes that were not \
                 flushed will not be recovered after the daemon dies"
            );
            [0; 16]
        })
    })
}

/// Parses a UUID as the kernel prints it.
fn parse_boot_id(text: &str) -> Option<BootId> {
    let hex: Vec<u8> = text.trim().bytes().filter(|b| *b != b'-').collect();
    if hex.len() != 32 {
        return None;
    }
    let mut id = [0u8; 16];
    for (i, pair) in hex.chunks(2).enumerate() {
        let s = std::str::from_utf8(pair).ok()?;
        id[i] = u8::from_str_radix(s, 16).ok()?;
    }
    (id != [0; 16]).then_some(id)
}

/// A regular file or block device.
#[derive(Debug)]
pub struct FileStorage {
    file: File,
    path: PathBuf,
    name: String,
    direct: bool,
}

/// Alignment of offsets, lengths and memory that O_DIRECT calls are made with (the logical
/// block size of common devices); anything else goes through an aligned bounce buffer.
const DIRECT_ALIGN: usize = 512;

/// A zeroed buffer of `len` bytes whose start is aligned for O_DIRECT (safe: an over-sized
/// vector and an offset into it).
struct Bounce {
    v: Vec<u8>,
    at: usize,
    len: usize,
}

impl Bounce {
    fn new(len: usize) -> Self {
        let v = vec![0u8; len + 4096];
        let at = v.as_ptr().align_offset(4096);
        Bounce { v, at, len }
    }
    fn buf(&mut self) -> &mut [u8] {
        &mut self.v[self.at..self.at + self.len]
    }
}

fn is_aligned(ptr: *const u8, len: usize, offset: u64) -> bool {
    (ptr as usize) % DIRECT_ALIGN == 0
        && len % DIRECT_ALIGN == 0
        && offset % DIRECT_ALIGN as u64 == 0
}

/// How [`FileStorage::open_with`] opens a file or block device.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OpenMode {
    /// O_DIRECT.
    pub direct: bool,
    /// Open read-only (writes then fail with `EBADF`).
    pub readonly: bool,
}

/// Another process (or another open of this one) holds the file: its exclusive lock, or, for
/// a block device, its exclusive open. Carried as the source of an [`io::Error`] of kind
/// [`io::ErrorKind::ResourceBusy`]; see [`in_use`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path} is in use by {holder}")]
pub struct InUse {
    /// The path it was opened by.
    pub path: PathBuf,
    /// Pid of the holder when it can be known (from `/proc/locks`).
    pub pid: Option<u32>,
    /// The holder, for messages: `process 1234 (snapmv)`, or a description when unknown.
    pub holder: String,
}

/// The [`InUse`] inside an error returned by [`FileStorage::open_with`], if that is why it
/// failed.
pub fn in_use(e: &io::Error) -> Option<&InUse> {
    e.get_ref().and_then(|inner| inner.downcast_ref::<InUse>())
}

/// The pid holding a `flock` lock on the file `(dev, ino)`, from `/proc/locks` (flock locks
/// are listed with the pid of the process that took them; OFD locks are not, hence flock).
fn flock_holder(dev: u64, ino: u64) -> Option<u32> {
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    let want = format!(
        "{:02x}:{:02x}:{ino}",
        rustix::fs::major(dev),
        rustix::fs::minor(dev)
    );
    locks.lines().find_map(|line| {
        // "1: FLOCK  ADVISORY  WRITE 1234 fd:01:5678 0 EOF"; waiters have "->" after "1:".
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.get(1) != Some(&"FLOCK") || f.get(5) != Some(&want.as_str()) {
            return None;
        }
        f.get(4)?.parse().ok()
    })
}

fn describe_pid(pid: u32) -> String {
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    let comm = comm.trim();
    let me = if pid == std::process::id() {
        ", this process: it is already open here"
    } else {
        ""
    };
    if comm.is_empty() {
        format!("process {pid}{me}")
    } else {
        format!("process {pid} ({comm}{me})")
    }
}

impl FileStorage {
    /// Opens an existing file or block device read-write (`direct`: O_DIRECT), exclusively
    /// (see [`FileStorage::open_with`]).
    pub fn open(path: &Path, direct: bool) -> io::Result<Self> {
        Self::open_with(
            path,
            OpenMode {
                direct,
                readonly: false,
            },
        )
    }

    /// Opens an existing file or block device, exclusively: an exclusive `flock` is taken on
    /// the opened descriptor (so every path to the same inode — symlinks, hard links, bind
    /// mounts — meets the same lock), and a block device is opened with `O_EXCL` as well (so a
    /// second device node of the same device, or a mounted device, is refused by the kernel).
    /// The lock lives as long as the returned storage. If another open holds it, the error has
    /// kind [`io::ErrorKind::ResourceBusy`] and carries an [`InUse`] naming the holder's pid
    /// when `/proc/locks` shows it.
    pub fn open_with(path: &Path, mode: OpenMode) -> io::Result<Self> {
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        let mut opts = OpenOptions::new();
        opts.read(true).write(!mode.readonly);
        let is_bdev = std::fs::metadata(path)
            .map(|m| m.file_type().is_block_device())
            .unwrap_or(false);
        let mut flags = 0;
        if mode.direct {
            flags |= libc::O_DIRECT;
        }
        if is_bdev {
            flags |= libc::O_EXCL;
        }
        opts.custom_flags(flags);
        let file = match opts.open(path) {
            Ok(f) => f,
            Err(e) if is_bdev && e.raw_os_error() == Some(libc::EBUSY) => {
                return Err(io::Error::new(
                    io::ErrorKind::ResourceBusy,
                    InUse {
                        path: path.to_path_buf(),
                        pid: None,
                        holder:
                            "another exclusive opener (a process, or a mount) of the block device"
                                .into(),
                    },
                ))
            }
            Err(e) => return Err(e),
        };
        match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {}
            Err(rustix::io::Errno::WOULDBLOCK) => {
                let meta = file.metadata()?;
                let pid = flock_holder(meta.dev(), meta.ino());
                let holder = match pid {
                    Some(p) => describe_pid(p),
                    None => "another process, which holds its lock".into(),
                };
                return Err(io::Error::new(
                    io::ErrorKind::ResourceBusy,
                    InUse {
                        path: path.to_path_buf(),
                        pid,
                        holder,
                    },
                ));
            }
            Err(e) => return Err(e.into()),
        }
        Ok(FileStorage {
            file,
            path: path.to_path_buf(),
            name: path.display().to_string(),
            direct: mode.direct,
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

impl FileStorage {
    /// The aligned range covering `[offset, offset+len)`.
    fn cover(offset: u64, len: usize) -> (u64, usize) {
        let a = offset - offset % DIRECT_ALIGN as u64;
        let end = (offset + len as u64).div_ceil(DIRECT_ALIGN as u64) * DIRECT_ALIGN as u64;
        (a, (end - a) as usize)
    }

    fn bounce_read(&self, offset: u64, len: usize) -> io::Result<(Bounce, usize)> {
        let (a, alen) = Self::cover(offset, len);
        let mut b = Bounce::new(alen);
        self.raw_read_at(b.buf(), a)?;
        Ok((b, (offset - a) as usize))
    }
}

impl Storage for FileStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if self.direct && !is_aligned(buf.as_ptr(), buf.len(), offset) {
            let (mut b, at) = self.bounce_read(offset, buf.len())?;
            buf.copy_from_slice(&b.buf()[at..at + buf.len()]);
            return Ok(());
        }
        self.raw_read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if self.direct && !is_aligned(buf.as_ptr(), buf.len(), offset) {
            // Read-modify-write of the covering blocks (only metadata writes are unaligned in
            // length, and nothing writes those blocks concurrently).
            let (mut b, at) = self.bounce_read(offset, buf.len())?;
            b.buf()[at..at + buf.len()].copy_from_slice(buf);
            let (a, _) = Self::cover(offset, buf.len());
            return self.file.write_all_at(b.buf(), a);
        }
        self.file.write_all_at(buf, offset)
    }

    fn read_vectored_at(&self, bufs: &mut [IoSliceMut<'_>], offset: u64) -> io::Result<()> {
        if self.direct && !bufs.iter().all(|b| is_aligned(b.as_ptr(), b.len(), offset)) {
            let total: usize = bufs.iter().map(|b| b.len()).sum();
            let (mut b, at) = self.bounce_read(offset, total)?;
            let src = &b.buf()[at..at + total];
            let mut done = 0;
            for d in bufs.iter_mut() {
                let n = d.len();
                d.copy_from_slice(&src[done..done + n]);
                done += n;
            }
            return Ok(());
        }
        self.raw_read_vectored_at(bufs, offset)
    }

    fn write_vectored_at(&self, bufs: &[IoSlice<'_>], offset: u64) -> io::Result<()> {
        if self.direct && !bufs.iter().all(|b| is_aligned(b.as_ptr(), b.len(), offset)) {
            let total: usize = bufs.iter().map(|b| b.len()).sum();
            let mut joined = Bounce::new(total);
            let mut done = 0;
            for b in bufs {
                joined.buf()[done..done + b.len()].copy_from_slice(b);
                done += b.len();
            }
            return self.write_at(joined.buf(), offset);
        }
        self.raw_write_vectored_at(bufs, offset)
    }

    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        use rustix::fs::{fallocate, FallocateFlags};
        // A hole in a file; on a block device the kernel turns it into a write-zeroes that
        // unmaps, or refuses it (then ZERO_RANGE, which may write). Either reads back zeros.
        let punch = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
        let is_file = self.file.metadata()?.file_type().is_file();
        let r = fallocate(&self.file, punch, offset, len).or_else(|e| {
            if is_file {
                return Err(e);
            }
            fallocate(&self.file, FallocateFlags::ZERO_RANGE, offset, len)
        });
        match r {
            Ok(()) => Ok(()),
            // A file system or device that cannot: write the zeros.
            Err(rustix::io::Errno::OPNOTSUPP) | Err(rustix::io::Errno::INVAL) => {
                write_zeros(self, offset, len)
            }
            Err(e) => Err(e.into()),
        }
    }

    fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn write_back(&self, offset: u64, len: u64) -> io::Result<()> {
        if self.direct || len == 0 {
            return Ok(());
        }
        let (Ok(off), Ok(n)) = (i64::try_from(offset), i64::try_from(len)) else {
            return Ok(());
        };
        let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE
            | libc::SYNC_FILE_RANGE_WRITE
            | libc::SYNC_FILE_RANGE_WAIT_AFTER;
        // SAFETY: sync_file_range takes no pointers; the fd is ours and open for `self`'s life.
        let r = unsafe { libc::sync_file_range(self.file.as_raw_fd(), off, n, flags) };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
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

    fn read_fd(&self) -> Option<ReadFd> {
        Some(ReadFd {
            fd: self.file.as_raw_fd(),
            align: if self.direct { DIRECT_ALIGN } else { 1 },
        })
    }
}

impl FileStorage {
    fn raw_read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
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

    fn raw_read_vectored_at(&self, bufs: &mut [IoSliceMut<'_>], offset: u64) -> io::Result<()> {
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

    fn raw_write_vectored_at(&self, bufs: &[IoSlice<'_>], offset: u64) -> io::Result<()> {
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

    fn read_vectored_slow(&self, bufs: &mut [IoSliceMut<'_>], offset: u64) -> io::Result<()> {
        let mut off = offset;
        for b in bufs.iter_mut() {
            self.raw_read_at(b, off)?;
            off += b.len() as u64;
        }
        if off < offset {
            return Err(short_io("offset overflow"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn direct_io_handles_unaligned_buffers_and_offsets() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, vec![7u8; 64 * 1024]).unwrap();
        let st = match FileStorage::open(&p, true) {
            Ok(s) => s,
            // tmpfs has no O_DIRECT: nothing to test there.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return,
            Err(e) => panic!("{e}"),
        };
        // Unaligned memory, offset and length: bounced, read-modify-write.
        let data: Vec<u8> = (0..1000u32).map(|i| i as u8).collect();
        st.write_at(&data[1..], 1001).unwrap();
        let mut back = vec![0u8; 999];
        st.read_at(&mut back, 1001).unwrap();
        assert_eq!(back, &data[1..]);
        let mut around = vec![0u8; 2];
        st.read_at(&mut around, 1000).unwrap();
        assert_eq!(around, [7, 1]);
        // Vectored, 512-multiple total but odd pieces.
        let a = vec![1u8; 100];
        let b = vec![2u8; 412];
        st.write_vectored_at(&[IoSlice::new(&a), IoSlice::new(&b)], 4096)
            .unwrap();
        let mut x = vec![0u8; 412];
        let mut y = vec![0u8; 100];
        st.read_vectored_at(
            &mut [IoSliceMut::new(&mut x), IoSliceMut::new(&mut y)],
            4096,
        )
        .unwrap();
        assert!(x[..100].iter().all(|&v| v == 1) && x[100..].iter().all(|&v| v == 2));
        assert!(y.iter().all(|&v| v == 2));
        st.sync().unwrap();
    }
}

#[cfg(test)]
mod lock_tests {
    use super::*;

    /// A second open of the same inode, by any path, is refused and names this process.
    #[test]
    fn second_open_by_any_path_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, vec![0u8; 4096]).unwrap();
        let link = dir.path().join("sym");
        std::os::unix::fs::symlink(&p, &link).unwrap();
        let hard = dir.path().join("hard");
        std::fs::hard_link(&p, &hard).unwrap();
        let first = FileStorage::open(&p, false).unwrap();
        for other in [&p, &link, &hard] {
            for readonly in [false, true] {
                let e = FileStorage::open_with(
                    other,
                    OpenMode {
                        direct: false,
                        readonly,
                    },
                )
                .unwrap_err();
                assert_eq!(e.kind(), io::ErrorKind::ResourceBusy, "{e}");
                let u = in_use(&e).expect("an InUse error");
                assert_eq!(u.pid, Some(std::process::id()), "{e}");
                assert!(e.to_string().contains("already open here"), "{e}");
            }
        }
        drop(first);
        drop(FileStorage::open(&link, false).unwrap());
    }

    #[test]
    fn readonly_open_cannot_write() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, vec![1u8; 4096]).unwrap();
        let st = FileStorage::open_with(
            &p,
            OpenMode {
                direct: false,
                readonly: true,
            },
        )
        .unwrap();
        let mut b = [0u8; 16];
        st.read_at(&mut b, 0).unwrap();
        assert_eq!(b, [1u8; 16]);
        assert!(st.write_at(&[2u8; 16], 0).is_err());
        assert_eq!(std::fs::read(&p).unwrap()[0], 1);
    }
}
