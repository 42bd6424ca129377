//! Listeners and their accept loops, connection limits, graceful shutdown.
//!
//! The server builds one [`SessionContext`] per listener and hands it to
//! each session it spawns: sessions know nothing of the server. Nothing
//! here owns the runtime the tasks run on (the caller keeps the
//! [`crate::driver::Driver`]), so dropping the runtime drops every task and
//! socket with it.

use crate::body::Spool;
use crate::bridge::Bridge;
use crate::clients::{ClientTable, CLIENT_TABLE_CAPACITY};
use crate::log::{LOG_ERROR, LOG_INFO};
use crate::metrics::{self, ListenerMetrics};
use crate::params::{ListenerConfig, Params};
use crate::reply::Reply;
use crate::session::{self, SessionContext, Shutdown};
use crate::sink::Sink;
use crate::tls::{self, TlsCache};
use socket2::{Domain, Socket, Type};
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
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
    shutdown: watch::Sender<bool>,
    sessions: AtomicUsize,
    /// Listening sockets still open: each closes when its accept loop sees the shutdown.
    listening: AtomicUsize,
    /// Each listener's name and counters, in the order they were started.
    metrics: Mutex<Vec<(Arc<str>, Arc<ListenerMetrics>)>>,
}

impl ServerState {
    pub fn new(bridge: Arc<Bridge>, sink: Sink, reuse_port: bool) -> Arc<Self> {
        Arc::new(Self {
            bridge,
            reuse_port,
            sink,
            tls: Arc::new(TlsCache::new(tls::CACHE_TTL, tls::CACHE_CAPACITY)),
            clients: ClientTable::new(CLIENT_TABLE_CAPACITY),
            shutdown: watch::Sender::new(false),
            sessions: AtomicUsize::new(0),
            listening: AtomicUsize::new(0),
            metrics: Mutex::default(),
        })
    }

    /// Stop accepting and ask every session to finish.
    pub fn begin_shutdown(&self) {
        self.shutdown.send_replace(true);
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

/// Bind `config.listen` and start accepting on `runtime`.
pub fn start_listener(server: Arc<ServerState>, runtime: &Handle, config: ListenerConfig) -> io::Result<SocketAddr> {
    let address: SocketAddr = config.listen.parse().map_err(|_| {
        io::Error::new(io::ErrorKind::InvalidInput, format!("listen: invalid address {:?}", config.listen))
    })?;
    let socket = bind(address, server.reuse_port)?;
    let bound = socket.local_addr()?;
    let metrics: Arc<ListenerMetrics> = Arc::default();
    let spool = Spool::new(spool_dir(&config, &server.sink)?, config.body_memory_limit, metrics.clone());
    let context = Arc::new(SessionContext {
        listener: Arc::from(config.listen.as_str()),
        config,
        policy: server.bridge.clone(),
        sink: server.sink.clone(),
        spool,
        tls: server.tls.clone(),
        clients: server.clients.clone(),
        metrics,
        shutdown: server.shutdown_signal(),
    });
    let entry = (context.listener.clone(), context.metrics.clone());
    server.metrics.lock().unwrap_or_else(PoisonError::into_inner).push(entry);
    let listener = Arc::new(Listener { context, server });
    let _entered = runtime.enter();
    let socket = TcpListener::from_std(socket)?;
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

async fn accept_loop(socket: TcpListener, listener: Arc<Listener>) {
    let context = listener.context.clone();
    context.policy.log(LOG_INFO, || format!("listening on {}", context.listener));
    loop {
        let accepted = tokio::select! {
            accepted = socket.accept() => accepted,
            () = context.shutdown.requested() => break,
        };
        match accepted {
            Ok((stream, remote)) => admit(stream, remote, &listener),
            // Typically EMFILE or a connection reset before accept: keep serving.
            Err(error) => {
                context.policy.log(LOG_ERROR, || format!("{}: accept failed: {error}", context.listener));
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
    drop(socket);
    listener.server.listening.fetch_sub(1, Ordering::AcqRel);
    context.policy.log(LOG_INFO, || format!("stopped listening on {}", context.listener));
}

fn admit(stream: TcpStream, remote: SocketAddr, listener: &Arc<Listener>) {
    let _ = stream.set_nodelay(true);
    let slot = ConnectionSlot::claim(listener);
    let context = listener.context.clone();
    tokio::spawn(async move {
        let local = match stream.local_addr() {
            Ok(local) => local,
            Err(_) => return,
        };
        match slot {
            Some(_slot) => session::run(stream, remote, local, context).await,
            None => refuse_busy(stream, &context.config).await,
        }
    });
}

/// Past `max_connections`: say so and close, without running any policy.
async fn refuse_busy(mut stream: TcpStream, config: &ListenerConfig) {
    let hostname = config.params.hostname.clone().unwrap_or_else(|| Params::default().hostname);
    let mut reply = Vec::new();
    Reply::with_text(421, "4.3.2", format!("{hostname} too many concurrent sessions. Try later"))
        .write(&mut reply, true);
    let _ = stream.write_all(&reply).await;
    let _ = stream.shutdown().await;
}
