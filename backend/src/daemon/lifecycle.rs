//! The daemon process: start, serve the management socket, stop on SIGTERM/SIGINT.

use std::path::PathBuf;
use std::sync::Arc;

use log::info;

use super::{Daemon, ServeConfig};
use crate::rpc_server::{RpcLock, RpcServerConfig, ServerError};
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
