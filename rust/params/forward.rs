//! `forward_options`: how the forwarding client reaches the upstreams of
//! `forward_to`, one table merged field by field.

use super::parse::{expected, key_path, parse_duration, parse_key_source, positive_integer, unknown_key, Errors};
use super::KeySource;
use crate::forward::upstream::ForwardTls;
use serde_json::Value;
use std::time::Duration;

field_table! {
    /// The forwarding client's settings. The defaults are a front door's:
    /// a dead upstream found in seconds (Postfix's `smtp_connect_timeout`
    /// is 30 s), the reply to the data awaited as long as a client waits
    /// for ours (Postfix's `smtp_data_done_timeout` is 600 s; RFC 5321
    /// asks clients for 10 minutes), idle connections closed well before
    /// an upstream's own idle timeout (Postfix's `smtpd_timeout`, 300 s).
    ForwardOptions, ForwardOptionsLayer, forward_options, "{tls = \"verify\", tls_ca = \"ca.pem\"}" {
        tls: ForwardTls = ForwardTls::Opportunistic, forward_tls;
        /// The CA certificates `tls = "verify"` checks upstreams against.
        tls_ca: Option<KeySource> = None, optional_key_source;
        connect_timeout: Duration = Duration::from_secs(5), parse_duration;
        command_timeout: Duration = Duration::from_secs(60), parse_duration;
        data_timeout: Duration = Duration::from_secs(300), parse_duration;
        /// Connections open at most to each upstream.
        pool_size: usize = 100, positive_integer;
        idle_timeout: Duration = Duration::from_secs(20), parse_duration;
        /// How long an upstream that failed is skipped.
        backoff: Duration = Duration::from_secs(30), parse_duration;
    }
}

fn forward_tls(value: &Value) -> Result<ForwardTls, String> {
    let wanted = || format!("one of {}", ForwardTls::NAMES.map(|name| format!("{name:?}")).join(", "));
    let name = value.as_str().ok_or_else(|| expected(&wanted(), value))?;
    ForwardTls::from_name(name).ok_or_else(|| expected(&wanted(), value))
}

fn optional_key_source(value: &Value) -> Result<Option<KeySource>, String> {
    parse_key_source(value).map(Some)
}
