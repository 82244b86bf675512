//! Fitting into systemd: contrib/systemd/snapmv.service passes `systemd-analyze verify` (with
//! ExecStart pointing at the built binary), and `snapmv serve` sends `READY=1` on
//! `NOTIFY_SOCKET` only once every recorded export is back, `STOPPING=1` when stopped.

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use snapmv_tests::blkio_client::Client;
use snapmv_tests::daemon::{scratch, snapmv_bin, sparse_file, Daemon};

const MIB: u64 = 1 << 20;

fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && v != "false")
}

fn systemd_analyze() -> Option<&'static str> {
    let ok = Command::new("systemd-analyze")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        return Some("systemd-analyze");
    }
    assert!(
        !ci(),
        "systemd-analyze is missing (package systemd) and CI is set: the unit cannot be verified"
    );
    eprintln!("SKIPPED: systemd-analyze is missing (apt-get install systemd); unit not verified");
    None
}

/// The unit with its ExecStart binary replaced by `bin`, written into `dir`.
fn unit_copy(dir: &Path, bin: &str) -> std::path::PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../contrib/systemd/snapmv.service");
    let text =
        std::fs::read_to_string(&src).unwrap_or_else(|e| panic!("read {}: {e}", src.display()));
    assert!(
        text.contains("ExecStart=/usr/local/bin/snapmv serve"),
        "{} no longer starts /usr/local/bin/snapmv serve",
        src.display()
    );
    let dst = dir.join("snapmv.service");
    std::fs::write(&dst, text.replace("/usr/local/bin/snapmv", bin)).unwrap();
    dst
}

fn verify(analyze: &str, unit: &Path) -> (bool, String) {
    let out = Command::new(analyze)
        .args(["verify", "--man=no"])
        .arg(unit)
        .output()
        .expect("run systemd-analyze verify");
    let msg = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success() && msg.trim().is_empty(), msg)
}

#[test]
fn systemd_unit_passes_systemd_analyze_verify() {
    let Some(analyze) = systemd_analyze() else {
        return;
    };
    let dir = scratch("unit");
    let bin = snapmv_bin();
    let bin = std::fs::canonicalize(&bin).unwrap_or(bin);
    let unit = unit_copy(dir.path(), bin.to_str().expect("UTF-8 binary path"));
    let (ok, msg) = verify(analyze, &unit);
    assert!(ok, "systemd-analyze verify {}:\n{msg}", unit.display());
    // The check has teeth: a unit whose binary is missing fails it.
    let bad_dir = dir.path().join("bad");
    std::fs::create_dir(&bad_dir).unwrap();
    let bad = unit_copy(&bad_dir, "/nonexistent/snapmv");
    let (ok, msg) = verify(analyze, &bad);
    assert!(!ok, "a unit with a missing binary verified:\n{msg}");
    assert!(msg.contains("/nonexistent/snapmv"), "{msg}");
    // What the unit promises: Type=notify, its directories, the hypervisor's group.
    let text = std::fs::read_to_string(&unit).unwrap();
    for line in [
        "Type=notify",
        "RuntimeDirectory=snapmv",
        "StateDirectory=snapmv",
        "--socket-group kvm",
    ] {
        assert!(text.contains(line), "the unit lacks {line}");
    }
}

/// Waits up to `limit` (a hang guard) for one datagram.
fn recv(sock: &UnixDatagram, limit: Duration) -> Option<String> {
    sock.set_read_timeout(Some(limit)).unwrap();
    let mut buf = [0u8; 4096];
    let n = sock.recv(&mut buf).ok()?;
    Some(String::from_utf8_lossy(&buf[..n]).into_owned())
}

#[test]
fn ready_is_sent_once_the_exports_are_back_and_stopping_at_shutdown() {
    let dir = scratch("notify");
    let o = dir.path().join("o.img").display().to_string();
    let c = dir.path().join("c.img").display().to_string();
    sparse_file(Path::new(&o), 4 * MIB);
    sparse_file(Path::new(&c), 16 * MIB);
    let mut d = Daemon::start(dir.path());
    d.cli(&["create", "vol", &o, &c, "-b", "-f"]);
    d.cli(&["snapshot", "vol"]);
    d.cli(&["create", "snap", &o, &c, "1"]);
    assert!(d.terminate().success());
    for name in ["vol", "snap"] {
        assert!(
            !d.export_socket(name).exists(),
            "socket of {name} left after a clean stop"
        );
    }

    // Start it again as systemd would, with NOTIFY_SOCKET.
    let notify_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    let log = std::fs::File::create(dir.path().join("notify-daemon.log")).unwrap();
    let mut child = d
        .serve_command()
        .env("NOTIFY_SOCKET", &notify_path)
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let msg = recv(&notify, Duration::from_secs(120)).unwrap_or_else(|| {
        let _ = child.kill();
        panic!(
            "no notification from snapmv serve (hang guard); log:\n{}",
            std::fs::read_to_string(dir.path().join("notify-daemon.log")).unwrap_or_default()
        )
    });
    let lines: Vec<&str> = msg.lines().collect();
    assert!(lines.contains(&"READY=1"), "first notification: {msg:?}");
    assert!(lines.contains(&"STATUS=serving 2 exports"), "{msg:?}");
    // READY=1 came after the exports are back: both answer at once.
    for name in ["vol", "snap"] {
        let cl = Client::connect(&d.export_socket(name))
            .unwrap_or_else(|e| panic!("export {name} not served at READY=1: {e}"));
        assert_eq!(cl.capacity(), 4 * MIB);
    }
    let st = d.ok("export_list", serde_json::json!({}));
    assert_eq!(st["exports"].as_array().unwrap().len(), 2, "{st}");

    let pid = libc::pid_t::try_from(child.id()).unwrap();
    // SAFETY: kill(2) with a valid signal on our own child, not yet reaped.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let msg = recv(&notify, Duration::from_secs(120));
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "snapmv serve ignored SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status}");
    let msg = msg.expect("no notification at shutdown");
    assert!(msg.lines().any(|l| l == "STOPPING=1"), "{msg:?}");
}
