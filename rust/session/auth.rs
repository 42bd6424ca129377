//! AUTH (RFC 4954): PLAIN and LOGIN, only under TLS, both decided by
//! `smtp_server_auth_plain` (LOGIN with an empty `authz`).

use super::io::Framed;
use super::{Session, Step, Stop};
use crate::client_limits::{AuthAttempt, AuthLimitReached};
use crate::events::{Event, EventKind, Response};
use crate::log::LOG_WARNING;
use crate::meta::keys;
use crate::metrics;
use crate::protocol::reply::Reply;
use crate::protocol::sasl::{
    decode_login_password, decode_login_username, decode_plain, PlainCredentials, PlainError, LOGIN_PASSWORD_PROMPT,
    LOGIN_USERNAME_PROMPT,
};
use crate::stream::Transport;
use bytes::Buf;
use serde_json::json;
use std::time::Instant;

/// What EHLO offers under TLS when an `smtp_server_auth_plain` handler is registered.
pub(super) const AUTH_EXTENSION: &str = "AUTH PLAIN LOGIN";

impl<S: Transport> Session<S> {
    /// Whether AUTH is offered: under TLS, with a handler registered.
    pub(super) fn auth_offered(&self) -> bool {
        self.stream.is_tls() && self.is_registered(EventKind::AuthPlain)
    }

    pub(super) async fn auth(&mut self, mechanism: String, initial_response: Option<String>) -> Step {
        if !self.is_registered(EventKind::AuthPlain) {
            return self.refuse(Reply::new(503, "5.5.1", "authentication not enabled"));
        }
        if !self.stream.is_tls() {
            return self.refuse(Reply::new(
                538,
                "5.7.11",
                "encryption required for requested authentication mechanism",
            ));
        }
        if self.helo.is_none() || self.authenticated.is_some() || self.transaction.is_some() {
            return self.refuse(Reply::new(503, "5.5.1", "AUTH only after EHLO, once, outside a mail transaction"));
        }
        if !matches!(mechanism.as_str(), "PLAIN" | "LOGIN") {
            return self.refuse(Reply::new(504, "5.5.4", "unrecognized authentication mechanism"));
        }
        let attempt = self.begin_auth_attempt()?;
        let exchanged = if mechanism == "PLAIN" {
            self.plain_exchange(initial_response).await?
        } else {
            self.login_exchange(initial_response).await?
        };
        let credentials = match exchanged {
            Exchanged::Credentials(credentials) => credentials,
            Exchanged::Refused(error) => {
                self.auth_did_not_fail(attempt);
                return self.refuse(error.reply());
            }
            Exchanged::Answered => {
                self.auth_did_not_fail(attempt);
                return Ok(());
            }
        };
        let authc = credentials.authc.clone();
        let authz = if credentials.authz.is_empty() { authc.clone() } else { credentials.authz.clone() };
        let make = |session: &Self| Event::AuthPlain { credentials, meta: session.meta.clone() };
        let refusal = match self.judge(EventKind::AuthPlain, make).await? {
            Ok(Response::Authenticated(true)) => {
                self.auth_did_not_fail(attempt);
                self.meta.set(keys::AUTHN_ID, authc.clone());
                self.meta.set(keys::AUTHZ_ID, authz);
                self.authenticated = Some(authc);
                self.meta.set(keys::RECEPTION_PROTOCOL, self.protocol());
                self.send(&Reply::new(235, "2.7.0", "authentication successful"));
                return Ok(());
            }
            Ok(_) => {
                return self.refuse(Reply::new(535, "5.7.8", "authentication credentials invalid"));
            }
            Err(refusal) => refusal,
        };
        // A policy's refusal: a 5xx is a verdict on the credentials, so a
        // failure; a 4xx (the handler failed, or said "try later") is not.
        if refusal.code < 500 {
            self.auth_did_not_fail(attempt);
        }
        self.send(&refusal);
        if refusal.closes() {
            return Err(Stop::Closing);
        }
        Ok(())
    }

    /// Count this AUTH against its client's `max_auth_failures_per_client`
    /// (shared by the client's sessions, as the other per-client limits;
    /// `relay_hosts` are exempt), or refuse it with `421 4.7.0` and close
    /// once failures have used up the window: logged at WARNING in a line
    /// for fail2ban, `auth-limit: client=<ip> network=<counted as> ...`.
    fn begin_auth_attempt(&mut self) -> Result<Option<AuthAttempt>, Stop> {
        let Some(slot) = &self.client else {
            return Ok(None);
        };
        let network = slot.network();
        let AuthLimitReached { rate } = match slot.begin_auth(Instant::now()) {
            Ok(attempt) => return Ok(Some(attempt)),
            Err(reached) => reached,
        };
        metrics::count(&self.context.metrics.auth_limit_refusals);
        let (remote, seconds) = (self.remote, rate.per.as_secs_f64());
        self.log(LOG_WARNING, || {
            let message = format!(
                "auth-limit: client={} network={network} failures={} within={seconds}s port={} via={}: \
                 421 4.7.0 too many failed AUTH attempts",
                remote.ip(),
                rate.count,
                remote.port(),
                self.local,
            );
            self.log_entry(message, || {
                json!({
                    "event": "auth-limit", "client": remote.ip().to_string(), "network": network.to_string(),
                    "failures": rate.count, "seconds": seconds, "port": remote.port(), "via": self.local.to_string(),
                })
            })
        });
        let text = "too many failed authentications from your address, try again later";
        Err(self.close(Reply::new(421, "4.7.0", text)))
    }

    /// Take back an attempt that did not fail (see [`Session::begin_auth_attempt`]).
    fn auth_did_not_fail(&self, attempt: Option<AuthAttempt>) {
        if let (Some(slot), Some(attempt)) = (&self.client, attempt) {
            slot.auth_did_not_fail(attempt);
        }
    }

    /// PLAIN: the initial response, or one asked for with an empty `334`.
    async fn plain_exchange(&mut self, initial_response: Option<String>) -> Result<Exchanged, Stop> {
        let response = match initial_response {
            Some(response) => response,
            None => match self.auth_continuation("").await? {
                Some(response) => response,
                None => return Ok(Exchanged::Answered),
            },
        };
        Ok(decode_plain(&response).map_or_else(Exchanged::Refused, Exchanged::Credentials))
    }

    /// LOGIN: the user name (the initial response, or asked for with
    /// `334 VXNlcm5hbWU6`), then the password (`334 UGFzc3dvcmQ6`).
    async fn login_exchange(&mut self, initial_response: Option<String>) -> Result<Exchanged, Stop> {
        let response = match initial_response {
            Some(response) => response,
            None => match self.auth_continuation(LOGIN_USERNAME_PROMPT).await? {
                Some(response) => response,
                None => return Ok(Exchanged::Answered),
            },
        };
        let authc = match decode_login_username(&response) {
            Ok(username) => username,
            Err(error) => return Ok(Exchanged::Refused(error)),
        };
        let Some(response) = self.auth_continuation(LOGIN_PASSWORD_PROMPT).await? else {
            return Ok(Exchanged::Answered);
        };
        Ok(match decode_login_password(&response) {
            Ok(password) => Exchanged::Credentials(PlainCredentials { authz: String::new(), authc, password }),
            Err(error) => Exchanged::Refused(error),
        })
    }

    /// Send the `334` challenge `prompt` and read the response. `None`: the
    /// line was too long and the refusal is queued.
    async fn auth_continuation(&mut self, prompt: &'static str) -> Result<Option<String>, Stop> {
        self.send(&Reply::bare(334, prompt));
        match self.next_line(self.command_deadline()).await? {
            Framed::Line { len, consumed } => {
                let response = String::from_utf8_lossy(&self.input[..len]).into_owned();
                self.input.advance(consumed);
                Ok(Some(response))
            }
            Framed::TooLong { consumed } => {
                self.input.advance(consumed);
                self.refuse(Reply::new(500, "5.5.6", "authentication exchange line is too long")).map(|()| None)
            }
        }
    }
}

/// How a SASL exchange ended.
enum Exchanged {
    Credentials(PlainCredentials),
    /// The client's response was refused with this error (not yet sent).
    Refused(PlainError),
    /// A reply has been queued already.
    Answered,
}
