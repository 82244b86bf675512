//! QEMU guest (TCG) end-to-end: the daemon restarts under a running guest and the guest
//! notices no more than a pause (the issue "acknowledged writes lost when the daemon restarts
//! under a running guest").
//!
//! The guest has a 2-queue `vhost-user-blk-pci` disk on a chardev with `reconnect-ms=500` and
//! two vCPUs. Four writers write sequence-numbered 4 KiB blocks with O_DIRECT, each to its own
//! range, pass after pass (odd passes: a flush after every write; even passes: one flush at the
//! end of the pass), and after every pass each writer reads its range back with O_DIRECT and
//! checks every block is the one it last wrote. Meanwhile the test SIGKILLs `snapmv serve`
//! several times mid-write and starts it again on the same directories, once right after taking
//! a live snapshot (so the writes in flight and those after the restart are first writes after
//! a snapshot), and once stops it with SIGTERM and starts it again (an upgrade). The guest must
//! finish with no I/O error, no hang and nothing wrong in its dmesg; every snapshot taken live
//! must hold exactly one point in time of each writer (a cut no earlier than what the guest had
//! seen completed when the snapshot was asked for).
//!
//! It also prints the pause each restart caused: from the kill to the first write the guest
//! saw complete after the new daemon answered (reported, not asserted).

use std::collections::BTreeMap;
use std::time::Instant;

use snapmv_tests::blkio_client::{run1, Client, ClientOptions, NO_FLAGS};
use snapmv_tests::daemon::{scratch, sparse_file, Daemon};
use snapmv_tests::qemu::{guest_tools, snapshot_tag, Disk, GuestConfig};

const MIB: u64 = 1 << 20;
const BLOCK: usize = 4096;
/// Writers in the guest.
const WRITERS: u64 = 4;
/// Blocks per writer.
const NB: u64 = 32;
/// Passes over each writer's range.
const PASSES: u64 = 8;

/// Guest script. Each writer w owns blocks w*NB .. (w+1)*NB; in pass p it writes block
/// w*NB+i with the header `B <block> P <p>` (NUL-padded, O_DIRECT) and prints `P <w> <p> <i>`
/// once the write completed; odd passes flush after every write (conv=fsync), even passes once
/// at the end. After each pass it reads its range back with O_DIRECT and compares.
const GUEST: &str = r#"
writer() {
    w=$1
    p=1
    while [ $p -le $PASSES ]; do
        i=0
        : > /tmp/exp$w
        while [ $i -lt $NB ]; do
            b=$((w * NB + i))
            printf 'B %06d P %04d\n' $b $p > /tmp/b$w
            cat /tmp/b$w >> /tmp/exp$w
            if [ $((p % 2)) = 1 ]; then
                dd if=/tmp/b$w of=/dev/vda bs=4096 seek=$b conv=sync,fsync oflag=direct 2>/tmp/e$w || { echo "SNAPMV-GUEST-ERROR write w=$w p=$p i=$i: $(cat /tmp/e$w)"; echo 1 > /tmp/rc$w; return; }
            else
                dd if=/tmp/b$w of=/dev/vda bs=4096 seek=$b conv=sync oflag=direct 2>/tmp/e$w || { echo "SNAPMV-GUEST-ERROR write w=$w p=$p i=$i: $(cat /tmp/e$w)"; echo 1 > /tmp/rc$w; return; }
            fi
            read up rest < /proc/uptime
            echo "P $w $p $i ${up%.*}${up#*.}"
            i=$((i + 1))
        done
        if [ $((p % 2)) = 0 ]; then
            dd if=/dev/null of=/dev/vda count=0 conv=fsync,notrunc 2>/tmp/e$w || { echo "SNAPMV-GUEST-ERROR flush w=$w p=$p: $(cat /tmp/e$w)"; echo 1 > /tmp/rc$w; return; }
        fi
        dd if=/dev/vda bs=4096 skip=$((w * NB)) count=$NB iflag=direct 2>/tmp/e$w | tr -d '\000' > /tmp/got$w
        if ! cmp -s /tmp/got$w /tmp/exp$w; then
            echo "SNAPMV-GUEST-ERROR verify w=$w p=$p"
            diff /tmp/exp$w /tmp/got$w | grep '^[-+]B' | head -n 8 | sed 's/^/SNAPMV-GUEST-ERROR   /'
            echo 1 > /tmp/rc$w
            return
        fi
        echo "V $w $p"
        p=$((p + 1))
    done
    echo 0 > /tmp/rc$w
}
dmesg > /tmp/dmesg0
w=0
while [ $w -lt $WRITERS ]; do
    writer $w &
    w=$((w + 1))
done
wait
rc=0
w=0
while [ $w -lt $WRITERS ]; do
    [ "$(cat /tmp/rc$w 2>/dev/null)" = 0 ] || rc=1
    w=$((w + 1))
done
echo "QUEUES $(ls /sys/block/vda/mq | wc -l)"
# Any kernel message since the writers started is suspect (I/O errors, hung tasks, virtio).
dmesg | tail -n +$(( $(wc -l < /tmp/dmesg0) + 1 )) | sed 's/^/DMESG /'
echo "DONE rc=$rc"
exit $rc
"#;

/// What the test does at a given point of the guest's progress.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Action {
    Kill,
    SnapshotThenKill,
    Term,
}

/// Per writer: (pass, index) of the last write seen completed.
type Progress = BTreeMap<u64, (u64, u64)>;

/// `P <w> <p> <i> <guest uptime in centiseconds>` → (w, p, i).
fn parse_progress(line: &str) -> Option<(u64, u64, u64)> {
    parse_timed(line).map(|(w, p, i, _)| (w, p, i))
}

fn parse_timed(line: &str) -> Option<(u64, u64, u64, u64)> {
    let mut it = line.strip_prefix("P ")?.split_whitespace();
    let w = it.next()?.parse().ok()?;
    let p = it.next()?.parse().ok()?;
    let i = it.next()?.parse().ok()?;
    let t = it.next()?.parse().ok()?;
    it.next().is_none().then_some((w, p, i, t))
}

/// Checks that a snapshot is one point in time of each writer: blocks 0..k of writer w hold
/// pass P, blocks k..NB pass P-1 (0: never written, zeroes), and that the cut is no earlier
/// than `seen` (the writes the guest had seen complete before the snapshot was asked for).
fn check_cut(img: &[u8], seen: &Progress) -> Result<(), String> {
    for w in 0..WRITERS {
        let pass_of = |i: u64| -> Result<u64, String> {
            let b = w * NB + i;
            let blk = &img[(b as usize) * BLOCK..(b as usize + 1) * BLOCK];
            if blk.iter().all(|&x| x == 0) {
                return Ok(0);
            }
            let want_prefix = format!("B {b:06} P ");
            // "B <6 digits> P <4 digits>\n": 16 bytes, then NULs.
            let text = String::from_utf8_lossy(&blk[..16]);
            let Some(p) = text.strip_prefix(&want_prefix) else {
                return Err(format!("block {b}: unexpected content {text:?}"));
            };
            if blk[16..].iter().any(|&x| x != 0) {
                return Err(format!("block {b}: garbage after the header"));
            }
            p.trim_end()
                .parse()
                .map_err(|_| format!("block {b}: bad pass in {text:?}"))
        };
        let passes: Vec<u64> = (0..NB).map(pass_of).collect::<Result<_, _>>()?;
        let top = passes[0];
        let k = passes.iter().take_while(|&&p| p == top).count() as u64;
        let (cut_p, cut_k) = if k == NB { (top, NB) } else { (top, k) };
        for (i, &p) in passes.iter().enumerate() {
            let want = if (i as u64) < cut_k {
                cut_p
            } else {
                cut_p.saturating_sub(1)
            };
            if p != want {
                return Err(format!(
                    "writer {w}: block {i} holds pass {p}, a cut at pass {cut_p} block {cut_k} needs {want}: not one point in time"
                ));
            }
        }
        if let Some(&(sp, si)) = seen.get(&w) {
            // The guest had seen write (sp, si) complete: the cut must include it.
            let included = cut_p > sp || (cut_p == sp && cut_k > si);
            if !included {
                return Err(format!(
                    "writer {w}: the snapshot stops at pass {cut_p} block {cut_k}, but write (pass {sp}, block {si}) had completed before it was taken"
                ));
            }
        }
    }
    Ok(())
}

/// SIGKILL four times (passes with a flush after every write and passes with one flush at the
/// end) and one upgrade (SIGTERM + start), no snapshot.
#[test]
fn restarts_and_upgrade_under_a_writing_guest() {
    run(
        "e2e_restart::restarts_and_upgrade_under_a_writing_guest",
        &[
            (1, 10, Action::Kill), // flush after every write
            (2, 12, Action::Kill), // no flush until the end of the pass
            (3, 20, Action::Kill),
            (4, 6, Action::Term), // upgrade: SIGTERM, new daemon
            (6, 24, Action::Kill),
        ],
    );
}

/// SIGKILL right after live snapshots (the writes in flight and those after the restart are
/// first writes after a snapshot), an upgrade, and a kill with snapshots present; every
/// snapshot must be an exact cut.
#[test]
fn restarts_right_after_live_snapshots() {
    run(
        "e2e_restart::restarts_right_after_live_snapshots",
        &[
            (1, 10, Action::Kill),
            (3, 20, Action::SnapshotThenKill), // first writes after a snapshot
            (4, 6, Action::Term),              // upgrade: SIGTERM, new daemon
            (5, 16, Action::SnapshotThenKill),
            (6, 24, Action::Kill),
        ],
    );
}

fn run(test: &str, plan: &[(u64, u64, Action)]) {
    let Some(tools) = guest_tools(test) else {
        return;
    };
    let dir = scratch("e2e-restart");
    // Writes and flushes wait 20 ms in the daemon after being taken (marked in flight): a kill
    // then nearly always finds requests in flight in the daemon, which the next daemon must
    // execute again (the knob is documented in backend/src/vhost_blk/device.rs). This test
    // binary is its own process under nextest, and the daemon inherits the environment.
    std::env::set_var("SNAPMV_TEST_DELAY_WRITES_MS", "20");
    let mut daemon = Daemon::start(dir.path());
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        body(test, &tools, dir.path(), &mut daemon, plan)
    }));
    if let Err(panic) = result {
        let log = daemon.log();
        let tail: Vec<&str> = log.lines().rev().take(150).collect();
        eprintln!(
            "{test}: --- last lines of the daemon log ---\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
        std::panic::resume_unwind(panic);
    }
}

fn body(
    test: &str,
    tools: &snapmv_tests::qemu::GuestTools,
    dir: &std::path::Path,
    daemon: &mut Daemon,
    plan: &[(u64, u64, Action)],
) {
    let dir = dir.to_path_buf();
    let origin = dir.join("vol.origin");
    let cow = dir.join("vol.cow");
    sparse_file(&origin, 16 * MIB);
    sparse_file(&cow, 64 * MIB);
    let (o, c) = (origin.display().to_string(), cow.display().to_string());
    // 16 KiB chunks: a first write after a snapshot copies out a chunk other writers share.
    // O_DIRECT files: requests wait for the device (a flush for an fdatasync), so a kill
    // often finds requests in flight in the daemon, not only in the guest.
    daemon.cli(&[
        "create", "vol", &o, &c, "-b", "-f", "-c", "4", "-q", "2", "--direct",
    ]);
    let sock = daemon.export_socket("vol");
    let initrd = tools.initramfs(&dir, "restart", GUEST);
    let mut cfg = GuestConfig::new(
        "restart-guest",
        &initrd,
        vec![Disk {
            socket: sock.clone(),
            queues: 2,
        }],
    );
    cfg.smp = 2;
    cfg.reconnect_ms = Some(500);
    // A hang shows up as QEMU killed and the console, not as a 10-minute wait.
    cfg.timeout = std::time::Duration::from_secs(240);
    cfg.append = format!("WRITERS={WRITERS} NB={NB} PASSES={PASSES}");
    let mut guest = tools.spawn(&cfg);

    let mut progress = Progress::new();
    let mut snapshots: Vec<(u64, Progress)> = Vec::new();
    let mut restarts = 0usize;
    for &(at_pass, at_i, action) in plan {
        guest.wait_for(&format!("a write of pass {at_pass} block {at_i}"), |l| {
            let (w, p, i) = parse_progress(l)?;
            progress.insert(w, (p, i));
            (p > at_pass || (p == at_pass && i >= at_i)).then_some(())
        });
        if action == Action::SnapshotThenKill {
            let seen = progress.clone();
            let tag = snapshot_tag(daemon, "vol");
            snapshots.push((tag, seen));
        }
        let t0 = Instant::now();
        restarts += 1;
        match action {
            Action::Kill | Action::SnapshotThenKill => daemon.restart(),
            Action::Term => {
                let st = daemon.terminate();
                assert!(st.success(), "snapmv serve exited with {st} on SIGTERM");
                daemon.restart();
            }
        }
        let up = t0.elapsed();
        eprintln!("{test}: {action:?} at pass {at_pass}: daemon back after {up:?}");
    }
    let out = guest.finish();
    let log = daemon.log();
    let resumed: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("resuming after a restart"))
        .collect();
    eprintln!(
        "{test}: {} ring starts resubmitted requests left in flight by a dead daemon:\n{}",
        resumed.len(),
        resumed.join("\n")
    );
    out.assert_ok("restart-guest");
    // A TCG guest on a busy host logs that its timer interrupt ran late: a fact about the
    // emulation, not about the disk. Everything else in the new dmesg lines is a problem.
    let dmesg: Vec<_> = out
        .values("DMESG ")
        .into_iter()
        .filter(|l| !l.contains("hrtimer: interrupt took"))
        .collect();
    assert!(
        dmesg.is_empty(),
        "the guest's dmesg reports problems: {dmesg:#?}\n--- console ---\n{}",
        out.console
    );
    assert_eq!(out.value("restart-guest", "QUEUES "), "2");
    for w in 0..WRITERS {
        assert_eq!(
            out.values(&format!("V {w} ")).len() as u64,
            PASSES,
            "writer {w} did not verify every pass"
        );
    }
    // The pause each restart caused, in guest time: the longest stretches with no write
    // completing (one per restart), against the usual gap between completions.
    let mut times: Vec<u64> = out
        .console
        .lines()
        .filter_map(|l| parse_timed(l).map(|(_, _, _, t)| t))
        .collect();
    times.sort_unstable();
    let mut gaps: Vec<u64> = times.windows(2).map(|w| (w[1] - w[0]) * 10).collect();
    gaps.sort_unstable();
    let median = gaps.get(gaps.len() / 2).copied().unwrap_or(0);
    let longest: Vec<u64> = gaps.iter().rev().take(restarts).copied().collect();
    eprintln!(
        "{test}: {restarts} restarts; longest stretches without a completed write (ms, guest clock): {longest:?}; median gap between completions {median} ms"
    );

    // Every snapshot taken live holds exactly one point in time of each writer.
    for (n, (tag, seen)) in snapshots.iter().enumerate() {
        let name = format!("snap{n}");
        let t = tag.to_string();
        daemon.cli(&["create", &name, &o, &c, &t, "-r"]);
        let len = (WRITERS * NB) as usize * BLOCK;
        let mut cl = Client::connect_with(
            &daemon.export_socket(&name),
            &ClientOptions {
                region_len: len,
                read_only: true,
                ..Default::default()
            },
        )
        .expect("connect to the snapshot export");
        let p = cl.ptr(0);
        let ret = run1(&mut cl.queues[0], |q| q.read(0, p, len, 0, NO_FLAGS)).unwrap();
        assert_eq!(ret, 0, "read snapshot {tag}");
        let img = cl.mem()[..len].to_vec();
        check_cut(&img, seen).unwrap_or_else(|e| panic!("snapshot {tag} (taken live): {e}"));
    }
    // And the origin holds the last pass everywhere (the guest checked it too).
    let len = (WRITERS * NB) as usize * BLOCK;
    let mut cl = Client::connect_with(
        &sock,
        &ClientOptions {
            region_len: len,
            ..Default::default()
        },
    )
    .expect("connect to the origin");
    let p = cl.ptr(0);
    assert_eq!(
        run1(&mut cl.queues[0], |q| q.read(0, p, len, 0, NO_FLAGS)).unwrap(),
        0
    );
    let img = cl.mem()[..len].to_vec();
    let all: Progress = (0..WRITERS).map(|w| (w, (PASSES, NB - 1))).collect();
    check_cut(&img, &all).unwrap_or_else(|e| panic!("origin at the end: {e}"));
}

#[test]
fn the_cut_checker_rejects_what_it_must() {
    let img_of = |cuts: &[(u64, u64)]| {
        let mut img = vec![0u8; (WRITERS * NB) as usize * BLOCK];
        for (w, &(p, k)) in cuts.iter().enumerate() {
            for i in 0..NB {
                let pass = if i < k { p } else { p - 1 };
                if pass == 0 {
                    continue;
                }
                let b = w as u64 * NB + i;
                let h = format!("B {b:06} P {pass:04}\n");
                img[b as usize * BLOCK..][..h.len()].copy_from_slice(h.as_bytes());
            }
        }
        img
    };
    let cuts = [(1, 5), (2, 0), (3, NB), (2, 31)];
    let img = img_of(&cuts);
    assert_eq!(check_cut(&img, &Progress::new()), Ok(()));
    let seen: Progress = [(0, (1, 4)), (1, (1, NB - 1)), (3, (2, 30))].into();
    assert_eq!(check_cut(&img, &seen), Ok(()));
    // A write seen complete is missing from the cut.
    let late: Progress = [(0, (1, 5))].into();
    assert!(check_cut(&img, &late).is_err());
    // A hole (a block of the old pass inside the new one).
    let mut hole = img.clone();
    // Writer 3 is cut at pass 2 block 31: block 7 back at pass 1 is a hole.
    let h = format!("B {:06} P {:04}\n", NB * 3 + 7, 1);
    hole[(NB * 3 + 7) as usize * BLOCK..][..h.len()].copy_from_slice(h.as_bytes());
    assert!(check_cut(&hole, &Progress::new()).is_err());
    // A block at the wrong place.
    let mut moved = img.clone();
    let h = format!("B {:06} P {:04}\n", 3, 1);
    moved[4 * BLOCK..][..h.len()].copy_from_slice(h.as_bytes());
    assert!(check_cut(&moved, &Progress::new()).is_err());
}
