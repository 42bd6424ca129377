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
    entries: Entries<V>,
}

/// Up to this many entries, a scan of masks beats a walk down a trie.
const SMALL: usize = 16;

#[derive(Clone)]
enum Entries<V> {
    /// Most parameter blocks have no `peer` or `via` blocks of their own,
    /// and an empty trie is hundreds of bytes.
    Empty,
    Small(Small<V>),
    Trie(Box<JointPrefixMap<IpNet, V>>),
}

/// A few blocks, scanned. The masks of each family lie apart from the
/// values, longest prefix first, so that a lookup reads a few contiguous
/// words and the first block holding the address is the answer.
#[derive(Clone)]
struct Small<V> {
    /// `(network bits, netmask)` of the IPv4 blocks.
    v4: Vec<(u32, u32)>,
    v6: Vec<(u128, u128)>,
    /// The blocks in the order of `v4`, then those of `v6`.
    blocks: Vec<(IpNet, V)>,
}

impl<V> Small<V> {
    fn one(net: IpNet, value: V) -> Self {
        let mut small = Self { v4: Vec::new(), v6: Vec::new(), blocks: Vec::with_capacity(1) };
        small.insert(net, value);
        small
    }

    /// Insert a block not yet present, after those of longer or equal prefixes of its family.
    fn insert(&mut self, net: IpNet, value: V) {
        let longer_first = |other: &(IpNet, V)| other.0.prefix_len() >= net.prefix_len();
        let at = match net {
            IpNet::V4(v4) => {
                let at = self.blocks[..self.v4.len()].partition_point(longer_first);
                self.v4.insert(at, (v4.network().to_bits(), v4.netmask().to_bits()));
                at
            }
            IpNet::V6(v6) => {
                let within = self.blocks[self.v4.len()..].partition_point(longer_first);
                self.v6.insert(within, (v6.network().to_bits(), v6.netmask().to_bits()));
                self.v4.len() + within
            }
        };
        self.blocks.insert(at, (net, value));
    }

    fn longest_match(&self, ip: IpAddr) -> Option<&V> {
        let at = match ip {
            IpAddr::V4(ip) => {
                let ip = ip.to_bits();
                self.v4.iter().position(|&(bits, mask)| ip & mask == bits)?
            }
            IpAddr::V6(ip) => {
                let ip = ip.to_bits();
                self.v4.len() + self.v6.iter().position(|&(bits, mask)| ip & mask == bits)?
            }
        };
        Some(&self.blocks[at].1)
    }
}

/// A set of CIDR blocks.
pub type CidrSet = CidrMap<()>;

impl<V> CidrMap<V> {
    pub fn new() -> Self {
        Self { entries: Entries::Empty }
    }

    /// Insert `value` under `net`, returning the value it replaces.
    pub fn insert(&mut self, net: IpNet, value: V) -> Option<V> {
        match &mut self.entries {
            Entries::Empty => {
                self.entries = Entries::Small(Small::one(net, value));
                None
            }
            Entries::Small(small) => {
                if let Some((_, existing)) = small.blocks.iter_mut().find(|(known, _)| *known == net) {
                    return Some(std::mem::replace(existing, value));
                }
                if small.blocks.len() < SMALL {
                    small.insert(net, value);
                    return None;
                }
                let mut trie = Box::<JointPrefixMap<IpNet, V>>::default();
                for (net, value) in std::mem::take(&mut small.blocks) {
                    trie.insert(net, value);
                }
                trie.insert(net, value);
                self.entries = Entries::Trie(trie);
                None
            }
            Entries::Trie(trie) => trie.insert(net, value),
        }
    }

    /// The value of the longest prefix containing `ip`.
    pub fn longest_match(&self, ip: IpAddr) -> Option<&V> {
        let ip = canonical_ip(ip);
        match &self.entries {
            Entries::Empty => None,
            Entries::Small(small) => small.longest_match(ip),
            Entries::Trie(trie) => trie.get_lpm(&IpNet::from(ip)).map(|(_, value)| value),
        }
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        self.longest_match(ip).is_some()
    }

    pub fn len(&self) -> usize {
        match &self.entries {
            Entries::Empty => 0,
            Entries::Small(small) => small.blocks.len(),
            Entries::Trie(trie) => trie.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every entry, by prefix (IPv4 first).
    pub fn iter(&self) -> impl Iterator<Item = (IpNet, &V)> {
        let mut entries: Vec<(IpNet, &V)> = match &self.entries {
            Entries::Empty => Vec::new(),
            Entries::Small(small) => small.blocks.iter().map(|(net, value)| (*net, value)).collect(),
            Entries::Trie(trie) => trie.iter().collect(),
        };
        entries.sort_by_key(|(net, _)| *net);
        entries.into_iter()
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
    fn small_and_large_maps_agree_at_every_size() {
        let nets: Vec<IpNet> = (0..40u32)
            .map(|n| match n % 4 {
                0 => format!("10.{n}.0.0/16"),
                1 => format!("10.{}.{n}.0/24", n - 1),
                2 => format!("2001:db8:{n:x}::/48"),
                _ => format!("10.{}.{}.7", n - 3, n - 2),
            })
            .map(|key| parse_cidr(&key).unwrap())
            .chain([parse_cidr("0.0.0.0/0").unwrap()])
            .collect();
        let probes: Vec<IpAddr> = (0..40u32)
            .flat_map(|n| [format!("10.{n}.{}.7", n + 1), format!("10.{n}.9.9"), format!("2001:db8:{n:x}::1")])
            .chain(["192.0.2.1".into(), "::ffff:10.4.5.7".into(), "2001:db9::1".into()])
            .map(|text| ip(&text))
            .collect();
        for size in 1..=nets.len() {
            let mut map = CidrMap::new();
            for (index, net) in nets[..size].iter().enumerate() {
                assert_eq!(map.insert(*net, index), None);
            }
            assert_eq!(map.insert(nets[0], 0), Some(0), "replacing returns the old value");
            assert_eq!(map.len(), size);
            for probe in &probes {
                let expected = nets[..size]
                    .iter()
                    .enumerate()
                    .filter(|(_, net)| net.contains(&canonical_ip(*probe)))
                    .max_by_key(|(_, net)| net.prefix_len())
                    .map(|(index, _)| index);
                assert_eq!(map.longest_match(*probe).copied(), expected, "{probe} among {size}");
            }
            let mut sorted = nets[..size].to_vec();
            sorted.sort();
            assert_eq!(map.iter().map(|(net, _)| net).collect::<Vec<_>>(), sorted);
        }
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
