//! Scenario 8 (issue 16): what a daemon costs for a large, sparse origin — resident memory
//! after `origin_create` and after first writes, the time a clean stop (SIGTERM) takes, and the
//! time from start until the export serves again; then the memory of 16 such origins in one
//! daemon.

use crate::error::{io_err, BenchError, Result};
use crate::load::{Conn, LoadSpec, Pattern};
use crate::report::Row;
use crate::scenarios::{sparse_file, Ctx};
use crate::servers::Snapmv;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The origin of the scenario: 1 TiB, sparse.
const ORIGIN: u64 = 1 << 40;
/// Each origin's COW store (sparse): room for the first writes and their overlays.
const STORE: u64 = 8 << 30;
/// How long the first writes run on each origin (the workload).
const WRITES: Duration = Duration::from_secs(5);
/// How long a stop or a start may take before the run gives up.
const LIMIT: Duration = Duration::from_secs(300);

fn mib(b: u64) -> f64 {
    b as f64 / (1u64 << 20) as f64
}

/// Creates `n` sparse origins with their stores under `dir` and exports them (formatting the
/// stores); returns their names.
fn create(sm: &mut Snapmv, dir: &Path, n: usize) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for i in 0..n {
        let origin = dir.join(format!("s8-origin{i}.raw"));
        let store = dir.join(format!("s8-store{i}.cow"));
        sparse_file(&origin, ORIGIN)?;
        sparse_file(&store, STORE)?;
        let name = format!("s8v{i}");
        sm.export_origin(&name, &origin, &store, true, false)?;
        names.push(name);
    }
    Ok(names)
}

/// 4 KiB QD32 random writes over the whole origin for `WRITES` (nearly all first writes
/// after the snapshot); returns the writes done.
fn first_writes(sm: &Snapmv, sock: &Path) -> Result<u64> {
    let spec = LoadSpec::new(Pattern::RandWrite, 4096, 32, 1, WRITES, (0, ORIGIN));
    let mut c = Conn::connect(sock, 1, 32 * 4096)?;
    Ok(c.run(&spec, sm.pid(), None)?.ops)
}

/// Polls until `sock` takes a vhost-user-blk connection.
fn wait_export(sock: &Path, since: Instant) -> Result<Duration> {
    loop {
        if sock.exists() && Conn::connect(sock, 1, 4096).is_ok() {
            return Ok(since.elapsed());
        }
        if since.elapsed() > LIMIT {
            return Err(BenchError::Invalid(format!(
                "export {} not back {LIMIT:?} after the start",
                sock.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn sock_of(sm: &Snapmv, name: &str) -> PathBuf {
    sm.socket_dir.join(format!("{name}.sock"))
}

/// One daemon with `n` origins: (RSS after create, RSS after snapshot + writes, writes, stop,
/// start until every export is back).
fn one_run(ctx: &Ctx, n: usize) -> Result<(u64, u64, u64, Duration, Duration)> {
    let dir = ctx.dir.join(format!("s8-{n}"));
    std::fs::create_dir_all(&dir).map_err(io_err("creating", &dir))?;
    let mut sm = Snapmv::start(&ctx.snapmv_bin, &dir)?;
    let names = create(&mut sm, &dir, n)?;
    let rss_create = sm.rss_bytes()?;
    let mut writes = 0;
    for name in &names {
        sm.snapshot(name)?;
        writes += first_writes(&sm, &sock_of(&sm, name))?;
    }
    let rss_writes = sm.rss_bytes()?;
    let stop = sm.stop_timed(LIMIT)?;
    let t = Instant::now();
    let sm = Snapmv::start(&ctx.snapmv_bin, &dir)?;
    let mut start = Duration::ZERO;
    for name in &names {
        start = wait_export(&sock_of(&sm, name), t)?;
    }
    // (The files stay until the scratch directory goes: deleting a sparse file with 100,000
    // extents takes minutes on a filesystem mounted with `discard`.)
    drop(sm);
    Ok((rss_create, rss_writes, writes, stop, start))
}

/// Scenario 8. Only snapmv is measured (no peer keeps a chunk map); the goals are in
/// the notes.
pub fn s8(ctx: &mut Ctx) -> Result<()> {
    eprintln!("scenario 8: 1 TiB sparse origin: memory, stop and start");
    let (c1, w1, n1, stop, start) = one_run(ctx, 1)?;
    eprintln!(
        "  1 origin: RSS {:.0} MiB after create, {:.0} MiB after {n1} writes; stop {:.2} s, start {:.2} s",
        mib(c1),
        mib(w1),
        stop.as_secs_f64(),
        start.as_secs_f64()
    );
    let row = |case: &str, metric: &str, v: f64, note: String| {
        Row::new("8", case, metric, &[v], &[], "—").note(note)
    };
    let case = "1 TiB sparse origin, 1 snapshot, 5 s 4k randwrite QD32";
    ctx.rows.push(row(
        case,
        "daemon RSS after create, MiB",
        mib(c1),
        String::new(),
    ));
    ctx.rows.push(row(
        case,
        "daemon RSS after the writes, MiB",
        mib(w1),
        format!("{n1} writes; goal ≤ 128 MiB"),
    ));
    ctx.rows.push(row(
        case,
        "SIGTERM until exit, s",
        stop.as_secs_f64(),
        "goal < 2 s".into(),
    ));
    ctx.rows.push(row(
        case,
        "start until the export serves, s",
        start.as_secs_f64(),
        "goal < 2 s".into(),
    ));
    // 16 such origins, unless that would not fit in memory (the dense map of older builds).
    let avail = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("MemAvailable:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0);
    let case16 = "16 such origins in one daemon";
    // Each origin's writes allocate about twice what they write (origin + store copy).
    let disk_need = 16 * 3 * (n1 * 4096) + (4 << 30);
    let disk_free = crate::free_bytes(&ctx.dir).unwrap_or(u64::MAX);
    if disk_free < disk_need {
        eprintln!(
            "  16 origins skipped: {:.0} MiB free on disk, about {:.0} MiB needed",
            mib(disk_free),
            mib(disk_need)
        );
        ctx.rows.push(
            Row::new(
                "8",
                case16,
                "daemon RSS after the writes, MiB",
                &[],
                &[],
                "—",
            )
            .note(format!(
                "skipped: {:.0} MiB free on disk, about {:.0} MiB needed",
                mib(disk_free),
                mib(disk_need)
            )),
        );
        return Ok(());
    }
    if w1 * 16 > avail / 2 {
        eprintln!(
            "  16 origins skipped: 16 × {:.0} MiB would not fit in {:.0} MiB available",
            mib(w1),
            mib(avail)
        );
        ctx.rows.push(
            Row::new(
                "8",
                case16,
                "daemon RSS after the writes, MiB",
                &[],
                &[],
                "—",
            )
            .note(format!(
                "skipped: 16 × {:.0} MiB > half of the {:.0} MiB available",
                mib(w1),
                mib(avail)
            )),
        );
        return Ok(());
    }
    let (c16, w16, n16, stop16, start16) = one_run(ctx, 16)?;
    eprintln!(
        "  16 origins: RSS {:.0} MiB after create, {:.0} MiB after {n16} writes; stop {:.2} s, start {:.2} s",
        mib(c16),
        mib(w16),
        stop16.as_secs_f64(),
        start16.as_secs_f64()
    );
    ctx.rows.push(row(
        case16,
        "daemon RSS after create, MiB",
        mib(c16),
        String::new(),
    ));
    ctx.rows.push(row(
        case16,
        "daemon RSS after the writes, MiB",
        mib(w16),
        format!("{n16} writes; goal < 1024 MiB"),
    ));
    ctx.rows.push(row(
        case16,
        "SIGTERM until exit, s",
        stop16.as_secs_f64(),
        String::new(),
    ));
    ctx.rows.push(row(
        case16,
        "start until every export serves, s",
        start16.as_secs_f64(),
        String::new(),
    ));
    Ok(())
}
