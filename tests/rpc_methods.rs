//! Every management method through the daemon's socket: the success path and each documented
//! error (docs/rpc.md), plus the protocol's own errors and hostile-client behaviour.

use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};
use snapmv_rpc::codes;
use snapmv_tests::blkio_client::{run1, Client, NO_FLAGS};
use snapmv_tests::daemon::{scratch, sparse_file, Daemon};

const MIB: u64 = 1 << 20;

struct Fx {
    _dir: tempfile::TempDir,
    d: Daemon,
    origin: String,
    cow: String,
}

/// A daemon plus an origin (4 MiB) and a store file (16 MiB), not yet used.
fn fixture(name: &str) -> Fx {
    fixture_sized(name, 16 * MIB)
}

fn fixture_sized(name: &str, cow_size: u64) -> Fx {
    let dir = scratch(name);
    let origin = dir.path().join("o.img");
    let cow = dir.path().join("c.img");
    sparse_file(&origin, 4 * MIB);
    sparse_file(&cow, cow_size);
    let d = Daemon::start(dir.path());
    Fx {
        origin: origin.display().to_string(),
        cow: cow.display().to_string(),
        d,
        _dir: dir,
    }
}

impl Fx {
    /// `origin_create vol` with bind + format.
    fn create_vol(&self) -> Value {
        self.d.ok(
            "origin_create",
            json!({"name": "vol", "origin": self.origin, "cow": self.cow, "bind": true, "format": true}),
        )
    }

    fn extra_file(&self, name: &str, len: u64) -> String {
        let p = Path::new(&self.origin).with_file_name(name);
        sparse_file(&p, len);
        p.display().to_string()
    }
}

fn write_byte(c: &mut Client, off: u64, len: usize, byte: u8) {
    c.mem()[..len].fill(byte);
    let p = c.ptr(0);
    let ret = run1(&mut c.queues[0], |q| q.write(off, p, len, 0, NO_FLAGS)).unwrap();
    assert_eq!(ret, 0, "write at {off}");
}

fn read_bytes(c: &mut Client, off: u64, len: usize) -> Vec<u8> {
    let p = c.ptr(0);
    let ret = run1(&mut c.queues[0], |q| q.read(off, p, len, 0, NO_FLAGS)).unwrap();
    assert_eq!(ret, 0, "read at {off}");
    c.mem()[..len].to_vec()
}

#[test]
fn origin_create_success_and_errors() {
    let f = fixture("oc");
    let v = f.d.ok(
        "origin_create",
        json!({"name": "vol", "origin": f.origin, "cow": f.cow, "bind": true, "format": true,
               "chunk_size": 2, "num_queues": 2, "origin_id": "disk0"}),
    );
    assert_eq!(v["name"], "vol");
    assert_eq!(v["origin_id"], "disk0");
    assert_eq!(v["size"], 4 * MIB);
    assert_eq!(v["num_queues"], 2);
    assert_eq!(v["tag"], Value::Null);
    let sock = v["socket"].as_str().unwrap().to_string();
    assert_eq!(Path::new(&sock), f.d.export_socket("vol"));
    assert!(std::fs::symlink_metadata(&sock)
        .unwrap()
        .file_type()
        .is_socket());
    let st = f.d.ok("status", json!({}));
    assert_eq!(
        st["stores"][0]["chunk_size"], 8192,
        "chunk_size is in 4 KiB pages"
    );

    // Names.
    for bad in ["a/b", "..", "", &"x".repeat(65), "sp ace"] {
        let m = f.d.err(
            "origin_create",
            json!({"name": bad, "origin": f.origin, "cow": f.cow}),
            codes::INVALID_PARAMS,
        );
        assert!(m.contains("export name"), "{m}");
    }
    // Same name again.
    let m = f.d.err(
        "origin_create",
        json!({"name": "vol", "origin": f.origin, "cow": f.cow}),
        codes::ALREADY_EXISTS,
    );
    assert!(m.contains("vol"), "{m}");
    // Same origin under another name.
    let m = f.d.err(
        "origin_create",
        json!({"name": "vol2", "origin": f.origin, "cow": f.cow}),
        codes::ALREADY_EXISTS,
    );
    assert!(m.contains("already exported as vol"), "{m}");
    // Missing and relative paths.
    let m = f.d.err(
        "origin_create",
        json!({"name": "x", "origin": "/nonexistent/o", "cow": f.cow}),
        codes::NOT_FOUND,
    );
    assert!(m.contains("/nonexistent/o"), "{m}");
    f.d.err(
        "origin_create",
        json!({"name": "x", "origin": "o.img", "cow": f.cow}),
        codes::INVALID_PARAMS,
    );
    // A directory.
    f.d.err(
        "origin_create",
        json!({"name": "x", "origin": "/tmp", "cow": f.cow}),
        codes::INVALID_PARAMS,
    );
    // Origin and store the same file; origin that is a store in use; store that is an origin.
    let o2 = f.extra_file("o2.img", 4 * MIB);
    f.d.err(
        "origin_create",
        json!({"name": "x", "origin": o2, "cow": o2, "bind": true}),
        codes::INVALID_PARAMS,
    );
    let m = f.d.err(
        "origin_create",
        json!({"name": "x", "origin": f.cow, "cow": f.cow.replace("c.img", "o2.img")}),
        codes::ALREADY_EXISTS,
    );
    assert!(m.contains("COW store"), "{m}");
    let m = f.d.err(
        "origin_create",
        json!({"name": "x", "origin": o2, "cow": f.origin}),
        codes::ALREADY_EXISTS,
    );
    assert!(m.contains("origin"), "{m}");
    // Files of the daemon itself.
    let state = f.d.state_dir.join("state.json").display().to_string();
    f.d.err(
        "origin_create",
        json!({"name": "x", "origin": state, "cow": f.cow}),
        codes::INVALID_PARAMS,
    );
    let lock = format!("{}.lock", f.d.rpc_socket.display());
    let m = f.d.err(
        "origin_create",
        json!({"name": "x", "origin": o2, "cow": lock, "bind": true, "force_format": true}),
        codes::INVALID_PARAMS,
    );
    assert!(m.contains("lock file"), "{m}");
    // Option combinations.
    f.d.err(
        "origin_create",
        json!({"name": "x", "origin": o2, "cow": f.cow, "format": true}),
        codes::INVALID_PARAMS,
    );
    f.d.err(
        "origin_create",
        json!({"name": "x", "origin": o2, "cow": f.cow, "bind": true, "chunk_size": 2}),
        codes::INVALID_PARAMS,
    );
    let c2 = f.extra_file("c2.img", 16 * MIB);
    f.d.err(
        "origin_create",
        json!({"name": "x", "origin": o2, "cow": c2, "bind": true, "format": true, "chunk_size": 3}),
        codes::INVALID_PARAMS,
    );
    f.d.err(
        "origin_create",
        json!({"name": "x", "origin": o2, "cow": c2, "num_queues": 0}),
        codes::INVALID_PARAMS,
    );
    // Formatting a store in use.
    let m = f.d.err(
        "origin_create",
        json!({"name": "x", "origin": o2, "cow": f.cow, "bind": true, "force_format": true}),
        codes::BUSY,
    );
    assert!(m.contains("vol"), "{m}");
    // Not formatted (all zeroes): the store is reported damaged, by name.
    let m = f.d.err(
        "origin_create",
        json!({"name": "x", "origin": o2, "cow": c2}),
        codes::CORRUPT,
    );
    assert!(m.contains("c2.img"), "{m}");
    // Not bound yet (store is formatted and open): origin not found.
    f.d.err(
        "origin_create",
        json!({"name": "x", "origin": o2, "cow": f.cow}),
        codes::NOT_FOUND,
    );
    // Bind twice: a second origin binds, the same id twice does not.
    f.d.ok(
        "origin_create",
        json!({"name": "x", "origin": o2, "cow": f.cow, "bind": true}),
    );
    let o3 = f.extra_file("o3.img", 4 * MIB);
    f.d.err(
        "origin_create",
        json!({"name": "y", "origin": o3, "cow": f.cow, "bind": true, "origin_id": "disk0"}),
        codes::ALREADY_EXISTS,
    );
    // Socket paths: a regular file is never replaced; relative paths are refused.
    let plain = f.extra_file("plain", 10);
    let m = f.d.err(
        "origin_create",
        json!({"name": "y", "origin": o3, "cow": f.cow, "bind": true, "socket": plain}),
        codes::ALREADY_EXISTS,
    );
    assert!(m.contains("not a socket"), "{m}");
    assert_eq!(std::fs::metadata(&plain).unwrap().len(), 10);
    f.d.err(
        "origin_create",
        json!({"name": "y", "origin": o3, "cow": f.cow, "bind": true, "socket": "y.sock"}),
        codes::INVALID_PARAMS,
    );
    // The daemon's own RPC socket, however it is spelt.
    for sock in [
        f.d.rpc_socket.display().to_string(),
        format!("{}/./rpc.sock", f.d.dir.display()),
    ] {
        let m = f.d.err(
            "origin_create",
            json!({"name": "y", "origin": o3, "cow": f.cow, "bind": true, "socket": sock}),
            codes::INVALID_PARAMS,
        );
        assert!(m.contains("RPC socket"), "{m}");
    }
    // Unknown and mistyped parameters.
    f.d.err(
        "origin_create",
        json!({"name": "y", "origin": o3, "cow": f.cow, "bnid": true}),
        codes::INVALID_PARAMS,
    );
    f.d.err(
        "origin_create",
        json!({"name": "y", "origin": o3, "cow": f.cow, "bind": "yes"}),
        codes::INVALID_PARAMS,
    );
    f.d.err("origin_create", Value::Null, codes::INVALID_PARAMS);
    // A given socket path works.
    let sock_y = Path::new(&f.origin).with_file_name("y.sock");
    let v = f.d.ok(
        "origin_create",
        json!({"name": "y", "origin": o3, "cow": f.cow, "bind": true, "socket": sock_y}),
    );
    assert_eq!(Path::new(v["socket"].as_str().unwrap()), sock_y);
    assert!(sock_y.exists());
}

#[test]
fn snapshot_export_success_and_errors() {
    let f = fixture("se");
    f.create_vol();
    let t1 =
        f.d.ok("snapshot_create", json!({"name": "vol", "memo": "one"}))["tag"]
            .as_u64()
            .unwrap();
    // By origin path.
    let v = f.d.ok(
        "snapshot_export",
        json!({"name": "s1", "origin": f.origin, "cow": f.cow, "tag": t1, "readonly": true}),
    );
    assert_eq!(v["tag"], t1);
    assert_eq!(v["readonly"], true);
    assert!(f.d.export_socket("s1").exists());
    // By origin id.
    let t2 = f.d.ok("snapshot_create", json!({"name": "vol"}))["tag"]
        .as_u64()
        .unwrap();
    let v = f.d.ok(
        "snapshot_export",
        json!({"name": "s2", "origin_id": "o.img", "cow": f.cow, "tag": t2}),
    );
    assert_eq!(v["origin_id"], "o.img");
    // The same snapshot twice.
    let m = f.d.err(
        "snapshot_export",
        json!({"name": "s3", "origin_id": "o.img", "cow": f.cow, "tag": t1}),
        codes::ALREADY_EXISTS,
    );
    assert!(m.contains("s1"), "{m}");
    // No such snapshot.
    let m = f.d.err(
        "snapshot_export",
        json!({"name": "s3", "origin_id": "o.img", "cow": f.cow, "tag": 999}),
        codes::NOT_FOUND,
    );
    assert!(m.contains("999"), "{m}");
    // Neither origin nor origin_id; unknown origin id.
    f.d.err(
        "snapshot_export",
        json!({"name": "s3", "cow": f.cow, "tag": t1}),
        codes::INVALID_PARAMS,
    );
    let m = f.d.err(
        "snapshot_export",
        json!({"name": "s3", "origin_id": "nope", "cow": f.cow, "tag": t1}),
        codes::NOT_FOUND,
    );
    assert!(m.contains("nope"), "{m}");
    // Name taken, bad name, bad tag type, missing store.
    f.d.err(
        "snapshot_export",
        json!({"name": "vol", "origin_id": "o.img", "cow": f.cow, "tag": t1}),
        codes::ALREADY_EXISTS,
    );
    f.d.err(
        "snapshot_export",
        json!({"name": "../x", "origin_id": "o.img", "cow": f.cow, "tag": t1}),
        codes::INVALID_PARAMS,
    );
    f.d.err(
        "snapshot_export",
        json!({"name": "s3", "origin_id": "o.img", "cow": f.cow, "tag": "one"}),
        codes::INVALID_PARAMS,
    );
    f.d.err(
        "snapshot_export",
        json!({"name": "s3", "origin_id": "o.img", "cow": "/nonexistent/c", "tag": t1}),
        codes::NOT_FOUND,
    );
    let list = f.d.ok("export_list", Value::Null);
    let names: Vec<&str> = list["exports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["s1", "s2", "vol"]);
}

#[test]
fn export_remove_keeps_data() {
    let f = fixture("er");
    f.create_vol();
    {
        let mut c = Client::connect(&f.d.export_socket("vol")).unwrap();
        write_byte(&mut c, 8192, 4096, 0xab);
    }
    let t = f.d.ok("snapshot_create", json!({"name": "vol"}))["tag"]
        .as_u64()
        .unwrap();
    assert_eq!(
        f.d.ok("export_remove", json!({"name": "vol"})),
        json!({"name": "vol"})
    );
    assert!(!f.d.export_socket("vol").exists());
    assert_eq!(f.d.ok("export_list", json!({}))["exports"], json!([]));
    // No export uses the store any more: the daemon has closed it.
    assert_eq!(f.d.ok("status", Value::Null)["stores"], json!([]));
    f.d.err("export_remove", json!({"name": "vol"}), codes::NOT_FOUND);
    f.d.err(
        "export_remove",
        json!({"name": "a/b"}),
        codes::INVALID_PARAMS,
    );
    f.d.err("export_remove", json!({}), codes::INVALID_PARAMS);
    // Export it again without bind: data and snapshot are still there.
    f.d.ok(
        "origin_create",
        json!({"name": "vol", "origin": f.origin, "cow": f.cow}),
    );
    let mut c = Client::connect(&f.d.export_socket("vol")).unwrap();
    assert_eq!(read_bytes(&mut c, 8192, 4096), vec![0xab; 4096]);
    let l = f.d.ok("snapshot_list", json!({"name": "vol"}));
    assert_eq!(l["origins"][0]["snapshots"][0]["tag"], t);
}

#[test]
fn snapshot_create_of_origin_and_of_snapshot() {
    let f = fixture("sc");
    f.create_vol();
    let t1 =
        f.d.ok("snapshot_create", json!({"name": "vol", "memo": "base"}))["tag"]
            .as_u64()
            .unwrap();
    f.d.ok(
        "snapshot_export",
        json!({"name": "s", "origin_id": "o.img", "cow": f.cow, "tag": t1}),
    );
    let t2 =
        f.d.ok("snapshot_create", json!({"name": "s", "memo": "child"}))["tag"]
            .as_u64()
            .unwrap();
    assert_ne!(t1, t2);
    let l = f.d.ok("snapshot_list", json!({}));
    let snaps = l["origins"][0]["snapshots"].as_array().unwrap();
    let by_tag = |t: u64| snaps.iter().find(|s| s["tag"] == t).unwrap();
    assert_eq!(by_tag(t1)["parent"], Value::Null);
    assert_eq!(by_tag(t1)["memo"], "base");
    assert_eq!(by_tag(t1)["exported_as"], json!(["s"]));
    assert_eq!(by_tag(t2)["parent"], t1);
    assert_eq!(by_tag(t2)["memo"], "child");
    f.d.err("snapshot_create", json!({"name": "nope"}), codes::NOT_FOUND);
    f.d.err(
        "snapshot_create",
        json!({"name": "a/b"}),
        codes::INVALID_PARAMS,
    );
    f.d.err(
        "snapshot_create",
        json!({"name": "vol", "memo": 5}),
        codes::INVALID_PARAMS,
    );
}

/// `snapshot_create` with `tag` (dm-snap-mv `dms s NAME TAG`): a snapshot of a snapshot that
/// is not exported, through the origin's export; its data is the parent's, not the origin's.
/// `"sync": true` (CLI `--sync`) on create and delete: the same snapshots, answered once
/// durable; a bad `sync` value is refused.
#[test]
fn snapshot_create_and_delete_with_sync() {
    let f = fixture("sync");
    f.create_vol();
    let mut c = Client::connect(&f.d.export_socket("vol")).unwrap();
    write_byte(&mut c, 0, 4096, 7);
    let t =
        f.d.ok("snapshot_create", json!({"name": "vol", "sync": true}))["tag"]
            .as_u64()
            .unwrap();
    write_byte(&mut c, 0, 4096, 8);
    drop(c);
    let out =
        f.d.cli(&["--json", "snapshot", "vol", "--sync", "-m", "durable"]);
    let t2 = serde_json::from_str::<Value>(&out).unwrap()["tag"]
        .as_u64()
        .unwrap();
    f.d.ok(
        "snapshot_export",
        json!({"name": "s", "origin_id": "o.img", "cow": f.cow, "tag": t}),
    );
    let mut s = Client::connect(&f.d.export_socket("s")).unwrap();
    assert!(read_bytes(&mut s, 0, 4096).iter().all(|&b| b == 7));
    drop(s);
    f.d.ok("export_remove", json!({"name": "s"}));
    f.d.ok(
        "snapshot_delete",
        json!({"name": "vol", "tag": t, "sync": true}),
    );
    f.d.cli(&["delete", "vol", &t2.to_string(), "--sync"]);
    let l = f.d.ok("snapshot_list", json!({}));
    assert!(
        l["origins"][0]["snapshots"].as_array().unwrap().is_empty(),
        "{l}"
    );
    f.d.err(
        "snapshot_create",
        json!({"name": "vol", "sync": "yes"}),
        codes::INVALID_PARAMS,
    );
}

#[test]
fn snapshot_create_of_an_unexported_tag() {
    let f = fixture("sct");
    f.create_vol();
    let mut c = Client::connect(&f.d.export_socket("vol")).unwrap();
    write_byte(&mut c, 0, 4096, 1);
    let t1 = f.d.ok("snapshot_create", json!({"name": "vol"}))["tag"]
        .as_u64()
        .unwrap();
    write_byte(&mut c, 0, 4096, 2);
    drop(c);
    // Through the CLI, as `dms s vol T1`.
    let out =
        f.d.cli(&["--json", "snapshot", "vol", &t1.to_string(), "-m", "child"]);
    let t2 = serde_json::from_str::<Value>(&out).unwrap()["tag"]
        .as_u64()
        .unwrap();
    assert_ne!(t1, t2);
    let l = f.d.ok("snapshot_list", json!({}));
    let snaps = l["origins"][0]["snapshots"].as_array().unwrap();
    let t2s = snaps.iter().find(|s| s["tag"] == t2).unwrap();
    assert_eq!(t2s["parent"], t1, "{l}");
    assert_eq!(t2s["memo"], "child");
    // It holds snapshot t1's data (1), not the origin's (2).
    f.d.ok(
        "snapshot_export",
        json!({"name": "s2", "origin_id": "o.img", "cow": f.cow, "tag": t2}),
    );
    let mut s2 = Client::connect(&f.d.export_socket("s2")).unwrap();
    assert!(read_bytes(&mut s2, 0, 4096).iter().all(|&b| b == 1));
    drop(s2);
    // Errors name the object and the cause.
    let e = f.d.err(
        "snapshot_create",
        json!({"name": "vol", "tag": 99}),
        codes::NOT_FOUND,
    );
    assert!(e.contains("99"), "{e}");
    let e = f.d.err(
        "snapshot_create",
        json!({"name": "vol", "tag": 0}),
        codes::INVALID_PARAMS,
    );
    assert!(e.contains("tag 0"), "{e}");
    let e = f.d.err(
        "snapshot_create",
        json!({"name": "s2", "tag": t1}),
        codes::INVALID_PARAMS,
    );
    assert!(e.contains("export s2 serves snapshot"), "{e}");
    let e = f.d.cli_fail(&["snapshot", "vol", "0"]);
    assert!(e.contains("0"), "{e}");
}

#[test]
fn snapshot_create_is_point_in_time() {
    let f = fixture("pit");
    f.create_vol();
    let mut c = Client::connect(&f.d.export_socket("vol")).unwrap();
    write_byte(&mut c, 0, 4096, 1);
    let t = f.d.ok("snapshot_create", json!({"name": "vol"}))["tag"]
        .as_u64()
        .unwrap();
    write_byte(&mut c, 0, 4096, 2);
    f.d.ok(
        "snapshot_export",
        json!({"name": "s", "origin_id": "o.img", "cow": f.cow, "tag": t}),
    );
    let mut s = Client::connect(&f.d.export_socket("s")).unwrap();
    assert_eq!(read_bytes(&mut s, 0, 4096), vec![1; 4096]);
    assert_eq!(read_bytes(&mut c, 0, 4096), vec![2; 4096]);
    let e = f.d.ok("export_list", Value::Null);
    let vol = e["exports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["name"] == "vol")
        .unwrap()
        .clone();
    assert_eq!(vol["connected"], true);
}

#[test]
fn snapshot_delete_success_and_errors() {
    let f = fixture("sd");
    f.create_vol();
    let t1 = f.d.ok("snapshot_create", json!({"name": "vol"}))["tag"]
        .as_u64()
        .unwrap();
    let t2 = f.d.ok("snapshot_create", json!({"name": "vol"}))["tag"]
        .as_u64()
        .unwrap();
    f.d.ok(
        "snapshot_export",
        json!({"name": "s2", "origin_id": "o.img", "cow": f.cow, "tag": t2}),
    );
    let m = f.d.err(
        "snapshot_delete",
        json!({"name": "vol", "tag": t2}),
        codes::BUSY,
    );
    assert!(m.contains("s2"), "{m}");
    let m = f.d.err(
        "snapshot_delete",
        json!({"name": "s2", "tag": t1}),
        codes::INVALID_STATE,
    );
    assert!(m.contains("origin"), "{m}");
    f.d.ok("snapshot_delete", json!({"name": "vol", "tag": t1}));
    let m = f.d.err(
        "snapshot_delete",
        json!({"name": "vol", "tag": t1}),
        codes::NOT_FOUND,
    );
    assert!(m.contains(&t1.to_string()), "{m}");
    f.d.err(
        "snapshot_delete",
        json!({"name": "nope", "tag": 1}),
        codes::NOT_FOUND,
    );
    f.d.err(
        "snapshot_delete",
        json!({"name": "vol", "tag": -1}),
        codes::INVALID_PARAMS,
    );
    f.d.err(
        "snapshot_delete",
        json!({"name": "vol"}),
        codes::INVALID_PARAMS,
    );
    let l = f.d.ok("snapshot_list", json!({"name": "vol"}));
    let tags: Vec<u64> = l["origins"][0]["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["tag"].as_u64().unwrap())
        .collect();
    assert_eq!(tags, [t2]);
}

#[test]
fn origin_delete_success_and_errors() {
    let f = fixture("od");
    f.create_vol();
    let t = f.d.ok("snapshot_create", json!({"name": "vol"}))["tag"]
        .as_u64()
        .unwrap();
    f.d.ok(
        "snapshot_export",
        json!({"name": "s", "origin_id": "o.img", "cow": f.cow, "tag": t}),
    );
    let m = f.d.err(
        "origin_delete",
        json!({"name": "vol"}),
        codes::HAS_SNAPSHOTS,
    );
    assert!(m.contains("o.img"), "{m}");
    f.d.err("origin_delete", json!({"name": "s"}), codes::INVALID_STATE);
    f.d.err("origin_delete", json!({"name": "nope"}), codes::NOT_FOUND);
    f.d.ok("export_remove", json!({"name": "s"}));
    f.d.ok("snapshot_delete", json!({"name": "vol", "tag": t}));
    assert_eq!(
        f.d.ok("origin_delete", json!({"name": "vol"})),
        json!({"name": "vol"})
    );
    assert!(!f.d.export_socket("vol").exists());
    // Unbound: opening it without bind fails, binding it again works.
    f.d.err(
        "origin_create",
        json!({"name": "vol", "origin": f.origin, "cow": f.cow}),
        codes::NOT_FOUND,
    );
    f.d.ok(
        "origin_create",
        json!({"name": "vol", "origin": f.origin, "cow": f.cow, "bind": true}),
    );
}

#[test]
fn snapshot_rollback_success_and_errors() {
    let f = fixture("rb");
    f.create_vol();
    let mut c = Client::connect(&f.d.export_socket("vol")).unwrap();
    write_byte(&mut c, 0, 4096, 7);
    write_byte(&mut c, 3 * MIB, 4096, 7);
    let t = f.d.ok("snapshot_create", json!({"name": "vol"}))["tag"]
        .as_u64()
        .unwrap();
    write_byte(&mut c, 0, 4096, 9);
    write_byte(&mut c, 3 * MIB, 4096, 9);
    f.d.ok(
        "snapshot_export",
        json!({"name": "s", "origin_id": "o.img", "cow": f.cow, "tag": t}),
    );
    f.d.err(
        "snapshot_rollback",
        json!({"name": "s", "tag": t}),
        codes::INVALID_STATE,
    );
    f.d.err(
        "snapshot_rollback",
        json!({"name": "vol", "tag": 4242}),
        codes::NOT_FOUND,
    );
    f.d.err(
        "snapshot_rollback",
        json!({"name": "nope", "tag": t}),
        codes::NOT_FOUND,
    );
    f.d.err(
        "snapshot_rollback",
        json!({"name": "vol", "tag": t, "wait": 1}),
        codes::INVALID_PARAMS,
    );
    let r = f.d.ok(
        "snapshot_rollback",
        json!({"name": "vol", "tag": t, "wait": true}),
    );
    assert_eq!(r, json!({"tag": t, "done": true}));
    // The live client sees the rolled-back data.
    assert_eq!(read_bytes(&mut c, 0, 4096), vec![7; 4096]);
    assert_eq!(read_bytes(&mut c, 3 * MIB, 4096), vec![7; 4096]);
    let st = f.d.ok("status", json!({"name": "vol"}));
    assert_eq!(st["stores"][0]["origins"][0].get("rollback"), None);
    // A rollback without wait answers at once; a second one while it runs is refused (if the
    // first is still running when it arrives) or succeeds (if it already finished).
    let r =
        f.d.ok("snapshot_rollback", json!({"name": "vol", "tag": t}));
    assert_eq!(r["tag"], t);
    match f
        .d
        .call("snapshot_rollback", json!({"name": "vol", "tag": t}))
    {
        Ok(_) => {}
        Err(e) => assert_eq!(e.code(), Some(codes::BUSY), "{e}"),
    }
}

#[test]
fn snapshot_list_export_list_and_status() {
    let f = fixture("ls");
    f.create_vol();
    let o2 = f.extra_file("o2.img", 2 * MIB);
    f.d.ok(
        "origin_create",
        json!({"name": "vol2", "origin": o2, "cow": f.cow, "bind": true, "readonly": true}),
    );
    let t =
        f.d.ok("snapshot_create", json!({"name": "vol", "memo": "m"}))["tag"]
            .as_u64()
            .unwrap();
    let all = f.d.ok("snapshot_list", Value::Null);
    assert_eq!(all["origins"].as_array().unwrap().len(), 2);
    let one = f.d.ok("snapshot_list", json!({"name": "vol"}));
    let o = &one["origins"][0];
    assert_eq!(o["origin_id"], "o.img");
    assert_eq!(o["origin"], f.origin);
    assert_eq!(o["cow"], f.cow);
    assert_eq!(o["exported_as"], json!(["vol"]));
    let s = &o["snapshots"][0];
    assert_eq!(s["tag"], t);
    assert_eq!(s["memo"], "m");
    assert!(s["birth_unix_secs"].as_u64().unwrap() > 1_600_000_000);
    assert!(s["exclusive_chunks"].is_u64());
    f.d.err("snapshot_list", json!({"name": "nope"}), codes::NOT_FOUND);
    f.d.err("snapshot_list", json!({"name": 3}), codes::INVALID_PARAMS);

    let e = f.d.ok("export_list", Value::Null);
    let v2 = e["exports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["name"] == "vol2")
        .unwrap()
        .clone();
    assert_eq!(v2["readonly"], true);
    assert_eq!(v2["size"], 2 * MIB);
    assert_eq!(v2["connected"], false);
    assert!(v2["volume"].as_str().unwrap().contains("origin"));
    f.d.err("export_list", json!({"x": 1}), codes::INVALID_PARAMS);

    let st = f.d.ok("status", Value::Null);
    let store = &st["stores"][0];
    assert_eq!(store["cow"], f.cow);
    assert_eq!(store["chunk_size"], 4096);
    let total = store["chunks_total"].as_u64().unwrap();
    assert!(total > 0);
    assert_eq!(
        store["chunks_used"].as_u64().unwrap() + store["chunks_free"].as_u64().unwrap(),
        total
    );
    assert_eq!(store["origins"].as_array().unwrap().len(), 2);
    let st1 = f.d.ok("status", json!({"name": "vol"}));
    let origins = st1["stores"][0]["origins"].as_array().unwrap();
    assert_eq!(origins.len(), 1);
    assert_eq!(origins[0]["snapshots"], 1);
    assert_eq!(origins[0]["size"], 4 * MIB);
    assert_eq!(origins[0]["exported_as"], json!(["vol"]));
    f.d.err("status", json!({"name": "nope"}), codes::NOT_FOUND);
}

#[test]
fn protocol_errors() {
    let f = fixture("proto");
    let mut c = f.d.client();
    let e = c.call_raw("no_such_method", Value::Null).unwrap_err();
    assert_eq!(e.code(), Some(codes::METHOD_NOT_FOUND));
    assert!(e.to_string().contains("no_such_method"));
    c.send_raw(b"this is not json\n").unwrap();
    let v = c.read_raw().unwrap();
    assert_eq!(v["error"]["code"], codes::PARSE_ERROR);
    assert_eq!(v["id"], Value::Null);
    c.send_raw(b"{\"jsonrpc\":\"2.0\",\"id\":4}\n").unwrap();
    let v = c.read_raw().unwrap();
    assert_eq!(v["error"]["code"], codes::INVALID_REQUEST);
    assert_eq!(v["id"], 4);
    c.send_raw(b"{\"jsonrpc\":\"2.0\",\"method\":\"status\",\"params\":[1],\"id\":5}\n")
        .unwrap();
    assert_eq!(
        c.read_raw().unwrap()["error"]["code"],
        codes::INVALID_PARAMS
    );
    // A notification gets no answer.
    c.send_raw(b"{\"jsonrpc\":\"2.0\",\"method\":\"status\"}\n")
        .unwrap();
    assert!(c.call_raw("export_list", Value::Null).is_ok());
    // The connection still works after all that.
    assert!(c.call_raw("status", Value::Null).is_ok());
}

#[test]
fn hostile_clients_do_not_disturb_others() {
    let f = fixture("hostile");
    f.create_vol();
    // A client that connects and stalls mid-line.
    let mut staller = UnixStream::connect(&f.d.rpc_socket).unwrap();
    staller.write_all(b"{\"jsonrpc\":\"2.0\",").unwrap();
    // A client sending a line over the limit is answered and disconnected.
    let mut big = UnixStream::connect(&f.d.rpc_socket).unwrap();
    big.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let chunk = vec![b'a'; 256 << 10];
    for _ in 0..6 {
        if big.write_all(&chunk).is_err() {
            break;
        }
    }
    let mut answer = String::new();
    let _ = big.read_to_string(&mut answer);
    let v: Value = serde_json::from_str(answer.lines().next().unwrap_or("")).unwrap();
    assert_eq!(v["error"]["code"], codes::INVALID_REQUEST);
    assert!(v["error"]["message"].as_str().unwrap().contains("limit"));
    // Others are served meanwhile.
    let t = f.d.ok("snapshot_create", json!({"name": "vol"}))["tag"]
        .as_u64()
        .unwrap();
    assert!(t > 0);
    drop(staller);
}

#[test]
fn socket_is_private_and_owned_by_one_daemon() {
    let f = fixture("sock");
    let mode = std::fs::metadata(&f.d.rpc_socket)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    // A second daemon on the same socket (other state dir) refuses to start, and the first
    // still answers.
    let other_state = f.d.dir.join("state2");
    let out = std::process::Command::new(&f.d.bin)
        .arg("--rpc-socket")
        .arg(&f.d.rpc_socket)
        .arg("serve")
        .arg("--state-dir")
        .arg(&other_state)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("in use"), "{err}");
    // A second daemon on the same state dir (other socket) refuses too.
    let out = std::process::Command::new(&f.d.bin)
        .arg("--rpc-socket")
        .arg(f.d.dir.join("rpc2.sock"))
        .arg("serve")
        .arg("--state-dir")
        .arg(&f.d.state_dir)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("in use"), "{err}");
    assert!(f.d.call("status", Value::Null).is_ok());
}

#[test]
fn long_memo_is_refused() {
    let f = fixture("memo");
    f.create_vol();
    let m = f.d.err(
        "snapshot_create",
        json!({"name": "vol", "memo": "m".repeat(100_000)}),
        codes::INVALID_PARAMS,
    );
    assert!(m.contains("vol"), "{m}");
}

/// Several clients race conflicting operations on one origin (delete during rollback, two
/// rollbacks, snapshots during deletes...) while a guest-like client writes to it. Every answer
/// is a success or a documented conflict code; the daemon stays consistent and answers, and
/// the snapshot set afterwards is exactly what the successful calls made it, also after a
/// restart.
#[test]
fn concurrent_conflicting_operations() {
    use std::collections::BTreeSet;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};

    // Each rollback keeps a hidden image of the origin: leave room for all of them.
    let mut f = fixture_sized("conc", 1 << 30);
    f.create_vol();
    // Tag 1 stays exported, so it can never be deleted and the origin never unbound.
    let t1 = f.d.ok("snapshot_create", json!({"name": "vol"}))["tag"]
        .as_u64()
        .unwrap();
    f.d.ok(
        "snapshot_export",
        json!({"name": "keep", "origin_id": "o.img", "cow": f.cow, "tag": t1}),
    );
    let live: Arc<Mutex<BTreeSet<u64>>> = Arc::new(Mutex::new([t1].into()));
    let stop = Arc::new(AtomicBool::new(false));

    let writer = {
        let sock = f.d.export_socket("vol");
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut c = Client::connect(&sock).unwrap();
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let off = (n % 1024) * 4096;
                c.mem()[..4096].fill(n as u8);
                let p = c.ptr(0);
                let ret = run1(&mut c.queues[0], |q| q.write(off, p, 4096, 0, NO_FLAGS)).unwrap();
                if ret != 0 {
                    return Err(format!("write {n} at {off} failed: {ret}"));
                }
                n += 1;
            }
            Ok(n)
        })
    };

    let workers: Vec<_> = (0..4u64)
        .map(|seed| {
            let sock = f.d.rpc_socket.clone();
            let live = live.clone();
            std::thread::spawn(move || {
                let mut rng = fastrand::Rng::with_seed(seed);
                let mut c = snapmv_rpc::RpcClient::connect(&sock).unwrap();
                for _ in 0..25 {
                    let pick = |rng: &mut fastrand::Rng| {
                        let l = live.lock().unwrap();
                        let v: Vec<u64> = l.iter().copied().collect();
                        v[rng.usize(..v.len())]
                    };
                    let (method, params) = match rng.u8(..6) {
                        0 | 1 => ("snapshot_create", json!({"name": "vol"})),
                        2 => (
                            "snapshot_delete",
                            json!({"name": "vol", "tag": pick(&mut rng)}),
                        ),
                        3 => (
                            "snapshot_rollback",
                            json!({"name": "vol", "tag": pick(&mut rng)}),
                        ),
                        4 => ("origin_delete", json!({"name": "vol"})),
                        _ => ("status", json!({"name": "vol"})),
                    };
                    match c.call_raw(method, params.clone()) {
                        Ok(v) => match method {
                            "snapshot_create" => {
                                live.lock().unwrap().insert(v["tag"].as_u64().unwrap());
                            }
                            "snapshot_delete" => {
                                let tag = params["tag"].as_u64().unwrap();
                                assert!(live.lock().unwrap().remove(&tag), "deleted {tag} twice");
                            }
                            "origin_delete" => panic!("origin_delete succeeded with snapshots"),
                            _ => {}
                        },
                        Err(e) => {
                            let code = e.code().unwrap_or_else(|| panic!("{method}: {e}"));
                            assert!(
                                [codes::NOT_FOUND, codes::BUSY, codes::HAS_SNAPSHOTS]
                                    .contains(&code),
                                "{method} {params}: unexpected error {e}"
                            );
                            if method == "snapshot_delete" && code == codes::BUSY {
                                assert_eq!(params["tag"], t1, "{e}");
                            }
                        }
                    }
                }
            })
        })
        .collect();
    for w in workers {
        w.join().expect("a worker thread failed");
    }
    stop.store(true, Ordering::SeqCst);
    let writes = writer
        .join()
        .expect("the writer panicked")
        .unwrap_or_else(|e| panic!("{e}; daemon log:\n{}", f.d.log()));
    assert!(writes > 0);

    let tags = |d: &Daemon| -> BTreeSet<u64> {
        d.ok("snapshot_list", json!({"name": "vol"}))["origins"][0]["snapshots"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["tag"].as_u64().unwrap())
            .collect()
    };
    let want = live.lock().unwrap().clone();
    assert_eq!(tags(&f.d), want);
    f.d.restart();
    assert_eq!(tags(&f.d), want);
}

/// SO_PEERCRED: with the socket's mode opened up by hand, a client of another uid is still
/// refused unless `--allow-uid` names it. Needs root (to run a client as another uid).
#[test]
fn peer_uid_is_checked() {
    use std::os::unix::fs::PermissionsExt;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || !Path::new("/usr/bin/setpriv").exists() {
        eprintln!("SKIPPED peer_uid_is_checked: needs root and /usr/bin/setpriv");
        return;
    }
    let nobody = 65534;
    let run_as_nobody = |d: &Daemon, bin: &Path| {
        std::process::Command::new("/usr/bin/setpriv")
            .args([
                "--reuid",
                &nobody.to_string(),
                "--regid",
                &nobody.to_string(),
                "--clear-groups",
            ])
            .arg(bin)
            .arg("--rpc-socket")
            .arg(&d.rpc_socket)
            .arg("exports")
            .output()
            .unwrap()
    };
    for allow in [false, true] {
        let dir = scratch("peer");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let bin = dir.path().join("snapmv");
        std::fs::copy(snapmv_tests::daemon::snapmv_bin(), &bin).unwrap();
        let extra: &[&str] = if allow {
            &["--allow-uid", "65534"]
        } else {
            &[]
        };
        let d = Daemon::start_with(dir.path(), extra);
        // The socket itself is private: another uid cannot even connect.
        let out = run_as_nobody(&d, &bin);
        assert!(!out.status.success());
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("Permission denied"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // Opened up by hand, the uid check still applies.
        std::fs::set_permissions(&d.rpc_socket, std::fs::Permissions::from_mode(0o666)).unwrap();
        let out = run_as_nobody(&d, &bin);
        let stderr = String::from_utf8_lossy(&out.stderr);
        if allow {
            assert!(out.status.success(), "{stderr}");
            assert_eq!(String::from_utf8_lossy(&out.stdout), "no exports\n");
        } else {
            assert!(!out.status.success());
            assert!(
                stderr.contains("uid 65534 is not allowed") && stderr.contains("-32011"),
                "{stderr}"
            );
        }
    }
}

/// `origin_delete` while a rollback runs is refused as busy; once it has finished the origin
/// is unbound. (Which of the two the first attempt meets depends on the machine's speed; both
/// outcomes are checked.)
#[test]
fn origin_delete_during_rollback() {
    let f = fixture_sized("odr", 256 * MIB);
    let big = f.extra_file("big.img", 16 * MIB);
    f.d.ok(
        "origin_create",
        json!({"name": "big", "origin": big, "cow": f.cow, "bind": true, "format": true}),
    );
    // Real data everywhere, so the copy-back has work to do.
    let opts = snapmv_tests::blkio_client::ClientOptions {
        region_len: 4 << 20,
        ..Default::default()
    };
    let mut c = Client::connect_with(&f.d.export_socket("big"), &opts).unwrap();
    let fill = |c: &mut Client, byte: u8| {
        for off in (0..16 * MIB).step_by(4 << 20) {
            write_byte(c, off, 4 << 20, byte);
        }
    };
    fill(&mut c, 0x11);
    let t = f.d.ok("snapshot_create", json!({"name": "big"}))["tag"]
        .as_u64()
        .unwrap();
    fill(&mut c, 0x22);
    drop(c);
    f.d.ok("snapshot_rollback", json!({"name": "big", "tag": t}));
    // The rollback's source may be deleted while it runs.
    f.d.ok("snapshot_delete", json!({"name": "big", "tag": t}));
    match f.d.call("origin_delete", json!({"name": "big"})) {
        Ok(_) => eprintln!("rollback had finished before origin_delete"),
        Err(e) => {
            assert_eq!(e.code(), Some(codes::BUSY), "{e}");
            assert!(e.to_string().contains("rolled back"), "{e}");
            let deadline = std::time::Instant::now() + Duration::from_secs(600);
            loop {
                match f.d.call("origin_delete", json!({"name": "big"})) {
                    Ok(_) => break,
                    Err(e) => assert_eq!(e.code(), Some(codes::BUSY), "{e}"),
                }
                assert!(std::time::Instant::now() < deadline, "rollback never ends");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
    assert_eq!(f.d.ok("export_list", Value::Null)["exports"], json!([]));
}

/// More than 64 simultaneous clients: the extra one is told the daemon is busy; once a client
/// leaves, new ones are served again.
#[test]
fn too_many_clients_are_refused_then_served() {
    let f = fixture("many");
    let mut idle: Vec<UnixStream> = (0..64)
        .map(|_| UnixStream::connect(&f.d.rpc_socket).unwrap())
        .collect();
    // Every idle connection has been accepted (and counted) once this call is answered...
    // unless it is itself the 65th: then it is refused.
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let mut refused = None;
    while refused.is_none() {
        match f.d.client().call_raw("export_list", Value::Null) {
            Err(e) => {
                assert_eq!(e.code(), Some(codes::BUSY), "{e}");
                refused = Some(e.to_string());
            }
            Ok(_) => {
                // The accept loop had not reached all idle connections yet; it has now.
                assert!(std::time::Instant::now() < deadline, "never refused");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
    assert!(refused.unwrap().contains("64 clients"));
    idle.truncate(10);
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while f.d.client().call_raw("export_list", Value::Null).is_err() {
        assert!(std::time::Instant::now() < deadline, "never served again");
        std::thread::sleep(Duration::from_millis(50));
    }
}
