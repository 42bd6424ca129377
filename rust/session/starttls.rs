//! STARTTLS (RFC 3207) and the TLS handshake, also used by implicit TLS.

use super::record::Ending;
use super::replies::TLS_NOT_AVAILABLE;
use super::{Session, Step, Stop};
use crate::log::{LOG_ERROR, LOG_INFO};
use crate::meta::keys;
use crate::metrics;
use crate::params::KeySource;
use crate::protocol::framing::LineFramer;
use crate::protocol::reply::Reply;
use crate::stream::{Stream, Transport};
use crate::tls::{ServerIdentity, TlsIdentity};
use tokio::time::timeout;
use tokio_rustls::TlsAcceptor;

impl<S: Transport> Session<S> {
    /// Whatever the client pipelined after STARTTLS was sent in plaintext
    /// and is thrown away unread (CVE-2011-0411); after the handshake the
    /// client starts over with EHLO.
    pub(super) async fn starttls(&mut self) -> Step {
        if self.stream.is_tls() {
            return self.refuse(Reply::new(503, "5.5.1", "TLS already active"));
        }
        let identity = match self.server_identity().await {
            Ok(identity) => identity,
            Err(reason) => {
                self.tls_unavailable(&reason);
                self.send(&TLS_NOT_AVAILABLE);
                return Ok(());
            }
        };
        self.send(&Reply::new(220, "2.0.0", "Ready to start TLS"));
        self.flush().await?;
        self.input.clear();
        self.lines = LineFramer::new(self.params.line_length_hard_limit);
        self.handshake(identity).await?;
        self.forget_client();
        Ok(())
    }

    /// This connection's TLS configuration, from its effective parameters.
    pub(super) async fn server_identity(&self) -> Result<ServerIdentity, String> {
        let cache = self.context.tls.clone();
        let wanted = TlsIdentity::of(&self.params);
        if let Some(identity) = cache.cached(&wanted) {
            return Ok(identity);
        }
        // Reads certificate files and may build a configuration.
        tokio::task::spawn_blocking(move || cache.identity(&wanted)).await.map_err(|e| e.to_string())?
    }

    /// Log why, naming the identity that could not be used: our address,
    /// the effective hostname, the certificate and key sources.
    pub(super) fn tls_unavailable(&self, reason: &str) -> Stop {
        let source = |source: &Option<KeySource>| match source {
            Some(KeySource::File(path)) => path.display().to_string(),
            Some(KeySource::Data(_)) => "key_data".into(),
            None => "self-signed".into(),
        };
        let (certificate, key) = (source(&self.params.tls_certificate), source(&self.params.tls_private_key));
        self.log(LOG_ERROR, || {
            format!(
                "{} to {} ({}): TLS not available: {reason} (tls_certificate {certificate}, tls_private_key {key})",
                self.remote, self.local, self.params.hostname
            )
        });
        Stop::Gone
    }

    /// A failed or silent handshake ends the connection: never a fall-back to plaintext.
    pub(super) async fn handshake(&mut self, identity: ServerIdentity) -> Step {
        let Some(plain) = self.stream.take_plain() else {
            return Err(Stop::Gone);
        };
        let accepted =
            timeout(self.params.client_timeout, TlsAcceptor::from(identity.config.clone()).accept(plain)).await;
        let tls = match accepted {
            Ok(Ok(tls)) => tls,
            Ok(Err(error)) => return Err(self.handshake_failed(&error.to_string())),
            Err(_) => return Err(self.handshake_failed("timed out")),
        };
        metrics::count(&self.context.metrics.tls_handshakes);
        let (_, connection) = tls.get_ref();
        if let Some(suite) = connection.negotiated_cipher_suite() {
            self.meta.set(keys::TLS_CIPHER, format!("{:?}", suite.suite()));
        }
        if let Some(version) = connection.protocol_version() {
            self.meta.set(keys::TLS_PROTOCOL_VERSION, format!("{version:?}"));
        }
        if let Some(subject) = connection.peer_certificates().and_then(|chain| identity.trusted_peer_subject(chain)) {
            self.meta.set(keys::TLS_PEER_SUBJECT_NAME, subject);
        }
        self.stream = Stream::Tls(Box::new(tls));
        Ok(())
    }

    fn handshake_failed(&mut self, reason: &str) -> Stop {
        self.end_as(Ending::TlsFailed);
        metrics::count(&self.context.metrics.tls_failures);
        self.log(LOG_INFO, || format!("{}: TLS handshake failed: {reason}", self.remote));
        Stop::Gone
    }

    /// RFC 3207 §4.2: discard what the client said before TLS.
    pub(super) fn forget_client(&mut self) {
        self.helo = None;
        self.esmtp = false;
        self.transaction = None;
        self.authenticated = None;
        for name in [keys::EHLO_DOMAIN, keys::AUTHN_ID, keys::AUTHZ_ID] {
            self.meta.remove(name);
        }
    }
}
