//! The handshake: fixed newstyle greeting, option haggling (`NBD_OPT_GO`/`INFO`/
//! `EXPORT_NAME`/`LIST`/`ABORT`, structured replies, meta contexts) until the client picks an
//! export.

use std::io::{Read, Write};
use std::sync::Arc;

use super::proto::*;
use super::{NbdError, NbdExport};

pub(super) struct Conn<'a, S: Read + Write> {
    pub(super) s: S,
    pub(super) exports: &'a dyn Fn(&str) -> Option<Arc<NbdExport>>,
    pub(super) structured: bool,
    pub(super) no_zeroes: bool,
    /// Meta contexts selected: (id, changed-since tag).
    pub(super) contexts: Vec<(u32, Option<u32>)>,
    /// The export and, for `snapmv:changed`, its extents, fixed when the client chose.
    pub(super) changed: Vec<(u64, u64)>,
}

/// The context a query names: `(id, name, changed-since)`. A namespace query (`base:`,
/// `snapmv:`) lists what it holds.
pub(super) fn match_contexts(q: &str, e: &NbdExport) -> Vec<(u32, String, Option<u32>)> {
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
    pub(super) fn handshake(&mut self) -> Result<Option<Arc<NbdExport>>, NbdError> {
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
}

pub(super) fn tflags(e: &NbdExport) -> u16 {
    let mut f = TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_DF | TFLAG_CAN_MULTI_CONN;
    if e.readonly {
        f |= TFLAG_READ_ONLY;
    } else {
        f |= TFLAG_SEND_FUA | TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES;
    }
    f
}
