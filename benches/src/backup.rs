//! Scenario 7: data out. A full export of a snapshot (`snapmv export`) against `dd bs=1M
//! conv=fsync` of the same bytes (both durable when they return: `snapmv export` syncs the
//! image it wrote), `snapmv export --no-sync` against plain `dd` (neither syncs), and NBD reads
//! of a snapshot export (`qemu-img convert` from `nbd+unix://`) against `qemu-nbd` serving the
//! same raw file. Each repetition runs every case in turn, so that a pair sees the same machine.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::error::{io_err, BenchError, Result};
use crate::report::Row;
use crate::scenarios::{fill_file, sparse_file, Ctx};
use crate::servers::{run_cmd, Snapmv};

/// `qemu-nbd` serving a raw file read-only on a Unix socket; stopped on drop.
struct QemuNbd {
    child: Child,
}

impl QemuNbd {
    fn start(file: &Path, sock: &Path) -> Result<QemuNbd> {
        let child = Command::new("qemu-nbd")
            .args(["-r", "-f", "raw", "--persistent", "-k"])
            .arg(sock)
            .arg(file)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(io_err("starting qemu-nbd", file))?;
        let q = QemuNbd { child };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !sock.exists() {
            if Instant::now() > deadline {
                return Err(BenchError::Invalid(format!(
                    "qemu-nbd did not create {}",
                    sock.display()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(q)
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Seconds `f` takes.
fn timed(f: impl FnOnce() -> Result<String>) -> Result<f64> {
    let t = Instant::now();
    f()?;
    Ok(t.elapsed().as_secs_f64())
}

pub fn s7(ctx: &mut Ctx, sm: &mut Snapmv) -> Result<()> {
    eprintln!("scenario 7: backups (full export, NBD reads)");
    let size = ctx.small;
    let origin = ctx.dir.join("origin7.raw");
    let store = ctx.dir.join("store7.cow");
    fill_file(&origin, size)?;
    sparse_file(&store, size / 2 + (64 << 20))?;
    sm.export_origin("v7", &origin, &store, true, false)?;
    let tag_n = sm.snapshot("v7")?;
    let tag = tag_n.to_string();
    sm.call(
        "snapshot_export",
        json!({"name": "s7n", "origin": origin, "cow": store, "tag": tag_n,
               "readonly": true, "protocol": "nbd"}),
    )?;
    let rpc = sm.socket_dir.join("rpc.sock");
    let nbd_uri = format!(
        "nbd+unix:///s7n?socket={}",
        sm.socket_dir.join("s7n.sock").display()
    );
    let qsock = ctx.dir.join("qemu-nbd.sock");
    let _qnbd = QemuNbd::start(&origin, &qsock)?;
    let qemu_uri = format!("nbd+unix:///?socket={}", qsock.display());
    let out = ctx.dir.join("backup-out.raw");
    let out_s = out.display().to_string();
    let bin = ctx.snapmv_bin.display().to_string();
    let rpc_s = rpc.display().to_string();
    let (o_if, o_of) = (
        format!("if={}", origin.display()),
        format!("of={}", out.display()),
    );
    let mb = size as f64 / 1e6;
    let (mut export, mut export_ns, mut dd, mut dd_sync, mut nbd, mut qnbd) = (
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
    );
    for rep in 0..ctx.reps {
        // Each case starts with no dirty data of the one before: a removed file's pages still
        // being written back would otherwise slow whichever case runs next.
        let rm = || {
            let _ = std::fs::remove_file(&out);
            // SAFETY: sync(2) takes no arguments and cannot fail.
            unsafe { libc::sync() };
        };
        rm();
        let e = timed(|| {
            run_cmd(
                &bin,
                &["--rpc-socket", &rpc_s, "export", "v7", &tag, &out_s],
            )
        })?;
        rm();
        let ens = timed(|| {
            run_cmd(
                &bin,
                &[
                    "--rpc-socket",
                    &rpc_s,
                    "export",
                    "v7",
                    &tag,
                    &out_s,
                    "--no-sync",
                ],
            )
        })?;
        rm();
        let d = timed(|| run_cmd("dd", &[&o_if, &o_of, "bs=1M", "status=none"]))?;
        rm();
        let ds = timed(|| run_cmd("dd", &[&o_if, &o_of, "bs=1M", "conv=fsync", "status=none"]))?;
        rm();
        let n = timed(|| {
            run_cmd(
                "qemu-img",
                &["convert", "-f", "raw", "-O", "raw", &nbd_uri, &out_s],
            )
        })?;
        rm();
        let q = timed(|| {
            run_cmd(
                "qemu-img",
                &["convert", "-f", "raw", "-O", "raw", &qemu_uri, &out_s],
            )
        })?;
        rm();
        eprintln!(
            "  rep {rep}: export {:.0} MB/s, dd conv=fsync {:.0} MB/s; export --no-sync {:.0} MB/s, dd {:.0} MB/s; NBD {:.0} MB/s, qemu-nbd {:.0} MB/s",
            mb / e,
            mb / ds,
            mb / ens,
            mb / d,
            mb / n,
            mb / q
        );
        export.push(mb / e);
        export_ns.push(mb / ens);
        dd.push(mb / d);
        dd_sync.push(mb / ds);
        nbd.push(mb / n);
        qnbd.push(mb / q);
    }
    let mib = size >> 20;
    let case = |how: &str| {
        format!("full export of a snapshot ({mib} MiB, every chunk shared with the origin) to a file, `snapmv export{how}`")
    };
    ctx.rows.push(
        Row::new(
            "7",
            &case(""),
            "MB/s",
            &export,
            &dd_sync,
            "dd bs=1M conv=fsync of the origin file to the same file (both durable when they return)",
        )
        .note("goal ≥ 0.8× dd"),
    );
    ctx.rows.push(
        Row::new(
            "7",
            &case(" --no-sync"),
            "MB/s",
            &export_ns,
            &dd,
            "dd bs=1M of the origin file to the same file (neither syncs)",
        )
        .note("goal ≥ 0.8× dd"),
    );
    ctx.rows.push(Row::new(
        "7",
        &format!("NBD read of a snapshot export ({mib} MiB), `qemu-img convert` from nbd+unix"),
        "MB/s",
        &nbd,
        &qnbd,
        "qemu-nbd -r on the raw origin file, same client",
    ));
    sm.call("export_remove", json!({"name": "s7n", "force": true}))?;
    Ok(())
}
