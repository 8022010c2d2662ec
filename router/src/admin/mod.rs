//! The admin HTTP endpoint: a small JSON API the CLI talks to (`shardgate status`),
//! the web page (`GET /`, see [`crate::web`]) and its live feed (`GET /events`, see
//! [`crate::events`]).
//!
//! Hand-written HTTP/1.1, one request per connection, each connection a task of its
//! own (an open event stream holds up nothing else): it serves a few tiny documents
//! to operators' tools, and a full HTTP stack would be most of the router's
//! dependency tree.
//!
//! By file: `mod.rs` the server (accept loop, the token, the page and the event
//! stream); [`api`] the requests and answers, the one definition the CLI reads
//! too; [`routes`] the table of JSON endpoints; `commands.rs` and `pin.rs` what
//! the POST endpoints do; [`status`] what `GET /status` says; `http.rs` reading
//! a request and writing an answer; `answer.rs` an answer or a refusal as JSON.

mod answer;
pub mod api;
mod commands;
mod http;
mod pin;
mod routes;
pub mod status;

use std::net::SocketAddr;
use std::sync::Arc;

// The admin token is compared in constant time (see `crate::auth`).
use subtle::ConstantTimeEq;
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info};

use self::answer::error_json;
use self::http::{query_param, read_request, respond, respond_with};
use crate::context::RouterContext;

pub use self::pin::write_home_row;
pub use self::status::status;

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

/// Serves the admin API on `addr` until the task is aborted. Returns the bound
/// address. With a `token`, every request but `/health` and the web page's static
/// files must carry `Authorization: Bearer <token>`; `GET /events` may carry it as
/// `?token=` instead (a browser's `EventSource` cannot set headers).
pub async fn serve(
    addr: &str,
    ctx: Arc<RouterContext>,
    token: Option<String>,
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
    info!(%local, "admin API listening");
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
            let shared = shared.clone();
            tokio::spawn(async move {
                if let Err(e) = handle(stream, &shared).await {
                    debug!(error = %e, "admin request failed");
                }
            });
        }
    });
    Ok((local, task))
}

async fn handle(mut stream: TcpStream, shared: &Shared) -> std::io::Result<()> {
    let Some(req) = read_request(&mut stream).await? else {
        return respond(&mut stream, 400, "application/json", &error_json("malformed or oversized request")).await;
    };
    let get = req.method == "GET";
    // The page and its files hold no data (every number comes through /events),
    // so a browser can load them before it has the token.
    if get && req.path == "/" {
        return respond_with(&mut stream, 200, "text/html; charset=utf-8", crate::web::PAGE_HEADERS, crate::web::PAGE)
            .await;
    }
    if let Some((ctype, body)) = crate::web::asset(&req.path).filter(|_| get) {
        return respond_with(&mut stream, 200, ctype, crate::web::ASSET_HEADERS, body).await;
    }
    let events = get && req.path == "/events";
    // Only the event stream takes the token in its URL: an `EventSource` cannot
    // send headers, and a URL is more easily seen than a header.
    let query_token = if events {
        match query_param(&req.query, "token") {
            Ok(t) => t,
            Err(e) => return respond(&mut stream, 400, "application/json", &error_json(&e)).await,
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
            return respond(&mut stream, 401, "application/json", &error_json(hint)).await;
        }
    }
    if events {
        let Ok(_open) = shared.streams.clone().try_acquire_owned() else {
            return respond(
                &mut stream,
                503,
                "application/json",
                &error_json(&format!("{} event streams are open already; close one", crate::events::MAX_STREAMS)),
            )
            .await;
        };
        return crate::events::stream(stream, &shared.ctx, shared.running.clone()).await;
    }
    if req.method == "GET" && req.path == "/metrics" {
        return respond(&mut stream, 200, "text/plain; version=0.0.4", &crate::metrics::render(&shared.ctx)).await;
    }
    let (code, body) = routes::route(&shared.ctx, &req).await;
    respond(&mut stream, code, "application/json", &body).await
}
