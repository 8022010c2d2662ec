//! The end-to-end test harness: real Postgres servers (started by the tests, from
//! a template data directory so each suite starts in about a second) and routers
//! running in the test process.

pub mod bank;
pub mod checker;
pub mod random;
pub mod raw;
pub mod tls;
pub mod wire;

use shardgate_directory::{Directory, DirectoryHandle, KeyType, Shard};
use shardgate_localpg::{TestCluster, TestServer};
use shardgate_router::backend::ShardAddress;
use shardgate_router::config::RouterConfig;
use shardgate_router::server::RouterHandle;
use tokio_postgres::{Client, NoTls};

/// Shards, a router in front of them, and ways to reach both.
pub struct Harness {
    pub cluster: TestCluster,
    pub router: RouterHandle,
    pub directory: DirectoryHandle,
}

impl Harness {
    /// `shards` Postgres servers and a router with default settings.
    pub async fn start(shards: usize) -> Harness {
        Self::start_with(shards, RouterConfig::default()).await
    }

    pub async fn start_with(shards: usize, config: RouterConfig) -> Harness {
        Self::start_keyed(shards, config, KeyType::Int).await
    }

    /// A cluster whose key column has the given SQL type.
    pub async fn start_keyed(shards: usize, config: RouterConfig, key_type: KeyType) -> Harness {
        init_logging();
        let cluster = TestCluster::start(shards).await.expect("start test Postgres servers");
        let urls = cluster.urls();
        Self::start_over(cluster, &urls, config, key_type).await
    }

    /// A router in front of servers a test started (and set up) itself,
    /// reached at `urls` (one per server, in order: TLS parameters, say).
    pub async fn start_over(
        cluster: TestCluster,
        urls: &[String],
        mut config: RouterConfig,
        key_type: KeyType,
    ) -> Harness {
        init_logging();
        let mut dir_shards = Vec::new();
        let mut addrs = Vec::new();
        for (i, url) in urls.iter().enumerate() {
            let addr = ShardAddress::from_url(url).expect("shard url");
            dir_shards.push(Shard::new(format!("shard_{i}"), addr.display_url()));
            addrs.push(addr);
        }
        let directory = DirectoryHandle::new(Directory::new("tenant_id", key_type, 64, dir_shards).expect("directory"));
        config.listen = "127.0.0.1:0".into();
        let router = shardgate_router::server::start(config, directory.clone(), addrs).await.expect("start router");
        Harness { cluster, router, directory }
    }

    /// libpq URL of the router.
    pub fn url(&self) -> String {
        format!("postgres://postgres@{}/app", self.router.local_addr)
    }

    pub fn port(&self) -> u16 {
        self.router.local_addr.port()
    }

    /// A client connected through the router.
    pub async fn client(&self) -> Client {
        connect(&self.url()).await
    }

    /// A client connected straight to shard `i`, bypassing the router.
    pub async fn shard(&self, i: usize) -> Client {
        connect(&self.cluster.servers()[i].url("app")).await
    }

    pub fn shard_server(&self, i: usize) -> &TestServer {
        &self.cluster.servers()[i]
    }

    /// The shard index a tenant lives on, per the router's directory.
    pub fn shard_of(&self, tenant: i64) -> usize {
        self.directory.load().shard_for(&shardgate_directory::TenantKey::Int(tenant))
    }

    /// Tenants that live on shard `i`, the first `n` found counting up from 1.
    pub fn tenants_on(&self, i: usize, n: usize) -> Vec<i64> {
        (1..).filter(|t| self.shard_of(*t) == i).take(n).collect()
    }
}

/// Starts a move driver for `h`'s directory that reaches the shards at
/// `urls` (TLS parameters, say), and gives the router's shadow reads the
/// driver's way to catch up. Send `true` on the returned channel to stop it.
pub fn start_move_driver(
    h: &Harness,
    urls: Vec<String>,
    config: shardgate_migrator::driver::DriverConfig,
) -> tokio::sync::watch::Sender<bool> {
    use std::sync::Arc;
    let resolve: shardgate_migrator::driver::Resolve = Arc::new(move |_: &shardgate_directory::Directory, i: usize| {
        let url = urls.get(i)?;
        Some(shardgate_migrator::Endpoint::new(format!("shard_{i}"), ShardAddress::from_url(url).ok()?))
    });
    h.router.context.shadow.set_catch_up(Arc::new(shardgate_migrator::catchup::ShadowCatchUp {
        directory: h.directory.clone(),
        resolve: resolve.clone(),
        timeout: std::time::Duration::from_secs(10),
    }));
    let driver = shardgate_migrator::driver::Driver::new(
        h.directory.clone(),
        Arc::new(shardgate_router::hold::LocalWriter(h.directory.clone())),
        resolve,
        config,
        Arc::new(|| true),
    );
    let (stop, stopped) = tokio::sync::watch::channel(false);
    tokio::spawn(driver.run(stopped));
    stop
}

pub async fn connect(url: &str) -> Client {
    let (client, conn) = tokio_postgres::connect(url, NoTls).await.unwrap_or_else(|e| panic!("connect {url}: {e}"));
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SHARDGATE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}

/// The SQLSTATE of a failed statement.
pub fn sqlstate(e: &tokio_postgres::Error) -> String {
    e.code().map(|c| c.code().to_string()).unwrap_or_else(|| format!("no SQLSTATE: {e}"))
}

/// The rows of a simple query's answer, each value as text (None for NULL).
pub fn rows(msgs: Vec<tokio_postgres::SimpleQueryMessage>) -> Vec<Vec<Option<String>>> {
    msgs.into_iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => {
                Some((0..r.len()).map(|i| r.get(i).map(str::to_string)).collect())
            }
            _ => None,
        })
        .collect()
}
