//! The CLI's side of the admin API: find the node, send requests with its token.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde::de::DeserializeOwned;
use serde::Serialize;
use shardgate_router::admin::api::ApiError;

use crate::up::ClusterFile;

pub struct Api {
    pub addr: String,
    pub token: Option<String>,
}

impl Api {
    /// The node named by `--admin` (token from SHARDGATE_ADMIN_TOKEN), or the
    /// cluster `up` started in `data_dir`.
    pub fn find(data_dir: &Path, admin: Option<&str>) -> Result<Api> {
        let env_token = std::env::var("SHARDGATE_ADMIN_TOKEN").ok();
        match admin {
            Some(a) => Ok(Api { addr: a.to_string(), token: env_token }),
            None => {
                let c = ClusterFile::read(data_dir)?;
                Ok(Api { addr: c.admin, token: env_token.or(c.admin_token) })
            }
        }
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
        let sock = self.addr.parse().map_err(|_| anyhow!("{:?} is not an address like 127.0.0.1:6433", self.addr))?;
        let mut stream = TcpStream::connect_timeout(&sock, Duration::from_secs(3)).with_context(|| {
            format!("cannot reach the admin API at {}; is shardgate running? start it with `shardgate up` or `shardgate serve`", self.addr)
        })?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        let body = body.unwrap_or_default();
        let auth = self.token.as_ref().map(|t| format!("authorization: Bearer {t}\r\n")).unwrap_or_default();
        write!(
            stream,
            "{method} {path} HTTP/1.1\r\nhost: {}\r\nconnection: close\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{auth}\r\n{body}",
            self.addr,
            body.len()
        )?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw)?;
        let text = String::from_utf8_lossy(&raw);
        let (head, body) = text.split_once("\r\n\r\n").ok_or_else(|| anyhow!("malformed HTTP answer"))?;
        let status: u16 = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
        if status != 200 {
            let msg = serde_json::from_str::<ApiError>(body).map(|e| e.error).unwrap_or_else(|_| body.to_string());
            bail!("{msg}");
        }
        Ok(body.to_string())
    }
}
