//! The background worker: overlay write-out, origin sync, reclaim and rollback copy-back.

use super::*;

/// Background work: rollback copy-back and reclaim of what deleted snapshots used.
pub(super) fn worker_loop(store: Weak<StoreCore>) {
    loop {
        let Some(core) = store.upgrade() else { return };
        if core.shutdown.load(SeqCst) {
            return;
        }
        let origins: Vec<Arc<dyn AttachedOrigin>> =
            core.lock_meta().origins.values().cloned().collect();
        let mut busy = false;
        for o in &origins {
            if core.shutdown.load(SeqCst) {
                return;
            }
            match o.background_step() {
                Ok(more) => busy |= more,
                Err(e) => log::error!("origin {}: background work failed: {e}", o.id()),
            }
        }
        drop(origins);
        if !busy {
            let mut w = core.worker_lock.lock().unwrap_or_else(|e| e.into_inner());
            if !*w {
                w = core
                    .worker_wake
                    .wait_timeout(w, Duration::from_millis(1000))
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
            *w = false;
        }
    }
}

impl StoreCore {
    pub(crate) fn wake_worker(&self) {
        let mut w = self.worker_lock.lock().unwrap_or_else(|e| e.into_inner());
        *w = true;
        self.worker_wake.notify_all();
    }
}
