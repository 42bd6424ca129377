//! Against a real `redis-server` (Debian's, installed by
//! tools/install-deps.sh), started on a private port for each test.

use super::*;
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};

/// A private Redis, stopped when dropped.
struct RedisServer {
    child: Child,
    port: u16,
}

impl RedisServer {
    fn start() -> Self {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server is missing: run tools/install-deps.sh");
        // Killed and waited for when dropped, whatever happens next.
        let server = Self { child, port };
        for _ in 0..200 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return server;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("redis-server did not start");
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Shared limits as one process has them, and its bridge (for its logs).
fn limits(url: &str, timeout: Duration) -> (Arc<SharedLimits>, Arc<Bridge>) {
    let bridge = Arc::new(Bridge::new().unwrap());
    let config = SharedConfig { url: url.to_string(), timeout, fail_closed: false };
    (SharedLimits::new(config, bridge.clone()).unwrap(), bridge)
}

fn warnings(bridge: &Bridge) -> Vec<String> {
    let (_, logs) = bridge.take();
    logs.into_iter().filter(|record| record.level == LOG_WARNING).map(|record| record.message).collect()
}

const CLIENT: &str = "192.0.2.7/32";
const TTL: Duration = Duration::from_secs(60);

fn network() -> IpNet {
    CLIENT.parse().unwrap()
}

#[tokio::test]
async fn two_processes_share_one_concurrent_limit_until_a_lease_is_released() {
    let redis = RedisServer::start();
    let (first, _) = limits(&redis.url(), Duration::from_secs(1));
    let (second, _) = limits(&redis.url(), Duration::from_secs(1));
    let Shared::Allowed(held) = first.admit_connection(network(), 2, None, TTL).await else { panic!() };
    let Shared::Allowed(_also) = second.admit_connection(network(), 2, None, TTL).await else { panic!() };
    let refused = first.admit_connection(network(), 2, None, TTL).await;
    assert!(matches!(refused, Shared::Refused(SharedRefusal::TooManyConnections)), "{refused:?}");
    let other: IpNet = "192.0.2.8/32".parse().unwrap();
    assert!(matches!(second.admit_connection(other, 2, None, TTL).await, Shared::Allowed(_)));
    drop(held);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(matches!(second.admit_connection(network(), 2, None, TTL).await, Shared::Allowed(_)));
    assert_eq!(first.metrics.fallbacks.load(Ordering::Relaxed), 0);
    assert_eq!(first.metrics.up.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn a_lease_not_renewed_expires_by_itself() {
    let redis = RedisServer::start();
    let (dying, _) = limits(&redis.url(), Duration::from_secs(1));
    let (other, _) = limits(&redis.url(), Duration::from_secs(1));
    let ttl = Duration::from_millis(600);
    let Shared::Allowed(lease) = dying.admit_connection(network(), 1, None, ttl).await else { panic!() };
    // Renewed while held: still counted after its first time to live.
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert!(matches!(other.admit_connection(network(), 1, None, ttl).await, Shared::Refused(_)));
    // Its process dies: neither renewed nor released.
    lease.renewal.abort();
    std::mem::forget(lease);
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(matches!(other.admit_connection(network(), 1, None, ttl).await, Shared::Allowed(_)));
}

#[tokio::test]
async fn rates_are_gcra_across_processes() {
    let redis = RedisServer::start();
    let (first, _) = limits(&redis.url(), Duration::from_secs(1));
    let (second, _) = limits(&redis.url(), Duration::from_secs(1));
    let rate = Rate { count: 3, per: Duration::from_secs(3) };
    for instance in [&first, &second, &first] {
        assert!(matches!(instance.admit_message(network(), rate).await, Shared::Allowed(())));
    }
    assert!(matches!(second.admit_message(network(), rate).await, Shared::Refused(SharedRefusal::Rate)));
    // One emission interval (1 s) later, one more.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert!(matches!(second.admit_message(network(), rate).await, Shared::Allowed(())));
    assert!(matches!(first.admit_message(network(), rate).await, Shared::Refused(_)));
    // The connection rate, checked with the lease.
    let Shared::Allowed(_a) = first.admit_connection(network(), 10, Some(rate), TTL).await else { panic!() };
    let mut outcomes = Vec::new();
    for _ in 0..3 {
        outcomes.push(second.admit_connection(network(), 10, Some(rate), TTL).await);
    }
    assert!(matches!(outcomes[2], Shared::Refused(SharedRefusal::Rate)), "{outcomes:?}");
}

#[tokio::test]
async fn a_redis_that_never_answers_costs_one_deadline_then_nothing_until_retried() {
    // Accepts connections, never replies.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("redis://{}/0", silent.local_addr().unwrap());
    let (limits, bridge) = limits(&url, Duration::from_millis(100));
    let started = Instant::now();
    assert!(matches!(limits.admit_connection(network(), 1, None, TTL).await, Shared::Unavailable));
    assert!(started.elapsed() < Duration::from_millis(400), "{:?}", started.elapsed());
    let again = Instant::now();
    for _ in 0..10 {
        assert!(matches!(limits.admit_message(network(), Rate { count: 1, per: TTL }).await, Shared::Unavailable));
    }
    assert!(again.elapsed() < Duration::from_millis(50), "no call waits while Redis is known down");
    assert_eq!(limits.metrics.fallbacks.load(Ordering::Relaxed), 11);
    assert_eq!(limits.metrics.up.load(Ordering::Relaxed), 0);
    let logged = warnings(&bridge);
    assert_eq!(logged.len(), 1, "{logged:?}");
    assert!(logged[0].contains("unavailable") && logged[0].contains(&url), "{logged:?}");
    drop(silent);
}

#[tokio::test]
async fn a_restarted_redis_is_used_again() {
    let redis = RedisServer::start();
    let url = redis.url();
    let port = redis.port;
    let (limits, bridge) = limits(&url, Duration::from_millis(100));
    assert!(matches!(limits.admit_message(network(), Rate { count: 100, per: TTL }).await, Shared::Allowed(())));
    drop(redis);
    assert!(matches!(limits.admit_message(network(), Rate { count: 100, per: TTL }).await, Shared::Unavailable));
    assert_eq!(warnings(&bridge).len(), 1);
    let restarted = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let _redis = RedisServer { child: restarted, port };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Shared::Allowed(()) = limits.admit_message(network(), Rate { count: 100, per: TTL }).await {
            break;
        }
        assert!(Instant::now() < deadline, "Redis not used again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(limits.metrics.up.load(Ordering::Relaxed), 1);
    assert!(warnings(&bridge).is_empty(), "one WARNING per outage");
}

#[test]
fn passwords_stay_out_of_logs_and_labels() {
    assert_eq!(redact("redis://user:secret@host:6379/2"), "redis://user:***@host:6379/2");
    assert_eq!(redact("redis://:secret@host:6379"), "redis://***@host:6379");
    assert_eq!(redact("redis://host:6379/0"), "redis://host:6379/0");
    assert_eq!(key(network(), "leases"), "kumo_listener:{192.0.2.7/32}:leases");
}
