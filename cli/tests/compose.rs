//! docker-compose.yml cannot run here (no Docker engine); this holds its structure:
//! three Postgres and three shardgate services, configs that parse and point at
//! the compose services, and docs whose commands match the file.

use std::path::Path;
use std::process::Command;

use serde_yaml::Value;

fn root() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

#[test]
fn compose_file_runs_three_shards_and_three_nodes_with_valid_configs() {
    let text = std::fs::read_to_string(root().join("docker-compose.yml")).unwrap();
    let doc: Value = serde_yaml::from_str(&text).unwrap();
    let services = doc["services"].as_mapping().unwrap();
    let names: Vec<&str> = services.keys().filter_map(|k| k.as_str()).collect();
    for s in ["pg1", "pg2", "pg3", "shardgate1", "shardgate2", "shardgate3"] {
        assert!(names.contains(&s), "service {s} missing from docker-compose.yml");
    }
    // Postgres runs with wal_level=logical (moves need it).
    assert!(text.contains("wal_level=logical"));
    assert!(root().join("Dockerfile").exists());
    let mut host_ports = Vec::new();
    for i in 1..=3 {
        let svc = &services[&Value::from(format!("shardgate{i}"))];
        let volumes: Vec<&str> = svc["volumes"].as_sequence().unwrap().iter().filter_map(|v| v.as_str()).collect();
        let config = volumes.iter().find(|v| v.ends_with(":/etc/shardgate/shardgate.toml:ro")).expect("a config mount");
        let local = config.split(':').next().unwrap();
        let path = root().join(local.trim_start_matches("./"));
        // The config parses and is complete.
        let out = Command::new(env!("CARGO_BIN_EXE_shardgate"))
            .args(["serve", "--check", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}: {}", path.display(), String::from_utf8_lossy(&out.stderr));
        // It points at the compose services and at its peers by service name.
        let cfg: toml::Value = toml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let urls: Vec<&str> = cfg["shards"].as_array().unwrap().iter().map(|s| s["url"].as_str().unwrap()).collect();
        assert_eq!(urls.len(), 3);
        for (j, url) in urls.iter().enumerate() {
            assert!(url.contains(&format!("@pg{}:5432/app", j + 1)), "{url}");
        }
        assert_eq!(cfg["directory"]["node_id"].as_integer(), Some(i));
        let peers: Vec<&str> =
            cfg["directory"]["peers"].as_array().unwrap().iter().map(|p| p["address"].as_str().unwrap()).collect();
        assert_eq!(peers.len(), 2);
        assert!(peers.iter().all(|p| p.starts_with("shardgate") && p.ends_with(":7001")));
        for p in svc["ports"].as_sequence().unwrap() {
            host_ports.push(p.as_str().unwrap().split(':').next().unwrap().to_string());
        }
    }
    // The ports the docs name are the ones the file publishes.
    let docs = std::fs::read_to_string(root().join("docs/docker.md")).unwrap();
    for port in ["6432", "6442", "6452"] {
        assert!(host_ports.contains(&port.to_string()));
        assert!(docs.contains(port), "docs/docker.md should mention port {port}");
    }
    assert!(docs.contains("docker compose up --build"));
    assert!(text.contains("docker compose up --build"));
}
