//! Message authentication in the session (the `authentication` parameter):
//! SPF of the HELO identity started at EHLO, iprev at the first EHLO, SPF of
//! the MAIL FROM identity at MAIL FROM (awaited there when enforced), DKIM,
//! ARC and DMARC once the data is in; the refusals of `enforce`, the
//! results in the metadata, the `Authentication-Results:` header and the
//! metric. The checks run on the authentication runtime ([`crate::auth`]),
//! the session's loop only waiting for them, except those of a small message
//! with few signatures, run on the session's task (their lookups async).

use super::transaction::Transaction;
use super::{Session, Stop};
use crate::auth::{self, AuthResult, Identity, MessageInput, Spf};
use crate::body::Body;
use crate::meta::keys;
use crate::protocol::reply::Reply;
use crate::stream::Transport;
use bytes::Bytes;
use std::net::IpAddr;
use tokio::task::JoinHandle;

/// A check running on the authentication runtime, or its result.
enum Pending<T> {
    Running(JoinHandle<T>),
    Done(T),
}

impl<T: Clone> Pending<T> {
    /// The result, waited for if need be; `fallback` if the check died.
    async fn get(&mut self, fallback: impl FnOnce() -> T) -> T {
        if let Pending::Running(handle) = self {
            let value = handle.await.unwrap_or_else(|_| fallback());
            *self = Pending::Done(value);
        }
        match self {
            Pending::Done(value) => value.clone(),
            Pending::Running(_) => unreachable!("just finished"),
        }
    }

    /// The result if the check is done, without waiting.
    async fn if_done(&mut self, fallback: impl FnOnce() -> T) -> Option<T> {
        match self {
            Pending::Running(handle) if !handle.is_finished() => None,
            _ => Some(self.get(fallback).await),
        }
    }
}

/// A session's checks and their results, kept for its later transactions
/// while their inputs stay the same.
#[derive(Default)]
pub(super) struct AuthState {
    /// The client address (XCLIENT may change it), the HELO name and its SPF.
    helo: Option<(IpAddr, String, Pending<Spf>)>,
    /// The client address, HELO name and MAIL FROM address of the last MAIL FROM check.
    mail_from: Option<(IpAddr, String, String, Pending<Spf>)>,
    /// The client address and its iprev.
    iprev: Option<(IpAddr, Pending<AuthResult>)>,
}

fn spf_failed() -> Spf {
    Spf {
        output: mail_auth::SpfOutput::default().with_result(mail_auth::SpfResult::TempError),
        result: AuthResult::new("spf", "temperror").reason("the check failed"),
    }
}

fn iprev_failed() -> AuthResult {
    AuthResult::new("iprev", "temperror").reason("the check failed")
}

/// RFC 7372's codes, Stalwart's replies.
const SPF_FAIL: Reply = Reply::new(550, "5.7.23", "SPF validation failed");
const SPF_TEMPERROR: Reply = Reply::new(451, "4.7.24", "SPF validation error, try again later");
const DKIM_FAIL: Reply = Reply::new(550, "5.7.20", "no passing DKIM signature found");
const DKIM_TEMPERROR: Reply = Reply::new(451, "4.7.20", "DKIM validation error, try again later");
const ARC_FAIL: Reply = Reply::new(550, "5.7.29", "ARC validation failed");
const ARC_TEMPERROR: Reply = Reply::new(451, "4.7.29", "ARC validation error, try again later");
const DMARC_REJECT: Reply = Reply::new(550, "5.7.1", "DMARC policy of the From domain says reject");
const DMARC_TEMPERROR: Reply = Reply::new(451, "4.7.1", "DMARC validation error, try again later");

/// What the checks of a message came to.
pub(super) struct MessageAuthentication {
    /// `Authentication-Results:`, to go below our `Received:`.
    pub(super) header: String,
    /// The refusal `enforce` asks for.
    pub(super) refusal: Option<Reply>,
    /// The body without incoming headers that claimed our authserv-id.
    pub(super) rewritten: Option<Bytes>,
    pub(super) results: Vec<AuthResult>,
}

impl<S: Transport> Session<S> {
    fn auth_state(&mut self) -> &mut AuthState {
        self.auth.get_or_insert_with(Box::default)
    }

    /// At a successful EHLO/HELO: start SPF of the HELO identity and iprev,
    /// without holding the reply up.
    pub(super) fn start_authentication_at_hello(&mut self, helo: &str) {
        let settings = self.params.authentication.clone();
        if !settings.any() {
            return;
        }
        let ip = self.remote.ip();
        let hostname = self.params.hostname.clone();
        let state = self.auth_state();
        if settings.spf.is_on() && state.helo.as_ref().is_none_or(|(at, name, _)| (*at, name.as_str()) != (ip, helo)) {
            let check = auth::checks::spf(ip, helo.to_owned(), hostname, Identity::Helo);
            state.helo = Some((ip, helo.to_owned(), Pending::Running(auth::engine::start(check))));
        }
        if settings.iprev.is_on() && state.iprev.as_ref().is_none_or(|(checked, _)| *checked != ip) {
            state.iprev = Some((ip, Pending::Running(auth::engine::start(auth::checks::iprev(ip)))));
        }
    }

    /// At MAIL FROM: start SPF of the MAIL FROM identity (unless this
    /// connection checked the same one already); when enforced, await it,
    /// and the refusal when it fails. The connection's results known by
    /// now go into its metadata.
    pub(super) async fn authenticate_mail_from(&mut self, sender: &str) -> Option<Reply> {
        let settings = self.params.authentication.clone();
        if !settings.any() {
            return None;
        }
        let helo = self.helo.clone().unwrap_or_default();
        let ip = self.remote.ip();
        let hostname = self.params.hostname.clone();
        if settings.spf.is_on() {
            let state = self.auth_state();
            let cached = state.mail_from.as_ref().is_some_and(|(at, h, s, _)| *at == ip && *h == helo && s == sender);
            if !cached {
                let identity = Identity::MailFrom(sender.to_owned());
                let check = auth::engine::start(auth::checks::spf(ip, helo.clone(), hostname, identity));
                state.mail_from = Some((ip, helo, sender.to_owned(), Pending::Running(check)));
            }
        }
        let mut refusal = None;
        if settings.spf.enforces() {
            if let Some((_, _, _, pending)) = &mut self.auth_state().mail_from {
                let spf = pending.get(spf_failed).await;
                refusal = match spf.result.result {
                    "fail" => Some(SPF_FAIL),
                    "temperror" => Some(SPF_TEMPERROR),
                    _ => None,
                };
            }
        }
        self.publish_connection_results(false).await;
        refusal
    }

    /// The connection's results (SPF of MAIL FROM, then of HELO, iprev)
    /// into its metadata: those known now, or all of them (`wait`).
    async fn publish_connection_results(&mut self, wait: bool) -> Vec<AuthResult> {
        let Some(state) = self.auth.as_mut() else {
            return Vec::new();
        };
        let mut known = Vec::new();
        if let Some((_, _, _, pending)) = &mut state.mail_from {
            let spf = if wait { Some(pending.get(spf_failed).await) } else { pending.if_done(spf_failed).await };
            known.extend(spf.map(|spf| spf.result));
        }
        if let Some((_, _, pending)) = &mut state.helo {
            let spf = if wait { Some(pending.get(spf_failed).await) } else { pending.if_done(spf_failed).await };
            known.extend(spf.map(|spf| spf.result));
        }
        if let Some((_, pending)) = &mut state.iprev {
            let iprev = if wait { Some(pending.get(iprev_failed).await) } else { pending.if_done(iprev_failed).await };
            known.extend(iprev);
        }
        if !known.is_empty() {
            self.meta.set(keys::AUTHENTICATION_RESULTS, auth::results::to_json(&known));
        }
        known
    }

    /// Once the data is in: the connection's results, and DKIM, ARC and
    /// DMARC of `data` as `authentication` asks. `None` when it asks nothing.
    pub(super) async fn authenticate_message(
        &mut self,
        transaction: &Transaction,
        data: &Body,
    ) -> Result<Option<MessageAuthentication>, Stop> {
        let settings = self.params.authentication.clone();
        if !settings.any() {
            return Ok(None);
        }
        let mut results = self.publish_connection_results(true).await;
        let sender = transaction.sender.to_string();
        let mut refusal = None;
        let rewritten;
        if settings.checks_message() {
            let spf = match &mut self.auth_state().mail_from {
                Some((_, _, checked, pending)) if *checked == sender => Some(pending.get(spf_failed).await.output),
                _ => None,
            };
            let input = MessageInput {
                data: data.clone(),
                hostname: self.params.hostname.clone(),
                remote_ip: self.remote.ip(),
                helo: self.helo.clone().unwrap_or_default(),
                sender,
                spf,
                dkim: settings.dkim.is_on(),
                arc: settings.arc.is_on(),
                dmarc: settings.dmarc.is_on(),
            };
            let outcome = auth::checks::message(input).await;
            rewritten = outcome.rewritten;
            let found = &outcome.results;
            let has = |method: &str, word: &str| found.iter().any(|r| r.method == method && r.result == word);
            if settings.dkim.enforces() && !has("dkim", "pass") {
                refusal = if has("dkim", "fail") {
                    Some(DKIM_FAIL)
                } else if has("dkim", "temperror") {
                    Some(DKIM_TEMPERROR)
                } else {
                    None
                };
            }
            if refusal.is_none() && settings.arc.enforces() {
                refusal = if has("arc", "fail") {
                    Some(ARC_FAIL)
                } else if has("arc", "temperror") {
                    Some(ARC_TEMPERROR)
                } else {
                    None
                };
            }
            if refusal.is_none() && settings.dmarc.enforces() {
                let rejects = found.iter().any(|result| {
                    let reject = result.props.iter().any(|(name, value)| *name == "policy.dmarc" && value == "reject");
                    result.method == "dmarc" && result.result == "fail" && reject
                });
                refusal = if rejects {
                    Some(DMARC_REJECT)
                } else if has("dmarc", "temperror") {
                    Some(DMARC_TEMPERROR)
                } else {
                    None
                };
            }
            results.extend(outcome.results);
        } else {
            rewritten = self.without_forged_results(data).await;
        }
        let metrics = &self.context.metrics;
        for result in &results {
            metrics.count_authentication(result.metric_index());
        }
        let header = auth::results::header(&self.params.hostname, &results);
        Ok(Some(MessageAuthentication { header, refusal, rewritten, results }))
    }

    /// `data` without the incoming `Authentication-Results:` fields that
    /// carry our authserv-id, if it has some (SPF or iprev alone: no other
    /// check reads the message). A spilled body is read off the loop, its
    /// start only unless it has such fields.
    async fn without_forged_results(&self, data: &Body) -> Option<Bytes> {
        let hostname = self.params.hostname.clone();
        match data {
            Body::Memory(bytes) => strip_forged(bytes, &hostname),
            Body::File(_) => {
                let data = data.clone();
                let work = move || {
                    let head = data.slice(0, 64 * 1024).ok()?;
                    if auth::results::forged_results(&head, &hostname).is_empty() {
                        return None;
                    }
                    strip_forged(&data.to_vec().ok()?, &hostname)
                };
                auth::engine::blocking(work).await.flatten()
            }
        }
    }
}

fn strip_forged(message: &[u8], hostname: &str) -> Option<Bytes> {
    let forged = auth::results::forged_results(message, hostname);
    (!forged.is_empty()).then(|| Bytes::from(auth::results::without(message, &forged)))
}
