//! Unit tests of the pure checks: a hand-built [`State`], no daemon, no files.

use std::path::Path;

use snapmv_rpc::codes;

use super::*;
use crate::state::{ExportRecord, OriginRecord};

fn export(name: &str, cow: &str, origin_id: &str, tag: Option<u32>) -> ExportRecord {
    ExportRecord {
        name: name.into(),
        socket: format!("/run/{name}.sock"),
        cow: cow.into(),
        origin_id: origin_id.into(),
        tag,
        num_queues: DEFAULT_NUM_QUEUES,
        queue_size: DEFAULT_QUEUE_SIZE,
        readonly: false,
        socket_group: None,
        socket_mode: None,
        protocol: None,
        serial: None,
    }
}

fn origin(cow: &str, origin_id: &str, path: &str) -> OriginRecord {
    OriginRecord {
        cow: cow.into(),
        origin_id: origin_id.into(),
        path: path.into(),
        direct: false,
    }
}

/// A store /c with origin `disk` (/o) exported as `vol`, its snapshot 1 as `snap`.
fn state() -> State {
    let mut s = State::default();
    s.record_store("/c", false);
    s.origins.push(origin("/c", "disk", "/o"));
    s.exports.push(export("vol", "/c", "disk", None));
    s.exports.push(export("snap", "/c", "disk", Some(1)));
    s
}

fn code<T: std::fmt::Debug>(r: MResult<T>) -> i64 {
    r.unwrap_err().code()
}

#[test]
fn export_names() {
    let s = state();
    assert!(new_export_name(&s, "new").is_ok());
    assert_eq!(code(new_export_name(&s, "vol")), codes::ALREADY_EXISTS);
    for bad in ["", "a/b", "..", "é", &"x".repeat(65)] {
        assert_eq!(
            code(new_export_name(&s, bad)),
            codes::INVALID_PARAMS,
            "{bad:?}"
        );
    }
}

#[test]
fn queue_defaults_and_limits() {
    assert_eq!(
        queues("v", None, None).unwrap(),
        (DEFAULT_NUM_QUEUES, DEFAULT_QUEUE_SIZE)
    );
    assert_eq!(queues("v", Some(1), Some(1)).unwrap(), (1, 1));
    assert_eq!(
        queues("v", Some(MAX_NUM_QUEUES), Some(32768)).unwrap(),
        (MAX_NUM_QUEUES, 32768)
    );
    for (nq, qs) in [(0, 256), (MAX_NUM_QUEUES + 1, 256), (1, 0), (1, 100)] {
        let e = queues("v", Some(nq), Some(qs)).unwrap_err();
        assert_eq!(e.code(), codes::INVALID_PARAMS);
        assert!(e.to_string().contains("export v"), "{e}");
    }
}

#[test]
fn format_options_need_bind_and_a_valid_chunk_size() {
    let p = |bind, format, force_format, chunk_size| m::OriginCreateParams {
        bind,
        format,
        force_format,
        chunk_size,
        ..Default::default()
    };
    assert_eq!(
        format_options("v", "/c", &p(false, false, false, None)).unwrap(),
        1
    );
    assert_eq!(
        format_options("v", "/c", &p(true, true, false, Some(256))).unwrap(),
        256
    );
    assert_eq!(
        format_options("v", "/c", &p(true, false, true, Some(4))).unwrap(),
        4
    );
    for bad in [
        p(false, true, false, None),     // format without bind
        p(false, false, true, None),     // force_format without bind
        p(true, false, false, Some(4)),  // chunk_size without format
        p(true, true, false, Some(3)),   // not a power of two
        p(true, true, false, Some(512)), // too large
        p(true, true, false, Some(0)),
    ] {
        assert_eq!(
            code(format_options("v", "/c", &bad)),
            codes::INVALID_PARAMS,
            "{bad:?}"
        );
    }
}

#[test]
fn origin_ids_given_recorded_or_from_the_file_name() {
    let s = state();
    assert_eq!(origin_id(&s, "/c", "/o", None).unwrap(), "disk");
    assert_eq!(origin_id(&s, "/c", "/x/new.img", None).unwrap(), "new.img");
    assert_eq!(origin_id(&s, "/c", "/o", Some("other")).unwrap(), "other");
    assert_eq!(
        code(origin_id(&s, "/c", "/o", Some("a/b"))),
        codes::INVALID_PARAMS
    );
}

#[test]
fn an_origin_has_one_identity() {
    let s = state();
    let is = |p: &'static str| move |path: &str| path == p;
    // The recorded pair itself, and a new file under a new id.
    assert!(origin_identity(&s, "/c", "/o", "disk", is("/o")).is_ok());
    assert!(origin_identity(&s, "/c", "/p", "other", is("/p")).is_ok());
    // The same file under another id or store; the same id for another file.
    assert_eq!(
        code(origin_identity(&s, "/c", "/o", "other", is("/o"))),
        codes::ALREADY_EXISTS
    );
    assert_eq!(
        code(origin_identity(&s, "/d", "/o", "disk", is("/o"))),
        codes::ALREADY_EXISTS
    );
    let e = origin_identity(&s, "/c", "/p", "disk", is("/p")).unwrap_err();
    assert!(e.to_string().contains("is already the origin /o"), "{e}");
}

#[test]
fn a_version_is_exported_once() {
    let s = state();
    let e = not_exported(&s, "/c", "disk", None).unwrap_err();
    assert_eq!(e.code(), codes::ALREADY_EXISTS);
    assert!(e.to_string().contains("already exported as vol"), "{e}");
    let e = not_exported(&s, "/c", "disk", Some(1)).unwrap_err();
    assert!(e.to_string().contains("snapshot 1 of origin disk"), "{e}");
    assert!(not_exported(&s, "/c", "disk", Some(2)).is_ok());
    assert!(not_exported(&s, "/d", "disk", None).is_ok());
}

#[test]
fn only_an_unused_closed_store_is_formatted() {
    let s = state();
    let e = formattable(&s, "/c", false).unwrap_err();
    assert_eq!(e.code(), codes::BUSY);
    assert!(
        e.to_string().contains("vol, snap") || e.to_string().contains("snap, vol"),
        "{e}"
    );
    assert_eq!(code(formattable(&s, "/d", true)), codes::BUSY);
    assert!(formattable(&s, "/d", false).is_ok());
}

#[test]
fn protocols() {
    assert_eq!(protocol_param(None).unwrap(), None);
    assert_eq!(protocol_param(Some(PROTOCOL_VHOST)).unwrap(), None);
    assert_eq!(
        protocol_param(Some(PROTOCOL_NBD)).unwrap().as_deref(),
        Some("nbd")
    );
    assert_eq!(code(protocol_param(Some("iscsi"))), codes::INVALID_PARAMS);
}

#[test]
fn socket_modes() {
    assert_eq!(parse_socket_mode("0660").unwrap(), 0o660);
    assert_eq!(parse_socket_mode("0o600").unwrap(), 0o600);
    assert_eq!(parse_socket_mode("777").unwrap(), 0o777);
    for bad in ["0400", "01777", "rw", "0868", ""] {
        assert!(parse_socket_mode(bad).is_err(), "{bad}");
    }
}

#[test]
fn default_origin_ids() {
    assert_eq!(default_origin_id(Path::new("/a/disk.img")), "disk.img");
    assert_eq!(default_origin_id(Path::new("/a/d isk:1")), "d_isk_1");
    assert_eq!(
        default_origin_id(Path::new(
            "rbd:vms/ns/vm1-disk:id=snapmv:conf=/etc/ceph/c.conf"
        )),
        "vm1-disk"
    );
    assert_eq!(default_origin_id(Path::new("/")), "origin");
    assert_eq!(
        default_origin_id(Path::new(&format!("/{}", "x".repeat(100)))).len(),
        64
    );
}

#[test]
fn the_state_keeps_only_used_stores_sorted_exports() {
    let mut s = state();
    s.record_store("/c", true);
    s.record_store("/unused", false);
    assert_eq!(s.stores.len(), 2);
    assert!(!s.store("/c").unwrap().direct, "the first record stays");
    s.normalise();
    assert_eq!(s.stores.len(), 1);
    let names: Vec<&str> = s.exports.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["snap", "vol"]);
    assert_eq!(s.exported_as("/c", "disk", Some(1)), ["snap"]);
    assert_eq!(s.exported_as("/c", "disk", None), ["vol"]);
}
