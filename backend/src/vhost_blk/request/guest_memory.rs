//! Access to the guest's buffers: host addresses for data (zero copy), copies for the small
//! control structures (header, DISCARD segments, GET_ID answer).

use vm_memory::{Address, Bytes, GuestMemoryBackend, GuestMemoryMmap};

use vm_memory::GuestAddress;

use super::error::RequestError;

/// Guest memory as the device sees it.
pub type GuestMem = GuestMemoryMmap<()>;

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
