//! `snapshot_create`, `snapshot_delete`, `snapshot_rollback` and `snapshot_list`.

use log::info;
use snapmv_rpc::methods::{self as m, names};

use crate::daemon::convert;
use crate::daemon::core::Daemon;
use crate::daemon::error::{MResult, MethodError};

impl Daemon {
    pub(crate) fn snapshot_create(
        &self,
        p: m::SnapshotCreateParams,
    ) -> MResult<m::SnapshotCreateResult> {
        match (p.name.is_empty(), p.names.is_empty()) {
            (false, true) => {}
            (true, false) => return self.snapshot_group(p),
            _ => {
                return Err(MethodError::InvalidParams(
                    "give either name (one export) or names (a consistency group)".into(),
                ))
            }
        }
        let mut guard = self.lock();
        let inner = &mut *guard;
        let rec = self.find_export(inner, &p.name)?;
        let origin = self.origin_of(inner, &rec)?;
        let of = match (rec.tag, p.tag) {
            (t, None) => t,
            (None, Some(0)) => {
                return Err(MethodError::InvalidParams(
                    "snapshot tag 0 does not exist: tags start at 1".into(),
                ))
            }
            (None, Some(t)) => Some(t),
            (Some(served), Some(t)) => {
                return Err(MethodError::InvalidParams(format!(
                    "export {} serves snapshot {served} of origin {}: give an export of the \
                     origin with tag {t}, or omit tag to snapshot snapshot {served}",
                    rec.name, rec.origin_id
                )))
            }
        };
        let what = match (of, p.tag) {
            (None, _) => format!("origin {} (export {})", rec.origin_id, rec.name),
            (Some(t), None) => format!(
                "snapshot {t} of origin {} (export {})",
                rec.origin_id, rec.name
            ),
            (Some(t), Some(_)) => format!(
                "snapshot {t} of origin {} (through export {} of the origin)",
                rec.origin_id, rec.name
            ),
        };
        let created = if p.sync {
            origin.create_snapshot_sync(of, &p.memo)
        } else {
            origin.create_snapshot(of, &p.memo)
        };
        let tag = created.map_err(MethodError::engine(format!("cannot snapshot {what}")))?;
        info!("snapshot {tag} taken of {what}");
        Ok(m::SnapshotCreateResult {
            tag: Some(tag),
            tags: None,
        })
    }

    /// `snapshot_create` with `names`: every export's volume cut at one instant, all or
    /// nothing (the engine's `snapshot_group`).
    fn snapshot_group(&self, p: m::SnapshotCreateParams) -> MResult<m::SnapshotCreateResult> {
        if p.tag.is_some() {
            return Err(MethodError::InvalidParams(
                "tag is for a snapshot through one export (name), not for a group (names)".into(),
            ));
        }
        let mut guard = self.lock();
        let inner = &mut *guard;
        let mut members = Vec::with_capacity(p.names.len());
        for (i, name) in p.names.iter().enumerate() {
            if p.names[..i].contains(name) {
                return Err(MethodError::InvalidParams(format!(
                    "export {name} is named twice in the group"
                )));
            }
            let rec = self.find_export(inner, name)?;
            let origin = self.origin_of(inner, &rec)?;
            members.push((rec, origin));
        }
        let vols: Vec<(&snapmv_engine::Origin, Option<u32>)> =
            members.iter().map(|(r, o)| (o, r.tag)).collect();
        let tags = snapmv_engine::snapshot_group(&vols, &p.memo, p.sync).map_err(|e| {
            let what = match e.member {
                Some(i) => format!(
                    "cannot snapshot the group {}: export {} failed, no snapshot was kept{}",
                    p.names.join(" "),
                    p.names[i],
                    left_note(&p.names, &e.left)
                ),
                None => format!("cannot snapshot the group {}", p.names.join(" ")),
            };
            MethodError::engine(what)(e.error)
        })?;
        let tags: Vec<m::NamedTag> = p
            .names
            .iter()
            .zip(tags)
            .map(|(name, tag)| m::NamedTag {
                name: name.clone(),
                tag,
            })
            .collect();
        let each: Vec<String> = tags
            .iter()
            .map(|t| format!("{} {}", t.name, t.tag))
            .collect();
        info!("group snapshot taken at one instant: {}", each.join(", "));
        Ok(m::SnapshotCreateResult {
            tag: None,
            tags: Some(tags),
        })
    }

    /// `snapshot_memo`: a snapshot's memo, changed durably (journal record 17).
    pub(crate) fn snapshot_memo(&self, p: m::SnapshotMemoParams) -> MResult<m::SnapshotMemoResult> {
        let mut guard = self.lock();
        let inner = &mut *guard;
        let rec = self.find_export(inner, &p.name)?;
        let origin = self.origin_of(inner, &rec)?;
        origin
            .set_memo(p.tag, &p.memo)
            .map_err(MethodError::engine(format!(
                "cannot change the memo of snapshot {} of origin {} (export {})",
                p.tag, rec.origin_id, rec.name
            )))?;
        info!(
            "snapshot {} of origin {}: memo set to {:?}",
            p.tag, rec.origin_id, p.memo
        );
        Ok(m::SnapshotMemoResult {
            name: rec.name,
            tag: p.tag,
            memo: p.memo,
        })
    }

    pub(crate) fn snapshot_delete(&self, p: m::SnapshotDeleteParams) -> MResult<m::Done> {
        let mut guard = self.lock();
        let inner = &mut *guard;
        let (rec, origin) = self.origin_export(inner, &p.name, names::SNAPSHOT_DELETE)?;
        let users = inner
            .state
            .exported_as(&rec.cow, &rec.origin_id, Some(p.tag));
        if !users.is_empty() {
            return Err(MethodError::Busy(format!(
                "snapshot {} of origin {} is exported as {}; remove that export first",
                p.tag,
                rec.origin_id,
                users.join(", ")
            )));
        }
        let deleted = if p.sync {
            origin.delete_snapshot_sync(p.tag)
        } else {
            origin.delete_snapshot(p.tag)
        };
        deleted.map_err(MethodError::engine(format!(
            "cannot delete snapshot {} of origin {} (export {})",
            p.tag, rec.origin_id, rec.name
        )))?;
        info!("snapshot {} of origin {} deleted", p.tag, rec.origin_id);
        Ok(m::Done { name: rec.name })
    }

    pub(crate) fn snapshot_rollback(
        &self,
        p: m::SnapshotRollbackParams,
    ) -> MResult<m::SnapshotRollbackResult> {
        let (rec, origin) = {
            let mut guard = self.lock();
            let inner = &mut *guard;
            let (rec, origin) = self.origin_export(inner, &p.name, names::SNAPSHOT_ROLLBACK)?;
            if inner
                .readonly_origins
                .contains(&(rec.cow.clone(), rec.origin_id.clone()))
            {
                return Err(MethodError::InvalidState(format!(
                    "cannot roll origin {} (export {}) back: it is open read-only, and a rollback writes the origin",
                    rec.origin_id, rec.name
                )));
            }
            origin.rollback(p.tag).map_err(MethodError::engine(format!(
                "cannot roll origin {} (export {}) back to snapshot {}",
                rec.origin_id, rec.name, p.tag
            )))?;
            info!(
                "rollback of origin {} to snapshot {} started",
                rec.origin_id, p.tag
            );
            if p.wait {
                *inner.waiters.entry(rec.cow.clone()).or_insert(0) += 1;
            }
            (rec, origin)
        };
        if p.wait {
            let waited = origin.wait_rollback();
            {
                let mut inner = self.lock();
                if let Some(n) = inner.waiters.get_mut(&rec.cow) {
                    *n = n.saturating_sub(1);
                }
            }
            waited.map_err(MethodError::engine(format!(
                "rollback of origin {} (export {}) to snapshot {} failed",
                rec.origin_id, rec.name, p.tag
            )))?;
        }
        let progress = origin.rollback_progress();
        Ok(m::SnapshotRollbackResult {
            tag: p.tag,
            done: progress.is_none(),
            progress: progress.as_ref().map(convert::rollback_progress),
        })
    }

    pub(crate) fn snapshot_list(&self, p: m::OptionalNameParams) -> MResult<m::SnapshotList> {
        let mut guard = self.lock();
        let inner = &mut *guard;
        let keys: Vec<(String, String)> = match &p.name {
            Some(name) => {
                let rec = self.find_export(inner, name)?;
                self.origin_of(inner, &rec)?;
                vec![(rec.cow, rec.origin_id)]
            }
            None => {
                // Every origin of every open store: opened ones and those only bound.
                let mut k: Vec<_> = inner.origins.keys().cloned().collect();
                for (cow, store) in &inner.stores {
                    for id in store.status().dormant_origins {
                        k.push((cow.clone(), id));
                    }
                }
                k.sort();
                k.dedup();
                k
            }
        };
        let mut origins = Vec::new();
        for (cow, id) in keys {
            let Some(o) = inner.origins.get(&(cow.clone(), id.clone())) else {
                origins.push(m::OriginSnapshots {
                    origin: inner.state.origin_path(&cow, &id),
                    exported_as: inner.state.exported_as(&cow, &id, None),
                    origin_id: id,
                    cow,
                    open: false,
                    snapshots: Vec::new(),
                });
                continue;
            };
            let mut snaps = o.snapshots();
            snaps.sort_by_key(|s| s.tag);
            origins.push(m::OriginSnapshots {
                origin_id: id.clone(),
                origin: inner.state.origin_path(&cow, &id),
                cow: cow.clone(),
                exported_as: inner.state.exported_as(&cow, &id, None),
                open: true,
                snapshots: snaps
                    .iter()
                    .map(|s| convert::snapshot_info(&inner.state, &cow, &id, s))
                    .collect(),
            });
        }
        Ok(m::SnapshotList { origins })
    }
}

/// The snapshots a failed group could not delete again (normally none).
fn left_note(names: &[String], left: &[(usize, u32)]) -> String {
    if left.is_empty() {
        return String::new();
    }
    let l: Vec<String> = left
        .iter()
        .map(|(i, t)| format!("snapshot {t} of export {}", names[*i]))
        .collect();
    format!(
        " (except {}, which could not be deleted again)",
        l.join(", ")
    )
}
