//! 65,536 versions of one origin (dm-snap-mv stopped at 640): snapshots of the origin and of
//! snapshots, with writes in between, through a checkpoint and a reopen. `SNAPMV_VERSIONS`
//! sets the count.

mod common;

use common::{env_u64, MemStorage};
use snapmv_engine::{FormatOptions, Storage, Store};
use std::sync::Arc;
use std::time::Instant;

#[test]
fn sixty_five_thousand_snapshots() {
    let n = env_u64("SNAPMV_VERSIONS", 65_536) as u32;
    let store_st = MemStorage::new("store", 1 << 30);
    let origin_st = MemStorage::new("origin", 1 << 20);
    Store::format_storage(store_st.as_ref(), &FormatOptions::default()).unwrap();
    let store = Store::open_storage(store_st.clone() as Arc<dyn Storage>).unwrap();
    let origin = store
        .bind_origin_storage("o", origin_st.clone() as Arc<dyn Storage>)
        .unwrap();
    let vol = origin.volume();
    let mut first = Vec::new();
    let mut last = Vec::new();
    let started = Instant::now();
    for i in 0..n {
        // Every 64th version writes a marker into the origin chunk i % 256.
        if i % 64 == 0 {
            vol.write((i as u64 % 256) * 4096, &i.to_le_bytes().repeat(128))
                .unwrap();
        }
        let t0 = Instant::now();
        let of = if i % 4 == 3 { Some(i) } else { None };
        let tag = origin.create_snapshot(of, "v").unwrap();
        assert_eq!(tag, i + 1, "tags are handed out in order");
        let dt = t0.elapsed();
        if i < 100 {
            first.push(dt);
        } else if i >= n.saturating_sub(100) {
            last.push(dt);
        }
    }
    first.sort();
    last.sort();
    eprintln!(
        "{n} snapshots in {:?}; create latency median: first 100 {:?}, last 100 {:?}",
        started.elapsed(),
        first.get(first.len() / 2),
        last.get(last.len() / 2)
    );
    assert_eq!(origin.snapshots().len(), n as usize);
    // Snapshot 65 (taken after the marker of version 64 was written to chunk 64) sees it.
    let mut buf = vec![0u8; 4096];
    if n > 65 {
        origin
            .snapshot_volume(65)
            .unwrap()
            .read(64 * 4096, &mut buf)
            .unwrap();
        assert_eq!(&buf[..4], &64u32.to_le_bytes());
    }
    drop(vol);
    drop(origin);
    drop(store);
    let report = snapmv_engine::check_storage(store_st.as_ref(), false).unwrap();
    assert!(report.is_clean(), "{:?}", report.problems);
    assert_eq!(report.snapshots, n as usize);
    let store = Store::open_storage(store_st as Arc<dyn Storage>).unwrap();
    let origin = store
        .open_origin_storage("o", origin_st as Arc<dyn Storage>)
        .unwrap();
    assert_eq!(origin.snapshots().len(), n as usize);
    if n > 65 {
        origin
            .snapshot_volume(65)
            .unwrap()
            .read(64 * 4096, &mut buf)
            .unwrap();
        assert_eq!(&buf[..4], &64u32.to_le_bytes());
    }
}
