//! Postfix's XCLIENT: a trusted proxy (`allow_xclient`) says who the real
//! client is, and the session starts over as if that client had connected.

use super::{Session, Step};
use crate::meta::keys;
use crate::protocol::reply::Reply;
use crate::protocol::xclient::parse_xclient;
use crate::stream::Transport;
use std::net::SocketAddr;

impl<S: Transport> Session<S> {
    /// Parameters and the dynamic hook are evaluated again, then a new
    /// greeting. `LOGIN` authenticates as that user; `HELO`, `NAME` and
    /// `PROTO` are accepted and not used (the client says EHLO again).
    pub(super) async fn xclient(&mut self, arguments: &str) -> Step {
        if !self.params.allow_xclient {
            return self.refuse(Reply::new(550, "5.7.0", "insufficient authorization"));
        }
        if self.transaction.is_some() {
            return self.refuse(Reply::new(503, "5.5.1", "MAIL transaction in progress"));
        }
        let request = match parse_xclient(arguments) {
            Ok(request) => request,
            Err(error) => return self.refuse(error.reply()),
        };
        let remote =
            SocketAddr::new(request.addr.unwrap_or(self.remote.ip()), request.port.unwrap_or(self.remote.port()));
        let local =
            SocketAddr::new(request.destaddr.unwrap_or(self.local.ip()), request.destport.unwrap_or(self.local.port()));
        self.keep_original_addresses();
        self.set_addresses(remote, local);
        self.forget_client();
        if let Some(login) = request.login {
            self.meta.set(keys::AUTHN_ID, login.clone());
            self.meta.set(keys::AUTHZ_ID, login.clone());
            self.authenticated = Some(login);
        }
        self.apply_parameters().await?;
        self.connection_accepted().await?;
        // As at the start: a proxy that talks before the new greeting is refused.
        self.greet_if_client_waited()
    }
}
