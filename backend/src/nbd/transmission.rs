//! Transmission: requests served in order, simple and structured replies, block status for
//! `base:allocation` and `snapmv:changed:TAG`.

use std::io::{IoSlice, IoSliceMut, Read, Write};

use super::handshake::Conn;
use super::proto::*;
use super::{NbdError, NbdExport};
use crate::vhost_blk::request::RequestKind;
use crate::vhost_blk::DiskError;

/// The kind a request counts as in the export's statistics (block status and disconnects
/// are not counted, as GET_ID is not for vhost-user-blk).
fn counted_kind(cmd: u16) -> Option<RequestKind> {
    match cmd {
        CMD_READ => Some(RequestKind::Read),
        CMD_WRITE => Some(RequestKind::Write),
        CMD_FLUSH => Some(RequestKind::Flush),
        CMD_TRIM => Some(RequestKind::Discard),
        CMD_WRITE_ZEROES => Some(RequestKind::WriteZeroes),
        _ => None,
    }
}

impl<S: Read + Write> Conn<'_, S> {
    fn simple_reply(&mut self, cookie: u64, err: u32, data: &[u8]) -> std::io::Result<()> {
        let mut b = Vec::with_capacity(16);
        b.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
        b.extend_from_slice(&err.to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        self.s
            .write_all_vectored_compat(&[IoSlice::new(&b), IoSlice::new(data)])
    }

    fn chunk(
        &mut self,
        cookie: u64,
        flags: u16,
        kind: u16,
        payload: &[&[u8]],
    ) -> std::io::Result<()> {
        let len: usize = payload.iter().map(|p| p.len()).sum();
        let mut b = Vec::with_capacity(20);
        b.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&kind.to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        b.extend_from_slice(&(len as u32).to_be_bytes());
        let mut v = vec![IoSlice::new(&b)];
        v.extend(payload.iter().map(|p| IoSlice::new(p)));
        self.s.write_all_vectored_compat(&v)
    }

    fn reply_err(&mut self, cookie: u64, err: u32, msg: &str) -> std::io::Result<()> {
        if self.structured {
            let mut p = err.to_be_bytes().to_vec();
            let m = &msg.as_bytes()[..msg.len().min(4096)];
            p.extend_from_slice(&(m.len() as u16).to_be_bytes());
            p.extend_from_slice(m);
            self.chunk(cookie, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, &[&p])
        } else {
            self.simple_reply(cookie, err, &[])
        }
    }

    fn reply_ok(&mut self, cookie: u64) -> std::io::Result<()> {
        if self.structured {
            self.chunk(cookie, REPLY_FLAG_DONE, REPLY_TYPE_NONE, &[])
        } else {
            self.simple_reply(cookie, 0, &[])
        }
    }

    /// Serves requests until the client disconnects.
    pub(super) fn transmission(&mut self, e: &NbdExport) -> Result<(), NbdError> {
        let size = e.disk.size();
        let mut buf: Vec<u8> = Vec::new();
        loop {
            let mut h = [0u8; 28];
            match self.s.read_exact(&mut h) {
                Ok(()) => {}
                Err(err) if err.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(err) => return Err(err.into()),
            }
            let r = parse_request(&h).map_err(|m| NbdError::Protocol(m.to_string()))?;
            let counted = counted_kind(r.kind);
            let started = std::time::Instant::now();
            if let Err(errno) = check_request(&r, size, e.readonly) {
                // A refused request counts as an error, whatever its kind (as for vhost).
                e.metrics.requests_taken(0, 1);
                e.metrics.request_failed(0);
                if r.kind == CMD_WRITE {
                    // The payload follows: skip it if it is reasonable, else give up.
                    if r.length > MAX_REQUEST {
                        let _ = self.reply_err(r.cookie, errno, "request too large");
                        return Err(NbdError::Protocol(format!("write of {} bytes", r.length)));
                    }
                    buf.resize(r.length as usize, 0);
                    self.s.read_exact(&mut buf)?;
                }
                let msg = match errno {
                    EPERM => "the export is read-only",
                    EOVERFLOW => "request too large",
                    _ => "invalid request (range past the end, unaligned, or unknown command)",
                };
                self.reply_err(r.cookie, errno, msg)?;
                continue;
            }
            if counted.is_some() {
                e.metrics.requests_taken(0, 1);
            }
            // Whether the request succeeded (`None`: not counted).
            let ok: Option<bool> = match r.kind {
                CMD_DISC => return Ok(()),
                CMD_READ => {
                    buf.resize(r.length as usize, 0);
                    match e
                        .disk
                        .read_vectored(r.offset, &mut [IoSliceMut::new(&mut buf)])
                    {
                        Ok(()) if self.structured => {
                            let off = r.offset.to_be_bytes();
                            self.chunk(
                                r.cookie,
                                REPLY_FLAG_DONE,
                                REPLY_TYPE_OFFSET_DATA,
                                &[&off, &buf],
                            )?;
                            Some(true)
                        }
                        Ok(()) => {
                            let b = std::mem::take(&mut buf);
                            self.simple_reply(r.cookie, 0, &b)?;
                            buf = b;
                            Some(true)
                        }
                        Err(err) => {
                            log::warn!("NBD export {}: read: {err}", e.name);
                            self.reply_err(r.cookie, EIO, "read failed")?;
                            Some(false)
                        }
                    }
                }
                CMD_WRITE => {
                    buf.resize(r.length as usize, 0);
                    self.s.read_exact(&mut buf)?;
                    let mut res = e.disk.write_vectored(r.offset, &[IoSlice::new(&buf)]);
                    if res.is_ok() && r.flags & CMD_FLAG_FUA != 0 {
                        res = e.disk.flush();
                    }
                    Some(self.done(r.cookie, res)?)
                }
                CMD_FLUSH => {
                    let res = e.disk.flush();
                    Some(self.done(r.cookie, res)?)
                }
                CMD_TRIM | CMD_WRITE_ZEROES => {
                    let res = if r.kind == CMD_TRIM {
                        e.disk.discard(r.offset, r.length as u64)
                    } else {
                        e.disk.write_zeroes(r.offset, r.length as u64)
                    };
                    Some(self.done(r.cookie, res)?)
                }
                CMD_BLOCK_STATUS => {
                    self.block_status(e, &r, &mut buf)?;
                    None
                }
                _ => {
                    self.reply_err(r.cookie, EINVAL, "unknown command")?;
                    None
                }
            };
            match (counted, ok) {
                (Some(kind), Some(true)) => {
                    let bytes = if kind == RequestKind::Flush {
                        0
                    } else {
                        u64::from(r.length)
                    };
                    e.metrics
                        .request_done(0, Some(kind), bytes, started.elapsed());
                }
                (Some(_), _) => e.metrics.request_failed(0),
                (None, _) => {}
            }
        }
    }

    /// Replies to a request that has no data to return; returns whether it succeeded.
    fn done(&mut self, cookie: u64, res: Result<(), DiskError>) -> std::io::Result<bool> {
        match res {
            Ok(()) => self.reply_ok(cookie).map(|()| true),
            Err(e) => {
                let errno = match e {
                    DiskError::NoSpace { .. } => ENOSPC,
                    DiskError::Failed { .. } => EIO,
                };
                self.reply_err(cookie, errno, &e.to_string())
                    .map(|()| false)
            }
        }
    }

    fn block_status(
        &mut self,
        e: &NbdExport,
        r: &Request,
        buf: &mut Vec<u8>,
    ) -> std::io::Result<()> {
        if !self.structured || self.contexts.is_empty() {
            return self.reply_err(r.cookie, EINVAL, "no meta context negotiated");
        }
        let one = r.flags & CMD_FLAG_REQ_ONE != 0;
        let contexts = self.contexts.clone();
        let n = contexts.len();
        for (i, (id, tag)) in contexts.into_iter().enumerate() {
            let ext = if tag.is_some() {
                changed_extents(&self.changed, r.offset, r.length as u64, one)
            } else {
                match allocation(e, r.offset, r.length as u64, one, buf) {
                    Ok(x) => x,
                    Err(m) => {
                        log::warn!("NBD export {}: block status: {m}", e.name);
                        return self.reply_err(r.cookie, EIO, "reading the volume failed");
                    }
                }
            };
            let mut p = id.to_be_bytes().to_vec();
            for (len, flags) in ext {
                p.extend_from_slice(&len.to_be_bytes());
                p.extend_from_slice(&flags.to_be_bytes());
            }
            let flags = if i + 1 == n { REPLY_FLAG_DONE } else { 0 };
            self.chunk(r.cookie, flags, REPLY_TYPE_BLOCK_STATUS, &[&p])?;
        }
        Ok(())
    }
}

/// `(length, flags)` descriptors for `snapmv:changed`: flag 1 where a chunk may have changed.
pub(super) fn changed_extents(
    changed: &[(u64, u64)],
    off: u64,
    len: u64,
    one: bool,
) -> Vec<(u32, u32)> {
    let end = off + len;
    let mut out: Vec<(u32, u32)> = Vec::new();
    let mut at = off;
    let push = |out: &mut Vec<(u32, u32)>, l: u64, f: u32| {
        let l = l.min(u32::MAX as u64 & !511) as u32;
        match out.last_mut() {
            Some(x) if x.1 == f => x.0 = x.0.saturating_add(l),
            _ => out.push((l, f)),
        }
    };
    let first = changed.partition_point(|(o, l)| o + l <= off);
    for &(o, l) in &changed[first..] {
        if at >= end || out.len() >= MAX_EXTENTS || (one && !out.is_empty()) {
            break;
        }
        if o >= end {
            break;
        }
        if o > at {
            push(&mut out, o - at, 0);
            at = o;
            if one {
                break;
            }
        }
        let e = (o + l).min(end);
        if e > at {
            push(&mut out, e - at, 1);
            at = e;
        }
    }
    if at < end && (!one || out.is_empty()) && out.len() < MAX_EXTENTS {
        push(&mut out, end - at, 0);
    }
    out
}

/// `(length, flags)` descriptors for `base:allocation`, one chunk at a time: a chunk that
/// reads as zeroes is reported as a hole that reads as zeroes, others as data. Covers at most
/// 64 MiB per request (a client asks again for the rest).
pub(super) fn allocation(
    e: &NbdExport,
    off: u64,
    len: u64,
    one: bool,
    buf: &mut Vec<u8>,
) -> Result<Vec<(u32, u32)>, String> {
    let cs = e.chunk_size.max(512) as u64;
    let end = (off + len).min(off + (64 << 20));
    let mut out: Vec<(u32, u32)> = Vec::new();
    let mut at = off;
    while at < end {
        let next = ((at / cs) + 1) * cs;
        let n = (next.min(end) - at) as usize;
        // Reads are 512-byte aligned: widen to the aligned span, judge it whole.
        let a0 = at & !511;
        let a1 = (at + n as u64).div_ceil(512) * 512;
        let a1 = a1.min(e.disk.size());
        buf.resize((a1 - a0) as usize, 0);
        e.disk
            .read_vectored(a0, &mut [IoSliceMut::new(buf)])
            .map_err(|x| x.to_string())?;
        let zero = buf.iter().all(|b| *b == 0);
        let f = if zero { STATE_HOLE | STATE_ZERO } else { 0 };
        match out.last_mut() {
            Some(x) if x.1 == f => x.0 += n as u32,
            _ => {
                if one && !out.is_empty() {
                    break;
                }
                out.push((n as u32, f));
            }
        }
        at += n as u64;
    }
    Ok(out)
}
