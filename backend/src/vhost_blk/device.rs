//! The `VhostUserBackend` implementation: one backend object per client connection, one worker
//! thread per queue, no lock shared between queues.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{
    VhostUserInflight, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{GuestAddress, GuestAddressSpace, GuestMemoryAtomic};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use super::config::{device_features, BlkConfig, WRITEBACK_OFFSET};
use super::inflight::{split_chain, InflightError, InflightRegion};
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

/// State shared by the connections of one export.
///
/// The cache mode the guest chose survives reconnects and, through `cache_mode_file`, restarts
/// of the daemon: QEMU sends it only when the guest changes it, so a guest that chose
/// write-through would otherwise get a write-back device (unflushed writes acknowledged
/// before they are durable) after a restart. The virtio spec allows either mode after a reset.
#[derive(Debug)]
pub(crate) struct ExportState {
    pub(crate) writeback: AtomicBool,
    pub(crate) bad_requests: AtomicU64,
    pub(crate) disk_errors: AtomicU64,
    /// Where a write-through choice is recorded (the file exists only then).
    cache_mode_file: Option<PathBuf>,
}

impl Default for ExportState {
    fn default() -> Self {
        ExportState::new(None)
    }
}

impl ExportState {
    /// The state of an export, with the cache mode recorded in `cache_mode_file`, if any.
    pub(crate) fn new(cache_mode_file: Option<PathBuf>) -> Self {
        let write_through = cache_mode_file
            .as_deref()
            .is_some_and(|f| std::fs::read_to_string(f).is_ok_and(|t| t.trim() == WRITE_THROUGH));
        ExportState {
            writeback: AtomicBool::new(!write_through),
            bad_requests: AtomicU64::new(0),
            disk_errors: AtomicU64::new(0),
            cache_mode_file,
        }
    }

    /// Sets the cache mode and records a change.
    fn set_writeback(&self, name: &str, writeback: bool) {
        if self.writeback.swap(writeback, Ordering::SeqCst) == writeback {
            return;
        }
        log::info!(
            "export {name}: guest set cache mode to {}",
            if writeback {
                "write-back"
            } else {
                WRITE_THROUGH
            }
        );
        let Some(f) = &self.cache_mode_file else {
            return;
        };
        let r = if writeback {
            std::fs::remove_file(f).or_else(|e| {
                if e.kind() == io::ErrorKind::NotFound {
                    Ok(())
                } else {
                    Err(e)
                }
            })
        } else {
            write_atomically(f, WRITE_THROUGH)
        };
        if let Err(e) = r {
            log::error!(
                "export {name}: cannot record the cache mode in {}: {e}",
                f.display()
            );
        }
    }
}

/// The cache-mode file's content for write-through.
const WRITE_THROUGH: &str = "write-through";

/// Writes `text` to `path` through a temporary file and a rename, then syncs the directory.
fn write_atomically(path: &std::path::Path, text: &str) -> io::Result<()> {
    use std::io::Write;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
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
    /// The inflight region of this connection (GET/SET_INFLIGHT_FD), if the frontend set one.
    inflight: Mutex<Option<Arc<InflightRegion>>>,
    /// Per queue: inflight bookkeeping (see `inflight.rs`).
    tracks: Vec<Mutex<QueueTrack>>,
}

/// One queue's inflight bookkeeping.
#[derive(Debug, Default)]
struct QueueTrack {
    /// Counter given to the next chain taken (orders resubmission).
    counter: u64,
    /// Chains to execute again, in order, before taking new ones.
    resubmit: Vec<u16>,
    /// The ring (re)started since the last recovery: check the region before taking chains.
    recover: bool,
}

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
            tracks: (0..opts.num_queues)
                .map(|_| Mutex::new(QueueTrack::default()))
                .collect(),
            inflight: Mutex::new(None),
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
        if !q.ready() {
            return Ok(0);
        }
        let mut mem = self.mem.memory().into_inner();
        let region = self.inflight_region();
        let track = self.tracks.get(queue);
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
                    self.recover_ring(q, &mem, iq, qidx, &mut t);
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
        // Record the chains just taken as in flight before executing any of them.
        if let (Some(iq), Some(track)) = (iq, track) {
            let mut t = track.lock().unwrap_or_else(|e| e.into_inner());
            for (head, _) in &chains[resubmit.len()..] {
                if let Err(e) = iq.set_inflight(*head, t.counter) {
                    self.log_inflight_failure(queue, &e);
                }
                t.counter = t.counter.wrapping_add(1);
            }
            // The resubmitted chains run in this batch, which completes every chain it holds.
            t.resubmit.clear();
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
        for (head, done) in self.execute_batch(&mem, chains, queue, writeback) {
            if let Some(e) = &done.error {
                self.log_failure(queue, e);
            }
            if let Some(iq) = iq {
                if let Err(e) = iq.pre_put(head) {
                    self.log_inflight_failure(queue, &e);
                }
            }
            let used = q.add_used(&*mem, head, done.used_len);
            if let (Ok(()), Some(iq)) = (&used, iq) {
                if let Err(e) = iq.post_put(head, q.next_used()) {
                    self.log_inflight_failure(queue, &e);
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
        let notify = q
            .needs_notification(&*mem)
            .map_err(|e| format!("cannot read used_event: {e}"))?;
        // After a restart, always signal once (see above).
        if notify || ring_started {
            guard
                .signal_used_queue()
                .map_err(|e| format!("cannot signal the call eventfd: {e}"))?;
        }
        Ok(count)
    }

    /// The current inflight region, if any.
    fn inflight_region(&self) -> Option<Arc<InflightRegion>> {
        self.inflight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Installs a new inflight region: every ring checks it when it next runs.
    fn install_region(&self, region: InflightRegion) {
        log::info!(
            "export {}: inflight region for {} queues of {}",
            self.opts.name,
            region.num_queues(),
            region.queue_size()
        );
        *self.inflight.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(region));
        for t in &self.tracks {
            let mut t = t.lock().unwrap_or_else(|e| e.into_inner());
            t.recover = true;
            t.resubmit.clear();
        }
    }

    fn log_inflight_failure(&self, queue: usize, e: &InflightError) {
        let n = self.state.bad_requests.fetch_add(1, Ordering::Relaxed) + 1;
        if n <= 16 || n.is_power_of_two() {
            log::error!("export {} queue {queue}: {e}", self.opts.name);
        }
    }

    /// First run of a ring since it (re)started with an inflight region: decide where the
    /// available ring resumes and which chains run again (libvhost-user's
    /// `vu_check_queue_inflights`, with every field of the region checked).
    fn recover_ring(
        &self,
        q: &mut virtio_queue::Queue,
        mem: &GuestMem,
        iq: super::inflight::InflightQueue<'_>,
        qidx: u16,
        t: &mut QueueTrack,
    ) {
        let name = &self.opts.name;
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
                    self.log_inflight_failure(usize::from(qidx), &e);
                }
                t.counter = 0;
                t.resubmit.clear();
            }
        }
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
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD
    }

    fn get_inflight_fd(&self, msg: &VhostUserInflight) -> io::Result<(VhostUserInflight, File)> {
        let (region, file, size) =
            InflightRegion::create(msg.num_queues, msg.queue_size, self.opts.num_queues).map_err(
                |e| {
                    log::error!("export {}: GET_INFLIGHT_FD: {e}", self.opts.name);
                    io::Error::other(e)
                },
            )?;
        self.install_region(region);
        Ok((
            VhostUserInflight::new(size, 0, msg.num_queues, msg.queue_size),
            file,
        ))
    }

    fn set_inflight_fd(&self, msg: &VhostUserInflight, file: File) -> io::Result<()> {
        let region = InflightRegion::map(
            &file,
            msg.mmap_size,
            msg.mmap_offset,
            msg.num_queues,
            msg.queue_size,
            self.opts.num_queues,
        )
        .map_err(|e| {
            log::error!("export {}: SET_INFLIGHT_FD: {e}", self.opts.name);
            io::Error::other(e)
        })?;
        self.install_region(region);
        Ok(())
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
                self.state.set_writeback(&self.opts.name, v != 0);
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

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        // Requests are executed synchronously while the worker holds the vring lock, and the
        // handler took that lock to mark the ring not ready before calling us: nothing of
        // this ring is in flight any more, so GET_VRING_BASE's answer is exact. When the ring
        // starts again (maybe as a new ring), check the inflight region again.
        if let Some(t) = usize::try_from(queue_index)
            .ok()
            .and_then(|i| self.tracks.get(i))
        {
            t.lock().unwrap_or_else(|e| e.into_inner()).recover = true;
        }
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
