//! The start of a session (and its restart after XCLIENT): addresses,
//! parameters, the PROXY header, `connection_accepted`, the greeting.

use super::record::Ending;
use super::replies::SHUTTING_DOWN;
use super::{Session, Step, Stop};
use crate::client_limits::{ClientLimits, Refusal};
use crate::events::{Event, EventKind, Response};
use crate::log::{LOG_INFO, LOG_WARNING};
use crate::meta::keys;
use crate::metrics;
use crate::params::{ListenerConfig, Params};
use crate::protocol::proxy::{decode_proxy_header, ProxyDecode, ProxyHeader};
use crate::protocol::reply::Reply;
use crate::shared_limits::{Shared, SharedRefusal};
use crate::stream::Transport;
use bytes::Buf;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// The addresses a Unix socket client and our end of it have, as Postfix's
/// smtpd gives such a client (`localhost[127.0.0.1]`, port 0): peer and via
/// blocks, `relay_hosts` and the `Received:` header see a local client.
pub const UNIX_CLIENT: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 0);

/// Load shedding: new sessions are refused, the ones in progress carry on.
const BUSY: Reply = Reply::new(421, "4.3.2", "service busy, try again later");

/// `redis_fail_closed`, and Redis does not answer.
const REDIS_UNAVAILABLE: Reply = Reply::new(421, "4.3.0", "temporarily unable to check limits, try again later");

fn canonical(address: SocketAddr) -> SocketAddr {
    SocketAddr::new(crate::cidr::canonical_ip(address.ip()), address.port())
}

/// Defaults, then the listener's parameters for these addresses.
pub(super) fn static_parameters(config: &ListenerConfig, remote: SocketAddr, local: SocketAddr) -> Params {
    let mut params = Params::default();
    params.apply(&config.params, remote.ip(), local.ip());
    params
}

impl<S: Transport> Session<S> {
    /// Evaluate the parameters (after a PROXY header where required), run
    /// `connection_accepted`, greet.
    pub(super) async fn open(&mut self) -> Step {
        if self.context.shutdown.is_requested() {
            return Err(self.close_session(Ending::Shutdown, SHUTTING_DOWN));
        }
        // Load shedding: new clients would only queue up behind the calls waiting.
        if self.context.policy.is_busy() {
            metrics::count(&self.context.metrics.shed_connections);
            let remote = self.remote;
            self.log(LOG_WARNING, || format!("{remote}: refused, too many policy calls waiting"));
            return Err(self.close(BUSY));
        }
        // Only the memory budget sheds connections: with it used up, a new
        // session could hold neither an envelope nor the first bytes of a
        // body (each MAIL would get 452), so it is told at once to come back,
        // and holds no slot meanwhile. A full spool sheds nothing here: it
        // refuses only the messages that need it (at MAIL with SIZE=, or when
        // a body outgrows memory), and small ones still get through.
        if self.context.spool.memory_exhausted() {
            metrics::count(&self.context.metrics.shed_connections);
            let remote = self.remote;
            self.log(LOG_WARNING, || format!("{remote}: refused, body_memory_limit reached"));
            return Err(self.close(BUSY));
        }
        // Decided by the static parameters only: the dynamic hook is asked
        // once, about the real client.
        let proxied = self.params.require_proxy_protocol;
        if proxied {
            // The proxy's own address is neither limited nor asked about.
            self.read_proxy_header().await?;
            self.apply_parameters().await?;
        } else {
            self.admit_client().await?;
            self.apply_dynamic_parameters().await?;
        }
        if self.context.config.implicit_tls {
            // The client speaks TLS first: it could not read a plaintext error.
            let identity = self.server_identity().await.map_err(|reason| {
                self.end_as(Ending::TlsFailed);
                self.tls_unavailable(&reason)
            })?;
            self.handshake(identity).await?;
        }
        self.connection_accepted().await?;
        self.greet_if_client_waited()
    }

    /// The greeting, unless the client has talked before it (behind a proxy
    /// too: the input holds only what came after the PROXY header, what
    /// the client itself sent).
    pub(super) fn greet_if_client_waited(&mut self) -> Step {
        self.receive_pending()?;
        if !self.input.is_empty() {
            return Err(self.lost_synchronization());
        }
        self.greet();
        Ok(())
    }

    pub(super) async fn connection_accepted(&mut self) -> Step {
        let make = |session: &Self| Event::ConnectionAccepted { meta: session.meta.clone() };
        self.consult_at_connect(EventKind::ConnectionAccepted, make).await.map(drop)
    }

    pub(super) fn greet(&mut self) {
        // As Postfix's `$myhostname ESMTP $mail_name`: RFC 5321 §4.2 leaves the
        // text free, and scanners (testssl.sh) look for the word ESMTP. LMTP
        // says LMTP, as in RFC 2033's examples.
        let protocol = if self.lmtp() { "LMTP" } else { "ESMTP" };
        let greeting = format!("{} {protocol} {}", self.params.hostname, self.params.banner);
        self.send(&Reply::bare(220, greeting));
    }

    pub(super) fn set_addresses(&mut self, remote: SocketAddr, local: SocketAddr) {
        self.remote = canonical(remote);
        self.local = canonical(local);
        self.meta.set(keys::RECEIVED_FROM, self.remote.to_string());
        self.meta.set(keys::RECEIVED_VIA, self.local.to_string());
    }

    /// The static parameters for the current addresses, the per-client
    /// limits they set, then the dynamic hook's result over them, then their
    /// `meta` into the connection metadata.
    pub(super) async fn apply_parameters(&mut self) -> Step {
        self.adopt(static_parameters(&self.context.config, self.remote, self.local));
        self.admit_client().await?;
        self.apply_dynamic_parameters().await
    }

    /// Count this session against its client address's limits (Postfix's
    /// anvil), from the static parameters; `relay_hosts` are exempt, as
    /// Postfix exempts `$mynetworks`. A session that changes its client
    /// (XCLIENT) gives up the previous address's slot first. With Redis
    /// (`--redis`), the concurrent count and the connection rate are the
    /// cluster's; when Redis does not answer, this process's (or a 421 with
    /// `redis_fail_closed`).
    async fn admit_client(&mut self) -> Step {
        self.lease = None;
        self.client = None;
        let ip = self.remote.ip();
        if self.params.relay_hosts.contains(ip) || self.on_unix_socket() {
            return Ok(());
        }
        let limits = ClientLimits {
            max_connections: self.params.max_connections_per_client,
            connection_rate: self.params.max_connection_rate_per_client,
            auth_failures: self.params.max_auth_failures_per_client,
            ipv6_prefix_length: self.params.client_ipv6_prefix_length,
        };
        let Some(shared) = self.context.shared_limits.clone() else {
            return match self.context.clients.admit(ip, limits, Instant::now()) {
                Ok(slot) => {
                    self.client = Some(slot);
                    Ok(())
                }
                Err(refusal) => Err(self.refuse_client(refusal)),
            };
        };
        // This process's sessions are among the cluster's: its own count
        // is a floor of the shared one. The rate is counted here only when
        // Redis does not answer.
        let local = ClientLimits { connection_rate: None, ..limits };
        let slot = self.context.clients.admit(ip, local, Instant::now()).map_err(|r| self.refuse_client(r))?;
        // Twice client_timeout: a host that dies frees its clients' slots
        // within that (renewed every client_timeout while the session lives).
        let lease_ttl = self.params.client_timeout.saturating_mul(2).max(Duration::from_secs(1));
        let network = slot.network();
        // Boxed: only sessions with Redis pay for its call's state.
        let admission = shared.admit_connection(network, limits.max_connections, limits.connection_rate, lease_ttl);
        match Box::pin(admission).await {
            Shared::Allowed(lease) => self.lease = Some(lease),
            Shared::Refused(SharedRefusal::TooManyConnections) => {
                return Err(self.refuse_client(Refusal::TooManyConnections))
            }
            Shared::Refused(SharedRefusal::Rate) => return Err(self.refuse_client(Refusal::ConnectionRate)),
            Shared::Unavailable if shared.fail_closed() => {
                let remote = self.remote;
                self.log(LOG_WARNING, || format!("{remote}: refused, Redis unavailable (redis_fail_closed)"));
                return Err(self.close(REDIS_UNAVAILABLE));
            }
            Shared::Unavailable => {
                let rate_allows = limits.connection_rate.is_none_or(|rate| slot.admit_connection(rate, Instant::now()));
                if !rate_allows {
                    return Err(self.refuse_client(Refusal::ConnectionRate));
                }
            }
        }
        self.client = Some(slot);
        Ok(())
    }

    /// Close with the `421 4.7.0` of a per-client limit.
    fn refuse_client(&mut self, refusal: Refusal) -> Stop {
        let refusal = match refusal {
            Refusal::TooManyConnections => "too many connections from your address",
            Refusal::ConnectionRate => "too many connections from your address in a short time, try again later",
        };
        metrics::count(&self.context.metrics.client_limit_refusals);
        let remote = self.remote;
        self.log(LOG_INFO, || format!("{remote}: refused, {refusal}"));
        self.close(Reply::new(421, "4.7.0", refusal))
    }

    /// A client of a Unix socket listener, with no address given by a PROXY
    /// header or XCLIENT: it has [`UNIX_CLIENT`]'s stand-in address, which
    /// is no client's own to count.
    fn on_unix_socket(&self) -> bool {
        self.context.config.unix_path().is_some() && self.meta.get(keys::ORIG_RECEIVED_FROM).is_none()
    }

    async fn apply_dynamic_parameters(&mut self) -> Step {
        let make = |session: &Self| Event::GetDynamicParameters {
            listener: session.context.listener.clone(),
            meta: session.meta.clone(),
        };
        if let Response::Params(overrides) = self.consult_at_connect(EventKind::GetDynamicParameters, make).await? {
            let mut params = self.params.clone();
            params.apply(&overrides, self.remote.ip(), self.local.ip());
            self.adopt(params);
        }
        self.meta.merge(&self.params.meta);
        Ok(())
    }

    fn adopt(&mut self, params: Params) {
        self.lines.set_limit(params.line_length_hard_limit);
        self.meta.set(keys::HOSTNAME, params.hostname.clone());
        self.params = params;
    }

    /// The PROXY protocol header (v1 or v2) a trusted proxy sends first.
    /// Anything else, or nothing in time, closes the connection without a
    /// banner: the peer is not the proxy we expect.
    async fn read_proxy_header(&mut self) -> Step {
        let deadline = self.command_deadline();
        loop {
            match decode_proxy_header(&self.input) {
                ProxyDecode::Header { header, consumed } => {
                    self.input.advance(consumed);
                    if let ProxyHeader::Proxied { source, destination } = header {
                        self.keep_original_addresses();
                        self.set_addresses(source, destination);
                    }
                    return Ok(());
                }
                ProxyDecode::Incomplete => {
                    // No banner yet, so no reply: the proxy is not a client.
                    let filled = self.fill(deadline, super::io::MIN_READ).await;
                    filled.map_err(|error| {
                        self.end_as(error.ending());
                        Stop::Gone
                    })?;
                }
                ProxyDecode::Invalid(reason) => {
                    self.end_as(Ending::ProxyError);
                    let remote = self.remote;
                    let message = || format!("{remote}: closed, bad PROXY protocol header: {reason}");
                    self.log(LOG_INFO, message);
                    return Err(Stop::Gone);
                }
            }
        }
    }

    /// The socket's own addresses, kept once as `orig_received_from`/`_via`
    /// before a PROXY header or XCLIENT replaces them.
    pub(super) fn keep_original_addresses(&mut self) {
        if self.meta.get(keys::ORIG_RECEIVED_FROM).is_none() {
            self.meta.set(keys::ORIG_RECEIVED_FROM, self.remote.to_string());
            self.meta.set(keys::ORIG_RECEIVED_VIA, self.local.to_string());
        }
    }

    /// RFC 2920 §3.1 and Postfix's `smtpd_forbid_unauth_pipelining`: a client
    /// that talks before the greeting or before a reply it must wait for is
    /// not an SMTP client we can trust to frame its messages.
    pub(super) fn lost_synchronization(&mut self) -> Stop {
        self.end_as(Ending::ProtocolError);
        self.close(Reply::new(554, "5.5.0", "Error: SMTP protocol synchronization"))
    }
}
