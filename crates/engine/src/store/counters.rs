//! Counters of a store's commit thread since the store was opened: commit rounds and how long
//! each took (writing the pending batch, syncing the data, the seal and its sync), for
//! `stats` and Prometheus. A round runs a few hundred times a second at most, on one thread,
//! so the histogram (`hdrhistogram`, 3 significant digits) sits behind a mutex.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::Duration;

use hdrhistogram::Histogram;

/// Commit rounds as a [`crate::Store`] reports them ([`crate::Store::commit_stats`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CommitStats {
    /// Commit rounds that completed (each makes every batch written before it durable).
    pub rounds: u64,
    /// Their duration in microseconds: mean, median, 99th and 99.9th percentile, longest.
    pub mean_us: f64,
    /// Median.
    pub p50_us: u64,
    /// 99th percentile.
    pub p99_us: u64,
    /// 99.9th percentile.
    pub p99_9_us: u64,
    /// Longest.
    pub max_us: u64,
}

/// See the module documentation.
#[derive(Debug)]
pub(crate) struct CommitCounters {
    rounds: AtomicU64,
    /// Round durations in µs, 1 µs to 1 h (longer ones are clamped).
    hist: Mutex<Histogram<u64>>,
}

const MAX_US: u64 = 3_600_000_000;

impl CommitCounters {
    pub(crate) fn new() -> CommitCounters {
        // (Bounds and precision are constants that `new_with_bounds` accepts.)
        let hist = Histogram::new_with_bounds(1, MAX_US, 3)
            .unwrap_or_else(|_| unreachable!("1..1h at 3 digits is a valid histogram"));
        CommitCounters {
            rounds: AtomicU64::new(0),
            hist: Mutex::new(hist),
        }
    }

    /// A commit round took `d`.
    pub(crate) fn round(&self, d: Duration) {
        let us = u64::try_from(d.as_micros())
            .unwrap_or(MAX_US)
            .clamp(1, MAX_US);
        self.rounds.fetch_add(1, Relaxed);
        let mut h = self.hist.lock().unwrap_or_else(|e| e.into_inner());
        h.saturating_record(us);
    }

    pub(crate) fn snapshot(&self) -> CommitStats {
        let h = self.hist.lock().unwrap_or_else(|e| e.into_inner());
        if h.is_empty() {
            return CommitStats::default();
        }
        CommitStats {
            rounds: self.rounds.load(Relaxed),
            mean_us: h.mean(),
            p50_us: h.value_at_quantile(0.5),
            p99_us: h.value_at_quantile(0.99),
            p99_9_us: h.value_at_quantile(0.999),
            max_us: h.max(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_are_counted_and_summarised() {
        let c = CommitCounters::new();
        assert_eq!(c.snapshot(), CommitStats::default());
        for ms in 1..=100u64 {
            c.round(Duration::from_millis(ms));
        }
        let s = c.snapshot();
        assert_eq!(s.rounds, 100);
        // 3 significant digits: within 0.1 % of the exact order statistics.
        assert!((49_950..=50_050).contains(&s.p50_us), "{s:?}");
        assert!((98_900..=99_100).contains(&s.p99_us), "{s:?}");
        assert!((99_900..=100_100).contains(&s.max_us), "{s:?}");
        assert!((s.mean_us - 50_500.0).abs() < 100.0, "{s:?}");
        c.round(Duration::from_secs(7200)); // clamped, still counted
        assert_eq!(c.snapshot().rounds, 101);
    }
}
