//! Binding, opening and unbinding origins, and the store's status.

use super::*;

impl Store {
    /// Binds a new origin file or device under `origin_id`.
    pub fn bind_origin(&self, origin_id: &str, origin_path: &Path, direct: bool) -> Result<Origin> {
        let st = FileStorage::open(origin_path, direct)
            .map_err(|e| Error::io(format!("opening origin {}", origin_path.display()), e))?;
        self.bind_origin_storage(origin_id, Arc::new(st))
    }

    /// Binds any storage as a new origin.
    pub fn bind_origin_storage(&self, origin_id: &str, origin: Arc<dyn Storage>) -> Result<Origin> {
        let core = &self.guard.core;
        if origin_id.is_empty() || origin_id.len() > MAX_ORIGIN_ID {
            return Err(Error::InvalidArgument(format!(
                "origin id {origin_id:?} must be 1 to {} bytes",
                MAX_ORIGIN_ID
            )));
        }
        let size = origin
            .len()
            .map_err(|e| Error::io(format!("reading the size of origin {}", origin.name()), e))?;
        if size == 0 || size % 512 != 0 {
            return Err(Error::InvalidArgument(format!(
                "origin {} is {size} bytes; it must be a non-empty multiple of 512",
                origin.name()
            )));
        }
        let epoch;
        let oc;
        {
            let mut m = core.lock_meta();
            if m.dormant.values().any(|o| o.id == origin_id)
                || m.origins.values().any(|o| o.id == origin_id)
            {
                return Err(Error::AlreadyExists(format!(
                    "origin {origin_id} in COW store {}",
                    core.name
                )));
            }
            let slot = m.next_slot;
            m.next_slot += 1;
            m.pending.push(Record::BindOrigin {
                slot,
                id: origin_id.to_string(),
                size,
            });
            let om = OriginMeta::new(origin_id.to_string(), size);
            oc = OriginCore::build(core.clone(), slot, &om, origin)?;
            m.origins.insert(slot, oc.clone());
            epoch = m.epoch;
        }
        core.request_commit();
        core.wait_durable(epoch)?;
        Ok(Origin::new(oc, self.guard.clone()))
    }

    /// Opens an origin bound earlier (by this or an earlier process).
    pub fn open_origin(&self, origin_id: &str, origin_path: &Path, direct: bool) -> Result<Origin> {
        let st = FileStorage::open(origin_path, direct)
            .map_err(|e| Error::io(format!("opening origin {}", origin_path.display()), e))?;
        self.open_origin_storage(origin_id, Arc::new(st))
    }

    /// Opens an origin bound earlier, on any storage.
    pub fn open_origin_storage(&self, origin_id: &str, origin: Arc<dyn Storage>) -> Result<Origin> {
        let core = &self.guard.core;
        let mut m = core.lock_meta();
        if let Some(o) = m.origins.values().find(|o| o.id == origin_id) {
            return Ok(Origin::new(o.clone(), self.guard.clone()));
        }
        let (slot, om) = m
            .dormant
            .iter()
            .find(|(_, o)| o.id == origin_id)
            .map(|(s, o)| (*s, o.clone()))
            .ok_or_else(|| {
                Error::NotFound(format!("origin {origin_id} in COW store {}", core.name))
            })?;
        let size = origin
            .len()
            .map_err(|e| Error::io(format!("reading the size of origin {}", origin.name()), e))?;
        if size != om.size {
            return Err(Error::InvalidArgument(format!(
                "origin {origin_id} ({}) is {size} bytes but was {} bytes when bound",
                origin.name(),
                om.size
            )));
        }
        let oc = OriginCore::build(core.clone(), slot, &om, origin)?;
        if om.overlays.is_empty() {
            m.dormant.remove(&slot);
            m.origins.insert(slot, oc.clone());
            drop(m);
        } else {
            // Writes a previous process acknowledged but had not yet put on the origin: their
            // copy-outs are durable (opening the store wrote a checkpoint), so they go onto the
            // origin now, before it is served.
            drop(m);
            oc.write_recovered(&om.overlays)?;
            let mut m = core.lock_meta();
            if m.origins.values().any(|o| o.id == origin_id) {
                return Err(Error::Busy(format!(
                    "origin {origin_id} in COW store {} was opened twice at once",
                    core.name
                )));
            }
            for (&chunk, &s) in &om.overlays {
                StoreCore::note_free(&mut m, s);
                m.pending.push(Record::OverlayDone { slot, chunk });
            }
            m.dormant.remove(&slot);
            m.origins.insert(slot, oc.clone());
            drop(m);
            core.commit_sync()?;
        }
        core.wake_worker();
        Ok(Origin::new(oc, self.guard.clone()))
    }

    /// Ids of every bound origin.
    pub fn origin_ids(&self) -> Vec<String> {
        let m = self.guard.core.lock_meta();
        m.dormant
            .values()
            .map(|o| o.id.clone())
            .chain(m.origins.values().map(|o| o.id.clone()))
            .collect()
    }

    /// Unbinds an origin with no snapshots. Its handles stop working.
    pub fn unbind_origin(&self, origin_id: &str) -> Result<()> {
        let core = &self.guard.core;
        let opened = core
            .lock_meta()
            .origins
            .values()
            .find(|o| o.id == origin_id)
            .cloned();
        if let Some(o) = opened {
            o.prepare_unbind()?;
        }
        let epoch;
        {
            let mut m = core.lock_meta();
            let slot = if let Some((s, o)) = m.dormant.iter().find(|(_, o)| o.id == origin_id) {
                if !o.tags.is_empty() || !o.exceptions.is_empty() {
                    return Err(Error::HasSnapshots(origin_id.to_string()));
                }
                if !o.overlays.is_empty() {
                    return Err(Error::Busy(format!(
                        "origin {origin_id} has {} acknowledged chunk write(s) not yet on it; open (export) it once so that they are written, then unbind it",
                        o.overlays.len()
                    )));
                }
                *s
            } else if let Some((s, o)) = m.origins.iter().find(|(_, o)| o.id == origin_id) {
                if !o.can_unbind() {
                    return Err(Error::HasSnapshots(origin_id.to_string()));
                }
                o.mark_unbound();
                *s
            } else {
                return Err(Error::NotFound(format!(
                    "origin {origin_id} in COW store {}",
                    core.name
                )));
            };
            m.dormant.remove(&slot);
            m.origins.remove(&slot);
            m.pending.push(Record::UnbindOrigin { slot });
            epoch = m.epoch;
        }
        core.request_commit();
        core.wait_durable(epoch)
    }

    /// Space and origins.
    pub fn status(&self) -> StoreStatus {
        let core = &self.guard.core;
        let (origins, dormant, used, free) = {
            let m = core.lock_meta();
            (
                m.origins.values().cloned().collect::<Vec<_>>(),
                m.dormant.values().map(|o| o.id.clone()).collect(),
                m.used,
                m.free.len() as u64,
            )
        };
        StoreStatus {
            path: core.name.clone(),
            chunk_size: core.layout.chunk_size,
            chunks_total: core.layout.data_chunks,
            chunks_used: used,
            chunks_free: free,
            origins: origins.iter().map(|o| o.status()).collect(),
            dormant_origins: dormant,
        }
    }
}
