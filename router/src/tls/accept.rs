//! Clients' TLS, which ends at the router: the certificate it presents, and
//! whether a client may, or must, ask for TLS (`ssl_mode`).
//!
//! A client asks with an SSLRequest before its startup packet, as libpq does;
//! the router answers `S` and runs the handshake when it has a certificate and
//! `N` otherwise, and the client goes on in the clear or gives up, as its own
//! `sslmode` says. Client certificates are not asked for: clients log in with
//! a password (or trust), as the `[[users]]` list says.

use std::path::Path;
use std::sync::Arc;

use serde::Deserialize;
use tokio_rustls::TlsAcceptor;

use super::{provider, read_certs, read_key, TlsError};

/// Whether clients may or must use TLS (`[router] ssl_mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientSslMode {
    /// TLS requests are declined; everyone talks in the clear.
    Disable,
    /// Clients that ask get TLS; the others may talk in the clear.
    Allow,
    /// Clients that do not ask for TLS are refused (FATAL 28000).
    Require,
}

impl ClientSslMode {
    pub fn name(self) -> &'static str {
        match self {
            ClientSslMode::Disable => "disable",
            ClientSslMode::Allow => "allow",
            ClientSslMode::Require => "require",
        }
    }
}

/// The router's side of clients' TLS, built at start and again by each
/// reload (the files are read anew: a renewed certificate at the same path
/// is picked up).
#[derive(Clone)]
pub struct ClientTls {
    pub mode: ClientSslMode,
    acceptor: Option<TlsAcceptor>,
    /// SHA-256 of the certificate chain presented, to tell a reload whether
    /// the certificate changed.
    fingerprint: Option<[u8; 32]>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key: only whether there is one.
        write!(f, "ClientTls({}, certificate: {})", self.mode.name(), self.acceptor.is_some())
    }
}

impl ClientTls {
    /// No TLS: every SSLRequest is declined.
    pub fn disabled() -> ClientTls {
        ClientTls { mode: ClientSslMode::Disable, acceptor: None, fingerprint: None }
    }

    /// Reads the certificate chain and key. Without `mode`, a configured
    /// certificate means `allow` and none means `disable`.
    pub fn from_files(
        cert: Option<&Path>,
        key: Option<&Path>,
        mode: Option<ClientSslMode>,
    ) -> Result<ClientTls, TlsError> {
        let files = match (cert, key) {
            (Some(cert), Some(key)) => Some((cert, key)),
            (None, None) => None,
            _ => return Err(TlsError::Setting("tls_cert_file and tls_key_file must be set together".into())),
        };
        let mode = mode.unwrap_or(if files.is_some() { ClientSslMode::Allow } else { ClientSslMode::Disable });
        let (acceptor, fingerprint) = match (mode, files) {
            (ClientSslMode::Disable, _) => (None, None),
            (_, Some((cert, key))) => {
                let (config, fingerprint) = server_config(cert, key)?;
                (Some(TlsAcceptor::from(Arc::new(config))), Some(fingerprint))
            }
            (_, None) => {
                return Err(TlsError::Setting(format!(
                    "ssl_mode = \"{}\" needs a certificate: set tls_cert_file and tls_key_file",
                    mode.name()
                )))
            }
        };
        Ok(ClientTls { mode, acceptor, fingerprint })
    }

    /// Whether `other` presents another certificate than this one (or one
    /// where this has none).
    pub fn certificate_differs(&self, other: &ClientTls) -> bool {
        self.fingerprint != other.fingerprint
    }

    /// What the router answers a client's SSLRequest with: its acceptor, or
    /// None to decline.
    pub fn acceptor(&self) -> Option<&TlsAcceptor> {
        self.acceptor.as_ref()
    }

    /// Whether a client that did not ask for TLS is turned away.
    pub fn refuses_plain(&self) -> bool {
        self.mode == ClientSslMode::Require
    }
}

/// The acceptor of the admin API's HTTPS: the same certificate and key as
/// clients' TLS (`[router] tls_cert_file`, `tls_key_file`), offering HTTP/1.1
/// by ALPN.
pub fn https_acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, TlsError> {
    let (mut config, _) = server_config(cert, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// The server side of TLS with the chain of `cert` and its `key`, and the
/// chain's SHA-256.
fn server_config(cert: &Path, key: &Path) -> Result<(rustls::ServerConfig, [u8; 32]), TlsError> {
    use sha2::Digest;
    let chain = read_certs(cert, "tls_cert_file")?;
    let fingerprint = chain.iter().fold(sha2::Sha256::new(), |h, c| h.chain_update(c.as_ref())).finalize().into();
    let key_der = read_key(key, "tls_key_file")?;
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Setting(format!("TLS versions: {e}")))?
        .with_no_client_auth()
        .with_single_cert(chain, key_der)
        .map_err(|e| TlsError::Setting(format!("tls_cert_file and tls_key_file do not make a usable pair: {e}")))?;
    Ok((config, fingerprint))
}
