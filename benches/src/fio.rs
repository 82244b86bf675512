//! The physical-limit column of scenario 1: fio run locally on the same origin file, in the
//! same repetition as the snapmv / QSD pair (issue 13).

use crate::error::{BenchError, Result};
use crate::load::{LoadSpec, Pattern};
use serde::Deserialize;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// Printed (and put in the rows' notes) when fio is not on the PATH.
pub const MISSING: &str = "fio not installed: apt-get install fio";

/// Whether `fio` runs; its version if so.
pub fn version() -> Option<String> {
    let o = Command::new("fio").arg("--version").output().ok()?;
    o.status
        .success()
        .then(|| String::from_utf8_lossy(&o.stdout).trim().to_string())
}

/// How fio mirrors one row of scenario 1.
#[derive(Clone, Debug)]
pub struct Plan {
    /// `--rw`.
    rw: &'static str,
    /// `--bs` in bytes.
    bs: usize,
    /// O_DIRECT (`--ioengine=io_uring --direct=1`) or buffered (`--ioengine=psync`).
    direct: bool,
    /// io_uring: `--iodepth` per job.
    iodepth: usize,
    /// The `--numjobs` values tried; the best one is the limit.
    jobs: Vec<usize>,
}

impl Plan {
    /// The fio plan for a scenario-1 row, `None` for rows without a limit column (only 4 KiB
    /// randread / randwrite have one).
    ///
    /// - O_DIRECT: io_uring, one job per queue, `iodepth` = the row's QD.
    /// - buffered QD32: psync, the best of 4, 16 and 32 jobs (the page-cache path scales with
    ///   parallel writers; psync has one request in flight per job).
    /// - buffered QD1: psync with one job per queue: the same number of requests in flight as
    ///   the row, so the figure is a latency-bound limit, not the device's throughput.
    pub fn for_row(spec: &LoadSpec, direct: bool) -> Option<Plan> {
        let rw = match spec.pattern {
            Pattern::RandRead => "randread",
            Pattern::RandWrite => "randwrite",
            _ => return None,
        };
        if spec.bs != 4096 {
            return None;
        }
        let jobs = if direct || spec.qd == 1 {
            vec![spec.queues]
        } else {
            vec![4, 16, 32]
        };
        Some(Plan {
            rw,
            bs: spec.bs,
            direct,
            iodepth: if direct { spec.qd } else { 1 },
            jobs,
        })
    }

    /// A short description for the row, e.g. `fio psync, best of 4/16/32 jobs`.
    pub fn describe(&self) -> String {
        if self.direct {
            format!(
                "fio io_uring --direct=1 --iodepth={} --numjobs={}",
                self.iodepth, self.jobs[0]
            )
        } else if self.jobs.len() == 1 {
            format!("fio psync --numjobs={}", self.jobs[0])
        } else {
            let j: Vec<String> = self.jobs.iter().map(|j| j.to_string()).collect();
            format!("fio psync, best of --numjobs={}", j.join("/"))
        }
    }

    /// The fio arguments for `jobs` jobs on `file` (first `size` bytes) for `dur`.
    pub fn args(&self, file: &Path, size: u64, dur: Duration, jobs: usize) -> Vec<String> {
        let mut a = vec![
            "--name=limit".to_string(),
            format!("--filename={}", file.display()),
            format!("--size={size}"),
            format!("--rw={}", self.rw),
            format!("--bs={}", self.bs),
            format!("--numjobs={jobs}"),
            "--group_reporting".into(),
            "--time_based".into(),
            format!("--runtime={}ms", dur.as_millis().max(1)),
            // The servers have the file open: do not drop its cached pages under them.
            "--invalidate=0".into(),
            "--output-format=json".into(),
        ];
        if self.direct {
            a.extend([
                "--ioengine=io_uring".to_string(),
                format!("--iodepth={}", self.iodepth),
                "--direct=1".into(),
            ]);
        } else {
            a.extend(["--ioengine=psync".to_string(), "--direct=0".into()]);
        }
        a
    }

    /// Runs every job count of the plan once; the best IOPS and the job count that gave it.
    pub fn run(&self, file: &Path, size: u64, dur: Duration) -> Result<(f64, usize)> {
        let mut best = (0.0, 0);
        for &j in &self.jobs {
            let args = self.args(file, size, dur, j);
            let o = Command::new("fio")
                .args(&args)
                .output()
                .map_err(|e| BenchError::Invalid(format!("running fio: {e}")))?;
            if !o.status.success() {
                return Err(BenchError::Command {
                    program: "fio".into(),
                    args: args.join(" "),
                    what: format!(
                        "{}: {}",
                        o.status,
                        String::from_utf8_lossy(&o.stderr).trim()
                    ),
                });
            }
            let iops = parse_iops(&o.stdout, self.rw)?;
            if iops > best.0 {
                best = (iops, j);
            }
        }
        Ok(best)
    }
}

#[derive(Deserialize)]
struct Fincore {
    fincore: Vec<FincoreFile>,
}

#[derive(Deserialize)]
struct FincoreFile {
    res: u64,
    size: u64,
}

/// How much of `file` is in the page cache, in % (util-linux `fincore -b -J`): whether a
/// "buffered" row reads memory or the virtual disk. `None` if fincore is missing or fails.
pub fn resident_pct(file: &Path) -> Option<f64> {
    let o = Command::new("fincore")
        .args(["-b", "-J"])
        .arg(file)
        .output()
        .ok()?;
    let v: Fincore = serde_json::from_slice(&o.stdout).ok()?;
    let f = v.fincore.first()?;
    // `res` counts whole pages: a file's partial last page would read as more than 100 %.
    (f.size > 0).then(|| f.res.min(f.size) as f64 * 100.0 / f.size as f64)
}

#[derive(Deserialize)]
struct FioOut {
    jobs: Vec<FioJob>,
}

#[derive(Deserialize)]
struct FioJob {
    read: FioDir,
    write: FioDir,
}

#[derive(Deserialize)]
struct FioDir {
    iops: f64,
}

/// The summed IOPS of fio's `--output-format=json` (with `--group_reporting`: one job entry).
fn parse_iops(out: &[u8], rw: &str) -> Result<f64> {
    let v: FioOut = serde_json::from_slice(out)
        .map_err(|e| BenchError::Invalid(format!("fio JSON output: {e}")))?;
    if v.jobs.is_empty() {
        return Err(BenchError::Invalid("fio JSON output: no jobs".into()));
    }
    Ok(v.jobs
        .iter()
        .map(|j| {
            if rw.contains("write") {
                j.write.iops
            } else {
                j.read.iops
            }
        })
        .sum())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_fio_json_and_picks_the_direction() {
        let out = br#"{"fio version":"fio-3.33","jobs":[{"jobname":"limit",
            "read":{"iops":1234.5,"bw_bytes":1},"write":{"iops":0.0,"bw_bytes":0}}]}"#;
        assert_eq!(parse_iops(out, "randread").unwrap(), 1234.5);
        assert_eq!(parse_iops(out, "randwrite").unwrap(), 0.0);
        assert!(parse_iops(b"fio: bad", "randread").is_err());
    }

    #[test]
    fn resident_pct_reads_fincore() {
        // Whatever is cached, a file of this crate reads as 0–100 % (or fincore is missing).
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml");
        if let Some(r) = resident_pct(&p) {
            assert!((0.0..=100.0).contains(&r), "{r}");
        }
    }

    #[test]
    fn plans_follow_the_row() {
        let d = Duration::from_secs(1);
        let s = |p, qd, q| LoadSpec::new(p, 4096, qd, q, d, (0, 1 << 30));
        let p = Plan::for_row(&s(Pattern::RandRead, 32, 1), true).unwrap();
        let a = p.args(Path::new("/f"), 1 << 30, d, 1);
        assert!(a.contains(&"--ioengine=io_uring".to_string()));
        assert!(a.contains(&"--iodepth=32".to_string()));
        assert!(a.contains(&"--direct=1".to_string()));
        let p = Plan::for_row(&s(Pattern::RandWrite, 32, 2), false).unwrap();
        assert_eq!(p.jobs, vec![4, 16, 32]);
        assert!(p
            .args(Path::new("/f"), 1, d, 16)
            .contains(&"--ioengine=psync".to_string()));
        assert_eq!(
            Plan::for_row(&s(Pattern::RandRead, 1, 2), false)
                .unwrap()
                .jobs,
            vec![2]
        );
        assert!(Plan::for_row(&s(Pattern::Mixed, 32, 1), false).is_none());
    }
}
