//! `origin_create` and `origin_delete`.

use std::sync::Arc;

use log::{error, info, warn};
use snapmv_engine::{FormatOptions, OpenMode, Origin, Storage, Store};
use snapmv_rpc::limits::PAGE_SIZE;
use snapmv_rpc::methods::{self as m, names};

use crate::daemon::core::{Daemon, Inner};
use crate::daemon::error::{MResult, MethodError};
use crate::daemon::ownership::is_rbd;
use crate::daemon::paths::socket_access_params;
use crate::daemon::registry::{check_origin_size, object_id, open_store, Access, Acquire};
use crate::daemon::validate;
use crate::state::{ExportRecord, OriginRecord};

/// An `origin_create` request checked against the state, before anything is opened.
pub(crate) struct NewOriginExport {
    /// The origin's path or locator.
    pub origin: String,
    /// The store, under the path this daemon already knows it by if it does.
    pub cow: String,
    pub origin_id: String,
    /// Chunk size in pages if the store is formatted.
    pub pages: u32,
    /// The export to record.
    pub rec: ExportRecord,
}

impl Daemon {
    /// The checks every `origin_create` makes (with or without `incoming`): paths and their
    /// roles, queues, socket access, format options, the origin's id and identity, that it is
    /// not exported yet, the socket path. Nothing is opened.
    pub(crate) fn check_new_origin_export(
        &self,
        inner: &Inner,
        p: &m::OriginCreateParams,
        protocol: Option<String>,
    ) -> MResult<NewOriginExport> {
        let (origin, origin_fid) = self.check_path("origin", &p.origin)?;
        let (cow, cow_fid) = self.check_path("COW store", &p.cow)?;
        let cow = Self::known_store_path(inner, cow, &cow_fid);
        self.check_roles(inner, (&origin, &origin_fid), (&cow, &cow_fid))?;
        let (num_queues, queue_size) = validate::queues(&p.name, p.num_queues, p.queue_size)?;
        let (socket_group, socket_mode) =
            socket_access_params(&p.name, p.socket_group.as_deref(), p.socket_mode.as_deref())?;
        let pages = validate::format_options(&p.name, &cow, p)?;
        let origin_id = validate::origin_id(&inner.state, &cow, &origin, p.origin_id.as_deref())?;
        // The origin must not be served or known under another store or id.
        validate::origin_identity(&inner.state, &cow, &origin, &origin_id, |path| {
            object_id(path).as_ref() == Some(&origin_fid)
        })?;
        validate::not_exported(&inner.state, &cow, &origin_id, None)?;
        let socket = self.socket_path(inner, &p.name, p.socket.as_deref())?;
        let rec = ExportRecord {
            name: p.name.clone(),
            socket,
            cow: cow.clone(),
            origin_id: origin_id.clone(),
            tag: None,
            num_queues,
            queue_size,
            readonly: p.readonly,
            socket_group,
            socket_mode,
            protocol,
            serial: None,
        };
        Ok(NewOriginExport {
            origin,
            cow,
            origin_id,
            pages,
            rec,
        })
    }

    /// Records a new origin export in the state (origin, store, export); saving is the
    /// caller's.
    pub(crate) fn record_origin_export(
        inner: &mut Inner,
        origin: &str,
        rec: &ExportRecord,
        direct: bool,
    ) {
        inner.state.record_origin(OriginRecord {
            cow: rec.cow.clone(),
            origin_id: rec.origin_id.clone(),
            path: origin.to_string(),
            direct,
        });
        inner.state.record_store(&rec.cow, direct);
        inner.state.exports.push(rec.clone());
    }

    pub(crate) fn origin_create(&self, p: m::OriginCreateParams) -> MResult<m::ExportInfo> {
        if p.incoming {
            return self.incoming_create(p);
        }
        let mut guard = self.lock();
        let inner = &mut *guard;
        // Everything is checked, and the origin opened, before the store is formatted:
        // formatting is the last step that can fail for a reason an operator can fix.
        validate::new_export_name(&inner.state, &p.name)?;
        let protocol = validate::protocol_param(p.protocol.as_deref())?;
        let NewOriginExport {
            origin,
            cow,
            origin_id,
            pages,
            rec,
        } = self.check_new_origin_export(inner, &p, protocol)?;
        let format = p.format || p.force_format;
        let key = (cow.clone(), origin_id.clone());
        if format {
            validate::formattable(&inner.state, &cow, inner.stores.contains_key(&cow))?;
        }
        // Taking over: both images, from an owner believed dead, which is fenced.
        let how = if p.takeover {
            if !is_rbd(&cow) || !is_rbd(&origin) {
                return Err(MethodError::InvalidParams(format!(
                    "export {}: takeover applies to an origin and a COW store on rbd: images                      (a local file's owner is the process holding its lock)",
                    p.name
                )));
            }
            if format {
                return Err(MethodError::InvalidParams(format!(
                    "export {}: takeover keeps the store's data; it cannot be combined with                      formatting",
                    p.name
                )));
            }
            Acquire::Takeover
        } else {
            Acquire::Open
        };
        // The origin: already open here, or opened now — before any format.
        let opened = self.origin_file_for_create(inner, &key, &origin, &p, how)?;
        let store = if format {
            self.format_store(inner, &cow, pages, &p)?
        } else if how == Acquire::Takeover && !inner.stores.contains_key(&cow) {
            self.open_store_as(inner, &cow, p.direct, how)?
        } else {
            self.store_for(inner, &cow, p.direct)?
        };
        let (origin_h, bound_now) =
            Self::attach_origin(inner, &store, &key, &origin, opened, p.bind)?;
        if let Err(e) = self.add_export(&rec, origin_h.volume()) {
            if bound_now {
                inner.origins.remove(&key);
                inner.readonly_origins.remove(&key);
                drop(origin_h);
                if let Err(u) = store.unbind_origin(&origin_id) {
                    warn!("could not undo the binding of origin {origin_id} to {cow}: {u}");
                }
            }
            return Err(e);
        }
        Self::record_origin_export(inner, &origin, &rec, p.direct);
        inner.failed.remove(&rec.name);
        info!(
            "export {} serves origin {origin} ({origin_id} in {cow})",
            rec.name
        );
        self.save(inner, format!("export {} was created", rec.name))?;
        Ok(self.export_info(inner, &rec))
    }

    /// The origin's file for `origin_create`: `None` if the origin is open here already (then
    /// it must not have changed size, must not be bound again, and must be writable if this
    /// export writes it), else its file opened now (and whether read-only).
    fn origin_file_for_create(
        &self,
        inner: &Inner,
        key: &(String, String),
        origin: &str,
        p: &m::OriginCreateParams,
        how: Acquire,
    ) -> MResult<Option<(Arc<dyn Storage>, bool)>> {
        let (cow, origin_id) = key;
        let opened = match inner.origins.get(key) {
            Some(o) => {
                if p.bind {
                    return Err(MethodError::AlreadyExists(format!(
                    "origin {origin_id} is already bound to COW store {cow}; create the export without -b (bind)"
                )));
                }
                check_origin_size(o, origin)?;
                if !p.readonly && inner.readonly_origins.contains(key) {
                    return Err(MethodError::InvalidState(format!(
                    "origin {origin} is open read-only (its other exports are read-only, or its file is not writable); export it read-only (-r), or remove those exports first"
                )));
                }
                None
            }
            None => {
                let access = if p.readonly {
                    Access::ReadOnly
                } else {
                    Access::Write
                };
                let (storage, readonly) = self.open_origin(origin, p.direct, access, how)?;
                if p.bind {
                    let size = storage.len().map_err(|source| MethodError::Open {
                        what: format!("cannot read the size of origin {origin}"),
                        source,
                    })?;
                    if size == 0 || size % 512 != 0 {
                        return Err(MethodError::InvalidParams(format!(
                            "origin {origin} is {size} bytes; it must be a non-empty multiple of 512 bytes"
                        )));
                    }
                }
                Some((storage, readonly))
            }
        };
        Ok(opened)
    }

    /// Formats store `cow` with `pages`-page chunks and opens it; every origin recorded in it
    /// is forgotten.
    fn format_store(
        &self,
        inner: &mut Inner,
        cow: &str,
        pages: u32,
        p: &m::OriginCreateParams,
    ) -> MResult<Store> {
        let storage = self.ownership.open(
            "COW store",
            cow,
            OpenMode {
                direct: p.direct,
                readonly: false,
            },
            Acquire::Open,
        )?;
        Store::format_storage(
            storage.as_ref(),
            &FormatOptions {
                chunk_size: pages * PAGE_SIZE,
                force: p.force_format,
            },
        )
        .map_err(|e| match e {
            snapmv_engine::Error::AlreadyExists(_) => MethodError::AlreadyExists(format!(
                "COW store {cow} already holds a snapmv store; give -F (force_format) to format over it, destroying its snapshots"
            )),
            e => MethodError::Engine {
                what: format!("cannot format COW store {cow}"),
                source: e,
            },
        })?;
        info!("formatted COW store {cow} with {pages}-page chunks");
        // Whatever was bound before is gone.
        inner.state.origins.retain(|o| o.cow != cow);
        let store = open_store(cow, storage)?;
        inner.stores.insert(cow.to_string(), store.clone());
        Ok(store)
    }

    /// The origin `key` as an engine handle: the open one (`opened` `None`), or bound (`bind`)
    /// or opened in `store` on its file. Returns it and whether it was bound now.
    fn attach_origin(
        inner: &mut Inner,
        store: &Store,
        key: &(String, String),
        origin: &str,
        opened: Option<(Arc<dyn Storage>, bool)>,
        bind: bool,
    ) -> MResult<(Origin, bool)> {
        let (cow, origin_id) = key;
        let attached = match opened {
            None => (
                inner.origins.get(key).cloned().ok_or_else(|| {
                    MethodError::InvalidState(format!(
                        "origin {origin_id} of {cow} is no longer open"
                    ))
                })?,
                false,
            ),
            Some((storage, readonly)) => {
                let o = if bind {
                    store.bind_origin_storage(origin_id, storage)
                } else {
                    store.open_origin_storage(origin_id, storage)
                };
                let o = o.map_err(|e| match e {
                    snapmv_engine::Error::NotFound(_) => MethodError::NotFound(format!(
                        "origin {origin_id} is not bound to COW store {cow}; give -b (bind) to bind it"
                    )),
                    e => MethodError::Engine {
                        what: if bind {
                            format!("cannot bind origin {origin} as id {origin_id} to COW store {cow}")
                        } else {
                            format!("cannot open origin {origin} (id {origin_id}) in COW store {cow}")
                        },
                        source: e,
                    },
                })?;
                // Recorded at once: the engine keeps it open (and its file locked) from now on.
                inner.origins.insert(key.clone(), o.clone());
                if readonly {
                    inner.readonly_origins.insert(key.clone());
                } else {
                    inner.readonly_origins.remove(key);
                }
                (o, bind)
            }
        };
        Ok(attached)
    }

    pub(crate) fn origin_delete(&self, p: m::ExportRemoveParams) -> MResult<m::Done> {
        if !p.force {
            self.wait_client_leaving(&p.name);
        }
        let mut guard = self.lock();
        let inner = &mut *guard;
        let (rec, origin) = self.origin_export(inner, &p.name, names::ORIGIN_DELETE)?;
        let n = origin.snapshots().len();
        if n > 0 {
            return Err(MethodError::HasSnapshots(format!(
                "cannot delete origin {} (export {}): it still has {n} snapshot{}; delete {} first (snapmv delete {} TAG)",
                rec.origin_id,
                rec.name,
                if n == 1 { "" } else { "s" },
                if n == 1 { "it" } else { "them" },
                rec.name
            )));
        }
        if let Some(r) = origin.rollback_progress() {
            return Err(MethodError::Busy(format!(
                "origin {} (export {}) is being rolled back to snapshot {}; wait for the end",
                rec.origin_id, rec.name, r.tag
            )));
        }
        let others: Vec<String> = inner
            .state
            .exports
            .iter()
            .filter(|e| e.cow == rec.cow && e.origin_id == rec.origin_id && e.name != rec.name)
            .map(|e| e.name.clone())
            .collect();
        if !others.is_empty() {
            return Err(MethodError::Busy(format!(
                "origin {} is also exported as {}; remove those exports first",
                rec.origin_id,
                others.join(", ")
            )));
        }
        self.refuse_if_connected(&rec.name, p.force, "delete it")?;
        let store = self.store_for(inner, &rec.cow, false)?;
        self.live_remove(&rec.name)
            .map_err(|source| MethodError::Export {
                what: format!("cannot stop export {}", rec.name),
                source,
            })?;
        inner
            .origins
            .remove(&(rec.cow.clone(), rec.origin_id.clone()));
        inner
            .readonly_origins
            .remove(&(rec.cow.clone(), rec.origin_id.clone()));
        drop(origin);
        if let Err(source) = store.unbind_origin(&rec.origin_id) {
            // Serve it again: nothing changed.
            let err = MethodError::Engine {
                what: format!(
                    "cannot unbind origin {} from COW store {}",
                    rec.origin_id, rec.cow
                ),
                source,
            };
            match self
                .origin_for(inner, &rec.cow, &rec.origin_id, false)
                .and_then(|o| self.add_export(&rec, o.volume()))
            {
                Ok(()) => {}
                Err(e) => {
                    error!("export {} could not be served again: {e}", rec.name);
                    inner.failed.insert(rec.name.clone(), e.to_string());
                }
            }
            return Err(err);
        }
        inner.state.exports.retain(|e| e.name != rec.name);
        self.forget_cache_mode(rec.identity());
        inner
            .state
            .origins
            .retain(|o| !(o.cow == rec.cow && o.origin_id == rec.origin_id));
        info!(
            "origin {} unbound from {} and export {} removed",
            rec.origin_id, rec.cow, rec.name
        );
        self.save(
            inner,
            format!("origin {} was unbound from {}", rec.origin_id, rec.cow),
        )?;
        Ok(m::Done { name: rec.name })
    }
}
