//! The daemon process: start, serve the management socket, stop on SIGTERM/SIGINT.

use std::path::PathBuf;
use std::sync::Arc;

use log::info;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

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
            let Some(sig) = signals.forever().next() else {
                return;
            };
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
