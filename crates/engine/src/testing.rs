//! Storages for tests (feature `test-support`): in memory, and a recording one that captures
//! every write and sync so that a test can build the images a power cut or a kill would leave.

use crate::{BootId, Storage};
use std::io;
use std::sync::{Arc, Mutex};

/// Storage in memory.
#[derive(Debug)]
pub struct MemStorage {
    pub name: String,
    pub data: Mutex<Vec<u8>>,
    /// The boot it reports: the machine's, or another one for an image a power cut left.
    pub boot: BootId,
}

impl MemStorage {
    pub fn new(name: &str, size: usize) -> Arc<Self> {
        Arc::new(MemStorage {
            name: name.into(),
            data: Mutex::new(vec![0; size]),
            boot: crate::current_boot_id(),
        })
    }
    /// An image read back in the boot that wrote it (e.g. after a process kill).
    pub fn from_bytes(name: &str, data: Vec<u8>) -> Arc<Self> {
        Arc::new(MemStorage {
            name: name.into(),
            data: Mutex::new(data),
            boot: crate::current_boot_id(),
        })
    }
    /// An image read back after a reboot (e.g. what a power cut left): its unsynced writes
    /// may not be trusted.
    pub fn from_bytes_rebooted(name: &str, data: Vec<u8>) -> Arc<Self> {
        let mut boot = crate::current_boot_id();
        boot[0] ^= 0xff;
        boot[15] ^= 0x5a;
        Arc::new(MemStorage {
            name: name.into(),
            data: Mutex::new(data),
            boot,
        })
    }
}

impl Storage for MemStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let d = self.data.lock().unwrap();
        let o = offset as usize;
        if o + buf.len() > d.len() {
            return Err(io::Error::other(format!("{}: read past end", self.name)));
        }
        buf.copy_from_slice(&d[o..o + buf.len()]);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut d = self.data.lock().unwrap();
        let o = offset as usize;
        if o + buf.len() > d.len() {
            return Err(io::Error::other(format!("{}: write past end", self.name)));
        }
        d[o..o + buf.len()].copy_from_slice(buf);
        Ok(())
    }
    fn sync(&self) -> io::Result<()> {
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.data.lock().unwrap().len() as u64)
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn boot_id(&self) -> BootId {
        self.boot
    }
}

/// Records writes and syncs: `durable` is what survives a power cut for certain; `unsynced`
/// are the writes since the last sync, in order, which a power cut keeps in any subset.
#[derive(Debug)]
pub struct RecordingStorage {
    pub name: String,
    pub state: Mutex<Rec>,
    /// Shared by the storages of one machine, so that a crash cuts them all at one instant.
    pub world: Arc<Mutex<()>>,
}

#[derive(Debug, Clone, Default)]
pub struct Rec {
    pub current: Vec<u8>,
    pub durable: Vec<u8>,
    pub unsynced: Vec<(u64, Vec<u8>)>,
    pub syncs: u64,
    pub writes: u64,
}

impl RecordingStorage {
    pub fn new(world: &Arc<Mutex<()>>, name: &str, data: Vec<u8>) -> Arc<Self> {
        Arc::new(RecordingStorage {
            name: name.into(),
            state: Mutex::new(Rec {
                current: data.clone(),
                durable: data,
                ..Default::default()
            }),
            world: world.clone(),
        })
    }

    /// The image a power cut would leave now: durable data plus a random subset of the
    /// unsynced writes, each applied whole or torn at a 512-byte sector boundary.
    pub fn crash_image(&self, rng: &mut fastrand::Rng) -> Vec<u8> {
        let s = self.state.lock().unwrap();
        let mut img = s.durable.clone();
        for (off, data) in &s.unsynced {
            match rng.u8(0..4) {
                0 => {} // lost
                1 => {
                    // torn: some sectors only
                    for (i, sec) in data.chunks(512).enumerate() {
                        if rng.bool() {
                            let o = *off as usize + i * 512;
                            img[o..o + sec.len()].copy_from_slice(sec);
                        }
                    }
                }
                _ => img[*off as usize..*off as usize + data.len()].copy_from_slice(data),
            }
        }
        img
    }

    /// The image a process kill would leave: everything written (the page cache survives).
    pub fn kill_image(&self) -> Vec<u8> {
        self.state.lock().unwrap().current.clone()
    }
}

impl Storage for RecordingStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let s = self.state.lock().unwrap();
        let o = offset as usize;
        if o + buf.len() > s.current.len() {
            return Err(io::Error::other("read past end"));
        }
        buf.copy_from_slice(&s.current[o..o + buf.len()]);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let _w = self.world.lock().unwrap();
        let mut s = self.state.lock().unwrap();
        let o = offset as usize;
        if o + buf.len() > s.current.len() {
            return Err(io::Error::other("write past end"));
        }
        s.current[o..o + buf.len()].copy_from_slice(buf);
        s.unsynced.push((offset, buf.to_vec()));
        s.writes += 1;
        Ok(())
    }
    fn sync(&self) -> io::Result<()> {
        let _w = self.world.lock().unwrap();
        let mut s = self.state.lock().unwrap();
        s.durable = s.current.clone();
        s.unsynced.clear();
        s.syncs += 1;
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.state.lock().unwrap().current.len() as u64)
    }
    fn name(&self) -> &str {
        &self.name
    }
}
