//! Forwarding: each accepted message handed on to an upstream SMTP or LMTP
//! server (`forward_to`), live, as Postfix's before-queue proxy does it, so
//! that our client's `250` means the upstream took the message.
//!
//! [`upstream`] (the URLs, pure), [`connection`] (one upstream connection,
//! over the wire formats of [`crate::protocol::client`]), [`pool`] (reuse,
//! the cap, back-off of a failed upstream, metrics), [`relay`] (one
//! transaction), [`tls`] (the client's TLS configurations).

pub mod connection;
pub mod pool;
pub mod relay;
#[cfg(test)]
pub mod scripted;
pub mod tls;
pub mod upstream;
