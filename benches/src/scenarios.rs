//! Scenarios 1–6 of issue 6 (snapmv against qemu-storage-daemon, A/B interleaved).

use crate::error::{io_err, BenchError, Result};
use crate::load::{Conn, Distinct, LoadResult, LoadSpec, Pattern};
use crate::report::Row;
use crate::servers::{run_cmd, Qsd, Snapmv};
use serde_json::json;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Shared settings of a run.
pub struct Ctx {
    /// Short runs.
    pub quick: bool,
    /// Length of one measurement.
    pub dur: Duration,
    /// Repetitions of each A/B pair.
    pub reps: usize,
    /// Scratch directory for the files.
    pub dir: PathBuf,
    /// The `snapmv` binary.
    pub snapmv_bin: PathBuf,
    /// QSD's `aio` mode for files.
    pub aio: String,
    /// Size of the main origin.
    pub size: u64,
    /// Size of the origin of scenarios 3, 5 and 6.
    pub small: u64,
    /// Results.
    pub rows: Vec<Row>,
}

const K4: usize = 4096;
const QCOW2_CLUSTER: u64 = 65536;

/// Writes `size` bytes of non-zero, non-repeating-per-MiB data to `path`.
pub fn fill_file(path: &Path, size: u64) -> Result<()> {
    let mut f = std::fs::File::create(path).map_err(io_err("creating", path))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut rng = fastrand::Rng::with_seed(7);
    let mut done = 0u64;
    while done < size {
        for w in buf.chunks_mut(8) {
            w.copy_from_slice(&(rng.u64(..) | 1).to_le_bytes());
        }
        let n = (size - done).min(buf.len() as u64) as usize;
        f.write_all(&buf[..n]).map_err(io_err("filling", path))?;
        done += n as u64;
    }
    f.sync_all().map_err(io_err("syncing", path))?;
    Ok(())
}

/// Creates a sparse file of `size` bytes.
pub fn sparse_file(path: &Path, size: u64) -> Result<()> {
    let f = std::fs::File::create(path).map_err(io_err("creating", path))?;
    f.set_len(size).map_err(io_err("sizing", path))
}

pub(crate) fn progress(what: &str, r: &LoadResult) {
    eprintln!(
        "    {what}: {:.0} IOPS, {:.1} MB/s, mean {:.1} µs, p99 {:.1} µs, cpu/io {}",
        r.iops,
        r.mbps,
        r.lat_mean_us,
        r.lat_p99_us,
        r.cpu_us_per_io
            .map(|c| format!("{c:.2} µs"))
            .unwrap_or_else(|| "?".into())
    );
}

/// One run on a fresh connection.
pub(crate) fn run_on(sock: &Path, pid: u32, spec: &LoadSpec) -> Result<LoadResult> {
    let mut c = Conn::connect(sock, spec.queues.max(1), spec.queues * spec.qd * spec.bs)?;
    c.run(spec, pid, None)
}

/// Runs `a` (snapmv) and `b` (peer) `reps` times, alternating which goes first.
fn ab(
    reps: usize,
    label: &str,
    mut a: impl FnMut() -> Result<LoadResult>,
    mut b: impl FnMut() -> Result<LoadResult>,
) -> Result<(Vec<LoadResult>, Vec<LoadResult>)> {
    let (mut va, mut vb) = (Vec::new(), Vec::new());
    eprintln!("  {label}");
    for rep in 0..reps {
        for first in [rep % 2 == 0, rep % 2 == 1] {
            if first {
                let r = a()?;
                progress(&format!("snapmv rep {rep}"), &r);
                va.push(r);
            } else {
                let r = b()?;
                progress(&format!("QSD    rep {rep}"), &r);
                vb.push(r);
            }
        }
    }
    Ok((va, vb))
}

/// The limit column of one scenario-1 row: fio's best IOPS and its job count per repetition,
/// or why there is none.
struct Limit {
    plan: Option<crate::fio::Plan>,
    iops: Vec<f64>,
    jobs: Vec<usize>,
    why_not: Option<String>,
}

impl Limit {
    fn new(spec: &LoadSpec, direct: bool, have_fio: bool) -> Limit {
        let plan = crate::fio::Plan::for_row(spec, direct);
        let why_not = (plan.is_some() && !have_fio).then(|| crate::fio::MISSING.to_string());
        Limit {
            plan: plan.filter(|_| have_fio),
            iops: Vec::new(),
            jobs: Vec::new(),
            why_not,
        }
    }

    /// One fio run (a sweep for buffered QD32); a failure empties the column, not the run.
    fn measure(&mut self, file: &Path, size: u64, dur: Duration, rep: usize) {
        let Some(plan) = &self.plan else { return };
        match plan.run(file, size, dur) {
            Ok((iops, jobs)) => {
                eprintln!("    fio    rep {rep}: {iops:.0} IOPS ({jobs} jobs)");
                self.iops.push(iops);
                self.jobs.push(jobs);
            }
            Err(e) => {
                eprintln!("    fio    rep {rep}: failed, limit column left empty: {e}");
                self.why_not = Some(format!("fio failed: {e}"));
                self.plan = None;
                self.iops.clear();
            }
        }
    }

    fn apply(self, row: Row, resident: Option<f64>) -> Row {
        let row = match resident {
            Some(r) => row.note(format!("origin in the page cache before the row: {r:.0} %")),
            None => row,
        };
        match (self.why_not, self.plan) {
            (Some(w), _) => row.note(format!("limit: {w}")),
            (None, Some(plan)) => {
                let name = plan.describe();
                let jobs: Vec<String> = self.jobs.iter().map(|j| j.to_string()).collect();
                let row = row.with_limit(&self.iops, &name);
                row.note(format!(
                    "limit: {name} (jobs per repetition: {})",
                    jobs.join(", ")
                ))
            }
            (None, None) => row,
        }
    }
}

/// [`ab`] plus the fio limit in the same repetition; the three take turns going first.
fn ab_limit(
    ctx: &Ctx,
    label: &str,
    file: &Path,
    limit: &mut Limit,
    mut a: impl FnMut() -> Result<LoadResult>,
    mut b: impl FnMut() -> Result<LoadResult>,
) -> Result<(Vec<LoadResult>, Vec<LoadResult>)> {
    if limit.plan.is_none() {
        return ab(ctx.reps, label, a, b);
    }
    let (mut va, mut vb) = (Vec::new(), Vec::new());
    eprintln!("  {label}");
    for rep in 0..ctx.reps {
        for k in 0..3 {
            match (k + rep) % 3 {
                0 => {
                    let r = a()?;
                    progress(&format!("snapmv rep {rep}"), &r);
                    va.push(r);
                }
                1 => {
                    let r = b()?;
                    progress(&format!("QSD    rep {rep}"), &r);
                    vb.push(r);
                }
                _ => limit.measure(file, ctx.size, ctx.dur, rep),
            }
        }
    }
    Ok((va, vb))
}

fn goal(row: Row, g: f64) -> Row {
    let met = row.ratio.is_some_and(|r| r >= g);
    row.note(format!(
        "goal ≥{g}×: {}",
        if met { "met" } else { "NOT met" }
    ))
}

/// Scenario 1: origin without snapshot, buffered and O_DIRECT.
pub fn s1(ctx: &mut Ctx, sm: &mut Snapmv, origin: &Path, store: &Path) -> Result<()> {
    eprintln!("scenario 1: origin, no snapshot");
    let have_fio = match crate::fio::version() {
        Some(v) => {
            eprintln!("  limit column: {v} on the same origin file");
            true
        }
        None => {
            eprintln!(
                "  {}; the limit (fio) column stays empty",
                crate::fio::MISSING
            );
            false
        }
    };
    let sock = sm.socket_dir.join("vol.sock");
    let cases = |q: usize, dur: Duration, size: u64| {
        [
            (Pattern::RandRead, K4, 1),
            (Pattern::RandRead, K4, 32),
            (Pattern::RandWrite, K4, 1),
            (Pattern::RandWrite, K4, 32),
            (Pattern::Mixed, K4, 32),
            (Pattern::Read, 1 << 20, 8),
            (Pattern::Write, 1 << 20, 8),
        ]
        .map(|(p, bs, qd)| LoadSpec::new(p, bs, qd, q, dur, (0, size)))
    };
    {
        // aio=native needs cache.direct=on: the buffered rows use threads then.
        let aio = if ctx.aio == "native" {
            "threads"
        } else {
            ctx.aio.as_str()
        };
        let mut qsd = Qsd::start_raw(&ctx.dir, "raw", origin, false, aio)?;
        for q in [1, 2] {
            for spec in cases(q, ctx.dur, ctx.size) {
                let mut limit = Limit::new(&spec, false, have_fio);
                let resident = crate::fio::resident_pct(origin);
                let (a, b) = ab_limit(
                    ctx,
                    &format!("buffered {}", spec.label()),
                    origin,
                    &mut limit,
                    || run_on(&sock, sm.pid(), &spec),
                    || run_on(&qsd.socket, qsd.pid(), &spec),
                )?;
                let row = Row::load(
                    "1",
                    &format!("buffered {}", spec.label()),
                    &a,
                    &b,
                    &format!("QSD raw aio={aio}"),
                );
                let row = limit.apply(row, resident);
                ctx.rows.push(goal(row, if q == 1 { 2.0 } else { 5.0 }));
            }
        }
        let _ = qsd.qmp_cmd("query-version", json!({}));
    }
    // O_DIRECT: re-export with direct; the store must be closed first (no other export uses it).
    sm.remove("vol")?;
    let direct = sm
        .export_origin("vol", origin, store, false, true)
        .and_then(|s| {
            let probe = LoadSpec {
                max_ops: Some(64),
                ..LoadSpec::new(
                    Pattern::RandWrite,
                    K4,
                    4,
                    1,
                    Duration::from_secs(5),
                    (0, ctx.size),
                )
            };
            run_on(&s, sm.pid(), &probe)?;
            let probe = LoadSpec {
                max_ops: Some(64),
                ..LoadSpec::new(
                    Pattern::RandRead,
                    K4,
                    4,
                    1,
                    Duration::from_secs(5),
                    (0, ctx.size),
                )
            };
            run_on(&s, sm.pid(), &probe)?;
            Ok(s)
        });
    match direct {
        Err(e) => {
            eprintln!("  O_DIRECT: not supported yet: {e}");
            ctx.rows.push(
                Row::new(
                    "1",
                    "O_DIRECT (all cases)",
                    "IOPS",
                    &[],
                    &[],
                    "QSD raw cache.direct=on",
                )
                .note(format!(
                    "not run: snapmv does not support O_DIRECT yet ({e})"
                )),
            );
        }
        Ok(dsock) => {
            let qsd = Qsd::start_raw(&ctx.dir, "rawdirect", origin, true, &ctx.aio)?;
            for q in [1, 2] {
                for spec in cases(q, ctx.dur, ctx.size) {
                    let mut limit = Limit::new(&spec, true, have_fio);
                    let resident = crate::fio::resident_pct(origin);
                    let (a, b) = ab_limit(
                        ctx,
                        &format!("O_DIRECT {}", spec.label()),
                        origin,
                        &mut limit,
                        || run_on(&dsock, sm.pid(), &spec),
                        || run_on(&qsd.socket, qsd.pid(), &spec),
                    )?;
                    let row = Row::load(
                        "1",
                        &format!("O_DIRECT {}", spec.label()),
                        &a,
                        &b,
                        &format!("QSD raw cache.direct=on aio={}", ctx.aio),
                    );
                    let row = limit.apply(row, resident);
                    ctx.rows.push(goal(row, 1.1));
                }
            }
        }
    }
    let _ = sm.remove("vol");
    sm.export_origin("vol", origin, store, false, false)?;
    Ok(())
}

/// Scenario 2: first write after a snapshot vs qcow2 (64 KiB clusters) after an internal
/// snapshot. Also measures snapmv's own no-snapshot write rate in the same run.
pub fn s2(ctx: &mut Ctx, sm: &mut Snapmv, origin: &Path) -> Result<()> {
    eprintln!("scenario 2: first write after a snapshot");
    let sock = sm.socket_dir.join("vol.sock");
    let img = ctx.dir.join("s2.qcow2");
    let (o, i) = (origin.display().to_string(), img.display().to_string());
    run_cmd(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=65536",
            &o,
            &i,
        ],
    )?;
    let mut qsd = Qsd::start_qcow2(&ctx.dir, "qcow2", &img, None, &ctx.aio)?;
    let mut base = Vec::new();
    for qd in [1, 32] {
        let spec = LoadSpec::new(Pattern::RandWrite, K4, qd, 1, ctx.dur, (0, ctx.size));
        let (a, b) = ab(
            ctx.reps,
            &format!("no snapshot {}", spec.label()),
            || run_on(&sock, sm.pid(), &spec),
            || run_on(&qsd.socket, qsd.pid(), &spec),
        )?;
        let row = Row::load(
            "2",
            &format!("{}, no snapshot (baseline)", spec.label()),
            &a,
            &b,
            "QSD qcow2 64k, no snapshot",
        );
        base.push(row.snapmv.as_ref().map(|s| s.median).unwrap_or(0.0));
        ctx.rows.push(row);
    }
    let mut n = 0;
    for (k, qd) in [1usize, 32].into_iter().enumerate() {
        let spec = LoadSpec::new(Pattern::RandWrite, K4, qd, 1, ctx.dur, (0, ctx.size));
        let size = ctx.size;
        let (a, b) = ab(
            ctx.reps,
            &format!("first write after snapshot {}", spec.label()),
            || {
                sm.snapshot("vol")?;
                let s = LoadSpec {
                    distinct: Some(Distinct::new(0, size, K4 as u64, None)),
                    ..spec.clone()
                };
                run_on(&sock, sm.pid(), &s)
            },
            || {
                n += 1;
                qsd.snapshot(&format!("s2-{n}"))?;
                let s = LoadSpec {
                    distinct: Some(Distinct::new(0, size, QCOW2_CLUSTER, None)),
                    ..spec.clone()
                };
                run_on(&qsd.socket, qsd.pid(), &s)
            },
        )?;
        let row = Row::load(
            "2",
            &format!(
                "{}, every write a first write after a snapshot",
                spec.label()
            ),
            &a,
            &b,
            "QSD qcow2 64k after internal snapshot",
        );
        let own = row.snapmv.as_ref().map(|s| s.median).unwrap_or(0.0) / base[k].max(1e-9);
        let row = goal(row, 3.0).note(format!(
            "{:.2}× snapmv's no-snapshot rate (goal ≥0.5: {})",
            own,
            if own >= 0.5 { "met" } else { "NOT met" }
        ));
        ctx.rows.push(row);
    }
    Ok(())
}

/// A connection kept open to make small writes between snapshots.
fn write_some(conn: &mut Conn, pid: u32, n: u64, size: u64) -> Result<()> {
    let spec = LoadSpec {
        max_ops: Some(n),
        ..LoadSpec::new(
            Pattern::RandWrite,
            K4,
            16,
            1,
            Duration::from_secs(60),
            (0, size),
        )
    };
    conn.run(&spec, pid, None).map(|_| ())
}

/// What [`latency_under_load`] measured in one repetition.
struct UnderLoad {
    /// Create latencies, ms.
    create: Vec<f64>,
    /// Delete latencies, ms.
    delete: Vec<f64>,
    /// The whole load run.
    load: LoadResult,
    /// The load's write latency (p99, p99.9 µs) during the creates, during an equally long
    /// window right after them without any snapshot operation, and during the deletes.
    windows: [(f64, f64); 3],
}

/// Window numbers of [`UnderLoad::windows`] (1-based in [`crate::load::Windows`]).
const W_CREATE: usize = 1;
const W_BASE: usize = 2;
const W_DELETE: usize = 3;

/// Snapshot create/delete latencies (ms) while a 4k randwrite QD32 load runs, and the load's
/// write latency during the creates against the same load without them.
fn latency_under_load(
    conn: &mut Conn,
    pid: u32,
    size: u64,
    k: usize,
    create: &mut dyn FnMut(usize) -> Result<()>,
    delete: &mut dyn FnMut(usize) -> Result<()>,
) -> Result<UnderLoad> {
    let stop = AtomicBool::new(false);
    let win = crate::load::Windows::new(3)?;
    let spec = LoadSpec {
        duration: None,
        windows: Some(win.clone()),
        ..LoadSpec::new(Pattern::RandWrite, K4, 32, 1, Duration::ZERO, (0, size))
    };
    let (create, delete, load) = std::thread::scope(|s| {
        let h = s.spawn(|| conn.run(&spec, pid, Some(&stop)));
        let mut body = || -> Result<(Vec<f64>, Vec<f64>)> {
            std::thread::sleep(Duration::from_millis(300));
            let mut c = Vec::new();
            win.set(W_CREATE);
            let t0 = Instant::now();
            for i in 0..k {
                let t = Instant::now();
                create(i)?;
                c.push(t.elapsed().as_secs_f64() * 1e3);
                std::thread::sleep(Duration::from_millis(30));
            }
            // The baseline: as long as the creates took, same load, same repetition, no
            // snapshot operation. Right after the last create, so most writes are still first
            // writes, as during the creates.
            win.set(W_BASE);
            std::thread::sleep(t0.elapsed());
            win.set(W_DELETE);
            let mut d = Vec::new();
            for i in 0..k {
                let t = Instant::now();
                delete(i)?;
                d.push(t.elapsed().as_secs_f64() * 1e3);
                std::thread::sleep(Duration::from_millis(30));
            }
            win.set(0);
            Ok((c, d))
        };
        let r = body();
        stop.store(true, Ordering::Relaxed);
        let load = h
            .join()
            .unwrap_or_else(|_| Err(BenchError::Invalid("load thread panicked".into())));
        let (c, d) = r?;
        Ok::<_, BenchError>((c, d, load?))
    })?;
    let q = |w: usize| {
        win.get(w)
            .filter(|h| !h.is_empty())
            .map(|h| {
                (
                    h.value_at_quantile(0.99) as f64,
                    h.value_at_quantile(0.999) as f64,
                )
            })
            .unwrap_or((f64::NAN, f64::NAN))
    };
    Ok(UnderLoad {
        create,
        delete,
        load,
        windows: [q(W_CREATE), q(W_BASE), q(W_DELETE)],
    })
}

fn pctl(v: &[f64], p: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    v[((v.len() as f64 * p) as usize).min(v.len() - 1)]
}

/// Scenarios 3 and 5: origin write cost with 1, 100, 1000 snapshots; snapshot create/delete
/// latency under load at 1 and 1000 snapshots. Leaves `v3` exported with 1000 snapshots.
pub fn s3_s5(ctx: &mut Ctx, sm: &mut Snapmv, run3: bool, run5: bool) -> Result<PathBuf> {
    eprintln!("scenarios 3/5: origin writes with many snapshots; snapshot latency under load");
    let size = ctx.small;
    let origin = ctx.dir.join("origin3.raw");
    let store = ctx.dir.join("store3.cow");
    fill_file(&origin, size)?;
    // 1,000 snapshots, first-write runs and the scenario-5 load copy out a lot: a roomy store.
    sparse_file(&store, size * 8)?;
    let sock = sm.export_origin("v3", &origin, &store, true, false)?;
    let img = ctx.dir.join("s3.qcow2");
    let (o, i) = (origin.display().to_string(), img.display().to_string());
    run_cmd(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=65536",
            &o,
            &i,
        ],
    )?;
    let mut qsd = Qsd::start_qcow2(&ctx.dir, "s3", &img, None, &ctx.aio)?;
    let hot = 16u64 << 20;
    let (mut n_sm, mut n_q) = (0usize, 0usize);
    let qsd_max = if ctx.quick { 100 } else { 1000 };
    let k = if ctx.quick { 10 } else { 30 };
    // snapmv's medians at 1 snapshot (overwrite, first write), for the flatness goal.
    let mut lvl1 = [None, None];
    for level in [1usize, 100, 1000] {
        // Build up: some writes, then a snapshot, until `level` snapshots exist.
        let t = Instant::now();
        {
            let mut c = Conn::connect(&sock, 1, 16 * K4)?;
            while n_sm < level {
                write_some(&mut c, sm.pid(), 16, size)?;
                sm.snapshot("v3")?;
                n_sm += 1;
            }
        }
        let t_sm = t.elapsed();
        let t = Instant::now();
        let qsd_here = level <= qsd_max;
        if qsd_here {
            let mut c = Conn::connect(&qsd.socket, 1, 16 * K4)?;
            while n_q < level {
                write_some(&mut c, qsd.pid(), 16, size)?;
                n_q += 1;
                qsd.snapshot(&format!("s3-{n_q}"))?;
            }
        }
        eprintln!(
            "  {level} snapshots: built in {:.1} s (snapmv), {:.1} s (QSD)",
            t_sm.as_secs_f64(),
            t.elapsed().as_secs_f64()
        );
        let skip = "QSD peer skipped in --quick (each qcow2 internal snapshot costs ~80 ms here)";
        if run3 {
            // (a) overwrite of a range already written since the last snapshot.
            let pre = LoadSpec::new(
                Pattern::Write,
                1 << 20,
                4,
                1,
                Duration::from_secs(600),
                (0, hot),
            );
            let pre = LoadSpec {
                max_ops: Some(hot >> 20),
                ..pre
            };
            run_on(&sock, sm.pid(), &pre)?;
            if qsd_here {
                run_on(&qsd.socket, qsd.pid(), &pre)?;
            }
            let spec = LoadSpec::new(Pattern::RandWrite, K4, 32, 1, ctx.dur, (0, hot));
            let (a, b) = if qsd_here {
                ab(
                    ctx.reps,
                    &format!("{level} snapshots, overwrite {}", spec.label()),
                    || run_on(&sock, sm.pid(), &spec),
                    || run_on(&qsd.socket, qsd.pid(), &spec),
                )?
            } else {
                ab1(
                    ctx.reps,
                    &format!("{level} snapshots, overwrite {}", spec.label()),
                    || run_on(&sock, sm.pid(), &spec),
                )?
            };
            let mut row = Row::load(
                "3",
                &format!(
                    "{level} snapshots: {} on a 16 MiB range written since the last snapshot",
                    spec.label()
                ),
                &a,
                &b,
                "QSD qcow2 64k, same number of internal snapshots",
            );
            if !qsd_here {
                row = row.note(skip);
            }
            row = flat(row, level, &mut lvl1[0]);
            ctx.rows.push(row);
            // (b) first writes (untouched chunks), a separate slice per repetition.
            let slice = (size - hot) / ctx.reps as u64 / (1 << 20) * (1 << 20);
            let mut rep_a = 0;
            let mut rep_b = 0;
            let label = format!("{level} snapshots, first writes {}", spec.label());
            let run_a = || {
                let s = LoadSpec {
                    distinct: Some(Distinct::new(hot + rep_a * slice, slice, K4 as u64, None)),
                    range: (0, size),
                    ..spec.clone()
                };
                rep_a += 1;
                run_on(&sock, sm.pid(), &s)
            };
            let (a, b) = if qsd_here {
                ab(ctx.reps, &label, run_a, || {
                    let s = LoadSpec {
                        distinct: Some(Distinct::new(
                            hot + rep_b * slice,
                            slice,
                            QCOW2_CLUSTER,
                            None,
                        )),
                        range: (0, size),
                        ..spec.clone()
                    };
                    rep_b += 1;
                    run_on(&qsd.socket, qsd.pid(), &s)
                })?
            } else {
                ab1(ctx.reps, &label, run_a)?
            };
            let mut row = Row::load(
                "3",
                &format!(
                    "{level} snapshots: {}, every write a first write",
                    spec.label()
                ),
                &a,
                &b,
                "QSD qcow2 64k, same number of internal snapshots",
            );
            if !qsd_here {
                row = row.note(skip);
            }
            row = flat(row, level, &mut lvl1[1]);
            ctx.rows.push(row);
        }
        if run5 && (level == 1 || level == 1000) {
            let (mut sc, mut sd, mut qc, mut qd) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            let (mut sl, mut ql) = (Vec::new(), Vec::new());
            let (mut sw, mut qw) = (Vec::new(), Vec::new());
            for rep in 0..ctx.reps {
                {
                    let mut c = Conn::connect(&sock, 1, 32 * K4)?;
                    let pid = sm.pid();
                    let tags = std::cell::RefCell::new(Vec::new());
                    let sm_cell = std::cell::RefCell::new(&mut *sm);
                    let u = latency_under_load(
                        &mut c,
                        pid,
                        size,
                        k,
                        &mut |_| {
                            let t = sm_cell.borrow_mut().snapshot("v3")?;
                            tags.borrow_mut().push(t);
                            Ok(())
                        },
                        &mut |i| {
                            let t = tags.borrow()[i];
                            sm_cell.borrow_mut().delete("v3", t)
                        },
                    )?;
                    stall_line("snapmv", rep, &u);
                    sc.extend(&u.create);
                    sd.extend(&u.delete);
                    sw.push(u.windows);
                    sl.push(u.load);
                }
                if level <= qsd_max {
                    let mut c = Conn::connect(&qsd.socket, 1, 32 * K4)?;
                    let pid = qsd.pid();
                    let q_cell = std::cell::RefCell::new(&mut qsd);
                    let u = latency_under_load(
                        &mut c,
                        pid,
                        size,
                        k,
                        &mut |i| q_cell.borrow_mut().snapshot(&format!("s5-{rep}-{i}")),
                        &mut |i| {
                            q_cell
                                .borrow_mut()
                                .delete_snapshot(&format!("s5-{rep}-{i}"))
                        },
                    )?;
                    stall_line("QSD   ", rep, &u);
                    qc.extend(&u.create);
                    qd.extend(&u.delete);
                    qw.push(u.windows);
                    ql.push(u.load);
                }
            }
            let peer = "QSD qcow2 64k internal snapshot (QMP)";
            for (what, s, q) in [("create", &sc, &qc), ("delete", &sd, &qd)] {
                for (pn, p) in [("p50", 0.5), ("p99", 0.99), ("max", 1.0)] {
                    let qv: Vec<f64> = if q.is_empty() {
                        vec![]
                    } else {
                        vec![pctl(q, p)]
                    };
                    let mut row = Row::new(
                        "5",
                        &format!("snapshot {what} under 4k randwrite QD32, {level} existing ({} samples)", s.len()),
                        &format!("{pn} ms"),
                        &[pctl(s, p)],
                        &qv,
                        peer,
                    );
                    if pn == "p99" {
                        let ok = pctl(s, p) < 5.0;
                        row = row.note(format!(
                            "goal p99 < 5 ms: {}",
                            if ok { "met" } else { "NOT met" }
                        ));
                    }
                    if q.is_empty() {
                        row = row.note(skip);
                    }
                    ctx.rows.push(row);
                }
            }
            let mut row = Row::load(
                "5",
                &format!("the randwrite QD32 load during it, {level} existing"),
                &sl,
                &ql,
                peer,
            );
            row.case.push_str(" (background load)");
            ctx.rows.push(row);
            stall_rows(ctx, level, &sw, &qw, peer, skip);
        }
    }
    Ok(sock)
}

fn stall_line(who: &str, rep: usize, u: &UnderLoad) {
    let [c, b, d] = u.windows;
    eprintln!(
        "    {who} rep {rep}: create p50 {:.2} ms max {:.2} ms, delete p50 {:.2} ms max {:.2} ms, \
         load {:.0} IOPS; write p99.9 during creates {:.0} µs, without {:.0} µs ({:.2}×), during deletes {:.0} µs",
        pctl(&u.create, 0.5),
        pctl(&u.create, 1.0),
        pctl(&u.delete, 0.5),
        pctl(&u.delete, 1.0),
        u.load.iops,
        c.1,
        b.1,
        c.1 / b.1,
        d.1
    );
}

/// Scenario 5's stall rows: the load's write latency during creates and deletes against the
/// same load without snapshot operations, per repetition.
fn stall_rows(
    ctx: &mut Ctx,
    level: usize,
    sw: &[[(f64, f64); 3]],
    qw: &[[(f64, f64); 3]],
    peer: &str,
    skip: &str,
) {
    let col = |v: &[[(f64, f64); 3]], w: usize, p999: bool| -> Vec<f64> {
        v.iter()
            .map(|x| if p999 { x[w].1 } else { x[w].0 })
            .filter(|x| x.is_finite())
            .collect()
    };
    let ratio = |v: &[[(f64, f64); 3]], w: usize| -> Vec<f64> {
        v.iter()
            .map(|x| x[w].1 / x[1].1)
            .filter(|x| x.is_finite())
            .collect()
    };
    let what = [
        "during the creates",
        "without snapshot operations (baseline: as long as the creates, right after them)",
        "during the deletes",
    ];
    for (w, name) in what.iter().enumerate() {
        for (pn, p999) in [("p99", false), ("p99.9", true)] {
            let mut row = Row::new(
                "5",
                &format!("guest 4k randwrite QD32 write latency {name}, {level} existing"),
                &format!("{pn} µs"),
                &col(sw, w, p999),
                &col(qw, w, p999),
                peer,
            );
            if qw.is_empty() {
                row = row.note(skip);
            }
            ctx.rows.push(row);
        }
    }
    for (w, name) in [(0, "creates"), (2, "deletes")] {
        let v = ratio(sw, w);
        let mut row = Row::new(
            "5",
            &format!(
                "guest write stall: p99.9 during the {name} / p99.9 without, {level} existing"
            ),
            "×",
            &v,
            &ratio(qw, w),
            peer,
        );
        if w == 0 {
            let ok = crate::report::Stat::of(&v).is_some_and(|s| s.median <= 2.0);
            row = row.note(format!("goal ≤ 2×: {}", if ok { "met" } else { "NOT met" }));
        }
        if qw.is_empty() {
            row = row.note(skip);
        }
        ctx.rows.push(row);
    }
}

/// Scenario 3's goal: the rate with N snapshots against the rate with one.
fn flat(row: Row, level: usize, at1: &mut Option<f64>) -> Row {
    let m = row.snapmv.as_ref().map(|s| s.median);
    if level == 1 {
        *at1 = m;
        return row;
    }
    match (m, *at1) {
        (Some(m), Some(b)) if b > 0.0 => {
            let r = m / b;
            let goal = if level >= 1000 {
                format!(
                    " (goal ≥0.95: {})",
                    if r >= 0.95 { "met" } else { "NOT met" }
                )
            } else {
                String::new()
            };
            row.note(format!("{r:.2}× snapmv's rate at 1 snapshot{goal}"))
        }
        _ => row,
    }
}

/// Like [`ab`] with no peer.
fn ab1(
    reps: usize,
    label: &str,
    mut a: impl FnMut() -> Result<LoadResult>,
) -> Result<(Vec<LoadResult>, Vec<LoadResult>)> {
    eprintln!("  {label} (no peer)");
    let mut va = Vec::new();
    for rep in 0..reps {
        let r = a()?;
        progress(&format!("snapmv rep {rep}"), &r);
        va.push(r);
    }
    Ok((va, Vec::new()))
}

/// Scenario 4: a snapshot volume whose data is half in the store, half on the origin, vs a
/// qcow2 overlay (64 KiB clusters) half allocated over the same raw origin file.
pub fn s4(ctx: &mut Ctx, sm: &mut Snapmv, origin: &Path) -> Result<()> {
    eprintln!("scenario 4: snapshot volume, data half in the store, half on the origin");
    let sock = sm.socket_dir.join("vol.sock");
    let range = (256u64 << 20, 128u64 << 20);
    let tag = sm.snapshot("vol")?;
    let fill = |stride: u64| LoadSpec {
        duration: None,
        distinct: Some(Distinct::new(
            range.0,
            range.1,
            stride,
            Some(range.1 / stride / 2),
        )),
        ..LoadSpec::new(Pattern::RandWrite, K4, 32, 1, Duration::ZERO, range)
    };
    let t = Instant::now();
    run_on(&sock, sm.pid(), &fill(K4 as u64))?;
    eprintln!(
        "  half of 128 MiB copied out of the origin into the store in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let ssock = sm.export_snapshot("snap4", "origin.raw", &ctx.dir.join("store1.cow"), tag)?;
    let ov = ctx.dir.join("ov.qcow2");
    let (o, v) = (origin.display().to_string(), ov.display().to_string());
    run_cmd(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=65536",
            "-b",
            &o,
            "-F",
            "raw",
            &v,
        ],
    )?;
    let qsd = Qsd::start_qcow2(&ctx.dir, "overlay", &ov, Some(origin), &ctx.aio)?;
    run_on(&qsd.socket, qsd.pid(), &fill(QCOW2_CLUSTER))?;
    for (p, qd) in [
        (Pattern::RandRead, 1),
        (Pattern::RandRead, 32),
        (Pattern::RandWrite, 1),
        (Pattern::RandWrite, 32),
    ] {
        let spec = LoadSpec::new(p, K4, qd, 1, ctx.dur, range);
        let (a, b) = ab(
            ctx.reps,
            &format!("snapshot volume {}", spec.label()),
            || run_on(&ssock, sm.pid(), &spec),
            || run_on(&qsd.socket, qsd.pid(), &spec),
        )?;
        let mut row = Row::load(
            "4",
            &format!(
                "snapshot volume {} over 128 MiB, half in store / half on origin",
                spec.label()
            ),
            &a,
            &b,
            "QSD qcow2 64k overlay, half allocated, raw backing",
        );
        if p == Pattern::RandWrite {
            row =
                row.note("writes move data into the store, so the mix drifts over the repetitions");
        }
        ctx.rows.push(row);
    }
    drop(qsd);
    sm.remove("snap4")?;
    let _ = qsd_cleanup(&ov);
    Ok(())
}

fn qsd_cleanup(p: &Path) -> std::io::Result<()> {
    std::fs::remove_file(p)
}

/// Scenario 6: rollback time to effect and copy-back throughput vs `dd` of the same size.
pub fn s6(ctx: &mut Ctx, sm: &mut Snapmv, sock: &Path) -> Result<()> {
    eprintln!("scenario 6: rollback");
    let size = ctx.small;
    let m: u64 = if ctx.quick { 8192 } else { 32768 };
    let bytes = m * K4 as u64;
    let (mut effect, mut secs, mut tput, mut ddt) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut total_chunks = 0u64;
    let src = ctx.dir.join("dd-src");
    let dst = ctx.dir.join("dd-dst");
    fill_file(&src, bytes)?;
    for rep in 0..ctx.reps {
        let tag = sm.snapshot("v3")?;
        let fill = LoadSpec {
            duration: None,
            distinct: Some(Distinct::new(0, size, K4 as u64, Some(m))),
            ..LoadSpec::new(Pattern::RandWrite, K4, 32, 1, Duration::ZERO, (0, size))
        };
        run_on(sock, sm.pid(), &fill)?;
        let t = Instant::now();
        let r = sm.call("snapshot_rollback", json!({"name": "v3", "tag": tag}))?;
        let eff = t.elapsed().as_secs_f64() * 1e3;
        total_chunks = r["progress"]["chunks_total"].as_u64().unwrap_or(0);
        loop {
            let st = sm.call("status", json!({"name": "v3"}))?;
            let running = st["stores"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|s| s["origins"].as_array().into_iter().flatten())
                .any(|o| o.get("rollback").is_some_and(|r| !r.is_null()));
            if !running {
                break;
            }
            if t.elapsed() > Duration::from_secs(600) {
                return Err(BenchError::Invalid(
                    "rollback of v3 did not finish in 600 s".into(),
                ));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let s = t.elapsed().as_secs_f64();
        // dd of the same size, same machine, to the page cache and then to disk.
        let (sa, da) = (
            format!("if={}", src.display()),
            format!("of={}", dst.display()),
        );
        let cnt = format!("count={}", bytes >> 20);
        let t = Instant::now();
        run_cmd(
            "dd",
            &[&sa, &da, "bs=1M", &cnt, "conv=fdatasync", "status=none"],
        )?;
        let d = t.elapsed().as_secs_f64();
        eprintln!("  rep {rep}: effect {eff:.2} ms, copy-back of {m} chunks ({total_chunks} scanned) {s:.3} s = {:.1} MB/s; dd {:.1} MB/s", bytes as f64 / s / 1e6, bytes as f64 / d / 1e6);
        effect.push(eff);
        secs.push(s);
        tput.push(bytes as f64 / s / 1e6);
        ddt.push(bytes as f64 / d / 1e6);
        let _ = std::fs::remove_file(&dst);
    }
    ctx.rows.push(
        Row::new(
            "6",
            "rollback: time until it takes effect (RPC answered, guest reads the snapshot)",
            "ms",
            &effect,
            &[],
            "—",
        )
        .note("1000+ snapshots on the origin"),
    );
    ctx.rows.push(
        Row::new(
            "6",
            &format!("rollback copy-back of {m} changed 4 KiB chunks ({} MiB; {total_chunks} chunks scanned)", bytes >> 20),
            "MB/s",
            &tput,
            &ddt,
            "dd bs=1M conv=fdatasync, same size",
        )
        .note(format!(
            "copy-back wall time {:.2} s median",
            crate::report::Stat::of(&secs).map(|s| s.median).unwrap_or(f64::NAN)
        )),
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_fio_the_limit_column_is_empty_and_says_why() {
        let spec = LoadSpec::new(
            Pattern::RandRead,
            K4,
            32,
            1,
            Duration::from_secs(1),
            (0, 1 << 30),
        );
        let row = Row::new("1", "c", "IOPS", &[1.0], &[], "p");
        let r = Limit::new(&spec, false, false).apply(row.clone(), Some(100.0));
        assert!(r.limit.is_none() && r.limit_ratio.is_none());
        assert!(r.note.contains(crate::fio::MISSING), "{}", r.note);
        assert!(
            r.note.contains("page cache before the row: 100 %"),
            "{}",
            r.note
        );
        // Rows fio does not mirror get no limit note at all.
        let mixed = LoadSpec {
            pattern: Pattern::Mixed,
            ..spec
        };
        let r = Limit::new(&mixed, false, false).apply(row, None);
        assert!(r.note.is_empty(), "{}", r.note);
    }
}
