//! The transport conformance suite on the embedded SQLite queue.

use std::time::Duration;

use sluice::{
    conformance::transport::{self as suite, Forged},
    transport::{embedded::EmbeddedTransport, TransportOptions},
};

use crate::support;

/// Each check gets its own file; handles made with the same queue share it.
async fn make(mut opts: TransportOptions) -> EmbeddedTransport {
    let dir = std::env::temp_dir().join("sluice-conformance");
    opts.url = dir
        .join(format!("{}.db", opts.queue))
        .to_string_lossy()
        .into_owned();
    EmbeddedTransport::open(opts)
        .await
        .expect("open embedded transport")
}

support::transport_conformance!(
    // The embedded queue stores exact times: no rounding allowed.
    rounding: Duration::ZERO,
    racing: ::sluice::conformance::transport::RacingReceives::Exclusive,
    |check| {
        check(make).await;
    }
);

/// A row written by hand into the queue file, as a raw SQLite client would: the fields in the
/// envelope column (as one of our copies) or in the producer headers.
async fn forge(t: &EmbeddedTransport, queue: &str, m: Forged) {
    let fields: serde_json::Map<String, serde_json::Value> = m
        .fields
        .into_iter()
        .map(|(k, v)| (k, serde_json::Value::String(v)))
        .collect();
    let fields = serde_json::Value::Object(fields).to_string();
    let (headers, envelope) = if m.as_copy {
        ("{}".to_owned(), fields)
    } else {
        (fields, "{}".to_owned())
    };
    let conn = rusqlite::Connection::open(t.path()).unwrap();
    conn.busy_timeout(Duration::from_secs(10)).unwrap();
    let now = sluice::time::unix_ms(std::time::SystemTime::now());
    conn.execute(
        "INSERT INTO messages (id, queue, body, headers, envelope, enqueued_at, visible_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6)",
        rusqlite::params![
            uuid::Uuid::new_v4().to_string(),
            queue,
            m.body,
            headers,
            envelope,
            now
        ],
    )
    .unwrap();
}

#[tokio::test]
async fn forged_envelope_fields_are_defects_and_never_wrap_the_attempt() {
    suite::forged_envelope_fields_are_defects_and_never_wrap_the_attempt(make, forge).await;
}

#[tokio::test]
async fn sluice_headers_from_a_producer_stay_producer_headers() {
    suite::sluice_headers_from_a_producer_stay_producer_headers(make, forge).await;
}
