//! The RPC request path up to dispatch: the line reader with its length limit, the JSON-RPC
//! parser, and the decoding of every method's parameters (as the daemon does before it calls a
//! method), plus the name check. Nothing may panic; the reader never returns more than its limit.
#![no_main]

use libfuzzer_sys::fuzz_target;
use snapmv_rpc::methods::{self, *};
use snapmv_rpc::protocol::{parse_line, read_line_limited, Incoming, LineRead};
use snapmv_rpc::Request;

fn decode_params(req: &Request) {
    let p = req.params.clone().unwrap_or(serde_json::Value::Null);
    let p = if p.is_null() {
        serde_json::json!({})
    } else {
        p
    };
    macro_rules! try_decode {
        ($($t:ty),*) => {$(
            if let Ok(v) = serde_json::from_value::<$t>(p.clone()) {
                let _ = serde_json::to_string(&v);
            }
        )*};
    }
    try_decode!(
        OriginCreateParams,
        SnapshotExportParams,
        NameParams,
        OptionalNameParams,
        NoParams,
        SnapshotCreateParams,
        SnapshotDeleteParams,
        SnapshotRollbackParams
    );
    if let Some(name) = p.get("name").and_then(|n| n.as_str()) {
        if methods::validate_name("export name", name).is_ok() {
            assert!(!name.contains('/') && name != "." && name != "..");
        }
    }
}

fuzz_target!(|data: &[u8]| {
    // The reader: lines of at most 256 bytes out of the input.
    let mut r = std::io::BufReader::with_capacity(7, data);
    let mut buf = Vec::new();
    let mut lines = Vec::new();
    while let Ok(k) = read_line_limited(&mut r, 256, &mut buf) {
        match k {
            LineRead::Line => {
                assert!(buf.len() <= 256);
                lines.push(buf.clone());
            }
            LineRead::Eof | LineRead::TooLong => break,
        }
    }
    // The parser, on the whole input as one line and on each line read.
    lines.push(data.to_vec());
    for line in &lines {
        match parse_line(line) {
            Incoming::Single(Ok(req)) => decode_params(&req),
            Incoming::Batch(items) => {
                for req in items.iter().flatten() {
                    decode_params(req);
                }
            }
            Incoming::Single(Err((_, e))) => assert!(!e.message.is_empty()),
            Incoming::Invalid(resp) => {
                let _ = serde_json::to_string(&resp);
            }
        }
    }
});
