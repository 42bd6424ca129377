//! Counters for Prometheus, kept per listener with relaxed atomics: no lock
//! on the hot path. Each metric is declared once, as a row of the table
//! below, with its Prometheus name and help; Python reads them as
//! `_core.METRICS`. Labels stay bounded: listeners, reply codes 400–599,
//! policy events; never client addresses.

use std::sync::atomic::{AtomicU64, Ordering};

/// Upper bounds, in seconds, of the latency histograms' buckets (the last
/// bucket, `+Inf`, is implicit).
pub const LATENCY_BUCKETS: [f64; 14] =
    [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0];

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

/// Declares a struct of one `AtomicU64` per row and a table of what
/// Prometheus is told of each (labelled by `$label`), in the order of the
/// struct's [`MetricValues::values`]. Extra fields (`$extra: $extra_ty`) are the struct's
/// own, not metrics of the table.
#[macro_export]
macro_rules! metric_table {
    (
        $(#[$doc:meta])* $struct:ident, $table:ident, $label:literal,
        extra { $( $extra:ident: $extra_ty:ty = $extra_init:expr ),* }
        rows { $( $kind:ident $field:ident: $name:literal, $help:literal; )* }
    ) => {
        $(#[$doc])*
        pub struct $struct {
            $( #[doc = $help] pub $field: std::sync::atomic::AtomicU64, )*
            $( $extra: $extra_ty, )*
        }

        impl Default for $struct {
            fn default() -> Self {
                Self { $( $field: std::sync::atomic::AtomicU64::new(0), )* $( $extra: $extra_init, )* }
            }
        }

        #[doc = concat!("Every row of [`", stringify!($struct), "`], labelled by ", $label, ".")]
        pub const $table: &[$crate::metrics::MetricInfo] = &[
            $( $crate::metrics::MetricInfo {
                name: $name,
                kind: $crate::metrics::MetricKind::$kind,
                help: $help,
                labels: &[$label],
            }, )*
        ];

        impl $crate::metrics::MetricValues for $struct {
            fn values(&self) -> Vec<u64> {
                [$( &self.$field, )*].into_iter().map(|value| value.load(std::sync::atomic::Ordering::Relaxed)).collect()
            }
        }
    };
}

metric_table! {
    /// What happened on one listener.
    ListenerMetrics, LISTENER_METRICS, "listener",
    extra {
        refusals: [AtomicU64; REFUSAL_CODES] = std::array::from_fn(|_| AtomicU64::new(0)),
        authentication: [[AtomicU64; AUTH_RESULTS]; AUTH_METHODS] =
            std::array::from_fn(|_| std::array::from_fn(|_| AtomicU64::new(0)))
    }
    rows {
    Counter connections: "kumo_listener_connections", "Connections accepted.";
    Gauge active: "kumo_listener_connections_active", "Sessions open now.";
    Counter messages: "kumo_listener_messages_received", "Messages stored (one per split message).";
    Counter message_bytes: "kumo_listener_received_bytes", "Bytes of the messages stored, trace headers included.";
    Counter tls_handshakes: "kumo_listener_tls_handshakes", "TLS handshakes completed (STARTTLS and implicit TLS).";
    Counter tls_failures: "kumo_listener_tls_handshake_failures", "TLS handshakes failed.";
    Counter client_limit_refusals: "kumo_listener_client_limit_refusals",
        "Connections refused by max_connections_per_client or the connection rate.";
    Counter auth_limit_refusals: "kumo_listener_auth_limit_refusals",
        "AUTH commands refused (421, and a close) by max_auth_failures_per_client.";
    Counter shed_connections: "kumo_listener_shed_connections",
        "Connections refused by load shedding: busy_at policy calls waiting, or body_memory_limit used up.";
    Gauge body_memory_bytes: "kumo_listener_body_memory_bytes",
        "Bytes of message bodies and envelopes held in memory now (against body_memory_limit).";
    Gauge body_spilled_bytes: "kumo_listener_body_spilled_bytes", "Bytes of message bodies in spill files now.";
    }
}

/// [`ListenerMetrics::refusals`], by listener and code.
pub const REJECTIONS: MetricInfo = MetricInfo {
    name: "kumo_listener_rejections",
    kind: MetricKind::Counter,
    help: "Replies with a 4xx or 5xx code, by code.",
    labels: &["listener", "code"],
};

/// [`ListenerMetrics::authentication`], by listener, method and result.
pub const AUTHENTICATION_RESULTS: MetricInfo = MetricInfo {
    name: "kumo_listener_authentication_results",
    kind: MetricKind::Counter,
    help: "Results of the authentication parameter's checks, by method and result (one per DKIM signature).",
    labels: &["listener", "method", "result"],
};

/// The methods and the results [`AUTHENTICATION_RESULTS`] counts.
pub const AUTH_METHOD_NAMES: [&str; AUTH_METHODS] = ["spf", "dkim", "dmarc", "arc", "iprev"];
pub const AUTH_RESULT_NAMES: [&str; AUTH_RESULTS] =
    ["pass", "fail", "softfail", "neutral", "none", "temperror", "permerror", "policy"];
const AUTH_METHODS: usize = 5;
const AUTH_RESULTS: usize = 8;

/// What the rows of a [`metric_table!`] hold now.
pub trait MetricValues {
    /// The current values, in the order of the table.
    fn values(&self) -> Vec<u64>;
}

/// A histogram of durations: a counter per bucket (cumulative only when read).
pub struct Histogram<const N: usize> {
    bounds: &'static [f64; N],
    /// One per bound, then `+Inf`.
    buckets: Vec<AtomicU64>,
    sum_micros: AtomicU64,
}

/// A histogram as read: `(upper bound, cumulative count)` per bucket, the
/// last one `+Inf` (the count of all), and the sum in seconds.
#[derive(Clone, Debug, PartialEq)]
pub struct HistogramSnapshot {
    pub buckets: Vec<(f64, u64)>,
    pub sum_seconds: f64,
}

impl<const N: usize> Histogram<N> {
    pub fn new(bounds: &'static [f64; N]) -> Self {
        Self { bounds, buckets: (0..=N).map(|_| AtomicU64::new(0)).collect(), sum_micros: AtomicU64::new(0) }
    }

    pub fn observe(&self, took: std::time::Duration) {
        let seconds = took.as_secs_f64();
        let bucket = self.bounds.iter().position(|&bound| seconds <= bound).unwrap_or(N);
        count(&self.buckets[bucket]);
        self.sum_micros.fetch_add(u64::try_from(took.as_micros()).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// None before anything was observed.
    pub fn snapshot(&self) -> Option<HistogramSnapshot> {
        let mut total = 0;
        let bounds = self.bounds.iter().copied().chain([f64::INFINITY]);
        let buckets: Vec<(f64, u64)> = bounds
            .zip(&self.buckets)
            .map(|(bound, counter)| {
                total += counter.load(Ordering::Relaxed);
                (bound, total)
            })
            .collect();
        let sum_seconds = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        (total > 0).then_some(HistogramSnapshot { buckets, sum_seconds })
    }
}

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

    /// Count an authentication result, `(method, result)` indices into
    /// [`AUTH_METHOD_NAMES`] and [`AUTH_RESULT_NAMES`].
    pub fn count_authentication(&self, index: Option<(usize, usize)>) {
        if let Some(counter) = index.and_then(|(method, result)| self.authentication.get(method)?.get(result)) {
            count(counter);
        }
    }

    /// `(method, result, count)` for every result counted at least once.
    pub fn authentication_results(&self) -> Vec<(&'static str, &'static str, u64)> {
        let mut all = Vec::new();
        for (method, counters) in AUTH_METHOD_NAMES.iter().zip(&self.authentication) {
            for (result, counter) in AUTH_RESULT_NAMES.iter().zip(counters) {
                let value = counter.load(Ordering::Relaxed);
                if value > 0 {
                    all.push((*method, *result, value));
                }
            }
        }
        all
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
