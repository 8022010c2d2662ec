//! Control connections to the shards: `tokio-postgres` sessions the migrator
//! uses to set up replication, arm fences and compute checksums, under TLS as
//! the shard URL's `sslmode` says (the router's rules: `shardgate_router::tls`).
//! They never carry application traffic.

use std::time::Duration;

use shardgate_router::moves::{ShardAddress, ShardSslMode};
use tokio_postgres::config::SslMode;
use tokio_postgres::Client;
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::Error;

/// One shard as the migrator sees it: its directory name and how to reach it.
#[derive(Clone)]
pub struct Endpoint {
    pub name: String,
    pub addr: ShardAddress,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The address's password must never reach a log line.
        write!(f, "{} ({})", self.name, self.addr.display_url())
    }
}

impl Endpoint {
    pub fn new(name: impl Into<String>, addr: ShardAddress) -> Endpoint {
        Endpoint { name: name.into(), addr }
    }

    /// A control session, named so that `pg_stat_activity` shows what it is.
    pub async fn connect(&self, purpose: &str) -> Result<Client, Error> {
        let mut config = tokio_postgres::Config::new();
        config
            .host(&self.addr.host)
            .port(self.addr.port)
            .dbname(&self.addr.database)
            .user(&self.addr.user)
            .application_name(format!("shardgate migrator: {purpose}"))
            .connect_timeout(Duration::from_secs(10));
        if let Some(p) = &self.addr.password {
            config.password(p);
        }
        // tokio-postgres has no `allow`: it asks for TLS first, as `prefer` does.
        config.ssl_mode(match self.addr.tls.mode {
            ShardSslMode::Disable => SslMode::Disable,
            ShardSslMode::Allow | ShardSslMode::Prefer => SslMode::Prefer,
            _ => SslMode::Require,
        });
        let tls = self.addr.tls.client_config().map_err(|e| Error::Postgres {
            shard: self.name.clone(),
            action: "connect".into(),
            message: e.to_string(),
        })?;
        let tls = MakeRustlsConnect::new(std::sync::Arc::unwrap_or_clone(tls));
        let (client, conn) = config.connect(tls).await.map_err(|e| Error::pg(&self.name, "connect", e))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(client)
    }

    /// The libpq connection string a subscription on another shard uses to reach this
    /// one. It holds the password if there is one: Postgres keeps it in
    /// `pg_subscription`, readable by superusers only, as it does for any subscription.
    pub fn conninfo(&self) -> String {
        let mut s = format!(
            "host={} port={} dbname={} user={}",
            conninfo_value(&self.addr.host),
            self.addr.port,
            conninfo_value(&self.addr.database),
            conninfo_value(&self.addr.user)
        );
        if let Some(p) = &self.addr.password {
            s.push_str(&format!(" password={}", conninfo_value(p)));
        }
        // The same TLS settings, so the subscriber reaches this shard as the
        // router does; their files must be readable by the subscriber's server.
        for (name, value) in self.addr.tls.url_params() {
            s.push_str(&format!(" {name}={}", conninfo_value(&value)));
        }
        s
    }
}

/// Quotes a value for a libpq keyword/value connection string.
fn conninfo_value(v: &str) -> String {
    format!("'{}'", v.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// Runs a query and returns its first column of its first row as text.
pub async fn scalar(client: &Client, sql: &str) -> Result<Option<String>, tokio_postgres::Error> {
    let rows = client.simple_query(sql).await?;
    for m in rows {
        if let tokio_postgres::SimpleQueryMessage::Row(r) = m {
            return Ok(r.get(0).map(str::to_string));
        }
    }
    Ok(None)
}

/// Runs a query and returns every row as text columns.
pub async fn rows(client: &Client, sql: &str) -> Result<Vec<Vec<Option<String>>>, tokio_postgres::Error> {
    let mut out = Vec::new();
    for m in client.simple_query(sql).await? {
        if let tokio_postgres::SimpleQueryMessage::Row(r) = m {
            out.push((0..r.len()).map(|i| r.get(i).map(str::to_string)).collect());
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conninfo_values_are_quoted_for_libpq() {
        assert_eq!(conninfo_value(r"a'b\c"), r"'a\'b\\c'");
    }

    #[test]
    fn subscriptions_reach_the_shard_with_its_tls_settings() {
        let url = "postgres://app@db1/orders?sslmode=verify-full&sslrootcert=/etc/ca.crt";
        let endpoint = Endpoint::new("shard_0", ShardAddress::from_url(url).unwrap());
        assert_eq!(
            endpoint.conninfo(),
            "host='db1' port=5432 dbname='orders' user='app' sslmode='verify-full' sslrootcert='/etc/ca.crt'"
        );
    }
}
