//! `shardgate`: the one binary. It parses arguments, wires the crates together and
//! prints; the work happens in the library crates.

mod admin_client;
mod config;
mod drive;
mod moves;
mod rebalance;
mod reload;
mod replica;
mod status;
mod up;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use shardgate_directory::state::Outcome;
use shardgate_directory::DirectoryHandle;
use shardgate_router::admin::api::{AddNode, AddShard, MoveAction, NodeId, PinTenant, ShardAdded};

#[derive(Parser)]
#[command(name = "shardgate", version, about = "An online sharding router for PostgreSQL")]
struct Cli {
    /// Where `up` keeps its Postgres servers and where other commands find them.
    #[arg(long, global = true, default_value = "./.shardgate", env = "SHARDGATE_DATA_DIR")]
    data_dir: PathBuf,
    /// The CA certificate (PEM) to check an `--admin https://…` node's certificate against.
    #[arg(long, global = true, env = "SHARDGATE_ADMIN_CA")]
    admin_ca: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start local Postgres shards and a router: the embedded demo cluster.
    Up {
        /// How many Postgres servers to start (only when creating the cluster).
        #[arg(long, default_value_t = 2)]
        shards: usize,
        /// Port of the router.
        #[arg(long, default_value_t = 6432)]
        port: u16,
        /// Port of the admin API (status) and of the web page.
        #[arg(long, default_value_t = 6433)]
        admin_port: u16,
        /// Buckets (logical shards), fixed when the cluster is created.
        #[arg(long, default_value_t = 256)]
        buckets: u32,
        /// How long a move with an automatic cutover shadows reads before it
        /// verifies and cuts over (`[router.moves] shadow_for`).
        #[arg(long, default_value = "5s")]
        shadow_for: String,
        /// Refuse clients that do not use TLS (`ssl_mode = require`); without
        /// it, TLS is offered and plain clients still get in.
        #[arg(long)]
        require_tls: bool,
    },
    /// Run a router against existing Postgres servers.
    Serve {
        #[arg(long, short)]
        config: PathBuf,
        /// Only check the configuration file and exit.
        #[arg(long)]
        check: bool,
    },
    /// Re-read the configuration file of a running `shardgate serve` (as
    /// SIGHUP does) and say what changed and what needs a restart; a file
    /// that cannot be used is refused, and the configuration in force stays.
    Reload {
        #[arg(long)]
        admin: Option<String>,
    },
    /// Manage shards: add, list, drain.
    Shard {
        #[command(subcommand)]
        command: ShardCommand,
        #[arg(long, global = true)]
        admin: Option<String>,
    },
    /// Manage tenants: pin one to a shard.
    Tenant {
        #[command(subcommand)]
        command: TenantCommand,
        #[arg(long, global = true)]
        admin: Option<String>,
    },
    /// Manage the directory's nodes: add (as learner or voter), remove.
    Node {
        #[command(subcommand)]
        command: NodeCommand,
        #[arg(long, global = true)]
        admin: Option<String>,
    },
    /// Show the replicated directory.
    Directory {
        #[command(subcommand)]
        command: DirectoryCommand,
        #[arg(long, global = true)]
        admin: Option<String>,
    },
    /// Move a bucket or a tenant to another shard while the application runs.
    Move {
        #[command(subcommand)]
        what: MoveWhat,
        /// `auto`: verify and cut over as soon as the copy is done (cleanup stays
        /// `shardgate complete`); `manual` (default): wait for `shardgate cutover`.
        #[arg(long, global = true, default_value = "manual")]
        cutover: String,
        /// Stay in the foreground and show progress until the copy is done (or,
        /// with --cutover auto, until the cutover).
        #[arg(long, global = true)]
        wait: bool,
        #[arg(long, global = true)]
        admin: Option<String>,
    },
    /// Compare a move's rows on both shards (row counts and checksums per chunk).
    Verify {
        id: u64,
        #[arg(long)]
        no_wait: bool,
        #[arg(long)]
        admin: Option<String>,
    },
    /// Switch a move's rows to the target shard; clients wait milliseconds, see no error.
    Cutover {
        id: u64,
        /// Cut over even if the move has not verified clean.
        #[arg(long)]
        force: bool,
        #[arg(long)]
        no_wait: bool,
        #[arg(long)]
        admin: Option<String>,
    },
    /// Switch a cut-over move back to its source shard (nothing is lost).
    Rollback {
        id: u64,
        #[arg(long)]
        no_wait: bool,
        #[arg(long)]
        admin: Option<String>,
    },
    /// Finish a cut-over move: drop the old shard's copy and the replication.
    Complete {
        id: u64,
        #[arg(long)]
        no_wait: bool,
        #[arg(long)]
        admin: Option<String>,
    },
    /// Abandon a move before its cutover: drop the target's copy.
    Cancel {
        id: u64,
        #[arg(long)]
        no_wait: bool,
        #[arg(long)]
        admin: Option<String>,
    },
    /// Even out the shards: plan bucket (and whale tenant) moves, print the plan,
    /// and with --apply run them, each through every phase.
    Rebalance {
        /// What to even out: size (bytes of the buckets' rows), count (buckets) or
        /// load.
        #[arg(long, default_value = "size")]
        strategy: String,
        /// Plan at most this many moves.
        #[arg(long, default_value_t = 16)]
        max_moves: usize,
        /// Only print the plan (the default unless --apply).
        #[arg(long, conflicts_with = "apply")]
        dry_run: bool,
        /// Run the planned moves.
        #[arg(long)]
        apply: bool,
        /// Moves under way at once with --apply (the cluster's
        /// `[router.moves] max_concurrent` caps it too).
        #[arg(long, default_value_t = 2)]
        concurrency: usize,
        /// Print the plan as JSON.
        #[arg(long)]
        json: bool,
        #[arg(long)]
        admin: Option<String>,
    },
    /// Show shards, buckets and placements.
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Keep showing it, redrawn as it changes (Ctrl-C ends it).
        #[arg(long)]
        watch: bool,
        /// How often --watch asks, e.g. 500ms or 2s.
        #[arg(long, default_value = "1s")]
        interval: String,
        /// Admin API address of a node (default: the cluster `up` started in --data-dir).
        #[arg(long)]
        admin: Option<String>,
    },
}

#[derive(Subcommand)]
enum MoveWhat {
    /// A bucket (logical shard): every tenant whose key hashes to it.
    Bucket {
        bucket: u32,
        #[arg(long = "to")]
        shard: String,
    },
    /// One tenant.
    Tenant {
        tenant: String,
        #[arg(long = "to")]
        shard: String,
    },
}

#[derive(Subcommand)]
enum ShardCommand {
    /// Add a Postgres server as a new (empty) shard.
    Add {
        name: String,
        url: String,
        /// Then move buckets onto it until the shards are even by size.
        #[arg(long)]
        rebalance: bool,
    },
    /// List the shards.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Empty a shard: mark it draining (no new placements), move every bucket and
    /// pinned tenant off it, then mark it removed. Run it again to resume.
    Drain {
        name: String,
        /// Moves under way at once.
        #[arg(long, default_value_t = 2)]
        concurrency: usize,
    },
}

#[derive(Subcommand)]
enum TenantCommand {
    /// Place a tenant with no rows yet on a shard of its own choosing.
    Pin {
        tenant: String,
        #[arg(long = "to")]
        shard: String,
    },
}

#[derive(Subcommand)]
enum NodeCommand {
    /// Add a node (started with `serve` and bootstrap = false) to the directory.
    Add {
        id: u64,
        /// Its raft address, host:port.
        address: String,
        /// Receive the log without voting (routers beyond the 3 or 5 voters).
        #[arg(long)]
        learner: bool,
    },
    /// Remove a node from the directory's membership.
    Remove { id: u64 },
}

#[derive(Subcommand)]
enum DirectoryCommand {
    /// Print the whole directory.
    Show {
        #[arg(long)]
        json: bool,
    },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SHARDGATE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    // The admin API of the node named by `--admin`, or of the cluster `up` started.
    let find =
        |admin: Option<String>| admin_client::Api::find(&cli.data_dir, admin.as_deref(), cli.admin_ca.as_deref());
    let result = match cli.command {
        Command::Move { what, cutover, wait, admin } => find(admin).and_then(|api| {
            let auto = match cutover.as_str() {
                "auto" => true,
                "manual" => false,
                other => anyhow::bail!("--cutover must be auto or manual, not {other:?}"),
            };
            let (subject, to) = match what {
                MoveWhat::Bucket { bucket, shard } => (moves::Subject::Bucket(bucket), shard),
                MoveWhat::Tenant { tenant, shard } => (moves::Subject::Tenant(tenant), shard),
            };
            moves::start(&api, subject, &to, auto, wait)
        }),
        Command::Verify { id, no_wait, admin } => {
            find(admin).and_then(|api| moves::request(&api, id, MoveAction::Verify, false, !no_wait))
        }
        Command::Cutover { id, force, no_wait, admin } => {
            find(admin).and_then(|api| moves::request(&api, id, MoveAction::Cutover, force, !no_wait))
        }
        Command::Rollback { id, no_wait, admin } => {
            find(admin).and_then(|api| moves::request(&api, id, MoveAction::Rollback, false, !no_wait))
        }
        Command::Complete { id, no_wait, admin } => {
            find(admin).and_then(|api| moves::request(&api, id, MoveAction::Complete, false, !no_wait))
        }
        Command::Cancel { id, no_wait, admin } => {
            find(admin).and_then(|api| moves::request(&api, id, MoveAction::Cancel, false, !no_wait))
        }
        Command::Status { json, watch: false, admin, .. } => find(admin).and_then(|api| status::run(&api, json)),
        Command::Status { json, watch: true, interval, admin } => shardgate_router::config::parse_duration(&interval)
            .map_err(anyhow::Error::msg)
            .and_then(|every| find(admin).and_then(|api| status::watch(&api, json, every))),
        Command::Rebalance { strategy, max_moves, dry_run: _, apply, concurrency, json, admin } => find(admin)
            .and_then(|api| {
                let strategy = strategy.parse().map_err(anyhow::Error::msg)?;
                rebalance::run(&api, &rebalance::Args { strategy, max_moves, apply, concurrency, json })
            }),
        Command::Shard { command, admin } => {
            let api = find(admin);
            api.and_then(|api| match command {
                ShardCommand::Add { name, url, rebalance } => {
                    match api.post::<_, ShardAdded>("/shards", &AddShard { name: name.clone(), url: url.clone() }) {
                        Ok(reply) => {
                            println!("added shard {name}");
                            if let Some(note) = reply.setup.schema {
                                println!("{note}");
                            }
                            if let Some(e) = reply.setup.schema_error {
                                eprintln!(
                                    "warning: the schema was not copied to shard {name} yet: {e}\n\
                                     DDL through shardgate fails on it until its first move copies the schema \
                                     (shardgate rebalance --apply); or create the tables there yourself"
                                );
                            }
                        }
                        // Run again after an interruption: the same shard is there.
                        Err(e) if rebalance && e.to_string().contains("exists already") => {
                            rebalance::same_shard(&api, &name, &url)?;
                            println!("shard {name} was added already; going on with the rebalance");
                        }
                        Err(e) => return Err(e),
                    }
                    if !rebalance {
                        return Ok(());
                    }
                    let args = rebalance::Args {
                        strategy: shardgate_migrator::planner::Strategy::Size,
                        max_moves: usize::MAX,
                        apply: true,
                        concurrency: 2,
                        json: false,
                    };
                    rebalance::run(&api, &args)
                }
                ShardCommand::List { json } => status::shard_list(&api, json),
                ShardCommand::Drain { name, concurrency } => rebalance::drain(&api, &name, concurrency),
            })
        }
        Command::Tenant { command: TenantCommand::Pin { tenant, shard }, admin } => find(admin).and_then(|api| {
            let _: Outcome = api.post("/tenants/pin", &PinTenant { tenant: tenant.clone(), shard: shard.clone() })?;
            println!("tenant {tenant} is pinned to {shard}");
            Ok(())
        }),
        Command::Node { command, admin } => find(admin).and_then(|api| {
            match command {
                NodeCommand::Add { id, address, learner } => {
                    let _: Outcome = api.post("/nodes", &AddNode { id, address, learner })?;
                    println!("node {id} added as a {}", if learner { "learner" } else { "voter" });
                }
                NodeCommand::Remove { id } => {
                    let _: Outcome = api.post("/nodes/remove", &NodeId { id })?;
                    println!("node {id} removed");
                }
            }
            Ok(())
        }),
        Command::Reload { admin } => find(admin).and_then(|api| reload::run(&api)),
        Command::Directory { command: DirectoryCommand::Show { json }, admin } => {
            find(admin).and_then(|api| status::directory_show(&api, json))
        }
        Command::Serve { config, check: true } => {
            config::FileConfig::load(&config).and_then(|c| c.check()).map(|()| println!("{}: ok", config.display()))
        }
        Command::Serve { config, check: false } => runtime().and_then(|rt| rt.block_on(serve(config))),
        Command::Up { shards, port, admin_port, buckets, shadow_for, require_tls } => {
            shardgate_router::config::parse_duration(&shadow_for).map_err(anyhow::Error::msg).and_then(|shadow_for| {
                runtime().and_then(|rt| {
                    rt.block_on(up::run(up::UpOptions {
                        data_dir: cli.data_dir.clone(),
                        shards,
                        port,
                        admin_port,
                        buckets,
                        shadow_for,
                        require_tls,
                    }))
                })
            })
        }
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().context("cannot start the async runtime")
}

async fn serve(path: PathBuf) -> Result<()> {
    let cfg = config::FileConfig::load(&path)?;
    // Before anything starts: a missing certificate is a configuration error.
    let admin_tls = cfg.admin_tls()?;
    let scheme = if admin_tls.is_some() { "https" } else { "http" };
    let (dir, addrs) = cfg.directory()?;
    let mut replica = None;
    let router = match &cfg.directory {
        None => shardgate_router::server::start(cfg.router.clone(), DirectoryHandle::new(dir), addrs).await?,
        Some(d) => {
            let resolve = |a: &str| -> Result<std::net::SocketAddr> {
                use std::net::ToSocketAddrs;
                a.to_socket_addrs()?.next().ok_or_else(|| anyhow::anyhow!("cannot resolve {a}"))
            };
            let peers: Vec<(u64, String)> = d.peers.iter().map(|p| (p.id, p.address.clone())).collect();
            let mut voters: Vec<u64> = d.peers.iter().map(|p| p.id).collect();
            voters.push(d.node_id);
            voters.sort();
            let (node, transport) = replica::start(replica::ReplicaSpec {
                id: d.node_id,
                listen: resolve(&d.listen)?,
                bound: None,
                data_dir: d.data_dir.clone(),
                token: d.token.clone(),
                peers: Vec::clone(&peers),
                tls: d.tls()?,
                bootstrap: d.bootstrap.then_some(voters),
                initial: dir,
            })
            .await?;
            replica::follow_node_addresses(node.clone(), transport, peers);
            if let Err(e) = replica::wait_for_leader(&node, std::time::Duration::from_secs(10)).await {
                tracing::warn!("{e:#}; serving reads from the local replica meanwhile");
            }
            replica = Some(node.clone());
            shardgate_router::server::start_replicated(cfg.router.clone(), node, d.lease, addrs).await?
        }
    };
    // Moves are driven by the directory's leader (with a static directory there
    // are none to drive: the admin API refuses them).
    let _driver = drive::start(router.context.clone(), true);
    let (admin_addr, _admin) = shardgate_router::admin::serve_with(
        &cfg.admin.listen,
        router.context.clone(),
        cfg.admin.token.clone(),
        admin_tls,
    )
    .await
    .with_context(|| format!("cannot listen on admin address {}", cfg.admin.listen))?;
    // SIGHUP and POST /reload read the file again (listened for before the
    // ready line: SIGHUP's default is to end the process).
    let _ = router.context.config_source.set(Arc::new(reload::ConfigFile { path, started: cfg }));
    let mut hangup =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).context("cannot listen for SIGHUP")?;
    // The token is not printed: a server's output often ends up in a log. The page
    // asks for it (or takes it as ?token=).
    crate::announce(&format!(
        "ready: postgres://postgres@{}/app\nweb: {scheme}://{admin_addr}/\nadmin: {scheme}://{admin_addr}/status",
        router.local_addr
    ));
    let stop = wait_for_signal();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            Some(()) = hangup.recv() => {
                tracing::info!("SIGHUP: reading the configuration file again");
                // Logged and counted by the reload itself, refused or not.
                let _ = router.context.reload_from_source();
            }
        }
    }
    tracing::info!("shutting down");
    router.shutdown().await;
    if let Some(node) = replica {
        // A leader hands its office over first, so the other nodes need no election.
        node.stop().await;
    }
    Ok(())
}

/// Prints the ready lines. A server must not die because whoever started it
/// stopped reading its output (a closed pipe), so write errors are ignored.
pub fn announce(text: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{text}");
    let _ = out.flush();
}

/// SIGINT or SIGTERM.
pub async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (signal(SignalKind::interrupt()), signal(SignalKind::terminate())) {
        (Ok(mut int), Ok(mut term)) => {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
