//! TLS between directory nodes: mutual, with the cluster's own CA.
//!
//! Each node presents a certificate signed by the cluster CA, for the name its
//! peers dial it by (a DNS name or an IP address, as a subject alternative
//! name), and accepts only peers whose certificate the same CA signed. The
//! cluster token still opens every connection, inside the TLS session: a node
//! needs both the CA's signature and the token. rustls with the ring
//! provider, TLS 1.2 and 1.3, as everywhere in the workspace.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// Where a node's TLS files are: the cluster CA, its certificate and key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RaftTlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    /// Never logged (the path is; the key is not read into any message).
    pub key: PathBuf,
}

/// A node's side of both handshakes, built once at start.
pub struct RaftTls {
    acceptor: TlsAcceptor,
    connector: TlsConnector,
}

impl std::fmt::Debug for RaftTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RaftTls { .. }")
    }
}

/// The two ends of a raft connection, plain or TLS.
pub trait RaftStream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> RaftStream for T {}

impl RaftTls {
    /// Reads the files; an error names the setting and the file, never a key.
    pub fn from_files(files: &RaftTlsFiles) -> Result<Arc<RaftTls>, String> {
        #[allow(deprecated)] // ring, as the router: see shardgate_router::tls::provider
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let ca = read_certs(&files.ca, "tls_ca_file")?;
        let mut roots = RootCertStore::empty();
        for c in ca {
            roots.add(c).map_err(|e| format!("cannot use tls_ca_file {}: {e}", files.ca.display()))?;
        }
        let roots = Arc::new(roots);
        let chain = read_certs(&files.cert, "tls_cert_file")?;
        let key = || {
            PrivateKeyDer::from_pem_file(&files.key)
                .map_err(|e| format!("cannot use tls_key_file {}: {e}", files.key.display()))
        };
        let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|e| format!("cannot use tls_ca_file {} to check peers: {e}", files.ca.display()))?;
        let versions = [&rustls::version::TLS13, &rustls::version::TLS12];
        let server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&versions)
            .map_err(|e| e.to_string())?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key()?)
            .map_err(|e| format!("tls_cert_file and tls_key_file do not make a usable pair: {e}"))?;
        let client = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&versions)
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key()?)
            .map_err(|e| format!("tls_cert_file and tls_key_file do not make a usable pair: {e}"))?;
        Ok(Arc::new(RaftTls {
            acceptor: TlsAcceptor::from(Arc::new(server)),
            connector: TlsConnector::from(Arc::new(client)),
        }))
    }

    /// The server side: the peer must present a certificate of the cluster CA.
    pub(super) async fn accept(&self, tcp: TcpStream) -> std::io::Result<Box<dyn RaftStream>> {
        Ok(Box::new(self.acceptor.accept(tcp).await?))
    }

    /// The client side, checking that the peer's certificate names `addr`'s host.
    pub(super) async fn connect(&self, tcp: TcpStream, addr: &str) -> std::io::Result<Box<dyn RaftStream>> {
        let host = match addr.rsplit_once(':') {
            Some((h, _)) => h.trim_start_matches('[').trim_end_matches(']'),
            None => addr,
        };
        let name = ServerName::try_from(host.to_string())
            .map_err(|_| std::io::Error::other(format!("{host:?} is not a name TLS can check")))?;
        Ok(Box::new(self.connector.connect(name, tcp).await?))
    }
}

fn read_certs(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|c| c.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("cannot use {what} {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("cannot use {what} {}: no PEM certificate in it", path.display()));
    }
    Ok(certs)
}
