//! SIGKILL the daemon with exports and a rollback in progress, start it again: every export is
//! back on the same socket, the rollback completes, and the data is what it must be.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use snapmv_tests::blkio_client::{run1, Client, NO_FLAGS};
use snapmv_tests::daemon::{scratch, sparse_file, Daemon};

const MIB: u64 = 1 << 20;
const ORIGIN_SIZE: u64 = 64 * MIB;
/// Bytes per request when filling or reading the whole origin.
const SPAN: usize = 4 << 20;
/// Rounds tried to catch the rollback still running at the moment of the kill.
const ROUNDS: usize = 5;

fn write_block(c: &mut Client, off: u64, byte: u8) {
    c.mem()[..4096].fill(byte);
    let p = c.ptr(0);
    let ret = run1(&mut c.queues[0], |q| q.write(off, p, 4096, 0, NO_FLAGS)).unwrap();
    assert_eq!(ret, 0, "write at {off}");
}

fn read_block(c: &mut Client, off: u64) -> Vec<u8> {
    let p = c.ptr(0);
    let ret = run1(&mut c.queues[0], |q| q.read(off, p, 4096, 0, NO_FLAGS)).unwrap();
    assert_eq!(ret, 0, "read at {off}");
    c.mem()[..4096].to_vec()
}

/// Pattern A (the snapshot's content): every 4 KiB block names its own index.
fn fill_a(buf: &mut [u8], off: u64) {
    for (i, block) in buf.chunks_mut(4096).enumerate() {
        let idx = off / 4096 + i as u64;
        for (j, word) in block.chunks_mut(8).enumerate() {
            word.copy_from_slice(&(idx * 1000 + j as u64).to_le_bytes());
        }
    }
}

/// Writes the whole origin: pattern A, or `byte` everywhere.
fn fill_origin(c: &mut Client, byte: Option<u8>) {
    for off in (0..ORIGIN_SIZE).step_by(SPAN) {
        match byte {
            Some(b) => c.mem()[..SPAN].fill(b),
            None => fill_a(&mut c.mem()[..SPAN], off),
        }
        let p = c.ptr(0);
        let ret = run1(&mut c.queues[0], |q| q.write(off, p, SPAN, 0, NO_FLAGS)).unwrap();
        assert_eq!(ret, 0, "write at {off}");
    }
}

/// Checks that the whole volume holds pattern A.
fn check_a(c: &mut Client, what: &str) {
    let mut want = vec![0u8; SPAN];
    for off in (0..ORIGIN_SIZE).step_by(SPAN) {
        let p = c.ptr(0);
        let ret = run1(&mut c.queues[0], |q| q.read(off, p, SPAN, 0, NO_FLAGS)).unwrap();
        assert_eq!(ret, 0, "read {what} at {off}");
        fill_a(&mut want, off);
        if c.mem()[..SPAN] != want[..] {
            let bad = c.mem()[..SPAN]
                .iter()
                .zip(&want)
                .position(|(a, b)| a != b)
                .unwrap_or(0);
            panic!("{what}: first wrong byte at {}", off + bad as u64);
        }
    }
}

fn rollback_of(d: &Daemon) -> Option<Value> {
    let st = d.ok("status", json!({"name": "vol"}));
    st["stores"][0]["origins"][0].get("rollback").cloned()
}

fn exports_by_name(d: &Daemon) -> Vec<(String, String, Option<String>)> {
    let v = d.ok("export_list", Value::Null);
    v["exports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["name"].as_str().unwrap().to_string(),
                e["socket"].as_str().unwrap().to_string(),
                e.get("error").and_then(Value::as_str).map(str::to_string),
            )
        })
        .collect()
}

#[test]
fn sigkill_during_rollback_then_restart() {
    let dir = scratch("restart");
    let origin = dir.path().join("o.img");
    let cow = dir.path().join("c.img");
    sparse_file(&origin, ORIGIN_SIZE);
    // Each rollback round keeps a hidden image of the whole origin.
    sparse_file(&cow, (ROUNDS as u64 + 2) * 2 * ORIGIN_SIZE);
    let (o, c) = (origin.display().to_string(), cow.display().to_string());
    let mut d = Daemon::start(dir.path());
    d.ok(
        "origin_create",
        json!({"name": "vol", "origin": o, "cow": c, "bind": true, "format": true}),
    );
    let region = snapmv_tests::blkio_client::ClientOptions {
        region_len: SPAN,
        ..Default::default()
    };
    {
        let mut cl = Client::connect_with(&d.export_socket("vol"), &region).unwrap();
        fill_origin(&mut cl, None);
    }
    let t = d.ok("snapshot_create", json!({"name": "vol", "memo": "A"}))["tag"]
        .as_u64()
        .unwrap();
    d.ok(
        "snapshot_export",
        json!({"name": "snap", "origin_id": "o.img", "cow": c, "tag": t, "readonly": true}),
    );
    let before = exports_by_name(&d);
    assert_eq!(before.len(), 2);

    // Overwrite everything, start the rollback, SIGKILL while it runs. Whether it is still
    // running at the kill depends on the machine's speed: try a few rounds to catch it, and
    // check the same things either way.
    let mut caught = None;
    for round in 0..ROUNDS {
        {
            let mut cl = Client::connect_with(&d.export_socket("vol"), &region).unwrap();
            fill_origin(&mut cl, Some(0xee - round as u8));
        }
        let r = d.ok("snapshot_rollback", json!({"name": "vol", "tag": t}));
        assert_eq!(r["tag"], t);
        if let Some(p) = rollback_of(&d) {
            d.kill();
            caught = Some(p);
            break;
        }
    }
    if caught.is_none() {
        d.kill();
    }
    eprintln!(
        "rollback at SIGKILL: {}",
        caught.map_or("finished in every round".into(), |r| r.to_string())
    );

    d.restart();
    // Every export is back, on the same socket, being served.
    let after = exports_by_name(&d);
    assert_eq!(after, before, "exports after restart");
    assert!(after.iter().all(|(_, _, err)| err.is_none()), "{after:?}");
    // The rollback completes (hang guard only, not a timing assertion).
    let deadline = Instant::now() + Duration::from_secs(600);
    while let Some(r) = rollback_of(&d) {
        assert!(
            Instant::now() < deadline,
            "rollback still running after restart: {r}\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let list = d.ok("snapshot_list", json!({"name": "vol"}));
    assert_eq!(list["origins"][0]["snapshots"][0]["memo"], "A");

    // The origin is the snapshot again, and the snapshot did not change.
    let mut vol = Client::connect_with(&d.export_socket("vol"), &region).unwrap();
    check_a(&mut vol, "origin");
    let mut snap = Client::connect_with(
        &d.export_socket("snap"),
        &snapmv_tests::blkio_client::ClientOptions {
            read_only: true,
            region_len: SPAN,
            ..Default::default()
        },
    )
    .unwrap();
    check_a(&mut snap, "snapshot");
    drop((vol, snap));

    // A second restart with nothing running changes nothing.
    d.restart();
    assert_eq!(exports_by_name(&d), before);
    assert!(rollback_of(&d).is_none());
}

/// An export whose origin vanished while the daemon was down is listed with the reason after
/// the restart, the others are served, and `export_remove` drops it.
#[test]
fn export_that_cannot_be_restored_is_reported() {
    let dir = scratch("restart-missing");
    let (o1, o2, c1, c2) = (
        dir.path().join("o1.img"),
        dir.path().join("o2.img"),
        dir.path().join("c1.img"),
        dir.path().join("c2.img"),
    );
    for (p, len) in [(&o1, MIB), (&o2, MIB), (&c1, 16 * MIB), (&c2, 16 * MIB)] {
        sparse_file(p, len);
    }
    let mut d = Daemon::start(dir.path());
    for (name, o, c) in [("a", &o1, &c1), ("b", &o2, &c2)] {
        d.ok(
            "origin_create",
            json!({"name": name, "origin": o, "cow": c, "bind": true, "format": true}),
        );
    }
    d.kill();
    std::fs::remove_file(&o2).unwrap();
    d.restart();
    let after = exports_by_name(&d);
    assert_eq!(after.len(), 2);
    assert_eq!(after[0].0, "a");
    assert_eq!(after[0].2, None);
    assert_eq!(after[1].0, "b");
    let err = after[1]
        .2
        .clone()
        .expect("b must report why it is not served");
    assert!(err.contains("o2.img"), "{err}");
    let m = d.err(
        "snapshot_create",
        json!({"name": "b"}),
        snapmv_rpc::codes::INVALID_STATE,
    );
    assert!(m.contains("not being served"), "{m}");
    assert!(Client::connect(&d.export_socket("a")).is_ok());
    d.ok("export_remove", json!({"name": "b"}));
    assert_eq!(exports_by_name(&d).len(), 1);
    d.restart();
    assert_eq!(exports_by_name(&d).len(), 1);
}

/// SIGTERM stops the daemon cleanly: exit status 0, sockets removed, stores closed (so
/// `snapmv check` is clean), and the next start brings the exports back.
#[test]
fn sigterm_stops_cleanly_and_exports_come_back() {
    let dir = scratch("sigterm");
    let (o, c) = (dir.path().join("o.img"), dir.path().join("c.img"));
    sparse_file(&o, MIB);
    sparse_file(&c, 16 * MIB);
    let mut d = Daemon::start(dir.path());
    d.ok(
        "origin_create",
        json!({"name": "vol", "origin": o, "cow": c, "bind": true, "format": true}),
    );
    {
        let mut cl = Client::connect(&d.export_socket("vol")).unwrap();
        write_block(&mut cl, 0, 0x5a);
    }
    d.ok("snapshot_create", json!({"name": "vol"}));
    let st = d.terminate();
    assert!(st.success(), "exit status {st}; log:\n{}", d.log());
    assert!(!d.rpc_socket.exists(), "RPC socket left behind");
    assert!(
        !d.export_socket("vol").exists(),
        "export socket left behind"
    );
    let out = std::process::Command::new(&d.bin)
        .arg("--rpc-socket")
        .arg(&d.rpc_socket)
        .arg("check")
        .arg(&c)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    d.restart();
    assert_eq!(exports_by_name(&d).len(), 1);
    let mut cl = Client::connect(&d.export_socket("vol")).unwrap();
    assert_eq!(read_block(&mut cl, 0), vec![0x5a; 4096]);
}

/// The cache mode a guest chose (write-through) survives a reconnect and a daemon restart:
/// QEMU sends it only when the guest changes it, so a restarted daemon that forgot it would
/// acknowledge writes as a write-back cache to a guest that sends no flushes.
#[test]
fn guest_cache_mode_survives_reconnects_and_restarts() {
    use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserProtocolFeatures};
    use vhost::vhost_user::{Frontend, VhostUserFrontend};
    use vhost::VhostBackend;
    const WRITEBACK: usize = 32;
    let writeback = |sock: &std::path::Path, set: Option<u8>| -> u8 {
        let mut fe = Frontend::connect(sock, 1).expect("connect");
        fe.set_owner().expect("SET_OWNER");
        fe.get_features().expect("GET_FEATURES");
        let pf = fe.get_protocol_features().expect("GET_PROTOCOL_FEATURES");
        fe.set_protocol_features(pf & VhostUserProtocolFeatures::CONFIG)
            .expect("SET_PROTOCOL_FEATURES");
        if let Some(v) = set {
            fe.set_config(WRITEBACK as u32, VhostUserConfigFlags::WRITABLE, &[v])
                .expect("SET_CONFIG writeback");
        }
        let (_, cfg) = fe
            .get_config(0, 60, VhostUserConfigFlags::WRITABLE, &[0u8; 60])
            .expect("GET_CONFIG");
        cfg[WRITEBACK]
    };
    let dir = scratch("cache-mode");
    let (o, c) = (dir.path().join("o.img"), dir.path().join("c.img"));
    sparse_file(&o, MIB);
    sparse_file(&c, 16 * MIB);
    let mut d = Daemon::start(dir.path());
    d.ok(
        "origin_create",
        json!({"name": "vol", "origin": o, "cow": c, "bind": true, "format": true}),
    );
    let sock = d.export_socket("vol");
    assert_eq!(writeback(&sock, None), 1, "a new export is write-back");
    assert_eq!(
        writeback(&sock, Some(0)),
        0,
        "the guest chose write-through"
    );
    assert_eq!(writeback(&sock, None), 0, "after a reconnect");
    d.kill();
    d.restart();
    assert_eq!(writeback(&sock, None), 0, "after SIGKILL and a restart");
    assert_eq!(
        writeback(&sock, Some(1)),
        1,
        "the guest chose write-back again"
    );
    d.terminate();
    d.restart();
    assert_eq!(writeback(&sock, None), 1, "after a clean restart");
    // A removed export forgets the choice; the same name later starts write-back.
    assert_eq!(writeback(&sock, Some(0)), 0);
    d.ok("export_remove", json!({"name": "vol", "force": true}));
    d.ok(
        "origin_create",
        json!({"name": "vol", "origin": o, "cow": c}),
    );
    assert_eq!(
        writeback(&sock, None),
        1,
        "a re-created export is write-back"
    );
}
