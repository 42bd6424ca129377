//! EHLO/HELO (LHLO in LMTP) and the mail transaction: MAIL, RCPT (with the
//! relaying decision), DATA, the hand-over to policy and the sink, and the
//! reply to the data (one per recipient in LMTP).

use super::chunking::Chunks;
use super::io::MIN_READ;
use super::record::write_envelope;
use super::replies::{CLIENT_SPILL_CAP, INSUFFICIENT_STORAGE, NEED_MAIL, NEED_RCPT, POLICY_FAILED, STORAGE_FAILED};
use super::{Session, Step, Stop};
use crate::body::{Body, BodyBuffer, BodyLimits, Reservation, SpillError, SpillQuota};
use crate::events::{Event, EventKind, Response};
use crate::forward::relay::{Envelope, Relay};
use crate::log::{LogEntry, LOG_INFO, LOG_WARNING};
use crate::message::{self, Grouping, Message, ReceivedHeader, ReceivedInfo, Supplemental};
use crate::meta::keys;
use crate::metrics;
use crate::params::ListenerDomain;
use crate::protocol::framing::{DataFramer, DataLimits, DataVerdict, MESSAGE_TOO_BIG};
use crate::protocol::parser::{self, MailParams, Mailbox, ReversePath};
use crate::protocol::reply::Reply;
use crate::shared_limits::Shared;
use crate::stream::Transport;
use bytes::{Buf, Bytes};
use serde_json::json;
use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// The most a body buffer is sized up front from `MAIL FROM ... SIZE=`.
const MAX_SIZE_HINT: usize = 1 << 20;

/// The slowest DATA transfer tolerated, in bytes per second (Postfix's
/// `smtpd_min_data_rate`): each byte received extends the DATA deadline by
/// this much, so trickling keeps no connection alive for long.
const MIN_DATA_RATE: f64 = 500.0;

const NON_ASCII: Reply = Reply::new(553, "5.6.7", "non-ASCII address requires SMTPUTF8");

pub(super) struct Transaction {
    pub(super) sender: Mailbox,
    pub(super) params: MailParams,
    pub(super) recipients: Vec<Mailbox>,
    /// The memory budget the sender and recipients hold (`body_memory_limit`),
    /// given back when the transaction ends: RSET, the end of the message,
    /// a new EHLO, the end of the session.
    envelope: Reservation,
    /// The message being received with BDAT, from its first chunk on.
    pub(super) chunks: Option<Chunks>,
    /// Whether `get_listener_domain` lets this peer relay mail from the
    /// sender's domain; asked at the first RCPT that needs it.
    relay_from_sender_domain: Option<bool>,
    /// The upstream transaction, when forwarding, from the first recipient it accepted.
    pub(super) relay: Option<Relay>,
}

/// What holding `mailbox` costs, counted against the memory budget: its
/// strings and parameters with an allocator's overhead for each, and twice
/// its place in a vector (which doubles as it grows). Measured against RSS
/// (`tests/test_memory.py`), 16 bytes per allocation (glibc's header and
/// rounding) came to what the recipients took, fragmentation aside; 32
/// keeps RSS growth under the budget with a margin.
fn envelope_cost(mailbox: &Mailbox) -> usize {
    const PER_ALLOCATION: usize = 32;
    let params: usize = mailbox
        .params
        .iter()
        .map(|(_, value)| size_of::<(&str, Option<String>)>() + value.map_or(0, |value| value.len() + PER_ALLOCATION))
        .sum();
    2 * size_of::<Mailbox>() + mailbox.local_part.capacity() + mailbox.domain.capacity() + 3 * PER_ALLOCATION + params
}

impl Transaction {
    /// What `MAIL FROM ... SIZE=` announced, trusted up to [`MAX_SIZE_HINT`]
    /// only: a client could announce 20 MB and send nothing.
    pub(super) fn size_hint(&self) -> usize {
        self.params.size.map_or(0, |size| usize::try_from(size).unwrap_or(usize::MAX)).min(MAX_SIZE_HINT)
    }
}

impl<S: Transport> Session<S> {
    pub(super) fn extensions(&self) -> Vec<String> {
        // Forwarding, only what every upstream takes (as far as known): the
        // smallest SIZE; BINARYMIME, which cannot be converted to DATA.
        let (upstream_size, binarymime) = match self.params.forward_to.is_empty() {
            true => (None, true),
            false => self.context.forwarder.offered_by(&self.params.forward_to),
        };
        let size = upstream_size
            .map_or(self.params.max_message_size as u64, |limit| limit.min(self.params.max_message_size as u64));
        let mut extensions = vec![
            "PIPELINING".into(),
            "ENHANCEDSTATUSCODES".into(),
            "8BITMIME".into(),
            "SMTPUTF8".into(),
            format!("SIZE {size}"),
            "DSN".into(),
            "CHUNKING".into(),
        ];
        if binarymime {
            extensions.push("BINARYMIME".into());
        }
        if self.params.allow_xclient {
            extensions.push("XCLIENT ADDR PORT DESTADDR DESTPORT HELO NAME LOGIN PROTO".into());
        }
        if !self.stream.is_tls() {
            extensions.push("STARTTLS".into());
        } else {
            if self.auth_offered() {
                extensions.push(super::auth::AUTH_EXTENSION.into());
            }
            // RFC 8689 §2: only over TLS.
            extensions.push("REQUIRETLS".into());
        }
        extensions
    }

    /// The protocol of a transaction: the connection's `reception_protocol`,
    /// with RFC 6531's `UTF8SMTP` for `ESMTP` (so `UTF8SMTPS`, `UTF8SMTPA`,
    /// `UTF8SMTPSA`), and its `UTF8LMTP` for `LMTP`, when it used SMTPUTF8.
    pub(super) fn protocol_of(&self, smtputf8: bool) -> String {
        let protocol = self.meta.get_str("reception_protocol").unwrap_or_else(|| self.protocol());
        if !smtputf8 {
            return protocol;
        }
        for (plain, utf8) in [("ESMTP", "UTF8SMTP"), ("LMTP", "UTF8LMTP")] {
            if let Some(rest) = protocol.strip_prefix(plain) {
                return format!("{utf8}{rest}");
            }
        }
        protocol
    }

    /// RFC 3848: ESMTP (LMTP on an LMTP listener), plus S under TLS and A
    /// once authenticated.
    pub(super) fn protocol(&self) -> String {
        let base = match (self.lmtp(), self.esmtp) {
            (true, _) => "LMTP",
            (false, true) => "ESMTP",
            (false, false) => "SMTP",
        };
        let mut protocol = String::from(base);
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
    pub(super) async fn hello(&mut self, domain: String, extended: bool) -> Step {
        self.transaction = None;
        self.helo = None;
        self.esmtp = extended;
        self.meta.set(keys::EHLO_DOMAIN, domain.clone());
        self.meta.set(keys::RECEPTION_PROTOCOL, self.protocol());
        let mut extensions = if extended { self.extensions() } else { Vec::new() };
        let make = |session: &Self| Event::Ehlo {
            domain: domain.clone(),
            meta: session.meta.clone(),
            extensions: extensions.clone(),
        };
        match self.consult(EventKind::Ehlo, make).await? {
            None => return Ok(()),
            Some(Response::Extensions(replaced)) if extended => extensions = replaced,
            Some(_) => {}
        }
        let mut text = format!("{} Hello {domain}", self.params.hostname);
        for extension in &extensions {
            text.push('\n');
            text.push_str(extension);
        }
        self.start_authentication_at_hello(&domain);
        self.helo = Some(domain);
        // RFC 2034: the EHLO reply lists extensions, not status codes.
        self.send(&Reply::bare(250, text));
        Ok(())
    }

    fn helo_domain(&self) -> &str {
        self.helo.as_deref().unwrap_or_default()
    }

    pub(super) async fn mail_from(&mut self, reverse_path: ReversePath, mut params: MailParams) -> Step {
        if self.helo.is_none() {
            return self.refuse(Reply::new(503, "5.5.1", "send EHLO or HELO first"));
        }
        if self.transaction.is_some() {
            return self.refuse(Reply::new(503, "5.5.1", "nested MAIL command"));
        }
        if self.transactions_started >= self.params.max_messages_per_connection {
            return Err(self.close(Reply::new(421, "4.5.3", "too many messages on this connection, reconnect")));
        }
        if params.size.is_some_and(|size| size > self.params.max_message_size as u64) {
            return self.refuse(MESSAGE_TOO_BIG);
        }
        // RFC 8689 §2: REQUIRETLS only in a session that uses TLS (and it is
        // not advertised otherwise). RFC 3207's "530 Must issue a STARTTLS
        // command first", with RFC 5248's X.7.10 "Encryption needed".
        if params.requiretls && !self.stream.is_tls() {
            return self.refuse(Reply::new(530, "5.7.10", "REQUIRETLS needs TLS, issue STARTTLS first"));
        }
        let mut sender = match reverse_path {
            ReversePath::Null => Mailbox::default(),
            ReversePath::Mailbox(mailbox) => mailbox,
        };
        sender.params = std::mem::take(&mut params.all);
        if !params.smtputf8 && !sender.is_ascii() {
            return self.refuse(NON_ASCII);
        }
        if let Some(refusal) = self.announced_size_refusal(params.size) {
            self.send(&refusal);
            return Ok(());
        }
        let mut envelope = Reservation::new(&self.context.spool);
        if !envelope.add(size_of::<Transaction>() + envelope_cost(&sender)) {
            self.send(&INSUFFICIENT_STORAGE);
            return Ok(());
        }
        if !self.message_rate_allows().await {
            metrics::count(&self.context.metrics.client_limit_refusals);
            self.send(&Reply::new(452, "4.7.0", "too many messages from your address, try again later"));
            return Ok(());
        }
        if let Some(refusal) = self.authenticate_mail_from(&sender.to_string()).await {
            self.send(&refusal);
            return Ok(());
        }
        let make = |session: &Self| Event::MailFrom { sender: sender.clone(), meta: session.meta.clone() };
        if self.consult(EventKind::MailFrom, make).await?.is_none() {
            return Ok(());
        }
        self.transactions_started += 1;
        self.transaction = Some(Box::new(Transaction {
            sender,
            params,
            recipients: Vec::new(),
            envelope,
            chunks: None,
            relay_from_sender_domain: None,
            relay: None,
        }));
        self.send(&Reply::new(250, "2.1.0", "OK"));
        Ok(())
    }

    pub(super) async fn rcpt_to(&mut self, recipient: Mailbox) -> Step {
        let Some(transaction) = &self.transaction else {
            return self.refuse(NEED_MAIL);
        };
        if transaction.recipients.len() >= self.params.max_recipients_per_message {
            self.send(&Reply::new(452, "4.5.3", "too many recipients"));
            return Ok(());
        }
        if !transaction.params.smtputf8 && !recipient.is_ascii() {
            return self.refuse(NON_ASCII);
        }
        // Held from now on (given back if the recipient is refused): a client
        // can make us hold no more envelope than the budget has room for.
        let mut reserved = Reservation::new(&self.context.spool);
        if !reserved.add(envelope_cost(&recipient)) {
            self.send(&INSUFFICIENT_STORAGE);
            return Ok(());
        }
        let Some(permitted) = self.relay_permitted(&recipient).await? else {
            return Ok(());
        };
        if !permitted {
            return self.refuse(Reply::new(550, "5.7.1", "relaying not permitted"));
        }
        let make = |session: &Self| Event::RcptTo { recipient: recipient.clone(), meta: session.meta.clone() };
        if self.consult(EventKind::RcptTo, make).await?.is_none() {
            return Ok(());
        }
        if let Some(route) = self.route() {
            let reply = match route {
                Ok(route) => Box::pin(self.forward_recipient(&route, &recipient)).await,
                Err(reply) => reply,
            };
            if let (true, Some(transaction)) = (reply.code < 300, &mut self.transaction) {
                transaction.recipients.push(recipient);
            }
            self.send(&reply);
            return Ok(());
        }
        if let Some(transaction) = &mut self.transaction {
            transaction.recipients.push(recipient);
            transaction.envelope.take(reserved);
        }
        self.send(&Reply::new(250, "2.1.5", "OK"));
        Ok(())
    }

    /// `max_message_rate_per_client`, counted per client address across its
    /// sessions (clients exempt from the per-client limits have no slot):
    /// across the cluster with Redis, else (or when it does not answer) in
    /// this process.
    async fn message_rate_allows(&self) -> bool {
        let (Some(rate), Some(slot)) = (self.params.max_message_rate_per_client, &self.client) else {
            return true;
        };
        if let Some(shared) = &self.context.shared_limits {
            // Boxed: only sessions with Redis pay for its call's state.
            match Box::pin(shared.admit_message(slot.network(), rate)).await {
                Shared::Allowed(()) => return true,
                Shared::Refused(_) => return false,
                Shared::Unavailable => {}
            }
        }
        slot.admit_message(rate, std::time::Instant::now())
    }

    /// As in KumoMTA, an authenticated client may relay like a relay host.
    fn may_relay_anywhere(&self) -> bool {
        self.authenticated.is_some() || self.params.relay_hosts.contains(self.remote.ip())
    }

    /// What `get_listener_domain` says of `domain`: `Some(None)` when no
    /// handler is registered or it returned None; `None` when a refusal was sent.
    async fn listener_domain(&mut self, domain: &str) -> Result<Option<Option<ListenerDomain>>, Stop> {
        let make = |session: &Self| Event::GetListenerDomain {
            domain: domain.to_string(),
            listener: session.context.listener.clone(),
            meta: session.meta.clone(),
        };
        Ok(self.consult(EventKind::GetListenerDomain, make).await?.map(|response| match response {
            Response::ListenerDomain(found) => Some(found),
            _ => None,
        }))
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

    pub(super) async fn data(&mut self) -> Step {
        let Some(transaction) = self.transaction.take() else {
            return self.refuse(NEED_MAIL);
        };
        // RFC 3030 §2 and §3: DATA neither after BDAT nor for BINARYMIME.
        let refusal = if transaction.chunks.is_some() {
            Some(Reply::new(503, "5.5.1", "DATA after BDAT, send RSET"))
        } else if transaction.params.body == Some(parser::BodyType::BinaryMime) {
            Some(Reply::new(503, "5.5.1", "BODY=BINARYMIME needs BDAT, not DATA"))
        } else if transaction.recipients.is_empty() {
            Some(NEED_RCPT)
        } else {
            None
        };
        if let Some(refusal) = refusal {
            self.transaction = Some(transaction);
            return self.refuse(refusal);
        }
        self.send(&Reply::bare(354, "end data with <CR><LF>.<CR><LF>"));
        self.flush().await?;
        let id = message::new_message_id();
        let (in_body, per_part) = self.trace_placement(&transaction, &id);
        let prefix = self.spill_prefix(&transaction, per_part.is_some());
        let (verdict, body) = self.read_body(&in_body, transaction.size_hint(), prefix).await?;
        match verdict.refusal() {
            None => self.accept_body(id, *transaction, body, per_part).await,
            Some(refusal) => self.refuse_message(transaction.recipients.len(), refusal),
        }
    }

    /// Accept a message whose body was received whole, unless storing the
    /// body (spilled to a file) failed.
    pub(super) async fn accept_body(
        &mut self,
        id: String,
        transaction: Transaction,
        body: BodyBuffer,
        per_part: Option<ReceivedHeader>,
    ) -> Step {
        match body.finish() {
            Ok(data) => self.accept_message(id, transaction, data, per_part).await,
            Err(error) => {
                let remote = self.remote;
                let log = || format!("message {id} from {remote}: spooling the body failed: {error}");
                let (level, reply) = match error {
                    SpillError::NoRoom => (LOG_WARNING, INSUFFICIENT_STORAGE),
                    SpillError::ClientCap => {
                        metrics::count(&self.context.metrics.client_limit_refusals);
                        (LOG_INFO, CLIENT_SPILL_CAP)
                    }
                    SpillError::Io(_) => (LOG_WARNING, STORAGE_FAILED),
                };
                self.log(level, log);
                self.answer_message_alike(transaction.recipients.len(), reply)
            }
        }
    }

    /// Refuse a message's data: once in SMTP, once per recipient in LMTP
    /// (RFC 2033 §4.2), counted as one error.
    pub(super) fn refuse_message(&mut self, recipients: usize, refusal: Reply) -> Step {
        if self.lmtp() {
            for _ in 1..recipients {
                self.send(&refusal);
            }
        }
        self.refuse(refusal)
    }

    /// Send the replies to the end of a message's data; a 421 among them
    /// closes the connection after them all.
    pub(super) fn answer_message(&mut self, replies: impl IntoIterator<Item = Reply>) -> Step {
        let mut closes = false;
        for reply in replies {
            self.send(&reply);
            closes |= reply.closes();
        }
        if closes {
            return Err(Stop::Closing);
        }
        Ok(())
    }

    /// The same answer for the whole message: once in SMTP, once per recipient in LMTP.
    pub(super) fn answer_message_alike(&mut self, recipients: usize, reply: Reply) -> Step {
        let count = if self.lmtp() { recipients } else { 1 };
        self.answer_message(std::iter::repeat_n(reply, count))
    }

    /// Where the trace header goes: with one recipient, the header (naming
    /// it) is returned to go first into the buffer the body is read into,
    /// so that prepending it costs no copy. With several, each split part
    /// gets its own, naming its recipient when it has only one, kept apart
    /// from the shared body. Its time is DATA's (or the first BDAT's), as in Postfix.
    pub(super) fn trace_placement(&self, transaction: &Transaction, id: &str) -> (String, Option<ReceivedHeader>) {
        let received = self.trace_header(transaction);
        match (received, transaction.recipients.as_slice()) {
            // `Authentication-Results:` goes below it: both go before the body.
            (Some(received), [only]) if !self.params.authentication.any() => (received.render(id, Some(only)), None),
            (received, _) => (String::new(), received),
        }
    }

    /// The deadline of the next read of a message's bytes, `received` of them
    /// in since `started`: idle for `client_timeout`, or slower than
    /// MIN_DATA_RATE overall, or `max_data_duration` after the start,
    /// whatever the rate (which alone would let a 20 MiB body trickle in for
    /// 11.6 hours).
    pub(super) fn data_deadline(&self, started: Instant, received: usize) -> Instant {
        let earned = Duration::from_secs_f64(received as f64 / MIN_DATA_RATE);
        let idle = Instant::now() + self.params.client_timeout;
        idle.min(started + self.params.client_timeout + earned).min(self.data_ends(started))
    }

    /// When a message's bytes, started at `started`, must all be in.
    pub(super) fn data_ends(&self, started: Instant) -> Instant {
        started + self.params.max_data_duration
    }

    /// The limits on a message's content, whichever verb carries it.
    pub(super) fn data_limits(&self) -> DataLimits {
        DataLimits {
            max_message_size: self.params.max_message_size,
            max_line_length: self.params.line_length_hard_limit,
            line_endings: self.params.invalid_line_endings,
        }
    }

    /// What a spilled body's file starts with: the Maildir envelope when the
    /// sink can deliver that file as it is (one recipient, no trace header
    /// of the part's own to come before the body).
    pub(super) fn spill_prefix(&self, transaction: &Transaction, received_per_part: bool) -> Vec<u8> {
        let own_head = self.params.trace_headers.supplemental_header || received_per_part;
        match transaction.recipients.as_slice() {
            [only] if !own_head => self.context.sink.envelope_for(self.context.spool.dir(), &transaction.sender, only),
            _ => Vec::new(),
        }
    }

    /// How this session's bodies may use memory and the spool: past
    /// `body_spill_threshold` to a file, while the spool's file system keeps
    /// half of `max_message_size` free (Postfix wants 1.5 times
    /// `message_size_limit` free to take a message: the message and that
    /// half), and while the client's spilled bytes stay under
    /// `max_spilled_bytes_per_client` (clients exempt from the per-client
    /// limits have no slot, and no cap).
    pub(super) fn body_limits(&self) -> BodyLimits {
        BodyLimits {
            spill_threshold: self.params.body_spill_threshold,
            spool_reserve: self.spool_reserve(),
            quota: self.spill_quota(),
        }
    }

    fn spool_reserve(&self) -> u64 {
        self.params.max_message_size as u64 / 2
    }

    fn spill_quota(&self) -> Option<SpillQuota> {
        let slot = self.client.as_ref()?;
        Some(SpillQuota { spilled: slot.spilled_bytes().clone(), cap: self.params.max_spilled_bytes_per_client as u64 })
    }

    /// Why a message announced as `size` octets (`MAIL FROM ... SIZE=`)
    /// cannot be taken now, if it would go to the spool (past
    /// `body_spill_threshold`, or past what is left of the memory budget):
    /// the spool has not the room for it, or its client has too much there
    /// already. A message that stays in memory needs neither, and a message
    /// of unknown size is judged as its body arrives.
    fn announced_size_refusal(&self, size: Option<u64>) -> Option<Reply> {
        let size = size?;
        let spool = &self.context.spool;
        if size <= self.params.body_spill_threshold as u64 && size <= spool.memory_left() as u64 {
            return None;
        }
        if !spool.has_room(size.saturating_add(self.spool_reserve())) {
            return Some(INSUFFICIENT_STORAGE);
        }
        if self.spill_quota().is_some_and(|quota| !quota.allows(size)) {
            metrics::count(&self.context.metrics.client_limit_refusals);
            return Some(CLIENT_SPILL_CAP);
        }
        None
    }

    /// The message after our trace header `header`: the returned body
    /// starts with it unless the message is refused.
    async fn read_body(
        &mut self,
        header: &str,
        size_hint: usize,
        prefix: Vec<u8>,
    ) -> Result<(DataVerdict, BodyBuffer), Stop> {
        let mut framer = DataFramer::new(self.data_limits());
        let expected = size_hint.max(self.input.len()).max(MIN_READ).min(self.params.max_message_size);
        let mut body = BodyBuffer::new(&self.context.spool, self.body_limits(), header.len() + expected, prefix);
        body.pending().extend_from_slice(header.as_bytes());
        let started = Instant::now();
        let mut received = 0;
        loop {
            let fed = framer.feed(&self.input, body.pending());
            // A failure is kept for `finish`: the rest of the body is still read, to stay in step.
            let _ = body.settle();
            self.input.advance(fed.consumed);
            received += fed.consumed;
            if fed.done {
                return Ok((framer.verdict(), body));
            }
            let deadline = self.data_deadline(started, received);
            let filled = self.fill_message(deadline, self.params.data_buffer_size).await;
            let ends = self.data_ends(started);
            filled.map_err(|error| self.message_cut_short(error, Some(ends)))?;
        }
    }

    /// `received`: the `Received:` header of each part, when it is not in
    /// `data`. Policy, the split, the sink (or the upstream), and the reply:
    /// in SMTP one, which refuses the whole message when any part is
    /// refused; in LMTP one per recipient, in RCPT order, each saying what
    /// became of it.
    pub(super) async fn accept_message(
        &mut self,
        id: String,
        mut transaction: Transaction,
        mut data: Body,
        received: Option<ReceivedHeader>,
    ) -> Step {
        let recipients = transaction.recipients.len();
        let authentication = self.authenticate_message(&transaction, &data).await?;
        if let Some(refusal) = authentication.as_ref().and_then(|done| done.refusal.clone()) {
            return self.answer_message_alike(recipients, refusal);
        }
        if let Some(rewritten) = authentication.as_ref().and_then(|done| done.rewritten.clone()) {
            data = Body::Memory(rewritten);
        }
        let auth_header = authentication.as_ref().map(|done| done.header.as_str());
        let relay = transaction.relay.take();
        let mail_params = std::mem::take(&mut transaction.params);
        let mut head = received.as_ref().map_or_else(String::new, |received| received.render(&id, None));
        head.push_str(auth_header.unwrap_or_default());
        let message = Message::with_head(id, transaction.sender, transaction.recipients, Bytes::from(head), data);
        // As in KumoMTA, a message starts with a copy of its connection's metadata.
        message.meta.copy_from(&self.meta);
        if let Some(done) = &authentication {
            message.meta.set(keys::AUTHENTICATION_RESULTS, crate::auth::results::to_json(&done.results));
        }
        if mail_params.smtputf8 {
            message.meta.set(keys::RECEPTION_PROTOCOL, self.protocol_of(true));
        }
        if mail_params.requiretls {
            message.meta.set(keys::REQUIRETLS, true);
        }
        let make = |session: &Self| Event::Data { message: message.clone(), meta: session.meta.clone() };
        if let Err(refusal) = self.judge(EventKind::Data, make).await? {
            return self.answer_message_alike(recipients, refusal);
        }
        let grouping = match self.grouping(&message).await? {
            Ok(grouping) => grouping,
            Err(refusal) => return self.answer_message_alike(recipients, refusal),
        };
        let trace = &self.params.trace_headers;
        let supplemental = trace
            .supplemental_header
            .then(|| Supplemental { header_name: &trace.header_name, include_meta_names: &trace.include_meta_names });
        let parts = message::split(&message, &grouping, supplemental.as_ref(), received.as_ref(), auth_header);
        let verdicts = self.judge_parts(&parts).await?;
        if let Some(relay) = relay {
            if let Some(Err(refusal)) = verdicts.iter().find(|verdict| verdict.is_err()).filter(|_| !self.lmtp()) {
                return self.answer_message([refusal.clone()]);
            }
            let refusals = grouping.part_of().iter().map(|&index| verdicts[index].clone().err()).collect();
            let envelope = Envelope { sender: &message.sender, params: &mail_params };
            return Box::pin(self.forward_message(relay, &envelope, &message, refusals)).await;
        }
        let verdicts = self.store_parts(&message.id, &parts, verdicts).await;
        if !self.lmtp() {
            let reply = verdicts.into_iter().find_map(Result::err).unwrap_or_else(|| {
                let ids: Vec<&str> = parts.iter().map(|part| part.id.as_str()).collect();
                Reply::with_text(250, "2.0.0", format!("OK ids={}", ids.join(",")))
            });
            return self.answer_message([reply]);
        }
        let replies = grouping.part_of().iter().map(|&index| match &verdicts[index] {
            Ok(()) => Reply::with_text(250, "2.0.0", format!("OK id={}", parts[index].id)),
            Err(refusal) => refusal.clone(),
        });
        let replies: Vec<Reply> = replies.collect();
        self.answer_message(replies)
    }

    /// How the message is split: as `smtp_server_split_transaction` says when
    /// it is registered and returns groups, else as `batch_handling` says.
    /// `Err`: the reply for every recipient (groups that do not place each
    /// recipient once are a policy failure).
    async fn grouping(&mut self, message: &Arc<Message>) -> Result<Result<Grouping, Reply>, Stop> {
        let make = |session: &Self| Event::SplitTransaction { message: message.clone(), meta: session.meta.clone() };
        let groups = match self.judge(EventKind::SplitTransaction, make).await? {
            Err(refusal) => return Ok(Err(refusal)),
            Ok(Response::Groups(groups)) => groups,
            Ok(_) => return Ok(Ok(Grouping::by(self.params.batch_handling, &message.recipients))),
        };
        Ok(Grouping::from_groups(&message.recipients, &groups).map_err(|why| {
            let id = message.id.clone();
            self.log(LOG_WARNING, || format!("message {id}: smtp_server_split_transaction: {why}"));
            POLICY_FAILED
        }))
    }

    /// Ask `smtp_server_message_received` about each part: one verdict per
    /// part, `Err` holding the reply its recipients get. In SMTP the first
    /// refusal refuses the whole message: it is then the only verdict.
    async fn judge_parts(&mut self, parts: &[Arc<Message>]) -> Result<Vec<Result<(), Reply>>, Stop> {
        let mut verdicts = Vec::with_capacity(parts.len());
        for part in parts {
            let make = |session: &Self| Event::MessageReceived { message: part.clone(), meta: session.meta.clone() };
            let verdict = self.judge(EventKind::MessageReceived, make).await?.map(drop);
            if verdict.is_err() && !self.lmtp() {
                return Ok(vec![verdict]);
            }
            verdicts.push(verdict);
        }
        Ok(verdicts)
    }

    /// Store the parts policy accepted, all at once; a failure turns their
    /// verdicts into [`STORAGE_FAILED`].
    async fn store_parts(
        &mut self,
        id: &str,
        parts: &[Arc<Message>],
        mut verdicts: Vec<Result<(), Reply>>,
    ) -> Vec<Result<(), Reply>> {
        let accepted: Vec<Arc<Message>> =
            parts.iter().zip(&verdicts).filter(|(_, verdict)| verdict.is_ok()).map(|(part, _)| part.clone()).collect();
        if accepted.is_empty() {
            return verdicts;
        }
        if let Err(error) = self.context.sink.deliver(accepted.clone()).await {
            self.log(LOG_WARNING, || format!("message {id} from {}: sink failed: {error}", self.remote));
            for verdict in verdicts.iter_mut().filter(|verdict| verdict.is_ok()) {
                *verdict = Err(STORAGE_FAILED);
            }
            return verdicts;
        }
        let metrics = &self.context.metrics;
        for part in &accepted {
            metrics::count(&metrics.messages);
            metrics.message_bytes.fetch_add(part.len() as u64, Ordering::Relaxed);
            self.log(LOG_INFO, || self.stored_entry(part));
        }
        verdicts
    }

    /// The log record of a stored message (one per part the transaction
    /// was split into), under the id its file name carries. Addresses are
    /// escaped as [`Address`] says.
    fn stored_entry(&self, message: &Message) -> LogEntry {
        let bytes = message.len();
        let tls = self.meta.get_str("tls_protocol_version");
        let mut text = format!("stored: {}", message.id);
        write_envelope(&mut text, &message.sender, &message.recipients);
        let _ = write!(text, " size={bytes} client={} via={} ({})", self.remote, self.local, self.params.hostname);
        if let Some(version) = &tls {
            let _ = write!(text, " tls={version}");
        }
        let authentication = authentication_summary(message);
        if let Some(summary) = &authentication {
            let _ = write!(text, " auth={summary}");
        }
        self.log_entry(text, || {
            let recipients: Vec<String> = message.recipients.iter().map(ToString::to_string).collect();
            let mut record = json!({
                "event": "stored", "id": message.id, "sender": message.sender.to_string(), "recipients": recipients,
                "size": bytes, "client": self.remote.to_string(), "via": self.local.to_string(),
                "hostname": self.params.hostname, "tls_protocol_version": tls,
            });
            if let Some(summary) = authentication {
                record["authentication"] = summary.into();
            }
            record
        })
    }

    /// The `Received:` header, or none when `trace_headers` turn it off.
    fn trace_header(&self, transaction: &Transaction) -> Option<ReceivedHeader> {
        if !self.params.trace_headers.received_header {
            return None;
        }
        let protocol = self.protocol_of(transaction.params.smtputf8);
        Some(ReceivedHeader::new(&ReceivedInfo {
            helo_domain: self.helo_domain(),
            client_ip: self.remote.ip(),
            hostname: &self.params.hostname,
            protocol: &protocol,
        }))
    }
}

/// `spf:pass,dkim:pass,...` of a message's authentication results, for its
/// log line; None when none were checked.
pub(super) fn authentication_summary(message: &Message) -> Option<String> {
    let results = message.meta.get(keys::AUTHENTICATION_RESULTS)?;
    crate::auth::results::summary_of_json(&results)
}
