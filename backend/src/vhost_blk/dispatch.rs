//! Where the requests of one batch run. Reads the disk maps to O_DIRECT files go to the
//! queue's io_uring (`uring.rs`) and complete later. Other fast requests (page cache) run one
//! after the other on the queue's thread; when requests have been slow lately (waiting for the
//! journal or the device), they run in parallel on the I/O pool, a FLUSH waiting for every
//! request before it in the batch and running before those after it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::disk::BlockDisk;
use super::pool::{Batch, IoPool};
use super::request::{handle_parsed, Completion, GuestMem, ParsedChain, RequestContext};
use super::uring::UringQueue;

/// `SNAPMV_IO_URING=0` turns the io_uring read path off (every read synchronous), to compare
/// the two paths.
fn uring_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("SNAPMV_IO_URING").map_or(true, |v| v != "0"))
}

/// Most I/O threads of one connection (started only when requests are slow).
pub const IO_THREADS: usize = 16;
/// Requests slower than this on average are run in parallel on the I/O pool.
const PARALLEL_THRESHOLD: Duration = Duration::from_micros(30);

/// One executed chain: its head, its outcome and when its execution ended.
pub(crate) struct Done {
    pub(crate) head: u16,
    pub(crate) completion: Completion,
    pub(crate) finished: Instant,
}

/// Runs the batches of one connection's queues against the disk.
pub(crate) struct Dispatcher {
    disk: Arc<dyn BlockDisk>,
    size: u64,
    readonly: bool,
    id: Arc<[u8]>,
    /// Per queue: moving average of the time one request takes (ns); decides whether a batch
    /// runs on the queue thread or on the I/O pool.
    service_ns: Vec<AtomicU64>,
    pool: IoPool,
    /// Per queue: its io_uring, made on first use (only that queue's thread takes it).
    rings: Vec<Mutex<Option<UringQueue>>>,
    /// io_uring could not be set up here: reads are synchronous.
    uring_off: AtomicBool,
}

impl Dispatcher {
    /// A dispatcher for `num_queues` queues of an export called `name`, answering GET_ID
    /// with `id`.
    pub(crate) fn new(
        name: &str,
        disk: Arc<dyn BlockDisk>,
        readonly: bool,
        id: Arc<[u8]>,
        num_queues: u16,
    ) -> Dispatcher {
        Dispatcher {
            size: disk.size(),
            disk,
            readonly,
            id,
            service_ns: (0..num_queues).map(|_| AtomicU64::new(0)).collect(),
            pool: IoPool::new(name, IO_THREADS),
            rings: (0..num_queues).map(|_| Mutex::new(None)).collect(),
            uring_off: AtomicBool::new(!uring_enabled()),
        }
    }

    /// Queue `queue`'s io_uring (made now if needed), held for one batch; `None`: reads of
    /// this queue are synchronous.
    pub(crate) fn ring(&self, queue: usize) -> Option<MutexGuard<'_, Option<UringQueue>>> {
        if self.uring_off.load(Ordering::Relaxed) {
            return None;
        }
        let mut g = self
            .rings
            .get(queue)?
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if g.is_none() {
            match UringQueue::new() {
                Ok(r) => *g = Some(r),
                Err(e) => {
                    if !self.uring_off.swap(true, Ordering::Relaxed) {
                        log::warn!("io_uring unavailable ({e}): reads are synchronous");
                    }
                    return None;
                }
            }
        }
        Some(g)
    }

    /// Starts the reads of `chains` that can go through `ring`, runs the others (see
    /// [`Dispatcher::execute_batch`]); returns what completed, with when each was taken.
    pub(crate) fn start_batch(
        &self,
        ring: Option<&mut UringQueue>,
        mem: &Arc<GuestMem>,
        chains: Vec<(u16, ParsedChain)>,
        queue: usize,
        writeback: bool,
        taken: Instant,
    ) -> Vec<(Done, Instant)> {
        let mut out = Vec::new();
        let rest = match ring {
            None => chains,
            Some(ring) => {
                let ctx = self.context(writeback);
                let mut rest = Vec::new();
                for (head, chain) in chains {
                    if let Err(chain) = ring.try_start(mem, head, chain, &ctx, taken, &mut out) {
                        rest.push((head, chain));
                    }
                }
                rest
            }
        };
        if !rest.is_empty() {
            let done = self.execute_batch(mem, rest, queue, writeback);
            out.extend(done.into_iter().map(|d| (d, taken)));
        }
        out
    }

    /// Collects the reads of `ring` that completed (`wait`: at least one, if any is in
    /// flight).
    pub(crate) fn reap(
        &self,
        ring: &mut UringQueue,
        wait: bool,
        writeback: bool,
        out: &mut Vec<(Done, Instant)>,
    ) {
        ring.reap(wait, &self.context(writeback), out);
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

    fn context(&self, writeback: bool) -> RequestContext<'_> {
        RequestContext {
            disk: &*self.disk,
            size: self.size,
            readonly: self.readonly,
            writeback,
            id: &self.id,
        }
    }

    /// Runs one chain on this thread.
    fn run_here(
        &self,
        mem: &GuestMem,
        head: u16,
        chain: ParsedChain,
        queue: usize,
        ctx: &RequestContext<'_>,
        out: &mut Vec<Done>,
    ) {
        let t = Instant::now();
        let completion = handle_parsed(mem, chain, ctx);
        let finished = Instant::now();
        self.record_service_time(queue, finished - t);
        out.push(Done {
            head,
            completion,
            finished,
        });
    }

    /// Runs `chains` on the I/O pool (and this thread) at once; results in chain order.
    fn run_parallel(
        &self,
        mem: &Arc<GuestMem>,
        chains: Vec<(u16, ParsedChain)>,
        queue: usize,
        writeback: bool,
        out: &mut Vec<Done>,
    ) {
        if chains.len() <= 1 {
            let ctx = self.context(writeback);
            for (head, chain) in chains {
                self.run_here(mem, head, chain, queue, &ctx, out);
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
                let (size, readonly) = (self.size, self.readonly);
                Box::new(move || {
                    let t = Instant::now();
                    let ctx = RequestContext {
                        disk: &*disk,
                        size,
                        readonly,
                        writeback,
                        id: &id,
                    };
                    let completion = handle_parsed(&mem, chain, &ctx);
                    let finished = Instant::now();
                    batch.finish(
                        i,
                        (
                            Done {
                                head,
                                completion,
                                finished,
                            },
                            finished - t,
                        ),
                    );
                }) as Box<dyn FnOnce() + Send>
            })
            .collect();
        self.pool.submit(jobs);
        // Every job calls `finish` exactly once (request handling catches panics), so every
        // slot is filled.
        for (done, took) in batch.wait(&self.pool).into_iter().flatten() {
            self.record_service_time(queue, took);
            out.push(done);
        }
    }

    /// Executes the chains of one batch, in order or in parallel (see the module's comment);
    /// results in chain order.
    pub(crate) fn execute_batch(
        &self,
        mem: &Arc<GuestMem>,
        chains: Vec<(u16, ParsedChain)>,
        queue: usize,
        writeback: bool,
    ) -> Vec<Done> {
        let mut out = Vec::with_capacity(chains.len());
        if chains.len() == 1 || !self.is_slow(queue) {
            let ctx = self.context(writeback);
            for (head, chain) in chains {
                self.run_here(mem, head, chain, queue, &ctx, &mut out);
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
}
