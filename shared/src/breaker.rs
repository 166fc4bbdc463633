//! Circuit breaker: N transient failures within a window open it; while open the worker takes
//! no new messages; after `open_for` one probe message is let through, whose outcome closes or
//! re-opens it.

use std::{
    collections::VecDeque,
    time::{Duration, Instant},
};

use crate::{config::BreakerSettings, sync::Mutex};

/// Breaker state, as exported in metrics (`breaker_state`: 0 closed, 1 half-open, 2 open).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Messages flow.
    Closed,
    /// One probe is allowed (or in flight).
    HalfOpen,
    /// No new messages until the instant.
    Open,
}

/// What the intake loop may do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Take messages as usual.
    Allow,
    /// Take exactly one message: the probe.
    Probe,
    /// Take nothing for this long.
    Wait(Duration),
}

#[derive(Debug)]
struct Inner {
    state: BreakerState,
    failures: VecDeque<Instant>,
    open_until: Instant,
    probe_out: bool,
}

/// A thread-safe breaker.
#[derive(Debug)]
pub struct CircuitBreaker {
    settings: BreakerSettings,
    inner: Mutex<Inner>,
}

impl CircuitBreaker {
    /// A closed breaker.
    pub fn new(settings: BreakerSettings) -> Self {
        Self {
            settings,
            inner: Mutex::new(Inner {
                state: BreakerState::Closed,
                failures: VecDeque::new(),
                open_until: Instant::now(),
                probe_out: false,
            }),
        }
    }

    /// Current state.
    pub fn state(&self) -> BreakerState {
        let mut g = self.inner.lock();
        self.refresh(&mut g, Instant::now());
        g.state
    }

    /// Asks whether intake may go on. `Probe` reserves the single probe slot.
    pub fn admit(&self) -> Admission {
        if !self.settings.enabled {
            return Admission::Allow;
        }
        let now = Instant::now();
        let mut g = self.inner.lock();
        self.refresh(&mut g, now);
        match g.state {
            BreakerState::Closed => Admission::Allow,
            BreakerState::Open => Admission::Wait(g.open_until - now),
            BreakerState::HalfOpen if g.probe_out => Admission::Wait(Duration::from_millis(50)),
            BreakerState::HalfOpen => {
                g.probe_out = true;
                Admission::Probe
            }
        }
    }

    /// Records a handler success.
    pub fn on_success(&self) {
        let mut g = self.inner.lock();
        if g.state == BreakerState::HalfOpen {
            g.state = BreakerState::Closed;
            g.probe_out = false;
            g.failures.clear();
        }
    }

    /// Records a handler failure that counts (transient ones, timeouts, panics).
    pub fn on_failure(&self) {
        if !self.settings.enabled {
            return;
        }
        let now = Instant::now();
        let mut g = self.inner.lock();
        self.refresh(&mut g, now);
        match g.state {
            BreakerState::HalfOpen => self.open(&mut g, now),
            BreakerState::Open => {}
            BreakerState::Closed => {
                g.failures.push_back(now);
                while let Some(t) = g.failures.front() {
                    if now.duration_since(*t) > self.settings.window {
                        g.failures.pop_front();
                    } else {
                        break;
                    }
                }
                if g.failures.len() as u32 >= self.settings.failures {
                    self.open(&mut g, now);
                }
            }
        }
    }

    /// A probe that ended without a verdict (e.g. its message was a duplicate) frees the slot.
    pub fn probe_abandoned(&self) {
        let mut g = self.inner.lock();
        g.probe_out = false;
    }

    fn open(&self, g: &mut Inner, now: Instant) {
        g.state = BreakerState::Open;
        g.open_until = now + self.settings.open_for;
        g.failures.clear();
        g.probe_out = false;
        tracing::warn!(open_for = ?self.settings.open_for, "circuit breaker opened: intake paused");
    }

    fn refresh(&self, g: &mut Inner, now: Instant) {
        if g.state == BreakerState::Open && now >= g.open_until {
            g.state = BreakerState::HalfOpen;
            g.probe_out = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker(open_for: Duration) -> CircuitBreaker {
        CircuitBreaker::new(BreakerSettings {
            enabled: true,
            failures: 3,
            window: Duration::from_secs(60),
            open_for,
        })
    }

    #[test]
    fn opens_after_the_failure_threshold_and_pauses_intake() {
        let b = breaker(Duration::from_secs(30));
        b.on_failure();
        b.on_failure();
        assert_eq!(b.admit(), Admission::Allow);
        b.on_failure();
        assert_eq!(b.state(), BreakerState::Open);
        assert!(matches!(b.admit(), Admission::Wait(d) if d > Duration::from_secs(29)));
    }

    #[test]
    fn half_open_allows_one_probe_whose_success_closes_it() {
        let b = breaker(Duration::ZERO);
        for _ in 0..3 {
            b.on_failure();
        }
        assert_eq!(b.admit(), Admission::Probe);
        assert!(matches!(b.admit(), Admission::Wait(_)), "only one probe");
        b.on_success();
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(b.admit(), Admission::Allow);
    }

    #[test]
    fn failed_probe_reopens_the_breaker() {
        let b = breaker(Duration::ZERO);
        for _ in 0..3 {
            b.on_failure();
        }
        assert_eq!(b.admit(), Admission::Probe);
        b.on_failure();
        // Read the raw state: with open_for = 0 the next refresh would make it half-open.
        assert_eq!(b.inner.lock().state, BreakerState::Open);
    }

    #[test]
    fn disabled_breaker_always_allows() {
        let b = CircuitBreaker::new(BreakerSettings {
            enabled: false,
            ..BreakerSettings::default()
        });
        for _ in 0..100 {
            b.on_failure();
        }
        assert_eq!(b.admit(), Admission::Allow);
    }
}
