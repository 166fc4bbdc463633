//! Workflow steps in the pipeline: a delivery with a routing slip is claimed under its
//! (tracking id, step, direction) key; when its handler succeeds the claim is completed with
//! the step's record (events and the hand-off it owes), the slip is published to the next
//! step's queue, confirmed, and only then is the delivery acked. A redelivery whose claim is
//! completed replays the hand-off and runs nothing. A step that fails for good completes its
//! claim with a fault record and hands the slip to the compensations, in reverse order.
//! docs/workflows.md has the picture.

use std::{collections::HashMap, sync::Arc, time::SystemTime};

use serde_json::Value;

use super::{
    verdict::{dead_letter, Verdict},
    Runtime,
};
use crate::{
    envelope::{Envelope, FailureClass},
    error::Result,
    message::{Delivery, OutgoingMessage},
    store::Token,
    transport::{AnyTransport, Transport},
    workflow::{
        flow::{EventKind, Handoff, Next, StepRecord},
        status::{State, Status},
        Direction, Slip, Workflow,
    },
};

/// Handles on the queues slips are published to, one per queue, opened on first use.
pub(crate) type Outboxes = tokio::sync::Mutex<HashMap<String, Arc<AnyTransport>>>;

/// The step a delivery is, read from its slip.
pub(super) struct StepIn {
    pub(super) slip: Slip,
    pub(super) wf: Arc<Workflow>,
}

impl StepIn {
    pub(super) fn compensating(&self) -> bool {
        self.slip.direction() == Direction::Compensate
    }
}

/// The idempotency claim taken from the pipeline: key, fingerprint, token.
pub(super) type TakenClaim = Option<(String, String, Token)>;

impl Runtime {
    /// The slip of a delivery, if it has one: believed only when it decodes, passes its
    /// checks and names this queue as the one to handle it now.
    pub(super) fn read_slip(&self, d: &Delivery) -> std::result::Result<Option<StepIn>, Verdict> {
        let Some(text) = &d.envelope.slip else {
            return Ok(None);
        };
        let slip = Slip::decode(text).map_err(|e| {
            dead_letter(
                FailureClass::Permanent,
                "malformed workflow slip",
                e.to_string(),
            )
        })?;
        if slip.current_queue() != Some(self.settings.queue.as_str()) {
            return Err(dead_letter(
                FailureClass::Permanent,
                "misrouted workflow slip",
                format!(
                    "the slip of workflow {} ({}) is for queue {:?} now, this is {:?}",
                    slip.workflow,
                    slip.id,
                    slip.current_queue().unwrap_or_default(),
                    self.settings.queue
                ),
            ));
        }
        Ok(Some(StepIn {
            wf: Arc::new(Workflow::new(slip.clone())),
            slip,
        }))
    }

    /// The record of a step whose handler succeeded with `output`; `Err` (the reason) when
    /// the slip it would forward does not fit: the step then fails as permanent.
    pub(super) fn record_success(
        &self,
        step: &StepIn,
        output: &[u8],
    ) -> std::result::Result<StepRecord, String> {
        let out: Value = serde_json::from_slice(output).unwrap_or(Value::Null);
        let now = SystemTime::now();
        let (next, events) = match step.slip.direction() {
            Direction::Forward => {
                let next = step.slip.after_step(out.clone(), step.wf.take_set(), now);
                let last = next == Next::Done;
                let events = if last {
                    vec![EventKind::StepCompleted, EventKind::Completed]
                } else {
                    vec![EventKind::StepCompleted]
                };
                (next, events)
            }
            Direction::Compensate => {
                let next = step.slip.after_compensation();
                let events = if next == Next::Done {
                    vec![EventKind::StepCompensated, EventKind::Compensated]
                } else {
                    vec![EventKind::StepCompensated]
                };
                (next, events)
            }
        };
        let handoff = next.handoff().map_err(|e| e.to_string())?;
        Ok(StepRecord {
            events,
            // The output travels in the forwarded slip's log; only the last step keeps it here.
            output: if handoff.is_some() { Value::Null } else { out },
            handoff,
            fault: None,
        })
    }

    /// The handler succeeded: record the step (with the effects' transaction on PostgreSQL),
    /// hand the slip on, report, ack.
    pub(super) async fn step_succeeded(
        &self,
        d: &Delivery,
        step: &StepIn,
        claim: TakenClaim,
        output: &[u8],
        effects: &crate::handler::Effects,
    ) -> Verdict {
        let record = match self.record_success(step, output) {
            Ok(r) => r,
            Err(reason) => {
                effects.rollback().await;
                let verdict =
                    dead_letter(FailureClass::Permanent, "workflow slip too large", reason);
                return self.fault(d, step, claim, verdict).await;
            }
        };
        #[cfg(feature = "postgres")]
        if let Some(tx) = effects.take().await {
            let bytes = serde_json::to_vec(&record).expect("a step record serializes");
            return match self.commit_effects(d, tx, claim, &bytes).await {
                Verdict::Ack { .. } => self.finish_step(d, step, &record).await,
                other => other,
            };
        }
        if let Err(v) = self.complete_record(d, claim, &record).await {
            return v;
        }
        self.crash_point("after the step's record, before its hand-off");
        self.finish_step(d, step, &record).await
    }

    /// `fault.crash_rate` in a workflow step: besides the crash after the handler (every
    /// function), die after the record and after the hand-off, so a drill hits every gap
    /// between handler, record, hand-off and ack.
    fn crash_point(&self, _where: &str) {
        #[cfg(feature = "faults")]
        {
            let rate = self.settings.fault.crash_rate;
            if rate > 0.0 && rand::random::<f64>() < rate {
                tracing::error!("injected crash {_where} (fault.crash_rate)");
                std::process::abort();
            }
        }
    }

    /// After the record is completed: hand the slip on (confirmed), report, then ack.
    pub(super) async fn finish_step(
        &self,
        d: &Delivery,
        step: &StepIn,
        record: &StepRecord,
    ) -> Verdict {
        if let Some(h) = &record.handoff {
            if let Err(e) = self.hand_off(d, h).await {
                return self.handoff_failed(d, e);
            }
        }
        self.crash_point("after the hand-off, before the ack");
        self.report(&step.slip, record, false).await;
        Verdict::Ack { duplicate: false }
    }

    /// A redelivery whose claim is completed: publish what the record owes again (the next
    /// step's claim absorbs the copy), and settle as the first delivery did.
    pub(super) async fn replay(&self, d: &Delivery, step: &StepIn, stored: &[u8]) -> Verdict {
        let Ok(record) = serde_json::from_slice::<StepRecord>(stored) else {
            // Not a step record (the key was completed by something else): nothing to replay.
            return Verdict::Ack { duplicate: true };
        };
        if let Some(h) = &record.handoff {
            if let Err(e) = self.hand_off(d, h).await {
                return self.handoff_failed(d, e);
            }
        }
        self.report(&step.slip, &record, true).await;
        match record.fault {
            None => Verdict::Ack { duplicate: true },
            // The failed step of a workflow that turned to compensation: a redrive does not
            // run it again (its earlier steps are being or have been undone).
            Some(reason) if d.envelope.redriven() > 0 => dead_letter(
                FailureClass::Permanent,
                "redrive of a faulted workflow step refused",
                format!(
                    "workflow {} ({}) faulted at step {:?} and compensates its completed steps; its failed step is not run again (start a new workflow instead). It failed with: {reason}",
                    step.slip.workflow,
                    step.slip.id,
                    step.slip.current_step().unwrap_or_default()
                ),
            ),
            Some(reason) => dead_letter(FailureClass::Permanent, "workflow step faulted", reason),
        }
    }

    /// A forward step failed for good (`verdict` is its dead letter): complete its claim with
    /// the fault, so no copy of it runs again, hand the slip to the compensations, report.
    pub(super) async fn fault(
        &self,
        d: &Delivery,
        step: &StepIn,
        claim: TakenClaim,
        verdict: Verdict,
    ) -> Verdict {
        let Verdict::DeadLetter { failure, .. } = &verdict else {
            return verdict;
        };
        let next = step.slip.after_fault(&failure.reason, SystemTime::now());
        let handoff = match next.handoff() {
            Ok(h) => h,
            Err(e) => {
                tracing::error!(error = %e, "the compensating slip does not fit; dead-lettering the step without compensating");
                self.release_taken(claim).await;
                return verdict;
            }
        };
        let mut events = vec![EventKind::Faulted];
        if handoff.is_none() {
            events.push(EventKind::Compensated);
        }
        let record = StepRecord {
            events,
            handoff,
            fault: Some(failure.reason.clone()),
            output: Value::Null,
        };
        if let Err(v) = self.complete_record(d, claim, &record).await {
            return v;
        }
        if let Some(h) = &record.handoff {
            if let Err(e) = self.hand_off(d, h).await {
                return self.handoff_failed(d, e);
            }
        }
        self.report(&step.slip, &record, false).await;
        verdict
    }

    /// A compensation failed for good: its claim is released (a redrive runs it again) and
    /// `compensation_failed` reported; the dead letter carries the slip.
    pub(super) async fn compensation_failed(
        &self,
        step: &StepIn,
        claim: TakenClaim,
        verdict: Verdict,
    ) -> Verdict {
        self.release_taken(claim).await;
        let reason = match &verdict {
            Verdict::DeadLetter { failure, .. } => Some(failure.reason.clone()),
            _ => None,
        };
        self.event(&step.slip, EventKind::CompensationFailed, reason, false)
            .await;
        verdict
    }

    /// Completes the claim with the record. `Err`: the verdict when that failed.
    pub(super) async fn complete_record(
        &self,
        d: &Delivery,
        claim: TakenClaim,
        record: &StepRecord,
    ) -> std::result::Result<(), Verdict> {
        let (Some(store), Some((key, fp, token))) = (&self.store, claim) else {
            return Ok(());
        };
        let bytes = serde_json::to_vec(record).expect("a step record serializes");
        let _ = d;
        match store
            .complete(&key, &fp, token, &bytes, self.settings.store.ttl)
            .await
        {
            Ok(()) => Ok(()),
            // Another worker took the record over: the message is theirs now.
            Err(crate::Error::StaleToken(_)) => Err(Verdict::Abandon),
            Err(e) => {
                // The effect happened: forwarding and acking is right, as for any function.
                // A copy arriving later may run the step again, which its downstream's
                // idempotency key must absorb.
                tracing::error!(error = %e.report(), "could not complete the workflow step's idempotency record");
                Ok(())
            }
        }
    }

    async fn release_taken(&self, claim: TakenClaim) {
        if let (Some(store), Some((key, _, token))) = (&self.store, claim) {
            if let Err(e) = store.release(&key, token).await {
                tracing::warn!(error = %e.report(), "could not release the idempotency record; it frees itself when its lease ends");
            }
        }
    }

    fn handoff_failed(&self, d: &Delivery, e: crate::Error) -> Verdict {
        // The record is completed: the retry replays the hand-off without running the step.
        let delay = self.policy.delayed_retry(d.attempt);
        self.retry_or_give_up(
            d,
            delay,
            format!("forwarding the workflow slip failed: {}", e.report()),
        )
    }

    /// Publishes the slip to its queue with this delivery's body and headers, confirmed.
    async fn hand_off(&self, d: &Delivery, h: &Handoff) -> Result<()> {
        let msg = OutgoingMessage {
            body: d.body.clone(),
            headers: d.headers.clone(),
            delay: std::time::Duration::ZERO,
            envelope: Envelope {
                trace: d.envelope.trace.clone(),
                slip: Some(h.slip.clone()),
                ..Envelope::default()
            },
        };
        let outbox = self.outbox(&h.queue).await?;
        outbox.publish(vec![msg]).await.map(|_| ())
    }

    /// The handle on `queue`: one opened once with this worker's settings and purpose (`run`
    /// creates the queue when `transport.declare` is on; Lambda mode creates nothing).
    async fn outbox(&self, queue: &str) -> Result<Arc<AnyTransport>> {
        let mut boxes = self.outboxes.lock().await;
        if let Some(t) = boxes.get(queue) {
            return Ok(t.clone());
        }
        let settings = self.settings.for_queue(queue);
        let t = Arc::new(AnyTransport::open(&self.function, &settings, self.purpose).await?);
        boxes.insert(queue.to_owned(), t.clone());
        Ok(t)
    }

    /// Reports a record's events: a log line each, counted unless replayed, the status record.
    async fn report(&self, slip: &Slip, record: &StepRecord, replay: bool) {
        for &e in &record.events {
            let reason = match e {
                EventKind::Faulted => record.fault.clone(),
                _ => None,
            };
            self.event(slip, e, reason, replay).await;
        }
    }

    /// One event of the workflow on `slip` (the slip as this step received it).
    pub(super) async fn event(
        &self,
        slip: &Slip,
        event: EventKind,
        reason: Option<String>,
        replay: bool,
    ) {
        let step = slip.current_step().unwrap_or_default();
        tracing::info!(
            workflow = %slip.workflow,
            tracking_id = %slip.id,
            step,
            event = event.as_str(),
            reason = reason.as_deref(),
            replay,
            "workflow event"
        );
        if !replay {
            self.metrics.workflow_event(&slip.workflow, event);
        }
        let Some(store) = &self.store else { return };
        let (done, compensated) = match event {
            EventKind::StepCompleted | EventKind::Completed => (slip.log.len() + 1, 0),
            EventKind::StepCompensated | EventKind::Compensated
                if slip.direction() == Direction::Compensate =>
            {
                (0, slip.compensated.len() + 1)
            }
            _ => (slip.log.len(), slip.compensated.len()),
        };
        let status = Status {
            id: slip.id.clone(),
            workflow: slip.workflow.clone(),
            state: State::after(event),
            event,
            step: step.to_owned(),
            steps_done: u32::try_from(done).unwrap_or(u32::MAX),
            compensated: u32::try_from(compensated).unwrap_or(u32::MAX),
            reason,
            updated_at: crate::time::rfc3339(SystemTime::now()),
        };
        if let Err(e) = store.store().put_status(&status).await {
            tracing::warn!(error = %e.report(), "could not write the workflow's status record");
        }
    }
}

impl Runtime {
    /// The status record of the workflow run `id` (`workflow status`): needs the sqlite or
    /// postgres idempotency store.
    pub async fn workflow_status(&self, id: &str) -> Result<Option<Status>> {
        match &self.store {
            Some(s) => s.store().get_status(id).await,
            None => Err(crate::Error::Invalid(
                "workflow status records live in the idempotency store; store.kind is none".into(),
            )),
        }
    }

    /// The status records in `state` (all with `None`), at most `limit` (`workflow list`).
    pub async fn workflow_list(&self, state: Option<State>, limit: usize) -> Result<Vec<Status>> {
        match &self.store {
            Some(s) => s.store().list_status(state, limit).await,
            None => Err(crate::Error::Invalid(
                "workflow status records live in the idempotency store; store.kind is none".into(),
            )),
        }
    }
}
