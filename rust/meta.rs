//! Metadata shared by the Rust session and Python policy: one store per
//! connection and one per message, holding JSON values.

use serde_json::{Map, Value};
use std::sync::{Arc, Mutex, MutexGuard};

/// A thread-safe name → JSON value map. Cloning shares the same store.
#[derive(Clone, Debug, Default)]
pub struct MetaStore(Arc<Mutex<Map<String, Value>>>);

impl From<Map<String, Value>> for MetaStore {
    fn from(map: Map<String, Value>) -> Self {
        Self(Arc::new(Mutex::new(map)))
    }
}

impl MetaStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Replace the contents with a copy of `other`'s (one copy, where a
    /// merge into an empty store would make two).
    pub fn copy_from(&self, other: &MetaStore) {
        let copy = other.snapshot();
        *self.lock() = copy;
    }

    pub fn get(&self, name: &str) -> Option<Value> {
        self.lock().get(name).cloned()
    }

    pub fn set(&self, name: impl Into<String>, value: impl Into<Value>) {
        self.lock().insert(name.into(), value.into());
    }

    pub fn remove(&self, name: &str) {
        self.lock().remove(name);
    }

    /// Merge `entries` key by key over what is stored.
    pub fn merge(&self, entries: &Map<String, Value>) {
        let mut map = self.lock();
        for (name, value) in entries {
            map.insert(name.clone(), value.clone());
        }
    }

    /// An independent copy of the current contents.
    pub fn snapshot(&self) -> Map<String, Value> {
        self.lock().clone()
    }

    pub fn get_str(&self, name: &str) -> Option<String> {
        match self.lock().get(name) {
            Some(Value::String(s)) => Some(s.clone()),
            _ => None,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Map<String, Value>> {
        // A panic while holding the lock cannot leave the map half-updated.
        self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn clones_share_one_store() {
        let meta = MetaStore::new();
        let other = meta.clone();
        other.set("tenant", "acme");
        assert_eq!(meta.get("tenant"), Some(json!("acme")));
        assert_eq!(meta.get_str("tenant").as_deref(), Some("acme"));
    }

    #[test]
    fn merge_overrides_key_by_key() {
        let meta = MetaStore::new();
        meta.set("a", 1);
        meta.set("b", 2);
        let mut more = Map::new();
        more.insert("b".into(), json!(3));
        more.insert("c".into(), json!(4));
        meta.merge(&more);
        assert_eq!(Value::Object(meta.snapshot()), json!({"a": 1, "b": 3, "c": 4}));
    }
}
