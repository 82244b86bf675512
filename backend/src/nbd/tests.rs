//! Unit tests of the wire checks and the block-status descriptors.

use super::proto::*;
use super::transmission::changed_extents;

#[test]
fn requests_parse_and_check() {
    let mut h = [0u8; 28];
    h[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    h[6..8].copy_from_slice(&CMD_READ.to_be_bytes());
    h[16..24].copy_from_slice(&4096u64.to_be_bytes());
    h[24..28].copy_from_slice(&512u32.to_be_bytes());
    let r = parse_request(&h).unwrap();
    assert_eq!((r.kind, r.offset, r.length), (CMD_READ, 4096, 512));
    assert_eq!(check_request(&r, 8192, true), Ok(()));
    assert_eq!(check_request(&r, 4096, true), Err(EINVAL), "past the end");
    let w = Request {
        kind: CMD_WRITE,
        ..r
    };
    assert_eq!(check_request(&w, 8192, true), Err(EPERM));
    let big = Request {
        length: MAX_REQUEST + 512,
        offset: 0,
        ..r
    };
    assert_eq!(check_request(&big, u64::MAX, false), Err(EOVERFLOW));
    let wrap = Request {
        offset: u64::MAX - 100,
        ..r
    };
    assert_eq!(check_request(&wrap, u64::MAX, false), Err(EINVAL));
    h[0] ^= 1;
    assert!(parse_request(&h).is_err());
}

#[test]
fn changed_descriptors() {
    let ch = [(4096, 4096), (16384, 8192)];
    assert_eq!(
        changed_extents(&ch, 0, 32768, false),
        vec![(4096, 0), (4096, 1), (8192, 0), (8192, 1), (8192, 0)]
    );
    assert_eq!(changed_extents(&ch, 0, 32768, true), vec![(4096, 0)]);
    assert_eq!(changed_extents(&ch, 5000, 100, false), vec![(100, 1)]);
    assert_eq!(changed_extents(&[], 0, 512, false), vec![(512, 0)]);
}
