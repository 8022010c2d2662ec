//! TLS on both sides of the router: clients' TLS ends at the router
//! (`accept.rs`), and the router opens TLS of its own to shards whose URL asks
//! for it (`connect.rs`). Either way a socket becomes a [`Stream`] (`stream.rs`),
//! the one byte stream sessions and server connections read and write.
//!
//! rustls with the `ring` provider, named explicitly everywhere (never a
//! process-wide default), TLS 1.2 and 1.3 only: what rustls speaks at all.
//! Certificate and key files are read when a configuration is built: at start
//! for the client side, at each new shard connection for the shard side, so a
//! renewed shard certificate file is picked up without a restart.

mod accept;
mod connect;
mod stream;

use std::path::Path;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

pub use accept::{https_acceptor, ClientSslMode, ClientTls};
pub use connect::{ShardSslMode, ShardTls};
pub use stream::Stream;

/// The crypto provider every TLS configuration of the workspace is built with.
///
/// rustls deprecates ring's provider to steer users to aws-lc-rs, whose build
/// needs cmake and whose post-quantum key exchange neither Postgres nor libpq
/// (OpenSSL 3.0 here) offers; ring builds with the C compiler alone.
#[allow(deprecated)]
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The certificates of a PEM file (a chain, or a set of trusted roots).
pub fn read_certs(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsError::file(what, path, e))?;
    if certs.is_empty() {
        return Err(TlsError::file(what, path, "no PEM certificate in it"));
    }
    Ok(certs)
}

/// The private key of a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn read_key(path: &Path, what: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::file(what, path, e))
}

/// A TLS setting that cannot be put to use. Names files and settings, never
/// their contents.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot use {what} {path}: {reason}")]
    File { what: String, path: String, reason: String },
    #[error("{0}")]
    Setting(String),
    #[error("TLS: {0}")]
    Handshake(std::io::Error),
}

impl TlsError {
    fn file(what: &str, path: &Path, reason: impl std::fmt::Display) -> TlsError {
        TlsError::File { what: what.to_string(), path: path.display().to_string(), reason: reason.to_string() }
    }
}
