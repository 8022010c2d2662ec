//! The router's settings. The CLI reads them from a TOML file
//! (`docs/configuration.md` documents every key); `shardgate up` builds them in code.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::auth::Credential;
use crate::tls::{ClientSslMode, ClientTls, TlsError};

/// How a transaction that writes on several shards commits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CrossShard {
    #[default]
    TwoPhase,
    Refuse,
}

/// Settings of one router process.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouterConfig {
    /// Address clients connect to. Default `127.0.0.1:6432`.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Refuse any statement on a sharded table that names no tenant.
    #[serde(default)]
    pub strict_tenant: bool,
    /// Allow UPDATE/DELETE without a tenant key: they run on every shard,
    /// committed together (two-phase commit), or one transaction per shard
    /// with `cross_shard_transactions = "refuse"`.
    #[serde(default)]
    pub allow_cross_shard_writes: bool,
    /// A transaction block that writes on several shards: `"two_phase"`
    /// (default) commits it on all of them or none with two-phase commit
    /// (docs/transactions.md); `"refuse"` refuses the statement that reaches
    /// a second shard with 0A000.
    #[serde(default)]
    pub cross_shard_transactions: CrossShard,
    /// Largest protocol message accepted from a client, in bytes. Default 64 MiB.
    #[serde(default = "default_max_message")]
    pub max_message_bytes: usize,
    /// Most client connections at once; more are refused with SQLSTATE 53300.
    #[serde(default = "default_max_clients")]
    pub max_client_connections: usize,
    #[serde(default)]
    pub pool: PoolConfig,
    /// Statement shapes (texts without their constants and comments) whose
    /// analysis is cached.
    #[serde(default = "default_cache")]
    pub statement_cache_size: usize,
    /// Run simple queries outside a transaction block as prepared statements on
    /// the server, their constants as parameters (docs/routing.md). Default true.
    #[serde(default = "default_true")]
    pub prepare_simple_queries: bool,
    /// Password for shards added at run time (`shardgate shard add`), whose URLs
    /// are stored without one. Never logged.
    #[serde(default)]
    pub shard_password: Option<Secret>,
    /// Users that may connect, and how they authenticate. Empty: anyone, trust.
    /// (Written as top-level `[[users]]` tables in the file.)
    #[serde(skip)]
    pub users: Vec<UserConfig>,
    /// Online moves (`[router.moves]`).
    #[serde(default)]
    pub moves: MovesConfig,
    /// Threads that serve client sessions, each an event loop of its own that a
    /// session never leaves (0: one per CPU core). Default 0.
    #[serde(default)]
    pub threads: usize,
    /// How long a write that finds the directory lease expired (a leader
    /// election, a partition) waits for contact to come back before it is refused
    /// with 57P03. A failover then looks like a pause to clients. 0 refuses at
    /// once. Default 5 s.
    #[serde(default = "default_lease_wait", with = "humantime_secs")]
    pub lease_wait: Duration,
    /// How long a new connection may take to log in (startup packet and
    /// authentication) before it is closed. Default 60 s, as pgbouncer's.
    #[serde(default = "default_login_timeout", with = "humantime_secs")]
    pub client_login_timeout: Duration,
    /// Connections still logging in at once; more are refused with 53300. They
    /// do not count against `max_client_connections` until they have logged in,
    /// so this bounds what sockets that never finish can hold. Default 256.
    #[serde(default = "default_max_pending_logins")]
    pub max_pending_logins: usize,
    /// A client idle this long outside a transaction is disconnected (FATAL
    /// 57P05, as Postgres's `idle_session_timeout`). 0: never. Default 0.
    #[serde(default, with = "humantime_secs")]
    pub client_idle_timeout: Duration,
    /// A client idle this long inside a transaction is disconnected (FATAL
    /// 25P03, as Postgres's `idle_in_transaction_session_timeout`); its
    /// transaction is rolled back and the server connection goes back to the
    /// pool. 0: never. Default 0, as in pgbouncer and Postgres; a router whose
    /// pools many applications share should set it (docs/configuration.md).
    #[serde(default, with = "humantime_secs")]
    pub idle_transaction_timeout: Duration,
    /// TCP keepalives on client and shard sockets, so that a peer that vanished
    /// without closing (a crashed host, a dropped NAT entry) is noticed. Default on.
    #[serde(default)]
    pub tcp_keepalive: KeepaliveConfig,
    /// The certificate chain (PEM) the router presents to clients that ask for
    /// TLS. Default none.
    #[serde(default)]
    pub tls_cert_file: Option<PathBuf>,
    /// The private key (PEM) of `tls_cert_file`. Never logged.
    #[serde(default)]
    pub tls_key_file: Option<PathBuf>,
    /// Whether clients may (`allow`) or must (`require`) use TLS, or may not
    /// (`disable`). Default `allow` with a certificate, else `disable`.
    #[serde(default)]
    pub ssl_mode: Option<ClientSslMode>,
    /// Clients log in as the shards' own roles (docs/security.md): their
    /// passwords are looked up on the shards and each runs on them as itself.
    /// Default off: every client runs as the shard URL's user.
    #[serde(default)]
    pub auth: Option<AuthConfig>,
    /// Users who may open the admin console (database `shardgate`). Default
    /// none, unless the router asks no one for a password (no `[[users]]`, no
    /// `[router.auth]`), when anyone who can connect may.
    #[serde(default)]
    pub admins: Vec<String>,
    /// Database names clients may connect with besides the shards' own
    /// database (the one in the shard URLs). Any other name gets 3D000.
    #[serde(default)]
    pub database_aliases: Vec<String>,
    /// How long a client keeps its server connections: `"transaction"`
    /// (default) returns them to the pool at the end of each transaction;
    /// `"session"` keeps them for the client's whole session, so session
    /// state (LISTEN, session advisory locks, temporary tables, cursors WITH
    /// HOLD) works (docs/routing.md, "Session pooling").
    #[serde(default)]
    pub pool_mode: PoolMode,
    /// `pool_mode` for some roles (by user name), over the router's.
    #[serde(default)]
    pub role_pool_modes: std::collections::HashMap<String, PoolMode>,
}

/// When a client's server connection goes back to the pool (pgbouncer's
/// `pool_mode`; its `statement` mode has no use behind a router that holds
/// transactions together).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PoolMode {
    /// At the end of each transaction.
    #[default]
    Transaction,
    /// When the client disconnects, after `DISCARD ALL`.
    Session,
}

impl RouterConfig {
    /// The pool mode of the clients that log in as `user`.
    pub fn pool_mode_of(&self, user: &str) -> PoolMode {
        self.role_pool_modes.get(user).copied().unwrap_or(self.pool_mode)
    }
}

/// `[router.auth]`: how a client's password is looked up on the shards, as
/// pgbouncer's `auth_user` and `auth_query` do.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// The role the lookup logs in to the first shard as; it needs only to run
    /// `query` (see docs/security.md for a function that lets a role without
    /// superuser read the verifiers). Default: the shard URL's user.
    #[serde(default)]
    pub user: Option<String>,
    /// Its password. Never logged. Default: the shard URL's password when
    /// `user` is not set, else none.
    #[serde(default)]
    pub password: Option<Secret>,
    /// Returns the role's name and its stored password (a SCRAM-SHA-256
    /// verifier or an md5 hash) for the user name in `$1`; no row or a NULL
    /// password refuses the login.
    #[serde(default = "default_auth_query")]
    pub query: String,
    /// How long a looked-up password is reused before it is looked up again.
    /// A failed login drops it at once. Default 60 s.
    #[serde(default = "default_auth_cache", with = "humantime_secs")]
    pub cache: Duration,
}

/// A password from the configuration: its `Debug` does not show it.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig { user: None, password: None, query: default_auth_query(), cache: default_auth_cache() }
    }
}

/// pgbouncer's default `auth_query` (1.21): expired and non-login roles get no password.
pub fn default_auth_query() -> String {
    "SELECT rolname, CASE WHEN rolvaliduntil < now() THEN NULL ELSE rolpassword END \
     FROM pg_authid WHERE rolname = $1 AND rolcanlogin"
        .into()
}

fn default_auth_cache() -> Duration {
    Duration::from_secs(60)
}

/// TCP keepalive settings (`[router.tcp_keepalive]`): a silent peer is probed
/// after `idle`, every `interval`, and given up after `count` unanswered probes.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeepaliveConfig {
    /// Default true.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Default 60 s.
    #[serde(default = "default_keepalive_idle", with = "humantime_secs")]
    pub idle: Duration,
    /// Default 10 s.
    #[serde(default = "default_keepalive_interval", with = "humantime_secs")]
    pub interval: Duration,
    /// Default 6.
    #[serde(default = "default_keepalive_count")]
    pub count: u32,
}

impl Default for KeepaliveConfig {
    fn default() -> Self {
        KeepaliveConfig {
            enabled: true,
            idle: default_keepalive_idle(),
            interval: default_keepalive_interval(),
            count: default_keepalive_count(),
        }
    }
}

impl KeepaliveConfig {
    /// Turns keepalives on for `socket` as configured (nothing when disabled).
    pub fn apply(&self, socket: &tokio::net::TcpStream) -> std::io::Result<()> {
        if !self.enabled {
            return Ok(());
        }
        let keepalive =
            socket2::TcpKeepalive::new().with_time(self.idle).with_interval(self.interval).with_retries(self.count);
        socket2::SockRef::from(socket).set_tcp_keepalive(&keepalive)
    }
}

/// Settings of online moves, read by the node that drives them.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MovesConfig {
    /// Moves under way at once; `shardgate move` refuses more. Default 2.
    #[serde(default = "default_max_moves")]
    pub max_concurrent: usize,
    /// How long a cutover may hold statements before it gives up and lets them go
    /// to the old shard (nothing fails; the move stays in dual-write). Default 5 s.
    #[serde(default = "default_cutover_timeout", with = "humantime_secs")]
    pub cutover_timeout: Duration,
    /// Rows per chunk when verify compares the two shards. Default 10000.
    #[serde(default = "default_verify_chunk")]
    pub verify_chunk_rows: u64,
    /// Which nodes drive moves: `leader` (default; the node leading the directory),
    /// `always` (this node, whether it leads or not: a node set aside for moves) or
    /// `never`. Exactly one driver should be active at a time.
    #[serde(default)]
    pub drive: DriveMode,
    /// Whether a move passes through the shadow phase after its copy: reads of the
    /// moving rows also run on the target and the answers are compared. Default true.
    #[serde(default = "default_true")]
    pub shadow_reads: bool,
    /// With `--cutover auto`, how long reads are shadowed before the move verifies
    /// and cuts over (a mismatch stops the automatic cutover). Default 5 s.
    #[serde(default = "default_shadow_for", with = "humantime_secs")]
    pub shadow_for: Duration,
    /// Shadow comparisons one router runs at once; reads beyond that are not
    /// compared (counted as skipped), never delayed. Default 2.
    #[serde(default = "default_shadow_concurrency")]
    pub shadow_concurrency: usize,
    /// Moves back off while a change stream lags more than this many bytes: no
    /// new move starts its copy, and an automatic cutover waits. Default 64 MiB.
    #[serde(default = "default_max_lag_bytes")]
    pub max_lag_bytes: u64,
    /// Caps on how fast the copies a router drives go, together: rows and bytes
    /// per second (0: no cap). A capped copy is paced as it runs. Default 0.
    #[serde(default)]
    pub max_copy_rows_per_s: u64,
    #[serde(default)]
    pub max_copy_bytes_per_s: u64,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DriveMode {
    #[default]
    Leader,
    Always,
    Never,
}

impl Default for MovesConfig {
    fn default() -> Self {
        MovesConfig {
            max_concurrent: default_max_moves(),
            cutover_timeout: default_cutover_timeout(),
            verify_chunk_rows: default_verify_chunk(),
            drive: DriveMode::default(),
            shadow_reads: true,
            shadow_for: default_shadow_for(),
            shadow_concurrency: default_shadow_concurrency(),
            max_lag_bytes: default_max_lag_bytes(),
            max_copy_rows_per_s: 0,
            max_copy_bytes_per_s: 0,
        }
    }
}

fn default_true() -> bool {
    true
}
fn default_shadow_for() -> Duration {
    Duration::from_secs(5)
}
fn default_shadow_concurrency() -> usize {
    2
}
fn default_max_lag_bytes() -> u64 {
    64 << 20
}

fn default_max_moves() -> usize {
    2
}
fn default_cutover_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_verify_chunk() -> u64 {
    10_000
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    /// Server connections per shard. Default 20.
    #[serde(default = "default_pool_size")]
    pub size: usize,
    /// How long a statement waits for a free server connection before it fails
    /// with SQLSTATE 53300 (pgbouncer's `query_wait_timeout`; `queue_timeout`
    /// is the older name of the same key). Default 5 s.
    #[serde(default = "default_queue_timeout", with = "humantime_secs", alias = "query_wait_timeout")]
    pub queue_timeout: Duration,
    /// How long connecting to a shard may take. Default 5 s.
    #[serde(default = "default_connect_timeout", with = "humantime_secs")]
    pub connect_timeout: Duration,
    /// A server connection idle in the pool this long is closed. 0: never.
    /// Default 600 s, as pgbouncer's.
    #[serde(default = "default_server_idle_timeout", with = "humantime_secs")]
    pub server_idle_timeout: Duration,
    /// A server connection open this long is closed when it next goes back to
    /// the pool (never in the middle of a transaction), so that the shards'
    /// backends are renewed. 0: never. Default 3600 s, as pgbouncer's.
    #[serde(default = "default_server_lifetime", with = "humantime_secs")]
    pub server_lifetime: Duration,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            size: default_pool_size(),
            queue_timeout: default_queue_timeout(),
            connect_timeout: default_connect_timeout(),
            server_idle_timeout: default_server_idle_timeout(),
            server_lifetime: default_server_lifetime(),
        }
    }
}

#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    pub name: String,
    /// `trust`, `md5` or `scram-sha-256`.
    pub auth: AuthMethod,
    /// Plain password, or for scram-sha-256 a `SCRAM-SHA-256$…` verifier as stored
    /// in `pg_authid`, or for md5 an `md5…` hash.
    #[serde(default)]
    pub password: Option<String>,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum AuthMethod {
    Trust,
    Md5,
    #[serde(rename = "scram-sha-256")]
    ScramSha256,
}

impl std::fmt::Debug for UserConfig {
    /// Without the password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserConfig").field("name", &self.name).field("auth", &self.auth).finish_non_exhaustive()
    }
}

impl UserConfig {
    pub fn credential(&self) -> Result<Credential, String> {
        let need = || format!("user {:?}: auth {:?} needs a password", self.name, self.auth);
        Ok(match self.auth {
            AuthMethod::Trust => Credential::Trust,
            AuthMethod::Md5 => Credential::Md5 { password: self.password.clone().ok_or_else(need)? },
            AuthMethod::ScramSha256 => {
                let p = self.password.as_deref().ok_or_else(need)?;
                if p.starts_with("SCRAM-SHA-256$") {
                    Credential::Scram(
                        crate::auth::ScramSecret::parse(p).map_err(|e| format!("user {:?}: {e}", self.name))?,
                    )
                } else {
                    Credential::Scram(crate::auth::ScramSecret::from_password(p))
                }
            }
        })
    }
}

impl RouterConfig {
    /// The router's side of clients' TLS: the certificate files read, the mode
    /// settled.
    pub fn client_tls(&self) -> Result<ClientTls, TlsError> {
        ClientTls::from_files(self.tls_cert_file.as_deref(), self.tls_key_file.as_deref(), self.ssl_mode)
    }
}

impl Default for RouterConfig {
    fn default() -> Self {
        RouterConfig {
            listen: default_listen(),
            strict_tenant: false,
            allow_cross_shard_writes: false,
            cross_shard_transactions: CrossShard::TwoPhase,
            max_message_bytes: default_max_message(),
            max_client_connections: default_max_clients(),
            pool: PoolConfig::default(),
            statement_cache_size: default_cache(),
            prepare_simple_queries: true,
            shard_password: None,
            users: Vec::new(),
            moves: MovesConfig::default(),
            threads: 0,
            lease_wait: default_lease_wait(),
            client_login_timeout: default_login_timeout(),
            max_pending_logins: default_max_pending_logins(),
            client_idle_timeout: Duration::ZERO,
            idle_transaction_timeout: Duration::ZERO,
            tcp_keepalive: KeepaliveConfig::default(),
            tls_cert_file: None,
            tls_key_file: None,
            ssl_mode: None,
            auth: None,
            admins: Vec::new(),
            database_aliases: Vec::new(),
            pool_mode: PoolMode::Transaction,
            role_pool_modes: Default::default(),
        }
    }
}

fn default_listen() -> String {
    "127.0.0.1:6432".into()
}
fn default_max_message() -> usize {
    64 << 20
}
fn default_max_clients() -> usize {
    1000
}
fn default_pool_size() -> usize {
    20
}
fn default_lease_wait() -> Duration {
    Duration::from_secs(5)
}
fn default_server_idle_timeout() -> Duration {
    Duration::from_secs(600)
}
fn default_server_lifetime() -> Duration {
    Duration::from_secs(3600)
}
fn default_login_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_max_pending_logins() -> usize {
    256
}
fn default_keepalive_idle() -> Duration {
    Duration::from_secs(60)
}
fn default_keepalive_interval() -> Duration {
    Duration::from_secs(10)
}
fn default_keepalive_count() -> u32 {
    6
}
fn default_queue_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_cache() -> usize {
    10_000
}

mod humantime_secs {
    //! Durations written as `"5s"`, `"250ms"` or a number of seconds.
    use serde::{Deserialize, Deserializer};
    use std::time::Duration;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Secs(f64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            // A reload reads files at run time: an absurd number is an error
            // like any other, never a panic.
            Raw::Secs(s) if (0.0..1e9).contains(&s) => Ok(Duration::from_secs_f64(s)),
            Raw::Secs(s) if s < 0.0 => Err(serde::de::Error::custom("a duration cannot be negative")),
            Raw::Secs(s) => Err(serde::de::Error::custom(format!("{s} seconds is out of range"))),
            Raw::Text(t) => super::parse_duration(&t).map_err(serde::de::Error::custom),
        }
    }
}

/// Parses `"5s"`, `"250ms"`, `"2m"` or `"1.5"` (seconds).
pub fn parse_duration(t: &str) -> Result<Duration, String> {
    let t = t.trim();
    let (num, unit) = t.find(|c: char| c.is_ascii_alphabetic()).map_or((t, "s"), |i| t.split_at(i));
    let n: f64 = num.trim().parse().map_err(|_| format!("{t:?} is not a duration like \"5s\" or \"250ms\""))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" | "min" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("{t:?}: unknown unit {unit:?}; use ms, s, m or h")),
    };
    if !(0.0..1e9).contains(&secs) {
        return Err(format!("{t:?} is out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn keepalive_settings_reach_the_socket() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (client, _) = tokio::join!(tokio::net::TcpStream::connect(addr), listener.accept());
        let client = client.expect("connect");
        let config = KeepaliveConfig { idle: Duration::from_secs(42), ..Default::default() };
        config.apply(&client).expect("apply");
        let socket = socket2::SockRef::from(&client);
        assert!(socket.keepalive().expect("read SO_KEEPALIVE"));
        assert_eq!(socket.tcp_keepalive_time().expect("read TCP_KEEPIDLE"), Duration::from_secs(42));
        assert_eq!(socket.tcp_keepalive_retries().expect("read TCP_KEEPCNT"), 6);
        let off = KeepaliveConfig { enabled: false, ..Default::default() };
        let (other, _) = tokio::join!(tokio::net::TcpStream::connect(addr), listener.accept());
        let other = other.expect("connect");
        off.apply(&other).expect("apply");
        assert!(!socket2::SockRef::from(&other).keepalive().expect("read SO_KEEPALIVE"));
    }

    #[test]
    fn the_timeouts_take_pgbouncer_names_and_durations() {
        let c: RouterConfig = toml::from_str(
            "client_login_timeout = \"2s\"\nidle_transaction_timeout = 30\n[pool]\nquery_wait_timeout = \"250ms\"",
        )
        .expect("parses");
        assert_eq!(c.client_login_timeout, Duration::from_secs(2));
        assert_eq!(c.idle_transaction_timeout, Duration::from_secs(30));
        assert_eq!(c.client_idle_timeout, Duration::ZERO);
        assert_eq!(c.pool.queue_timeout, Duration::from_millis(250));
    }
}
