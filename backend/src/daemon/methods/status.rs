//! `status`.

use snapmv_rpc::methods as m;

use crate::daemon::convert;
use crate::daemon::core::Daemon;
use crate::daemon::error::MResult;

impl Daemon {
    pub(crate) fn status(&self, p: m::OptionalNameParams) -> MResult<m::Status> {
        let mut guard = self.lock();
        let inner = &mut *guard;
        let (cows, only_origin) = match &p.name {
            Some(name) => {
                let rec = self.find_export(inner, name)?;
                self.origin_of(inner, &rec)?;
                (vec![rec.cow.clone()], Some(rec.origin_id))
            }
            None => {
                let mut c: Vec<String> = inner.stores.keys().cloned().collect();
                c.sort();
                (c, None)
            }
        };
        let mut stores = Vec::new();
        for cow in cows {
            let Some(store) = inner.stores.get(&cow) else {
                continue;
            };
            let st = store.status();
            let mut origins = Vec::new();
            for o in st.origins {
                if only_origin.as_ref().is_some_and(|id| *id != o.origin_id) {
                    continue;
                }
                let mut exported_as: Vec<String> = inner
                    .state
                    .exports
                    .iter()
                    .filter(|e| e.cow == cow && e.origin_id == o.origin_id)
                    .map(|e| e.name.clone())
                    .collect();
                exported_as.sort();
                origins.push(m::OriginStatus {
                    origin_id: o.origin_id.clone(),
                    origin: o.origin_path.clone(),
                    size: o.size,
                    snapshots: o.snapshots as u64,
                    rollback: o.rollback.as_ref().map(convert::rollback_progress),
                    reclaim_pending_chunks: o.reclaim_pending_chunks,
                    exported_as,
                    open: true,
                });
            }
            if only_origin.is_none() {
                let mut dormant = st.dormant_origins.clone();
                dormant.sort();
                for id in dormant {
                    origins.push(m::OriginStatus {
                        origin: inner.state.origin_path(&cow, &id),
                        exported_as: inner.state.exported_as(&cow, &id, None),
                        origin_id: id,
                        size: 0,
                        snapshots: 0,
                        rollback: None,
                        reclaim_pending_chunks: 0,
                        open: false,
                    });
                }
            }
            stores.push(m::StoreStatus {
                cow: cow.clone(),
                chunk_size: st.chunk_size,
                chunks_total: st.chunks_total,
                chunks_used: st.chunks_used,
                chunks_free: st.chunks_free,
                low_space_percent: self.space.percent(),
                low_space: self.space.observe(&cow, st.chunks_total, st.chunks_free),
                origins,
            });
        }
        let unavailable = if p.name.is_none() {
            let mut u: Vec<m::Unavailable> = inner
                .state
                .stores
                .iter()
                .filter(|s| !inner.stores.contains_key(&s.path))
                .map(|s| m::Unavailable {
                    cow: s.path.clone(),
                    error: inner
                        .state
                        .exports
                        .iter()
                        .filter(|e| e.cow == s.path)
                        .find_map(|e| inner.failed.get(&e.name).cloned())
                        .unwrap_or_else(|| "not open".into()),
                })
                .collect();
            u.sort_by(|a, b| a.cow.cmp(&b.cow));
            u
        } else {
            Vec::new()
        };
        Ok(m::Status {
            stores,
            unavailable,
        })
    }
}
