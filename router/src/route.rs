//! Key → bucket → shard: deciding where one statement runs.
//!
//! Input: the cached [`Statement`] analysis, the bind parameters of this execution
//! (if any), the session's `shardgate.tenant`, and the directory snapshot. Output: a
//! [`Target`]. No I/O happens here; this is the function to read to learn the
//! routing rules.

use std::collections::BTreeSet;

use shardgate_directory::{Directory, KeyType, ShardId, TenantKey};

use crate::context::Catalog;
use crate::error::SqlError;
use crate::sql::{Inserted, KeyCandidates, KeyExpr, Statement, StatementKind};

/// Where a statement runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// One shard.
    Shard(ShardId),
    /// Any shard will do (reference tables, `SELECT 1`, session commands).
    Any,
    /// Every live shard, for writes that must land everywhere (DDL, reference tables).
    All,
    /// A read over several shards whose results are merged.
    Fanout(Vec<ShardId>),
    /// A multi-row INSERT whose rows belong to different shards: row indexes per shard.
    SplitInsert(Vec<(ShardId, Vec<usize>)>),
    /// `COPY … FROM STDIN` into a sharded table: rows are split as they stream.
    CopySplit,
}

/// Bind parameters of one execution.
pub struct Params<'a> {
    pub values: &'a [Option<&'a [u8]>],
    /// 0 text, 1 binary, as the Bind message has them: none (all text), one
    /// (for all) or one per parameter.
    pub formats: &'a [i16],
    /// Type OIDs the client declared in Parse (0 or missing: unspecified).
    pub types: &'a [i32],
}

impl Params<'_> {
    /// The format of parameter `i`, per the protocol's rule.
    pub fn format_of(&self, i: usize) -> i16 {
        match self.formats {
            [] => 0,
            [f] => *f,
            all => all.get(i).copied().unwrap_or(0),
        }
    }
}

/// Routing settings that come from configuration.
pub struct Rules {
    pub strict_tenant: bool,
    pub allow_cross_shard_writes: bool,
}

pub fn route(
    stmt: &Statement,
    params: Option<&Params<'_>>,
    fallback_key: Option<&TenantKey>,
    dir: &Directory,
    catalog: &Catalog,
    rules: &Rules,
    touched: &mut Vec<u32>,
) -> Result<Target, SqlError> {
    let reads_sharded = stmt.tables.iter().any(|t| catalog.is_sharded(t));
    let writes_sharded = stmt.written.iter().any(|t| catalog.is_sharded(t));
    let key_col = &dir.key_column;
    check_key_changes(stmt, params, fallback_key, dir, catalog)?;
    match &stmt.kind {
        StatementKind::Ddl => Ok(Target::All),
        StatementKind::Txn(_) | StatementKind::Session | StatementKind::SetVar(_) | StatementKind::SetTenant(_) => {
            Ok(Target::Any)
        }
        StatementKind::Copy(c) if c.from_stdin => {
            if writes_sharded {
                Ok(Target::CopySplit)
            } else {
                Ok(Target::All)
            }
        }
        StatementKind::Insert if writes_sharded => {
            if let Some(ins) = &stmt.insert {
                let pos = key_position(&ins.table, ins.columns.as_deref(), catalog, key_col)?;
                let mut by_shard: Vec<(ShardId, Vec<usize>)> = Vec::new();
                for (i, row) in ins.rows.iter().enumerate() {
                    let expr = row.get(pos).and_then(|e| e.as_ref()).ok_or_else(|| {
                        SqlError::new(
                            "0A000",
                            format!("row {} of the INSERT gives {key_col} as an expression; shardgate needs a literal or a parameter there", i + 1),
                        )
                    })?;
                    let key = resolve(expr, params, dir.key_type)?.ok_or_else(|| {
                        SqlError::new("23502", format!("{key_col} must not be NULL in a sharded table"))
                    })?;
                    let (bucket, shard) = dir.locate(&key);
                    touched.push(bucket);
                    match by_shard.iter_mut().find(|(s, _)| *s == shard) {
                        Some((_, rows)) => rows.push(i),
                        None => by_shard.push((shard, vec![i])),
                    }
                }
                return Ok(match by_shard.len() {
                    0 => Target::Any,
                    1 => Target::Shard(by_shard[0].0),
                    _ => Target::SplitInsert(by_shard),
                });
            }
            // INSERT … SELECT: the SELECT's key decides, if the inserted rows
            // provably belong there.
            let target = single_or(stmt, params, fallback_key, dir, catalog, rules, true, touched)?;
            check_insert_select(stmt, &target, params, fallback_key, dir, catalog)?;
            Ok(target)
        }
        StatementKind::Merge if writes_sharded => Err(SqlError::new(
            "0A000",
            format!("MERGE into a sharded table ({}) is not supported", stmt.written.join(", ")),
        )
        .hint(format!("use INSERT … ON CONFLICT, or UPDATE and INSERT statements that each name one {key_col}"))),
        StatementKind::Insert | StatementKind::Update | StatementKind::Delete | StatementKind::Merge => {
            if writes_sharded {
                single_or(stmt, params, fallback_key, dir, catalog, rules, true, touched)
            } else if !reads_sharded {
                Ok(Target::All)
            } else {
                // Writes a reference table while reading a sharded one.
                Err(SqlError::new("0A000", "a write to a reference table cannot read sharded tables".to_string()))
            }
        }
        StatementKind::Select | StatementKind::Copy(_) | StatementKind::Other => {
            if !reads_sharded {
                Ok(Target::Any)
            } else {
                single_or(stmt, params, fallback_key, dir, catalog, rules, false, touched)
            }
        }
    }
}

/// Refuses statements that read a reference table on a shard that does not
/// hold the reference rows: a shard added at run time gets the reference tables
/// empty, so a join there would silently miss rows. `target` is where the
/// statements run together (a transaction's or a pipeline's shard included).
pub fn check_reference_reads<'a>(
    statements: impl IntoIterator<Item = &'a Statement>,
    target: &Target,
    dir: &Directory,
    catalog: &Catalog,
) -> Result<(), SqlError> {
    // Runs for every statement: no allocation, and in the usual case (every
    // shard holds the rows) no table is looked up.
    let without_rows = |s: &ShardId| dir.shards.get(*s).is_some_and(|x| !x.reference);
    let shard = match target {
        Target::Shard(s) => Some(*s).filter(without_rows),
        Target::Fanout(shards) => shards.iter().copied().find(without_rows),
        Target::SplitInsert(parts) => parts.iter().map(|(s, _)| *s).find(without_rows),
        Target::Any | Target::All | Target::CopySplit => None,
    };
    let Some(shard) = shard.and_then(|s| dir.shards.get(s)) else {
        return Ok(());
    };
    for stmt in statements {
        if stmt.kind == StatementKind::Ddl {
            continue;
        }
        if let Some(table) = stmt.tables.iter().find(|t| catalog.is_reference(t)) {
            return Err(SqlError::new(
                "0A000",
                format!(
                    "{table} is a reference table, and shard {} does not hold its rows: it was added at run time, and reference rows are not copied to added shards",
                    shard.name
                ),
            )
            .hint(format!(
                "read {table} in a statement of its own (outside a transaction on that shard): it is then answered by a shard that holds its rows"
            )));
        }
    }
    Ok(())
}

/// A statement on sharded tables: its keys' shard(s), else the session's tenant,
/// else every shard (reads) or an error (writes, strict mode).
#[allow(clippy::too_many_arguments)]
fn single_or(
    stmt: &Statement,
    params: Option<&Params<'_>>,
    fallback_key: Option<&TenantKey>,
    dir: &Directory,
    catalog: &Catalog,
    rules: &Rules,
    write: bool,
    touched: &mut Vec<u32>,
) -> Result<Target, SqlError> {
    let key_col = &dir.key_column;
    if let KeyCandidates::Any(exprs) = &stmt.keys {
        let mut shards = BTreeSet::new();
        for e in exprs {
            if let Some(k) = resolve(e, params, dir.key_type)? {
                let (bucket, shard) = dir.locate(&k);
                touched.push(bucket);
                shards.insert(shard);
            }
        }
        return Ok(match shards.len() {
            // Only NULL keys: matches no row anywhere.
            0 => Target::Any,
            1 => Target::Shard(*shards.iter().next().unwrap_or(&0)),
            _ if write && !rules.allow_cross_shard_writes => {
                return Err(SqlError::new(
                    "0A000",
                    format!("this {} touches tenants on {} shards", verb(stmt), shards.len()),
                )
                .hint("write one tenant per statement, or set allow_cross_shard_writes = true"))
            }
            _ if write => Target::Fanout(shards.into_iter().collect()),
            _ => fanout_read(stmt, dir, catalog, shards.into_iter().collect())?,
        });
    }
    if let Some(k) = fallback_key {
        let (bucket, shard) = dir.locate(k);
        touched.push(bucket);
        return Ok(Target::Shard(shard));
    }
    if rules.strict_tenant {
        return Err(SqlError::new("42P10", format!("strict_tenant is on and this {} names no {key_col}", verb(stmt)))
            .hint(format!("add WHERE {key_col} = …, a /* {key_col}=… */ comment, or SET shardgate.tenant = …")));
    }
    if write && !rules.allow_cross_shard_writes {
        return Err(SqlError::new(
            "0A000",
            format!("{} on a sharded table without {key_col} would touch every shard", verb(stmt)),
        )
        .hint(format!("add WHERE {key_col} = …, or set allow_cross_shard_writes = true to allow it")));
    }
    // Rows live only on shards that own a bucket or a pinned tenant.
    if write {
        Ok(Target::All)
    } else {
        fanout_read(stmt, dir, catalog, dir.owning_shards())
    }
}

/// A read over several shards, if concatenating their answers gives exactly
/// what one Postgres would answer (see [`crate::sql::Read`]): joins of sharded
/// tables on the key, no outer join that keeps reference rows, subqueries tied
/// to the outer row by the key.
fn fanout_read(stmt: &Statement, dir: &Directory, catalog: &Catalog, shards: Vec<ShardId>) -> Result<Target, SqlError> {
    if let Some(read) = &stmt.read {
        read.check(&stmt.tables, &|t| catalog.is_sharded(t), &dir.key_column).map_err(|e| {
            SqlError::new("0A000", format!("cannot answer this read across shards exactly: {}", e.message)).hint(e.hint)
        })?;
    }
    Ok(Target::Fanout(shards))
}

/// Refuses a statement that may give rows of a sharded table a new key: the row
/// would stay on the shard the statement runs on, which its new key may not
/// route to. Allowed: assignments that keep the key (not recorded by the
/// analysis), and a new key equal to every key the statement is routed by (its
/// own, else the session's), which is where the statement runs.
fn check_key_changes(
    stmt: &Statement,
    params: Option<&Params<'_>>,
    fallback_key: Option<&TenantKey>,
    dir: &Directory,
    catalog: &Catalog,
) -> Result<(), SqlError> {
    for change in stmt.key_changes.iter().filter(|c| catalog.is_sharded(&c.table)) {
        let stays = match (&change.to, &stmt.kind) {
            (Some(to), StatementKind::Update) => is_every_routing_key(to, stmt, params, fallback_key, dir),
            _ => false,
        };
        if !stays {
            let key_col = &dir.key_column;
            return Err(SqlError::new(
                "0A000",
                format!(
                    "cannot change the sharding key {key_col} of rows in \"{}\": the row would stay on a shard its new key does not route to",
                    change.table
                ),
            )
            .hint(format!(
                "to give a row another {key_col}, delete it and insert it again with the new {key_col}, from the application; assignments that keep the key ({key_col} = {key_col}, or EXCLUDED.{key_col} in ON CONFLICT DO UPDATE) are allowed"
            )));
        }
    }
    Ok(())
}

/// `INSERT … SELECT` into a sharded table runs where the SELECT's key is; it is
/// refused unless every inserted row provably belongs to that shard: its key is
/// the source row's own key (read on that one shard), or a literal or parameter
/// equal to every key the statement is routed by.
fn check_insert_select(
    stmt: &Statement,
    target: &Target,
    params: Option<&Params<'_>>,
    fallback_key: Option<&TenantKey>,
    dir: &Directory,
    catalog: &Catalog,
) -> Result<(), SqlError> {
    let Some(ins) = &stmt.insert_select else { return Ok(()) };
    if !catalog.is_sharded(&ins.table) {
        return Ok(());
    }
    let key_col = &dir.key_column;
    let pos = key_position(&ins.table, ins.columns.as_deref(), catalog, key_col)?;
    let inserted = match (&ins.values, &ins.source) {
        (Some(values), _) => values.get(pos).cloned().unwrap_or(Inserted::Other),
        // `SELECT *`: the source's column at that position.
        (None, Some(source)) => match catalog.columns(source) {
            Some(c) if c.get(pos).is_some_and(|c| c.eq_ignore_ascii_case(key_col)) => Inserted::SourceKey,
            _ => Inserted::Other,
        },
        (None, None) => Inserted::Other,
    };
    let one_shard = matches!(target, Target::Shard(_) | Target::Any);
    let stays = match inserted {
        Inserted::SourceKey => one_shard,
        Inserted::Value(e) => one_shard && is_every_routing_key(&e, stmt, params, fallback_key, dir),
        Inserted::Other => false,
    };
    if stays {
        return Ok(());
    }
    Err(SqlError::new(
        "0A000",
        format!(
            "INSERT … SELECT into the sharded table {}: shardgate cannot prove that every inserted row's {key_col} routes to the shard the statement runs on",
            ins.table
        ),
    )
    .hint(format!(
        "select {key_col} from the rows of one tenant (INSERT INTO … SELECT {key_col}, … FROM … WHERE {key_col} = …), or insert the rows with INSERT … VALUES, which the router splits by {key_col}"
    )))
}

/// Where the key column is among the columns an INSERT gives (its list, else
/// the table's); 23502 when it gives none.
fn key_position(table: &str, columns: Option<&[String]>, catalog: &Catalog, key_col: &str) -> Result<usize, SqlError> {
    let position = |c: &[String]| c.iter().position(|c| c.eq_ignore_ascii_case(key_col));
    let pos = match columns {
        Some(c) => position(c),
        None => catalog.columns(table).as_deref().and_then(position),
    };
    pos.ok_or_else(|| {
        SqlError::new("23502", format!("INSERT into sharded table {table} does not set {key_col}"))
            .hint(format!("every row of a sharded table needs a {key_col}"))
    })
}

/// Whether `e` is, in this execution, the one key the statement is routed by
/// (every key of its own, else the session's): rows given that key stay on the
/// shard the statement runs on, wherever buckets are placed.
fn is_every_routing_key(
    e: &KeyExpr,
    stmt: &Statement,
    params: Option<&Params<'_>>,
    fallback_key: Option<&TenantKey>,
    dir: &Directory,
) -> bool {
    let to = resolve(e, params, dir.key_type).ok().flatten();
    let keys = statement_keys(stmt, params, fallback_key, dir.key_type);
    matches!((to, keys), (Some(to), Some(keys)) if !keys.is_empty() && keys.iter().all(|k| *k == to))
}

fn verb(stmt: &Statement) -> &'static str {
    match stmt.kind {
        StatementKind::Select => "SELECT",
        StatementKind::Insert => "INSERT",
        StatementKind::Update => "UPDATE",
        StatementKind::Delete => "DELETE",
        StatementKind::Merge => "MERGE",
        StatementKind::Copy(_) => "COPY",
        _ => "statement",
    }
}

/// The tenant keys a statement is restricted to in this execution: its key
/// conditions, else `fallback` (the session's tenant); None when it names none or
/// one of them cannot be read.
pub fn statement_keys(
    stmt: &Statement,
    params: Option<&Params<'_>>,
    fallback: Option<&TenantKey>,
    key_type: KeyType,
) -> Option<Vec<TenantKey>> {
    match &stmt.keys {
        KeyCandidates::Any(exprs) => exprs.iter().map(|e| resolve(e, params, key_type).ok().flatten()).collect(),
        KeyCandidates::None => fallback.map(|k| vec![k.clone()]),
    }
}

/// The tenant key an expression stands for in this execution; `None` for NULL.
pub fn resolve(e: &KeyExpr, params: Option<&Params<'_>>, key_type: KeyType) -> Result<Option<TenantKey>, SqlError> {
    let bad = |v: &str| {
        SqlError::new("22P02", format!("invalid input syntax for tenant key of type {}: \"{v}\"", key_type.sql_name()))
    };
    match e {
        KeyExpr::Literal(l) => {
            let text = match l.strip_prefix('\'').and_then(|s| s.strip_suffix('\'')) {
                Some(inner) => inner.replace("''", "'"),
                None => l.clone(),
            };
            key_type.parse_text(&text).map(Some).map_err(|_| bad(&text))
        }
        KeyExpr::Param(i) => {
            let Some(p) = params else {
                return Err(SqlError::new("08P01", format!("there is no parameter ${}", i + 1)));
            };
            let Some(value) = p.values.get(*i) else {
                return Err(SqlError::new(
                    "08P01",
                    format!("bind message supplies {} parameters, but the statement uses ${}", p.values.len(), i + 1),
                ));
            };
            let Some(value) = value else { return Ok(None) };
            let format = p.format_of(*i);
            if format == 0 {
                let text = std::str::from_utf8(value).map_err(|_| bad("<not UTF-8>"))?;
                return key_type.parse_text(text).map(Some).map_err(|_| bad(text));
            }
            binary_key(value, p.types.get(*i).copied().unwrap_or(0), key_type).map(Some)
        }
    }
}

const INT2: i32 = 21;
const INT4: i32 = 23;
const INT8: i32 = 20;
const TEXT: i32 = 25;
const VARCHAR: i32 = 1043;
const BPCHAR: i32 = 1042;
const UUID: i32 = 2950;

/// A binary-format parameter: decoded by its declared type, or by its length when
/// the client left the type to the server.
fn binary_key(v: &[u8], type_oid: i32, key_type: KeyType) -> Result<TenantKey, SqlError> {
    let bad = || {
        SqlError::new(
            "22P03",
            format!("cannot read a binary {}-byte parameter (type oid {type_oid}) as a tenant key", v.len()),
        )
    };
    let key = match (type_oid, v.len()) {
        (INT8, 8) | (0, 8) if key_type == KeyType::Int => {
            TenantKey::Int(i64::from_be_bytes(v.try_into().map_err(|_| bad())?))
        }
        (INT4, 4) | (0, 4) if key_type == KeyType::Int => {
            TenantKey::Int(i32::from_be_bytes(v.try_into().map_err(|_| bad())?) as i64)
        }
        (INT2, 2) | (0, 2) if key_type == KeyType::Int => {
            TenantKey::Int(i16::from_be_bytes(v.try_into().map_err(|_| bad())?) as i64)
        }
        (UUID, 16) | (0, 16) if key_type == KeyType::Uuid => {
            TenantKey::Uuid(uuid::Uuid::from_slice(v).map_err(|_| bad())?)
        }
        (TEXT | VARCHAR | BPCHAR | 0, _) => {
            let s = std::str::from_utf8(v).map_err(|_| bad())?;
            key_type.parse_text(s).map_err(|_| bad())?
        }
        _ => return Err(bad()),
    };
    key_type.coerce(key).map_err(|_| bad())
}
