//! A small NBD server (docs/nbd.md): fixed newstyle handshake, `NBD_OPT_GO`/`INFO`/
//! `EXPORT_NAME`/`LIST`/`ABORT`, structured replies, the `base:allocation` meta context, and
//! `snapmv:changed:TAG` (the chunks that may differ from snapshot TAG, as QEMU offers
//! `qemu:dirty-bitmap:NAME`). Protocol: NetworkBlockDevice/nbd `doc/proto.md`.
//!
//! One thread per connection, requests served in order. Anything a client sends is checked;
//! a malformed request gets an error reply, or the connection is closed when the stream can no
//! longer be trusted (bad magic, oversize write payload). The daemon never panics on input.

use std::io::{IoSlice, IoSliceMut, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;

use crate::vhost_blk::{BlockDisk, DiskError};

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const REP_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;
const FLAG_C_FIXED_NEWSTYLE: u32 = 1;
const FLAG_C_NO_ZEROES: u32 = 2;

const OPT_EXPORT_NAME: u32 = 1;
const OPT_ABORT: u32 = 2;
const OPT_LIST: u32 = 3;
const OPT_INFO: u32 = 6;
const OPT_GO: u32 = 7;
const OPT_STRUCTURED_REPLY: u32 = 8;
const OPT_LIST_META_CONTEXT: u32 = 9;
const OPT_SET_META_CONTEXT: u32 = 10;

const REP_ACK: u32 = 1;
const REP_SERVER: u32 = 2;
const REP_INFO: u32 = 3;
const REP_META_CONTEXT: u32 = 4;
const REP_ERR_UNSUP: u32 = 0x8000_0001;
const REP_ERR_INVALID: u32 = 0x8000_0003;
const REP_ERR_UNKNOWN: u32 = 0x8000_0006;
const REP_ERR_TOO_BIG: u32 = 0x8000_0009;

const INFO_EXPORT: u16 = 0;
const INFO_BLOCK_SIZE: u16 = 3;

const TFLAG_HAS_FLAGS: u16 = 1;
const TFLAG_READ_ONLY: u16 = 2;
const TFLAG_SEND_FLUSH: u16 = 4;
const TFLAG_SEND_FUA: u16 = 8;
const TFLAG_SEND_TRIM: u16 = 32;
const TFLAG_SEND_WRITE_ZEROES: u16 = 64;
const TFLAG_SEND_DF: u16 = 128;
const TFLAG_CAN_MULTI_CONN: u16 = 256;

/// Request types.
pub const CMD_READ: u16 = 0;
/// Write.
pub const CMD_WRITE: u16 = 1;
/// Disconnect.
pub const CMD_DISC: u16 = 2;
/// Flush.
pub const CMD_FLUSH: u16 = 3;
/// Trim.
pub const CMD_TRIM: u16 = 4;
/// Write zeroes.
pub const CMD_WRITE_ZEROES: u16 = 6;
/// Block status.
pub const CMD_BLOCK_STATUS: u16 = 7;

const CMD_FLAG_FUA: u16 = 1;
const CMD_FLAG_NO_HOLE: u16 = 2;
const CMD_FLAG_DF: u16 = 4;
const CMD_FLAG_REQ_ONE: u16 = 8;

const REPLY_FLAG_DONE: u16 = 1;
const REPLY_TYPE_NONE: u16 = 0;
const REPLY_TYPE_OFFSET_DATA: u16 = 1;
const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
const REPLY_TYPE_ERROR: u16 = 0x8001;

const EPERM: u32 = 1;
const EIO: u32 = 5;
const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;
const EOVERFLOW: u32 = 75;

const STATE_HOLE: u32 = 1;
const STATE_ZERO: u32 = 2;

/// Largest read or write a client may ask for (advertised as the maximum block size).
pub const MAX_REQUEST: u32 = 32 << 20;
/// Largest option payload accepted during the handshake.
const MAX_OPTION: u32 = 64 << 10;
/// Extents of one block-status reply at most.
const MAX_EXTENTS: usize = 4096;

/// Context ids.
const CTX_ALLOCATION: u32 = 1;
const CTX_CHANGED: u32 = 2;

/// The changed extents since a snapshot tag (for `snapmv:changed:TAG`).
pub type ChangedFn = dyn Fn(u32) -> Result<Vec<(u64, u64)>, String> + Send + Sync;

/// What one NBD export serves.
pub struct NbdExport {
    /// Export name (what clients ask for).
    pub name: String,
    /// The volume.
    pub disk: Arc<dyn BlockDisk>,
    /// Refuse writes.
    pub readonly: bool,
    /// Granularity of allocation reports (the store's chunk size).
    pub chunk_size: u32,
    /// Answers `snapmv:changed:TAG`; `None`: no such context.
    pub changed: Option<Arc<ChangedFn>>,
}

/// A request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Command flags.
    pub flags: u16,
    /// Type.
    pub kind: u16,
    /// The client's cookie.
    pub cookie: u64,
    /// Offset.
    pub offset: u64,
    /// Length.
    pub length: u32,
}

/// A request header that cannot be trusted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad NBD request magic {0:#010x}")]
pub struct BadMagic(pub u32);

/// Parses the 28-byte request header.
pub fn parse_request(h: &[u8; 28]) -> Result<Request, BadMagic> {
    let magic = u32::from_be_bytes([h[0], h[1], h[2], h[3]]);
    if magic != REQUEST_MAGIC {
        return Err(BadMagic(magic));
    }
    let mut c = [0u8; 8];
    c.copy_from_slice(&h[8..16]);
    let mut o = [0u8; 8];
    o.copy_from_slice(&h[16..24]);
    Ok(Request {
        flags: u16::from_be_bytes([h[4], h[5]]),
        kind: u16::from_be_bytes([h[6], h[7]]),
        cookie: u64::from_be_bytes(c),
        offset: u64::from_be_bytes(o),
        length: u32::from_be_bytes([h[24], h[25], h[26], h[27]]),
    })
}

/// What a request may do, before it touches the disk: `Err(errno)` for a clean error reply.
pub fn check_request(r: &Request, size: u64, readonly: bool) -> Result<(), u32> {
    let known = CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_DF | CMD_FLAG_REQ_ONE;
    if r.flags & !known != 0 {
        return Err(EINVAL);
    }
    let in_range = r
        .offset
        .checked_add(r.length as u64)
        .is_some_and(|e| e <= size);
    match r.kind {
        CMD_READ | CMD_WRITE => {
            if r.length > MAX_REQUEST {
                return Err(EOVERFLOW);
            }
            if !in_range || r.offset % 512 != 0 || r.length % 512 != 0 {
                return Err(EINVAL);
            }
            if r.kind == CMD_WRITE && readonly {
                return Err(EPERM);
            }
        }
        CMD_TRIM | CMD_WRITE_ZEROES => {
            if !in_range || r.offset % 512 != 0 || r.length % 512 != 0 {
                return Err(EINVAL);
            }
            if readonly {
                return Err(EPERM);
            }
        }
        CMD_BLOCK_STATUS => {
            if !in_range || r.length == 0 {
                return Err(EINVAL);
            }
        }
        CMD_FLUSH | CMD_DISC => {}
        _ => return Err(EINVAL),
    }
    Ok(())
}

/// Why a connection ended abnormally.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    /// The socket failed (includes the client going away).
    #[error("NBD connection: {0}")]
    Io(#[from] std::io::Error),
    /// The client broke the protocol so that the stream cannot be followed any more.
    #[error("NBD client broke the protocol: {0}")]
    Protocol(String),
}

struct Conn<'a, S: Read + Write> {
    s: S,
    exports: &'a dyn Fn(&str) -> Option<Arc<NbdExport>>,
    structured: bool,
    no_zeroes: bool,
    /// Meta contexts selected: (id, changed-since tag).
    contexts: Vec<(u32, Option<u32>)>,
    /// The export and, for `snapmv:changed`, its extents, fixed when the client chose.
    changed: Vec<(u64, u64)>,
}

fn be32(b: &[u8], at: usize) -> Option<u32> {
    b.get(at..at + 4)
        .map(|x| u32::from_be_bytes([x[0], x[1], x[2], x[3]]))
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    b.get(at..at + 2).map(|x| u16::from_be_bytes([x[0], x[1]]))
}

/// Parses the name and the info requests of `NBD_OPT_INFO`/`GO`.
fn parse_go(d: &[u8]) -> Option<(String, Vec<u16>)> {
    let n = be32(d, 0)? as usize;
    let name = d.get(4..4usize.checked_add(n)?)?;
    let at = 4 + n;
    let k = be16(d, at)? as usize;
    if d.len() != at + 2 + 2 * k {
        return None;
    }
    let infos = (0..k).filter_map(|i| be16(d, at + 2 + 2 * i)).collect();
    Some((String::from_utf8_lossy(name).into_owned(), infos))
}

/// Parses `NBD_OPT_LIST/SET_META_CONTEXT`: export name and queries.
fn parse_meta(d: &[u8]) -> Option<(String, Vec<String>)> {
    let n = be32(d, 0)? as usize;
    let name = d.get(4..4usize.checked_add(n)?)?;
    let mut at = 4 + n;
    let k = be32(d, at)? as usize;
    at += 4;
    let mut qs = Vec::new();
    for _ in 0..k {
        let l = be32(d, at)? as usize;
        let q = d.get(at + 4..(at + 4).checked_add(l)?)?;
        qs.push(String::from_utf8_lossy(q).into_owned());
        at += 4 + l;
    }
    if at != d.len() {
        return None;
    }
    Some((String::from_utf8_lossy(name).into_owned(), qs))
}

/// The context a query names: `(id, name, changed-since)`. A namespace query (`base:`,
/// `snapmv:`) lists what it holds.
fn match_contexts(q: &str, e: &NbdExport) -> Vec<(u32, String, Option<u32>)> {
    let mut out = Vec::new();
    if q == "base:" || q == "base:allocation" {
        out.push((CTX_ALLOCATION, "base:allocation".into(), None));
    }
    if let Some(t) = q.strip_prefix("snapmv:changed:") {
        if let (Ok(tag), Some(_)) = (t.parse::<u32>(), e.changed.as_ref()) {
            out.push((CTX_CHANGED, format!("snapmv:changed:{tag}"), Some(tag)));
        }
    }
    out
}

impl<S: Read + Write> Conn<'_, S> {
    fn opt_reply(&mut self, opt: u32, kind: u32, data: &[u8]) -> std::io::Result<()> {
        let mut b = Vec::with_capacity(20 + data.len());
        b.extend_from_slice(&REP_MAGIC.to_be_bytes());
        b.extend_from_slice(&opt.to_be_bytes());
        b.extend_from_slice(&kind.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.s.write_all(&b)
    }

    fn opt_err(&mut self, opt: u32, kind: u32, msg: &str) -> std::io::Result<()> {
        self.opt_reply(opt, kind, msg.as_bytes())
    }

    /// The handshake; returns the export chosen, or `None` if the client aborted.
    fn handshake(&mut self) -> Result<Option<Arc<NbdExport>>, NbdError> {
        let mut b = Vec::new();
        b.extend_from_slice(&NBDMAGIC.to_be_bytes());
        b.extend_from_slice(&IHAVEOPT.to_be_bytes());
        b.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
        self.s.write_all(&b)?;
        let mut cf = [0u8; 4];
        self.s.read_exact(&mut cf)?;
        let cflags = u32::from_be_bytes(cf);
        if cflags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
            return Err(NbdError::Protocol(format!(
                "unknown client flags {cflags:#x}"
            )));
        }
        self.no_zeroes = cflags & FLAG_C_NO_ZEROES != 0;
        loop {
            let mut h = [0u8; 16];
            self.s.read_exact(&mut h)?;
            let magic = u64::from_be_bytes(h[0..8].try_into().unwrap_or([0; 8]));
            if magic != IHAVEOPT {
                return Err(NbdError::Protocol(format!("bad option magic {magic:#x}")));
            }
            let opt = u32::from_be_bytes([h[8], h[9], h[10], h[11]]);
            let len = u32::from_be_bytes([h[12], h[13], h[14], h[15]]);
            if len > MAX_OPTION {
                // Skip the payload to stay in step, up to a bound; then refuse.
                let _ = self.opt_err(opt, REP_ERR_TOO_BIG, "option too long");
                return Err(NbdError::Protocol(format!("option of {len} bytes")));
            }
            let mut d = vec![0u8; len as usize];
            self.s.read_exact(&mut d)?;
            match opt {
                OPT_EXPORT_NAME => {
                    let name = String::from_utf8_lossy(&d).into_owned();
                    let Some(e) = (self.exports)(&name) else {
                        // No error reply exists for this option: close.
                        return Err(NbdError::Protocol(format!("unknown export {name:?}")));
                    };
                    let mut b = Vec::new();
                    b.extend_from_slice(&e.disk.size().to_be_bytes());
                    b.extend_from_slice(&tflags(&e).to_be_bytes());
                    if !self.no_zeroes {
                        b.extend_from_slice(&[0u8; 124]);
                    }
                    self.s.write_all(&b)?;
                    return Ok(Some(e));
                }
                OPT_ABORT => {
                    let _ = self.opt_reply(opt, REP_ACK, &[]);
                    return Ok(None);
                }
                OPT_LIST => {
                    if !d.is_empty() {
                        self.opt_err(opt, REP_ERR_INVALID, "LIST takes no data")?;
                        continue;
                    }
                    if let Some(e) = (self.exports)("") {
                        let mut b = (e.name.len() as u32).to_be_bytes().to_vec();
                        b.extend_from_slice(e.name.as_bytes());
                        self.opt_reply(opt, REP_SERVER, &b)?;
                    }
                    self.opt_reply(opt, REP_ACK, &[])?;
                }
                OPT_STRUCTURED_REPLY => {
                    if !d.is_empty() {
                        self.opt_err(opt, REP_ERR_INVALID, "STRUCTURED_REPLY takes no data")?;
                        continue;
                    }
                    self.structured = true;
                    self.opt_reply(opt, REP_ACK, &[])?;
                }
                OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                    if !self.structured {
                        self.opt_err(opt, REP_ERR_INVALID, "negotiate structured replies first")?;
                        continue;
                    }
                    let Some((name, qs)) = parse_meta(&d) else {
                        self.opt_err(opt, REP_ERR_INVALID, "malformed meta context request")?;
                        continue;
                    };
                    let Some(e) = (self.exports)(&name) else {
                        self.opt_err(opt, REP_ERR_UNKNOWN, "no such export")?;
                        continue;
                    };
                    let mut found: Vec<(u32, String, Option<u32>)> = Vec::new();
                    let qs = if qs.is_empty() && opt == OPT_LIST_META_CONTEXT {
                        vec!["base:allocation".to_string()]
                    } else {
                        qs
                    };
                    for q in &qs {
                        for m in match_contexts(q, &e) {
                            if !found.iter().any(|f| f.0 == m.0) {
                                found.push(m);
                            }
                        }
                    }
                    if opt == OPT_SET_META_CONTEXT {
                        self.contexts.clear();
                        self.changed.clear();
                    }
                    for (id, cname, tag) in found {
                        if opt == OPT_SET_META_CONTEXT {
                            if let (Some(t), Some(f)) = (tag, e.changed.as_ref()) {
                                match f(t) {
                                    Ok(x) => self.changed = x,
                                    Err(_) => continue,
                                }
                            }
                            self.contexts.push((id, tag));
                        }
                        let mut b = id.to_be_bytes().to_vec();
                        b.extend_from_slice(cname.as_bytes());
                        self.opt_reply(opt, REP_META_CONTEXT, &b)?;
                    }
                    self.opt_reply(opt, REP_ACK, &[])?;
                }
                OPT_INFO | OPT_GO => {
                    let Some((name, infos)) = parse_go(&d) else {
                        self.opt_err(opt, REP_ERR_INVALID, "malformed INFO/GO request")?;
                        continue;
                    };
                    let Some(e) = (self.exports)(&name) else {
                        self.opt_err(opt, REP_ERR_UNKNOWN, "no such export")?;
                        continue;
                    };
                    let mut b = INFO_EXPORT.to_be_bytes().to_vec();
                    b.extend_from_slice(&e.disk.size().to_be_bytes());
                    b.extend_from_slice(&tflags(&e).to_be_bytes());
                    self.opt_reply(opt, REP_INFO, &b)?;
                    let _ = infos;
                    // Always sent: 512-byte requests at least (the engine's unit).
                    let mut b = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                    b.extend_from_slice(&512u32.to_be_bytes());
                    b.extend_from_slice(&e.chunk_size.max(512).to_be_bytes());
                    b.extend_from_slice(&MAX_REQUEST.to_be_bytes());
                    self.opt_reply(opt, REP_INFO, &b)?;
                    self.opt_reply(opt, REP_ACK, &[])?;
                    if opt == OPT_GO {
                        return Ok(Some(e));
                    }
                }
                _ => {
                    self.opt_err(opt, REP_ERR_UNSUP, "option not supported")?;
                }
            }
        }
    }

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
    fn transmission(&mut self, e: &NbdExport) -> Result<(), NbdError> {
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
            if let Err(errno) = check_request(&r, size, e.readonly) {
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
            match r.kind {
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
                        }
                        Ok(()) => {
                            let b = std::mem::take(&mut buf);
                            self.simple_reply(r.cookie, 0, &b)?;
                            buf = b;
                        }
                        Err(err) => {
                            log::warn!("NBD export {}: read: {err}", e.name);
                            self.reply_err(r.cookie, EIO, "read failed")?;
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
                    self.done(r.cookie, res)?;
                }
                CMD_FLUSH => {
                    let res = e.disk.flush();
                    self.done(r.cookie, res)?;
                }
                CMD_TRIM | CMD_WRITE_ZEROES => {
                    let res = if r.kind == CMD_TRIM {
                        e.disk.discard(r.offset, r.length as u64)
                    } else {
                        e.disk.write_zeroes(r.offset, r.length as u64)
                    };
                    self.done(r.cookie, res)?;
                }
                CMD_BLOCK_STATUS => self.block_status(e, &r, &mut buf)?,
                _ => self.reply_err(r.cookie, EINVAL, "unknown command")?,
            }
        }
    }

    fn done(&mut self, cookie: u64, res: Result<(), DiskError>) -> std::io::Result<()> {
        match res {
            Ok(()) => self.reply_ok(cookie),
            Err(e) => {
                let errno = match e {
                    DiskError::NoSpace { .. } => ENOSPC,
                    DiskError::Failed { .. } => EIO,
                };
                self.reply_err(cookie, errno, &e.to_string())
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
fn changed_extents(changed: &[(u64, u64)], off: u64, len: u64, one: bool) -> Vec<(u32, u32)> {
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
fn allocation(
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

fn tflags(e: &NbdExport) -> u16 {
    let mut f = TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_DF | TFLAG_CAN_MULTI_CONN;
    if e.readonly {
        f |= TFLAG_READ_ONLY;
    } else {
        f |= TFLAG_SEND_FUA | TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES;
    }
    f
}

trait WriteAllVectored {
    fn write_all_vectored_compat(&mut self, bufs: &[IoSlice<'_>]) -> std::io::Result<()>;
}

impl<W: Write> WriteAllVectored for W {
    fn write_all_vectored_compat(&mut self, bufs: &[IoSlice<'_>]) -> std::io::Result<()> {
        for b in bufs {
            self.write_all(b)?;
        }
        Ok(())
    }
}

/// Runs one connection to completion over any byte stream (tests and fuzzing use memory).
pub fn serve_connection<S: Read + Write>(
    s: S,
    exports: &dyn Fn(&str) -> Option<Arc<NbdExport>>,
) -> Result<(), NbdError> {
    let mut c = Conn {
        s,
        exports,
        structured: false,
        no_zeroes: false,
        contexts: Vec::new(),
        changed: Vec::new(),
    };
    let Some(e) = c.handshake()? else {
        return Ok(());
    };
    c.transmission(&e)
}

/// A volume whose single-buffer reads (every NBD read) go through
/// [`snapmv_engine::Volume::read_bulk`]: a snapshot's runs of chunks on the origin device are
/// read at once. Everything else is the volume's own [`BlockDisk`].
pub struct BulkVolume(pub snapmv_engine::Volume);

impl BlockDisk for BulkVolume {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn read_vectored(&self, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> Result<(), DiskError> {
        if let [b] = bufs {
            return self.0.read_bulk(offset, b).map_err(|e| DiskError::Failed {
                disk: self.0.name(),
                source: Box::new(e),
            });
        }
        BlockDisk::read_vectored(&self.0, offset, bufs)
    }
    fn write_vectored(&self, offset: u64, bufs: &[IoSlice<'_>]) -> Result<(), DiskError> {
        BlockDisk::write_vectored(&self.0, offset, bufs)
    }
    fn flush(&self) -> Result<(), DiskError> {
        BlockDisk::flush(&self.0)
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        BlockDisk::discard(&self.0, offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        BlockDisk::write_zeroes(&self.0, offset, len)
    }
    fn name(&self) -> String {
        BlockDisk::name(&self.0)
    }
    fn physical_block_size(&self) -> u32 {
        BlockDisk::physical_block_size(&self.0)
    }
}

/// One NBD export listening on a Unix socket.
pub struct NbdServer {
    name: String,
    volume: String,
    readonly: bool,
    path: PathBuf,
    stop: Arc<AtomicBool>,
    clients: Arc<AtomicUsize>,
    /// The live connections (clones), shut down when the export stops.
    conns: Arc<std::sync::Mutex<Vec<(u64, UnixStream)>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl NbdServer {
    /// Listens on `path` (an existing socket file is replaced; the socket gets `mode` and
    /// `group`) and serves `export`; `volume` describes it for listings.
    pub fn start(
        path: &Path,
        export: NbdExport,
        volume: String,
        mode: u32,
        group: Option<u32>,
    ) -> std::io::Result<NbdServer> {
        if let Ok(md) = std::fs::symlink_metadata(path) {
            use std::os::unix::fs::FileTypeExt;
            if md.file_type().is_socket() {
                let _ = std::fs::remove_file(path);
            }
        }
        let l = UnixListener::bind(path)?;
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode & 0o777))?;
            if let Some(g) = group {
                std::os::unix::fs::chown(path, None, Some(g))?;
            }
        }
        let (name, readonly) = (export.name.clone(), export.readonly);
        let stop = Arc::new(AtomicBool::new(false));
        let clients = Arc::new(AtomicUsize::new(0));
        let export = Arc::new(export);
        let conns: Arc<std::sync::Mutex<Vec<(u64, UnixStream)>>> = Arc::default();
        let (st, cl, cn) = (stop.clone(), clients.clone(), conns.clone());
        let thread = std::thread::Builder::new()
            .name(format!("nbd-{}", export.name))
            .spawn(move || {
                let mut next_id = 0u64;
                for conn in l.incoming() {
                    if st.load(SeqCst) {
                        break;
                    }
                    let Ok(s) = conn else { continue };
                    let e = export.clone();
                    let cl = cl.clone();
                    let id = next_id;
                    next_id += 1;
                    if let Ok(c) = s.try_clone() {
                        cn.lock().unwrap_or_else(|p| p.into_inner()).push((id, c));
                    }
                    let cn2 = cn.clone();
                    let cl_failed = cl.clone();
                    cl.fetch_add(1, SeqCst);
                    let spawned = std::thread::Builder::new()
                        .name(format!("nbd-{}-c", e.name))
                        .spawn(move || {
                            let name = e.name.clone();
                            let lookup =
                                move |n: &str| (n == e.name || n.is_empty()).then(|| e.clone());
                            if let Err(err) = serve_connection(&s, &lookup) {
                                log::info!("NBD export {name}: client: {err}");
                            }
                            let _ = s.shutdown(std::net::Shutdown::Both);
                            cn2.lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .retain(|(i, _)| *i != id);
                            cl.fetch_sub(1, SeqCst);
                        });
                    if spawned.is_err() {
                        // Could not serve it: the stream is dropped (closed).
                        log::warn!("NBD: cannot start a connection thread");
                        cn.lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .retain(|(i, _)| *i != id);
                        cl_failed.fetch_sub(1, SeqCst);
                    }
                }
            })?;
        Ok(NbdServer {
            name,
            volume,
            readonly,
            path: path.to_path_buf(),
            stop,
            clients,
            conns,
            thread: Some(thread),
        })
    }

    /// Connected clients.
    pub fn clients(&self) -> usize {
        self.clients.load(SeqCst)
    }

    /// As listed with the vhost-user exports.
    pub fn info(&self) -> crate::export::ExportInfo {
        crate::export::ExportInfo {
            name: self.name.clone(),
            socket: self.path.clone(),
            num_queues: 1,
            readonly: self.readonly,
            connected: self.clients() > 0,
            volume: self.volume.clone(),
        }
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        self.stop.store(true, SeqCst);
        // Wake the accept loop.
        let _ = UnixStream::connect(&self.path);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        // Connected clients lose the export (a removal with force): their threads see the
        // shut-down socket and end.
        for (_, c) in self.conns.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_and_check() {
        let mut h = [0u8; 28];
        h[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        h[6..8].copy_from_slice(&CMD_READ.to_be_bytes());
        h[16..24].copy_from_slice(&4096u64.to_be_bytes());
        h[24..28].copy_from_slice(&512u32.to_be_bytes());
        let r = parse_request(&h).unwrap();
        assert_eq!((r.kind, r.offset, r.length), (CMD_READ, 4096, 512));
        assert_eq!(check_request(&r, 8192, true), Ok(()));
        assert_eq!(check_request(&r, 4096, true), Err(EINVAL), "past the end");
        let w = Request {
            kind: CMD_WRITE,
            ..r
        };
        assert_eq!(check_request(&w, 8192, true), Err(EPERM));
        let big = Request {
            length: MAX_REQUEST + 512,
            offset: 0,
            ..r
        };
        assert_eq!(check_request(&big, u64::MAX, false), Err(EOVERFLOW));
        let wrap = Request {
            offset: u64::MAX - 100,
            ..r
        };
        assert_eq!(check_request(&wrap, u64::MAX, false), Err(EINVAL));
        h[0] ^= 1;
        assert!(parse_request(&h).is_err());
    }

    #[test]
    fn changed_descriptors() {
        let ch = [(4096, 4096), (16384, 8192)];
        assert_eq!(
            changed_extents(&ch, 0, 32768, false),
            vec![(4096, 0), (4096, 1), (8192, 0), (8192, 1), (8192, 0)]
        );
        assert_eq!(changed_extents(&ch, 0, 32768, true), vec![(4096, 0)]);
        assert_eq!(changed_extents(&ch, 5000, 100, false), vec![(100, 1)]);
        assert_eq!(changed_extents(&[], 0, 512, false), vec![(512, 0)]);
    }
}
