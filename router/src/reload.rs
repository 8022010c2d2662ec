//! Configuration reload: a new [`RouterConfig`] is checked whole, then put in
//! force at once; or it is refused with the reason, and nothing changes.
//!
//! `shardgate serve` reloads on SIGHUP and on `POST /reload` (`shardgate
//! reload`), reading its file again through the [`ConfigSource`] it installs.
//! docs/configuration.md (Reload) lists what reloads; [`sort_keys`] is the
//! same list in code: every key of `[router]` is named there, either as one a
//! reload puts in force or as one that keeps its running value until a
//! restart (the listen address, the threads, the statement cache …), which
//! the reload names in its answer and its log line.
//!
//! Everything that can fail (the users' passwords, the certificate files) is
//! done before anything is put in force, and putting in force cannot fail:
//! there is no half-applied configuration. Open client connections and pooled
//! server connections are kept; the pools take their new size and timeouts in
//! place ([`crate::pool::ShardPool::configure`]). What a statement reads is
//! swapped whole (see [`crate::context`]), so the statement path takes no lock.

use std::collections::HashMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::config::{AuthConfig, PoolConfig, RouterConfig, UserConfig};
use crate::context::RouterContext;

/// What a reload did: the keys whose new values are in force, and those that
/// changed in the file but keep their running values until a restart. Keys
/// are named as in the file, e.g. `router.pool.size`, `users`, `shards`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reloaded {
    pub changed: Vec<String>,
    pub needs_restart: Vec<String>,
}

/// Why a reload put nothing in force.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The new configuration cannot be used: the file cannot be read or
    /// parsed, a key is unknown, a value is wrong, a certificate unreadable.
    #[error("the configuration was refused, and the one in force is unchanged: {0}")]
    Refused(String),
    #[error("this router was not started from a configuration file, so there is none to read again; restart it to change its settings")]
    NoSource,
}

/// Where a reload reads the new configuration from: `shardgate serve`'s file.
pub trait ConfigSource: Send + Sync {
    /// The router's settings as the source now has them, and the keys outside
    /// them that changed since start (those all need a restart); or why the
    /// source cannot be used.
    fn read(&self) -> Result<(RouterConfig, Vec<String>), String>;
}

impl RouterContext {
    /// Reads the configuration from its source again and puts it in force
    /// (SIGHUP, `POST /reload`). Logged and counted either way.
    pub fn reload_from_source(&self) -> Result<Reloaded, ReloadError> {
        let source = self.config_source.get().ok_or(ReloadError::NoSource)?;
        let _one = self.reloading.lock().unwrap_or_else(|p| p.into_inner());
        let outcome = source.read().map_err(ReloadError::Refused).and_then(|(config, outside)| {
            let mut reloaded = self.put_in_force(config)?;
            reloaded.needs_restart.extend(outside);
            Ok(reloaded)
        });
        report(&outcome);
        outcome
    }

    /// Puts `new` in force, or refuses it whole. Logged and counted either way.
    pub fn reload(&self, new: RouterConfig) -> Result<Reloaded, ReloadError> {
        let _one = self.reloading.lock().unwrap_or_else(|p| p.into_inner());
        let outcome = self.put_in_force(new);
        report(&outcome);
        outcome
    }

    fn put_in_force(&self, new: RouterConfig) -> Result<Reloaded, ReloadError> {
        let old = self.config.load_full();
        let (config, mut reloaded) = sort_keys(&old, new);
        // First what can fail; nothing is in force yet.
        let refused = |e: String| ReloadError::Refused(e);
        let mut users = HashMap::new();
        for u in &config.users {
            users.insert(u.name.clone(), u.credential().map_err(refused)?);
        }
        let client_tls = config.client_tls().map_err(|e| refused(e.to_string()))?;
        let admin_tls = match self.admin_tls.load().is_some() {
            false => None,
            true => {
                let (Some(cert), Some(key)) = (&config.tls_cert_file, &config.tls_key_file) else {
                    return Err(refused(
                        "[admin] tls = true serves the admin API with the router's certificate: \
                         [router] tls_cert_file and tls_key_file must stay set"
                            .into(),
                    ));
                };
                let acceptor = crate::tls::https_acceptor(cert, key).map_err(|e| refused(e.to_string()))?;
                Some(Arc::new(acceptor))
            }
        };
        // A certificate renewed in place: the same file names, another certificate.
        let cert_key = "router.tls_cert_file".to_string();
        if client_tls.certificate_differs(&self.client_tls.load()) && !reloaded.changed.contains(&cert_key) {
            reloaded.changed.push(cert_key);
        }

        // Then in force, all of it; nothing below can fail.
        self.client_tls.store(Arc::new(client_tls));
        if admin_tls.is_some() {
            self.admin_tls.store(admin_tls);
        }
        self.users.store(Arc::new(users));
        self.roles.configure(config.auth.clone());
        let config = Arc::new(config);
        // Stored before the pools are configured: a pool created meanwhile
        // reads the new settings (see RouterContext::pool).
        self.config.store(config.clone());
        self.store_switches(&config);
        for pool in self.all_pools() {
            pool.configure(&config.pool);
        }
        Ok(reloaded)
    }
}

/// The log line and the counter of a reload's outcome.
fn report(outcome: &Result<Reloaded, ReloadError>) {
    match outcome {
        Ok(r) => {
            crate::metrics::global().reloaded(true);
            info!(changed = ?r.changed, needs_restart = ?r.needs_restart, "configuration reloaded");
            if !r.needs_restart.is_empty() {
                warn!(keys = ?r.needs_restart, "these keys changed in the configuration but need a restart; their running values stay");
            }
        }
        Err(e @ ReloadError::Refused(_)) => {
            crate::metrics::global().reloaded(false);
            warn!(error = %e, "configuration reload refused");
        }
        Err(ReloadError::NoSource) => {}
    }
}

/// The session threads `threads` asks for (0: one per CPU core).
pub fn session_threads(threads: usize) -> usize {
    match threads {
        0 => std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        n => n,
    }
}

/// Names the keys that differ between `old` (in force) and `new`, each either
/// as one a reload puts in force or as one that needs a restart; and the
/// configuration to put in force: `new`, with `old`'s value for each key that
/// needs a restart. Every key of `[router]` is named here: a key added to
/// [`RouterConfig`] does not compile until it is sorted.
fn sort_keys(old: &RouterConfig, mut new: RouterConfig) -> (RouterConfig, Reloaded) {
    let mut keys = Keys::default();
    let RouterConfig {
        listen,
        strict_tenant,
        allow_cross_shard_writes,
        cross_shard_transactions,
        max_message_bytes,
        max_client_connections,
        pool,
        statement_cache_size,
        prepare_simple_queries,
        shard_password,
        users,
        moves,
        threads,
        lease_wait,
        client_login_timeout,
        max_pending_logins,
        client_idle_timeout,
        idle_transaction_timeout,
        tcp_keepalive,
        tls_cert_file,
        tls_key_file,
        ssl_mode,
        auth,
        admins,
        database_aliases,
        pool_mode,
        role_pool_modes,
    } = &mut new;
    keys.reloads("router.strict_tenant", old.strict_tenant != *strict_tenant);
    keys.reloads("router.allow_cross_shard_writes", old.allow_cross_shard_writes != *allow_cross_shard_writes);
    keys.reloads("router.cross_shard_transactions", old.cross_shard_transactions != *cross_shard_transactions);
    keys.reloads("router.max_client_connections", old.max_client_connections != *max_client_connections);
    keys.reloads("router.max_pending_logins", old.max_pending_logins != *max_pending_logins);
    keys.reloads("router.client_login_timeout", old.client_login_timeout != *client_login_timeout);
    keys.reloads("router.client_idle_timeout", old.client_idle_timeout != *client_idle_timeout);
    keys.reloads("router.idle_transaction_timeout", old.idle_transaction_timeout != *idle_transaction_timeout);
    keys.reloads("router.lease_wait", old.lease_wait != *lease_wait);
    keys.reloads("router.admins", old.admins != *admins);
    // Read when a client logs in: clients from then on.
    keys.reloads("router.pool_mode", old.pool_mode != *pool_mode);
    keys.reloads("router.role_pool_modes", old.role_pool_modes != *role_pool_modes);
    keys.reloads("router.tls_cert_file", old.tls_cert_file != *tls_cert_file);
    keys.reloads("router.tls_key_file", old.tls_key_file != *tls_key_file);
    keys.reloads("router.ssl_mode", old.ssl_mode != *ssl_mode);
    keys.reloads("users", by_name(&old.users) != by_name(users));
    let PoolConfig { size, queue_timeout, connect_timeout, server_idle_timeout, server_lifetime } = pool;
    keys.reloads("router.pool.size", old.pool.size != *size);
    keys.reloads("router.pool.queue_timeout", old.pool.queue_timeout != *queue_timeout);
    keys.reloads("router.pool.connect_timeout", old.pool.connect_timeout != *connect_timeout);
    keys.reloads("router.pool.server_idle_timeout", old.pool.server_idle_timeout != *server_idle_timeout);
    keys.reloads("router.pool.server_lifetime", old.pool.server_lifetime != *server_lifetime);
    match (&old.auth, auth.as_ref()) {
        (Some(was), Some(now)) => {
            let AuthConfig { user, password, query, cache } = now;
            keys.reloads("router.auth.user", was.user != *user);
            keys.reloads("router.auth.password", was.password != *password);
            keys.reloads("router.auth.query", was.query != *query);
            keys.reloads("router.auth.cache", was.cache != *cache);
        }
        // On or off decides which pools sessions use: a restart.
        _ => keys.fixed("router.auth", &old.auth, auth),
    }
    keys.fixed("router.listen", &old.listen, listen);
    keys.fixed("router.max_message_bytes", &old.max_message_bytes, max_message_bytes);
    keys.fixed("router.statement_cache_size", &old.statement_cache_size, statement_cache_size);
    keys.fixed("router.prepare_simple_queries", &old.prepare_simple_queries, prepare_simple_queries);
    keys.fixed("router.shard_password", &old.shard_password, shard_password);
    keys.fixed("router.moves", &old.moves, moves);
    // `old` has the number of threads started, which 0 asked for.
    *threads = session_threads(*threads);
    keys.fixed("router.threads", &old.threads, threads);
    keys.fixed("router.tcp_keepalive", &old.tcp_keepalive, tcp_keepalive);
    keys.fixed("router.database_aliases", &old.database_aliases, database_aliases);
    (new, keys.0)
}

/// The `[[users]]` entries by name: their order in the file does not matter.
fn by_name(users: &[UserConfig]) -> HashMap<&str, &UserConfig> {
    users.iter().map(|u| (u.name.as_str(), u)).collect()
}

#[derive(Default)]
struct Keys(Reloaded);

impl Keys {
    fn reloads(&mut self, name: &str, differs: bool) {
        if differs {
            self.0.changed.push(name.to_string());
        }
    }

    /// A key that needs a restart: named when it differs, and kept as it runs.
    fn fixed<T: PartialEq + Clone>(&mut self, name: &str, running: &T, new: &mut T) {
        if running != new {
            self.0.needs_restart.push(name.to_string());
            *new = running.clone();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn parse(text: &str) -> RouterConfig {
        toml::from_str(text).expect("a router configuration")
    }

    /// As a router runs `text`: with the number of threads it started.
    fn running(text: &str) -> RouterConfig {
        let mut c = parse(text);
        c.threads = session_threads(c.threads);
        c
    }

    #[test]
    fn keys_that_need_a_restart_keep_their_running_values_and_are_named() {
        let old = running("listen = \"127.0.0.1:7000\"\nthreads = 2\n[pool]\nsize = 4");
        let new = parse(
            "listen = \"127.0.0.1:7001\"\nthreads = 2\nstrict_tenant = true\nstatement_cache_size = 5\n\
             [pool]\nsize = 8\nqueue_timeout = \"1s\"",
        );
        let (in_force, r) = sort_keys(&old, new);
        assert_eq!(r.changed, ["router.strict_tenant", "router.pool.size", "router.pool.queue_timeout"]);
        assert_eq!(r.needs_restart, ["router.listen", "router.statement_cache_size"]);
        assert_eq!(in_force.listen, "127.0.0.1:7000");
        assert_eq!(in_force.statement_cache_size, old.statement_cache_size);
        assert!(in_force.strict_tenant);
        assert_eq!((in_force.pool.size, in_force.pool.queue_timeout), (8, Duration::from_secs(1)));
    }

    #[test]
    fn the_same_file_changes_nothing() {
        let old = running("client_idle_timeout = \"30s\"\n[auth]\ncache = \"5s\"");
        let (_, r) = sort_keys(&old, parse("client_idle_timeout = \"30s\"\n[auth]\ncache = \"5s\""));
        assert_eq!(r, Reloaded::default());
    }

    #[test]
    fn auth_reloads_its_settings_but_not_whether_it_is_on() {
        let old = running("[auth]\ncache = \"5s\"");
        let (in_force, r) = sort_keys(&old, parse("[auth]\ncache = \"1s\""));
        assert_eq!(r.changed, ["router.auth.cache"]);
        assert_eq!(in_force.auth.map(|a| a.cache), Some(Duration::from_secs(1)));
        let (in_force, r) = sort_keys(&old, parse(""));
        assert_eq!(r.needs_restart, ["router.auth"]);
        assert!(in_force.auth.is_some(), "still on until a restart");
    }
}
