//! Helpers for the QEMU guest end-to-end tests: the guest tools (qemu/setup.sh,
//! qemu/mkinitramfs.sh, qemu/run-guest.sh), a running guest whose serial console is read line
//! by line, a QMP client (live migration), and CLI helpers on top of `crate::daemon::Daemon`.
//!
//! Guests run under TCG (`-accel tcg -cpu max`): on these hosts KVM cannot boot a stock kernel.
//! The guest side is a busybox initramfs that runs one shell script and prints markers (see
//! qemu/mkinitramfs.sh): `SNAPMV-GUEST-READY`, `SNAPMV-GUEST-ERROR …`, `SNAPMV-GUEST-END rc=N`.
//!
//! Helpers panic with a message naming what failed: they only run inside tests.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crate::daemon::Daemon;

/// How long any single wait may last before the test gives up as hung. This is a hang guard,
/// not a performance assertion: TCG guests on a loaded 2-core machine are slow.
pub const HANG_GUARD: Duration = Duration::from_secs(600);

/// The repository root (the parent of `tests/`).
pub fn repo_root() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    here.parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| panic!("tests crate dir {} has no parent", here.display()))
}

/// True when running under CI (`CI` set to anything but empty, `0` or `false`): missing QEMU is
/// then a failure, not a skip.
pub fn under_ci() -> bool {
    match std::env::var("CI") {
        Ok(v) => !(v.is_empty() || v == "0" || v.eq_ignore_ascii_case("false")),
        Err(_) => false,
    }
}

fn in_path(prog: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(prog).is_file()))
        .unwrap_or(false)
}

/// The cache dir setup.sh fills (honours `SNAPMV_QEMU_CACHE` like the scripts do).
pub fn cache_dir() -> PathBuf {
    match std::env::var_os("SNAPMV_QEMU_CACHE") {
        Some(p) => PathBuf::from(p),
        None => repo_root().join("qemu/cache"),
    }
}

fn missing_tools() -> Vec<String> {
    let mut missing = Vec::new();
    if !in_path("qemu-system-x86_64") {
        missing.push("qemu-system-x86_64".to_string());
    }
    if !Path::new("/bin/busybox").is_file() {
        missing.push("/bin/busybox (busybox-static)".to_string());
    }
    if !in_path("cpio") {
        missing.push("cpio".to_string());
    }
    let kernel = cache_dir().join("kernel/vmlinuz");
    if !kernel.is_file() {
        missing.push(kernel.display().to_string());
    }
    missing
}

/// The guest tools, ready to use.
#[derive(Debug, Clone)]
pub struct GuestTools {
    qemu_dir: PathBuf,
}

/// Makes sure QEMU, busybox, cpio and the guest kernel are there, running qemu/setup.sh (which
/// installs what is missing, as root) if not. Returns `None` — after printing a loud SKIPPED
/// message — only when they cannot be had and `CI` is not set; under CI that panics.
pub fn guest_tools(test: &str) -> Option<GuestTools> {
    let qemu_dir = repo_root().join("qemu");
    let mut missing = missing_tools();
    if !missing.is_empty() {
        eprintln!(
            "{test}: missing {}; running qemu/setup.sh to install them",
            missing.join(", ")
        );
        match Command::new(qemu_dir.join("setup.sh")).status() {
            Ok(s) if s.success() => {}
            Ok(s) => eprintln!("{test}: qemu/setup.sh failed ({s})"),
            Err(e) => eprintln!("{test}: cannot run qemu/setup.sh: {e}"),
        }
        missing = missing_tools();
    }
    if missing.is_empty() {
        return Some(GuestTools { qemu_dir });
    }
    let what = format!(
        "{test}: QEMU guest tools unavailable (missing {}); run ./qemu/setup.sh as root",
        missing.join(", ")
    );
    if under_ci() {
        panic!("{what} (CI is set, so this is a failure, not a skip)");
    }
    eprintln!("\n!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!");
    eprintln!("!!! SKIPPED {what}");
    eprintln!("!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n");
    None
}

/// One vhost-user-blk disk of a guest.
#[derive(Debug, Clone)]
pub struct Disk {
    pub socket: PathBuf,
    pub queues: u32,
}

/// How to boot a guest.
#[derive(Debug, Clone)]
pub struct GuestConfig {
    pub initrd: PathBuf,
    pub disks: Vec<Disk>,
    pub smp: u32,
    /// Extra kernel command line; `NAME=VALUE` words become environment variables of the guest
    /// script.
    pub append: String,
    /// Connect a pipe to the guest console so the test can send lines (`Guest::send_line`).
    pub stdin: bool,
    /// Kill QEMU after this long (hang guard).
    pub timeout: Duration,
    /// Label used in messages and console echo.
    pub label: String,
    /// Reconnect every disk's chardev this many ms after the backend goes away (QEMU
    /// `reconnect-ms`); `None`: a lost backend is lost for good.
    pub reconnect_ms: Option<u32>,
    /// Guest memory, a QEMU size; `None`: run-guest.sh's default.
    pub mem: Option<String>,
    /// Serve QMP on this unix socket ([`Qmp`]).
    pub qmp: Option<PathBuf>,
    /// Start as the destination of a live migration listening on this URI (`-incoming`).
    pub incoming: Option<String>,
}

impl GuestConfig {
    pub fn new(label: &str, initrd: &Path, disks: Vec<Disk>) -> Self {
        GuestConfig {
            initrd: initrd.to_path_buf(),
            disks,
            smp: 1,
            append: String::new(),
            stdin: false,
            timeout: HANG_GUARD,
            label: label.to_string(),
            reconnect_ms: None,
            mem: None,
            qmp: None,
            incoming: None,
        }
    }
}

/// What a finished guest left behind.
#[derive(Debug)]
pub struct GuestOutput {
    /// run-guest.sh's exit status: the guest script's status, 124 timeout, 125 died early.
    pub status: Option<i32>,
    /// The whole serial console.
    pub console: String,
}

impl GuestOutput {
    /// Console lines with the given prefix, prefix stripped and trimmed.
    pub fn values(&self, prefix: &str) -> Vec<String> {
        self.console
            .lines()
            .filter_map(|l| l.trim_end_matches('\r').strip_prefix(prefix))
            .map(|v| v.trim().to_string())
            .collect()
    }

    /// The single console line with this prefix, or a panic naming the guest.
    pub fn value(&self, label: &str, prefix: &str) -> String {
        let v = self.values(prefix);
        match v.as_slice() {
            [one] => one.clone(),
            _ => panic!(
                "{label}: expected exactly one console line starting with {prefix:?}, found {}\n--- console ---\n{}",
                v.len(),
                self.console
            ),
        }
    }

    /// Panics, showing the console, unless the guest script exited 0 and no guest step failed.
    pub fn assert_ok(&self, label: &str) {
        let errors = self.values("SNAPMV-GUEST-ERROR");
        assert!(
            self.status == Some(0) && errors.is_empty(),
            "{label}: guest failed (run-guest.sh status {:?}, guest errors {:?})\n--- console ---\n{}",
            self.status,
            errors,
            self.console
        );
    }
}

impl GuestTools {
    /// Builds an initramfs running `script` (busybox sh) into `dir/name.cpio.gz`.
    pub fn initramfs(&self, dir: &Path, name: &str, script: &str) -> PathBuf {
        let script_path = dir.join(format!("{name}.sh"));
        std::fs::write(&script_path, script)
            .unwrap_or_else(|e| panic!("write guest script {}: {e}", script_path.display()));
        let out = dir.join(format!("{name}.cpio.gz"));
        let status = Command::new(self.qemu_dir.join("mkinitramfs.sh"))
            .arg(&out)
            .arg(&script_path)
            .status()
            .unwrap_or_else(|e| panic!("run qemu/mkinitramfs.sh for {name}: {e}"));
        assert!(
            status.success(),
            "qemu/mkinitramfs.sh for {name} failed: {status}"
        );
        out
    }

    /// Boots a guest in the background.
    pub fn spawn(&self, cfg: &GuestConfig) -> Guest {
        let mut cmd = Command::new(self.qemu_dir.join("run-guest.sh"));
        cmd.arg("--initrd")
            .arg(&cfg.initrd)
            .arg("--smp")
            .arg(cfg.smp.to_string())
            .arg("--timeout")
            .arg(cfg.timeout.as_secs().max(1).to_string())
            .arg("--append")
            .arg(&cfg.append);
        for d in &cfg.disks {
            let reconnect = cfg
                .reconnect_ms
                .map(|ms| format!(",reconnect-ms={ms}"))
                .unwrap_or_default();
            cmd.arg("--disk").arg(format!(
                "{},queues={}{reconnect}",
                d.socket.display(),
                d.queues
            ));
        }
        if let Some(m) = &cfg.mem {
            cmd.arg("--mem").arg(m);
        }
        if let Some(q) = &cfg.qmp {
            cmd.arg("--qmp").arg(q);
        }
        if let Some(uri) = &cfg.incoming {
            cmd.arg("--incoming").arg(uri);
        }
        if cfg.stdin {
            cmd.arg("--stdin").stdin(Stdio::piped());
        } else {
            cmd.stdin(Stdio::null());
        }
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        // Own process group, so that a failing test can kill run-guest.sh, timeout and QEMU
        // together (run-guest.sh runs `timeout --foreground`, which stays in our group).
        cmd.process_group(0);
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("{}: cannot start qemu/run-guest.sh: {e}", cfg.label));
        let console = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel();
        let mut readers = Vec::new();
        let pipes: [Box<dyn std::io::Read + Send>; 2] = [
            Box::new(child.stdout.take().expect("stdout was piped")),
            Box::new(child.stderr.take().expect("stderr was piped")),
        ];
        for pipe in pipes {
            let tx = tx.clone();
            let console = Arc::clone(&console);
            let label = cfg.label.clone();
            readers.push(thread::spawn(move || {
                for line in BufReader::new(pipe).split(b'\n') {
                    let Ok(line) = line else { break };
                    let line = String::from_utf8_lossy(&line)
                        .trim_end_matches('\r')
                        .to_string();
                    if std::env::var_os("SNAPMV_E2E_ECHO").is_some() {
                        eprintln!("[{label}] {line}");
                    }
                    if let Ok(mut c) = console.lock() {
                        c.push_str(&line);
                        c.push('\n');
                    }
                    if tx.send(line).is_err() {
                        // Nobody is waiting for lines any more; keep collecting the console.
                    }
                }
            }));
        }
        let stdin = child.stdin.take();
        Guest {
            label: cfg.label.clone(),
            child,
            stdin,
            lines: rx,
            console,
            readers,
        }
    }

    /// Boots a guest and waits for it to power off.
    pub fn run(&self, cfg: &GuestConfig) -> GuestOutput {
        self.spawn(cfg).finish()
    }
}

/// A running guest.
pub struct Guest {
    label: String,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    console: Arc<Mutex<String>>,
    readers: Vec<thread::JoinHandle<()>>,
}

impl Guest {
    /// Waits for the next console line for which `f` returns `Some`, and returns that value.
    /// Lines before it are consumed. Panics (with the console) if the guest ends first or the
    /// hang guard expires.
    pub fn wait_for<T>(&mut self, what: &str, mut f: impl FnMut(&str) -> Option<T>) -> T {
        let deadline = Instant::now() + HANG_GUARD;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    if let Some(v) = f(&line) {
                        return v;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    panic!(
                        "{}: hung waiting for {what}\n--- console ---\n{}",
                        self.label,
                        self.console()
                    )
                }
                Err(RecvTimeoutError::Disconnected) => panic!(
                    "{}: guest ended while waiting for {what}\n--- console ---\n{}",
                    self.label,
                    self.console()
                ),
            }
        }
    }

    /// Sends one line to the guest console (the config must have `stdin: true`).
    pub fn send_line(&mut self, line: &str) {
        let label = &self.label;
        let stdin = self
            .stdin
            .as_mut()
            .unwrap_or_else(|| panic!("{label}: guest was started without stdin"));
        stdin
            .write_all(format!("{line}\n").as_bytes())
            .and_then(|()| stdin.flush())
            .unwrap_or_else(|e| panic!("{label}: cannot write to the guest console: {e}"));
    }

    /// The console so far.
    pub fn console(&self) -> String {
        self.console.lock().map(|c| c.clone()).unwrap_or_default()
    }

    /// Waits for QEMU to exit (run-guest.sh enforces the timeout) and returns the console.
    pub fn finish(mut self) -> GuestOutput {
        drop(self.stdin.take());
        let status = self
            .child
            .wait()
            .unwrap_or_else(|e| panic!("{}: wait for run-guest.sh: {e}", self.label));
        for r in self.readers.drain(..) {
            if r.join().is_err() {
                panic!("{}: console reader thread panicked", self.label);
            }
        }
        GuestOutput {
            status: status.code(),
            console: self.console(),
        }
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        // Only reached without `finish` when a test is failing: do not leave QEMU behind.
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: kill(2) of the process group we created for run-guest.sh (its pid is the
            // group id); the child has not been reaped yet (try_wait returned None), so the
            // group id cannot have been reused.
            unsafe {
                libc::kill(-(self.child.id() as i32), libc::SIGKILL);
            }
            let _ = self.child.wait();
        }
    }
}

/// A QMP connection (QEMU's JSON management protocol) on a unix socket.
pub struct Qmp {
    what: String,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    /// Connects to the QMP socket `path` of the guest `what` (waiting, up to the hang guard,
    /// for QEMU to create it), reads the greeting and enters command mode.
    pub fn connect(what: &str, path: &Path) -> Qmp {
        let deadline = Instant::now() + HANG_GUARD;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) => {
                    assert!(
                        Instant::now() < deadline,
                        "{what}: QMP socket {} never answered: {e}",
                        path.display()
                    );
                    thread::sleep(Duration::from_millis(50));
                }
            }
        };
        let writer = stream
            .try_clone()
            .unwrap_or_else(|e| panic!("{what}: dup the QMP socket: {e}"));
        let mut q = Qmp {
            what: what.to_string(),
            reader: BufReader::new(stream),
            writer,
        };
        let greeting = q.next_message();
        assert!(
            greeting.get("QMP").is_some(),
            "{what}: unexpected QMP greeting {greeting}"
        );
        q.execute("qmp_capabilities", serde_json::json!({}));
        q
    }

    fn next_message(&mut self) -> serde_json::Value {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .unwrap_or_else(|e| panic!("{}: read from QMP: {e}", self.what));
        assert!(n > 0, "{}: QEMU closed its QMP socket", self.what);
        serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("{}: QMP sent non-JSON {line:?}: {e}", self.what))
    }

    /// Runs a command and returns its `return` value (events in between are skipped); panics
    /// on an `error` answer.
    pub fn execute(&mut self, command: &str, arguments: serde_json::Value) -> serde_json::Value {
        let msg = serde_json::json!({"execute": command, "arguments": arguments});
        writeln!(self.writer, "{msg}")
            .unwrap_or_else(|e| panic!("{}: send {command} on QMP: {e}", self.what));
        loop {
            let m = self.next_message();
            if let Some(r) = m.get("return") {
                return r.clone();
            }
            if let Some(e) = m.get("error") {
                panic!("{}: QMP {command} failed: {e}", self.what);
            }
        }
    }

    /// Asks QEMU to quit; a QEMU that already exited (its socket closed) is fine. Returns
    /// whether QEMU was still there to ask (it may exit before its answer is read).
    pub fn quit(&mut self) -> bool {
        let msg = serde_json::json!({"execute": "quit"});
        writeln!(self.writer, "{msg}")
            .and_then(|()| self.writer.flush())
            .is_ok()
    }

    /// Polls `query-migrate` until the migration is `completed` (returned) or fails (panic
    /// with QEMU's reason), up to the hang guard.
    pub fn wait_migration(&mut self) -> serde_json::Value {
        let deadline = Instant::now() + HANG_GUARD;
        loop {
            let st = self.execute("query-migrate", serde_json::json!({}));
            match st.get("status").and_then(serde_json::Value::as_str) {
                Some("completed") => return st,
                Some("failed") | Some("cancelled") => {
                    panic!("{}: migration did not complete: {st}", self.what)
                }
                _ => {}
            }
            assert!(
                Instant::now() < deadline,
                "{}: migration still running at the hang guard: {st}",
                self.what
            );
            thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Runs `snapmv --json --rpc-socket P ARGS…` on `daemon` and parses stdout as JSON.
pub fn cli_json(daemon: &Daemon, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let out = daemon.cli(&all);
    serde_json::from_str(out.trim())
        .unwrap_or_else(|e| panic!("snapmv {all:?} printed non-JSON {out:?}: {e}"))
}

/// `snapmv snapshot NAME` → the new tag.
pub fn snapshot_tag(daemon: &Daemon, name: &str) -> u64 {
    let v = cli_json(daemon, &["snapshot", name]);
    v.get("tag")
        .and_then(serde_json::Value::as_u64)
        .unwrap_or_else(|| panic!("snapmv --json snapshot {name} printed {v}, no numeric tag"))
}

/// Polls `snapmv --json status` until no origin exported as `name` reports a rollback in
/// progress (`stores[].origins[].rollback`). Panics at the hang guard.
pub fn wait_rollback_done(daemon: &Daemon, name: &str) {
    let deadline = Instant::now() + HANG_GUARD;
    loop {
        let st = cli_json(daemon, &["status"]);
        let origins: Vec<&serde_json::Value> = st["stores"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|s| s["origins"].as_array().into_iter().flatten())
            .filter(|o| {
                o["exported_as"]
                    .as_array()
                    .is_some_and(|a| a.iter().any(|e| e == name))
            })
            .collect();
        assert_eq!(
            origins.len(),
            1,
            "snapmv status shows {} origins exported as {name}: {st}",
            origins.len()
        );
        if origins[0]
            .get("rollback")
            .is_none_or(serde_json::Value::is_null)
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "rollback of {name} still running at the hang guard: {st}"
        );
        thread::sleep(Duration::from_millis(200));
    }
}

/// sha256 of `data` as lowercase hex, through the host's `sha256sum` (coreutils).
pub fn sha256_hex(data: &[u8]) -> String {
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run sha256sum");
    {
        let mut stdin = child.stdin.take().expect("sha256sum stdin was piped");
        let data = data.to_vec();
        // Write from a thread so a large input cannot deadlock against the output pipe.
        let writer = thread::spawn(move || stdin.write_all(&data));
        let out = child.wait_with_output().expect("wait for sha256sum");
        writer
            .join()
            .expect("sha256sum writer thread")
            .expect("write to sha256sum");
        assert!(out.status.success(), "sha256sum failed: {}", out.status);
        let text = String::from_utf8_lossy(&out.stdout);
        text.split_whitespace()
            .next()
            .map(str::to_string)
            .unwrap_or_else(|| panic!("sha256sum printed {text:?}"))
    }
}
