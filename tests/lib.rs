pub mod blkio_client;
pub mod daemon;
pub mod qemu;
