//! Each queue's inflight bookkeeping, so that a restarted backend resumes where the previous
//! one stopped: which chains it took (marked in the inflight region the frontend keeps across
//! our restarts), in which order, and, on the first run of a ring, which of them to execute
//! again (libvhost-user's `vu_check_queue_inflights`, with every field of the region checked).

use std::sync::{Arc, Mutex, MutexGuard};

use super::export_state::ExportState;
use super::inflight::{InflightError, InflightQueue, InflightRegion};
use super::request::GuestMem;

/// One queue's inflight bookkeeping.
#[derive(Debug, Default)]
pub(crate) struct QueueTrack {
    /// Counter given to the next chain taken (orders resubmission).
    pub(crate) counter: u64,
    /// Chains to execute again, in order, before taking new ones.
    pub(crate) resubmit: Vec<u16>,
    /// The ring (re)started since the last recovery: check the region before taking chains.
    pub(crate) recover: bool,
}

/// The inflight region of one connection and the bookkeeping of each of its queues.
#[derive(Debug)]
pub(crate) struct InflightTracker {
    /// The inflight region of this connection (GET/SET_INFLIGHT_FD), if the frontend set one.
    region: Mutex<Option<Arc<InflightRegion>>>,
    /// Per queue: inflight bookkeeping.
    tracks: Vec<Mutex<QueueTrack>>,
}

impl InflightTracker {
    /// Bookkeeping for `num_queues` queues, without a region yet.
    pub(crate) fn new(num_queues: u16) -> InflightTracker {
        InflightTracker {
            region: Mutex::new(None),
            tracks: (0..num_queues)
                .map(|_| Mutex::new(QueueTrack::default()))
                .collect(),
        }
    }

    /// The current inflight region, if any.
    pub(crate) fn region(&self) -> Option<Arc<InflightRegion>> {
        self.region
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The bookkeeping of `queue`, if it exists.
    pub(crate) fn track(&self, queue: usize) -> Option<&Mutex<QueueTrack>> {
        self.tracks.get(queue)
    }

    /// Installs a new inflight region: every ring checks it when it next runs.
    pub(crate) fn install(&self, name: &str, region: InflightRegion) {
        log::info!(
            "export {name}: inflight region for {} queues of {}",
            region.num_queues(),
            region.queue_size()
        );
        *self.region.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(region));
        for t in &self.tracks {
            let mut t = t.lock().unwrap_or_else(|e| e.into_inner());
            t.recover = true;
            t.resubmit.clear();
        }
    }

    /// A ring stopped: when it starts again (maybe as a new ring), check the region again.
    pub(crate) fn ring_stopped(&self, queue_index: u32) {
        if let Some(t) = usize::try_from(queue_index)
            .ok()
            .and_then(|i| self.tracks.get(i))
        {
            lock(t).recover = true;
        }
    }
}

/// Locks a queue's bookkeeping (a panic elsewhere does not make it unusable).
pub(crate) fn lock(t: &Mutex<QueueTrack>) -> MutexGuard<'_, QueueTrack> {
    t.lock().unwrap_or_else(|e| e.into_inner())
}

/// Logs a failure to update the inflight region (counted with the bad requests).
pub(crate) fn log_inflight_failure(
    name: &str,
    state: &ExportState,
    queue: usize,
    e: &InflightError,
) {
    if state.count_bad_request().is_some() {
        log::error!("export {name} queue {queue}: {e}");
    }
}

/// First run of a ring since it (re)started with an inflight region: decide where the
/// available ring resumes and which chains run again.
pub(crate) fn recover_ring(
    name: &str,
    state: &ExportState,
    q: &mut virtio_queue::Queue,
    mem: &GuestMem,
    iq: InflightQueue<'_>,
    qidx: u16,
    t: &mut QueueTrack,
) {
    use virtio_queue::QueueT;
    let idx = q
        .used_idx(mem, std::sync::atomic::Ordering::Acquire)
        .and_then(|u| Ok((u, q.avail_idx(mem, std::sync::atomic::Ordering::Acquire)?)));
    let (used, avail) = match idx {
        Ok((u, a)) => (u.0, a.0),
        Err(e) => {
            log::warn!("export {name} queue {qidx}: cannot read the ring indices for inflight recovery: {e}");
            return;
        }
    };
    match iq.recover(qidx, q.size(), used, avail) {
        Ok(r) => {
            if !r.resubmit.is_empty() || r.completed_at_crash.is_some() {
                log::info!(
                    "export {name} queue {qidx}: resuming after a restart: {} requests resubmitted {:?}, used index {used}, available ring resumes at {} (frontend said {}){}",
                    r.resubmit.len(),
                    r.resubmit,
                    r.next_avail,
                    q.next_avail(),
                    r.completed_at_crash
                        .map(|h| format!(", request {h} had completed"))
                        .unwrap_or_default()
                );
            }
            q.set_next_avail(r.next_avail);
            q.set_next_used(used);
            t.counter = r.next_counter;
            t.resubmit = r.resubmit;
        }
        Err(e) => {
            log::warn!(
                "export {name}: {e}; resuming at the frontend's index {} without it",
                q.next_avail()
            );
            if let Err(e) = iq.reset(used) {
                log_inflight_failure(name, state, usize::from(qidx), &e);
            }
            t.counter = 0;
            t.resubmit.clear();
        }
    }
}
