//! A local certificate authority: one CA, and server certificates it signs for
//! local names (`localhost`, `127.0.0.1`). `shardgate up` gives its router one,
//! so that `sslmode=verify-full` works on the demo; the tests give routers and
//! Postgres servers theirs.
//!
//! Nothing here is meant for a network: keys are ECDSA P-256 made on this
//! machine, and certificates last the rcgen default (until 4096), because a
//! demo that stops working one day is worse than a long-lived local CA.

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};

use crate::Error;

/// The names every local server certificate is good for.
pub const LOCAL_NAMES: [&str; 2] = ["localhost", "127.0.0.1"];

/// A CA made in this process.
pub struct LocalCa {
    cert: rcgen::Certificate,
    key: KeyPair,
}

/// A certificate and its private key, as PEM text.
pub struct Issued {
    pub cert_pem: String,
    /// Never logged.
    pub key_pem: String,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Issued { .. }")
    }
}

impl LocalCa {
    /// A new CA named `name` (its certificate's common name).
    pub fn new(name: &str) -> Result<LocalCa, Error> {
        let key = KeyPair::generate().map_err(certificate_error)?;
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(certificate_error)?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key).map_err(certificate_error)?;
        Ok(LocalCa { cert, key })
    }

    /// The CA's certificate: what clients name as `sslrootcert`.
    pub fn cert_pem(&self) -> String {
        self.cert.pem()
    }

    /// A server certificate for `names` (host names or IP addresses, as
    /// subject alternative names), signed by this CA.
    pub fn issue(&self, names: &[&str]) -> Result<Issued, Error> {
        let key = KeyPair::generate().map_err(certificate_error)?;
        let sans: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(sans).map_err(certificate_error)?;
        params.distinguished_name.push(DnType::CommonName, names.first().copied().unwrap_or("localhost"));
        let cert = params.signed_by(&key, &self.cert, &self.key).map_err(certificate_error)?;
        Ok(Issued { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }
}

/// Where a local CA and a server certificate it signed are kept in a directory.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    /// The CA certificate: clients' `sslrootcert`.
    pub root_cert: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TlsFiles {
    /// The files in `dir`: `root.crt`, `server.crt`, `server.key`.
    pub fn in_dir(dir: &Path) -> TlsFiles {
        TlsFiles { root_cert: dir.join("root.crt"), cert: dir.join("server.crt"), key: dir.join("server.key") }
    }

    /// The files in `dir`, made there (a new CA, a server certificate for
    /// [`LOCAL_NAMES`]) unless all three exist: a client that trusted the CA
    /// once keeps trusting it. The key is readable by its owner only.
    pub fn reuse_or_make(dir: &Path) -> Result<TlsFiles, Error> {
        let files = TlsFiles::in_dir(dir);
        if [&files.root_cert, &files.cert, &files.key].iter().all(|p| p.is_file()) {
            return Ok(files);
        }
        std::fs::create_dir_all(dir).map_err(Error::io("create", dir))?;
        let ca = LocalCa::new("shardgate local CA")?;
        let server = ca.issue(&LOCAL_NAMES)?;
        write_private(&files.key, &server.key_pem)?;
        std::fs::write(&files.cert, &server.cert_pem).map_err(Error::io("write", &files.cert))?;
        std::fs::write(&files.root_cert, ca.cert_pem()).map_err(Error::io("write", &files.root_cert))?;
        Ok(files)
    }
}

/// Writes a file only its owner can read (created so, never readable by others
/// in between).
pub(crate) fn write_private(path: &Path, text: &str) -> Result<(), Error> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(Error::io("create", path))?;
    f.write_all(text.as_bytes()).map_err(Error::io("write", path))
}

fn certificate_error(e: rcgen::Error) -> Error {
    Error::Certificate(e.to_string())
}
