//! The ownership API on a test cluster's images (skipped loudly without one unless
//! `SNAPMV_RBD_TESTS=1`): refusal while owned, graceful release (live migration's
//! switch-over) without fencing, the released owner told it lost the image, and takeover.

#[path = "../../../crates/storage-rbd/tests/common/mod.rs"]
mod rbd_cluster;

use super::*;
use rbd_cluster::{cluster, Image};

const RW: OpenMode = OpenMode {
    direct: false,
    readonly: false,
};

#[test]
fn release_hands_over_without_fencing_and_takeover_fences() {
    let Some(c) = cluster("ownership::release_hands_over") else {
        return;
    };
    let img = Image::create(c, "own", "8M", &[]);
    let loc = img.locator();
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a, b) = (Ownership::new(da.path()), Ownership::new(db.path()));
    let sa = a.open("COW store", &loc, RW, Acquire::Open).unwrap();
    sa.write_at(b"from a", 0).unwrap();
    // Refused while A owns it, naming the image.
    match b.open("COW store", &loc, RW, Acquire::Open) {
        Err(MethodError::InUse { path, holder, .. }) => {
            assert_eq!(path, loc);
            assert!(holder.contains("RBD client"), "{holder}");
        }
        other => panic!("not refused as in use: {other:?}"),
    }
    // A hands it over; B opens it without breaking anything.
    a.release(&loc).unwrap();
    let sb = b.open("COW store", &loc, RW, Acquire::Open).unwrap();
    let mut buf = [0u8; 6];
    sb.read_at(&mut buf, 0).unwrap();
    assert_eq!(&buf, b"from a");
    sb.write_at(b"from b", 0).unwrap();
    assert!(!c.blocklist().contains(sa_address(&a, &loc).as_str()));
    // A's later write fails, and A knows it lost the image.
    assert!(sa.write_at(b"late a", 0).is_err());
    let why = a.lost(&loc).expect("A records the loss");
    assert!(why.contains("does not own"), "{why}");
    assert!(b.lost(&loc).is_none());
    // A takes it back by force: B is fenced (blocklisted), its writes fail, B records why.
    let b_addr = sa_address(&b, &loc);
    drop(sa);
    let sa2 = a.open("COW store", &loc, RW, Acquire::Takeover).unwrap();
    assert!(a.lost(&loc).is_none(), "a new open clears the loss");
    assert!(
        c.blocklist().contains(b_addr.as_str()),
        "{b_addr} not blocklisted"
    );
    assert!(sb.write_at(b"late b", 0).is_err());
    assert!(b
        .lost(&loc)
        .expect("B records the fence")
        .contains("blocklisted"));
    sa2.read_at(&mut buf, 0).unwrap();
    assert_eq!(&buf, b"from b");
    // Both recorded their owning client in their state directory.
    for d in [&da, &db] {
        let text = std::fs::read_to_string(d.path().join(OWNERS_FILE)).unwrap();
        assert!(text.contains(&loc), "{text}");
    }
}

/// The client address of the handle `o` has open on `loc`.
fn sa_address(o: &Ownership, loc: &str) -> String {
    o.images
        .lock()
        .unwrap()
        .get(loc)
        .and_then(Weak::upgrade)
        .map(|h| h.image.client_address().to_string())
        .expect("open here")
}
