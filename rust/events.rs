//! Interim: replaced by the event contract split out of the bridge.
pub use crate::bridge::{Event, EventKind, Outcome, Response};
