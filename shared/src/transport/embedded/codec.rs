//! Rows of the embedded queue file as deliveries and dead letters: producer headers as a
//! JSON object, the envelope as its JSON (`crate::envelope`), the broker's bookkeeping in
//! columns.

use std::time::SystemTime;

use rusqlite::Row;

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

/// Producer headers as stored. A row we did not write could hold anything: unreadable
/// headers are dropped rather than failing the receive.
fn headers(text: &str) -> Headers {
    serde_json::from_str(text).unwrap_or_default()
}

/// A leased row as a delivery. The envelope column is ours; should it not parse (a row
/// written by hand), the delivery carries the defect and the pipeline dead-letters it.
pub(super) fn delivery(r: &Row<'_>) -> rusqlite::Result<Delivery> {
    let (envelope, defect) = match Envelope::from_json(&r.get::<_, String>(4)?, SystemTime::now()) {
        Ok(e) => (e, None),
        Err(d) => (
            Envelope::default(),
            Some(("malformed envelope", d.to_string())),
        ),
    };
    let mut envelope = envelope;
    envelope.enqueued_at = Some(from_unix_ms(r.get(6)?));
    // One row per message: the row counts every delivery, and the envelope carries no retries
    // of ours (a row written by hand could: they only raise the attempt).
    let count = u32::try_from(r.get::<_, i64>(5)?).unwrap_or(u32::MAX);
    Ok(Delivery {
        id: r.get(1)?,
        body: r.get(2)?,
        headers: headers(&r.get::<_, String>(3)?),
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
    let mut envelope =
        Envelope::from_json(&r.get::<_, String>(4)?, SystemTime::now()).unwrap_or_default();
    envelope.enqueued_at = Some(from_unix_ms(r.get(5)?));
    let at = from_unix_ms(r.get(7)?);
    let arrival = match r.get::<_, Option<i64>>(6)? {
        Some(n) => Arrival::CrashLoop {
            deliveries: u32::try_from(n).unwrap_or(u32::MAX),
            guard: "the embedded queue's delivery limit (retry.max_deliveries)",
            at,
        },
        None => Arrival::Sluice,
    };
    let dl = DeadLetter::new(
        r.get(1)?,
        r.get(2)?,
        headers(&r.get::<_, String>(3)?),
        envelope,
        arrival,
        origin,
    );
    Ok((r.get(0)?, dl))
}
