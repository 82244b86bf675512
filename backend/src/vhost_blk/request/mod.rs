//! One virtio-blk request, from descriptor chain to status byte.
//!
//! Nothing the guest writes into its rings can make this code panic: every address goes
//! through guest-memory lookups, every length through checked arithmetic, and any malformed
//! chain ends as an IOERR (or UNSUPP) status, or, when the chain has no writable status byte,
//! as a used entry of length 0.
//!
//! The steps, one module each, each depending only on those before it:
//! - [`guest_memory`]: segments of guest memory, their host addresses, small copies;
//! - [`error`]: why a request failed and the status it is reported with;
//! - [`chain`]: the shape of a descriptor chain (readable part, writable part, status byte);
//! - [`parse`]: the header and control data, checked, as a [`Request`];
//! - [`execute`]: a [`Request`] run against the [`BlockDisk`](super::BlockDisk);
//! - [`completion`]: the whole of it for one chain, panics contained, status written.

pub mod chain;
pub mod completion;
pub mod error;
pub mod execute;
pub mod guest_memory;
pub mod parse;

pub use chain::{ChainLayout, ParsedChain, MAX_CHAIN_DESCS};
pub use completion::{complete_read, handle_chain, handle_parsed, Completion};
pub use error::RequestError;
pub use execute::RequestContext;
pub use guest_memory::{host_ranges, mark_written, sub_segs, GuestMem, Seg};
pub use parse::{Request, RequestKind, HEADER_SIZE};

#[cfg(test)]
mod tests;
