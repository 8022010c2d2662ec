//! What the migrator reads from and installs on a shard: the sharded tables, the
//! `shardgate` schema (fence and marker tables, the fence trigger), and a copy of the
//! source's schema on a target that lacks it.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;

use serde::Deserialize;
use shardgate_directory::{DirectoryHandle, KeyType};
use shardgate_router::moves::ShardSetup;
use tokio_postgres::Client;

use crate::driver::Resolve;
use crate::pg::{rows, scalar};
use crate::{Endpoint, Error};
use shardgate_router::moves::quote::{literal, qualified};

/// A table that holds the key column, so its rows move with their tenants.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Table {
    pub schema: String,
    pub name: String,
    /// Replicated columns in table order (generated columns left out).
    pub columns: Vec<String>,
    /// Primary key columns in key order; empty without a primary key.
    pub primary_key: Vec<String>,
    /// `REPLICA IDENTITY FULL`.
    pub identity_full: bool,
    pub partitioned: bool,
}

impl Table {
    pub fn qualified(&self) -> String {
        qualified(&self.schema, &self.name)
    }

    /// Columns that order rows for chunked comparison: the primary key, or every
    /// column when there is none (replica identity full).
    pub fn order_columns(&self) -> &[String] {
        if self.primary_key.is_empty() {
            &self.columns
        } else {
            &self.primary_key
        }
    }
}

/// The sharded tables of a shard's database: ordinary tables with the key column,
/// outside the system schemas and our own.
pub async fn sharded_tables(client: &Client, key_column: &str) -> Result<Vec<Table>, tokio_postgres::Error> {
    let sql = format!(
        r#"SELECT json_build_object(
             'schema', n.nspname, 'name', c.relname,
             'columns', (SELECT coalesce(json_agg(a.attname ORDER BY a.attnum), '[]') FROM pg_attribute a
                          WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = ''),
             'primary_key', (SELECT coalesce(json_agg(a.attname ORDER BY k.ord), '[]')
                             FROM pg_index i CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
                             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
                             WHERE i.indrelid = c.oid AND i.indisprimary),
             'identity_full', c.relreplident = 'f',
             'partitioned', c.relkind = 'p')::text
           FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
           WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition
             AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'shardgate') AND n.nspname NOT LIKE 'pg\_%'
             AND EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attname = {}
                         AND NOT a.attisdropped AND a.attnum > 0)
           ORDER BY n.nspname, c.relname"#,
        literal(key_column)
    );
    let mut out = Vec::new();
    for r in rows(client, &sql).await? {
        let json = r.into_iter().next().flatten().unwrap_or_default();
        out.push(serde_json::from_str(&json).expect("catalog query returns the Table shape"));
    }
    Ok(out)
}

/// Advisory lock class of the fence (`pg_advisory_lock(FENCE_LOCK_CLASS, move_id)`).
pub const FENCE_LOCK_CLASS: i32 = 21319;

/// Sequences owned by the tables' columns (serial and identity columns).
pub async fn owned_sequences(client: &Client, tables: &[Table]) -> Result<Vec<String>, tokio_postgres::Error> {
    if tables.is_empty() {
        return Ok(Vec::new());
    }
    let list: Vec<String> = tables.iter().map(|t| format!("{}::regclass", literal(&t.qualified()))).collect();
    let sql = format!(
        "SELECT s.oid::regclass::text FROM pg_class s JOIN pg_depend d ON d.classid = 'pg_class'::regclass          AND d.objid = s.oid AND d.refclassid = 'pg_class'::regclass AND d.deptype IN ('a', 'i')          WHERE s.relkind = 'S' AND d.refobjid IN ({}) ORDER BY 1",
        list.join(", ")
    );
    Ok(rows(client, &sql).await?.into_iter().filter_map(|r| r.into_iter().next().flatten()).collect())
}

/// The `shardgate` schema: the fence (rows of buckets or tenants this shard no longer
/// owns, or owns while they move, and home rows — `move_id` 0, unarmed — of tenants
/// pinned here, which exempt them from their bucket's fence), the marker table used for exact catch-up waits, and the trigger function
/// that refuses local writes of fenced rows.
///
/// The trigger is an ordinary (`ENABLE`d) trigger, so it does not fire in logical
/// replication apply workers: the change stream still reaches a fenced shard, which
/// is what keeps the old shard current after a cutover.
pub const INSTALL_SQL: &str = r#"
DO $s$ BEGIN CREATE SCHEMA IF NOT EXISTS shardgate; EXCEPTION WHEN unique_violation THEN NULL; END $s$;
CREATE TABLE IF NOT EXISTS shardgate.fence (
    kind text NOT NULL CHECK (kind IN ('bucket', 'tenant')),
    value text NOT NULL,
    move_id bigint NOT NULL,
    -- false: the rows are moving and this shard owns them; writes of them take a
    -- shared advisory lock that the cutover waits on before arming.
    -- true: this shard does not own the rows; their writes are refused.
    armed boolean NOT NULL,
    changed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (kind, value)
);
CREATE TABLE IF NOT EXISTS shardgate.marks (
    move_id bigint NOT NULL,
    token text NOT NULL,
    at timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE shardgate.marks REPLICA IDENTITY FULL;
CREATE OR REPLACE FUNCTION shardgate.fence_check() RETURNS trigger LANGUAGE plpgsql AS $fn$
DECLARE
    col text := TG_ARGV[0];
    ktype text := TG_ARGV[1];
    nbuckets bigint := TG_ARGV[2]::bigint;
    k text;
    h bigint;
    f record;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM shardgate.fence) THEN
        RETURN CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END;
    END IF;
    FOR i IN 1..2 LOOP
        IF i = 1 AND TG_OP <> 'INSERT' THEN
            k := to_jsonb(OLD) ->> col;
        ELSIF i = 2 AND TG_OP <> 'DELETE' THEN
            k := to_jsonb(NEW) ->> col;
        ELSE
            CONTINUE;
        END IF;
        IF k IS NULL THEN
            CONTINUE;
        END IF;
        h := CASE ktype
                 WHEN 'int' THEN hashint8extended(k::bigint, 0)
                 WHEN 'uuid' THEN uuid_hash_extended(k::uuid, 0)
                 ELSE hashtextextended(k, 0)
             END;
        -- A tenant's own row wins over its bucket's: a pinned tenant lives on a
        -- shard its bucket may have left (whose bucket fence stays armed).
        SELECT * INTO f FROM shardgate.fence
         WHERE (kind = 'tenant' AND value = k)
            OR (kind = 'bucket' AND value = ((h & 9223372036854775807) % nbuckets)::text)
         ORDER BY kind = 'tenant' DESC
         LIMIT 1;
        IF FOUND AND NOT f.armed AND f.move_id = 0 THEN
            -- A home row: the tenant is pinned here and no move of it runs.
            CONTINUE;
        END IF;
        IF FOUND AND NOT f.armed THEN
            -- Moving rows: hold the move's lock until this transaction ends, so the
            -- cutover can wait for every writer, then look again (read committed
            -- takes a fresh snapshot per statement, so an arming that happened while
            -- we waited is seen).
            PERFORM pg_advisory_xact_lock_shared(21319, f.move_id::integer);
            SELECT * INTO f FROM shardgate.fence WHERE kind = f.kind AND value = f.value;
        END IF;
        IF FOUND AND f.armed THEN
            RAISE EXCEPTION 'shardgate: % % has moved to another shard (move %); this shard no longer accepts writes for it',
                f.kind, f.value, f.move_id
                USING ERRCODE = 'read_only_sql_transaction',
                      HINT = 'Connect through shardgate, which routes to the current shard. A router that returns this error has lost contact with the directory.';
        END IF;
    END LOOP;
    RETURN CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END;
END
$fn$;
-- The trigger runs as the role that writes: client roles without superuser
-- (clients logged in as their own roles, docs/security.md) read the fence.
GRANT USAGE ON SCHEMA shardgate TO PUBLIC;
GRANT SELECT ON shardgate.fence TO PUBLIC;
"#;

pub const FENCE_TRIGGER: &str = "shardgate_fence";

/// Installs the `shardgate` schema and a fence trigger on every given table.
/// Idempotent. `CREATE TRIGGER` takes a lock that waits behind open write
/// transactions on the table, so this runs when a move is prepared, never at cutover.
pub async fn install(
    shard: &Endpoint,
    client: &Client,
    tables: &[Table],
    key_column: &str,
    key_type: KeyType,
    bucket_count: u32,
) -> Result<(), Error> {
    client.batch_execute(INSTALL_SQL).await.map_err(|e| Error::pg(&shard.name, "install the shardgate schema", e))?;
    let key_type = match key_type {
        KeyType::Int => "int",
        KeyType::Text => "text",
        KeyType::Uuid => "uuid",
    };
    for t in tables {
        let exists = scalar(
            client,
            &format!(
                "SELECT count(*) FROM pg_trigger WHERE tgrelid = {}::regclass AND tgname = '{FENCE_TRIGGER}'",
                literal(&t.qualified())
            ),
        )
        .await
        .map_err(|e| Error::pg(&shard.name, "look up the fence trigger", e))?;
        if exists.as_deref() == Some("1") {
            continue;
        }
        let sql = format!(
            "SET lock_timeout = '5s'; CREATE TRIGGER {FENCE_TRIGGER} BEFORE INSERT OR UPDATE OR DELETE ON {} \
             FOR EACH ROW EXECUTE FUNCTION shardgate.fence_check({}, '{key_type}', '{bucket_count}'); RESET lock_timeout",
            t.qualified(),
            literal(key_column)
        );
        client.batch_execute(&sql).await.map_err(|e| {
            let mut err = Error::pg(&shard.name, format!("install the fence trigger on {}", t.qualified()), e);
            if let Error::Postgres { message, .. } = &mut err {
                if message.contains("55P03") {
                    message.push_str(
                        "; a long transaction holds a lock on the table: let it finish (pg_stat_activity shows it) and retry",
                    );
                }
            }
            err
        })?;
    }
    Ok(())
}

/// Copies the source's schema to a target that lacks sharded tables: the whole
/// schema (without our own) when the target database is empty, otherwise only the
/// missing tables. Uses `pg_dump --schema-only` from the Postgres binaries.
pub async fn copy_missing(
    source: &Endpoint,
    target: &Endpoint,
    target_client: &Client,
    tables: &[Table],
) -> Result<Vec<String>, Error> {
    let existing: Vec<(String, String)> = rows(
        target_client,
        "SELECT n.nspname, c.relname FROM pg_class c \
         JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind IN ('r', 'p') \
         AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'shardgate') AND n.nspname NOT LIKE 'pg\\_%'",
    )
    .await
    .map_err(|e| Error::pg(&target.name, "list tables", e))?
    .into_iter()
    .map(|r| (r[0].clone().unwrap_or_default(), r[1].clone().unwrap_or_default()))
    .collect();
    let missing: Vec<&Table> =
        tables.iter().filter(|t| !existing.iter().any(|(s, n)| *s == t.schema && *n == t.name)).collect();
    if missing.is_empty() {
        return Ok(Vec::new());
    }
    let mut args = vec![
        "--schema-only".to_string(),
        "--no-owner".into(),
        "--no-privileges".into(),
        "--no-publications".into(),
        "--no-subscriptions".into(),
        "--exclude-schema=shardgate".into(),
    ];
    if !existing.is_empty() {
        for t in &missing {
            args.push(format!("--table={}", t.qualified()));
        }
    }
    let a = &source.addr;
    args.push(format!("--dbname=host={} port={} dbname={} user={}", a.host, a.port, a.database, a.user));
    let pg_dump = pg_dump_path();
    let mut cmd = std::process::Command::new(&pg_dump);
    cmd.args(&args).stdin(std::process::Stdio::null());
    if let Some(p) = &a.password {
        cmd.env("PGPASSWORD", p);
    }
    // On a blocking thread rather than through tokio's process driver: with that
    // driver built in, every event loop looks for exited children at each turn,
    // which costs the router a few percent on every round trip.
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())))
        .map_err(|e| {
            Error::Other(format!(
                "cannot run {} to copy the schema to shard {}: {e}; install the PostgreSQL client, or set \
             SHARDGATE_PG_DUMP, or create the tables on the target yourself",
                pg_dump.display(),
                target.name
            ))
        })?;
    if !out.status.success() {
        return Err(Error::Other(format!(
            "pg_dump of shard {}'s schema failed: {}",
            source.name,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    // psql meta-commands (`\restrict` in recent minor releases) are not SQL.
    let script: String = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.starts_with('\\'))
        .map(|l| format!("{l}\n"))
        .collect();
    target_client
        .batch_execute(&script)
        .await
        .map_err(|e| Error::pg(&target.name, "create the tables from the source's schema", e))?;
    // pg_dump resets search_path for its own session; put it back for ours.
    target_client.batch_execute("RESET search_path").await.map_err(|e| Error::pg(&target.name, "reset", e))?;
    Ok(missing.iter().map(|t| t.qualified()).collect())
}

/// Copies the schema onto a shard just added (`shardgate shard add`), from a
/// shard that holds the reference tables, so that DDL through the router reaches
/// the new shard from the start. Moves copy whatever is still missing. The
/// router calls it through its `ShardSetup` hook.
pub struct NewShardSchema {
    pub directory: DirectoryHandle,
    pub resolve: Resolve,
}

impl ShardSetup for NewShardSchema {
    fn prepare(&self, shard: usize) -> Pin<Box<dyn Future<Output = Result<String, String>> + Send + '_>> {
        Box::pin(async move {
            let dir = self.directory.load();
            let Some(&from) = dir.reference_shards().iter().find(|&&i| i != shard) else {
                return Ok("no other shard to copy the schema from".into());
            };
            let (Some(source), Some(target)) = ((self.resolve)(&dir, from), (self.resolve)(&dir, shard)) else {
                return Err("a shard's address is unknown".into());
            };
            let src = source.connect("schema for a new shard (source)").await.map_err(|e| e.to_string())?;
            let dst = target.connect("schema for a new shard (target)").await.map_err(|e| e.to_string())?;
            let tables = sharded_tables(&src, &dir.key_column)
                .await
                .map_err(|e| Error::pg(&source.name, "list tables", e).to_string())?;
            let created = copy_missing(&source, &target, &dst, &tables).await.map_err(|e| e.to_string())?;
            Ok(if created.is_empty() {
                format!("shard {} has every table with the key column already", target.name)
            } else {
                format!("schema copied from shard {} ({} tables with the key column)", source.name, created.len())
            })
        })
    }
}

fn pg_dump_path() -> PathBuf {
    if let Some(p) = std::env::var_os("SHARDGATE_PG_DUMP") {
        return PathBuf::from(p);
    }
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).map(|d| d.join("pg_dump")).find(|f| f.is_file()))
        .unwrap_or(None);
    if let Some(p) = on_path {
        return p;
    }
    // Debian keeps versioned binaries out of PATH; take the newest.
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse::<u32>().ok()?;
            let p = e.path().join("bin/pg_dump");
            p.is_file().then_some((v, p))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, p)| p).unwrap_or_else(|| PathBuf::from("pg_dump"))
}
