//! Backups: `snapmv diff`, `export`, `export-diff` and `import-diff` against a running daemon.
//! Every image is compared byte for byte with what a vhost-user client reads from the
//! snapshot: a full export of S1 plus the diff S1→S2 applied gives S2, also after the origin
//! was rolled back and for a snapshot of a snapshot; a damaged diff or a wrong target is
//! refused without writing anything.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use serde_json::Value;
use snapmv_tests::blkio_client::{run1, Client, ClientOptions, NO_FLAGS};
use snapmv_tests::daemon::{scratch, sparse_file, Daemon};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 8 * MIB;
const CS: u64 = 4096;

fn write_chunk(c: &mut Client, chunk: u64, seed: u8) {
    let buf = c.mem();
    for (i, b) in buf[..CS as usize].iter_mut().enumerate() {
        *b = seed.wrapping_add((i % 251) as u8) | 1;
    }
    let p = c.ptr(0);
    let ret = run1(&mut c.queues[0], |q| {
        q.write(chunk * CS, p, CS as usize, 0, NO_FLAGS)
    })
    .unwrap();
    assert_eq!(ret, 0, "write chunk {chunk}");
}

/// Everything a vhost-user client reads from a socket.
fn read_volume(sock: &Path) -> Vec<u8> {
    let mut c = Client::connect_with(
        sock,
        &ClientOptions {
            read_only: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(c.capacity(), SIZE);
    let mut out = Vec::with_capacity(SIZE as usize);
    let step = MIB as usize;
    for off in (0..SIZE).step_by(step) {
        let p = c.ptr(0);
        let ret = run1(&mut c.queues[0], |q| q.read(off, p, step, 0, NO_FLAGS)).unwrap();
        assert_eq!(ret, 0, "read at {off}");
        out.extend_from_slice(&c.mem()[..step]);
    }
    out
}

fn json(d: &Daemon, args: &[&str]) -> Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let out = d.cli(&all);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("snapmv {all:?} printed {out:?}: {e}"))
}

fn snapshot(d: &Daemon, name: &str) -> u32 {
    json(d, &["snapshot", name])["tag"].as_u64().unwrap() as u32
}

/// Reads snapshot `tag` through a read-only vhost-user export of it.
fn read_snapshot(d: &Daemon, o: &str, c: &str, tag: u32) -> Vec<u8> {
    let name = format!("r{tag}");
    d.cli(&["create", &name, o, c, &tag.to_string(), "-r"]);
    let data = read_volume(&d.export_socket(&name));
    d.cli(&["remove", &name]);
    data
}

fn diff_chunks(v: &Value) -> Vec<u64> {
    v["extents"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|e| {
            let o = e["offset"].as_u64().unwrap();
            let l = e["length"].as_u64().unwrap();
            (o / CS)..(o + l) / CS
        })
        .collect()
}

fn assert_same(what: &str, got: &[u8], want: &[u8]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!("{what}: first difference at byte {i}");
    }
}

#[test]
fn full_and_incremental_backups_restore_byte_exact() {
    let dir = scratch("backup");
    let p = |n: &str| dir.path().join(n).display().to_string();
    let (o, c) = (p("disk.img"), p("store.cow"));
    sparse_file(Path::new(&o), SIZE);
    sparse_file(Path::new(&c), 64 * MIB);
    let d = Daemon::start(dir.path());
    d.cli(&["create", "vol", &o, &c, "-b", "-f"]);
    let mut client = Client::connect(&d.export_socket("vol")).unwrap();
    for ch in [0, 1, 2, 100, 1000, 2047] {
        write_chunk(&mut client, ch, ch as u8);
    }
    let s1 = snapshot(&d, "vol");
    for ch in [1, 5, 6, 7, 1000] {
        write_chunk(&mut client, ch, 77);
    }
    let s2 = snapshot(&d, "vol");

    // diff: exactly the chunks written between the snapshots.
    let v = json(&d, &["diff", "vol", &s1.to_string(), &s2.to_string()]);
    assert_eq!(v["chunk_size"], CS);
    assert_eq!(v["size"], SIZE);
    assert_eq!(diff_chunks(&v), vec![1, 5, 6, 7, 1000]);
    let v = json(&d, &["diff", "vol", &s2.to_string()]);
    assert!(diff_chunks(&v).is_empty(), "nothing written since s2: {v}");
    let text = d.cli(&["diff", "vol", &s1.to_string(), &s2.to_string()]);
    assert!(
        text.contains("5 extent(s)") || text.contains("3 extent(s)"),
        "{text}"
    );

    // Full export of s1: the bytes a vhost-user client reads, and sparse.
    let s1_data = read_snapshot(&d, &o, &c, s1);
    let s2_data = read_snapshot(&d, &o, &c, s2);
    let full = p("s1.raw");
    d.cli(&["export", "vol", &s1.to_string(), &full]);
    assert_same("export of s1", &std::fs::read(&full).unwrap(), &s1_data);
    let md = std::fs::metadata(&full).unwrap();
    assert!(
        md.blocks() * 512 < SIZE / 2,
        "export of s1 is not sparse: {} bytes allocated",
        md.blocks() * 512
    );
    // Without the final sync (and without the daemon's early writeback): the same bytes.
    let unsynced = p("s1-nosync.raw");
    d.cli(&["export", "vol", &s1.to_string(), &unsynced, "--no-sync"]);
    assert_same(
        "export --no-sync of s1",
        &std::fs::read(&unsynced).unwrap(),
        &s1_data,
    );
    // To stdout.
    let out = d.cli_output(&["export", "vol", &s1.to_string(), "-"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_same("export of s1 to stdout", &out.stdout, &s1_data);

    // Incremental: s1 + diff(s1→s2) = s2.
    let d12 = p("d12.diff");
    d.cli(&["export-diff", "vol", &s1.to_string(), &s2.to_string(), &d12]);
    let copy = p("copy.raw");
    std::fs::copy(&full, &copy).unwrap();
    d.cli(&["import-diff", &d12, &copy]);
    assert_same("s1 + diff(s1→s2)", &std::fs::read(&copy).unwrap(), &s2_data);

    // The copy now holds s2, not s1: the same diff is refused and nothing changes.
    let err = d.cli_fail(&["import-diff", &d12, &copy]);
    assert!(err.contains("does not hold snapshot"), "{err}");
    assert_same(
        "after a refused import",
        &std::fs::read(&copy).unwrap(),
        &s2_data,
    );

    // A damaged diff is refused before anything is written.
    let mut bad = std::fs::read(&d12).unwrap();
    let at = bad.len() - 100;
    bad[at] ^= 0xff;
    let badp = p("bad.diff");
    std::fs::write(&badp, &bad).unwrap();
    let copy1 = p("copy1.raw");
    std::fs::copy(&full, &copy1).unwrap();
    let out = d.cli_output(&["import-diff", &badp, &copy1]);
    assert_eq!(
        out.status.code(),
        Some(6),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_same(
        "after a damaged diff",
        &std::fs::read(&copy1).unwrap(),
        &s1_data,
    );
    // A truncated one too.
    std::fs::write(&badp, &std::fs::read(&d12).unwrap()[..bad.len() - 40]).unwrap();
    assert_eq!(
        d.cli_output(&["import-diff", &badp, &copy1]).status.code(),
        Some(6)
    );
    assert_same(
        "after a truncated diff",
        &std::fs::read(&copy1).unwrap(),
        &s1_data,
    );
    // A target of the wrong size.
    let small = p("small.raw");
    sparse_file(Path::new(&small), MIB);
    let err = d.cli_fail(&["import-diff", &d12, &small]);
    assert!(err.contains("bytes"), "{err}");

    // Across a rollback: the origin goes back to s1, then is written and snapshotted as s3.
    d.cli(&["rollback", "vol", &s1.to_string()]);
    for ch in [9, 1000, 1500] {
        write_chunk(&mut client, ch, 200);
    }
    let s3 = snapshot(&d, "vol");
    let s3_data = read_snapshot(&d, &o, &c, s3);
    let v = json(&d, &["diff", "vol", &s2.to_string(), &s3.to_string()]);
    let ch = diff_chunks(&v);
    for want in [1, 5, 6, 7, 9, 1000, 1500] {
        assert!(ch.contains(&want), "diff s2→s3 lacks chunk {want}: {ch:?}");
    }
    let d23 = p("d23.diff");
    d.cli(&["export-diff", "vol", &s2.to_string(), &s3.to_string(), &d23]);
    d.cli(&["import-diff", &d23, &copy]);
    assert_same(
        "s2 + diff(s2→s3) across a rollback",
        &std::fs::read(&copy).unwrap(),
        &s3_data,
    );
    let d13 = p("d13.diff");
    d.cli(&["export-diff", "vol", &s1.to_string(), &s3.to_string(), &d13]);
    d.cli(&["import-diff", &d13, &copy1]);
    assert_same(
        "s1 + diff(s1→s3)",
        &std::fs::read(&copy1).unwrap(),
        &s3_data,
    );

    // A snapshot of a snapshot, written through its own export.
    d.cli(&["create", "e2", &o, &c, &s2.to_string()]);
    let s4 = snapshot(&d, "e2");
    d.cli(&["create", "e4", &o, &c, &s4.to_string()]);
    {
        let mut c4 = Client::connect(&d.export_socket("e4")).unwrap();
        for ch in [3, 5, 2000] {
            write_chunk(&mut c4, ch, 99);
        }
    }
    d.cli(&["remove", "e4"]);
    let s4_data = read_snapshot(&d, &o, &c, s4);
    let v = json(&d, &["diff", "e2", &s2.to_string(), &s4.to_string()]);
    assert_eq!(diff_chunks(&v), vec![3, 5, 2000]);
    let d24 = p("d24.diff");
    d.cli(&["export-diff", "e2", &s2.to_string(), &s4.to_string(), &d24]);
    let copy2 = p("copy2.raw");
    d.cli(&["export", "e2", &s2.to_string(), &copy2]);
    assert_same("export of s2", &std::fs::read(&copy2).unwrap(), &s2_data);
    d.cli(&["import-diff", &d24, &copy2]);
    assert_same(
        "s2 + diff(s2→s4), s4 a snapshot of s2",
        &std::fs::read(&copy2).unwrap(),
        &s4_data,
    );
    // Through stdout and back.
    let out = d.cli_output(&["export-diff", "e2", &s2.to_string(), &s4.to_string(), "-"]);
    assert!(out.status.success());
    assert_eq!(
        out.stdout,
        std::fs::read(&d24).unwrap(),
        "export-diff to stdout"
    );

    // Errors: unknown tag, unknown export; the daemon keeps serving.
    let out = d.cli_output(&["export", "vol", "99", &p("x.raw")]);
    assert_eq!(
        out.status.code(),
        Some(4),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = d.cli_output(&["diff", "nope", "1"]);
    assert_eq!(out.status.code(), Some(4));
    assert_same(
        "s1 still readable",
        &read_snapshot(&d, &o, &c, s1),
        &s1_data,
    );
}
