//! Connections to upstreams kept for reuse, per upstream and client
//! settings, with a cap on how many are open; an upstream that failed is
//! skipped for `forward_backoff`, then tried again with a real connection
//! and EHLO; and the per-upstream metrics.

use super::connection::{ConnectOptions, Connection, ForwardError};
use super::upstream::{ForwardTls, Upstream};
use crate::metric_table;
use crate::metrics::{Histogram, MetricInfo, MetricKind, LATENCY_BUCKETS};
use crate::protocol::client::Capabilities;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

metric_table! {
    /// What happened with one upstream.
    UpstreamMetrics, UPSTREAM_METRICS, "upstream",
    extra { latency: Histogram<{ LATENCY_BUCKETS.len() }> = Histogram::new(&LATENCY_BUCKETS) }
    rows {
    Counter messages: "kumo_listener_forwarded_messages",
        "Messages the upstream accepted for at least one recipient.";
    Counter refusals: "kumo_listener_forward_refusals",
        "Refusals (4xx, 5xx) by the upstream of MAIL, RCPT or the data.";
    Counter failures: "kumo_listener_forward_failures",
        "Connections that could not be opened or broke (connect, greeting, EHLO, TLS, timeouts).";
    Counter possible_duplicates: "kumo_listener_forward_possible_duplicates",
        "Messages whose end of data was sent but not answered: the upstream may have them.";
    Counter kept_recipients: "kumo_listener_forward_kept_recipients",
        "Recipients an LMTP upstream refused after the data, kept in our own sink for an SMTP client.";
    Gauge connections: "kumo_listener_forward_connections", "Connections to the upstream open now.";
    Gauge idle: "kumo_listener_forward_idle_connections", "Of those, idle in the pool now.";
    }
}

/// How long the upstream took to answer the end of the data.
pub const FORWARD_SECONDS: MetricInfo = MetricInfo {
    name: "kumo_listener_forward_seconds",
    kind: MetricKind::Histogram,
    help: "From the start of the message's data to the upstream's reply to its end.",
    labels: &["upstream"],
};

impl UpstreamMetrics {
    pub fn latency(&self) -> &Histogram<{ LATENCY_BUCKETS.len() }> {
        &self.latency
    }
}

fn add(counter: &AtomicU64, by: i64) {
    if by >= 0 {
        counter.fetch_add(by.unsigned_abs(), Ordering::Relaxed);
    } else {
        counter.fetch_sub(by.unsigned_abs(), Ordering::Relaxed);
    }
}

/// What a pool is kept for: the same upstream reached the same way.
#[derive(Clone, PartialEq, Eq, Hash)]
struct PoolKey {
    upstream: Upstream,
    hello_name: String,
    tls: ForwardTls,
    /// The CA bundle `verify` checks against, by identity.
    verifying: Option<usize>,
}

/// The settings of a pool, from the parameters of the first transaction
/// that used it (a later change of `forward_pool_size` takes effect once
/// the pool has been idle and is made again).
#[derive(Clone, Copy, Debug)]
pub struct PoolSettings {
    pub size: usize,
    pub idle_timeout: Duration,
    pub backoff: Duration,
}

/// Every pool of a server.
#[derive(Default)]
pub struct Forwarder {
    pools: Mutex<HashMap<PoolKey, Arc<UpstreamPool>>>,
    metrics: Mutex<Vec<(Arc<str>, Arc<UpstreamMetrics>)>>,
}

impl Forwarder {
    /// The pool for `upstream` reached with `options`.
    pub fn pool(&self, upstream: &Upstream, options: &ConnectOptions, settings: PoolSettings) -> Arc<UpstreamPool> {
        let key = PoolKey {
            upstream: upstream.clone(),
            hello_name: options.hello_name.clone(),
            tls: options.tls,
            verifying: options.verifying.as_ref().map(|config| Arc::as_ptr(config) as usize),
        };
        let mut pools = lock(&self.pools);
        if let Some(pool) = pools.get(&key) {
            return pool.clone();
        }
        let pool = Arc::new(UpstreamPool::new(upstream.clone(), settings, self.metrics_of(&upstream.url)));
        pools.insert(key, pool.clone());
        pool
    }

    fn metrics_of(&self, url: &Arc<str>) -> Arc<UpstreamMetrics> {
        let mut all = lock(&self.metrics);
        if let Some((_, metrics)) = all.iter().find(|(known, _)| known == url) {
            return metrics.clone();
        }
        let metrics = Arc::new(UpstreamMetrics::default());
        all.push((url.clone(), metrics.clone()));
        metrics
    }

    /// What `upstreams` offered when last connected to, for our own EHLO:
    /// the smallest SIZE limit among them, and whether all of them (each
    /// known) take BINARYMIME.
    pub fn offered_by(&self, upstreams: &[Upstream]) -> (Option<u64>, bool) {
        let pools = lock(&self.pools);
        let mut smallest: Option<u64> = None;
        let mut binarymime = true;
        for upstream in upstreams {
            let known = pools.iter().filter(|(key, _)| key.upstream == *upstream).find_map(|(_, pool)| pool.offered());
            match known {
                Some(offered) => {
                    if let Some(limit) = offered.size_limit {
                        smallest = Some(smallest.map_or(limit, |s| s.min(limit)));
                    }
                    binarymime &= offered.binarymime;
                }
                None => binarymime = false,
            }
        }
        (smallest, binarymime)
    }

    /// `(upstream, metrics)` of every upstream used so far.
    pub fn upstream_metrics(&self) -> Vec<(Arc<str>, Arc<UpstreamMetrics>)> {
        lock(&self.metrics).clone()
    }
}

/// The connections to one upstream. Each open connection, in use or idle,
/// holds one of `forward_pool_size` slots.
pub struct UpstreamPool {
    pub upstream: Upstream,
    settings: PoolSettings,
    idle: Mutex<Vec<Idle>>,
    /// What the upstream's EHLO offered when last connected to.
    offered: Mutex<Option<Capabilities>>,
    slots: Arc<Semaphore>,
    /// Told when a connection goes idle or a slot frees.
    returned: Notify,
    down_until: Mutex<Option<Instant>>,
    pub metrics: Arc<UpstreamMetrics>,
}

struct Idle {
    connection: Connection,
    since: Instant,
    slot: OwnedSemaphorePermit,
}

impl UpstreamPool {
    fn new(upstream: Upstream, settings: PoolSettings, metrics: Arc<UpstreamMetrics>) -> Self {
        Self {
            upstream,
            slots: Arc::new(Semaphore::new(settings.size.max(1))),
            settings,
            idle: Mutex::default(),
            offered: Mutex::default(),
            returned: Notify::new(),
            down_until: Mutex::default(),
            metrics,
        }
    }

    fn offered(&self) -> Option<Capabilities> {
        lock(&self.offered).clone()
    }

    /// Whether it failed less than `forward_backoff` ago.
    pub fn is_down(&self) -> bool {
        lock(&self.down_until).is_some_and(|until| Instant::now() < until)
    }

    /// It failed: skip it for a while.
    pub fn mark_down(&self) {
        *lock(&self.down_until) = Some(Instant::now() + self.settings.backoff);
        crate::metrics::count(&self.metrics.failures);
    }

    fn mark_up(&self) {
        *lock(&self.down_until) = None;
    }

    /// A connection: an idle one (not older than `forward_idle_timeout`),
    /// or a new one. While `forward_pool_size` are open and none is idle,
    /// waits as long as connecting may take.
    pub async fn checkout(self: &Arc<Self>, options: &ConnectOptions) -> Result<Lease, ForwardError> {
        let deadline = tokio::time::Instant::now() + options.timeouts.connect;
        loop {
            if let Some(idle) = self.take_idle() {
                return Ok(Lease {
                    connection: Some(idle.connection),
                    reused: true,
                    ended: false,
                    pool: self.clone(),
                    slot: Some(idle.slot),
                });
            }
            if let Ok(slot) = self.slots.clone().try_acquire_owned() {
                return self.open(options, slot).await;
            }
            if tokio::time::timeout_at(deadline, self.returned.notified()).await.is_err() {
                return Err(ForwardError::Unavailable(format!("{}: all connections busy", self.upstream)));
            }
        }
    }

    async fn open(
        self: &Arc<Self>,
        options: &ConnectOptions,
        slot: OwnedSemaphorePermit,
    ) -> Result<Lease, ForwardError> {
        match Connection::open(&self.upstream, options).await {
            Ok(connection) => {
                self.mark_up();
                *lock(&self.offered) = Some(connection.offered.clone());
                add(&self.metrics.connections, 1);
                Ok(Lease {
                    connection: Some(connection),
                    reused: false,
                    ended: false,
                    pool: self.clone(),
                    slot: Some(slot),
                })
            }
            Err(error) => {
                drop(slot);
                self.returned.notify_one();
                self.mark_down();
                Err(error)
            }
        }
    }

    /// The most recently used idle connection; older ones than
    /// `forward_idle_timeout` are closed on the way.
    fn take_idle(&self) -> Option<Idle> {
        let mut idle = lock(&self.idle);
        while let Some(found) = idle.pop() {
            add(&self.metrics.idle, -1);
            if found.since.elapsed() < self.settings.idle_timeout {
                return Some(found);
            }
            add(&self.metrics.connections, -1);
            close(found.connection);
        }
        None
    }

    /// Close every idle connection: one of them was found closed by the
    /// upstream (restarted, say), so the others likely are too.
    pub fn discard_idle(&self) {
        let idle = std::mem::take(&mut *lock(&self.idle));
        for found in idle {
            add(&self.metrics.idle, -1);
            add(&self.metrics.connections, -1);
            close(found.connection);
        }
        self.returned.notify_one();
    }

    fn put_idle(&self, connection: Connection, slot: OwnedSemaphorePermit) {
        add(&self.metrics.idle, 1);
        lock(&self.idle).push(Idle { connection, since: Instant::now(), slot });
        self.returned.notify_one();
    }
}

/// A connection taken from a pool, with its slot. Dropped, it goes back to
/// the pool: at once after [`Lease::transaction_ended`], else after an
/// `RSET` in the background (closed if that fails); [`Lease::discard`]
/// closes it at once.
pub struct Lease {
    connection: Option<Connection>,
    /// Taken from the pool rather than opened for this transaction.
    pub reused: bool,
    /// The upstream answered the end of the data: its transaction is over
    /// (RFC 5321 §4.1.1.4), no `RSET` is needed before the next.
    ended: bool,
    pool: Arc<UpstreamPool>,
    slot: Option<OwnedSemaphorePermit>,
}

impl Lease {
    pub fn connection(&mut self) -> &mut Connection {
        self.connection.as_mut().expect("a lease holds its connection until dropped")
    }

    pub fn pool(&self) -> &Arc<UpstreamPool> {
        &self.pool
    }

    /// The upstream answered the end of the data.
    pub fn transaction_ended(&mut self) {
        self.ended = true;
    }

    /// The connection broke or is in an unknown state: close it.
    pub fn discard(mut self) {
        if let Some(connection) = self.connection.take() {
            add(&self.pool.metrics.connections, -1);
            close(connection);
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let slot = self.slot.take();
        let pool = self.pool.clone();
        let runtime = tokio::runtime::Handle::try_current();
        match (self.connection.take(), slot, runtime) {
            (Some(connection), Some(slot), _) if self.ended => pool.put_idle(connection, slot),
            (Some(mut connection), Some(slot), Ok(runtime)) => {
                runtime.spawn(async move {
                    if connection.reset().await.is_ok() {
                        pool.put_idle(connection, slot);
                    } else {
                        add(&pool.metrics.connections, -1);
                        drop(slot);
                        pool.returned.notify_one();
                    }
                });
            }
            (connection, _, _) => {
                if connection.is_some() {
                    add(&pool.metrics.connections, -1);
                }
                pool.returned.notify_one();
            }
        }
    }
}

/// QUIT in the background, where there is a runtime to run it (there is
/// none while a server is dropped: the connection just closes).
fn close(connection: Connection) {
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        runtime.spawn(connection.quit());
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
