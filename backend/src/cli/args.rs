//! Command-line arguments shared by `main.rs` and the verbs: clap derives them on the structs
//! the verbs take, so nothing is copied field by field.

use std::path::PathBuf;

use clap::Args;
use snapmv_rpc::limits;

/// Output options of the client verbs.
#[derive(Args, Debug, Clone, Copy, Default)]
pub struct Out {
    /// Print JSON (the daemon's result; errors as {"error":{...}}) instead of text.
    #[arg(long)]
    pub json: bool,
}

/// `snapmv create`: export an origin (dms co), or with TAG a snapshot of it (dms cs).
#[derive(Args, Debug, Clone, Default)]
#[command(group(clap::ArgGroup::new("fmt").args(["format", "force_format"]).multiple(false)))]
#[command(group(clap::ArgGroup::new("chunk_use").args(["format", "force_format", "incoming"]).multiple(true)))]
pub struct CreateArgs {
    /// Export name: 1 to 64 of A-Z a-z 0-9 . _ -
    pub name: String,
    /// Origin file or block device, or RBD image rbd:POOL[/NS]/IMAGE[:id=USER][:conf=PATH]
    pub origin: PathBuf,
    /// COW store file or block device, or RBD image rbd:POOL[/NS]/IMAGE[:id=USER][:conf=PATH]
    pub cow: PathBuf,
    /// Export snapshot TAG instead of the origin (dms cs); 1 or more.
    #[arg(
        conflicts_with_all = ["bind", "format", "force_format", "chunk_size", "incoming"],
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    pub tag: Option<u32>,
    /// Bind the origin to the store (a new binding).
    #[arg(short = 'b', long)]
    pub bind: bool,
    /// Format the store first (refused if it already holds one); done last, after every check.
    #[arg(short = 'f', long, requires = "bind")]
    pub format: bool,
    /// Format the store even if it already holds one (destroys its snapshots).
    #[arg(short = 'F', long, requires = "bind")]
    pub force_format: bool,
    /// Chunk size in 4 KiB pages (power of two, 1..=256) when formatting, or the store's with
    /// --incoming [default: 1]
    #[arg(short = 'c', long, value_name = "PAGES", requires = "chunk_use", value_parser = parse_chunk)]
    pub chunk_size: Option<u32>,
    /// Origin id inside the store [default: the origin's file name]
    #[arg(long, value_name = "ID")]
    pub origin_id: Option<String>,
    /// Number of virtqueues, 1..=64 [default: 4]
    #[arg(
        short = 'q',
        long,
        value_name = "N",
        value_parser = clap::value_parser!(u16).range(1..=i64::from(limits::MAX_NUM_QUEUES))
    )]
    pub num_queues: Option<u16>,
    /// Largest virtqueue size, a power of two up to 32768 [default: 1024]
    #[arg(long, value_name = "N", value_parser = parse_queue_size)]
    pub queue_size: Option<u16>,
    /// Serve read-only (an origin is then opened read-only: a 0444 file or read-only mount works).
    #[arg(short = 'r', long)]
    pub readonly: bool,
    /// Open the files with O_DIRECT.
    #[arg(long)]
    pub direct: bool,
    /// vhost-user socket path [default: the daemon's socket directory/NAME.sock]
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Group of the socket, name or gid [default: the daemon's --socket-group]
    #[arg(long, value_name = "GROUP")]
    pub socket_group: Option<String>,
    /// Mode of the socket, octal, e.g. 0660 [default: the daemon's --socket-mode]
    #[arg(long, value_name = "MODE", value_parser = parse_mode_str)]
    pub socket_mode: Option<String>,
    /// Serve the export over NBD (export name NAME) instead of vhost-user-blk (docs/nbd.md).
    #[arg(long)]
    pub nbd: bool,
    /// Take the origin's and the store's RBD images over from their owner, a daemon believed
    /// dead: it is blocklisted (fenced) first, so none of its writes lands afterwards
    /// (docs/operations.md, "Stores on Ceph RBD").
    #[arg(long, conflicts_with_all = ["tag", "format", "force_format"])]
    pub takeover: bool,
    /// Live migration destination: serve the socket now, open the store only at `snapmv
    /// acquire NAME`, once the source daemon released it (docs/migration.md).
    #[arg(long, conflicts_with_all = ["bind", "nbd"])]
    pub incoming: bool,
    /// Output options.
    #[command(flatten)]
    pub out: Out,
}

fn parse_queue_size(s: &str) -> Result<u16, String> {
    let max = limits::MAX_QUEUE_SIZE;
    let n: u16 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number from 1 to {max}"))?;
    if !limits::queue_size_ok(n) {
        return Err(format!("{n} is not a power of two from 1 to {max}"));
    }
    Ok(n)
}

fn parse_chunk(s: &str) -> Result<u32, String> {
    let n: u32 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number of 4 KiB pages"))?;
    if !limits::chunk_pages_ok(n) {
        return Err(format!(
            "{n} is not a power of two from 1 to {}",
            limits::MAX_CHUNK_PAGES
        ));
    }
    Ok(n)
}

fn parse_mode_str(s: &str) -> Result<String, String> {
    snapmv_rpc::methods::parse_socket_mode(s).map(|_| s.to_string())
}
