//! The process's one resolver and the thread the checks run on.
//!
//! mail-auth looks names up through hickory's resolver, whose connections
//! are tasks of the runtime that made them: shared by the servers of a
//! process (each with its own runtime), it would break when one of them
//! stops. So the checks run on a runtime of their own, one worker thread
//! for the process, that also takes the hashing of bodies and the RSA and
//! Ed25519 verifications off the sessions' loops. The resolver (with its
//! cache) is replaced by [`configure`], for the lookups started after it.

use super::cache::Caches;
use mail_auth::hickory_resolver::config::{
    ConnectionConfig, NameServerConfig, ProtocolConfig, ResolverConfig, ResolverOpts,
};
use mail_auth::hickory_resolver::system_conf::read_system_conf;
use mail_auth::MessageAuthenticator;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tokio::runtime::Runtime;

/// Where and how names are looked up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnsConfig {
    /// Name servers (UDP, then TCP for truncated answers); empty: the
    /// system's (`/etc/resolv.conf`).
    pub servers: Vec<SocketAddr>,
    /// How long one query waits for an answer from one server.
    pub timeout: Duration,
    /// How many times a query is sent before it fails (hickory's `attempts`).
    pub attempts: usize,
    /// The most one check (the SPF of a MAIL FROM, the checks of a message)
    /// may take in all; past it, what is left is `temperror`.
    pub budget: Duration,
}

/// A dead resolver gives `temperror` in seconds, not hickory's 5 s x 2 tries
/// per lookup: well under any client's wait for our reply to the data.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);
pub const DEFAULT_ATTEMPTS: usize = 2;
pub const DEFAULT_BUDGET: Duration = Duration::from_secs(10);

impl Default for DnsConfig {
    fn default() -> Self {
        Self { servers: Vec::new(), timeout: DEFAULT_TIMEOUT, attempts: DEFAULT_ATTEMPTS, budget: DEFAULT_BUDGET }
    }
}

/// The resolver in use and its configuration.
pub struct Resolver {
    pub authenticator: MessageAuthenticator,
    /// The records met, parsed; replaced with the resolver.
    pub caches: Caches,
    pub config: DnsConfig,
}

static CURRENT: Mutex<Option<Arc<Resolver>>> = Mutex::new(None);

/// The runtime the checks run on: one worker thread for the process.
fn runtime() -> &'static Runtime {
    static RUNTIME: OnceLock<Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .max_blocking_threads(4)
            .thread_name("kumo-auth")
            .enable_all()
            .build()
            .expect("the authentication runtime")
    })
}

/// Use `config` for the lookups started from now on. `Err` (the resolver
/// kept as it was) when the system's configuration cannot be read.
pub fn configure(config: DnsConfig) -> Result<(), String> {
    let resolver = build(config)?;
    *CURRENT.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(Arc::new(resolver));
    Ok(())
}

/// The resolver in use, made from the system's configuration at first use.
pub fn current() -> Result<Arc<Resolver>, String> {
    let mut current = CURRENT.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(resolver) = &*current {
        return Ok(resolver.clone());
    }
    let resolver = Arc::new(build(DnsConfig::default())?);
    *current = Some(resolver.clone());
    Ok(resolver)
}

fn build(config: DnsConfig) -> Result<Resolver, String> {
    let (resolver_config, mut options) = if config.servers.is_empty() {
        read_system_conf().map_err(|error| format!("reading the system's resolver configuration: {error}"))?
    } else {
        let servers = config.servers.iter().map(|address| {
            let connection = |protocol| {
                let mut connection = ConnectionConfig::new(protocol);
                connection.port = address.port();
                connection
            };
            NameServerConfig::new(
                address.ip(),
                true,
                vec![connection(ProtocolConfig::Udp), connection(ProtocolConfig::Tcp)],
            )
        });
        (ResolverConfig::from_parts(None, Vec::new(), servers.collect()), ResolverOpts::default())
    };
    options.timeout = config.timeout;
    options.attempts = config.attempts;
    // The names asked are absolute: no search domains, no hosts file.
    options.ndots = 0;
    options.use_hosts_file = mail_auth::hickory_resolver::config::ResolveHosts::Never;
    options.cache_size = 8192;
    let _inside = runtime().enter();
    let authenticator = MessageAuthenticator::new(resolver_config, options).map_err(|error| error.to_string())?;
    Ok(Resolver { authenticator, caches: Caches::default(), config })
}

/// Poll `check` on the calling task, inside the authentication runtime's
/// context: what it spawns (hickory's connections, on a lookup its cache
/// cannot answer) and its timers belong to that runtime, as with [`run`],
/// without the two hops between threads [`run`] costs (about 20 µs of CPU).
/// For checks that are cheap when their records are cached. `None` if it
/// panicked (a bug of the library on hostile input must cost only the
/// message's results, as with [`run`], not the session).
pub async fn inline<T>(check: impl Future<Output = T>) -> Option<T> {
    let mut check = std::pin::pin!(check);
    std::future::poll_fn(|context| {
        let _inside = runtime().enter();
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check.as_mut().poll(context))) {
            Ok(poll) => poll.map(Some),
            Err(_) => std::task::Poll::Ready(None),
        }
    })
    .await
}

/// Run `check` on the authentication runtime; `None` if it panicked.
pub async fn run<T: Send + 'static>(check: impl Future<Output = T> + Send + 'static) -> Option<T> {
    runtime().spawn(check).await.ok()
}

/// Start `check` on the authentication runtime, to be awaited later.
pub fn start<T: Send + 'static>(check: impl Future<Output = T> + Send + 'static) -> tokio::task::JoinHandle<T> {
    runtime().spawn(check)
}

/// Run `work` on a blocking thread of the authentication runtime; `None` if it panicked.
pub async fn blocking<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    runtime().spawn_blocking(work).await.ok()
}

/// Run `check` on the authentication runtime and block the calling thread
/// (one that is not the runtime's) until it is done; `None` if it panicked.
pub fn wait<T: Send + 'static>(check: impl Future<Output = T> + Send + 'static) -> Option<T> {
    let (done, result) = std::sync::mpsc::sync_channel(1);
    runtime().spawn(async move {
        let _ = done.send(check.await);
    });
    result.recv().ok()
}
