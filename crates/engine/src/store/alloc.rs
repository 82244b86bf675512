//! The allocator of store chunks: the free list, the bitmap, and frees that wait for their
//! record to be durable.

use super::*;

impl StoreCore {
    /// Takes a free store chunk, or says the store is full.
    pub(crate) fn alloc_chunk(&self, what: impl FnOnce() -> String) -> Result<u64> {
        Ok(self.alloc_chunks(1, what)?.pop().unwrap_or_default())
    }

    /// Takes `n` free store chunks at once, or none. Chunks freed but not yet committed can
    /// not be reused before their free is durable; when only they would make room, commit
    /// first rather than fail a write while `status` already counts them free.
    pub(crate) fn alloc_chunks(&self, n: usize, what: impl FnOnce() -> String) -> Result<Vec<u64>> {
        for first in [true, false] {
            let mut m = self.lock_meta();
            // Zero exceptions hold no chunk but count against the store's (see `zeros`).
            if m.free.len() + m.pending_free.len() < n + m.zeros as usize {
                break;
            }
            if m.free.len() >= n {
                let at = m.free.len() - n;
                return Ok(m.free.split_off(at));
            }
            if !first || m.free.len() + m.pending_free.len() < n {
                break;
            }
            drop(m);
            self.commit_sync()?;
        }
        Err(Error::NoSpace {
            store: self.name.clone(),
            what: what(),
        })
    }

    /// Returns a chunk taken by `alloc_chunk` that was never recorded.
    pub(crate) fn unalloc_chunk(&self, c: u64) {
        self.lock_meta().free.push(c);
    }

    /// Marks allocation of a recorded exception (under the metadata lock).
    pub(crate) fn note_alloc(m: &mut MetaCore, c: u64) {
        bit_set(&mut m.alloc, c, true);
        m.used += 1;
    }

    /// Marks a freed exception's chunk; reusable after its batch is durable.
    pub(crate) fn note_free(m: &mut MetaCore, c: u64) {
        bit_set(&mut m.alloc, c, false);
        m.used -= 1;
        let e = m.epoch;
        m.pending_free.push((e, c));
    }
}

impl StoreCore {
    /// Whether one more zero exception fits (under the metadata lock): zero exceptions and
    /// data chunks together stay within the store's chunks, which the checkpoint is sized for.
    pub(crate) fn zero_room(m: &MetaCore) -> bool {
        m.free.len() + m.pending_free.len() > m.zeros as usize
    }

    /// Counts a zero exception made (`true`) or dropped (under the metadata lock).
    pub(crate) fn note_zero(m: &mut MetaCore, made: bool) {
        if made {
            m.zeros += 1;
        } else {
            m.zeros = m.zeros.saturating_sub(1);
        }
    }
}
