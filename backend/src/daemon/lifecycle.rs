//! The daemon process: start, serve the management socket, stop on SIGTERM/SIGINT.

use std::path::PathBuf;
use std::sync::Arc;

use log::info;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use log::{error, warn};

use super::convert::describe;
use super::core::{Daemon, Inner, ServeConfig, CACHE_MODE_DIR};
use super::paths::canonical_socket_path;
use crate::export::ExportManager;
use crate::rpc_server::{RpcLock, RpcServerConfig, ServerError};
use crate::state::StateDir;
use crate::state::StateError;

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The state directory could not be used.
    #[error(transparent)]
    State(#[from] StateError),
    /// The management socket could not be set up.
    #[error(transparent)]
    Server(#[from] ServerError),
    /// The signal handling could not be set up.
    #[error("cannot set up SIGTERM/SIGINT handling: {0}")]
    Signals(#[source] std::io::Error),
    /// The Prometheus exposition could not be served.
    #[error("{0}")]
    Metrics(String),
    /// The low-space watch thread could not be started.
    #[error("cannot start the low-space watch: {0}")]
    SpaceWatch(#[source] std::io::Error),
    /// The socket directory could not be created.
    #[error("socket directory {dir}: {source}")]
    SocketDir {
        /// The directory.
        dir: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

impl Daemon {
    /// Opens the state directory and re-creates every recorded export.
    pub fn open(cfg: &ServeConfig) -> Result<Daemon, ServeError> {
        let (state_dir, state) = StateDir::open(&cfg.state_dir)?;
        std::fs::create_dir_all(&cfg.socket_dir).map_err(|source| ServeError::SocketDir {
            dir: cfg.socket_dir.clone(),
            source,
        })?;
        let state_dir_canon =
            std::fs::canonicalize(&cfg.state_dir).unwrap_or_else(|_| cfg.state_dir.clone());
        let cache_dir = state_dir_canon.join(CACHE_MODE_DIR);
        std::fs::create_dir_all(&cache_dir).map_err(|source| ServeError::SocketDir {
            dir: cache_dir,
            source,
        })?;
        let ownership = super::ownership::Ownership::new(&state_dir_canon);
        let daemon = Daemon {
            socket_dir: cfg.socket_dir.clone(),
            socket_access: cfg.socket_access,
            rpc_socket: canonical_socket_path(&cfg.rpc_socket),
            state_dir_canon,
            exports: ExportManager::new(),
            nbd: Mutex::new(HashMap::new()),
            space: super::space::SpaceWatch::new(cfg.low_space_percent),
            inner: Mutex::new(Inner {
                state_dir,
                state,
                stores: HashMap::new(),
                origins: HashMap::new(),
                waiters: HashMap::new(),
                failed: HashMap::new(),
                readonly_origins: HashSet::new(),
                incoming: HashMap::new(),
            }),
            ownership,
        };
        daemon.restore();
        Ok(daemon)
    }

    pub(crate) fn restore(&self) {
        let mut inner = self.lock();
        let records = inner.state.exports.clone();
        for rec in records {
            let r = self
                .volume_for(&mut inner, &rec.cow, &rec.origin_id, rec.tag, false)
                .and_then(|vol| self.add_export(&rec, vol));
            match r {
                Ok(()) => info!(
                    "export {} restored on {} ({})",
                    rec.name,
                    rec.socket,
                    describe(&rec)
                ),
                Err(e) => {
                    error!("export {} could not be restored: {e}", rec.name);
                    inner.failed.insert(rec.name.clone(), e.to_string());
                }
            }
        }
    }

    /// Stops every export (their sockets are removed; the state keeps them for the next start)
    /// and closes every store. Holds the lock to the end, so no method runs after it.
    pub(crate) fn shutdown(&self) {
        let mut inner = self.lock();
        for e in self.live_list() {
            self.abandon_incoming(&mut inner, &e.name);
            if let Err(err) = self.live_remove(&e.name) {
                warn!("export {}: {err}", e.name);
            }
        }
        inner.origins.clear();
        for (cow, store) in inner.stores.drain() {
            drop(store);
            info!("closed COW store {cow}");
        }
        // Keep the lock: the process exits next.
        std::mem::forget(inner);
    }

    /// Closes every open store that no export uses, in which no rollback runs and on which no
    /// call waits. The export manager has joined the device threads of removed exports, so the
    /// handles dropped here are the last ones and the store is closed (committed, its threads
    /// joined) before this returns.
    pub(crate) fn close_unused(&self, inner: &mut Inner) {
        let unused: Vec<String> = inner
            .stores
            .keys()
            .filter(|cow| {
                !inner.state.exports.iter().any(|e| &e.cow == *cow)
                    && inner.waiters.get(*cow).copied().unwrap_or(0) == 0
                    && !inner
                        .origins
                        .iter()
                        .any(|((c, _), o)| c == *cow && o.rollback_progress().is_some())
            })
            .cloned()
            .collect();
        for cow in unused {
            inner.origins.retain(|(c, _), _| *c != cow);
            inner.readonly_origins.retain(|(c, _)| *c != cow);
            drop(inner.stores.remove(&cow));
            info!("closed COW store {cow}: no export uses it");
        }
    }
}

/// Tells the service manager (systemd's `NOTIFY_SOCKET`, if set) something; a failure is
/// logged, never fatal.
fn notify(state: &[sd_notify::NotifyState]) {
    if let Err(e) = sd_notify::notify(state) {
        warn!("cannot notify the service manager (NOTIFY_SOCKET): {e}");
    }
}

/// `READY=1` once every recorded export is back (or recorded as failed, with the reason in
/// `status`/`export_list`) and the management socket answers; `STATUS=` says how many.
fn notify_ready(daemon: &Daemon) {
    let (served, failed) = {
        let inner = daemon.lock();
        let failed = inner.failed.len();
        (inner.state.exports.len().saturating_sub(failed), failed)
    };
    let status = if failed == 0 {
        format!("serving {served} exports")
    } else {
        format!("serving {served} exports; {failed} could not be restored (see snapmv exports)")
    };
    notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(&status),
    ]);
}

/// Runs the daemon until killed: `READY=1` to systemd once every recorded export is back,
/// `STOPPING=1` when a SIGTERM/SIGINT stops it.
pub fn serve(cfg: ServeConfig) -> Result<(), ServeError> {
    // Registered first: a SIGTERM/SIGINT that comes while the exports are being restored is
    // kept and handled once the signal thread runs.
    let mut signals = Signals::new([SIGTERM, SIGINT]).map_err(ServeError::Signals)?;
    let mut rcfg = RpcServerConfig::new(cfg.rpc_socket.clone());
    rcfg.allowed_uids = cfg.allowed_uids.clone();
    if let Some(parent) = cfg.rpc_socket.parent() {
        if !parent.as_os_str().is_empty() {
            std::fs::create_dir_all(parent).map_err(|source| ServeError::SocketDir {
                dir: parent.to_path_buf(),
                source,
            })?;
        }
    }
    // Lock the socket before touching any store, so a second daemon changes nothing; answer
    // only once every export is back.
    let lock = RpcLock::acquire(rcfg)?;
    let daemon = Arc::new(Daemon::open(&cfg)?);
    if let Some(listen) = &cfg.metrics_listen {
        super::prometheus::start(listen, daemon.clone()).map_err(ServeError::Metrics)?;
    }
    super::space::start(daemon.clone()).map_err(ServeError::SpaceWatch)?;
    let server = lock.bind()?;
    info!(
        "snapmv daemon ready: RPC socket {}, state {}, export sockets in {}",
        server.path().display(),
        cfg.state_dir.display(),
        cfg.socket_dir.display()
    );
    notify_ready(&daemon);
    let for_signals = daemon.clone();
    let rpc_socket = cfg.rpc_socket.clone();
    std::thread::Builder::new()
        .name("snapmv-signals".into())
        .spawn(move || {
            let Some(sig) = signals.forever().next() else {
                return;
            };
            info!("signal {sig} received: stopping every export and closing the stores");
            notify(&[sd_notify::NotifyState::Stopping]);
            for_signals.shutdown();
            let _ = std::fs::remove_file(&rpc_socket);
            info!("snapmv daemon stopped; its exports come back at the next start");
            std::process::exit(0);
        })
        .map_err(ServeError::Signals)?;
    server.run(daemon)?;
    Ok(())
}
