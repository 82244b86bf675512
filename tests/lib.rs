
pub mod qemu;
