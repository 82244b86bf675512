//! `snapmv`: the daemon (`snapmv serve`) and its client verbs, mirroring dm-snap-mv's `dms`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{ArgAction, Args, CommandFactory, Parser, Subcommand, ValueEnum};
use snapmv::cli::{self, CliError, CreateArgs, Ctx, Out};
use snapmv::daemon::{serve, ServeConfig};
use snapmv::rpc_server::SocketAccess;

/// Default management socket.
const DEFAULT_RPC_SOCKET: &str = "/run/snapmv/rpc.sock";

#[derive(Parser, Debug)]
#[command(
    name = "snapmv",
    version,
    about = "Origins and live, writable snapshots served to VMs over vhost-user-blk",
    long_about = "Origins and live, writable snapshots served to VMs over vhost-user-blk.\n\n\
        `snapmv serve` runs the daemon; the other verbs talk to it over its JSON-RPC socket and \
        mirror dm-snap-mv's `dms` (see docs/cli.md).\n\n\
        Exit status: 0 success, 1 internal error, 2 usage or invalid parameter, 3 daemon not \
        reachable, 4 not found, 5 conflict (exists, in use, busy, has snapshots, wrong state), \
        6 store damaged or not a store, 7 no space or format limit, 8 I/O error, 9 permission \
        denied."
)]
struct Cli {
    /// Print JSON (the daemon's result; errors as {"error":{...}}) instead of text.
    #[arg(long)]
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
    Create(CreateArgs),
    /// Stop serving an export; data untouched (dms remove). Refused while a guest is connected.
    Remove {
        /// Export name.
        name: String,
        /// Remove it even while a guest is connected (the guest loses its disk).
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        out: Out,
    },
    /// Live migration, source: flush an origin's export, stop it (its guest must have
    /// migrated away) and close its store, for another daemon to acquire (docs/migration.md).
    Release {
        /// Export of the origin.
        name: String,
        #[command(flatten)]
        out: Out,
    },
    /// Live migration, destination: open the store of an export created with --incoming,
    /// waiting (bounded) for the source daemon to release it, and serve it.
    Acquire {
        /// Export created with --incoming.
        name: String,
        /// Seconds to wait for the store to be released [default: 60]
        #[arg(long, value_name = "SECS")]
        timeout: Option<u64>,
        /// The guest's cache mode was write-back (as `snapmv release` printed on the source)
        #[arg(long, conflicts_with = "write_through")]
        writeback: bool,
        /// The guest's cache mode was write-through (the default of an incoming export)
        #[arg(long)]
        write_through: bool,
        #[command(flatten)]
        out: Out,
    },
    /// Snapshot what an export serves: the origin (dms so) or a snapshot (dms ss); with TAG,
    /// snapshot TAG of the origin NAME serves, exported or not (dms s NAME TAG); with several
    /// exports (NAME NAME…), snapshot them all at one instant (a consistency group).
    Snapshot {
        /// Export(s) of an origin or of a snapshot, then optionally TAG: `NAME TAG` (a number
        /// as the second of two arguments) snapshots snapshot TAG of the origin NAME exports;
        /// two or more names (or `--group`) form a consistency group.
        #[arg(required = true, value_name = "NAME|TAG")]
        targets: Vec<String>,
        /// Take the arguments as export names even when the second of two is a number.
        #[arg(long)]
        group: bool,
        /// A note stored with the snapshot (each snapshot of a group).
        #[arg(short, long)]
        memo: Option<String>,
        /// Return only once the snapshot survives a host crash, not just the daemon's death.
        #[arg(long)]
        sync: bool,
        #[command(flatten)]
        out: Out,
    },
    /// Change the memo of snapshot TAG of the origin NAME exports (durable when it returns).
    Memo {
        /// Export of the origin or of one of its snapshots.
        name: String,
        /// Snapshot tag (1 or more).
        #[arg(value_parser = clap::value_parser!(u32).range(1..))]
        tag: u32,
        /// The new memo (at most 256 bytes; "" clears it).
        memo: String,
        #[command(flatten)]
        out: Out,
    },
    /// Rename an export while it serves; its socket path and disk serial stay.
    Rename {
        /// The export's name.
        name: String,
        /// Its new name.
        new_name: String,
        #[command(flatten)]
        out: Out,
    },
    /// Delete snapshot TAG (dms ds); without TAG unbind the origin and remove its export (dms do).
    Delete {
        /// Export of the origin.
        name: String,
        /// Snapshot tag (1 or more).
        #[arg(value_parser = clap::value_parser!(u32).range(1..))]
        tag: Option<u32>,
        /// Without TAG: remove the export even while a guest is connected.
        #[arg(long, conflicts_with = "tag")]
        force: bool,
        /// With TAG: return only once the delete survives a host crash.
        #[arg(long, requires = "tag")]
        sync: bool,
        #[command(flatten)]
        out: Out,
    },
    /// Roll the origin back to snapshot TAG while it stays live (dms rs).
    Rollback {
        /// Export of the origin.
        name: String,
        /// Snapshot tag (1 or more).
        #[arg(value_parser = clap::value_parser!(u32).range(1..))]
        tag: u32,
        /// Return at once; the copy-back goes on in the background (dms rs -b).
        #[arg(short = 'b', long)]
        background: bool,
        #[command(flatten)]
        out: Out,
    },
    /// Snapshot trees of every origin of every open store: tag, parent, birth, exclusive
    /// chunks, exports, memo (dms list).
    List {
        /// Only the origin this export serves (or whose snapshot it serves).
        name: Option<String>,
        #[command(flatten)]
        out: Out,
    },
    /// Exports: name, volume, queues, client connected, socket.
    Exports {
        #[command(flatten)]
        out: Out,
    },
    /// Stores (chunks used/free) and every origin bound in them (snapshots, rollback, reclaim).
    Status {
        /// Only the origin this export serves (or whose snapshot it serves).
        name: Option<String>,
        #[command(flatten)]
        out: Out,
    },
    /// I/O statistics of every export (requests, bytes, latency per kind, errors, in flight)
    /// and space of every open store.
    Stats {
        /// Only this export (and its store).
        name: Option<String>,
        /// Print them again every SECS seconds until interrupted.
        #[arg(long, value_name = "SECS", num_args = 0..=1, default_missing_value = "2",
              value_parser = clap::value_parser!(u64).range(1..))]
        watch: Option<u64>,
        #[command(flatten)]
        out: Out,
    },
    /// The chunks that may differ between snapshot FROM and snapshot TO (default: the origin
    /// now), from metadata alone.
    Diff {
        /// An export of the origin or of one of its snapshots.
        name: String,
        /// The older snapshot's tag.
        #[arg(value_parser = clap::value_parser!(u32).range(1..))]
        from: u32,
        /// The newer snapshot's tag [default: the origin as it is now]
        #[arg(value_parser = clap::value_parser!(u32).range(1..))]
        to: Option<u32>,
        #[command(flatten)]
        out: Out,
    },
    /// Write snapshot TAG whole as a raw image: zero chunks become holes in FILE (zeroes on
    /// stdout with -).
    Export {
        /// An export of the origin or of one of its snapshots.
        name: String,
        /// The snapshot's tag.
        #[arg(value_parser = clap::value_parser!(u32).range(1..))]
        tag: u32,
        /// Output file or block device, or - for stdout.
        file: PathBuf,
        /// Return without syncing the file or device (as `dd` without `conv=fsync`): faster,
        /// but a host crash soon after may leave the image incomplete.
        #[arg(long)]
        no_sync: bool,
        #[command(flatten)]
        out: Out,
    },
    /// Write what changed from snapshot FROM to snapshot TO as a diff stream (docs/format.md).
    ExportDiff {
        /// An export of the origin or of one of its snapshots.
        name: String,
        /// The older snapshot's tag.
        #[arg(value_parser = clap::value_parser!(u32).range(1..))]
        from: u32,
        /// The newer snapshot's tag.
        #[arg(value_parser = clap::value_parser!(u32).range(1..))]
        to: u32,
        /// Output file, or - for stdout.
        file: PathBuf,
        #[command(flatten)]
        out: Out,
    },
    /// Apply a diff stream to a raw file or block device that holds the diff's FROM version
    /// (checked first; nothing is written if it does not).
    ImportDiff {
        /// The diff, as written by export-diff.
        file: PathBuf,
        /// Raw file or block device holding the FROM version.
        target: PathBuf,
        #[command(flatten)]
        out: Out,
    },
    /// Print a shell completion script (bash: source it, or install it as
    /// /usr/share/bash-completion/completions/snapmv).
    Completions {
        /// The shell.
        shell: CompletionShell,
    },
    /// Write the manual pages snapmv.1 and snapmv-VERB.1 into DIR.
    Man {
        /// Output directory (created if missing).
        #[arg(default_value = ".")]
        dir: PathBuf,
    },
    /// Check a COW store no process has open (refused, naming the holder, if one has);
    /// optionally repair what can be derived.
    Check {
        /// COW store path, or RBD image rbd:POOL[/NS]/IMAGE[:id=USER][:conf=PATH].
        cow: PathBuf,
        /// Repair what can be rebuilt from the rest of the metadata.
        #[arg(long)]
        repair: bool,
        /// On an RBD image whose owner died: take its lock over at once, fencing that owner,
        /// instead of waiting ~30 s for Ceph to time it out.
        #[arg(long)]
        takeover: bool,
        #[command(flatten)]
        out: Out,
    },
}

/// Shells `snapmv completions` writes for.
#[derive(ValueEnum, Clone, Copy, Debug)]
enum CompletionShell {
    Bash,
    Zsh,
    Fish,
}

/// Format of the daemon's log.
#[derive(ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
enum LogFormat {
    /// `[time LEVEL target] message`, env_logger's default.
    #[default]
    Text,
    /// One JSON object per line: {"ts", "level", "target", "msg"}.
    Json,
}

/// Sets up the daemon's log on stderr (`RUST_LOG` sets the level, default `info`).
fn init_log(format: LogFormat) {
    let mut b = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"));
    if format == LogFormat::Json {
        b.format(|buf, record| {
            use std::io::Write;
            let line = serde_json::json!({
                "ts": buf.timestamp_micros().to_string(),
                "level": record.level().as_str(),
                "target": record.target(),
                "msg": record.args().to_string(),
            });
            writeln!(buf, "{line}")
        });
    }
    b.init();
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
    /// Group of every export socket that does not set its own (name or gid) [default: the
    /// daemon's group].
    #[arg(long, value_name = "GROUP", value_parser = parse_group)]
    socket_group: Option<u32>,
    /// Mode of every export socket that does not set its own, octal.
    #[arg(long, value_name = "MODE", default_value = "0600", value_parser = parse_mode)]
    socket_mode: u32,
    /// Serve Prometheus metrics (OpenMetrics text at /metrics) on a loopback IP:PORT (port 0:
    /// any free port, logged) or on unix:/PATH.
    #[arg(long, value_name = "ADDR", value_parser = snapmv::daemon::prometheus::parse_metrics_listen)]
    metrics_listen: Option<snapmv::daemon::prometheus::MetricsListen>,
    /// A store is low on space (logged once per crossing, shown by status and stats, a
    /// Prometheus gauge) from this percentage of its chunks in use.
    #[arg(long, value_name = "PERCENT", default_value_t = snapmv::daemon::space::DEFAULT_LOW_SPACE_PERCENT, value_parser = snapmv::daemon::space::parse_low_space_percent)]
    low_space_percent: u8,
    /// Format of the log on stderr.
    #[arg(long, value_name = "FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

fn parse_group(s: &str) -> Result<u32, String> {
    snapmv::daemon::resolve_group(s)
}

fn parse_mode(s: &str) -> Result<u32, String> {
    snapmv::daemon::parse_socket_mode(s)
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            let wants_json = std::env::args_os().any(|a| a == "--json");
            if wants_json && !matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion)
            {
                // A usage error, as the JSON error object scripts get for every other error.
                let message = e
                    .render()
                    .to_string()
                    .lines()
                    .next()
                    .unwrap_or("")
                    .trim_start_matches("error: ")
                    .to_string();
                let v = serde_json::json!({"error": {
                    "code": snapmv_rpc::codes::INVALID_PARAMS,
                    "name": snapmv_rpc::codes::name(snapmv_rpc::codes::INVALID_PARAMS),
                    "message": message,
                    "exit_status": 2,
                }});
                println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
                return ExitCode::from(2);
            }
            e.exit()
        }
    };
    let rpc_socket = cli
        .rpc_socket
        .clone()
        .or_else(|| std::env::var_os("SNAPMV_RPC_SOCKET").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_RPC_SOCKET));
    let ctx = |out: Out| Ctx {
        rpc_socket: rpc_socket.clone(),
        json: cli.json || out.json,
    };
    let (json, result): (bool, Result<(), CliError>) = match cli.command {
        Command::Serve(a) => {
            init_log(a.log_format);
            let socket_dir = a.socket_dir.unwrap_or_else(|| {
                rpc_socket
                    .parent()
                    .filter(|p| !p.as_os_str().is_empty())
                    .map(PathBuf::from)
                    .unwrap_or_else(|| PathBuf::from("."))
            });
            if cli.json {
                eprintln!("snapmv: serve prints no JSON; --json is for the client verbs");
                return ExitCode::from(2);
            }
            return match serve(ServeConfig {
                rpc_socket,
                state_dir: a.state_dir,
                socket_dir,
                allowed_uids: a.allow_uid,
                socket_access: SocketAccess {
                    group: a.socket_group,
                    mode: a.socket_mode,
                },
                metrics_listen: a.metrics_listen,
                low_space_percent: a.low_space_percent,
            }) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("snapmv: {e}");
                    ExitCode::FAILURE
                }
            };
        }
        Command::Completions { shell } => {
            let shell = match shell {
                CompletionShell::Bash => clap_complete::Shell::Bash,
                CompletionShell::Zsh => clap_complete::Shell::Zsh,
                CompletionShell::Fish => clap_complete::Shell::Fish,
            };
            clap_complete::generate(shell, &mut Cli::command(), "snapmv", &mut std::io::stdout());
            return ExitCode::SUCCESS;
        }
        Command::Man { dir } => {
            let written = std::fs::create_dir_all(&dir)
                .and_then(|()| clap_mangen::generate_to(Cli::command(), &dir));
            return match written {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!(
                        "snapmv: cannot write the manual pages into {}: {e}",
                        dir.display()
                    );
                    ExitCode::FAILURE
                }
            };
        }
        Command::Create(c) => {
            let ctx = ctx(c.out);
            (ctx.json, cli::create(&ctx, c))
        }
        Command::Remove { name, force, out } => {
            let ctx = ctx(out);
            (ctx.json, cli::remove(&ctx, &name, force))
        }
        Command::Release { name, out } => {
            let ctx = ctx(out);
            (ctx.json, cli::release(&ctx, &name))
        }
        Command::Acquire {
            name,
            timeout,
            writeback,
            write_through,
            out,
        } => {
            let ctx = ctx(out);
            let mode = (writeback || write_through).then_some(writeback);
            (ctx.json, cli::acquire(&ctx, &name, timeout, mode))
        }
        Command::Snapshot {
            targets,
            group,
            memo,
            sync,
            out,
        } => {
            let ctx = ctx(out);
            (
                ctx.json,
                cli::snapshot(&ctx, &targets, group, memo.as_deref(), sync),
            )
        }
        Command::Memo {
            name,
            tag,
            memo,
            out,
        } => {
            let ctx = ctx(out);
            (ctx.json, cli::memo(&ctx, &name, tag, &memo))
        }
        Command::Rename {
            name,
            new_name,
            out,
        } => {
            let ctx = ctx(out);
            (ctx.json, cli::rename(&ctx, &name, &new_name))
        }
        Command::Delete {
            name,
            tag,
            force,
            sync,
            out,
        } => {
            let ctx = ctx(out);
            (ctx.json, cli::delete(&ctx, &name, tag, force, sync))
        }
        Command::Rollback {
            name,
            tag,
            background,
            out,
        } => {
            let ctx = ctx(out);
            (ctx.json, cli::rollback(&ctx, &name, tag, background))
        }
        Command::List { name, out } => {
            let ctx = ctx(out);
            (ctx.json, cli::list(&ctx, name.as_deref()))
        }
        Command::Exports { out } => {
            let ctx = ctx(out);
            (ctx.json, cli::exports(&ctx))
        }
        Command::Status { name, out } => {
            let ctx = ctx(out);
            (ctx.json, cli::status(&ctx, name.as_deref()))
        }
        Command::Stats { name, watch, out } => {
            let ctx = ctx(out);
            (ctx.json, cli::stats(&ctx, name.as_deref(), watch))
        }
        Command::Diff {
            name,
            from,
            to,
            out,
        } => {
            let ctx = ctx(out);
            (ctx.json, snapmv::cli::backup::diff(&ctx, &name, from, to))
        }
        Command::Export {
            name,
            tag,
            file,
            no_sync,
            out,
        } => {
            let ctx = ctx(out);
            (
                ctx.json,
                snapmv::cli::backup::export(&ctx, &name, tag, &file, !no_sync),
            )
        }
        Command::ExportDiff {
            name,
            from,
            to,
            file,
            out,
        } => {
            let ctx = ctx(out);
            (
                ctx.json,
                snapmv::cli::backup::export_diff(&ctx, &name, from, to, &file),
            )
        }
        Command::ImportDiff { file, target, out } => {
            let ctx = ctx(out);
            (
                ctx.json,
                snapmv::cli::backup::import_diff(&ctx, &file, &target),
            )
        }
        Command::Check {
            cow,
            repair,
            takeover,
            out,
        } => {
            let ctx = ctx(out);
            (ctx.json, cli::check(&ctx, &cow, repair, takeover))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&e.to_json()).unwrap_or_default()
                );
            } else {
                eprintln!("snapmv: {e}");
            }
            ExitCode::from(e.exit_status())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
