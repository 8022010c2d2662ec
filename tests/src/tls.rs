//! TLS in the end-to-end tests: a CA of the test's own, certificate files it
//! signs, and clients that check a server against it the way a driver with
//! `sslmode=verify-full` does (rustls' own verifier, not the router's).

use std::path::PathBuf;

use shardgate_localpg::{Issued, LocalCa, LOCAL_NAMES};
use tokio_postgres::Client;
use tokio_postgres_rustls::MakeRustlsConnect;

/// A CA made for one test, and the directory its files go to.
pub struct TestCa {
    pub ca: LocalCa,
    pub dir: tempfile::TempDir,
}

/// A certificate and key written to files.
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TestCa {
    /// A CA with a name of its own, as unrelated CAs have.
    pub fn new() -> TestCa {
        static MADE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = MADE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let ca = LocalCa::new(&format!("shardgate test CA {n}")).expect("make a CA");
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("root.crt"), ca.cert_pem()).expect("write root.crt");
        TestCa { ca, dir }
    }

    /// The CA certificate's file: clients' `sslrootcert`.
    pub fn root_cert(&self) -> PathBuf {
        self.dir.path().join("root.crt")
    }

    /// A server certificate for `localhost` and `127.0.0.1`.
    pub fn local_server(&self) -> Issued {
        self.issue(&LOCAL_NAMES)
    }

    pub fn issue(&self, names: &[&str]) -> Issued {
        self.ca.issue(names).expect("issue a certificate")
    }

    /// Writes `issued` as `<name>.crt` and `<name>.key`.
    pub fn write(&self, name: &str, issued: &Issued) -> CertFiles {
        let files = CertFiles {
            cert: self.dir.path().join(format!("{name}.crt")),
            key: self.dir.path().join(format!("{name}.key")),
        };
        std::fs::write(&files.cert, &issued.cert_pem).expect("write certificate");
        std::fs::write(&files.key, &issued.key_pem).expect("write key");
        files
    }

    /// A client TLS connector that trusts this CA only and checks host names.
    pub fn verify_full(&self) -> MakeRustlsConnect {
        MakeRustlsConnect::new(self.client_config())
    }

    /// A client TLS configuration that trusts this CA only (rustls checks host
    /// names itself).
    pub fn client_config(&self) -> rustls::ClientConfig {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(rustls::pki_types::CertificateDer::from(self.ca_der())).expect("add the CA");
        rustls::ClientConfig::builder_with_provider(shardgate_router::tls::provider())
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_root_certificates(roots)
            .with_no_client_auth()
    }

    fn ca_der(&self) -> Vec<u8> {
        use rustls::pki_types::pem::PemObject;
        rustls::pki_types::CertificateDer::from_pem_slice(self.ca.cert_pem().as_bytes()).expect("CA PEM").to_vec()
    }
}

impl Default for TestCa {
    fn default() -> Self {
        TestCa::new()
    }
}

/// Connects with `tls` (the URL's `sslmode` says whether TLS is asked for
/// and required).
pub async fn connect(url: &str, tls: MakeRustlsConnect) -> Result<Client, tokio_postgres::Error> {
    let (client, conn) = tokio_postgres::connect(url, tls).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}
