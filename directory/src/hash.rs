//! The hash Postgres itself uses for hash partitioning, so that a bucket can be
//! computed the same way by the router (here) and by a shard (in plain SQL).
//!
//! `bucket = (hash(key, seed 0) & i64::MAX) % bucket_count`, where `hash` is
//! `hashint8extended`, `hashtextextended` or `uuid_hash_extended`. The mask keeps the
//! result non-negative, because Postgres's `%` keeps the sign of the dividend; the
//! same expression in SQL is [`bucket_sql`].
//!
//! The mixing below is Bob Jenkins' lookup3 as adapted in Postgres's
//! `src/common/hashfn.c` (`hash_bytes_extended`, `hash_bytes_uint32_extended`),
//! little-endian byte order as on every platform shardgate runs on. Tests in the
//! `shardgate-tests` crate compare it with a real server for thousands of keys.

use crate::TenantKey;

#[inline(always)]
fn mix(a: &mut u32, b: &mut u32, c: &mut u32) {
    *a = a.wrapping_sub(*c);
    *a ^= c.rotate_left(4);
    *c = c.wrapping_add(*b);
    *b = b.wrapping_sub(*a);
    *b ^= a.rotate_left(6);
    *a = a.wrapping_add(*c);
    *c = c.wrapping_sub(*b);
    *c ^= b.rotate_left(8);
    *b = b.wrapping_add(*a);
    *a = a.wrapping_sub(*c);
    *a ^= c.rotate_left(16);
    *c = c.wrapping_add(*b);
    *b = b.wrapping_sub(*a);
    *b ^= a.rotate_left(19);
    *a = a.wrapping_add(*c);
    *c = c.wrapping_sub(*b);
    *c ^= b.rotate_left(4);
    *b = b.wrapping_add(*a);
}

#[inline(always)]
fn finalize(a: &mut u32, b: &mut u32, c: &mut u32) {
    *c ^= *b;
    *c = c.wrapping_sub(b.rotate_left(14));
    *a ^= *c;
    *a = a.wrapping_sub(c.rotate_left(11));
    *b ^= *a;
    *b = b.wrapping_sub(a.rotate_left(25));
    *c ^= *b;
    *c = c.wrapping_sub(b.rotate_left(16));
    *a ^= *c;
    *a = a.wrapping_sub(c.rotate_left(4));
    *b ^= *a;
    *b = b.wrapping_sub(a.rotate_left(14));
    *c ^= *b;
    *c = c.wrapping_sub(b.rotate_left(24));
}

const INIT: u32 = 0x9e37_79b9u32.wrapping_add(3_923_095);

fn seed_state(a: &mut u32, b: &mut u32, c: &mut u32, seed: u64) {
    if seed != 0 {
        *a = a.wrapping_add((seed >> 32) as u32);
        *b = b.wrapping_add(seed as u32);
        mix(a, b, c);
    }
}

fn word(k: &[u8]) -> u32 {
    u32::from_le_bytes([k[0], k[1], k[2], k[3]])
}

/// `hash_bytes_extended(k, len, seed)`: Postgres's `hash_any_extended`.
pub fn hash_bytes_extended(k: &[u8], seed: u64) -> u64 {
    let init = INIT.wrapping_add(k.len() as u32);
    let (mut a, mut b, mut c) = (init, init, init);
    seed_state(&mut a, &mut b, &mut c, seed);
    let mut k = k;
    while k.len() >= 12 {
        a = a.wrapping_add(word(&k[0..]));
        b = b.wrapping_add(word(&k[4..]));
        c = c.wrapping_add(word(&k[8..]));
        mix(&mut a, &mut b, &mut c);
        k = &k[12..];
    }
    // The last 11 bytes; the lowest byte of c is reserved for the length (unused).
    let len = k.len();
    if len >= 11 {
        c = c.wrapping_add((k[10] as u32) << 24);
    }
    if len >= 10 {
        c = c.wrapping_add((k[9] as u32) << 16);
    }
    if len >= 9 {
        c = c.wrapping_add((k[8] as u32) << 8);
    }
    if len >= 8 {
        b = b.wrapping_add((k[7] as u32) << 24);
    }
    if len >= 7 {
        b = b.wrapping_add((k[6] as u32) << 16);
    }
    if len >= 6 {
        b = b.wrapping_add((k[5] as u32) << 8);
    }
    if len >= 5 {
        b = b.wrapping_add(k[4] as u32);
    }
    if len >= 4 {
        a = a.wrapping_add((k[3] as u32) << 24);
    }
    if len >= 3 {
        a = a.wrapping_add((k[2] as u32) << 16);
    }
    if len >= 2 {
        a = a.wrapping_add((k[1] as u32) << 8);
    }
    if len >= 1 {
        a = a.wrapping_add(k[0] as u32);
    }
    finalize(&mut a, &mut b, &mut c);
    ((b as u64) << 32) | c as u64
}

/// `hash_bytes_uint32_extended(k, seed)`.
pub fn hash_uint32_extended(k: u32, seed: u64) -> u64 {
    let init = INIT.wrapping_add(4);
    let (mut a, mut b, mut c) = (init, init, init);
    seed_state(&mut a, &mut b, &mut c, seed);
    a = a.wrapping_add(k);
    finalize(&mut a, &mut b, &mut c);
    ((b as u64) << 32) | c as u64
}

/// `hashint8extended(v, seed)`, as a signed bigint like SQL returns it. Equal to
/// `hashint4extended` and `hashint2extended` for values that fit those types.
pub fn hashint8extended(v: i64, seed: u64) -> i64 {
    let lo = v as u32;
    let hi = (v >> 32) as u32;
    let folded = if v >= 0 { lo ^ hi } else { lo ^ !hi };
    hash_uint32_extended(folded, seed) as i64
}

/// `hashtextextended(s, seed)` under a deterministic collation (the bytes as stored).
pub fn hashtextextended(s: &str, seed: u64) -> i64 {
    hash_bytes_extended(s.as_bytes(), seed) as i64
}

/// `uuid_hash_extended(u, seed)`.
pub fn uuid_hash_extended(u: &uuid::Uuid, seed: u64) -> i64 {
    hash_bytes_extended(u.as_bytes(), seed) as i64
}

/// The Postgres hash of a tenant key, with seed 0.
pub fn key_hash(key: &TenantKey) -> i64 {
    match key {
        TenantKey::Int(v) => hashint8extended(*v, 0),
        TenantKey::Text(s) => hashtextextended(s, 0),
        TenantKey::Uuid(u) => uuid_hash_extended(u, 0),
    }
}

/// The bucket of a tenant key among `bucket_count` buckets.
pub fn bucket_of(key: &TenantKey, bucket_count: u32) -> u32 {
    ((key_hash(key) & i64::MAX) % bucket_count as i64) as u32
}

/// The SQL expression that computes the bucket of `column` on a shard, for a key
/// column of the given type; it matches [`bucket_of`] row for row.
pub fn bucket_sql(column: &str, key_type: crate::KeyType, bucket_count: u32) -> String {
    let f = match key_type {
        crate::KeyType::Int => "hashint8extended",
        crate::KeyType::Text => "hashtextextended",
        crate::KeyType::Uuid => "uuid_hash_extended",
    };
    format!("(({f}({column}, 0) & 9223372036854775807) % {bucket_count})")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_integers_hash_like_int4() {
        // hashint8extended folds the high half in so that int2/int4/int8 agree.
        assert_eq!(hashint8extended(5, 0), hash_uint32_extended(5, 0) as i64);
        assert_eq!(hashint8extended(-5, 0), hash_uint32_extended((-5i32) as u32, 0) as i64);
    }

    #[test]
    fn buckets_are_in_range_and_spread() {
        let mut seen = vec![0u32; 16];
        for i in 0..16_000i64 {
            let b = bucket_of(&TenantKey::Int(i), 16);
            seen[b as usize] += 1;
        }
        assert!(seen.iter().all(|&n| n > 800), "{seen:?}");
    }
}
