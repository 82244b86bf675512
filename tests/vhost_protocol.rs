//! The vhost-user protocol as Cloud Hypervisor and QEMU drive it, replayed with the `vhost`
//! crate's frontend against an in-process export; then hostile descriptor chains built by hand
//! in the shared guest memory. The daemon must answer them with IOERR/UNSUPP (or, when the chain
//! offers no writable status byte, a used entry of length 0 or none) and keep serving, and a
//! second export of the same manager must not notice.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use snapmv::export::{ExportConfig, ExportManager};
use snapmv::vhost_blk::{BlockDisk, MemDisk};
use snapmv_tests::blkio_client::{run1, Client, NO_FLAGS};
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserDirtyLogRegion, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

const MIB: u64 = 1 << 20;
const DISK_SIZE: u64 = 16 * MIB;
const MEM_SIZE: usize = 8 << 20;
const QSIZE: u16 = 16;
/// Where the data buffers live in guest memory.
const DATA: u64 = 0x20_0000;
/// A guest address no memory region covers.
const NOWHERE: u64 = 0x4000_0000;

const NEXT: u16 = VRING_DESC_F_NEXT as u16;
const WRITE: u16 = VRING_DESC_F_WRITE as u16;
const INDIRECT: u16 = VRING_DESC_F_INDIRECT as u16;

fn memfd(size: usize) -> File {
    // SAFETY: memfd_create with a valid NUL-terminated name; the returned fd is checked and
    // then owned by the File.
    let fd = unsafe { libc::memfd_create(c"snapmv-test-guest".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(size as u64).expect("size the memfd");
    f
}

/// The frontend's side: guest memory and the rings of the queues it set up.
struct Guest {
    mem: GuestMemoryMmap<()>,
    fe: Frontend,
    queues: Vec<Vq>,
}

struct Vq {
    desc: u64,
    avail: u64,
    used: u64,
    next_avail: u16,
    last_used: u16,
    kick: EventFd,
    call: Option<EventFd>,
}

/// One descriptor as the test writes it.
#[derive(Clone, Copy)]
struct D {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

fn d(addr: u64, len: u32, flags: u16, next: u16) -> D {
    D {
        addr,
        len,
        flags,
        next,
    }
}

impl Guest {
    fn memory() -> (GuestMemoryMmap<()>, VhostUserMemoryRegionInfo) {
        let file = memfd(MEM_SIZE);
        let mem = GuestMemoryMmap::<()>::from_ranges_with_files([(
            GuestAddress(0),
            MEM_SIZE,
            Some(FileOffset::new(file, 0)),
        )])
        .expect("map guest memory");
        let region = mem.iter().next().expect("one region");
        let info = VhostUserMemoryRegionInfo::from_guest_region(region).expect("region info");
        (mem, info)
    }

    fn host_addr(&self, gpa: u64) -> u64 {
        self.mem
            .get_host_address(GuestAddress(gpa))
            .expect("gpa in memory") as u64
    }

    /// Ring addresses of queue `i`.
    fn ring_layout(i: usize) -> (u64, u64, u64) {
        let base = 0x1_0000 * (i as u64 + 1);
        (base, base + 0x1000, base + 0x2000)
    }

    /// Sets up and enables queue `i` (SET_VRING_NUM/ADDR/BASE, optional CALL, KICK, ENABLE).
    fn setup_queue(&mut self, i: usize, with_call: bool) {
        let (desc, avail, used) = Self::ring_layout(i);
        self.fe.set_vring_num(i, QSIZE).expect("SET_VRING_NUM");
        let cfg = VringConfigData {
            queue_max_size: QSIZE,
            queue_size: QSIZE,
            flags: 0,
            desc_table_addr: self.host_addr(desc),
            used_ring_addr: self.host_addr(used),
            avail_ring_addr: self.host_addr(avail),
            log_addr: None,
        };
        self.fe.set_vring_addr(i, &cfg).expect("SET_VRING_ADDR");
        self.fe.set_vring_base(i, 0).expect("SET_VRING_BASE");
        let call = with_call.then(|| {
            let e = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
            self.fe.set_vring_call(i, &e).expect("SET_VRING_CALL");
            e
        });
        let kick = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        self.fe.set_vring_kick(i, &kick).expect("SET_VRING_KICK");
        self.fe.set_vring_enable(i, true).expect("SET_VRING_ENABLE");
        self.queues.push(Vq {
            desc,
            avail,
            used,
            next_avail: 0,
            last_used: 0,
            kick,
            call,
        });
    }

    fn write_desc(&self, table: u64, index: u16, x: D) {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&x.addr.to_le_bytes());
        b[8..12].copy_from_slice(&x.len.to_le_bytes());
        b[12..14].copy_from_slice(&x.flags.to_le_bytes());
        b[14..16].copy_from_slice(&x.next.to_le_bytes());
        self.mem
            .write_slice(&b, GuestAddress(table + 16 * u64::from(index)))
            .expect("write descriptor");
    }

    /// Writes `descs` at indices 0.. of queue `q`'s table and makes head `head` available.
    fn post(&mut self, q: usize, descs: &[D], head: u16) {
        let vq = &self.queues[q];
        for (i, x) in descs.iter().enumerate() {
            self.write_desc(vq.desc, i as u16, *x);
        }
        self.post_head(q, head);
    }

    fn post_head(&mut self, q: usize, head: u16) {
        let vq = &mut self.queues[q];
        let slot = vq.avail + 4 + 2 * u64::from(vq.next_avail % QSIZE);
        self.mem
            .write_obj(head, GuestAddress(slot))
            .expect("avail entry");
        vq.next_avail = vq.next_avail.wrapping_add(1);
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.mem
            .write_obj(vq.next_avail, GuestAddress(vq.avail + 2))
            .expect("avail idx");
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        vq.kick.write(1).expect("kick");
    }

    fn used_idx(&self, q: usize) -> u16 {
        self.mem
            .read_obj::<u16>(GuestAddress(self.queues[q].used + 2))
            .expect("used idx")
    }

    /// Waits until the used ring holds `n` new entries and returns them as (id, len).
    fn wait_used(&mut self, q: usize, n: u16) -> Vec<(u32, u32)> {
        // A bounded poll, not a timing assertion: fails only if the entries never come.
        let mut tries = 0;
        while self.used_idx(q).wrapping_sub(self.queues[q].last_used) < n {
            tries += 1;
            assert!(
                tries < 10_000,
                "queue {q}: waited for {n} used entries, have {}",
                self.used_idx(q).wrapping_sub(self.queues[q].last_used)
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        let vq = &mut self.queues[q];
        let mut out = Vec::new();
        for _ in 0..n {
            let e = vq.used + 4 + 8 * u64::from(vq.last_used % QSIZE);
            let id: u32 = self.mem.read_obj(GuestAddress(e)).expect("used id");
            let len: u32 = self.mem.read_obj(GuestAddress(e + 4)).expect("used len");
            out.push((id, len));
            vq.last_used = vq.last_used.wrapping_add(1);
        }
        out
    }

    fn put_header(&self, at: u64, rtype: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&rtype.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem
            .write_slice(&h, GuestAddress(at))
            .expect("write header");
    }

    fn byte(&self, at: u64) -> u8 {
        self.mem.read_obj(GuestAddress(at)).expect("read byte")
    }

    fn set_byte(&self, at: u64, v: u8) {
        self.mem.write_obj(v, GuestAddress(at)).expect("write byte")
    }

    fn fill(&self, at: u64, len: usize, v: u8) {
        self.mem
            .write_slice(&vec![v; len], GuestAddress(at))
            .expect("fill")
    }

    fn bytes(&self, at: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read_slice(&mut v, GuestAddress(at)).expect("read");
        v
    }

    /// A plain request: header at DATA, `len` bytes of data at DATA+0x1000, status at DATA+0x10.
    /// Returns (status, used len).
    fn request(
        &mut self,
        q: usize,
        rtype: u32,
        sector: u64,
        len: u32,
        device_writes: bool,
    ) -> (u8, u32) {
        let hdr = DATA;
        let status = DATA + 0x10;
        let data = DATA + 0x1000;
        self.put_header(hdr, rtype, sector);
        self.set_byte(status, 0xFF);
        let dflags = if device_writes { WRITE } else { 0 };
        let descs = if len > 0 {
            vec![
                d(hdr, 16, NEXT, 1),
                d(data, len, dflags | NEXT, 2),
                d(status, 1, WRITE, 0),
            ]
        } else {
            vec![d(hdr, 16, NEXT, 1), d(status, 1, WRITE, 0)]
        };
        self.post(q, &descs, 0);
        let u = self.wait_used(q, 1);
        assert_eq!(u[0].0, 0, "used id");
        (self.byte(status), u[0].1)
    }
}

const S_OK: u8 = VIRTIO_BLK_S_OK as u8;
const S_IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const S_UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

struct Fixture {
    dir: tempfile::TempDir,
    mgr: ExportManager,
}

impl Fixture {
    fn new() -> Fixture {
        Fixture {
            dir: tempfile::tempdir().expect("temp dir"),
            mgr: ExportManager::new(),
        }
    }

    fn export(&self, name: &str, disk: Arc<dyn BlockDisk>, queues: u16, readonly: bool) -> PathBuf {
        let sock = self.dir.path().join(format!("{name}.sock"));
        let mut cfg = ExportConfig::new(name, &sock);
        cfg.num_queues = queues;
        cfg.readonly = readonly;
        self.mgr.add_disk(cfg, disk).expect("add export");
        sock
    }
}

fn le32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}

fn expected_features(readonly: bool) -> u64 {
    let mut f = (1u64 << VIRTIO_F_VERSION_1)
        | (1 << VIRTIO_RING_F_EVENT_IDX)
        | (1 << VIRTIO_RING_F_INDIRECT_DESC)
        | (1 << VIRTIO_BLK_F_SEG_MAX)
        | (1 << VIRTIO_BLK_F_SIZE_MAX)
        | (1 << VIRTIO_BLK_F_BLK_SIZE)
        | (1 << VIRTIO_BLK_F_TOPOLOGY)
        | (1 << VIRTIO_BLK_F_FLUSH)
        | (1 << VIRTIO_BLK_F_CONFIG_WCE)
        | (1 << VIRTIO_BLK_F_DISCARD)
        | (1 << VIRTIO_BLK_F_WRITE_ZEROES)
        | (1 << VIRTIO_BLK_F_MQ)
        | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
        | VhostUserVirtioFeatures::LOG_ALL.bits();
    if readonly {
        f |= 1 << VIRTIO_BLK_F_RO;
    }
    f
}

/// Cloud Hypervisor's sequence: at VM creation SET_OWNER, GET_FEATURES, GET_PROTOCOL_FEATURES,
/// SET_PROTOCOL_FEATURES, GET_QUEUE_NUM, GET_CONFIG(0, 60, flags 1); at DRIVER_OK SET_FEATURES,
/// SET_MEM_TABLE, per queue SET_VRING_NUM/ADDR/BASE, no SET_VRING_CALL, SET_VRING_KICK,
/// SET_VRING_ENABLE(1). Every message after SET_PROTOCOL_FEATURES carries NEED_REPLY.
/// Returns the guest and the 60 config bytes.
fn connect_like_cloud_hypervisor(sock: &Path, queues: usize, readonly: bool) -> (Guest, Vec<u8>) {
    let fe = Frontend::connect(sock, queues as u64).expect("connect");
    fe.set_owner().expect("SET_OWNER");
    let features = fe.get_features().expect("GET_FEATURES");
    assert_eq!(
        features,
        expected_features(readonly),
        "offered virtio features {features:#x}"
    );
    let mut fe = fe;
    let pf = fe.get_protocol_features().expect("GET_PROTOCOL_FEATURES");
    let want = VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
        | VhostUserProtocolFeatures::REPLY_ACK;
    assert!(pf.contains(want), "protocol features {pf:?} lack {want:?}");
    fe.set_protocol_features(want)
        .expect("SET_PROTOCOL_FEATURES");
    fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    let qn = fe.get_queue_num().expect("GET_QUEUE_NUM");
    assert_eq!(qn, queues as u64, "GET_QUEUE_NUM");
    let (_, cfg) = fe
        .get_config(0, 60, VhostUserConfigFlags::WRITABLE, &[0u8; 60])
        .expect("GET_CONFIG(0, 60, 1)");
    assert_eq!(cfg.len(), 60);
    // DRIVER_OK
    let acked = features
        & ((1u64 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1 << VIRTIO_BLK_F_SEG_MAX)
            | (1 << VIRTIO_BLK_F_BLK_SIZE)
            | (1 << VIRTIO_BLK_F_FLUSH)
            | (1 << VIRTIO_BLK_F_DISCARD)
            | (1 << VIRTIO_BLK_F_WRITE_ZEROES)
            | (1 << VIRTIO_BLK_F_MQ)
            | (1 << VIRTIO_BLK_F_RO)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits());
    fe.set_features(acked).expect("SET_FEATURES");
    let (mem, info) = Guest::memory();
    fe.set_mem_table(&[info]).expect("SET_MEM_TABLE");
    let mut g = Guest {
        mem,
        fe,
        queues: Vec::new(),
    };
    for i in 0..queues {
        g.setup_queue(i, false);
    }
    (g, cfg.to_vec())
}

#[test]
fn cloud_hypervisor_negotiation_and_config_space() {
    let f = Fixture::new();
    let disk = Arc::new(MemDisk::new("ch-disk", DISK_SIZE));
    let sock = f.export("ch", disk, 3, false);
    let (mut g, cfg) = connect_like_cloud_hypervisor(&sock, 3, false);
    assert_eq!(
        u64::from_le_bytes(cfg[0..8].try_into().unwrap()),
        DISK_SIZE / 512,
        "capacity"
    );
    assert_eq!(le32(&cfg, 8), 1 << 20, "size_max");
    assert_eq!(le32(&cfg, 12), 254, "seg_max");
    assert_eq!(le32(&cfg, 20), 512, "blk_size");
    assert_eq!(cfg[24], 3, "physical_block_exp: 4096 = 512 << 3");
    assert_eq!(cfg[32], 1, "writeback");
    assert_eq!(u16::from_le_bytes([cfg[34], cfg[35]]), 3, "num_queues");
    assert_eq!(le32(&cfg, 36), 1 << 22, "max_discard_sectors");
    assert_eq!(le32(&cfg, 40), 32, "max_discard_seg");
    assert_eq!(le32(&cfg, 44), 8, "discard_sector_alignment");
    assert_eq!(le32(&cfg, 48), 1 << 22, "max_write_zeroes_sectors");
    assert_eq!(le32(&cfg, 52), 32, "max_write_zeroes_seg");
    assert_eq!(cfg[56], 1, "write_zeroes_may_unmap");
    assert!(cfg[57..60].iter().all(|&b| b == 0));

    // Every queue serves I/O without a call fd: write on queue 2, read back on queue 0.
    g.fill(DATA + 0x1000, 4096, 0x5C);
    assert_eq!(g.request(2, VIRTIO_BLK_T_OUT, 8, 4096, false), (S_OK, 1));
    g.fill(DATA + 0x1000, 4096, 0);
    assert_eq!(g.request(0, VIRTIO_BLK_T_IN, 8, 4096, true), (S_OK, 4097));
    assert!(g.bytes(DATA + 0x1000, 4096).iter().all(|&b| b == 0x5C));
    assert_eq!(g.request(1, VIRTIO_BLK_T_FLUSH, 0, 0, false), (S_OK, 1));

    // GET_ID answers the export name.
    let (st, len) = g.request(1, VIRTIO_BLK_T_GET_ID, 0, 20, true);
    assert_eq!((st, len), (S_OK, 21));
    assert_eq!(&g.bytes(DATA + 0x1000, 20)[..3], b"ch\0");

    // Reset: SET_VRING_ENABLE(0) then GET_VRING_BASE reports how far the ring was consumed.
    g.fe.set_vring_enable(0, false)
        .expect("SET_VRING_ENABLE(0)");
    assert_eq!(g.fe.get_vring_base(0).expect("GET_VRING_BASE"), 1);
    assert_eq!(g.fe.get_vring_base(1).expect("GET_VRING_BASE"), 2);
}

/// QEMU's order: no SET_OWNER first, GET_MAX_MEM_SLOTS, GET_CONFIG of 57 bytes, memory through
/// ADD_MEM_REG, call fds, EVENT_IDX and INDIRECT_DESC acked; an indirect request works and the
/// call eventfd fires.
#[test]
fn qemu_negotiation_with_indirect_descriptors() {
    let f = Fixture::new();
    let disk = Arc::new(MemDisk::new("qemu-disk", DISK_SIZE));
    let sock = f.export("qemu", disk, 2, false);
    let mut fe = Frontend::connect(&sock, 2).expect("connect");
    let features = fe.get_features().expect("GET_FEATURES");
    let pf = fe.get_protocol_features().expect("GET_PROTOCOL_FEATURES");
    fe.set_protocol_features(
        pf & (VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS),
    )
    .expect("SET_PROTOCOL_FEATURES");
    assert_eq!(fe.get_queue_num().expect("GET_QUEUE_NUM"), 2);
    assert!(fe.get_max_mem_slots().expect("GET_MAX_MEM_SLOTS") >= 8);
    fe.set_owner().expect("SET_OWNER");
    let (_, cfg) = fe
        .get_config(0, 57, VhostUserConfigFlags::empty(), &[0u8; 57])
        .expect("GET_CONFIG(0, 57)");
    assert_eq!(cfg.len(), 57);
    assert_eq!(u16::from_le_bytes([cfg[34], cfg[35]]), 2);
    // QEMU writes the writeback byte back (CONFIG_WCE); that must be accepted.
    fe.set_config(32, VhostUserConfigFlags::WRITABLE, &[1])
        .expect("SET_CONFIG writeback");
    fe.set_features(features).expect("SET_FEATURES");
    let (mem, info) = Guest::memory();
    fe.add_mem_region(&info).expect("ADD_MEM_REG");
    let mut g = Guest {
        mem,
        fe,
        queues: Vec::new(),
    };
    g.setup_queue(0, true);
    g.setup_queue(1, true);

    // An indirect write of 8 KiB split in two data descriptors, then a direct read-back.
    let table = DATA + 0x8000;
    let hdr = DATA;
    let status = DATA + 0x10;
    g.put_header(hdr, VIRTIO_BLK_T_OUT, 16);
    g.fill(DATA + 0x1000, 4096, 0x11);
    g.fill(DATA + 0x3000, 4096, 0x22);
    g.set_byte(status, 0xFF);
    g.write_desc(table, 0, d(hdr, 16, NEXT, 1));
    g.write_desc(table, 1, d(DATA + 0x1000, 4096, NEXT, 2));
    g.write_desc(table, 2, d(DATA + 0x3000, 4096, NEXT, 3));
    g.write_desc(table, 3, d(status, 1, WRITE, 0));
    g.post(1, &[d(table, 64, INDIRECT, 0)], 0);
    assert_eq!(g.wait_used(1, 1), vec![(0, 1)]);
    assert_eq!(g.byte(status), S_OK);
    // With EVENT_IDX negotiated and used_event left at 0, the first completion is signalled.
    assert!(
        g.queues[1].call.as_ref().unwrap().read().is_ok(),
        "call eventfd was not signalled"
    );
    g.fill(DATA + 0x1000, 8192, 0);
    assert_eq!(g.request(0, VIRTIO_BLK_T_IN, 16, 8192, true), (S_OK, 8193));
    let back = g.bytes(DATA + 0x1000, 8192);
    assert!(back[..4096].iter().all(|&b| b == 0x11));
    assert!(back[4096..].iter().all(|&b| b == 0x22));
}

/// Live migration as QEMU drives it: LOG_SHMFD and LOG_ALL offered and acked, SET_LOG_BASE
/// with a shared log (one bit per 4 KiB page of guest memory). The pages the device writes —
/// a read's data, the status byte, the used ring — must be marked; the pages it only reads
/// (a write's data, the header, the descriptors) must not.
#[test]
fn migration_log_marks_the_pages_the_device_writes() {
    let f = Fixture::new();
    let disk = Arc::new(MemDisk::new("migrating", DISK_SIZE));
    let sock = f.export("migrating", disk, 1, false);
    let mut fe = Frontend::connect(&sock, 1).expect("connect");
    let features = fe.get_features().expect("GET_FEATURES");
    assert_ne!(
        features & VhostUserVirtioFeatures::LOG_ALL.bits(),
        0,
        "QEMU refuses to migrate a vhost-user device without VHOST_F_LOG_ALL"
    );
    let pf = fe.get_protocol_features().expect("GET_PROTOCOL_FEATURES");
    assert!(pf.contains(VhostUserProtocolFeatures::LOG_SHMFD), "{pf:?}");
    fe.set_protocol_features(
        pf & (VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::LOG_SHMFD),
    )
    .expect("SET_PROTOCOL_FEATURES");
    fe.set_owner().expect("SET_OWNER");
    fe.set_features(features)
        .expect("SET_FEATURES with LOG_ALL");
    let (mem, info) = Guest::memory();
    fe.add_mem_region(&info).expect("ADD_MEM_REG");
    let pages = MEM_SIZE / 4096;
    let log = memfd(pages / 8);
    fe.set_log_base(
        0,
        Some(VhostUserDirtyLogRegion {
            mmap_size: (pages / 8) as u64,
            mmap_offset: 0,
            mmap_handle: log.as_raw_fd(),
        }),
    )
    .expect("SET_LOG_BASE");
    let mut g = Guest {
        mem,
        fe,
        queues: Vec::new(),
    };
    g.setup_queue(0, true);
    let dirty = |log: &File| -> Vec<u64> {
        let mut b = vec![0u8; pages / 8];
        log.read_exact_at(&mut b, 0).expect("read the log");
        (0..pages as u64)
            .filter(|p| b[(p / 8) as usize] & (1 << (p % 8)) != 0)
            .collect()
    };
    let clear = |log: &File| {
        log.write_all_at(&vec![0u8; pages / 8], 0)
            .expect("clear log")
    };
    let page = |gpa: u64| gpa / 4096;
    let used_page = page(g.queues[0].used);

    // A write: only the status byte's page (with the header) and the used ring are written.
    g.fill(DATA + 0x1000, 8192, 0x5A);
    assert_eq!(g.request(0, VIRTIO_BLK_T_OUT, 8, 8192, false), (S_OK, 1));
    let mut want = vec![page(DATA), used_page];
    want.sort_unstable();
    assert_eq!(dirty(&log), want, "pages marked by a write");

    // A read fills two data pages: they are marked too, and nothing else.
    clear(&log);
    g.fill(DATA + 0x1000, 8192, 0);
    assert_eq!(g.request(0, VIRTIO_BLK_T_IN, 8, 8192, true), (S_OK, 8193));
    assert!(g.bytes(DATA + 0x1000, 8192).iter().all(|&b| b == 0x5A));
    let mut want = vec![
        page(DATA),
        page(DATA + 0x1000),
        page(DATA + 0x2000),
        used_page,
    ];
    want.sort_unstable();
    assert_eq!(dirty(&log), want, "pages marked by a read");
}

#[test]
fn hostile_chains_get_errors_and_the_daemon_keeps_serving() {
    let f = Fixture::new();
    let disk = Arc::new(MemDisk::new("victim", DISK_SIZE));
    let sock = f.export("victim", disk, 1, false);
    let bystander = Arc::new(MemDisk::new("bystander", DISK_SIZE));
    let bsock = f.export("bystander", bystander, 1, false);
    let mut other = Client::connect(&bsock).expect("connect bystander");

    let (mut g, _) = connect_like_cloud_hypervisor(&sock, 1, false);
    let hdr = DATA;
    let status = DATA + 0x10;
    let buf = DATA + 0x1000;

    // 1. Data buffer outside guest memory.
    g.put_header(hdr, VIRTIO_BLK_T_IN, 0);
    g.set_byte(status, 0xFF);
    g.post(
        0,
        &[
            d(hdr, 16, NEXT, 1),
            d(NOWHERE, 4096, WRITE | NEXT, 2),
            d(status, 1, WRITE, 0),
        ],
        0,
    );
    assert_eq!(g.wait_used(0, 1), vec![(0, 1)]);
    assert_eq!(g.byte(status), S_IOERR, "out-of-range data address");

    // 2. Descriptor loop: 0 -> 1 -> 0 -> ...
    g.put_header(hdr, VIRTIO_BLK_T_IN, 0);
    g.set_byte(status, 0xFF);
    g.post(0, &[d(hdr, 16, NEXT, 1), d(status, 1, WRITE | NEXT, 0)], 0);
    assert_eq!(g.wait_used(0, 1), vec![(0, 1)]);
    assert_eq!(g.byte(status), S_IOERR, "descriptor loop");

    // 3. Indirect table pointing at itself (an indirect descriptor inside the table).
    let (desc_table, _, _) = Guest::ring_layout(0);
    g.post(0, &[d(desc_table, 16, INDIRECT, 0)], 0);
    assert_eq!(
        g.wait_used(0, 1),
        vec![(0, 0)],
        "self-referencing indirect table"
    );

    // 4. Indirect table outside guest memory, and one of a bad length.
    g.post(0, &[d(NOWHERE, 64, INDIRECT, 0)], 0);
    assert_eq!(g.wait_used(0, 1), vec![(0, 0)]);
    g.post(0, &[d(DATA + 0x8000, 17, INDIRECT, 0)], 0);
    assert_eq!(g.wait_used(0, 1), vec![(0, 0)]);

    // 5. Zero-length header.
    g.set_byte(status, 0xFF);
    g.post(0, &[d(hdr, 0, NEXT, 1), d(status, 1, WRITE, 0)], 0);
    assert_eq!(g.wait_used(0, 1), vec![(0, 1)]);
    assert_eq!(g.byte(status), S_IOERR, "zero-length header");

    // 6. Status byte in a device-readable descriptor: nothing may be written to it.
    g.put_header(hdr, VIRTIO_BLK_T_FLUSH, 0);
    g.set_byte(status, 0xFF);
    g.post(0, &[d(hdr, 16, NEXT, 1), d(status, 1, 0, 0)], 0);
    assert_eq!(g.wait_used(0, 1), vec![(0, 0)]);
    assert_eq!(
        g.byte(status),
        0xFF,
        "device wrote into a device-readable descriptor"
    );
    // ... and a readable descriptor after a writable one: error in the writable byte.
    g.put_header(hdr, VIRTIO_BLK_T_IN, 0);
    g.fill(buf, 512, 0xAA);
    g.set_byte(status, 0xFF);
    g.post(
        0,
        &[
            d(hdr, 16, NEXT, 1),
            d(buf, 512, WRITE | NEXT, 2),
            d(status, 1, 0, 0),
        ],
        0,
    );
    assert_eq!(g.wait_used(0, 1), vec![(0, 1)]);
    assert_eq!(g.byte(status), 0xFF);
    assert_eq!(g.byte(buf + 511), S_IOERR);

    // 7. Unknown request type, and flags a discard may not carry.
    assert_eq!(g.request(0, 0x77, 0, 0, false).0, S_UNSUPP);
    let seg = buf;
    let mut s = [0u8; 16];
    s[8..12].copy_from_slice(&8u32.to_le_bytes());
    s[12..16].copy_from_slice(&1u32.to_le_bytes());
    g.mem.write_slice(&s, GuestAddress(seg)).unwrap();
    assert_eq!(g.request(0, VIRTIO_BLK_T_DISCARD, 0, 16, false).0, S_UNSUPP);

    // 8. Past the end, overflowing sector, unaligned length.
    let last = DISK_SIZE / 512;
    assert_eq!(g.request(0, VIRTIO_BLK_T_IN, last, 512, true).0, S_IOERR);
    assert_eq!(
        g.request(0, VIRTIO_BLK_T_OUT, last - 1, 1024, false).0,
        S_IOERR
    );
    assert_eq!(
        g.request(0, VIRTIO_BLK_T_IN, u64::MAX / 256, 512, true).0,
        S_IOERR
    );
    assert_eq!(g.request(0, VIRTIO_BLK_T_IN, 0, 100, true).0, S_IOERR);
    s[0..8].copy_from_slice(&(last - 4).to_le_bytes());
    s[12..16].copy_from_slice(&0u32.to_le_bytes());
    g.mem.write_slice(&s, GuestAddress(seg)).unwrap();
    assert_eq!(
        g.request(0, VIRTIO_BLK_T_WRITE_ZEROES, 0, 16, false).0,
        S_IOERR
    );

    // 9. Total length overflowing 32 bits: the chain is cut short before any writable byte
    // inside guest memory, so no status can be written and the used length is 0.
    g.put_header(hdr, VIRTIO_BLK_T_IN, 0);
    g.set_byte(status, 0xFF);
    g.post(
        0,
        &[
            d(hdr, 16, NEXT, 1),
            d(buf, u32::MAX, WRITE | NEXT, 2),
            d(buf, u32::MAX, WRITE | NEXT, 3),
            d(status, 1, WRITE, 0),
        ],
        0,
    );
    assert_eq!(g.wait_used(0, 1), vec![(0, 0)], "length overflow");
    assert_eq!(g.byte(status), 0xFF);

    // 10. A head index beyond the queue: no used entry can carry it; the next request works.
    g.post_head(0, QSIZE + 3);
    g.fill(buf, 512, 0x42);
    assert_eq!(g.request(0, VIRTIO_BLK_T_OUT, 0, 512, false), (S_OK, 1));

    // Still serving correctly after all that.
    g.fill(buf, 512, 0);
    assert_eq!(g.request(0, VIRTIO_BLK_T_IN, 0, 512, true), (S_OK, 513));
    assert!(g.bytes(buf, 512).iter().all(|&b| b == 0x42));

    // The other export never noticed.
    let p = other.ptr(0);
    other.mem()[..4096].fill(0x99);
    assert_eq!(
        run1(&mut other.queues[0], |q| q.write(0, p, 4096, 0, NO_FLAGS)).unwrap(),
        0
    );
    assert_eq!(
        run1(&mut other.queues[0], |q| q.read(0, p, 4096, 1, NO_FLAGS)).unwrap(),
        0
    );

    // And the hostile client can leave and a well-behaved one take its place.
    drop(g);
    let mut c = Client::connect(&sock).expect("reconnect after the hostile client");
    let p = c.ptr(0);
    assert_eq!(
        run1(&mut c.queues[0], |q| q.read(0, p, 512, 0, NO_FLAGS)).unwrap(),
        0
    );
    assert!(c.mem()[..512].iter().all(|&b| b == 0x42));
}

#[test]
fn readonly_export_refuses_writes_at_the_device() {
    let f = Fixture::new();
    let disk = Arc::new(MemDisk::new("ro-disk", DISK_SIZE));
    let sock = f.export("ro", disk.clone(), 1, true);
    let (mut g, _) = connect_like_cloud_hypervisor(&sock, 1, true);
    g.fill(DATA + 0x1000, 4096, 0x66);
    assert_eq!(g.request(0, VIRTIO_BLK_T_OUT, 0, 4096, false).0, S_IOERR);
    let mut s = [0u8; 16];
    s[8..12].copy_from_slice(&8u32.to_le_bytes());
    g.mem.write_slice(&s, GuestAddress(DATA + 0x1000)).unwrap();
    assert_eq!(g.request(0, VIRTIO_BLK_T_DISCARD, 0, 16, false).0, S_IOERR);
    assert_eq!(
        g.request(0, VIRTIO_BLK_T_WRITE_ZEROES, 0, 16, false).0,
        S_IOERR
    );
    assert_eq!(g.request(0, VIRTIO_BLK_T_IN, 0, 4096, true).0, S_OK);
    assert_eq!(g.request(0, VIRTIO_BLK_T_FLUSH, 0, 0, false).0, S_OK);
    assert!(
        disk.snapshot(0, 4096).iter().all(|&b| b == 0),
        "read-only disk was written"
    );
}

#[test]
fn full_store_is_ioerr() {
    let f = Fixture::new();
    let disk = Arc::new(MemDisk::new("full-disk", DISK_SIZE));
    let sock = f.export("full", disk.clone(), 1, false);
    let (mut g, _) = connect_like_cloud_hypervisor(&sock, 1, false);
    disk.set_no_space(true);
    assert_eq!(g.request(0, VIRTIO_BLK_T_OUT, 0, 4096, false).0, S_IOERR);
    disk.set_no_space(false);
    assert_eq!(g.request(0, VIRTIO_BLK_T_OUT, 0, 4096, false).0, S_OK);
}

/// A live rename (`ExportManager::rename`) keeps the disk's serial: GET_ID still answers the
/// first name, on the connected client and on a reconnect; an export started with `serial`
/// (a renamed one after a restart) answers it too.
#[test]
fn get_id_keeps_the_serial_across_a_rename() {
    let f = Fixture::new();
    let disk = Arc::new(MemDisk::new("id-disk", DISK_SIZE));
    let sock = f.export("first", disk, 1, false);
    let get_id = |g: &mut Guest| {
        g.fill(DATA + 0x1000, 20, 0);
        let (st, len) = g.request(0, VIRTIO_BLK_T_GET_ID, 0, 20, true);
        assert_eq!((st, len), (S_OK, 21));
        g.bytes(DATA + 0x1000, 20)
    };
    let (mut g, _) = connect_like_cloud_hypervisor(&sock, 1, false);
    assert_eq!(&get_id(&mut g)[..6], b"first\0");
    f.mgr.rename("first", "second").expect("rename");
    assert!(f.mgr.get("first").is_none() && f.mgr.get("second").is_some());
    assert_eq!(&get_id(&mut g)[..6], b"first\0", "the connected client");
    drop(g);
    let (mut g, _) = connect_like_cloud_hypervisor(&sock, 1, false);
    assert_eq!(&get_id(&mut g)[..6], b"first\0", "a reconnect");
    drop(g);
    let sock2 = f.dir.path().join("restarted.sock");
    let mut cfg = ExportConfig::new("second", &sock2);
    cfg.num_queues = 1;
    cfg.serial = Some("first".into());
    f.mgr.remove("second").expect("remove");
    f.mgr
        .add_disk(cfg, Arc::new(MemDisk::new("id-disk-2", DISK_SIZE)))
        .expect("add with a serial");
    let (mut g, _) = connect_like_cloud_hypervisor(&sock2, 1, false);
    assert_eq!(&get_id(&mut g)[..6], b"first\0", "after a restart");
}
