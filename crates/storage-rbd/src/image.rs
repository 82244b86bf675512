//! [`RbdStorage`] through librbd.

use crate::ffi;
use crate::{image_boot_id, ImageIdentity, Locator, RbdError};
use libc::{c_char, c_int};
use snapmv_engine::{BootId, Storage};
use std::ffi::{CStr, CString};
use std::io::{self, IoSlice, IoSliceMut};
use std::ptr;

/// Largest single librbd call (librbd returns byte counts as `int` in places).
const MAX_IO: usize = 64 << 20;
/// Most iovecs given to one vectored call.
const MAX_IOV: usize = 1024;

/// The rados client, pool context and image of one open; closed in reverse order on drop, so
/// that a half-done open cleans up too.
struct Conn {
    cluster: ffi::rados_t,
    ioctx: ffi::rados_ioctx_t,
    image: ffi::rbd_image_t,
}

impl Drop for Conn {
    fn drop(&mut self) {
        // SAFETY: each handle is either null or was returned by its create/open call and is
        // released here exactly once, image before ioctx before cluster, as librbd requires.
        // Closing the image releases the exclusive lock if we still own it.
        unsafe {
            if !self.image.is_null() {
                let r = ffi::rbd_close(self.image);
                if r < 0 {
                    log::warn!("rbd_close: {}", io::Error::from_raw_os_error(-r));
                }
            }
            if !self.ioctx.is_null() {
                ffi::rados_ioctx_destroy(self.ioctx);
            }
            if !self.cluster.is_null() {
                ffi::rados_shutdown(self.cluster);
            }
        }
    }
}

/// An RBD image, owned through its exclusive lock, as engine storage.
///
/// Each open is its own rados client instance (its own address, hence its own blocklist
/// entry when fenced). The handle is thread-safe: librbd serialises what it must inside.
pub struct RbdStorage {
    conn: Conn,
    /// `rbd:POOL[/NAMESPACE]/IMAGE`, without options (a `key=` may be a secret).
    name: String,
    image_id: String,
    boot: BootId,
    client_addr: String,
    broken: Vec<String>,
}

// SAFETY: the raw handles are only used through librbd/librados calls, which are thread-safe
// on one image (librbd's ImageCtx takes its own locks; QEMU and rbd-nbd issue I/O on one image
// from several threads); nothing in `RbdStorage` is tied to the opening thread.
unsafe impl Send for RbdStorage {}
// SAFETY: as for Send: every method takes `&self` and only calls thread-safe librbd functions.
unsafe impl Sync for RbdStorage {}

impl std::fmt::Debug for RbdStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RbdStorage")
            .field("name", &self.name)
            .field("image_id", &self.image_id)
            .field("client", &self.client_addr)
            .finish()
    }
}

fn errno(r: impl Into<i64>) -> io::Error {
    io::Error::from_raw_os_error((-r.into()) as i32)
}

fn cstring(what: &str, s: &str) -> Result<CString, RbdError> {
    CString::new(s).map_err(|_| {
        RbdError::Locator(crate::LocatorError {
            part: s.to_string(),
            reason: format!("{what} contains a NUL byte"),
        })
    })
}

/// Connects as the locator's user, opens its pool (and namespace) and its image, read-write
/// (`rbd_open`) or read-only (`rbd_open_read_only`: no lock, no watch on writes).
fn connect(loc: &Locator, name: &str, readonly: bool) -> Result<Conn, RbdError> {
    let ceph = |what: String, r: i64| RbdError::Ceph {
        image: name.to_string(),
        what,
        source: errno(r),
    };
    let user = loc.id.as_deref().unwrap_or("admin");
    let mut conn = Conn {
        cluster: ptr::null_mut(),
        ioctx: ptr::null_mut(),
        image: ptr::null_mut(),
    };
    let id_c = loc.id.as_deref().map(|s| cstring("id=", s)).transpose()?;
    // SAFETY: `conn.cluster` is a valid out-pointer; the id is a NUL-terminated string or
    // null (librados' default user), copied by librados.
    let r = unsafe {
        ffi::rados_create(
            &mut conn.cluster,
            id_c.as_ref().map_or(ptr::null(), |c| c.as_ptr()),
        )
    };
    if r < 0 {
        conn.cluster = ptr::null_mut();
        return Err(ceph(
            format!("creating a rados client for client.{user}"),
            r.into(),
        ));
    }
    let conf_c = loc
        .conf
        .as_deref()
        .map(|s| cstring("conf=", s))
        .transpose()?;
    // SAFETY: `conn.cluster` is a created, unconnected client; the path is NUL-terminated
    // or null (librados then searches $CEPH_CONF, /etc/ceph/ceph.conf, …).
    let r = unsafe {
        ffi::rados_conf_read_file(
            conn.cluster,
            conf_c.as_ref().map_or(ptr::null(), |c| c.as_ptr()),
        )
    };
    match (&loc.conf, r) {
        (_, 0..) => {}
        // No conf anywhere is fine when the options say where the monitors are.
        (None, r) if r == -libc::ENOENT => {}
        (Some(path), r) => {
            return Err(ceph(
                format!("reading the Ceph configuration {path}"),
                r.into(),
            ))
        }
        (None, r) => {
            return Err(ceph(
                "reading the default Ceph configuration ($CEPH_CONF, /etc/ceph/ceph.conf)".into(),
                r.into(),
            ))
        }
    }
    // SAFETY: as above; null means the CEPH_ARGS variable.
    let r = unsafe { ffi::rados_conf_parse_env(conn.cluster, ptr::null()) };
    if r < 0 {
        return Err(ceph("parsing CEPH_ARGS".into(), r.into()));
    }
    // The locator's options, then what the crash contract and fencing need, last so that
    // nothing in the configuration file overrides them (the locator cannot: it refuses).
    let forced = [
        ("rbd_cache".to_string(), "false".to_string()),
        (
            "rbd_blocklist_on_break_lock".to_string(),
            "true".to_string(),
        ),
    ];
    for (k, v) in loc.options.iter().chain(forced.iter()) {
        let (kc, vc) = (cstring("an option", k)?, cstring("an option", v)?);
        // SAFETY: an unconnected client and two NUL-terminated strings librados copies.
        let r = unsafe { ffi::rados_conf_set(conn.cluster, kc.as_ptr(), vc.as_ptr()) };
        if r < 0 {
            let why = if r == -libc::ENOENT {
                format!("unknown Ceph option {k:?} in the locator")
            } else {
                format!("setting Ceph option {k}={v}")
            };
            return Err(ceph(why, r.into()));
        }
    }
    // SAFETY: a configured, unconnected client.
    let r = unsafe { ffi::rados_connect(conn.cluster) };
    if r < 0 {
        return Err(ceph(
            format!(
                "connecting to the Ceph cluster as client.{user} (conf {}; check mon_host, \
                 the keyring and the user's caps)",
                loc.conf.as_deref().unwrap_or("default")
            ),
            r.into(),
        ));
    }
    let pool_c = cstring("the pool", &loc.pool)?;
    // SAFETY: a connected client, a NUL-terminated pool name, a valid out-pointer.
    let r = unsafe { ffi::rados_ioctx_create(conn.cluster, pool_c.as_ptr(), &mut conn.ioctx) };
    if r < 0 {
        conn.ioctx = ptr::null_mut();
        let why = if r == -libc::ENOENT {
            format!("pool {} does not exist", loc.pool)
        } else {
            format!("opening pool {}", loc.pool)
        };
        return Err(ceph(why, r.into()));
    }
    if let Some(ns) = &loc.namespace {
        let ns_c = cstring("the namespace", ns)?;
        // SAFETY: a valid ioctx and a NUL-terminated string librados copies.
        unsafe { ffi::rados_ioctx_set_namespace(conn.ioctx, ns_c.as_ptr()) };
    }
    let image_c = cstring("the image", &loc.image)?;
    // SAFETY: a valid ioctx, a NUL-terminated name, a valid out-pointer, no snapshot.
    let r = unsafe {
        if readonly {
            ffi::rbd_open_read_only(conn.ioctx, image_c.as_ptr(), &mut conn.image, ptr::null())
        } else {
            ffi::rbd_open(conn.ioctx, image_c.as_ptr(), &mut conn.image, ptr::null())
        }
    };
    if r < 0 {
        conn.image = ptr::null_mut();
        let why = if r == -libc::ENOENT {
            "the image does not exist".to_string()
        } else {
            "opening the image".to_string()
        };
        return Err(ceph(why, r.into()));
    }
    Ok(conn)
}

fn read_image_id(image: ffi::rbd_image_t, name: &str) -> Result<String, RbdError> {
    let mut buf = vec![0u8; 64];
    loop {
        // SAFETY: `image` is open and a buffer of `buf.len()` bytes.
        let r = unsafe { ffi::rbd_get_id(image, buf.as_mut_ptr() as *mut c_char, buf.len()) };
        if r == -libc::ERANGE && buf.len() < 4096 {
            buf.resize(buf.len() * 2, 0);
            continue;
        }
        if r < 0 {
            return Err(RbdError::Ceph {
                image: name.to_string(),
                what: "reading the image id".into(),
                source: errno(r),
            });
        }
        let id = CStr::from_bytes_until_nul(&buf)
            .map(|c| c.to_string_lossy().into_owned())
            .unwrap_or_default();
        if id.is_empty() {
            return Err(RbdError::Ceph {
                image: name.to_string(),
                what: "the image has no id (a format 1 image? snapmv needs format 2)".into(),
                source: io::Error::from(io::ErrorKind::Unsupported),
            });
        }
        return Ok(id);
    }
}

/// The exclusive lock's current owners (client addresses); empty when unlocked.
fn lock_owners(image: ffi::rbd_image_t) -> Result<Vec<String>, i64> {
    let mut cap: usize = 8;
    loop {
        let mut owners: Vec<*mut c_char> = vec![ptr::null_mut(); cap];
        let mut n = cap;
        let mut mode: ffi::rbd_lock_mode_t = 0;
        // SAFETY: `image` is open; `owners` has room for `n` pointers.
        let r = unsafe { ffi::rbd_lock_get_owners(image, &mut mode, owners.as_mut_ptr(), &mut n) };
        if r == -libc::ENOENT {
            return Ok(Vec::new());
        }
        if r == -libc::ERANGE && n > cap {
            cap = n;
            continue;
        }
        if r < 0 {
            return Err(r.into());
        }
        let list = owners[..n]
            .iter()
            // SAFETY: librbd filled the first `n` slots with strdup'ed strings.
            .map(|&p| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
            .collect();
        // SAFETY: the `n` strings librbd allocated, freed once.
        unsafe { ffi::rbd_lock_get_owners_cleanup(owners.as_mut_ptr(), n) };
        return Ok(list);
    }
}

/// The current owners (client addresses) of the exclusive lock of the image `locator` names;
/// empty when nobody holds it. The image is opened for writing (a read-only open has no
/// exclusive lock to ask about) but nothing is written, so no lock is requested.
pub fn lock_owners_of(locator: &str) -> io::Result<Vec<String>> {
    let loc = Locator::parse(locator).map_err(RbdError::from)?;
    let name = loc.image_spec();
    let conn = connect(&loc, &name, false)?;
    lock_owners(conn.image).map_err(|r| {
        RbdError::Ceph {
            image: name,
            what: "listing the lock's owners".into(),
            source: errno(r),
        }
        .into_io()
    })
}

/// The identity of the image `locator` names, read through a read-only open (which neither
/// takes nor waits for the exclusive lock, so a locked image can be identified too).
pub fn identify(locator: &str) -> io::Result<ImageIdentity> {
    let loc = Locator::parse(locator).map_err(RbdError::from)?;
    let name = loc.image_spec();
    let conn = connect(&loc, &name, true)?;
    let image_id = read_image_id(conn.image, &name)?;
    let mut fsid = vec![0u8; 64];
    // SAFETY: a connected client and a buffer of `fsid.len()` bytes.
    let r = unsafe {
        ffi::rados_cluster_fsid(conn.cluster, fsid.as_mut_ptr() as *mut c_char, fsid.len())
    };
    if r < 0 {
        return Err(RbdError::Ceph {
            image: name,
            what: "reading the cluster's fsid".into(),
            source: errno(r),
        }
        .into_io());
    }
    fsid.truncate(r as usize);
    let fsid = String::from_utf8_lossy(&fsid)
        .trim_end_matches('\0')
        .to_string();
    // SAFETY: a valid ioctx.
    let pool_id = unsafe { ffi::rados_ioctx_get_id(conn.ioctx) };
    Ok(ImageIdentity {
        fsid,
        pool_id,
        namespace: loc.namespace.clone().unwrap_or_default(),
        image_id,
    })
}

impl RbdStorage {
    /// Opens the image named by `locator` (`rbd:POOL[/NAMESPACE]/IMAGE[:OPTION=VALUE…]`, see
    /// [`Locator`]) and takes its exclusive lock.
    ///
    /// Fails with [`RbdError::Locked`] (kind `ResourceBusy`) at once if a live client owns the
    /// lock. If the owner died without releasing it, librbd waits until the OSD times out the
    /// dead owner's watch (`osd_client_watch_timeout`, 30 s), then breaks the lock itself,
    /// blocklisting the dead owner, and this open succeeds; [`RbdStorage::open_takeover`]
    /// does not wait.
    pub fn open(locator: &str) -> io::Result<RbdStorage> {
        Self::open_impl(locator, false).map_err(RbdError::into_io)
    }

    /// Takes the image over from its current owner, believed dead or hung: breaks its lock,
    /// which blocklists (fences) that client instance first so that no write of it lands
    /// afterwards, then acquires the lock as [`RbdStorage::open`] does. The owners fenced are
    /// in [`RbdStorage::fenced_owners`]. Never use it against a daemon that should keep
    /// serving: it is fenced too.
    pub fn open_takeover(locator: &str) -> io::Result<RbdStorage> {
        Self::open_impl(locator, true).map_err(RbdError::into_io)
    }

    fn open_impl(locator: &str, takeover: bool) -> Result<RbdStorage, RbdError> {
        let loc = Locator::parse(locator)?;
        let name = loc.image_spec();
        let ceph = |what: String, r: i64| RbdError::Ceph {
            image: name.clone(),
            what,
            source: errno(r),
        };
        let conn = connect(&loc, &name, false)?;
        let mut st = RbdStorage {
            conn,
            name: name.clone(),
            image_id: String::new(),
            boot: [0; 16],
            client_addr: String::new(),
            broken: Vec::new(),
        };
        st.check_cache_off()?;
        st.image_id = st.read_image_id()?;
        st.boot = image_boot_id(&st.image_id);
        st.client_addr = st.read_client_addr().unwrap_or_default();
        let mut features = 0u64;
        // SAFETY: an open image and a valid out-pointer.
        let r = unsafe { ffi::rbd_get_features(st.conn.image, &mut features) };
        if r < 0 {
            return Err(ceph("reading the image's features".into(), r.into()));
        }
        if features & ffi::RBD_FEATURE_EXCLUSIVE_LOCK == 0 {
            return Err(RbdError::NoExclusiveLock { image: name });
        }
        if takeover {
            for owner in st
                .lock_owners()
                .map_err(|e| ceph("listing the lock's owners".into(), e))?
            {
                let oc = cstring("a lock owner", &owner)?;
                // SAFETY: an open image and a NUL-terminated owner string from
                // rbd_lock_get_owners.
                let r = unsafe {
                    ffi::rbd_lock_break(st.conn.image, ffi::RBD_LOCK_MODE_EXCLUSIVE, oc.as_ptr())
                };
                // -ENOENT: the lock went away meanwhile (released, or broken by librbd).
                if r < 0 && r != -libc::ENOENT {
                    return Err(ceph(
                        format!("breaking the exclusive lock of {owner} (and blocklisting it)"),
                        r.into(),
                    ));
                }
                if r == 0 {
                    log::warn!("{name}: took over from {owner}, which is now blocklisted");
                    st.broken.push(owner);
                }
            }
        }
        // SAFETY: an open image.
        let r = unsafe { ffi::rbd_lock_acquire(st.conn.image, ffi::RBD_LOCK_MODE_EXCLUSIVE) };
        if r == -libc::EROFS || r == -libc::EBUSY {
            return Err(RbdError::Locked {
                image: name,
                owners: st.lock_owners().unwrap_or_default(),
            });
        }
        if r < 0 {
            return Err(ceph("acquiring the exclusive lock".into(), r.into()));
        }
        if !st.owns()? {
            return Err(RbdError::Locked {
                image: name,
                owners: st.lock_owners().unwrap_or_default(),
            });
        }
        Ok(st)
    }

    /// Refuses an image whose effective `rbd_cache` is on (a pool or image override of the
    /// client setting).
    fn check_cache_off(&self) -> Result<(), RbdError> {
        let mut cap: c_int = 256;
        loop {
            let mut opts: Vec<ffi::rbd_config_option_t> = (0..cap)
                .map(|_| ffi::rbd_config_option_t {
                    name: ptr::null_mut(),
                    value: ptr::null_mut(),
                    source: 0,
                })
                .collect();
            let mut n = cap;
            // SAFETY: an open image; `opts` has room for `n` entries.
            let r =
                unsafe { ffi::rbd_config_image_list(self.conn.image, opts.as_mut_ptr(), &mut n) };
            if r == -libc::ERANGE && n > cap {
                cap = n;
                continue;
            }
            if r < 0 {
                return Err(RbdError::Ceph {
                    image: self.name.clone(),
                    what: "listing the image's librbd configuration".into(),
                    source: errno(r),
                });
            }
            let mut found = None;
            for o in &opts[..n as usize] {
                // SAFETY: librbd filled the first `n` entries with NUL-terminated strings.
                let name = unsafe { CStr::from_ptr(o.name) };
                if name.to_bytes() == b"rbd_cache" {
                    // SAFETY: as above.
                    let value = unsafe { CStr::from_ptr(o.value) };
                    found = Some((value.to_string_lossy().into_owned(), o.source));
                }
            }
            // SAFETY: the entries librbd filled, released once.
            unsafe { ffi::rbd_config_image_list_cleanup(opts.as_mut_ptr(), n) };
            return match found {
                Some((v, _)) if v == "false" => Ok(()),
                Some((value, source)) => Err(RbdError::CacheOn {
                    image: self.name.clone(),
                    value,
                    origin: match source {
                        1 => "pool",
                        2 => "image",
                        _ => "client",
                    },
                }),
                None => Err(RbdError::Ceph {
                    image: self.name.clone(),
                    what: "librbd does not list rbd_cache in the image's configuration".into(),
                    source: io::Error::from(io::ErrorKind::NotFound),
                }),
            };
        }
    }

    fn read_image_id(&self) -> Result<String, RbdError> {
        read_image_id(self.conn.image, &self.name)
    }

    fn read_client_addr(&self) -> Option<String> {
        let mut p: *mut c_char = ptr::null_mut();
        // SAFETY: a connected client and a valid out-pointer.
        let r = unsafe { ffi::rados_getaddrs(self.conn.cluster, &mut p) };
        if r < 0 || p.is_null() {
            return None;
        }
        // SAFETY: librados returned a NUL-terminated string, freed once right after.
        let s = unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned();
        // SAFETY: as above.
        unsafe { ffi::rados_buffer_free(p) };
        Some(s)
    }

    /// The exclusive lock's current owners (client addresses); empty when unlocked.
    fn lock_owners(&self) -> Result<Vec<String>, i64> {
        lock_owners(self.conn.image)
    }

    /// The exclusive lock's current owners as librbd reports them (client addresses); this
    /// handle's own address is [`RbdStorage::client_address`].
    pub fn lock_owner_addresses(&self) -> io::Result<Vec<String>> {
        self.lock_owners().map_err(|r| {
            RbdError::Ceph {
                image: self.name.clone(),
                what: "listing the lock's owners".into(),
                source: errno(r),
            }
            .into_io()
        })
    }

    /// Whether this handle owns the image's exclusive lock now.
    pub fn is_owner(&self) -> io::Result<bool> {
        self.owns().map_err(RbdError::into_io)
    }

    fn owns(&self) -> Result<bool, RbdError> {
        let mut owner: c_int = 0;
        // SAFETY: an open image and a valid out-pointer.
        let r = unsafe { ffi::rbd_is_exclusive_lock_owner(self.conn.image, &mut owner) };
        if r < 0 {
            return Err(self.op_error("checking lock ownership", r.into()));
        }
        Ok(owner != 0)
    }

    /// Hands the exclusive lock over gracefully (live migration's switch-over: flush, release,
    /// and the next owner opens with [`RbdStorage::open`]). Nobody is fenced; this handle's
    /// later writes fail with [`RbdError::NotOwner`] (reads still work).
    pub fn release(&self) -> io::Result<()> {
        self.sync()?;
        // SAFETY: an open image.
        let r = unsafe { ffi::rbd_lock_release(self.conn.image) };
        if r < 0 {
            return Err(self
                .op_error("releasing the exclusive lock", r.into())
                .into_io());
        }
        Ok(())
    }

    /// The owners [`RbdStorage::open_takeover`] broke the lock of (and so blocklisted).
    pub fn fenced_owners(&self) -> &[String] {
        &self.broken
    }

    /// This handle's client instance address (what a takeover blocklists), e.g.
    /// `127.0.0.1:0/3027520488`; empty if librados did not tell.
    pub fn client_address(&self) -> &str {
        &self.client_addr
    }

    /// The RBD image id (`rbd info`'s `id:`), constant for the image's life.
    pub fn image_id(&self) -> &str {
        &self.image_id
    }

    fn op_error(&self, op: &str, r: i64) -> RbdError {
        let image = self.name.clone();
        let op = op.to_string();
        match -r as i32 {
            // Ceph's EBLOCKLISTED is ESHUTDOWN.
            libc::ESHUTDOWN => RbdError::Fenced { image, op },
            libc::EROFS => RbdError::NotOwner { image, op },
            _ => RbdError::Ceph {
                image,
                what: op,
                source: errno(r),
            },
        }
    }

    fn io_error(&self, what: &str, len: usize, offset: u64, r: i64) -> io::Error {
        self.op_error(&format!("{what} {len} bytes at offset {offset}"), r)
            .into_io()
    }

    fn size(&self) -> Result<u64, i64> {
        let mut size = 0u64;
        // SAFETY: an open image and a valid out-pointer.
        let r = unsafe { ffi::rbd_get_size(self.conn.image, &mut size) };
        if r < 0 {
            return Err(r.into());
        }
        Ok(size)
    }

    /// Runs one asynchronous librbd call and waits for it; returns its result.
    fn aio(&self, submit: impl FnOnce(ffi::rbd_completion_t) -> c_int) -> isize {
        let mut c: ffi::rbd_completion_t = ptr::null_mut();
        // SAFETY: a valid out-pointer; no callback.
        let r = unsafe { ffi::rbd_aio_create_completion(ptr::null_mut(), None, &mut c) };
        if r < 0 {
            return r as isize;
        }
        let r = submit(c);
        let ret = if r < 0 {
            r as isize
        } else {
            // SAFETY: `c` was submitted; waiting, then reading its result, is its protocol.
            unsafe {
                ffi::rbd_aio_wait_for_complete(c);
                ffi::rbd_aio_get_return_value(c)
            }
        };
        // SAFETY: the completion is finished (or was never submitted) and released once.
        unsafe { ffi::rbd_aio_release(c) };
        ret
    }
}

/// Zero-fills `bufs` from byte `from` on (what a read past the image's end returns).
fn zero_from(bufs: &mut [IoSliceMut<'_>], mut from: usize) {
    for b in bufs.iter_mut() {
        if from >= b.len() {
            from -= b.len();
            continue;
        }
        b[from..].fill(0);
        from = 0;
    }
}

impl Storage for RbdStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            let n = (buf.len() - done).min(MAX_IO);
            let at = offset + done as u64;
            // SAFETY: an open image; `buf[done..done + n]` is valid writable memory.
            let r = unsafe {
                ffi::rbd_read2(
                    self.conn.image,
                    at,
                    n,
                    buf[done..].as_mut_ptr() as *mut c_char,
                    0,
                )
            };
            if r == -(libc::EINVAL as isize) && self.size().is_ok_and(|s| at >= s) {
                // Starting at or past the end: zeros, as a short file reads.
                buf[done..].fill(0);
                return Ok(());
            }
            if r < 0 {
                return Err(self.io_error("reading", buf.len(), offset, r as i64));
            }
            if r == 0 {
                buf[done..].fill(0);
                return Ok(());
            }
            done += r as usize;
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            let n = (buf.len() - done).min(MAX_IO);
            // SAFETY: an open image; `buf[done..done + n]` is valid memory, read during the
            // call only.
            let r = unsafe {
                ffi::rbd_write2(
                    self.conn.image,
                    offset + done as u64,
                    n,
                    buf[done..].as_ptr() as *const c_char,
                    0,
                )
            };
            if r <= 0 {
                let r = if r == 0 { -(libc::EIO as isize) } else { r };
                return Err(self.io_error("writing", buf.len(), offset, r as i64));
            }
            done += r as usize;
        }
        Ok(())
    }

    fn read_vectored_at(&self, bufs: &mut [IoSliceMut<'_>], offset: u64) -> io::Result<()> {
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        if bufs.len() > MAX_IOV || total > MAX_IO {
            let mut off = offset;
            for b in bufs.iter_mut() {
                self.read_at(b, off)?;
                off += b.len() as u64;
            }
            return Ok(());
        }
        if total == 0 {
            return Ok(());
        }
        let iov = bufs.as_ptr() as *const libc::iovec;
        let cnt = bufs.len() as c_int;
        // SAFETY: IoSliceMut is ABI-compatible with iovec; the buffers stay borrowed (alive and
        // writable) until `aio` has waited for the completion.
        let r = self.aio(|c| unsafe { ffi::rbd_aio_readv(self.conn.image, iov, cnt, offset, c) });
        if r == -(libc::EINVAL as isize) && self.size().is_ok_and(|s| offset >= s) {
            zero_from(bufs, 0);
            return Ok(());
        }
        if r < 0 {
            return Err(self.io_error("reading", total, offset, r as i64));
        }
        if (r as usize) < total {
            // Clipped at the end of the image.
            zero_from(bufs, r as usize);
        }
        Ok(())
    }

    fn write_vectored_at(&self, bufs: &[IoSlice<'_>], offset: u64) -> io::Result<()> {
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        if bufs.len() > MAX_IOV || total > MAX_IO {
            let mut off = offset;
            for b in bufs {
                self.write_at(b, off)?;
                off += b.len() as u64;
            }
            return Ok(());
        }
        if total == 0 {
            return Ok(());
        }
        let iov = bufs.as_ptr() as *const libc::iovec;
        let cnt = bufs.len() as c_int;
        // SAFETY: IoSlice is ABI-compatible with iovec; the buffers stay borrowed until `aio`
        // has waited for the completion.
        let r = self.aio(|c| unsafe { ffi::rbd_aio_writev(self.conn.image, iov, cnt, offset, c) });
        if r < 0 {
            return Err(self.io_error("writing", total, offset, r as i64));
        }
        // librbd completes an asynchronous write with 0 (some versions: the length).
        if r != 0 && r as usize != total {
            return Err(self.io_error("writing", total, offset, -(libc::EIO as i64)));
        }
        Ok(())
    }

    /// `rbd_flush`. With the cache off (always, see the crate docs) every completed write is
    /// already acknowledged by the OSDs, so this only waits for writes still in flight.
    fn sync(&self) -> io::Result<()> {
        // SAFETY: an open image.
        let r = unsafe { ffi::rbd_flush(self.conn.image) };
        if r < 0 {
            return Err(self.op_error("flushing", r.into()).into_io());
        }
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        self.size()
            .map_err(|r| self.op_error("reading the size", r).into_io())
    }

    fn name(&self) -> &str {
        &self.name
    }

    /// A constant per image ([`image_boot_id`] of the RBD image id), not the host's boot id.
    ///
    /// The engine trusts unsynced writes made in the same "boot" as the one reading them back
    /// (for files: the host's page cache outlives a killed process, not a host crash). On RBD
    /// with librbd's cache off, a write that completed has been acknowledged by the OSDs and is
    /// in Ceph: it survives the death of this process *and* of this host, and is visible to
    /// the next owner on any host. Nothing that completed can be lost, so every reader is in
    /// the same "boot" as every writer, forever: the id depends on the image alone. (It must
    /// not be the host's boot id: a store taken over on another host, or after this host
    /// rebooted, would otherwise distrust writes that are durable.)
    fn boot_id(&self) -> BootId {
        self.boot
    }
}
