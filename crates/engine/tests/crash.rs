//! Crash-point test: a recording storage layer captures every write and sync of the origin
//! and the store. At many points (between operations, while the commit and background threads
//! run) the test cuts power: it rebuilds the images a crash would leave (writes since the last
//! sync dropped in random subsets, or torn at sector boundaries; or, for a process kill, all
//! of them), reopens, runs `check`, and verifies the crash contract against a model:
//! every sector of every volume holds its value as of the volume's last completed flush or a
//! value written after it; snapshots that were created exist, deleted ones do not; a rollback
//! that returned is in effect. Creates and deletes are durable (`*_sync`) or not at random:
//! one that was not is exact after a kill, and after a power cut it may be undone until a
//! flush or a durable create or delete follows (a snapshot created so holds, sector by sector,
//! what its source could have shown after a crash at the cut). `SNAPMV_CRASH_OPS` sets the operation count per seed,
//! `SNAPMV_CRASH_SEEDS` the number of seeds. A quarter of the writes are discards or
//! write-zeroes, which must keep the contract of a write of zeros.

mod common;

use common::{env_u64, MemStorage, RecordingStorage};
use snapmv_engine::{Error, FormatOptions, Origin, Storage, Store};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

const SECTOR: usize = 512;

fn h(b: &[u8]) -> u64 {
    // FNV-1a: a fingerprint of a sector's content.
    b.iter().fold(0xcbf29ce484222325u64, |a, &x| {
        (a ^ x as u64).wrapping_mul(0x100000001b3)
    })
}

/// What a volume may hold after a crash, sector by sector.
#[derive(Clone)]
struct Expect {
    current: Vec<u8>,
    flushed: Vec<u64>,
    pending: Vec<Vec<u64>>,
}

impl Expect {
    fn new(content: Vec<u8>) -> Self {
        let n = content.len() / SECTOR;
        let flushed = (0..n)
            .map(|s| h(&content[s * SECTOR..(s + 1) * SECTOR]))
            .collect();
        Expect {
            current: content,
            flushed,
            pending: vec![Vec::new(); n],
        }
    }
    fn write(&mut self, off: usize, data: &[u8]) {
        self.current[off..off + data.len()].copy_from_slice(data);
        for (i, sec) in data.chunks(SECTOR).enumerate() {
            self.pending[off / SECTOR + i].push(h(sec));
        }
    }
    fn flush(&mut self) {
        *self = Expect::new(std::mem::take(&mut self.current));
    }
    fn verify_exact(&self, got: &[u8], what: &str) -> Result<(), String> {
        match got
            .chunks(SECTOR)
            .zip(self.current.chunks(SECTOR))
            .position(|(g, c)| g != c)
        {
            None => Ok(()),
            Some(s) => Err(format!(
                "{what}: sector {s} lost an acknowledged write (holds older data)"
            )),
        }
    }
    fn verify(&self, got: &[u8], what: &str) -> Result<(), String> {
        for (s, sec) in got.chunks(SECTOR).enumerate() {
            let v = h(sec);
            if v != self.flushed[s] && !self.pending[s].contains(&v) {
                return Err(format!("{what}: sector {s} holds data that was never written there since its last flush"));
            }
        }
        Ok(())
    }
}

struct Sim {
    world: Arc<Mutex<()>>,
    store_st: Arc<RecordingStorage>,
    origin_st: Arc<RecordingStorage>,
    origin: Origin,
    _store: Store,
    vols: BTreeMap<u32, Expect>, // 0 = origin
    rollback_to: Option<u32>,
    /// Snapshots created without a sync and not made durable since: a power cut may undo them.
    unsure_created: std::collections::BTreeSet<u32>,
    /// Snapshots deleted so: a power cut may bring them back, as they were.
    unsure_deleted: BTreeMap<u32, Expect>,
}

impl Sim {
    /// Every create and delete so far is durable (a flush or a durable operation ran).
    fn all_durable(&mut self) {
        self.unsure_created.clear();
        self.unsure_deleted.clear();
    }
}

fn verify_crash(sim: &Sim, rng: &mut fastrand::Rng, kill: bool, ctx: &str) -> Result<(), String> {
    let (store_img, origin_img, in_rollback) = {
        let _w = sim.world.lock().unwrap();
        let rb = sim.origin.rollback_progress().is_some();
        if kill {
            (sim.store_st.kill_image(), sim.origin_st.kill_image(), rb)
        } else {
            (
                sim.store_st.crash_image(rng),
                sim.origin_st.crash_image(rng),
                rb,
            )
        }
    };
    let _ = in_rollback;
    // A kill leaves the page cache (same boot); a power cut reboots the machine.
    let (store, origin) = if kill {
        (
            MemStorage::from_bytes("crash-store", store_img),
            MemStorage::from_bytes("crash-origin", origin_img),
        )
    } else {
        (
            MemStorage::from_bytes_rebooted("crash-store", store_img),
            MemStorage::from_bytes_rebooted("crash-origin", origin_img),
        )
    };
    let report = snapmv_engine::check_storage(store.as_ref(), false)
        .map_err(|e| format!("{ctx}: check: {e}"))?;
    if !report.is_clean() {
        return Err(format!("{ctx}: check after crash: {:?}", report.problems));
    }
    let st = Store::open_storage(store.clone() as Arc<dyn Storage>)
        .map_err(|e| format!("{ctx}: reopen: {e}"))?;
    let o = st
        .open_origin_storage("o", origin as Arc<dyn Storage>)
        .map_err(|e| format!("{ctx}: reopen origin: {e}"))?;
    let tags: Vec<u32> = o.snapshots().iter().map(|s| s.tag).collect();
    let want: Vec<u32> = sim.vols.keys().copied().filter(|t| *t != 0).collect();
    // After a power cut, creates and deletes that were not durable may be undone.
    let mut vols = sim.vols.clone();
    if !kill {
        vols.retain(|t, _| *t == 0 || tags.contains(t) || !sim.unsure_created.contains(t));
        for (t, e) in &sim.unsure_deleted {
            if tags.contains(t) {
                vols.insert(*t, e.clone());
            }
        }
    }
    let got: Vec<u32> = vols.keys().copied().filter(|t| *t != 0).collect();
    if tags != got {
        return Err(format!(
            "{ctx}: snapshots after crash {tags:?}, expected {want:?} (not durable: created {:?}, deleted {:?})",
            sim.unsure_created,
            sim.unsure_deleted.keys().collect::<Vec<_>>()
        ));
    }
    let size = o.size() as usize;
    let mut buf = vec![0u8; size];
    for (t, exp) in &vols {
        let v = if *t == 0 {
            o.volume()
        } else {
            o.snapshot_volume(*t).unwrap()
        };
        v.read(0, &mut buf)
            .map_err(|e| format!("{ctx}: read {t}: {e}"))?;
        exp.verify(&buf, &format!("{ctx}: {}", v.name()))?;
        if kill {
            // The death of the process loses nothing acknowledged, flushed or not.
            exp.verify_exact(&buf, &format!("{ctx}: {} after a kill", v.name()))?;
        }
    }
    // A rollback in progress finishes after the crash and leaves the origin as promised.
    o.wait_rollback()
        .map_err(|e| format!("{ctx}: rollback after crash: {e}"))?;
    o.volume().read(0, &mut buf).unwrap();
    sim.vols[&0].verify(&buf, &format!("{ctx}: origin after the resumed rollback"))?;
    drop(o);
    drop(st);
    let report = snapmv_engine::check_storage(store.as_ref(), false).unwrap();
    if !report.is_clean() {
        return Err(format!(
            "{ctx}: check after recovery: {:?}",
            report.problems
        ));
    }
    Ok(())
}

fn run_seed(seed: u64, ops: u64) -> u64 {
    let mut rng = fastrand::Rng::with_seed(seed);
    let cs = 4096usize;
    let size = rng.usize(4..24) * cs;
    let world = Arc::new(Mutex::new(()));
    let mut initial = vec![0u8; size];
    rng.fill(&mut initial);
    // Some chunks start as zeros: their copy-outs are zero exceptions.
    for c in 0..size / cs {
        if rng.u8(0..4) == 0 {
            initial[c * cs..(c + 1) * cs].fill(0);
        }
    }
    let store_st = RecordingStorage::new(&world, "store", vec![0; (4 << 20) + 64 * cs]);
    let origin_st = RecordingStorage::new(&world, "origin", initial.clone());
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
    let mut sim = Sim {
        world,
        store_st,
        origin_st,
        origin,
        _store: store,
        vols: BTreeMap::from([(0, Expect::new(initial))]),
        rollback_to: None,
        unsure_created: Default::default(),
        unsure_deleted: Default::default(),
    };
    // The bind is durable; the origin's initial content is its flushed state.
    let mut crash_points = 0;
    for op in 0..ops {
        let ctx = format!("seed {seed} op {op} (replay: SNAPMV_CRASH_SEED={seed})");
        let tags: Vec<u32> = sim.vols.keys().copied().filter(|t| *t != 0).collect();
        let r = rng.u32(0..100);
        if std::env::var("SNAPMV_CRASH_TRACE").is_ok() {
            eprintln!(
                "op {op}: r {r} tags {tags:?} unsure {:?} {:?}",
                sim.unsure_created,
                sim.unsure_deleted.keys()
            );
        }
        match r {
            0..=44 => {
                let t = if tags.is_empty() || rng.bool() {
                    0
                } else {
                    tags[rng.usize(..tags.len())]
                };
                let off = rng.usize(0..size / SECTOR) * SECTOR;
                let len = rng.usize(1..=((size - off).min(2 * cs) / SECTOR)) * SECTOR;
                let mut data = vec![0u8; len];
                // One in four: discard or write-zeroes (a hole in the origin, zero exceptions
                // on a snapshot), which must behave as a write of zeros.
                let zero = rng.u8(0..4);
                if zero > 1 {
                    rng.fill(&mut data);
                }
                let v = if t == 0 {
                    sim.origin.volume()
                } else {
                    sim.origin.snapshot_volume(t).unwrap()
                };
                if std::env::var("SNAPMV_CRASH_TRACE").is_ok() {
                    eprintln!("write vol {t} off {off} len {len} zero {}", zero <= 1);
                }
                let r = match zero {
                    0 => v.discard(off as u64, len as u64),
                    1 => v.write_zeroes(off as u64, len as u64),
                    _ => v.write(off as u64, &data),
                };
                match r {
                    Ok(()) => sim.vols.get_mut(&t).unwrap().write(off, &data),
                    Err(Error::NoSpace { .. }) => {}
                    Err(e) => panic!("{ctx}: write: {e}"),
                }
            }
            45..=59 => {
                let t = if tags.is_empty() || rng.bool() {
                    0
                } else {
                    tags[rng.usize(..tags.len())]
                };
                let v = if t == 0 {
                    sim.origin.volume()
                } else {
                    sim.origin.snapshot_volume(t).unwrap()
                };
                if std::env::var("SNAPMV_CRASH_TRACE").is_ok() {
                    eprintln!("flush vol {t}");
                }
                v.flush().unwrap_or_else(|e| panic!("{ctx}: flush: {e}"));
                sim.vols.get_mut(&t).unwrap().flush();
                sim.all_durable();
            }
            60..=69 => {
                let of = if tags.is_empty() || rng.bool() {
                    None
                } else {
                    Some(tags[rng.usize(..tags.len())])
                };
                let sync = rng.bool();
                let r = if sync {
                    sim.origin.create_snapshot_sync(of, "")
                } else {
                    sim.origin.create_snapshot(of, "")
                };
                if std::env::var("SNAPMV_CRASH_TRACE").is_ok() {
                    eprintln!(
                        "create of {of:?} sync {sync}: {:?}",
                        r.as_ref().map_err(|e| e.to_string())
                    );
                }
                match r {
                    Ok(t) => {
                        let src = of.unwrap_or(0);
                        if sync {
                            // A snapshot holds what its source held, durably. The source of a
                            // snapshot of a snapshot is durable too (a commit round); the
                            // origin is not flushed (its overlays survive the cut).
                            if src != 0 {
                                sim.vols.get_mut(&src).unwrap().flush();
                            }
                            let content = sim.vols[&src].current.clone();
                            sim.vols.insert(t, Expect::new(content));
                            sim.all_durable();
                        } else {
                            // Exactly the source after a kill; after a power cut, what the
                            // source could have shown at the cut.
                            let e = sim.vols[&src].clone();
                            sim.vols.insert(t, e);
                            sim.unsure_created.insert(t);
                        }
                    }
                    Err(Error::Busy(_)) => {}
                    Err(e) => panic!("{ctx}: snapshot: {e}"),
                }
            }
            70..=76 if !tags.is_empty() => {
                let t = tags[rng.usize(..tags.len())];
                let sync = rng.bool();
                let r = if sync {
                    sim.origin.delete_snapshot_sync(t)
                } else {
                    sim.origin.delete_snapshot(t)
                };
                r.unwrap_or_else(|e| panic!("{ctx}: delete: {e}"));
                let e = sim.vols.remove(&t).unwrap();
                if sync {
                    sim.all_durable();
                } else {
                    // (Undone or not: its create may have been durable or not either.)
                    sim.unsure_created.remove(&t);
                    sim.unsure_deleted.insert(t, e);
                }
            }
            77..=80 if !tags.is_empty() => {
                let t = tags[rng.usize(..tags.len())];
                match sim.origin.rollback(t) {
                    Ok(()) => {
                        sim.vols.get_mut(&t).unwrap().flush();
                        let content = sim.vols[&t].current.clone();
                        sim.vols.insert(0, Expect::new(content));
                        sim.rollback_to = Some(t);
                    }
                    Err(Error::Busy(_)) => {}
                    Err(e) => panic!("{ctx}: rollback: {e}"),
                }
            }
            81..=84 => {
                if let Err(Error::NoSpace { .. }) = sim.origin.wait_rollback() {
                    if let Some(&t) = tags.first() {
                        sim.origin.delete_snapshot(t).unwrap();
                        sim.vols.remove(&t);
                    }
                }
            }
            _ => {}
        }
        if rng.u32(0..100) < 15 {
            let kill = rng.u32(0..4) == 0;
            if std::env::var("SNAPMV_CRASH_TRACE").is_ok() {
                eprintln!("crash kill={kill}");
            }
            if let Err(e) = verify_crash(&sim, &mut rng, kill, &ctx) {
                panic!("{e}");
            }
            crash_points += 1;
        }
    }
    let _ = sim.rollback_to;
    crash_points
}

#[test]
fn crash_at_many_points_keeps_the_contract() {
    if let Ok(seed) = std::env::var("SNAPMV_CRASH_SEED") {
        run_seed(seed.parse().unwrap(), env_u64("SNAPMV_CRASH_OPS", 400));
        return;
    }
    let seeds = env_u64("SNAPMV_CRASH_SEEDS", 12);
    let ops = env_u64("SNAPMV_CRASH_OPS", 400);
    let mut points = 0;
    for seed in 0..seeds {
        points += run_seed(seed, ops);
    }
    eprintln!("crash test: {seeds} seeds x {ops} ops, {points} crash points verified");
    assert!(points > 0);
}
