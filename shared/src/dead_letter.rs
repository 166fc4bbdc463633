//! A dead letter as `dlq list|show` and `redrive` report it, built once from what any
//! transport read off its dead-letter queue: the body, the producer headers, the envelope, and
//! how the message got there (the crash-loop classification).

use std::time::SystemTime;

use serde::Serialize;

use crate::{
    envelope::{Envelope, FailureClass},
    message::Headers,
    time::rfc3339,
};

/// How a message reached the dead-letter queue.
#[derive(Debug, Clone)]
pub enum Arrival {
    /// Sluice dead-lettered it: its envelope carries the mark and the history.
    Sluice,
    /// The transport's crash-loop guard moved it after `deliveries` deliveries of one copy that
    /// were never settled (`guard` names it for the text); `at` is when, as well as known.
    CrashLoop {
        /// Deliveries of the copy the guard counted.
        deliveries: u32,
        /// The guard, in words (`RabbitMQ x-delivery-limit`, `the queue's RedrivePolicy`).
        guard: &'static str,
        /// When it moved, or the best time known.
        at: SystemTime,
    },
    /// The broker dead-lettered it for another reason (rejected, expired, ...).
    Broker {
        /// The broker's reason.
        reason: String,
        /// The queue it came from.
        queue: String,
        /// When.
        at: SystemTime,
    },
}

/// A dead-lettered message with its failure history.
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetter {
    /// Id of the message (the same id it had on the work queue).
    pub id: String,
    /// Deliveries made before it was dead-lettered.
    pub attempts: u32,
    /// Class of the last failure.
    pub error_class: FailureClass,
    /// Text of the last failure.
    pub last_error: String,
    /// The body as UTF-8, when it is valid UTF-8.
    pub body: Option<String>,
    /// The body in hex, when it is not valid UTF-8 (so nothing is lost in JSON output).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body_hex: Option<String>,
    /// Producer headers.
    pub headers: Headers,
    /// Function that failed it.
    pub function: String,
    /// Queue it came from.
    pub original_queue: String,
    /// RFC 3339 time of the first failure.
    pub first_failure_at: String,
    /// RFC 3339 time of the last failure.
    pub last_failure_at: String,
    /// RFC 3339 time it was dead-lettered.
    pub dead_lettered_at: String,
    /// How many times it was redriven before.
    pub redriven: u32,
    /// The dead-letter queue of the last redrive, if it was redriven.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redriven_from: Option<String>,
    /// The trace id of the message's creation context (32 hex digits), to find its trace:
    /// every delivery, the dead-lettering and a redrive are in it (docs/architecture.md).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
    /// The raw body bytes.
    #[serde(skip)]
    pub raw_body: Vec<u8>,
    /// The envelope it carries (what a redrive keeps from it).
    #[serde(skip)]
    pub envelope: Envelope,
}

/// Where a dead letter was read, for what its envelope does not say.
#[derive(Debug, Clone, Copy)]
pub struct Origin<'a> {
    /// The function reading it.
    pub function: &'a str,
    /// Its work queue.
    pub queue: &'a str,
}

impl DeadLetter {
    /// The dead letter of one DLQ message.
    pub fn new(
        id: String,
        body: Vec<u8>,
        headers: Headers,
        envelope: Envelope,
        arrival: Arrival,
        origin: Origin<'_>,
    ) -> Self {
        let history = envelope.failure.clone();
        let mark = envelope.dead_letter.clone();
        let (attempts, class, last_error, first, last, at, function, queue) = match (&arrival, mark)
        {
            (Arrival::Sluice, Some(mark)) => {
                let h = history.as_ref();
                (
                    mark.attempts,
                    h.map_or(FailureClass::Permanent, |h| h.class),
                    h.map(|h| h.last_error.clone()).unwrap_or_default(),
                    h.map_or(mark.at, |h| h.first_at),
                    h.map_or(mark.at, |h| h.last_at),
                    mark.at,
                    mark.function,
                    mark.original_queue,
                )
            }
            (Arrival::Sluice, None) => {
                // Ours by the transport's rules, but its envelope lost the mark (trimmed to fit
                // beside a body at the broker's size limit).
                let at = history.as_ref().map_or(SystemTime::now(), |h| h.last_at);
                (
                    envelope.retries.saturating_add(1),
                    history
                        .as_ref()
                        .map_or(FailureClass::Permanent, |h| h.class),
                    history.as_ref().map_or_else(
                        || "dead-lettered without its history (no room beside the body)".into(),
                        |h| h.last_error.clone(),
                    ),
                    history.as_ref().map_or(at, |h| h.first_at),
                    at,
                    at,
                    origin.function.to_owned(),
                    origin.queue.to_owned(),
                )
            }
            (
                Arrival::CrashLoop {
                    deliveries,
                    guard,
                    at,
                },
                _,
            ) => {
                let n = envelope.retries.saturating_add(*deliveries);
                (
                    n,
                    FailureClass::CrashLoop,
                    format!(
                        "delivered {n} times without being settled (the worker crashed or lost its lease each time); moved by {guard}"
                    ),
                    history.as_ref().map_or(*at, |h| h.first_at),
                    *at,
                    *at,
                    origin.function.to_owned(),
                    origin.queue.to_owned(),
                )
            }
            (Arrival::Broker { reason, queue, at }, _) => (
                envelope.retries.saturating_add(1),
                FailureClass::Permanent,
                format!("dead-lettered by the broker from {queue}: {reason}"),
                history.as_ref().map_or(*at, |h| h.first_at),
                *at,
                *at,
                origin.function.to_owned(),
                queue.clone(),
            ),
        };
        let (text, hex) = match String::from_utf8(body.clone()) {
            Ok(s) => (Some(s), None),
            Err(_) => (None, Some(hex::encode(&body))),
        };
        DeadLetter {
            id,
            attempts,
            error_class: class,
            last_error,
            body: text,
            body_hex: hex,
            headers,
            function,
            original_queue: queue,
            first_failure_at: rfc3339(first),
            last_failure_at: rfc3339(last),
            dead_lettered_at: rfc3339(at),
            redriven: envelope.redriven(),
            redriven_from: envelope
                .redrive
                .as_ref()
                .map(|r| r.from.clone())
                .filter(|f| !f.is_empty()),
            trace_id: envelope
                .trace
                .as_ref()
                .and_then(|t| crate::tracecontext::TraceParent::parse(&t.traceparent))
                .map(|tp| tp.trace_id_hex()),
            raw_body: body,
            envelope,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::{Failure, RedriveMarks};

    const ORIGIN: Origin<'static> = Origin {
        function: "f",
        queue: "q",
    };

    #[test]
    fn our_dead_letters_report_their_mark_and_history() {
        let now = SystemTime::now();
        let mut e = Envelope::default();
        e.record_failure(&Failure::now(FailureClass::Transient, "first"));
        let e = e.for_dead_letter(
            3,
            &Failure::now(FailureClass::Permanent, "no"),
            "fn-a",
            "work",
            now,
        );
        let dl = DeadLetter::new(
            "m".into(),
            b"\xff".to_vec(),
            Headers::new(),
            e,
            Arrival::Sluice,
            ORIGIN,
        );
        assert_eq!((dl.attempts, dl.error_class), (3, FailureClass::Permanent));
        assert_eq!(
            (dl.function.as_str(), dl.original_queue.as_str()),
            ("fn-a", "work")
        );
        assert_eq!((dl.body, dl.body_hex.as_deref()), (None, Some("ff")));
        assert!(dl.first_failure_at <= dl.last_failure_at);
    }

    #[test]
    fn a_crash_loop_counts_carried_retries_and_names_its_guard() {
        let e = Envelope {
            retries: 4,
            redrive: Some(RedriveMarks {
                count: 2,
                last_at: SystemTime::now(),
                from: "q.dlq".into(),
            }),
            ..Envelope::default()
        };
        let arrival = Arrival::CrashLoop {
            deliveries: 3,
            guard: "the queue's RedrivePolicy",
            at: SystemTime::now(),
        };
        let dl = DeadLetter::new(
            "m".into(),
            b"{}".to_vec(),
            Headers::new(),
            e,
            arrival,
            ORIGIN,
        );
        assert_eq!((dl.attempts, dl.error_class), (7, FailureClass::CrashLoop));
        assert!(dl.last_error.contains("RedrivePolicy"), "{}", dl.last_error);
        assert_eq!(
            (dl.redriven, dl.redriven_from.as_deref()),
            (2, Some("q.dlq"))
        );
        assert_eq!(dl.body.as_deref(), Some("{}"));
    }
}
