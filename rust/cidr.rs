//! CIDR keys and longest-prefix maps over IPv4 and IPv6. Pure logic.
//!
//! Unlike KumoMTA's `CidrMap`, the order of insertion never matters: a
//! lookup always finds the longest prefix holding the address.

use ipnet::IpNet;
use prefix_trie::joint::JointPrefixMap;
use std::fmt;
use std::net::IpAddr;

/// Parse a `peer`/`via`/`relay_hosts` key: an IP literal (a host route) or
/// a strict CIDR, where `192.168.1.1/24` is refused because the host bits are
/// set (it almost always hides a typo or a misunderstanding).
pub fn parse_cidr(text: &str) -> Result<IpNet, String> {
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Ok(IpNet::from(canonical_ip(ip)));
    }
    let net: IpNet =
        text.parse().map_err(|_| format!("{text:?} is neither an IP address nor a CIDR like 10.0.0.0/8"))?;
    if net.trunc() != net {
        return Err(format!("{text} has host bits set; did you mean {}?", net.trunc()));
    }
    Ok(net)
}

/// The address as policy should see it: an IPv4 client of a dual-stack
/// listener arrives as `::ffff:a.b.c.d` but must match IPv4 keys.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    ip.to_canonical()
}

/// A map from CIDR blocks to values, looked up by longest prefix.
#[derive(Clone)]
pub struct CidrMap<V> {
    /// Allocated on first insert: most parameter blocks have no `peer` or
    /// `via` blocks of their own, and an empty trie is hundreds of bytes.
    map: Option<Box<JointPrefixMap<IpNet, V>>>,
}

/// A set of CIDR blocks.
pub type CidrSet = CidrMap<()>;

impl<V> CidrMap<V> {
    pub fn new() -> Self {
        Self { map: None }
    }

    /// Insert `value` under `net`, returning the value it replaces.
    pub fn insert(&mut self, net: IpNet, value: V) -> Option<V> {
        self.map.get_or_insert_with(Box::default).insert(net, value)
    }

    /// The value of the longest prefix containing `ip`.
    pub fn longest_match(&self, ip: IpAddr) -> Option<&V> {
        let map = self.map.as_ref()?;
        map.get_lpm(&IpNet::from(canonical_ip(ip))).map(|(_, value)| value)
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        self.longest_match(ip).is_some()
    }

    pub fn len(&self) -> usize {
        self.map.as_ref().map_or(0, |map| map.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every entry, by prefix (IPv4 first).
    pub fn iter(&self) -> impl Iterator<Item = (IpNet, &V)> {
        self.map.iter().flat_map(|map| map.iter())
    }
}

/// `net` as a key is written: an IP literal for a host route, else the CIDR.
pub fn cidr_key(net: IpNet) -> String {
    if net.prefix_len() == net.max_prefix_len() {
        net.addr().to_string()
    } else {
        net.to_string()
    }
}

impl<V> Default for CidrMap<V> {
    fn default() -> Self {
        Self::new()
    }
}

impl<V: fmt::Debug> fmt::Debug for CidrMap<V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl FromIterator<IpNet> for CidrSet {
    fn from_iter<I: IntoIterator<Item = IpNet>>(nets: I) -> Self {
        let mut set = CidrSet::new();
        for net in nets {
            set.insert(net, ());
        }
        set
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn map(entries: &[(&str, &'static str)]) -> CidrMap<&'static str> {
        let mut map = CidrMap::new();
        for (key, value) in entries {
            map.insert(parse_cidr(key).unwrap(), *value);
        }
        map
    }

    #[test]
    fn ip_literals_are_host_routes() {
        assert_eq!(parse_cidr("10.0.0.1").unwrap().to_string(), "10.0.0.1/32");
        assert_eq!(parse_cidr("::1").unwrap().to_string(), "::1/128");
        assert_eq!(parse_cidr("::ffff:10.0.0.1").unwrap().to_string(), "10.0.0.1/32");
    }

    #[test]
    fn cidrs_must_be_strict() {
        assert_eq!(parse_cidr("192.168.1.0/24").unwrap().to_string(), "192.168.1.0/24");
        let error = parse_cidr("192.168.1.1/24").unwrap_err();
        assert!(error.contains("did you mean 192.168.1.0/24?"), "{error}");
        assert!(parse_cidr("10.0.0.0/33").is_err());
        assert!(parse_cidr("example.com").is_err());
        assert!(parse_cidr("").is_err());
    }

    #[test]
    fn longest_prefix_wins_whatever_the_insertion_order() {
        let entries = [("10.0.0.0/8", "wide"), ("10.1.0.0/16", "middle"), ("10.1.2.3", "host")];
        let mut reversed = entries;
        reversed.reverse();
        for map in [map(&entries), map(&reversed)] {
            assert_eq!(map.longest_match(ip("10.1.2.3")), Some(&"host"));
            assert_eq!(map.longest_match(ip("10.1.9.9")), Some(&"middle"));
            assert_eq!(map.longest_match(ip("10.9.9.9")), Some(&"wide"));
            assert_eq!(map.longest_match(ip("11.0.0.1")), None);
        }
    }

    #[test]
    fn ipv4_mapped_addresses_match_ipv4_keys_and_families_stay_apart() {
        let map = map(&[("127.0.0.0/8", "v4"), ("::/0", "any v6")]);
        assert_eq!(map.longest_match(ip("::ffff:127.0.0.9")), Some(&"v4"));
        assert_eq!(map.longest_match(ip("::1")), Some(&"any v6"));
        assert_eq!(map.longest_match(ip("192.0.2.1")), None);
    }

    #[test]
    fn sets() {
        let set: CidrSet = ["127.0.0.1", "::1"].iter().map(|s| parse_cidr(s).unwrap()).collect();
        assert!(set.contains(ip("127.0.0.1")));
        assert!(!set.contains(ip("127.0.0.2")));
        assert_eq!(set.len(), 2);
        assert!(CidrSet::new().is_empty());
    }

    #[test]
    fn iteration_and_keys() {
        let map = map(&[("10.0.0.0/8", "wide"), ("10.0.0.1", "host"), ("::1", "v6")]);
        let keys: Vec<(String, &str)> = map.iter().map(|(net, value)| (cidr_key(net), *value)).collect();
        let expected = [("10.0.0.0/8", "wide"), ("10.0.0.1", "host"), ("::1", "v6")];
        assert_eq!(keys, expected.map(|(key, value)| (key.to_string(), value)));
        assert_eq!(CidrSet::new().iter().count(), 0);
    }
}
