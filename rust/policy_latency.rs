//! How long policy calls took, per event, as a Prometheus histogram: kept
//! by the [`crate::bridge`], which times every call.

use crate::events::EventKind;
use crate::metrics::{Histogram, HistogramSnapshot, MetricInfo, MetricKind, LATENCY_BUCKETS};
use std::time::Duration;

pub const POLICY_CALL_SECONDS: MetricInfo = MetricInfo {
    name: "kumo_listener_policy_call_seconds",
    kind: MetricKind::Histogram,
    help: "How long policy calls took, from queued to answered, by event.",
    labels: &["event"],
};

/// The histogram, per event.
pub struct PolicyLatency(Vec<Histogram<{ LATENCY_BUCKETS.len() }>>);

impl Default for PolicyLatency {
    fn default() -> Self {
        Self(EventKind::ALL.iter().map(|_| Histogram::new(&LATENCY_BUCKETS)).collect())
    }
}

impl PolicyLatency {
    pub fn observe(&self, kind: EventKind, took: Duration) {
        self.0[kind as usize].observe(took);
    }

    /// `(event, histogram)` of the events called at least once.
    pub fn snapshot(&self) -> Vec<(&'static str, HistogramSnapshot)> {
        let read = EventKind::ALL.iter().zip(&self.0);
        read.filter_map(|(kind, histogram)| Some((kind.name(), histogram.snapshot()?))).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_buckets_are_cumulative_with_an_infinite_last() {
        let latency = PolicyLatency::default();
        latency.observe(EventKind::RcptTo, Duration::from_micros(50));
        latency.observe(EventKind::RcptTo, Duration::from_millis(3));
        latency.observe(EventKind::RcptTo, Duration::from_secs(60));
        let snapshot = latency.snapshot();
        assert_eq!(snapshot.len(), 1);
        let (event, rcpt) = &snapshot[0];
        assert_eq!(*event, "smtp_server_rcpt_to");
        assert_eq!(rcpt.buckets[0], (0.0001, 1));
        assert_eq!(rcpt.buckets[5], (0.005, 2), "3 ms is in the 5 ms bucket");
        assert_eq!(*rcpt.buckets.last().unwrap(), (f64::INFINITY, 3));
        assert!((rcpt.sum_seconds - 60.00305).abs() < 1e-9);
    }
}
