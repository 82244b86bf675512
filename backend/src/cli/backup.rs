//! The backup verbs: `diff`, `export`, `export-diff`, `import-diff` (see `docs/cli.md`).
//!
//! `export` and `export-diff` make a private FIFO, ask the daemon to stream the version into
//! it (`snapshot_stream`), and write what comes out: a sparse raw image, or the stream itself.
//! The daemon never writes a file on the client's behalf. `import-diff` works on files alone.

use std::fs::File;
use std::io::{IsTerminal, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde_json::json;
use snapmv_rpc::method as rpc;
use snapmv_rpc::methods as m;

use crate::cli::{absolute, format_size, CliError, Ctx};
use crate::stream::{Header, Record, StreamError, StreamReader, KIND_DATA, KIND_ZERO};

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> CliError {
    let what = what.into();
    move |source| CliError::Stream {
        what: what.clone(),
        source: StreamError::Io { what, source },
    }
}

fn stream_err(what: impl Into<String>) -> impl FnOnce(StreamError) -> CliError {
    let what = what.into();
    move |source| CliError::Stream { what, source }
}

fn version_name(tag: Option<u32>) -> String {
    match tag {
        Some(t) => format!("snapshot {t}"),
        None => "the origin".into(),
    }
}

/// `snapmv diff NAME FROM [TO]`: `snapshot_diff`.
pub fn diff(ctx: &Ctx, name: &str, from: u32, to: Option<u32>) -> Result<(), CliError> {
    let r = ctx.call::<rpc::SnapshotDiff>(&m::SnapshotDiffParams {
        name: name.into(),
        from,
        to,
    })?;
    if ctx.json {
        ctx.print_result(&r);
        return Ok(());
    }
    let bytes: u64 = r.extents.iter().map(|e| e.length).sum();
    println!(
        "{} changed between snapshot {from} and {} of export {name}: {} in {} extent(s) of {} (chunk size {})",
        if bytes == 0 { "nothing" } else { "data" },
        version_name(to),
        format_size(bytes),
        r.extents.len(),
        format_size(r.size),
        format_size(r.chunk_size),
    );
    if !r.extents.is_empty() {
        println!("{:>20} {:>20}", "OFFSET", "LENGTH");
        for e in &r.extents {
            println!("{:>20} {:>20}", e.offset, e.length);
        }
    }
    Ok(())
}

/// A private directory holding one FIFO; removed on drop.
struct Fifo {
    /// A private directory (0700), removed with everything in it when dropped.
    dir: tempfile::TempDir,
    path: PathBuf,
}

impl Fifo {
    fn new() -> Result<Fifo, CliError> {
        let dir = tempfile::Builder::new()
            .prefix("snapmv-stream-")
            .tempdir()
            .map_err(io_err(format!(
                "creating a private directory in {}",
                std::env::temp_dir().display()
            )))?;
        let path = dir.path().join("stream");
        rustix::fs::mkfifoat(
            rustix::fs::CWD,
            &path,
            rustix::fs::Mode::from_raw_mode(0o600),
        )
        .map_err(|e| io_err(format!("creating a FIFO in {}", dir.path().display()))(e.into()))?;
        Ok(Fifo { dir, path })
    }
}

/// A progress bar on a terminal (stderr), nothing otherwise.
fn progress(ctx: &Ctx, len: u64, msg: String) -> Option<indicatif::ProgressBar> {
    if ctx.json || !std::io::stderr().is_terminal() {
        return None;
    }
    let pb = indicatif::ProgressBar::new(len);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
    ) {
        pb.set_style(style.progress_chars("=> "));
    }
    pb.set_message(msg);
    Some(pb)
}

/// Runs `snapshot_stream` into a FIFO while `consume` reads the stream from it.
fn with_stream<T: Send + 'static>(
    ctx: &Ctx,
    name: &str,
    from: Option<u32>,
    to: Option<u32>,
    consume: impl FnOnce(File) -> Result<T, CliError> + Send + 'static,
) -> Result<(m::SnapshotStreamResult, T), CliError> {
    let fifo = Fifo::new()?;
    let fpath = fifo.path.clone();
    let reader = std::thread::spawn(move || {
        // Blocks until the daemon opens the other end; if the call fails first, the process
        // returns from `main` and this thread goes with it.
        let f = File::open(&fpath).map_err(io_err(format!("opening {}", fpath.display())))?;
        consume(f)
    });
    let call = ctx.call::<rpc::SnapshotStream>(&m::SnapshotStreamParams {
        name: name.into(),
        from,
        to,
        fifo: Some(fifo.path.to_string_lossy().into_owned()),
        fd_socket: None,
        writeback: false,
    });
    match call {
        Ok(r) => {
            let t = reader
                .join()
                .map_err(|_| CliError::Refused("the stream reader panicked".into()))??;
            Ok((r, t))
        }
        Err(e) => {
            // The reader's own failure (a full disk...) explains the daemon's broken pipe.
            if reader.is_finished() {
                if let Ok(Err(re)) = reader.join() {
                    return Err(re);
                }
            }
            Err(e)
        }
    }
}

/// Where an export goes.
enum Dest {
    Stdout,
    File(PathBuf),
}

fn dest(target: &Path) -> Result<Dest, CliError> {
    if target.as_os_str() == "-" {
        Ok(Dest::Stdout)
    } else {
        Ok(Dest::File(PathBuf::from(absolute("output", target)?)))
    }
}

/// Sends `f` to the daemon over a private socket, which writes the image into it directly
/// (no copy through the CLI); progress comes back over the same socket.
fn export_direct(
    ctx: &Ctx,
    name: &str,
    tag: u32,
    f: File,
    what: &str,
    sync: bool,
) -> Result<m::SnapshotStreamResult, CliError> {
    use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
    use std::mem::MaybeUninit;
    use std::os::fd::AsFd;
    let dir = Fifo::new()?;
    let sock = dir.dir.path().join("fd.sock");
    let l = std::os::unix::net::UnixListener::bind(&sock)
        .map_err(io_err(format!("listening on {}", sock.display())))?;
    let pb = progress(ctx, 0, format!("export {name} snapshot {tag}"));
    let pb2 = pb.clone();
    let f2 = f
        .try_clone()
        .map_err(io_err(format!("duplicating {what}")))?;
    let sender = std::thread::spawn(move || -> Result<(), std::io::Error> {
        // Blocks until the daemon connects; if the call fails first, `main` returns and this
        // thread goes with it.
        let (mut s, _) = l.accept()?;
        let fds = [f2.as_fd()];
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut cmsg = SendAncillaryBuffer::new(&mut space);
        cmsg.push(SendAncillaryMessage::ScmRights(&fds));
        rustix::net::sendmsg(
            &s,
            &[std::io::IoSlice::new(&[0])],
            &mut cmsg,
            SendFlags::empty(),
        )?;
        drop(f2);
        let mut b = [0u8; 8];
        if s.read_exact(&mut b).is_ok() {
            if let Some(pb) = &pb2 {
                pb.set_length(u64::from_be_bytes(b));
            }
        }
        while s.read_exact(&mut b).is_ok() {
            if let Some(pb) = &pb2 {
                pb.set_position(u64::from_be_bytes(b));
            }
        }
        Ok(())
    });
    let r = ctx.call::<rpc::SnapshotStream>(&m::SnapshotStreamParams {
        name: name.into(),
        from: None,
        to: Some(tag),
        fifo: None,
        fd_socket: Some(sock.to_string_lossy().into_owned()),
        writeback: sync,
    })?;
    if let Ok(Err(e)) = sender.join() {
        return Err(io_err(format!("handing {what} to the daemon"))(e));
    }
    if let Some(pb) = pb {
        pb.finish_and_clear();
    }
    if sync {
        f.sync_all().map_err(io_err(format!("syncing {what}")))?;
    }
    Ok(r)
}

/// `snapmv export NAME TAG FILE|-`: the whole snapshot as a raw image; zero chunks become
/// holes in a file (zeroes on stdout or a block device). A file or device is synced before
/// this returns unless `sync` is false (`--no-sync`).
pub fn export(ctx: &Ctx, name: &str, tag: u32, target: &Path, sync: bool) -> Result<(), CliError> {
    let d = dest(target)?;
    if let Dest::File(p) = &d {
        let regular = match std::fs::metadata(p) {
            Ok(md) => md.file_type().is_file(),
            Err(e) => e.kind() == std::io::ErrorKind::NotFound,
        };
        if regular {
            // A regular file: the daemon writes it directly (truncated: holes read as zeroes).
            let what = p.display().to_string();
            let f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(p)
                .map_err(io_err(format!("opening {what}")))?;
            let existed = p.exists();
            let r = match export_direct(ctx, name, tag, f, &what, sync) {
                Ok(r) => r,
                Err(e) => {
                    // Do not leave a half-written file that looks like an image.
                    if !existed {
                        let _ = std::fs::remove_file(p);
                    }
                    return Err(e);
                }
            };
            if ctx.json {
                ctx.print_json(&json!({
                    "name": name, "tag": tag, "output": target.display().to_string(),
                    "size": r.size, "data_bytes": r.data_bytes,
                }));
            } else {
                println!(
                    "snapshot {tag} of export {name} exported to {}: {} of {} holds data",
                    target.display(),
                    format_size(r.data_bytes),
                    format_size(r.size)
                );
            }
            return Ok(());
        }
    }
    let shown = target.display().to_string();
    let ctx2 = ctx.clone();
    let label = format!("export {name} snapshot {tag}");
    let created = match &d {
        Dest::File(p) if !p.exists() => Some(p.clone()),
        _ => None,
    };
    let res = with_stream(ctx, name, None, Some(tag), move |f| {
        // A small buffer: payloads (1 MiB) bypass it instead of being copied through it.
        let mut sr = StreamReader::new(std::io::BufReader::with_capacity(64 << 10, f))
            .map_err(stream_err("reading the stream from the daemon"))?;
        let hdr = sr.header.clone();
        let pb = progress(&ctx2, hdr.size, label);
        let mut buf = Vec::new();
        let zeroes = vec![0u8; 1 << 20];
        let mut written = 0u64;
        match d {
            Dest::Stdout => {
                let out = std::io::stdout();
                let mut out = std::io::BufWriter::with_capacity(1 << 20, out.lock());
                let mut at = 0u64;
                let fill = |out: &mut dyn Write, from: u64, to: u64| -> std::io::Result<()> {
                    let mut x = from;
                    while x < to {
                        let n = (to - x).min(zeroes.len() as u64) as usize;
                        out.write_all(&zeroes[..n])?;
                        x += n as u64;
                    }
                    Ok(())
                };
                while let Some(rec) = sr
                    .next_record(&mut buf)
                    .map_err(stream_err("reading the stream"))?
                {
                    fill(&mut out, at, rec.offset).map_err(io_err("writing stdout"))?;
                    out.write_all(&buf).map_err(io_err("writing stdout"))?;
                    written += buf.len() as u64;
                    at = rec.offset + rec.length;
                    if let Some(pb) = &pb {
                        pb.set_position(at);
                    }
                }
                fill(&mut out, at, hdr.size).map_err(io_err("writing stdout"))?;
                out.flush().map_err(io_err("writing stdout"))?;
            }
            Dest::File(p) => {
                let what = p.display().to_string();
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .mode(0o600)
                    .open(&p)
                    .map_err(io_err(format!("opening {what}")))?;
                let md = f.metadata().map_err(io_err(format!("examining {what}")))?;
                let is_file = md.file_type().is_file();
                if is_file {
                    // Holes everywhere, then the data.
                    f.set_len(0)
                        .and_then(|_| f.set_len(hdr.size))
                        .map_err(io_err(format!("sizing {what}")))?;
                } else {
                    let end = (&f)
                        .seek(SeekFrom::End(0))
                        .map_err(io_err(format!("sizing {what}")))?;
                    if end < hdr.size {
                        return Err(CliError::Refused(format!(
                            "{what} holds {end} bytes; the snapshot has {}",
                            hdr.size
                        )));
                    }
                }
                let mut at = 0u64;
                let zero_fill = |from: u64, to: u64| -> std::io::Result<()> {
                    let mut x = from;
                    while x < to {
                        let n = (to - x).min(zeroes.len() as u64) as usize;
                        f.write_all_at(&zeroes[..n], x)?;
                        x += n as u64;
                    }
                    Ok(())
                };
                while let Some(rec) = sr
                    .next_record(&mut buf)
                    .map_err(stream_err("reading the stream"))?
                {
                    if !is_file {
                        zero_fill(at, rec.offset).map_err(io_err(format!("writing {what}")))?;
                    }
                    f.write_all_at(&buf, rec.offset)
                        .map_err(io_err(format!("writing {what}")))?;
                    written += buf.len() as u64;
                    at = rec.offset + rec.length;
                    if let Some(pb) = &pb {
                        pb.set_position(at);
                    }
                }
                if !is_file {
                    zero_fill(at, hdr.size).map_err(io_err(format!("writing {what}")))?;
                }
                if sync {
                    f.sync_all().map_err(io_err(format!("syncing {what}")))?;
                }
            }
        }
        if let Some(pb) = pb {
            pb.finish_and_clear();
        }
        Ok((hdr, written))
    });
    let (r, (hdr, written)) = remove_on_error(res, created)?;
    let summary = json!({
        "name": name, "tag": tag, "output": shown, "size": hdr.size,
        "chunk_size": hdr.chunk_size, "data_bytes": written, "records": r.records,
    });
    report(ctx, &shown, &summary, || {
        format!(
            "snapshot {tag} of export {name} exported to {shown}: {} of {} holds data",
            format_size(written),
            format_size(hdr.size)
        )
    });
    Ok(())
}

/// Prints an export's summary: as JSON on stdout (on stderr when stdout carries the data), or
/// as a sentence when the data went to a file.
fn report(ctx: &Ctx, shown: &str, summary: &serde_json::Value, text: impl FnOnce() -> String) {
    if ctx.json && shown == "-" {
        eprintln!("{summary}");
    } else if ctx.json {
        ctx.print_json(summary);
    } else if shown != "-" {
        println!("{}", text());
    }
}

/// On failure, removes the output file the verb created (a partial image or diff must not be
/// mistaken for a complete one).
fn remove_on_error<T>(r: Result<T, CliError>, created: Option<PathBuf>) -> Result<T, CliError> {
    if r.is_err() {
        if let Some(p) = created {
            let _ = std::fs::remove_file(p);
        }
    }
    r
}

/// Copies what is read into a writer too.
struct Tee<R, W> {
    r: R,
    w: W,
}

impl<R: Read, W: Write> Read for Tee<R, W> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.r.read(buf)?;
        self.w.write_all(&buf[..n])?;
        Ok(n)
    }
}

/// `snapmv export-diff NAME FROM TO FILE|-`: the changed extents between two snapshots, as a
/// stream (`docs/format.md`), checked as it is written.
pub fn export_diff(
    ctx: &Ctx,
    name: &str,
    from: u32,
    to: u32,
    target: &Path,
) -> Result<(), CliError> {
    let d = dest(target)?;
    let shown = target.display().to_string();
    let ctx2 = ctx.clone();
    let label = format!("export-diff {name} {from}->{to}");
    let created = match &d {
        Dest::File(p) if !p.exists() => Some(p.clone()),
        _ => None,
    };
    let res = with_stream(ctx, name, Some(from), Some(to), move |f| {
        let out: Box<dyn Write + Send> = match &d {
            Dest::Stdout => Box::new(std::io::stdout()),
            Dest::File(p) => Box::new(
                std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(0o600)
                    .open(p)
                    .map_err(io_err(format!("opening {}", p.display())))?,
            ),
        };
        let out = std::io::BufWriter::with_capacity(1 << 20, out);
        let tee = Tee {
            r: std::io::BufReader::with_capacity(64 << 10, f),
            w: out,
        };
        let mut sr =
            StreamReader::new(tee).map_err(stream_err("reading the stream from the daemon"))?;
        let hdr = sr.header.clone();
        let pb = progress(&ctx2, hdr.size, label);
        let mut buf = Vec::new();
        while let Some(rec) = sr
            .next_record(&mut buf)
            .map_err(stream_err("reading the stream"))?
        {
            if let Some(pb) = &pb {
                pb.set_position(rec.offset + rec.length);
            }
        }
        if let Some(pb) = pb {
            pb.finish_and_clear();
        }
        let tee = sr.into_inner();
        let mut w = tee.w;
        w.flush().map_err(io_err("writing the diff"))?;
        if let Dest::File(p) = &d {
            let f = w
                .into_inner()
                .map_err(|e| io_err("writing the diff")(e.into_error()))?;
            drop(f);
            File::open(p)
                .and_then(|f| f.sync_all())
                .map_err(io_err(format!("syncing {}", p.display())))?;
        }
        Ok(hdr)
    });
    let (r, hdr) = remove_on_error(res, created)?;
    let summary = json!({
        "name": name, "from": from, "to": to, "output": shown, "size": hdr.size,
        "chunk_size": hdr.chunk_size, "records": r.records, "data_bytes": r.data_bytes,
    });
    report(ctx, &shown, &summary, || {
        format!(
            "diff of export {name} from snapshot {from} to snapshot {to} written to {shown}: {} record(s), {} of data",
            r.records,
            format_size(r.data_bytes)
        )
    });
    Ok(())
}

/// `snapmv import-diff FILE TARGET`: checks the whole diff (checksums, size, and that TARGET
/// holds the diff's `from` version on every range it changes), then applies it.
pub fn import_diff(ctx: &Ctx, file: &Path, target: &Path) -> Result<(), CliError> {
    let fshown = file.display().to_string();
    let tshown = target.display().to_string();
    let open_stream = || -> Result<StreamReader<std::io::BufReader<File>>, CliError> {
        let f = File::open(file).map_err(io_err(format!("opening {fshown}")))?;
        StreamReader::new(std::io::BufReader::with_capacity(1 << 20, f))
            .map_err(stream_err(format!("reading {fshown}")))
    };
    let mut sr = open_stream()?;
    let hdr: Header = sr.header.clone();
    let Some(from) = hdr.from else {
        return Err(CliError::Refused(format!(
            "{fshown} holds a whole version, not a diff (restore whole versions from the raw image `snapmv export` writes)"
        )));
    };
    let t = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(target)
        .map_err(io_err(format!("opening {tshown}")))?;
    let tsize = (&t)
        .seek(SeekFrom::End(0))
        .map_err(io_err(format!("sizing {tshown}")))?;
    if tsize != hdr.size {
        return Err(CliError::Refused(format!(
            "{tshown} holds {tsize} bytes; the diff is for a volume of {} bytes (origin {})",
            hdr.size, hdr.origin_id
        )));
    }
    // Pass 1: the whole stream is sound and the target is the `from` version where it changes.
    let pb = progress(ctx, hdr.size, format!("checking {fshown}"));
    let mut buf = Vec::new();
    let mut cur = Vec::new();
    let mut records = 0u64;
    while let Some(rec) = sr
        .next_record(&mut buf)
        .map_err(stream_err(format!("reading {fshown}")))?
    {
        check_from(&t, &rec, &mut cur, &tshown, from)?;
        records += 1;
        if let Some(pb) = &pb {
            pb.set_position(rec.offset + rec.length);
        }
    }
    if let Some(pb) = pb {
        pb.finish_and_clear();
    }
    // Pass 2: apply.
    let mut sr = open_stream()?;
    if sr.header != hdr {
        return Err(CliError::Refused(format!(
            "{fshown} changed while it was read"
        )));
    }
    let pb = progress(ctx, hdr.size, format!("applying {fshown}"));
    let zeroes = vec![0u8; crate::stream::MAX_RECORD as usize];
    let mut data = 0u64;
    while let Some(rec) = sr
        .next_record(&mut buf)
        .map_err(stream_err(format!("reading {fshown}")))?
    {
        let w = match rec.kind {
            KIND_DATA => {
                data += buf.len() as u64;
                &buf[..]
            }
            KIND_ZERO => &zeroes[..rec.length as usize],
            _ => continue,
        };
        t.write_all_at(w, rec.offset)
            .map_err(io_err(format!("writing {tshown}")))?;
        if let Some(pb) = &pb {
            pb.set_position(rec.offset + rec.length);
        }
    }
    t.sync_all().map_err(io_err(format!("syncing {tshown}")))?;
    if let Some(pb) = pb {
        pb.finish_and_clear();
    }
    if ctx.json {
        ctx.print_json(&json!({
            "file": fshown, "target": tshown, "origin_id": hdr.origin_id, "from": from,
            "to": hdr.to, "size": hdr.size, "records": records, "data_bytes": data,
        }));
    } else {
        println!(
            "{fshown} applied to {tshown}: it now holds {} of origin {} ({records} record(s), {} of data)",
            version_name(hdr.to),
            hdr.origin_id,
            format_size(data)
        );
    }
    Ok(())
}

fn check_from(
    t: &File,
    rec: &Record,
    cur: &mut Vec<u8>,
    tshown: &str,
    from: u32,
) -> Result<(), CliError> {
    let Some(want) = rec.from_crc else {
        return Ok(());
    };
    cur.resize(rec.length as usize, 0);
    t.read_exact_at(cur, rec.offset)
        .map_err(io_err(format!("reading {tshown}")))?;
    if crc32c::crc32c(cur) != want {
        return Err(CliError::Refused(format!(
            "{tshown} does not hold snapshot {from}, the version this diff starts from: bytes {}..{} differ; nothing was written",
            rec.offset,
            rec.offset + rec.length
        )));
    }
    Ok(())
}
