//! QEMU guest end-to-end tests (TCG): real Linux guests with `vhost-user-blk-pci` disks served
//! by `snapmv serve`, managed through the `snapmv` CLI.
//!
//! - `origin_export_size_queues_and_data_survive_reboot` (issue 4): the guest sees the right
//!   size, writes a known pattern with O_DIRECT, checksums it, powers off; a second boot (with
//!   two queues) verifies the checksum and sees two blk-mq queues; the host finds the pattern in
//!   the origin file, in place.
//! - `live_snapshots_and_rollback_under_guest_writes` (issue 5): a guest writes
//!   sequence-numbered blocks continuously; the test takes two snapshots with the CLI, exports
//!   them, a second guest verifies each is an exact point-in-time cut; then the origin is rolled
//!   back while the first guest keeps writing, and a third guest verifies the result.
//!
//! Missing QEMU is a loud skip without `CI`, a failure with `CI=true` (see
//! `snapmv_tests::qemu::guest_tools`). Set `SNAPMV_E2E_ECHO=1` to see the guests' consoles.

use std::collections::BTreeMap;
use std::path::Path;

use snapmv_tests::daemon::{scratch, sparse_file, Daemon};
use snapmv_tests::qemu::{
    guest_tools, sha256_hex, snapshot_tag, wait_rollback_done, Disk, GuestConfig, GuestOutput,
    GuestTools,
};

const MIB: u64 = 1024 * 1024;
const BLOCK: usize = 4096;

/// Sparse origin and store files, then `snapmv create NAME ORIGIN COW -b -f EXTRA…`.
fn create_origin(
    daemon: &Daemon,
    dir: &Path,
    name: &str,
    size: u64,
    extra: &[&str],
) -> (String, String) {
    let origin = dir.join(format!("{name}.origin"));
    let cow = dir.join(format!("{name}.cow"));
    sparse_file(&origin, size);
    sparse_file(&cow, 4 * size);
    let (o, c) = (origin.display().to_string(), cow.display().to_string());
    let mut args = vec!["create", name, &o, &c, "-b", "-f"];
    args.extend_from_slice(extra);
    daemon.cli(&args);
    (o, c)
}

// ---------------------------------------------------------------------------------------------
// (a) size, queues, a pattern written with O_DIRECT survives a reboot

/// Guest script: report size and queues; with MODE=write write the pattern (8 MiB at 1 MiB,
/// 1 MiB at the very end of the disk) with O_DIRECT and fsync (a FLUSH); always read both
/// regions back with O_DIRECT and print their sha256.
const PATTERN_GUEST: &str = r#"
SIZE=$(cat /sys/block/vda/size)
echo "SIZE $SIZE"
echo "QUEUES $(ls /sys/block/vda/mq | wc -l)"
END_BLK=$((SIZE / 8 - 256))
if [ "$MODE" = write ]; then
    yes 'snapmv e2e pattern 0123456789abcdef' | head -c 8388608 > /tmp/p
    dd if=/tmp/p of=/dev/vda bs=64k seek=16 oflag=direct conv=fsync 2>/dev/null || exit 11
    head -c 1048576 /tmp/p | dd of=/dev/vda bs=4096 seek=$END_BLK oflag=direct conv=fsync 2>/dev/null || exit 12
    echo "WROTE"
fi
echo "SUM $(dd if=/dev/vda bs=64k skip=16 count=128 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)"
echo "TAILSUM $(dd if=/dev/vda bs=4096 skip=$END_BLK count=256 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)"
"#;

fn pattern(len: usize) -> Vec<u8> {
    let line = b"snapmv e2e pattern 0123456789abcdef\n";
    line.iter().copied().cycle().take(len).collect()
}

#[test]
fn origin_export_size_queues_and_data_survive_reboot() {
    pattern_test(
        "e2e_qemu::origin_export_size_queues_and_data_survive_reboot",
        &[],
        false,
    );
}

/// The same with O_DIRECT on the origin and store files, 64 KiB chunks, and a snapshot taken
/// between the boots (so the second boot reads an origin that has a snapshot).
#[test]
fn direct_io_export_with_snapshot_data_survives_reboot() {
    pattern_test(
        "e2e_qemu::direct_io_export_with_snapshot_data_survives_reboot",
        &["--direct", "-c", "16"],
        true,
    );
}

fn pattern_test(test: &str, create_flags: &[&str], snapshot_between: bool) {
    let Some(tools) = guest_tools(test) else {
        return;
    };
    const SIZE: u64 = 64 * MIB;
    let dir = scratch("e2e-pattern");
    let daemon = Daemon::start(dir.path());
    let (origin, _cow) = create_origin(&daemon, dir.path(), "vol", SIZE, create_flags);
    let sock = daemon.export_socket("vol");
    let initrd = tools.initramfs(dir.path(), "pattern", PATTERN_GUEST);

    let expect_sum = sha256_hex(&pattern(8 * MIB as usize));
    let expect_tail = sha256_hex(&pattern(MIB as usize));

    // Boot 1: one queue, write and checksum.
    let mut cfg = GuestConfig::new(
        "boot1",
        &initrd,
        vec![Disk {
            socket: sock.clone(),
            queues: 1,
        }],
    );
    cfg.append = "MODE=write".into();
    let out = tools.run(&cfg);
    out.assert_ok("boot1");
    assert_eq!(
        out.value("boot1", "SIZE "),
        (SIZE / 512).to_string(),
        "boot1: guest disk size in sectors"
    );
    assert_eq!(
        out.value("boot1", "QUEUES "),
        "1",
        "boot1: blk-mq queues with num-queues=1"
    );
    assert_eq!(out.value("boot1", "WROTE"), "");
    assert_eq!(
        out.value("boot1", "SUM "),
        expect_sum,
        "boot1: pattern read back at 1 MiB"
    );
    assert_eq!(
        out.value("boot1", "TAILSUM "),
        expect_tail,
        "boot1: pattern read back at the end"
    );

    if snapshot_between {
        let tag = snapshot_tag(&daemon, "vol");
        eprintln!("{test}: snapshot {tag} taken between the boots");
    }

    // Boot 2: a fresh guest (new connection on the same socket), two vCPUs and two queues.
    let mut cfg = GuestConfig::new(
        "boot2",
        &initrd,
        vec![Disk {
            socket: sock.clone(),
            queues: 2,
        }],
    );
    cfg.smp = 2;
    let out = tools.run(&cfg);
    out.assert_ok("boot2");
    assert_eq!(
        out.value("boot2", "SIZE "),
        (SIZE / 512).to_string(),
        "boot2: guest disk size"
    );
    assert_eq!(
        out.value("boot2", "QUEUES "),
        "2",
        "boot2: blk-mq queues with num-queues=2"
    );
    assert!(out.values("WROTE").is_empty(), "boot2 must not write");
    assert_eq!(
        out.value("boot2", "SUM "),
        expect_sum,
        "boot2: pattern after reboot"
    );
    assert_eq!(
        out.value("boot2", "TAILSUM "),
        expect_tail,
        "boot2: tail pattern after reboot"
    );

    // The origin is kept in place: with the export removed, the host reads the pattern there.
    daemon.cli(&["remove", "vol"]);
    let data = std::fs::read(&origin).expect("read origin file");
    assert_eq!(data.len() as u64, SIZE, "origin file size");
    assert!(
        data[MIB as usize..9 * MIB as usize] == pattern(8 * MIB as usize)[..],
        "origin file does not hold the pattern at 1 MiB"
    );
    assert!(
        data[(SIZE - MIB) as usize..] == pattern(MIB as usize)[..],
        "origin file does not hold the pattern in its last MiB"
    );
    assert!(
        data[..MIB as usize].iter().all(|&b| b == 0),
        "origin file's first MiB was never written but is not zero"
    );
}

// ---------------------------------------------------------------------------------------------
// (b) live snapshots and rollback while a guest writes

/// Blocks in one ring. The disk holds two rings: phase 1 writes ring 0 (blocks 0..R), phase 2
/// writes ring 1 (blocks R..2R).
const R: u64 = 2048;

/// Writer guest: prefills both rings with "PREFILL\n" text, then writes block `base + n % R`
/// for n = 1, 2, … with the header `B <block> SEQ <n>` (NUL-padded to 4 KiB, O_DIRECT), one
/// at a time, printing `W <n>` after each completes. Lines sent on the console: `phase2`
/// switches to ring 1 (prints `PHASE2 AFTER <n>`), `stop` ends (prints `STOPPED END <n>`).
const WRITER_GUEST: &str = r#"
stty -echo < /dev/console 2>/dev/null
yes PREFILL | dd of=/dev/vda bs=1M count=$((2 * R / 256)) iflag=fullblock oflag=direct conv=fsync 2>/dev/null || exit 21
echo PREFILLED
( while read cmd; do case "$cmd" in phase2|stop) touch "/tmp/cmd-$cmd" ;; esac; done < /dev/console ) &
n=0
base=0
while [ ! -e /tmp/cmd-stop ]; do
    if [ $base = 0 ] && [ -e /tmp/cmd-phase2 ]; then
        base=$R
        echo "PHASE2 AFTER $n"
    fi
    n=$((n + 1))
    i=$((base + n % R))
    printf 'B %06d SEQ %08d\n' $i $n > /tmp/b
    dd if=/tmp/b of=/dev/vda bs=4096 seek=$i conv=sync oflag=direct 2>/dev/null || { echo "WRITE FAILED $n"; exit 22; }
    echo "W $n"
done
echo "STOPPED END $n"
"#;

/// Reader guest: for each disk in $DISKS, reads both rings with O_DIRECT, prints
/// `SUM <disk> <sha256>` and every block header as `<disk> B <block> SEQ <n>`.
const READER_GUEST: &str = r#"
for d in $(echo "$DISKS" | tr , " "); do
    dd if=/dev/$d of=/tmp/img bs=4096 count=$((2 * R)) iflag=direct 2>/dev/null || exit 31
    echo "SUM $d $(sha256sum < /tmp/img | cut -d' ' -f1)"
    tr -d '\000' < /tmp/img | grep -a '^B ' | sed "s/^/$d /"
    rm -f /tmp/img
done
"#;

/// Block index → sequence number of the header found there.
type BlockMap = BTreeMap<u64, u64>;

/// What ring `base` holds after writes `lo+1 ..= hi` (the latest n per block).
fn ring_state(lo: u64, hi: u64, base: u64) -> BlockMap {
    let mut m = BlockMap::new();
    let first = (lo + 1).max(hi.saturating_sub(R - 1)).max(1);
    for n in first..=hi {
        m.insert(base + n % R, n);
    }
    m
}

/// The bytes of both rings for a block map (blocks without a header hold the prefill text).
fn image(map: &BlockMap) -> Vec<u8> {
    let prefill: Vec<u8> = b"PREFILL\n".iter().copied().cycle().take(BLOCK).collect();
    let mut img = Vec::with_capacity(2 * R as usize * BLOCK);
    for b in 0..2 * R {
        match map.get(&b) {
            Some(n) => {
                let mut blk = format!("B {b:06} SEQ {n:08}\n").into_bytes();
                blk.resize(BLOCK, 0);
                img.extend_from_slice(&blk);
            }
            None => img.extend_from_slice(&prefill),
        }
    }
    img
}

fn first_difference(got: &BlockMap, want: &BlockMap) -> String {
    for b in 0..2 * R {
        let (g, w) = (got.get(&b), want.get(&b));
        if g != w {
            return format!("block {b}: found seq {g:?}, expected {w:?}");
        }
    }
    "no difference".into()
}

/// Parses a reader guest's headers for `disk`, checking each header names the block it sits
/// in (so misplaced data is caught) and the block lies in the two rings.
fn parse_blocks(out: &GuestOutput, disk: &str) -> Result<BlockMap, String> {
    let mut map = BlockMap::new();
    for line in out.console.lines() {
        let Some(rest) = line.strip_prefix(&format!("{disk} B ")) else {
            continue;
        };
        let mut it = rest.split_whitespace();
        let (Some(b), Some("SEQ"), Some(n), None) = (it.next(), it.next(), it.next(), it.next())
        else {
            return Err(format!("{disk}: malformed header line {line:?}"));
        };
        let (b, n): (u64, u64) = match (b.parse(), n.parse()) {
            (Ok(b), Ok(n)) => (b, n),
            _ => return Err(format!("{disk}: malformed header line {line:?}")),
        };
        if b >= 2 * R || n == 0 || (b % R) != n % R {
            return Err(format!("{disk}: header {line:?} cannot be at block {b}"));
        }
        if let Some(old) = map.insert(b, n) {
            return Err(format!(
                "{disk}: block {b} appears twice (seq {old} and {n}): misplaced data"
            ));
        }
    }
    Ok(map)
}

/// A snapshot taken in phase 1 must be an exact cut: for some K, ring 0 holds exactly writes
/// 1..=K and ring 1 only the prefill. Returns K.
fn check_snapshot(map: &BlockMap) -> Result<u64, String> {
    let k = map.values().copied().max().unwrap_or(0);
    let want = ring_state(0, k, 0);
    if *map != want {
        return Err(format!(
            "not a point-in-time cut at seq {k}: {}",
            first_difference(map, &want)
        ));
    }
    Ok(k)
}

/// After rolling back to `snap` during phase 2 (writes `p2_first ..= end` go to ring 1, the
/// last one seen complete before the rollback was started is `before_rb`): ring 0 equals the
/// snapshot exactly, ring 1 holds exactly the writes after some point P ≥ `before_rb`
/// (everything earlier was rolled back to the prefill). Returns P.
fn check_rollback(
    map: &BlockMap,
    snap: &BlockMap,
    p2_first: u64,
    before_rb: u64,
    end: u64,
) -> Result<u64, String> {
    let ring0: BlockMap = map.range(..R).map(|(b, n)| (*b, *n)).collect();
    if ring0 != *snap {
        return Err(format!(
            "ring 0 differs from the snapshot rolled back to: {}",
            first_difference(&ring0, snap)
        ));
    }
    let ring1: BlockMap = map.range(R..).map(|(b, n)| (*b, *n)).collect();
    let p = ring1.values().min().map_or(end, |m| m - 1);
    if p < before_rb {
        return Err(format!(
            "write {} completed before the rollback started ({before_rb}) yet survived it",
            p + 1
        ));
    }
    if p + 1 < p2_first {
        return Err(format!("ring 1 holds write {} from before phase 2", p + 1));
    }
    let want = ring_state(p, end, R);
    if ring1 != want {
        return Err(format!(
            "ring 1 is not exactly the writes after {p} up to {end}: {}",
            first_difference(&ring1, &want)
        ));
    }
    Ok(p)
}

fn seq_of(line: &str, prefix: &str) -> Option<u64> {
    line.strip_prefix(prefix)
        .and_then(|v| v.trim().parse().ok())
}

fn reader(
    tools: &GuestTools,
    label: &str,
    initrd: &Path,
    disks: &[(&str, &Path)],
) -> BTreeMap<String, BlockMap> {
    let mut cfg = GuestConfig::new(
        label,
        initrd,
        disks
            .iter()
            .map(|(_, s)| Disk {
                socket: s.to_path_buf(),
                queues: 1,
            })
            .collect(),
    );
    let names: Vec<String> = (0..disks.len())
        .map(|i| format!("vd{}", (b'a' + i as u8) as char))
        .collect();
    cfg.append = format!("R={R} DISKS={}", names.join(","));
    let out = tools.run(&cfg);
    out.assert_ok(label);
    let mut maps = BTreeMap::new();
    for (dev, (what, _)) in names.iter().zip(disks) {
        let map = parse_blocks(&out, dev).unwrap_or_else(|e| panic!("{label} ({what}): {e}"));
        let sums: Vec<String> = out.values(&format!("SUM {dev} ")).into_iter().collect();
        assert_eq!(
            sums,
            vec![sha256_hex(&image(&map))],
            "{label} ({what}): bytes of the rings differ from what the headers imply (corrupt prefill or padding)"
        );
        maps.insert(what.to_string(), map);
    }
    maps
}

#[test]
fn live_snapshots_and_rollback_under_guest_writes() {
    let Some(tools) = guest_tools("e2e_qemu::live_snapshots_and_rollback_under_guest_writes")
    else {
        return;
    };
    const SIZE: u64 = 64 * MIB;
    let dir = scratch("e2e-live");
    let daemon = Daemon::start(dir.path());
    // 64 KiB chunks: each 4 KiB block write copies out a chunk that neighbouring blocks share.
    let (origin, cow) = create_origin(&daemon, dir.path(), "vol", SIZE, &["-c", "16"]);
    let vol_sock = daemon.export_socket("vol");
    let writer_initrd = tools.initramfs(dir.path(), "writer", WRITER_GUEST);
    let reader_initrd = tools.initramfs(dir.path(), "reader", READER_GUEST);

    let mut cfg = GuestConfig::new(
        "writer",
        &writer_initrd,
        vec![Disk {
            socket: vol_sock.clone(),
            queues: 1,
        }],
    );
    cfg.append = format!("R={R}");
    cfg.stdin = true;
    let mut writer = tools.spawn(&cfg);
    writer.wait_for("PREFILLED", |l| (l == "PREFILLED").then_some(()));

    // Snapshot A once ring 0 has wrapped (so the snapshot's first writes copy real data), B a
    // few hundred writes later; both while the writer keeps going.
    let before_a = writer.wait_for("a write past the first wrap", |l| {
        seq_of(l, "W ").filter(|n| *n >= R + 64)
    });
    let tag_a = snapshot_tag(&daemon, "vol");
    let before_b = writer.wait_for("300 more writes", |l| {
        seq_of(l, "W ").filter(|n| *n >= before_a + 300)
    });
    let tag_b = snapshot_tag(&daemon, "vol");
    assert_ne!(tag_a, tag_b, "two snapshots got the same tag");

    let (ta, tb) = (tag_a.to_string(), tag_b.to_string());
    daemon.cli(&["create", "snapA", &origin, &cow, &ta]);
    daemon.cli(&["create", "snapB", &origin, &cow, &tb]);
    let maps = reader(
        &tools,
        "reader-snapshots",
        &reader_initrd,
        &[
            ("snapshot A", &daemon.export_socket("snapA")),
            ("snapshot B", &daemon.export_socket("snapB")),
        ],
    );
    let (map_a, map_b) = (&maps["snapshot A"], &maps["snapshot B"]);
    let k_a = check_snapshot(map_a).unwrap_or_else(|e| panic!("snapshot A (tag {tag_a}): {e}"));
    let k_b = check_snapshot(map_b).unwrap_or_else(|e| panic!("snapshot B (tag {tag_b}): {e}"));
    assert!(
        k_a >= before_a,
        "snapshot A cut at write {k_a} but write {before_a} had completed before it was taken"
    );
    assert!(
        k_b >= before_b,
        "snapshot B cut at write {k_b} but write {before_b} had completed before it was taken"
    );
    assert!(
        k_a <= k_b,
        "snapshot A (cut {k_a}) is newer than snapshot B (cut {k_b})"
    );
    eprintln!("live: snapshot A cut at write {k_a} (≥ {before_a}), B at {k_b} (≥ {before_b})");

    let list = daemon.cli(&["list", "vol"]);
    for t in [&ta, &tb] {
        assert!(
            list.split(|c: char| !c.is_ascii_digit()).any(|w| w == t),
            "snapmv list vol does not show tag {t}:\n{list}"
        );
    }
    daemon.cli(&["remove", "snapA"]);
    daemon.cli(&["remove", "snapB"]);

    // Phase 2: the writer moves to ring 1; roll the origin back to A while it writes.
    writer.send_line("phase2");
    let p2_last = writer.wait_for("PHASE2", |l| seq_of(l, "PHASE2 AFTER "));
    let before_rb = writer.wait_for("100 phase-2 writes", |l| {
        seq_of(l, "W ").filter(|n| *n >= p2_last + 100)
    });
    // Live rollback (`-b`: returns at once, proceeds in the background) while the guest writes.
    daemon.cli(&["rollback", "vol", &ta, "-b"]);
    let after_rb = writer.wait_for("a write after the rollback", |l| seq_of(l, "W "));
    writer.wait_for("50 more writes", |l| {
        seq_of(l, "W ").filter(|n| *n >= after_rb + 50)
    });
    writer.send_line("stop");
    let end = writer.wait_for("STOPPED", |l| seq_of(l, "STOPPED END "));
    let out = writer.finish();
    out.assert_ok("writer");

    // Guest 3 reads the origin, possibly while the rollback is still copying back.
    let maps = reader(
        &tools,
        "reader-origin",
        &reader_initrd,
        &[("origin", &vol_sock)],
    );
    let origin_map = &maps["origin"];
    let p = check_rollback(origin_map, map_a, p2_last + 1, before_rb, end)
        .unwrap_or_else(|e| panic!("origin after rollback to tag {tag_a}: {e}"));
    eprintln!(
        "live: rollback to A took effect after write {p} (≥ {before_rb}); writer ended at {end}; \
         {} ring-1 blocks rewritten after it",
        origin_map.range(R..).count()
    );

    // Once the rollback has finished, the origin file itself (export removed) holds exactly
    // what the guest saw: the origin is kept in place.
    wait_rollback_done(&daemon, "vol");
    daemon.cli(&["remove", "vol"]);
    let data = std::fs::read(&origin).expect("read origin file");
    assert!(
        data.len() >= 2 * R as usize * BLOCK,
        "origin file shrank to {} bytes",
        data.len()
    );
    let want = image(origin_map);
    if let Some(at) = (0..want.len()).find(|&i| data[i] != want[i]) {
        panic!(
            "origin file differs from what guest 3 read at byte {at} (block {})",
            at / BLOCK
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The checkers themselves (no QEMU): they must reject what they are meant to reject.

#[test]
fn checker_accepts_exact_cuts_and_rejects_holes_and_future_writes() {
    let good = ring_state(0, R + 500, 0);
    assert_eq!(check_snapshot(&good), Ok(R + 500));
    assert_eq!(check_snapshot(&BlockMap::new()), Ok(0));

    // A hole: write R+100 missing (its block still shows the previous lap's write 100).
    let mut hole = good.clone();
    hole.insert((R + 100) % R, 100);
    assert!(check_snapshot(&hole).is_err());

    // A block reverted to prefill inside the cut.
    let mut gone = good.clone();
    gone.remove(&7);
    assert!(check_snapshot(&gone).is_err());

    // A write from after the cut leaked into the snapshot (beyond a gap).
    let mut leak = good.clone();
    leak.insert((R + 510) % R, R + 510);
    assert!(check_snapshot(&leak).is_err());

    // Anything in ring 1 during phase 1.
    let mut ring1 = good.clone();
    ring1.insert(R + 3, 3);
    assert!(check_snapshot(&ring1).is_err());

    // The image puts headers at their block and prefill elsewhere.
    let img = image(&ring_state(0, 2, 0));
    assert_eq!(&img[BLOCK..BLOCK + 22], b"B 000001 SEQ 00000001\n");
    assert_eq!(&img[..8], b"PREFILL\n");
    assert_eq!(img.len(), 2 * R as usize * BLOCK);
}

#[test]
fn rollback_checker_rejects_surviving_and_missing_writes() {
    let snap = ring_state(0, R + 200, 0);
    let (p2_first, before_rb, end) = (R + 1001, R + 1100, R + 1300);
    let mut good = snap.clone();
    good.extend(ring_state(R + 1150, end, R));
    assert_eq!(
        check_rollback(&good, &snap, p2_first, before_rb, end),
        Ok(R + 1150)
    );

    // Nothing rewritten after the rollback (writer stopped right away).
    assert_eq!(
        check_rollback(&snap, &snap, p2_first, before_rb, R + 1100),
        Ok(R + 1100)
    );

    // A phase-2 write that completed before the rollback survived.
    let mut survived = snap.clone();
    survived.extend(ring_state(R + 1050, end, R));
    assert!(check_rollback(&survived, &snap, p2_first, before_rb, end).is_err());

    // Ring 0 not rolled back.
    let mut ring0 = good.clone();
    ring0.insert(5, 5);
    assert!(check_rollback(&ring0, &snap, p2_first, before_rb, end).is_err());

    // A post-rollback write lost.
    let mut lost = good.clone();
    lost.remove(&(R + (R + 1200) % R));
    assert!(check_rollback(&lost, &snap, p2_first, before_rb, end).is_err());

    // parse_blocks rejects misplaced headers.
    let out = GuestOutput {
        status: Some(0),
        console: "vda B 000005 SEQ 00000006\n".into(),
    };
    assert!(parse_blocks(&out, "vda").is_err());
    let out = GuestOutput {
        status: Some(0),
        console: "vda B 000005 SEQ 00000005\nvdb B 000001 SEQ 00000001\n".into(),
    };
    assert_eq!(parse_blocks(&out, "vda"), Ok(BlockMap::from([(5, 5)])));
}
