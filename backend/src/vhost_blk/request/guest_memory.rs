//! Access to the guest's buffers: host addresses for data (zero copy), copies for the small
//! control structures (header, DISCARD segments, GET_ID answer).

use vhost_user_backend::bitmap::BitmapMmapRegion;
use vm_memory::bitmap::Bitmap;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::error::RequestError;

/// Guest memory as the device sees it. Each region carries a dirty-page bitmap that the
/// frontend's log (`SET_LOG_BASE`, during a live migration) backs; until then it records
/// nothing. Writes through `vm-memory` (used ring, status byte, copied answers) mark pages
/// themselves; data the disk reads straight into guest memory is marked by
/// [`mark_written`].
pub type GuestMem = GuestMemoryMmap<BitmapMmapRegion>;

/// A piece of guest memory named by a descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Seg {
    /// Guest physical address.
    pub addr: GuestAddress,
    /// Length in bytes.
    pub len: u64,
}

/// The `take` bytes that start `skip` bytes into `segs`.
pub fn sub_segs(segs: &[Seg], mut skip: u64, mut take: u64) -> Vec<Seg> {
    let mut out = Vec::new();
    for s in segs {
        if take == 0 {
            break;
        }
        if skip >= s.len {
            skip -= s.len;
            continue;
        }
        let n = (s.len - skip).min(take);
        // An address that overflows becomes one no memory region holds, so the access fails.
        let addr = s.addr.checked_add(skip).unwrap_or(GuestAddress(u64::MAX));
        out.push(Seg { addr, len: n });
        take -= n;
        skip = 0;
    }
    out
}

fn bad_address(seg: &Seg, source: vm_memory::GuestMemoryError) -> RequestError {
    RequestError::BadAddress {
        addr: seg.addr.raw_value(),
        len: seg.len,
        source,
    }
}

/// Host addresses of the buffers, one entry per piece inside one memory region (a buffer that
/// spans two regions is split, not refused).
pub fn host_ranges(mem: &GuestMem, segs: &[Seg]) -> Result<Vec<(*mut u8, usize)>, RequestError> {
    let mut out = Vec::with_capacity(segs.len());
    for seg in segs {
        let len = usize::try_from(seg.len)
            .map_err(|_| bad_address(seg, vm_memory::GuestMemoryError::GuestAddressOverflow))?;
        for slice in mem.get_slices(seg.addr, len) {
            let slice = slice.map_err(|e| bad_address(seg, e))?;
            out.push((slice.ptr_guard_mut().as_ptr(), slice.len()));
        }
    }
    Ok(out)
}

/// Marks the first `len` bytes of `segs` as written by the device, in the migration log: a
/// page the device filled (a read's data) must be sent again if it was already sent. Called
/// after the bytes are in guest memory, so a page copied after the mark has the new data.
pub fn mark_written(mem: &GuestMem, segs: &[Seg]) {
    for seg in segs {
        let Ok(len) = usize::try_from(seg.len) else {
            continue;
        };
        // The same slices `host_ranges` handed to the disk; one that fails was never written.
        for slice in mem.get_slices(seg.addr, len).flatten() {
            slice.bitmap().mark_dirty(0, slice.len());
        }
    }
}

/// Copies `segs` (small control data) out of guest memory.
pub(super) fn read_segs(mem: &GuestMem, segs: &[Seg], out: &mut [u8]) -> Result<(), RequestError> {
    let mut pos = 0usize;
    for seg in segs {
        let n = seg.len as usize;
        mem.read_slice(&mut out[pos..pos + n], seg.addr)
            .map_err(|e| bad_address(seg, e))?;
        pos += n;
    }
    Ok(())
}

/// Copies `data` into guest memory over `segs` (which must cover at least `data.len()`).
pub(super) fn write_segs(mem: &GuestMem, segs: &[Seg], data: &[u8]) -> Result<(), RequestError> {
    let mut pos = 0usize;
    for seg in segs {
        if pos >= data.len() {
            break;
        }
        let n = (seg.len as usize).min(data.len() - pos);
        mem.write_slice(&data[pos..pos + n], seg.addr)
            .map_err(|e| bad_address(seg, e))?;
        pos += n;
    }
    Ok(())
}
