//! TLS on a local server: `ssl = on` with a certificate its caller made, and
//! if asked a pg_hba.conf that turns away every TCP connection not under TLS
//! (`hostssl` lines only), as a server on a network may be set up.

use std::path::PathBuf;

use crate::ca::{write_private, Issued};
use crate::settings::ensure_included;
use crate::{Error, Server, Shutdown};

/// The settings file TLS adds, included by postgresql.conf after shardgate.conf.
const FILE: &str = "shardgate-tls.conf";

/// Whether a TLS server still lets TCP clients in without TLS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlainClients {
    Allowed,
    /// pg_hba.conf has `hostssl` lines only: plain TCP logins fail with 28000.
    Refused,
}

impl Server {
    /// Turns TLS on with `server`'s certificate and key, and restarts the
    /// server if it runs. `ca_pem` goes next to them as `root.crt`, whose path
    /// comes back: a file clients can name as `sslrootcert`, readable by the
    /// server's OS user too, so that a subscription on another local server
    /// can name it in its connection string.
    pub fn serve_tls(&mut self, ca_pem: &str, server: &Issued, plain: PlainClients) -> Result<PathBuf, Error> {
        let dir = self.data_dir().to_path_buf();
        let user = self.user().clone();
        let cert = dir.join("server.crt");
        let key = dir.join("server.key");
        let root = dir.join("root.crt");
        // Postgres refuses a key file others can read.
        write_private(&key, &server.key_pem)?;
        std::fs::write(&cert, &server.cert_pem).map_err(Error::io("write", &cert))?;
        std::fs::write(&root, ca_pem).map_err(Error::io("write", &root))?;
        let conf = dir.join(FILE);
        std::fs::write(&conf, "# Managed by shardgate: TLS for this server.\nssl = on\n")
            .map_err(Error::io("write", &conf))?;
        if plain == PlainClients::Refused {
            let hba = dir.join("pg_hba.conf");
            let lines = "# Managed by shardgate: TCP logins under TLS only.\n\
                         local all all trust\n\
                         local replication all trust\n\
                         hostssl all all 127.0.0.1/32 trust\n\
                         hostssl replication all 127.0.0.1/32 trust\n";
            std::fs::write(&hba, lines).map_err(Error::io("write", &hba))?;
            user.own(&hba)?;
        }
        for path in [&cert, &key, &root, &conf] {
            user.own(path)?;
        }
        ensure_included(&dir, &format!("include '{FILE}'"))?;
        if self.is_running()? {
            self.stop_with(Shutdown::Fast)?;
            self.start()?;
        }
        Ok(root)
    }
}
