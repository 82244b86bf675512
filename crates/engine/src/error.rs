//! Engine errors. Every variant names the object and the cause.

use std::io;

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

impl Error {
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// The errno a block device would report for this error.
    pub fn errno(&self) -> i32 {
        match self {
            Error::NoSpace { .. } => libc::ENOSPC,
            Error::InvalidArgument(_) => libc::EINVAL,
            Error::ReadOnly(_) => libc::EROFS,
            Error::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            _ => libc::EIO,
        }
    }
}
