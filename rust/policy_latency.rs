//! How long policy calls took, per event, as a Prometheus histogram: kept
//! by the [`crate::bridge`], which times every call.

use crate::events::EventKind;
use crate::metrics::{count, MetricInfo, MetricKind};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

pub const POLICY_CALL_SECONDS: MetricInfo = MetricInfo {
    name: "kumo_listener_policy_call_seconds",
    kind: MetricKind::Histogram,
    help: "How long policy calls took, from queued to answered, by event.",
    labels: &["event"],
};

/// Upper bounds, in seconds, of the histogram's buckets (the last bucket,
/// `+Inf`, is implicit).
pub const LATENCY_BUCKETS: [f64; 14] =
    [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0];

/// The histogram, per event.
pub struct PolicyLatency {
    /// Per event: one counter per bucket and `+Inf`.
    buckets: Vec<[AtomicU64; LATENCY_BUCKETS.len() + 1]>,
    sum_micros: Vec<AtomicU64>,
}

/// One event's histogram: cumulative bucket counts (the last is `+Inf`,
/// the number of calls), and the sum in seconds.
#[derive(Clone, Debug, PartialEq)]
pub struct LatencySnapshot {
    pub event: &'static str,
    pub cumulative: Vec<u64>,
    pub sum_seconds: f64,
}

impl Default for PolicyLatency {
    fn default() -> Self {
        Self {
            buckets: EventKind::ALL.iter().map(|_| std::array::from_fn(|_| AtomicU64::new(0))).collect(),
            sum_micros: EventKind::ALL.iter().map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

impl PolicyLatency {
    pub fn observe(&self, kind: EventKind, took: Duration) {
        let seconds = took.as_secs_f64();
        let bucket = LATENCY_BUCKETS.iter().position(|&bound| seconds <= bound).unwrap_or(LATENCY_BUCKETS.len());
        let index = kind as usize;
        count(&self.buckets[index][bucket]);
        self.sum_micros[index].fetch_add(u64::try_from(took.as_micros()).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// The events called at least once.
    pub fn snapshot(&self) -> Vec<LatencySnapshot> {
        let mut snapshots = Vec::new();
        for (index, kind) in EventKind::ALL.iter().enumerate() {
            let mut total = 0;
            let cumulative: Vec<u64> = self.buckets[index]
                .iter()
                .map(|counter| {
                    total += counter.load(Ordering::Relaxed);
                    total
                })
                .collect();
            if total > 0 {
                let sum_seconds = self.sum_micros[index].load(Ordering::Relaxed) as f64 / 1e6;
                snapshots.push(LatencySnapshot { event: kind.name(), cumulative, sum_seconds });
            }
        }
        snapshots
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
        let rcpt = &snapshot[0];
        assert_eq!(rcpt.event, "smtp_server_rcpt_to");
        assert_eq!(rcpt.cumulative[0], 1);
        assert_eq!(rcpt.cumulative[5], 2, "3 ms is in the 5 ms bucket");
        assert_eq!(*rcpt.cumulative.last().unwrap(), 3);
        assert!((rcpt.sum_seconds - 60.00305).abs() < 1e-9);
    }
}
