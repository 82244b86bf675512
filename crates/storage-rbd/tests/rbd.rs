//! RbdStorage against the test cluster: I/O round trips, the crash-contract properties,
//! exclusive ownership, takeover with fencing, graceful handover, and open errors.

mod common;

use common::{cluster, pattern, spawn_helper, Image};
use snapmv_engine::Storage;
use snapmv_storage_rbd::{is_fenced, rbd_error, RbdError, RbdStorage};
use std::io::{self, BufRead, BufReader, IoSlice, IoSliceMut};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

fn read(st: &RbdStorage, offset: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0xeeu8; len];
    st.read_at(&mut b, offset).unwrap();
    b
}

#[test]
fn round_trips_at_unaligned_offsets_and_across_objects() {
    let Some(c) = cluster("round_trips_at_unaligned_offsets_and_across_objects") else {
        return;
    };
    // 16 MiB in 4 MiB objects (the default): object boundaries at 4, 8 and 12 MiB.
    let img = Image::create(c, "io", "16M", &[]);
    let st = RbdStorage::open(&img.locator()).unwrap();
    assert_eq!(st.len().unwrap(), 16 * MIB);
    assert_eq!(
        st.name(),
        img.spec(),
        "no options (conf path, secrets) in the name"
    );
    assert!(!st.image_id().is_empty());
    // Never written: zeros.
    assert_eq!(read(&st, 3 * MIB + 5, 1000), vec![0u8; 1000]);

    // Unaligned offset and length inside one object.
    let a = pattern(1, 12_345, 777);
    st.write_at(&a, 12_345).unwrap();
    // Across the 4 MiB object boundary.
    let b_off = 4 * MIB - 1_000;
    let b = pattern(2, b_off, 5_001);
    st.write_at(&b, b_off).unwrap();
    // Vectored, three odd pieces across the 8 MiB boundary.
    let v_off = 8 * MIB - 3;
    let v = pattern(3, v_off, 100 + 4096 + 7);
    st.write_vectored_at(
        &[
            IoSlice::new(&v[..100]),
            IoSlice::new(&v[100..4196]),
            IoSlice::new(&v[4196..]),
        ],
        v_off,
    )
    .unwrap();
    st.sync().unwrap();

    assert_eq!(read(&st, 12_345, 777), a);
    assert_eq!(read(&st, b_off, 5_001), b);
    // Neighbours untouched.
    assert_eq!(read(&st, 12_344, 1), [0]);
    assert_eq!(read(&st, 12_345 + 777, 1), [0]);
    // Vectored read with a different split than the write.
    let (mut x, mut y) = (vec![0u8; 2], vec![0u8; v.len() - 2]);
    st.read_vectored_at(
        &mut [IoSliceMut::new(&mut x), IoSliceMut::new(&mut y)],
        v_off,
    )
    .unwrap();
    assert_eq!([x, y].concat(), v);

    // The last bytes, and a read running past the end (zeros there, like a short file).
    let end = pattern(4, 16 * MIB - 10, 10);
    st.write_at(&end, 16 * MIB - 10).unwrap();
    let tail = read(&st, 16 * MIB - 10, 30);
    assert_eq!(&tail[..10], &end[..]);
    assert_eq!(&tail[10..], &[0u8; 20]);
    assert_eq!(read(&st, 16 * MIB + 4096, 8), [0u8; 8]);
    // Writing past the end fails, naming the image.
    let e = st.write_at(&[1u8; 8], 16 * MIB - 4).unwrap_err();
    assert!(e.to_string().contains(&img.spec()), "{e}");

    // Reopened (the lock was released by the drop): the same data, the same boot id.
    let boot = st.boot_id();
    assert_ne!(
        boot,
        snapmv_engine::current_boot_id(),
        "not the host's boot id"
    );
    drop(st);
    let st = RbdStorage::open(&img.locator()).unwrap();
    assert_eq!(st.boot_id(), boot, "constant per image");
    assert_eq!(read(&st, 12_345, 777), a);
    assert_eq!(read(&st, b_off, 5_001), b);
    assert_eq!(read(&st, v_off, v.len()), v);
}

#[test]
fn second_open_is_refused_while_owned() {
    let Some(c) = cluster("second_open_is_refused_while_owned") else {
        return;
    };
    let img = Image::create(c, "lock", "8M", &[]);
    let first = RbdStorage::open(&img.locator()).unwrap();
    assert!(first.is_owner().unwrap());
    first.write_at(b"first", 0).unwrap();
    let t = Instant::now();
    let e = RbdStorage::open(&img.locator()).unwrap_err();
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "refused at once: {:?}",
        t.elapsed()
    );
    assert_eq!(e.kind(), io::ErrorKind::ResourceBusy, "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains(&format!("{} is locked by another owner", img.spec())),
        "{msg}"
    );
    let Some(RbdError::Locked { owners, .. }) = rbd_error(&e) else {
        panic!("not Locked: {e:?}");
    };
    assert!(
        owners
            .iter()
            .any(|o| first.client_address().contains(o.as_str())
                || o.contains(first.client_address())),
        "owners {owners:?} vs the first handle {}",
        first.client_address()
    );
    // The refused opener did not take anything: the first still owns and writes.
    assert!(first.is_owner().unwrap());
    first.write_at(b"still", 4096).unwrap();
    // Closing hands it on without waiting for any timeout.
    drop(first);
    let t = Instant::now();
    let second = RbdStorage::open(&img.locator()).unwrap();
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    assert_eq!(read(&second, 0, 5), b"first");
    assert_eq!(read(&second, 4096, 5), b"still");
}

/// Not a test by itself: the child of `takeover_after_the_owner_was_killed` (does nothing
/// without SNAPMV_RBD_CHILD_LOCATOR). Opens the image, writes, reports, and waits to be killed.
#[test]
fn helper_child_owner() {
    let Ok(loc) = std::env::var("SNAPMV_RBD_CHILD_LOCATOR") else {
        return;
    };
    let st = RbdStorage::open(&loc).unwrap();
    st.write_at(&pattern(9, 0, 8192), 0).unwrap();
    println!("OWNER {}", st.client_address());
    std::thread::sleep(Duration::from_secs(600));
}

/// Starts `helper_child_owner` on `img`; returns it and its client address once it owns it.
fn child_owner(img: &Image) -> (common::KillOnDrop, String) {
    let mut child = common::KillOnDrop(spawn_helper(
        "helper_child_owner",
        &[("SNAPMV_RBD_CHILD_LOCATOR", img.locator())],
    ));
    let mut lines = BufReader::new(child.0.stdout.take().unwrap()).lines();
    loop {
        let line = lines
            .next()
            .expect("the child exited before owning the image")
            .unwrap();
        // libtest prints "test helper_child_owner ... " before the test's own output.
        if let Some((_, a)) = line.split_once("OWNER ") {
            return (child, a.trim().to_string());
        }
    }
}

#[test]
fn takeover_after_the_owner_was_killed() {
    let Some(c) = cluster("takeover_after_the_owner_was_killed") else {
        return;
    };
    let img = Image::create(c, "kill", "8M", &[]);
    let (mut child, addr) = child_owner(&img);
    // While it lives, a plain open is refused.
    let e = RbdStorage::open(&img.locator()).unwrap_err();
    assert!(
        matches!(rbd_error(&e), Some(RbdError::Locked { .. })),
        "{e}"
    );
    child.0.kill().unwrap(); // SIGKILL
    child.0.wait().unwrap();
    let killed = Instant::now();
    let st = RbdStorage::open_takeover(&img.locator()).unwrap();
    let took = killed.elapsed();
    assert!(took < Duration::from_secs(15), "took over in {took:?}");
    assert_eq!(st.fenced_owners().len(), 1, "{:?}", st.fenced_owners());
    let fenced = &st.fenced_owners()[0];
    assert!(
        addr.contains(fenced.as_str()) || fenced.contains(&addr),
        "{fenced} vs {addr}"
    );
    let bl = c.blocklist();
    assert!(
        bl.contains(fenced.as_str()),
        "{fenced} not in the blocklist:\n{bl}"
    );
    // Its acknowledged writes are there; the new owner writes.
    assert_eq!(read(&st, 0, 8192), pattern(9, 0, 8192));
    st.write_at(b"new owner", 0).unwrap();
    st.sync().unwrap();
    eprintln!("takeover after SIGKILL: {took:?}");
}

/// Without the explicit takeover, a dead owner's lock is broken by librbd (which fences it too)
/// only once the OSD has timed out its watch: a plain open waits ~30 s, then succeeds.
#[test]
fn plain_open_after_the_owner_was_killed_waits_for_its_watch_to_time_out() {
    let Some(c) = cluster("plain_open_after_the_owner_was_killed_waits_for_its_watch_to_time_out")
    else {
        return;
    };
    let img = Image::create(c, "killwait", "8M", &[]);
    let (mut child, addr) = child_owner(&img);
    child.0.kill().unwrap();
    child.0.wait().unwrap();
    let killed = Instant::now();
    let st = RbdStorage::open(&img.locator()).unwrap();
    let took = killed.elapsed();
    assert!(
        took > Duration::from_secs(10) && took < Duration::from_secs(120),
        "open after the owner's SIGKILL took {took:?} (osd_client_watch_timeout is 30 s)"
    );
    assert!(st.fenced_owners().is_empty(), "not an explicit takeover");
    assert!(
        c.blocklist().contains(addr.as_str()),
        "librbd fenced {addr} when breaking its lock"
    );
    assert_eq!(read(&st, 0, 8192), pattern(9, 0, 8192));
    eprintln!("plain open after SIGKILL: {took:?}");
}

#[test]
fn takeover_fences_a_live_owner() {
    let Some(c) = cluster("takeover_fences_a_live_owner") else {
        return;
    };
    let img = Image::create(c, "fence", "8M", &[]);
    let old = RbdStorage::open(&img.locator()).unwrap();
    old.write_at(b"before", 0).unwrap();
    let new = RbdStorage::open_takeover(&img.locator()).unwrap();
    assert_eq!(new.fenced_owners().len(), 1);
    assert!(new.is_owner().unwrap());
    // The old owner, still alive (a hung daemon waking up), can no longer write anything.
    let e = old.write_at(b"zombie", 4096).unwrap_err();
    assert!(is_fenced(&e), "{e:?}");
    assert!(
        e.to_string().contains(&img.spec()) && e.to_string().contains("blocklisted"),
        "{e}"
    );
    assert!(old.sync().is_err() || old.write_at(b"zombie", 4096).is_err());
    let e = old
        .write_vectored_at(&[IoSlice::new(b"zom"), IoSlice::new(b"bie")], 8192)
        .unwrap_err();
    assert!(is_fenced(&e), "{e:?}");
    // None of its writes landed; the new owner's do.
    assert_eq!(read(&new, 0, 6), b"before");
    assert_eq!(read(&new, 4096, 6), [0u8; 6]);
    assert_eq!(read(&new, 8192, 6), [0u8; 6]);
    new.write_at(b"after", 4096).unwrap();
    assert_eq!(read(&new, 4096, 5), b"after");
    let t = Instant::now();
    drop(old);
    eprintln!("closing a fenced handle: {:?}", t.elapsed());
    assert_eq!(read(&new, 4096, 5), b"after");
}

#[test]
fn graceful_release_hands_over_without_fencing() {
    let Some(c) = cluster("graceful_release_hands_over_without_fencing") else {
        return;
    };
    let img = Image::create(c, "handover", "8M", &[]);
    let a = RbdStorage::open(&img.locator()).unwrap();
    a.write_at(b"from a", 100).unwrap();
    a.release().unwrap();
    assert!(!a.is_owner().unwrap());
    let t = Instant::now();
    let b = RbdStorage::open(&img.locator()).unwrap();
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    assert!(b.fenced_owners().is_empty());
    assert_eq!(read(&b, 100, 6), b"from a");
    let e = a.write_at(b"late", 100).unwrap_err();
    assert!(
        matches!(rbd_error(&e), Some(RbdError::NotOwner { .. })),
        "{e:?}"
    );
    assert!(!c.blocklist().contains(a.client_address()));
    assert_eq!(read(&b, 100, 6), b"from a");
}

#[test]
fn open_errors_name_the_image_and_the_cause() {
    let Some(c) = cluster("open_errors_name_the_image_and_the_cause") else {
        return;
    };
    let conf = c.conf.display().to_string();
    let open_err = |loc: &str| RbdStorage::open(loc).unwrap_err();

    let e = open_err(&format!(
        "rbd:{}/no-such-image-{}:conf={conf}",
        c.pool,
        std::process::id()
    ));
    assert_eq!(e.kind(), io::ErrorKind::NotFound, "{e}");
    assert!(
        e.to_string().contains("no-such-image") && e.to_string().contains("does not exist"),
        "{e}"
    );
    let e = open_err(&format!("rbd:no-such-pool/img:conf={conf}"));
    assert!(
        e.to_string().contains("pool no-such-pool does not exist"),
        "{e}"
    );
    let e = open_err("rbd:p/i:conf=/nonexistent/ceph.conf");
    assert!(
        e.to_string()
            .contains("reading the Ceph configuration /nonexistent/ceph.conf"),
        "{e}"
    );
    let e = open_err(&format!("rbd:{}/i:conf={conf}:no_such_option=1", c.pool));
    assert!(
        e.to_string()
            .contains("unknown Ceph option \"no_such_option\""),
        "{e}"
    );
    let e = open_err("rbd:p/i@snap");
    assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    assert!(matches!(rbd_error(&e), Some(RbdError::Locator(_))), "{e:?}");

    // An image that cannot be fenced.
    let plain = Image::create(c, "nolock", "8M", &["--image-feature", "layering"]);
    let e = open_err(&plain.locator());
    assert!(
        matches!(rbd_error(&e), Some(RbdError::NoExclusiveLock { .. })),
        "{e:?}"
    );
    assert!(e.to_string().contains(&plain.spec()), "{e}");

    // An image whose configuration turns librbd's cache back on.
    let cached = Image::create(c, "cached", "8M", &[]);
    let spec = format!("{}/{}", c.pool, cached.name);
    c.cli(
        "rbd",
        &["config", "image", "set", &spec, "rbd_cache", "true"],
    )
    .unwrap();
    let e = open_err(&cached.locator());
    let Some(RbdError::CacheOn { origin, .. }) = rbd_error(&e) else {
        panic!("not CacheOn: {e:?}");
    };
    assert_eq!(*origin, "image", "{e}");
    c.cli("rbd", &["config", "image", "remove", &spec, "rbd_cache"])
        .unwrap();
    drop(RbdStorage::open(&cached.locator()).unwrap());
}

/// Figures for docs/ceph.md: N 4 KiB writes each followed by a flush, on one image.
/// `SNAPMV_RBD_BENCH_OPS` (default 200); run with `--release --nocapture`.
#[test]
fn write_flush_timing() {
    let Some(c) = cluster("write_flush_timing") else {
        return;
    };
    let n: u64 = std::env::var("SNAPMV_RBD_BENCH_OPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let img = Image::create(c, "bench", "64M", &[]);
    let st = RbdStorage::open(&img.locator()).unwrap();
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut offs = Vec::new();
    let t = Instant::now();
    for i in 0..n {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let off = (rng % (64 * MIB / 4096)) * 4096;
        st.write_at(&pattern(i as u8, off, 4096), off).unwrap();
        st.sync().unwrap();
        offs.push((i, off));
    }
    let el = t.elapsed();
    eprintln!(
        "RBD write_flush_timing: {n} x (4 KiB write + rbd_flush) in {:.2} s: {:.0} per s, {:.2} ms each",
        el.as_secs_f64(),
        n as f64 / el.as_secs_f64(),
        el.as_secs_f64() * 1000.0 / n as f64
    );
    // The last write to each offset is what reads back.
    let mut last = std::collections::BTreeMap::new();
    for (i, off) in offs {
        last.insert(off, i);
    }
    for (off, i) in last {
        assert_eq!(
            read(&st, off, 4096),
            pattern(i as u8, off, 4096),
            "at {off}"
        );
    }
}

/// One handle used from several threads at once (the engine's writers, committer and worker
/// share their storages): plain and vectored writes and reads interleave without mixing.
#[test]
fn one_handle_from_many_threads() {
    let Some(c) = cluster("one_handle_from_many_threads") else {
        return;
    };
    let img = Image::create(c, "threads", "16M", &[]);
    let st = RbdStorage::open(&img.locator()).unwrap();
    let region = 4 * MIB;
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let st = &st;
            s.spawn(move || {
                let base = t * region;
                for i in 0..40u64 {
                    // Overlapping object boundaries within the thread's region.
                    let off = base + (i * 99_991) % (region - 20_000);
                    let data = pattern((t * 40 + i) as u8, off, 10_000 + i as usize);
                    if i % 2 == 0 {
                        st.write_at(&data, off).unwrap();
                    } else {
                        let (a, b) = data.split_at(777);
                        st.write_vectored_at(&[IoSlice::new(a), IoSlice::new(b)], off)
                            .unwrap();
                    }
                    assert_eq!(read(st, off, data.len()), data, "thread {t} write {i}");
                }
            });
        }
    });
    st.sync().unwrap();
}

#[test]
fn identify_names_the_image_not_the_spelling_and_owners_are_listed() {
    let Some(c) = cluster("identify_names_the_image_not_the_spelling") else {
        return;
    };
    let a = Image::create(c, "ident-a", "8M", &[]);
    let b = Image::create(c, "ident-b", "8M", &[]);
    let as_admin = format!("rbd:{}/{}:conf={}", c.pool, a.name, c.conf.display());
    let ia = snapmv_storage_rbd::identify(&a.locator()).unwrap();
    assert_eq!(ia, snapmv_storage_rbd::identify(&as_admin).unwrap());
    assert_ne!(ia, snapmv_storage_rbd::identify(&b.locator()).unwrap());
    assert!(
        !ia.fsid.is_empty() && ia.pool_id >= 0 && !ia.image_id.is_empty(),
        "{ia:?}"
    );
    let missing = format!(
        "rbd:{}/no-such-image-{}:conf={}",
        c.pool,
        std::process::id(),
        c.conf.display()
    );
    let e = snapmv_storage_rbd::identify(&missing).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::NotFound, "{e}");

    // Nobody owns a fresh image; an open handle does, and identify does not disturb it.
    assert!(snapmv_storage_rbd::lock_owners_of(&a.locator())
        .unwrap()
        .is_empty());
    let st = RbdStorage::open(&a.locator()).unwrap();
    assert_eq!(
        snapmv_storage_rbd::lock_owners_of(&as_admin).unwrap(),
        vec![st.client_address().to_string()]
    );
    assert_eq!(snapmv_storage_rbd::identify(&a.locator()).unwrap(), ia);
    st.write_at(b"still mine", 0).unwrap();
    assert!(st.is_owner().unwrap());
}
