use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::{analyze, Analysis};

/// A bounded map from statement text to its analysis, shared by all sessions.
///
/// Parsing is the most expensive thing the router does per statement; applications
/// send the same few hundred texts over and over, so a plain map with a size cap
/// catches nearly all of them. When the cap is reached the map is cleared — crude,
/// but O(1), allocation-free on hits, and a workload with more distinct texts than
/// the cap gains little from any eviction policy.
pub struct AnalysisCache {
    key_column: String,
    capacity: usize,
    map: Mutex<HashMap<Arc<str>, Arc<Analysis>>>,
}

impl AnalysisCache {
    pub fn new(key_column: impl Into<String>, capacity: usize) -> Self {
        AnalysisCache { key_column: key_column.into(), capacity: capacity.max(1), map: Mutex::new(HashMap::new()) }
    }

    /// The analysis of `sql`, parsing it on a miss. A parse error is not cached:
    /// the statement goes to a shard, which reports the error in Postgres's words.
    pub fn get(&self, sql: &str) -> Result<Arc<Analysis>, String> {
        if let Some(a) = self.lock().get(sql) {
            return Ok(a.clone());
        }
        let analysis = Arc::new(analyze(sql, &self.key_column)?);
        let mut map = self.lock();
        if map.len() >= self.capacity {
            map.clear();
        }
        map.insert(Arc::from(sql), analysis.clone());
        Ok(analysis)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, Arc<Analysis>>> {
        // A panic while holding the lock cannot leave the map inconsistent (single
        // insert or clear), so a poisoned lock is still usable.
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
