//! The worker: an intake loop (`intake.rs`) and one pipeline per message (`pipeline.rs`, with the
//! handler call in `call.rs`), read top to bottom.
//!
//! receive (lease) -> decode + validate -> idempotency claim -> circuit breaker -> handler
//! (timeout, short immediate retries, panics caught) -> classify -> complete or release the
//! record -> settle on the broker -> metrics and span. The record is completed before the
//! ack: a crash between the two redelivers a message whose record says completed, and the
//! handler is not run again. docs/architecture.md has the picture.

mod call;
mod intake;
mod pipeline;

use std::sync::Arc;

pub(crate) use self::call::Handle;
pub use self::intake::RunOptions;
#[cfg(feature = "lambda")]
pub(crate) use self::pipeline::Budget;
use crate::{
    breaker::{BreakerState, CircuitBreaker},
    config::Settings,
    handler::HandlerError,
    job::Job,
    ratelimit::RateLimiter,
    retry::RetryPolicy,
    store::front::StoreFront,
    telemetry::{health::Health, Metrics},
    transport::AnyTransport,
};

/// Everything a worker needs, built once at start-up (`Function::build`, `run`, Lambda mode).
pub struct Runtime {
    pub(crate) function: String,
    pub(crate) settings: Settings,
    pub(crate) transport: AnyTransport,
    pub(crate) store: Option<StoreFront>,
    pub(crate) job: Arc<dyn Job>,
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
}

impl Runtime {
    pub(crate) fn new(p: Parts) -> Self {
        Runtime {
            policy: RetryPolicy::new(p.settings.retry.clone()),
            breaker: CircuitBreaker::new(p.settings.breaker.clone()),
            limiter: RateLimiter::new(&p.settings.rate_limit),
            function: p.function,
            settings: p.settings,
            transport: p.transport,
            store: p.store,
            job: p.job,
            schema_versions: p.schema_versions,
            metrics: Metrics::default(),
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

    /// Runs the handler once on a body (the `invoke` command): no receive, no idempotency
    /// record, no immediate retries, no settling. The handler's own effects are real.
    pub async fn invoke(&self, body: &[u8]) -> Result<Vec<u8>, HandlerError> {
        self.handle().invoke(body).await
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
