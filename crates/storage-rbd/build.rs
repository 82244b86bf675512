//! Links librbd and librados when they are there.
//!
//! The FFI in `src/ffi.rs` is compiled only with `cfg(snapmv_librbd)`, which this script sets
//! when the linker can find `librbd.so` and `librados.so` (Debian: `librbd-dev`,
//! `librados-dev`). Otherwise the crate still builds (so a workspace build on a machine without
//! Ceph's development packages does not break) and `RbdStorage::open` fails with
//! `RbdError::NotBuilt`; the crate's cluster tests then skip loudly, or fail under
//! `SNAPMV_RBD_TESTS=1`.
//!
//! - feature `librbd`: the libraries are required; a missing one fails the build.
//! - `SNAPMV_RBD=0`: never link them (build without RBD support even when they are there).

use std::path::{Path, PathBuf};

fn candidate_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Ok(lp) = std::env::var("LIBRARY_PATH") {
        dirs.extend(std::env::split_paths(&lp).filter(|p| !p.as_os_str().is_empty()));
    }
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    let env = std::env::var("CARGO_CFG_TARGET_ENV").unwrap_or_default();
    let multiarch = format!(
        "/usr/lib/{arch}-linux-{}",
        if env.is_empty() { "gnu" } else { &env }
    );
    for d in [
        multiarch.as_str(),
        "/usr/lib64",
        "/usr/lib",
        "/usr/local/lib64",
        "/usr/local/lib",
    ] {
        dirs.push(PathBuf::from(d));
    }
    dirs
}

fn find(dirs: &[PathBuf], file: &str) -> Option<PathBuf> {
    dirs.iter().map(|d| d.join(file)).find(|p| p.exists())
}

fn main() {
    println!("cargo:rustc-check-cfg=cfg(snapmv_librbd)");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=SNAPMV_RBD");
    println!("cargo:rerun-if-env-changed=LIBRARY_PATH");
    let required = std::env::var_os("CARGO_FEATURE_LIBRBD").is_some();
    let disabled = std::env::var("SNAPMV_RBD").as_deref() == Ok("0");
    if disabled && required {
        panic!("SNAPMV_RBD=0 contradicts the `librbd` feature of snapmv-storage-rbd");
    }
    if disabled {
        println!("cargo:warning=snapmv-storage-rbd: built without librbd (SNAPMV_RBD=0)");
        return;
    }
    let dirs = candidate_dirs();
    // Installing the packages later must rebuild this crate with RBD support: watch the
    // directories the libraries would appear in (not /usr/lib itself: too large to scan).
    for d in &dirs {
        if d.is_dir() && d != Path::new("/usr/lib") {
            println!("cargo:rerun-if-changed={}", d.display());
        }
    }
    let rbd = find(&dirs, "librbd.so");
    let rados = find(&dirs, "librados.so");
    match (rbd, rados) {
        (Some(_), Some(_)) => {
            println!("cargo:rustc-link-lib=dylib=rbd");
            println!("cargo:rustc-link-lib=dylib=rados");
            println!("cargo:rustc-cfg=snapmv_librbd");
        }
        (rbd, rados) => {
            let missing: Vec<&str> = [
                ("librbd.so (librbd-dev)", rbd),
                ("librados.so (librados-dev)", rados),
            ]
            .into_iter()
            .filter(|(_, p)| p.is_none())
            .map(|(n, _)| n)
            .collect();
            if required {
                panic!(
                    "snapmv-storage-rbd (feature `librbd`): {} not found in {:?}: \
                     apt-get install librbd-dev librados-dev",
                    missing.join(", "),
                    dirs
                );
            }
            println!(
                "cargo:warning=snapmv-storage-rbd: built WITHOUT RBD support: {} not found \
                 (apt-get install librbd-dev librados-dev)",
                missing.join(", ")
            );
        }
    }
}
