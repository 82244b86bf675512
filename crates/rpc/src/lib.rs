//! JSON-RPC 2.0 types shared by the snapmv daemon and the `snapmv` CLI.
//!
//! * [`protocol`]: requests, responses, error objects, error codes and the line parser the
//!   daemon uses on every request it reads;
//! * [`methods`]: the parameters and results of every management method (the public contract,
//!   documented in `docs/rpc.md`);
//! * [`method`]: one type per method ([`Method`]: name, parameters, result), used by the client
//!   and the daemon's dispatch table alike;
//! * [`limits`]: defaults and limits of the parameters (queues, queue size, chunk size);
//! * [`client`]: a small blocking client over the Unix socket.
//!
//! Requests and responses travel one JSON object per line (`\n`-terminated).

pub mod client;
pub mod limits;
pub mod method;
pub mod methods;
pub mod protocol;

pub use client::{RpcClient, RpcError};
pub use method::Method;
pub use protocol::{codes, ErrorObject, Request, Response, MAX_LINE_LEN};
