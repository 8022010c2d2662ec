//! Messages: a raw frame with accessors for the parts the router reads, and
//! builders for the messages the router writes itself.
//!
//! Parsing is lazy and bounds-checked: a [`Reader`] walks a body and returns
//! [`ProtocolError::Malformed`] instead of panicking on a short or unterminated field.

use bytes::{BufMut, Bytes, BytesMut};
use smallvec::SmallVec;

use super::ProtocolError;

pub const PROTOCOL_V3: i32 = 196_608;
pub const SSL_REQUEST: i32 = 80_877_103;
pub const GSSENC_REQUEST: i32 = 80_877_104;
pub const CANCEL_REQUEST: i32 = 80_877_102;

/// One protocol message as it arrived, header included.
#[derive(Clone, Debug)]
pub struct Message {
    raw: Bytes,
    startup: bool,
}

impl Message {
    pub fn from_raw(raw: Bytes) -> Message {
        Message { raw, startup: false }
    }

    pub fn startup(raw: Bytes) -> Message {
        Message { raw, startup: true }
    }

    /// The type byte; 0 for a startup-phase frame, which has none.
    pub fn tag(&self) -> u8 {
        if self.startup {
            0
        } else {
            self.raw[0]
        }
    }

    pub fn body(&self) -> &[u8] {
        if self.startup {
            &self.raw[4..]
        } else {
            &self.raw[5..]
        }
    }

    pub fn raw(&self) -> &Bytes {
        &self.raw
    }

    pub fn len(&self) -> usize {
        self.raw.len()
    }

    pub fn is_empty(&self) -> bool {
        self.raw.is_empty()
    }

    pub fn reader(&self) -> Reader<'_> {
        Reader { buf: self.body(), what: "message" }
    }
}

/// A bounds-checked cursor over a message body.
pub struct Reader<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8], what: &'static str) -> Self {
        Reader { buf, what }
    }

    fn bad(&self) -> ProtocolError {
        ProtocolError::Malformed { what: self.what }
    }

    pub fn remaining(&self) -> &'a [u8] {
        self.buf
    }

    pub fn u8(&mut self) -> Result<u8, ProtocolError> {
        let (&b, rest) = self.buf.split_first().ok_or_else(|| self.bad())?;
        self.buf = rest;
        Ok(b)
    }

    pub fn i16(&mut self) -> Result<i16, ProtocolError> {
        let b = self.bytes(2)?;
        Ok(i16::from_be_bytes([b[0], b[1]]))
    }

    pub fn i32(&mut self) -> Result<i32, ProtocolError> {
        let b = self.bytes(4)?;
        Ok(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], ProtocolError> {
        if self.buf.len() < n {
            return Err(self.bad());
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    /// A NUL-terminated string.
    pub fn cstr(&mut self) -> Result<&'a str, ProtocolError> {
        let end = self.buf.iter().position(|&b| b == 0).ok_or_else(|| self.bad())?;
        let s = std::str::from_utf8(&self.buf[..end]).map_err(|_| self.bad())?;
        self.buf = &self.buf[end + 1..];
        Ok(s)
    }

    /// A length-prefixed value as in Bind and DataRow; `None` for SQL NULL.
    pub fn value(&mut self) -> Result<Option<&'a [u8]>, ProtocolError> {
        let n = self.i32()?;
        if n == -1 {
            return Ok(None);
        }
        if n < 0 {
            return Err(self.bad());
        }
        self.bytes(n as usize).map(Some)
    }
}

/// A startup-phase frame from a client.
#[derive(Debug)]
pub enum Startup {
    /// Protocol 3.0 with its parameters (`user`, `database`, `options`, …).
    Params(Vec<(String, String)>),
    Ssl,
    GssEnc,
    Cancel {
        pid: i32,
        key: i32,
    },
    /// A protocol version the router does not speak.
    Unsupported(i32),
}

impl Startup {
    pub fn parse(m: &Message) -> Result<Startup, ProtocolError> {
        let mut r = Reader::new(m.body(), "startup");
        let code = r.i32()?;
        Ok(match code {
            SSL_REQUEST => Startup::Ssl,
            GSSENC_REQUEST => Startup::GssEnc,
            CANCEL_REQUEST => Startup::Cancel { pid: r.i32()?, key: r.i32()? },
            PROTOCOL_V3 => {
                let mut params = Vec::new();
                loop {
                    let k = r.cstr()?;
                    if k.is_empty() {
                        break;
                    }
                    params.push((k.to_string(), r.cstr()?.to_string()));
                }
                Startup::Params(params)
            }
            other => Startup::Unsupported(other),
        })
    }
}

/// `Parse`: a statement name, its text and the parameter types the client fixed.
#[derive(Debug, Clone)]
pub struct Parse<'a> {
    pub name: &'a str,
    pub query: &'a str,
    pub param_types: Vec<i32>,
}

impl<'a> Parse<'a> {
    #[allow(clippy::self_named_constructors)]
    pub fn parse(m: &'a Message) -> Result<Parse<'a>, ProtocolError> {
        let mut r = Reader::new(m.body(), "Parse");
        let name = r.cstr()?;
        let query = r.cstr()?;
        let n = r.i16()?;
        let mut param_types = Vec::with_capacity(n.max(0) as usize);
        for _ in 0..n {
            param_types.push(r.i32()?);
        }
        Ok(Parse { name, query, param_types })
    }
}

/// `Bind`: the parts the router reads (names, formats, values).
#[derive(Debug)]
pub struct Bind<'a> {
    pub portal: &'a str,
    pub statement: &'a str,
    /// Inline for the usual handful: parsing a Bind allocates nothing.
    pub param_formats: SmallVec<[i16; 4]>,
    pub params: SmallVec<[Option<&'a [u8]>; 8]>,
    /// Result formats and everything after the parameters, passed on untouched.
    pub tail: &'a [u8],
    /// The body after the statement name (formats, parameters, tail): what a
    /// Bind naming another statement carries unchanged.
    after_statement: &'a [u8],
}

impl<'a> Bind<'a> {
    pub fn parse(m: &'a Message) -> Result<Bind<'a>, ProtocolError> {
        let mut r = Reader::new(m.body(), "Bind");
        let portal = r.cstr()?;
        let statement = r.cstr()?;
        let after_statement = r.remaining();
        let nf = r.i16()?;
        let mut param_formats = SmallVec::with_capacity(nf.max(0) as usize);
        for _ in 0..nf {
            param_formats.push(r.i16()?);
        }
        let np = r.i16()?;
        let mut params = SmallVec::with_capacity(np.max(0) as usize);
        for _ in 0..np {
            params.push(r.value()?);
        }
        Ok(Bind { portal, statement, param_formats, params, tail: r.remaining(), after_statement })
    }

    /// 0 for text, 1 for binary, per the formats rule of the protocol.
    pub fn format_of(&self, i: usize) -> i16 {
        match self.param_formats.len() {
            0 => 0,
            1 => self.param_formats[0],
            _ => self.param_formats.get(i).copied().unwrap_or(0),
        }
    }

    /// The same Bind, naming another prepared statement.
    pub fn with_statement(&self, statement: &str) -> Bytes {
        let mut buf = BytesMut::new();
        self.put_with_statement(&mut buf, statement);
        buf.freeze()
    }

    /// Writes [`Self::with_statement`] into `buf`.
    pub fn put_with_statement(&self, buf: &mut BytesMut, statement: &str) {
        let len = 4 + self.portal.len() + 1 + statement.len() + 1 + self.after_statement.len();
        buf.reserve(1 + len);
        buf.put_u8(b'B');
        buf.put_i32(len as i32);
        buf.put_slice(self.portal.as_bytes());
        buf.put_u8(0);
        buf.put_slice(statement.as_bytes());
        buf.put_u8(0);
        buf.put_slice(self.after_statement);
    }
}

/// `Describe` or `Close`: `S` for a statement, `P` for a portal, and its name.
pub fn target_and_name(m: &Message) -> Result<(u8, &str), ProtocolError> {
    let mut r = Reader::new(m.body(), "Describe/Close");
    let kind = r.u8()?;
    if kind != b'S' && kind != b'P' {
        return Err(ProtocolError::Malformed { what: "Describe/Close" });
    }
    Ok((kind, r.cstr()?))
}

/// `Execute`: the portal name.
pub fn execute_portal(m: &Message) -> Result<&str, ProtocolError> {
    Reader::new(m.body(), "Execute").cstr()
}

/// `Query`: the SQL text.
pub fn query_text(m: &Message) -> Result<&str, ProtocolError> {
    Reader::new(m.body(), "Query").cstr()
}

/// The fields of an `ErrorResponse` or `NoticeResponse`.
pub fn error_fields(m: &Message) -> Vec<(u8, String)> {
    let mut r = Reader::new(m.body(), "ErrorResponse");
    let mut out = Vec::new();
    while let Ok(code) = r.u8() {
        if code == 0 {
            break;
        }
        match r.cstr() {
            Ok(v) => out.push((code, v.to_string())),
            Err(_) => break,
        }
    }
    out
}

/// SQLSTATE and message of an `ErrorResponse`, for logs and errors of our own.
pub fn error_summary(m: &Message) -> (String, String) {
    let f = error_fields(m);
    let get = |c: u8| f.iter().find(|(k, _)| *k == c).map(|(_, v)| v.clone()).unwrap_or_default();
    (get(b'C'), get(b'M'))
}

/// Writes one message: type byte, length, body.
pub struct Builder {
    buf: BytesMut,
    tagged: bool,
}

impl Builder {
    pub fn new(tag: u8) -> Builder {
        let mut buf = BytesMut::with_capacity(64);
        buf.put_u8(tag);
        buf.put_i32(0);
        Builder { buf, tagged: true }
    }

    /// A startup-phase frame (no type byte).
    pub fn untagged() -> Builder {
        let mut buf = BytesMut::with_capacity(64);
        buf.put_i32(0);
        Builder { buf, tagged: false }
    }

    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.buf.put_u8(v);
        self
    }
    pub fn i16(&mut self, v: i16) -> &mut Self {
        self.buf.put_i16(v);
        self
    }
    pub fn i32(&mut self, v: i32) -> &mut Self {
        self.buf.put_i32(v);
        self
    }
    pub fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.buf.put_slice(v);
        self
    }
    pub fn cstr(&mut self, v: &str) -> &mut Self {
        self.buf.put_slice(v.as_bytes());
        self.buf.put_u8(0);
        self
    }

    pub fn finish(&mut self) -> Bytes {
        let mut buf = std::mem::take(&mut self.buf);
        let off = usize::from(self.tagged);
        let len = (buf.len() - off) as i32;
        buf[off..off + 4].copy_from_slice(&len.to_be_bytes());
        buf.freeze()
    }
}

/// Writes Bind (unnamed portal, text parameters, text results), Describe of the
/// portal, Execute of all its rows and Sync into `buf`: a prepared statement run
/// as one simple query would be, without an allocation per message.
pub fn put_bind_execute_sync(buf: &mut BytesMut, statement: &str, values: &[Vec<u8>]) {
    let start = buf.len();
    buf.put_u8(b'B');
    buf.put_i32(0);
    buf.put_u8(0); // portal ""
    buf.put_slice(statement.as_bytes());
    buf.put_u8(0);
    buf.put_i16(0); // every parameter in text format
    buf.put_i16(values.len() as i16);
    for v in values {
        buf.put_i32(v.len() as i32);
        buf.put_slice(v);
    }
    buf.put_i16(0); // every result column in text format
    let len = (buf.len() - start - 1) as i32;
    buf[start + 1..start + 5].copy_from_slice(&len.to_be_bytes());
    buf.put_slice(&[b'D', 0, 0, 0, 6, b'P', 0]);
    buf.put_slice(&[b'E', 0, 0, 0, 9, 0, 0, 0, 0, 0]);
    buf.put_slice(&[b'S', 0, 0, 0, 4]);
}

pub fn ready_for_query(status: u8) -> Bytes {
    Bytes::copy_from_slice(&ready_for_query_bytes(status))
}

/// ReadyForQuery as plain bytes, for queueing without an allocation.
pub fn ready_for_query_bytes(status: u8) -> [u8; 6] {
    [b'Z', 0, 0, 0, 5, status]
}

pub fn command_complete(tag: &str) -> Bytes {
    Builder::new(b'C').cstr(tag).finish()
}

pub fn simple(tag: u8) -> Bytes {
    Builder::new(tag).finish()
}

pub fn parse_complete() -> Bytes {
    simple(b'1')
}
pub fn bind_complete() -> Bytes {
    simple(b'2')
}
pub fn close_complete() -> Bytes {
    simple(b'3')
}
pub fn no_data() -> Bytes {
    simple(b'n')
}
pub fn empty_query_response() -> Bytes {
    simple(b'I')
}
pub fn sync() -> Bytes {
    simple(b'S')
}
pub fn terminate() -> Bytes {
    simple(b'X')
}

pub fn parameter_status(name: &str, value: &str) -> Bytes {
    Builder::new(b'S').cstr(name).cstr(value).finish()
}

pub fn backend_key_data(pid: i32, key: i32) -> Bytes {
    Builder::new(b'K').i32(pid).i32(key).finish()
}

pub fn query(sql: &str) -> Bytes {
    Builder::new(b'Q').cstr(sql).finish()
}

pub fn parse(name: &str, sql: &str, param_types: &[i32]) -> Bytes {
    let mut b = Builder::new(b'P');
    b.cstr(name).cstr(sql).i16(param_types.len() as i16);
    for t in param_types {
        b.i32(*t);
    }
    b.finish()
}

pub fn describe(kind: u8, name: &str) -> Bytes {
    Builder::new(b'D').u8(kind).cstr(name).finish()
}

pub fn close(kind: u8, name: &str) -> Bytes {
    Builder::new(b'C').u8(kind).cstr(name).finish()
}

pub fn auth_ok() -> Bytes {
    Builder::new(b'R').i32(0).finish()
}

pub fn auth_md5(salt: [u8; 4]) -> Bytes {
    Builder::new(b'R').i32(5).bytes(&salt).finish()
}

pub fn auth_sasl(mechanisms: &[&str]) -> Bytes {
    let mut b = Builder::new(b'R');
    b.i32(10);
    for m in mechanisms {
        b.cstr(m);
    }
    b.u8(0).finish()
}

pub fn auth_sasl_continue(data: &[u8]) -> Bytes {
    Builder::new(b'R').i32(11).bytes(data).finish()
}

pub fn auth_sasl_final(data: &[u8]) -> Bytes {
    Builder::new(b'R').i32(12).bytes(data).finish()
}

pub fn password_message(data: &[u8]) -> Bytes {
    Builder::new(b'p').bytes(data).finish()
}

pub fn startup_message(params: &[(&str, &str)]) -> Bytes {
    let mut b = Builder::untagged();
    b.i32(PROTOCOL_V3);
    for (k, v) in params {
        b.cstr(k).cstr(v);
    }
    b.u8(0).finish()
}

pub fn cancel_request(pid: i32, key: i32) -> Bytes {
    Builder::untagged().i32(CANCEL_REQUEST).i32(pid).i32(key).finish()
}

/// The request for TLS a client sends before its startup packet.
pub fn ssl_request() -> Bytes {
    Builder::untagged().i32(SSL_REQUEST).finish()
}

/// A column of a `RowDescription` the router writes itself.
pub struct Column<'a> {
    pub name: &'a str,
    pub type_oid: i32,
    pub type_size: i16,
}

pub fn row_description(cols: &[Column<'_>]) -> Bytes {
    let mut b = Builder::new(b'T');
    b.i16(cols.len() as i16);
    for c in cols {
        b.cstr(c.name).i32(0).i16(0).i32(c.type_oid).i16(c.type_size).i32(-1).i16(0);
    }
    b.finish()
}

pub fn data_row<'a>(values: impl IntoIterator<Item = Option<&'a [u8]>>) -> Bytes {
    let mut b = Builder::new(b'D');
    b.i16(0);
    let mut n = 0i16;
    for v in values {
        n += 1;
        match v {
            None => b.i32(-1),
            Some(v) => b.i32(v.len() as i32).bytes(v),
        };
    }
    let mut out = BytesMut::from(&b.finish()[..]);
    out[5..7].copy_from_slice(&n.to_be_bytes());
    out.freeze()
}

/// Error severities as Postgres spells them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    Fatal,
    Notice,
    Warning,
}

impl Severity {
    fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "ERROR",
            Severity::Fatal => "FATAL",
            Severity::Notice => "NOTICE",
            Severity::Warning => "WARNING",
        }
    }
}

/// An `ErrorResponse` (or `NoticeResponse` for the notice severities) of our own.
pub fn error_response(severity: Severity, code: &str, message: &str, hint: Option<&str>) -> Bytes {
    let tag = match severity {
        Severity::Error | Severity::Fatal => b'E',
        Severity::Notice | Severity::Warning => b'N',
    };
    let mut b = Builder::new(tag);
    b.u8(b'S').cstr(severity.as_str());
    b.u8(b'V').cstr(severity.as_str());
    b.u8(b'C').cstr(code);
    b.u8(b'M').cstr(message);
    if let Some(h) = hint {
        b.u8(b'H').cstr(h);
    }
    b.u8(0).finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builder_sets_length_for_tagged_and_untagged() {
        let q = query("select 1");
        assert_eq!(q[0], b'Q');
        assert_eq!(i32::from_be_bytes([q[1], q[2], q[3], q[4]]) as usize, q.len() - 1);
        let s = startup_message(&[("user", "u")]);
        assert_eq!(i32::from_be_bytes([s[0], s[1], s[2], s[3]]) as usize, s.len());
        let c = cancel_request(1, 2);
        assert_eq!(c.len(), 16);
    }

    fn bind_message(portal: &str, statement: &str) -> Bytes {
        let mut b = Builder::new(b'B');
        b.cstr(portal).cstr(statement).i16(1).i16(1).i16(2).i32(8).bytes(&42i64.to_be_bytes()).i32(-1);
        b.i16(1).i16(0);
        b.finish()
    }

    #[test]
    fn bind_round_trips_with_a_new_statement_name() {
        let m = Message::from_raw(bind_message("", "s1"));
        let bind = Bind::parse(&m).unwrap();
        assert_eq!(bind.statement, "s1");
        assert_eq!(bind.params.len(), 2);
        assert_eq!(bind.params[1], None);
        assert_eq!(bind.format_of(1), 1);
        let again = Message::from_raw(bind.with_statement("sg_7"));
        let b2 = Bind::parse(&again).unwrap();
        assert_eq!(b2.statement, "sg_7");
        assert_eq!(b2.params.to_vec(), bind.params.to_vec());
        assert_eq!(b2.tail, bind.tail);
        // Byte for byte the Bind the client would have sent naming the new
        // statement, portal included.
        assert_eq!(again.raw(), &bind_message("", "sg_7")[..]);
        let named = Message::from_raw(bind_message("p1", "a_long_client_statement_name"));
        let renamed = Bind::parse(&named).unwrap().with_statement("s");
        assert_eq!(renamed, bind_message("p1", "s"));
    }

    #[test]
    fn truncated_bind_is_malformed_not_a_panic() {
        let m = Message::from_raw(Builder::new(b'B').cstr("").cstr("s").i16(0).i16(3).i32(100).finish());
        assert!(Bind::parse(&m).is_err());
    }
}
