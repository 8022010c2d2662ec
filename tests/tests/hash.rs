//! The router's bucket for a key is the bucket Postgres computes for it in SQL.

use shardgate_directory::hash::{bucket_of, bucket_sql, hashint8extended, hashtextextended, uuid_hash_extended};
use shardgate_directory::{KeyType, TenantKey};
use shardgate_localpg::TestServer;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hashes_match_a_real_server_for_many_keys() {
    let server = TestServer::start().await.unwrap();
    let c = server.connect("postgres").await.unwrap();

    // Integers: small, negative, around the 32-bit boundary, and large.
    let mut ints: Vec<i64> = (-2000..3000).collect();
    ints.extend([i64::MIN, i64::MAX, i32::MAX as i64, i32::MAX as i64 + 1, i32::MIN as i64, i32::MIN as i64 - 1]);
    ints.extend((0..2000).map(|i: i64| i.wrapping_mul(0x9E37_79B9_7F4A_7C15u64 as i64)));
    let rows = c.query("SELECT k, hashint8extended(k, 0) FROM unnest($1::int8[]) k", &[&ints]).await.unwrap();
    assert_eq!(rows.len(), ints.len());
    for r in &rows {
        let k: i64 = r.get(0);
        assert_eq!(hashint8extended(k, 0), r.get::<_, i64>(1), "hashint8extended({k})");
    }
    // With a seed, too (the lookup3 seed path).
    let rows =
        c.query("SELECT k, hashint8extended(k, 42) FROM unnest($1::int8[]) k", &[&ints[..500].to_vec()]).await.unwrap();
    for r in &rows {
        let k: i64 = r.get(0);
        assert_eq!(hashint8extended(k, 42), r.get::<_, i64>(1));
    }

    // Text of every length from 0 to 40 bytes, ASCII and multi-byte.
    let mut texts: Vec<String> =
        (0..41).map(|n| "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG"[..n].to_string()).collect();
    texts.extend((0..1000).map(|i| format!("tenant-{i}")));
    texts.extend(["é", "日本語のテナント", "emoji 🦀 tenant"].map(String::from));
    let rows = c.query("SELECT k, hashtextextended(k, 0) FROM unnest($1::text[]) k", &[&texts]).await.unwrap();
    for r in &rows {
        let k: String = r.get(0);
        assert_eq!(hashtextextended(&k, 0), r.get::<_, i64>(1), "hashtextextended({k:?})");
    }

    // UUIDs.
    let uuids: Vec<String> = (0..500u128)
        .map(|i| uuid::Uuid::from_u128(i.wrapping_mul(0x1234_5678_9abc_def0_1357_9bdf_2468_ace0)).to_string())
        .collect();
    let rows =
        c.query("SELECT k::text, uuid_hash_extended(k::uuid, 0) FROM unnest($1::text[]) k", &[&uuids]).await.unwrap();
    for r in &rows {
        let k: String = r.get(0);
        let u = uuid::Uuid::parse_str(&k).unwrap();
        assert_eq!(uuid_hash_extended(&u, 0), r.get::<_, i64>(1), "uuid_hash_extended({k})");
    }

    // The bucket expression a shard uses agrees with the router's bucket.
    let sql = format!("SELECT k, {} FROM unnest($1::int8[]) k", bucket_sql("k", KeyType::Int, 256));
    for r in c.query(&*sql, &[&ints]).await.unwrap() {
        let k: i64 = r.get(0);
        assert_eq!(bucket_of(&TenantKey::Int(k), 256) as i64, r.get::<_, i64>(1), "bucket of {k}");
    }
}
