//! The pipeline of one message: decide (decode, key, claim, breaker, handler, classify)
//! without touching the broker, then settle with exactly one broker call.

use std::{
    sync::atomic::{AtomicBool, Ordering::Relaxed},
    time::{Duration, Instant, SystemTime},
};

use tokio_util::sync::CancellationToken;
use tracing::Instrument;

pub(super) use super::verdict::{dead_letter, Verdict};
use super::Runtime;
use crate::{
    breaker::Admission,
    envelope::{Failure, FailureClass},
    error::Error,
    handler::ErrorKind,
    job::Input,
    message::{header, Delivery},
    store::{check_key, fingerprint, Claim, Token},
    sync::Mutex,
    telemetry::{trace, ErrorClass, Outcome},
    transport::Transport,
};

/// After shutdown grace, how long a cancelled handler may take to return before its message
/// is put back regardless.
const CANCEL_GRACE: Duration = Duration::from_secs(1);

/// Cuts a decision short: tells the handler, gives it [`CANCEL_GRACE`] to return, and puts the
/// message back when it doesn't (or gave up).
async fn cut_short(
    cancel: &CancellationToken,
    decide: std::pin::Pin<&mut impl std::future::Future<Output = Verdict>>,
) -> Verdict {
    cancel.cancel();
    match tokio::time::timeout(CANCEL_GRACE, decide).await {
        Ok(Verdict::Abandon) | Err(_) => Verdict::Release,
        Ok(v) => v,
    }
}

/// First look again at a key another delivery holds; the interval doubles from here.
const IN_PROGRESS_FIRST_LOOK: Duration = Duration::from_millis(50);

/// Time limits of one delivery: from the settings in container mode; from the invocation's
/// remaining time in Lambda mode, so a timed-out invocation never leaves a claim held longer
/// than the invocation could run.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Budget {
    /// Lease of the idempotency claim.
    pub(crate) claim_lease: Duration,
    /// Timeout of each handler try.
    pub(crate) handler_timeout: Duration,
}

/// A delivery decoded and keyed, before its claim.
pub(super) struct Prepared {
    input: Input,
    key: String,
    /// The workflow step it is, when it carries a routing slip.
    step: Option<super::flow::StepIn>,
}

/// The idempotency claim held while the handler runs (shared with the lease keeper):
/// key, payload fingerprint, fencing token.
pub(super) type HeldClaim = Mutex<Option<(String, String, Token)>>;

impl Runtime {
    /// The `process <queue>` span of one delivery (`telemetry::trace`), created with every
    /// field it has: recording a field later re-formats all of the span's fields in JSON logs
    /// (about 2 us a record in `just bench rabbitmq`). The outcome is therefore a field of the
    /// settling log line, and of the span only while spans are exported. `key` is `None` when
    /// the message was rejected before it had one.
    fn span(&self, d: &Delivery, key: Option<&str>) -> tracing::Span {
        trace::process_span(
            trace::messaging_system(self.settings.transport.kind),
            &self.function,
            &self.settings.queue,
            d,
            key,
        )
    }

    /// Steps 1 and 2 of the pipeline, before the span opens: decode and validate (bad input
    /// is permanent and keeps its bytes), then the idempotency key: a workflow step's own
    /// (tracking id, step, direction), else the header, else derived from the payload, else
    /// the message id.
    fn prepare(&self, d: &Delivery) -> std::result::Result<Prepared, Verdict> {
        let step = self.read_slip(d)?;
        let job = match &step {
            Some(s) if s.compensating() => match &self.compensation {
                Some(job) => &**job,
                None => {
                    return Err(dead_letter(
                        FailureClass::Permanent,
                        "no compensation",
                        format!(
                            "workflow {} ({}) asks {} to compensate step {:?}, but the function declares no compensation (Function::compensate)",
                            s.slip.workflow,
                            s.slip.id,
                            self.function,
                            s.slip.current_step().unwrap_or_default()
                        ),
                    ))
                }
            },
            _ => &*self.job,
        };
        let input = match self.handle_with(job).decode(d) {
            Ok(input) => input,
            Err((label, reason)) => {
                return Err(dead_letter(FailureClass::Permanent, label, reason))
            }
        };
        if let Some(step) = step {
            let key = step.slip.key();
            return Ok(Prepared {
                input,
                key,
                step: Some(step),
            });
        }
        let key = match d.headers.get(header::IDEMPOTENCY_KEY) {
            Some(k) => k.clone(),
            None => match self.job.key(&input) {
                Some(k) => k,
                None if self.settings.limits.require_idempotency_key => {
                    return Err(dead_letter(
                        FailureClass::Permanent,
                        "missing idempotency key",
                        "the idempotency-key header is required (limits.require_idempotency_key)",
                    ))
                }
                None => d.id.clone(),
            },
        };
        // A key no store can hold is the producer's (or the key function's) error, not a
        // store outage: bad input, at once.
        if let Err(e) = check_key(&key) {
            return Err(dead_letter(
                FailureClass::Permanent,
                "bad idempotency key",
                e.to_string(),
            ));
        }
        Ok(Prepared {
            input,
            key,
            step: None,
        })
    }

    /// The pipeline for one delivery, in its own span.
    /// `probe`: the intake loop reserved the breaker's half-open probe for this message.
    pub(crate) async fn process(
        &self,
        mut d: Delivery,
        hard_stop: &CancellationToken,
        probe: bool,
    ) {
        let started = Instant::now();
        let prepared = self.prepare(&d);
        let span = self.span(&d, prepared.as_ref().ok().map(|p| p.key.as_str()));
        trace::connect(&span, &mut d, trace::Parent::Creation);
        async {
            self.metrics.on_receive(d.waited(SystemTime::now()));
            self.metrics.in_flight.fetch_add(1, Relaxed);
            let held: HeldClaim = Mutex::new(None);
            let cancel = CancellationToken::new();
            // True while this message holds the breaker's probe without having given it a
            // verdict; a probe that ends without one (bad input, duplicate) is handed back.
            let probe = AtomicBool::new(probe);
            let budget = self.budget();
            let decide = self.decide(&d, prepared, &held, &cancel, &probe, &budget);
            tokio::pin!(decide);
            // Biased, the pipeline first: a message decided in its first poll (a quick
            // handler) then never arms the lease keeper's timer or registers with hard_stop.
            let verdict = tokio::select! {
                biased;
                v = &mut decide => v,
                v = self.keep_lease(&d, &held, &cancel) => v,
                // Shutdown is past grace.
                _ = hard_stop.cancelled() => cut_short(&cancel, decide.as_mut()).await,
            };
            self.undo_unsettled(&verdict, &held, &probe).await;
            self.settle(&d, verdict).await;
            self.metrics.in_flight.fetch_sub(1, Relaxed);
            self.metrics.observe(started.elapsed());
        }
        .instrument(span)
        .await
    }

    /// What a decision leaves behind, undone: the idempotency claim of a message going back
    /// to the queue, and the breaker's probe when this message held it but no outcome reached
    /// the breaker.
    async fn undo_unsettled(&self, verdict: &Verdict, held: &HeldClaim, probe: &AtomicBool) {
        if matches!(verdict, Verdict::Release) {
            self.release_claim(held).await;
        }
        if probe.load(Relaxed) {
            self.breaker.probe_abandoned();
        }
    }

    /// The pipeline for one record of a Lambda invocation: the same decision as
    /// [`Runtime::process`], settled the Lambda way. Returns whether the record must be
    /// reported in `batchItemFailures` (Lambda then leaves it to its visibility timeout).
    ///
    /// - done or duplicate: not reported (Lambda deletes it);
    /// - retry after d: `retry_after` first (a delayed copy on standard SQS queues, the
    ///   original's visibility set to d on FIFO queues); reported only when the original stays;
    /// - dead letter: sent to the DLQ with its history, not reported;
    /// - out of time or lease lost, or any settle that failed: reported.
    #[cfg(feature = "lambda")]
    pub(crate) async fn process_record(
        &self,
        mut d: Delivery,
        budget: Budget,
        retry_keeps_original: bool,
    ) -> RecordOutcome {
        let started = Instant::now();
        let prepared = self.prepare(&d);
        let span = self.span(&d, prepared.as_ref().ok().map(|p| p.key.as_str()));
        // One invocation, records of many traces: each record's span is the invocation's
        // child and links to its own creation context.
        trace::connect(&span, &mut d, trace::Parent::Current);
        async {
            self.metrics.on_receive(d.waited(SystemTime::now()));
            let held: HeldClaim = Mutex::new(None);
            let cancel = CancellationToken::new();
            let probe = AtomicBool::new(false);
            let decide = self.decide(&d, prepared, &held, &cancel, &probe, &budget);
            tokio::pin!(decide);
            let verdict = tokio::select! {
                v = &mut decide => v,
                // The invocation's time is up.
                _ = tokio::time::sleep(budget.claim_lease) => cut_short(&cancel, decide.as_mut()).await,
            };
            self.undo_unsettled(&verdict, &held, &probe).await;
            let outcome = match &verdict {
                Verdict::Ack { duplicate } => {
                    let outcome = if *duplicate {
                        Outcome::Duplicate
                    } else {
                        Outcome::Succeeded
                    };
                    self.metrics.settled(outcome, ErrorClass::None);
                    trace::record_outcome(&tracing::Span::current(), outcome.as_str(), None);
                    tracing::debug!(outcome = outcome.as_str(), "settled");
                    if *duplicate {
                        RecordOutcome::Duplicate
                    } else {
                        RecordOutcome::Succeeded
                    }
                }
                Verdict::Release | Verdict::Abandon => {
                    trace::record_outcome(&tracing::Span::current(), "returned", None);
                    tracing::info!(outcome = "returned", "left to the visibility timeout");
                    RecordOutcome::Returned
                }
                Verdict::Retry { .. } | Verdict::DeadLetter { .. } => {
                    let retry = matches!(verdict, Verdict::Retry { .. });
                    match (self.settle(&d, verdict).await, retry) {
                        (false, _) => RecordOutcome::Returned,
                        (true, true) => RecordOutcome::Retried {
                            reported: retry_keeps_original,
                        },
                        (true, false) => RecordOutcome::DeadLettered,
                    }
                }
            };
            self.metrics.observe(started.elapsed());
            outcome
        }
        .instrument(span)
        .await
    }

    /// Decides what happens to the message. Does not touch the broker.
    async fn decide(
        &self,
        d: &Delivery,
        prepared: std::result::Result<Prepared, Verdict>,
        held: &HeldClaim,
        cancel: &CancellationToken,
        probe: &AtomicBool,
        budget: &Budget,
    ) -> Verdict {
        // 1 and 2. Decoded and keyed by `prepare`.
        let Prepared { input, key, step } = match prepared {
            Ok(prepared) => prepared,
            Err(rejected) => return rejected,
        };
        let step = step.as_ref();

        // 3. Claim the record.
        if let Some(store) = &self.store {
            let lease = budget.claim_lease;
            let fp = fingerprint(&d.body);
            // Time spent in this slot waiting for another delivery of the key to finish.
            let mut waited = Duration::ZERO;
            let mut nap = IN_PROGRESS_FIRST_LOOK;
            loop {
                match store.claim(&key, &fp, lease).await {
                    Ok(Claim::Acquired(token)) => {
                        *held.lock() = Some((key.clone(), fp, token));
                        break;
                    }
                    Ok(Claim::Completed(stored)) => {
                        return match step {
                            Some(step) => self.replay(d, step, &stored).await,
                            None => Verdict::Ack { duplicate: true },
                        }
                    }
                    Ok(Claim::InProgress(remaining)) => {
                        // Nothing failed: another delivery holds the key. Wait for it here
                        // first, where waiting uses up no delivery (the transports count every
                        // delivery, and their crash-loop guards too), for at most
                        // retry.max_in_slot_wait, looking again at a growing interval.
                        let left = self.policy.max_in_slot_wait().saturating_sub(waited);
                        if !left.is_zero() {
                            // Never past the end of the other claim: it frees the key then.
                            let this = nap.min(left).min(remaining.max(IN_PROGRESS_FIRST_LOOK));
                            tokio::select! {
                                _ = tokio::time::sleep(this) => {}
                                _ = cancel.cancelled() => return Verdict::Abandon,
                            }
                            waited += this;
                            nap *= 2;
                            continue;
                        }
                        // A long-running original: come back when its claim runs out (a live
                        // one extends it, a dead one frees the key then), not on the short
                        // backoff, so that a slow original uses up one delivery of the
                        // duplicate per claim lease rather than one per backoff step.
                        let delay = remaining.max(IN_PROGRESS_FIRST_LOOK);
                        return self.retry_or_give_up(
                            d,
                            delay,
                            format!(
                                "another delivery of this key was still in progress after {waited:?}"
                            ),
                        );
                    }
                    Ok(Claim::FingerprintMismatch) => {
                        return dead_letter(
                            FailureClass::Permanent,
                            "idempotency key reused",
                            format!(
                                "idempotency key {key:?} was already used with a different payload"
                            ),
                        )
                    }
                    Err(e) if self.settings.store.fail_open => {
                        tracing::warn!(error = %e.report(), "idempotency store unavailable; running UNCLAIMED (store.fail_open = true)");
                        break;
                    }
                    Err(e) => {
                        // Fail closed: the handler never runs unclaimed.
                        let delay = self.policy.delayed_retry(d.attempt);
                        return self.retry_or_give_up(
                            d,
                            delay,
                            format!("idempotency store unavailable: {}", e.report()),
                        );
                    }
                }
            }
        }

        // 4. Circuit breaker: a message held while the breaker is open waits here, its lease
        //    kept alive by the lease keeper, until a probe has closed the breaker again.
        while !probe.load(Relaxed) {
            match self.breaker.admit() {
                Admission::Allow => break,
                Admission::Probe => probe.store(true, Relaxed),
                Admission::Wait(w) => {
                    tokio::select! {
                        _ = tokio::time::sleep(w.min(Duration::from_millis(250))) => {}
                        _ = cancel.cancelled() => {
                            self.release_claim(held).await;
                            return Verdict::Abandon;
                        }
                    }
                }
            }
        }

        // A workflow step past its deadline (its own or the workflow's) fails for good without
        // running: the workflow compensates.
        if let Some(step) = step.filter(|s| !s.compensating()) {
            if let Some(reason) = step.slip.overdue(SystemTime::now()) {
                probe.store(false, Relaxed);
                let claim = held.lock().take();
                let verdict =
                    dead_letter(FailureClass::Permanent, "workflow deadline passed", reason);
                return self.fault(d, step, claim, verdict).await;
            }
        }

        // 5. The handler, with timeout, immediate retries and panics caught.
        let effects = self.effects();
        let job = match step {
            Some(s) if s.compensating() => self.compensation.as_deref().unwrap_or(&*self.job),
            _ => &*self.job,
        };
        let wf = step.map(|s| &s.wf);
        let result = self
            .call_handler(job, d, input, &key, cancel, &effects, budget, wf)
            .await;
        if cancel.is_cancelled() && result.is_err() {
            self.release_claim(held).await;
            return Verdict::Abandon;
        }
        // The outcome below is the breaker's verdict on the probe, if this was one.
        probe.store(false, Relaxed);

        // 6. Classify, and record the outcome before settling on the broker.
        match result {
            Ok(output) => {
                #[cfg(feature = "faults")]
                {
                    let crash_rate = self.settings.fault.crash_rate;
                    if crash_rate > 0.0 && rand::random::<f64>() < crash_rate {
                        // fault.crash_rate: die between the effect and its record/ack, as a
                        // killed worker would (abort: no destructor, no settle, no flush).
                        tracing::error!("injected crash after the handler (fault.crash_rate)");
                        std::process::abort();
                    }
                }
                self.breaker.on_success();
                let claim = held.lock().take();
                if let Some(step) = step {
                    return self.step_succeeded(d, step, claim, &output, &effects).await;
                }
                #[cfg(feature = "postgres")]
                if let Some(tx) = effects.take().await {
                    return self.commit_effects(d, tx, claim, &output).await;
                }
                if let (Some(store), Some((key, fp, token))) = (&self.store, claim) {
                    if let Err(e) = store
                        .complete(&key, &fp, token, &output, self.settings.store.ttl)
                        .await
                    {
                        // The effect happened; acking is right. A duplicate arriving later may
                        // run again, which the downstream's idempotency key must absorb.
                        tracing::error!(error = %e.report(), "could not complete the idempotency record");
                    }
                }
                Verdict::Ack { duplicate: false }
            }
            Err(e) => {
                // Only transient failures (errors, timeouts, panics) say the downstream is
                // unwell. A permanent error is an answer; a RetryAfter is a downstream pacing
                // us, which the delay already honours: neither opens the breaker.
                match e.kind {
                    ErrorKind::Transient => self.breaker.on_failure(),
                    ErrorKind::Permanent | ErrorKind::RetryAfter(_) => self.breaker.on_success(),
                }
                let verdict = match e.kind {
                    ErrorKind::Permanent => dead_letter(
                        FailureClass::Permanent,
                        "rejected by the handler",
                        e.message,
                    ),
                    ErrorKind::Transient => {
                        self.retry_or_give_up(d, self.policy.delayed_retry(d.attempt), e.message)
                    }
                    ErrorKind::RetryAfter(delay) => {
                        self.retry_or_give_up(d, delay, e.message).paced()
                    }
                };
                // A workflow step that failed for good turns the workflow to compensation
                // (its claim completed with the fault); a compensation that did is reported.
                if let (Some(step), Verdict::DeadLetter { .. }) = (step, &verdict) {
                    let claim = held.lock().take();
                    return if step.compensating() {
                        self.compensation_failed(step, claim, verdict).await
                    } else {
                        self.fault(d, step, claim, verdict).await
                    };
                }
                self.release_claim(held).await;
                verdict
            }
        }
    }

    /// Container mode: the claim lives as long as the message lease, each try as long as the
    /// handler timeout.
    pub(crate) fn budget(&self) -> Budget {
        Budget {
            claim_lease: self.settings.transport.lease,
            handler_timeout: self.settings.worker.handler_timeout,
        }
    }

    /// The effects slot for one message: armed when the store is PostgreSQL.
    fn effects(&self) -> crate::handler::Effects {
        #[cfg(feature = "postgres")]
        if let Some(crate::store::AnyStore::Postgres(pg)) = self.store.as_ref().map(|s| s.store()) {
            return crate::handler::Effects {
                pg: Some((pg.clone(), std::sync::Arc::default())),
            };
        }
        crate::handler::Effects::default()
    }

    /// Commits the handler's effects together with the record's completion: both or neither.
    #[cfg(feature = "postgres")]
    pub(super) async fn commit_effects(
        &self,
        d: &Delivery,
        tx: crate::store::postgres::PgEffects,
        claim: Option<(String, String, Token)>,
        output: &[u8],
    ) -> Verdict {
        let Some((key, fp, token)) = claim else {
            // Unclaimed (store.fail_open while the store was down): effects without a record
            // would break exactly-once, so undo them and try again later.
            let _ = tx.rollback().await;
            let delay = self.policy.delayed_retry(d.attempt);
            return self.retry_or_give_up(d, delay, "effects need an idempotency claim".into());
        };
        match tx
            .commit_with_complete(&key, token, output, self.settings.store.ttl)
            .await
        {
            Ok(()) => {
                if let Some(store) = &self.store {
                    store.remember(&key, &fp, output);
                }
                Verdict::Ack { duplicate: false }
            }
            Err(Error::StaleToken(_)) => {
                // Another worker took the record over: our effects were rolled back, and the
                // message is theirs now.
                tracing::warn!("record taken over by another worker; effects rolled back");
                Verdict::Abandon
            }
            Err(e) => {
                // All or nothing: the next delivery replays the stored output or runs again
                // on untouched data.
                self.release_claim_of(&key, token).await;
                let delay = self.policy.delayed_retry(d.attempt);
                self.retry_or_give_up(
                    d,
                    delay,
                    format!("committing the effects failed: {}", e.report()),
                )
            }
        }
    }

    /// A delayed retry, or the dead-letter queue once the deliveries are used up.
    pub(super) fn retry_or_give_up(
        &self,
        d: &Delivery,
        delay: Duration,
        reason: String,
    ) -> Verdict {
        if d.attempt >= self.policy.max_deliveries() {
            let reason = format!("gave up after {} deliveries: {reason}", d.attempt);
            return dead_letter(FailureClass::Transient, "retries exhausted", reason);
        }
        Verdict::Retry {
            delay,
            failure: Failure::now(FailureClass::Transient, reason),
            paced: false,
        }
    }

    #[cfg(feature = "postgres")]
    async fn release_claim_of(&self, key: &str, token: Token) {
        if let Some(store) = &self.store {
            if let Err(e) = store.release(key, token).await {
                tracing::warn!(error = %e.report(), "could not release the idempotency record; it frees itself when its lease ends");
            }
        }
    }

    pub(super) async fn release_claim(&self, held: &HeldClaim) {
        let claim = held.lock().take();
        if let (Some(store), Some((key, _, token))) = (&self.store, claim) {
            if let Err(e) = store.release(&key, token).await {
                tracing::warn!(error = %e.report(), "could not release the idempotency record; it frees itself when its lease ends");
            }
        }
    }

    /// Settles on the broker and counts; false when the broker call failed.
    async fn settle(&self, d: &Delivery, verdict: Verdict) -> bool {
        let (outcome, result) = match &verdict {
            Verdict::Ack { duplicate } => {
                let r = self.transport.ack(d).await;
                let outcome = if *duplicate {
                    Outcome::Duplicate
                } else {
                    Outcome::Succeeded
                };
                if r.is_ok() {
                    self.metrics.settled(outcome, ErrorClass::None);
                    trace::record_outcome(&tracing::Span::current(), outcome.as_str(), None);
                }
                (outcome.as_str(), r)
            }
            Verdict::Retry {
                delay,
                failure,
                paced,
            } => {
                let r = self.transport.retry_after(d, *delay, failure).await;
                if r.is_ok() {
                    let class = if *paced {
                        ErrorClass::RetryAfter
                    } else {
                        ErrorClass::Transient
                    };
                    self.metrics.settled(Outcome::Retried, class);
                    trace::record_outcome(
                        &tracing::Span::current(),
                        "retried",
                        Some((class.as_str(), class.as_str())),
                    );
                    tracing::info!(outcome = "retried", delay = ?delay, reason = %failure.reason, "retry scheduled");
                }
                ("retried", r)
            }
            Verdict::DeadLetter { failure, label } => {
                let r = self.transport.dead_letter(d, failure).await;
                if r.is_ok() {
                    self.metrics.dead_lettered(failure.class, label);
                    trace::record_outcome(
                        &tracing::Span::current(),
                        "dead_lettered",
                        Some((failure.class.as_str(), &error_type(label))),
                    );
                    tracing::warn!(outcome = "dead_lettered", class = failure.class.as_str(), reason = %failure.reason, "dead-lettered");
                }
                ("dead_lettered", r)
            }
            Verdict::Release => {
                let r = self.transport.release(d).await;
                if r.is_ok() {
                    self.metrics.settled(Outcome::Released, ErrorClass::None);
                    trace::record_outcome(&tracing::Span::current(), "released", None);
                }
                ("released", r)
            }
            Verdict::Abandon => ("abandoned", Ok(())),
        };
        match result {
            Ok(()) => {
                tracing::debug!(outcome, "settled");
                true
            }
            Err(Error::LeaseLost(_)) => {
                tracing::warn!(
                    outcome,
                    "lease lost before settling: the message was redelivered; idempotency absorbs the duplicate"
                );
                false
            }
            Err(e) => {
                tracing::error!(outcome, error = %e.report(), "settling failed; the message returns when its lease ends");
                false
            }
        }
    }
}

/// `error.type` of a dead-lettered delivery: its reason label (the `reason` label of
/// `sluice_dead_letters_total`, a fixed set) as one snake_case word: `retries_exhausted`,
/// `rejected_by_the_handler`, `malformed_envelope`, ...
fn error_type(label: &str) -> String {
    label.replace([' ', '-'], "_")
}

/// How one record of a Lambda invocation ended (its part of the invocation's EMF document).
#[cfg(feature = "lambda")]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RecordOutcome {
    /// Done; Lambda deletes it.
    Succeeded,
    /// Already done; Lambda deletes it.
    Duplicate,
    /// To be tried again: a delayed copy replaced it, or (`reported`, FIFO) its own
    /// visibility was set to the delay and it is reported in `batchItemFailures`.
    Retried { reported: bool },
    /// Sent to the DLQ; Lambda deletes it.
    DeadLettered,
    /// Reported, left to the visibility timeout: out of time, lease lost, or a settle failed.
    Returned,
}

#[cfg(feature = "lambda")]
impl RecordOutcome {
    /// Whether the record goes into `batchItemFailures`.
    pub(crate) fn reported(self) -> bool {
        matches!(
            self,
            RecordOutcome::Retried { reported: true } | RecordOutcome::Returned
        )
    }
}
