//! `snapmv`: the daemon (`snapmv serve`) and its client verbs, mirroring dm-snap-mv's `dms`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{ArgAction, Args, Parser, Subcommand};
use snapmv::cli::{self, CliError, CreateArgs, Ctx};
use snapmv::serve::{serve, ServeConfig};

/// Default management socket.
const DEFAULT_RPC_SOCKET: &str = "/run/snapmv/rpc.sock";

#[derive(Parser, Debug)]
#[command(
    name = "snapmv",
    version,
    about = "Origins and live, writable snapshots served to VMs over vhost-user-blk",
    long_about = "Origins and live, writable snapshots served to VMs over vhost-user-blk.\n\n\
        `snapmv serve` runs the daemon; the other verbs talk to it over its JSON-RPC socket and \
        mirror dm-snap-mv's `dms` (see docs/cli.md)."
)]
struct Cli {
    /// Print the daemon's JSON answer instead of a table.
    #[arg(long, global = true)]
    json: bool,
    /// The daemon's management socket [env: SNAPMV_RPC_SOCKET] [default: /run/snapmv/rpc.sock]
    #[arg(long, global = true, value_name = "PATH")]
    rpc_socket: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the daemon: serve the management socket and every recorded export.
    Serve(ServeArgs),
    /// Export an origin (dms co), or with TAG a snapshot of it (dms cs).
    Create(CreateCmd),
    /// Stop serving an export; data untouched (dms remove).
    Remove {
        /// Export name.
        name: String,
    },
    /// Snapshot what an export serves: the origin (dms so) or a snapshot (dms ss).
    Snapshot {
        /// Export of the origin or of a snapshot.
        name: String,
        /// A note stored with the snapshot.
        #[arg(short, long)]
        memo: Option<String>,
    },
    /// Delete snapshot TAG (dms ds); without TAG unbind the origin and remove its export (dms do).
    Delete {
        /// Export of the origin.
        name: String,
        /// Snapshot tag.
        tag: Option<u32>,
    },
    /// Roll the origin back to snapshot TAG while it stays live (dms rs).
    Rollback {
        /// Export of the origin.
        name: String,
        /// Snapshot tag.
        tag: u32,
        /// Return at once; the copy-back goes on in the background (dms rs -b).
        #[arg(short = 'b', long)]
        background: bool,
    },
    /// Snapshot trees: tag, parent, birth, exclusive chunks, exports, memo (dms list).
    List {
        /// Only the origin this export serves (or whose snapshot it serves).
        name: Option<String>,
    },
    /// Exports: name, volume, queues, client connected, socket.
    Exports,
    /// Stores (chunks used/free) and origins (snapshots, rollback, reclaim).
    Status {
        /// Only the origin this export serves (or whose snapshot it serves).
        name: Option<String>,
    },
    /// Check a COW store no daemon has open; optionally repair what can be derived.
    Check {
        /// COW store path.
        cow: PathBuf,
        /// Repair what can be rebuilt from the rest of the metadata.
        #[arg(long)]
        repair: bool,
    },
}

#[derive(Args, Debug)]
struct ServeArgs {
    /// Directory of the state file (created, mode 0700).
    #[arg(long, value_name = "DIR", default_value = "/var/lib/snapmv")]
    state_dir: PathBuf,
    /// Directory of export sockets NAME.sock (default: the RPC socket's directory).
    #[arg(long, value_name = "DIR")]
    socket_dir: Option<PathBuf>,
    /// Also allow this uid on the management socket (besides the daemon's own and root).
    #[arg(long = "allow-uid", value_name = "UID", action = ArgAction::Append)]
    allow_uid: Vec<u32>,
}

#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("fmt").args(["format", "force_format"]).multiple(false)))]
struct CreateCmd {
    /// Export name: 1 to 64 of A-Z a-z 0-9 . _ -
    name: String,
    /// Origin file or block device.
    origin: PathBuf,
    /// COW store file or block device.
    cow: PathBuf,
    /// Export snapshot TAG instead of the origin (dms cs).
    #[arg(conflicts_with_all = ["bind", "format", "force_format", "chunk_size"])]
    tag: Option<u32>,
    /// Bind the origin to the store (a new binding).
    #[arg(short = 'b', long)]
    bind: bool,
    /// Format the store first (refused if it already holds one).
    #[arg(short = 'f', long, requires = "bind")]
    format: bool,
    /// Format the store even if it already holds one (destroys its snapshots).
    #[arg(short = 'F', long, requires = "bind")]
    force_format: bool,
    /// Chunk size in 4 KiB pages (power of two, 1..=256) when formatting.
    #[arg(short = 'c', long, value_name = "PAGES", requires = "fmt")]
    chunk_size: Option<u32>,
    /// Origin id inside the store (default: the origin's file name).
    #[arg(long, value_name = "ID")]
    origin_id: Option<String>,
    /// Number of virtqueues.
    #[arg(short = 'q', long, value_name = "N")]
    num_queues: Option<u16>,
    /// Virtqueue size (power of two).
    #[arg(long, value_name = "N")]
    queue_size: Option<u16>,
    /// Serve read-only.
    #[arg(short = 'r', long)]
    readonly: bool,
    /// Open the files with O_DIRECT.
    #[arg(long)]
    direct: bool,
    /// vhost-user socket path (default: the daemon's socket directory/NAME.sock).
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rpc_socket = cli
        .rpc_socket
        .clone()
        .or_else(|| std::env::var_os("SNAPMV_RPC_SOCKET").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_RPC_SOCKET));
    let ctx = Ctx {
        rpc_socket: rpc_socket.clone(),
        json: cli.json,
    };
    let result: Result<(), String> = match cli.command {
        Command::Serve(a) => {
            env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
                .init();
            let socket_dir = a.socket_dir.unwrap_or_else(|| {
                rpc_socket
                    .parent()
                    .filter(|p| !p.as_os_str().is_empty())
                    .map(PathBuf::from)
                    .unwrap_or_else(|| PathBuf::from("."))
            });
            serve(ServeConfig {
                rpc_socket,
                state_dir: a.state_dir,
                socket_dir,
                allowed_uids: a.allow_uid,
            })
            .map_err(|e| e.to_string())
        }
        Command::Create(c) => cli::create(
            &ctx,
            CreateArgs {
                name: c.name,
                origin: c.origin,
                cow: c.cow,
                tag: c.tag,
                bind: c.bind,
                format: c.format,
                force_format: c.force_format,
                chunk_size: c.chunk_size,
                origin_id: c.origin_id,
                num_queues: c.num_queues,
                queue_size: c.queue_size,
                readonly: c.readonly,
                direct: c.direct,
                socket: c.socket,
            },
        )
        .map_err(message),
        Command::Remove { name } => cli::remove(&ctx, &name).map_err(message),
        Command::Snapshot { name, memo } => {
            cli::snapshot(&ctx, &name, memo.as_deref()).map_err(message)
        }
        Command::Delete { name, tag } => cli::delete(&ctx, &name, tag).map_err(message),
        Command::Rollback {
            name,
            tag,
            background,
        } => cli::rollback(&ctx, &name, tag, background).map_err(message),
        Command::List { name } => cli::list(&ctx, name.as_deref()).map_err(message),
        Command::Exports => cli::exports(&ctx).map_err(message),
        Command::Status { name } => cli::status(&ctx, name.as_deref()).map_err(message),
        Command::Check { cow, repair } => cli::check(&ctx, &cow, repair).map_err(message),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("snapmv: {msg}");
            ExitCode::FAILURE
        }
    }
}

fn message(e: CliError) -> String {
    e.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn create_flags_follow_dms() {
        let ok = |args: &[&str]| Cli::try_parse_from(args).is_ok();
        assert!(ok(&["snapmv", "create", "v", "/o", "/c"]));
        assert!(ok(&[
            "snapmv", "create", "v", "/o", "/c", "-b", "-f", "-c", "4"
        ]));
        assert!(ok(&["snapmv", "create", "v", "/o", "/c", "-b", "-F"]));
        assert!(ok(&["snapmv", "create", "s", "/o", "/c", "3"]));
        // -f needs -b, -c needs -f or -F, -f and -F exclude each other, TAG excludes -b.
        assert!(!ok(&["snapmv", "create", "v", "/o", "/c", "-f"]));
        assert!(!ok(&["snapmv", "create", "v", "/o", "/c", "-b", "-c", "4"]));
        assert!(!ok(&[
            "snapmv", "create", "v", "/o", "/c", "-b", "-f", "-F"
        ]));
        assert!(!ok(&["snapmv", "create", "s", "/o", "/c", "3", "-b"]));
    }
}
