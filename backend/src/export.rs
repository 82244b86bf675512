//! The export manager: each export is one Unix socket serving one volume as a vhost-user-blk
//! device, in its own threads, independent of the others.
//!
//! Per export: one listening socket, and a serving thread that accepts one client at a time;
//! for each connection it builds a fresh `VhostUserDaemon` (a daemon cannot serve twice), waits
//! for the client to leave, tears the daemon down and accepts the next one (reconnect).

use std::collections::BTreeMap;
use std::io;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use snapmv_rpc::limits;
use vhost::vhost_user::Listener;
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vm_memory::GuestMemoryAtomic;

use crate::rpc_server::SocketAccess;
use crate::vhost_blk::config::MAX_QUEUES;
use crate::vhost_blk::request::GuestMem;
use crate::vhost_blk::{BlkBackend, BlockDisk, DeviceOptions};

/// Defaults of an export's queues (the RPC's, `snapmv_rpc::limits`).
pub use snapmv_rpc::limits::{DEFAULT_NUM_QUEUES, DEFAULT_QUEUE_SIZE};

/// What to export and how.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportConfig {
    /// Unique name of the export (the first 20 bytes are the disk's serial, GET_ID).
    pub name: String,
    /// Path of the vhost-user Unix socket to create.
    pub socket: PathBuf,
    /// Number of request queues, 1..=64 (default 4).
    pub num_queues: u16,
    /// Largest queue size a client may set, a power of two up to 32768 (default 1024).
    pub queue_size: u16,
    /// Refuse writes (VIRTIO_BLK_F_RO).
    pub readonly: bool,
    /// Group and mode of the socket (default: the daemon's group, 0600).
    pub socket_access: SocketAccess,
    /// Where the guest's cache-mode choice is kept across restarts (default: not kept).
    pub cache_mode_file: Option<PathBuf>,
    /// The disk's serial (GET_ID) when it is not `name`: the name of an export renamed since
    /// it was created.
    pub serial: Option<String>,
}

impl ExportConfig {
    /// A read-write export with the default queue settings.
    pub fn new(name: impl Into<String>, socket: impl Into<PathBuf>) -> ExportConfig {
        ExportConfig {
            name: name.into(),
            socket: socket.into(),
            num_queues: DEFAULT_NUM_QUEUES,
            queue_size: DEFAULT_QUEUE_SIZE,
            readonly: false,
            socket_access: SocketAccess::default(),
            cache_mode_file: None,
            serial: None,
        }
    }
}

/// The state of one export, as listed.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ExportInfo {
    /// Export name.
    pub name: String,
    /// Socket path.
    pub socket: PathBuf,
    /// Number of queues offered.
    pub num_queues: u16,
    /// Read-only export.
    pub readonly: bool,
    /// A client is connected right now.
    pub connected: bool,
    /// The served volume's name (e.g. "origin /x" or "snapshot 3 of /x").
    pub volume: String,
}

/// Errors of the export manager; each names the export or socket and the cause.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// An export of that name exists.
    #[error("export {0} already exists")]
    AlreadyExists(String),
    /// No export of that name.
    #[error("export {0} not found")]
    NotFound(String),
    /// Another export of this daemon already uses the socket path.
    #[error("socket {path} is already used by export {export}")]
    SocketTaken {
        /// The socket path.
        path: PathBuf,
        /// The export using it.
        export: String,
    },
    /// Something else listens on the socket path.
    #[error("socket {0} is in use by another process")]
    SocketInUse(PathBuf),
    /// The path exists and is not a socket: refuse to replace it.
    #[error("{0} exists and is not a socket; not replacing it")]
    NotASocket(PathBuf),
    /// Creating or binding the socket failed.
    #[error("cannot create socket {path}: {source}")]
    Socket {
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The configuration is out of range.
    #[error("export {name}: {why}")]
    InvalidConfig {
        /// The export.
        name: String,
        /// What is wrong.
        why: String,
    },
    /// Starting the serving thread failed.
    #[error("export {name}: cannot start the serving thread: {source}")]
    Thread {
        /// The export.
        name: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// What the serving thread and the manager share.
struct Shared {
    name: String,
    disk: Arc<dyn BlockDisk>,
    opts: DeviceOptions,
    state: Arc<crate::vhost_blk::device::ExportState>,
    stop: AtomicBool,
    connected: AtomicBool,
    /// Shutdown handle of the current connection, if any.
    conn: Mutex<Option<ShutdownHandle>>,
}

struct Export {
    cfg: ExportConfig,
    volume: String,
    shared: Arc<Shared>,
    /// A duplicate of the listening socket, used to wake the serving thread out of accept().
    wake: UnixListener,
    thread: Option<JoinHandle<()>>,
}

/// Runs every export of the daemon. `Send + Sync`; share it behind an `Arc`.
#[derive(Default)]
pub struct ExportManager {
    exports: Mutex<BTreeMap<String, Export>>,
}

fn validate(cfg: &ExportConfig) -> Result<(), ExportError> {
    let bad = |why: String| ExportError::InvalidConfig {
        name: cfg.name.clone(),
        why,
    };
    if cfg.name.is_empty() {
        return Err(bad("the export name is empty".into()));
    }
    if !limits::num_queues_ok(cfg.num_queues) {
        return Err(bad(format!(
            "num_queues {} is out of range 1..={MAX_QUEUES}",
            cfg.num_queues
        )));
    }
    if !limits::queue_size_ok(cfg.queue_size) {
        return Err(bad(format!(
            "queue_size {} is not a power of two (1..=32768)",
            cfg.queue_size
        )));
    }
    if cfg.socket.as_os_str().is_empty() {
        return Err(bad("the socket path is empty".into()));
    }
    Ok(())
}

/// Binds `path`: refuses if a live process listens there or if it is not a socket, replaces a
/// stale socket file.
fn bind_socket(path: &Path, access: SocketAccess) -> Result<UnixListener, ExportError> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) => {
            if !meta.file_type().is_socket() {
                return Err(ExportError::NotASocket(path.to_owned()));
            }
            if UnixStream::connect(path).is_ok() {
                return Err(ExportError::SocketInUse(path.to_owned()));
            }
            log::info!("replacing stale socket {}", path.display());
            std::fs::remove_file(path).map_err(|source| ExportError::Socket {
                path: path.to_owned(),
                source,
            })?;
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(ExportError::Socket {
                path: path.to_owned(),
                source,
            })
        }
    }
    // Mode 0600 (or the one configured) whatever the umask, and never visible with another
    // mode or group (docs/security.md).
    crate::rpc_server::bind_socket_as(path, access).map_err(|e| ExportError::Socket {
        path: path.to_owned(),
        source: io::Error::other(e.to_string()),
    })
}

fn serve(shared: Arc<Shared>, mut listener: Listener) {
    let name = shared.name.clone();
    while !shared.stop.load(Ordering::SeqCst) {
        // The cache mode is kept across connections (see `ExportState`).
        let mem = GuestMemoryAtomic::new(GuestMem::new());
        let backend = Arc::new(BlkBackend::with_state(
            shared.disk.clone(),
            shared.opts.clone(),
            mem.clone(),
            shared.state.clone(),
        ));
        let mut daemon = match VhostUserDaemon::new(format!("vu-{name}"), backend.clone(), mem) {
            Ok(d) => d,
            Err(e) => {
                log::error!("export {name}: cannot create the vhost-user daemon: {e}");
                // Workers started before the failure have no handler left to stop them.
                backend.stop_orphan_workers();
                if backend.exit_event_failed() {
                    // Some worker has no exit event at all; the export cannot be served safely.
                    return;
                }
                std::thread::sleep(Duration::from_millis(500));
                continue;
            }
        };
        if backend.exit_event_failed() {
            log::error!("export {name}: worker exit events unavailable, stopping this export");
            // Dropping the daemon would join workers that cannot be stopped.
            std::mem::forget(daemon);
            return;
        }
        match daemon.start(&mut listener) {
            Ok(()) => {
                {
                    let mut conn = shared.conn.lock().unwrap_or_else(|e| e.into_inner());
                    *conn = daemon.shutdown_handle();
                    shared.connected.store(true, Ordering::SeqCst);
                    if shared.stop.load(Ordering::SeqCst) {
                        daemon.request_shutdown();
                    }
                }
                log::info!("export {name}: client connected");
                match daemon.wait() {
                    Ok(()) => log::info!("export {name}: client disconnected"),
                    Err(vhost_user_backend::Error::HandleRequest(
                        vhost::vhost_user::Error::Disconnected
                        | vhost::vhost_user::Error::PartialMessage,
                    )) => log::info!("export {name}: client disconnected"),
                    Err(e) => log::warn!("export {name}: connection ended: {e}"),
                }
                *shared.conn.lock().unwrap_or_else(|e| e.into_inner()) = None;
                shared.connected.store(false, Ordering::SeqCst);
            }
            Err(e) => {
                if !shared.stop.load(Ordering::SeqCst) {
                    log::warn!("export {name}: accept failed: {e}");
                    // Persistent failures (e.g. out of fds) must not spin.
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
        // Dropping the daemon sends the exit events and joins the queue workers.
        drop(daemon);
        backend.close_exit_fds();
    }
    log::info!("export {name}: stopped serving");
}

impl ExportManager {
    /// An empty manager.
    pub fn new() -> Self {
        Self::default()
    }

    /// Binds the socket (refusing one in use, replacing a stale one), starts serving `disk` in
    /// background threads and returns once the socket accepts connections. After a client
    /// disconnects, the same socket accepts a new client.
    pub fn add<D: BlockDisk>(&self, cfg: ExportConfig, disk: D) -> Result<(), ExportError> {
        self.add_disk(cfg, Arc::new(disk))
    }

    /// [`ExportManager::add`] for a disk already shared.
    pub fn add_disk(&self, cfg: ExportConfig, disk: Arc<dyn BlockDisk>) -> Result<(), ExportError> {
        validate(&cfg)?;
        let mut exports = self.exports.lock().unwrap_or_else(|e| e.into_inner());
        if exports.contains_key(&cfg.name) {
            return Err(ExportError::AlreadyExists(cfg.name));
        }
        if let Some(other) = exports.values().find(|e| e.cfg.socket == cfg.socket) {
            return Err(ExportError::SocketTaken {
                path: cfg.socket,
                export: other.cfg.name.clone(),
            });
        }
        let listener = bind_socket(&cfg.socket, cfg.socket_access)?;
        let cleanup = |e: ExportError| {
            let _ = std::fs::remove_file(&cfg.socket);
            e
        };
        let wake = listener.try_clone().map_err(|source| {
            cleanup(ExportError::Socket {
                path: cfg.socket.clone(),
                source,
            })
        })?;
        let volume = disk.name();
        let shared = Arc::new(Shared {
            name: cfg.name.clone(),
            disk,
            opts: DeviceOptions {
                // (The device's name is what GET_ID answers: the serial, once renamed.)
                name: cfg.serial.clone().unwrap_or_else(|| cfg.name.clone()),
                num_queues: cfg.num_queues,
                max_queue_size: cfg.queue_size,
                readonly: cfg.readonly,
            },
            state: Arc::new(crate::vhost_blk::device::ExportState::new(
                cfg.cache_mode_file.clone(),
            )),
            stop: AtomicBool::new(false),
            connected: AtomicBool::new(false),
            conn: Mutex::new(None),
        });
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name(format!("export-{}", cfg.name))
            .spawn(move || serve(thread_shared, Listener::from(listener)))
            .map_err(|source| {
                cleanup(ExportError::Thread {
                    name: cfg.name.clone(),
                    source,
                })
            })?;
        log::info!(
            "export {}: serving {volume} on {} ({} queues{})",
            cfg.name,
            cfg.socket.display(),
            cfg.num_queues,
            if cfg.readonly { ", read-only" } else { "" }
        );
        exports.insert(
            cfg.name.clone(),
            Export {
                cfg,
                volume,
                shared,
                wake,
                thread: Some(thread),
            },
        );
        Ok(())
    }

    /// Stops serving `name`: disconnects its client, joins its threads and removes the socket
    /// file. The volume's data is untouched.
    pub fn remove(&self, name: &str) -> Result<(), ExportError> {
        let export = self
            .exports
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name)
            .ok_or_else(|| ExportError::NotFound(name.to_owned()))?;
        stop_export(export);
        Ok(())
    }

    /// Renames export `old` to `new` while it serves: its socket, its client and its
    /// counters stay; the disk keeps its serial (GET_ID answers the name it started with).
    pub fn rename(&self, old: &str, new: &str) -> Result<(), ExportError> {
        let mut exports = self.exports.lock().unwrap_or_else(|e| e.into_inner());
        if exports.contains_key(new) {
            return Err(ExportError::AlreadyExists(new.to_owned()));
        }
        let mut e = exports
            .remove(old)
            .ok_or_else(|| ExportError::NotFound(old.to_owned()))?;
        e.cfg.serial.get_or_insert_with(|| e.cfg.name.clone());
        e.cfg.name = new.to_owned();
        exports.insert(new.to_owned(), e);
        Ok(())
    }

    /// Every export, sorted by name.
    pub fn list(&self) -> Vec<ExportInfo> {
        self.exports
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .map(info)
            .collect()
    }

    /// One export.
    pub fn get(&self, name: &str) -> Option<ExportInfo> {
        self.exports
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .map(info)
    }

    /// The cache mode export `name` serves with now (`true`: write-back), as its guest set
    /// it; `None` if there is no such export.
    pub fn writeback(&self, name: &str) -> Option<bool> {
        self.exports
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .map(|e| e.shared.state.writeback.load(Ordering::SeqCst))
    }

    /// Sets the cache mode of export `name` (kept like a guest's choice), for a guest whose
    /// choice was made elsewhere: on the source of a live migration. False if no such export.
    pub fn set_writeback(&self, name: &str, writeback: bool) -> bool {
        match self
            .exports
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
        {
            Some(e) => {
                e.shared.state.set_writeback(name, writeback);
                true
            }
            None => false,
        }
    }

    /// The statistics of export `name` since it was added (across its clients' reconnects).
    pub fn stats(&self, name: &str) -> Option<crate::vhost_blk::ExportStats> {
        self.exports
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .map(|e| e.shared.state.metrics().snapshot())
    }
}

/// A process connected to an export's socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    /// Its pid.
    pub pid: u32,
    /// Its uid.
    pub uid: u32,
    /// Its command name (`/proc/PID/comm`), if readable.
    pub comm: String,
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.comm.is_empty() {
            write!(f, "pid {} (uid {})", self.pid, self.uid)
        } else {
            write!(f, "pid {} ({}, uid {})", self.pid, self.comm, self.uid)
        }
    }
}

impl ExportManager {
    /// The processes connected to export `name` (empty if none, or if they cannot be found).
    pub fn peers(&self, name: &str) -> Vec<Peer> {
        let exports = self.exports.lock().unwrap_or_else(|e| e.into_inner());
        let Some(e) = exports.get(name) else {
            return Vec::new();
        };
        // The address the socket was bound to (a temporary name, before its rename into
        // place): accepted connections report it as their own.
        let Some(bound) = e
            .wake
            .local_addr()
            .ok()
            .and_then(|a| a.as_pathname().map(Path::to_path_buf))
        else {
            return Vec::new();
        };
        drop(exports);
        peers_of(&bound)
    }
}

/// The peers of the accepted (not listening) Unix sockets of this process whose local address
/// is `socket`: an accepted socket reports its listener's bound address as its own. Found by
/// walking `/proc/self/fd`, because the vhost-user library owns the accepted connection.
fn peers_of(socket: &Path) -> Vec<Peer> {
    use rustix::net::{sockopt, SocketAddrUnix};
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return Vec::new();
    };
    let mut peers = Vec::new();
    for entry in dir.flatten() {
        let is_socket = std::fs::read_link(entry.path())
            .map(|t| t.to_string_lossy().starts_with("socket:"))
            .unwrap_or(false);
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<std::os::fd::RawFd>().ok())
        else {
            continue;
        };
        if !is_socket {
            continue;
        }
        // Duplicate it first: the number may be closed (and reused) by another thread at any
        // moment; our duplicate stays valid whatever happens to the original.
        // SAFETY: fcntl(F_DUPFD_CLOEXEC) on any number is memory-safe; a closed or reused
        // number yields an error or an unrelated descriptor, which the checks below reject.
        let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
        if dup < 0 {
            continue;
        }
        // SAFETY: `dup` was just returned by fcntl and is owned by nothing else.
        let owned = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(dup) };
        if sockopt::socket_acceptconn(&owned).unwrap_or(true) {
            continue;
        }
        let Ok(addr) = rustix::net::getsockname(&owned) else {
            continue;
        };
        let Ok(unix) = SocketAddrUnix::try_from(addr) else {
            continue;
        };
        if unix
            .path()
            .map(|p| p.to_bytes() == socket.as_os_str().as_encoded_bytes())
            != Some(true)
        {
            continue;
        }
        if let Ok(cred) = sockopt::socket_peercred(&owned) {
            let pid = cred.pid.as_raw_nonzero().get() as u32;
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .map(|c| c.trim().to_string())
                .unwrap_or_default();
            let peer = Peer {
                pid,
                uid: cred.uid.as_raw(),
                comm,
            };
            if !peers.contains(&peer) {
                peers.push(peer);
            }
        }
    }
    peers
}

fn info(e: &Export) -> ExportInfo {
    ExportInfo {
        name: e.cfg.name.clone(),
        socket: e.cfg.socket.clone(),
        num_queues: e.cfg.num_queues,
        readonly: e.cfg.readonly,
        connected: e.shared.connected.load(Ordering::SeqCst),
        volume: e.volume.clone(),
    }
}

fn stop_export(mut export: Export) {
    let shared = &export.shared;
    shared.stop.store(true, Ordering::SeqCst);
    if let Some(h) = shared
        .conn
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
    {
        h.shutdown();
    }
    // Wake a serving thread blocked in accept(): on Linux, shutdown() of a listening socket
    // makes accept() fail with EINVAL. `wake` is our own duplicate, so the fd is valid.
    if let Err(e) = rustix::net::shutdown(&export.wake, rustix::net::Shutdown::Both) {
        log::warn!(
            "export {}: shutdown of the listening socket failed: {}",
            export.cfg.name,
            io::Error::from(e)
        );
    }
    if let Some(t) = export.thread.take() {
        if t.join().is_err() {
            log::error!("export {}: serving thread panicked", export.cfg.name);
        }
    }
    if let Err(e) = std::fs::remove_file(&export.cfg.socket) {
        if e.kind() != io::ErrorKind::NotFound {
            log::warn!(
                "export {}: cannot remove socket {}: {e}",
                export.cfg.name,
                export.cfg.socket.display()
            );
        }
    }
    log::info!("export {}: removed", export.cfg.name);
}

impl Drop for ExportManager {
    fn drop(&mut self) {
        let exports = std::mem::take(&mut *self.exports.lock().unwrap_or_else(|e| e.into_inner()));
        for (_, e) in exports {
            stop_export(e);
        }
    }
}
