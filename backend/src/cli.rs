//! The `snapmv` client verbs, mirroring dm-snap-mv's `dms` (see `docs/cli.md`).
//!
//! Each verb is one or two RPC calls; output is a readable table, or the method's JSON result
//! with `--json`.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;
use serde_json::{json, Value};
use snapmv_rpc::method::{self as rpc, Method};
use snapmv_rpc::methods as m;
use snapmv_rpc::{RpcClient, RpcError};

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

    pub(crate) fn print_json(&self, v: &Value) {
        println!(
            "{}",
            serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
        );
    }
}

/// Makes a path absolute against the current directory (the daemon has another one).
pub fn absolute(what: &'static str, p: &Path) -> Result<String, CliError> {
    let abs = std::path::absolute(p).map_err(|source| CliError::Path {
        what,
        path: p.to_path_buf(),
        source,
    })?;
    Ok(abs.to_string_lossy().into_owned())
}

/// Options of `snapmv create`.
#[derive(Debug, Clone, Default)]
pub struct CreateArgs {
    /// Export name.
    pub name: String,
    /// Origin path.
    pub origin: PathBuf,
    /// Store path.
    pub cow: PathBuf,
    /// Snapshot tag (exports a snapshot).
    pub tag: Option<u32>,
    /// Bind.
    pub bind: bool,
    /// Format.
    pub format: bool,
    /// Force format.
    pub force_format: bool,
    /// Chunk size in pages.
    pub chunk_size: Option<u32>,
    /// Origin id.
    pub origin_id: Option<String>,
    /// Queues.
    pub num_queues: Option<u16>,
    /// Queue size.
    pub queue_size: Option<u16>,
    /// Read-only.
    pub readonly: bool,
    /// O_DIRECT.
    pub direct: bool,
    /// Socket path.
    pub socket: Option<PathBuf>,
    /// Socket group (name or gid).
    pub socket_group: Option<String>,
    /// Socket mode (octal).
    pub socket_mode: Option<String>,
    /// Serve over NBD instead of vhost-user-blk.
    pub nbd: bool,
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

/// `snapmv snapshot NAME [-m MEMO]`: `snapshot_create`.
pub fn snapshot(ctx: &Ctx, name: &str, memo: Option<&str>) -> Result<(), CliError> {
    let r = ctx.call::<rpc::SnapshotCreate>(&m::SnapshotCreateParams {
        name: name.into(),
        memo: memo.unwrap_or("").into(),
    })?;
    if ctx.json {
        ctx.print_result(&r);
    } else {
        println!("snapshot {} of export {name} created", r.tag);
    }
    Ok(())
}

/// `snapmv delete NAME [TAG]`: `snapshot_delete`, or `origin_delete` without a tag (`force`:
/// even while a guest is connected to the export).
pub fn delete(ctx: &Ctx, name: &str, tag: Option<u32>, force: bool) -> Result<(), CliError> {
    let r = match tag {
        Some(tag) => ctx.call::<rpc::SnapshotDelete>(&m::SnapshotDeleteParams {
            name: name.into(),
            tag,
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
    let show = std::io::stderr().is_terminal() && !ctx.json;
    let mut status_client = None;
    let mut shown = false;
    while !handle.is_finished() {
        std::thread::sleep(Duration::from_millis(200));
        if !show {
            continue;
        }
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
            let pct = (r.chunks_done * 100)
                .checked_div(r.chunks_total)
                .unwrap_or(100);
            eprint!(
                "\rrolling {name} back to snapshot {}: {}/{} chunks ({pct}%)   ",
                r.tag, r.chunks_done, r.chunks_total
            );
            let _ = std::io::stderr().flush();
            shown = true;
        }
    }
    if shown {
        eprintln!("\rrolling {name} back to snapshot {tag}: finished{:30}", "");
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

/// Formats rows as a table with a header, columns padded to their widest cell.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(c.chars().count());
            }
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let mut l = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                l.push_str(c);
            } else {
                l.push_str(&format!(
                    "{c:<w$}  ",
                    w = widths.get(i).copied().unwrap_or(0)
                ));
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(header.to_vec());
    for r in rows {
        line(r.iter().map(String::as_str).collect());
    }
    out
}

/// `YYYY-MM-DD HH:MM:SS` (UTC) for seconds since the epoch.
pub fn format_time(secs: u64) -> String {
    let days = (secs / 86400) as i64;
    let rem = secs % 86400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if mo <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{mo:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// A size in bytes, human-readable (binary units).
pub fn format_size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 || v.fract() == 0.0 {
        format!("{v:.0} {}", UNITS[u])
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// A memo on one line: control characters (newlines, escapes) become spaces.
fn one_line(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

fn dash_if_empty(v: &[String]) -> String {
    if v.is_empty() {
        "-".into()
    } else {
        v.join(",")
    }
}

/// Renders `snapshot_list` as one tree table per origin.
pub fn render_list(l: &m::SnapshotList) -> String {
    let mut out = String::new();
    for o in &l.origins {
        if !o.open {
            let path = if o.origin.is_empty() {
                String::new()
            } else {
                format!(" ({})", o.origin)
            };
            out.push_str(&format!(
                "origin {}{path} in {}, bound but not open: export it to list its snapshots\n",
                o.origin_id, o.cow
            ));
            continue;
        }
        out.push_str(&format!(
            "origin {} ({}) in {}, exported as {}\n",
            o.origin_id,
            o.origin,
            o.cow,
            dash_if_empty(&o.exported_as)
        ));
        // Depth-first from the origin's children, so the tree reads top-down.
        let mut rows = Vec::new();
        let mut stack: Vec<(Option<u32>, usize)> = vec![(None, 0)];
        let mut visited = std::collections::HashSet::new();
        while let Some((parent, depth)) = stack.pop() {
            if let Some(p) = parent {
                if !visited.insert(p) {
                    continue;
                }
                if let Some(s) = o.snapshots.iter().find(|s| s.tag == p) {
                    rows.push(vec![
                        format!("{}{}", "  ".repeat(depth.saturating_sub(1)), s.tag),
                        s.parent.map_or("origin".into(), |p| p.to_string()),
                        format_time(s.birth_unix_secs),
                        s.exclusive_chunks.to_string(),
                        dash_if_empty(&s.exported_as),
                        one_line(&s.memo),
                    ]);
                }
            }
            let mut children: Vec<u32> = o
                .snapshots
                .iter()
                .filter(|s| s.parent == parent)
                .map(|s| s.tag)
                .collect();
            children.sort_unstable_by(|a, b| b.cmp(a));
            for c in children {
                stack.push((Some(c), depth + 1));
            }
        }
        // Snapshots whose parent is unknown (not expected) still get listed.
        for s in &o.snapshots {
            if !visited.contains(&s.tag) {
                rows.push(vec![
                    s.tag.to_string(),
                    s.parent.map_or("origin".into(), |p| p.to_string()),
                    format_time(s.birth_unix_secs),
                    s.exclusive_chunks.to_string(),
                    dash_if_empty(&s.exported_as),
                    one_line(&s.memo),
                ]);
            }
        }
        if rows.is_empty() {
            out.push_str("  (no snapshots)\n");
        } else {
            for line in table(
                &["TAG", "PARENT", "BORN", "EXCLUSIVE", "EXPORTED-AS", "MEMO"],
                &rows,
            )
            .lines()
            {
                out.push_str("  ");
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    if l.origins.is_empty() {
        out.push_str("no origins\n");
    }
    out
}

/// `snapmv list [NAME]`: `snapshot_list`.
pub fn list(ctx: &Ctx, name: Option<&str>) -> Result<(), CliError> {
    let l = ctx.call::<rpc::SnapshotList>(&m::OptionalNameParams {
        name: name.map(str::to_string),
    })?;
    if ctx.json {
        ctx.print_result(&l);
    } else {
        print!("{}", render_list(&l));
    }
    Ok(())
}

/// Renders `export_list`.
pub fn render_exports(l: &m::ExportList) -> String {
    if l.exports.is_empty() {
        return "no exports\n".into();
    }
    let rows: Vec<Vec<String>> = l
        .exports
        .iter()
        .map(|e| {
            vec![
                e.name.clone(),
                e.volume.clone(),
                if e.size > 0 {
                    format_size(e.size)
                } else {
                    "-".into()
                },
                e.num_queues.to_string(),
                if e.readonly { "ro" } else { "rw" }.into(),
                e.socket.clone(),
                match &e.error {
                    Some(err) => format!("FAILED: {}", one_line(err)),
                    None if e.connected => "connected".into(),
                    None => "waiting".into(),
                },
            ]
        })
        .collect();
    table(
        &[
            "NAME", "VOLUME", "SIZE", "QUEUES", "MODE", "SOCKET", "STATE",
        ],
        &rows,
    )
}

/// `snapmv exports`: `export_list`.
pub fn exports(ctx: &Ctx) -> Result<(), CliError> {
    let l = ctx.call::<rpc::ExportList>(&m::NoParams {})?;
    if ctx.json {
        ctx.print_result(&l);
    } else {
        print!("{}", render_exports(&l));
    }
    Ok(())
}

/// Renders `status`.
pub fn render_status(s: &m::Status) -> String {
    let mut out = String::new();
    for st in &s.stores {
        let pct = (st.chunks_used * 100)
            .checked_div(st.chunks_total)
            .unwrap_or(0);
        out.push_str(&format!(
            "store {}: chunk {}, {} chunks, {} used ({pct}%), {} free\n",
            st.cow,
            format_size(u64::from(st.chunk_size)),
            st.chunks_total,
            st.chunks_used,
            st.chunks_free
        ));
        let rows: Vec<Vec<String>> = st
            .origins
            .iter()
            .map(|o| {
                if !o.open {
                    return vec![
                        o.origin_id.clone(),
                        "?".into(),
                        "?".into(),
                        "-".into(),
                        "?".into(),
                        "(not open)".into(),
                        if o.origin.is_empty() {
                            "?".into()
                        } else {
                            o.origin.clone()
                        },
                    ];
                }
                vec![
                    o.origin_id.clone(),
                    format_size(o.size),
                    o.snapshots.to_string(),
                    match &o.rollback {
                        Some(r) => format!(
                            "to {}: {}/{} ({}%)",
                            r.tag,
                            r.chunks_done,
                            r.chunks_total,
                            (r.chunks_done * 100)
                                .checked_div(r.chunks_total)
                                .unwrap_or(100)
                        ),
                        None => "-".into(),
                    },
                    o.reclaim_pending_chunks.to_string(),
                    dash_if_empty(&o.exported_as),
                    o.origin.clone(),
                ]
            })
            .collect();
        if rows.is_empty() {
            out.push_str("  (no origins)\n");
        } else {
            for line in table(
                &[
                    "ORIGIN",
                    "SIZE",
                    "SNAPSHOTS",
                    "ROLLBACK",
                    "RECLAIM-PENDING",
                    "EXPORTED-AS",
                    "PATH",
                ],
                &rows,
            )
            .lines()
            {
                out.push_str("  ");
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    for u in &s.unavailable {
        out.push_str(&format!("store {}: UNAVAILABLE: {}\n", u.cow, u.error));
    }
    if s.stores.is_empty() && s.unavailable.is_empty() {
        out.push_str("no stores open\n");
    }
    out
}

/// `snapmv status [NAME]`: `status`.
pub fn status(ctx: &Ctx, name: Option<&str>) -> Result<(), CliError> {
    let s = ctx.call::<rpc::Status>(&m::OptionalNameParams {
        name: name.map(str::to_string),
    })?;
    if ctx.json {
        ctx.print_result(&s);
    } else {
        print!("{}", render_status(&s));
    }
    Ok(())
}

/// `snapmv check COW [--repair]`: the engine's checker, on a store no process has open. The
/// engine opens the store exclusively (an exclusive lock on the file, `O_EXCL` for a block
/// device), so a store any daemon — or another check — has open is refused, naming its holder.
pub fn check(ctx: &Ctx, cow: &Path, repair: bool) -> Result<(), CliError> {
    let canon = std::fs::canonicalize(cow).map_err(|source| CliError::Path {
        what: "COW store",
        path: cow.to_path_buf(),
        source,
    })?;
    let canon_s = canon.to_string_lossy().into_owned();
    let report = snapmv_engine::check(&canon, repair).map_err(|e| {
        if let snapmv_engine::Error::Io { source, .. } = &e {
            if let Some(u) = snapmv_engine::in_use(source) {
                return CliError::InUse {
                    cow: canon_s.clone(),
                    holder: u.holder.clone(),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times() {
        assert_eq!(format_time(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(format_time(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(format_time(1_795_000_000), "2026-11-18 11:06:40 UTC");
    }

    #[test]
    fn sizes() {
        assert_eq!(format_size(512), "512 B");
        assert_eq!(format_size(4096), "4 KiB");
        assert_eq!(format_size(1536), "1.5 KiB");
        assert_eq!(format_size(10 << 30), "10 GiB");
    }

    #[test]
    fn tables_align() {
        let t = table(
            &["A", "BB"],
            &[
                vec!["xxx".into(), "1".into()],
                vec!["y".into(), "22".into()],
            ],
        );
        assert_eq!(t, "A    BB\nxxx  1\ny    22\n");
    }

    #[test]
    fn list_is_a_tree() {
        let s = |tag, parent| m::SnapshotInfo {
            tag,
            parent,
            memo: format!("m{tag}\n"),
            birth_unix_secs: 0,
            exclusive_chunks: 0,
            exported_as: vec![],
        };
        let l = m::SnapshotList {
            origins: vec![m::OriginSnapshots {
                origin_id: "o".into(),
                origin: "/o".into(),
                cow: "/c".into(),
                exported_as: vec!["vol".into()],
                open: true,
                snapshots: vec![s(1, None), s(2, Some(1)), s(3, None)],
            }],
        };
        let out = render_list(&l);
        let tags: Vec<&str> = out
            .lines()
            .skip(2)
            .map(|l| l.split("  ").find(|x| !x.is_empty()).unwrap_or(""))
            .collect();
        assert!(
            out.starts_with("origin o (/o) in /c, exported as vol\n"),
            "{out}"
        );
        // 1, then its child 2 (indented), then 3.
        assert_eq!(tags.len(), 3, "{out}");
        assert_eq!(out.lines().count(), 5, "memos stay on their line:\n{out}");
        let pos = |needle: &str| out.find(needle).unwrap();
        assert!(pos("m1") < pos("m2") && pos("m2") < pos("m3"), "{out}");
    }
}
