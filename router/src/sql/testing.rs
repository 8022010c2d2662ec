//! A small cluster for routing tests: a directory, a catalog and a cache.

use std::sync::Arc;

use shardgate_directory::{Directory, KeyType, Shard, TenantKey};

use crate::context::Catalog;
use crate::error::SqlError;
use crate::route::{self, Params, Rules, Target};
use crate::sql::{Analysis, AnalysisCache};

pub struct Cluster {
    pub dir: Directory,
    pub catalog: Catalog,
    pub cache: AnalysisCache,
}

/// Two shards; `orders` (tenant_id, id, total) and `items` (id,
/// tenant_id) sharded, `plans` a reference table.
pub fn cluster() -> Cluster {
    let shard = |name: &str| Shard::new(name, format!("postgres://u@{name}/db"));
    let dir = Directory::new("tenant_id", KeyType::Int, 64, vec![shard("a"), shard("b")]).unwrap();
    let catalog = Catalog::default();
    let cols = |c: &[&str]| c.iter().map(|c| c.to_string()).collect::<Vec<_>>();
    catalog.replace(
        [
            ("orders".to_string(), cols(&["tenant_id", "id", "total"])),
            ("items".to_string(), cols(&["id", "tenant_id"])),
        ],
        ["orders".to_string(), "items".to_string(), "plans".to_string()],
    );
    Cluster { dir, catalog, cache: AnalysisCache::new("tenant_id", 100) }
}

impl Cluster {
    pub fn route_with(
        &self,
        sql: &str,
        params: &[Option<&[u8]>],
        session_tenant: Option<i64>,
        allow_cross_shard_writes: bool,
    ) -> Result<Target, SqlError> {
        let a: Arc<Analysis> = self.cache.get(sql).unwrap();
        let rules = Rules { allow_cross_shard_writes, ..Rules::default() };
        let p = Params { values: params, formats: &[], types: &[] };
        // As a session does: the statement's comment, else the session's tenant.
        let comment = a.comment_key.as_deref().map(|k| self.dir.key_type.parse_text(k).unwrap());
        let fallback = comment.or(session_tenant.map(TenantKey::Int));
        route::route(&a.statements[0], Some(&p), fallback.as_ref(), &self.dir, &self.catalog, &rules, &mut Vec::new())
    }

    pub fn route(&self, sql: &str) -> Result<Target, SqlError> {
        self.route_with(sql, &[], None, false)
    }

    pub fn shard_of(&self, tenant: i64) -> Target {
        Target::Shard(self.dir.shard_for(&TenantKey::Int(tenant)))
    }

    /// Two tenants on the same shard.
    pub fn neighbours(&self) -> (i64, i64) {
        let first = self.dir.shard_for(&TenantKey::Int(1));
        let other = (2..).find(|t| self.dir.shard_for(&TenantKey::Int(*t)) == first).unwrap();
        (1, other)
    }
}
