//! Where the requests of one batch run. Fast requests (page cache) run one after the other on
//! the queue's thread; when requests have been slow lately (waiting for the journal or the
//! device), they run in parallel on the I/O pool, a FLUSH waiting for every request before it
//! in the batch and running before those after it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::disk::BlockDisk;
use super::pool::{Batch, IoPool};
use super::request::{handle_parsed, Completion, GuestMem, ParsedChain, RequestContext};

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
