//! Message authentication at reception: SPF, DKIM, DMARC, ARC and iprev
//! with Stalwart's mail-auth (pinned to 0.13.3), on a runtime of their own
//! (a small message's on the session's task, in that runtime's context)
//! with the process's one resolver and its parsed records; the results as policy sees them and as
//! the `Authentication-Results:` header (RFC 8601) writes them.

pub mod cache;
pub mod checks;
pub mod engine;
pub mod results;

pub use checks::{Identity, MessageInput, MessageOutcome, OnDemand, Spf};
pub use engine::{configure, DnsConfig};
pub use results::AuthResult;
