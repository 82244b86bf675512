//! Where a store or an origin lives and who owns it. A "path" given over RPC or recorded in the
//! state is a local file (or block device) or an `rbd:POOL[/NS]/IMAGE[:opt=val…]` locator of a
//! Ceph RBD image. This module opens either as its one owner, tells what object a path names
//! (its identity), and holds the RBD ownership API: acquire (open), take over from a dead
//! owner (fencing it), release (a graceful hand-over), and noticing that this daemon was fenced.
//!
//! Local files are owned through the engine's exclusive `flock` (`FileStorage::open_with`);
//! RBD images through their exclusive lock in `RBD_LOCK_MODE_EXCLUSIVE` (snapmv-storage-rbd).
//!
//! A daemon killed with SIGKILL leaves its images locked by its dead client instances until
//! Ceph times their watches out (~30 s each, one image after the other at restart). So each
//! image's owning client address is recorded in `STATE_DIR/rbd-owners`, with this host's
//! machine id; at the next start on the same host a lock still held by exactly that address
//! is taken over at once. That is safe: this daemon holds the state directory's lock, which
//! the recording daemon held until it died, so that client instance is dead (and it is
//! blocklisted all the same). The machine id keeps a state directory copied to, or shared
//! with, another host from taking a live daemon's images over without an explicit takeover.

use std::collections::HashMap;
use std::io::{self, IoSlice, IoSliceMut};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};

use log::{error, info, warn};
use snapmv_engine::{BootId, FileStorage, OpenMode, Storage};
use snapmv_storage_rbd::{self as rbd, ImageIdentity, RbdError, RbdStorage};

use super::error::{MResult, MethodError};

/// What a path or locator names, independently of its spelling.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum ObjectId {
    /// A local file or block device: device and inode.
    File(u64, u64),
    /// An RBD image: cluster fsid, pool id, namespace, image id.
    Rbd(ImageIdentity),
}

/// Whether `s` is an `rbd:` locator rather than a local path.
pub(crate) fn is_rbd(s: &str) -> bool {
    rbd::is_rbd_locator(s)
}

/// The identity of the object `loc` names now, if it can be found (a file that exists; an
/// image that exists in a reachable cluster).
pub(crate) fn object_id(loc: &str) -> Option<ObjectId> {
    if is_rbd(loc) {
        return rbd::identify(loc).ok().map(ObjectId::Rbd);
    }
    std::fs::metadata(loc)
        .ok()
        .map(|m| ObjectId::File(m.dev(), m.ino()))
}

/// The identity of image `loc` for a parameter check: a malformed locator is an invalid
/// parameter, a missing image is not found.
pub(crate) fn rbd_identity(what: &str, loc: &str) -> MResult<ImageIdentity> {
    rbd::identify(loc).map_err(|e| match rbd::rbd_error(&e) {
        Some(RbdError::Locator(l)) => MethodError::InvalidParams(format!("{what} {loc}: {l}")),
        Some(RbdError::Ceph { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
            MethodError::NotFound(format!("{what} {e}"))
        }
        _ => MethodError::Open {
            what: format!("{what} cannot be identified"),
            source: e,
        },
    })
}

/// How to become an image's owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Acquire {
    /// Take the lock; refused at once if a live owner holds it (a dead owner's lock is broken
    /// by librbd once the OSD has timed out its watch, ~30 s).
    Open,
    /// Break the current owner's lock, blocklisting (fencing) it, then take it: the explicit
    /// takeover from a daemon believed dead (`snapmv create … --takeover`).
    Takeover,
}

/// The RBD images this daemon owns, and those it lost to a fence or a takeover.
#[derive(Debug)]
pub(crate) struct Ownership {
    images: Mutex<HashMap<String, Weak<OwnedImage>>>,
    lost: Arc<Mutex<HashMap<String, String>>>,
    /// `STATE_DIR/rbd-owners`, and what it holds: the client address that owns each image
    /// (by locator), as this daemon or its previous incarnation opened it.
    owners_file: PathBuf,
    owners: Mutex<HashMap<String, Owner>>,
    /// This host's `/etc/machine-id` (empty if unknown: then nothing recorded is trusted).
    machine: String,
}

/// Who owned an image, as `STATE_DIR/rbd-owners` records it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Owner {
    /// The owning client instance's address.
    client: String,
    /// The machine id of the host it ran on.
    machine: String,
}

/// The file of the state directory recording which client address owns each image.
const OWNERS_FILE: &str = "rbd-owners";

impl Ownership {
    /// The ownership of a daemon whose state directory (locked by it) is `state_dir`.
    pub(crate) fn new(state_dir: &Path) -> Ownership {
        let owners_file = state_dir.join(OWNERS_FILE);
        let owners = match std::fs::read(&owners_file) {
            Ok(b) => serde_json::from_slice(&b).unwrap_or_else(|e| {
                warn!("ignoring {}: {e}", owners_file.display());
                HashMap::new()
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => HashMap::new(),
            Err(e) => {
                warn!("ignoring {}: {e}", owners_file.display());
                HashMap::new()
            }
        };
        Ownership {
            images: Mutex::new(HashMap::new()),
            lost: Arc::new(Mutex::new(HashMap::new())),
            owners_file,
            owners: Mutex::new(owners),
            machine: std::fs::read_to_string("/etc/machine-id")
                .map(|m| m.trim().to_string())
                .unwrap_or_default(),
        }
    }

    /// Whether image `loc` is locked by exactly the client address this state directory
    /// recorded for it: a previous incarnation of this daemon, dead since we hold the
    /// state directory's lock.
    fn held_by_previous_incarnation(&self, loc: &str) -> Option<String> {
        let recorded = self
            .owners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(loc)
            .cloned()?;
        if self.machine.is_empty() || recorded.machine != self.machine {
            return None;
        }
        // Never one of this process's own live handles (the same image by another name).
        let live = self
            .images
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .filter_map(Weak::upgrade)
            .any(|h| h.image.client_address() == recorded.client);
        if live {
            return None;
        }
        let owners = rbd::lock_owners_of(loc).ok()?;
        (!owners.is_empty() && owners.iter().all(|o| *o == recorded.client))
            .then_some(recorded.client)
    }

    /// Records (durably) that `addr` owns image `loc` now.
    fn record_owner(&self, loc: &str, addr: &str) {
        let mut owners = self.owners.lock().unwrap_or_else(|e| e.into_inner());
        owners.insert(
            loc.to_string(),
            Owner {
                client: addr.to_string(),
                machine: self.machine.clone(),
            },
        );
        let tmp = self.owners_file.with_extension("tmp");
        let written = serde_json::to_vec_pretty(&*owners)
            .map_err(io::Error::other)
            .and_then(|b| {
                let mut f = std::fs::File::create(&tmp)?;
                io::Write::write_all(&mut f, &b)?;
                f.sync_all()
            })
            .and_then(|()| std::fs::rename(&tmp, &self.owners_file));
        if let Err(e) = written {
            // Only the next start's wait depends on it: ~30 s per image instead of none.
            warn!(
                "cannot record the owner of {loc} in {}: {e}",
                self.owners_file.display()
            );
        }
    }

    /// Opens the store or origin at `loc` (`what` names its role for errors) as its owner.
    pub(crate) fn open(
        &self,
        what: &str,
        loc: &str,
        mode: OpenMode,
        how: Acquire,
    ) -> MResult<Arc<dyn Storage>> {
        if !is_rbd(loc) {
            if how == Acquire::Takeover {
                return Err(MethodError::InvalidParams(format!(
                    "{what} {loc} is a local file: takeover applies to rbd: images (a local \
                     file's owner is the process holding its lock)"
                )));
            }
            return open_file(what, loc, mode).map(|s| s as Arc<dyn Storage>);
        }
        let how = match how {
            Acquire::Open => match self.held_by_previous_incarnation(loc) {
                Some(addr) => {
                    info!(
                        "{what} {loc} is still locked by {addr}, this daemon's previous (dead) \
                         incarnation: taking it over"
                    );
                    Acquire::Takeover
                }
                None => Acquire::Open,
            },
            Acquire::Takeover => Acquire::Takeover,
        };
        let opened = match how {
            Acquire::Open => RbdStorage::open(loc),
            Acquire::Takeover => RbdStorage::open_takeover(loc),
        };
        let image = opened.map_err(|source| match rbd::rbd_error(&source) {
            Some(RbdError::Locked { owners, .. }) => MethodError::InUse {
                what: what.to_string(),
                path: loc.to_string(),
                holder: format!(
                    "RBD client {} (another snapmv daemon; if it is dead, take the image over \
                     with `snapmv create … --takeover`)",
                    if owners.is_empty() {
                        "unknown".to_string()
                    } else {
                        owners.join(", ")
                    }
                ),
                source,
            },
            _ => MethodError::Open {
                what: format!("{what} {loc} cannot be opened"),
                source,
            },
        })?;
        // (snapmv-storage-rbd logs each owner a takeover fenced.)
        if !image.client_address().is_empty() {
            self.record_owner(loc, image.client_address());
        }
        let owned = Arc::new(OwnedImage {
            image,
            locator: loc.to_string(),
            lost: self.lost.clone(),
        });
        let mut images = self.images.lock().unwrap_or_else(|e| e.into_inner());
        images.retain(|_, w| w.strong_count() > 0);
        images.insert(loc.to_string(), Arc::downgrade(&owned));
        self.lost
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(loc);
        Ok(owned)
    }

    /// Hands image `loc` over gracefully (live migration's switch-over): flushes and releases
    /// its lock, fencing nobody; this daemon's later writes to it fail. A local file, or an
    /// image not open here, has nothing to release.
    // The entry point of live migration's switch-over (issue 18 part 2); only tests call it
    // until that lands.
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) fn release(&self, loc: &str) -> MResult<()> {
        let image = self
            .images
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(loc)
            .and_then(Weak::upgrade);
        let Some(image) = image else {
            return Ok(());
        };
        image.image.release().map_err(|source| MethodError::Open {
            what: format!("cannot release RBD image {loc}"),
            source,
        })
    }

    /// Why this daemon lost image `loc` (fenced by a takeover, or its lock gone), if it did.
    pub(crate) fn lost(&self, loc: &str) -> Option<String> {
        self.lost
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(loc)
            .cloned()
    }
}

/// Opens a local store or origin file exclusively; a file another process holds is
/// [`MethodError::InUse`], naming the holder.
fn open_file(what: &str, path: &str, mode: OpenMode) -> MResult<Arc<FileStorage>> {
    FileStorage::open_with(Path::new(path), mode)
        .map(Arc::new)
        .map_err(|source| {
            if let Some(u) = snapmv_engine::in_use(&source) {
                return MethodError::InUse {
                    what: what.to_string(),
                    path: path.to_string(),
                    holder: u.holder.clone(),
                    source,
                };
            }
            let what = if mode.readonly {
                format!("{what} {path} cannot be opened for reading")
            } else {
                format!("{what} {path} cannot be opened for reading and writing")
            };
            MethodError::Open { what, source }
        })
}

/// An RBD image this daemon owns, as engine storage: every call goes to the image; an error
/// that says ownership is gone (blocklisted, or the lock no longer ours) is recorded once, so
/// the exports on it are reported FAILED. The error itself goes up as it is: the engine fails
/// the write (the guest gets EIO) and nothing is retried.
#[derive(Debug)]
struct OwnedImage {
    image: RbdStorage,
    locator: String,
    lost: Arc<Mutex<HashMap<String, String>>>,
}

impl OwnedImage {
    fn check<T>(&self, r: io::Result<T>) -> io::Result<T> {
        if let Err(e) = &r {
            if matches!(
                rbd::rbd_error(e),
                Some(RbdError::Fenced { .. } | RbdError::NotOwner { .. })
            ) {
                let mut lost = self.lost.lock().unwrap_or_else(|e| e.into_inner());
                if !lost.contains_key(&self.locator) {
                    error!("{e}; every export on it fails from now on");
                    lost.insert(self.locator.clone(), e.to_string());
                }
            }
        }
        r
    }
}

impl Storage for OwnedImage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.check(self.image.read_at(buf, offset))
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.check(self.image.write_at(buf, offset))
    }
    fn read_vectored_at(&self, bufs: &mut [IoSliceMut<'_>], offset: u64) -> io::Result<()> {
        self.check(self.image.read_vectored_at(bufs, offset))
    }
    fn write_vectored_at(&self, bufs: &[IoSlice<'_>], offset: u64) -> io::Result<()> {
        self.check(self.image.write_vectored_at(bufs, offset))
    }
    fn sync(&self) -> io::Result<()> {
        self.check(self.image.sync())
    }
    fn len(&self) -> io::Result<u64> {
        self.check(self.image.len())
    }
    fn name(&self) -> &str {
        self.image.name()
    }
    fn boot_id(&self) -> BootId {
        self.image.boot_id()
    }
}

#[cfg(test)]
#[path = "ownership_tests.rs"]
mod tests;
