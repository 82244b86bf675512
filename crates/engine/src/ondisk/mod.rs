//! On-disk encoding of a COW store: superblock, checkpoint, journal batches, records.
//!
//! Everything is little-endian and checksummed with CRC-32C. `docs/format.md` draws the layout
//! and lists every field; keep the two in step.

use crate::meta::{
    MetaState, NodeKind, NodeMeta, OriginMeta, Record, RollbackMeta, MAX_MEMO, MAX_ORIGIN_ID,
};
use std::collections::BTreeMap;

mod checkpoint;
mod codec;
mod journal;
mod superblock;
#[cfg(test)]
mod tests;

pub use checkpoint::{
    decode_checkpoint, encode_checkpoint, write_checkpoint, CheckpointWriteError,
};
pub use codec::{Dec, DecodeError, Enc};
pub use journal::{decode_batch_header, decode_batch_payload, encode_batch, BatchHeader};
pub use superblock::{Layout, Superblock};

/// Magic of a superblock slot.
pub const SB_MAGIC: &[u8; 8] = b"SNAPMVSB";
/// Magic of a checkpoint.
pub const CKPT_MAGIC: &[u8; 8] = b"SNAPMVCK";
/// Magic of a journal batch.
pub const BATCH_MAGIC: u32 = 0x4a4d_5653; // "SVMJ"
/// Format version this code writes and reads.
pub const FORMAT_VERSION: u32 = 4;
/// The oldest format version this build still reads (version 1 has no boot id in the
/// superblock; its journal batches are all sealed).
pub const OLDEST_VERSION: u32 = 1;
/// Size of one superblock slot; two slots sit at offsets 0 and `SB_SLOT`.
pub const SB_SLOT: u64 = 4096;
/// Journal batches start on this alignment.
pub const JOURNAL_ALIGN: u64 = 512;
/// Size of a journal batch header.
pub const BATCH_HEADER: usize = 32;
/// Smallest and largest chunk sizes.
pub const MIN_CHUNK: u32 = 4096;
/// Largest chunk size.
pub const MAX_CHUNK: u32 = 1 << 20;
