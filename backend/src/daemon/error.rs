//! Method errors and their mapping to JSON-RPC error codes, in one place.

use snapmv_rpc::methods::names;
use snapmv_rpc::{codes, ErrorObject};

use crate::export::ExportError;
use crate::state::StateError;

/// Why a method failed; turned into a JSON-RPC error object.
#[derive(Debug, thiserror::Error)]
pub enum MethodError {
    /// The engine refused or failed.
    #[error("{what}: {source}")]
    Engine {
        /// What was being done, naming the object.
        what: String,
        /// The engine's error.
        #[source]
        source: snapmv_engine::Error,
    },
    /// The export manager refused or failed.
    #[error("{what}: {source}")]
    Export {
        /// What was being done, naming the export.
        what: String,
        /// The export manager's error.
        #[source]
        source: ExportError,
    },
    /// The change was made but could not be recorded.
    #[error("{what}, but the state could not be saved (a restart would forget it): {source}")]
    State {
        /// The change.
        what: String,
        /// The state directory's error.
        #[source]
        source: StateError,
    },
    /// Bad parameters.
    #[error("{0}")]
    InvalidParams(String),
    /// Unknown method.
    #[error("method {0:?} does not exist; methods are {list}", list = names::ALL.join(", "))]
    NoMethod(String),
    /// Something named does not exist.
    #[error("{0}")]
    NotFound(String),
    /// Something already exists or is in use.
    #[error("{0}")]
    AlreadyExists(String),
    /// A conflicting operation holds the object.
    #[error("{0}")]
    Busy(String),
    /// The operation does not apply to the object.
    #[error("{0}")]
    InvalidState(String),
    /// The origin still has snapshots.
    #[error("{0}")]
    HasSnapshots(String),
    /// The file holds no snapmv store.
    #[error("{0}")]
    NotAStore(String),
    /// A store or origin is held by another process (or already open in this one).
    #[error("{what} {path} is in use by {holder}; snapmv opens every store and origin exclusively (docs/security.md)")]
    InUse {
        /// Its role: "COW store", "origin".
        what: String,
        /// The path.
        path: String,
        /// The holder: `process 1234 (snapmv)`.
        holder: String,
        /// The OS error, carrying a [`snapmv_engine::InUse`].
        #[source]
        source: std::io::Error,
    },
    /// A store or origin could not be opened (not permitted...).
    #[error("{what}: {source}")]
    Open {
        /// Which file, in which role, and how.
        what: String,
        /// The OS error; for a file in use, it carries a [`snapmv_engine::InUse`].
        #[source]
        source: std::io::Error,
    },
}

impl MethodError {
    pub(crate) fn engine(
        what: impl Into<String>,
    ) -> impl FnOnce(snapmv_engine::Error) -> MethodError {
        let what = what.into();
        move |source| MethodError::Engine { what, source }
    }

    /// The JSON-RPC error code.
    pub fn code(&self) -> i64 {
        use snapmv_engine::Error as E;
        match self {
            MethodError::Engine { source, .. } => match source {
                E::Io { .. } => codes::IO_ERROR,
                E::NoSpace { .. } => codes::NO_SPACE,
                E::Corrupt { .. } => codes::CORRUPT,
                E::NotFound(_) => codes::NOT_FOUND,
                E::AlreadyExists(_) => codes::ALREADY_EXISTS,
                E::Busy(_) => codes::BUSY,
                E::HasSnapshots(_) => codes::HAS_SNAPSHOTS,
                E::InvalidArgument(_) => codes::INVALID_PARAMS,
                E::ReadOnly(_) => codes::READ_ONLY,
                E::Deleted(_) => codes::INVALID_STATE,
                E::Limit(_) => codes::LIMIT,
                #[allow(unreachable_patterns)]
                _ => codes::INTERNAL_ERROR,
            },
            MethodError::Export { source, .. } => match source {
                ExportError::AlreadyExists(_)
                | ExportError::SocketTaken { .. }
                | ExportError::SocketInUse(_)
                | ExportError::NotASocket(_) => codes::ALREADY_EXISTS,
                ExportError::NotFound(_) => codes::NOT_FOUND,
                ExportError::InvalidConfig { .. } => codes::INVALID_PARAMS,
                _ => codes::IO_ERROR,
            },
            MethodError::State { .. } => codes::INTERNAL_ERROR,
            MethodError::InvalidParams(_) => codes::INVALID_PARAMS,
            MethodError::NoMethod(_) => codes::METHOD_NOT_FOUND,
            MethodError::NotFound(_) => codes::NOT_FOUND,
            MethodError::AlreadyExists(_) => codes::ALREADY_EXISTS,
            MethodError::Busy(_) => codes::BUSY,
            MethodError::InvalidState(_) => codes::INVALID_STATE,
            MethodError::HasSnapshots(_) => codes::HAS_SNAPSHOTS,
            MethodError::NotAStore(_) => codes::CORRUPT,
            MethodError::InUse { .. } => codes::BUSY,
            MethodError::Open { .. } => codes::IO_ERROR,
        }
    }

    pub(crate) fn to_object(&self) -> ErrorObject {
        ErrorObject::new(self.code(), self.to_string())
    }
}

/// A method's outcome.
pub type MResult<T> = Result<T, MethodError>;
