//! Operations through the daemon (issue 15): consistency groups (`snapshot_create` with
//! `names`, CLI `snapmv snapshot A B`), memo edit, export rename, the low-space threshold.

use serde_json::{json, Value};
use snapmv_rpc::codes;
use snapmv_tests::blkio_client::{run1, Client, NO_FLAGS};
use snapmv_tests::daemon::{scratch, sparse_file, Daemon};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::Arc;

const MIB: u64 = 1 << 20;
/// Sectors the writer cycles through (256 KiB).
const SECTORS: u64 = 512;

struct Fx {
    dir: tempfile::TempDir,
    d: Daemon,
}

impl Fx {
    fn new(name: &str) -> Fx {
        let dir = scratch(name);
        let d = Daemon::start(dir.path());
        Fx { dir, d }
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }

    /// Exports origin `NAME.img` (4 MiB) as `name`, in store `cow` (16 MiB; formatted by its
    /// first use).
    fn origin(&self, name: &str, cow: &str, format: bool) {
        let origin = self.path(&format!("{name}.img"));
        sparse_file(std::path::Path::new(&origin), 4 * MIB);
        let cow = self.path(cow);
        if format {
            sparse_file(std::path::Path::new(&cow), 16 * MIB);
        }
        self.d.ok(
            "origin_create",
            json!({"name": name, "origin": origin, "cow": cow, "bind": true, "format": format}),
        );
    }
}

fn sector(seq: u64) -> Vec<u8> {
    seq.to_le_bytes().repeat(64)
}

/// The writes (1..=n, write i at sector i % SECTORS) snapshot `tag` of origin `id` holds,
/// which must be a prefix; returns its length.
fn prefix(f: &Fx, id: &str, cow: &str, tag: u64) -> u64 {
    f.d.ok(
        "snapshot_export",
        json!({"name": "check", "origin_id": format!("{id}.img"), "cow": f.path(cow), "tag": tag}),
    );
    let mut c = Client::connect(&f.d.export_socket("check")).unwrap();
    let len = (SECTORS * 512) as usize;
    let p = c.ptr(0);
    assert_eq!(
        run1(&mut c.queues[0], |q| q.read(0, p, len, 0, NO_FLAGS)).unwrap(),
        0
    );
    let seqs: Vec<u64> = c.mem()[..len]
        .chunks(512)
        .map(|s| {
            let v = u64::from_le_bytes(s[..8].try_into().unwrap());
            assert_eq!(s, &sector(v)[..], "{id}: torn sector");
            v
        })
        .collect();
    drop(c);
    f.d.ok("export_remove", json!({"name": "check"}));
    let n = seqs.iter().copied().max().unwrap_or(0);
    for (s, &v) in seqs.iter().enumerate() {
        let want = if s as u64 <= n {
            n - (n - s as u64) % SECTORS
        } else {
            0
        };
        assert_eq!(
            v, want,
            "{id}: sector {s} holds write {v}, not a prefix of {n} writes"
        );
    }
    n
}

/// A guest-like writer writes A_i, waits for its completion, then B_i (A and B in two stores);
/// each group snapshot through the RPC must hold, for B_i, A_i too.
#[test]
fn group_snapshot_is_one_cut_across_two_stores() {
    let f = Fx::new("group");
    f.origin("a", "c1.img", true);
    f.origin("b", "c2.img", true);
    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicU64::new(0));
    let writer = {
        let socks = [f.d.export_socket("a"), f.d.export_socket("b")];
        let (stop, written) = (stop.clone(), written.clone());
        std::thread::spawn(move || {
            let mut cs: Vec<Client> = socks.iter().map(|s| Client::connect(s).unwrap()).collect();
            let mut i = 0;
            while !stop.load(SeqCst) {
                i += 1;
                for c in &mut cs {
                    c.mem()[..512].copy_from_slice(&sector(i));
                    let p = c.ptr(0);
                    let off = (i % SECTORS) * 512;
                    let r = run1(&mut c.queues[0], |q| q.write(off, p, 512, 0, NO_FLAGS));
                    assert_eq!(r.unwrap(), 0, "write {i}");
                }
                written.store(i, SeqCst);
            }
        })
    };
    let groups = snapmv_tests::env_u64("SNAPMV_RPC_GROUPS", 25);
    for g in 0..groups {
        // (b first: the daemon must not cut in the order given.)
        let r = f.d.ok(
            "snapshot_create",
            json!({"names": ["b", "a"], "memo": format!("g{g}")}),
        );
        let tags = r["tags"].as_array().unwrap();
        assert_eq!(
            (tags[0]["name"].as_str(), tags[1]["name"].as_str()),
            (Some("b"), Some("a"))
        );
        assert_eq!(r.get("tag"), None, "{r}");
        let (tb, ta) = (
            tags[0]["tag"].as_u64().unwrap(),
            tags[1]["tag"].as_u64().unwrap(),
        );
        let nb = prefix(&f, "b", "c2.img", tb);
        let na = prefix(&f, "a", "c1.img", ta);
        assert!(
            na >= nb && na <= nb + 1,
            "group {g}: cut violated: a holds {na} writes, b {nb}"
        );
        f.d.ok("snapshot_delete", json!({"name": "a", "tag": ta}));
        f.d.ok("snapshot_delete", json!({"name": "b", "tag": tb}));
    }
    stop.store(true, SeqCst);
    writer.join().unwrap();
    assert!(written.load(SeqCst) > groups, "the writer hardly ran");
}

/// The CLI form, and the refusals: a missing export fails the whole group (nothing kept,
/// the export named), `tag` with `names`, both `name` and `names`, a name twice.
#[test]
fn group_snapshot_cli_and_errors() {
    let f = Fx::new("group-cli");
    f.origin("a", "c1.img", true);
    f.origin("b", "c2.img", true);
    f.origin("c", "c1.img", false);
    let out =
        f.d.cli(&["--json", "snapshot", "a", "b", "c", "-m", "trio"]);
    let v: Value = serde_json::from_str(&out).unwrap();
    let names: Vec<&str> = v["tags"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["a", "b", "c"]);
    let text = f.d.cli(&["snapshot", "a", "b"]);
    assert!(
        text.contains("one instant") && text.contains("export b"),
        "{text}"
    );
    // `NAME TAG` keeps its meaning; --group takes "1" as an export name.
    let t = v["tags"][0]["tag"].as_u64().unwrap().to_string();
    let text = f.d.cli(&["snapshot", "a", &t]);
    assert!(text.contains(&format!("of snapshot {t}")), "{text}");
    let e = f.d.cli_fail(&["snapshot", "--group", "a", &t]);
    assert!(e.contains(&format!("export {t} not found")), "{e}");
    let e = f.d.err(
        "snapshot_create",
        json!({"names": ["a", "nope"]}),
        codes::NOT_FOUND,
    );
    assert!(e.contains("nope"), "{e}");
    f.d.err(
        "snapshot_create",
        json!({"names": ["a", "a"]}),
        codes::INVALID_PARAMS,
    );
    f.d.err(
        "snapshot_create",
        json!({"names": ["a"], "tag": 1}),
        codes::INVALID_PARAMS,
    );
    f.d.err(
        "snapshot_create",
        json!({"name": "a", "names": ["b"]}),
        codes::INVALID_PARAMS,
    );
    f.d.err("snapshot_create", json!({}), codes::INVALID_PARAMS);
    let l = f.d.ok("snapshot_list", json!({}));
    let count = |id: &str| {
        l["origins"]
            .as_array()
            .unwrap()
            .iter()
            .find(|o| o["origin_id"] == id)
            .unwrap()["snapshots"]
            .as_array()
            .unwrap()
            .len()
    };
    // a: trio, the pair, the snapshot of a snapshot; b: trio, pair; c: trio.
    assert_eq!(
        (count("a.img"), count("b.img"), count("c.img")),
        (3, 2, 1),
        "{l}"
    );
}

/// `snapshot_memo` (CLI `snapmv memo`): changed, listed, kept across a restart (a journal
/// record, durable when the call returns); bad tag, long memo refused.
#[test]
fn memo_edit_through_rpc_and_cli() {
    let mut f = Fx::new("memo");
    f.origin("a", "c1.img", true);
    let t =
        f.d.ok("snapshot_create", json!({"name": "a", "memo": "old"}))["tag"]
            .as_u64()
            .unwrap();
    let r = f.d.ok(
        "snapshot_memo",
        json!({"name": "a", "tag": t, "memo": "before upgrade"}),
    );
    assert_eq!(r, json!({"name": "a", "tag": t, "memo": "before upgrade"}));
    let out =
        f.d.cli(&["memo", "a", &t.to_string(), "kept across restarts"]);
    assert!(out.contains("memo set to"), "{out}");
    f.d.err(
        "snapshot_memo",
        json!({"name": "a", "tag": 99, "memo": "x"}),
        codes::NOT_FOUND,
    );
    f.d.err(
        "snapshot_memo",
        json!({"name": "a", "tag": t, "memo": "m".repeat(300)}),
        codes::INVALID_PARAMS,
    );
    f.d.kill();
    f.d.restart();
    let l = f.d.ok("snapshot_list", json!({"name": "a"}));
    assert_eq!(
        l["origins"][0]["snapshots"][0]["memo"], "kept across restarts",
        "{l}"
    );
}

/// `export_rename` (CLI `snapmv rename`) while a client is connected and writing: the client
/// goes on, the counters follow the new name, the socket path and the serial stay, a restart
/// serves the new name on the old socket, and the old name is refused for a new export.
#[test]
fn export_rename_keeps_the_socket_and_the_client() {
    let mut f = Fx::new("rename");
    f.origin("a", "c1.img", true);
    let sock = f.d.export_socket("a");
    let mut c = Client::connect(&sock).unwrap();
    let write = |c: &mut Client, n: u64| {
        c.mem()[..4096].fill(n as u8);
        let p = c.ptr(0);
        assert_eq!(
            run1(&mut c.queues[0], |q| q.write(
                n * 4096,
                p,
                4096,
                0,
                NO_FLAGS
            ))
            .unwrap(),
            0
        );
    };
    write(&mut c, 1);
    let v =
        f.d.ok("export_rename", json!({"name": "a", "new_name": "vm1"}));
    assert_eq!(
        (v["name"].as_str(), v["serial"].as_str()),
        (Some("vm1"), Some("a")),
        "{v}"
    );
    assert_eq!(v["socket"].as_str(), Some(sock.to_str().unwrap()));
    assert_eq!(v["connected"], true, "{v}");
    write(&mut c, 2);
    let s = f.d.ok("stats", json!({"name": "vm1"}));
    assert_eq!(
        s["exports"][0]["writes"], 2,
        "counters survive the rename: {s}"
    );
    f.d.err("stats", json!({"name": "a"}), codes::NOT_FOUND);
    // The old name is the disk's serial now: refused for another export and as a new name.
    let e = f.d.err(
        "export_rename",
        json!({"name": "vm1", "new_name": "a"}),
        codes::ALREADY_EXISTS,
    );
    assert!(e.contains("serial"), "{e}");
    f.d.err(
        "export_rename",
        json!({"name": "nope", "new_name": "x"}),
        codes::NOT_FOUND,
    );
    f.d.err(
        "export_rename",
        json!({"name": "vm1", "new_name": "a/b"}),
        codes::INVALID_PARAMS,
    );
    f.origin("b", "c2.img", true);
    f.d.err(
        "export_rename",
        json!({"name": "vm1", "new_name": "b"}),
        codes::ALREADY_EXISTS,
    );
    let out = f.d.cli(&["rename", "vm1", "vm-one"]);
    assert!(out.contains("renamed to vm-one"), "{out}");
    drop(c);
    f.d.kill();
    f.d.restart();
    let l = f.d.ok("export_list", json!({}));
    let e = l["exports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "vm-one")
        .expect("renamed export after a restart");
    assert_eq!(e["serial"], "a");
    assert_eq!(e["socket"].as_str(), Some(sock.to_str().unwrap()));
    let mut c = Client::connect(&sock).unwrap();
    let p = c.ptr(0);
    assert_eq!(
        run1(&mut c.queues[0], |q| q.read(2 * 4096, p, 4096, 0, NO_FLAGS)).unwrap(),
        0
    );
    assert!(
        c.mem()[..4096].iter().all(|&b| b == 2),
        "data written after the rename"
    );
}

/// The low-space threshold (`serve --low-space-percent`): a store whose chunks in use cross it
/// is shown low in `status`, `stats` and Prometheus, logged once going up (however often it
/// is looked at) and once coming back under after a snapshot delete frees its copy-outs.
#[test]
fn low_space_threshold_is_shown_and_logged_once_per_crossing() {
    let dir = scratch("low-space");
    let d = Daemon::start_with(
        dir.path(),
        &[
            "--low-space-percent",
            "5",
            "--metrics-listen",
            "127.0.0.1:0",
        ],
    );
    let origin = dir.path().join("a.img");
    let cow = dir.path().join("c.img");
    // Data in the origin: a copy-out of a zero chunk takes no store chunk.
    std::fs::write(&origin, vec![7u8; 4 * MIB as usize]).unwrap();
    sparse_file(&cow, 16 * MIB);
    d.cli(&[
        "create",
        "a",
        origin.to_str().unwrap(),
        cow.to_str().unwrap(),
        "-b",
        "-f",
    ]);
    let store = |d: &Daemon| d.ok("stats", json!({}))["stores"][0].clone();
    let s = store(&d);
    assert_eq!(
        (s["low_space"].as_bool(), s["low_space_percent"].as_u64()),
        (Some(false), Some(5)),
        "{s}"
    );
    let t = d.ok("snapshot_create", json!({"name": "a"}))["tag"]
        .as_u64()
        .unwrap();
    // 2 MiB of first writes: 512 copy-outs of 4 KiB, past 5 % of the store's chunks.
    let mut c = Client::connect(&d.export_socket("a")).unwrap();
    c.mem()[..MIB as usize].fill(9);
    let p = c.ptr(0);
    for off in [0, MIB] {
        assert_eq!(
            run1(&mut c.queues[0], |q| q.write(
                off,
                p,
                MIB as usize,
                0,
                NO_FLAGS
            ))
            .unwrap(),
            0
        );
    }
    assert_eq!(run1(&mut c.queues[0], |q| q.flush(0, NO_FLAGS)).unwrap(), 0);
    for _ in 0..3 {
        let s = store(&d);
        assert_eq!(s["low_space"], true, "{s}");
    }
    let st = d.ok("status", json!({}));
    assert_eq!(st["stores"][0]["low_space"], true, "{st}");
    assert!(d.cli(&["status"]).contains("LOW ON SPACE (threshold 5%)"));
    let log = d.log();
    let url = log
        .lines()
        .find_map(|l| l.split("metrics served on ").nth(1))
        .unwrap_or_else(|| panic!("no metrics address in the log:\n{log}"))
        .trim()
        .to_string();
    let text = ureq::get(&url)
        .call()
        .expect("scrape")
        .body_mut()
        .read_to_string()
        .unwrap();
    let gauge = |text: &str, name: &str| {
        text.lines()
            .find(|l| l.starts_with(&format!("{name}{{")))
            .and_then(|l| l.rsplit(' ').next())
            .map(str::to_string)
            .unwrap_or_else(|| panic!("no {name} in:\n{text}"))
    };
    assert_eq!(gauge(&text, "snapmv_store_low_space"), "1");
    assert_eq!(
        gauge(&text, "snapmv_store_low_space_threshold_ratio"),
        "0.05"
    );
    assert_eq!(d.log().matches("is low on space").count(), 1, "{}", d.log());
    // The delete frees the copy-outs (in the background): back under, logged once.
    drop(c);
    d.ok(
        "snapshot_delete",
        json!({"name": "a", "tag": t, "sync": true}),
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while store(&d)["low_space"] == true {
        assert!(
            std::time::Instant::now() < deadline,
            "still low after the delete: {}",
            store(&d)
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    std::thread::sleep(std::time::Duration::from_millis(1500)); // a poll of the watch thread
    let log = d.log();
    assert_eq!(log.matches("is low on space").count(), 1, "{log}");
    assert_eq!(
        log.matches("back under the low-space threshold").count(),
        1,
        "{log}"
    );
    let text = ureq::get(&url)
        .call()
        .expect("scrape")
        .body_mut()
        .read_to_string()
        .unwrap();
    assert_eq!(gauge(&text, "snapmv_store_low_space"), "0");
}

/// The engine's counters in `stats` and Prometheus equal what a client did: one copy-out per
/// chunk first written after a snapshot (6 here, the rewrites none), commit rounds counted
/// with their latency, nothing left pending after a flush.
#[test]
fn engine_counters_in_stats_equal_what_a_client_did() {
    let dir = scratch("engine-counters");
    let d = Daemon::start_with(dir.path(), &["--metrics-listen", "127.0.0.1:0"]);
    let origin = dir.path().join("a.img");
    let cow = dir.path().join("c.img");
    sparse_file(&origin, 4 * MIB);
    sparse_file(&cow, 16 * MIB);
    d.cli(&[
        "create",
        "a",
        origin.to_str().unwrap(),
        cow.to_str().unwrap(),
        "-b",
        "-f",
    ]);
    let mut c = Client::connect(&d.export_socket("a")).unwrap();
    let p = c.ptr(0);
    c.mem()[..8192].fill(1);
    d.ok("snapshot_create", json!({"name": "a", "sync": true}));
    for round in 0..2 {
        for chunk in [0u64, 1, 2, 10, 11, 200] {
            let len = if round == 0 { 4096 } else { 512 };
            let r = run1(&mut c.queues[0], |q| {
                q.write(chunk * 4096, p, len, 0, NO_FLAGS)
            });
            assert_eq!(r.unwrap(), 0);
        }
    }
    assert_eq!(run1(&mut c.queues[0], |q| q.flush(0, NO_FLAGS)).unwrap(), 0);
    let s = d.ok("stats", json!({"name": "a"}));
    let st = &s["stores"][0];
    let o = &st["origins"][0];
    assert_eq!(o["origin_id"], "a.img", "{s}");
    assert_eq!(o["copy_outs"], 6, "{s}");
    assert_eq!(
        (o["overlay_chunks"].as_u64(), o["overlay_bytes"].as_u64()),
        (Some(0), Some(0)),
        "{s}"
    );
    let commits = st["commits"].as_u64().unwrap();
    assert!(commits > 0, "{s}");
    assert_eq!(
        st["commit_latency_us"]["count"].as_u64(),
        Some(commits),
        "{s}"
    );
    assert!(
        st["commit_latency_us"]["p99"].as_f64().unwrap() > 0.0,
        "{s}"
    );
    let text = d.cli(&["stats", "a"]);
    assert!(text.contains("origin a.img: 6 copy-outs"), "{text}");
    let log = d.log();
    let url = log
        .lines()
        .find_map(|l| l.split("metrics served on ").nth(1))
        .unwrap_or_else(|| panic!("no metrics address in the log:\n{log}"))
        .trim()
        .to_string();
    let text = ureq::get(&url)
        .call()
        .expect("scrape")
        .body_mut()
        .read_to_string()
        .unwrap();
    let line = text
        .lines()
        .find(|l| l.starts_with("snapmv_origin_copy_outs_total{"))
        .unwrap_or_else(|| panic!("no copy-outs in:\n{text}"));
    assert!(
        line.contains("origin=\"a.img\"") && line.ends_with(" 6"),
        "{line}"
    );
    assert!(text.contains("snapmv_store_commits_total{"), "{text}");
    assert!(
        text.contains("snapmv_store_commit_latency_seconds{"),
        "{text}"
    );
}
