//! Where a workflow stands: one record per tracking id, written by the runtime on every event,
//! read by `<fn> workflow status ID` and `workflow list --state S`.
//!
//! Events can arrive twice or late (forwarding is at-least-once), so a record only moves
//! forward: each state has a rank, and a write with a lower rank than the record's is ignored
//! (a conditional write in the store). `compensation_failed` ranks below `compensated`, so a
//! redriven compensation that succeeds moves the record on.

use serde::{Deserialize, Serialize};

use super::flow::EventKind;

/// The state of one workflow run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Started, steps running.
    Running,
    /// A step failed for good; compensations running.
    Compensating,
    /// A compensation failed for good: dead-lettered, waiting for a redrive.
    #[value(name = "compensation_failed")]
    CompensationFailed,
    /// Every step ran (terminal).
    Completed,
    /// Every completed step was compensated (terminal).
    Compensated,
}

impl State {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Running => "running",
            State::Compensating => "compensating",
            State::CompensationFailed => "compensation_failed",
            State::Completed => "completed",
            State::Compensated => "compensated",
        }
    }

    /// Parses the wire name.
    pub fn parse(s: &str) -> Option<Self> {
        [
            State::Running,
            State::Compensating,
            State::CompensationFailed,
            State::Completed,
            State::Compensated,
        ]
        .into_iter()
        .find(|st| st.as_str() == s)
    }

    /// The order states move in; a record never moves to a lower rank.
    pub fn rank(self) -> i64 {
        match self {
            State::Running => 0,
            State::Compensating => 1,
            State::CompensationFailed => 2,
            State::Completed | State::Compensated => 3,
        }
    }

    /// Whether the run is over.
    pub fn is_terminal(self) -> bool {
        self.rank() == 3
    }

    /// The state an event leaves the run in.
    pub fn after(event: EventKind) -> State {
        match event {
            EventKind::Started | EventKind::StepCompleted => State::Running,
            EventKind::Faulted | EventKind::StepCompensated => State::Compensating,
            EventKind::CompensationFailed => State::CompensationFailed,
            EventKind::Completed => State::Completed,
            EventKind::Compensated => State::Compensated,
        }
    }
}

/// One workflow run's record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// The tracking id.
    pub id: String,
    /// The workflow's name.
    pub workflow: String,
    /// Its state.
    pub state: State,
    /// The last event.
    pub event: EventKind,
    /// The step of the last event.
    pub step: String,
    /// Steps completed so far (the log's length).
    pub steps_done: u32,
    /// Steps compensated so far.
    pub compensated: u32,
    /// Why it faulted or why a compensation failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// RFC 3339 time of the last write.
    pub updated_at: String,
}
