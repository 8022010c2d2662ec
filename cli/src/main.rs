//! `shardgate`: the one binary. It parses arguments, wires the crates together and
//! prints; the work happens in the library crates.

mod config;
mod status;
mod up;

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use shardgate_directory::DirectoryHandle;

#[derive(Parser)]
#[command(
    name = "shardgate",
    version,
    about = "An online sharding router for PostgreSQL"
)]
struct Cli {
    /// Where `up` keeps its Postgres servers and where other commands find them.
    #[arg(
        long,
        global = true,
        default_value = "./.shardgate",
        env = "SHARDGATE_DATA_DIR"
    )]
    data_dir: PathBuf,
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
        /// Port of the admin API (status).
        #[arg(long, default_value_t = 6433)]
        admin_port: u16,
        /// Buckets (logical shards), fixed when the cluster is created.
        #[arg(long, default_value_t = 256)]
        buckets: u32,
    },
    /// Run a router against existing Postgres servers.
    Serve {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Show shards, buckets and placements.
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Admin API address of a node (default: the cluster `up` started in --data-dir).
        #[arg(long)]
        admin: Option<String>,
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
    let result = match cli.command {
        Command::Status { json, admin } => status::run(&cli.data_dir, admin.as_deref(), json),
        Command::Serve { config } => runtime().and_then(|rt| rt.block_on(serve(config))),
        Command::Up {
            shards,
            port,
            admin_port,
            buckets,
        } => runtime().and_then(|rt| {
            rt.block_on(up::run(up::UpOptions {
                data_dir: cli.data_dir.clone(),
                shards,
                port,
                admin_port,
                buckets,
            }))
        }),
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
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

async fn serve(path: PathBuf) -> Result<()> {
    let cfg = config::FileConfig::load(&path)?;
    let (dir, addrs) = cfg.directory()?;
    let router =
        shardgate_router::server::start(cfg.router.clone(), DirectoryHandle::new(dir), addrs)
            .await?;
    let (admin_addr, _admin) =
        shardgate_router::admin::serve(&cfg.admin.listen, router.context.clone())
            .await
            .with_context(|| format!("cannot listen on admin address {}", cfg.admin.listen))?;
    println!("ready: postgres://postgres@{}/app", router.local_addr);
    println!("admin: http://{admin_addr}/status");
    wait_for_signal().await;
    eprintln!("shutting down");
    router.shutdown().await;
    Ok(())
}

/// SIGINT or SIGTERM.
pub async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
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
