//! Handing a store over between two daemons at a live migration's switch-over
//! (docs/migration.md). What moves is the ownership of the files: the engine opens every
//! store and origin under an exclusive `flock`, so exactly one daemon can have them open.
//!
//! - destination, before the migration: `origin_create` with `incoming` serves the export's
//!   socket on a [`HandoverDisk`] (size and block size known, nothing opened), so that QEMU
//!   started with `-incoming` can connect; [`Daemon::incoming_create`];
//! - source, once QEMU reported the migration `completed` (its device stopped, every request
//!   answered): `export_release` stops the export, flushes the origin and closes the store,
//!   and answers only once no lock of this process remains on the files;
//! - destination: `export_acquire` opens the store and origin, retrying while another
//!   process holds them, up to a timeout, then puts the volume under the waiting export.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{info, warn};
use snapmv_rpc::limits::PAGE_SIZE;
use snapmv_rpc::methods as m;

use super::core::{Daemon, Inner};
use super::error::{MResult, MethodError};
use super::methods::NewOriginExport;
use super::registry::current_size;
use super::validate;
use crate::state::ExportRecord;
use crate::vhost_blk::HandoverDisk;

/// `export_acquire`'s default wait for the store.
const DEFAULT_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(60);
/// The longest `export_acquire` may be asked to wait.
const MAX_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(3600);
/// How often `export_acquire` tries again while the store is held.
const ACQUIRE_POLL: Duration = Duration::from_millis(50);

/// The exports waiting for their store, by name (in [`Inner`]).
pub(crate) type Incoming = HashMap<String, Arc<HandoverDisk>>;

impl Daemon {
    /// `origin_create` with `incoming`: the export is recorded and its socket served, its
    /// requests wait until `export_acquire`. Nothing is opened; the origin must be bound.
    pub(crate) fn incoming_create(&self, p: m::OriginCreateParams) -> MResult<m::ExportInfo> {
        let mut guard = self.lock();
        let inner = &mut *guard;
        validate::new_export_name(&inner.state, &p.name)?;
        if p.bind || p.format || p.force_format {
            return Err(MethodError::InvalidParams(format!(
                "export {}: incoming opens an existing binding after the source daemon released it; it cannot bind or format",
                p.name
            )));
        }
        let protocol = validate::protocol_param(p.protocol.as_deref())?;
        if protocol.as_deref() == Some(m::PROTOCOL_NBD) {
            return Err(MethodError::InvalidParams(format!(
                "export {}: incoming is for vhost-user-blk exports (QEMU migrates the device with the guest)",
                p.name
            )));
        }
        let NewOriginExport {
            origin,
            cow,
            origin_id,
            pages,
            rec,
        } = self.check_new_origin_export(inner, &p, protocol)?;
        let size = current_size(&origin).ok_or_else(|| {
            MethodError::InvalidState(format!("cannot read the size of origin {origin}"))
        })?;
        // The volume's physical block size is its chunk size (vhost_blk/volume.rs).
        // Named as the engine names the volume it will serve (the export's description stays
        // right after the handover; `error` says it is waiting meanwhile).
        let disk = Arc::new(HandoverDisk::new(
            format!("origin {origin_id}"),
            size,
            (pages * PAGE_SIZE).max(512),
        ));
        self.add_vhost_export(&rec, disk.clone())?;
        // Write-through until `export_acquire` says what the guest chose on the source: every
        // write is then durable when acknowledged, whatever the guest expects.
        self.exports.set_writeback(&rec.name, false);
        Self::record_origin_export(inner, &origin, &rec, p.direct);
        inner.failed.insert(
            rec.name.clone(),
            format!(
                "waiting for COW store {cow} (incoming migration): `snapmv acquire {}` once the source daemon released it",
                rec.name
            ),
        );
        inner.incoming.insert(rec.name.clone(), disk);
        info!(
            "export {} waits for origin {origin} ({origin_id} in {cow}): incoming migration",
            rec.name
        );
        self.save(inner, format!("incoming export {} was created", rec.name))?;
        Ok(self.export_info(inner, &rec))
    }

    /// `export_release`: stops an origin's export, flushes the origin and closes its store;
    /// answers once this process holds no lock on the store or the origin.
    pub(crate) fn export_release(
        &self,
        p: m::ExportReleaseParams,
    ) -> MResult<m::ExportReleaseResult> {
        let mut guard = self.lock();
        let inner = &mut *guard;
        let rec = self.find_export(inner, &p.name)?;
        if inner.incoming.contains_key(&rec.name) {
            return Err(MethodError::InvalidState(format!(
                "export {} never acquired its store; remove it instead (snapmv remove {})",
                rec.name, rec.name
            )));
        }
        let (rec, origin) = self.origin_export(inner, &rec.name, m::names::EXPORT_RELEASE)?;
        let others: Vec<String> = inner
            .state
            .exports
            .iter()
            .filter(|e| e.cow == rec.cow && e.name != rec.name)
            .map(|e| e.name.clone())
            .collect();
        if !others.is_empty() {
            return Err(MethodError::Busy(format!(
                "COW store {} of export {} is also used by export{} {}; a store moves whole: remove or release {} first",
                rec.cow,
                rec.name,
                if others.len() == 1 { "" } else { "s" },
                others.join(", "),
                if others.len() == 1 { "it" } else { "them" }
            )));
        }
        if let Some(r) = origin.rollback_progress() {
            return Err(MethodError::Busy(format!(
                "origin {} (export {}) is being rolled back to snapshot {}; wait for the end",
                rec.origin_id, rec.name, r.tag
            )));
        }
        if inner.waiters.get(&rec.cow).copied().unwrap_or(0) > 0 {
            return Err(MethodError::Busy(format!(
                "a call is waiting on COW store {}; try again once it answered",
                rec.cow
            )));
        }
        // The guest's cache mode goes with it (the destination must honour write-through).
        let writeback = self.exports.writeback(&rec.name).unwrap_or(false);
        // Stopping the export joins its queue threads: every request taken is answered, and
        // the guest (QEMU, paused after the migration) can send no more.
        self.live_remove(&rec.name)
            .map_err(|source| MethodError::Export {
                what: format!("cannot stop export {}", rec.name),
                source,
            })?;
        if let Err(source) = origin.volume().flush() {
            // The store stays here: serve the export again.
            let err = MethodError::Engine {
                what: format!(
                    "cannot flush origin {} of export {} before releasing it",
                    rec.origin_id, rec.name
                ),
                source,
            };
            if let Err(e) = self.add_export(&rec, origin.volume()) {
                warn!("export {} could not be served again: {e}", rec.name);
                inner.failed.insert(rec.name.clone(), e.to_string());
            }
            return Err(err);
        }
        let origin_path = inner.state.origin_path(&rec.cow, &rec.origin_id);
        drop(origin);
        inner.state.exports.retain(|e| e.name != rec.name);
        inner
            .state
            .origins
            .retain(|o| !(o.cow == rec.cow && o.origin_id == rec.origin_id));
        self.forget_cache_mode(&rec.name);
        self.close_unused(inner);
        self.save(
            inner,
            format!("export {} was released to another daemon", rec.name),
        )?;
        for (what, path) in [("COW store", &rec.cow), ("origin", &origin_path)] {
            if let Some(why) = still_locked(path) {
                return Err(MethodError::InvalidState(format!(
                    "export {} is released, but its {what} {path} is still locked by this daemon ({why}); it cannot be acquired elsewhere until this daemon stops",
                    rec.name
                )));
            }
        }
        info!(
            "export {} released: origin {} and COW store {} closed",
            rec.name, rec.origin_id, rec.cow
        );
        Ok(m::ExportReleaseResult {
            name: rec.name,
            writeback,
        })
    }

    /// `export_acquire`: opens the store and origin of an incoming export (or of one that
    /// could not be re-created at start), waiting while another process holds them.
    pub(crate) fn export_acquire(&self, p: m::ExportAcquireParams) -> MResult<m::ExportInfo> {
        let timeout = p
            .timeout_secs
            .map(Duration::from_secs)
            .unwrap_or(DEFAULT_ACQUIRE_TIMEOUT);
        if timeout > MAX_ACQUIRE_TIMEOUT {
            return Err(MethodError::InvalidParams(format!(
                "timeout_secs {} is more than {}",
                timeout.as_secs(),
                MAX_ACQUIRE_TIMEOUT.as_secs()
            )));
        }
        let start = Instant::now();
        loop {
            let mut guard = self.lock();
            let inner = &mut *guard;
            let rec = self.find_export(inner, &p.name)?;
            if !inner.failed.contains_key(&rec.name) {
                // Served already (an earlier acquire, or it never moved): the cache mode may
                // come now, from an orchestrator that acquired before the release reported it.
                if let Some(wb) = p.writeback {
                    self.exports.set_writeback(&rec.name, wb);
                }
                return Ok(self.export_info(inner, &rec));
            }
            match self.try_acquire(inner, &rec) {
                Ok(()) => {
                    inner.failed.remove(&rec.name);
                    if let Some(wb) = p.writeback {
                        self.exports.set_writeback(&rec.name, wb);
                    }
                    info!(
                        "export {} acquired its COW store {} after {:?}",
                        rec.name,
                        rec.cow,
                        start.elapsed()
                    );
                    return Ok(self.export_info(inner, &rec));
                }
                Err(MethodError::InUse {
                    what, path, holder, ..
                }) => {
                    if start.elapsed() >= timeout {
                        return Err(MethodError::Busy(format!(
                            "export {}: {what} {path} is still held by {holder} after {}s; the source daemon has not released it (`snapmv release {}` there, once QEMU's migration completed)",
                            rec.name,
                            timeout.as_secs(),
                            rec.name
                        )));
                    }
                }
                Err(e) => return Err(e),
            }
            drop(guard);
            std::thread::sleep(ACQUIRE_POLL);
        }
    }

    /// One attempt: opens the origin (and its store) and serves it under the export.
    fn try_acquire(&self, inner: &mut Inner, rec: &ExportRecord) -> MResult<()> {
        let origin = self.origin_for(inner, &rec.cow, &rec.origin_id, false)?;
        // An incoming export serves the origin; one that failed at start may be a snapshot's.
        let volume = self.volume_for(inner, &rec.cow, &rec.origin_id, rec.tag, false)?;
        match inner.incoming.get(&rec.name) {
            Some(disk) => {
                if let Err(e) = disk.install(Arc::new(volume)) {
                    // Not served: close what was opened, so that the store is not held
                    // here for nothing (the source may take it back).
                    drop(origin);
                    let key = (rec.cow.clone(), rec.origin_id.clone());
                    inner.origins.remove(&key);
                    inner.readonly_origins.remove(&key);
                    drop(inner.stores.remove(&rec.cow));
                    return Err(MethodError::InvalidState(format!(
                        "export {}: origin {} of COW store {} cannot replace the disk the guest saw: {e}",
                        rec.name, rec.origin_id, rec.cow
                    )));
                }
                inner.incoming.remove(&rec.name);
                Ok(())
            }
            // An export that failed at start: serve it now.
            None => self.add_export(rec, volume),
        }
    }

    /// Called when an export is removed: requests waiting for a store that will not come fail.
    pub(crate) fn abandon_incoming(&self, inner: &mut Inner, name: &str) {
        if let Some(disk) = inner.incoming.remove(name) {
            disk.abandon(format!(
                "export {name} was removed before it acquired its store"
            ));
        }
    }
}

/// Whether this process still holds `path` open through the engine (its exclusive `flock`),
/// as `Some(holder)`. Another holder — the destination daemon that acquired it meanwhile —
/// is fine, and so is a lock taken here for a moment to find out (an acquire retries).
fn still_locked(path: &str) -> Option<String> {
    let probe = snapmv_engine::FileStorage::open_with(
        std::path::Path::new(path),
        snapmv_engine::OpenMode {
            direct: false,
            readonly: true,
        },
    );
    match probe {
        Ok(_) => None,
        Err(e) => snapmv_engine::in_use(&e)
            .filter(|u| u.pid == Some(std::process::id()))
            .map(|u| u.holder.clone()),
    }
}
