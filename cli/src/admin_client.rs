//! The CLI's side of the admin API: find the node, send requests with its token,
//! in the clear or over HTTPS.
//!
//! HTTP is hyper's client, the same HTTP stack the node serves the API with, and
//! TLS is rustls with the workspace's one crypto provider: no second HTTP or TLS
//! library. The commands are blocking, so each request runs on a small runtime
//! of its own; a command sends a handful of requests, `status --watch` one a
//! second.

use std::net::ToSocketAddrs;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HOST};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use serde::de::DeserializeOwned;
use serde::Serialize;
use shardgate_router::admin::api::ApiError;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use crate::up::ClusterFile;

/// How long reaching the node may take, and then its answer.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

pub struct Api {
    /// As the operator gave it (`host:port`, `http://host:port` or
    /// `https://host:port`): what messages name.
    pub addr: String,
    /// `host:port`, without the scheme.
    authority: String,
    /// The TLS to open on the connection, for an `https://` address.
    tls: Option<Tls>,
    pub token: Option<String>,
}

/// An `https://` node: whom its certificate must be issued to, and by whom.
struct Tls {
    connector: tokio_rustls::TlsConnector,
    name: ServerName<'static>,
}

impl Api {
    /// The node named by `--admin` (token from SHARDGATE_ADMIN_TOKEN), or the
    /// cluster `up` started in `data_dir`. An `https://` address needs the CA
    /// that signed the node's certificate (`--admin-ca`, SHARDGATE_ADMIN_CA).
    pub fn find(data_dir: &Path, admin: Option<&str>, ca: Option<&Path>) -> Result<Api> {
        let env_token = std::env::var("SHARDGATE_ADMIN_TOKEN").ok();
        match admin {
            Some(a) => Api::at(a, env_token, ca),
            None => {
                let c = ClusterFile::read(data_dir)?;
                Api::at(&c.admin, env_token.or(c.admin_token), ca)
            }
        }
    }

    fn at(addr: &str, token: Option<String>, ca: Option<&Path>) -> Result<Api> {
        let trimmed = addr.trim_end_matches('/');
        let (https, authority) = match trimmed.split_once("://") {
            Some(("https", rest)) => (true, rest),
            Some(("http", rest)) => (false, rest),
            Some((scheme, _)) => bail!("--admin {addr:?}: the admin API speaks http or https, not {scheme}"),
            None => (false, trimmed),
        };
        let host = host_of(authority)
            .ok_or_else(|| anyhow!("{addr:?} is not an address like 127.0.0.1:6433 or https://node1:6433"))?;
        let tls = if https {
            let Some(ca) = ca else {
                bail!(
                    "{addr} is an HTTPS address: set SHARDGATE_ADMIN_CA (or --admin-ca) to the PEM file of the CA \
                     that signed the node's certificate ([router] tls_cert_file)"
                );
            };
            Some(Tls::new(ca, host)?)
        } else {
            None
        };
        Ok(Api { addr: addr.to_string(), authority: authority.to_string(), tls, token })
    }

    /// `GET path`, read as the API's answer type `T` (see
    /// `shardgate_router::admin::api`).
    pub fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        let body = self.request("GET", path, None)?;
        self.read(&body, "GET", path)
    }

    /// `POST path` with a request of the API's, read as its answer type `T`.
    pub fn post<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> Result<T> {
        let body = self.request("POST", path, Some(serde_json::to_string(body)?))?;
        self.read(&body, "POST", path)
    }

    fn read<T: DeserializeOwned>(&self, body: &str, method: &str, path: &str) -> Result<T> {
        serde_json::from_str(body).with_context(|| {
            format!(
                "the admin API at {} answered {method} {path} in a form this shardgate cannot read; \
                 are the CLI and the node the same version (`shardgate --version`)?",
                self.addr
            )
        })
    }

    /// Sends one request; the body of a 200 answer, or the API's error.
    fn request(&self, method: &str, path: &str, body: Option<String>) -> Result<String> {
        let runtime =
            tokio::runtime::Builder::new_current_thread().enable_all().build().context("cannot start a runtime")?;
        let (status, body) = runtime.block_on(self.exchange(method, path, body.unwrap_or_default()))?;
        if status != 200 {
            let msg = serde_json::from_str::<ApiError>(&body).map(|e| e.error).unwrap_or(body);
            bail!("{msg}");
        }
        Ok(body)
    }

    /// Connects (with TLS for an `https://` node) and exchanges one request.
    async fn exchange(&self, method: &str, path: &str, body: String) -> Result<(u16, String)> {
        let unreachable = || {
            format!(
                "cannot reach the admin API at {}; is shardgate running? start it with `shardgate up` or `shardgate serve`",
                self.addr
            )
        };
        let socket =
            self.authority.to_socket_addrs().with_context(unreachable)?.next().ok_or_else(|| anyhow!(unreachable()))?;
        let tcp = within(CONNECT_TIMEOUT, TcpStream::connect(socket)).await.with_context(unreachable)?;
        match &self.tls {
            None => self.send(tcp, method, path, body).await,
            Some(tls) => {
                let stream =
                    within(CONNECT_TIMEOUT, tls.connector.connect(tls.name.clone(), tcp)).await.with_context(|| {
                        format!(
                            "TLS with the admin API at {} failed; is SHARDGATE_ADMIN_CA (or --admin-ca) the CA that \
                             signed its certificate, and is the certificate issued to the name in the address?",
                            self.addr
                        )
                    })?;
                self.send(stream, method, path, body).await
            }
        }
    }

    async fn send<S>(&self, stream: S, method: &str, path: &str, body: String) -> Result<(u16, String)>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let no_http = || {
            let hint = if self.tls.is_none() {
                format!("; if it serves HTTPS ([admin] tls = true), name it as --admin https://{}", self.authority)
            } else {
                String::new()
            };
            format!("the admin API at {} gave no HTTP answer{hint}", self.addr)
        };
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.with_context(no_http)?;
        tokio::spawn(connection);
        let mut request = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header(HOST, &self.authority)
            .header(CONTENT_TYPE, "application/json");
        if let Some(t) = &self.token {
            request = request.header(AUTHORIZATION, format!("Bearer {t}"));
        }
        let request = request.body(Full::new(Bytes::from(body))).context("cannot build the request")?;
        let exchange = async {
            let answer = sender.send_request(request).await?;
            let status = answer.status().as_u16();
            let body = answer.into_body().collect().await?.to_bytes();
            Ok::<_, hyper::Error>((status, String::from_utf8_lossy(&body).into_owned()))
        };
        within(ANSWER_TIMEOUT, exchange).await.with_context(no_http)
    }
}

/// What `work` comes to, or an error when it takes longer than `limit`.
async fn within<T, E>(limit: Duration, work: impl std::future::Future<Output = Result<T, E>>) -> Result<T>
where
    E: std::error::Error + Send + Sync + 'static,
{
    match tokio::time::timeout(limit, work).await {
        Ok(outcome) => Ok(outcome?),
        Err(_) => bail!("no answer within {} s", limit.as_secs()),
    }
}

impl Tls {
    /// Trusts the CA certificates of the PEM file `ca` only, and checks that the
    /// node's certificate is issued to `host` (a name or an IP address).
    fn new(ca: &Path, host: &str) -> Result<Tls> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in shardgate_router::tls::read_certs(ca, "SHARDGATE_ADMIN_CA")? {
            roots
                .add(cert)
                .with_context(|| format!("SHARDGATE_ADMIN_CA {}: not a usable CA certificate", ca.display()))?;
        }
        let mut config = rustls::ClientConfig::builder_with_provider(shardgate_router::tls::provider())
            .with_safe_default_protocol_versions()
            .context("TLS versions")?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let name = ServerName::try_from(host.to_string()).with_context(|| format!("{host:?} is not a host name"))?;
        Ok(Tls { connector: tokio_rustls::TlsConnector::from(Arc::new(config)), name })
    }
}

/// The host of `host:port` (`[::1]:6433` gives `::1`); None without a port.
fn host_of(authority: &str) -> Option<&str> {
    let (host, port) = authority.rsplit_once(':')?;
    port.parse::<u16>().ok()?;
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    (!host.is_empty()).then_some(host)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_addresses_name_a_scheme_or_none() {
        assert_eq!(host_of("127.0.0.1:6433"), Some("127.0.0.1"));
        assert_eq!(host_of("[::1]:6433"), Some("::1"));
        assert_eq!(host_of("node1:6433"), Some("node1"));
        assert_eq!(host_of("node1"), None);
        assert_eq!(host_of(":6433"), None);
        let plain = Api::at("http://127.0.0.1:6433/", None, None).unwrap();
        assert!(plain.tls.is_none() && plain.authority == "127.0.0.1:6433");
        let err = Api::at("https://127.0.0.1:6433", None, None).err().unwrap().to_string();
        assert!(err.contains("SHARDGATE_ADMIN_CA"), "{err}");
        assert!(Api::at("ftp://127.0.0.1:6433", None, None).is_err());
    }
}
