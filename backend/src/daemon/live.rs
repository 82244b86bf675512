//! The exports being served: vhost-user-blk ones through the export manager, NBD ones here;
//! starting, finding and stopping them, and their guests' cache-mode files.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, MutexGuard};

use log::warn;
use snapmv_engine::Volume;

use super::error::{MResult, MethodError};
use snapmv_rpc::methods::PROTOCOL_NBD;

use super::core::{Daemon, CACHE_MODE_DIR};
use crate::export::{ExportConfig, ExportError};
use crate::rpc_server::SocketAccess;
use crate::state::ExportRecord;

/// How long `export_remove` waits for a departing client before refusing: polls × interval.
const CLIENT_LEAVE_POLLS: u32 = 20;
const CLIENT_LEAVE_POLL: std::time::Duration = std::time::Duration::from_millis(100);

impl Daemon {
    pub(crate) fn nbd_lock(&self) -> MutexGuard<'_, HashMap<String, crate::nbd::NbdServer>> {
        self.nbd.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A live export (vhost-user-blk or NBD).
    pub(crate) fn live_get(&self, name: &str) -> Option<crate::export::ExportInfo> {
        if let Some(n) = self.nbd_lock().get(name) {
            return Some(n.info());
        }
        self.exports.get(name)
    }

    /// Every live export.
    pub(crate) fn live_list(&self) -> Vec<crate::export::ExportInfo> {
        let mut v = self.exports.list();
        v.extend(self.nbd_lock().values().map(|n| n.info()));
        v
    }

    /// Stops a live export.
    pub(crate) fn live_remove(&self, name: &str) -> Result<(), ExportError> {
        let n = self.nbd_lock().remove(name);
        match n {
            Some(n) => {
                drop(n);
                Ok(())
            }
            None => self.exports.remove(name),
        }
    }

    pub(crate) fn add_export(&self, rec: &ExportRecord, volume: Volume) -> MResult<()> {
        if rec.protocol.as_deref() == Some(PROTOCOL_NBD) {
            if self.live_get(&rec.name).is_some() {
                return Err(MethodError::AlreadyExists(format!(
                    "export {} is already served",
                    rec.name
                )));
            }
            let v2 = volume.clone();
            let changed: Arc<crate::nbd::ChangedFn> =
                Arc::new(move |tag| v2.changed_since(tag).map_err(|e| e.to_string()));
            let chunk_size = volume.chunk_size();
            let desc = volume.name();
            let server = crate::nbd::NbdServer::start(
                Path::new(&rec.socket),
                crate::nbd::NbdExport {
                    name: rec.name.clone(),
                    disk: Arc::new(crate::nbd::BulkVolume(volume)),
                    readonly: rec.readonly,
                    chunk_size,
                    changed: Some(changed),
                    metrics: Arc::default(),
                },
                desc,
                rec.socket_mode.unwrap_or(self.socket_access.mode),
                rec.socket_group.or(self.socket_access.group),
            )
            .map_err(|source| MethodError::Open {
                what: format!(
                    "cannot serve export {} over NBD on {}",
                    rec.name, rec.socket
                ),
                source,
            })?;
            self.nbd_lock().insert(rec.name.clone(), server);
            return Ok(());
        }
        self.add_vhost_export(rec, Arc::new(volume))
    }

    /// Serves `disk` as the vhost-user-blk export `rec`.
    pub(crate) fn add_vhost_export(
        &self,
        rec: &ExportRecord,
        disk: Arc<dyn crate::vhost_blk::BlockDisk>,
    ) -> MResult<()> {
        self.exports
            .add_disk(
                ExportConfig {
                    name: rec.name.clone(),
                    socket: PathBuf::from(&rec.socket),
                    num_queues: rec.num_queues,
                    queue_size: rec.queue_size,
                    readonly: rec.readonly,
                    socket_access: SocketAccess {
                        group: rec.socket_group.or(self.socket_access.group),
                        mode: rec.socket_mode.unwrap_or(self.socket_access.mode),
                    },
                    cache_mode_file: Some(self.cache_mode_file(rec.identity())),
                    serial: rec.serial.clone(),
                },
                disk,
            )
            .map_err(|source| MethodError::Export {
                what: format!("cannot serve export {} on {}", rec.name, rec.socket),
                source,
            })
    }

    /// Where export `name` keeps the guest's cache-mode choice across restarts.
    pub(crate) fn cache_mode_file(&self, name: &str) -> PathBuf {
        self.state_dir_canon.join(CACHE_MODE_DIR).join(name)
    }

    /// An export that is gone for good forgets its guest's cache mode.
    pub(crate) fn forget_cache_mode(&self, name: &str) {
        let f = self.cache_mode_file(name);
        if let Err(e) = std::fs::remove_file(&f) {
            if e.kind() != std::io::ErrorKind::NotFound {
                log::warn!("cannot remove {}: {e}", f.display());
            }
        }
    }

    /// A guest that has just gone (its process exited, its socket closed) is noticed by the
    /// export's serving thread within moments: gives it that moment, outside the lock, before
    /// a removal is refused because of it.
    pub(crate) fn wait_client_leaving(&self, name: &str) {
        for _ in 0..CLIENT_LEAVE_POLLS {
            if !self.live_get(name).is_some_and(|e| e.connected) {
                break;
            }
            std::thread::sleep(CLIENT_LEAVE_POLL);
        }
    }

    /// Refuses to stop export `name` while a client is connected, unless `force` (then logs
    /// it). `what` is the operation, for the message.
    pub(crate) fn refuse_if_connected(&self, name: &str, force: bool, what: &str) -> MResult<()> {
        if !self.live_get(name).is_some_and(|e| e.connected) {
            return Ok(());
        }
        let peers = self.exports.peers(name);
        let who = if peers.is_empty() {
            "a client".to_string()
        } else {
            peers
                .iter()
                .map(|p| p.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        };
        if !force {
            return Err(MethodError::Busy(format!(
                "export {name} has a connected client: {who}; stop that guest first, or {what} with --force (force) and the guest loses its disk"
            )));
        }
        warn!("export {name}: {what} with --force while {who} is connected");
        Ok(())
    }
}
