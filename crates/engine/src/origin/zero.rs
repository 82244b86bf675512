//! Discard and write-zeroes: a range that must read as zeros afterwards, at the cost of
//! metadata rather than data where the range covers whole chunks.
//!
//! - On the origin: what snapshots still read is copied out first (a zero exception if it is
//!   zeros already), then the origin's space is given back (`Storage::zero_range`: a hole).
//! - On a snapshot: the leaf's own chunk is dropped (freed through the deferred-free path) and
//!   replaced by a zero exception, or by nothing when what the leaf inherits reads as zeros.
//!
//! Partial chunks are written as zeros, as a write would.

use super::cow::is_zero;
use super::*;
use crate::meta::ZERO_CHUNK;
use std::io::IoSlice;

/// Zeros to write from: a range of any length is a list of slices of this one buffer.
static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];

/// `len` bytes of zeros as slices (no allocation of the length itself).
fn zero_slices(len: u64) -> Vec<IoSlice<'static>> {
    let n = ZEROS.len() as u64;
    (0..len.div_ceil(n))
        .map(|i| IoSlice::new(&ZEROS[..(len - i * n).min(n) as usize]))
        .collect()
}

impl OriginCore {
    /// The whole chunks of `offset..offset + len` (the origin's short last chunk is whole if
    /// the range reaches the end).
    fn whole_chunks(&self, offset: u64, len: u64) -> std::ops::Range<u64> {
        let end = offset + len;
        let first = offset.div_ceil(self.cs);
        let last = if end == self.size {
            self.nchunks
        } else {
            end / self.cs
        };
        first..last.max(first)
    }

    /// Discard / write-zeroes on the origin volume. Like a write, it fails before any of it
    /// lands if the store has no room for what snapshots must keep.
    pub fn origin_zero(&self, offset: u64, len: u64) -> Result<()> {
        let whole = self.whole_chunks(offset, len);
        loop {
            let pass = self.gate.enter();
            self.check_alive()?;
            // No whole chunk; a rollback (it restores chunks under writes); an overlay (written
            // out later over the origin): the write path, with zeros.
            if whole.is_empty()
                || self.rollback.load().is_some()
                || self.chunks(offset, len).any(|c| self.map.overlay(c))
            {
                drop(pass);
                return self.origin_write(offset, len, &zero_slices(len));
            }
            if !self.dirty.load(std::sync::atomic::Ordering::Relaxed) {
                self.dirty.store(true, SeqCst);
            }
            let mut newest = self.newest.load(SeqCst);
            if self.live_snaps.load(SeqCst) == 0 && self.dying_count.load(SeqCst) == 0 {
                newest = 0;
            }
            // What snapshots still read from the origin is copied out first, every chunk before
            // any byte changes, and the copies durable before the origin loses the data
            // (waited for outside the gate, then start again).
            let mut wait = 0;
            for c in self.chunks(offset, len) {
                wait = wait.max(self.ensure_copied(c, newest)?);
            }
            if wait > self.store.durable_epoch.load(SeqCst) {
                drop(pass);
                self.store.wait_durable(wait)?;
                continue;
            }
            let start = whole.start * self.cs;
            let end = (whole.end * self.cs).min(self.size);
            let write = |at: u64, n: u64| {
                self.io(
                    || format!("writing origin {} at {at}", self.origin.name()),
                    self.origin.write_vectored_at(&zero_slices(n), at),
                )
            };
            if offset < start {
                write(offset, start - offset)?;
            }
            if end < offset + len {
                write(end, offset + len - end)?;
            }
            self.io(
                || {
                    format!(
                        "zeroing origin {} at {start} for {} bytes",
                        self.origin.name(),
                        end - start
                    )
                },
                self.origin.zero_range(start, end - start),
            )?;
            // An overlay started meanwhile from data read before the zeros: zero it too.
            let wait_records = self.after_direct_write(offset, len, &zero_slices(len))?;
            drop(pass);
            if wait_records {
                self.records_written()?;
            }
            return Ok(());
        }
    }

    /// Discard / write-zeroes on snapshot `snap`. Fails before any of it lands if the store
    /// has no room (for partial chunks' data, or for zero exceptions' metadata).
    pub fn snap_zero(&self, snap: &SnapRt, offset: u64, len: u64) -> Result<()> {
        let whole = self.whole_chunks(offset, len);
        {
            // Closed: no write of this snapshot may land in a chunk this frees, and no read of
            // it may read one (reads pass the gate too).
            let _closed = snap.gate.close();
            if snap.deleted.load(SeqCst) {
                return Err(Error::Deleted(format!(
                    "snapshot {} of origin {}",
                    snap.tag, self.id
                )));
            }
            self.check_alive()?;
            let leaf = snap.leaf.load(SeqCst);
            let parent = self
                .node(leaf)
                .map(|n| n.parent)
                .ok_or_else(|| Error::Corrupt {
                    store: self.store.name.clone(),
                    what: format!(
                        "origin {}: snapshot {} has no leaf {leaf}",
                        self.id, snap.tag
                    ),
                })?;
            let own = |c: u64| Self::own(self.map.list(c).as_deref(), leaf);
            // What each whole chunk becomes: `Some(true)` a zero exception, `Some(false)` no
            // exception (what the leaf inherits is zeros: the content of an older version
            // never changes, so this holds for good), `None` nothing to do. Only this
            // snapshot's writes change the leaf's exceptions, and the gate is closed.
            let mut buf = vec![0u8; self.cs as usize];
            let mut plan = Vec::new();
            let mut new_zeros = 0usize;
            for c in whole.clone() {
                let mine = own(c);
                if mine == Some(ZERO_CHUNK) {
                    continue;
                }
                let l = self.chunk_len(c) as usize;
                let from = self.map_version(parent, self.map.list(c).as_deref());
                self.read_view(parent, c, 0, &mut [std::io::IoSliceMut::new(&mut buf[..l])])?;
                let needs_zero = !is_zero(&buf[..l]);
                if !needs_zero && mine.is_none() {
                    continue;
                }
                new_zeros += usize::from(needs_zero && mine.is_none());
                plan.push((c, needs_zero, from));
            }
            // Partial chunks are written as zeros; their first writes need chunks now.
            let parts: Vec<u64> = self
                .chunks(offset, len)
                .filter(|c| !whole.contains(c))
                .collect();
            let need = parts
                .iter()
                .filter(|&&c| own(c).is_none_or(|s| s == ZERO_CHUNK))
                .count();
            let mut spare = self.store.alloc_chunks(need, || {
                format!(
                    "discard of snapshot {} of origin {} at byte {offset} needs {need} new chunks (it fails)",
                    snap.tag, self.id
                )
            })?;
            {
                let mut m = self.store.lock_meta();
                if m.free.len() + m.pending_free.len() < m.zeros as usize + new_zeros {
                    drop(m);
                    for s in spare {
                        self.store.unalloc_chunk(s);
                    }
                    return Err(Error::NoSpace {
                        store: self.store.name.clone(),
                        what: format!(
                            "discard of snapshot {} of origin {} at byte {offset}: no room for {new_zeros} zero exceptions (it fails)",
                            snap.tag, self.id
                        ),
                    });
                }
                for (c, zero, from) in plan {
                    // Dropping the leaf's exception trusts what it inherits: if that moved
                    // meanwhile (a reclaim freed the copy it read, a copy-out shadowed the
                    // origin), make it a zero exception instead (neutral: it had a chunk).
                    let now = self.map_version(parent, self.map.list(c).as_deref());
                    self.set_own_zero(&mut m, c, leaf, zero || now != from);
                }
            }
            self.store.commit_wake.notify_one();
            let mut r = Ok(());
            for c in parts {
                let s = (c * self.cs).max(offset);
                let e = ((c + 1) * self.cs).min(offset + len);
                r = self.snap_write_chunk(
                    leaf,
                    c,
                    s - c * self.cs,
                    &zero_slices(e - s),
                    &mut spare,
                );
                if r.is_err() {
                    break;
                }
            }
            for s in spare {
                self.store.unalloc_chunk(s);
            }
            r?;
        }
        self.records_written()
    }
}
