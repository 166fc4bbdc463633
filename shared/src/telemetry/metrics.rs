//! The in-process counters behind `/metrics`, `run --summary` and the demo table.

use std::{
    collections::BTreeMap,
    sync::atomic::{AtomicU64, Ordering::Relaxed},
    time::{Duration, Instant},
};

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::sync::Mutex;

/// Counters of one worker process.
#[derive(Debug)]
pub struct Metrics {
    started: Instant,
    /// Deliveries received.
    pub received: AtomicU64,
    /// Handler succeeded and the message was acked.
    pub succeeded: AtomicU64,
    /// Sent back to the broker with a delay.
    pub retried: AtomicU64,
    /// Immediate (in-slot) retries.
    pub immediate_retries: AtomicU64,
    /// Dead-lettered.
    pub dead_lettered: AtomicU64,
    /// Duplicates whose stored result was replayed (handler not run).
    pub duplicates_skipped: AtomicU64,
    /// Handler panics caught.
    pub panics: AtomicU64,
    /// Returned to the queue at shutdown.
    pub released: AtomicU64,
    /// Messages being worked now.
    pub in_flight: AtomicU64,
    dead_letter_reasons: Mutex<BTreeMap<String, u64>>,
    latency_us: Mutex<Histogram<u64>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            started: Instant::now(),
            received: AtomicU64::new(0),
            succeeded: AtomicU64::new(0),
            retried: AtomicU64::new(0),
            immediate_retries: AtomicU64::new(0),
            dead_lettered: AtomicU64::new(0),
            duplicates_skipped: AtomicU64::new(0),
            panics: AtomicU64::new(0),
            released: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            dead_letter_reasons: Mutex::new(BTreeMap::new()),
            // 1 us .. 1 h at 3 significant digits.
            latency_us: Mutex::new(
                Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("histogram bounds"),
            ),
        }
    }
}

/// Adds one to a counter.
pub fn inc(c: &AtomicU64) {
    c.fetch_add(1, Relaxed);
}

impl Metrics {
    /// Records a dead letter under a short reason label.
    pub fn dead_letter_reason(&self, label: &str) {
        inc(&self.dead_lettered);
        *self
            .dead_letter_reasons
            .lock()
            .entry(label.to_owned())
            .or_default() += 1;
    }

    /// Records the time from receive to settle.
    pub fn observe(&self, d: Duration) {
        let us = (d.as_micros() as u64).clamp(1, 3_600_000_000);
        let _ = self.latency_us.lock().record(us);
    }

    /// Receive-to-settle latency for `/metrics` (serve.rs): observations, their sum in
    /// seconds (from the histogram's mean, so within its 3 significant digits), and the
    /// value in seconds at each of `quantiles`.
    pub fn latency(&self, quantiles: &[f64]) -> (u64, f64, Vec<f64>) {
        let h = self.latency_us.lock();
        let count = h.len();
        let sum = h.mean() * count as f64 / 1e6;
        let at = quantiles
            .iter()
            .map(|&q| h.value_at_quantile(q) as f64 / 1e6)
            .collect();
        (count, sum, at)
    }

    /// A snapshot for `run --summary`.
    pub fn summary(&self) -> RunSummary {
        let h = self.latency_us.lock();
        let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        let elapsed = self.started.elapsed().as_secs_f64();
        let settled = self.succeeded.load(Relaxed)
            + self.duplicates_skipped.load(Relaxed)
            + self.dead_lettered.load(Relaxed);
        RunSummary {
            received: self.received.load(Relaxed),
            succeeded: self.succeeded.load(Relaxed),
            retried: self.retried.load(Relaxed),
            immediate_retries: self.immediate_retries.load(Relaxed),
            dead_lettered: self.dead_lettered.load(Relaxed),
            duplicates_skipped: self.duplicates_skipped.load(Relaxed),
            panics: self.panics.load(Relaxed),
            released: self.released.load(Relaxed),
            dead_letter_reasons: self.dead_letter_reasons.lock().clone(),
            elapsed_s: elapsed,
            settled_per_s: if elapsed > 0.0 {
                settled as f64 / elapsed
            } else {
                0.0
            },
            p50_ms: ms(0.50),
            p95_ms: ms(0.95),
            p99_ms: ms(0.99),
        }
    }
}

/// What one `run` did; printed by `run --summary`.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct RunSummary {
    /// Deliveries received.
    pub received: u64,
    /// Acked after the handler succeeded.
    pub succeeded: u64,
    /// Sent back with a delay.
    pub retried: u64,
    /// In-slot retries.
    pub immediate_retries: u64,
    /// Dead-lettered.
    pub dead_lettered: u64,
    /// Duplicates absorbed by the idempotency store.
    pub duplicates_skipped: u64,
    /// Panics caught.
    pub panics: u64,
    /// Returned to the queue at shutdown.
    pub released: u64,
    /// Dead letters by reason.
    pub dead_letter_reasons: BTreeMap<String, u64>,
    /// Wall time of the run.
    pub elapsed_s: f64,
    /// Settled messages (acked, duplicates, dead-lettered) per second.
    pub settled_per_s: f64,
    /// Receive-to-settle latency percentiles, of every delivery.
    pub p50_ms: f64,
    /// 95th percentile.
    pub p95_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
}
