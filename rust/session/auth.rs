//! AUTH (RFC 4954): PLAIN, only under TLS, decided by `smtp_server_auth_plain`.

use super::io::Framed;
use super::{Session, Step, Stop};
use crate::events::{Event, EventKind, Response};
use crate::reply::Reply;
use crate::sasl::decode_plain;
use crate::stream::Transport;
use bytes::Buf;

impl<S: Transport> Session<S> {
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
        if mechanism != "PLAIN" {
            return self.refuse(Reply::new(504, "5.5.4", "unrecognized authentication mechanism"));
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
            Err(error) => return self.refuse(error.reply()),
        };
        let authc = credentials.authc.clone();
        let authz = if credentials.authz.is_empty() { authc.clone() } else { credentials.authz.clone() };
        let make = |session: &Self| Event::AuthPlain { credentials, meta: session.meta.clone() };
        match self.consult(EventKind::AuthPlain, make).await? {
            None => Ok(()),
            Some(Response::Authenticated(true)) => {
                self.meta.set("authn_id", authc.clone());
                self.meta.set("authz_id", authz);
                self.authenticated = Some(authc);
                self.meta.set("reception_protocol", self.protocol());
                self.send(&Reply::new(235, "2.7.0", "authentication successful"));
                Ok(())
            }
            Some(_) => self.refuse(Reply::new(535, "5.7.8", "authentication credentials invalid")),
        }
    }

    /// Ask for the PLAIN response with an empty `334` and read it. `None`:
    /// the line was too long and the refusal is queued.
    async fn auth_continuation(&mut self) -> Result<Option<String>, Stop> {
        self.send(&Reply::bare(334, ""));
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
