//! The harness's errors: every message names the object and the cause.

use std::path::PathBuf;

/// Why a benchmark step failed.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// A file or process operation failed.
    #[error("{what} ({path}): {source}")]
    Io {
        what: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A blkio call failed.
    #[error("blkio {what} on {sock}: {message} (errno {errno})")]
    Blkio {
        what: String,
        sock: PathBuf,
        message: String,
        errno: i32,
    },
    /// An I/O request completed with an error or did not complete in time.
    #[error("I/O on {sock}: {what}")]
    Request { sock: PathBuf, what: String },
    /// The snapmv daemon refused or failed a call.
    #[error("snapmv RPC {method}: {source}")]
    Rpc {
        method: String,
        #[source]
        source: snapmv_rpc::client::RpcError,
    },
    /// qemu-storage-daemon's QMP monitor refused or failed a command.
    #[error("QMP {command} on {sock}: {what}")]
    Qmp {
        command: String,
        sock: PathBuf,
        what: String,
    },
    /// A helper program (qemu-img, dd, cargo) failed.
    #[error("{program} {args} failed: {what}")]
    Command {
        program: String,
        args: String,
        what: String,
    },
    /// A server did not come up.
    #[error("{server} did not start: {what} (log: {log})")]
    Start {
        server: String,
        what: String,
        log: PathBuf,
    },
    /// The engine failed.
    #[error("engine {what}: {source}")]
    Engine {
        what: String,
        #[source]
        source: snapmv_engine::Error,
    },
    /// Bad options or an unexpected answer.
    #[error("{0}")]
    Invalid(String),
}

/// Result alias.
pub type Result<T> = std::result::Result<T, BenchError>;

/// Builds an [`BenchError::Io`] mapper.
pub fn io_err(
    what: impl Into<String>,
    path: impl Into<PathBuf>,
) -> impl FnOnce(std::io::Error) -> BenchError {
    let what = what.into();
    let path = path.into();
    move |source| BenchError::Io { what, path, source }
}
