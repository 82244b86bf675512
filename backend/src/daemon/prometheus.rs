//! The Prometheus exposition (`snapmv serve --metrics-listen ADDR`): the `stats` counters in the
//! OpenMetrics text format at `/metrics`, over HTTP on a loopback TCP address or a Unix socket.
//!
//! `prometheus-client` encodes; its [`Collector`] reads the daemon's statistics at each scrape
//! (the counters themselves stay the lock-free per-queue atomics of `vhost_blk::metrics`, so
//! nothing is added to the I/O path). `tiny_http` serves: a small, maintained, thread-based
//! HTTP/1.1 server with Unix socket support and no async runtime, which fits this daemon.
//!
//! Metrics (NBD exports have no counters and are left out):
//! * `snapmv_export_requests_total{export,kind}`, kind `read|write|flush|discard|write_zeroes`;
//! * `snapmv_export_bytes_total{export,dir}`, dir `read|write`;
//! * `snapmv_export_discarded_bytes_total{export,kind}`, kind `discard|write_zeroes`;
//! * `snapmv_export_errors_total{export}`, `snapmv_export_in_flight{export}`;
//! * `snapmv_export_latency_seconds{export,kind}`: a histogram whose buckets (powers of two
//!   nanoseconds, 1.024 µs to 68.7 s) are exact unions of the device's finer ones;
//! * `snapmv_store_chunks{cow,state}`, state `used|free|reclaim_pending`.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use log::{info, warn};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use super::core::Daemon;
use crate::vhost_blk::metrics::LatencyStats;

/// Where the exposition is served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetricsListen {
    /// A loopback TCP address (port 0: any free port, logged).
    Tcp(SocketAddr),
    /// A Unix socket path (a stale socket there is replaced; mode 0600).
    Unix(PathBuf),
}

impl std::fmt::Display for MetricsListen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MetricsListen::Tcp(a) => write!(f, "http://{a}/metrics"),
            MetricsListen::Unix(p) => write!(f, "unix:{} (path /metrics)", p.display()),
        }
    }
}

/// Parses `--metrics-listen`: `unix:/PATH`, or `IP:PORT` with a loopback IP (the exposition
/// has no authentication and names every export and store).
pub fn parse_metrics_listen(s: &str) -> Result<MetricsListen, String> {
    if let Some(path) = s.strip_prefix("unix:") {
        let p = PathBuf::from(path);
        if !p.is_absolute() {
            return Err(format!(
                "metrics socket {path:?} must be an absolute path (unix:/run/snapmv/metrics.sock)"
            ));
        }
        return Ok(MetricsListen::Unix(p));
    }
    let addr: SocketAddr = s
        .parse()
        .map_err(|e| format!("metrics address {s:?} is neither IP:PORT nor unix:/PATH: {e}"))?;
    if !addr.ip().is_loopback() {
        return Err(format!(
            "metrics address {s} is not a loopback address (127.0.0.0/8 or ::1): the \
             exposition has no authentication; put a proxy in front to expose it"
        ));
    }
    Ok(MetricsListen::Tcp(addr))
}

/// Bounds (seconds) of the exposed latency buckets: 2^k ns, k = 10..=36. Each is a bound of
/// the device's own buckets, so summing those into these is exact.
const LE_EXP: std::ops::RangeInclusive<u32> = 10..=36;

fn histogram(l: &LatencyStats) -> (f64, u64, Vec<(f64, u64)>) {
    let mut counts = vec![0u64; LE_EXP.count()];
    for &(ub_us, n) in &l.buckets {
        // The device's bucket [lo, hi) in ns: its values are <= 2^k for the first 2^k >= hi - 1.
        let hi = (ub_us * 1000.0).round() as u64;
        let k = (hi - 1)
            .next_power_of_two()
            .trailing_zeros()
            .max(*LE_EXP.start());
        let i = (k.min(*LE_EXP.end()) - LE_EXP.start()) as usize;
        counts[i] += n;
    }
    let mut buckets: Vec<(f64, u64)> = LE_EXP
        .zip(counts)
        .map(|(k, n)| ((1u64 << k) as f64 / 1e9, n))
        .collect();
    buckets.push((f64::INFINITY, 0));
    let sum = l.mean * l.count as f64 / 1e6;
    (sum, l.count, buckets)
}

/// Reads the daemon's statistics at each scrape.
struct StatsCollector(Arc<Daemon>);

impl std::fmt::Debug for StatsCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StatsCollector")
    }
}

impl Collector for StatsCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let raw = self.0.raw_stats(None).map_err(|e| {
            warn!("metrics: cannot read the statistics: {e}");
            std::fmt::Error
        })?;
        let vhost: Vec<_> = raw
            .exports
            .iter()
            .filter_map(|(n, _, s)| s.as_ref().map(|s| (n.as_str(), s)))
            .collect();

        let mut m = enc.encode_descriptor(
            "snapmv_export_requests",
            "Requests completed successfully, per export and kind",
            None,
            MetricType::Counter,
        )?;
        for (name, s) in &vhost {
            for (kind, v) in [
                ("read", s.reads),
                ("write", s.writes),
                ("flush", s.flushes),
                ("discard", s.discards),
                ("write_zeroes", s.write_zeroes),
            ] {
                m.encode_family(&[("export", *name), ("kind", kind)])?
                    .encode_counter::<NoLabelSet, _, u64>(&v, None)?;
            }
        }
        let mut m = enc.encode_descriptor(
            "snapmv_export_bytes",
            "Bytes read or written by completed requests",
            None,
            MetricType::Counter,
        )?;
        for (name, s) in &vhost {
            for (dir, v) in [("read", s.read_bytes), ("write", s.write_bytes)] {
                m.encode_family(&[("export", *name), ("dir", dir)])?
                    .encode_counter::<NoLabelSet, _, u64>(&v, None)?;
            }
        }
        let mut m = enc.encode_descriptor(
            "snapmv_export_discarded_bytes",
            "Bytes discarded or zeroed by completed discard and write-zeroes requests",
            None,
            MetricType::Counter,
        )?;
        for (name, s) in &vhost {
            for (kind, v) in [
                ("discard", s.discard_bytes),
                ("write_zeroes", s.write_zeroes_bytes),
            ] {
                m.encode_family(&[("export", *name), ("kind", kind)])?
                    .encode_counter::<NoLabelSet, _, u64>(&v, None)?;
            }
        }
        let mut m = enc.encode_descriptor(
            "snapmv_export_errors",
            "Requests that failed (any kind)",
            None,
            MetricType::Counter,
        )?;
        for (name, s) in &vhost {
            m.encode_family(&[("export", *name)])?
                .encode_counter::<NoLabelSet, _, u64>(&s.errors, None)?;
        }
        let mut m = enc.encode_descriptor(
            "snapmv_export_in_flight",
            "Requests taken off the rings and not completed yet",
            None,
            MetricType::Gauge,
        )?;
        for (name, s) in &vhost {
            m.encode_family(&[("export", *name)])?
                .encode_gauge(&(s.in_flight as i64))?;
        }
        let mut m = enc.encode_descriptor(
            "snapmv_export_latency_seconds",
            "Latency of completed requests, from leaving the ring to the end of execution",
            None,
            MetricType::Histogram,
        )?;
        for (name, s) in &vhost {
            let l = &s.latency_us;
            for (kind, l) in [
                ("read", &l.read),
                ("write", &l.write),
                ("flush", &l.flush),
                ("discard", &l.discard),
                ("write_zeroes", &l.write_zeroes),
            ] {
                let (sum, count, buckets) = histogram(l);
                m.encode_family(&[("export", *name), ("kind", kind)])?
                    .encode_histogram::<NoLabelSet>(sum, count, &buckets, None)?;
            }
        }
        let mut m = enc.encode_descriptor(
            "snapmv_store_chunks",
            "Chunks of each open store, by state",
            None,
            MetricType::Gauge,
        )?;
        for st in &raw.stores {
            for (state, v) in [
                ("used", st.chunks_used),
                ("free", st.chunks_free),
                ("reclaim_pending", st.reclaim_pending_chunks),
            ] {
                m.encode_family(&[("cow", st.cow.as_str()), ("state", state)])?
                    .encode_gauge(&(v as i64))?;
            }
        }
        let mut m = enc.encode_descriptor(
            "snapmv_store_commits",
            "Commit rounds (batch write, data sync, seal, sync) since the store was opened",
            None,
            MetricType::Counter,
        )?;
        for st in &raw.stores {
            m.encode_family(&[("cow", st.cow.as_str())])?
                .encode_counter::<NoLabelSet, _, u64>(&st.commits, None)?;
        }
        let mut m = enc.encode_descriptor(
            "snapmv_store_commit_latency_seconds",
            "Duration of the commit rounds since the store was opened, by quantile",
            None,
            MetricType::Gauge,
        )?;
        for st in &raw.stores {
            let l = &st.commit_latency_us;
            for (q, v) in [("0.5", l.p50), ("0.99", l.p99), ("0.999", l.p99_9)] {
                m.encode_family(&[("cow", st.cow.as_str()), ("quantile", q)])?
                    .encode_gauge(&(v / 1e6))?;
            }
        }
        let origins: Vec<(&str, &snapmv_rpc::methods::OriginCounters)> = raw
            .stores
            .iter()
            .flat_map(|st| st.origins.iter().map(move |o| (st.cow.as_str(), o)))
            .collect();
        let mut m = enc.encode_descriptor(
            "snapmv_origin_copy_outs",
            "Origin chunks copied to the store before an origin write, since the origin was opened",
            None,
            MetricType::Counter,
        )?;
        for (cow, o) in &origins {
            m.encode_family(&[("cow", *cow), ("origin", o.origin_id.as_str())])?
                .encode_counter::<NoLabelSet, _, u64>(&o.copy_outs, None)?;
        }
        let mut m = enc.encode_descriptor(
            "snapmv_origin_overlay_chunks",
            "Origin writes acknowledged and not yet on the origin, in chunks",
            None,
            MetricType::Gauge,
        )?;
        for (cow, o) in &origins {
            m.encode_family(&[("cow", *cow), ("origin", o.origin_id.as_str())])?
                .encode_gauge(&(o.overlay_chunks as i64))?;
        }
        let mut m = enc.encode_descriptor(
            "snapmv_origin_overlay_bytes",
            "Memory held by origin writes not yet on the origin",
            None,
            MetricType::Gauge,
        )?;
        for (cow, o) in &origins {
            m.encode_family(&[("cow", *cow), ("origin", o.origin_id.as_str())])?
                .encode_gauge(&(o.overlay_bytes as i64))?;
        }
        let mut m = enc.encode_descriptor(
            "snapmv_origin_rollback_chunks",
            "A rollback in progress: chunks done and in all",
            None,
            MetricType::Gauge,
        )?;
        for (cow, o) in &origins {
            if let Some(r) = &o.rollback {
                for (state, v) in [("done", r.chunks_done), ("total", r.chunks_total)] {
                    m.encode_family(&[
                        ("cow", *cow),
                        ("origin", o.origin_id.as_str()),
                        ("state", state),
                    ])?
                    .encode_gauge(&(v as i64))?;
                }
            }
        }
        let mut m = enc.encode_descriptor(
            "snapmv_store_low_space",
            "1 when the store's chunks in use are at or past the low-space threshold",
            None,
            MetricType::Gauge,
        )?;
        for st in &raw.stores {
            m.encode_family(&[("cow", st.cow.as_str())])?
                .encode_gauge(&i64::from(st.low_space))?;
        }
        let mut m = enc.encode_descriptor(
            "snapmv_store_low_space_threshold_ratio",
            "The low-space threshold, as a fraction of the store's chunks",
            None,
            MetricType::Gauge,
        )?;
        for st in &raw.stores {
            m.encode_family(&[("cow", st.cow.as_str())])?
                .encode_gauge(&(f64::from(st.low_space_percent) / 100.0))?;
        }
        Ok(())
    }
}

/// The exposition's registry: the daemon's statistics, read at each scrape.
fn registry(daemon: Arc<Daemon>) -> Registry {
    let mut r = Registry::default();
    r.register_collector(Box::new(StatsCollector(daemon)));
    r
}

/// The exposition text now.
pub(crate) fn exposition(registry: &Registry) -> Result<String, std::fmt::Error> {
    let mut s = String::new();
    prometheus_client::encoding::text::encode(&mut s, registry)?;
    Ok(s)
}

/// Binds `listen` and serves `/metrics` from a thread of its own until the process exits.
/// Returns the address actually bound (the port chosen when it was 0).
pub fn start(listen: &MetricsListen, daemon: Arc<Daemon>) -> Result<MetricsListen, String> {
    let (server, bound) = match listen {
        MetricsListen::Tcp(addr) => {
            let server = tiny_http::Server::http(addr)
                .map_err(|e| format!("cannot serve metrics on {addr}: {e}"))?;
            let bound = server
                .server_addr()
                .to_ip()
                .map(MetricsListen::Tcp)
                .unwrap_or_else(|| listen.clone());
            (server, bound)
        }
        MetricsListen::Unix(path) => {
            use std::os::unix::fs::{FileTypeExt, PermissionsExt};
            if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
                let _ = std::fs::remove_file(path);
            }
            let server = tiny_http::Server::http_unix(path)
                .map_err(|e| format!("cannot serve metrics on {}: {e}", path.display()))?;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
                .map_err(|e| format!("cannot set the mode of {}: {e}", path.display()))?;
            (server, listen.clone())
        }
    };
    let registry = registry(daemon);
    std::thread::Builder::new()
        .name("snapmv-metrics".into())
        .spawn(move || {
            for req in server.incoming_requests() {
                let (status, body, ctype) = match (req.method(), req.url()) {
                    (tiny_http::Method::Get, "/metrics") => match exposition(&registry) {
                        Ok(body) => (
                            200,
                            body,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        ),
                        Err(_) => (
                            500,
                            "the statistics could not be read (see the daemon's log)\n".into(),
                            "text/plain; charset=utf-8",
                        ),
                    },
                    (_, "/metrics") => (
                        405,
                        "only GET /metrics\n".into(),
                        "text/plain; charset=utf-8",
                    ),
                    (_, url) => {
                        let mut b = String::new();
                        let _ = writeln!(b, "{url} not found; the metrics are at /metrics");
                        (404, b, "text/plain; charset=utf-8")
                    }
                };
                let mut resp = tiny_http::Response::from_string(body).with_status_code(status);
                if let Ok(h) = tiny_http::Header::from_bytes("Content-Type", ctype) {
                    resp = resp.with_header(h);
                }
                if let Err(e) = req.respond(resp) {
                    warn!("metrics: cannot answer a scrape: {e}");
                }
            }
        })
        .map_err(|e| format!("cannot start the metrics thread: {e}"))?;
    info!("metrics served on {bound}");
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses() {
        assert_eq!(
            parse_metrics_listen("127.0.0.1:9477"),
            Ok(MetricsListen::Tcp("127.0.0.1:9477".parse().unwrap()))
        );
        assert!(parse_metrics_listen("[::1]:0").is_ok());
        assert_eq!(
            parse_metrics_listen("unix:/run/snapmv/metrics.sock"),
            Ok(MetricsListen::Unix("/run/snapmv/metrics.sock".into()))
        );
        let e = parse_metrics_listen("0.0.0.0:9477").unwrap_err();
        assert!(e.contains("not a loopback"), "{e}");
        let e = parse_metrics_listen("unix:rel.sock").unwrap_err();
        assert!(e.contains("absolute"), "{e}");
        let e = parse_metrics_listen("localhost").unwrap_err();
        assert!(e.contains("localhost"), "{e}");
    }

    #[test]
    fn latency_buckets_add_up_exactly() {
        let m = crate::vhost_blk::ExportMetrics::new();
        let rk = Some(crate::vhost_blk::request::RequestKind::Read);
        for ns in [
            500u64,
            1024,
            1025,
            2048,
            3000,
            1 << 20,
            (1 << 20) + 1,
            1 << 40,
        ] {
            m.requests_taken(0, 1);
            m.request_done(0, rk, 0, std::time::Duration::from_nanos(ns));
        }
        let (_, count, b) = histogram(&m.snapshot().latency_us.read);
        assert_eq!(count, 8);
        let at = |k: u32| b[(k - LE_EXP.start()) as usize].1;
        // A latency counts under the first bound at or above the top of its device bucket
        // (device buckets are 1/8 of a power of two wide, starting at each power of two):
        // 500 ns in [480, 512) -> 1024; 1024 and 1025 in [1024, 1152) -> 2048; 2048 and 3000
        // -> 4096; 2^20 and 2^20 + 1 -> 2^21; the longest in the last (2^36 ns) bucket.
        assert_eq!(
            (at(10), at(11), at(12), at(20), at(21), at(36)),
            (1, 2, 2, 0, 2, 1)
        );
        assert_eq!(b.iter().map(|x| x.1).sum::<u64>(), 8);
        assert_eq!(b.last().map(|x| x.0), Some(f64::INFINITY));
    }
}
