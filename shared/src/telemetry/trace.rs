//! The spans of the OpenTelemetry messaging conventions (docs/architecture.md#traces): one
//! `process <queue>` span of kind CONSUMER per delivery, one `send <queue>` span of kind
//! PRODUCER per `send`, and in Lambda mode an invocation span with `faas.*` attributes.
//!
//! They are ordinary `tracing` spans, so the JSON logs carry the same fields the exported
//! spans do; `tracing-opentelemetry` reads `otel.name`, `otel.kind` and `otel.status_code`
//! from them. Parents and links are set only when spans are exported (feature `otlp` and an
//! endpoint, [`exporting`]): without an exporter a span has no trace id to carry.
//!
//! How one message's deliveries form one trace:
//! - its creation context (`sluice-traceparent`: the `send` span, or the producer's own
//!   `traceparent`) is the **parent** of every process span, on every copy (retries, dead
//!   letters, redrives keep it), so every attempt, its dead-lettering and its redrive sit in
//!   the creation's trace;
//! - each process span also **links** to the creation context (the conventions' "SHOULD link
//!   to the message's creation context") and to the span of the attempt before it
//!   (`sluice-previous-span`, written on retry, dead-letter and redrive copies), and to the
//!   X-Ray context of SQS's `AWSTraceHeader` when there is one;
//! - a message that arrives with no creation context adopts its first process span's as
//!   its creation context, so its retries still join one trace.
//!
//! In Lambda mode the record spans are children of the invocation span and link to their
//! record's creation context (one invocation handles records of many traces).

use tracing::{field::Empty, Span};

use crate::{
    config::TransportKind,
    envelope::{Envelope, TraceContext},
    message::{header, Delivery, Headers},
    tracecontext::{valid_tracestate, TraceParent},
};

pub use super::export::{exporting, SPANS_DROPPED};

/// `messaging.system` of a transport. The embedded queue has no registered value: it is
/// Sluice's own queue over a SQLite file (SQLite is a database, not the messaging system), so
/// it is `sluice`, as the conventions ask of a system they do not list.
pub fn messaging_system(kind: TransportKind) -> &'static str {
    match kind {
        TransportKind::Embedded => "sluice",
        TransportKind::Rabbitmq => "rabbitmq",
        TransportKind::Sqs => "aws_sqs",
    }
}

/// Where a process span's parent comes from.
#[cfg_attr(not(feature = "lambda"), allow(dead_code))]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Parent {
    /// The message's creation context (container mode: one message, one trace).
    Creation,
    /// The span current where it is made (Lambda mode: the invocation span); the creation
    /// context is linked.
    Current,
}

/// The `process <queue>` span of one delivery, with every field it has at its start (a
/// field recorded later re-formats the span's JSON in the logs); the outcome is recorded on
/// it only while exporting ([`record_outcome`]).
pub(crate) fn process_span(
    system: &'static str,
    function: &str,
    queue: &str,
    d: &Delivery,
    key: Option<&str>,
) -> Span {
    let (routing_key, tag) = d.rabbitmq_facts();
    tracing::info_span!(
        "process",
        otel.name = %format_args!("process {queue}"),
        otel.kind = "consumer",
        messaging.system = system,
        messaging.operation.type = "process",
        messaging.operation.name = "process",
        messaging.destination.name = %queue,
        messaging.message.id = %d.id,
        messaging.rabbitmq.destination.routing_key = routing_key,
        messaging.rabbitmq.message.delivery_tag = tag,
        sluice.function = %function,
        sluice.attempt = d.attempt,
        sluice.idempotency_key = key,
        sluice.outcome = Empty,
        sluice.error_class = Empty,
        error.type = Empty,
        otel.status_code = Empty,
    )
}

/// The `send <queue>` span of one `send` (its context is the messages' creation context).
pub(crate) fn send_span(system: &'static str, queue: &str, count: usize) -> Span {
    tracing::info_span!(
        "send",
        otel.name = %format_args!("send {queue}"),
        otel.kind = "producer",
        messaging.system = system,
        messaging.operation.type = "send",
        messaging.operation.name = "send",
        messaging.destination.name = %queue,
        messaging.batch.message_count = (count > 1).then_some(count),
    )
}

/// How a delivery ended, on its span: `sluice.outcome`, and for a failure `sluice.error_class`,
/// `error.type` (a fixed, documented set: docs/architecture.md#traces) and the error status.
pub(crate) fn record_outcome(span: &Span, outcome: &str, error: Option<(&str, &str)>) {
    if !exporting() {
        return;
    }
    span.record("sluice.outcome", outcome);
    if let Some((class, error_type)) = error {
        span.record("sluice.error_class", class);
        span.record("error.type", error_type);
        span.record("otel.status_code", "error");
    }
}

/// The creation context a delivery carries: the envelope's (already checked when read), else
/// a producer's own `traceparent` header when it parses (garbage is ignored).
pub fn creation_context(envelope: &Envelope, headers: &Headers) -> Option<TraceContext> {
    if let Some(t) = &envelope.trace {
        return Some(t.clone());
    }
    let tp = headers.get(header::TRACEPARENT)?;
    TraceParent::parse(tp)?;
    Some(TraceContext {
        traceparent: tp.clone(),
        tracestate: headers
            .get(header::TRACESTATE)
            .filter(|s| valid_tracestate(s))
            .cloned(),
    })
}

/// The trace context of `span`, as W3C text, when it is exported.
pub fn context_of(span: &Span) -> Option<TraceContext> {
    #[cfg(feature = "otlp")]
    if exporting() {
        return super::otlp::context_of(span);
    }
    let _ = span;
    None
}

/// The `send <queue>` span continuing the caller's context, and the creation context the
/// messages sent in it carry: the span's when it is exported, else the caller's as it came
/// (`TRACEPARENT`/`TRACESTATE` or `--traceparent`), else none.
pub(crate) fn start_send(
    system: &'static str,
    queue: &str,
    count: usize,
    caller: Option<TraceContext>,
) -> (Span, Option<TraceContext>) {
    let span = send_span(system, queue, count);
    #[cfg(feature = "otlp")]
    if exporting() {
        if let Some(c) = &caller {
            super::otlp::continue_from(&span, c);
        }
    }
    let context = context_of(&span).or(caller);
    (span, context)
}

/// The caller's trace context from the environment (`TRACEPARENT`, `TRACESTATE`, as the
/// W3C environment-variable carriers name them) or a flag; garbage is ignored with a warning.
pub(crate) fn caller_context(flag: Option<&str>) -> Option<TraceContext> {
    let tp = match flag {
        Some(f) => f.to_owned(),
        None => std::env::var("TRACEPARENT").ok()?,
    };
    if TraceParent::parse(&tp).is_none() {
        tracing::warn!(traceparent = %tp, "ignoring a traceparent that is not W3C trace context");
        return None;
    }
    let tracestate = std::env::var("TRACESTATE")
        .ok()
        .filter(|s| valid_tracestate(s));
    Some(TraceContext {
        traceparent: tp,
        tracestate,
    })
}

/// Puts a process span in its trace (parent and links, see the module doc) and writes on the
/// delivery's envelope what its copies must carry: the creation context (adopted from this
/// span when the message had none) and this span as the copies' previous span.
pub(crate) fn connect(span: &Span, d: &mut Delivery, parent: Parent) {
    if !exporting() {
        return;
    }
    #[cfg(feature = "otlp")]
    {
        let creation = creation_context(&d.envelope, &d.headers);
        let previous = d
            .envelope
            .previous_span
            .as_deref()
            .and_then(TraceParent::parse);
        let xray = d.aws_trace_header().and_then(TraceParent::from_xray);
        super::otlp::connect(
            span,
            creation.as_ref(),
            previous,
            xray,
            parent == Parent::Creation,
        );
        if let Some(this) = super::otlp::context_of(span) {
            d.envelope.previous_span = Some(this.traceparent.clone());
            if d.envelope.trace.is_none() {
                d.envelope.trace = Some(creation.unwrap_or(TraceContext {
                    traceparent: this.traceparent,
                    tracestate: None,
                }));
            }
        }
    }
    #[cfg(not(feature = "otlp"))]
    let _ = (span, d, parent);
}

/// Exports what is queued (before a Lambda response: the process may be frozen right after).
pub async fn flush() {
    #[cfg(feature = "otlp")]
    super::otlp::flush().await;
}

/// Exports what is queued and stops the exporter (end of `run`, of any command).
pub fn shutdown() {
    #[cfg(feature = "otlp")]
    super::otlp::shutdown();
}

#[cfg(test)]
mod tests {
    use super::*;

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn headers(pairs: &[(&str, &str)]) -> Headers {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn a_producers_traceparent_header_is_the_creation_context_unless_it_is_garbage() {
        let e = Envelope::default();
        let c =
            creation_context(&e, &headers(&[("traceparent", TP), ("tracestate", "a=b")])).unwrap();
        assert_eq!(
            (c.traceparent.as_str(), c.tracestate.as_deref()),
            (TP, Some("a=b"))
        );
        for garbage in [
            "",
            "garbage",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
        ] {
            let h = headers(&[("traceparent", garbage), ("tracestate", "a=b")]);
            assert_eq!(creation_context(&e, &h), None, "{garbage:?}");
        }
        // The envelope's (checked when read) wins over a header.
        let other = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let e = Envelope {
            trace: Some(TraceContext {
                traceparent: other.into(),
                tracestate: None,
            }),
            ..Envelope::default()
        };
        let c = creation_context(&e, &headers(&[("traceparent", TP)])).unwrap();
        assert_eq!(c.traceparent, other);
    }

    #[test]
    fn a_garbage_caller_context_is_ignored() {
        assert_eq!(caller_context(Some("not-a-traceparent")), None);
        assert_eq!(caller_context(Some(TP)).unwrap().traceparent, TP);
    }

    #[test]
    fn every_transport_has_its_messaging_system() {
        assert_eq!(messaging_system(TransportKind::Rabbitmq), "rabbitmq");
        assert_eq!(messaging_system(TransportKind::Sqs), "aws_sqs");
        assert_eq!(messaging_system(TransportKind::Embedded), "sluice");
    }
}
