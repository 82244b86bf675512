//! Engine and state → RPC result types.

use snapmv_rpc::methods as m;

use super::core::{Daemon, Inner};
use crate::state::{ExportRecord, State};

impl Daemon {
    pub(crate) fn export_info(&self, inner: &Inner, rec: &ExportRecord) -> m::ExportInfo {
        let live = self.live_get(&rec.name);
        let origin_path = inner.state.origin_path(&rec.cow, &rec.origin_id);
        let size = inner
            .origins
            .get(&(rec.cow.clone(), rec.origin_id.clone()))
            .map(|o| o.size())
            .unwrap_or(0);
        m::ExportInfo {
            name: rec.name.clone(),
            socket: rec.socket.clone(),
            volume: live
                .as_ref()
                .map(|l| l.volume.clone())
                .unwrap_or_else(|| describe(rec)),
            cow: rec.cow.clone(),
            origin: origin_path,
            origin_id: rec.origin_id.clone(),
            tag: rec.tag,
            size: if live.is_some() { size } else { 0 },
            num_queues: rec.num_queues,
            queue_size: rec.queue_size,
            readonly: rec.readonly,
            connected: live.as_ref().is_some_and(|l| l.connected),
            // A live export may fail too: its store or origin image was taken over (EIO), or
            // it waits for its store (incoming, `inner.failed`).
            error: self
                .export_failure(inner, rec)
                .or_else(|| live.is_none().then(|| "not being served".into())),
            serial: rec.serial.clone(),
        }
    }
}

pub(crate) fn describe(rec: &ExportRecord) -> String {
    match rec.tag {
        None => format!("origin {} of {}", rec.origin_id, rec.cow),
        Some(t) => format!("snapshot {t} of origin {} in {}", rec.origin_id, rec.cow),
    }
}

/// A rollback's progress.
pub(crate) fn rollback_progress(r: &snapmv_engine::RollbackProgress) -> m::RollbackProgress {
    m::RollbackProgress {
        tag: r.tag,
        chunks_done: r.chunks_done,
        chunks_total: r.chunks_total,
    }
}

/// Snapshot `s` of origin `origin_id` in store `cow`, with its exports.
pub(crate) fn snapshot_info(
    state: &State,
    cow: &str,
    origin_id: &str,
    s: &snapmv_engine::SnapshotInfo,
) -> m::SnapshotInfo {
    m::SnapshotInfo {
        tag: s.tag,
        parent: s.parent,
        memo: s.memo.clone(),
        birth_unix_secs: s.birth_unix_secs,
        exclusive_chunks: s.exclusive_chunks,
        shared_chunks: s.shared_chunks,
        exported_as: state.exported_as(cow, origin_id, Some(s.tag)),
    }
}
