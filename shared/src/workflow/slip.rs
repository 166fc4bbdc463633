//! The routing slip: what a workflow message carries in the envelope's `sluice-slip` field,
//! as JSON, and the checks it passes before the runtime believes it.
//!
//! A slip is written by the workflow runtime only (a step's forward, a compensation's hand-off,
//! `send --workflow`), but it travels on the wire, so a forged or damaged one is possible: it
//! is decoded with [`Slip::decode`], which refuses unknown fields, a wrong version, oversized
//! or empty names, and a shape the runtime could not act on. A refused slip is bad input: the
//! pipeline dead-letters the message at once with the reason.

use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::time::{checked_from_unix_ms, unix_ms};

/// The slip format version this runtime writes and reads.
pub const SLIP_VERSION: u32 = 1;
/// The largest slip the runtime writes (its JSON text). Far below the envelope's own limit
/// (`envelope::MAX_SLIP_BYTES`), so that a slip fits beside a body on every transport:
/// RabbitMQ carries it as one header within a 128 KiB frame, SQS within 256 KiB per message,
/// and a step's idempotency record (which holds the slip it forwards) within the store's
/// default `store.max_output_bytes` of 64 KiB.
pub const MAX_SLIP_TEXT: usize = 48 * 1024;
/// Most steps in one workflow (itinerary and log together).
pub const MAX_STEPS: usize = 32;
/// Longest tracking id, workflow, step or queue name.
pub const MAX_NAME: usize = 128;

/// Which way the workflow is going.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub struct Fault {
    /// The step that failed for good.
    pub step: String,
    /// Why, in words (the handler's error, "deadline passed", ...).
    pub reason: String,
    /// When (Unix ms).
    pub at_ms: i64,
}

/// One step still to run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Step {
    /// The step's name in the definition (`reserve`, `charge`, ...).
    pub name: String,
    /// The queue of the function that runs it.
    pub queue: String,
    /// Arguments of this step, from the definition (`Workflow::args`).
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub args: Value,
    /// Whether the step has a compensation (run in reverse order if a later step fails).
    #[serde(default)]
    pub compensate: bool,
    /// How long the step may take from the moment it is forwarded to its queue.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
}

/// One completed step, with the data its compensation will need.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Logged {
    /// The step's name.
    pub name: String,
    /// Its queue (where its compensation runs).
    pub queue: String,
    /// Whether it has a compensation.
    #[serde(default)]
    pub compensate: bool,
    /// The handler's output: what the compensation reads (`Workflow::compensation_data`).
    #[serde(default)]
    pub data: Value,
    /// When it completed (Unix ms).
    pub at_ms: i64,
}

/// The routing slip (see the module doc and docs/workflows.md).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Slip {
    /// [`SLIP_VERSION`].
    pub v: u32,
    /// The tracking id: one workflow run, the same on every message of it.
    pub id: String,
    /// The workflow's name (its definition).
    pub workflow: String,
    /// When it started (Unix ms).
    pub started_ms: i64,
    /// The whole workflow must be done by then (Unix ms); past it, it compensates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_ms: Option<i64>,
    /// The head step must be done by then (Unix ms): set when it is forwarded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_deadline_ms: Option<i64>,
    /// Steps still to run, the head first.
    pub itinerary: Vec<Step>,
    /// Completed steps, oldest first; while compensating, those not yet compensated.
    pub log: Vec<Logged>,
    /// Variables: set by the producer and by steps, read by later steps.
    #[serde(default)]
    pub variables: Map<String, Value>,
    /// Set once a step failed for good: the workflow is compensating.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault: Option<Fault>,
    /// Names of the steps compensated so far, in the order they were.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub compensated: Vec<String>,
}

/// Forward (run the head of the itinerary) or compensate (undo the last logged step).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Running the itinerary.
    Forward,
    /// Undoing the log.
    Compensate,
}

impl Direction {
    /// The word used in keys, logs and events.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Forward => "forward",
            Direction::Compensate => "compensate",
        }
    }
}

/// Why a slip is not believed, in words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadSlip(pub String);

impl std::fmt::Display for BadSlip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "malformed workflow slip: {}", self.0)
    }
}

impl std::error::Error for BadSlip {}

fn name(what: &str, s: &str) -> Result<(), BadSlip> {
    if s.is_empty() || s.len() > MAX_NAME || s.chars().any(|c| c.is_control()) {
        return Err(BadSlip(format!(
            "{what} must be 1 to {MAX_NAME} bytes of text without control characters, got {} bytes",
            s.len()
        )));
    }
    Ok(())
}

fn time(what: &str, ms: i64) -> Result<(), BadSlip> {
    checked_from_unix_ms(ms)
        .map(|_| ())
        .ok_or_else(|| BadSlip(format!("{what}: {ms} is not a plausible Unix time in ms")))
}

impl Slip {
    /// A new slip at its first step.
    pub fn start(
        id: &str,
        workflow: &str,
        itinerary: Vec<Step>,
        variables: Map<String, Value>,
        deadline: Option<Duration>,
        now: SystemTime,
    ) -> Self {
        let now_ms = unix_ms(now);
        let mut slip = Slip {
            v: SLIP_VERSION,
            id: id.to_owned(),
            workflow: workflow.to_owned(),
            started_ms: now_ms,
            deadline_ms: deadline.map(|d| now_ms.saturating_add(ms(d))),
            step_deadline_ms: None,
            itinerary,
            log: Vec::new(),
            variables,
            fault: None,
            compensated: Vec::new(),
        };
        slip.arm_head(now);
        slip
    }

    /// Sets the head step's deadline from its timeout, counted from `now`.
    pub(crate) fn arm_head(&mut self, now: SystemTime) {
        self.step_deadline_ms = self
            .itinerary
            .first()
            .and_then(|s| s.timeout_ms)
            .map(|t| unix_ms(now).saturating_add(i64::try_from(t).unwrap_or(i64::MAX)));
    }

    /// Which way this slip is going.
    pub fn direction(&self) -> Direction {
        if self.fault.is_some() {
            Direction::Compensate
        } else {
            Direction::Forward
        }
    }

    /// The queue that must handle this slip now: the head step's, or, while compensating,
    /// the last logged step's.
    pub fn current_queue(&self) -> Option<&str> {
        match self.direction() {
            Direction::Forward => self.itinerary.first().map(|s| s.queue.as_str()),
            Direction::Compensate => self.log.last().map(|s| s.queue.as_str()),
        }
    }

    /// The name of the step handled now.
    pub fn current_step(&self) -> Option<&str> {
        match self.direction() {
            Direction::Forward => self.itinerary.first().map(|s| s.name.as_str()),
            Direction::Compensate => self.log.last().map(|s| s.name.as_str()),
        }
    }

    /// The idempotency key of the step handled now: (tracking id, step position, direction).
    /// The position is the step's index in the workflow (the log's length going forward, the
    /// last logged step's index compensating), so each step and each compensation is claimed
    /// once, whatever the number of copies forwarding made.
    pub fn key(&self) -> String {
        let (index, dir) = match self.direction() {
            Direction::Forward => (self.log.len(), Direction::Forward),
            Direction::Compensate => (self.log.len().saturating_sub(1), Direction::Compensate),
        };
        format!("wf:{}:{}:{}", self.id, index, dir.as_str())
    }

    /// Whether a deadline (the step's or the workflow's) has passed at `now`; the words why.
    pub fn overdue(&self, now: SystemTime) -> Option<String> {
        let now_ms = unix_ms(now);
        if let Some(d) = self.deadline_ms.filter(|d| now_ms > *d) {
            return Some(format!(
                "the workflow's deadline passed {} ms ago",
                now_ms - d
            ));
        }
        if let Some(d) = self.step_deadline_ms.filter(|d| now_ms > *d) {
            return Some(format!("the step's deadline passed {} ms ago", now_ms - d));
        }
        None
    }

    /// The JSON text, refused when over [`MAX_SLIP_TEXT`].
    pub fn encode(&self) -> Result<String, BadSlip> {
        let text = serde_json::to_string(self).map_err(|e| BadSlip(e.to_string()))?;
        if text.len() > MAX_SLIP_TEXT {
            return Err(BadSlip(format!(
                "the slip would be {} bytes, more than the {MAX_SLIP_TEXT} a workflow message carries (keep step outputs and variables small)",
                text.len()
            )));
        }
        Ok(text)
    }

    /// Decodes and checks a slip read from the wire.
    pub fn decode(text: &str) -> Result<Self, BadSlip> {
        if text.len() > MAX_SLIP_TEXT {
            return Err(BadSlip(format!(
                "{} bytes, more than {MAX_SLIP_TEXT}",
                text.len()
            )));
        }
        let slip: Slip = serde_json::from_str(text).map_err(|e| BadSlip(e.to_string()))?;
        slip.check()?;
        Ok(slip)
    }

    fn check(&self) -> Result<(), BadSlip> {
        if self.v != SLIP_VERSION {
            return Err(BadSlip(format!(
                "version {} (this runtime reads {SLIP_VERSION})",
                self.v
            )));
        }
        name("id", &self.id)?;
        name("workflow", &self.workflow)?;
        time("started_ms", self.started_ms)?;
        for (what, t) in [
            ("deadline_ms", self.deadline_ms),
            ("step_deadline_ms", self.step_deadline_ms),
        ] {
            if let Some(t) = t {
                time(what, t)?;
            }
        }
        if self.itinerary.len() + self.log.len() > MAX_STEPS {
            return Err(BadSlip(format!("more than {MAX_STEPS} steps")));
        }
        for s in &self.itinerary {
            name("itinerary step name", &s.name)?;
            name("itinerary step queue", &s.queue)?;
        }
        for s in &self.log {
            name("logged step name", &s.name)?;
            name("logged step queue", &s.queue)?;
            time("logged step at_ms", s.at_ms)?;
        }
        match &self.fault {
            None if self.itinerary.is_empty() => Err(BadSlip(
                "nothing left to run: the itinerary is empty".into(),
            )),
            Some(_) if self.log.is_empty() => {
                Err(BadSlip("compensating, but no logged step is left".into()))
            }
            Some(f) => {
                name("fault step", &f.step)?;
                time("fault at_ms", f.at_ms)
            }
            None => Ok(()),
        }
    }
}

/// Whole milliseconds of `d`, saturating.
pub(crate) fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(name: &str) -> Step {
        Step {
            name: name.into(),
            queue: format!("{name}-q"),
            args: Value::Null,
            compensate: true,
            timeout_ms: Some(1000),
        }
    }

    fn slip() -> Slip {
        Slip::start(
            "t-1",
            "order",
            vec![step("a"), step("b")],
            Map::new(),
            Some(Duration::from_secs(60)),
            SystemTime::now(),
        )
    }

    #[test]
    fn a_slip_round_trips_and_names_its_current_step() {
        let s = slip();
        let back = Slip::decode(&s.encode().unwrap()).unwrap();
        assert_eq!(back, s);
        assert_eq!(s.current_queue(), Some("a-q"));
        assert_eq!(s.key(), "wf:t-1:0:forward");
        assert!(s.step_deadline_ms.is_some());
    }

    #[test]
    fn garbage_and_forged_slips_are_refused_with_a_reason() {
        let cases = [
            ("not json", "expected"),
            ("{}", "missing field"),
            (
                r#"{"v":2,"id":"x","workflow":"w","started_ms":0,"itinerary":[],"log":[]}"#,
                "version 2",
            ),
            (
                r#"{"v":1,"id":"","workflow":"w","started_ms":0,"itinerary":[],"log":[]}"#,
                "id must be",
            ),
            (
                r#"{"v":1,"id":"x","workflow":"w","started_ms":0,"itinerary":[],"log":[]}"#,
                "nothing left to run",
            ),
            (
                r#"{"v":1,"id":"x","workflow":"w","started_ms":-5,"itinerary":[],"log":[]}"#,
                "plausible",
            ),
            (
                r#"{"v":1,"id":"x","workflow":"w","started_ms":0,"itinerary":[],"log":[],"extra":1}"#,
                "unknown field",
            ),
            (
                r#"{"v":1,"id":"x","workflow":"w","started_ms":0,"itinerary":[],"log":[],"fault":{"step":"a","reason":"r","at_ms":0}}"#,
                "no logged step",
            ),
        ];
        for (text, want) in cases {
            let err = Slip::decode(text).unwrap_err().to_string();
            assert!(err.contains(want), "{text}: {err}");
        }
        let huge = "x".repeat(MAX_SLIP_TEXT + 1);
        assert!(Slip::decode(&huge).unwrap_err().0.contains("more than"));
    }

    #[test]
    fn deadlines_make_a_slip_overdue() {
        let mut s = slip();
        let now = SystemTime::now();
        assert_eq!(s.overdue(now), None);
        assert!(s
            .overdue(now + Duration::from_secs(2))
            .unwrap()
            .contains("step's deadline"));
        s.step_deadline_ms = None;
        assert!(s
            .overdue(now + Duration::from_secs(61))
            .unwrap()
            .contains("workflow's deadline"));
    }
}
