//! The parsed records of the resolver: mail-auth's `ResolverCache`, so that
//! a record met again (a DKIM key, an SPF or DMARC policy, an address set)
//! is neither looked up in hickory's cache nor parsed again (an RSA key's
//! base64 and DER) until its TTL runs out. Negative answers stay in
//! hickory's cache, mail-auth does not pass them here.

use mail_auth::{Parameters, RecordSet, ResolverCache, Txt, MX};
use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Mutex;
use std::time::Instant;

/// Records kept per kind; past it the expired go, then all if need be.
const CAPACITY: usize = 8192;

/// One kind of record by name, each until its TTL expires.
pub struct RecordCache<K, V> {
    entries: Mutex<HashMap<K, (V, Instant)>>,
}

impl<K, V> RecordCache<K, V> {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<K, (V, Instant)>> {
        self.entries.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl<K, V> Default for RecordCache<K, V> {
    fn default() -> Self {
        Self { entries: Mutex::new(HashMap::new()) }
    }
}

impl<K: Hash + Eq, V: Clone> ResolverCache<K, V> for RecordCache<K, V> {
    fn get<Q>(&self, name: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let mut entries = self.lock();
        match entries.get(name) {
            Some((value, valid_until)) if *valid_until > Instant::now() => Some(value.clone()),
            Some(_) => {
                entries.remove(name);
                None
            }
            None => None,
        }
    }

    fn remove<Q>(&self, name: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let mut entries = self.lock();
        entries.remove(name).map(|(value, _)| value)
    }

    fn insert(&self, key: K, value: V, valid_until: Instant) {
        let mut entries = self.lock();
        if entries.len() >= CAPACITY {
            let now = Instant::now();
            entries.retain(|_, (_, until)| *until > now);
            if entries.len() >= CAPACITY {
                entries.clear();
            }
        }
        entries.insert(key, (value, valid_until));
    }
}

/// The caches of one resolver, for each kind of record mail-auth asks.
#[derive(Default)]
pub struct Caches {
    pub txt: RecordCache<Box<str>, Txt>,
    pub mx: RecordCache<Box<str>, RecordSet<MX>>,
    pub ipv4: RecordCache<Box<str>, RecordSet<Ipv4Addr>>,
    pub ipv6: RecordCache<Box<str>, RecordSet<Ipv6Addr>>,
    pub ptr: RecordCache<IpAddr, RecordSet<Box<str>>>,
}

/// mail-auth's parameters with the caches of a resolver.
pub type Cached<'a, P> = Parameters<
    'a,
    P,
    RecordCache<Box<str>, Txt>,
    RecordCache<Box<str>, RecordSet<MX>>,
    RecordCache<Box<str>, RecordSet<Ipv4Addr>>,
    RecordCache<Box<str>, RecordSet<Ipv6Addr>>,
    RecordCache<IpAddr, RecordSet<Box<str>>>,
>;

impl Caches {
    /// `params` for mail-auth, with these caches.
    pub fn parameters<P>(&self, params: P) -> Cached<'_, P> {
        Parameters::new(params)
            .with_txt_cache(&self.txt)
            .with_mx_cache(&self.mx)
            .with_ipv4_cache(&self.ipv4)
            .with_ipv6_cache(&self.ipv6)
            .with_ptr_cache(&self.ptr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn records_are_kept_until_they_expire() {
        let cache: RecordCache<Box<str>, u32> = RecordCache::default();
        let now = Instant::now();
        cache.insert("live.example.".into(), 1, now + Duration::from_secs(60));
        cache.insert("dead.example.".into(), 2, now);
        assert_eq!(cache.get("live.example."), Some(1));
        assert_eq!(cache.get("dead.example."), None);
        assert_eq!(cache.remove("live.example."), Some(1));
        assert_eq!(cache.get("live.example."), None);
    }
}
