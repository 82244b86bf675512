pub mod blkio_client;
pub mod crash_model;
pub mod daemon;
pub mod qemu;
/// The Ceph test cluster and throwaway RBD images (shared with snapmv-storage-rbd's tests).
#[path = "../crates/storage-rbd/tests/common/mod.rs"]
pub mod rbd_cluster;

/// An integer from the environment (test knobs such as `SNAPMV_CRASH_ROUNDS`), or `default`.
pub fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
