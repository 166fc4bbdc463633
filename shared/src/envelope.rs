//! The envelope: everything Sluice adds to a message, with one meaning on every transport.
//!
//! | part | fields | written by |
//! |---|---|---|
//! | identity | [`field::ID`], [`field::ENQUEUED_AT`] | the first publish; kept by every copy |
//! | attempts | [`field::RETRIES`]: deliveries made before this copy was sent | retry copies |
//! | due time | [`field::DUE_AT`]: when a delayed copy may run | delayed sends and retries |
//! | failure history | first and last failure time, last error, its class | retry and dead-letter copies |
//! | dead-letter mark | function, attempts, original queue, when | dead-letter copies |
//! | redrive marks | how often, when last, from which dead-letter queue | redrive |
//! | trace context | W3C `traceparent` / `tracestate` of the message's creation | the producer; kept by every copy |
//! | workflow slip | opaque text owned by the workflow runtime | the workflow runtime |
//!
//! A transport only decides how the fields are written on its wire ([`Envelope::to_fields`]:
//! one `sluice-*` name and one text value each): AMQP headers, one SQS attribute holding them
//! as a JSON object ([`Envelope::to_json`]), a SQLite column. Whatever a transport reads back
//! goes through [`Envelope::from_fields`], which checks every value before it is trusted: counts
//! must be decimal `u32`s (no overflow, no wrap), times RFC 3339 within year 9999, texts
//! within [`MAX_FIELD_BYTES`], names known. A copy whose envelope fails the check is not
//! believed: its delivery carries the [`Defect`] and the pipeline dead-letters it as bad input.
//!
//! `redriven-from` is the name of the dead-letter queue the message was last redriven from, on
//! every transport. When a broker caps metadata the envelope is trimmed with
//! [`Envelope::shrink`], history first, never the slip (the body is never touched).

use std::{
    fmt,
    time::{Duration, SystemTime},
};

use serde::{Deserialize, Serialize};

use crate::{
    text::truncate,
    time::{parse_rfc3339, rfc3339},
};

/// The wire names of the envelope's fields: the same on every transport.
pub mod field {
    /// The message id, where the transport's own id changes between copies (SQS).
    pub const ID: &str = "sluice-id";
    /// RFC 3339 time of the first publish.
    pub const ENQUEUED_AT: &str = "sluice-enqueued-at";
    /// Deliveries made before this copy was sent (0 for a fresh or redriven message).
    pub const RETRIES: &str = "sluice-retries";
    /// RFC 3339 time before which a delayed copy must not be handed out.
    pub const DUE_AT: &str = "sluice-due-at";
    /// RFC 3339 time of the first failure.
    pub const FIRST_FAILURE_AT: &str = "sluice-first-failure-at";
    /// RFC 3339 time of the last failure.
    pub const LAST_FAILURE_AT: &str = "sluice-last-failure-at";
    /// Last error text.
    pub const LAST_ERROR: &str = "sluice-last-error";
    /// `transient`, `permanent` or `crash_loop`.
    pub const ERROR_CLASS: &str = "sluice-error-class";
    /// Dead letters: the function that failed it.
    pub const FUNCTION: &str = "sluice-function";
    /// Dead letters: deliveries made before dead-lettering.
    pub const ATTEMPTS: &str = "sluice-attempts";
    /// Dead letters: the queue it was dead-lettered from.
    pub const ORIGINAL_QUEUE: &str = "sluice-original-queue";
    /// Dead letters: RFC 3339 time it was dead-lettered.
    pub const DEAD_LETTERED_AT: &str = "sluice-dead-lettered-at";
    /// Times redriven from the dead-letter queue.
    pub const REDRIVEN: &str = "sluice-redriven";
    /// RFC 3339 time of the last redrive.
    pub const REDRIVEN_AT: &str = "sluice-redriven-at";
    /// The dead-letter queue the last redrive took it from.
    pub const REDRIVEN_FROM: &str = "sluice-redriven-from";
    /// W3C trace context of the message's creation.
    pub const TRACEPARENT: &str = "sluice-traceparent";
    /// W3C trace state of the message's creation.
    pub const TRACESTATE: &str = "sluice-tracestate";
    /// The workflow slip (opaque to the envelope).
    pub const SLIP: &str = "sluice-slip";

    /// Every field name, in the order [`super::Envelope::to_fields`] writes them.
    pub const ALL: [&str; 18] = [
        ID,
        ENQUEUED_AT,
        RETRIES,
        DUE_AT,
        FIRST_FAILURE_AT,
        LAST_FAILURE_AT,
        LAST_ERROR,
        ERROR_CLASS,
        FUNCTION,
        ATTEMPTS,
        ORIGINAL_QUEUE,
        DEAD_LETTERED_AT,
        REDRIVEN,
        REDRIVEN_AT,
        REDRIVEN_FROM,
        TRACEPARENT,
        TRACESTATE,
        SLIP,
    ];
}

/// The last error kept on a copy; longer texts are cut (the full text is in the logs).
pub const MAX_ERROR_BYTES: usize = 4 * 1024;
/// The longest value read from the wire for any field but the slip.
pub const MAX_FIELD_BYTES: usize = 8 * 1024;
/// The longest slip read from the wire (the body limit of every transport).
pub const MAX_SLIP_BYTES: usize = 256 * 1024;
/// The furthest ahead a due time may be (a longer one is taken as forged).
pub const MAX_DUE_AHEAD: Duration = Duration::from_secs(366 * 24 * 3600);

/// How a failure is classified on the dead-letter queue (and for `redrive --error-class`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum FailureClass {
    /// Retried until the delivery limit ran out.
    Transient,
    /// Bad input or a business rejection: dead-lettered at once.
    Permanent,
    /// Delivered too many times without ever being settled (the worker kept dying).
    #[value(name = "crash_loop")]
    CrashLoop,
}

impl FailureClass {
    /// The wire name (`transient`, `permanent`, `crash_loop`).
    pub fn as_str(self) -> &'static str {
        match self {
            FailureClass::Transient => "transient",
            FailureClass::Permanent => "permanent",
            FailureClass::CrashLoop => "crash_loop",
        }
    }

    /// Parses the wire name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "transient" => Some(FailureClass::Transient),
            "permanent" => Some(FailureClass::Permanent),
            "crash_loop" => Some(FailureClass::CrashLoop),
            _ => None,
        }
    }
}

/// One failure of one delivery, recorded on retry and on dead-lettering.
#[derive(Debug, Clone)]
pub struct Failure {
    /// Class of the failure.
    pub class: FailureClass,
    /// Human-readable reason (handler error text, decode error, ...).
    pub reason: String,
    /// When it happened.
    pub at: SystemTime,
}

impl Failure {
    /// A failure that happened now.
    pub fn now(class: FailureClass, reason: impl Into<String>) -> Self {
        Self {
            class,
            reason: reason.into(),
            at: SystemTime::now(),
        }
    }
}

/// The failure history a message carries from one copy to the next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailureHistory {
    /// The first failure.
    pub first_at: SystemTime,
    /// The latest failure.
    pub last_at: SystemTime,
    /// The latest failure's text (cut to [`MAX_ERROR_BYTES`]).
    pub last_error: String,
    /// The latest failure's class.
    pub class: FailureClass,
}

/// What a dead-letter copy says about its dead-lettering.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetterMark {
    /// The function that gave up on it.
    pub function: String,
    /// Deliveries made in all.
    pub attempts: u32,
    /// The work queue it came from.
    pub original_queue: String,
    /// When it was dead-lettered.
    pub at: SystemTime,
}

/// How often, when and from where a message was redriven.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedriveMarks {
    /// Times redriven.
    pub count: u32,
    /// The last redrive.
    pub last_at: SystemTime,
    /// The dead-letter queue it was taken from.
    pub from: String,
}

/// W3C trace context (<https://www.w3.org/TR/trace-context/>), as text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContext {
    /// `traceparent`.
    pub traceparent: String,
    /// `tracestate`, if any.
    pub tracestate: Option<String>,
}

/// Everything Sluice adds to a message (see the module doc).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Envelope {
    /// The message id, where the transport cannot carry it natively.
    pub id: Option<String>,
    /// When the message was first published.
    pub enqueued_at: Option<SystemTime>,
    /// Deliveries made before this copy was sent.
    pub retries: u32,
    /// When a delayed copy may run.
    pub due_at: Option<SystemTime>,
    /// Failure history.
    pub failure: Option<FailureHistory>,
    /// Present on dead-letter copies.
    pub dead_letter: Option<DeadLetterMark>,
    /// Present once redriven.
    pub redrive: Option<RedriveMarks>,
    /// The trace context of the message's creation.
    pub trace: Option<TraceContext>,
    /// The workflow slip.
    pub slip: Option<String>,
}

/// Why an envelope read from the wire is not believed: the field and what was wrong, in words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Defect(pub String);

impl fmt::Display for Defect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "malformed Sluice envelope: {}", self.0)
    }
}

impl std::error::Error for Defect {}

impl Envelope {
    /// The attempt number of a delivery of this copy, given the broker's count of this copy's
    /// deliveries (1 on its first). Saturates: a huge carried count can only raise the attempt.
    pub fn attempt(&self, broker_deliveries: u32) -> u32 {
        self.retries.saturating_add(broker_deliveries.max(1))
    }

    /// Time of the first failure, if an earlier delivery failed.
    pub fn first_failure_at(&self) -> Option<SystemTime> {
        self.failure.as_ref().map(|f| f.first_at)
    }

    /// Whether nothing is set.
    pub fn is_empty(&self) -> bool {
        *self == Envelope::default()
    }

    /// Adds `failure` to the history (the first failure time is kept).
    pub fn record_failure(&mut self, failure: &Failure) {
        let first_at = self.first_failure_at().unwrap_or(failure.at);
        self.failure = Some(FailureHistory {
            first_at,
            last_at: failure.at,
            last_error: truncate(&failure.reason, MAX_ERROR_BYTES).into_owned(),
            class: failure.class,
        });
    }

    /// The envelope of a copy that retries delivery `attempt` after `failure`, due at
    /// `due_at` (none: at once).
    pub fn for_retry(&self, attempt: u32, failure: &Failure, due_at: Option<SystemTime>) -> Self {
        let mut e = self.clone();
        e.record_failure(failure);
        e.retries = attempt;
        e.due_at = due_at;
        e.dead_letter = None;
        e
    }

    /// The envelope of the dead-letter copy of delivery `attempt`.
    pub fn for_dead_letter(
        &self,
        attempt: u32,
        failure: &Failure,
        function: &str,
        queue: &str,
        now: SystemTime,
    ) -> Self {
        let mut e = self.clone();
        e.record_failure(failure);
        e.retries = 0;
        e.due_at = None;
        e.dead_letter = Some(DeadLetterMark {
            function: function.to_owned(),
            attempts: attempt,
            original_queue: queue.to_owned(),
            at: now,
        });
        e
    }

    /// The envelope of a copy redriven from the dead-letter queue `from`: attempts reset,
    /// history dropped, the redrive counted. Identity, trace context and slip stay.
    pub fn for_redrive(&self, from: &str, now: SystemTime) -> Self {
        Envelope {
            id: self.id.clone(),
            enqueued_at: self.enqueued_at,
            redrive: Some(RedriveMarks {
                count: self
                    .redrive
                    .as_ref()
                    .map_or(0, |r| r.count)
                    .saturating_add(1),
                last_at: now,
                from: from.to_owned(),
            }),
            trace: self.trace.clone(),
            slip: self.slip.clone(),
            ..Envelope::default()
        }
    }

    /// The same copy waiting for its due time (a delay hop): everything kept.
    pub fn for_hop(&self) -> Self {
        self.clone()
    }

    /// Times redriven.
    pub fn redriven(&self) -> u32 {
        self.redrive.as_ref().map_or(0, |r| r.count)
    }

    /// How long is left before this copy is due, when that is at least `granularity` (a copy
    /// due sooner is handed out: the transport's own delay steps cannot wait less).
    pub fn due_in(&self, now: SystemTime, granularity: Duration) -> Option<Duration> {
        let left = self.due_at?.duration_since(now).ok()?;
        (left >= granularity).then_some(left)
    }

    /// Trims the next part in the documented order, for a broker that caps metadata: the last
    /// error is cut to 256 bytes, then dropped, then the trace state, then the failure times
    /// and class, then the redrive marks' source. Never the slip, the identity, the attempt
    /// count, the due time or the dead-letter mark. Returns false when nothing is left to trim.
    pub fn shrink(&mut self) -> bool {
        if let Some(f) = &mut self.failure {
            if f.last_error.len() > 256 {
                f.last_error = truncate(&f.last_error, 256).into_owned();
                return true;
            }
            if !f.last_error.is_empty() {
                f.last_error.clear();
                return true;
            }
        }
        if let Some(t) = &mut self.trace {
            if t.tracestate.take().is_some() {
                return true;
            }
        }
        if self.failure.take().is_some() {
            return true;
        }
        if let Some(r) = &mut self.redrive {
            if !r.from.is_empty() {
                r.from.clear();
                return true;
            }
        }
        false
    }

    /// The fields as (wire name, text), only those set, in [`field::ALL`] order.
    pub fn to_fields(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        if let Some(id) = &self.id {
            out.push((field::ID, id.clone()));
        }
        if let Some(t) = self.enqueued_at {
            out.push((field::ENQUEUED_AT, rfc3339(t)));
        }
        if self.retries > 0 {
            out.push((field::RETRIES, self.retries.to_string()));
        }
        if let Some(t) = self.due_at {
            out.push((field::DUE_AT, rfc3339(t)));
        }
        if let Some(f) = &self.failure {
            out.push((field::FIRST_FAILURE_AT, rfc3339(f.first_at)));
            out.push((field::LAST_FAILURE_AT, rfc3339(f.last_at)));
            out.push((field::LAST_ERROR, f.last_error.clone()));
            out.push((field::ERROR_CLASS, f.class.as_str().to_owned()));
        }
        if let Some(d) = &self.dead_letter {
            out.push((field::FUNCTION, d.function.clone()));
            out.push((field::ATTEMPTS, d.attempts.to_string()));
            out.push((field::ORIGINAL_QUEUE, d.original_queue.clone()));
            out.push((field::DEAD_LETTERED_AT, rfc3339(d.at)));
        }
        if let Some(r) = &self.redrive {
            out.push((field::REDRIVEN, r.count.to_string()));
            out.push((field::REDRIVEN_AT, rfc3339(r.last_at)));
            out.push((field::REDRIVEN_FROM, r.from.clone()));
        }
        if let Some(t) = &self.trace {
            out.push((field::TRACEPARENT, t.traceparent.clone()));
            if let Some(s) = &t.tracestate {
                out.push((field::TRACESTATE, s.clone()));
            }
        }
        if let Some(s) = &self.slip {
            out.push((field::SLIP, s.clone()));
        }
        out
    }

    /// Reads fields from the wire, checking each (see the module doc). `now` bounds due times.
    pub fn from_fields<'a, I>(fields: I, now: SystemTime) -> Result<Self, Defect>
    where
        I: IntoIterator<Item = (&'a str, &'a str)>,
    {
        let mut raw = Raw::default();
        for (name, value) in fields {
            raw.set(name, value)?;
        }
        raw.build(now)
    }

    /// The fields as one JSON object of strings (`{}` when empty).
    pub fn to_json(&self) -> String {
        let map: serde_json::Map<String, serde_json::Value> = self
            .to_fields()
            .into_iter()
            .map(|(k, v)| (k.to_owned(), serde_json::Value::String(v)))
            .collect();
        serde_json::Value::Object(map).to_string()
    }

    /// Reads [`Envelope::to_json`] text. Numbers are accepted for the count fields (written
    /// so by older versions of the SQS transport).
    pub fn from_json(text: &str, now: SystemTime) -> Result<Self, Defect> {
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| Defect(format!("not a JSON object: {e}")))?;
        let serde_json::Value::Object(map) = value else {
            return Err(Defect("not a JSON object".into()));
        };
        Self::from_json_map(&map, now)
    }

    /// [`Envelope::from_json`] on an object already parsed (the SQS codec strips its own keys).
    pub fn from_json_map(
        map: &serde_json::Map<String, serde_json::Value>,
        now: SystemTime,
    ) -> Result<Self, Defect> {
        let mut texts = Vec::with_capacity(map.len());
        for (k, v) in map {
            let text = match v {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Number(n) => n.to_string(),
                other => {
                    return Err(Defect(format!(
                        "{k}: expected a text value, got {}",
                        json_kind(other)
                    )))
                }
            };
            texts.push((k.as_str(), text));
        }
        Self::from_fields(texts.iter().map(|(k, v)| (*k, v.as_str())), now)
    }
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// The fields as read, before they are checked together.
#[derive(Default)]
struct Raw<'a> {
    id: Option<&'a str>,
    enqueued_at: Option<SystemTime>,
    retries: u32,
    due_at: Option<SystemTime>,
    first_failure_at: Option<SystemTime>,
    last_failure_at: Option<SystemTime>,
    last_error: Option<&'a str>,
    class: Option<FailureClass>,
    function: Option<&'a str>,
    attempts: Option<u32>,
    original_queue: Option<&'a str>,
    dead_lettered_at: Option<SystemTime>,
    redriven: Option<u32>,
    redriven_at: Option<SystemTime>,
    redriven_from: Option<&'a str>,
    traceparent: Option<&'a str>,
    tracestate: Option<&'a str>,
    slip: Option<&'a str>,
}

fn shown(value: &str) -> String {
    format!("{:?}", truncate(value, 40))
}

fn count(name: &str, value: &str) -> Result<u32, Defect> {
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(Defect(format!(
            "{name}: expected a count (decimal digits), got {}",
            shown(value)
        )));
    }
    value.parse().map_err(|_| {
        Defect(format!(
            "{name}: {} is larger than {} (a count this large cannot be real)",
            shown(value),
            u32::MAX
        ))
    })
}

fn time(name: &str, value: &str) -> Result<SystemTime, Defect> {
    parse_rfc3339(value).ok_or_else(|| {
        Defect(format!(
            "{name}: expected an RFC 3339 time such as 2026-01-31T12:00:00.000Z, got {}",
            shown(value)
        ))
    })
}

impl<'a> Raw<'a> {
    fn set(&mut self, name: &'a str, value: &'a str) -> Result<(), Defect> {
        let limit = if name == field::SLIP {
            MAX_SLIP_BYTES
        } else {
            MAX_FIELD_BYTES
        };
        if value.len() > limit {
            return Err(Defect(format!(
                "{name}: {} bytes, more than the {limit} a Sluice field holds",
                value.len()
            )));
        }
        match name {
            field::ID => self.id = Some(value),
            field::ENQUEUED_AT => self.enqueued_at = Some(time(name, value)?),
            field::RETRIES => self.retries = count(name, value)?,
            field::DUE_AT => self.due_at = Some(time(name, value)?),
            field::FIRST_FAILURE_AT => self.first_failure_at = Some(time(name, value)?),
            field::LAST_FAILURE_AT => self.last_failure_at = Some(time(name, value)?),
            field::LAST_ERROR => self.last_error = Some(value),
            field::ERROR_CLASS => {
                self.class = Some(FailureClass::parse(value).ok_or_else(|| {
                    Defect(format!(
                        "{name}: expected transient, permanent or crash_loop, got {}",
                        shown(value)
                    ))
                })?)
            }
            field::FUNCTION => self.function = Some(value),
            field::ATTEMPTS => self.attempts = Some(count(name, value)?),
            field::ORIGINAL_QUEUE => self.original_queue = Some(value),
            field::DEAD_LETTERED_AT => self.dead_lettered_at = Some(time(name, value)?),
            field::REDRIVEN => self.redriven = Some(count(name, value)?),
            field::REDRIVEN_AT => self.redriven_at = Some(time(name, value)?),
            field::REDRIVEN_FROM => self.redriven_from = Some(value),
            field::TRACEPARENT => self.traceparent = Some(value),
            field::TRACESTATE => self.tracestate = Some(value),
            field::SLIP => self.slip = Some(value),
            other => return Err(Defect(format!("{} is not a Sluice field", shown(other)))),
        }
        Ok(())
    }

    fn build(self, now: SystemTime) -> Result<Envelope, Defect> {
        if let Some(due) = self.due_at {
            if due
                .duration_since(now)
                .is_ok_and(|ahead| ahead > MAX_DUE_AHEAD)
            {
                return Err(Defect(format!(
                    "{}: {} is more than a year ahead",
                    field::DUE_AT,
                    rfc3339(due)
                )));
            }
        }
        // The history is written whole (to_fields); a part of it alone is not ours.
        let failure = match (self.first_failure_at, self.last_failure_at, self.class) {
            (None, None, None) if self.last_error.is_none() => None,
            (Some(first_at), Some(last_at), Some(class)) => Some(FailureHistory {
                first_at,
                last_at,
                last_error: self.last_error.unwrap_or_default().to_owned(),
                class,
            }),
            _ => {
                return Err(Defect(format!(
                    "incomplete failure history: {}, {} and {} come together",
                    field::FIRST_FAILURE_AT,
                    field::LAST_FAILURE_AT,
                    field::ERROR_CLASS
                )))
            }
        };
        let dead_letter = match (
            self.function,
            self.attempts,
            self.original_queue,
            self.dead_lettered_at,
        ) {
            (None, None, None, None) => None,
            (Some(function), Some(attempts), Some(queue), Some(at)) => Some(DeadLetterMark {
                function: function.to_owned(),
                attempts,
                original_queue: queue.to_owned(),
                at,
            }),
            _ => {
                return Err(Defect(format!(
                    "incomplete dead-letter mark: {}, {}, {} and {} come together",
                    field::FUNCTION,
                    field::ATTEMPTS,
                    field::ORIGINAL_QUEUE,
                    field::DEAD_LETTERED_AT
                )))
            }
        };
        let redrive = match (self.redriven, self.redriven_at) {
            (None, None) if self.redriven_from.is_none() => None,
            // Older copies carried the count alone.
            (Some(count), at) => Some(RedriveMarks {
                count,
                last_at: at.unwrap_or(std::time::UNIX_EPOCH),
                from: self.redriven_from.unwrap_or_default().to_owned(),
            }),
            _ => {
                return Err(Defect(format!(
                    "incomplete redrive marks: {} is missing",
                    field::REDRIVEN
                )))
            }
        };
        // W3C: a trace context that cannot be used is ignored, never fatal.
        let trace = self.traceparent.map(|tp| TraceContext {
            traceparent: tp.to_owned(),
            tracestate: self.tracestate.map(str::to_owned),
        });
        Ok(Envelope {
            id: self.id.map(str::to_owned),
            enqueued_at: self.enqueued_at,
            retries: self.retries,
            due_at: self.due_at,
            failure,
            dead_letter,
            redrive: redrive.filter(|r| r.count > 0),
            trace,
            slip: self.slip.map(str::to_owned),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::time::checked_from_unix_ms;

    fn t(ms: i64) -> SystemTime {
        checked_from_unix_ms(ms).unwrap()
    }

    fn full() -> Envelope {
        Envelope {
            id: Some("m-1".into()),
            enqueued_at: Some(t(1_700_000_000_000)),
            retries: 3,
            due_at: Some(t(1_700_000_060_000)),
            failure: Some(FailureHistory {
                first_at: t(1_700_000_001_000),
                last_at: t(1_700_000_002_000),
                last_error: "downstream 503".into(),
                class: FailureClass::Transient,
            }),
            dead_letter: Some(DeadLetterMark {
                function: "f".into(),
                attempts: 4,
                original_queue: "q".into(),
                at: t(1_700_000_003_000),
            }),
            redrive: Some(RedriveMarks {
                count: 1,
                last_at: t(1_700_000_004_000),
                from: "q.dlq".into(),
            }),
            trace: Some(TraceContext {
                traceparent: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
                tracestate: Some("congo=t61rcWkgMzE".into()),
            }),
            slip: Some("{\"steps\":[]}".into()),
        }
    }

    #[test]
    fn every_field_round_trips_through_fields_and_json() {
        let now = t(1_700_000_000_000);
        let e = full();
        let fields = e.to_fields();
        assert_eq!(fields.len(), field::ALL.len());
        let names: Vec<_> = fields.iter().map(|(k, _)| *k).collect();
        assert_eq!(names, field::ALL);
        let back = Envelope::from_fields(fields.iter().map(|(k, v)| (*k, v.as_str())), now);
        assert_eq!(back.unwrap(), e);
        assert_eq!(Envelope::from_json(&e.to_json(), now).unwrap(), e);
        assert_eq!(Envelope::default().to_json(), "{}");
        assert!(Envelope::from_json("{}", now).unwrap().is_empty());
    }

    #[test]
    fn forged_or_overflowing_values_are_defects_that_name_the_field() {
        let now = SystemTime::now();
        let bad = |name: &str, value: &str| {
            Envelope::from_fields([(name, value)], now)
                .unwrap_err()
                .to_string()
        };
        assert!(bad(field::RETRIES, "4294967296").contains("larger than"));
        assert!(bad(field::RETRIES, "-1").contains("sluice-retries"));
        assert!(bad(field::RETRIES, "1e3").contains("decimal digits"));
        assert!(bad(field::DUE_AT, "soon").contains("RFC 3339"));
        assert!(bad(field::DUE_AT, "9999-12-31T00:00:00Z").contains("a year ahead"));
        assert!(bad(field::ERROR_CLASS, "fatal").contains("crash_loop"));
        assert!(bad("sluice-bogus", "1").contains("not a Sluice field"));
        assert!(bad(field::LAST_ERROR, &"x".repeat(MAX_FIELD_BYTES + 1)).contains("bytes"));
        assert!(bad(field::FIRST_FAILURE_AT, "2026-01-01T00:00:00Z").contains("incomplete"));
        assert!(bad(field::ATTEMPTS, "3").contains("dead-letter mark"));
        let err = Envelope::from_json("[1]", now).unwrap_err().to_string();
        assert!(err.contains("not a JSON object"), "{err}");
        let err = Envelope::from_json(r#"{"sluice-retries":{"a":1}}"#, now)
            .unwrap_err()
            .to_string();
        assert!(err.contains("an object"), "{err}");
        // Numbers from older SQS copies are read as counts.
        let e = Envelope::from_json(r#"{"sluice-retries":2}"#, now).unwrap();
        assert_eq!(e.retries, 2);
    }

    #[test]
    fn attempts_never_wrap() {
        let e = Envelope {
            retries: u32::MAX - 1,
            ..Envelope::default()
        };
        assert_eq!(e.attempt(5), u32::MAX);
        assert_eq!(Envelope::default().attempt(0), 1);
    }

    #[test]
    fn copies_carry_what_they_should() {
        let now = t(1_700_000_010_000);
        let failure = Failure {
            class: FailureClass::Transient,
            reason: "x".repeat(MAX_ERROR_BYTES * 2),
            at: now,
        };
        let e = full();
        let retry = e.for_retry(4, &failure, None);
        assert_eq!(retry.retries, 4);
        assert_eq!(retry.dead_letter, None);
        let f = retry.failure.as_ref().unwrap();
        assert_eq!(f.first_at, t(1_700_000_001_000), "first failure kept");
        assert!(f.last_error.len() <= MAX_ERROR_BYTES);
        let dead = e.for_dead_letter(5, &failure, "f", "q", now);
        assert_eq!((dead.retries, dead.dead_letter.unwrap().attempts), (0, 5));
        let redriven = e.for_redrive("q.dlq", now);
        assert_eq!(redriven.redriven(), 2);
        assert_eq!((redriven.retries, redriven.failure.is_none()), (0, true));
        assert_eq!(redriven.trace, e.trace);
        assert_eq!(redriven.slip, e.slip);
    }

    #[test]
    fn shrinking_trims_history_first_and_never_the_slip() {
        let mut e = full();
        e.failure.as_mut().unwrap().last_error = "e".repeat(1000);
        let mut steps = 0;
        while e.shrink() {
            steps += 1;
        }
        assert_eq!(steps, 5);
        assert!(e.failure.is_none());
        assert_eq!(e.trace.as_ref().unwrap().tracestate, None);
        assert!(e.slip.is_some() && e.dead_letter.is_some() && e.id.is_some());
    }

    #[test]
    fn a_due_time_short_of_the_granularity_is_handed_out() {
        let now = t(1_700_000_000_000);
        let e = Envelope {
            due_at: Some(now + Duration::from_millis(900)),
            ..Envelope::default()
        };
        assert_eq!(e.due_in(now, Duration::from_secs(1)), None);
        assert_eq!(
            e.due_in(now, Duration::from_millis(250)),
            Some(Duration::from_millis(900))
        );
        assert_eq!(e.due_in(now + Duration::from_secs(2), Duration::ZERO), None);
    }
}
