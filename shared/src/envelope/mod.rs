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
//! | previous span | W3C `traceparent` of the delivery that made this copy | retry, dead-letter and redrive copies |
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

mod wire;

use std::{
    fmt,
    time::{Duration, SystemTime},
};

use serde::{Deserialize, Serialize};

use crate::text::truncate;

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
    /// W3C `traceparent` of the delivery (process span) that made this copy: a retry's,
    /// dead letter's or redrive's link to the attempt before it.
    pub const PREVIOUS_SPAN: &str = "sluice-previous-span";
    /// The workflow slip (opaque to the envelope).
    pub const SLIP: &str = "sluice-slip";

    /// Every field name, in the order [`super::Envelope::to_fields`] writes them.
    pub const ALL: [&str; 19] = [
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
        PREVIOUS_SPAN,
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
    /// The `traceparent` of the delivery that made this copy (none on a producer's message).
    pub previous_span: Option<String>,
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
    /// history dropped, the redrive counted. Identity, trace context (with the span of the
    /// delivery that dead-lettered it), and slip stay.
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
            previous_span: self.previous_span.clone(),
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
    /// error is cut to 256 bytes, then dropped, then the trace state, then the previous span,
    /// then the failure times and class, then the redrive marks' source. Never the slip, the identity, the attempt
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
        if self.previous_span.take().is_some() {
            return true;
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
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::time::checked_from_unix_ms;

    pub(super) fn t(ms: i64) -> SystemTime {
        checked_from_unix_ms(ms).unwrap()
    }

    pub(super) fn full() -> Envelope {
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
            previous_span: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-b7ad6b7169203331-01".into()),
            slip: Some("{\"steps\":[]}".into()),
        }
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
        assert_eq!(redriven.previous_span, e.previous_span);
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
        assert_eq!(steps, 6);
        assert!(e.failure.is_none() && e.previous_span.is_none());
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
