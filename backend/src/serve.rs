//! The daemon: `snapmv serve`. Owns the open stores and origins, the exports (through the
//! export manager) and the state directory, and answers the management methods.
//!
//! One mutex serialises every management operation; `snapshot_rollback` with `wait` releases
//! it before waiting, and nothing else blocks for long while holding it, so queries stay
//! responsive while a rollback runs.

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use log::{error, info, warn};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use snapmv_engine::{FileStorage, FormatOptions, OpenMode, Origin, Storage, Store, Volume};
use snapmv_rpc::methods::{self as m, names};
use snapmv_rpc::{codes, ErrorObject};

use crate::export::{ExportConfig, ExportError, ExportManager};
use crate::rpc_server::{Handler, RpcLock, RpcServerConfig, ServerError, SocketAccess};
use crate::state::{ExportRecord, OriginRecord, State, StateDir, StateError, StoreRecord};

pub use crate::export::{DEFAULT_NUM_QUEUES, DEFAULT_QUEUE_SIZE};
/// Largest number of virtqueues accepted.
pub const MAX_NUM_QUEUES: u16 = crate::vhost_blk::config::MAX_QUEUES;
/// How long `export_remove` waits for a departing client before refusing: polls × interval.
const CLIENT_LEAVE_POLLS: u32 = 20;
/// Directory of the state directory where exports keep their guest's cache mode.
const CACHE_MODE_DIR: &str = "cache-mode";
/// `protocol` value of an NBD export.
pub const PROTOCOL_NBD: &str = "nbd";
/// `protocol` value of a vhost-user-blk export (the default).
pub const PROTOCOL_VHOST: &str = "vhost-user-blk";

/// Checks a `protocol` parameter; `None` for the default.
fn protocol_param(p: Option<&str>) -> MResult<Option<String>> {
    match p {
        None | Some(PROTOCOL_VHOST) => Ok(None),
        Some(PROTOCOL_NBD) => Ok(Some(PROTOCOL_NBD.into())),
        Some(other) => Err(MethodError::InvalidParams(format!(
            "protocol {other:?} is not one of \"vhost-user-blk\", \"nbd\""
        ))),
    }
}

const CLIENT_LEAVE_POLL: std::time::Duration = std::time::Duration::from_millis(100);
/// Page size `chunk_size` counts in.
pub const PAGE_SIZE: u32 = 4096;

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

/// Why a method failed; turned into a JSON-RPC error object.
#[derive(Debug, thiserror::Error)]
pub enum MethodError {
    /// The engine refused or failed.
    #[error("{what}: {source}")]
    Engine {
        /// What was being done, naming the object.
        what: String,
        /// The engine's error.
        #[source]
        source: snapmv_engine::Error,
    },
    /// The export manager refused or failed.
    #[error("{what}: {source}")]
    Export {
        /// What was being done, naming the export.
        what: String,
        /// The export manager's error.
        #[source]
        source: ExportError,
    },
    /// The change was made but could not be recorded.
    #[error("{what}, but the state could not be saved (a restart would forget it): {source}")]
    State {
        /// The change.
        what: String,
        /// The state directory's error.
        #[source]
        source: StateError,
    },
    /// Bad parameters.
    #[error("{0}")]
    InvalidParams(String),
    /// Unknown method.
    #[error("method {0:?} does not exist; methods are {list}", list = names::ALL.join(", "))]
    NoMethod(String),
    /// Something named does not exist.
    #[error("{0}")]
    NotFound(String),
    /// Something already exists or is in use.
    #[error("{0}")]
    AlreadyExists(String),
    /// A conflicting operation holds the object.
    #[error("{0}")]
    Busy(String),
    /// The operation does not apply to the object.
    #[error("{0}")]
    InvalidState(String),
    /// The origin still has snapshots.
    #[error("{0}")]
    HasSnapshots(String),
    /// The file holds no snapmv store.
    #[error("{0}")]
    NotAStore(String),
    /// A store or origin is held by another process (or already open in this one).
    #[error("{what} {path} is in use by {holder}; snapmv opens every store and origin exclusively (docs/security.md)")]
    InUse {
        /// Its role: "COW store", "origin".
        what: String,
        /// The path.
        path: String,
        /// The holder: `process 1234 (snapmv)`.
        holder: String,
        /// The OS error, carrying a [`snapmv_engine::InUse`].
        #[source]
        source: std::io::Error,
    },
    /// A store or origin could not be opened (not permitted...).
    #[error("{what}: {source}")]
    Open {
        /// Which file, in which role, and how.
        what: String,
        /// The OS error; for a file in use, it carries a [`snapmv_engine::InUse`].
        #[source]
        source: std::io::Error,
    },
}

impl MethodError {
    fn engine(what: impl Into<String>) -> impl FnOnce(snapmv_engine::Error) -> MethodError {
        let what = what.into();
        move |source| MethodError::Engine { what, source }
    }

    /// The JSON-RPC error code.
    pub fn code(&self) -> i64 {
        use snapmv_engine::Error as E;
        match self {
            MethodError::Engine { source, .. } => match source {
                E::Io { .. } => codes::IO_ERROR,
                E::NoSpace { .. } => codes::NO_SPACE,
                E::Corrupt { .. } => codes::CORRUPT,
                E::NotFound(_) => codes::NOT_FOUND,
                E::AlreadyExists(_) => codes::ALREADY_EXISTS,
                E::Busy(_) => codes::BUSY,
                E::HasSnapshots(_) => codes::HAS_SNAPSHOTS,
                E::InvalidArgument(_) => codes::INVALID_PARAMS,
                E::ReadOnly(_) => codes::READ_ONLY,
                E::Deleted(_) => codes::INVALID_STATE,
                E::Limit(_) => codes::LIMIT,
                #[allow(unreachable_patterns)]
                _ => codes::INTERNAL_ERROR,
            },
            MethodError::Export { source, .. } => match source {
                ExportError::AlreadyExists(_)
                | ExportError::SocketTaken { .. }
                | ExportError::SocketInUse(_)
                | ExportError::NotASocket(_) => codes::ALREADY_EXISTS,
                ExportError::NotFound(_) => codes::NOT_FOUND,
                ExportError::InvalidConfig { .. } => codes::INVALID_PARAMS,
                _ => codes::IO_ERROR,
            },
            MethodError::State { .. } => codes::INTERNAL_ERROR,
            MethodError::InvalidParams(_) => codes::INVALID_PARAMS,
            MethodError::NoMethod(_) => codes::METHOD_NOT_FOUND,
            MethodError::NotFound(_) => codes::NOT_FOUND,
            MethodError::AlreadyExists(_) => codes::ALREADY_EXISTS,
            MethodError::Busy(_) => codes::BUSY,
            MethodError::InvalidState(_) => codes::INVALID_STATE,
            MethodError::HasSnapshots(_) => codes::HAS_SNAPSHOTS,
            MethodError::NotAStore(_) => codes::CORRUPT,
            MethodError::InUse { .. } => codes::BUSY,
            MethodError::Open { .. } => codes::IO_ERROR,
        }
    }

    fn to_object(&self) -> ErrorObject {
        ErrorObject::new(self.code(), self.to_string())
    }
}

type MResult<T> = Result<T, MethodError>;

/// Identity of a file: device and inode.
type FileId = (u64, u64);

fn file_id(path: &Path) -> Option<FileId> {
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// The origin id used when none is given: the origin's file name, restricted to
/// `[A-Za-z0-9._-]` and 64 characters.
pub fn default_origin_id(origin: &Path) -> String {
    let name = origin
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut id: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    if id.is_empty() || id == "." || id == ".." {
        id = "origin".into();
    }
    id
}

struct Inner {
    state_dir: StateDir,
    state: State,
    /// Open stores by canonical path. A store is closed (see [`Daemon::close_unused`]) once no
    /// export uses it, no rollback runs in it and no call waits on it: then this daemon holds
    /// the last handles, so dropping them closes it at once and it is never open twice.
    stores: HashMap<String, Store>,
    /// Calls waiting on a store outside the lock (`snapshot_rollback` with `wait`).
    waiters: HashMap<String, usize>,
    /// Open origins by (store, origin id).
    origins: HashMap<(String, String), Origin>,
    /// Exports of the state that could not be re-created at start, with the reason.
    failed: HashMap<String, String>,
    /// Open origins whose file was opened read-only (by store, origin id).
    readonly_origins: HashSet<(String, String)>,
}

/// The daemon's method handler.
pub struct Daemon {
    socket_dir: PathBuf,
    rpc_socket: PathBuf,
    state_dir_canon: PathBuf,
    socket_access: SocketAccess,
    exports: ExportManager,
    /// Exports served over NBD, by name.
    nbd: Mutex<HashMap<String, crate::nbd::NbdServer>>,
    inner: Mutex<Inner>,
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

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn restore(&self) {
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

    /// The path under which the daemon already knows the file `fid` as a store, if it does
    /// under another name (a hard link or another path to the same file): stores are keyed by
    /// path, so one file must always go by one path.
    fn known_store_path(inner: &Inner, cow: String, fid: FileId) -> String {
        inner
            .stores
            .keys()
            .chain(inner.state.stores.iter().map(|s| &s.path))
            .find(|known| **known != cow && file_id(Path::new(known.as_str())) == Some(fid))
            .cloned()
            .unwrap_or(cow)
    }

    /// Opens (or finds open) store `cow`.
    fn store_for(&self, inner: &mut Inner, cow: &str, direct: bool) -> MResult<Store> {
        if let Some(s) = inner.stores.get(cow) {
            return Ok(s.clone());
        }
        let direct = inner.state.store(cow).map(|s| s.direct).unwrap_or(direct);
        let storage = open_file(
            "COW store",
            cow,
            OpenMode {
                direct,
                readonly: false,
            },
        )?;
        let store = open_store(cow, storage)?;
        inner.stores.insert(cow.to_string(), store.clone());
        Ok(store)
    }

    /// Opens (or finds open) origin `origin_id` of store `cow`, which must be recorded.
    fn origin_for(
        &self,
        inner: &mut Inner,
        cow: &str,
        origin_id: &str,
        direct: bool,
    ) -> MResult<Origin> {
        let key = (cow.to_string(), origin_id.to_string());
        if let Some(o) = inner.origins.get(&key) {
            return Ok(o.clone());
        }
        let rec = inner.state.origin(cow, origin_id).cloned().ok_or_else(|| {
            MethodError::NotFound(format!(
                "origin id {origin_id} of COW store {cow} is not known to this daemon; give the origin's path"
            ))
        })?;
        let store = self.store_for(inner, cow, direct)?;
        // Read-write when an export of the origin itself writes it; read-only when only
        // read-only exports of the origin exist; else (snapshots only) read-write if the file
        // allows it, read-only if not (snapshot writes go to the store).
        let exports = inner
            .state
            .exports
            .iter()
            .filter(|e| e.cow == cow && e.origin_id == origin_id && e.tag.is_none());
        let access = if exports.clone().any(|e| !e.readonly) {
            Access::Write
        } else if exports.clone().any(|e| e.readonly) {
            Access::ReadOnly
        } else {
            Access::Any
        };
        let (storage, readonly) = open_origin_file(&rec.path, rec.direct, access)?;
        let origin = store
            .open_origin_storage(origin_id, storage)
            .map_err(MethodError::engine(format!(
                "cannot open origin {origin_id} ({}) in COW store {cow}",
                rec.path
            )))?;
        if readonly {
            inner.readonly_origins.insert(key.clone());
        } else {
            inner.readonly_origins.remove(&key);
        }
        inner.origins.insert(key, origin.clone());
        Ok(origin)
    }

    fn volume_for(
        &self,
        inner: &mut Inner,
        cow: &str,
        origin_id: &str,
        tag: Option<u32>,
        direct: bool,
    ) -> MResult<Volume> {
        let origin = self.origin_for(inner, cow, origin_id, direct)?;
        match tag {
            None => Ok(origin.volume()),
            Some(t) => origin
                .snapshot_volume(t)
                .map_err(MethodError::engine(format!(
                    "cannot open snapshot {t} of origin {origin_id} in COW store {cow}"
                ))),
        }
    }

    fn nbd_lock(&self) -> MutexGuard<'_, HashMap<String, crate::nbd::NbdServer>> {
        self.nbd.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A live export (vhost-user-blk or NBD).
    fn live_get(&self, name: &str) -> Option<crate::export::ExportInfo> {
        if let Some(n) = self.nbd_lock().get(name) {
            return Some(n.info());
        }
        self.exports.get(name)
    }

    /// Every live export.
    fn live_list(&self) -> Vec<crate::export::ExportInfo> {
        let mut v = self.exports.list();
        v.extend(self.nbd_lock().values().map(|n| n.info()));
        v
    }

    /// Stops a live export.
    fn live_remove(&self, name: &str) -> Result<(), ExportError> {
        let n = self.nbd_lock().remove(name);
        match n {
            Some(n) => {
                drop(n);
                Ok(())
            }
            None => self.exports.remove(name),
        }
    }

    fn add_export(&self, rec: &ExportRecord, volume: Volume) -> MResult<()> {
        if rec.protocol.as_deref() == Some(PROTOCOL_NBD) {
            if self.live_get(&rec.name).is_some() {
                return Err(MethodError::AlreadyExists(format!(
                    "export {} is already served",
                    rec.name
                )));
            }
            let v2 = volume.clone();
            let changed: Arc<crate::nbd::ChangedFn> =
                Arc::new(move |tag| v2.changed_since(tag).map_err(|e| e.to_string()));
            let chunk_size = volume.chunk_size();
            let desc = volume.name();
            let server = crate::nbd::NbdServer::start(
                Path::new(&rec.socket),
                crate::nbd::NbdExport {
                    name: rec.name.clone(),
                    disk: Arc::new(crate::nbd::BulkVolume(volume)),
                    readonly: rec.readonly,
                    chunk_size,
                    changed: Some(changed),
                },
                desc,
                rec.socket_mode.unwrap_or(self.socket_access.mode),
                rec.socket_group.or(self.socket_access.group),
            )
            .map_err(|source| MethodError::Open {
                what: format!(
                    "cannot serve export {} over NBD on {}",
                    rec.name, rec.socket
                ),
                source,
            })?;
            self.nbd_lock().insert(rec.name.clone(), server);
            return Ok(());
        }
        self.exports
            .add(
                ExportConfig {
                    name: rec.name.clone(),
                    socket: PathBuf::from(&rec.socket),
                    num_queues: rec.num_queues,
                    queue_size: rec.queue_size,
                    readonly: rec.readonly,
                    socket_access: SocketAccess {
                        group: rec.socket_group.or(self.socket_access.group),
                        mode: rec.socket_mode.unwrap_or(self.socket_access.mode),
                    },
                    cache_mode_file: Some(self.cache_mode_file(&rec.name)),
                },
                volume,
            )
            .map_err(|source| MethodError::Export {
                what: format!("cannot serve export {} on {}", rec.name, rec.socket),
                source,
            })
    }

    /// Where export `name` keeps the guest's cache-mode choice across restarts.
    fn cache_mode_file(&self, name: &str) -> PathBuf {
        self.state_dir_canon.join(CACHE_MODE_DIR).join(name)
    }

    /// An export that is gone for good forgets its guest's cache mode.
    fn forget_cache_mode(&self, name: &str) {
        let f = self.cache_mode_file(name);
        if let Err(e) = std::fs::remove_file(&f) {
            if e.kind() != std::io::ErrorKind::NotFound {
                log::warn!("cannot remove {}: {e}", f.display());
            }
        }
    }

    fn save(&self, inner: &mut Inner, what: impl Into<String>) -> MResult<()> {
        inner.state.exports.sort_by(|a, b| a.name.cmp(&b.name));
        let used: Vec<String> = inner.state.exports.iter().map(|e| e.cow.clone()).collect();
        inner.state.stores.retain(|s| used.contains(&s.path));
        inner
            .state_dir
            .save(&inner.state)
            .map_err(|source| MethodError::State {
                what: what.into(),
                source,
            })
    }

    /// Checks and canonicalises a path given over RPC.
    fn check_path(&self, what: &str, p: &str) -> MResult<(String, FileId)> {
        if p.is_empty() {
            return Err(MethodError::InvalidParams(format!("{what} path is empty")));
        }
        require_absolute(what, p)?;
        let canon = std::fs::canonicalize(p).map_err(lookup_error(what, p, "resolved"))?;
        let meta = std::fs::metadata(&canon).map_err(|e| {
            MethodError::InvalidParams(format!("{what} {p} cannot be examined: {e}"))
        })?;
        let ft = meta.file_type();
        if !(ft.is_file() || ft.is_block_device()) {
            return Err(MethodError::InvalidParams(format!(
                "{what} {p} is not a regular file or a block device"
            )));
        }
        if canon.starts_with(&self.state_dir_canon) {
            return Err(MethodError::InvalidParams(format!(
                "{what} {p} is inside the daemon's state directory {}",
                self.state_dir_canon.display()
            )));
        }
        let mut lock = self.rpc_socket.as_os_str().to_owned();
        lock.push(".lock");
        if file_id(Path::new(&lock)) == Some((meta.dev(), meta.ino())) {
            return Err(MethodError::InvalidParams(format!(
                "{what} {p} is the daemon's RPC lock file"
            )));
        }
        let s = canon
            .to_str()
            .map(str::to_string)
            .ok_or_else(|| MethodError::InvalidParams(format!("{what} {p} is not valid UTF-8")))?;
        Ok((s, (meta.dev(), meta.ino())))
    }

    /// Refuses `id` as an origin if it is a known store, and as a store if it is a known
    /// origin.
    fn check_roles(
        &self,
        inner: &Inner,
        origin: (&str, FileId),
        cow: (&str, FileId),
    ) -> MResult<()> {
        if origin.1 == cow.1 {
            return Err(MethodError::InvalidParams(format!(
                "origin {} and COW store {} are the same file",
                origin.0, cow.0
            )));
        }
        let stores = inner
            .stores
            .keys()
            .cloned()
            .chain(inner.state.origins.iter().map(|o| o.cow.clone()));
        for s in stores {
            if file_id(Path::new(&s)) == Some(origin.1) {
                return Err(MethodError::AlreadyExists(format!(
                    "origin {} is the COW store {s} in use by this daemon",
                    origin.0
                )));
            }
        }
        for o in &inner.state.origins {
            if file_id(Path::new(&o.path)) == Some(cow.1) {
                return Err(MethodError::AlreadyExists(format!(
                    "COW store {} is the origin {} (id {} in {}) known to this daemon",
                    cow.0, o.path, o.origin_id, o.cow
                )));
            }
        }
        Ok(())
    }

    fn check_new_name(&self, inner: &Inner, name: &str) -> MResult<()> {
        m::validate_name("export name", name).map_err(MethodError::InvalidParams)?;
        if inner.state.export(name).is_some() {
            return Err(MethodError::AlreadyExists(format!(
                "export {name} already exists"
            )));
        }
        Ok(())
    }

    fn socket_path(&self, inner: &Inner, name: &str, socket: Option<&str>) -> MResult<String> {
        let path = match socket {
            None => self.socket_dir.join(format!("{name}.sock")),
            Some(s) => {
                let p = Path::new(s);
                if !p.is_absolute() {
                    return Err(MethodError::InvalidParams(format!(
                        "socket path {s:?} of export {name} must be absolute"
                    )));
                }
                let (Some(parent), Some(file)) = (p.parent(), p.file_name()) else {
                    return Err(MethodError::InvalidParams(format!(
                        "socket path {s:?} of export {name} has no file name"
                    )));
                };
                let parent = std::fs::canonicalize(parent).map_err(|e| {
                    MethodError::NotFound(format!(
                        "directory {} of socket {s} for export {name} cannot be used: {e}",
                        parent.display()
                    ))
                })?;
                parent.join(file)
            }
        };
        let s = path.to_str().map(str::to_string).ok_or_else(|| {
            MethodError::InvalidParams(format!("socket path of export {name} is not UTF-8"))
        })?;
        if path == self.rpc_socket {
            return Err(MethodError::InvalidParams(format!(
                "socket {s} of export {name} is the daemon's RPC socket"
            )));
        }
        if path.starts_with(&self.state_dir_canon) {
            return Err(MethodError::InvalidParams(format!(
                "socket {s} of export {name} is inside the daemon's state directory"
            )));
        }
        if let Some(other) = inner.state.exports.iter().find(|e| e.socket == s) {
            return Err(MethodError::AlreadyExists(format!(
                "socket {s} is already used by export {}",
                other.name
            )));
        }
        match std::fs::symlink_metadata(&path) {
            Err(_) => {}
            Ok(meta) if meta.file_type().is_socket() => {
                if std::os::unix::net::UnixStream::connect(&path).is_ok() {
                    return Err(MethodError::AlreadyExists(format!(
                        "socket {s} for export {name} is in use by another process"
                    )));
                }
            }
            Ok(_) => {
                return Err(MethodError::AlreadyExists(format!(
                    "socket path {s} for export {name} exists and is not a socket; refusing to replace it"
                )))
            }
        }
        Ok(s)
    }

    fn queues(name: &str, num_queues: Option<u16>, queue_size: Option<u16>) -> MResult<(u16, u16)> {
        let nq = num_queues.unwrap_or(DEFAULT_NUM_QUEUES);
        if nq == 0 || nq > MAX_NUM_QUEUES {
            return Err(MethodError::InvalidParams(format!(
                "num_queues {nq} of export {name} must be 1 to {MAX_NUM_QUEUES}"
            )));
        }
        let qs = queue_size.unwrap_or(DEFAULT_QUEUE_SIZE);
        if !qs.is_power_of_two() || qs > 32768 {
            return Err(MethodError::InvalidParams(format!(
                "queue_size {qs} of export {name} must be a power of two up to 32768"
            )));
        }
        Ok((nq, qs))
    }

    fn export_info(&self, inner: &Inner, rec: &ExportRecord) -> m::ExportInfo {
        let live = self.live_get(&rec.name);
        let origin_path = inner
            .state
            .origin(&rec.cow, &rec.origin_id)
            .map(|o| o.path.clone())
            .unwrap_or_default();
        let size = inner
            .origins
            .get(&(rec.cow.clone(), rec.origin_id.clone()))
            .map(|o| o.size())
            .unwrap_or(0);
        m::ExportInfo {
            name: rec.name.clone(),
            socket: rec.socket.clone(),
            volume: live
                .as_ref()
                .map(|l| l.volume.clone())
                .unwrap_or_else(|| describe(rec)),
            cow: rec.cow.clone(),
            origin: origin_path,
            origin_id: rec.origin_id.clone(),
            tag: rec.tag,
            size: if live.is_some() { size } else { 0 },
            num_queues: rec.num_queues,
            queue_size: rec.queue_size,
            readonly: rec.readonly,
            connected: live.as_ref().is_some_and(|l| l.connected),
            error: if live.is_some() {
                None
            } else {
                Some(
                    inner
                        .failed
                        .get(&rec.name)
                        .cloned()
                        .unwrap_or_else(|| "not being served".into()),
                )
            },
        }
    }

    fn find_export(&self, inner: &Inner, name: &str) -> MResult<ExportRecord> {
        m::validate_name("export name", name).map_err(MethodError::InvalidParams)?;
        inner
            .state
            .export(name)
            .cloned()
            .ok_or_else(|| MethodError::NotFound(format!("export {name} not found")))
    }

    /// The export `name`, which must serve an origin, and its open origin.
    fn origin_export(
        &self,
        inner: &mut Inner,
        name: &str,
        method: &str,
    ) -> MResult<(ExportRecord, Origin)> {
        let rec = self.find_export(inner, name)?;
        if let Some(t) = rec.tag {
            return Err(MethodError::InvalidState(format!(
                "export {name} serves snapshot {t}, not an origin; {method} needs the origin's export"
            )));
        }
        let origin = self.origin_of(inner, &rec)?;
        Ok((rec, origin))
    }

    fn origin_of(&self, inner: &mut Inner, rec: &ExportRecord) -> MResult<Origin> {
        if let Some(why) = inner.failed.get(&rec.name) {
            return Err(MethodError::InvalidState(format!(
                "export {} is not being served: {why}",
                rec.name
            )));
        }
        self.origin_for(inner, &rec.cow, &rec.origin_id, false)
    }

    fn exported_as(inner: &Inner, cow: &str, origin_id: &str, tag: Option<u32>) -> Vec<String> {
        inner
            .state
            .exports
            .iter()
            .filter(|e| e.cow == cow && e.origin_id == origin_id && e.tag == tag)
            .map(|e| e.name.clone())
            .collect()
    }

    /// Stops every export (their sockets are removed; the state keeps them for the next start)
    /// and closes every store. Holds the lock to the end, so no method runs after it.
    fn shutdown(&self) {
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
    fn close_unused(&self, inner: &mut Inner) {
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

    // ---- methods ----

    fn origin_create(&self, p: m::OriginCreateParams) -> MResult<m::ExportInfo> {
        let mut guard = self.lock();
        let inner = &mut *guard;
        // Everything is checked, and the origin opened, before the store is formatted:
        // formatting is the last step that can fail for a reason an operator can fix.
        self.check_new_name(inner, &p.name)?;
        let (origin, origin_fid) = self.check_path("origin", &p.origin)?;
        let (cow, cow_fid) = self.check_path("COW store", &p.cow)?;
        let cow = Self::known_store_path(inner, cow, cow_fid);
        self.check_roles(inner, (&origin, origin_fid), (&cow, cow_fid))?;
        let (num_queues, queue_size) = Self::queues(&p.name, p.num_queues, p.queue_size)?;
        let (socket_group, socket_mode) =
            socket_access_params(&p.name, p.socket_group.as_deref(), p.socket_mode.as_deref())?;
        let format = p.format || p.force_format;
        if format && !p.bind {
            return Err(MethodError::InvalidParams(format!(
                "export {}: formatting COW store {cow} needs bind (a fresh store has no origin to open)",
                p.name
            )));
        }
        if p.chunk_size.is_some() && !format {
            return Err(MethodError::InvalidParams(format!(
                "export {}: chunk_size is only used when formatting COW store {cow}",
                p.name
            )));
        }
        let pages = p.chunk_size.unwrap_or(1);
        if !pages.is_power_of_two() || pages > 256 {
            return Err(MethodError::InvalidParams(format!(
                "chunk_size {pages} for COW store {cow} must be a power of two from 1 to 256 pages of 4 KiB"
            )));
        }
        let origin_id = match &p.origin_id {
            Some(id) => {
                m::validate_name("origin id", id).map_err(MethodError::InvalidParams)?;
                id.clone()
            }
            None => inner
                .state
                .origins
                .iter()
                .find(|o| o.cow == cow && o.path == origin)
                .map(|o| o.origin_id.clone())
                .unwrap_or_else(|| default_origin_id(Path::new(&origin))),
        };
        // The origin must not be served or known under another store or id.
        for o in &inner.state.origins {
            let same_file = file_id(Path::new(&o.path)) == Some(origin_fid);
            if same_file && (o.cow != cow || o.origin_id != origin_id) {
                return Err(MethodError::AlreadyExists(format!(
                    "origin {origin} is already known as origin id {} of COW store {}",
                    o.origin_id, o.cow
                )));
            }
            if o.cow == cow && o.origin_id == origin_id && !same_file {
                return Err(MethodError::AlreadyExists(format!(
                    "origin id {origin_id} of COW store {cow} is already the origin {}",
                    o.path
                )));
            }
        }
        if let Some(e) = inner
            .state
            .exports
            .iter()
            .find(|e| e.cow == cow && e.origin_id == origin_id && e.tag.is_none())
        {
            return Err(MethodError::AlreadyExists(format!(
                "origin {origin_id} of COW store {cow} is already exported as {}",
                e.name
            )));
        }
        let socket = self.socket_path(inner, &p.name, p.socket.as_deref())?;
        let key = (cow.clone(), origin_id.clone());
        if format {
            let users: Vec<String> = inner
                .state
                .exports
                .iter()
                .filter(|e| e.cow == cow)
                .map(|e| e.name.clone())
                .collect();
            if !users.is_empty() {
                return Err(MethodError::Busy(format!(
                    "COW store {cow} is in use by exports {}; remove them before formatting it",
                    users.join(", ")
                )));
            }
            if inner.stores.contains_key(&cow) {
                return Err(MethodError::Busy(format!(
                    "COW store {cow} is still open (a rollback runs in it or a call waits on it); try again when it has finished"
                )));
            }
        }
        // The origin: already open here (then it must not have changed size and must be
        // writable if this export writes it), or opened now — before any format.
        let opened = match inner.origins.get(&key) {
            Some(o) => {
                if p.bind {
                    return Err(MethodError::AlreadyExists(format!(
                        "origin {origin_id} is already bound to COW store {cow}; create the export without -b (bind)"
                    )));
                }
                check_origin_size(o, &origin)?;
                if !p.readonly && inner.readonly_origins.contains(&key) {
                    return Err(MethodError::InvalidState(format!(
                        "origin {origin} is open read-only (its other exports are read-only, or its file is not writable); export it read-only (-r), or remove those exports first"
                    )));
                }
                None
            }
            None => {
                let access = if p.readonly {
                    Access::ReadOnly
                } else {
                    Access::Write
                };
                let (storage, readonly) = open_origin_file(&origin, p.direct, access)?;
                if p.bind {
                    let size = storage.len().map_err(|source| MethodError::Open {
                        what: format!("cannot read the size of origin {origin}"),
                        source,
                    })?;
                    if size == 0 || size % 512 != 0 {
                        return Err(MethodError::InvalidParams(format!(
                            "origin {origin} is {size} bytes; it must be a non-empty multiple of 512 bytes"
                        )));
                    }
                }
                Some((storage, readonly))
            }
        };
        let store = if format {
            let storage = open_file(
                "COW store",
                &cow,
                OpenMode {
                    direct: p.direct,
                    readonly: false,
                },
            )?;
            Store::format_storage(
                storage.as_ref(),
                &FormatOptions {
                    chunk_size: pages * PAGE_SIZE,
                    force: p.force_format,
                },
            )
            .map_err(|e| match e {
                snapmv_engine::Error::AlreadyExists(_) => MethodError::AlreadyExists(format!(
                    "COW store {cow} already holds a snapmv store; give -F (force_format) to format over it, destroying its snapshots"
                )),
                e => MethodError::Engine {
                    what: format!("cannot format COW store {cow}"),
                    source: e,
                },
            })?;
            info!("formatted COW store {cow} with {pages}-page chunks");
            // Whatever was bound before is gone.
            inner.state.origins.retain(|o| o.cow != cow);
            let store = open_store(&cow, storage)?;
            inner.stores.insert(cow.clone(), store.clone());
            store
        } else {
            self.store_for(inner, &cow, p.direct)?
        };
        let (origin_h, bound_now) = match opened {
            None => (
                inner.origins.get(&key).cloned().ok_or_else(|| {
                    MethodError::InvalidState(format!(
                        "origin {origin_id} of {cow} is no longer open"
                    ))
                })?,
                false,
            ),
            Some((storage, readonly)) => {
                let o = if p.bind {
                    store.bind_origin_storage(&origin_id, storage)
                } else {
                    store.open_origin_storage(&origin_id, storage)
                };
                let o = o.map_err(|e| match e {
                    snapmv_engine::Error::NotFound(_) => MethodError::NotFound(format!(
                        "origin {origin_id} is not bound to COW store {cow}; give -b (bind) to bind it"
                    )),
                    e => MethodError::Engine {
                        what: if p.bind {
                            format!("cannot bind origin {origin} as id {origin_id} to COW store {cow}")
                        } else {
                            format!("cannot open origin {origin} (id {origin_id}) in COW store {cow}")
                        },
                        source: e,
                    },
                })?;
                // Recorded at once: the engine keeps it open (and its file locked) from now on.
                inner.origins.insert(key.clone(), o.clone());
                if readonly {
                    inner.readonly_origins.insert(key.clone());
                } else {
                    inner.readonly_origins.remove(&key);
                }
                (o, p.bind)
            }
        };
        let rec = ExportRecord {
            name: p.name.clone(),
            socket,
            cow: cow.clone(),
            origin_id: origin_id.clone(),
            tag: None,
            num_queues,
            queue_size,
            readonly: p.readonly,
            socket_group,
            socket_mode,
            protocol: protocol_param(p.protocol.as_deref())?,
        };
        if let Err(e) = self.add_export(&rec, origin_h.volume()) {
            if bound_now {
                inner.origins.remove(&key);
                inner.readonly_origins.remove(&key);
                drop(origin_h);
                if let Err(u) = store.unbind_origin(&origin_id) {
                    warn!("could not undo the binding of origin {origin_id} to {cow}: {u}");
                }
            }
            return Err(e);
        }
        if inner.state.origin(&cow, &origin_id).is_none() {
            inner.state.origins.push(OriginRecord {
                cow: cow.clone(),
                origin_id: origin_id.clone(),
                path: origin.clone(),
                direct: p.direct,
            });
        }
        if inner.state.store(&cow).is_none() {
            inner.state.stores.push(StoreRecord {
                path: cow.clone(),
                direct: p.direct,
            });
        }
        inner.state.exports.push(rec.clone());
        inner.failed.remove(&rec.name);
        info!(
            "export {} serves origin {origin} ({origin_id} in {cow})",
            rec.name
        );
        self.save(inner, format!("export {} was created", rec.name))?;
        Ok(self.export_info(inner, &rec))
    }

    fn snapshot_export(&self, p: m::SnapshotExportParams) -> MResult<m::ExportInfo> {
        let mut guard = self.lock();
        let inner = &mut *guard;
        self.check_new_name(inner, &p.name)?;
        let (cow, cow_fid) = self.check_path("COW store", &p.cow)?;
        let cow = Self::known_store_path(inner, cow, cow_fid);
        let (num_queues, queue_size) = Self::queues(&p.name, p.num_queues, p.queue_size)?;
        let (socket_group, socket_mode) =
            socket_access_params(&p.name, p.socket_group.as_deref(), p.socket_mode.as_deref())?;
        let origin_id = match (&p.origin_id, &p.origin) {
            (None, None) => {
                return Err(MethodError::InvalidParams(format!(
                    "export {}: snapshot_export needs origin_id or origin",
                    p.name
                )))
            }
            (Some(id), given_path) => {
                m::validate_name("origin id", id).map_err(MethodError::InvalidParams)?;
                if inner.state.origin(&cow, id).is_none() {
                    let Some(path) = given_path else {
                        return Err(MethodError::NotFound(format!(
                            "origin id {id} of COW store {cow} is not known to this daemon; give the origin's path too"
                        )));
                    };
                    let (origin, origin_fid) = self.check_path("origin", path)?;
                    self.check_roles(inner, (&origin, origin_fid), (&cow, cow_fid))?;
                    self.remember_origin(inner, &cow, id, &origin, origin_fid, p.direct)?;
                }
                id.clone()
            }
            (None, Some(path)) => {
                let (origin, origin_fid) = self.check_path("origin", path)?;
                self.check_roles(inner, (&origin, origin_fid), (&cow, cow_fid))?;
                match inner
                    .state
                    .origins
                    .iter()
                    .find(|o| o.cow == cow && file_id(Path::new(&o.path)) == Some(origin_fid))
                {
                    Some(o) => o.origin_id.clone(),
                    None => {
                        let id = default_origin_id(Path::new(&origin));
                        self.remember_origin(inner, &cow, &id, &origin, origin_fid, p.direct)?;
                        id
                    }
                }
            }
        };
        if let Some(e) = inner
            .state
            .exports
            .iter()
            .find(|e| e.cow == cow && e.origin_id == origin_id && e.tag == Some(p.tag))
        {
            return Err(MethodError::AlreadyExists(format!(
                "snapshot {} of origin {origin_id} in COW store {cow} is already exported as {}",
                p.tag, e.name
            )));
        }
        let socket = self.socket_path(inner, &p.name, p.socket.as_deref())?;
        // An origin already open must still have the size it was bound with.
        if let (Some(o), Some(r)) = (
            inner.origins.get(&(cow.clone(), origin_id.clone())),
            inner.state.origin(&cow, &origin_id),
        ) {
            check_origin_size(o, &r.path)?;
        }
        let result = self.volume_for(inner, &cow, &origin_id, Some(p.tag), p.direct);
        let volume = match result {
            Ok(v) => v,
            Err(e) => {
                self.forget_unused_origin(inner, &cow, &origin_id);
                return Err(e);
            }
        };
        let rec = ExportRecord {
            name: p.name.clone(),
            socket,
            cow: cow.clone(),
            origin_id: origin_id.clone(),
            tag: Some(p.tag),
            num_queues,
            queue_size,
            readonly: p.readonly,
            socket_group,
            socket_mode,
            protocol: protocol_param(p.protocol.as_deref())?,
        };
        if let Err(e) = self.add_export(&rec, volume) {
            self.forget_unused_origin(inner, &cow, &origin_id);
            return Err(e);
        }
        if inner.state.store(&cow).is_none() {
            inner.state.stores.push(StoreRecord {
                path: cow.clone(),
                direct: p.direct,
            });
        }
        inner.state.exports.push(rec.clone());
        inner.failed.remove(&rec.name);
        info!(
            "export {} serves snapshot {} of origin {origin_id} in {cow}",
            rec.name, p.tag
        );
        self.save(inner, format!("export {} was created", rec.name))?;
        Ok(self.export_info(inner, &rec))
    }

    /// Records an origin given by path for `snapshot_export` (not saved until an export uses it).
    fn remember_origin(
        &self,
        inner: &mut Inner,
        cow: &str,
        origin_id: &str,
        origin: &str,
        origin_fid: FileId,
        direct: bool,
    ) -> MResult<()> {
        if let Some(o) = inner
            .state
            .origins
            .iter()
            .find(|o| file_id(Path::new(&o.path)) == Some(origin_fid))
        {
            return Err(MethodError::AlreadyExists(format!(
                "origin {origin} is already known as origin id {} of COW store {}",
                o.origin_id, o.cow
            )));
        }
        inner.state.origins.push(OriginRecord {
            cow: cow.to_string(),
            origin_id: origin_id.to_string(),
            path: origin.to_string(),
            direct,
        });
        Ok(())
    }

    /// Drops an origin record nobody exports and that was only just remembered.
    fn forget_unused_origin(&self, inner: &mut Inner, cow: &str, origin_id: &str) {
        let used = inner
            .state
            .exports
            .iter()
            .any(|e| e.cow == cow && e.origin_id == origin_id);
        let opened = inner
            .origins
            .contains_key(&(cow.to_string(), origin_id.to_string()));
        if !used && !opened {
            inner
                .state
                .origins
                .retain(|o| !(o.cow == cow && o.origin_id == origin_id));
        }
    }

    /// A guest that has just gone (its process exited, its socket closed) is noticed by the
    /// export's serving thread within moments: gives it that moment, outside the lock, before
    /// a removal is refused because of it.
    fn wait_client_leaving(&self, name: &str) {
        for _ in 0..CLIENT_LEAVE_POLLS {
            if !self.live_get(name).is_some_and(|e| e.connected) {
                break;
            }
            std::thread::sleep(CLIENT_LEAVE_POLL);
        }
    }

    /// Refuses to stop export `name` while a client is connected, unless `force` (then logs
    /// it). `what` is the operation, for the message.
    fn refuse_if_connected(&self, name: &str, force: bool, what: &str) -> MResult<()> {
        if !self.live_get(name).is_some_and(|e| e.connected) {
            return Ok(());
        }
        let peers = self.exports.peers(name);
        let who = if peers.is_empty() {
            "a client".to_string()
        } else {
            peers
                .iter()
                .map(|p| p.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        };
        if !force {
            return Err(MethodError::Busy(format!(
                "export {name} has a connected client: {who}; stop that guest first, or {what} with --force (force) and the guest loses its disk"
            )));
        }
        warn!("export {name}: {what} with --force while {who} is connected");
        Ok(())
    }

    fn export_remove(&self, p: m::ExportRemoveParams) -> MResult<m::Done> {
        if !p.force {
            self.wait_client_leaving(&p.name);
        }
        let mut guard = self.lock();
        let inner = &mut *guard;
        let rec = self.find_export(inner, &p.name)?;
        if self.live_get(&rec.name).is_some() {
            self.refuse_if_connected(&rec.name, p.force, "remove it")?;
            self.live_remove(&rec.name)
                .map_err(|source| MethodError::Export {
                    what: format!("cannot stop export {}", rec.name),
                    source,
                })?;
        }
        inner.state.exports.retain(|e| e.name != rec.name);
        inner.failed.remove(&rec.name);
        self.forget_cache_mode(&rec.name);
        info!("export {} removed", rec.name);
        self.save(inner, format!("export {} was removed", rec.name))?;
        Ok(m::Done { name: rec.name })
    }

    fn snapshot_create(&self, p: m::SnapshotCreateParams) -> MResult<m::SnapshotCreateResult> {
        let mut guard = self.lock();
        let inner = &mut *guard;
        let rec = self.find_export(inner, &p.name)?;
        let origin = self.origin_of(inner, &rec)?;
        let what = match rec.tag {
            None => format!("origin {} (export {})", rec.origin_id, rec.name),
            Some(t) => format!(
                "snapshot {t} of origin {} (export {})",
                rec.origin_id, rec.name
            ),
        };
        let tag = origin
            .create_snapshot(rec.tag, &p.memo)
            .map_err(MethodError::engine(format!("cannot snapshot {what}")))?;
        info!("snapshot {tag} taken of {what}");
        Ok(m::SnapshotCreateResult { tag })
    }

    fn snapshot_delete(&self, p: m::SnapshotDeleteParams) -> MResult<m::Done> {
        let mut guard = self.lock();
        let inner = &mut *guard;
        let (rec, origin) = self.origin_export(inner, &p.name, names::SNAPSHOT_DELETE)?;
        let users = Self::exported_as(inner, &rec.cow, &rec.origin_id, Some(p.tag));
        if !users.is_empty() {
            return Err(MethodError::Busy(format!(
                "snapshot {} of origin {} is exported as {}; remove that export first",
                p.tag,
                rec.origin_id,
                users.join(", ")
            )));
        }
        origin
            .delete_snapshot(p.tag)
            .map_err(MethodError::engine(format!(
                "cannot delete snapshot {} of origin {} (export {})",
                p.tag, rec.origin_id, rec.name
            )))?;
        info!("snapshot {} of origin {} deleted", p.tag, rec.origin_id);
        Ok(m::Done { name: rec.name })
    }

    fn origin_delete(&self, p: m::ExportRemoveParams) -> MResult<m::Done> {
        if !p.force {
            self.wait_client_leaving(&p.name);
        }
        let mut guard = self.lock();
        let inner = &mut *guard;
        let (rec, origin) = self.origin_export(inner, &p.name, names::ORIGIN_DELETE)?;
        let n = origin.snapshots().len();
        if n > 0 {
            return Err(MethodError::HasSnapshots(format!(
                "cannot delete origin {} (export {}): it still has {n} snapshot{}; delete {} first (snapmv delete {} TAG)",
                rec.origin_id,
                rec.name,
                if n == 1 { "" } else { "s" },
                if n == 1 { "it" } else { "them" },
                rec.name
            )));
        }
        if let Some(r) = origin.rollback_progress() {
            return Err(MethodError::Busy(format!(
                "origin {} (export {}) is being rolled back to snapshot {}; wait for the end",
                rec.origin_id, rec.name, r.tag
            )));
        }
        let others: Vec<String> = inner
            .state
            .exports
            .iter()
            .filter(|e| e.cow == rec.cow && e.origin_id == rec.origin_id && e.name != rec.name)
            .map(|e| e.name.clone())
            .collect();
        if !others.is_empty() {
            return Err(MethodError::Busy(format!(
                "origin {} is also exported as {}; remove those exports first",
                rec.origin_id,
                others.join(", ")
            )));
        }
        self.refuse_if_connected(&rec.name, p.force, "delete it")?;
        let store = self.store_for(inner, &rec.cow, false)?;
        self.live_remove(&rec.name)
            .map_err(|source| MethodError::Export {
                what: format!("cannot stop export {}", rec.name),
                source,
            })?;
        inner
            .origins
            .remove(&(rec.cow.clone(), rec.origin_id.clone()));
        inner
            .readonly_origins
            .remove(&(rec.cow.clone(), rec.origin_id.clone()));
        drop(origin);
        if let Err(source) = store.unbind_origin(&rec.origin_id) {
            // Serve it again: nothing changed.
            let err = MethodError::Engine {
                what: format!(
                    "cannot unbind origin {} from COW store {}",
                    rec.origin_id, rec.cow
                ),
                source,
            };
            match self
                .origin_for(inner, &rec.cow, &rec.origin_id, false)
                .and_then(|o| self.add_export(&rec, o.volume()))
            {
                Ok(()) => {}
                Err(e) => {
                    error!("export {} could not be served again: {e}", rec.name);
                    inner.failed.insert(rec.name.clone(), e.to_string());
                }
            }
            return Err(err);
        }
        inner.state.exports.retain(|e| e.name != rec.name);
        self.forget_cache_mode(&rec.name);
        inner
            .state
            .origins
            .retain(|o| !(o.cow == rec.cow && o.origin_id == rec.origin_id));
        info!(
            "origin {} unbound from {} and export {} removed",
            rec.origin_id, rec.cow, rec.name
        );
        self.save(
            inner,
            format!("origin {} was unbound from {}", rec.origin_id, rec.cow),
        )?;
        Ok(m::Done { name: rec.name })
    }

    fn snapshot_rollback(
        &self,
        p: m::SnapshotRollbackParams,
    ) -> MResult<m::SnapshotRollbackResult> {
        let (rec, origin) = {
            let mut guard = self.lock();
            let inner = &mut *guard;
            let (rec, origin) = self.origin_export(inner, &p.name, names::SNAPSHOT_ROLLBACK)?;
            if inner
                .readonly_origins
                .contains(&(rec.cow.clone(), rec.origin_id.clone()))
            {
                return Err(MethodError::InvalidState(format!(
                    "cannot roll origin {} (export {}) back: it is open read-only, and a rollback writes the origin",
                    rec.origin_id, rec.name
                )));
            }
            origin.rollback(p.tag).map_err(MethodError::engine(format!(
                "cannot roll origin {} (export {}) back to snapshot {}",
                rec.origin_id, rec.name, p.tag
            )))?;
            info!(
                "rollback of origin {} to snapshot {} started",
                rec.origin_id, p.tag
            );
            if p.wait {
                *inner.waiters.entry(rec.cow.clone()).or_insert(0) += 1;
            }
            (rec, origin)
        };
        if p.wait {
            let waited = origin.wait_rollback();
            {
                let mut inner = self.lock();
                if let Some(n) = inner.waiters.get_mut(&rec.cow) {
                    *n = n.saturating_sub(1);
                }
            }
            waited.map_err(MethodError::engine(format!(
                "rollback of origin {} (export {}) to snapshot {} failed",
                rec.origin_id, rec.name, p.tag
            )))?;
        }
        let progress = origin.rollback_progress();
        Ok(m::SnapshotRollbackResult {
            tag: p.tag,
            done: progress.is_none(),
            progress: progress.map(|r| m::RollbackProgress {
                tag: r.tag,
                chunks_done: r.chunks_done,
                chunks_total: r.chunks_total,
            }),
        })
    }

    fn snapshot_list(&self, p: m::OptionalNameParams) -> MResult<m::SnapshotList> {
        let mut guard = self.lock();
        let inner = &mut *guard;
        let keys: Vec<(String, String)> = match &p.name {
            Some(name) => {
                let rec = self.find_export(inner, name)?;
                self.origin_of(inner, &rec)?;
                vec![(rec.cow, rec.origin_id)]
            }
            None => {
                // Every origin of every open store: opened ones and those only bound.
                let mut k: Vec<_> = inner.origins.keys().cloned().collect();
                for (cow, store) in &inner.stores {
                    for id in store.status().dormant_origins {
                        k.push((cow.clone(), id));
                    }
                }
                k.sort();
                k.dedup();
                k
            }
        };
        let mut origins = Vec::new();
        for (cow, id) in keys {
            let Some(o) = inner.origins.get(&(cow.clone(), id.clone())) else {
                origins.push(m::OriginSnapshots {
                    origin: inner
                        .state
                        .origin(&cow, &id)
                        .map(|r| r.path.clone())
                        .unwrap_or_default(),
                    exported_as: Self::exported_as(inner, &cow, &id, None),
                    origin_id: id,
                    cow,
                    open: false,
                    snapshots: Vec::new(),
                });
                continue;
            };
            let mut snaps = o.snapshots();
            snaps.sort_by_key(|s| s.tag);
            origins.push(m::OriginSnapshots {
                origin_id: id.clone(),
                origin: inner
                    .state
                    .origin(&cow, &id)
                    .map(|r| r.path.clone())
                    .unwrap_or_default(),
                cow: cow.clone(),
                exported_as: Self::exported_as(inner, &cow, &id, None),
                open: true,
                snapshots: snaps
                    .into_iter()
                    .map(|s| m::SnapshotInfo {
                        tag: s.tag,
                        parent: s.parent,
                        memo: s.memo.clone(),
                        birth_unix_secs: s.birth_unix_secs,
                        exclusive_chunks: s.exclusive_chunks,
                        exported_as: Self::exported_as(inner, &cow, &id, Some(s.tag)),
                    })
                    .collect(),
            });
        }
        Ok(m::SnapshotList { origins })
    }

    /// The origin behind export `name` (of the origin or of a snapshot); the lock is released
    /// when it returns, so long reads do not hold up other methods.
    fn any_origin(&self, name: &str) -> MResult<Origin> {
        let mut guard = self.lock();
        let inner = &mut *guard;
        let rec = self.find_export(inner, name)?;
        self.origin_of(inner, &rec)
    }

    fn snapshot_diff(&self, p: m::SnapshotDiffParams) -> MResult<m::SnapshotDiffResult> {
        let origin = self.any_origin(&p.name)?;
        let to = match p.to {
            Some(t) => format!("snapshot {t}"),
            None => "the origin".into(),
        };
        let extents = origin
            .diff(Some(p.from), p.to)
            .map_err(MethodError::engine(format!(
                "cannot diff snapshot {} against {to} of origin {}",
                p.from,
                origin.id()
            )))?;
        Ok(m::SnapshotDiffResult {
            chunk_size: origin.chunk_size(),
            size: origin.size(),
            extents: extents
                .into_iter()
                .map(|(offset, length)| m::Extent { offset, length })
                .collect(),
        })
    }

    fn snapshot_stream(&self, p: m::SnapshotStreamParams) -> MResult<m::SnapshotStreamResult> {
        let origin = self.any_origin(&p.name)?;
        let conv = |what: String| {
            move |e: crate::stream::StreamError| match e {
                crate::stream::StreamError::Engine { source, .. } => {
                    MethodError::engine(what.clone())(source)
                }
                crate::stream::StreamError::Io { source, .. } => MethodError::Open {
                    what: what.clone(),
                    source,
                },
                crate::stream::StreamError::Invalid(s) => MethodError::InvalidState(s),
            }
        };
        match (&p.fifo, &p.fd_socket) {
            (Some(fifo), None) => {
                let f = open_fifo(fifo)?;
                let mut out = std::io::BufWriter::with_capacity(256 << 10, f);
                let what = format!("streaming export {} into {fifo}", p.name);
                let stats = crate::stream::write_stream(&origin, p.from, p.to, &mut out)
                    .map_err(conv(what))?;
                Ok(m::SnapshotStreamResult {
                    records: stats.records,
                    data_bytes: stats.data_bytes,
                    size: origin.size(),
                })
            }
            (None, Some(sock)) => {
                if p.from.is_some() {
                    return Err(MethodError::InvalidParams(
                        "fd_socket writes whole versions only (no from)".into(),
                    ));
                }
                let (mut s, file) = receive_file(sock)?;
                {
                    use std::io::Write;
                    // The size first, then the bytes covered as they are.
                    let _ = s.write_all(&origin.size().to_be_bytes());
                }
                let what = format!("exporting export {} into the file from {sock}", p.name);
                let written = crate::stream::write_raw(&origin, p.to, &file, |at| {
                    use std::io::Write;
                    let _ = s.write_all(&at.to_be_bytes());
                })
                .map_err(conv(what))?;
                Ok(m::SnapshotStreamResult {
                    records: 0,
                    data_bytes: written,
                    size: origin.size(),
                })
            }
            _ => Err(MethodError::InvalidParams(
                "give exactly one of fifo and fd_socket".into(),
            )),
        }
    }

    fn export_list(&self, _p: m::NoParams) -> MResult<m::ExportList> {
        let guard = self.lock();
        let exports = guard
            .state
            .exports
            .iter()
            .map(|r| self.export_info(&guard, r))
            .collect();
        Ok(m::ExportList { exports })
    }

    fn status(&self, p: m::OptionalNameParams) -> MResult<m::Status> {
        let mut guard = self.lock();
        let inner = &mut *guard;
        let (cows, only_origin) = match &p.name {
            Some(name) => {
                let rec = self.find_export(inner, name)?;
                self.origin_of(inner, &rec)?;
                (vec![rec.cow.clone()], Some(rec.origin_id))
            }
            None => {
                let mut c: Vec<String> = inner.stores.keys().cloned().collect();
                c.sort();
                (c, None)
            }
        };
        let mut stores = Vec::new();
        for cow in cows {
            let Some(store) = inner.stores.get(&cow) else {
                continue;
            };
            let st = store.status();
            let mut origins = Vec::new();
            for o in st.origins {
                if only_origin.as_ref().is_some_and(|id| *id != o.origin_id) {
                    continue;
                }
                let mut exported_as: Vec<String> = inner
                    .state
                    .exports
                    .iter()
                    .filter(|e| e.cow == cow && e.origin_id == o.origin_id)
                    .map(|e| e.name.clone())
                    .collect();
                exported_as.sort();
                origins.push(m::OriginStatus {
                    origin_id: o.origin_id.clone(),
                    origin: o.origin_path.clone(),
                    size: o.size,
                    snapshots: o.snapshots as u64,
                    rollback: o.rollback.map(|r| m::RollbackProgress {
                        tag: r.tag,
                        chunks_done: r.chunks_done,
                        chunks_total: r.chunks_total,
                    }),
                    reclaim_pending_chunks: o.reclaim_pending_chunks,
                    exported_as,
                    open: true,
                });
            }
            if only_origin.is_none() {
                let mut dormant = st.dormant_origins.clone();
                dormant.sort();
                for id in dormant {
                    origins.push(m::OriginStatus {
                        origin: inner
                            .state
                            .origin(&cow, &id)
                            .map(|r| r.path.clone())
                            .unwrap_or_default(),
                        exported_as: Self::exported_as(inner, &cow, &id, None),
                        origin_id: id,
                        size: 0,
                        snapshots: 0,
                        rollback: None,
                        reclaim_pending_chunks: 0,
                        open: false,
                    });
                }
            }
            stores.push(m::StoreStatus {
                cow: cow.clone(),
                chunk_size: st.chunk_size,
                chunks_total: st.chunks_total,
                chunks_used: st.chunks_used,
                chunks_free: st.chunks_free,
                origins,
            });
        }
        let unavailable = if p.name.is_none() {
            let mut u: Vec<m::Unavailable> = inner
                .state
                .stores
                .iter()
                .filter(|s| !inner.stores.contains_key(&s.path))
                .map(|s| m::Unavailable {
                    cow: s.path.clone(),
                    error: inner
                        .state
                        .exports
                        .iter()
                        .filter(|e| e.cow == s.path)
                        .find_map(|e| inner.failed.get(&e.name).cloned())
                        .unwrap_or_else(|| "not open".into()),
                })
                .collect();
            u.sort_by(|a, b| a.cow.cmp(&b.cow));
            u
        } else {
            Vec::new()
        };
        Ok(m::Status {
            stores,
            unavailable,
        })
    }
}

/// `path` with its directory canonicalised (the socket itself may not exist yet).
fn canonical_socket_path(path: &Path) -> PathBuf {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    match (std::fs::canonicalize(parent), path.file_name()) {
        (Ok(dir), Some(name)) => dir.join(name),
        _ => path.to_path_buf(),
    }
}

/// How an origin is to be opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    /// Read-write: an export writes the origin.
    Write,
    /// Read-only: only read-only exports of the origin.
    ReadOnly,
    /// Read-write if the file allows it, else read-only (snapshot exports only).
    Any,
}

/// Opens a store or origin file exclusively (`FileStorage::open_with`: an exclusive `flock`
/// on the descriptor, `O_EXCL` for a block device); a file another process holds is refused
/// with `busy`, naming the holder.
/// Connects to the caller's socket and receives the file to write (a regular file opened for
/// writing).
fn receive_file(path: &str) -> MResult<(std::os::unix::net::UnixStream, std::fs::File)> {
    use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};
    use std::mem::MaybeUninit;
    require_absolute("fd_socket", path)?;
    let s = std::os::unix::net::UnixStream::connect(path).map_err(|source| MethodError::Open {
        what: format!("connecting to fd_socket {path}"),
        source,
    })?;
    let _ = s.set_read_timeout(Some(std::time::Duration::from_secs(30)));
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut cmsg = RecvAncillaryBuffer::new(&mut space);
    let mut byte = [0u8; 1];
    rustix::net::recvmsg(
        &s,
        &mut [std::io::IoSliceMut::new(&mut byte)],
        &mut cmsg,
        RecvFlags::CMSG_CLOEXEC,
    )
    .map_err(|e| MethodError::Open {
        what: format!("receiving a file from {path}"),
        source: e.into(),
    })?;
    let mut fd = None;
    for msg in cmsg.drain() {
        if let RecvAncillaryMessage::ScmRights(mut fds) = msg {
            if fd.is_none() {
                fd = fds.next();
            }
        }
    }
    let Some(fd) = fd else {
        return Err(MethodError::InvalidParams(format!(
            "{path} sent no file descriptor"
        )));
    };
    let f = std::fs::File::from(fd);
    let md = f.metadata().map_err(|source| MethodError::Open {
        what: format!("examining the file from {path}"),
        source,
    })?;
    if !md.file_type().is_file() {
        return Err(MethodError::InvalidParams(format!(
            "the file descriptor from {path} is not a regular file"
        )));
    }
    Ok((s, f))
}

/// Refuses a relative path given over RPC (the daemon's working directory means nothing to
/// the caller).
fn require_absolute(what: &str, p: &str) -> MResult<()> {
    if Path::new(p).is_absolute() {
        Ok(())
    } else {
        Err(MethodError::InvalidParams(format!(
            "{what} path {p:?} must be absolute"
        )))
    }
}

/// Maps a failed look-up of `what` at `p`: not found, or why it could not be `done`.
fn lookup_error<'a>(
    what: &'a str,
    p: &'a str,
    done: &'a str,
) -> impl FnOnce(std::io::Error) -> MethodError + 'a {
    move |e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            MethodError::NotFound(format!("{what} {p} does not exist"))
        } else {
            MethodError::InvalidParams(format!("{what} {p} cannot be {done}: {e}"))
        }
    }
}

/// Opens the caller's FIFO for writing. Only a FIFO is accepted, so the daemon never writes a
/// file on a client's behalf. Waits up to 30 s for the reader to open its end.
fn open_fifo(path: &str) -> MResult<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    use std::os::unix::io::AsRawFd;
    use std::time::Duration;
    require_absolute("fifo", path)?;
    let md = std::fs::metadata(path).map_err(lookup_error("fifo", path, "examined"))?;
    if !md.file_type().is_fifo() {
        return Err(MethodError::InvalidParams(format!(
            "{path} is not a FIFO (snapshot_stream writes only into a FIFO its caller reads)"
        )));
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let f = loop {
        match std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(path)
        {
            Ok(f) => break f,
            // No reader yet.
            Err(e)
                if e.raw_os_error() == Some(libc::ENXIO)
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(source) => {
                return Err(MethodError::Open {
                    what: format!("opening fifo {path} for writing (is its reader there?)"),
                    source,
                })
            }
        }
    };
    let fd = f.as_raw_fd();
    // SAFETY: `fd` is an open descriptor owned by `f`, alive for these calls; F_GETFL/F_SETFL
    // and F_SETPIPE_SZ take integer arguments and touch no memory of ours.
    unsafe {
        let fl = libc::fcntl(fd, libc::F_GETFL);
        if fl >= 0 {
            libc::fcntl(fd, libc::F_SETFL, fl & !libc::O_NONBLOCK);
        }
        // A larger pipe buffer means fewer wake-ups; failure is harmless.
        libc::fcntl(fd, libc::F_SETPIPE_SZ, 1 << 20);
    }
    Ok(f)
}

fn open_file(what: &str, path: &str, mode: OpenMode) -> MResult<Arc<FileStorage>> {
    FileStorage::open_with(Path::new(path), mode)
        .map(Arc::new)
        .map_err(|source| {
            if let Some(u) = snapmv_engine::in_use(&source) {
                return MethodError::InUse {
                    what: what.to_string(),
                    path: path.to_string(),
                    holder: u.holder.clone(),
                    source,
                };
            }
            let what = if mode.readonly {
                format!("{what} {path} cannot be opened for reading")
            } else {
                format!("{what} {path} cannot be opened for reading and writing")
            };
            MethodError::Open { what, source }
        })
}

/// Opens an origin's file as `access` asks; returns it and whether it is read-only.
fn open_origin_file(path: &str, direct: bool, access: Access) -> MResult<(Arc<FileStorage>, bool)> {
    let ro = OpenMode {
        direct,
        readonly: true,
    };
    let rw = OpenMode {
        direct,
        readonly: false,
    };
    match access {
        Access::ReadOnly => Ok((open_file("origin", path, ro)?, true)),
        Access::Write => open_file("origin", path, rw)
            .map(|s| (s, false))
            .map_err(|e| match e {
                MethodError::Open { what, source }
                    if matches!(
                        source.kind(),
                        std::io::ErrorKind::PermissionDenied
                            | std::io::ErrorKind::ReadOnlyFilesystem
                    ) =>
                {
                    MethodError::Open {
                        what: format!("{what} (to serve it read-only, give -r)"),
                        source,
                    }
                }
                e => e,
            }),
        Access::Any => match open_file("origin", path, rw) {
            Ok(s) => Ok((s, false)),
            Err(MethodError::Open { source, .. })
                if matches!(
                    source.kind(),
                    std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::ReadOnlyFilesystem
                ) =>
            {
                Ok((open_file("origin", path, ro)?, true))
            }
            Err(e) => Err(e),
        },
    }
}

/// Opens the store on an opened file; a file with no snapmv superblock at all is named as
/// such rather than as damaged.
fn open_store(cow: &str, storage: Arc<FileStorage>) -> MResult<Store> {
    let mut magic = [[0u8; 8]; 2];
    for (slot, m) in magic.iter_mut().enumerate() {
        let _ = storage.read_at(m, slot as u64 * 4096);
    }
    if magic.iter().all(|m| m != b"SNAPMVSB") {
        return Err(MethodError::NotAStore(format!(
            "COW store {cow} is not a snapmv store (no snapmv superblock); format it with `snapmv create NAME ORIGIN COW -b -f`"
        )));
    }
    Store::open_storage(storage)
        .map_err(MethodError::engine(format!("cannot open COW store {cow}")))
}

/// The size of the file or block device at `path` now.
fn current_size(path: &str) -> Option<u64> {
    let meta = std::fs::metadata(path).ok()?;
    if meta.file_type().is_block_device() {
        let rdev = meta.rdev();
        let sectors = std::fs::read_to_string(format!(
            "/sys/dev/block/{}:{}/size",
            rustix::fs::major(rdev),
            rustix::fs::minor(rdev)
        ))
        .ok()?;
        return sectors.trim().parse::<u64>().ok().map(|s| s * 512);
    }
    Some(meta.len())
}

/// Refuses an origin whose file no longer has the size it was bound with (reads past a
/// shrunk end would return zeros, writes would extend it).
fn check_origin_size(o: &Origin, path: &str) -> MResult<()> {
    match current_size(path) {
        Some(now) if now != o.size() => {
            warn!(
                "origin {} ({path}) is now {now} bytes but was bound with {} bytes",
                o.id(),
                o.size()
            );
            Err(MethodError::InvalidState(format!(
                "origin {} ({path}) is now {now} bytes but was bound with {} bytes; restore its size before exporting it",
                o.id(),
                o.size()
            )))
        }
        _ => Ok(()),
    }
}

/// Parses an octal socket mode ("0660"): owner read-write required, no bits beyond 0o777.
pub fn parse_socket_mode(s: &str) -> Result<u32, String> {
    let mode = u32::from_str_radix(s.trim_start_matches("0o"), 8)
        .map_err(|_| format!("socket mode {s:?} is not an octal number such as 0660"))?;
    if mode > 0o777 || mode & 0o600 != 0o600 {
        return Err(format!(
            "socket mode {s} must be at most 0777 and give its owner read and write (e.g. 0600, 0660)"
        ));
    }
    Ok(mode)
}

/// Resolves a group name (from /etc/group) or a numeric gid.
pub fn resolve_group(g: &str) -> Result<u32, String> {
    if let Ok(gid) = g.parse::<u32>() {
        return Ok(gid);
    }
    let groups = std::fs::read_to_string("/etc/group")
        .map_err(|e| format!("socket group {g}: cannot read /etc/group: {e}"))?;
    groups
        .lines()
        .filter_map(|l| {
            let mut f = l.split(':');
            let name = f.next()?;
            let gid = f.nth(1)?.parse::<u32>().ok()?;
            (name == g).then_some(gid)
        })
        .next()
        .ok_or_else(|| format!("socket group {g} is not in /etc/group (give a numeric gid)"))
}

fn socket_access_params(
    name: &str,
    group: Option<&str>,
    mode: Option<&str>,
) -> MResult<(Option<u32>, Option<u32>)> {
    let bad = |e: String| MethodError::InvalidParams(format!("export {name}: {e}"));
    let group = group.map(resolve_group).transpose().map_err(bad)?;
    let mode = mode.map(parse_socket_mode).transpose().map_err(bad)?;
    Ok((group, mode))
}

fn describe(rec: &ExportRecord) -> String {
    match rec.tag {
        None => format!("origin {} of {}", rec.origin_id, rec.cow),
        Some(t) => format!("snapshot {t} of origin {} in {}", rec.origin_id, rec.cow),
    }
}

fn decode<P: DeserializeOwned + Default>(method: &str, params: Value) -> MResult<P> {
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

impl Daemon {
    fn dispatch(&self, method: &str, params: Value) -> MResult<Value> {
        let result = self.dispatch_method(method, params);
        let mut inner = self.lock();
        self.close_unused(&mut inner);
        result
    }

    fn dispatch_method(&self, method: &str, params: Value) -> MResult<Value> {
        match method {
            names::ORIGIN_CREATE => encode(self.origin_create(decode(method, params)?)),
            names::SNAPSHOT_EXPORT => encode(self.snapshot_export(decode(method, params)?)),
            names::EXPORT_REMOVE => encode(self.export_remove(decode(method, params)?)),
            names::SNAPSHOT_CREATE => encode(self.snapshot_create(decode(method, params)?)),
            names::SNAPSHOT_DELETE => encode(self.snapshot_delete(decode(method, params)?)),
            names::ORIGIN_DELETE => encode(self.origin_delete(decode(method, params)?)),
            names::SNAPSHOT_ROLLBACK => encode(self.snapshot_rollback(decode(method, params)?)),
            names::SNAPSHOT_LIST => encode(self.snapshot_list(decode(method, params)?)),
            names::EXPORT_LIST => encode(self.export_list(decode(method, params)?)),
            names::STATUS => encode(self.status(decode(method, params)?)),
            names::SNAPSHOT_DIFF => encode(self.snapshot_diff(decode(method, params)?)),
            names::SNAPSHOT_STREAM => encode(self.snapshot_stream(decode(method, params)?)),
            other => Err(MethodError::NoMethod(other.to_string())),
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

/// Runs the daemon until killed.
pub fn serve(cfg: ServeConfig) -> Result<(), ServeError> {
    // Before any thread exists, so that every thread inherits the mask and only the signal
    // thread receives SIGTERM/SIGINT.
    let signals = block_stop_signals().map_err(ServeError::Signals)?;
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
    let server = lock.bind()?;
    info!(
        "snapmv daemon ready: RPC socket {}, state {}, export sockets in {}",
        server.path().display(),
        cfg.state_dir.display(),
        cfg.socket_dir.display()
    );
    let for_signals = daemon.clone();
    let rpc_socket = cfg.rpc_socket.clone();
    std::thread::Builder::new()
        .name("snapmv-signals".into())
        .spawn(move || {
            let sig = wait_signal(&signals);
            info!("signal {sig} received: stopping every export and closing the stores");
            for_signals.shutdown();
            let _ = std::fs::remove_file(&rpc_socket);
            info!("snapmv daemon stopped; its exports come back at the next start");
            std::process::exit(0);
        })
        .map_err(ServeError::Signals)?;
    server.run(daemon)?;
    Ok(())
}

/// Blocks SIGTERM and SIGINT in the calling thread (and the threads it starts later).
fn block_stop_signals() -> std::io::Result<libc::sigset_t> {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it before any other use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid, exclusively borrowed sigset_t; the signal numbers are valid.
    let rc = unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut())
    };
    if rc != 0 {
        return Err(std::io::Error::from_raw_os_error(rc));
    }
    Ok(set)
}

/// Waits for one of the signals in `set` (blocked in every thread) and returns it.
fn wait_signal(set: &libc::sigset_t) -> i32 {
    loop {
        let mut sig = 0;
        // SAFETY: `set` is an initialised sigset_t and `sig` a valid out-pointer.
        let rc = unsafe { libc::sigwait(set, &mut sig) };
        if rc == 0 {
            return sig;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Random parameters for every method never panic the daemon and always get a success or
    /// a documented error code. Paths are drawn from files inside a scratch directory only.
    #[test]
    fn random_params_never_panic() {
        let dir = tempfile::tempdir().unwrap();
        let p = |n: &str| dir.path().join(n).display().to_string();
        for (n, len) in [
            ("o1", 1 << 20),
            ("o2", 1 << 20),
            ("c1", 16 << 20),
            ("c2", 16 << 20),
        ] {
            std::fs::File::create(p(n)).unwrap().set_len(len).unwrap();
        }
        let daemon = Daemon::open(&ServeConfig {
            rpc_socket: dir.path().join("rpc.sock"),
            state_dir: dir.path().join("state"),
            socket_dir: dir.path().join("sockets"),
            allowed_uids: vec![],
            socket_access: SocketAccess::default(),
        })
        .unwrap();
        let paths: Vec<Value> = [
            "o1",
            "o2",
            "c1",
            "c2",
            "missing",
            "state/state.json",
            "state",
        ]
        .iter()
        .map(|n| json!(p(n)))
        .chain([json!("relative"), json!(""), json!("/nonexistent/x")])
        .collect();
        let mut rng = fastrand::Rng::with_seed(7);
        let value = |rng: &mut fastrand::Rng, key: &str| -> Value {
            match rng.u8(..10) {
                0 => Value::Null,
                1 => json!(rng.bool()),
                2 => json!(rng.i64(-3..300)),
                3 => json!(["x", 1]),
                4 => json!({"a": 1}),
                5 => json!(["a/b", "..", "", "vol", "v.1", &"x".repeat(70)][rng.usize(..6)]),
                _ => match key {
                    "bind" | "format" => json!(rng.u8(..4) != 0),
                    "origin" | "cow" | "socket" => paths[rng.usize(..paths.len())].clone(),
                    "name" | "origin_id" => json!(["vol", "snap", "other"][rng.usize(..3)]),
                    "tag" | "chunk_size" | "num_queues" | "queue_size" => json!(rng.u32(..5)),
                    "memo" => json!("memo"),
                    _ => json!(rng.bool()),
                },
            }
        };
        let mut methods: Vec<&str> = names::ALL.to_vec();
        methods.push("bogus");
        let known: Vec<i64> = codes::ALL.iter().map(|(c, _)| *c).collect();
        let mut outcomes: HashMap<i64, usize> = HashMap::new();
        let pick = |rng: &mut fastrand::Rng, v: &[&str]| json!(v[rng.usize(..v.len())]);
        for _ in 0..2000 {
            let method = methods[rng.usize(..methods.len())];
            // A plausible request for the method...
            let name = pick(&mut rng, &["vol", "snap", "other"]);
            let origin = pick(&mut rng, &["o1", "o2"]);
            let origin = json!(p(origin.as_str().unwrap_or("o1")));
            let cow = pick(&mut rng, &["c1", "c2"]);
            let cow = json!(p(cow.as_str().unwrap_or("c1")));
            let tag = json!(rng.u32(1..4));
            let base = match method {
                names::ORIGIN_CREATE => json!({"name": name, "origin": origin, "cow": cow,
                    "bind": rng.bool(), "format": rng.u8(..4) == 0}),
                names::SNAPSHOT_EXPORT => {
                    json!({"name": name, "origin": origin, "cow": cow, "tag": tag})
                }
                names::SNAPSHOT_CREATE => json!({"name": name, "memo": "m"}),
                names::SNAPSHOT_DELETE => json!({"name": name, "tag": tag}),
                names::SNAPSHOT_ROLLBACK => json!({"name": name, "tag": tag, "wait": rng.bool()}),
                names::EXPORT_LIST => json!({}),
                _ => json!({"name": name}),
            };
            // ...then mutated: values replaced by anything, keys dropped or added.
            let mut params = match base {
                Value::Object(m) => m,
                _ => serde_json::Map::new(),
            };
            let keys: Vec<String> = params.keys().cloned().collect();
            for k in keys {
                match rng.u8(..12) {
                    0 => {
                        params.remove(&k);
                    }
                    1 | 2 => {
                        let v = value(&mut rng, &k);
                        params.insert(k, v);
                    }
                    _ => {}
                }
            }
            if rng.u8(..10) == 0 {
                let k = [
                    "socket",
                    "origin_id",
                    "readonly",
                    "chunk_size",
                    "num_queues",
                    "bogus",
                ][rng.usize(..6)];
                let v = value(&mut rng, k);
                params.insert(k.to_string(), v);
            }
            let params = if rng.u8(..20) == 0 {
                Value::Null
            } else {
                Value::Object(params)
            };
            match daemon.handle(method, params.clone()) {
                Ok(_) => *outcomes.entry(0).or_default() += 1,
                Err(e) => {
                    *outcomes.entry(e.code).or_default() += 1;
                    assert!(known.contains(&e.code), "{method} {params}: {e}");
                    assert_ne!(e.code, codes::INTERNAL_ERROR, "{method} {params}: {e}");
                    assert!(!e.message.is_empty());
                }
            }
        }
        eprintln!("outcomes (0 = success): {outcomes:?}");
        assert!(outcomes.get(&0).copied().unwrap_or(0) > 20, "{outcomes:?}");
        // Nothing was created outside the scratch directory's own files.
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["c1", "c2", "o1", "o2", "sockets", "state"]);
    }

    #[test]
    fn default_origin_ids() {
        assert_eq!(default_origin_id(Path::new("/a/disk.img")), "disk.img");
        assert_eq!(default_origin_id(Path::new("/a/d isk:1")), "d_isk_1");
        assert_eq!(default_origin_id(Path::new("/")), "origin");
        assert_eq!(
            default_origin_id(Path::new(&format!("/{}", "x".repeat(100)))).len(),
            64
        );
    }
}
