pub mod blkio_client;
pub mod qemu;
