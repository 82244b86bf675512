use super::*;

/// Least time between two reclaims for shadowed chain copies: a reclaim visits every chunk
/// and holds `ops`, and a workload writing both the origin and a snapshot arms it constantly.
const SHADOW_RECLAIM_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

impl OriginCore {
    /// Writes the origin's dirty pages back about once a second while it is written, so that
    /// the sync a flush (of a snapshot volume too) needs finds little to write. Not a sync: it
    /// promises nothing, so it goes a slice at a time and stops when the store closes — on a
    /// sparse file the kernel may need many seconds for a second of random writes, and a stop
    /// must not wait for that.
    pub(super) fn background_sync(&self) {
        const SLICE: u64 = 256 << 20;
        let mut last = lock(&self.last_sync);
        if last.elapsed() < std::time::Duration::from_secs(1) || !self.dirty.swap(false, SeqCst) {
            return;
        }
        *last = std::time::Instant::now();
        let mut at = 0;
        while at < self.size {
            if self.store.shutdown.load(SeqCst) || self.unbound.load(SeqCst) {
                // Not finished: the next pass starts over.
                self.dirty.store(true, SeqCst);
                return;
            }
            let n = SLICE.min(self.size - at);
            if let Err(e) = self.origin.write_back(at, n) {
                log::warn!("origin {}: background write-back: {e}", self.id);
                return;
            }
            at += n;
        }
    }

    /// One slice of background work. Returns whether more is waiting.
    pub fn background_step(&self) -> Result<bool> {
        if self.unbound.load(SeqCst) || self.store.check_failed().is_err() {
            return Ok(false);
        }
        self.drain_overlays(false);
        self.finish_deaths();
        self.background_sync();
        if self.shadowed.load(SeqCst) {
            let mut last = lock(&self.shadow_reclaimed);
            if last.elapsed() >= SHADOW_RECLAIM_EVERY {
                *last = std::time::Instant::now();
                self.shadowed.store(false, SeqCst);
                self.reclaim_needed.store(true, SeqCst);
            }
        }
        // Running is raised before needed is cleared, so that `status` never sees neither
        // while a reclaim is about to start (it would report nothing pending).
        self.reclaim_running.store(true, SeqCst);
        if self.reclaim_needed.swap(false, SeqCst) {
            let _ops = lock(&self.ops);
            self.reclaim()?;
        } else {
            self.reclaim_running.store(false, SeqCst);
        }
        if let Some(rb) = self.rollback.load_full() {
            return match self.rollback_step(&rb) {
                Ok(()) => {
                    *lock(&rb.stalled) = None;
                    Ok(true)
                }
                Err(e @ Error::NoSpace { .. }) => {
                    // Wait for space (a delete wakes the worker); say so once.
                    let mut st = lock(&rb.stalled);
                    if st.is_none() {
                        log::error!("origin {}: rollback stalled: {e}", self.id);
                    }
                    *st = Some(e);
                    Ok(false)
                }
                Err(e) => Err(e),
            };
        }
        Ok(false)
    }
}
