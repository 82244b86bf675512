//! Journal batches and the encoding of the records in them.

use super::superblock::round_up;
use super::*;

pub(super) fn encode_node(e: &mut Enc, n: &NodeMeta) {
    e.u8(n.kind as u8);
    e.u8(n.dead as u8);
    e.u32(n.parent);
    e.u32(n.seq);
    e.u32(n.tag);
    e.u32(n.parent_tag);
    e.u64(n.birth);
    e.str(&n.memo);
}

pub(super) fn decode_node(d: &mut Dec) -> Result<NodeMeta, DecodeError> {
    let k = d.u8()?;
    let kind = NodeKind::from_u8(k).ok_or(DecodeError::UnknownNodeKind(k))?;
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
            Record::ShareOverlay { slot, chunk, node } => {
                e.u8(14);
                e.u32(*slot);
                e.u64(*chunk);
                e.u32(*node);
            }
            Record::SetMemo { slot, tag, memo } => {
                e.u8(17);
                e.u32(*slot);
                e.u32(*tag);
                e.str(memo);
            }
            Record::ZeroException { slot, chunk, node } => {
                e.u8(15);
                e.u32(*slot);
                e.u64(*chunk);
                e.u32(*node);
            }
        }
    }

    /// Decodes one record.
    pub fn decode(d: &mut Dec) -> Result<Record, DecodeError> {
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
            14 => Record::ShareOverlay {
                slot: d.u32()?,
                chunk: d.u64()?,
                node: d.u32()?,
            },
            17 => Record::SetMemo {
                slot: d.u32()?,
                tag: d.u32()?,
                memo: d.string(MAX_MEMO)?,
            },
            15 => Record::ZeroException {
                slot: d.u32()?,
                chunk: d.u64()?,
                node: d.u32()?,
            },
            other => return Err(DecodeError::UnknownRecord(other)),
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
