//! The daemon's persistent state: which stores, origins and exports it serves.
//!
//! Kept in `STATE_DIR/state.json`, rewritten atomically after every change (write a temporary
//! file, fsync it, rename it over the old one, fsync the directory), so a crash at any moment
//! leaves either the old or the new state. `STATE_DIR/lock` is held with `flock` while a daemon
//! runs, so two daemons never share a state directory.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::lockfile::{lock_exclusive, LockError};

/// Version of the state file format.
pub const STATE_VERSION: u32 = 1;

/// What can go wrong with the state directory.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// A file operation failed.
    #[error("state directory {dir}: {what}: {source}")]
    Io {
        /// The state directory.
        dir: PathBuf,
        /// What was being done.
        what: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The path exists and is not a directory.
    #[error("state directory {dir} is not a directory")]
    NotADirectory {
        /// The path.
        dir: PathBuf,
    },
    /// Another daemon holds the lock.
    #[error("state directory {dir} is in use by another snapmv daemon (its lock file is held)")]
    Locked {
        /// The state directory.
        dir: PathBuf,
    },
    /// The state file cannot be decoded.
    #[error("state file {file} is not valid: {source}")]
    Invalid {
        /// The state file.
        file: PathBuf,
        /// The decoder's error.
        #[source]
        source: serde_json::Error,
    },
    /// The state file was written by a newer version.
    #[error("state file {file} has version {version}; this snapmv reads version {STATE_VERSION}")]
    Version {
        /// The state file.
        file: PathBuf,
        /// Its version.
        version: u32,
    },
}

/// A COW store the daemon has open.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreRecord {
    /// Canonical path.
    pub path: String,
    /// Opened with O_DIRECT.
    pub direct: bool,
}

/// An origin the daemon knows: its id in a store and its path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OriginRecord {
    /// Canonical path of the store.
    pub cow: String,
    /// Id inside the store.
    pub origin_id: String,
    /// Canonical path of the origin.
    pub path: String,
    /// Opened with O_DIRECT.
    pub direct: bool,
}

/// An export.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportRecord {
    /// Export name.
    pub name: String,
    /// vhost-user socket path.
    pub socket: String,
    /// Canonical path of the store.
    pub cow: String,
    /// Origin id inside the store.
    pub origin_id: String,
    /// Snapshot tag; `None` for the origin.
    pub tag: Option<u32>,
    /// Number of virtqueues.
    pub num_queues: u16,
    /// Virtqueue size.
    pub queue_size: u16,
    /// Served read-only.
    pub readonly: bool,
    /// Group (gid) of the socket, if set for this export (else the daemon's default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket_group: Option<u32>,
    /// Mode of the socket, if set for this export (else the daemon's default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket_mode: Option<u32>,
    /// `"nbd"` for an NBD export; absent: vhost-user-blk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    /// The name the export was created with, once it has been renamed: the disk's serial
    /// (GET_ID) and the guest's cache-mode file keep following it, so a guest sees the same
    /// disk after a rename and a restart. Absent: `name`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
}

impl ExportRecord {
    /// The disk's identity: its serial and the key of its cache-mode file.
    pub fn identity(&self) -> &str {
        self.serial.as_deref().unwrap_or(&self.name)
    }
}

/// Everything in the state file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    /// Format version ([`STATE_VERSION`]).
    pub version: u32,
    /// Stores in use by at least one export.
    pub stores: Vec<StoreRecord>,
    /// Origins known to the daemon (kept until `origin_delete`, so that `snapshot_export` can
    /// name an origin by id).
    pub origins: Vec<OriginRecord>,
    /// Exports, sorted by name.
    pub exports: Vec<ExportRecord>,
}

impl Default for State {
    fn default() -> Self {
        State {
            version: STATE_VERSION,
            stores: Vec::new(),
            origins: Vec::new(),
            exports: Vec::new(),
        }
    }
}

impl State {
    /// The export named `name`.
    pub fn export(&self, name: &str) -> Option<&ExportRecord> {
        self.exports.iter().find(|e| e.name == name)
    }

    /// The origin record for `origin_id` in store `cow`.
    pub fn origin(&self, cow: &str, origin_id: &str) -> Option<&OriginRecord> {
        self.origins
            .iter()
            .find(|o| o.cow == cow && o.origin_id == origin_id)
    }

    /// The path of origin `origin_id` of store `cow`; empty if it is not recorded.
    pub fn origin_path(&self, cow: &str, origin_id: &str) -> String {
        self.origin(cow, origin_id)
            .map(|o| o.path.clone())
            .unwrap_or_default()
    }

    /// The store record for `cow`.
    pub fn store(&self, cow: &str) -> Option<&StoreRecord> {
        self.stores.iter().find(|s| s.path == cow)
    }

    /// Records an origin unless its store and id are recorded already.
    pub fn record_origin(&mut self, rec: OriginRecord) {
        if self.origin(&rec.cow, &rec.origin_id).is_none() {
            self.origins.push(rec);
        }
    }

    /// Records store `cow` unless it is recorded already (with its own `direct`).
    pub fn record_store(&mut self, cow: &str, direct: bool) {
        if self.store(cow).is_none() {
            self.stores.push(StoreRecord {
                path: cow.to_string(),
                direct,
            });
        }
    }

    /// The names of the exports of origin `origin_id` of store `cow` (`tag` `None`) or of its
    /// snapshot `tag`, in the state's order.
    pub fn exported_as(&self, cow: &str, origin_id: &str, tag: Option<u32>) -> Vec<String> {
        self.exports
            .iter()
            .filter(|e| e.cow == cow && e.origin_id == origin_id && e.tag == tag)
            .map(|e| e.name.clone())
            .collect()
    }

    /// Puts the state in its saved form: exports sorted by name, only the stores they use.
    pub fn normalise(&mut self) {
        self.exports.sort_by(|a, b| a.name.cmp(&b.name));
        let exports = &self.exports;
        self.stores
            .retain(|s| exports.iter().any(|e| e.cow == s.path));
    }
}

/// The locked state directory.
#[derive(Debug)]
pub struct StateDir {
    dir: PathBuf,
    file: PathBuf,
    _lock: File,
}

impl StateDir {
    /// Creates (mode 0700) and locks the directory, and reads the state (empty if no file yet).
    pub fn open(dir: &Path) -> Result<(StateDir, State), StateError> {
        let io_err = |what: &str| {
            let dir = dir.to_path_buf();
            let what = what.to_string();
            move |source| StateError::Io { dir, what, source }
        };
        if dir.exists() && !dir.is_dir() {
            return Err(StateError::NotADirectory {
                dir: dir.to_path_buf(),
            });
        }
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io_err("creating the directory"))?;
        let lock = match lock_exclusive(&dir.join("lock")) {
            Ok(f) => f,
            Err(LockError::Held) => {
                return Err(StateError::Locked {
                    dir: dir.to_path_buf(),
                })
            }
            Err(LockError::Open(e)) => return Err(io_err("opening the lock file")(e)),
            Err(LockError::Lock(e)) => return Err(io_err("locking the lock file")(e)),
        };
        let file = dir.join("state.json");
        let state = match fs::read(&file) {
            Ok(bytes) => {
                let state: State =
                    serde_json::from_slice(&bytes).map_err(|source| StateError::Invalid {
                        file: file.clone(),
                        source,
                    })?;
                if state.version != STATE_VERSION {
                    return Err(StateError::Version {
                        file,
                        version: state.version,
                    });
                }
                state
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => State::default(),
            Err(e) => return Err(io_err("reading state.json")(e)),
        };
        // A temporary file left by a crash during `save` is garbage.
        let _ = fs::remove_file(dir.join("state.json.tmp"));
        Ok((
            StateDir {
                dir: dir.to_path_buf(),
                file,
                _lock: lock,
            },
            state,
        ))
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Writes `state` atomically and durably.
    pub fn save(&self, state: &State) -> Result<(), StateError> {
        let io_err = |what: &'static str| {
            let dir = self.dir.clone();
            move |source| StateError::Io {
                dir,
                what: what.to_string(),
                source,
            }
        };
        let mut bytes = serde_json::to_vec_pretty(state).map_err(|source| StateError::Invalid {
            file: self.file.clone(),
            source,
        })?;
        bytes.push(b'\n');
        let tmp = self.dir.join("state.json.tmp");
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io_err("creating state.json.tmp"))?;
        f.set_permissions(fs::Permissions::from_mode(0o600))
            .map_err(io_err("setting the mode of state.json.tmp"))?;
        f.write_all(&bytes)
            .map_err(io_err("writing state.json.tmp"))?;
        f.sync_all().map_err(io_err("syncing state.json.tmp"))?;
        drop(f);
        fs::rename(&tmp, &self.file).map_err(io_err("renaming state.json.tmp to state.json"))?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err("syncing the directory"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> State {
        State {
            version: STATE_VERSION,
            stores: vec![StoreRecord {
                path: "/c".into(),
                direct: false,
            }],
            origins: vec![OriginRecord {
                cow: "/c".into(),
                origin_id: "o".into(),
                path: "/o".into(),
                direct: true,
            }],
            exports: vec![ExportRecord {
                name: "e".into(),
                socket: "/s/e.sock".into(),
                cow: "/c".into(),
                origin_id: "o".into(),
                tag: Some(3),
                num_queues: 2,
                queue_size: 128,
                readonly: true,
                socket_group: Some(65534),
                socket_mode: Some(0o660),
                protocol: None,
                serial: None,
            }],
        }
    }

    #[test]
    fn save_then_reopen() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("state");
        {
            let (sd, st) = StateDir::open(&dir).unwrap();
            assert_eq!(st, State::default());
            sd.save(&sample()).unwrap();
            let mode = fs::metadata(dir.join("state.json"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let (_sd, st) = StateDir::open(&dir).unwrap();
        assert_eq!(st, sample());
        assert_eq!(st.export("e").map(|e| e.tag), Some(Some(3)));
        assert!(st.origin("/c", "o").is_some());
        assert!(st.store("/c").is_some());
    }

    #[test]
    fn second_open_is_refused_while_locked() {
        let d = tempfile::tempdir().unwrap();
        let (_sd, _) = StateDir::open(d.path()).unwrap();
        match StateDir::open(d.path()) {
            Err(StateError::Locked { .. }) => {}
            other => panic!("expected Locked, got {other:?}"),
        }
    }

    #[test]
    fn garbage_and_future_versions_are_refused() {
        let d = tempfile::tempdir().unwrap();
        fs::write(d.path().join("state.json"), b"{garbage").unwrap();
        assert!(matches!(
            StateDir::open(d.path()),
            Err(StateError::Invalid { .. })
        ));
        let mut s = sample();
        s.version = 99;
        fs::write(d.path().join("state.json"), serde_json::to_vec(&s).unwrap()).unwrap();
        let e = StateDir::open(d.path()).unwrap_err();
        assert!(matches!(e, StateError::Version { version: 99, .. }));
        assert!(e.to_string().contains("state.json"));
    }
}
