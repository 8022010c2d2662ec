//! The driver matrix (docs/compatibility.md): each client driver does what its
//! users do through a router on two shards, and the rows it wrote are then
//! checked on the shards directly, where the directory says they belong.
//!
//! Every driver works on one table, `items`, for two tenants, one on each
//! shard, with the same rows (`check_placement` below, `tests/drivers/python/common.py`
//! and its siblings define them): id 1 by a prepared statement, 2 rolled back,
//! 3 committed in a transaction on both shards, 10 and 11 a batch committed as
//! one, 12 a batch without BEGIN (asyncpg, pgjdbc), 20 to 23 batches whose last
//! row fails or that are refused (none of it stays), 30 and 31 by COPY where
//! the driver has it, 32 and 33 by binary COPY (asyncpg), 40 and 41 by
//! psycopg 3's pipeline mode.
//!
//! Each driver logs in as its own role (`app`, with a password, no superuser:
//! `[router.auth]`) over TLS with `sslmode=verify-full` against the test's
//! CA, as an application in production would.
//!
//! The scripts' drivers come from `scripts/install-deps.sh` (PyPI and npm
//! packages in `$SHARDGATE_DRIVERS`, by default `~/.cache/shardgate/drivers`;
//! pgjdbc and Ruby's pg from Debian). A missing driver fails its test.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use shardgate_router::config::{AuthConfig, AuthMethod, RouterConfig, UserConfig};
use shardgate_tests::tls::TestCa;
use shardgate_tests::{sqlstate, Harness};
use tokio_postgres::types::{ToSql, Type};

const SCHEMA: &str = "CREATE TABLE items (tenant_id bigint NOT NULL, id int NOT NULL, note text, \
    amount numeric(12,2), flag boolean, data bytea, ts timestamptz, uid uuid, score float8, doc jsonb, \
    PRIMARY KEY (tenant_id, id))";

/// Ids every driver writes and keeps (see the module comment).
const BASE_IDS: &[i32] = &[1, 3, 10, 11];
const COPY_IDS: &[i32] = &[30, 31];
const BINARY_COPY_IDS: &[i32] = &[32, 33];
const PIPELINE_IDS: &[i32] = &[40, 41];

/// How long one driver's script may take before the test calls it hung.
const SCRIPT_LIMIT: Duration = Duration::from_secs(90);

/// A router on two shards with `items` created through it, the URL the
/// drivers use, and the CA their `sslrootcert` names.
struct Matrix {
    h: Harness,
    /// `postgres://app:…@…/app?sslmode=verify-full&sslrootcert=…`.
    url: String,
    /// Holds the CA's files for the test's length.
    _ca: TestCa,
}

impl std::ops::Deref for Matrix {
    type Target = Harness;
    fn deref(&self) -> &Harness {
        &self.h
    }
}

/// The router, with TLS and clients as their own roles; `items` created
/// through it, and one tenant on each shard.
async fn start() -> (Matrix, i64, i64) {
    let ca = TestCa::new();
    let cert = ca.write("router", &ca.local_server());
    let config = RouterConfig {
        tls_cert_file: Some(cert.cert),
        tls_key_file: Some(cert.key),
        auth: Some(AuthConfig::default()),
        users: vec![UserConfig { name: "postgres".into(), auth: AuthMethod::Trust, password: None }],
        ..Default::default()
    };
    let h = Harness::start_with(2, config).await;
    let admin = h.client().await;
    admin.batch_execute(SCHEMA).await.unwrap();
    admin.batch_execute("CREATE ROLE app LOGIN PASSWORD 'app-pw'; GRANT ALL ON items TO app").await.unwrap();
    let url = format!(
        "postgres://app:app-pw@{}/app?sslmode=verify-full&sslrootcert={}",
        h.router.local_addr,
        ca.root_cert().display()
    );
    let a = h.tenants_on(0, 1)[0];
    let b = h.tenants_on(1, 1)[0];
    (Matrix { h, url, _ca: ca }, a, b)
}

/// The canonical row of (tenant `t`, id `i`), as the scripts write it.
fn note(t: i64, i: i32) -> String {
    format!("t{t} row {i}: é ' \" \\ ✓")
}

/// Checks, on each shard directly, that it holds exactly the rows of its own
/// tenant with these ids, each with every value as the driver meant it.
async fn check_placement(h: &Harness, a: i64, b: i64, ids: &[i32]) {
    for (shard, tenant) in [(0, a), (1, b)] {
        assert_eq!(h.shard_of(tenant), shard);
        let s = h.shard(shard).await;
        let got: Vec<(i64, i32)> = s
            .query("SELECT tenant_id, id FROM items ORDER BY tenant_id, id", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        let mut want: Vec<(i64, i32)> = ids.iter().map(|i| (tenant, *i)).collect();
        want.sort();
        assert_eq!(got, want, "rows on shard {shard} (tenant {tenant} lives there)");
        for &i in ids {
            let data: Vec<u8> = vec![0, 1, 255, (i % 256) as u8];
            let uid = format!("00000000-0000-4000-8000-{tenant:06}{i:06}");
            let doc = format!(r#"{{"t": {tenant}, "i": {i}}}"#);
            let bad = s
                .query_one(
                    "SELECT ARRAY[note = $3, amount = $4::text::numeric, flag = $5, data = $6, \
                     ts = '2024-01-02 03:04:05.123456+00', uid = $7::text::uuid, score = $8, doc = $9::text::jsonb] \
                     FROM items WHERE tenant_id = $1 AND id = $2",
                    &[
                        &tenant,
                        &i,
                        &note(tenant, i),
                        &format!("{i}.25"),
                        &(i % 2 == 0),
                        &data,
                        &uid,
                        &(i as f64 + 0.5),
                        &doc,
                    ],
                )
                .await
                .unwrap()
                .get::<_, Vec<Option<bool>>>(0);
            let names = ["note", "amount", "flag", "data", "ts", "uid", "score", "doc"];
            let wrong: Vec<&str> =
                names.iter().zip(&bad).filter(|(_, ok)| **ok != Some(true)).map(|(n, _)| *n).collect();
            assert!(wrong.is_empty(), "row ({tenant}, {i}) on shard {shard}: wrong {wrong:?}");
        }
        let prepared = s.query("SELECT gid FROM pg_prepared_xacts", &[]).await.unwrap();
        assert!(prepared.is_empty(), "prepared transactions left on shard {shard}");
    }
}

fn ids(parts: &[&[i32]]) -> Vec<i32> {
    parts.iter().flat_map(|p| p.iter().copied()).collect()
}

/// Where scripts/install-deps.sh keeps the PyPI and npm drivers.
fn drivers_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("SHARDGATE_DRIVERS") {
        return PathBuf::from(d);
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache"));
    cache.join("shardgate/drivers")
}

fn scripts_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("drivers")
}

/// A program the matrix needs, or a failure that says how to get it.
fn need(path: &Path, what: &str) -> PathBuf {
    assert!(path.exists(), "{what}: {} not found; run scripts/install-deps.sh", path.display());
    path.to_path_buf()
}

fn on_path(program: &str, what: &str) -> PathBuf {
    let found =
        std::env::var_os("PATH").and_then(|p| std::env::split_paths(&p).map(|d| d.join(program)).find(|p| p.is_file()));
    found.unwrap_or_else(|| panic!("{what}: {program} not on PATH; run scripts/install-deps.sh"))
}

/// Runs a driver's script (it gets the router URL and the two tenants last),
/// fails the test with its output if it fails or takes longer than SCRIPT_LIMIT.
async fn run(mut cmd: Command, h: &Matrix, a: i64, b: i64) {
    cmd.args([h.url.clone(), a.to_string(), b.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let shown = format!("{cmd:?}");
    let child = cmd.spawn().unwrap_or_else(|e| panic!("start {shown}: {e}"));
    let pid = child.id() as i32;
    let out = tokio::task::spawn_blocking(move || child.wait_with_output());
    let out = match tokio::time::timeout(SCRIPT_LIMIT, out).await {
        Ok(out) => out.unwrap().unwrap(),
        Err(_) => {
            // SAFETY: kill(2) on the child this test started and has not reaped.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            panic!("{shown} did not finish in {SCRIPT_LIMIT:?}: a hang through the router");
        }
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}{stderr}");
    assert!(out.status.success(), "{shown} failed ({}):\n{stdout}\n{stderr}", out.status);
    assert!(stdout.lines().any(|l| l == "ok"), "{shown} did not finish its checks:\n{stdout}\n{stderr}");
}

fn python(script: &str) -> Command {
    let py = need(&drivers_dir().join("venv/bin/python"), "the Python drivers' virtualenv");
    let mut cmd = Command::new(py);
    cmd.arg(scripts_dir().join("python").join(script));
    cmd
}

fn node(script: &str) -> Command {
    let modules = need(&drivers_dir().join("node/node_modules"), "the JavaScript drivers");
    let mut cmd = Command::new(on_path("node", "node"));
    cmd.arg(scripts_dir().join("node").join(script)).env("SHARDGATE_DRIVERS_NODE", modules.parent().unwrap());
    cmd
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg3_prepared_binary_pipeline_copy() {
    let (h, a, b) = start().await;
    run(python("psycopg3_check.py"), &h, a, b).await;
    check_placement(&h, a, b, &ids(&[BASE_IDS, COPY_IDS, PIPELINE_IDS])).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg2_parameters_batches_copy() {
    let (h, a, b) = start().await;
    run(python("psycopg2_check.py"), &h, a, b).await;
    check_placement(&h, a, b, &ids(&[BASE_IDS, COPY_IDS])).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asyncpg_prepared_binary_executemany_copy() {
    let (h, a, b) = start().await;
    run(python("asyncpg_check.py"), &h, a, b).await;
    check_placement(&h, a, b, &ids(&[BASE_IDS, &[12], COPY_IDS, BINARY_COPY_IDS])).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlalchemy_orm_units_of_work() {
    let (h, a, b) = start().await;
    run(python("sqlalchemy_check.py"), &h, a, b).await;
    check_placement(&h, a, b, &ids(&[BASE_IDS, &[30, 31]])).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_postgres_prepared_transactions_copy() {
    let (h, a, b) = start().await;
    run(node("pg_check.mjs"), &h, a, b).await;
    check_placement(&h, a, b, &ids(&[BASE_IDS, COPY_IDS])).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_js_prepared_pipelined_copy() {
    let (h, a, b) = start().await;
    run(node("postgresjs_check.mjs"), &h, a, b).await;
    check_placement(&h, a, b, &ids(&[BASE_IDS, COPY_IDS])).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgjdbc_prepare_threshold_binary_execute_batch_copy() {
    let (h, a, b) = start().await;
    let jar = need(Path::new("/usr/share/java/postgresql.jar"), "pgjdbc (Debian's libpostgresql-jdbc-java)");
    let javac = on_path("javac", "a JDK (Debian's default-jdk-headless)");
    let classes = tempfile::tempdir().unwrap();
    let out = Command::new(javac)
        .args(["-encoding", "UTF-8", "-cp"])
        .arg(&jar)
        .arg("-d")
        .arg(classes.path())
        .arg(scripts_dir().join("java/DriverCheck.java"))
        .output()
        .expect("run javac");
    assert!(out.status.success(), "javac DriverCheck.java:\n{}", String::from_utf8_lossy(&out.stderr));
    let mut cmd = Command::new(on_path("java", "a JDK (Debian's default-jdk-headless)"));
    cmd.arg("-cp").arg(format!("{}:{}", classes.path().display(), jar.display())).arg("DriverCheck");
    run(cmd, &h, a, b).await;
    check_placement(&h, a, b, &ids(&[BASE_IDS, &[12, 23, 25, 26, 28], COPY_IDS])).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ruby_pg_prepared_binary_pipeline_copy() {
    let (h, a, b) = start().await;
    let mut cmd = Command::new(on_path("ruby", "Ruby (Debian's ruby-pg brings it)"));
    cmd.arg(scripts_dir().join("ruby/pg_check.rb"));
    run(cmd, &h, a, b).await;
    check_placement(&h, a, b, &ids(&[BASE_IDS, COPY_IDS])).await;
}

/// psql as people type into it: a transaction rolled back and one committed
/// on both shards, `\copy`, and the SQLSTATE of a failed statement in
/// `:LAST_ERROR_SQLSTATE`. (psql and pgbench in every `-M` mode: drivers.rs.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_transactions_copy_and_sqlstates() {
    let (h, a, b) = start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut copy = String::new();
    for i in COPY_IDS {
        for t in [a, b] {
            copy.push_str(&format!(
                "{t}\t{i}\t{}\t{i}.25\t{}\t\\\\x0001ff{:02x}\t2024-01-02 03:04:05.123456+00\t00000000-0000-4000-8000-{t:06}{i:06}\t{}\t{{\"t\": {t}, \"i\": {i}}}\n",
                note(t, *i).replace('\\', "\\\\"),
                if i % 2 == 0 { "t" } else { "f" },
                i % 256,
                *i as f64 + 0.5
            ));
        }
    }
    std::fs::write(dir.path().join("rows.tsv"), copy).unwrap();
    let row = |t: i64, i: i32| {
        format!(
            "({t}, {i}, '{}', {i}.25, {}, '\\x0001ff{:02x}', '2024-01-02 03:04:05.123456+00', '00000000-0000-4000-8000-{t:06}{i:06}', {}, '{{\"t\": {t}, \"i\": {i}}}')",
            note(t, i).replace('\'', "''"),
            i % 2 == 0,
            i % 256,
            i as f64 + 0.5
        )
    };
    let insert = |t: i64, i: i32| format!("INSERT INTO items VALUES {};\n", row(t, i));
    let mut script = String::from("\\set ON_ERROR_STOP 1\n");
    script += &format!("{}{}", insert(a, 1), insert(b, 1));
    script += &format!("BEGIN;\n{}{}ROLLBACK;\n", insert(a, 2), insert(b, 2));
    script += &format!("BEGIN;\n{}{}COMMIT;\n", insert(a, 3), insert(b, 3));
    // One multi-row INSERT for both shards: split, committed on both.
    script += &format!("INSERT INTO items VALUES {}, {}, {}, {};\n", row(a, 10), row(b, 10), row(a, 11), row(b, 11));
    script += &format!("\\copy items FROM '{}'\n", dir.path().join("rows.tsv").display());
    script += "\\set ON_ERROR_STOP 0\n";
    // A multi-row INSERT whose last row fails: nothing of it stays.
    script += &format!("INSERT INTO items VALUES {}, {}, {};\n", row(a, 20), row(b, 20), row(a, 1));
    script += "\\echo sqlstate :LAST_ERROR_SQLSTATE\n";
    script +=
        &format!("UPDATE items SET tenant_id = {b} WHERE tenant_id = {a};\n\\echo sqlstate :LAST_ERROR_SQLSTATE\n");
    script += "SELECT * FROM items WHERE tenant_id = 'x';\n\\echo sqlstate :LAST_ERROR_SQLSTATE\n";
    script += "SELECT count(*) FROM items WHERE id = 2;\n";
    std::fs::write(dir.path().join("check.sql"), script).unwrap();
    let psql = on_path("psql", "psql (postgresql-client-15)");
    let url = h.url.clone();
    let file = dir.path().join("check.sql");
    let out = tokio::task::spawn_blocking(move || {
        Command::new(psql).args([url.as_str(), "-X", "-A", "-t", "-q", "-f"]).arg(file).output().expect("run psql")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "psql failed:\n{stdout}\n{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines, ["sqlstate 23505", "sqlstate 0A000", "sqlstate 22P02", "0"], "psql said:\n{stdout}\n{stderr}");
    check_placement(&h, a, b, &ids(&[BASE_IDS, COPY_IDS])).await;
}

/// The canonical timestamp of every row.
fn ts() -> std::time::SystemTime {
    std::time::UNIX_EPOCH + Duration::from_micros(1_704_164_645_123_456)
}

fn uid(t: i64, i: i32) -> uuid::Uuid {
    uuid::Uuid::parse_str(&format!("00000000-0000-4000-8000-{t:06}{i:06}")).unwrap()
}

/// tokio-postgres: every statement prepared, parameters and results binary;
/// a transaction rolled back and one committed on both shards; a batch as
/// pipelined queries in a transaction; COPY in text and binary
/// (`BinaryCopyInWriter`); SQLSTATEs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokio_postgres_prepared_binary_pipelined_copy() {
    use futures::SinkExt;
    let (h, a, b) = start().await;
    let mut c = h.client().await;
    // tokio-postgres has no numeric or jsonb type without extra crates: those two go as text.
    let insert = c
        .prepare(
            "INSERT INTO items (tenant_id, id, note, amount, flag, data, ts, uid, score, doc) \
             VALUES ($1, $2, $3, $4::text::numeric, $5, $6, $7, $8, $9, $10::text::jsonb)",
        )
        .await
        .unwrap();
    let select = c
        .prepare("SELECT note, amount::text, flag, data, ts, uid, score, doc::text FROM items WHERE tenant_id = $1 AND id = $2")
        .await
        .unwrap();
    let values = |t: i64, i: i32| {
        (
            t,
            i,
            note(t, i),
            format!("{i}.25"),
            i % 2 == 0,
            vec![0u8, 1, 255, (i % 256) as u8],
            uid(t, i),
            i as f64 + 0.5,
            format!(r#"{{"t": {t}, "i": {i}}}"#),
        )
    };
    // An owned future per insert, so that several can be in flight at once.
    macro_rules! exec {
        ($client:expr, $t:expr, $i:expr) => {{
            let v = values($t, $i);
            let (client, insert) = (&$client, &insert);
            async move {
                let ts = ts();
                client.execute(insert, &[&v.0, &v.1, &v.2, &v.3, &v.4, &v.5, &ts, &v.6, &v.7, &v.8]).await
            }
        }};
    }
    let check_row = |r: &tokio_postgres::Row, t: i64, i: i32| {
        let v = values(t, i);
        assert_eq!(r.get::<_, String>(0), v.2);
        assert_eq!(r.get::<_, String>(1), v.3);
        assert_eq!(r.get::<_, bool>(2), v.4);
        assert_eq!(r.get::<_, Vec<u8>>(3), v.5);
        assert_eq!(r.get::<_, std::time::SystemTime>(4), ts());
        assert_eq!(r.get::<_, uuid::Uuid>(5), v.6);
        assert_eq!(r.get::<_, f64>(6), v.7);
        let doc: serde_json::Value = serde_json::from_str(&r.get::<_, String>(7)).unwrap();
        assert_eq!(doc, serde_json::from_str::<serde_json::Value>(&v.8).unwrap());
    };
    for t in [a, b] {
        assert_eq!(exec!(c, t, 1).await.unwrap(), 1);
        for _ in 0..3 {
            check_row(&c.query_one(&select, &[&t, &1i32]).await.unwrap(), t, 1);
        }
    }
    // Rolled back (dropped without commit) and committed, both shards.
    let tx = c.transaction().await.unwrap();
    exec!(tx, a, 2).await.unwrap();
    exec!(tx, b, 2).await.unwrap();
    tx.rollback().await.unwrap();
    let tx = c.transaction().await.unwrap();
    exec!(tx, a, 3).await.unwrap();
    exec!(tx, b, 3).await.unwrap();
    tx.commit().await.unwrap();
    // A batch: the inserts pipelined on the connection (sent before any answer), in one transaction.
    let tx = c.transaction().await.unwrap();
    let done = futures::future::join_all([(a, 10), (b, 10), (a, 11), (b, 11)].map(|(t, i)| exec!(tx, t, i))).await;
    assert!(done.iter().all(|r| matches!(r, Ok(1))), "{done:?}");
    tx.commit().await.unwrap();
    let tx = c.transaction().await.unwrap();
    let done = futures::future::join_all([(a, 20), (b, 20), (b, 21), (a, 1)].map(|(t, i)| exec!(tx, t, i))).await;
    let codes: Vec<String> = done.iter().filter_map(|r| r.as_ref().err().map(sqlstate)).collect();
    assert_eq!(codes, ["23505"], "{done:?}");
    // COMMIT of a failed transaction rolls it back (Postgres answers ROLLBACK, no error).
    tx.commit().await.unwrap();
    // COPY FROM STDIN in text and in binary, rows of both shards.
    let sink = c
        .copy_in("COPY items (tenant_id, id, note, amount, flag, data, ts, uid, score, doc) FROM STDIN")
        .await
        .unwrap();
    futures::pin_mut!(sink);
    for i in COPY_IDS {
        for t in [a, b] {
            let v = values(t, *i);
            let line = format!(
                "{t}\t{i}\t{}\t{}\t{}\t\\\\x{}\t2024-01-02 03:04:05.123456+00\t{}\t{}\t{}\n",
                v.2.replace('\\', "\\\\"),
                v.3,
                if v.4 { "t" } else { "f" },
                v.5.iter().map(|b| format!("{b:02x}")).collect::<String>(),
                v.6,
                v.7,
                v.8
            );
            sink.send(bytes::Bytes::from(line)).await.unwrap();
        }
    }
    assert_eq!(sink.finish().await.unwrap(), 4);
    let sink = c
        .copy_in("COPY items (tenant_id, id, note, amount, flag, data, ts, uid, score, doc) FROM STDIN (FORMAT binary)")
        .await
        .unwrap();
    let types = [
        Type::INT8,
        Type::INT4,
        Type::TEXT,
        Type::NUMERIC,
        Type::BOOL,
        Type::BYTEA,
        Type::TIMESTAMPTZ,
        Type::UUID,
        Type::FLOAT8,
        Type::JSONB,
    ];
    let writer = tokio_postgres::binary_copy::BinaryCopyInWriter::new(sink, &types);
    futures::pin_mut!(writer);
    for i in BINARY_COPY_IDS {
        for t in [a, b] {
            let v = values(t, *i);
            // numeric `i.25`: two base-10000 digits, weight 0, positive, scale 2.
            let amount = [2i16, 0, 0, 2, *i as i16, 2500].iter().flat_map(|d| d.to_be_bytes()).collect();
            let doc = [&[1u8][..], v.8.as_bytes()].concat();
            let (amount, doc, ts) = (Binary(amount), Binary(doc), ts());
            let row: [&(dyn ToSql + Sync); 10] = [&v.0, &v.1, &v.2, &amount, &v.4, &v.5, &ts, &v.6, &v.7, &doc];
            writer.as_mut().write(&row).await.unwrap();
        }
    }
    assert_eq!(writer.finish().await.unwrap(), 4);
    // Errors with their SQLSTATE; the connection goes on.
    assert_eq!(sqlstate(&exec!(c, b, 1).await.unwrap_err()), "23505");
    let moved = c.execute("UPDATE items SET tenant_id = $1 WHERE tenant_id = $2", &[&b, &a]).await;
    assert_eq!(sqlstate(&moved.unwrap_err()), "0A000");
    // A key bound as text in the binary format, its type left to the server.
    let key_as_text =
        c.query("SELECT id FROM items WHERE tenant_id = $1::text::bigint AND id = 1", &[&a.to_string()]).await;
    assert_eq!(key_as_text.unwrap().len(), 1);
    let bad = c.simple_query("SELECT * FROM items WHERE tenant_id = 'x'").await;
    assert_eq!(sqlstate(&bad.unwrap_err()), "22P02");
    let all: Vec<(i64, i32)> = c
        .query("SELECT tenant_id, id FROM items ORDER BY tenant_id, id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let mut want: Vec<(i64, i32)> = [a, b]
        .iter()
        .flat_map(|t| ids(&[BASE_IDS, COPY_IDS, BINARY_COPY_IDS]).into_iter().map(move |i| (*t, i)))
        .collect();
    want.sort();
    assert_eq!(all, want, "rows through the router");
    for t in [a, b] {
        for i in [3, 10, 30, 32] {
            check_row(&c.query_one(&select, &[&t, &i]).await.unwrap(), t, i);
        }
    }
    check_placement(&h, a, b, &ids(&[BASE_IDS, COPY_IDS, BINARY_COPY_IDS])).await;
}

/// A value already in Postgres's binary form, for the types tokio-postgres
/// has none of without extra crates (numeric, jsonb).
#[derive(Debug)]
struct Binary(Vec<u8>);

impl ToSql for Binary {
    fn to_sql(
        &self,
        _: &Type,
        out: &mut bytes::BytesMut,
    ) -> Result<tokio_postgres::types::IsNull, Box<dyn std::error::Error + Sync + Send>> {
        out.extend_from_slice(&self.0);
        Ok(tokio_postgres::types::IsNull::No)
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    tokio_postgres::types::to_sql_checked!();
}

/// sqlx: its statement cache (named prepared statements), binary parameters
/// and results of every type including numeric (rust_decimal), timestamptz
/// (chrono) and jsonb; transactions; a batch in one transaction; COPY
/// (copy_in_raw); SQLSTATEs; QueryBuilder's multi-row insert.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlx_prepared_binary_transactions_copy() {
    use sqlx::{Connection, Row};
    let (h, a, b) = start().await;
    let mut c = sqlx::PgConnection::connect(&h.url()).await.expect("sqlx connects through the router");
    let ts: sqlx::types::chrono::DateTime<sqlx::types::chrono::Utc> = "2024-01-02T03:04:05.123456Z".parse().unwrap();
    let amount = |i: i32| sqlx::types::Decimal::new(i as i64 * 100 + 25, 2);
    let doc = |t: i64, i: i32| serde_json::json!({"t": t, "i": i});
    const INSERT: &str = "INSERT INTO items (tenant_id, id, note, amount, flag, data, ts, uid, score, doc) \
                          VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)";
    let insert = |t: i64, i: i32| {
        sqlx::query(INSERT)
            .bind(t)
            .bind(i)
            .bind(note(t, i))
            .bind(amount(i))
            .bind(i % 2 == 0)
            .bind(vec![0u8, 1, 255, (i % 256) as u8])
            .bind(ts)
            .bind(uid(t, i))
            .bind(i as f64 + 0.5)
            .bind(sqlx::types::Json(doc(t, i)))
    };
    let sqlstate = |e: sqlx::Error| e.as_database_error().and_then(|d| d.code()).map(|c| c.to_string());
    for t in [a, b] {
        assert_eq!(insert(t, 1).execute(&mut c).await.unwrap().rows_affected(), 1);
    }
    let select = "SELECT note, amount, flag, data, ts, uid, score, doc FROM items WHERE tenant_id = $1 AND id = $2";
    for t in [a, b] {
        for i in [1] {
            for _ in 0..3 {
                let r = sqlx::query(select).bind(t).bind(i).fetch_one(&mut c).await.unwrap();
                assert_eq!(r.get::<String, _>(0), note(t, i));
                assert_eq!(r.get::<sqlx::types::Decimal, _>(1), amount(i));
                assert_eq!(r.get::<bool, _>(2), i % 2 == 0);
                assert_eq!(r.get::<Vec<u8>, _>(3), vec![0u8, 1, 255, (i % 256) as u8]);
                assert_eq!(r.get::<sqlx::types::chrono::DateTime<sqlx::types::chrono::Utc>, _>(4), ts);
                assert_eq!(r.get::<uuid::Uuid, _>(5), uid(t, i));
                assert_eq!(r.get::<f64, _>(6), i as f64 + 0.5);
                assert_eq!(r.get::<sqlx::types::Json<serde_json::Value>, _>(7).0, doc(t, i));
            }
        }
    }
    // Rolled back (explicitly) and committed, both shards.
    let mut tx = c.begin().await.unwrap();
    insert(a, 2).execute(&mut *tx).await.unwrap();
    insert(b, 2).execute(&mut *tx).await.unwrap();
    tx.rollback().await.unwrap();
    let mut tx = c.begin().await.unwrap();
    insert(a, 3).execute(&mut *tx).await.unwrap();
    insert(b, 3).execute(&mut *tx).await.unwrap();
    tx.commit().await.unwrap();
    // A batch in one transaction; one whose last row fails leaves nothing.
    let mut tx = c.begin().await.unwrap();
    for (t, i) in [(a, 10), (b, 10), (a, 11), (b, 11)] {
        insert(t, i).execute(&mut *tx).await.unwrap();
    }
    tx.commit().await.unwrap();
    let mut tx = c.begin().await.unwrap();
    let mut failed = None;
    for (t, i) in [(a, 20), (b, 20), (b, 21), (a, 1)] {
        if let Err(e) = insert(t, i).execute(&mut *tx).await {
            failed = sqlstate(e);
            break;
        }
    }
    assert_eq!(failed.as_deref(), Some("23505"));
    tx.rollback().await.unwrap();
    // QueryBuilder's multi-row insert for tenants on two shards: each shard
    // gets its rows, committed together, or none of them.
    let multi_row = |rows: [(i64, i32); 2]| {
        let mut qb = sqlx::QueryBuilder::new("INSERT INTO items (tenant_id, id) ");
        qb.push_values(rows, |mut row, (t, i)| {
            row.push_bind(t).push_bind(i);
        });
        qb
    };
    assert_eq!(multi_row([(a, 22), (b, 22)]).build().execute(&mut c).await.unwrap().rows_affected(), 2);
    let e = multi_row([(a, 24), (b, 1)]).build().execute(&mut c).await.unwrap_err();
    assert_eq!(sqlstate(e).as_deref(), Some("23505"));
    for id in [22, 24] {
        let on_shards: Vec<i64> = {
            let mut n = Vec::new();
            for s in 0..2 {
                let row = h.shard(s).await.query_one("SELECT count(*) FROM items WHERE id = $1", &[&id]).await.unwrap();
                n.push(row.get(0));
            }
            n
        };
        assert_eq!(on_shards, if id == 22 { [1, 1] } else { [0, 0] }, "rows with id {id}");
    }
    sqlx::query("DELETE FROM items WHERE id = 22 AND tenant_id = ANY($1)")
        .bind(vec![a, b])
        .execute(&mut c)
        .await
        .unwrap();
    // COPY FROM STDIN, text format, rows of both shards.
    let mut copy = c
        .copy_in_raw("COPY items (tenant_id, id, note, amount, flag, data, ts, uid, score, doc) FROM STDIN")
        .await
        .unwrap();
    for i in COPY_IDS {
        for t in [a, b] {
            let line = format!(
                "{t}\t{i}\t{}\t{}\t{}\t\\\\x0001ff{:02x}\t2024-01-02 03:04:05.123456+00\t{}\t{}\t{}\n",
                note(t, *i).replace('\\', "\\\\"),
                amount(*i),
                if i % 2 == 0 { "t" } else { "f" },
                i % 256,
                uid(t, *i),
                *i as f64 + 0.5,
                doc(t, *i)
            );
            copy.send(line.as_bytes()).await.unwrap();
        }
    }
    assert_eq!(copy.finish().await.unwrap(), 4);
    // Errors with their SQLSTATE; the connection goes on.
    assert_eq!(sqlstate(insert(a, 1).execute(&mut c).await.unwrap_err()).as_deref(), Some("23505"));
    let moved =
        sqlx::query("UPDATE items SET tenant_id = $1 WHERE tenant_id = $2").bind(b).bind(a).execute(&mut c).await;
    assert_eq!(sqlstate(moved.unwrap_err()).as_deref(), Some("0A000"));
    let all: Vec<(i64, i32)> =
        sqlx::query_as("SELECT tenant_id, id FROM items ORDER BY tenant_id, id").fetch_all(&mut c).await.unwrap();
    let mut want: Vec<(i64, i32)> =
        [a, b].iter().flat_map(|t| ids(&[BASE_IDS, COPY_IDS]).into_iter().map(move |i| (*t, i))).collect();
    want.sort();
    assert_eq!(all, want, "rows through the router");
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM items").fetch_one(&mut c).await.unwrap();
    assert_eq!(n, want.len() as i64);
    c.close().await.unwrap();
    check_placement(&h, a, b, &ids(&[BASE_IDS, COPY_IDS])).await;
}
