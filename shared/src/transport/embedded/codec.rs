//! Rows of the embedded queue file as deliveries and dead letters: producer headers as a
//! JSON object, the envelope as its JSON (`crate::envelope`), the broker's bookkeeping in
//! columns.

use std::time::SystemTime;

use rusqlite::{types::ValueRef, Row};

use crate::{
    dead_letter::{Arrival, DeadLetter, Origin},
    envelope::Envelope,
    message::{Delivery, Headers, Receipt, ReceiptKind},
    time::from_unix_ms,
};

/// The columns [`delivery`] reads, in order.
pub(super) const DELIVERY_COLUMNS: &str =
    "seq, id, body, headers, envelope, receive_count, enqueued_at, lease_token";

/// The columns [`dead_letter`] reads, in order.
pub(super) const DEAD_LETTER_COLUMNS: &str =
    "seq, id, body, headers, envelope, enqueued_at, crash_deliveries, dead_lettered_at";

/// A column as bytes, whatever SQLite holds in it: a row written by another tool may store a
/// body as TEXT, or a header column as a BLOB. The bytes are the ones stored.
fn bytes(r: &Row<'_>, i: usize) -> rusqlite::Result<Vec<u8>> {
    Ok(match r.get_ref(i)? {
        ValueRef::Blob(b) | ValueRef::Text(b) => b.to_vec(),
        ValueRef::Integer(n) => n.to_string().into_bytes(),
        ValueRef::Real(x) => x.to_string().into_bytes(),
        ValueRef::Null => Vec::new(),
    })
}

/// A text column as text (bytes that are not UTF-8 are replaced: ids and bookkeeping only).
fn text(r: &Row<'_>, i: usize) -> rusqlite::Result<String> {
    Ok(String::from_utf8_lossy(&bytes(r, i)?).into_owned())
}

/// An integer column; a row written by another tool that holds something else there reads as
/// `default`.
fn int(r: &Row<'_>, i: usize, default: i64) -> rusqlite::Result<i64> {
    Ok(match r.get_ref(i)? {
        ValueRef::Integer(n) => n,
        ValueRef::Real(x) if x.is_finite() => x as i64,
        ValueRef::Text(t) => std::str::from_utf8(t)
            .ok()
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or(default),
        _ => default,
    })
}

/// Producer headers as stored, for listing dead letters: unreadable ones are dropped.
fn headers(text: &str) -> Headers {
    serde_json::from_str(text).unwrap_or_default()
}

/// Producer headers of a delivery. A row we did not write (the file written by hand or by
/// another tool) could hold anything: what is not a JSON object of texts is bad input, said
/// in words, and the delivery keeps what could be read.
pub(crate) fn checked_headers(text: &str) -> Result<Headers, String> {
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("the headers column is not JSON: {e}"))?;
    let serde_json::Value::Object(map) = value else {
        return Err(format!(
            "the headers column: expected a JSON object of texts, got {}",
            json_kind(&value)
        ));
    };
    let mut out = Headers::new();
    for (name, value) in map {
        match value {
            serde_json::Value::String(v) => {
                out.insert(name.to_ascii_lowercase(), v);
            }
            other => {
                return Err(format!(
                    "header {name:?}: expected a text value, got {}",
                    json_kind(&other)
                ))
            }
        }
    }
    Ok(out)
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

/// A leased row as a delivery. The envelope column is ours; should it not parse (a row
/// written by hand), the delivery carries the defect and the pipeline dead-letters it.
pub(super) fn delivery(r: &Row<'_>) -> rusqlite::Result<Delivery> {
    let (envelope, mut defect) = match Envelope::from_json(&text(r, 4)?, SystemTime::now()) {
        Ok(e) => (e, None),
        Err(d) => (
            Envelope::default(),
            Some(("malformed envelope", d.to_string())),
        ),
    };
    let raw_headers = bytes(r, 3)?;
    let headers = match std::str::from_utf8(&raw_headers)
        .map_err(|_| "the headers column is not UTF-8 text".to_owned())
        .and_then(checked_headers)
    {
        Ok(h) => h,
        Err(why) => {
            defect.get_or_insert(("malformed header", why));
            Headers::new()
        }
    };
    let mut envelope = envelope;
    envelope.enqueued_at = Some(from_unix_ms(int(r, 6, 0)?));
    // One row per message: the row counts every delivery, and the envelope carries no retries
    // of ours (a row written by hand could: they only raise the attempt).
    let count = u32::try_from(int(r, 5, 1)?).unwrap_or(u32::MAX);
    Ok(Delivery {
        id: text(r, 1)?,
        body: bytes(r, 2)?,
        headers,
        attempt: envelope.attempt(count),
        envelope,
        defect,
        receipt: Receipt(ReceiptKind::Embedded {
            seq: r.get(0)?,
            token: r.get(7)?,
        }),
        routing_key: None,
    })
}

/// A dead-letter row, with its sequence number.
pub(super) fn dead_letter(r: &Row<'_>, origin: Origin<'_>) -> rusqlite::Result<(i64, DeadLetter)> {
    let mut envelope = Envelope::from_json(&text(r, 4)?, SystemTime::now()).unwrap_or_default();
    envelope.enqueued_at = Some(from_unix_ms(int(r, 5, 0)?));
    let at = from_unix_ms(int(r, 7, 0)?);
    let crash = match r.get_ref(6)? {
        ValueRef::Null => None,
        _ => Some(int(r, 6, 0)?),
    };
    let arrival = match crash {
        Some(n) => Arrival::CrashLoop {
            deliveries: u32::try_from(n).unwrap_or(u32::MAX),
            guard: "the embedded queue's delivery limit (retry.max_deliveries)",
            at,
        },
        None => Arrival::Sluice,
    };
    let dl = DeadLetter::new(
        text(r, 1)?,
        bytes(r, 2)?,
        headers(&text(r, 3)?),
        envelope,
        arrival,
        origin,
    );
    Ok((r.get(0)?, dl))
}

/// The fuzz target `embedded_row` (feature `fuzzing`): a row of any column types, read as a
/// delivery and as a dead letter, as the transport reads them (through SQLite itself).
#[cfg(feature = "fuzzing")]
pub(crate) fn fuzz_row(columns: [rusqlite::types::Value; 6]) {
    let conn = rusqlite::Connection::open_in_memory().expect("an in-memory database");
    let [id, body, headers, envelope, count, at] = columns;
    let d = conn
        .query_row(
            "SELECT 1, ?1, ?2, ?3, ?4, ?5, ?6, 7",
            rusqlite::params![id, body, headers, envelope, count, at],
            delivery,
        )
        .expect("any row reads as a delivery");
    assert!(d.attempt >= 1 && d.envelope.enqueued_at.is_some());
    let origin = Origin {
        function: "f",
        queue: "q",
    };
    conn.query_row(
        "SELECT 1, ?1, ?2, ?3, ?4, ?5, ?6, ?5",
        rusqlite::params![id, body, headers, envelope, at, count],
        |r| dead_letter(r, origin),
    )
    .expect("any row reads as a dead letter");
}
