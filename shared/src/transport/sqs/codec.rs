//! The envelope, producer headers and bodies on the SQS wire.
//!
//! - Producer headers are `String` message attributes (valid SQS names, non-empty SQS text).
//!   A `Number` attribute is taken as its text; a `Binary` one is bad input (headers are text).
//! - The envelope is one `String` attribute, [`META_ATTRIBUTE`]: a JSON object of the
//!   envelope's fields (`crate::envelope::field`) plus this codec's own keys:
//!   [`BODY_ENCODING`] (`base64` for a body that is not SQS text, `empty` for an empty body,
//!   which SQS refuses) and [`OVERFLOW_HEADERS`] (producer headers of a copy that did not fit as
//!   attributes beside it). SQS carries 10 attributes: producers get 9.
//! - A message with a `String` `sluice-meta` is taken as one of our copies: its envelope is
//!   checked, and a malformed one is a defect (the pipeline dead-letters it as bad input).
//!   SQS cannot tell who sent a message, so a well-formed forged envelope is believed; what it
//!   can change is bounded (the attempt only rises: `ApproximateReceiveCount` is its floor).
//! - A copy that does not fit in [`MAX_MESSAGE_BYTES`] has its envelope trimmed
//!   (`Envelope::shrink`: history first, never the slip); the body is never touched.

use std::time::{Duration, SystemTime};

use aws_sdk_sqs::types::{
    Message, MessageAttributeValue, MessageSystemAttributeName, MessageSystemAttributeNameForSends,
    MessageSystemAttributeValue, SendMessageBatchRequestEntry,
};
use base64::{engine::general_purpose::STANDARD as BASE64, Engine as _};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use super::config::{
    ceil_secs, MAX_ATTRIBUTE_NAME, MAX_DELAY, MAX_FIFO_ID, MAX_MESSAGE_BYTES, MAX_PRODUCER_HEADERS,
};
use crate::{
    envelope::{Defect, Envelope},
    error::{Error, Result},
    message::{header, Headers, Rejection},
};

/// The one message attribute this adapter adds (see the module doc).
pub const META_ATTRIBUTE: &str = "sluice-meta";
/// Producer header naming the FIFO message group.
pub const GROUP_ID_HEADER: &str = "x-group-id";
/// Producer header with the FIFO deduplication id.
pub const DEDUP_ID_HEADER: &str = "x-dedup-id";
/// Header that carries SQS's `AWSTraceHeader` system attribute.
pub const TRACE_HEADER: &str = "x-amzn-trace-id";
/// FIFO message group of messages without `x-group-id`.
pub const DEFAULT_GROUP: &str = "default";
/// `sluice-meta` key: how the body is encoded (`base64`, `empty`).
pub(super) const BODY_ENCODING: &str = "sluice-body-encoding";
/// `sluice-meta` key: producer headers of a copy that did not fit as attributes.
pub(super) const OVERFLOW_HEADERS: &str = "sluice-headers";
/// What an empty body is sent as (SQS refuses empty bodies).
const EMPTY_BODY: &str = "-";

/// One SQS message as received and decoded.
#[derive(Debug)]
pub(crate) struct Received {
    pub(crate) message_id: String,
    pub(crate) handle: String,
    pub(crate) body: Vec<u8>,
    pub(crate) headers: Headers,
    /// The envelope, when the message carries `sluice-meta` (one of our copies).
    pub(crate) envelope: Option<Result<Envelope, Defect>>,
    /// A producer header that is not text.
    pub(crate) bad_header: Option<Rejection>,
    pub(crate) receive_count: u32,
    pub(crate) sent_ms: i64,
    pub(crate) first_receive_ms: Option<i64>,
    pub(crate) group: Option<String>,
    pub(crate) trace: Option<String>,
}

impl Received {
    /// The message id: the one the first publish returned (copies get new SQS ids).
    pub(crate) fn id(&self) -> String {
        match &self.envelope {
            Some(Ok(Envelope { id: Some(id), .. })) => id.clone(),
            _ => self.message_id.clone(),
        }
    }
}

/// Decodes one received message (see the module doc).
pub(crate) fn decode_message(m: &Message, now: SystemTime) -> Received {
    let system = m.attributes();
    let sys = |name: MessageSystemAttributeName| system.and_then(|s| s.get(&name)).cloned();
    let mut headers = Headers::new();
    let mut meta_text = None;
    let mut bad_header = None;
    for (name, value) in m.message_attributes().into_iter().flatten() {
        let kind = value.data_type();
        if kind.starts_with("Binary") {
            let n = value.binary_value().map_or(0, |b| b.as_ref().len());
            bad_header.get_or_insert((
                "malformed header",
                format!(
                    "header {name:?}: expected a String attribute, got a Binary one ({n} bytes)"
                ),
            ));
            continue;
        }
        let Some(text) = value.string_value() else {
            continue;
        };
        if name == META_ATTRIBUTE && kind == "String" {
            meta_text = Some(text.to_owned());
        } else {
            headers.insert(name.to_ascii_lowercase(), text.to_owned());
        }
    }
    let raw = m.body().unwrap_or_default();
    let (body, envelope) = match meta_text {
        None => (raw.as_bytes().to_vec(), None),
        Some(text) => {
            let (body, envelope) = decode_meta(&text, raw, &mut headers, now);
            (body, Some(envelope))
        }
    };
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
        envelope,
        bad_header,
        receive_count: int(MessageSystemAttributeName::ApproximateReceiveCount)
            .and_then(|n| u32::try_from(n).ok())
            .unwrap_or(1),
        sent_ms: int(MessageSystemAttributeName::SentTimestamp).unwrap_or(0),
        first_receive_ms: int(MessageSystemAttributeName::ApproximateFirstReceiveTimestamp),
        group: sys(MessageSystemAttributeName::MessageGroupId),
        trace,
    }
}

/// `sluice-meta`: the body as encoded, the overflow headers, and the envelope (checked).
fn decode_meta(
    text: &str,
    raw: &str,
    headers: &mut Headers,
    now: SystemTime,
) -> (Vec<u8>, Result<Envelope, Defect>) {
    let as_sent = || raw.as_bytes().to_vec();
    let mut map = match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(map)) => map,
        _ => {
            return (
                as_sent(),
                Err(Defect(format!("{META_ATTRIBUTE} is not a JSON object"))),
            )
        }
    };
    let body = match map.remove(BODY_ENCODING) {
        None => as_sent(),
        Some(Value::String(e)) if e == "base64" => match BASE64.decode(raw) {
            Ok(b) => b,
            Err(_) => {
                return (
                    as_sent(),
                    Err(Defect(format!(
                        "{BODY_ENCODING} says base64, but the body is not base64"
                    ))),
                )
            }
        },
        Some(Value::String(e)) if e == "empty" => Vec::new(),
        Some(other) => {
            return (
                as_sent(),
                Err(Defect(format!(
                    "{BODY_ENCODING}: expected \"base64\" or \"empty\", got {other}"
                ))),
            )
        }
    };
    match map.remove(OVERFLOW_HEADERS) {
        None => {}
        Some(Value::Object(extra)) => {
            for (k, v) in extra {
                match v {
                    Value::String(v) => {
                        headers.insert(k, v);
                    }
                    _ => {
                        return (
                            body,
                            Err(Defect(format!("{OVERFLOW_HEADERS}: {k:?} is not text"))),
                        )
                    }
                }
            }
        }
        Some(_) => {
            return (
                body,
                Err(Defect(format!("{OVERFLOW_HEADERS} is not a JSON object"))),
            )
        }
    }
    let envelope = Envelope::from_json_map(&map, now);
    (body, envelope)
}

/// A message ready to send: checked, encoded and measured.
#[derive(Debug)]
pub(super) struct Entry {
    pub(super) body: String,
    pub(super) attributes: Vec<(String, String)>,
    pub(super) trace: Option<String>,
    pub(super) delay_seconds: i32,
    pub(super) group: Option<String>,
    pub(super) dedup: Option<String>,
    pub(super) size: usize,
}

/// What kind of send an entry is for: producer input is checked strictly, copies carry what
/// the delivery had.
pub(super) enum Sender<'a> {
    Producer,
    Copy {
        trace: Option<&'a str>,
        group: Option<&'a str>,
        dedup: String,
    },
}

/// Encodes a message; a copy that does not fit has its envelope trimmed until it does.
pub(super) fn encode_entry(
    body: &[u8],
    headers: &Headers,
    mut envelope: Envelope,
    delay: Duration,
    fifo: bool,
    sender: Sender<'_>,
) -> Result<Entry> {
    loop {
        match encode_once(body, headers, &envelope, delay, fifo, &sender) {
            Err(Error::Limit(_)) if matches!(sender, Sender::Copy { .. }) && envelope.shrink() => {
                continue
            }
            other => return other,
        }
    }
}

fn encode_once(
    body: &[u8],
    headers: &Headers,
    envelope: &Envelope,
    delay: Duration,
    fifo: bool,
    sender: &Sender<'_>,
) -> Result<Entry> {
    let mut meta = Map::new();
    let body = if body.is_empty() {
        if matches!(sender, Sender::Producer) {
            return Err(Error::Invalid("SQS does not accept an empty body".into()));
        }
        meta.insert(BODY_ENCODING.into(), Value::String("empty".into()));
        EMPTY_BODY.to_owned()
    } else {
        match sqs_text(body) {
            Some(text) => text.to_owned(),
            None => {
                meta.insert(BODY_ENCODING.into(), Value::String("base64".into()));
                BASE64.encode(body)
            }
        }
    };
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
            for (what, id) in [(GROUP_ID_HEADER, &group), (DEDUP_ID_HEADER, &dedup)] {
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
            let mut overflow = Map::new();
            let mut rest: Vec<(&String, &String)> = Vec::new();
            for (name, value) in headers {
                if t.is_some() && name == TRACE_HEADER && Some(value.as_str()) == *t {
                    trace = Some(value.clone());
                } else if name == META_ATTRIBUTE
                    || !valid_attribute_name(name)
                    || value.is_empty()
                    || sqs_text(value.as_bytes()).is_none()
                {
                    overflow.insert(name.clone(), Value::String(value.clone()));
                } else {
                    rest.push((name, value));
                }
            }
            if rest.len() > MAX_PRODUCER_HEADERS {
                for (n, v) in rest.drain(..) {
                    overflow.insert(n.clone(), Value::String(v.clone()));
                }
            }
            attributes.extend(rest.into_iter().map(|(n, v)| (n.clone(), v.clone())));
            if !overflow.is_empty() {
                meta.insert(OVERFLOW_HEADERS.into(), Value::Object(overflow));
            }
            let group = fifo.then(|| group.unwrap_or(DEFAULT_GROUP).to_owned());
            (group, fifo.then(|| dedup.clone()))
        }
    };
    for (k, v) in envelope.to_fields() {
        meta.insert(k.to_owned(), Value::String(v));
    }
    if !meta.is_empty() {
        attributes.push((META_ATTRIBUTE.to_owned(), Value::Object(meta).to_string()));
    }
    let size = body.len()
        + attributes
            .iter()
            .map(|(n, v)| n.len() + "String".len() + v.len())
            .sum::<usize>();
    if size > MAX_MESSAGE_BYTES {
        let encoded = attributes
            .iter()
            .any(|(n, v)| n == META_ATTRIBUTE && v.contains("\"base64\""));
        return Err(Error::Limit(format!(
            "message is {size} bytes with its attributes{}, SQS takes {MAX_MESSAGE_BYTES}",
            if encoded {
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

pub(super) fn valid_attribute_name(name: &str) -> bool {
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
pub(super) fn sqs_text(bytes: &[u8]) -> Option<&str> {
    let s = std::str::from_utf8(bytes).ok()?;
    s.chars()
        .all(|c| {
            matches!(c, '\t' | '\n' | '\r' | '\u{20}'..='\u{D7FF}' | '\u{E000}'..='\u{FFFD}' | '\u{10000}'..='\u{10FFFF}')
        })
        .then_some(s)
}

/// Splits entry sizes into batches of at most `max_entries` whose sizes add up to at most
/// `max_bytes` (each entry is at most `max_bytes` itself).
pub(super) fn batches(
    sizes: &[usize],
    max_entries: usize,
    max_bytes: usize,
) -> Vec<std::ops::Range<usize>> {
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

/// Deduplication id of a copy on a FIFO queue: stable for one message and redrive count, so a
/// copy sent twice (a crash between send and delete) is stored once within SQS's window.
pub(super) fn fifo_dedup(kind: &str, id: &str, redriven: u32) -> String {
    hex::encode(Sha256::digest(format!("{kind}:{id}:{redriven}").as_bytes()))
}

pub(super) fn batch_entry(i: usize, e: &Entry) -> Result<SendMessageBatchRequestEntry> {
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

/// The fuzz targets `sqs_message` and `lambda_event` (feature `fuzzing`): a received message
/// decoded, then sent on as a copy (a retry: history, headers, encodings) and decoded again:
/// the body's bytes and the producer headers come back intact, the envelope reads back, and a
/// second trip changes nothing.
#[cfg(feature = "fuzzing")]
pub(crate) fn fuzz_round_trip(m: &Message) {
    use crate::envelope::{Failure, FailureClass};
    let now = SystemTime::now();
    let first = decode_message(m, now);
    let mut envelope = match &first.envelope {
        None => Envelope::default(),
        Some(Ok(e)) => e.clone(),
        Some(Err(_)) => return,
    };
    if first.bad_header.is_some() {
        return;
    }
    envelope.id = Some(first.id());
    let failure = Failure::now(FailureClass::Transient, "fuzzed");
    let mut body = first.body.clone();
    let mut headers = first.headers.clone();
    for trip in 0..2 {
        let copy = encode_entry(
            &body,
            &headers,
            envelope.for_retry(trip + 1, &failure, None),
            Duration::ZERO,
            false,
            Sender::Copy {
                trace: None,
                group: None,
                dedup: String::new(),
            },
        );
        let Ok(entry) = copy else { return };
        assert!(entry.size <= MAX_MESSAGE_BYTES);
        let back = decode_message(&message_of(&entry), now);
        assert_eq!(back.body, body, "the body's bytes come back intact");
        assert_eq!(back.headers, headers, "the producer headers come back");
        assert!(back.bad_header.is_none());
        envelope = back
            .envelope
            .expect("a copy carries sluice-meta")
            .expect("a copy's envelope reads back");
        assert_eq!(envelope.id.as_deref(), Some(first.id().as_str()));
        (body, headers) = (back.body, back.headers);
    }
}

/// A message as SQS would deliver the entry.
#[cfg(any(test, feature = "fuzzing"))]
fn message_of(entry: &Entry) -> Message {
    let mut m = Message::builder().message_id("sqs-1").body(&entry.body);
    for (k, v) in &entry.attributes {
        m = m.message_attributes(
            k,
            MessageAttributeValue::builder()
                .data_type("String")
                .string_value(v)
                .build()
                .expect("a String attribute"),
        );
    }
    m.build()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::{Failure, FailureClass};

    fn copy() -> Sender<'static> {
        Sender::Copy {
            trace: None,
            group: None,
            dedup: String::new(),
        }
    }

    fn received(entry: &Entry) -> Received {
        decode_message(&message_of(entry), SystemTime::now())
    }

    #[test]
    fn only_xml_characters_are_sqs_text() {
        assert!(sqs_text(b"{\"a\":\"b\r\n\t\"}").is_some());
        assert!(sqs_text("\u{1F600}".as_bytes()).is_some());
        assert!(sqs_text(b"\x00").is_none());
        assert!(sqs_text(b"\x1b[0m").is_none());
        assert!(sqs_text("\u{FFFE}".as_bytes()).is_none());
        assert!(sqs_text(b"\xff").is_none());
        assert!(valid_attribute_name("x-tenant.id_2"));
        for bad in ["", "a b", ".a", "a.", "a..b", "AWS.x", "amazon.y"] {
            assert!(!valid_attribute_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn batches_respect_entries_and_bytes() {
        assert_eq!(batches(&[1; 25], 10, 100), vec![0..10, 10..20, 20..25]);
        assert_eq!(batches(&[30; 10], 10, 256), vec![0..8, 8..10]);
        assert_eq!(batches(&[256, 1, 256], 10, 256), vec![0..1, 1..2, 2..3]);
        assert!(batches(&[], 10, 256).is_empty());
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
                Envelope::default(),
                Duration::ZERO,
                false,
                Sender::Producer
            ),
            Err(Error::Limit(_))
        ));
        let envelope = Envelope {
            retries: 1,
            ..Envelope::default()
        };
        let entry = encode_entry(b"{}", &headers, envelope, Duration::ZERO, false, copy()).unwrap();
        assert_eq!(
            entry.attributes.len(),
            1,
            "all headers folded into {META_ATTRIBUTE}"
        );
        let back = received(&entry);
        assert_eq!(back.headers, headers);
        assert_eq!(back.envelope.unwrap().unwrap().retries, 1);
    }

    #[test]
    fn binary_and_empty_bodies_come_back_byte_for_byte() {
        for body in [&b"\xff\x00\x01"[..], b""] {
            let entry = encode_entry(
                body,
                &Headers::new(),
                Envelope::default(),
                Duration::ZERO,
                false,
                copy(),
            )
            .unwrap();
            assert!(!entry.body.is_empty());
            assert_eq!(received(&entry).body, body);
        }
        assert!(matches!(
            encode_entry(
                b"",
                &Headers::new(),
                Envelope::default(),
                Duration::ZERO,
                false,
                Sender::Producer
            ),
            Err(Error::Invalid(_))
        ));
    }

    #[test]
    fn a_copy_at_the_size_limit_keeps_its_body_and_sheds_history() {
        let body = "x".repeat(MAX_MESSAGE_BYTES - 600);
        let mut envelope = Envelope::default();
        envelope.record_failure(&Failure::now(FailureClass::Transient, "e".repeat(4000)));
        let envelope = envelope.for_dead_letter(
            3,
            &Failure::now(FailureClass::Permanent, "no"),
            "f",
            "q",
            SystemTime::now(),
        );
        let entry = encode_entry(
            body.as_bytes(),
            &Headers::new(),
            envelope,
            Duration::ZERO,
            false,
            copy(),
        )
        .unwrap();
        assert!(entry.size <= MAX_MESSAGE_BYTES);
        let back = received(&entry);
        assert_eq!(back.body, body.as_bytes());
        assert_eq!(
            back.envelope
                .unwrap()
                .unwrap()
                .dead_letter
                .unwrap()
                .attempts,
            3
        );
    }

    #[test]
    fn a_malformed_meta_is_a_defect_and_binary_attributes_are_bad_headers() {
        let m = Message::builder()
            .message_id("m")
            .body("{}")
            .message_attributes(
                META_ATTRIBUTE,
                MessageAttributeValue::builder()
                    .data_type("String")
                    .string_value(r#"{"sluice-retries":"lots"}"#)
                    .build()
                    .unwrap(),
            )
            .message_attributes(
                "x-bin",
                MessageAttributeValue::builder()
                    .data_type("Binary")
                    .binary_value(aws_sdk_sqs::primitives::Blob::new(vec![1, 2]))
                    .build()
                    .unwrap(),
            )
            .build();
        let r = decode_message(&m, SystemTime::now());
        assert!(r
            .envelope
            .unwrap()
            .unwrap_err()
            .0
            .contains("sluice-retries"));
        let (label, reason) = r.bad_header.unwrap();
        assert_eq!(label, "malformed header");
        assert!(reason.contains("Binary"), "{reason}");
    }
}
