//! The text output of the client verbs: tables, times, sizes, the snapshot tree.

use bytesize::ByteSize;
use comfy_table::{presets, ContentArrangement, Table};
use snapmv_rpc::methods as m;

/// Formats rows as a table with a header: no borders, columns two spaces apart and padded
/// to their widest cell, no trailing blanks.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut t = Table::new();
    t.load_preset(presets::NOTHING)
        .set_content_arrangement(ContentArrangement::Disabled)
        .set_header(header.iter().copied())
        .add_rows(rows.iter().map(|r| r.iter().map(String::as_str)));
    let last = header.len().saturating_sub(1);
    for (i, c) in t.column_iter_mut().enumerate() {
        c.set_padding((0, if i == last { 0 } else { 2 }));
    }
    let mut out = String::new();
    for line in t.lines() {
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// `YYYY-MM-DD HH:MM:SS UTC` for seconds since the epoch.
pub fn format_time(secs: u64) -> String {
    i64::try_from(secs)
        .ok()
        .and_then(|s| jiff::Timestamp::from_second(s).ok())
        .map(|t| t.strftime("%Y-%m-%d %H:%M:%S UTC").to_string())
        .unwrap_or_else(|| format!("{secs} s after the epoch"))
}

/// A size in bytes, human-readable (binary units): `512 B`, `4 KiB`, `1.5 KiB`.
pub fn format_size(bytes: u64) -> String {
    format!("{:.1}", ByteSize(bytes).display().iec()).replace(".0 ", " ")
}

/// A memo on one line: control characters (newlines, escapes) become spaces.
fn one_line(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

fn dash_if_empty(v: &[String]) -> String {
    if v.is_empty() {
        "-".into()
    } else {
        v.join(",")
    }
}

/// Renders `snapshot_list` as one tree table per origin.
pub fn render_list(l: &m::SnapshotList) -> String {
    let mut out = String::new();
    for o in &l.origins {
        if !o.open {
            let path = if o.origin.is_empty() {
                String::new()
            } else {
                format!(" ({})", o.origin)
            };
            out.push_str(&format!(
                "origin {}{path} in {}, bound but not open: export it to list its snapshots\n",
                o.origin_id, o.cow
            ));
            continue;
        }
        out.push_str(&format!(
            "origin {} ({}) in {}, exported as {}\n",
            o.origin_id,
            o.origin,
            o.cow,
            dash_if_empty(&o.exported_as)
        ));
        // Depth-first from the origin's children, so the tree reads top-down.
        let mut rows = Vec::new();
        let mut stack: Vec<(Option<u32>, usize)> = vec![(None, 0)];
        let mut visited = std::collections::HashSet::new();
        while let Some((parent, depth)) = stack.pop() {
            if let Some(p) = parent {
                if !visited.insert(p) {
                    continue;
                }
                if let Some(s) = o.snapshots.iter().find(|s| s.tag == p) {
                    rows.push(vec![
                        format!("{}{}", "  ".repeat(depth.saturating_sub(1)), s.tag),
                        s.parent.map_or("origin".into(), |p| p.to_string()),
                        format_time(s.birth_unix_secs),
                        s.exclusive_chunks.to_string(),
                        s.shared_chunks.to_string(),
                        dash_if_empty(&s.exported_as),
                        one_line(&s.memo),
                    ]);
                }
            }
            let mut children: Vec<u32> = o
                .snapshots
                .iter()
                .filter(|s| s.parent == parent)
                .map(|s| s.tag)
                .collect();
            children.sort_unstable_by(|a, b| b.cmp(a));
            for c in children {
                stack.push((Some(c), depth + 1));
            }
        }
        // Snapshots whose parent is unknown (not expected) still get listed.
        for s in &o.snapshots {
            if !visited.contains(&s.tag) {
                rows.push(vec![
                    s.tag.to_string(),
                    s.parent.map_or("origin".into(), |p| p.to_string()),
                    format_time(s.birth_unix_secs),
                    s.exclusive_chunks.to_string(),
                    s.shared_chunks.to_string(),
                    dash_if_empty(&s.exported_as),
                    one_line(&s.memo),
                ]);
            }
        }
        if rows.is_empty() {
            out.push_str("  (no snapshots)\n");
        } else {
            for line in table(
                &[
                    "TAG",
                    "PARENT",
                    "BORN",
                    "EXCLUSIVE",
                    "SHARED",
                    "EXPORTED-AS",
                    "MEMO",
                ],
                &rows,
            )
            .lines()
            {
                out.push_str("  ");
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    if l.origins.is_empty() {
        out.push_str("no origins\n");
    }
    out
}

/// Renders `export_list`.
pub fn render_exports(l: &m::ExportList) -> String {
    if l.exports.is_empty() {
        return "no exports\n".into();
    }
    let rows: Vec<Vec<String>> = l
        .exports
        .iter()
        .map(|e| {
            vec![
                e.name.clone(),
                e.volume.clone(),
                if e.size > 0 {
                    format_size(e.size)
                } else {
                    "-".into()
                },
                e.num_queues.to_string(),
                if e.readonly { "ro" } else { "rw" }.into(),
                e.socket.clone(),
                match &e.error {
                    Some(err) => format!("FAILED: {}", one_line(err)),
                    None if e.connected => "connected".into(),
                    None => "waiting".into(),
                },
            ]
        })
        .collect();
    table(
        &[
            "NAME", "VOLUME", "SIZE", "QUEUES", "MODE", "SOCKET", "STATE",
        ],
        &rows,
    )
}

/// Renders `status`.
pub fn render_status(s: &m::Status) -> String {
    let mut out = String::new();
    for st in &s.stores {
        let pct = (st.chunks_used * 100)
            .checked_div(st.chunks_total)
            .unwrap_or(0);
        out.push_str(&format!(
            "store {}: chunk {}, {} chunks, {} used ({pct}%), {} free\n",
            st.cow,
            format_size(u64::from(st.chunk_size)),
            st.chunks_total,
            st.chunks_used,
            st.chunks_free
        ));
        let rows: Vec<Vec<String>> = st
            .origins
            .iter()
            .map(|o| {
                if !o.open {
                    return vec![
                        o.origin_id.clone(),
                        "?".into(),
                        "?".into(),
                        "-".into(),
                        "?".into(),
                        "(not open)".into(),
                        if o.origin.is_empty() {
                            "?".into()
                        } else {
                            o.origin.clone()
                        },
                    ];
                }
                vec![
                    o.origin_id.clone(),
                    format_size(o.size),
                    o.snapshots.to_string(),
                    match &o.rollback {
                        Some(r) => format!(
                            "to {}: {}/{} ({}%)",
                            r.tag,
                            r.chunks_done,
                            r.chunks_total,
                            (r.chunks_done * 100)
                                .checked_div(r.chunks_total)
                                .unwrap_or(100)
                        ),
                        None => "-".into(),
                    },
                    o.reclaim_pending_chunks.to_string(),
                    dash_if_empty(&o.exported_as),
                    o.origin.clone(),
                ]
            })
            .collect();
        if rows.is_empty() {
            out.push_str("  (no origins)\n");
        } else {
            for line in table(
                &[
                    "ORIGIN",
                    "SIZE",
                    "SNAPSHOTS",
                    "ROLLBACK",
                    "RECLAIM-PENDING",
                    "EXPORTED-AS",
                    "PATH",
                ],
                &rows,
            )
            .lines()
            {
                out.push_str("  ");
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    for u in &s.unavailable {
        out.push_str(&format!("store {}: UNAVAILABLE: {}\n", u.cow, u.error));
    }
    if s.stores.is_empty() && s.unavailable.is_empty() {
        out.push_str("no stores open\n");
    }
    out
}

/// A latency in microseconds, short: `87µs`, `1.2ms`, `3.4s`; `-` when nothing was measured.
fn format_latency(count: u64, us: f64) -> String {
    if count == 0 {
        "-".into()
    } else if us < 1000.0 {
        format!("{us:.0}µs")
    } else if us < 1_000_000.0 {
        format!("{:.1}ms", us / 1000.0)
    } else {
        format!("{:.1}s", us / 1_000_000.0)
    }
}

/// Renders `stats`: one row per export and request kind, then one line per store.
pub fn render_stats(s: &m::Stats) -> String {
    let mut rows = Vec::new();
    for e in &s.exports {
        if let Some(note) = &e.note {
            rows.push(vec![
                e.name.clone(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                format!("({}: {note})", e.protocol),
            ]);
            continue;
        }
        let c = &e.counters;
        let l = &c.latency_us;
        let kinds = [
            ("read", c.reads, c.read_bytes, &l.read),
            ("write", c.writes, c.write_bytes, &l.write),
            ("flush", c.flushes, 0, &l.flush),
            ("discard", c.discards, c.discard_bytes, &l.discard),
            (
                "write-zeroes",
                c.write_zeroes,
                c.write_zeroes_bytes,
                &l.write_zeroes,
            ),
        ];
        for (i, (kind, ops, bytes, lat)) in kinds.into_iter().enumerate() {
            let first = i == 0;
            rows.push(vec![
                if first { e.name.clone() } else { String::new() },
                kind.into(),
                ops.to_string(),
                format_size(bytes),
                format_latency(lat.count, lat.p50),
                format_latency(lat.count, lat.p99),
                format_latency(lat.count, lat.p99_9),
                if first {
                    c.errors.to_string()
                } else {
                    String::new()
                },
                if first {
                    c.in_flight.to_string()
                } else {
                    String::new()
                },
                String::new(),
            ]);
        }
    }
    let mut out = String::new();
    if rows.is_empty() {
        out.push_str("no exports served\n");
    } else {
        out.push_str(&table(
            &[
                "EXPORT",
                "KIND",
                "REQUESTS",
                "BYTES",
                "P50",
                "P99",
                "P99.9",
                "ERRORS",
                "IN-FLIGHT",
                "NOTE",
            ],
            &rows,
        ));
    }
    for st in &s.stores {
        out.push_str(&format!(
            "store {}: {} chunks used, {} free of {} ({} each), {} reclaim pending\n",
            st.cow,
            st.chunks_used,
            st.chunks_free,
            st.chunks_total,
            format_size(u64::from(st.chunk_size)),
            st.reclaim_pending_chunks
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times() {
        assert_eq!(format_time(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(format_time(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(format_time(1_795_000_000), "2026-11-18 11:06:40 UTC");
    }

    #[test]
    fn sizes() {
        assert_eq!(format_size(512), "512 B");
        assert_eq!(format_size(4096), "4 KiB");
        assert_eq!(format_size(1536), "1.5 KiB");
        assert_eq!(format_size(10 << 30), "10 GiB");
    }

    #[test]
    fn tables_align() {
        let t = table(
            &["A", "BB"],
            &[
                vec!["xxx".into(), "1".into()],
                vec!["y".into(), "22".into()],
            ],
        );
        assert_eq!(t, "A    BB\nxxx  1\ny    22\n");
    }

    #[test]
    fn list_is_a_tree() {
        let s = |tag, parent| m::SnapshotInfo {
            tag,
            parent,
            memo: format!("m{tag}\n"),
            birth_unix_secs: 0,
            exclusive_chunks: 0,
            shared_chunks: 0,
            exported_as: vec![],
        };
        let l = m::SnapshotList {
            origins: vec![m::OriginSnapshots {
                origin_id: "o".into(),
                origin: "/o".into(),
                cow: "/c".into(),
                exported_as: vec!["vol".into()],
                open: true,
                snapshots: vec![s(1, None), s(2, Some(1)), s(3, None)],
            }],
        };
        let out = render_list(&l);
        let tags: Vec<&str> = out
            .lines()
            .skip(2)
            .map(|l| l.split("  ").find(|x| !x.is_empty()).unwrap_or(""))
            .collect();
        assert!(
            out.starts_with("origin o (/o) in /c, exported as vol\n"),
            "{out}"
        );
        // 1, then its child 2 (indented), then 3.
        assert_eq!(tags.len(), 3, "{out}");
        assert_eq!(out.lines().count(), 5, "memos stay on their line:\n{out}");
        let pos = |needle: &str| out.find(needle).unwrap();
        assert!(pos("m1") < pos("m2") && pos("m2") < pos("m3"), "{out}");
    }
}
