//! The admin HTTP endpoint: a small JSON API the CLI talks to (`shardgate status`).
//!
//! Hand-written HTTP/1.1, one request per connection, GET only: it serves a few
//! tiny documents to operators' tools, and a full HTTP stack would be most of the
//! router's dependency tree.

use std::net::SocketAddr;
use std::sync::Arc;

use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info};

use crate::context::RouterContext;

#[derive(Serialize)]
pub struct ShardStatus {
    pub name: String,
    pub url: String,
    pub state: String,
    pub buckets: usize,
}

#[derive(Serialize)]
pub struct PlacementRange {
    pub first_bucket: u32,
    pub last_bucket: u32,
    pub shard: String,
}

/// What `shardgate status --json` prints.
#[derive(Serialize)]
pub struct Status {
    pub epoch: u64,
    pub key_column: String,
    pub key_type: String,
    pub bucket_count: u32,
    pub shards: Vec<ShardStatus>,
    /// `placements[b]` is the name of the shard holding bucket `b`.
    pub placements: Vec<String>,
    /// The same, as runs of consecutive buckets.
    pub placement_ranges: Vec<PlacementRange>,
    pub pins: Vec<(String, String)>,
    pub sharded_tables: Vec<String>,
    pub clients: usize,
}

pub fn status(ctx: &RouterContext) -> Status {
    let dir = ctx.directory.load();
    let counts = dir.bucket_counts();
    let name = |s: usize| {
        dir.shards
            .get(s)
            .map(|x| x.name.clone())
            .unwrap_or_default()
    };
    let mut ranges: Vec<PlacementRange> = Vec::new();
    for (b, &s) in dir.placements.iter().enumerate() {
        match ranges.last_mut() {
            Some(r) if r.shard == dir.shards[s].name && r.last_bucket + 1 == b as u32 => {
                r.last_bucket = b as u32
            }
            _ => ranges.push(PlacementRange {
                first_bucket: b as u32,
                last_bucket: b as u32,
                shard: name(s),
            }),
        }
    }
    let mut pins: Vec<(String, String)> = dir
        .pins
        .iter()
        .map(|(k, &s)| (k.to_string(), name(s)))
        .collect();
    pins.sort();
    Status {
        epoch: dir.epoch,
        key_column: dir.key_column.clone(),
        key_type: dir.key_type.sql_name().to_string(),
        bucket_count: dir.bucket_count,
        shards: dir
            .shards
            .iter()
            .enumerate()
            .map(|(i, s)| ShardStatus {
                name: s.name.clone(),
                url: s.url.clone(),
                state: format!("{:?}", s.state).to_lowercase(),
                buckets: counts[i],
            })
            .collect(),
        placements: dir.placements.iter().map(|&s| name(s)).collect(),
        placement_ranges: ranges,
        pins,
        sharded_tables: ctx.catalog.tables(),
        clients: ctx.clients.load(std::sync::atomic::Ordering::Relaxed),
    }
}

/// Serves the admin API on `addr` until the task is dropped. Returns the bound address.
pub async fn serve(
    addr: &str,
    ctx: Arc<RouterContext>,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    info!(%local, "admin API listening");
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let ctx = ctx.clone();
            tokio::spawn(async move {
                if let Err(e) = handle(stream, &ctx).await {
                    debug!(error = %e, "admin request failed");
                }
            });
        }
    });
    Ok((local, task))
}

async fn handle(mut stream: TcpStream, ctx: &RouterContext) -> std::io::Result<()> {
    let mut buf = vec![0u8; 8192];
    let mut len = 0;
    // Read the request head (the API takes no bodies).
    while !buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
        if len == buf.len() {
            return respond(&mut stream, 431, "text/plain", "request header too large\n").await;
        }
        let n = stream.read(&mut buf[len..]).await?;
        if n == 0 {
            return Ok(());
        }
        len += n;
    }
    let head = String::from_utf8_lossy(&buf[..len]);
    let mut parts = head.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    match (method, path) {
        ("GET", "/status") | ("GET", "/api/status") => {
            let body = serde_json::to_string_pretty(&status(ctx)).unwrap_or_else(|_| "{}".into());
            respond(&mut stream, 200, "application/json", &body).await
        }
        ("GET", "/health") => respond(&mut stream, 200, "text/plain", "ok\n").await,
        ("GET", _) => respond(&mut stream, 404, "text/plain", "not found; try /status\n").await,
        _ => respond(&mut stream, 405, "text/plain", "only GET is supported\n").await,
    }
}

async fn respond(
    stream: &mut TcpStream,
    code: u16,
    ctype: &str,
    body: &str,
) -> std::io::Result<()> {
    let reason = match code {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Error",
    };
    let head = format!(
        "HTTP/1.1 {code} {reason}\r\ncontent-type: {ctype}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}
