//! Random and mutated protocol messages through live connections to a router
//! in front of real Postgres servers: each bad connection gets an error or is
//! closed, never hangs, and the other clients are served all along.
//!
//! Messages come from the frame decoder's seed corpus (recorded psql and
//! pgbench traffic, router/fuzz-corpus/frames), mutated as the unit fuzz
//! targets mutate them. `SHARDGATE_FUZZ_SECS` sets how long it runs.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::SinkExt;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use shardgate_router::fanout::value::{self, Order};
use shardgate_router::fuzz::{budget, load_corpus, mutate};
use shardgate_tests::Harness;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Client streams after the startup packet, from the recorded traffic.
fn seeds() -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../router/fuzz-corpus/frames");
    let seeds: Vec<Vec<u8>> = load_corpus(&dir)
        .into_iter()
        // The target's input: a flags byte (bit 0: startup phase), three chunk sizes, the stream.
        .filter(|(_, b)| b.len() > 4 && b[0] & 1 == 0)
        .map(|(_, b)| b[4..].to_vec())
        .collect();
    assert!(seeds.len() >= 5, "too few seeds in {}", dir.display());
    seeds
}

async fn login(addr: std::net::SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let body = b"\x00\x03\x00\x00user\0postgres\0database\0app\0\0";
    let mut startup = ((body.len() + 4) as i32).to_be_bytes().to_vec();
    startup.extend_from_slice(body);
    s.write_all(&startup).await.unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !seen.windows(6).any(|w| w == b"Z\0\0\0\x05I") {
        let n = s.read(&mut buf).await.unwrap();
        assert!(n > 0, "router closed during login");
        seen.extend_from_slice(&buf[..n]);
    }
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fuzz_mutated_messages_leave_other_clients_served() {
    let h = Harness::start(2).await;
    let setup = h.client().await;
    setup.batch_execute("CREATE TABLE kept (tenant_id bigint, id bigint, note text)").await.unwrap();
    let seeds = Arc::new(seeds());
    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicU64::new(0));

    // Well-behaved clients, one per shard, writing and reading their tenant's rows.
    let mut good = Vec::new();
    for shard in 0..2 {
        let c = h.client().await;
        let tenant = h.tenants_on(shard, 1)[0];
        let (stop, served) = (stop.clone(), served.clone());
        good.push(tokio::spawn(async move {
            let mut id = 0i64;
            while !stop.load(Ordering::Relaxed) {
                id += 1;
                c.execute("INSERT INTO kept VALUES ($1, $2, 'x')", &[&tenant, &id]).await.unwrap();
                let n: i64 =
                    c.query_one("SELECT count(*) FROM kept WHERE tenant_id = $1", &[&tenant]).await.unwrap().get(0);
                assert_eq!(n, id, "tenant {tenant} lost rows");
                served.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }

    let seed: u64 = std::env::var("SHARDGATE_FUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    eprintln!("fuzz_live seed {seed}");
    let deadline = Instant::now() + budget(Duration::from_secs(20));
    let addr = h.router.local_addr;
    let frames = Arc::new(AtomicU64::new(0));
    let mut bad = Vec::new();
    for worker in 0..4u64 {
        let (seeds, frames) = (seeds.clone(), frames.clone());
        bad.push(tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(seed ^ worker);
            let mut connections = 0;
            while Instant::now() < deadline || connections < 5 {
                connections += 1;
                let mut input = seeds[rng.gen_range(0..seeds.len())].clone();
                if rng.gen_range(0..8) == 0 {
                    input = (0..rng.gen_range(1..512)).map(|_| rng.gen()).collect();
                }
                mutate(&mut rng, &mut input, &seeds, 8192);
                frames.fetch_add(count_frames(&input), Ordering::Relaxed);
                let mut s = login(addr).await;
                // The router may close the connection before taking it all.
                let _ = s.write_all(&input).await;
                let _ = s.shutdown().await;
                let mut reply = Vec::new();
                let closed = tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut reply)).await;
                assert!(closed.is_ok(), "the router neither answered nor closed; input hex {}", hex(&input));
            }
            connections
        }));
    }
    let mut connections = 0;
    for b in bad {
        connections += b.await.unwrap();
    }
    let during = served.load(Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    for g in good {
        g.await.unwrap();
    }
    let frames = frames.load(Ordering::Relaxed);
    eprintln!("fuzz_live: {connections} connections, about {frames} frames, {during} good round trips");
    assert!(during > 0, "the good clients got nothing done");
    // Still serving, new clients included.
    let c = h.client().await;
    c.simple_query("SELECT 1").await.unwrap();
    setup.simple_query("SELECT count(*) FROM kept").await.unwrap();
}

fn run_seed(name: &str) -> u64 {
    let seed = std::env::var("SHARDGATE_FUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    eprintln!("{name} seed {seed}");
    seed
}

/// A tenant key as COPY text may write it: plainly, or each digit as an octal
/// or hex escape, which Postgres decodes before reading the number.
fn written_key(rng: &mut StdRng, tenant: i64) -> String {
    let digits = tenant.to_string();
    match rng.gen_range(0..4) {
        0 => digits,
        1 => digits.bytes().map(|d| format!("\\{:03o}", d)).collect(),
        2 => digits.bytes().map(|d| format!("\\x{:x}", d)).collect(),
        _ => format!("+{digits}"),
    }
}

/// A note and how COPY text writes it: tabs, newlines and backslashes escaped
/// by letter, or a newline escaped by a backslash before it.
fn written_note(rng: &mut StdRng) -> (String, String) {
    let mut value = String::new();
    let mut text = String::new();
    for _ in 0..rng.gen_range(0..8) {
        let (v, t) = match rng.gen_range(0..8) {
            0 => ("\t", "\\t"),
            1 => ("\n", "\\n"),
            2 => ("\n", "\\\n"),
            3 => ("\\", "\\\\"),
            4 => ("\r", "\\r"),
            5 => ("é", "é"),
            6 => ("A", "\\101"),
            _ => ("x", "x"),
        };
        value.push_str(v);
        text.push_str(t);
    }
    (value, text)
}

/// COPY text data with random keys, escapes, line ends and message cuts goes
/// through the router; each row must land on the shard that owns its key,
/// with the value Postgres reads, none lost and none added (rows after an
/// end-of-data marker are ignored, as Postgres ignores them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fuzz_copy_rows_land_on_the_shards_of_their_keys() {
    let h = Harness::start(2).await;
    let c = h.client().await;
    c.batch_execute("CREATE TABLE copied (tenant_id bigint, id bigint, note text)").await.unwrap();
    let mut rng = StdRng::seed_from_u64(run_seed("fuzz_copy"));
    let deadline = Instant::now() + budget(Duration::from_secs(20)) / 2;
    let mut rounds = 0;
    let mut next_id = 0i64;
    while rounds < 3 || Instant::now() < deadline {
        rounds += 1;
        c.batch_execute("TRUNCATE copied").await.unwrap();
        let end = ["\n", "\r\n", "\r"][rng.gen_range(0..3)];
        let mut data = String::new();
        let mut want = std::collections::BTreeMap::new();
        for _ in 0..rng.gen_range(1..200) {
            next_id += 1;
            let tenant = rng.gen_range(1..5000i64);
            let (note, note_text) = written_note(&mut rng);
            data.push_str(&format!("{}\t{next_id}\t{note_text}{end}", written_key(&mut rng, tenant)));
            want.insert(next_id, (tenant, note));
        }
        if rng.gen_range(0..3) == 0 {
            data.push_str(&format!("\\.{end}999\t1\tignored{end}"));
        }
        let sink = c.copy_in("COPY copied FROM STDIN").await.unwrap();
        futures::pin_mut!(sink);
        let mut rest = data.as_bytes();
        while !rest.is_empty() {
            let n = rng.gen_range(1..=rest.len().min(300));
            sink.send(Bytes::copy_from_slice(&rest[..n])).await.unwrap();
            rest = &rest[n..];
        }
        let copied = sink.finish().await.unwrap_or_else(|e| panic!("COPY of {data:?}: {e}"));
        assert_eq!(copied as usize, want.len(), "COPY count of {data:?}");
        let mut got = std::collections::BTreeMap::new();
        for shard in 0..2 {
            let s = h.shard(shard).await;
            for row in s.query("SELECT tenant_id, id, note FROM copied", &[]).await.unwrap() {
                let (tenant, id, note): (i64, i64, String) = (row.get(0), row.get(1), row.get(2));
                assert_eq!(h.shard_of(tenant), shard, "tenant {tenant} (row {id}) on the wrong shard, from {data:?}");
                got.insert(id, (tenant, note));
            }
        }
        assert_eq!(got, want, "rows read back differ from {data:?}");
    }
}

/// The fan-out's readers of numerics and timestamps against Postgres's own
/// text and binary output, ordering and arithmetic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fuzz_values_read_as_postgres_writes_them() {
    let h = Harness::start(1).await;
    let pg = h.shard(0).await;
    let mut rng = StdRng::seed_from_u64(run_seed("fuzz_values"));
    let deadline = Instant::now() + budget(Duration::from_secs(20)) / 2;
    let mut rounds = 0;
    let numeric = |rng: &mut StdRng| -> String {
        match rng.gen_range(0..12) {
            0 => "NaN".into(),
            1 => "Infinity".into(),
            2 => "-Infinity".into(),
            _ => {
                let int: String = (0..rng.gen_range(0..25)).map(|_| char::from(b'0' + rng.gen_range(0..10))).collect();
                let frac: String = (0..rng.gen_range(0..25)).map(|_| char::from(b'0' + rng.gen_range(0..10))).collect();
                let sign = if rng.gen() { "-" } else { "" };
                format!("{sign}{}.{frac}0", if int.is_empty() { "0" } else { &int })
            }
        }
    };
    while rounds < 3 || Instant::now() < deadline {
        rounds += 1;
        let a: Vec<String> = (0..200).map(|_| numeric(&mut rng)).collect();
        let b: Vec<String> = (0..200).map(|_| numeric(&mut rng)).collect();
        let rows = pg
            .query(
                "SELECT x::numeric::text, y::numeric::text, numeric_send(x::numeric), (x::numeric + y::numeric)::text,
                        x::numeric < y::numeric, x::numeric = y::numeric
                 FROM unnest($1::text[], $2::text[]) AS u(x, y)",
                &[&a, &b],
            )
            .await
            .unwrap();
        for r in rows {
            let (x, y, bin, sum): (String, String, Vec<u8>, String) = (r.get(0), r.get(1), r.get(2), r.get(3));
            let (less, equal): (bool, bool) = (r.get(4), r.get(5));
            assert_eq!(value::to_binary(value::NUMERIC, x.as_bytes()), Some(bin), "numeric_send({x})");
            let want = if less {
                std::cmp::Ordering::Less
            } else if equal {
                std::cmp::Ordering::Equal
            } else {
                std::cmp::Ordering::Greater
            };
            assert_eq!(value::compare_numeric(&x, &y), want, "{x} vs {y}");
            assert_eq!(value::add_decimal(&x, &y).as_deref(), Some(sum.as_str()), "{x} + {y}");
            let (gx, gy) =
                (value::group_form(value::NUMERIC, x.as_bytes()), value::group_form(value::NUMERIC, y.as_bytes()));
            assert_eq!(gx.unwrap() == gy.unwrap(), equal, "group forms of {x} and {y}");
        }
        // avg over a few values, as the fan-out computes it from sum and count.
        let n = rng.gen_range(1..6);
        let vals: Vec<String> =
            (0..n).map(|_| numeric(&mut rng)).filter(|v| !v.contains('N') && !v.contains('I')).collect();
        if !vals.is_empty() {
            let r = pg
                .query_one(
                    "SELECT sum(v::numeric)::text, count(*)::text, avg(v::numeric)::text FROM unnest($1::text[]) v",
                    &[&vals],
                )
                .await
                .unwrap();
            let (sum, count, avg): (String, String, String) = (r.get(0), r.get(1), r.get(2));
            assert_eq!(value::avg_decimal(&sum, &count).as_deref(), Some(avg.as_str()), "avg of {vals:?}");
        }
        // Dates and timestamps in DateStyle ISO, BC and five-digit years included.
        let stamps: Vec<String> = (0..100)
            .map(|_| {
                let year = match rng.gen_range(0..4) {
                    0 => rng.gen_range(1..100),
                    1 => rng.gen_range(10000..200000),
                    _ => rng.gen_range(1000..10000),
                };
                // Timestamps go back to 4713 BC.
                let era = if year < 4000 && rng.gen_range(0..4) == 0 { " BC" } else { "" };
                let frac = if rng.gen() { format!(".{}", rng.gen_range(0..1_000_000)) } else { String::new() };
                format!(
                    "{year:04}-{:02}-{:02} {:02}:{:02}:{:02}{frac}{era}",
                    rng.gen_range(1..13),
                    rng.gen_range(1..29),
                    rng.gen_range(0..24),
                    rng.gen_range(0..60),
                    rng.gen_range(0..60)
                )
            })
            .collect();
        let rows = pg
            .query(
                "SELECT t::timestamp::text, t::date::text FROM unnest($1::text[]) t ORDER BY t::timestamp",
                &[&stamps],
            )
            .await
            .unwrap();
        let texts: Vec<(String, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        for w in texts.windows(2) {
            for (a, b) in [(&w[0].0, &w[1].0), (&w[0].1, &w[1].1)] {
                assert!(value::check_sortable(Order::DateTime, a.as_bytes()).is_ok(), "{a}");
                assert_ne!(
                    value::compare(Order::DateTime, a.as_bytes(), b.as_bytes()),
                    std::cmp::Ordering::Greater,
                    "{a} after {b}"
                );
            }
        }
    }
}

/// How many whole frames a client stream holds (for the report).
fn count_frames(b: &[u8]) -> u64 {
    let (mut i, mut n) = (0usize, 0);
    while i + 5 <= b.len() {
        let len = i32::from_be_bytes([b[i + 1], b[i + 2], b[i + 3], b[i + 4]]);
        if len < 4 {
            break;
        }
        i += 1 + len as usize;
        n += 1;
    }
    n
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|c| format!("{c:02x}")).collect()
}
