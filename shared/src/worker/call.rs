//! Calling the handler: a fresh timeout per try, short immediate retries in the slot,
//! panics caught and counted; and the lease keeper that extends the message and the claim
//! while it runs.

use std::{
    panic::AssertUnwindSafe,
    sync::Arc,
    time::{Duration, Instant},
};

use futures_util::FutureExt;
use tokio_util::sync::CancellationToken;

use super::{
    pipeline::{Budget, HeldClaim, Verdict},
    Runtime,
};
use crate::{
    config::Settings,
    handler::{Effects, ErrorKind, HandlerError},
    job::{CallInfo, Input, Job},
    message::{check_input, header, Delivery, Rejection},
    telemetry::{inc, HandlerScope, Metrics},
    transport::Transport,
    workflow::Workflow,
};

impl Runtime {
    /// The handler-calling parts of this runtime.
    pub(super) fn handle(&self) -> Handle<'_> {
        self.handle_with(&*self.job)
    }

    /// The handler-calling parts, with `job` (the handler or the compensation).
    pub(super) fn handle_with<'a>(&'a self, job: &'a dyn Job) -> Handle<'a> {
        Handle {
            job,
            settings: &self.settings,
            schema_versions: &self.schema_versions,
            metrics: &self.metrics,
        }
    }

    /// Calls the handler with a fresh timeout per try, retrying short waits in the slot.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn call_handler(
        &self,
        job: &dyn Job,
        d: &Delivery,
        input: Input,
        key: &str,
        cancel: &CancellationToken,
        effects: &crate::handler::Effects,
        budget: &Budget,
        wf: Option<&Arc<Workflow>>,
    ) -> std::result::Result<Vec<u8>, HandlerError> {
        let mut input = Some(input);
        let mut tries = 0;
        loop {
            let this = match input.take() {
                Some(i) => i,
                // The first try consumed the decoded input: decode again for the next.
                None => self
                    .handle_with(job)
                    .decode(d)
                    .map_err(|(_, r)| HandlerError::permanent(r))?,
            };
            if let Some(wf) = wf {
                // What a failed try set is forgotten.
                wf.reset();
            }
            let result = self
                .handle_with(job)
                .call_once(
                    d,
                    this,
                    key,
                    cancel,
                    effects,
                    budget.handler_timeout,
                    wf.cloned(),
                )
                .await;
            let err = match result {
                Ok(out) => return Ok(out),
                Err(e) => e,
            };
            // A failed try's writes are undone before anything else happens.
            effects.rollback().await;
            let wait = match err.kind {
                ErrorKind::Transient => Some(self.policy.immediate_delay(tries + 1)),
                ErrorKind::RetryAfter(w) if w <= self.policy.max_in_slot_wait() => Some(w),
                _ => None,
            };
            match wait {
                Some(w) if tries < self.policy.immediate_retries() && !cancel.is_cancelled() => {
                    tries += 1;
                    inc(&self.metrics.immediate_retries);
                    tracing::debug!(error = %err, wait = ?w, try_ = tries, "immediate retry");
                    tokio::select! {
                        _ = tokio::time::sleep(w) => {}
                        _ = cancel.cancelled() => return Err(err),
                    }
                }
                _ => return Err(err),
            }
        }
    }

    /// Extends the message lease (and the idempotency lease with it) while the pipeline runs.
    /// Returns only when the lease is lost, after cancelling the handler's context.
    pub(super) async fn keep_lease(
        &self,
        d: &Delivery,
        held: &HeldClaim,
        cancel: &CancellationToken,
    ) -> Verdict {
        let lease = self.settings.transport.lease;
        // Extend at a third of the lease, so two extensions can fail before it runs out.
        let every = lease / 3;
        loop {
            tokio::time::sleep(every).await;
            if let Err(e) = self.transport.extend(d, lease).await {
                tracing::warn!(error = %e.report(), "lost the message lease; cancelling the handler");
                cancel.cancel();
                break;
            }
            let claim = held.lock().clone();
            if let (Some(store), Some((key, _, token))) = (&self.store, claim) {
                if let Err(e) = store.extend(&key, token, lease).await {
                    tracing::warn!(error = %e.report(), "lost the idempotency lease; cancelling the handler");
                    cancel.cancel();
                    break;
                }
            }
        }
        // Let the handler observe the cancellation and return; decide() then abandons.
        std::future::pending().await
    }
}

/// What one handler call needs: the runtime's parts, or those `invoke` opens (no transport,
/// no store).
pub(crate) struct Handle<'a> {
    pub(crate) job: &'a dyn Job,
    pub(crate) settings: &'a Settings,
    pub(crate) schema_versions: &'a [String],
    pub(crate) metrics: &'a Metrics,
}

impl Handle<'_> {
    /// Decodes and validates; on failure returns (label, reason).
    pub(crate) fn decode(&self, d: &Delivery) -> Result<Input, Rejection> {
        // The transport found the message malformed (its envelope or a header).
        if let Some((label, reason)) = &d.defect {
            return Err((label, reason.clone()));
        }
        check_input(&d.body, &d.headers, &self.settings.limits)?;
        if let Some(default) = self.schema_versions.first() {
            // A message without the header is taken as the first (default) version.
            let v = d.headers.get(header::SCHEMA_VERSION).unwrap_or(default);
            if !self.schema_versions.contains(v) {
                return Err((
                    "unsupported schema version",
                    format!(
                        "schema-version {v:?} is not accepted (accepted: {})",
                        self.schema_versions.join(", ")
                    ),
                ));
            }
        }
        self.job.decode(&d.body)
    }

    /// Runs the handler once on a body (the `invoke` command): no receive, no idempotency
    /// record, no immediate retries, no settling. The handler's own effects are real.
    pub(crate) async fn invoke(&self, body: &[u8]) -> Result<Vec<u8>, HandlerError> {
        let d = Delivery::detached(
            uuid::Uuid::new_v4().to_string(),
            body.to_vec(),
            Default::default(),
        );
        let input = self
            .decode(&d)
            .map_err(|(_, reason)| HandlerError::permanent(reason))?;
        let key = self.job.key(&input).unwrap_or_else(|| d.id.clone());
        // Once: no immediate retries, so a failure shows as it happened.
        let timeout = self.settings.worker.handler_timeout;
        self.call_once(
            &d,
            input,
            &key,
            &CancellationToken::new(),
            &Effects::default(),
            timeout,
            None,
        )
        .await
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn call_once(
        &self,
        d: &Delivery,
        input: Input,
        key: &str,
        cancel: &CancellationToken,
        effects: &crate::handler::Effects,
        timeout: Duration,
        workflow: Option<Arc<Workflow>>,
    ) -> std::result::Result<Vec<u8>, HandlerError> {
        let info = CallInfo {
            workflow,
            message_id: d.id.clone(),
            attempt: d.attempt,
            headers: d.headers.clone(),
            deadline: Instant::now() + timeout,
            idempotency_key: key.to_owned(),
            cancel: cancel.clone(),
            effects: effects.clone(),
        };
        #[cfg(feature = "faults")]
        let fault = &self.settings.fault;
        let call = async {
            #[cfg(feature = "faults")]
            {
                if !fault.latency.is_zero() {
                    tokio::time::sleep(fault.latency).await;
                }
                if fault.panic_rate > 0.0 && rand::random::<f64>() < fault.panic_rate {
                    panic!("injected panic (fault.panic_rate)");
                }
                if d.attempt <= fault.fail_first {
                    return Err(HandlerError::transient(format!(
                        "injected failure of delivery {} (fault.fail_first = {})",
                        d.attempt, fault.fail_first
                    )));
                }
                if fault.failure_rate > 0.0 && rand::random::<f64>() < fault.failure_rate {
                    return Err(HandlerError::transient(
                        "injected failure (fault.failure_rate)",
                    ));
                }
            }
            self.job.call(input, info).await
        };
        let call = HandlerScope(Box::pin(call));
        let started = Instant::now();
        let result = tokio::time::timeout(timeout, AssertUnwindSafe(call).catch_unwind()).await;
        // Every try, whatever its end: a timeout's or a panic's time is time the handler took.
        self.metrics.handler_duration.observe(started.elapsed());
        match result {
            Err(_) => Err(HandlerError::transient(format!(
                "handler timed out after {timeout:?}"
            ))),
            Ok(Err(panic)) => {
                inc(&self.metrics.panics);
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "non-string panic payload".into());
                Err(HandlerError::transient(format!("handler panicked: {what}")))
            }
            Ok(Ok(result)) => result,
        }
    }
}
