//! Per-client-address bookkeeping, as Postfix's anvil keeps it: concurrent
//! sessions and connections in the current rate window, per IP address; and
//! the bytes its sessions have in spill files now (counted by `body`).
//! O(1) per connection; memory bounded under a flood of distinct addresses.

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

/// The limits one client is held to, from its static parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientLimits {
    pub max_connections: usize,
    pub connection_rate: Option<Rate>,
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

/// Every client address seen recently, shared by the listeners of a server.
pub struct ClientTable {
    entries: Mutex<HashMap<IpAddr, Entry>>,
    /// Entries beyond which idle ones are forgotten.
    capacity: usize,
}

/// Holds one of its client's concurrent sessions until dropped.
pub struct ClientSlot {
    table: Arc<ClientTable>,
    ip: IpAddr,
    spilled: Arc<AtomicU64>,
}

impl ClientTable {
    pub fn new(capacity: usize) -> Arc<Self> {
        Arc::new(Self { entries: Mutex::default(), capacity })
    }

    /// Count a new connection from `ip` at `now`, or say why it is refused.
    pub fn admit(self: &Arc<Self>, ip: IpAddr, limits: ClientLimits, now: Instant) -> Result<ClientSlot, Refusal> {
        let mut entries = self.lock();
        if entries.len() >= self.capacity && !entries.contains_key(&ip) {
            forget_idle(&mut entries, now);
        }
        let entry = entries.entry(ip).or_insert_with(|| Entry {
            active: 0,
            connections: Window::new(now),
            messages: Window::new(now),
            spilled: Arc::default(),
        });
        if entry.active >= limits.max_connections {
            return Err(Refusal::TooManyConnections);
        }
        if limits.connection_rate.is_some_and(|rate| !entry.connections.admit(rate, now)) {
            return Err(Refusal::ConnectionRate);
        }
        entry.active += 1;
        Ok(ClientSlot { table: self.clone(), ip, spilled: entry.spilled.clone() })
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<IpAddr, Entry>> {
        self.entries.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Forget every client with no session open: first those whose rate window
/// has passed (the longest window any limit uses is a day), then, if the
/// table is still full, all of them (a flood of new addresses loses its
/// rate history rather than growing memory).
fn forget_idle(entries: &mut HashMap<IpAddr, Entry>, now: Instant) {
    const LONGEST_WINDOW: Duration = Duration::from_secs(24 * 3600);
    let before = entries.len();
    let recent = |window: &Window| now.duration_since(window.started) < LONGEST_WINDOW;
    entries.retain(|_, entry| entry.holds_anything() || recent(&entry.connections) || recent(&entry.messages));
    if entries.len() > before / 2 {
        entries.retain(|_, entry| entry.holds_anything());
    }
}

impl ClientSlot {
    /// Count a new message (a MAIL command) from this client at `now`;
    /// `false` when `rate` does not allow it (Postfix's message rate).
    pub fn admit_message(&self, rate: Rate, now: Instant) -> bool {
        let mut entries = self.table.lock();
        entries.get_mut(&self.ip).is_some_and(|entry| entry.messages.admit(rate, now))
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
        if let Some(entry) = entries.get_mut(&self.ip) {
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
        ClientLimits { max_connections, connection_rate }
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
}
