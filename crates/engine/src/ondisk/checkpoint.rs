//! The checkpoint: the whole metadata in one checksummed blob.

use super::journal::{decode_node, encode_node};
use super::*;
use crate::storage::Storage;

/// Encodes a checkpoint of the whole metadata.
pub fn encode_checkpoint(m: &MetaState) -> Vec<u8> {
    let mut e = Enc::default();
    e.0.extend_from_slice(CKPT_MAGIC);
    e.u64(m.data_chunks);
    e.u32(m.alloc.len() as u32);
    for w in &m.alloc {
        e.u64(*w);
    }
    e.u32(m.origins.len() as u32);
    for (slot, o) in &m.origins {
        e.u32(*slot);
        e.str(&o.id);
        e.u64(o.size);
        e.u32(o.next_tag);
        e.u32(o.newest_seq);
        e.u32(o.nodes.len() as u32);
        for n in &o.nodes {
            encode_node(&mut e, n);
        }
        e.u32(o.tags.len() as u32);
        for (tag, leaf) in &o.tags {
            e.u32(*tag);
            e.u32(*leaf);
        }
        let nex: usize = o.exceptions.values().map(|v| v.len()).sum();
        e.u64(nex as u64);
        for (chunk, list) in &o.exceptions {
            for (node, store) in list {
                e.u64(*chunk);
                e.u32(*node);
                e.u64(*store);
            }
        }
        match &o.rollback {
            None => e.u8(0),
            Some(r) => {
                e.u8(1);
                e.u32(r.tag);
                e.u32(r.source);
                e.u32(r.restored.len() as u32);
                for w in &r.restored {
                    e.u64(*w);
                }
            }
        }
    }
    e.u32(m.next_slot);
    // Pending origin writes, only when there are any (so a checkpoint without them is
    // byte-for-byte a version-1 checkpoint).
    let pending: Vec<(u32, u64, u64)> = m
        .origins
        .iter()
        .flat_map(|(slot, o)| o.overlays.iter().map(move |(c, s)| (*slot, *c, *s)))
        .collect();
    if !pending.is_empty() {
        e.u64(pending.len() as u64);
        for (slot, c, s) in pending {
            e.u32(slot);
            e.u64(c);
            e.u64(s);
        }
    }
    e.0
}

/// Decodes a checkpoint (the caller has verified its CRC).
pub fn decode_checkpoint(buf: &[u8], chunk_size: u32) -> Result<MetaState, DecodeError> {
    let mut d = Dec::new(buf, "checkpoint");
    if d.take(8)? != CKPT_MAGIC {
        return Err(DecodeError::BadCheckpointMagic);
    }
    let data_chunks = d.u64()?;
    let words = d.u32()? as usize;
    if words > d.remaining() / 8 {
        return Err(DecodeError::Invalid(
            "checkpoint allocation bitmap is longer than the checkpoint".into(),
        ));
    }
    let mut alloc = Vec::with_capacity(words);
    for _ in 0..words {
        alloc.push(d.u64()?);
    }
    let norigins = d.u32()?;
    let mut origins = BTreeMap::new();
    for _ in 0..norigins {
        let slot = d.u32()?;
        let id = d.string(MAX_ORIGIN_ID)?;
        let size = d.u64()?;
        let next_tag = d.u32()?;
        let newest_seq = d.u32()?;
        let nnodes = d.u32()? as usize;
        if nnodes > d.remaining() / 26 {
            return Err(DecodeError::Invalid(format!(
                "checkpoint: origin {id} claims {nnodes} nodes, more than fit"
            )));
        }
        let mut nodes = Vec::with_capacity(nnodes);
        for _ in 0..nnodes {
            nodes.push(decode_node(&mut d)?);
        }
        let ntags = d.u32()?;
        let mut tags = BTreeMap::new();
        for _ in 0..ntags {
            let t = d.u32()?;
            tags.insert(t, d.u32()?);
        }
        let nex = d.u64()?;
        if nex > (d.remaining() / 20) as u64 {
            return Err(DecodeError::Invalid(format!(
                "checkpoint: origin {id} claims {nex} exceptions, more than fit"
            )));
        }
        let mut exceptions: BTreeMap<u64, Vec<(u32, u64)>> = BTreeMap::new();
        for _ in 0..nex {
            let chunk = d.u64()?;
            let node = d.u32()?;
            let store = d.u64()?;
            exceptions.entry(chunk).or_default().push((node, store));
        }
        let rollback = match d.u8()? {
            0 => None,
            1 => {
                let tag = d.u32()?;
                let source = d.u32()?;
                let w = d.u32()? as usize;
                if w > d.remaining() / 8 {
                    return Err(DecodeError::Invalid(
                        "checkpoint: rollback bitmap longer than the checkpoint".into(),
                    ));
                }
                let mut restored = Vec::with_capacity(w);
                for _ in 0..w {
                    restored.push(d.u64()?);
                }
                Some(RollbackMeta {
                    tag,
                    source,
                    restored,
                })
            }
            x => {
                return Err(DecodeError::Invalid(format!(
                    "checkpoint: bad rollback flag {x}"
                )))
            }
        };
        origins.insert(
            slot,
            OriginMeta {
                id,
                size,
                next_tag,
                newest_seq,
                nodes,
                tags,
                exceptions,
                rollback,
                overlays: BTreeMap::new(),
            },
        );
    }
    let next_slot = d.u32()?;
    if d.remaining() > 0 {
        let n = d.u64()?;
        if n > (d.remaining() / 20) as u64 {
            return Err(DecodeError::Invalid(format!(
                "checkpoint claims {n} pending origin writes, more than fit"
            )));
        }
        for _ in 0..n {
            let slot = d.u32()?;
            let chunk = d.u64()?;
            let store = d.u64()?;
            let o = origins.get_mut(&slot).ok_or_else(|| {
                DecodeError::Invalid(format!(
                    "checkpoint: pending write for unknown origin slot {slot}"
                ))
            })?;
            if o.overlays.insert(chunk, store).is_some() {
                return Err(DecodeError::Invalid(format!(
                    "checkpoint: origin slot {slot} chunk {chunk} has two pending writes"
                )));
            }
        }
        if d.remaining() > 0 {
            return Err(DecodeError::Invalid("checkpoint has trailing bytes".into()));
        }
    }
    Ok(MetaState {
        chunk_size,
        data_chunks,
        alloc,
        origins,
        next_slot,
    })
}

/// Why a checkpoint could not be written.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointWriteError {
    /// The encoded metadata does not fit a checkpoint area.
    #[error("metadata ({len} bytes) outgrew the checkpoint area ({area} bytes)")]
    TooBig {
        /// Bytes of the encoded checkpoint.
        len: u64,
        /// Bytes of one checkpoint area.
        area: u64,
    },
    /// A write or sync failed.
    #[error("{step}: {source}")]
    Io {
        /// What was being written or synced.
        step: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// Writes `state` as a checkpoint into the area superblock `sb` does not use, then the
/// superblock naming it (generation + 1, a fresh journal pass at sequence 0, boot `boot`) into
/// the slot its generation belongs to, syncing after each. Returns the new superblock. With
/// `both_slots`, a second copy (generation + 2) goes to the other slot too, so that neither
/// slot holds an older state (repair). The one checkpoint writer: the store and repair use it.
pub fn write_checkpoint(
    storage: &dyn Storage,
    sb: &Superblock,
    state: &MetaState,
    boot: [u8; 16],
    both_slots: bool,
) -> Result<Superblock, CheckpointWriteError> {
    let io = |step: &'static str| move |source| CheckpointWriteError::Io { step, source };
    let ck = encode_checkpoint(state);
    if ck.len() as u64 > sb.layout.ckpt_size {
        return Err(CheckpointWriteError::TooBig {
            len: ck.len() as u64,
            area: sb.layout.ckpt_size,
        });
    }
    let slot = 1 - sb.ckpt_slot;
    storage
        .write_at(&ck, sb.layout.ckpt_area(slot))
        .map_err(io("writing checkpoint"))?;
    storage.sync().map_err(io("syncing checkpoint"))?;
    let mut new_sb = Superblock {
        generation: sb.generation + 1,
        layout: sb.layout,
        ckpt_slot: slot,
        ckpt_len: ck.len() as u64,
        ckpt_crc: crc32c::crc32c(&ck),
        journal_gen: sb.journal_gen.wrapping_add(1),
        journal_seq: 0,
        boot,
    };
    for copy in 0..if both_slots { 2 } else { 1 } {
        if copy == 1 {
            new_sb.generation += 1;
        }
        storage
            .write_at(&new_sb.encode(), (new_sb.generation % 2) * SB_SLOT)
            .map_err(io("writing superblock"))?;
        storage.sync().map_err(io("syncing superblock"))?;
    }
    Ok(new_sb)
}
