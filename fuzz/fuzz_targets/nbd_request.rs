//! The NBD server as a client drives it: the input is the byte stream a client sends (client
//! flags, options, then requests and write payloads), served by `serve_connection` against an
//! in-memory disk, read-only or not (first byte). Covers the option parser (GO/INFO, meta
//! contexts, oversize options), the request parser and checks (`parse_request`,
//! `check_request`), block status, and truncation anywhere. Nothing may panic; every request
//! past the end, oversize or malformed gets an error reply or ends the connection.
#![no_main]

use libfuzzer_sys::fuzz_target;
use snapmv::nbd::{serve_connection, NbdExport};
use snapmv::vhost_blk::MemDisk;
use std::io::{Read, Write};
use std::sync::{Arc, OnceLock};

struct Pipe<'a> {
    input: &'a [u8],
    written: usize,
}

impl Read for Pipe<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.input.read(buf)
    }
}

impl Write for Pipe<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.written += buf.len();
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn exports() -> &'static [Arc<NbdExport>; 2] {
    static E: OnceLock<[Arc<NbdExport>; 2]> = OnceLock::new();
    E.get_or_init(|| {
        let mk = |readonly: bool| {
            Arc::new(NbdExport {
                name: "x".into(),
                disk: Arc::new(MemDisk::new("fuzz disk", 64 << 10)),
                readonly,
                chunk_size: 4096,
                changed: Some(Arc::new(|tag| {
                    if tag == 0 {
                        Err("no such snapshot".into())
                    } else {
                        Ok(vec![(4096, 4096), ((tag as u64 % 8) * 8192, 4096)])
                    }
                })),
                metrics: Arc::default(),
            })
        };
        [mk(false), mk(true)]
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&ctl, rest)) = data.split_first() else {
        return;
    };
    let e = exports()[(ctl & 1) as usize].clone();
    let lookup = move |n: &str| (n == "x" || n.is_empty()).then(|| e.clone());
    let mut p = Pipe {
        input: rest,
        written: 0,
    };
    let _ = serve_connection(&mut p, &lookup);
});
