//! Hand-written HTTP/1.1 for the admin API: read one request (head, then a body
//! of `content-length`), write one answer and close. Requests are small JSON
//! documents from operators' tools; anything malformed or oversized ends that
//! connection only.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The most a request's head may take, and its body.
const MAX_HEAD: usize = 16 * 1024;
const MAX_BODY: usize = 1 << 20;

/// One request, read whole.
pub(super) struct Request {
    pub method: String,
    /// The path without its query string.
    pub path: String,
    /// What followed the `?`, still percent-encoded ("" when there was none).
    pub query: String,
    pub authorization: Option<String>,
    pub body: Vec<u8>,
}

/// The next request on `stream`; `None` when it is malformed, oversized or cut short.
pub(super) async fn read_request(stream: &mut TcpStream) -> std::io::Result<Option<Request>> {
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p;
        }
        if buf.len() > MAX_HEAD {
            return Ok(None);
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let mut lines = head.split("\r\n");
    let mut first = lines.next().unwrap_or("").split_whitespace();
    let method = first.next().unwrap_or("").to_string();
    let target = first.next().unwrap_or("");
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let (path, query) = (path.to_string(), query.to_string());
    let mut length = 0usize;
    let mut authorization = None;
    for line in lines {
        if let Some((k, v)) = line.split_once(':') {
            match k.trim().to_ascii_lowercase().as_str() {
                "content-length" => length = v.trim().parse().unwrap_or(0),
                "authorization" => authorization = Some(v.trim().to_string()),
                _ => {}
            }
        }
    }
    if length > MAX_BODY {
        return Ok(None);
    }
    let mut body = buf[head_end + 4..].to_vec();
    while body.len() < length {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    body.truncate(length);
    Ok(Some(Request { method, path, query, authorization, body }))
}

/// The first value of `name` in a URL query string, percent-decoded (`+` is a
/// space). A malformed escape or a value that is not UTF-8 is an error, not a
/// different value.
pub(super) fn query_param(query: &str, name: &str) -> Result<Option<String>, String> {
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if percent_decode(k)? == name {
            return percent_decode(v).map(Some);
        }
    }
    Ok(None)
}

fn percent_decode(s: &str) -> Result<String, String> {
    let bad =
        || "malformed query string (a % must be followed by two hex digits, and the text must be UTF-8)".to_string();
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes.get(i + 1..i + 3).filter(|h| h.iter().all(u8::is_ascii_hexdigit)).ok_or_else(bad)?;
                let hex = std::str::from_utf8(hex).map_err(|_| bad())?;
                out.push(u8::from_str_radix(hex, 16).map_err(|_| bad())?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| bad())
}

/// Writes one answer and closes the connection.
pub(super) async fn respond(stream: &mut TcpStream, code: u16, ctype: &str, body: &str) -> std::io::Result<()> {
    respond_with(stream, code, ctype, &[], body).await
}

/// [`respond`] with extra headers.
pub(super) async fn respond_with(
    stream: &mut TcpStream,
    code: u16,
    ctype: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> std::io::Result<()> {
    let reason = match code {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        409 => "Conflict",
        503 => "Service Unavailable",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Error",
    };
    let extra: String = headers.iter().map(|(k, v)| format!("{k}: {v}\r\n")).collect();
    let head = format!(
        "HTTP/1.1 {code} {reason}\r\ncontent-type: {ctype}\r\ncontent-length: {}\r\n{extra}connection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_parameters_are_decoded_and_malformed_ones_refused() {
        assert_eq!(query_param("token=abc", "token"), Ok(Some("abc".into())));
        assert_eq!(query_param("a=1&token=x%2By+z&token=second", "token"), Ok(Some("x+y z".into())));
        assert_eq!(query_param("tok%65n=%C3%A9", "token"), Ok(Some("é".into())));
        assert_eq!(query_param("token", "token"), Ok(Some(String::new())));
        assert_eq!(query_param("", "token"), Ok(None));
        assert_eq!(query_param("&&=&other=1", "token"), Ok(None));
        assert!(query_param("token=%zz", "token").is_err());
        assert!(query_param("token=%4", "token").is_err());
        assert!(query_param("token=%", "token").is_err());
        assert!(query_param("token=%+1", "token").is_err());
        assert!(query_param("token=%ff", "token").is_err(), "not UTF-8");
        assert!(query_param("token=%C3%", "token").is_err());
    }
}
