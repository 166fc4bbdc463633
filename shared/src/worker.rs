//! The worker: an intake loop and one pipeline per message, read top to bottom.
//!
//! receive (lease) -> decode + validate -> idempotency claim -> circuit breaker -> handler
//! (timeout, short immediate retries, panics caught) -> classify -> complete or release the
//! record -> settle on the broker -> metrics and span. The record is completed before the
//! ack: a crash between the two redelivers a message whose record says completed, and the
//! handler is not run again.

use std::{
    marker::PhantomData,
    panic::AssertUnwindSafe,
    sync::{
        atomic::{AtomicBool, Ordering::Relaxed},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use futures_util::FutureExt;
use rand::Rng;
use serde::de::DeserializeOwned;
use tokio::{sync::Semaphore, task::JoinSet};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::{
    breaker::{Admission, BreakerState, CircuitBreaker},
    config::Settings,
    error::{Error, Result},
    handler::{Context, ErrorKind, Handler, HandlerError},
    message::{check_envelope, header, Delivery, Failure, FailureClass},
    ratelimit::RateLimiter,
    retry::RetryPolicy,
    store::{fingerprint, front::StoreFront, Claim, Token},
    telemetry::{inc, Metrics, RunSummary},
    transport::{AnyTransport, Transport},
};

/// Most messages asked for in one receive call.
const RECEIVE_BATCH: usize = 10;

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

/// Derives the idempotency key from a decoded input.
pub type KeyFn<T> = Arc<dyn Fn(&T) -> String + Send + Sync>;

/// Everything a worker needs, built once at start-up.
pub struct Runtime<T, S, H> {
    pub(crate) function: String,
    pub(crate) settings: Settings,
    pub(crate) transport: AnyTransport,
    pub(crate) store: Option<StoreFront>,
    pub(crate) handler: H,
    pub(crate) state: Arc<S>,
    pub(crate) key_fn: Option<KeyFn<T>>,
    pub(crate) schema_versions: Vec<String>,
    pub(crate) policy: RetryPolicy,
    pub(crate) breaker: CircuitBreaker,
    pub(crate) limiter: Option<RateLimiter>,
    /// Counters of this process.
    pub metrics: Metrics,
    pub(crate) health: Arc<crate::serve::Health>,
    pub(crate) _input: PhantomData<fn() -> T>,
}

/// What the pipeline decided for one delivery.
#[derive(Debug)]
enum Verdict {
    /// Done (or a duplicate of something done): remove it.
    Ack { duplicate: bool },
    /// Deliver again later.
    Retry { delay: Duration, failure: Failure },
    /// Give up on it, with the reason; `label` groups reasons in metrics.
    DeadLetter { failure: Failure, label: String },
    /// Shutdown past grace: put it back now.
    Release,
    /// Our lease is gone; the message belongs to another consumer now.
    Abandon,
}

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

/// The idempotency claim held while the handler runs (shared with the lease keeper):
/// key, payload fingerprint, fencing token.
type HeldClaim = Mutex<Option<(String, String, Token)>>;

/// One message on its way from the intake loop to a slot task, with the slot it holds.
struct Job {
    d: Delivery,
    /// The intake loop reserved the breaker's half-open probe for it.
    probe: bool,
    permit: tokio::sync::OwnedSemaphorePermit,
}

/// Options of one `run`.
#[derive(Debug, Clone, Copy, Default)]
pub struct RunOptions {
    /// Exit once the queue is empty and nothing is in flight.
    pub drain: bool,
}

impl<T, S, H> Runtime<T, S, H>
where
    T: DeserializeOwned + Send + 'static,
    S: Send + Sync + 'static,
    H: for<'a> Handler<'a, T, S>,
{
    /// The transport (for the CLI's queue commands).
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
    pub async fn invoke(&self, body: &[u8]) -> std::result::Result<Vec<u8>, HandlerError> {
        let d = Delivery {
            id: uuid::Uuid::new_v4().to_string(),
            body: body.to_vec(),
            headers: Default::default(),
            attempt: 1,
            enqueued_at: std::time::SystemTime::now(),
            first_failure_at: None,
            receipt: String::new(),
        };
        let input = self
            .decode(&d)
            .map_err(|(_, reason)| HandlerError::permanent(reason))?;
        let key = match &self.key_fn {
            Some(f) => f(&input),
            None => d.id.clone(),
        };
        // Once: no immediate retries, so a failure shows as it happened.
        let effects = crate::handler::Effects::default();
        let timeout = self.settings.worker.handler_timeout;
        self.call_once(
            &d,
            input,
            &key,
            &CancellationToken::new(),
            &effects,
            timeout,
        )
        .await
    }

    /// Runs the intake loop until `shutdown` fires (or, with `drain`, the queue is empty),
    /// then lets in-flight messages finish within the grace period and returns the rest.
    pub async fn run(
        self: &Arc<Self>,
        opts: RunOptions,
        shutdown: CancellationToken,
    ) -> Result<RunSummary> {
        let concurrency = self.settings.worker.concurrency;
        let slots = Arc::new(Semaphore::new(concurrency));
        let hard_stop = CancellationToken::new();
        // One long-lived task per slot, fed by the intake loop through a queue: a task spawned
        // per message cost about 5 us of the pipeline's budget in `just bench rabbitmq`. The
        // semaphore still bounds the messages taken (a permit travels with each message and
        // is dropped when it is settled), so the queue never holds more than the idle tasks.
        let (feed, jobs) = tokio::sync::mpsc::unbounded_channel::<Job>();
        let jobs = Arc::new(tokio::sync::Mutex::new(jobs));
        let mut workers = JoinSet::new();
        for _ in 0..concurrency {
            let rt = self.clone();
            let jobs = jobs.clone();
            // A child token a slot: waiting on it registers with this slot's token only, not
            // with one shared by every slot.
            let hard_stop = hard_stop.child_token();
            workers.spawn(async move {
                loop {
                    let job = jobs.lock().await.recv().await;
                    let Some(Job { d, probe, permit }) = job else {
                        break;
                    };
                    // The handler's panics are caught in `call_once`; this catches the rest of
                    // the pipeline's, so that a panic costs one message, never the slot.
                    let run = AssertUnwindSafe(rt.process(d, &hard_stop, probe));
                    if run.catch_unwind().await.is_err() {
                        tracing::error!(
                            "the pipeline panicked; the message returns when its lease ends"
                        );
                    }
                    drop(permit);
                }
            });
        }
        tracing::info!(
            function = %self.function,
            queue = %self.settings.queue,
            transport = ?self.settings.transport.kind,
            store = ?self.settings.store.kind,
            concurrency,
            "worker started"
        );
        let mut transport_errors = 0u32;
        self.health.intake_started(self, &shutdown);
        while !shutdown.is_cancelled() {
            self.health.tick();
            // A free slot first: the failure that frees one may be the one that opens the
            // breaker, so the breaker is asked only once a slot is free.
            let first = tokio::select! {
                p = slots.clone().acquire_owned() => p.expect("semaphore never closed"),
                _ = shutdown.cancelled() => break,
            };
            // Open: take nothing new. Half-open: take the single probe message, and nothing
            // more until its outcome has closed or re-opened the breaker.
            let (batch, probe) = match self.breaker.admit() {
                Admission::Allow if self.limiter.is_some() => (1, false),
                Admission::Allow => (RECEIVE_BATCH, false),
                Admission::Probe => (1, true),
                Admission::Wait(w) => {
                    drop(first);
                    tokio::select! {
                        _ = tokio::time::sleep(w.min(Duration::from_millis(200))) => {}
                        _ = shutdown.cancelled() => {}
                    }
                    continue;
                }
            };
            let mut permits = vec![first];
            while permits.len() < batch {
                match slots.clone().try_acquire_owned() {
                    Ok(p) => permits.push(p),
                    Err(_) => break,
                }
            }
            if let Some(limiter) = &self.limiter {
                tokio::select! {
                    _ = limiter.take() => {}
                    _ = shutdown.cancelled() => break,
                }
            }
            let got = match self
                .transport
                .receive(permits.len(), self.settings.transport.wait)
                .await
            {
                Ok(got) => {
                    transport_errors = 0;
                    got
                }
                Err(e) => {
                    if probe {
                        self.breaker.probe_abandoned();
                    }
                    transport_errors += 1;
                    let wait = self.policy.delayed_retry_envelope(transport_errors);
                    tracing::error!(error = %e, retry_in = ?wait, "receive failed");
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = shutdown.cancelled() => {}
                    }
                    continue;
                }
            };
            if got.is_empty() {
                if probe {
                    self.breaker.probe_abandoned();
                }
                drop(permits);
                // Every permit back: nothing is in flight.
                let idle = slots.available_permits() == concurrency;
                if opts.drain && idle && self.transport.stats().await?.is_drained() {
                    tracing::info!("queue drained");
                    break;
                }
                continue;
            }
            for d in got {
                let permit = permits.pop().expect("one permit per message");
                if feed.send(Job { d, probe, permit }).is_err() {
                    unreachable!("the slot tasks live until the feed is dropped");
                }
            }
        }
        // No more messages: each slot task ends once the queue is empty and its message settled.
        drop(feed);
        let in_flight = concurrency - slots.available_permits();
        if in_flight > 0 {
            tracing::info!(in_flight, grace = ?self.settings.worker.shutdown_grace, "intake stopped; letting in-flight messages finish");
        }
        let finished = tokio::time::timeout(self.settings.worker.shutdown_grace, async {
            while workers.join_next().await.is_some() {}
        })
        .await;
        if finished.is_err() {
            tracing::warn!(
                remaining = concurrency - slots.available_permits(),
                "shutdown grace over: cancelling handlers and returning their messages to the queue"
            );
            hard_stop.cancel();
            while workers.join_next().await.is_some() {}
        }
        self.health.intake_stopped();
        let summary = self.metrics.summary();
        tracing::info!(?summary, "worker stopped");
        Ok(summary)
    }

    /// The span of one delivery, created with every field it has: recording a field later
    /// re-formats all of the span's fields in JSON logs (about 2 us a record in
    /// `just bench rabbitmq`). The outcome is therefore a field of the settling log line,
    /// not of the span. `key` is `None` when the message was rejected before it had one.
    fn span(&self, d: &Delivery, key: Option<&str>) -> tracing::Span {
        tracing::info_span!(
            "message",
            function = %self.function,
            queue = %self.settings.queue,
            message_id = %d.id,
            attempt = d.attempt,
            idempotency_key = key,
        )
    }

    /// Steps 1 and 2 of the pipeline, before the span opens: decode and validate (bad input
    /// is permanent and keeps its bytes), then the idempotency key: the header, else derived
    /// from the payload, else the message id.
    fn prepare(&self, d: &Delivery) -> std::result::Result<(T, String), Verdict> {
        let input = match self.decode(d) {
            Ok(input) => input,
            Err((label, reason)) => {
                return Err(dead_letter(FailureClass::Permanent, label, reason))
            }
        };
        let key = match d.headers.get(header::IDEMPOTENCY_KEY) {
            Some(k) => k.clone(),
            None => match &self.key_fn {
                Some(f) => f(&input),
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
        Ok((input, key))
    }

    /// The pipeline for one delivery, in its own span.
    /// `probe`: the intake loop reserved the breaker's half-open probe for this message.
    pub(crate) async fn process(&self, d: Delivery, hard_stop: &CancellationToken, probe: bool) {
        let started = Instant::now();
        let prepared = self.prepare(&d);
        let span = self.span(&d, prepared.as_ref().ok().map(|(_, key)| key.as_str()));
        async {
            inc(&self.metrics.received);
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
        d: Delivery,
        budget: Budget,
        retry_keeps_original: bool,
    ) -> bool {
        let started = Instant::now();
        let prepared = self.prepare(&d);
        let span = self.span(&d, prepared.as_ref().ok().map(|(_, key)| key.as_str()));
        async {
            inc(&self.metrics.received);
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
            let report = match &verdict {
                Verdict::Ack { duplicate } => {
                    inc(if *duplicate {
                        &self.metrics.duplicates_skipped
                    } else {
                        &self.metrics.succeeded
                    });
                    let outcome = if *duplicate { "duplicate" } else { "succeeded" };
                    tracing::debug!(outcome, "settled");
                    false
                }
                Verdict::Release | Verdict::Abandon => {
                    tracing::info!(outcome = "returned", "left to the visibility timeout");
                    true
                }
                Verdict::Retry { .. } | Verdict::DeadLetter { .. } => {
                    let retry = matches!(verdict, Verdict::Retry { .. });
                    let settled = self.settle(&d, verdict).await;
                    !settled || (retry && retry_keeps_original)
                }
            };
            self.metrics.observe(started.elapsed());
            report
        }
        .instrument(span)
        .await
    }

    /// Decides what happens to the message. Does not touch the broker.
    async fn decide(
        &self,
        d: &Delivery,
        prepared: std::result::Result<(T, String), Verdict>,
        held: &HeldClaim,
        cancel: &CancellationToken,
        probe: &AtomicBool,
        budget: &Budget,
    ) -> Verdict {
        // 1 and 2. Decoded and keyed by `prepare`.
        let (input, key) = match prepared {
            Ok(prepared) => prepared,
            Err(rejected) => return rejected,
        };

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
                        *held.lock().expect("claim lock") = Some((key.clone(), fp, token));
                        break;
                    }
                    Ok(Claim::Completed(_)) => return Verdict::Ack { duplicate: true },
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
                        tracing::warn!(error = %e, "idempotency store unavailable; running UNCLAIMED (store.fail_open = true)");
                        break;
                    }
                    Err(e) => {
                        // Fail closed: the handler never runs unclaimed.
                        let delay = self.policy.delayed_retry(d.attempt);
                        return self.retry_or_give_up(
                            d,
                            delay,
                            format!("idempotency store unavailable: {e}"),
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

        // 5. The handler, with timeout, immediate retries and panics caught.
        let effects = self.effects();
        let result = self
            .call_handler(d, input, &key, cancel, &effects, budget)
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
                let crash_rate = self.settings.fault.crash_rate;
                if crash_rate > 0.0 && rand::thread_rng().gen::<f64>() < crash_rate {
                    // fault.crash_rate: die between the effect and its record/ack, as a killed
                    // worker would (abort: no destructor, no settle, no flush).
                    tracing::error!("injected crash after the handler (fault.crash_rate)");
                    std::process::abort();
                }
                self.breaker.on_success();
                let claim = held.lock().expect("claim lock").take();
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
                        tracing::error!(error = %e, "could not complete the idempotency record");
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
                self.release_claim(held).await;
                match e.kind {
                    ErrorKind::Permanent => dead_letter(
                        FailureClass::Permanent,
                        "rejected by the handler",
                        e.message,
                    ),
                    ErrorKind::Transient => {
                        self.retry_or_give_up(d, self.policy.delayed_retry(d.attempt), e.message)
                    }
                    ErrorKind::RetryAfter(delay) => self.retry_or_give_up(d, delay, e.message),
                }
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
                pg: Some((pg.clone(), Arc::default())),
            };
        }
        crate::handler::Effects::default()
    }

    /// Commits the handler's effects together with the record's completion: both or neither.
    #[cfg(feature = "postgres")]
    async fn commit_effects(
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
                self.retry_or_give_up(d, delay, format!("committing the effects failed: {e}"))
            }
        }
    }

    /// A delayed retry, or the dead-letter queue once the deliveries are used up.
    fn retry_or_give_up(&self, d: &Delivery, delay: Duration, reason: String) -> Verdict {
        if d.attempt >= self.policy.max_deliveries() {
            let reason = format!("gave up after {} deliveries: {reason}", d.attempt);
            return dead_letter(FailureClass::Transient, "retries exhausted", reason);
        }
        Verdict::Retry {
            delay,
            failure: Failure::now(FailureClass::Transient, reason),
        }
    }

    /// Decodes and validates; on failure returns (label, reason).
    fn decode(&self, d: &Delivery) -> std::result::Result<T, (&'static str, String)> {
        check_envelope(&d.body, &d.headers, &self.settings.limits)?;
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
        let text = std::str::from_utf8(&d.body)
            .map_err(|e| ("invalid UTF-8", format!("body is not UTF-8: {e}")))?;
        serde_json::from_str(text).map_err(|e| {
            if e.is_data() {
                (
                    "invalid input",
                    format!("body does not match the input schema: {e}"),
                )
            } else {
                ("malformed JSON", format!("body is not JSON: {e}"))
            }
        })
    }

    /// Calls the handler with a fresh timeout per try, retrying short waits in the slot.
    async fn call_handler(
        &self,
        d: &Delivery,
        input: T,
        key: &str,
        cancel: &CancellationToken,
        effects: &crate::handler::Effects,
        budget: &Budget,
    ) -> std::result::Result<Vec<u8>, HandlerError> {
        let mut input = Some(input);
        let mut tries = 0;
        loop {
            let this = match input.take() {
                Some(i) => i,
                None => self
                    .decode(d)
                    .map_err(|(_, r)| HandlerError::permanent(r))?,
            };
            let result = self
                .call_once(d, this, key, cancel, effects, budget.handler_timeout)
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

    async fn call_once(
        &self,
        d: &Delivery,
        input: T,
        key: &str,
        cancel: &CancellationToken,
        effects: &crate::handler::Effects,
        timeout: Duration,
    ) -> std::result::Result<Vec<u8>, HandlerError> {
        let ctx = Context {
            message_id: d.id.clone(),
            attempt: d.attempt,
            headers: d.headers.clone(),
            deadline: Instant::now() + timeout,
            idempotency_key: key.to_owned(),
            cancel: cancel.clone(),
            state: self.state.clone(),
            effects: effects.clone(),
        };
        let fault = &self.settings.fault;
        let call = async {
            if !fault.latency.is_zero() {
                tokio::time::sleep(fault.latency).await;
            }
            if fault.panic_rate > 0.0 && rand::thread_rng().gen::<f64>() < fault.panic_rate {
                panic!("injected panic (fault.panic_rate)");
            }
            if fault.failure_rate > 0.0 && rand::thread_rng().gen::<f64>() < fault.failure_rate {
                return Err(HandlerError::transient(
                    "injected failure (fault.failure_rate)",
                ));
            }
            self.handler.call(input, &ctx).await
        };
        match tokio::time::timeout(timeout, AssertUnwindSafe(call).catch_unwind()).await {
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
            Ok(Ok(Err(e))) => Err(e),
            Ok(Ok(Ok(out))) => serde_json::to_vec(&out).map_err(|e| {
                HandlerError::permanent(format!("handler output does not serialize: {e}"))
            }),
        }
    }

    /// Extends the message lease (and the idempotency lease with it) while the pipeline runs.
    /// Returns only when the lease is lost, after cancelling the handler's context.
    async fn keep_lease(
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
                tracing::warn!(error = %e, "lost the message lease; cancelling the handler");
                cancel.cancel();
                break;
            }
            let claim = held.lock().expect("claim lock").clone();
            if let (Some(store), Some((key, _, token))) = (&self.store, claim) {
                if let Err(e) = store.extend(&key, token, lease).await {
                    tracing::warn!(error = %e, "lost the idempotency lease; cancelling the handler");
                    cancel.cancel();
                    break;
                }
            }
        }
        // Let the handler observe the cancellation and return; decide() then abandons.
        std::future::pending().await
    }

    #[cfg(feature = "postgres")]
    async fn release_claim_of(&self, key: &str, token: Token) {
        if let Some(store) = &self.store {
            if let Err(e) = store.release(key, token).await {
                tracing::warn!(error = %e, "could not release the idempotency record; it frees itself when its lease ends");
            }
        }
    }

    async fn release_claim(&self, held: &HeldClaim) {
        let claim = held.lock().expect("claim lock").take();
        if let (Some(store), Some((key, _, token))) = (&self.store, claim) {
            if let Err(e) = store.release(&key, token).await {
                tracing::warn!(error = %e, "could not release the idempotency record; it frees itself when its lease ends");
            }
        }
    }

    /// Settles on the broker and counts; false when the broker call failed.
    async fn settle(&self, d: &Delivery, verdict: Verdict) -> bool {
        let (outcome, result) = match &verdict {
            Verdict::Ack { duplicate } => {
                let r = self.transport.ack(d).await;
                if r.is_ok() {
                    inc(if *duplicate {
                        &self.metrics.duplicates_skipped
                    } else {
                        &self.metrics.succeeded
                    });
                }
                (if *duplicate { "duplicate" } else { "succeeded" }, r)
            }
            Verdict::Retry { delay, failure } => {
                let r = self.transport.retry_after(d, *delay, failure).await;
                if r.is_ok() {
                    inc(&self.metrics.retried);
                    tracing::info!(outcome = "retried", delay = ?delay, reason = %failure.reason, "retry scheduled");
                }
                ("retried", r)
            }
            Verdict::DeadLetter { failure, label } => {
                let r = self.transport.dead_letter(d, failure).await;
                if r.is_ok() {
                    self.metrics.dead_letter_reason(label);
                    tracing::warn!(outcome = "dead_lettered", class = failure.class.as_str(), reason = %failure.reason, "dead-lettered");
                }
                ("dead_lettered", r)
            }
            Verdict::Release => {
                let r = self.transport.release(d).await;
                if r.is_ok() {
                    inc(&self.metrics.released);
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
                tracing::error!(outcome, error = %e, "settling failed; the message returns when its lease ends");
                false
            }
        }
    }
}

fn dead_letter(class: FailureClass, label: &str, reason: impl Into<String>) -> Verdict {
    Verdict::DeadLetter {
        failure: Failure::now(class, reason),
        label: label.to_owned(),
    }
}
