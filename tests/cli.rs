//! The `snapmv` CLI verbs against a running daemon, output checked (docs/cli.md).

use std::process::Command;

use serde_json::Value;
use snapmv_tests::blkio_client::{run1, Client, NO_FLAGS};
use snapmv_tests::daemon::{scratch, snapmv_bin, sparse_file, Daemon};

const MIB: u64 = 1 << 20;

fn write_byte(c: &mut Client, off: u64, byte: u8) {
    c.mem()[..4096].fill(byte);
    let p = c.ptr(0);
    let ret = run1(&mut c.queues[0], |q| q.write(off, p, 4096, 0, NO_FLAGS)).unwrap();
    assert_eq!(ret, 0, "write at {off}");
}

fn read_byte(c: &mut Client, off: u64) -> Vec<u8> {
    let p = c.ptr(0);
    let ret = run1(&mut c.queues[0], |q| q.read(off, p, 4096, 0, NO_FLAGS)).unwrap();
    assert_eq!(ret, 0, "read at {off}");
    c.mem()[..4096].to_vec()
}

fn json(d: &Daemon, args: &[&str]) -> Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let out = d.cli(&all);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("snapmv {all:?} printed {out:?}: {e}"))
}

#[test]
fn every_verb_against_a_daemon() {
    let dir = scratch("cli");
    let origin = dir.path().join("disk.img");
    let cow = dir.path().join("store.cow");
    let origin2 = dir.path().join("disk2.img");
    sparse_file(&origin, 4 * MIB);
    sparse_file(&origin2, 2 * MIB);
    sparse_file(&cow, 16 * MIB);
    let (o, c, o2) = (
        origin.display().to_string(),
        cow.display().to_string(),
        origin2.display().to_string(),
    );
    let d = Daemon::start(dir.path());

    // create (dms co -b -f -c)
    let out = d.cli(&["create", "vol", &o, &c, "-b", "-f", "-c", "2"]);
    assert_eq!(
        out.trim(),
        format!(
            "export vol serves origin disk.img on {}",
            d.export_socket("vol").display()
        )
    );
    let mut client = Client::connect(&d.export_socket("vol")).unwrap();
    write_byte(&mut client, 0, 1);

    // snapshot -m (dms so)
    let out = d.cli(&["snapshot", "vol", "-m", "first memo"]);
    assert_eq!(out.trim(), "snapshot 1 of export vol created");
    write_byte(&mut client, 0, 2);

    // create NAME ORIGIN COW TAG (dms cs); relative paths are resolved by the CLI.
    let out = Command::new(&d.bin)
        .current_dir(dir.path())
        .arg("--rpc-socket")
        .arg(&d.rpc_socket)
        .args([
            "create",
            "snap1",
            "disk.img",
            "store.cow",
            "1",
            "--readonly",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("export snap1 serves snapshot 1"));

    // snapshot of a snapshot (dms ss), JSON output
    let v = json(&d, &["snapshot", "snap1", "-m", "child"]);
    assert_eq!(v["tag"], 2);

    // list: a tree with memos and exports
    let out = d.cli(&["list"]);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines[0],
        format!("origin disk.img ({o}) in {c}, exported as vol")
    );
    assert!(
        lines[1].contains("TAG") && lines[1].contains("MEMO"),
        "{out}"
    );
    assert!(
        lines[2].trim_start().starts_with("1 ")
            && lines[2].contains("origin")
            && lines[2].contains("snap1")
            && lines[2].ends_with("first memo"),
        "{out}"
    );
    assert!(
        lines[3].starts_with("    2 ") && lines[3].ends_with("child"),
        "child indented under its parent:\n{out}"
    );
    let out = d.cli(&["list", "snap1"]);
    assert!(out.contains("first memo"), "{out}");
    let v = json(&d, &["list", "vol"]);
    assert_eq!(v["origins"][0]["snapshots"].as_array().unwrap().len(), 2);

    // exports
    let out = d.cli(&["exports"]);
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines[0].starts_with("NAME") && lines[0].contains("SOCKET"),
        "{out}"
    );
    assert!(
        lines[1].starts_with("snap1 ") && lines[1].contains(" ro ") && lines[1].contains("waiting"),
        "{out}"
    );
    assert!(
        lines[2].starts_with("vol ")
            && lines[2].contains("4 MiB")
            && lines[2].contains("connected"),
        "{out}"
    );

    // status
    let out = d.cli(&["status"]);
    assert!(
        out.starts_with(&format!("store {c}: chunk 8 KiB, ")),
        "{out}"
    );
    assert!(
        out.contains("disk.img") && out.contains("snap1,vol"),
        "{out}"
    );
    let v = json(&d, &["status", "vol"]);
    assert_eq!(v["stores"][0]["origins"][0]["snapshots"], 2);

    // rollback (waits; no terminal here, so no progress line)
    let out = d.cli_output(&["rollback", "vol", "1"]);
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "export vol rolled back to snapshot 1"
    );
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(read_byte(&mut client, 0), vec![1; 4096]);
    // rollback -b returns at once
    let out = d.cli(&["rollback", "vol", "1", "-b"]);
    assert!(
        out.contains("rollback of export vol to snapshot 1 started in the background")
            || out.contains("export vol rolled back to snapshot 1"),
        "{out}"
    );

    // delete TAG (dms ds) of an exported snapshot is refused, with the reason
    let err = d.cli_fail(&["delete", "vol", "1"]);
    assert!(
        err.starts_with("snapmv: ") && err.contains("exported as snap1"),
        "{err}"
    );
    let out = d.cli(&["delete", "vol", "2"]);
    assert_eq!(out.trim(), "snapshot 2 of export vol deleted");

    // remove (dms remove)
    let out = d.cli(&["remove", "snap1"]);
    assert_eq!(out.trim(), "export snap1 removed");
    assert!(!d.export_socket("snap1").exists());

    // delete without TAG (dms do): refused while snapshots exist, then done.
    let err = d.cli_fail(&["delete", "vol"]);
    assert!(
        err.contains("it still has 1 snapshot; delete it first"),
        "{err}"
    );
    d.cli(&["create", "vol2", &o2, &c, "-b"]);
    let out = d.cli(&["delete", "vol2"]);
    assert_eq!(
        out.trim(),
        "origin of export vol2 unbound and export removed"
    );
    let v = json(&d, &["exports"]);
    assert_eq!(v["exports"].as_array().unwrap().len(), 1);

    // check: refused while the daemon has the store open (its lock); clean once no export uses
    // it (the daemon then closes it).
    let err = d.cli_fail(&["check", &c]);
    assert!(
        err.contains(&format!("COW store {c} is in use by process ")),
        "{err}"
    );
    drop(client);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(600);
    while json(&d, &["status", "vol"])["stores"][0]["origins"][0]
        .get("rollback")
        .is_some()
    {
        assert!(std::time::Instant::now() < deadline, "rollback never ends");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    // The guest is gone once the daemon has seen it leave (remove refuses a connected one).
    while json(&d, &["exports"])["exports"][0]["connected"] == true {
        assert!(
            std::time::Instant::now() < deadline,
            "the client never leaves"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    d.cli(&["remove", "vol"]);
    assert_eq!(d.cli(&["status"]), "no stores open\n");
    let out = d.cli(&["check", &c]);
    assert!(
        out.starts_with(&format!(
            "COW store {c} is clean: 1 origin(s), 1 snapshot(s), "
        )),
        "{out}"
    );
    // --json check
    let v = json(&d, &["check", &c]);
    assert_eq!(v["clean"], true);
    assert_eq!(v["problems"], serde_json::json!([]));
}

#[test]
fn help_on_every_verb() {
    let bin = snapmv_bin();
    for verb in [
        "serve", "create", "remove", "snapshot", "delete", "rollback", "list", "exports", "status",
        "check",
    ] {
        let out = Command::new(&bin).args([verb, "--help"]).output().unwrap();
        assert!(out.status.success(), "snapmv {verb} --help failed");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains(&format!("Usage: snapmv {verb}")),
            "snapmv {verb} --help:\n{text}"
        );
    }
    let out = Command::new(&bin).arg("--help").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("rollback") && text.contains("--rpc-socket"),
        "{text}"
    );
}

#[test]
fn usage_errors_and_unreachable_daemon() {
    let bin = snapmv_bin();
    // dms rules: -f needs -b; TAG excludes -b.
    let out = Command::new(&bin)
        .args(["create", "v", "/o", "/c", "-f"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = Command::new(&bin)
        .args(["create", "v", "/o", "/c", "3", "-b"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    // No daemon: the message names the socket.
    let dir = scratch("nodaemon");
    let sock = dir.path().join("none.sock");
    let out = Command::new(&bin)
        .env("SNAPMV_RPC_SOCKET", &sock)
        .arg("status")
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(3),
        "exit status 3: daemon not reachable"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot connect to the snapmv daemon at") && err.contains("none.sock"),
        "{err}"
    );
}

#[test]
fn rpc_socket_from_the_environment() {
    let dir = scratch("env");
    let d = Daemon::start(dir.path());
    let out = Command::new(&d.bin)
        .env("SNAPMV_RPC_SOCKET", &d.rpc_socket)
        .arg("exports")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "no exports\n");
}
