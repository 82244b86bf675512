//! `snapshot_export`, `export_remove` and `export_list`.

use std::path::Path;

use log::info;
use snapmv_rpc::methods as m;

use crate::daemon::core::Daemon;
use crate::daemon::error::{MResult, MethodError};
use crate::daemon::paths::socket_access_params;
use crate::daemon::registry::{check_origin_size, object_id};
use crate::daemon::validate::{self, default_origin_id};
use crate::state::ExportRecord;

impl Daemon {
    pub(crate) fn snapshot_export(&self, p: m::SnapshotExportParams) -> MResult<m::ExportInfo> {
        let mut guard = self.lock();
        let inner = &mut *guard;
        validate::new_export_name(&inner.state, &p.name)?;
        let (cow, cow_fid) = self.check_path("COW store", &p.cow)?;
        let cow = Self::known_store_path(inner, cow, &cow_fid);
        let (num_queues, queue_size) = validate::queues(&p.name, p.num_queues, p.queue_size)?;
        let (socket_group, socket_mode) =
            socket_access_params(&p.name, p.socket_group.as_deref(), p.socket_mode.as_deref())?;
        let origin_id = match (&p.origin_id, &p.origin) {
            (None, None) => {
                return Err(MethodError::InvalidParams(format!(
                    "export {}: snapshot_export needs origin_id or origin",
                    p.name
                )))
            }
            (Some(id), given_path) => {
                m::validate_name("origin id", id).map_err(MethodError::InvalidParams)?;
                if inner.state.origin(&cow, id).is_none() {
                    let Some(path) = given_path else {
                        return Err(MethodError::NotFound(format!(
                            "origin id {id} of COW store {cow} is not known to this daemon; give the origin's path too"
                        )));
                    };
                    let (origin, origin_fid) = self.check_path("origin", path)?;
                    self.check_roles(inner, (&origin, &origin_fid), (&cow, &cow_fid))?;
                    self.remember_origin(inner, &cow, id, &origin, &origin_fid, p.direct)?;
                }
                id.clone()
            }
            (None, Some(path)) => {
                let (origin, origin_fid) = self.check_path("origin", path)?;
                self.check_roles(inner, (&origin, &origin_fid), (&cow, &cow_fid))?;
                match inner
                    .state
                    .origins
                    .iter()
                    .find(|o| o.cow == cow && object_id(&o.path).as_ref() == Some(&origin_fid))
                {
                    Some(o) => o.origin_id.clone(),
                    None => {
                        let id = default_origin_id(Path::new(&origin));
                        self.remember_origin(inner, &cow, &id, &origin, &origin_fid, p.direct)?;
                        id
                    }
                }
            }
        };
        validate::not_exported(&inner.state, &cow, &origin_id, Some(p.tag))?;
        let socket = self.socket_path(inner, &p.name, p.socket.as_deref())?;
        // An origin already open must still have the size it was bound with.
        if let (Some(o), Some(r)) = (
            inner.origins.get(&(cow.clone(), origin_id.clone())),
            inner.state.origin(&cow, &origin_id),
        ) {
            check_origin_size(o, &r.path)?;
        }
        let result = self.volume_for(inner, &cow, &origin_id, Some(p.tag), p.direct);
        let volume = match result {
            Ok(v) => v,
            Err(e) => {
                self.forget_unused_origin(inner, &cow, &origin_id);
                return Err(e);
            }
        };
        let rec = ExportRecord {
            name: p.name.clone(),
            socket,
            cow: cow.clone(),
            origin_id: origin_id.clone(),
            tag: Some(p.tag),
            num_queues,
            queue_size,
            readonly: p.readonly,
            socket_group,
            socket_mode,
            protocol: validate::protocol_param(p.protocol.as_deref())?,
            serial: None,
        };
        if let Err(e) = self.add_export(&rec, volume) {
            self.forget_unused_origin(inner, &cow, &origin_id);
            return Err(e);
        }
        inner.state.record_store(&cow, p.direct);
        inner.state.exports.push(rec.clone());
        inner.failed.remove(&rec.name);
        info!(
            "export {} serves snapshot {} of origin {origin_id} in {cow}",
            rec.name, p.tag
        );
        self.save(inner, format!("export {} was created", rec.name))?;
        Ok(self.export_info(inner, &rec))
    }

    pub(crate) fn export_remove(&self, p: m::ExportRemoveParams) -> MResult<m::Done> {
        if !p.force {
            self.wait_client_leaving(&p.name);
        }
        let mut guard = self.lock();
        let inner = &mut *guard;
        let rec = self.find_export(inner, &p.name)?;
        if self.live_get(&rec.name).is_some() {
            self.refuse_if_connected(&rec.name, p.force, "remove it")?;
            // Requests waiting for a store that will not come must end, or stopping the
            // export would wait for them.
            self.abandon_incoming(inner, &rec.name);
            self.live_remove(&rec.name)
                .map_err(|source| MethodError::Export {
                    what: format!("cannot stop export {}", rec.name),
                    source,
                })?;
        }
        inner.state.exports.retain(|e| e.name != rec.name);
        inner.failed.remove(&rec.name);
        self.forget_cache_mode(rec.identity());
        info!("export {} removed", rec.name);
        self.save(inner, format!("export {} was removed", rec.name))?;
        Ok(m::Done { name: rec.name })
    }

    /// `export_rename`: the export keeps serving; its socket path (which the hypervisor's
    /// configuration names and a reconnecting QEMU dials) and its disk serial (the name it was
    /// created with, `serial` in the record) stay; the RPC, CLI, `stats` and Prometheus use
    /// the new name from now on.
    pub(crate) fn export_rename(&self, p: m::ExportRenameParams) -> MResult<m::ExportInfo> {
        let mut guard = self.lock();
        let inner = &mut *guard;
        let rec = self.find_export(inner, &p.name)?;
        validate::new_export_name(&inner.state, &p.new_name)?;
        if rec.protocol.as_deref() == Some(m::PROTOCOL_NBD) {
            return Err(MethodError::InvalidState(format!(
                "export {} is served over NBD, whose clients ask for it by name; remove it and create it again as {}",
                rec.name, p.new_name
            )));
        }
        if self.live_get(&rec.name).is_some() {
            self.exports
                .rename(&rec.name, &p.new_name)
                .map_err(|source| MethodError::Export {
                    what: format!("cannot rename export {}", rec.name),
                    source,
                })?;
        }
        let Some(r) = inner.state.exports.iter_mut().find(|e| e.name == rec.name) else {
            return Err(MethodError::NotFound(format!(
                "export {} not found",
                rec.name
            )));
        };
        r.serial.get_or_insert_with(|| rec.name.clone());
        r.name = p.new_name.clone();
        let renamed = r.clone();
        if let Some(why) = inner.failed.remove(&rec.name) {
            inner.failed.insert(p.new_name.clone(), why);
        }
        info!(
            "export {} renamed to {} (socket {} and disk serial {:?} kept)",
            rec.name,
            p.new_name,
            renamed.socket,
            renamed.serial.as_deref().unwrap_or_default()
        );
        self.save(
            inner,
            format!("export {} was renamed to {}", rec.name, p.new_name),
        )?;
        Ok(self.export_info(inner, &renamed))
    }

    pub(crate) fn export_list(&self, _p: m::NoParams) -> MResult<m::ExportList> {
        let guard = self.lock();
        let exports = guard
            .state
            .exports
            .iter()
            .map(|r| self.export_info(&guard, r))
            .collect();
        Ok(m::ExportList { exports })
    }
}
