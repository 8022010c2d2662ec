//! The move driver of a serving node, wired to its router: the binary's job, so
//! that the migrator needs nothing of a router's insides. The driver gets the
//! router's directory and directory writer, reaches shards with the router's
//! login details, runs while this node should drive moves (`[router.moves]
//! drive`), and installs the migrator's two hooks into the router: the catch-up
//! wait of shadow reads and the schema copy onto an added shard.

use std::sync::Arc;
use std::time::Duration;

use shardgate_directory::Directory;
use shardgate_migrator::catchup::ShadowCatchUp;
use shardgate_migrator::cutover::CutoverOptions;
use shardgate_migrator::driver::{Driver, DriverConfig, Resolve};
use shardgate_migrator::schema::NewShardSchema;
use shardgate_migrator::verify::VerifyOptions;
use shardgate_migrator::Endpoint;
use shardgate_router::config::DriveMode;
use shardgate_router::context::RouterContext;

/// Starts the move driver of a router process: it drives moves while this node
/// leads the directory (or always, with a static directory, or when
/// `leader_only` is false: one process holding every replica). Send `true` to
/// stop.
pub fn start(ctx: Arc<RouterContext>, leader_only: bool) -> tokio::sync::watch::Sender<bool> {
    let resolve_ctx = ctx.clone();
    let resolve: Resolve = Arc::new(move |dir: &Directory, shard: usize| {
        let addr = resolve_ctx.shard_address(dir, shard)?;
        Some(Endpoint::new(dir.shards.get(shard)?.name.clone(), addr))
    });
    let leader_ctx = ctx.clone();
    let mode = ctx.config.load().moves.drive;
    let active = Arc::new(move || match mode {
        DriveMode::Never => false,
        DriveMode::Always => true,
        DriveMode::Leader => {
            !leader_only || leader_ctx.replica.as_ref().is_none_or(|(node, _)| node.status().is_leader)
        }
    });
    let lease = ctx.replica.as_ref().map(|(_, l)| *l).unwrap_or(Duration::from_secs(2));
    let config = ctx.config.load();
    let moves = &config.moves;
    let config = DriverConfig {
        cutover: CutoverOptions { timeout: moves.cutover_timeout },
        verify: VerifyOptions { chunk_rows: moves.verify_chunk_rows, ..Default::default() },
        shadow: moves.shadow_reads,
        shadow_for: moves.shadow_for,
        max_lag_bytes: moves.max_lag_bytes,
        max_copy_rows_per_s: moves.max_copy_rows_per_s,
        max_copy_bytes_per_s: moves.max_copy_bytes_per_s,
        // Heartbeats come every second; a router silent for its lease and one more
        // second has stopped serving writes by the lease rule.
        router_timeout: lease + Duration::from_secs(1),
        ..Default::default()
    };
    let _ =
        ctx.shard_setup.set(Arc::new(NewShardSchema { directory: ctx.directory.clone(), resolve: resolve.clone() }));
    ctx.shadow.set_catch_up(Arc::new(ShadowCatchUp {
        directory: ctx.directory.clone(),
        resolve: resolve.clone(),
        timeout: Duration::from_secs(5),
    }));
    let driver = Driver::new(ctx.directory.clone(), ctx.writer.clone(), resolve, config, active);
    let (stop, stopped) = tokio::sync::watch::channel(false);
    tokio::spawn(driver.run(stopped));
    stop
}
