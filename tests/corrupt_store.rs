//! Corrupted stores (issue 7, item 5): bits flipped and the file truncated at each metadata
//! structure — both superblock slots, the checkpoint, the allocation bitmap, journal batches,
//! the data area. Opening fails with an error that names the damage (or, for one bad
//! superblock slot or a torn journal tail, opens from the good copy, by design), `snapmv check`
//! reports it, `snapmv check --repair` fixes what is derivable (the allocation bitmap), and the
//! daemon refuses to serve a store that fails its checks.
//!
//! Field offsets are those of docs/format.md (superblock: generation at 12, ckpt_off 24,
//! ckpt_size 32, journal_off 40, journal_size 48, data_off 56, data_chunks 64, ckpt_slot 72,
//! ckpt_len 76, ckpt_crc 84, journal_gen 88, journal_seq 96, boot id 104, crc 120 (format
//! version 2); checkpoint: magic, data
//! chunks, bitmap word count at 16, bitmap words from 20; batch header: magic, gen, seq,
//! payload length, crc, padding).

use std::path::{Path, PathBuf};

use serde_json::json;
use snapmv_engine::{Error, FormatOptions, Store};
use snapmv_tests::daemon::{scratch, sparse_file, Daemon};

const SB_SLOT: u64 = 4096;
const ORIGIN_SIZE: u64 = 256 << 10;
const STORE_SIZE: u64 = 8 << 20;
const ORIGIN_ID: &str = "disk";

/// CRC-32C (Castagnoli), as the format uses (bitwise; only for re-sealing edited metadata).
fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82f6_3b78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn u32_at(b: &[u8], off: u64) -> u32 {
    u32::from_le_bytes(b[off as usize..off as usize + 4].try_into().unwrap())
}
fn u64_at(b: &[u8], off: u64) -> u64 {
    u64::from_le_bytes(b[off as usize..off as usize + 8].try_into().unwrap())
}
fn put_u32(b: &mut [u8], off: u64, v: u32) {
    b[off as usize..off as usize + 4].copy_from_slice(&v.to_le_bytes());
}

#[derive(Debug, Clone, Copy)]
struct Sb {
    at: u64,
    generation: u64,
    ckpt_off: u64,
    ckpt_size: u64,
    journal_off: u64,
    data_off: u64,
    data_chunks: u64,
    ckpt_slot: u64,
    ckpt_len: u64,
    journal_gen: u64,
    journal_seq: u64,
}

/// Both slots, parsed without checks (only for slots that carry the magic).
fn slots(img: &[u8]) -> Vec<Sb> {
    (0..2)
        .map(|s| s * SB_SLOT)
        .filter(|&at| &img[at as usize..at as usize + 8] == b"SNAPMVSB")
        .map(|at| Sb {
            at,
            generation: u64_at(img, at + 12),
            ckpt_off: u64_at(img, at + 24),
            ckpt_size: u64_at(img, at + 32),
            journal_off: u64_at(img, at + 40),
            data_off: u64_at(img, at + 56),
            data_chunks: u64_at(img, at + 64),
            ckpt_slot: u32_at(img, at + 72) as u64,
            ckpt_len: u64_at(img, at + 76),
            journal_gen: u64_at(img, at + 88),
            journal_seq: u64_at(img, at + 96),
        })
        .collect()
}

fn current(img: &[u8]) -> Sb {
    slots(img)
        .into_iter()
        .max_by_key(|s| s.generation)
        .expect("a superblock")
}

fn ckpt_at(sb: &Sb) -> u64 {
    sb.ckpt_off + sb.ckpt_slot * sb.ckpt_size
}

/// Recomputes the CRC of the superblock slot at `sb.at` (version 2: over bytes 0..120).
fn reseal_sb(img: &mut [u8], sb: &Sb) {
    let crc = crc32c(&img[sb.at as usize..sb.at as usize + 120]);
    put_u32(img, sb.at + 120, crc);
}

/// Journal batches of the current pass: (byte offset in the store, total length).
fn batches(img: &[u8]) -> Vec<(u64, u64)> {
    let sb = current(img);
    let mut out = Vec::new();
    let mut pos = sb.journal_off;
    let mut seq = sb.journal_seq;
    loop {
        if u32_at(img, pos) != 0x4a4d_5653
            || u64_at(img, pos + 4) != sb.journal_gen
            || u64_at(img, pos + 12) != seq
        {
            return out;
        }
        let len = (32 + u32_at(img, pos + 20) as u64).div_ceil(512) * 512;
        out.push((pos, len));
        pos += len;
        seq += 1;
    }
}

struct Fixture {
    dir: tempfile::TempDir,
    origin: PathBuf,
    /// A cleanly closed store.
    clean: Vec<u8>,
    /// The same store while open, with journal batches not yet folded into a checkpoint.
    journalled: Vec<u8>,
    daemon: Daemon,
    n: std::cell::Cell<u32>,
}

fn fixture() -> Fixture {
    let dir = scratch("corrupt");
    let origin = dir.path().join("origin.img");
    let cow = dir.path().join("base.cow");
    sparse_file(&origin, ORIGIN_SIZE);
    sparse_file(&cow, STORE_SIZE);
    Store::format(&cow, &FormatOptions::default()).unwrap();
    {
        let store = Store::open(&cow, false).unwrap();
        let o = store.bind_origin(ORIGIN_ID, &origin, false).unwrap();
        let v = o.volume();
        for i in 0..16u64 {
            v.write(i * 4096, &[i as u8 + 1; 4096]).unwrap();
        }
        let s1 = o.create_snapshot(None, "one").unwrap();
        for i in 0..8u64 {
            v.write(i * 4096, &[0x80 | i as u8; 4096]).unwrap();
        }
        let s2 = o.create_snapshot(Some(s1), "two").unwrap();
        o.snapshot_volume(s2)
            .unwrap()
            .write(40960, &[0x55; 4096])
            .unwrap();
        v.flush().unwrap();
    }
    // Everything so far is in the journal. Fold it into a checkpoint written to both
    // superblock slots, the documented way: `check --repair` of a store with a bad slot 1.
    {
        let mut img = std::fs::read(&cow).unwrap();
        // Damage the slot that is not current (it holds an older copy).
        let old = slots(&img)
            .into_iter()
            .min_by_key(|s| s.generation)
            .expect("two slots");
        img[old.at as usize + 20] ^= 0xff;
        std::fs::write(&cow, &img).unwrap();
        let r = snapmv_engine::check(&cow, true).unwrap();
        assert!(r.is_clean() && !r.repaired.is_empty(), "{r:?}");
    }
    let clean = std::fs::read(&cow).unwrap();
    // More changes, in the journal of the new pass; the image is taken while the store is open.
    let journalled = {
        let store = Store::open(&cow, false).unwrap();
        let o = store.open_origin(ORIGIN_ID, &origin, false).unwrap();
        let v = o.volume();
        let s3 = o.create_snapshot(None, "three").unwrap();
        v.write(12 * 4096, &[0x77; 4096]).unwrap();
        o.delete_snapshot(s3).unwrap();
        v.write(13 * 4096, &[0x78; 4096]).unwrap();
        v.flush().unwrap();
        store.sync().unwrap();
        std::fs::read(&cow).unwrap()
    };
    assert!(
        batches(&journalled).len() >= 2,
        "the open store's journal should hold several batches"
    );
    std::fs::create_dir(dir.path().join("d")).unwrap();
    let daemon = Daemon::start(&dir.path().join("d"));
    Fixture {
        dir,
        origin,
        clean,
        journalled,
        daemon,
        n: std::cell::Cell::new(0),
    }
}

impl Fixture {
    fn write(&self, img: &[u8]) -> PathBuf {
        self.n.set(self.n.get() + 1);
        let p = self.dir.path().join(format!("case{}.cow", self.n.get()));
        std::fs::write(&p, img).unwrap();
        p
    }

    /// `snapmv check [--repair]`: (success, output).
    fn check(&self, cow: &Path, repair: bool) -> (bool, String) {
        let mut args = vec!["check".to_string(), cow.display().to_string()];
        if repair {
            args.push("--repair".into());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = self.daemon.cli_output(&args);
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }

    /// The daemon's `origin_create` on the store (no format): Ok, or the error (code, message).
    fn serve(&self, cow: &Path) -> Result<(), (i64, String)> {
        // Each case with its own copy of the origin: the daemon remembers which store an
        // origin file belongs to.
        self.n.set(self.n.get() + 1);
        let name = format!("case{}", self.n.get());
        let origin = self.dir.path().join(format!("{name}.origin"));
        std::fs::copy(&self.origin, &origin).unwrap();
        match self.daemon.call(
            "origin_create",
            json!({"name": name, "origin": origin, "cow": cow, "origin_id": ORIGIN_ID}),
        ) {
            Ok(_) => {
                self.daemon.ok("export_remove", json!({"name": name}));
                Ok(())
            }
            Err(snapmv_rpc::RpcError::Remote(e)) => Err((e.code, e.message)),
            Err(e) => panic!("origin_create: {e}"),
        }
    }

    /// The damage must be refused everywhere, naming `needle`; repair cannot fix it.
    fn expect_refused(&self, img: &[u8], needle: &str) {
        let p = self.write(img);
        match Store::open(&p, false) {
            Ok(_) => panic!("{}: opened a store damaged at {needle}", p.display()),
            Err(e @ Error::Corrupt { .. }) => {
                let m = e.to_string();
                assert!(
                    m.contains(needle),
                    "open error does not name {needle:?}: {m}"
                );
                assert!(m.contains(&p.display().to_string()), "{m}");
            }
            Err(e) => panic!("open: expected a Corrupt error naming {needle:?}, got {e}"),
        }
        let (ok, out) = self.check(&p, false);
        assert!(!ok && out.contains(needle), "check:\n{out}");
        let (ok, out) = self.check(&p, true);
        assert!(!ok && out.contains(needle), "check --repair:\n{out}");
        let (code, msg) = self
            .serve(&p)
            .expect_err("the daemon served a damaged store");
        assert_eq!(code, snapmv_rpc::codes::CORRUPT, "{msg}");
        assert!(msg.contains(needle), "origin_create error: {msg}");
    }

    /// The store opens and checks clean; the daemon serves it; returns `check`'s output.
    fn expect_opens(&self, img: &[u8]) -> String {
        let p = self.write(img);
        // Check first: opening writes a checkpoint, which rewrites a damaged slot.
        let report = self.check(&p, false).1;
        let s = Store::open(&p, false).unwrap_or_else(|e| panic!("open: {e}"));
        let o = s.open_origin(ORIGIN_ID, &self.origin, false).unwrap();
        let tags: Vec<u32> = o.snapshots().iter().map(|s| s.tag).collect();
        assert_eq!(tags, vec![1, 2], "snapshots after opening the damaged copy");
        drop((o, s));
        self.serve(&p)
            .unwrap_or_else(|e| panic!("origin_create: {e:?}"));
        report
    }
}

#[test]
fn superblock_damage() {
    let f = fixture();
    let sl = slots(&f.clean);
    assert_eq!(
        sl.len(),
        2,
        "a closed store has both superblock slots written"
    );
    let cur = current(&f.clean);
    let other = sl.iter().find(|s| s.at != cur.at).copied().unwrap();

    // One slot bad (either): opens from the other, by design; check names the bad slot and
    // repair rewrites it.
    for (bad, label) in [(cur, "current"), (other, "older")] {
        let mut img = f.clean.clone();
        img[bad.at as usize + 30] ^= 0x04;
        let out = f.expect_opens(&img);
        let slot = bad.at / SB_SLOT;
        assert!(
            out.contains(&format!("superblock slot {slot}")),
            "check of a store with a bad {label} slot:\n{out}"
        );
        let p = f.write(&img);
        let (ok, out) = f.check(&p, true);
        assert!(ok && out.contains("rewrote both superblock slots"), "{out}");
        let (ok, out) = f.check(&p, false);
        assert!(ok, "check after repair:\n{out}");
    }

    // Both slots bad: refused, naming both.
    let mut img = f.clean.clone();
    img[30] ^= 1;
    img[SB_SLOT as usize + 30] ^= 1;
    f.expect_refused(&img, "superblock slot 0");
    f.expect_refused(&img, "superblock slot 1");

    // Not a store (magic gone from both).
    let mut img = f.clean.clone();
    img[0] = b'X';
    img[SB_SLOT as usize] = b'X';
    f.expect_refused(&img, "not a snapmv");

    // A future format version, correctly sealed.
    let mut img = f.clean.clone();
    for s in &sl {
        put_u32(&mut img, s.at + 8, 5);
        reseal_sb(&mut img, s);
    }
    f.expect_refused(&img, "format version 5 is not supported");

    // Sealed but nonsensical: areas overlapping.
    let mut img = f.clean.clone();
    for s in &sl {
        img[s.at as usize + 40..s.at as usize + 48].copy_from_slice(&8192u64.to_le_bytes());
        reseal_sb(&mut img, s);
    }
    f.expect_refused(&img, "overlap");
}

#[test]
fn checkpoint_damage() {
    let f = fixture();
    let cur = current(&f.clean);
    let at = ckpt_at(&cur);
    // A flipped bit anywhere in the current checkpoint: its checksum names it.
    for off in [0, 9, 20, cur.ckpt_len / 2, cur.ckpt_len - 1] {
        let mut img = f.clean.clone();
        img[(at + off) as usize] ^= 0x10;
        f.expect_refused(&img, &format!("checkpoint in area {}", cur.ckpt_slot));
    }
}

/// The allocation bitmap disagrees with the exceptions (checkpoint resealed, so only the
/// cross-check can see it): refused until `check --repair` rebuilds it from the exceptions.
#[test]
fn allocation_bitmap_damage_is_repaired() {
    let f = fixture();
    let cur = current(&f.clean);
    let at = ckpt_at(&cur) as usize;
    let words = u32_at(&f.clean, at as u64 + 16) as usize;
    assert!(words >= 1);
    let w0 = u64_at(&f.clean, at as u64 + 20);
    assert_ne!(w0, 0, "the fixture uses some chunks");
    for (what, word) in [
        ("leaked", w0 | (1 << 63)), // a chunk marked used that nothing references
        ("lost", w0 & (w0 - 1)),    // a referenced chunk marked free
    ] {
        let mut img = f.clean.clone();
        img[at + 20..at + 28].copy_from_slice(&word.to_le_bytes());
        let crc = crc32c(&img[at..at + cur.ckpt_len as usize]);
        put_u32(&mut img, cur.at + 84, crc);
        reseal_sb(&mut img, &cur);
        let p = f.write(&img);
        let e = Store::open(&p, false).expect_err(what);
        assert!(matches!(e, Error::Corrupt { .. }), "{what}: {e}");
        let (ok, out) = f.check(&p, false);
        assert!(!ok && out.contains("problem"), "{what}: check:\n{out}");
        let (code, msg) = f
            .serve(&p)
            .expect_err("served a store that fails its checks");
        assert_eq!(code, snapmv_rpc::codes::CORRUPT, "{what}: {msg}");
        let (ok, out) = f.check(&p, true);
        assert!(
            ok && out.contains("rebuilt the allocation bitmap"),
            "{what}: check --repair:\n{out}"
        );
        let (ok, out) = f.check(&p, false);
        assert!(ok, "{what}: check after repair:\n{out}");
        f.serve(&p)
            .unwrap_or_else(|e| panic!("{what}: not served after repair: {e:?}"));
        let s = Store::open(&p, false).unwrap();
        let o = s.open_origin(ORIGIN_ID, &f.origin, false).unwrap();
        assert_eq!(o.snapshots().len(), 2);
    }
}

#[test]
fn journal_damage() {
    let f = fixture();
    let b = batches(&f.journalled);
    // The journalled image itself is fine.
    f.expect_opens(&f.journalled);
    // A torn tail (the last batch's payload damaged): by design it is the end of the journal.
    let (last, len) = *b.last().unwrap();
    let mut img = f.journalled.clone();
    img[(last + len - 1) as usize] ^= 0xff;
    img[(last + 40) as usize] ^= 0xff;
    let p = f.write(&img);
    let s = Store::open(&p, false).unwrap_or_else(|e| panic!("torn tail: {e}"));
    drop(s);
    let (ok, out) = f.check(&p, false);
    assert!(ok, "torn tail: check:\n{out}");
}

/// A batch in the middle of the journal damaged while later batches are intact is media
/// damage, not a torn write (batches are written in order, each after the previous one is
/// durable): the later batches hold committed metadata that replay silently drops.
#[test]
fn journal_damage_in_the_middle_is_reported() {
    let f = fixture();
    let b = batches(&f.journalled);
    let (first, _) = b[0];
    let mut img = f.journalled.clone();
    img[(first + 40) as usize] ^= 0xff;
    f.expect_refused(&img, "journal batch");
}

#[test]
fn truncated_store() {
    let f = fixture();
    let cur = current(&f.clean);
    let end = cur.data_off + cur.data_chunks * 4096;
    assert!(end <= f.clean.len() as u64);
    // Cut in the data area, in the journal, in the checkpoints, in superblock slot 1.
    for len in [
        end - 4096,
        cur.data_off + 4096,
        cur.journal_off + 512,
        ckpt_at(&cur) + 100,
        SB_SLOT + 100,
    ] {
        f.expect_refused(&f.clean[..len as usize], "truncated");
    }
}
