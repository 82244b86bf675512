//! Ceph RBD images as snapmv engine storage: [`RbdStorage`] implements the engine's
//! [`Storage`](snapmv_engine::Storage) trait on an image opened through librbd, and owns the
//! image through RBD's exclusive lock so that two live daemons can never both write it.
//!
//! # Binding
//!
//! A hand-written FFI module (`ffi.rs`, ~20 functions of `librados.h`/`librbd.h`) linked by
//! `build.rs` (`cargo:rustc-link-lib=rbd`, `rados`), not a crates.io binding: the RBD bindings
//! there (`librbd-sys` 0.1.0 of 2016, `ceph-rbd` 0.3.2 of 2019 with bindgen 0.47, whose
//! docs.rs build fails) are unmaintained and lack the lock API (`rbd_lock_acquire`,
//! `rbd_lock_break`, `rbd_lock_get_owners`) that fencing needs; the maintained Ceph crates
//! (`ceph`/ceph-rust, `librados`) cover librados only. The calls used are stable C API of
//! Ceph 12 and later; Debian 12 ships 16.2.15.
//!
//! The build script links librbd only when it finds `librbd.so` and `librados.so`
//! (`librbd-dev`, `librados-dev`); without them the crate still builds, [`AVAILABLE`] is false
//! and [`RbdStorage::open`] fails with [`RbdError::NotBuilt`]. Feature `librbd` makes the
//! libraries mandatory (a build without them fails); `SNAPMV_RBD=0` builds without them.
//!
//! # Crash contract
//!
//! librbd's writeback cache lives in the process that opened the image: a killed daemon loses
//! what it holds. Images are therefore opened with `rbd_cache=false` (set on the rados client
//! before it connects, after the configuration file and the locator's options, and checked on
//! the opened image with `rbd_config_image_list`, which also sees per-pool and per-image
//! overrides). A completed [`write_at`](snapmv_engine::Storage::write_at) has then been
//! acknowledged by the OSDs that hold the object: it survives the daemon's death and the host's
//! crash alike. [`sync`](snapmv_engine::Storage::sync) is `rbd_flush`, kept for the contract
//! (it has nothing left to write back with the cache off). Hence
//! [`boot_id`](snapmv_engine::Storage::boot_id) is a constant per image, [`image_boot_id`]
//! of the RBD image id, not the host's boot id: nothing that completed can be lost, so every
//! reader is in the writer's "boot", on any host and after any reboot (see the `Storage`
//! implementation of `RbdStorage`).
//!
//! # Ownership and fencing
//!
//! [`RbdStorage::open`] takes the image's exclusive lock in `RBD_LOCK_MODE_EXCLUSIVE`, in which
//! the owner refuses to hand the lock over: a second live opener fails at once with
//! [`RbdError::Locked`] (librbd's `-EROFS`). [`RbdStorage::open_takeover`] is the explicit
//! takeover from an owner believed dead: it breaks the lock, which blocklists the old owner's
//! client instance first (`rbd_blocklist_on_break_lock`, forced to true), then acquires it. A
//! blocklisted owner that was only hung can no longer write: its I/O fails with
//! [`RbdError::Fenced`] (`-ESHUTDOWN`), and it must stop serving. [`RbdStorage::release`] hands
//! the lock over gracefully (live migration's switch-over): nobody is fenced, and the releasing
//! handle's later writes fail with [`RbdError::NotOwner`]. See docs/ceph.md.

mod locator;
pub use locator::{is_rbd_locator, Locator, LocatorError};

#[cfg(snapmv_librbd)]
mod ffi;
#[cfg(snapmv_librbd)]
mod image;
#[cfg(not(snapmv_librbd))]
mod unlinked;

#[cfg(snapmv_librbd)]
pub use image::{identify, lock_owners_of, RbdStorage};
#[cfg(not(snapmv_librbd))]
pub use unlinked::{identify, lock_owners_of, RbdStorage};

use std::io;

/// Who an image is, independently of how a locator spells it: the cluster, the pool, the
/// namespace and the image. Two locators name the same image exactly when their identities
/// are equal (a renamed image keeps its id; a re-created one gets a new one).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ImageIdentity {
    /// The cluster's fsid.
    pub fsid: String,
    /// The pool's id.
    pub pool_id: i64,
    /// The RBD namespace ("" for none).
    pub namespace: String,
    /// The RBD image id.
    pub image_id: String,
}

/// Whether this build links librbd (see the crate docs); when false, every open fails with
/// [`RbdError::NotBuilt`].
pub const AVAILABLE: bool = cfg!(snapmv_librbd);

/// Why opening or using an RBD image failed. Returned inside an [`io::Error`] (see
/// [`rbd_error`]) whose message names the image and the cause.
#[derive(Debug, thiserror::Error)]
pub enum RbdError {
    /// The locator is malformed.
    #[error(transparent)]
    Locator(#[from] LocatorError),
    /// This build has no librbd.
    #[error(
        "{image}: this build of snapmv has no RBD support (librbd-dev and librados-dev were \
         not found when it was built): install them and rebuild"
    )]
    NotBuilt {
        /// The image, `rbd:POOL/IMAGE`.
        image: String,
    },
    /// A librados/librbd call failed.
    #[error("{image}: {what}")]
    Ceph {
        /// The image, `rbd:POOL/IMAGE`.
        image: String,
        /// What was being done, with the details that locate the cause.
        what: String,
        /// The errno librados or librbd returned.
        #[source]
        source: io::Error,
    },
    /// Another client instance holds the image's exclusive lock.
    #[error(
        "{image} is locked by another owner ({}): another live snapmv serves it, or one that \
         died less than ~30 s ago (until the OSD times out its watch); if that owner is \
         dead, take the image over explicitly (it is then fenced)",
        if owners.is_empty() { "owner unknown".to_string() } else { owners.join(", ") }
    )]
    Locked {
        /// The image, `rbd:POOL/IMAGE`.
        image: String,
        /// The lock owners' client addresses as librbd reports them.
        owners: Vec<String>,
    },
    /// The image cannot be owned exclusively.
    #[error(
        "{image} lacks the exclusive-lock feature, so its ownership cannot be fenced: \
         `rbd feature enable {} exclusive-lock`",
        image.trim_start_matches("rbd:")
    )]
    NoExclusiveLock {
        /// The image, `rbd:POOL/IMAGE`.
        image: String,
    },
    /// librbd's in-process cache is on for this image (a pool or image override).
    #[error(
        "{image}: librbd's cache is on (rbd_cache={value}, from the {origin} configuration): a \
         killed daemon would lose acknowledged writes; remove the override (`rbd config \
         {origin} remove … rbd_cache`)"
    )]
    CacheOn {
        /// The image, `rbd:POOL/IMAGE`.
        image: String,
        /// The effective value.
        value: String,
        /// Where it comes from: `client`, `pool` or `image`.
        origin: &'static str,
    },
    /// This client instance was blocklisted: the image was taken over and this handle is
    /// fenced. Stop serving the image; do not retry or reconnect on your own.
    #[error(
        "{image}: {op} refused: this client was blocklisted, i.e. the image was taken over by \
         another owner and this handle is fenced (stop serving it)"
    )]
    Fenced {
        /// The image, `rbd:POOL/IMAGE`.
        image: String,
        /// The operation, with offset and length.
        op: String,
    },
    /// This handle does not own the exclusive lock any more (it released it, or another
    /// owner holds it).
    #[error(
        "{image}: {op} refused: this handle does not own the image's exclusive lock (released, \
         or held by another owner)"
    )]
    NotOwner {
        /// The image, `rbd:POOL/IMAGE`.
        image: String,
        /// The operation, with offset and length.
        op: String,
    },
}

impl RbdError {
    /// As an [`io::Error`] of a fitting kind, carrying `self` (see [`rbd_error`]).
    pub fn into_io(self) -> io::Error {
        let kind = match &self {
            RbdError::Locator(_) => io::ErrorKind::InvalidInput,
            RbdError::NotBuilt { .. } | RbdError::NoExclusiveLock { .. } => {
                io::ErrorKind::Unsupported
            }
            RbdError::Ceph { source, .. } => source.kind(),
            RbdError::Locked { .. } => io::ErrorKind::ResourceBusy,
            RbdError::CacheOn { .. } => io::ErrorKind::InvalidInput,
            RbdError::Fenced { .. } => io::ErrorKind::ConnectionAborted,
            RbdError::NotOwner { .. } => io::ErrorKind::ReadOnlyFilesystem,
        };
        io::Error::new(kind, self)
    }
}

impl From<RbdError> for io::Error {
    fn from(e: RbdError) -> io::Error {
        e.into_io()
    }
}

/// The [`RbdError`] inside an error of this crate, if any.
pub fn rbd_error(e: &io::Error) -> Option<&RbdError> {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<RbdError>())
}

/// Whether `e` says this client was fenced (blocklisted): ownership is lost for good.
pub fn is_fenced(e: &io::Error) -> bool {
    matches!(rbd_error(e), Some(RbdError::Fenced { .. }))
}

/// A constant [`BootId`](snapmv_engine::BootId) for an image: FNV-1a over `snapmv-rbd:` and the
/// image id, in two halves; never all zeros (which means "unknown" to the engine).
pub fn image_boot_id(image_id: &str) -> snapmv_engine::BootId {
    fn fnv(seed: &[u8], data: &[u8]) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in seed.iter().chain(data) {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        h
    }
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&fnv(b"snapmv-rbd:0:", image_id.as_bytes()).to_le_bytes());
    id[8..].copy_from_slice(&fnv(b"snapmv-rbd:1:", image_id.as_bytes()).to_le_bytes());
    if id == [0; 16] {
        id[0] = 1;
    }
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_id_is_constant_per_image_and_differs_between_images() {
        let a = image_boot_id("10a26b8b4567");
        assert_eq!(a, image_boot_id("10a26b8b4567"));
        assert_ne!(a, image_boot_id("10a26b8b4568"));
        assert_ne!(a, [0; 16]);
        assert_ne!(a, snapmv_engine::current_boot_id());
        // Persisted in superblocks: the function must never change (FNV-1a 64, checked
        // against an independent implementation).
        assert_eq!(
            a,
            [177, 102, 251, 188, 198, 121, 71, 107, 108, 206, 5, 206, 158, 87, 65, 0]
        );
    }

    #[test]
    fn errors_have_kinds_and_are_found_again() {
        let e = RbdError::Locked {
            image: "rbd:p/i".into(),
            owners: vec!["127.0.0.1:0/42".into()],
        }
        .into_io();
        assert_eq!(e.kind(), io::ErrorKind::ResourceBusy);
        assert!(e
            .to_string()
            .contains("rbd:p/i is locked by another owner (127.0.0.1:0/42)"));
        assert!(matches!(rbd_error(&e), Some(RbdError::Locked { .. })));
        let f = RbdError::Fenced {
            image: "rbd:p/i".into(),
            op: "writing 4096 bytes at 0".into(),
        }
        .into_io();
        assert!(is_fenced(&f) && !is_fenced(&e));
        assert!(f.to_string().contains("blocklisted"), "{f}");
        let n = RbdError::NoExclusiveLock {
            image: "rbd:p/i".into(),
        };
        assert!(
            n.to_string()
                .contains("rbd feature enable p/i exclusive-lock"),
            "{n}"
        );
    }
}
