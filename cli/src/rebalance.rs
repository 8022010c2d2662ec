//! `shardgate rebalance`, `shard add --rebalance` and `shard drain`: the plan comes
//! from the migrator's planner over the cluster's status and the bucket sizes a
//! node reads from the shards; `--apply` runs its moves a few at a time, each
//! through every phase (copy, shadow, verify, cutover, cleanup).
//!
//! The CLI keeps no state: an interrupted rebalance or drain is resumed by running
//! the same command again, which plans from where the cluster is now (moves that
//! finished are in the placements, moves under way are waited for).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use shardgate_directory::state::{MovePhase, Outcome};
use shardgate_directory::{ShardState, TenantKey};
use shardgate_migrator::planner::{
    self, BucketInfo, Input, Options, PinInfo, Plan, PlannedMove, ShardInfo, Strategy, Subject, TenantInfo,
};

use shardgate_router::admin::api::{
    LoadReport, MoveAction, MoveRequestBody, MoveStatus, NewMove, ShardName, Sizes, Status,
};

use crate::admin_client::Api;

pub struct Args {
    pub strategy: Strategy,
    pub max_moves: usize,
    pub apply: bool,
    pub concurrency: usize,
    pub json: bool,
}

/// The planner's input from a node: shards and placements from `/status`, sizes
/// from `/sizes`. Also returns the shard names in id order.
fn gather(api: &Api, strategy: Strategy) -> Result<(Input, Vec<String>)> {
    let status: Status = api.get("/status")?;
    let sizes: Sizes = if strategy == Strategy::Size { api.get("/sizes")? } else { Sizes::default() };
    // Time spent per bucket (µs) as the routers counted it: the load measure.
    let load: LoadReport = api.get("/load")?;
    let names: Vec<String> = status.shards.iter().map(|s| s.name.clone()).collect();
    let id = |name: &str| names.iter().position(|n| n == name);
    let shards = status
        .shards
        .iter()
        .enumerate()
        .map(|(i, s)| ShardInfo {
            id: i,
            name: s.name.clone(),
            accepts: s.state == ShardState::Active,
            draining: s.state == ShardState::Draining,
        })
        .collect();
    let key = |t: &str| t.parse::<i64>().map(TenantKey::Int).unwrap_or_else(|_| TenantKey::Text(t.to_string()));
    let tenant_load = |t: &str| -> u64 { load.tenants.iter().find(|x| x.tenant == t).map(|x| x.micros).unwrap_or(0) };
    let bucket_count = status.placements.len() as u32;
    let mut top: BTreeMap<u64, Vec<TenantInfo>> = BTreeMap::new();
    // The biggest tenants by bytes and the busiest by time: whale candidates.
    for t in &sizes.tenants {
        top.entry(u64::from(t.bucket)).or_default().push(TenantInfo {
            tenant: key(&t.tenant),
            bytes: t.bytes,
            load: tenant_load(&t.tenant),
        });
    }
    for t in &load.tenants {
        let k = key(&t.tenant);
        let b = shardgate_directory::hash::bucket_of(&k, bucket_count.max(1)) as u64;
        let list = top.entry(b).or_default();
        if !list.iter().any(|x| x.tenant == k) {
            list.push(TenantInfo { tenant: k, bytes: 0, load: t.micros });
        }
    }
    let mut buckets = Vec::new();
    for (b, placed) in status.placements.iter().enumerate() {
        let shard = id(placed).context("a placement names an unknown shard")?;
        let bytes = sizes.buckets.get(b).map(|x| x.bytes).unwrap_or(0);
        let mut tenants = top.remove(&(b as u64)).unwrap_or_default();
        match strategy {
            Strategy::Load => tenants.sort_by_key(|x| std::cmp::Reverse(x.load)),
            _ => tenants.sort_by_key(|x| std::cmp::Reverse(x.bytes)),
        }
        let load = load.buckets.get(b).map(|x| x.micros).unwrap_or(0);
        buckets.push(BucketInfo { bucket: b as u32, shard, bytes, load, top_tenants: tenants });
    }
    let mut pins = Vec::new();
    for (tenant, shard) in &status.pins {
        let bytes = sizes.pins.iter().find(|x| &x.tenant == tenant).map(|x| x.bytes).unwrap_or(0);
        if let Some(shard) = id(shard) {
            let k = key(tenant);
            let bucket = shardgate_directory::hash::bucket_of(&k, bucket_count.max(1));
            pins.push(PinInfo { tenant: k, bucket, shard, bytes, load: tenant_load(tenant) });
        }
    }
    Ok((Input { shards, buckets, pins }, names))
}

fn unit(strategy: Strategy, v: u64) -> String {
    match strategy {
        Strategy::Size => crate::status::human_bytes(v),
        Strategy::Load => format!("{:.1}s", v as f64 / 1e6),
        Strategy::Count => format!("{v} buckets"),
    }
}

fn subject_text(s: &Subject) -> String {
    match s {
        Subject::Bucket { bucket } => format!("bucket {bucket}"),
        Subject::Tenant { tenant } => format!("tenant {tenant}"),
    }
}

fn print_plan(plan: &Plan, names: &[String]) {
    let name = |i: usize| names.get(i).map(String::as_str).unwrap_or("?");
    let s = plan.strategy;
    if plan.moves.is_empty() {
        println!("no moves: the shards are as even as moving whole buckets can make them");
    } else {
        println!("{:<4} {:<16} {:<12} {:<12} {:>10} {:>9}  why", "#", "move", "from", "to", "size", "load");
        for (i, m) in plan.moves.iter().enumerate() {
            println!(
                "{:<4} {:<16} {:<12} {:<12} {:>10} {:>9}  {}",
                i + 1,
                subject_text(&m.subject),
                name(m.from),
                name(m.to),
                crate::status::human_bytes(m.bytes),
                format!("{:.1}s", m.load as f64 / 1e6),
                m.reason
            );
        }
    }
    let line = |label: &str, sp: &planner::Spread| {
        let per: Vec<String> = sp.per_shard.iter().map(|(i, v)| format!("{} {}", name(*i), unit(s, *v))).collect();
        println!("{label:<7} max {}  min {}  cv {:.3}   ({})", unit(s, sp.max), unit(s, sp.min), sp.cv, per.join(", "));
    };
    println!("spread by {}:", format!("{s:?}").to_lowercase());
    line("before", &plan.before);
    line("after", &plan.after);
}

/// Checks that the shard named `name` is the one at `url` (`shard add` run again).
pub fn same_shard(api: &Api, name: &str, url: &str) -> Result<()> {
    let status: Status = api.get("/status")?;
    let Some(shard) = status.shards.iter().find(|s| s.name == name) else { bail!("no shard named {name:?}") };
    let have = shard.url.as_str();
    // The directory keeps the URL as the admin API normalised it.
    let want = shardgate_router::backend::ShardAddress::from_url(url).map(|a| a.display_url()).unwrap_or_default();
    if have != want {
        bail!("a shard named {name} exists already at {have}; choose another name");
    }
    if shard.state != ShardState::Active {
        bail!("shard {name} is {}; it takes no buckets", shard.state.name());
    }
    Ok(())
}

/// `shardgate rebalance`.
pub fn run(api: &Api, args: &Args) -> Result<()> {
    let (input, names) = gather(api, args.strategy)?;
    let plan =
        planner::plan(&input, &Options { strategy: args.strategy, max_moves: args.max_moves, ..Default::default() });
    if args.json {
        println!("{}", serde_json::to_string_pretty(&plan)?);
    } else {
        print_plan(&plan, &names);
    }
    if !args.apply {
        if !plan.moves.is_empty() && !args.json {
            println!("dry run: nothing moved; run again with --apply to make these moves");
        }
        return Ok(());
    }
    apply(api, &plan.moves, &names, args.concurrency)
}

/// `shardgate shard drain NAME`: marks the shard draining, moves every bucket and
/// pinned tenant off it, then marks it removed.
pub fn drain(api: &Api, shard: &str, concurrency: usize) -> Result<()> {
    let _: Outcome = api.post("/shards/drain", &ShardName { name: shard.to_string() })?;
    println!("shard {shard} is draining: no new placements go there");
    // Moves off the shard that an earlier, interrupted drain started finish on
    // their own (automatic cutover and completion): wait for them, then plan
    // what is left.
    let moves: Vec<MoveStatus> = api.get("/moves")?;
    let earlier: Vec<u64> = moves.iter().filter(|m| m.source == shard && !m.ended()).map(|m| m.id).collect();
    if !earlier.is_empty() {
        let list: Vec<String> = earlier.iter().map(u64::to_string).collect();
        println!("waiting for move(s) {} off {shard}, started earlier", list.join(", "));
        apply_after(api, &[], &[], concurrency, earlier)?;
    }
    let (input, names) = gather(api, Strategy::Size)?;
    let Some(me) = names.iter().position(|n| n == shard) else { bail!("no shard named {shard:?}") };
    let plan =
        planner::plan(&input, &Options { strategy: Strategy::Size, max_moves: usize::MAX, ..Default::default() });
    let off: Vec<PlannedMove> = plan.moves.into_iter().filter(|m| m.from == me && m.reason == "drain").collect();
    println!("{} bucket(s) and pinned tenant(s) to move off {shard}", off.len());
    apply(api, &off, &names, concurrency)?;
    let _: Outcome = api
        .post("/shards/remove", &ShardName { name: shard.to_string() })
        .with_context(|| format!("shard {shard} is empty of buckets but could not be marked removed"))?;
    println!("shard {shard} is drained and removed; its Postgres server holds no routed data now");
    Ok(())
}

/// Runs `moves` at most `concurrency` at a time, each with an automatic cutover
/// and then cleanup, printing a line whenever one of them changes. Moves already
/// under way for the same rows (an earlier, interrupted run) are waited for.
pub fn apply(api: &Api, moves: &[PlannedMove], names: &[String], concurrency: usize) -> Result<()> {
    apply_after(api, moves, names, concurrency, Vec::new())
}

/// [`apply`], also waiting for the moves `running` already under way.
fn apply_after(
    api: &Api,
    moves: &[PlannedMove],
    names: &[String],
    concurrency: usize,
    mut running: Vec<u64>,
) -> Result<()> {
    let started = Instant::now();
    let mut queue: Vec<&PlannedMove> = moves.iter().rev().collect();
    let mut last: BTreeMap<u64, String> = BTreeMap::new();
    let mut done = 0;
    while !queue.is_empty() || !running.is_empty() {
        while running.len() < concurrency.max(1) {
            let Some(m) = queue.pop() else { break };
            let to = names.get(m.to).cloned().unwrap_or_default();
            let (bucket, tenant) = match &m.subject {
                Subject::Bucket { bucket } => (Some(*bucket), None),
                Subject::Tenant { tenant } => (None, Some(tenant.clone())),
            };
            let body = NewMove { bucket, tenant, to: to.clone(), cutover_auto: true, complete_auto: true };
            match api.post("/moves", &body) {
                Ok(out) => {
                    let id = crate::moves::created_id(&out)?;
                    println!(
                        "[{:>6.1}s] move {id}: {} → {to}",
                        started.elapsed().as_secs_f64(),
                        subject_text(&m.subject)
                    );
                    running.push(id);
                }
                Err(e) if e.to_string().contains("is already on shard") => {
                    // An earlier, interrupted run's move got there meanwhile.
                    println!(
                        "[{:>6.1}s] {} is on {to} already",
                        started.elapsed().as_secs_f64(),
                        subject_text(&m.subject)
                    );
                }
                Err(e) if e.to_string().contains("max_concurrent") => {
                    // The cluster's own limit on concurrent moves: try again later.
                    queue.push(m);
                    break;
                }
                Err(e) if e.to_string().contains("already moving") => match under_way(api, &m.subject)? {
                    Some(id) if running.contains(&id) => {}
                    Some(id) => {
                        println!(
                            "[{:>6.1}s] {} is already moving (move {id}): waiting for it",
                            started.elapsed().as_secs_f64(),
                            subject_text(&m.subject)
                        );
                        running.push(id);
                    }
                    None => {
                        // A move of a tenant in this bucket (or of this tenant's
                        // bucket) is under way: start this one after it.
                        queue.push(m);
                        break;
                    }
                },
                Err(e) => return Err(e.context(format!("could not start the move of {}", subject_text(&m.subject)))),
            }
        }
        std::thread::sleep(Duration::from_millis(300));
        let all: Vec<MoveStatus> = patiently(|| api.get("/moves"))?;
        let mut still = Vec::new();
        for id in running {
            let Some(m) = all.iter().find(|m| m.id == id) else {
                bail!("move {id} disappeared from the directory");
            };
            let line = crate::moves::progress_line(m);
            if last.get(&id) != Some(&line) {
                println!("[{:>6.1}s] {line}", started.elapsed().as_secs_f64());
                last.insert(id, line);
            }
            let note = m.note.as_deref().unwrap_or("");
            match m.phase {
                MovePhase::Done => done += 1,
                MovePhase::Failed | MovePhase::Cancelled => bail!(
                    "move {id} ended {}: {note}; the moves that finished stay; fix the cause and run the command again",
                    m.phase.name()
                ),
                MovePhase::Reverse if m.request.is_none() => {
                    let complete = MoveRequestBody { id, request: MoveAction::Complete, force: false };
                    patiently(|| api.post::<_, Outcome>("/moves/request", &complete))?;
                    still.push(id);
                }
                MovePhase::Shadow | MovePhase::DualWrite if crate::moves::stopped_before_cutover(m) => bail!(
                    "move {id} stopped before its cutover: {note}; look at `shardgate status`, then cut it over or cancel it by hand"
                ),
                _ => still.push(id),
            }
        }
        running = still;
    }
    println!("[{:>6.1}s] {done} move(s) done", started.elapsed().as_secs_f64());
    Ok(())
}

/// Retries an admin call for a few seconds: a directory election in the middle
/// of a long rebalance must not end it.
fn patiently<T>(mut call: impl FnMut() -> Result<T>) -> Result<T> {
    let started = Instant::now();
    loop {
        match call() {
            Ok(v) => return Ok(v),
            Err(e) if started.elapsed() < Duration::from_secs(15) => {
                tracing::debug!(error = %e, "admin call failed; retrying");
                std::thread::sleep(Duration::from_millis(500));
            }
            Err(e) => return Err(e),
        }
    }
}

/// The id of the move under way for exactly `subject`, if there is one.
fn under_way(api: &Api, subject: &Subject) -> Result<Option<u64>> {
    let want = subject_text(subject);
    let all: Vec<MoveStatus> = api.get("/moves")?;
    Ok(all.iter().find(|m| m.subject == want && !m.ended()).map(|m| m.id))
}
