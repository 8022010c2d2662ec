//! TLS from the router to a shard, as the shard URL's libpq parameters say:
//! `sslmode`, `sslrootcert`, `sslcert` and `sslkey`, with libpq's meanings, so
//! a URL that works with psql works here.
//!
//! | sslmode | asks for TLS | a server that declines | certificate checked |
//! |---|---|---|---|
//! | `disable` | never | – | – |
//! | `allow` | only if a plain login is refused | plain | against `sslrootcert` if given |
//! | `prefer` (default) | first | plain | against `sslrootcert` if given |
//! | `require` | first | refused | against `sslrootcert` if given |
//! | `verify-ca` | first | refused | chains to `sslrootcert` (needed) |
//! | `verify-full` | first | refused | … and names the URL's host |
//!
//! As libpq does, a root certificate file, once given, is always checked (its
//! documentation: "if a root CA file exists, the behavior of sslmode=require
//! will be the same as that of verify-ca"). Unlike libpq, nothing is read from
//! `~/.postgresql/`: a router's files are the ones its shard URLs name.

use std::path::PathBuf;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{verify_server_cert_signed_by_trust_anchor, verify_server_name};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::{provider, read_certs, read_key, Stream, TlsError};
use crate::protocol::messages;

/// libpq's `sslmode`, in its order: each mode asks at least what the one before does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub enum ShardSslMode {
    Disable,
    Allow,
    #[default]
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl ShardSslMode {
    const ALL: [ShardSslMode; 6] = [
        ShardSslMode::Disable,
        ShardSslMode::Allow,
        ShardSslMode::Prefer,
        ShardSslMode::Require,
        ShardSslMode::VerifyCa,
        ShardSslMode::VerifyFull,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ShardSslMode::Disable => "disable",
            ShardSslMode::Allow => "allow",
            ShardSslMode::Prefer => "prefer",
            ShardSslMode::Require => "require",
            ShardSslMode::VerifyCa => "verify-ca",
            ShardSslMode::VerifyFull => "verify-full",
        }
    }

    fn parse(s: &str) -> Result<ShardSslMode, String> {
        Self::ALL.into_iter().find(|m| m.name() == s).ok_or_else(|| {
            format!("invalid sslmode {s:?}: use disable, allow, prefer, require, verify-ca or verify-full")
        })
    }

    /// Whether a server that declines TLS is given up on.
    pub fn requires_tls(self) -> bool {
        self >= ShardSslMode::Require
    }

    /// Whether the first attempt to log in asks for TLS (`allow` asks only
    /// when a plain login is refused).
    pub fn asks_first(self) -> bool {
        self >= ShardSslMode::Prefer
    }
}

/// The TLS settings of one shard URL. Paths only: the files are read when a
/// connection needs them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ShardTls {
    pub mode: ShardSslMode,
    /// Trusted CA certificates (PEM) the shard's certificate must chain to.
    pub root_cert: Option<PathBuf>,
    /// The router's client certificate and key (PEM), for `cert` logins or
    /// `clientcert=verify-*` in the shard's pg_hba.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

impl ShardTls {
    /// Takes one URL query parameter if it is a TLS one: true when taken,
    /// false when it is not about TLS (and the caller may ignore it).
    pub fn set(&mut self, name: &str, value: &str) -> Result<bool, String> {
        match name {
            "sslmode" => self.mode = ShardSslMode::parse(value)?,
            "sslrootcert" if value == "system" => {
                return Err("sslrootcert=system is not supported: name a file of trusted CA certificates".into())
            }
            "sslrootcert" => self.root_cert = Some(value.into()),
            "sslcert" => self.cert = Some(value.into()),
            "sslkey" => self.key = Some(value.into()),
            "sslnegotiation" if value == "postgres" => {}
            "sslcrl" | "sslcrldir" | "sslpassword" | "sslnegotiation" => {
                // Not the value: sslpassword's is a secret.
                return Err(format!("{name} is not supported in shard URLs"));
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// Checks what parsing one parameter at a time cannot.
    pub fn check(&self) -> Result<(), String> {
        if self.cert.is_some() != self.key.is_some() {
            return Err("sslcert and sslkey must be given together".into());
        }
        if self.mode >= ShardSslMode::VerifyCa && self.root_cert.is_none() {
            return Err(format!("sslmode={} needs sslrootcert, a file of trusted CA certificates", self.mode.name()));
        }
        Ok(())
    }

    /// The URL query parameters that give these settings back (none for the
    /// default: `prefer`, no files).
    pub fn url_params(&self) -> Vec<(&'static str, String)> {
        let mut params = Vec::new();
        if self.mode != ShardSslMode::default() {
            params.push(("sslmode", self.mode.name().to_string()));
        }
        let files = [("sslrootcert", &self.root_cert), ("sslcert", &self.cert), ("sslkey", &self.key)];
        for (name, path) in files {
            if let Some(p) = path {
                params.push((name, p.display().to_string()));
            }
        }
        params
    }

    /// The rustls configuration of one connection: the shard's certificate
    /// checked as the mode says, the client certificate if there is one.
    pub fn client_config(&self) -> Result<Arc<ClientConfig>, TlsError> {
        let provider = provider();
        let roots = match &self.root_cert {
            Some(path) => {
                let mut roots = RootCertStore::empty();
                for cert in read_certs(path, "sslrootcert")? {
                    roots.add(cert).map_err(|e| TlsError::file("sslrootcert", path, e))?;
                }
                Some(Arc::new(roots))
            }
            None => None,
        };
        let verifier = ShardVerifier { roots, check_name: self.mode == ShardSslMode::VerifyFull, provider };
        let builder = ClientConfig::builder_with_provider(verifier.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| TlsError::Setting(format!("TLS versions: {e}")))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier));
        let config = match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => builder
                .with_client_auth_cert(read_certs(cert, "sslcert")?, read_key(key, "sslkey")?)
                .map_err(|e| TlsError::Setting(format!("sslcert and sslkey do not make a usable pair: {e}")))?,
            _ => builder.with_no_client_auth(),
        };
        Ok(Arc::new(config))
    }

    /// Asks a freshly connected shard for TLS (when `ask`) and runs the
    /// handshake if it agrees; a plain stream when it declines and the mode
    /// allows that.
    pub async fn negotiate(&self, mut tcp: TcpStream, host: &str, ask: bool) -> Result<Stream, TlsError> {
        if !ask {
            return Ok(Stream::Plain(tcp));
        }
        tcp.write_all(&messages::ssl_request()).await.map_err(TlsError::Handshake)?;
        // Exactly one byte: whatever follows an `S` is the server's TLS, and
        // must not be read as plain protocol (CVE-2021-23222).
        let mut answer = [0u8; 1];
        tcp.read_exact(&mut answer).await.map_err(TlsError::Handshake)?;
        match answer[0] {
            b'S' => {
                let name = ServerName::try_from(host.to_string())
                    .map_err(|_| TlsError::Setting(format!("{host:?} is not a host name TLS can check")))?;
                let tls =
                    TlsConnector::from(self.client_config()?).connect(name, tcp).await.map_err(TlsError::Handshake)?;
                Ok(Stream::Tls(Box::new(tls.into())))
            }
            b'N' if !self.mode.requires_tls() => Ok(Stream::Plain(tcp)),
            b'N' => Err(TlsError::Setting(format!(
                "the server does not accept TLS connections, and sslmode={} requires TLS",
                self.mode.name()
            ))),
            other => Err(TlsError::Setting(format!("the server answered the TLS request with {:?}", other as char))),
        }
    }
}

/// Checks a shard's certificate as its settings say: nothing without root
/// certificates, the chain with them, and the host name too for `verify-full`.
/// The handshake's own signatures are always checked.
#[derive(Debug)]
struct ShardVerifier {
    roots: Option<Arc<RootCertStore>>,
    check_name: bool,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for ShardVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if let Some(roots) = &self.roots {
            let cert = ParsedCertificate::try_from(end_entity)?;
            let algorithms = self.provider.signature_verification_algorithms.all;
            verify_server_cert_signed_by_trust_anchor(&cert, roots, intermediates, now, algorithms)?;
            if self.check_name {
                verify_server_name(&cert, server_name)?;
            }
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_parameters_round_trip_and_bad_ones_are_named() {
        let mut tls = ShardTls::default();
        assert!(tls.set("sslmode", "verify-full").unwrap());
        assert!(tls.set("sslrootcert", "/etc/ca.pem").unwrap());
        assert!(!tls.set("connect_timeout", "3").unwrap());
        tls.check().unwrap();
        assert_eq!(
            tls.url_params(),
            vec![("sslmode", "verify-full".to_string()), ("sslrootcert", "/etc/ca.pem".to_string())]
        );
        assert!(tls.set("sslmode", "verify").unwrap_err().contains("verify-full"));
        assert!(tls.set("sslpassword", "x").is_err());
        let needs_root = ShardTls { mode: ShardSslMode::VerifyCa, ..Default::default() };
        assert!(needs_root.check().unwrap_err().contains("sslrootcert"));
        assert!(ShardTls::default().url_params().is_empty());
    }
}
