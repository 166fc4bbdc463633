//! The transport conformance suite on RabbitMQ, plus the adapter's own header and crash-loop
//! behaviour. Needs the broker: `scripts/services.sh rabbitmq` (URL from
//! `SLUICE_TEST_RABBITMQ_URL`, default `amqp://guest:guest@127.0.0.1:5672/%2f`).
//!
//! Each check uses its own queue name; every test deletes the topologies it made when it ends,
//! and the queues are declared with `x-expires` ([`TEST_QUEUE_EXPIRES`]) so that a failed run
//! leaves nothing behind for long.

use std::{
    collections::BTreeSet,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use sluice::{
    config::LimitSettings,
    conformance::{poll_until, transport as suite},
    error::Error,
    message::{check_input, Delivery, Failure, FailureClass, OutgoingMessage, RedriveFilter},
    transport::{
        rabbitmq::{RabbitConfig, RabbitTransport, DELAY_LADDER_MS},
        Transport, TransportOptions,
    },
};
use sluice_tests::rabbit::{self, url, TEST_QUEUE_EXPIRES};

use crate::support;

/// The queues one test made (handles made with the same options share a queue).
#[derive(Clone, Default)]
struct Made(Arc<Mutex<Vec<TransportOptions>>>);

impl Made {
    /// Deletes every topology the test made.
    async fn cleanup(self) {
        let made = std::mem::take(&mut *self.0.lock().unwrap());
        let mut seen = BTreeSet::new();
        for opts in made {
            if seen.insert(opts.queue.clone()) {
                let t = RabbitTransport::open_with(opts, config()).await.unwrap();
                t.delete_topology().await.expect("delete test topology");
            }
        }
    }
}

fn config() -> RabbitConfig {
    RabbitConfig {
        queue_expires: Some(TEST_QUEUE_EXPIRES),
        ..RabbitConfig::default()
    }
}

/// Opens a handle on `opts.queue` and records the queue for cleanup.
async fn make(opts: TransportOptions, made: Made) -> RabbitTransport {
    make_with(opts, made, config()).await
}

/// [`make`] with a configuration of the test's own.
async fn make_with(
    mut opts: TransportOptions,
    made: Made,
    config: RabbitConfig,
) -> RabbitTransport {
    opts.url = url();
    made.0.lock().unwrap().push(opts.clone());
    RabbitTransport::open_with(opts, config)
        .await
        .expect("open rabbitmq transport (is RabbitMQ up? scripts/services.sh rabbitmq)")
}

async fn receive_one(t: &RabbitTransport) -> Delivery {
    poll_until(suite::REDELIVERY_TIMEOUT, "a delivery", || async {
        t.receive(1, Duration::from_millis(200))
            .await
            .expect("receive")
            .pop()
    })
    .await
}

support::transport_conformance!(
    // The delay ladder rounds down: a delivery comes at most one smallest step early.
    rounding: Duration::from_millis(DELAY_LADDER_MS[0]),
    racing: ::sluice::conformance::transport::RacingReceives::Exclusive,
    |check| {
        let made = Made::default();
        check(|o| make(o, made.clone())).await;
        made.cleanup().await;
    }
);

/// A producer that sets `sluice-*` headers itself must not be trusted: on the first delivery
/// (and on retry copies) they reach `Delivery::headers`, where the pipeline rejects them, and
/// they change neither the attempt number nor the failure history.
#[tokio::test]
async fn forged_sluice_headers_reach_the_pipeline_and_change_nothing() {
    let made = Made::default();
    let t = make(suite::options(suite::LONG_LEASE, 5), made.clone()).await;
    let forged = OutgoingMessage::new("{}")
        .header("x-tenant", "acme")
        .header("sluice-attempts", "7")
        .header("sluice-retries", "5")
        .header("sluice-first-failure-at", "2020-01-01T00:00:00.000Z");

    // First delivery: every header as published, attempt 1, no failure history.
    let id = t.publish(vec![forged.clone()]).await.unwrap().remove(0);
    let d = receive_one(&t).await;
    assert_eq!(d.id, id);
    assert_eq!(
        d.headers, forged.headers,
        "forged headers reach the pipeline"
    );
    assert_eq!(d.attempt, 1, "a forged sluice-retries is not counted");
    assert_eq!(d.first_failure_at(), None);
    let (label, reason) = check_input(&d.body, &d.headers, &LimitSettings::default())
        .expect_err("the pipeline rejects forged headers");
    assert_eq!(label, "forged header");

    // Even if such a message were retried, the forged headers stay the producer's.
    t.retry_after(
        &d,
        Duration::ZERO,
        &Failure::now(FailureClass::Transient, "first"),
    )
    .await
    .unwrap();
    let again = receive_one(&t).await;
    assert_eq!(again.headers, forged.headers);
    assert_eq!(again.attempt, 2);
    // The real first failure, not the forged 2020-01-01.
    let september_2020 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_600_000_000);
    assert!(again.first_failure_at().unwrap() > september_2020);

    // Dead-lettered as the pipeline does: the producer's headers are kept as they were.
    t.dead_letter(&again, &Failure::now(FailureClass::Permanent, reason))
        .await
        .unwrap();
    let dl = t.dlq_get(&id).await.unwrap().expect("dead letter");
    assert_eq!(dl.headers, forged.headers);
    assert_eq!(dl.attempts, 2);
    assert_eq!(dl.error_class, FailureClass::Permanent);
    assert!(dl.last_error.contains("reserved"), "{}", dl.last_error);
    drop(t);
    made.cleanup().await;
}

/// The quorum queue's `x-delivery-limit` dead-letters a message that keeps coming back
/// unsettled (here: released twice); it is listed as `crash_loop` and can be redriven.
#[tokio::test]
async fn a_message_over_the_delivery_limit_lands_in_the_dlq_as_crash_loop() {
    let made = Made::default();
    let opts = suite::options(suite::LONG_LEASE, 2);
    let queue = opts.queue.clone();
    let t = make(opts, made.clone()).await;
    let id = t
        .publish(vec![OutgoingMessage::new("{}").header("x-tenant", "acme")])
        .await
        .unwrap()
        .remove(0);
    for attempt in 1..=2 {
        let d = receive_one(&t).await;
        assert_eq!((d.id.as_str(), d.attempt), (id.as_str(), attempt));
        t.release(&d).await.unwrap();
    }
    let dl = poll_until(
        suite::REDELIVERY_TIMEOUT,
        "the crash-loop dead letter",
        || async { t.dlq_get(&id).await.unwrap() },
    )
    .await;
    assert_eq!(dl.error_class, FailureClass::CrashLoop);
    assert_eq!(dl.attempts, 2);
    assert_eq!(dl.original_queue, queue);
    assert_eq!(dl.function, "conformance");
    assert!(
        dl.last_error.contains("x-delivery-limit"),
        "{}",
        dl.last_error
    );
    assert_eq!(dl.headers.get("x-tenant").map(String::as_str), Some("acme"));
    assert!(
        !dl.headers.contains_key("x-death"),
        "broker bookkeeping is not shown as a producer header"
    );
    let s = t.stats().await.unwrap();
    assert_eq!((s.ready, s.in_flight, s.dead_lettered), (0, 0, 1), "{s:?}");

    let moved = t
        .redrive(&RedriveFilter {
            error_class: Some(FailureClass::CrashLoop),
            ..RedriveFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(moved.len(), 1);
    let d = receive_one(&t).await;
    assert_eq!((d.id.as_str(), d.attempt), (id.as_str(), 1));
    assert_eq!(d.headers.get("x-tenant").map(String::as_str), Some("acme"));
    t.ack(&d).await.unwrap();
    drop(t);
    made.cleanup().await;
}

/// Closes, from the broker's side, the connection of the handle on `queue` (as a network failure
/// would), with `rabbitmqctl`. Returns false when `rabbitmqctl` is not installed here.
fn kill_connection_of(queue: &str) -> bool {
    let name = format!("sluice conformance on {queue}");
    match rabbit::close_connections_named(&name, "test: simulated connection loss") {
        Ok(closed) => {
            assert!(closed > 0, "no connection named {name:?}");
            true
        }
        Err(e)
            if e.downcast_ref::<std::io::Error>()
                .is_some_and(|e| e.kind() == std::io::ErrorKind::NotFound) =>
        {
            false
        }
        Err(e) => panic!("rabbitmqctl: {e:#}"),
    }
}

/// When the connection dies, the handle reconnects by itself; the broker redelivers what the
/// dead connection held (the return counts as a delivery), and a receipt from the dead
/// connection can no longer be settled.
#[tokio::test]
async fn a_lost_connection_is_replaced_and_its_deliveries_cannot_be_settled() {
    let made = Made::default();
    let opts = suite::options(suite::LONG_LEASE, 5);
    let queue = opts.queue.clone();
    let t = make(opts, made.clone()).await;
    let id = t
        .publish(vec![OutgoingMessage::new("{}")])
        .await
        .unwrap()
        .remove(0);
    let before = receive_one(&t).await;
    assert_eq!(before.attempt, 1);
    if !kill_connection_of(&queue) {
        eprintln!("skipped: rabbitmqctl is not installed");
        made.cleanup().await;
        return;
    }
    let after = receive_one(&t).await;
    assert_eq!(after.id, id);
    assert_eq!(after.attempt, 2, "the dead connection's return counts");
    assert!(
        matches!(t.ack(&before).await, Err(Error::LeaseLost(_))),
        "a delivery of the dead connection cannot be settled"
    );
    t.ack(&after).await.expect("ack on the new connection");
    t.publish(vec![OutgoingMessage::new("{}")]).await.unwrap();
    let s = t.stats().await.unwrap();
    assert_eq!(
        (s.in_flight, s.delayed, s.dead_lettered),
        (0, 0, 0),
        "{s:?}"
    );
    drop(t);
    made.cleanup().await;
}

/// RabbitMQ closes a channel that holds a delivery longer than its `consumer_timeout`, killing
/// every delivery on it. The adapter requeues a delivery before its hold ends (here 1 s
/// instead of 29 min): `extend` cannot keep it past that, the stale receipt cannot be settled,
/// the message comes back as the next attempt, and the channel lives on (the redelivery is
/// acked on it and nothing is left).
#[tokio::test]
async fn a_delivery_is_requeued_before_the_brokers_consumer_timeout() {
    let made = Made::default();
    let opts = suite::options(suite::LONG_LEASE, 5);
    let hold = Duration::from_secs(1);
    let config = RabbitConfig {
        max_hold: hold,
        ..config()
    };
    let t = make_with(opts, made.clone(), config).await;
    let id = t
        .publish(vec![OutgoingMessage::new("{}")])
        .await
        .unwrap()
        .remove(0);
    let first = receive_one(&t).await;
    assert_eq!((first.id.as_str(), first.attempt), (id.as_str(), 1));
    // The lease (LONG_LEASE) is far longer than the hold: only the hold can end it.
    t.extend(&first, suite::LONG_LEASE)
        .await
        .expect("extend within the hold");
    poll_until(
        suite::REDELIVERY_TIMEOUT,
        "extend to fail at the hold",
        || {
            let t = &t;
            let first = &first;
            async move {
                match t.extend(first, suite::LONG_LEASE).await {
                    Err(Error::LeaseLost(_)) => Some(()),
                    Ok(()) => None,
                    Err(e) => panic!("extend: {e}"),
                }
            }
        },
    )
    .await;
    let again = receive_one(&t).await;
    assert_eq!((again.id.as_str(), again.attempt), (id.as_str(), 2));
    assert!(matches!(t.ack(&first).await, Err(Error::LeaseLost(_))));
    t.ack(&again).await.expect("the channel is still open");
    let s = t.stats().await.unwrap();
    assert_eq!((s.ready, s.in_flight, s.dead_lettered), (0, 0, 0), "{s:?}");
    drop(t);
    made.cleanup().await;
}

/// The broker's `consumer_timeout` also counts prefetched deliveries that no slot has taken
/// yet: those that waited in the buffer for the whole hold are requeued too, so a worker
/// whose slots are all busy never has its channel closed under it.
#[tokio::test]
async fn prefetched_deliveries_are_requeued_before_the_brokers_consumer_timeout() {
    let made = Made::default();
    // A short lease makes the lease keeper tick every 100 ms; max_deliveries leaves room for
    // a few requeues before the crash-loop guard.
    let opts = suite::options(Duration::from_millis(800), 10);
    let hold = Duration::from_millis(500);
    let config = RabbitConfig {
        max_hold: hold,
        ..config()
    };
    let t = make_with(opts, made.clone(), config).await;
    t.publish((0..3).map(|_| OutgoingMessage::new("{}")).collect())
        .await
        .unwrap();
    // Starts the consumer; the other two arrive behind this one and wait in the buffer.
    let first = receive_one(&t).await;
    t.ack(&first).await.unwrap();
    // Nothing can be polled here without taking the buffered deliveries, which is what the
    // test must not do: wait out the hold (and the keeper's ticks) instead. Requeued ones come
    // straight back to this consumer's buffer, so they may be requeued more than once.
    tokio::time::sleep(hold * 3).await;
    let mut rest = Vec::new();
    while rest.len() < 2 {
        rest.extend(t.receive(2, Duration::from_secs(5)).await.unwrap());
    }
    assert!(
        rest.iter().all(|d| (2..10).contains(&d.attempt)),
        "requeued while buffered, and not dead-lettered: {:?}",
        rest.iter().map(|d| d.attempt).collect::<Vec<_>>()
    );
    for d in &rest {
        t.ack(d).await.expect("the channel is still open");
    }
    let s = t.stats().await.unwrap();
    assert_eq!((s.ready, s.in_flight, s.dead_lettered), (0, 0, 0), "{s:?}");
    drop(t);
    made.cleanup().await;
}

/// `amqps://` is accepted and spoken with rustls: against the plain AMQP port the TLS handshake
/// fails at once with a configuration error that names the key and the URL, never the
/// password.
#[tokio::test]
async fn an_amqps_url_to_a_plain_port_fails_clearly_without_the_password() {
    let mut opts = suite::options(suite::LONG_LEASE, 5);
    let plain = url();
    let host = plain
        .split_once('@')
        .map(|(_, rest)| rest.to_owned())
        .unwrap_or_else(|| "127.0.0.1:5672/%2f".into());
    opts.url = format!("amqps://guest:hunter2-secret@{host}");
    let err = match RabbitTransport::open_with(opts, config()).await {
        Ok(_) => panic!("a TLS handshake with a plain AMQP port cannot succeed"),
        Err(e) => e,
    };
    let text = err.to_string();
    assert!(!text.contains("hunter2-secret"), "{text}");
    assert!(matches!(err, Error::Config(_)), "{text}");
    assert!(
        text.contains("transport.url")
            && text.contains("amqps://guest:***@")
            && text.contains("TLS"),
        "{text}"
    );
}

/// A URL that cannot work fails at once as a configuration error naming the key, with the
/// password masked even when the URL is malformed (no reconnect attempts: they would all fail
/// the same way).
#[tokio::test]
async fn a_malformed_url_fails_at_once_without_the_password() {
    for bad in [
        "amqp://guest:hunter2-secret@127.0.0.1:notaport/%2f",
        "amqps//guest:hunter2-secret@127.0.0.1:5672/%2f",
    ] {
        let mut opts = suite::options(suite::LONG_LEASE, 5);
        opts.url = bad.into();
        let err = match RabbitTransport::open_with(opts, config()).await {
            Ok(_) => panic!("{bad} cannot connect"),
            Err(e) => e,
        };
        let text = err.to_string();
        assert!(matches!(err, Error::Config(_)), "{text}");
        assert!(text.contains("transport.url"), "{text}");
        assert!(!text.contains("hunter2-secret"), "{text}");
    }
}

/// Publishes with lapin itself, as a producer with the broker's own client would: as one of our
/// copies (the default exchange, straight to the work queue, the fields as headers) or as a
/// producer's message (the `<q>` exchange).
async fn forge(_: &RabbitTransport, queue: &str, m: suite::Forged) {
    use sluice::transport::rabbitmq::lapin::{
        options::{BasicPublishOptions, ConfirmSelectOptions},
        types::{AMQPValue, FieldTable, LongString},
        BasicProperties, Connection, ConnectionProperties,
    };
    let conn = Connection::connect(&url(), ConnectionProperties::default())
        .await
        .expect("connect");
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let mut headers = FieldTable::default();
    for (k, v) in m.fields {
        headers.insert(
            k.as_str().into(),
            AMQPValue::LongString(LongString::from(v.into_bytes())),
        );
    }
    let exchange = if m.as_copy { "" } else { queue };
    ch.basic_publish(
        exchange.into(),
        queue.into(),
        BasicPublishOptions::default(),
        &m.body,
        BasicProperties::default()
            .with_message_id(uuid::Uuid::new_v4().to_string().into())
            .with_headers(headers),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    conn.close(200, "forged".into()).await.ok();
}

#[tokio::test]
async fn forged_envelope_fields_are_defects_and_never_wrap_the_attempt() {
    let made = Made::default();
    suite::forged_envelope_fields_are_defects_and_never_wrap_the_attempt(
        |o| make(o, made.clone()),
        forge,
    )
    .await;
    made.cleanup().await;
}

#[tokio::test]
async fn sluice_headers_from_a_producer_stay_producer_headers() {
    let made = Made::default();
    suite::sluice_headers_from_a_producer_stay_producer_headers(|o| make(o, made.clone()), forge)
        .await;
    made.cleanup().await;
}
