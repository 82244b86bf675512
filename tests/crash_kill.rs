//! Kill -9 under load (issue 7, item 1).
//!
//! Each round: two blkio clients write sequence-numbered blocks to the origin export and to a
//! writable snapshot export (recording which writes and which flushes completed), while an RPC
//! thread creates and deletes snapshots and starts rollbacks at random; the daemon is SIGKILLed
//! at a random moment. Then `snapmv check` must be clean on the dead daemon's store, the daemon
//! is restarted and every volume is read back:
//! - every write acknowledged before an acknowledged flush is there (the block holds that write
//!   or one issued after it, never an older one, never garbage);
//! - every snapshot holds exactly what its volume held when it was created (snapshots are only
//!   taken while that volume's writer is paused, so the content is known exactly);
//! - a rollback that returned has taken effect, one in flight at the kill either did or did not,
//!   and any rollback finishes after the restart without changing what the origin reads.
//!
//! `SNAPMV_CRASH_ROUNDS` (default 20) sets the number of rounds, `SNAPMV_CRASH_SEED` the seed
//! (printed, so a failing run can be replayed). After each round the chunks in use must stay
//! within one volume's worth per live snapshot plus slack. `SNAPMV_CRASH_NO_SNAP_OF_SNAP=1`
//! takes snapshots of the origin only, `SNAPMV_CRASH_VERBOSE=1` prints the space per round,
//! `SNAPMV_CRASH_TOLERATE_STALE_MEM=1` retries (and counts) a first request of a fresh
//! connection that fails with EIO (the serving bug of `fresh_export_serves_its_first_request`,
//! fixed since; kept to run against older builds).

use snapmv_tests::crash_model::{Content, VolModel};
use snapmv_tests::env_u64;
use std::collections::{BTreeMap, BTreeSet};
use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use blkio::Completion;
use serde_json::{json, Value};
use snapmv_rpc::{codes, RpcClient, RpcError};
use snapmv_tests::blkio_client::{run1, Client, ClientOptions, NO_FLAGS};
use snapmv_tests::daemon::{scratch, sparse_file, Daemon};
use snapmv_tests::rbd_cluster::{cluster, Image};

const BLOCK: u64 = 4096;
const BLOCKS: u64 = 256;
const VOL_SIZE: u64 = BLOCK * BLOCKS;
const STORE_SIZE: u64 = 64 << 20;
const MAGIC: u64 = 0x534e_4150_4b49_4c4c; // "SNAPKILL"
/// At most this many snapshots (besides the exported one) are kept alive.
const MAX_SNAPS: usize = 4;

fn fill_block(buf: &mut [u8], vol: u64, block: u64, seq: u64) {
    let mut x = seq.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (block << 32) ^ vol;
    for (i, w) in buf.chunks_exact_mut(8).enumerate() {
        let v = match i {
            0 => MAGIC,
            1 => vol,
            2 => block,
            3 => seq,
            _ => {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x
            }
        };
        w.copy_from_slice(&v.to_le_bytes());
    }
}

/// Decodes a block read back; `Err` describes garbage or a torn write.
fn decode_block(buf: &[u8], block: u64) -> Result<Content, String> {
    if buf.iter().all(|&b| b == 0) {
        return Ok(Content::Zero);
    }
    let word = |i: usize| u64::from_le_bytes(buf[i * 8..i * 8 + 8].try_into().unwrap());
    if word(0) != MAGIC {
        return Err(format!(
            "block {block}: no write header (first bytes {:02x?})",
            &buf[..16]
        ));
    }
    let (vol, b, seq) = (word(1), word(2), word(3));
    if b != block {
        return Err(format!(
            "block {block} holds write {seq} of writer {vol} meant for block {b}"
        ));
    }
    let mut want = vec![0u8; buf.len()];
    fill_block(&mut want, vol, b, seq);
    if want != buf {
        return Err(format!(
            "block {block}: write {seq} of writer {vol} is torn or mixed with other data"
        ));
    }
    Ok(Content::W { vol, seq })
}

/// The problems of volume `what` read back as `got`, against its model.
fn check_volume(model: &VolModel, what: &str, got: &[Content]) -> Vec<String> {
    got.iter()
        .enumerate()
        .filter_map(|(b, c)| {
            model
                .violation(b, c)
                .map(|why| format!("{what} block {b}: {why}"))
        })
        .collect()
}

struct Shared {
    origin: Mutex<VolModel>,
    snap: Mutex<VolModel>,
    /// Snapshots by tag (not the exported one): their exact content.
    snaps: Mutex<BTreeMap<u32, Vec<Content>>>,
    /// A snapshot create whose answer was lost in the kill: its content if it happened.
    pending_create: Mutex<Vec<Vec<Content>>>,
    /// Snapshot deletes whose answer was lost in the kill.
    pending_delete: Mutex<BTreeSet<u32>>,
    /// Held by a writer for each I/O and by the RPC thread to pause that writer.
    origin_gate: Mutex<()>,
    snap_gate: Mutex<()>,
    killed: AtomicBool,
    /// SNAPMV_CRASH_NO_SNAP_OF_SNAP: only snapshots of the origin.
    no_snap_of_snap: bool,
    failures: Mutex<Vec<String>>,
    stats: Mutex<Stats>,
}

#[derive(Default, Debug, Clone)]
struct Stats {
    writes: u64,
    flushes: u64,
    creates: u64,
    deletes: u64,
    rollbacks: u64,
    refused: u64,
    lost_in_kill: u64,
    killed_mid_rollback: u64,
}

impl Shared {
    fn fail(&self, msg: String) {
        self.failures.lock().unwrap().push(msg);
    }
}

/// Waits for one completion, giving up (None) once the daemon has been killed.
fn wait1(sh: &Shared, q: &mut blkio::Blkioq) -> Option<i32> {
    let mut comps = [MaybeUninit::<Completion>::uninit()];
    let start = Instant::now();
    loop {
        let mut t = Duration::from_millis(50);
        match q.do_io(&mut comps, 1, Some(&mut t), None) {
            Ok(1) => {
                // SAFETY: do_io returned one completion, so it initialised comps[0].
                let c = unsafe { comps[0].assume_init_ref() };
                return Some(c.ret);
            }
            _ if sh.killed.load(Ordering::SeqCst) => return None,
            // A timeout (0 or ETIME); a hang guard, not a timing assertion.
            _ if start.elapsed() > Duration::from_secs(60) => {
                sh.fail("a request did not complete within 60 s while the daemon ran".into());
                return None;
            }
            _ => {}
        }
    }
}

/// The writer of one volume: random 4 KiB writes and, now and then, a flush.
fn writer(sh: Arc<Shared>, sock: PathBuf, vol: u64, seed: u64, ready: std::sync::mpsc::Sender<()>) {
    let mut cl = match Client::connect(&sock) {
        Ok(c) => c,
        Err(e) => {
            sh.fail(format!("writer {vol}: connect {}: {e}", sock.display()));
            let _ = ready.send(());
            return;
        }
    };
    let _ = ready.send(());
    let mut rng = fastrand::Rng::with_seed(seed);
    let (model, gate) = if vol == 0 {
        (&sh.origin, &sh.origin_gate)
    } else {
        (&sh.snap, &sh.snap_gate)
    };
    let mut seq = 0u64;
    let mut first = true;
    while !sh.killed.load(Ordering::SeqCst) {
        let _g = gate.lock().unwrap();
        // The first request of the connection may be hit by the known stale-memory bug; with
        // SNAPMV_CRASH_TOLERATE_STALE_MEM it is retried once (and counted).
        let retry = std::mem::take(&mut first) && tolerate_stale_mem();
        if rng.u8(0..8) == 0 {
            let at_issue = model.lock().unwrap().last_acked.clone();
            let q = &mut cl.queues[0];
            q.flush(0, NO_FLAGS);
            let mut r = wait1(&sh, q);
            if retry && r == Some(-libc::EIO) {
                STALE_MEM_RETRIES.fetch_add(1, Ordering::SeqCst);
                q.flush(0, NO_FLAGS);
                r = wait1(&sh, q);
            }
            match r {
                Some(0) => {
                    let mut m = model.lock().unwrap();
                    for (f, a) in m.floor.iter_mut().zip(at_issue) {
                        *f = (*f).max(a);
                    }
                    sh.stats.lock().unwrap().flushes += 1;
                }
                Some(r) => sh.fail(format!("writer {vol}: flush failed with {r}")),
                None => return,
            }
        } else {
            seq += 1;
            let b = rng.u64(0..BLOCKS);
            fill_block(&mut cl.mem()[..BLOCK as usize], vol, b, seq);
            let idx = {
                let mut m = model.lock().unwrap();
                m.hist[b as usize].push(Content::W { vol, seq });
                m.hist[b as usize].len() - 1
            };
            let p = cl.ptr(0);
            let q = &mut cl.queues[0];
            q.write(b * BLOCK, p, BLOCK as usize, 0, NO_FLAGS);
            let mut r = wait1(&sh, q);
            if retry && r == Some(-libc::EIO) {
                STALE_MEM_RETRIES.fetch_add(1, Ordering::SeqCst);
                q.write(b * BLOCK, p, BLOCK as usize, 0, NO_FLAGS);
                r = wait1(&sh, q);
            }
            match r {
                Some(0) => {
                    model.lock().unwrap().last_acked[b as usize] = idx;
                    sh.stats.lock().unwrap().writes += 1;
                }
                Some(r) => sh.fail(format!("writer {vol}: write of block {b} failed with {r}")),
                None => return,
            }
        }
    }
}

enum Outcome {
    Ok(Value),
    Refused(i64, String),
    Lost,
}

fn call(rpc: &mut RpcClient, method: &str, params: Value) -> Outcome {
    match rpc.call_raw(method, params) {
        Ok(v) => Outcome::Ok(v),
        Err(RpcError::Remote(e)) => Outcome::Refused(e.code, e.message),
        Err(_) => Outcome::Lost,
    }
}

/// Random snapshot creates (of the origin and of the exported snapshot), deletes and rollbacks.
fn rpc_ops(sh: Arc<Shared>, rpc_socket: PathBuf, seed: u64) {
    let mut rng = fastrand::Rng::with_seed(seed);
    let Ok(mut rpc) = RpcClient::connect(&rpc_socket) else {
        return; // killed before we started
    };
    while !sh.killed.load(Ordering::SeqCst) {
        thread::sleep(Duration::from_millis(rng.u64(0..30)));
        let nsnaps = sh.snaps.lock().unwrap().len();
        let op = rng.u8(0..10);
        if (op < 4 && nsnaps < MAX_SNAPS) || nsnaps == 0 {
            // Snapshot of the origin (op even) or of the exported snapshot.
            let of_origin = op % 2 == 0 || nsnaps == 0 || sh.no_snap_of_snap;
            let (gate, model, name) = if of_origin {
                (&sh.origin_gate, &sh.origin, "vol")
            } else {
                (&sh.snap_gate, &sh.snap, "snap")
            };
            let _g = gate.lock().unwrap();
            let content = model.lock().unwrap().latest();
            match call(
                &mut rpc,
                "snapshot_create",
                json!({"name": name, "memo": "k"}),
            ) {
                Outcome::Ok(v) => {
                    let tag = v["tag"].as_u64().unwrap() as u32;
                    sh.snaps.lock().unwrap().insert(tag, content);
                    sh.stats.lock().unwrap().creates += 1;
                }
                Outcome::Refused(code, msg) => {
                    if code != codes::BUSY {
                        sh.fail(format!("snapshot_create {name}: {code} {msg}"));
                    }
                    sh.stats.lock().unwrap().refused += 1;
                }
                Outcome::Lost => {
                    sh.pending_create.lock().unwrap().push(content);
                    return;
                }
            }
        } else if op < 7 {
            let tags: Vec<u32> = sh.snaps.lock().unwrap().keys().copied().collect();
            let tag = tags[rng.usize(0..tags.len())];
            match call(
                &mut rpc,
                "snapshot_delete",
                json!({"name": "vol", "tag": tag}),
            ) {
                Outcome::Ok(_) => {
                    sh.snaps.lock().unwrap().remove(&tag);
                    sh.stats.lock().unwrap().deletes += 1;
                }
                Outcome::Refused(code, msg) => {
                    if code != codes::BUSY {
                        sh.fail(format!("snapshot_delete {tag}: {code} {msg}"));
                    }
                    sh.stats.lock().unwrap().refused += 1;
                }
                Outcome::Lost => {
                    sh.pending_delete.lock().unwrap().insert(tag);
                    return;
                }
            }
        } else {
            let _g = sh.origin_gate.lock().unwrap();
            // Hold the snapshot table so that the source cannot be deleted under us.
            let snaps = sh.snaps.lock().unwrap();
            let tags: Vec<u32> = snaps.keys().copied().collect();
            let tag = tags[rng.usize(0..tags.len())];
            let content = snaps[&tag].clone();
            drop(snaps);
            let idx: Vec<usize> = {
                let mut m = sh.origin.lock().unwrap();
                content
                    .iter()
                    .enumerate()
                    .map(|(b, c)| {
                        m.hist[b].push(*c);
                        m.hist[b].len() - 1
                    })
                    .collect()
            };
            match call(
                &mut rpc,
                "snapshot_rollback",
                json!({"name": "vol", "tag": tag}),
            ) {
                Outcome::Ok(_) => {
                    // Durable when it returns: the floor moves to the snapshot's content.
                    let mut m = sh.origin.lock().unwrap();
                    for (b, i) in idx.into_iter().enumerate() {
                        m.floor[b] = i;
                        m.last_acked[b] = i;
                    }
                    sh.stats.lock().unwrap().rollbacks += 1;
                }
                Outcome::Refused(code, msg) => {
                    let mut m = sh.origin.lock().unwrap();
                    for h in m.hist.iter_mut() {
                        h.pop();
                    }
                    if code != codes::BUSY {
                        sh.fail(format!("snapshot_rollback {tag}: {code} {msg}"));
                    }
                    sh.stats.lock().unwrap().refused += 1;
                }
                Outcome::Lost => return,
            }
        }
    }
}

fn tolerate_stale_mem() -> bool {
    std::env::var_os("SNAPMV_CRASH_TOLERATE_STALE_MEM").is_some()
}

static STALE_MEM_RETRIES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn read_volume(sock: &Path, read_only: bool) -> Result<Vec<Content>, String> {
    let mut cl = Client::connect_with(
        sock,
        &ClientOptions {
            read_only,
            ..Default::default()
        },
    )
    .map_err(|e| e.to_string())?;
    let mut out = Vec::with_capacity(BLOCKS as usize);
    let mut bad = Vec::new();
    for b in 0..BLOCKS {
        let p = cl.ptr(0);
        let mut ret = run1(&mut cl.queues[0], |q| {
            q.read(b * BLOCK, p, BLOCK as usize, 0, NO_FLAGS)
        })
        .map_err(|e| e.to_string())?;
        if ret == -libc::EIO && b == 0 && tolerate_stale_mem() {
            // The known first-request bug (see `fresh_export_serves_its_first_request`): only
            // when asked, retry that one read once, and count it.
            STALE_MEM_RETRIES.fetch_add(1, Ordering::SeqCst);
            ret = run1(&mut cl.queues[0], |q| {
                q.read(b * BLOCK, p, BLOCK as usize, 0, NO_FLAGS)
            })
            .map_err(|e| e.to_string())?;
        }
        if ret != 0 {
            return Err(format!(
                "read of block {b} on {} failed: {ret}",
                sock.display()
            ));
        }
        match decode_block(&cl.mem()[..BLOCK as usize], b) {
            Ok(c) => out.push(c),
            Err(e) => {
                bad.push(e);
                out.push(Content::Zero);
            }
        }
    }
    if bad.is_empty() {
        Ok(out)
    } else {
        Err(format!("{}: {}", sock.display(), bad.join("; ")))
    }
}

fn rollback_running(d: &Daemon) -> Option<Value> {
    let st = d.ok("status", json!({"name": "vol"}));
    st["stores"][0]["origins"][0].get("rollback").cloned()
}

/// `snapmv check` on the dead (or stopped) daemon's store; on RBD with `--takeover`, which
/// breaks the killed daemon's lock at once instead of waiting ~30 s for Ceph to time it out.
fn run_check(d: &Daemon, cow: &str) -> Result<String, String> {
    let out = if snapmv_storage_rbd::is_rbd_locator(cow) {
        d.cli_output(&["check", "--takeover", cow])
    } else {
        d.cli_output(&["check", cow])
    };
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(text)
    } else {
        Err(text)
    }
}

fn log_tail(d: &Daemon, n: usize) -> String {
    let log = d.log();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[test]
fn kill9_under_load() {
    let rounds = env_u64("SNAPMV_CRASH_ROUNDS", 20);
    let dir = scratch("crash-kill");
    let origin = dir.path().join("o.img");
    let cow = dir.path().join("c.img");
    sparse_file(&origin, VOL_SIZE);
    sparse_file(&cow, STORE_SIZE);
    let (origin, cow) = (origin.display().to_string(), cow.display().to_string());
    kill9_under_load_on(dir.path(), &origin, &cow, rounds);
}

/// The same with the origin and the store on Ceph RBD images (issue 18): every round's
/// `snapmv check` takes the killed daemon's images over (`--takeover`), and the restart
/// reopens them from the state. `SNAPMV_CRASH_RBD_ROUNDS` rounds (default 6); needs the Ceph
/// test cluster (skips loudly without it unless `SNAPMV_RBD_TESTS=1`).
#[test]
fn kill9_under_load_on_rbd() {
    let Some(c) = cluster("crash_kill::kill9_under_load_on_rbd") else {
        return;
    };
    let rounds = env_u64("SNAPMV_CRASH_RBD_ROUNDS", 6);
    let origin = Image::create(c, "kill-origin", &format!("{}M", VOL_SIZE >> 20), &[]);
    let store = Image::create(c, "kill-store", &format!("{}M", STORE_SIZE >> 20), &[]);
    let dir = scratch("crash-kill-rbd");
    kill9_under_load_on(dir.path(), &origin.locator(), &store.locator(), rounds);
}

fn kill9_under_load_on(dir: &Path, origin: &str, cow: &str, rounds: u64) {
    let seed = env_u64("SNAPMV_CRASH_SEED", fastrand::u64(..));
    eprintln!("kill9_under_load: {rounds} rounds on {cow}, SNAPMV_CRASH_SEED={seed}");
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut d = Daemon::start(dir);
    d.ok(
        "origin_create",
        json!({"name": "vol", "origin": origin, "cow": cow, "bind": true, "format": true}),
    );
    let snap_tag = d.ok(
        "snapshot_create",
        json!({"name": "vol", "memo": "exported"}),
    )["tag"]
        .as_u64()
        .unwrap() as u32;
    d.ok(
        "snapshot_export",
        json!({"name": "snap", "origin": origin, "cow": cow, "tag": snap_tag}),
    );

    let zero = vec![Content::Zero; BLOCKS as usize];
    let mut origin_now = zero.clone();
    let mut snap_now = zero;
    let mut snaps: BTreeMap<u32, Vec<Content>> = BTreeMap::new();
    let mut total = Stats::default();
    let mut checks = 0u64;
    let mut space: Vec<(u64, u64)> = Vec::new();

    for round in 0..rounds {
        let sh = Arc::new(Shared {
            origin: Mutex::new(VolModel::new(&origin_now)),
            snap: Mutex::new(VolModel::new(&snap_now)),
            snaps: Mutex::new(snaps.clone()),
            pending_create: Mutex::new(Vec::new()),
            pending_delete: Mutex::new(BTreeSet::new()),
            origin_gate: Mutex::new(()),
            snap_gate: Mutex::new(()),
            killed: AtomicBool::new(false),
            no_snap_of_snap: std::env::var_os("SNAPMV_CRASH_NO_SNAP_OF_SNAP").is_some(),
            failures: Mutex::new(Vec::new()),
            stats: Mutex::new(Stats::default()),
        });
        let (tx, rx) = std::sync::mpsc::channel();
        let mut threads = Vec::new();
        for (vol, name) in [(0u64, "vol"), (1, "snap")] {
            let (sh, sock, tx, s) = (sh.clone(), d.export_socket(name), tx.clone(), rng.u64(..));
            threads.push(thread::spawn(move || writer(sh, sock, vol, s, tx)));
        }
        rx.recv().unwrap();
        rx.recv().unwrap();
        {
            let (sh, sock, s) = (sh.clone(), d.rpc_socket.clone(), rng.u64(..));
            threads.push(thread::spawn(move || rpc_ops(sh, sock, s)));
        }
        thread::sleep(Duration::from_millis(rng.u64(20..400)));
        let mid_rollback = RpcClient::connect(&d.rpc_socket)
            .ok()
            .and_then(|mut c| c.call_raw("status", json!({"name": "vol"})).ok())
            .and_then(|st| st["stores"][0]["origins"][0].get("rollback").cloned())
            .is_some();
        d.kill();
        sh.killed.store(true, Ordering::SeqCst);
        for t in threads {
            t.join().expect("a test thread panicked");
        }
        let fails = sh.failures.lock().unwrap().clone();
        assert!(
            fails.is_empty(),
            "round {round} (seed {seed}): {fails:#?}\nlog:\n{}",
            d.log()
        );

        // The dead daemon's store checks clean.
        let report = run_check(&d, cow).unwrap_or_else(|e| {
            panic!("round {round} (seed {seed}): snapmv check after SIGKILL: {e}")
        });
        checks += 1;
        if round == 0 {
            eprintln!("check after the first kill: {}", report.trim());
        }

        d.restart();
        let mut bad = Vec::new();
        let got_origin = read_volume(&d.export_socket("vol"), false);
        let got_snap = read_volume(&d.export_socket("snap"), false);
        let (got_origin, got_snap) = match (got_origin, got_snap) {
            (Ok(o), Ok(s)) => (o, s),
            (o, s) => panic!(
                "round {round} (seed {seed}): garbage read back: {:?} {:?}\nlog (last 200 lines):\n{}",
                o.err(),
                s.err(),
                log_tail(&d, 200)
            ),
        };
        bad.extend(check_volume(
            &sh.origin.lock().unwrap(),
            "origin",
            &got_origin,
        ));
        bad.extend(check_volume(
            &sh.snap.lock().unwrap(),
            "exported snapshot",
            &got_snap,
        ));
        let lost: u64 = [(&sh.origin, &got_origin), (&sh.snap, &got_snap)]
            .iter()
            .map(|(m, got)| {
                let m = m.lock().unwrap();
                got.iter()
                    .enumerate()
                    .filter(|(b, c)| {
                        let h = &m.hist[*b];
                        h[m.last_acked[*b]..].iter().all(|x| x != *c)
                    })
                    .count() as u64
            })
            .sum();
        // The death of the process loses no acknowledged write, flushed or not.
        if lost > 0 {
            bad.push(format!(
                "{lost} acknowledged write(s) lost in the kill (blocks hold an older content than the last acknowledged write)"
            ));
        }

        // Snapshots: exactly the known ones (plus a create in flight, minus deletes in flight).
        let list = d.ok("snapshot_list", json!({"name": "vol"}));
        let listed: BTreeSet<u32> = list["origins"][0]["snapshots"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["tag"].as_u64().unwrap() as u32)
            .filter(|t| *t != snap_tag)
            .collect();
        let mut model_snaps = sh.snaps.lock().unwrap().clone();
        let pending_create = sh.pending_create.lock().unwrap().clone();
        let pending_delete = sh.pending_delete.lock().unwrap().clone();
        for t in model_snaps.keys().copied().collect::<Vec<_>>() {
            if !listed.contains(&t) {
                if pending_delete.contains(&t) {
                    model_snaps.remove(&t);
                } else {
                    bad.push(format!("snapshot {t} vanished"));
                }
            }
        }
        for t in &listed {
            if !model_snaps.contains_key(t) {
                match pending_create.first() {
                    Some(c) => {
                        model_snaps.insert(*t, c.clone());
                    }
                    None => bad.push(format!("snapshot {t} appeared from nowhere")),
                }
            }
        }
        for (t, want) in &model_snaps {
            d.ok(
                "snapshot_export",
                json!({"name": "verify", "origin": origin, "cow": cow, "tag": t, "readonly": true}),
            );
            match read_volume(&d.export_socket("verify"), true) {
                Ok(got) => {
                    for (b, (g, w)) in got.iter().zip(want).enumerate() {
                        if g != w {
                            bad.push(format!(
                                "snapshot {t} block {b}: holds {g:?}, was {w:?} when taken"
                            ));
                        }
                    }
                }
                Err(e) => bad.push(format!("snapshot {t}: {e}")),
            }
            d.ok("export_remove", json!({"name": "verify"}));
        }
        assert!(
            bad.is_empty(),
            "round {round} (seed {seed}):\n{}\nlog:\n{}",
            bad.join("\n"),
            d.log()
        );

        // The rollback (if any) finishes, and the origin reads the same before and after.
        let was_rolling = rollback_running(&d).is_some();
        let deadline = Instant::now() + Duration::from_secs(120);
        while let Some(r) = rollback_running(&d) {
            assert!(
                Instant::now() < deadline,
                "round {round} (seed {seed}): rollback still running after restart: {r}\n{}",
                d.log()
            );
            thread::sleep(Duration::from_millis(20));
        }
        if was_rolling {
            let again = read_volume(&d.export_socket("vol"), false).unwrap();
            assert_eq!(
                again, got_origin,
                "round {round} (seed {seed}): the origin changed when the rollback finished"
            );
        }

        let st = sh.stats.lock().unwrap().clone();
        total.writes += st.writes;
        total.flushes += st.flushes;
        total.creates += st.creates;
        total.deletes += st.deletes;
        total.rollbacks += st.rollbacks;
        total.refused += st.refused;
        total.lost_in_kill += lost;
        total.killed_mid_rollback += u64::from(mid_rollback);
        // Space: once reclaim has run, the store holds at most one chunk per block for each
        // live snapshot (the exported one included), plus one hidden image per rollback that
        // some snapshot still needs: never more than the volumes' size times that.
        let deadline = Instant::now() + Duration::from_secs(120);
        let (used, pending) = loop {
            let st = d.ok("status", json!({"name": "vol"}));
            let used = st["stores"][0]["chunks_used"].as_u64().unwrap();
            let pending = st["stores"][0]["origins"][0]["reclaim_pending_chunks"]
                .as_u64()
                .unwrap();
            if pending == 0 || Instant::now() > deadline {
                break (used, pending);
            }
            thread::sleep(Duration::from_millis(20));
        };
        space.push((used, model_snaps.len() as u64 + 1));
        // (This found the snapshot-of-snapshot space leak, see
        // tests/store_full.rs::snapshot_of_snapshot_then_delete_gives_the_space_back.)
        {
            let bound = BLOCKS * (model_snaps.len() as u64 + 3);
            assert!(
                used <= bound,
                "round {round} (seed {seed}): {used} chunks in use with {} snapshots of \
                 {BLOCKS} blocks (at most {bound} expected)",
                model_snaps.len() + 1
            );
        }
        if std::env::var_os("SNAPMV_CRASH_VERBOSE").is_some() {
            eprintln!(
                "round {round}: {used} chunks used, {pending} pending reclaim, {} snapshots",
                model_snaps.len() + 1
            );
        }
        origin_now = got_origin;
        snap_now = got_snap;
        snaps = model_snaps;
    }

    // A clean stop, and the store is still clean.
    let st = d.terminate();
    assert!(st.success(), "exit status {st}; log:\n{}", d.log());
    run_check(&d, cow).unwrap_or_else(|e| panic!("snapmv check after SIGTERM: {e}"));
    checks += 1;
    let max_used = space.iter().map(|s| s.0).max().unwrap_or(0);
    eprintln!(
        "kill9_under_load: first reads retried for the stale-memory bug: {}",
        STALE_MEM_RETRIES.load(Ordering::SeqCst)
    );
    eprintln!(
        "kill9_under_load: most chunks in use after a round: {max_used} (per round, with live \
         snapshots: {space:?})"
    );
    eprintln!(
        "kill9_under_load: {rounds} rounds, {checks} checks clean; {total:?} \
         (lost_in_kill counts acknowledged writes not found after a kill: must be 0)"
    );
}

/// The verification pattern above, alone: export a snapshot, connect a fresh blkio client,
/// read, remove the export — many times. About one first read in 750 used to fail with EIO,
/// the daemon logging "request refused: guest buffer … is not inside guest memory": the request
/// was translated with a memory map older than the client's (acknowledged) ADD_MEM_REG. It made
/// two 1,000-round runs of `kill9_under_load` fail; fixed in the vhost_blk device (549632f).
/// `SNAPMV_REEXPORTS` (default 300; 2,000 by hand).
#[test]
fn fresh_export_serves_its_first_request() {
    let n = env_u64("SNAPMV_REEXPORTS", 300);
    let dir = scratch("reexport");
    let origin = dir.path().join("o.img");
    let cow = dir.path().join("c.img");
    sparse_file(&origin, VOL_SIZE);
    sparse_file(&cow, STORE_SIZE);
    let d = Daemon::start(dir.path());
    d.ok(
        "origin_create",
        json!({"name": "vol", "origin": origin, "cow": cow, "bind": true, "format": true}),
    );
    let t = d.ok("snapshot_create", json!({"name": "vol"}))["tag"]
        .as_u64()
        .unwrap();
    let mut failed = Vec::new();
    for i in 0..n {
        d.ok(
            "snapshot_export",
            json!({"name": "verify", "origin": origin, "cow": cow, "tag": t, "readonly": true}),
        );
        let mut c = Client::connect_with(
            &d.export_socket("verify"),
            &ClientOptions {
                read_only: true,
                ..Default::default()
            },
        )
        .unwrap();
        let p = c.ptr(0);
        let r = run1(&mut c.queues[0], |q| q.read(0, p, 4096, 0, NO_FLAGS)).unwrap();
        if r != 0 {
            failed.push((i, r));
        }
        drop(c);
        d.ok("export_remove", json!({"name": "verify"}));
    }
    assert!(
        failed.is_empty(),
        "{} of {n} first reads failed: {failed:?}\nwarnings and errors in the log:\n{}",
        failed.len(),
        d.log()
            .lines()
            .filter(|l| l.contains("WARN") || l.contains("ERROR"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}
