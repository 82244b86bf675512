//! Limits of the metadata that the format enforces.

/// Longest memo, in bytes of UTF-8.
pub const MAX_MEMO: usize = 256;
/// Longest origin id, in bytes.
pub const MAX_ORIGIN_ID: usize = 1024;
