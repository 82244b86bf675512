//! Stores and origins on Ceph RBD images in the daemon (issue 18): two daemons, each with its
//! own state directory, stand for two hosts sharing one cluster.
//!
//! - A live owner's images are refused to a second daemon, naming the image and the owner.
//! - A hung owner (SIGSTOPped) is taken over (`origin_create` with `takeover`): it is fenced,
//!   so the write it was sent while hung fails (EIO to its guest) and lands nowhere, its export
//!   is reported failed, and the new owner sees every write the old one acknowledged.
//! - A dead owner (SIGKILLed) is taken over: acknowledged writes and snapshots are all there,
//!   and the new owner restarts on its state (the `rbd:` locators are recorded), gracefully
//!   stopped or killed (then it takes its own dead incarnation's locks over at once).
//! - Operator safety holds on identities, not spellings: the store image, spelled otherwise,
//!   is refused as an origin.
//!
//! - Malformed locators and a missing Ceph configuration are refused with the cause (no
//!   cluster needed).
//!
//! The others need the Ceph test cluster (`ceph/cluster.sh`, see docs/ceph.md); they skip
//! loudly without it unless `SNAPMV_RBD_TESTS=1`.

use std::path::Path;

use serde_json::{json, Value};
use snapmv_rpc::{codes, RpcError};
use snapmv_tests::blkio_client::{run1, wait_for, Client, NO_FLAGS};
use snapmv_tests::daemon::{scratch, Daemon};
use snapmv_tests::rbd_cluster::{cluster, Image};

const BLOCK: usize = 4096;
const BLOCKS: u64 = 64;

/// Block `b` as written by `who` (one byte per writer) with sequence number `seq`.
fn block(who: u8, b: u64, seq: u64) -> Vec<u8> {
    let mut v = vec![who; BLOCK];
    v[..8].copy_from_slice(&b.to_le_bytes());
    v[8..16].copy_from_slice(&seq.to_le_bytes());
    v
}

fn write_block(cl: &mut Client, b: u64, data: &[u8]) -> i32 {
    cl.mem()[..BLOCK].copy_from_slice(data);
    let p = cl.ptr(0);
    run1(&mut cl.queues[0], |q| {
        q.write(b * BLOCK as u64, p, BLOCK, 0, NO_FLAGS)
    })
    .unwrap_or_else(|e| panic!("write of block {b}: {e}"))
}

fn read_block(cl: &mut Client, b: u64) -> Vec<u8> {
    let p = cl.ptr(0);
    let r = run1(&mut cl.queues[0], |q| {
        q.read(b * BLOCK as u64, p, BLOCK, 0, NO_FLAGS)
    })
    .unwrap_or_else(|e| panic!("read of block {b}: {e}"));
    assert_eq!(r, 0, "read of block {b} failed: {r}");
    cl.mem()[..BLOCK].to_vec()
}

/// Two fresh images: an origin of 4 MiB (the first BLOCKS blocks are used) and a store of
/// 64 MiB.
fn images(test: &str) -> Option<(Image, Image)> {
    let c = cluster(test)?;
    Some((
        Image::create(c, "daemon-origin", "4M", &[]),
        Image::create(c, "daemon-store", "64M", &[]),
    ))
}

/// Daemon A serves origin `o` in store `s` (formatted), writes every block once (acknowledged),
/// takes snapshot 1 and overwrites the first half; returns the daemon, its client and what
/// the origin and the snapshot hold.
fn serve_and_write(dir: &Path, o: &str, s: &str) -> (Daemon, Client, Vec<Vec<u8>>, Vec<Vec<u8>>) {
    let a = Daemon::start(dir);
    a.ok(
        "origin_create",
        json!({"name": "vol", "origin": o, "cow": s, "bind": true, "format": true}),
    );
    let mut cl = Client::connect(&a.export_socket("vol")).expect("connect to A's export");
    let mut now: Vec<Vec<u8>> = (0..BLOCKS).map(|b| block(b'A', b, 1)).collect();
    for b in 0..BLOCKS {
        assert_eq!(
            write_block(&mut cl, b, &now[b as usize]),
            0,
            "A's write {b}"
        );
    }
    let tag = a.ok("snapshot_create", json!({"name": "vol"}))["tag"]
        .as_u64()
        .expect("a tag");
    assert_eq!(tag, 1);
    let snap = now.clone();
    for b in 0..BLOCKS / 2 {
        now[b as usize] = block(b'A', b, 2);
        assert_eq!(
            write_block(&mut cl, b, &now[b as usize]),
            0,
            "A's rewrite {b}"
        );
    }
    (a, cl, now, snap)
}

fn remote_err(r: Result<Value, RpcError>) -> (i64, String) {
    match r {
        Err(RpcError::Remote(e)) => (e.code, e.message),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn takeover_fences_a_hung_owner_and_none_of_its_writes_lands() {
    let Some((origin, store)) = images("rbd_daemon::takeover_fences_a_hung_owner") else {
        return;
    };
    let (o, s) = (origin.locator(), store.locator());
    let (dir_a, dir_b) = (scratch("rbd-host-a"), scratch("rbd-host-b"));
    let (mut a, mut cl_a, now, snap) = serve_and_write(dir_a.path(), &o, &s);

    // Identity, not spelling: the store image as client.admin is still the store.
    let store_as_admin = format!(
        "rbd:{}/{}:conf={}",
        store.cluster.pool,
        store.name,
        store.cluster.conf.display()
    );
    let (code, msg) = remote_err(a.call(
        "origin_create",
        json!({"name": "x", "origin": store_as_admin, "cow": o, "bind": true}),
    ));
    assert_eq!(code, codes::ALREADY_EXISTS, "{msg}");
    assert!(msg.contains("is the COW store"), "{msg}");

    // A second live daemon is refused, naming the image, the owner and the way out.
    let b = Daemon::start(dir_b.path());
    let (code, msg) = remote_err(b.call(
        "origin_create",
        json!({"name": "vol", "origin": o, "cow": s}),
    ));
    assert_eq!(code, codes::BUSY, "{msg}");
    assert!(
        msg.contains(&origin.spec()) || msg.contains(&store.spec()),
        "names the image: {msg}"
    );
    assert!(
        msg.contains("RBD client") && msg.contains("--takeover"),
        "{msg}"
    );

    // A hangs; a write is sent to it meanwhile (it sits in the virtqueue).
    a.signal(libc::SIGSTOP);
    let late = block(b'L', 0, 9);
    cl_a.mem()[..BLOCK].copy_from_slice(&late);
    let p = cl_a.ptr(0);
    cl_a.queues[0].write(BLOCKS / 2 * BLOCK as u64, p, BLOCK, 7, NO_FLAGS);
    let late_block = BLOCKS / 2;
    let mut none = [];
    cl_a.queues[0]
        .do_io(&mut none, 0, None, None)
        .expect("submit the late write");

    // B takes over: every write A acknowledged is there, and the snapshot.
    b.ok(
        "origin_create",
        json!({"name": "vol", "origin": o, "cow": s, "takeover": true}),
    );
    let mut cl_b = Client::connect(&b.export_socket("vol")).expect("connect to B's export");
    for bl in 0..BLOCKS {
        assert!(
            read_block(&mut cl_b, bl) == now[bl as usize],
            "block {bl}: B does not read what A acknowledged"
        );
    }
    let list = b.ok("snapshot_list", json!({"name": "vol"})).to_string();
    assert!(list.contains("\"tag\":1"), "{list}");
    // B writes the first block.
    let mine = block(b'B', 0, 3);
    assert_eq!(write_block(&mut cl_b, 0, &mine), 0);

    // A resumes: its late write fails (EIO), and A reports the export failed.
    a.signal(libc::SIGCONT);
    let done = wait_for(&mut cl_a.queues[0], 1).expect("the late write completes");
    assert_eq!(done[0].0, 7);
    assert!(
        done[0].1 < 0,
        "A's write after the takeover succeeded; log:\n{}",
        a.log()
    );
    let ret = write_block(&mut cl_a, 1, &block(b'L', 1, 9));
    assert!(ret < 0, "A still writes after the takeover");
    let exports = a.ok("export_list", json!({})).to_string();
    assert!(exports.contains("ownership lost"), "{exports}");
    assert!(exports.contains("blocklisted"), "{exports}");

    // Nothing of A's landed: B's block and A's acknowledged data are intact.
    assert!(read_block(&mut cl_b, 0) == mine, "B's block 0 changed");
    assert!(
        read_block(&mut cl_b, late_block) == now[late_block as usize],
        "A's late write landed"
    );
    assert!(
        read_block(&mut cl_b, 1) == now[1],
        "A's write after the fence landed"
    );
    // The snapshot taken on A is readable on B.
    b.ok(
        "snapshot_export",
        json!({"name": "snap", "cow": s, "origin_id": origin.name, "tag": 1}),
    );
    let mut cl_s = Client::connect(&b.export_socket("snap")).expect("connect to B's snapshot");
    for bl in 0..BLOCKS {
        assert!(
            read_block(&mut cl_s, bl) == snap[bl as usize],
            "snapshot block {bl}"
        );
    }
    drop((cl_a, cl_b, cl_s));
    // The failed export can be removed on the fenced daemon.
    a.ok("export_remove", json!({"name": "vol", "force": true}));
    assert!(a.is_running(), "A died removing its fenced export");
    a.kill();
    drop(b);
}

#[test]
fn a_killed_owner_is_taken_over_and_the_new_owner_restarts_on_its_state() {
    let Some((origin, store)) = images("rbd_daemon::a_killed_owner_is_taken_over") else {
        return;
    };
    let (o, s) = (origin.locator(), store.locator());
    let (dir_a, dir_b) = (scratch("rbd-kill-a"), scratch("rbd-kill-b"));
    let (mut a, cl_a, now, snap) = serve_and_write(dir_a.path(), &o, &s);
    a.kill();
    drop(cl_a);

    // `snapmv check --takeover` on the dead owner's store: clean, and its lock is freed.
    let out = a.cli(&["check", "--takeover", &s]);
    assert!(out.contains("is clean"), "{out}");

    let mut b = Daemon::start(dir_b.path());
    b.ok(
        "origin_create",
        json!({"name": "vol", "origin": o, "cow": s, "takeover": true}),
    );
    b.ok(
        "snapshot_export",
        json!({"name": "snap", "cow": s, "origin_id": origin.name, "tag": 1}),
    );
    // A graceful stop releases the locks; the restart reopens the recorded locators.
    b.terminate();
    b.restart();
    let mut cl = Client::connect(&b.export_socket("vol")).expect("connect to B's export");
    let mut cl_s = Client::connect(&b.export_socket("snap")).expect("connect to B's snapshot");
    for bl in 0..BLOCKS {
        assert!(read_block(&mut cl, bl) == now[bl as usize], "block {bl}");
        assert!(
            read_block(&mut cl_s, bl) == snap[bl as usize],
            "snapshot block {bl}"
        );
    }
    let exports = b.ok("export_list", json!({})).to_string();
    assert!(!exports.contains("\"error\":\""), "{exports}");
    // Killed in turn, B restarts at once: its own dead incarnation's locks (the addresses
    // its state directory recorded) are taken over, not waited out.
    drop((cl, cl_s));
    b.kill();
    b.restart();
    assert!(
        b.log()
            .contains("this daemon's previous (dead) incarnation: taking it over"),
        "{}",
        b.log()
    );
    let mut cl = Client::connect(&b.export_socket("vol")).expect("connect to B's export");
    assert!(read_block(&mut cl, 0) == now[0]);
    // A local file cannot be "taken over".
    let (code, msg) = remote_err(b.call(
        "origin_create",
        json!({"name": "y", "origin": "/etc/hostname", "cow": s, "takeover": true}),
    ));
    assert_eq!(code, codes::INVALID_PARAMS, "{msg}");
    drop(cl);
}

/// Needs no cluster: a malformed locator is an invalid parameter naming the bad part, and a
/// missing Ceph configuration is "not found", naming the image and the file; nothing is
/// recorded.
#[test]
fn bad_locators_are_refused_with_the_cause() {
    let dir = scratch("rbd-bad-locators");
    let d = Daemon::start(dir.path());
    let store = dir.path().join("c.img");
    snapmv_tests::daemon::sparse_file(&store, 16 << 20);
    for (origin, want) in [
        ("rbd:onlypool", "bad rbd locator"),
        ("rbd:pool/image@snap", "bad rbd locator"),
        ("rbd:pool/image:rbd_cache=true", "bad rbd locator"),
    ] {
        let (code, msg) = remote_err(d.call(
            "origin_create",
            json!({"name": "v", "origin": origin, "cow": store, "bind": true, "format": true}),
        ));
        assert_eq!(code, codes::INVALID_PARAMS, "{origin}: {msg}");
        assert!(msg.contains(want), "{origin}: {msg}");
    }
    let unreachable = format!(
        "rbd:pool/image:conf={}",
        dir.path().join("no-such-ceph.conf").display()
    );
    let (code, msg) = remote_err(d.call(
        "origin_create",
        json!({"name": "v", "origin": unreachable, "cow": store, "bind": true, "format": true}),
    ));
    assert_eq!(code, codes::NOT_FOUND, "{msg}");
    assert!(
        msg.contains("rbd:pool/image") && msg.contains("no-such-ceph.conf"),
        "{msg}"
    );
    let list = d.ok("export_list", json!({})).to_string();
    assert!(!list.contains("\"name\":\"v\""), "{list}");
}
