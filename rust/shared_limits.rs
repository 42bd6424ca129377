//! Per-client limits shared through Redis (`--redis`), so that every
//! process and host pointing at the same Redis counts a client together:
//! `max_connections_per_client` as leases that expire on their own (a
//! sorted set per client: lease id → expiry), renewed while their session
//! lives and removed when it ends; `max_connection_rate_per_client` and
//! `max_message_rate_per_client` as GCRA (a theoretical arrival time per
//! client and limit). Each check is one script call (EVALSHA, loaded again
//! after NOSCRIPT) over one multiplexed connection that reconnects by
//! itself; the scripts take Redis's clock, not the hosts'.
//!
//! Redis never stalls mail: every call has a deadline (`redis_timeout`,
//! 100 ms by default); a call that fails or misses it is answered by the
//! per-process limits instead ([`Shared::Unavailable`]), or, with
//! `redis_fail_closed`, new connections are refused. While Redis is down,
//! one call a second tries it again, the others do not wait. One WARNING
//! when an outage starts, one line when it ends.

use crate::bridge::Bridge;
use crate::client_limits::Rate;
use crate::log::{LOG_INFO, LOG_WARNING};
use crate::metric_table;
use crate::metrics;
use ipnet::IpNet;
use redis::aio::ConnectionManager;
use redis::{Client, Script};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

metric_table! {
    /// What happened with the Redis of the shared per-client limits.
    RedisMetrics, REDIS_METRICS, "redis",
    extra {}
    rows {
    Counter calls: "kumo_listener_redis_calls", "Calls to Redis for the shared per-client limits answered in time.";
    Counter fallbacks: "kumo_listener_redis_fallbacks",
        "Per-client limit checks Redis did not answer in time (or failed): counted per process instead, \
         or refused with redis_fail_closed.";
    Gauge up: "kumo_listener_redis_up", "1 while Redis answers the shared per-client limits' calls, else 0.";
    }
}

/// `redis_timeout` when none is given.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(100);

/// While Redis is down, how often a call tries it again (the others fall
/// back at once).
const RETRY_EVERY: Duration = Duration::from_secs(1);

/// Prefix of every key; the client's network in braces (one hash slot per
/// client, for a Redis Cluster).
const KEY_PREFIX: &str = "kumo_listener:";

/// The Lua every script starts with: Redis's clock, and the two steps the
/// scripts share, declared once.
macro_rules! lua_prelude {
    () => {
        r"
local t = redis.call('TIME')
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
local now_ms = math.floor(now_us / 1000)
-- One event under a GCRA rate of `count` per `period` microseconds: false if refused.
local function gcra(key, count, period)
  local tat = tonumber(redis.call('GET', key)) or now_us
  if tat < now_us then tat = now_us end
  local new_tat = tat + period / count
  if new_tat - period > now_us then return false end
  redis.call('SET', key, string.format('%.0f', new_tat), 'PX', math.ceil((new_tat - now_us) / 1000) + 1)
  return true
end
-- Hold the lease `member` for `ttl` milliseconds from now.
local function lease(key, member, ttl)
  redis.call('ZADD', key, now_ms + ttl, member)
  if redis.call('PTTL', key) < ttl then redis.call('PEXPIRE', key, ttl) end
end
"
    };
}

/// A new connection: prune expired leases; refuse past the concurrent
/// limit (1) or the connection rate (2, GCRA); else take a lease (0).
const ADMIT: &str = concat!(
    lua_prelude!(),
    r"
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now_ms)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then return 1 end
local count = tonumber(ARGV[4])
if count > 0 and not gcra(KEYS[2], count, tonumber(ARGV[5])) then return 2 end
lease(KEYS[1], ARGV[1], tonumber(ARGV[2]))
return 0
"
);

/// A lease's session still lives: push its expiry on (adding it again if
/// it expired meanwhile, say while Redis was down).
const RENEW: &str = concat!(lua_prelude!(), "lease(KEYS[1], ARGV[1], tonumber(ARGV[2]))\nreturn 0\n");

/// One event under a GCRA rate: 0 allowed (and counted), 2 refused.
const RATE: &str =
    concat!(lua_prelude!(), "if not gcra(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2])) then return 2 end\nreturn 0\n");

/// How the operator configured the shared limits.
#[derive(Clone, Debug)]
pub struct SharedConfig {
    /// `redis://HOST:PORT[/DB]` (or `rediss://`, `redis+unix://`).
    pub url: String,
    /// Each call's deadline.
    pub timeout: Duration,
    /// Refuse new connections (421 4.3.0) rather than count per process
    /// when Redis does not answer.
    pub fail_closed: bool,
}

/// What Redis said of a check.
#[derive(Debug)]
pub enum Shared<T> {
    Allowed(T),
    /// Past the concurrent limit or the rate.
    Refused(SharedRefusal),
    /// No answer in time, or an error: the per-process limits decide.
    Unavailable,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SharedRefusal {
    TooManyConnections,
    Rate,
}

const STATE_UNKNOWN: u8 = 0;
const STATE_UP: u8 = 1;
const STATE_DOWN: u8 = 2;

/// The shared limits of one server: its connection to Redis and what it knows of it.
pub struct SharedLimits {
    config: SharedConfig,
    /// The URL without a password, for logs and the metrics' label.
    label: Arc<str>,
    connection: ConnectionManager,
    admit: Script,
    renew: Script,
    rate: Script,
    bridge: Arc<Bridge>,
    metrics: Arc<RedisMetrics>,
    state: AtomicU8,
    /// Milliseconds after `epoch` before which no call tries Redis (while down).
    retry_at: AtomicU64,
    epoch: Instant,
    /// This process's prefix of lease ids, and the next lease's number.
    lease_prefix: String,
    next_lease: AtomicU64,
}

impl SharedLimits {
    /// Set up the connection (made on first use, in the background: call
    /// within the runtime) and check the URL.
    pub fn new(config: SharedConfig, bridge: Arc<Bridge>) -> Result<Arc<Self>, String> {
        let client = Client::open(config.url.as_str()).map_err(|e| format!("redis {:?}: {e}", config.url))?;
        let label: Arc<str> = Arc::from(redact(&config.url));
        let manager_config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.timeout.max(Duration::from_secs(1))))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_millis(500));
        let connection = ConnectionManager::new_lazy_with_config(client, manager_config)
            .map_err(|e| format!("redis {label}: {e}"))?;
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
        let lease_prefix =
            format!("{}.{}.{:x}", gethostname::gethostname().to_string_lossy(), std::process::id(), nanos);
        Ok(Arc::new(Self {
            config,
            label,
            connection,
            admit: Script::new(ADMIT),
            renew: Script::new(RENEW),
            rate: Script::new(RATE),
            bridge,
            metrics: Arc::default(),
            state: AtomicU8::new(STATE_UNKNOWN),
            retry_at: AtomicU64::new(0),
            epoch: Instant::now(),
            lease_prefix,
            next_lease: AtomicU64::new(0),
        }))
    }

    /// Connect now, and say at once (one WARNING) if Redis does not answer.
    pub async fn check(self: Arc<Self>) {
        let mut connection = self.connection.clone();
        let command = redis::cmd("PING");
        let ping = command.query_async::<String>(&mut connection);
        let _ = self.finish(tokio::time::timeout(self.config.timeout.max(Duration::from_secs(1)), ping).await);
    }

    pub fn fail_closed(&self) -> bool {
        self.config.fail_closed
    }

    /// `[(the URL without a password, the counters)]`, for the metrics.
    pub fn metrics(&self) -> (Arc<str>, Arc<RedisMetrics>) {
        (self.label.clone(), self.metrics.clone())
    }

    /// Take a lease for a new connection of `network` (held `lease_ttl`,
    /// renewed every half of it until dropped) unless it already has
    /// `max_connections`, or `rate` (the connection rate) refuses it.
    pub async fn admit_connection(
        self: &Arc<Self>,
        network: IpNet,
        max_connections: usize,
        rate: Option<Rate>,
        lease_ttl: Duration,
    ) -> Shared<Lease> {
        let leases = key(network, "leases");
        let id = format!("{}.{}", self.lease_prefix, self.next_lease.fetch_add(1, Ordering::Relaxed));
        let ttl_ms = lease_ttl.as_millis().max(1) as u64;
        let (count, period) = rate.map_or((0, 0), |rate| (rate.count, rate.per.as_micros() as u64));
        let mut invocation = self.admit.prepare_invoke();
        invocation.key(&leases).key(key(network, "connection_rate")).arg(&id).arg(ttl_ms);
        invocation.arg(max_connections as u64).arg(count).arg(period);
        match self.call(invocation.invoke_async::<i64>(&mut self.connection.clone())).await {
            Some(0) => Shared::Allowed(Lease::new(self.clone(), leases, id, lease_ttl)),
            Some(1) => Shared::Refused(SharedRefusal::TooManyConnections),
            Some(_) => Shared::Refused(SharedRefusal::Rate),
            None => Shared::Unavailable,
        }
    }

    /// Count one more message (a MAIL command) of `network` under `rate`.
    pub async fn admit_message(&self, network: IpNet, rate: Rate) -> Shared<()> {
        let mut invocation = self.rate.prepare_invoke();
        invocation.key(key(network, "message_rate")).arg(rate.count).arg(rate.per.as_micros() as u64);
        match self.call(invocation.invoke_async::<i64>(&mut self.connection.clone())).await {
            Some(0) => Shared::Allowed(()),
            Some(_) => Shared::Refused(SharedRefusal::Rate),
            None => Shared::Unavailable,
        }
    }

    /// Run `request` within the deadline, unless Redis is down and not due
    /// to be tried again; `None` (counted as a fallback) when no answer.
    async fn call<T>(&self, request: impl std::future::Future<Output = redis::RedisResult<T>>) -> Option<T> {
        if self.state.load(Ordering::Acquire) == STATE_DOWN && !self.may_try_again() {
            metrics::count(&self.metrics.fallbacks);
            return None;
        }
        let answer = self.finish(tokio::time::timeout(self.config.timeout, request).await);
        if answer.is_none() {
            metrics::count(&self.metrics.fallbacks);
        }
        answer
    }

    /// Whether this call is the one that tries Redis again now.
    fn may_try_again(&self) -> bool {
        let now = self.epoch.elapsed().as_millis() as u64;
        let due = self.retry_at.load(Ordering::Acquire);
        now >= due
            && self
                .retry_at
                .compare_exchange(due, now + RETRY_EVERY.as_millis() as u64, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
    }

    /// Note an answer (Redis is up) or its absence (down: one WARNING per outage).
    fn finish<T>(&self, result: Result<redis::RedisResult<T>, tokio::time::error::Elapsed>) -> Option<T> {
        let error = match result {
            Ok(Ok(value)) => {
                metrics::count(&self.metrics.calls);
                self.metrics.up.store(1, Ordering::Relaxed);
                if self.state.swap(STATE_UP, Ordering::AcqRel) == STATE_DOWN {
                    let label = &self.label;
                    self.bridge
                        .log(LOG_INFO, || format!("redis: {label} answers again: per-client limits shared again"));
                }
                return Some(value);
            }
            Ok(Err(error)) => error.to_string(),
            Err(_) => format!("no answer within {:?}", self.config.timeout),
        };
        self.metrics.up.store(0, Ordering::Relaxed);
        let now = self.epoch.elapsed().as_millis() as u64;
        self.retry_at.fetch_max(now + RETRY_EVERY.as_millis() as u64, Ordering::AcqRel);
        if self.state.swap(STATE_DOWN, Ordering::AcqRel) != STATE_DOWN {
            let label = &self.label;
            let meanwhile = if self.config.fail_closed {
                "new connections refused (421 4.3.0) until it answers"
            } else {
                "per-client limits counted per process until it answers"
            };
            self.bridge.log(LOG_WARNING, || format!("redis: {label} unavailable ({error}): {meanwhile}"));
        }
        None
    }
}

/// The key of `network`'s `what`: `kumo_listener:{192.0.2.7/32}:leases`.
fn key(network: IpNet, what: &str) -> String {
    format!("{KEY_PREFIX}{{{network}}}:{what}")
}

/// `url` without its password, if it has one.
fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    match authority.rsplit_once('@') {
        Some((credentials, host)) => {
            let user = credentials.split_once(':').map_or(credentials, |(user, _)| user);
            let user = if user.is_empty() { String::new() } else { format!("{user}:") };
            format!("{scheme}://{user}***@{host}{path}")
        }
        None => url.to_string(),
    }
}

/// One session's place among its client's connections, in Redis: renewed
/// every half of its time to live while held, removed when dropped (or
/// expired by itself if this process dies or loses Redis).
pub struct Lease {
    renewal: tokio::task::JoinHandle<()>,
    limits: Arc<SharedLimits>,
    key: String,
    id: String,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease").field("key", &self.key).field("id", &self.id).finish()
    }
}

impl Lease {
    fn new(limits: Arc<SharedLimits>, key: String, id: String, ttl: Duration) -> Self {
        let renewal = tokio::spawn(renew(limits.clone(), key.clone(), id.clone(), ttl));
        Self { renewal, limits, key, id }
    }
}

async fn renew(limits: Arc<SharedLimits>, key: String, id: String, ttl: Duration) {
    let ttl_ms = ttl.as_millis().max(1) as u64;
    loop {
        tokio::time::sleep(ttl / 2).await;
        let mut invocation = limits.renew.prepare_invoke();
        invocation.key(&key).arg(&id).arg(ttl_ms);
        let mut connection = limits.connection.clone();
        let _ = limits.call(invocation.invoke_async::<i64>(&mut connection)).await;
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.renewal.abort();
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let limits = self.limits.clone();
        let (key, id) = (std::mem::take(&mut self.key), std::mem::take(&mut self.id));
        runtime.spawn(async move {
            let mut connection = limits.connection.clone();
            let mut command = redis::cmd("ZREM");
            command.arg(&key).arg(&id);
            let release = command.query_async::<i64>(&mut connection);
            let _ = limits.call(release).await;
        });
    }
}

#[cfg(test)]
mod tests;
