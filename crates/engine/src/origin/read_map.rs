//! The read mapping of a volume's byte range: where each piece of it lies (a file and an
//! offset, or zeros), so that a caller can read it with its own asynchronous I/O (the daemon's
//! io_uring), and the check that keeps such a read as exact as [`OriginCore::read_view`].
//!
//! Exactness: a snapshot's lookup answer is taken from one loaded exception list per chunk;
//! a copy-out publishes its exception before the origin is overwritten, and reclaim replaces
//! the list before it frees a store chunk. So a read whose chunks' lists are all unchanged
//! after its I/O completed read this version's data; otherwise the caller reads again through
//! the synchronous path. Origin reads need no check (the origin device is the origin's data),
//! but chunks with a pending overlay (in memory) and a rollback in progress are not mapped:
//! those reads take the synchronous path.

use super::chunk_map::Mapping;
use super::*;
use crate::storage::ReadFd;

/// Where one piece of a read comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadSource {
    /// `len` bytes of the file `fd` at `offset`.
    File {
        /// The file, with its alignment needs.
        fd: ReadFd,
        /// Byte offset in the file.
        offset: u64,
    },
    /// Bytes that read as zeroes (nothing to read).
    Zeros,
}

/// One piece of a read, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadSegment {
    /// Where it comes from.
    pub source: ReadSource,
    /// Its length in bytes.
    pub len: u64,
}

/// The pieces of one volume read and what to check once they are read (see the module's
/// comment). Holds its origin open: the files stay valid while it lives.
pub struct ReadMapping {
    segments: Vec<ReadSegment>,
    /// Per chunk whose answer came from its exception list: the list that was loaded.
    checks: Vec<(u64, Option<Arc<ExList>>)>,
    core: Arc<OriginCore>,
}

impl std::fmt::Debug for ReadMapping {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadMapping")
            .field("segments", &self.segments)
            .field("checked_chunks", &self.checks.len())
            .finish()
    }
}

impl ReadMapping {
    /// The pieces, in order; their lengths add up to the read's.
    pub fn segments(&self) -> &[ReadSegment] {
        &self.segments
    }

    /// Whether what was read through the segments (after every read completed) is the
    /// volume's data: `false` means a copy-out or a reclaim raced the read, which must then be
    /// done again (e.g. through `Volume::read_vectored`).
    pub fn still_valid(&self) -> bool {
        self.checks.iter().all(|(c, list)| {
            let now = self.core.map.list(*c);
            match (list.as_ref(), now.as_ref()) {
                (None, None) => true,
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                _ => false,
            }
        })
    }
}

impl OriginCore {
    /// Appends `len` bytes from `source`, merged with the previous segment when contiguous.
    fn push_segment(segments: &mut Vec<ReadSegment>, source: ReadSource, len: u64) {
        if let Some(last) = segments.last_mut() {
            let merged = match (last.source, source) {
                (ReadSource::Zeros, ReadSource::Zeros) => true,
                (ReadSource::File { fd: a, offset: o }, ReadSource::File { fd: b, offset: p }) => {
                    a == b && o + last.len == p
                }
                _ => false,
            };
            if merged {
                last.len += len;
                return;
            }
        }
        segments.push(ReadSegment { source, len });
    }

    /// The mapping of `[offset, offset+len)` of the origin (`snap` `None`) or of a snapshot,
    /// or `None` when this read must take the synchronous path: a storage without a file
    /// descriptor, a pending overlay, a rollback, a deleted snapshot, a closed origin. The
    /// range is checked by the caller.
    pub(crate) fn read_mapping(
        self: &Arc<Self>,
        snap: Option<&SnapRt>,
        offset: u64,
        len: u64,
    ) -> Option<ReadMapping> {
        self.check_alive().ok()?;
        let origin_fd = self.origin.read_fd()?;
        let mut segments = Vec::new();
        let mut checks = Vec::new();
        match snap {
            None => {
                if self.rollback.load().is_some() {
                    return None;
                }
                for c in self.chunks(offset, len) {
                    // Written by the origin's writers before they acknowledge: a write this
                    // read must see has set it by now.
                    if self.map.overlay(c) {
                        return None;
                    }
                }
                let source = ReadSource::File {
                    fd: origin_fd,
                    offset,
                };
                Self::push_segment(&mut segments, source, len);
            }
            Some(s) => {
                if s.deleted.load(SeqCst) {
                    return None;
                }
                let store_fd = self.store.storage.read_fd()?;
                let leaf = s.leaf.load(SeqCst);
                for c in self.chunks(offset, len) {
                    let start = (c * self.cs).max(offset);
                    let end = ((c + 1) * self.cs).min(offset + len);
                    let within = start - c * self.cs;
                    let list = self.map.list(c);
                    let source = match self.map_version(leaf, list.as_deref()) {
                        Mapping::Store(st) => ReadSource::File {
                            fd: store_fd,
                            offset: self.store_off(st) + within,
                        },
                        Mapping::Origin => ReadSource::File {
                            fd: origin_fd,
                            offset: start,
                        },
                        // A discarded or zeroed chunk (a zero exception).
                        Mapping::Zero => ReadSource::Zeros,
                        // A snapshot never reads the origin's overlay.
                        Mapping::Overlay => return None,
                    };
                    Self::push_segment(&mut segments, source, end - start);
                    checks.push((c, list));
                }
            }
        }
        Some(ReadMapping {
            segments,
            checks,
            core: self.clone(),
        })
    }
}
