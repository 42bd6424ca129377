//! Counters for Prometheus, kept per listener with relaxed atomics: no lock
//! on the hot path. Labels stay bounded: listeners, reply codes 400–599,
//! policy events; never client addresses.

use crate::events::EventKind;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds, in seconds, of the policy call latency histogram's buckets
/// (the last bucket, `+Inf`, is implicit).
pub const LATENCY_BUCKETS: [f64; 14] =
    [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0];

const FIRST_REFUSAL: u16 = 400;
const REFUSAL_CODES: usize = 200;

/// What happened on one listener.
pub struct ListenerMetrics {
    pub connections: AtomicU64,
    /// Sessions open now (a gauge).
    pub active: AtomicU64,
    pub messages: AtomicU64,
    /// Bytes of the messages stored, as stored (trace headers included).
    pub message_bytes: AtomicU64,
    pub tls_handshakes: AtomicU64,
    pub tls_failures: AtomicU64,
    /// Connections refused by `max_connections_per_client` or the connection rate.
    pub client_limit_refusals: AtomicU64,
    /// Connections refused while too many policy calls waited.
    pub shed_connections: AtomicU64,
    /// Bytes reserved now by message bodies in memory (a gauge).
    pub body_memory_bytes: AtomicU64,
    /// Bytes in spill files now (a gauge).
    pub body_spilled_bytes: AtomicU64,
    refusals: [AtomicU64; REFUSAL_CODES],
}

impl Default for ListenerMetrics {
    fn default() -> Self {
        Self {
            connections: AtomicU64::new(0),
            active: AtomicU64::new(0),
            messages: AtomicU64::new(0),
            message_bytes: AtomicU64::new(0),
            tls_handshakes: AtomicU64::new(0),
            tls_failures: AtomicU64::new(0),
            client_limit_refusals: AtomicU64::new(0),
            shed_connections: AtomicU64::new(0),
            body_memory_bytes: AtomicU64::new(0),
            body_spilled_bytes: AtomicU64::new(0),
            refusals: std::array::from_fn(|_| AtomicU64::new(0)),
        }
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

    /// `(code, count)` for every code refused at least once.
    pub fn refusals(&self) -> Vec<(u16, u64)> {
        (FIRST_REFUSAL..)
            .zip(&self.refusals)
            .map(|(code, counter)| (code, counter.load(Ordering::Relaxed)))
            .filter(|&(_, count)| count > 0)
            .collect()
    }
}

/// How long policy calls took, per event, as a histogram.
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
    fn refusals_are_counted_by_code_and_other_replies_are_not() {
        let metrics = ListenerMetrics::default();
        for code in [250, 354, 550, 550, 421, 599, 600, 399] {
            metrics.reply_sent(code);
        }
        assert_eq!(metrics.refusals(), [(421, 1), (550, 2), (599, 1)]);
    }

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
