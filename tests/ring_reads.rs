//! Reads through the device's io_uring path stay exact: a snapshot export read at queue depth
//! 32 while the origin is overwritten (each overwrite copies the old chunk out, racing the
//! snapshot's reads of the origin device) returns only the snapshot's data; an origin export
//! read at the same time returns each block wholly old or wholly new. The ring serves
//! O_DIRECT files only, so the files are opened with O_DIRECT, in the target directory (a
//! disk file system; tmpfs has no O_DIRECT).

use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::Arc;

use snapmv::export::{ExportConfig, ExportManager};
use snapmv_engine::{FormatOptions, Store};
use snapmv_tests::blkio_client::{wait_for, Client, ClientOptions, NO_FLAGS};

const BLOCK: usize = 4096;
const CHUNK: u64 = 64 << 10;
const SIZE: u64 = 32 << 20;
const BLOCKS: u64 = SIZE / BLOCK as u64;
const QD: usize = 32;

/// The content of block `b` in generation `g`: every 8 bytes say (b, g).
fn block(b: u64, g: u64) -> Vec<u8> {
    let word = (b << 8 | g).to_le_bytes();
    word.iter().copied().cycle().take(BLOCK).collect()
}

/// The generation a block read back holds, if it is a whole block of block `b`.
fn generation(data: &[u8], b: u64) -> Option<u64> {
    let w = u64::from_le_bytes(data[..8].try_into().ok()?);
    (w >> 8 == b && data == block(b, w & 0xff).as_slice()).then_some(w & 0xff)
}

#[test]
fn snapshot_and_origin_reads_stay_exact_while_the_origin_is_overwritten() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("temp dir");
    let (opath, spath) = (dir.path().join("origin"), dir.path().join("store"));
    std::fs::File::create(&opath)
        .and_then(|f| f.set_len(SIZE))
        .expect("origin file");
    std::fs::File::create(&spath)
        .and_then(|f| f.set_len(4 * SIZE))
        .expect("store file");
    Store::format(
        &spath,
        &FormatOptions {
            chunk_size: CHUNK as u32,
            force: false,
        },
    )
    .expect("format");
    let store = Store::open(&spath, true).expect("open store (O_DIRECT)");
    let origin = store
        .bind_origin("o", &opath, true)
        .expect("bind (O_DIRECT)");
    let v = origin.volume();
    for b in 0..BLOCKS {
        v.write(b * BLOCK as u64, &block(b, 0)).expect("fill");
    }
    v.flush().expect("flush");
    let tag = origin.create_snapshot(None, "s").expect("snapshot");

    let mgr = ExportManager::new();
    let export = |name: &str, disk: snapmv_engine::Volume| {
        let sock = dir.path().join(format!("{name}.sock"));
        mgr.add_disk(ExportConfig::new(name, sock.clone()), Arc::new(disk))
            .expect("export");
        sock
    };
    let snap_sock = export(
        "snap",
        origin.snapshot_volume(tag).expect("snapshot volume"),
    );
    let origin_sock = export("orig", origin.volume());

    // Overwrite every block once, in a shuffled order, while the reads run.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let v = origin.volume();
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut order: Vec<u64> = (0..BLOCKS).collect();
            fastrand::Rng::with_seed(3).shuffle(&mut order);
            for b in order {
                if stop.load(SeqCst) {
                    break;
                }
                v.write(b * BLOCK as u64, &block(b, 1)).expect("overwrite");
            }
        })
    };

    let opts = ClientOptions {
        region_len: QD * BLOCK,
        ..Default::default()
    };
    let mut snap = Client::connect_with(&snap_sock, &opts).expect("connect snapshot");
    let mut orig = Client::connect_with(&origin_sock, &opts).expect("connect origin");
    let mut rng = fastrand::Rng::with_seed(9);
    let (mut new_seen, mut rounds) = (0u64, 0u64);
    while !writer.is_finished() || rounds < 8 {
        rounds += 1;
        for (c, is_snap) in [(&mut snap, true), (&mut orig, false)] {
            let picks: Vec<u64> = (0..QD).map(|_| rng.u64(0..BLOCKS)).collect();
            c.mem().fill(0xee);
            let region = c.region.addr;
            let q = &mut c.queues[0];
            for (i, &b) in picks.iter().enumerate() {
                q.read(
                    b * BLOCK as u64,
                    (region + i * BLOCK) as *mut u8,
                    BLOCK,
                    i,
                    NO_FLAGS,
                );
            }
            for (i, ret) in wait_for(q, QD).expect("reads complete") {
                assert_eq!(ret, 0, "read {i} failed");
            }
            let mem = c.mem();
            for (i, &b) in picks.iter().enumerate() {
                let got = generation(&mem[i * BLOCK..(i + 1) * BLOCK], b);
                if is_snap {
                    assert_eq!(got, Some(0), "snapshot block {b} is not the snapshot's");
                } else {
                    assert!(got.is_some(), "origin block {b} is torn or misplaced");
                    new_seen += u64::from(got == Some(1));
                }
            }
        }
        if rounds > 100_000 {
            stop.store(true, SeqCst);
        }
    }
    writer.join().expect("writer");
    // After the writer: the origin reads all new, the snapshot all old.
    let mut buf = vec![0u8; BLOCK];
    for b in (0..BLOCKS).step_by(97) {
        origin
            .snapshot_volume(tag)
            .expect("snapshot volume")
            .read(b * BLOCK as u64, &mut buf)
            .expect("read");
        assert_eq!(generation(&buf, b), Some(0));
    }
    eprintln!("{rounds} rounds of {QD} reads on each export; origin reads of new data: {new_seen}");
}

/// A snapshot volume whose read mappings are overtaken, before the device reads them, by an
/// origin overwrite of the block they map (copy-out, then the new data on the origin device):
/// the race of the test above, every time.
struct Overtaken {
    snap: snapmv_engine::Volume,
    origin: snapmv_engine::Volume,
    generation: std::sync::atomic::AtomicU64,
}

impl snapmv::vhost_blk::BlockDisk for Overtaken {
    fn size(&self) -> u64 {
        self.snap.size()
    }
    fn read_vectored(
        &self,
        offset: u64,
        bufs: &mut [std::io::IoSliceMut<'_>],
    ) -> Result<(), snapmv::vhost_blk::DiskError> {
        snapmv::vhost_blk::BlockDisk::read_vectored(&self.snap, offset, bufs)
    }
    fn write_vectored(
        &self,
        offset: u64,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Result<(), snapmv::vhost_blk::DiskError> {
        snapmv::vhost_blk::BlockDisk::write_vectored(&self.snap, offset, bufs)
    }
    fn flush(&self) -> Result<(), snapmv::vhost_blk::DiskError> {
        snapmv::vhost_blk::BlockDisk::flush(&self.snap)
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), snapmv::vhost_blk::DiskError> {
        snapmv::vhost_blk::BlockDisk::discard(&self.snap, offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), snapmv::vhost_blk::DiskError> {
        snapmv::vhost_blk::BlockDisk::write_zeroes(&self.snap, offset, len)
    }
    fn name(&self) -> String {
        self.snap.name()
    }
    fn physical_block_size(&self) -> u32 {
        4096
    }
    fn read_mapping(&self, offset: u64, len: u64) -> Option<snapmv_engine::ReadMapping> {
        let m = self.snap.read_mapping(offset, len)?;
        let g = self.generation.fetch_add(1, SeqCst) + 1;
        for b in offset / BLOCK as u64..(offset + len).div_ceil(BLOCK as u64) {
            self.origin
                .write(b * BLOCK as u64, &block(b, g))
                .expect("overwrite");
        }
        // Written out: the origin device now holds the new data.
        self.origin.flush().expect("flush");
        Some(m)
    }
}

#[test]
fn a_read_overtaken_by_a_copy_out_is_read_again() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("temp dir");
    let (opath, spath) = (dir.path().join("origin"), dir.path().join("store"));
    std::fs::File::create(&opath)
        .and_then(|f| f.set_len(4 << 20))
        .expect("origin file");
    std::fs::File::create(&spath)
        .and_then(|f| f.set_len(64 << 20))
        .expect("store file");
    Store::format(
        &spath,
        &FormatOptions {
            chunk_size: BLOCK as u32,
            force: false,
        },
    )
    .expect("format");
    let store = Store::open(&spath, true).expect("open store (O_DIRECT)");
    let origin = store
        .bind_origin("o", &opath, true)
        .expect("bind (O_DIRECT)");
    let v = origin.volume();
    let blocks = (4 << 20) / BLOCK as u64;
    for b in 0..blocks {
        v.write(b * BLOCK as u64, &block(b, 0)).expect("fill");
    }
    let mgr = ExportManager::new();
    let sock = dir.path().join("snap.sock");
    for round in 0..3u64 {
        // A fresh snapshot each round: its blocks are all still on the origin device.
        let tag = origin.create_snapshot(None, "s").expect("snapshot");
        let disk = Overtaken {
            snap: origin.snapshot_volume(tag).expect("snapshot volume"),
            origin: origin.volume(),
            generation: std::sync::atomic::AtomicU64::new(10 * (round + 1)),
        };
        let name = format!("snap{round}");
        let sock = sock.with_file_name(format!("{name}.sock"));
        mgr.add_disk(ExportConfig::new(&name, sock.clone()), Arc::new(disk))
            .expect("export");
        let mut c = Client::connect_with(
            &sock,
            &ClientOptions {
                region_len: 8 * BLOCK,
                ..Default::default()
            },
        )
        .expect("connect");
        let region = c.region.addr;
        let picks: Vec<u64> = (0..8).map(|i| i * 37 + round).collect();
        let q = &mut c.queues[0];
        for (i, &b) in picks.iter().enumerate() {
            q.read(
                b * BLOCK as u64,
                (region + i * BLOCK) as *mut u8,
                BLOCK,
                i,
                NO_FLAGS,
            );
        }
        for (i, ret) in wait_for(q, picks.len()).expect("reads complete") {
            assert_eq!(ret, 0, "read {i} failed");
        }
        let mem = c.mem();
        // Picks never repeat across rounds (37 > 3): each block still held the fill when the
        // snapshot was taken, whatever the reads' overwrites put on the origin since.
        for (i, &b) in picks.iter().enumerate() {
            let got = generation(&mem[i * BLOCK..(i + 1) * BLOCK], b);
            assert_eq!(got, Some(0), "snapshot {tag} block {b}");
        }
        let mut now = vec![0u8; BLOCK];
        v.read(picks[0] * BLOCK as u64, &mut now)
            .expect("origin read");
        assert!(
            generation(&now, picks[0]).is_some_and(|g| g > 0),
            "the origin was not overwritten: the race was not staged"
        );
    }
}
