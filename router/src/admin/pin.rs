//! `POST /tenants/pin`: place a tenant that has no rows yet on a shard of its own
//! (moving one with rows is the migrator's job). Before the pin it checks the
//! tenant's current shard for rows, and writes the tenant's home row into the
//! target shard's `shardgate.fence`.
//!
//! That table's schema is the migrator's (`migrator/src/schema.rs`); the row is
//! written here because the admin server has no way to reach the migrator
//! (`router` does not depend on it). It belongs behind the router ↔ migrator
//! interface, with the other fence writes.

use shardgate_directory::state::{Command, Outcome};

use super::answer::{Answer, Refusal};
use super::api::PinTenant;
use super::commands::propose;
use crate::context::RouterContext;
use crate::sql::quote;

pub(super) async fn pin_tenant(ctx: &RouterContext, p: PinTenant) -> Answer<Outcome> {
    let dir = ctx.directory.load();
    let key = dir.key_type.parse_text(&p.tenant).map_err(|e| Refusal::bad_request(e.to_string()))?;
    let holder = dir.shard_for(&key);
    if let Some(pool) = ctx.pool(holder) {
        let mut conn =
            pool.get().await.map_err(|e| Refusal::unavailable(format!("cannot check the tenant's rows: {e}")))?;
        for table in ctx.catalog.tables() {
            let sql = format!(
                "SELECT 1 FROM {} WHERE {} = {} LIMIT 1",
                quote::table(&table),
                quote::ident(&dir.key_column),
                quote::literal(&p.tenant)
            );
            match conn.simple_query(&sql).await {
                Ok(rows) if !rows.is_empty() => {
                    return Err(Refusal::conflict(format!(
                        "tenant {} has rows in {table}; pinning it would hide them. Move it instead (shardgate move tenant)",
                        p.tenant
                    )))
                }
                Ok(_) => {}
                Err((c, m)) => return Err(Refusal::unavailable(format!("cannot check {table}: {c} {m}"))),
            }
        }
    }
    write_home_row(ctx, &key.to_string(), &p.shard).await.map_err(|e| {
        Refusal::unavailable(format!("cannot exempt the tenant from its bucket's fence on {}: {e}", p.shard))
    })?;
    propose(ctx, Command::PinTenant { tenant: key, shard: p.shard }).await
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
