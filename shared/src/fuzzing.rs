//! Entry points of the fuzz targets (`fuzz/`, cargo feature `fuzzing`): every decoder of
//! untrusted input, called as the transports call it, on raw bytes. Not an API: each function
//! panics when a property is broken, which is what the fuzzer looks for. The committed seeds
//! run through them in the integration tests (`fuzz_seeds`); docs/reliability.md#fuzzing says
//! what each target checks.

use std::time::SystemTime;

use crate::envelope::Envelope;

/// The lines of `data` as text (bytes that are not UTF-8 replaced).
fn lines(data: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(data)
        .split('\n')
        .map(str::to_owned)
        .collect()
}

/// The envelope from its JSON (`Envelope::from_json`) and from its fields
/// (`Envelope::from_fields`, one `name=value` a line): whatever is accepted writes out as what
/// reads back, and a second trip changes nothing.
pub fn envelope(data: &[u8]) {
    let now = SystemTime::now();
    let check = |e: Envelope| {
        let once = Envelope::from_json(&e.to_json(), now).expect("what is written reads back");
        let twice = Envelope::from_json(&once.to_json(), now).expect("and again");
        assert_eq!(once, twice);
        let fields = once.to_fields();
        let back = Envelope::from_fields(fields.iter().map(|(k, v)| (*k, v.as_str())), now);
        assert_eq!(back.expect("its fields read back"), once);
        let mut shrunk = once;
        let mut steps = 0;
        while shrunk.shrink() {
            steps += 1;
            assert!(steps < 16, "shrinking ends");
        }
    };
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(e) = Envelope::from_json(text, now) {
            check(e);
        }
    }
    let lines = lines(data);
    let pairs: Vec<(&str, &str)> = lines.iter().filter_map(|l| l.split_once('=')).collect();
    if let Ok(e) = Envelope::from_fields(pairs, now) {
        check(e);
    }
}

/// Settings from a TOML text (the `sluice.toml` layer): an error or settings, never a panic.
pub fn config_toml(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(e) = crate::Settings::load("fuzzed", Some(text), Vec::new(), &[]) {
        assert!(!e.to_string().is_empty());
    }
}

/// An AMQP header table as it comes off the wire (the field-table encoding of AMQP 0-9-1),
/// through the RabbitMQ codec: producer headers, envelope, broker counts, the copy's headers.
#[cfg(feature = "rabbitmq")]
pub fn amqp_headers(data: &[u8]) {
    crate::transport::rabbitmq::fuzz_headers(data);
}

/// An SQS message: the first line is the body, each further line an attribute
/// `name<TAB>data type<TAB>value` (a `Binary` value is the value's bytes). Decoded by the SQS
/// codec, then sent on as a copy twice: the body's bytes and the headers come back intact.
#[cfg(feature = "sqs")]
pub fn sqs_message(data: &[u8]) {
    use aws_sdk_sqs::{
        primitives::Blob,
        types::{Message, MessageAttributeValue},
    };
    let lines = lines(data);
    let mut m = Message::builder().message_id("fuzzed").body(&lines[0]);
    for line in &lines[1..] {
        let mut parts = line.splitn(3, '\t');
        let (Some(name), Some(kind), value) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        let mut v = MessageAttributeValue::builder().data_type(kind);
        if let Some(value) = value {
            v = if kind.starts_with("Binary") {
                v.binary_value(Blob::new(value.as_bytes().to_vec()))
            } else {
                v.string_value(value)
            };
        }
        if let Ok(v) = v.build() {
            m = m.message_attributes(name, v);
        }
    }
    crate::transport::sqs::fuzz_round_trip(&m.build());
}

/// A Lambda invocation's payload: when it is an SQS event, each record as Lambda mode reads
/// it (the record as a message, then the SQS codec's round trip).
#[cfg(feature = "lambda")]
pub fn lambda_event(data: &[u8]) {
    let Ok(event) = serde_json::from_slice::<aws_lambda_events::event::sqs::SqsEvent>(data) else {
        return;
    };
    for record in &event.records {
        if let Ok(m) = crate::lambda::to_message(record) {
            crate::transport::sqs::fuzz_round_trip(&m);
        }
    }
}

/// A row of the embedded queue file written by another tool: six columns (id, body, headers,
/// envelope, receive count, enqueue time) separated by NUL bytes, each led by its SQLite type
/// (`n` null, `i` integer, `r` real, `t` text, `b` blob), read as a delivery and a dead letter.
#[cfg(feature = "embedded")]
pub fn embedded_row(data: &[u8]) {
    use rusqlite::types::Value;
    let mut columns: [Value; 6] = std::array::from_fn(|_| Value::Null);
    for (slot, part) in columns.iter_mut().zip(data.split(|b| *b == 0)) {
        let (kind, rest) = part.split_first().unwrap_or((&b'n', &[]));
        let text = || String::from_utf8_lossy(rest).into_owned();
        *slot = match kind {
            b'i' => Value::Integer(text().trim().parse().unwrap_or(0)),
            b'r' => Value::Real(text().trim().parse().unwrap_or(0.0)),
            b't' => Value::Text(text()),
            b'b' => Value::Blob(rest.to_vec()),
            _ => Value::Null,
        };
    }
    crate::transport::embedded::fuzz_row(columns);
}
