//! Concurrency: threads write the origin and a snapshot while another thread creates and
//! deletes snapshots. Afterwards every snapshot of the origin must be a point-in-time cut of
//! each writer's history, and every volume must hold what its writers know they wrote.
//! `SNAPMV_CONC_WRITES` sets the writes per thread.

mod common;

use common::{env_u64, MemStorage};
use snapmv_engine::{FormatOptions, Storage, Store};
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{Arc, Mutex};

const SECTOR: usize = 512;
const SECTORS: usize = 512; // 256 KiB origin, 64 chunks of 4 KiB

fn block(writer: u64, seq: u64) -> Vec<u8> {
    let mut b = vec![0u8; SECTOR];
    for (i, w) in b.chunks_mut(16).enumerate() {
        w[..8].copy_from_slice(&writer.to_le_bytes());
        w[8..].copy_from_slice(&(seq ^ i as u64).to_le_bytes());
    }
    b
}

fn decode(b: &[u8]) -> (u64, u64) {
    let w = u64::from_le_bytes(b[..8].try_into().unwrap());
    let s = u64::from_le_bytes(b[8..16].try_into().unwrap());
    assert_eq!(b, &block(w, s)[..], "torn sector");
    (w, s)
}

#[test]
fn writers_and_snapshot_operations_at_once() {
    let writes = env_u64("SNAPMV_CONC_WRITES", 30000);
    let store_st = MemStorage::new("store", (4 << 20) + 2048 * 4096);
    let origin_st = MemStorage::new("origin", SECTORS * SECTOR);
    Store::format_storage(store_st.as_ref(), &FormatOptions::default()).unwrap();
    let store = Store::open_storage(store_st.clone() as Arc<dyn Storage>).unwrap();
    let origin = store
        .bind_origin_storage("o", origin_st as Arc<dyn Storage>)
        .unwrap();
    // The snapshot that a writer thread owns.
    let owned = origin.create_snapshot(None, "owned").unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    // history[w] = sectors written by origin writer w, in order (seq = index + 1).
    let history: Arc<Mutex<Vec<Vec<usize>>>> = Arc::new(Mutex::new(vec![Vec::new(), Vec::new()]));
    let mut threads = Vec::new();
    for w in 0..2u64 {
        let (vol, hist) = (origin.volume(), history.clone());
        threads.push(std::thread::spawn(move || {
            let mut rng = fastrand::Rng::with_seed(w);
            for seq in 1..=writes {
                // Writer w owns the sectors with parity w.
                let s = rng.usize(0..SECTORS / 2) * 2 + w as usize;
                vol.write((s * SECTOR) as u64, &block(w + 1, seq)).unwrap();
                hist.lock().unwrap().push_sector(w as usize, s);
            }
        }));
    }
    let snap_vol = origin.snapshot_volume(owned).unwrap();
    let snap_writer = std::thread::spawn(move || {
        let mut rng = fastrand::Rng::with_seed(99);
        let mut mine = vec![None; SECTORS];
        for seq in 1..=writes {
            let s = rng.usize(0..SECTORS);
            snap_vol.write((s * SECTOR) as u64, &block(9, seq)).unwrap();
            mine[s] = Some(seq);
        }
        mine
    });
    let ops_origin = origin.clone();
    let ops_stop = stop.clone();
    let ops = std::thread::spawn(move || {
        let mut rng = fastrand::Rng::with_seed(7);
        let mut tags = Vec::new();
        let mut n = 0;
        while !ops_stop.load(SeqCst) {
            let t = ops_origin.create_snapshot(None, "").unwrap();
            tags.push(t);
            if tags.len() > 6 {
                let victim = tags.remove(rng.usize(..tags.len() - 1));
                ops_origin.delete_snapshot(victim).unwrap();
            }
            // A snapshot of the owned snapshot, immediately deleted: freezes its leaf under load.
            let ss = ops_origin.create_snapshot(Some(owned), "").unwrap();
            ops_origin.delete_snapshot(ss).unwrap();
            n += 1;
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        (tags, n)
    });
    for t in threads {
        t.join().unwrap();
    }
    let mine = snap_writer.join().unwrap();
    stop.store(true, SeqCst);
    let (tags, n) = ops.join().unwrap();
    assert!(n > 0 && !tags.is_empty());
    let hist = history.lock().unwrap().clone();

    // The origin holds each writer's last write to each of its sectors.
    let mut buf = vec![0u8; SECTORS * SECTOR];
    origin.volume().read(0, &mut buf).unwrap();
    for (w, h) in hist.iter().enumerate() {
        let mut last = vec![0u64; SECTORS];
        for (i, s) in h.iter().enumerate() {
            last[*s] = i as u64 + 1;
        }
        for s in (w..SECTORS).step_by(2) {
            let got = buf[s * SECTOR..(s + 1) * SECTOR].to_vec();
            if last[s] == 0 {
                assert!(got.iter().all(|&b| b == 0));
            } else {
                assert_eq!(decode(&got), (w as u64 + 1, last[s]), "origin sector {s}");
            }
        }
    }
    // The owned snapshot holds exactly its own writes (it was taken of an all-zero origin).
    origin
        .snapshot_volume(owned)
        .unwrap()
        .read(0, &mut buf)
        .unwrap();
    for (s, m) in mine.iter().enumerate() {
        let got = &buf[s * SECTOR..(s + 1) * SECTOR];
        match m {
            None => assert!(got.iter().all(|&b| b == 0), "owned snapshot sector {s}"),
            Some(seq) => assert_eq!(decode(got), (9, *seq), "owned snapshot sector {s}"),
        }
    }
    // Every surviving snapshot of the origin is a cut: for each writer there is a k such that
    // the snapshot holds exactly the state after that writer's first k writes.
    for t in &tags {
        origin
            .snapshot_volume(*t)
            .unwrap()
            .read(0, &mut buf)
            .unwrap();
        for (w, h) in hist.iter().enumerate() {
            let mut k = 0;
            for s in (w..SECTORS).step_by(2) {
                let got = &buf[s * SECTOR..(s + 1) * SECTOR];
                if got.iter().any(|&b| b != 0) {
                    let (ww, seq) = decode(got);
                    assert_eq!(ww, w as u64 + 1);
                    k = k.max(seq);
                }
            }
            let mut state = vec![0u64; SECTORS];
            for (i, s) in h.iter().take(k as usize).enumerate() {
                state[*s] = i as u64 + 1;
            }
            for s in (w..SECTORS).step_by(2) {
                let got = &buf[s * SECTOR..(s + 1) * SECTOR];
                let want = state[s];
                let have = if got.iter().all(|&b| b == 0) {
                    0
                } else {
                    decode(got).1
                };
                assert_eq!(
                    have, want,
                    "snapshot {t}: writer {w} sector {s} is not the cut at write {k}"
                );
            }
        }
    }
    drop(origin);
    drop(store);
    let report = snapmv_engine::check_storage(store_st.as_ref(), false).unwrap();
    assert!(report.is_clean(), "{:?}", report.problems);
}

trait PushSector {
    fn push_sector(&mut self, w: usize, s: usize);
}

impl PushSector for Vec<Vec<usize>> {
    fn push_sector(&mut self, w: usize, s: usize) {
        self[w].push(s);
    }
}
