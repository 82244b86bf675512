//! The `snapmv` client verbs, mirroring dm-snap-mv's `dms` (see `docs/cli.md`).
//!
//! Each verb is one or two RPC calls; output is a readable table, or the method's JSON result
//! with `--json`.

pub mod args;
pub mod backup;
pub mod render;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;
use serde_json::{json, Value};
use snapmv_rpc::method::{self as rpc, Method};
use snapmv_rpc::methods as m;
use snapmv_rpc::{RpcClient, RpcError};

pub use args::{CreateArgs, Out};
pub use render::{
    format_size, format_time, render_exports, render_list, render_stats, render_status, table,
};

/// Why a verb failed.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The daemon could not be reached or answered with an error.
    #[error(transparent)]
    Rpc(#[from] RpcError),
    /// A path argument could not be made absolute.
    #[error("cannot resolve {what} path {path}: {source}")]
    Path {
        /// Which argument.
        what: &'static str,
        /// As given.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// `check` could not run on the store.
    #[error("cannot check COW store {cow}: {source}")]
    Check {
        /// The store.
        cow: String,
        /// The engine's error.
        #[source]
        source: snapmv_engine::Error,
    },
    /// `check` refused a store another process has open.
    #[error("COW store {cow} is in use by {holder}; stop it before checking the store (check and repair need it to themselves)")]
    InUse {
        /// The store.
        cow: String,
        /// Who holds it.
        holder: String,
    },
    /// `check` was given a file that holds no store.
    #[error("{cow} is not a snapmv COW store (no snapmv superblock in either slot)")]
    NotAStore {
        /// The file.
        cow: String,
    },
    /// `check` ran and found problems it did not repair.
    #[error("COW store {cow} has {n} problem(s) left{hint}")]
    Unclean {
        /// The store.
        cow: String,
        /// Number of problems.
        n: usize,
        /// What to do next.
        hint: &'static str,
    },
    /// A backup stream could not be made, read or applied.
    #[error("{what}: {source}")]
    Stream {
        /// What was being done.
        what: String,
        /// The stream error.
        #[source]
        source: crate::stream::StreamError,
    },
    /// `import-diff` refused a diff that does not fit its target.
    #[error("{0}")]
    Refused(String),
    /// Arguments clap cannot check by itself are wrong.
    #[error("{0}")]
    Usage(String),
    /// The rollback waiter thread could not be run.
    #[error("rollback of export {name}: {what}")]
    Wait {
        /// The export.
        name: String,
        /// What went wrong.
        what: String,
    },
}

impl CliError {
    /// The JSON-RPC error code of this error: the daemon's, or the closest one for errors
    /// found by the CLI itself.
    pub fn code(&self) -> i64 {
        use snapmv_rpc::codes;
        match self {
            CliError::Rpc(RpcError::Remote(e)) => e.code,
            CliError::Rpc(RpcError::Connect { .. } | RpcError::Io { .. }) => codes::IO_ERROR,
            CliError::Rpc(_) | CliError::Wait { .. } => codes::INTERNAL_ERROR,
            CliError::Path { .. } => codes::NOT_FOUND,
            CliError::Check { source, .. } => match source {
                snapmv_engine::Error::Corrupt { .. } => codes::CORRUPT,
                snapmv_engine::Error::Io { source, .. }
                    if source.kind() == std::io::ErrorKind::NotFound =>
                {
                    codes::NOT_FOUND
                }
                _ => codes::IO_ERROR,
            },
            CliError::InUse { .. } => codes::BUSY,
            CliError::Stream { source, .. } => match source {
                crate::stream::StreamError::Invalid(_) => codes::CORRUPT,
                _ => codes::IO_ERROR,
            },
            CliError::Refused(_) => codes::INVALID_STATE,
            CliError::Usage(_) => codes::INVALID_PARAMS,
            CliError::NotAStore { .. } | CliError::Unclean { .. } => codes::CORRUPT,
        }
    }

    /// The process exit status (docs/cli.md): 1 internal, 2 usage or invalid parameter,
    /// 3 daemon not reachable, 4 not found, 5 conflict, 6 damaged or not a store, 7 no space
    /// or limit, 8 I/O error, 9 permission denied.
    pub fn exit_status(&self) -> u8 {
        use snapmv_rpc::codes;
        if let CliError::Rpc(RpcError::Connect { .. } | RpcError::Io { .. }) = self {
            return 3;
        }
        match self.code() {
            codes::PARSE_ERROR
            | codes::INVALID_REQUEST
            | codes::METHOD_NOT_FOUND
            | codes::INVALID_PARAMS => 2,
            codes::NOT_FOUND => 4,
            codes::ALREADY_EXISTS
            | codes::BUSY
            | codes::HAS_SNAPSHOTS
            | codes::READ_ONLY
            | codes::INVALID_STATE => 5,
            codes::CORRUPT => 6,
            codes::NO_SPACE | codes::LIMIT => 7,
            codes::IO_ERROR => 8,
            codes::PERMISSION_DENIED => 9,
            _ => 1,
        }
    }

    /// `{"error": {"code", "name", "message", "exit_status"}}`, printed with `--json`. The
    /// message is the daemon's message alone (no code appended).
    pub fn to_json(&self) -> Value {
        let message = match self {
            CliError::Rpc(RpcError::Remote(e)) => e.message.clone(),
            e => e.to_string(),
        };
        json!({"error": {
            "code": self.code(),
            "name": snapmv_rpc::codes::name(self.code()),
            "message": message,
            "exit_status": self.exit_status(),
        }})
    }
}

/// Output settings shared by the verbs.
#[derive(Debug, Clone)]
pub struct Ctx {
    /// The daemon's socket.
    pub rpc_socket: PathBuf,
    /// Print JSON instead of tables.
    pub json: bool,
}

impl Ctx {
    pub(crate) fn client(&self) -> Result<RpcClient, CliError> {
        Ok(RpcClient::connect(&self.rpc_socket)?)
    }

    /// Calls method `M` on a new connection.
    pub(crate) fn call<M: Method>(&self, params: &M::Params) -> Result<M::Result, CliError> {
        Ok(self.client()?.call::<M>(params)?)
    }

    /// Prints a method's result as JSON (`--json`): the daemon's answer, keys sorted.
    pub(crate) fn print_result<R: Serialize>(&self, r: &R) {
        match serde_json::to_value(r) {
            Ok(v) => self.print_json(&v),
            Err(e) => eprintln!("snapmv: the result could not be encoded: {e}"),
        }
    }

    /// Prints a method's result: as JSON with `--json`, else as `render` makes it.
    pub(crate) fn show<R: Serialize>(&self, r: &R, render: impl FnOnce(&R) -> String) {
        if self.json {
            self.print_result(r);
        } else {
            print!("{}", render(r));
        }
    }

    pub(crate) fn print_json(&self, v: &Value) {
        println!(
            "{}",
            serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
        );
    }
}

/// Makes a path absolute against the current directory (the daemon has another one); an
/// `rbd:` locator names an RBD image and is passed on as it is.
pub fn absolute(what: &'static str, p: &Path) -> Result<String, CliError> {
    if let Some(s) = p.to_str().filter(|s| snapmv_storage_rbd::is_rbd_locator(s)) {
        return Ok(s.to_string());
    }
    let abs = std::path::absolute(p).map_err(|source| CliError::Path {
        what,
        path: p.to_path_buf(),
        source,
    })?;
    Ok(abs.to_string_lossy().into_owned())
}

/// `snapmv create`: `origin_create`, or `snapshot_export` when a tag is given.
pub fn create(ctx: &Ctx, a: CreateArgs) -> Result<(), CliError> {
    let origin = absolute("origin", &a.origin)?;
    let cow = absolute("COW store", &a.cow)?;
    let socket = match &a.socket {
        Some(s) => Some(absolute("socket", s)?),
        None => None,
    };
    let protocol = a.nbd.then(|| m::PROTOCOL_NBD.to_string());
    let e = match a.tag {
        None => ctx.call::<rpc::OriginCreate>(&m::OriginCreateParams {
            name: a.name,
            origin,
            cow,
            origin_id: a.origin_id,
            bind: a.bind,
            format: a.format,
            force_format: a.force_format,
            chunk_size: a.chunk_size,
            num_queues: a.num_queues,
            queue_size: a.queue_size,
            readonly: a.readonly,
            direct: a.direct,
            socket,
            socket_group: a.socket_group,
            socket_mode: a.socket_mode,
            protocol,
            takeover: a.takeover,
            incoming: a.incoming,
        })?,
        Some(tag) => ctx.call::<rpc::SnapshotExport>(&m::SnapshotExportParams {
            name: a.name,
            origin_id: a.origin_id,
            origin: Some(origin),
            cow,
            tag,
            num_queues: a.num_queues,
            queue_size: a.queue_size,
            readonly: a.readonly,
            direct: a.direct,
            socket,
            socket_group: a.socket_group,
            socket_mode: a.socket_mode,
            protocol,
        })?,
    };
    if ctx.json {
        ctx.print_result(&e);
        return Ok(());
    }
    println!("export {} serves {} on {}", e.name, e.volume, e.socket);
    Ok(())
}

/// `snapmv remove NAME [--force]`: `export_remove`.
pub fn remove(ctx: &Ctx, name: &str, force: bool) -> Result<(), CliError> {
    let r = ctx.call::<rpc::ExportRemove>(&m::ExportRemoveParams {
        name: name.into(),
        force,
    })?;
    if ctx.json {
        ctx.print_result(&r);
    } else {
        println!("export {name} removed");
    }
    Ok(())
}

/// `snapmv release NAME`: `export_release`.
pub fn release(ctx: &Ctx, name: &str) -> Result<(), CliError> {
    let r = ctx.call::<rpc::ExportRelease>(&m::ExportReleaseParams { name: name.into() })?;
    if ctx.json {
        ctx.print_result(&r);
    } else {
        println!(
            "export {name} released: its store is closed and may be acquired elsewhere (`snapmv acquire {name} {}` there: the guest's cache mode)",
            if r.writeback { "--writeback" } else { "--write-through" }
        );
    }
    Ok(())
}

/// `snapmv acquire NAME [--timeout SECS] [--writeback|--write-through]`: `export_acquire`.
pub fn acquire(
    ctx: &Ctx,
    name: &str,
    timeout_secs: Option<u64>,
    writeback: Option<bool>,
) -> Result<(), CliError> {
    let e = ctx.call::<rpc::ExportAcquire>(&m::ExportAcquireParams {
        name: name.into(),
        timeout_secs,
        writeback,
    })?;
    if ctx.json {
        ctx.print_result(&e);
    } else {
        println!("export {} serves {} on {}", e.name, e.volume, e.socket);
    }
    Ok(())
}

/// `snapmv memo NAME TAG TEXT`: `snapshot_memo`.
pub fn memo(ctx: &Ctx, name: &str, tag: u32, memo: &str) -> Result<(), CliError> {
    let r = ctx.call::<rpc::SnapshotMemo>(&m::SnapshotMemoParams {
        name: name.into(),
        tag,
        memo: memo.into(),
    })?;
    if ctx.json {
        ctx.print_result(&r);
    } else {
        println!("snapshot {tag} of export {name}: memo set to {:?}", r.memo);
    }
    Ok(())
}

/// `snapmv rename NAME NEW_NAME`: `export_rename`.
pub fn rename(ctx: &Ctx, name: &str, new_name: &str) -> Result<(), CliError> {
    let r = ctx.call::<rpc::ExportRename>(&m::ExportRenameParams {
        name: name.into(),
        new_name: new_name.into(),
    })?;
    if ctx.json {
        ctx.print_result(&r);
    } else {
        println!(
            "export {name} renamed to {new_name} (socket {} kept)",
            r.socket
        );
    }
    Ok(())
}

/// `snapmv snapshot NAME [TAG] [-m MEMO] [--sync]` and `snapmv snapshot NAME NAME… [--group]`:
/// `snapshot_create` with `name` (and `tag`) or with `names`.
pub fn snapshot(
    ctx: &Ctx,
    targets: &[String],
    group: bool,
    memo: Option<&str>,
    sync: bool,
) -> Result<(), CliError> {
    let memo = memo.unwrap_or("").to_string();
    let tag = match targets {
        [_, t] if !group => t.parse::<u32>().ok(),
        _ => None,
    };
    if tag == Some(0) {
        return Err(CliError::Usage(
            "snapshot tag 0 does not exist: tags start at 1".into(),
        ));
    }
    let p = match targets {
        [name] => m::SnapshotCreateParams {
            name: name.clone(),
            memo,
            sync,
            ..Default::default()
        },
        [name, _] if tag.is_some() => m::SnapshotCreateParams {
            name: name.clone(),
            memo,
            tag,
            sync,
            ..Default::default()
        },
        names => m::SnapshotCreateParams {
            names: names.to_vec(),
            memo,
            sync,
            ..Default::default()
        },
    };
    let r = ctx.call::<rpc::SnapshotCreate>(&p)?;
    if ctx.json {
        ctx.print_result(&r);
        return Ok(());
    }
    match (&r.tags, r.tag, tag) {
        (Some(tags), _, _) => {
            let each: Vec<String> = tags
                .iter()
                .map(|t| format!("snapshot {} of export {}", t.tag, t.name))
                .collect();
            println!("created at one instant: {}", each.join(", "));
        }
        (None, Some(t), None) => println!("snapshot {t} of export {} created", p.name),
        (None, Some(t), Some(of)) => println!(
            "snapshot {t} of snapshot {of} (origin of export {}) created",
            p.name
        ),
        (None, None, _) => println!("snapshot created (the daemon gave no tag)"),
    }
    Ok(())
}

/// `snapmv delete NAME [TAG]`: `snapshot_delete`, or `origin_delete` without a tag (`force`:
/// even while a guest is connected to the export).
pub fn delete(
    ctx: &Ctx,
    name: &str,
    tag: Option<u32>,
    force: bool,
    sync: bool,
) -> Result<(), CliError> {
    let r = match tag {
        Some(tag) => ctx.call::<rpc::SnapshotDelete>(&m::SnapshotDeleteParams {
            name: name.into(),
            tag,
            sync,
        })?,
        None => ctx.call::<rpc::OriginDelete>(&m::ExportRemoveParams {
            name: name.into(),
            force,
        })?,
    };
    if ctx.json {
        ctx.print_result(&r);
    } else {
        match tag {
            Some(tag) => println!("snapshot {tag} of export {name} deleted"),
            None => println!("origin of export {name} unbound and export removed"),
        }
    }
    Ok(())
}

/// `snapmv rollback NAME TAG [-b]`: `snapshot_rollback`; waits (with progress on a terminal)
/// unless `background`.
pub fn rollback(ctx: &Ctx, name: &str, tag: u32, background: bool) -> Result<(), CliError> {
    if background {
        let r = ctx.call::<rpc::SnapshotRollback>(&m::SnapshotRollbackParams {
            name: name.into(),
            tag,
            wait: false,
        })?;
        if ctx.json {
            ctx.print_result(&r);
        } else {
            if r.done {
                println!("export {name} rolled back to snapshot {tag}");
            } else {
                println!("rollback of export {name} to snapshot {tag} started in the background");
            }
        }
        return Ok(());
    }
    let mut waiter = ctx.client()?;
    let name_w = name.to_string();
    let handle = std::thread::spawn(move || {
        waiter.call::<rpc::SnapshotRollback>(&m::SnapshotRollbackParams {
            name: name_w,
            tag,
            wait: true,
        })
    });
    // Progress on a terminal, from `status` on a second connection.
    let bar = (std::io::stderr().is_terminal() && !ctx.json).then(|| {
        let pb = indicatif::ProgressBar::new(0);
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "{msg} [{bar:40}] {pos}/{len} chunks ({percent}%) eta {eta}",
        ) {
            pb.set_style(style.progress_chars("=> "));
        }
        pb.set_message(format!("rolling {name} back to snapshot {tag}"));
        pb
    });
    let mut status_client = None;
    while !handle.is_finished() {
        std::thread::sleep(Duration::from_millis(200));
        let Some(pb) = &bar else {
            continue;
        };
        if status_client.is_none() {
            status_client = ctx.client().ok();
        }
        let Some(c) = status_client.as_mut() else {
            continue;
        };
        let Ok(st) = c.call::<rpc::Status>(&m::OptionalNameParams {
            name: Some(name.into()),
        }) else {
            continue;
        };
        if let Some(r) = st
            .stores
            .iter()
            .flat_map(|s| s.origins.iter())
            .find_map(|o| o.rollback.clone())
        {
            pb.set_length(r.chunks_total);
            pb.set_position(r.chunks_done);
        }
    }
    if let Some(pb) = bar {
        pb.finish_and_clear();
    }
    let r = handle.join().map_err(|_| CliError::Wait {
        name: name.to_string(),
        what: "the waiting thread panicked".into(),
    })??;
    if ctx.json {
        ctx.print_result(&r);
    } else {
        println!("export {name} rolled back to snapshot {tag}");
    }
    Ok(())
}

/// `snapmv list [NAME]`: `snapshot_list`.
pub fn list(ctx: &Ctx, name: Option<&str>) -> Result<(), CliError> {
    let l = ctx.call::<rpc::SnapshotList>(&m::OptionalNameParams {
        name: name.map(str::to_string),
    })?;
    ctx.show(&l, render_list);
    Ok(())
}

/// `snapmv exports`: `export_list`.
pub fn exports(ctx: &Ctx) -> Result<(), CliError> {
    let l = ctx.call::<rpc::ExportList>(&m::NoParams {})?;
    ctx.show(&l, render_exports);
    Ok(())
}

/// `snapmv status [NAME]`: `status`.
pub fn status(ctx: &Ctx, name: Option<&str>) -> Result<(), CliError> {
    let s = ctx.call::<rpc::Status>(&m::OptionalNameParams {
        name: name.map(str::to_string),
    })?;
    ctx.show(&s, render_status);
    Ok(())
}

/// `snapmv stats [NAME] [--watch [SECS]]`: the daemon's `stats`, once, or every `SECS`
/// seconds until interrupted (the screen cleared between two on a terminal; with `--json`,
/// one compact JSON object per line).
pub fn stats(ctx: &Ctx, name: Option<&str>, watch: Option<u64>) -> Result<(), CliError> {
    let params = m::OptionalNameParams {
        name: name.map(str::to_string),
    };
    let Some(secs) = watch else {
        let s = ctx.call::<rpc::Stats>(&params)?;
        if ctx.json {
            ctx.print_result(&s);
        } else {
            print!("{}", render_stats(&s));
        }
        return Ok(());
    };
    let clear = !ctx.json && std::io::stdout().is_terminal();
    loop {
        let s = ctx.call::<rpc::Stats>(&params)?;
        if ctx.json {
            println!("{}", serde_json::to_string(&s).unwrap_or_default());
        } else {
            if clear {
                print!("\x1b[H\x1b[2J");
            }
            println!("{}", format_time(now_secs()));
            print!("{}", render_stats(&s));
            println!();
        }
        std::thread::sleep(Duration::from_secs(secs.max(1)));
    }
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `snapmv check COW [--repair]`: the engine's checker, on a store no process has open. The
/// engine opens the store exclusively (an exclusive lock on the file, `O_EXCL` for a block
/// device), so a store any daemon — or another check — has open is refused, naming its holder.
pub fn check(ctx: &Ctx, cow: &Path, repair: bool, takeover: bool) -> Result<(), CliError> {
    let rbd = cow
        .to_str()
        .filter(|s| snapmv_storage_rbd::is_rbd_locator(s));
    if takeover && rbd.is_none() {
        return Err(CliError::Refused(format!(
            "--takeover applies to a COW store on an rbd: image; {} is a local path",
            cow.display()
        )));
    }
    let (canon_s, result) = match rbd {
        // The image's exclusive lock is its owner's: a live daemon's refuses this check.
        Some(loc) => (loc.to_string(), check_rbd(loc, repair, takeover)),
        None => {
            let canon = std::fs::canonicalize(cow).map_err(|source| CliError::Path {
                what: "COW store",
                path: cow.to_path_buf(),
                source,
            })?;
            let r = snapmv_engine::check(&canon, repair);
            (canon.to_string_lossy().into_owned(), r)
        }
    };
    let report = result.map_err(|e| {
        if let snapmv_engine::Error::Io { source, .. } = &e {
            if let Some(u) = snapmv_engine::in_use(source) {
                return CliError::InUse {
                    cow: canon_s.clone(),
                    holder: u.holder.clone(),
                };
            }
            if let Some(snapmv_storage_rbd::RbdError::Locked { owners, .. }) =
                snapmv_storage_rbd::rbd_error(source)
            {
                return CliError::InUse {
                    cow: canon_s.clone(),
                    holder: format!(
                        "RBD client {} (a snapmv daemon; if it is dead, give --takeover)",
                        owners.join(", ")
                    ),
                };
            }
        }
        CliError::Check {
            cow: canon_s.clone(),
            source: e,
        }
    })?;
    if report.not_a_store {
        return Err(CliError::NotAStore { cow: canon_s });
    }
    if ctx.json {
        ctx.print_json(&json!({
            "cow": canon_s,
            "clean": report.is_clean(),
            "problems": report.problems,
            "repaired": report.repaired,
            "origins": report.origins,
            "snapshots": report.snapshots,
            "chunks_used": report.chunks_used,
            "chunks_total": report.chunks_total,
        }));
    } else {
        for p in &report.problems {
            println!("problem: {p}");
        }
        for r in &report.repaired {
            println!("repaired: {r}");
        }
        if report.is_clean() {
            println!(
                "COW store {canon_s} is clean: {} origin(s), {} snapshot(s), {}/{} chunks used",
                report.origins, report.snapshots, report.chunks_used, report.chunks_total
            );
        }
    }
    if report.is_clean() {
        Ok(())
    } else {
        Err(CliError::Unclean {
            cow: canon_s,
            n: report.problems.len(),
            hint: if repair {
                ""
            } else {
                "; `snapmv check --repair` repairs what can be rebuilt"
            },
        })
    }
}

/// The engine's checker on a store in an RBD image, opened as its owner (taken over from a
/// dead one with `takeover`); closing the image releases its lock again.
fn check_rbd(
    loc: &str,
    repair: bool,
    takeover: bool,
) -> snapmv_engine::Result<snapmv_engine::CheckReport> {
    use snapmv_storage_rbd::RbdStorage;
    let opened = if takeover {
        RbdStorage::open_takeover(loc)
    } else {
        RbdStorage::open(loc)
    };
    let st = opened.map_err(|source| snapmv_engine::Error::Io {
        context: format!("opening COW store {loc}"),
        source,
    })?;
    for owner in st.fenced_owners() {
        eprintln!("took {loc} over from RBD client {owner}, which is now blocklisted");
    }
    snapmv_engine::check_storage(&st, repair)
}
