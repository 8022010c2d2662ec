//! The CLI's side of the admin API: find the node, send requests with its token.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

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

    pub fn get(&self, path: &str) -> Result<Value> {
        self.request("GET", path, None)
    }

    pub fn post(&self, path: &str, body: &Value) -> Result<Value> {
        self.request("POST", path, Some(body))
    }

    fn request(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value> {
        let sock = self.addr.parse().map_err(|_| anyhow!("{:?} is not an address like 127.0.0.1:6433", self.addr))?;
        let mut stream = TcpStream::connect_timeout(&sock, Duration::from_secs(3)).with_context(|| {
            format!("cannot reach the admin API at {}; is shardgate running? start it with `shardgate up` or `shardgate serve`", self.addr)
        })?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        let body = body.map(|b| b.to_string()).unwrap_or_default();
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
        let value: Value = serde_json::from_str(body).unwrap_or(Value::String(body.to_string()));
        if status != 200 {
            let msg =
                value.get("error").and_then(|e| e.as_str()).map(str::to_string).unwrap_or_else(|| body.to_string());
            bail!("{msg}");
        }
        Ok(value)
    }
}
