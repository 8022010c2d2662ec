//! Random sessions of extended-protocol messages, sent byte for byte to the
//! router (one shard) and straight to Postgres: the client sees the same
//! replies from both, message for message, and the table ends the same.
//!
//! Each case is a session of pipelines (each ending in Sync, some with Flush
//! before it) drawn from Parse of named and unnamed statements, parsed again
//! with another text (after Close, or without it for Postgres's 42P05), Bind
//! with text or binary parameters to named and unnamed portals, Describe,
//! Execute with and without a row limit, Close, and simple-query BEGIN,
//! COMMIT and ROLLBACK between pipelines; with errors on purpose (unknown
//! statements and portals, wrong parameter counts, duplicate keys, binary
//! parameters of the wrong size).
//!
//! The router's side runs in database `app` through the router; the direct
//! side in a database `mirror` of its own on the same Postgres, holding the
//! same table and rows. Both are reset before each case. Replies are
//! compared as the client reads them, but for what legitimately differs:
//! errors by SQLSTATE only (the router names the shard in its texts),
//! RowDescription without table OIDs and column numbers, no notices or
//! parameter status; and the differences the router is known to have
//! ([`known_difference`]).
//!
//! A case's seed replays it: `SHARDGATE_PIPELINE_SEED=S` runs the cases of
//! seeds S, S+1, …; `SHARDGATE_PIPELINE_CASES=N` sets how many (a long run);
//! `SHARDGATE_PIPELINE_FAILURES=N` minimizes and reports up to N differing
//! cases instead of one. A difference is reported with the seed, the case's
//! messages and a minimized sequence that still differs.

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use shardgate_tests::raw::{
    bind_portal, close_portal, close_statement, describe_columns, describe_portal_named, describe_statement,
    execute_portal, flush, parse, query, sync, Raw,
};
use shardgate_tests::Harness;
use tokio_postgres::Client;

/// The first seed of the cases every run tries; one case in three besides
/// starts from a seed taken from the clock, so that runs cover new ground.
const CI_SEED: u64 = 20260101;

/// Cases in a default run: about 20 s on two idle cores.
const CI_CASES: u64 = 500;

/// The time a minimization may take before it reports what it has.
const MINIMIZE_FOR: Duration = Duration::from_secs(120);

const TABLE: &str = "CREATE TABLE t (tenant_id bigint, id bigint, v int, note text, PRIMARY KEY (tenant_id, id))";

/// The rows each case starts from: tenants 1 and 2 (both on the one shard).
const RESET: &str = "TRUNCATE t; INSERT INTO t VALUES (1, 1, 10, 'a'), (1, 2, 20, NULL), (1, 3, 30, 'c'), \
                     (2, 1, 40, 'd'), (2, 2, 50, 'e')";

/// The statements a Parse may name: each keyed by a tenant (`tenant_id = $1`
/// or a literal), with its parameters' types when given (all int8: a binary
/// int8 fits each of them; left unspecified, `v`'s is int4, and a binary
/// int8 for it is refused). Their rows come in an order of their own: those
/// an UPDATE or DELETE returns come in the order of the table's pages, which
/// differs between the two databases, so several are sorted in a SELECT of
/// their own.
const TEXTS: &[(&str, usize)] = &[
    ("INSERT INTO t VALUES ($1, $2, $3)", 3),
    ("INSERT INTO t (tenant_id, id, v, note) VALUES ($1, $2, 7, 'new')", 2),
    ("INSERT INTO t (tenant_id, id, v) VALUES (1, $1, $2) RETURNING id, v", 2),
    ("INSERT INTO t VALUES ($1, $2, 0) ON CONFLICT (tenant_id, id) DO UPDATE SET v = t.v + 100 RETURNING id, v", 2),
    ("UPDATE t SET v = v + 1 WHERE tenant_id = $1 AND id = $2", 2),
    (
        "WITH u AS (UPDATE t SET note = 'upd' WHERE tenant_id = 1 AND id <= $1 RETURNING id, v, note) \
         SELECT * FROM u ORDER BY id",
        1,
    ),
    ("DELETE FROM t WHERE tenant_id = $1 AND id = $2", 2),
    ("UPDATE t SET v = v * 2 WHERE tenant_id = $1 AND id = $2 RETURNING v, note", 2),
    ("WITH d AS (DELETE FROM t WHERE tenant_id = 1 AND id > $1 RETURNING id) SELECT id FROM d ORDER BY id DESC", 1),
    ("DELETE FROM t WHERE tenant_id = $1 AND id = $2 RETURNING id, v", 2),
    ("SELECT id, v, note FROM t WHERE tenant_id = $1 ORDER BY id", 1),
    ("SELECT id, v FROM t WHERE tenant_id = 1 AND id >= $1 ORDER BY id DESC", 1),
    ("SELECT count(*), sum(v) FROM t WHERE tenant_id = $1", 1),
    ("SELECT v, note FROM t WHERE tenant_id = $1 AND id = $2", 2),
    ("SELECT id, v FROM t WHERE tenant_id = 1 ORDER BY v DESC, id", 0),
];

const STATEMENTS: [&str; 3] = ["", "a", "b"];
const PORTALS: [&str; 2] = ["", "p"];

/// How a Parse gives its parameters' types.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Types {
    /// None given (the server infers them).
    Omitted,
    /// One 0 (unspecified) per parameter.
    Zeros,
    /// int8 for each.
    Int8,
}

#[derive(Clone, Debug, PartialEq)]
enum Msg {
    Parse {
        name: &'static str,
        text: usize,
        types: Types,
    },
    Bind {
        portal: &'static str,
        statement: &'static str,
        params: Vec<i64>,
        binary: bool,
        binary_results: bool,
    },
    DescribeStatement(&'static str),
    DescribePortal(&'static str),
    Execute {
        portal: &'static str,
        limit: i32,
    },
    CloseStatement(&'static str),
    ClosePortal(&'static str),
    /// A Flush; `wait`: the client reads the replies it owes before going on
    /// (asyncpg's Parse, Describe, Flush), else it sends the rest at once.
    Flush {
        wait: bool,
    },
    Sync,
}

#[derive(Clone, Debug, PartialEq)]
enum Step {
    /// Extended-protocol messages, the last one a Sync.
    Pipeline(Vec<Msg>),
    /// A simple query.
    Query(&'static str),
}

impl Msg {
    fn bytes(&self) -> Vec<u8> {
        match self {
            Msg::Parse { name, text, types } => {
                let n = TEXTS[*text].1;
                let types = match types {
                    Types::Omitted => vec![],
                    Types::Zeros => vec![0; n],
                    Types::Int8 => vec![20; n],
                };
                parse(name, TEXTS[*text].0, &types)
            }
            Msg::Bind { portal, statement, params, binary, binary_results } => {
                bind_portal(portal, statement, params, *binary, if *binary_results { &[1] } else { &[] })
            }
            Msg::DescribeStatement(name) => describe_statement(name),
            Msg::DescribePortal(name) => describe_portal_named(name),
            Msg::Execute { portal, limit } => execute_portal(portal, *limit),
            Msg::CloseStatement(name) => close_statement(name),
            Msg::ClosePortal(name) => close_portal(name),
            Msg::Flush { .. } => flush(),
            Msg::Sync => sync(),
        }
    }
}

impl fmt::Display for Msg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Msg::Parse { name, text, types } => {
                let types = match types {
                    Types::Omitted => "no types".to_string(),
                    Types::Zeros => format!("types {:?}", vec![0; TEXTS[*text].1]),
                    Types::Int8 => format!("types {:?}", vec![20; TEXTS[*text].1]),
                };
                write!(f, "Parse {name:?} {:?} ({types})", TEXTS[*text].0)
            }
            Msg::Bind { portal, statement, params, binary, binary_results } => {
                write!(f, "Bind portal {portal:?} to {statement:?} params {params:?}")?;
                if *binary {
                    write!(f, " as binary int8")?;
                }
                if *binary_results {
                    write!(f, ", results in binary")?;
                }
                Ok(())
            }
            Msg::DescribeStatement(name) => write!(f, "Describe statement {name:?}"),
            Msg::DescribePortal(name) => write!(f, "Describe portal {name:?}"),
            Msg::Execute { portal, limit: 0 } => write!(f, "Execute {portal:?}"),
            Msg::Execute { portal, limit } => write!(f, "Execute {portal:?} at most {limit} rows"),
            Msg::CloseStatement(name) => write!(f, "Close statement {name:?}"),
            Msg::ClosePortal(name) => write!(f, "Close portal {name:?}"),
            Msg::Flush { wait: true } => write!(f, "Flush (and read the replies so far)"),
            Msg::Flush { wait: false } => write!(f, "Flush"),
            Msg::Sync => write!(f, "Sync"),
        }
    }
}

/// A case's steps, one message a line.
fn show(steps: &[Step]) -> String {
    let mut out = String::new();
    for (i, step) in steps.iter().enumerate() {
        match step {
            Step::Query(sql) => out.push_str(&format!("  step {i}: Query {sql:?}\n")),
            Step::Pipeline(msgs) => {
                out.push_str(&format!("  step {i}: pipeline\n"));
                for m in msgs {
                    out.push_str(&format!("    {m}\n"));
                }
            }
        }
    }
    out
}

/// What the generator knows of the session, to draw mostly meaningful
/// messages (it does not follow errors: a statement it thinks defined may
/// not be, which is one more error on purpose).
struct Drawing<'r> {
    rng: &'r mut StdRng,
    /// Statements defined, by name: their texts.
    defined: BTreeMap<&'static str, usize>,
    /// Portals bound in this pipeline (or kept by a transaction block).
    portals: Vec<&'static str>,
    in_block: bool,
}

impl Drawing<'_> {
    fn value(&mut self) -> i64 {
        *[1, 1, 1, 2, 2, 3, 4, 5, 9].get(self.rng.gen_range(0..9)).unwrap()
    }

    fn parse(&mut self, out: &mut Vec<Msg>, name: &'static str) {
        if !name.is_empty() && self.defined.contains_key(name) && self.rng.gen_bool(0.75) {
            // A named statement is parsed again only after its Close (else 42P05).
            out.push(Msg::CloseStatement(name));
            self.defined.remove(name);
        }
        let text = self.rng.gen_range(0..TEXTS.len());
        let types = [Types::Omitted, Types::Zeros, Types::Int8, Types::Int8][self.rng.gen_range(0..4)];
        out.push(Msg::Parse { name, text, types });
        self.defined.entry(name).or_insert(text);
        if name.is_empty() {
            self.defined.insert(name, text);
        }
        if self.rng.gen_bool(0.2) {
            out.push(Msg::DescribeStatement(name));
        }
    }

    /// A Bind of `statement`, then (mostly) its Executes.
    fn bind(&mut self, out: &mut Vec<Msg>, statement: &'static str) {
        let wanted = self.defined.get(statement).map_or(1, |t| TEXTS[*t].1);
        let count = match self.rng.gen_range(0..20) {
            // The wrong number of parameters.
            0 => wanted + 1,
            1 if wanted > 0 => wanted - 1,
            _ => wanted,
        };
        let params = (0..count).map(|_| self.value()).collect();
        let portal = PORTALS[self.rng.gen_range(0..PORTALS.len())];
        let binary = self.rng.gen_bool(0.3);
        let binary_results = self.rng.gen_bool(0.15);
        out.push(Msg::Bind { portal, statement, params, binary, binary_results });
        if !self.portals.contains(&portal) {
            self.portals.push(portal);
        }
        if self.rng.gen_bool(0.3) {
            out.push(Msg::DescribePortal(portal));
        }
        match self.rng.gen_range(0..10) {
            0 => {}
            1..=2 => {
                // Rows a few at a time, as a driver with a fetch size.
                let limit = self.rng.gen_range(1..=2);
                for _ in 0..self.rng.gen_range(1..=3) {
                    out.push(Msg::Execute { portal, limit });
                }
            }
            _ => out.push(Msg::Execute { portal, limit: 0 }),
        }
    }

    fn pipeline(&mut self) -> Vec<Msg> {
        let mut out = Vec::new();
        if !self.in_block {
            self.portals.clear();
        }
        for _ in 0..self.rng.gen_range(1..=6) {
            let name = STATEMENTS[self.rng.gen_range(0..STATEMENTS.len())];
            match self.rng.gen_range(0..100) {
                // Parse, Bind, Execute: the unnamed statement most often (a
                // driver's statement without a cache).
                0..=34 => {
                    let name = if self.rng.gen_bool(0.5) { "" } else { name };
                    self.parse(&mut out, name);
                    self.bind(&mut out, name);
                }
                // A statement defined before: a driver's cache.
                35..=59 => {
                    let known: Vec<&'static str> = self.defined.keys().copied().collect();
                    let name = if known.is_empty() || self.rng.gen_bool(0.05) {
                        name
                    } else {
                        known[self.rng.gen_range(0..known.len())]
                    };
                    self.bind(&mut out, name);
                }
                60..=67 => self.parse(&mut out, name),
                // A named statement parsed again without Close: 42P05.
                68..=70 => {
                    let text = self.rng.gen_range(0..TEXTS.len());
                    out.push(Msg::Parse { name, text, types: Types::Int8 });
                }
                71..=77 => {
                    out.push(Msg::CloseStatement(name));
                    self.defined.remove(name);
                }
                78..=81 => {
                    let portal = PORTALS[self.rng.gen_range(0..PORTALS.len())];
                    out.push(Msg::ClosePortal(portal));
                    self.portals.retain(|p| *p != portal);
                }
                82..=85 => out.push(Msg::DescribeStatement(name)),
                86..=88 => out.push(Msg::DescribePortal(PORTALS[self.rng.gen_range(0..PORTALS.len())])),
                // A portal executed again (the rest of its rows), or never bound.
                89..=92 => {
                    let portal = if !self.portals.is_empty() && self.rng.gen_bool(0.8) {
                        self.portals[self.rng.gen_range(0..self.portals.len())]
                    } else {
                        PORTALS[self.rng.gen_range(0..PORTALS.len())]
                    };
                    let limit = [0, 1][self.rng.gen_range(0..2)];
                    out.push(Msg::Execute { portal, limit });
                }
                _ => out.push(Msg::Flush { wait: self.rng.gen_bool(0.5) }),
            }
        }
        out.push(Msg::Sync);
        out
    }

    fn case(&mut self) -> Vec<Step> {
        let mut steps = Vec::new();
        for _ in 0..self.rng.gen_range(2..=7) {
            let roll = self.rng.gen_range(0..100);
            if !self.in_block && roll < 15 {
                steps.push(Step::Query("BEGIN"));
                self.in_block = true;
            } else if self.in_block && roll < 25 {
                steps.push(Step::Query(["COMMIT", "ROLLBACK"][self.rng.gen_range(0..2)]));
                self.in_block = false;
            } else if roll > 95 {
                steps.push(Step::Query("SELECT id, v FROM t WHERE tenant_id = 1 ORDER BY id"));
            }
            steps.push(Step::Pipeline(self.pipeline()));
        }
        steps
    }
}

fn case_for(seed: u64) -> Vec<Step> {
    let mut rng = StdRng::seed_from_u64(seed);
    Drawing { rng: &mut rng, defined: BTreeMap::new(), portals: Vec::new(), in_block: false }.case()
}

/// A reply as a line a person reads: the messages' kinds by name, values as
/// text, errors by SQLSTATE only (their texts may differ: a router names
/// the shard), RowDescription without table OIDs and column numbers.
fn line(tag: u8, body: &[u8]) -> Option<String> {
    let i16_at = |at: usize| i16::from_be_bytes([body[at], body[at + 1]]);
    let text = |bytes: &[u8]| {
        if bytes.iter().all(|b| (0x20..0x7f).contains(b)) {
            format!("{:?}", String::from_utf8_lossy(bytes))
        } else {
            format!("0x{}", bytes.iter().map(|b| format!("{b:02x}")).collect::<String>())
        }
    };
    Some(match tag {
        b'S' | b'N' | b'K' | b'R' => return None,
        b'1' => "ParseComplete".into(),
        b'2' => "BindComplete".into(),
        b'3' => "CloseComplete".into(),
        b'n' => "NoData".into(),
        b's' => "PortalSuspended".into(),
        b'I' => "EmptyQueryResponse".into(),
        b'E' => format!("Error {}", shardgate_tests::raw::error_code(body)),
        b'Z' => format!("ReadyForQuery {}", body[0] as char),
        b'T' => format!("RowDescription {}", describe_columns(body)),
        b't' => {
            let types: Vec<i32> = (0..i16_at(0) as usize)
                .map(|i| i32::from_be_bytes(body[2 + 4 * i..6 + 4 * i].try_into().unwrap()))
                .collect();
            format!("ParameterDescription {types:?}")
        }
        b'C' => format!("CommandComplete {}", String::from_utf8_lossy(&body[..body.len() - 1])),
        b'D' => {
            let mut at = 2;
            let mut values = Vec::new();
            for _ in 0..i16_at(0) {
                let len = i32::from_be_bytes(body[at..at + 4].try_into().unwrap());
                at += 4;
                if len < 0 {
                    values.push("NULL".to_string());
                } else {
                    values.push(text(&body[at..at + len as usize]));
                    at += len as usize;
                }
            }
            format!("DataRow ({})", values.join(", "))
        }
        other => format!("message {:?} {}", other as char, text(body)),
    })
}

/// One side's connection: its replies as lines, and whether it broke.
struct Side {
    raw: Raw,
    broken: bool,
}

impl Side {
    async fn send(&mut self, msgs: &[Vec<u8>], out: &mut Vec<String>) {
        if let Err(e) = self.raw.try_send(msgs).await {
            out.push(e);
            self.broken = true;
        }
    }

    /// The next reply's line (skipping what is not compared), or None when
    /// the connection broke or hung (said in `out`).
    async fn next(&mut self, out: &mut Vec<String>) -> Option<(u8, String)> {
        loop {
            match self.raw.try_next().await {
                Ok((tag, body)) => {
                    if let Some(l) = line(tag, &body) {
                        out.push(l.clone());
                        return Some((tag, l));
                    }
                }
                Err(e) => {
                    out.push(e);
                    self.broken = true;
                    return None;
                }
            }
        }
    }

    /// Replies up to ReadyForQuery.
    async fn until_ready(&mut self, out: &mut Vec<String>) {
        while !self.broken {
            if let Some((b'Z', _)) = self.next(out).await {
                return;
            }
        }
    }

    /// The replies a Flush-ended part of a pipeline owes, one message after
    /// the other; after an error, none (the server skips to the Sync).
    /// Returns whether an error came.
    async fn owed(&mut self, part: &[&Msg], out: &mut Vec<String>) -> bool {
        for m in part {
            let replies = match m {
                Msg::Flush { .. } | Msg::Sync => 0,
                Msg::DescribeStatement(_) => 2,
                Msg::Execute { .. } => usize::MAX,
                _ => 1,
            };
            let mut got = 0;
            while got < replies {
                let Some((tag, _)) = self.next(out).await else { return true };
                if tag == b'E' {
                    return true;
                }
                got += 1;
                // An Execute's replies end with CommandComplete,
                // PortalSuspended or EmptyQueryResponse.
                if matches!(m, Msg::Execute { .. }) && matches!(tag, b'C' | b's' | b'I') {
                    break;
                }
                // A Describe of a statement that returns no rows: NoData
                // after its ParameterDescription, which is counted.
            }
        }
        false
    }

    async fn step(&mut self, step: &Step) -> Vec<String> {
        let mut out = Vec::new();
        if self.broken {
            return vec!["(connection gone)".into()];
        }
        match step {
            Step::Query(sql) => {
                self.send(&[query(sql)], &mut out).await;
                self.until_ready(&mut out).await;
            }
            Step::Pipeline(msgs) => {
                let mut part: Vec<&Msg> = Vec::new();
                let mut failed = false;
                for m in msgs {
                    part.push(m);
                    if let Msg::Flush { wait: true } = m {
                        let bytes: Vec<Vec<u8>> = part.iter().map(|m| m.bytes()).collect();
                        self.send(&bytes, &mut out).await;
                        if !failed && !self.broken {
                            failed = self.owed(&part, &mut out).await;
                        }
                        out.push("(flushed)".into());
                        part.clear();
                    }
                }
                let bytes: Vec<Vec<u8>> = part.iter().map(|m| m.bytes()).collect();
                self.send(&bytes, &mut out).await;
                self.until_ready(&mut out).await;
            }
        }
        out
    }
}

/// The router over one shard, and the shard's Postgres with a database of
/// the direct side's own.
struct Env {
    h: Harness,
    /// Straight to the shard: the router's database and the mirror.
    app: Client,
    mirror: Client,
}

impl Env {
    async fn start() -> Env {
        let h = Harness::start(1).await;
        h.client().await.batch_execute(TABLE).await.unwrap();
        h.shard_server(0).create_database("mirror").await.unwrap();
        let mirror = h.shard_server(0).connect("mirror").await.unwrap();
        mirror.batch_execute(TABLE).await.unwrap();
        let app = h.shard(0).await;
        for c in [&app, &mirror] {
            // A lock left by either side is an error, not a hang.
            c.batch_execute("SET lock_timeout = '10s'").await.unwrap();
        }
        Env { h, app, mirror }
    }

    /// Runs `steps` on fresh rows on both sides: the first difference, if
    /// any, as its step, what Postgres answered and what the router did.
    async fn run(&self, steps: &[Step], tally: &mut Tally) -> Option<(usize, Vec<String>, Vec<String>)> {
        for c in [&self.app, &self.mirror] {
            c.batch_execute(RESET).await.unwrap();
        }
        let mut direct = Side { raw: Raw::login_to(self.h.shard_server(0).port(), "mirror").await, broken: false };
        let mut routed = Side { raw: Raw::login(self.h.port()).await, broken: false };
        // Every case ends out of any transaction block, its rows compared.
        let end = Step::Query("ROLLBACK");
        let mut status = "ReadyForQuery I".to_string();
        for (i, step) in steps.iter().chain([&end]).enumerate() {
            let want = direct.step(step).await;
            let got = routed.step(step).await;
            tally.count(&want);
            if want != got {
                if !known_difference(step, &status, &want, &got) {
                    return Some((i, want, got));
                }
                // The sessions part ways from here, and so may the rows:
                // the case ends.
                for side in [&mut direct, &mut routed] {
                    side.step(&end).await;
                }
                return None;
            }
            status = want.iter().rev().find(|l| l.starts_with("ReadyForQuery")).cloned().unwrap_or(status);
        }
        let table = "SELECT tenant_id, id, v, note FROM t ORDER BY tenant_id, id";
        let want = self.mirror.query(table, &[]).await.unwrap();
        let got = self.app.query(table, &[]).await.unwrap();
        let show = |rows: Vec<tokio_postgres::Row>| -> Vec<String> {
            rows.iter()
                .map(|r| {
                    let (t, id, v, note): (i64, i64, i32, Option<String>) = (r.get(0), r.get(1), r.get(2), r.get(3));
                    format!("({t}, {id}, {v}, {note:?})")
                })
                .collect()
        };
        let (want, got) = (show(want), show(got));
        (want != got).then(|| (steps.len() + 1, want, got))
    }

    /// A smaller case that still differs: steps, then messages, removed one
    /// at a time while the difference stays (for as long as [`MINIMIZE_FOR`]).
    async fn minimize(&self, mut steps: Vec<Step>) -> Vec<Step> {
        let started = Instant::now();
        let mut tally = Tally::default();
        let mut smaller = true;
        while smaller && started.elapsed() < MINIMIZE_FOR {
            smaller = false;
            let mut candidates: Vec<Vec<Step>> = Vec::new();
            for i in (0..steps.len()).rev() {
                let mut c = steps.clone();
                c.remove(i);
                candidates.push(c);
            }
            for i in (0..steps.len()).rev() {
                let Step::Pipeline(msgs) = &steps[i] else { continue };
                for j in (0..msgs.len() - 1).rev() {
                    let mut shorter = msgs.clone();
                    let removed = shorter.remove(j);
                    let mut c = steps.clone();
                    c[i] = Step::Pipeline(shorter.clone());
                    candidates.push(c);
                    if let Msg::Flush { wait: true } = removed {
                        shorter.insert(j, Msg::Flush { wait: false });
                        let mut c = steps.clone();
                        c[i] = Step::Pipeline(shorter);
                        candidates.push(c);
                    }
                }
            }
            for c in candidates {
                if started.elapsed() >= MINIMIZE_FOR {
                    break;
                }
                if !c.is_empty() && self.run(&c, &mut tally).await.is_some() {
                    steps = c;
                    smaller = true;
                    break;
                }
            }
        }
        steps
    }
}

/// The differences the router is known to have, each narrowly (`status`:
/// the session's before the step):
///
/// - A Parse of a statement name in use: Postgres fails it (42P05), and the
///   pipeline with it; the router parses the name again, since its table of
///   a session's statements may hold one a pipeline across shards parsed
///   after an error, which the client parses again. (`pipelines.rs`:
///   `a_parse_of_a_statement_name_in_use_fails`, ignored.)
/// - In a transaction block that failed in the router before it reached a
///   shard, a Describe of a statement without result columns is refused
///   (25P02), where Postgres describes it: the router has no shard to ask
///   for the parameters' types, and answers as Postgres does for a
///   statement that returns rows. (`pipelines.rs`:
///   `a_statement_described_in_a_block_failed_before_any_shard_is_described`,
///   ignored.)
fn known_difference(step: &Step, status: &str, want: &[String], got: &[String]) -> bool {
    let Step::Pipeline(msgs) = step else { return false };
    matches!(msgs.first(), Some(Msg::DescribeStatement(_)))
        && status == "ReadyForQuery E"
        && want.len() >= 2
        && want[0].starts_with("ParameterDescription")
        && want[1] == "NoData"
        && got.first().map(String::as_str) == Some("Error 25P02")
        && got.last().map(String::as_str) == Some("ReadyForQuery E")
}

/// What the cases exercised, from Postgres's replies: how often each kind
/// of reply and each SQLSTATE came.
#[derive(Default)]
struct Tally {
    replies: BTreeMap<String, usize>,
}

impl Tally {
    fn count(&mut self, lines: &[String]) {
        for l in lines {
            let kind = match l.split_once(' ') {
                Some(("Error" | "ReadyForQuery", _)) => l.clone(),
                Some((kind, _)) => kind.to_string(),
                None => l.clone(),
            };
            *self.replies.entry(kind).or_default() += 1;
        }
    }
}

fn seeds() -> Vec<u64> {
    let cases = std::env::var("SHARDGATE_PIPELINE_CASES")
        .map_or(CI_CASES, |n| n.parse().expect("SHARDGATE_PIPELINE_CASES: a number"));
    if let Ok(seed) = std::env::var("SHARDGATE_PIPELINE_SEED") {
        let seed: u64 = seed.trim().parse().expect("SHARDGATE_PIPELINE_SEED: a number");
        return (seed..seed + cases).collect();
    }
    let clock = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_nanos() as u64;
    let clock = clock % 1_000_000_000 * 1000;
    let fixed = cases - cases / 3;
    (CI_SEED..CI_SEED + fixed).chain(clock..clock + cases / 3).collect()
}

/// Differing cases minimized and reported before the test fails
/// (`SHARDGATE_PIPELINE_FAILURES`, for a long run that looks for several).
fn failures_to_report() -> usize {
    std::env::var("SHARDGATE_PIPELINE_FAILURES").map_or(1, |n| n.parse().expect("SHARDGATE_PIPELINE_FAILURES"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_pipelines_answer_through_the_router_as_postgres_does() {
    let env = Env::start().await;
    let seeds = seeds();
    let started = Instant::now();
    let mut tally = Tally::default();
    let (mut messages, mut differing) = (0, 0);
    let mut reports = Vec::new();
    for seed in &seeds {
        let steps = case_for(*seed);
        messages += steps.iter().map(|s| if let Step::Pipeline(m) = s { m.len() } else { 1 }).sum::<usize>();
        let Some((at, want, got)) = env.run(&steps, &mut tally).await else { continue };
        differing += 1;
        if reports.len() >= failures_to_report() {
            continue;
        }
        let small = env.minimize(steps.clone()).await;
        let (small_at, small_want, small_got) =
            env.run(&small, &mut Tally::default()).await.unwrap_or((0, vec![], vec![]));
        let report = format!(
            "case seed {seed} (replay: SHARDGATE_PIPELINE_SEED={seed} SHARDGATE_PIPELINE_CASES=1): \
             the router answered step {at} otherwise than Postgres\n{}\
             Postgres: {want:#?}\nrouter: {got:#?}\n\
             minimized:\n{}at step {small_at}, Postgres: {small_want:#?}\nrouter: {small_got:#?}\n\
             (a step past the last is the table's rows at the end)",
            show(&steps),
            show(&small),
        );
        println!("{report}");
        reports.push(report);
    }
    println!(
        "{} cases, {messages} messages, in {:.1} s; Postgres's replies: {:?}",
        seeds.len(),
        started.elapsed().as_secs_f64(),
        tally.replies
    );
    assert!(reports.is_empty(), "{differing} of {} cases differ; the first:\n{}", seeds.len(), reports.join("\n\n"));
}
