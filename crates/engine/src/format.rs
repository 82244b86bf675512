//! On-disk encoding of a COW store: superblock, checkpoint, journal batches, records.
//!
//! Everything is little-endian and checksummed with CRC-32C. `docs/format.md` draws the layout
//! and lists every field; keep the two in step.

use crate::meta::{MetaState, NodeKind, NodeMeta, OriginMeta, RollbackMeta};
use std::collections::BTreeMap;

/// Magic of a superblock slot.
pub const SB_MAGIC: &[u8; 8] = b"SNAPMVSB";
/// Magic of a checkpoint.
pub const CKPT_MAGIC: &[u8; 8] = b"SNAPMVCK";
/// Magic of a journal batch.
pub const BATCH_MAGIC: u32 = 0x4a4d_5653; // "SVMJ"
/// Format version this code writes and reads.
pub const FORMAT_VERSION: u32 = 2;
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
/// Longest memo, in bytes of UTF-8.
pub const MAX_MEMO: usize = 256;
/// Longest origin id, in bytes.
pub const MAX_ORIGIN_ID: usize = 1024;

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

fn round_up(v: u64, a: u64) -> u64 {
    v.div_ceil(a) * a
}

impl Layout {
    /// Lays out a store of `size` bytes, or says why it cannot hold one.
    pub fn compute(size: u64, chunk_size: u32) -> Result<Layout, String> {
        if !chunk_size.is_power_of_two() || !(MIN_CHUNK..=MAX_CHUNK).contains(&chunk_size) {
            return Err(format!(
                "chunk size {chunk_size} is not a power of two between 4 KiB and 1 MiB"
            ));
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
            return Err(format!(
                "{size} bytes is too small for a store with {chunk_size}-byte chunks (needs at least {} bytes)",
                data_off + 16 * cs
            ));
        }
        let data_chunks = (size - data_off) / cs;
        if data_chunks > u32::MAX as u64 {
            return Err(format!(
                "{data_chunks} chunks is more than the format's 2^32"
            ));
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

/// A little-endian writer.
#[derive(Default)]
pub struct Enc(pub Vec<u8>);

impl Enc {
    pub fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    pub fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub fn bytes(&mut self, v: &[u8]) {
        self.u32(v.len() as u32);
        self.0.extend_from_slice(v);
    }
    pub fn str(&mut self, v: &str) {
        self.bytes(v.as_bytes());
    }
}

/// A little-endian reader that fails instead of panicking on short input.
pub struct Dec<'a> {
    buf: &'a [u8],
    pos: usize,
    what: &'static str,
}

impl<'a> Dec<'a> {
    pub fn new(buf: &'a [u8], what: &'static str) -> Self {
        Dec { buf, pos: 0, what }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        match end {
            Some(end) => {
                let s = &self.buf[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None => Err(format!(
                "{} truncated at byte {} (wanted {} more of {})",
                self.what,
                self.pos,
                n,
                self.buf.len()
            )),
        }
    }
    pub fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    pub fn u32(&mut self) -> Result<u32, String> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    pub fn u64(&mut self) -> Result<u64, String> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    pub fn bytes(&mut self, max: usize) -> Result<&'a [u8], String> {
        let n = self.u32()? as usize;
        if n > max {
            return Err(format!(
                "{} has a {n}-byte field at byte {} (limit {max})",
                self.what, self.pos
            ));
        }
        self.take(n)
    }
    pub fn string(&mut self, max: usize) -> Result<String, String> {
        let pos = self.pos;
        let b = self.bytes(max)?;
        String::from_utf8(b.to_vec())
            .map_err(|_| format!("{} has invalid UTF-8 at byte {pos}", self.what))
    }
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
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
    pub fn decode(buf: &[u8]) -> Result<Superblock, String> {
        if buf.len() < 128 || &buf[..8] != SB_MAGIC {
            return Err("bad magic (not a snapmv store)".into());
        }
        let mut d = Dec::new(buf, "superblock");
        d.take(8)?;
        let version = d.u32()?;
        if !(OLDEST_VERSION..=FORMAT_VERSION).contains(&version) {
            return Err(format!(
                "format version {version} is not supported (this build reads {OLDEST_VERSION} to {FORMAT_VERSION})"
            ));
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
            return Err("checksum mismatch".into());
        }
        let cs = layout.chunk_size;
        if !cs.is_power_of_two() || !(MIN_CHUNK..=MAX_CHUNK).contains(&cs) {
            return Err(format!("chunk size {cs} is invalid"));
        }
        if ckpt_slot > 1 || ckpt_len > layout.ckpt_size {
            return Err(format!(
                "checkpoint slot {ckpt_slot} / length {ckpt_len} out of range"
            ));
        }
        if layout.ckpt_off < 2 * SB_SLOT
            || layout.journal_off < layout.ckpt_off + 2 * layout.ckpt_size
            || layout.data_off < layout.journal_off + layout.journal_size
            || layout.data_off % cs as u64 != 0
        {
            return Err("areas overlap or are misaligned".into());
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

/// A metadata change. Every mutation of the in-memory metadata emits one or more records, in
/// the same critical section, and a batch of records reaches the journal atomically.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// An origin was bound under `slot`.
    BindOrigin { slot: u32, id: String, size: u64 },
    /// The origin in `slot` was unbound.
    UnbindOrigin { slot: u32 },
    /// A version node was created.
    NewNode {
        slot: u32,
        node: u32,
        meta: NodeMeta,
    },
    /// Leaf `node` stopped taking writes (its tag moved to a new leaf).
    Freeze { slot: u32, node: u32 },
    /// Snapshot `tag` was deleted; its leaf is dead.
    DeleteTag { slot: u32, tag: u32 },
    /// Exception: chunk `chunk` of version `node` lives in store chunk `store` (allocated).
    AddException {
        slot: u32,
        chunk: u64,
        node: u32,
        store: u64,
    },
    /// The exception of `node` for `chunk` was dropped and its store chunk freed.
    FreeException { slot: u32, chunk: u64, node: u32 },
    /// Rollback of `tag` from frozen node `source` began.
    RollbackStart { slot: u32, tag: u32, source: u32 },
    /// Origin chunk `chunk` holds the rollback source's data.
    Restored { slot: u32, chunk: u64 },
    /// The rollback finished.
    RollbackDone { slot: u32 },
    /// Origin chunk `chunk`'s newest content, acknowledged but not yet on the origin, is in
    /// store chunk `store` (allocated).
    OverlayAt { slot: u32, chunk: u64, store: u64 },
    /// The pending content of origin chunk `chunk` is on the origin; its store chunk is free.
    OverlayDone { slot: u32, chunk: u64 },
}

fn encode_node(e: &mut Enc, n: &NodeMeta) {
    e.u8(n.kind as u8);
    e.u8(n.dead as u8);
    e.u32(n.parent);
    e.u32(n.seq);
    e.u32(n.tag);
    e.u32(n.parent_tag);
    e.u64(n.birth);
    e.str(&n.memo);
}

fn decode_node(d: &mut Dec) -> Result<NodeMeta, String> {
    let kind = NodeKind::from_u8(d.u8()?).ok_or("unknown node kind")?;
    Ok(NodeMeta {
        kind,
        dead: d.u8()? != 0,
        parent: d.u32()?,
        seq: d.u32()?,
        tag: d.u32()?,
        parent_tag: d.u32()?,
        birth: d.u64()?,
        memo: d.string(MAX_MEMO)?,
    })
}

impl Record {
    /// Appends the encoding.
    pub fn encode(&self, e: &mut Enc) {
        match self {
            Record::BindOrigin { slot, id, size } => {
                e.u8(1);
                e.u32(*slot);
                e.str(id);
                e.u64(*size);
            }
            Record::UnbindOrigin { slot } => {
                e.u8(2);
                e.u32(*slot);
            }
            Record::NewNode { slot, node, meta } => {
                e.u8(3);
                e.u32(*slot);
                e.u32(*node);
                encode_node(e, meta);
            }
            Record::Freeze { slot, node } => {
                e.u8(4);
                e.u32(*slot);
                e.u32(*node);
            }
            Record::DeleteTag { slot, tag } => {
                e.u8(6);
                e.u32(*slot);
                e.u32(*tag);
            }
            Record::AddException {
                slot,
                chunk,
                node,
                store,
            } => {
                e.u8(7);
                e.u32(*slot);
                e.u64(*chunk);
                e.u32(*node);
                e.u64(*store);
            }
            Record::FreeException { slot, chunk, node } => {
                e.u8(8);
                e.u32(*slot);
                e.u64(*chunk);
                e.u32(*node);
            }
            Record::RollbackStart { slot, tag, source } => {
                e.u8(9);
                e.u32(*slot);
                e.u32(*tag);
                e.u32(*source);
            }
            Record::Restored { slot, chunk } => {
                e.u8(10);
                e.u32(*slot);
                e.u64(*chunk);
            }
            Record::RollbackDone { slot } => {
                e.u8(11);
                e.u32(*slot);
            }
            Record::OverlayAt { slot, chunk, store } => {
                e.u8(12);
                e.u32(*slot);
                e.u64(*chunk);
                e.u64(*store);
            }
            Record::OverlayDone { slot, chunk } => {
                e.u8(13);
                e.u32(*slot);
                e.u64(*chunk);
            }
        }
    }

    /// Decodes one record.
    pub fn decode(d: &mut Dec) -> Result<Record, String> {
        let t = d.u8()?;
        Ok(match t {
            1 => Record::BindOrigin {
                slot: d.u32()?,
                id: d.string(MAX_ORIGIN_ID)?,
                size: d.u64()?,
            },
            2 => Record::UnbindOrigin { slot: d.u32()? },
            3 => Record::NewNode {
                slot: d.u32()?,
                node: d.u32()?,
                meta: decode_node(d)?,
            },
            4 => Record::Freeze {
                slot: d.u32()?,
                node: d.u32()?,
            },
            6 => Record::DeleteTag {
                slot: d.u32()?,
                tag: d.u32()?,
            },
            7 => Record::AddException {
                slot: d.u32()?,
                chunk: d.u64()?,
                node: d.u32()?,
                store: d.u64()?,
            },
            8 => Record::FreeException {
                slot: d.u32()?,
                chunk: d.u64()?,
                node: d.u32()?,
            },
            9 => Record::RollbackStart {
                slot: d.u32()?,
                tag: d.u32()?,
                source: d.u32()?,
            },
            10 => Record::Restored {
                slot: d.u32()?,
                chunk: d.u64()?,
            },
            11 => Record::RollbackDone { slot: d.u32()? },
            12 => Record::OverlayAt {
                slot: d.u32()?,
                chunk: d.u64()?,
                store: d.u64()?,
            },
            13 => Record::OverlayDone {
                slot: d.u32()?,
                chunk: d.u64()?,
            },
            other => return Err(format!("unknown record type {other}")),
        })
    }
}

/// The bytes a batch's CRC covers: header bytes 0..24, the payload, and the `unvouched` field
/// when it is not zero (so a version-1 batch, whose field is always zero, checks the same).
fn batch_crc(header: &[u8], payload: &[u8], unvouched: u32) -> u32 {
    let c = crc32c::crc32c_append(crc32c::crc32c(&header[..24]), payload);
    if unvouched == 0 {
        c
    } else {
        crc32c::crc32c_append(c, &unvouched.to_le_bytes())
    }
}

/// Encodes a journal batch: header (magic, generation, sequence, payload length, CRC,
/// unvouched count) then the records, padded to [`JOURNAL_ALIGN`].
///
/// `unvouched` says how many batches, counting back from this one, this batch does *not*
/// vouch for: 0 means this batch and every earlier one had their data durable before it was
/// written (a sealed batch); `n` means batches up to `seq - n` did. After a power cut only
/// vouched-for batches are replayed (see docs/format.md, "Journal").
pub fn encode_batch(gen: u64, seq: u64, unvouched: u32, records: &[Record]) -> Vec<u8> {
    let mut payload = Enc::default();
    payload.u32(records.len() as u32);
    for r in records {
        r.encode(&mut payload);
    }
    let mut e = Enc::default();
    e.u32(BATCH_MAGIC);
    e.u64(gen);
    e.u64(seq);
    e.u32(payload.0.len() as u32);
    let crc = batch_crc(&e.0, &payload.0, unvouched);
    e.u32(crc);
    e.u32(unvouched);
    debug_assert_eq!(e.0.len(), BATCH_HEADER);
    e.0.extend_from_slice(&payload.0);
    let padded = round_up(e.0.len() as u64, JOURNAL_ALIGN) as usize;
    e.0.resize(padded, 0);
    e.0
}

/// Header of a journal batch.
pub struct BatchHeader {
    pub gen: u64,
    pub seq: u64,
    pub payload_len: u32,
    pub crc: u32,
    /// See [`encode_batch`].
    pub unvouched: u32,
}

impl BatchHeader {
    /// The highest sequence number this batch vouches for (-1: none).
    pub fn vouched_upto(&self) -> i128 {
        self.seq as i128 - self.unvouched as i128
    }
}

/// Parses a batch header; `None` if it is not one.
pub fn decode_batch_header(buf: &[u8]) -> Option<BatchHeader> {
    if buf.len() < BATCH_HEADER {
        return None;
    }
    let mut d = Dec::new(buf, "journal batch header");
    if d.u32().ok()? != BATCH_MAGIC {
        return None;
    }
    Some(BatchHeader {
        gen: d.u64().ok()?,
        seq: d.u64().ok()?,
        payload_len: d.u32().ok()?,
        crc: d.u32().ok()?,
        unvouched: d.u32().ok()?,
    })
}

/// Verifies a batch's checksum and decodes its records.
pub fn decode_batch_payload(
    header_bytes: &[u8],
    payload: &[u8],
    h: &BatchHeader,
) -> Option<Vec<Record>> {
    if header_bytes.len() < 24 || batch_crc(header_bytes, payload, h.unvouched) != h.crc {
        return None;
    }
    let mut d = Dec::new(payload, "journal batch");
    let n = d.u32().ok()?;
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(Record::decode(&mut d).ok()?);
    }
    Some(out)
}

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
pub fn decode_checkpoint(buf: &[u8], chunk_size: u32) -> Result<MetaState, String> {
    let mut d = Dec::new(buf, "checkpoint");
    if d.take(8)? != CKPT_MAGIC {
        return Err("checkpoint has a bad magic".into());
    }
    let data_chunks = d.u64()?;
    let words = d.u32()? as usize;
    if words > d.remaining() / 8 {
        return Err("checkpoint allocation bitmap is longer than the checkpoint".into());
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
            return Err(format!(
                "checkpoint: origin {id} claims {nnodes} nodes, more than fit"
            ));
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
            return Err(format!(
                "checkpoint: origin {id} claims {nex} exceptions, more than fit"
            ));
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
                    return Err("checkpoint: rollback bitmap longer than the checkpoint".into());
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
            x => return Err(format!("checkpoint: bad rollback flag {x}")),
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
            return Err(format!(
                "checkpoint claims {n} pending origin writes, more than fit"
            ));
        }
        for _ in 0..n {
            let slot = d.u32()?;
            let chunk = d.u64()?;
            let store = d.u64()?;
            let o = origins.get_mut(&slot).ok_or_else(|| {
                format!("checkpoint: pending write for unknown origin slot {slot}")
            })?;
            if o.overlays.insert(chunk, store).is_some() {
                return Err(format!(
                    "checkpoint: origin slot {slot} chunk {chunk} has two pending writes"
                ));
            }
        }
        if d.remaining() > 0 {
            return Err("checkpoint has trailing bytes".into());
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_rejects_bad_chunk_sizes_and_tiny_stores() {
        assert!(Layout::compute(1 << 30, 3000).is_err());
        assert!(Layout::compute(1 << 30, 2 << 20).is_err());
        assert!(Layout::compute(1 << 20, 4096).is_err());
        let l = Layout::compute(64 << 20, 4096).unwrap();
        assert_eq!(l.data_off % 4096, 0);
        assert!(l.data_off + l.data_chunks * 4096 <= 64 << 20);
        assert!(l.journal_off >= l.ckpt_off + 2 * l.ckpt_size);
    }

    #[test]
    fn superblock_roundtrip_and_corruption_detected() {
        let sb = Superblock {
            generation: 7,
            layout: Layout::compute(64 << 20, 8192).unwrap(),
            ckpt_slot: 1,
            ckpt_len: 100,
            ckpt_crc: 5,
            journal_gen: 3,
            journal_seq: 9,
            boot: [7; 16],
        };
        let mut b = sb.encode();
        assert_eq!(Superblock::decode(&b).unwrap(), sb);
        // A version-1 slot (no boot id, CRC right after journal_seq) still reads.
        let mut v1 = b[..104].to_vec();
        v1[8..12].copy_from_slice(&1u32.to_le_bytes());
        let crc = crc32c::crc32c(&v1);
        v1.extend_from_slice(&crc.to_le_bytes());
        v1.resize(SB_SLOT as usize, 0);
        assert_eq!(
            Superblock::decode(&v1).unwrap(),
            Superblock {
                boot: [0; 16],
                ..sb
            }
        );
        b[20] ^= 1;
        assert!(Superblock::decode(&b).unwrap_err().contains("checksum"));
        b[0] = b'X';
        assert!(Superblock::decode(&b).unwrap_err().contains("magic"));
    }

    #[test]
    fn batch_roundtrip_and_torn_batch_rejected() {
        let recs = vec![
            Record::BindOrigin {
                slot: 0,
                id: "/a".into(),
                size: 1 << 20,
            },
            Record::AddException {
                slot: 0,
                chunk: 3,
                node: 2,
                store: 9,
            },
            Record::Restored { slot: 0, chunk: 5 },
            Record::OverlayAt {
                slot: 0,
                chunk: 6,
                store: 10,
            },
            Record::OverlayDone { slot: 0, chunk: 6 },
        ];
        let b = encode_batch(4, 11, 0, &recs);
        assert_eq!(b.len() % JOURNAL_ALIGN as usize, 0);
        let h = decode_batch_header(&b).unwrap();
        assert_eq!((h.gen, h.seq, h.unvouched), (4, 11, 0));
        assert_eq!(h.vouched_upto(), 11);
        // The unvouched count is covered by the checksum.
        let u = encode_batch(4, 11, 3, &recs);
        let hu = decode_batch_header(&u).unwrap();
        assert_eq!(hu.vouched_upto(), 8);
        let payload = &u[BATCH_HEADER..BATCH_HEADER + hu.payload_len as usize];
        assert!(decode_batch_payload(&u, payload, &hu).is_some());
        let mut flipped = u.clone();
        flipped[28] ^= 1;
        let hf = decode_batch_header(&flipped).unwrap();
        assert!(decode_batch_payload(&flipped, payload, &hf).is_none());
        let payload = &b[BATCH_HEADER..BATCH_HEADER + h.payload_len as usize];
        assert_eq!(decode_batch_payload(&b, payload, &h).unwrap(), recs);
        let mut torn = b.clone();
        torn[BATCH_HEADER + 3] ^= 0x40;
        let payload = &torn[BATCH_HEADER..BATCH_HEADER + h.payload_len as usize];
        assert!(decode_batch_payload(&torn, payload, &h).is_none());
    }

    #[test]
    fn checkpoint_keeps_pending_overlays_and_reads_without_them() {
        let mut m = MetaState::new(4096, 64);
        m.apply(&Record::BindOrigin {
            slot: 0,
            id: "/o".into(),
            size: 16 * 4096,
        })
        .unwrap();
        let plain = encode_checkpoint(&m);
        m.apply(&Record::OverlayAt {
            slot: 0,
            chunk: 3,
            store: 7,
        })
        .unwrap();
        let with = encode_checkpoint(&m);
        // Without pending writes the encoding is the version-1 one; with them, a section
        // follows and decodes back.
        assert_eq!(with.len(), plain.len() + 8 + 20);
        assert_eq!(decode_checkpoint(&with, 4096).unwrap(), m);
        assert!(m.validate().is_empty());
        let mut extra = with.clone();
        extra.push(0);
        assert!(decode_checkpoint(&extra, 4096).is_err());
        m.apply(&Record::OverlayDone { slot: 0, chunk: 3 }).unwrap();
        assert_eq!(encode_checkpoint(&m), plain);
        assert!(m.apply(&Record::OverlayDone { slot: 0, chunk: 3 }).is_err());
    }

    #[test]
    fn decoder_never_panics_on_garbage() {
        let mut rng = 12345u64;
        for len in 0..300 {
            let buf: Vec<u8> = (0..len)
                .map(|_| {
                    rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1);
                    (rng >> 33) as u8
                })
                .collect();
            let _ = Superblock::decode(&buf);
            let _ = decode_checkpoint(&buf, 4096);
            let mut d = Dec::new(&buf, "x");
            while Record::decode(&mut d).is_ok() {}
        }
    }
}
