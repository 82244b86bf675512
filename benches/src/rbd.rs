//! Scenario `rbd` (issue 18): snapmv with its origin and store on Ceph RBD images beside
//! snapmv with them on local files, same daemon, same data, A/B interleaved: origin I/O
//! without a snapshot, and first writes after a snapshot. The ratio is RBD / local file.
//!
//! The cluster is the one `--ceph-conf` (default `$CEPH_CONF`) points at, as client.admin
//! unless `--ceph-id`; on this machine `ceph/cluster.sh start` and `eval "$(ceph/cluster.sh
//! env)"` first. The images are created (`rbd create`, `rbd import`) in pool `--ceph-pool`
//! and removed at the end.

use std::path::{Path, PathBuf};

use crate::error::{BenchError, Result};
use crate::load::{Distinct, LoadResult, LoadSpec, Pattern};
use crate::report::Row;
use crate::scenarios::{fill_file, progress, run_on, sparse_file, Ctx};
use crate::servers::{run_cmd, Snapmv};

const K4: usize = 4096;

/// Where the RBD images go.
pub struct Ceph {
    /// The cluster's configuration file.
    pub conf: PathBuf,
    /// The pool.
    pub pool: String,
    /// The cephx user, if not admin.
    pub id: Option<String>,
}

/// An image made for this run, removed when dropped.
struct Image<'a> {
    ceph: &'a Ceph,
    name: String,
}

impl Image<'_> {
    fn spec(&self) -> String {
        format!("{}/{}", self.ceph.pool, self.name)
    }

    fn locator(&self) -> PathBuf {
        let id = self
            .ceph
            .id
            .as_ref()
            .map(|i| format!(":id={i}"))
            .unwrap_or_default();
        PathBuf::from(format!(
            "rbd:{}{id}:conf={}",
            self.spec(),
            self.ceph.conf.display()
        ))
    }
}

impl Drop for Image<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.ceph.rbd(&["rm", "--no-progress", &self.spec()]) {
            eprintln!("note: leaving image {}: {e}", self.spec());
        }
    }
}

impl Ceph {
    fn rbd(&self, args: &[&str]) -> Result<String> {
        let conf = self.conf.display().to_string();
        let mut all = vec!["--conf", conf.as_str()];
        if let Some(id) = &self.id {
            all.extend(["--id", id.as_str()]);
        }
        all.extend_from_slice(args);
        run_cmd("rbd", &all)
    }

    /// A sparse image of `size` bytes.
    fn create(&self, name: &str, size: u64) -> Result<Image<'_>> {
        let img = Image {
            ceph: self,
            name: format!("snapmv-bench-{}-{name}", std::process::id()),
        };
        self.rbd(&["create", &img.spec(), "--size", &format!("{}M", size >> 20)])?;
        Ok(img)
    }

    /// An image holding the contents of `file`.
    fn import(&self, name: &str, file: &Path) -> Result<Image<'_>> {
        let img = Image {
            ceph: self,
            name: format!("snapmv-bench-{}-{name}", std::process::id()),
        };
        let f = file.display().to_string();
        self.rbd(&["import", "--no-progress", &f, &img.spec()])?;
        Ok(img)
    }
}

/// A/B of one spec: RBD first on even repetitions, the local file first on odd ones.
fn ab(
    reps: usize,
    label: &str,
    mut rbd: impl FnMut() -> Result<LoadResult>,
    mut file: impl FnMut() -> Result<LoadResult>,
) -> Result<(Vec<LoadResult>, Vec<LoadResult>)> {
    let (mut va, mut vb) = (Vec::new(), Vec::new());
    eprintln!("  {label}");
    for rep in 0..reps {
        for rbd_turn in [rep % 2 == 0, rep % 2 == 1] {
            if rbd_turn {
                let r = rbd()?;
                progress(&format!("RBD  rep {rep}"), &r);
                va.push(r);
            } else {
                let r = file()?;
                progress(&format!("file rep {rep}"), &r);
                vb.push(r);
            }
        }
    }
    Ok((va, vb))
}

const PEER: &str = "snapmv, origin and store on local files";

/// Scenario `rbd`.
pub fn run(ctx: &mut Ctx, sm: &mut Snapmv, ceph: &Ceph) -> Result<()> {
    eprintln!(
        "scenario rbd: origin and store on RBD images ({}) against local files",
        ceph.conf.display()
    );
    if !ceph.conf.is_file() {
        return Err(BenchError::Invalid(format!(
            "scenario rbd: no Ceph configuration at {} (give --ceph-conf or set CEPH_CONF; \
             ceph/cluster.sh start makes a test cluster)",
            ceph.conf.display()
        )));
    }
    // A test cluster's OSD is a file on this machine's disk: keep the volume small.
    let size = ctx.small / 2;
    let origin = ctx.dir.join("rbd-origin.raw");
    let store = ctx.dir.join("rbd-store.cow");
    fill_file(&origin, size)?;
    sparse_file(&store, size * 3)?;
    let t = std::time::Instant::now();
    let origin_img = ceph.import("origin", &origin)?;
    eprintln!(
        "  imported the {} MiB origin into {} in {:.1} s",
        size >> 20,
        origin_img.spec(),
        t.elapsed().as_secs_f64()
    );
    let store_img = ceph.create("store", size * 3)?;
    let rbd_sock = sm.export_origin(
        "rbdvol",
        &origin_img.locator(),
        &store_img.locator(),
        true,
        false,
    )?;
    let file_sock = sm.export_origin("filevol", &origin, &store, true, false)?;
    let pid = sm.pid();
    for (pattern, qd) in [
        (Pattern::RandRead, 1),
        (Pattern::RandRead, 32),
        (Pattern::RandWrite, 1),
        (Pattern::RandWrite, 32),
    ] {
        let spec = LoadSpec::new(pattern, K4, qd, 1, ctx.dur, (0, size));
        let (a, b) = ab(
            ctx.reps,
            &format!("origin, no snapshot {}", spec.label()),
            || run_on(&rbd_sock, pid, &spec),
            || run_on(&file_sock, pid, &spec),
        )?;
        ctx.rows.push(Row::load(
            "rbd",
            &format!("{}, origin without snapshot, RBD vs file", spec.label()),
            &a,
            &b,
            PEER,
        ));
    }
    for qd in [1usize, 32] {
        let spec = LoadSpec::new(Pattern::RandWrite, K4, qd, 1, ctx.dur, (0, size));
        let first = |name: &str, sock: &Path, sm: &mut Snapmv| {
            sm.snapshot(name)?;
            let s = LoadSpec {
                distinct: Some(Distinct::new(0, size, K4 as u64, None)),
                ..spec.clone()
            };
            run_on(sock, pid, &s)
        };
        let (mut va, mut vb) = (Vec::new(), Vec::new());
        let label = format!("first write after a snapshot {}", spec.label());
        eprintln!("  {label}");
        for rep in 0..ctx.reps {
            for rbd_turn in [rep % 2 == 0, rep % 2 == 1] {
                if rbd_turn {
                    let r = first("rbdvol", &rbd_sock, sm)?;
                    progress(&format!("RBD  rep {rep}"), &r);
                    va.push(r);
                } else {
                    let r = first("filevol", &file_sock, sm)?;
                    progress(&format!("file rep {rep}"), &r);
                    vb.push(r);
                }
            }
        }
        ctx.rows.push(Row::load(
            "rbd",
            &format!(
                "{}, every write a first write after a snapshot, RBD vs file",
                spec.label()
            ),
            &va,
            &vb,
            PEER,
        ));
    }
    // Close the images before they are removed.
    sm.remove("rbdvol")?;
    sm.remove("filevol")?;
    drop((origin_img, store_img));
    Ok(())
}
