//! The wire formats: pure logic, no I/O and no Python, each unit-tested,
//! fuzzed (`fuzz/`) and benched (`benches/hot_path.rs`) on its own. Nothing
//! here imports from the rest of the crate.
//!
//! Server side: [`parser`] (commands), [`framing`] (lines and the DATA body),
//! [`bdat`] (RFC 3030 chunks), [`reply`], [`sasl`] (AUTH PLAIN/LOGIN),
//! [`proxy`] (HAProxy's PROXY v1/v2), [`xclient`] (Postfix's XCLIENT) and
//! [`xtext`] (RFC 3461). Client side, for forwarding: [`client`].

pub mod bdat;
pub mod client;
pub mod framing;
pub mod parser;
pub mod proxy;
pub mod reply;
pub mod sasl;
pub mod xclient;
pub mod xtext;
