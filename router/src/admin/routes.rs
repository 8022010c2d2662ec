//! The admin API's route table: each JSON endpoint, the request type its body
//! must read as, and the handler that answers it. The types are in
//! [`super::api`]; the web page, its event stream and `/metrics` are served
//! before this table is consulted (see [`super::handle`]).

use std::future::Future;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;
use shardgate_directory::ShardState;

use super::answer::{to_http, Answer, Layout, Refusal};
use super::api::{AddNode, AddShard, Health, MoveRequestBody, NewMove, NodeId, PinTenant, Readiness, ShardName, Sizes};
use super::http::Request;
use super::{commands, pin, status};
use crate::context::RouterContext;

/// The status code and JSON body answering `req`.
pub(super) async fn route(ctx: &RouterContext, req: &Request) -> (u16, String) {
    use Layout::{Compact, Pretty};
    let body = &req.body;
    match (req.method.as_str(), req.path.as_str()) {
        ("GET", "/status") | ("GET", "/api/status") => to_http(Ok(status::status(ctx)), Pretty),
        ("GET", "/directory") => to_http(directory(ctx).await, Pretty),
        ("GET", "/health") | ("GET", "/health/live") => to_http(Ok(Health { ok: true }), Compact),
        ("GET", "/health/ready") => ready(ctx),
        ("GET", "/load") => to_http(Ok(crate::load::cluster_load(&ctx.directory.load())), Pretty),
        ("GET", "/sizes") => to_http(sizes(ctx).await, Pretty),
        ("GET", "/moves") => to_http(Ok(status::moves(&ctx.directory.load())), Pretty),
        ("POST", "/moves") => {
            post(body, r#"{"bucket": … or "tenant": …, "to": …}"#, |m: NewMove| commands::create_move(ctx, m)).await
        }
        ("POST", "/moves/request") => {
            let shape = r#"{"id": …, "request": "verify", "cutover", "rollback", "complete" or "cancel"}"#;
            post(body, shape, |r: MoveRequestBody| commands::request_move(ctx, r)).await
        }
        ("POST", "/shards") => post(body, r#"{"name": …, "url": …}"#, |a: AddShard| commands::add_shard(ctx, a)).await,
        ("POST", "/shards/remove") => {
            post(body, r#"{"name": …}"#, |s: ShardName| commands::set_shard_state(ctx, s.name, ShardState::Removed))
                .await
        }
        ("POST", "/shards/drain") => {
            post(body, r#"{"name": …}"#, |s: ShardName| commands::set_shard_state(ctx, s.name, ShardState::Draining))
                .await
        }
        ("POST", "/tenants/pin") => {
            post(body, r#"{"tenant": …, "shard": …}"#, |p: PinTenant| pin::pin_tenant(ctx, p)).await
        }
        ("POST", "/nodes") => {
            post(body, r#"{"id": …, "address": …, "learner": …}"#, |n: AddNode| commands::add_node(ctx, n)).await
        }
        ("POST", "/nodes/remove") => post(body, r#"{"id": …}"#, |n: NodeId| commands::remove_node(ctx, n.id)).await,
        ("POST", "/reload") => to_http(reload(ctx), Compact),
        ("GET", _) | ("POST", _) => {
            to_http::<()>(Err(Refusal::new(404, "no such endpoint; see docs/directory.md")), Compact)
        }
        _ => to_http::<()>(Err(Refusal::new(405, "only GET and POST are supported")), Compact),
    }
}

/// `GET /health/ready`: 200 when the lease is valid and every active shard
/// answered its last probe, else 503 with the reasons.
fn ready(ctx: &RouterContext) -> (u16, String) {
    let mut reasons: Vec<String> = ctx.lease_expired().into_iter().collect();
    let dir = ctx.directory.load();
    for (i, s) in dir.shards.iter().enumerate() {
        if s.state == ShardState::Removed {
            continue;
        }
        if let Some(why) = ctx.shard_health(i).error() {
            reasons.push(format!("shard {} does not answer: {why}", s.name));
        }
    }
    let ready = reasons.is_empty();
    let (_, body) = to_http(Ok(Readiness { ready, reasons }), Layout::Compact);
    (if ready { 200 } else { 503 }, body)
}

/// A POST endpoint: reads the body as `T` (a 400 naming the expected `shape`
/// when it does not), then answers with `handler`'s outcome on one line.
async fn post<T, R, F>(body: &[u8], shape: &str, handler: impl FnOnce(T) -> F) -> (u16, String)
where
    T: DeserializeOwned,
    R: Serialize,
    F: Future<Output = Answer<R>>,
{
    let answer = match serde_json::from_slice::<T>(body) {
        Ok(request) => handler(request).await,
        Err(e) => Err(Refusal::bad_request(format!("expected {shape}: {e}"))),
    };
    to_http(answer, Layout::Compact)
}

/// `POST /reload`: the configuration file read again and put in force (as
/// SIGHUP does), or refused with the reason.
fn reload(ctx: &RouterContext) -> Answer<crate::reload::Reloaded> {
    ctx.reload_from_source().map_err(|e| match e {
        crate::reload::ReloadError::Refused(_) => Refusal::new(422, e.to_string()),
        crate::reload::ReloadError::NoSource => Refusal::conflict(e.to_string()),
    })
}

/// `GET /directory`, linearizable: first make sure this replica has applied
/// everything committed so far (raft read index), then answer from it.
async fn directory(ctx: &RouterContext) -> Answer<shardgate_directory::Directory> {
    if let Some((node, _)) = &ctx.replica {
        node.read_barrier(Duration::from_secs(3)).await.map_err(|e| {
            Refusal::unavailable(format!("{e}; GET /status shows this node's own, possibly stale, view"))
        })?;
    }
    Ok((*ctx.directory.load()).clone())
}

/// `GET /sizes`: measured on the shards now, and kept for the status views.
async fn sizes(ctx: &RouterContext) -> Answer<Sizes> {
    let sizes = crate::sizes::measure(ctx)
        .await
        .map_err(|e| Refusal::unavailable(format!("could not read bucket sizes from the shards: {e}")))?;
    ctx.sizes.store(&sizes);
    Ok(sizes)
}
