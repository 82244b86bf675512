//! Reading a descriptor chain: its device-readable and device-writable buffers, and whether
//! its shape is valid. Nothing here reads the request itself except the type, for scheduling.

use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, GuestAddress};

use super::error::RequestError;
use super::guest_memory::Seg;
pub use crate::vhost_blk::config::MAX_CHAIN_DESCS;

/// The descriptors of one chain, sorted into the device-readable and device-writable parts.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ChainLayout {
    /// Device-readable buffers, in order.
    pub readable: Vec<Seg>,
    /// Device-writable buffers, in order.
    pub writable: Vec<Seg>,
}

impl ChainLayout {
    /// Walks the descriptors and checks the chain's shape. The crate's iterator stops silently
    /// on a bad link: a chain is complete only if its last descriptor has no NEXT flag.
    ///
    /// On a malformed chain the error comes with what was seen so far, so that the caller can
    /// still report IOERR in the last writable byte the guest offered.
    pub fn collect(
        descs: impl Iterator<Item = Descriptor>,
    ) -> Result<ChainLayout, (ChainLayout, RequestError)> {
        let mut layout = ChainLayout::default();
        let mut count = 0usize;
        let mut last_has_next = false;
        for d in descs {
            count += 1;
            if count > MAX_CHAIN_DESCS {
                return Err((layout, RequestError::TooLong));
            }
            last_has_next = d.has_next();
            let seg = Seg {
                addr: d.addr(),
                len: u64::from(d.len()),
            };
            if d.is_write_only() {
                layout.writable.push(seg);
            } else {
                if !layout.writable.is_empty() {
                    return Err((layout, RequestError::Order));
                }
                layout.readable.push(seg);
            }
        }
        if count == 0 {
            return Err((layout, RequestError::Empty));
        }
        if last_has_next {
            return Err((layout, RequestError::Truncated(count)));
        }
        Ok(layout)
    }

    /// Address of the status byte: the last byte of the device-writable part.
    pub fn status_addr(&self) -> Option<GuestAddress> {
        let last = self.writable.iter().rev().find(|s| s.len > 0)?;
        last.addr.checked_add(last.len - 1)
    }

    pub(super) fn readable_len(&self) -> u64 {
        self.readable.iter().map(|s| s.len).sum()
    }

    pub(super) fn writable_len(&self) -> u64 {
        self.writable.iter().map(|s| s.len).sum()
    }
}

/// A chain whose descriptors have been read (owned, so it can move to another thread).
#[derive(Debug)]
pub struct ParsedChain {
    /// What the descriptors looked like.
    pub layout: ChainLayout,
    /// Why the chain is malformed, if it is.
    pub fault: Option<RequestError>,
}

impl ParsedChain {
    /// Reads the descriptors of one chain.
    pub fn parse(descs: impl Iterator<Item = Descriptor>) -> ParsedChain {
        match ChainLayout::collect(descs) {
            Ok(layout) => ParsedChain {
                layout,
                fault: None,
            },
            Err((layout, e)) => ParsedChain {
                layout,
                fault: Some(e),
            },
        }
    }
}
