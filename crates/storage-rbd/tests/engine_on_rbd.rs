//! The engine with its store and its origin on RBD images, through the engine's public
//! `Storage`-based API: format, bind, write, snapshot, read back, reopen; and a daemon killed
//! with SIGKILL mid-writes whose store is taken over: every acknowledged write is there, flushed
//! or not (the reason `RbdStorage::boot_id` is constant per image), and so are its snapshots.

mod common;

use common::{cluster, spawn_helper, Image, KillOnDrop};
use snapmv_engine::{FormatOptions, Storage, Store};
use snapmv_storage_rbd::{rbd_error, RbdError, RbdStorage};
use std::io::{BufRead, BufReader};
use std::sync::Arc;

const BLOCK: usize = 4096;

fn open(loc: &str) -> Arc<dyn Storage> {
    Arc::new(RbdStorage::open(loc).unwrap())
}

fn block(seq: u64) -> Vec<u8> {
    seq.to_le_bytes().repeat(BLOCK / 8)
}

/// The sequence number a block holds (0: never written); panics on a torn block.
fn seq_of(b: &[u8]) -> u64 {
    let s = u64::from_le_bytes(b[..8].try_into().unwrap());
    assert_eq!(b, block(s), "torn block");
    s
}

#[test]
fn store_and_origin_on_rbd_images() {
    let Some(c) = cluster("store_and_origin_on_rbd_images") else {
        return;
    };
    let store_img = Image::create(c, "store", "64M", &[]);
    let origin_img = Image::create(c, "origin", "8M", &[]);
    {
        let st = RbdStorage::open(&store_img.locator()).unwrap();
        Store::format_storage(&st, &FormatOptions::default()).unwrap();
    }
    let store = Store::open_storage(open(&store_img.locator())).unwrap();
    assert_eq!(store.path(), store_img.spec());
    // The store's image is owned: a second daemon cannot open it.
    let e = RbdStorage::open(&store_img.locator()).unwrap_err();
    assert!(
        matches!(rbd_error(&e), Some(RbdError::Locked { .. })),
        "{e}"
    );
    let origin = store
        .bind_origin_storage("vm", open(&origin_img.locator()))
        .unwrap();
    let vol = origin.volume();
    // Sector-aligned (the volume's unit) but not chunk-aligned, across the 4 MiB object
    // boundary of the origin image.
    let at = (4 << 20) - 6144 - 512;
    let a: Vec<u8> = (0..20_480u32).map(|i| (i % 251) as u8).collect();
    vol.write(at, &a).unwrap();
    let tag = origin.create_snapshot(None, "before b").unwrap();
    let b = vec![0xb5u8; 9216];
    vol.write(at + 3072, &b).unwrap();
    vol.flush().unwrap();
    let mut now = a.clone();
    now[3072..3072 + 9216].copy_from_slice(&b);
    let mut got = vec![0u8; a.len()];
    vol.read(at, &mut got).unwrap();
    assert_eq!(got, now);
    origin
        .snapshot_volume(tag)
        .unwrap()
        .read(at, &mut got)
        .unwrap();
    assert_eq!(got, a, "the snapshot keeps the data from before");
    // A writable snapshot: its writes go to the store image only.
    let snap = origin.snapshot_volume(tag).unwrap();
    snap.write(0, &[7u8; 512]).unwrap();
    snap.flush().unwrap();
    drop((snap, vol, origin, store));

    // Reopened (as a restarted daemon would): the same origins, snapshots and data.
    let store = Store::open_storage(open(&store_img.locator())).unwrap();
    assert_eq!(store.origin_ids(), vec!["vm".to_string()]);
    let origin = store
        .open_origin_storage("vm", open(&origin_img.locator()))
        .unwrap();
    let snaps = origin.snapshots();
    assert_eq!(snaps.len(), 1);
    assert_eq!((snaps[0].tag, snaps[0].memo.as_str()), (tag, "before b"));
    origin.volume().read(at, &mut got).unwrap();
    assert_eq!(got, now);
    let snap = origin.snapshot_volume(tag).unwrap();
    snap.read(at, &mut got).unwrap();
    assert_eq!(got, a);
    let mut head = [0u8; 512];
    snap.read(0, &mut head).unwrap();
    assert_eq!(head, [7u8; 512]);
    origin.volume().read(0, &mut head).unwrap();
    assert_eq!(
        head, [0u8; 512],
        "the snapshot's write is not on the origin"
    );
}

const BLOCKS: u64 = 48;
const SNAP_EVERY: u64 = 40;

/// Not a test by itself: the daemon of `acknowledged_writes_survive_sigkill_and_takeover`
/// (does nothing without SNAPMV_RBD_ENGINE_STORE). Writes sequence-numbered blocks without
/// flushing, prints `ACK n` after each write returned and `SNAP tag n` after each snapshot,
/// until killed.
#[test]
fn helper_engine_daemon() {
    let Ok(store_loc) = std::env::var("SNAPMV_RBD_ENGINE_STORE") else {
        return;
    };
    let origin_loc = std::env::var("SNAPMV_RBD_ENGINE_ORIGIN").unwrap();
    let store = Store::open_storage(open(&store_loc)).unwrap();
    let origin = store.open_origin_storage("vm", open(&origin_loc)).unwrap();
    let vol = origin.volume();
    for seq in 1.. {
        vol.write(((seq - 1) % BLOCKS) * BLOCK as u64, &block(seq))
            .unwrap();
        println!("ACK {seq}");
        if seq % SNAP_EVERY == 0 {
            let tag = origin
                .create_snapshot(None, &format!("after {seq}"))
                .unwrap();
            println!("SNAP {tag} {seq}");
        }
    }
}

/// Expected content of block `b` after writes 1..=last: the highest seq ≤ last on it.
fn expected(b: u64, last: u64) -> u64 {
    if last < b + 1 {
        0
    } else {
        last - ((last - (b + 1)) % BLOCKS)
    }
}

#[test]
fn acknowledged_writes_survive_sigkill_and_takeover() {
    let Some(c) = cluster("acknowledged_writes_survive_sigkill_and_takeover") else {
        return;
    };
    let store_img = Image::create(c, "kstore", "64M", &[]);
    let origin_img = Image::create(c, "korigin", "4M", &[]);
    {
        let st = RbdStorage::open(&store_img.locator()).unwrap();
        Store::format_storage(&st, &FormatOptions::default()).unwrap();
        let store = Store::open_storage(Arc::new(st)).unwrap();
        store
            .bind_origin_storage("vm", open(&origin_img.locator()))
            .unwrap();
    }
    let want_acks: u64 = std::env::var("SNAPMV_RBD_KILL_ACKS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(150);
    let mut child = KillOnDrop(spawn_helper(
        "helper_engine_daemon",
        &[
            ("SNAPMV_RBD_ENGINE_STORE", store_img.locator()),
            ("SNAPMV_RBD_ENGINE_ORIGIN", origin_img.locator()),
        ],
    ));
    let mut lines = BufReader::new(child.0.stdout.take().unwrap()).lines();
    let (mut acked, mut snaps) = (0u64, Vec::new());
    while acked < want_acks {
        let line = lines
            .next()
            .expect("the daemon exited early (see its stderr)")
            .unwrap();
        // libtest prints "test helper_engine_daemon ... " before the first line.
        if let Some((_, n)) = line.split_once("ACK ") {
            acked = n.trim().parse().unwrap();
        } else if let Some((_, s)) = line.split_once("SNAP ") {
            let (tag, n) = s.trim().split_once(' ').unwrap();
            snaps.push((tag.parse::<u32>().unwrap(), n.parse::<u64>().unwrap()));
        }
    }
    child.0.kill().unwrap(); // SIGKILL, mid-writes, nothing flushed
    child.0.wait().unwrap();
    assert!(!snaps.is_empty());

    // Another daemon takes both images over (the dead one's locks are broken, it is fenced).
    let store_st = RbdStorage::open_takeover(&store_img.locator()).unwrap();
    let origin_st = RbdStorage::open_takeover(&origin_img.locator()).unwrap();
    assert_eq!(store_st.fenced_owners().len(), 1);
    assert_eq!(origin_st.fenced_owners().len(), 1);
    let store = Store::open_storage(Arc::new(store_st)).unwrap();
    let origin = store
        .open_origin_storage("vm", Arc::new(origin_st))
        .unwrap();
    let vol = origin.volume();
    let mut buf = vec![0u8; BLOCK];
    for b in 0..BLOCKS {
        vol.read(b * BLOCK as u64, &mut buf).unwrap();
        let got = seq_of(&buf);
        let want = expected(b, acked);
        // The write after the last ACK read may have completed too (its ACK unread).
        let later_ok = got > want && got % BLOCKS == (b + 1) % BLOCKS && got > acked;
        assert!(
            got == want || later_ok,
            "block {b}: seq {got}, acknowledged {want}"
        );
    }
    let listed: Vec<u32> = origin.snapshots().iter().map(|s| s.tag).collect();
    for (tag, at) in &snaps {
        assert!(
            listed.contains(tag),
            "snapshot {tag} (after {at}) lost: {listed:?}"
        );
        let sv = origin.snapshot_volume(*tag).unwrap();
        for b in 0..BLOCKS {
            sv.read(b * BLOCK as u64, &mut buf).unwrap();
            assert_eq!(seq_of(&buf), expected(b, *at), "snapshot {tag} block {b}");
        }
    }
    eprintln!(
        "killed after {acked} acknowledged writes and {} snapshots: all there",
        snaps.len()
    );
}
