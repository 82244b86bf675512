//! The `VhostUserBackend` implementation: one backend object per client connection, one worker
//! thread per queue, no lock shared between queues.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use vhost::vhost_user::message::{
    VhostUserInflight, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost_user_backend::bitmap::BitmapMmapRegion;
use vhost_user_backend::VhostUserBackend;
use vm_memory::GuestMemoryAtomic;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use super::config::{device_features, BlkConfig, WRITEBACK_OFFSET};
use super::disk::BlockDisk;
use super::dispatch::Dispatcher;
use super::event_handler::{QueueProcessor, Vring};
pub(crate) use super::export_state::ExportState;
use super::inflight::InflightRegion;
use super::metrics::ExportStats;
use super::persist::InflightTracker;
use super::request::GuestMem;

/// Per-export settings of the device.
#[derive(Clone, Debug)]
pub struct DeviceOptions {
    /// Export name, used in logs and (first 20 bytes) as the GET_ID answer.
    pub name: String,
    /// Number of request queues (1..=64).
    pub num_queues: u16,
    /// Largest queue size accepted.
    pub max_queue_size: u16,
    /// Refuse writes and advertise VIRTIO_BLK_F_RO.
    pub readonly: bool,
}

/// The vhost-user-blk backend for one client connection.
pub struct BlkBackend {
    disk: Arc<dyn BlockDisk>,
    opts: DeviceOptions,
    size: u64,
    event_idx: AtomicBool,
    /// Consumer ends of the exit eventfds handed to the crate, which turns them into raw fds
    /// and never closes them; closed by [`BlkBackend::close_exit_fds`] once the daemon is gone.
    exit_fds: Mutex<Vec<RawFd>>,
    /// Our own handles on the notify ends, to stop the workers if the daemon cannot be built.
    exit_notifiers: Mutex<Vec<EventNotifier>>,
    exit_failed: AtomicBool,
    /// Takes, runs and completes the requests of each queue.
    queues: QueueProcessor,
}

impl BlkBackend {
    /// A backend for one connection. `mem` must be the same `GuestMemoryAtomic` given to the
    /// `VhostUserDaemon`, whose handler swaps its contents on memory-table changes.
    pub fn new(
        disk: Arc<dyn BlockDisk>,
        opts: DeviceOptions,
        mem: GuestMemoryAtomic<GuestMem>,
    ) -> BlkBackend {
        Self::with_state(disk, opts, mem, Arc::new(ExportState::default()))
    }

    pub(crate) fn with_state(
        disk: Arc<dyn BlockDisk>,
        opts: DeviceOptions,
        mem: GuestMemoryAtomic<GuestMem>,
        state: Arc<ExportState>,
    ) -> BlkBackend {
        let size = disk.size();
        let mut id = opts.name.as_bytes().to_vec();
        id.truncate(virtio_bindings::virtio_blk::VIRTIO_BLK_ID_BYTES as usize);
        let dispatcher = Dispatcher::new(
            &opts.name,
            disk.clone(),
            opts.readonly,
            id.into(),
            opts.num_queues,
        );
        BlkBackend {
            disk,
            queues: QueueProcessor {
                name: opts.name.clone(),
                mem,
                state,
                tracker: InflightTracker::new(opts.num_queues),
                dispatcher,
            },
            opts,
            size,
            event_idx: AtomicBool::new(false),
            exit_fds: Mutex::new(Vec::new()),
            exit_notifiers: Mutex::new(Vec::new()),
            exit_failed: AtomicBool::new(false),
        }
    }

    /// The export's statistics since it started (shared by every connection to it).
    pub fn stats(&self) -> ExportStats {
        self.queues.state.metrics().snapshot()
    }

    /// The configuration space as it is now.
    pub fn config(&self) -> BlkConfig {
        BlkConfig {
            size_bytes: self.size,
            physical_block_size: self.disk.physical_block_size(),
            num_queues: self.opts.num_queues,
            writeback: self.queues.state.writeback.load(Ordering::Relaxed),
        }
    }

    /// True if an exit eventfd could not be created: the crate's worker threads then never
    /// stop and the daemon must not be dropped (it would join them forever).
    pub fn exit_event_failed(&self) -> bool {
        self.exit_failed.load(Ordering::SeqCst)
    }

    /// Closes the exit eventfds leaked by the crate. Call only after the daemon that used this
    /// backend has been dropped (its worker threads are joined by then).
    pub fn close_exit_fds(&self) {
        let fds = std::mem::take(&mut *self.exit_fds.lock().unwrap_or_else(|e| e.into_inner()));
        for fd in fds {
            // SAFETY: `fd` is the consumer end of an eventfd created in `exit_event`; the crate
            // converted it with `into_raw_fd` and never closes it; its epoll loop and worker
            // thread are gone once the daemon is dropped, so this is the only owner left.
            drop(unsafe { OwnedFd::from_raw_fd(fd) });
        }
    }

    /// Tells every worker thread created so far to exit. For when `VhostUserDaemon::new`
    /// failed half-way: its workers were started but no handler will ever stop them. Their
    /// exit fds are then left open (the threads may still be reading them).
    pub fn stop_orphan_workers(&self) {
        let notifiers = std::mem::take(
            &mut *self
                .exit_notifiers
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
        );
        for n in notifiers {
            if let Err(e) = n.notify() {
                log::error!(
                    "export {}: cannot stop a worker thread: {e}",
                    self.opts.name
                );
            }
        }
        self.exit_fds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }
}

impl VhostUserBackend for BlkBackend {
    type Bitmap = BitmapMmapRegion;
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        usize::from(self.opts.num_queues)
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.opts.max_queue_size)
    }

    fn features(&self) -> u64 {
        // LOG_ALL: the device marks the guest pages it writes in the frontend's dirty log
        // (LOG_SHMFD below), which QEMU requires before it migrates a vhost-user device.
        device_features(self.opts.readonly)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
            | VhostUserVirtioFeatures::LOG_ALL.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD
            | VhostUserProtocolFeatures::LOG_SHMFD
    }

    fn get_inflight_fd(&self, msg: &VhostUserInflight) -> io::Result<(VhostUserInflight, File)> {
        let (region, file, size) =
            InflightRegion::create(msg.num_queues, msg.queue_size, self.opts.num_queues).map_err(
                |e| {
                    log::error!("export {}: GET_INFLIGHT_FD: {e}", self.opts.name);
                    io::Error::other(e)
                },
            )?;
        self.queues.tracker.install(&self.opts.name, region);
        Ok((
            VhostUserInflight::new(size, 0, msg.num_queues, msg.queue_size),
            file,
        ))
    }

    fn set_inflight_fd(&self, msg: &VhostUserInflight, file: File) -> io::Result<()> {
        let region = InflightRegion::map(
            &file,
            msg.mmap_size,
            msg.mmap_offset,
            msg.num_queues,
            msg.queue_size,
            self.opts.num_queues,
        )
        .map_err(|e| {
            log::error!("export {}: SET_INFLIGHT_FD: {e}", self.opts.name);
            io::Error::other(e)
        })?;
        self.queues.tracker.install(&self.opts.name, region);
        Ok(())
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.config().read(offset, size)
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        // Only `writeback` is writable (CONFIG_WCE); other writes are ignored, not refused:
        // an error would make the crate drop the connection.
        let start = offset as usize;
        if let Some(i) = WRITEBACK_OFFSET.checked_sub(start) {
            if let Some(&v) = buf.get(i) {
                self.queues.state.set_writeback(&self.opts.name, v != 0);
            }
        }
        Ok(())
    }

    fn update_memory(&self, _mem: GuestMemoryAtomic<GuestMem>) -> io::Result<()> {
        // `self.mem` is the same atomic the handler just updated.
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.opts.num_queues).map(|q| 1u64 << q).collect()
    }

    fn exit_event(&self, thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        match new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC) {
            Ok((consumer, notifier)) => {
                self.exit_fds
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(consumer.as_raw_fd());
                match notifier.try_clone() {
                    Ok(n) => self
                        .exit_notifiers
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(n),
                    Err(e) => log::warn!(
                        "export {}: cannot duplicate the exit eventfd of worker {thread_index}: {e}",
                        self.opts.name
                    ),
                }
                Some((consumer, notifier))
            }
            Err(e) => {
                log::error!(
                    "export {}: cannot create the exit eventfd of worker {thread_index}: {e}",
                    self.opts.name
                );
                self.exit_failed.store(true, Ordering::SeqCst);
                None
            }
        }
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        // Requests are executed synchronously while the worker holds the vring lock, and the
        // handler took that lock to mark the ring not ready before calling us: nothing of
        // this ring is in flight any more, so GET_VRING_BASE's answer is exact. When the ring
        // starts again (maybe as a new ring), check the inflight region again.
        self.queues.tracker.ring_stopped(queue_index);
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        if !evset.contains(EventSet::IN) {
            return Ok(());
        }
        // One queue per worker: `device_event` indexes this worker's own vrings and the
        // thread index is the queue number.
        let Some(vring) = vrings.get(usize::from(device_event)) else {
            log::warn!(
                "export {}: event {device_event} for an unknown vring on worker {thread_id}",
                self.opts.name
            );
            return Ok(());
        };
        // Never return an error for a guest's fault: the crate would end this worker thread
        // and the queue would hang.
        if let Err(e) = self.queues.process_vring(vring, thread_id) {
            if self.queues.state.count_bad_request().is_some() {
                log::warn!("export {} queue {thread_id}: {e}", self.opts.name);
            }
        }
        Ok(())
    }
}
