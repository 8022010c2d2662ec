//! Key → bucket → shard: deciding where one statement runs.
//!
//! Input: the cached [`Statement`] analysis, the bind parameters of this execution
//! (if any), the session's `shardgate.tenant`, and the directory snapshot. Output: a
//! [`Target`]. No I/O happens here; this is the function to read to learn the
//! routing rules.

use shardgate_directory::{Directory, KeyType, ShardId, TenantKey};

use crate::context::{Catalog, Marks};
use crate::error::SqlError;
use crate::sql::{CopyInfo, Defaults, Inserted, KeyCandidates, KeyExpr, SqlPrepared, Statement, StatementKind};

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
#[derive(Debug, Clone, Copy, Default)]
pub struct Rules {
    pub strict_tenant: bool,
    pub allow_cross_shard_writes: bool,
    /// Writes that name tenants on several shards run on each of them and
    /// commit together (two-phase commit): `cross_shard_transactions`.
    pub atomic_writes: bool,
    /// The client keeps its server connections (session pooling): state that
    /// outlives a transaction is routed, not refused (session/pooling.rs
    /// places it).
    pub session_state: bool,
    /// The session set its `search_path` (at startup, or with `SET`): a
    /// bare table name may mean another schema's table than `public`'s.
    pub search_path_set: bool,
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
    Routing { params, fallback_key, dir, catalog, rules: *rules }.route(stmt, touched)
}

/// What routing one execution of a statement reads: its bind parameters, the
/// session's tenant, the directory snapshot, the catalog and the rules.
#[derive(Clone, Copy)]
struct Routing<'a> {
    params: Option<&'a Params<'a>>,
    fallback_key: Option<&'a TenantKey>,
    dir: &'a Directory,
    catalog: &'a Catalog,
    rules: Rules,
}

impl Routing<'_> {
    fn route(&self, stmt: &Statement, touched: &mut Vec<u32>) -> Result<Target, SqlError> {
        if stmt.nested_writes.is_empty() {
            self.route_one(stmt, touched)
        } else {
            self.route_with_nested_writes(stmt, touched)
        }
    }

    /// A statement with data-changing statements inside it (`WITH x AS (INSERT …)
    /// SELECT …`, EXPLAIN ANALYZE of a write): it runs on one server connection,
    /// so it runs only where every one of its writes, routed as a statement of its
    /// own by its own keys (an INSERT by its rows'), and the rest of it, routed
    /// as it would be alone, all belong: one shard, or anywhere, or every shard
    /// when each part is for every shard (reference tables). Anything else is
    /// refused: running it on several shards would run its writes on each.
    fn route_with_nested_writes(&self, stmt: &Statement, touched: &mut Vec<u32>) -> Result<Target, SqlError> {
        let key_col = &self.dir.key_column;
        // A part for several shards is refused below whatever
        // allow_cross_shard_writes says, with the reason that holds here.
        let parts = Routing { rules: Rules { allow_cross_shard_writes: true, ..self.rules }, ..*self };
        let several = || {
            SqlError::new(
            "0A000",
            "this statement changes data inside WITH (or under EXPLAIN ANALYZE or COPY) and would need several shards: it must run on one shard, where every row it writes or reads belongs".to_string(),
        )
        .hint(format!(
            "name one tenant throughout (WHERE {key_col} = … in each part, the same {key_col} in inserted rows), or send each write as a statement of its own"
        ))
        };
        let mut combined = Target::Any;
        for part in stmt.nested_writes.iter().map(Some).chain([None]) {
            let (t, written) = match part {
                Some(w) => (parts.route(w, touched)?, &w.written),
                None => (parts.route_one(stmt, touched)?, &stmt.written),
            };
            // Every shard is for reference tables; a sharded table's rows are each
            // on one.
            if t == Target::All && written.iter().any(|t| self.catalog.is_sharded(t)) {
                return Err(several());
            }
            combined = match (combined, t) {
                (Target::Any, t @ (Target::Shard(_) | Target::Any | Target::All)) | (t, Target::Any) => t,
                (Target::Shard(a), Target::Shard(b)) if a == b => Target::Shard(a),
                (Target::All, Target::All) => Target::All,
                _ => return Err(several()),
            };
        }
        Ok(combined)
    }

    fn route_one(&self, stmt: &Statement, touched: &mut Vec<u32>) -> Result<Target, SqlError> {
        let Routing { params, dir, catalog, .. } = *self;
        let reads_sharded = stmt.tables.iter().any(|t| catalog.is_sharded(t));
        let writes_sharded = stmt.written.iter().any(|t| catalog.is_sharded(t));
        let key_col = &dir.key_column;
        self.check_key_changes(stmt)?;
        if let Some(what) = stmt.opaque_code {
            // Its statements are inside a string the router does not read: it
            // runs where the session says its tenant is, or not at all.
            let Some(k) = self.fallback_key else {
                return Err(SqlError::new(
                    "0A000",
                    format!("{what} runs on one shard, and shardgate cannot see which tables it reads or writes"),
                )
                .hint(format!(
                    "name the tenant whose shard it runs on (a /* {key_col}=… */ comment or SET shardgate.tenant), or send its statements as plain SQL (shardgate runs DDL on every shard)"
                )));
            };
            let (bucket, shard) = dir.locate(k);
            touched.push(bucket);
            return Ok(Target::Shard(shard));
        }
        match &stmt.kind {
            StatementKind::Ddl if stmt.copies_rows && reads_sharded => Err(SqlError::new(
                "0A000",
                "a table filled from a query over sharded tables (CREATE TABLE … AS, CREATE MATERIALIZED VIEW, SELECT … INTO) would get each shard's own rows on that shard".to_string(),
            )
            .hint("create the table, then fill it with INSERT … SELECT naming one tenant at a time, or read the rows through the router and COPY them in")),
            StatementKind::Ddl if stmt.creates_sharded.as_deref().is_some_and(|t| catalog.is_reference(t)) => {
                let t = stmt.creates_sharded.as_deref().unwrap_or_default();
                Err(SqlError::new(
                    "0A000",
                    format!("{t} is a reference table, its rows copied on every shard: with the key column {key_col} each copy would count as rows of its own"),
                )
                .hint(format!("create a new table with {key_col}, fill it through the router (INSERT … SELECT or COPY), and drop {t}")))
            }
            StatementKind::Ddl => match stmt.removes_key.as_deref().filter(|t| catalog.is_sharded(t)) {
                None => Ok(Target::All),
                Some(t) => Err(SqlError::new(
                    "0A000",
                    format!("{t} is sharded by {key_col}; without it its rows would stay scattered over the shards while reads went to one"),
                )
                .hint(format!("keep {key_col} in {t}, or drop the table"))),
            },
            StatementKind::SqlPrepared(p) => Err(sql_prepared_refusal(p)),
            StatementKind::SessionState(state) if !self.rules.session_state => Err(session_state_refusal(state)),
            StatementKind::SessionState(_) if reads_sharded => self.single_or(stmt, false, touched),
            StatementKind::SessionState(_) => Ok(Target::Any),
            StatementKind::DeclareCursor if reads_sharded => match self.single_or(stmt, false, touched)? {
                // A cursor's rows come from the one connection that declared it.
                Target::Fanout(_) => Err(SqlError::new(
                    "0A000",
                    format!("a cursor over a sharded table reads one shard: its query must name one {key_col}"),
                )
                .hint(format!("add WHERE {key_col} = … to the cursor's query, or run the query without a cursor"))),
                t => Ok(t),
            },
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
                let target = self.single_or(stmt, true, touched)?;
                self.check_insert_select(stmt, &target)?;
                Ok(target)
            }
            StatementKind::Merge if writes_sharded => Err(SqlError::new(
                "0A000",
                format!("MERGE into a sharded table ({}) is not supported", stmt.written.join(", ")),
            )
            .hint(format!("use INSERT … ON CONFLICT, or UPDATE and INSERT statements that each name one {key_col}"))),
            StatementKind::Insert | StatementKind::Update | StatementKind::Delete | StatementKind::Merge => {
                if writes_sharded {
                    self.single_or(stmt, true, touched)
                } else if let Some(f) = stmt.volatile_call.filter(|_| !stmt.written.is_empty()) {
                    // Each shard's copy of the row would get a value of its own.
                    Err(SqlError::new(
                        "0A000",
                        format!(
                            "{f} in a write to the reference table {} would give each shard's copy of the rows a value of its own",
                            stmt.written.join(", ")
                        ),
                    )
                    .hint("compute the value first (SELECT it through shardgate, or in the application) and write it as a literal or parameter"))
                } else if let Some((t, col)) = self.volatile_default(stmt) {
                    Err(SqlError::new(
                        "0A000",
                        format!("column {col} of the reference table {t} would take its default on each shard, each shard's copy of the row a value of its own"),
                    )
                    .hint(format!("give {col} a value in the statement (computed first, through shardgate or in the application)")))
                } else if !reads_sharded {
                    Ok(Target::All)
                } else {
                    // Writes a reference table while reading a sharded one.
                    Err(SqlError::new("0A000", "a write to a reference table cannot read sharded tables".to_string()))
                }
            }
            StatementKind::Copy(CopyInfo { per_shard: Some(why), .. }) if reads_sharded => {
                match self.single_or(stmt, false, touched)? {
                    Target::Fanout(_) => Err(SqlError::new(
                        "0A000",
                        format!("COPY (query) TO over several shards sends each shard's rows as they come: the query's {why} would apply to each shard's rows alone"),
                    )
                    .hint(format!("name one {key_col} in the query, or run it as a SELECT, which shardgate merges"))),
                    t => Ok(t),
                }
            }
            StatementKind::Select
            | StatementKind::SelectWithWrites
            | StatementKind::Copy(_)
            | StatementKind::DeclareCursor
            | StatementKind::Other => {
                if !reads_sharded {
                    Ok(Target::Any)
                } else {
                    self.single_or(stmt, false, touched)
                }
            }
        }
    }
}

/// Why a statement that leaves session state on its server connection is
/// refused (see [`crate::sql`]'s `pooled_state`): the connection goes back to
/// the pool when the transaction ends.
fn session_state_refusal(state: &str) -> SqlError {
    let instead = match state {
        "LISTEN" => "poll a table for changes",
        "a session-level advisory lock" => {
            "take pg_advisory_xact_lock(…) inside a transaction (it is released at COMMIT)"
        }
        "a cursor WITH HOLD" => "fetch the rows inside the transaction (a cursor without WITH HOLD), or page by key",
        "SET ROLE" => "log in as that role (shardgate logs in to the shards as each client's role), or SET LOCAL ROLE inside a transaction",
        _ => "create it with ON COMMIT DROP inside a transaction, or use a regular table",
    };
    SqlError::new(
        "0A000",
        format!(
            "{state} outlives the transaction on its server connection, and shardgate pools server connections per transaction: another client would get it"
        ),
    )
    .hint(format!(
        "{instead}; or give this role pool_mode = \"session\" ([router] role_pool_modes), which keeps a client's server connections for its whole session"
    ))
}

/// Why SQL-level PREPARE, EXECUTE and DEALLOCATE are refused where routing
/// sees them (docs/routing.md "SQL PREPARE and EXECUTE"): the session carries
/// a statement prepared with SQL itself, and routes each EXECUTE by its
/// arguments, when each is a simple query of its own. Beside other statements,
/// under EXPLAIN or CREATE TABLE AS, or through the extended protocol they
/// would reach a shard as written, where no statement of that name is the
/// session's.
fn sql_prepared_refusal(p: &SqlPrepared) -> SqlError {
    let (what, name) = match p {
        SqlPrepared::Prepare { name } => ("PREPARE", name.as_str()),
        SqlPrepared::Execute { name } => ("EXECUTE", name.as_str()),
        SqlPrepared::Deallocate { name } => ("DEALLOCATE", name.as_deref().unwrap_or("ALL")),
    };
    SqlError::new(
        "0A000",
        format!(
            "{what} {name} must be sent on its own, as a simple query: shardgate carries SQL prepared statements itself, and not beside other statements, under EXPLAIN or CREATE TABLE AS, or through the extended protocol"
        ),
    )
    .hint(format!(
        "send {what} as a query string of its own (psycopg 3: with no parameters, or through a ClientCursor), or use your driver's protocol-level prepared statements (Parse, Bind, Execute), which shardgate prepares on whichever shard each execution is routed to"
    ))
}

/// The transaction that the statements being routed join, as routing sees it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Joining {
    /// The shard the transaction already runs on (its connection is held).
    pub bound: Option<ShardId>,
    /// A transaction block is open: BEGIN was sent, or answered and held back.
    pub in_block: bool,
    /// The block may go on on another shard (two-phase commit joins it
    /// there); the statements of one query string still share one shard.
    pub cross_shard: bool,
}

/// Routes the statements of one query string (or of one Bind) and combines
/// their targets with the transaction they join: where they all run, or why
/// they cannot run together. The buckets they touch are added to `touched`.
#[allow(clippy::too_many_arguments)]
pub fn route_statements(
    statements: &[Statement],
    params: Option<&Params<'_>>,
    fallback_key: Option<&TenantKey>,
    dir: &Directory,
    catalog: &Catalog,
    rules: &Rules,
    joining: Joining,
    touched: &mut Vec<u32>,
) -> Result<Target, SqlError> {
    check_catalog_names(statements, catalog, rules, &dir.key_column)?;
    let join_later = joining.cross_shard && joining.in_block;
    let mut combined = if join_later { None } else { joining.bound.map(Target::Shard) };
    let several = statements.len() > 1;
    for stmt in statements {
        let t = route(stmt, params, fallback_key, dir, catalog, rules, touched)?;
        if let (Target::Fanout(_), [read], true) = (&t, statements, joining.in_block) {
            if read.kind == StatementKind::Select && read.nested_writes.is_empty() && !may_lock_rows(&read.text) {
                // A read of every shard inside a transaction block: the
                // shards the block reached read on its connections (its own
                // writes seen), the others on connections of their own
                // (docs/transactions.md, "Reads of every shard").
                check_reference_reads(statements, &t, dir, catalog)?;
                return Ok(t);
            }
        }
        let c = combine(combined, t, joining, dir)?;
        if several && !matches!(c, Target::Shard(_) | Target::Any | Target::All) {
            return Err(SqlError::new(
                "0A000",
                "a query string of several statements cannot include a cross-shard statement".into(),
            )
            .hint("send the cross-shard statement on its own"));
        }
        combined = Some(c);
    }
    let mut target = combined.unwrap_or(Target::Any);
    if let (true, Some(bound)) = (join_later, joining.bound) {
        target = match target {
            // Another shard joins the transaction (two-phase commit).
            Target::Shard(s) => Target::Shard(s),
            // A write of tenants on several shards: each shard's part joins
            // the block (session/twophase.rs).
            Target::Fanout(f) if matches!(statements, [s] if matches!(s.kind, StatementKind::Update | StatementKind::Delete)) => {
                Target::Fanout(f)
            }
            // A multi-row INSERT for several shards: each shard's rows join it.
            Target::SplitInsert(parts) => Target::SplitInsert(parts),
            t => combine(Some(Target::Shard(bound)), t, joining, dir)?,
        };
    }
    check_reference_reads(statements, &target, dir, catalog)?;
    let joins = join_later && matches!(target, Target::SplitInsert(_));
    if joining.in_block && matches!(target, Target::SplitInsert(_) | Target::CopySplit) && !joins {
        return Err(SqlError::new(
            "0A000",
            "statements for several shards (DDL, cross-shard writes) cannot run inside a transaction block".into(),
        )
        .hint("run them outside BEGIN … COMMIT"));
    }
    Ok(target)
}

/// Refuses a bare table name that means tables of different shapes in
/// different schemas ([`Catalog::ambiguous`]), unless the session's
/// `search_path` is the default, under which it means `public`'s. The router
/// does not follow `search_path`; the shard would resolve the name one way
/// while the router routed it another.
///
/// Refuses too, but in DDL, a view or inheritance parent without the key
/// column over sharded rows ([`Catalog::opaque`]): each shard would answer
/// it from its own rows.
fn check_catalog_names(
    statements: &[Statement],
    catalog: &Catalog,
    rules: &Rules,
    key_col: &str,
) -> Result<(), SqlError> {
    if !catalog.marked(Marks::AMBIGUOUS | Marks::OPAQUE) {
        return Ok(());
    }
    for s in statements.iter().filter(|s| s.kind != StatementKind::Ddl) {
        if let Some(t) = s.tables.iter().find(|t| catalog.opaque(t)) {
            return Err(SqlError::new(
                "0A000",
                format!("{t} reads rows of sharded tables but has no {key_col} column: each shard would answer it from its own rows alone"),
            )
            .hint("read the sharded tables themselves, or give the view its tables' key column (each tenant's rows are then read on its shard)"));
        }
    }
    let search_path_set = rules.search_path_set || statements.iter().any(|s| s.sets_search_path);
    for t in statements.iter().flat_map(|s| s.tables.iter().chain(&s.written)) {
        let Some(a) = catalog.ambiguous(t) else { continue };
        if a.default_public && !search_path_set {
            continue;
        }
        let other = a.schemas.iter().find(|s| *s != "public").unwrap_or(&a.schemas[0]);
        return Err(SqlError::new(
            "0A000",
            format!(
                "\"{t}\" names different tables in the schemas {}: which one a name without its schema means depends on search_path, which shardgate does not follow",
                a.schemas.join(", ")
            ),
        )
        .hint(format!("write the table's name with its schema ({other}.{t})")));
    }
    Ok(())
}

/// Why `currval()` or `lastval()` is refused at the start of a transaction:
/// they read what `nextval()` last gave in the server connection's session,
/// and with connections pooled per transaction that session is not the
/// client's. The client's own value is there only after a statement of the
/// same transaction (block or query string) on the same connection: PHP's
/// `lastInsertId()` sends `SELECT lastval()` alone, after the INSERT, and got
/// whatever another client's insert left there.
pub fn last_value_refusal() -> SqlError {
    SqlError::new(
        "0A000",
        "currval() and lastval() read the value nextval() last gave on the server connection, which in a transaction of their own is not this client's: shardgate pools connections per transaction".into(),
    )
    .hint("take the id from INSERT … RETURNING, or call currval() in the same transaction block or query string as the INSERT")
}

/// Refuses a statement that uses a table created earlier in its query string
/// or transaction with the key column, or with columns that may include it
/// (`fresh`: those of the transaction's earlier statements). The router
/// learns a table's shape from the shards once its creation commits; until
/// then it would take the table for a reference table and write its rows on
/// every shard.
pub fn check_fresh_tables<'a, I>(statements: I, fresh: &[String]) -> Result<(), SqlError>
where
    I: IntoIterator<Item = &'a Statement> + Clone,
{
    if fresh.is_empty() && statements.clone().into_iter().all(|s| s.creates_sharded.is_none()) {
        return Ok(());
    }
    let bare = |t: &str| t.strip_prefix("public.").unwrap_or(t).to_string();
    let mut created: Vec<String> = fresh.iter().map(|t| bare(t)).collect();
    for stmt in statements {
        if stmt.kind != StatementKind::Ddl {
            let uses =
                stmt.tables.iter().chain(&stmt.written).chain(stmt.nested_writes.iter().flat_map(|w| &w.written));
            if let Some(t) = uses.map(|t| bare(t)).find(|t| created.contains(t)) {
                return Err(SqlError::new(
                    "0A000",
                    format!(
                        "table {t} is created (or given the key column) in this transaction or query string, and shardgate learns where its rows go only once that commits"
                    ),
                )
                .hint(format!("commit the CREATE TABLE (or ALTER TABLE) first, then read or write {t}")));
            }
        }
        if let Some(t) = &stmt.creates_sharded {
            created.push(bare(t));
        }
    }
    Ok(())
}

/// Whether a read may take row locks (`FOR UPDATE`, `FOR SHARE` and their
/// kin): inside a transaction block those must be held to its end, which a
/// shard the block has not reached cannot do. A text scan: a mention inside a
/// string only refuses what could have run.
fn may_lock_rows(sql: &str) -> bool {
    let lower = sql.to_ascii_lowercase();
    let words: Vec<&str> =
        lower.split(|c: char| !c.is_ascii_alphanumeric() && c != '_').filter(|w| !w.is_empty()).collect();
    words.windows(2).any(|w| w[0] == "for" && matches!(w[1], "update" | "share" | "no" | "key"))
}

/// Where a statement runs together with those before it (`before`: their
/// combined target, or the transaction's shard): the same shard, anywhere, or
/// every shard for statements that all need every shard; anything else is
/// refused, since one query string or transaction runs on one connection.
pub fn combine(before: Option<Target>, next: Target, joining: Joining, dir: &Directory) -> Result<Target, SqlError> {
    let name = |s: ShardId| dir.shards.get(s).map(|x| x.name.clone()).unwrap_or_default();
    match (before, next) {
        (None, t) => Ok(t),
        (Some(c), Target::Any) => Ok(c),
        (Some(Target::Any), t) => Ok(t),
        (Some(Target::Shard(a)), Target::Shard(b)) if a == b => Ok(Target::Shard(a)),
        (Some(Target::All), Target::All) => Ok(Target::All),
        (Some(Target::Shard(a)), Target::Shard(b)) => Err(if joining.bound.is_some() && !joining.cross_shard {
            SqlError::new(
                "0A000",
                format!("this transaction runs on shard {} and cannot touch shard {}", name(a), name(b)),
            )
            .hint("cross_shard_transactions = \"refuse\" keeps each transaction on one shard; set it to \"two_phase\" to commit across shards")
        } else {
            SqlError::new(
                "0A000",
                format!("these statements of one query string touch shards {} and {}", name(a), name(b)),
            )
            .hint("send them one at a time; inside BEGIN … COMMIT they commit on every shard together")
        }),
        (Some(Target::Shard(_)), Target::Fanout(_)) if joining.bound.is_some() => {
            Err(SqlError::new("0A000", "a transaction is bound to one shard; this read would need every shard".into())
                .hint("name the tenant in the query, or run it outside the transaction"))
        }
        (Some(_), _) => Err(SqlError::new(
            "0A000",
            if joining.in_block {
                "statements for several shards (DDL, cross-shard reads or writes) cannot run inside a transaction block"
                    .to_string()
            } else {
                "this query string mixes statements for different shards".to_string()
            },
        )
        .hint("send them one at a time, outside BEGIN … COMMIT")),
    }
}

/// Where the statements of one extended-protocol pipeline (its Binds up to
/// Sync) run: they share one server connection, so one shard, or anywhere.
pub fn combine_pipeline(before: Option<Target>, next: Target) -> Result<Target, SqlError> {
    match (before, next) {
        (None, t) | (Some(Target::Any), t) => Ok(t),
        (Some(c), Target::Any) => Ok(c),
        (Some(Target::Shard(a)), Target::Shard(b)) if a == b => Ok(Target::Shard(a)),
        (Some(_), _) => {
            Err(SqlError::new("0A000", "statements of one pipeline (up to Sync) touch different shards".into())
                .hint("send a Sync between statements for different tenants"))
        }
    }
}

/// Where a statement runs inside a transaction open on every shard (a schema
/// migration): its one shard, anywhere, or every shard of the transaction.
/// Targets that need connections of their own (fan-out reads, split writes)
/// are refused by the caller.
pub fn combine_on_every_shard(before: Target, next: Target) -> Target {
    match (before, next) {
        (Target::Any, t) | (t, Target::Any) => t,
        (Target::Shard(a), Target::Shard(b)) if a == b => Target::Shard(a),
        (Target::Shard(_) | Target::All, Target::Shard(_) | Target::All) => Target::All,
        // A fan-out or a split stays what it is, for the caller to refuse.
        (_, t @ (Target::Fanout(_) | Target::SplitInsert(_) | Target::CopySplit)) => t,
        (t, _) => t,
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
        let nested = stmt.nested_writes.iter().flat_map(|w| &w.tables);
        if let Some(table) = stmt.tables.iter().chain(nested).find(|t| catalog.is_reference(t)) {
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
impl Routing<'_> {
    fn single_or(&self, stmt: &Statement, write: bool, touched: &mut Vec<u32>) -> Result<Target, SqlError> {
        let Routing { params, fallback_key, dir, catalog, rules } = *self;
        let key_col = &dir.key_column;
        // A sharded table read with no restriction to the keys: on the keys'
        // shard alone it would show only that shard's rows of it
        // (crate::sql::restriction).
        let partial = match &stmt.keys {
            KeyCandidates::Any(_) => stmt.unrestricted.iter().find(|t| catalog.is_sharded(t)),
            KeyCandidates::None => None,
        };
        let keys = if partial.is_some() { &KeyCandidates::None } else { &stmt.keys };
        if let KeyCandidates::Any(exprs) = keys {
            // The shards in order, each once; inline (no allocation) for the
            // one key of nearly every statement.
            let mut shards: smallvec::SmallVec<[ShardId; 4]> = smallvec::SmallVec::new();
            let mut add = |k: &TenantKey| {
                let (bucket, shard) = dir.locate(k);
                touched.push(bucket);
                if let Err(at) = shards.binary_search(&shard) {
                    shards.insert(at, shard);
                }
            };
            for e in exprs {
                match e {
                    KeyExpr::ParamArray(_) => resolve_all(e, params, dir.key_type)?.iter().for_each(&mut add),
                    _ => resolve(e, params, dir.key_type)?.iter().for_each(&mut add),
                }
            }
            return Ok(match shards.len() {
                // Only NULL keys: matches no row anywhere.
                0 => Target::Any,
                1 => Target::Shard(shards[0]),
                _ if write && !rules.allow_cross_shard_writes && !rules.atomic_writes => {
                    return Err(SqlError::new(
                        "0A000",
                        format!("this {} touches tenants on {} shards", verb(stmt), shards.len()),
                    )
                    .hint("write one tenant per statement, or set cross_shard_transactions = \"two_phase\" to write them together"))
                }
                _ if write => fanout_write(stmt, dir, catalog, Target::Fanout(shards.into_iter().collect()))?,
                _ => fanout_read(stmt, dir, catalog, shards.into_iter().collect())?,
            });
        }
        if let Some(k) = fallback_key {
            let (bucket, shard) = dir.locate(k);
            touched.push(bucket);
            return Ok(Target::Shard(shard));
        }
        if let Some(t) = partial.filter(|_| write || rules.strict_tenant) {
            return Err(SqlError::new(
                "0A000",
                format!(
                    "this {} names its {key_col}, but also reads or writes the sharded table {t} without restricting it to that {key_col}: on one shard it would see only that shard's rows of {t}",
                    verb(stmt)
                ),
            )
            .hint(format!(
                "restrict every reference to {t} too: {t}.{key_col} = … (the same tenant), or {t}.{key_col} = <other table>.{key_col} where it is joined or correlated"
            )));
        }
        if rules.strict_tenant {
            return Err(SqlError::new(
                "42P10",
                format!("strict_tenant is on and this {} names no {key_col}", verb(stmt)),
            )
            .hint(format!("add WHERE {key_col} = …, a /* {key_col}=… */ comment, or SET shardgate.tenant = …")));
        }
        if write && !rules.allow_cross_shard_writes {
            return Err(SqlError::new(
            "0A000",
            format!("{} on a sharded table without {key_col} would touch every shard", verb(stmt)),
        )
        .hint(if stmt.kind == StatementKind::Insert {
            // INSERT … SELECT: allow_cross_shard_writes would not help, the
            // rows must go where their keys route.
            format!(
                "an INSERT … SELECT runs on one shard: select one tenant's rows (WHERE {key_col} = … in its SELECT), or send the rows as INSERT … VALUES or COPY, which shardgate splits by {key_col}"
            )
        } else {
            format!("add WHERE {key_col} = …, or set allow_cross_shard_writes = true to allow it")
        }));
        }
        // Rows live only on shards that own a bucket or a pinned tenant.
        if write {
            fanout_write(stmt, dir, catalog, Target::All)
        } else {
            fanout_read(stmt, dir, catalog, dir.owning_shards())
        }
    }
}

impl Routing<'_> {
    /// A column of the reference table `stmt` writes that the write leaves to
    /// a default each shard would compute for itself ([`Catalog::volatile_defaults`]).
    fn volatile_default(&self, stmt: &Statement) -> Option<(String, String)> {
        if stmt.defaults == Defaults::Nothing {
            return None;
        }
        let t = stmt.written.first()?;
        let columns = self.catalog.volatile_defaults(t)?;
        let listed = match (&stmt.insert, &stmt.insert_select) {
            (Some(i), _) => i.columns.as_deref(),
            (None, Some(i)) => i.columns.as_deref(),
            (None, None) => None,
        };
        let left = columns.into_iter().find(|(at, name)| match &stmt.defaults {
            Defaults::Nothing => false,
            Defaults::Unlisted => !listed.is_some_and(|given| given.contains(name)),
            Defaults::After(n) => at >= n,
            Defaults::Any => true,
        })?;
        Some((t.clone(), left.1))
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

/// An UPDATE or DELETE run on several shards, if each shard changes exactly
/// the rows one Postgres would: the rows it pairs from its FROM (USING) and its
/// subqueries must be found on the shard of the row they change (the read of
/// those rows is checked as [`fanout_read`] checks a SELECT).
fn fanout_write(stmt: &Statement, dir: &Directory, catalog: &Catalog, target: Target) -> Result<Target, SqlError> {
    if let Some(read) = &stmt.read {
        read.check(&stmt.tables, &|t| catalog.is_sharded(t), &dir.key_column).map_err(|e| {
            SqlError::new("0A000", format!("cannot run this {} across shards exactly: {}", verb(stmt), e.message))
                .hint(e.hint)
        })?;
    }
    Ok(target)
}

/// Refuses a statement that may give rows of a sharded table a new key: the row
/// would stay on the shard the statement runs on, which its new key may not
/// route to. Allowed: assignments that keep the key (not recorded by the
/// analysis), and a new key equal to every key the statement is routed by (its
/// own, else the session's), which is where the statement runs.
impl Routing<'_> {
    fn check_key_changes(&self, stmt: &Statement) -> Result<(), SqlError> {
        let dir = self.dir;
        for change in stmt.key_changes.iter().filter(|c| self.catalog.is_sharded(&c.table)) {
            let stays = match (&change.to, &stmt.kind) {
                (Some(to), StatementKind::Update) => self.is_every_routing_key(to, stmt),
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
    fn check_insert_select(&self, stmt: &Statement, target: &Target) -> Result<(), SqlError> {
        let Routing { dir, catalog, .. } = *self;
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
                Some(c) if c.get(pos).is_some_and(|c| c == key_col) => Inserted::SourceKey,
                _ => Inserted::Other,
            },
            (None, None) => Inserted::Other,
        };
        let one_shard = matches!(target, Target::Shard(_) | Target::Any);
        let stays = match inserted {
            Inserted::SourceKey => one_shard,
            Inserted::Value(e) => one_shard && self.is_every_routing_key(&e, stmt),
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

    /// Whether `e` is, in this execution, the one key the statement is routed by
    /// (every key of its own, else the session's): rows given that key stay on the
    /// shard the statement runs on, wherever buckets are placed.
    fn is_every_routing_key(&self, e: &KeyExpr, stmt: &Statement) -> bool {
        let to = resolve(e, self.params, self.dir.key_type).ok().flatten();
        let keys = statement_keys(stmt, self.params, self.fallback_key, self.dir.key_type);
        matches!((to, keys), (Some(to), Some(keys)) if !keys.is_empty() && keys.iter().all(|k| *k == to))
    }
}

/// Where the key column is among the columns an INSERT gives (its list, else
/// the table's); 23502 when it gives none.
fn key_position(table: &str, columns: Option<&[String]>, catalog: &Catalog, key_col: &str) -> Result<usize, SqlError> {
    let position = |c: &[String]| c.iter().position(|c| c == key_col);
    let pos = match columns {
        Some(c) => position(c),
        None => catalog.columns(table).as_deref().and_then(position),
    };
    pos.ok_or_else(|| {
        SqlError::new("23502", format!("INSERT into sharded table {table} does not set {key_col}"))
            .hint(format!("every row of a sharded table needs a {key_col}"))
    })
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
        KeyCandidates::Any(exprs) => {
            let mut keys = Vec::new();
            for e in exprs {
                match e {
                    KeyExpr::ParamArray(_) => keys.extend(resolve_all(e, params, key_type).ok()?),
                    _ => keys.push(resolve(e, params, key_type).ok().flatten()?),
                }
            }
            Some(keys)
        }
        KeyCandidates::None => fallback.map(|k| vec![k.clone()]),
    }
}

/// Every tenant key an expression stands for in this execution (none for
/// NULL; an array parameter's non-NULL elements).
pub fn resolve_all(e: &KeyExpr, params: Option<&Params<'_>>, key_type: KeyType) -> Result<Vec<TenantKey>, SqlError> {
    let KeyExpr::ParamArray(i) = e else {
        return Ok(resolve(e, params, key_type)?.into_iter().collect());
    };
    let bad = |why: String| {
        SqlError::new("22P02", format!("cannot read parameter ${} as an array of tenant keys: {why}", i + 1))
    };
    let Some(value) = param_value(params, *i)? else { return Ok(Vec::new()) };
    let p = params.expect("param_value found the parameter");
    // Text, or a text value the statement casts to an array (`$1::text::int8[]`):
    // a binary array starts with its dimension count, a zero byte, never with
    // the `{` or `[` an array's text starts with.
    let declared = p.types.get(*i).copied().unwrap_or(0);
    let text_form = matches!(value.first(), Some(b'{' | b'['));
    if p.format_of(*i) == 0 || matches!(declared, TEXT | VARCHAR | BPCHAR) || text_form {
        let text = std::str::from_utf8(value).map_err(|_| bad("not UTF-8".into()))?;
        let elements = crate::key_array::text_elements(text).map_err(bad)?;
        return elements
            .into_iter()
            .flatten()
            .map(|v| key_type.parse_text(&v).map_err(|_| bad(format!("\"{v}\" is not a {}", key_type.sql_name()))))
            .collect();
    }
    let (elem_type, items) = crate::key_array::binary_elements(value).map_err(bad)?;
    items.into_iter().flatten().map(|v| binary_key(v, elem_type, key_type)).collect()
}

/// The value bound to parameter `i` (None for NULL).
fn param_value<'a>(params: Option<&Params<'a>>, i: usize) -> Result<Option<&'a [u8]>, SqlError> {
    let Some(p) = params else {
        return Err(SqlError::new("08P01", format!("there is no parameter ${}", i + 1)));
    };
    match p.values.get(i) {
        Some(v) => Ok(v.as_deref()),
        None => Err(SqlError::new(
            "08P01",
            format!("bind message supplies {} parameters, but the statement uses ${}", p.values.len(), i + 1),
        )),
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
                Some(inner) if inner.contains("''") => std::borrow::Cow::Owned(inner.replace("''", "'")),
                Some(inner) => std::borrow::Cow::Borrowed(inner),
                None => std::borrow::Cow::Borrowed(l.as_str()),
            };
            key_type.parse_text(&text).map(Some).map_err(|_| bad(&text))
        }
        KeyExpr::Param(i) => {
            let Some(value) = param_value(params, *i)? else { return Ok(None) };
            let p = params.expect("param_value found the parameter");
            if p.format_of(*i) == 0 {
                let text = std::str::from_utf8(value).map_err(|_| bad("<not UTF-8>"))?;
                return key_type.parse_text(text).map(Some).map_err(|_| bad(text));
            }
            binary_key(value, p.types.get(*i).copied().unwrap_or(0), key_type).map(Some)
        }
        // Stands for several keys: read with [`resolve_all`].
        KeyExpr::ParamArray(i) => Err(SqlError::new(
            "0A000",
            format!("parameter ${} is an array of tenant keys; it cannot stand for one", i + 1),
        )),
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
        (INT8, 8) | (0, 8) | (INT4, 4) | (0, 4) | (INT2, 2) | (0, 2) if key_type == KeyType::Int => {
            TenantKey::Int(int_by_length(v).ok_or_else(bad)?)
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

/// A big-endian int2, int4 or int8 (Postgres's binary form of each), told
/// apart by its length.
fn int_by_length(v: &[u8]) -> Option<i64> {
    Some(match v.len() {
        2 => i16::from_be_bytes(v.try_into().ok()?).into(),
        4 => i32::from_be_bytes(v.try_into().ok()?).into(),
        8 => i64::from_be_bytes(v.try_into().ok()?),
        _ => return None,
    })
}

/// A key column's value in binary form where the column's own type wrote it
/// (a binary COPY field): an integer key by its length (the column may be
/// smallint, integer or bigint), a uuid's 16 bytes, text's UTF-8. The key is
/// the one the same value in text form gives, so a row goes where its text
/// form would. Unlike a parameter's, the form is never guessed from the
/// length: 8 bytes of a uuid key are an error, not text.
pub fn column_key(v: &[u8], key_type: KeyType, column: &str) -> Result<TenantKey, SqlError> {
    let bad = |expected: &str| {
        SqlError::new(
            "22P03",
            format!(
                "incorrect binary data format in {column}: {} bytes, where a {} key has {expected}",
                v.len(),
                key_type.sql_name()
            ),
        )
    };
    match key_type {
        KeyType::Int => int_by_length(v).map(TenantKey::Int).ok_or_else(|| bad("2, 4 or 8")),
        KeyType::Uuid => uuid::Uuid::from_slice(v).map(TenantKey::Uuid).map_err(|_| bad("16")),
        KeyType::Text => match std::str::from_utf8(v) {
            Ok(s) => Ok(TenantKey::Text(s.to_string())),
            Err(e) => Err(SqlError::new(
                "22021",
                format!("invalid byte sequence for encoding \"UTF8\" in {column}: 0x{:02x}", v[e.valid_up_to()]),
            )),
        },
    }
}

#[cfg(test)]
mod tests {
    use shardgate_directory::Shard;

    use super::*;
    use crate::sql::AnalysisCache;

    fn three_shards() -> Directory {
        let shard = |name: &str| Shard::new(name, format!("postgres://u@{name}/db"));
        Directory::new("tenant_id", KeyType::Int, 64, vec![shard("a"), shard("b"), shard("c")]).expect("directory")
    }

    const OUTSIDE: Joining = Joining { bound: None, in_block: false, cross_shard: false };

    fn refusal(r: Result<Target, SqlError>) -> String {
        match r {
            Err(e) => {
                assert_eq!(e.code, "0A000");
                e.message
            }
            Ok(t) => panic!("expected a refusal, got {t:?}"),
        }
    }

    #[test]
    fn statements_on_one_shard_or_anywhere_run_there_together() {
        let dir = three_shards();
        assert_eq!(combine(None, Target::Any, OUTSIDE, &dir).ok(), Some(Target::Any));
        assert_eq!(combine(Some(Target::Any), Target::Shard(1), OUTSIDE, &dir).ok(), Some(Target::Shard(1)));
        assert_eq!(combine(Some(Target::Shard(1)), Target::Any, OUTSIDE, &dir).ok(), Some(Target::Shard(1)));
        assert_eq!(combine(Some(Target::Shard(2)), Target::Shard(2), OUTSIDE, &dir).ok(), Some(Target::Shard(2)));
        assert_eq!(combine(Some(Target::All), Target::All, OUTSIDE, &dir).ok(), Some(Target::All));
    }

    #[test]
    fn statements_on_two_shards_are_refused_naming_both() {
        let dir = three_shards();
        let outside = refusal(combine(Some(Target::Shard(0)), Target::Shard(2), OUTSIDE, &dir));
        assert_eq!(outside, "these statements of one query string touch shards a and c");
        let bound = Joining { bound: Some(0), in_block: true, cross_shard: false };
        let inside = refusal(combine(Some(Target::Shard(0)), Target::Shard(1), bound, &dir));
        assert_eq!(inside, "this transaction runs on shard a and cannot touch shard b");
    }

    #[test]
    fn a_transaction_on_one_shard_refuses_a_read_of_every_shard() {
        let dir = three_shards();
        let bound = Joining { bound: Some(1), in_block: true, cross_shard: false };
        let e = refusal(combine(Some(Target::Shard(1)), Target::Fanout(vec![0, 1, 2]), bound, &dir));
        assert!(e.contains("bound to one shard"), "{e}");
        // DDL after a statement for one shard, in a block and outside one.
        let held = Joining { bound: None, in_block: true, cross_shard: false };
        assert!(refusal(combine(Some(Target::Shard(1)), Target::All, held, &dir)).contains("transaction block"));
        assert!(refusal(combine(Some(Target::Shard(1)), Target::All, OUTSIDE, &dir)).contains("mixes statements"));
    }

    #[test]
    fn a_pipeline_runs_on_one_shard() {
        assert_eq!(combine_pipeline(None, Target::Shard(1)).ok(), Some(Target::Shard(1)));
        assert_eq!(combine_pipeline(Some(Target::Any), Target::Shard(1)).ok(), Some(Target::Shard(1)));
        assert_eq!(combine_pipeline(Some(Target::Shard(1)), Target::Any).ok(), Some(Target::Shard(1)));
        assert_eq!(combine_pipeline(Some(Target::Shard(1)), Target::Shard(1)).ok(), Some(Target::Shard(1)));
        let e = refusal(combine_pipeline(Some(Target::Shard(1)), Target::Shard(2)));
        assert!(e.contains("pipeline"), "{e}");
        refusal(combine_pipeline(Some(Target::Shard(1)), Target::Fanout(vec![0, 1])));
    }

    #[test]
    fn a_transaction_on_every_shard_runs_shard_statements_everywhere_and_keeps_fan_outs_to_refuse() {
        use Target::*;
        assert_eq!(combine_on_every_shard(Any, Shard(1)), Shard(1));
        assert_eq!(combine_on_every_shard(Shard(1), Shard(1)), Shard(1));
        assert_eq!(combine_on_every_shard(Shard(1), Shard(2)), All);
        assert_eq!(combine_on_every_shard(All, Shard(2)), All);
        // A cross-shard read beside a write: not answered from one shard's rows.
        assert_eq!(combine_on_every_shard(Shard(1), Fanout(vec![0, 1])), Fanout(vec![0, 1]));
        assert_eq!(combine_on_every_shard(Fanout(vec![0, 1]), Shard(1)), Fanout(vec![0, 1]));
        assert_eq!(combine_on_every_shard(All, CopySplit), CopySplit);
    }

    #[test]
    fn a_keyless_insert_select_is_told_to_name_one_tenant_or_send_its_rows_to_be_split() {
        let c = crate::sql::testing::cluster();
        let e = c.route("insert into orders select t, 1, 0 from generate_series(1, 100) t").expect_err("refused");
        assert_eq!(e.code, "0A000");
        let hint = e.hint.unwrap_or_default();
        assert!(hint.contains("INSERT … SELECT runs on one shard") && hint.contains("INSERT … VALUES"), "{hint}");
    }

    #[test]
    fn sql_prepare_execute_and_deallocate_reaching_routing_are_refused_with_what_to_do() {
        // The session carries them alone in a simple query; routing sees them
        // only beside other statements, under EXPLAIN or CREATE TABLE AS, or
        // through the extended protocol, and must never send them to a shard.
        let c = crate::sql::testing::cluster();
        for (sql, message) in [
            ("prepare p as insert into orders values ($1, $2, 0)", "PREPARE p must be sent on its own"),
            ("prepare one as select 1", "PREPARE one must be sent on its own"),
            ("execute p(5, 1)", "EXECUTE p must be sent on its own"),
            ("explain analyze execute p(5, 1)", "EXECUTE p must be sent on its own"),
            ("create table copied as execute p(5, 1)", "EXECUTE p must be sent on its own"),
            ("deallocate p", "DEALLOCATE p must be sent on its own"),
            ("deallocate prepare p", "DEALLOCATE p must be sent on its own"),
            ("deallocate all", "DEALLOCATE ALL must be sent on its own"),
        ] {
            let e = c.route(sql).expect_err(sql);
            assert_eq!(e.code, "0A000", "{sql}");
            assert!(e.message.starts_with(message), "{sql}: {}", e.message);
            assert!(e.hint.as_deref().is_some_and(|h| h.contains("protocol-level prepared statements")), "{sql}");
        }
    }

    fn sharded_orders() -> Catalog {
        let catalog = Catalog::default();
        catalog.replace(
            [("orders".to_string(), vec!["tenant_id".to_string(), "id".to_string()])],
            ["orders".to_string(), "countries".to_string()],
        );
        catalog
    }

    fn key_on(dir: &Directory, shard: ShardId) -> i64 {
        (1..).find(|&k| dir.shard_for(&TenantKey::Int(k)) == shard).unwrap_or_default()
    }

    #[test]
    fn a_query_string_routes_as_one_and_refuses_a_cross_shard_statement_inside_it() {
        let dir = three_shards();
        let catalog = sharded_orders();
        let rules = Rules::default();
        let cache = AnalysisCache::new("tenant_id", 100);
        let run = |sql: &str, joining: Joining| {
            let a = cache.get(sql).map_err(|e| e.to_string()).expect("parses");
            route_statements(&a.statements, None, None, &dir, &catalog, &rules, joining, &mut Vec::new())
        };
        let (k0, k1) = (key_on(&dir, 0), key_on(&dir, 1));
        let two =
            format!("update orders set id = 2 where tenant_id = {k0}; select * from orders where tenant_id = {k0}");
        assert_eq!(run(&two, OUTSIDE).ok(), Some(Target::Shard(0)));
        let mixed = format!("select 1 from orders where tenant_id = {k0}; select 1 from orders where tenant_id = {k1}");
        assert!(refusal(run(&mixed, OUTSIDE)).contains("touch shards a and b"));
        let with_fanout = "select 1; select count(*) from orders";
        assert!(refusal(run(with_fanout, OUTSIDE)).contains("cannot include a cross-shard statement"));
        // A transaction held on shard b takes its tenant's statements only.
        let bound = Joining { bound: Some(1), in_block: true, cross_shard: false };
        let other = format!("select * from orders where tenant_id = {k0}");
        assert!(refusal(run(&other, bound)).contains("runs on shard b"));
        // A split insert joins a transaction block only when blocks may span
        // shards (cross_shard_transactions = "two_phase").
        let split = format!("insert into orders (tenant_id, id) values ({k0}, 1), ({k1}, 2)");
        assert!(matches!(run(&split, OUTSIDE), Ok(Target::SplitInsert(_))));
        let held = Joining { bound: None, in_block: true, cross_shard: false };
        assert!(refusal(run(&split, held)).contains("inside a transaction block"));
        let spans = Joining { bound: Some(1), in_block: true, cross_shard: true };
        assert!(matches!(run(&split, spans), Ok(Target::SplitInsert(_))));
    }

    /// A binary COPY field gives the key its text form gives, whatever the
    /// width of an integer key column; a wrong length is 22P03, not a guess.
    #[test]
    fn a_binary_column_value_is_the_key_its_text_form_is() {
        let col = "tenant_id";
        for v in [0i64, 7, -3, 32767] {
            let text = KeyType::Int.parse_text(&v.to_string()).unwrap();
            assert_eq!(column_key(&(v as i16).to_be_bytes(), KeyType::Int, col).unwrap(), text);
            assert_eq!(column_key(&(v as i32).to_be_bytes(), KeyType::Int, col).unwrap(), text);
            assert_eq!(column_key(&v.to_be_bytes(), KeyType::Int, col).unwrap(), text);
        }
        assert_eq!(column_key(&i64::MIN.to_be_bytes(), KeyType::Int, col).unwrap(), TenantKey::Int(i64::MIN));
        for bad in [&b""[..], b"123", b"12345"] {
            assert_eq!(column_key(bad, KeyType::Int, col).unwrap_err().code, "22P03");
        }
        let u = uuid::Uuid::from_u128(0x1234_5678_9abc_def0_1122_3344_5566_7788);
        let text = KeyType::Uuid.parse_text(&u.to_string()).unwrap();
        assert_eq!(column_key(u.as_bytes(), KeyType::Uuid, col).unwrap(), text);
        assert_eq!(column_key(u.to_string().as_bytes(), KeyType::Uuid, col).unwrap_err().code, "22P03");
        assert_eq!(column_key("ü x".as_bytes(), KeyType::Text, col).unwrap(), KeyType::Text.parse_text("ü x").unwrap());
        let e = column_key(b"a\xff", KeyType::Text, col).unwrap_err();
        assert_eq!(
            (e.code, e.message.as_str()),
            ("22021", "invalid byte sequence for encoding \"UTF8\" in tenant_id: 0xff")
        );
    }
}
