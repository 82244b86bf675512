//! Reading a store back: the superblock, then the checkpoint plus the journal's trusted
//! batches, into a [`MetaState`]. Used by `Store::open` and by `check`, which reads only
//! through here.

use crate::error::{Error, Result};
use crate::meta::MetaState;
use crate::ondisk::{self, Superblock, BATCH_HEADER, JOURNAL_ALIGN, SB_SLOT};
use crate::storage::Storage;

pub(crate) fn io_err(store: &str, what: &str, e: std::io::Error) -> Error {
    Error::io(format!("COW store {store}: {what}"), e)
}

pub(crate) fn corrupt(store: &str, what: impl Into<String>) -> Error {
    Error::Corrupt {
        store: store.to_string(),
        what: what.into(),
    }
}

/// Reads and validates the current superblock.
pub(crate) fn read_superblock(storage: &dyn Storage) -> Result<Superblock> {
    let name = storage.name().to_string();
    let mut best: Option<Superblock> = None;
    let mut errors = Vec::new();
    for slot in 0..2u64 {
        let mut buf = vec![0u8; SB_SLOT as usize];
        storage
            .read_at(&mut buf, slot * SB_SLOT)
            .map_err(|e| io_err(&name, "reading the superblock", e))?;
        match Superblock::decode(&buf) {
            Ok(sb) => {
                if best.is_none_or(|b| sb.generation > b.generation) {
                    best = Some(sb);
                }
            }
            Err(e) => errors.push(format!(
                "superblock slot {slot} at byte {}: {e}",
                slot * SB_SLOT
            )),
        }
    }
    let sb = best.ok_or_else(|| corrupt(&name, errors.join("; ")))?;
    let len = storage
        .len()
        .map_err(|e| io_err(&name, "reading its size", e))?;
    let end = sb.layout.data_off + sb.layout.data_chunks * sb.layout.chunk_size as u64;
    if len < end {
        return Err(corrupt(
            &name,
            format!("it is {len} bytes but its superblock describes {end} bytes (truncated?)"),
        ));
    }
    Ok(sb)
}

/// What replaying a journal found.
pub(crate) struct Replay {
    pub meta: MetaState,
    /// Where the next batch goes, and its sequence number.
    pub pos: u64,
    pub seq: u64,
}

/// Loads the metadata: checkpoint plus journal replay.
///
/// Every valid batch of the pass is replayed when the store is read in the boot that wrote
/// the pass (a killed process leaves its writes in the page cache). After a reboot only the
/// batches some batch vouches for are (see [`ondisk::encode_batch`]): the rest may name
/// data that never reached the media.
pub(crate) fn load_meta(storage: &dyn Storage, sb: &Superblock) -> Result<Replay> {
    let name = storage.name().to_string();
    let l = &sb.layout;
    let mut ck = vec![0u8; sb.ckpt_len as usize];
    storage
        .read_at(&mut ck, l.ckpt_area(sb.ckpt_slot))
        .map_err(|e| io_err(&name, "reading the checkpoint", e))?;
    if crc32c::crc32c(&ck) != sb.ckpt_crc {
        return Err(corrupt(
            &name,
            format!(
                "checkpoint in area {} at byte {} fails its checksum",
                sb.ckpt_slot,
                l.ckpt_area(sb.ckpt_slot)
            ),
        ));
    }
    let mut meta = ondisk::decode_checkpoint(&ck, l.chunk_size).map_err(|e| {
        corrupt(
            &name,
            format!("checkpoint at byte {}: {e}", l.ckpt_area(sb.ckpt_slot)),
        )
    })?;
    if meta.data_chunks != l.data_chunks {
        return Err(corrupt(
            &name,
            "checkpoint and superblock disagree on the number of chunks",
        ));
    }
    let same_boot = sb.boot != [0; 16] && sb.boot == storage.boot_id();
    // Read the batches of this pass, in sequence, until the first that is not one.
    let mut batches = Vec::new();
    let mut pos = 0u64;
    let mut seq = sb.journal_seq;
    let mut head = vec![0u8; BATCH_HEADER];
    let mut vouched: i128 = sb.journal_seq as i128 - 1;
    while pos + BATCH_HEADER as u64 <= l.journal_size {
        storage
            .read_at(&mut head, l.journal_off + pos)
            .map_err(|e| io_err(&name, "reading the journal", e))?;
        let Some(h) = ondisk::decode_batch_header(&head) else {
            break;
        };
        if h.gen != sb.journal_gen || h.seq != seq {
            break;
        }
        let total =
            (BATCH_HEADER as u64 + h.payload_len as u64).div_ceil(JOURNAL_ALIGN) * JOURNAL_ALIGN;
        if pos + total > l.journal_size {
            break;
        }
        let mut payload = vec![0u8; h.payload_len as usize];
        storage
            .read_at(&mut payload, l.journal_off + pos + BATCH_HEADER as u64)
            .map_err(|e| io_err(&name, "reading the journal", e))?;
        let Some(records) = ondisk::decode_batch_payload(&head, &payload, &h) else {
            break;
        };
        vouched = vouched.max(h.vouched_upto());
        batches.push((pos, seq, records));
        pos += total;
        seq += 1;
    }
    // A batch is trusted if it was written in this boot, or if a later one vouches for it.
    let trusted = if same_boot {
        batches.len()
    } else {
        batches
            .iter()
            .take_while(|(_, s, _)| (*s as i128) <= vouched)
            .count()
    };
    let dropped = (batches.len() - trusted) as u64;
    for (at, s, records) in &batches[..trusted] {
        for r in records {
            meta.apply(r).map_err(|e| {
                corrupt(
                    &name,
                    format!("journal batch {s} at byte {}: {e}", l.journal_off + at),
                )
            })?;
        }
    }
    // A valid batch of this pass after the stop that vouches for the stopped one means a
    // damaged batch in the middle (an unvouched one may follow a lost one after a power cut).
    if let Some((at, later)) = later_batch(storage, sb, pos, seq)? {
        if same_boot || later.vouched_upto() >= seq as i128 {
            return Err(corrupt(
                &name,
                format!(
                    "journal batch {seq} at byte {} is damaged but a later batch follows at byte {}",
                    l.journal_off + pos,
                    l.journal_off + at
                ),
            ));
        }
    }
    if dropped > 0 {
        log::warn!(
            "COW store {name}: {dropped} journal batch(es) written before a reboot were never \
             synced and are not replayed (writes that were not flushed)"
        );
    }
    let (pos, seq) = match batches.get(trusted) {
        Some((at, s, _)) => (*at, *s),
        None => (pos, seq),
    };
    Ok(Replay { meta, pos, seq })
}

/// Looks for a valid batch of the current pass with a sequence number above `seq`, after `pos`.
fn later_batch(
    storage: &dyn Storage,
    sb: &Superblock,
    pos: u64,
    seq: u64,
) -> Result<Option<(u64, ondisk::BatchHeader)>> {
    let l = &sb.layout;
    let name = storage.name().to_string();
    const WINDOW: u64 = 1 << 20;
    let mut at = pos + JOURNAL_ALIGN;
    while at + BATCH_HEADER as u64 <= l.journal_size {
        let len = WINDOW.min(l.journal_size - at) as usize;
        let mut buf = vec![0u8; len];
        storage
            .read_at(&mut buf, l.journal_off + at)
            .map_err(|e| io_err(&name, "reading the journal", e))?;
        for off in (0..len).step_by(JOURNAL_ALIGN as usize) {
            let Some(h) = ondisk::decode_batch_header(&buf[off..]) else {
                continue;
            };
            if h.gen != sb.journal_gen || h.seq <= seq {
                continue;
            }
            let p = at + off as u64;
            if p + BATCH_HEADER as u64 + h.payload_len as u64 > l.journal_size {
                continue;
            }
            let mut payload = vec![0u8; h.payload_len as usize];
            storage
                .read_at(&mut payload, l.journal_off + p + BATCH_HEADER as u64)
                .map_err(|e| io_err(&name, "reading the journal", e))?;
            if ondisk::decode_batch_payload(&buf[off..], &payload, &h).is_some() {
                return Ok(Some((p, h)));
            }
        }
        at += len as u64;
    }
    Ok(None)
}
