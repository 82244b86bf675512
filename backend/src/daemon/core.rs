//! The daemon's state: the [`Daemon`] and, behind its one mutex, [`Inner`] (the recorded
//! state, the open stores and origins). Every other module adds to `impl Daemon`; this one
//! depends on none of them.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};

use snapmv_engine::{Origin, Store};

use super::error::{MResult, MethodError};
use crate::export::ExportManager;
use crate::rpc_server::SocketAccess;
use crate::state::{State, StateDir};

/// Directory of the state directory where exports keep their guest's cache mode.
pub(crate) const CACHE_MODE_DIR: &str = "cache-mode";

/// Daemon settings (from `snapmv serve`'s command line).
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Management socket.
    pub rpc_socket: PathBuf,
    /// State directory.
    pub state_dir: PathBuf,
    /// Directory of export sockets named `NAME.sock`.
    pub socket_dir: PathBuf,
    /// Uids allowed on the management socket besides the daemon's and root.
    pub allowed_uids: Vec<u32>,
    /// Group and mode of export sockets that do not set their own.
    pub socket_access: SocketAccess,
    /// Where to serve the Prometheus exposition, if anywhere.
    pub metrics_listen: Option<super::prometheus::MetricsListen>,
    /// A store is low on space from this percentage of its chunks in use.
    pub low_space_percent: u8,
}

pub(crate) struct Inner {
    pub(crate) state_dir: StateDir,
    pub(crate) state: State,
    /// Open stores by canonical path. A store is closed (see `Daemon::close_unused`) once no
    /// export uses it, no rollback runs in it and no call waits on it: then this daemon holds
    /// the last handles, so dropping them closes it at once and it is never open twice.
    pub(crate) stores: HashMap<String, Store>,
    /// Calls waiting on a store outside the lock (`snapshot_rollback` with `wait`).
    pub(crate) waiters: HashMap<String, usize>,
    /// Open origins by (store, origin id).
    pub(crate) origins: HashMap<(String, String), Origin>,
    /// Exports of the state that could not be re-created at start, with the reason.
    pub(crate) failed: HashMap<String, String>,
    /// Open origins whose file was opened read-only (by store, origin id).
    pub(crate) readonly_origins: HashSet<(String, String)>,
    /// Exports waiting for their store (live migration destination), by name; they are in
    /// `failed` too, with the reason, until `export_acquire`.
    pub(crate) incoming: super::handover::Incoming,
}

/// The daemon's method handler.
pub struct Daemon {
    pub(crate) socket_dir: PathBuf,
    pub(crate) rpc_socket: PathBuf,
    pub(crate) state_dir_canon: PathBuf,
    pub(crate) socket_access: SocketAccess,
    pub(crate) exports: ExportManager,
    /// Exports served over NBD, by name.
    pub(crate) nbd: Mutex<HashMap<String, crate::nbd::NbdServer>>,
    pub(crate) inner: Mutex<Inner>,
    /// The low-space threshold and which stores are past it.
    pub(crate) space: super::space::SpaceWatch,
    /// The RBD images this daemon owns or lost (local files: their locks, in the engine).
    pub(crate) ownership: super::ownership::Ownership,
}

impl Daemon {
    /// Takes the daemon's lock; a lock poisoned by a panicked method is taken all the same.
    pub(crate) fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn save(&self, inner: &mut Inner, what: impl Into<String>) -> MResult<()> {
        inner.state.normalise();
        inner
            .state_dir
            .save(&inner.state)
            .map_err(|source| MethodError::State {
                what: what.into(),
                source,
            })
    }
}
