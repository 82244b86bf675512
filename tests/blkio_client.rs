//! A small synchronous wrapper around the `blkio` crate's `virtio-blk-vhost-user` driver, for
//! tests and benchmarks. Every data buffer lives in one memory region allocated and mapped
//! through blkio (a heap buffer is outside the backend's view of guest memory), and every wait
//! has a timeout.

use std::mem::MaybeUninit;
use std::path::Path;
use std::time::Duration;

use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};

/// How long any single wait for completions may take before the test fails.
pub const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// A connected, started client with one data region.
pub struct Client {
    /// The blkio instance (kept alive while queues and region are used).
    pub blkio: Blkio,
    /// The started queues.
    pub queues: Vec<Blkioq>,
    /// The data region, mapped into the backend's view.
    pub region: MemoryRegion,
}

/// Why a client could not be set up or an I/O did not complete.
#[derive(Debug)]
pub struct ClientError(pub String);

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ClientError {}

fn err(what: &str, sock: &Path, e: blkio::Error) -> ClientError {
    ClientError(format!(
        "blkio {what} on {}: {} (errno {:?})",
        sock.display(),
        e.message(),
        e.errno()
    ))
}

/// Options of [`Client::connect_with`].
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// Number of queues to start.
    pub num_queues: i32,
    /// Queue size.
    pub queue_size: i32,
    /// Bytes of data region to allocate (rounded up to the region alignment).
    pub region_len: usize,
    /// Open read-only (required for a device offering VIRTIO_BLK_F_RO).
    pub read_only: bool,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            num_queues: 1,
            queue_size: 256,
            region_len: 4 << 20,
            read_only: false,
        }
    }
}

impl Client {
    /// Connects with one queue of 256 and a 4 MiB region.
    pub fn connect(sock: &Path) -> Result<Client, ClientError> {
        Self::connect_with(sock, &ClientOptions::default())
    }

    /// Connects, starts and maps a data region.
    pub fn connect_with(sock: &Path, o: &ClientOptions) -> Result<Client, ClientError> {
        let mut b = Blkio::new("virtio-blk-vhost-user").map_err(|e| err("new", sock, e))?;
        let path = sock
            .to_str()
            .ok_or_else(|| ClientError(format!("socket path {} is not UTF-8", sock.display())))?;
        b.set_str("path", path)
            .map_err(|e| err("set path", sock, e))?;
        if o.read_only {
            b.set_bool("read-only", true)
                .map_err(|e| err("set read-only", sock, e))?;
        }
        b.connect().map_err(|e| err("connect", sock, e))?;
        b.set_i32("num-queues", o.num_queues)
            .map_err(|e| err("set num-queues", sock, e))?;
        b.set_i32("queue-size", o.queue_size)
            .map_err(|e| err("set queue-size", sock, e))?;
        let started = b.start().map_err(|e| err("start", sock, e))?;
        let align = b
            .get_u64("mem-region-alignment")
            .map_err(|e| err("get mem-region-alignment", sock, e))?
            .max(1) as usize;
        let len = o.region_len.div_ceil(align) * align;
        let region = b
            .alloc_mem_region(len)
            .map_err(|e| err("alloc_mem_region", sock, e))?;
        b.map_mem_region(&region)
            .map_err(|e| err("map_mem_region", sock, e))?;
        Ok(Client {
            blkio: b,
            queues: started.queues,
            region,
        })
    }

    /// Capacity in bytes.
    pub fn capacity(&self) -> u64 {
        self.blkio.get_u64("capacity").unwrap_or(0)
    }

    /// The whole data region as bytes.
    pub fn mem(&mut self) -> &mut [u8] {
        // SAFETY: `region` is a live mapping of `len` bytes owned by `self.blkio`, which
        // outlives the returned borrow of `self`. The backend writes into it only while a read
        // is in flight, and callers only look at buffers after their I/O completed.
        unsafe { std::slice::from_raw_parts_mut(self.region.addr as *mut u8, self.region.len) }
    }

    /// Address of byte `off` of the region.
    pub fn ptr(&self, off: usize) -> *mut u8 {
        assert!(
            off <= self.region.len,
            "offset {off} outside the data region"
        );
        (self.region.addr + off) as *mut u8
    }
}

/// Waits until `n` requests completed on `q`; returns `(user_data, ret)` pairs.
pub fn wait_for(q: &mut Blkioq, n: usize) -> Result<Vec<(usize, i32)>, ClientError> {
    let mut out = Vec::with_capacity(n);
    let mut comps: Vec<MaybeUninit<Completion>> =
        (0..n.max(1)).map(|_| MaybeUninit::uninit()).collect();
    while out.len() < n {
        let mut timeout = IO_TIMEOUT;
        let want = n - out.len();
        let got = q
            .do_io(&mut comps[..want], want, Some(&mut timeout), None)
            .map_err(|e| {
                ClientError(format!(
                    "do_io waiting for {want} of {n} completions: {} (errno {:?})",
                    e.message(),
                    e.errno()
                ))
            })?;
        if got == 0 {
            return Err(ClientError(format!(
                "timed out after {IO_TIMEOUT:?} with {} of {n} completions",
                out.len()
            )));
        }
        for c in &comps[..got] {
            // SAFETY: do_io initialised the first `got` completions.
            let c = unsafe { c.assume_init_ref() };
            out.push((c.user_data, c.ret));
        }
    }
    Ok(out)
}

/// Runs one request enqueued by `f` and returns its `ret` (0 or -errno).
pub fn run1(q: &mut Blkioq, f: impl FnOnce(&mut Blkioq)) -> Result<i32, ClientError> {
    f(q);
    Ok(wait_for(q, 1)?[0].1)
}

/// No request flags.
pub const NO_FLAGS: ReqFlags = ReqFlags::empty();
