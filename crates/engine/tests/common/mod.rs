//! Shared by the engine's integration tests.
#![allow(dead_code)]

#[allow(unused_imports)]
pub use snapmv_engine::testing::{MemStorage, RecordingStorage};

pub fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
