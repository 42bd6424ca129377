//! One SMTP session: the RFC 5321 state machine over any byte stream.
//!
//! Bytes are framed by [`crate::protocol::framing`], commands parsed by
//! [`crate::protocol::parser`]; this module decides what each command means in the
//! current state, consults Python policy through the [`Bridge`], and writes
//! replies. Replies to pipelined commands are collected and written in one
//! go just before the session waits for more input.
//!
//! A session sees only its [`SessionContext`]; it is split by phase:
//! [`connect`](self) (parameters, PROXY header, greeting), `io` (reading,
//! writing, the two reply verbs), `transaction` (EHLO to the end of DATA),
//! `chunking` (BDAT), `starttls`, `auth` and `xclient`.

mod auth;
mod authentication;
mod chunking;
mod connect;
mod forward;
mod io;
mod record;
mod replies;
mod starttls;
mod transaction;
mod xclient;

#[cfg(any(test, feature = "testing"))]
pub mod testing;
#[cfg(test)]
mod tests;

use crate::body::BodyStore;
use crate::bridge::Bridge;
use crate::client_limits::{ClientSlot, ClientTable};
use crate::events::{Event, EventKind, Outcome, Response};
use crate::forward::pool::Forwarder;
use crate::meta::keys;
use crate::meta::MetaStore;
use crate::metrics::ListenerMetrics;
use crate::params::{ListenerConfig, Params, Protocol};
use crate::protocol::framing::LineFramer;
use crate::protocol::parser::{is_http_request, parse_command, Command, ParseError};
use crate::protocol::reply::Reply;
use crate::shared_limits::{Lease, SharedLimits};
use crate::sink::Sink;
use crate::stream::{Stream, Transport};
use crate::tls::TlsCache;
use bytes::{Buf, BytesMut};
pub use connect::UNIX_CLIENT;
use record::Ending;
use replies::{OK, POLICY_FAILED, POLICY_FAILED_AT_CONNECT};
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::sync::watch;
use tokio::time::Instant;
use transaction::Transaction;

/// After this many rejected commands the client is clearly not a mail
/// client (Postfix's `smtpd_hard_error_limit`).
const MAX_ERRORS: usize = 20;

/// Everything a session uses of the server, built once per listener.
pub struct SessionContext {
    /// The `listen` address as configured, passed to policy hooks.
    pub listener: Arc<str>,
    pub config: ListenerConfig,
    pub policy: Arc<Bridge>,
    pub sink: Sink,
    /// Where this listener's large bodies go, and its budget for the others.
    pub spool: Arc<BodyStore>,
    pub tls: Arc<TlsCache>,
    /// Per-client-address counts, shared by the listeners of a server.
    pub clients: Arc<ClientTable>,
    /// The per-client limits shared through Redis (`--redis`), if any.
    pub shared_limits: Option<Arc<SharedLimits>>,
    /// This listener's counters.
    pub metrics: Arc<ListenerMetrics>,
    /// The pools of upstream connections, shared by the listeners of a server.
    pub forwarder: Arc<Forwarder>,
    pub shutdown: Shutdown,
}

/// The server's request that sessions finish: `Some` once asked, holding
/// until when a message being received may still come in whole.
#[derive(Clone)]
pub struct Shutdown(watch::Receiver<Option<Instant>>);

impl Shutdown {
    pub fn new(receiver: watch::Receiver<Option<Instant>>) -> Self {
        Self(receiver)
    }

    pub fn is_requested(&self) -> bool {
        self.0.borrow().is_some()
    }

    /// Once shutdown is asked for, the end of the grace a message being
    /// received has to finish in.
    pub fn grace_ends(&self) -> Option<Instant> {
        *self.0.borrow()
    }

    /// Resolves once shutdown is asked for (at once if it already has, or
    /// if the server is gone).
    pub async fn requested(&self) {
        let mut receiver = self.0.clone();
        let _ = receiver.wait_for(Option::is_some).await;
    }
}

/// Until when a message being received may finish after a shutdown that
/// gives sessions `grace`: a second before its end (half of a grace under
/// two seconds), so that its session still has time to answer and close.
pub fn message_grace_ends(now: Instant, grace: std::time::Duration) -> Instant {
    let margin = grace.min(std::time::Duration::from_secs(2)) / 2;
    // A grace too long to add is a year: as good as no end.
    let year = std::time::Duration::from_secs(365 * 24 * 3600);
    now.checked_add(grace - margin).unwrap_or_else(|| now + year)
}

/// Why a session stopped reading.
enum Stop {
    /// The client closed, or the socket failed: nothing more to say.
    Gone,
    /// A reply that closes the connection has been queued.
    Closing,
}

type Step = Result<(), Stop>;

/// What policy said of a command: go on, or this refusal.
type Verdict = Result<Response, Reply>;

pub struct Session<S> {
    /// Unique: the connection metadata's `session_id`, on every log line.
    id: Box<str>,
    stream: Stream<S>,
    input: BytesMut,
    output: Vec<u8>,
    context: Arc<SessionContext>,
    params: Params,
    meta: MetaStore,
    remote: SocketAddr,
    local: SocketAddr,
    /// The domain given by the last successful EHLO or HELO.
    helo: Option<String>,
    /// The client said EHLO, so replies carry enhanced status codes.
    esmtp: bool,
    /// The `authc` identity of a successful AUTH.
    authenticated: Option<String>,
    /// This session's place in its client address's count.
    client: Option<ClientSlot>,
    /// Its place among its client's connections in Redis, when shared.
    lease: Option<Lease>,
    /// Boxed: an idle session does not carry a transaction's 700 bytes.
    transaction: Option<Box<Transaction>>,
    /// Replies waiting for `smtp_server_rewrite_response` (with their
    /// enhanced code or not, and the command they answer).
    rewrites: Vec<(Reply, bool, Option<String>)>,
    transactions_started: usize,
    errors: usize,
    lines: LineFramer,
    tally: record::Tally,
    /// Why the session ends, once known (the first cause wins).
    ending: Option<Ending>,
    /// The `authentication` checks of this connection, once one ran.
    auth: Option<Box<authentication::AuthState>>,
}

/// Serve one accepted connection to the end.
pub async fn run<S: Transport>(stream: S, remote: SocketAddr, local: SocketAddr, context: Arc<SessionContext>) {
    let mut session = Session::new(stream, remote, local, context);
    let result = match session.open().await {
        Ok(()) => session.command_loop().await,
        Err(stop) => Err(stop),
    };
    let closing = matches!(result, Err(Stop::Closing));
    if closing {
        session.finish().await;
    }
    session.log_disconnect(closing);
}

impl<S: Transport> Session<S> {
    fn new(stream: S, remote: SocketAddr, local: SocketAddr, context: Arc<SessionContext>) -> Self {
        let params = connect::static_parameters(&context.config, remote, local);
        let mut session = Self {
            id: crate::message::new_message_id().into_boxed_str(),
            stream: Stream::Plain(stream),
            input: BytesMut::with_capacity(io::MIN_READ),
            output: Vec::with_capacity(512),
            lines: LineFramer::new(params.line_length_hard_limit),
            context,
            params,
            meta: MetaStore::new(),
            remote,
            local,
            helo: None,
            esmtp: false,
            authenticated: None,
            client: None,
            lease: None,
            transaction: None,
            rewrites: Vec::new(),
            transactions_started: 0,
            errors: 0,
            tally: record::Tally::new(),
            ending: None,
            auth: None,
        };
        session.set_addresses(remote, local);
        session.meta.set(keys::HOSTNAME, session.params.hostname.clone());
        session.meta.set(keys::SESSION_ID, &*session.id);
        session
    }

    async fn command_loop(&mut self) -> Step {
        loop {
            match self.next_line(self.command_deadline()).await? {
                io::Framed::Line { len, consumed } => {
                    if is_http_request(&self.input[..len]) {
                        self.tally.begin::<()>(b"", &Err(()));
                        self.end_as(Ending::ProtocolError);
                        // Postfix's exact words, without our hostname: a web client learns nothing.
                        self.queue(&Reply::new(221, "2.7.0", "Error: I can break rules, too. Goodbye."), true);
                        return Err(Stop::Closing);
                    }
                    let parsed = parse_command(&self.input[..len]);
                    self.tally.begin(&self.input[..len], &parsed);
                    self.input.advance(consumed);
                    // Like Postfix, only what is already buffered counts: no extra read.
                    if parsed.as_ref().is_ok_and(Command::ends_pipelining_group) && !self.input.is_empty() {
                        return Err(self.lost_synchronization());
                    }
                    self.dispatch(parsed).await?;
                }
                io::Framed::TooLong { consumed } => {
                    self.tally.begin::<()>(b"", &Err(()));
                    self.input.advance(consumed);
                    self.refuse(Reply::new(500, "5.2.3", "line too long"))?;
                }
            }
        }
    }

    async fn dispatch(&mut self, parsed: Result<Command, ParseError>) -> Step {
        let command = match parsed {
            Ok(command) => command,
            Err(error) if error.ends_session() => {
                self.end_as(Ending::ProtocolError);
                return Err(self.close(error.reply()));
            }
            Err(error) => return self.refuse(error.reply()),
        };
        match command {
            Command::Ehlo(_) | Command::Helo(_) if self.lmtp() => {
                self.refuse(Reply::new(500, "5.5.1", "this is LMTP: say LHLO, not EHLO or HELO"))
            }
            Command::Lhlo(_) if !self.lmtp() => self.refuse(ParseError::unrecognized().reply()),
            Command::Ehlo(domain) | Command::Lhlo(domain) => self.hello(domain, true).await,
            Command::Helo(domain) => self.hello(domain, false).await,
            Command::MailFrom { reverse_path, params } => self.mail_from(reverse_path, params).await,
            Command::RcptTo { forward_path } => self.rcpt_to(forward_path).await,
            Command::Data => Box::pin(self.data()).await,
            Command::Bdat { size, last } => Box::pin(self.bdat(size, last)).await,
            Command::Rset => {
                self.transaction = None;
                self.send(&OK);
                Ok(())
            }
            Command::Noop => {
                self.send(&OK);
                Ok(())
            }
            Command::Quit => {
                self.end_as(Ending::Quit);
                Err(self.close(Reply::new(221, "2.0.0", "closing connection")))
            }
            Command::Vrfy(_) => {
                self.send(&Reply::new(252, "2.1.5", "cannot VRFY user, but will accept message and attempt delivery"));
                Ok(())
            }
            Command::Help => {
                self.send(&self.help());
                Ok(())
            }
            Command::StartTls => Box::pin(self.starttls()).await,
            Command::Auth { mechanism, initial_response } => Box::pin(self.auth(mechanism, initial_response)).await,
            Command::XClient(arguments) => Box::pin(self.xclient(&arguments)).await,
        }
    }

    /// The commands available now: STARTTLS before TLS, AUTH when offered,
    /// XCLIENT when this client may use it.
    fn help(&self) -> Reply {
        let hello = if self.lmtp() { "LHLO" } else { "EHLO HELO" };
        let mut text = format!("commands: {hello} MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP");
        if !self.stream.is_tls() {
            text.push_str(" STARTTLS");
        }
        if self.auth_offered() {
            text.push_str(" AUTH");
        }
        if self.params.allow_xclient {
            text.push_str(" XCLIENT");
        }
        Reply::with_text(214, "2.0.0", text)
    }

    /// The listener speaks LMTP (RFC 2033) rather than SMTP.
    fn lmtp(&self) -> bool {
        self.context.config.protocol == Protocol::Lmtp
    }

    /// Send a refusal of the client's command; too many of them end the session.
    fn refuse(&mut self, reply: Reply) -> Step {
        self.send(&reply);
        self.errors += 1;
        if self.errors >= MAX_ERRORS {
            return Err(self.close_session(Ending::ErrorLimit, Reply::new(421, "4.7.0", "too many errors")));
        }
        Ok(())
    }

    fn is_registered(&self, kind: EventKind) -> bool {
        self.context.policy.is_registered(kind)
    }

    /// Call the handler of `kind`, with the event `make` builds, if one is
    /// registered: no event is built for an unregistered handler. `Err`:
    /// the client went away meanwhile, and the call was abandoned.
    async fn ask(&mut self, kind: EventKind, make: impl FnOnce(&Self) -> Event) -> Result<Option<Outcome>, Stop> {
        if !self.is_registered(kind) {
            return Ok(None);
        }
        let event = make(self);
        let policy = self.context.policy.clone();
        let client = self.client.as_ref().map(ClientSlot::network);
        let call = policy.call(event, client, self.params.data_processing_timeout);
        // Boxed: an idle session's future stays small (one allocation next to a thread hop).
        Box::pin(self.while_client_waits(call)).await.map(Some)
    }

    /// Consult policy about a command. `Some` means go on (`Nothing` when no
    /// handler is registered); `None` means a refusal was sent.
    async fn consult(&mut self, kind: EventKind, make: impl FnOnce(&Self) -> Event) -> Result<Option<Response>, Stop> {
        match self.judge(kind, make).await? {
            Ok(response) => Ok(Some(response)),
            Err(reply) => {
                self.send(&reply);
                if reply.closes() {
                    return Err(Stop::Closing);
                }
                Ok(None)
            }
        }
    }

    /// What policy says of a command: go on (`Nothing` when no handler is
    /// registered), or the refusal to send; `Err` when the client went away.
    async fn judge(&mut self, kind: EventKind, make: impl FnOnce(&Self) -> Event) -> Result<Verdict, Stop> {
        Ok(match self.ask(kind, make).await? {
            None => Ok(Response::Nothing),
            Some(Outcome::Done(response)) => Ok(response),
            Some(Outcome::Reject { code, text }) => Err(Reply::from_policy(code, &text)),
            Some(Outcome::Failed(_)) => Err(POLICY_FAILED),
        })
    }

    /// A connection-level event: any refusal or failure ends the connection.
    async fn consult_at_connect(
        &mut self,
        kind: EventKind,
        make: impl FnOnce(&Self) -> Event,
    ) -> Result<Response, Stop> {
        match self.ask(kind, make).await? {
            None => Ok(Response::Nothing),
            Some(Outcome::Done(response)) => Ok(response),
            Some(Outcome::Reject { code, text }) => {
                self.send(&Reply::from_policy(code, &text));
                Err(Stop::Closing)
            }
            Some(Outcome::Failed(_)) => Err(self.close(POLICY_FAILED_AT_CONNECT)),
        }
    }
}
