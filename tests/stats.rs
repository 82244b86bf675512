//! `stats` through the daemon: the counters equal, per kind, the requests a blkio client
//! issued (ops and bytes), failed requests count as errors, NBD exports are listed with
//! their counters, the store's space is there; the CLI renders them.

use serde_json::{json, Value};
use snapmv_rpc::codes;
use snapmv_tests::blkio_client::{run1, Client, NO_FLAGS};
use snapmv_tests::daemon::{scratch, sparse_file, Daemon};

const MIB: u64 = 1 << 20;

/// What [`issue_known_io`] sends, per kind: (requests, bytes).
pub struct Issued {
    reads: (u64, u64),
    writes: (u64, u64),
    flushes: u64,
    discards: (u64, u64),
    write_zeroes: (u64, u64),
    errors: u64,
}

/// Sends a fixed mix of requests on queue 0, each waited for, and returns what it sent.
fn issue_known_io(c: &mut Client) -> Issued {
    let p = c.ptr(0);
    let cap = c.capacity();
    let mut is = Issued {
        reads: (0, 0),
        writes: (0, 0),
        flushes: 0,
        discards: (0, 0),
        write_zeroes: (0, 0),
        errors: 0,
    };
    let q = &mut c.queues[0];
    for (i, len) in [4096usize, 512, 65536, 8192, 1 << 20]
        .into_iter()
        .enumerate()
    {
        let off = (i as u64) * MIB / 2;
        assert_eq!(run1(q, |q| q.write(off, p, len, 0, NO_FLAGS)).unwrap(), 0);
        is.writes.0 += 1;
        is.writes.1 += len as u64;
    }
    for (i, len) in [512usize, 4096, 4096, 131072, 12288, 1536, 65536]
        .into_iter()
        .enumerate()
    {
        let off = (i as u64) * 8192;
        assert_eq!(run1(q, |q| q.read(off, p, len, 0, NO_FLAGS)).unwrap(), 0);
        is.reads.0 += 1;
        is.reads.1 += len as u64;
    }
    for _ in 0..3 {
        assert_eq!(run1(q, |q| q.flush(0, NO_FLAGS)).unwrap(), 0);
        is.flushes += 1;
    }
    for (off, len) in [(MIB, 128u64 << 10), (2 * MIB, 64 << 10)] {
        assert_eq!(run1(q, |q| q.discard(off, len, 0, NO_FLAGS)).unwrap(), 0);
        is.discards.0 += 1;
        is.discards.1 += len;
    }
    for (off, len) in [
        (0u64, 4096u64),
        (MIB / 2, 8192),
        (3 * MIB, 65536),
        (5000 * 512, 512),
    ] {
        assert_eq!(
            run1(q, |q| q.write_zeroes(off, len, 0, NO_FLAGS)).unwrap(),
            0
        );
        is.write_zeroes.0 += 1;
        is.write_zeroes.1 += len;
    }
    // Past the end: refused, counted as an error and in no kind.
    assert!(run1(q, |q| q.read(cap, p, 4096, 0, NO_FLAGS)).unwrap() < 0);
    assert!(run1(q, |q| q.write(cap - 512, p, 4096, 0, NO_FLAGS)).unwrap() < 0);
    is.errors += 2;
    is
}

fn assert_counts(e: &Value, is: &Issued) {
    let n = |k: &str| {
        e[k].as_u64()
            .unwrap_or_else(|| panic!("{k} missing from {e}"))
    };
    assert_eq!((n("reads"), n("read_bytes")), is.reads, "reads in {e}");
    assert_eq!((n("writes"), n("write_bytes")), is.writes, "writes in {e}");
    assert_eq!(n("flushes"), is.flushes, "flushes in {e}");
    assert_eq!(
        (n("discards"), n("discard_bytes")),
        is.discards,
        "discards in {e}"
    );
    assert_eq!(
        (n("write_zeroes"), n("write_zeroes_bytes")),
        is.write_zeroes,
        "write-zeroes in {e}"
    );
    assert_eq!(n("errors"), is.errors, "errors in {e}");
    assert_eq!(n("in_flight"), 0, "in_flight in {e}");
    let lat = &e["latency_us"];
    for (kind, count) in [
        ("read", is.reads.0),
        ("write", is.writes.0),
        ("flush", is.flushes),
        ("discard", is.discards.0),
        ("write_zeroes", is.write_zeroes.0),
    ] {
        let l = &lat[kind];
        assert_eq!(l["count"].as_u64(), Some(count), "latency_us.{kind} in {e}");
        let (p50, p99, p999) = (
            l["p50"].as_f64().unwrap(),
            l["p99"].as_f64().unwrap(),
            l["p99_9"].as_f64().unwrap(),
        );
        if count == 0 {
            assert_eq!(
                (p50, p99, p999),
                (0.0, 0.0, 0.0),
                "latency_us.{kind} in {e}"
            );
        } else {
            assert!(
                p50 <= p99 && p99 <= p999,
                "latency_us.{kind} percentiles out of order in {e}"
            );
        }
    }
}

#[test]
fn stats_equal_the_io_issued_per_kind() {
    let dir = scratch("stats");
    let o = dir.path().join("o.img").display().to_string();
    let c = dir.path().join("c.img").display().to_string();
    let o2 = dir.path().join("o2.img").display().to_string();
    sparse_file(std::path::Path::new(&o), 8 * MIB);
    sparse_file(std::path::Path::new(&o2), 4 * MIB);
    sparse_file(std::path::Path::new(&c), 32 * MIB);
    let d = Daemon::start(dir.path());
    d.cli(&["create", "vol", &o, &c, "-b", "-f"]);
    d.cli(&["create", "quiet", &o2, &c, "-b"]);

    // Nothing yet: every counter 0.
    let s = d.ok("stats", json!({"name": "vol"}));
    let zero = Issued {
        reads: (0, 0),
        writes: (0, 0),
        flushes: 0,
        discards: (0, 0),
        write_zeroes: (0, 0),
        errors: 0,
    };
    assert_eq!(s["exports"].as_array().unwrap().len(), 1, "{s}");
    assert_eq!(s["exports"][0]["name"], "vol");
    assert_eq!(s["exports"][0]["latency_us"]["read"]["count"], 0);

    let mut cl = Client::connect(&d.export_socket("vol")).unwrap();
    let is = issue_known_io(&mut cl);
    let s = d.ok("stats", json!({"name": "vol"}));
    assert_counts(&s["exports"][0], &is);
    // The store's space, as `status` has it.
    let st = d.ok("status", json!({}));
    let store = &s["stores"][0];
    assert_eq!(store["cow"], st["stores"][0]["cow"]);
    for k in ["chunks_total", "chunks_used", "chunks_free", "chunk_size"] {
        assert_eq!(store[k], st["stores"][0][k], "{k}: {s} vs {st}");
    }
    assert_eq!(store["reclaim_pending_chunks"], 0);

    // A reconnect keeps counting from where it was.
    drop(cl);
    let mut cl = Client::connect(&d.export_socket("vol")).unwrap();
    let again = issue_known_io(&mut cl);
    drop(cl);
    let all = d.ok("stats", json!({}));
    let exports = all["exports"].as_array().unwrap();
    assert_eq!(
        exports
            .iter()
            .map(|e| e["name"].as_str().unwrap())
            .collect::<Vec<_>>(),
        ["quiet", "vol"],
        "{all}"
    );
    assert_counts(&exports[0], &zero);
    let sum = |a: (u64, u64), b: (u64, u64)| (a.0 + b.0, a.1 + b.1);
    assert_counts(
        &exports[1],
        &Issued {
            reads: sum(is.reads, again.reads),
            writes: sum(is.writes, again.writes),
            flushes: is.flushes + again.flushes,
            discards: sum(is.discards, again.discards),
            write_zeroes: sum(is.write_zeroes, again.write_zeroes),
            errors: is.errors + again.errors,
        },
    );
    assert_eq!(
        all["stores"].as_array().unwrap().len(),
        1,
        "one store: {all}"
    );

    // The CLI: a table with a row per kind, and the same JSON.
    let text = d.cli(&["stats", "vol"]);
    assert!(
        text.contains("EXPORT") && text.contains("write-zeroes"),
        "{text}"
    );
    let reads_row = text
        .lines()
        .find(|l| l.starts_with("vol "))
        .unwrap_or_else(|| panic!("no row for vol in\n{text}"));
    assert!(
        reads_row.split_whitespace().nth(2) == Some(&(2 * is.reads.0).to_string()),
        "{reads_row}"
    );
    assert!(text.contains("reclaim pending"), "{text}");
    let j: Value = serde_json::from_str(&d.cli(&["stats", "--json"])).unwrap();
    assert_eq!(j, d.ok("stats", json!({})));

    // Errors name the object.
    let e = d.err("stats", json!({"name": "nope"}), codes::NOT_FOUND);
    assert!(e.contains("export nope"), "{e}");
    let e = d.err("stats", json!({"nam": "vol"}), codes::INVALID_PARAMS);
    assert!(e.contains("nam"), "{e}");
}

/// NBD exports have the same counters (what a client did is checked in `tests/nbd.rs`).
#[test]
fn nbd_exports_are_listed_with_their_counters() {
    let dir = scratch("stats-nbd");
    let o = dir.path().join("o.img").display().to_string();
    let c = dir.path().join("c.img").display().to_string();
    sparse_file(std::path::Path::new(&o), 4 * MIB);
    sparse_file(std::path::Path::new(&c), 16 * MIB);
    let d = Daemon::start(dir.path());
    d.cli(&["create", "vol", &o, &c, "-b", "-f"]);
    d.cli(&["snapshot", "vol"]);
    d.cli(&["create", "snap", &o, &c, "1", "-r", "--nbd"]);
    let s = d.ok("stats", json!({}));
    let e = &s["exports"][0];
    assert_eq!(e["name"], "snap", "{s}");
    assert_eq!(e["protocol"], "nbd");
    assert!(e.get("note").is_none(), "{s}");
    assert_eq!(e["reads"], 0);
    assert_eq!(s["exports"][1]["protocol"], "vhost-user-blk");
    let text = d.cli(&["stats"]);
    assert!(text.contains("snap"), "{text}");
}

/// One sample of an exposition: metric name, labels sorted by name, value.
type Sample = (String, Vec<(String, String)>, f64);

/// Parses an OpenMetrics text exposition strictly: `# TYPE`/`# HELP`/`# UNIT` lines, samples
/// `name{labels} value`, a final `# EOF`. Returns the samples as (name, sorted labels, value).
fn parse_exposition(text: &str) -> Vec<Sample> {
    let mut lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.pop(), Some("# EOF"), "no final # EOF in\n{text}");
    let mut samples = Vec::new();
    for line in lines {
        if let Some(rest) = line.strip_prefix("# ") {
            let word = rest.split(' ').next().unwrap_or("");
            assert!(
                ["TYPE", "HELP", "UNIT"].contains(&word),
                "bad comment line {line:?}"
            );
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("no value in {line:?}"));
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            v => v
                .parse()
                .unwrap_or_else(|e| panic!("value of {line:?}: {e}")),
        };
        let (name, labels) = match series.split_once('{') {
            None => (series, Vec::new()),
            Some((name, rest)) => {
                let body = rest
                    .strip_suffix('}')
                    .unwrap_or_else(|| panic!("unclosed labels in {line:?}"));
                let mut labels: Vec<(String, String)> = body
                    .split("\",")
                    .map(|kv| {
                        let (k, v) = kv
                            .split_once("=\"")
                            .unwrap_or_else(|| panic!("bad label {kv:?} in {line:?}"));
                        (k.to_string(), v.trim_end_matches('"').to_string())
                    })
                    .collect();
                labels.sort();
                (name, labels)
            }
        };
        assert!(
            name.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad metric name in {line:?}"
        );
        samples.push((name.to_string(), labels, value));
    }
    samples
}

fn sample(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    let mut want: Vec<(String, String)> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    want.sort();
    samples
        .iter()
        .find(|(n, l, _)| n == name && *l == want)
        .map(|s| s.2)
        .unwrap_or_else(|| panic!("no sample {name}{labels:?}"))
}

#[test]
fn prometheus_scrape_parses_and_counts_the_io() {
    let dir = scratch("stats-prom");
    let o = dir.path().join("o.img").display().to_string();
    let c = dir.path().join("c.img").display().to_string();
    sparse_file(std::path::Path::new(&o), 8 * MIB);
    sparse_file(std::path::Path::new(&c), 32 * MIB);
    let msock = dir.path().join("metrics.sock");
    let d = Daemon::start_with(dir.path(), &["--metrics-listen", "127.0.0.1:0"]);
    d.cli(&["create", "vol", &o, &c, "-b", "-f"]);
    let log = d.log();
    let url = log
        .lines()
        .find_map(|l| l.split("metrics served on ").nth(1))
        .unwrap_or_else(|| panic!("no metrics address in the log:\n{log}"))
        .trim()
        .to_string();
    assert!(
        url.starts_with("http://127.0.0.1:") && url.ends_with("/metrics"),
        "{url}"
    );

    let mut cl = Client::connect(&d.export_socket("vol")).unwrap();
    let is = issue_known_io(&mut cl);
    let mut resp = ureq::get(&url).call().expect("scrape");
    assert_eq!(resp.status(), 200);
    let ctype = resp.headers()["content-type"].to_str().unwrap().to_string();
    assert!(ctype.starts_with("application/openmetrics-text"), "{ctype}");
    let text = resp.body_mut().read_to_string().unwrap();
    let s = parse_exposition(&text);
    let req = |kind| {
        sample(
            &s,
            "snapmv_export_requests_total",
            &[("export", "vol"), ("kind", kind)],
        )
    };
    assert_eq!(req("read") as u64, is.reads.0);
    assert_eq!(req("write") as u64, is.writes.0);
    assert_eq!(req("flush") as u64, is.flushes);
    assert_eq!(req("discard") as u64, is.discards.0);
    assert_eq!(req("write_zeroes") as u64, is.write_zeroes.0);
    let bytes = |dir| {
        sample(
            &s,
            "snapmv_export_bytes_total",
            &[("export", "vol"), ("dir", dir)],
        )
    };
    assert_eq!(bytes("read") as u64, is.reads.1);
    assert_eq!(bytes("write") as u64, is.writes.1);
    let zb = |kind| {
        sample(
            &s,
            "snapmv_export_discarded_bytes_total",
            &[("export", "vol"), ("kind", kind)],
        )
    };
    assert_eq!(zb("discard") as u64, is.discards.1);
    assert_eq!(zb("write_zeroes") as u64, is.write_zeroes.1);
    assert_eq!(
        sample(&s, "snapmv_export_errors_total", &[("export", "vol")]) as u64,
        is.errors
    );
    assert_eq!(
        sample(&s, "snapmv_export_in_flight", &[("export", "vol")]),
        0.0
    );
    for (kind, n) in [("read", is.reads.0), ("flush", is.flushes)] {
        let l = [("export", "vol"), ("kind", kind)];
        assert_eq!(
            sample(&s, "snapmv_export_latency_seconds_count", &l) as u64,
            n
        );
        let mut inf = l.to_vec();
        inf.push(("le", "+Inf"));
        assert_eq!(
            sample(&s, "snapmv_export_latency_seconds_bucket", &inf) as u64,
            n
        );
        // Cumulative buckets never decrease.
        let mut prev = 0.0;
        for (name, labels, v) in &s {
            if name == "snapmv_export_latency_seconds_bucket"
                && labels.iter().any(|(k, v)| k == "kind" && v == kind)
            {
                assert!(*v >= prev, "bucket {labels:?} = {v} after {prev}");
                prev = *v;
            }
        }
    }
    let status = d.ok("status", json!({}));
    let cow = status["stores"][0]["cow"].as_str().unwrap();
    for state in ["used", "free"] {
        assert_eq!(
            sample(&s, "snapmv_store_chunks", &[("cow", cow), ("state", state)]) as u64,
            status["stores"][0][format!("chunks_{state}")]
                .as_u64()
                .unwrap()
        );
    }
    // Anything but GET /metrics is refused.
    let url404 = url.replace("/metrics", "/other");
    match ureq::get(&url404).call() {
        Err(ureq::Error::StatusCode(404)) => {}
        other => panic!("GET /other: {other:?}"),
    }
    drop(cl);
    drop(d);

    // On a Unix socket: a plain HTTP/1.0 GET gets the same exposition.
    let d = Daemon::start_with(
        dir.path(),
        &["--metrics-listen", &format!("unix:{}", msock.display())],
    );
    let mut st = std::os::unix::net::UnixStream::connect(&msock).expect("connect metrics socket");
    use std::io::{Read, Write};
    st.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let mut resp = String::new();
    st.read_to_string(&mut resp).unwrap();
    let (head, body) = resp.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(
        head.starts_with("HTTP/1.") && head.contains(" 200 "),
        "{head}"
    );
    let s = parse_exposition(body);
    // After the restart the counters start again from zero.
    assert_eq!(req_of(&s, "read"), 0.0);
    drop(d);

    // A non-loopback address is refused at the command line.
    let out = std::process::Command::new(snapmv_tests::daemon::snapmv_bin())
        .args(["serve", "--metrics-listen", "0.0.0.0:9477"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not a loopback address"), "{err}");
}

fn req_of(s: &[Sample], kind: &str) -> f64 {
    sample(
        s,
        "snapmv_export_requests_total",
        &[("export", "vol"), ("kind", kind)],
    )
}
