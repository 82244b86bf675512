//! Engine-level figures (issue 3): crates/engine called directly, no vhost, buffered files.

use crate::error::{BenchError, Result};
use crate::load::Distinct;
use crate::report::Row;
use crate::scenarios::{fill_file, sparse_file, Ctx};
use snapmv_engine::{FormatOptions, Origin, Store, Volume};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

const K4: u64 = 4096;

fn eng(what: &str) -> impl FnOnce(snapmv_engine::Error) -> BenchError + '_ {
    move |source| BenchError::Engine {
        what: what.into(),
        source,
    }
}

/// Random 4 KiB writes over `[lo, hi)` from `threads` threads for `dur`; writes per second.
fn randwrite(vol: &Volume, threads: usize, dur: Duration, lo: u64, hi: u64) -> Result<f64> {
    let ops = AtomicU64::new(0);
    let t0 = Instant::now();
    std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads)
            .map(|t| {
                let ops = &ops;
                s.spawn(move || -> Result<()> {
                    let mut rng = fastrand::Rng::with_seed(t as u64 + 11);
                    let buf = vec![0xa5u8 ^ t as u8; K4 as usize];
                    while t0.elapsed() < dur {
                        let off = lo + rng.u64(0..(hi - lo) / K4) * K4;
                        vol.write(off, &buf).map_err(eng("4 KiB random write"))?;
                        ops.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(())
                })
            })
            .collect();
        hs.into_iter().try_for_each(|h| {
            h.join()
                .unwrap_or_else(|_| Err(BenchError::Invalid("engine write thread panicked".into())))
        })
    })?;
    Ok(ops.load(Ordering::Relaxed) as f64 / t0.elapsed().as_secs_f64())
}

/// First writes: every write on a chunk not touched since the last snapshot.
fn first_writes(vol: &Volume, threads: usize, dur: Duration, lo: u64, hi: u64) -> Result<f64> {
    let chunks = Distinct::new(lo, hi - lo, K4, None);
    let ops = AtomicU64::new(0);
    let t0 = Instant::now();
    std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads)
            .map(|t| {
                let (ops, chunks) = (&ops, &chunks);
                s.spawn(move || -> Result<()> {
                    let buf = vec![0x3cu8 ^ t as u8; K4 as usize];
                    while t0.elapsed() < dur {
                        let Some(off) = chunks.next() else { break };
                        vol.write(off, &buf).map_err(eng("first write"))?;
                        ops.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(())
                })
            })
            .collect();
        hs.into_iter().try_for_each(|h| {
            h.join()
                .unwrap_or_else(|_| Err(BenchError::Invalid("engine write thread panicked".into())))
        })
    })?;
    Ok(ops.load(Ordering::Relaxed) as f64 / t0.elapsed().as_secs_f64())
}

fn prewrite(vol: &Volume, lo: u64, hi: u64) -> Result<()> {
    let buf = vec![0x77u8; 1 << 20];
    let mut off = lo;
    while off < hi {
        let n = (hi - off).min(buf.len() as u64) as usize;
        vol.write(off, &buf[..n])
            .map_err(eng("pre-write of the hot range"))?;
        off += n as u64;
    }
    Ok(())
}

fn build(
    origin: &Origin,
    vol: &Volume,
    have: &mut usize,
    want: usize,
    size: u64,
    writes: bool,
    threads: usize,
) -> Result<f64> {
    let t = Instant::now();
    if writes {
        let mut rng = fastrand::Rng::with_seed(99);
        let buf = vec![0x11u8; K4 as usize];
        while *have < want {
            for _ in 0..8 {
                let off = rng.u64(0..size / K4) * K4;
                vol.write(off, &buf)
                    .map_err(eng("write between snapshots"))?;
            }
            origin
                .create_snapshot(None, "")
                .map_err(eng("snapshot create"))?;
            *have += 1;
        }
    } else {
        let todo = AtomicU64::new((want - *have) as u64);
        std::thread::scope(|s| {
            let hs: Vec<_> = (0..threads)
                .map(|_| {
                    let todo = &todo;
                    s.spawn(move || -> Result<()> {
                        while todo
                            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |x| {
                                x.checked_sub(1)
                            })
                            .is_ok()
                        {
                            origin
                                .create_snapshot(None, "")
                                .map_err(eng("snapshot create"))?;
                        }
                        Ok(())
                    })
                })
                .collect();
            hs.into_iter().try_for_each(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(BenchError::Invalid("snapshot thread panicked".into())))
            })
        })?;
        *have = want;
    }
    Ok(t.elapsed().as_secs_f64())
}

/// Create latency (ms) of `k` snapshots, each deleted right after (delete latency too).
fn create_latency(origin: &Origin, k: usize) -> Result<(Vec<f64>, Vec<f64>)> {
    let (mut c, mut d) = (Vec::new(), Vec::new());
    for _ in 0..k {
        let t = Instant::now();
        let tag = origin
            .create_snapshot(None, "")
            .map_err(eng("snapshot create"))?;
        c.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        origin
            .delete_snapshot(tag)
            .map_err(eng("snapshot delete"))?;
        d.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok((c, d))
}

fn pct(v: &[f64], p: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(((v.len() as f64 * p) as usize).min(v.len().saturating_sub(1)))
        .copied()
        .unwrap_or(f64::NAN)
}

/// The engine scenario.
pub fn run(ctx: &mut Ctx) -> Result<()> {
    eprintln!("engine scenario (crates/engine directly, buffered files)");
    let size = ctx.small;
    let origin_path = ctx.dir.join("eng-origin.raw");
    let cow = ctx.dir.join("eng.cow");
    fill_file(&origin_path, size)?;
    sparse_file(&cow, size * 2)?;
    Store::format(
        &cow,
        &FormatOptions {
            chunk_size: K4 as u32,
            force: true,
        },
    )
    .map_err(eng("format"))?;
    let store = Store::open(&cow, false).map_err(eng("open"))?;
    let origin = store
        .bind_origin("eng", &origin_path, false)
        .map_err(eng("bind origin"))?;
    let vol = origin.volume();
    let hot = 16u64 << 20;
    let dur = ctx.dur;
    let reps = ctx.reps;
    let mut have = 0usize;
    let rate_row = |ctx: &mut Ctx, case: &str, v: Vec<f64>| {
        eprintln!("  {case}: {v:.0?}");
        ctx.rows.push(Row::new("E", case, "writes/s", &v, &[], "—"));
    };
    for level in [0usize, 1, 1000] {
        let t = build(&origin, &vol, &mut have, level, size, true, 1)?;
        if level > 1 {
            eprintln!("  {level} snapshots (8 writes before each) built in {t:.1} s");
        }
        prewrite(&vol, 0, hot)?;
        let mut v = Vec::new();
        for _ in 0..reps {
            v.push(randwrite(&vol, 1, dur, 0, hot)?);
        }
        rate_row(ctx, &format!("origin 4k random write, 1 thread, {level} snapshots (16 MiB range written since the last snapshot)"), v);
        if level == 1 {
            let slice = (size - hot) / reps as u64 / (1 << 20) * (1 << 20);
            for threads in [1usize, 16] {
                let mut v = Vec::new();
                for r in 0..reps as u64 {
                    // A fresh snapshot per repetition keeps the level at ~1 and every chunk untouched.
                    origin
                        .create_snapshot(None, "")
                        .map_err(eng("snapshot create"))?;
                    have += 1;
                    let lo = hot + r * slice;
                    v.push(first_writes(&vol, threads, dur, lo, lo + slice)?);
                }
                rate_row(
                    ctx,
                    &format!("origin 4k first write after a snapshot, {threads} thread(s)"),
                    v,
                );
            }
            let (c, d) = create_latency(&origin, if ctx.quick { 50 } else { 200 })?;
            push_lat(ctx, "snapshot create (no load)", have, &c);
            push_lat(ctx, "snapshot delete (no load)", have, &d);
        }
    }
    let t = build(&origin, &vol, &mut have, 10_000, size, false, 4)?;
    eprintln!("  10,000 snapshots built in {t:.1} s (4 threads, no writes between)");
    let (c, d) = create_latency(&origin, if ctx.quick { 50 } else { 200 })?;
    push_lat(ctx, "snapshot create (no load)", have, &c);
    push_lat(ctx, "snapshot delete (no load)", have, &d);
    drop(vol);
    drop(origin);
    drop(store);
    Ok(())
}

fn push_lat(ctx: &mut Ctx, what: &str, have: usize, v: &[f64]) {
    eprintln!(
        "  {what} at {have}: p50 {:.2} ms p99 {:.2} ms max {:.2} ms",
        pct(v, 0.5),
        pct(v, 0.99),
        pct(v, 1.0)
    );
    for (n, p) in [("p50", 0.5), ("p99", 0.99), ("max", 1.0)] {
        ctx.rows.push(Row::new(
            "E",
            &format!("{what}, {have} existing snapshots ({} samples)", v.len()),
            &format!("{n} ms"),
            &[pct(v, p)],
            &[],
            "—",
        ));
    }
}
