//! Completing a chain: parse and execute it with panics contained, write its status byte and
//! say what to put on the used ring (and what to count).

use virtio_bindings::virtio_blk::VIRTIO_BLK_S_OK;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes};

use super::chain::ParsedChain;
use super::error::RequestError;
use super::execute::{execute, RequestContext};
use super::guest_memory::GuestMem;
use super::parse::{Request, RequestKind};

/// The outcome of one chain: the status written (if any) and the used length to report.
#[derive(Debug)]
pub struct Completion {
    /// Bytes written into the device-writable part, status byte included.
    pub used_len: u32,
    /// The error, if the request failed.
    pub error: Option<RequestError>,
    /// What the request was, once its header could be parsed.
    pub kind: Option<RequestKind>,
    /// Bytes of the disk it covered (read, written, discarded or zeroed); 0 if it failed.
    pub bytes: u64,
}

/// Completes a read of `len` bytes whose data the device already placed in the chain's
/// buffers (asynchronous I/O): writes the OK status.
pub fn complete_read(mem: &GuestMem, chain: &ParsedChain, len: u64) -> Completion {
    let Some(status_addr) = chain.layout.status_addr() else {
        return Completion {
            used_len: 0,
            error: Some(RequestError::NoStatus),
            kind: Some(RequestKind::Read),
            bytes: 0,
        };
    };
    if let Err(e) = mem.write_obj(VIRTIO_BLK_S_OK as u8, status_addr) {
        return Completion {
            used_len: 0,
            error: Some(RequestError::BadAddress {
                addr: status_addr.raw_value(),
                len: 1,
                source: e,
            }),
            kind: Some(RequestKind::Read),
            bytes: 0,
        };
    }
    Completion {
        // `parse` checked that the length fits the used length.
        used_len: u32::try_from(len).unwrap_or(u32::MAX).saturating_add(1),
        error: None,
        kind: Some(RequestKind::Read),
        bytes: len,
    }
}

/// Parses and executes one chain. Never panics on guest input.
pub fn handle_chain(
    mem: &GuestMem,
    descs: impl Iterator<Item = Descriptor>,
    ctx: &RequestContext<'_>,
) -> Completion {
    handle_parsed(mem, ParsedChain::parse(descs), ctx)
}

/// Executes a parsed chain and writes its status. Never panics on guest input; a panic in the
/// disk below is caught and reported as IOERR, so that the queue keeps being served.
pub fn handle_parsed(mem: &GuestMem, chain: ParsedChain, ctx: &RequestContext<'_>) -> Completion {
    let ParsedChain { layout, fault } = chain;
    let Some(status_addr) = layout.status_addr() else {
        return Completion {
            used_len: 0,
            error: Some(fault.unwrap_or(RequestError::NoStatus)),
            kind: None,
            bytes: 0,
        };
    };
    let mut kind = None;
    let mut bytes = 0;
    let (result, data_written) = match fault {
        Some(e) => (Err(e), 0),
        None => {
            let run = std::panic::AssertUnwindSafe(|| {
                let req = Request::parse(mem, &layout, ctx.size, ctx.readonly)?;
                kind = Some(req.kind());
                let n = execute(mem, &layout, &req, ctx)?;
                bytes = req.disk_bytes();
                Ok(n)
            });
            match std::panic::catch_unwind(run) {
                Ok(Ok(n)) => (Ok(()), n),
                Ok(Err(e)) => (Err(e), 0),
                Err(panic) => {
                    let why = panic
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "unknown panic".into());
                    (Err(RequestError::Panicked(why)), 0)
                }
            }
        }
    };
    let status = match &result {
        Ok(()) => VIRTIO_BLK_S_OK as u8,
        Err(e) => e.status(),
    };
    if let Err(e) = mem.write_obj(status, status_addr) {
        return Completion {
            used_len: 0,
            error: Some(result.err().unwrap_or(RequestError::BadAddress {
                addr: status_addr.raw_value(),
                len: 1,
                source: e,
            })),
            kind,
            bytes: 0,
        };
    }
    let failed = result.is_err();
    Completion {
        used_len: data_written.saturating_add(1),
        error: result.err(),
        kind,
        bytes: if failed { 0 } else { bytes },
    }
}
