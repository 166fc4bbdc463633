//! The intake loop: a free slot, the breaker's permission, a rate-limit token, then a receive;
//! each message goes to a long-lived slot task. Shutdown stops intake and lets in-flight
//! messages finish within the grace period; the rest go back to the queue.

use std::{panic::AssertUnwindSafe, sync::Arc, time::Duration};

use futures_util::FutureExt;
use tokio::{sync::Semaphore, task::JoinSet};
use tokio_util::sync::CancellationToken;

use super::Runtime;
use crate::{
    breaker::Admission,
    error::Result,
    message::Delivery,
    telemetry::{health::Source, RunSummary},
    transport::Transport,
};

/// Most messages asked for in one receive call.
const RECEIVE_BATCH: usize = 10;

/// Options of one `run`.
#[derive(Debug, Clone, Copy, Default)]
pub struct RunOptions {
    /// Exit once the queue is empty and nothing is in flight.
    pub drain: bool,
}

/// One message on its way from the intake loop to a slot task, with the slot it holds.
struct Slotted {
    d: Delivery,
    /// The intake loop reserved the breaker's half-open probe for it.
    probe: bool,
    permit: tokio::sync::OwnedSemaphorePermit,
}

impl Runtime {
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
        let (feed, jobs) = tokio::sync::mpsc::unbounded_channel::<Slotted>();
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
                    let Some(Slotted { d, probe, permit }) = job else {
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
            transport = self.settings.transport.kind.name(),
            store = self.settings.store.kind.name(),
            concurrency,
            "worker started"
        );
        let mut transport_errors = 0u32;
        let _poller = self.spawn_queue_poller();
        let source: Arc<dyn Source> = self.clone();
        self.health
            .intake_started(Arc::downgrade(&source), &self.settings, &shutdown);
        drop(source);
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
                    transport_errors = transport_errors.saturating_add(1);
                    let wait = self.policy.delayed_retry_envelope(transport_errors);
                    tracing::error!(error = %e.report(), retry_in = ?wait, "receive failed");
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
                if feed.send(Slotted { d, probe, permit }).is_err() {
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
        let s = self.metrics.summary();
        // Fields a log search can use, not a debug dump.
        tracing::info!(
            received = s.received,
            succeeded = s.succeeded,
            retried = s.retried,
            immediate_retries = s.immediate_retries,
            dead_lettered = s.dead_lettered,
            duplicates_skipped = s.duplicates_skipped,
            panics = s.panics,
            released = s.released,
            elapsed_s = s.elapsed_s,
            settled_per_s = s.settled_per_s,
            p50_ms = s.p50_ms,
            p95_ms = s.p95_ms,
            p99_ms = s.p99_ms,
            "worker stopped"
        );
        Ok(s)
    }
}
