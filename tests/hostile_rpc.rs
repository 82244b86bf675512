//! Hostile RPC clients (issue 7, items 4 and 8), for what tests/rpc_methods.rs does not
//! already cover (it has malformed JSON, unknown methods, wrong types, a line over the limit,
//! a client stalled mid-line, 64+ clients, concurrent conflicting operations, the RPC socket's
//! mode under the test's umask, SO_PEERCRED): names that try to leave the socket directory in
//! every method, paths that point at another export's files (directly, through a symlink or a
//! hard link), a client that pipelines requests and never reads its answers, JSON nested
//! beyond the parser's depth and invalid UTF-8, and the modes of every socket and state file
//! when the daemon starts under umask 0.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use snapmv_rpc::codes;
use snapmv_tests::blkio_client::{run1, Client, NO_FLAGS};
use snapmv_tests::daemon::{scratch, sparse_file, Daemon};

const MIB: u64 = 1 << 20;

struct Fx {
    d: Daemon,
    dir: tempfile::TempDir,
    origin: PathBuf,
    cow: PathBuf,
}

fn fixture(name: &str) -> Fx {
    let dir = scratch(name);
    let origin = dir.path().join("o.img");
    let cow = dir.path().join("c.img");
    sparse_file(&origin, 4 * MIB);
    sparse_file(&cow, 16 * MIB);
    let d = Daemon::start(dir.path());
    d.ok(
        "origin_create",
        json!({"name": "vol", "origin": origin, "cow": cow, "bind": true, "format": true}),
    );
    Fx {
        d,
        dir,
        origin,
        cow,
    }
}

/// Every file under `dir`, recursively (sockets included).
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if e.file_type().unwrap().is_dir() {
                stack.push(p.clone());
            }
            out.push(p);
        }
    }
    out.sort();
    out
}

#[test]
fn names_that_leave_the_socket_dir_are_refused_everywhere() {
    let f = fixture("hostile-names");
    let t = f.d.ok("snapshot_create", json!({"name": "vol"}))["tag"]
        .as_u64()
        .unwrap();
    let parent = f.dir.path().parent().unwrap().to_path_buf();
    let before_parent = files_under(&parent)
        .into_iter()
        .filter(|p| !p.starts_with(f.dir.path()))
        .count();
    let before = files_under(f.dir.path());
    let bad_names = [
        "../escape",
        "a/b",
        "..",
        ".",
        "/tmp/abs",
        "x\u{0}y",
        "x\ny",
        "é",
        "",
    ];
    for bad in bad_names {
        let calls = [
            (
                "origin_create",
                json!({"name": bad, "origin": f.origin, "cow": f.cow}),
            ),
            (
                "origin_create",
                json!({"name": "n", "origin": f.origin, "cow": f.cow, "origin_id": bad}),
            ),
            (
                "snapshot_export",
                json!({"name": bad, "origin_id": "o.img", "cow": f.cow, "tag": t}),
            ),
            (
                "snapshot_export",
                json!({"name": "n", "origin_id": bad, "cow": f.cow, "tag": t}),
            ),
            ("export_remove", json!({"name": bad})),
            ("snapshot_create", json!({"name": bad})),
            ("snapshot_delete", json!({"name": bad, "tag": t})),
            ("snapshot_rollback", json!({"name": bad, "tag": t})),
            ("origin_delete", json!({"name": bad})),
            ("snapshot_list", json!({"name": bad})),
            ("status", json!({"name": bad})),
        ];
        for (method, params) in calls {
            let m = f.d.err(method, params.clone(), codes::INVALID_PARAMS);
            assert!(
                m.contains("name") || m.contains("origin id"),
                "{method} {params}: message does not say what is wrong: {m}"
            );
        }
    }
    // Nothing was created, here or next to the scratch directory.
    assert_eq!(files_under(f.dir.path()), before);
    let after_parent = files_under(&parent)
        .into_iter()
        .filter(|p| !p.starts_with(f.dir.path()))
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().contains("escape"))
        })
        .count();
    assert_eq!(after_parent, 0, "a file named after ../escape appeared");
    let _ = before_parent;
    assert!(f.d.call("status", Value::Null).is_ok());
}

fn digest(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap()
}

/// The files' digests once the daemon has stopped writing them. A snapshot answers once its
/// record is durable, but the worker goes on after it (the overlays the cut kept are written
/// back to the origin, a commit round checkpoints): a test that asserts "a refused request
/// wrote nothing" must take its baseline after that background work, or it blames the refusal
/// for the worker's writes.
fn settled_digests<const N: usize>(paths: [&Path; N]) -> [Vec<u8>; N] {
    let mut before = paths.map(digest);
    // Longer than the worker's idle wake-up (1 s), so one quiet interval means idle.
    for _ in 0..20 {
        std::thread::sleep(std::time::Duration::from_millis(1500));
        let now = paths.map(digest);
        if now == before {
            return now;
        }
        before = now;
    }
    panic!("the daemon kept writing {paths:?} for 30 s after its last request");
}

#[test]
fn paths_to_another_exports_files_are_refused() {
    let f = fixture("hostile-paths");
    {
        let mut c = Client::connect(&f.d.export_socket("vol")).unwrap();
        c.mem()[..4096].fill(0x5a);
        let p = c.ptr(0);
        assert_eq!(
            run1(&mut c.queues[0], |q| q.write(0, p, 4096, 0, NO_FLAGS)).unwrap(),
            0
        );
        let ret = run1(&mut c.queues[0], |q| q.flush(0, NO_FLAGS)).unwrap();
        assert_eq!(ret, 0);
    }
    f.d.ok("snapshot_create", json!({"name": "vol", "sync": true}));
    let [o_before, c_before] = settled_digests([&f.origin, &f.cow]);
    let other_o = f.dir.path().join("o2.img");
    let other_c = f.dir.path().join("c2.img");
    sparse_file(&other_o, 4 * MIB);
    sparse_file(&other_c, 16 * MIB);
    let sym_c = f.dir.path().join("sym-to-store");
    std::os::unix::fs::symlink(&f.cow, &sym_c).unwrap();
    let hard_c = f.dir.path().join("hard-to-store");
    std::fs::hard_link(&f.cow, &hard_c).unwrap();
    let sym_o = f.dir.path().join("sym-to-origin");
    std::os::unix::fs::symlink(&f.origin, &sym_o).unwrap();
    let state_file = f.d.state_dir.join("state.json");
    let lock_file = PathBuf::from(format!("{}.lock", f.d.rpc_socket.display()));

    // (params, code) — every one would make the daemon write over vol's files.
    let cases = [
        // vol's store as an origin (directly, by symlink, by hard link).
        (
            json!({"name": "x", "origin": f.cow, "cow": other_c, "bind": true, "format": true}),
            codes::ALREADY_EXISTS,
        ),
        (
            json!({"name": "x", "origin": sym_c, "cow": other_c, "bind": true, "format": true}),
            codes::ALREADY_EXISTS,
        ),
        (
            json!({"name": "x", "origin": hard_c, "cow": other_c, "bind": true, "format": true}),
            codes::ALREADY_EXISTS,
        ),
        // vol's origin as a store to format (directly, by symlink).
        (
            json!({"name": "x", "origin": other_o, "cow": f.origin, "bind": true, "format": true, "force_format": true}),
            codes::ALREADY_EXISTS,
        ),
        (
            json!({"name": "x", "origin": other_o, "cow": sym_o, "bind": true, "format": true, "force_format": true}),
            codes::ALREADY_EXISTS,
        ),
        // vol's origin bound to another store.
        (
            json!({"name": "x", "origin": sym_o, "cow": other_c, "bind": true, "format": true}),
            codes::ALREADY_EXISTS,
        ),
        // The daemon's own files.
        (
            json!({"name": "x", "origin": state_file, "cow": other_c, "bind": true, "format": true}),
            codes::INVALID_PARAMS,
        ),
        (
            json!({"name": "x", "origin": other_o, "cow": lock_file, "bind": true, "format": true}),
            codes::INVALID_PARAMS,
        ),
        (
            json!({"name": "x", "origin": other_o, "cow": f.d.rpc_socket, "bind": true, "format": true}),
            codes::INVALID_PARAMS,
        ),
        // The same file as both.
        (
            json!({"name": "x", "origin": other_o, "cow": other_o, "bind": true, "format": true}),
            codes::INVALID_PARAMS,
        ),
    ];
    for (params, code) in cases {
        match f.d.call("origin_create", params.clone()) {
            Ok(v) => panic!("origin_create {params} succeeded: {v}"),
            Err(snapmv_rpc::RpcError::Remote(e)) => {
                // The exact code differs by case; any refusal that names a file is fine, but
                // it must be one of the documented refusals.
                assert!(
                    [
                        code,
                        codes::ALREADY_EXISTS,
                        codes::INVALID_PARAMS,
                        codes::BUSY
                    ]
                    .contains(&e.code),
                    "origin_create {params}: code {} ({})",
                    e.code,
                    e.message
                );
                assert!(
                    e.message.contains('/'),
                    "origin_create {params}: message names no file: {}",
                    e.message
                );
            }
            Err(e) => panic!("origin_create {params}: {e}"),
        }
    }
    assert_eq!(digest(&f.origin), o_before, "vol's origin was modified");
    assert_eq!(digest(&f.cow), c_before, "vol's store was modified");
    // vol is still served and intact.
    let mut c = Client::connect(&f.d.export_socket("vol")).unwrap();
    let p = c.ptr(0);
    assert_eq!(
        run1(&mut c.queues[0], |q| q.read(0, p, 4096, 0, NO_FLAGS)).unwrap(),
        0
    );
    assert!(c.mem()[..4096].iter().all(|&b| b == 0x5a));
    let exports = f.d.ok("export_list", Value::Null);
    assert_eq!(exports["exports"].as_array().unwrap().len(), 1, "{exports}");
}

/// A client that sends request after request and never reads an answer: once the socket's
/// buffers are full the daemon's thread for it blocks, and only that thread.
#[test]
fn client_that_never_reads_its_answers() {
    let f = fixture("hostile-noread");
    let mut hog = UnixStream::connect(&f.d.rpc_socket).unwrap();
    hog.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
    let line = b"{\"jsonrpc\":\"2.0\",\"method\":\"snapshot_list\",\"id\":1}\n";
    let mut sent = 0u64;
    // Until the write blocks (the daemon stopped reading because it cannot answer).
    while sent < 200_000 && hog.write_all(line).is_ok() {
        sent += 1;
    }
    eprintln!("the non-reading client sent {sent} requests before blocking");
    // Others are served, management and I/O both (hang guard only).
    let t0 = Instant::now();
    for _ in 0..5 {
        f.d.ok("snapshot_create", json!({"name": "vol"}));
    }
    let mut c = Client::connect(&f.d.export_socket("vol")).unwrap();
    let p = c.ptr(0);
    assert_eq!(
        run1(&mut c.queues[0], |q| q.write(0, p, 4096, 0, NO_FLAGS)).unwrap(),
        0
    );
    assert!(t0.elapsed() < Duration::from_secs(60), "hang guard");
    // The hog can still read its answers, in order.
    hog.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut r = std::io::BufReader::new(&hog);
    let mut first = String::new();
    std::io::BufRead::read_line(&mut r, &mut first).unwrap();
    let v: Value = serde_json::from_str(&first).unwrap();
    assert!(v["result"]["origins"].is_array(), "{v}");
}

#[test]
fn deep_nesting_and_invalid_utf8() {
    let f = fixture("hostile-json");
    let mut s = UnixStream::connect(&f.d.rpc_socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut r = std::io::BufReader::new(s.try_clone().unwrap());
    let mut ask = |bytes: &[u8]| -> Value {
        s.write_all(bytes).unwrap();
        let mut l = String::new();
        std::io::BufRead::read_line(&mut r, &mut l).unwrap();
        serde_json::from_str(&l).unwrap_or_else(|e| panic!("answer {l:?}: {e}"))
    };
    // 500k levels of arrays, under the line limit: the parser's depth limit, not the stack.
    let mut deep = vec![b'['; 500_000];
    deep.push(b'\n');
    let v = ask(&deep);
    assert_eq!(v["error"]["code"], codes::PARSE_ERROR, "{v}");
    // Deep nesting inside params.
    let mut line =
        b"{\"jsonrpc\":\"2.0\",\"method\":\"status\",\"id\":2,\"params\":{\"name\":".to_vec();
    line.extend(std::iter::repeat_n(b'{', 100_000));
    line.push(b'\n');
    let v = ask(&line);
    assert_eq!(v["error"]["code"], codes::PARSE_ERROR, "{v}");
    // Invalid UTF-8 inside a string.
    let v = ask(b"{\"jsonrpc\":\"2.0\",\"method\":\"status\",\"id\":3,\"params\":{\"name\":\"\xff\xfe\"}}\n");
    assert_eq!(v["error"]["code"], codes::PARSE_ERROR, "{v}");
    // A batch of 10,000 requests is answered with 10,000 answers, one line.
    let mut batch = b"[".to_vec();
    for i in 0..10_000 {
        if i > 0 {
            batch.push(b',');
        }
        batch.extend(
            format!("{{\"jsonrpc\":\"2.0\",\"method\":\"export_list\",\"id\":{i}}}").bytes(),
        );
    }
    batch.extend(b"]\n");
    let v = ask(&batch);
    assert_eq!(v.as_array().map(Vec::len), Some(10_000));
    // The same connection still works.
    let v = ask(b"{\"jsonrpc\":\"2.0\",\"method\":\"status\",\"id\":9}\n");
    assert!(v["result"]["stores"].is_array(), "{v}");
    drop(r);
    let mut rest = Vec::new();
    let _ = s.set_read_timeout(Some(Duration::from_millis(10)));
    let _ = s.read_to_end(&mut rest);
}

/// Starts a daemon with the process umask set to 0 (every file it creates without an explicit
/// mode would be world-writable), then restores the umask.
fn daemon_under_umask0(dir: &Path) -> Daemon {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _g = LOCK.lock().unwrap();
    // SAFETY: umask only changes this process's file-creation mask; restored below. Other
    // tests of this binary creating files meanwhile get more permissive modes, which no
    // test here depends on.
    let old = unsafe { libc::umask(0) };
    let d = Daemon::start(dir);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    d
}

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o777
}

/// The RPC socket, its lock and the state directory and file are private whatever the umask.
#[test]
fn rpc_socket_and_state_are_private_under_umask0() {
    let dir = scratch("hostile-umask");
    let (o, c) = (dir.path().join("o.img"), dir.path().join("c.img"));
    sparse_file(&o, MIB);
    sparse_file(&c, 16 * MIB);
    let d = daemon_under_umask0(dir.path());
    d.ok(
        "origin_create",
        json!({"name": "vol", "origin": o, "cow": c, "bind": true, "format": true}),
    );
    assert_eq!(mode(&d.rpc_socket), 0o600, "RPC socket");
    let lock = PathBuf::from(format!("{}.lock", d.rpc_socket.display()));
    assert_eq!(mode(&lock), 0o600, "RPC lock file");
    assert_eq!(mode(&d.state_dir.join("state.json")), 0o600, "state file");
    assert_eq!(mode(&d.state_dir) & 0o077, 0, "state directory");
}

/// Issue 7 item 8: "export sockets are 0600 too unless configured".
#[test]
fn export_sockets_are_private_under_umask0() {
    let dir = scratch("hostile-umask-exp");
    let (o, c) = (dir.path().join("o.img"), dir.path().join("c.img"));
    sparse_file(&o, MIB);
    sparse_file(&c, 16 * MIB);
    let d = daemon_under_umask0(dir.path());
    d.ok(
        "origin_create",
        json!({"name": "vol", "origin": o, "cow": c, "bind": true, "format": true}),
    );
    let sock = d.export_socket("vol");
    assert_eq!(
        mode(&sock) & 0o077,
        0,
        "export socket {} has mode {:o}",
        sock.display(),
        mode(&sock)
    );
}

/// A hard link to a store in use is another path to the same file. Formatting it under a live
/// export must be refused; binding another origin through it is allowed (a store holds several
/// origins) but must use the store already open, known under its first path, never a second
/// instance of the same file.
#[test]
fn hard_link_to_an_open_store_is_the_same_store() {
    let f = fixture("hostile-hardlink");
    f.d.ok("snapshot_create", json!({"name": "vol", "sync": true}));
    let [before] = settled_digests([&f.cow]);
    let hard_c = f.dir.path().join("hard-to-store");
    std::fs::hard_link(&f.cow, &hard_c).unwrap();
    let other = |i: usize| {
        let o = f.dir.path().join(format!("other{i}.img"));
        sparse_file(&o, 4 * MIB);
        o
    };
    // Format through the link: refused, the store untouched.
    let p = json!({"name": "x0", "origin": other(0), "cow": hard_c, "bind": true, "format": true, "force_format": true});
    assert!(
        f.d.call("origin_create", p.clone()).is_err(),
        "origin_create {p} formatted vol's store through a hard link"
    );
    assert_eq!(
        digest(&f.cow),
        before,
        "vol's store was modified by a refused format"
    );
    // Bind through the link: the export names the store by the path the daemon knows.
    let v = f.d.ok(
        "origin_create",
        json!({"name": "x1", "origin": other(1), "cow": hard_c, "bind": true}),
    );
    assert_eq!(
        v["cow"].as_str().unwrap(),
        f.cow.to_str().unwrap(),
        "a second instance of the store: {v}"
    );
    // Both origins' snapshots go through the one open store.
    f.d.ok("snapshot_create", json!({"name": "x1"}));
    f.d.ok("snapshot_create", json!({"name": "vol"}));
}
