//! Per-client-address bookkeeping, as Postfix's anvil keeps it: concurrent
//! sessions, and connections, messages and failed AUTH attempts in the
//! current rate window, per client. A client is an IPv4 address, or an IPv6
//! network of `client_ipv6_prefix_length` bits (Postfix ≥ 3.8's
//! `smtpd_client_ipv6_prefix_length`): one host has a whole /64 or more to
//! pick addresses from. And the bytes its sessions have in spill files now
//! (counted by `body`). O(1) per connection; memory bounded under a flood of
//! distinct addresses.

use ipnet::{IpNet, Ipv6Net};
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Addresses remembered before idle ones are forgotten: four times the
/// default `max_connections`, so that the sessions open never fill it (at
/// most about 8 MiB).
pub const CLIENT_TABLE_CAPACITY: usize = 2 * 65_536;

/// At most this many events per `per` (`"30/minute"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate {
    pub count: u32,
    pub per: Duration,
}

/// The default of `client_ipv6_prefix_length`, Postfix's.
pub const DEFAULT_IPV6_PREFIX_LENGTH: u8 = 84;

/// The client `ip` counts as: itself (IPv4), or its IPv6 network of
/// `ipv6_prefix_length` bits. `ip` is canonical (no IPv4-mapped IPv6).
pub fn client_network(ip: IpAddr, ipv6_prefix_length: u8) -> IpNet {
    match ip {
        IpAddr::V4(_) => IpNet::from(ip),
        IpAddr::V6(v6) => {
            let net = Ipv6Net::new(v6, ipv6_prefix_length.min(128)).unwrap_or_else(|_| Ipv6Net::from(v6));
            IpNet::V6(net.trunc())
        }
    }
}

/// The limits one client is held to, from its static parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientLimits {
    pub max_connections: usize,
    pub connection_rate: Option<Rate>,
    /// Failed AUTH attempts allowed per window, across the client's sessions.
    pub auth_failures: Option<Rate>,
    /// Bits of an IPv6 address that name the client.
    pub ipv6_prefix_length: u8,
}

/// Why a connection was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    TooManyConnections,
    ConnectionRate,
}

#[derive(Debug)]
struct Entry {
    active: usize,
    connections: Window,
    messages: Window,
    /// AUTH attempts that have not succeeded (yet).
    auth_failures: Window,
    /// Bytes of this client's bodies in spill files, shared with its slots.
    spilled: Arc<AtomicU64>,
}

impl Entry {
    /// A session open, or bytes on the spool: not to be forgotten.
    fn holds_anything(&self) -> bool {
        self.active > 0 || self.spilled.load(Ordering::Relaxed) > 0
    }
}

/// Events counted since a window started.
#[derive(Debug)]
struct Window {
    started: Instant,
    count: u32,
}

impl Window {
    fn new(now: Instant) -> Self {
        Self { started: now, count: 0 }
    }

    /// Count one more if `rate` allows it at `now`.
    fn admit(&mut self, rate: Rate, now: Instant) -> bool {
        if now.duration_since(self.started) >= rate.per {
            *self = Self::new(now);
        }
        if self.count >= rate.count {
            return false;
        }
        self.count += 1;
        true
    }
}

/// Every client seen recently, shared by the listeners of a server.
pub struct ClientTable {
    entries: Mutex<HashMap<IpNet, Entry>>,
    /// Entries beyond which idle ones are forgotten.
    capacity: usize,
}

/// Holds one of its client's concurrent sessions until dropped.
pub struct ClientSlot {
    table: Arc<ClientTable>,
    network: IpNet,
    auth_failures: Option<Rate>,
    spilled: Arc<AtomicU64>,
}

/// An AUTH attempt, counted as a failure from its start (so that sessions
/// in parallel cannot get past the limit together) until
/// [`ClientSlot::auth_did_not_fail`] takes it back.
#[must_use]
pub struct AuthAttempt {
    /// The start of the window it was counted in; `None`: not counted.
    window: Option<Instant>,
}

/// Failed AUTH attempts have used up the client's window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AuthLimitReached {
    pub rate: Rate,
}

impl ClientTable {
    pub fn new(capacity: usize) -> Arc<Self> {
        Arc::new(Self { entries: Mutex::default(), capacity })
    }

    /// Count a new connection from `ip` at `now`, or say why it is refused.
    pub fn admit(self: &Arc<Self>, ip: IpAddr, limits: ClientLimits, now: Instant) -> Result<ClientSlot, Refusal> {
        let network = client_network(ip, limits.ipv6_prefix_length);
        let mut entries = self.lock();
        if entries.len() >= self.capacity && !entries.contains_key(&network) {
            forget_idle(&mut entries, now);
        }
        let entry = entries.entry(network).or_insert_with(|| Entry {
            active: 0,
            connections: Window::new(now),
            messages: Window::new(now),
            auth_failures: Window::new(now),
            spilled: Arc::default(),
        });
        if entry.active >= limits.max_connections {
            return Err(Refusal::TooManyConnections);
        }
        if limits.connection_rate.is_some_and(|rate| !entry.connections.admit(rate, now)) {
            return Err(Refusal::ConnectionRate);
        }
        entry.active += 1;
        Ok(ClientSlot {
            table: self.clone(),
            network,
            auth_failures: limits.auth_failures,
            spilled: entry.spilled.clone(),
        })
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<IpNet, Entry>> {
        self.entries.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Forget every client with no session open: first those whose rate window
/// has passed (the longest window any limit uses is a day), then, if the
/// table is still full, all of them (a flood of new addresses loses its
/// rate history rather than growing memory).
fn forget_idle(entries: &mut HashMap<IpNet, Entry>, now: Instant) {
    const LONGEST_WINDOW: Duration = Duration::from_secs(24 * 3600);
    let before = entries.len();
    let recent = |window: &Window| now.duration_since(window.started) < LONGEST_WINDOW;
    entries.retain(|_, entry| {
        entry.holds_anything() || recent(&entry.connections) || recent(&entry.messages) || recent(&entry.auth_failures)
    });
    if entries.len() > before / 2 {
        entries.retain(|_, entry| entry.holds_anything());
    }
}

impl ClientSlot {
    /// The client this slot counts for: an IPv4 address, or an IPv6 network.
    pub fn network(&self) -> IpNet {
        self.network
    }

    /// Count a new connection from this client at `now` under `rate`;
    /// `false` when it does not allow it (for a connection whose shared
    /// count Redis could not make).
    pub fn admit_connection(&self, rate: Rate, now: Instant) -> bool {
        let mut entries = self.table.lock();
        entries.get_mut(&self.network).is_some_and(|entry| entry.connections.admit(rate, now))
    }

    /// Count a new message (a MAIL command) from this client at `now`;
    /// `false` when `rate` does not allow it (Postfix's message rate).
    pub fn admit_message(&self, rate: Rate, now: Instant) -> bool {
        let mut entries = self.table.lock();
        entries.get_mut(&self.network).is_some_and(|entry| entry.messages.admit(rate, now))
    }

    /// Start an AUTH attempt at `now`, counted as a failure until
    /// [`ClientSlot::auth_did_not_fail`]; refused when the client's failures
    /// (and attempts in progress) have used up its window.
    pub fn begin_auth(&self, now: Instant) -> Result<AuthAttempt, AuthLimitReached> {
        let Some(rate) = self.auth_failures else {
            return Ok(AuthAttempt { window: None });
        };
        let mut entries = self.table.lock();
        let Some(window) = entries.get_mut(&self.network).map(|entry| &mut entry.auth_failures) else {
            return Ok(AuthAttempt { window: None });
        };
        if !window.admit(rate, now) {
            return Err(AuthLimitReached { rate });
        }
        Ok(AuthAttempt { window: Some(window.started) })
    }

    /// The attempt succeeded, or ended without a verdict on the
    /// credentials (a syntax error, a cancel, a failure of ours): it is no
    /// failure, unless its window has passed meanwhile.
    pub fn auth_did_not_fail(&self, attempt: AuthAttempt) {
        let Some(started) = attempt.window else {
            return;
        };
        let mut entries = self.table.lock();
        if let Some(window) = entries.get_mut(&self.network).map(|entry| &mut entry.auth_failures) {
            if window.started == started {
                window.count = window.count.saturating_sub(1);
            }
        }
    }

    /// The bytes this client's bodies have in spill files now, across its
    /// sessions (`max_spilled_bytes_per_client`); no lock to count them.
    pub fn spilled_bytes(&self) -> &Arc<AtomicU64> {
        &self.spilled
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut entries = self.table.lock();
        if let Some(entry) = entries.get_mut(&self.network) {
            entry.active -= 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLIENT: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1));

    fn limits(max_connections: usize, rate: Option<(u32, u64)>) -> ClientLimits {
        let connection_rate = rate.map(|(count, seconds)| Rate { count, per: Duration::from_secs(seconds) });
        ClientLimits {
            max_connections,
            connection_rate,
            auth_failures: None,
            ipv6_prefix_length: DEFAULT_IPV6_PREFIX_LENGTH,
        }
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn concurrent_sessions_are_counted_until_their_slot_is_dropped() {
        let table = ClientTable::new(100);
        let now = Instant::now();
        let first = table.admit(CLIENT, limits(2, None), now).unwrap();
        let _second = table.admit(CLIENT, limits(2, None), now).unwrap();
        assert_eq!(table.admit(CLIENT, limits(2, None), now).err(), Some(Refusal::TooManyConnections));
        let other = IpAddr::from([192, 0, 2, 2]);
        assert!(table.admit(other, limits(2, None), now).is_ok(), "another address has its own count");
        drop(first);
        assert!(table.admit(CLIENT, limits(2, None), now).is_ok());
    }

    #[test]
    fn the_connection_rate_counts_within_a_window() {
        let table = ClientTable::new(100);
        let start = Instant::now();
        for _ in 0..3 {
            drop(table.admit(CLIENT, limits(50, Some((3, 60))), start).unwrap());
        }
        let refused = table.admit(CLIENT, limits(50, Some((3, 60))), start + Duration::from_secs(59));
        assert_eq!(refused.err(), Some(Refusal::ConnectionRate));
        assert!(table.admit(CLIENT, limits(50, Some((3, 60))), start + Duration::from_secs(60)).is_ok());
    }

    #[test]
    fn the_message_rate_counts_across_the_sessions_of_an_address() {
        let table = ClientTable::new(100);
        let start = Instant::now();
        let rate = Rate { count: 2, per: Duration::from_secs(60) };
        let first = table.admit(CLIENT, limits(50, None), start).unwrap();
        let second = table.admit(CLIENT, limits(50, None), start).unwrap();
        assert!(first.admit_message(rate, start) && second.admit_message(rate, start));
        assert!(!first.admit_message(rate, start + Duration::from_secs(30)));
        assert!(second.admit_message(rate, start + Duration::from_secs(60)), "a new window");
    }

    #[test]
    fn spilled_bytes_are_shared_by_the_sessions_of_an_address_and_outlive_them() {
        let table = ClientTable::new(1);
        let now = Instant::now();
        let first = table.admit(CLIENT, limits(50, None), now).unwrap();
        let second = table.admit(CLIENT, limits(50, None), now).unwrap();
        assert!(Arc::ptr_eq(first.spilled_bytes(), second.spilled_bytes()));
        let spilled = first.spilled_bytes().clone();
        spilled.fetch_add(10, Ordering::Relaxed);
        drop((first, second));
        // A full table forgets idle clients, not one whose bytes are still spooled.
        drop(table.admit(IpAddr::from([192, 0, 2, 2]), limits(50, None), now + Duration::from_secs(86_400)));
        let again = table.admit(CLIENT, limits(50, None), now).unwrap();
        assert_eq!(again.spilled_bytes().load(Ordering::Relaxed), 10);
    }

    #[test]
    fn a_flood_of_addresses_stays_bounded() {
        let table = ClientTable::new(1000);
        let now = Instant::now();
        let held = table.admit(CLIENT, limits(50, Some((10, 60))), now).unwrap();
        for n in 0..100_000u32 {
            let ip = IpAddr::from((0x0a00_0000 + n).to_be_bytes());
            drop(table.admit(ip, limits(50, Some((10, 60))), now).unwrap());
            assert!(table.len() <= 1001);
        }
        assert_eq!(table.admit(CLIENT, limits(1, None), now).err(), Some(Refusal::TooManyConnections));
        drop(held);
    }

    #[test]
    fn ipv6_clients_count_by_their_network() {
        assert_eq!(client_network(ip("2001:db8:1:2::78"), 84).to_string(), "2001:db8:1:2::/84");
        assert_eq!(client_network(ip("2001:db8:1:2:0:fff:1:1"), 84).to_string(), "2001:db8:1:2::/84");
        assert_eq!(client_network(ip("2001:db8:1:2:0:1000::1"), 84).to_string(), "2001:db8:1:2:0:1000::/84");
        assert_eq!(client_network(ip("2001:db8::1"), 128).to_string(), "2001:db8::1/128");
        assert_eq!(client_network(ip("192.0.2.7"), 64).to_string(), "192.0.2.7/32", "IPv4 stays whole");

        let table = ClientTable::new(100);
        let now = Instant::now();
        let held: Vec<_> = (1..=3u16)
            .map(|n| table.admit(IpAddr::from([0x2001, 0xdb8, 1, 2, 0, 0, 0, n]), limits(3, None), now).unwrap())
            .collect();
        let fourth = table.admit(ip("2001:db8:1:2::ffff"), limits(3, None), now);
        assert_eq!(fourth.err(), Some(Refusal::TooManyConnections), "the same /84");
        assert!(table.admit(ip("2001:db8:1:2:0:1000::1"), limits(3, None), now).is_ok(), "the next /84");
        let per_address = ClientLimits { ipv6_prefix_length: 128, ..limits(3, None) };
        assert!(table.admit(ip("2001:db8:1:2::ffff"), per_address, now).is_ok(), "counted alone at /128");
        drop(held);
    }

    #[test]
    fn failed_auth_attempts_count_across_sessions_and_successes_are_taken_back() {
        let table = ClientTable::new(100);
        let start = Instant::now();
        let rate = Rate { count: 3, per: Duration::from_secs(60) };
        let limits = ClientLimits { auth_failures: Some(rate), ..limits(50, None) };
        let first = table.admit(CLIENT, limits, start).unwrap();
        let second = table.admit(CLIENT, limits, start).unwrap();
        let succeeded = first.begin_auth(start).unwrap();
        first.auth_did_not_fail(succeeded);
        let _failed = [first.begin_auth(start).unwrap(), second.begin_auth(start).unwrap()];
        // An attempt in progress holds its place: parallel sessions cannot all get past.
        let in_progress = second.begin_auth(start).unwrap();
        assert_eq!(first.begin_auth(start).err(), Some(AuthLimitReached { rate }));
        second.auth_did_not_fail(in_progress);
        let last = first.begin_auth(start + Duration::from_secs(1)).unwrap();
        assert!(second.begin_auth(start + Duration::from_secs(59)).is_err());
        let _ = last;
        // A new window: a success counted in the old one is not taken from it.
        let next = first.begin_auth(start + Duration::from_secs(60)).unwrap();
        let old = AuthAttempt { window: Some(start) };
        first.auth_did_not_fail(old);
        let _ = next;
        assert!(first.begin_auth(start + Duration::from_secs(61)).is_ok());
        assert!(first.begin_auth(start + Duration::from_secs(61)).is_ok());
        assert!(first.begin_auth(start + Duration::from_secs(61)).is_err());
        let unlimited = table.admit(IpAddr::from([192, 0, 2, 9]), self::limits(50, None), start).unwrap();
        assert!((0..100).all(|_| unlimited.begin_auth(start).is_ok()));
    }
}
