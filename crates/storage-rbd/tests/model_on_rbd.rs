//! A compact model-based test of the engine with its store and origin on RBD images: random
//! origin and snapshot writes, snapshots of the origin and of snapshots, deletes, rollbacks,
//! flushes and reopens (which close and reopen the images, so the exclusive locks change
//! hands), every read compared with an in-memory model, and `check_storage` clean at the end.
//! The operations follow crates/engine/tests/model.rs; fewer of them (`SNAPMV_RBD_MODEL_OPS`,
//! default 400; seed `SNAPMV_RBD_MODEL_SEED`), since every RBD write is an OSD round trip.

mod common;

use common::{cluster, Image};
use snapmv_engine::{Error, FormatOptions, Origin, Storage, Store};
use snapmv_storage_rbd::RbdStorage;
use std::collections::BTreeMap;
use std::sync::Arc;

struct Engine {
    store_loc: String,
    origin_loc: String,
    store: Option<Store>,
    origin: Option<Origin>,
}

fn open(loc: &str) -> Arc<dyn Storage> {
    Arc::new(RbdStorage::open(loc).unwrap_or_else(|e| panic!("{e}")))
}

impl Engine {
    fn open(&mut self) {
        let store = Store::open_storage(open(&self.store_loc)).expect("reopen store");
        let origin = store
            .open_origin_storage("o", open(&self.origin_loc))
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

fn wait_rollback(e: &Engine, snaps: &mut BTreeMap<u32, Vec<u8>>) {
    loop {
        match e.o().wait_rollback() {
            Ok(()) => return,
            Err(Error::NoSpace { .. }) => {
                let t = *snaps
                    .keys()
                    .next()
                    .expect("rollback stalled, no snapshot to delete");
                e.o().delete_snapshot(t).unwrap();
                snaps.remove(&t);
            }
            Err(err) => panic!("wait_rollback: {err}"),
        }
    }
}

#[test]
fn model_on_rbd_images() {
    let Some(c) = cluster("model_on_rbd_images") else {
        return;
    };
    let env = |k: &str, d: u64| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let seed = env("SNAPMV_RBD_MODEL_SEED", 18);
    let ops = env("SNAPMV_RBD_MODEL_OPS", 400);
    let mut rng = fastrand::Rng::with_seed(seed);
    let cs = 4096usize;
    let nchunks = rng.usize(8..40);
    let size = nchunks * cs;
    let data_chunks = rng.usize(nchunks..nchunks * 3);
    let store_img = Image::create(c, "mstore", &format!("{}K", 4096 + data_chunks * 4), &[]);
    let origin_img = Image::create(c, "morigin", &format!("{}K", nchunks * 4), &[]);
    let mut initial = vec![0u8; size];
    rng.fill(&mut initial);
    {
        let st = RbdStorage::open(&origin_img.locator()).unwrap();
        st.write_at(&initial, 0).unwrap();
        let st = RbdStorage::open(&store_img.locator()).unwrap();
        Store::format_storage(&st, &FormatOptions::default()).unwrap();
    }
    let mut e = Engine {
        store_loc: store_img.locator(),
        origin_loc: origin_img.locator(),
        store: None,
        origin: None,
    };
    {
        let store = Store::open_storage(open(&e.store_loc)).unwrap();
        e.origin = Some(store.bind_origin_storage("o", open(&e.origin_loc)).unwrap());
        e.store = Some(store);
    }
    let mut origin = initial;
    let mut snaps: BTreeMap<u32, Vec<u8>> = BTreeMap::new();
    let ctx = |op: u64, what: &str| format!("seed {seed} op {op}: {what}");
    let (mut reopens, mut rollbacks, mut taken) = (0, 0, 0);
    for op in 0..ops {
        let live: Vec<u32> = snaps.keys().copied().collect();
        let pick = |rng: &mut fastrand::Rng| live[rng.usize(..live.len())];
        let start = rng.usize(0..size / 512) * 512;
        let len = rng.usize(1..=(size - start).min(3 * cs) / 512) * 512;
        let (off, r) = (start, rng.u32(0..100));
        match r {
            0..=29 => {
                let mut buf = vec![0u8; len];
                rng.fill(&mut buf);
                match e.o().volume().write(off as u64, &buf) {
                    Ok(()) => origin[off..off + len].copy_from_slice(&buf),
                    Err(Error::NoSpace { .. }) => {}
                    Err(err) => panic!("{}", ctx(op, &format!("origin write: {err}"))),
                }
            }
            30..=44 if !live.is_empty() => {
                let t = pick(&mut rng);
                let mut buf = vec![0u8; len];
                rng.fill(&mut buf);
                match e.o().snapshot_volume(t).unwrap().write(off as u64, &buf) {
                    Ok(()) => snaps.get_mut(&t).unwrap()[off..off + len].copy_from_slice(&buf),
                    Err(Error::NoSpace { .. }) => {}
                    Err(err) => panic!("{}", ctx(op, &format!("snapshot {t} write: {err}"))),
                }
            }
            45..=54 => {
                let mut buf = vec![0u8; len];
                e.o().volume().read(off as u64, &mut buf).unwrap();
                assert!(
                    buf == origin[off..off + len],
                    "{}",
                    ctx(op, "origin read differs")
                );
            }
            55..=64 if !live.is_empty() => {
                let t = pick(&mut rng);
                let mut buf = vec![0u8; len];
                let v = e.o().snapshot_volume(t).unwrap();
                v.read(off as u64, &mut buf).unwrap();
                assert!(
                    buf == snaps[&t][off..off + len],
                    "{}",
                    ctx(op, &format!("snapshot {t} read differs"))
                );
            }
            65..=72 => match e.o().create_snapshot(None, "m") {
                Ok(t) => {
                    assert!(!snaps.contains_key(&t), "{}", ctx(op, "tag reused"));
                    snaps.insert(t, origin.clone());
                    taken += 1;
                }
                Err(Error::Busy(msg)) => assert!(msg.contains("rolling back"), "{}", ctx(op, &msg)),
                Err(err) => panic!("{}", ctx(op, &format!("snapshot: {err}"))),
            },
            73..=76 if !live.is_empty() => {
                let p = pick(&mut rng);
                let t = e.o().create_snapshot(Some(p), "").unwrap();
                let content = snaps[&p].clone();
                snaps.insert(t, content);
                taken += 1;
            }
            77..=82 if !live.is_empty() => {
                let t = pick(&mut rng);
                e.o().delete_snapshot(t).unwrap();
                snaps.remove(&t);
            }
            83..=85 if !live.is_empty() => {
                let t = pick(&mut rng);
                match e.o().rollback(t) {
                    Ok(()) => {
                        origin = snaps[&t].clone();
                        rollbacks += 1;
                    }
                    Err(Error::Busy(_)) => {}
                    Err(err) => panic!("{}", ctx(op, &format!("rollback {t}: {err}"))),
                }
            }
            86..=88 => wait_rollback(&e, &mut snaps),
            89..=92 => {
                e.close();
                e.open();
                reopens += 1;
            }
            93..=95 => e.o().volume().flush().unwrap(),
            _ => {
                let mut buf = vec![0u8; size];
                e.o().volume().read(0, &mut buf).unwrap();
                assert!(buf == origin, "{}", ctx(op, "whole origin differs"));
                for (t, content) in &snaps {
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
                    snaps.keys().copied().collect::<Vec<_>>(),
                    "{}",
                    ctx(op, "list")
                );
            }
        }
    }
    wait_rollback(&e, &mut snaps);
    e.close();
    {
        let st = RbdStorage::open(&e.store_loc).unwrap();
        let report = snapmv_engine::check_storage(&st, false).unwrap();
        assert!(
            report.is_clean(),
            "{}",
            ctx(ops, &format!("check: {:?}", report.problems))
        );
    }
    e.open();
    let mut buf = vec![0u8; size];
    e.o().volume().read(0, &mut buf).unwrap();
    assert!(buf == origin, "{}", ctx(ops, "final origin differs"));
    for (t, content) in &snaps {
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
    assert!(
        taken > 0 && reopens > 0,
        "the run exercised too little: {taken} snapshots, {reopens} reopens"
    );
    eprintln!(
        "model on RBD: seed {seed}, {ops} ops, {taken} snapshots, {rollbacks} rollbacks, {reopens} reopens, {} live at the end",
        snaps.len()
    );
}
