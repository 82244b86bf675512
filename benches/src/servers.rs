//! The two servers under test, started by the harness itself: `snapmv serve` (driven over its
//! JSON-RPC socket) and `qemu-storage-daemon` (driven over QMP), plus their CPU time.

use crate::error::{io_err, BenchError, Result};
use serde_json::{json, Value};
use snapmv_rpc::RpcClient;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a server may take to come up.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// CPU time (user + system) of a process, in seconds, from /proc/PID/stat.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces: fields after the last ')' start at field 3.
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = if hz > 0 { hz as f64 } else { 100.0 };
    Some((utime + stime) as f64 / hz)
}

fn stop_child(child: &mut Child) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    if let Ok(pid) = i32::try_from(child.id()) {
        // SAFETY: kill has no memory-safety preconditions; pid is our own child.
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn wait_for_path(path: &Path, child: &mut Child, server: &str, log: &Path) -> Result<()> {
    let deadline = Instant::now() + START_TIMEOUT;
    while !path.exists() {
        if let Ok(Some(st)) = child.try_wait() {
            return Err(BenchError::Start {
                server: server.into(),
                what: format!("exited with {st} before creating {}", path.display()),
                log: log.into(),
            });
        }
        if Instant::now() > deadline {
            return Err(BenchError::Start {
                server: server.into(),
                what: format!("{} not created after {START_TIMEOUT:?}", path.display()),
                log: log.into(),
            });
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// A running `snapmv serve`.
pub struct Snapmv {
    child: Child,
    rpc: RpcClient,
    /// Directory of the export sockets.
    pub socket_dir: PathBuf,
}

impl Snapmv {
    /// Starts `snapmv serve` with its state and sockets under `dir`.
    pub fn start(bin: &Path, dir: &Path) -> Result<Snapmv> {
        let state = dir.join("snapmv-state");
        let socks = dir.join("snapmv-socks");
        for d in [&state, &socks] {
            std::fs::create_dir_all(d).map_err(io_err("creating a directory", d))?;
        }
        let rpc_path = socks.join("rpc.sock");
        let log = dir.join("snapmv.log");
        let logf = std::fs::File::create(&log).map_err(io_err("creating the log", &log))?;
        let mut child = Command::new(bin)
            .arg("--rpc-socket")
            .arg(&rpc_path)
            .arg("serve")
            .arg("--state-dir")
            .arg(&state)
            .arg("--socket-dir")
            .arg(&socks)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(logf)
            .spawn()
            .map_err(io_err("starting snapmv serve", bin))?;
        if let Err(e) = wait_for_path(&rpc_path, &mut child, "snapmv serve", &log) {
            stop_child(&mut child);
            return Err(e);
        }
        let deadline = Instant::now() + START_TIMEOUT;
        let rpc = loop {
            match RpcClient::connect(&rpc_path) {
                Ok(c) => break c,
                Err(e) if Instant::now() > deadline => {
                    stop_child(&mut child);
                    return Err(BenchError::Rpc {
                        method: "connect".into(),
                        source: e,
                    });
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        Ok(Snapmv {
            child,
            rpc,
            socket_dir: socks,
        })
    }

    /// The daemon's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Calls an RPC method.
    pub fn call(&mut self, method: &str, params: Value) -> Result<Value> {
        self.rpc
            .call_raw(method, params)
            .map_err(|source| BenchError::Rpc {
                method: method.into(),
                source,
            })
    }

    /// Exports an origin (binding and formatting the store when `format`), `queues` queues.
    /// Returns the socket path.
    pub fn export_origin(
        &mut self,
        name: &str,
        origin: &Path,
        cow: &Path,
        format: bool,
        direct: bool,
    ) -> Result<PathBuf> {
        let mut p = json!({
            "name": name,
            "origin": origin,
            "cow": cow,
            "num_queues": 2,
            "queue_size": 1024,
            "direct": direct,
        });
        if format {
            p["bind"] = json!(true);
            p["force_format"] = json!(true);
            p["chunk_size"] = json!(1);
        }
        let r = self.call("origin_create", p)?;
        socket_of(&r)
    }

    /// Exports snapshot `tag` of `origin_id`. Returns the socket path.
    pub fn export_snapshot(
        &mut self,
        name: &str,
        origin_id: &str,
        cow: &Path,
        tag: u32,
    ) -> Result<PathBuf> {
        let r = self.call(
            "snapshot_export",
            json!({"name": name, "origin_id": origin_id, "cow": cow, "tag": tag,
                   "num_queues": 2, "queue_size": 1024}),
        )?;
        socket_of(&r)
    }

    /// Takes a snapshot of what `name` serves; returns its tag.
    pub fn snapshot(&mut self, name: &str) -> Result<u32> {
        let r = self.call("snapshot_create", json!({"name": name}))?;
        r["tag"]
            .as_u64()
            .and_then(|t| u32::try_from(t).ok())
            .ok_or_else(|| {
                BenchError::Invalid(format!("snapshot_create on {name} returned no tag: {r}"))
            })
    }

    /// Deletes snapshot `tag` of the origin `name` exports.
    pub fn delete(&mut self, name: &str, tag: u32) -> Result<()> {
        self.call("snapshot_delete", json!({"name": name, "tag": tag}))
            .map(|_| ())
    }

    /// Resident memory of the daemon in bytes (`VmRSS` of /proc/PID/status).
    pub fn rss_bytes(&self) -> Result<u64> {
        let path = PathBuf::from(format!("/proc/{}/status", self.pid()));
        let text = std::fs::read_to_string(&path).map_err(io_err("reading", &path))?;
        text.lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kb| kb * 1024)
            .ok_or_else(|| BenchError::Invalid(format!("no VmRSS in {}", path.display())))
    }

    /// Sends SIGTERM and waits for the daemon to exit (a clean stop); returns how long it
    /// took. Past `limit` the daemon is killed and that is an error.
    pub fn stop_timed(mut self, limit: Duration) -> Result<Duration> {
        let t = Instant::now();
        if let Ok(pid) = i32::try_from(self.child.id()) {
            // SAFETY: kill has no memory-safety preconditions; pid is our own child.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        while t.elapsed() < limit {
            if let Ok(Some(_)) = self.child.try_wait() {
                return Ok(t.elapsed());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Err(BenchError::Invalid(format!(
            "snapmv serve (pid {}) still running {limit:?} after SIGTERM",
            self.pid()
        )))
    }

    /// Stops serving `name`.
    pub fn remove(&mut self, name: &str) -> Result<()> {
        self.call("export_remove", json!({"name": name}))
            .map(|_| ())
    }
}

fn socket_of(r: &Value) -> Result<PathBuf> {
    r["socket"]
        .as_str()
        .map(PathBuf::from)
        .ok_or_else(|| BenchError::Invalid(format!("export has no socket: {r}")))
}

impl Drop for Snapmv {
    fn drop(&mut self) {
        stop_child(&mut self.child);
    }
}

/// A running `qemu-storage-daemon` with one vhost-user-blk export and a QMP monitor.
pub struct Qsd {
    child: Child,
    qmp: BufReader<UnixStream>,
    qmp_path: PathBuf,
    /// The export's vhost-user socket.
    pub socket: PathBuf,
    /// The node name of the exported block node.
    pub node: String,
}

impl Qsd {
    /// Starts QSD on `blockdev` (a JSON blockdev definition whose node-name is `node`) with an
    /// export of 2 queues on `dir/NAME.sock`.
    pub fn start(dir: &Path, name: &str, blockdev: &Value, node: &str) -> Result<Qsd> {
        let socket = dir.join(format!("qsd-{name}.sock"));
        let qmp_path = dir.join(format!("qsd-{name}.qmp"));
        let log = dir.join(format!("qsd-{name}.log"));
        for p in [&socket, &qmp_path] {
            let _ = std::fs::remove_file(p);
        }
        let logf = std::fs::File::create(&log).map_err(io_err("creating the log", &log))?;
        let export = format!(
            "type=vhost-user-blk,id=exp0,node-name={node},addr.type=unix,addr.path={},writable=on,num-queues=2",
            socket.display()
        );
        let chardev = format!(
            "socket,id=qmp0,path={},server=on,wait=off",
            qmp_path.display()
        );
        let mut child = Command::new("qemu-storage-daemon")
            .arg("--blockdev")
            .arg(blockdev.to_string())
            .arg("--export")
            .arg(&export)
            .arg("--chardev")
            .arg(&chardev)
            .arg("--monitor")
            .arg("chardev=qmp0")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(logf)
            .spawn()
            .map_err(io_err(
                "starting qemu-storage-daemon",
                "qemu-storage-daemon",
            ))?;
        for p in [&socket, &qmp_path] {
            if let Err(e) = wait_for_path(p, &mut child, "qemu-storage-daemon", &log) {
                stop_child(&mut child);
                return Err(e);
            }
        }
        let stream = match UnixStream::connect(&qmp_path) {
            Ok(s) => s,
            Err(e) => {
                stop_child(&mut child);
                return Err(io_err("connecting to QMP", &qmp_path)(e));
            }
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(600)));
        let mut q = Qsd {
            child,
            qmp: BufReader::new(stream),
            qmp_path,
            socket,
            node: node.to_string(),
        };
        let mut greeting = String::new();
        q.qmp
            .read_line(&mut greeting)
            .map_err(io_err("reading the QMP greeting", &q.qmp_path))?;
        q.qmp_cmd("qmp_capabilities", json!({}))?;
        Ok(q)
    }

    /// Starts QSD on a raw file (`cache.direct` as asked, `aio` as given).
    pub fn start_raw(dir: &Path, name: &str, file: &Path, direct: bool, aio: &str) -> Result<Qsd> {
        let bd = json!({
            "driver": "file", "node-name": "disk", "filename": file,
            "cache": {"direct": direct}, "aio": aio, "locking": "off",
        });
        Self::start(dir, name, &bd, "disk")
    }

    /// Starts QSD on a qcow2 image (optionally with a raw backing file).
    pub fn start_qcow2(
        dir: &Path,
        name: &str,
        image: &Path,
        backing: Option<&Path>,
        aio: &str,
    ) -> Result<Qsd> {
        let mut bd = json!({
            "driver": "qcow2", "node-name": "disk",
            "file": {"driver": "file", "filename": image, "aio": aio, "locking": "off"},
        });
        if let Some(b) = backing {
            bd["backing"] = json!({"driver": "raw",
                "file": {"driver": "file", "filename": b, "aio": aio, "locking": "off", "read-only": true}});
        }
        Self::start(dir, name, &bd, "disk")
    }

    /// The daemon's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Runs a QMP command and returns its `return` value.
    pub fn qmp_cmd(&mut self, command: &str, args: Value) -> Result<Value> {
        let qerr = |what: String, q: &Path| BenchError::Qmp {
            command: command.into(),
            sock: q.to_path_buf(),
            what,
        };
        let msg = json!({"execute": command, "arguments": args}).to_string() + "\n";
        self.qmp
            .get_mut()
            .write_all(msg.as_bytes())
            .map_err(|e| qerr(format!("sending: {e}"), &self.qmp_path))?;
        loop {
            let mut line = String::new();
            let n = self
                .qmp
                .read_line(&mut line)
                .map_err(|e| qerr(format!("reading: {e}"), &self.qmp_path))?;
            if n == 0 {
                return Err(qerr("monitor closed".into(), &self.qmp_path));
            }
            let v: Value = serde_json::from_str(&line)
                .map_err(|e| qerr(format!("bad JSON {line:?}: {e}"), &self.qmp_path))?;
            if v.get("event").is_some() {
                continue;
            }
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            return Err(qerr(format!("error reply {v}"), &self.qmp_path));
        }
    }

    /// Takes an internal qcow2 snapshot named `name` (blockdev-snapshot-internal-sync).
    pub fn snapshot(&mut self, name: &str) -> Result<()> {
        let node = self.node.clone();
        self.qmp_cmd(
            "blockdev-snapshot-internal-sync",
            json!({"device": node, "name": name}),
        )
        .map(|_| ())
    }

    /// Deletes the internal snapshot `name`.
    pub fn delete_snapshot(&mut self, name: &str) -> Result<()> {
        let node = self.node.clone();
        self.qmp_cmd(
            "blockdev-snapshot-delete-internal-sync",
            json!({"device": node, "name": name}),
        )
        .map(|_| ())
    }
}

impl Drop for Qsd {
    fn drop(&mut self) {
        stop_child(&mut self.child);
    }
}

/// Runs a helper program; fails with its stderr.
pub fn run_cmd(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| BenchError::Command {
            program: program.into(),
            args: args.join(" "),
            what: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(BenchError::Command {
            program: program.into(),
            args: args.join(" "),
            what: format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr))
}

#[cfg(test)]
mod tests {
    #[test]
    fn cpu_seconds_of_this_process_grows() {
        let a = super::cpu_seconds(std::process::id()).expect("own /proc stat");
        // Spin until the counter moves (10 ms ticks); a broken parser never sees it move.
        let t = std::time::Instant::now();
        let mut x = 0u64;
        let mut b = a;
        while b <= a && t.elapsed() < std::time::Duration::from_secs(20) {
            for _ in 0..1_000_000 {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(1));
            }
            b = super::cpu_seconds(std::process::id()).expect("own /proc stat");
        }
        assert!(b > a, "CPU time did not grow: {a} -> {b}");
        assert!(super::cpu_seconds(0).is_none());
    }
}
