//! A snapshot cut while overlays exist (issue 13): the overlays survive the cut — the new
//! snapshot takes their store chunks (`ShareOverlay`) — and every version reads what it must,
//! before and after a kill-style reopen. Store syncs are held back the whole time, so no
//! commit round completes: the overlays cannot be written out, and the creates must not need
//! a sync.

mod common;

use common::RecordingStorage;
use snapmv_engine::{BootId, FormatOptions, Origin, Storage, Store};
use std::io;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const CS: usize = 4096;
const CHUNKS: usize = 16;

/// A storage whose syncs wait while `hold` is up.
#[derive(Debug)]
struct HeldSync {
    inner: Arc<RecordingStorage>,
    hold: Arc<AtomicBool>,
}

impl Storage for HeldSync {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.inner.write_at(buf, offset)
    }
    fn sync(&self) -> io::Result<()> {
        while self.hold.load(SeqCst) {
            std::thread::sleep(Duration::from_millis(1));
        }
        self.inner.sync()
    }
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn boot_id(&self) -> BootId {
        self.inner.boot_id()
    }
}

fn fill(o: &Origin, tag: Option<u32>, chunk: usize, byte: u8) {
    let v = match tag {
        None => o.volume(),
        Some(t) => o.snapshot_volume(t).unwrap(),
    };
    v.write((chunk * CS) as u64, &vec![byte; CS]).unwrap();
}

/// Each chunk's byte (every chunk is written whole).
fn bytes(o: &Origin, tag: Option<u32>) -> Vec<u8> {
    let v = match tag {
        None => o.volume(),
        Some(t) => o.snapshot_volume(t).unwrap(),
    };
    let mut buf = vec![0u8; CHUNKS * CS];
    v.read(0, &mut buf).unwrap();
    buf.chunks(CS)
        .map(|c| {
            assert!(c.iter().all(|b| *b == c[0]), "a chunk holds mixed bytes");
            c[0]
        })
        .collect()
}

fn verify(o: &Origin, s1: u32, s2: u32, ctx: &str) {
    let want_s1 = vec![1u8; CHUNKS];
    let mut want_s2 = vec![1u8; CHUNKS];
    want_s2[..4].fill(2);
    let mut want_o = want_s2.clone();
    want_o[..2].fill(3);
    want_o[5] = 3;
    assert_eq!(bytes(o, Some(s1)), want_s1, "{ctx}: snapshot 1");
    assert_eq!(bytes(o, Some(s2)), want_s2, "{ctx}: snapshot 2");
    assert_eq!(bytes(o, None), want_o, "{ctx}: origin");
}

#[test]
fn a_snapshot_cut_while_overlays_exist_takes_their_chunks() {
    let world = Arc::new(Mutex::new(()));
    let hold = Arc::new(AtomicBool::new(false));
    let store_rec = RecordingStorage::new(&world, "store", vec![0; 4 << 20]);
    let origin_rec = RecordingStorage::new(&world, "origin", vec![0; CHUNKS * CS]);
    Store::format_storage(
        store_rec.as_ref(),
        &FormatOptions {
            chunk_size: CS as u32,
            force: false,
        },
    )
    .unwrap();
    let store = Store::open_storage(Arc::new(HeldSync {
        inner: store_rec.clone(),
        hold: hold.clone(),
    }) as Arc<dyn Storage>)
    .unwrap();
    let o = store
        .bind_origin_storage(
            "o",
            Arc::new(HeldSync {
                inner: origin_rec.clone(),
                hold: hold.clone(),
            }) as Arc<dyn Storage>,
        )
        .unwrap();
    for c in 0..CHUNKS {
        fill(&o, None, c, 1);
    }
    let s1 = o.create_snapshot(None, "s1").unwrap();
    // From here no commit round completes.
    hold.store(true, SeqCst);
    for c in 0..4 {
        fill(&o, None, c, 2); // first writes: copy-outs for s1, overlays
    }
    let s2 = o.create_snapshot(None, "s2").unwrap(); // takes the overlays' chunks
    for c in 0..2 {
        fill(&o, None, c, 3); // the overlays get chunks of their own again
    }
    fill(&o, None, 5, 3); // a first write after s2: a copy-out for s2
    verify(&o, s1, s2, "live");
    // A third cut: two overlays were rewritten (own chunks), two were not (their chunks are
    // s2's; the cut gives them new ones first).
    let s3 = o.create_snapshot(None, "s3").unwrap();
    assert_eq!(bytes(&o, Some(s3)), bytes(&o, None), "snapshot 3");
    let want_s3 = bytes(&o, Some(s3));

    // The death of the process: the page cache (every write) stays, nothing was synced.
    let (store_img, origin_img) = {
        let _w = world.lock().unwrap();
        (store_rec.kill_image(), origin_rec.kill_image())
    };
    let st = snapmv_engine::testing::MemStorage::from_bytes("store-after", store_img);
    let report = snapmv_engine::check_storage(st.as_ref(), false).unwrap();
    assert!(
        report.is_clean(),
        "check after a kill: {:?}",
        report.problems
    );
    let store2 = Store::open_storage(st.clone() as Arc<dyn Storage>).unwrap();
    let o2 = store2
        .open_origin_storage(
            "o",
            snapmv_engine::testing::MemStorage::from_bytes("origin-after", origin_img)
                as Arc<dyn Storage>,
        )
        .unwrap();
    verify(&o2, s1, s2, "after a kill");
    assert_eq!(bytes(&o2, Some(s3)), want_s3, "snapshot 3 after a kill");
    // Deleting the snapshots and writing on frees everything but the origin.
    for t in [s1, s2, s3] {
        o2.delete_snapshot_sync(t).unwrap();
    }
    o2.volume().flush().unwrap();
    drop(o2);
    drop(store2);
    let report = snapmv_engine::check_storage(st.as_ref(), false).unwrap();
    assert!(
        report.is_clean(),
        "check after reopening: {:?}",
        report.problems
    );

    hold.store(false, SeqCst);
    drop(o);
    drop(store);
}
