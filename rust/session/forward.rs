//! Forwarding in the session (`forward_to`): the route from the
//! connection's parameters, the upstream transaction opened at the first
//! recipient our policy accepted, the message handed on once our policy
//! accepted it, and our client's replies made from the upstream's.

use super::record::{write_envelope, Address};
use super::replies::STORAGE_FAILED;
use super::{Session, Step};
use crate::escape::LogText;
use crate::forward::connection::{ConnectOptions, Timeouts};
use crate::forward::pool::PoolSettings;
use crate::forward::relay::{Delivery, Envelope, Relay, Route};
use crate::forward::tls;
use crate::forward::upstream::ForwardTls;
use crate::log::{LogEntry, LOG_INFO, LOG_WARNING};
use crate::message::{self, Message};
use crate::meta::keys;
use crate::metrics;
use crate::protocol::client::UpstreamReply;
use crate::protocol::parser::Mailbox;
use crate::protocol::reply::Reply;
use crate::stream::Transport;
use serde_json::json;
use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// `forward_options.tls = "verify"` without a usable `tls_ca`.
const NO_CA: Reply = Reply::new(451, "4.7.5", "cannot verify the next hop: no usable forward_options.tls_ca");

impl<S: Transport> Session<S> {
    /// Where this connection's transactions go, when `forward_to` names
    /// upstreams. `Err`: the reply for the client (a CA that cannot be read).
    pub(super) fn route(&self) -> Option<Result<Route, Reply>> {
        if self.params.forward_to.is_empty() {
            return None;
        }
        let options = &self.params.forward_options;
        let verifying = match (options.tls, &options.tls_ca) {
            (ForwardTls::Verify, Some(source)) => {
                match self.context.tls.pem(source).and_then(|pem| tls::verifying(&pem)) {
                    Ok(config) => Some(config),
                    Err(error) => {
                        self.log(LOG_WARNING, || format!("forward_options.tls_ca: {error}"));
                        return Some(Err(NO_CA));
                    }
                }
            }
            (ForwardTls::Verify, None) => return Some(Err(NO_CA)),
            _ => None,
        };
        let connect = ConnectOptions {
            hello_name: self.params.hostname.clone(),
            tls: options.tls,
            verifying,
            timeouts: Timeouts {
                connect: options.connect_timeout,
                command: options.command_timeout,
                data: options.data_timeout,
            },
        };
        let settings =
            PoolSettings { size: options.pool_size, idle_timeout: options.idle_timeout, backoff: options.backoff };
        Some(Ok(Route { upstreams: self.params.forward_to.clone(), options: connect, settings }))
    }

    /// Ask the upstream for `recipient` (opening the upstream transaction
    /// at the first): its reply is our client's.
    pub(super) async fn forward_recipient(&mut self, route: &Route, recipient: &Mailbox) -> Reply {
        let forwarder = self.context.forwarder.clone();
        let Some(transaction) = &mut self.transaction else {
            return super::replies::NEED_MAIL;
        };
        let envelope = Envelope { sender: &transaction.sender, params: &transaction.params };
        let (relay, reply) = match transaction.relay.take() {
            Some(relay) => relay.add_recipient(&forwarder, route, &envelope, recipient).await,
            None => match Relay::open(&forwarder, route, &envelope, &[], recipient).await {
                Ok((relay, reply)) => (Some(relay), reply.to_reply()),
                Err(reply) => (None, reply),
            },
        };
        if let Some(relay) = &relay {
            self.meta.set(keys::FORWARDED_TO, relay.upstream().url.to_string());
        }
        transaction.relay = relay;
        reply
    }

    /// Hand `message` on for its recipients our policy kept (`refusals`:
    /// per recipient, our policy's refusal, if any), then answer: one reply
    /// per recipient in LMTP; in SMTP, `250` if the upstream took it for any
    /// recipient (the ones it then refused kept in our own sink), else its
    /// refusal.
    pub(super) async fn forward_message(
        &mut self,
        relay: Relay,
        envelope: &Envelope<'_>,
        message: &Arc<Message>,
        refusals: Vec<Option<Reply>>,
    ) -> Step {
        let wanted: Vec<Mailbox> = message
            .recipients
            .iter()
            .zip(&refusals)
            .filter(|(_, refusal)| refusal.is_none())
            .map(|(recipient, _)| recipient.clone())
            .collect();
        if wanted.is_empty() {
            return self.answer_message(refusals.into_iter().flatten());
        }
        let upstream = relay.upstream().url.clone();
        let pool = relay.pool().clone();
        let replies = match relay.deliver(envelope, message, &wanted).await {
            Delivery::Answered(replies) => replies,
            Delivery::Failed(reply) => return self.answer_forwarded_alike(message, reply),
            Delivery::Ambiguous(why) => {
                let (remote, id) = (self.remote, message.id.clone());
                self.log(LOG_WARNING, || {
                    format!(
                        "possible duplicate: message {id} from {remote}: {upstream} got the data, then {}",
                        LogText(&why)
                    )
                });
                let reply =
                    Reply::with_text(451, "4.4.2", format!("no reply from the upstream after the data ({why})"));
                return self.answer_forwarded_alike(message, reply);
            }
        };
        self.log_forwarded(message, &upstream, &wanted, &replies);
        if self.lmtp() {
            let mut replies = replies.iter();
            let answers: Vec<Reply> = refusals
                .into_iter()
                .map(|refusal| {
                    refusal.unwrap_or_else(|| replies.next().map_or(STORAGE_FAILED, UpstreamReply::to_reply))
                })
                .collect();
            return self.answer_message(answers);
        }
        let delivered = replies.iter().position(UpstreamReply::is_positive);
        let Some(first) = delivered else {
            // Nothing delivered: a permanent refusal only when every one was.
            let refusal = replies.iter().find(|reply| !reply.is_permanent()).unwrap_or(&replies[0]);
            return self.answer_message([refusal.to_reply()]);
        };
        let refused: Vec<(&Mailbox, &UpstreamReply)> =
            wanted.iter().zip(&replies).filter(|(_, reply)| !reply.is_positive()).collect();
        if !refused.is_empty() {
            self.keep_refused(message, &refused, &pool.metrics.kept_recipients).await;
        }
        let text = format!("OK id={} {}", message.id, replies[first].text());
        self.answer_message([Reply::with_text(250, "2.0.0", text)])
    }

    /// The same reply for every recipient the client gave (one in SMTP).
    fn answer_forwarded_alike(&mut self, message: &Message, reply: Reply) -> Step {
        self.answer_message_alike(message.recipients.len(), reply)
    }

    /// Recipients an LMTP upstream refused after the data, when our client
    /// (SMTP) has one reply for all and others were delivered: a `4xx` would
    /// make it send again to those delivered, a `5xx` would lose the
    /// delivered ones' success. So they get `250`, and their copies go to
    /// our own sink, with a log line, for an operator or a later retry.
    async fn keep_refused(
        &mut self,
        message: &Arc<Message>,
        refused: &[(&Mailbox, &UpstreamReply)],
        kept: &std::sync::atomic::AtomicU64,
    ) {
        let copies: Vec<Arc<Message>> = refused
            .iter()
            .map(|(recipient, reply)| {
                let copy = Message::with_head(
                    message::new_message_id(),
                    message.sender.clone(),
                    vec![(*recipient).clone()],
                    message.full_head(),
                    message.data.clone(),
                );
                copy.meta.copy_from(&message.meta);
                copy.meta.set(keys::FORWARD_REFUSAL, reply.summary());
                copy
            })
            .collect();
        let id = message.id.clone();
        let remote = self.remote;
        match self.context.sink.deliver(copies.clone()).await {
            Ok(()) => {
                for (copy, (recipient, reply)) in copies.iter().zip(refused) {
                    kept.fetch_add(1, Ordering::Relaxed);
                    let summary = reply.summary();
                    self.log(LOG_WARNING, || {
                        format!(
                            "kept: {} (of {id}) to={}: the upstream refused it after the data: {}",
                            copy.id,
                            Address(recipient),
                            LogText(&summary)
                        )
                    });
                }
            }
            Err(error) => {
                let mut text = format!("lost: message {id} from {remote}: refused upstream after the data, and");
                let _ = write!(text, " keeping it failed: {error};");
                write_envelope(&mut text, &message.sender, refused.iter().map(|(recipient, _)| *recipient));
                self.log(crate::log::LOG_ERROR, || text);
            }
        }
    }

    /// The `forwarded:` line, and the counts of the listener.
    fn log_forwarded(&self, message: &Message, upstream: &str, wanted: &[Mailbox], replies: &[UpstreamReply]) {
        let delivered = replies.iter().filter(|reply| reply.is_positive()).count();
        if delivered > 0 {
            metrics::count(&self.context.metrics.messages);
            self.context.metrics.message_bytes.fetch_add(message.len() as u64, Ordering::Relaxed);
        }
        let summaries: Vec<String> = replies.iter().map(UpstreamReply::summary).collect();
        let level = if delivered == wanted.len() { LOG_INFO } else { LOG_WARNING };
        self.log(level, || -> LogEntry {
            let mut text = format!("forwarded: {}", message.id);
            write_envelope(&mut text, &message.sender, wanted);
            let replies = summaries.join(" | ");
            let _ = write!(
                text,
                " size={} client={} upstream={upstream} reply={}",
                message.len(),
                self.remote,
                LogText(&replies)
            );
            let authentication = super::transaction::authentication_summary(message);
            if let Some(summary) = &authentication {
                let _ = write!(text, " auth={summary}");
            }
            self.log_entry(text, || {
                let recipients: Vec<String> = wanted.iter().map(ToString::to_string).collect();
                let mut record = json!({
                    "event": "forwarded", "id": message.id, "sender": message.sender.to_string(),
                    "recipients": recipients, "size": message.len(), "client": self.remote.to_string(),
                    "via": self.local.to_string(), "upstream": upstream, "replies": summaries,
                });
                if let Some(summary) = authentication {
                    record["authentication"] = summary.into();
                }
                record
            })
        });
    }
}
