//! The admin HTTP endpoint: a small JSON API the CLI talks to (`shardgate status`),
//! the web page (`GET /`, see [`crate::web`]) and its live feed (`GET /events`, see
//! [`crate::events`]).
//!
//! Hand-written HTTP/1.1, one request per connection, each connection a task of its
//! own (an open event stream holds up nothing else): it serves a few tiny documents
//! to operators' tools, and a full HTTP stack would be most of the router's
//! dependency tree.

use std::net::SocketAddr;
use std::sync::Arc;

use serde::Serialize;
use shardgate_directory::clock::now_ms;
// The admin token is compared in constant time (see `crate::auth`).
use subtle::ConstantTimeEq;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info, warn};

use crate::context::RouterContext;
use crate::sql::quote;

#[derive(Serialize)]
pub struct ShardStatus {
    pub name: String,
    pub url: String,
    pub state: String,
    pub buckets: usize,
    /// Whether it holds the reference tables' rows (a shard added at run time
    /// does not: reference reads and writes skip it).
    pub reference: bool,
    /// Rows and bytes the shard holds, from this node's last size measurement
    /// (`sizes_age_ms` old); absent until one was made.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rows: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
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
    /// This node's clock when it answered (ms since the Unix epoch): the reference
    /// for the ages and durations computed from the other timestamps.
    pub now_ms: u64,
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
    /// Age of the size measurement the shards' `rows` and `bytes` come from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sizes_age_ms: Option<u64>,
    pub clients: usize,
    /// This node's directory replica, when the directory is replicated.
    pub replica: Option<ReplicaStatus>,
    pub routers: Vec<shardgate_directory::state::RouterInfo>,
    /// Every move, newest last.
    pub moves: Vec<MoveStatus>,
}

/// One move as `shardgate status --json` lists it.
#[derive(Serialize)]
pub struct MoveStatus {
    pub id: u64,
    /// `bucket 17` or `tenant 42`.
    pub subject: String,
    pub phase: &'static str,
    pub source: String,
    pub target: String,
    /// The shard that owns the rows now.
    pub owner: String,
    pub counters: std::collections::BTreeMap<String, u64>,
    /// The last verify found both copies equal (when: `counters.verified_at_ms`).
    pub verified_clean: bool,
    /// The cutover under way (or the last one) is a rollback.
    pub cutover_back: bool,
    /// Cleanup keeps the source (the move was cancelled).
    pub keep_source: bool,
    pub note: Option<String>,
    pub request: Option<shardgate_directory::state::MoveRequest>,
    pub cutover_auto: bool,
    pub complete_auto: bool,
    /// Routers holding its statements right now (during a cutover or a verify cut).
    pub holding: bool,
    /// The latest shadow reads whose answers differed, newest first (counts are
    /// in `counters` as `shadow_*`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub shadow_samples: Vec<shardgate_directory::state::ShadowSample>,
    /// The phases it went through: `[phase, ms since the Unix epoch]`, oldest first.
    pub history: Vec<(&'static str, u64)>,
    pub created_ms: u64,
    pub updated_ms: u64,
}

pub fn move_status(dir: &shardgate_directory::Directory, m: &shardgate_directory::state::Move) -> MoveStatus {
    let name = |s: usize| dir.shards.get(s).map(|x| x.name.clone()).unwrap_or_default();
    MoveStatus {
        id: m.id,
        subject: m.subject.to_string(),
        phase: m.phase.name(),
        source: name(m.source),
        target: name(m.target),
        owner: name(dir.owner_of(m)),
        counters: m.counters.clone(),
        verified_clean: m.verified_clean,
        cutover_back: m.cutover_back,
        keep_source: m.keep_source,
        note: m.note.clone(),
        request: m.request.clone(),
        cutover_auto: m.options.cutover_auto,
        complete_auto: m.options.complete_auto,
        holding: dir.holds.contains_key(&m.id),
        shadow_samples: {
            let mut v: Vec<_> = m.shadow.values().flat_map(|c| c.samples.iter().cloned()).collect();
            v.sort_by_key(|x| std::cmp::Reverse(x.at_ms));
            v.truncate(5);
            v
        },
        history: m.history.iter().map(|(p, at)| (p.name(), *at)).collect(),
        created_ms: m.created_ms,
        updated_ms: m.updated_ms,
    }
}

#[derive(Serialize)]
pub struct ReplicaStatus {
    pub node_id: u64,
    pub leader: Option<u64>,
    pub term: u64,
    pub role: &'static str,
    pub applied_index: u64,
    pub voters: Vec<u64>,
    pub learners: Vec<u64>,
    /// Whether this node is within its lease (it may route writes).
    pub lease_valid: bool,
}

pub fn status(ctx: &RouterContext) -> Status {
    let dir = ctx.directory.load();
    let counts = dir.bucket_counts();
    let name = |s: usize| dir.shards.get(s).map(|x| x.name.clone()).unwrap_or_default();
    let mut ranges: Vec<PlacementRange> = Vec::new();
    for (b, &s) in dir.placements.iter().enumerate() {
        match ranges.last_mut() {
            Some(r) if r.shard == dir.shards[s].name && r.last_bucket + 1 == b as u32 => r.last_bucket = b as u32,
            _ => ranges.push(PlacementRange { first_bucket: b as u32, last_bucket: b as u32, shard: name(s) }),
        }
    }
    let mut pins: Vec<(String, String)> = dir.pins.iter().map(|(k, &s)| (k.to_string(), name(s))).collect();
    pins.sort();
    let sizes = ctx.sizes.per_shard();
    let size_of = |shard: &str| sizes.as_ref().map(|(_, m)| m.get(shard).copied().unwrap_or_default());
    Status {
        epoch: dir.epoch,
        now_ms: now_ms(),
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
                reference: s.reference,
                rows: size_of(&s.name).map(|z| z.rows),
                bytes: size_of(&s.name).map(|z| z.bytes),
            })
            .collect(),
        sizes_age_ms: sizes.as_ref().map(|(age, _)| age.as_millis() as u64),
        placements: dir.placements.iter().map(|&s| name(s)).collect(),
        placement_ranges: ranges,
        pins,
        sharded_tables: ctx.catalog.tables(),
        replica: ctx.replica.as_ref().map(|(node, lease)| {
            let st = node.status();
            ReplicaStatus {
                node_id: st.id,
                leader: st.leader,
                term: st.term,
                role: if st.is_leader {
                    "leader"
                } else if st.learners.contains(&st.id) {
                    "learner"
                } else {
                    "follower"
                },
                applied_index: st.applied,
                voters: st.voters,
                learners: st.learners,
                lease_valid: node.lease_valid(*lease),
            }
        }),
        routers: dir.routers.values().cloned().collect(),
        moves: dir.moves.values().map(|m| move_status(&dir, m)).collect(),
        clients: ctx.clients.load(std::sync::atomic::Ordering::Relaxed),
    }
}

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

struct Request {
    method: String,
    /// The path without its query string.
    path: String,
    /// What followed the `?`, still percent-encoded ("" when there was none).
    query: String,
    authorization: Option<String>,
    body: Vec<u8>,
}

async fn read_request(stream: &mut TcpStream) -> std::io::Result<Option<Request>> {
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p;
        }
        if buf.len() > 16 * 1024 {
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
    if length > 1 << 20 {
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

fn json_error(msg: &str) -> String {
    serde_json::json!({ "error": msg }).to_string()
}

async fn handle(mut stream: TcpStream, shared: &Shared) -> std::io::Result<()> {
    let Some(req) = read_request(&mut stream).await? else {
        return respond(&mut stream, 400, "application/json", &json_error("malformed or oversized request")).await;
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
            Err(e) => return respond(&mut stream, 400, "application/json", &json_error(&e)).await,
        }
    } else {
        None
    };
    if let Some(t) = &shared.token {
        let expected = format!("Bearer {t}");
        let by_header = req.authorization.as_deref().is_some_and(|a| a.as_bytes().ct_eq(expected.as_bytes()).into());
        let by_query = query_token.as_deref().is_some_and(|q| q.as_bytes().ct_eq(t.as_bytes()).into());
        if !by_header && !by_query && req.path != "/health" {
            let hint = if events {
                "missing or wrong admin token (Authorization: Bearer …, or ?token=…)"
            } else {
                "missing or wrong admin token (Authorization: Bearer …)"
            };
            return respond(&mut stream, 401, "application/json", &json_error(hint)).await;
        }
    }
    if events {
        let Ok(_open) = shared.streams.clone().try_acquire_owned() else {
            return respond(
                &mut stream,
                503,
                "application/json",
                &json_error(&format!("{} event streams are open already; close one", crate::events::MAX_STREAMS)),
            )
            .await;
        };
        return crate::events::stream(stream, &shared.ctx, shared.running.clone()).await;
    }
    if req.method == "GET" && req.path == "/metrics" {
        return respond(&mut stream, 200, "text/plain; version=0.0.4", &crate::metrics::render(&shared.ctx)).await;
    }
    let (code, body) = route(&shared.ctx, &req).await;
    respond(&mut stream, code, "application/json", &body).await
}

/// The first value of `name` in a URL query string, percent-decoded (`+` is a
/// space). A malformed escape or a value that is not UTF-8 is an error, not a
/// different value.
fn query_param(query: &str, name: &str) -> Result<Option<String>, String> {
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

#[derive(serde::Deserialize)]
struct AddShard {
    name: String,
    url: String,
}

#[derive(serde::Deserialize)]
struct ShardName {
    name: String,
}

#[derive(serde::Deserialize)]
struct AddNode {
    id: u64,
    address: String,
    #[serde(default)]
    learner: bool,
}

#[derive(serde::Deserialize)]
struct NodeId {
    id: u64,
}

/// Adds a directory node: records its address (so every node can reach it), then
/// the membership change. A learner receives the log without voting; adding an
/// existing learner as a voter promotes it.
async fn add_node(ctx: &RouterContext, n: AddNode) -> (u16, String) {
    let cmd = shardgate_directory::state::Command::SetNodeAddress { id: n.id, address: n.address };
    let (code, body) = propose(ctx, cmd).await;
    if code != 200 {
        return (code, body);
    }
    let change =
        if n.learner { raft::prelude::ConfChangeType::AddLearnerNode } else { raft::prelude::ConfChangeType::AddNode };
    membership(ctx, n.id, change).await
}

async fn membership(ctx: &RouterContext, id: u64, change: raft::prelude::ConfChangeType) -> (u16, String) {
    let Some((node, _)) = &ctx.replica else {
        return (409, json_error("this node has a static directory; membership needs the replicated directory"));
    };
    match node.change_membership(id, change, std::time::Duration::from_secs(10)).await {
        Ok(outcome) => (200, serde_json::to_string(&outcome).unwrap_or_default()),
        Err(e) => (503, json_error(&e.to_string())),
    }
}

#[derive(serde::Deserialize)]
struct Pin {
    tenant: String,
    shard: String,
}

async fn route(ctx: &RouterContext, req: &Request) -> (u16, String) {
    use shardgate_directory::state::Command;
    match (req.method.as_str(), req.path.as_str()) {
        ("GET", "/status") | ("GET", "/api/status") => {
            (200, serde_json::to_string_pretty(&status(ctx)).unwrap_or_else(|_| "{}".into()))
        }
        ("GET", "/directory") => {
            // Linearizable: first make sure this replica has applied everything
            // committed so far (raft read index), then answer from it.
            if let Some((node, _)) = &ctx.replica {
                if let Err(e) = node.read_barrier(std::time::Duration::from_secs(3)).await {
                    return (503, json_error(&format!("{e}; GET /status shows this node's own, possibly stale, view")));
                }
            }
            (200, serde_json::to_string_pretty(&*ctx.directory.load()).unwrap_or_else(|_| "{}".into()))
        }
        ("GET", "/health") => (200, "{\"ok\":true}".into()),
        ("GET", "/load") => {
            let load = crate::load::cluster_load(&ctx.directory.load());
            (200, serde_json::to_string_pretty(&load).unwrap_or_else(|_| "{}".into()))
        }
        ("GET", "/sizes") => match crate::sizes::measure(ctx).await {
            Ok(sizes) => {
                ctx.sizes.store(&sizes);
                (200, serde_json::to_string_pretty(&sizes).unwrap_or_else(|_| "{}".into()))
            }
            Err(e) => (503, json_error(&format!("could not read bucket sizes from the shards: {e}"))),
        },
        ("GET", "/moves") => {
            let dir = ctx.directory.load();
            let moves: Vec<MoveStatus> = dir.moves.values().map(|m| move_status(&dir, m)).collect();
            (200, serde_json::to_string_pretty(&moves).unwrap_or_else(|_| "[]".into()))
        }
        ("POST", "/moves") => match serde_json::from_slice::<NewMove>(&req.body) {
            Ok(m) => create_move(ctx, m).await,
            Err(e) => (400, json_error(&format!("expected {{\"bucket\": … or \"tenant\": …, \"to\": …}}: {e}"))),
        },
        ("POST", "/moves/request") => match serde_json::from_slice::<MoveRequestBody>(&req.body) {
            Ok(r) => {
                use shardgate_directory::state::MoveRequest as R;
                let request = match r.request.as_str() {
                    "verify" => R::Verify,
                    "cutover" => R::Cutover { force: r.force },
                    "rollback" => R::Rollback,
                    "complete" => R::Complete,
                    "cancel" => R::Cancel,
                    other => {
                        return (
                            400,
                            json_error(&format!(
                                "unknown request {other:?}; one of verify, cutover, rollback, complete, cancel"
                            )),
                        )
                    }
                };
                propose(ctx, Command::RequestMove { id: r.id, request: Some(request) }).await
            }
            Err(e) => (400, json_error(&format!("expected {{\"id\": …, \"request\": …}}: {e}"))),
        },
        ("POST", "/shards") => match serde_json::from_slice::<AddShard>(&req.body) {
            Ok(a) => {
                // The directory keeps the URL without a password.
                let url = match crate::backend::ShardAddress::from_url(&a.url) {
                    Ok(addr) => addr.display_url(),
                    Err(e) => return (400, json_error(&e)),
                };
                let (code, body) = propose(ctx, Command::AddShard { name: a.name.clone(), url }).await;
                if code != 200 {
                    return (code, body);
                }
                let outcome: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
                let shard = ctx.directory.load().shards.iter().position(|s| s.name == a.name);
                let schema = match (ctx.shard_setup.get(), shard) {
                    (Some(setup), Some(i)) => match setup.prepare(i).await {
                        Ok(note) => serde_json::json!({ "schema": note }),
                        Err(e) => {
                            warn!(shard = %a.name, error = %e, "could not copy the schema to the added shard");
                            serde_json::json!({ "schema_error": e })
                        }
                    },
                    _ => serde_json::json!({}),
                };
                (200, serde_json::json!({ "outcome": outcome, "setup": schema }).to_string())
            }
            Err(e) => (400, json_error(&format!("expected {{\"name\": …, \"url\": …}}: {e}"))),
        },
        ("POST", "/shards/remove") => match serde_json::from_slice::<ShardName>(&req.body) {
            Ok(s) => {
                propose(ctx, Command::SetShardState { name: s.name, state: shardgate_directory::ShardState::Removed })
                    .await
            }
            Err(e) => (400, json_error(&format!("expected {{\"name\": …}}: {e}"))),
        },
        ("POST", "/shards/drain") => match serde_json::from_slice::<ShardName>(&req.body) {
            Ok(s) => {
                propose(ctx, Command::SetShardState { name: s.name, state: shardgate_directory::ShardState::Draining })
                    .await
            }
            Err(e) => (400, json_error(&format!("expected {{\"name\": …}}: {e}"))),
        },
        ("POST", "/tenants/pin") => match serde_json::from_slice::<Pin>(&req.body) {
            Ok(p) => pin_tenant(ctx, p).await,
            Err(e) => (400, json_error(&format!("expected {{\"tenant\": …, \"shard\": …}}: {e}"))),
        },
        ("POST", "/nodes") => match serde_json::from_slice::<AddNode>(&req.body) {
            Ok(n) => add_node(ctx, n).await,
            Err(e) => (400, json_error(&format!("expected {{\"id\": …, \"address\": …, \"learner\": …}}: {e}"))),
        },
        ("POST", "/nodes/remove") => match serde_json::from_slice::<NodeId>(&req.body) {
            Ok(n) => membership(ctx, n.id, raft::prelude::ConfChangeType::RemoveNode).await,
            Err(e) => (400, json_error(&format!("expected {{\"id\": …}}: {e}"))),
        },
        ("GET", _) | ("POST", _) => (404, json_error("no such endpoint; see docs/directory.md")),
        _ => (405, json_error("only GET and POST are supported")),
    }
}

async fn propose(ctx: &RouterContext, cmd: shardgate_directory::state::Command) -> (u16, String) {
    use shardgate_directory::state::Outcome;
    let Some((node, _)) = &ctx.replica else {
        return (409, json_error("this node has a static directory (no [directory] section in its config); directory changes need the replicated directory"));
    };
    match node.propose(cmd, std::time::Duration::from_secs(10)).await {
        Ok(Outcome::Rejected { reason }) => (409, json_error(&reason)),
        Ok(outcome) => (200, serde_json::to_string(&outcome).unwrap_or_default()),
        Err(e) => (503, json_error(&e.to_string())),
    }
}

#[derive(serde::Deserialize)]
struct NewMove {
    #[serde(default)]
    bucket: Option<u32>,
    #[serde(default)]
    tenant: Option<String>,
    to: String,
    #[serde(default)]
    cutover_auto: bool,
    #[serde(default)]
    complete_auto: bool,
}

#[derive(serde::Deserialize)]
struct MoveRequestBody {
    id: u64,
    request: String,
    #[serde(default)]
    force: bool,
}

async fn create_move(ctx: &RouterContext, m: NewMove) -> (u16, String) {
    use shardgate_directory::state::{Command, MoveOptions, MoveSubject};
    let dir = ctx.directory.load();
    let subject = match (m.bucket, m.tenant) {
        (Some(b), None) => MoveSubject::Bucket(b),
        (None, Some(t)) => match dir.key_type.parse_text(&t) {
            Ok(k) => MoveSubject::Tenant(k),
            Err(e) => return (400, json_error(&e.to_string())),
        },
        _ => return (400, json_error("name either a bucket or a tenant")),
    };
    let active = dir.moves.values().filter(|m| m.phase.active()).count();
    if active >= ctx.config.moves.max_concurrent {
        return (
            409,
            json_error(&format!(
                "{active} moves are under way and [router.moves] max_concurrent is {}; wait for one to finish",
                ctx.config.moves.max_concurrent
            )),
        );
    }
    propose(
        ctx,
        Command::CreateMove {
            subject,
            target: m.to,
            options: MoveOptions { cutover_auto: m.cutover_auto, complete_auto: m.complete_auto },
            at_ms: now_ms(),
        },
    )
    .await
}

/// Pins a tenant that has no rows yet (moving one with rows is the migrator's job).
async fn pin_tenant(ctx: &RouterContext, p: Pin) -> (u16, String) {
    let dir = ctx.directory.load();
    let key = match dir.key_type.parse_text(&p.tenant) {
        Ok(k) => k,
        Err(e) => return (400, json_error(&e.to_string())),
    };
    let home = dir.shard_for(&key);
    if let Some(pool) = ctx.pool(home) {
        let mut conn = match pool.get().await {
            Ok(c) => c,
            Err(e) => return (503, json_error(&format!("cannot check the tenant's rows: {e}"))),
        };
        for table in ctx.catalog.tables() {
            let sql = format!(
                "SELECT 1 FROM {} WHERE {} = {} LIMIT 1",
                quote::table(&table),
                quote::ident(&dir.key_column),
                quote::literal(&p.tenant)
            );
            match conn.simple_query(&sql).await {
                Ok(rows) if !rows.is_empty() => {
                    return (
                        409,
                        json_error(&format!(
                            "tenant {} has rows in {table}; pinning it would hide them. Move it instead (shardgate move tenant)",
                            p.tenant
                        )),
                    )
                }
                Ok(_) => {}
                Err((c, m)) => return (503, json_error(&format!("cannot check {table}: {c} {m}"))),
            }
        }
    }
    if let Err(e) = write_home_row(ctx, &p.tenant, &p.shard).await {
        return (503, json_error(&format!("cannot exempt the tenant from its bucket's fence on {}: {e}", p.shard)));
    }
    propose(ctx, shardgate_directory::state::Command::PinTenant { tenant: key, shard: p.shard }).await
}

/// Writes the home row of a tenant about to be pinned to `shard`. On a shard
/// the tenant's bucket has left, the bucket's fence is armed; the home row
/// exempts the pinned tenant from it (see docs/moves.md, the fence). Written
/// before the pin, so the pinned tenant's first write finds it.
pub async fn write_home_row(ctx: &RouterContext, tenant: &str, shard: &str) -> Result<(), String> {
    let dir = ctx.directory.load();
    let Some(pool) = dir.shards.iter().position(|s| s.name == shard).and_then(|i| ctx.pool(i)) else {
        return Ok(());
    };
    let sql = format!(
        "INSERT INTO shardgate.fence (kind, value, move_id, armed) VALUES ('tenant', {}, 0, false) \
         ON CONFLICT (kind, value) DO UPDATE SET move_id = 0, armed = false, changed_at = now()",
        quote::literal(tenant)
    );
    let mut conn = pool.get().await.map_err(|e| e.to_string())?;
    match conn.simple_query(&sql).await {
        // No move ever touched this shard: no fence to be exempt from.
        Err((c, _)) if c == "42P01" => Ok(()),
        r => r.map(|_| ()).map_err(|(c, m)| format!("{c} {m}")),
    }
}

async fn respond(stream: &mut TcpStream, code: u16, ctype: &str, body: &str) -> std::io::Result<()> {
    respond_with(stream, code, ctype, &[], body).await
}

async fn respond_with(
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
