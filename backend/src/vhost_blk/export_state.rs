//! What one export keeps across the connections of its clients: the cache mode the guest
//! chose (recorded in a file so that it also survives a restart of the daemon), the failure
//! counters that throttle logging, and the statistics.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use super::metrics::ExportMetrics;

/// State shared by the connections of one export.
///
/// The cache mode the guest chose survives reconnects and, through `cache_mode_file`, restarts
/// of the daemon: QEMU sends it only when the guest changes it, so a guest that chose
/// write-through would otherwise get a write-back device (unflushed writes acknowledged
/// before they are durable) after a restart. The virtio spec allows either mode after a reset.
#[derive(Debug)]
pub(crate) struct ExportState {
    pub(crate) writeback: AtomicBool,
    pub(crate) bad_requests: AtomicU64,
    pub(crate) disk_errors: AtomicU64,
    /// Counters since the export started (kept across reconnects).
    pub(crate) metrics: ExportMetrics,
    /// Where a write-through choice is recorded (the file exists only then).
    cache_mode_file: Option<PathBuf>,
}

impl Default for ExportState {
    fn default() -> Self {
        ExportState::new(None)
    }
}

impl ExportState {
    /// The state of an export, with the cache mode recorded in `cache_mode_file`, if any.
    pub(crate) fn new(cache_mode_file: Option<PathBuf>) -> Self {
        let write_through = cache_mode_file
            .as_deref()
            .is_some_and(|f| std::fs::read_to_string(f).is_ok_and(|t| t.trim() == WRITE_THROUGH));
        ExportState {
            writeback: AtomicBool::new(!write_through),
            bad_requests: AtomicU64::new(0),
            disk_errors: AtomicU64::new(0),
            metrics: ExportMetrics::new(),
            cache_mode_file,
        }
    }

    /// The export's counters.
    pub(crate) fn metrics(&self) -> &ExportMetrics {
        &self.metrics
    }

    /// Counts a problem that is the guest's (or the frontend's) and says whether to log it:
    /// the first 16, then every power of two.
    pub(crate) fn count_bad_request(&self) -> Option<u64> {
        let n = self.bad_requests.fetch_add(1, Ordering::Relaxed) + 1;
        (n <= 16 || n.is_power_of_two()).then_some(n)
    }

    /// Sets the cache mode and records a change.
    pub(crate) fn set_writeback(&self, name: &str, writeback: bool) {
        if self.writeback.swap(writeback, Ordering::SeqCst) == writeback {
            return;
        }
        log::info!(
            "export {name}: guest set cache mode to {}",
            if writeback {
                "write-back"
            } else {
                WRITE_THROUGH
            }
        );
        let Some(f) = &self.cache_mode_file else {
            return;
        };
        let r = if writeback {
            std::fs::remove_file(f).or_else(|e| {
                if e.kind() == io::ErrorKind::NotFound {
                    Ok(())
                } else {
                    Err(e)
                }
            })
        } else {
            write_atomically(f, WRITE_THROUGH)
        };
        if let Err(e) = r {
            log::error!(
                "export {name}: cannot record the cache mode in {}: {e}",
                f.display()
            );
        }
    }
}

/// The cache-mode file's content for write-through.
const WRITE_THROUGH: &str = "write-through";

/// Writes `text` to `path` through a temporary file and a rename, then syncs the directory.
fn write_atomically(path: &Path, text: &str) -> io::Result<()> {
    use std::io::Write;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}
