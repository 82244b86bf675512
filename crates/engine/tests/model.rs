//! Model-based test: random operations on the engine and on an obviously correct in-memory
//! model, comparing every read. `SNAPMV_MODEL_OPS` sets the total operation count (default
//! 100,000 across seeds); `SNAPMV_MODEL_SEED` replays one seed. Among the operations: a
//! burst of origin writes right before a snapshot of the origin, so that the cut usually
//! finds overlays (first writes whose copy-outs are not durable yet) and takes their chunks;
//! discard and write-zeroes on the origin and on snapshots (holes, zero exceptions), over an
//! origin whose chunks are partly zeros from the start.

mod common;

use common::{env_u64, MemStorage};
use snapmv_engine::{Error, FormatOptions, Origin, Storage, Store};
use std::collections::BTreeMap;
use std::sync::Arc;

struct Model {
    origin: Vec<u8>,
    snaps: BTreeMap<u32, Vec<u8>>,
}

struct Engine {
    store_st: Arc<MemStorage>,
    origin_st: Arc<MemStorage>,
    store: Option<Store>,
    origin: Option<Origin>,
}

impl Engine {
    fn open(&mut self) {
        let store =
            Store::open_storage(self.store_st.clone() as Arc<dyn Storage>).expect("reopen store");
        let origin = store
            .open_origin_storage("o", self.origin_st.clone() as Arc<dyn Storage>)
            .expect("reopen origin");
        self.store = Some(store);
        self.origin = Some(origin);
    }
    fn close(&mut self) {
        self.origin = None;
        self.store = None;
    }
    fn o(&self) -> &Origin {
        self.origin.as_ref().unwrap()
    }
}

/// Waits for a rollback; one stalled on a full store gets space by deleting snapshots.
fn wait_rollback(e: &Engine, m: &mut Model) {
    loop {
        match e.o().wait_rollback() {
            Ok(()) => return,
            Err(Error::NoSpace { .. }) => {
                let Some(&t) = m.snaps.keys().next() else {
                    // The stall is reported until the worker tries again after the deletes
                    // (their reclaim first): give it time, but not forever.
                    for _ in 0..1500 {
                        std::thread::sleep(std::time::Duration::from_millis(20));
                        match e.o().wait_rollback() {
                            Ok(()) => return,
                            Err(Error::NoSpace { .. }) => {}
                            Err(err) => panic!("wait_rollback: {err}"),
                        }
                    }
                    panic!("rollback still stalled 30 s after every snapshot was deleted");
                };
                e.o().delete_snapshot(t).unwrap();
                m.snaps.remove(&t);
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            Err(err) => panic!("wait_rollback: {err}"),
        }
    }
}

fn run_seed(seed: u64, ops: u64) {
    let mut rng = fastrand::Rng::with_seed(seed);
    let cs = 4096usize;
    let nchunks = rng.usize(4..40);
    let tail = if rng.bool() { rng.usize(1..8) * 512 } else { 0 };
    let size = nchunks * cs + tail;
    let data_chunks = rng.usize(nchunks..nchunks * 4);
    // Find a store size whose layout gives about `data_chunks` chunks.
    let store_size = 4 << 20;
    let store_size = store_size + data_chunks * cs;
    let store_st = MemStorage::new("store", store_size);
    let origin_st = MemStorage::new("origin", size);
    let mut initial = vec![0u8; size];
    rng.fill(&mut initial);
    // Some chunks start as zeros (holes): their copy-outs are zero exceptions.
    for c in 0..nchunks {
        if rng.u8(0..4) == 0 {
            initial[c * cs..(c + 1) * cs].fill(0);
        }
    }
    origin_st.data.lock().unwrap().copy_from_slice(&initial);
    Store::format_storage(
        store_st.as_ref(),
        &FormatOptions {
            chunk_size: cs as u32,
            force: false,
        },
    )
    .unwrap();
    let store = Store::open_storage(store_st.clone() as Arc<dyn Storage>).unwrap();
    let origin = store
        .bind_origin_storage("o", origin_st.clone() as Arc<dyn Storage>)
        .unwrap();
    let mut e = Engine {
        store_st,
        origin_st,
        store: Some(store),
        origin: Some(origin),
    };
    let mut m = Model {
        origin: initial,
        snaps: BTreeMap::new(),
    };
    let ctx = |op: u64, what: &str| {
        format!("seed {seed} op {op}: {what} (replay: SNAPMV_MODEL_SEED={seed})")
    };

    for op in 0..ops {
        let live: Vec<u32> = m.snaps.keys().copied().collect();
        let pick = |rng: &mut fastrand::Rng| live[rng.usize(..live.len())];
        let r = rng.u32(0..100);
        let (off, len) = {
            let start = rng.usize(0..size / 512) * 512;
            let max = (size - start).min(3 * cs) / 512;
            (start, rng.usize(1..=max) * 512)
        };
        let trace = std::env::var("SNAPMV_MODEL_TRACE").is_ok();
        if trace {
            eprintln!(
                "op {op}: r={r} off={off} len={len} live={live:?} rb={:?}",
                e.o().rollback_progress()
            );
        }
        match r {
            0..=29 if rng.u8(0..5) == 0 => {
                // Discard and write-zeroes: both read back as zeros (whole chunks become holes
                // or zero exceptions, partial ones are written).
                let v = e.o().volume();
                if trace {
                    eprintln!("  origin zero {off}+{len}");
                }
                let r = if rng.bool() {
                    v.discard(off as u64, len as u64)
                } else {
                    v.write_zeroes(off as u64, len as u64)
                };
                match r {
                    Ok(()) => m.origin[off..off + len].fill(0),
                    Err(Error::NoSpace { .. }) => {}
                    Err(err) => panic!("{}", ctx(op, &format!("origin discard: {err}"))),
                }
            }
            0..=29 => {
                let mut buf = vec![0u8; len];
                rng.fill(&mut buf);
                match e.o().volume().write(off as u64, &buf) {
                    Ok(()) => m.origin[off..off + len].copy_from_slice(&buf),
                    Err(Error::NoSpace { .. }) => {}
                    Err(err) => panic!("{}", ctx(op, &format!("origin write: {err}"))),
                }
            }
            30..=49 if !live.is_empty() => {
                let t = pick(&mut rng);
                let mut buf = vec![0u8; len];
                if rng.u8(0..4) == 0 {
                    buf.fill(0);
                    let v = e.o().snapshot_volume(t).unwrap();
                    if trace {
                        eprintln!("  snapshot {t} zero {off}+{len}");
                    }
                    let r = if rng.bool() {
                        v.discard(off as u64, len as u64)
                    } else {
                        v.write_zeroes(off as u64, len as u64)
                    };
                    match r {
                        Ok(()) => {
                            m.snaps.get_mut(&t).unwrap()[off..off + len].copy_from_slice(&buf)
                        }
                        Err(Error::NoSpace { .. }) => {}
                        Err(err) => {
                            panic!("{}", ctx(op, &format!("snapshot {t} write-zeroes: {err}")))
                        }
                    }
                } else {
                    rng.fill(&mut buf);
                    match e.o().snapshot_volume(t).unwrap().write(off as u64, &buf) {
                        Ok(()) => {
                            m.snaps.get_mut(&t).unwrap()[off..off + len].copy_from_slice(&buf)
                        }
                        Err(Error::NoSpace { .. }) => {}
                        Err(err) => panic!("{}", ctx(op, &format!("snapshot {t} write: {err}"))),
                    }
                }
            }
            50..=59 => {
                let mut buf = vec![0u8; len];
                e.o().volume().read(off as u64, &mut buf).unwrap();
                assert!(
                    buf == m.origin[off..off + len],
                    "{}",
                    ctx(op, &format!("origin read at {off}+{len} differs"))
                );
            }
            60..=69 if !live.is_empty() => {
                let t = pick(&mut rng);
                let mut buf = vec![0u8; len];
                e.o()
                    .snapshot_volume(t)
                    .unwrap()
                    .read(off as u64, &mut buf)
                    .unwrap();
                assert!(
                    buf == m.snaps[&t][off..off + len],
                    "{}",
                    ctx(op, &format!("snapshot {t} read at {off}+{len} differs"))
                );
            }
            70..=76 => {
                if r <= 72 {
                    // First writes right before the cut: their overlays are still pending
                    // (their copy-outs not durable yet), so the snapshot takes their chunks.
                    for _ in 0..rng.usize(1..=4) {
                        let start = rng.usize(0..size / 512) * 512;
                        let n = rng.usize(1..=((size - start).min(2 * cs) / 512)) * 512;
                        let mut buf = vec![0u8; n];
                        rng.fill(&mut buf);
                        match e.o().volume().write(start as u64, &buf) {
                            Ok(()) => m.origin[start..start + n].copy_from_slice(&buf),
                            Err(Error::NoSpace { .. }) => {}
                            Err(err) => panic!("{}", ctx(op, &format!("origin write: {err}"))),
                        }
                    }
                }
                let created = e.o().create_snapshot(None, "m");
                match created {
                    Ok(t) => {
                        assert!(!m.snaps.contains_key(&t), "{}", ctx(op, "tag reused"));
                        m.snaps.insert(t, m.origin.clone());
                    }
                    // (the rollback may have finished since)
                    Err(Error::Busy(msg)) => {
                        assert!(msg.contains("rolling back"), "{}", ctx(op, &msg))
                    }
                    Err(err) => panic!("{}", ctx(op, &format!("snapshot: {err}"))),
                }
            }
            77..=80 if !live.is_empty() => {
                let p = pick(&mut rng);
                let t = e.o().create_snapshot(Some(p), "").unwrap_or_else(|err| {
                    panic!("{}", ctx(op, &format!("snapshot of {p}: {err}")))
                });
                let content = m.snaps[&p].clone();
                m.snaps.insert(t, content);
            }
            81..=86 if !live.is_empty() => {
                let t = pick(&mut rng);
                e.o()
                    .delete_snapshot(t)
                    .unwrap_or_else(|err| panic!("{}", ctx(op, &format!("delete {t}: {err}"))));
                m.snaps.remove(&t);
                assert!(e.o().snapshot_volume(t).is_err());
            }
            87..=89 if !live.is_empty() => {
                let t = pick(&mut rng);
                match e.o().rollback(t) {
                    Ok(()) => m.origin = m.snaps[&t].clone(),
                    Err(Error::Busy(_)) => {}
                    Err(err) => panic!("{}", ctx(op, &format!("rollback {t}: {err}"))),
                }
            }
            90..=91 => wait_rollback(&e, &mut m),
            92..=93 => {
                e.close();
                e.open();
            }
            94..=95 => e.o().volume().flush().unwrap(),
            _ => {
                let mut buf = vec![0u8; size];
                e.o().volume().read(0, &mut buf).unwrap();
                if buf != m.origin {
                    let bad: Vec<usize> = (0..size / 512)
                        .filter(|s| buf[s * 512..(s + 1) * 512] != m.origin[s * 512..(s + 1) * 512])
                        .collect();
                    panic!(
                        "{}",
                        ctx(op, &format!("whole origin differs in sectors {bad:?}"))
                    );
                }
                for (t, content) in &m.snaps {
                    e.o()
                        .snapshot_volume(*t)
                        .unwrap()
                        .read(0, &mut buf)
                        .unwrap();
                    assert!(
                        &buf == content,
                        "{}",
                        ctx(op, &format!("whole snapshot {t} differs"))
                    );
                }
                let listed: Vec<u32> = e.o().snapshots().iter().map(|s| s.tag).collect();
                assert_eq!(
                    listed,
                    m.snaps.keys().copied().collect::<Vec<_>>(),
                    "{}",
                    ctx(op, "list")
                );
            }
        }
    }
    // Finish: let the rollback and reclaim run, then everything must still match and check clean.
    wait_rollback(&e, &mut m);
    e.close();
    let report = snapmv_engine::check_storage(e.store_st.as_ref(), false).unwrap();
    assert!(
        report.is_clean(),
        "{}",
        ctx(ops, &format!("check: {:?}", report.problems))
    );
    e.open();
    let mut buf = vec![0u8; size];
    e.o().volume().read(0, &mut buf).unwrap();
    assert!(buf == m.origin, "{}", ctx(ops, "final origin differs"));
    for (t, content) in &m.snaps {
        e.o()
            .snapshot_volume(*t)
            .unwrap()
            .read(0, &mut buf)
            .unwrap();
        assert!(
            &buf == content,
            "{}",
            ctx(ops, &format!("final snapshot {t} differs"))
        );
    }
    // Deleting everything frees every chunk once reclaim has run.
    for t in m.snaps.keys() {
        e.o().delete_snapshot(*t).unwrap();
    }
    e.store.as_ref().unwrap().unbind_origin("o").unwrap();
    let st = e.store.as_ref().unwrap().status();
    assert_eq!(
        st.chunks_used,
        0,
        "{}",
        ctx(ops, "chunks leaked after deleting everything")
    );
}

#[test]
fn model_random_operations() {
    if let Ok(seed) = std::env::var("SNAPMV_MODEL_SEED") {
        run_seed(seed.parse().unwrap(), env_u64("SNAPMV_MODEL_OPS", 5000));
        return;
    }
    let total = env_u64("SNAPMV_MODEL_OPS", 100_000);
    let per_seed = 2_000;
    let seeds = total.div_ceil(per_seed);
    for seed in 0..seeds {
        run_seed(seed, per_seed);
    }
}

#[test]
fn exclusive_chunks_count_what_delete_would_free() {
    let store_st = MemStorage::new("store", 8 << 20);
    let origin_st = MemStorage::new("origin", 16 * 4096);
    // Data, not zeros: a copy-out of zeros costs no store chunk (see the test below).
    origin_st.data.lock().unwrap().fill(7);
    Store::format_storage(store_st.as_ref(), &FormatOptions::default()).unwrap();
    let store = Store::open_storage(store_st as Arc<dyn Storage>).unwrap();
    let o = store
        .bind_origin_storage("o", origin_st as Arc<dyn Storage>)
        .unwrap();
    let a = o.create_snapshot(None, "").unwrap();
    // Origin writes to chunks 0..4 copy them out once, for A alone.
    o.volume().write(0, &[1u8; 4 * 4096]).unwrap();
    // (Written out first: a snapshot cut while overlays exist would own their chunks.)
    o.volume().flush().unwrap();
    let b = o.create_snapshot(None, "").unwrap();
    // Chunks 0..2 again: copies for B alone. A's own write to chunk 9: A's.
    o.volume().write(0, &[2u8; 2 * 4096]).unwrap();
    o.snapshot_volume(a)
        .unwrap()
        .write(9 * 4096, &[3u8; 4096])
        .unwrap();
    let ex = |t: u32| {
        o.snapshots()
            .iter()
            .find(|s| s.tag == t)
            .unwrap()
            .exclusive_chunks
    };
    let shared = |t: u32| {
        o.snapshots()
            .iter()
            .find(|s| s.tag == t)
            .unwrap()
            .shared_chunks
    };
    assert_eq!(ex(a), 5);
    assert_eq!(ex(b), 2);
    assert_eq!((shared(a), shared(b)), (0, 0));
    // A snapshot of B shares B's view: nothing of B is B's alone any more.
    let c = o.create_snapshot(Some(b), "").unwrap();
    assert_eq!(ex(b), 0);
    assert_eq!(ex(c), 0);
    assert_eq!((shared(b), shared(c)), (2, 2));
    // Overlays' store copies (acknowledged first writes not yet on the origin) count as used
    // until they are written out: a flush settles them.
    o.volume().flush().unwrap();
    let used = store.status().chunks_used;
    o.delete_snapshot(a).unwrap();
    for _ in 0..500 {
        if store.status().chunks_used == used - 5 {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    panic!(
        "deleting A freed {} chunks, expected 5",
        used - store.status().chunks_used
    );
}
