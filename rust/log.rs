//! Interim: replaced by the log module split out of the bridge.
pub use crate::bridge::{LOG_DEBUG, LOG_ERROR, LOG_INFO, LOG_WARNING};
