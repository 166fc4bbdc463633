//! The in-process counters behind `/metrics` ([`super::exposition`]), `run --summary` and the
//! demo table: the metrics contract's counters by outcome and error class, its three
//! histograms, and the queue's state as last polled.

use std::{
    collections::BTreeMap,
    sync::atomic::{AtomicU64, Ordering::Relaxed},
    time::{Duration, Instant},
};

use hdrhistogram::Histogram as HdrHistogram;
use serde::Serialize;

use super::histogram::Histogram;
use crate::{envelope::FailureClass, message::QueueStats, sync::Mutex};

/// The labels every series carries: which function, on which queue, at which version.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Labels {
    /// The function's name.
    pub function: String,
    /// Its work queue.
    pub queue: String,
    /// `telemetry.version` as resolved at start.
    pub version: String,
}

/// How a delivery was settled: the `outcome` label of `sluice_messages_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The handler succeeded; acked.
    Succeeded,
    /// Already done (the idempotency record replayed); acked without running the handler.
    Duplicate,
    /// Sent back to the broker to be tried again later.
    Retried,
    /// Moved to the dead-letter queue.
    DeadLettered,
    /// Put back at shutdown, untried.
    Released,
}

impl Outcome {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Succeeded => "succeeded",
            Outcome::Duplicate => "duplicate",
            Outcome::Retried => "retried",
            Outcome::DeadLettered => "dead_lettered",
            Outcome::Released => "released",
        }
    }
}

/// Why a delivery was not a success: the `error_class` label of `sluice_messages_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// No error.
    None,
    /// A transient failure: an error, a timeout, a panic, a store outage.
    Transient,
    /// Bad input or a business rejection.
    Permanent,
    /// The handler (its downstream) asked to come back after a delay.
    RetryAfter,
    /// Delivered too often without being settled. Counted by no worker: the broker's guard
    /// moves these without a worker seeing them (they show in `sluice_queue_messages`).
    CrashLoop,
}

impl ErrorClass {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::None => "none",
            ErrorClass::Transient => "transient",
            ErrorClass::Permanent => "permanent",
            ErrorClass::RetryAfter => "retry_after",
            ErrorClass::CrashLoop => "crash_loop",
        }
    }
}

impl From<FailureClass> for ErrorClass {
    fn from(c: FailureClass) -> Self {
        match c {
            FailureClass::Transient => ErrorClass::Transient,
            FailureClass::Permanent => ErrorClass::Permanent,
            FailureClass::CrashLoop => ErrorClass::CrashLoop,
        }
    }
}

/// Every (outcome, error class) a worker settles a delivery with. Each has its counter from
/// the start, at 0, so that `rate()` sees the first increment (a series that appears at 1
/// has no earlier sample to rise from).
pub const SETTLED: [(Outcome, ErrorClass); 7] = [
    (Outcome::Succeeded, ErrorClass::None),
    (Outcome::Duplicate, ErrorClass::None),
    (Outcome::Retried, ErrorClass::Transient),
    (Outcome::Retried, ErrorClass::RetryAfter),
    (Outcome::DeadLettered, ErrorClass::Transient),
    (Outcome::DeadLettered, ErrorClass::Permanent),
    (Outcome::Released, ErrorClass::None),
];

/// Most workflow names with their own `sluice_workflow_events_total` series (the rest: `other`).
pub const MAX_WORKFLOW_LABELS: usize = 16;

/// Counters of one worker process.
#[derive(Debug)]
pub struct Metrics {
    started: Instant,
    labels: Labels,
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
    /// Settled deliveries, one counter per entry of [`SETTLED`].
    settled: [AtomicU64; SETTLED.len()],
    dead_letter_reasons: Mutex<BTreeMap<&'static str, u64>>,
    /// Workflow events by (workflow, event); workflow names beyond
    /// [`MAX_WORKFLOW_LABELS`] are counted as `other`.
    workflow_events: Mutex<BTreeMap<(String, &'static str), u64>>,
    /// Receive to settle, at 3 significant digits, for the summary's percentiles.
    latency_us: Mutex<HdrHistogram<u64>>,
    /// Each handler try.
    pub handler_duration: Histogram,
    /// Receive to settle.
    pub process_duration: Histogram,
    /// From when a message was due (or published) to the start of its pipeline.
    pub message_age: Histogram,
    /// The queue as last polled (`None`: not yet, or the last poll failed).
    queue: Mutex<Option<QueueStats>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new(Labels::default())
    }
}

/// Adds one to a counter.
pub fn inc(c: &AtomicU64) {
    c.fetch_add(1, Relaxed);
}

impl Metrics {
    /// Counters at zero, for the series labelled `labels`.
    pub fn new(labels: Labels) -> Self {
        Self {
            started: Instant::now(),
            labels,
            received: AtomicU64::new(0),
            succeeded: AtomicU64::new(0),
            retried: AtomicU64::new(0),
            immediate_retries: AtomicU64::new(0),
            dead_lettered: AtomicU64::new(0),
            duplicates_skipped: AtomicU64::new(0),
            panics: AtomicU64::new(0),
            released: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            settled: Default::default(),
            dead_letter_reasons: Mutex::new(BTreeMap::new()),
            workflow_events: Mutex::new(BTreeMap::new()),
            // 1 us .. 1 h at 3 significant digits.
            latency_us: Mutex::new(
                HdrHistogram::new_with_bounds(1, 3_600_000_000, 3).expect("histogram bounds"),
            ),
            handler_duration: Histogram::default(),
            process_duration: Histogram::default(),
            message_age: Histogram::default(),
            queue: Mutex::new(None),
        }
    }

    /// The labels of this process's series.
    pub fn labels(&self) -> &Labels {
        &self.labels
    }

    /// A delivery reached the pipeline after waiting `waited` for it.
    pub fn on_receive(&self, waited: Duration) {
        inc(&self.received);
        self.message_age.observe(waited);
    }

    /// A delivery was settled so.
    pub fn settled(&self, outcome: Outcome, class: ErrorClass) {
        if let Some(i) = SETTLED.iter().position(|&p| p == (outcome, class)) {
            inc(&self.settled[i]);
        }
        inc(match outcome {
            Outcome::Succeeded => &self.succeeded,
            Outcome::Duplicate => &self.duplicates_skipped,
            Outcome::Retried => &self.retried,
            Outcome::DeadLettered => &self.dead_lettered,
            Outcome::Released => &self.released,
        });
    }

    /// A delivery was dead-lettered, with its class and short reason label (a fixed text of
    /// the code, so the set of labels is bounded).
    pub fn dead_lettered(&self, class: FailureClass, reason: &'static str) {
        self.settled(Outcome::DeadLettered, class.into());
        *self.dead_letter_reasons.lock().entry(reason).or_default() += 1;
    }

    /// A workflow event reported by this worker. The workflow name comes from the message's
    /// slip, so the label set is bounded: the first [`MAX_WORKFLOW_LABELS`] names seen get
    /// their own series (each event kind from 0), later ones count as `other`.
    pub fn workflow_event(&self, workflow: &str, event: crate::workflow::EventKind) {
        let mut m = self.workflow_events.lock();
        let known = m.keys().any(|(w, _)| w == workflow);
        let names = m
            .keys()
            .map(|(w, _)| w)
            .collect::<std::collections::BTreeSet<_>>()
            .len();
        let name = if known || names < MAX_WORKFLOW_LABELS {
            workflow
        } else {
            "other"
        };
        if !m.keys().any(|(w, _)| w == name) {
            for e in crate::workflow::EventKind::ALL {
                m.insert((name.to_owned(), e.as_str()), 0);
            }
        }
        *m.entry((name.to_owned(), event.as_str())).or_default() += 1;
    }

    /// Workflow events by (workflow, event).
    pub fn workflow_events(&self) -> BTreeMap<(String, &'static str), u64> {
        self.workflow_events.lock().clone()
    }

    /// The settled counters, in [`SETTLED`] order.
    pub fn settled_counts(&self) -> impl Iterator<Item = (Outcome, ErrorClass, u64)> + '_ {
        SETTLED
            .iter()
            .zip(&self.settled)
            .map(|(&(o, c), n)| (o, c, n.load(Relaxed)))
    }

    /// Dead letters by reason label.
    pub fn dead_letter_reasons(&self) -> BTreeMap<&'static str, u64> {
        self.dead_letter_reasons.lock().clone()
    }

    /// Records the time from receive to settle.
    pub fn observe(&self, d: Duration) {
        self.process_duration.observe(d);
        let us = (d.as_micros() as u64).clamp(1, 3_600_000_000);
        let _ = self.latency_us.lock().record(us);
    }

    /// The queue as just polled, or `None` when the poll failed (its gauges then disappear
    /// rather than show stale values).
    pub fn set_queue(&self, stats: Option<QueueStats>) {
        *self.queue.lock() = stats;
    }

    /// The queue as last polled.
    pub fn queue(&self) -> Option<QueueStats> {
        *self.queue.lock()
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
            dead_letter_reasons: self
                .dead_letter_reasons()
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v))
                .collect(),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settling_counts_the_pair_and_the_summary_counter() {
        let m = Metrics::default();
        m.settled(Outcome::Succeeded, ErrorClass::None);
        m.settled(Outcome::Retried, ErrorClass::RetryAfter);
        m.dead_lettered(FailureClass::Permanent, "malformed JSON");
        m.dead_lettered(FailureClass::Permanent, "malformed JSON");
        let counts: Vec<_> = m.settled_counts().filter(|c| c.2 > 0).collect();
        assert_eq!(
            counts,
            [
                (Outcome::Succeeded, ErrorClass::None, 1),
                (Outcome::Retried, ErrorClass::RetryAfter, 1),
                (Outcome::DeadLettered, ErrorClass::Permanent, 2),
            ]
        );
        assert_eq!(m.settled_counts().count(), SETTLED.len(), "all start at 0");
        let s = m.summary();
        assert_eq!((s.succeeded, s.retried, s.dead_lettered), (1, 1, 2));
        assert_eq!(s.dead_letter_reasons["malformed JSON"], 2);
    }
}
