//! Lock files: a file held with an exclusive `flock` for as long as its owner lives (the RPC
//! socket's `PATH.lock`, the state directory's `lock`). The kernel drops the lock when the
//! process dies, so a crashed daemon never leaves a stale lock.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use rustix::fs::{flock, FlockOperation};

/// Why a lock file could not be taken.
#[derive(Debug)]
pub enum LockError {
    /// Another open file description holds the lock (another process, usually).
    Held,
    /// The file could not be opened or created.
    Open(std::io::Error),
    /// `flock` failed for another reason.
    Lock(std::io::Error),
}

/// Opens (creating it, mode 0600) and locks `path` exclusively without waiting; the lock lasts
/// as long as the returned file is open.
pub fn lock_exclusive(path: &Path) -> Result<File, LockError> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map_err(LockError::Open)?;
    match flock(&f, FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(f),
        Err(rustix::io::Errno::WOULDBLOCK) => Err(LockError::Held),
        Err(e) => Err(LockError::Lock(e.into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_is_refused_until_the_first_is_dropped() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("lock");
        let first = lock_exclusive(&p).unwrap();
        assert!(matches!(lock_exclusive(&p), Err(LockError::Held)));
        drop(first);
        lock_exclusive(&p).unwrap();
        assert!(matches!(
            lock_exclusive(&d.path().join("missing/lock")),
            Err(LockError::Open(_))
        ));
    }
}
