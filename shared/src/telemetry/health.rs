//! What the probes report: the intake loop's heartbeat, readiness, and the worker's counters.
//! `serve.rs` answers `/healthz`, `/readyz` and `/metrics` from it.
//!
//! Liveness is about the intake loop, not the handlers: the loop ticks on every turn, and
//! liveness fails once it has not ticked for a window longer than any wait the loop takes
//! legitimately (a receive long poll, a receive-error backoff, a rate-limit token), unless
//! every slot is busy (then the loop waits for a slot by design; slow handlers are the
//! handler timeout's business, not a reason to restart the pod). Readiness is "the transport
//! and store are open, the loop runs, and no shutdown was asked".

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
        Arc, OnceLock, Weak,
    },
    time::{Duration, Instant},
};

use tokio_util::sync::CancellationToken;

use super::Metrics;
use crate::{breaker::BreakerState, config::Settings};

/// The part of the stall window that is not derived from settings: slack for a busy machine.
const STALL_SLACK: Duration = Duration::from_secs(60);

/// What the worker reports to the listener. Created with the [`crate::Function`], shared with
/// its runtime; the listener may start before the runtime exists (transport and store still
/// opening), when it answers alive but not ready.
#[derive(Default)]
pub struct Health {
    started: OnceLock<Instant>,
    /// Milliseconds since `started` at the intake loop's last turn.
    last_tick_ms: AtomicU64,
    intake: OnceLock<Intake>,
    stopped: AtomicBool,
}

struct Intake {
    shutdown: CancellationToken,
    concurrency: u64,
    stall_after: Duration,
    source: Weak<dyn Source>,
}

/// The worker as the listener reads it (a weak reference: the worker owns the health, and
/// the listener must not keep the worker alive).
pub trait Source: Send + Sync {
    /// The function's name.
    fn function(&self) -> &str;
    /// Its counters.
    fn metrics(&self) -> &Metrics;
    /// Its circuit breaker now.
    fn breaker(&self) -> BreakerState;
}

impl std::fmt::Debug for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Health")
            .field("running", &self.intake.get().is_some())
            .field("stopped", &self.stopped.load(Relaxed))
            .finish()
    }
}

/// The longest the intake loop may legitimately go without a turn: a receive long poll
/// (twice, for a slow broker), the longest receive-error backoff, one rate-limit token.
pub fn stall_window(settings: &Settings) -> Duration {
    let token = if settings.rate_limit.per_second > 0.0 {
        Duration::from_secs_f64((1.0 / settings.rate_limit.per_second).min(3600.0))
    } else {
        Duration::ZERO
    };
    STALL_SLACK + settings.transport.wait * 2 + settings.retry.cap + token
}

impl Health {
    pub(crate) fn now_ms(&self) -> u64 {
        self.started.get_or_init(Instant::now).elapsed().as_millis() as u64
    }

    /// The intake loop of `source` starts (called once by the worker's `run`).
    pub(crate) fn intake_started(
        &self,
        source: Weak<dyn Source>,
        settings: &Settings,
        shutdown: &CancellationToken,
    ) {
        self.tick();
        let _ = self.intake.set(Intake {
            shutdown: shutdown.clone(),
            concurrency: settings.worker.concurrency as u64,
            stall_after: stall_window(settings),
            source,
        });
    }

    /// One turn of the intake loop.
    pub(crate) fn tick(&self) {
        self.last_tick_ms.store(self.now_ms(), Relaxed);
    }

    /// The intake loop returned (in-flight work done or returned to the queue).
    pub(crate) fn intake_stopped(&self) {
        self.stopped.store(true, Relaxed);
    }

    /// `/readyz`: the status and why.
    pub(crate) fn readiness(&self) -> (bool, &'static str) {
        match self.intake.get() {
            None => (false, "starting"),
            Some(_) if self.stopped.load(Relaxed) => (false, "stopped"),
            Some(i) if i.shutdown.is_cancelled() => (false, "draining"),
            Some(_) => (true, "ready"),
        }
    }

    /// `/healthz`: the status and why.
    pub(crate) fn liveness(&self) -> (bool, String) {
        let Some(intake) = self.intake.get() else {
            return (true, "starting".into());
        };
        if self.stopped.load(Relaxed) || intake.shutdown.is_cancelled() {
            return (true, "stopping".into());
        }
        let idle = Duration::from_millis(
            self.now_ms()
                .saturating_sub(self.last_tick_ms.load(Relaxed)),
        );
        let busy = intake
            .source
            .upgrade()
            .is_some_and(|s| s.metrics().in_flight.load(Relaxed) >= intake.concurrency);
        if idle <= intake.stall_after || busy {
            (true, "alive".into())
        } else {
            (
                false,
                format!(
                    "intake loop stalled: no turn for {idle:?} (window {:?})",
                    intake.stall_after
                ),
            )
        }
    }

    /// The worker, while it runs.
    pub(crate) fn source(&self) -> Option<Arc<dyn Source>> {
        self.intake.get().and_then(|i| i.source.upgrade())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Gone;
    impl Source for Gone {
        fn function(&self) -> &str {
            "gone"
        }
        fn metrics(&self) -> &Metrics {
            unreachable!("never upgraded")
        }
        fn breaker(&self) -> BreakerState {
            BreakerState::Closed
        }
    }

    fn dead() -> Weak<dyn Source> {
        Weak::<Gone>::new()
    }

    #[test]
    fn readiness_follows_the_intake_and_the_shutdown_token() {
        let h = Health::default();
        assert_eq!(h.readiness(), (false, "starting"));
        assert!(h.liveness().0);
        let shutdown = CancellationToken::new();
        let _ = h.intake.set(Intake {
            shutdown: shutdown.clone(),
            concurrency: 1,
            stall_after: Duration::ZERO,
            source: dead(),
        });
        h.tick();
        assert_eq!(h.readiness(), (true, "ready"));
        shutdown.cancel();
        assert_eq!(h.readiness(), (false, "draining"));
        h.intake_stopped();
        assert_eq!(h.readiness(), (false, "stopped"));
    }

    #[test]
    fn liveness_fails_when_the_intake_loop_stops_turning() {
        let h = Health::default();
        let _ = h.intake.set(Intake {
            shutdown: CancellationToken::new(),
            concurrency: 1,
            stall_after: Duration::from_millis(30),
            source: dead(),
        });
        h.tick();
        assert!(h.liveness().0);
        // Waits out the window itself, the thing under test (not a race with another task).
        std::thread::sleep(Duration::from_millis(80));
        let (alive, why) = h.liveness();
        assert!(!alive && why.contains("stalled"), "{why}");
        h.tick();
        assert!(h.liveness().0);
    }
}
