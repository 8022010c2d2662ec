//! The plan phase: check that a move can work, then set up everything it needs, so
//! that the cutover itself runs no DDL.
//!
//! Every step is idempotent (it looks before it creates), so a migrator that died
//! half-way through simply runs `prepare` again.

use tokio_postgres::Client;

use crate::fault;
use crate::pg::{rows, scalar};
use crate::schema::{self, Table};
use crate::{Endpoint, Error, MoveSpec};
use shardgate_router::moves::quote::literal;

/// What `prepare` found and did.
#[derive(Debug, Clone, Default)]
pub struct Prepared {
    pub tables: Vec<Table>,
    /// Tables created on the target from the source's schema.
    pub created_tables: Vec<String>,
    /// Moving rows and their size on the source when the move was prepared (an
    /// estimate for progress and ETA; the data keeps changing).
    pub rows_total: u64,
    pub bytes_total: u64,
    /// Sequences owned by moved tables: they are carried forward at cutover so the
    /// new shard never hands out a value the old one already used.
    pub sequences: Vec<String>,
}

/// Checks a move and builds its replication: fence triggers on both shards, both
/// publications, and the reverse slot and subscription (created disabled). The
/// forward slot and subscription come with the copy ([`crate::copy`]).
pub async fn prepare(spec: &MoveSpec) -> Result<Prepared, Error> {
    let src = spec.source.connect(&format!("move {} source", spec.id)).await?;
    let dst = spec.target.connect(&format!("move {} target", spec.id)).await?;
    check_server(&spec.source, &src).await?;
    check_server(&spec.target, &dst).await?;
    check_capacity(spec, &spec.source, &src).await?;
    check_capacity(spec, &spec.target, &dst).await?;

    let tables = schema::sharded_tables(&src, &spec.key_column)
        .await
        .map_err(|e| Error::pg(&spec.source.name, "list tables", e))?;
    check_tables(spec, &tables)?;
    let created_tables = schema::copy_missing(&spec.source, &spec.target, &dst, &tables).await?;
    let target_tables = schema::sharded_tables(&dst, &spec.key_column)
        .await
        .map_err(|e| Error::pg(&spec.target.name, "list tables", e))?;
    for t in &tables {
        match target_tables.iter().find(|x| x.schema == t.schema && x.name == t.name) {
            Some(x) if x.columns == t.columns => {}
            Some(x) => {
                return Err(Error::Refused(format!(
                    "table {} has columns {:?} on shard {} but {:?} on shard {}; make the schemas match before moving",
                    t.qualified(),
                    t.columns,
                    spec.source.name,
                    x.columns,
                    spec.target.name
                )))
            }
            None => {
                return Err(Error::Refused(format!(
                    "table {} is missing on shard {} (or lacks the {} column there)",
                    t.qualified(),
                    spec.target.name,
                    spec.key_column
                )))
            }
        }
    }

    let subscribed = exists(&dst, &spec.target, "pg_subscription", "subname", &spec.forward_name()).await?;
    if !subscribed {
        // A fresh move: the target must not hold the rows already (a cancelled
        // move's leftovers would collide with the copy).
        for t in &tables {
            let n = scalar(&dst, &format!("SELECT count(*) FROM {} WHERE {}", t.qualified(), spec.row_filter()))
                .await
                .map_err(|e| Error::pg(&spec.target.name, "look for leftover rows", e))?;
            if n.as_deref() != Some("0") {
                return Err(Error::Refused(format!(
                    "shard {} already holds {} rows of {} in {}; they are left over from an earlier move: \
                     delete them (DELETE FROM {} WHERE {}) and try again",
                    spec.target.name,
                    n.unwrap_or_default(),
                    spec.subject,
                    t.qualified(),
                    t.qualified(),
                    spec.row_filter()
                )));
            }
        }
    }

    let mut prepared = Prepared { tables: tables.clone(), created_tables, ..Default::default() };
    for t in &tables {
        let r = rows(
            &src,
            &format!(
                "SELECT count(*), coalesce(sum(pg_column_size(t.*)), 0) FROM {} AS t WHERE {}",
                t.qualified(),
                spec.row_filter()
            ),
        )
        .await
        .map_err(|e| Error::pg(&spec.source.name, "count the moving rows", e))?;
        let num = |i: usize| r.first().and_then(|r| r[i].as_deref()).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        prepared.rows_total += num(0);
        prepared.bytes_total += num(1);
    }
    prepared.sequences =
        schema::owned_sequences(&src, &tables).await.map_err(|e| Error::pg(&spec.source.name, "find sequences", e))?;

    // Fences: the source owns the rows while they move (unarmed: writes take the
    // move's lock); the target does not own them yet (armed: direct writes refused,
    // the change stream passes).
    for (shard, client, armed) in [(&spec.source, &src, false), (&spec.target, &dst, true)] {
        schema::install(shard, client, &tables, &spec.key_column, spec.key_type, spec.bucket_count).await?;
        set_fence(shard, client, spec, armed).await?;
    }
    fault::point("prepare.after_fence_install")?;

    let fwd = spec.forward_name();
    let back = spec.reverse_name();
    create_publication(spec, &spec.source, &src, &fwd, &tables).await?;
    create_publication(spec, &spec.target, &dst, &back, &tables).await?;
    fault::point("prepare.after_publication")?;

    // The reverse stream's slot is created now, while nothing is in a hurry (slot
    // creation waits for running transactions); its subscription stays disabled
    // until a cutover advances the slot past the forward stream's changes.
    if !exists(&dst, &spec.target, "pg_replication_slots", "slot_name", &back).await? {
        dst.batch_execute(&format!("SELECT pg_create_logical_replication_slot({}, 'pgoutput')", literal(&back)))
            .await
            .map_err(|e| Error::pg(&spec.target.name, "create the reverse replication slot", e))?;
    }
    if !exists(&src, &spec.source, "pg_subscription", "subname", &back).await? {
        src.batch_execute(&format!(
            "CREATE SUBSCRIPTION {back} CONNECTION {} PUBLICATION {back} \
             WITH (enabled = false, create_slot = false, slot_name = {}, copy_data = false)",
            literal(&spec.target.conninfo()),
            literal(&back)
        ))
        .await
        .map_err(|e| Error::pg(&spec.source.name, "create the reverse subscription", e))?;
    }
    fault::point("prepare.after_reverse_stream")?;
    Ok(prepared)
}

async fn check_server(shard: &Endpoint, client: &Client) -> Result<(), Error> {
    let r = rows(
        client,
        "SELECT current_setting('wal_level'), (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)",
    )
    .await
    .map_err(|e| Error::pg(&shard.name, "read settings", e))?;
    let (wal_level, superuser) = match r.first() {
        Some(r) => (r[0].clone().unwrap_or_default(), r[1].as_deref() == Some("t")),
        None => Default::default(),
    };
    if wal_level != "logical" {
        return Err(Error::Refused(format!(
            "shard {} runs with wal_level = {wal_level}; moves use logical replication: set wal_level = logical \
             in its postgresql.conf and restart it",
            shard.name
        )));
    }
    if !superuser {
        return Err(Error::Refused(format!(
            "user {} on shard {} is not a superuser; PostgreSQL 15 lets only superusers create subscriptions: \
             give shardgate's shard user SUPERUSER or move the data yourself",
            shard.addr.user, shard.name
        )));
    }
    Ok(())
}

/// A move needs, on each of its shards, one replication slot (each side
/// publishes one stream), one WAL sender (the other side's subscription reads
/// through it) and one logical replication worker (this side's subscription).
/// What this move already holds (a prepare run again after a restart) counts as
/// free. Checked before anything is created, so a refused move leaves nothing.
async fn check_capacity(spec: &MoveSpec, shard: &Endpoint, client: &Client) -> Result<(), Error> {
    let ours = format!("{}, {}", literal(&spec.forward_name()), literal(&spec.reverse_name()));
    let needs = [
        (
            "replication slots",
            "max_replication_slots",
            format!("SELECT count(*) FROM pg_replication_slots WHERE slot_name NOT IN ({ours})"),
        ),
        (
            "WAL senders",
            "max_wal_senders",
            format!("SELECT count(*) FROM pg_stat_replication WHERE application_name NOT IN ({ours})"),
        ),
        (
            "logical replication workers",
            "max_logical_replication_workers",
            format!("SELECT count(*) FROM pg_stat_subscription WHERE pid IS NOT NULL AND subname NOT IN ({ours})"),
        ),
    ];
    let mut problems = Vec::new();
    for (what, setting, used_sql) in needs {
        let sql = format!("SELECT current_setting('{setting}')::bigint, ({used_sql})");
        let r = rows(client, &sql).await.map_err(|e| Error::pg(&shard.name, format!("read {setting}"), e))?;
        let value = |i: usize| r.first().and_then(|r| r[i].as_deref()).and_then(|v| v.parse::<i64>().ok()).unwrap_or(0);
        let (limit, used) = (value(0), value(1));
        if used >= limit {
            problems.push(format!(
                "no free {what}: {used} of {setting} = {limit} in use; drop unused ones or raise {setting} and restart"
            ));
        }
    }
    if problems.is_empty() {
        return Ok(());
    }
    Err(Error::Refused(format!("shard {} cannot take part in a move: {}", shard.name, problems.join("; "))))
}

fn check_tables(spec: &MoveSpec, tables: &[Table]) -> Result<(), Error> {
    if tables.is_empty() {
        return Err(Error::Refused(format!(
            "shard {} has no tables with a {} column: nothing to move",
            spec.source.name, spec.key_column
        )));
    }
    let mut problems = Vec::new();
    for t in tables {
        if t.partitioned {
            problems.push(format!("{} is partitioned; moves do not support partitioned tables yet", t.qualified()));
        } else if !t.identity_full && !t.primary_key.contains(&spec.key_column) {
            let why = if t.primary_key.is_empty() { "has no primary key" } else { "has a primary key without it" };
            problems.push(format!(
                "{} {why}: add {} to its primary key, or run ALTER TABLE {} REPLICA IDENTITY FULL",
                t.qualified(),
                spec.key_column,
                t.qualified()
            ));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(Error::Refused(format!(
            "cannot move {}: the change stream must identify each row by {}: {}",
            spec.subject,
            spec.key_column,
            problems.join("; ")
        )))
    }
}

async fn exists(client: &Client, shard: &Endpoint, catalog: &str, column: &str, name: &str) -> Result<bool, Error> {
    let n = scalar(client, &format!("SELECT count(*) FROM {catalog} WHERE {column} = {}", literal(name)))
        .await
        .map_err(|e| Error::pg(&shard.name, format!("look in {catalog}"), e))?;
    Ok(n.as_deref() != Some("0"))
}

async fn create_publication(
    spec: &MoveSpec,
    shard: &Endpoint,
    client: &Client,
    name: &str,
    tables: &[Table],
) -> Result<(), Error> {
    if exists(client, shard, "pg_publication", "pubname", name).await? {
        return Ok(());
    }
    let filter = spec.row_filter();
    let mut list: Vec<String> = tables.iter().map(|t| format!("{} WHERE {filter}", t.qualified())).collect();
    list.push(format!("shardgate.marks WHERE (move_id = {})", spec.id));
    client
        .batch_execute(&format!("CREATE PUBLICATION {name} FOR TABLE {}", list.join(", ")))
        .await
        .map_err(|e| Error::pg(&shard.name, "create the publication", e))
}

/// Sets this move's fence row on a shard: armed (the shard does not own the rows)
/// or not (it owns them while they move).
pub async fn set_fence(shard: &Endpoint, client: &Client, spec: &MoveSpec, armed: bool) -> Result<(), Error> {
    let (kind, value) = spec.fence_key();
    client
        .batch_execute(&format!(
            "INSERT INTO shardgate.fence (kind, value, move_id, armed) VALUES ('{kind}', {}, {}, {armed}) \
             ON CONFLICT (kind, value) DO UPDATE SET move_id = excluded.move_id, armed = excluded.armed, changed_at = now()",
            literal(&value),
            spec.id
        ))
        .await
        .map_err(|e| Error::pg(&shard.name, if armed { "arm the fence" } else { "lift the fence" }, e))
}
