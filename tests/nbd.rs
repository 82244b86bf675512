//! NBD exports (`--nbd`) against real clients — `qemu-img convert` over `nbd+unix://`,
//! `nbdinfo --map` for `base:allocation` and `snapmv:changed:TAG` — compared byte for byte with
//! what a vhost-user client reads; and hostile raw clients (bad magic, oversize requests, reads
//! past the end, writes to a read-only export, disconnects mid-request): each gets a clean
//! error or a closed connection, and the daemon keeps serving.
//!
//! The tools come from `qemu/setup.sh` (qemu-utils, libnbd-bin); without them the tests that
//! need them skip loudly (and fail when `CI=true`).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;

use snapmv_tests::blkio_client::{run1, Client, ClientOptions, NO_FLAGS};
use snapmv_tests::daemon::{scratch, sparse_file, Daemon};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 8 * MIB;
const CS: u64 = 4096;

fn have(tool: &str) -> bool {
    let ok = Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{tool} is missing (run qemu/setup.sh)"
        );
        eprintln!("SKIPPING: {tool} is missing (run qemu/setup.sh)");
    }
    ok
}

fn write_chunk(c: &mut Client, chunk: u64, seed: u8) {
    let buf = c.mem();
    for (i, b) in buf[..CS as usize].iter_mut().enumerate() {
        *b = seed.wrapping_add((i % 253) as u8) | 1;
    }
    let p = c.ptr(0);
    let ret = run1(&mut c.queues[0], |q| {
        q.write(chunk * CS, p, CS as usize, 0, NO_FLAGS)
    })
    .unwrap();
    assert_eq!(ret, 0);
}

fn read_volume(sock: &Path) -> Vec<u8> {
    let mut c = Client::connect_with(
        sock,
        &ClientOptions {
            read_only: true,
            ..Default::default()
        },
    )
    .unwrap();
    let mut out = Vec::new();
    for off in (0..SIZE).step_by(MIB as usize) {
        let p = c.ptr(0);
        let ret = run1(&mut c.queues[0], |q| {
            q.read(off, p, MIB as usize, 0, NO_FLAGS)
        })
        .unwrap();
        assert_eq!(ret, 0);
        out.extend_from_slice(&c.mem()[..MIB as usize]);
    }
    out
}

fn uri(d: &Daemon, name: &str) -> String {
    format!(
        "nbd+unix:///{name}?socket={}",
        d.export_socket(name).display()
    )
}

struct Setup {
    _dir: tempfile::TempDir,
    d: Daemon,
    o: String,
    c: String,
    s1: u32,
    p: std::path::PathBuf,
}

/// An origin with data in chunks 0-3 and 1000; snapshot s1; then chunks 2 and 1500 written.
fn setup(name: &str) -> Setup {
    let dir = scratch(name);
    let o = dir.path().join("disk.img").display().to_string();
    let c = dir.path().join("store.cow").display().to_string();
    sparse_file(Path::new(&o), SIZE);
    sparse_file(Path::new(&c), 64 * MIB);
    let d = Daemon::start(dir.path());
    d.cli(&["create", "vol", &o, &c, "-b", "-f"]);
    let mut cl = Client::connect(&d.export_socket("vol")).unwrap();
    for ch in [0, 1, 2, 3, 1000] {
        write_chunk(&mut cl, ch, ch as u8);
    }
    let out = d.cli(&["--json", "snapshot", "vol"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let s1 = v["tag"].as_u64().unwrap() as u32;
    for ch in [2, 1500] {
        write_chunk(&mut cl, ch, 50);
    }
    drop(cl);
    Setup {
        p: dir.path().to_path_buf(),
        _dir: dir,
        d,
        o,
        c,
        s1,
    }
}

#[test]
fn real_clients_read_what_vhost_user_reads() {
    if !have("qemu-img") {
        return;
    }
    let mut s = setup("nbd");
    let t0 = s.s1.to_string();
    {
        // NBD exports come back after a restart, as NBD.
        let (d, o, c) = (&s.d, &s.o, &s.c);
        d.cli(&["create", "early", o, c, &t0, "-r", "--nbd"]);
    }
    s.d.restart();
    {
        let out = s.p.join("early.raw");
        let st = Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw", &uri(&s.d, "early")])
            .arg(&out)
            .status()
            .unwrap();
        assert!(st.success(), "NBD export restored after a restart");
        s.d.cli(&["remove", "early"]);
    }
    let (d, o, c) = (&s.d, &s.o, &s.c);
    let t = s.s1.to_string();
    // One export per version: read it over vhost-user, then serve it over NBD.
    d.cli(&["create", "s1v", o, c, &t, "-r"]);
    let want = read_volume(&d.export_socket("s1v"));
    d.cli(&["remove", "s1v"]);
    d.cli(&["create", "s1n", o, c, &t, "-r", "--nbd"]);
    let out = s.p.join("out.raw");
    let st = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw", &uri(d, "s1n")])
        .arg(&out)
        .status()
        .unwrap();
    assert!(st.success(), "qemu-img convert");
    let got = std::fs::read(&out).unwrap();
    assert_eq!(got.len(), want.len());
    assert!(
        got == want,
        "qemu-img convert over NBD differs from the vhost-user read"
    );

    // The origin over NBD (read-write) too, after the snapshot: its own bytes.
    d.cli(&["remove", "vol"]);
    d.cli(&["create", "vol", o, c]);
    let want_o = read_volume(&d.export_socket("vol"));
    d.cli(&["remove", "vol"]);
    d.cli(&["create", "vol", o, c, "--nbd"]);
    let out2 = s.p.join("out2.raw");
    let st = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw", &uri(d, "vol")])
        .arg(&out2)
        .status()
        .unwrap();
    assert!(st.success());
    assert!(std::fs::read(&out2).unwrap() == want_o, "origin over NBD");

    // Listed as exports, connected or not.
    let l = d.cli(&["exports"]);
    assert!(l.contains("s1n"), "{l}");

    if have("nbdinfo") {
        // base:allocation: chunks 0-3 and 1000 hold data; the rest reads as zeroes (holes).
        let m = Command::new("nbdinfo")
            .args(["--map", &uri(d, "s1n")])
            .output()
            .unwrap();
        assert!(m.status.success(), "{}", String::from_utf8_lossy(&m.stderr));
        let map = parse_map(&String::from_utf8_lossy(&m.stdout));
        assert_eq!(
            map,
            vec![
                (0, 4 * CS, 0),
                (4 * CS, 996 * CS, 3),
                (1000 * CS, CS, 0),
                (1001 * CS, SIZE - 1001 * CS, 3)
            ],
            "base:allocation of s1"
        );
        // snapmv:changed:S1 on the origin: chunks 2 and 1500 changed since s1.
        let m = Command::new("nbdinfo")
            .args([&format!("--map=snapmv:changed:{t}"), &uri(d, "vol")])
            .output()
            .unwrap();
        assert!(m.status.success(), "{}", String::from_utf8_lossy(&m.stderr));
        let map = parse_map(&String::from_utf8_lossy(&m.stdout));
        let changed: Vec<(u64, u64)> = map
            .iter()
            .filter(|(_, _, f)| *f == 1)
            .map(|(o, l, _)| (*o, *l))
            .collect();
        assert_eq!(changed, vec![(2 * CS, CS), (1500 * CS, CS)], "{map:?}");
    }
}

/// `nbdinfo --map` lines: `offset length type description`.
fn parse_map(s: &str) -> Vec<(u64, u64, u32)> {
    s.lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            Some((
                w.next()?.parse().ok()?,
                w.next()?.parse().ok()?,
                w.next()?.parse().ok()?,
            ))
        })
        .collect()
}

// ---- a raw client -------------------------------------------------------------------------

const IHAVEOPT: u64 = 0x4948_4156_454f_5054;

fn opt(s: &mut UnixStream, o: u32, data: &[u8]) {
    let mut b = IHAVEOPT.to_be_bytes().to_vec();
    b.extend_from_slice(&o.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    s.write_all(&b).unwrap();
}

/// Reads option replies until ACK or an error; returns the reply types.
fn replies(s: &mut UnixStream) -> Vec<u32> {
    let mut out = Vec::new();
    loop {
        let mut h = [0u8; 20];
        s.read_exact(&mut h).unwrap();
        let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let mut d = vec![0u8; len as usize];
        s.read_exact(&mut d).unwrap();
        out.push(kind);
        if kind == 1 || kind & 0x8000_0000 != 0 {
            return out;
        }
    }
}

/// Connects through the handshake (structured replies, base:allocation, GO).
fn connect(sock: &Path, name: &str) -> UnixStream {
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .unwrap();
    let mut g = [0u8; 18];
    s.read_exact(&mut g).unwrap();
    assert_eq!(&g[..8], b"NBDMAGIC");
    s.write_all(&3u32.to_be_bytes()).unwrap();
    opt(&mut s, 8, &[]);
    assert_eq!(replies(&mut s), vec![1]);
    let mut m = (name.len() as u32).to_be_bytes().to_vec();
    m.extend_from_slice(name.as_bytes());
    m.extend_from_slice(&1u32.to_be_bytes());
    m.extend_from_slice(&15u32.to_be_bytes());
    m.extend_from_slice(b"base:allocation");
    opt(&mut s, 10, &m);
    assert_eq!(replies(&mut s), vec![4, 1]);
    let mut g = (name.len() as u32).to_be_bytes().to_vec();
    g.extend_from_slice(name.as_bytes());
    g.extend_from_slice(&0u16.to_be_bytes());
    opt(&mut s, 7, &g);
    let r = replies(&mut s);
    assert_eq!(r.last(), Some(&1), "GO: {r:?}");
    s
}

fn request(s: &mut UnixStream, kind: u16, cookie: u64, off: u64, len: u32) {
    let mut b = 0x2560_9513u32.to_be_bytes().to_vec();
    b.extend_from_slice(&0u16.to_be_bytes());
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(&cookie.to_be_bytes());
    b.extend_from_slice(&off.to_be_bytes());
    b.extend_from_slice(&len.to_be_bytes());
    s.write_all(&b).unwrap();
}

/// Reads structured reply chunks for one request; returns (error, data).
fn reply(s: &mut UnixStream, cookie: u64) -> (u32, Vec<u8>) {
    let mut data = Vec::new();
    let mut err = 0;
    loop {
        let mut h = [0u8; 20];
        s.read_exact(&mut h).unwrap();
        assert_eq!(u32::from_be_bytes(h[0..4].try_into().unwrap()), 0x668e_33ef);
        let flags = u16::from_be_bytes(h[4..6].try_into().unwrap());
        let kind = u16::from_be_bytes(h[6..8].try_into().unwrap());
        assert_eq!(u64::from_be_bytes(h[8..16].try_into().unwrap()), cookie);
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let mut p = vec![0u8; len as usize];
        s.read_exact(&mut p).unwrap();
        match kind {
            1 => data.extend_from_slice(&p[8..]),
            0x8001 => err = u32::from_be_bytes(p[0..4].try_into().unwrap()),
            _ => {}
        }
        if flags & 1 != 0 {
            return (err, data);
        }
    }
}

fn closed(s: &mut UnixStream) -> bool {
    let mut b = [0u8; 1];
    matches!(s.read(&mut b), Ok(0) | Err(_))
}

#[test]
fn hostile_clients_get_clean_errors() {
    let s = setup("nbdh");
    let (d, o, c) = (&s.d, &s.o, &s.c);
    let t = s.s1.to_string();
    // One export per version: read it over vhost-user, then serve it over NBD.
    d.cli(&["create", "s1v", o, c, &t, "-r"]);
    let want = read_volume(&d.export_socket("s1v"));
    d.cli(&["remove", "s1v"]);
    d.cli(&["create", "s1n", o, c, &t, "-r", "--nbd"]);
    let sock = d.export_socket("s1n");

    // Unknown client flags: closed.
    let mut x = UnixStream::connect(&sock).unwrap();
    let mut g = [0u8; 18];
    x.read_exact(&mut g).unwrap();
    x.write_all(&0xffu32.to_be_bytes()).unwrap();
    assert!(closed(&mut x));
    // Bad option magic: closed.
    let mut x = UnixStream::connect(&sock).unwrap();
    x.read_exact(&mut g).unwrap();
    x.write_all(&1u32.to_be_bytes()).unwrap();
    x.write_all(&[0x55; 16]).unwrap();
    assert!(closed(&mut x));
    // An oversize option: refused, closed.
    let mut x = UnixStream::connect(&sock).unwrap();
    x.read_exact(&mut g).unwrap();
    x.write_all(&1u32.to_be_bytes()).unwrap();
    let mut b = IHAVEOPT.to_be_bytes().to_vec();
    b.extend_from_slice(&7u32.to_be_bytes());
    b.extend_from_slice(&u32::MAX.to_be_bytes());
    x.write_all(&b).unwrap();
    let mut h = [0u8; 20];
    x.read_exact(&mut h).unwrap();
    assert_eq!(
        u32::from_be_bytes(h[12..16].try_into().unwrap()),
        0x8000_0009
    );
    // An unknown export: an error reply, the option loop goes on.
    let mut x = UnixStream::connect(&sock).unwrap();
    x.read_exact(&mut g).unwrap();
    x.write_all(&1u32.to_be_bytes()).unwrap();
    let mut gname = 4u32.to_be_bytes().to_vec();
    gname.extend_from_slice(b"nope");
    gname.extend_from_slice(&0u16.to_be_bytes());
    opt(&mut x, 7, &gname);
    assert_eq!(replies(&mut x), vec![0x8000_0006]);
    opt(&mut x, 2, &[]);

    // In transmission: reads past the end, oversize, unaligned, writes to a read-only
    // export, an unknown command: each an error reply, the connection stays usable.
    let mut x = connect(&sock, "s1n");
    request(&mut x, 0, 1, SIZE - 512, 1024);
    assert_eq!(reply(&mut x, 1).0, 22, "read past the end: EINVAL");
    request(&mut x, 0, 2, u64::MAX - 511, 512);
    assert_eq!(reply(&mut x, 2).0, 22, "offset overflow: EINVAL");
    request(&mut x, 0, 3, 0, 64 << 20);
    assert_eq!(reply(&mut x, 3).0, 75, "oversize read: EOVERFLOW");
    request(&mut x, 0, 4, 100, 512);
    assert_eq!(reply(&mut x, 4).0, 22, "unaligned read: EINVAL");
    request(&mut x, 1, 5, 0, 512);
    x.write_all(&[7u8; 512]).unwrap();
    assert_eq!(reply(&mut x, 5).0, 1, "write to a read-only export: EPERM");
    request(&mut x, 99, 6, 0, 0);
    assert_eq!(reply(&mut x, 6).0, 22, "unknown command: EINVAL");
    request(&mut x, 7, 7, SIZE, 512);
    assert_eq!(reply(&mut x, 7).0, 22, "block status past the end");
    request(&mut x, 0, 8, 0, 1 << 20);
    let (e, data) = reply(&mut x, 8);
    assert_eq!(e, 0);
    assert!(
        data[..] == want[..1 << 20],
        "a good read after the bad ones"
    );
    // A bad request magic: the stream cannot be followed; closed.
    x.write_all(&[0u8; 28]).unwrap();
    assert!(closed(&mut x));
    // An oversize write: its payload cannot be skipped safely; an error, then closed.
    let mut x = connect(&sock, "s1n");
    request(&mut x, 1, 9, 0, 0xffff_fe00);
    assert_eq!(reply(&mut x, 9).0, 75);
    assert!(closed(&mut x));
    // Disconnects mid-request and mid-handshake.
    let mut x = connect(&sock, "s1n");
    x.write_all(&0x2560_9513u32.to_be_bytes()).unwrap();
    drop(x);
    let mut x = connect(&sock, "s1n");
    request(&mut x, 0, 10, 0, 1 << 20);
    drop(x);
    let mut x = UnixStream::connect(&sock).unwrap();
    x.write_all(&[1]).unwrap();
    drop(x);

    // The daemon keeps serving, every export.
    let mut x = connect(&sock, "s1n");
    request(&mut x, 0, 11, SIZE - (1 << 20), 1 << 20);
    let (e, data) = reply(&mut x, 11);
    assert_eq!(e, 0);
    assert!(data[..] == want[want.len() - (1 << 20)..]);
    request(&mut x, 2, 12, 0, 0);
    assert!(closed(&mut x), "NBD_CMD_DISC closes");
    let v = Client::connect(&d.export_socket("vol")).unwrap();
    assert_eq!(v.capacity(), SIZE, "the vhost-user export still serves");
    drop(v);

    // A writable NBD export: a write lands, reads back, and reaches the other protocol.
    d.cli(&["remove", "vol"]);
    d.cli(&["create", "vol", o, c, "--nbd"]);
    let mut x = connect(&d.export_socket("vol"), "vol");
    let mut b = 0x2560_9513u32.to_be_bytes().to_vec();
    b.extend_from_slice(&1u16.to_be_bytes()); // FUA
    b.extend_from_slice(&1u16.to_be_bytes());
    b.extend_from_slice(&13u64.to_be_bytes());
    b.extend_from_slice(&(7 * CS).to_be_bytes());
    b.extend_from_slice(&(CS as u32).to_be_bytes());
    b.extend_from_slice(&[0xee; CS as usize]);
    x.write_all(&b).unwrap();
    assert_eq!(reply(&mut x, 13).0, 0);
    request(&mut x, 0, 14, 7 * CS, CS as u32);
    assert_eq!(reply(&mut x, 14).1, vec![0xee; CS as usize]);
    drop(x);
    // The diff from s1 now includes chunk 7.
    let v: serde_json::Value =
        serde_json::from_str(&d.cli(&["--json", "diff", "vol", &t])).unwrap();
    assert!(v["extents"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["offset"] == 7 * CS));

    // Removing an NBD export with a client connected: refused, then forced (the client is
    // disconnected).
    let mut x = connect(&sock, "s1n");
    let out = d.cli_output(&["remove", "s1n"]);
    assert_eq!(
        out.status.code(),
        Some(5),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    request(&mut x, 0, 15, 0, 4096);
    assert_eq!(
        reply(&mut x, 15).0,
        0,
        "still served after the refused removal"
    );
    d.cli(&["remove", "s1n", "--force"]);
    assert!(closed(&mut x), "a forced removal disconnects the client");
    assert!(!sock.exists(), "the socket is removed");
}

/// `stats` of an NBD export equals, per kind, what a raw client did: reads and writes (ops and
/// bytes), a flush, a write-zeroes, a refused read past the end as an error; block status
/// and disconnects are not counted.
#[test]
fn stats_count_what_an_nbd_client_did() {
    let s = setup("nbd-stats");
    let (d, o, c) = (&s.d, s.o.as_str(), s.c.as_str());
    d.cli(&["remove", "vol"]);
    d.cli(&["create", "vol", o, c, "--nbd"]);
    let mut x = connect(&d.export_socket("vol"), "vol");
    for (i, len) in [4096u32, 512, 65536].into_iter().enumerate() {
        request(&mut x, 0, i as u64, 0, len);
        assert_eq!(reply(&mut x, i as u64).0, 0);
    }
    let mut b = 0x2560_9513u32.to_be_bytes().to_vec();
    b.extend_from_slice(&0u16.to_be_bytes());
    b.extend_from_slice(&1u16.to_be_bytes());
    b.extend_from_slice(&20u64.to_be_bytes());
    b.extend_from_slice(&(3 * CS).to_be_bytes());
    b.extend_from_slice(&8192u32.to_be_bytes());
    b.extend_from_slice(&[0x5a; 8192]);
    x.write_all(&b).unwrap();
    assert_eq!(reply(&mut x, 20).0, 0);
    request(&mut x, 3, 21, 0, 0); // flush
    assert_eq!(reply(&mut x, 21).0, 0);
    request(&mut x, 6, 22, 5 * CS, 4096); // write zeroes
    assert_eq!(reply(&mut x, 22).0, 0);
    request(&mut x, 7, 23, 0, 65536); // block status: not counted
    assert_eq!(reply(&mut x, 23).0, 0);
    request(&mut x, 0, 24, SIZE, 4096); // past the end: refused
    assert_ne!(reply(&mut x, 24).0, 0);
    let st = d.ok("stats", serde_json::json!({"name": "vol"}));
    let e = &st["exports"][0];
    assert_eq!(e["protocol"], "nbd", "{st}");
    assert!(e.get("note").is_none(), "{st}");
    let n = |k: &str| e[k].as_u64().unwrap();
    assert_eq!(
        (n("reads"), n("read_bytes")),
        (3, 4096 + 512 + 65536),
        "{st}"
    );
    assert_eq!((n("writes"), n("write_bytes")), (1, 8192), "{st}");
    assert_eq!(n("flushes"), 1, "{st}");
    assert_eq!(
        (n("write_zeroes"), n("write_zeroes_bytes")),
        (1, 4096),
        "{st}"
    );
    assert_eq!(
        (n("discards"), n("errors"), n("in_flight")),
        (0, 1, 0),
        "{st}"
    );
    assert_eq!(e["latency_us"]["read"]["count"], 3, "{st}");
    drop(x);
}
