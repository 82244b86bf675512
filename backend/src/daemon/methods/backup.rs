//! `snapshot_diff` and `snapshot_stream`: reading versions out for backups.

use std::os::unix::fs::FileTypeExt;

use snapmv_rpc::methods as m;

use crate::daemon::core::Daemon;
use crate::daemon::error::{MResult, MethodError};
use crate::daemon::paths::{lookup_error, require_absolute};

impl Daemon {
    pub(crate) fn snapshot_diff(&self, p: m::SnapshotDiffParams) -> MResult<m::SnapshotDiffResult> {
        let origin = self.any_origin(&p.name)?;
        let to = match p.to {
            Some(t) => format!("snapshot {t}"),
            None => "the origin".into(),
        };
        let extents = origin
            .diff(Some(p.from), p.to)
            .map_err(MethodError::engine(format!(
                "cannot diff snapshot {} against {to} of origin {}",
                p.from,
                origin.id()
            )))?;
        Ok(m::SnapshotDiffResult {
            chunk_size: origin.chunk_size(),
            size: origin.size(),
            extents: extents
                .into_iter()
                .map(|(offset, length)| m::Extent { offset, length })
                .collect(),
        })
    }

    pub(crate) fn snapshot_stream(
        &self,
        p: m::SnapshotStreamParams,
    ) -> MResult<m::SnapshotStreamResult> {
        let origin = self.any_origin(&p.name)?;
        let conv = |what: String| {
            move |e: crate::stream::StreamError| match e {
                crate::stream::StreamError::Engine { source, .. } => {
                    MethodError::engine(what.clone())(source)
                }
                crate::stream::StreamError::Io { source, .. } => MethodError::Open {
                    what: what.clone(),
                    source,
                },
                crate::stream::StreamError::Invalid(s) => MethodError::InvalidState(s),
            }
        };
        match (&p.fifo, &p.fd_socket) {
            (Some(fifo), None) => {
                let f = open_fifo(fifo)?;
                let mut out = std::io::BufWriter::with_capacity(256 << 10, f);
                let what = format!("streaming export {} into {fifo}", p.name);
                let stats = crate::stream::write_stream(&origin, p.from, p.to, &mut out)
                    .map_err(conv(what))?;
                Ok(m::SnapshotStreamResult {
                    records: stats.records,
                    data_bytes: stats.data_bytes,
                    size: origin.size(),
                })
            }
            (None, Some(sock)) => {
                if p.from.is_some() {
                    return Err(MethodError::InvalidParams(
                        "fd_socket writes whole versions only (no from)".into(),
                    ));
                }
                let (mut s, file) = receive_file(sock)?;
                {
                    use std::io::Write;
                    // The size first, then the bytes covered as they are.
                    let _ = s.write_all(&origin.size().to_be_bytes());
                }
                let what = format!("exporting export {} into the file from {sock}", p.name);
                let written = crate::stream::write_raw(&origin, p.to, &file, p.writeback, |at| {
                    use std::io::Write;
                    let _ = s.write_all(&at.to_be_bytes());
                })
                .map_err(conv(what))?;
                Ok(m::SnapshotStreamResult {
                    records: 0,
                    data_bytes: written,
                    size: origin.size(),
                })
            }
            _ => Err(MethodError::InvalidParams(
                "give exactly one of fifo and fd_socket".into(),
            )),
        }
    }
}

/// Opens a store or origin file exclusively (`FileStorage::open_with`: an exclusive `flock`
/// on the descriptor, `O_EXCL` for a block device); a file another process holds is refused
/// with `busy`, naming the holder.
/// Connects to the caller's socket and receives the file to write (a regular file opened for
/// writing).
pub(crate) fn receive_file(path: &str) -> MResult<(std::os::unix::net::UnixStream, std::fs::File)> {
    use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};
    use std::mem::MaybeUninit;
    require_absolute("fd_socket", path)?;
    let s = std::os::unix::net::UnixStream::connect(path).map_err(|source| MethodError::Open {
        what: format!("connecting to fd_socket {path}"),
        source,
    })?;
    let _ = s.set_read_timeout(Some(std::time::Duration::from_secs(30)));
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut cmsg = RecvAncillaryBuffer::new(&mut space);
    let mut byte = [0u8; 1];
    rustix::net::recvmsg(
        &s,
        &mut [std::io::IoSliceMut::new(&mut byte)],
        &mut cmsg,
        RecvFlags::CMSG_CLOEXEC,
    )
    .map_err(|e| MethodError::Open {
        what: format!("receiving a file from {path}"),
        source: e.into(),
    })?;
    let mut fd = None;
    for msg in cmsg.drain() {
        if let RecvAncillaryMessage::ScmRights(mut fds) = msg {
            if fd.is_none() {
                fd = fds.next();
            }
        }
    }
    let Some(fd) = fd else {
        return Err(MethodError::InvalidParams(format!(
            "{path} sent no file descriptor"
        )));
    };
    let f = std::fs::File::from(fd);
    let md = f.metadata().map_err(|source| MethodError::Open {
        what: format!("examining the file from {path}"),
        source,
    })?;
    if !md.file_type().is_file() {
        return Err(MethodError::InvalidParams(format!(
            "the file descriptor from {path} is not a regular file"
        )));
    }
    Ok((s, f))
}

/// Opens the caller's FIFO for writing. Only a FIFO is accepted, so the daemon never writes a
/// file on a client's behalf. Waits up to 30 s for the reader to open its end.
pub(crate) fn open_fifo(path: &str) -> MResult<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    use std::time::Duration;
    require_absolute("fifo", path)?;
    let md = std::fs::metadata(path).map_err(lookup_error("fifo", path, "examined"))?;
    if !md.file_type().is_fifo() {
        return Err(MethodError::InvalidParams(format!(
            "{path} is not a FIFO (snapshot_stream writes only into a FIFO its caller reads)"
        )));
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let f = loop {
        match std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(path)
        {
            Ok(f) => break f,
            // No reader yet.
            Err(e)
                if e.raw_os_error() == Some(libc::ENXIO)
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(source) => {
                return Err(MethodError::Open {
                    what: format!("opening fifo {path} for writing (is its reader there?)"),
                    source,
                })
            }
        }
    };
    // Blocking from now on (the open only had to not wait for a reader).
    if let Ok(fl) = rustix::fs::fcntl_getfl(&f) {
        let _ = rustix::fs::fcntl_setfl(&f, fl - rustix::fs::OFlags::NONBLOCK);
    }
    // A larger pipe buffer means fewer wake-ups; failure is harmless.
    let _ = rustix::pipe::fcntl_setpipe_size(&f, 1 << 20);
    Ok(f)
}
