//! The daemon: `snapmv serve`. Owns the open stores and origins, the exports (through the
//! export manager) and the state directory, and answers the management methods.
//!
//! One mutex serialises every management operation; `snapshot_rollback` with `wait` releases
//! it before waiting, and nothing else blocks for long while holding it, so queries stay
//! responsive while a rollback runs.
//!
//! Modules (dependencies point down the list; `methods/*` use everything above them):
//! * [`error`]: [`MethodError`] and its JSON-RPC code, in one place;
//! * [`validate`]: checks of parameters against the limits and the state, with no I/O;
//! * [`paths`]: checks that look at the filesystem (paths, roles of files, sockets, groups);
//! * [`registry`]: the open stores and origins, opened exclusively;
//! * [`live`]: the exports being served (vhost-user-blk or NBD);
//! * [`convert`]: engine and state → RPC result types;
//! * [`methods`]: one module per group of methods;
//! * [`lifecycle`]: the process: start, serve, signals.

mod convert;
mod error;
mod lifecycle;
mod live;
mod methods;
mod paths;
mod registry;
#[cfg(test)]
mod tests;
mod validate;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};

use log::{error, info, warn};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use snapmv_engine::{Origin, Store};
use snapmv_rpc::method::{self, Method};
use snapmv_rpc::{codes, ErrorObject};

use crate::export::ExportManager;
use crate::rpc_server::{Handler, SocketAccess};
use crate::state::{State, StateDir};

use convert::describe;
pub use error::{MResult, MethodError};
pub use lifecycle::{serve, ServeError};
use paths::canonical_socket_path;
pub use paths::resolve_group;
pub use validate::{default_origin_id, parse_socket_mode};

pub use snapmv_rpc::limits::{
    DEFAULT_NUM_QUEUES, DEFAULT_QUEUE_SIZE, MAX_NUM_QUEUES, MAX_QUEUE_SIZE, PAGE_SIZE,
};
// The RPC limit is the device's.
const _: () = assert!(MAX_NUM_QUEUES == crate::vhost_blk::config::MAX_QUEUES);
/// Directory of the state directory where exports keep their guest's cache mode.
const CACHE_MODE_DIR: &str = "cache-mode";
pub use snapmv_rpc::methods::{PROTOCOL_NBD, PROTOCOL_VHOST};

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
}

pub(crate) struct Inner {
    pub(crate) state_dir: StateDir,
    pub(crate) state: State,
    /// Open stores by canonical path. A store is closed (see [`Daemon::close_unused`]) once no
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
        let daemon = Daemon {
            socket_dir: cfg.socket_dir.clone(),
            socket_access: cfg.socket_access,
            rpc_socket: canonical_socket_path(&cfg.rpc_socket),
            state_dir_canon,
            exports: ExportManager::new(),
            nbd: Mutex::new(HashMap::new()),
            inner: Mutex::new(Inner {
                state_dir,
                state,
                stores: HashMap::new(),
                origins: HashMap::new(),
                waiters: HashMap::new(),
                failed: HashMap::new(),
                readonly_origins: HashSet::new(),
            }),
        };
        daemon.restore();
        Ok(daemon)
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
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

    /// Stops every export (their sockets are removed; the state keeps them for the next start)
    /// and closes every store. Holds the lock to the end, so no method runs after it.
    pub(crate) fn shutdown(&self) {
        let mut inner = self.lock();
        for e in self.live_list() {
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

fn decode<P: DeserializeOwned>(method: &str, params: Value) -> MResult<P> {
    match params {
        Value::Null => serde_json::from_value(Value::Object(Default::default())).map_err(|e| {
            MethodError::InvalidParams(format!("method {method} needs parameters: {e}"))
        }),
        p => serde_path_to_error::deserialize(p).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            if path == "." || path.is_empty() {
                MethodError::InvalidParams(format!(
                    "invalid parameters for method {method}: {inner}"
                ))
            } else {
                MethodError::InvalidParams(format!(
                    "invalid parameter {path} of method {method}: {inner}"
                ))
            }
        }),
    }
}

fn encode<R: Serialize>(r: MResult<R>) -> MResult<Value> {
    r.and_then(|r| {
        serde_json::to_value(r)
            .map_err(|e| MethodError::InvalidState(format!("result could not be encoded: {e}")))
    })
}

/// A method's entry in the dispatch table: decodes the parameters, runs the handler, encodes
/// the result.
type Route = fn(&Daemon, &str, Value) -> MResult<Value>;

/// The dispatch table, built from the method types of `snapmv_rpc::method`: each handler must
/// take the method's `Params` and return its `Result`, or this does not compile.
macro_rules! routes {
    ($($method:ty => $handler:ident,)*) => {
        const ROUTES: &[(&str, Route)] = &[$((
            <$method as Method>::NAME,
            |d: &Daemon, name: &str, params: Value| {
                let params: <$method as Method>::Params = decode(name, params)?;
                encode::<<$method as Method>::Result>(d.$handler(params))
            },
        )),*];
    };
}

routes! {
    method::OriginCreate => origin_create,
    method::SnapshotExport => snapshot_export,
    method::ExportRemove => export_remove,
    method::SnapshotCreate => snapshot_create,
    method::SnapshotDelete => snapshot_delete,
    method::OriginDelete => origin_delete,
    method::SnapshotRollback => snapshot_rollback,
    method::SnapshotList => snapshot_list,
    method::ExportList => export_list,
    method::Status => status,
    method::SnapshotDiff => snapshot_diff,
    method::SnapshotStream => snapshot_stream,
}

impl Daemon {
    fn dispatch(&self, method: &str, params: Value) -> MResult<Value> {
        let result = self.dispatch_method(method, params);
        let mut inner = self.lock();
        self.close_unused(&mut inner);
        result
    }

    fn dispatch_method(&self, method: &str, params: Value) -> MResult<Value> {
        match ROUTES.iter().find(|(name, _)| *name == method) {
            Some((_, route)) => route(self, method, params),
            None => Err(MethodError::NoMethod(method.to_string())),
        }
    }
}

impl Handler for Daemon {
    fn handle(&self, method: &str, params: Value) -> Result<Value, ErrorObject> {
        self.dispatch(method, params).map_err(|e| {
            if e.code() == codes::INTERNAL_ERROR || e.code() == codes::IO_ERROR {
                warn!("{method}: {e}");
            }
            e.to_object()
        })
    }
}
