//! `check` and `repair` of a store that no process has open.

use crate::error::{Error, Result};
use crate::ondisk::{self, Superblock, SB_SLOT};
use crate::recovery::{load_meta, read_superblock};
use crate::storage::{FileStorage, OpenMode, Storage};
use std::path::Path;

/// What `check` found and what `repair` changed.
#[derive(Debug, Default, Clone)]
pub struct CheckReport {
    /// Each problem, one sentence naming where.
    pub problems: Vec<String>,
    /// What repair changed.
    pub repaired: Vec<String>,
    /// Chunks in use.
    pub chunks_used: u64,
    /// Data chunks in all.
    pub chunks_total: u64,
    /// Origins bound.
    pub origins: usize,
    /// Live snapshots over all origins.
    pub snapshots: usize,
    /// Neither superblock slot starts with the snapmv magic: the file is not a store at all
    /// (`problems` then holds that one sentence).
    pub not_a_store: bool,
}

impl CheckReport {
    /// No problem left.
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Checks the store at `path`; with `repair`, rebuilds what can be derived. The store is
/// opened exclusively ([`FileStorage::open_with`]): a store another process has open is
/// refused with an I/O error of kind `ResourceBusy` naming the holder
/// ([`crate::storage::in_use`]). Without `repair` it is opened read-only.
pub fn check(path: &Path, repair: bool) -> Result<CheckReport> {
    let st = FileStorage::open_with(
        path,
        OpenMode {
            direct: false,
            readonly: !repair,
        },
    )
    .map_err(|e| Error::io(format!("opening COW store {}", path.display()), e))?;
    check_storage(&st, repair)
}

/// Checks a store on any storage.
pub fn check_storage(storage: &dyn Storage, repair: bool) -> Result<CheckReport> {
    let mut report = CheckReport::default();
    let name = storage.name().to_string();
    // Both superblock slots: a bad slot is worth reporting even when the other is good.
    let mut slot_bad = [false; 2];
    let mut magic = [false; 2];
    for (slot, bad) in slot_bad.iter_mut().enumerate() {
        let mut buf = vec![0u8; SB_SLOT as usize];
        storage
            .read_at(&mut buf, slot as u64 * SB_SLOT)
            .map_err(|e| Error::io(format!("reading COW store {name}"), e))?;
        magic[slot] = buf.starts_with(ondisk::SB_MAGIC);
        if buf.iter().all(|&b| b == 0) {
            // A store formatted by snapmv before both slots were written at format time: one
            // copy only until its second checkpoint. Repair writes both.
            *bad = true;
            report.problems.push(format!(
                "superblock slot {slot} (byte {}) is blank: the store has a single copy of its superblock",
                slot as u64 * SB_SLOT
            ));
            continue;
        }
        if let Err(e) = Superblock::decode(&buf) {
            *bad = true;
            report.problems.push(format!(
                "superblock slot {slot} (byte {}): {e}",
                slot as u64 * SB_SLOT
            ));
        }
    }
    if !magic[0] && !magic[1] {
        report.not_a_store = true;
        report.problems = vec![format!(
            "{name} is not a snapmv COW store (no snapmv superblock in either slot)"
        )];
        return Ok(report);
    }
    let sb = match read_superblock(storage) {
        Ok(sb) => sb,
        Err(e) => {
            report.problems.push(e.to_string());
            return Ok(report);
        }
    };
    let mut meta = match load_meta(storage, &sb) {
        Ok(r) => r.meta,
        Err(e) => {
            report.problems.push(e.to_string());
            return Ok(report);
        }
    };
    report.problems.extend(meta.validate());
    report.chunks_total = meta.data_chunks;
    report.origins = meta.origins.len();
    report.snapshots = meta.origins.values().map(|o| o.tags.len()).sum();
    if repair && !report.problems.is_empty() {
        let changed = meta.rebuild_alloc();
        if changed > 0 {
            report.repaired.push(format!(
                "rebuilt the allocation bitmap from the exceptions ({changed} chunks corrected)"
            ));
        }
        let remaining = meta.validate();
        if remaining.is_empty() {
            // Write the repaired state as a new checkpoint, and both superblock slots.
            ondisk::write_checkpoint(storage, &sb, &meta, sb.boot, true).map_err(|e| {
                Error::io(
                    format!("repairing COW store {name}"),
                    match e {
                        ondisk::CheckpointWriteError::Io { source, .. } => source,
                        other => std::io::Error::other(other.to_string()),
                    },
                )
            })?;
            if slot_bad.iter().any(|b| *b) {
                report.repaired.push("rewrote both superblock slots".into());
            }
            report
                .repaired
                .push("wrote a fresh checkpoint with the journal folded in".into());
            report.problems.clear();
        } else {
            report.problems = remaining;
        }
    }
    report.chunks_used = (0..meta.data_chunks)
        .filter(|&c| crate::meta::bit_get(&meta.alloc, c))
        .count() as u64;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{FormatOptions, Store};

    fn formatted(len: u64) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("store.cow");
        std::fs::File::create(&p).unwrap().set_len(len).unwrap();
        Store::format(&p, &FormatOptions::default()).unwrap();
        (dir, p)
    }

    /// A fresh store has both superblock slots, so one damaged slot is survivable at once.
    #[test]
    fn fresh_store_survives_a_damaged_slot() {
        let (_d, p) = formatted(16 << 20);
        for slot in 0..2u64 {
            let f = std::fs::read(&p).unwrap();
            let sb = &f[(slot * SB_SLOT) as usize..((slot + 1) * SB_SLOT) as usize];
            assert!(Superblock::decode(sb).is_ok(), "slot {slot} after format");
        }
        assert!(check(&p, false).unwrap().is_clean());
        // One byte flipped in slot 0 (the newest: generation 2).
        let mut f = std::fs::read(&p).unwrap();
        f[20] ^= 0xff;
        std::fs::write(&p, &f).unwrap();
        let r = check(&p, false).unwrap();
        assert_eq!(r.problems.len(), 1, "{:?}", r.problems);
        assert!(r.problems[0].contains("slot 0"), "{:?}", r.problems);
        let r = check(&p, true).unwrap();
        assert!(r.is_clean(), "{:?}", r.problems);
        assert!(r
            .repaired
            .iter()
            .any(|x| x.contains("both superblock slots")));
        assert!(check(&p, false).unwrap().is_clean());
        drop(Store::open(&p, false).unwrap());
    }

    #[test]
    fn a_file_that_is_not_a_store_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("plain");
        std::fs::write(&p, vec![7u8; 1 << 20]).unwrap();
        let r = check(&p, false).unwrap();
        assert!(r.not_a_store);
        assert_eq!(r.problems.len(), 1, "{:?}", r.problems);
        assert!(r.problems[0].contains("is not a snapmv COW store"));
    }
}
