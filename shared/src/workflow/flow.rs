//! How a slip moves: what comes after a step succeeds, after it fails for good, and after a
//! compensation; and the record a step's idempotency claim is completed with, so that a
//! redelivered step replays its hand-off instead of running again.

use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::slip::{Fault, Logged, Slip};
use crate::time::unix_ms;

/// What a workflow event says happened (the `event` label of the workflow metrics, the
/// `event` field of the log line and of the events queue's messages).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// The producer sent the first step.
    Started,
    /// A step succeeded and the slip went on.
    StepCompleted,
    /// The last step succeeded.
    Completed,
    /// A step failed for good; compensation starts.
    Faulted,
    /// One compensation succeeded and the slip went on to the next.
    StepCompensated,
    /// Every completed step was compensated.
    Compensated,
    /// A compensation failed for good: dead-lettered with its slip, to be redriven.
    CompensationFailed,
}

impl EventKind {
    /// Every kind, for counters that start at 0.
    pub const ALL: [EventKind; 7] = [
        EventKind::Started,
        EventKind::StepCompleted,
        EventKind::Completed,
        EventKind::Faulted,
        EventKind::StepCompensated,
        EventKind::Compensated,
        EventKind::CompensationFailed,
    ];

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Started => "started",
            EventKind::StepCompleted => "step_completed",
            EventKind::Completed => "completed",
            EventKind::Faulted => "faulted",
            EventKind::StepCompensated => "step_compensated",
            EventKind::Compensated => "compensated",
            EventKind::CompensationFailed => "compensation_failed",
        }
    }
}

/// A slip to publish to a queue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Handoff {
    /// The queue.
    pub queue: String,
    /// The slip's JSON text.
    pub slip: String,
}

/// What a step's (or compensation's) claim is completed with: the events it caused and the
/// hand-off it owes. A redelivery of a completed step finds this record and publishes the
/// hand-off again (the next step's claim absorbs the copy) without running the handler.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepRecord {
    /// The events, in order (`step_completed`, or `faulted` then `compensated`, ...).
    pub events: Vec<EventKind>,
    /// The message owed to the next step or compensation, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handoff: Option<Handoff>,
    /// For a step that failed for good: why (the dead letter's reason on every replay).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault: Option<String>,
    /// The handler's output.
    #[serde(default)]
    pub output: Value,
}

/// Where a slip goes next and what that means.
#[derive(Debug, Clone, PartialEq)]
pub enum Next {
    /// Publish this slip to its current queue.
    Go(Box<Slip>),
    /// Nothing left to run or compensate.
    Done,
}

impl Next {
    /// The hand-off of a [`Next::Go`].
    pub fn handoff(&self) -> Result<Option<Handoff>, super::slip::BadSlip> {
        match self {
            Next::Go(slip) => Ok(Some(Handoff {
                queue: slip.current_queue().unwrap_or_default().to_owned(),
                slip: slip.encode()?,
            })),
            Next::Done => Ok(None),
        }
    }
}

impl Slip {
    /// After the head step succeeded with `output` and set `variables`: the step is logged,
    /// the itinerary popped; [`Next::Done`] when it was the last.
    pub fn after_step(
        &self,
        output: Value,
        variables: Map<String, Value>,
        now: SystemTime,
    ) -> Next {
        let mut next = self.clone();
        let step = next.itinerary.remove(0);
        next.log.push(Logged {
            name: step.name,
            queue: step.queue,
            compensate: step.compensate,
            data: output,
            at_ms: unix_ms(now),
        });
        next.variables.extend(variables);
        if next.itinerary.is_empty() {
            return Next::Done;
        }
        next.arm_head(now);
        Next::Go(Box::new(next))
    }

    /// After the head step failed for good: the slip turns around to the last completed step
    /// that has a compensation ([`Next::Done`]: nothing to compensate).
    pub fn after_fault(&self, reason: &str, now: SystemTime) -> Next {
        let mut next = self.clone();
        next.fault = Some(Fault {
            step: self.current_step().unwrap_or_default().to_owned(),
            reason: crate::text::truncate(reason, 1024).into_owned(),
            at_ms: unix_ms(now),
        });
        next.step_deadline_ms = None;
        next.skip_uncompensated();
        if next.log.is_empty() {
            Next::Done
        } else {
            Next::Go(Box::new(next))
        }
    }

    /// After the compensation of the last logged step succeeded: on to the one before.
    pub fn after_compensation(&self) -> Next {
        let mut next = self.clone();
        if let Some(done) = next.log.pop() {
            next.compensated.push(done.name);
        }
        next.skip_uncompensated();
        if next.log.is_empty() {
            Next::Done
        } else {
            Next::Go(Box::new(next))
        }
    }

    /// Drops logged steps without a compensation from the end of the log.
    fn skip_uncompensated(&mut self) {
        while self.log.last().is_some_and(|s| !s.compensate) {
            self.log.pop();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::workflow::slip::{Direction, Step};

    fn step(name: &str, compensate: bool) -> Step {
        Step {
            name: name.into(),
            queue: format!("{name}-q"),
            args: Value::Null,
            compensate,
            timeout_ms: None,
        }
    }

    #[test]
    fn a_slip_runs_forward_then_compensates_in_reverse_skipping_steps_without_one() {
        let now = SystemTime::now();
        let s = Slip::start(
            "t",
            "w",
            vec![step("a", true), step("b", false), step("c", true)],
            Map::new(),
            Some(Duration::from_secs(5)),
            now,
        );
        let Next::Go(s) = s.after_step(Value::from(1), Map::new(), now) else {
            panic!()
        };
        assert_eq!(s.key(), "wf:t:1:forward");
        let Next::Go(s) = s.after_step(Value::from(2), Map::new(), now) else {
            panic!()
        };
        assert_eq!(s.current_queue(), Some("c-q"));
        // c fails: b has no compensation, so the slip goes to a.
        let Next::Go(s) = s.after_fault("boom", now) else {
            panic!()
        };
        assert_eq!(s.direction(), Direction::Compensate);
        assert_eq!(s.current_queue(), Some("a-q"));
        assert_eq!(s.key(), "wf:t:0:compensate");
        assert_eq!(s.log[0].data, Value::from(1));
        assert_eq!(s.after_compensation(), Next::Done);
    }

    #[test]
    fn the_last_step_completes_and_a_first_step_fault_has_nothing_to_undo() {
        let now = SystemTime::now();
        let s = Slip::start("t", "w", vec![step("a", true)], Map::new(), None, now);
        assert_eq!(s.after_fault("x", now), Next::Done);
        assert_eq!(s.after_step(Value::Null, Map::new(), now), Next::Done);
    }
}
