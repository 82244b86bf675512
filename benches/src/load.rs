//! The load generator: a `blkio` virtio-blk-vhost-user client, one thread per queue, every
//! buffer in a region from `alloc_mem_region` + `map_mem_region`, every wait with a timeout.

use crate::error::{BenchError, Result};
use crate::servers::cpu_seconds;
use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};
use hdrhistogram::Histogram;
use serde::Serialize;
use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

/// Longest wait for one completion before the run is declared failed.
pub const IO_TIMEOUT: Duration = Duration::from_secs(60);

/// Access pattern.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Pattern {
    /// Uniform random reads.
    RandRead,
    /// Uniform random writes.
    RandWrite,
    /// Sequential reads (each queue its own slice of the range).
    Read,
    /// Sequential writes.
    Write,
    /// Random, 70 % reads and 30 % writes.
    Mixed,
}

impl Pattern {
    /// Short name.
    pub fn name(self) -> &'static str {
        match self {
            Pattern::RandRead => "randread",
            Pattern::RandWrite => "randwrite",
            Pattern::Read => "read",
            Pattern::Write => "write",
            Pattern::Mixed => "mixed70/30",
        }
    }
}

/// Hands out every chunk of a range once, in a scattered order: with it, each write of a run
/// lands on a chunk no earlier write of the run touched (after a snapshot: a first write).
pub struct Distinct {
    base: u64,
    stride: u64,
    n: u64,
    step: u64,
    cursor: AtomicU64,
    limit: u64,
}

impl Distinct {
    /// Chunks of `stride` bytes in `[base, base+len)`, at most `limit` of them handed out.
    pub fn new(base: u64, len: u64, stride: u64, limit: Option<u64>) -> Arc<Distinct> {
        let n = (len / stride).max(1);
        // An odd step near n·φ is coprime with a power of two; for other n, find a coprime one.
        let mut step = ((n as f64 * 0.618_034) as u64) | 1;
        while gcd(step, n) != 1 {
            step += 2;
        }
        Arc::new(Distinct {
            base,
            stride,
            n,
            step,
            cursor: AtomicU64::new(0),
            limit: limit.unwrap_or(n).min(n),
        })
    }

    /// The next chunk's offset; `None` once all are handed out.
    pub fn next(&self) -> Option<u64> {
        let i = self.cursor.fetch_add(1, Ordering::Relaxed);
        if i >= self.limit {
            return None;
        }
        let k = ((i as u128 * self.step as u128) % self.n as u128) as u64;
        Some(self.base + k * self.stride)
    }
}

/// Latency histograms (µs) of one run split into time windows: each completion goes to the
/// window set at the moment it completes (scenario 5: the guest's writes during snapshot
/// creates against the same load without them). Window 0 is not recorded.
pub struct Windows {
    phase: AtomicUsize,
    hists: Mutex<Vec<Histogram<u64>>>,
}

/// One histogram of [`Windows`]: 1 µs to 120 s, 3 significant digits.
fn window_hist() -> Result<Histogram<u64>> {
    Histogram::new_with_bounds(1, 120_000_000, 3)
        .map_err(|e| BenchError::Invalid(format!("latency histogram: {e:?}")))
}

impl Windows {
    /// Windows 1..=n, recording nothing until [`Windows::set`] picks one.
    pub fn new(n: usize) -> Result<Arc<Windows>> {
        Ok(Arc::new(Windows {
            phase: AtomicUsize::new(0),
            hists: Mutex::new((0..n).map(|_| window_hist()).collect::<Result<_>>()?),
        }))
    }

    /// From now on completions go to window `w` (0: none).
    pub fn set(&self, w: usize) {
        self.phase.store(w, Ordering::Relaxed);
    }

    /// Window `w`'s histogram (1-based), once the run is over.
    pub fn get(&self, w: usize) -> Option<Histogram<u64>> {
        let h = self.hists.lock().unwrap_or_else(|e| e.into_inner());
        h.get(w.checked_sub(1)?).cloned()
    }

    fn len(&self) -> usize {
        self.hists.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    fn merge(&self, local: &[Histogram<u64>]) -> Result<()> {
        let mut h = self.hists.lock().unwrap_or_else(|e| e.into_inner());
        for (g, l) in h.iter_mut().zip(local) {
            g.add(l)
                .map_err(|e| BenchError::Invalid(format!("merging histograms: {e:?}")))?;
        }
        Ok(())
    }
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// One run's parameters.
#[derive(Clone)]
pub struct LoadSpec {
    /// Access pattern.
    pub pattern: Pattern,
    /// Request size in bytes (a multiple of 512).
    pub bs: usize,
    /// Requests in flight per queue.
    pub qd: usize,
    /// Queues (one thread each).
    pub queues: usize,
    /// How long to run; `None`: until `stop` is set (or the distinct chunks run out).
    pub duration: Option<Duration>,
    /// Byte range `(offset, length)` of the device to use.
    pub range: (u64, u64),
    /// Every write on an untouched chunk (writes only).
    pub distinct: Option<Arc<Distinct>>,
    /// Stop after this many requests in all.
    pub max_ops: Option<u64>,
    /// Per-window latency histograms, besides the whole run's percentiles.
    pub windows: Option<Arc<Windows>>,
}

impl LoadSpec {
    /// A timed run over `range`.
    pub fn new(
        pattern: Pattern,
        bs: usize,
        qd: usize,
        queues: usize,
        duration: Duration,
        range: (u64, u64),
    ) -> Self {
        LoadSpec {
            pattern,
            bs,
            qd,
            queues,
            duration: Some(duration),
            range,
            distinct: None,
            max_ops: None,
            windows: None,
        }
    }

    /// Label like `4k randwrite QD32 ×1q`.
    pub fn label(&self) -> String {
        let bs = if self.bs >= 1 << 20 {
            format!("{}M", self.bs >> 20)
        } else {
            format!("{}k", self.bs >> 10)
        };
        format!(
            "{bs} {} QD{} {}q",
            self.pattern.name(),
            self.qd,
            self.queues
        )
    }
}

/// What one run measured.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct LoadResult {
    /// Requests completed.
    pub ops: u64,
    /// Seconds from the first submission to the last completion.
    pub secs: f64,
    /// Requests per second.
    pub iops: f64,
    /// Megabytes (10^6) per second.
    pub mbps: f64,
    /// Mean latency, µs.
    pub lat_mean_us: f64,
    /// Median latency, µs.
    pub lat_p50_us: f64,
    /// 99th percentile, µs.
    pub lat_p99_us: f64,
    /// 99.9th percentile, µs.
    pub lat_p999_us: f64,
    /// Server CPU time (user + system) per request, µs.
    pub cpu_us_per_io: Option<f64>,
    /// Server CPU use over the run, % of one core.
    pub cpu_pct: Option<f64>,
}

/// A connected, started client with one mapped data region.
pub struct Conn {
    blkio: Blkio,
    queues: Vec<Blkioq>,
    region: MemoryRegion,
    sock: PathBuf,
    /// Device capacity in bytes.
    pub capacity: u64,
}

fn berr(what: &str, sock: &Path, e: blkio::Error) -> BenchError {
    BenchError::Blkio {
        what: what.into(),
        sock: sock.to_path_buf(),
        message: e.message().to_string(),
        errno: e.errno().raw_os_error(),
    }
}

impl Conn {
    /// Connects to `sock` with `queues` queues and a data region of at least `region_len`.
    pub fn connect(sock: &Path, queues: usize, region_len: usize) -> Result<Conn> {
        let mut b = Blkio::new("virtio-blk-vhost-user").map_err(|e| berr("new", sock, e))?;
        let path = sock.to_str().ok_or_else(|| {
            BenchError::Invalid(format!("socket path {} is not UTF-8", sock.display()))
        })?;
        b.set_str("path", path)
            .map_err(|e| berr("set path", sock, e))?;
        b.connect().map_err(|e| berr("connect", sock, e))?;
        let nq =
            i32::try_from(queues).map_err(|_| BenchError::Invalid(format!("{queues} queues")))?;
        b.set_i32("num-queues", nq)
            .map_err(|e| berr("set num-queues", sock, e))?;
        b.set_i32("queue-size", 256)
            .map_err(|e| berr("set queue-size", sock, e))?;
        let capacity = b
            .get_u64("capacity")
            .map_err(|e| berr("get capacity", sock, e))?;
        let started = b.start().map_err(|e| berr("start", sock, e))?;
        let align = b
            .get_u64("mem-region-alignment")
            .map_err(|e| berr("get mem-region-alignment", sock, e))?
            .max(4096) as usize;
        let len = region_len.max(align).div_ceil(align) * align;
        let region = b
            .alloc_mem_region(len)
            .map_err(|e| berr("alloc_mem_region", sock, e))?;
        b.map_mem_region(&region)
            .map_err(|e| berr("map_mem_region", sock, e))?;
        // SAFETY: the region is a fresh, live mapping of `len` bytes owned by `b`; no request
        // is in flight yet, so nothing else accesses it.
        let mem = unsafe { std::slice::from_raw_parts_mut(region.addr as *mut u8, region.len) };
        for (i, b) in mem.iter_mut().enumerate() {
            *b = (i as u8) ^ 0x5a;
        }
        Ok(Conn {
            blkio: b,
            queues: started.queues,
            region,
            sock: sock.to_path_buf(),
            capacity,
        })
    }

    /// Runs `spec`, measuring the CPU time of process `server_pid`.
    pub fn run(
        &mut self,
        spec: &LoadSpec,
        server_pid: u32,
        stop: Option<&AtomicBool>,
    ) -> Result<LoadResult> {
        let nq = spec.queues;
        if nq == 0 || nq > self.queues.len() {
            return Err(BenchError::Invalid(format!(
                "{} queues asked, {} started on {}",
                nq,
                self.queues.len(),
                self.sock.display()
            )));
        }
        let per_q = spec.qd * spec.bs;
        if per_q * nq > self.region.len || spec.bs % 512 != 0 || spec.bs == 0 || spec.qd == 0 {
            return Err(BenchError::Invalid(format!(
                "{}: {nq}×QD{}×{} bytes does not fit the {}-byte region or is not 512-aligned",
                self.sock.display(),
                spec.qd,
                spec.bs,
                self.region.len
            )));
        }
        let (roff, rlen) = spec.range;
        if rlen < (spec.bs * nq) as u64
            || roff % 512 != 0
            || roff.checked_add(rlen).is_none_or(|end| end > self.capacity)
        {
            return Err(BenchError::Invalid(format!(
                "range {roff}+{rlen} does not fit {} ({} bytes)",
                self.sock.display(),
                self.capacity
            )));
        }
        let barrier = Barrier::new(nq + 1);
        let issued = AtomicU64::new(0);
        let never = AtomicBool::new(false);
        let stop = stop.unwrap_or(&never);
        let sock = self.sock.clone();
        let base = self.region.addr;
        let (cpu0, t0, results) = std::thread::scope(|s| {
            let mut handles = Vec::new();
            for (qi, q) in self.queues.iter_mut().take(nq).enumerate() {
                let (barrier, issued, sock) = (&barrier, &issued, &sock);
                let buf0 = base + qi * per_q;
                handles.push(s.spawn(move || {
                    queue_thread(q, qi, nq, buf0, spec, barrier, issued, stop, sock)
                }));
            }
            barrier.wait();
            let cpu0 = cpu_seconds(server_pid);
            let t0 = Instant::now();
            let results: Vec<_> = handles
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(BenchError::Invalid("a load thread panicked".into()))
                    })
                })
                .collect();
            (cpu0, t0, results)
        });
        let cpu1 = cpu_seconds(server_pid);
        let wall = t0.elapsed().as_secs_f64();
        let mut lats: Vec<u32> = Vec::new();
        let mut ops = 0u64;
        let mut secs: f64 = 0.0;
        for r in results {
            let (l, s) = r?;
            ops += l.len() as u64;
            secs = secs.max(s);
            lats.extend(l);
        }
        if ops == 0 {
            return Err(BenchError::Request {
                sock: self.sock.clone(),
                what: format!("{}: no request completed", spec.label()),
            });
        }
        lats.sort_unstable();
        let pct =
            |p: f64| lats[((lats.len() as f64 * p) as usize).min(lats.len() - 1)] as f64 / 1000.0;
        let mean = lats.iter().map(|&x| x as f64).sum::<f64>() / lats.len() as f64 / 1000.0;
        let secs = secs.max(1e-9);
        let cpu = match (cpu0, cpu1) {
            (Some(a), Some(b)) => Some(b - a),
            _ => None,
        };
        Ok(LoadResult {
            ops,
            secs,
            iops: ops as f64 / secs,
            mbps: ops as f64 * spec.bs as f64 / secs / 1e6,
            lat_mean_us: mean,
            lat_p50_us: pct(0.50),
            lat_p99_us: pct(0.99),
            lat_p999_us: pct(0.999),
            cpu_us_per_io: cpu.map(|c| c * 1e6 / ops as f64),
            cpu_pct: cpu.map(|c| c * 100.0 / wall.max(1e-9)),
        })
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.blkio.unmap_mem_region(&self.region);
        self.blkio.free_mem_region(&self.region);
    }
}

/// Where the next request of a queue goes; `None` when the run must stop issuing.
struct Next {
    rng: fastrand::Rng,
    seq: u64,
    lo: u64,
    hi: u64,
}

impl Next {
    fn pick(&mut self, spec: &LoadSpec) -> Option<(bool, u64)> {
        let bs = spec.bs as u64;
        let write = match spec.pattern {
            Pattern::RandRead | Pattern::Read => false,
            Pattern::RandWrite | Pattern::Write => true,
            Pattern::Mixed => self.rng.u32(0..10) < 3,
        };
        if write {
            if let Some(d) = &spec.distinct {
                return d.next().map(|o| (true, o));
            }
        }
        let off = match spec.pattern {
            Pattern::Read | Pattern::Write => {
                if self.seq + bs > self.hi {
                    self.seq = self.lo;
                }
                let o = self.seq;
                self.seq += bs;
                o
            }
            _ => {
                let slots = (self.hi - self.lo) / bs;
                self.lo + self.rng.u64(0..slots.max(1)) * bs
            }
        };
        Some((write, off))
    }
}

/// One queue's loop; returns the latencies (ns) and the seconds it ran.
#[allow(clippy::too_many_arguments)]
fn queue_thread(
    q: &mut Blkioq,
    qi: usize,
    nq: usize,
    buf0: usize,
    spec: &LoadSpec,
    barrier: &Barrier,
    issued: &AtomicU64,
    stop: &AtomicBool,
    sock: &Path,
) -> Result<(Vec<u32>, f64)> {
    let (roff, rlen) = spec.range;
    let bs = spec.bs as u64;
    // Sequential patterns: each queue walks its own slice of the range.
    let (lo, hi) = match spec.pattern {
        Pattern::Read | Pattern::Write => {
            let slice = (rlen / nq as u64) / bs * bs;
            let lo = roff + qi as u64 * slice.max(bs);
            (lo, (lo + slice.max(bs)).min(roff + rlen))
        }
        _ => (roff, roff + rlen / bs * bs),
    };
    let mut next = Next {
        rng: fastrand::Rng::with_seed(0x5eed ^ (qi as u64) << 32 ^ fastrand::u64(..)),
        seq: lo,
        lo,
        hi,
    };
    let mut started = vec![Instant::now(); spec.qd];
    let mut lats: Vec<u32> = Vec::with_capacity(1 << 16);
    // Per-thread histograms, merged at the end: no lock on the completion path.
    let mut win: Vec<Histogram<u64>> = match &spec.windows {
        Some(w) => (0..w.len()).map(|_| window_hist()).collect::<Result<_>>()?,
        None => Vec::new(),
    };
    let mut comps: Vec<MaybeUninit<Completion>> =
        (0..spec.qd).map(|_| MaybeUninit::uninit()).collect();
    let may_issue = |issued: &AtomicU64| match spec.max_ops {
        Some(m) => issued.fetch_add(1, Ordering::Relaxed) < m,
        None => true,
    };
    let submit = |q: &mut Blkioq, slot: usize, next: &mut Next, started: &mut [Instant]| -> bool {
        if !may_issue(issued) {
            return false;
        }
        let Some((write, off)) = next.pick(spec) else {
            return false;
        };
        let buf = (buf0 + slot * spec.bs) as *mut u8;
        started[slot] = Instant::now();
        if write {
            q.write(off, buf, spec.bs, slot, ReqFlags::empty());
        } else {
            q.read(off, buf, spec.bs, slot, ReqFlags::empty());
        }
        true
    };
    barrier.wait();
    let t0 = Instant::now();
    let deadline = spec.duration.map(|d| t0 + d);
    let mut inflight = 0usize;
    for slot in 0..spec.qd {
        if submit(q, slot, &mut next, &mut started) {
            inflight += 1;
        }
    }
    let mut last = t0;
    while inflight > 0 {
        let mut timeout = IO_TIMEOUT;
        let got = q
            .do_io(&mut comps, 1, Some(&mut timeout), None)
            .map_err(|e| BenchError::Request {
                sock: sock.to_path_buf(),
                what: format!(
                    "{}: do_io failed with {inflight} in flight: {} (errno {})",
                    spec.label(),
                    e.message(),
                    e.errno().raw_os_error()
                ),
            })?;
        if got == 0 {
            return Err(BenchError::Request {
                sock: sock.to_path_buf(),
                what: format!(
                    "{}: no completion within {IO_TIMEOUT:?} ({inflight} in flight)",
                    spec.label()
                ),
            });
        }
        let now = Instant::now();
        last = now;
        let go_on = deadline.is_none_or(|d| now < d) && !stop.load(Ordering::Relaxed);
        for c in &comps[..got] {
            // SAFETY: do_io initialised the first `got` completions.
            let c = unsafe { c.assume_init_ref() };
            if c.ret != 0 {
                return Err(BenchError::Request {
                    sock: sock.to_path_buf(),
                    what: format!("{}: a request failed with errno {}", spec.label(), -c.ret),
                });
            }
            let slot = c.user_data;
            if slot >= spec.qd {
                return Err(BenchError::Request {
                    sock: sock.to_path_buf(),
                    what: format!("{}: completion for unknown slot {slot}", spec.label()),
                });
            }
            let ns = now.duration_since(started[slot]).as_nanos();
            lats.push(ns.min(u32::MAX as u128) as u32);
            if let Some(w) = &spec.windows {
                if let Some(h) = w.phase.load(Ordering::Relaxed).checked_sub(1) {
                    if let Some(h) = win.get_mut(h) {
                        h.saturating_record((ns / 1000).max(1) as u64);
                    }
                }
            }
            inflight -= 1;
            if go_on && submit(q, slot, &mut next, &mut started) {
                inflight += 1;
            }
        }
    }
    if let Some(w) = &spec.windows {
        w.merge(&win)?;
    }
    Ok((lats, last.duration_since(t0).as_secs_f64()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distinct_hands_out_every_chunk_once() {
        for n in [1u64, 2, 3, 7, 64, 1000, 4096, 12345] {
            let d = Distinct::new(1 << 20, n * 4096, 4096, None);
            let mut seen = std::collections::HashSet::new();
            while let Some(off) = d.next() {
                assert_eq!(off % 4096, 0);
                assert!(
                    off >= 1 << 20 && off < (1 << 20) + n * 4096,
                    "{off} out of range"
                );
                assert!(seen.insert(off), "chunk {off} handed out twice (n={n})");
            }
            assert_eq!(seen.len() as u64, n);
        }
    }

    #[test]
    fn distinct_respects_its_limit() {
        let d = Distinct::new(0, 100 * 65536, 65536, Some(10));
        assert_eq!(std::iter::from_fn(|| d.next()).count(), 10);
        assert!(d.next().is_none());
    }
}
