//! Scatter/gather helpers: the piece of an I/O vector that falls in one chunk, and copying a
//! gather list into a buffer.

use std::io::{IoSlice, IoSliceMut};

/// Buffers `[start, start+len)` of a scatter list, as a scatter list.
pub(crate) fn piece_mut<'b>(
    bufs: &'b mut [IoSliceMut<'_>],
    mut start: usize,
    len: usize,
) -> Vec<IoSliceMut<'b>> {
    let mut out = Vec::new();
    let mut remaining = len;
    for b in bufs.iter_mut() {
        if remaining == 0 {
            break;
        }
        let bl = b.len();
        if start >= bl {
            start -= bl;
            continue;
        }
        let take = (bl - start).min(remaining);
        out.push(IoSliceMut::new(&mut b[start..start + take]));
        start = 0;
        remaining -= take;
    }
    out
}

/// Buffers `[start, start+len)` of a gather list, as a gather list.
pub(crate) fn piece<'b>(bufs: &'b [IoSlice<'_>], mut start: usize, len: usize) -> Vec<IoSlice<'b>> {
    let mut out = Vec::new();
    let mut remaining = len;
    for b in bufs {
        if remaining == 0 {
            break;
        }
        let bl = b.len();
        if start >= bl {
            start -= bl;
            continue;
        }
        let take = (bl - start).min(remaining);
        out.push(IoSlice::new(&b[start..start + take]));
        start = 0;
        remaining -= take;
    }
    out
}

/// Copies a gather list into `dst` (as many bytes as `dst` holds).
pub(crate) fn gather(bufs: &[IoSlice<'_>], dst: &mut [u8]) {
    let mut at = 0;
    for b in bufs {
        let n = b.len().min(dst.len() - at);
        dst[at..at + n].copy_from_slice(&b[..n]);
        at += n;
        if at == dst.len() {
            break;
        }
    }
}
