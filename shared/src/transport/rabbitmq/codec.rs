//! The envelope and producer headers on the AMQP wire.
//!
//! On a copy made by this adapter the envelope's fields (`crate::envelope::field`) are
//! top-level `sluice-*` headers (long strings), `sluice-retries` always among them: it marks
//! the copy. The producer's own `sluice-*` headers are nested in [`PRODUCER_HEADERS`] so the
//! two never mix. Broker bookkeeping (`x-death`, `x-delivery-count`, ...) is never a producer
//! header. A producer header whose value is not text (an AMQP array, table, byte array, void)
//! makes the delivery bad input with the reason in words; numbers and booleans are taken as
//! their decimal text.

use std::time::SystemTime;

use lapin::{
    types::{AMQPValue, FieldTable, LongString},
    BasicProperties,
};
use sha2::{Digest, Sha256};

use super::config::PERSISTENT;
use crate::{
    envelope::{field, Defect, Envelope},
    message::{header, Headers, Rejection},
    time::{checked_from_unix_secs, unix_secs},
    topology::ArgValue,
};

/// On copies: a nested table holding the producer's own `sluice-*` headers, kept apart.
pub(super) const PRODUCER_HEADERS: &str = "sluice-producer-headers";

/// Headers the broker sets for its own bookkeeping; never shown as producer headers.
const BROKER_HEADERS: [&str; 8] = [
    "x-death",
    "x-delivery-count",
    "x-first-death-queue",
    "x-first-death-reason",
    "x-first-death-exchange",
    "x-last-death-queue",
    "x-last-death-reason",
    "x-last-death-exchange",
];

/// A queue argument or policy value as AMQP.
pub(super) fn amqp_arg(v: &ArgValue) -> AMQPValue {
    match v {
        ArgValue::Text(s) => long_string(s),
        ArgValue::Int(n) => AMQPValue::LongLongInt(*n),
    }
}

/// Whether a delivery is one of our copies: it came through the default exchange (producers
/// publish to the `<q>` exchange) and carries `sluice-retries`.
pub(super) fn is_our_copy(exchange: &str, top: &FieldTable) -> bool {
    exchange.is_empty() && top.contains_key(field::RETRIES)
}

/// Message headers split into the producer's and the envelope. On a trusted copy every
/// top-level `sluice-*` header is the envelope's (checked) and the producer's own come out of
/// the nested table; otherwise every header is the producer's. `Err` is the envelope's defect;
/// the producer headers come back either way.
pub(super) fn split(
    top: &FieldTable,
    trusted: bool,
    now: SystemTime,
) -> (FieldTable, Result<Envelope, Defect>) {
    let mut producer = FieldTable::default();
    let mut ours: Vec<(&str, String)> = Vec::new();
    let mut defect = None;
    for (name, value) in top {
        let name = name.as_str();
        if BROKER_HEADERS.contains(&name) {
            continue;
        }
        if trusted && name.starts_with(header::RESERVED_PREFIX) {
            if name == PRODUCER_HEADERS {
                match value {
                    AMQPValue::FieldTable(t) => {
                        for (k, v) in t {
                            producer.insert(k.clone(), v.clone());
                        }
                    }
                    other => {
                        defect.get_or_insert(Defect(format!(
                            "{PRODUCER_HEADERS}: expected a table, got {}",
                            kind(other)
                        )));
                    }
                }
            } else {
                match text(value) {
                    Ok(t) => ours.push((name, t)),
                    Err(got) => {
                        defect.get_or_insert(Defect(format!("{name}: expected text, got {got}")));
                    }
                }
            }
            continue;
        }
        producer.insert(name.into(), value.clone());
    }
    let envelope = match defect {
        Some(d) => Err(d),
        None => Envelope::from_fields(ours.iter().map(|(k, v)| (*k, v.as_str())), now),
    };
    (producer, envelope)
}

/// The headers of a copy: the producer's (their `sluice-*` ones nested apart) plus the
/// envelope's fields, `sluice-retries` always among them.
pub(super) fn copy_headers(producer: &FieldTable, envelope: &Envelope) -> FieldTable {
    let mut out = FieldTable::default();
    let mut nested = FieldTable::default();
    for (name, value) in producer {
        if name.as_str().starts_with(header::RESERVED_PREFIX) {
            nested.insert(name.clone(), value.clone());
        } else {
            out.insert(name.clone(), value.clone());
        }
    }
    if !nested.inner().is_empty() {
        out.insert(PRODUCER_HEADERS.into(), AMQPValue::FieldTable(nested));
    }
    // The enqueue time travels in the `timestamp` property.
    let mut fields = envelope.to_fields();
    fields.retain(|(k, _)| *k != field::ENQUEUED_AT);
    if !fields.iter().any(|(k, _)| *k == field::RETRIES) {
        fields.push((field::RETRIES, "0".into()));
    }
    for (name, value) in fields {
        out.insert(name.into(), long_string(&value));
    }
    out
}

/// What a copy's header table may take: RabbitMQ's default `frame_max` (131072 bytes; the
/// content header, properties and headers, travels in one frame) less room for the other
/// properties (each short string is at most 255 bytes) and the frame's own bytes.
pub(super) const COPY_HEADER_BUDGET: usize = 131_072 - 8 * 1024;

/// [`copy_headers`], made to fit in [`COPY_HEADER_BUDGET`]. A copy the broker refuses would
/// cost a lease per delivery until the crash-loop guard moved it, so something gives way, in
/// this order: the last error is cut to 256 bytes (the envelope's first trimming step); then,
/// if the producer's headers are what is too big (written with a raw client, past the
/// adapter's `MAX_HEADER_BYTES`), the largest of them are left off the copy, named in the log,
/// so that the reason stays; then the envelope is trimmed further (`Envelope::shrink`). The
/// body is never touched.
pub(super) fn fitted_copy_headers(producer: &FieldTable, envelope: &Envelope) -> FieldTable {
    let fits = |h: &FieldTable| table_size(h) <= COPY_HEADER_BUDGET;
    let mut envelope = envelope.clone();
    let headers = copy_headers(producer, &envelope);
    if fits(&headers) {
        return headers;
    }
    if envelope
        .failure
        .as_ref()
        .is_some_and(|f| f.last_error.len() > 256)
    {
        envelope.shrink();
        let headers = copy_headers(producer, &envelope);
        if fits(&headers) {
            return headers;
        }
    }
    let mut by_size: Vec<(usize, String)> = producer
        .into_iter()
        .map(|(k, v)| (k.as_str().len() + value_size(v), k.as_str().to_owned()))
        .collect();
    by_size.sort_unstable_by(|a, b| b.cmp(a));
    let mut kept = producer.inner().clone();
    let mut dropped = Vec::new();
    for (_, name) in by_size {
        kept.retain(|k, _| k.as_str() != name);
        dropped.push(name);
        let headers = copy_headers(&FieldTable::from(kept.clone()), &envelope);
        if fits(&headers) {
            tracing::warn!(
                dropped = ?dropped,
                "the copy's headers do not fit in one AMQP frame: the largest producer headers are left off it"
            );
            return headers;
        }
    }
    let empty = FieldTable::default();
    loop {
        let headers = copy_headers(&empty, &envelope);
        if fits(&headers) || !envelope.shrink() {
            return headers;
        }
    }
}

/// The encoded size of a header table (AMQP 0-9-1 field table: a 4-byte length, then per
/// entry a short-string name, a type byte and the value).
pub(super) fn table_size(t: &FieldTable) -> usize {
    4 + t
        .into_iter()
        .map(|(k, v)| 1 + k.as_str().len() + value_size(v))
        .sum::<usize>()
}

fn value_size(v: &AMQPValue) -> usize {
    1 + match v {
        AMQPValue::Boolean(_) | AMQPValue::ShortShortInt(_) | AMQPValue::ShortShortUInt(_) => 1,
        AMQPValue::ShortInt(_) | AMQPValue::ShortUInt(_) => 2,
        AMQPValue::LongInt(_) | AMQPValue::LongUInt(_) | AMQPValue::Float(_) => 4,
        AMQPValue::LongLongInt(_) | AMQPValue::Double(_) | AMQPValue::Timestamp(_) => 8,
        AMQPValue::DecimalValue(_) => 5,
        AMQPValue::ShortString(s) => 1 + s.as_str().len(),
        AMQPValue::LongString(s) => 4 + s.as_bytes().len(),
        AMQPValue::ByteArray(b) => 4 + b.as_slice().len(),
        AMQPValue::FieldArray(a) => 4 + a.as_slice().iter().map(value_size).sum::<usize>(),
        AMQPValue::FieldTable(t) => table_size(t),
        AMQPValue::Void => 0,
    }
}

/// Producer headers as strings, names in lower case; a value that is not text is bad input.
pub(super) fn producer_headers(t: &FieldTable) -> Result<Headers, Rejection> {
    let mut out = Headers::new();
    for (k, v) in t {
        let name = k.as_str().to_ascii_lowercase();
        match text(v) {
            Ok(text) => {
                out.insert(name, text);
            }
            Err(got) => {
                return Err((
                    "malformed header",
                    format!("header {name:?}: expected a text value, got {got}"),
                ))
            }
        }
    }
    Ok(out)
}

/// Producer headers for display (`dlq list`): a value that is not text is shown as what it is.
pub(super) fn producer_headers_lossy(t: &FieldTable) -> Headers {
    t.into_iter()
        .map(|(k, v)| {
            let value = text(v).unwrap_or_else(|got| format!("<{got}>"));
            (k.as_str().to_ascii_lowercase(), value)
        })
        .collect()
}

/// Producer headers as an AMQP table (long strings).
pub(super) fn field_table(h: &Headers) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in h {
        t.insert(k.as_str().into(), long_string(v));
    }
    t
}

pub(super) fn long_string(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()))
}

/// An AMQP value in words, for reasons.
fn kind(v: &AMQPValue) -> &'static str {
    match v {
        AMQPValue::Boolean(_) => "a boolean",
        AMQPValue::ShortShortInt(_)
        | AMQPValue::ShortShortUInt(_)
        | AMQPValue::ShortInt(_)
        | AMQPValue::ShortUInt(_)
        | AMQPValue::LongInt(_)
        | AMQPValue::LongUInt(_)
        | AMQPValue::LongLongInt(_) => "an integer",
        AMQPValue::Float(_) | AMQPValue::Double(_) => "a floating-point number",
        AMQPValue::DecimalValue(_) => "an AMQP decimal",
        AMQPValue::ShortString(_) | AMQPValue::LongString(_) => "a string",
        AMQPValue::FieldArray(_) => "an AMQP array",
        AMQPValue::Timestamp(_) => "an AMQP timestamp",
        AMQPValue::FieldTable(_) => "an AMQP table",
        AMQPValue::ByteArray(_) => "an AMQP byte array",
        AMQPValue::Void => "an AMQP void (no value)",
    }
}

/// A header value as text: strings (UTF-8), and numbers and booleans as their decimal text.
/// `Err` says in words what came instead.
fn text(v: &AMQPValue) -> Result<String, String> {
    Ok(match v {
        AMQPValue::LongString(s) => match std::str::from_utf8(s.as_bytes()) {
            Ok(t) => t.to_owned(),
            Err(_) => return Err("a string that is not UTF-8".into()),
        },
        AMQPValue::ShortString(s) => s.as_str().to_owned(),
        AMQPValue::Boolean(b) => b.to_string(),
        AMQPValue::Float(f) => f.to_string(),
        AMQPValue::Double(d) => d.to_string(),
        AMQPValue::Timestamp(t) => t.to_string(),
        other => match as_i64(other)
            .map(|n| n.to_string())
            .or_else(|| as_u64(other).map(|n| n.to_string()))
        {
            Some(n) => n,
            None => return Err(kind(other).into()),
        },
    })
}

fn as_i64(v: &AMQPValue) -> Option<i64> {
    Some(match v {
        AMQPValue::ShortShortInt(n) => i64::from(*n),
        AMQPValue::ShortInt(n) => i64::from(*n),
        AMQPValue::LongInt(n) => i64::from(*n),
        AMQPValue::LongLongInt(n) => *n,
        AMQPValue::ShortShortUInt(n) => i64::from(*n),
        AMQPValue::ShortUInt(n) => i64::from(*n),
        AMQPValue::LongUInt(n) => i64::from(*n),
        _ => return None,
    })
}

/// A count or time written by the broker (`x-delivery-count`, `x-death` times), if it is a
/// non-negative integer.
pub(super) fn as_u64(v: &AMQPValue) -> Option<u64> {
    match v {
        AMQPValue::Timestamp(n) => Some(*n),
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok()?.parse().ok(),
        other => u64::try_from(as_i64(other)?).ok(),
    }
}

/// A broker-written value as text (an `x-death` field), empty when it is not text.
pub(super) fn as_text(v: &AMQPValue) -> String {
    text(v).unwrap_or_default()
}

/// The message id: `message-id` as published, or (for producers that set none) a digest of
/// the content, which stays the same across redeliveries.
pub(super) fn message_id(p: &BasicProperties, body: &[u8]) -> String {
    if let Some(id) = p.message_id() {
        return id.as_str().to_owned();
    }
    let mut h = Sha256::new();
    h.update(body);
    h.update(format!("{:?}{:?}", p.timestamp(), p.headers()).as_bytes());
    format!("sha256-{}", &hex::encode(h.finalize())[..32])
}

/// When the message was published, from the `timestamp` property, if it is plausible.
pub(super) fn published_at(p: &BasicProperties) -> Option<SystemTime> {
    p.timestamp().and_then(checked_from_unix_secs)
}

/// Properties of a copy: the original's, minus what must not be copied (`expiration` would
/// expire the copy on a delay step; `user-id` is checked against our connection's user).
pub(super) fn copy_properties(
    orig: &BasicProperties,
    id: &str,
    headers: FieldTable,
    enqueued_at: SystemTime,
) -> BasicProperties {
    let mut p = BasicProperties::default()
        .with_message_id(id.into())
        .with_timestamp(unix_secs(enqueued_at))
        .with_delivery_mode(PERSISTENT)
        .with_headers(headers);
    if let Some(v) = orig.content_type() {
        p = p.with_content_type(v.clone());
    }
    if let Some(v) = orig.content_encoding() {
        p = p.with_content_encoding(v.clone());
    }
    if let Some(v) = orig.priority() {
        p = p.with_priority(*v);
    }
    if let Some(v) = orig.correlation_id() {
        p = p.with_correlation_id(v.clone());
    }
    if let Some(v) = orig.reply_to() {
        p = p.with_reply_to(v.clone());
    }
    if let Some(v) = orig.kind() {
        p = p.with_type(v.clone());
    }
    if let Some(v) = orig.app_id() {
        p = p.with_app_id(v.clone());
    }
    p
}

/// The first `x-death` entry of a broker dead letter: (reason, queue, exchange, when).
pub(super) fn first_death(
    top: &FieldTable,
) -> Option<(String, String, String, Option<SystemTime>)> {
    let AMQPValue::FieldArray(deaths) = top.inner().get("x-death")? else {
        return None;
    };
    let AMQPValue::FieldTable(death) = deaths.as_slice().first()? else {
        return None;
    };
    let get = |k: &str| death.inner().get(k).map(as_text).unwrap_or_default();
    let at = death
        .inner()
        .get("time")
        .and_then(as_u64)
        .and_then(checked_from_unix_secs);
    Some((get("reason"), get("queue"), get("exchange"), at))
}

/// How many times this copy went back to the queue before (nacks, expired leases, dead
/// consumers): quorum queues count them in `x-delivery-count`. Saturates, never wraps.
pub(super) fn returns(top: &FieldTable, redelivered: bool) -> u32 {
    if !redelivered {
        return 0;
    }
    top.inner()
        .get("x-delivery-count")
        .and_then(as_u64)
        .map_or(1, |n| u32::try_from(n).unwrap_or(u32::MAX))
}

/// The fuzz target `amqp_headers` (feature `fuzzing`): a header table off the wire, through
/// everything a delivery's headers go through, checking that a copy always fits in a frame and
/// that its envelope reads back as written.
#[cfg(feature = "fuzzing")]
pub(crate) fn fuzz_headers(bytes: &[u8]) {
    let Ok((_, top)) = lapin::types::parsing::parse_field_table(bytes) else {
        return;
    };
    let now = SystemTime::now();
    let _ = returns(&top, true);
    let _ = first_death(&top);
    for trusted in [false, true] {
        let (producer, envelope) = split(&top, trusted, now);
        let _ = producer_headers(&producer);
        let _ = producer_headers_lossy(&producer);
        let Ok(envelope) = envelope else { continue };
        let copy = fitted_copy_headers(&producer, &envelope);
        let bare = copy_headers(&FieldTable::default(), &Envelope::default());
        assert!(
            table_size(&copy) <= COPY_HEADER_BUDGET.max(table_size(&bare)),
            "a copy's headers must fit in one frame"
        );
        // What a copy carries reads back, and a second trip changes nothing.
        let (_, once) = split(&copy_headers(&producer, &envelope), true, now);
        let once = once.expect("a copy's own envelope reads back");
        let (_, twice) = split(&copy_headers(&producer, &once), true, now);
        assert_eq!(twice.expect("reads back again"), once);
    }
}

#[cfg(test)]
mod tests {
    use lapin::types::FieldArray;

    use super::*;
    use crate::envelope::{Failure, FailureClass};

    #[test]
    fn a_copy_round_trips_its_envelope_and_keeps_producer_sluice_headers_apart() {
        let now = SystemTime::now();
        let mut producer = FieldTable::default();
        producer.insert("x-tenant".into(), long_string("acme"));
        producer.insert("sluice-own".into(), long_string("producer's"));
        // The wire keeps milliseconds.
        let at = crate::time::from_unix_ms(crate::time::unix_ms(now));
        let failure = Failure {
            class: FailureClass::Transient,
            reason: "503".into(),
            at,
        };
        let envelope = Envelope::default().for_retry(2, &failure, None);
        let headers = copy_headers(&producer, &envelope);
        assert!(is_our_copy("", &headers));
        assert!(!is_our_copy("jobs", &headers));
        let (back, read) = split(&headers, true, now);
        let mut read = read.unwrap();
        read.enqueued_at = None;
        assert_eq!(read.retries, 2);
        assert_eq!(read.failure, envelope.failure);
        let h = producer_headers(&back).unwrap();
        assert_eq!(h["sluice-own"], "producer's");
        assert_eq!(h["x-tenant"], "acme");
    }

    #[test]
    fn untrusted_sluice_headers_stay_producer_headers_and_bad_ones_are_defects() {
        let now = SystemTime::now();
        let mut top = FieldTable::default();
        top.insert(field::RETRIES.into(), long_string("99999999999"));
        let (producer, envelope) = split(&top, false, now);
        assert!(envelope.unwrap().is_empty());
        assert!(producer.contains_key(field::RETRIES));
        let (_, envelope) = split(&top, true, now);
        assert!(envelope.unwrap_err().0.contains("larger than"));
        let mut top = FieldTable::default();
        top.insert(
            field::RETRIES.into(),
            AMQPValue::FieldArray(FieldArray::default()),
        );
        let (_, envelope) = split(&top, true, now);
        assert!(envelope.unwrap_err().0.contains("an AMQP array"));
    }

    #[test]
    fn non_text_producer_values_are_named_in_words() {
        let mut t = FieldTable::default();
        t.insert("x-n".into(), AMQPValue::LongInt(7));
        assert_eq!(producer_headers(&t).unwrap()["x-n"], "7");
        t.insert(
            "x-list".into(),
            AMQPValue::FieldArray(vec![AMQPValue::LongInt(1)].into()),
        );
        let (label, reason) = producer_headers(&t).unwrap_err();
        assert_eq!(label, "malformed header");
        assert_eq!(
            reason,
            "header \"x-list\": expected a text value, got an AMQP array"
        );
        let mut t = FieldTable::default();
        t.insert(
            "x-b".into(),
            AMQPValue::LongString(LongString::from(vec![0xff])),
        );
        assert!(producer_headers(&t).unwrap_err().1.contains("not UTF-8"));
    }

    #[test]
    fn a_copy_fits_in_one_frame_and_its_size_is_counted_as_encoded() {
        let mut t = FieldTable::default();
        t.insert("x-a".into(), long_string("abc"));
        t.insert("x-n".into(), AMQPValue::LongInt(7));
        let mut nested = FieldTable::default();
        nested.insert("k".into(), AMQPValue::Boolean(true));
        t.insert("x-t".into(), AMQPValue::FieldTable(nested));
        t.insert(
            "x-l".into(),
            AMQPValue::FieldArray(vec![AMQPValue::Void].into()),
        );
        t.insert("x-s".into(), AMQPValue::ShortString("s".into()));
        t.insert("x-d".into(), AMQPValue::Double(1.5));
        t.insert("x-b".into(), AMQPValue::ByteArray(vec![1u8, 2].into()));
        // As lapin encodes it on the wire.
        let encoded =
            cookie_factory::gen_simple(lapin::types::generation::gen_field_table(&t), Vec::new())
                .unwrap();
        assert_eq!(table_size(&t), encoded.len());
        let mut big = FieldTable::default();
        for i in 0..50 {
            big.insert(
                format!("x-h{i:02}").as_str().into(),
                long_string(&"v".repeat(3000)),
            );
        }
        let mut envelope = Envelope::default();
        envelope.record_failure(&Failure::now(FailureClass::Permanent, "e".repeat(4000)));
        let copy = fitted_copy_headers(&big, &envelope);
        assert!(table_size(&copy) <= COPY_HEADER_BUDGET);
        let (_, read) = split(&copy, true, SystemTime::now());
        let read = read.unwrap();
        assert!(
            !read.failure.unwrap().last_error.is_empty(),
            "the reason stays"
        );
    }

    #[test]
    fn broker_counts_never_wrap_or_panic() {
        let mut top = FieldTable::default();
        top.insert("x-delivery-count".into(), AMQPValue::LongLongInt(i64::MAX));
        assert_eq!(returns(&top, true), u32::MAX);
        top.insert("x-delivery-count".into(), AMQPValue::LongLongInt(-5));
        assert_eq!(returns(&top, true), 1);
        assert_eq!(returns(&top, false), 0);
        let p = BasicProperties::default().with_timestamp(u64::MAX);
        assert_eq!(published_at(&p), None);
    }
}
