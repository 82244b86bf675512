//! Inflight I/O tracking (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD) driven with the `vhost` crate's
//! frontend, as QEMU drives it: GET_INFLIGHT_FD on the first start, SET_INFLIGHT_FD with the
//! same region after every reconnect, SET_VRING_BASE with the guest's used index (what QEMU
//! sends when GET_VRING_BASE failed because the backend died).
//!
//! A backend process dies at any point of a request's life; the region and the rings are then
//! in one of a few states. Each test leaves them in one such state, exactly as the dead backend
//! would have (the region is written here from QEMU's layout, independently of the daemon's
//! code), reconnects to a fresh connection of the export (a new `BlkBackend`, as after a
//! restart) and checks that every request the guest submitted completes exactly once, the
//! unfinished ones executed again in their original order, nothing completed twice, and the
//! ring continues where it should.

use std::fs::File;
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use snapmv::export::{ExportConfig, ExportManager};
use snapmv::vhost_blk::{BlockDisk, DiskError, MemDisk};
use vhost::vhost_user::message::{
    DescStateSplit, VhostUserHeaderFlag, VhostUserInflight, VhostUserProtocolFeatures,
    VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, MmapRegion,
    VolatileMemory,
};
use vmm_sys_util::eventfd::EventFd;

const MEM_SIZE: usize = 4 << 20;
const QSIZE: u16 = 16;
/// Queue q's rings: descriptor table, available ring, used ring.
fn rings(q: usize) -> (u64, u64, u64) {
    let base = 0x1_0000 * (q as u64 + 1);
    (base, base + 0x1000, base + 0x2000)
}
const DATA: u64 = 0x10_0000;
const NEXT: u16 = VRING_DESC_F_NEXT as u16;
const WRITE: u16 = VRING_DESC_F_WRITE as u16;
/// QEMU's per-queue region size for QSIZE: ALIGN_UP(16 * 16 + 2, 64).
const REGION: usize = 320;

fn memfd(size: usize) -> File {
    // SAFETY: memfd_create with a valid NUL-terminated name; the fd is checked, then owned.
    let fd = unsafe { libc::memfd_create(c"snapmv-test-guest".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(size as u64).expect("size the memfd");
    f
}

/// A disk that records the writes it executes, in order, and can hold writes at a gate.
struct Recording {
    inner: MemDisk,
    log: Mutex<Vec<u64>>,
    gate: Mutex<bool>,
    gate_cv: std::sync::Condvar,
}

impl Recording {
    fn new() -> Arc<Recording> {
        Arc::new(Recording {
            inner: MemDisk::new("rec", 1 << 20),
            log: Mutex::new(Vec::new()),
            gate: Mutex::new(true),
            gate_cv: std::sync::Condvar::new(),
        })
    }
    fn writes(&self) -> Vec<u64> {
        self.log.lock().unwrap().clone()
    }
    fn set_gate(&self, open: bool) {
        *self.gate.lock().unwrap() = open;
        self.gate_cv.notify_all();
    }
}

impl BlockDisk for Recording {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_vectored(&self, o: u64, b: &mut [IoSliceMut<'_>]) -> Result<(), DiskError> {
        self.inner.read_vectored(o, b)
    }
    fn write_vectored(&self, o: u64, b: &[IoSlice<'_>]) -> Result<(), DiskError> {
        let mut open = self.gate.lock().unwrap();
        while !*open {
            open = self.gate_cv.wait(open).unwrap();
        }
        drop(open);
        self.log.lock().unwrap().push(o / 512);
        self.inner.write_vectored(o, b)
    }
    fn flush(&self) -> Result<(), DiskError> {
        self.inner.flush()
    }
    fn discard(&self, o: u64, l: u64) -> Result<(), DiskError> {
        self.inner.discard(o, l)
    }
    fn write_zeroes(&self, o: u64, l: u64) -> Result<(), DiskError> {
        self.inner.write_zeroes(o, l)
    }
    fn name(&self) -> String {
        "recording".into()
    }
    fn physical_block_size(&self) -> u32 {
        512
    }
}

/// The guest's memory and rings, kept across backend connections (as QEMU keeps them).
struct Guest {
    mem: GuestMemoryMmap<()>,
    info: VhostUserMemoryRegionInfo,
    /// Number of queues the device is set up with.
    nq: usize,
    /// The queue the helpers below work on.
    q: usize,
    /// Per queue: next avail index the driver will fill.
    avail_idx: [u16; 2],
    /// Per queue: used entries already consumed by the driver.
    seen_used: [u16; 2],
}

/// QEMU's side of the region: the file and a mapping of it.
struct Region {
    file: File,
    msg: VhostUserInflight,
    map: MmapRegion<()>,
}

impl Region {
    fn s(&self) -> vm_memory::VolatileSlice<'_, ()> {
        self.map.as_volatile_slice()
    }
    /// Marks `head` of queue `q` in flight.
    fn set_mark_q(&self, q: usize, head: u16, counter: u64) {
        let off = q * REGION + 16 + 16 * usize::from(head);
        self.s()
            .store(counter, off + 8, std::sync::atomic::Ordering::SeqCst)
            .unwrap();
        self.s()
            .store(1u8, off, std::sync::atomic::Ordering::SeqCst)
            .unwrap();
    }
    fn mark_q(&self, q: usize, head: u16) -> u8 {
        self.s()
            .load::<u8>(
                q * REGION + 16 + 16 * usize::from(head),
                std::sync::atomic::Ordering::SeqCst,
            )
            .unwrap()
    }
    fn set_mark(&self, head: u16, counter: u64) {
        let off = 16 + 16 * usize::from(head);
        self.s()
            .store(counter, off + 8, std::sync::atomic::Ordering::SeqCst)
            .unwrap();
        self.s()
            .store(1u8, off, std::sync::atomic::Ordering::SeqCst)
            .unwrap();
    }
    fn mark(&self, head: u16) -> u8 {
        self.s()
            .load::<u8>(
                16 + 16 * usize::from(head),
                std::sync::atomic::Ordering::SeqCst,
            )
            .unwrap()
    }
    fn clear(&self, head: u16) {
        self.s()
            .store(
                0u8,
                16 + 16 * usize::from(head),
                std::sync::atomic::Ordering::SeqCst,
            )
            .unwrap();
    }
    fn set_u16(&self, off: usize, v: u16) {
        self.s()
            .store(v, off, std::sync::atomic::Ordering::SeqCst)
            .unwrap();
    }
    fn u16_at(&self, off: usize) -> u16 {
        self.s()
            .load::<u16>(off, std::sync::atomic::Ordering::SeqCst)
            .unwrap()
    }
    fn used_idx(&self) -> u16 {
        self.u16_at(14)
    }
}

/// One connection of the frontend.
struct Conn {
    /// Keeps the connection open.
    _fe: Frontend,
    kick: EventFd,
    call: EventFd,
    /// Every queue's kick eventfd.
    kicks: Vec<EventFd>,
}

impl Conn {
    /// Waits until the backend signalled the call eventfd (bounded poll: fails only if the
    /// interrupt never comes).
    fn wait_interrupt(&self, what: &str) {
        let mut tries = 0;
        while self.call.read().is_err() {
            tries += 1;
            assert!(tries < 20_000, "{what}: the guest was never interrupted");
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

fn features() -> u64 {
    (1u64 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1)
        | (1 << VIRTIO_BLK_F_FLUSH)
        | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
}

/// Connects and exchanges the first messages. Once GET_FEATURES is answered, the export's
/// previous connection (one client at a time) is gone and its queue threads joined: the test
/// may then change the rings and the region as a dead backend would have left them.
fn handshake(sock: &std::path::Path) -> (Frontend, u64) {
    handshake_n(sock, 1)
}

fn handshake_n(sock: &std::path::Path, queues: u64) -> (Frontend, u64) {
    let fe = Frontend::connect(sock, queues).expect("connect");
    fe.set_owner().expect("SET_OWNER");
    let offered = fe.get_features().expect("GET_FEATURES");
    (fe, offered)
}

impl Guest {
    fn new() -> Guest {
        let file = memfd(MEM_SIZE);
        let mem = GuestMemoryMmap::<()>::from_ranges_with_files([(
            GuestAddress(0),
            MEM_SIZE,
            Some(FileOffset::new(file, 0)),
        )])
        .expect("map guest memory");
        let info = VhostUserMemoryRegionInfo::from_guest_region(mem.iter().next().unwrap())
            .expect("region info");
        Guest {
            mem,
            info,
            nq: 1,
            q: 0,
            avail_idx: [0; 2],
            seen_used: [0; 2],
        }
    }

    fn host(&self, gpa: u64) -> u64 {
        self.mem.get_host_address(GuestAddress(gpa)).unwrap() as u64
    }

    /// QEMU's connection sequence; `region` None asks GET_INFLIGHT_FD (first start), Some
    /// sends SET_INFLIGHT_FD (reconnect). The ring's base is the guest's used index.
    fn connect(&self, sock: &std::path::Path, region: Option<&Region>) -> (Conn, Option<Region>) {
        let hs = handshake_n(sock, self.nq as u64);
        self.finish(hs, region)
    }

    /// The rest of [`Guest::connect`] after [`handshake`].
    fn finish(&self, hs: (Frontend, u64), region: Option<&Region>) -> (Conn, Option<Region>) {
        let (mut fe, offered) = hs;
        let pf = fe.get_protocol_features().expect("GET_PROTOCOL_FEATURES");
        assert!(
            pf.contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD),
            "INFLIGHT_SHMFD not offered: {pf:?}"
        );
        fe.set_protocol_features(
            pf & (VhostUserProtocolFeatures::CONFIG
                | VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::REPLY_ACK
                | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
                | VhostUserProtocolFeatures::INFLIGHT_SHMFD),
        )
        .expect("SET_PROTOCOL_FEATURES");
        fe.set_features(offered & features()).expect("SET_FEATURES");
        fe.add_mem_region(&self.info).expect("ADD_MEM_REG");
        let fresh = match region {
            Some(r) => {
                fe.set_inflight_fd(&r.msg, r.file.as_raw_fd())
                    .expect("SET_INFLIGHT_FD");
                None
            }
            None => {
                let (msg, file) = fe
                    .get_inflight_fd(&VhostUserInflight::new(0, 0, self.nq as u16, QSIZE))
                    .expect("GET_INFLIGHT_FD");
                assert_eq!(
                    msg.mmap_size as usize,
                    REGION * self.nq,
                    "QEMU's region size"
                );
                assert_eq!(msg.mmap_offset, 0);
                fe.set_inflight_fd(&msg, file.as_raw_fd())
                    .expect("SET_INFLIGHT_FD");
                let map = MmapRegion::from_file(
                    FileOffset::new(file.try_clone().unwrap(), 0),
                    msg.mmap_size as usize,
                )
                .expect("map the region");
                Some(Region { file, msg, map })
            }
        };
        let mut kicks = Vec::new();
        let mut calls = Vec::new();
        for q in 0..self.nq {
            let (desc, avail, used_ring) = rings(q);
            fe.set_vring_num(q, QSIZE).expect("SET_VRING_NUM");
            // After a failed GET_VRING_BASE QEMU restores last_avail_idx to the used index.
            let used = self.used_idx_of(q);
            fe.set_vring_base(q, used).expect("SET_VRING_BASE");
            fe.set_vring_addr(
                q,
                &VringConfigData {
                    queue_max_size: QSIZE,
                    queue_size: QSIZE,
                    flags: 0,
                    desc_table_addr: self.host(desc),
                    used_ring_addr: self.host(used_ring),
                    avail_ring_addr: self.host(avail),
                    log_addr: None,
                },
            )
            .expect("SET_VRING_ADDR");
            let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
            fe.set_vring_kick(q, &kick).expect("SET_VRING_KICK");
            kicks.push(kick);
        }
        for q in 0..self.nq {
            fe.set_vring_enable(q, true).expect("SET_VRING_ENABLE");
        }
        // QEMU sends the call fds last (vhost_user_blk_start unmasks the queues after
        // vhost_dev_start has enabled them): completions made before must still interrupt.
        for q in 0..self.nq {
            let call = EventFd::new(libc::EFD_NONBLOCK).unwrap();
            fe.set_vring_call(q, &call).expect("SET_VRING_CALL");
            calls.push(call);
        }
        let kick = kicks[0].try_clone().unwrap();
        let call = calls[0].try_clone().unwrap();
        (
            Conn {
                _fe: fe,
                kick,
                call,
                kicks,
            },
            fresh,
        )
    }

    fn write_desc(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&addr.to_le_bytes());
        b[8..12].copy_from_slice(&len.to_le_bytes());
        b[12..14].copy_from_slice(&flags.to_le_bytes());
        b[14..16].copy_from_slice(&next.to_le_bytes());
        self.mem
            .write_slice(&b, GuestAddress(rings(self.q).0 + 16 * u64::from(index)))
            .unwrap();
    }

    /// Builds request `k` (descriptors 3k..3k+2, head 3k): a 512-byte write of byte `k+1` at
    /// sector 100+k (or a flush). Returns the head.
    fn build(&self, k: u16, flush: bool) -> u16 {
        let base = DATA + 0x2000 * u64::from(k);
        let mut h = [0u8; 16];
        let t = if flush {
            VIRTIO_BLK_T_FLUSH
        } else {
            VIRTIO_BLK_T_OUT
        };
        h[0..4].copy_from_slice(&t.to_le_bytes());
        h[8..16].copy_from_slice(&(100 + u64::from(k)).to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(base)).unwrap();
        self.mem
            .write_slice(&[k as u8 + 1; 512], GuestAddress(base + 0x1000))
            .unwrap();
        self.mem
            .write_obj(0xFFu8, GuestAddress(base + 0x10))
            .unwrap();
        let head = 3 * (k % 5);
        if flush {
            self.write_desc(head, base, 16, NEXT, head + 1);
            self.write_desc(head + 1, base + 0x10, 1, WRITE, 0);
        } else {
            self.write_desc(head, base, 16, NEXT, head + 1);
            self.write_desc(head + 1, base + 0x1000, 512, NEXT, head + 2);
            self.write_desc(head + 2, base + 0x10, 1, WRITE, 0);
        }
        head
    }

    fn status(&self, k: u16) -> u8 {
        self.mem
            .read_obj(GuestAddress(DATA + 0x2000 * u64::from(k) + 0x10))
            .unwrap()
    }

    /// Makes `head` available (no kick).
    fn offer(&mut self, head: u16) {
        self.mem
            .write_obj(
                head,
                GuestAddress(rings(self.q).1 + 4 + 2 * u64::from(self.avail_idx[self.q] % QSIZE)),
            )
            .unwrap();
        self.avail_idx[self.q] = self.avail_idx[self.q].wrapping_add(1);
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.mem
            .write_obj(self.avail_idx[self.q], GuestAddress(rings(self.q).1 + 2))
            .unwrap();
    }

    fn used_idx(&self) -> u16 {
        self.used_idx_of(self.q)
    }

    fn used_idx_of(&self, q: usize) -> u16 {
        self.mem.read_obj(GuestAddress(rings(q).2 + 2)).unwrap()
    }

    /// Writes a used entry as a dead backend would have (id, len) and bumps the used index.
    fn put_used(&self, head: u16, len: u32) {
        let used = self.used_idx();
        let e = rings(self.q).2 + 4 + 8 * u64::from(used % QSIZE);
        self.mem
            .write_obj(u32::from(head), GuestAddress(e))
            .unwrap();
        self.mem.write_obj(len, GuestAddress(e + 4)).unwrap();
        self.mem
            .write_obj(used.wrapping_add(1), GuestAddress(rings(self.q).2 + 2))
            .unwrap();
    }

    /// Waits until `n` new used entries are there and returns their ids. A bounded poll: it
    /// fails only if the entries never come.
    fn take_used(&mut self, n: u16) -> Vec<u16> {
        let mut tries = 0;
        while self.used_idx().wrapping_sub(self.seen_used[self.q]) < n {
            tries += 1;
            assert!(
                tries < 20_000,
                "waited for {n} used entries, have {}",
                self.used_idx().wrapping_sub(self.seen_used[self.q])
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        let mut out = Vec::new();
        for _ in 0..n {
            let e = rings(self.q).2 + 4 + 8 * u64::from(self.seen_used[self.q] % QSIZE);
            let id: u32 = self.mem.read_obj(GuestAddress(e)).unwrap();
            out.push(id as u16);
            self.seen_used[self.q] = self.seen_used[self.q].wrapping_add(1);
        }
        out
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    _mgr: ExportManager,
    sock: std::path::PathBuf,
    disk: Arc<Recording>,
}

fn fixture() -> Fixture {
    fixture_q(1)
}

fn fixture_q(queues: u16) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let mgr = ExportManager::new();
    let disk = Recording::new();
    let sock = dir.path().join("e.sock");
    let mut cfg = ExportConfig::new("inflight", &sock);
    cfg.num_queues = queues;
    mgr.add_disk(cfg, disk.clone()).expect("export");
    Fixture {
        _dir: dir,
        _mgr: mgr,
        sock,
        disk,
    }
}

/// Disconnects and waits until the export accepts the next client (the daemon notices the
/// disconnect asynchronously; the next connect waits in the listen queue meanwhile).
fn disconnect(c: Conn) {
    drop(c);
}

const S_OK: u8 = VIRTIO_BLK_S_OK as u8;

#[test]
fn region_layout_is_qemus() {
    assert_eq!(std::mem::size_of::<DescStateSplit>(), 16);
    assert_eq!(
        snapmv::vhost_blk::inflight::queue_region_size(QSIZE),
        REGION
    );
    assert_eq!(snapmv::vhost_blk::inflight::queue_region_size(128), 2112);
}

/// A normal life: the mark is set while the request executes and cleared once it is on the
/// used ring; the region's used index follows the ring's.
#[test]
fn marks_are_set_while_executing_and_cleared_after_completion() {
    let f = fixture();
    let mut g = Guest::new();
    let (c, region) = g.connect(&f.sock, None);
    let region = region.unwrap();
    assert_eq!(region.u16_at(8), 1, "version");
    assert_eq!(region.u16_at(10), QSIZE, "desc_num");
    f.disk.set_gate(false);
    let h = g.build(0, false);
    g.offer(h);
    c.kick.write(1).unwrap();
    // The write is held at the gate: the request must be marked by now.
    let mut tries = 0;
    while region.mark(h) != 1 {
        tries += 1;
        assert!(tries < 20_000, "request never marked in flight");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(g.used_idx(), 0);
    f.disk.set_gate(true);
    assert_eq!(g.take_used(1), vec![h]);
    assert_eq!(g.status(0), S_OK);
    assert_eq!(region.mark(h), 0);
    assert_eq!(region.used_idx(), 1);
    assert_eq!(region.u16_at(12), h, "last_batch_head");
    disconnect(c);
}

/// The states a backend can die in, for requests A (head 0), B (head 3), C (head 6) taken in
/// that order, and what the next backend must do.
#[derive(Clone, Copy, Debug)]
enum Died {
    /// A available, not yet taken: no mark.
    BeforeTaking,
    /// A taken and marked, nothing executed.
    AfterMarking,
    /// A marked and written to the disk, not completed.
    AfterExecuting,
    /// A's last_batch_head set, used ring not yet written.
    AfterPrePut,
    /// A's used entry and used index written, mark still set, region used index old.
    AfterUsedIndex,
    /// A's mark cleared, region used index old.
    AfterClearing,
    /// A fully completed.
    AfterCompletion,
}

fn crash_at(step: Died) {
    let f = fixture();
    let mut g = Guest::new();
    let (c, region) = g.connect(&f.sock, None);
    let region = region.unwrap();
    // The first backend completes one request normally (the ring is not at 0).
    let warm = g.build(4, false);
    g.offer(warm);
    c.kick.write(1).unwrap();
    assert_eq!(g.take_used(1), vec![warm]);
    disconnect(c);
    let hs = handshake(&f.sock);
    // Now the guest posts A, B, C; B and C were taken and are in flight in every case, C
    // taken before B (counters), and the backend dies with A in state `step`.
    let a = g.build(0, false);
    let b = g.build(1, false);
    let cc = g.build(2, false);
    g.offer(a);
    g.offer(cc);
    g.offer(b);
    if !matches!(step, Died::BeforeTaking) {
        region.set_mark(cc, 11);
        region.set_mark(b, 12);
    }
    let a_counter = 10;
    let mut a_done = false;
    match step {
        Died::BeforeTaking => {}
        Died::AfterMarking => region.set_mark(a, a_counter),
        Died::AfterExecuting => {
            region.set_mark(a, a_counter);
            f.disk
                .inner
                .write_vectored(100 * 512, &[IoSlice::new(&[1; 512])])
                .unwrap();
        }
        Died::AfterPrePut => {
            region.set_mark(a, a_counter);
            region.set_u16(12, a);
        }
        Died::AfterUsedIndex | Died::AfterClearing | Died::AfterCompletion => {
            region.set_mark(a, a_counter);
            region.set_u16(12, a);
            f.disk
                .inner
                .write_vectored(100 * 512, &[IoSlice::new(&[1; 512])])
                .unwrap();
            g.mem.write_obj(S_OK, GuestAddress(DATA + 0x10)).unwrap();
            g.put_used(a, 1);
            a_done = true;
            if !matches!(step, Died::AfterUsedIndex) {
                region.clear(a);
            }
            if matches!(step, Died::AfterCompletion) {
                region.set_u16(14, g.used_idx());
            }
        }
    }
    let before = f.disk.writes();
    // Restart: a new connection with the region QEMU kept.
    let (c2, _) = g.finish(hs, Some(&region));
    let mut expect: Vec<u16> = Vec::new();
    let mut expect_writes: Vec<u64> = Vec::new();
    match step {
        Died::BeforeTaking => {
            // Nothing was taken (A is first in the ring): everything comes from the available
            // ring, in ring order A, C, B.
            expect.extend([a, cc, b]);
            expect_writes.extend([100, 102, 101]);
        }
        _ if !a_done => {
            // Resubmitted in the order they were taken (counters A 10, C 11, B 12), which is
            // neither the descriptor order nor a guess from the ring.
            expect.extend([a, cc, b]);
            expect_writes.extend([100, 102, 101]);
        }
        _ => {
            // A completed before the crash (the guest sees that completion, once); only C and
            // B run again.
            expect.extend([a, cc, b]);
            expect_writes.extend([102, 101]);
        }
    }
    let got = g.take_used(expect.len() as u16);
    assert_eq!(got, expect, "{step:?}: completions");
    // Those completions (and any the dead backend left unsignalled) reach the guest.
    c2.wait_interrupt(&format!("{step:?}"));
    let writes: Vec<u64> = f.disk.writes()[before.len()..].to_vec();
    assert_eq!(
        writes, expect_writes,
        "{step:?}: writes executed after the restart"
    );
    for k in 0..3 {
        assert_eq!(g.status(k), S_OK, "{step:?}: status of request {k}");
        let data = f.disk.inner.snapshot((100 + u64::from(k)) * 512, 512);
        assert!(
            data.iter().all(|&x| x == k as u8 + 1),
            "{step:?}: data of request {k}"
        );
    }
    // The ring continues exactly after them: one new request, one completion, nothing else.
    let d = g.build(3, false);
    g.offer(d);
    c2.kick.write(1).unwrap();
    assert_eq!(g.take_used(1), vec![d], "{step:?}: the next request");
    // A flush after everything makes sure nothing else is pending behind it.
    let fl = g.build(5, true);
    g.offer(fl);
    c2.kick.write(1).unwrap();
    assert_eq!(g.take_used(1), vec![fl], "{step:?}: the flush");
    assert_eq!(
        g.used_idx(),
        g.avail_idx[0],
        "{step:?}: every request completed once"
    );
    for h in 0..QSIZE {
        assert_eq!(region.mark(h), 0, "{step:?}: mark of {h} left set");
    }
    assert_eq!(region.used_idx(), g.used_idx());
    disconnect(c2);
}

#[test]
fn crash_before_taking() {
    crash_at(Died::BeforeTaking);
}
#[test]
fn crash_after_marking() {
    crash_at(Died::AfterMarking);
}
#[test]
fn crash_after_executing() {
    crash_at(Died::AfterExecuting);
}
#[test]
fn crash_after_pre_put() {
    crash_at(Died::AfterPrePut);
}
#[test]
fn crash_after_used_index() {
    crash_at(Died::AfterUsedIndex);
}
#[test]
fn crash_after_clearing() {
    crash_at(Died::AfterClearing);
}
#[test]
fn crash_after_completion() {
    crash_at(Died::AfterCompletion);
}

/// A region that claims more requests in flight than the guest has outstanding, or marks a
/// descriptor outside the ring, is not trusted: the backend resumes where the frontend said
/// and executes only what the guest made available; it keeps serving.
#[test]
fn a_hostile_region_is_ignored() {
    let f = fixture();
    let mut g = Guest::new();
    let (c, region) = g.connect(&f.sock, None);
    let region = region.unwrap();
    disconnect(c);
    let hs = handshake(&f.sock);
    // One request available; the region marks five.
    let a = g.build(0, false);
    g.offer(a);
    for (i, h) in [3u16, 6, 9, 12, 15].into_iter().enumerate() {
        region.set_mark(h, i as u64);
    }
    let (c2, _) = g.finish(hs, Some(&region));
    c2.kick.write(1).unwrap();
    assert_eq!(g.take_used(1), vec![a]);
    assert_eq!(f.disk.writes(), vec![100]);
    disconnect(c2);
    // A stale used index with marks; a garbage inflight byte; an unknown version.
    for damage in 0..3 {
        let hs = handshake(&f.sock);
        let b = g.build(1, false);
        g.offer(b);
        match damage {
            0 => {
                region.set_mark(b, 0);
                region.set_u16(14, g.used_idx().wrapping_sub(7));
            }
            1 => region
                .s()
                .store(7u8, 16, std::sync::atomic::Ordering::SeqCst)
                .unwrap(),
            _ => region.set_u16(8, 9),
        }
        let (c3, _) = g.finish(hs, Some(&region));
        c3.kick.write(1).unwrap();
        assert_eq!(g.take_used(1), vec![b], "damage {damage}");
        disconnect(c3);
    }
    assert_eq!(g.used_idx(), g.avail_idx[0]);
    // A SET_INFLIGHT_FD smaller than the queues it describes is refused (the connection
    // ends; the next one works).
    let (mut fe, _) = handshake(&f.sock);
    let pf = fe.get_protocol_features().unwrap();
    fe.set_protocol_features(
        pf & (VhostUserProtocolFeatures::INFLIGHT_SHMFD | VhostUserProtocolFeatures::REPLY_ACK),
    )
    .unwrap();
    fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    let too_small = VhostUserInflight::new(64, 0, 1, QSIZE);
    assert!(fe
        .set_inflight_fd(&too_small, region.file.as_raw_fd())
        .is_err());
    drop(fe);
    let (c4, _) = g.connect(&f.sock, None);
    let e = g.build(2, false);
    g.offer(e);
    c4.kick.write(1).unwrap();
    assert_eq!(g.take_used(1), vec![e]);
}

/// Both queues of a 2-queue device have requests in flight when the backend dies; each queue's
/// part of the region brings back its own requests and only those, and each ring resumes right.
#[test]
fn every_queue_recovers_its_own_requests() {
    let f = fixture_q(2);
    let mut g = Guest::new();
    g.nq = 2;
    let (c, region) = g.connect(&f.sock, None);
    let region = region.unwrap();
    for q in 0..2 {
        g.q = q;
        let h = g.build(4 + 5 * q as u16, false);
        g.offer(h);
        c.kicks[q].write(1).unwrap();
        assert_eq!(g.take_used(1), vec![h], "queue {q}: warm-up request");
    }
    disconnect(c);
    let hs = handshake_n(&f.sock, 2);
    // Queue 0: A and B taken (counters 10, 11); B completed, A not.
    g.q = 0;
    let a = g.build(0, false);
    let b = g.build(1, false);
    g.offer(a);
    g.offer(b);
    region.set_mark_q(0, a, 10);
    region.set_mark_q(0, b, 11);
    f.disk
        .inner
        .write_vectored(101 * 512, &[IoSlice::new(&[2; 512])])
        .unwrap();
    g.mem
        .write_obj(S_OK, GuestAddress(DATA + 0x2000 + 0x10))
        .unwrap();
    g.put_used(b, 1);
    region
        .s()
        .store(
            0u8,
            16 + 16 * usize::from(b),
            std::sync::atomic::Ordering::SeqCst,
        )
        .unwrap();
    region.set_u16(14, g.used_idx());
    // Queue 1: C taken (counter 3), D available, not taken.
    g.q = 1;
    let cc = g.build(5, false);
    let d = g.build(6, false);
    g.offer(cc);
    g.offer(d);
    region.set_mark_q(1, cc, 3);
    let before = f.disk.writes().len();
    let (c2, _) = g.finish(hs, Some(&region));
    g.q = 0;
    assert_eq!(g.take_used(2), vec![b, a], "queue 0");
    g.q = 1;
    assert_eq!(g.take_used(2), vec![cc, d], "queue 1");
    c2.wait_interrupt("queue 0");
    let mut writes = f.disk.writes()[before..].to_vec();
    let pos = |s: u64| writes.iter().position(|&w| w == s);
    assert!(pos(105) < pos(106), "queue 1 ran D before C: {writes:?}");
    writes.sort_unstable();
    assert_eq!(
        writes,
        vec![100, 105, 106],
        "writes executed after the restart"
    );
    for (k, sector) in [(0u16, 100u64), (1, 101), (5, 105), (6, 106)] {
        assert_eq!(g.status(k), S_OK, "status of request {k}");
        let data = f.disk.inner.snapshot(sector * 512, 512);
        assert!(
            data.iter().all(|&x| x == k as u8 + 1),
            "data of request {k}"
        );
    }
    for q in 0..2 {
        for h in 0..QSIZE {
            assert_eq!(region.mark_q(q, h), 0, "queue {q}: mark of {h} left set");
        }
        assert_eq!(
            region.u16_at(q * REGION + 14),
            g.used_idx_of(q),
            "queue {q}: region used index"
        );
    }
}
