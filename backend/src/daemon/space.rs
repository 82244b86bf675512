//! The low-space threshold: a store whose chunks in use (not free) reach `--low-space-percent`
//! of its data chunks (default 90 %) is *low on space*. The crossing is logged once each way
//! (a warning going up, a note coming back under), `status` and `stats` show it and
//! Prometheus has it as a gauge. Stores are looked at every [`POLL`] by a thread of the
//! daemon and at every `status` and `stats` call, so a crossing shorter than that may go
//! unlogged; the writes that fill a store completely fail on their own (ENOSPC, logged).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use log::{info, warn};

use super::core::Daemon;

/// How often the daemon's thread compares every open store with the threshold.
pub(crate) const POLL: Duration = Duration::from_secs(1);

/// The default threshold, percent of a store's data chunks in use.
pub const DEFAULT_LOW_SPACE_PERCENT: u8 = 90;

/// The threshold and which stores are above it (by path).
#[derive(Debug)]
pub(crate) struct SpaceWatch {
    percent: u8,
    above: Mutex<HashMap<String, bool>>,
}

impl SpaceWatch {
    pub(crate) fn new(percent: u8) -> SpaceWatch {
        SpaceWatch {
            percent,
            above: Mutex::new(HashMap::new()),
        }
    }

    /// The threshold in percent.
    pub(crate) fn percent(&self) -> u8 {
        self.percent
    }

    /// Whether `used` of `total` chunks is at or past the threshold.
    fn is_low(&self, used: u64, total: u64) -> bool {
        total > 0 && u128::from(used) * 100 >= u128::from(total) * u128::from(self.percent)
    }

    /// Compares store `cow` (`free` of `total` chunks free) with the threshold, logs a
    /// crossing, and returns whether it is low on space.
    pub(crate) fn observe(&self, cow: &str, total: u64, free: u64) -> bool {
        let used = total.saturating_sub(free);
        let low = self.is_low(used, total);
        let mut above = self.above.lock().unwrap_or_else(|e| e.into_inner());
        let was = above.insert(cow.to_string(), low).unwrap_or(false);
        if low && !was {
            warn!(
                "COW store {cow} is low on space: {used} of {total} chunks in use ({}%, threshold {}%); delete snapshots or grow the store before writes fail",
                used * 100 / total,
                self.percent
            );
        } else if was && !low {
            info!(
                "COW store {cow} is back under the low-space threshold: {used} of {total} chunks in use (threshold {}%)",
                self.percent
            );
        }
        low
    }

    /// Forgets a store that was closed (a store opened again starts as not low).
    fn retain(&self, open: &[String]) {
        let mut above = self.above.lock().unwrap_or_else(|e| e.into_inner());
        above.retain(|cow, _| open.contains(cow));
    }
}

/// Parses `--low-space-percent`: 1 to 100.
pub fn parse_low_space_percent(s: &str) -> Result<u8, String> {
    match s.parse::<u8>() {
        Ok(p) if (1..=100).contains(&p) => Ok(p),
        _ => Err(format!("{s:?} is not a percentage from 1 to 100")),
    }
}

impl Daemon {
    /// Compares every open store with the threshold (and forgets closed ones).
    pub(crate) fn watch_space(&self) {
        let inner = self.lock();
        let mut open = Vec::with_capacity(inner.stores.len());
        for (cow, store) in &inner.stores {
            let (total, free) = store.space();
            self.space.observe(cow, total, free);
            open.push(cow.clone());
        }
        drop(inner);
        self.space.retain(&open);
    }
}

/// Starts the thread that looks at every open store each [`POLL`] until the process exits.
pub(crate) fn start(daemon: Arc<Daemon>) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("snapmv-space".into())
        .spawn(move || loop {
            daemon.watch_space();
            std::thread::sleep(POLL);
        })
        .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_crossing_is_seen_each_way_and_only_at_the_threshold() {
        let w = SpaceWatch::new(90);
        assert!(!w.observe("/c", 100, 11)); // 89 %
        assert!(w.observe("/c", 100, 10)); // 90 %
        assert!(w.observe("/c", 100, 0));
        assert!(!w.observe("/c", 100, 50));
        assert!(
            !w.observe("/empty", 0, 0),
            "a store without chunks is not low"
        );
        let all = SpaceWatch::new(100);
        assert!(!all.observe("/c", 1000, 1));
        assert!(all.observe("/c", 1000, 0));
        assert_eq!(parse_low_space_percent("90"), Ok(90));
        assert!(parse_low_space_percent("0").is_err());
        assert!(parse_low_space_percent("101").is_err());
        assert!(parse_low_space_percent("x").is_err());
    }
}
