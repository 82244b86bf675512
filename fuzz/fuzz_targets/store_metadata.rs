//! The on-disk metadata decoders (superblock slots, checkpoint, journal batches and their
//! records, the version tree and allocation checks) through the engine's public API: a small
//! store with an origin, snapshots, a snapshot of a snapshot, a delete and journalled copy-outs
//! is built once; each input is a list of edits (byte writes into the superblock slots, the
//! current checkpoint or the journal, and optionally a truncation) applied to a copy of it; then
//! `check_storage` (and, on a second copy, `check_storage` with repair) runs and, when the check
//! is clean, `Store::open_storage`. Nothing may panic, whatever the damage.
#![no_main]

use libfuzzer_sys::fuzz_target;
use snapmv_engine::{check_storage, FormatOptions, Storage, Store};
use std::io;
use std::sync::{Arc, Mutex, OnceLock};

#[derive(Debug)]
struct Mem {
    data: Mutex<Vec<u8>>,
}

impl Mem {
    fn new(data: Vec<u8>) -> Arc<Mem> {
        Arc::new(Mem {
            data: Mutex::new(data),
        })
    }
}

impl Storage for Mem {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let d = self.data.lock().unwrap();
        let o = usize::try_from(offset).map_err(io::Error::other)?;
        let end = o
            .checked_add(buf.len())
            .ok_or_else(|| io::Error::other("offset overflow"))?;
        // Zeros past the end, as FileStorage reads a short file.
        buf.fill(0);
        if o < d.len() {
            let n = end.min(d.len()) - o;
            buf[..n].copy_from_slice(&d[o..o + n]);
        }
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut d = self.data.lock().unwrap();
        let o = usize::try_from(offset).map_err(io::Error::other)?;
        let end = o
            .checked_add(buf.len())
            .ok_or_else(|| io::Error::other("offset overflow"))?;
        if end > d.len() {
            return Err(io::Error::other("write past the end"));
        }
        d[o..end].copy_from_slice(buf);
        Ok(())
    }
    fn sync(&self) -> io::Result<()> {
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.data.lock().unwrap().len() as u64)
    }
    fn name(&self) -> &str {
        "fuzz-store"
    }
}

const STORE_SIZE: usize = 3 << 20;
const ORIGIN_SIZE: usize = 64 << 10;

struct Base {
    image: Vec<u8>,
    origin: Vec<u8>,
}

/// A store image with every kind of metadata in it, taken while the store is open (so the
/// journal holds batches that the checkpoint does not).
fn base() -> &'static Base {
    static B: OnceLock<Base> = OnceLock::new();
    B.get_or_init(|| {
        let st = Mem::new(vec![0; STORE_SIZE]);
        let or = Mem::new(vec![0; ORIGIN_SIZE]);
        Store::format_storage(&*st, &FormatOptions::default()).unwrap();
        let store = Store::open_storage(st.clone()).unwrap();
        let o = store.bind_origin_storage("origin-1", or.clone()).unwrap();
        let v = o.volume();
        for i in 0..8u64 {
            v.write(i * 4096, &[i as u8 + 1; 4096]).unwrap();
        }
        let s1 = o.create_snapshot(None, "first").unwrap();
        for i in 0..4u64 {
            v.write(i * 4096, &[0xa0 + i as u8; 4096]).unwrap();
        }
        let s2 = o.create_snapshot(Some(s1), "of first").unwrap();
        o.snapshot_volume(s2)
            .unwrap()
            .write(8192, &[0x55; 4096])
            .unwrap();
        v.flush().unwrap();
        drop((v, o, store));
        // Fold the journal into a checkpoint written to both superblock slots (what
        // `check --repair` does for a store with a bad slot 1), so that the image has a real
        // checkpoint, two superblocks, and a journal on top of them.
        st.data.lock().unwrap()[4096..4104].copy_from_slice(b"SNAPMVSB");
        let r = check_storage(&*st, true).unwrap();
        assert!(r.is_clean(), "{:?}", r.problems);
        let store = Store::open_storage(st.clone()).unwrap();
        let o = store.open_origin_storage("origin-1", or.clone()).unwrap();
        let v = o.volume();
        let s3 = o.create_snapshot(None, "third").unwrap();
        v.write(5 * 4096, &[0x77; 4096]).unwrap();
        o.delete_snapshot(s3).unwrap();
        v.write(6 * 4096, &[0x78; 4096]).unwrap();
        v.flush().unwrap();
        store.sync().unwrap();
        let image = st.data.lock().unwrap().clone();
        let origin = or.data.lock().unwrap().clone();
        drop((v, o, store));
        Base { image, origin }
    })
}

fn le(img: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(img[off..off + 8].try_into().unwrap())
}

fuzz_target!(|data: &[u8]| {
    let b = base();
    let mut img = b.image.clone();
    // The current superblock (highest generation) describes the areas (field offsets as in
    // docs/format.md).
    let sb = if le(&img, 4096 + 12) > le(&img, 12) && &img[4096..4104] == b"SNAPMVSB" {
        4096
    } else {
        0
    };
    let ckpt_off = le(&img, sb + 24) as usize;
    let ckpt_size = le(&img, sb + 32) as usize;
    let journal_off = le(&img, sb + 40) as usize;
    let ckpt_slot = (u32::from_le_bytes(img[sb + 72..sb + 76].try_into().unwrap()) & 1) as usize;
    let ckpt_len = le(&img, sb + 76) as usize;
    let ckpt_at = ckpt_off + ckpt_slot * ckpt_size;
    // Edits: [area, offset lo, offset hi, len, bytes...]
    let mut d = data;
    let mut truncate = None;
    while d.len() >= 4 {
        let (area, off, n) = (
            d[0],
            u16::from_le_bytes([d[1], d[2]]) as usize,
            d[3] as usize,
        );
        let bytes = &d[4..(4 + n).min(d.len())];
        d = &d[(4 + n).min(d.len())..];
        let (start, span) = match area % 6 {
            0 => (0, 4096),                                      // superblock slot 0
            1 => (4096, 4096),                                   // superblock slot 1
            2 => (ckpt_at, ckpt_len.max(1)),                     // current checkpoint
            3 => (journal_off, 64 << 10),                        // journal head
            4 => (ckpt_off + (1 - ckpt_slot) * ckpt_size, 4096), // other checkpoint area
            _ => {
                truncate = Some(off * 64);
                continue;
            }
        };
        for (i, &x) in bytes.iter().enumerate() {
            let at = start + (off + i) % span;
            img[at] ^= x;
        }
    }
    if let Some(t) = truncate {
        img.truncate(t.min(img.len()));
    }
    let clean = match check_storage(&*Mem::new(img.clone()), false) {
        Ok(r) => r.is_clean(),
        Err(_) => false,
    };
    if !clean {
        let repaired = Mem::new(img.clone());
        if let Ok(r) = check_storage(&*repaired, true) {
            if r.is_clean() {
                // What repair left must check clean again.
                let again = check_storage(&*repaired, false).expect("check after repair");
                assert!(
                    again.is_clean(),
                    "repair left problems: {:?}",
                    again.problems
                );
            }
        }
    }
    // Opening starts the store's background threads, which take a while to stop: only for
    // inputs whose first byte is odd.
    if clean && data.first().is_some_and(|b| b & 1 == 1) {
        if let Ok(store) = Store::open_storage(Mem::new(img)) {
            if let Ok(o) = store.open_origin_storage("origin-1", Mem::new(b.origin.clone())) {
                let mut buf = vec![0u8; 4096];
                let _ = o.volume().read(0, &mut buf);
                for s in o.snapshots() {
                    if let Ok(v) = o.snapshot_volume(s.tag) {
                        let _ = v.read(8192, &mut buf);
                    }
                }
            }
        }
    }
});
