//! The management socket: a Unix socket speaking line-delimited JSON-RPC 2.0.
//!
//! * The socket is created atomically with mode 0600 whatever the umask: it is bound inside a
//!   private 0700 directory next to its final path, chmod-ed, then renamed into place.
//! * `PATH.lock` is held with `flock` while the server lives; a socket path on which another
//!   daemon answers is refused, a stale socket (nobody listening) is replaced.
//! * Each client gets a thread (at most [`RpcServerConfig::max_clients`] at once); its uid
//!   (SO_PEERCRED) must be the daemon's, root's, or in the allowed list.
//! * A request line longer than [`MAX_LINE_LEN`] is answered with an error and the connection
//!   closed; an idle client is dropped after [`RpcServerConfig::idle_timeout`].
//! * A panic in a handler becomes an internal error for that request; the daemon goes on.

use std::fs::{self, File};
use std::io::{self, BufReader, Write};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use log::{debug, info, warn};
use serde_json::Value;
use snapmv_rpc::protocol::{
    codes, parse_line, read_line_limited, Incoming, LineRead, Request, Response,
};
use snapmv_rpc::{ErrorObject, MAX_LINE_LEN};

use crate::lockfile::{lock_exclusive, LockError};

/// Something that answers method calls.
pub trait Handler: Send + Sync + 'static {
    /// Runs `method` with `params` (an object, or null when absent).
    fn handle(&self, method: &str, params: Value) -> Result<Value, ErrorObject>;
}

/// What can go wrong setting up the socket.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A file operation failed.
    #[error("RPC socket {path}: {what}: {source}")]
    Io {
        /// The socket path.
        path: PathBuf,
        /// What was being done.
        what: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Another daemon owns the socket.
    #[error("RPC socket {path} is in use by another snapmv daemon ({why})")]
    InUse {
        /// The socket path.
        path: PathBuf,
        /// How that was detected.
        why: &'static str,
    },
    /// Something that is not a socket is in the way.
    #[error("RPC socket {path} already exists and is not a socket; refusing to replace it")]
    NotASocket {
        /// The socket path.
        path: PathBuf,
    },
}

/// Settings of the RPC server.
#[derive(Debug, Clone)]
pub struct RpcServerConfig {
    /// Socket path.
    pub socket: PathBuf,
    /// Uids allowed besides the daemon's own and root.
    pub allowed_uids: Vec<u32>,
    /// Most clients served at once; more are answered with an error and closed.
    pub max_clients: usize,
    /// A client sending nothing for this long is disconnected.
    pub idle_timeout: Duration,
}

impl RpcServerConfig {
    /// Defaults for `socket`: 64 clients, 10 minutes idle timeout.
    pub fn new(socket: PathBuf) -> Self {
        RpcServerConfig {
            socket,
            allowed_uids: Vec::new(),
            max_clients: 64,
            idle_timeout: Duration::from_secs(600),
        }
    }
}

/// A bound RPC socket.
#[derive(Debug)]
pub struct RpcServer {
    cfg: RpcServerConfig,
    listener: UnixListener,
    _lock: File,
}

fn io_err(path: &Path, what: impl Into<String>) -> impl FnOnce(io::Error) -> ServerError {
    let path = path.to_path_buf();
    let what = what.into();
    move |source| ServerError::Io { path, what, source }
}

/// Checks that nobody serves `path` and that it is a socket or absent. Returns whether a
/// stale socket is there.
pub fn check_socket_free(path: &Path) -> Result<bool, ServerError> {
    match fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(io_err(path, "examining the existing file")(e)),
        Ok(m) if !m.file_type().is_socket() => Err(ServerError::NotASocket {
            path: path.to_path_buf(),
        }),
        Ok(_) => match UnixStream::connect(path) {
            Ok(_) => Err(ServerError::InUse {
                path: path.to_path_buf(),
                why: "a process accepts connections on it",
            }),
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => Ok(true),
            Err(e) => Err(io_err(path, "probing the existing socket")(e)),
        },
    }
}

/// Binds a Unix socket at `path` with mode 0600, atomically: the path either does not change
/// or holds the new, already private, socket. Replaces a stale socket at `path`.
pub fn bind_private_socket(path: &Path) -> Result<UnixListener, ServerError> {
    bind_socket_as(path, SocketAccess::default())
}

/// Who may connect to a socket besides its owner: a group and a mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketAccess {
    /// Group (gid) to give the socket; `None` keeps the daemon's group.
    pub group: Option<u32>,
    /// Permission bits (at most 0o777).
    pub mode: u32,
}

impl Default for SocketAccess {
    fn default() -> Self {
        SocketAccess {
            group: None,
            mode: 0o600,
        }
    }
}

/// [`bind_private_socket`] with a chosen group and mode, set while the socket is still inside
/// the private directory: the final path never holds it with any other owner or mode.
pub fn bind_socket_as(path: &Path, access: SocketAccess) -> Result<UnixListener, ServerError> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let file_name = path
        .file_name()
        .ok_or_else(|| ServerError::Io {
            path: path.to_path_buf(),
            what: "the path has no file name".into(),
            source: io::Error::from(io::ErrorKind::InvalidInput),
        })?
        .to_string_lossy()
        .into_owned();
    let tmp_dir = parent.join(format!(
        ".{file_name}.{}.{}.tmp",
        std::process::id(),
        unique_suffix()
    ));
    fs::DirBuilder::new()
        .mode(0o700)
        .create(&tmp_dir)
        .map_err(io_err(path, format!("creating {}", tmp_dir.display())))?;
    let result = (|| {
        fs::set_permissions(&tmp_dir, fs::Permissions::from_mode(0o700)).map_err(io_err(
            path,
            format!("setting the mode of {}", tmp_dir.display()),
        ))?;
        let tmp_sock = tmp_dir.join("s");
        let listener = UnixListener::bind(&tmp_sock).map_err(io_err(path, "binding the socket"))?;
        fs::set_permissions(&tmp_sock, fs::Permissions::from_mode(0o600))
            .map_err(io_err(path, "setting the socket's mode to 0600"))?;
        if let Some(gid) = access.group {
            rustix::fs::chown(&tmp_sock, None, Some(rustix::fs::Gid::from_raw(gid)))
                .map_err(io::Error::from)
                .map_err(io_err(path, format!("giving the socket to group {gid}")))?;
        }
        if access.mode != 0o600 {
            fs::set_permissions(&tmp_sock, fs::Permissions::from_mode(access.mode)).map_err(
                io_err(
                    path,
                    format!("setting the socket's mode to {:04o}", access.mode),
                ),
            )?;
        }
        fs::rename(&tmp_sock, path).map_err(io_err(path, "moving the socket into place"))?;
        Ok(listener)
    })();
    let _ = fs::remove_dir_all(&tmp_dir);
    result
}

fn unique_suffix() -> u64 {
    use std::time::{SystemTime, UNIX_EPOCH};
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// The RPC socket's lock, held before anything else is set up so that of two daemons started
/// at once on the same socket, the second changes nothing.
#[derive(Debug)]
pub struct RpcLock {
    cfg: RpcServerConfig,
    lock: File,
}

impl RpcLock {
    /// Locks `SOCKET.lock` and checks that nobody serves the socket.
    pub fn acquire(cfg: RpcServerConfig) -> Result<Self, ServerError> {
        let path = cfg.socket.clone();
        let mut lock_name = path.as_os_str().to_owned();
        lock_name.push(".lock");
        let lock_path = PathBuf::from(lock_name);
        let lock = match lock_exclusive(&lock_path) {
            Ok(f) => f,
            Err(LockError::Held) => {
                return Err(ServerError::InUse {
                    path,
                    why: "its lock file is held",
                })
            }
            Err(LockError::Open(e)) => {
                return Err(io_err(&path, format!("opening {}", lock_path.display()))(e))
            }
            Err(LockError::Lock(e)) => {
                return Err(io_err(&path, format!("locking {}", lock_path.display()))(e))
            }
        };
        check_socket_free(&path)?;
        Ok(RpcLock { cfg, lock })
    }

    /// Binds the socket (replacing a stale one).
    pub fn bind(self) -> Result<RpcServer, ServerError> {
        let path = self.cfg.socket.clone();
        if check_socket_free(&path)? {
            info!("replacing stale RPC socket {}", path.display());
        }
        let listener = bind_private_socket(&path)?;
        Ok(RpcServer {
            cfg: self.cfg,
            listener,
            _lock: self.lock,
        })
    }
}

impl RpcServer {
    /// Locks `SOCKET.lock`, checks nobody serves the socket, and binds it.
    pub fn bind(cfg: RpcServerConfig) -> Result<Self, ServerError> {
        RpcLock::acquire(cfg)?.bind()
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.cfg.socket
    }

    /// Accepts clients forever, one thread each.
    pub fn run(self, handler: Arc<dyn Handler>) -> Result<(), ServerError> {
        let active = Arc::new(AtomicUsize::new(0));
        let allowed: Arc<Vec<u32>> = Arc::new({
            let mut v = self.cfg.allowed_uids.clone();
            v.push(rustix::process::getuid().as_raw());
            v.push(0);
            v
        });
        info!("serving JSON-RPC on {}", self.cfg.socket.display());
        loop {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // EMFILE and friends: do not spin, do not die.
                    warn!(
                        "RPC socket {}: accept failed: {e}",
                        self.cfg.socket.display()
                    );
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            };
            if active.fetch_add(1, Ordering::SeqCst) >= self.cfg.max_clients {
                active.fetch_sub(1, Ordering::SeqCst);
                let mut s = stream;
                let _ = s.set_write_timeout(Some(Duration::from_secs(1)));
                let _ = write_response(
                    &mut s,
                    &Response::err(
                        Value::Null,
                        ErrorObject::new(
                            codes::BUSY,
                            format!(
                                "RPC socket {} already serves {} clients; try again later",
                                self.cfg.socket.display(),
                                self.cfg.max_clients
                            ),
                        ),
                    ),
                );
                continue;
            }
            let handler = handler.clone();
            let active2 = active.clone();
            let allowed = allowed.clone();
            let idle = self.cfg.idle_timeout;
            let spawned = std::thread::Builder::new()
                .name("snapmv-rpc-client".into())
                .spawn(move || {
                    serve_client(stream, &*handler, &allowed, idle);
                    active2.fetch_sub(1, Ordering::SeqCst);
                });
            if let Err(e) = spawned {
                active.fetch_sub(1, Ordering::SeqCst);
                warn!("cannot start a thread for an RPC client: {e}");
            }
        }
    }
}

fn write_response<W: Write>(w: &mut W, resp: &impl serde::Serialize) -> io::Result<()> {
    let mut bytes = serde_json::to_vec(resp).map_err(io::Error::other)?;
    bytes.push(b'\n');
    w.write_all(&bytes)?;
    w.flush()
}

fn serve_client(stream: UnixStream, handler: &dyn Handler, allowed: &[u32], idle: Duration) {
    let mut writer = match stream.try_clone() {
        Ok(w) => w,
        Err(e) => {
            warn!("RPC client: cannot duplicate the socket: {e}");
            return;
        }
    };
    let peer = match rustix::net::sockopt::socket_peercred(&stream) {
        Ok(c) => c,
        Err(e) => {
            warn!("RPC client: cannot read its credentials (SO_PEERCRED): {e}; closing");
            return;
        }
    };
    let uid = peer.uid.as_raw();
    let pid = peer.pid.as_raw_nonzero().get();
    let _ = writer.set_write_timeout(Some(Duration::from_secs(30)));
    if !allowed.contains(&uid) {
        warn!("RPC client pid {pid} uid {uid} is not allowed; closing");
        let _ = write_response(
            &mut writer,
            &Response::err(
                Value::Null,
                ErrorObject::new(
                    codes::PERMISSION_DENIED,
                    format!("uid {uid} is not allowed to manage this snapmv daemon"),
                ),
            ),
        );
        return;
    }
    debug!("RPC client pid {pid} uid {uid} connected");
    let _ = stream.set_read_timeout(Some(idle));
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    loop {
        match read_line_limited(&mut reader, MAX_LINE_LEN, &mut line) {
            Ok(LineRead::Line) => {}
            Ok(LineRead::Eof) => break,
            Ok(LineRead::TooLong) => {
                warn!(
                    "RPC client pid {pid}: request line longer than {MAX_LINE_LEN} bytes; closing"
                );
                let _ = write_response(
                    &mut writer,
                    &Response::err(
                        Value::Null,
                        ErrorObject::new(
                            codes::INVALID_REQUEST,
                            format!(
                                "request line exceeds the limit of {MAX_LINE_LEN} bytes; closing the connection"
                            ),
                        ),
                    ),
                );
                break;
            }
            Err(e) => {
                debug!("RPC client pid {pid}: {e}; closing");
                break;
            }
        }
        if line.iter().all(|b| b.is_ascii_whitespace()) {
            continue;
        }
        let out: Option<Value> = match parse_line(&line) {
            Incoming::Invalid(resp) => serde_json::to_value(*resp).ok(),
            Incoming::Single(r) => {
                answer(handler, r).and_then(|resp| serde_json::to_value(resp).ok())
            }
            Incoming::Batch(items) => {
                let resps: Vec<Value> = items
                    .into_iter()
                    .filter_map(|r| answer(handler, r))
                    .filter_map(|resp| serde_json::to_value(resp).ok())
                    .collect();
                if resps.is_empty() {
                    None
                } else {
                    Some(Value::Array(resps))
                }
            }
        };
        if let Some(out) = out {
            if let Err(e) = write_response(&mut writer, &out) {
                debug!("RPC client pid {pid}: cannot send the response: {e}; closing");
                break;
            }
        }
    }
    debug!("RPC client pid {pid} disconnected");
}

/// Runs one parsed request; `None` for a notification.
fn answer(handler: &dyn Handler, req: Result<Request, (Value, ErrorObject)>) -> Option<Response> {
    let req = match req {
        Ok(r) => r,
        Err((id, e)) => return Some(Response::err(id, e)),
    };
    let params = req.params.unwrap_or(Value::Null);
    let method = req.method;
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        handler.handle(&method, params)
    }))
    .unwrap_or_else(|_| {
        Err(ErrorObject::new(
            codes::INTERNAL_ERROR,
            format!("method {method} failed with an internal error (a bug; see the daemon log)"),
        ))
    });
    if let Err(e) = &outcome {
        debug!("{method}: {e}");
    }
    let id = req.id?;
    Some(match outcome {
        Ok(v) => Response::ok(id, v),
        Err(e) => Response::err(id, e),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use snapmv_rpc::RpcClient;
    use std::io::Read;

    struct Echo;
    impl Handler for Echo {
        fn handle(&self, method: &str, params: Value) -> Result<Value, ErrorObject> {
            match method {
                "echo" => Ok(params),
                "panic" => panic!("test panic"),
                _ => Err(ErrorObject::new(
                    codes::METHOD_NOT_FOUND,
                    format!("method {method} does not exist"),
                )),
            }
        }
    }

    fn start(dir: &Path) -> PathBuf {
        let path = dir.join("rpc.sock");
        let server = RpcServer::bind(RpcServerConfig::new(path.clone())).unwrap();
        std::thread::spawn(move || server.run(Arc::new(Echo)));
        path
    }

    #[test]
    fn socket_is_private_whatever_the_umask() {
        let d = tempfile::tempdir().unwrap();
        // Only this process's file creation mask; restored below.
        let old = rustix::process::umask(rustix::fs::Mode::empty());
        let path = start(d.path());
        rustix::process::umask(old);
        let m = fs::symlink_metadata(&path).unwrap();
        assert!(m.file_type().is_socket());
        assert_eq!(m.permissions().mode() & 0o777, 0o600);
        // No temporary directory left behind.
        let names: Vec<_> = fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(names.iter().all(|n| !n.ends_with(".tmp")), "{names:?}");
    }

    #[test]
    fn calls_errors_panics_and_notifications() {
        let d = tempfile::tempdir().unwrap();
        let path = start(d.path());
        let mut c = RpcClient::connect(&path).unwrap();
        assert_eq!(
            c.call_raw("echo", serde_json::json!({"a": 1})).unwrap(),
            serde_json::json!({"a": 1})
        );
        assert_eq!(
            c.call_raw("nope", Value::Null).unwrap_err().code(),
            Some(codes::METHOD_NOT_FOUND)
        );
        assert_eq!(
            c.call_raw("panic", Value::Null).unwrap_err().code(),
            Some(codes::INTERNAL_ERROR)
        );
        // A notification gets no answer: the next answer is for the next call.
        c.send_raw(b"{\"jsonrpc\":\"2.0\",\"method\":\"echo\"}\n\n")
            .unwrap();
        assert_eq!(c.call_raw("echo", Value::Null).unwrap(), Value::Null);
        // Garbage, then a batch.
        c.send_raw(b"{oops\n").unwrap();
        assert_eq!(c.read_raw().unwrap()["error"]["code"], codes::PARSE_ERROR);
        c.send_raw(b"[{\"jsonrpc\":\"2.0\",\"method\":\"echo\",\"params\":{},\"id\":1},{\"jsonrpc\":\"2.0\",\"method\":\"echo\"},7]\n")
            .unwrap();
        let v = c.read_raw().unwrap();
        let arr = v.as_array().unwrap();
        assert_eq!(arr.len(), 2);
        assert_eq!(arr[0]["result"], serde_json::json!({}));
        assert_eq!(arr[1]["error"]["code"], codes::INVALID_REQUEST);
    }

    #[test]
    fn overlong_line_is_rejected_and_others_still_served() {
        let d = tempfile::tempdir().unwrap();
        let path = start(d.path());
        let mut staller = UnixStream::connect(&path).unwrap();
        staller.write_all(b"{\"jsonrpc\":").unwrap();
        let mut big = UnixStream::connect(&path).unwrap();
        let chunk = vec![b'x'; 64 << 10];
        // The server may close before everything is sent: ignore the write error.
        for _ in 0..(MAX_LINE_LEN / chunk.len() + 2) {
            if big.write_all(&chunk).is_err() {
                break;
            }
        }
        let mut answer = String::new();
        let _ = big.read_to_string(&mut answer);
        let v: Value = serde_json::from_str(answer.trim()).unwrap();
        assert_eq!(v["error"]["code"], codes::INVALID_REQUEST);
        // The stalled client does not block anyone.
        let mut c = RpcClient::connect(&path).unwrap();
        assert_eq!(c.call_raw("echo", Value::Null).unwrap(), Value::Null);
    }

    #[test]
    fn second_server_on_the_same_socket_is_refused_and_stale_socket_replaced() {
        let d = tempfile::tempdir().unwrap();
        let path = start(d.path());
        match RpcServer::bind(RpcServerConfig::new(path.clone())) {
            Err(ServerError::InUse { .. }) => {}
            other => panic!("expected InUse, got {other:?}"),
        }
        // A stale socket (bound, nobody listening) with no lock held is replaced.
        let stale = d.path().join("stale.sock");
        drop(UnixListener::bind(&stale).unwrap());
        let s = RpcServer::bind(RpcServerConfig::new(stale.clone())).unwrap();
        std::thread::spawn(move || s.run(Arc::new(Echo)));
        let mut c = RpcClient::connect(&stale).unwrap();
        assert_eq!(c.call_raw("echo", Value::Null).unwrap(), Value::Null);
        // A regular file in the way is never replaced.
        let file = d.path().join("file");
        fs::write(&file, b"data").unwrap();
        assert!(matches!(
            RpcServer::bind(RpcServerConfig::new(file.clone())),
            Err(ServerError::NotASocket { .. })
        ));
        assert_eq!(fs::read(&file).unwrap(), b"data");
    }

    #[test]
    fn foreign_uid_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("rpc.sock");
        let server = RpcServer::bind(RpcServerConfig::new(path.clone())).unwrap();
        let (a, b) = UnixStream::pair().unwrap();
        // Own uid is allowed through `allowed`; an empty list refuses everyone.
        std::thread::spawn(move || serve_client(a, &Echo, &[], Duration::from_secs(5)));
        let mut answer = String::new();
        let mut b2 = b;
        b2.read_to_string(&mut answer).unwrap();
        let v: Value = serde_json::from_str(answer.trim()).unwrap();
        assert_eq!(v["error"]["code"], codes::PERMISSION_DENIED);
        drop(server);
    }
}
