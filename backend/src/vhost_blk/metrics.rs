//! Per-export statistics: requests and bytes per kind, failed requests, requests in flight and
//! a latency histogram per kind, counted since the export started (across reconnects).
//!
//! Like firecracker's `BlockDeviceMetrics`, the counters are plain atomics bumped on the
//! request path and read by a snapshot ([`ExportMetrics::snapshot`] → [`ExportStats`]: the
//! `stats` RPC's per-export counters, the RPC crate's type, so there is one definition). Why no metrics crate here: `hdrhistogram` records through
//! `&mut self` (a lock or a per-thread histogram plus merging), and the `metrics` /
//! `prometheus-client` histograms search a bucket list and update an `f64` sum with a
//! compare-and-swap loop on every observation. This needs neither: a fixed log-linear bucket
//! index is two shifts, and each queue thread writes to its own cache-line-aligned shard, so a
//! request costs a handful of uncontended relaxed `fetch_add`s and no allocation. The snapshot
//! sums the shards; the Prometheus exposition can be built from [`LatencyStats::buckets`].
//!
//! Latency is measured from when the device took the request off the available ring (the
//! start of its batch) to the end of its execution, so it includes the time spent behind
//! earlier requests of the same batch; it does not include the guest's own queueing.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::request::RequestKind;
pub use snapmv_rpc::methods::{ExportCounters as ExportStats, KindLatencies, LatencyStats};

/// Shards of the counters; queue `q` writes to shard `q % SHARDS`.
const SHARDS: usize = 8;
/// Sub-buckets per power of two of the latency (2^SUB_BITS): bucket bounds are within 1/8 of
/// each other, so a percentile is known to ±6 %.
const SUB_BITS: u32 = 3;
const SUBS: usize = 1 << SUB_BITS;
/// Latencies are recorded in nanoseconds up to 2^36 ns (about 69 s); longer ones count in
/// the last bucket.
const MAX_EXP: u32 = 36;
/// Number of latency buckets: exact values below `SUBS`, then `SUBS` per power of two.
const BUCKETS: usize = (MAX_EXP as usize - SUB_BITS as usize + 1) * SUBS;

/// The request kinds that are counted (GET_ID is not: it moves no data).
const KINDS: usize = 5;

fn kind_index(kind: RequestKind) -> Option<usize> {
    match kind {
        RequestKind::Read => Some(0),
        RequestKind::Write => Some(1),
        RequestKind::Flush => Some(2),
        RequestKind::Discard => Some(3),
        RequestKind::WriteZeroes => Some(4),
        RequestKind::GetId => None,
    }
}

/// The bucket of a latency of `ns` nanoseconds.
fn bucket_of(ns: u64) -> usize {
    let ns = ns.min((1 << MAX_EXP) - 1);
    if ns < SUBS as u64 {
        return ns as usize;
    }
    let exp = 63 - ns.leading_zeros(); // >= SUB_BITS
    let sub = (ns >> (exp - SUB_BITS)) as usize & (SUBS - 1);
    (exp - SUB_BITS + 1) as usize * SUBS + sub
}

/// The range of latencies (ns) bucket `i` counts: `[low, high)`.
fn bucket_bounds(i: usize) -> (u64, u64) {
    if i < SUBS {
        return (i as u64, i as u64 + 1);
    }
    let exp = (i / SUBS) as u32 + SUB_BITS - 1;
    let sub = (i % SUBS) as u64;
    let width = 1u64 << (exp - SUB_BITS);
    let low = (1u64 << exp) + sub * width;
    (low, low + width)
}

/// Counters of one request kind.
#[derive(Debug)]
struct KindCounters {
    ops: AtomicU64,
    bytes: AtomicU64,
    latency_sum_ns: AtomicU64,
    latency: [AtomicU64; BUCKETS],
}

impl KindCounters {
    fn new() -> KindCounters {
        KindCounters {
            ops: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            latency_sum_ns: AtomicU64::new(0),
            latency: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

/// The counters one queue thread writes (aligned so that two shards never share a cache line).
#[derive(Debug)]
#[repr(align(128))]
struct Shard {
    kinds: [KindCounters; KINDS],
    errors: AtomicU64,
    /// Taken minus completed; never below zero within one shard (one queue takes and
    /// completes its own requests).
    in_flight: AtomicU64,
}

impl Shard {
    fn new() -> Shard {
        Shard {
            kinds: std::array::from_fn(|_| KindCounters::new()),
            errors: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
        }
    }
}

/// The live counters of one export. Updated with relaxed atomics: a snapshot taken while
/// requests run may be a few requests behind, but each counter is exact once they stop.
#[derive(Debug)]
pub struct ExportMetrics {
    shards: Box<[Shard]>,
    /// False only under the benchmark knob `SNAPMV_BENCH_NO_STATS=1`, which exists to measure
    /// what counting costs (`snapmv-bench` run with and without it); never set it otherwise.
    enabled: bool,
}

impl Default for ExportMetrics {
    fn default() -> Self {
        ExportMetrics::new()
    }
}

impl ExportMetrics {
    /// Counters at zero.
    pub fn new() -> ExportMetrics {
        ExportMetrics {
            shards: (0..SHARDS).map(|_| Shard::new()).collect(),
            enabled: std::env::var_os("SNAPMV_BENCH_NO_STATS").is_none_or(|v| v != "1"),
        }
    }

    fn shard(&self, queue: usize) -> &Shard {
        &self.shards[queue % SHARDS]
    }

    /// `n` requests were taken off queue `queue`'s available ring.
    pub fn requests_taken(&self, queue: usize, n: usize) {
        if !self.enabled {
            return;
        }
        self.shard(queue)
            .in_flight
            .fetch_add(n as u64, Ordering::Relaxed);
    }

    /// A request of queue `queue` succeeded (and is about to go on the used ring): `bytes`
    /// of the disk read, written, discarded or zeroed, `latency` after it was taken.
    pub fn request_done(
        &self,
        queue: usize,
        kind: Option<RequestKind>,
        bytes: u64,
        latency: Duration,
    ) {
        if !self.enabled {
            return;
        }
        let shard = self.shard(queue);
        shard.in_flight.fetch_sub(1, Ordering::Relaxed);
        let Some(k) = kind.and_then(kind_index) else {
            return;
        };
        let c = &shard.kinds[k];
        let ns = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
        c.ops.fetch_add(1, Ordering::Relaxed);
        if bytes != 0 {
            c.bytes.fetch_add(bytes, Ordering::Relaxed);
        }
        c.latency_sum_ns.fetch_add(ns, Ordering::Relaxed);
        c.latency[bucket_of(ns)].fetch_add(1, Ordering::Relaxed);
    }

    /// A request of queue `queue` failed (refused or failed by the disk; any kind) and is
    /// about to go on the used ring.
    pub fn request_failed(&self, queue: usize) {
        if !self.enabled {
            return;
        }
        let shard = self.shard(queue);
        shard.in_flight.fetch_sub(1, Ordering::Relaxed);
        shard.errors.fetch_add(1, Ordering::Relaxed);
    }

    /// The counters as they are now, summed over the queues.
    pub fn snapshot(&self) -> ExportStats {
        let mut ops = [0u64; KINDS];
        let mut bytes = [0u64; KINDS];
        let mut sums = [0u64; KINDS];
        let mut hist = vec![[0u64; BUCKETS]; KINDS];
        let mut errors = 0u64;
        let mut in_flight = 0u64;
        for s in self.shards.iter() {
            for (k, c) in s.kinds.iter().enumerate() {
                ops[k] += c.ops.load(Ordering::Relaxed);
                bytes[k] += c.bytes.load(Ordering::Relaxed);
                sums[k] = sums[k].wrapping_add(c.latency_sum_ns.load(Ordering::Relaxed));
                for (h, b) in hist[k].iter_mut().zip(c.latency.iter()) {
                    *h += b.load(Ordering::Relaxed);
                }
            }
            errors += s.errors.load(Ordering::Relaxed);
            // A shard read between its queue's completion and our read of an earlier shard
            // can look negative for an instant; count it as zero.
            let f = s.in_flight.load(Ordering::Relaxed);
            in_flight += if f > u64::MAX / 2 { 0 } else { f };
        }
        let lat = |k: usize| latency_from_buckets(&hist[k], sums[k]);
        ExportStats {
            reads: ops[0],
            writes: ops[1],
            flushes: ops[2],
            discards: ops[3],
            write_zeroes: ops[4],
            read_bytes: bytes[0],
            write_bytes: bytes[1],
            discard_bytes: bytes[3],
            write_zeroes_bytes: bytes[4],
            errors,
            in_flight,
            latency_us: KindLatencies {
                read: lat(0),
                write: lat(1),
                flush: lat(2),
                discard: lat(3),
                write_zeroes: lat(4),
            },
        }
    }
}

/// The latency distribution of one kind from its histogram and the sum of its latencies.
fn latency_from_buckets(hist: &[u64], sum_ns: u64) -> LatencyStats {
    let count: u64 = hist.iter().sum();
    if count == 0 {
        return LatencyStats::default();
    }
    let us = |ns: f64| ns / 1000.0;
    let pct = |p: f64| {
        // The rank of the p-th percentile, 1-based (nearest rank).
        let rank = ((p * count as f64).ceil() as u64).clamp(1, count);
        let mut seen = 0;
        for (i, &n) in hist.iter().enumerate() {
            seen += n;
            if seen >= rank {
                let (lo, hi) = bucket_bounds(i);
                return us((lo as f64 + (hi - 1) as f64) / 2.0);
            }
        }
        0.0
    };
    LatencyStats {
        count,
        mean: us(sum_ns as f64 / count as f64),
        p50: pct(0.50),
        p99: pct(0.99),
        p99_9: pct(0.999),
        buckets: hist
            .iter()
            .enumerate()
            .filter(|&(_, &n)| n > 0)
            .map(|(i, &n)| (us(bucket_bounds(i).1 as f64), n))
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_cover_every_latency_in_order() {
        let mut prev_high = 0;
        for i in 0..BUCKETS {
            let (lo, hi) = bucket_bounds(i);
            assert_eq!(
                lo,
                prev_high,
                "bucket {i} does not start where {} ended",
                i - 1
            );
            assert!(hi > lo);
            assert_eq!(bucket_of(lo), i, "low bound of bucket {i}");
            assert_eq!(bucket_of(hi - 1), i, "high bound of bucket {i}");
            prev_high = hi;
        }
        assert_eq!(prev_high, 1 << MAX_EXP);
        assert_eq!(bucket_of(u64::MAX), BUCKETS - 1);
        // Width within 1/8 of the value past the exact range.
        for i in SUBS..BUCKETS {
            let (lo, hi) = bucket_bounds(i);
            assert!((hi - lo) * 8 <= lo, "bucket {i}: [{lo}, {hi})");
        }
    }

    #[test]
    fn counts_add_up_per_kind_and_across_queues() {
        let m = ExportMetrics::new();
        let us = Duration::from_micros;
        for q in 0..10 {
            m.requests_taken(q, 3);
            m.request_done(q, Some(RequestKind::Read), 4096, us(10));
            m.request_done(q, Some(RequestKind::Write), 512, us(20));
            m.request_failed(q);
        }
        m.requests_taken(1, 2);
        m.requests_taken(2, 1);
        m.requests_taken(3, 3);
        m.request_done(1, Some(RequestKind::Flush), 0, us(100));
        m.request_done(2, Some(RequestKind::Discard), 1 << 20, us(5));
        m.request_done(3, Some(RequestKind::WriteZeroes), 8192, us(6));
        m.request_done(3, Some(RequestKind::GetId), 20, us(1));
        let s = m.snapshot();
        assert_eq!(
            (s.reads, s.writes, s.flushes, s.discards, s.write_zeroes),
            (10, 10, 1, 1, 1)
        );
        assert_eq!(
            (
                s.read_bytes,
                s.write_bytes,
                s.discard_bytes,
                s.write_zeroes_bytes
            ),
            (40960, 5120, 1 << 20, 8192)
        );
        assert_eq!(s.errors, 10);
        assert_eq!(s.in_flight, 2);
        assert_eq!(s.latency_us.read.count, 10);
        assert_eq!(s.latency_us.flush.count, 1);
        assert!((s.latency_us.read.mean - 10.0).abs() < 1e-9);
        assert!((s.latency_us.write.mean - 20.0).abs() < 1e-9);
    }

    #[test]
    fn percentiles_are_within_the_bucket_resolution() {
        let m = ExportMetrics::new();
        // 1..=10_000 µs, once each: p50 = 5000 µs, p99 = 9900 µs, p99.9 = 9990 µs.
        for i in 1..=10_000u64 {
            m.requests_taken((i % 3) as usize, 1);
            m.request_done(
                (i % 3) as usize,
                Some(RequestKind::Read),
                0,
                Duration::from_micros(i),
            );
        }
        let r = m.snapshot().latency_us.read;
        assert_eq!(r.count, 10_000);
        for (got, want) in [(r.p50, 5000.0), (r.p99, 9900.0), (r.p99_9, 9990.0)] {
            assert!(
                (got - want).abs() <= want / 16.0,
                "percentile {got} µs, expected {want} µs ± 6 %"
            );
        }
        assert!((r.mean - 5000.5).abs() < 1e-6);
        assert_eq!(r.buckets.iter().map(|b| b.1).sum::<u64>(), 10_000);
        assert!(r.buckets.windows(2).all(|w| w[0].0 < w[1].0));
    }

    #[test]
    fn an_empty_export_serializes_the_contract_fields() {
        let v = serde_json::to_value(ExportMetrics::new().snapshot()).unwrap();
        for key in [
            "reads",
            "writes",
            "flushes",
            "discards",
            "write_zeroes",
            "read_bytes",
            "write_bytes",
            "errors",
            "in_flight",
            "latency_us",
        ] {
            assert!(v.get(key).is_some(), "{key} missing from {v}");
        }
        let lat = &v["latency_us"]["read"];
        for key in ["count", "mean", "p50", "p99", "p99_9"] {
            assert_eq!(lat[key].as_f64(), Some(0.0), "{key} in {lat}");
        }
        assert!(lat.get("buckets").is_none());
    }

    #[test]
    fn concurrent_updates_are_all_counted() {
        let m = std::sync::Arc::new(ExportMetrics::new());
        let threads: Vec<_> = (0..4)
            .map(|q| {
                let m = m.clone();
                std::thread::spawn(move || {
                    for _ in 0..10_000 {
                        m.requests_taken(q, 1);
                        m.request_done(q, Some(RequestKind::Write), 4096, Duration::from_micros(3));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let s = m.snapshot();
        assert_eq!(s.writes, 40_000);
        assert_eq!(s.write_bytes, 40_000 * 4096);
        assert_eq!(s.in_flight, 0);
        assert_eq!(s.latency_us.write.count, 40_000);
    }

    /// The cost of counting, for the record (run by hand: `cargo test --release -p snapmv
    /// --lib metrics::tests::cost -- --ignored --nocapture`): what one request adds, with one
    /// and with two queue threads counting at once.
    #[test]
    #[ignore]
    fn cost_of_counting_one_request() {
        const N: u32 = 20_000_000;
        for threads in [1usize, 2] {
            let m = std::sync::Arc::new(ExportMetrics::new());
            let t0 = std::time::Instant::now();
            let handles: Vec<_> = (0..threads)
                .map(|q| {
                    let m = m.clone();
                    std::thread::spawn(move || {
                        for i in 0..N {
                            m.requests_taken(q, 1);
                            let lat = Duration::from_nanos(u64::from(i % 100_000));
                            m.request_done(q, Some(RequestKind::Read), 4096, lat);
                        }
                    })
                })
                .collect();
            for h in handles {
                h.join().unwrap();
            }
            let ns = t0.elapsed().as_nanos() as f64 / f64::from(N);
            eprintln!("{threads} thread(s): {ns:.1} ns per request counted (wall time per thread)");
            assert_eq!(m.snapshot().reads, u64::from(N) * threads as u64);
        }
    }
}
