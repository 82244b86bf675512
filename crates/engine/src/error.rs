//! Engine errors. Every variant names the object and the cause.

use std::io;
use std::sync::Arc;

/// Result type of the engine.
pub type Result<T> = std::result::Result<T, Error>;

/// What can go wrong in the engine.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O call on a backing file failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, naming the file.
        context: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The store holds no free chunk for a write that needs one.
    #[error("no space left in COW store {store}: {what}")]
    NoSpace {
        /// The store's path.
        store: String,
        /// What needed the space.
        what: String,
    },
    /// Metadata on disk failed a check.
    #[error("COW store {store} is damaged: {what}")]
    Corrupt {
        /// The store's path.
        store: String,
        /// What is wrong and where (structure, offset).
        what: String,
    },
    /// An object does not exist.
    #[error("{0} not found")]
    NotFound(String),
    /// An object already exists.
    #[error("{0} already exists")]
    AlreadyExists(String),
    /// The operation conflicts with one in progress.
    #[error("{0}")]
    Busy(String),
    /// The origin still has snapshots.
    #[error("origin {0} still has snapshots; delete them first")]
    HasSnapshots(String),
    /// An argument is out of range or malformed.
    #[error("{0}")]
    InvalidArgument(String),
    /// A read-only volume was written.
    #[error("{0} is read-only")]
    ReadOnly(String),
    /// The volume was deleted while a handle to it was still in use.
    #[error("{0} has been deleted")]
    Deleted(String),
    /// A limit of the format was reached.
    #[error("{0}")]
    Limit(String),
}

/// The commit failure that stopped a store: every later write is refused with it (as the
/// source of an [`Error::Io`], whose [`Error::kind`] is [`ErrorKind::StoreFailed`]).
/// Cloneable, so each refusal carries the same cause.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct CommitFailed(Arc<dyn std::error::Error + Send + Sync>);

impl CommitFailed {
    pub(crate) fn new(cause: impl std::error::Error + Send + Sync + 'static) -> Self {
        CommitFailed(Arc::new(cause))
    }

    /// What failed (a journal write, a sync, a checkpoint write), with its OS error as source.
    pub fn cause(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        self.0.as_ref()
    }
}

/// What kind of error, for callers that map errors to errno values or RPC codes without
/// looking at messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// An I/O call on a backing file failed ([`Error::Io`]).
    Io,
    /// The store stopped after a failed metadata write and refuses every write
    /// ([`Error::Io`] whose source is a [`crate::CommitFailed`]).
    StoreFailed,
    /// [`Error::NoSpace`].
    NoSpace,
    /// [`Error::Corrupt`].
    Corrupt,
    /// [`Error::NotFound`].
    NotFound,
    /// [`Error::AlreadyExists`].
    AlreadyExists,
    /// [`Error::Busy`].
    Busy,
    /// [`Error::HasSnapshots`].
    HasSnapshots,
    /// [`Error::InvalidArgument`].
    InvalidArgument,
    /// [`Error::ReadOnly`].
    ReadOnly,
    /// [`Error::Deleted`].
    Deleted,
    /// [`Error::Limit`].
    Limit,
}

impl Error {
    /// The kind of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Io { source, .. } => {
                let failed = source.get_ref().is_some_and(|e| e.is::<CommitFailed>());
                if failed {
                    ErrorKind::StoreFailed
                } else {
                    ErrorKind::Io
                }
            }
            Error::NoSpace { .. } => ErrorKind::NoSpace,
            Error::Corrupt { .. } => ErrorKind::Corrupt,
            Error::NotFound(_) => ErrorKind::NotFound,
            Error::AlreadyExists(_) => ErrorKind::AlreadyExists,
            Error::Busy(_) => ErrorKind::Busy,
            Error::HasSnapshots(_) => ErrorKind::HasSnapshots,
            Error::InvalidArgument(_) => ErrorKind::InvalidArgument,
            Error::ReadOnly(_) => ErrorKind::ReadOnly,
            Error::Deleted(_) => ErrorKind::Deleted,
            Error::Limit(_) => ErrorKind::Limit,
        }
    }

    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// The errno a block device would report for this error.
    pub fn errno(&self) -> i32 {
        match (self.kind(), self) {
            (ErrorKind::NoSpace, _) => libc::ENOSPC,
            (ErrorKind::InvalidArgument, _) => libc::EINVAL,
            (ErrorKind::ReadOnly, _) => libc::EROFS,
            (_, Error::Io { source, .. }) => source.raw_os_error().unwrap_or(libc::EIO),
            _ => libc::EIO,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kind_tells_a_stopped_store_from_other_io_errors() {
        let failed = Error::io(
            "COW store s stopped after a failed metadata write",
            io::Error::other(CommitFailed::new(io::Error::other("disk gone"))),
        );
        assert_eq!(failed.kind(), ErrorKind::StoreFailed);
        assert_eq!(failed.errno(), libc::EIO);
        assert!(failed.to_string().ends_with("write: disk gone"), "{failed}");
        let plain = Error::io("reading", io::Error::from_raw_os_error(libc::ENXIO));
        assert_eq!(plain.kind(), ErrorKind::Io);
        assert_eq!(plain.errno(), libc::ENXIO);
        let full = Error::NoSpace {
            store: "s".into(),
            what: "w".into(),
        };
        assert_eq!(
            (full.kind(), full.errno()),
            (ErrorKind::NoSpace, libc::ENOSPC)
        );
        assert_eq!(Error::ReadOnly("v".into()).errno(), libc::EROFS);
        assert_eq!(Error::Busy("b".into()).kind(), ErrorKind::Busy);
    }
}
