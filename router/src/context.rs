//! What every session of one router shares: the directory snapshot, the pools, the
//! statement cache, the table catalog and the cancel registry.
//!
//! The settings a reload may change ([`crate::reload`]) are swapped whole:
//! `config`, `users` and `client_tls` are snapshots a reader loads once per
//! connection or per login, and the few switches every statement reads are
//! copied into one atomic byte ([`Switches`]), so a statement pays a plain
//! load for them and no reader ever takes a lock.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use arc_swap::{ArcSwap, ArcSwapOption};

use shardgate_directory::{Directory, DirectoryHandle, ShardId};

use crate::auth::Credential;
use crate::backend::ShardAddress;
use crate::config::RouterConfig;
use crate::moves::{DirectoryWriter, ShardSetup};
use crate::pool::ShardPool;
use crate::sql::AnalysisCache;

/// The catalog's maps, looked up by every statement: keyed by the table names
/// a refresh read from the shards, so a fast hash without a random seed does.
type NameMap<V> = rustc_hash::FxHashMap<String, V>;
type NameSet = rustc_hash::FxHashSet<String>;

/// Tables that have the key column, with their columns in order (for `INSERT`
/// and `COPY` without a column list). Every other table is a reference table.
#[derive(Default)]
pub struct Catalog {
    /// Read by every statement on every session thread, written by a refresh:
    /// a snapshot swapped whole, so a read writes no memory another thread reads
    /// (a lock's reader count would bounce between cores).
    sharded: ArcSwap<NameMap<Vec<String>>>,
    /// Every table the last refresh saw, sharded or not.
    known: ArcSwap<NameSet>,
    /// The columns `COPY` without a column list reads, for the sharded tables
    /// that have generated columns (which it leaves out).
    copied: ArcSwap<NameMap<Vec<String>>>,
    /// Bare names whose tables in different schemas differ (sharded or not,
    /// or their columns): which one a bare name means depends on
    /// `search_path` ([`Catalog::ambiguous`]).
    ambiguous: ArcSwap<NameMap<Ambiguous>>,
    /// Which of `ambiguous`, `opaque` and `defaults` hold anything
    /// ([`Marks`]): one plain load per statement when none do, and a
    /// reference table with a `serial` column costs other statements nothing.
    marks: AtomicU8,
    /// Reference tables' columns with a default each shard would compute for
    /// itself ([`Catalog::volatile_defaults`]).
    defaults: ArcSwap<NameMap<Vec<(usize, String)>>>,
    /// Views and inheritance parents that read rows of sharded tables but have
    /// no key column of their own ([`Catalog::opaque`]).
    opaque: ArcSwap<NameSet>,
    /// Bare names that `sharded` and `known` also hold for a table outside
    /// `public` (the only table of that name): not listed by [`Catalog::tables`].
    aliases: ArcSwap<NameSet>,
    /// Unknown names and when a refresh last looked for them.
    looked_for: Mutex<HashMap<String, std::time::Instant>>,
    /// Counts refreshes, which follow every DDL the router runs: statements
    /// prepared in different generations may see different columns.
    generation: std::sync::atomic::AtomicU64,
}

impl Catalog {
    /// Whether `table` (`name` or `schema.name`) is sharded.
    pub fn is_sharded(&self, table: &str) -> bool {
        self.read().contains_key(normalize(table))
    }

    pub fn columns(&self, table: &str) -> Option<Vec<String>> {
        self.read().get(normalize(table)).cloned()
    }

    /// The columns `COPY table FROM STDIN` without a column list reads: the
    /// table's columns but its generated ones.
    pub fn copy_columns(&self, table: &str) -> Option<Vec<String>> {
        match self.copied.load().get(normalize(table)) {
            Some(c) => Some(c.clone()),
            None => self.columns(table),
        }
    }

    /// Records the columns COPY reads of the tables with generated columns.
    pub fn set_copy_columns(&self, tables: HashMap<String, Vec<String>>) {
        self.copied.store(Arc::new(tables.into_iter().collect()));
    }

    pub fn replace(
        &self,
        tables: impl IntoIterator<Item = (String, Vec<String>)>,
        known: impl IntoIterator<Item = String>,
    ) {
        self.sharded.store(Arc::new(tables.into_iter().collect()));
        self.known.store(Arc::new(known.into_iter().collect()));
        self.generation.fetch_add(1, Ordering::Relaxed);
    }

    /// Replaces the catalog with the shards' tables, bare names resolved as
    /// [`resolve_names`] says.
    /// `opaque`: views and inheritance parents without the key column that
    /// read sharded rows, as `(schema, name)`.
    pub fn replace_all(&self, entries: Vec<TableEntry>, role_schemas: &[String], opaque: Vec<(String, String)>) {
        let resolved = resolve_names(entries, role_schemas);
        let opaque: NameSet = opaque
            .into_iter()
            .flat_map(|(schema, name)| {
                // Under its bare name too when that is not another table's.
                let bare = (schema == "public" || resolved.aliases.contains(&name) || !resolved.known.contains(&name))
                    .then(|| name.clone());
                let qualified = (schema != "public").then(|| format!("{schema}.{name}"));
                bare.into_iter().chain(qualified)
            })
            .collect();
        let marks = [
            (Marks::AMBIGUOUS, !resolved.ambiguous.is_empty()),
            (Marks::OPAQUE, !opaque.is_empty()),
            (Marks::DEFAULTS, !resolved.defaults.is_empty()),
        ]
        .iter()
        .filter(|(_, any)| *any)
        .fold(0, |m, (bit, _)| m | bit);
        self.opaque.store(Arc::new(opaque));
        self.defaults.store(Arc::new(resolved.defaults));
        self.marks.store(marks, Ordering::Relaxed);
        self.ambiguous.store(Arc::new(resolved.ambiguous));
        self.aliases.store(Arc::new(resolved.aliases));
        self.replace(resolved.sharded, resolved.known);
    }

    /// Where a bare table name (no schema) means tables that differ from one
    /// schema to another: the schemas, and whether the default `search_path`
    /// means `public`'s. None for a qualified name or one that is not so.
    pub fn ambiguous(&self, table: &str) -> Option<Ambiguous> {
        if !self.marked(Marks::AMBIGUOUS) || table.contains('.') {
            return None;
        }
        self.ambiguous.load().get(table).cloned()
    }

    /// Whether `table` is a view (plain or materialized) or an inheritance
    /// parent that reads rows of sharded tables without having the key
    /// column: each shard would answer it from its own rows, and a router
    /// that took it for a reference table would read it on one.
    pub fn opaque(&self, table: &str) -> bool {
        self.marked(Marks::OPAQUE) && self.opaque.load().contains(normalize(table))
    }

    /// The columns of the reference table `table` whose default each shard
    /// would compute for itself (`now()`, `nextval()`, `gen_random_uuid()`, an
    /// identity), with their places among its columns: a row that takes one
    /// would differ from copy to copy.
    pub fn volatile_defaults(&self, table: &str) -> Option<Vec<(usize, String)>> {
        if !self.marked(Marks::DEFAULTS) {
            return None;
        }
        self.defaults.load().get(normalize(table)).cloned()
    }

    /// Whether some name is marked so (`Marks::AMBIGUOUS | Marks::OPAQUE`:
    /// either).
    pub fn marked(&self, marks: u8) -> bool {
        self.marks.load(Ordering::Relaxed) & marks != 0
    }

    /// The schema generation: it changes with every refresh.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Relaxed)
    }

    /// Whether `table` is a reference table: a table of the shards' schema
    /// without the key column.
    pub fn is_reference(&self, table: &str) -> bool {
        let t = normalize(table);
        !self.read().contains_key(t) && self.known.load().contains(t)
    }

    /// Whether any of `tables` (system catalogs aside) is unknown to the catalog.
    pub fn has_unknown(&self, tables: &[String]) -> bool {
        let known = self.known.load();
        tables.iter().any(|t| !is_system(t) && !known.contains(normalize(t)))
    }

    /// Whether any of `tables` is unknown to the catalog (created by another
    /// router, or straight on the shards) and was not looked for in the last
    /// second: names that exist nowhere must not reload the catalog per query.
    pub fn needs_refresh(&self, tables: &[String]) -> bool {
        let known = self.known.load();
        let unknown: Vec<String> = tables
            .iter()
            .filter(|t| !is_system(t))
            .map(|t| normalize(t))
            .filter(|t| !known.contains(*t))
            .map(str::to_string)
            .collect();
        drop(known);
        if unknown.is_empty() {
            return false;
        }
        let mut looked = self.looked_for.lock().unwrap_or_else(|p| p.into_inner());
        let now = std::time::Instant::now();
        let mut refresh = false;
        for t in unknown {
            let recent = looked.get(&t).is_some_and(|at| now.duration_since(*at) < std::time::Duration::from_secs(1));
            if !recent {
                looked.insert(t, now);
                refresh = true;
            }
        }
        if looked.len() > 10_000 {
            looked.retain(|_, at| now.duration_since(*at) < std::time::Duration::from_secs(1));
        }
        refresh
    }

    pub fn tables(&self) -> Vec<String> {
        let aliases = self.aliases.load();
        let mut t: Vec<_> = self.read().keys().filter(|k| !aliases.contains(*k)).cloned().collect();
        t.sort();
        t
    }

    fn read(&self) -> arc_swap::Guard<Arc<NameMap<Vec<String>>>> {
        self.sharded.load()
    }
}

/// The views (plain and materialized) and inheritance parents without the
/// key column that read rows of tables with it, directly or through other
/// views and parents: `(schema, name)` rows. A view's rule depends on the
/// relations it reads (`pg_depend`); a parent reads its children's rows.
fn opaque_relations_sql(key_column: &str) -> String {
    let key = crate::sql::quote::literal(key_column);
    format!(
        "WITH RECURSIVE \
         has_key AS (SELECT attrelid AS oid FROM pg_attribute WHERE attname = {key} AND attnum > 0 AND NOT attisdropped), \
         reads(reader, read) AS ( \
             SELECT DISTINCT r.ev_class, d.refobjid FROM pg_rewrite r \
             JOIN pg_depend d ON d.classid = 'pg_rewrite'::regclass AND d.objid = r.oid \
                  AND d.refclassid = 'pg_class'::regclass AND d.refobjid <> r.ev_class \
             UNION SELECT inhparent, inhrelid FROM pg_inherits), \
         sharded_rows(oid) AS ( \
             SELECT reader FROM reads JOIN pg_class t ON t.oid = reads.read \
             WHERE t.relkind IN ('r', 'p') AND t.oid IN (SELECT oid FROM has_key) \
             UNION SELECT reads.reader FROM reads JOIN sharded_rows s ON reads.read = s.oid) \
         SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE c.oid IN (SELECT oid FROM sharded_rows) AND c.oid NOT IN (SELECT oid FROM has_key) \
         AND n.nspname NOT IN ('pg_catalog', 'information_schema')"
    )
}

/// The kinds of names [`Catalog::marked`] tells of.
pub struct Marks;

impl Marks {
    /// [`Catalog::ambiguous`].
    pub const AMBIGUOUS: u8 = 1;
    /// [`Catalog::opaque`].
    pub const OPAQUE: u8 = 2;
    /// [`Catalog::volatile_defaults`].
    pub const DEFAULTS: u8 = 4;
}

/// One table of the shards' schema, as a catalog refresh reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableEntry {
    pub schema: String,
    pub name: String,
    /// Its columns in order, when it has the key column (a sharded table).
    pub sharded: Option<Vec<String>>,
    /// Its columns whose default each shard computes for itself (`now()`,
    /// `nextval()`, an identity …), with their places among its columns.
    pub volatile_defaults: Vec<(usize, String)>,
}

/// A bare table name whose tables differ between schemas.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ambiguous {
    pub schemas: Vec<String>,
    /// `public` holds one of them and no other is in a schema named like a
    /// role (`"$user"`): under the default `search_path` the name is
    /// `public`'s.
    pub default_public: bool,
}

/// The catalog's maps from the shards' tables.
#[derive(Debug, Default)]
struct Resolved {
    sharded: NameMap<Vec<String>>,
    known: NameSet,
    aliases: NameSet,
    ambiguous: NameMap<Ambiguous>,
    /// Reference tables' [`TableEntry::volatile_defaults`], where they have any.
    defaults: NameMap<Vec<(usize, String)>>,
}

/// Keys the tables by name: `public`'s by their bare name, others as
/// `schema.name`. A bare name also means the table outside `public` when it is
/// the only table of that name (an application whose `search_path` names its
/// own schema writes `orders` for `app.orders`: taken for an unknown table,
/// its rows were written on every shard). Where several schemas hold tables
/// of one name that differ (sharded in one, or other columns), the bare name
/// is [`Ambiguous`]; alike, it is routed as any of them would be.
/// `role_schemas`: schemas named like a role, which the default
/// `search_path` (`"$user", public`) puts before `public`.
fn resolve_names(entries: Vec<TableEntry>, role_schemas: &[String]) -> Resolved {
    let mut r = Resolved::default();
    let mut by_name: HashMap<String, Vec<TableEntry>> = HashMap::new();
    for e in entries {
        let key = if e.schema == "public" { e.name.clone() } else { format!("{}.{}", e.schema, e.name) };
        if let Some(cols) = &e.sharded {
            r.sharded.insert(key.clone(), cols.clone());
        } else if !e.volatile_defaults.is_empty() {
            r.defaults.insert(key.clone(), e.volatile_defaults.clone());
        }
        r.known.insert(key);
        by_name.entry(e.name.clone()).or_default().push(e);
    }
    for (name, mut tables) in by_name {
        tables.sort_by(|a, b| (a.schema != "public", &a.schema).cmp(&(b.schema != "public", &b.schema)));
        let has_public = tables[0].schema == "public";
        if tables.windows(2).any(|w| w[0].sharded != w[1].sharded) {
            let schemas: Vec<String> = tables.iter().map(|t| t.schema.clone()).collect();
            let default_public = has_public && !schemas.iter().any(|s| role_schemas.contains(s));
            r.ambiguous.insert(name, Ambiguous { schemas, default_public });
        } else if !has_public {
            // One table, or tables alike: the bare name routes as they do.
            if let Some(cols) = &tables[0].sharded {
                r.sharded.insert(name.clone(), cols.clone());
            } else if !tables[0].volatile_defaults.is_empty() {
                r.defaults.insert(name.clone(), tables[0].volatile_defaults.clone());
            }
            r.known.insert(name.clone());
            r.aliases.insert(name);
        }
    }
    r
}

fn is_system(t: &str) -> bool {
    t.starts_with("pg_") || t.starts_with("pg_catalog.") || t.starts_with("information_schema.")
}

/// `public.orders` and `orders` are the same table; names are folded to lower case
/// as Postgres does for unquoted identifiers (the parser already did for the SQL).
fn normalize(table: &str) -> &str {
    table.strip_prefix("public.").unwrap_or(table)
}

/// Where a session's running statement can be cancelled (None while idle).
pub type CancelSlot = Arc<Mutex<Option<CancelTarget>>>;

/// The server connection a session is using, for forwarding a client's
/// `CancelRequest`.
#[derive(Clone)]
pub struct CancelTarget {
    /// The shard's pool (for its address): an `Arc`, so recording the target on
    /// every transaction costs no allocation.
    pub pool: Arc<ShardPool>,
    pub pid: i32,
    pub secret: i32,
}

/// The settings every statement reads, copied from the configuration in force
/// into one atomic byte: a statement reads them with a plain load, where a
/// snapshot of the whole configuration would cost it an `ArcSwap` guard each.
pub struct Switches(AtomicU8);

impl Switches {
    const STRICT_TENANT: u8 = 1;
    const ALLOW_CROSS_SHARD_WRITES: u8 = 2;
    const TWO_PHASE: u8 = 4;
    const PREPARE_SIMPLE_QUERIES: u8 = 8;
    const IDLE_TIMEOUTS: u8 = 16;

    fn of(config: &RouterConfig) -> Switches {
        let s = Switches(AtomicU8::new(0));
        s.store(config);
        s
    }

    /// Copies `config`'s switches (a reload).
    pub(crate) fn store(&self, config: &RouterConfig) {
        let flags = [
            (config.strict_tenant, Self::STRICT_TENANT),
            (config.allow_cross_shard_writes, Self::ALLOW_CROSS_SHARD_WRITES),
            (config.cross_shard_transactions == crate::config::CrossShard::TwoPhase, Self::TWO_PHASE),
            (config.prepare_simple_queries, Self::PREPARE_SIMPLE_QUERIES),
            (!config.client_idle_timeout.is_zero() || !config.idle_transaction_timeout.is_zero(), Self::IDLE_TIMEOUTS),
        ];
        let bits = flags.iter().filter(|(on, _)| *on).fold(0, |bits, (_, bit)| bits | bit);
        self.0.store(bits, Ordering::Relaxed);
    }

    fn is(&self, bit: u8) -> bool {
        self.0.load(Ordering::Relaxed) & bit != 0
    }
}

pub struct RouterContext {
    /// The configuration in force: the one the router started with, or the
    /// last reload's (whose settings that need a restart keep their values
    /// from the start). Load it once where it is read; the statement path
    /// reads [`Self::rules`] and its kin instead.
    pub config: ArcSwap<RouterConfig>,
    /// What every statement reads of `config`.
    switches: Switches,
    /// One reload at a time ([`crate::reload`]).
    pub(crate) reloading: Mutex<()>,
    /// Where a reload reads the new configuration from (`shardgate serve`
    /// installs its file); none: the router cannot be reloaded.
    pub config_source: std::sync::OnceLock<Arc<dyn crate::reload::ConfigSource>>,
    pub directory: DirectoryHandle,
    pub pools: RwLock<Vec<Arc<ShardPool>>>,
    /// What the health probes last saw of each shard (see [`crate::health`]).
    health: RwLock<Vec<Arc<crate::health::ShardHealth>>>,
    pub cache: AnalysisCache,
    pub catalog: Catalog,
    /// The `[[users]]` entries by name, as their logins check them.
    pub users: ArcSwap<HashMap<String, Credential>>,
    /// Clients as their own roles on the shards: the password lookup and the
    /// per-role pools (`[router.auth]`).
    pub roles: crate::roles::Roles,
    /// Database names a client may connect with (the shards' own and the
    /// configured aliases); others get 3D000.
    pub databases: Vec<String>,
    /// (our pid, our secret) given to a client → what it is running on now.
    pub cancels: Mutex<HashMap<(i32, i32), CancelSlot>>,
    /// ParameterStatus values reported to clients at login.
    pub server_params: Mutex<Vec<(String, String)>>,
    next_any: AtomicUsize,
    /// Shards (a bit per id below 64) whose last health probe failed
    /// ([`crate::health`]): [`Self::any_shard`] passes them over.
    pub down_shards: std::sync::atomic::AtomicU64,
    pub clients: AtomicUsize,
    /// Connections still logging in (bounded by `max_pending_logins`).
    pub logins: AtomicUsize,
    /// Every session's idle state, for the idle timeouts' janitor.
    pub idle: crate::idle::IdleWatches,
    /// The shards sort text bytewise (default collation C or POSIX from libc, no
    /// column with a collation of its own): merged sorts on text
    /// columns are then exact.
    pub c_collation: std::sync::atomic::AtomicBool,
    /// Login details of shards by name (with passwords) from the configuration;
    /// shards added later log in with their URL's user and `shard_password`.
    pub credentials: HashMap<String, ShardAddress>,
    /// This router's directory replica and its lease, when the directory is
    /// replicated; None for a static directory.
    pub replica: Option<(shardgate_directory::replica::Node, std::time::Duration)>,
    /// How this router writes to the directory (heartbeats, hold acknowledgements).
    pub writer: Arc<dyn DirectoryWriter>,
    /// This router's name in the directory's router list.
    pub router_id: String,
    /// Open transactions by the buckets they touched (what a cutover hold waits for).
    pub in_flight: Arc<crate::hold::InFlight>,
    /// How long statements waited on each hold, for the heartbeat.
    pub held: crate::hold::HeldWaits,
    /// One catalog refresh at a time; statements naming a table the catalog does
    /// not know wait for the refresh in flight instead of routing without it.
    refreshing: tokio::sync::Mutex<()>,
    /// Reads of moving rows compared on both shards (a move's shadow phase).
    pub shadow: crate::shadow::Shadow,
    /// Makes a shard just added ready (installed by the migrator; see [`ShardSetup`]).
    pub shard_setup: std::sync::OnceLock<Arc<dyn ShardSetup>>,
    /// What each bucket (and the busiest tenants) cost this router.
    pub load: crate::load::Load,
    /// The last bucket sizes read from the shards, for the status views.
    pub sizes: crate::sizes::SizeCache,
    /// Clients' TLS: what an SSLRequest is answered with, whether plain
    /// clients are refused. Disabled until the server sets it; a reload
    /// replaces it (new handshakes get the new certificate).
    pub client_tls: ArcSwap<crate::tls::ClientTls>,
    /// The admin API's HTTPS, when it serves HTTPS (`[admin] tls`): the
    /// router's certificate too, so a reload replaces it with `client_tls`.
    pub admin_tls: ArcSwapOption<tokio_rustls::TlsAcceptor>,
}

impl RouterContext {
    pub fn new(
        config: RouterConfig,
        directory: DirectoryHandle,
        pools: Vec<Arc<ShardPool>>,
        users: HashMap<String, Credential>,
        credentials: HashMap<String, ShardAddress>,
        replica: Option<(shardgate_directory::replica::Node, std::time::Duration)>,
    ) -> RouterContext {
        let key_column = directory.load().key_column.clone();
        let config_auth = config.auth.clone();
        let mut databases: Vec<String> = credentials.values().map(|a| a.database.clone()).collect();
        databases.extend(config.database_aliases.iter().cloned());
        databases.sort();
        databases.dedup();
        let (writer, router_id): (Arc<dyn DirectoryWriter>, String) = match &replica {
            Some((node, _)) => (Arc::new(crate::hold::ReplicaWriter(node.clone())), format!("router-{}", node.id)),
            None => (Arc::new(crate::hold::LocalWriter(directory.clone())), "router-local".to_string()),
        };
        RouterContext {
            writer,
            router_id,
            in_flight: Arc::new(crate::hold::InFlight::new(directory.load().bucket_count)),
            held: Default::default(),
            refreshing: tokio::sync::Mutex::new(()),
            shadow: crate::shadow::Shadow::new(config.moves.shadow_concurrency.max(1)),
            shard_setup: std::sync::OnceLock::new(),
            load: crate::load::Load::new(directory.load().bucket_count),
            sizes: crate::sizes::SizeCache::default(),
            client_tls: ArcSwap::from_pointee(crate::tls::ClientTls::disabled()),
            admin_tls: ArcSwapOption::empty(),
            logins: AtomicUsize::new(0),
            idle: crate::idle::IdleWatches::default(),
            cache: AnalysisCache::new(key_column, config.statement_cache_size),
            switches: Switches::of(&config),
            reloading: Mutex::new(()),
            config_source: std::sync::OnceLock::new(),
            config: ArcSwap::from_pointee(config),
            directory,
            pools: RwLock::new(pools),
            health: RwLock::new(Vec::new()),
            catalog: Catalog::default(),
            users: ArcSwap::from_pointee(users),
            roles: crate::roles::Roles::new(config_auth),
            databases,
            cancels: Mutex::new(HashMap::new()),
            server_params: Mutex::new(Vec::new()),
            next_any: AtomicUsize::new(0),
            down_shards: std::sync::atomic::AtomicU64::new(0),
            clients: AtomicUsize::new(0),
            c_collation: std::sync::atomic::AtomicBool::new(false),
            credentials,
            replica,
        }
    }

    /// The pool of a shard, created on first use for shards the directory gained
    /// after start-up.
    /// What the health probes last saw of `shard`.
    pub fn shard_health(&self, shard: ShardId) -> Arc<crate::health::ShardHealth> {
        if let Some(h) = self.health.read().unwrap_or_else(|p| p.into_inner()).get(shard) {
            return h.clone();
        }
        let mut all = self.health.write().unwrap_or_else(|p| p.into_inner());
        while all.len() <= shard {
            all.push(Default::default());
        }
        all[shard].clone()
    }

    pub fn pool(&self, shard: ShardId) -> Option<Arc<ShardPool>> {
        let known = self.pools.read().unwrap_or_else(|p| p.into_inner()).get(shard).cloned();
        if known.is_some() {
            return known;
        }
        let dir = self.directory.load();
        let mut pools = self.pools.write().unwrap_or_else(|p| p.into_inner());
        // Read under the lock: a reload stores the configuration before it
        // configures the pools there are, so a pool made now is not missed.
        let config = self.config.load();
        while pools.len() <= shard {
            let s = dir.shards.get(pools.len())?;
            let address = self.shard_address(&dir, pools.len())?;
            pools.push(ShardPool::new(s.name.clone(), address, &config.pool, &config.tcp_keepalive, config.threads));
        }
        pools.get(shard).cloned()
    }

    /// The pool of `shard` for a session of `role` (None: the router's own
    /// login, the shard URL's user).
    pub fn pool_as(&self, role: Option<&crate::roles::RolePools>, shard: ShardId) -> Option<Arc<ShardPool>> {
        match role {
            None => self.pool(shard),
            Some(r) => r.pool(self, &self.directory.load(), shard),
        }
    }

    /// Every pool created so far, the roles' too.
    pub fn all_pools(&self) -> Vec<Arc<ShardPool>> {
        let mut all = self.pools.read().unwrap_or_else(|p| p.into_inner()).clone();
        all.extend(self.roles.all_pools());
        all
    }

    /// Whether `user` may open the admin console: an admin, or anyone when
    /// the router asks no one for a password.
    pub fn is_admin(&self, user: &str) -> bool {
        self.config.load().admins.iter().any(|a| a == user)
            || (self.users.load().is_empty() && !self.roles.pass_through())
    }

    /// The routing rules in force (`strict_tenant`, `allow_cross_shard_writes`,
    /// `cross_shard_transactions`).
    pub fn rules(&self) -> crate::route::Rules {
        crate::route::Rules {
            strict_tenant: self.switches.is(Switches::STRICT_TENANT),
            allow_cross_shard_writes: self.switches.is(Switches::ALLOW_CROSS_SHARD_WRITES),
            atomic_writes: self.two_phase(),
            session_state: false,
            search_path_set: false,
        }
    }

    /// Whether transactions that write on several shards commit with
    /// two-phase commit (`cross_shard_transactions = "two_phase"`).
    pub fn two_phase(&self) -> bool {
        self.switches.is(Switches::TWO_PHASE)
    }

    /// `prepare_simple_queries`.
    pub fn prepare_simple_queries(&self) -> bool {
        self.switches.is(Switches::PREPARE_SIMPLE_QUERIES)
    }

    /// Whether either idle timeout is on: sessions then watch for quiet clients.
    pub fn idle_timeouts(&self) -> bool {
        self.switches.is(Switches::IDLE_TIMEOUTS)
    }

    /// Puts `config`'s switches in force (a reload, after storing `config`).
    pub(crate) fn store_switches(&self, config: &RouterConfig) {
        self.switches.store(config);
    }

    /// How to log in to a shard: the configuration's address (with its password)
    /// for shards known at start, else the directory's URL and `shard_password`.
    pub fn shard_address(&self, dir: &Directory, shard: ShardId) -> Option<ShardAddress> {
        let s = dir.shards.get(shard)?;
        Some(match self.credentials.get(&s.name) {
            Some(a) => a.clone(),
            None => {
                let mut a = ShardAddress::from_url(&s.url).ok()?;
                a.password = self.config.load().shard_password.as_ref().map(|p| p.expose().to_string());
                a
            }
        })
    }

    /// Why writes are refused right now: this router's replica has not heard from
    /// the directory's quorum within its lease, so a bucket may have moved.
    pub fn lease_expired(&self) -> Option<String> {
        let (node, lease) = self.replica.as_ref()?;
        if node.lease_valid(*lease) {
            return None;
        }
        Some(format!(
            "directory unreachable: this router has not heard from the directory quorum for more than {lease:?} (last applied epoch {})",
            self.directory.load().epoch
        ))
    }

    /// A shard for statements that may run anywhere (reference-table reads,
    /// `SELECT 1`, a driver's Parse and Describe): round-robin over the live
    /// shards, those that did not answer their last health probe passed over
    /// while another can serve.
    pub fn any_shard(&self, dir: &Directory) -> ShardId {
        // No allocation: this runs for every statement on a reference table.
        // Only shards holding the reference tables' rows serve their reads.
        let down = self.down_shards.load(Ordering::Relaxed);
        let up = |i: ShardId| i >= 64 || down & (1 << i) == 0;
        let serving = down == 0 || dir.live_shards().any(|(i, s)| s.reference && up(i));
        let refs = || dir.live_shards().filter(move |(i, s)| s.reference && (!serving || up(*i)));
        let n_refs = refs().count();
        if n_refs == 1 {
            // The usual case of one shard holding them: no counter to turn.
            return refs().next().map(|(i, _)| i).unwrap_or(0);
        }
        if n_refs == 0 {
            let live = dir.live_shards().count();
            let n = self.next_any.fetch_add(1, Ordering::Relaxed) % live.max(1);
            return dir.live_shards().nth(n).map(|(i, _)| i).unwrap_or(0);
        }
        let n = self.next_any.fetch_add(1, Ordering::Relaxed) % n_refs;
        refs().nth(n).map(|(i, _)| i).unwrap_or(0)
    }

    /// The slot where the session with this cancel key keeps the server
    /// connection running its statement, registered on first use. The session
    /// sets it without touching the shared map: that map's lock is taken only at
    /// login, logout and for a CancelRequest.
    pub fn cancel_slot(&self, key: (i32, i32)) -> CancelSlot {
        self.cancels.lock().unwrap_or_else(|p| p.into_inner()).entry(key).or_default().clone()
    }

    pub fn remove_cancel(&self, key: (i32, i32)) {
        self.cancels.lock().unwrap_or_else(|p| p.into_inner()).remove(&key);
    }

    pub fn cancel_target(&self, key: (i32, i32)) -> Option<CancelTarget> {
        let slot = self.cancels.lock().unwrap_or_else(|p| p.into_inner()).get(&key).cloned()?;
        let target = slot.lock().unwrap_or_else(|p| p.into_inner()).clone();
        target
    }

    /// Makes sure the catalog has looked for `tables`: a table created through
    /// another router (or straight on the shards) must be known as sharded before
    /// a statement on it is routed, or a write would go everywhere like a
    /// reference-table write. Names that did not exist a moment ago are not looked
    /// for again within a second.
    pub async fn learn_tables(&self, tables: &[String]) {
        if !self.catalog.has_unknown(tables) {
            return;
        }
        let _one_refresh = self.refreshing.lock().await;
        if !self.catalog.has_unknown(tables) || !self.catalog.needs_refresh(tables) {
            return;
        }
        if let Err(e) = self.refresh_catalog().await {
            tracing::warn!(error = %e, "could not refresh the table catalog");
        }
    }

    /// Reloads the list of sharded tables from the first shard that holds the
    /// reference tables (a shard added later may not have every table yet).
    pub async fn refresh_catalog(&self) -> Result<(), String> {
        let dir = self.directory.load();
        let Some(&first) = dir.reference_shards().first() else {
            return Err("no shards".into());
        };
        let pool = self.pool(first).ok_or("no pool for the first shard")?;
        // Not from the pool: the session that asks may hold its last connection.
        let mut conn = pool.connect_outside().await.map_err(|e| e.to_string())?;
        let sql = format!(
            "SELECT table_schema, table_name, string_agg(column_name::text, ',' ORDER BY ordinal_position), \
             bool_or(column_name::text = {}), \
             string_agg(column_name::text, ',' ORDER BY ordinal_position) FILTER (WHERE is_generated = 'NEVER'), \
             string_agg(column_name::text, ',' ORDER BY ordinal_position) FILTER (WHERE is_identity = 'YES' OR column_default ~* \
                 '(nextval|now|random|uuid|clock_timestamp|statement_timestamp|transaction_timestamp|timeofday|current_timestamp|current_time|current_date|localtime)') \
             FROM information_schema.columns \
             WHERE table_schema NOT IN ('pg_catalog', 'information_schema') \
             AND table_schema NOT LIKE 'pg\\_temp\\_%' \
             GROUP BY 1, 2",
            crate::sql::quote::literal(&dir.key_column)
        );
        let rows = conn.simple_query(&sql).await.map_err(|(c, m)| format!("{c}: {m}"))?;
        let mut entries = Vec::with_capacity(rows.len());
        let mut copied = HashMap::new();
        for row in rows {
            if let [Some(schema), Some(name), Some(cols), Some(sharded), copy, volatile] = &row[..] {
                let qualified = if schema == "public" { name.clone() } else { format!("{schema}.{name}") };
                let list = |c: &str| c.split(',').map(str::to_string).collect::<Vec<_>>();
                let places = list(cols);
                let volatile_defaults = volatile
                    .as_deref()
                    .map(list)
                    .unwrap_or_default()
                    .into_iter()
                    .filter_map(|c| Some((places.iter().position(|p| *p == c)?, c)))
                    .collect();
                let mut entry =
                    TableEntry { schema: schema.clone(), name: name.clone(), sharded: None, volatile_defaults };
                if sharded == "t" {
                    let copy = copy.as_deref().map(list).unwrap_or_default();
                    let all = list(cols);
                    if copy != all {
                        copied.insert(qualified, copy);
                    }
                    entry.sharded = Some(all);
                }
                entries.push(entry);
            }
        }
        // Schemas named like a role: first in the default search_path.
        let sql = "SELECT nspname FROM pg_namespace WHERE nspname IN (SELECT rolname FROM pg_roles)";
        let rows = conn.simple_query(sql).await.map_err(|(c, m)| format!("{c}: {m}"))?;
        let role_schemas: Vec<String> = rows.into_iter().filter_map(|r| r.into_iter().next().flatten()).collect();
        let sql = opaque_relations_sql(&dir.key_column);
        let rows = conn.simple_query(&sql).await.map_err(|(c, m)| format!("{c}: {m}"))?;
        let opaque = rows
            .into_iter()
            .filter_map(|r| match &r[..] {
                [Some(schema), Some(name)] => Some((schema.clone(), name.clone())),
                _ => None,
            })
            .collect();
        self.catalog.set_copy_columns(copied);
        self.catalog.replace_all(entries, &role_schemas, opaque);
        // Aggregates of the application's own: a cross-shard read must not
        // take a call to one for a plain value (each shard would return its
        // own partial result as a row).
        let sql = "SELECT DISTINCT lower(proname) FROM pg_proc \
                   WHERE prokind = 'a' AND pronamespace <> 'pg_catalog'::regnamespace";
        let rows = conn.simple_query(sql).await.map_err(|(c, m)| format!("{c}: {m}"))?;
        crate::sql::aggregates::set_defined(rows.into_iter().filter_map(|r| r.into_iter().next().flatten()).collect());
        // Text sorts by bytes on the shards only when the database's default
        // collation is C from libc (an ICU default shows lc_collate C too) and
        // no column has a collation of its own (default 100, C 950, POSIX 951).
        let sql = "SELECT (SELECT datcollate IN ('C', 'POSIX') \
                           AND (to_jsonb(d) ->> 'datlocprovider') IS DISTINCT FROM 'i' \
                           FROM pg_database d WHERE datname = current_database()) \
                   AND NOT EXISTS (SELECT 1 FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid \
                           JOIN pg_namespace n ON n.oid = c.relnamespace \
                           WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') \
                           AND n.nspname NOT LIKE 'pg\\_toast%' AND a.attnum > 0 AND NOT a.attisdropped \
                           AND a.attcollation NOT IN (0, 100, 950, 951))";
        let rows = conn.simple_query(sql).await.map_err(|(c, m)| format!("{c}: {m}"))?;
        let c = rows.first().and_then(|r| r.first().cloned().flatten()).is_some_and(|v| v == "t");
        self.c_collation.store(c, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(schema: &str, name: &str, sharded: Option<&[&str]>) -> TableEntry {
        let sharded = sharded.map(|c| c.iter().map(|c| c.to_string()).collect());
        TableEntry { schema: schema.into(), name: name.into(), sharded, volatile_defaults: Vec::new() }
    }

    #[test]
    fn a_bare_name_means_the_only_table_of_that_name_or_is_ambiguous_where_they_differ() {
        let key: &[&str] = &["tenant_id", "id"];
        let catalog = Catalog::default();
        catalog.replace_all(
            vec![
                table("app", "orders", Some(key)),
                table("app", "plans", None),
                table("public", "plans", None),
                table("public", "notes", None),
                table("audit", "notes", Some(key)),
                table("a", "logs", Some(key)),
                table("b", "logs", Some(&["tenant_id", "at"])),
                table("alice", "items", None),
                table("public", "items", Some(key)),
            ],
            &["alice".to_string()],
            vec![("public".to_string(), "totals".to_string()), ("app".to_string(), "orders_v".to_string())],
        );
        assert!(catalog.opaque("totals") && catalog.opaque("public.totals") && catalog.opaque("app.orders_v"));
        assert!(catalog.opaque("orders_v"), "the only relation of that name");
        assert!(!catalog.opaque("orders") && !catalog.opaque("plans"));
        // Only in app: the bare name is app's table.
        assert!(catalog.is_sharded("orders") && catalog.is_sharded("app.orders"));
        assert_eq!(catalog.tables(), ["a.logs", "app.orders", "audit.notes", "b.logs", "items"]);
        // Alike in two schemas: public's, which routes as app's would.
        assert!(catalog.is_reference("plans") && catalog.ambiguous("plans").is_none());
        let amb = |t: &str| catalog.ambiguous(t).map(|a| (a.schemas, a.default_public));
        assert_eq!(amb("notes"), Some((vec!["public".to_string(), "audit".to_string()], true)));
        assert!(catalog.is_reference("notes"), "public's under the default search_path");
        assert_eq!(amb("logs"), Some((vec!["a".to_string(), "b".to_string()], false)));
        assert!(!catalog.is_sharded("logs") && catalog.has_unknown(&["logs".to_string()]));
        // A schema named like a role comes first in the default search_path.
        assert_eq!(amb("items"), Some((vec!["public".to_string(), "alice".to_string()], false)));
        assert_eq!(catalog.ambiguous("audit.notes"), None);
    }
}
