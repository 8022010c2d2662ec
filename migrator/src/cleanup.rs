//! The end of a move: drop the replication objects, and the moved rows from the
//! shard that does not own them. `complete` after a cutover (the old shard's copy
//! goes; its fence stays armed against stale writers); `cancel` before one (the
//! target's copy goes).

use crate::{fault, Endpoint, Error, MoveSpec};
use shardgate_router::moves::quote::literal;
use tokio_postgres::Client;

/// Which shard keeps the rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keep {
    /// Cancel (or complete after a rollback): the source keeps the rows.
    Source,
    /// Complete after a cutover: the target keeps them.
    Target,
}

/// Drops both streams and the moved rows from the shard that does not keep them.
/// Idempotent: each step looks before it drops.
///
/// `home`: the tenant of a tenant move ends pinned to the shard that keeps it; its
/// fence row there becomes a home row (so the fence its bucket may have left on
/// that shard does not refuse its writes) instead of going.
pub async fn finish(spec: &MoveSpec, keep: Keep, home: bool) -> Result<u64, Error> {
    let src = spec.source.connect(&format!("move {} cleanup (source)", spec.id)).await?;
    let dst = spec.target.connect(&format!("move {} cleanup (target)", spec.id)).await?;
    // Subscriptions first (each lives on the other side from its slot).
    drop_subscription(&spec.target, &dst, &spec.forward_name()).await?;
    drop_subscription(&spec.source, &src, &spec.reverse_name()).await?;
    for (shard, c, slot) in [(&spec.source, &src, spec.forward_name()), (&spec.target, &dst, spec.reverse_name())] {
        crate::replication::wait_slot_inactive(shard, c, &slot, std::time::Duration::from_secs(60)).await?;
        c.batch_execute(&format!(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = {}",
            literal(&slot)
        ))
        .await
        .map_err(|e| Error::pg(&shard.name, "drop the replication slot", e))?;
    }
    fault::point("cleanup.after_drop_subscriptions")?;
    for (shard, c, name) in [(&spec.source, &src, spec.forward_name()), (&spec.target, &dst, spec.reverse_name())] {
        c.batch_execute(&format!("DROP PUBLICATION IF EXISTS {name}"))
            .await
            .map_err(|e| Error::pg(&shard.name, "drop the publication", e))?;
        c.batch_execute(&format!("DELETE FROM shardgate.marks WHERE move_id = {}", spec.id))
            .await
            .map_err(|e| Error::pg(&shard.name, "delete markers", e))?;
    }
    let (owner, owner_c, other, other_c) = match keep {
        Keep::Source => (&spec.source, &src, &spec.target, &dst),
        Keep::Target => (&spec.target, &dst, &spec.source, &src),
    };
    // The shard without the rows keeps an armed fence: a stale router or a direct
    // client writing there is refused. The owner's fence row goes (its rows no
    // longer move), or stays as the pinned tenant's home row.
    crate::prepare::set_fence(other, other_c, spec, true).await?;
    let (kind, value) = spec.fence_key();
    let sql = if home && kind == "tenant" {
        format!(
            "UPDATE shardgate.fence SET move_id = 0, armed = false, changed_at = now() \
             WHERE kind = '{kind}' AND value = {} AND move_id = {}",
            literal(&value),
            spec.id
        )
    } else {
        format!(
            "DELETE FROM shardgate.fence WHERE kind = '{kind}' AND value = {} AND move_id = {}",
            literal(&value),
            spec.id
        )
    };
    owner_c.batch_execute(&sql).await.map_err(|e| Error::pg(&owner.name, "settle the fence row", e))?;
    delete_rows(spec, other, other_c).await
}

async fn drop_subscription(shard: &Endpoint, c: &Client, name: &str) -> Result<(), Error> {
    let n = crate::pg::scalar(c, &format!("SELECT count(*) FROM pg_subscription WHERE subname = {}", literal(name)))
        .await
        .map_err(|e| Error::pg(&shard.name, "look up the subscription", e))?;
    if n.as_deref() == Some("0") {
        return Ok(());
    }
    // Detach the slot first so that DROP does not reach across to the other
    // shard; the slot is dropped on its own shard afterwards.
    c.batch_execute(&format!("ALTER SUBSCRIPTION {name} DISABLE"))
        .await
        .and(c.batch_execute(&format!("ALTER SUBSCRIPTION {name} SET (slot_name = NONE)")).await)
        .and(c.batch_execute(&format!("DROP SUBSCRIPTION {name}")).await)
        .map_err(|e| Error::pg(&shard.name, format!("drop subscription {name}"), e))
}

/// Deletes the moved rows from a shard that no longer owns them, bypassing its
/// fence (this session runs as a replica would).
async fn delete_rows(spec: &MoveSpec, shard: &Endpoint, c: &Client) -> Result<u64, Error> {
    let tables = crate::schema::sharded_tables(c, &spec.key_column)
        .await
        .map_err(|e| Error::pg(&shard.name, "list tables", e))?;
    c.batch_execute("SET session_replication_role = replica")
        .await
        .map_err(|e| Error::pg(&shard.name, "set session_replication_role", e))?;
    let mut total = 0;
    for t in &tables {
        total += c
            .execute(&format!("DELETE FROM {} WHERE {}", t.qualified(), spec.row_filter()), &[])
            .await
            .map_err(|e| Error::pg(&shard.name, format!("delete the moved rows from {}", t.qualified()), e))?;
    }
    c.batch_execute("RESET session_replication_role").await.map_err(|e| Error::pg(&shard.name, "reset", e))?;
    Ok(total)
}
