//! `shardgate status`: asks a node's admin API and prints what it says.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

use crate::up::ClusterFile;

pub fn run(data_dir: &Path, admin: Option<&str>, json: bool) -> Result<()> {
    let addr = match admin {
        Some(a) => a.to_string(),
        None => ClusterFile::read(data_dir)?.admin,
    };
    let body = http_get(&addr, "/status").with_context(|| {
        format!("cannot reach the admin API at {addr}; is shardgate running? start it with `shardgate up` or `shardgate serve`")
    })?;
    let status: Value =
        serde_json::from_str(&body).context("the admin API answered something that is not JSON")?;
    if json {
        println!("{}", serde_json::to_string_pretty(&status)?);
        return Ok(());
    }
    print_table(&status);
    Ok(())
}

fn print_table(s: &Value) {
    println!(
        "epoch {}   buckets {}   key {} ({})   clients {}",
        s["epoch"],
        s["bucket_count"],
        s["key_column"].as_str().unwrap_or("?"),
        s["key_type"].as_str().unwrap_or("?"),
        s["clients"]
    );
    println!();
    println!("{:<16} {:<8} {:>8}  URL", "SHARD", "STATE", "BUCKETS");
    for sh in s["shards"].as_array().into_iter().flatten() {
        println!(
            "{:<16} {:<8} {:>8}  {}",
            sh["name"].as_str().unwrap_or("?"),
            sh["state"].as_str().unwrap_or("?"),
            sh["buckets"].as_u64().unwrap_or(0),
            sh["url"].as_str().unwrap_or("?")
        );
    }
    println!();
    println!("{:<16} SHARD", "BUCKETS");
    for r in s["placement_ranges"].as_array().into_iter().flatten() {
        println!(
            "{:<16} {}",
            format!("{}-{}", r["first_bucket"], r["last_bucket"]),
            r["shard"].as_str().unwrap_or("?")
        );
    }
    let tables: Vec<&str> = s["sharded_tables"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| t.as_str())
        .collect();
    println!();
    println!(
        "sharded tables: {}",
        if tables.is_empty() {
            "(none yet)".to_string()
        } else {
            tables.join(", ")
        }
    );
}

/// A GET over plain HTTP/1.1; the admin API is the only server it talks to.
pub fn http_get(addr: &str, path: &str) -> Result<String> {
    let sock = addr
        .parse()
        .map_err(|_| anyhow!("{addr:?} is not an address like 127.0.0.1:6433"))?;
    let mut stream = TcpStream::connect_timeout(&sock, Duration::from_secs(3))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("malformed HTTP answer"))?;
    if !head.starts_with("HTTP/1.1 200") {
        bail!("admin API answered {}", head.lines().next().unwrap_or(""));
    }
    Ok(body.to_string())
}
