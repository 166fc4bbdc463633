//! The envelope on the wire: one `sluice-*` name and one text value per field, and the
//! checks every value read back must pass before it is believed.

use std::time::SystemTime;

use super::{
    field, DeadLetterMark, Defect, Envelope, FailureClass, FailureHistory, RedriveMarks,
    TraceContext, MAX_DUE_AHEAD, MAX_FIELD_BYTES, MAX_SLIP_BYTES,
};
use crate::{
    text::truncate,
    time::{parse_rfc3339, rfc3339},
    tracecontext::{valid_tracestate, TraceParent},
};

impl Envelope {
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
        if let Some(p) = &self.previous_span {
            out.push((field::PREVIOUS_SPAN, p.clone()));
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
    previous_span: Option<&'a str>,
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
            field::PREVIOUS_SPAN => self.previous_span = Some(value),
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
        // W3C: a trace context that cannot be parsed is ignored, never fatal: the message keeps
        // its delivery and loses only its place in a trace (a trace state goes with its parent).
        let trace = self
            .traceparent
            .filter(|tp| TraceParent::parse(tp).is_some())
            .map(|tp| TraceContext {
                traceparent: tp.to_owned(),
                tracestate: self
                    .tracestate
                    .filter(|s| valid_tracestate(s))
                    .map(str::to_owned),
            });
        let previous_span = self
            .previous_span
            .filter(|tp| TraceParent::parse(tp).is_some())
            .map(str::to_owned);
        Ok(Envelope {
            id: self.id.map(str::to_owned),
            enqueued_at: self.enqueued_at,
            retries: self.retries,
            due_at: self.due_at,
            failure,
            dead_letter,
            redrive: redrive.filter(|r| r.count > 0),
            trace,
            previous_span,
            slip: self.slip.map(str::to_owned),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::tests::{full, t};

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
    fn a_garbage_trace_context_is_ignored_not_a_defect() {
        let now = SystemTime::now();
        let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        for garbage in ["garbage", "00-xyz", &good.to_uppercase(), ""] {
            let e = Envelope::from_fields(
                [
                    (field::RETRIES, "1"),
                    (field::TRACEPARENT, garbage),
                    (field::TRACESTATE, "congo=t61rcWkgMzE"),
                    (field::PREVIOUS_SPAN, garbage),
                ],
                now,
            )
            .expect("a bad trace context never fails the envelope");
            assert_eq!((e.retries, &e.trace, &e.previous_span), (1, &None, &None));
        }
        let e = Envelope::from_fields(
            [(field::TRACEPARENT, good), (field::TRACESTATE, "bad\u{1}")],
            now,
        )
        .unwrap();
        let t = e.trace.unwrap();
        assert_eq!((t.traceparent.as_str(), t.tracestate), (good, None));
    }

    #[test]
    fn numbers_from_older_sqs_copies_are_read_as_counts() {
        let now = SystemTime::now();
        let e = Envelope::from_json(r#"{"sluice-retries":2}"#, now).unwrap();
        assert_eq!(e.retries, 2);
    }
}
