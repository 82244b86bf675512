//! snapmv backend library: the vhost-user-blk device and the export manager used by the daemon.

pub mod cli;
pub mod daemon;
pub mod export;
pub mod lockfile;
pub mod nbd;
pub mod rpc_server;
pub mod state;
pub mod stream;
pub mod vhost_blk;
