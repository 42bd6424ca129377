//! One transaction relayed live to an upstream, as Postfix's before-queue
//! proxy relays it: opened at the first recipient our own policy accepted,
//! MAIL and each RCPT passed on as they come (the upstream's refusal is our
//! client's reply), the message sent once our policy accepted it, and our
//! client's `250` only after the upstream's.

use super::connection::{ConnectOptions, DataError, DataOutcome, ForwardError};
use super::pool::{Forwarder, Lease, PoolSettings, UpstreamPool};
use super::upstream::Upstream;
use crate::message::Message;
use crate::protocol::client::{self, UpstreamReply};
use crate::protocol::parser::{MailParams, Mailbox};
use crate::protocol::reply::Reply;
use std::sync::Arc;
use std::time::Instant;

/// Where and how a connection's transactions are forwarded, from its parameters.
#[derive(Clone)]
pub struct Route {
    pub upstreams: Arc<[Upstream]>,
    pub options: ConnectOptions,
    pub settings: PoolSettings,
}

/// Every upstream is down or refused to open.
const NO_UPSTREAM: Reply = Reply::new(451, "4.4.1", "no upstream server available, try again later");
/// Failing over lost a recipient the client was told was accepted.
const RECIPIENT_LOST: Reply = Reply::new(451, "4.4.2", "the upstream connection was lost, try again later");

/// The envelope a relay opens with.
pub struct Envelope<'a> {
    pub sender: &'a Mailbox,
    pub params: &'a MailParams,
}

/// A transaction open on an upstream. Dropped (RSET, the client left, the
/// message done), its connection goes back to the pool after an RSET.
pub struct Relay {
    lease: Lease,
    /// The recipients the upstream accepted, in order.
    accepted: Vec<Mailbox>,
    /// A recipient accepted before a failover was refused after it: the
    /// message can only be refused (temporarily) as a whole.
    lost: bool,
}

/// How the message's delivery went.
#[derive(Debug)]
pub enum Delivery {
    /// The upstream's reply for each recipient asked for, in order.
    Answered(Vec<UpstreamReply>),
    /// Nothing was delivered: this reply for every recipient.
    Failed(Reply),
    /// The end of the data was sent and not answered: the upstream may
    /// have the message. Why.
    Ambiguous(String),
}

impl Relay {
    /// The upstream that has the transaction.
    pub fn upstream(&self) -> &Upstream {
        &self.lease.pool().upstream
    }

    pub fn pool(&self) -> &Arc<UpstreamPool> {
        self.lease.pool()
    }

    /// Open a transaction for `envelope` on the first upstream that is up,
    /// asking for `earlier` recipients again (after a failover) and for
    /// `recipient`. `Err`: the client's reply to this RCPT, nothing open.
    pub async fn open(
        forwarder: &Forwarder,
        route: &Route,
        envelope: &Envelope<'_>,
        earlier: &[Mailbox],
        recipient: &Mailbox,
    ) -> Result<(Relay, UpstreamReply), Reply> {
        for upstream in route.upstreams.iter() {
            let pool = forwarder.pool(upstream, &route.options, route.settings);
            if pool.is_down() {
                continue;
            }
            // A pooled connection may have been closed by the upstream meanwhile:
            // then the pool's idle ones go, and a new connection is tried.
            for _ in 0..2 {
                let lease = match pool.checkout(&route.options).await {
                    Ok(lease) => lease,
                    Err(_) => break,
                };
                let reused = lease.reused;
                match Self::start(lease, envelope, earlier, recipient).await {
                    Ok(opened) => return opened,
                    Err(_) if reused => {
                        pool.discard_idle();
                        continue;
                    }
                    Err(_) => {
                        pool.mark_down();
                        break;
                    }
                }
            }
        }
        Err(NO_UPSTREAM)
    }

    /// MAIL and the RCPTs on `lease`'s connection. The outer `Err` is a
    /// broken connection; the inner one our client's reply.
    async fn start(
        mut lease: Lease,
        envelope: &Envelope<'_>,
        earlier: &[Mailbox],
        recipient: &Mailbox,
    ) -> Result<Result<(Relay, UpstreamReply), Reply>, ForwardError> {
        let connection = lease.connection();
        let mail = match client::mail_from(envelope.sender, envelope.params, &connection.offered) {
            Ok(mail) => mail,
            Err(missing) => return Ok(Err(missing.reply())),
        };
        let offered = connection.offered.clone();
        let mut commands = vec![mail];
        commands.extend(earlier.iter().chain([recipient]).map(|rcpt| client::rcpt_to(rcpt, &offered)));
        let replies = if offered.pipelining {
            connection.pipeline(&commands).await?
        } else {
            let mut replies = Vec::with_capacity(commands.len());
            for command in &commands {
                let reply = connection.command(command).await?;
                let refused_mail = replies.is_empty() && !reply.is_positive();
                replies.push(reply);
                if refused_mail {
                    break;
                }
            }
            replies
        };
        let mut replies = replies.into_iter();
        let mail_reply = replies.next().expect("MAIL was sent");
        if !mail_reply.is_positive() {
            count_refusal(lease.pool());
            return Ok(Err(mail_reply.to_reply()));
        }
        let mut relay = Relay { lease, accepted: Vec::with_capacity(earlier.len() + 1), lost: false };
        for (earlier, reply) in earlier.iter().zip(replies.by_ref()) {
            if reply.is_positive() {
                relay.accepted.push(earlier.clone());
            } else {
                relay.lost = true;
            }
        }
        let reply = replies.next().ok_or_else(|| ForwardError::Broken("a reply is missing".into()))?;
        relay.note(recipient, &reply);
        Ok(Ok((relay, reply)))
    }

    fn note(&mut self, recipient: &Mailbox, reply: &UpstreamReply) {
        if reply.is_positive() {
            self.accepted.push(recipient.clone());
        } else {
            count_refusal(self.pool());
        }
    }

    /// Ask the upstream for one more recipient; if the connection broke,
    /// fail over to the next upstream with the whole transaction.
    /// `Err`: the relay is gone, and this is our client's reply.
    pub async fn add_recipient(
        mut self,
        forwarder: &Forwarder,
        route: &Route,
        envelope: &Envelope<'_>,
        recipient: &Mailbox,
    ) -> (Option<Relay>, Reply) {
        let command = client::rcpt_to(recipient, &self.lease.connection().offered);
        match self.lease.connection().command(&command).await {
            Ok(reply) => {
                self.note(recipient, &reply);
                let answer = reply.to_reply();
                (Some(self), answer)
            }
            Err(_) => {
                self.pool().mark_down();
                let earlier = std::mem::take(&mut self.accepted);
                let lost = self.lost;
                self.lease.discard();
                match Relay::open(forwarder, route, envelope, &earlier, recipient).await {
                    Ok((mut relay, reply)) => {
                        relay.lost |= lost;
                        (Some(relay), reply.to_reply())
                    }
                    Err(reply) => (None, reply),
                }
            }
        }
    }

    /// Send `message` for `wanted` (the recipients our policy kept, all
    /// accepted by the upstream): if some were dropped, the upstream's
    /// transaction is made again for just those first.
    pub async fn deliver(mut self, envelope: &Envelope<'_>, message: &Message, wanted: &[Mailbox]) -> Delivery {
        if self.lost {
            return Delivery::Failed(RECIPIENT_LOST);
        }
        if !same_addresses(&self.accepted, wanted) {
            match self.narrow(envelope, wanted).await {
                Ok(Some(refusal)) => return Delivery::Failed(refusal),
                Ok(None) => {}
                Err(error) => return self.failed_before_end(&error),
            }
        }
        let started = Instant::now();
        let outcome = self.lease.connection().send_message(message, wanted.len()).await;
        let metrics = self.pool().metrics.clone();
        metrics.latency().observe(started.elapsed());
        match outcome {
            Ok(DataOutcome::Refused(reply)) => {
                count_refusal(self.pool());
                Delivery::Answered(vec![reply; wanted.len()])
            }
            Ok(DataOutcome::Replies(replies)) => {
                self.lease.transaction_ended();
                let replies =
                    if replies.len() == wanted.len() { replies } else { vec![replies[0].clone(); wanted.len()] };
                if replies.iter().any(UpstreamReply::is_positive) {
                    crate::metrics::count(&metrics.messages);
                }
                for _ in replies.iter().filter(|reply| !reply.is_positive()) {
                    count_refusal(self.pool());
                }
                Delivery::Answered(replies)
            }
            Err(DataError::BeforeEnd(error)) => self.failed_before_end(&error),
            Err(DataError::AfterEnd(error)) => {
                crate::metrics::count(&metrics.possible_duplicates);
                crate::metrics::count(&metrics.failures);
                self.lease.discard();
                Delivery::Ambiguous(error.to_string())
            }
        }
    }

    fn failed_before_end(self, error: &ForwardError) -> Delivery {
        self.pool().mark_down();
        let text = format!("upstream {} failed: {error}", self.upstream());
        self.lease.discard();
        Delivery::Failed(Reply::with_text(451, "4.4.2", text))
    }

    /// RSET, then MAIL and RCPT for `wanted` only. `Ok(Some)`: the reply
    /// for all, when the upstream refused what it took before.
    async fn narrow(&mut self, envelope: &Envelope<'_>, wanted: &[Mailbox]) -> Result<Option<Reply>, ForwardError> {
        let connection = self.lease.connection();
        connection.reset().await?;
        let Ok(mail) = client::mail_from(envelope.sender, envelope.params, &connection.offered) else {
            return Ok(Some(RECIPIENT_LOST));
        };
        let offered = connection.offered.clone();
        let mut commands = vec![mail];
        commands.extend(wanted.iter().map(|rcpt| client::rcpt_to(rcpt, &offered)));
        let replies = if offered.pipelining {
            connection.pipeline(&commands).await?
        } else {
            let mut replies = Vec::with_capacity(commands.len());
            for command in &commands {
                replies.push(connection.command(command).await?);
            }
            replies
        };
        if let Some(refused) = replies.iter().find(|reply| !reply.is_positive()) {
            let reply = refused.to_reply();
            return Ok(Some(Reply::with_text(451, "4.4.2", format!("the upstream changed its mind: {}", reply.text))));
        }
        self.accepted = wanted.to_vec();
        Ok(None)
    }
}

fn count_refusal(pool: &UpstreamPool) {
    crate::metrics::count(&pool.metrics.refusals);
}

fn same_addresses(a: &[Mailbox], b: &[Mailbox]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(a, b)| a.same_address(b))
}
