//! The worker: an intake loop (`intake.rs`) and one pipeline per message (`pipeline.rs`, with the
//! handler call in `call.rs`), read top to bottom.
//!
//! receive (lease) -> decode + validate -> idempotency claim -> circuit breaker -> handler
//! (timeout, short immediate retries, panics caught) -> classify -> complete or release the
//! record -> settle on the broker -> metrics and span. The record is completed before the
//! ack: a crash between the two redelivers a message whose record says completed, and the
//! handler is not run again. docs/architecture.md has the picture.

mod call;
mod flow;
mod intake;
mod pipeline;
mod verdict;

use std::sync::Arc;

pub(crate) use self::call::Handle;
pub use self::intake::RunOptions;
#[cfg(feature = "lambda")]
pub(crate) use self::pipeline::{Budget, RecordOutcome};
use crate::{
    breaker::{BreakerState, CircuitBreaker},
    config::Settings,
    handler::HandlerError,
    job::Job,
    ratelimit::RateLimiter,
    retry::RetryPolicy,
    store::front::StoreFront,
    telemetry::{health::Health, Labels, Metrics},
    transport::{AnyTransport, Purpose, Transport},
};

/// Everything a worker needs, built once at start-up (`Function::build`, `run`, Lambda mode).
pub struct Runtime {
    pub(crate) function: String,
    pub(crate) settings: Settings,
    pub(crate) transport: AnyTransport,
    pub(crate) store: Option<StoreFront>,
    pub(crate) job: Arc<dyn Job>,
    /// The compensation of this function's workflow step (`Function::compensate`).
    pub(crate) compensation: Option<Arc<dyn Job>>,
    /// Handles on the queues slips are forwarded to, opened on first use.
    pub(crate) outboxes: flow::Outboxes,
    /// What the transport was opened for: the outboxes are opened the same way.
    pub(crate) purpose: Purpose,
    pub(crate) schema_versions: Vec<String>,
    pub(crate) policy: RetryPolicy,
    pub(crate) breaker: CircuitBreaker,
    pub(crate) limiter: Option<RateLimiter>,
    /// Counters of this process.
    pub metrics: Metrics,
    pub(crate) health: Arc<Health>,
}

/// What a runtime is built from.
pub(crate) struct Parts {
    pub(crate) function: String,
    pub(crate) schema_versions: Vec<String>,
    pub(crate) health: Arc<Health>,
    pub(crate) settings: Settings,
    pub(crate) transport: AnyTransport,
    pub(crate) store: Option<StoreFront>,
    pub(crate) job: Arc<dyn Job>,
    pub(crate) compensation: Option<Arc<dyn Job>>,
    pub(crate) purpose: Purpose,
}

impl Runtime {
    pub(crate) fn new(p: Parts) -> Self {
        let labels = Labels {
            function: p.function.clone(),
            queue: p.settings.queue.clone(),
            version: p.settings.telemetry.version.clone(),
        };
        Runtime {
            policy: RetryPolicy::new(p.settings.retry.clone()),
            breaker: CircuitBreaker::new(p.settings.breaker.clone()),
            limiter: RateLimiter::new(&p.settings.rate_limit),
            function: p.function,
            settings: p.settings,
            transport: p.transport,
            store: p.store,
            job: p.job,
            compensation: p.compensation,
            outboxes: flow::Outboxes::default(),
            purpose: p.purpose,
            schema_versions: p.schema_versions,
            metrics: Metrics::new(labels),
            health: p.health,
        }
    }

    /// The transport (for the CLI's queue commands and tests).
    pub fn transport(&self) -> &AnyTransport {
        &self.transport
    }

    /// The settings in force.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The circuit breaker's state now (the `breaker_state` gauge).
    pub fn breaker_state(&self) -> BreakerState {
        self.breaker.state()
    }

    /// Polls the queue's depths and oldest age into the metrics every
    /// `telemetry.queue_poll_interval` while the worker runs, when something serves them
    /// (`telemetry.listen`). One `stats` call a poll: a few cheap broker calls, whatever the
    /// number of messages. The task ends when the returned guard is dropped.
    pub(crate) fn spawn_queue_poller(self: &Arc<Self>) -> Option<AbortOnDrop> {
        let every = self.settings.telemetry.queue_poll_interval;
        if every.is_zero() || self.settings.telemetry.listen.is_none() {
            return None;
        }
        let rt = self.clone();
        Some(AbortOnDrop(tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                match rt.transport.stats().await {
                    Ok(s) => rt.metrics.set_queue(Some(s)),
                    Err(e) => {
                        tracing::warn!(error = %e.report(), "could not read the queue's stats for /metrics");
                        rt.metrics.set_queue(None);
                    }
                }
            }
        })))
    }

    /// Runs the handler once on a body (the `invoke` command): no receive, no idempotency
    /// record, no immediate retries, no settling. The handler's own effects are real.
    pub async fn invoke(&self, body: &[u8]) -> Result<Vec<u8>, HandlerError> {
        self.handle().invoke(body).await
    }
}

/// A task aborted when this is dropped (on every way out of `run`, errors included).
pub(crate) struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl crate::telemetry::health::Source for Runtime {
    fn function(&self) -> &str {
        &self.function
    }
    fn metrics(&self) -> &Metrics {
        &self.metrics
    }
    fn breaker(&self) -> BreakerState {
        self.breaker_state()
    }
}
