//! SQS: the corpus sent with aws-sdk-sqs to moto (the bodies SQS can carry: XML text), plus
//! what only SQS can say: `Number` and `Binary` attributes, a forged or malformed
//! `sluice-meta`, an empty body (moto accepts one; SQS refuses it on send, so the dead-letter
//! copy encodes it), bodies at the 256 KiB limit (the copy trims its envelope, then keeps its
//! mark alone, then its body alone).

use sluice::{
    conformance::unique,
    transport::sqs::aws_sdk_sqs::{primitives::Blob, types::MessageAttributeValue, Client},
};

use super::*;
use crate::support::sqs_client;

fn string(v: &str) -> MessageAttributeValue {
    MessageAttributeValue::builder()
        .data_type("String")
        .string_value(v)
        .build()
        .unwrap()
}

async fn send(
    client: &Client,
    url: &str,
    body: &[u8],
    attributes: Vec<(String, MessageAttributeValue)>,
) -> String {
    let mut req = client
        .send_message()
        .queue_url(url)
        .message_body(std::str::from_utf8(body).expect("SQS bodies are text"));
    for (k, v) in attributes {
        req = req.message_attributes(k, v);
    }
    req.send()
        .await
        .expect("send")
        .message_id()
        .expect("a message id")
        .to_owned()
}

#[tokio::test]
async fn every_bad_message_is_dead_lettered_at_once_with_its_bytes_and_a_reason() {
    sluice_tests::moto("SQS");
    let queue = unique("bad-input");
    let run = FunctionRun::new("charge-payment")
        .env("SLUICE__TRANSPORT__KIND", "sqs")
        .env("SLUICE__TRANSPORT__URL", &queue)
        .env("SLUICE__QUEUE", &queue);
    run.cli(&["provision"]);
    let client = sqs_client().await;
    let url = client
        .get_queue_url()
        .queue_name(&queue)
        .send()
        .await
        .unwrap()
        .queue_url()
        .unwrap()
        .to_owned();

    let mut sent = Vec::new();
    for case in corpus::common(true) {
        let attributes = case
            .headers
            .iter()
            .map(|(k, v)| (k.clone(), string(v)))
            .collect();
        let id = send(&client, &url, &case.body, attributes).await;
        sent.push(Sent::of(&case, Some(id)));
    }

    let ok = corpus::valid;
    let number = MessageAttributeValue::builder()
        .data_type("Number")
        .string_value("7")
        .build()
        .unwrap();
    let binary = |b: &[u8]| {
        MessageAttributeValue::builder()
            .data_type("Binary")
            .binary_value(Blob::new(b.to_vec()))
            .build()
            .unwrap()
    };
    let typed: Vec<(&str, &str, MessageAttributeValue, Expect)> = vec![
        (
            "Number attribute",
            "x-count",
            number,
            Expect::Handled {
                payment_id: "bi-st0",
            },
        ),
        (
            "Binary attribute",
            "x-bin",
            binary(&[1, 2, 3]),
            dead(
                "malformed header",
                "header \"x-bin\": expected a String attribute, got a Binary one (3 bytes)",
            ),
        ),
        (
            "Binary idempotency key",
            "idempotency-key",
            binary(b"k"),
            dead(
                "malformed header",
                "header \"idempotency-key\": expected a String attribute",
            ),
        ),
        (
            "Binary sluice-meta",
            "sluice-meta",
            binary(b"{}"),
            dead(
                "malformed header",
                "header \"sluice-meta\": expected a String attribute",
            ),
        ),
    ];
    for (i, (name, attr, value, expect)) in typed.into_iter().enumerate() {
        let c = special(name, ok(&format!("bi-st{i}")), expect);
        let id = send(&client, &url, &c.body, vec![(attr.to_owned(), value)]).await;
        sent.push(Sent::of(&c, Some(id)));
    }

    // A forged or malformed sluice-meta: the envelope is checked, a bad one is bad input.
    let metas = [
        (
            "meta not JSON",
            "garbage",
            "sluice-meta is not a JSON object",
        ),
        (
            "meta with an overflowing count",
            r#"{"sluice-retries":"4294967296"}"#,
            "is larger than 4294967295",
        ),
        (
            "meta with a count as an array",
            r#"{"sluice-retries":[1]}"#,
            "sluice-retries: expected a text value, got an array",
        ),
        (
            "meta saying base64 of a body that is not",
            r#"{"sluice-body-encoding":"base64"}"#,
            "the body is not base64",
        ),
        (
            "meta with an unknown encoding",
            r#"{"sluice-body-encoding":"rot13"}"#,
            "expected \"base64\" or \"empty\"",
        ),
        (
            "meta with headers not an object",
            r#"{"sluice-headers":"x"}"#,
            "sluice-headers is not a JSON object",
        ),
        (
            "meta due a century ahead",
            r#"{"sluice-due-at":"2126-01-01T00:00:00Z"}"#,
            "more than a year ahead",
        ),
    ];
    for (i, (name, meta, words)) in metas.into_iter().enumerate() {
        let c = special(
            name,
            format!("not base64 {i}!"),
            dead("malformed envelope", words),
        );
        let id = send(
            &client,
            &url,
            &c.body,
            vec![("sluice-meta".into(), string(meta))],
        )
        .await;
        sent.push(Sent::of(&c, Some(id)));
    }
    // Bytes that are not SQS text, in Sluice's own encoding: decoded, then judged.
    let c = special(
        "invalid UTF-8 body, base64 in sluice-meta",
        b"\xff\xfe{".to_vec(),
        dead("invalid UTF-8", "body is not UTF-8"),
    );
    let id = send(
        &client,
        &url,
        b"//57",
        vec![(
            "sluice-meta".into(),
            string(r#"{"sluice-body-encoding":"base64"}"#),
        )],
    )
    .await;
    sent.push(Sent::of(&c, Some(id)));

    // At the size limit: the body keeps its bytes, the envelope gives way.
    let near = "n".repeat(262_144 - 400);
    let c = special(
        "body 400 bytes short of 256 KiB",
        near,
        dead("oversized body", ""),
    );
    let id = send(&client, &url, &c.body, Vec::new()).await;
    sent.push(Sent::of(&c, Some(id)));

    // No room even for the dead-letter mark: the copy is the body alone (and lists as moved by
    // the queue's RedrivePolicy: nothing on it says otherwise).
    let full = "f".repeat(262_144 - 100);
    let c = special(
        "body 100 bytes short of 256 KiB",
        full,
        Expect::Bare {
            label: "oversized body",
        },
    );
    send(&client, &url, &c.body, Vec::new()).await;
    sent.push(Sent::of(&c, None));

    assert!(sent.len() >= 40, "{} messages", sent.len());
    drain_and_check(&run, &sent).await;
}
