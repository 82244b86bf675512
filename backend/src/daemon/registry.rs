//! The open stores and origins: opening them (exclusively), finding them, and looking up the
//! recorded exports and origins that name them.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::sync::Arc;

use log::warn;
use snapmv_engine::{OpenMode, Origin, Storage, Store, Volume};
use snapmv_rpc::methods as m;

use super::core::{Daemon, Inner};
use super::error::{MResult, MethodError};
pub(crate) use super::ownership::{object_id, Acquire, ObjectId};
use crate::state::{ExportRecord, OriginRecord};

/// How an origin is to be opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Access {
    /// Read-write: an export writes the origin.
    Write,
    /// Read-only: only read-only exports of the origin.
    ReadOnly,
    /// Read-write if the file allows it, else read-only (snapshot exports only).
    Any,
}

impl Daemon {
    /// The path under which the daemon already knows the object `fid` as a store, if it does
    /// under another name (a hard link or another path to the same file, another spelling of
    /// the same RBD image): stores are keyed by path, so one store must always go by one path.
    pub(crate) fn known_store_path(inner: &Inner, cow: String, fid: &ObjectId) -> String {
        inner
            .stores
            .keys()
            .chain(inner.state.stores.iter().map(|s| &s.path))
            .find(|known| **known != cow && object_id(known).as_ref() == Some(fid))
            .cloned()
            .unwrap_or(cow)
    }

    /// Opens (or finds open) store `cow`.
    pub(crate) fn store_for(&self, inner: &mut Inner, cow: &str, direct: bool) -> MResult<Store> {
        if let Some(s) = inner.stores.get(cow) {
            return Ok(s.clone());
        }
        let direct = inner.state.store(cow).map(|s| s.direct).unwrap_or(direct);
        self.open_store_as(inner, cow, direct, Acquire::Open)
    }

    /// Opens store `cow` (not open yet) as `how` says, and keeps it open.
    pub(crate) fn open_store_as(
        &self,
        inner: &mut Inner,
        cow: &str,
        direct: bool,
        how: Acquire,
    ) -> MResult<Store> {
        let storage = self.ownership.open(
            "COW store",
            cow,
            OpenMode {
                direct,
                readonly: false,
            },
            how,
        )?;
        let store = open_store(cow, storage)?;
        inner.stores.insert(cow.to_string(), store.clone());
        Ok(store)
    }

    /// Opens (or finds open) origin `origin_id` of store `cow`, which must be recorded.
    pub(crate) fn origin_for(
        &self,
        inner: &mut Inner,
        cow: &str,
        origin_id: &str,
        direct: bool,
    ) -> MResult<Origin> {
        let key = (cow.to_string(), origin_id.to_string());
        if let Some(o) = inner.origins.get(&key) {
            return Ok(o.clone());
        }
        let rec = inner.state.origin(cow, origin_id).cloned().ok_or_else(|| {
            MethodError::NotFound(format!(
                "origin id {origin_id} of COW store {cow} is not known to this daemon; give the origin's path"
            ))
        })?;
        let store = self.store_for(inner, cow, direct)?;
        // Read-write when an export of the origin itself writes it; read-only when only
        // read-only exports of the origin exist; else (snapshots only) read-write if the file
        // allows it, read-only if not (snapshot writes go to the store).
        let exports = inner
            .state
            .exports
            .iter()
            .filter(|e| e.cow == cow && e.origin_id == origin_id && e.tag.is_none());
        let access = if exports.clone().any(|e| !e.readonly) {
            Access::Write
        } else if exports.clone().any(|e| e.readonly) {
            Access::ReadOnly
        } else {
            Access::Any
        };
        let (storage, readonly) = self.open_origin(&rec.path, rec.direct, access, Acquire::Open)?;
        let origin = store
            .open_origin_storage(origin_id, storage)
            .map_err(MethodError::engine(format!(
                "cannot open origin {origin_id} ({}) in COW store {cow}",
                rec.path
            )))?;
        if readonly {
            inner.readonly_origins.insert(key.clone());
        } else {
            inner.readonly_origins.remove(&key);
        }
        inner.origins.insert(key, origin.clone());
        Ok(origin)
    }

    /// Opens an origin's file or image as `access` asks (and `how`, for an image); returns it
    /// and whether it is read-only. An RBD image is always opened for writing (its owner holds
    /// its lock either way); read-only exports of it are read-only at the export.
    pub(crate) fn open_origin(
        &self,
        path: &str,
        direct: bool,
        access: Access,
        how: Acquire,
    ) -> MResult<(Arc<dyn Storage>, bool)> {
        let open = |mode: OpenMode| self.ownership.open("origin", path, mode, how);
        let ro = OpenMode {
            direct,
            readonly: true,
        };
        let rw = OpenMode {
            direct,
            readonly: false,
        };
        match access {
            Access::ReadOnly => Ok((open(ro)?, true)),
            Access::Write => open(rw).map(|s| (s, false)).map_err(|e| match e {
                MethodError::Open { what, source }
                    if matches!(
                        source.kind(),
                        std::io::ErrorKind::PermissionDenied
                            | std::io::ErrorKind::ReadOnlyFilesystem
                    ) =>
                {
                    MethodError::Open {
                        what: format!("{what} (to serve it read-only, give -r)"),
                        source,
                    }
                }
                e => e,
            }),
            Access::Any => match open(rw) {
                Ok(s) => Ok((s, false)),
                Err(MethodError::Open { source, .. })
                    if matches!(
                        source.kind(),
                        std::io::ErrorKind::PermissionDenied
                            | std::io::ErrorKind::ReadOnlyFilesystem
                    ) =>
                {
                    Ok((open(ro)?, true))
                }
                Err(e) => Err(e),
            },
        }
    }

    pub(crate) fn volume_for(
        &self,
        inner: &mut Inner,
        cow: &str,
        origin_id: &str,
        tag: Option<u32>,
        direct: bool,
    ) -> MResult<Volume> {
        let origin = self.origin_for(inner, cow, origin_id, direct)?;
        match tag {
            None => Ok(origin.volume()),
            Some(t) => origin
                .snapshot_volume(t)
                .map_err(MethodError::engine(format!(
                    "cannot open snapshot {t} of origin {origin_id} in COW store {cow}"
                ))),
        }
    }

    pub(crate) fn find_export(&self, inner: &Inner, name: &str) -> MResult<ExportRecord> {
        m::validate_name("export name", name).map_err(MethodError::InvalidParams)?;
        inner
            .state
            .export(name)
            .cloned()
            .ok_or_else(|| MethodError::NotFound(format!("export {name} not found")))
    }

    /// The export `name`, which must serve an origin, and its open origin.
    pub(crate) fn origin_export(
        &self,
        inner: &mut Inner,
        name: &str,
        method: &str,
    ) -> MResult<(ExportRecord, Origin)> {
        let rec = self.find_export(inner, name)?;
        if let Some(t) = rec.tag {
            return Err(MethodError::InvalidState(format!(
                "export {name} serves snapshot {t}, not an origin; {method} needs the origin's export"
            )));
        }
        let origin = self.origin_of(inner, &rec)?;
        Ok((rec, origin))
    }

    /// Why export `rec` fails, if it does: it could not be restored, or this daemon lost its
    /// store's or origin's RBD image (fenced by a takeover, or its lock gone).
    pub(crate) fn export_failure(&self, inner: &Inner, rec: &ExportRecord) -> Option<String> {
        if let Some(why) = inner.failed.get(&rec.name) {
            return Some(why.clone());
        }
        let origin = inner
            .state
            .origin(&rec.cow, &rec.origin_id)
            .map(|o| &o.path);
        [Some(&rec.cow), origin]
            .into_iter()
            .flatten()
            .find_map(|loc| self.ownership.lost(loc))
            .map(|why| format!("ownership lost: {why}"))
    }

    pub(crate) fn origin_of(&self, inner: &mut Inner, rec: &ExportRecord) -> MResult<Origin> {
        if let Some(why) = self.export_failure(inner, rec) {
            return Err(MethodError::InvalidState(format!(
                "export {} is not being served: {why}",
                rec.name
            )));
        }
        self.origin_for(inner, &rec.cow, &rec.origin_id, false)
    }

    /// The origin behind export `name` (of the origin or of a snapshot); the lock is released
    /// when it returns, so long reads do not hold up other methods.
    pub(crate) fn any_origin(&self, name: &str) -> MResult<Origin> {
        let mut guard = self.lock();
        let inner = &mut *guard;
        let rec = self.find_export(inner, name)?;
        self.origin_of(inner, &rec)
    }

    /// Records an origin given by path for `snapshot_export` (not saved until an export uses it).
    pub(crate) fn remember_origin(
        &self,
        inner: &mut Inner,
        cow: &str,
        origin_id: &str,
        origin: &str,
        origin_fid: &ObjectId,
        direct: bool,
    ) -> MResult<()> {
        if let Some(o) = inner
            .state
            .origins
            .iter()
            .find(|o| object_id(&o.path).as_ref() == Some(origin_fid))
        {
            return Err(MethodError::AlreadyExists(format!(
                "origin {origin} is already known as origin id {} of COW store {}",
                o.origin_id, o.cow
            )));
        }
        inner.state.origins.push(OriginRecord {
            cow: cow.to_string(),
            origin_id: origin_id.to_string(),
            path: origin.to_string(),
            direct,
        });
        Ok(())
    }

    /// Drops an origin record nobody exports and that was only just remembered.
    pub(crate) fn forget_unused_origin(&self, inner: &mut Inner, cow: &str, origin_id: &str) {
        let used = inner
            .state
            .exports
            .iter()
            .any(|e| e.cow == cow && e.origin_id == origin_id);
        let opened = inner
            .origins
            .contains_key(&(cow.to_string(), origin_id.to_string()));
        if !used && !opened {
            inner
                .state
                .origins
                .retain(|o| !(o.cow == cow && o.origin_id == origin_id));
        }
    }
}

/// Opens the store on an opened file; a file with no snapmv superblock at all is named as
/// such rather than as damaged.
pub(crate) fn open_store(cow: &str, storage: Arc<dyn Storage>) -> MResult<Store> {
    let mut magic = [[0u8; 8]; 2];
    for (slot, m) in magic.iter_mut().enumerate() {
        let _ = storage.read_at(m, slot as u64 * 4096);
    }
    if magic.iter().all(|m| m != b"SNAPMVSB") {
        return Err(MethodError::NotAStore(format!(
            "COW store {cow} is not a snapmv store (no snapmv superblock); format it with `snapmv create NAME ORIGIN COW -b -f`"
        )));
    }
    Store::open_storage(storage)
        .map_err(MethodError::engine(format!("cannot open COW store {cow}")))
}

/// The size of the file or block device at `path` now (`None` for an RBD image: its size
/// is the engine's to read through the open handle).
pub(crate) fn current_size(path: &str) -> Option<u64> {
    if super::ownership::is_rbd(path) {
        return None;
    }
    let meta = std::fs::metadata(path).ok()?;
    if meta.file_type().is_block_device() {
        let rdev = meta.rdev();
        let sectors = std::fs::read_to_string(format!(
            "/sys/dev/block/{}:{}/size",
            rustix::fs::major(rdev),
            rustix::fs::minor(rdev)
        ))
        .ok()?;
        return sectors.trim().parse::<u64>().ok().map(|s| s * 512);
    }
    Some(meta.len())
}

/// Refuses an origin whose file no longer has the size it was bound with (reads past a
/// shrunk end would return zeros, writes would extend it).
pub(crate) fn check_origin_size(o: &Origin, path: &str) -> MResult<()> {
    match current_size(path) {
        Some(now) if now != o.size() => {
            warn!(
                "origin {} ({path}) is now {now} bytes but was bound with {} bytes",
                o.id(),
                o.size()
            );
            Err(MethodError::InvalidState(format!(
                "origin {} ({path}) is now {now} bytes but was bound with {} bytes; restore its size before exporting it",
                o.id(),
                o.size()
            )))
        }
        _ => Ok(()),
    }
}
