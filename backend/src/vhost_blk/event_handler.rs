//! One queue's work when its kick eventfd fires: take the available chains (after those a
//! previous process left in flight), mark them in flight, run them, put them on the used ring,
//! count them and signal the guest.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vhost_user_backend::{VringRwLock, VringState, VringT};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{GuestAddress, GuestAddressSpace, GuestMemoryAtomic};

use super::disk::DiskError;
use super::dispatch::{Dispatcher, Done};
use super::export_state::ExportState;
use super::inflight::{split_chain, InflightQueue};
use super::persist::{log_inflight_failure, recover_ring, InflightTracker, QueueTrack};
use super::request::{GuestMem, ParsedChain, RequestError};

/// A vring of the device, over guest memory with its dirty-page log.
pub(crate) type Vring = VringRwLock<GuestMemoryAtomic<GuestMem>>;

/// Test knob, not for production: `SNAPMV_TEST_DELAY_WRITES_MS=N` (1..=1000) holds every batch
/// that contains a write or a flush for N ms after its chains are marked in flight and before
/// they execute, so that the end-to-end restart tests (tests/e2e_restart.rs) kill the daemon
/// with requests in flight in it rather than only in the guest.
fn test_write_delay() -> Option<Duration> {
    static DELAY: std::sync::OnceLock<Option<Duration>> = std::sync::OnceLock::new();
    *DELAY.get_or_init(|| {
        std::env::var("SNAPMV_TEST_DELAY_WRITES_MS")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|ms| (1..=1000).contains(ms))
            .map(Duration::from_millis)
    })
}

/// How long one batch keeps taking new chains while reads are in flight through io_uring
/// before it drains them and lets the vring lock go.
const BUSY_FOR: Duration = Duration::from_millis(20);

/// Processes the queues of one connection.
pub(crate) struct QueueProcessor {
    /// The export's name, for logs.
    pub(crate) name: String,
    /// The guest memory map, swapped by the vhost-user handler on memory-table changes.
    pub(crate) mem: GuestMemoryAtomic<GuestMem>,
    /// What the export keeps across connections (cache mode, counters).
    pub(crate) state: Arc<ExportState>,
    /// Inflight bookkeeping of this connection.
    pub(crate) tracker: InflightTracker,
    /// Runs the requests.
    pub(crate) dispatcher: Dispatcher,
}

impl QueueProcessor {
    /// Logs a failed request. A guest (or a full store) can make every request fail: after
    /// the first 16 of a kind, only every power of two is logged.
    fn log_failure(&self, queue: usize, e: &RequestError) {
        let disk = e.is_disk_failure();
        let counter = if disk {
            &self.state.disk_errors
        } else {
            &self.state.bad_requests
        };
        let n = counter.fetch_add(1, Ordering::Relaxed) + 1;
        if n > 16 && !n.is_power_of_two() {
            return;
        }
        let name = &self.name;
        match e {
            RequestError::Disk {
                source: DiskError::NoSpace { .. },
                ..
            } => log::error!(
                "export {name}: COW store is full, write failed with IOERR (queue {queue}, {n} disk errors so far): {e}"
            ),
            _ if disk => log::error!("export {name} queue {queue}: {e} ({n} disk errors so far)"),
            _ => log::warn!(
                "export {name} queue {queue}: request refused ({n} so far): {e}"
            ),
        }
    }

    /// Pops every available chain, executes the batch and puts it on the used ring. Holds the
    /// vring lock for the batch, so GET_VRING_BASE (which takes it to stop the ring) waits
    /// until the requests in flight are done.
    fn process_batch(&self, vring: &Vring, queue: usize) -> Result<usize, String> {
        let writeback = self.state.writeback.load(Ordering::Relaxed);
        let mut guard = vring.get_mut();
        let q = guard.get_queue_mut();
        if !q.ready() {
            return Ok(0);
        }
        let mut mem = self.mem.memory().into_inner();
        let region = self.tracker.region();
        let track = self.tracker.track(queue);
        let qidx = u16::try_from(queue).unwrap_or(u16::MAX);
        let iq = region.as_deref().and_then(|r| r.queue(qidx));
        // The first run of a ring after a (re)connect with an inflight region.
        let mut ring_started = false;
        let resubmit = match (iq, track) {
            (Some(iq), Some(track)) => {
                let mut t = track.lock().unwrap_or_else(|e| e.into_inner());
                if t.recover {
                    t.recover = false;
                    ring_started = true;
                    recover_ring(&self.name, &self.state, q, &mem, iq, qidx, &mut t);
                }
                // Kept in the track until the batch is certain to run them (an error below
                // must not lose them: the guest would wait for them forever).
                t.resubmit.clone()
            }
            _ => Vec::new(),
        };
        let mut chains: Vec<(u16, ParsedChain)> = Vec::new();
        // The frontend may add memory (ADD_MEM_REG) between our load of the map and its
        // posting of a request that uses it; a request read from the ring must be translated
        // with a map at least as new as the ring entry. So: read the chains, then check that
        // the map did not change meanwhile; if it did, step back and read them again.
        // Chains left in flight by a previous process come first, in their original order;
        // they are no longer reachable through the available ring.
        let desc_table = GuestAddress(q.desc_table());
        let ring_size = q.size();
        for attempt in 0..4 {
            chains = resubmit
                .iter()
                .map(|&h| {
                    let descs = split_chain(&*mem, desc_table, ring_size, h);
                    (h, ParsedChain::parse(descs.into_iter()))
                })
                .collect();
            match q.iter(&*mem) {
                Ok(it) => {
                    chains.extend(it.map(|chain| (chain.head_index(), ParsedChain::parse(chain))))
                }
                // Not ready (stopped or reset): nothing to do.
                Err(virtio_queue::Error::QueueNotReady) => return Ok(0),
                Err(e) => return Err(format!("cannot read the available ring: {e}")),
            };
            let now = self.mem.memory().into_inner();
            if std::sync::Arc::ptr_eq(&now, &mem) || attempt == 3 {
                break;
            }
            for _ in resubmit.len()..chains.len() {
                q.go_to_previous_position();
            }
            mem = now;
        }
        let count = chains.len();
        if count == 0 {
            if ring_started {
                // The previous process may have put completions on the used ring and died
                // before signalling them: without an interrupt the guest would wait for them
                // forever (libvhost-user signals at SET_VRING_CALL for the same reason). A
                // spurious interrupt is harmless.
                guard
                    .signal_used_queue()
                    .map_err(|e| format!("cannot signal the call eventfd: {e}"))?;
            }
            return Ok(0);
        }
        let started = Instant::now();
        let mut taken = started;
        let metrics = self.state.metrics();
        metrics.requests_taken(queue, count);
        // Record the chains just taken as in flight before executing any of them.
        let fresh: Vec<u16> = chains[resubmit.len()..].iter().map(|(h, _)| *h).collect();
        self.mark_inflight(iq, track, queue, &fresh);
        if let Some(track) = track {
            // The resubmitted chains run in this batch, which completes every chain it holds.
            track
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .resubmit
                .clear();
        }
        if let Some(delay) = test_write_delay() {
            let writes = chains.iter().any(|(_, c)| {
                matches!(
                    c.request_type(&mem),
                    Some(virtio_bindings::virtio_blk::VIRTIO_BLK_T_OUT)
                        | Some(virtio_bindings::virtio_blk::VIRTIO_BLK_T_FLUSH)
                )
            });
            if writes {
                std::thread::sleep(delay);
            }
        }
        // Reads through the ring complete later, out of order: while any is in flight, this
        // thread waits for completions and takes the chains the guest adds meanwhile, so the
        // device sees as many reads as the guest has in flight. After BUSY_FOR it takes no
        // more and drains, so that the vring lock (GET_VRING_BASE waits for it) is let go.
        let st: &mut VringState<GuestMemoryAtomic<GuestMem>> = &mut guard;
        let mut ring = self.dispatcher.ring(queue);
        let mut total = count;
        let mut signal = ring_started;
        // An error stops the taking of chains, not the draining: a read left in the ring
        // would never be completed (the next batch may find no new chain to run the loop).
        let mut error = None;
        loop {
            if !chains.is_empty() {
                let done = self.dispatcher.start_batch(
                    ring.as_deref_mut().and_then(Option::as_mut),
                    &mem,
                    std::mem::take(&mut chains),
                    queue,
                    writeback,
                    taken,
                );
                self.put_used(st.get_queue_mut(), &mem, iq, queue, done);
            }
            let Some(r) = ring.as_deref_mut().and_then(Option::as_mut) else {
                break;
            };
            let mut done = Vec::new();
            self.dispatcher.reap(r, false, writeback, &mut done);
            self.put_used(st.get_queue_mut(), &mem, iq, queue, done);
            if r.in_flight() == 0 {
                break;
            }
            if let Err(e) = self.notify(st, &mem, &mut signal) {
                error.get_or_insert(e);
            }
            let mut done = Vec::new();
            self.dispatcher.reap(r, true, writeback, &mut done);
            self.put_used(st.get_queue_mut(), &mem, iq, queue, done);
            if error.is_none() && Instant::now().saturating_duration_since(started) < BUSY_FOR {
                match self.take_more(st.get_queue_mut(), &mut mem) {
                    Ok(more) => chains = more,
                    Err(e) => error = Some(e),
                }
                if !chains.is_empty() {
                    taken = Instant::now();
                    metrics.requests_taken(queue, chains.len());
                    let heads: Vec<u16> = chains.iter().map(|(h, _)| *h).collect();
                    self.mark_inflight(iq, track, queue, &heads);
                    total += chains.len();
                }
            }
        }
        if let Some(e) = error {
            return Err(e);
        }
        self.notify(st, &mem, &mut signal)?;
        Ok(total)
    }

    /// Records `heads`, just taken, as in flight in the inflight region.
    fn mark_inflight(
        &self,
        iq: Option<InflightQueue<'_>>,
        track: Option<&Mutex<QueueTrack>>,
        queue: usize,
        heads: &[u16],
    ) {
        let (Some(iq), Some(track)) = (iq, track) else {
            return;
        };
        let mut t = track.lock().unwrap_or_else(|e| e.into_inner());
        for head in heads {
            if let Err(e) = iq.set_inflight(*head, t.counter) {
                log_inflight_failure(&self.name, &self.state, queue, &e);
            }
            t.counter = t.counter.wrapping_add(1);
        }
    }

    /// Takes the chains the guest made available since the last look (see `process_batch`
    /// for why the memory map is read again around it).
    fn take_more(
        &self,
        q: &mut Queue,
        mem: &mut Arc<GuestMem>,
    ) -> Result<Vec<(u16, ParsedChain)>, String> {
        let mut cur = self.mem.memory().into_inner();
        for attempt in 0..4 {
            let chains: Vec<(u16, ParsedChain)> = match q.iter(&*cur) {
                Ok(it) => it
                    .map(|chain| (chain.head_index(), ParsedChain::parse(chain)))
                    .collect(),
                Err(virtio_queue::Error::QueueNotReady) => return Ok(Vec::new()),
                Err(e) => return Err(format!("cannot read the available ring: {e}")),
            };
            let now = self.mem.memory().into_inner();
            if Arc::ptr_eq(&now, &cur) || attempt == 3 {
                *mem = cur;
                return Ok(chains);
            }
            for _ in 0..chains.len() {
                q.go_to_previous_position();
            }
            cur = now;
        }
        Ok(Vec::new())
    }

    /// Counts the executed chains and puts them on the used ring.
    fn put_used(
        &self,
        q: &mut Queue,
        mem: &GuestMem,
        iq: Option<InflightQueue<'_>>,
        queue: usize,
        done: Vec<(Done, Instant)>,
    ) {
        let metrics = self.state.metrics();
        for (
            Done {
                head,
                completion: done,
                finished,
            },
            taken,
        ) in done
        {
            // Counted before the guest can see the completion.
            match &done.error {
                Some(e) => {
                    metrics.request_failed(queue);
                    self.log_failure(queue, e);
                }
                None => metrics.request_done(
                    queue,
                    done.kind,
                    done.bytes,
                    finished.saturating_duration_since(taken),
                ),
            }
            if let Some(iq) = iq {
                if let Err(e) = iq.pre_put(head) {
                    log_inflight_failure(&self.name, &self.state, queue, &e);
                }
            }
            let used = q.add_used(mem, head, done.used_len);
            if let (Ok(()), Some(iq)) = (&used, iq) {
                if let Err(e) = iq.post_put(head, q.next_used()) {
                    log_inflight_failure(&self.name, &self.state, queue, &e);
                }
            }
            if let Err(e) = used {
                // An out-of-range head index cannot be returned; the guest broke its ring.
                self.log_failure(
                    queue,
                    &RequestError::BadSegments {
                        what: "used ring",
                        why: format!("cannot return descriptor {head}: {e}"),
                    },
                );
            }
        }
    }

    /// Signals the guest if it asked to be (EVENT_IDX), or once after a restart (`force`,
    /// then cleared).
    fn notify(
        &self,
        st: &mut VringState<GuestMemoryAtomic<GuestMem>>,
        mem: &GuestMem,
        force: &mut bool,
    ) -> Result<(), String> {
        let notify = st
            .get_queue_mut()
            .needs_notification(mem)
            .map_err(|e| format!("cannot read used_event: {e}"))?;
        if notify || *force {
            *force = false;
            st.signal_used_queue()
                .map_err(|e| format!("cannot signal the call eventfd: {e}"))?;
        }
        Ok(())
    }

    pub(crate) fn process_vring(&self, vring: &Vring, queue: usize) -> Result<(), String> {
        loop {
            // With EVENT_IDX this does nothing; without it, it suppresses kicks while we work.
            vring
                .disable_notification()
                .map_err(|e| format!("cannot disable notifications: {e}"))?;
            let done = self.process_batch(vring, queue)?;
            // Re-enable, then look again: a chain made available in between must not be lost.
            let more = vring
                .enable_notification()
                .map_err(|e| format!("cannot enable notifications: {e}"))?;
            if !more {
                break;
            }
            if done == 0 {
                // The avail index says there is work but no chain could be read (an avail
                // ring entry outside guest memory): do not spin; the next kick retries.
                return Err("available ring announces entries that cannot be read".into());
            }
        }
        Ok(())
    }
}
