//! `stats`: per-export I/O statistics (from the export manager's counters, see
//! `vhost_blk::metrics`) and per-store space (from the engine's status). Reading them takes the
//! management lock and sums the per-queue counters; nothing is locked on the I/O path.

use snapmv_rpc::methods::{self as m, PROTOCOL_NBD, PROTOCOL_VHOST};

use crate::daemon::convert;
use crate::daemon::core::Daemon;
use crate::daemon::error::MResult;
use crate::vhost_blk::metrics::ExportStats;

/// Why an NBD export's counters are all zero.
pub(crate) const NBD_NOTE: &str = "statistics are counted for vhost-user-blk exports only";

/// The statistics the daemon reads, before they are shaped for the RPC or the Prometheus
/// exposition (which needs the latency buckets).
pub(crate) struct RawStats {
    /// Each live export by name: its protocol and, for vhost-user-blk, its counters.
    pub(crate) exports: Vec<(String, &'static str, Option<ExportStats>)>,
    pub(crate) stores: Vec<m::StoreStats>,
}

impl Daemon {
    /// The statistics of export `name` (and its store), or of every live export and open store.
    pub(crate) fn raw_stats(&self, name: Option<&str>) -> MResult<RawStats> {
        let guard = self.lock();
        let inner = &*guard;
        let records: Vec<_> = match name {
            Some(n) => vec![self.find_export(inner, n)?],
            None => inner.state.exports.clone(),
        };
        let mut exports = Vec::new();
        for rec in &records {
            if rec.protocol.as_deref() == Some(PROTOCOL_NBD) {
                if let Some(s) = self.nbd_lock().get(&rec.name).map(|n| n.stats()) {
                    exports.push((rec.name.clone(), PROTOCOL_NBD, Some(s)));
                }
            } else if let Some(s) = self.exports.stats(&rec.name) {
                exports.push((rec.name.clone(), PROTOCOL_VHOST, Some(s)));
            }
        }
        exports.sort_by(|a, b| a.0.cmp(&b.0));
        let mut cows: Vec<String> = match name {
            Some(_) => records.iter().map(|r| r.cow.clone()).collect(),
            None => inner.stores.keys().cloned().collect(),
        };
        cows.sort();
        cows.dedup();
        let stores = cows
            .iter()
            .filter_map(|cow| {
                let store = inner.stores.get(cow)?;
                let st = store.status();
                let c = store.commit_stats();
                let mut origins: Vec<m::OriginCounters> = st
                    .origins
                    .iter()
                    .filter(|o| {
                        records
                            .iter()
                            .any(|r| r.cow == *cow && r.origin_id == o.origin_id)
                            || name.is_none()
                    })
                    .map(|o| m::OriginCounters {
                        origin_id: o.origin_id.clone(),
                        copy_outs: o.copy_outs,
                        overlay_chunks: o.overlay_chunks,
                        overlay_bytes: o.overlay_bytes,
                        reclaim_pending_chunks: o.reclaim_pending_chunks,
                        rollback: o.rollback.as_ref().map(convert::rollback_progress),
                    })
                    .collect();
                origins.sort_by(|a, b| a.origin_id.cmp(&b.origin_id));
                Some(m::StoreStats {
                    cow: cow.clone(),
                    chunk_size: st.chunk_size,
                    chunks_total: st.chunks_total,
                    chunks_used: st.chunks_used,
                    chunks_free: st.chunks_free,
                    reclaim_pending_chunks: st
                        .origins
                        .iter()
                        .map(|o| o.reclaim_pending_chunks)
                        .sum(),
                    low_space_percent: self.space.percent(),
                    low_space: self.space.observe(cow, st.chunks_total, st.chunks_free),
                    commits: c.rounds,
                    commit_latency_us: m::LatencyStats {
                        count: c.rounds,
                        mean: c.mean_us,
                        p50: c.p50_us as f64,
                        p99: c.p99_us as f64,
                        p99_9: c.p99_9_us as f64,
                        buckets: Vec::new(),
                    },
                    origins,
                })
            })
            .collect();
        Ok(RawStats { exports, stores })
    }

    pub(crate) fn stats(&self, p: m::OptionalNameParams) -> MResult<m::Stats> {
        let raw = self.raw_stats(p.name.as_deref())?;
        Ok(m::Stats {
            exports: raw
                .exports
                .into_iter()
                .map(|(name, protocol, s)| export_stats(name, protocol, s))
                .collect(),
            stores: raw.stores,
        })
    }
}

fn export_stats(name: String, protocol: &str, s: Option<ExportStats>) -> m::ExportStats {
    let Some(s) = s else {
        return m::ExportStats {
            name,
            protocol: protocol.to_string(),
            note: Some(NBD_NOTE.to_string()),
            ..Default::default()
        };
    };
    m::ExportStats {
        name,
        protocol: protocol.to_string(),
        counters: s,
        note: None,
    }
}
