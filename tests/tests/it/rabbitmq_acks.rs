//! Coalesced acks on RabbitMQ: many deliveries finishing at once in any order are acked with
//! few `multiple` frames, every ack reaches the broker, and a multiple ack never covers a
//! delivery that was released or is waiting for its retry copy. Needs the broker
//! (`scripts/services.sh rabbitmq`) and `rabbitmqctl` (the broker's own count of unacked
//! messages is the proof; AMQP does not report it).

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::{Duration, Instant},
};

use sluice::{
    conformance::{poll_until, transport as suite},
    message::{Delivery, Failure, FailureClass, OutgoingMessage},
    transport::{
        rabbitmq::{RabbitConfig, RabbitTransport},
        Transport, TransportOptions,
    },
};
use sluice_tests::rabbit::{self, TEST_QUEUE_EXPIRES};

/// Longest wait for the broker's counts to show what was settled.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(20);

async fn open(opts: &TransportOptions, prefetch: u16) -> RabbitTransport {
    let mut opts = opts.clone();
    opts.url = rabbit::url();
    let config = RabbitConfig {
        prefetch,
        queue_expires: Some(TEST_QUEUE_EXPIRES),
        ..RabbitConfig::default()
    };
    RabbitTransport::open_with(opts, config)
        .await
        .expect("open rabbitmq transport (is RabbitMQ up? scripts/services.sh rabbitmq)")
}

async fn publish(t: &RabbitTransport, n: usize) -> BTreeSet<String> {
    let mut ids = BTreeSet::new();
    for chunk in (0..n).collect::<Vec<_>>().chunks(500) {
        let msgs = chunk
            .iter()
            .map(|i| OutgoingMessage::new(format!(r#"{{"n":{i}}}"#)))
            .collect();
        ids.extend(t.publish(msgs).await.unwrap());
    }
    ids
}

/// Waits until the broker holds `ready` ready and `unacked` unacknowledged messages in
/// `queue` (its counts are updated asynchronously).
async fn broker_counts_reach(queue: &str, ready: u64, unacked: u64) {
    poll_until(
        SETTLE_TIMEOUT,
        &format!("{queue} to hold {ready} ready and {unacked} unacked"),
        || async {
            let got = rabbit::queue_counts(queue).unwrap().expect("queue exists");
            (got == (ready, unacked)).then_some(())
        },
    )
    .await;
}

/// 2,000 messages worked by 32 concurrent tasks that finish in random order: every ack is
/// applied (the broker holds nothing, ready or unacked, while the connection is still open),
/// and a fresh consumer gets nothing back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_concurrent_acks_are_all_applied_and_nothing_is_redelivered() {
    const MESSAGES: usize = 2_000;
    const TASKS: usize = 32;
    let opts = suite::options(suite::LONG_LEASE, 5);
    let t = Arc::new(open(&opts, 200).await);
    let sent = publish(&t, MESSAGES).await;

    let acked = Arc::new(std::sync::Mutex::new(BTreeSet::new()));
    let mut tasks = Vec::new();
    for _ in 0..TASKS {
        let (t, acked) = (t.clone(), acked.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                if acked.lock().unwrap().len() >= MESSAGES {
                    return;
                }
                for d in t.receive(4, Duration::from_millis(50)).await.unwrap() {
                    // Finish out of order: a random few hundred microseconds of "work".
                    let work = rand::random::<u64>() % 400;
                    tokio::time::sleep(Duration::from_micros(work)).await;
                    t.ack(&d).await.expect("ack");
                    assert!(
                        acked.lock().unwrap().insert(d.id.clone()),
                        "{} delivered twice",
                        d.id
                    );
                }
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(*acked.lock().unwrap(), sent, "every message acked once");

    // The broker applied every ack: nothing unacked while our connection is still open.
    broker_counts_reach(&opts.queue, 0, 0).await;
    let s = t.stats().await.unwrap();
    assert_eq!((s.ready, s.in_flight), (0, 0), "{s:?}");
    drop(t);

    // A new connection gets nothing (an unapplied ack would be redelivered once the first
    // connection closed).
    let fresh = open(&opts, 200).await;
    let late = fresh.receive(10, Duration::from_millis(500)).await.unwrap();
    assert!(late.is_empty(), "redelivered: {:?}", ids(&late));
    fresh.delete_topology().await.unwrap();
}

/// Acks, releases and retries interleaved on one channel: the released and retried messages
/// come back (attempt 2), exactly once each, and nothing that was acked does; a multiple ack
/// never swallowed a message that was to be requeued or whose retry copy was not confirmed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn multiple_acks_never_cover_a_released_or_retried_delivery() {
    const MESSAGES: usize = 600;
    let opts = suite::options(suite::LONG_LEASE, 5);
    let t = Arc::new(open(&opts, 100).await);
    let sent = publish(&t, MESSAGES).await;

    // Every fifth first delivery is released, every fifth (offset one) retried at once, the
    // rest acked, each in its own task after a random few hundred microseconds; whatever comes
    // back (attempt 2) is recorded and acked.
    let mut first = 0;
    let mut expect_back = BTreeSet::new();
    let mut back: BTreeMap<String, u32> = BTreeMap::new();
    let mut settles = Vec::new();
    let deadline = Instant::now() + suite::REDELIVERY_TIMEOUT;
    while (first < MESSAGES || back.len() < expect_back.len()) && Instant::now() < deadline {
        for d in t.receive(10, Duration::from_millis(200)).await.unwrap() {
            let action = if d.attempt > 1 {
                assert!(
                    back.insert(d.id.clone(), d.attempt).is_none(),
                    "{} came back twice",
                    d.id
                );
                "ack"
            } else {
                first += 1;
                match first % 5 {
                    0 => "release",
                    1 => "retry",
                    _ => "ack",
                }
            };
            if action != "ack" {
                expect_back.insert(d.id.clone());
            }
            let t = t.clone();
            settles.push(tokio::spawn(async move {
                tokio::time::sleep(Duration::from_micros(rand::random::<u64>() % 300)).await;
                match action {
                    "release" => t.release(&d).await,
                    "retry" => {
                        let failure = Failure::now(FailureClass::Transient, "interleaved retry");
                        t.retry_after(&d, Duration::ZERO, &failure).await
                    }
                    _ => t.ack(&d).await,
                }
                .expect(action);
            }));
        }
    }
    for s in settles {
        s.await.unwrap();
    }
    assert_eq!(first, MESSAGES, "every message delivered once first");
    assert_eq!(
        back.keys().cloned().collect::<BTreeSet<_>>(),
        expect_back,
        "exactly the released and retried messages came back"
    );
    assert!(back.values().all(|a| *a == 2), "{back:?}");
    assert!(expect_back.is_subset(&sent));
    let extra = t.receive(10, Duration::from_millis(300)).await.unwrap();
    assert!(
        extra.is_empty(),
        "acked messages came back: {:?}",
        ids(&extra)
    );
    broker_counts_reach(&opts.queue, 0, 0).await;
    t.delete_topology().await.unwrap();
}

/// A delivery that is never finished does not hold back the acks of those after it: they are
/// acked alone after a short linger, promptly, and the broker keeps only the unfinished one
/// unacked; released, it comes back.
#[tokio::test]
async fn an_unfinished_delivery_does_not_hold_back_later_acks() {
    let opts = suite::options(suite::LONG_LEASE, 5);
    let t = open(&opts, 50).await;
    publish(&t, 20).await;
    let mut got = Vec::new();
    while got.len() < 20 {
        got.extend(t.receive(20, Duration::from_millis(200)).await.unwrap());
    }
    let slow = got.remove(0);
    let started = Instant::now();
    for d in &got {
        t.ack(d).await.unwrap();
    }
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "acks behind an unfinished delivery took {:?}",
        started.elapsed()
    );
    broker_counts_reach(&opts.queue, 0, 1).await;
    t.release(&slow).await.unwrap();
    let again = poll_until(suite::REDELIVERY_TIMEOUT, "the released one", || async {
        t.receive(1, Duration::from_millis(200))
            .await
            .unwrap()
            .pop()
    })
    .await;
    assert_eq!((again.id.as_str(), again.attempt), (slow.id.as_str(), 2));
    t.ack(&again).await.unwrap();
    broker_counts_reach(&opts.queue, 0, 0).await;
    t.delete_topology().await.unwrap();
}

fn ids(ds: &[Delivery]) -> Vec<&str> {
    ds.iter().map(|d| d.id.as_str()).collect()
}
