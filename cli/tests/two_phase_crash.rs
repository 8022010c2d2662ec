//! Bank transfers across shards through two routers in two processes, while
//! the routers really crash at every step of two-phase commit and a shard
//! restarts (docs/transactions.md).
//!
//! Twelve accounts of 1000, four on each of three shards. Eight workers, four
//! on each router, move money between accounts on different shards, each
//! transfer one transaction block that also writes a ledger row on both
//! accounts under the transfer's id. Meanwhile router 1 aborts (like
//! `kill -9`) at each two-phase fault point in turn, restarted each time;
//! router 2 is killed with SIGKILL; shard 0 stops at once and starts again.
//! A transfer whose COMMIT got no answer is "unknown": it may or may not have
//! committed, but only as a whole.
//!
//! Once the load stops and the recovery sweeps have settled every prepared
//! transaction, the shards themselves must show: no money made or lost, every
//! ledger entry a complete pair (no half-applied transfer), every
//! acknowledged transfer applied exactly once, nothing applied that was
//! refused or never committed, and every balance equal to 1000 plus its
//! ledger entries.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use shardgate_localpg::{Shutdown, TestCluster};
use tokio_postgres::{Client, NoTls, Statement};

const SHARDS: usize = 3;
const ACCOUNTS_PER_SHARD: usize = 4;
const OPENING: i64 = 1000;
const WORKERS_PER_ROUTER: usize = 4;
/// Transfers each router acknowledges between two events: the load goes on
/// through both.
const STEP: u64 = 50;
/// The fault points router 1 crashes at, one per run, in this order.
const FAULT_POINTS: [&str; 3] = ["twophase.after_prepare", "twophase.after_decision", "twophase.after_first_commit"];

/// A router process the test crashes and restarts, always with the same
/// configuration.
struct Router {
    config: PathBuf,
    proc: Option<Proc>,
}

impl Router {
    fn spawn(&mut self, env: &[(&str, &str)]) {
        self.proc = Some(spawn_with(&self.config, env));
    }

    fn ready(&mut self) {
        ready(self.proc.as_mut().expect("spawned"));
    }

    fn start(&mut self, env: &[(&str, &str)]) {
        tokio::task::block_in_place(|| {
            self.spawn(env);
            self.ready();
        });
    }

    /// Waits for the process to exit on its own (a fault point fired).
    async fn exited(&mut self, what: &str) -> ExitStatus {
        let child = &mut self.proc.as_mut().expect("started").child;
        let started = Instant::now();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            assert!(started.elapsed() < Duration::from_secs(30), "the router still runs 30 s after arming {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGKILL, and the status it left.
    fn kill(&mut self) -> ExitStatus {
        let child = &mut self.proc.as_mut().expect("started").child;
        child.kill().unwrap();
        child.wait().unwrap()
    }
}

fn env_refs(env: &[(String, String)]) -> Vec<(&str, &str)> {
    env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

/// One transfer: `amount` from account `from` to account `to`.
#[derive(Debug, Clone, Copy)]
struct Transfer {
    id: i64,
    /// The router it went through: 1 or 2.
    router: usize,
    from: i64,
    to: i64,
    amount: i64,
}

/// What each worker's transfers came to.
#[derive(Default)]
struct Outcomes {
    /// COMMIT answered: committed.
    acked: Vec<Transfer>,
    /// COMMIT got no answer (the router died, or it could not ask the decider
    /// shard): committed everywhere or nowhere.
    unknown: Vec<Transfer>,
    /// COMMIT answered with an error that says nothing was committed.
    refused: Vec<(Transfer, String)>,
    /// A statement before COMMIT failed (lock timeout, a router or shard gone):
    /// COMMIT was never sent.
    not_committed: Vec<(Transfer, String)>,
}

/// A worker's connection to its router, its statements prepared.
struct Conn {
    client: Client,
    update: Statement,
    insert: Statement,
}

async fn connect(url: &str) -> Result<Conn, tokio_postgres::Error> {
    let mut config = tokio_postgres::Config::from_str(url)?;
    config.connect_timeout(Duration::from_secs(5));
    let (client, connection) = config.connect(NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    // A `SET` reaches every shard the session's transactions reach: a lock
    // wait behind a transaction left prepared fails instead of lasting.
    client.batch_execute("SET lock_timeout = '10s'").await?;
    let update = client.prepare("UPDATE acct SET bal = bal + $2 WHERE tenant_id = $1").await?;
    let insert = client.prepare("INSERT INTO ledger (tenant_id, transfer_id, amount) VALUES ($1, $2, $3)").await?;
    Ok(Conn { client, update, insert })
}

enum Done {
    Committed,
    Unknown,
    Refused(String),
    /// A statement before COMMIT failed (`why`); `broken`: the connection is
    /// no longer usable.
    NotCommitted {
        broken: bool,
        why: String,
    },
}

async fn transfer(c: &Conn, t: Transfer) -> Done {
    // Rows locked in one order (the smaller tenant id first) by every
    // transfer: no deadlock across shards, which neither shard could see.
    let (debit, credit) = ((t.from, -t.amount), (t.to, t.amount));
    let (first, second) = if t.from < t.to { (debit, credit) } else { (credit, debit) };
    let statements = async {
        c.client.batch_execute("BEGIN").await?;
        for (tenant, delta) in [first, second] {
            let n = c.client.execute(&c.update, &[&tenant, &delta]).await?;
            assert_eq!(n, 1, "transfer {}: the update of account {tenant} changed {n} rows", t.id);
            c.client.execute(&c.insert, &[&tenant, &t.id, &delta]).await?;
        }
        Ok::<(), tokio_postgres::Error>(())
    };
    if let Err(e) = statements.await {
        let broken = c.client.is_closed() || c.client.batch_execute("ROLLBACK").await.is_err();
        let why = match e.as_db_error() {
            Some(db) => format!("{}: {}", db.code().code(), db.message()),
            None => e.to_string(),
        };
        return Done::NotCommitted { broken, why };
    }
    match c.client.batch_execute("COMMIT").await {
        Ok(()) => Done::Committed,
        Err(e) => match e.as_db_error() {
            None => Done::Unknown,
            // The decider's answer was lost and its shard could not be asked
            // (docs/transactions.md): the one error that leaves it open.
            Some(db) if db.message().contains("cannot ask it what it decided") => Done::Unknown,
            Some(db) => Done::Refused(format!("{}: {}", db.code().code(), db.message())),
        },
    }
}

/// Transfers between accounts on different shards until `stop`, through the
/// router at `url`, reconnecting whenever the connection breaks.
async fn worker(
    w: usize,
    router: usize,
    url: String,
    accounts: Arc<Vec<(i64, usize)>>,
    ids: Arc<AtomicI64>,
    acked: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) -> Outcomes {
    let mut out = Outcomes::default();
    let mut rng: u64 = 0x9E37_79B9_7F4A_7C15 ^ (w as u64 + 1).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut conn: Option<Conn> = None;
    while !stop.load(Ordering::SeqCst) {
        let Some(c) = &conn else {
            match connect(&url).await {
                Ok(c) => conn = Some(c),
                // The router is down (crashed, not restarted yet): try again shortly.
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
            continue;
        };
        let (from, from_shard) = accounts[next() as usize % accounts.len()];
        let others: Vec<i64> = accounts.iter().filter(|(_, s)| *s != from_shard).map(|(t, _)| *t).collect();
        let to = others[next() as usize % others.len()];
        let t = Transfer { id: ids.fetch_add(1, Ordering::SeqCst), router, from, to, amount: 1 + (next() % 50) as i64 };
        // A transfer waits at most the lock timeout per statement and a few
        // seconds for the commit: one that lasts a minute is stuck.
        let done = tokio::time::timeout(Duration::from_secs(60), transfer(c, t))
            .await
            .unwrap_or_else(|_| panic!("transfer {t:?} through {url} got no answer within 60 s"));
        match done {
            Done::Committed => {
                out.acked.push(t);
                acked.fetch_add(1, Ordering::SeqCst);
            }
            Done::Unknown => {
                out.unknown.push(t);
                conn = None;
            }
            Done::Refused(why) => out.refused.push((t, why)),
            Done::NotCommitted { broken, why } => {
                out.not_committed.push((t, why));
                if broken {
                    conn = None;
                }
            }
        }
    }
    out
}

/// Waits until router `r` acknowledged `n` more transfers.
async fn progress(acked: &[Arc<AtomicU64>], r: usize, n: u64, what: &str) {
    let from = acked[r].load(Ordering::SeqCst);
    let started = Instant::now();
    while acked[r].load(Ordering::SeqCst) < from + n {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "router {} acknowledged {} transfers in 60 s {what}",
            r + 1,
            acked[r].load(Ordering::SeqCst) - from
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The prepared transactions on every shard (all of them, not only
/// shardgate's).
async fn prepared(pg: &TestCluster) -> Vec<String> {
    let mut out = Vec::new();
    for (i, s) in pg.servers().iter().enumerate() {
        let c = s.connect("app").await.unwrap();
        for r in c.query("SELECT gid FROM pg_prepared_xacts", &[]).await.unwrap() {
            out.push(format!("shard_{i}: {}", r.get::<_, String>(0)));
        }
    }
    out
}

/// How many prepared transactions the routers' recovery sweeps committed and
/// rolled back, from their logs (every run of each process appends to its log).
fn settled_by_sweeps(dir: &Path) -> (usize, usize) {
    let (mut commits, mut rollbacks) = (0, 0);
    for id in 1..=3 {
        let log = std::fs::read_to_string(dir.join(format!("node{id}.log"))).unwrap_or_default();
        for line in log.lines().filter(|l| l.contains("settled an in-doubt prepared transaction")) {
            if line.contains("ROLLBACK") {
                rollbacks += 1;
            } else if line.contains("COMMIT") {
                commits += 1;
            }
        }
    }
    (commits, rollbacks)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfers_across_shards_stay_all_or_nothing_when_routers_crash_at_every_commit_step_and_a_shard_restarts() {
    let started = Instant::now();
    let pg = TestCluster::start(SHARDS).await.unwrap();
    let urls = pg.urls();
    // Three directory nodes, so that either router may die while the other
    // keeps its lease (a quorum of two); the third takes no clients, but its
    // recovery sweep runs like every router's.
    let (dir, _logs, ports) = three_nodes("two-phase-crash");
    let configs: Vec<PathBuf> = (1..=3u64).map(|id| write_config(&dir, id, &ports, &urls)).collect();
    let once = dir.join("faults-fired");
    std::fs::create_dir_all(&once).unwrap();
    let once_dir = once.display().to_string();
    let armed = |point: &str| {
        vec![
            ("SHARDGATE_FAULTS".to_string(), format!("{point}=crash")),
            ("SHARDGATE_FAULTS_ONCE_DIR".into(), once_dir.clone()),
        ]
    };

    let mut routers =
        [Router { config: configs[0].clone(), proc: None }, Router { config: configs[1].clone(), proc: None }];
    let mut third = Router { config: configs[2].clone(), proc: None };
    // All three at once: a node is ready once the directory has a leader.
    let first_env = armed(FAULT_POINTS[0]);
    tokio::task::block_in_place(|| {
        routers[0].spawn(&env_refs(&first_env));
        routers[1].spawn(&[]);
        third.spawn(&[]);
        routers[0].ready();
        routers[1].ready();
        third.ready();
    });
    let urls_of: Vec<String> =
        ports[..2].iter().map(|p| format!("postgres://postgres@127.0.0.1:{}/app", p.router)).collect();

    // Set up through router 2: router 1 crashes at its first commit across shards.
    let setup = shardgate_tests::connect(&urls_of[1]).await;
    setup
        .batch_execute(
            "CREATE TABLE acct (tenant_id bigint, id int, bal bigint NOT NULL, PRIMARY KEY (tenant_id, id)); \
             CREATE TABLE ledger (tenant_id bigint, transfer_id bigint, amount bigint, PRIMARY KEY (tenant_id, transfer_id))",
        )
        .await
        .unwrap();
    let mut shards = Vec::new();
    for s in pg.servers() {
        shards.push(s.connect("app").await.unwrap());
    }
    // Accounts for tenants 1, 2, … each kept only while its shard (where its
    // row landed) has fewer than four.
    let mut accounts: Vec<(i64, usize)> = Vec::new();
    let mut per_shard = [0usize; SHARDS];
    for t in 1i64.. {
        if per_shard.iter().all(|n| *n == ACCOUNTS_PER_SHARD) {
            break;
        }
        assert!(t < 1000, "no tenants land on some shard: {per_shard:?}");
        setup.execute("INSERT INTO acct VALUES ($1, 1, $2)", &[&t, &OPENING]).await.unwrap();
        let mut landed = Vec::new();
        for (i, s) in shards.iter().enumerate() {
            if !s.query("SELECT 1 FROM acct WHERE tenant_id = $1", &[&t]).await.unwrap().is_empty() {
                landed.push(i);
            }
        }
        assert_eq!(landed.len(), 1, "tenant {t}'s account is on one shard: {landed:?}");
        let shard = landed[0];
        if per_shard[shard] < ACCOUNTS_PER_SHARD {
            per_shard[shard] += 1;
            accounts.push((t, shard));
        } else {
            setup.execute("DELETE FROM acct WHERE tenant_id = $1", &[&t]).await.unwrap();
        }
    }
    drop((shards, setup));
    let accounts = Arc::new(accounts);
    let shard_of: HashMap<i64, usize> = accounts.iter().copied().collect();

    let stop = Arc::new(AtomicBool::new(false));
    let ids = Arc::new(AtomicI64::new(1));
    let acked: Vec<Arc<AtomicU64>> = (0..2).map(|_| Arc::new(AtomicU64::new(0))).collect();
    let mut workers = Vec::new();
    for w in 0..2 * WORKERS_PER_ROUTER {
        let r = w % 2;
        let task = worker(w, r + 1, urls_of[r].clone(), accounts.clone(), ids.clone(), acked[r].clone(), stop.clone());
        workers.push(tokio::spawn(task));
    }

    // Router 1 crashes at each step of two-phase commit, the first time one of
    // its sessions gets there, and comes back with the next step armed.
    let mut crashes = Vec::new();
    for (i, point) in FAULT_POINTS.iter().enumerate() {
        let status = routers[0].exited(point).await;
        assert!(!status.success(), "router 1 exited cleanly at {point}: {status:?}");
        assert!(once.join(point).exists(), "router 1 exited ({status:?}) but not at {point}");
        crashes.push(format!("router 1 at {point}: {status}"));
        let next = FAULT_POINTS.get(i + 1).map(|p| armed(p)).unwrap_or_default();
        routers[0].start(&env_refs(&next));
    }
    progress(&acked, 0, STEP, "after its last restart").await;
    progress(&acked, 1, STEP, "after router 1's crashes").await;

    // Router 2 killed in the middle of the load, and restarted.
    let status = routers[1].kill();
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{status:?}");
    crashes.push(format!("router 2 killed: {status}"));
    progress(&acked, 0, STEP, "while router 2 was down").await;
    routers[1].start(&[]);
    progress(&acked, 1, STEP, "after its restart").await;

    // Shard 0 stops at once, as if it crashed, and starts again: what it had
    // prepared survives the restart and is settled after it.
    tokio::task::block_in_place(|| {
        pg.servers()[0].stop_with(Shutdown::Immediate).unwrap();
        pg.servers()[0].start_again().unwrap();
    });
    progress(&acked, 0, STEP, "after shard 0 restarted").await;
    progress(&acked, 1, STEP, "after shard 0 restarted").await;

    stop.store(true, Ordering::SeqCst);
    let mut all = Outcomes::default();
    for w in workers {
        let o = w.await.expect("worker");
        all.acked.extend(o.acked);
        all.unknown.extend(o.unknown);
        all.refused.extend(o.refused);
        all.not_committed.extend(o.not_committed);
    }

    // The sweeps settle every prepared transaction a crash left: none stays.
    let settling = Instant::now();
    loop {
        let left = prepared(&pg).await;
        if left.is_empty() {
            break;
        }
        assert!(settling.elapsed() < Duration::from_secs(30), "still prepared 30 s after the load stopped: {left:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let settled_in = settling.elapsed();

    // What the shards hold, read on each shard directly.
    let mut balances: BTreeMap<i64, i64> = BTreeMap::new();
    let mut ledger: BTreeMap<i64, Vec<(i64, i64)>> = BTreeMap::new();
    // Every way the shards disagree with the transfers, listed before failing:
    // one bug usually shows in several.
    let mut problems = Vec::new();
    for (i, s) in pg.servers().iter().enumerate() {
        let c = s.connect("app").await.unwrap();
        for r in c.query("SELECT tenant_id, bal FROM acct", &[]).await.unwrap() {
            let (t, bal): (i64, i64) = (r.get(0), r.get(1));
            if shard_of.get(&t) != Some(&i) || balances.insert(t, bal).is_some() {
                problems.push(format!("account {t} found (again) on shard_{i}"));
            }
        }
        for r in c.query("SELECT tenant_id, transfer_id, amount FROM ledger", &[]).await.unwrap() {
            let (t, id, amount): (i64, i64, i64) = (r.get(0), r.get(1), r.get(2));
            if shard_of.get(&t) != Some(&i) {
                problems.push(format!("ledger row of account {t} (transfer {id}) found on shard_{i}"));
            }
            ledger.entry(id).or_default().push((t, amount));
        }
    }
    let total: i64 = balances.values().sum();
    if balances.len() != accounts.len() || total != OPENING * accounts.len() as i64 {
        problems.push(format!("{} accounts hold {total}, money made or lost: {balances:?}", balances.len()));
    }

    // Every ledger entry is a whole transfer, the one a worker sent, a debit
    // and a credit of the same amount, and only if its COMMIT was sent and
    // not refused.
    let outcome: HashMap<i64, (&str, Transfer)> = [
        ("acknowledged", &all.acked),
        ("unknown", &all.unknown),
        ("refused at COMMIT", &all.refused.iter().map(|(t, _)| *t).collect()),
        ("failed before COMMIT", &all.not_committed.iter().map(|(t, _)| *t).collect()),
    ]
    .into_iter()
    .flat_map(|(what, ts)| ts.iter().map(move |t| (t.id, (what, *t))))
    .collect();
    for (id, rows) in &ledger {
        let mut rows = rows.clone();
        rows.sort_by_key(|(_, amount)| *amount);
        match outcome.get(id) {
            None => problems.push(format!("transfer {id} is no transfer a worker sent: {rows:?}")),
            Some(("acknowledged" | "unknown", t)) if rows == [(t.from, -t.amount), (t.to, t.amount)] => {}
            Some((what, t)) => {
                let why = all.not_committed.iter().chain(&all.refused).find(|(n, _)| n.id == *id).map(|(_, w)| w);
                problems.push(format!("{what} transfer {t:?} applied as {rows:?} ({why:?})"))
            }
        }
    }
    for t in &all.acked {
        if !ledger.contains_key(&t.id) {
            problems.push(format!("acknowledged transfer lost: {t:?}"));
        }
    }
    // Each balance is its opening plus its ledger entries.
    let mut expected: BTreeMap<i64, i64> = accounts.iter().map(|(t, _)| (*t, OPENING)).collect();
    for rows in ledger.values() {
        for (t, amount) in rows {
            *expected.entry(*t).or_default() += amount;
        }
    }
    if balances != expected {
        problems.push(format!("balances {balances:?} but the ledger says {expected:?}"));
    }

    let unknown_applied = all.unknown.iter().filter(|t| ledger.contains_key(&t.id)).count();
    let (sweep_commits, sweep_rollbacks) = settled_by_sweeps(&dir);
    // Why transfers failed before COMMIT, by SQLSTATE (or the client's own
    // error when the connection broke).
    let mut failures: BTreeMap<&str, usize> = BTreeMap::new();
    for (_, why) in &all.not_committed {
        *failures.entry(why.split(':').next().unwrap_or(why)).or_default() += 1;
    }
    eprintln!(
        "{} transfers acknowledged ({} through router 1), {} unknown ({} of them applied), {} refused at COMMIT, {} failed before COMMIT; \
         {} applied in all; the sweeps committed {} and rolled back {} prepared transactions, none was left \
         prepared {:.1} s after the load stopped; {:.0} s in all\ncrashes: {crashes:?}\nrefused: {:?}\nfailed before COMMIT: {failures:?}",
        all.acked.len(),
        all.acked.iter().filter(|t| t.router == 1).count(),
        all.unknown.len(),
        unknown_applied,
        all.refused.len(),
        all.not_committed.len(),
        ledger.len(),
        sweep_commits,
        sweep_rollbacks,
        settled_in.as_secs_f64(),
        started.elapsed().as_secs_f64(),
        all.refused.iter().map(|(_, why)| why).take(5).collect::<Vec<_>>(),
    );
    assert!(problems.is_empty(), "{} problems:\n{}", problems.len(), problems.join("\n"));
    // A crash after the decision leaves a prepared part only a sweep can
    // commit; a crash after PREPARE, one only a sweep can roll back.
    assert!(
        sweep_commits >= 1 && sweep_rollbacks >= 1,
        "the sweeps settled what the crashes left: {sweep_commits} commits, {sweep_rollbacks} rollbacks"
    );
    drop(third);
    drop(routers);
    let _ = std::fs::remove_dir_all(&dir);
}

/// What the checker above caught while a shard restarted: a transaction
/// whose next shard cannot be reached must fail as a whole. Its part on the
/// first shard used to be dropped back into the router's pool inside its
/// open transaction (the session looked idle), and the next transaction on
/// that connection committed it: half a transfer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_that_cannot_join_a_transaction_fails_it_and_leaves_no_part_open() {
    let h = shardgate_tests::Harness::start(2).await;
    let (a, b) = (h.tenants_on(0, 1)[0], h.tenants_on(1, 1)[0]);
    let c = h.client().await;
    c.batch_execute("CREATE TABLE acct (tenant_id bigint, id int, bal bigint NOT NULL, PRIMARY KEY (tenant_id, id))")
        .await
        .unwrap();
    for t in [a, b] {
        c.execute("INSERT INTO acct VALUES ($1, 1, $2)", &[&t, &OPENING]).await.unwrap();
    }
    // Bounded waits: a part left open holds its row locks, and this test
    // must fail, not hang, if one is.
    c.batch_execute("SET lock_timeout = '5s'").await.unwrap();
    // Prepared while both shards answer: the router describes a statement
    // on any shard.
    let update = c.prepare("UPDATE acct SET bal = bal + $2 WHERE tenant_id = $1").await.unwrap();
    tokio::task::block_in_place(|| h.shard_server(1).stop().unwrap());
    c.batch_execute("BEGIN").await.unwrap();
    c.execute(&update, &[&a, &-10i64]).await.unwrap();
    let e = c.execute(&update, &[&b, &10i64]).await.unwrap_err();
    assert_eq!(shardgate_tests::sqlstate(&e), "08006", "{e:?}");
    let e = c.execute(&update, &[&a, &-10i64]).await.unwrap_err();
    assert_eq!(shardgate_tests::sqlstate(&e), "25P02", "the transaction failed as a whole: {e:?}");
    c.batch_execute("ROLLBACK").await.unwrap();
    tokio::task::block_in_place(|| h.shard_server(1).start_again().unwrap());

    let shard0 = h.shard(0).await;
    let open: i64 = shard0
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = 'app' AND state LIKE 'idle in transaction%'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(open, 0, "a part of the rolled back transaction is still open on shard 0");
    // Transactions on the first shard's pooled connections commit only their own.
    for _ in 0..3 {
        c.batch_execute("BEGIN").await.unwrap();
        c.execute(&update, &[&a, &1i64]).await.unwrap();
        c.batch_execute("COMMIT").await.unwrap();
    }
    let bal: i64 = shard0.query_one("SELECT bal FROM acct WHERE tenant_id = $1", &[&a]).await.unwrap().get(0);
    assert_eq!(bal, OPENING + 3);
}
