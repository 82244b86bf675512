use super::superblock::LayoutError;
use super::*;

#[test]
fn layout_rejects_bad_chunk_sizes_and_tiny_stores() {
    assert!(Layout::compute(1 << 30, 3000).is_err());
    assert!(Layout::compute(1 << 30, 2 << 20).is_err());
    assert!(Layout::compute(1 << 20, 4096).is_err());
    assert_eq!(
        Layout::compute(1 << 30, 3000),
        Err(LayoutError::ChunkSize(3000))
    );
    assert!(matches!(
        Layout::compute(1 << 20, 4096),
        Err(LayoutError::TooSmall {
            size: 1048576,
            chunk_size: 4096,
            ..
        })
    ));
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
    let e = Superblock::decode(&b).unwrap_err();
    assert_eq!(e, DecodeError::Checksum);
    assert!(e.to_string().contains("checksum"));
    b[0] = b'X';
    let e = Superblock::decode(&b).unwrap_err();
    assert_eq!(e, DecodeError::NotAStore);
    assert!(e.to_string().contains("magic"));
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
        Record::SetMemo {
            slot: 0,
            tag: 2,
            memo: "é memo".into(),
        },
        Record::ZeroException {
            slot: 0,
            chunk: 7,
            node: 2,
        },
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
fn zero_exceptions_hold_no_chunk_and_replace_data() {
    use crate::meta::{bit_get, NodeKind, NodeMeta, ZERO_CHUNK};
    let mut m = MetaState::new(4096, 64);
    m.apply(&Record::BindOrigin {
        slot: 0,
        id: "/o".into(),
        size: 16 * 4096,
    })
    .unwrap();
    for (node, kind, parent, seq) in [(1, NodeKind::Chain, 0, 1), (2, NodeKind::Leaf, 1, 0)] {
        m.apply(&Record::NewNode {
            slot: 0,
            node,
            meta: NodeMeta {
                kind,
                dead: false,
                parent,
                seq,
                tag: if kind == NodeKind::Leaf { 1 } else { 0 },
                parent_tag: 0,
                birth: 0,
                memo: String::new(),
            },
        })
        .unwrap();
    }
    // A leaf's data chunk replaced by zeros: the chunk is freed, nothing else allocated.
    let add = |chunk, store| Record::AddException {
        slot: 0,
        chunk,
        node: 2,
        store,
    };
    m.apply(&add(3, 5)).unwrap();
    m.apply(&Record::ZeroException {
        slot: 0,
        chunk: 3,
        node: 2,
    })
    .unwrap();
    m.apply(&Record::ZeroException {
        slot: 0,
        chunk: 4,
        node: 1,
    })
    .unwrap();
    assert!(!bit_get(&m.alloc, 5));
    assert_eq!(m.origins[&0].exceptions[&3], vec![(2, ZERO_CHUNK)]);
    assert!(m.validate().is_empty(), "{:?}", m.validate());
    let ck = encode_checkpoint(&m);
    assert_eq!(decode_checkpoint(&ck, 4096).unwrap(), m);
    // A write over it takes a data chunk again; freeing a zero exception frees nothing.
    m.apply(&add(3, 6)).unwrap();
    assert!(bit_get(&m.alloc, 6));
    assert!(
        m.apply(&add(3, 7)).is_err(),
        "two data exceptions of one node"
    );
    m.apply(&Record::FreeException {
        slot: 0,
        chunk: 4,
        node: 1,
    })
    .unwrap();
    assert!(m.validate().is_empty(), "{:?}", m.validate());
    assert_eq!(m.rebuild_alloc(), 0);
    // Out of range: the origin node, or a chunk past the end.
    for (chunk, node) in [(3, 0), (16, 2)] {
        assert!(m
            .apply(&Record::ZeroException {
                slot: 0,
                chunk,
                node,
            })
            .is_err());
    }
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
