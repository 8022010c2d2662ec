//! A client that speaks the wire protocol byte by byte, for tests that send
//! exactly the messages a driver would and compare the replies.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut f = vec![tag];
    f.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    f.extend_from_slice(body);
    f
}

pub fn cstr(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(s.as_bytes());
    out.push(0);
}

pub fn parse(name: &str, sql: &str, types: &[i32]) -> Vec<u8> {
    let mut b = Vec::new();
    cstr(&mut b, name);
    cstr(&mut b, sql);
    b.extend_from_slice(&(types.len() as i16).to_be_bytes());
    for t in types {
        b.extend_from_slice(&t.to_be_bytes());
    }
    frame(b'P', &b)
}

/// A Bind of `statement` to the unnamed portal; `binary` sends the parameters
/// as int8 in binary, else as text. Results in text.
pub fn bind(statement: &str, params: &[i64], binary: bool) -> Vec<u8> {
    bind_formats(statement, params, binary, &[])
}

/// [`bind`] with result format codes (none: all text; one: for every column;
/// else one per column).
pub fn bind_formats(statement: &str, params: &[i64], binary: bool, results: &[i16]) -> Vec<u8> {
    bind_portal("", statement, params, binary, results)
}

/// [`bind_formats`] to the portal `portal` (named or not).
pub fn bind_portal(portal: &str, statement: &str, params: &[i64], binary: bool, results: &[i16]) -> Vec<u8> {
    let mut b = Vec::new();
    cstr(&mut b, portal);
    cstr(&mut b, statement);
    b.extend_from_slice(&1i16.to_be_bytes());
    b.extend_from_slice(&(binary as i16).to_be_bytes());
    b.extend_from_slice(&(params.len() as i16).to_be_bytes());
    for p in params {
        let v = if binary { p.to_be_bytes().to_vec() } else { p.to_string().into_bytes() };
        b.extend_from_slice(&(v.len() as i32).to_be_bytes());
        b.extend_from_slice(&v);
    }
    b.extend_from_slice(&(results.len() as i16).to_be_bytes());
    for f in results {
        b.extend_from_slice(&f.to_be_bytes());
    }
    frame(b'B', &b)
}

pub fn describe_statement(name: &str) -> Vec<u8> {
    let mut b = vec![b'S'];
    cstr(&mut b, name);
    frame(b'D', &b)
}

pub fn describe_portal() -> Vec<u8> {
    frame(b'D', b"P\0")
}

/// Describe of the portal `portal` (named or not).
pub fn describe_portal_named(portal: &str) -> Vec<u8> {
    let mut b = vec![b'P'];
    cstr(&mut b, portal);
    frame(b'D', &b)
}

pub fn execute() -> Vec<u8> {
    frame(b'E', b"\0\0\0\0\0")
}

/// Execute of the portal `portal`, at most `limit` rows (0: all).
pub fn execute_portal(portal: &str, limit: i32) -> Vec<u8> {
    let mut b = Vec::new();
    cstr(&mut b, portal);
    b.extend_from_slice(&limit.to_be_bytes());
    frame(b'E', &b)
}

pub fn close_statement(name: &str) -> Vec<u8> {
    let mut b = vec![b'S'];
    cstr(&mut b, name);
    frame(b'C', &b)
}

pub fn close_portal(name: &str) -> Vec<u8> {
    let mut b = vec![b'P'];
    cstr(&mut b, name);
    frame(b'C', &b)
}

pub fn flush() -> Vec<u8> {
    frame(b'H', b"")
}

pub fn sync() -> Vec<u8> {
    frame(b'S', b"")
}

pub fn query(sql: &str) -> Vec<u8> {
    let mut b = Vec::new();
    cstr(&mut b, sql);
    frame(b'Q', &b)
}

pub struct Raw {
    s: TcpStream,
    buf: Vec<u8>,
}

impl Raw {
    pub async fn login(port: u16) -> Raw {
        Raw::login_to(port, "app").await
    }

    /// Logs in as `postgres` to `database`.
    pub async fn login_to(port: u16, database: &str) -> Raw {
        let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let mut body = b"\x00\x03\x00\x00user\0postgres\0database\0".to_vec();
        cstr(&mut body, database);
        body.push(0);
        let mut startup = ((body.len() + 4) as i32).to_be_bytes().to_vec();
        startup.extend_from_slice(&body);
        s.write_all(&startup).await.unwrap();
        let mut raw = Raw { s, buf: Vec::new() };
        raw.replies().await;
        raw
    }

    pub async fn next(&mut self) -> (u8, Vec<u8>) {
        self.try_next().await.unwrap_or_else(|e| panic!("{e}"))
    }

    /// The next message, or why none came: no answer within 10 seconds, or
    /// the connection closed.
    pub async fn try_next(&mut self) -> Result<(u8, Vec<u8>), String> {
        loop {
            if self.buf.len() >= 5 {
                let len = i32::from_be_bytes(self.buf[1..5].try_into().unwrap()) as usize;
                if self.buf.len() > len {
                    let m: Vec<u8> = self.buf.drain(..1 + len).collect();
                    return Ok((m[0], m[5..].to_vec()));
                }
            }
            let mut chunk = [0u8; 8192];
            let n = match tokio::time::timeout(std::time::Duration::from_secs(10), self.s.read(&mut chunk)).await {
                Err(_) => return Err("no answer in 10 s (a hang)".into()),
                Ok(Err(e)) => return Err(format!("connection broken: {e}")),
                Ok(Ok(0)) => return Err("connection closed".into()),
                Ok(Ok(n)) => n,
            };
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// The replies up to ReadyForQuery, as lines a test can compare: what
    /// each message says, without what legitimately differs (notices,
    /// parameter status, backend keys, error texts and positions).
    pub async fn replies(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        loop {
            let (tag, body) = self.next().await;
            out.extend(reply_line(tag, &body));
            if tag == b'Z' {
                return out;
            }
        }
    }

    /// Sends messages without waiting for an answer (a pipeline's first part).
    pub async fn send(&mut self, messages: &[Vec<u8>]) {
        self.s.write_all(&messages.concat()).await.unwrap();
    }

    /// [`Raw::send`], saying why the messages could not be sent.
    pub async fn try_send(&mut self, messages: &[Vec<u8>]) -> Result<(), String> {
        self.s.write_all(&messages.concat()).await.map_err(|e| format!("cannot send: {e}"))
    }

    pub async fn run(&mut self, messages: &[Vec<u8>]) -> Vec<String> {
        self.s.write_all(&messages.concat()).await.unwrap();
        self.replies().await
    }
}

/// The SQLSTATE of an ErrorResponse's body (its `C` field).
pub fn error_code(body: &[u8]) -> String {
    body.split(|&b| b == 0)
        .find(|f| f.first() == Some(&b'C'))
        .map(|f| String::from_utf8_lossy(&f[1..]).to_string())
        .unwrap_or_default()
}

/// A reply as the line [`Raw::replies`] gives for it; None for what
/// legitimately differs between servers (notices, parameter status, backend
/// keys, authentication).
pub fn reply_line(tag: u8, body: &[u8]) -> Option<String> {
    Some(match tag {
        b'S' | b'N' | b'K' | b'R' => return None,
        b'E' => format!("error {}", error_code(body)),
        b'Z' => format!("ready {}", body[0] as char),
        b'T' => format!("T {}", describe_columns(body)),
        b'D' | b'C' | b't' => format!("{} {:?}", tag as char, body),
        other => format!("{}", other as char),
    })
}

/// A RowDescription's columns as `name type typlen typmod format` each, without
/// the table OIDs and column numbers, which differ between servers.
pub fn describe_columns(body: &[u8]) -> String {
    let n = i16::from_be_bytes([body[0], body[1]]);
    let mut at = 2;
    let mut cols = Vec::new();
    for _ in 0..n {
        let end = at + body[at..].iter().position(|&b| b == 0).unwrap();
        let name = String::from_utf8_lossy(&body[at..end]).to_string();
        let f = &body[end + 1..end + 19];
        let typ = i32::from_be_bytes(f[6..10].try_into().unwrap());
        let len = i16::from_be_bytes(f[10..12].try_into().unwrap());
        let typmod = i32::from_be_bytes(f[12..16].try_into().unwrap());
        let format = i16::from_be_bytes(f[16..18].try_into().unwrap());
        cols.push(format!("{name} {typ} {len} {typmod} {format}"));
        at = end + 19;
    }
    cols.join(", ")
}
