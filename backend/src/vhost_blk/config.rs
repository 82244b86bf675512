//! The virtio-blk configuration space and feature bits offered by the device.

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX,
    VIRTIO_BLK_F_TOPOLOGY, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

/// Logical block size offered to the guest (bytes).
pub const SECTOR_SIZE: u64 = 512;
/// log2 of [`SECTOR_SIZE`].
pub const SECTOR_SHIFT: u32 = 9;
/// Size of `struct virtio_blk_config` in the virtio 1.2 spec (with the zoned fields).
pub const CONFIG_SPACE_SIZE: usize = 96;
/// Offset of the `writeback` byte in the configuration space.
pub const WRITEBACK_OFFSET: usize = 32;
/// Most data segments (descriptors other than header and status) in one request.
pub const SEG_MAX: u32 = 254;
/// Largest single data segment announced to the guest (bytes).
pub const SIZE_MAX: u32 = 1 << 20;
/// Largest DISCARD request (sectors): 2 GiB.
pub const MAX_DISCARD_SECTORS: u32 = 1 << 22;
/// Largest WRITE_ZEROES request (sectors): 2 GiB.
pub const MAX_WRITE_ZEROES_SECTORS: u32 = 1 << 22;
/// Most segments in one DISCARD or WRITE_ZEROES request.
pub const MAX_DISCARD_SEG: u32 = 32;
/// Most descriptors accepted in one chain (IOV_MAX, the limit of preadv/pwritev).
pub const MAX_CHAIN_DESCS: usize = 1024;
/// Largest number of queues an export may have (the worker mask is a `u64`).
pub const MAX_QUEUES: u16 = 64;

/// The virtio feature bits the device offers (vhost-user's PROTOCOL_FEATURES bit is added by
/// the backend).
pub fn device_features(readonly: bool) -> u64 {
    let mut f = (1u64 << VIRTIO_F_VERSION_1)
        | (1u64 << VIRTIO_RING_F_EVENT_IDX)
        | (1u64 << VIRTIO_RING_F_INDIRECT_DESC)
        | (1u64 << VIRTIO_BLK_F_SEG_MAX)
        | (1u64 << VIRTIO_BLK_F_SIZE_MAX)
        | (1u64 << VIRTIO_BLK_F_BLK_SIZE)
        | (1u64 << VIRTIO_BLK_F_TOPOLOGY)
        | (1u64 << VIRTIO_BLK_F_FLUSH)
        | (1u64 << VIRTIO_BLK_F_CONFIG_WCE)
        | (1u64 << VIRTIO_BLK_F_DISCARD)
        | (1u64 << VIRTIO_BLK_F_WRITE_ZEROES)
        | (1u64 << VIRTIO_BLK_F_MQ);
    if readonly {
        f |= 1u64 << VIRTIO_BLK_F_RO;
    }
    f
}

/// The values that make up the configuration space of one export.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlkConfig {
    /// Volume size in bytes (rounded down to whole sectors in the encoding).
    pub size_bytes: u64,
    /// Physical block size in bytes (power of two, at least 512).
    pub physical_block_size: u32,
    /// Number of request queues.
    pub num_queues: u16,
    /// Write-back cache enabled (`writeback` byte).
    pub writeback: bool,
}

impl BlkConfig {
    /// Encodes the full 96-byte configuration space, little endian as virtio 1.x requires.
    pub fn encode(&self) -> [u8; CONFIG_SPACE_SIZE] {
        let mut b = [0u8; CONFIG_SPACE_SIZE];
        let put32 = |b: &mut [u8; CONFIG_SPACE_SIZE], off: usize, v: u32| {
            b[off..off + 4].copy_from_slice(&v.to_le_bytes())
        };
        // capacity, in 512-byte sectors whatever blk_size says.
        b[0..8].copy_from_slice(&(self.size_bytes >> SECTOR_SHIFT).to_le_bytes());
        put32(&mut b, 8, SIZE_MAX);
        put32(&mut b, 12, SEG_MAX);
        // geometry (16..20) left zero.
        put32(&mut b, 20, SECTOR_SIZE as u32);
        // topology: physical_block_exp, alignment_offset, min_io_size, opt_io_size.
        let phys = self.physical_block_size.max(SECTOR_SIZE as u32);
        let phys_sectors = phys / SECTOR_SIZE as u32;
        let exp = phys_sectors.checked_ilog2().unwrap_or(0);
        b[24] = u8::try_from(exp).unwrap_or(0);
        b[25] = 0;
        let min_io = u16::try_from(phys_sectors).unwrap_or(u16::MAX);
        b[26..28].copy_from_slice(&min_io.to_le_bytes());
        put32(&mut b, 28, 0);
        b[WRITEBACK_OFFSET] = u8::from(self.writeback);
        // 33: unused0
        b[34..36].copy_from_slice(&self.num_queues.to_le_bytes());
        put32(&mut b, 36, MAX_DISCARD_SECTORS);
        put32(&mut b, 40, MAX_DISCARD_SEG);
        // Discard granularity (`discard_sector_alignment`): the physical block, i.e. the
        // store's chunk, in sectors — a discard gives back whole chunks only.
        put32(&mut b, 44, phys_sectors);
        put32(&mut b, 48, MAX_WRITE_ZEROES_SECTORS);
        put32(&mut b, 52, MAX_DISCARD_SEG);
        // write_zeroes_may_unmap: true — whole chunks become holes or zero exceptions.
        b[56] = 1;
        // 57..60 unused1, 60..72 secure erase (not offered), 72..96 zoned (not offered).
        b
    }

    /// The bytes a frontend gets for GET_CONFIG(offset, size): exactly `size` bytes, the part
    /// past the end of the structure zero-filled (clients refuse a shorter reply).
    pub fn read(&self, offset: u32, size: u32) -> Vec<u8> {
        let full = self.encode();
        // The vhost crate caps offset + size at 4 KiB before calling the backend.
        let size = size.min(0x1000) as usize;
        let mut out = vec![0u8; size];
        let start = offset as usize;
        if start < CONFIG_SPACE_SIZE {
            let n = (CONFIG_SPACE_SIZE - start).min(size);
            out[..n].copy_from_slice(&full[start..start + n]);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn le32(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }

    #[test]
    fn encodes_fields_at_spec_offsets() {
        let c = BlkConfig {
            size_bytes: 1 << 30,
            physical_block_size: 64 << 10,
            num_queues: 4,
            writeback: true,
        };
        let b = c.encode();
        assert_eq!(
            u64::from_le_bytes(b[0..8].try_into().unwrap()),
            2 * 1024 * 1024
        );
        assert_eq!(le32(&b, 8), SIZE_MAX);
        assert_eq!(le32(&b, 12), SEG_MAX);
        assert_eq!(le32(&b, 20), 512);
        assert_eq!(b[24], 7, "64 KiB = 2^7 sectors");
        assert_eq!(u16::from_le_bytes([b[26], b[27]]), 128);
        assert_eq!(b[32], 1);
        assert_eq!(u16::from_le_bytes([b[34], b[35]]), 4);
        assert_eq!(le32(&b, 36), MAX_DISCARD_SECTORS);
        assert_eq!(le32(&b, 40), MAX_DISCARD_SEG);
        assert_eq!(le32(&b, 44), 128);
        assert_eq!(le32(&b, 48), MAX_WRITE_ZEROES_SECTORS);
        assert_eq!(le32(&b, 52), MAX_DISCARD_SEG);
        assert_eq!(b[56], 1);
        assert!(b[57..].iter().all(|&x| x == 0));
    }

    #[test]
    fn read_returns_exactly_requested_size() {
        let c = BlkConfig {
            size_bytes: 4096 + 511,
            physical_block_size: 4096,
            num_queues: 1,
            writeback: false,
        };
        assert_eq!(c.read(0, 57).len(), 57);
        assert_eq!(c.read(0, 60).len(), 60);
        let tail = c.read(90, 20);
        assert_eq!(tail.len(), 20);
        assert!(tail[6..].iter().all(|&x| x == 0));
        let beyond = c.read(200, 8);
        assert_eq!(beyond, vec![0; 8]);
        // Capacity rounds down to whole sectors.
        assert_eq!(u64::from_le_bytes(c.read(0, 8).try_into().unwrap()), 8);
        assert_eq!(c.read(34, 2), vec![1, 0]);
    }

    #[test]
    fn readonly_adds_ro_bit_only() {
        let rw = device_features(false);
        let ro = device_features(true);
        assert_eq!(ro & !rw, 1 << VIRTIO_BLK_F_RO);
        assert_ne!(rw & (1 << VIRTIO_F_VERSION_1), 0);
    }
}
