//! The store handover of a live migration without QEMU (docs/migration.md): two daemons on
//! this machine, each with its own state directory, stand for two hosts sharing the files; a
//! vhost-user client stands for the guest. `tests/e2e_migrate.rs` does the same with a
//! migrating QEMU guest.

use std::time::Duration;

use serde_json::json;
use snapmv_rpc::codes;
use snapmv_tests::blkio_client::{run1, Client, NO_FLAGS};
use snapmv_tests::daemon::{scratch, sparse_file, Daemon};

const MIB: u64 = 1 << 20;

fn write_block(c: &mut Client, off: u64, byte: u8) {
    c.mem()[..4096].fill(byte);
    let p = c.ptr(0);
    let ret = run1(&mut c.queues[0], |q| q.write(off, p, 4096, 0, NO_FLAGS)).unwrap();
    assert_eq!(ret, 0, "write at {off}");
}

/// (status of the read, the block) — the status is 0 or a negative errno.
fn read_block(c: &mut Client, off: u64) -> (i32, Vec<u8>) {
    let p = c.ptr(0);
    let ret = run1(&mut c.queues[0], |q| q.read(off, p, 4096, 0, NO_FLAGS)).unwrap();
    (ret, c.mem()[..4096].to_vec())
}

struct Hosts {
    _dir: tempfile::TempDir,
    a: Daemon,
    b: Daemon,
    origin: String,
    cow: String,
}

/// Daemons A and B; A serves export `vol` of a fresh store, with one block written.
fn hosts(name: &str) -> Hosts {
    let dir = scratch(name);
    let (da, db) = (dir.path().join("a"), dir.path().join("b"));
    std::fs::create_dir(&da).unwrap();
    std::fs::create_dir(&db).unwrap();
    let origin = dir.path().join("vol.origin");
    let cow = dir.path().join("vol.cow");
    sparse_file(&origin, 8 * MIB);
    sparse_file(&cow, 32 * MIB);
    let (origin, cow) = (origin.display().to_string(), cow.display().to_string());
    let a = Daemon::start(&da);
    let b = Daemon::start(&db);
    a.cli(&["create", "vol", &origin, &cow, "-b", "-f", "-c", "4"]);
    Hosts {
        _dir: dir,
        a,
        b,
        origin,
        cow,
    }
}

#[test]
fn a_released_store_is_acquired_and_served_where_requests_waited() {
    let h = hosts("handover");
    let mut ca = Client::connect(&h.a.export_socket("vol")).unwrap();
    write_block(&mut ca, 0, 0xA1);
    let tag = h.a.ok("snapshot_create", json!({"name": "vol"}))["tag"]
        .as_u64()
        .unwrap();
    // A first write after the snapshot: held in an overlay until written out; the handover
    // must carry it.
    write_block(&mut ca, 0, 0xA2);

    let e = h.b.ok(
        "origin_create",
        json!({"name": "vol", "origin": h.origin, "cow": h.cow, "incoming": true, "chunk_size": 4}),
    );
    assert!(
        e["error"]
            .as_str()
            .is_some_and(|w| w.contains("waiting for COW store")),
        "{e}"
    );
    // Nothing of the store can be used on B yet.
    let m = h.b.err(
        "snapshot_create",
        json!({"name": "vol"}),
        codes::INVALID_STATE,
    );
    assert!(m.contains("waiting for COW store"), "{m}");
    let m = h.b.err(
        "export_acquire",
        json!({"name": "vol", "timeout_secs": 0}),
        codes::BUSY,
    );
    assert!(
        m.contains("still held by") && m.contains("snapmv release vol"),
        "{m}"
    );

    // The guest on B connects (configuration space: no store needed) and reads: the read
    // waits for the store.
    let sock_b = h.b.export_socket("vol");
    let reader = std::thread::spawn(move || {
        let mut cb = Client::connect(&sock_b).expect("connect to the incoming export");
        assert_eq!(
            cb.capacity(),
            8 * MIB,
            "capacity announced before the store"
        );
        read_block(&mut cb, 0)
    });
    std::thread::sleep(Duration::from_millis(300));
    assert!(!reader.is_finished(), "a read ran on B with no store");

    // A releases (its client still connected: it is disconnected) while B's acquire waits.
    let acquired = std::thread::scope(|s| {
        let w = s.spawn(|| {
            h.b.ok("export_acquire", json!({"name": "vol", "timeout_secs": 60}))
        });
        std::thread::sleep(Duration::from_millis(200));
        let r = h.a.ok("export_release", json!({"name": "vol"}));
        assert_eq!(r, json!({"name": "vol", "writeback": true}), "release on A");
        w.join().unwrap()
    });
    assert!(acquired["error"].is_null(), "{acquired}");
    assert_eq!(acquired["size"], 8 * MIB, "{acquired}");
    drop(ca);
    let (ret, data) = reader.join().unwrap();
    assert_eq!(ret, 0, "the waiting read failed");
    assert!(data.iter().all(|&x| x == 0xA2), "B read {:#x}", data[0]);

    // A has forgotten it; B serves it, with the snapshot taken on A.
    let ea = h.a.ok("export_list", json!({}));
    assert_eq!(ea["exports"], json!([]), "{ea}");
    let again = h.b.ok("export_acquire", json!({"name": "vol"}));
    assert!(again["error"].is_null(), "a second acquire: {again}");
    let list = h.b.ok("snapshot_list", json!({"name": "vol"})).to_string();
    assert!(list.contains(&format!("\"tag\":{tag}")), "{list}");
    let t = tag.to_string();
    h.b.cli(&["create", "snap", &h.origin, &h.cow, &t, "-r"]);
    let mut cs = snapmv_tests::blkio_client::Client::connect_with(
        &h.b.export_socket("snap"),
        &snapmv_tests::blkio_client::ClientOptions {
            read_only: true,
            ..Default::default()
        },
    )
    .unwrap();
    let (ret, data) = read_block(&mut cs, 0);
    assert_eq!(ret, 0);
    assert!(
        data.iter().all(|&x| x == 0xA1),
        "snapshot read {:#x}",
        data[0]
    );
    drop(cs);

    // And back: B releases, A acquires an incoming export again.
    h.b.cli(&["remove", "snap"]);
    h.a.ok(
        "origin_create",
        json!({"name": "vol", "origin": h.origin, "cow": h.cow, "incoming": true, "chunk_size": 4}),
    );
    // B was acquired without a cache mode: it serves write-through (safe; kept like a
    // guest's choice); a later acquire with the mode applies it, and the release reports it.
    let mode_file = h.b.state_dir.join("cache-mode/vol");
    let mode = std::fs::read_to_string(&mode_file).unwrap_or_default();
    assert_eq!(mode, "write-through", "{}", mode_file.display());
    h.b.ok("export_acquire", json!({"name": "vol", "writeback": true}));
    assert!(
        !mode_file.exists(),
        "still write-through after acquire with writeback"
    );
    let r = h.b.ok("export_release", json!({"name": "vol"}));
    assert_eq!(r["writeback"], true, "release on B: {r}");
    let out = h.a.cli(&["acquire", "vol", "--writeback"]);
    assert!(out.contains("export vol serves"), "{out}");
    let mut ca = Client::connect(&h.a.export_socket("vol")).unwrap();
    let (ret, data) = read_block(&mut ca, 0);
    assert_eq!(ret, 0);
    assert!(data.iter().all(|&x| x == 0xA2));
    drop(ca);
    let out = h.a.cli(&["release", "vol"]);
    assert!(out.contains("--writeback"), "{out}");
}

#[test]
fn handover_refusals_name_the_cause() {
    let h = hosts("handover-refusals");
    let (o, c) = (h.origin.as_str(), h.cow.as_str());
    // incoming opens an existing binding: no bind, no format, no NBD.
    for extra in [json!({"bind": true}), json!({"protocol": "nbd"})] {
        let mut p = json!({"name": "in", "origin": o, "cow": c, "incoming": true});
        for (k, v) in extra.as_object().unwrap() {
            p[k] = v.clone();
        }
        let m = h.b.err("origin_create", p, codes::INVALID_PARAMS);
        assert!(m.contains("incoming"), "{m}");
    }
    // A store moves whole: not while a snapshot of it is exported; not a snapshot export.
    let tag = h.a.ok("snapshot_create", json!({"name": "vol"}))["tag"]
        .as_u64()
        .unwrap();
    h.a.cli(&["create", "snap", o, c, &tag.to_string(), "-r"]);
    let m =
        h.a.err("export_release", json!({"name": "vol"}), codes::BUSY);
    assert!(m.contains("also used by export snap"), "{m}");
    let m = h.a.err(
        "export_release",
        json!({"name": "snap"}),
        codes::INVALID_STATE,
    );
    assert!(m.contains("not an origin"), "{m}");
    h.a.cli(&["remove", "snap"]);
    let m =
        h.a.err("export_release", json!({"name": "nope"}), codes::NOT_FOUND);
    assert!(m.contains("nope"), "{m}");

    // B never gets the store: acquire fails after its timeout, naming the holder; the
    // guest's waiting request fails once the export is removed, instead of hanging.
    h.b.cli(&["create", "vol", o, c, "--incoming", "-c", "4"]);
    let m = h.b.cli_fail(&["acquire", "vol", "--timeout", "1"]);
    assert!(m.contains("still held by process"), "{m}");
    let sock_b = h.b.export_socket("vol");
    let reader = std::thread::spawn(move || {
        let mut cb = Client::connect(&sock_b).expect("connect to the incoming export");
        read_block(&mut cb, 0).0
    });
    std::thread::sleep(Duration::from_millis(300));
    h.b.cli(&["remove", "vol", "--force"]);
    let ret = reader.join().unwrap();
    assert_ne!(ret, 0, "a read with no store succeeded");
    // A never stopped serving.
    let mut ca = Client::connect(&h.a.export_socket("vol")).unwrap();
    write_block(&mut ca, 4096, 0x5C);

    // An incoming export whose block size differs from the store's is refused at acquire.
    h.b.cli(&["create", "vol", o, c, "--incoming"]);
    drop(ca);
    h.a.ok("export_release", json!({"name": "vol"}));
    let m = h.b.err(
        "export_acquire",
        json!({"name": "vol"}),
        codes::INVALID_STATE,
    );
    assert!(m.contains("cannot replace the disk the guest saw"), "{m}");
}

/// The source dies (SIGKILL) with acknowledged writes not flushed, some of them first writes
/// after a snapshot (held in overlays): the kernel drops its locks with it, the destination
/// acquires the store and finds every acknowledged write (docs/migration.md, failure cases).
#[test]
fn a_killed_source_leaves_every_acknowledged_write_to_the_destination() {
    let mut h = hosts("handover-kill");
    let mut ca = Client::connect(&h.a.export_socket("vol")).unwrap();
    for i in 0..32u64 {
        write_block(&mut ca, i * 4096, 0x40);
    }
    h.a.ok("snapshot_create", json!({"name": "vol"}));
    for i in 0..64u64 {
        write_block(&mut ca, i * 4096, i as u8 + 1);
    }
    h.b.cli(&["create", "vol", &h.origin, &h.cow, "--incoming", "-c", "4"]);
    h.a.kill();
    drop(ca);
    let out = h.b.cli(&["acquire", "vol", "--timeout", "30"]);
    assert!(out.contains("export vol serves"), "{out}");
    let mut cb = Client::connect(&h.b.export_socket("vol")).unwrap();
    for i in 0..64u64 {
        let (ret, data) = read_block(&mut cb, i * 4096);
        assert_eq!(ret, 0, "read block {i} on B");
        assert!(
            data.iter().all(|&x| x == i as u8 + 1),
            "block {i} on B holds {:#x}, not the write A acknowledged",
            data[0]
        );
    }
}

/// `acquire` also serves exports that could not be re-created at start because their store
/// was held elsewhere — a snapshot's export with the snapshot, not the origin.
#[test]
fn acquire_serves_exports_that_failed_at_start() {
    let mut h = hosts("handover-restore");
    let mut ca = Client::connect(&h.a.export_socket("vol")).unwrap();
    write_block(&mut ca, 0, 0x31);
    let tag = h.a.ok("snapshot_create", json!({"name": "vol"}))["tag"]
        .as_u64()
        .unwrap()
        .to_string();
    write_block(&mut ca, 0, 0x32);
    drop(ca);
    h.a.cli(&["create", "snap", &h.origin, &h.cow, &tag, "-r"]);
    // A stops with its exports recorded; B holds the store meanwhile, so A's restart cannot
    // re-create them.
    let st = h.a.terminate();
    assert!(st.success(), "daemon A exited with {st}");
    h.b.cli(&["create", "vol", &h.origin, &h.cow, "--incoming", "-c", "4"]);
    h.b.cli(&["acquire", "vol"]);
    h.a.restart();
    let list = h.a.ok("export_list", json!({}));
    for e in list["exports"].as_array().unwrap() {
        assert!(
            e["error"].as_str().is_some_and(|w| w.contains("in use by")),
            "export restored while B holds the store: {e}"
        );
    }
    h.b.cli(&["release", "vol"]);
    for name in ["snap", "vol"] {
        let e =
            h.a.ok("export_acquire", json!({"name": name, "timeout_secs": 10}));
        assert!(e["error"].is_null(), "{e}");
    }
    let mut cs = snapmv_tests::blkio_client::Client::connect_with(
        &h.a.export_socket("snap"),
        &snapmv_tests::blkio_client::ClientOptions {
            read_only: true,
            ..Default::default()
        },
    )
    .unwrap();
    let (ret, data) = read_block(&mut cs, 0);
    assert_eq!(ret, 0);
    assert!(
        data.iter().all(|&x| x == 0x31),
        "snapshot export reads {:#x}",
        data[0]
    );
    let mut ca = Client::connect(&h.a.export_socket("vol")).unwrap();
    let (ret, data) = read_block(&mut ca, 0);
    assert_eq!(ret, 0);
    assert!(
        data.iter().all(|&x| x == 0x32),
        "origin export reads {:#x}",
        data[0]
    );
}
