//! Operator safety: an operator's mistake typed at the CLI loses no data and is told plainly
//! what is wrong (the operator-safety issue, items 1–15). Every test drives `snapmv` as an
//! operator would and compares snapshot and origin contents afterwards, not only exit codes.
//!
//! Files that must not be writable are made so in a way that holds for root too: mode 0444,
//! plus `chattr +i` (immutable: even root's open for writing fails with EPERM) when the tests
//! run as root. The helper checks that an open for writing really fails before relying on it.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;
use snapmv_tests::blkio_client::{run1, Client, ClientOptions, NO_FLAGS};
use snapmv_tests::daemon::{scratch, snapmv_bin, sparse_file, Daemon};

const MIB: u64 = 1 << 20;
const HANG_GUARD: Duration = Duration::from_secs(120);

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

/// Reads block `off` of export `name` through a fresh connection (closed before returning,
/// and waited for, so that the export can be removed afterwards).
fn read_export(d: &Daemon, name: &str, off: u64) -> Vec<u8> {
    read_export_with(d, name, off, false)
}

fn read_export_with(d: &Daemon, name: &str, off: u64, read_only: bool) -> Vec<u8> {
    let opts = ClientOptions {
        read_only,
        ..ClientOptions::default()
    };
    let mut c = Client::connect_with(&d.export_socket(name), &opts)
        .unwrap_or_else(|e| panic!("connect to export {name}: {e}; log:\n{}", d.log()));
    let data = read_block(&mut c, off);
    drop(c);
    wait_disconnected(d, name);
    data
}

/// Asserts that a 4 KiB block holds only `byte` (without printing 4,096 numbers if not).
#[track_caller]
fn same_block(got: Vec<u8>, byte: u8) {
    if let Some(i) = got.iter().position(|&b| b != byte) {
        panic!(
            "block differs at byte {i}: {:#04x} instead of {byte:#04x} ({} of {} bytes differ)",
            got[i],
            got.iter().filter(|&&b| b != byte).count(),
            got.len()
        );
    }
}

fn wait_disconnected(d: &Daemon, name: &str) {
    let deadline = Instant::now() + HANG_GUARD;
    loop {
        let v = json_ok(d, &["exports"]);
        let e = v["exports"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == name)
            .cloned()
            .unwrap_or(Value::Null);
        if e["connected"] != true {
            return;
        }
        assert!(Instant::now() < deadline, "{name}: the client never left");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn json_ok(d: &Daemon, args: &[&str]) -> Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let out = d.cli(&all);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("snapmv {all:?} printed {out:?}: {e}"))
}

/// Runs a CLI verb that must fail with exit status `status`; returns stderr.
fn fails(d: &Daemon, args: &[&str], status: i32) -> String {
    let out = d.cli_output(args);
    check_status(&out, args, status)
}

fn check_status(out: &Output, args: &[&str], status: i32) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(status),
        "snapmv {args:?}: stdout {} stderr {err}",
        String::from_utf8_lossy(&out.stdout)
    );
    err
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// `check` run as an operator would, with no daemon reachable on the default socket.
fn check_cmd(args: &[&str]) -> Output {
    Command::new(snapmv_bin())
        .env("SNAPMV_RPC_SOCKET", "/nonexistent.sock")
        .args(args)
        .output()
        .unwrap()
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Makes `path` unwritable for whoever runs the tests (root included); undone on drop.
struct Unwritable(PathBuf);

impl Unwritable {
    fn new(path: &Path) -> Unwritable {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o444)).unwrap();
        if is_root() {
            let st = Command::new("chattr").arg("+i").arg(path).status();
            assert!(
                st.is_ok_and(|s| s.success()),
                "chattr +i {} failed: as root, these tests need a file system with the \
                 immutable attribute (ext4, xfs, btrfs, tmpfs on Linux 6.0+)",
                path.display()
            );
        }
        let w = std::fs::OpenOptions::new().write(true).open(path);
        assert!(w.is_err(), "{} is still writable", path.display());
        Unwritable(path.to_path_buf())
    }
}

impl Drop for Unwritable {
    fn drop(&mut self) {
        if is_root() {
            let _ = Command::new("chattr").arg("-i").arg(&self.0).status();
        }
        let _ = std::fs::set_permissions(&self.0, std::fs::Permissions::from_mode(0o644));
    }
}

/// Item 1: a second daemon cannot open, bind into or reformat a store (or an origin) another
/// daemon serves — directly, through a symlink or through a hard link — and the first
/// daemon's data and snapshots come through untouched.
#[test]
fn a_second_daemon_cannot_touch_a_served_store() {
    let dir = scratch("2daemons");
    let p = |n: &str| dir.path().join(n);
    sparse_file(&p("disk0.img"), 4 * MIB);
    sparse_file(&p("o2.img"), 4 * MIB);
    sparse_file(&p("store.cow"), 16 * MIB);
    std::os::unix::fs::symlink(p("store.cow"), p("link.cow")).unwrap();
    std::fs::hard_link(p("store.cow"), p("hard.cow")).unwrap();
    std::fs::create_dir(p("a")).unwrap();
    std::fs::create_dir(p("b")).unwrap();
    let a = Daemon::start(&p("a"));
    let b = Daemon::start(&p("b"));
    let (disk, o2, store) = (s(&p("disk0.img")), s(&p("o2.img")), s(&p("store.cow")));

    a.cli(&["create", "vol", &disk, &store, "-b", "-f"]);
    let mut c = Client::connect(&a.export_socket("vol")).unwrap();
    write_block(&mut c, 0, 1);
    assert_eq!(
        a.cli(&["snapshot", "vol"]).trim(),
        "snapshot 1 of export vol created"
    );
    write_block(&mut c, 0, 2);

    for cow in ["store.cow", "link.cow", "hard.cow"] {
        let cow = s(&p(cow));
        let err = fails(&b, &["create", "x1", &disk, &cow], 5);
        assert!(err.contains("is in use by process "), "{err}");
        let err = fails(&b, &["create", "x2", &o2, &cow, "-b"], 5);
        assert!(err.contains("is in use by process "), "{err}");
        let err = fails(&b, &["create", "gb", &o2, &cow, "-b", "-F"], 5);
        assert!(
            err.contains("COW store ")
                && err.contains(" is in use by process ")
                && err.contains("(snapmv"),
            "{err}"
        );
        let err = fails(&b, &["create", "s1", &disk, &cow, "1"], 5);
        assert!(err.contains("is in use by process "), "{err}");
    }
    // The origin itself is held too: B cannot bind it to another store.
    sparse_file(&p("other.cow"), 16 * MIB);
    let err = fails(
        &b,
        &["create", "y", &disk, &s(&p("other.cow")), "-b", "-f"],
        5,
    );
    assert!(
        err.contains(&format!("origin {disk} is in use by process ")),
        "{err}"
    );
    assert!(
        std::fs::read(p("other.cow"))
            .unwrap()
            .iter()
            .all(|&x| x == 0),
        "a refused create formatted other.cow"
    );
    assert_eq!(b.cli(&["exports"]), "no exports\n");

    // A's data: the origin holds 2, snapshot 1 holds 1, and nothing else appeared.
    same_block(read_block(&mut c, 0), 2);
    drop(c);
    wait_disconnected(&a, "vol");
    a.cli(&["create", "s1", &disk, &store, "1"]);
    same_block(read_export(&a, "s1", 0), 1);
    let v = json_ok(&a, &["list"]);
    let tags: Vec<u64> = v["origins"][0]["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["tag"].as_u64().unwrap())
        .collect();
    assert_eq!(tags, [1]);
}

/// Item 2: `check` (and `check --repair`) refuse a store a daemon has open even when they
/// cannot ask that daemon, naming the holder; once it is closed, the store is clean.
#[test]
fn check_refuses_a_store_in_use_whoever_holds_it() {
    let dir = scratch("checklive");
    let p = |n: &str| dir.path().join(n);
    sparse_file(&p("disk.img"), 4 * MIB);
    sparse_file(&p("store.cow"), 16 * MIB);
    std::os::unix::fs::symlink(p("store.cow"), p("link.cow")).unwrap();
    let mut d = Daemon::start(dir.path());
    let (disk, store) = (s(&p("disk.img")), s(&p("store.cow")));
    d.cli(&["create", "vol", &disk, &store, "-b", "-f"]);
    let mut c = Client::connect(&d.export_socket("vol")).unwrap();
    write_block(&mut c, 8192, 5);
    d.cli(&["snapshot", "vol", "-m", "kept"]);
    write_block(&mut c, 8192, 6);
    for args in [
        vec!["check", store.as_str()],
        vec!["check", store.as_str(), "--repair"],
        vec![
            "check",
            "--repair",
            dir.path().join("link.cow").to_str().unwrap(),
        ],
    ] {
        let out = check_cmd(&args);
        let err = check_status(&out, &args, 5);
        assert!(
            err.contains("is in use by process ") && err.contains("(snapmv"),
            "{err}"
        );
        assert!(
            out.stdout.is_empty(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    drop(c);
    assert!(d.terminate().success());
    let out = check_cmd(&["check", &store]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("is clean: 1 origin(s), 1 snapshot(s)"),
        "{text}"
    );
    // And the data is there.
    d.restart();
    d.cli(&["create", "s1", &disk, &store, "1"]);
    same_block(read_export(&d, "s1", 8192), 5);
    same_block(read_export(&d, "vol", 8192), 6);
}

/// Item 3: a create that fails (origin not writable, origin of an impossible size, a second
/// format of a store that holds one) formats nothing; the store's origin and its snapshot
/// "keep" survive.
#[test]
fn a_failed_create_formats_nothing() {
    let dir = scratch("failcreate");
    let p = |n: &str| dir.path().join(n);
    sparse_file(&p("disk.img"), 4 * MIB);
    sparse_file(&p("st.cow"), 16 * MIB);
    sparse_file(&p("fresh.cow"), 16 * MIB);
    std::fs::write(p("ro.img"), vec![3u8; 4 * MIB as usize]).unwrap();
    std::fs::write(p("odd.img"), vec![3u8; 4097]).unwrap();
    let _ro = Unwritable::new(&p("ro.img"));
    let d = Daemon::start(dir.path());
    let (disk, st, fresh, ro, odd) = (
        s(&p("disk.img")),
        s(&p("st.cow")),
        s(&p("fresh.cow")),
        s(&p("ro.img")),
        s(&p("odd.img")),
    );
    d.cli(&["create", "a", &disk, &st, "-b", "-f"]);
    let mut c = Client::connect(&d.export_socket("a")).unwrap();
    write_block(&mut c, 0, 7);
    d.cli(&["snapshot", "a", "-m", "keep"]);
    write_block(&mut c, 0, 8);
    drop(c);
    wait_disconnected(&d, "a");
    d.cli(&["remove", "a"]);

    let err = fails(&d, &["create", "r1", &ro, &fresh, "-b", "-f"], 8);
    assert!(
        err.contains(&format!(
            "origin {ro} cannot be opened for reading and writing"
        )) && err.contains("give -r"),
        "{err}"
    );
    assert!(
        std::fs::read(p("fresh.cow"))
            .unwrap()
            .iter()
            .all(|&x| x == 0),
        "the failed create formatted fresh.cow"
    );
    let before = std::fs::read(p("st.cow")).unwrap();
    let err = fails(&d, &["create", "r9", &ro, &st, "-b", "-F"], 8);
    assert!(
        err.contains("cannot be opened for reading and writing"),
        "{err}"
    );
    let err = fails(&d, &["create", "r8", &odd, &st, "-b", "-F"], 2);
    assert!(err.contains("must be a non-empty multiple of 512"), "{err}");
    let err = fails(&d, &["create", "r7", &disk, &st, "-b", "-f"], 5);
    assert!(
        err.contains("already holds a snapmv store; give -F"),
        "{err}"
    );
    assert!(
        std::fs::read(p("st.cow")).unwrap() == before,
        "a failed create changed st.cow"
    );

    d.cli(&["create", "a", &disk, &st]);
    d.cli(&["create", "k", &disk, &st, "1"]);
    same_block(read_export(&d, "k", 0), 7);
    same_block(read_export(&d, "a", 0), 8);
    let v = json_ok(&d, &["list", "a"]);
    assert_eq!(v["origins"][0]["snapshots"][0]["memo"], "keep");
}

/// Item 4: a fresh store has both superblocks: with one byte flipped in slot 0, check finds
/// it, check --repair rewrites both slots, and the snapshot "important" reads back.
#[test]
fn one_damaged_superblock_slot_loses_nothing() {
    let dir = scratch("twoslots");
    let p = |n: &str| dir.path().join(n);
    sparse_file(&p("disk.img"), 4 * MIB);
    sparse_file(&p("store.cow"), 16 * MIB);
    let mut d = Daemon::start(dir.path());
    let (disk, store) = (s(&p("disk.img")), s(&p("store.cow")));
    d.cli(&["create", "vol", &disk, &store, "-b", "-f"]);
    let mut c = Client::connect(&d.export_socket("vol")).unwrap();
    write_block(&mut c, 4096, 0x11);
    d.cli(&["snapshot", "vol", "-m", "important"]);
    write_block(&mut c, 4096, 0x22);
    drop(c);
    assert!(d.terminate().success());

    let mut bytes = std::fs::read(&store).unwrap();
    assert!(
        bytes[4096..4104] == *b"SNAPMVSB",
        "superblock slot 1 is blank after format and a stop"
    );
    bytes[20] ^= 0x01;
    std::fs::write(&store, &bytes).unwrap();
    let out = check_cmd(&["check", &store]);
    let text = String::from_utf8_lossy(&out.stdout);
    check_status(&out, &["check"], 6);
    assert!(text.contains("problem: superblock slot 0"), "{text}");
    let out = check_cmd(&["check", &store, "--repair"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("repaired: rewrote both superblock slots"),
        "{text}"
    );
    assert!(
        text.contains("is clean: 1 origin(s), 1 snapshot(s)"),
        "{text}"
    );

    d.restart();
    d.cli(&["create", "imp", &disk, &store, "1"]);
    same_block(read_export(&d, "imp", 4096), 0x11);
    same_block(read_export(&d, "vol", 4096), 0x22);
    let v = json_ok(&d, &["list", "vol"]);
    assert_eq!(v["origins"][0]["snapshots"][0]["memo"], "important");
}

/// Item 5: list and status show every origin bound in an open store, also those the daemon
/// has not opened (nothing exports them).
#[test]
fn list_and_status_show_origins_that_are_not_exported() {
    let dir = scratch("dormant");
    let p = |n: &str| dir.path().join(n);
    sparse_file(&p("a.img"), 4 * MIB);
    sparse_file(&p("b.img"), 2 * MIB);
    sparse_file(&p("store.cow"), 16 * MIB);
    let mut d = Daemon::start(dir.path());
    let store = s(&p("store.cow"));
    d.cli(&["create", "va", &s(&p("a.img")), &store, "-b", "-f"]);
    d.cli(&["create", "vb", &s(&p("b.img")), &store, "-b"]);
    d.cli(&["snapshot", "vb", "-m", "b's"]);
    d.cli(&["remove", "vb"]);
    d.restart();
    let out = d.cli(&["list"]);
    assert!(
        out.contains(&format!(
            "origin b.img ({}) in {store}, bound but not open",
            s(&p("b.img"))
        )),
        "{out}"
    );
    let v = json_ok(&d, &["list"]);
    let origins = v["origins"].as_array().unwrap();
    assert_eq!(origins.len(), 2, "{v}");
    let b = origins.iter().find(|o| o["origin_id"] == "b.img").unwrap();
    assert_eq!(b["open"], false);
    let out = d.cli(&["status"]);
    let line = out.lines().find(|l| l.contains("b.img")).unwrap_or("");
    assert!(line.contains("(not open)"), "{out}");
    // Exporting it opens it: its snapshot is there.
    d.cli(&["create", "vb", &s(&p("b.img")), &store]);
    let v = json_ok(&d, &["list", "vb"]);
    assert_eq!(v["origins"][0]["open"], true);
    assert_eq!(v["origins"][0]["snapshots"][0]["memo"], "b's");
}

/// Item 6: an origin shrunk below its bound size while open is refused at create (and
/// logged), and served again once its size is restored, data intact.
#[test]
fn a_shrunk_origin_is_refused_at_create() {
    let dir = scratch("shrunk");
    let p = |n: &str| dir.path().join(n);
    sparse_file(&p("disk.img"), 4 * MIB);
    sparse_file(&p("store.cow"), 16 * MIB);
    let d = Daemon::start(dir.path());
    let (disk, store) = (s(&p("disk.img")), s(&p("store.cow")));
    d.cli(&["create", "vol", &disk, &store, "-b", "-f"]);
    let mut c = Client::connect(&d.export_socket("vol")).unwrap();
    write_block(&mut c, MIB, 4);
    drop(c);
    wait_disconnected(&d, "vol");
    d.cli(&["snapshot", "vol"]);
    d.cli(&["snapshot", "vol"]);
    d.cli(&["create", "s1", &disk, &store, "1"]);
    d.cli(&["remove", "vol"]);
    std::fs::File::options()
        .write(true)
        .open(&disk)
        .unwrap()
        .set_len(2 * MIB)
        .unwrap();
    let err = fails(&d, &["create", "vol", &disk, &store], 5);
    assert!(
        err.contains("is now 2097152 bytes but was bound with 4194304 bytes"),
        "{err}"
    );
    let err = fails(&d, &["create", "s2", &disk, &store, "2"], 5);
    assert!(err.contains("is now 2097152 bytes"), "{err}");
    assert!(d.log().contains("is now 2097152 bytes"), "{}", d.log());
    std::fs::File::options()
        .write(true)
        .open(&disk)
        .unwrap()
        .set_len(4 * MIB)
        .unwrap();
    d.cli(&["create", "vol", &disk, &store]);
    same_block(read_export(&d, "vol", MIB), 4);
    same_block(read_export(&d, "s1", MIB), 4);
}

/// Item 7: remove of an export with a connected guest is refused, naming the guest's pid;
/// the guest goes on; --force removes it.
#[test]
fn remove_refuses_a_connected_guest_unless_forced() {
    let dir = scratch("rmconn");
    let p = |n: &str| dir.path().join(n);
    sparse_file(&p("disk.img"), 4 * MIB);
    sparse_file(&p("store.cow"), 16 * MIB);
    let d = Daemon::start(dir.path());
    d.cli(&[
        "create",
        "vol",
        &s(&p("disk.img")),
        &s(&p("store.cow")),
        "-b",
        "-f",
    ]);
    let mut c = Client::connect(&d.export_socket("vol")).unwrap();
    write_block(&mut c, 0, 9);
    let err = fails(&d, &["remove", "vol"], 5);
    assert!(
        err.contains("export vol has a connected client: pid ")
            && err.contains(&format!("pid {} ", std::process::id()))
            && err.contains("--force"),
        "{err}"
    );
    assert!(d.export_socket("vol").exists());
    same_block(read_block(&mut c, 0), 9);
    assert_eq!(
        d.cli(&["remove", "vol", "--force"]).trim(),
        "export vol removed"
    );
    assert!(!d.export_socket("vol").exists());
    drop(c);
    assert_eq!(std::fs::read(p("disk.img")).unwrap()[..4096], [9; 4096]);

    // delete NAME (dms do: unbind and remove the export) refuses a connected guest too.
    sparse_file(&p("disk2.img"), 4 * MIB);
    d.cli(&[
        "create",
        "v2",
        &s(&p("disk2.img")),
        &s(&p("store.cow")),
        "-b",
    ]);
    let mut c2 = Client::connect(&d.export_socket("v2")).unwrap();
    write_block(&mut c2, 0, 0x42);
    let err = fails(&d, &["delete", "v2"], 5);
    assert!(
        err.contains("export v2 has a connected client: pid ")
            && err.contains("delete it with --force"),
        "{err}"
    );
    let v = json_ok(&d, &["list"]);
    assert!(
        v["origins"]
            .as_array()
            .unwrap()
            .iter()
            .any(|o| o["origin_id"] == "disk2.img"),
        "the refused delete unbound the origin: {v}"
    );
    same_block(read_block(&mut c2, 0), 0x42);
    d.cli(&["delete", "v2", "--force"]);
    let v = json_ok(&d, &["list"]);
    assert!(
        !v["origins"]
            .as_array()
            .unwrap()
            .iter()
            .any(|o| o["origin_id"] == "disk2.img"),
        "{v}"
    );
    drop(c2);
    assert_eq!(std::fs::read(p("disk2.img")).unwrap()[..4096], [0x42; 4096]);
}

/// Item 8: an origin that cannot be written (0444, immutable for root) is served read-only
/// with -r, its snapshots can be taken and exported (writes go to the store), a read-write
/// export and a rollback of it are refused, and the file never changes.
#[test]
fn a_read_only_origin_is_served_read_only() {
    let dir = scratch("roorigin");
    let p = |n: &str| dir.path().join(n);
    std::fs::write(p("ro.img"), vec![0x5a; 4 * MIB as usize]).unwrap();
    sparse_file(&p("store.cow"), 16 * MIB);
    let ro_guard = Unwritable::new(&p("ro.img"));
    let mut d = Daemon::start(dir.path());
    let (ro, store) = (s(&p("ro.img")), s(&p("store.cow")));
    let out = d.cli(&["create", "r", &ro, &store, "-b", "-f", "-r"]);
    assert!(out.contains("export r serves origin ro.img"), "{out}");
    same_block(read_export_with(&d, "r", 0, true), 0x5a);
    d.cli(&["snapshot", "r", "-m", "ro snap"]);
    d.cli(&["create", "rs", &ro, &store, "1"]);
    let mut c = Client::connect(&d.export_socket("rs")).unwrap();
    write_block(&mut c, 0, 0x33);
    same_block(read_block(&mut c, 0), 0x33);
    drop(c);
    wait_disconnected(&d, "rs");
    let err = fails(&d, &["rollback", "r", "1"], 5);
    assert!(err.contains("it is open read-only"), "{err}");
    d.cli(&["remove", "r"]);
    let err = fails(&d, &["create", "w", &ro, &store], 5);
    assert!(err.contains("is open read-only"), "{err}");
    // After a restart the read-only exports come back (the origin is opened read-only).
    assert!(d.terminate().success());
    d.restart();
    d.cli(&["create", "r", &ro, &store, "-r"]);
    same_block(read_export_with(&d, "r", 0, true), 0x5a);
    same_block(read_export(&d, "rs", 0), 0x33);
    assert!(std::fs::read(p("ro.img"))
        .unwrap()
        .iter()
        .all(|&x| x == 0x5a));
    // Made writable again and closed (no export left), it is opened read-write next time:
    // nothing read-only about it is remembered, and a rollback to the snapshot (which its
    // export changed) works.
    d.cli(&["remove", "r"]);
    d.cli(&["remove", "rs"]);
    assert_eq!(d.cli(&["status"]), "no stores open\n");
    drop(ro_guard);
    d.cli(&["create", "rs", &ro, &store, "1"]);
    d.cli(&["create", "w", &ro, &store]);
    d.cli(&["rollback", "w", "1"]);
    same_block(read_export(&d, "w", 0), 0x33);
    same_block(read_export(&d, "w", 4096), 0x5a);
}

/// Item 9: export sockets take the group and mode given per daemon (serve --socket-group,
/// --socket-mode) or per export (create --socket-group, --socket-mode), also after a restart.
#[test]
fn socket_group_and_mode_survive_restarts() {
    let dir = scratch("sockperm");
    let p = |n: &str| dir.path().join(n);
    sparse_file(&p("disk.img"), 4 * MIB);
    sparse_file(&p("store.cow"), 16 * MIB);
    // SAFETY: getegid has no preconditions and cannot fail.
    let my_gid = unsafe { libc::getegid() };
    // A gid other than ours, when we may give one (root); else our own.
    let other_gid = if is_root() { 65534 } else { my_gid };
    let mut d = Daemon::start_with(
        dir.path(),
        &[
            "--socket-mode",
            "0660",
            "--socket-group",
            &other_gid.to_string(),
        ],
    );
    let (disk, store) = (s(&p("disk.img")), s(&p("store.cow")));
    d.cli(&["create", "vol", &disk, &store, "-b", "-f"]);
    d.cli(&["snapshot", "vol"]);
    d.cli(&[
        "create",
        "own",
        &disk,
        &store,
        "1",
        "--socket-mode",
        "0600",
        "--socket-group",
        &my_gid.to_string(),
    ]);
    let check = |d: &Daemon| {
        let m = std::fs::metadata(d.export_socket("vol")).unwrap();
        assert_eq!(m.mode() & 0o777, 0o660);
        assert_eq!(m.gid(), other_gid);
        let m = std::fs::metadata(d.export_socket("own")).unwrap();
        assert_eq!(m.mode() & 0o777, 0o600);
        assert_eq!(m.gid(), my_gid);
    };
    check(&d);
    d.restart();
    check(&d);
    let err = fails(
        &d,
        &["create", "bad", &disk, &store, "1", "--socket-mode", "0066"],
        2,
    );
    assert!(err.contains("give its owner read and write"), "{err}");
}

/// Items 10–12: errors name the field, --json prints {"error": ...} with distinct exit
/// statuses, and the wording says what to do.
#[test]
fn errors_name_the_field_and_have_exit_statuses() {
    let dir = scratch("errors");
    let p = |n: &str| dir.path().join(n);
    sparse_file(&p("disk.img"), 4 * MIB);
    sparse_file(&p("small.cow"), 64 * 1024);
    sparse_file(&p("store.cow"), 16 * MIB);
    std::fs::write(p("plain.img"), vec![0x42u8; MIB as usize]).unwrap();
    let d = Daemon::start(dir.path());
    let (disk, store) = (s(&p("disk.img")), s(&p("store.cow")));

    // 10
    let msg = d.err(
        "origin_create",
        serde_json::json!({"name": 5, "origin": disk, "cow": store}),
        -32602,
    );
    assert!(
        msg.contains("invalid parameter name of method origin_create"),
        "{msg}"
    );

    // 11: JSON error objects and exit statuses.
    let out = d.cli_output(&["--json", "remove", "nosuch"]);
    assert_eq!(out.status.code(), Some(4));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["error"]["code"], -32001);
    assert_eq!(v["error"]["message"], "export nosuch not found");
    let out = d.cli_output(&["remove", "nosuch", "--json"]);
    assert_eq!(out.status.code(), Some(4));
    assert!(out.stderr.is_empty());

    // 12: wording.
    let err = fails(
        &d,
        &["create", "v", &disk, &s(&p("small.cow")), "-b", "-f"],
        2,
    );
    assert_eq!(err.matches("cannot format COW store").count(), 1, "{err}");
    let err = fails(&d, &["create", "v", &disk, &store], 6);
    assert!(
        err.contains("is not a snapmv store") && err.contains("-b -f"),
        "{err}"
    );
    d.cli(&["create", "v", &disk, &store, "-b", "-f"]);
    d.cli(&["remove", "v"]);
    let err = fails(&d, &["create", "v", &disk, &store, "-b", "-f"], 5);
    assert!(err.contains("give -F (force_format)"), "{err}");
    sparse_file(&p("o2.img"), MIB);
    let err = fails(&d, &["create", "v2", &s(&p("o2.img")), &store], 4);
    assert!(err.contains("give -b (bind)"), "{err}");
    d.cli(&["create", "v", &disk, &store]);
    d.cli(&["snapshot", "v"]);
    d.cli(&["snapshot", "v"]);
    let err = fails(&d, &["delete", "v"], 5);
    assert!(
        err.contains("it still has 2 snapshots; delete them first"),
        "{err}"
    );
    let out = check_cmd(&["check", &s(&p("plain.img"))]);
    let err = check_status(&out, &["check"], 6);
    assert!(err.contains("is not a snapmv COW store"), "{err}");
    assert!(out.stdout.is_empty());
    assert_eq!(
        std::fs::read(p("plain.img")).unwrap(),
        vec![0x42u8; MIB as usize]
    );
    let out = Command::new(snapmv_bin())
        .args([
            "--rpc-socket",
            &s(&p("x.sock")),
            "serve",
            "--state-dir",
            &s(&p("plain.img")),
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("is not a directory"), "{err}");
}

/// Item 13: help shows the defaults, serve offers no --json, and values the daemon refuses
/// are refused by the CLI (exit 2, before any daemon is asked).
#[test]
fn help_shows_defaults_and_the_cli_validates_like_the_daemon() {
    let bin = snapmv_bin();
    let help = |verb: &str| {
        let out = Command::new(&bin).args([verb, "--help"]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(!help("serve").contains("--json"), "{}", help("serve"));
    let h = help("create");
    for d in ["[default: 4]", "[default: 1024]", "[default: 1]"] {
        assert!(h.contains(d), "create --help lacks {d}:\n{h}");
    }
    for args in [
        &["create", "v", "/o", "/c", "--queue-size", "65535"][..],
        &["create", "v", "/o", "/c", "--queue-size", "100"],
        &["create", "v", "/o", "/c", "-q", "0"],
        &["create", "v", "/o", "/c", "-q", "65"],
        &["create", "v", "/o", "/c", "0"],
        &["create", "v", "/o", "/c", "-b", "-f", "-c", "3"],
        &["delete", "v", "0"],
        &["rollback", "v", "0"],
    ] {
        let out = Command::new(&bin)
            .env("SNAPMV_RPC_SOCKET", "/nonexistent.sock")
            .args(args)
            .output()
            .unwrap();
        check_status(&out, args, 2);
    }
    // With --json, a usage error is the same JSON error object as any other error.
    let out = Command::new(&bin)
        .args(["--json", "create", "v", "/o", "/c", "--queue-size", "65535"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["error"]["code"], -32602);
    assert_eq!(v["error"]["exit_status"], 2);
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("--queue-size"),
        "{v}"
    );
}

/// Item 14: a FAILED reason is the last column, so it does not widen the other rows.
#[test]
fn a_failed_export_does_not_widen_the_table() {
    let dir = scratch("failedrow");
    let p = |n: &str| dir.path().join(n);
    sparse_file(&p("disk.img"), 4 * MIB);
    sparse_file(&p("disk2.img"), 4 * MIB);
    sparse_file(&p("store.cow"), 16 * MIB);
    sparse_file(&p("store2.cow"), 16 * MIB);
    let mut d = Daemon::start(dir.path());
    d.cli(&[
        "create",
        "ok",
        &s(&p("disk.img")),
        &s(&p("store.cow")),
        "-b",
        "-f",
    ]);
    d.cli(&[
        "create",
        "gone",
        &s(&p("disk2.img")),
        &s(&p("store2.cow")),
        "-b",
        "-f",
    ]);
    d.kill();
    std::fs::remove_file(p("disk2.img")).unwrap();
    d.restart();
    let out = d.cli(&["exports"]);
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].ends_with("STATE"), "{out}");
    let gone = lines.iter().find(|l| l.starts_with("gone ")).unwrap();
    let ok = lines.iter().find(|l| l.starts_with("ok ")).unwrap();
    assert!(gone.contains("FAILED: "), "{out}");
    assert!(ok.ends_with("waiting"), "{out}");
    assert!(
        ok.len() <= lines[0].len() + 2,
        "the ok row is padded by the FAILED reason:\n{out}"
    );
}

/// Item 15: the demo's output survives redirection: no script of the demo reopens its own
/// output (`tee /dev/stderr` reopens a redirected log file and truncates it).
#[test]
fn demo_scripts_do_not_reopen_their_output() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("qemu");
    for entry in std::fs::read_dir(&root).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "sh") {
            let text = std::fs::read_to_string(&path).unwrap();
            for (i, line) in text.lines().enumerate() {
                let code = line.split('#').next().unwrap_or("");
                assert!(
                    !code.contains("/dev/stderr") && !code.contains("/dev/stdout"),
                    "{}:{}: reopens its own output: {line}",
                    path.display(),
                    i + 1
                );
            }
        }
    }
}

/// A loop device, detached on drop.
struct Loop(String);

impl Loop {
    fn attach(file: &Path) -> Loop {
        let out = Command::new("losetup")
            .args(["-f", "--show"])
            .arg(file)
            .output()
            .expect("run losetup");
        assert!(
            out.status.success(),
            "losetup -f --show {}: {}",
            file.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Loop(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

/// Item 1 for block devices: a store on a block device served by one daemon cannot be
/// formatted or opened through a second device node of the same device (another inode, so
/// only O_EXCL catches it), nor checked; the first daemon's snapshot is intact. Needs root
/// (loop devices, mknod); skipped otherwise.
#[test]
fn a_second_node_of_a_served_block_device_is_refused() {
    if !is_root() || !Path::new("/dev/loop-control").exists() {
        eprintln!(
            "SKIPPED: a_second_node_of_a_served_block_device_is_refused needs root and loop devices"
        );
        return;
    }
    let dir = scratch("bdev");
    let p = |n: &str| dir.path().join(n);
    sparse_file(&p("store.img"), 32 * MIB);
    sparse_file(&p("disk.img"), 4 * MIB);
    sparse_file(&p("disk2.img"), 4 * MIB);
    let lo = Loop::attach(&p("store.img"));
    let rdev = std::fs::metadata(&lo.0).unwrap().rdev();
    let node = p("second-node");
    let st = Command::new("mknod")
        .arg(&node)
        .arg("b")
        .arg(libc::major(rdev).to_string())
        .arg(libc::minor(rdev).to_string())
        .status()
        .unwrap();
    assert!(st.success(), "mknod");
    assert_ne!(
        std::fs::metadata(&node).unwrap().ino(),
        std::fs::metadata(&lo.0).unwrap().ino(),
        "the second node must be another inode"
    );
    std::fs::create_dir(p("a")).unwrap();
    std::fs::create_dir(p("b")).unwrap();
    let a = Daemon::start(&p("a"));
    let b = Daemon::start(&p("b"));
    let (disk, disk2, node) = (s(&p("disk.img")), s(&p("disk2.img")), s(&node));
    a.cli(&["create", "vol", &disk, &lo.0, "-b", "-f"]);
    let mut c = Client::connect(&a.export_socket("vol")).unwrap();
    write_block(&mut c, 0, 0x61);
    a.cli(&["snapshot", "vol", "-m", "on a device"]);
    write_block(&mut c, 0, 0x62);
    drop(c);
    wait_disconnected(&a, "vol");

    let err = fails(&b, &["create", "x", &disk2, &node, "-b", "-F"], 5);
    assert!(
        err.contains(&format!(
            "COW store {node} is in use by another exclusive opener"
        )),
        "{err}"
    );
    let err = fails(&b, &["create", "y", &disk2, &node], 5);
    assert!(
        err.contains("is in use by another exclusive opener"),
        "{err}"
    );
    let out = check_cmd(&["check", "--repair", &node]);
    let err = check_status(&out, &["check"], 5);
    assert!(
        err.contains("is in use by another exclusive opener"),
        "{err}"
    );

    a.cli(&["create", "s1", &disk, &lo.0, "1"]);
    same_block(read_export(&a, "s1", 0), 0x61);
    same_block(read_export(&a, "vol", 0), 0x62);
    let v = json_ok(&a, &["list", "vol"]);
    assert_eq!(v["origins"][0]["snapshots"][0]["memo"], "on a device");
}
