//! I/O through the vhost-user-blk export with the `blkio` client: data integrity with one and
//! two queues at queue depth 32, request sizes from 512 B to 1 MiB, scatter-gather, flush,
//! discard and write-zeroes, read-only exports, requests past the end, isolation of two
//! exports, reconnect, removal.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use blkio::Blkioq;
use snapmv::export::{ExportConfig, ExportManager};
use snapmv::vhost_blk::{BlockDisk, MemDisk};
use snapmv_engine::{FormatOptions, Origin, Store};
use snapmv_tests::blkio_client::{run1, wait_for, Client, ClientOptions, NO_FLAGS};

const MIB: u64 = 1 << 20;

struct Fixture {
    dir: tempfile::TempDir,
    mgr: ExportManager,
    /// Stores opened by this fixture (kept open while it lives).
    stores: std::sync::Mutex<Vec<Store>>,
}

impl Fixture {
    fn new() -> Fixture {
        Fixture {
            dir: tempfile::tempdir().expect("temp dir"),
            mgr: ExportManager::new(),
            stores: Default::default(),
        }
    }

    fn sock(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.sock"))
    }

    /// A fresh store of `store_size` bytes (64 KiB chunks) with one origin of `size` bytes
    /// named `name`, both plain files in the fixture's directory.
    fn origin_in_store(&self, name: &str, size: u64, store_size: u64) -> Origin {
        let opath = self.dir.path().join(format!("{name}.origin"));
        let spath = self.dir.path().join(format!("{name}.store"));
        std::fs::File::create(&opath)
            .and_then(|f| f.set_len(size))
            .expect("create origin file");
        std::fs::File::create(&spath)
            .and_then(|f| f.set_len(store_size))
            .expect("create store file");
        Store::format(
            &spath,
            &FormatOptions {
                chunk_size: 64 << 10,
                force: false,
            },
        )
        .expect("format store");
        let store = Store::open(&spath, false).expect("open store");
        let origin = store.bind_origin(name, &opath, false).expect("bind origin");
        self.stores.lock().unwrap().push(store);
        origin
    }

    /// An origin of `size` bytes in its own 64 MiB store.
    fn origin(&self, name: &str, size: u64) -> Origin {
        self.origin_in_store(name, size, 64 * MIB)
    }

    /// Exports `disk` as `name` with `queues` queues.
    fn export(&self, name: &str, disk: Arc<dyn BlockDisk>, queues: u16, readonly: bool) -> PathBuf {
        let mut cfg = ExportConfig::new(name, self.sock(name));
        cfg.num_queues = queues;
        cfg.readonly = readonly;
        self.mgr.add_disk(cfg, disk).expect("add export");
        self.sock(name)
    }

    /// Exports the origin `name` (created with `size` bytes).
    fn export_origin(
        &self,
        name: &str,
        size: u64,
        queues: u16,
        readonly: bool,
    ) -> (Origin, PathBuf) {
        let o = self.origin(name, size);
        let sock = self.export(name, Arc::new(o.volume()), queues, readonly);
        (o, sock)
    }
}

fn mem_disk(name: &str, size: u64) -> Arc<MemDisk> {
    Arc::new(MemDisk::new(name, size))
}

fn fill_random(buf: &mut [u8], seed: u64) {
    let mut rng = fastrand::Rng::with_seed(seed);
    for chunk in buf.chunks_mut(8) {
        let v = rng.u64(..).to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
}

/// Request sizes 512 B .. 1 MiB, cycled.
const SIZES: [usize; 12] = [
    512,
    1024,
    4096,
    8192,
    12288,
    65536,
    512 * 3,
    131072,
    262144,
    4096 * 33,
    524288,
    1 << 20,
];

/// Writes `n` requests (queue depth `n`) of varied sizes into `[base, base+span)` through `q`,
/// using the region bytes `[roff, roff + total)`, then reads everything back into another part
/// of the region and compares. Returns the number of bytes checked.
fn write_read_batch(
    q: &mut Blkioq,
    region: usize,
    roff: usize,
    base: u64,
    n: usize,
    seed: u64,
) -> usize {
    let mut reqs = Vec::new(); // (disk offset, region offset, len)
    let mut doff = base;
    let mut r = roff;
    for i in 0..n {
        let len = SIZES[(i + seed as usize) % SIZES.len()];
        reqs.push((doff, r, len));
        doff += len as u64;
        r += len;
    }
    let total = r - roff;
    // SAFETY: the caller guarantees [region+roff, region+roff+2*total) is inside its mapped
    // data region and used by nobody else.
    let mem = unsafe { std::slice::from_raw_parts_mut((region + roff) as *mut u8, 2 * total) };
    fill_random(&mut mem[..total], seed);
    for (i, &(d, ro, len)) in reqs.iter().enumerate() {
        q.write(d, (region + ro) as *const u8, len, i, NO_FLAGS);
    }
    for (ud, ret) in wait_for(q, n).expect("writes complete") {
        assert_eq!(ret, 0, "write {ud} of {n} failed");
    }
    mem[total..].fill(0xEE);
    for (i, &(d, ro, len)) in reqs.iter().enumerate() {
        q.read(d, (region + ro + total) as *mut u8, len, i, NO_FLAGS);
    }
    for (ud, ret) in wait_for(q, n).expect("reads complete") {
        assert_eq!(ret, 0, "read {ud} of {n} failed");
    }
    for &(d, ro, len) in &reqs {
        let a = ro - roff;
        assert!(
            mem[a..a + len] == mem[total + a..total + a + len],
            "data read back at disk offset {d} ({len} bytes) differs from what was written"
        );
    }
    total
}

#[test]
fn write_read_one_queue_qd32_mixed_sizes() {
    let f = Fixture::new();
    let (origin, sock) = f.export_origin("d1", 64 * MIB, 4, false);
    let mut c = Client::connect_with(
        &sock,
        &ClientOptions {
            region_len: 16 << 20,
            ..Default::default()
        },
    )
    .expect("connect");
    assert_eq!(c.capacity(), 64 * MIB);
    let region = c.region.addr;
    let q = &mut c.queues[0];
    let checked = write_read_batch(q, region, 0, 0, 32, 1);
    assert!(checked > 4 << 20, "batch covered only {checked} bytes");
    // The volume itself holds the data (not only some cache in the client).
    let mut direct = vec![0u8; 512];
    origin.volume().read(0, &mut direct).expect("read volume");
    assert_eq!(direct, c.mem()[..512].to_vec());
}

#[test]
fn write_read_two_queues_concurrently() {
    let f = Fixture::new();
    let (_o, sock) = f.export_origin("d2", 64 * MIB, 2, false);
    let mut c = Client::connect_with(
        &sock,
        &ClientOptions {
            num_queues: 2,
            region_len: 32 << 20,
            ..Default::default()
        },
    )
    .expect("connect");
    let region = c.region.addr;
    let queues = std::mem::take(&mut c.queues);
    assert_eq!(queues.len(), 2);
    std::thread::scope(|s| {
        for (i, mut q) in queues.into_iter().enumerate() {
            s.spawn(move || {
                for round in 0..3u64 {
                    // Queue i uses region half i and disk half i.
                    write_read_batch(
                        &mut q,
                        region,
                        i * (16 << 20),
                        i as u64 * 32 * MIB,
                        32,
                        round * 7 + i as u64,
                    );
                }
            });
        }
    });
}

#[test]
fn scatter_gather_readv_writev() {
    let f = Fixture::new();
    let (_o, sock) = f.export_origin("sg", 8 * MIB, 1, false);
    let mut c = Client::connect(&sock).expect("connect");
    let base = c.region.addr;
    // 5 pieces of different sizes, scattered in the region, written as one request at 4096.
    let pieces: [(usize, usize); 5] = [
        (0, 512),
        (8192, 4096),
        (65536, 1536),
        (100_000, 2048),
        (300_000, 512),
    ];
    let total: usize = pieces.iter().map(|p| p.1).sum();
    fill_random(&mut c.mem()[..400_000], 99);
    let iov: Vec<libc::iovec> = pieces
        .iter()
        .map(|&(o, l)| libc::iovec {
            iov_base: (base + o) as *mut libc::c_void,
            iov_len: l,
        })
        .collect();
    let q = &mut c.queues[0];
    let ret = run1(q, |q| {
        q.writev(4096, iov.as_ptr().cast(), iov.len() as u32, 7, NO_FLAGS)
    })
    .unwrap();
    assert_eq!(ret, 0, "writev failed");
    // Read back contiguously and compare with the concatenation.
    let rd = 1 << 20;
    let ret = run1(q, |q| {
        q.read(4096, (base + rd) as *mut u8, total, 8, NO_FLAGS)
    })
    .unwrap();
    assert_eq!(ret, 0, "read failed");
    let mem = c.mem();
    let mut expect = Vec::new();
    for &(o, l) in &pieces {
        expect.extend_from_slice(&mem[o..o + l]);
    }
    assert_eq!(
        &mem[rd..rd + total],
        &expect[..],
        "contiguous read differs from the gathered write"
    );
    // And readv scatters it back into other places.
    let outs: [(usize, usize); 3] = [
        (2 << 20, 1024),
        ((2 << 20) + 50_000, 4096),
        ((2 << 20) + 90_000, total - 5120),
    ];
    let iov2: Vec<libc::iovec> = outs
        .iter()
        .map(|&(o, l)| libc::iovec {
            iov_base: (base + o) as *mut libc::c_void,
            iov_len: l,
        })
        .collect();
    let q = &mut c.queues[0];
    let ret = run1(q, |q| {
        q.readv(4096, iov2.as_ptr().cast(), iov2.len() as u32, 9, NO_FLAGS)
    })
    .unwrap();
    assert_eq!(ret, 0, "readv failed");
    let mem = c.mem();
    let mut got = Vec::new();
    for &(o, l) in &outs {
        got.extend_from_slice(&mem[o..o + l]);
    }
    assert_eq!(got, expect, "readv scattered different bytes");
}

fn read_back(c: &mut Client, off: u64, len: usize) -> Vec<u8> {
    let p = c.ptr(0);
    c.mem()[..len].fill(0x5A);
    let ret = run1(&mut c.queues[0], |q| q.read(off, p, len, 0, NO_FLAGS)).unwrap();
    assert_eq!(ret, 0, "read of {len} bytes at {off} failed");
    c.mem()[..len].to_vec()
}

fn write_pattern(c: &mut Client, off: u64, len: usize, byte: u8) {
    let p = c.ptr(0);
    c.mem()[..len].fill(byte);
    let ret = run1(&mut c.queues[0], |q| q.write(off, p, len, 0, NO_FLAGS)).unwrap();
    assert_eq!(ret, 0, "write of {len} bytes at {off} failed");
}

#[test]
fn flush_discard_write_zeroes() {
    let f = Fixture::new();
    let (_o, sock) = f.export_origin("dz", 8 * MIB, 1, false);
    let mut c = Client::connect(&sock).expect("connect");
    write_pattern(&mut c, 0, 1 << 20, 0xAB);
    let ret = run1(&mut c.queues[0], |q| q.flush(1, NO_FLAGS)).unwrap();
    assert_eq!(ret, 0, "flush failed");

    let ret = run1(&mut c.queues[0], |q| {
        q.discard(64 << 10, 128 << 10, 2, NO_FLAGS)
    })
    .unwrap();
    assert_eq!(ret, 0, "discard failed");
    let got = read_back(&mut c, 0, 1 << 20);
    assert!(
        got[..64 << 10].iter().all(|&b| b == 0xAB),
        "data before the discard changed"
    );
    assert!(
        got[64 << 10..192 << 10].iter().all(|&b| b == 0),
        "discarded range is not zero"
    );
    assert!(
        got[192 << 10..].iter().all(|&b| b == 0xAB),
        "data after the discard changed"
    );

    let ret = run1(&mut c.queues[0], |q| {
        q.write_zeroes(512 << 10, 4096, 3, NO_FLAGS)
    })
    .unwrap();
    assert_eq!(ret, 0, "write-zeroes failed");
    // With UNMAP allowed too.
    let ret = run1(&mut c.queues[0], |q| {
        q.write_zeroes(700 << 10, 8192, 4, blkio::ReqFlags::empty())
    })
    .unwrap();
    assert_eq!(ret, 0, "write-zeroes (unmap allowed) failed");
    let got = read_back(&mut c, 0, 1 << 20);
    assert!(got[512 << 10..(512 << 10) + 4096].iter().all(|&b| b == 0));
    assert!(got[700 << 10..(700 << 10) + 8192].iter().all(|&b| b == 0));
    assert_eq!(got[(512 << 10) - 1], 0xAB);
    assert_eq!(got[(512 << 10) + 4096], 0xAB);
    assert_eq!(got[(700 << 10) + 8192], 0xAB);
}

#[test]
fn readonly_export_refuses_writes() {
    let f = Fixture::new();
    let (_o, sock) = f.export_origin("ro", 4 * MIB, 1, true);
    assert!(f.mgr.get("ro").expect("listed").readonly);
    // The device offers VIRTIO_BLK_F_RO: blkio refuses to start it read-write.
    let e = Client::connect(&sock)
        .err()
        .expect("read-write start of a read-only device must fail");
    assert!(e.0.contains("read-only"), "unexpected error: {e}");
    let mut c = Client::connect_with(
        &sock,
        &ClientOptions {
            read_only: true,
            ..Default::default()
        },
    )
    .expect("read-only connect");
    assert!(read_back(&mut c, 0, 4096).iter().all(|&b| b == 0));
    let p = c.ptr(0);
    let ret = run1(&mut c.queues[0], |q| q.write(0, p, 4096, 0, NO_FLAGS)).unwrap();
    assert_ne!(ret, 0, "write to a read-only export succeeded");
}

#[test]
fn requests_past_the_end_fail() {
    let f = Fixture::new();
    let (_o, sock) = f.export_origin("end", 4 * MIB, 1, false);
    let mut c = Client::connect(&sock).expect("connect");
    let cap = c.capacity();
    let p = c.ptr(0);
    let q = &mut c.queues[0];
    assert_eq!(
        run1(q, |q| q.read(cap - 4096, p, 4096, 0, NO_FLAGS)).unwrap(),
        0,
        "last block must be readable"
    );
    let r = run1(q, |q| q.read(cap, p, 512, 1, NO_FLAGS)).unwrap();
    assert!(r < 0, "read at the end returned {r}");
    let r = run1(q, |q| q.read(cap - 512, p, 1024, 2, NO_FLAGS)).unwrap();
    assert!(r < 0, "read across the end returned {r}");
    let r = run1(q, |q| q.write(cap, p, 4096, 3, NO_FLAGS)).unwrap();
    assert!(r < 0, "write past the end returned {r}");
    let r = run1(q, |q| q.discard(cap - 4096, 8192, 4, NO_FLAGS)).unwrap();
    assert!(r < 0, "discard across the end returned {r}");
    // Still serving afterwards.
    assert_eq!(run1(q, |q| q.read(0, p, 4096, 5, NO_FLAGS)).unwrap(), 0);
}

#[test]
fn two_exports_do_not_see_each_other() {
    let f = Fixture::new();
    let (_oa, a) = f.export_origin("a", 4 * MIB, 2, false);
    let (_ob, b) = f.export_origin("b", 4 * MIB, 2, false);
    let mut ca = Client::connect(&a).expect("connect a");
    let mut cb = Client::connect(&b).expect("connect b");
    write_pattern(&mut ca, 8192, 65536, 0x11);
    write_pattern(&mut cb, 8192, 65536, 0x22);
    assert!(read_back(&mut ca, 8192, 65536).iter().all(|&x| x == 0x11));
    assert!(read_back(&mut cb, 8192, 65536).iter().all(|&x| x == 0x22));
    // Dropping one client does not disturb the other.
    drop(ca);
    write_pattern(&mut cb, 0, 4096, 0x33);
    assert!(read_back(&mut cb, 0, 4096).iter().all(|&x| x == 0x33));
    let names: Vec<_> = f.mgr.list().into_iter().map(|e| e.name).collect();
    assert_eq!(names, vec!["a".to_string(), "b".to_string()]);
}

fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    // A bounded poll, not a timing assertion: fails only if the state never arrives.
    for _ in 0..3000 {
        if cond() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    panic!("{what} never happened");
}

#[test]
fn reconnect_keeps_data_and_serves_again() {
    let f = Fixture::new();
    let (_o, sock) = f.export_origin("rc", 4 * MIB, 2, false);
    for round in 0..3u8 {
        let mut c = Client::connect(&sock).unwrap_or_else(|e| panic!("connect round {round}: {e}"));
        wait_until("export shows connected", || {
            f.mgr.get("rc").is_some_and(|i| i.connected)
        });
        if round > 0 {
            let got = read_back(&mut c, 4096 * u64::from(round - 1), 4096);
            assert!(
                got.iter().all(|&x| x == round),
                "data of round {} lost",
                round - 1
            );
        }
        write_pattern(&mut c, 4096 * u64::from(round), 4096, round + 1);
        drop(c);
        wait_until("export shows disconnected", || {
            f.mgr.get("rc").is_some_and(|i| !i.connected)
        });
    }
}

#[test]
fn remove_stops_serving_and_deletes_socket() {
    let f = Fixture::new();
    let (origin, sock) = f.export_origin("rm", 4 * MIB, 1, false);
    let mut c = Client::connect(&sock).expect("connect");
    write_pattern(&mut c, 0, 4096, 0x77);
    // Remove while the client is connected: it is disconnected, the socket disappears.
    f.mgr.remove("rm").expect("remove");
    assert!(!sock.exists(), "socket still exists after remove");
    assert!(f.mgr.get("rm").is_none());
    assert!(f.mgr.remove("rm").is_err(), "second remove must fail");
    let mut direct = vec![0u8; 4096];
    origin.volume().read(0, &mut direct).expect("read volume");
    assert!(direct.iter().all(|&x| x == 0x77), "data lost by remove");
    drop(c);
    // The same name and socket can be exported again, idle this time, and removed.
    let sock2 = f.export("rm", Arc::new(origin.volume()), 1, false);
    assert_eq!(sock, sock2);
    f.mgr.remove("rm").expect("remove idle export");
    assert!(!Path::new(&sock2).exists());
}

#[test]
fn add_refuses_duplicates_and_live_sockets() {
    let f = Fixture::new();
    let sock = f.export("x", mem_disk("x", MIB), 1, false);
    let dup = f
        .mgr
        .add_disk(ExportConfig::new("x", f.sock("other")), mem_disk("x2", MIB));
    assert!(
        matches!(dup, Err(snapmv::export::ExportError::AlreadyExists(_))),
        "{dup:?}"
    );
    let same_sock = f
        .mgr
        .add_disk(ExportConfig::new("y", sock.clone()), mem_disk("y", MIB));
    assert!(same_sock.is_err(), "two exports on one socket");
    // A socket some other manager (process) listens on is refused.
    let other = ExportManager::new();
    let live = other.add_disk(ExportConfig::new("z", sock), mem_disk("z", MIB));
    assert!(
        matches!(live, Err(snapmv::export::ExportError::SocketInUse(_))),
        "{live:?}"
    );
    // A stale socket file (nobody listening) is replaced.
    let stale = f.sock("stale");
    drop(std::os::unix::net::UnixListener::bind(&stale).expect("bind"));
    assert!(stale.exists());
    other
        .add_disk(ExportConfig::new("s", stale.clone()), mem_disk("s", MIB))
        .expect("stale socket replaced");
    Client::connect(&stale).expect("connect to the replacing export");
    // A regular file is never replaced.
    let file = f.dir.path().join("plain");
    std::fs::write(&file, b"keep").unwrap();
    let r = other.add_disk(ExportConfig::new("p", file.clone()), mem_disk("p", MIB));
    assert!(
        matches!(r, Err(snapmv::export::ExportError::NotASocket(_))),
        "{r:?}"
    );
    assert_eq!(std::fs::read(&file).unwrap(), b"keep");
}

#[test]
fn snapshot_export_serves_the_snapshot() {
    let f = Fixture::new();
    let (origin, osock) = f.export_origin("snap", 8 * MIB, 2, false);
    let mut oc = Client::connect(&osock).expect("connect origin");
    write_pattern(&mut oc, 0, 256 << 10, 0xA1);
    let tag = origin
        .create_snapshot(None, "before B")
        .expect("create snapshot");
    // The origin moves on; the snapshot keeps the old content.
    write_pattern(&mut oc, 64 << 10, 64 << 10, 0xB2);
    let ssock = f.export(
        "snap-1",
        Arc::new(origin.snapshot_volume(tag).expect("snapshot volume")),
        1,
        false,
    );
    assert!(f.mgr.get("snap-1").unwrap().volume.contains("snapshot"));
    let mut sc = Client::connect(&ssock).expect("connect snapshot");
    let got = read_back(&mut sc, 0, 256 << 10);
    assert!(
        got.iter().all(|&x| x == 0xA1),
        "snapshot does not hold the content at snapshot time"
    );
    let got = read_back(&mut oc, 0, 256 << 10);
    assert!(got[..64 << 10].iter().all(|&x| x == 0xA1));
    assert!(
        got[64 << 10..128 << 10].iter().all(|&x| x == 0xB2),
        "origin lost its new write"
    );
    assert!(got[128 << 10..].iter().all(|&x| x == 0xA1));
    // Snapshots are writable and writes to them stay out of the origin.
    write_pattern(&mut sc, 0, 4096, 0xC3);
    assert!(read_back(&mut sc, 0, 4096).iter().all(|&x| x == 0xC3));
    assert!(read_back(&mut oc, 0, 4096).iter().all(|&x| x == 0xA1));
}

#[test]
fn full_store_fails_writes_with_ioerr_and_keeps_serving() {
    let f = Fixture::new();
    // The smallest store the format allows leaves only a few spare chunks for copy-outs.
    let origin = f.origin_in_store("full", 32 * MIB, 5 * MIB);
    origin.create_snapshot(None, "pin").expect("snapshot");
    let sock = f.export("full", Arc::new(origin.volume()), 1, false);
    let mut c = Client::connect(&sock).expect("connect");
    // Overwrite the origin chunk by chunk: each first write copies a chunk out.
    let mut failed_at = None;
    for i in 0..(32 * MIB / (64 << 10)) {
        let p = c.ptr(0);
        let ret = run1(&mut c.queues[0], |q| {
            q.write(i * (64 << 10), p, 4096, 0, NO_FLAGS)
        })
        .unwrap();
        if ret != 0 {
            failed_at = Some((i, ret));
            break;
        }
    }
    let (i, ret) = failed_at.expect("a 5 MiB store cannot hold copies of a 32 MiB origin");
    assert_eq!(
        ret,
        -libc::EIO,
        "write to a full store at chunk {i} returned {ret}"
    );
    // Reads and chunks already copied out still work.
    let p = c.ptr(0);
    assert_eq!(
        run1(&mut c.queues[0], |q| q.read(0, p, 4096, 1, NO_FLAGS)).unwrap(),
        0
    );
    assert_eq!(
        run1(&mut c.queues[0], |q| q.write(0, p, 4096, 2, NO_FLAGS)).unwrap(),
        0
    );
}

/// A disk whose writes take a while, recording how many run at once and what a flush saw.
struct SlowDisk {
    inner: MemDisk,
    in_flight: std::sync::atomic::AtomicUsize,
    max_in_flight: std::sync::atomic::AtomicUsize,
    writes_done: std::sync::atomic::AtomicUsize,
    done_at_flush: std::sync::Mutex<Vec<usize>>,
}

impl BlockDisk for SlowDisk {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_vectored(
        &self,
        offset: u64,
        bufs: &mut [std::io::IoSliceMut<'_>],
    ) -> Result<(), snapmv::vhost_blk::DiskError> {
        self.inner.read_vectored(offset, bufs)
    }
    fn write_vectored(
        &self,
        offset: u64,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Result<(), snapmv::vhost_blk::DiskError> {
        use std::sync::atomic::Ordering::SeqCst;
        let now = self.in_flight.fetch_add(1, SeqCst) + 1;
        self.max_in_flight.fetch_max(now, SeqCst);
        // Like a copy-out waiting for the journal.
        std::thread::sleep(std::time::Duration::from_millis(2));
        let r = self.inner.write_vectored(offset, bufs);
        self.in_flight.fetch_sub(1, SeqCst);
        self.writes_done.fetch_add(1, SeqCst);
        r
    }
    fn flush(&self) -> Result<(), snapmv::vhost_blk::DiskError> {
        let done = self.writes_done.load(std::sync::atomic::Ordering::SeqCst);
        self.done_at_flush.lock().unwrap().push(done);
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), snapmv::vhost_blk::DiskError> {
        self.inner.discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), snapmv::vhost_blk::DiskError> {
        self.inner.write_zeroes(offset, len)
    }
    fn name(&self) -> String {
        self.inner.name()
    }
    fn physical_block_size(&self) -> u32 {
        4096
    }
}

#[test]
fn slow_writes_run_in_parallel_and_flush_waits_for_earlier_writes() {
    let f = Fixture::new();
    let disk = Arc::new(SlowDisk {
        inner: MemDisk::new("slow", 8 * MIB),
        in_flight: Default::default(),
        max_in_flight: Default::default(),
        writes_done: Default::default(),
        done_at_flush: Default::default(),
    });
    let sock = f.export("slow", disk.clone(), 1, false);
    let mut c = Client::connect(&sock).expect("connect");
    let base = c.region.addr;
    fill_random(&mut c.mem()[..16 * 4096], 5);
    let q = &mut c.queues[0];
    // Round 1 teaches the device that this disk is slow.
    for i in 0..16usize {
        q.write(
            i as u64 * 4096,
            (base + i * 4096) as *const u8,
            4096,
            i,
            NO_FLAGS,
        );
    }
    assert!(wait_for(q, 16).unwrap().iter().all(|&(_, r)| r == 0));
    // Round 2: 8 writes, a flush, 8 more writes, all queued before one kick.
    for i in 0..8usize {
        q.write(
            i as u64 * 4096,
            (base + i * 4096) as *const u8,
            4096,
            i,
            NO_FLAGS,
        );
    }
    q.flush(100, NO_FLAGS);
    for i in 8..16usize {
        q.write(
            i as u64 * 4096,
            (base + i * 4096) as *const u8,
            4096,
            i,
            NO_FLAGS,
        );
    }
    assert!(wait_for(q, 17).unwrap().iter().all(|&(_, r)| r == 0));
    let max = disk.max_in_flight.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        max >= 2,
        "slow writes of one queue never overlapped (max in flight {max})"
    );
    let flushes = disk.done_at_flush.lock().unwrap().clone();
    assert_eq!(flushes.len(), 1, "flushes seen: {flushes:?}");
    assert!(
        flushes[0] >= 24,
        "the flush ran after only {} of the 24 writes queued before it",
        flushes[0]
    );
    // Data intact.
    let got = read_back(&mut c, 0, 16 * 4096);
    let mut want = vec![0u8; 16 * 4096];
    fill_random(&mut want, 5);
    assert!(got == want, "data written in parallel differs");
}

#[test]
fn remove_during_io_and_with_a_silent_client_returns() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let f = Fixture::new();
    let (_o, sock) = f.export_origin("busy", 8 * MIB, 2, false);
    let done = Arc::new(AtomicU64::new(0));
    let stopped = Arc::new(AtomicBool::new(false));
    let client = {
        let (sock, done, stopped) = (sock.clone(), done.clone(), stopped.clone());
        std::thread::spawn(move || {
            let mut c = Client::connect(&sock).expect("connect");
            let base = c.region.addr;
            let q = &mut c.queues[0];
            let mut comps: Vec<std::mem::MaybeUninit<blkio::Completion>> =
                (0..8).map(|_| std::mem::MaybeUninit::uninit()).collect();
            'io: loop {
                for i in 0..8usize {
                    q.write(
                        i as u64 * 65536,
                        (base + i * 65536) as *const u8,
                        65536,
                        i,
                        NO_FLAGS,
                    );
                }
                let mut got = 0;
                while got < 8 {
                    // Short timeouts: once the export is gone nothing completes any more.
                    let mut t = std::time::Duration::from_secs(1);
                    match q.do_io(&mut comps[got..], 1, Some(&mut t), None) {
                        Ok(0) | Err(_) => break 'io,
                        Ok(n) => got += n,
                    }
                }
                done.fetch_add(8, Ordering::SeqCst);
            }
            stopped.store(true, Ordering::SeqCst);
        })
    };
    wait_until("some I/O completed", || done.load(Ordering::SeqCst) >= 64);
    f.mgr.remove("busy").expect("remove during I/O");
    assert!(!sock.exists());
    client.join().expect("client thread");
    assert!(stopped.load(Ordering::SeqCst));

    // A client that connects and says nothing does not block removal either.
    let (_o2, sock2) = f.export_origin("silent", MIB, 1, false);
    let _silent = std::os::unix::net::UnixStream::connect(&sock2).expect("raw connect");
    wait_until("export shows connected", || {
        f.mgr.get("silent").is_some_and(|i| i.connected)
    });
    f.mgr.remove("silent").expect("remove with a silent client");
    assert!(f.mgr.list().is_empty());
}

/// The export's statistics count exactly the requests a client issued, per kind, with their
/// bytes; failed requests count as errors only; nothing stays in flight.
#[test]
fn stats_count_exactly_the_requests_issued() {
    let f = Fixture::new();
    let (_o, sock) = f.export_origin("st", 8 * MIB, 2, false);
    let zero = f.mgr.stats("st").expect("stats of a new export");
    assert_eq!(
        zero,
        Default::default(),
        "a new export has counted something"
    );
    assert!(f.mgr.stats("nope").is_none());

    let mut c = Client::connect_with(
        &sock,
        &ClientOptions {
            num_queues: 2,
            ..Default::default()
        },
    )
    .expect("connect");
    let cap = c.capacity();
    let p = c.ptr(0);
    c.mem()[..1 << 20].fill(0x5A);
    let (mut reads, mut read_bytes, mut writes, mut write_bytes) = (0u64, 0u64, 0u64, 0u64);
    // Queue 0: writes of every size at queue depth 12, then as many reads.
    let mut off = 0u64;
    let q = &mut c.queues[0];
    for (i, &len) in SIZES.iter().enumerate() {
        q.write(off, p, len, i, NO_FLAGS);
        off += len as u64;
        writes += 1;
        write_bytes += len as u64;
    }
    assert!(wait_for(q, SIZES.len())
        .unwrap()
        .iter()
        .all(|&(_, r)| r == 0));
    off = 0;
    for (i, &len) in SIZES.iter().enumerate() {
        q.read(off, p, len, i, NO_FLAGS);
        off += len as u64;
        reads += 1;
        read_bytes += len as u64;
    }
    assert!(wait_for(q, SIZES.len())
        .unwrap()
        .iter()
        .all(|&(_, r)| r == 0));
    // Queue 1: flushes, discards, write-zeroes, more reads, and two requests that fail.
    let q = &mut c.queues[1];
    for i in 0..3 {
        assert_eq!(run1(q, |q| q.flush(i, NO_FLAGS)).unwrap(), 0);
    }
    for (i, len) in [64u64 << 10, 128 << 10].into_iter().enumerate() {
        assert_eq!(
            run1(q, |q| q.discard(4 * MIB, len, i, NO_FLAGS)).unwrap(),
            0
        );
    }
    for (i, len) in [4096u64, 8192, 512, 1 << 20].into_iter().enumerate() {
        assert_eq!(
            run1(q, |q| q.write_zeroes(5 * MIB, len, i, NO_FLAGS)).unwrap(),
            0
        );
    }
    for i in 0..5 {
        assert_eq!(
            run1(q, |q| q.read(6 * MIB, p, 4096, i, NO_FLAGS)).unwrap(),
            0
        );
        reads += 1;
        read_bytes += 4096;
    }
    assert!(run1(q, |q| q.read(cap, p, 4096, 0, NO_FLAGS)).unwrap() < 0);
    assert!(run1(q, |q| q.write(cap - 512, p, 4096, 0, NO_FLAGS)).unwrap() < 0);

    let s = f.mgr.stats("st").expect("stats");
    assert_eq!((s.reads, s.read_bytes), (reads, read_bytes), "{s:?}");
    assert_eq!((s.writes, s.write_bytes), (writes, write_bytes), "{s:?}");
    assert_eq!(s.flushes, 3, "{s:?}");
    assert_eq!((s.discards, s.discard_bytes), (2, 192 << 10), "{s:?}");
    assert_eq!(
        (s.write_zeroes, s.write_zeroes_bytes),
        (4, 4096 + 8192 + 512 + (1 << 20)),
        "{s:?}"
    );
    assert_eq!(s.errors, 2, "{s:?}");
    assert_eq!(s.in_flight, 0, "{s:?}");
    let l = &s.latency_us;
    assert_eq!(
        (
            l.read.count,
            l.write.count,
            l.flush.count,
            l.discard.count,
            l.write_zeroes.count
        ),
        (reads, writes, 3, 2, 4)
    );
    assert!(l.read.p50 > 0.0 && l.read.p50 <= l.read.p99 && l.read.p99 <= l.read.p99_9);
    assert!(l.write.mean > 0.0);

    // The counters outlive the connection and keep counting on the next one.
    drop(c);
    let mut c = Client::connect(&sock).expect("reconnect");
    read_back(&mut c, 0, 4096);
    let s2 = f.mgr.stats("st").expect("stats");
    assert_eq!(s2.reads, reads + 1);
    assert_eq!(s2.writes, writes);
}
