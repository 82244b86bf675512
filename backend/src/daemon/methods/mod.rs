//! The method handlers, grouped by what they act on. Each is an `impl Daemon` block; the
//! dispatch table is in the parent module.

mod backup;
mod export;
mod origin;
pub(crate) use origin::NewOriginExport;
mod snapshot;
mod stats;
mod status;
