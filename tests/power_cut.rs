//! Power cut under concurrent load (issue 7, item 2), the multi-threaded counterpart of the
//! engine's single-threaded crates/engine/tests/crash.rs.
//!
//! The store and the origin sit on a recording storage (`snapmv_engine::testing`, feature `test-support`) that keeps
//! what was synced apart from what was only written. Each round: an origin writer and two
//! snapshot writers (4 KiB blocks stamped with writer, block and sequence number; flushes now
//! and then) run on their own threads while another thread creates snapshots (of the origin
//! and of a snapshot), deletes them and starts rollbacks. At a random instant the power is cut:
//! all writes are frozen at once and several crash images are built, each keeping a random
//! subset of the unsynced writes (whole, lost or torn at sector boundaries). Each image must:
//! check clean; open; hold every write acknowledged before an acknowledged flush of its volume
//! (or a later one); keep every snapshot made by `create_snapshot_sync` exactly as it was
//! created, and every other one (answered when written, not durable) either gone or holding,
//! block by block, a content its volume could have shown after a crash at the cut (every
//! write flushed before it; README "Crash behaviour"); show a rollback that returned in
//! effect; finish any rollback; check clean again after it is closed. Creates and deletes are
//! durable (`*_sync`) or not at random; a delete that was not may be undone by the cut.
//!
//! `SNAPMV_POWER_ROUNDS` (default 40) rounds, `SNAPMV_POWER_IMAGES` (default 3) images per cut,
//! `SNAPMV_POWER_SEED` to replay.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use snapmv_engine::testing::{MemStorage, RecordingStorage};
use snapmv_engine::{check_storage, Error, FormatOptions, Origin, Store};
use snapmv_tests::crash_model::{Content, VolModel};
use snapmv_tests::env_u64;

const BLOCK: usize = 4096;
const BLOCKS: usize = 64;
const STORE_SIZE: usize = 8 << 20;
const MAGIC: u64 = 0x504f_5745_5243_5554; // "POWERCUT"
const MAX_SNAPS: usize = 4;
const ORIGIN_ID: &str = "origin";

const SECTOR: usize = 512;
const SECTORS: usize = BLOCK / SECTOR;

/// Every 512-byte sector identifies itself (a power cut may keep some sectors of a write only).
fn fill_block(buf: &mut [u8], vol: u64, block: u64, seq: u64) {
    for (s, sec) in buf.chunks_exact_mut(SECTOR).enumerate() {
        let mut x =
            seq.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (block << 32) ^ vol ^ (s as u64) << 8 ^ 1;
        for (i, w) in sec.chunks_exact_mut(8).enumerate() {
            let v = match i {
                0 => MAGIC,
                1 => vol,
                2 => block,
                3 => seq,
                4 => s as u64,
                _ => {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x
                }
            };
            w.copy_from_slice(&v.to_le_bytes());
        }
    }
}

/// What each sector of a block read back holds.
fn decode_block(buf: &[u8], block: u64) -> Result<Vec<Content>, String> {
    let mut want = vec![0u8; BLOCK];
    buf.chunks_exact(SECTOR)
        .enumerate()
        .map(|(s, sec)| {
            if sec.iter().all(|&b| b == 0) {
                return Ok(Content::Zero);
            }
            let word = |i: usize| u64::from_le_bytes(sec[i * 8..i * 8 + 8].try_into().unwrap());
            let (vol, b, seq) = (word(1), word(2), word(3));
            if word(0) != MAGIC || b != block || word(4) != s as u64 {
                return Err(format!(
                    "block {block} sector {s}: garbage (header {:x?})",
                    &sec[..40]
                ));
            }
            fill_block(&mut want, vol, b, seq);
            if want[s * SECTOR..(s + 1) * SECTOR] != *sec {
                return Err(format!(
                    "block {block} sector {s}: write {seq} of writer {vol} is mixed"
                ));
            }
            Ok(Content::W { vol, seq })
        })
        .collect()
}

/// Adds to `bad` the problems of volume `what` read back as `got` (sectors per block).
fn check_volume(model: &VolModel, what: &str, got: &[Vec<Content>], bad: &mut Vec<String>) {
    for (b, secs) in got.iter().enumerate() {
        for (s, c) in secs.iter().enumerate() {
            if let Some(why) = model.violation(b, c) {
                bad.push(format!("{what} block {b} sector {s}: {why}"));
            }
        }
    }
}

/// What a snapshot must hold: exactly `content` if its create was durable, else what its
/// volume's `model` at the create allows after a crash.
#[derive(Clone)]
struct Snap {
    content: Vec<Content>,
    model: VolModel,
    durable: bool,
}

struct Shared {
    vols: [Mutex<VolModel>; 3],
    gates: [Mutex<()>; 3],
    tags: [u32; 3],
    snaps: Mutex<BTreeMap<u32, Snap>>,
    pending_create: Mutex<Option<Snap>>,
    pending_delete: Mutex<BTreeSet<u32>>,
    /// Deletes answered without a sync: a power cut may bring these back.
    undurable_deletes: Mutex<BTreeMap<u32, Snap>>,
    pending_rollback: Mutex<bool>,
    cut: AtomicBool,
    failures: Mutex<Vec<String>>,
    stats: Mutex<[u64; 5]>, // writes, flushes, creates, deletes, rollbacks
}

fn writer(sh: Arc<Shared>, o: Origin, vol: usize, seed: u64) {
    let mut rng = fastrand::Rng::with_seed(seed);
    let v = if vol == 0 {
        o.volume()
    } else {
        o.snapshot_volume(sh.tags[vol]).unwrap()
    };
    let mut buf = vec![0u8; BLOCK];
    let mut seq = 0;
    while !sh.cut.load(Ordering::SeqCst) {
        let _g = sh.gates[vol].lock().unwrap();
        if rng.u8(0..6) == 0 {
            let at_issue = sh.vols[vol].lock().unwrap().last_acked.clone();
            match v.flush() {
                Ok(()) => {
                    let mut m = sh.vols[vol].lock().unwrap();
                    for (f, a) in m.floor.iter_mut().zip(at_issue) {
                        *f = (*f).max(a);
                    }
                    sh.stats.lock().unwrap()[1] += 1;
                }
                Err(e) => sh.fail(format!("flush of volume {vol}: {e}")),
            }
        } else {
            seq += 1;
            let b = rng.usize(0..BLOCKS);
            fill_block(&mut buf, vol as u64, b as u64, seq);
            let idx = {
                let mut m = sh.vols[vol].lock().unwrap();
                m.hist[b].push(Content::W {
                    vol: vol as u64,
                    seq,
                });
                m.hist[b].len() - 1
            };
            match v.write((b * BLOCK) as u64, &buf) {
                Ok(()) => {
                    sh.vols[vol].lock().unwrap().last_acked[b] = idx;
                    sh.stats.lock().unwrap()[0] += 1;
                }
                Err(e) => sh.fail(format!("write of volume {vol} block {b}: {e}")),
            }
        }
    }
}

impl Shared {
    fn fail(&self, m: String) {
        if !self.cut.load(Ordering::SeqCst) {
            self.failures.lock().unwrap().push(m);
        }
    }
}

fn busy(e: &Error) -> bool {
    matches!(e, Error::Busy(_))
}

fn ops(sh: Arc<Shared>, o: Origin, seed: u64) {
    let mut rng = fastrand::Rng::with_seed(seed);
    while !sh.cut.load(Ordering::SeqCst) {
        thread::sleep(Duration::from_micros(rng.u64(0..2000)));
        let n = sh.snaps.lock().unwrap().len();
        let op = rng.u8(0..10);
        if (op < 4 && n < MAX_SNAPS) || n == 0 {
            // Of the origin (0) or of snapshot volume 1 or 2.
            let vol = if n == 0 { 0 } else { rng.usize(0..3) };
            let _g = sh.gates[vol].lock().unwrap();
            let model = sh.vols[vol].lock().unwrap().clone();
            let sync = rng.bool();
            let mut snap = Snap {
                content: model.latest(),
                model,
                durable: false,
            };
            *sh.pending_create.lock().unwrap() = Some(snap.clone());
            let of = (vol > 0).then(|| sh.tags[vol]);
            let r = if sync {
                o.create_snapshot_sync(of, "p")
            } else {
                o.create_snapshot(of, "p")
            };
            match r {
                Ok(tag) => {
                    snap.durable = sync;
                    sh.snaps.lock().unwrap().insert(tag, snap);
                    sh.stats.lock().unwrap()[2] += 1;
                }
                Err(e) if busy(&e) => {}
                Err(e) => sh.fail(format!("create_snapshot of volume {vol}: {e}")),
            }
            *sh.pending_create.lock().unwrap() = None;
        } else if op < 7 {
            let tags: Vec<u32> = sh.snaps.lock().unwrap().keys().copied().collect();
            let tag = tags[rng.usize(0..tags.len())];
            sh.pending_delete.lock().unwrap().insert(tag);
            let sync = rng.bool();
            let r = if sync {
                o.delete_snapshot_sync(tag)
            } else {
                o.delete_snapshot(tag)
            };
            match r {
                Ok(()) => {
                    let snap = sh.snaps.lock().unwrap().remove(&tag);
                    if let (false, Some(snap)) = (sync, snap) {
                        sh.undurable_deletes.lock().unwrap().insert(tag, snap);
                    }
                    sh.stats.lock().unwrap()[3] += 1;
                }
                Err(e) if busy(&e) => {}
                Err(e) => sh.fail(format!("delete_snapshot {tag}: {e}")),
            }
            sh.pending_delete.lock().unwrap().remove(&tag);
        } else {
            let _g = sh.gates[0].lock().unwrap();
            let snaps = sh.snaps.lock().unwrap();
            let tags: Vec<u32> = snaps.keys().copied().collect();
            let tag = tags[rng.usize(0..tags.len())];
            let content = snaps[&tag].content.clone();
            drop(snaps);
            let idx: Vec<usize> = {
                let mut m = sh.vols[0].lock().unwrap();
                content
                    .iter()
                    .enumerate()
                    .map(|(b, c)| {
                        m.hist[b].push(*c);
                        m.hist[b].len() - 1
                    })
                    .collect()
            };
            *sh.pending_rollback.lock().unwrap() = true;
            let r = o.rollback(tag);
            let mut m = sh.vols[0].lock().unwrap();
            match r {
                Ok(()) => {
                    for (b, i) in idx.into_iter().enumerate() {
                        m.floor[b] = i;
                        m.last_acked[b] = i;
                    }
                    sh.stats.lock().unwrap()[4] += 1;
                }
                Err(e) => {
                    for h in m.hist.iter_mut() {
                        h.pop();
                    }
                    if !busy(&e) {
                        sh.fail(format!("rollback to {tag}: {e}"));
                    }
                }
            }
            *sh.pending_rollback.lock().unwrap() = false;
        }
    }
}

fn read_all(v: &snapmv_engine::Volume, what: &str, bad: &mut Vec<String>) -> Vec<Vec<Content>> {
    let mut buf = vec![0u8; BLOCK];
    (0..BLOCKS)
        .map(|b| {
            if let Err(e) = v.read((b * BLOCK) as u64, &mut buf) {
                bad.push(format!("{what} block {b}: read failed: {e}"));
                return vec![Content::Zero; SECTORS];
            }
            decode_block(&buf, b as u64).unwrap_or_else(|e| {
                bad.push(format!("{what}: {e}"));
                vec![Content::Zero; SECTORS]
            })
        })
        .collect()
}

struct Cut {
    store: Vec<u8>,
    origin: Vec<u8>,
}

/// Opens one crash image and checks it against the models frozen at the cut.
fn verify(
    img: Cut,
    vols: &[VolModel],
    tags: [u32; 3],
    snaps: &BTreeMap<u32, Snap>,
    pending_create: &Option<Snap>,
    pending_delete: &BTreeSet<u32>,
    undurable_deletes: &BTreeMap<u32, Snap>,
) -> Vec<String> {
    let mut bad = Vec::new();
    // A power cut: the machine reboots, so unsynced writes are not trusted.
    let st = MemStorage::from_bytes_rebooted("store", img.store);
    match check_storage(&*st, false) {
        Ok(r) if r.is_clean() => {}
        Ok(r) => bad.push(format!("check after the cut: {:?}", r.problems)),
        Err(e) => bad.push(format!("check after the cut: {e}")),
    }
    if !bad.is_empty() {
        return bad;
    }
    let store = match Store::open_storage(st.clone()) {
        Ok(s) => s,
        Err(e) => return vec![format!("open after the cut: {e}")],
    };
    let o = match store.open_origin_storage(
        ORIGIN_ID,
        MemStorage::from_bytes_rebooted("origin", img.origin),
    ) {
        Ok(o) => o,
        Err(e) => return vec![format!("open origin after the cut: {e}")],
    };
    // Reads right away (a rollback in progress already reads as its snapshot).
    let got0 = read_all(&o.volume(), "origin", &mut bad);
    check_volume(&vols[0], "origin", &got0, &mut bad);
    for vol in 1..3 {
        match o.snapshot_volume(tags[vol]) {
            Ok(v) => {
                let got = read_all(&v, &format!("snapshot {}", tags[vol]), &mut bad);
                check_volume(
                    &vols[vol],
                    &format!("snapshot {} (written)", tags[vol]),
                    &got,
                    &mut bad,
                );
            }
            Err(e) => bad.push(format!("written snapshot {}: {e}", tags[vol])),
        }
    }
    let listed: BTreeSet<u32> = o
        .snapshots()
        .iter()
        .map(|s| s.tag)
        .filter(|t| !tags.contains(t))
        .collect();
    let mut want = snaps.clone();
    for (t, s) in snaps {
        if !listed.contains(t) && !pending_delete.contains(t) && s.durable {
            bad.push(format!("snapshot {t} vanished"));
            want.remove(t);
        } else if !listed.contains(t) {
            want.remove(t);
        }
    }
    for t in &listed {
        if !want.contains_key(t) {
            match (undurable_deletes.get(t), pending_create) {
                (Some(s), _) => {
                    want.insert(*t, s.clone());
                }
                // Not answered: not durable, even if it was to be.
                (None, Some(s)) => {
                    want.insert(
                        *t,
                        Snap {
                            durable: false,
                            ..s.clone()
                        },
                    );
                }
                (None, None) => bad.push(format!("snapshot {t} appeared from nowhere")),
            }
        }
    }
    for (t, w) in &want {
        match o.snapshot_volume(*t) {
            Ok(v) => {
                let got = read_all(&v, &format!("snapshot {t}"), &mut bad);
                if !w.durable {
                    check_volume(
                        &w.model,
                        &format!("snapshot {t} (not durable when the power went)"),
                        &got,
                        &mut bad,
                    );
                    continue;
                }
                for (b, (g, w)) in got.iter().zip(&w.content).enumerate() {
                    if g.iter().any(|s| s != w) {
                        bad.push(format!(
                            "snapshot {t} block {b}: {g:?}, was {w:?} when taken"
                        ));
                    }
                }
            }
            Err(e) => bad.push(format!("snapshot {t}: {e}")),
        }
    }
    if let Err(e) = o.wait_rollback() {
        bad.push(format!("rollback after the cut: {e}"));
    }
    let again = read_all(&o.volume(), "origin after the rollback", &mut bad);
    if again != got0 {
        bad.push("the origin changed when the rollback finished".into());
    }
    drop(o);
    drop(store);
    match check_storage(&*st, false) {
        Ok(r) if r.is_clean() => {}
        Ok(r) => bad.push(format!("check after reopening: {:?}", r.problems)),
        Err(e) => bad.push(format!("check after reopening: {e}")),
    }
    bad
}

#[test]
fn power_cut_under_concurrent_load() {
    let rounds = env_u64("SNAPMV_POWER_ROUNDS", 40);
    let images = env_u64("SNAPMV_POWER_IMAGES", 3);
    let seed = env_u64("SNAPMV_POWER_SEED", fastrand::u64(..));
    eprintln!("power_cut: {rounds} rounds x {images} images, SNAPMV_POWER_SEED={seed}");
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut totals = [0u64; 5];
    let mut cuts_mid_rollback = 0;
    for round in 0..rounds {
        let world = Arc::new(Mutex::new(()));
        let st = RecordingStorage::new(&world, "store", vec![0; STORE_SIZE]);
        let og = RecordingStorage::new(&world, "origin", vec![0; BLOCKS * BLOCK]);
        Store::format_storage(&*st, &FormatOptions::default()).unwrap();
        let store = Store::open_storage(st.clone()).unwrap();
        let o = store.bind_origin_storage(ORIGIN_ID, og.clone()).unwrap();
        // Durable: `verify` requires the written snapshots after any cut (a create answered
        // when written may be undone by a cut before the next commit round).
        let t1 = o.create_snapshot_sync(None, "w1").unwrap();
        let t2 = o.create_snapshot_sync(None, "w2").unwrap();
        let zero = vec![Content::Zero; BLOCKS];
        let sh = Arc::new(Shared {
            vols: [
                Mutex::new(VolModel::new(&zero)),
                Mutex::new(VolModel::new(&zero)),
                Mutex::new(VolModel::new(&zero)),
            ],
            gates: [Mutex::new(()), Mutex::new(()), Mutex::new(())],
            tags: [0, t1, t2],
            snaps: Mutex::new(BTreeMap::new()),
            pending_create: Mutex::new(None),
            pending_delete: Mutex::new(BTreeSet::new()),
            undurable_deletes: Mutex::new(BTreeMap::new()),
            pending_rollback: Mutex::new(false),
            cut: AtomicBool::new(false),
            failures: Mutex::new(Vec::new()),
            stats: Mutex::new([0; 5]),
        });
        let mut threads = Vec::new();
        for vol in 0..3 {
            let (sh, o, s) = (sh.clone(), o.clone(), rng.u64(..));
            threads.push(thread::spawn(move || writer(sh, o, vol, s)));
        }
        {
            let (sh, o, s) = (sh.clone(), o.clone(), rng.u64(..));
            threads.push(thread::spawn(move || ops(sh, o, s)));
        }
        thread::sleep(Duration::from_millis(rng.u64(5..150)));

        // The cut: no storage write or sync can happen while `world` is held.
        let guard = world.lock().unwrap();
        let vols: Vec<VolModel> = sh.vols.iter().map(|m| m.lock().unwrap().clone()).collect();
        let snaps = sh.snaps.lock().unwrap().clone();
        let pending_create = sh.pending_create.lock().unwrap().clone();
        let pending_delete = sh.pending_delete.lock().unwrap().clone();
        let undurable_deletes = sh.undurable_deletes.lock().unwrap().clone();
        let mid_rollback = *sh.pending_rollback.lock().unwrap();
        let cuts: Vec<Cut> = (0..images)
            .map(|_| Cut {
                store: st.crash_image(&mut rng),
                origin: og.crash_image(&mut rng),
            })
            .collect();
        sh.cut.store(true, Ordering::SeqCst);
        drop(guard);
        // (Engine calls only after the cut: an engine thread may hold its locks while it
        // waits for the storage.)
        let mid_rollback = mid_rollback || o.rollback_progress().is_some();
        for t in threads {
            t.join().expect("a test thread panicked");
        }
        let fails = sh.failures.lock().unwrap().clone();
        assert!(fails.is_empty(), "round {round} (seed {seed}): {fails:#?}");
        drop(o);
        drop(store);
        cuts_mid_rollback += u64::from(mid_rollback);
        for (i, img) in cuts.into_iter().enumerate() {
            let bad = verify(
                img,
                &vols,
                sh.tags,
                &snaps,
                &pending_create,
                &pending_delete,
                &undurable_deletes,
            );
            assert!(
                bad.is_empty(),
                "round {round} image {i} (SNAPMV_POWER_SEED={seed}):\n{}",
                bad.join("\n")
            );
        }
        for (t, s) in totals.iter_mut().zip(sh.stats.lock().unwrap().iter()) {
            *t += s;
        }
    }
    eprintln!(
        "power_cut: {rounds} cuts, {} images verified ({cuts_mid_rollback} cuts during a rollback); \
         writes {}, flushes {}, creates {}, deletes {}, rollbacks {}",
        rounds * images,
        totals[0],
        totals[1],
        totals[2],
        totals[3],
        totals[4]
    );
}
