//! Hostile guests (issue 7, item 3), for what tests/vhost_protocol.rs (hostile descriptor
//! chains) does not cover: a guest that never consumes its used entries (and reuses heads it
//! never got back, or jumps its avail index past the ring), a frontend that disconnects while
//! its requests are still running on a slow disk, and vhost-user messages out of order. After
//! each, the export accepts a new frontend and serves it, a second export never noticed, and
//! no thread of the backend panicked.
//!
//! The frontend helpers are a trimmed copy of those in tests/vhost_protocol.rs.

use std::fs::File;
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::FromRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use snapmv::export::{ExportConfig, ExportManager};
use snapmv::vhost_blk::{BlockDisk, DiskError, MemDisk};
use snapmv_tests::blkio_client::{run1, Client, NO_FLAGS};
use vhost::vhost_user::message::{
    VhostUserHeaderFlag, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

const MIB: u64 = 1 << 20;
const DISK_SIZE: u64 = 4 * MIB;
const MEM_SIZE: usize = 4 << 20;
const QSIZE: u16 = 16;
const DATA: u64 = 0x20_0000;
const NEXT: u16 = VRING_DESC_F_NEXT as u16;
const WRITE: u16 = VRING_DESC_F_WRITE as u16;

/// Panics anywhere in this process (backend threads included) since the hook was installed.
static PANICS: AtomicU64 = AtomicU64::new(0);

fn count_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICS.fetch_add(1, Ordering::SeqCst);
            prev(info);
        }));
    });
}

fn memfd(size: usize) -> File {
    // SAFETY: memfd_create with a valid NUL-terminated name; the fd is checked and then owned
    // by the File.
    let fd = unsafe { libc::memfd_create(c"snapmv-hostile-guest".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(size as u64).expect("size the memfd");
    f
}

struct Guest {
    mem: GuestMemoryMmap<()>,
    info: VhostUserMemoryRegionInfo,
    fe: Frontend,
    next_avail: u16,
    kick: EventFd,
}

const DESC: u64 = 0x1_0000;
const AVAIL: u64 = 0x1_1000;
const USED: u64 = 0x1_2000;

impl Guest {
    /// Connects and negotiates (SET_OWNER, features, protocol features) without memory or
    /// queues.
    fn connect(sock: &Path) -> Guest {
        let mut fe = Frontend::connect(sock, 1).expect("connect");
        fe.set_owner().expect("SET_OWNER");
        let features = fe.get_features().expect("GET_FEATURES");
        fe.get_protocol_features().expect("GET_PROTOCOL_FEATURES");
        fe.set_protocol_features(
            VhostUserProtocolFeatures::CONFIG
                | VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
                | VhostUserProtocolFeatures::REPLY_ACK,
        )
        .expect("SET_PROTOCOL_FEATURES");
        // Every message asks for an answer, so that refusals are seen.
        fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        fe.set_features(
            features
                & ((1u64 << VIRTIO_F_VERSION_1)
                    | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()),
        )
        .expect("SET_FEATURES");
        let file = memfd(MEM_SIZE);
        let mem = GuestMemoryMmap::<()>::from_ranges_with_files([(
            GuestAddress(0),
            MEM_SIZE,
            Some(FileOffset::new(file, 0)),
        )])
        .expect("map guest memory");
        let info =
            VhostUserMemoryRegionInfo::from_guest_region(mem.iter().next().unwrap()).unwrap();
        Guest {
            mem,
            info,
            fe,
            next_avail: 0,
            kick: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        }
    }

    fn host(&self, gpa: u64) -> u64 {
        self.mem.get_host_address(GuestAddress(gpa)).unwrap() as u64
    }

    fn vring_config(&self) -> VringConfigData {
        VringConfigData {
            queue_max_size: QSIZE,
            queue_size: QSIZE,
            flags: 0,
            desc_table_addr: self.host(DESC),
            used_ring_addr: self.host(USED),
            avail_ring_addr: self.host(AVAIL),
            log_addr: None,
        }
    }

    /// SET_MEM_TABLE and queue 0 set up and enabled, in the proper order.
    fn start(&mut self) {
        self.fe.set_mem_table(&[self.info]).expect("SET_MEM_TABLE");
        self.fe.set_vring_num(0, QSIZE).expect("SET_VRING_NUM");
        let cfg = self.vring_config();
        self.fe.set_vring_addr(0, &cfg).expect("SET_VRING_ADDR");
        self.fe.set_vring_base(0, 0).expect("SET_VRING_BASE");
        self.fe
            .set_vring_kick(0, &self.kick)
            .expect("SET_VRING_KICK");
        self.fe.set_vring_enable(0, true).expect("SET_VRING_ENABLE");
    }

    fn write_desc(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&addr.to_le_bytes());
        b[8..12].copy_from_slice(&len.to_le_bytes());
        b[12..14].copy_from_slice(&flags.to_le_bytes());
        b[14..16].copy_from_slice(&next.to_le_bytes());
        self.mem
            .write_slice(&b, GuestAddress(DESC + 16 * u64::from(index)))
            .unwrap();
    }

    /// A request chain at descriptors `3*slot..`: header, 4 KiB of data, status.
    fn chain(&self, slot: u16, rtype: u32, sector: u64) -> u16 {
        let base = DATA + u64::from(slot) * 0x2000;
        let (hdr, status, data) = (base, base + 0x10, base + 0x1000);
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&rtype.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(hdr)).unwrap();
        self.mem.write_obj(0xffu8, GuestAddress(status)).unwrap();
        let dflags = if rtype == VIRTIO_BLK_T_IN { WRITE } else { 0 };
        let i = slot * 3;
        self.write_desc(i, hdr, 16, NEXT, i + 1);
        self.write_desc(i + 1, data, 4096, dflags | NEXT, i + 2);
        self.write_desc(i + 2, status, 1, WRITE, 0);
        i
    }

    fn status(&self, slot: u16) -> u8 {
        let base = DATA + u64::from(slot) * 0x2000;
        self.mem.read_obj(GuestAddress(base + 0x10)).unwrap()
    }

    /// Puts `head` in the next avail slot; `advance` is added to the avail index (1 for a
    /// well-behaved guest).
    fn post(&mut self, head: u16, advance: u16) {
        let slot = AVAIL + 4 + 2 * u64::from(self.next_avail % QSIZE);
        self.mem.write_obj(head, GuestAddress(slot)).unwrap();
        self.next_avail = self.next_avail.wrapping_add(advance);
        std::sync::atomic::fence(Ordering::SeqCst);
        self.mem
            .write_obj(self.next_avail, GuestAddress(AVAIL + 2))
            .unwrap();
        std::sync::atomic::fence(Ordering::SeqCst);
        self.kick.write(1).unwrap();
    }

    fn used_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(USED + 2)).unwrap()
    }

    /// Waits (bounded poll, a hang guard) until the used index reaches `n`.
    fn wait_used_idx(&self, n: u16) -> bool {
        for _ in 0..5000 {
            if self.used_idx() == n {
                return true;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        false
    }
}

/// A disk that takes its time, so that requests are still running when the frontend leaves.
struct SlowDisk {
    inner: MemDisk,
    delay: Duration,
    done: AtomicU64,
}

impl BlockDisk for SlowDisk {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_vectored(&self, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> Result<(), DiskError> {
        std::thread::sleep(self.delay);
        let r = self.inner.read_vectored(offset, bufs);
        self.done.fetch_add(1, Ordering::SeqCst);
        r
    }
    fn write_vectored(&self, offset: u64, bufs: &[IoSlice<'_>]) -> Result<(), DiskError> {
        std::thread::sleep(self.delay);
        let r = self.inner.write_vectored(offset, bufs);
        self.done.fetch_add(1, Ordering::SeqCst);
        r
    }
    fn flush(&self) -> Result<(), DiskError> {
        self.inner.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        self.inner.discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        self.inner.write_zeroes(offset, len)
    }
    fn name(&self) -> String {
        "slow disk".into()
    }
    fn physical_block_size(&self) -> u32 {
        512
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    _mgr: ExportManager,
    hostile: PathBuf,
    bystander: PathBuf,
    slow: Arc<SlowDisk>,
}

fn fixture(delay: Duration) -> Fixture {
    count_panics();
    let dir = tempfile::Builder::new()
        .prefix("snapmv-hguest-")
        .tempdir_in("/tmp")
        .unwrap();
    let mgr = ExportManager::new();
    let slow = Arc::new(SlowDisk {
        inner: MemDisk::new("slow", DISK_SIZE),
        delay,
        done: AtomicU64::new(0),
    });
    let hostile = dir.path().join("hostile.sock");
    let bystander = dir.path().join("bystander.sock");
    mgr.add_disk(ExportConfig::new("hostile", &hostile), slow.clone())
        .unwrap();
    mgr.add_disk(
        ExportConfig::new("bystander", &bystander),
        Arc::new(MemDisk::new("bystander", DISK_SIZE)),
    )
    .unwrap();
    Fixture {
        _dir: dir,
        _mgr: mgr,
        hostile,
        bystander,
        slow,
    }
}

/// A well-behaved client writes and reads back a block on `sock` (the export is alive).
fn serves(sock: &Path, byte: u8) {
    let mut c = Client::connect(sock).unwrap_or_else(|e| panic!("{}: {e}", sock.display()));
    c.mem()[..4096].fill(byte);
    let p = c.ptr(0);
    let r = run1(&mut c.queues[0], |q| q.write(8192, p, 4096, 0, NO_FLAGS)).unwrap();
    assert_eq!(r, 0, "write on {}", sock.display());
    c.mem()[..4096].fill(0);
    let r = run1(&mut c.queues[0], |q| q.read(8192, p, 4096, 0, NO_FLAGS)).unwrap();
    assert_eq!(r, 0, "read on {}", sock.display());
    assert!(c.mem()[..4096].iter().all(|&b| b == byte));
}

fn after(f: &Fixture, byte: u8) {
    serves(&f.bystander, byte);
    serves(&f.hostile, byte);
    assert_eq!(
        PANICS.load(Ordering::SeqCst),
        0,
        "a thread panicked (see the output above)"
    );
}

#[test]
fn guest_that_never_consumes_used_entries() {
    let f = fixture(Duration::ZERO);
    {
        let mut g = Guest::connect(&f.hostile);
        g.start();
        // One chain, made available again and again without the guest ever reading a used
        // entry: 5 rings' worth, one at a time so each stays within the ring's window.
        let head = g.chain(0, VIRTIO_BLK_T_OUT, 0);
        let n = 5 * QSIZE;
        for i in 1..=n {
            g.post(head, 1);
            assert!(g.wait_used_idx(i), "request {i} was not completed");
        }
        assert_eq!(g.status(0), VIRTIO_BLK_S_OK as u8);
        // Now all of it at once, without waiting: more entries than the ring holds.
        for _ in 0..3 * QSIZE {
            g.post(head, 1);
        }
        // And an avail index that jumps past the ring: the device must refuse, not loop.
        g.post(head, 3 * QSIZE);
        std::thread::sleep(Duration::from_millis(100));
        serves(&f.bystander, 0x11);
    }
    after(&f, 0x12);
}

#[test]
fn frontend_disconnects_while_requests_run() {
    let f = fixture(Duration::from_millis(150));
    for round in 0..3u8 {
        let started = f.slow.done.load(Ordering::SeqCst);
        {
            let mut g = Guest::connect(&f.hostile);
            g.start();
            // A queue full of reads and writes on the slow disk; the reads will write into
            // guest memory after the frontend has gone.
            for slot in 0..QSIZE / 3 {
                let t = if slot % 2 == 0 {
                    VIRTIO_BLK_T_IN
                } else {
                    VIRTIO_BLK_T_OUT
                };
                let head = g.chain(slot, t, u64::from(slot) * 8);
                g.post(head, 1);
            }
            // Gone while they run: the frontend socket closes and the guest memory is
            // unmapped on this side.
            drop(g);
        }
        // The export takes a new frontend once the old requests are done (hang guard).
        let mut tries = 0;
        while f.slow.done.load(Ordering::SeqCst) == started && tries < 100 {
            std::thread::sleep(Duration::from_millis(20));
            tries += 1;
        }
        serves(&f.bystander, round);
    }
    after(&f, 0x21);
}

#[test]
fn vhost_user_messages_out_of_order() {
    let f = fixture(Duration::ZERO);
    type Step = Box<dyn Fn(&mut Guest) -> Result<(), String>>;
    let e = |what: &'static str| move |err: vhost::Error| format!("{what}: {err}");
    let scenarios: Vec<(&str, Step)> = vec![
        (
            "rings before the memory table, then a kick",
            Box::new(move |g: &mut Guest| {
                g.fe.set_vring_num(0, QSIZE).map_err(e("num"))?;
                let cfg = g.vring_config();
                g.fe.set_vring_addr(0, &cfg).map_err(e("addr"))?;
                g.fe.set_vring_kick(0, &g.kick).map_err(e("kick"))?;
                g.fe.set_vring_enable(0, true).map_err(e("enable"))?;
                let head = g.chain(0, VIRTIO_BLK_T_OUT, 0);
                g.post(head, 1);
                Ok(())
            }),
        ),
        (
            "queue sizes 0, 3 and 65535, queue index 99",
            Box::new(move |g: &mut Guest| {
                let r = [
                    g.fe.set_vring_num(0, 0).is_err(),
                    g.fe.set_vring_num(0, 3).is_err(),
                    g.fe.set_vring_num(0, 65535).is_err(),
                    g.fe.set_vring_num(99, QSIZE).is_err(),
                    g.fe.set_vring_base(99, 0).is_err(),
                    g.fe.get_vring_base(99).is_err(),
                ];
                Err(format!("refused: {r:?}"))
            }),
        ),
        (
            "ring addresses outside guest memory",
            Box::new(move |g: &mut Guest| {
                g.fe.set_mem_table(&[g.info]).map_err(e("mem"))?;
                g.fe.set_vring_num(0, QSIZE).map_err(e("num"))?;
                let mut cfg = g.vring_config();
                cfg.desc_table_addr = 0xdead_0000_0000;
                cfg.used_ring_addr = u64::MAX - 7;
                let _ = g.fe.set_vring_addr(0, &cfg);
                let _ = g.fe.set_vring_kick(0, &g.kick);
                let _ = g.fe.set_vring_enable(0, true);
                g.kick.write(1).unwrap();
                Ok(())
            }),
        ),
        (
            "GET_VRING_BASE (stop) then kicks, then the memory table again while running",
            Box::new(move |g: &mut Guest| {
                g.start();
                let head = g.chain(0, VIRTIO_BLK_T_OUT, 0);
                g.post(head, 1);
                let _ = g.fe.get_vring_base(0);
                g.post(head, 1);
                let _ = g.fe.set_mem_table(&[g.info]);
                let _ = g.fe.set_vring_base(0, 7);
                let _ = g.fe.set_vring_enable(0, true);
                g.post(head, 1);
                Ok(())
            }),
        ),
        (
            "features nobody offered, after the rings started",
            Box::new(move |g: &mut Guest| {
                g.start();
                let _ = g.fe.set_features(u64::MAX);
                let head = g.chain(0, VIRTIO_BLK_T_IN, 0);
                g.post(head, 1);
                Ok(())
            }),
        ),
        (
            "SET_OWNER twice and RESET_OWNER mid-flight",
            Box::new(move |g: &mut Guest| {
                g.start();
                let _ = g.fe.set_owner();
                let head = g.chain(0, VIRTIO_BLK_T_OUT, 0);
                g.post(head, 1);
                let _ = g.fe.reset_owner();
                g.post(head, 1);
                Ok(())
            }),
        ),
    ];
    for (i, (what, step)) in scenarios.into_iter().enumerate() {
        {
            let mut g = Guest::connect(&f.hostile);
            // Whether a message is refused or accepted is the backend's choice; it must not
            // panic, and the export must come back for the next frontend.
            if let Err(err) = step(&mut g) {
                eprintln!("{what}: refused ({err})");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        serves(&f.hostile, i as u8 + 1);
        serves(&f.bystander, i as u8 + 1);
        assert_eq!(PANICS.load(Ordering::SeqCst), 0, "after '{what}'");
    }
    after(&f, 0x31);
}

/// Many short-lived blkio clients, each doing its first request right after connecting (the
/// pattern of `tests/crash_kill.rs`'s verification, which saw a first read refused with
/// "guest buffer … is not inside guest memory" twice in ~2,000 connections).
/// `SNAPMV_RECONNECTS` (default 200) sets the number of connections.
#[test]
fn first_request_of_a_new_connection_sees_its_memory() {
    let f = fixture(Duration::ZERO);
    let n: u64 = std::env::var("SNAPMV_RECONNECTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let mut refused = Vec::new();
    for i in 0..n {
        let mut c = Client::connect(&f.bystander).unwrap();
        let p = c.ptr(0);
        let r = run1(&mut c.queues[0], |q| q.read(0, p, 4096, 0, NO_FLAGS)).unwrap();
        if r != 0 {
            refused.push((i, r));
        }
    }
    assert!(
        refused.is_empty(),
        "{} of {n} first reads failed: {refused:?}",
        refused.len()
    );
}
