//! Rows of results, medians with min–max, and the Markdown / JSON output.

use crate::load::LoadResult;
use serde::{Deserialize, Serialize};

/// Median and range of repeated measurements.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Stat {
    /// Median.
    pub median: f64,
    /// Smallest.
    pub min: f64,
    /// Largest.
    pub max: f64,
    /// Every value, in measurement order.
    pub values: Vec<f64>,
}

impl Stat {
    /// Statistics of `values` (`None` when empty).
    pub fn of(values: &[f64]) -> Option<Stat> {
        if values.is_empty() {
            return None;
        }
        let mut v = values.to_vec();
        v.sort_by(|a, b| a.total_cmp(b));
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Some(Stat {
            median,
            min: v[0],
            max: v[n - 1],
            values: values.to_vec(),
        })
    }
}

/// Medians of the details of repeated load runs.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Detail {
    /// MB/s.
    pub mbps: f64,
    /// Mean latency, µs.
    pub lat_mean_us: f64,
    /// p50, µs.
    pub lat_p50_us: f64,
    /// p99, µs.
    pub lat_p99_us: f64,
    /// p99.9, µs.
    pub lat_p999_us: f64,
    /// Server CPU per request, µs.
    pub cpu_us_per_io: Option<f64>,
    /// Server CPU, % of a core.
    pub cpu_pct: Option<f64>,
    /// Every run.
    pub runs: Vec<LoadResult>,
}

impl Detail {
    /// Medians over `runs`.
    pub fn of(runs: &[LoadResult]) -> Option<Detail> {
        let m = |f: &dyn Fn(&LoadResult) -> f64| {
            Stat::of(&runs.iter().map(f).collect::<Vec<_>>()).map(|s| s.median)
        };
        let mo = |f: &dyn Fn(&LoadResult) -> Option<f64>| {
            let v: Vec<f64> = runs.iter().filter_map(f).collect();
            Stat::of(&v).map(|s| s.median)
        };
        Some(Detail {
            mbps: m(&|r| r.mbps)?,
            lat_mean_us: m(&|r| r.lat_mean_us)?,
            lat_p50_us: m(&|r| r.lat_p50_us)?,
            lat_p99_us: m(&|r| r.lat_p99_us)?,
            lat_p999_us: m(&|r| r.lat_p999_us)?,
            cpu_us_per_io: mo(&|r| r.cpu_us_per_io),
            cpu_pct: mo(&|r| r.cpu_pct),
            runs: runs.to_vec(),
        })
    }
}

/// One line of the results.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Row {
    /// Scenario number or name.
    pub scenario: String,
    /// What was run.
    pub case: String,
    /// What the figures measure (with unit).
    pub metric: String,
    /// snapmv's figure.
    pub snapmv: Option<Stat>,
    /// The peer's figure.
    pub peer: Option<Stat>,
    /// What the peer is.
    pub peer_name: String,
    /// snapmv median / peer median.
    pub ratio: Option<f64>,
    /// snapmv load details.
    pub snapmv_detail: Option<Detail>,
    /// Peer load details.
    pub peer_detail: Option<Detail>,
    /// Remarks (skips, goals).
    pub note: String,
    /// The physical limit: fio run locally on the same file in the same repetitions.
    #[serde(default)]
    pub limit: Option<Stat>,
    /// How the limit was measured (the fio engine and job count).
    #[serde(default)]
    pub limit_name: String,
    /// snapmv median / limit median.
    #[serde(default)]
    pub limit_ratio: Option<f64>,
}

impl Row {
    /// A row from two sets of values.
    pub fn new(
        scenario: &str,
        case: &str,
        metric: &str,
        snapmv: &[f64],
        peer: &[f64],
        peer_name: &str,
    ) -> Row {
        let s = Stat::of(snapmv);
        let p = Stat::of(peer);
        let ratio = match (&s, &p) {
            (Some(s), Some(p)) if p.median > 0.0 => Some(s.median / p.median),
            _ => None,
        };
        Row {
            scenario: scenario.into(),
            case: case.into(),
            metric: metric.into(),
            snapmv: s,
            peer: p,
            peer_name: peer_name.into(),
            ratio,
            snapmv_detail: None,
            peer_detail: None,
            note: String::new(),
            limit: None,
            limit_name: String::new(),
            limit_ratio: None,
        }
    }

    /// Adds the physical-limit figures (fio on the same file).
    pub fn with_limit(mut self, values: &[f64], name: &str) -> Row {
        self.limit = Stat::of(values);
        self.limit_name = name.into();
        self.limit_ratio = match (&self.snapmv, &self.limit) {
            (Some(s), Some(l)) if l.median > 0.0 => Some(s.median / l.median),
            _ => None,
        };
        self
    }

    /// An IOPS row from load runs.
    pub fn load(
        scenario: &str,
        case: &str,
        snapmv: &[LoadResult],
        peer: &[LoadResult],
        peer_name: &str,
    ) -> Row {
        let iops = |v: &[LoadResult]| v.iter().map(|r| r.iops).collect::<Vec<_>>();
        let mut r = Row::new(
            scenario,
            case,
            "IOPS",
            &iops(snapmv),
            &iops(peer),
            peer_name,
        );
        r.snapmv_detail = Detail::of(snapmv);
        r.peer_detail = Detail::of(peer);
        r
    }

    /// Adds a note.
    pub fn note(mut self, n: impl Into<String>) -> Row {
        let n = n.into();
        if !self.note.is_empty() {
            self.note.push_str("; ");
        }
        self.note.push_str(&n);
        self
    }
}

fn num(x: f64) -> String {
    let a = x.abs();
    if a >= 1e6 {
        format!("{:.2}M", x / 1e6)
    } else if a >= 1e4 {
        format!("{:.0}k", x / 1e3)
    } else if a >= 1e3 {
        format!("{:.1}k", x / 1e3)
    } else if a >= 100.0 {
        format!("{x:.0}")
    } else if a >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    }
}

fn stat_cell(s: &Option<Stat>) -> String {
    match s {
        Some(s) if s.values.len() > 1 => {
            format!("{} ({}–{})", num(s.median), num(s.min), num(s.max))
        }
        Some(s) => num(s.median),
        None => "—".into(),
    }
}

fn lat_cell(d: &Option<Detail>) -> String {
    match d {
        Some(d) => format!(
            "{} / {} / {} / {}",
            num(d.lat_mean_us),
            num(d.lat_p50_us),
            num(d.lat_p99_us),
            num(d.lat_p999_us)
        ),
        None => "—".into(),
    }
}

fn mbps_cell(d: &Option<Detail>) -> String {
    match d {
        Some(d) => num(d.mbps),
        None => "—".into(),
    }
}

fn cpu_cell(d: &Option<Detail>) -> String {
    match d.as_ref().and_then(|d| d.cpu_us_per_io) {
        Some(c) => num(c),
        None => "—".into(),
    }
}

fn ratio_cell(r: Option<f64>) -> String {
    r.map(|x| format!("{x:.2}×")).unwrap_or_else(|| "—".into())
}

fn esc(s: &str) -> String {
    s.replace('|', "\\|").replace('\n', " ")
}

/// The Markdown table.
pub fn markdown(rows: &[Row]) -> String {
    let mut out = String::from(
        "| # | case | metric | snapmv median (min–max) | peer median (min–max) | peer | snapmv/peer | limit (fio) | snapmv/limit | MB/s snapmv / peer | snapmv lat µs mean/p50/p99/p99.9 | peer lat µs mean/p50/p99/p99.9 | CPU µs/IO snapmv | CPU µs/IO peer | note |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} / {} | {} | {} | {} | {} | {} |\n",
            esc(&r.scenario),
            esc(&r.case),
            esc(&r.metric),
            stat_cell(&r.snapmv),
            stat_cell(&r.peer),
            esc(&r.peer_name),
            ratio_cell(r.ratio),
            stat_cell(&r.limit),
            ratio_cell(r.limit_ratio),
            mbps_cell(&r.snapmv_detail),
            mbps_cell(&r.peer_detail),
            lat_cell(&r.snapmv_detail),
            lat_cell(&r.peer_detail),
            cpu_cell(&r.snapmv_detail),
            cpu_cell(&r.peer_detail),
            esc(&r.note)
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_median_and_range() {
        let s = Stat::of(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
        let s = Stat::of(&[4.0, 1.0, 2.0, 3.0]).unwrap();
        assert_eq!(s.median, 2.5);
        assert!(Stat::of(&[]).is_none());
    }

    #[test]
    fn ratio_is_snapmv_over_peer_and_absent_without_peer() {
        let r = Row::new(
            "1",
            "c",
            "IOPS",
            &[10.0, 20.0, 30.0],
            &[5.0, 10.0, 15.0],
            "p",
        );
        assert_eq!(r.ratio, Some(2.0));
        let r = Row::new("1", "c", "IOPS", &[10.0], &[], "p");
        assert_eq!(r.ratio, None);
        let md = markdown(&[r.note("a | b")]);
        assert!(md.contains("a \\| b"), "{md}");
    }

    #[test]
    fn limit_ratio_is_snapmv_over_fio_and_old_json_still_reads() {
        let r =
            Row::new("1", "c", "IOPS", &[50.0], &[], "p").with_limit(&[100.0, 200.0, 50.0], "fio");
        assert_eq!(r.limit_ratio, Some(0.5));
        let md = markdown(&[r]);
        let cols: Vec<usize> = md.lines().map(|l| l.matches('|').count()).collect();
        assert!(cols.windows(2).all(|w| w[0] == w[1]), "{md}");
        assert!(md.contains("| 100 (50.0–200) | 0.50× |"), "{md}");
        let mut js = serde_json::to_value(Row::new("1", "c", "IOPS", &[1.0], &[], "p")).unwrap();
        js.as_object_mut().unwrap().remove("limit");
        let back: Row = serde_json::from_value(js).unwrap();
        assert!(back.limit.is_none());
    }
}
