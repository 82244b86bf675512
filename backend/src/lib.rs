//! snapmv backend library: the vhost-user-blk device and the export manager used by the daemon.

pub mod export;
pub mod vhost_blk;
