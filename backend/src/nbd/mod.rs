//! A small NBD server (docs/nbd.md): fixed newstyle handshake, `NBD_OPT_GO`/`INFO`/
//! `EXPORT_NAME`/`LIST`/`ABORT`, structured replies, the `base:allocation` meta context, and
//! `snapmv:changed:TAG` (the chunks that may differ from snapshot TAG, as QEMU offers
//! `qemu:dirty-bitmap:NAME`). Protocol: NetworkBlockDevice/nbd `doc/proto.md`.
//!
//! One thread per connection, requests served in order. Anything a client sends is checked;
//! a malformed request gets an error reply, or the connection is closed when the stream can no
//! longer be trusted (bad magic, oversize write payload). The daemon never panics on input.

mod handshake;
mod proto;
#[cfg(test)]
mod tests;
mod transmission;

use std::io::{IoSlice, IoSliceMut, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;

use crate::vhost_blk::{BlockDisk, DiskError};
use handshake::Conn;
pub use proto::{
    check_request, parse_request, BadMagic, Request, CMD_BLOCK_STATUS, CMD_DISC, CMD_FLUSH,
    CMD_READ, CMD_TRIM, CMD_WRITE, CMD_WRITE_ZEROES,
};

/// The changed extents since a snapshot tag (for `snapmv:changed:TAG`).
pub type ChangedFn = dyn Fn(u32) -> Result<Vec<(u64, u64)>, String> + Send + Sync;

/// What one NBD export serves.
pub struct NbdExport {
    /// Export name (what clients ask for).
    pub name: String,
    /// The volume.
    pub disk: Arc<dyn BlockDisk>,
    /// Refuse writes.
    pub readonly: bool,
    /// Granularity of allocation reports (the store's chunk size).
    pub chunk_size: u32,
    /// Answers `snapmv:changed:TAG`; `None`: no such context.
    pub changed: Option<Arc<ChangedFn>>,
    /// Requests, bytes, errors and latency since the export started (as for vhost-user-blk).
    pub metrics: Arc<crate::vhost_blk::metrics::ExportMetrics>,
}

/// Why a connection ended abnormally.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    /// The socket failed (includes the client going away).
    #[error("NBD connection: {0}")]
    Io(#[from] std::io::Error),
    /// The client broke the protocol so that the stream cannot be followed any more.
    #[error("NBD client broke the protocol: {0}")]
    Protocol(String),
}

/// Runs one connection to completion over any byte stream (tests and fuzzing use memory).
pub fn serve_connection<S: Read + Write>(
    s: S,
    exports: &dyn Fn(&str) -> Option<Arc<NbdExport>>,
) -> Result<(), NbdError> {
    let mut c = Conn {
        s,
        exports,
        structured: false,
        no_zeroes: false,
        contexts: Vec::new(),
        changed: Vec::new(),
    };
    let Some(e) = c.handshake()? else {
        return Ok(());
    };
    c.transmission(&e)
}

/// A volume whose single-buffer reads (every NBD read) go through
/// [`snapmv_engine::Volume::read_bulk`]: a snapshot's runs of chunks on the origin device are
/// read at once. Everything else is the volume's own [`BlockDisk`].
pub struct BulkVolume(pub snapmv_engine::Volume);

impl BlockDisk for BulkVolume {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn read_vectored(&self, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> Result<(), DiskError> {
        if let [b] = bufs {
            return self.0.read_bulk(offset, b).map_err(|e| DiskError::Failed {
                disk: self.0.name(),
                source: Box::new(e),
            });
        }
        BlockDisk::read_vectored(&self.0, offset, bufs)
    }
    fn write_vectored(&self, offset: u64, bufs: &[IoSlice<'_>]) -> Result<(), DiskError> {
        BlockDisk::write_vectored(&self.0, offset, bufs)
    }
    fn flush(&self) -> Result<(), DiskError> {
        BlockDisk::flush(&self.0)
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        BlockDisk::discard(&self.0, offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        BlockDisk::write_zeroes(&self.0, offset, len)
    }
    fn name(&self) -> String {
        BlockDisk::name(&self.0)
    }
    fn physical_block_size(&self) -> u32 {
        BlockDisk::physical_block_size(&self.0)
    }
}

/// One NBD export listening on a Unix socket.
pub struct NbdServer {
    name: String,
    volume: String,
    readonly: bool,
    path: PathBuf,
    stop: Arc<AtomicBool>,
    clients: Arc<AtomicUsize>,
    /// The live connections (clones), shut down when the export stops.
    conns: Arc<std::sync::Mutex<Vec<(u64, UnixStream)>>>,
    thread: Option<std::thread::JoinHandle<()>>,
    metrics: Arc<crate::vhost_blk::metrics::ExportMetrics>,
}

impl NbdServer {
    /// Listens on `path` (an existing socket file is replaced; the socket gets `mode` and
    /// `group`) and serves `export`; `volume` describes it for listings.
    pub fn start(
        path: &Path,
        export: NbdExport,
        volume: String,
        mode: u32,
        group: Option<u32>,
    ) -> std::io::Result<NbdServer> {
        if let Ok(md) = std::fs::symlink_metadata(path) {
            use std::os::unix::fs::FileTypeExt;
            if md.file_type().is_socket() {
                let _ = std::fs::remove_file(path);
            }
        }
        let l = UnixListener::bind(path)?;
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode & 0o777))?;
            if let Some(g) = group {
                std::os::unix::fs::chown(path, None, Some(g))?;
            }
        }
        let (name, readonly) = (export.name.clone(), export.readonly);
        let metrics = export.metrics.clone();
        let stop = Arc::new(AtomicBool::new(false));
        let clients = Arc::new(AtomicUsize::new(0));
        let export = Arc::new(export);
        let conns: Arc<std::sync::Mutex<Vec<(u64, UnixStream)>>> = Arc::default();
        let (st, cl, cn) = (stop.clone(), clients.clone(), conns.clone());
        let thread = std::thread::Builder::new()
            .name(format!("nbd-{}", export.name))
            .spawn(move || {
                let mut next_id = 0u64;
                for conn in l.incoming() {
                    if st.load(SeqCst) {
                        break;
                    }
                    let Ok(s) = conn else { continue };
                    let e = export.clone();
                    let cl = cl.clone();
                    let id = next_id;
                    next_id += 1;
                    if let Ok(c) = s.try_clone() {
                        cn.lock().unwrap_or_else(|p| p.into_inner()).push((id, c));
                    }
                    let cn2 = cn.clone();
                    let cl_failed = cl.clone();
                    cl.fetch_add(1, SeqCst);
                    let spawned = std::thread::Builder::new()
                        .name(format!("nbd-{}-c", e.name))
                        .spawn(move || {
                            let name = e.name.clone();
                            let lookup =
                                move |n: &str| (n == e.name || n.is_empty()).then(|| e.clone());
                            if let Err(err) = serve_connection(&s, &lookup) {
                                log::info!("NBD export {name}: client: {err}");
                            }
                            let _ = s.shutdown(std::net::Shutdown::Both);
                            cn2.lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .retain(|(i, _)| *i != id);
                            cl.fetch_sub(1, SeqCst);
                        });
                    if spawned.is_err() {
                        // Could not serve it: the stream is dropped (closed).
                        log::warn!("NBD: cannot start a connection thread");
                        cn.lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .retain(|(i, _)| *i != id);
                        cl_failed.fetch_sub(1, SeqCst);
                    }
                }
            })?;
        Ok(NbdServer {
            name,
            volume,
            readonly,
            path: path.to_path_buf(),
            stop,
            clients,
            conns,
            thread: Some(thread),
            metrics,
        })
    }

    /// Connected clients.
    pub fn clients(&self) -> usize {
        self.clients.load(SeqCst)
    }

    /// The export's counters since it started, over all its clients.
    pub fn stats(&self) -> crate::vhost_blk::metrics::ExportStats {
        self.metrics.snapshot()
    }

    /// As listed with the vhost-user exports.
    pub fn info(&self) -> crate::export::ExportInfo {
        crate::export::ExportInfo {
            name: self.name.clone(),
            socket: self.path.clone(),
            num_queues: 1,
            readonly: self.readonly,
            connected: self.clients() > 0,
            volume: self.volume.clone(),
        }
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        self.stop.store(true, SeqCst);
        // Wake the accept loop.
        let _ = UnixStream::connect(&self.path);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        // Connected clients lose the export (a removal with force): their threads see the
        // shut-down socket and end.
        for (_, c) in self.conns.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
        let _ = std::fs::remove_file(&self.path);
    }
}
