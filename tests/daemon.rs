//! A `snapmv serve` daemon for tests that talk to it through its RPC socket and the CLI.
//!
//! The binary is `SNAPMV_BIN` if set, else `target/<profile>/snapmv` next to the test binary,
//! built once per test process with `cargo build -p snapmv` (a no-op when up to date), so
//! `cargo test -p snapmv-tests` never runs a stale daemon.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;
use snapmv_rpc::{RpcClient, RpcError};

/// Longest wait for the daemon to come up or go down (a hang guard, not a timing assertion).
pub const START_TIMEOUT: Duration = Duration::from_secs(120);

fn build_snapmv(target_dir: &Path, release: bool) -> Result<(), String> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
    let mut cmd = Command::new(cargo);
    cmd.arg("build")
        .arg("-p")
        .arg("snapmv")
        .arg("--manifest-path")
        .arg(&manifest)
        .arg("--target-dir")
        .arg(target_dir);
    if release {
        cmd.arg("--release");
    }
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run cargo build -p snapmv: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "cargo build -p snapmv failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// The `snapmv` binary (see the module documentation).
pub fn snapmv_bin() -> PathBuf {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("SNAPMV_BIN") {
            return Ok(PathBuf::from(p));
        }
        let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
        // target/<profile>/deps/<test>-<hash>
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .ok_or_else(|| format!("cannot derive the target dir from {}", exe.display()))?;
        let target_dir = profile_dir
            .parent()
            .ok_or_else(|| format!("cannot derive the target dir from {}", exe.display()))?;
        build_snapmv(target_dir, profile_dir.ends_with("release"))?;
        let bin = profile_dir.join("snapmv");
        if bin.is_file() {
            Ok(bin)
        } else {
            Err(format!(
                "snapmv binary not found at {} after cargo build; set SNAPMV_BIN",
                bin.display()
            ))
        }
    })
    .clone()
    .unwrap_or_else(|e| panic!("{e}"))
}

/// A running `snapmv serve` in a directory; SIGKILLed when dropped.
pub struct Daemon {
    /// The binary.
    pub bin: PathBuf,
    /// The directory holding sockets, state and log.
    pub dir: PathBuf,
    /// Management socket.
    pub rpc_socket: PathBuf,
    /// State directory.
    pub state_dir: PathBuf,
    /// Export socket directory.
    pub socket_dir: PathBuf,
    extra: Vec<String>,
    child: Option<Child>,
}

impl Daemon {
    /// Starts a daemon with everything under `dir` (`rpc.sock`, `state/`, `sockets/`,
    /// `daemon.log`); waits until its RPC socket answers.
    pub fn start(dir: &Path) -> Daemon {
        Self::start_with(dir, &[])
    }

    /// [`Daemon::start`] with extra `serve` arguments.
    pub fn start_with(dir: &Path, extra: &[&str]) -> Daemon {
        let mut d = Daemon {
            extra: extra.iter().map(|s| s.to_string()).collect(),
            bin: snapmv_bin(),
            dir: dir.to_path_buf(),
            rpc_socket: dir.join("rpc.sock"),
            state_dir: dir.join("state"),
            socket_dir: dir.join("sockets"),
            child: None,
        };
        d.spawn();
        d
    }

    /// The command line `snapmv serve` gets.
    pub fn serve_command(&self) -> Command {
        let mut c = Command::new(&self.bin);
        c.arg("--rpc-socket")
            .arg(&self.rpc_socket)
            .arg("serve")
            .arg("--state-dir")
            .arg(&self.state_dir)
            .arg("--socket-dir")
            .arg(&self.socket_dir)
            .args(&self.extra)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null());
        c
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("daemon.log"))
            .unwrap_or_else(|e| panic!("create {}/daemon.log: {e}", self.dir.display()));
        let log2 = log.try_clone().expect("dup the daemon log fd");
        let mut child = self
            .serve_command()
            .stdout(log)
            .stderr(log2)
            .spawn()
            .unwrap_or_else(|e| panic!("start {} serve: {e}", self.bin.display()));
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(Some(st)) = child.try_wait() {
                panic!(
                    "snapmv serve exited ({st}) before serving {}; log:\n{}",
                    self.rpc_socket.display(),
                    self.log()
                );
            }
            if RpcClient::connect(&self.rpc_socket).is_ok() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "snapmv serve did not answer on {} (hang guard); log:\n{}",
                self.rpc_socket.display(),
                self.log()
            );
            thread::sleep(Duration::from_millis(20));
        }
        self.child = Some(child);
    }

    /// SIGKILLs the daemon and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends SIGTERM and waits for the daemon to exit; returns its exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("the daemon is not running");
        let pid = libc::pid_t::try_from(c.id()).expect("pid fits pid_t");
        // SAFETY: kill(2) with a valid signal number on our own, not yet reaped, child.
        let rc = unsafe { libc::kill(pid, libc::SIGTERM) };
        assert_eq!(rc, 0, "kill(SIGTERM): {}", std::io::Error::last_os_error());
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(st) = c.try_wait().expect("wait for the daemon") {
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "snapmv serve ignored SIGTERM (hang guard); log:\n{}",
                self.log()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends `sig` (e.g. SIGSTOP, SIGCONT) to the running daemon.
    pub fn signal(&self, sig: libc::c_int) {
        let c = self.child.as_ref().expect("the daemon is not running");
        let pid = libc::pid_t::try_from(c.id()).expect("pid fits pid_t");
        // SAFETY: kill(2) with a valid signal number on our own, not yet reaped, child.
        let rc = unsafe { libc::kill(pid, sig) };
        assert_eq!(rc, 0, "kill({sig}): {}", std::io::Error::last_os_error());
    }

    /// Starts the daemon again on the same directory (after [`Daemon::kill`]).
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// Whether the daemon process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// A new RPC connection.
    pub fn client(&self) -> RpcClient {
        RpcClient::connect(&self.rpc_socket)
            .unwrap_or_else(|e| panic!("connect to the daemon: {e}; log:\n{}", self.log()))
    }

    /// One call on a fresh connection.
    pub fn call(&self, method: &str, params: Value) -> Result<Value, RpcError> {
        self.client().call_raw(method, params)
    }

    /// One call that must succeed.
    pub fn ok(&self, method: &str, params: Value) -> Value {
        self.call(method, params.clone())
            .unwrap_or_else(|e| panic!("{method} {params} failed: {e}; log:\n{}", self.log()))
    }

    /// One call that must fail with `code`; returns the message.
    pub fn err(&self, method: &str, params: Value, code: i64) -> String {
        match self.call(method, params.clone()) {
            Ok(v) => panic!("{method} {params} succeeded with {v}; expected error {code}"),
            Err(RpcError::Remote(e)) => {
                assert_eq!(
                    e.code, code,
                    "{method} {params}: expected code {code}, got {} ({})",
                    e.code, e.message
                );
                e.message
            }
            Err(e) => panic!("{method} {params}: expected error {code}, got {e}"),
        }
    }

    /// Runs `snapmv --rpc-socket P ARGS…`.
    pub fn cli_output(&self, args: &[&str]) -> Output {
        Command::new(&self.bin)
            .arg("--rpc-socket")
            .arg(&self.rpc_socket)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("run snapmv {args:?}: {e}"))
    }

    /// Runs the CLI, which must succeed; returns stdout.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = self.cli_output(args);
        assert!(
            out.status.success(),
            "snapmv {args:?} failed ({}):\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs the CLI, which must fail; returns stderr.
    pub fn cli_fail(&self, args: &[&str]) -> String {
        let out = self.cli_output(args);
        assert!(
            !out.status.success(),
            "snapmv {args:?} succeeded:\nstdout: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    /// The export socket `NAME.sock`.
    pub fn export_socket(&self, name: &str) -> PathBuf {
        self.socket_dir.join(format!("{name}.sock"))
    }

    /// The daemon's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A sparse file of `len` bytes.
pub fn sparse_file(path: &Path, len: u64) {
    let f =
        std::fs::File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    f.set_len(len)
        .unwrap_or_else(|e| panic!("size {}: {e}", path.display()));
}

/// A scratch directory under /tmp (socket paths must stay short).
pub fn scratch(name: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("snapmv-{name}-"))
        .tempdir_in("/tmp")
        .expect("create a scratch dir in /tmp")
}
