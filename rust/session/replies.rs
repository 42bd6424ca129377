//! Replies more than one phase of the session gives.

use crate::protocol::reply::Reply;

pub(super) const OK: Reply = Reply::new(250, "2.0.0", "OK");
pub(super) const NEED_MAIL: Reply = Reply::new(503, "5.5.1", "need MAIL command first");
pub(super) const NEED_RCPT: Reply = Reply::new(503, "5.5.1", "need RCPT command first");
/// The message could not be made durable (or, never expected, its body was lost).
pub(super) const STORAGE_FAILED: Reply =
    Reply::new(451, "4.3.0", "temporary failure storing the message, try again later");
pub(super) const SHUTTING_DOWN: Reply = Reply::new(421, "4.3.2", "shutting down");
pub(super) const IDLE_TOO_LONG: Reply = Reply::new(421, "4.3.2", "idle too long, closing connection");
/// A handler failed or timed out.
pub(super) const POLICY_FAILED: Reply = Reply::new(451, "4.3.0", "temporary policy failure, try again later");
/// A handler failed or timed out at connect: the connection ends.
pub(super) const POLICY_FAILED_AT_CONNECT: Reply = Reply::new(421, "4.3.0", "temporary failure, try again later");
pub(super) const TLS_NOT_AVAILABLE: Reply = Reply::new(454, "4.7.0", "TLS not available");

/// Whether `reply` says that something of ours failed (logged at WARNING),
/// rather than a decision about the client (at INFO), a policy `Reject`
/// with any code among them.
pub(super) fn is_our_failure(reply: &Reply) -> bool {
    [POLICY_FAILED, POLICY_FAILED_AT_CONNECT, STORAGE_FAILED, TLS_NOT_AVAILABLE].contains(reply)
}

/// Postfix's reply when its queue file system is short of space.
pub(super) const INSUFFICIENT_STORAGE: Reply = Reply::new(452, "4.3.1", "insufficient system storage");
/// A client's bodies in spill files would pass `max_spilled_bytes_per_client`.
pub(super) const CLIENT_SPILL_CAP: Reply =
    Reply::new(452, "4.7.0", "too much mail from your address is waiting here, try again later");
/// A message's bytes took longer than `max_data_duration`.
pub(super) const DATA_TIMEOUT: Reply = Reply::new(421, "4.4.2", "data timeout, closing connection");
