//! Acknowledged writes survive the death of the daemon (the issue "acknowledged writes lost
//! when the daemon restarts under a running guest", at the blkio level, no VM).
//!
//! A blkio client writes 4 MiB as 1,024 writes of 4 KiB (128 in flight, write-back cache, no
//! flush); the daemon is SIGKILLed right after the last completion and started again on the
//! same directories; the range must read back exactly as written. A process death is not a
//! power cut: every write the daemon completed to the guest has reached the kernel (page cache)
//! or the files, so it must survive even without a flush.
//!
//! Three cases: the origin with no snapshot; the origin right after a snapshot (every write is
//! a first write after the snapshot, the copy-out path), whose snapshot must still hold the
//! data from before; a writable snapshot export.

use serde_json::json;
use snapmv_tests::blkio_client::{run1, wait_for, Client, ClientOptions, NO_FLAGS};
use snapmv_tests::daemon::{scratch, sparse_file, Daemon};

const BLOCK: usize = 4096;
const SPAN: usize = 4 << 20;
const BLOCKS: usize = SPAN / BLOCK;
const ORIGIN_SIZE: u64 = 16 << 20;
/// Where the range starts (not at 0, and not chunk-aligned to the end of the volume).
const BASE: u64 = 1 << 20;
const DEPTH: usize = 128;

fn fill(buf: &mut [u8], seed: u64) {
    for (i, block) in buf.chunks_mut(BLOCK).enumerate() {
        for (j, w) in block.chunks_mut(8).enumerate() {
            let v = seed
                .wrapping_mul(0x9e37_79b9_7f4a_7c15)
                .wrapping_add((i as u64) << 20 | j as u64);
            w.copy_from_slice(&v.to_le_bytes());
        }
    }
}

fn opts() -> ClientOptions {
    ClientOptions {
        region_len: SPAN,
        queue_size: 256,
        ..Default::default()
    }
}

/// Writes the range as 4 KiB writes, `DEPTH` in flight, no flush.
fn write_range(sock: &std::path::Path, seed: u64) {
    let mut c = Client::connect_with(sock, &opts()).expect("connect");
    fill(c.mem(), seed);
    let mut next = 0usize;
    let mut done = 0usize;
    while done < BLOCKS {
        while next < BLOCKS && next - done < DEPTH {
            let p = c.ptr(next * BLOCK);
            c.queues[0].write(BASE + (next * BLOCK) as u64, p, BLOCK, next, NO_FLAGS);
            next += 1;
        }
        let got = wait_for(&mut c.queues[0], 1).expect("completions");
        for (i, ret) in got {
            assert_eq!(ret, 0, "write of block {i} failed");
            done += 1;
        }
    }
}

/// Reads the range back and names the first wrong block.
fn check_range(sock: &std::path::Path, seed: u64, what: &str, read_only: bool) {
    let o = ClientOptions {
        read_only,
        ..opts()
    };
    let mut c = Client::connect_with(sock, &o).expect("connect");
    let p = c.ptr(0);
    let ret = run1(&mut c.queues[0], |q| q.read(BASE, p, SPAN, 0, NO_FLAGS)).expect("read");
    assert_eq!(ret, 0, "{what}: read failed");
    let mut want = vec![0u8; SPAN];
    fill(&mut want, seed);
    let got = c.mem()[..SPAN].to_vec();
    let bad: Vec<usize> = (0..BLOCKS)
        .filter(|&b| got[b * BLOCK..(b + 1) * BLOCK] != want[b * BLOCK..(b + 1) * BLOCK])
        .collect();
    assert!(
        bad.is_empty(),
        "{what}: {} of {BLOCKS} acknowledged 4 KiB writes lost or wrong after SIGKILL + restart (first: block {})",
        bad.len(),
        bad[0]
    );
}

struct Setup {
    _dir: tempfile::TempDir,
    d: Daemon,
    cow: String,
}

fn setup(name: &str) -> Setup {
    let dir = scratch(name);
    let origin = dir.path().join("o.img");
    let cow = dir.path().join("c.img");
    sparse_file(&origin, ORIGIN_SIZE);
    sparse_file(&cow, 8 * ORIGIN_SIZE);
    let (o, c) = (origin.display().to_string(), cow.display().to_string());
    let d = Daemon::start(dir.path());
    d.ok(
        "origin_create",
        json!({"name": "vol", "origin": o, "cow": c, "bind": true, "format": true}),
    );
    Setup {
        _dir: dir,
        d,
        cow: c,
    }
}

#[test]
fn origin_without_snapshot() {
    let mut s = setup("ack-origin");
    let sock = s.d.export_socket("vol");
    write_range(&sock, 1);
    s.d.kill();
    s.d.restart();
    check_range(&sock, 1, "origin", false);
}

#[test]
fn origin_right_after_a_snapshot() {
    let mut s = setup("ack-first");
    let sock = s.d.export_socket("vol");
    // Old data, made durable, then a snapshot of it: every later write is a first write.
    write_range(&sock, 1);
    {
        let mut c = Client::connect_with(&sock, &opts()).expect("connect");
        assert_eq!(run1(&mut c.queues[0], |q| q.flush(0, NO_FLAGS)).unwrap(), 0);
    }
    let t = s.d.ok("snapshot_create", json!({"name": "vol"}))["tag"]
        .as_u64()
        .expect("tag");
    write_range(&sock, 2);
    s.d.kill();
    s.d.restart();
    check_range(&sock, 2, "origin after a snapshot", false);
    s.d.ok(
        "snapshot_export",
        json!({"name": "snap", "origin_id": "o.img", "cow": s.cow, "tag": t, "readonly": true}),
    );
    check_range(&s.d.export_socket("snap"), 1, "the snapshot", true);
}

#[test]
fn writable_snapshot_export() {
    let mut s = setup("ack-snap");
    let sock = s.d.export_socket("vol");
    write_range(&sock, 1);
    let t = s.d.ok("snapshot_create", json!({"name": "vol"}))["tag"]
        .as_u64()
        .expect("tag");
    s.d.ok(
        "snapshot_export",
        json!({"name": "snapw", "origin_id": "o.img", "cow": s.cow, "tag": t, "readonly": false}),
    );
    let snap = s.d.export_socket("snapw");
    write_range(&snap, 3);
    s.d.kill();
    s.d.restart();
    check_range(&snap, 3, "writable snapshot", false);
    check_range(&sock, 1, "origin under the snapshot", false);
}
