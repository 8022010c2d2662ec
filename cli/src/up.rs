//! `shardgate up`: the embedded demo cluster. Local Postgres servers (kept in
//! --data-dir between runs) and a router in this process, until Ctrl-C. The
//! router serves TLS with a certificate from a local CA kept in
//! `<data-dir>/tls/`, so clients can check it with `sslmode=verify-full`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use shardgate_directory::replica::RaftTlsFiles;
use shardgate_directory::{Directory, KeyType, Shard};
use shardgate_localpg::{Server, TlsFiles};
use shardgate_router::backend::ShardAddress;
use shardgate_router::config::{AuthConfig, AuthMethod, RouterConfig, Secret, UserConfig};
use shardgate_router::tls::ClientSslMode;

pub struct UpOptions {
    pub data_dir: PathBuf,
    pub shards: usize,
    pub port: u16,
    pub admin_port: u16,
    pub buckets: u32,
    /// `[router.moves] shadow_for`: how long automatic cutovers shadow reads.
    pub shadow_for: std::time::Duration,
    /// `ssl_mode = require` instead of `allow`.
    pub require_tls: bool,
}

/// What `up` records in `<data-dir>/cluster.json`, so that a second `up` reuses
/// the same servers and ports and other commands find the running cluster.
#[derive(Serialize, Deserialize)]
pub struct ClusterFile {
    pub shards: Vec<ShardEntry>,
    pub buckets: u32,
    pub router: String,
    pub admin: String,
    /// Raft ports of the three directory replicas (nodes 1, 2, 3).
    #[serde(default)]
    pub raft_ports: Vec<u16>,
    /// Token of the directory's raft traffic and of the admin API.
    #[serde(default)]
    pub admin_token: Option<String>,
}

#[derive(Serialize, Deserialize)]
pub struct ShardEntry {
    pub name: String,
    pub port: u16,
}

impl ClusterFile {
    fn path(data_dir: &Path) -> PathBuf {
        data_dir.join("cluster.json")
    }

    pub fn read(data_dir: &Path) -> Result<ClusterFile> {
        let p = Self::path(data_dir);
        let text = std::fs::read_to_string(&p).with_context(|| {
            format!(
                "no cluster in {} (missing {}); start one with `shardgate up`, or name a node with --admin",
                data_dir.display(),
                p.display()
            )
        })?;
        serde_json::from_str(&text).with_context(|| format!("{} is damaged", p.display()))
    }

    fn write(&self, data_dir: &Path) -> Result<()> {
        use std::os::unix::fs::OpenOptionsExt;
        let p = Self::path(data_dir);
        let tmp = p.with_extension("json.tmp");
        // It holds the admin token: readable by its owner only.
        let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
        std::io::Write::write_all(&mut f, serde_json::to_string_pretty(self)?.as_bytes())?;
        std::fs::rename(&tmp, &p)?;
        Ok(())
    }
}

pub async fn run(opts: UpOptions) -> Result<()> {
    if opts.shards == 0 {
        bail!("--shards must be at least 1");
    }
    std::fs::create_dir_all(&opts.data_dir)
        .with_context(|| format!("cannot create data directory {}", opts.data_dir.display()))?;
    let data_dir = opts.data_dir.canonicalize()?;
    let existing = ClusterFile::read(&data_dir).ok();
    let (entries, buckets) = match &existing {
        Some(c) => {
            if c.shards.len() != opts.shards && opts.shards != 2 {
                eprintln!(
                    "note: reusing the existing cluster of {} shards in {}; --shards applies only to a new cluster",
                    c.shards.len(),
                    data_dir.display()
                );
            }
            (c.shards.iter().map(|s| (s.name.clone(), Some(s.port))).collect::<Vec<_>>(), c.buckets)
        }
        None => ((0..opts.shards).map(|i| (format!("shard_{i}"), None)).collect(), opts.buckets),
    };

    let mut servers = Vec::new();
    let mut shard_entries = Vec::new();
    for (name, port) in entries {
        tracing::info!(shard = %name, "starting Postgres");
        let dir = data_dir.join(&name);
        let mut server = Server::init(&dir, port).with_context(|| format!("cannot prepare Postgres for {name}"))?;
        server.start().with_context(|| format!("cannot start Postgres for {name}"))?;
        server.create_database("app").await.with_context(|| format!("cannot create database app on {name}"))?;
        shard_entries.push(ShardEntry { name: name.clone(), port: server.port() });
        servers.push((name, server));
    }
    let result = serve(&data_dir, &servers, shard_entries, buckets, existing.as_ref(), &opts).await;
    for (name, server) in &servers {
        if let Err(e) = server.stop() {
            eprintln!("could not stop Postgres {name}: {e}");
        }
    }
    result
}

async fn serve(
    data_dir: &Path,
    servers: &[(String, Server)],
    shard_entries: Vec<ShardEntry>,
    buckets: u32,
    existing: Option<&ClusterFile>,
    opts: &UpOptions,
) -> Result<()> {
    let mut shards = Vec::new();
    let mut addrs = Vec::new();
    for (name, server) in servers {
        let addr = ShardAddress::from_url(&server.url("app")).map_err(anyhow::Error::msg)?;
        shards.push(Shard::new(name.clone(), addr.display_url()));
        addrs.push(addr);
    }
    let initial = Directory::new("tenant_id", KeyType::Int, buckets, shards)?;
    // Three directory replicas in this process, each with its own raft log.
    let token = existing.and_then(|c| c.admin_token.clone()).unwrap_or_else(random_token);
    // A new cluster's raft ports are whatever the kernel gives three listeners,
    // kept open and handed to the replicas, so nothing can take a port in between;
    // a cluster started before listens where it did then.
    let mut bound: Vec<Option<std::net::TcpListener>> = Vec::new();
    let ports: Vec<u16> = match existing.map(|c| c.raft_ports.clone()).filter(|p| p.len() == 3) {
        Some(p) => p,
        None => {
            let mut ports = Vec::new();
            for _ in 0..3 {
                let listener = std::net::TcpListener::bind("127.0.0.1:0")
                    .context("cannot open a port on 127.0.0.1 for the directory's raft traffic")?;
                ports.push(listener.local_addr()?.port());
                bound.push(Some(listener));
            }
            ports
        }
    };
    bound.resize_with(3, || None);
    let addr_of = |i: usize| -> std::net::SocketAddr { ([127, 0, 0, 1], ports[i]).into() };
    let tls = TlsFiles::reuse_or_make(&data_dir.join("tls")).context("cannot make the router's TLS certificate")?;
    let mut nodes = Vec::new();
    for (i, bound) in bound.into_iter().enumerate() {
        let id = i as u64 + 1;
        let peers = (0..3).filter(|j| *j != i).map(|j| (j as u64 + 1, addr_of(j).to_string())).collect();
        let (node, _t) = crate::replica::start(crate::replica::ReplicaSpec {
            id,
            listen: addr_of(i),
            bound,
            data_dir: data_dir.join("directory").join(format!("node{id}")),
            token: token.clone(),
            peers,
            // Raft between the replicas under TLS too, with the local CA.
            tls: Some(RaftTlsFiles { ca: tls.root_cert.clone(), cert: tls.cert.clone(), key: tls.key.clone() }),
            bootstrap: Some(vec![1, 2, 3]),
            initial: initial.clone(),
        })
        .await?;
        nodes.push(node);
    }
    crate::replica::wait_for_leader(&nodes[0], std::time::Duration::from_secs(10)).await?;
    // Clients log in as the shards' own roles, looked up through a role that
    // may do nothing else (a new password at every start: only this process
    // needs it). `postgres`, the servers' superuser and the router's own
    // login, logs in without a password, as the printed URL does.
    let lookup_password = random_token();
    for (name, server) in servers {
        let setup = shardgate_router::roles::lookup_setup_sql(LOOKUP_ROLE, &lookup_password);
        let c = server.connect("app").await.with_context(|| format!("cannot connect to {name}"))?;
        c.batch_execute(&setup).await.with_context(|| format!("cannot set up the login lookup on {name}"))?;
    }
    let mut config = RouterConfig {
        listen: format!("127.0.0.1:{}", opts.port),
        tls_cert_file: Some(tls.cert.clone()),
        tls_key_file: Some(tls.key.clone()),
        ssl_mode: Some(if opts.require_tls { ClientSslMode::Require } else { ClientSslMode::Allow }),
        auth: Some(AuthConfig {
            user: Some(LOOKUP_ROLE.into()),
            password: Some(Secret(lookup_password)),
            query: shardgate_router::roles::LOOKUP_QUERY.into(),
            ..AuthConfig::default()
        }),
        users: vec![UserConfig { name: "postgres".into(), auth: AuthMethod::Trust, password: None }],
        admins: vec!["postgres".into()],
        ..RouterConfig::default()
    };
    config.moves.shadow_for = opts.shadow_for;
    let router =
        shardgate_router::server::start_replicated(config, nodes[0].clone(), std::time::Duration::from_secs(2), addrs)
            .await?;
    // One process holds all three replicas: its driver runs whichever leads.
    let _driver = crate::drive::start(router.context.clone(), false);
    let admin_listen = format!("127.0.0.1:{}", opts.admin_port);
    let (admin_addr, _admin) =
        shardgate_router::admin::serve(&admin_listen, router.context.clone(), Some(token.clone())).await.with_context(
            || format!("cannot listen on {admin_listen} for the admin API; choose another with --admin-port"),
        )?;
    ClusterFile {
        shards: shard_entries,
        buckets,
        router: router.local_addr.to_string(),
        admin: admin_addr.to_string(),
        raft_ports: ports,
        admin_token: Some(token.clone()),
    }
    .write(data_dir)?;
    // The web page's address carries the token (the page keeps it and drops it
    // from the address bar), as a notebook server prints its own: whoever runs
    // `up` owns the cluster, and the token is also in cluster.json, readable by
    // them only.
    // The `tls:` line names the CA to trust: the server certificate is for
    // localhost and 127.0.0.1, so verify-full works against either.
    crate::announce(&format!(
        "ready: postgres://postgres@{addr}/app\nweb: http://{admin_addr}/?token={token}\nadmin: http://{admin_addr}/status\n\
         tls: postgres://postgres@{addr}/app?sslmode=verify-full&sslrootcert={}",
        tls.root_cert.display(),
        addr = router.local_addr,
    ));
    crate::wait_for_signal().await;
    tracing::info!("shutting down: stopping the router and the Postgres servers");
    router.shutdown().await;
    Ok(())
}

/// The role the demo's router looks logins up as.
const LOOKUP_ROLE: &str = "shardgate_auth";

/// 32 hex characters from the kernel's random source.
fn random_token() -> String {
    let mut bytes = [0u8; 16];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = std::io::Read::read_exact(&mut f, &mut bytes);
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
