//! What the POST endpoints do: check the request against the directory, then
//! propose directory commands through this node's replica. (Pinning a tenant,
//! which also writes to a shard, is in [`super::pin`].)

use shardgate_directory::replica::MembershipChange;
use std::time::Duration;

use shardgate_directory::clock::now_ms;
use shardgate_directory::state::{Command, MoveOptions, MoveSubject, Outcome};
use shardgate_directory::ShardState;
use tracing::warn;

use super::answer::{Answer, Refusal};
use super::api::{AddNode, AddShard, MoveRequestBody, NewMove, SchemaSetup, ShardAdded};
use crate::context::RouterContext;

/// How long a proposal may wait for the directory to commit it.
const COMMIT_TIMEOUT: Duration = Duration::from_secs(10);

/// Proposes one command; a rejection is a 409 with the directory's reason.
pub(super) async fn propose(ctx: &RouterContext, cmd: Command) -> Answer<Outcome> {
    let Some((node, _)) = &ctx.replica else {
        return Err(Refusal::conflict(
            "this node has a static directory (no [directory] section in its config); directory changes need the replicated directory",
        ));
    };
    match node.propose(cmd, COMMIT_TIMEOUT).await {
        Ok(Outcome::Rejected { reason }) => Err(Refusal::conflict(reason)),
        Ok(outcome) => Ok(outcome),
        Err(e) => Err(Refusal::unavailable(e.to_string())),
    }
}

/// `POST /moves`: records a move in its plan phase; the directory leader's
/// driver takes it from there.
pub(super) async fn create_move(ctx: &RouterContext, m: NewMove) -> Answer<Outcome> {
    let dir = ctx.directory.load();
    let subject = match (m.bucket, m.tenant) {
        (Some(b), None) => MoveSubject::Bucket(b),
        (None, Some(t)) => {
            MoveSubject::Tenant(dir.key_type.parse_text(&t).map_err(|e| Refusal::bad_request(e.to_string()))?)
        }
        _ => return Err(Refusal::bad_request("name either a bucket or a tenant")),
    };
    let active = dir.moves.values().filter(|m| m.phase.active()).count();
    let limit = ctx.config.load().moves.max_concurrent;
    if active >= limit {
        return Err(Refusal::conflict(format!(
            "{active} moves are under way and [router.moves] max_concurrent is {limit}; wait for one to finish"
        )));
    }
    let options = MoveOptions { cutover_auto: m.cutover_auto, complete_auto: m.complete_auto };
    propose(ctx, Command::CreateMove { subject, target: m.to, options, at_ms: now_ms() }).await
}

/// `POST /moves/request`: records what the operator asks of a move.
pub(super) async fn request_move(ctx: &RouterContext, r: MoveRequestBody) -> Answer<Outcome> {
    propose(ctx, Command::RequestMove { id: r.id, request: Some(r.request.request(r.force)) }).await
}

/// `POST /shards`: adds the shard, then copies the schema onto it when this
/// node can (the shard stays added if that fails: its first move copies it).
pub(super) async fn add_shard(ctx: &RouterContext, a: AddShard) -> Answer<ShardAdded> {
    // The directory keeps the URL without a password.
    let url = crate::backend::ShardAddress::from_url(&a.url).map_err(Refusal::bad_request)?.display_url();
    let outcome = propose(ctx, Command::AddShard { name: a.name.clone(), url }).await?;
    let shard = ctx.directory.load().shards.iter().position(|s| s.name == a.name);
    let setup = match (ctx.shard_setup.get(), shard) {
        (Some(setup), Some(i)) => match setup.prepare(i).await {
            Ok(note) => SchemaSetup { schema: Some(note), schema_error: None },
            Err(e) => {
                warn!(shard = %a.name, error = %e, "could not copy the schema to the added shard");
                SchemaSetup { schema: None, schema_error: Some(e) }
            }
        },
        _ => SchemaSetup::default(),
    };
    Ok(ShardAdded { outcome, setup })
}

/// `POST /shards/drain` and `POST /shards/remove`.
pub(super) async fn set_shard_state(ctx: &RouterContext, name: String, state: ShardState) -> Answer<Outcome> {
    propose(ctx, Command::SetShardState { name, state }).await
}

/// Adds a directory node: records its address (so every node can reach it), then
/// the membership change. A learner receives the log without voting; adding an
/// existing learner as a voter promotes it.
pub(super) async fn add_node(ctx: &RouterContext, n: AddNode) -> Answer<Outcome> {
    propose(ctx, Command::SetNodeAddress { id: n.id, address: n.address }).await?;
    let change = if n.learner { MembershipChange::AddLearner } else { MembershipChange::AddVoter };
    membership(ctx, n.id, change).await
}

/// `POST /nodes/remove`.
pub(super) async fn remove_node(ctx: &RouterContext, id: u64) -> Answer<Outcome> {
    membership(ctx, id, MembershipChange::Remove).await
}

async fn membership(ctx: &RouterContext, id: u64, change: MembershipChange) -> Answer<Outcome> {
    let Some((node, _)) = &ctx.replica else {
        return Err(Refusal::conflict("this node has a static directory; membership needs the replicated directory"));
    };
    node.change_membership(id, change, COMMIT_TIMEOUT).await.map_err(|e| Refusal::unavailable(e.to_string()))
}
