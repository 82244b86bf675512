//! Checks of parameters against the limits and the recorded state, with no I/O: names, queues,
//! chunk sizes, protocols, socket modes, origin ids and the conflicts between a new export and
//! the recorded ones. The checks that look at the filesystem are in `paths.rs`.

use std::path::Path;

use snapmv_rpc::limits;
use snapmv_rpc::methods as m;
pub use snapmv_rpc::methods::parse_socket_mode;

use super::error::{MResult, MethodError};
use crate::state::State;
use snapmv_rpc::limits::{DEFAULT_NUM_QUEUES, DEFAULT_QUEUE_SIZE, MAX_NUM_QUEUES};
use snapmv_rpc::methods::{PROTOCOL_NBD, PROTOCOL_VHOST};

/// Checks the name of a new export: valid, and not taken.
pub(crate) fn new_export_name(state: &State, name: &str) -> MResult<()> {
    m::validate_name("export name", name).map_err(MethodError::InvalidParams)?;
    if state.export(name).is_some() {
        return Err(MethodError::AlreadyExists(format!(
            "export {name} already exists"
        )));
    }
    // A renamed export's disk keeps its first name as serial and cache-mode key.
    if let Some(e) = state
        .exports
        .iter()
        .find(|e| e.serial.as_deref() == Some(name))
    {
        return Err(MethodError::AlreadyExists(format!(
            "{name} is the disk serial of export {} (renamed from {name}); choose another name",
            e.name
        )));
    }
    Ok(())
}

/// The queue count and size of export `name`: the given ones or the defaults, within the
/// limits.
pub(crate) fn queues(
    name: &str,
    num_queues: Option<u16>,
    queue_size: Option<u16>,
) -> MResult<(u16, u16)> {
    let nq = num_queues.unwrap_or(DEFAULT_NUM_QUEUES);
    if !limits::num_queues_ok(nq) {
        return Err(MethodError::InvalidParams(format!(
            "num_queues {nq} of export {name} must be 1 to {MAX_NUM_QUEUES}"
        )));
    }
    let qs = queue_size.unwrap_or(DEFAULT_QUEUE_SIZE);
    if !limits::queue_size_ok(qs) {
        return Err(MethodError::InvalidParams(format!(
            "queue_size {qs} of export {name} must be a power of two up to {}",
            limits::MAX_QUEUE_SIZE
        )));
    }
    Ok((nq, qs))
}

/// Checks the formatting options of `origin_create` for export `name` on store `cow`; returns
/// the chunk size in pages (used only when formatting).
pub(crate) fn format_options(name: &str, cow: &str, p: &m::OriginCreateParams) -> MResult<u32> {
    let format = p.format || p.force_format;
    if format && !p.bind {
        return Err(MethodError::InvalidParams(format!(
            "export {name}: formatting COW store {cow} needs bind (a fresh store has no origin to open)"
        )));
    }
    if p.chunk_size.is_some() && !format && !p.incoming {
        return Err(MethodError::InvalidParams(format!(
            "export {name}: chunk_size is only used when formatting COW store {cow}, or with incoming"
        )));
    }
    let pages = p.chunk_size.unwrap_or(limits::DEFAULT_CHUNK_PAGES);
    if !limits::chunk_pages_ok(pages) {
        return Err(MethodError::InvalidParams(format!(
            "chunk_size {pages} for COW store {cow} must be a power of two from 1 to {} pages of 4 KiB",
            limits::MAX_CHUNK_PAGES
        )));
    }
    Ok(pages)
}

/// The origin id of origin `origin` in store `cow`: the given one (checked), else the one the
/// state records for that path, else [`default_origin_id`].
pub(crate) fn origin_id(
    state: &State,
    cow: &str,
    origin: &str,
    given: Option<&str>,
) -> MResult<String> {
    match given {
        Some(id) => {
            m::validate_name("origin id", id).map_err(MethodError::InvalidParams)?;
            Ok(id.to_string())
        }
        None => Ok(state
            .origins
            .iter()
            .find(|o| o.cow == cow && o.path == origin)
            .map(|o| o.origin_id.clone())
            .unwrap_or_else(|| default_origin_id(Path::new(origin)))),
    }
}

/// Refuses origin `origin` as id `origin_id` of store `cow` if the state knows that file under
/// another store or id, or that id as another file. `is_origin` tells whether a recorded path
/// is the same file as `origin`.
pub(crate) fn origin_identity(
    state: &State,
    cow: &str,
    origin: &str,
    origin_id: &str,
    is_origin: impl Fn(&str) -> bool,
) -> MResult<()> {
    for o in &state.origins {
        let same_file = is_origin(&o.path);
        if same_file && (o.cow != cow || o.origin_id != origin_id) {
            return Err(MethodError::AlreadyExists(format!(
                "origin {origin} is already known as origin id {} of COW store {}",
                o.origin_id, o.cow
            )));
        }
        if o.cow == cow && o.origin_id == origin_id && !same_file {
            return Err(MethodError::AlreadyExists(format!(
                "origin id {origin_id} of COW store {cow} is already the origin {}",
                o.path
            )));
        }
    }
    Ok(())
}

/// Refuses a second export of the same version: origin `origin_id` of store `cow` (`tag`
/// `None`) or its snapshot `tag`.
pub(crate) fn not_exported(
    state: &State,
    cow: &str,
    origin_id: &str,
    tag: Option<u32>,
) -> MResult<()> {
    let Some(e) = state
        .exports
        .iter()
        .find(|e| e.cow == cow && e.origin_id == origin_id && e.tag == tag)
    else {
        return Ok(());
    };
    Err(MethodError::AlreadyExists(match tag {
        None => format!(
            "origin {origin_id} of COW store {cow} is already exported as {}",
            e.name
        ),
        Some(t) => format!(
            "snapshot {t} of origin {origin_id} in COW store {cow} is already exported as {}",
            e.name
        ),
    }))
}

/// Refuses to format store `cow` while an export uses it or it is still open (`open`).
pub(crate) fn formattable(state: &State, cow: &str, open: bool) -> MResult<()> {
    let users: Vec<String> = state
        .exports
        .iter()
        .filter(|e| e.cow == cow)
        .map(|e| e.name.clone())
        .collect();
    if !users.is_empty() {
        return Err(MethodError::Busy(format!(
            "COW store {cow} is in use by exports {}; remove them before formatting it",
            users.join(", ")
        )));
    }
    if open {
        return Err(MethodError::Busy(format!(
            "COW store {cow} is still open (a rollback runs in it or a call waits on it); try again when it has finished"
        )));
    }
    Ok(())
}

/// Checks a `protocol` parameter; `None` for the default.
pub(crate) fn protocol_param(p: Option<&str>) -> MResult<Option<String>> {
    match p {
        None | Some(PROTOCOL_VHOST) => Ok(None),
        Some(PROTOCOL_NBD) => Ok(Some(PROTOCOL_NBD.into())),
        Some(other) => Err(MethodError::InvalidParams(format!(
            "protocol {other:?} is not one of \"vhost-user-blk\", \"nbd\""
        ))),
    }
}

/// The origin id used when none is given: the origin's file name (an RBD image's name),
/// restricted to `[A-Za-z0-9._-]` and 64 characters.
pub fn default_origin_id(origin: &Path) -> String {
    let rbd_image = origin
        .to_str()
        .and_then(|s| snapmv_storage_rbd::Locator::parse(s).ok())
        .map(|l| l.image);
    let name = rbd_image.unwrap_or_else(|| {
        origin
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    });
    let mut id: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    if id.is_empty() || id == "." || id == ".." {
        id = "origin".into();
    }
    id
}

#[cfg(test)]
#[path = "validate_tests.rs"]
mod tests;
