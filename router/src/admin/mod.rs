//! The admin HTTP endpoint: a small JSON API the CLI talks to (`shardgate status`),
//! the web page (`GET /`, see [`crate::web`]) and its live feed (`GET /events`, see
//! [`crate::events`]).
//!
//! HTTP/1.1 by hyper, one request per connection, each connection a task of its
//! own (an open event stream holds up nothing else), in the clear or over TLS
//! with the certificate clients' TLS uses (`[admin] tls`). A library rather than
//! hand-written HTTP since the API speaks TLS: with TLS, a browser, proxies and
//! `curl` all expect the protocol's corners (chunked bodies, pipelining, header
//! limits) to be right, and hyper is what tokio's ecosystem serves HTTP with.
//!
//! By file: `mod.rs` the server (accept loop, the token, the page and the event
//! stream); [`api`] the requests and answers, the one definition the CLI reads
//! too; [`routes`] the table of JSON endpoints; `commands.rs` and `pin.rs` what
//! the POST endpoints do; [`status`] what `GET /status` says; `http.rs` a request
//! read whole and an answer of known length; `answer.rs` an answer or a refusal as JSON.

mod answer;
pub mod api;
mod commands;
mod http;
mod pin;
mod routes;
pub mod status;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Bytes;
use hyper_util::rt::{TokioIo, TokioTimer};
// The admin token is compared in constant time (see `crate::auth`).
use subtle::ConstantTimeEq;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use self::answer::error_json;
use self::http::{query_param, respond, respond_with, Body, Request};
use crate::context::RouterContext;

pub use self::pin::write_home_row;
pub use self::status::status;

/// How long a client has to finish its TLS handshake, and to send a request's head.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What every connection of one admin server shares.
struct Shared {
    ctx: Arc<RouterContext>,
    token: Option<String>,
    /// Open event streams are long-lived: at most [`crate::events::MAX_STREAMS`].
    streams: Arc<tokio::sync::Semaphore>,
    /// Closed (its sender dropped) when the accept loop ends, so that event
    /// streams end with the server instead of outliving it.
    running: tokio::sync::watch::Receiver<()>,
}

/// Serves the admin API on `addr` in the clear until the task is aborted. Returns
/// the bound address. With a `token`, every request but `/health` and the web
/// page's static files must carry `Authorization: Bearer <token>`; `GET /events`
/// may carry it as `?token=` instead (a browser's `EventSource` cannot set headers).
pub async fn serve(
    addr: &str,
    ctx: Arc<RouterContext>,
    token: Option<String>,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    serve_with(addr, ctx, token, None).await
}

/// [`serve`], over TLS when `tls` is given (see [`crate::tls::https_acceptor`]):
/// then every connection must begin with a TLS handshake, and one that does not
/// (a request in the clear, say) is closed. The acceptor is kept in the
/// router's context, where a reload replaces it with one of the new
/// certificate ([`crate::reload`]).
pub async fn serve_with(
    addr: &str,
    ctx: Arc<RouterContext>,
    token: Option<String>,
    tls: Option<TlsAcceptor>,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    if token.is_none() && !local.ip().is_loopback() {
        // Anyone who reaches the port could move shards and read the status.
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!(
                "the admin API would listen on {local}, which is not a loopback address, without a token: \
                 set [admin] token, or listen on 127.0.0.1"
            ),
        ));
    }
    info!(%local, tls = tls.is_some(), "admin API listening");
    let https = tls.is_some();
    if let Some(tls) = tls {
        ctx.admin_tls.store(Some(Arc::new(tls)));
    }
    let (running_tx, running) = tokio::sync::watch::channel(());
    let shared = Arc::new(Shared {
        ctx,
        token,
        streams: Arc::new(tokio::sync::Semaphore::new(crate::events::MAX_STREAMS)),
        running,
    });
    let task = tokio::spawn(async move {
        let _running = running_tx;
        while let Ok((stream, _)) = listener.accept().await {
            // The handshake too is the connection's own task: a slow client
            // holds up no other.
            tokio::spawn(connection(stream, https, shared.clone()));
        }
    });
    Ok((local, task))
}

/// One connection: its TLS handshake when the server has TLS (with the
/// certificate in force), then one request.
async fn connection(stream: TcpStream, https: bool, shared: Arc<Shared>) {
    if !https {
        return serve_http(stream, shared).await;
    }
    // Stored before the server accepted anything; a reload replaces it.
    let Some(acceptor) = shared.ctx.admin_tls.load_full() else { return };
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
        Ok(Ok(stream)) => serve_http(stream, shared).await,
        Ok(Err(e)) => debug!(error = %e, "admin TLS handshake failed"),
        Err(_) => debug!("admin TLS handshake timed out"),
    }
}

/// Serves the one request of a connection, then closes it.
async fn serve_http<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(stream: S, shared: Arc<Shared>) {
    // Cancelled by an event stream whose client stopped reading: the connection
    // is dropped rather than left to wait on a socket nobody reads.
    let drop_connection = CancellationToken::new();
    let cancel = drop_connection.clone();
    let service = hyper::service::service_fn(move |req| {
        let (shared, cancel) = (shared.clone(), cancel.clone());
        async move { Ok::<_, Infallible>(handle(req, &shared, cancel).await) }
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .keep_alive(false)
        .max_header_size(http::MAX_HEAD)
        .timer(TokioTimer::new())
        .header_read_timeout(HANDSHAKE_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service);
    tokio::select! {
        done = connection => if let Err(e) = done {
            debug!(error = %e, "admin request failed");
        },
        _ = drop_connection.cancelled() => debug!("admin event stream dropped: its client stopped reading"),
    }
}

async fn handle(
    req: hyper::Request<hyper::body::Incoming>,
    shared: &Shared,
    drop_connection: CancellationToken,
) -> hyper::Response<Body> {
    let Some(req) = Request::read(req).await else {
        return respond(400, "application/json", error_json("malformed or oversized request"));
    };
    let get = req.method == "GET";
    // The page and its files hold no data (every number comes through /events),
    // so a browser can load them before it has the token.
    if get && req.path == "/" {
        let page = Bytes::from_static(crate::web::PAGE.as_bytes());
        return respond_with(200, "text/html; charset=utf-8", crate::web::PAGE_HEADERS, page);
    }
    if let Some((ctype, body)) = crate::web::asset(&req.path).filter(|_| get) {
        return respond_with(200, ctype, crate::web::ASSET_HEADERS, Bytes::from_static(body.as_bytes()));
    }
    let events = get && req.path == "/events";
    // Only the event stream takes the token in its URL: an `EventSource` cannot
    // send headers, and a URL is more easily seen than a header.
    let query_token = if events {
        match query_param(&req.query, "token") {
            Ok(t) => t,
            Err(e) => return respond(400, "application/json", error_json(&e)),
        }
    } else {
        None
    };
    if let Some(t) = &shared.token {
        let expected = format!("Bearer {t}");
        let by_header = req.authorization.as_deref().is_some_and(|a| a.as_bytes().ct_eq(expected.as_bytes()).into());
        let by_query = query_token.as_deref().is_some_and(|q| q.as_bytes().ct_eq(t.as_bytes()).into());
        if !by_header && !by_query && !req.path.starts_with("/health") {
            let hint = if events {
                "missing or wrong admin token (Authorization: Bearer …, or ?token=…)"
            } else {
                "missing or wrong admin token (Authorization: Bearer …)"
            };
            return respond(401, "application/json", error_json(hint));
        }
    }
    if events {
        let Ok(open) = shared.streams.clone().try_acquire_owned() else {
            let full = format!("{} event streams are open already; close one", crate::events::MAX_STREAMS);
            return respond(503, "application/json", error_json(&full));
        };
        use http_body_util::BodyExt;
        let body = crate::events::stream(shared.ctx.clone(), shared.running.clone(), open, drop_connection);
        let mut answer = hyper::Response::new(body.boxed());
        http::with_headers(&mut answer, crate::events::CONTENT_TYPE, crate::events::HEADERS);
        return answer;
    }
    if req.method == "GET" && req.path == "/metrics" {
        return respond(200, "text/plain; version=0.0.4", crate::metrics::render(&shared.ctx));
    }
    let (code, body) = routes::route(&shared.ctx, &req).await;
    respond(code, "application/json", body)
}
