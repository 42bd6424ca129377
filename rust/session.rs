//! One SMTP session: the RFC 5321 state machine over a TCP stream.
//!
//! Bytes are framed by [`crate::framing`], commands parsed by
//! [`crate::parser`]; this module decides what each command means in the
//! current state, consults Python policy through the [`Bridge`], and writes
//! replies. Replies to pipelined commands are collected and written in one
//! go just before the session waits for more input.

use crate::events::{Event, EventKind, Outcome, Response};
use crate::framing::{DataFramer, DataLimits, DataVerdict, LineEvent, LineFramer};
use crate::log::{LOG_ERROR, LOG_INFO, LOG_WARNING};
use crate::message::{self, Message, ReceivedInfo, Supplemental};
use crate::meta::MetaStore;
use crate::params::Params;
use crate::parser::{is_http_request, parse_command, Command, MailParams, Mailbox, ReversePath};
use crate::proxy::{decode_proxy_header, ProxyDecode, ProxyHeader};
use crate::reply::{generic_enhanced, split_enhanced, write_reply};
use crate::sasl::decode_plain;
use crate::server::ListenerShared;
use crate::stream::Stream;
use crate::tls::{ServerIdentity, TlsIdentity};
use crate::xclient::{parse_xclient, XClientError};
use bytes::{Buf, Bytes, BytesMut};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{timeout, timeout_at, Instant};
use tokio_rustls::TlsAcceptor;

/// The smallest read; also the growth step of the input buffer between
/// messages (`data_buffer_size` is the step inside DATA).
const MIN_READ: usize = 4096;

/// The most a body buffer is sized up front from `MAIL FROM ... SIZE=`.
const MAX_SIZE_HINT: usize = 1 << 20;

/// After this many rejected commands the client is clearly not a mail
/// client (Postfix's `smtpd_hard_error_limit`).
const MAX_ERRORS: usize = 20;

/// The slowest DATA transfer tolerated, in bytes per second (Postfix's
/// `smtpd_min_data_rate`): each byte received extends the DATA deadline by
/// this much, so trickling keeps no connection alive for long.
const MIN_DATA_RATE: f64 = 500.0;

/// Why a session stopped reading.
enum Stop {
    /// The client closed, or the socket failed: nothing more to say.
    Gone,
    /// A reply that closes the connection has been queued.
    Closing,
}

type Step = Result<(), Stop>;

/// A buffered line, or the end of one too long to keep.
enum Framed {
    Line { len: usize, consumed: usize },
    TooLong { consumed: usize },
}

struct Transaction {
    sender: Mailbox,
    params: MailParams,
    recipients: Vec<Mailbox>,
    /// Whether `get_listener_domain` lets this peer relay mail from the
    /// sender's domain; asked at the first RCPT that needs it.
    relay_from_sender_domain: Option<bool>,
}

pub struct Session {
    stream: Stream,
    input: BytesMut,
    output: Vec<u8>,
    listener: Arc<ListenerShared>,
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
    transaction: Option<Transaction>,
    transactions_started: usize,
    errors: usize,
    lines: LineFramer,
}

/// Serve one accepted connection to the end.
pub async fn run(stream: TcpStream, remote: SocketAddr, local: SocketAddr, listener: Arc<ListenerShared>) {
    let params = Params::default();
    let mut session = Session {
        stream: Stream::Plain(stream),
        input: BytesMut::with_capacity(4096),
        output: Vec::with_capacity(512),
        lines: LineFramer::new(params.line_length_hard_limit),
        listener,
        params,
        meta: MetaStore::new(),
        remote: canonical(remote),
        local: canonical(local),
        helo: None,
        esmtp: false,
        authenticated: None,
        transaction: None,
        transactions_started: 0,
        errors: 0,
    };
    let result = match session.open().await {
        Ok(()) => session.command_loop().await,
        Err(stop) => Err(stop),
    };
    if matches!(result, Err(Stop::Closing)) {
        let _ = session.flush().await;
        let _ = session.stream.shutdown().await;
    }
}

fn canonical(address: SocketAddr) -> SocketAddr {
    SocketAddr::new(crate::cidr::canonical_ip(address.ip()), address.port())
}

impl Session {
    /// Evaluate the parameters (after a PROXY header where required), run
    /// `connection_accepted`, greet.
    async fn open(&mut self) -> Step {
        if self.listener.server.is_shutting_down() {
            return self.close_with(421, "4.3.2", "shutting down");
        }
        self.set_addresses(self.remote, self.local);
        self.apply_static_parameters();
        // Decided by the static parameters only: the dynamic hook is asked
        // once, about the real client.
        let proxied = self.params.require_proxy_protocol;
        if proxied {
            self.read_proxy_header().await?;
            self.apply_static_parameters();
        }
        self.apply_dynamic_parameters().await?;
        if self.listener.config.implicit_tls {
            // The client speaks TLS first: it could not read a plaintext error.
            let identity = self.server_identity().await.map_err(|reason| self.tls_unavailable(&reason))?;
            self.handshake(identity).await?;
        }
        self.consult_at_connect(EventKind::ConnectionAccepted).await?;
        // Behind a proxy, what came with the header is the client's own.
        if !proxied && self.receive_pending()? {
            return self.lost_synchronization();
        }
        self.greet();
        Ok(())
    }

    fn greet(&mut self) {
        let greeting = format!("{} {}", self.params.hostname, self.params.banner);
        write_reply(&mut self.output, 220, None, &greeting);
    }

    fn set_addresses(&mut self, remote: SocketAddr, local: SocketAddr) {
        self.remote = canonical(remote);
        self.local = canonical(local);
        self.meta.set("received_from", self.remote.to_string());
        self.meta.set("received_via", self.local.to_string());
    }

    /// Defaults, then the listener's parameters for these addresses.
    fn apply_static_parameters(&mut self) {
        let mut params = Params::default();
        params.apply(&self.listener.config.params, self.remote.ip(), self.local.ip());
        self.adopt(params);
    }

    /// The dynamic hook's result over the static parameters, then their
    /// `meta` into the connection metadata.
    async fn apply_dynamic_parameters(&mut self) -> Step {
        if let Some(Response::Params(overrides)) = self.consult_at_connect(EventKind::GetDynamicParameters).await? {
            let mut params = self.params.clone();
            params.apply(&overrides, self.remote.ip(), self.local.ip());
            self.adopt(params);
        }
        self.meta.merge(&self.params.meta);
        Ok(())
    }

    fn adopt(&mut self, params: Params) {
        self.lines.set_limit(params.line_length_hard_limit);
        self.meta.set("hostname", params.hostname.clone());
        self.params = params;
    }

    /// The PROXY protocol header (v1 or v2) a trusted proxy sends first.
    /// Anything else closes the connection without a banner: the peer is not
    /// the proxy we expect.
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
                ProxyDecode::Incomplete => self.fill(deadline).await.map_err(|_| Stop::Gone)?,
                ProxyDecode::Invalid(reason) => {
                    let remote = self.remote;
                    let message = || format!("{remote}: closed, bad PROXY protocol header: {reason}");
                    self.listener.server.bridge.log(LOG_INFO, message);
                    return Err(Stop::Gone);
                }
            }
        }
    }

    /// The socket's own addresses, kept once as `orig_received_from`/`_via`
    /// before a PROXY header or XCLIENT replaces them.
    fn keep_original_addresses(&mut self) {
        if self.meta.get("orig_received_from").is_none() {
            self.meta.set("orig_received_from", self.remote.to_string());
            self.meta.set("orig_received_via", self.local.to_string());
        }
    }

    /// Move what the client has already sent into the input buffer without
    /// waiting. True if anything came. Only possible on a plain stream.
    fn receive_pending(&mut self) -> Result<bool, Stop> {
        let Stream::Plain(tcp) = &self.stream else {
            return Ok(false);
        };
        let before = self.input.len();
        loop {
            self.input.reserve(4096);
            match tcp.try_read_buf(&mut self.input) {
                Ok(0) => return Err(Stop::Gone),
                Ok(_) if self.input.len() - before < 64 * 1024 => continue,
                Ok(_) => return Ok(true),
                Err(_) => return Ok(self.input.len() > before),
            }
        }
    }

    /// RFC 2920 §3.1 and Postfix's `smtpd_forbid_unauth_pipelining`: a client
    /// that talks before the greeting or before a reply it must wait for is
    /// not an SMTP client we can trust to frame its messages.
    fn lost_synchronization(&mut self) -> Step {
        self.close_with(554, "5.5.0", "Error: SMTP protocol synchronization")
    }

    /// A connection-level event: any refusal or failure ends the connection.
    async fn consult_at_connect(&mut self, kind: EventKind) -> Result<Option<Response>, Stop> {
        if !self.listener.server.bridge.is_registered(kind) {
            return Ok(None);
        }
        let event = match kind {
            EventKind::GetDynamicParameters => {
                Event::GetDynamicParameters { listener: self.listener.name.clone(), meta: self.meta.clone() }
            }
            _ => Event::ConnectionAccepted { meta: self.meta.clone() },
        };
        match self.call(event).await {
            Outcome::Done(response) => Ok(Some(response)),
            Outcome::Reject { code, text } => {
                self.policy_reply(code, &text);
                Err(Stop::Closing)
            }
            Outcome::Failed(_) => self.close_with(421, "4.3.0", "temporary failure, try again later").map(|()| None),
        }
    }

    async fn call(&self, event: Event) -> Outcome {
        let bridge = &self.listener.server.bridge;
        bridge.call(event, self.params.data_processing_timeout).await
    }

    /// Consult policy about a command. `Some` means go on; `None` means a
    /// refusal was queued as the reply.
    async fn consult(&mut self, event: Event) -> Result<Option<Response>, Stop> {
        match self.call(event).await {
            Outcome::Done(response) => Ok(Some(response)),
            Outcome::Reject { code, text } => {
                self.policy_reply(code, &text);
                if code == 421 {
                    return Err(Stop::Closing);
                }
                Ok(None)
            }
            Outcome::Failed(_) => {
                self.reply(451, "4.3.0", "temporary policy failure, try again later");
                Ok(None)
            }
        }
    }

    fn policy_reply(&mut self, code: u16, text: &str) {
        let (enhanced, text) = split_enhanced(code, text);
        let enhanced = enhanced.unwrap_or_else(|| generic_enhanced(code));
        let enhanced = self.wants_enhanced().then_some(enhanced);
        write_reply(&mut self.output, code, enhanced, text);
    }

    fn wants_enhanced(&self) -> bool {
        self.esmtp
    }

    fn reply(&mut self, code: u16, enhanced: &str, text: &str) {
        let enhanced = self.wants_enhanced().then_some(enhanced);
        write_reply(&mut self.output, code, enhanced, text);
    }

    /// Queue a reply that always carries its enhanced code and closes.
    fn close_with(&mut self, code: u16, enhanced: &str, text: &str) -> Step {
        let text = format!("{} {text}", self.params.hostname);
        write_reply(&mut self.output, code, Some(enhanced), &text);
        Err(Stop::Closing)
    }

    fn reject_command(&mut self, code: u16, enhanced: &str, text: &str) -> Step {
        self.reply(code, enhanced, text);
        self.errors += 1;
        if self.errors >= MAX_ERRORS {
            return self.close_with(421, "4.7.0", "too many errors");
        }
        Ok(())
    }

    async fn command_loop(&mut self) -> Step {
        loop {
            match self.next_line(self.command_deadline()).await? {
                Framed::Line { len, consumed } => {
                    if is_http_request(&self.input[..len]) {
                        // Postfix's words, without our hostname: a web client learns nothing.
                        write_reply(&mut self.output, 221, Some("2.7.0"), "Error: I can break rules, too. Goodbye.");
                        return Err(Stop::Closing);
                    }
                    let parsed = parse_command(&self.input[..len]);
                    self.input.advance(consumed);
                    // Like Postfix, only what is already buffered counts: no extra read.
                    if parsed.as_ref().is_ok_and(Command::ends_pipelining_group) && !self.input.is_empty() {
                        return self.lost_synchronization();
                    }
                    self.dispatch(parsed).await?;
                }
                Framed::TooLong { consumed } => {
                    self.input.advance(consumed);
                    self.reject_command(500, "5.2.3", "line too long")?;
                }
            }
        }
    }

    /// Read until a whole line (or the end of an over-long one) is buffered.
    async fn next_line(&mut self, deadline: Instant) -> Result<Framed, Stop> {
        loop {
            match self.lines.next(&self.input) {
                LineEvent::Line { len, consumed } => return Ok(Framed::Line { len, consumed }),
                LineEvent::TooLong { consumed } => return Ok(Framed::TooLong { consumed }),
                LineEvent::NeedMore { discard } => {
                    self.input.advance(discard);
                    self.flush().await?;
                    self.fill(deadline).await?;
                }
            }
        }
    }

    /// A client gets `client_timeout` to send each whole command: trickling
    /// bytes does not extend it.
    fn command_deadline(&self) -> Instant {
        Instant::now() + self.params.client_timeout
    }

    /// Read more into `input`, growing it by `step` when less than
    /// [`MIN_READ`] bytes are free (reclaiming consumed space first); stop
    /// on end of stream, deadline or shutdown.
    async fn fill_by(&mut self, deadline: Instant, step: usize) -> Step {
        let server = self.listener.server.clone();
        if self.input.capacity() - self.input.len() < MIN_READ {
            self.input.reserve(step.max(MIN_READ));
        }
        tokio::select! {
            read = timeout_at(deadline, self.stream.read_buf(&mut self.input)) => match read {
                Ok(Ok(0)) | Ok(Err(_)) => Err(Stop::Gone),
                Ok(Ok(_)) => Ok(()),
                Err(_) => self.close_with(421, "4.3.2", "idle too long, closing connection"),
            },
            () = server.shutdown_requested() => self.close_with(421, "4.3.2", "shutting down"),
        }
    }

    /// Read more command bytes: a command line is short.
    async fn fill(&mut self, deadline: Instant) -> Step {
        self.fill_by(deadline, MIN_READ).await
    }

    async fn flush(&mut self) -> Step {
        if self.output.is_empty() {
            return Ok(());
        }
        let written = timeout(self.params.client_timeout, self.stream.write_all(&self.output)).await;
        self.output.clear();
        match written {
            Ok(Ok(())) => Ok(()),
            _ => Err(Stop::Gone),
        }
    }

    async fn dispatch(&mut self, parsed: Result<Command, crate::parser::ParseError>) -> Step {
        let command = match parsed {
            Ok(command) => command,
            Err(error) => {
                let (code, enhanced, text) = error.reply();
                return self.reject_command(code, enhanced, &text);
            }
        };
        match command {
            Command::Ehlo(domain) => self.hello(domain, true).await,
            Command::Helo(domain) => self.hello(domain, false).await,
            Command::MailFrom { reverse_path, params } => self.mail_from(reverse_path, params).await,
            Command::RcptTo { forward_path } => self.rcpt_to(forward_path).await,
            Command::Data => self.data().await,
            Command::Rset => {
                self.transaction = None;
                self.reply(250, "2.0.0", "OK");
                Ok(())
            }
            Command::Noop => {
                self.reply(250, "2.0.0", "OK");
                Ok(())
            }
            Command::Quit => {
                let text = format!("{} closing connection", self.params.hostname);
                self.reply(221, "2.0.0", &text);
                Err(Stop::Closing)
            }
            Command::Vrfy(_) => {
                self.reply(252, "2.1.5", "cannot VRFY user, but will accept message and attempt delivery");
                Ok(())
            }
            Command::Help => {
                self.reply(214, "2.0.0", "commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT VRFY HELP");
                Ok(())
            }
            Command::StartTls => self.starttls().await,
            Command::Auth { mechanism, initial_response } => self.auth(mechanism, initial_response).await,
            Command::XClient(arguments) => self.xclient(&arguments).await,
        }
    }

    fn extensions(&self) -> Vec<String> {
        let mut extensions = vec![
            "PIPELINING".into(),
            "ENHANCEDSTATUSCODES".into(),
            "8BITMIME".into(),
            "SMTPUTF8".into(),
            format!("SIZE {}", self.params.max_message_size),
        ];
        if self.params.allow_xclient {
            extensions.push("XCLIENT ADDR PORT DESTADDR DESTPORT HELO NAME LOGIN PROTO".into());
        }
        if !self.stream.is_tls() {
            extensions.push("STARTTLS".into());
        } else if self.listener.server.bridge.is_registered(EventKind::AuthPlain) {
            extensions.push("AUTH PLAIN".into());
        }
        extensions
    }

    /// RFC 3848: ESMTP, plus S under TLS and A once authenticated.
    fn protocol(&self) -> String {
        let mut protocol = String::from(if self.esmtp { "ESMTP" } else { "SMTP" });
        if self.stream.is_tls() {
            protocol.push('S');
        }
        if self.authenticated.is_some() {
            protocol.push('A');
        }
        protocol
    }

    /// EHLO or HELO. As in KumoMTA, `smtp_server_ehlo` sees both (with no
    /// extensions for HELO), so a policy that refuses a domain can't be
    /// sidestepped by saying HELO.
    async fn hello(&mut self, domain: String, extended: bool) -> Step {
        self.transaction = None;
        self.helo = None;
        self.esmtp = extended;
        self.meta.set("ehlo_domain", domain.clone());
        self.meta.set("reception_protocol", self.protocol());
        let mut extensions = if extended { self.extensions() } else { Vec::new() };
        if self.listener.server.bridge.is_registered(EventKind::Ehlo) {
            let event = Event::Ehlo { domain: domain.clone(), meta: self.meta.clone(), extensions: extensions.clone() };
            match self.consult(event).await? {
                None => return Ok(()),
                Some(Response::Extensions(replaced)) if extended => extensions = replaced,
                Some(_) => {}
            }
        }
        let mut text = format!("{} Hello {domain}", self.params.hostname);
        for extension in &extensions {
            text.push('\n');
            text.push_str(extension);
        }
        self.helo = Some(domain);
        // RFC 2034: the EHLO reply lists extensions, not status codes.
        write_reply(&mut self.output, 250, None, &text);
        Ok(())
    }

    fn helo_domain(&self) -> &str {
        self.helo.as_deref().unwrap_or_default()
    }

    async fn mail_from(&mut self, reverse_path: ReversePath, params: MailParams) -> Step {
        if self.helo.is_none() {
            return self.reject_command(503, "5.5.1", "send EHLO or HELO first");
        }
        if self.transaction.is_some() {
            return self.reject_command(503, "5.5.1", "nested MAIL command");
        }
        if self.transactions_started >= self.params.max_messages_per_connection {
            let text = format!("{} too many messages on this connection, reconnect", self.params.hostname);
            self.reply(421, "4.5.3", &text);
            return Err(Stop::Closing);
        }
        if params.size.is_some_and(|size| size > self.params.max_message_size as u64) {
            return self.reject_command(552, "5.3.4", "message size exceeds fixed maximum message size");
        }
        let sender = match reverse_path {
            ReversePath::Null => Mailbox { local_part: String::new(), domain: String::new() },
            ReversePath::Mailbox(mailbox) => mailbox,
        };
        if !params.smtputf8 && !sender.is_ascii() {
            return self.reject_command(553, "5.6.7", "non-ASCII address requires SMTPUTF8");
        }
        if self.listener.server.bridge.is_registered(EventKind::MailFrom) {
            let event = Event::MailFrom { sender: sender.clone(), meta: self.meta.clone() };
            if self.consult(event).await?.is_none() {
                return Ok(());
            }
        }
        self.transactions_started += 1;
        self.transaction = Some(Transaction { sender, params, recipients: Vec::new(), relay_from_sender_domain: None });
        self.reply(250, "2.1.0", "OK");
        Ok(())
    }

    /// As in KumoMTA, an authenticated client may relay like a relay host.
    fn may_relay_anywhere(&self) -> bool {
        self.authenticated.is_some() || self.params.relay_hosts.contains(self.remote.ip())
    }

    /// `Some(None)`: no handler or it returned None. `None`: refusal queued.
    async fn listener_domain(&mut self, domain: &str) -> Result<Option<Option<crate::bridge::ListenerDomain>>, Stop> {
        if !self.listener.server.bridge.is_registered(EventKind::GetListenerDomain) {
            return Ok(Some(None));
        }
        let event = Event::GetListenerDomain {
            domain: domain.to_string(),
            listener: self.listener.name.clone(),
            meta: self.meta.clone(),
        };
        Ok(self.consult(event).await?.map(|response| match response {
            Response::ListenerDomain(found) => Some(found),
            _ => None,
        }))
    }

    async fn rcpt_to(&mut self, recipient: Mailbox) -> Step {
        let Some(transaction) = &self.transaction else {
            return self.reject_command(503, "5.5.1", "need MAIL command first");
        };
        if transaction.recipients.len() >= self.params.max_recipients_per_message {
            self.reply(452, "4.5.3", "too many recipients");
            return Ok(());
        }
        if !transaction.params.smtputf8 && !recipient.is_ascii() {
            return self.reject_command(553, "5.6.7", "non-ASCII address requires SMTPUTF8");
        }
        let Some(permitted) = self.relay_permitted(&recipient).await? else {
            return Ok(());
        };
        if !permitted {
            return self.reject_command(550, "5.7.1", "relaying not permitted");
        }
        if self.listener.server.bridge.is_registered(EventKind::RcptTo) {
            let event = Event::RcptTo { recipient: recipient.clone(), meta: self.meta.clone() };
            if self.consult(event).await?.is_none() {
                return Ok(());
            }
        }
        if let Some(transaction) = &mut self.transaction {
            transaction.recipients.push(recipient);
        }
        self.reply(250, "2.1.5", "OK");
        Ok(())
    }

    /// Relaying is allowed from `relay_hosts`, to a domain that
    /// `get_listener_domain` opens (`relay_to`, or `relay_from` holding the
    /// peer), or from a sender domain whose `relay_from` holds the peer.
    /// `None`: policy refused and the reply is queued.
    async fn relay_permitted(&mut self, recipient: &Mailbox) -> Result<Option<bool>, Stop> {
        if self.may_relay_anywhere() {
            return Ok(Some(true));
        }
        let peer = self.remote.ip();
        match self.listener_domain(&recipient.domain).await? {
            None => return Ok(None),
            Some(Some(domain)) if domain.relay_to || domain.relay_from.contains(peer) => return Ok(Some(true)),
            Some(_) => {}
        }
        self.sender_domain_relays().await
    }

    async fn sender_domain_relays(&mut self) -> Result<Option<bool>, Stop> {
        let Some(transaction) = &self.transaction else {
            return Ok(Some(false));
        };
        if let Some(known) = transaction.relay_from_sender_domain {
            return Ok(Some(known));
        }
        let domain = transaction.sender.domain.clone();
        if domain.is_empty() {
            return Ok(Some(false));
        }
        let peer = self.remote.ip();
        let Some(found) = self.listener_domain(&domain).await? else {
            return Ok(None);
        };
        let allowed = found.is_some_and(|d| d.relay_from.contains(peer));
        if let Some(transaction) = &mut self.transaction {
            transaction.relay_from_sender_domain = Some(allowed);
        }
        Ok(Some(allowed))
    }

    async fn data(&mut self) -> Step {
        let Some(transaction) = self.transaction.take() else {
            return self.reject_command(503, "5.5.1", "need MAIL command first");
        };
        if transaction.recipients.is_empty() {
            self.transaction = Some(transaction);
            return self.reject_command(503, "5.5.1", "need RCPT command first");
        }
        write_reply(&mut self.output, 354, None, "end data with <CR><LF>.<CR><LF>");
        self.flush().await?;
        // The trace header goes first into the buffer the body is read into:
        // the message is never copied to prepend it. Its time is DATA's, as in Postfix.
        let id = message::new_message_id();
        let header = self.trace_header(&id, &transaction);
        let size_hint = transaction.params.size.map_or(0, |size| usize::try_from(size).unwrap_or(usize::MAX));
        let (verdict, data) = self.read_body(&header, size_hint).await?;
        match verdict {
            DataVerdict::Accept => self.accept_message(id, transaction, data).await,
            DataVerdict::TooBig => self.reject_command(552, "5.3.4", "message size exceeds fixed maximum message size"),
            DataVerdict::LineTooLong => self.reject_command(500, "5.2.3", "message line too long"),
            DataVerdict::BareLineEnding => {
                self.reject_command(550, "5.6.0", "message contains a bare CR or LF; lines must end in CRLF")
            }
        }
    }

    /// The message after our trace header `header`: the returned bytes
    /// start with it unless the message is refused.
    async fn read_body(&mut self, header: &str, size_hint: usize) -> Result<(DataVerdict, Vec<u8>), Stop> {
        let limits = DataLimits {
            max_message_size: self.params.max_message_size,
            max_line_length: self.params.line_length_hard_limit,
            line_endings: self.params.invalid_line_endings,
        };
        let mut framer = DataFramer::new(limits);
        // Trust SIZE= only so far: a client could announce 20 MB and send nothing.
        let expected =
            size_hint.min(MAX_SIZE_HINT).max(self.input.len()).max(MIN_READ).min(self.params.max_message_size);
        let mut body = Vec::with_capacity(header.len() + expected);
        body.extend_from_slice(header.as_bytes());
        let started = Instant::now();
        let mut received = 0;
        loop {
            let fed = framer.feed(&self.input, &mut body);
            self.input.advance(fed.consumed);
            received += fed.consumed;
            if fed.done {
                return Ok((framer.verdict(), body));
            }
            // Idle for `client_timeout`, or slower than MIN_DATA_RATE overall.
            let earned = Duration::from_secs_f64(received as f64 / MIN_DATA_RATE);
            let deadline =
                (Instant::now() + self.params.client_timeout).min(started + self.params.client_timeout + earned);
            self.fill_by(deadline, self.params.data_buffer_size).await?;
        }
    }

    async fn accept_message(&mut self, id: String, transaction: Transaction, data: Vec<u8>) -> Step {
        let message = Message::new(id, transaction.sender, transaction.recipients, Bytes::from(data));
        // As in KumoMTA, a message starts with a copy of its connection's metadata.
        message.meta.merge(&self.meta.snapshot());
        let bridge = self.listener.server.bridge.clone();
        if bridge.is_registered(EventKind::Data) {
            let event = Event::Data { message: message.clone(), meta: self.meta.clone() };
            if self.consult(event).await?.is_none() {
                return Ok(());
            }
        }
        let trace = &self.params.trace_headers;
        let supplemental = trace
            .supplemental_header
            .then(|| Supplemental { header_name: &trace.header_name, include_meta_names: &trace.include_meta_names });
        let parts = message::split(&message, self.params.batch_handling, supplemental.as_ref());
        if bridge.is_registered(EventKind::MessageReceived) {
            for part in &parts {
                let event = Event::MessageReceived { message: part.clone(), meta: self.meta.clone() };
                if self.consult(event).await?.is_none() {
                    return Ok(());
                }
            }
        }
        if let Err(error) = self.listener.server.sink.deliver(parts).await {
            bridge.log(LOG_WARNING, || format!("message {} from {}: sink failed: {error}", message.id, self.remote));
            self.reply(451, "4.3.0", "temporary failure storing the message, try again later");
            return Ok(());
        }
        bridge.log(LOG_INFO, || format!("message {} from {} accepted", message.id, self.remote));
        let text = format!("OK id={}", message.id);
        self.reply(250, "2.0.0", &text);
        Ok(())
    }

    /// The `Received:` header, or nothing when `trace_headers` turn it off.
    fn trace_header(&self, id: &str, transaction: &Transaction) -> String {
        if !self.params.trace_headers.received_header {
            return String::new();
        }
        let protocol = self.meta.get_str("reception_protocol").unwrap_or_else(|| "SMTP".into());
        message::received_header(&ReceivedInfo {
            helo_domain: self.helo_domain(),
            client_ip: self.remote.ip(),
            hostname: &self.params.hostname,
            protocol: &protocol,
            id,
            recipients: &transaction.recipients,
        })
    }

    /// RFC 3207. Whatever the client pipelined after STARTTLS was sent in
    /// plaintext and is thrown away unread (CVE-2011-0411); after the
    /// handshake the client starts over with EHLO.
    async fn starttls(&mut self) -> Step {
        if self.stream.is_tls() {
            return self.reject_command(503, "5.5.1", "TLS already active");
        }
        let identity = match self.server_identity().await {
            Ok(identity) => identity,
            Err(reason) => {
                self.tls_unavailable(&reason);
                self.reply(454, "4.7.0", "TLS not available");
                return Ok(());
            }
        };
        self.reply(220, "2.0.0", "Ready to start TLS");
        self.flush().await?;
        self.input.clear();
        self.lines = LineFramer::new(self.params.line_length_hard_limit);
        self.handshake(identity).await?;
        self.forget_client();
        Ok(())
    }

    /// This connection's TLS configuration, from its effective parameters.
    async fn server_identity(&self) -> Result<ServerIdentity, String> {
        let cache = self.listener.server.tls.clone();
        let wanted = TlsIdentity::of(&self.params);
        if let Some(identity) = cache.cached(&wanted) {
            return Ok(identity);
        }
        // Reads certificate files and may build a configuration.
        tokio::task::spawn_blocking(move || cache.identity(&wanted)).await.map_err(|e| e.to_string())?
    }

    fn tls_unavailable(&self, reason: &str) -> Stop {
        self.listener.server.bridge.log(LOG_ERROR, || format!("{}: TLS not available: {reason}", self.remote));
        Stop::Gone
    }

    /// A failed or silent handshake ends the connection: never a fall-back to plaintext.
    async fn handshake(&mut self, identity: ServerIdentity) -> Step {
        let Some(tcp) = self.stream.take_plain() else {
            return Err(Stop::Gone);
        };
        let accepted =
            timeout(self.params.client_timeout, TlsAcceptor::from(identity.config.clone()).accept(tcp)).await;
        let tls = match accepted {
            Ok(Ok(tls)) => tls,
            Ok(Err(error)) => return Err(self.handshake_failed(&error.to_string())),
            Err(_) => return Err(self.handshake_failed("timed out")),
        };
        let (_, connection) = tls.get_ref();
        if let Some(suite) = connection.negotiated_cipher_suite() {
            self.meta.set("tls_cipher", format!("{:?}", suite.suite()));
        }
        if let Some(version) = connection.protocol_version() {
            self.meta.set("tls_protocol_version", format!("{version:?}"));
        }
        if let Some(subject) = connection.peer_certificates().and_then(|chain| identity.trusted_peer_subject(chain)) {
            self.meta.set("tls_peer_subject_name", subject);
        }
        self.stream = Stream::Tls(Box::new(tls));
        Ok(())
    }

    fn handshake_failed(&self, reason: &str) -> Stop {
        self.listener.server.bridge.log(LOG_INFO, || format!("{}: TLS handshake failed: {reason}", self.remote));
        Stop::Gone
    }

    /// RFC 3207 §4.2: discard what the client said before TLS.
    fn forget_client(&mut self) {
        self.helo = None;
        self.esmtp = false;
        self.transaction = None;
        self.authenticated = None;
        for name in ["ehlo_domain", "authn_id", "authz_id"] {
            self.meta.remove(name);
        }
    }

    /// RFC 4954 AUTH, PLAIN only, and only under TLS.
    async fn auth(&mut self, mechanism: String, initial_response: Option<String>) -> Step {
        if !self.listener.server.bridge.is_registered(EventKind::AuthPlain) {
            return self.reject_command(503, "5.5.1", "authentication not enabled");
        }
        if !self.stream.is_tls() {
            return self.reject_command(538, "5.7.11", "encryption required for requested authentication mechanism");
        }
        if self.helo.is_none() || self.authenticated.is_some() || self.transaction.is_some() {
            return self.reject_command(503, "5.5.1", "AUTH only after EHLO, once, outside a mail transaction");
        }
        if mechanism != "PLAIN" {
            return self.reject_command(504, "5.5.4", "unrecognized authentication mechanism");
        }
        let response = match initial_response {
            Some(response) => response,
            None => match self.auth_continuation().await? {
                Some(response) => response,
                None => return Ok(()),
            },
        };
        let credentials = match decode_plain(&response) {
            Ok(credentials) => credentials,
            Err(error) => {
                let (code, enhanced, text) = error.reply();
                return self.reject_command(code, enhanced, text);
            }
        };
        let authc = credentials.authc.clone();
        let authz = if credentials.authz.is_empty() { authc.clone() } else { credentials.authz.clone() };
        match self.consult(Event::AuthPlain { credentials, meta: self.meta.clone() }).await? {
            None => Ok(()),
            Some(Response::Authenticated(true)) => {
                self.meta.set("authn_id", authc.clone());
                self.meta.set("authz_id", authz);
                self.authenticated = Some(authc);
                self.meta.set("reception_protocol", self.protocol());
                self.reply(235, "2.7.0", "authentication successful");
                Ok(())
            }
            Some(_) => self.reject_command(535, "5.7.8", "authentication credentials invalid"),
        }
    }

    /// Ask for the PLAIN response with an empty `334` and read it. `None`:
    /// the line was too long and the refusal is queued.
    async fn auth_continuation(&mut self) -> Result<Option<String>, Stop> {
        write_reply(&mut self.output, 334, None, "");
        match self.next_line(self.command_deadline()).await? {
            Framed::Line { len, consumed } => {
                let response = String::from_utf8_lossy(&self.input[..len]).into_owned();
                self.input.advance(consumed);
                Ok(Some(response))
            }
            Framed::TooLong { consumed } => {
                self.input.advance(consumed);
                self.reject_command(500, "5.5.6", "authentication exchange line is too long").map(|()| None)
            }
        }
    }

    /// Postfix's XCLIENT: a trusted proxy (`allow_xclient`) says who the real
    /// client is. The session starts over as if that client had connected:
    /// parameters and the dynamic hook evaluated again, a new greeting.
    /// `LOGIN` authenticates as that user; `HELO`, `NAME` and `PROTO` are
    /// accepted and not used (the client says EHLO again).
    async fn xclient(&mut self, arguments: &str) -> Step {
        if !self.params.allow_xclient {
            return self.reject_command(550, "5.7.0", "insufficient authorization");
        }
        if self.transaction.is_some() {
            return self.reject_command(503, "5.5.1", "MAIL transaction in progress");
        }
        let request = match parse_xclient(arguments) {
            Ok(request) => request,
            Err(XClientError(text)) => return self.reject_command(501, "5.5.4", &text),
        };
        let remote =
            SocketAddr::new(request.addr.unwrap_or(self.remote.ip()), request.port.unwrap_or(self.remote.port()));
        let local =
            SocketAddr::new(request.destaddr.unwrap_or(self.local.ip()), request.destport.unwrap_or(self.local.port()));
        self.keep_original_addresses();
        self.set_addresses(remote, local);
        self.forget_client();
        if let Some(login) = request.login {
            self.meta.set("authn_id", login.clone());
            self.meta.set("authz_id", login.clone());
            self.authenticated = Some(login);
        }
        self.apply_static_parameters();
        self.apply_dynamic_parameters().await?;
        self.consult_at_connect(EventKind::ConnectionAccepted).await?;
        self.greet();
        Ok(())
    }
}
