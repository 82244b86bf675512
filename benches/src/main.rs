//! `snapmv-bench`: snapmv against qemu-storage-daemon over vhost-user-blk, side by side, on
//! the same files, A/B interleaved (issue 6), plus engine-level figures (issue 3).
//!
//! `cargo run --release -p snapmv-bench -- [--quick] [--scenario N]... [--out DIR]`

mod backup;
mod engine;
mod error;
mod fio;
mod load;
mod rbd;
mod report;
mod scenarios;
mod servers;
mod sparse;

use clap::Parser;
use error::{io_err, BenchError, Result};
use scenarios::Ctx;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

#[derive(Parser, Debug)]
#[command(about = "Benchmarks snapmv against qemu-storage-daemon (blkio client)")]
struct Args {
    /// Instead of the suite: one load run against any vhost-user-blk socket.
    #[command(subcommand)]
    cmd: Option<Cmd>,
    /// Short runs (1 s per point, smaller volumes): the whole suite in about 10 minutes.
    #[arg(long)]
    quick: bool,
    /// Scenarios to run: 1..8, `engine` and `rbd` (default: all but `rbd`, which needs a
    /// Ceph cluster). Repeatable or comma-separated.
    #[arg(long, value_delimiter = ',')]
    scenario: Vec<String>,
    /// Where to write latest.md and latest.json.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/results"))]
    out: PathBuf,
    /// Scratch directory for the volumes (default: /tmp/snapmv-bench-PID, removed at the end).
    #[arg(long)]
    scratch: Option<PathBuf>,
    /// Keep the scratch directory.
    #[arg(long)]
    keep: bool,
    /// The snapmv binary (default: `snapmv` next to this binary, built if missing).
    #[arg(long)]
    snapmv_bin: Option<PathBuf>,
    /// Repetitions of each A/B pair (at least 3).
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Seconds per measurement (default 1 with --quick, else 5).
    #[arg(long)]
    secs: Option<f64>,
    /// qemu-storage-daemon's aio mode for files (threads, io_uring, native).
    #[arg(long, default_value = "threads")]
    qsd_aio: String,
    /// Scenario `rbd`: the Ceph cluster's configuration file [default: $CEPH_CONF].
    #[arg(long)]
    ceph_conf: Option<PathBuf>,
    /// Scenario `rbd`: the pool for its images.
    #[arg(long, default_value = "snapmv")]
    ceph_pool: String,
    /// Scenario `rbd`: the cephx user [default: admin].
    #[arg(long)]
    ceph_id: Option<String>,
}

#[derive(clap::Subcommand, Debug)]
enum Cmd {
    /// One load run against a vhost-user-blk socket; prints the result as JSON.
    Load {
        /// The vhost-user-blk socket.
        #[arg(long)]
        socket: PathBuf,
        /// randread, randwrite, read, write or mixed (70 % reads).
        #[arg(long, default_value = "randread")]
        pattern: String,
        /// Request size in bytes (a multiple of 512).
        #[arg(long, default_value_t = 4096)]
        bs: usize,
        /// Requests in flight per queue.
        #[arg(long, default_value_t = 32)]
        qd: usize,
        /// Queues (one thread each).
        #[arg(long, default_value_t = 1)]
        queues: usize,
        /// Seconds to run.
        #[arg(long, default_value_t = 5.0)]
        secs: f64,
        /// First byte of the range (default 0).
        #[arg(long, default_value_t = 0)]
        offset: u64,
        /// Length of the range in bytes (default: the whole device).
        #[arg(long)]
        len: Option<u64>,
        /// Distinct-chunk mode: every write on an untouched chunk of this many bytes.
        #[arg(long)]
        distinct_chunk: Option<u64>,
        /// Pid of the server, for its CPU time per I/O.
        #[arg(long)]
        server_pid: Option<u32>,
    },
    /// Re-renders the Markdown of a results JSON (written next to it, same name, `.md`).
    Render {
        /// The results JSON (e.g. benches/results/latest.json).
        json: PathBuf,
    },
}

/// The Markdown (header line and table) of a results JSON.
fn render_md(js: &serde_json::Value) -> Result<String> {
    let g = |k: &str| match &js[k] {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "?".into(),
        v => v.to_string(),
    };
    let f = |k: &str| js[k].as_f64().unwrap_or(f64::NAN);
    let rows: Vec<report::Row> = serde_json::from_value(js["rows"].clone())
        .map_err(|e| BenchError::Invalid(format!("results JSON: bad rows: {e}")))?;
    let header = format!(
        "Date: {}. Machine: {} cores ({}), {:.0} GiB RAM, kernel {}. \
         Load average (1/5/15 min) before: {}, after: {}. \
         Mode: {} ({} s per point, {} repetitions, A/B interleaved). Peer: {}, aio={}. \
         snapmv commit {}. Main origin {} GiB, small origin {} MiB, files in the page cache \
         (buffered). Run time {:.0} s.{}",
        g("date"),
        g("cores"),
        g("cpu"),
        f("mem_gib"),
        g("kernel"),
        g("loadavg_before"),
        g("loadavg_after"),
        g("mode"),
        f("secs_per_point"),
        g("reps"),
        g("peer"),
        g("qsd_aio"),
        g("snapmv_commit"),
        js["origin_bytes"].as_u64().unwrap_or(0) >> 30,
        js["small_origin_bytes"].as_u64().unwrap_or(0) >> 20,
        f("run_secs"),
        match js["error"].as_str() {
            Some(e) => format!(" **Run stopped early: {e}**"),
            None => String::new(),
        }
    );
    Ok(format!("{header}\n\n{}", report::markdown(&rows)))
}

fn adhoc(cmd: Cmd) -> Result<()> {
    let (socket, pattern, bs, qd, queues, secs, offset, len, distinct_chunk, server_pid) = match cmd
    {
        Cmd::Render { json } => {
            let text = std::fs::read_to_string(&json).map_err(io_err("reading", &json))?;
            let js: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| BenchError::Invalid(format!("{}: not JSON: {e}", json.display())))?;
            let md = render_md(&js)?;
            let mdp = json.with_extension("md");
            std::fs::write(&mdp, &md).map_err(io_err("writing", &mdp))?;
            println!("{md}");
            return Ok(());
        }
        Cmd::Load {
            socket,
            pattern,
            bs,
            qd,
            queues,
            secs,
            offset,
            len,
            distinct_chunk,
            server_pid,
        } => (
            socket,
            pattern,
            bs,
            qd,
            queues,
            secs,
            offset,
            len,
            distinct_chunk,
            server_pid,
        ),
    };
    let pattern = match pattern.as_str() {
        "randread" => load::Pattern::RandRead,
        "randwrite" => load::Pattern::RandWrite,
        "read" => load::Pattern::Read,
        "write" => load::Pattern::Write,
        "mixed" => load::Pattern::Mixed,
        other => {
            return Err(BenchError::Invalid(format!(
                "unknown pattern {other:?} (randread, randwrite, read, write, mixed)"
            )))
        }
    };
    if distinct_chunk.is_some_and(|c| c == 0 || c % 512 != 0) {
        return Err(BenchError::Invalid(
            "--distinct-chunk must be a positive multiple of 512".into(),
        ));
    }
    if !(secs > 0.0 && secs < 1e6) || queues == 0 || qd == 0 {
        return Err(BenchError::Invalid(format!(
            "--secs {secs}, --queues {queues}, --qd {qd}: all must be positive"
        )));
    }
    let mut conn = load::Conn::connect(&socket, queues, queues * qd * bs)?;
    let len = len.unwrap_or(conn.capacity.saturating_sub(offset));
    let spec = load::LoadSpec {
        distinct: distinct_chunk.map(|c| load::Distinct::new(offset, len, c, None)),
        ..load::LoadSpec::new(
            pattern,
            bs,
            qd,
            queues,
            Duration::from_secs_f64(secs),
            (offset, len),
        )
    };
    let r = conn.run(&spec, server_pid.unwrap_or(0), None)?;
    let out = json!({"load": spec.label(), "result": r});
    println!(
        "{}",
        serde_json::to_string_pretty(&out).unwrap_or_else(|_| out.to_string())
    );
    Ok(())
}

fn sh(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

pub(crate) fn free_bytes(dir: &Path) -> Option<u64> {
    let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).ok()?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c` is a valid NUL-terminated path and `st` points to writable memory of the
    // right type; statvfs fills it on success.
    let r = unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) };
    if r != 0 {
        return None;
    }
    // SAFETY: statvfs returned 0, so it initialised `st`.
    let st = unsafe { st.assume_init() };
    // c_ulong is u64 on 64-bit targets only.
    #[allow(clippy::unnecessary_cast)]
    let free = st.f_bavail as u64 * st.f_frsize as u64;
    Some(free)
}

fn find_snapmv(arg: Option<PathBuf>) -> Result<PathBuf> {
    if let Some(p) = arg {
        return Ok(p);
    }
    let exe = std::env::current_exe().map_err(io_err("locating this binary", "/proc/self/exe"))?;
    let bin = exe.with_file_name("snapmv");
    // Always (re)build: a stale binary would measure other code than the engine scenario.
    eprintln!("building the release snapmv binary (cargo build --release -p snapmv)");
    let ws = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let target = exe
        .parent()
        .and_then(|p| p.parent())
        .map(Path::to_path_buf)
        .unwrap_or_else(|| ws.join("target"));
    let st = Command::new("cargo")
        .args(["build", "--release", "-p", "snapmv"])
        .env("CARGO_TARGET_DIR", &target)
        .current_dir(&ws)
        .status()
        .map_err(io_err("running cargo", &ws))?;
    if !st.success() || !bin.exists() {
        return Err(BenchError::Command {
            program: "cargo".into(),
            args: "build --release -p snapmv".into(),
            what: format!("{st}; {} missing", bin.display()),
        });
    }
    Ok(bin)
}

fn run(mut args: Args) -> Result<()> {
    if let Some(cmd) = args.cmd.take() {
        return adhoc(cmd);
    }
    if args.reps < 3 {
        return Err(BenchError::Invalid(format!(
            "--reps {} (at least 3)",
            args.reps
        )));
    }
    let all = ["1", "2", "3", "4", "5", "6", "7", "8", "engine"];
    let sel: Vec<String> = if args.scenario.is_empty() {
        all.iter().map(|s| s.to_string()).collect()
    } else {
        args.scenario.clone()
    };
    if let Some(bad) = sel
        .iter()
        .find(|s| !all.contains(&s.as_str()) && s.as_str() != "rbd")
    {
        return Err(BenchError::Invalid(format!(
            "unknown scenario {bad:?} (1..8, engine, rbd)"
        )));
    }
    let want = |s: &str| sel.iter().any(|x| x == s);
    let snapmv_bin = find_snapmv(args.snapmv_bin.clone())?;
    let dir = args
        .scratch
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("/tmp/snapmv-bench-{}", std::process::id())));
    std::fs::create_dir_all(&dir).map_err(io_err("creating the scratch directory", &dir))?;
    let dir = dir.canonicalize().map_err(io_err("resolving", &dir))?;
    let (size, small) = if args.quick {
        (2u64 << 30, 512u64 << 20)
    } else {
        (4u64 << 30, 1u64 << 30)
    };
    // Origins, qcow2 copies, and sparse stores that may fill up to their size.
    let need = size * 6 + small * 12;
    if let Some(free) = free_bytes(&dir) {
        if free < need {
            return Err(BenchError::Invalid(format!(
                "{} has {} MiB free, the run needs about {} MiB",
                dir.display(),
                free >> 20,
                need >> 20
            )));
        }
    }
    let dur = Duration::from_secs_f64(args.secs.unwrap_or(if args.quick { 1.0 } else { 5.0 }));
    let date = sh("date", &["-u", "+%Y-%m-%d %H:%M UTC"]);
    let load_before = loadavg();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("?")
        .trim()
        .to_string();
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .next()
        .and_then(|l| {
            l.split_whitespace()
                .nth(1)
                .and_then(|k| k.parse::<u64>().ok())
        })
        .map(|k| k as f64 / (1 << 20) as f64)
        .unwrap_or(0.0);
    let qsd_version = sh("qemu-storage-daemon", &["--version"])
        .lines()
        .next()
        .unwrap_or("?")
        .to_string();
    let ws = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let mut commit = sh("git", &["-C", ws, "rev-parse", "--short", "HEAD"]);
    if !sh(
        "git",
        &["-C", ws, "status", "--porcelain", "--", "crates", "backend"],
    )
    .is_empty()
    {
        commit.push_str(" + uncommitted changes in crates/ or backend/");
    }
    eprintln!("snapmv-bench: {date}, {cores} cores ({cpu}), kernel {kernel}, load {load_before}, scratch {}", dir.display());
    let mut ctx = Ctx {
        quick: args.quick,
        dur,
        reps: args.reps,
        dir: dir.clone(),
        snapmv_bin,
        aio: args.qsd_aio.clone(),
        size,
        small,
        rows: Vec::new(),
    };
    let ceph = rbd::Ceph {
        conf: args
            .ceph_conf
            .clone()
            .or_else(|| std::env::var_os("CEPH_CONF").map(PathBuf::from))
            .unwrap_or_else(|| PathBuf::from("/etc/ceph/ceph.conf")),
        pool: args.ceph_pool.clone(),
        id: args.ceph_id.clone(),
    };
    let t0 = Instant::now();
    let res = run_scenarios(&mut ctx, &want, &ceph);
    if let Err(e) = &res {
        eprintln!("snapmv-bench: stopped early: {e}");
    }
    let load_after = loadavg();
    let elapsed = t0.elapsed().as_secs_f64();
    let js = json!({
        "date": date, "cores": cores, "cpu": cpu, "mem_gib": mem_gib, "kernel": kernel,
        "loadavg_before": load_before, "loadavg_after": load_after,
        "mode": if ctx.quick { "quick" } else { "full" }, "secs_per_point": dur.as_secs_f64(),
        "reps": ctx.reps, "peer": qsd_version, "qsd_aio": ctx.aio, "snapmv_commit": commit,
        "origin_bytes": size, "small_origin_bytes": small, "run_secs": elapsed,
        "error": res.as_ref().err().map(|e| e.to_string()),
        "rows": ctx.rows,
    });
    let md = render_md(&js)?;
    println!("{md}");
    std::fs::create_dir_all(&args.out)
        .map_err(io_err("creating the output directory", &args.out))?;
    let mdp = args.out.join("latest.md");
    std::fs::write(&mdp, &md).map_err(io_err("writing", &mdp))?;
    let jp = args.out.join("latest.json");
    let text = serde_json::to_string_pretty(&js)
        .map_err(|e| BenchError::Invalid(format!("serialising the results: {e}")))?;
    std::fs::write(&jp, text + "\n").map_err(io_err("writing", &jp))?;
    eprintln!("wrote {} and {}", mdp.display(), jp.display());
    if !args.keep && args.scratch.is_none() && res.is_ok() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    res
}

fn run_scenarios(ctx: &mut Ctx, want: &dyn Fn(&str) -> bool, ceph: &rbd::Ceph) -> Result<()> {
    let needs_daemon = ["1", "2", "3", "4", "5", "6", "7", "rbd"]
        .iter()
        .any(|s| want(s));
    if needs_daemon {
        let mut sm = servers::Snapmv::start(&ctx.snapmv_bin, &ctx.dir)?;
        if want("1") || want("2") || want("4") {
            let origin = ctx.dir.join("origin.raw");
            let store = ctx.dir.join("store1.cow");
            let t = Instant::now();
            scenarios::fill_file(&origin, ctx.size)?;
            scenarios::sparse_file(&store, ctx.size * 3)?;
            sm.export_origin("vol", &origin, &store, true, false)?;
            eprintln!(
                "origin of {} GiB written in {:.1} s",
                ctx.size >> 30,
                t.elapsed().as_secs_f64()
            );
            if want("1") {
                scenarios::s1(ctx, &mut sm, &origin, &store)?;
            }
            if want("2") {
                scenarios::s2(ctx, &mut sm, &origin)?;
            }
            if want("4") {
                scenarios::s4(ctx, &mut sm, &origin)?;
            }
        }
        if want("3") || want("5") || want("6") {
            let sock = scenarios::s3_s5(ctx, &mut sm, want("3"), want("5"))?;
            if want("6") {
                scenarios::s6(ctx, &mut sm, &sock)?;
            }
        }
        if want("7") {
            backup::s7(ctx, &mut sm)?;
        }
        if want("rbd") {
            rbd::run(ctx, &mut sm, ceph)?;
        }
    }
    if want("8") {
        // Its own daemons (it stops and restarts them).
        sparse::s8(ctx)?;
    }
    if want("engine") {
        engine::run(ctx)?;
    }
    Ok(())
}

fn main() {
    let args = Args::parse();
    if let Err(e) = run(args) {
        eprintln!("snapmv-bench: {e}");
        std::process::exit(1);
    }
}
