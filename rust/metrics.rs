//! Counters for Prometheus, kept per listener with relaxed atomics: no lock
//! on the hot path. Each metric is declared once, as a row of the table
//! below, with its Prometheus name and help; Python reads them as
//! `_core.METRICS`. Labels stay bounded: listeners, reply codes 400–599,
//! policy events; never client addresses.

use std::sync::atomic::{AtomicU64, Ordering};

const FIRST_REFUSAL: u16 = 400;
const REFUSAL_CODES: usize = 200;

/// What a metric is to Prometheus.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetricKind {
    Counter,
    Gauge,
    Histogram,
}

impl MetricKind {
    pub fn name(self) -> &'static str {
        match self {
            MetricKind::Counter => "counter",
            MetricKind::Gauge => "gauge",
            MetricKind::Histogram => "histogram",
        }
    }
}

/// A metric as Prometheus shows it: its name (a counter's without `_total`),
/// its kind, its help text and its labels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MetricInfo {
    pub name: &'static str,
    pub kind: MetricKind,
    pub help: &'static str,
    pub labels: &'static [&'static str],
}

/// Declares [`ListenerMetrics`], one `AtomicU64` per row, and
/// [`LISTENER_METRICS`], what Prometheus is told of each, in the same order
/// as [`ListenerMetrics::values`].
macro_rules! listener_metrics {
    ($( $kind:ident $field:ident: $name:literal, $help:literal; )*) => {
        /// What happened on one listener.
        pub struct ListenerMetrics {
            $( #[doc = $help] pub $field: AtomicU64, )*
            refusals: [AtomicU64; REFUSAL_CODES],
        }

        impl Default for ListenerMetrics {
            fn default() -> Self {
                Self {
                    $( $field: AtomicU64::new(0), )*
                    refusals: std::array::from_fn(|_| AtomicU64::new(0)),
                }
            }
        }

        /// Every metric a listener keeps besides its refusals, labelled by listener.
        pub const LISTENER_METRICS: &[MetricInfo] = &[
            $( MetricInfo { name: $name, kind: MetricKind::$kind, help: $help, labels: &["listener"] }, )*
        ];

        impl ListenerMetrics {
            /// The current values, in the order of [`LISTENER_METRICS`].
            pub fn values(&self) -> impl Iterator<Item = u64> + '_ {
                [$( &self.$field, )*].into_iter().map(|value| value.load(Ordering::Relaxed))
            }
        }
    };
}

listener_metrics! {
    Counter connections: "kumo_listener_connections", "Connections accepted.";
    Gauge active: "kumo_listener_connections_active", "Sessions open now.";
    Counter messages: "kumo_listener_messages_received", "Messages stored (one per split message).";
    Counter message_bytes: "kumo_listener_received_bytes", "Bytes of the messages stored, trace headers included.";
    Counter tls_handshakes: "kumo_listener_tls_handshakes", "TLS handshakes completed (STARTTLS and implicit TLS).";
    Counter tls_failures: "kumo_listener_tls_handshake_failures", "TLS handshakes failed.";
    Counter client_limit_refusals: "kumo_listener_client_limit_refusals",
        "Connections refused by max_connections_per_client or the connection rate.";
    Counter shed_connections: "kumo_listener_shed_connections",
        "Connections refused by load shedding: busy_at policy calls waiting, or body_memory_limit used up.";
    Gauge body_memory_bytes: "kumo_listener_body_memory_bytes",
        "Bytes of message bodies and envelopes held in memory now (against body_memory_limit).";
    Gauge body_spilled_bytes: "kumo_listener_body_spilled_bytes", "Bytes of message bodies in spill files now.";
}

/// [`ListenerMetrics::refusals`], by listener and code.
pub const REJECTIONS: MetricInfo = MetricInfo {
    name: "kumo_listener_rejections",
    kind: MetricKind::Counter,
    help: "Replies with a 4xx or 5xx code, by code.",
    labels: &["listener", "code"],
};

/// Add one.
pub fn count(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

impl ListenerMetrics {
    /// Count a reply sent, if it is a refusal (4xx or 5xx).
    pub fn reply_sent(&self, code: u16) {
        if let Some(counter) = code.checked_sub(FIRST_REFUSAL).and_then(|index| self.refusals.get(usize::from(index))) {
            count(counter);
        }
    }

    /// `(code, count)` for every code refused at least once.
    pub fn refusals(&self) -> Vec<(u16, u64)> {
        (FIRST_REFUSAL..)
            .zip(&self.refusals)
            .map(|(code, counter)| (code, counter.load(Ordering::Relaxed)))
            .filter(|&(_, count)| count > 0)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_counted_by_code_and_other_replies_are_not() {
        let metrics = ListenerMetrics::default();
        for code in [250, 354, 550, 550, 421, 599, 600, 399] {
            metrics.reply_sent(code);
        }
        assert_eq!(metrics.refusals(), [(421, 1), (550, 2), (599, 1)]);
    }
}
