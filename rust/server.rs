//! Listeners and their accept loops, connection limits, graceful shutdown.
//!
//! The server builds one [`SessionContext`] per listener and hands it to
//! each session it spawns: sessions know nothing of the server. Nothing
//! here owns the runtime the tasks run on (the caller keeps the
//! [`crate::driver::Driver`]), so dropping the runtime drops every task and
//! socket with it.

use crate::body::BodyStore;
use crate::bridge::Bridge;
use crate::client_limits::{ClientTable, CLIENT_TABLE_CAPACITY};
use crate::forward::pool::Forwarder;
use crate::log::{LOG_ERROR, LOG_INFO};
use crate::metrics::{self, ListenerMetrics};
use crate::params::{ListenerConfig, Params};
use crate::protocol::reply::Reply;
use crate::session::{self, SessionContext, Shutdown, UNIX_CLIENT};
use crate::shared_limits::SharedLimits;
use crate::sink::Sink;
use crate::stream::Transport;
use crate::tls::{self, TlsCache};
use socket2::{Domain, SockAddr, Socket, Type};
use std::fs;
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, UnixListener};
use tokio::runtime::Handle;
use tokio::sync::watch;

/// What every listener of one server shares.
pub struct ServerState {
    pub bridge: Arc<Bridge>,
    /// Bind with SO_REUSEPORT, so that worker processes share the port.
    reuse_port: bool,
    pub sink: Sink,
    tls: Arc<TlsCache>,
    clients: Arc<ClientTable>,
    /// The per-client limits shared through Redis, when configured.
    pub shared_limits: Option<Arc<SharedLimits>>,
    pub forwarder: Arc<Forwarder>,
    /// `Some` once shutdown is asked for: until when messages may finish.
    shutdown: watch::Sender<Option<tokio::time::Instant>>,
    sessions: AtomicUsize,
    /// Listening sockets still open: each closes when its accept loop sees the shutdown.
    listening: AtomicUsize,
    /// Each listener's name and counters, in the order they were started.
    metrics: Mutex<Vec<(Arc<str>, Arc<ListenerMetrics>)>>,
}

impl ServerState {
    pub fn new(
        bridge: Arc<Bridge>,
        sink: Sink,
        reuse_port: bool,
        shared_limits: Option<Arc<SharedLimits>>,
    ) -> Arc<Self> {
        Arc::new(Self {
            bridge,
            reuse_port,
            sink,
            tls: Arc::new(TlsCache::new(tls::CACHE_TTL, tls::CACHE_CAPACITY)),
            clients: ClientTable::new(CLIENT_TABLE_CAPACITY),
            shared_limits,
            forwarder: Arc::default(),
            shutdown: watch::Sender::new(None),
            sessions: AtomicUsize::new(0),
            listening: AtomicUsize::new(0),
            metrics: Mutex::default(),
        })
    }

    /// Stop accepting and ask every session to finish: idle ones at once,
    /// one receiving a message once it has (within most of `grace`, see
    /// [`session::message_grace_ends`]). Asked again, the first request stands.
    pub fn begin_shutdown(&self, grace: std::time::Duration) {
        let grace_ends = session::message_grace_ends(tokio::time::Instant::now(), grace);
        self.shutdown.send_if_modified(|state| state.is_none() && state.replace(grace_ends).is_none());
    }

    pub fn active_sessions(&self) -> usize {
        self.sessions.load(Ordering::Acquire)
    }

    pub fn open_listeners(&self) -> usize {
        self.listening.load(Ordering::Acquire)
    }

    /// Each listener's name and counters.
    pub fn listener_metrics(&self) -> Vec<(Arc<str>, Arc<ListenerMetrics>)> {
        self.metrics.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    fn shutdown_signal(&self) -> Shutdown {
        Shutdown::new(self.shutdown.subscribe())
    }
}

/// One listener: what its sessions see (its counters among it).
struct Listener {
    context: Arc<SessionContext>,
    server: Arc<ServerState>,
}

/// Counts a connection on its listener and the server while alive.
struct ConnectionSlot(Arc<Listener>);

impl ConnectionSlot {
    fn claim(listener: &Arc<Listener>) -> Option<Self> {
        let metrics = &listener.context.metrics;
        metrics::count(&metrics.connections);
        let previous = metrics.active.fetch_add(1, Ordering::AcqRel);
        listener.server.sessions.fetch_add(1, Ordering::AcqRel);
        let slot = ConnectionSlot(listener.clone());
        (previous < listener.context.config.max_connections as u64).then_some(slot)
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.context.metrics.active.fetch_sub(1, Ordering::AcqRel);
        self.0.server.sessions.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Where a listener was bound.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BoundAddress {
    /// With the real port when `listen` gave port 0.
    Inet(SocketAddr),
    Unix(PathBuf),
}

/// Bind `config.listen` and start accepting on `runtime`.
pub fn start_listener(server: Arc<ServerState>, runtime: &Handle, config: ListenerConfig) -> io::Result<BoundAddress> {
    let (socket, bound) = match config.unix_path() {
        Some(path) if server.reuse_port => {
            let message = format!("listen: {}: a Unix socket cannot be shared by worker processes", path.display());
            return Err(io::Error::new(io::ErrorKind::InvalidInput, message));
        }
        Some(path) => (BoundSocket::Unix(bind_unix(path)?), BoundAddress::Unix(path.to_owned())),
        None => {
            let address: SocketAddr = config.listen.parse().map_err(|_| {
                io::Error::new(io::ErrorKind::InvalidInput, format!("listen: invalid address {:?}", config.listen))
            })?;
            let socket = bind(address, server.reuse_port)?;
            let bound = socket.local_addr()?;
            (BoundSocket::Tcp(socket), BoundAddress::Inet(bound))
        }
    };
    let metrics: Arc<ListenerMetrics> = Arc::default();
    let spool = BodyStore::new(spool_dir(&config, &server.sink)?, config.body_memory_limit, metrics.clone());
    let context = Arc::new(SessionContext {
        listener: Arc::from(config.listen.as_str()),
        config,
        policy: server.bridge.clone(),
        sink: server.sink.clone(),
        spool,
        tls: server.tls.clone(),
        clients: server.clients.clone(),
        shared_limits: server.shared_limits.clone(),
        metrics,
        forwarder: server.forwarder.clone(),
        shutdown: server.shutdown_signal(),
    });
    let entry = (context.listener.clone(), context.metrics.clone());
    server.metrics.lock().unwrap_or_else(PoisonError::into_inner).push(entry);
    let listener = Arc::new(Listener { context, server });
    let _entered = runtime.enter();
    let socket = socket.into_tokio()?;
    listener.server.listening.fetch_add(1, Ordering::AcqRel);
    runtime.spawn(accept_loop(socket, listener));
    Ok(bound)
}

/// `body_spool_path` (made if missing), or the sink's choice.
fn spool_dir(config: &ListenerConfig, sink: &Sink) -> io::Result<PathBuf> {
    let Some(dir) = &config.body_spool_path else {
        return Ok(sink.spool_dir());
    };
    std::fs::create_dir_all(dir)
        .map_err(|e| io::Error::new(e.kind(), format!("body_spool_path {}: {e}", dir.display())))?;
    Ok(dir.clone())
}

fn bind(address: SocketAddr, reuse_port: bool) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(address), Type::STREAM, None)?;
    if address.is_ipv6() {
        // `[::]:25` serves IPv4 clients too, as `::ffff:a.b.c.d`.
        socket.set_only_v6(false)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(reuse_port)?;
    socket.set_nonblocking(true)?;
    socket.bind(&address.into()).map_err(|e| io::Error::new(e.kind(), format!("cannot listen on {address}: {e}")))?;
    socket.listen(1024)?;
    Ok(socket.into())
}

/// Any local user may connect, as to a loopback port: access is for the
/// directory's permissions to restrict.
const UNIX_SOCKET_MODE: u32 = 0o666;

/// Bind a Unix socket at `path`, in place of a stale one (a socket file no
/// server answers on), never of another file.
fn bind_unix(path: &Path) -> io::Result<(std::os::unix::net::UnixListener, SocketFile)> {
    let failed = |e: io::Error| io::Error::new(e.kind(), format!("cannot listen on {}: {e}", path.display()));
    match fs::symlink_metadata(path) {
        Err(error) if error.kind() == io::ErrorKind::NotFound => {}
        Err(error) => return Err(failed(error)),
        Ok(found) if !found.file_type().is_socket() => {
            return Err(failed(io::Error::new(io::ErrorKind::AlreadyExists, "the file exists and is not a socket")));
        }
        Ok(_) if std::os::unix::net::UnixStream::connect(path).is_ok() => {
            return Err(failed(io::Error::new(io::ErrorKind::AddrInUse, "a server is listening on it")));
        }
        Ok(_) => fs::remove_file(path).map_err(failed)?,
    }
    let socket = Socket::new(Domain::UNIX, Type::STREAM, None)?;
    socket.bind(&SockAddr::unix(path)?).map_err(failed)?;
    let file = SocketFile::of(path).map_err(failed)?;
    fs::set_permissions(path, fs::Permissions::from_mode(UNIX_SOCKET_MODE)).map_err(failed)?;
    socket.set_nonblocking(true)?;
    socket.listen(1024)?;
    Ok((socket.into(), file))
}

/// The file of a bound Unix socket, removed when the listener stops unless
/// it was replaced meanwhile (by another server bound to the same path).
struct SocketFile {
    path: PathBuf,
    identity: (u64, u64),
}

impl SocketFile {
    fn of(path: &Path) -> io::Result<Self> {
        Ok(Self { path: path.to_owned(), identity: file_identity(&fs::symlink_metadata(path)?) })
    }
}

fn file_identity(metadata: &fs::Metadata) -> (u64, u64) {
    (metadata.dev(), metadata.ino())
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if fs::symlink_metadata(&self.path).is_ok_and(|found| file_identity(&found) == self.identity) {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// A bound listening socket, before it joins the runtime.
enum BoundSocket {
    Tcp(std::net::TcpListener),
    Unix((std::os::unix::net::UnixListener, SocketFile)),
}

impl BoundSocket {
    fn into_tokio(self) -> io::Result<Listening> {
        Ok(match self {
            BoundSocket::Tcp(socket) => Listening::Tcp(TcpListener::from_std(socket)?),
            BoundSocket::Unix((socket, file)) => {
                Listening::Unix { socket: UnixListener::from_std(socket)?, _file: file }
            }
        })
    }
}

enum Listening {
    Tcp(TcpListener),
    /// The file is removed with the socket.
    Unix {
        socket: UnixListener,
        _file: SocketFile,
    },
}

impl Listening {
    /// Accept one connection and start its session.
    async fn accept(&self, listener: &Arc<Listener>) -> io::Result<()> {
        match self {
            Listening::Tcp(socket) => {
                let (stream, remote) = socket.accept().await?;
                let _ = stream.set_nodelay(true);
                if let Ok(local) = stream.local_addr() {
                    admit(stream, remote, local, listener);
                }
            }
            Listening::Unix { socket, .. } => {
                let (stream, _) = socket.accept().await?;
                admit(stream, UNIX_CLIENT, UNIX_CLIENT, listener);
            }
        }
        Ok(())
    }
}

async fn accept_loop(socket: Listening, listener: Arc<Listener>) {
    let context = listener.context.clone();
    context.policy.log(LOG_INFO, || format!("listening on {}", context.listener));
    loop {
        let accepted = tokio::select! {
            accepted = socket.accept(&listener) => accepted,
            () = context.shutdown.requested() => break,
        };
        // Typically EMFILE or a connection reset before accept: keep serving.
        if let Err(error) = accepted {
            context.policy.log(LOG_ERROR, || format!("{}: accept failed: {error}", context.listener));
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
    drop(socket);
    listener.server.listening.fetch_sub(1, Ordering::AcqRel);
    context.policy.log(LOG_INFO, || format!("stopped listening on {}", context.listener));
}

fn admit<S: Transport + Sync>(stream: S, remote: SocketAddr, local: SocketAddr, listener: &Arc<Listener>) {
    let slot = ConnectionSlot::claim(listener);
    let context = listener.context.clone();
    tokio::spawn(async move {
        match slot {
            Some(_slot) => session::run(stream, remote, local, context).await,
            None => refuse_busy(stream, &context.config).await,
        }
    });
}

/// Past `max_connections`: say so and close, without running any policy.
async fn refuse_busy<S: Transport>(mut stream: S, config: &ListenerConfig) {
    let hostname = config.params.hostname.clone().unwrap_or_else(|| Params::default().hostname);
    let mut reply = Vec::new();
    Reply::with_text(421, "4.3.2", format!("{hostname} too many concurrent sessions. Try later"))
        .write(&mut reply, true);
    let _ = stream.write_all(&reply).await;
    let _ = stream.shutdown().await;
}
