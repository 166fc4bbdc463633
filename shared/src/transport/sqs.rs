//! The SQS transport in container mode (feature `sqs`, client `aws-sdk-sqs`): long polling, a
//! dead-letter queue that carries the failure history, and the queue's `RedrivePolicy` as the
//! crash-loop guard. Endpoint, region and credentials come from the standard AWS environment
//! (`aws-config` defaults: `AWS_ENDPOINT_URL[_SQS]`, `AWS_REGION`, profiles, the task role), so
//! the same binary talks to AWS or to moto.
//!
//! # Queues
//!
//! `transport.url` is a queue URL, or a queue name resolved with `GetQueueUrl` (empty: the
//! `queue` setting). A name ending in `.fifo` is a FIFO queue. The DLQ is `<name>-dlq`
//! (FIFO: `<name>-dlq.fifo`), or whatever the queue's `RedrivePolicy` names.
//!
//! `provision` (and `open`, when the queue does not exist) creates or updates both:
//!
//! | queue | attributes |
//! |---|---|
//! | `<name>-dlq` | `MaximumMessageSize = 262144`, `MessageRetentionPeriod` = 14 days |
//! | `<name>` | `RedrivePolicy {deadLetterTargetArn: <dlq>, maxReceiveCount: max_deliveries}`, `MaximumMessageSize = 262144`, `VisibilityTimeout` = the lease |
//!
//! FIFO queues are created with `ContentBasedDeduplication = false`: every send carries its own
//! `MessageDeduplicationId`. `open` on an existing queue without a `RedrivePolicy` fails with a
//! configuration error that says to run `provision` (it never changes a queue it did not
//! create unless asked). `StartMessageMoveTask` (AWS's own DLQ redrive) is not used: moto
//! answers it with HTTP 500, and the receive/send/delete loop below keeps our history format.
//!
//! # Whole seconds
//!
//! SQS times are whole seconds. Every duration is **rounded up**: the lease (visibility timeout,
//! at least 1 s: a 400 ms lease becomes 1 s), `retry_after` delays and `extend`. So a message
//! is never redelivered earlier than asked, and up to 1 s later (the conformance suite runs with
//! `rounding = 0`). `receive(max, wait)` long-polls for the whole seconds of `wait` (at most
//! 20 s) and spends a sub-second rest on short polls [`MIN_SHORT_POLL_INTERVAL`] apart, so it
//! never waits longer than asked.
//!
//! # Attempts and the crash-loop guard
//!
//! `attempt` = `ApproximateReceiveCount` of the SQS message + the retries carried in
//! `sluice-meta` (standard queues retry with a copy, below). The `RedrivePolicy` moves a message
//! to the DLQ on its `maxReceiveCount + 1`-th receive: it counts the receives of one SQS message
//! (one copy), while the pipeline counts all attempts (its own `max_deliveries` check
//! dead-letters retried messages with history). A message the policy moved has no history of
//! ours: it is listed as class `crash_loop` with attempts = carried retries + the queue's
//! `maxReceiveCount` (read at `open`). Its `ApproximateReceiveCount` is not used: every peek at
//! the DLQ raises it. Its failure times are the carried first failure, else its first receive;
//! SQS does not say when the policy moved it.
//!
//! # Leases
//!
//! Acks are `DeleteMessageBatch` calls: acks waiting together share one (up to 10 entries),
//! and each ack gets its own entry's answer.
//!
//! SQS does not reliably refuse a stale receipt handle: AWS documents that `DeleteMessage` with
//! an older handle "succeeds, but the message might not be deleted", and moto deletes the message
//! with any handle it ever issued. So each handle keeps its own lease clock: the monotonic time
//! before the `ReceiveMessage` call plus the visibility timeout, pushed by `extend`. Settling
//! after that deadline (or twice) returns `LeaseLost` without a call; the message is then
//! delivered again and idempotency absorbs the duplicate. SQS errors that mean the handle is
//! gone (`ReceiptHandleIsInvalid`, `MessageNotInflight`, an expired handle) also map to
//! `LeaseLost`. The clock only knows deliveries this handle received; a delivery settled through
//! another handle falls back to the deadline of its receive, carried in the receipt.
//! `extend` also refuses, before any call, to keep a message in flight more than 12 hours after
//! its receive ([`MAX_VISIBILITY`], SQS's own cap).
//!
//! # Retries: a copy on standard queues, visibility on FIFO queues
//!
//! SQS cannot rewrite a message's attributes, so `ChangeMessageVisibility(d)` alone loses the
//! failure history. On a **standard queue**, `retry_after(d)` sends a copy with `DelaySeconds = d`
//! (rounded up) and the history in `sluice-meta` (message id, retries, first and last failure,
//! last error and class, enqueue time), then deletes the original. If the delete fails the
//! original comes back later as well: a duplicate, never a loss. Delays over 15 minutes (SQS's
//! `DelaySeconds` cap) carry a due time; a consumer that receives the copy early re-sends it
//! with the time left and does not hand it out. The copy has a new SQS message id; `Delivery::id`
//! stays the id `publish` returned. Standard queues have no order to keep, so the copy costs
//! nothing but a send. A retried message counts as `delayed` in `stats`.
//!
//! On a **FIFO queue** a copy would go to the back of its message group (and FIFO queues have no
//! per-message delay), so `retry_after(d)` is `ChangeMessageVisibility(d)`: the message stays
//! in flight and holds back the rest of its group, as DESIGN asks; other groups flow. The price
//! is the history: SQS keeps only `ApproximateReceiveCount`. The first failure time is kept in
//! this process's memory ([`FIFO_MEMO_CAPACITY`] entries) and is `None` when another process
//! (or a restart) receives the message. A retried FIFO message counts as `in_flight` in `stats`.
//!
//! # Headers, `sluice-meta`, and forged `sluice-*` attributes
//!
//! Producer headers travel as `String` message attributes (names must be valid SQS attribute
//! names; values non-empty SQS text). SQS allows 10 attributes; this adapter adds at most one,
//! `sluice-meta`, a JSON object whose keys are the `sluice-*` header names of `message::header`
//! (`sluice-error-class`, `sluice-last-error`, `sluice-first-failure-at`, ...) plus the adapter's
//! own (`sluice-id`, `sluice-retries`, `sluice-body-encoding`, `sluice-redriven-from`, ...): so
//! `publish` accepts at most [`MAX_PRODUCER_HEADERS`] (9) headers. On a copy whose headers would
//! not fit beside it they move into `sluice-meta` (`sluice-headers`) and come back out on receive.
//! `AWSTraceHeader` is returned as the header `x-amzn-trace-id` and re-sent as the system
//! attribute on copies (a producer's own `x-amzn-trace-id` header is an ordinary attribute).
//! Received attribute names are lower-cased (two names differing only in case collapse into
//! one); `Number` values come as their text and `Binary` values as base64, and copies re-send
//! both as `String`.
//!
//! Only `sluice-meta` is read as ours, and only when it is a `String` attribute that parses as
//! exactly our schema (unknown keys refused) with a body that decodes accordingly. Every other
//! attribute, including any other `sluice-*` name and a malformed `sluice-meta`, reaches
//! `Delivery::headers`, where the pipeline rejects `sluice-*` names as forged (bad input,
//! dead-lettered with its bytes). SQS has no way to tell who sent a message, so a producer with
//! `sqs:SendMessage` that writes a well-formed `sluice-meta` is trusted. What it can change is
//! limited: the attempt can only be raised (`ApproximateReceiveCount` is the floor), which
//! dead-letters its own message sooner; the id it picks gives no more than the `idempotency-key`
//! header every producer may set. `publish` refuses `sluice-*` headers.
//!
//! # Bodies
//!
//! SQS bodies are non-empty Unicode text (XML 1.0 characters). An empty body is refused. A body
//! that is not text (invalid UTF-8, NUL and other control characters, U+FFFE/U+FFFF) is sent as
//! base64 with `sluice-body-encoding = base64` in `sluice-meta` and decoded on receive, bytes
//! intact. The size limit applies after encoding (a binary body over about 190 KiB does not fit).
//!
//! # FIFO ids
//!
//! `MessageGroupId` = the header `x-group-id`, else [`DEFAULT_GROUP`] (one group: the whole
//! queue in order). `MessageDeduplicationId` = the header `x-dedup-id`, else the hex SHA-256 of
//! the body: identical bodies published within SQS's 5-minute window are stored once (moto ends
//! the window when the first copy is deleted). Dead-letter and redrive copies derive their own
//! deduplication ids from the message id and its redrive count.
//!
//! # Dead letters: peeking and redrive
//!
//! `dead_letter` sends the body and producer headers to the DLQ with the history in `sluice-meta`
//! (`sluice-function`, `sluice-attempts`, `sluice-original-queue`, ...), then deletes the
//! original. SQS has no peek: `dlq_list`/`dlq_get` receive DLQ messages with a short
//! [`PEEK_LEASE`] and put them back (`ChangeMessageVisibilityBatch` to 0, 10 per call) once read.
//! While one process peeks, those messages are invisible to others (a crash leaves them hidden
//! for the peek lease). Each peek raises their receive count (the DLQ has no redrive policy).
//! Order is by `SentTimestamp` among the messages read; `dlq_get` reads at most
//! [`DLQ_SCAN_LIMIT`] messages. On a FIFO DLQ, SQS hands out nothing behind a message of the
//! same group that a peek holds, so a listing can miss messages of a group.
//! `redrive` peeks the same way, sends each chosen message back to the work queue as a new
//! message (attempts reset, `sluice-redriven` incremented, the dead-letter history kept in
//! `sluice-redriven-from`), deletes its DLQ copy, and puts back what the filter or a dry run
//! left.
//!
//! # Stats
//!
//! From `GetQueueAttributes`, and **approximate** as SQS says: `ready` =
//! `ApproximateNumberOfMessages`, `in_flight` = `...NotVisible`, `delayed` = `...Delayed`,
//! `dead_lettered` = the sum of the three on the DLQ (messages being peeked are still dead
//! letters).

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

pub use aws_sdk_sqs;
use aws_sdk_sqs::{
    config::{timeout::TimeoutConfig, BehaviorVersion},
    error::{DisplayErrorContext, ProvideErrorMetadata, SdkError},
    types::{
        ChangeMessageVisibilityBatchRequestEntry, DeleteMessageBatchRequestEntry, Message,
        MessageAttributeValue, MessageSystemAttributeName, MessageSystemAttributeNameForSends,
        MessageSystemAttributeValue, QueueAttributeName, SendMessageBatchRequestEntry,
    },
    Client,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{Transport, TransportOptions};
use crate::{
    error::{Error, Result},
    message::{
        header, rfc3339, unix_ms, DeadLetter, Delivery, Failure, FailureClass, Headers,
        OutgoingMessage, QueueStats, RedriveFilter,
    },
};

// ---------------------------------------------------------------------------------------------
// Broker limits, checked before any call. Message quotas:
// https://docs.aws.amazon.com/AWSSimpleQueueService/latest/SQSDeveloperGuide/quotas-messages.html
// Queue quotas (names): https://docs.aws.amazon.com/AWSSimpleQueueService/latest/SQSDeveloperGuide/quotas-queues.html

/// Largest message: the body plus every attribute's name, type and value (SQS counts them all).
/// The queues are provisioned with the same `MaximumMessageSize` (moto defaults to 1 MiB).
pub const MAX_MESSAGE_BYTES: usize = 256 * 1024;
/// Entries in one `SendMessageBatch`, `DeleteMessageBatch` or `ChangeMessageVisibilityBatch`
/// (moto accepts 11 in the last two; we never send more than 10).
pub const MAX_BATCH_ENTRIES: usize = 10;
/// Sum of the message sizes in one `SendMessageBatch` request.
pub const MAX_BATCH_BYTES: usize = 256 * 1024;
/// Message attributes on one message.
pub const MAX_MESSAGE_ATTRIBUTES: usize = 10;
/// Headers a producer may set: one attribute is kept for `sluice-meta`.
pub const MAX_PRODUCER_HEADERS: usize = MAX_MESSAGE_ATTRIBUTES - 1;
/// Longest visibility timeout, and longest time in flight after a receive.
pub const MAX_VISIBILITY: Duration = Duration::from_secs(43_200);
/// Longest per-message delay (`DelaySeconds`).
pub const MAX_DELAY: Duration = Duration::from_secs(900);
/// Longest long poll (`WaitTimeSeconds`).
pub const MAX_WAIT: Duration = Duration::from_secs(20);
/// Messages one `ReceiveMessage` returns at most.
pub const MAX_RECEIVE: usize = 10;
/// `maxReceiveCount` of a `RedrivePolicy` is 1 to 1000.
pub const MAX_RECEIVE_COUNT: u32 = 1000;
/// Queue names: 1 to 80 characters, `.fifo` suffix included.
pub const MAX_QUEUE_NAME: usize = 80;
/// Message attribute names: up to 256 characters.
pub const MAX_ATTRIBUTE_NAME: usize = 256;
/// FIFO `MessageGroupId` and `MessageDeduplicationId`: up to 128 characters.
pub const MAX_FIFO_ID: usize = 128;
/// Longest retention (14 days), given to the DLQ.
const MAX_RETENTION_SECONDS: u64 = 1_209_600;

// ---------------------------------------------------------------------------------------------
// The adapter's own names and timings.

/// The one message attribute this adapter adds (JSON; see "Headers" above).
pub const META_ATTRIBUTE: &str = "sluice-meta";
/// Producer header naming the FIFO message group.
pub const GROUP_ID_HEADER: &str = "x-group-id";
/// Producer header with the FIFO deduplication id.
pub const DEDUP_ID_HEADER: &str = "x-dedup-id";
/// Header that carries SQS's `AWSTraceHeader` system attribute.
pub const TRACE_HEADER: &str = "x-amzn-trace-id";
/// FIFO message group of messages without `x-group-id`.
pub const DEFAULT_GROUP: &str = "default";
/// Messages `dlq_get` and `redrive` read at most in one call.
pub const DLQ_SCAN_LIMIT: usize = 1000;
/// How long a peek (`dlq_list`, `dlq_get`, `redrive`) hides the DLQ messages it reads if the
/// process dies before it puts them back.
pub const PEEK_LEASE: Duration = Duration::from_secs(30);
/// Spacing of the short polls that fill the sub-second part of a receive wait (requests cost
/// money on AWS: `transport.poll_interval` is used, but never below this).
pub const MIN_SHORT_POLL_INTERVAL: Duration = Duration::from_millis(50);
/// FIFO first-failure times remembered by one process (see "Retries").
pub const FIFO_MEMO_CAPACITY: usize = 10_000;
/// The last error carried in `sluice-meta` is cut to this many bytes (the whole message must fit
/// in [`MAX_MESSAGE_BYTES`]).
const LAST_ERROR_MAX_BYTES: usize = 1024;
/// One request attempt: longer than a 20 s long poll.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(25);
/// One operation with the SDK's own retries.
const OPERATION_TIMEOUT: Duration = Duration::from_secs(60);
/// Rounds for batch entries that failed on the server side (not the sender's fault).
const BATCH_ROUNDS: u32 = 3;

// ---------------------------------------------------------------------------------------------
// Configuration

/// Where the queues are and how they behave, derived from [`TransportOptions`].
#[derive(Debug, Clone)]
pub struct SqsConfig {
    /// The work queue's name.
    pub queue_name: String,
    /// The URL given as `transport.url`, when a URL was given.
    pub queue_url: Option<String>,
    /// `<name>-dlq` (FIFO: `<name>-dlq.fifo`).
    pub dlq_name: String,
    /// A FIFO queue (the name ends in `.fifo`).
    pub fifo: bool,
    /// Visibility timeout of a receive: the lease rounded up to whole seconds, at least 1 s.
    pub visibility: Duration,
    /// `maxReceiveCount` given to the queue's `RedrivePolicy` by `provision`.
    pub max_receive_count: u32,
}

impl SqsConfig {
    /// Checks the options against the SQS limits; makes no call.
    pub fn from_options(opts: &TransportOptions) -> Result<Self> {
        let url = opts.url.trim();
        let (queue_name, queue_url) = if url.starts_with("https://") || url.starts_with("http://") {
            let name = url.trim_end_matches('/').rsplit('/').next().unwrap_or("");
            (name.to_owned(), Some(url.to_owned()))
        } else if url.is_empty() {
            (opts.queue.clone(), None)
        } else {
            (url.to_owned(), None)
        };
        check_queue_name(&queue_name)?;
        let fifo = queue_name.ends_with(".fifo");
        let dlq_name = dlq_name_for(&queue_name);
        check_queue_name(&dlq_name).map_err(|_| {
            Error::Config(format!(
                "key `transport.url`: queue name {queue_name:?} is too long for its DLQ {dlq_name:?} ({MAX_QUEUE_NAME} characters at most)"
            ))
        })?;
        let visibility = Duration::from_secs(ceil_secs(opts.lease).max(1));
        if visibility > MAX_VISIBILITY {
            return Err(Error::Config(format!(
                "key `transport.lease`: {:?} is over the SQS visibility limit of {MAX_VISIBILITY:?}",
                opts.lease
            )));
        }
        if !(1..=MAX_RECEIVE_COUNT).contains(&opts.max_deliveries) {
            return Err(Error::Config(format!(
                "key `retry.max_deliveries`: {} is outside SQS's maxReceiveCount range 1..={MAX_RECEIVE_COUNT}",
                opts.max_deliveries
            )));
        }
        Ok(Self {
            queue_name,
            queue_url,
            dlq_name,
            fifo,
            visibility,
            max_receive_count: opts.max_deliveries,
        })
    }
}

fn dlq_name_for(queue: &str) -> String {
    match queue.strip_suffix(".fifo") {
        Some(base) => format!("{base}-dlq.fifo"),
        None => format!("{queue}-dlq"),
    }
}

fn check_queue_name(name: &str) -> Result<()> {
    let base = name.strip_suffix(".fifo").unwrap_or(name);
    let ok = !base.is_empty()
        && name.len() <= MAX_QUEUE_NAME
        && base
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(Error::Config(format!(
            "key `transport.url`: {name:?} is not an SQS queue URL or name (1 to {MAX_QUEUE_NAME} characters: letters, digits, - and _, optionally ending in .fifo)"
        )))
    }
}

/// The client configuration of the standard AWS environment, with this adapter's timeouts.
/// [`SqsTransport::open_with`] takes the result (tests add interceptors to it).
pub async fn sdk_config_from_env() -> Result<aws_sdk_sqs::config::Builder> {
    let shared = aws_config::load_defaults(BehaviorVersion::latest()).await;
    if shared.region().is_none() {
        return Err(Error::Config(
            "key `transport.url`: the SQS transport needs an AWS region (set AWS_REGION)".into(),
        ));
    }
    Ok(aws_sdk_sqs::config::Builder::from(&shared).timeout_config(
        TimeoutConfig::builder()
            .operation_attempt_timeout(ATTEMPT_TIMEOUT)
            .operation_timeout(OPERATION_TIMEOUT)
            .build(),
    ))
}

// ---------------------------------------------------------------------------------------------
// What travels with a message: `sluice-meta`, and the receipt handed to the pipeline.

/// The `sluice-meta` attribute. Keys are the `message::header` names where one exists (checked
/// by a test); unknown keys make the attribute foreign (see "Headers" above).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Meta {
    /// The message id `publish` returned (copies get new SQS ids).
    #[serde(rename = "sluice-id", default, skip_serializing_if = "Option::is_none")]
    id: Option<String>,
    /// `base64` when the body is not SQS text.
    #[serde(
        rename = "sluice-body-encoding",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    body_encoding: Option<String>,
    /// Deliveries made before this copy was sent.
    #[serde(rename = "sluice-retries", default, skip_serializing_if = "is_zero")]
    retries: u32,
    /// RFC 3339 time of the first publish.
    #[serde(
        rename = "sluice-enqueued-at",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    enqueued_at: Option<String>,
    /// RFC 3339 time before which a delayed copy must not be handed out (delays over 15 min).
    #[serde(
        rename = "sluice-due-at",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    due_at: Option<String>,
    #[serde(
        rename = "sluice-first-failure-at",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    first_failure_at: Option<String>,
    #[serde(
        rename = "sluice-last-failure-at",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    last_failure_at: Option<String>,
    #[serde(
        rename = "sluice-last-error",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    last_error: Option<String>,
    #[serde(
        rename = "sluice-error-class",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    error_class: Option<FailureClass>,
    /// Dead letters only, from here to `dead_lettered_at`.
    #[serde(
        rename = "sluice-function",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    function: Option<String>,
    #[serde(
        rename = "sluice-attempts",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    attempts: Option<u32>,
    #[serde(
        rename = "sluice-original-queue",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    original_queue: Option<String>,
    #[serde(
        rename = "sluice-dead-lettered-at",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    dead_lettered_at: Option<String>,
    /// Times redriven from the DLQ.
    #[serde(rename = "sluice-redriven", default, skip_serializing_if = "is_zero")]
    redriven: u32,
    /// The dead-letter history of the last redrive.
    #[serde(
        rename = "sluice-redriven-from",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    redriven_from: Option<Box<Meta>>,
    /// Producer headers that did not fit beside `sluice-meta` as attributes (copies only).
    #[serde(
        rename = "sluice-headers",
        default,
        skip_serializing_if = "Headers::is_empty"
    )]
    headers: Headers,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl Meta {
    fn is_empty(&self) -> bool {
        *self == Meta::default()
    }

    /// The history a delivery carries into its copies (not the body encoding, due time or
    /// overflow headers, which belong to one SQS message).
    fn history(&self) -> Meta {
        Meta {
            body_encoding: None,
            due_at: None,
            headers: Headers::new(),
            ..self.clone()
        }
    }
}

/// `Delivery::receipt`: what settling needs besides the delivery's own fields.
#[derive(Debug, Serialize, Deserialize)]
struct Receipt {
    /// SQS receipt handle.
    #[serde(rename = "h")]
    handle: String,
    /// SQS message id of this copy.
    #[serde(rename = "m")]
    message_id: String,
    /// Wall-clock ms of the receive call, and the end of the lease it gave.
    #[serde(rename = "r")]
    received_ms: i64,
    #[serde(rename = "u")]
    lease_until_ms: i64,
    /// FIFO message group.
    #[serde(rename = "g", default, skip_serializing_if = "Option::is_none")]
    group: Option<String>,
    /// `AWSTraceHeader`, re-sent as a system attribute on copies.
    #[serde(rename = "t", default, skip_serializing_if = "Option::is_none")]
    trace: Option<String>,
    /// History carried by this copy.
    #[serde(rename = "x", default)]
    meta: Meta,
}

fn parse_receipt(d: &Delivery) -> Result<Receipt> {
    serde_json::from_str(&d.receipt).map_err(|_| {
        Error::Invalid(format!(
            "message {}: the receipt is not one of the SQS transport's",
            d.id
        ))
    })
}

/// One SQS message as received and decoded.
#[derive(Debug)]
struct Received {
    message_id: String,
    handle: String,
    body: Vec<u8>,
    headers: Headers,
    /// Our `sluice-meta`, when the message carries a valid one.
    meta: Option<Meta>,
    receive_count: u32,
    sent_ms: i64,
    first_receive_ms: Option<i64>,
    group: Option<String>,
    trace: Option<String>,
}

impl Received {
    fn id(&self) -> String {
        self.meta
            .as_ref()
            .and_then(|m| m.id.clone())
            .unwrap_or_else(|| self.message_id.clone())
    }
}

fn decode_message(m: &Message) -> Received {
    let system = m.attributes();
    let sys = |name: MessageSystemAttributeName| system.and_then(|s| s.get(&name)).cloned();
    let mut headers = Headers::new();
    let mut meta_text = None;
    for (name, value) in m.message_attributes().into_iter().flatten() {
        let text = if value.data_type().starts_with("Binary") {
            value.binary_value().map(|b| base64_encode(b.as_ref()))
        } else {
            value.string_value().map(str::to_owned)
        };
        let Some(text) = text else { continue };
        if name == META_ATTRIBUTE && value.data_type() == "String" {
            meta_text = Some(text);
        } else {
            headers.insert(name.to_ascii_lowercase(), text);
        }
    }
    let raw = m.body().unwrap_or_default();
    let mut meta = meta_text
        .as_deref()
        .and_then(|t| serde_json::from_str::<Meta>(t).ok());
    let body = match meta.as_ref().map(|m| m.body_encoding.as_deref()) {
        Some(Some("base64")) => base64_decode(raw),
        Some(Some(_)) => None,
        _ => Some(raw.as_bytes().to_vec()),
    };
    let body = match body {
        Some(b) => b,
        None => {
            // Not ours after all: the attribute goes to the pipeline as a (forged) header.
            meta = None;
            raw.as_bytes().to_vec()
        }
    };
    match &mut meta {
        Some(meta) => headers.append(&mut std::mem::take(&mut meta.headers)),
        None => {
            if let Some(t) = meta_text {
                headers.insert(META_ATTRIBUTE.to_owned(), t);
            }
        }
    }
    let trace = sys(MessageSystemAttributeName::AwsTraceHeader);
    if let Some(t) = &trace {
        headers
            .entry(TRACE_HEADER.to_owned())
            .or_insert_with(|| t.clone());
    }
    let int = |name| sys(name).and_then(|v| v.parse::<i64>().ok());
    Received {
        message_id: m.message_id().unwrap_or_default().to_owned(),
        handle: m.receipt_handle().unwrap_or_default().to_owned(),
        body,
        headers,
        meta,
        receive_count: int(MessageSystemAttributeName::ApproximateReceiveCount).unwrap_or(1) as u32,
        sent_ms: int(MessageSystemAttributeName::SentTimestamp).unwrap_or(0),
        first_receive_ms: int(MessageSystemAttributeName::ApproximateFirstReceiveTimestamp),
        group: sys(MessageSystemAttributeName::MessageGroupId),
        trace,
    }
}

/// A message ready to send: checked, encoded and measured.
#[derive(Debug)]
struct Entry {
    body: String,
    attributes: Vec<(String, String)>,
    trace: Option<String>,
    delay_seconds: i32,
    group: Option<String>,
    dedup: Option<String>,
    size: usize,
}

/// What kind of send an entry is for: producer input is checked strictly, copies carry what
/// the delivery had.
enum Sender<'a> {
    Producer,
    Copy {
        trace: Option<&'a str>,
        group: Option<&'a str>,
        dedup: String,
    },
}

fn encode_entry(
    body: &[u8],
    headers: &Headers,
    mut meta: Meta,
    delay: Duration,
    fifo: bool,
    sender: Sender<'_>,
) -> Result<Entry> {
    if body.is_empty() {
        return Err(Error::Invalid("SQS does not accept an empty body".into()));
    }
    let delay_seconds = ceil_secs(delay);
    if delay_seconds > 0 && fifo {
        return Err(Error::Invalid(
            "FIFO queues have no per-message delay (SQS refuses DelaySeconds on them)".into(),
        ));
    }
    if delay_seconds > MAX_DELAY.as_secs() {
        return Err(Error::Limit(format!(
            "delay {delay:?} is over the SQS per-message limit of {MAX_DELAY:?}"
        )));
    }
    let body = match sqs_text(body) {
        Some(text) => text.to_owned(),
        None => {
            meta.body_encoding = Some("base64".into());
            base64_encode(body)
        }
    };
    let mut attributes: Vec<(String, String)> = Vec::new();
    let mut trace = None;
    let (group, dedup) = match sender {
        Sender::Producer => {
            if headers.len() > MAX_PRODUCER_HEADERS {
                return Err(Error::Limit(format!(
                    "{} headers, SQS carries {MAX_PRODUCER_HEADERS} (10 message attributes, one kept for {META_ATTRIBUTE})",
                    headers.len()
                )));
            }
            for (name, value) in headers {
                check_header(name, value)?;
                attributes.push((name.clone(), value.clone()));
            }
            let group = fifo.then(|| {
                headers
                    .get(GROUP_ID_HEADER)
                    .cloned()
                    .unwrap_or_else(|| DEFAULT_GROUP.to_owned())
            });
            let dedup = fifo.then(|| {
                headers
                    .get(DEDUP_ID_HEADER)
                    .cloned()
                    .unwrap_or_else(|| hex::encode(Sha256::digest(body.as_bytes())))
            });
            for (what, id) in [("x-group-id", &group), ("x-dedup-id", &dedup)] {
                if let Some(id) = id {
                    check_fifo_id(what, id)?;
                }
            }
            (group, dedup)
        }
        Sender::Copy {
            trace: t,
            group,
            dedup,
        } => {
            let mut rest: Vec<(&String, &String)> = Vec::new();
            for (name, value) in headers {
                if t.is_some() && name == TRACE_HEADER && Some(value.as_str()) == t {
                    trace = Some(value.clone());
                } else if name == META_ATTRIBUTE
                    || !valid_attribute_name(name)
                    || value.is_empty()
                    || sqs_text(value.as_bytes()).is_none()
                {
                    meta.headers.insert(name.clone(), value.clone());
                } else {
                    rest.push((name, value));
                }
            }
            if rest.len() > MAX_PRODUCER_HEADERS {
                meta.headers
                    .extend(rest.drain(..).map(|(n, v)| (n.clone(), v.clone())));
            }
            attributes.extend(rest.into_iter().map(|(n, v)| (n.clone(), v.clone())));
            let group = fifo.then(|| group.unwrap_or(DEFAULT_GROUP).to_owned());
            (group, fifo.then_some(dedup))
        }
    };
    if !meta.is_empty() {
        let text = serde_json::to_string(&meta)
            .map_err(|e| Error::Invalid(format!("{META_ATTRIBUTE}: {e}")))?;
        attributes.push((META_ATTRIBUTE.to_owned(), text));
    }
    let size = body.len()
        + attributes
            .iter()
            .map(|(n, v)| n.len() + "String".len() + v.len())
            .sum::<usize>();
    if size > MAX_MESSAGE_BYTES {
        return Err(Error::Limit(format!(
            "message is {size} bytes with its attributes{}, SQS takes {MAX_MESSAGE_BYTES}",
            if meta.body_encoding.is_some() {
                " (the body is not SQS text and travels as base64)"
            } else {
                ""
            }
        )));
    }
    Ok(Entry {
        body,
        attributes,
        trace,
        delay_seconds: delay_seconds as i32,
        group,
        dedup,
        size,
    })
}

fn check_header(name: &str, value: &str) -> Result<()> {
    if name.starts_with(header::RESERVED_PREFIX) {
        return Err(Error::Invalid(format!(
            "header {name:?} is reserved for Sluice"
        )));
    }
    if !valid_attribute_name(name) {
        return Err(Error::Invalid(format!(
            "header {name:?} is not a valid SQS attribute name (letters, digits, _ - and ., up to {MAX_ATTRIBUTE_NAME} characters, no leading aws./amazon.)"
        )));
    }
    if value.is_empty() || sqs_text(value.as_bytes()).is_none() {
        return Err(Error::Invalid(format!(
            "header {name:?}: SQS takes only non-empty text values"
        )));
    }
    Ok(())
}

fn check_fifo_id(what: &str, id: &str) -> Result<()> {
    if id.is_empty() || id.len() > MAX_FIFO_ID || !id.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(Error::Invalid(format!(
            "header {what}: SQS takes 1 to {MAX_FIFO_ID} letters, digits and punctuation"
        )));
    }
    Ok(())
}

fn valid_attribute_name(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    !name.is_empty()
        && name.len() <= MAX_ATTRIBUTE_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
        && !name.starts_with('.')
        && !name.ends_with('.')
        && !name.contains("..")
        && !lower.starts_with("aws.")
        && !lower.starts_with("amazon.")
}

/// The body as SQS text, if it is (XML 1.0 characters).
fn sqs_text(bytes: &[u8]) -> Option<&str> {
    let s = std::str::from_utf8(bytes).ok()?;
    s.chars()
        .all(|c| {
            matches!(c, '\t' | '\n' | '\r' | '\u{20}'..='\u{D7FF}' | '\u{E000}'..='\u{FFFD}' | '\u{10000}'..='\u{10FFFF}')
        })
        .then_some(s)
}

/// Splits entry sizes into batches of at most `max_entries` whose sizes add up to at most
/// `max_bytes` (each entry is at most `max_bytes` itself).
fn batches(sizes: &[usize], max_entries: usize, max_bytes: usize) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, &size) in sizes.iter().enumerate() {
        if i > start && (i - start == max_entries || bytes + size > max_bytes) {
            out.push(start..i);
            (start, bytes) = (i, 0);
        }
        bytes += size;
    }
    if start < sizes.len() {
        out.push(start..sizes.len());
    }
    out
}

// ---------------------------------------------------------------------------------------------
// The adapter

/// One handle's view of a delivery it received (see "Leases").
#[derive(Debug, Clone, Copy)]
struct Lease {
    received: Instant,
    until: Instant,
    settled: bool,
}

/// First-failure times of FIFO messages retried by this process, by SQS message id.
#[derive(Default)]
struct FifoMemo {
    first_failure: HashMap<String, SystemTime>,
    order: VecDeque<String>,
}

impl FifoMemo {
    fn record(&mut self, message_id: &str, at: SystemTime) {
        if self.first_failure.contains_key(message_id) {
            return;
        }
        self.first_failure.insert(message_id.to_owned(), at);
        self.order.push_back(message_id.to_owned());
        while self.order.len() > FIFO_MEMO_CAPACITY {
            if let Some(old) = self.order.pop_front() {
                self.first_failure.remove(&old);
            }
        }
    }
}

/// The SQS transport: a cheap handle (clones share the client and the lease clock).
#[derive(Clone)]
pub struct SqsTransport(Arc<Shared>);

/// What the handles of one `open` share.
struct Shared {
    opts: TransportOptions,
    config: SqsConfig,
    client: Client,
    queue_url: String,
    dlq_url: String,
    /// The work queue's `maxReceiveCount`, read at open (attempts of crash-loop dead letters).
    max_receive_count: u32,
    leases: Mutex<HashMap<String, Lease>>,
    fifo_memo: Mutex<FifoMemo>,
    /// Acks waiting to be sent together (see [`batch_acks`]).
    acks: tokio::sync::mpsc::UnboundedSender<PendingAck>,
}

/// One ack waiting for the batcher, and where its own answer goes.
struct PendingAck {
    handle: String,
    reply: tokio::sync::oneshot::Sender<Result<(), SdkErr>>,
}

/// Sends acks as `DeleteMessageBatch` calls of up to [`MAX_BATCH_ENTRIES`]: whatever acks are
/// waiting when a call can go out go together (under load batches fill while one is in
/// flight; an idle worker's ack goes alone at once, so batching adds no latency). Each ack gets
/// its own entry's answer: a failed entry fails that ack only.
async fn batch_acks(
    client: Client,
    queue_url: String,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<PendingAck>,
) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH_ENTRIES {
            match rx.try_recv() {
                Ok(p) => batch.push(p),
                Err(_) => break,
            }
        }
        let entries = batch
            .iter()
            .enumerate()
            .filter_map(|(i, p)| {
                DeleteMessageBatchRequestEntry::builder()
                    .id(i.to_string())
                    .receipt_handle(&p.handle)
                    .build()
                    .ok()
            })
            .collect();
        let out = client
            .delete_message_batch()
            .queue_url(&queue_url)
            .set_entries(Some(entries))
            .send()
            .await;
        match out {
            Ok(out) => {
                let mut failed: HashMap<String, SdkErr> = out
                    .failed()
                    .iter()
                    .map(|f| {
                        let err = SdkErr {
                            op: "DeleteMessageBatch",
                            queue: queue_url.clone(),
                            code: Some(f.code().to_owned()),
                            message: f.message().map(str::to_owned),
                            text: format!("{}: {}", f.code(), f.message().unwrap_or_default()),
                        };
                        (f.id().to_owned(), err)
                    })
                    .collect();
                for (i, p) in batch.into_iter().enumerate() {
                    let _ = p.reply.send(match failed.remove(&i.to_string()) {
                        Some(e) => Err(e),
                        None => Ok(()),
                    });
                }
            }
            Err(e) => {
                let e = SdkErr::new("DeleteMessageBatch", &queue_url, e);
                for p in batch {
                    let _ = p.reply.send(Err(SdkErr {
                        op: e.op,
                        queue: e.queue.clone(),
                        code: e.code.clone(),
                        message: e.message.clone(),
                        text: e.text.clone(),
                    }));
                }
            }
        }
    }
}

impl SqsTransport {
    /// Lambda mode: one record of an SQS event as a delivery of this queue (see `Shared`).
    #[cfg(feature = "lambda")]
    pub fn lambda_delivery(
        &self,
        record: &aws_lambda_events::event::sqs::SqsMessage,
        deadline_ms: i64,
    ) -> Result<Delivery> {
        self.0.lambda_delivery(record, deadline_ms)
    }

    /// Opens the queue named by `opts.url` with the client configuration of the standard AWS
    /// environment; provisions it (and its DLQ) when it does not exist.
    pub async fn open(opts: TransportOptions) -> Result<Self> {
        SqsConfig::from_options(&opts)?;
        let sdk = sdk_config_from_env().await?.build();
        Self::open_with(opts, sdk).await
    }

    /// [`open`](Self::open) with an explicit SDK configuration.
    pub async fn open_with(opts: TransportOptions, sdk: aws_sdk_sqs::Config) -> Result<Self> {
        let config = SqsConfig::from_options(&opts)?;
        let client = Client::from_conf(sdk);
        let known = match &config.queue_url {
            Some(url) => Some(url.clone()),
            None => queue_url(&client, &config.queue_name).await?,
        };
        let existing = match known {
            Some(url) => match redrive_policy(&client, &url).await {
                Ok(policy) => Some((url, policy)),
                Err(e) if is_queue_missing(&e) => None,
                Err(e) => return Err(sdk_err("GetQueueAttributes", &config.queue_name, e)),
            },
            None => None,
        };
        let (queue_url, dlq_url, max_receive_count) = match existing {
            Some((url, Some((dlq_name, max)))) => {
                let dlq_url = sibling_url(&url, &dlq_name);
                (url, dlq_url, max)
            }
            Some((_, None)) => {
                return Err(Error::Config(format!(
                    "key `transport.url`: SQS queue {:?} has no RedrivePolicy (no crash-loop guard, no DLQ): run `provision`",
                    config.queue_name
                )))
            }
            None => {
                let (q, d) = provision_queues(&client, &config).await?;
                (q, d, config.max_receive_count)
            }
        };
        let (acks, pending) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(batch_acks(client.clone(), queue_url.clone(), pending));
        Ok(Self(Arc::new(Shared {
            opts,
            config,
            client,
            queue_url,
            dlq_url,
            max_receive_count,
            leases: Mutex::new(HashMap::new()),
            fifo_memo: Mutex::new(FifoMemo::default()),
            acks,
        })))
    }

    /// The work queue's URL.
    pub fn queue_url(&self) -> &str {
        &self.0.queue_url
    }

    /// The DLQ's URL.
    pub fn dlq_url(&self) -> &str {
        &self.0.dlq_url
    }

    /// The queue settings in force.
    pub fn config(&self) -> &SqsConfig {
        &self.0.config
    }
}

impl Shared {
    async fn publish_messages(&self, msgs: Vec<OutgoingMessage>) -> Result<Vec<String>> {
        let entries = msgs
            .iter()
            .map(|m| {
                encode_entry(
                    &m.body,
                    &m.headers,
                    Meta::default(),
                    m.delay,
                    self.config.fifo,
                    Sender::Producer,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        self.send_entries(&self.queue_url, entries).await
    }

    /// Sends entries in batches; returns their SQS message ids in order. An entry refused by
    /// SQS as the sender's fault fails the call at once (what SQS took stays sent: a caller that
    /// publishes again duplicates it); entries that failed on the server side are sent again,
    /// up to [`BATCH_ROUNDS`] rounds.
    async fn send_entries(&self, url: &str, entries: Vec<Entry>) -> Result<Vec<String>> {
        let sizes: Vec<usize> = entries.iter().map(|e| e.size).collect();
        let mut ids = vec![String::new(); entries.len()];
        for range in batches(&sizes, MAX_BATCH_ENTRIES, MAX_BATCH_BYTES) {
            let mut pending: Vec<usize> = range.collect();
            for round in 1..=BATCH_ROUNDS {
                let request = pending
                    .iter()
                    .map(|&i| batch_entry(i, &entries[i]))
                    .collect::<Result<Vec<_>>>()?;
                let out = self
                    .client
                    .send_message_batch()
                    .queue_url(url)
                    .set_entries(Some(request))
                    .send()
                    .await
                    .map_err(|e| sdk_err("SendMessageBatch", url, e))?;
                for ok in out.successful() {
                    if let Ok(i) = ok.id().parse::<usize>() {
                        ids[i] = ok.message_id().to_owned();
                    }
                }
                if let Some(f) = out.failed().iter().find(|f| f.sender_fault()) {
                    return Err(Error::Invalid(format!(
                        "SQS refused a message: {} {}",
                        f.code(),
                        f.message().unwrap_or_default()
                    )));
                }
                pending.retain(|&i| ids[i].is_empty());
                if pending.is_empty() {
                    break;
                }
                if round == BATCH_ROUNDS {
                    return Err(Error::Transport(format!(
                        "sqs: SendMessageBatch {url}: {} messages still failing after {BATCH_ROUNDS} rounds",
                        pending.len()
                    )));
                }
                tokio::time::sleep(Duration::from_millis(100 << round)).await;
            }
        }
        Ok(ids)
    }

    async fn receive_messages(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>> {
        if max == 0 {
            return Ok(Vec::new());
        }
        let deadline = Instant::now() + wait;
        let pause = self.opts.poll_interval.max(MIN_SHORT_POLL_INTERVAL);
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            let wait_seconds = remaining.as_secs().min(MAX_WAIT.as_secs());
            let got = self
                .receive_once(max.min(MAX_RECEIVE), wait_seconds)
                .await?;
            let remaining = deadline.saturating_duration_since(Instant::now());
            if !got.is_empty() || remaining.is_zero() {
                return Ok(got);
            }
            if wait_seconds == 0 {
                tokio::time::sleep(pause.min(remaining)).await;
            }
        }
    }

    async fn receive_once(&self, max: usize, wait_seconds: u64) -> Result<Vec<Delivery>> {
        let visibility = self.config.visibility;
        let (started, started_ms) = (Instant::now(), unix_ms(SystemTime::now()));
        let out = self
            .client
            .receive_message()
            .queue_url(&self.queue_url)
            .max_number_of_messages(max as i32)
            .wait_time_seconds(wait_seconds as i32)
            .visibility_timeout(visibility.as_secs() as i32)
            .set_message_system_attribute_names(Some(vec![
                MessageSystemAttributeName::ApproximateReceiveCount,
                MessageSystemAttributeName::ApproximateFirstReceiveTimestamp,
                MessageSystemAttributeName::SentTimestamp,
                MessageSystemAttributeName::AwsTraceHeader,
                MessageSystemAttributeName::MessageGroupId,
            ]))
            .message_attribute_names("All")
            .send()
            .await
            .map_err(|e| sdk_err("ReceiveMessage", &self.config.queue_name, e))?;
        let now = Instant::now();
        self.leases
            .lock()
            .expect("lease map")
            .retain(|_, l| l.until > now);
        let mut deliveries = Vec::new();
        for m in out.messages() {
            let r = decode_message(m);
            if let Some(due) = self.due_later(&r) {
                self.hop(r, due).await;
                continue;
            }
            self.leases.lock().expect("lease map").insert(
                r.handle.clone(),
                Lease {
                    received: started,
                    until: started + visibility,
                    settled: false,
                },
            );
            deliveries.push(self.delivery(
                r,
                started_ms,
                started_ms + visibility.as_millis() as i64,
            ));
        }
        Ok(deliveries)
    }

    /// A long-delay copy received at least a second before its due time: how long is left.
    fn due_later(&self, r: &Received) -> Option<Duration> {
        if self.config.fifo {
            return None;
        }
        let due = r.meta.as_ref()?.due_at.as_deref()?;
        let due = humantime::parse_rfc3339(due).ok()?;
        let left = due.duration_since(SystemTime::now()).ok()?;
        (left >= Duration::from_secs(1)).then_some(left)
    }

    /// Re-sends a long-delay copy with the time left (at most 15 min), then deletes it.
    async fn hop(&self, r: Received, left: Duration) {
        let meta = r.meta.clone().unwrap_or_default();
        let copy = encode_entry(
            &r.body,
            &r.headers,
            meta.history_with_due(),
            left.min(MAX_DELAY),
            false,
            Sender::Copy {
                trace: r.trace.as_deref(),
                group: None,
                dedup: String::new(),
            },
        );
        let result = match copy {
            Ok(entry) => self.send_entries(&self.queue_url, vec![entry]).await,
            Err(e) => Err(e),
        };
        match result {
            Ok(_) => {
                if let Err(e) = self.delete(&self.queue_url, &r.handle).await {
                    tracing::warn!(error = %e, "a long-delay copy was re-sent but not deleted: it will be delivered twice");
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not re-send a long-delay copy; it returns when its visibility ends")
            }
        }
    }

    fn delivery(&self, r: Received, received_ms: i64, lease_until_ms: i64) -> Delivery {
        let meta = r.meta.clone().unwrap_or_default();
        let first_failure_at = meta
            .first_failure_at
            .as_deref()
            .and_then(|t| humantime::parse_rfc3339(t).ok())
            .or_else(|| {
                self.config.fifo.then(|| {
                    let memo = self.fifo_memo.lock().expect("fifo memo");
                    memo.first_failure.get(&r.message_id).copied()
                })?
            });
        let enqueued_at = meta
            .enqueued_at
            .as_deref()
            .and_then(|t| humantime::parse_rfc3339(t).ok())
            .unwrap_or_else(|| crate::message::from_unix_ms(r.sent_ms));
        let receipt = Receipt {
            handle: r.handle.clone(),
            message_id: r.message_id.clone(),
            received_ms,
            lease_until_ms,
            group: r.group.clone(),
            trace: r.trace.clone(),
            meta: meta.history(),
        };
        Delivery {
            id: r.id(),
            attempt: meta.retries.saturating_add(r.receive_count),
            body: r.body,
            headers: r.headers,
            enqueued_at,
            first_failure_at,
            receipt: serde_json::to_string(&receipt).expect("receipt serializes"),
        }
    }

    /// Lambda mode: the delivery of one record of an SQS event, decoded exactly as `receive`
    /// decodes a message (history in `sluice-meta`, base64 bodies, other `sluice-*` attributes
    /// passed on to be rejected as forged), with the invocation's deadline as its lease end.
    #[cfg(feature = "lambda")]
    fn lambda_delivery(
        &self,
        record: &aws_lambda_events::event::sqs::SqsMessage,
        deadline_ms: i64,
    ) -> Result<Delivery> {
        let missing = |what: &str| Error::Invalid(format!("SQS record without {what}"));
        let id = record
            .message_id
            .clone()
            .ok_or_else(|| missing("messageId"))?;
        let handle = record
            .receipt_handle
            .clone()
            .ok_or_else(|| missing("receiptHandle"))?;
        // Lambda names the system attributes as SQS does (ApproximateReceiveCount, ...).
        let system: HashMap<MessageSystemAttributeName, String> = record
            .attributes
            .iter()
            .map(|(k, v)| (MessageSystemAttributeName::from(k.as_str()), v.clone()))
            .collect();
        let mut attributes = HashMap::new();
        for (name, a) in &record.message_attributes {
            let mut value = MessageAttributeValue::builder()
                .data_type(a.data_type.clone().unwrap_or_else(|| "String".into()));
            if let Some(s) = &a.string_value {
                value = value.string_value(s);
            }
            if let Some(b) = &a.binary_value {
                value = value.binary_value(aws_sdk_sqs::primitives::Blob::new(b.to_vec()));
            }
            let value = value
                .build()
                .map_err(|e| Error::Invalid(format!("message attribute {name:?}: {e}")))?;
            attributes.insert(name.clone(), value);
        }
        let message = Message::builder()
            .message_id(id)
            .receipt_handle(handle)
            .body(record.body.clone().unwrap_or_default())
            .set_attributes(Some(system))
            .set_message_attributes(Some(attributes))
            .build();
        Ok(self.delivery(
            decode_message(&message),
            unix_ms(SystemTime::now()),
            deadline_ms,
        ))
    }

    /// `Ok` while this handle's lease on the delivery lasts (see "Leases").
    fn check_lease(&self, d: &Delivery, r: &Receipt) -> Result<()> {
        let leases = self.leases.lock().expect("lease map");
        let live = match leases.get(&r.handle) {
            Some(l) => !l.settled && Instant::now() < l.until,
            None => unix_ms(SystemTime::now()) < r.lease_until_ms,
        };
        if live {
            Ok(())
        } else {
            Err(Error::LeaseLost(d.id.clone()))
        }
    }

    /// Records that the delivery is settled: settling it again is `LeaseLost`.
    fn settled(&self, r: &Receipt) {
        let mut leases = self.leases.lock().expect("lease map");
        let now = Instant::now();
        let left =
            Duration::from_millis((r.lease_until_ms - unix_ms(SystemTime::now())).max(0) as u64);
        let lease = leases.entry(r.handle.clone()).or_insert(Lease {
            received: now,
            until: now + left,
            settled: true,
        });
        lease.settled = true;
    }

    async fn ack_delivery(&self, d: &Delivery) -> Result<()> {
        let r = parse_receipt(d)?;
        self.check_lease(d, &r)?;
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.acks
            .send(PendingAck {
                handle: r.handle.clone(),
                reply,
            })
            .map_err(|_| Error::Transport("sqs: the ack batcher has stopped".into()))?;
        answer
            .await
            .map_err(|_| Error::Transport("sqs: the ack batcher dropped an ack".into()))?
            .map_err(|e| lost_or(e, d))?;
        self.settled(&r);
        self.forget_failure(&r);
        Ok(())
    }

    async fn retry_delivery(&self, d: &Delivery, delay: Duration, failure: &Failure) -> Result<()> {
        let r = parse_receipt(d)?;
        self.check_lease(d, &r)?;
        if self.config.fifo {
            return self.retry_in_place(d, &r, delay, failure).await;
        }
        let mut meta = r.meta.clone();
        meta.id = Some(d.id.clone());
        meta.retries = d.attempt;
        meta.enqueued_at = Some(rfc3339(d.enqueued_at));
        meta.first_failure_at = Some(rfc3339(d.first_failure_at.unwrap_or(failure.at)));
        meta.last_failure_at = Some(rfc3339(failure.at));
        meta.last_error = Some(truncate(&failure.reason, LAST_ERROR_MAX_BYTES));
        meta.error_class = Some(failure.class);
        meta.due_at = (delay > MAX_DELAY).then(|| rfc3339(SystemTime::now() + delay));
        let copy = encode_entry(
            &d.body,
            &d.headers,
            meta,
            delay.min(MAX_DELAY),
            false,
            Sender::Copy {
                trace: r.trace.as_deref(),
                group: None,
                dedup: String::new(),
            },
        );
        let copy = match copy {
            Ok(c) => c,
            Err(Error::Limit(why)) => {
                // Within a few hundred bytes of the size limit: no room for the history.
                tracing::warn!(reason = %why, "retry copy does not fit; retrying in place without the failure history");
                return self.retry_in_place(d, &r, delay, failure).await;
            }
            Err(e) => return Err(e),
        };
        self.send_entries(&self.queue_url, vec![copy]).await?;
        self.settled(&r);
        if let Err(e) = self.delete(&self.queue_url, &r.handle).await {
            tracing::warn!(error = %e, id = %d.id, "retry copy sent but the original was not deleted: it will be delivered again");
        }
        Ok(())
    }

    /// `ChangeMessageVisibility(delay)`: FIFO order is kept, the history is not (see "Retries").
    async fn retry_in_place(
        &self,
        d: &Delivery,
        r: &Receipt,
        delay: Duration,
        failure: &Failure,
    ) -> Result<()> {
        let seconds = ceil_secs(delay);
        self.check_in_flight_cap(r, seconds)?;
        self.change_visibility(&r.handle, seconds)
            .await
            .map_err(|e| lost_or(e, d))?;
        self.settled(r);
        if self.config.fifo {
            self.fifo_memo
                .lock()
                .expect("fifo memo")
                .record(&r.message_id, d.first_failure_at.unwrap_or(failure.at));
        }
        Ok(())
    }

    async fn dead_letter_delivery(&self, d: &Delivery, failure: &Failure) -> Result<()> {
        let r = parse_receipt(d)?;
        self.check_lease(d, &r)?;
        let mut meta = r.meta.clone();
        meta.id = Some(d.id.clone());
        meta.retries = 0;
        meta.enqueued_at = Some(rfc3339(d.enqueued_at));
        meta.first_failure_at = Some(rfc3339(d.first_failure_at.unwrap_or(failure.at)));
        meta.last_failure_at = Some(rfc3339(failure.at));
        meta.last_error = Some(truncate(&failure.reason, LAST_ERROR_MAX_BYTES));
        meta.error_class = Some(failure.class);
        meta.function = Some(self.opts.function.clone());
        meta.attempts = Some(d.attempt);
        meta.original_queue = Some(self.opts.queue.clone());
        meta.dead_lettered_at = Some(rfc3339(SystemTime::now()));
        let dedup = fifo_dedup("dead-letter", &d.id, meta.redriven);
        let copy = encode_entry(
            &d.body,
            &d.headers,
            meta,
            Duration::ZERO,
            self.config.fifo,
            Sender::Copy {
                trace: r.trace.as_deref(),
                group: r.group.as_deref(),
                dedup,
            },
        )
        .map_err(|e| match e {
            Error::Limit(why) => Error::Limit(format!(
                "{why}: the dead-letter copy with its history does not fit; the queue's RedrivePolicy will move the message as a crash loop"
            )),
            e => e,
        })?;
        self.send_entries(&self.dlq_url, vec![copy]).await?;
        self.settled(&r);
        self.forget_failure(&r);
        if let Err(e) = self.delete(&self.queue_url, &r.handle).await {
            tracing::warn!(error = %e, id = %d.id, "dead-letter copy sent but the original was not deleted: it will be delivered again");
        }
        Ok(())
    }

    async fn extend_delivery(&self, d: &Delivery, lease: Duration) -> Result<()> {
        let r = parse_receipt(d)?;
        self.check_lease(d, &r)?;
        let seconds = ceil_secs(lease).max(1);
        self.check_in_flight_cap(&r, seconds)?;
        let started = Instant::now();
        self.change_visibility(&r.handle, seconds)
            .await
            .map_err(|e| lost_or(e, d))?;
        let mut leases = self.leases.lock().expect("lease map");
        let received = leases.get(&r.handle).map_or(started, |l| l.received);
        leases.insert(
            r.handle.clone(),
            Lease {
                received,
                until: started + Duration::from_secs(seconds),
                settled: false,
            },
        );
        Ok(())
    }

    async fn release_delivery(&self, d: &Delivery) -> Result<()> {
        let r = parse_receipt(d)?;
        self.check_lease(d, &r)?;
        self.change_visibility(&r.handle, 0)
            .await
            .map_err(|e| lost_or(e, d))?;
        self.settled(&r);
        Ok(())
    }

    /// SQS keeps a message in flight at most 12 h after its receive.
    fn check_in_flight_cap(&self, r: &Receipt, seconds: u64) -> Result<()> {
        let received = self
            .leases
            .lock()
            .expect("lease map")
            .get(&r.handle)
            .map(|l| l.received);
        let held = match received {
            Some(at) => at.elapsed(),
            None => {
                Duration::from_millis((unix_ms(SystemTime::now()) - r.received_ms).max(0) as u64)
            }
        };
        if held + Duration::from_secs(seconds) > MAX_VISIBILITY {
            return Err(Error::Limit(format!(
                "SQS keeps a message in flight at most {MAX_VISIBILITY:?} after its receive; it was received {held:?} ago and {seconds} s more were asked"
            )));
        }
        Ok(())
    }

    fn forget_failure(&self, r: &Receipt) {
        if self.config.fifo {
            self.fifo_memo
                .lock()
                .expect("fifo memo")
                .first_failure
                .remove(&r.message_id);
        }
    }

    async fn delete(&self, url: &str, handle: &str) -> Result<(), SdkErr> {
        self.client
            .delete_message()
            .queue_url(url)
            .receipt_handle(handle)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| SdkErr::new("DeleteMessage", url, e))
    }

    async fn change_visibility(&self, handle: &str, seconds: u64) -> Result<(), SdkErr> {
        self.client
            .change_message_visibility()
            .queue_url(&self.queue_url)
            .receipt_handle(handle)
            .visibility_timeout(seconds as i32)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| SdkErr::new("ChangeMessageVisibility", &self.queue_url, e))
    }

    async fn queue_stats(&self) -> Result<QueueStats> {
        let names = [
            QueueAttributeName::ApproximateNumberOfMessages,
            QueueAttributeName::ApproximateNumberOfMessagesNotVisible,
            QueueAttributeName::ApproximateNumberOfMessagesDelayed,
        ];
        let (work, dead) = tokio::try_join!(
            self.counts(&self.queue_url, &names),
            self.counts(&self.dlq_url, &names)
        )?;
        Ok(QueueStats {
            ready: work[0],
            in_flight: work[1],
            delayed: work[2],
            dead_lettered: dead.iter().sum(),
        })
    }

    async fn counts(&self, url: &str, names: &[QueueAttributeName]) -> Result<Vec<u64>> {
        let out = self
            .client
            .get_queue_attributes()
            .queue_url(url)
            .set_attribute_names(Some(names.to_vec()))
            .send()
            .await
            .map_err(|e| sdk_err("GetQueueAttributes", url, e))?;
        let attrs = out.attributes();
        Ok(names
            .iter()
            .map(|n| {
                attrs
                    .and_then(|a| a.get(n))
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0)
            })
            .collect())
    }

    /// Reads DLQ messages, hiding each for [`PEEK_LEASE`], until `cap` are read, the DLQ has no
    /// more, or `stop` says so. The caller puts them back with [`Self::unpeek`].
    async fn peek_dlq(
        &self,
        cap: usize,
        mut stop: impl FnMut(&DeadLetter) -> bool,
    ) -> Result<Vec<(Received, DeadLetter)>> {
        let visible = self
            .counts(
                &self.dlq_url,
                &[QueueAttributeName::ApproximateNumberOfMessages],
            )
            .await?[0] as usize;
        let mut read: Vec<(Received, DeadLetter)> = Vec::new();
        loop {
            let want = MAX_RECEIVE.min(cap - read.len());
            // Long-poll (all SQS servers) while the count says more are there; otherwise one
            // short look, in case the count lags.
            let wait = if read.len() < visible { 1 } else { 0 };
            let out = self
                .client
                .receive_message()
                .queue_url(&self.dlq_url)
                .max_number_of_messages(want as i32)
                .wait_time_seconds(wait)
                .visibility_timeout(PEEK_LEASE.as_secs() as i32)
                .set_message_system_attribute_names(Some(vec![
                    MessageSystemAttributeName::ApproximateReceiveCount,
                    MessageSystemAttributeName::ApproximateFirstReceiveTimestamp,
                    MessageSystemAttributeName::SentTimestamp,
                    MessageSystemAttributeName::AwsTraceHeader,
                    MessageSystemAttributeName::MessageGroupId,
                ]))
                .message_attribute_names("All")
                .send()
                .await;
            let out = match out {
                Ok(out) => out,
                Err(e) => {
                    self.unpeek(&read).await;
                    return Err(sdk_err("ReceiveMessage", &self.config.dlq_name, e));
                }
            };
            let got = out.messages().len();
            let mut found = false;
            for m in out.messages() {
                let r = decode_message(m);
                let dl = self.dead_letter_record(&r);
                found |= stop(&dl);
                read.push((r, dl));
            }
            let more = got == want || read.len() < visible;
            if got == 0 || found || read.len() >= cap || !more {
                break;
            }
        }
        read.sort_by(|a, b| (a.0.sent_ms, &a.0.message_id).cmp(&(b.0.sent_ms, &b.0.message_id)));
        Ok(read)
    }

    /// Makes peeked DLQ messages visible again, 10 per call.
    async fn unpeek<'a>(&self, peeked: impl IntoIterator<Item = &'a (Received, DeadLetter)>) {
        let handles: Vec<&str> = peeked.into_iter().map(|(r, _)| r.handle.as_str()).collect();
        for chunk in handles.chunks(MAX_BATCH_ENTRIES) {
            let entries = chunk
                .iter()
                .enumerate()
                .filter_map(|(i, handle)| {
                    ChangeMessageVisibilityBatchRequestEntry::builder()
                        .id(i.to_string())
                        .receipt_handle(*handle)
                        .visibility_timeout(0)
                        .build()
                        .ok()
                })
                .collect();
            let out = self
                .client
                .change_message_visibility_batch()
                .queue_url(&self.dlq_url)
                .set_entries(Some(entries))
                .send()
                .await;
            match out {
                Ok(out) if out.failed().is_empty() => {}
                Ok(out) => tracing::warn!(
                    failed = out.failed().len(),
                    "some peeked dead letters stay hidden until the peek lease ends"
                ),
                Err(e) => tracing::warn!(
                    error = %DisplayErrorContext(&e),
                    "peeked dead letters stay hidden until the peek lease ends"
                ),
            }
        }
    }

    /// The dead letter a DLQ message stands for (see "Attempts and the crash-loop guard").
    fn dead_letter_record(&self, r: &Received) -> DeadLetter {
        let meta = r.meta.clone().unwrap_or_default();
        let first_receive = r
            .first_receive_ms
            .map(crate::message::from_unix_ms)
            .unwrap_or_else(|| crate::message::from_unix_ms(r.sent_ms));
        let mut dl = if meta.dead_lettered_at.is_some() {
            DeadLetter {
                id: r.id(),
                attempts: meta.attempts.unwrap_or(0),
                error_class: meta.error_class.unwrap_or(FailureClass::Permanent),
                last_error: meta.last_error.clone().unwrap_or_default(),
                body: None,
                body_hex: None,
                headers: r.headers.clone(),
                function: meta.function.clone().unwrap_or_default(),
                original_queue: meta.original_queue.clone().unwrap_or_default(),
                first_failure_at: meta.first_failure_at.clone().unwrap_or_default(),
                last_failure_at: meta.last_failure_at.clone().unwrap_or_default(),
                redriven: meta.redriven,
                raw_body: Vec::new(),
            }
        } else {
            let first = meta
                .first_failure_at
                .clone()
                .unwrap_or_else(|| rfc3339(first_receive));
            DeadLetter {
                id: r.id(),
                attempts: meta.retries + self.max_receive_count,
                error_class: FailureClass::CrashLoop,
                last_error: format!(
                    "received {} times without being settled (the worker crashed or lost its lease each time); moved by the queue's RedrivePolicy",
                    self.max_receive_count
                ),
                body: None,
                body_hex: None,
                headers: r.headers.clone(),
                function: self.opts.function.clone(),
                original_queue: self.opts.queue.clone(),
                last_failure_at: meta.last_failure_at.clone().unwrap_or_else(|| first.clone()),
                first_failure_at: first,
                redriven: meta.redriven,
                raw_body: Vec::new(),
            }
        };
        dl.set_body(r.body.clone());
        dl
    }

    async fn list_dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let read = self.peek_dlq(limit, |_| false).await?;
        self.unpeek(&read).await;
        Ok(read.into_iter().map(|(_, dl)| dl).collect())
    }

    async fn get_dead_letter(&self, id: &str) -> Result<Option<DeadLetter>> {
        let read = self.peek_dlq(DLQ_SCAN_LIMIT, |dl| dl.id == id).await?;
        self.unpeek(&read).await;
        Ok(read.into_iter().map(|(_, dl)| dl).find(|dl| dl.id == id))
    }

    async fn redrive_dead_letters(&self, filter: &RedriveFilter) -> Result<Vec<DeadLetter>> {
        let limit = filter.limit.unwrap_or(usize::MAX);
        if limit == 0 {
            return Ok(Vec::new());
        }
        let matches = |dl: &DeadLetter| filter.error_class.is_none_or(|c| c == dl.error_class);
        let mut matched = 0;
        let read = self
            .peek_dlq(DLQ_SCAN_LIMIT, |dl| {
                matched += usize::from(matches(dl));
                matched >= limit
            })
            .await?;
        let (mut chosen, mut rest) = (Vec::new(), Vec::new());
        for item in read {
            if chosen.len() < limit && matches(&item.1) {
                chosen.push(item);
            } else {
                rest.push(item);
            }
        }
        if filter.dry_run {
            self.unpeek(rest.iter().chain(&chosen)).await;
            return Ok(chosen.into_iter().map(|(_, dl)| dl).collect());
        }
        self.unpeek(&rest).await;
        let mut moved = Vec::new();
        for (n, chunk) in chosen.chunks(MAX_BATCH_ENTRIES).enumerate() {
            let copies = chunk
                .iter()
                .map(|(r, _)| self.redrive_copy(r))
                .collect::<Result<Vec<_>>>();
            let sent = match copies {
                Ok(copies) => self.send_entries(&self.queue_url, copies).await,
                Err(e) => Err(e),
            };
            if let Err(e) = sent {
                // This chunk and the rest stay dead letters (a partly sent chunk is duplicated).
                self.unpeek(&chosen[n * MAX_BATCH_ENTRIES..]).await;
                return Err(e);
            }
            self.delete_dead_letters(chunk).await;
            moved.extend(chunk.iter().map(|(_, dl)| dl.clone()));
        }
        Ok(moved)
    }

    /// The work-queue copy of a dead letter: attempts reset, the history in
    /// `sluice-redriven-from`.
    fn redrive_copy(&self, r: &Received) -> Result<Entry> {
        let old = r.meta.clone().unwrap_or_default().history();
        let dl = self.dead_letter_record(r);
        let from = Meta {
            function: Some(dl.function.clone()),
            attempts: Some(dl.attempts),
            original_queue: Some(dl.original_queue.clone()),
            error_class: Some(dl.error_class),
            last_error: Some(dl.last_error.clone()),
            first_failure_at: Some(dl.first_failure_at.clone()),
            last_failure_at: Some(dl.last_failure_at.clone()),
            dead_lettered_at: old.dead_lettered_at.clone(),
            ..Meta::default()
        };
        let meta = Meta {
            id: Some(dl.id.clone()),
            enqueued_at: old.enqueued_at.clone(),
            redriven: old.redriven + 1,
            redriven_from: Some(Box::new(from)),
            ..Meta::default()
        };
        let dedup = fifo_dedup("redrive", &dl.id, meta.redriven);
        encode_entry(
            &r.body,
            &r.headers,
            meta,
            Duration::ZERO,
            self.config.fifo,
            Sender::Copy {
                trace: r.trace.as_deref(),
                group: r.group.as_deref(),
                dedup,
            },
        )
    }

    /// Deletes redriven DLQ copies, 10 per call. A copy that is not deleted stays on the DLQ
    /// beside its redriven twin (a duplicate, never a loss).
    async fn delete_dead_letters(&self, items: &[(Received, DeadLetter)]) {
        let entries = items
            .iter()
            .enumerate()
            .filter_map(|(i, (r, _))| {
                DeleteMessageBatchRequestEntry::builder()
                    .id(i.to_string())
                    .receipt_handle(&r.handle)
                    .build()
                    .ok()
            })
            .collect();
        let out = self
            .client
            .delete_message_batch()
            .queue_url(&self.dlq_url)
            .set_entries(Some(entries))
            .send()
            .await;
        match out {
            Ok(out) if out.failed().is_empty() => {}
            Ok(out) => {
                for f in out.failed() {
                    tracing::warn!(code = f.code(), "a redriven dead letter was not deleted from the DLQ: it is now on both queues");
                }
            }
            Err(e) => {
                tracing::warn!(error = %DisplayErrorContext(&e), "redriven dead letters were not deleted from the DLQ: they are now on both queues")
            }
        }
    }
}

impl Meta {
    /// The history plus the due time (a long-delay hop keeps both).
    fn history_with_due(&self) -> Meta {
        Meta {
            due_at: self.due_at.clone(),
            ..self.history()
        }
    }
}

/// Deduplication id of a copy on a FIFO queue: stable for one message and redrive count, so a
/// copy sent twice (a crash between send and delete) is stored once within SQS's window.
fn fifo_dedup(kind: &str, id: &str, redriven: u32) -> String {
    hex::encode(Sha256::digest(format!("{kind}:{id}:{redriven}").as_bytes()))
}

fn batch_entry(i: usize, e: &Entry) -> Result<SendMessageBatchRequestEntry> {
    let mut b = SendMessageBatchRequestEntry::builder()
        .id(i.to_string())
        .message_body(&e.body)
        .set_message_group_id(e.group.clone())
        .set_message_deduplication_id(e.dedup.clone());
    if e.delay_seconds > 0 {
        b = b.delay_seconds(e.delay_seconds);
    }
    for (name, value) in &e.attributes {
        let v = MessageAttributeValue::builder()
            .data_type("String")
            .string_value(value)
            .build()
            .map_err(|err| Error::Invalid(format!("attribute {name}: {err}")))?;
        b = b.message_attributes(name, v);
    }
    if let Some(t) = &e.trace {
        let v = MessageSystemAttributeValue::builder()
            .data_type("String")
            .string_value(t)
            .build()
            .map_err(|err| Error::Invalid(format!("AWSTraceHeader: {err}")))?;
        b = b.message_system_attributes(MessageSystemAttributeNameForSends::AwsTraceHeader, v);
    }
    b.build()
        .map_err(|err| Error::Invalid(format!("batch entry: {err}")))
}

// ---------------------------------------------------------------------------------------------
// Provisioning

async fn queue_url(client: &Client, name: &str) -> Result<Option<String>> {
    match client.get_queue_url().queue_name(name).send().await {
        Ok(out) => Ok(out.queue_url().map(str::to_owned)),
        Err(e) if is_queue_missing(&e) => Ok(None),
        Err(e) => Err(sdk_err("GetQueueUrl", name, e)),
    }
}

/// The DLQ name and `maxReceiveCount` of a queue's `RedrivePolicy`, if it has one.
async fn redrive_policy(
    client: &Client,
    url: &str,
) -> Result<
    Option<(String, u32)>,
    SdkError<aws_sdk_sqs::operation::get_queue_attributes::GetQueueAttributesError>,
> {
    let out = client
        .get_queue_attributes()
        .queue_url(url)
        .attribute_names(QueueAttributeName::RedrivePolicy)
        .send()
        .await?;
    let policy = out
        .attributes()
        .and_then(|a| a.get(&QueueAttributeName::RedrivePolicy))
        .and_then(|p| serde_json::from_str::<serde_json::Value>(p).ok());
    Ok(policy.and_then(|p| {
        let arn = p.get("deadLetterTargetArn")?.as_str()?;
        let max = p.get("maxReceiveCount")?;
        let max = max
            .as_u64()
            .or_else(|| max.as_str().and_then(|s| s.parse().ok()))?;
        Some((arn.rsplit(':').next()?.to_owned(), max as u32))
    }))
}

/// Creates (or updates) the DLQ, then the queue with its `RedrivePolicy`; returns both URLs.
async fn provision_queues(client: &Client, config: &SqsConfig) -> Result<(String, String)> {
    let size = MAX_MESSAGE_BYTES.to_string();
    let dlq_url = ensure_queue(
        client,
        &config.dlq_name,
        config.fifo,
        vec![
            (QueueAttributeName::MaximumMessageSize, size.clone()),
            (
                QueueAttributeName::MessageRetentionPeriod,
                MAX_RETENTION_SECONDS.to_string(),
            ),
        ],
    )
    .await?;
    let arn = client
        .get_queue_attributes()
        .queue_url(&dlq_url)
        .attribute_names(QueueAttributeName::QueueArn)
        .send()
        .await
        .map_err(|e| sdk_err("GetQueueAttributes", &config.dlq_name, e))?
        .attributes()
        .and_then(|a| a.get(&QueueAttributeName::QueueArn))
        .cloned()
        .ok_or_else(|| Error::Transport(format!("sqs: {} has no QueueArn", config.dlq_name)))?;
    let policy = serde_json::json!({
        "deadLetterTargetArn": arn,
        "maxReceiveCount": config.max_receive_count,
    })
    .to_string();
    let queue_url = ensure_queue(
        client,
        &config.queue_name,
        config.fifo,
        vec![
            (QueueAttributeName::MaximumMessageSize, size),
            (
                QueueAttributeName::VisibilityTimeout,
                config.visibility.as_secs().to_string(),
            ),
            (QueueAttributeName::RedrivePolicy, policy),
        ],
    )
    .await?;
    Ok((queue_url, dlq_url))
}

/// Creates a queue with `attrs`, or sets `attrs` on it when it exists.
async fn ensure_queue(
    client: &Client,
    name: &str,
    fifo: bool,
    attrs: Vec<(QueueAttributeName, String)>,
) -> Result<String> {
    if let Some(url) = queue_url(client, name).await? {
        set_attributes(client, name, &url, attrs).await?;
        return Ok(url);
    }
    let mut create = client.create_queue().queue_name(name);
    for (k, v) in &attrs {
        create = create.attributes(k.clone(), v);
    }
    if fifo {
        create = create
            .attributes(QueueAttributeName::FifoQueue, "true")
            .attributes(QueueAttributeName::ContentBasedDeduplication, "false");
    }
    match create.send().await {
        Ok(out) => out
            .queue_url()
            .map(str::to_owned)
            .ok_or_else(|| Error::Transport(format!("sqs: CreateQueue {name}: no URL"))),
        // Created meanwhile by someone else, with other attributes: make them ours.
        Err(e) if code(&e) == Some("QueueAlreadyExists") || code(&e) == Some("QueueNameExists") => {
            let url = queue_url(client, name)
                .await?
                .ok_or_else(|| Error::Transport(format!("sqs: {name} exists and does not")))?;
            set_attributes(client, name, &url, attrs).await?;
            Ok(url)
        }
        Err(e) => Err(sdk_err("CreateQueue", name, e)),
    }
}

async fn set_attributes(
    client: &Client,
    name: &str,
    url: &str,
    attrs: Vec<(QueueAttributeName, String)>,
) -> Result<()> {
    client
        .set_queue_attributes()
        .queue_url(url)
        .set_attributes(Some(attrs.into_iter().collect()))
        .send()
        .await
        .map_err(|e| sdk_err("SetQueueAttributes", name, e))?;
    Ok(())
}

/// The URL of a queue in the same account and region as `url`.
fn sibling_url(url: &str, name: &str) -> String {
    match url.trim_end_matches('/').rsplit_once('/') {
        Some((base, _)) => format!("{base}/{name}"),
        None => name.to_owned(),
    }
}

// ---------------------------------------------------------------------------------------------
// Errors

/// An SDK error of a settling call, kept until we know whether it means "lease lost".
struct SdkErr {
    op: &'static str,
    queue: String,
    code: Option<String>,
    message: Option<String>,
    text: String,
}

impl SdkErr {
    fn new<E>(op: &'static str, queue: &str, e: SdkError<E>) -> Self
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
    {
        Self {
            op,
            queue: queue.to_owned(),
            code: code(&e).map(str::to_owned),
            message: e
                .as_service_error()
                .and_then(|s| s.message())
                .map(str::to_owned),
            text: DisplayErrorContext(&e).to_string(),
        }
    }

    /// The receipt handle is gone: deleted, moved, expired, or never ours.
    fn receipt_gone(&self) -> bool {
        let message = self
            .message
            .as_deref()
            .unwrap_or_default()
            .to_ascii_lowercase();
        match self.code.as_deref() {
            Some(
                "ReceiptHandleIsInvalid"
                | "AWS.SimpleQueueService.ReceiptHandleIsInvalid"
                | "MessageNotInflight"
                | "AWS.SimpleQueueService.MessageNotInflight"
                | "InvalidIdFormat",
            ) => true,
            Some("InvalidParameterValue") => {
                message.contains("receipt handle") || message.contains("receipthandle")
            }
            _ => false,
        }
    }

    fn visibility_cap(&self) -> bool {
        self.code.as_deref() == Some("InvalidParameterValue")
            && self
                .message
                .as_deref()
                .unwrap_or_default()
                .contains("VisibilityTimeout")
    }
}

impl std::fmt::Display for SdkErr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "sqs: {} {}: {}", self.op, self.queue, self.text)
    }
}

fn lost_or(e: SdkErr, d: &Delivery) -> Error {
    if e.receipt_gone() {
        Error::LeaseLost(d.id.clone())
    } else if e.visibility_cap() {
        Error::Limit(e.to_string())
    } else {
        Error::Transport(e.to_string())
    }
}

fn code<E: ProvideErrorMetadata>(e: &SdkError<E>) -> Option<&str> {
    e.as_service_error().and_then(|s| s.code())
}

fn is_queue_missing<E: ProvideErrorMetadata>(e: &SdkError<E>) -> bool {
    matches!(
        code(e),
        Some("QueueDoesNotExist" | "AWS.SimpleQueueService.NonExistentQueue")
    )
}

fn sdk_err<E: std::error::Error + 'static>(op: &str, queue: &str, e: SdkError<E>) -> Error {
    Error::Transport(format!("sqs: {op} {queue}: {}", DisplayErrorContext(&e)))
}

// ---------------------------------------------------------------------------------------------
// Small helpers

/// Whole seconds, rounded up.
fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max.saturating_sub(3);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

const BASE64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding (no extra dependency for a few lines).
fn base64_encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(BASE64[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let s = s.as_bytes();
    if !s.len().is_multiple_of(4) {
        return None;
    }
    let chunks = s.len() / 4;
    let mut out = Vec::with_capacity(chunks * 3);
    for (ci, chunk) in s.chunks(4).enumerate() {
        let pad = chunk.iter().rev().take_while(|&&c| c == b'=').count();
        if pad > 2 || (pad > 0 && ci + 1 != chunks) {
            return None;
        }
        let mut n = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            let v = if i >= 4 - pad {
                0
            } else {
                match c {
                    b'A'..=b'Z' => c - b'A',
                    b'a'..=b'z' => c - b'a' + 26,
                    b'0'..=b'9' => c - b'0' + 52,
                    b'+' => 62,
                    b'/' => 63,
                    _ => return None,
                }
            };
            n = n << 6 | u32::from(v);
        }
        out.extend_from_slice(&[(n >> 16) as u8, (n >> 8) as u8, n as u8][..3 - pad]);
    }
    Some(out)
}

// ---------------------------------------------------------------------------------------------
// The trait, delegating to the methods above

impl Transport for SqsTransport {
    async fn provision(&self) -> Result<()> {
        provision_queues(&self.0.client, &self.0.config)
            .await
            .map(|_| ())
    }

    async fn publish(&self, msgs: Vec<OutgoingMessage>) -> Result<Vec<String>> {
        self.0.publish_messages(msgs).await
    }

    async fn receive(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>> {
        self.0.receive_messages(max, wait).await
    }

    async fn ack(&self, d: &Delivery) -> Result<()> {
        self.0.ack_delivery(d).await
    }

    async fn retry_after(&self, d: &Delivery, delay: Duration, failure: &Failure) -> Result<()> {
        self.0.retry_delivery(d, delay, failure).await
    }

    async fn dead_letter(&self, d: &Delivery, failure: &Failure) -> Result<()> {
        self.0.dead_letter_delivery(d, failure).await
    }

    async fn extend(&self, d: &Delivery, lease: Duration) -> Result<()> {
        self.0.extend_delivery(d, lease).await
    }

    async fn release(&self, d: &Delivery) -> Result<()> {
        self.0.release_delivery(d).await
    }

    async fn stats(&self) -> Result<QueueStats> {
        self.0.queue_stats().await
    }

    async fn dlq_list(&self, limit: usize) -> Result<Vec<DeadLetter>> {
        self.0.list_dead_letters(limit).await
    }

    async fn dlq_get(&self, id: &str) -> Result<Option<DeadLetter>> {
        self.0.get_dead_letter(id).await
    }

    async fn redrive(&self, filter: &RedriveFilter) -> Result<Vec<DeadLetter>> {
        self.0.redrive_dead_letters(filter).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trips_every_length() {
        for len in 0..64usize {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 37 + 11) as u8).collect();
            let text = base64_encode(&bytes);
            assert_eq!(text.len(), len.div_ceil(3) * 4);
            assert_eq!(base64_decode(&text).as_deref(), Some(bytes.as_slice()));
        }
        assert_eq!(base64_encode(b"Man"), "TWFu");
        assert_eq!(base64_encode(b"Ma"), "TWE=");
        assert_eq!(base64_decode("TQ==").as_deref(), Some(&b"M"[..]));
        for bad in ["TQ=", "T===", "TQ==TWFu", "TW!u"] {
            assert_eq!(base64_decode(bad), None, "{bad}");
        }
    }

    #[test]
    fn only_xml_characters_are_sqs_text() {
        assert!(sqs_text(b"{\"a\":\"b\r\n\t\"}").is_some());
        assert!(sqs_text("\u{1F600}".as_bytes()).is_some());
        assert!(sqs_text(b"\x00").is_none());
        assert!(sqs_text(b"\x1b[0m").is_none());
        assert!(sqs_text("\u{FFFE}".as_bytes()).is_none());
        assert!(sqs_text(b"\xff").is_none());
    }

    #[test]
    fn batches_respect_entries_and_bytes() {
        assert_eq!(batches(&[1; 25], 10, 100), vec![0..10, 10..20, 20..25]);
        assert_eq!(batches(&[30; 10], 10, 256), vec![0..8, 8..10]);
        assert_eq!(batches(&[256, 1, 256], 10, 256), vec![0..1, 1..2, 2..3]);
        assert!(batches(&[], 10, 256).is_empty());
    }

    #[test]
    fn meta_keys_are_the_shared_header_names() {
        let meta = Meta {
            first_failure_at: Some("t".into()),
            last_failure_at: Some("t".into()),
            last_error: Some("e".into()),
            error_class: Some(FailureClass::Transient),
            function: Some("f".into()),
            attempts: Some(1),
            original_queue: Some("q".into()),
            ..Meta::default()
        };
        let json = serde_json::to_value(&meta).unwrap();
        for name in [
            header::FIRST_FAILURE_AT,
            header::LAST_FAILURE_AT,
            header::LAST_ERROR,
            header::ERROR_CLASS,
            header::FUNCTION,
            header::ATTEMPTS,
            header::ORIGINAL_QUEUE,
        ] {
            assert!(json.get(name).is_some(), "{name} missing from {json}");
        }
        assert!(json
            .as_object()
            .unwrap()
            .keys()
            .all(|k| k.starts_with(header::RESERVED_PREFIX)));
        // Unknown keys make the attribute foreign.
        assert!(serde_json::from_str::<Meta>(r#"{"sluice-retries":1,"x":2}"#).is_err());
    }

    #[test]
    fn names_and_whole_seconds() {
        assert_eq!(dlq_name_for("jobs"), "jobs-dlq");
        assert_eq!(dlq_name_for("jobs.fifo"), "jobs-dlq.fifo");
        assert!(valid_attribute_name("x-tenant.id_2"));
        for bad in ["", "a b", ".a", "a.", "a..b", "AWS.x", "amazon.y"] {
            assert!(!valid_attribute_name(bad), "{bad:?}");
        }
        assert_eq!(ceil_secs(Duration::ZERO), 0);
        assert_eq!(ceil_secs(Duration::from_millis(400)), 1);
        assert_eq!(ceil_secs(Duration::from_millis(1500)), 2);
        assert_eq!(ceil_secs(Duration::from_secs(3)), 3);
        assert_eq!(
            sibling_url("http://127.0.0.1:5000/123456789012/jobs", "jobs-dlq"),
            "http://127.0.0.1:5000/123456789012/jobs-dlq"
        );
        assert_eq!(truncate("héllo", 5), "h...");
    }

    #[test]
    fn options_are_checked_against_sqs_limits() {
        let opts = |url: &str, lease: Duration, max: u32| TransportOptions {
            queue: "jobs".into(),
            function: "f".into(),
            url: url.into(),
            lease,
            max_deliveries: max,
            poll_interval: Duration::from_millis(20),
        };
        let c = SqsConfig::from_options(&opts("", Duration::from_millis(400), 5)).unwrap();
        assert_eq!(
            (c.queue_name.as_str(), c.visibility),
            ("jobs", Duration::from_secs(1))
        );
        let c = SqsConfig::from_options(&opts(
            "https://sqs.eu-west-1.amazonaws.com/123456789012/orders.fifo",
            Duration::from_secs(30),
            10,
        ))
        .unwrap();
        assert!(c.fifo && c.dlq_name == "orders-dlq.fifo" && c.queue_url.is_some());
        for (url, lease, max) in [
            ("bad name", Duration::from_secs(1), 5),
            (&"q".repeat(78), Duration::from_secs(1), 5),
            ("jobs", Duration::from_secs(43_201), 5),
            ("jobs", Duration::from_secs(1), 0),
            ("jobs", Duration::from_secs(1), 1001),
        ] {
            assert!(
                matches!(
                    SqsConfig::from_options(&opts(url, lease, max)),
                    Err(Error::Config(_))
                ),
                "{url:?} {lease:?} {max}"
            );
        }
    }

    #[test]
    fn producer_headers_leave_room_for_meta_and_copies_fold_the_rest() {
        let mut headers = Headers::new();
        for i in 0..10 {
            headers.insert(format!("x-h{i}"), "v".into());
        }
        assert!(matches!(
            encode_entry(
                b"{}",
                &headers,
                Meta::default(),
                Duration::ZERO,
                false,
                Sender::Producer
            ),
            Err(Error::Limit(_))
        ));
        let copy = encode_entry(
            b"{}",
            &headers,
            Meta {
                retries: 1,
                ..Meta::default()
            },
            Duration::ZERO,
            false,
            Sender::Copy {
                trace: None,
                group: None,
                dedup: String::new(),
            },
        )
        .unwrap();
        assert_eq!(
            copy.attributes.len(),
            1,
            "all headers folded into {META_ATTRIBUTE}"
        );
        assert!(copy.attributes[0].1.contains("sluice-headers"));
    }
}
