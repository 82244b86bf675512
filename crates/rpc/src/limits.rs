//! Defaults and limits of method parameters, in one place: the daemon checks against them, the
//! CLI parses with them, and `docs/rpc.md` quotes them.

/// Virtqueues offered to the guest when `num_queues` is absent.
pub const DEFAULT_NUM_QUEUES: u16 = 4;
/// Most virtqueues an export offers.
pub const MAX_NUM_QUEUES: u16 = 64;
/// Largest virtqueue size offered when `queue_size` is absent.
pub const DEFAULT_QUEUE_SIZE: u16 = 1024;
/// Largest `queue_size` (a power of two; the virtio maximum).
pub const MAX_QUEUE_SIZE: u16 = 32768;
/// The page `chunk_size` counts in, in bytes.
pub const PAGE_SIZE: u32 = 4096;
/// `chunk_size` in pages when formatting without one.
pub const DEFAULT_CHUNK_PAGES: u32 = 1;
/// Largest `chunk_size` in pages (a power of two): 1 MiB chunks.
pub const MAX_CHUNK_PAGES: u32 = 256;

/// Whether `n` is a valid `num_queues`: 1 to [`MAX_NUM_QUEUES`].
pub fn num_queues_ok(n: u16) -> bool {
    (1..=MAX_NUM_QUEUES).contains(&n)
}

/// Whether `n` is a valid `queue_size`: a power of two up to [`MAX_QUEUE_SIZE`].
pub fn queue_size_ok(n: u16) -> bool {
    n.is_power_of_two() && n <= MAX_QUEUE_SIZE
}

/// Whether `pages` is a valid `chunk_size`: a power of two from 1 to [`MAX_CHUNK_PAGES`].
pub fn chunk_pages_ok(pages: u32) -> bool {
    pages.is_power_of_two() && pages <= MAX_CHUNK_PAGES
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds() {
        assert!(num_queues_ok(1) && num_queues_ok(MAX_NUM_QUEUES));
        assert!(!num_queues_ok(0) && !num_queues_ok(MAX_NUM_QUEUES + 1));
        assert!(queue_size_ok(1) && queue_size_ok(MAX_QUEUE_SIZE));
        assert!(!queue_size_ok(0) && !queue_size_ok(3) && !queue_size_ok(u16::MAX));
        assert!(chunk_pages_ok(1) && chunk_pages_ok(MAX_CHUNK_PAGES));
        assert!(!chunk_pages_ok(0) && !chunk_pages_ok(3) && !chunk_pages_ok(512));
        assert!(num_queues_ok(DEFAULT_NUM_QUEUES) && queue_size_ok(DEFAULT_QUEUE_SIZE));
        assert!(chunk_pages_ok(DEFAULT_CHUNK_PAGES));
    }

    /// docs/rpc.md and the parameter docs quote these values.
    #[test]
    fn the_docs_quote_the_limits() {
        let squash = |s: &str| s.split_whitespace().collect::<Vec<_>>().join(" ");
        let rpc_md = squash(include_str!("../../../docs/rpc.md"));
        for want in [
            format!("`num_queues`: 1 to {MAX_NUM_QUEUES}, default {DEFAULT_NUM_QUEUES}."),
            format!("`queue_size`: a power of two up to {MAX_QUEUE_SIZE}, default {DEFAULT_QUEUE_SIZE}."),
            format!("a power of two from 1 to {MAX_CHUNK_PAGES} (4 KiB to 1 MiB). Default {DEFAULT_CHUNK_PAGES}."),
            format!("| `num_queues` | integer | {DEFAULT_NUM_QUEUES} |"),
            format!("| `queue_size` | integer | {DEFAULT_QUEUE_SIZE} |"),
            format!("| `chunk_size` | integer | {DEFAULT_CHUNK_PAGES} |"),
        ] {
            assert!(rpc_md.contains(&want), "docs/rpc.md does not say {want:?}");
        }
        let methods = squash(include_str!("methods.rs"));
        for want in [
            format!("1 to {MAX_NUM_QUEUES}, default {DEFAULT_NUM_QUEUES}"),
            format!("a power of two up to {MAX_QUEUE_SIZE}, default {DEFAULT_QUEUE_SIZE}"),
            format!("a power of two from 1 to {MAX_CHUNK_PAGES}, default {DEFAULT_CHUNK_PAGES}"),
        ] {
            assert!(methods.contains(&want), "methods.rs does not say {want:?}");
        }
        assert_eq!(PAGE_SIZE, 4096, "the docs say 4 KiB pages");
    }
}
