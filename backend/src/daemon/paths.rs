//! Checks of parameters that look at the filesystem: paths (absolute, existing, a file or a
//! block device, not the daemon's own) or `rbd:` locators (an existing image, identified by
//! cluster, pool and image id), the roles of files (an origin is not a store), socket
//! paths, and socket groups (from /etc/group). The checks that need only the parameters and
//! the state are in `validate.rs`.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use snapmv_rpc::methods::parse_socket_mode;

use super::core::{Daemon, Inner};
use super::error::{MResult, MethodError};
use super::ownership::{is_rbd, rbd_identity};
use super::registry::{object_id, ObjectId};

impl Daemon {
    /// Checks and canonicalises a path given over RPC; an `rbd:` locator is kept as given
    /// (its options say how to reach the cluster) and identified by its image.
    pub(crate) fn check_path(&self, what: &str, p: &str) -> MResult<(String, ObjectId)> {
        if p.is_empty() {
            return Err(MethodError::InvalidParams(format!("{what} path is empty")));
        }
        if is_rbd(p) {
            return Ok((p.to_string(), ObjectId::Rbd(rbd_identity(what, p)?)));
        }
        require_absolute(what, p)?;
        let canon = std::fs::canonicalize(p).map_err(lookup_error(what, p, "resolved"))?;
        let meta = std::fs::metadata(&canon).map_err(|e| {
            MethodError::InvalidParams(format!("{what} {p} cannot be examined: {e}"))
        })?;
        let ft = meta.file_type();
        if !(ft.is_file() || ft.is_block_device()) {
            return Err(MethodError::InvalidParams(format!(
                "{what} {p} is not a regular file or a block device"
            )));
        }
        if canon.starts_with(&self.state_dir_canon) {
            return Err(MethodError::InvalidParams(format!(
                "{what} {p} is inside the daemon's state directory {}",
                self.state_dir_canon.display()
            )));
        }
        let mut lock = self.rpc_socket.as_os_str().to_owned();
        lock.push(".lock");
        let id = ObjectId::File(meta.dev(), meta.ino());
        if object_id(&lock.to_string_lossy()).as_ref() == Some(&id) {
            return Err(MethodError::InvalidParams(format!(
                "{what} {p} is the daemon's RPC lock file"
            )));
        }
        let s = canon
            .to_str()
            .map(str::to_string)
            .ok_or_else(|| MethodError::InvalidParams(format!("{what} {p} is not valid UTF-8")))?;
        Ok((s, id))
    }

    /// Refuses `id` as an origin if it is a known store, and as a store if it is a known
    /// origin.
    pub(crate) fn check_roles(
        &self,
        inner: &Inner,
        origin: (&str, &ObjectId),
        cow: (&str, &ObjectId),
    ) -> MResult<()> {
        if origin.1 == cow.1 {
            return Err(MethodError::InvalidParams(format!(
                "origin {} and COW store {} are the same file or image",
                origin.0, cow.0
            )));
        }
        let stores = inner
            .stores
            .keys()
            .cloned()
            .chain(inner.state.origins.iter().map(|o| o.cow.clone()));
        for s in stores {
            if object_id(&s).as_ref() == Some(origin.1) {
                return Err(MethodError::AlreadyExists(format!(
                    "origin {} is the COW store {s} in use by this daemon",
                    origin.0
                )));
            }
        }
        for o in &inner.state.origins {
            if object_id(&o.path).as_ref() == Some(cow.1) {
                return Err(MethodError::AlreadyExists(format!(
                    "COW store {} is the origin {} (id {} in {}) known to this daemon",
                    cow.0, o.path, o.origin_id, o.cow
                )));
            }
        }
        Ok(())
    }

    pub(crate) fn socket_path(
        &self,
        inner: &Inner,
        name: &str,
        socket: Option<&str>,
    ) -> MResult<String> {
        let path = match socket {
            None => self.socket_dir.join(format!("{name}.sock")),
            Some(s) => {
                let p = Path::new(s);
                if !p.is_absolute() {
                    return Err(MethodError::InvalidParams(format!(
                        "socket path {s:?} of export {name} must be absolute"
                    )));
                }
                let (Some(parent), Some(file)) = (p.parent(), p.file_name()) else {
                    return Err(MethodError::InvalidParams(format!(
                        "socket path {s:?} of export {name} has no file name"
                    )));
                };
                let parent = std::fs::canonicalize(parent).map_err(|e| {
                    MethodError::NotFound(format!(
                        "directory {} of socket {s} for export {name} cannot be used: {e}",
                        parent.display()
                    ))
                })?;
                parent.join(file)
            }
        };
        let s = path.to_str().map(str::to_string).ok_or_else(|| {
            MethodError::InvalidParams(format!("socket path of export {name} is not UTF-8"))
        })?;
        if path == self.rpc_socket {
            return Err(MethodError::InvalidParams(format!(
                "socket {s} of export {name} is the daemon's RPC socket"
            )));
        }
        if path.starts_with(&self.state_dir_canon) {
            return Err(MethodError::InvalidParams(format!(
                "socket {s} of export {name} is inside the daemon's state directory"
            )));
        }
        if let Some(other) = inner.state.exports.iter().find(|e| e.socket == s) {
            return Err(MethodError::AlreadyExists(format!(
                "socket {s} is already used by export {}",
                other.name
            )));
        }
        match std::fs::symlink_metadata(&path) {
            Err(_) => {}
            Ok(meta) if meta.file_type().is_socket() => {
                if std::os::unix::net::UnixStream::connect(&path).is_ok() {
                    return Err(MethodError::AlreadyExists(format!(
                        "socket {s} for export {name} is in use by another process"
                    )));
                }
            }
            Ok(_) => {
                return Err(MethodError::AlreadyExists(format!(
                    "socket path {s} for export {name} exists and is not a socket; refusing to replace it"
                )))
            }
        }
        Ok(s)
    }
}

/// Refuses a relative path given over RPC (the daemon's working directory means nothing to
/// the caller).
pub(crate) fn require_absolute(what: &str, p: &str) -> MResult<()> {
    if Path::new(p).is_absolute() {
        Ok(())
    } else {
        Err(MethodError::InvalidParams(format!(
            "{what} path {p:?} must be absolute"
        )))
    }
}

/// Maps a failed look-up of `what` at `p`: not found, or why it could not be `done`.
pub(crate) fn lookup_error<'a>(
    what: &'a str,
    p: &'a str,
    done: &'a str,
) -> impl FnOnce(std::io::Error) -> MethodError + 'a {
    move |e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            MethodError::NotFound(format!("{what} {p} does not exist"))
        } else {
            MethodError::InvalidParams(format!("{what} {p} cannot be {done}: {e}"))
        }
    }
}

/// `path` with its directory canonicalised (the socket itself may not exist yet).
pub(crate) fn canonical_socket_path(path: &Path) -> PathBuf {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    match (std::fs::canonicalize(parent), path.file_name()) {
        (Ok(dir), Some(name)) => dir.join(name),
        _ => path.to_path_buf(),
    }
}

pub(crate) fn socket_access_params(
    name: &str,
    group: Option<&str>,
    mode: Option<&str>,
) -> MResult<(Option<u32>, Option<u32>)> {
    let bad = |e: String| MethodError::InvalidParams(format!("export {name}: {e}"));
    let group = group.map(resolve_group).transpose().map_err(bad)?;
    let mode = mode.map(parse_socket_mode).transpose().map_err(bad)?;
    Ok((group, mode))
}

/// Resolves a group name (from /etc/group) or a numeric gid.
pub fn resolve_group(g: &str) -> Result<u32, String> {
    if let Ok(gid) = g.parse::<u32>() {
        return Ok(gid);
    }
    let groups = std::fs::read_to_string("/etc/group")
        .map_err(|e| format!("socket group {g}: cannot read /etc/group: {e}"))?;
    groups
        .lines()
        .filter_map(|l| {
            let mut f = l.split(':');
            let name = f.next()?;
            let gid = f.nth(1)?.parse::<u32>().ok()?;
            (name == g).then_some(gid)
        })
        .next()
        .ok_or_else(|| format!("socket group {g} is not in /etc/group (give a numeric gid)"))
}
