//! A read of every shard inside a transaction block (what psycopg2 and
//! SQLAlchemy send: every statement is in a transaction): the shards the block
//! reached read inside it and see its writes; the others read what is
//! committed.

use shardgate_tests::{rows, sqlstate, Harness};

async fn count(c: &tokio_postgres::Client) -> i64 {
    let got = rows(c.simple_query("SELECT count(*) FROM items").await.expect("count"));
    got[0][0].as_deref().unwrap().parse().unwrap()
}

/// Two shards, a table, a tenant on each (`near` on shard 0, `far` on 1), each
/// with a row for each of `ns`.
async fn setup(ns: &[i32]) -> (Harness, tokio_postgres::Client, i64, i64) {
    let h = Harness::start(2).await;
    let c = h.client().await;
    c.batch_execute("CREATE TABLE items (tenant_id bigint, n int)").await.unwrap();
    let (near, far) = (h.tenants_on(0, 1)[0], h.tenants_on(1, 1)[0]);
    for t in [near, far] {
        for n in ns {
            c.execute("INSERT INTO items VALUES ($1, $2)", &[&t, n]).await.unwrap();
        }
    }
    (h, c, near, far)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_of_every_shard_inside_a_block_sees_the_blocks_own_writes() {
    let (h, c, near, far) = setup(&[1, 2]).await;
    assert_eq!(count(&c).await, 4);

    // On one shard, rolled back: the merged read and the grouped read see
    // the uncommitted row; nothing stays.
    c.simple_query("BEGIN").await.unwrap();
    c.simple_query(&format!("INSERT INTO items VALUES ({near}, 100)")).await.unwrap();
    assert_eq!(count(&c).await, 5, "a grouped read sees the block's row");
    let top = rows(c.simple_query("SELECT tenant_id, n FROM items ORDER BY n DESC LIMIT 1").await.unwrap());
    assert_eq!(top[0][1].as_deref(), Some("100"), "a merged read sees it too");
    // Still one block: its next write and its end work as before.
    c.simple_query(&format!("UPDATE items SET n = n + 1 WHERE tenant_id = {near} AND n = 100")).await.unwrap();
    c.simple_query("ROLLBACK").await.unwrap();
    assert_eq!(count(&c).await, 4);
    let on_shard: i64 = h.shard(0).await.query_one("SELECT count(*) FROM items", &[]).await.unwrap().get(0);
    assert_eq!(on_shard, 2, "rolled back on the shard");

    // On both shards (two-phase commit at COMMIT), in the extended protocol.
    let mut c = c;
    let tx = c.transaction().await.unwrap();
    tx.execute("INSERT INTO items VALUES ($1, 10)", &[&near]).await.unwrap();
    tx.execute("INSERT INTO items VALUES ($1, 20)", &[&far]).await.unwrap();
    let n: i64 = tx.query_one("SELECT count(*) FROM items", &[]).await.unwrap().get(0);
    assert_eq!(n, 6);
    let ns: Vec<i32> =
        tx.query("SELECT n FROM items ORDER BY n DESC", &[]).await.unwrap().iter().map(|r| r.get(0)).collect();
    assert_eq!(ns, [20, 10, 2, 2, 1, 1]);
    tx.commit().await.unwrap();
    assert_eq!(count(&c).await, 6);
    for (shard, want) in [(0, 3i64), (1, 3)] {
        let n: i64 = h.shard(shard).await.query_one("SELECT count(*) FROM items", &[]).await.unwrap().get(0);
        assert_eq!(n, want, "shard {shard}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_read_of_every_shard_fails_the_block_and_row_locks_are_refused() {
    let (_h, c, near, far) = setup(&[0]).await;

    c.simple_query("BEGIN").await.unwrap();
    c.simple_query(&format!("INSERT INTO items VALUES ({near}, 5)")).await.unwrap();
    // Row locks must last to COMMIT, which a shard the block has not reached
    // cannot promise: refused, and the block goes on.
    let e = c.simple_query("SELECT * FROM items FOR UPDATE").await.expect_err("FOR UPDATE across shards");
    assert_eq!(sqlstate(&e), "0A000", "{e:?}");
    c.simple_query("ROLLBACK").await.unwrap();

    c.simple_query("BEGIN").await.unwrap();
    c.simple_query(&format!("INSERT INTO items VALUES ({near}, 5)")).await.unwrap();
    let e = c.simple_query("SELECT count(*) FROM items WHERE 1 / n > 0").await.expect_err("division by zero");
    assert_eq!(sqlstate(&e), "22012", "{e:?}");
    // The block failed as a whole, as in Postgres.
    let e = c.simple_query(&format!("SELECT * FROM items WHERE tenant_id = {far}")).await.expect_err("failed block");
    assert_eq!(sqlstate(&e), "25P02", "{e:?}");
    c.simple_query("COMMIT").await.unwrap();
    assert_eq!(count(&c).await, 2, "nothing of the failed block stays");
}
