//! The daemon: `snapmv serve`. Owns the open stores and origins, the exports (through the
//! export manager) and the state directory, and answers the management methods.
//!
//! One mutex serialises every management operation; `snapshot_rollback` with `wait` releases
//! it before waiting, and nothing else blocks for long while holding it, so queries stay
//! responsive while a rollback runs.
//!
//! Modules, each depending only on those above it (none on this file):
//! * `error`: [`MethodError`] and its JSON-RPC code, in one place;
//! * `ownership`: what a path or `rbd:` locator names, opening it as its one owner, RBD
//!   takeover (fencing), release and lost ownership;
//! * `core`: the [`Daemon`] and its locked state (`Inner`), the state file save;
//! * `validate`: checks of parameters against the limits and the state, no I/O (unit-tested);
//! * `registry`: the open stores and origins, opened exclusively; `paths`: checks that look
//!   at the filesystem (paths, roles of files, sockets, groups);
//! * `live`: the exports being served (vhost-user-blk or NBD);
//! * `handover`: a store moving to or from another daemon (live migration);
//! * `convert`: engine and state → RPC result types;
//! * `methods/{origin,export,snapshot,status,backup}`: the handlers;
//! * `lifecycle`: open and restore, shutdown, closing unused stores, [`serve`] and signals;
//! * this file: the dispatch table, built from the method types of `snapmv_rpc::method`.

mod convert;
mod core;
mod error;
mod handover;
mod lifecycle;
mod live;
mod methods;
mod ownership;
mod paths;
pub mod prometheus;
mod registry;
pub mod space;
#[cfg(test)]
mod tests;
mod validate;

use log::warn;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use snapmv_rpc::method::{self, Method};
use snapmv_rpc::{codes, ErrorObject};

use crate::rpc_server::Handler;

pub use self::core::{Daemon, ServeConfig};
pub use error::{MResult, MethodError};
pub use lifecycle::{serve, ServeError};
pub use paths::resolve_group;
pub use validate::{default_origin_id, parse_socket_mode};

pub use snapmv_rpc::limits::{
    DEFAULT_NUM_QUEUES, DEFAULT_QUEUE_SIZE, MAX_NUM_QUEUES, MAX_QUEUE_SIZE, PAGE_SIZE,
};
// The RPC limit is the device's.
const _: () = assert!(MAX_NUM_QUEUES == crate::vhost_blk::config::MAX_QUEUES);
pub use snapmv_rpc::methods::{PROTOCOL_NBD, PROTOCOL_VHOST};

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
    method::Stats => stats,
    method::SnapshotMemo => snapshot_memo,
    method::ExportRename => export_rename,
    method::ExportRelease => export_release,
    method::ExportAcquire => export_acquire,
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
