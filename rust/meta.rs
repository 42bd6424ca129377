//! Metadata shared by the Rust session and Python policy: one store per
//! connection and one per message, holding JSON values.

use serde_json::{Map, Value};
use std::sync::{Arc, Mutex, MutexGuard};

/// The names of the metadata the session sets, as policy reads them.
pub mod keys {
    pub const RECEIVED_FROM: &str = "received_from";
    pub const RECEIVED_VIA: &str = "received_via";
    pub const ORIG_RECEIVED_FROM: &str = "orig_received_from";
    pub const ORIG_RECEIVED_VIA: &str = "orig_received_via";
    pub const HOSTNAME: &str = "hostname";
    pub const AUTHN_ID: &str = "authn_id";
    pub const AUTHZ_ID: &str = "authz_id";
    pub const RECEPTION_PROTOCOL: &str = "reception_protocol";
    pub const EHLO_DOMAIN: &str = "ehlo_domain";
    pub const REQUIRETLS: &str = "requiretls";
    pub const TLS_CIPHER: &str = "tls_cipher";
    pub const TLS_PROTOCOL_VERSION: &str = "tls_protocol_version";
    pub const TLS_PEER_SUBJECT_NAME: &str = "tls_peer_subject_name";
    /// Unique per connection; the `session=` of its log lines.
    pub const SESSION_ID: &str = "session_id";
    /// The `authentication` results: the connection's (SPF, iprev) on the
    /// connection, all of them on a message.
    pub const AUTHENTICATION_RESULTS: &str = "authentication_results";
    /// The upstream the connection's last transaction was forwarded to.
    pub const FORWARDED_TO: &str = "forwarded_to";
    /// On a copy kept in our sink: the upstream's refusal after the data.
    pub const FORWARD_REFUSAL: &str = "forward_refusal";
}

type Entries = Map<String, Value>;

/// A thread-safe name → JSON value map. Cloning shares the same store.
/// Copies of a store ([`MetaStore::copy_from`]) share its entries until
/// either side changes them, so that a message, which starts with a copy of
/// its connection's metadata, costs no copy unless its metadata is changed.
#[derive(Clone, Debug, Default)]
pub struct MetaStore(Arc<Mutex<Arc<Entries>>>);

impl MetaStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Replace the contents with a copy of `other`'s.
    pub fn copy_from(&self, other: &MetaStore) {
        let shared = other.lock().clone();
        *self.lock() = shared;
    }

    /// A new store starting with a copy of this one's contents.
    pub fn copy(&self) -> Self {
        Self(Arc::new(Mutex::new(self.lock().clone())))
    }

    pub fn get(&self, name: &str) -> Option<Value> {
        self.lock().get(name).cloned()
    }

    pub fn set(&self, name: impl Into<String>, value: impl Into<Value>) {
        Arc::make_mut(&mut self.lock()).insert(name.into(), value.into());
    }

    pub fn remove(&self, name: &str) {
        Arc::make_mut(&mut self.lock()).remove(name);
    }

    /// Merge `entries` key by key over what is stored.
    pub fn merge(&self, entries: &Entries) {
        let mut shared = self.lock();
        let map = Arc::make_mut(&mut shared);
        for (name, value) in entries {
            map.insert(name.clone(), value.clone());
        }
    }

    /// An independent copy of the current contents.
    pub fn snapshot(&self) -> Entries {
        Entries::clone(&self.lock())
    }

    pub fn get_str(&self, name: &str) -> Option<String> {
        match self.lock().get(name) {
            Some(Value::String(s)) => Some(s.clone()),
            _ => None,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Arc<Entries>> {
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
    fn a_copy_is_independent_of_its_original() {
        let connection = MetaStore::new();
        connection.set("tenant", "acme");
        let message = MetaStore::new();
        message.copy_from(&connection);
        message.set("tenant", "other");
        connection.set("ehlo_domain", "client.example");
        assert_eq!(connection.get_str("tenant").as_deref(), Some("acme"));
        assert_eq!(message.get("ehlo_domain"), None);
        assert_eq!(message.get_str("tenant").as_deref(), Some("other"));
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
