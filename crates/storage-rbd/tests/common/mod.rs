//! The test cluster for this crate's tests: `ceph/cluster.sh start` in a directory of their
//! own (`SNAPMV_RBD_CEPH_DIR`, default `/tmp/snapmv-ceph-storage-rbd`), and throwaway images.
//!
//! When the Ceph packages are missing (`ceph/cluster.sh install` never ran) or this build has no
//! librbd, every cluster test prints a loud SKIPPED and passes, unless `SNAPMV_RBD_TESTS=1`:
//! then that is a failure.

#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;

/// A started test cluster.
#[derive(Debug)]
pub struct Cluster {
    pub dir: PathBuf,
    pub conf: PathBuf,
    pub pool: String,
}

/// The repository (found upwards: this module is also the `snapmv-tests` crate's).
pub fn repo_root() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    here.ancestors()
        .find(|d| d.join("ceph/cluster.sh").is_file())
        .unwrap_or(here)
        .to_path_buf()
}

fn required() -> bool {
    std::env::var("SNAPMV_RBD_TESTS").as_deref() == Ok("1")
}

fn on_path(tool: &str) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/bin".into(), "/usr/sbin".into()])
        .any(|d| d.join(tool).is_file())
}

fn skip_or_fail(test: &str, why: &str) -> Option<&'static Cluster> {
    let what = format!("{test}: {why}");
    if required() {
        panic!("{what} (SNAPMV_RBD_TESTS=1, so this is a failure, not a skip)");
    }
    // Straight to the process's stderr: libtest captures eprintln! of passing tests, and a
    // skip must be seen.
    let bar = "!".repeat(72);
    let _ = writeln!(std::io::stderr(), "\n{bar}\n!!! SKIPPED {what}\n{bar}\n");
    None
}

fn start() -> Result<Cluster, String> {
    let dir = std::env::var("SNAPMV_RBD_CEPH_DIR")
        .unwrap_or_else(|_| "/tmp/snapmv-ceph-storage-rbd".to_string());
    let out = Command::new(repo_root().join("ceph/cluster.sh"))
        .arg("start")
        .env("SNAPMV_CEPH_DIR", &dir)
        .output()
        .map_err(|e| format!("cannot run ceph/cluster.sh: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "SNAPMV_CEPH_DIR={dir} ceph/cluster.sh start failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let dir = PathBuf::from(dir);
    Ok(Cluster {
        conf: dir.join("ceph.conf"),
        dir,
        pool: std::env::var("SNAPMV_CEPH_POOL").unwrap_or_else(|_| "snapmv".into()),
    })
}

/// The running test cluster, started on first use; `None` after a loud SKIPPED when it cannot
/// be had and `SNAPMV_RBD_TESTS=1` is not set. A cluster that fails to start with its packages
/// installed is a failure.
pub fn cluster(test: &str) -> Option<&'static Cluster> {
    static CLUSTER: OnceLock<Result<Cluster, String>> = OnceLock::new();
    if !snapmv_storage_rbd::AVAILABLE {
        return skip_or_fail(
            test,
            "snapmv-storage-rbd was built without librbd (apt-get install librbd-dev \
             librados-dev, then rebuild)",
        );
    }
    let missing: Vec<&str> = ["ceph-mon", "ceph-mgr", "ceph-osd", "rbd", "ceph"]
        .into_iter()
        .filter(|t| !on_path(t))
        .collect();
    if !missing.is_empty() {
        return skip_or_fail(
            test,
            &format!(
                "no Ceph test cluster: missing {} (run ceph/cluster.sh install as root)",
                missing.join(", ")
            ),
        );
    }
    match CLUSTER.get_or_init(start) {
        Ok(c) => Some(c),
        Err(e) => panic!("{test}: {e}"),
    }
}

impl Cluster {
    /// Runs a Ceph CLI (`rbd`, `ceph`) as client.admin on this cluster; returns stdout.
    pub fn cli(&self, tool: &str, args: &[&str]) -> Result<String, String> {
        let out = Command::new(tool)
            .arg("--conf")
            .arg(&self.conf)
            .args(args)
            .output()
            .map_err(|e| format!("{tool}: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "{tool} {}: {}\n{}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Client addresses in the OSD blocklist.
    pub fn blocklist(&self) -> String {
        self.cli("ceph", &["osd", "blocklist", "ls"])
            .unwrap_or_else(|e| panic!("{e}"))
    }
}

/// An image created for one test, removed when dropped (best effort: an image whose dead
/// owner's watch has not timed out yet cannot be removed; it stays, harmless).
pub struct Image {
    pub cluster: &'static Cluster,
    pub name: String,
}

impl Image {
    /// Creates `POOL/<tag>-<pid>-<n>` of `size` (`rbd create --size`), with `extra` options.
    pub fn create(cluster: &'static Cluster, tag: &str, size: &str, extra: &[&str]) -> Image {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        );
        let spec = format!("{}/{name}", cluster.pool);
        let mut args = vec!["create", spec.as_str(), "--size", size];
        args.extend_from_slice(extra);
        cluster.cli("rbd", &args).unwrap_or_else(|e| panic!("{e}"));
        Image { cluster, name }
    }

    /// The locator snapmv would be given: as client.snapmv (`profile rbd` caps).
    pub fn locator(&self) -> String {
        format!(
            "rbd:{}/{}:id=snapmv:conf={}",
            self.cluster.pool,
            self.name,
            self.cluster.conf.display()
        )
    }

    /// `rbd:POOL/IMAGE`, the storage's name.
    pub fn spec(&self) -> String {
        format!("rbd:{}/{}", self.cluster.pool, self.name)
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let spec = format!("{}/{}", self.cluster.pool, self.name);
        if let Err(e) = self.cluster.cli("rbd", &["rm", "--no-progress", &spec]) {
            eprintln!("note: leaving image {spec}: {e}");
        }
    }
}

/// A deterministic pattern: byte `i` of the image written with `seed`.
pub fn pattern(seed: u8, offset: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| ((offset + i).wrapping_mul(31) as u8) ^ seed)
        .collect()
}

/// Runs this test binary's helper test `name` as a child process with `env`, stdout piped.
pub fn spawn_helper(name: &str, env: &[(&str, String)]) -> std::process::Child {
    let exe = std::env::current_exe().expect("current_exe");
    let mut cmd = Command::new(exe);
    cmd.args(["--exact", name, "--nocapture", "--test-threads=1"])
        .stdout(std::process::Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.spawn().expect("spawning the helper child")
}

/// A child process killed (SIGKILL) and reaped when dropped, so that a failing test does not
/// leave it running.
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
