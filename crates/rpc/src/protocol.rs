//! JSON-RPC 2.0 envelopes, error codes and the request parser.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Longest request or response line accepted, in bytes (the newline excluded).
pub const MAX_LINE_LEN: usize = 1 << 20;

/// Error codes carried in [`ErrorObject::code`].
///
/// The first five are JSON-RPC 2.0's own; the application codes sit in the range the
/// specification reserves for implementation-defined server errors (-32000 to -32099).
pub mod codes {
    /// The line is not valid JSON.
    pub const PARSE_ERROR: i64 = -32700;
    /// The JSON is not a valid request object (or the line is too long).
    pub const INVALID_REQUEST: i64 = -32600;
    /// No such method.
    pub const METHOD_NOT_FOUND: i64 = -32601;
    /// Parameters missing, of the wrong type, or out of range (bad name, bad path...).
    pub const INVALID_PARAMS: i64 = -32602;
    /// A bug or an unexpected failure inside the daemon.
    pub const INTERNAL_ERROR: i64 = -32603;

    /// The export, origin, store, snapshot or file named does not exist.
    pub const NOT_FOUND: i64 = -32001;
    /// The export, origin binding or snapshot already exists, or the file is already in use.
    pub const ALREADY_EXISTS: i64 = -32002;
    /// The object is in use by a conflicting operation (rollback running, snapshot exported...).
    pub const BUSY: i64 = -32003;
    /// The COW store has no free chunk left.
    pub const NO_SPACE: i64 = -32004;
    /// The origin still has snapshots.
    pub const HAS_SNAPSHOTS: i64 = -32005;
    /// The COW store's metadata failed a check; run `snapmv check`.
    pub const CORRUPT: i64 = -32006;
    /// An I/O call on a backing file failed.
    pub const IO_ERROR: i64 = -32007;
    /// A limit of the on-disk format was reached (too many snapshots, origins...).
    pub const LIMIT: i64 = -32008;
    /// The volume is read-only.
    pub const READ_ONLY: i64 = -32009;
    /// The operation does not apply to this object in its current state (for example a
    /// snapshot-only operation on an origin export, or an object deleted meanwhile).
    pub const INVALID_STATE: i64 = -32010;
    /// The client's uid is not allowed to manage this daemon.
    pub const PERMISSION_DENIED: i64 = -32011;

    /// Every code with its symbolic name, for documentation and the CLI.
    pub const ALL: &[(i64, &str)] = &[
        (PARSE_ERROR, "parse error"),
        (INVALID_REQUEST, "invalid request"),
        (METHOD_NOT_FOUND, "method not found"),
        (INVALID_PARAMS, "invalid params"),
        (INTERNAL_ERROR, "internal error"),
        (NOT_FOUND, "not found"),
        (ALREADY_EXISTS, "already exists"),
        (BUSY, "busy"),
        (NO_SPACE, "no space"),
        (HAS_SNAPSHOTS, "has snapshots"),
        (CORRUPT, "corrupt"),
        (IO_ERROR, "I/O error"),
        (LIMIT, "limit"),
        (READ_ONLY, "read-only"),
        (INVALID_STATE, "invalid state"),
        (PERMISSION_DENIED, "permission denied"),
    ];

    /// The symbolic name of a code ("unknown" for codes not listed in [`ALL`]).
    pub fn name(code: i64) -> &'static str {
        ALL.iter()
            .find(|(c, _)| *c == code)
            .map(|(_, n)| *n)
            .unwrap_or("unknown")
    }
}

/// A JSON-RPC 2.0 request. `id` absent means a notification (no response is sent).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    /// Always `"2.0"`.
    pub jsonrpc: String,
    /// The method name.
    pub method: String,
    /// Named parameters (an object) or nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub params: Option<Value>,
    /// Number, string or null; absent for a notification.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<Value>,
}

/// A JSON-RPC 2.0 error object.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorObject {
    /// One of [`codes`].
    pub code: i64,
    /// One sentence naming the object and the cause.
    pub message: String,
    /// Optional extra detail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
}

impl ErrorObject {
    /// An error with a code and a message.
    pub fn new(code: i64, message: impl Into<String>) -> Self {
        ErrorObject {
            code,
            message: message.into(),
            data: None,
        }
    }
}

impl std::fmt::Display for ErrorObject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} ({} {})",
            self.message,
            codes::name(self.code),
            self.code
        )
    }
}

impl std::error::Error for ErrorObject {}

/// A JSON-RPC 2.0 response: exactly one of `result` and `error` is present.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    /// Always `"2.0"`.
    pub jsonrpc: String,
    /// The method's result on success (`Some(Value::Null)` for a `null` result).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present_value"
    )]
    pub result: Option<Value>,
    /// The error on failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorObject>,
    /// The request's id (null when the request could not be parsed).
    pub id: Value,
}

/// A field that is present deserialises to `Some`, even when it is `null`.
fn present_value<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(d).map(Some)
}

impl Response {
    /// A success response.
    pub fn ok(id: Value, result: Value) -> Self {
        Response {
            jsonrpc: "2.0".into(),
            result: Some(result),
            error: None,
            id,
        }
    }

    /// An error response.
    pub fn err(id: Value, error: ErrorObject) -> Self {
        Response {
            jsonrpc: "2.0".into(),
            result: None,
            error: Some(error),
            id,
        }
    }
}

/// One line as read from a client, parsed.
#[derive(Debug)]
pub enum Incoming {
    /// A single request (or notification).
    Single(Result<Request, (Value, ErrorObject)>),
    /// A batch: each element parsed on its own.
    Batch(Vec<Result<Request, (Value, ErrorObject)>>),
    /// The line could not be used at all; answer with this response.
    Invalid(Box<Response>),
}

/// Parses one request line (without its newline).
///
/// Never panics, whatever the bytes. Errors carry the id to answer with (null when unknown).
pub fn parse_line(line: &[u8]) -> Incoming {
    if line.len() > MAX_LINE_LEN {
        return Incoming::Invalid(Box::new(Response::err(
            Value::Null,
            ErrorObject::new(
                codes::INVALID_REQUEST,
                format!(
                    "request line of {} bytes exceeds the limit of {MAX_LINE_LEN} bytes",
                    line.len()
                ),
            ),
        )));
    }
    let value: Value = match serde_json::from_slice(line) {
        Ok(v) => v,
        Err(e) => {
            return Incoming::Invalid(Box::new(Response::err(
                Value::Null,
                ErrorObject::new(
                    codes::PARSE_ERROR,
                    format!("request line is not valid JSON: {e}"),
                ),
            )))
        }
    };
    match value {
        Value::Array(items) => {
            if items.is_empty() {
                return Incoming::Invalid(Box::new(Response::err(
                    Value::Null,
                    ErrorObject::new(codes::INVALID_REQUEST, "batch request is an empty array"),
                )));
            }
            Incoming::Batch(items.into_iter().map(parse_value).collect())
        }
        v => Incoming::Single(parse_value(v)),
    }
}

/// Validates one request value.
pub fn parse_value(value: Value) -> Result<Request, (Value, ErrorObject)> {
    let id = match &value {
        Value::Object(m) => match m.get("id") {
            Some(id @ (Value::Null | Value::Number(_) | Value::String(_))) => id.clone(),
            Some(_) => {
                return Err((
                    Value::Null,
                    ErrorObject::new(
                        codes::INVALID_REQUEST,
                        "request id must be a number, a string or null",
                    ),
                ))
            }
            None => Value::Null,
        },
        _ => {
            return Err((
                Value::Null,
                ErrorObject::new(codes::INVALID_REQUEST, "request is not a JSON object"),
            ))
        }
    };
    let req: Request = match serde_json::from_value(value) {
        Ok(r) => r,
        Err(e) => {
            return Err((
                id,
                ErrorObject::new(codes::INVALID_REQUEST, format!("malformed request: {e}")),
            ))
        }
    };
    if req.jsonrpc != "2.0" {
        return Err((
            id,
            ErrorObject::new(
                codes::INVALID_REQUEST,
                format!(
                    "request has jsonrpc {:?}; only \"2.0\" is served",
                    req.jsonrpc
                ),
            ),
        ));
    }
    match &req.params {
        None | Some(Value::Object(_)) | Some(Value::Null) => Ok(req),
        Some(_) => Err((
            id,
            ErrorObject::new(
                codes::INVALID_PARAMS,
                format!(
                    "params of method {} must be an object with named parameters",
                    req.method
                ),
            ),
        )),
    }
}

/// Outcome of [`read_line_limited`].
#[derive(Debug, PartialEq, Eq)]
pub enum LineRead {
    /// A line (its newline stripped) is in the buffer. A last line without newline counts.
    Line,
    /// The peer closed the connection with nothing pending.
    Eof,
    /// The line grew past the limit before its newline; the connection cannot be resynced.
    TooLong,
}

/// Reads one `\n`-terminated line into `buf` (cleared first), at most `max` bytes long.
pub fn read_line_limited<R: std::io::BufRead>(
    r: &mut R,
    max: usize,
    buf: &mut Vec<u8>,
) -> std::io::Result<LineRead> {
    buf.clear();
    loop {
        let avail = match r.fill_buf() {
            Ok(a) => a,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if avail.is_empty() {
            return Ok(if buf.is_empty() {
                LineRead::Eof
            } else {
                LineRead::Line
            });
        }
        let (chunk, found) = match avail.iter().position(|&b| b == b'\n') {
            Some(i) => (&avail[..i], Some(i)),
            None => (avail, None),
        };
        if buf.len() + chunk.len() > max {
            return Ok(LineRead::TooLong);
        }
        buf.extend_from_slice(chunk);
        match found {
            Some(i) => {
                r.consume(i + 1);
                if buf.last() == Some(&b'\r') {
                    buf.pop();
                }
                return Ok(LineRead::Line);
            }
            None => {
                let n = chunk.len();
                r.consume(n);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn single(line: &str) -> Result<Request, (Value, ErrorObject)> {
        match parse_line(line.as_bytes()) {
            Incoming::Single(r) => r,
            other => panic!("expected a single request, got {other:?}"),
        }
    }

    #[test]
    fn parses_a_request() {
        let r = single(r#"{"jsonrpc":"2.0","method":"status","params":{"name":"a"},"id":7}"#)
            .expect("valid request");
        assert_eq!(r.method, "status");
        assert_eq!(r.id, Some(json!(7)));
        assert_eq!(r.params, Some(json!({"name": "a"})));
    }

    #[test]
    fn notification_has_no_id() {
        let r = single(r#"{"jsonrpc":"2.0","method":"status"}"#).expect("valid notification");
        assert_eq!(r.id, None);
    }

    #[test]
    fn rejects_bad_json() {
        match parse_line(b"{not json") {
            Incoming::Invalid(resp) => {
                assert_eq!(
                    resp.error.as_ref().map(|e| e.code),
                    Some(codes::PARSE_ERROR)
                )
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn rejects_wrong_version_and_keeps_id() {
        let (id, e) = single(r#"{"jsonrpc":"1.0","method":"status","id":"x"}"#).unwrap_err();
        assert_eq!(id, json!("x"));
        assert_eq!(e.code, codes::INVALID_REQUEST);
    }

    #[test]
    fn rejects_positional_params() {
        let (_, e) =
            single(r#"{"jsonrpc":"2.0","method":"status","params":[1],"id":1}"#).unwrap_err();
        assert_eq!(e.code, codes::INVALID_PARAMS);
    }

    #[test]
    fn rejects_non_object_and_bad_id() {
        assert_eq!(single("42").unwrap_err().1.code, codes::INVALID_REQUEST);
        assert_eq!(
            single(r#"{"jsonrpc":"2.0","method":"status","id":[1]}"#)
                .unwrap_err()
                .1
                .code,
            codes::INVALID_REQUEST
        );
        assert_eq!(
            single(r#"{"jsonrpc":"2.0","method":5,"id":1}"#)
                .unwrap_err()
                .1
                .code,
            codes::INVALID_REQUEST
        );
    }

    #[test]
    fn reads_limited_lines() {
        let mut r = std::io::BufReader::with_capacity(4, &b"ab\r\ncdefgh\nxyz"[..]);
        let mut buf = Vec::new();
        assert_eq!(
            read_line_limited(&mut r, 6, &mut buf).unwrap(),
            LineRead::Line
        );
        assert_eq!(buf, b"ab");
        assert_eq!(
            read_line_limited(&mut r, 6, &mut buf).unwrap(),
            LineRead::Line
        );
        assert_eq!(buf, b"cdefgh");
        assert_eq!(
            read_line_limited(&mut r, 6, &mut buf).unwrap(),
            LineRead::Line
        );
        assert_eq!(buf, b"xyz");
        assert_eq!(
            read_line_limited(&mut r, 6, &mut buf).unwrap(),
            LineRead::Eof
        );
        let mut r = std::io::BufReader::with_capacity(4, &b"abcdefg\n"[..]);
        assert_eq!(
            read_line_limited(&mut r, 6, &mut buf).unwrap(),
            LineRead::TooLong
        );
    }

    #[test]
    fn batches() {
        match parse_line(br#"[{"jsonrpc":"2.0","method":"a","id":1}, 3]"#) {
            Incoming::Batch(v) => {
                assert_eq!(v.len(), 2);
                assert!(v[0].is_ok());
                assert!(v[1].is_err());
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(matches!(parse_line(b"[]"), Incoming::Invalid(_)));
    }

    #[test]
    fn rejects_overlong_line() {
        let line = vec![b' '; MAX_LINE_LEN + 1];
        match parse_line(&line) {
            Incoming::Invalid(resp) => {
                assert_eq!(resp.error.map(|e| e.code), Some(codes::INVALID_REQUEST))
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn null_result_is_a_result() {
        let r: Response =
            serde_json::from_str(r#"{"jsonrpc":"2.0","result":null,"id":1}"#).unwrap();
        assert_eq!(r.result, Some(Value::Null));
        let r: Response =
            serde_json::from_str(r#"{"jsonrpc":"2.0","error":{"code":1,"message":"m"},"id":1}"#)
                .unwrap();
        assert_eq!(r.result, None);
    }

    #[test]
    fn response_has_exactly_one_of_result_and_error() {
        let ok = serde_json::to_value(Response::ok(json!(1), json!({"tag": 3}))).unwrap();
        assert_eq!(ok, json!({"jsonrpc":"2.0","result":{"tag":3},"id":1}));
        let err = serde_json::to_value(Response::err(
            json!(1),
            ErrorObject::new(codes::NOT_FOUND, "export x not found"),
        ))
        .unwrap();
        assert_eq!(
            err,
            json!({"jsonrpc":"2.0","error":{"code":-32001,"message":"export x not found"},"id":1})
        );
    }
}
