//! The transport conformance suite on the SQS adapter, against moto, plus what only SQS has:
//! batch and size limits checked before any call, bodies that are not SQS text, FIFO groups,
//! the `RedrivePolicy` crash-loop guard, receipt handles SQS no longer knows, forged
//! `sluice-*` attributes.
//!
//! Needs moto: `eval "$(scripts/moto.sh start)"` (sets `SLUICE_TEST_MOTO` and the AWS
//! variables). Without it the tests fail: they never fall back to real AWS.
//!
//! Timing: SQS visibility is whole seconds, so the suite's `SHORT_LEASE` (400 ms) becomes a
//! 1 s visibility timeout (rounded up: never early); the suite's 15 s redelivery timeout allows
//! it. Each test makes its own queues (moto slows down as a queue grows).

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use sluice::{
    conformance::{poll_until, transport as suite, unique},
    error::Error,
    message::{Delivery, Failure, FailureClass, OutgoingMessage},
    transport::{
        sqs::{
            aws_sdk_sqs::{
                config::{
                    interceptors::BeforeSerializationInterceptorContextRef, ConfigBag, Intercept,
                },
                error::BoxError,
                operation::{
                    delete_message_batch::DeleteMessageBatchInput,
                    send_message_batch::SendMessageBatchInput,
                },
                types::{MessageAttributeValue, QueueAttributeName},
            },
            sdk_config_from_env, SqsTransport, MAX_BATCH_ENTRIES,
        },
        Transport, TransportOptions,
    },
};

use crate::support::{self, sqs_client};

/// A handle on the queue named `opts.queue` (created with its DLQ on first open).
async fn make(mut opts: TransportOptions) -> SqsTransport {
    sluice_tests::moto("SQS");
    opts.url = opts.queue.clone();
    SqsTransport::open(opts).await.expect("open sqs transport")
}

support::transport_conformance!(
    // Delays are rounded up to whole seconds: never early, so no rounding allowance.
    rounding: Duration::ZERO,
    // moto races concurrent receives (docs/emulators.md).
    racing: ::sluice::conformance::transport::RacingReceives::EmulatorMayRepeat,
    |check| {
        check(make).await;
    }
);

/// Sends with the SDK itself, as a producer with `sqs:SendMessage` could: the fields in a
/// `sluice-meta` JSON object (as one of our copies) or as plain `String` attributes.
async fn forge(t: &SqsTransport, _queue: &str, m: suite::Forged) {
    use sluice::transport::sqs::aws_sdk_sqs::types::MessageAttributeValue;
    let text = |v: &str| {
        MessageAttributeValue::builder()
            .data_type("String")
            .string_value(v)
            .build()
            .unwrap()
    };
    let mut req = sqs_client()
        .await
        .send_message()
        .queue_url(t.queue_url().await.unwrap())
        .message_body(String::from_utf8(m.body).unwrap());
    if m.as_copy {
        let meta: serde_json::Map<String, serde_json::Value> = m
            .fields
            .into_iter()
            .map(|(k, v)| (k, serde_json::Value::String(v)))
            .collect();
        req = req.message_attributes(
            sluice::transport::sqs::META_ATTRIBUTE,
            text(&serde_json::Value::Object(meta).to_string()),
        );
    } else {
        for (k, v) in m.fields {
            req = req.message_attributes(k, text(&v));
        }
    }
    req.send().await.expect("raw send");
}

#[tokio::test]
async fn forged_envelope_fields_are_defects_and_never_wrap_the_attempt() {
    suite::forged_envelope_fields_are_defects_and_never_wrap_the_attempt(make, forge).await;
}

#[tokio::test]
async fn sluice_headers_from_a_producer_stay_producer_headers() {
    suite::sluice_headers_from_a_producer_stay_producer_headers(make, forge).await;
}

// ---------------------------------------------------------------------------------------------
// SQS only

/// Counts SDK operations (not retry attempts), the entries of each `SendMessageBatch` and of
/// each `DeleteMessageBatch`.
#[derive(Debug, Default, Clone)]
struct Calls {
    operations: Arc<AtomicUsize>,
    batches: Arc<Mutex<Vec<usize>>>,
    deletes: Arc<Mutex<Vec<usize>>>,
}

impl Intercept for Calls {
    fn name(&self) -> &'static str {
        "count-calls"
    }

    fn read_before_execution(
        &self,
        context: &BeforeSerializationInterceptorContextRef<'_>,
        _cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        self.operations.fetch_add(1, Ordering::SeqCst);
        if let Some(batch) = context.input().downcast_ref::<SendMessageBatchInput>() {
            self.batches.lock().unwrap().push(batch.entries().len());
        }
        if let Some(batch) = context.input().downcast_ref::<DeleteMessageBatchInput>() {
            self.deletes.lock().unwrap().push(batch.entries().len());
        }
        Ok(())
    }
}

/// A handle whose SDK calls are counted.
async fn counted(opts: TransportOptions) -> (SqsTransport, Calls) {
    sluice_tests::moto("SQS");
    let calls = Calls::default();
    let sdk = sdk_config_from_env()
        .await
        .expect("sdk config")
        .interceptor(calls.clone())
        .build();
    let mut opts = opts;
    opts.url = opts.queue.clone();
    let t = SqsTransport::open_with(opts, sdk).await.expect("open");
    (t, calls)
}

fn long_lease() -> TransportOptions {
    suite::options(suite::LONG_LEASE, 5)
}

async fn drain(t: &SqsTransport, n: usize) -> Vec<Delivery> {
    let mut got = Vec::new();
    let deadline = Instant::now() + suite::REDELIVERY_TIMEOUT;
    while got.len() < n {
        assert!(Instant::now() < deadline, "received {} of {n}", got.len());
        got.extend(t.receive(10, Duration::from_millis(200)).await.unwrap());
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_acks_go_out_as_delete_message_batches_of_at_most_ten() {
    let (t, calls) = counted(long_lease()).await;
    let t = Arc::new(t);
    let msgs: Vec<_> = (0..30)
        .map(|i| OutgoingMessage::new(format!("{{\"n\":{i}}}")))
        .collect();
    t.publish(msgs).await.expect("publish 30");
    let got = drain(&t, 30).await;
    let acks: Vec<_> = got
        .into_iter()
        .map(|d| {
            let t = t.clone();
            tokio::spawn(async move { t.ack(&d).await })
        })
        .collect();
    for a in acks {
        a.await.unwrap().expect("every ack applied");
    }
    let deletes = calls.deletes.lock().unwrap().clone();
    assert_eq!(
        deletes.iter().sum::<usize>(),
        30,
        "one entry per ack: {deletes:?}"
    );
    assert!(
        deletes.iter().all(|n| (1..=10).contains(n)),
        "at most 10 per call: {deletes:?}"
    );
    assert!(
        deletes.len() < 30,
        "acks waiting together share a call: {deletes:?}"
    );
    let s = t.stats().await.unwrap();
    assert_eq!((s.ready, s.in_flight), (0, 0), "all deleted: {s:?}");
}

#[tokio::test]
async fn publish_splits_batches_at_ten_entries_and_256_kib_before_any_call() {
    let (t, calls) = counted(long_lease()).await;
    let msgs: Vec<_> = (0..25)
        .map(|i| OutgoingMessage::new(format!("{{\"n\":{i}}}")))
        .collect();
    let ids = t.publish(msgs).await.expect("publish 25");
    assert_eq!(ids.len(), 25);
    assert_eq!(*calls.batches.lock().unwrap(), vec![10, 10, 5]);

    // Ten 30 KiB messages: 8 fit in 256 KiB, the rest go in a second batch.
    calls.batches.lock().unwrap().clear();
    let big = "x".repeat(30 * 1024);
    let msgs: Vec<_> = (0..10).map(|_| OutgoingMessage::new(big.clone())).collect();
    assert_eq!(
        t.publish(msgs).await.expect("publish 10 x 30 KiB").len(),
        10
    );
    assert_eq!(*calls.batches.lock().unwrap(), vec![8, 2]);
    assert!(calls
        .batches
        .lock()
        .unwrap()
        .iter()
        .all(|&n| n <= MAX_BATCH_ENTRIES));

    let got = drain(&t, 35).await;
    for d in &got {
        t.ack(d).await.unwrap();
    }
}

#[tokio::test]
async fn oversized_or_malformed_messages_are_refused_before_any_call() {
    let (t, calls) = counted(long_lease()).await;
    let before = calls.operations.load(Ordering::SeqCst);
    let refused = |r: Result<Vec<String>, Error>| match r {
        Err(e @ (Error::Limit(_) | Error::Invalid(_))) => e.to_string(),
        other => panic!("expected a refusal, got {other:?}"),
    };
    let over = refused(
        t.publish(vec![OutgoingMessage::new(vec![b'a'; 300 * 1024])])
            .await,
    );
    assert!(over.contains("262144"), "{over}");
    // A binary body travels as base64: 200 KiB of it no longer fits.
    let binary = refused(
        t.publish(vec![OutgoingMessage::new(vec![0u8; 200 * 1024])])
            .await,
    );
    assert!(binary.contains("base64"), "{binary}");
    let mut many = OutgoingMessage::new("{}");
    for i in 0..10 {
        many = many.header(&format!("x-h{i}"), "v");
    }
    refused(t.publish(vec![many]).await);
    refused(
        t.publish(vec![
            OutgoingMessage::new("{}").header("sluice-attempts", "1")
        ])
        .await,
    );
    refused(
        t.publish(vec![OutgoingMessage::new("{}").header("x-bad name", "v")])
            .await,
    );
    refused(t.publish(vec![OutgoingMessage::new("")]).await);
    refused(
        t.publish(vec![
            OutgoingMessage::new("{}").delay(Duration::from_secs(901))
        ])
        .await,
    );
    // One bad message in a batch refuses the batch before anything is sent.
    refused(
        t.publish(vec![
            OutgoingMessage::new("{}"),
            OutgoingMessage::new(vec![b'a'; 300 * 1024]),
        ])
        .await,
    );
    assert_eq!(
        calls.operations.load(Ordering::SeqCst),
        before,
        "no SDK call was made"
    );
    assert_eq!(t.stats().await.unwrap().ready, 0);
}

#[tokio::test]
async fn bodies_that_are_not_sqs_text_come_back_byte_for_byte() {
    let t = make(long_lease()).await;
    let bodies: Vec<Vec<u8>> = vec![
        b"{\"crlf\":\"a\r\nb\"}".to_vec(),
        b"nul \x00 inside".to_vec(),
        b"\xff\xfe not utf-8".to_vec(),
        "U+FFFE \u{FFFE} is not XML".as_bytes().to_vec(),
        "plain \u{1F600} text".as_bytes().to_vec(),
    ];
    let ids = t
        .publish(
            bodies
                .iter()
                .map(|b| OutgoingMessage::new(b.clone()).header("x-tenant", "acme"))
                .collect(),
        )
        .await
        .unwrap();
    let by_id: HashMap<_, _> = ids.into_iter().zip(bodies).collect();
    for d in drain(&t, by_id.len()).await {
        assert_eq!(d.body, by_id[&d.id], "body of {}", d.id);
        assert_eq!(
            d.headers.keys().collect::<Vec<_>>(),
            vec!["x-tenant"],
            "no bookkeeping in headers"
        );
        t.ack(&d).await.unwrap();
    }
}

#[tokio::test]
async fn open_provisions_a_missing_queue_with_its_dlq_and_redrive_policy() {
    let opts = suite::options(Duration::from_millis(1500), 7);
    let t = make(opts).await;
    let client = sqs_client().await;
    let attrs = client
        .get_queue_attributes()
        .queue_url(t.queue_url().await.unwrap())
        .attribute_names(QueueAttributeName::All)
        .send()
        .await
        .unwrap();
    let attrs = attrs.attributes().unwrap();
    let policy: serde_json::Value =
        serde_json::from_str(&attrs[&QueueAttributeName::RedrivePolicy]).unwrap();
    assert_eq!(policy["maxReceiveCount"].as_u64(), Some(7));
    assert!(policy["deadLetterTargetArn"]
        .as_str()
        .unwrap()
        .ends_with(&format!("{}-dlq", t.config().queue_name)));
    assert_eq!(attrs[&QueueAttributeName::MaximumMessageSize], "262144");
    assert_eq!(
        attrs[&QueueAttributeName::VisibilityTimeout],
        "2",
        "a 1.5 s lease rounds up to 2 s"
    );
    assert!(t.dlq_url().await.unwrap().ends_with("-dlq"));
}

#[tokio::test]
async fn a_queue_without_redrive_policy_is_refused_at_open() {
    let client = sqs_client().await;
    let name = unique("bare");
    client
        .create_queue()
        .queue_name(&name)
        .send()
        .await
        .unwrap();
    let mut opts = long_lease();
    opts.url = name;
    match SqsTransport::open(opts).await {
        Err(Error::Config(why)) => assert!(why.contains("provision"), "{why}"),
        Err(e) => panic!("expected a configuration error, got {e}"),
        Ok(_) => panic!("expected a configuration error, the queue has no RedrivePolicy"),
    }
}

#[tokio::test]
async fn settling_twice_or_with_a_handle_sqs_does_not_know_is_lease_lost() {
    let t = make(long_lease()).await;
    t.publish(vec![OutgoingMessage::new("{}"), OutgoingMessage::new("{}")])
        .await
        .unwrap();
    let got = drain(&t, 2).await;
    t.ack(&got[0]).await.expect("first ack");
    assert!(
        matches!(t.ack(&got[0]).await, Err(Error::LeaseLost(_))),
        "a second ack is refused (moto itself accepts a deleted handle again)"
    );
    // A receipt handle SQS never issued: SQS answers ReceiptHandleIsInvalid.
    let forged = got[1].clone().with_sqs_handle("not-a-receipt-handle");
    for (op, r) in [
        ("extend", t.extend(&forged, Duration::from_secs(5)).await),
        ("release", t.release(&forged).await),
        ("ack", t.ack(&forged).await),
    ] {
        assert!(
            matches!(r, Err(Error::LeaseLost(_))),
            "{op} with an unknown handle: {r:?}"
        );
    }
    t.ack(&got[1]).await.expect("the real holder acks");
}

#[tokio::test]
async fn forged_sluice_attributes_reach_the_pipeline_as_headers() {
    let t = make(long_lease()).await;
    let client = sqs_client().await;
    let attr = |v: &str| {
        MessageAttributeValue::builder()
            .data_type("String")
            .string_value(v)
            .build()
            .unwrap()
    };
    // A sluice-* name that is not ours, and a sluice-meta that is malformed.
    client
        .send_message()
        .queue_url(t.queue_url().await.unwrap())
        .message_body("{}")
        .message_attributes("sluice-attempts", attr("1"))
        .message_attributes("sluice-meta", attr(r#"{"sluice-retries":"many"}"#))
        .send()
        .await
        .unwrap();
    let d = drain(&t, 1).await.remove(0);
    assert_eq!(d.attempt, 1, "forged values never change the attempt");
    assert_eq!(
        d.headers.get("sluice-attempts").map(String::as_str),
        Some("1")
    );
    // A sluice-meta is read as our envelope, and a malformed one is bad input.
    let (label, reason) = d
        .defect
        .clone()
        .expect("the malformed envelope is a defect");
    assert_eq!(label, "malformed envelope");
    assert!(reason.contains("sluice-retries"), "{reason}");
    // The pipeline dead-letters such a message; its copy keeps the forged headers.
    t.dead_letter(&d, &Failure::now(FailureClass::Permanent, "forged header"))
        .await
        .unwrap();
    let dl = t.dlq_get(&d.id).await.unwrap().expect("dead letter");
    assert_eq!(dl.headers, d.headers);
    assert_eq!(dl.attempts, 1);
}

#[tokio::test]
async fn fifo_keeps_group_order_and_a_retry_holds_back_only_its_group() {
    // One consumer: moto's FIFO group order is only reliable with one (EMULATORS.md).
    let mut opts = long_lease();
    opts.queue = format!("{}.fifo", unique("fifo"));
    let t = make(opts).await;
    assert!(t.config().fifo && t.dlq_url().await.unwrap().ends_with("-dlq.fifo"));
    let msg = |group: &str, n: u32| {
        OutgoingMessage::new(format!("{{\"{group}\":{n}}}")).header("x-group-id", group)
    };
    let ids = t
        .publish(vec![
            msg("a", 1),
            msg("b", 1),
            msg("a", 2),
            msg("b", 2),
            msg("a", 3),
        ])
        .await
        .unwrap();
    let name: HashMap<String, &str> = ids
        .iter()
        .cloned()
        .zip(["a1", "b1", "a2", "b2", "a3"])
        .collect();
    let first = t
        .receive(1, Duration::from_secs(2))
        .await
        .unwrap()
        .remove(0);
    assert_eq!(name[&first.id], "a1");
    let delay = Duration::from_secs(2);
    let retried_at = Instant::now();
    t.retry_after(&first, delay, &Failure::now(FailureClass::Transient, "503"))
        .await
        .unwrap();
    let mut order = Vec::new();
    while order.len() < 5 {
        assert!(
            retried_at.elapsed() < suite::REDELIVERY_TIMEOUT,
            "got {order:?}"
        );
        for d in t.receive(1, Duration::from_millis(200)).await.unwrap() {
            let n = name[&d.id];
            if n.starts_with('a') {
                assert!(
                    retried_at.elapsed() >= delay,
                    "{n} delivered while a1 waits for its retry: {order:?}"
                );
            }
            if n == "a1" {
                assert_eq!(d.attempt, 2);
                assert!(
                    d.first_failure_at().is_some(),
                    "this process remembers the first failure"
                );
            }
            order.push(n);
            t.ack(&d).await.unwrap();
        }
    }
    assert_eq!(order, ["b1", "b2", "a1", "a2", "a3"]);

    // Dead letters go to the FIFO DLQ in their group and come back by redrive.
    let id = t.publish(vec![msg("c", 1)]).await.unwrap().remove(0);
    let d = t
        .receive(1, Duration::from_secs(2))
        .await
        .unwrap()
        .remove(0);
    t.dead_letter(&d, &Failure::now(FailureClass::Permanent, "no"))
        .await
        .unwrap();
    let dl = t.dlq_get(&id).await.unwrap().expect("fifo dead letter");
    assert_eq!(dl.headers.get("x-group-id").map(String::as_str), Some("c"));
    assert_eq!(t.redrive(&Default::default()).await.unwrap().len(), 1);
    let again = t
        .receive(1, Duration::from_secs(2))
        .await
        .unwrap()
        .remove(0);
    assert_eq!((again.id.as_str(), again.attempt), (id.as_str(), 1));
    t.ack(&again).await.unwrap();
}

#[tokio::test]
async fn crash_loop_reaches_the_dlq_through_redrive_policy_with_carried_retries() {
    let t = make(suite::options(suite::SHORT_LEASE, 3)).await;
    let id = t
        .publish(vec![OutgoingMessage::new("{}")])
        .await
        .unwrap()
        .remove(0);
    let d = drain(&t, 1).await.remove(0);
    let failed = Failure::now(FailureClass::Transient, "first");
    t.retry_after(&d, Duration::ZERO, &failed).await.unwrap();
    // The retry copy is then received three times and never settled (the worker keeps dying).
    for attempt in 2..=4 {
        let d = poll_until(suite::REDELIVERY_TIMEOUT, "a redelivery", || async {
            t.receive(1, Duration::from_millis(200))
                .await
                .unwrap()
                .pop()
        })
        .await;
        assert_eq!((d.id.as_str(), d.attempt), (id.as_str(), attempt));
    }
    let dl = poll_until(
        suite::REDELIVERY_TIMEOUT,
        "the crash-loop dead letter",
        || async {
            assert!(t
                .receive(1, Duration::from_millis(100))
                .await
                .unwrap()
                .is_empty());
            t.dlq_list(10).await.unwrap().pop()
        },
    )
    .await;
    assert_eq!(dl.id, id);
    assert_eq!(dl.error_class, FailureClass::CrashLoop);
    assert_eq!(
        dl.attempts,
        1 + 3,
        "the retry before the copy, and the copy's 3 receives"
    );
    assert_eq!(dl.first_failure_at, sluice::time::rfc3339(failed.at));
    assert_eq!(dl.function, "conformance");
    assert_eq!(t.stats().await.unwrap().dead_lettered, 1);
}

#[tokio::test]
async fn redriven_messages_count_their_redrives_when_dead_lettered_again() {
    let t = make(long_lease()).await;
    let id = t
        .publish(vec![OutgoingMessage::new("{}").header("x-tenant", "acme")])
        .await
        .unwrap()
        .remove(0);
    let d = drain(&t, 1).await.remove(0);
    t.dead_letter(&d, &Failure::now(FailureClass::Transient, "first"))
        .await
        .unwrap();
    assert_eq!(t.redrive(&Default::default()).await.unwrap().len(), 1);
    let d = drain(&t, 1).await.remove(0);
    assert_eq!((d.id.as_str(), d.attempt), (id.as_str(), 1));
    assert_eq!(d.headers.get("x-tenant").map(String::as_str), Some("acme"));
    t.dead_letter(&d, &Failure::now(FailureClass::Permanent, "second"))
        .await
        .unwrap();
    let dl = t.dlq_get(&id).await.unwrap().expect("dead letter");
    assert_eq!(dl.redriven, 1);
    assert_eq!(dl.last_error, "second");
    assert_eq!(dl.attempts, 1);
}

/// The conformance checks that apply to FIFO queues, on a FIFO queue (`<name>.fifo`, one
/// message group). Not run here: concurrent consumers (moto's FIFO delivery races with several
/// consumers, see EMULATORS.md); delays in stats (FIFO queues have no per-message delay, and a
/// retry is the message's own visibility, which SQS counts as in flight, not delayed). FIFO
/// retries are proved by the group-order test above instead.
mod fifo {
    use super::*;

    /// The SQS queue is `<queue>.fifo`; `queue` stays the name the suite checks in history.
    async fn make_fifo(mut opts: TransportOptions) -> SqsTransport {
        sluice_tests::moto("SQS");
        opts.url = format!("{}.fifo", opts.queue);
        SqsTransport::open(opts)
            .await
            .expect("open fifo sqs transport")
    }

    #[tokio::test]
    async fn ack_removes_the_message() {
        suite::ack_removes_the_message(make_fifo).await;
    }

    #[tokio::test]
    async fn dead_letter_keeps_bytes_and_history() {
        suite::dead_letter_keeps_bytes_and_history(make_fifo).await;
    }

    #[tokio::test]
    async fn crash_loop_guard_dead_letters_after_max_deliveries() {
        suite::crash_loop_guard_dead_letters_after_max_deliveries(make_fifo).await;
    }

    #[tokio::test]
    async fn expired_lease_redelivers_and_stale_holder_cannot_settle() {
        suite::expired_lease_redelivers_and_stale_holder_cannot_settle(make_fifo).await;
    }

    #[tokio::test]
    async fn extend_keeps_the_message_leased() {
        suite::extend_keeps_the_message_leased(make_fifo).await;
    }

    #[tokio::test]
    async fn release_returns_the_message_at_once() {
        suite::release_returns_the_message_at_once(make_fifo).await;
    }

    #[tokio::test]
    async fn redrive_moves_dead_letters_back_with_attempts_reset() {
        suite::redrive_moves_dead_letters_back_with_attempts_reset(make_fifo).await;
    }
}
