//! The backup stream reader `snapmv import-diff` runs on files it is given: header, records,
//! checksums, END counts. Nothing may panic, no record may claim bytes past the volume, and a
//! stream is accepted only with its END record.
#![no_main]

use libfuzzer_sys::fuzz_target;
use snapmv::stream::{StreamReader, KIND_DATA};

fuzz_target!(|data: &[u8]| {
    let Ok(mut r) = StreamReader::new(data) else {
        return;
    };
    let size = r.header.size;
    let mut buf = Vec::new();
    let mut last_end = 0u64;
    loop {
        match r.next_record(&mut buf) {
            Ok(Some(rec)) => {
                assert!(rec.offset >= last_end && rec.offset + rec.length <= size);
                if rec.kind == KIND_DATA {
                    assert_eq!(buf.len() as u64, rec.length);
                }
                last_end = rec.offset + rec.length;
            }
            Ok(None) | Err(_) => break,
        }
    }
});
