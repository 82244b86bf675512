//! QEMU guest (TCG) end-to-end: live migration of a writing guest between two daemons
//! (docs/migration.md). Two daemons on this machine, each with its own state directory and
//! management socket, stand for two hosts sharing the origin and store files.
//!
//! The guest writes sequence-numbered 4 KiB blocks (`B <block> SEQ <n>`, O_DIRECT, a flush
//! every 8th write) on a 2-queue vhost-user-blk disk served by daemon A, reads each back
//! (O_DIRECT: the backend writes guest pages) and prints `W <n>` once both completed. A snapshot is taken on A. Daemon B creates the export with
//! `--incoming`; QEMU B starts with `-incoming` and connects to it; an `acquire` on B while A
//! still holds the store fails with a clear error. QMP `migrate` moves the guest from QEMU A
//! to QEMU B (dirty logging of the pages the backend writes); once QEMU A reports
//! `completed`, `snapmv release` on A hands the store and the guest's cache mode over to
//! `snapmv acquire` on B (the guest resumed on B meanwhile: its requests wait for the store). The guest keeps writing on B, then reads its whole ring back: every write it
//! saw acknowledged, on A or on B, must be there, in the guest and in the origin file once
//! both daemons stopped; the snapshot taken on A is listed on B and holds an exact cut.

use std::collections::BTreeMap;
use std::path::Path;

use snapmv_tests::blkio_client::{run1, Client, ClientOptions, NO_FLAGS};
use snapmv_tests::daemon::{scratch, sparse_file, Daemon};
use snapmv_tests::qemu::{
    cli_json, guest_tools, snapshot_tag, Disk, GuestConfig, GuestOutput, Qmp,
};

const TEST: &str = "e2e_migrate::a_writing_guest_migrates_between_two_daemons";
const MIB: u64 = 1 << 20;
const BLOCK: usize = 4096;
/// Blocks in the guest's ring (16 MiB): more than the guest writes, so no write is
/// overwritten and every acknowledged one can be checked.
const R: u64 = 4096;
/// Length of a block header, `B <6 digits> SEQ <8 digits>\n`; NULs follow.
const HEADER: usize = 22;
/// Writes the guest makes on B before it is told to stop.
const WRITES_ON_B: u64 = 150;

/// Writes block `n % R` for n = 1, 2, … until `stop` arrives on the console, then reads the
/// ring back with O_DIRECT and prints every block header as `vda B <block> SEQ <n>`.
const GUEST: &str = r#"
stty -echo < /dev/console 2>/dev/null
( while read cmd; do case "$cmd" in stop) touch /tmp/cmd-stop ;; esac; done < /dev/console ) &
n=0
while [ ! -e /tmp/cmd-stop ]; do
    n=$((n + 1))
    i=$((n % R))
    printf 'B %06d SEQ %08d\n' $i $n > /tmp/b
    if [ $((n % 8)) = 0 ]; then conv=sync,fsync; else conv=sync; fi
    dd if=/tmp/b of=/dev/vda bs=4096 seek=$i conv=$conv oflag=direct 2>/tmp/e || { echo "SNAPMV-GUEST-ERROR write $n: $(cat /tmp/e)"; exit 22; }
    # Read the block back (O_DIRECT: the device writes into the guest's buffer, pages the
    # migration must send again).
    dd if=/dev/vda bs=4096 skip=$i count=1 iflag=direct 2>/tmp/e | tr -d '\000' > /tmp/r || { echo "SNAPMV-GUEST-ERROR read $n: $(cat /tmp/e)"; exit 23; }
    cmp -s /tmp/r /tmp/b || { echo "SNAPMV-GUEST-ERROR read $n: block $i holds $(cat /tmp/r)"; exit 24; }
    echo "W $n"
done
echo "STOPPED END $n"
dd if=/dev/vda of=/tmp/img bs=4096 count=$R iflag=direct 2>/tmp/e || { echo "SNAPMV-GUEST-ERROR read back: $(cat /tmp/e)"; exit 31; }
tr -d '\000' < /tmp/img | grep -a '^B ' | sed 's/^/vda /'
echo "READ BACK"
"#;

/// Block → sequence number of the header found there.
type BlockMap = BTreeMap<u64, u64>;

/// `<prefix><n>` → n.
fn seq_of(line: &str, prefix: &str) -> Option<u64> {
    line.trim().strip_prefix(prefix)?.trim().parse().ok()
}

/// What the ring holds after writes 1..=end (no wrap: `end` < R).
fn expected(end: u64) -> BlockMap {
    assert!(
        end < R,
        "the guest wrote {end} blocks, more than its ring of {R}"
    );
    (1..=end).map(|n| (n % R, n)).collect()
}

/// The headers of an image of the ring, each checked to sit in its own block.
fn blocks_of(img: &[u8]) -> Result<BlockMap, String> {
    let mut map = BlockMap::new();
    for (b, blk) in img.chunks(BLOCK).enumerate() {
        let b = b as u64;
        if blk.iter().all(|&x| x == 0) {
            continue;
        }
        let text = String::from_utf8_lossy(&blk[..HEADER]);
        let want = format!("B {b:06} SEQ ");
        let n = text
            .strip_prefix(&want)
            .and_then(|r| r.strip_suffix('\n'))
            .and_then(|r| r.parse::<u64>().ok())
            .ok_or_else(|| format!("block {b}: unexpected content {text:?}"))?;
        if blk[HEADER..].iter().any(|&x| x != 0) {
            return Err(format!("block {b}: garbage after the header"));
        }
        map.insert(b, n);
    }
    Ok(map)
}

/// The `vda B <block> SEQ <n>` lines the guest printed.
fn guest_blocks(out: &GuestOutput) -> Result<BlockMap, String> {
    let mut map = BlockMap::new();
    for l in out.values("vda B ") {
        let mut it = l.split_whitespace();
        match (it.next(), it.next(), it.next(), it.next()) {
            (Some(b), Some("SEQ"), Some(n), None) => {
                let (b, n): (u64, u64) = match (b.parse(), n.parse()) {
                    (Ok(b), Ok(n)) => (b, n),
                    _ => return Err(format!("malformed header line {l:?}")),
                };
                if n % R != b {
                    return Err(format!("header {l:?} cannot be at block {b}"));
                }
                map.insert(b, n);
            }
            _ => return Err(format!("malformed header line {l:?}")),
        }
    }
    Ok(map)
}

fn first_difference(got: &BlockMap, want: &BlockMap) -> Option<String> {
    (0..R).find_map(|b| {
        let (g, w) = (got.get(&b), want.get(&b));
        (g != w).then(|| format!("block {b}: found seq {g:?}, expected {w:?}"))
    })
}

/// Reads `len` bytes of export `name` of `daemon` through a vhost-user client.
fn read_export(daemon: &Daemon, name: &str, len: usize, read_only: bool) -> Vec<u8> {
    let mut cl = Client::connect_with(
        &daemon.export_socket(name),
        &ClientOptions {
            region_len: len,
            read_only,
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("connect to export {name}: {e}"));
    let p = cl.ptr(0);
    let ret = run1(&mut cl.queues[0], |q| q.read(0, p, len, 0, NO_FLAGS)).unwrap();
    assert_eq!(ret, 0, "read export {name}");
    cl.mem()[..len].to_vec()
}

fn guest_config(label: &str, initrd: &Path, socket: &Path, qmp: &Path) -> GuestConfig {
    let mut cfg = GuestConfig::new(
        label,
        initrd,
        vec![Disk {
            socket: socket.to_path_buf(),
            queues: 2,
        }],
    );
    cfg.stdin = true;
    cfg.mem = Some("256M".into());
    cfg.qmp = Some(qmp.to_path_buf());
    cfg.append = format!("R={R}");
    cfg
}

#[test]
fn a_writing_guest_migrates_between_two_daemons() {
    let Some(tools) = guest_tools(TEST) else {
        return;
    };
    let shared = scratch("e2e-migrate");
    let root = shared.path();
    let (dir_a, dir_b) = (root.join("host-a"), root.join("host-b"));
    for d in [&dir_a, &dir_b] {
        std::fs::create_dir(d).unwrap_or_else(|e| panic!("create {}: {e}", d.display()));
    }
    let mut a = Daemon::start(&dir_a);
    let mut b = Daemon::start(&dir_b);
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        body(&tools, root, &mut a, &mut b)
    }));
    if let Err(panic) = result {
        for (name, d) in [("A", &a), ("B", &b)] {
            let log = d.log();
            let tail: Vec<&str> = log.lines().rev().take(80).collect();
            eprintln!(
                "{TEST}: --- last lines of daemon {name}'s log ---\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        std::panic::resume_unwind(panic);
    }
}

fn body(tools: &snapmv_tests::qemu::GuestTools, root: &Path, a: &mut Daemon, b: &mut Daemon) {
    let origin = root.join("vol.origin");
    let cow = root.join("vol.cow");
    sparse_file(&origin, 2 * R * BLOCK as u64);
    sparse_file(&cow, 64 * MIB);
    let (o, c) = (origin.display().to_string(), cow.display().to_string());
    a.cli(&["create", "vol", &o, &c, "-b", "-f", "-q", "2"]);
    let initrd = tools.initramfs(root, "migrate", GUEST);
    let (qmp_a_path, qmp_b_path) = (root.join("qmp-a.sock"), root.join("qmp-b.sock"));
    let mig = root.join("migrate.sock");

    // The guest writes on A; a snapshot on A while it does.
    let mut guest_a = tools.spawn(&guest_config(
        "guest-on-a",
        &initrd,
        &a.export_socket("vol"),
        &qmp_a_path,
    ));
    let mut qmp_a = Qmp::connect("QEMU A", &qmp_a_path);
    let mut last_a = guest_a.wait_for("40 writes on A", |l| seq_of(l, "W ").filter(|n| *n >= 40));
    let tag = snapshot_tag(a, "vol");
    let seen_at_snapshot = last_a;
    last_a = guest_a.wait_for("40 more writes on A", |l| {
        seq_of(l, "W ").filter(|n| *n >= seen_at_snapshot + 40)
    });

    // B: the export waits for its store; QEMU B connects to it and waits for the migration.
    let e = cli_json(b, &["create", "vol", &o, &c, "--incoming", "-q", "2"]);
    assert!(
        e["error"]
            .as_str()
            .is_some_and(|w| w.contains("waiting for COW store")),
        "incoming export: {e}"
    );
    let mut cfg_b = guest_config("guest-on-b", &initrd, &b.export_socket("vol"), &qmp_b_path);
    cfg_b.incoming = Some(format!("unix:{}", mig.display()));
    let mut guest_b = tools.spawn(&cfg_b);
    let mut qmp_b = Qmp::connect("QEMU B", &qmp_b_path);
    let st = qmp_b.execute("query-status", serde_json::json!({}));
    assert_eq!(
        st["status"], "inmigrate",
        "QEMU B is not waiting for a migration: {st}"
    );
    // While A holds the store, B cannot take it: a clear error, after the timeout.
    let err = b.cli_fail(&["acquire", "vol", "--timeout", "1"]);
    assert!(
        err.contains("still held by") && err.contains("snapmv release vol"),
        "acquire while A holds the store: {err}"
    );

    // Migrate while the guest writes; QEMU A must agree (it refuses a vhost-user device
    // without dirty logging).
    qmp_a.execute(
        "migrate",
        serde_json::json!({"uri": format!("unix:{}", mig.display())}),
    );
    let done = qmp_a.wait_migration();
    eprintln!("{TEST}: migration completed: {done}");
    // Every write the guest saw complete on A (its console on A ends at the switch-over).
    let console_a = guest_a.console();
    for l in console_a.lines() {
        if let Some(n) = seq_of(l, "W ") {
            last_a = last_a.max(n);
        }
    }
    // The handover: A releases (reporting the guest's cache mode), B acquires with it.
    let released = cli_json(a, &["release", "vol"]);
    let mode = match released["writeback"].as_bool() {
        Some(true) => "--writeback",
        Some(false) => "--write-through",
        None => panic!("release on A: {released}"),
    };
    let acquired = cli_json(b, &["acquire", "vol", "--timeout", "120", mode]);
    assert!(
        acquired["name"] == "vol" && acquired["error"].is_null(),
        "acquire on B: {acquired}"
    );
    let exports_a = cli_json(a, &["exports"]);
    assert_eq!(
        exports_a["exports"].as_array().map(Vec::len),
        Some(0),
        "A still lists the released export: {exports_a}"
    );
    // QEMU A, paused after the migration, has lost its disk's backend; it may have exited
    // already (reported, not asserted: the guest runs on B).
    let was_there = qmp_a.quit();
    let out_a = guest_a.finish();
    if !was_there {
        let tail: Vec<&str> = out_a.console.lines().rev().take(5).collect();
        eprintln!(
            "{TEST}: QEMU A had exited by itself after the release (status {:?}); last lines: {tail:?}",
            out_a.status
        );
    }
    assert!(
        out_a.values("SNAPMV-GUEST-ERROR").is_empty(),
        "the guest failed on A:\n{}",
        out_a.console
    );

    // The guest goes on writing on B.
    let first_b = guest_b.wait_for("a write on B", |l| seq_of(l, "W "));
    assert!(
        first_b > seen_at_snapshot,
        "first write seen on B is {first_b}"
    );
    guest_b.wait_for("writes on B", |l| {
        seq_of(l, "W ").filter(|n| *n >= first_b + WRITES_ON_B)
    });
    guest_b.send_line("stop");
    let end = guest_b.wait_for("STOPPED", |l| seq_of(l, "STOPPED END "));
    let out_b = guest_b.finish();
    out_b.assert_ok("guest-on-b");
    eprintln!(
        "{TEST}: {last_a} writes completed on A, {} in all; snapshot {tag} after write {seen_at_snapshot}",
        end
    );
    let want = expected(end);
    let got = guest_blocks(&out_b).unwrap_or_else(|e| panic!("guest read-back on B: {e}"));
    if let Some(d) = first_difference(&got, &want) {
        panic!("the guest on B reads back something else than it wrote: {d}");
    }

    // The snapshot taken on A is listed and readable on B: an exact cut no earlier than the
    // writes seen before it was asked for.
    let list = b.cli(&["list", "vol"]);
    assert!(
        list.split(|ch: char| !ch.is_ascii_digit())
            .any(|w| w == tag.to_string()),
        "snapmv list vol on B does not show tag {tag}:\n{list}"
    );
    b.cli(&["create", "snap", &o, &c, &tag.to_string(), "-r"]);
    let img = read_export(b, "snap", R as usize * BLOCK, true);
    b.cli(&["remove", "snap"]);
    let snap = blocks_of(&img).unwrap_or_else(|e| panic!("snapshot {tag}: {e}"));
    let k = snap.len() as u64;
    if let Some(d) = first_difference(&snap, &expected(k)) {
        panic!("snapshot {tag} is not one point in time: {d}");
    }
    assert!(
        k >= seen_at_snapshot && k <= end,
        "snapshot {tag} holds writes 1..={k}, but write {seen_at_snapshot} had completed before it was taken"
    );

    // Both daemons stop: the origin file holds every acknowledged write.
    let st = a.terminate();
    assert!(st.success(), "daemon A exited with {st}");
    let st = b.terminate();
    assert!(st.success(), "daemon B exited with {st}");
    let data = std::fs::read(&origin).expect("read the origin file");
    let on_file =
        blocks_of(&data[..R as usize * BLOCK]).unwrap_or_else(|e| panic!("origin file: {e}"));
    if let Some(d) = first_difference(&on_file, &want) {
        panic!("the origin file after both daemons stopped: {d}");
    }
}
