//! Messages as bytes plus headers; serde happens at the edges (the pipeline), not here.

use std::{
    collections::BTreeMap,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};

/// Message headers (lower-case names). Ordered so that output and fingerprints are stable.
pub type Headers = BTreeMap<String, String>;

/// Header names that Sluice reads. The failure-history names are the same on every transport.
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
    /// Prefix of every header owned by Sluice. Producers may not set these: a message that
    /// arrives with one it was not given by Sluice is treated as forged (bad input).
    pub const RESERVED_PREFIX: &str = "sluice-";
    /// Prefix of free-form application headers.
    pub const APP_PREFIX: &str = "x-";
    /// Failure history on dead-lettered copies.
    pub const FUNCTION: &str = "sluice-function";
    /// `transient`, `permanent` or `crash_loop`.
    pub const ERROR_CLASS: &str = "sluice-error-class";
    /// Last error text.
    pub const LAST_ERROR: &str = "sluice-last-error";
    /// Deliveries made before dead-lettering.
    pub const ATTEMPTS: &str = "sluice-attempts";
    /// RFC 3339 time of the first failure.
    pub const FIRST_FAILURE_AT: &str = "sluice-first-failure-at";
    /// RFC 3339 time of the last failure.
    pub const LAST_FAILURE_AT: &str = "sluice-last-failure-at";
    /// The queue the message was dead-lettered from.
    pub const ORIGINAL_QUEUE: &str = "sluice-original-queue";

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

/// A leased message, as a transport hands it to the pipeline.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// Transport-assigned message id (stable across redeliveries).
    pub id: String,
    /// The payload bytes exactly as published.
    pub body: Vec<u8>,
    /// Headers as published (adapters strip their own bookkeeping).
    pub headers: Headers,
    /// 1 on the first delivery; counts every delivery, also those that crashed.
    pub attempt: u32,
    /// When the message was first published.
    pub enqueued_at: SystemTime,
    /// Time of the first failure of this message, if an earlier delivery failed.
    pub first_failure_at: Option<SystemTime>,
    /// Opaque adapter handle for settling this delivery (lease token, receipt handle).
    pub receipt: String,
}

/// How a failure is classified on the dead-letter queue (and for `redrive --error-class`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
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
    /// How many times it was redriven before.
    pub redriven: u32,
    /// The raw body bytes.
    #[serde(skip)]
    pub raw_body: Vec<u8>,
}

impl DeadLetter {
    /// Fills `body`/`body_hex` from raw bytes.
    pub fn set_body(&mut self, raw: Vec<u8>) {
        match String::from_utf8(raw.clone()) {
            Ok(s) => {
                self.body = Some(s);
                self.body_hex = None;
            }
            Err(_) => {
                self.body = None;
                self.body_hex = Some(hex::encode(&raw));
            }
        }
        self.raw_body = raw;
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
}

/// Checks a body and its headers against the limits and the header rules; on failure returns
/// a short label (for metrics) and the reason. The worker runs it on every delivery (bad input
/// is dead-lettered) and `send` before publishing (bad input is refused).
pub fn check_envelope(
    body: &[u8],
    headers: &Headers,
    limits: &crate::config::LimitSettings,
) -> Result<(), (&'static str, String)> {
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
    Ok(())
}

/// Milliseconds since the Unix epoch (what the embedded backends store).
pub fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The inverse of [`unix_ms`].
pub fn from_unix_ms(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64)
}

/// RFC 3339 with milliseconds, UTC.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}
