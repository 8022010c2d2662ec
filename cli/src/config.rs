//! The configuration file of `shardgate serve`: the one place a file becomes
//! settings. Every key is documented in docs/configuration.md.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use shardgate_directory::{Directory, KeyType, Shard};
use shardgate_router::backend::ShardAddress;
use shardgate_router::config::{RouterConfig, UserConfig};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default)]
    pub router: RouterConfig,
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub cluster: ClusterConfig,
    pub shards: Vec<ShardConfig>,
    #[serde(default)]
    pub users: Vec<UserConfig>,
    /// The replicated directory; without it the directory is static (from this file).
    #[serde(default)]
    pub directory: Option<DirectoryConfig>,
}

#[derive(Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DirectoryConfig {
    /// This node's raft id (a positive integer, unique in the cluster).
    pub node_id: u64,
    /// Address this node's raft transport listens on.
    pub listen: String,
    /// Where this node keeps its raft log, hard state and snapshots.
    pub data_dir: std::path::PathBuf,
    /// Shared secret every node presents to its peers.
    pub token: String,
    /// How long the router may go without hearing from the directory quorum
    /// before it refuses writes. Default 2 s.
    #[serde(default = "default_lease", deserialize_with = "duration")]
    pub lease: std::time::Duration,
    /// The other nodes.
    #[serde(default)]
    pub peers: Vec<PeerConfig>,
    /// Start a new cluster whose voters are this node and its peers, when this
    /// node has no data yet. Set it on every founding node, the same way.
    #[serde(default)]
    pub bootstrap: bool,
    /// Raft traffic under mutual TLS: the cluster's CA (PEM), which signs
    /// every node's certificate; all three keys or none.
    #[serde(default)]
    pub tls_ca_file: Option<std::path::PathBuf>,
    /// This node's certificate (PEM chain), for the name its peers dial it by.
    #[serde(default)]
    pub tls_cert_file: Option<std::path::PathBuf>,
    /// Its private key (PEM). Never logged.
    #[serde(default)]
    pub tls_key_file: Option<std::path::PathBuf>,
}

impl DirectoryConfig {
    /// The raft TLS files, when all three are set.
    pub fn tls(&self) -> Result<Option<shardgate_directory::replica::RaftTlsFiles>> {
        match (&self.tls_ca_file, &self.tls_cert_file, &self.tls_key_file) {
            (None, None, None) => Ok(None),
            (Some(ca), Some(cert), Some(key)) => Ok(Some(shardgate_directory::replica::RaftTlsFiles {
                ca: ca.clone(),
                cert: cert.clone(),
                key: key.clone(),
            })),
            _ => bail!("[directory] tls_ca_file, tls_cert_file and tls_key_file go together: set all three or none"),
        }
    }
}

#[derive(Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    pub id: u64,
    pub address: String,
}

fn default_lease() -> std::time::Duration {
    std::time::Duration::from_secs(2)
}

fn duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<std::time::Duration, D::Error> {
    let text = String::deserialize(d)?;
    shardgate_router::config::parse_duration(&text).map_err(serde::de::Error::custom)
}

#[derive(Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Address of the admin HTTP API. Default `127.0.0.1:6433`.
    #[serde(default = "default_admin")]
    pub listen: String,
    /// Bearer token every admin request must carry. Default: none (loopback only!).
    #[serde(default)]
    pub token: Option<String>,
    /// Serve HTTPS with the router's certificate (`[router] tls_cert_file` and
    /// `tls_key_file`). Default false.
    #[serde(default)]
    pub tls: bool,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig { listen: default_admin(), token: None, tls: false }
    }
}

fn default_admin() -> String {
    "127.0.0.1:6433".into()
}

#[derive(Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    #[serde(default = "default_key_column")]
    pub key_column: String,
    #[serde(default)]
    pub key_type: KeyType,
    #[serde(default = "default_buckets")]
    pub buckets: u32,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig { key_column: default_key_column(), key_type: KeyType::Int, buckets: default_buckets() }
    }
}

fn default_key_column() -> String {
    "tenant_id".into()
}
fn default_buckets() -> u32 {
    256
}

#[derive(Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardConfig {
    pub name: String,
    /// libpq URL; a password in it is used to log in and never shown.
    pub url: String,
    /// Password, if not in the URL.
    #[serde(default)]
    pub password: Option<String>,
}

impl FileConfig {
    pub fn load(path: &Path) -> Result<FileConfig> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("cannot read config file {}", path.display()))?;
        let mut cfg: FileConfig = toml::from_str(&text)
            .map_err(|e| anyhow::anyhow!("config file {} is not valid: {}", path.display(), toml_error(&text, &e)))?;
        cfg.router.users = std::mem::take(&mut cfg.users);
        for u in &cfg.router.users {
            u.credential().map_err(anyhow::Error::msg)?;
        }
        Ok(cfg)
    }

    /// Everything `serve` checks before it starts, short of binding its
    /// addresses: what `serve --check` and a reload check.
    pub fn check(&self) -> Result<()> {
        self.directory()?;
        self.admin_tls()?;
        Ok(())
    }

    /// The keys outside `[router]` (and `[[users]]`) that differ from
    /// `running`'s: none of them changes without a restart.
    pub fn restart_keys(&self, running: &FileConfig) -> Vec<String> {
        let FileConfig { router: _, admin, cluster, shards, users: _, directory } = self;
        let AdminConfig { listen, token, tls } = admin;
        let ClusterConfig { key_column, key_type, buckets } = cluster;
        [
            ("admin.listen", *listen != running.admin.listen),
            ("admin.token", *token != running.admin.token),
            ("admin.tls", *tls != running.admin.tls),
            ("cluster.key_column", *key_column != running.cluster.key_column),
            ("cluster.key_type", *key_type != running.cluster.key_type),
            ("cluster.buckets", *buckets != running.cluster.buckets),
            ("shards", *shards != running.shards),
            ("directory", *directory != running.directory),
        ]
        .into_iter()
        .filter(|(_, differs)| *differs)
        .map(|(key, _)| key.to_string())
        .collect()
    }

    /// The admin API's TLS when `[admin] tls` is set: the certificate and key
    /// clients' TLS uses, which must then be configured.
    pub fn admin_tls(&self) -> Result<Option<tokio_rustls::TlsAcceptor>> {
        if !self.admin.tls {
            return Ok(None);
        }
        let (Some(cert), Some(key)) = (&self.router.tls_cert_file, &self.router.tls_key_file) else {
            bail!(
                "[admin] tls = true serves the admin API with the router's certificate: \
                 set [router] tls_cert_file and tls_key_file (or [admin] tls = false)"
            );
        };
        let acceptor = shardgate_router::tls::https_acceptor(cert, key)
            .with_context(|| "the admin API's TLS ([admin] tls = true)".to_string())?;
        Ok(Some(acceptor))
    }

    /// The initial directory and the addresses of its shards, in the same order.
    pub fn directory(&self) -> Result<(Directory, Vec<ShardAddress>)> {
        if self.shards.is_empty() {
            bail!("the config file lists no [[shards]]; add at least one with name and url");
        }
        let mut shards = Vec::new();
        let mut addrs = Vec::new();
        for s in &self.shards {
            let mut addr = ShardAddress::from_url(&s.url).map_err(anyhow::Error::msg)?;
            if s.password.is_some() {
                addr.password = s.password.clone();
            }
            if shards.iter().any(|x: &Shard| x.name == s.name) {
                bail!("shard name {:?} appears twice in the config file", s.name);
            }
            shards.push(Shard::new(s.name.clone(), addr.display_url()));
            addrs.push(addr);
        }
        let dir = Directory::new(&self.cluster.key_column, self.cluster.key_type, self.cluster.buckets, shards)?;
        Ok((dir, addrs))
    }
}

/// A TOML error as its line, column and message, without the snippet of the
/// file that its `Display` quotes: the line may hold a password, and the
/// error of a reload goes to the log and to the admin API.
fn toml_error(text: &str, e: &toml::de::Error) -> String {
    let Some(span) = e.span() else { return e.message().to_string() };
    let before = &text[..span.start.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    format!("line {line}, column {column}: {}", e.message())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_config_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/shardgate.example.toml");
        let cfg = FileConfig::load(&path).unwrap();
        let (dir, addrs) = cfg.directory().unwrap();
        assert_eq!(dir.shards.len(), addrs.len());
        assert!(!dir.shards.iter().any(|s| s.url.contains("secret")));
    }

    #[test]
    fn admin_tls_needs_the_routers_certificate() {
        let cfg: FileConfig = toml::from_str("shards = []\n[admin]\ntls = true\n").unwrap();
        let err = cfg.admin_tls().err().expect("refused without a certificate").to_string();
        assert!(err.contains("[router] tls_cert_file and tls_key_file"), "{err}");
        let cfg: FileConfig = toml::from_str("shards = []\n").unwrap();
        assert!(cfg.admin_tls().unwrap().is_none(), "plain HTTP by default");
    }

    #[test]
    fn a_toml_error_names_its_line_and_not_what_is_on_it() {
        let text = "[router]\nlisten = \"127.0.0.1:1\"\nshard_password = \"hunter2\n";
        let e = toml::from_str::<FileConfig>(text).unwrap_err();
        let said = toml_error(text, &e);
        assert!(said.starts_with("line 3, column "), "{said}");
        assert!(!said.contains("hunter2"), "{said}");
    }

    #[test]
    fn unknown_keys_are_errors() {
        let err = toml::from_str::<FileConfig>("shards = []\n[router]\nlisten_port = 1\n").unwrap_err();
        assert!(err.to_string().contains("listen_port"), "{err}");
    }
}
