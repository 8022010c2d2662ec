//! Clients as their own Postgres roles (`[router.auth]`, docs/security.md).
//!
//! Without `[router.auth]` every client runs on the shards as the shard URL's
//! user, whatever name it logged in with. With it, the router does what
//! pgbouncer's `auth_query` does, and then logs in to each shard as the client:
//!
//! 1. a client that is not a static `[[users]]` entry is looked up with the
//!    configured query, on the first shard, over one connection of the lookup's
//!    own role; the stored password (a SCRAM verifier or an md5 hash) is cached
//!    for `cache` and dropped at once when a login against it fails;
//! 2. the client proves its password against that verifier
//!    ([`crate::auth::authenticate_client_proving`]), which leaves the router
//!    what it needs to log in as the same role (the SCRAM ClientKey, or the
//!    md5 hash), never the password itself;
//! 3. the session's statements run on pools of that role ([`RolePools`]), one
//!    per shard, each as large as `[router.pool] size`, whose new connections
//!    log in with what the role's latest login proved.
//!
//! The shard URL's user keeps the router's own work: the catalog, health
//! probes, two-phase commit decisions and recovery, moves.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use shardgate_directory::{Directory, ShardId};

use crate::auth::{Credential, PassThrough, ScramSecret};
use crate::backend::{Backend, ShardAddress};
use crate::config::AuthConfig;
use crate::pool::ShardPool;

/// How long a login lookup may take, and its connection.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

/// The query that looks a login up through [`lookup_setup_sql`]'s function.
pub const LOOKUP_QUERY: &str = "SELECT rolname, rolpassword FROM shardgate.user_lookup($1)";

/// `CREATE SCHEMA IF NOT EXISTS shardgate` that another session creating it at
/// the same moment cannot fail (two concurrent `IF NOT EXISTS` may both try,
/// and one then fails with 23505): the router's two-phase commit setup, the
/// migrator's and the login lookup's may run at once.
pub const CREATE_SCHEMA: &str =
    "DO $s$ BEGIN CREATE SCHEMA IF NOT EXISTS shardgate; EXCEPTION WHEN unique_violation THEN NULL; END $s$;";

/// What lets `role`, without superuser, look logins up on a shard: a
/// `SECURITY DEFINER` function over `pg_authid` that only `role` may call
/// (pgbouncer's docs recommend the same for its `auth_user`). Run by a
/// superuser in the cluster's database on every shard; it may run again.
/// `password` is `role`'s new password.
pub fn lookup_setup_sql(role: &str, password: &str) -> String {
    use crate::sql::quote::{ident, literal};
    let (r, lit) = (ident(role), literal(role));
    format!(
        "DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = {lit}) THEN CREATE ROLE {r} LOGIN; END IF; END $$; \
         ALTER ROLE {r} LOGIN PASSWORD {pw}; \
         {schema} \
         CREATE OR REPLACE FUNCTION shardgate.user_lookup(name text, OUT rolname text, OUT rolpassword text) \
           RETURNS record LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog AS \
           $f$ SELECT rolname::text, CASE WHEN rolvaliduntil < now() THEN NULL ELSE rolpassword END \
               FROM pg_authid WHERE rolname = name AND rolcanlogin $f$; \
         REVOKE ALL ON FUNCTION shardgate.user_lookup(text) FROM PUBLIC; \
         GRANT USAGE ON SCHEMA shardgate TO {r}; \
         GRANT EXECUTE ON FUNCTION shardgate.user_lookup(text) TO {r}",
        pw = literal(password),
        schema = CREATE_SCHEMA,
    )
}

/// Where a client's password is found and which pools its statements use.
pub struct Roles {
    /// Whether clients run as their own roles: fixed at start, since it
    /// decides which pools sessions use.
    enabled: bool,
    /// `[router.auth]` in force; a reload replaces it ([`Self::configure`]).
    config: ArcSwapOption<AuthConfig>,
    /// Stored passwords by role, with when they were looked up (None: no such
    /// login role, or no password). Shared with each role's [`RoleLogin`].
    cache: Arc<Cache>,
    /// The lookup's connection, opened on first use and again after an error
    /// or when `[router.auth]` names another login; with the settings it
    /// logged in with.
    lookup: tokio::sync::Mutex<Option<(Backend, Arc<AuthConfig>)>>,
    pools: RwLock<HashMap<String, Arc<RolePools>>>,
}

/// Looked-up passwords by role, with when they were looked up.
type Cache = Mutex<HashMap<String, (Instant, Option<Credential>)>>;

/// Why a role's password could not be looked up (not: the role has none).
#[derive(Debug, thiserror::Error)]
#[error("cannot look up the login on shard {shard}: {reason}")]
pub struct LookupError {
    pub shard: String,
    pub reason: String,
}

impl Roles {
    pub fn new(config: Option<AuthConfig>) -> Roles {
        Roles {
            enabled: config.is_some(),
            config: ArcSwapOption::from(config.map(Arc::new)),
            cache: Arc::new(Mutex::new(HashMap::new())),
            lookup: tokio::sync::Mutex::new(None),
            pools: RwLock::new(HashMap::new()),
        }
    }

    /// Whether clients run on the shards as their own roles.
    pub fn pass_through(&self) -> bool {
        self.enabled
    }

    /// Puts a reloaded `[router.auth]` in force: the next lookup uses its
    /// query (over a new connection when it names another login), and the
    /// passwords looked up with the old settings are forgotten.
    pub fn configure(&self, config: Option<AuthConfig>) {
        if !self.enabled {
            return;
        }
        let changed = self.config.load().as_deref() != config.as_ref();
        self.config.store(config.map(Arc::new));
        if changed {
            self.forget_all();
        }
    }

    /// Forgets every looked-up password: a role was created, changed or
    /// dropped through this router.
    pub fn forget_all(&self) {
        self.cache.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    /// Forgets `role`'s looked-up password: a login against it failed, and
    /// the password may have changed since.
    pub fn forget(&self, role: &str) {
        self.cache.lock().unwrap_or_else(|p| p.into_inner()).remove(role);
    }

    /// How `role` proves who it is: its stored password, from the cache or
    /// looked up on `shard` (reached at `address`, the router's own login).
    /// None: no such login role, an expired one, or one without a password.
    pub async fn credential(
        &self,
        role: &str,
        shard_name: &str,
        address: ShardAddress,
    ) -> Result<Option<Credential>, LookupError> {
        let Some(config) = self.config.load_full() else { return Ok(None) };
        if let Some((at, cred)) = self.cache.lock().unwrap_or_else(|p| p.into_inner()).get(role) {
            if at.elapsed() < config.cache {
                return Ok(cred.clone());
            }
        }
        let fail = |reason: String| LookupError { shard: shard_name.to_string(), reason };
        let mut lookup = self.lookup.lock().await;
        let same_login = |was: &AuthConfig| was.user == config.user && was.password == config.password;
        if lookup.as_ref().is_none_or(|(b, was)| b.broken || !same_login(was)) {
            let mut address = address;
            if let Some(user) = &config.user {
                address.user = user.clone();
                address.password = config.password.as_ref().map(|p| p.expose().to_string());
            }
            *lookup = None;
            let b = Backend::connect(&address, LOOKUP_TIMEOUT).await.map_err(|e| fail(e.to_string()))?;
            *lookup = Some((b, config.clone()));
        }
        let Some((conn, _)) = lookup.as_mut() else { unreachable!("set just above") };
        // One lookup at a time on this connection: a shard that stops
        // answering must not hold every login behind it for long.
        let rows = match crate::timer::timeout(LOOKUP_TIMEOUT, conn.query_params(&config.query, &[role])).await {
            Ok(rows) => {
                rows.map_err(|(code, message)| fail(format!("[router.auth] query failed with {code}: {message}")))?
            }
            Err(_) => {
                *lookup = None;
                return Err(fail(format!("[router.auth] query did not answer within {LOOKUP_TIMEOUT:?}")));
            }
        };
        drop(lookup);
        let stored = rows.into_iter().next().and_then(|row| row.into_iter().nth(1).flatten());
        let cred = match stored {
            None => None,
            Some(p) if p.starts_with("SCRAM-SHA-256$") => match ScramSecret::parse(&p) {
                Ok(secret) => Some(Credential::Scram(secret)),
                Err(e) => {
                    tracing::warn!(role, error = %e, "the stored SCRAM verifier cannot be read; login refused");
                    None
                }
            },
            Some(p) if p.len() == 35 && p.starts_with("md5") => Some(Credential::Md5 { password: p }),
            Some(_) => {
                tracing::warn!(role, "the stored password is neither a SCRAM verifier nor an md5 hash; login refused");
                None
            }
        };
        self.cache.lock().unwrap_or_else(|p| p.into_inner()).insert(role.to_string(), (Instant::now(), cred.clone()));
        Ok(cred)
    }

    /// The pools of `role`, whose new connections log in with `pass` from now
    /// on (when the login proved anything: a trust login leaves the last one).
    pub fn pools_for(&self, role: &str, pass: Option<PassThrough>) -> Arc<RolePools> {
        let known = self.pools.read().unwrap_or_else(|p| p.into_inner()).get(role).cloned();
        let pools = match known {
            Some(p) => p,
            None => self
                .pools
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .entry(role.to_string())
                .or_insert_with(|| {
                    Arc::new(RolePools {
                        login: Arc::new(RoleLogin {
                            role: role.to_string(),
                            pass: ArcSwapOption::empty(),
                            cache: self.cache.clone(),
                        }),
                        pools: RwLock::new(Vec::new()),
                    })
                })
                .clone(),
        };
        if let Some(pass) = pass {
            if pools.login.pass.load().as_deref() != Some(&pass) {
                pools.login.pass.store(Some(Arc::new(pass)));
            }
        }
        pools
    }

    /// Every role's pools created so far.
    pub fn all_pools(&self) -> Vec<Arc<ShardPool>> {
        let roles = self.pools.read().unwrap_or_else(|p| p.into_inner());
        roles
            .values()
            .flat_map(|r| {
                r.pools.read().unwrap_or_else(|p| p.into_inner()).iter().flatten().cloned().collect::<Vec<_>>()
            })
            .collect()
    }
}

/// One role's way in to the shards: its name and what its latest login proved.
pub struct RoleLogin {
    pub role: String,
    pass: ArcSwapOption<PassThrough>,
    cache: Arc<Cache>,
}

impl RoleLogin {
    /// A shard turned this role's login down: the password the client was
    /// checked against may be stale (changed on the shards since it was
    /// looked up), so the next login looks it up again.
    pub fn refused(&self) {
        self.cache.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.role);
    }

    /// The shard's address (host, database, TLS) with this role's login.
    pub fn address(&self, shard: &ShardAddress) -> ShardAddress {
        let mut a = shard.clone();
        if a.user != self.role {
            a.user = self.role.clone();
            a.password = None;
        }
        a.pass_through = self.pass.load_full();
        a
    }
}

/// The pools of one role, by shard.
pub struct RolePools {
    pub login: Arc<RoleLogin>,
    pools: RwLock<Vec<Option<Arc<ShardPool>>>>,
}

impl RolePools {
    pub fn role(&self) -> &str {
        &self.login.role
    }

    /// The pool of `shard` for this role, created on first use.
    pub fn pool(&self, ctx: &crate::context::RouterContext, dir: &Directory, shard: ShardId) -> Option<Arc<ShardPool>> {
        if let Some(Some(p)) = self.pools.read().unwrap_or_else(|p| p.into_inner()).get(shard) {
            return Some(p.clone());
        }
        let s = dir.shards.get(shard)?;
        let address = ctx.shard_address(dir, shard)?;
        let mut pools = self.pools.write().unwrap_or_else(|p| p.into_inner());
        if pools.len() <= shard {
            pools.resize(shard + 1, None);
        }
        // Read under the lock, as RouterContext::pool does: a reload configures
        // the pools there are after storing the configuration.
        let config = ctx.config.load();
        let pool = pools[shard].get_or_insert_with(|| {
            ShardPool::new_as(
                s.name.clone(),
                address,
                Some(self.login.clone()),
                &config.pool,
                &config.tcp_keepalive,
                config.threads,
            )
        });
        Some(pool.clone())
    }
}
