//! The admin API's side of HTTP: a request as hyper hands it over becomes a
//! [`Request`] read whole (its body at most [`MAX_BODY`]), and an answer becomes
//! a response of known length. hyper reads and writes the protocol itself.

use std::convert::Infallible;

use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderName, HeaderValue, AUTHORIZATION, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::StatusCode;

/// The most a request's head may take, and its body.
pub(super) const MAX_HEAD: usize = 16 * 1024;
pub(super) const MAX_BODY: usize = 1 << 20;

/// What every answer's body is: a whole document, or the event stream.
pub(super) type Body = BoxBody<Bytes, Infallible>;

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

impl Request {
    /// Reads `req`'s body; `None` when it is larger than [`MAX_BODY`] (said by
    /// its `content-length` or found while reading) or cut short.
    pub(super) async fn read(req: hyper::Request<Incoming>) -> Option<Request> {
        let (head, body) = req.into_parts();
        let declared = head.headers.get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if declared.is_some_and(|n| n > MAX_BODY as u64) {
            return None;
        }
        let body = Limited::new(body, MAX_BODY).collect().await.ok()?.to_bytes().to_vec();
        let authorization = head.headers.get(AUTHORIZATION).and_then(|v| v.to_str().ok()).map(|v| v.trim().to_string());
        Some(Request {
            method: head.method.as_str().to_string(),
            path: head.uri.path().to_string(),
            query: head.uri.query().unwrap_or("").to_string(),
            authorization,
            body,
        })
    }
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

/// An answer of `code` with `body`; the connection closes after it.
pub(super) fn respond(code: u16, ctype: &str, body: String) -> hyper::Response<Body> {
    respond_with(code, ctype, &[], body.into())
}

/// [`respond`] with extra headers.
pub(super) fn respond_with(
    code: u16,
    ctype: &str,
    headers: &[(&'static str, &'static str)],
    body: Bytes,
) -> hyper::Response<Body> {
    let mut answer = hyper::Response::new(Full::new(body).boxed());
    *answer.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    with_headers(&mut answer, ctype, headers);
    answer
}

/// Sets the content type, `connection: close` (one request per connection, as
/// the server is built) and `headers` on `answer`.
pub(super) fn with_headers(answer: &mut hyper::Response<Body>, ctype: &str, headers: &[(&'static str, &'static str)]) {
    let h = answer.headers_mut();
    if let Ok(v) = HeaderValue::from_str(ctype) {
        h.insert(CONTENT_TYPE, v);
    }
    h.insert(CONNECTION, HeaderValue::from_static("close"));
    for (k, v) in headers {
        h.insert(HeaderName::from_static(k), HeaderValue::from_static(v));
    }
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
