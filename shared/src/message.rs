//! Messages as bytes plus headers; serde happens at the edges (the pipeline), not here.
//!
//! A [`Delivery`] keeps three things apart: the producer's body and headers, the
//! [`Envelope`] Sluice carried with the message, and the transport's typed [`Receipt`].

use std::{
    collections::BTreeMap,
    time::{Duration, SystemTime},
};

use serde::Serialize;

pub use crate::envelope::{Envelope, Failure, FailureClass};

/// Message headers (lower-case names). Ordered so that output and fingerprints are stable.
pub type Headers = BTreeMap<String, String>;

/// Header names that producers set and Sluice reads.
pub mod header {
    /// Idempotency key chosen by the producer; wins over a key derived from the payload.
    pub const IDEMPOTENCY_KEY: &str = "idempotency-key";
    /// Version of the task schema; the handler declares the versions it accepts.
    pub const SCHEMA_VERSION: &str = "schema-version";
    /// W3C trace context.
    pub const TRACEPARENT: &str = "traceparent";
    /// W3C trace state.
    pub const TRACESTATE: &str = "tracestate";
    /// Media type of the body (informative; bodies are JSON).
    pub const CONTENT_TYPE: &str = "content-type";
    /// Producer's correlation id, copied into logs.
    pub const CORRELATION_ID: &str = "correlation-id";
    /// Prefix of every name owned by Sluice (the envelope's fields, `crate::envelope::field`).
    /// Producers may not set these: a message that arrives with one as a producer header is
    /// treated as forged (bad input).
    pub const RESERVED_PREFIX: &str = "sluice-";
    /// Prefix of free-form application headers.
    pub const APP_PREFIX: &str = "x-";

    /// Headers a producer may set besides `x-*` ones.
    pub const KNOWN: [&str; 6] = [
        IDEMPOTENCY_KEY,
        SCHEMA_VERSION,
        TRACEPARENT,
        TRACESTATE,
        CONTENT_TYPE,
        CORRELATION_ID,
    ];
}

/// A message to publish.
#[derive(Debug, Clone, Default)]
pub struct OutgoingMessage {
    /// The payload (JSON for function inputs, but any bytes are carried intact).
    pub body: Vec<u8>,
    /// Producer headers; `sluice-*` names are refused.
    pub headers: Headers,
    /// Hide the message for this long after publishing.
    pub delay: Duration,
    /// What Sluice sends with it (trace context, workflow slip); empty for a plain send.
    pub envelope: Envelope,
}

impl OutgoingMessage {
    /// A message with this body and no headers.
    pub fn new(body: impl Into<Vec<u8>>) -> Self {
        Self {
            body: body.into(),
            ..Self::default()
        }
    }

    /// Adds a header.
    pub fn header(mut self, name: &str, value: impl Into<String>) -> Self {
        self.headers.insert(name.to_ascii_lowercase(), value.into());
        self
    }

    /// Delivers the message only after `delay`.
    pub fn delay(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }
}

/// How a transport settles one delivery: its own typed handle, never a string formatted on
/// receive and parsed on settle. Opaque outside the crate; a receipt given to another
/// transport's adapter is refused with [`crate::Error::Invalid`].
#[derive(Debug, Clone)]
pub struct Receipt(pub(crate) ReceiptKind);

#[derive(Debug, Clone)]
pub(crate) enum ReceiptKind {
    /// Not from a transport (`invoke`, tests): settling it is refused.
    Detached,
    /// Embedded: the row and the lease token written with the lease.
    #[cfg(feature = "embedded")]
    Embedded { seq: i64, token: i64 },
    /// RabbitMQ: the handle, connection generation, channel and delivery tag.
    #[cfg(feature = "rabbitmq")]
    Rabbitmq(RabbitKey),
    /// SQS: the receipt handle and what settling needs besides it.
    #[cfg(feature = "sqs")]
    Sqs(Box<SqsReceipt>),
}

/// The lease key of a RabbitMQ delivery.
#[cfg(feature = "rabbitmq")]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct RabbitKey {
    pub(crate) handle: u32,
    pub(crate) generation: u64,
    pub(crate) channel: u16,
    pub(crate) tag: u64,
}

/// What an SQS delivery is settled with.
#[cfg(feature = "sqs")]
#[derive(Debug, Clone)]
pub(crate) struct SqsReceipt {
    /// The receipt handle.
    pub(crate) handle: String,
    /// The SQS message id of this copy (copies get new ones).
    pub(crate) message_id: String,
    /// Wall-clock end of the lease of the receive (another handle's deliveries).
    pub(crate) lease_until_ms: i64,
    /// Wall-clock time of the receive.
    pub(crate) received_ms: i64,
    /// FIFO message group.
    pub(crate) group: Option<String>,
    /// `AWSTraceHeader`, re-sent as a system attribute on copies.
    pub(crate) trace: Option<String>,
}

impl Receipt {
    /// A receipt no transport settles (for `invoke` and unit tests).
    pub fn detached() -> Self {
        Receipt(ReceiptKind::Detached)
    }
}

/// A leased message, as a transport hands it to the pipeline.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The message id (stable across redeliveries and copies).
    pub id: String,
    /// The payload bytes exactly as published.
    pub body: Vec<u8>,
    /// Producer headers (transports strip their own bookkeeping and the envelope).
    pub headers: Headers,
    /// 1 on the first delivery; counts every delivery, also those that crashed.
    pub attempt: u32,
    /// What Sluice carried with the message.
    pub envelope: Envelope,
    /// Set when the message looks like one of Sluice's copies but its envelope is malformed:
    /// the envelope was not believed (it is empty here) and the pipeline dead-letters the
    /// message as bad input with this reason.
    pub defect: Option<Rejection>,
    /// The transport's handle for settling this delivery.
    pub receipt: Receipt,
    /// RabbitMQ: the routing key it was delivered with (its process span's attribute).
    #[cfg_attr(not(feature = "rabbitmq"), allow(dead_code))]
    pub(crate) routing_key: Option<String>,
}

impl Delivery {
    /// When the message was first published (the receive time when no transport said).
    pub fn enqueued_at(&self) -> SystemTime {
        self.envelope.enqueued_at.unwrap_or_else(SystemTime::now)
    }

    /// How long the message waited to be worked: since it was due (a delayed or retried copy)
    /// or else since it was first published, until `now`; zero when the clocks disagree.
    pub fn waited(&self, now: SystemTime) -> Duration {
        let since = match (self.envelope.enqueued_at, self.envelope.due_at) {
            (Some(e), Some(d)) => e.max(d),
            (e, d) => e.or(d).unwrap_or(now),
        };
        now.duration_since(since).unwrap_or_default()
    }

    /// Time of the first failure, if an earlier delivery failed.
    pub fn first_failure_at(&self) -> Option<SystemTime> {
        self.envelope.first_failure_at()
    }

    /// RabbitMQ's routing key and delivery tag of this delivery (none on other transports).
    pub(crate) fn rabbitmq_facts(&self) -> (Option<&str>, Option<u64>) {
        match &self.receipt.0 {
            #[cfg(feature = "rabbitmq")]
            ReceiptKind::Rabbitmq(k) => (self.routing_key.as_deref(), Some(k.tag)),
            _ => (None, None),
        }
    }

    /// SQS's `AWSTraceHeader` system attribute (X-Ray), when the message has one.
    #[cfg_attr(not(feature = "otlp"), allow(dead_code))]
    pub(crate) fn aws_trace_header(&self) -> Option<&str> {
        match &self.receipt.0 {
            #[cfg(feature = "sqs")]
            ReceiptKind::Sqs(r) => r.trace.as_deref(),
            _ => None,
        }
    }

    /// The same delivery with another SQS receipt handle: for tests of handles SQS never
    /// issued (feature `conformance`).
    #[cfg(all(feature = "conformance", feature = "sqs"))]
    #[doc(hidden)]
    pub fn with_sqs_handle(mut self, handle: &str) -> Self {
        if let ReceiptKind::Sqs(r) = &mut self.receipt.0 {
            r.handle = handle.to_owned();
        }
        self
    }

    /// A delivery of `body` with no transport behind it (`invoke`, unit tests).
    pub fn detached(id: impl Into<String>, body: Vec<u8>, headers: Headers) -> Self {
        Self {
            id: id.into(),
            body,
            headers,
            attempt: 1,
            envelope: Envelope {
                enqueued_at: Some(SystemTime::now()),
                ..Envelope::default()
            },
            defect: None,
            receipt: Receipt::detached(),
            routing_key: None,
        }
    }
}

/// Queue depths as `stats` reports them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct QueueStats {
    /// Visible now.
    pub ready: u64,
    /// Leased by a consumer.
    pub in_flight: u64,
    /// Waiting for a retry delay.
    pub delayed: u64,
    /// On the dead-letter queue.
    pub dead_lettered: u64,
    /// How long the ready message that has waited longest has been ready, when the transport
    /// can tell without touching a message. JSON: `oldest_ready_age_s` (seconds, or `null`
    /// when unknown, with `oldest_ready_age_unknown` saying why).
    #[serde(flatten)]
    pub oldest_ready: OldestAge,
}

/// The age of a queue's oldest ready message: from the moment it became ready (published,
/// due after a delay, or back after a lease ran out) until now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OldestAge {
    /// Known; zero when no message is ready.
    Known(Duration),
    /// The transport cannot tell without a side effect (a look at the message that counts as
    /// a delivery); why, in words.
    Unknown(&'static str),
}

impl Default for OldestAge {
    fn default() -> Self {
        OldestAge::Known(Duration::ZERO)
    }
}

impl OldestAge {
    /// The age, when known.
    pub fn known(self) -> Option<Duration> {
        match self {
            OldestAge::Known(d) => Some(d),
            OldestAge::Unknown(_) => None,
        }
    }
}

impl Serialize for OldestAge {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(None)?;
        match self {
            OldestAge::Known(d) => m.serialize_entry("oldest_ready_age_s", &d.as_secs_f64())?,
            OldestAge::Unknown(why) => {
                m.serialize_entry("oldest_ready_age_s", &None::<f64>)?;
                m.serialize_entry("oldest_ready_age_unknown", why)?;
            }
        }
        m.end()
    }
}

impl QueueStats {
    /// Nothing left to work: nothing ready, leased or delayed.
    pub fn is_drained(&self) -> bool {
        self.ready == 0 && self.in_flight == 0 && self.delayed == 0
    }
}

/// What `redrive` moves back.
#[derive(Debug, Clone, Default)]
pub struct RedriveFilter {
    /// At most this many messages.
    pub limit: Option<usize>,
    /// Only messages that failed with this class.
    pub error_class: Option<FailureClass>,
    /// List what would move, move nothing.
    pub dry_run: bool,
    /// At most this many messages per second (spares a downstream that just recovered).
    pub rate: Option<f64>,
}

/// Why a message is bad input: a short label (for metrics) and the reason in words.
pub type Rejection = (&'static str, String);

/// Checks a body and its producer headers against the limits and the header rules. The
/// worker runs it on every delivery (bad input is dead-lettered) and `send` before publishing
/// (bad input is refused).
pub fn check_input(
    body: &[u8],
    headers: &Headers,
    limits: &crate::config::LimitSettings,
) -> Result<(), Rejection> {
    if body.len() > limits.max_body_bytes {
        return Err((
            "oversized body",
            format!(
                "body is {} bytes, limit {} (limits.max_body_bytes)",
                body.len(),
                limits.max_body_bytes
            ),
        ));
    }
    if headers.len() > limits.max_headers {
        return Err((
            "too many headers",
            format!(
                "{} headers, limit {} (limits.max_headers)",
                headers.len(),
                limits.max_headers
            ),
        ));
    }
    for (name, value) in headers {
        if name.starts_with(header::RESERVED_PREFIX) {
            return Err((
                "forged header",
                format!("header {name:?} is reserved for Sluice and was set by the producer"),
            ));
        }
        if !header::KNOWN.contains(&name.as_str()) && !name.starts_with(header::APP_PREFIX) {
            return Err((
                "unknown header",
                format!("header {name:?} is not known (use x-* for application headers)"),
            ));
        }
        if value.len() > limits.max_header_bytes {
            return Err((
                "oversized header",
                format!(
                    "header {name:?} is {} bytes, limit {} (limits.max_header_bytes)",
                    value.len(),
                    limits.max_header_bytes
                ),
            ));
        }
    }
    if headers
        .get(header::IDEMPOTENCY_KEY)
        .is_some_and(String::is_empty)
    {
        return Err((
            "empty idempotency key",
            "the idempotency-key header is empty (leave it out to use the function's own key)"
                .into(),
        ));
    }
    Ok(())
}
