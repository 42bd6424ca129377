//! Listeners and their accept loops, connection limits, graceful shutdown.

use crate::bridge::Bridge;
use crate::driver::Driver;
use crate::log::{LOG_ERROR, LOG_INFO};
use crate::params::{ListenerConfig, Params};
use crate::reply::write_reply;
use crate::session;
use crate::sink::Sink;
use crate::tls::{self, TlsCache};
use socket2::{Domain, Socket, Type};
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify};

/// What every listener of one server shares.
pub struct ServerState {
    pub bridge: Arc<Bridge>,
    /// The runtime the listeners and sessions run on.
    pub driver: Driver,
    /// Bind with SO_REUSEPORT, so that worker processes share the port.
    reuse_port: bool,
    pub sink: Sink,
    pub tls: Arc<TlsCache>,
    shutdown: watch::Sender<bool>,
    sessions: AtomicUsize,
    idle: Notify,
}

impl ServerState {
    pub fn new(bridge: Arc<Bridge>, sink: Sink, reuse_port: bool) -> io::Result<Arc<Self>> {
        Ok(Arc::new(Self {
            bridge,
            driver: Driver::new()?,
            reuse_port,
            sink,
            tls: Arc::new(TlsCache::new(tls::CACHE_TTL, tls::CACHE_CAPACITY)),
            shutdown: watch::Sender::new(false),
            sessions: AtomicUsize::new(0),
            idle: Notify::new(),
        }))
    }

    /// Stop accepting and ask every session to finish.
    pub fn begin_shutdown(&self) {
        self.shutdown.send_replace(true);
    }

    pub fn is_shutting_down(&self) -> bool {
        *self.shutdown.borrow()
    }

    /// Resolves once shutdown has been asked for (at once if it already has).
    pub async fn shutdown_requested(&self) {
        let mut receiver = self.shutdown.subscribe();
        // The sender lives as long as `self`, so this cannot fail.
        let _ = receiver.wait_for(|stopping| *stopping).await;
    }

    pub fn active_sessions(&self) -> usize {
        self.sessions.load(Ordering::Acquire)
    }

    /// Wait until no session is left.
    pub async fn sessions_finished(&self) {
        loop {
            let notified = self.idle.notified();
            if self.active_sessions() == 0 {
                return;
            }
            notified.await;
        }
    }
}

/// One listener: its configuration as given, and its live connection count.
pub struct ListenerShared {
    /// The `listen` address as configured, passed to policy hooks.
    pub name: Arc<str>,
    pub config: ListenerConfig,
    pub server: Arc<ServerState>,
    connections: AtomicUsize,
}

/// Counts a connection on its listener and the server while alive.
struct ConnectionSlot(Arc<ListenerShared>);

impl ConnectionSlot {
    fn claim(listener: &Arc<ListenerShared>) -> Option<Self> {
        let previous = listener.connections.fetch_add(1, Ordering::AcqRel);
        listener.server.sessions.fetch_add(1, Ordering::AcqRel);
        let slot = ConnectionSlot(listener.clone());
        (previous < listener.config.max_connections).then_some(slot)
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::AcqRel);
        if self.0.server.sessions.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.server.idle.notify_waiters();
        }
    }
}

/// Bind `config.listen` and start accepting on the runtime.
pub fn start_listener(server: Arc<ServerState>, config: ListenerConfig) -> io::Result<SocketAddr> {
    let address: SocketAddr = config.listen.parse().map_err(|_| {
        io::Error::new(io::ErrorKind::InvalidInput, format!("listen: invalid address {:?}", config.listen))
    })?;
    let socket = bind(address, server.reuse_port)?;
    let bound = socket.local_addr()?;
    let runtime = server.driver.handle().clone();
    let listener = Arc::new(ListenerShared {
        name: Arc::from(config.listen.as_str()),
        config,
        server,
        connections: AtomicUsize::new(0),
    });
    let _entered = runtime.enter();
    let socket = TcpListener::from_std(socket)?;
    runtime.spawn(accept_loop(socket, listener));
    Ok(bound)
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

async fn accept_loop(socket: TcpListener, listener: Arc<ListenerShared>) {
    let server = listener.server.clone();
    let bridge = server.bridge.clone();
    bridge.log(LOG_INFO, || format!("listening on {}", listener.name));
    loop {
        let accepted = tokio::select! {
            accepted = socket.accept() => accepted,
            () = server.shutdown_requested() => break,
        };
        match accepted {
            Ok((stream, remote)) => admit(stream, remote, &listener),
            // Typically EMFILE or a connection reset before accept: keep serving.
            Err(error) => {
                bridge.log(LOG_ERROR, || format!("{}: accept failed: {error}", listener.name));
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
    bridge.log(LOG_INFO, || format!("stopped listening on {}", listener.name));
}

fn admit(stream: TcpStream, remote: SocketAddr, listener: &Arc<ListenerShared>) {
    let _ = stream.set_nodelay(true);
    let slot = ConnectionSlot::claim(listener);
    let listener = listener.clone();
    tokio::spawn(async move {
        let local = match stream.local_addr() {
            Ok(local) => local,
            Err(_) => return,
        };
        match slot {
            Some(_slot) => session::run(stream, remote, local, listener).await,
            None => refuse_busy(stream, &listener).await,
        }
    });
}

/// Past `max_connections`: say so and close, without running any policy.
async fn refuse_busy(mut stream: TcpStream, listener: &ListenerShared) {
    let mut params = Params::default();
    if let Some(hostname) = &listener.config.params.hostname {
        params.hostname = hostname.clone();
    }
    let mut reply = Vec::new();
    let text = format!("{} too many concurrent sessions. Try later", params.hostname);
    write_reply(&mut reply, 421, Some("4.3.2"), &text);
    let _ = stream.write_all(&reply).await;
    let _ = stream.shutdown().await;
}
