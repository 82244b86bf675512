//! The few librados and librbd calls this crate makes, declared by hand from the headers of
//! Debian 12's `librados-dev`/`librbd-dev` 16.2.15 (`rados/librados.h`, `rbd/librbd.h`). The
//! signatures below are stable C API (present since Ceph 12 or earlier); nothing is generated.
//!
//! Every function returns a negative errno on failure unless said otherwise.

#![allow(non_camel_case_types)]

use libc::{c_char, c_int, c_void, iovec, size_t, ssize_t};

pub type rados_t = *mut c_void;
pub type rados_ioctx_t = *mut c_void;
pub type rbd_image_t = *mut c_void;
pub type rbd_completion_t = *mut c_void;
pub type rbd_callback_t = Option<unsafe extern "C" fn(rbd_completion_t, *mut c_void)>;

/// `rbd_lock_mode_t`.
pub type rbd_lock_mode_t = c_int;
pub const RBD_LOCK_MODE_EXCLUSIVE: rbd_lock_mode_t = 0;
/// `RBD_FEATURE_EXCLUSIVE_LOCK` of `rbd/features.h`.
pub const RBD_FEATURE_EXCLUSIVE_LOCK: u64 = 1 << 2;

/// `rbd_config_option_t` (`source` is the C enum `rbd_config_source_t`, an int).
#[repr(C)]
pub struct rbd_config_option_t {
    pub name: *mut c_char,
    pub value: *mut c_char,
    pub source: c_int,
}

extern "C" {
    pub fn rados_create(cluster: *mut rados_t, id: *const c_char) -> c_int;
    pub fn rados_conf_read_file(cluster: rados_t, path: *const c_char) -> c_int;
    pub fn rados_conf_parse_env(cluster: rados_t, var: *const c_char) -> c_int;
    pub fn rados_conf_set(cluster: rados_t, option: *const c_char, value: *const c_char) -> c_int;
    pub fn rados_connect(cluster: rados_t) -> c_int;
    pub fn rados_shutdown(cluster: rados_t);
    pub fn rados_ioctx_create(
        cluster: rados_t,
        pool_name: *const c_char,
        ioctx: *mut rados_ioctx_t,
    ) -> c_int;
    pub fn rados_ioctx_set_namespace(io: rados_ioctx_t, nspace: *const c_char);
    pub fn rados_ioctx_destroy(io: rados_ioctx_t);
    /// Our client instance's address(es), as the OSDs and the lock see it; free with
    /// `rados_buffer_free`.
    pub fn rados_getaddrs(cluster: rados_t, addrs: *mut *mut c_char) -> c_int;
    pub fn rados_buffer_free(buf: *mut c_char);
    /// Writes the cluster's fsid (no NUL guaranteed); returns its length, `-ERANGE` if short.
    pub fn rados_cluster_fsid(cluster: rados_t, buf: *mut c_char, len: size_t) -> c_int;
    /// The pool's id (never fails on a valid ioctx).
    pub fn rados_ioctx_get_id(io: rados_ioctx_t) -> i64;

    pub fn rbd_open(
        io: rados_ioctx_t,
        name: *const c_char,
        image: *mut rbd_image_t,
        snap_name: *const c_char,
    ) -> c_int;
    /// As `rbd_open`, read-only: no exclusive lock is taken or waited for.
    pub fn rbd_open_read_only(
        io: rados_ioctx_t,
        name: *const c_char,
        image: *mut rbd_image_t,
        snap_name: *const c_char,
    ) -> c_int;
    pub fn rbd_close(image: rbd_image_t) -> c_int;
    pub fn rbd_get_size(image: rbd_image_t, size: *mut u64) -> c_int;
    pub fn rbd_get_features(image: rbd_image_t, features: *mut u64) -> c_int;
    /// `-ERANGE` if `id_len` is too small.
    pub fn rbd_get_id(image: rbd_image_t, id: *mut c_char, id_len: size_t) -> c_int;
    /// Returns the number of bytes read.
    pub fn rbd_read2(
        image: rbd_image_t,
        ofs: u64,
        len: size_t,
        buf: *mut c_char,
        op_flags: c_int,
    ) -> ssize_t;
    /// Returns the number of bytes written.
    pub fn rbd_write2(
        image: rbd_image_t,
        ofs: u64,
        len: size_t,
        buf: *const c_char,
        op_flags: c_int,
    ) -> ssize_t;
    pub fn rbd_flush(image: rbd_image_t) -> c_int;

    pub fn rbd_aio_create_completion(
        cb_arg: *mut c_void,
        complete_cb: rbd_callback_t,
        c: *mut rbd_completion_t,
    ) -> c_int;
    pub fn rbd_aio_readv(
        image: rbd_image_t,
        iov: *const iovec,
        iovcnt: c_int,
        off: u64,
        c: rbd_completion_t,
    ) -> c_int;
    pub fn rbd_aio_writev(
        image: rbd_image_t,
        iov: *const iovec,
        iovcnt: c_int,
        off: u64,
        c: rbd_completion_t,
    ) -> c_int;
    pub fn rbd_aio_wait_for_complete(c: rbd_completion_t) -> c_int;
    pub fn rbd_aio_get_return_value(c: rbd_completion_t) -> ssize_t;
    pub fn rbd_aio_release(c: rbd_completion_t);

    pub fn rbd_is_exclusive_lock_owner(image: rbd_image_t, is_owner: *mut c_int) -> c_int;
    pub fn rbd_lock_acquire(image: rbd_image_t, lock_mode: rbd_lock_mode_t) -> c_int;
    pub fn rbd_lock_release(image: rbd_image_t) -> c_int;
    /// `lock_owners` has room for `*max_lock_owners` strings; `-ERANGE` (with the needed count
    /// in `*max_lock_owners`) if too few. Free the strings with `rbd_lock_get_owners_cleanup`.
    pub fn rbd_lock_get_owners(
        image: rbd_image_t,
        lock_mode: *mut rbd_lock_mode_t,
        lock_owners: *mut *mut c_char,
        max_lock_owners: *mut size_t,
    ) -> c_int;
    pub fn rbd_lock_get_owners_cleanup(lock_owners: *mut *mut c_char, lock_owner_count: size_t);
    /// Blocklists the owner first when `rbd_blocklist_on_break_lock` is true (the default, and
    /// what this crate sets).
    pub fn rbd_lock_break(
        image: rbd_image_t,
        lock_mode: rbd_lock_mode_t,
        lock_owner: *const c_char,
    ) -> c_int;

    /// The image's effective librbd configuration, with where each value comes from;
    /// `-ERANGE` (with the needed count in `*max_options`) if too few slots.
    pub fn rbd_config_image_list(
        image: rbd_image_t,
        options: *mut rbd_config_option_t,
        max_options: *mut c_int,
    ) -> c_int;
    pub fn rbd_config_image_list_cleanup(options: *mut rbd_config_option_t, max_options: c_int);
}
