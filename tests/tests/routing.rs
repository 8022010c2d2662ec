//! Statements reach the shard that holds their tenant, and only that shard.

use shardgate_router::config::RouterConfig;
use shardgate_tests::{connect, sqlstate, Harness};

const ORDERS: &str = "CREATE TABLE orders (tenant_id bigint, id bigint, total numeric, PRIMARY KEY (tenant_id, id))";

async fn rows_on(h: &Harness, shard: usize, sql: &str) -> i64 {
    h.shard(shard).await.query_one(sql, &[]).await.unwrap().get::<_, i64>(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ddl_runs_everywhere_and_rows_land_on_their_tenants_shard() {
    let h = Harness::start(2).await;
    let c = h.client().await;
    c.batch_execute(ORDERS).await.unwrap();
    for i in 0..2 {
        assert_eq!(rows_on(&h, i, "SELECT count(*) FROM pg_tables WHERE tablename = 'orders'").await, 1);
    }
    let a = h.tenants_on(0, 3);
    let b = h.tenants_on(1, 3);
    for t in a.iter().chain(&b) {
        c.simple_query(&format!("INSERT INTO orders VALUES ({t}, 1, 10.5)")).await.unwrap();
    }
    for t in &a {
        assert_eq!(rows_on(&h, 0, &format!("SELECT count(*) FROM orders WHERE tenant_id = {t}")).await, 1);
        assert_eq!(rows_on(&h, 1, &format!("SELECT count(*) FROM orders WHERE tenant_id = {t}")).await, 0);
    }
    for t in &b {
        assert_eq!(rows_on(&h, 1, &format!("SELECT count(*) FROM orders WHERE tenant_id = {t}")).await, 1);
        assert_eq!(rows_on(&h, 0, &format!("SELECT count(*) FROM orders WHERE tenant_id = {t}")).await, 0);
    }
    // UPDATE, SELECT and DELETE naming a tenant reach its rows.
    let t = b[0];
    let n = c.execute(&*format!("UPDATE orders SET total = 99 WHERE tenant_id = {t} AND id = 1"), &[]).await.unwrap();
    assert_eq!(n, 1);
    let row = c.query_one("SELECT total::text FROM orders WHERE tenant_id = $1", &[&t]).await.unwrap();
    assert_eq!(row.get::<_, String>(0), "99");
    assert_eq!(c.execute("DELETE FROM orders WHERE tenant_id = $1", &[&t]).await.unwrap(), 1);
    assert_eq!(rows_on(&h, 1, &format!("SELECT count(*) FROM orders WHERE tenant_id = {t}")).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extended_protocol_routes_by_binary_and_text_parameters() {
    let h = Harness::start(2).await;
    let c = h.client().await;
    c.batch_execute(ORDERS).await.unwrap();
    let t0 = h.tenants_on(0, 1)[0];
    let t1 = h.tenants_on(1, 1)[0];
    // tokio-postgres sends int8 parameters in binary.
    let ins = c.prepare("INSERT INTO orders (tenant_id, id, total) VALUES ($1, $2, 1)").await.unwrap();
    c.execute(&ins, &[&t0, &1i64]).await.unwrap();
    c.execute(&ins, &[&t1, &1i64]).await.unwrap();
    assert_eq!(rows_on(&h, 0, &format!("SELECT count(*) FROM orders WHERE tenant_id = {t0}")).await, 1);
    assert_eq!(rows_on(&h, 1, &format!("SELECT count(*) FROM orders WHERE tenant_id = {t1}")).await, 1);
    // int4 and text parameters map to the same bucket as the bigint.
    let r = c.query("SELECT id FROM orders WHERE tenant_id = $1::int4", &[&(t1 as i32)]).await.unwrap();
    assert_eq!(r.len(), 1);
    let r = c.query("SELECT id FROM orders WHERE tenant_id = $1::text::bigint", &[&t1.to_string()]).await.unwrap();
    assert_eq!(r.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_statements_survive_across_pooled_server_connections() {
    let h = Harness::start(1).await;
    let setup = h.client().await;
    setup.batch_execute(ORDERS).await.unwrap();
    // Many clients, each preparing once and executing many times: pooled server
    // connections are shared, so each execution may land on a connection that has
    // never seen the statement.
    let mut tasks = Vec::new();
    for k in 0..8i64 {
        let url = h.url();
        tasks.push(tokio::spawn(async move {
            let c = connect(&url).await;
            let ins = c.prepare("INSERT INTO orders VALUES ($1, $2, 0)").await.unwrap();
            let sel = c.prepare("SELECT count(*) FROM orders WHERE tenant_id = $1").await.unwrap();
            for i in 0..25i64 {
                c.execute(&ins, &[&k, &i]).await.unwrap();
                let n: i64 = c.query_one(&sel, &[&k]).await.unwrap().get(0);
                assert_eq!(n, i + 1);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_stays_on_one_shard_and_a_statement_leaving_it_is_refused() {
    // With two-phase commit off: tests/tests/two_phase.rs has it on.
    let config = RouterConfig {
        cross_shard_transactions: shardgate_router::config::CrossShard::Refuse,
        ..RouterConfig::default()
    };
    let h = Harness::start_with(2, config).await;
    let c = h.client().await;
    c.batch_execute(ORDERS).await.unwrap();
    let t0 = h.tenants_on(0, 1)[0];
    let t1 = h.tenants_on(1, 1)[0];
    c.batch_execute(&format!("BEGIN; INSERT INTO orders VALUES ({t0}, 1, 1)")).await.unwrap();
    let err = c.simple_query(&format!("INSERT INTO orders VALUES ({t1}, 1, 1)")).await.unwrap_err();
    assert_eq!(sqlstate(&err), "0A000");
    let msg = err.as_db_error().unwrap().message().to_string();
    assert!(msg.contains("shard_0") && msg.contains("shard_1"), "{msg}");
    // The transaction is aborted, as Postgres would have it.
    let err = c.simple_query("SELECT 1").await.unwrap_err();
    assert_eq!(sqlstate(&err), "25P02");
    c.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(rows_on(&h, 0, "SELECT count(*) FROM orders").await, 0);

    // A committed transaction is all there.
    let mut c = c;
    let tx = c.transaction().await.unwrap();
    tx.execute("INSERT INTO orders VALUES ($1, 1, 1)", &[&t1]).await.unwrap();
    tx.execute("INSERT INTO orders VALUES ($1, 2, 1)", &[&t1]).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(rows_on(&h, 1, "SELECT count(*) FROM orders").await, 2);
    // BEGIN; COMMIT with nothing in between never needs a shard.
    c.batch_execute("BEGIN").await.unwrap();
    c.batch_execute("COMMIT").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_row_insert_is_split_by_shard() {
    let h = Harness::start(2).await;
    let c = h.client().await;
    c.batch_execute(ORDERS).await.unwrap();
    let a = h.tenants_on(0, 2);
    let b = h.tenants_on(1, 2);
    let sql =
        format!("INSERT INTO orders VALUES ({}, 1, 1), ({}, 1, 1), ({}, 1, 1), ({}, 1, 1)", a[0], b[0], a[1], b[1]);
    let msgs = c.simple_query(&sql).await.unwrap();
    let affected = msgs
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::CommandComplete(n) => Some(*n),
            _ => None,
        })
        .unwrap();
    assert_eq!(affected, 4);
    assert_eq!(rows_on(&h, 0, "SELECT count(*) FROM orders").await, 2);
    assert_eq!(rows_on(&h, 1, "SELECT count(*) FROM orders").await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_from_stdin_sends_each_row_to_its_tenants_shard() {
    use futures::SinkExt;
    let h = Harness::start(2).await;
    let c = h.client().await;
    c.batch_execute(ORDERS).await.unwrap();
    let mut data = String::new();
    for t in 1..=200i64 {
        data.push_str(&format!("{t}\t1\t{t}.5\n"));
    }
    let sink = c
        .copy_in("COPY orders (tenant_id, id, total) FROM STDIN")
        .await
        .unwrap_or_else(|e| panic!("{:?}", e.as_db_error()));
    futures::pin_mut!(sink);
    sink.send(bytes::Bytes::from(data)).await.unwrap();
    let n = sink.finish().await.unwrap();
    assert_eq!(n, 200);
    let on0 = rows_on(&h, 0, "SELECT count(*) FROM orders").await;
    let on1 = rows_on(&h, 1, "SELECT count(*) FROM orders").await;
    assert_eq!(on0 + on1, 200);
    let expect0 = (1..=200).filter(|t| h.shard_of(*t) == 0).count() as i64;
    assert_eq!(on0, expect0);
    // Every row is on its own tenant's shard.
    for i in 0..2 {
        let rows = h.shard(i).await.query("SELECT tenant_id FROM orders", &[]).await.unwrap();
        assert!(rows.iter().all(|r| h.shard_of(r.get::<_, i64>(0)) == i));
    }

    // A row one shard refuses at the end (a duplicate key): the COPY is
    // applied on no shard, as one Postgres applies it whole or not at all.
    let [a, b] = [h.tenants_on(0, 1)[0], h.tenants_on(1, 1)[0]];
    let sink = c.copy_in("COPY orders (tenant_id, id, total) FROM STDIN").await.unwrap();
    futures::pin_mut!(sink);
    sink.send(bytes::Bytes::from(format!("{a}\t2\t1\n{b}\t2\t1\n{b}\t1\t1\n"))).await.unwrap();
    let e = sink.finish().await.unwrap_err();
    assert_eq!(e.code().map(|c| c.code()), Some("23505"), "{e:?}");
    let twos = rows_on(&h, 0, "SELECT count(*) FROM orders WHERE id = 2").await
        + rows_on(&h, 1, "SELECT count(*) FROM orders WHERE id = 2").await;
    assert_eq!(twos, 0, "the other shard's rows were applied");
    assert_eq!(c.query_one("SELECT count(*) FROM orders", &[]).await.unwrap().get::<_, i64>(0), 200);

    // Without a column list, COPY reads every column but the generated ones:
    // the key is found where COPY puts it, not where the table has it.
    c.batch_execute(
        "CREATE TABLE gen (id int, twice int GENERATED ALWAYS AS (id * 2) STORED, tenant_id bigint, \
         PRIMARY KEY (tenant_id, id))",
    )
    .await
    .unwrap();
    let sink = c.copy_in("COPY gen FROM STDIN").await.unwrap();
    futures::pin_mut!(sink);
    let data: String = (1..=40i64).map(|t| format!("{t}\t{t}\n")).collect();
    sink.send(bytes::Bytes::from(data)).await.unwrap();
    assert_eq!(sink.finish().await.unwrap(), 40);
    for i in 0..2 {
        let rows = h.shard(i).await.query("SELECT tenant_id, twice FROM gen", &[]).await.unwrap();
        assert!(rows
            .iter()
            .all(|r| h.shard_of(r.get::<_, i64>(0)) == i && r.get::<_, i32>(1) as i64 == 2 * r.get::<_, i64>(0)));
    }
}

/// A table for the binary COPY tests: its key not first, a note of any
/// length or NULL, and a column whose type is neither the key's nor text.
const EVENTS: &str = "CREATE TABLE events (id int4, tenant_id bigint, note text, small int2, \
    PRIMARY KEY (tenant_id, id))";

/// The note of event `i` of tenant `t`: empty, NULL, long enough to cross
/// CopyData messages and the router's flush point, or short.
fn event_note(t: i64, i: i32) -> Option<String> {
    match i % 7 {
        0 => None,
        1 => Some(String::new()),
        // One row past the router's 64 kB flush point, some past 4 kB.
        2 if t == 5 => Some(format!("{t}:{i}:").repeat(20_000)),
        2 if t % 5 == 0 => Some(format!("{t}:{i}:").repeat(1_000)),
        _ => Some(format!("tenant {t} event {i} \t\n\\ é")),
    }
}

/// Rows of `events` on shard `i`, straight from the shard.
async fn events_on(h: &Harness, i: usize) -> Vec<(i64, i32, Option<String>, Option<i16>)> {
    let rows = h.shard(i).await.query("SELECT tenant_id, id, note, small FROM events", &[]).await.unwrap();
    rows.iter().map(|r| (r.get(0), r.get(1), r.get(2), r.get(3))).collect()
}

/// tokio-postgres's BinaryCopyInWriter (as asyncpg's copy_records_to_table)
/// into a sharded table: every row on the shard that owns its tenant, byte
/// for byte, and the command tag counts them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_copy_from_stdin_sends_each_row_to_its_tenants_shard() {
    use tokio_postgres::binary_copy::BinaryCopyInWriter;
    use tokio_postgres::types::{ToSql, Type};
    let h = Harness::start(3).await;
    let c = h.client().await;
    c.batch_execute(EVENTS).await.unwrap();
    let sink = c
        .copy_in("COPY events (id, tenant_id, note, small) FROM STDIN (FORMAT binary)")
        .await
        .unwrap_or_else(|e| panic!("{:?}", e.as_db_error()));
    let writer = BinaryCopyInWriter::new(sink, &[Type::INT4, Type::INT8, Type::TEXT, Type::INT2]);
    futures::pin_mut!(writer);
    let mut want = Vec::new();
    for t in 1..=300i64 {
        for i in 0..10i32 {
            // Negative tenants too: the key is read as a signed bigint.
            let t = if t % 10 == 0 { -t } else { t };
            let note = event_note(t, i);
            let small = (t as i16).wrapping_mul(7);
            let row: [&(dyn ToSql + Sync); 4] = [&i, &t, &note, &small];
            writer.as_mut().write(&row).await.unwrap();
            want.push((t, i, note, Some(small)));
        }
    }
    let n = writer.finish().await.unwrap();
    assert_eq!(n, want.len() as u64);
    let mut got = Vec::new();
    for i in 0..3 {
        let rows = events_on(&h, i).await;
        assert!(!rows.is_empty(), "shard {i} got no rows");
        for r in &rows {
            assert_eq!(h.shard_of(r.0), i, "tenant {} on shard {i}", r.0);
        }
        got.extend(rows);
    }
    got.sort();
    want.sort();
    assert_eq!(got.len(), want.len());
    assert!(got == want, "rows on the shards are not the rows copied");

    // An int4 key column: its 4-byte values go where the same bigint would.
    c.batch_execute("CREATE TABLE small_keys (tenant_id int4 PRIMARY KEY)").await.unwrap();
    let sink = c.copy_in("COPY small_keys FROM STDIN (FORMAT binary)").await.unwrap();
    let writer = BinaryCopyInWriter::new(sink, &[Type::INT4]);
    futures::pin_mut!(writer);
    for t in -50..50i32 {
        writer.as_mut().write(&[&t]).await.unwrap();
    }
    assert_eq!(writer.finish().await.unwrap(), 100);
    for i in 0..3 {
        for r in h.shard(i).await.query("SELECT tenant_id FROM small_keys", &[]).await.unwrap() {
            let t: i32 = r.get(0);
            assert_eq!(h.shard_of(t.into()), i, "int4 tenant {t} on shard {i}");
        }
    }
}

/// A binary COPY stream of `tuples` (each a list of fields, None for NULL)
/// with a good header and trailer.
fn binary_copy_stream(tuples: &[Vec<Option<Vec<u8>>>]) -> Vec<u8> {
    let mut s = b"PGCOPY\n\xff\r\n\0".to_vec();
    s.extend_from_slice(&[0; 8]);
    for t in tuples {
        s.extend_from_slice(&(t.len() as i16).to_be_bytes());
        for f in t {
            match f {
                None => s.extend_from_slice(&(-1i32).to_be_bytes()),
                Some(v) => {
                    s.extend_from_slice(&(v.len() as i32).to_be_bytes());
                    s.extend_from_slice(v);
                }
            }
        }
    }
    s.extend_from_slice(&(-1i16).to_be_bytes());
    s
}

/// Sends `data` as one binary COPY into `events` (id, tenant_id, note,
/// small), cut into messages of `cut` bytes; the error it ends with.
async fn copy_binary_err(c: &tokio_postgres::Client, data: &[u8], cut: usize) -> tokio_postgres::Error {
    use futures::SinkExt;
    let sink = c.copy_in("COPY events (id, tenant_id, note, small) FROM STDIN (FORMAT binary)").await.unwrap();
    futures::pin_mut!(sink);
    for piece in data.chunks(cut) {
        // The router may answer before the data ends: then sending fails.
        if let Err(e) = sink.send(bytes::Bytes::copy_from_slice(piece)).await {
            return e;
        }
    }
    match sink.finish().await {
        Ok(n) => panic!("a bad binary COPY stream was accepted: COPY {n}"),
        Err(e) => e,
    }
}

/// A bad binary COPY stream is answered with Postgres's error for it, and
/// nothing of it stays on any shard, even rows before the bad part that
/// every shard had been sent; the connection goes on working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_binary_copy_stream_is_refused_and_leaves_no_rows() {
    let h = Harness::start(3).await;
    let c = h.client().await;
    c.batch_execute(EVENTS).await.unwrap();
    let good = |t: i64, i: i32| {
        vec![Some(i.to_be_bytes().to_vec()), Some(t.to_be_bytes().to_vec()), Some(b"note".to_vec()), None]
    };
    // Rows for tenants on every shard, then the bad part.
    let rows_first = || (1..=60i64).map(|t| good(t, 1)).collect::<Vec<_>>();
    let with = |bad: Vec<Option<Vec<u8>>>| {
        let mut tuples = rows_first();
        tuples.push(bad);
        binary_copy_stream(&tuples)
    };
    let field_count = with(vec![Some(1i32.to_be_bytes().to_vec()), Some(7i64.to_be_bytes().to_vec())]);
    let null_key = with(vec![Some(2i32.to_be_bytes().to_vec()), None, None, None]);
    let short_key = with(vec![Some(2i32.to_be_bytes().to_vec()), Some(vec![0, 0, 7]), None, None]);
    let mut truncated = binary_copy_stream(&rows_first());
    truncated.truncate(truncated.len() - 5);
    let mut oids = binary_copy_stream(&rows_first());
    oids[11..15].copy_from_slice(&(1i32 << 16).to_be_bytes());
    let mut after_trailer = binary_copy_stream(&rows_first());
    after_trailer.extend_from_slice(&[0, 4]);
    let cases: [(&str, Vec<u8>, &str, &str); 7] = [
        ("wrong field count", field_count, "22P04", "row field count is 2, expected 4"),
        ("NULL key", null_key, "23502", "tenant_id must not be NULL"),
        ("3-byte bigint key", short_key, "22P03", "incorrect binary data format in tenant_id"),
        ("cut off in a tuple", truncated, "22P04", "unexpected EOF in COPY data"),
        ("WITH OIDS header", oids, "22P04", "invalid COPY file header (WITH OIDS)"),
        ("text sent as binary", b"1\t2\tx\t3\n".to_vec(), "22P04", "COPY file signature not recognized"),
        ("data after the trailer", after_trailer, "22P04", "received copy data after EOF marker"),
    ];
    for (what, data, code, message) in cases {
        for cut in [7, 1 << 20] {
            let e = copy_binary_err(&c, &data, cut).await;
            let db = e.as_db_error().unwrap_or_else(|| panic!("{what}: {e:?}"));
            assert_eq!(db.code().code(), code, "{what}: {db:?}");
            assert!(db.message().contains(message), "{what}: {}", db.message());
            for i in 0..3 {
                assert!(events_on(&h, i).await.is_empty(), "{what}: rows left on shard {i}");
            }
            // The connection is usable after the refusal.
            assert_eq!(c.query_one("SELECT 1", &[]).await.unwrap().get::<_, i32>(0), 1);
        }
    }
    // A stream that only ends (no trailer) after whole tuples is taken, as
    // Postgres takes it; the same stream with the trailer is too.
    use futures::SinkExt;
    let mut no_trailer = binary_copy_stream(&rows_first());
    no_trailer.truncate(no_trailer.len() - 2);
    let sink = c.copy_in("COPY events (id, tenant_id, note, small) FROM STDIN (FORMAT binary)").await.unwrap();
    futures::pin_mut!(sink);
    sink.send(bytes::Bytes::from(no_trailer)).await.unwrap();
    assert_eq!(sink.finish().await.unwrap(), 60);
    let on: usize = futures::future::join_all((0..3).map(|i| events_on(&h, i))).await.iter().map(Vec::len).sum();
    assert_eq!(on, 60);
}

/// `COPY … TO STDOUT (FORMAT binary)` of every shard is one binary stream:
/// one header, every shard's rows, one trailer; with tokio-postgres's
/// `copy_out` (the extended protocol) and psql's simple query alike, and
/// whichever shards have no rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_copy_to_stdout_without_a_tenant_is_one_stream() {
    use futures::TryStreamExt;
    use tokio_postgres::binary_copy::BinaryCopyOutStream;
    use tokio_postgres::types::Type;
    let h = Harness::start(3).await;
    let c = h.client().await;
    c.batch_execute(EVENTS).await.unwrap();
    let copy = "COPY events (tenant_id, id, note) TO STDOUT (FORMAT binary)";
    let read = || async {
        let stream = c.copy_out(copy).await.unwrap_or_else(|e| panic!("{:?}", e.as_db_error()));
        let rows = BinaryCopyOutStream::new(stream, &[Type::INT8, Type::INT4, Type::TEXT]);
        let rows: Vec<_> = rows.try_collect().await.unwrap();
        let mut got: Vec<(i64, i32, Option<String>)> =
            rows.iter().map(|r| (r.get(0), r.get(1), r.get::<Option<String>>(2))).collect();
        got.sort();
        got
    };
    // No rows anywhere: a header and a trailer.
    assert_eq!(read().await, vec![]);
    let mut want = Vec::new();
    // Rows on the first two shards only (the last one's stream is just a
    // header and a trailer), then on all three.
    for shards in [&[0usize, 1][..], &[2]] {
        for &s in shards {
            for t in h.tenants_on(s, 5) {
                let note = event_note(t, 3);
                want.push((t, 3, note.clone()));
                c.execute("INSERT INTO events (id, tenant_id, note, small) VALUES (3, $1, $2, 0)", &[&t, &note])
                    .await
                    .unwrap();
            }
        }
        want.sort();
        assert_eq!(read().await, want);
    }
    // Text format through the extended protocol too.
    let stream = c.copy_out("COPY events (tenant_id) TO STDOUT").await.unwrap();
    let text: Vec<bytes::Bytes> = stream.try_collect().await.unwrap();
    assert_eq!(text.concat().split(|b| *b == b'\n').filter(|l| !l.is_empty()).count(), want.len());
    // psql (the simple protocol) gets the same stream: parsed here.
    let url = h.url();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("psql")
            .args([&url, "-X", "-v", "ON_ERROR_STOP=1", "-c", "COPY events (tenant_id, id) TO STDOUT (FORMAT binary)"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let s = out.stdout;
    assert_eq!(&s[..11], b"PGCOPY\n\xff\r\n\0");
    let mut at = 19;
    let mut tenants = Vec::new();
    while s[at..at + 2] != [0xff, 0xff] {
        assert_eq!(&s[at..at + 6], &[0, 2, 0, 0, 0, 8], "a tuple of two fields, the first 8 bytes");
        tenants.push(i64::from_be_bytes(s[at + 6..at + 14].try_into().unwrap()));
        at += 14 + 4 + 4;
    }
    assert_eq!(at + 2, s.len(), "bytes after the trailer");
    tenants.sort();
    assert_eq!(tenants, want.iter().map(|w| w.0).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_tenant_and_comments_route_statements_without_a_key() {
    let h = Harness::start(2).await;
    let c = h.client().await;
    c.batch_execute(ORDERS).await.unwrap();
    let t1 = h.tenants_on(1, 1)[0];
    c.batch_execute(&format!("INSERT INTO orders VALUES ({t1}, 1, 1), ({t1}, 2, 2)")).await.unwrap();
    c.batch_execute(&format!("SET shardgate.tenant = {t1}")).await.unwrap();
    let n = c.execute("UPDATE orders SET total = total + 1", &[]).await.unwrap();
    assert_eq!(n, 2);
    c.batch_execute("RESET shardgate.tenant").await.unwrap();
    let err = c.execute("UPDATE orders SET total = total + 1", &[]).await.unwrap_err();
    assert_eq!(sqlstate(&err), "0A000");
    let n = c.execute(&*format!("/* tenant_id={t1} */ DELETE FROM orders WHERE id = 1"), &[]).await.unwrap();
    assert_eq!(n, 1);
    let err = c.batch_execute("SET shardgate.tenant = 'not-a-number'").await.unwrap_err();
    assert_eq!(sqlstate(&err), "22023");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_mode_refuses_statements_without_a_tenant() {
    let config = shardgate_router::config::RouterConfig { strict_tenant: true, ..Default::default() };
    let h = Harness::start_with(2, config).await;
    let c = h.client().await;
    c.batch_execute(ORDERS).await.unwrap();
    let err = c.simple_query("SELECT * FROM orders").await.unwrap_err();
    assert_eq!(sqlstate(&err), "42P10");
    assert!(err.as_db_error().unwrap().hint().unwrap().contains("tenant_id"));
    // Reference tables and tenant-qualified statements still work.
    c.simple_query("SELECT 1").await.unwrap();
    c.simple_query("SELECT * FROM orders WHERE tenant_id = 1").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reference_tables_are_written_everywhere_and_read_anywhere() {
    let h = Harness::start(2).await;
    let c = h.client().await;
    c.batch_execute("CREATE TABLE countries (code text PRIMARY KEY, name text)").await.unwrap();
    c.batch_execute("INSERT INTO countries VALUES ('fr', 'France'), ('jp', 'Japan')").await.unwrap();
    for i in 0..2 {
        assert_eq!(rows_on(&h, i, "SELECT count(*) FROM countries").await, 2);
    }
    for _ in 0..4 {
        let r = c.query_one("SELECT name FROM countries WHERE code = $1", &[&"jp"]).await.unwrap();
        assert_eq!(r.get::<_, String>(0), "Japan");
    }
}

/// A reference table's rows are written on every shard, and each shard
/// computed `now()`, `random()` or `gen_random_uuid()` for itself: its copy
/// of the row differed from the others', and a read answered by whichever
/// shard it reached. Such a write is refused, and reaches no shard; the same
/// values computed first and written as literals or parameters land alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reference_rows_get_no_value_each_shard_would_compute_for_itself() {
    let h = Harness::start(2).await;
    let c = h.client().await;
    c.batch_execute("CREATE TABLE plans (id int PRIMARY KEY, token uuid, created timestamptz, weight float8)")
        .await
        .unwrap();
    for sql in [
        "INSERT INTO plans VALUES (1, gen_random_uuid(), now(), 1)",
        "INSERT INTO plans (id, created) VALUES (2, CURRENT_TIMESTAMP)",
        "INSERT INTO plans (id, weight) SELECT 3, random()",
        "UPDATE plans SET created = clock_timestamp()",
        "INSERT INTO plans (id) VALUES (4) ON CONFLICT (id) DO UPDATE SET created = now()",
    ] {
        for e in [c.simple_query(sql).await.unwrap_err(), c.execute(sql, &[]).await.unwrap_err()] {
            assert_eq!(sqlstate(&e), "0A000", "{sql}: {e:?}");
            let db = e.as_db_error().unwrap();
            assert!(db.message().contains("the reference table plans would give each shard's copy"), "{sql}: {db:?}");
            assert!(db.hint().unwrap_or_default().contains("literal or parameter"), "{sql}: {db:?}");
        }
    }
    for i in 0..2 {
        assert_eq!(rows_on(&h, i, "SELECT count(*) FROM plans").await, 0, "nothing reached shard {i}");
    }
    // Computed once, through the router, then written.
    let row = c.query_one("SELECT gen_random_uuid()::text, now()::text", &[]).await.unwrap();
    let (token, created): (String, String) = (row.get(0), row.get(1));
    c.execute("INSERT INTO plans VALUES (1, $1::text::uuid, $2::text::timestamptz, 0.5)", &[&token, &created])
        .await
        .unwrap();
    let copy = "SELECT token::text || ' ' || created::text FROM plans WHERE id = 1";
    let first = h.shard(0).await.query_one(copy, &[]).await.unwrap().get::<_, String>(0);
    let second = h.shard(1).await.query_one(copy, &[]).await.unwrap().get::<_, String>(0);
    assert_eq!(first, second, "both copies alike");
    // A sharded table's row is written once: its values stand.
    c.batch_execute("CREATE TABLE events (tenant_id bigint, id int, at timestamptz, PRIMARY KEY (tenant_id, id))")
        .await
        .unwrap();
    c.batch_execute("INSERT INTO events VALUES (1, 1, now())").await.unwrap();
    // A DELETE by time is the same everywhere but at the boundary; it runs.
    c.batch_execute("DELETE FROM plans WHERE created < now() - interval '1 day'").await.unwrap();
}

/// The same for a reference table's column defaults: `serial`, `DEFAULT
/// now()`, an identity. Each shard computed its own, and under concurrent
/// inserts two shards could even give two rows each other's ids. A write
/// that leaves such a column to its default is refused; one that gives it
/// a value runs, and every shard holds the same row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reference_rows_take_no_default_each_shard_would_compute_for_itself() {
    let h = Harness::start(2).await;
    let c = h.client().await;
    c.batch_execute(
        "CREATE TABLE plans (id serial PRIMARY KEY, name text, created timestamptz DEFAULT now(), tier int DEFAULT 1)",
    )
    .await
    .unwrap();
    for (sql, column) in [
        ("INSERT INTO plans (name) VALUES ('gold')", "id"),
        ("INSERT INTO plans (id, name) VALUES (1, 'gold')", "created"),
        ("INSERT INTO plans VALUES (1, 'gold')", "created"),
        ("INSERT INTO plans VALUES (1, 'gold', DEFAULT, 2)", "id"),
        ("INSERT INTO plans DEFAULT VALUES", "id"),
        ("UPDATE plans SET created = DEFAULT", "id"),
        ("INSERT INTO plans SELECT 1, 'gold'", "id"),
    ] {
        for e in [c.simple_query(sql).await.unwrap_err(), c.execute(sql, &[]).await.unwrap_err()] {
            assert_eq!(sqlstate(&e), "0A000", "{sql}: {e:?}");
            let db = e.as_db_error().unwrap();
            let says = format!("column {column} of the reference table plans would take its default on each shard");
            assert!(db.message().starts_with(&says), "{sql}: {db:?}");
            assert!(db.hint().unwrap_or_default().contains(&format!("give {column} a value")), "{sql}: {db:?}");
        }
    }
    for i in 0..2 {
        assert_eq!(rows_on(&h, i, "SELECT count(*) FROM plans").await, 0, "nothing reached shard {i}");
    }
    // Every such column given (tier's default is the same everywhere).
    c.batch_execute("INSERT INTO plans VALUES (1, 'gold', '2026-12-07 10:00+00')").await.unwrap();
    let e = c.execute("INSERT INTO plans (id, name, created) VALUES ($1, 'team', now())", &[&2i32]).await.unwrap_err();
    assert_eq!(sqlstate(&e), "0A000", "now() in the statement: {e:?}");
    let now: String = c.query_one("SELECT now()::text", &[]).await.unwrap().get(0);
    c.execute("INSERT INTO plans (id, name, created) VALUES ($1, 'team', $2::text::timestamptz)", &[&2i32, &now])
        .await
        .unwrap();
    c.batch_execute("UPDATE plans SET tier = 3 WHERE id = 1").await.unwrap();
    let all = "SELECT string_agg(id || name || created::text || tier, ',' ORDER BY id) FROM plans";
    let copy = |i: usize| {
        let h = &h;
        async move { h.shard(i).await.query_one(all, &[]).await.unwrap().get::<_, String>(0) }
    };
    assert_eq!(copy(0).await, copy(1).await, "both copies alike");
}

/// A `DO` block or a `CALL` holds statements the router cannot see: it ran
/// on any one shard, so a DO that created a type or wrote a reference table
/// did so on that shard alone, and one that wrote a tenant's rows may have
/// written them on a shard the tenant is not on. It now runs on the shard of
/// the tenant the session names, and is refused without one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn do_blocks_and_calls_run_on_the_named_tenants_shard_or_are_refused() {
    let h = Harness::start(2).await;
    let c = h.client().await;
    c.batch_execute("CREATE TABLE orders (tenant_id bigint, id int, PRIMARY KEY (tenant_id, id))").await.unwrap();
    c.batch_execute(
        "CREATE PROCEDURE add_order(t bigint, i int) LANGUAGE sql AS $$ INSERT INTO orders VALUES (t, i) $$",
    )
    .await
    .unwrap();
    let t = h.tenants_on(1, 1)[0];
    for sql in [
        format!("DO $$ BEGIN INSERT INTO orders VALUES ({t}, 1); END $$"),
        "DO $$ BEGIN CREATE TYPE mood AS ENUM ('ok'); END $$".to_string(),
        format!("CALL add_order({t}, 1)"),
    ] {
        for e in [c.simple_query(&sql).await.unwrap_err(), c.execute(sql.as_str(), &[]).await.unwrap_err()] {
            assert_eq!(sqlstate(&e), "0A000", "{sql}: {e:?}");
            let db = e.as_db_error().unwrap();
            assert!(db.message().contains("cannot see which tables it reads or writes"), "{sql}: {db:?}");
            assert!(db.hint().unwrap_or_default().contains("SET shardgate.tenant"), "{sql}: {db:?}");
        }
    }
    let on = |i: usize| {
        let h = &h;
        async move { rows_on(h, i, "SELECT count(*) FROM orders").await }
    };
    assert_eq!((on(0).await, on(1).await), (0, 0), "nothing ran");
    // Named by a comment, or by the session.
    c.batch_execute(&format!("/* tenant_id={t} */ DO $$ BEGIN INSERT INTO orders VALUES ({t}, 1); END $$"))
        .await
        .unwrap();
    c.batch_execute(&format!("SET shardgate.tenant = {t}")).await.unwrap();
    c.batch_execute(&format!("CALL add_order({t}, 2)")).await.unwrap();
    c.execute(&format!("CALL add_order({t}, 3)"), &[]).await.unwrap();
    assert_eq!((on(0).await, on(1).await), (0, 3), "every row on its tenant's shard");
}

/// Tables in a schema of the application's own, named without it under a
/// `search_path` that names the schema (in the connection string's options,
/// or with SET). The router took `orders` for an unknown table and wrote its
/// rows on every shard. A bare name now means the only table of that name;
/// where schemas hold different tables of one name, a bare name is routed
/// as `public`'s under the default `search_path` and refused once the
/// session sets its own, which the router does not follow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_without_its_schema_is_routed_as_the_table_search_path_finds() {
    let h = Harness::start(2).await;
    let c = h.client().await;
    c.batch_execute("CREATE SCHEMA app").await.unwrap();
    c.batch_execute("CREATE TABLE app.orders (tenant_id bigint, id int, PRIMARY KEY (tenant_id, id))").await.unwrap();
    let (t0, t1) = (h.tenants_on(0, 1)[0], h.tenants_on(1, 1)[0]);
    let on_each = |sql: &'static str| {
        let h = &h;
        async move { vec![rows_on(h, 0, sql).await, rows_on(h, 1, sql).await] }
    };
    // In the connection string's options, and with SET.
    let app = connect(&format!("{}?options=-csearch_path%3Dapp", h.url())).await;
    app.batch_execute(&format!("INSERT INTO orders VALUES ({t0}, 1), ({t1}, 1)")).await.unwrap();
    app.execute("INSERT INTO orders VALUES ($1, 2)", &[&t1]).await.unwrap();
    c.batch_execute("SET search_path = app, public").await.unwrap();
    c.batch_execute(&format!("INSERT INTO orders VALUES ({t0}, 3)")).await.unwrap();
    assert_eq!(on_each("SELECT count(*) FROM app.orders").await, [2, 2], "each row on its tenant's shard once");
    let count = app.query_one("SELECT count(*) FROM orders", &[]).await.unwrap().get::<_, i64>(0);
    assert_eq!(count, 4, "read from every shard");

    // public.orders, a reference table: `orders` now means two tables.
    let fresh = h.client().await;
    fresh.batch_execute("CREATE TABLE public.orders (id int, note text)").await.unwrap();
    fresh.batch_execute("INSERT INTO orders VALUES (1, 'public')").await.unwrap();
    assert_eq!(on_each("SELECT count(*) FROM public.orders").await, [1, 1], "the default search_path: public's");
    for (client, sql) in [(&app, "SELECT count(*) FROM orders"), (&c, "INSERT INTO orders VALUES (1, 9)")] {
        let e = client.simple_query(sql).await.unwrap_err();
        assert_eq!(sqlstate(&e), "0A000", "{sql}: {e:?}");
        let db = e.as_db_error().unwrap();
        assert!(db.message().contains("depends on search_path"), "{sql}: {db:?}");
        assert!(db.hint().unwrap_or_default().contains("app.orders"), "{sql}: {db:?}");
    }
    // Qualified, each is itself.
    assert_eq!(app.query_one("SELECT count(*) FROM app.orders", &[]).await.unwrap().get::<_, i64>(0), 4);
    assert_eq!(app.query_one("SELECT count(*) FROM public.orders", &[]).await.unwrap().get::<_, i64>(0), 1);
    assert_eq!(on_each("SELECT count(*) FROM app.orders").await, [2, 2], "nothing refused ran");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reference_reads_on_a_shard_without_the_reference_rows_are_refused_not_answered_short() {
    let h = Harness::start(2).await;
    let c = h.client().await;
    c.batch_execute(ORDERS).await.unwrap();
    c.batch_execute("CREATE TABLE plans (id bigint PRIMARY KEY, name text)").await.unwrap();
    c.batch_execute("INSERT INTO plans VALUES (1, 'gold')").await.unwrap();
    let (t0, t1) = (h.tenants_on(0, 1)[0], h.tenants_on(1, 1)[0]);
    for t in [t0, t1] {
        c.execute("INSERT INTO orders VALUES ($1, 1, 5)", &[&t]).await.unwrap();
    }
    // Shard 1 now stands for a shard added at run time and moved to: it has the
    // reference table, without its rows.
    let mut d = (*h.directory.load()).clone();
    d.shards[1].reference = false;
    h.directory.store(d);
    h.shard(1).await.batch_execute("DELETE FROM plans").await.unwrap();
    let join = |t: i64| format!("SELECT p.name FROM orders o JOIN plans p ON p.id = o.id WHERE o.tenant_id = {t}");
    let refused = |e: tokio_postgres::Error| {
        assert_eq!(sqlstate(&e), "0A000", "{e:?}");
        let db = e.as_db_error().unwrap();
        assert!(
            db.message().contains("plans is a reference table, and shard shard_1 does not hold its rows"),
            "{db:?}"
        );
        assert!(db.hint().unwrap_or_default().contains("statement of its own"), "{db:?}");
    };
    // Where the rows are, the join answers; on the added shard it is refused, in
    // both protocols, instead of an answer missing the rows.
    assert_eq!(c.query(&join(t0), &[]).await.unwrap().len(), 1);
    refused(c.simple_query(&join(t1)).await.unwrap_err());
    refused(c.query(&join(t1), &[]).await.unwrap_err());
    // A read over every shard would reach the added one too.
    refused(c.simple_query("SELECT count(*) FROM orders o JOIN plans p ON p.id = o.id").await.unwrap_err());
    // A transaction on the added shard cannot read the table either …
    c.batch_execute("BEGIN").await.unwrap();
    c.execute("UPDATE orders SET total = 6 WHERE tenant_id = $1", &[&t1]).await.unwrap();
    refused(c.query("SELECT name FROM plans", &[]).await.unwrap_err());
    c.batch_execute("ROLLBACK").await.unwrap();
    // … while the table on its own, and with the added shard's tenant as the
    // session's, is read where its rows are.
    c.batch_execute(&format!("SET shardgate.tenant = {t1}")).await.unwrap();
    for _ in 0..4 {
        assert_eq!(c.query_one("SELECT name FROM plans WHERE id = 1", &[]).await.unwrap().get::<_, String>(0), "gold");
    }
    // Writes to the reference table still reach every shard that owns rows.
    c.batch_execute("RESET shardgate.tenant").await.unwrap();
    c.batch_execute("INSERT INTO plans VALUES (2, 'silver')").await.unwrap();
    assert_eq!(rows_on(&h, 0, "SELECT count(*) FROM plans").await, 2);
    assert_eq!(rows_on(&h, 1, "SELECT count(*) FROM plans").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_without_a_tenant_gather_every_shard_or_are_refused() {
    let h = Harness::start(2).await;
    let c = h.client().await;
    c.batch_execute(ORDERS).await.unwrap();
    for t in 1..=40i64 {
        c.execute("INSERT INTO orders VALUES ($1, 2, 1)", &[&t]).await.unwrap();
    }
    // Rows from both shards.
    let rows = c.simple_query("SELECT tenant_id FROM orders WHERE id = 2").await.unwrap();
    let n = rows.iter().filter(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(_))).count();
    assert_eq!(n, 40);
    // What cannot be merged exactly yet is refused, never answered wrong.
    // (An average of floats depends on the order the values are added in.)
    let err = c.simple_query("SELECT avg(total::float8) FROM orders").await.unwrap_err();
    assert_eq!(sqlstate(&err), "0A000");
    assert!(err.as_db_error().unwrap().message().contains("avg(x::numeric)"), "{err:?}");
    let err = c.simple_query("SELECT avg(DISTINCT total) FROM orders").await.unwrap_err();
    assert_eq!(sqlstate(&err), "0A000");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extended_protocol_runs_ddl_reference_writes_and_gathers_everywhere() {
    let h = Harness::start(2).await;
    let c = h.client().await;
    // tokio-postgres sends these through Parse/Bind/Execute.
    c.execute(ORDERS, &[]).await.unwrap();
    c.execute("CREATE TABLE countries (code text PRIMARY KEY, name text)", &[]).await.unwrap();
    for i in 0..2 {
        assert_eq!(
            rows_on(&h, i, "SELECT count(*) FROM pg_tables WHERE tablename IN ('orders', 'countries')").await,
            2
        );
    }
    let n = c.execute("INSERT INTO countries VALUES ($1, $2)", &[&"fr", &"France"]).await.unwrap();
    assert_eq!(n, 1);
    for i in 0..2 {
        assert_eq!(rows_on(&h, i, "SELECT count(*) FROM countries").await, 1);
    }
    // A failure on the shards is reported once, naming a shard.
    let err = c.execute("INSERT INTO countries VALUES ($1, $2)", &[&"fr", &"again"]).await.unwrap_err();
    assert_eq!(sqlstate(&err), "23505");
    assert!(err.as_db_error().unwrap().message().contains("on shard"), "{err:?}");
    // Reads without a tenant gather every shard's rows (binary results included).
    for t in 1..=30i64 {
        c.execute("INSERT INTO orders VALUES ($1, 1, 2.5)", &[&t]).await.unwrap();
    }
    let rows = c.query("SELECT tenant_id FROM orders WHERE id = $1", &[&1i64]).await.unwrap();
    let mut got: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
    got.sort();
    assert_eq!(got, (1..=30).collect::<Vec<_>>());
    // … and merge them as a simple query would.
    let n: i64 = c.query_one("SELECT count(*) FROM orders", &[]).await.unwrap().get(0);
    assert_eq!(n, 30);
    // DISTINCT merges the shards' distinct rows into one of each.
    let distinct = c.query("SELECT DISTINCT total FROM orders", &[]).await.unwrap();
    assert_eq!(distinct.len(), 1);
    // What cannot be merged exactly is refused, and the session goes on.
    let err = c.query("SELECT count(DISTINCT total) FROM orders", &[]).await.unwrap_err();
    assert_eq!(sqlstate(&err), "0A000");
    assert!(err.as_db_error().unwrap().message().contains("count(DISTINCT …)"), "{err:?}");
    assert_eq!(c.query("SELECT 1", &[]).await.unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tables_created_behind_the_routers_back_are_learned() {
    let h = Harness::start(2).await;
    let c = h.client().await;
    c.simple_query("SELECT 1").await.unwrap();
    // Created straight on the shards (as another router or a migration tool would).
    for i in 0..2 {
        h.shard(i).await.batch_execute(ORDERS).await.unwrap();
    }
    let t1 = h.tenants_on(1, 1)[0];
    c.execute("INSERT INTO orders VALUES ($1, 1, 1)", &[&t1]).await.unwrap();
    assert_eq!(rows_on(&h, 1, "SELECT count(*) FROM orders").await, 1);
    assert_eq!(rows_on(&h, 0, "SELECT count(*) FROM orders").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_to_stdout_without_a_tenant_exports_every_shard() {
    let h = Harness::start(2).await;
    let c = h.client().await;
    c.batch_execute(ORDERS).await.unwrap();
    for t in 1..=20i64 {
        c.execute("INSERT INTO orders VALUES ($1, 1, 3)", &[&t]).await.unwrap();
    }
    let url = h.url();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("psql")
            .args([
                &url,
                "-X",
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
                "COPY orders (tenant_id, total) TO STDOUT WITH (FORMAT csv, HEADER)",
            ])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "tenant_id,total");
    assert_eq!(lines.iter().filter(|l| **l == "tenant_id,total").count(), 1, "{text}");
    let mut tenants: Vec<i64> = lines[1..].iter().map(|l| l.split(',').next().unwrap().parse().unwrap()).collect();
    tenants.sort();
    assert_eq!(tenants, (1..=20).collect::<Vec<_>>());
    // With a tenant, only that tenant's shard answers.
    // With a tenant, only that tenant's shard answers.
    let url = h.url();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("psql")
            .args([&url, "-X", "-c", "COPY (SELECT tenant_id FROM orders WHERE tenant_id = 3) TO STDOUT"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "3");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_settings_follow_the_session_across_pooled_connections_and_never_leak() {
    let config = shardgate_router::config::RouterConfig {
        pool: shardgate_router::config::PoolConfig { size: 2, ..Default::default() },
        ..Default::default()
    };
    let h = Harness::start_with(1, config).await;
    let a = h.client().await;
    let b = h.client().await;
    a.batch_execute("SET statement_timeout = '1234ms'").await.unwrap();
    a.batch_execute("SET search_path TO public, pg_catalog").await.unwrap();
    // Many statements from both clients over a pool of two connections: each sees
    // only its own settings.
    for _ in 0..20 {
        let ta: String = a.query_one("SHOW statement_timeout", &[]).await.unwrap().get(0);
        let tb: String = b.query_one("SHOW statement_timeout", &[]).await.unwrap().get(0);
        assert_eq!(ta, "1234ms");
        assert_eq!(tb, "0");
    }
    // Inside a transaction too.
    a.batch_execute("BEGIN").await.unwrap();
    let ta: String = a.query_one("SHOW search_path", &[]).await.unwrap().get(0);
    a.batch_execute("COMMIT").await.unwrap();
    assert_eq!(ta, "public, pg_catalog");
    a.batch_execute("RESET statement_timeout").await.unwrap();
    for _ in 0..4 {
        let ta: String = a.query_one("SHOW statement_timeout", &[]).await.unwrap().get(0);
        assert_eq!(ta, "0");
    }
    // Startup parameters are session settings as well.
    let c =
        shardgate_tests::connect(&format!("{}?application_name=billing&options=-c%20work_mem%3D3MB", h.url())).await;
    for _ in 0..4 {
        let wm: String = c.query_one("SHOW work_mem", &[]).await.unwrap().get(0);
        assert_eq!(wm, "3MB");
        let app: String = c.query_one("SELECT current_setting('application_name')", &[]).await.unwrap().get(0);
        assert_eq!(app, "billing");
        let other: String = b.query_one("SHOW work_mem", &[]).await.unwrap().get(0);
        assert_eq!(other, "4MB");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_in_a_transaction_runs_on_every_shard_and_rolls_back_everywhere() {
    let h = Harness::start(2).await;
    let c = h.client().await;
    // One statement at a time, as migration tools send them.
    c.batch_execute("BEGIN").await.unwrap();
    c.batch_execute(ORDERS).await.unwrap();
    c.batch_execute("CREATE INDEX orders_total ON orders (total)").await.unwrap();
    c.batch_execute("CREATE TABLE plans (name text PRIMARY KEY)").await.unwrap();
    c.batch_execute("INSERT INTO plans VALUES ('free')").await.unwrap();
    // Not visible outside the transaction yet.
    assert_eq!(rows_on(&h, 0, "SELECT count(*) FROM pg_tables WHERE tablename = 'orders'").await, 0);
    c.batch_execute("COMMIT").await.unwrap();
    for i in 0..2 {
        assert_eq!(rows_on(&h, i, "SELECT count(*) FROM pg_indexes WHERE indexname = 'orders_total'").await, 1);
        assert_eq!(rows_on(&h, i, "SELECT count(*) FROM plans").await, 1);
    }
    // The new table is sharded at once.
    let t1 = h.tenants_on(1, 1)[0];
    c.execute("INSERT INTO orders VALUES ($1, 1, 1)", &[&t1]).await.unwrap();
    assert_eq!(rows_on(&h, 0, "SELECT count(*) FROM orders").await, 0);

    // A failing statement aborts the whole migration, on every shard.
    c.batch_execute("BEGIN").await.unwrap();
    c.batch_execute("ALTER TABLE orders ADD COLUMN note text").await.unwrap();
    let err = c.batch_execute("ALTER TABLE orders ADD COLUMN note text").await.unwrap_err();
    assert_eq!(sqlstate(&err), "42701");
    let err = c.batch_execute("SELECT 1").await.unwrap_err();
    assert_eq!(sqlstate(&err), "25P02");
    c.batch_execute("COMMIT").await.unwrap(); // answered ROLLBACK, as Postgres does
    for i in 0..2 {
        assert_eq!(
            rows_on(
                &h,
                i,
                "SELECT count(*) FROM information_schema.columns WHERE table_name = 'orders' AND column_name = 'note'"
            )
            .await,
            0
        );
    }
    // ROLLBACK undoes it everywhere too.
    c.batch_execute("BEGIN; DROP TABLE plans").await.unwrap();
    c.batch_execute("ROLLBACK").await.unwrap();
    for i in 0..2 {
        assert_eq!(rows_on(&h, i, "SELECT count(*) FROM plans").await, 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_connections_statement_cache_is_bounded_and_statements_still_work() {
    let config = shardgate_router::config::RouterConfig {
        pool: shardgate_router::config::PoolConfig { size: 1, ..Default::default() },
        ..Default::default()
    };
    let h = Harness::start_with(1, config).await;
    let c = h.client().await;
    let first = c.prepare("SELECT $1::int + 0").await.unwrap();
    for k in 1..1100 {
        let st = c.prepare(&format!("SELECT $1::int + {k}")).await.unwrap();
        let v: i32 = c.query_one(&st, &[&1i32]).await.unwrap().get(0);
        assert_eq!(v, 1 + k);
    }
    let n: i64 = c.query_one("SELECT count(*) FROM pg_prepared_statements", &[]).await.unwrap().get(0);
    assert!(n <= 1001, "{n} statements prepared on one server connection");
    // A statement prepared long ago is prepared again where it runs.
    let v: i32 = c.query_one(&first, &[&41i32]).await.unwrap().get(0);
    assert_eq!(v, 41);
}

#[tokio::test]
async fn a_table_created_through_another_router_is_never_written_to_every_shard() {
    let h = Harness::start(2).await;
    // A second router with its own catalog, which has never heard of the table.
    let addrs: Vec<shardgate_router::backend::ShardAddress> =
        h.cluster.urls().iter().map(|u| shardgate_router::backend::ShardAddress::from_url(u).unwrap()).collect();
    let cfg = shardgate_router::config::RouterConfig { listen: "127.0.0.1:0".into(), ..Default::default() };
    let other = shardgate_router::server::start(cfg, h.directory.clone(), addrs).await.unwrap();
    let url = format!("postgres://postgres@{}/app", other.local_addr);
    h.client().await.batch_execute("CREATE TABLE race_items (tenant_id bigint NOT NULL, v int)").await.unwrap();
    // Many first statements at once: all but one arrive while the catalog
    // refresh the first one started is still in flight.
    let writes = (0..24i64).map(|i| {
        let url = url.clone();
        async move {
            let c = shardgate_tests::connect(&url).await;
            c.execute("INSERT INTO race_items VALUES ($1, 1)", &[&(i + 1)]).await.unwrap();
        }
    });
    futures::future::join_all(writes).await;
    let mut total = 0;
    for i in 0..2 {
        total += h.shard(i).await.query_one("SELECT count(*) FROM race_items", &[]).await.unwrap().get::<_, i64>(0);
    }
    assert_eq!(total, 24, "each row on exactly one shard");
    other.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pool_size_holds_for_the_whole_router_across_its_session_threads() {
    let config = shardgate_router::config::RouterConfig {
        threads: 3,
        pool: shardgate_router::config::PoolConfig { size: 2, ..Default::default() },
        ..Default::default()
    };
    let h = Harness::start_with(1, config).await;
    // Nine clients, spread over the three session threads, each running a slow
    // statement at the same time, three times over.
    let mut clients = Vec::new();
    for _ in 0..9 {
        clients.push(h.client().await);
    }
    for _ in 0..3 {
        let runs = clients.iter().map(|c| c.simple_query("SELECT pg_sleep(0.05)"));
        for r in futures::future::join_all(runs).await {
            r.unwrap();
        }
    }
    let shard = h.shard(0).await;
    let n: i64 = shard
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' \
             AND datname = current_database() AND application_name = 'shardgate'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!((1..=2).contains(&n), "{n} server connections for a pool of 2");
}

/// A table created with the key column is sharded, but the router learns
/// its shape from the shards once its creation commits. Used before that,
/// in the query string or the transaction that creates it, it was taken for
/// a reference table: `CREATE TABLE t (tenant_id …); INSERT INTO t …` wrote
/// every row on every shard, and a count through the router came out
/// doubled. Such a use is refused now, and nothing of it runs; a reference
/// table (no key column) created and filled in one string still works. The
/// same for a table renamed, or given the key by a column's rename; and the
/// key column of a sharded table is not dropped or renamed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_is_not_written_in_the_transaction_that_creates_it_with_the_key_column() {
    use shardgate_tests::raw::{bind, execute, parse, sync, Raw};
    let h = Harness::start(2).await;
    let c = h.client().await;
    let t = h.tenants_on(1, 1)[0];
    let tables_named = |name: &'static str| format!("SELECT count(*) FROM pg_tables WHERE tablename = '{name}'");

    // One query string.
    let e = c
        .batch_execute(&format!("CREATE TABLE a (tenant_id bigint, id int); INSERT INTO a VALUES ({t}, 1), ({t}, 2)"))
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&e), "0A000", "{e:?}");
    for i in 0..2 {
        assert_eq!(rows_on(&h, i, &tables_named("a")).await, 0, "nothing of the refused string ran");
    }
    // Columns that may hold the key (LIKE), and a read as well as a write.
    c.batch_execute(ORDERS).await.unwrap();
    for string in [
        "CREATE TABLE b (LIKE orders); SELECT count(*) FROM b",
        "CREATE TABLE b AS SELECT * FROM orders; SELECT * FROM b",
    ] {
        let e = c.batch_execute(string).await.unwrap_err();
        assert_eq!(sqlstate(&e), "0A000", "{string}: {e:?}");
    }

    // One transaction block, a statement at a time.
    c.batch_execute("BEGIN").await.unwrap();
    c.batch_execute("CREATE TABLE a (tenant_id bigint, id int)").await.unwrap();
    let e = c.batch_execute(&format!("INSERT INTO a VALUES ({t}, 1)")).await.unwrap_err();
    assert_eq!(sqlstate(&e), "0A000", "{e:?}");
    assert!(e.as_db_error().unwrap().hint().unwrap().contains("commit the CREATE TABLE"), "{e:?}");
    c.batch_execute("ROLLBACK").await.unwrap();

    // A sharded table renamed; a reference table's column renamed to the key.
    c.batch_execute("CREATE TABLE r (tenant_id bigint, id int); CREATE TABLE q (k bigint, id int)").await.unwrap();
    c.batch_execute("BEGIN").await.unwrap();
    c.batch_execute("ALTER TABLE r RENAME TO r2").await.unwrap();
    let e = c.batch_execute(&format!("INSERT INTO r2 VALUES ({t}, 1)")).await.unwrap_err();
    assert_eq!(sqlstate(&e), "0A000", "{e:?}");
    c.batch_execute("ROLLBACK").await.unwrap();
    // A reference table (its rows on every shard) given the key by a rename.
    let e = c.batch_execute("ALTER TABLE q RENAME COLUMN k TO tenant_id").await.unwrap_err();
    assert_eq!(sqlstate(&e), "0A000", "{e:?}");
    // The key column of a sharded table dropped or renamed: its rows would
    // stay scattered while the router took it for a reference table.
    for change in ["ALTER TABLE r DROP COLUMN tenant_id", "ALTER TABLE r RENAME COLUMN tenant_id TO owner"] {
        let e = c.batch_execute(change).await.unwrap_err();
        assert_eq!(sqlstate(&e), "0A000", "{change}: {e:?}");
    }
    // Committed first, then used: the rows land on their tenant's shard.
    c.batch_execute("ALTER TABLE r RENAME TO r2").await.unwrap();
    c.batch_execute(&format!("INSERT INTO r2 VALUES ({t}, 1)")).await.unwrap();
    assert_eq!(rows_on(&h, 0, "SELECT count(*) FROM r2").await, 0);
    assert_eq!(rows_on(&h, 1, "SELECT count(*) FROM r2").await, 1);

    // A table filled from a query over a sharded table: each shard would
    // fill it with its own rows.
    for copy in [
        "CREATE TABLE ocopy AS SELECT * FROM orders",
        "CREATE MATERIALIZED VIEW omv AS SELECT count(*) FROM orders",
        "SELECT * INTO ocopy FROM orders",
    ] {
        let e = c.batch_execute(copy).await.unwrap_err();
        assert_eq!(sqlstate(&e), "0A000", "{copy}: {e:?}");
    }
    // The key column given to a reference table with rows on every shard:
    // each copy would have counted as rows of their own.
    c.batch_execute("CREATE TABLE regions (id int); INSERT INTO regions VALUES (1), (2)").await.unwrap();
    let e = c.batch_execute("ALTER TABLE regions ADD COLUMN tenant_id bigint DEFAULT 7").await.unwrap_err();
    assert_eq!(sqlstate(&e), "0A000", "{e:?}");
    // From a reference table, every shard fills the same rows.
    c.batch_execute("CREATE TABLE regions2 AS SELECT * FROM regions").await.unwrap();
    for i in 0..2 {
        assert_eq!(rows_on(&h, i, "SELECT count(*) FROM regions2").await, 2);
    }

    // One pipeline.
    let mut raw = Raw::login(h.port()).await;
    let answers = raw
        .run(&[
            parse("", "CREATE TABLE a (tenant_id bigint, id int)", &[]),
            bind("", &[], false),
            execute(),
            parse("", "INSERT INTO a VALUES ($1, 1)", &[20]),
            bind("", &[t], false),
            execute(),
            sync(),
        ])
        .await;
    assert_eq!(answers, ["error 0A000", "ready I"]);

    // Committed first, then written: the rows land on their tenant's shard only.
    c.batch_execute("CREATE TABLE a (tenant_id bigint, id int)").await.unwrap();
    c.batch_execute(&format!("INSERT INTO a VALUES ({t}, 1), ({t}, 2)")).await.unwrap();
    assert_eq!(rows_on(&h, 0, "SELECT count(*) FROM a").await, 0);
    assert_eq!(rows_on(&h, 1, "SELECT count(*) FROM a").await, 2);
    // A reference table created and filled in one string: on every shard.
    c.batch_execute("CREATE TABLE countries (code text); INSERT INTO countries VALUES ('fr'), ('de')").await.unwrap();
    for i in 0..2 {
        assert_eq!(rows_on(&h, i, "SELECT count(*) FROM countries").await, 2);
    }
}

/// The key column is named as Postgres names columns: `"TENANT_ID"` is
/// another column than `tenant_id`. A row was routed by the first column
/// whose name matched without regard to case, and its tenant's reads did
/// not find it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_column_named_like_the_key_in_other_case_is_another_column() {
    let h = Harness::start(2).await;
    let c = h.client().await;
    let (a, b) = (h.tenants_on(0, 1)[0], h.tenants_on(1, 1)[0]);
    c.batch_execute(r#"CREATE TABLE qq ("TENANT_ID" bigint, tenant_id bigint, x int)"#).await.unwrap();
    // "TENANT_ID" names a tenant of shard 0, tenant_id one of shard 1.
    c.batch_execute(&format!("INSERT INTO qq VALUES ({a}, {b}, 1)")).await.unwrap();
    assert_eq!(rows_on(&h, 1, "SELECT count(*) FROM qq").await, 1, "on tenant_id's shard");
    let n: i64 = c.query_one("SELECT count(*) FROM qq WHERE tenant_id = $1", &[&b]).await.unwrap().get(0);
    assert_eq!(n, 1);
    // A filter on the other column reads every shard.
    let n: i64 = c.query_one(r#"SELECT count(*) FROM qq WHERE "TENANT_ID" = $1"#, &[&a]).await.unwrap().get(0);
    assert_eq!(n, 1);
}

/// `COPY (query) TO STDOUT` without a tenant puts the shards' outputs end to
/// end. A query whose ORDER BY, LIMIT, aggregates, DISTINCT or set
/// operation each shard would apply to its own rows alone (`LIMIT 2` gave 6
/// rows over 3 shards, `count(*)` one count per shard) is refused; a plain
/// query's rows are all there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_of_a_query_over_every_shard_is_refused_where_the_shards_would_each_apply_it() {
    let h = Harness::start(2).await;
    let c = h.client().await;
    c.batch_execute(ORDERS).await.unwrap();
    for t in h.tenants_on(0, 2).into_iter().chain(h.tenants_on(1, 2)) {
        c.batch_execute(&format!("INSERT INTO orders VALUES ({t}, 1, 1)")).await.unwrap();
    }
    for query in [
        "SELECT id FROM orders ORDER BY id LIMIT 2",
        "SELECT count(*) FROM orders",
        "SELECT DISTINCT id FROM orders",
        "SELECT id FROM orders ORDER BY tenant_id",
        "SELECT id FROM orders UNION SELECT id FROM orders",
    ] {
        let copy = format!("COPY ({query}) TO STDOUT");
        let Err(e) = c.copy_out(&copy).await else { panic!("{copy} was not refused") };
        assert_eq!(sqlstate(&e), "0A000", "{copy}: {e:?}");
    }
    use futures::TryStreamExt;
    let stream = c.copy_out("COPY (SELECT tenant_id FROM orders WHERE id = 1) TO STDOUT").await.unwrap();
    let chunks: Vec<bytes::Bytes> = stream.try_collect().await.unwrap();
    let lines = chunks.iter().map(|b| b.iter().filter(|&&c| c == b'\n').count()).sum::<usize>();
    assert_eq!(lines, 4, "every shard's rows");
}
