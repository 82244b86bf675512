//! A small blocking JSON-RPC client over the daemon's Unix socket.

use std::io::{BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use crate::method::Method;
use crate::protocol::{read_line_limited, ErrorObject, LineRead, Request, Response};

/// Longest response line the client accepts (large `snapshot_list` answers fit easily).
pub const MAX_RESPONSE_LEN: usize = 256 << 20;

/// What can go wrong in a call.
#[derive(Debug, thiserror::Error)]
pub enum RpcError {
    /// The socket could not be reached.
    #[error("cannot connect to the snapmv daemon at {path}: {source}")]
    Connect {
        /// Socket path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Reading or writing the socket failed.
    #[error("RPC socket {path}: {what}: {source}")]
    Io {
        /// Socket path.
        path: PathBuf,
        /// What was being done.
        what: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The daemon answered something that is not a valid response.
    #[error("RPC socket {path}: invalid response to {method}: {what}")]
    Protocol {
        /// Socket path.
        path: PathBuf,
        /// The method called.
        method: String,
        /// What is wrong with the answer.
        what: String,
    },
    /// The daemon answered with an error object.
    #[error("{0}")]
    Remote(#[source] ErrorObject),
    /// The parameters could not be encoded, or the result not decoded into the expected type.
    #[error("{method}: {what}: {source}")]
    Json {
        /// The method called.
        method: String,
        /// Encoding parameters or decoding the result.
        what: &'static str,
        /// The serde error.
        #[source]
        source: serde_json::Error,
    },
}

impl RpcError {
    /// The JSON-RPC error code when the daemon answered with an error.
    pub fn code(&self) -> Option<i64> {
        match self {
            RpcError::Remote(e) => Some(e.code),
            _ => None,
        }
    }
}

/// A connection to the daemon. Calls are sequential; open several clients for parallel calls.
#[derive(Debug)]
pub struct RpcClient {
    path: PathBuf,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    next_id: u64,
    line: Vec<u8>,
}

impl RpcClient {
    /// Connects to the daemon's socket.
    pub fn connect(path: impl AsRef<Path>) -> Result<Self, RpcError> {
        let path = path.as_ref().to_path_buf();
        let stream = UnixStream::connect(&path).map_err(|source| RpcError::Connect {
            path: path.clone(),
            source,
        })?;
        let writer = stream.try_clone().map_err(|source| RpcError::Io {
            path: path.clone(),
            what: "duplicating the socket",
            source,
        })?;
        Ok(RpcClient {
            path,
            reader: BufReader::new(stream),
            writer,
            next_id: 1,
            line: Vec::new(),
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Sets a timeout for reading each answer (none by default: `wait` calls may be long).
    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> Result<(), RpcError> {
        self.writer
            .set_read_timeout(timeout)
            .map_err(|source| RpcError::Io {
                path: self.path.clone(),
                what: "setting the read timeout",
                source,
            })
    }

    /// Calls method `M` and decodes its result. Parameters that encode to an empty object are
    /// sent as none (no `params` member).
    pub fn call<M: Method>(&mut self, params: &M::Params) -> Result<M::Result, RpcError> {
        let params = serde_json::to_value(params).map_err(|source| RpcError::Json {
            method: M::NAME.into(),
            what: "encoding the parameters",
            source,
        })?;
        let params = match params {
            Value::Object(o) if o.is_empty() => Value::Null,
            p => p,
        };
        let v = self.call_raw(M::NAME, params)?;
        serde_json::from_value(v).map_err(|source| RpcError::Json {
            method: M::NAME.into(),
            what: "decoding the result",
            source,
        })
    }

    /// Calls `method` with `params` (an object, or null for none) and returns the raw result
    /// (for methods the caller builds by hand, and tests of malformed input).
    pub fn call_raw(&mut self, method: &str, params: Value) -> Result<Value, RpcError> {
        let id = self.next_id;
        self.next_id += 1;
        let req = Request {
            jsonrpc: "2.0".into(),
            method: method.into(),
            params: match params {
                Value::Null => None,
                p => Some(p),
            },
            id: Some(Value::from(id)),
        };
        let mut line = serde_json::to_vec(&req).map_err(|source| RpcError::Json {
            method: method.into(),
            what: "encoding the request",
            source,
        })?;
        line.push(b'\n');
        if let Err(send_err) = self.send_raw(&line) {
            // The daemon may have refused the connection (uid, too many clients) and closed
            // it before the request arrived: its reason is waiting to be read.
            if let Ok(Response {
                error: Some(e),
                result: None,
                ..
            }) = self.read_response(method)
            {
                return Err(RpcError::Remote(e));
            }
            return Err(send_err);
        }
        let resp = self.read_response(method)?;
        // An error the server could not tie to a request (refused connection, unparsable
        // line) carries a null id.
        if resp.id.is_null() {
            if let (None, Some(e)) = (&resp.result, resp.error.clone()) {
                return Err(RpcError::Remote(e));
            }
        }
        if resp.id != id {
            return Err(self.protocol(method, format!("id {} instead of {id}", resp.id)));
        }
        match (resp.result, resp.error) {
            (Some(r), None) => Ok(r),
            (None, Some(e)) => Err(RpcError::Remote(e)),
            _ => Err(self.protocol(method, "neither exactly one of result and error".into())),
        }
    }

    /// Writes raw bytes to the socket (for tests of malformed input).
    pub fn send_raw(&mut self, bytes: &[u8]) -> Result<(), RpcError> {
        self.writer
            .write_all(bytes)
            .and_then(|()| self.writer.flush())
            .map_err(|source| RpcError::Io {
                path: self.path.clone(),
                what: "sending the request",
                source,
            })
    }

    /// Reads one raw response line and parses it as JSON (for tests of malformed input).
    pub fn read_raw(&mut self) -> Result<Value, RpcError> {
        self.read_line("(raw)")?;
        serde_json::from_slice(&self.line)
            .map_err(|e| self.protocol("(raw)", format!("not JSON: {e}")))
    }

    fn read_line(&mut self, method: &str) -> Result<(), RpcError> {
        match read_line_limited(&mut self.reader, MAX_RESPONSE_LEN, &mut self.line) {
            Ok(LineRead::Line) => Ok(()),
            Ok(LineRead::Eof) => {
                Err(self.protocol(method, "the daemon closed the connection".into()))
            }
            Ok(LineRead::TooLong) => Err(self.protocol(
                method,
                format!("response longer than {MAX_RESPONSE_LEN} bytes"),
            )),
            Err(source) => Err(RpcError::Io {
                path: self.path.clone(),
                what: "reading the response",
                source,
            }),
        }
    }

    fn read_response(&mut self, method: &str) -> Result<Response, RpcError> {
        self.read_line(method)?;
        serde_json::from_slice(&self.line).map_err(|e| self.protocol(method, e.to_string()))
    }

    fn protocol(&self, method: &str, what: String) -> RpcError {
        RpcError::Protocol {
            path: self.path.clone(),
            method: method.into(),
            what,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{codes, parse_line, Incoming};
    use std::io::BufRead;
    use std::os::unix::net::UnixListener;

    /// A one-connection server answering each request with `answer(request)`.
    fn serve(answer: fn(Request) -> String) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let l = UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            let mut w = s.try_clone().unwrap();
            for line in BufReader::new(s).lines() {
                let Ok(line) = line else { return };
                let Incoming::Single(Ok(req)) = parse_line(line.as_bytes()) else {
                    return;
                };
                let mut out = answer(req);
                out.push('\n');
                if w.write_all(out.as_bytes()).is_err() {
                    return;
                }
            }
        });
        (dir, path)
    }

    #[test]
    fn result_and_error() {
        let (_d, path) = serve(|req| {
            if req.method == "snapshot_create" {
                serde_json::to_string(&Response::ok(
                    req.id.unwrap(),
                    serde_json::json!({"tag": 4}),
                ))
                .unwrap()
            } else {
                serde_json::to_string(&Response::err(
                    req.id.unwrap(),
                    ErrorObject::new(codes::NOT_FOUND, "export x not found"),
                ))
                .unwrap()
            }
        });
        let mut c = RpcClient::connect(&path).unwrap();
        let r = c
            .call::<crate::method::SnapshotCreate>(&crate::methods::SnapshotCreateParams {
                name: "x".into(),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(r.tag, Some(4));
        let e = c.call_raw("bad", Value::Null).unwrap_err();
        assert_eq!(e.code(), Some(codes::NOT_FOUND));
        assert!(e.to_string().contains("export x not found"));
    }

    #[test]
    fn wrong_id_is_a_protocol_error() {
        let (_d, path) = serve(|_| r#"{"jsonrpc":"2.0","result":1,"id":999}"#.into());
        let mut c = RpcClient::connect(&path).unwrap();
        assert!(matches!(
            c.call_raw("x", Value::Null),
            Err(RpcError::Protocol { .. })
        ));
    }

    #[test]
    fn connect_error_names_the_socket() {
        let e = RpcClient::connect("/nonexistent/snapmv.sock").unwrap_err();
        assert!(e.to_string().contains("/nonexistent/snapmv.sock"));
    }
}
