//! One server connection to a shard, logged in with the router's own credentials,
//! over TLS when the shard URL's `sslmode` says so (`crate::tls`).

use std::time::Duration;

use tokio::net::TcpStream;

use crate::auth;
use crate::protocol::messages::{self, error_summary, Reader};
use crate::protocol::{Connection, Message, ProtocolError};
use crate::tls::{ShardSslMode, ShardTls, Stream, TlsError};

/// Where and how to reach one shard.
#[derive(Clone, PartialEq, Eq)]
pub struct ShardAddress {
    pub host: String,
    pub port: u16,
    pub database: String,
    pub user: String,
    /// Never logged, never shown in status output.
    pub password: Option<String>,
    /// The URL's `sslmode`, `sslrootcert`, `sslcert` and `sslkey`.
    pub tls: ShardTls,
    /// A client role's login material (`crate::roles`): when set, it answers
    /// the shard's password request instead of `password`.
    pub pass_through: Option<std::sync::Arc<auth::PassThrough>>,
}

impl ShardAddress {
    /// Reads a libpq URL:
    /// `postgres[ql]://user[:password]@host[:port]/database[?sslmode=…&sslrootcert=…]`.
    /// Of the query parameters, the TLS ones are kept (`crate::tls::ShardTls`);
    /// the others are not used.
    pub fn from_url(url: &str) -> Result<ShardAddress, String> {
        let rest = url
            .strip_prefix("postgres://")
            .or_else(|| url.strip_prefix("postgresql://"))
            .ok_or_else(|| format!("shard URL must start with postgres://, got {:?}", redact(url)))?;
        let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
        let tls = tls_params(query).map_err(|e| format!("shard URL {:?}: {e}", redact(url)))?;
        let (auth, hostpart) = match rest.rsplit_once('@') {
            Some((a, h)) => (Some(a), h),
            None => (None, rest),
        };
        let (user, password) = match auth {
            Some(a) => match a.split_once(':') {
                Some((u, p)) => (u.to_string(), Some(percent_decode(p))),
                None => (a.to_string(), None),
            },
            None => ("postgres".to_string(), None),
        };
        let (hostport, database) = hostpart.split_once('/').unwrap_or((hostpart, ""));
        let (host, port) = match hostport.rsplit_once(':') {
            Some((h, p)) => {
                (h.to_string(), p.parse().map_err(|_| format!("bad port {p:?} in shard URL {:?}", redact(url)))?)
            }
            None => (hostport.to_string(), 5432),
        };
        if host.is_empty() {
            return Err(format!("shard URL {:?} names no host", redact(url)));
        }
        let database = if database.is_empty() { user.clone() } else { database.to_string() };
        Ok(ShardAddress { host, port, database, user: percent_decode(&user), password, tls, pass_through: None })
    }

    /// The URL without its password, fit for logs and status output, and what
    /// the directory stores: it keeps the TLS parameters, so a router that
    /// learns the shard from the directory reaches it the same way.
    pub fn display_url(&self) -> String {
        let mut url = format!("postgres://{}@{}:{}/{}", self.user, self.host, self.port, self.database);
        for (i, (name, value)) in self.tls.url_params().into_iter().enumerate() {
            url.push(if i == 0 { '?' } else { '&' });
            url.push_str(&format!("{name}={}", percent_encode(&value)));
        }
        url
    }
}

impl std::fmt::Debug for ShardAddress {
    /// The URL without its password: a Debug print must not leak it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ShardAddress({})", self.display_url())
    }
}

/// The TLS settings among a URL's query parameters.
fn tls_params(query: &str) -> Result<ShardTls, String> {
    let mut tls = ShardTls::default();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        tls.set(&percent_decode(name), &percent_decode(value))?;
    }
    tls.check()?;
    Ok(tls)
}

/// Escapes what would end or split a query parameter's value.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '%' | '&' | '=' | '#' | '?' | '+' | ' ' => out.push_str(&format!("%{:02X}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A URL with any password replaced, for error messages.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let auth = &url[s + 3..at];
            match auth.split_once(':') {
                Some((u, _)) => format!("{}{}:***{}", &url[..s + 3], u, &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("cannot connect to {url}: {source}")]
    Connect { url: String, source: std::io::Error },
    #[error("connecting to {url} timed out")]
    Timeout { url: String },
    #[error("cannot open TLS to {url}: {source}")]
    Tls { url: String, source: TlsError },
    #[error("login to {url} failed: {message}")]
    Login { url: String, code: String, message: String },
    #[error("{0}")]
    Protocol(#[from] ProtocolError),
}

/// A logged-in server connection.
pub struct Backend {
    pub conn: Connection<Stream>,
    /// Process id and secret for cancelling a query on this connection.
    pub pid: i32,
    pub secret: i32,
    /// `ParameterStatus` values the server reported at login.
    pub params: Vec<(String, String)>,
    /// Server-side names of statements prepared on this connection (the
    /// router's own `sg_…` hashes, so a fast unkeyed hash is safe).
    pub prepared: rustc_hash::FxHashSet<String>,
    /// Set when the connection is in an unknown state (an I/O error, a half-read
    /// response); such a connection is closed instead of returning to the pool.
    pub broken: bool,
    /// Signature of the session settings applied on this connection (`SET …`
    /// replayed for the session using it); None when unknown.
    pub settings: Option<u64>,
    /// The session thread whose event loop this connection's socket belongs to
    /// (see [`crate::pool`]); it goes back to that thread's idle list.
    pub thread_list: usize,
    /// When it logged in (for `server_lifetime`).
    pub opened: crate::clock::Stamp,
    /// When it last went back to its pool (for `server_idle_timeout`).
    pub idle_since: crate::clock::Stamp,
}

impl Backend {
    /// Whether the server has closed this idle connection or sent it something
    /// unasked (the FATAL of a shutdown or of `pg_terminate_backend`): an idle
    /// connection's socket has nothing to read unless the server gave up on it.
    /// One non-blocking read on the TCP socket, under TLS too (a TLS record or
    /// close_notify is something unasked as well); a byte it takes does not
    /// matter, the connection is dropped then.
    pub fn closed_by_server(&self) -> bool {
        if self.conn.has_buffered() {
            return true;
        }
        let Some(tcp) = self.conn.get_ref().tcp() else { return true };
        let mut byte = [0u8; 1];
        !matches!(tcp.try_read(&mut byte), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
    }

    pub async fn connect(addr: &ShardAddress, timeout: Duration) -> Result<Backend, BackendError> {
        Self::connect_with(addr, timeout, &[]).await
    }

    /// Logs in with more startup parameters, e.g. `("replication", "database")`
    /// for a logical replication connection (the migrator's snapshot copy).
    pub async fn connect_with(
        addr: &ShardAddress,
        timeout: Duration,
        extra: &[(&str, &str)],
    ) -> Result<Backend, BackendError> {
        let url = addr.display_url();
        let attempt = async {
            let first = Self::connect_inner(addr, &url, extra, addr.tls.mode.asks_first()).await;
            match first {
                // libpq's `allow`: in the clear first, with TLS when the server
                // refuses that (a `hostssl`-only pg_hba answers 28000).
                Err(BackendError::Login { code, .. }) if code == "28000" && addr.tls.mode == ShardSslMode::Allow => {
                    Self::connect_inner(addr, &url, extra, true).await
                }
                other => other,
            }
        };
        match crate::timer::timeout(timeout, attempt).await {
            Ok(r) => r,
            Err(_) => Err(BackendError::Timeout { url }),
        }
    }

    async fn connect_inner(
        addr: &ShardAddress,
        url: &str,
        extra: &[(&str, &str)],
        ask_tls: bool,
    ) -> Result<Backend, BackendError> {
        let tcp = TcpStream::connect((addr.host.as_str(), addr.port))
            .await
            .map_err(|source| BackendError::Connect { url: url.to_string(), source })?;
        tcp.set_nodelay(true).ok();
        let stream = addr
            .tls
            .negotiate(tcp, &addr.host, ask_tls)
            .await
            .map_err(|source| BackendError::Tls { url: url.to_string(), source })?;
        let mut conn = Connection::connecting(stream, 1 << 30);
        let mut params = vec![
            ("user", addr.user.as_str()),
            ("database", addr.database.as_str()),
            ("application_name", "shardgate"),
            ("client_encoding", "UTF8"),
        ];
        params.retain(|(k, _)| !extra.iter().any(|(e, _)| e == k));
        params.extend_from_slice(extra);
        conn.send(&messages::startup_message(&params)).await?;
        let pass = addr.pass_through.as_deref();
        auth::authenticate_backend_as(&mut conn, &addr.user, addr.password.as_deref(), pass).await.map_err(|e| {
            BackendError::Login { url: url.to_string(), code: e.sqlstate().to_string(), message: e.to_string() }
        })?;
        let mut backend = Backend {
            conn,
            pid: 0,
            secret: 0,
            params: Vec::new(),
            prepared: Default::default(),
            broken: false,
            settings: Some(0),
            thread_list: crate::pool::thread_list(),
            opened: crate::clock::Stamp::now(),
            idle_since: crate::clock::Stamp::now(),
        };
        loop {
            let m = backend.conn.read().await?;
            match m.tag() {
                b'S' => {
                    let mut r = Reader::new(m.body(), "ParameterStatus");
                    backend.params.push((r.cstr()?.to_string(), r.cstr()?.to_string()));
                }
                b'K' => {
                    let mut r = Reader::new(m.body(), "BackendKeyData");
                    backend.pid = r.i32()?;
                    backend.secret = r.i32()?;
                }
                b'Z' => return Ok(backend),
                b'E' => {
                    let (code, message) = error_summary(&m);
                    return Err(BackendError::Login { url: url.to_string(), code, message });
                }
                _ => {} // NoticeResponse and the like
            }
        }
    }

    /// Runs a simple query and returns its rows as text, for the router's own
    /// housekeeping (catalog lookups). Errors come back as (SQLSTATE, message).
    pub async fn simple_query(&mut self, sql: &str) -> Result<Vec<Vec<Option<String>>>, (String, String)> {
        let io = |e: ProtocolError| ("08006".to_string(), e.to_string());
        self.conn.send(&messages::query(sql)).await.map_err(io)?;
        self.read_rows().await
    }

    /// Runs `sql` with text parameters `$1`, `$2`, … through the extended
    /// protocol (unnamed statement and portal), so no value is ever spliced
    /// into SQL text: the login lookup runs a configured query with a client's
    /// user name this way.
    pub async fn query_params(
        &mut self,
        sql: &str,
        params: &[&str],
    ) -> Result<Vec<Vec<Option<String>>>, (String, String)> {
        let io = |e: ProtocolError| ("08006".to_string(), e.to_string());
        let mut bind = messages::Builder::new(b'B');
        bind.cstr("").cstr("").i16(0).i16(params.len() as i16);
        for p in params {
            bind.i32(p.len() as i32).bytes(p.as_bytes());
        }
        bind.i16(0);
        self.conn.queue(&messages::parse("", sql, &[]));
        self.conn.queue(&bind.finish());
        self.conn.queue(&messages::Builder::new(b'E').cstr("").i32(0).finish());
        self.conn.queue(&messages::sync());
        self.conn.flush().await.map_err(io)?;
        self.read_rows().await
    }

    /// The rows of a statement's answer, up to ReadyForQuery.
    async fn read_rows(&mut self) -> Result<Vec<Vec<Option<String>>>, (String, String)> {
        let io = |e: ProtocolError| ("08006".to_string(), e.to_string());
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            let m: Message = match self.conn.read().await {
                Ok(m) => m,
                Err(e) => {
                    self.broken = true;
                    return Err(io(e));
                }
            };
            match m.tag() {
                b'D' => {
                    let mut r = Reader::new(m.body(), "DataRow");
                    let n = r.i16().map_err(io)?;
                    let mut row = Vec::with_capacity(n.max(0) as usize);
                    for _ in 0..n {
                        row.push(r.value().map_err(io)?.map(|v| String::from_utf8_lossy(v).into_owned()));
                    }
                    rows.push(row);
                }
                b'E' => error = Some(error_summary(&m)),
                b'Z' => break,
                _ => {}
            }
        }
        match error {
            Some(e) => Err(e),
            None => Ok(rows),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_and_redact() {
        let a = ShardAddress::from_url("postgres://app:s%40cret@db1:5433/orders").unwrap();
        assert_eq!(a.host, "db1");
        assert_eq!(a.port, 5433);
        assert_eq!(a.user, "app");
        assert_eq!(a.password.as_deref(), Some("s@cret"));
        assert_eq!(a.database, "orders");
        assert_eq!(a.display_url(), "postgres://app@db1:5433/orders");
        assert_eq!(redact("postgres://app:pw@h/d"), "postgres://app:***@h/d");
        assert!(!format!("{a:?}").contains("cret"), "{a:?}");
        assert!(ShardAddress::from_url("mysql://x").is_err());
        let tls = ShardAddress::from_url("postgres://app@db1/orders?sslmode=verify-full&sslrootcert=/etc/my%20ca.pem")
            .unwrap();
        assert_eq!(tls.tls.mode, ShardSslMode::VerifyFull);
        assert_eq!(
            tls.display_url(),
            "postgres://app@db1:5432/orders?sslmode=verify-full&sslrootcert=/etc/my%20ca.pem"
        );
        assert_eq!(ShardAddress::from_url(&tls.display_url()).unwrap(), tls);
        assert!(ShardAddress::from_url("postgres://db1/x?sslmode=verify-ca").unwrap_err().contains("sslrootcert"));
        let d = ShardAddress::from_url("postgresql://127.0.0.1").unwrap();
        assert_eq!((d.port, d.user.as_str(), d.database.as_str()), (5432, "postgres", "postgres"));
    }
}
