//! RabbitMQ: the corpus published with lapin to the work queue's exchange, as a producer with
//! the broker's own client would, plus what only AMQP can say: typed header values, no
//! message id, forged copies through the default exchange, headers near `frame_max`.

use sluice::{
    conformance::unique,
    transport::rabbitmq::lapin::{
        options::{BasicPublishOptions, ConfirmSelectOptions},
        types::{AMQPValue, ByteArray, FieldArray, FieldTable, LongString},
        BasicProperties, Channel, Connection, ConnectionProperties,
    },
};
use sluice_tests::rabbit::Vhost;

use super::*;

/// Headers as AMQP values, in order.
type Amqp = Vec<(String, AMQPValue)>;

fn long(s: &[u8]) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.to_vec()))
}

fn table(headers: &[(String, AMQPValue)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in headers {
        t.insert(k.as_str().into(), v.clone());
    }
    t
}

/// One raw publish: to the `<q>` exchange (a producer's message) or the default exchange
/// straight to the queue (posing as one of Sluice's copies), with a message id or none.
async fn publish(
    ch: &Channel,
    queue: &str,
    as_copy: bool,
    id: Option<&str>,
    body: &[u8],
    headers: FieldTable,
) {
    let mut p = BasicProperties::default().with_headers(headers);
    if let Some(id) = id {
        p = p.with_message_id(id.into());
    }
    let exchange = if as_copy { "" } else { queue };
    ch.basic_publish(
        exchange.into(),
        queue.into(),
        BasicPublishOptions::default(),
        body,
        p,
    )
    .await
    .expect("publish")
    .await
    .expect("confirm");
}

#[tokio::test]
async fn every_bad_message_is_dead_lettered_at_once_with_its_bytes_and_a_reason() {
    let vhost = Vhost::create("bad-input").expect("a test virtual host (is RabbitMQ up?)");
    let queue = unique("bad-input");
    let run = FunctionRun::new("charge-payment")
        .env("SLUICE__TRANSPORT__KIND", "rabbitmq")
        .env("SLUICE__TRANSPORT__URL", &vhost.url)
        .set(format!("queue={queue}"));
    run.cli(&["provision"]);
    let conn = Connection::connect(&vhost.url, ConnectionProperties::default())
        .await
        .expect("connect");
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();

    let mut sent = Vec::new();
    for (i, case) in corpus::common(false).iter().enumerate() {
        let id = format!("bi-{i}");
        let headers: Amqp = case
            .headers
            .iter()
            .map(|(k, v)| (k.clone(), long(v.as_bytes())))
            .collect();
        publish(&ch, &queue, false, Some(&id), &case.body, table(&headers)).await;
        sent.push(Sent::of(case, Some(id)));
    }

    let ok = corpus::valid;
    let typed: Vec<(&str, &str, AMQPValue, Expect)> = vec![
        (
            "integer header",
            "x-count",
            AMQPValue::LongInt(7),
            Expect::Handled {
                payment_id: "bi-rt0",
            },
        ),
        (
            "array header",
            "x-list",
            AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::LongInt(1)])),
            dead(
                "malformed header",
                "header \"x-list\": expected a text value, got an AMQP array",
            ),
        ),
        (
            "table header",
            "x-map",
            AMQPValue::FieldTable(FieldTable::default()),
            dead("malformed header", "got an AMQP table"),
        ),
        (
            "byte-array header",
            "x-raw",
            AMQPValue::ByteArray(ByteArray::from(vec![1u8, 2, 3])),
            dead("malformed header", "got an AMQP byte array"),
        ),
        (
            "void header",
            "x-void",
            AMQPValue::Void,
            dead("malformed header", "got an AMQP void"),
        ),
        (
            "non-UTF-8 header",
            "x-bytes",
            long(b"\xff\xfe"),
            dead("malformed header", "a string that is not UTF-8"),
        ),
        (
            "array idempotency key",
            "idempotency-key",
            AMQPValue::FieldArray(FieldArray::default()),
            dead(
                "malformed header",
                "header \"idempotency-key\": expected a text value, got an AMQP array",
            ),
        ),
        (
            "forged broker count",
            "x-delivery-count",
            AMQPValue::LongLongInt(-5),
            Expect::Handled {
                payment_id: "bi-rt7",
            },
        ),
    ];
    for (i, (name, header, value, expect)) in typed.into_iter().enumerate() {
        let id = format!("bi-rt{i}");
        let c = special(name, ok(&id), expect);
        publish(
            &ch,
            &queue,
            false,
            Some(&id),
            &c.body,
            table(&[(header.to_owned(), value)]),
        )
        .await;
        sent.push(Sent::of(&c, Some(id)));
    }

    // Posing as Sluice's own copies (default exchange, sluice-retries set): the envelope is
    // checked and a malformed one is bad input.
    let forged: Vec<(&str, Amqp, &str)> = vec![
        (
            "copy with an overflowing count",
            vec![("sluice-retries".into(), long(b"4294967296"))],
            "is larger than 4294967295",
        ),
        (
            "copy with a count that is not a number",
            vec![("sluice-retries".into(), long(b"abc"))],
            "decimal digits",
        ),
        (
            "copy with a count as an array",
            vec![(
                "sluice-retries".into(),
                AMQPValue::FieldArray(FieldArray::default()),
            )],
            "sluice-retries: expected text, got an AMQP array",
        ),
        (
            "copy with producer headers not a table",
            vec![
                ("sluice-retries".into(), long(b"1")),
                ("sluice-producer-headers".into(), long(b"x")),
            ],
            "sluice-producer-headers: expected a table, got a string",
        ),
        (
            "copy due a century ahead",
            vec![
                ("sluice-retries".into(), long(b"1")),
                ("sluice-due-at".into(), long(b"2126-01-01T00:00:00Z")),
            ],
            "more than a year ahead",
        ),
        (
            "copy with half a dead-letter mark",
            vec![
                ("sluice-retries".into(), long(b"1")),
                ("sluice-attempts".into(), long(b"3")),
            ],
            "incomplete dead-letter mark",
        ),
    ];
    for (i, (name, headers, words)) in forged.into_iter().enumerate() {
        let id = format!("bi-rf{i}");
        let c = special(name, ok(&id), dead("malformed envelope", words));
        publish(&ch, &queue, true, Some(&id), &c.body, table(&headers)).await;
        sent.push(Sent::of(&c, Some(id)));
    }

    // No message id: the id is a digest of the content; found by its body.
    let c = special(
        "valid, no message id",
        ok("bi-rn1"),
        Expect::Handled {
            payment_id: "bi-rn1",
        },
    );
    publish(&ch, &queue, false, None, &c.body, FieldTable::default()).await;
    sent.push(Sent::of(&c, None));
    let c = special(
        "bad, no message id",
        "no id and not JSON",
        dead("malformed JSON", "body is not JSON"),
    );
    publish(&ch, &queue, false, None, &c.body, FieldTable::default()).await;
    sent.push(Sent::of(&c, None));

    // Headers near frame_max (131072 bytes): a raw client can publish what the adapter would
    // refuse to send; the dead-letter copy must still fit in one frame beside its envelope.
    // 43 headers of 3000 bytes and one to pad the table to 130,600 bytes (each entry: a name
    // length byte, the name, a type byte, a 4-byte length, the value): the copy's envelope
    // would take it past 131,072.
    let mut big: Amqp = (0..43)
        .map(|i| (format!("x-h{i:02}"), long(&[b'v'; 3000])))
        .collect();
    big.push(("x-pad".into(), long(&[b'p'; 1112])));
    let c = special(
        "headers near frame_max",
        ok("bi-rbig"),
        dead("too many headers", "limits.max_headers"),
    );
    publish(&ch, &queue, false, Some("bi-rbig"), &c.body, table(&big)).await;
    sent.push(Sent::of(&c, Some("bi-rbig".into())));
    conn.close(200, "published".into()).await.ok();

    assert!(sent.len() >= 40, "{} messages", sent.len());
    drain_and_check(&run, &sent).await;
}
