//! The store's layout and its superblock (two slots at the start of the store).

use super::*;

/// Where the areas of a store are, fixed at format time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// Chunk size in bytes.
    pub chunk_size: u32,
    /// Offset of checkpoint area 0 (area 1 follows it).
    pub ckpt_off: u64,
    /// Size of one checkpoint area.
    pub ckpt_size: u64,
    /// Offset of the journal.
    pub journal_off: u64,
    /// Size of the journal.
    pub journal_size: u64,
    /// Offset of store chunk 0 (chunk-aligned).
    pub data_off: u64,
    /// Number of data chunks.
    pub data_chunks: u64,
}

pub(super) fn round_up(v: u64, a: u64) -> u64 {
    v.div_ceil(a) * a
}

/// Why a store cannot be laid out on a device.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    /// The chunk size is not one the format allows.
    #[error("chunk size {0} is not a power of two between 4 KiB and 1 MiB")]
    ChunkSize(u32),
    /// The device is too small.
    #[error("{size} bytes is too small for a store with {chunk_size}-byte chunks (needs at least {needs} bytes)")]
    TooSmall {
        /// The device's size.
        size: u64,
        /// The chunk size asked for.
        chunk_size: u32,
        /// The smallest size that works.
        needs: u64,
    },
    /// The device holds more chunks than the format counts.
    #[error("{0} chunks is more than the format's 2^32")]
    TooManyChunks(u64),
}

impl Layout {
    /// Lays out a store of `size` bytes, or says why it cannot hold one.
    pub fn compute(size: u64, chunk_size: u32) -> Result<Layout, LayoutError> {
        if !chunk_size.is_power_of_two() || !(MIN_CHUNK..=MAX_CHUNK).contains(&chunk_size) {
            return Err(LayoutError::ChunkSize(chunk_size));
        }
        let cs = chunk_size as u64;
        let est = size / cs;
        // A checkpoint holds every exception (24 bytes), the allocation bitmap and the version
        // trees; the node budget gives 65,536 versions with short memos on stores of 1 GiB+.
        let node_budget = (est * 32).clamp(256 << 10, 8 << 20);
        let ckpt_size = round_up(64 * 1024 + est * 24 + est / 8 + node_budget, 4096);
        let journal_size = round_up((size / 32).clamp(2 << 20, 128 << 20), 4096);
        let ckpt_off = 2 * SB_SLOT;
        let journal_off = ckpt_off + 2 * ckpt_size;
        let data_off = round_up(journal_off + journal_size, cs);
        if size < data_off + 16 * cs {
            return Err(LayoutError::TooSmall {
                size,
                chunk_size,
                needs: data_off + 16 * cs,
            });
        }
        let data_chunks = (size - data_off) / cs;
        if data_chunks > u32::MAX as u64 {
            return Err(LayoutError::TooManyChunks(data_chunks));
        }
        Ok(Layout {
            chunk_size,
            ckpt_off,
            ckpt_size,
            journal_off,
            journal_size,
            data_off,
            data_chunks,
        })
    }

    /// Byte offset of store chunk `c`.
    pub fn chunk_offset(&self, c: u64) -> u64 {
        self.data_off + c * self.chunk_size as u64
    }

    /// Offset of checkpoint area `slot` (0 or 1).
    pub fn ckpt_area(&self, slot: u32) -> u64 {
        self.ckpt_off + slot as u64 * self.ckpt_size
    }
}

/// One superblock slot. The valid slot with the highest `generation` is current.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Superblock {
    /// Bumped on every superblock write.
    pub generation: u64,
    /// The store's layout.
    pub layout: Layout,
    /// Which checkpoint area holds the current checkpoint.
    pub ckpt_slot: u32,
    /// Length of the current checkpoint in bytes.
    pub ckpt_len: u64,
    /// CRC-32C of the current checkpoint.
    pub ckpt_crc: u32,
    /// Journal pass: batches of other passes are stale.
    pub journal_gen: u64,
    /// Sequence number the first batch of this pass carries.
    pub journal_seq: u64,
    /// The boot of the machine that wrote this superblock (and every journal batch of its
    /// pass): `/proc/sys/kernel/random/boot_id`, all zeros when unknown. A journal batch
    /// written in the boot that replays it is in the page cache even if never synced.
    pub boot: [u8; 16],
}

impl Superblock {
    /// Encodes into a full slot.
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Enc::default();
        e.0.extend_from_slice(SB_MAGIC);
        e.u32(FORMAT_VERSION);
        e.u64(self.generation);
        let l = &self.layout;
        e.u32(l.chunk_size);
        e.u64(l.ckpt_off);
        e.u64(l.ckpt_size);
        e.u64(l.journal_off);
        e.u64(l.journal_size);
        e.u64(l.data_off);
        e.u64(l.data_chunks);
        e.u32(self.ckpt_slot);
        e.u64(self.ckpt_len);
        e.u32(self.ckpt_crc);
        e.u64(self.journal_gen);
        e.u64(self.journal_seq);
        e.0.extend_from_slice(&self.boot);
        let crc = crc32c::crc32c(&e.0);
        e.u32(crc);
        e.0.resize(SB_SLOT as usize, 0);
        e.0
    }

    /// Decodes a slot; the error says what is wrong.
    pub fn decode(buf: &[u8]) -> Result<Superblock, DecodeError> {
        if buf.len() < 128 || &buf[..8] != SB_MAGIC {
            return Err(DecodeError::NotAStore);
        }
        let mut d = Dec::new(buf, "superblock");
        d.take(8)?;
        let version = d.u32()?;
        if !(OLDEST_VERSION..=FORMAT_VERSION).contains(&version) {
            return Err(DecodeError::UnsupportedVersion(version));
        }
        let generation = d.u64()?;
        let layout = Layout {
            chunk_size: d.u32()?,
            ckpt_off: d.u64()?,
            ckpt_size: d.u64()?,
            journal_off: d.u64()?,
            journal_size: d.u64()?,
            data_off: d.u64()?,
            data_chunks: d.u64()?,
        };
        let ckpt_slot = d.u32()?;
        let ckpt_len = d.u64()?;
        let ckpt_crc = d.u32()?;
        let journal_gen = d.u64()?;
        let journal_seq = d.u64()?;
        let mut boot = [0u8; 16];
        if version >= 2 {
            boot.copy_from_slice(d.take(16)?);
        }
        let end = d.pos;
        let crc = d.u32()?;
        if crc32c::crc32c(&buf[..end]) != crc {
            return Err(DecodeError::Checksum);
        }
        let cs = layout.chunk_size;
        if !cs.is_power_of_two() || !(MIN_CHUNK..=MAX_CHUNK).contains(&cs) {
            return Err(DecodeError::Invalid(format!("chunk size {cs} is invalid")));
        }
        if ckpt_slot > 1 || ckpt_len > layout.ckpt_size {
            return Err(DecodeError::Invalid(format!(
                "checkpoint slot {ckpt_slot} / length {ckpt_len} out of range"
            )));
        }
        if layout.ckpt_off < 2 * SB_SLOT
            || layout.journal_off < layout.ckpt_off + 2 * layout.ckpt_size
            || layout.data_off < layout.journal_off + layout.journal_size
            || layout.data_off % cs as u64 != 0
        {
            return Err(DecodeError::Invalid(
                "areas overlap or are misaligned".into(),
            ));
        }
        Ok(Superblock {
            generation,
            layout,
            ckpt_slot,
            ckpt_len,
            ckpt_crc,
            journal_gen,
            journal_seq,
            boot,
        })
    }
}
