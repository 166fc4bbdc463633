//! The retry policy and the reconnect schedule: the only file that knows about the `backoff`
//! crate.
//!
//! `backoff` 0.4 carries an "unmaintained" advisory; it is kept behind [`RetryPolicy`] so it can
//! be swapped here without touching the pipeline. We use it for the exponential envelope
//! (base x factor^n, capped) and apply *full jitter* ourselves: delay = uniform(0, envelope),
//! which spreads retries of a burst best (AWS Architecture Blog, "Exponential Backoff And
//! Jitter"). `backoff`'s own randomization is +/- a factor, not full jitter.

use std::time::{Duration, Instant};

use backoff::{backoff::Backoff, ExponentialBackoff};
use rand::Rng;

use crate::config::RetrySettings;

/// Retry decisions as plain values.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    settings: RetrySettings,
}

impl RetryPolicy {
    /// A policy from its settings.
    pub fn new(settings: RetrySettings) -> Self {
        Self { settings }
    }

    /// Immediate retries inside one delivery.
    pub fn immediate_retries(&self) -> u32 {
        self.settings.immediate
    }

    /// Deliveries before a transient failure is dead-lettered.
    pub fn max_deliveries(&self) -> u32 {
        self.settings.max_deliveries
    }

    /// Longest wait that may be taken while holding a slot.
    pub fn max_in_slot_wait(&self) -> Duration {
        self.settings.max_in_slot_wait
    }

    /// Wait before immediate retry `n` (1-based): full jitter over `immediate_base * 2^(n-1)`,
    /// never more than `max_in_slot_wait`.
    pub fn immediate_delay(&self, n: u32) -> Duration {
        let envelope = envelope(
            self.settings.immediate_base,
            2.0,
            self.settings.max_in_slot_wait,
            n,
        );
        full_jitter(envelope)
    }

    /// Broker-side delay after the failed delivery `attempt` (1-based): full jitter over
    /// `base * factor^(attempt-1)`, capped at `cap`.
    pub fn delayed_retry(&self, attempt: u32) -> Duration {
        let envelope = envelope(
            self.settings.base,
            self.settings.factor,
            self.settings.cap,
            attempt,
        );
        full_jitter(envelope)
    }

    /// The upper bound of [`RetryPolicy::delayed_retry`] (what the jitter draws below).
    pub fn delayed_retry_envelope(&self, attempt: u32) -> Duration {
        envelope(
            self.settings.base,
            self.settings.factor,
            self.settings.cap,
            attempt,
        )
    }
}

/// The waits between attempts to reach a broker again after a lost connection: `first`
/// doubling up to `cap`, with *equal* jitter (uniform over the upper half of the envelope, so
/// that a reconnect never spins), for as long as the attempts fit in `budget`. After that the
/// schedule ends and the caller returns the error, so that its own retry policy takes over.
#[derive(Debug)]
pub struct ReconnectSchedule {
    envelope: ExponentialBackoff,
    started: Instant,
    budget: Duration,
    attempts: u32,
}

impl ReconnectSchedule {
    /// A schedule starting now.
    pub fn new(first: Duration, cap: Duration, budget: Duration) -> Self {
        Self {
            envelope: ExponentialBackoff {
                current_interval: first,
                initial_interval: first,
                randomization_factor: 0.0,
                multiplier: 2.0,
                max_interval: cap,
                max_elapsed_time: None,
                ..ExponentialBackoff::default()
            },
            started: Instant::now(),
            budget,
            attempts: 0,
        }
    }

    /// The wait before the next attempt, or `None` once waiting would go past the budget.
    pub fn next_wait(&mut self) -> Option<Duration> {
        let envelope = self.envelope.next_backoff()?;
        let wait = equal_jitter(envelope);
        if self.started.elapsed() + wait > self.budget {
            return None;
        }
        self.attempts += 1;
        Some(wait)
    }

    /// Waits handed out so far (the number of the attempt that follows the last one).
    pub fn attempts(&self) -> u32 {
        self.attempts
    }
}

/// `base * factor^(n-1)` capped, computed by `backoff` without its randomization.
fn envelope(base: Duration, factor: f64, cap: Duration, n: u32) -> Duration {
    let mut b = ExponentialBackoff {
        current_interval: base,
        initial_interval: base,
        randomization_factor: 0.0,
        multiplier: factor,
        max_interval: cap,
        max_elapsed_time: None,
        ..ExponentialBackoff::default()
    };
    let mut d = base;
    for _ in 0..n.max(1) {
        d = b.next_backoff().unwrap_or(cap);
    }
    d.min(cap)
}

fn equal_jitter(envelope: Duration) -> Duration {
    let half = envelope.as_millis() as u64 / 2;
    Duration::from_millis(half + rand::thread_rng().gen_range(0..=half))
}

fn full_jitter(envelope: Duration) -> Duration {
    if envelope.is_zero() {
        return envelope;
    }
    let ms = envelope.as_millis() as u64;
    Duration::from_millis(rand::thread_rng().gen_range(0..=ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_doubles_from_base_and_stops_at_the_cap() {
        let p = RetryPolicy::new(RetrySettings::default());
        let seen: Vec<u64> = (1..=7)
            .map(|a| p.delayed_retry_envelope(a).as_millis() as u64)
            .collect();
        assert_eq!(seen, vec![1000, 2000, 4000, 8000, 16000, 30000, 30000]);
    }

    #[test]
    fn full_jitter_stays_within_the_envelope_and_spreads() {
        let p = RetryPolicy::new(RetrySettings::default());
        let draws: Vec<Duration> = (0..200).map(|_| p.delayed_retry(3)).collect();
        assert!(draws.iter().all(|d| *d <= Duration::from_secs(4)));
        let below_half = draws
            .iter()
            .filter(|d| **d < Duration::from_secs(2))
            .count();
        // Uniform over [0, 4s]: about half fall below 2 s; 200 draws make 40..160 near-certain.
        assert!((40..=160).contains(&below_half), "{below_half}");
    }

    #[test]
    fn reconnect_waits_double_within_their_envelope_and_stop_at_the_budget() {
        let mut s = ReconnectSchedule::new(
            Duration::from_millis(100),
            Duration::from_millis(400),
            Duration::from_secs(3600),
        );
        for envelope in [100, 200, 400, 400, 400] {
            let wait = s.next_wait().unwrap().as_millis() as u64;
            assert!(
                (envelope / 2..=envelope).contains(&wait),
                "{wait} of {envelope}"
            );
        }
        assert_eq!(s.attempts(), 5);
        // A budget smaller than the first wait ends the schedule at once.
        let mut s = ReconnectSchedule::new(
            Duration::from_secs(2),
            Duration::from_secs(5),
            Duration::from_millis(500),
        );
        assert_eq!(s.next_wait(), None);
    }

    #[test]
    fn immediate_retries_never_wait_longer_than_the_in_slot_limit() {
        let p = RetryPolicy::new(RetrySettings {
            immediate_base: Duration::from_secs(1),
            max_in_slot_wait: Duration::from_millis(1500),
            ..RetrySettings::default()
        });
        for n in 1..10 {
            assert!(p.immediate_delay(n) <= Duration::from_millis(1500));
        }
    }
}
