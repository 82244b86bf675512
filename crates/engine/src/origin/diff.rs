//! Changed-block diff between two versions of one origin, computed from metadata only.
//!
//! Every version reads chunk `c` either from one store chunk (the exception its lookup ends
//! at) or from the origin device. Two versions read the same bytes when their lookups end at
//! the same place; they may differ otherwise. A chunk with no exception at all (and no overlay)
//! is read from the origin device by every version, so only the chunk map's non-empty slots
//! need a lookup: the cost is a scan of the map's slot pointers plus a lookup per chunk that
//! has exceptions.

use super::chunk_map::Mapping;
use super::{OriginCore, SnapRt};
use crate::error::Result;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::Arc;

/// One side of a diff, resolved once at the start.
pub(crate) enum Side {
    Origin,
    Snap(Arc<SnapRt>),
}

impl OriginCore {
    /// Where `side` reads chunk `c` (exceptions `list`).
    fn source_of(&self, side: &Side, leaf: u32, c: u64, list: Option<&super::ExList>) -> Mapping {
        match side {
            Side::Snap(_) => self.map_version(leaf, list),
            Side::Origin => self.map_origin(c, list),
        }
    }

    fn side(&self, tag: Option<u32>) -> Result<(Side, u32)> {
        match tag {
            None => Ok((Side::Origin, 0)),
            Some(t) => {
                let s = self.snapshot_handle(t)?;
                let leaf = s.leaf.load(SeqCst);
                Ok((Side::Snap(s), leaf))
            }
        }
    }

    /// The chunks whose content may differ between versions `from` and `to` (`None`: the
    /// origin as it is now), ascending. Never omits a chunk that may differ.
    pub fn diff_chunks(&self, from: Option<u32>, to: Option<u32>) -> Result<Vec<u64>> {
        self.check_alive()?;
        if from == to {
            // One version against itself (checked to exist).
            self.side(from)?;
            return Ok(Vec::new());
        }
        let (a, la) = self.side(from)?;
        let (b, lb) = self.side(to)?;
        let mut out = Vec::new();
        // Only chunks with exceptions can differ: elsewhere every version reads the origin
        // device (an overlay exists only where a copy-out made an exception).
        for (c, list) in self.map.lists() {
            let sa = self.source_of(&a, la, c, Some(&list));
            let sb = self.source_of(&b, lb, c, Some(&list));
            // An overlay is somewhere no other version reads: always "differs".
            if sa != sb || sa == Mapping::Overlay {
                out.push(c);
            }
        }
        // A snapshot deleted meanwhile: its view is gone, the answer would mean nothing.
        for s in [&a, &b] {
            if let Side::Snap(s) = s {
                if s.deleted.load(SeqCst) {
                    return Err(crate::error::Error::Deleted(format!(
                        "snapshot {} of origin {}",
                        s.tag, self.id
                    )));
                }
            }
        }
        Ok(out)
    }

    /// `diff_chunks` as sorted, merged byte ranges `(offset, length)`, clipped to the size.
    pub fn diff_extents(&self, from: Option<u32>, to: Option<u32>) -> Result<Vec<(u64, u64)>> {
        let chunks = self.diff_chunks(from, to)?;
        let mut out: Vec<(u64, u64)> = Vec::new();
        for c in chunks {
            let off = c * self.cs;
            let len = self.chunk_len(c);
            match out.last_mut() {
                Some((o, l)) if *o + *l == off => *l += len,
                _ => out.push((off, len)),
            }
        }
        Ok(out)
    }
}

impl OriginCore {
    /// Snapshot `snap`'s bytes `[off, off + buf.len())`, reading each run of chunks that the
    /// snapshot reads from the origin device with one read (a snapshot read otherwise costs one
    /// read per chunk). As in `read_view`, a chunk whose exceptions changed while its run was
    /// read (a copy-out raced the read) is read again on its own.
    pub(crate) fn snap_read_bulk(&self, snap: &SnapRt, off: u64, buf: &mut [u8]) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let leaf = snap.leaf.load(SeqCst);
        let end = off + buf.len() as u64;
        let first = off / self.cs;
        let last = (end - 1) / self.cs;
        let mut c = first;
        while c <= last {
            // A run of chunks all read from the origin device.
            let mut lists = Vec::new();
            let mut d = c;
            while d <= last {
                let l = self.map.list(d);
                if self.resolve(leaf, l.as_deref()).is_some() {
                    break;
                }
                lists.push(l);
                d += 1;
            }
            if d == c {
                // One chunk from the store.
                let s = (c * self.cs).max(off);
                let e = ((c + 1) * self.cs).min(end);
                let piece = &mut buf[(s - off) as usize..(e - off) as usize];
                self.read_view(
                    leaf,
                    c,
                    s - c * self.cs,
                    &mut [std::io::IoSliceMut::new(piece)],
                )?;
                c += 1;
                continue;
            }
            let s = (c * self.cs).max(off);
            let e = (d * self.cs).min(end);
            let piece = &mut buf[(s - off) as usize..(e - off) as usize];
            self.origin.read_at(piece, s).map_err(|err| {
                crate::error::Error::io(
                    format!("reading origin {} at {s}", self.origin.name()),
                    err,
                )
            })?;
            for (i, before) in lists.iter().enumerate() {
                let x = c + i as u64;
                let now = self.map.list(x);
                let same = match (before.as_ref(), now.as_ref()) {
                    (None, None) => true,
                    (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                    _ => false,
                };
                if !same {
                    let cs0 = (x * self.cs).max(off);
                    let ce = ((x + 1) * self.cs).min(end);
                    let p = &mut buf[(cs0 - off) as usize..(ce - off) as usize];
                    self.read_view(
                        leaf,
                        x,
                        cs0 - x * self.cs,
                        &mut [std::io::IoSliceMut::new(p)],
                    )?;
                }
            }
            c = d;
        }
        Ok(())
    }
}
