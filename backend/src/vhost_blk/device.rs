//! The `VhostUserBackend` implementation: one backend object per client connection, one worker
//! thread per queue, no lock shared between queues.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use super::config::{device_features, BlkConfig, WRITEBACK_OFFSET};
use super::pool::{Batch, IoPool};
use super::request::{
    handle_parsed, Completion, GuestMem, ParsedChain, RequestContext, RequestError,
};
use super::{BlockDisk, DiskError};

/// Per-export settings of the device.
#[derive(Clone, Debug)]
pub struct DeviceOptions {
    /// Export name, used in logs and (first 20 bytes) as the GET_ID answer.
    pub name: String,
    /// Number of request queues (1..=64).
    pub num_queues: u16,
    /// Largest queue size accepted.
    pub max_queue_size: u16,
    /// Refuse writes and advertise VIRTIO_BLK_F_RO.
    pub readonly: bool,
}

/// State shared by the connections of one export (the serving loop resets the cache mode to
/// write-back for each new connection).
#[derive(Debug)]
pub(crate) struct ExportState {
    pub(crate) writeback: AtomicBool,
    pub(crate) bad_requests: AtomicU64,
    pub(crate) disk_errors: AtomicU64,
}

impl Default for ExportState {
    fn default() -> Self {
        ExportState {
            writeback: AtomicBool::new(true),
            bad_requests: AtomicU64::new(0),
            disk_errors: AtomicU64::new(0),
        }
    }
}

/// The vhost-user-blk backend for one client connection.
pub struct BlkBackend {
    disk: Arc<dyn BlockDisk>,
    opts: DeviceOptions,
    size: u64,
    id: Arc<[u8]>,
    mem: GuestMemoryAtomic<GuestMem>,
    state: Arc<ExportState>,
    event_idx: AtomicBool,
    /// Consumer ends of the exit eventfds handed to the crate, which turns them into raw fds
    /// and never closes them; closed by [`BlkBackend::close_exit_fds`] once the daemon is gone.
    exit_fds: Mutex<Vec<RawFd>>,
    /// Our own handles on the notify ends, to stop the workers if the daemon cannot be built.
    exit_notifiers: Mutex<Vec<EventNotifier>>,
    exit_failed: AtomicBool,
    /// Per queue: moving average of the time one request takes (ns); decides whether a batch
    /// runs on the queue thread or on the I/O pool.
    service_ns: Vec<AtomicU64>,
    pool: IoPool,
}

/// Most I/O threads of one connection (started only when requests are slow).
pub const IO_THREADS: usize = 16;
/// Requests slower than this on average are run in parallel on the I/O pool.
const PARALLEL_THRESHOLD: Duration = Duration::from_micros(30);

impl BlkBackend {
    /// A backend for one connection. `mem` must be the same `GuestMemoryAtomic` given to the
    /// `VhostUserDaemon`, whose handler swaps its contents on memory-table changes.
    pub fn new(
        disk: Arc<dyn BlockDisk>,
        opts: DeviceOptions,
        mem: GuestMemoryAtomic<GuestMem>,
    ) -> BlkBackend {
        Self::with_state(disk, opts, mem, Arc::new(ExportState::default()))
    }

    pub(crate) fn with_state(
        disk: Arc<dyn BlockDisk>,
        opts: DeviceOptions,
        mem: GuestMemoryAtomic<GuestMem>,
        state: Arc<ExportState>,
    ) -> BlkBackend {
        let size = disk.size();
        let mut id = opts.name.as_bytes().to_vec();
        id.truncate(virtio_bindings::virtio_blk::VIRTIO_BLK_ID_BYTES as usize);
        BlkBackend {
            disk,
            service_ns: (0..opts.num_queues).map(|_| AtomicU64::new(0)).collect(),
            pool: IoPool::new(&opts.name, IO_THREADS),
            opts,
            size,
            id: id.into(),
            mem,
            state,
            event_idx: AtomicBool::new(false),
            exit_fds: Mutex::new(Vec::new()),
            exit_notifiers: Mutex::new(Vec::new()),
            exit_failed: AtomicBool::new(false),
        }
    }

    /// The configuration space as it is now.
    pub fn config(&self) -> BlkConfig {
        BlkConfig {
            size_bytes: self.size,
            physical_block_size: self.disk.physical_block_size(),
            num_queues: self.opts.num_queues,
            writeback: self.state.writeback.load(Ordering::Relaxed),
        }
    }

    /// True if an exit eventfd could not be created: the crate's worker threads then never
    /// stop and the daemon must not be dropped (it would join them forever).
    pub fn exit_event_failed(&self) -> bool {
        self.exit_failed.load(Ordering::SeqCst)
    }

    /// Closes the exit eventfds leaked by the crate. Call only after the daemon that used this
    /// backend has been dropped (its worker threads are joined by then).
    pub fn close_exit_fds(&self) {
        let fds = std::mem::take(&mut *self.exit_fds.lock().unwrap_or_else(|e| e.into_inner()));
        for fd in fds {
            // SAFETY: `fd` is the consumer end of an eventfd created in `exit_event`; the crate
            // converted it with `into_raw_fd` and never closes it; its epoll loop and worker
            // thread are gone once the daemon is dropped, so this is the only owner left.
            drop(unsafe { OwnedFd::from_raw_fd(fd) });
        }
    }

    /// Tells every worker thread created so far to exit. For when `VhostUserDaemon::new`
    /// failed half-way: its workers were started but no handler will ever stop them. Their
    /// exit fds are then left open (the threads may still be reading them).
    pub fn stop_orphan_workers(&self) {
        let notifiers = std::mem::take(
            &mut *self
                .exit_notifiers
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
        );
        for n in notifiers {
            if let Err(e) = n.notify() {
                log::error!(
                    "export {}: cannot stop a worker thread: {e}",
                    self.opts.name
                );
            }
        }
        self.exit_fds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

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
        let name = &self.opts.name;
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

    fn record_service_time(&self, queue: usize, took: Duration) {
        if let Some(avg) = self.service_ns.get(queue) {
            let sample = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
            let old = avg.load(Ordering::Relaxed);
            // Exponential moving average, weight 1/8.
            let new = old - old / 8 + sample / 8;
            avg.store(new, Ordering::Relaxed);
        }
    }

    fn is_slow(&self, queue: usize) -> bool {
        self.service_ns
            .get(queue)
            .is_some_and(|a| a.load(Ordering::Relaxed) > PARALLEL_THRESHOLD.as_nanos() as u64)
    }

    /// Runs `chains` on the I/O pool (and this thread) at once; results in chain order.
    fn run_parallel(
        &self,
        mem: &Arc<GuestMem>,
        chains: Vec<(u16, ParsedChain)>,
        queue: usize,
        writeback: bool,
        out: &mut Vec<(u16, Completion)>,
    ) {
        if chains.len() <= 1 {
            let ctx = self.context(writeback);
            for (head, chain) in chains {
                let t = Instant::now();
                out.push((head, handle_parsed(mem, chain, &ctx)));
                self.record_service_time(queue, t.elapsed());
            }
            return;
        }
        let batch = Batch::new(chains.len());
        let jobs = chains
            .into_iter()
            .enumerate()
            .map(|(i, (head, chain))| {
                let batch = batch.clone();
                let mem = mem.clone();
                let disk = self.disk.clone();
                let id = self.id.clone();
                let (size, readonly) = (self.size, self.opts.readonly);
                Box::new(move || {
                    let t = Instant::now();
                    let ctx = RequestContext {
                        disk: &*disk,
                        size,
                        readonly,
                        writeback,
                        id: &id,
                    };
                    let done = handle_parsed(&mem, chain, &ctx);
                    batch.finish(i, (head, done, t.elapsed()));
                }) as Box<dyn FnOnce() + Send>
            })
            .collect();
        self.pool.submit(jobs);
        // Every job calls `finish` exactly once (request handling catches panics), so every
        // slot is filled.
        for (head, done, took) in batch.wait(&self.pool).into_iter().flatten() {
            self.record_service_time(queue, took);
            out.push((head, done));
        }
    }

    fn context(&self, writeback: bool) -> RequestContext<'_> {
        RequestContext {
            disk: &*self.disk,
            size: self.size,
            readonly: self.opts.readonly,
            writeback,
            id: &self.id,
        }
    }

    /// Executes the chains of one batch. Fast requests (page cache) run one after the other on
    /// this thread; when requests have been slow lately (waiting for the journal or the
    /// device), they run in parallel on the I/O pool, a FLUSH waiting for every request before
    /// it in the batch and running before those after it.
    fn execute_batch(
        &self,
        mem: &Arc<GuestMem>,
        chains: Vec<(u16, ParsedChain)>,
        queue: usize,
        writeback: bool,
    ) -> Vec<(u16, Completion)> {
        let mut out = Vec::with_capacity(chains.len());
        if chains.len() == 1 || !self.is_slow(queue) {
            let ctx = self.context(writeback);
            for (head, chain) in chains {
                let t = Instant::now();
                out.push((head, handle_parsed(mem, chain, &ctx)));
                self.record_service_time(queue, t.elapsed());
            }
            return out;
        }
        let mut segment = Vec::new();
        for (head, chain) in chains {
            if chain.request_type(mem) == Some(virtio_bindings::virtio_blk::VIRTIO_BLK_T_FLUSH) {
                self.run_parallel(
                    mem,
                    std::mem::take(&mut segment),
                    queue,
                    writeback,
                    &mut out,
                );
                self.run_parallel(mem, vec![(head, chain)], queue, writeback, &mut out);
            } else {
                segment.push((head, chain));
            }
        }
        self.run_parallel(mem, segment, queue, writeback, &mut out);
        out
    }

    /// Pops every available chain, executes the batch and puts it on the used ring. Holds the
    /// vring lock for the batch, so GET_VRING_BASE (which takes it to stop the ring) waits
    /// until the requests in flight are done.
    fn process_batch(&self, vring: &VringRwLock, queue: usize) -> Result<usize, String> {
        let writeback = self.state.writeback.load(Ordering::Relaxed);
        let mut guard = vring.get_mut();
        let q = guard.get_queue_mut();
        let mut mem = self.mem.memory().into_inner();
        let mut chains: Vec<(u16, ParsedChain)> = Vec::new();
        // The frontend may add memory (ADD_MEM_REG) between our load of the map and its
        // posting of a request that uses it; a request read from the ring must be translated
        // with a map at least as new as the ring entry. So: read the chains, then check that
        // the map did not change meanwhile; if it did, step back and read them again.
        for attempt in 0..4 {
            chains = match q.iter(&*mem) {
                Ok(it) => it
                    .map(|chain| (chain.head_index(), ParsedChain::parse(chain)))
                    .collect(),
                // Not ready (stopped or reset): nothing to do.
                Err(virtio_queue::Error::QueueNotReady) => return Ok(0),
                Err(e) => return Err(format!("cannot read the available ring: {e}")),
            };
            let now = self.mem.memory().into_inner();
            if std::sync::Arc::ptr_eq(&now, &mem) || attempt == 3 {
                break;
            }
            for _ in 0..chains.len() {
                q.go_to_previous_position();
            }
            mem = now;
        }
        let count = chains.len();
        if count == 0 {
            return Ok(0);
        }
        for (head, done) in self.execute_batch(&mem, chains, queue, writeback) {
            if let Some(e) = &done.error {
                self.log_failure(queue, e);
            }
            if let Err(e) = q.add_used(&*mem, head, done.used_len) {
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
        let notify = q
            .needs_notification(&*mem)
            .map_err(|e| format!("cannot read used_event: {e}"))?;
        if notify {
            guard
                .signal_used_queue()
                .map_err(|e| format!("cannot signal the call eventfd: {e}"))?;
        }
        Ok(count)
    }

    fn process_vring(&self, vring: &VringRwLock, queue: usize) -> Result<(), String> {
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

impl VhostUserBackend for BlkBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        usize::from(self.opts.num_queues)
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.opts.max_queue_size)
    }

    fn features(&self) -> u64 {
        device_features(self.opts.readonly) | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.config().read(offset, size)
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        // Only `writeback` is writable (CONFIG_WCE); other writes are ignored, not refused:
        // an error would make the crate drop the connection.
        let start = offset as usize;
        if let Some(i) = WRITEBACK_OFFSET.checked_sub(start) {
            if let Some(&v) = buf.get(i) {
                self.state.writeback.store(v != 0, Ordering::Relaxed);
                log::info!(
                    "export {}: guest set cache mode to {}",
                    self.opts.name,
                    if v != 0 {
                        "write-back"
                    } else {
                        "write-through"
                    }
                );
            }
        }
        Ok(())
    }

    fn update_memory(&self, _mem: GuestMemoryAtomic<GuestMem>) -> io::Result<()> {
        // `self.mem` is the same atomic the handler just updated.
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.opts.num_queues).map(|q| 1u64 << q).collect()
    }

    fn exit_event(&self, thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        match new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC) {
            Ok((consumer, notifier)) => {
                self.exit_fds
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(consumer.as_raw_fd());
                match notifier.try_clone() {
                    Ok(n) => self
                        .exit_notifiers
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(n),
                    Err(e) => log::warn!(
                        "export {}: cannot duplicate the exit eventfd of worker {thread_index}: {e}",
                        self.opts.name
                    ),
                }
                Some((consumer, notifier))
            }
            Err(e) => {
                log::error!(
                    "export {}: cannot create the exit eventfd of worker {thread_index}: {e}",
                    self.opts.name
                );
                self.exit_failed.store(true, Ordering::SeqCst);
                None
            }
        }
    }

    fn stop_vring(&self, _queue_index: u32) -> io::Result<()> {
        // Requests are executed synchronously while the worker holds the vring lock, and the
        // handler took that lock to mark the ring not ready before calling us: nothing of
        // this ring is in flight any more, so GET_VRING_BASE's answer is exact.
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        thread_id: usize,
    ) -> io::Result<()> {
        if !evset.contains(EventSet::IN) {
            return Ok(());
        }
        // One queue per worker: `device_event` indexes this worker's own vrings and the
        // thread index is the queue number.
        let Some(vring) = vrings.get(usize::from(device_event)) else {
            log::warn!(
                "export {}: event {device_event} for an unknown vring on worker {thread_id}",
                self.opts.name
            );
            return Ok(());
        };
        // Never return an error for a guest's fault: the crate would end this worker thread
        // and the queue would hang.
        if let Err(e) = self.process_vring(vring, thread_id) {
            let n = self.state.bad_requests.fetch_add(1, Ordering::Relaxed) + 1;
            if n <= 16 || n.is_power_of_two() {
                log::warn!("export {} queue {thread_id}: {e}", self.opts.name);
            }
        }
        Ok(())
    }
}
