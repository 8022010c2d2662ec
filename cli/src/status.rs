//! `shardgate status`: asks a node's admin API and prints what it says.

use std::path::Path;

use anyhow::Result;
use serde_json::Value;

use crate::admin_client::Api;

pub fn run(data_dir: &Path, admin: Option<&str>, json: bool) -> Result<()> {
    let api = Api::find(data_dir, admin)?;
    let status = api.get("/status")?;
    if json {
        println!("{}", serde_json::to_string_pretty(&status)?);
        return Ok(());
    }
    print_table(&status);
    Ok(())
}

pub fn shard_list(api: &Api, json: bool) -> Result<()> {
    let status = api.get("/status")?;
    if json {
        println!("{}", serde_json::to_string_pretty(&status["shards"])?);
        return Ok(());
    }
    print_shards(&status);
    Ok(())
}

pub fn directory_show(api: &Api, json: bool) -> Result<()> {
    let dir = api.get("/directory")?;
    if json {
        println!("{}", serde_json::to_string_pretty(&dir)?);
        return Ok(());
    }
    println!(
        "epoch {}   buckets {}   key {} ({})",
        dir["epoch"],
        dir["bucket_count"],
        dir["key_column"].as_str().unwrap_or("?"),
        dir["key_type"].as_str().unwrap_or("?")
    );
    let shards: Vec<&str> = dir["shards"].as_array().into_iter().flatten().filter_map(|s| s["name"].as_str()).collect();
    for (i, s) in dir["shards"].as_array().into_iter().flatten().enumerate() {
        println!(
            "shard {i}: {} {} {}",
            s["name"].as_str().unwrap_or("?"),
            s["state"].as_str().unwrap_or("?"),
            s["url"].as_str().unwrap_or("?")
        );
    }
    let pins = dir["pins"].as_array().cloned().unwrap_or_default();
    println!(
        "pins: {}",
        if pins.is_empty() {
            "(none)".into()
        } else {
            pins.iter()
                .map(|p| format!("{} → {}", p[0], shards.get(p[1].as_u64().unwrap_or(0) as usize).unwrap_or(&"?")))
                .collect::<Vec<_>>()
                .join(", ")
        }
    );
    let moves = dir["moves"].as_object().map(|m| m.len()).unwrap_or(0);
    println!("moves: {moves}");
    Ok(())
}

fn print_shards(s: &Value) {
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
    print_shards(s);
    println!();
    println!("{:<16} SHARD", "BUCKETS");
    for r in s["placement_ranges"].as_array().into_iter().flatten() {
        println!(
            "{:<16} {}",
            format!("{}-{}", r["first_bucket"], r["last_bucket"]),
            r["shard"].as_str().unwrap_or("?")
        );
    }
    if let Some(r) = s["replica"].as_object() {
        println!();
        println!(
            "directory node {} ({}), leader {}, term {}, lease {}",
            r["node_id"],
            r["role"].as_str().unwrap_or("?"),
            r["leader"],
            r["term"],
            if r["lease_valid"].as_bool() == Some(true) { "valid" } else { "EXPIRED: writes refused" }
        );
    }
    let moves: Vec<&Value> = s["moves"].as_array().into_iter().flatten().collect();
    if !moves.is_empty() {
        println!();
        println!("moves:");
        for m in moves {
            println!("  {}", crate::moves::progress_line(m));
        }
    }
    let tables: Vec<&str> = s["sharded_tables"].as_array().into_iter().flatten().filter_map(|t| t.as_str()).collect();
    println!();
    println!("sharded tables: {}", if tables.is_empty() { "(none yet)".to_string() } else { tables.join(", ") });
}
