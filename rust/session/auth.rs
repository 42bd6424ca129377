//! AUTH (RFC 4954): PLAIN and LOGIN, only under TLS, both decided by
//! `smtp_server_auth_plain` (LOGIN with an empty `authz`).

use super::io::Framed;
use super::{Session, Step, Stop};
use crate::events::{Event, EventKind, Response};
use crate::meta::keys;
use crate::protocol::reply::Reply;
use crate::protocol::sasl::{
    decode_login_password, decode_login_username, decode_plain, PlainCredentials, PlainError, LOGIN_PASSWORD_PROMPT,
    LOGIN_USERNAME_PROMPT,
};
use crate::stream::Transport;
use bytes::Buf;

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
        let exchanged = match mechanism.as_str() {
            "PLAIN" => self.plain_exchange(initial_response).await?,
            "LOGIN" => self.login_exchange(initial_response).await?,
            _ => return self.refuse(Reply::new(504, "5.5.4", "unrecognized authentication mechanism")),
        };
        let credentials = match exchanged {
            Exchanged::Credentials(credentials) => credentials,
            Exchanged::Refused(error) => return self.refuse(error.reply()),
            Exchanged::Answered => return Ok(()),
        };
        let authc = credentials.authc.clone();
        let authz = if credentials.authz.is_empty() { authc.clone() } else { credentials.authz.clone() };
        let make = |session: &Self| Event::AuthPlain { credentials, meta: session.meta.clone() };
        match self.consult(EventKind::AuthPlain, make).await? {
            None => Ok(()),
            Some(Response::Authenticated(true)) => {
                self.meta.set(keys::AUTHN_ID, authc.clone());
                self.meta.set(keys::AUTHZ_ID, authz);
                self.authenticated = Some(authc);
                self.meta.set(keys::RECEPTION_PROTOCOL, self.protocol());
                self.send(&Reply::new(235, "2.7.0", "authentication successful"));
                Ok(())
            }
            Some(_) => self.refuse(Reply::new(535, "5.7.8", "authentication credentials invalid")),
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
