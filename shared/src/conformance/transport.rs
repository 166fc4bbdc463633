//! The transport conformance suite (DESIGN.md "Transport contract").
//!
//! `make(opts)` must return a handle on the queue named `opts.queue`; called twice with the
//! same options it must return two independent consumers of the same queue. The suite chooses
//! the queue name (unique per check), the lease and the delivery limit; the adapter fills
//! `url` and anything else it needs.

use std::{
    collections::HashSet,
    future::Future,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use super::{poll_until, unique};
use crate::{
    error::Error,
    message::{Failure, FailureClass, OldestAge, OutgoingMessage, RedriveFilter},
    transport::{Transport, TransportOptions},
};

/// Lease used by checks that wait for a lease to run out: short, so they stay quick.
pub const SHORT_LEASE: Duration = Duration::from_millis(400);
/// Lease used by checks that must not see a lease run out.
pub const LONG_LEASE: Duration = Duration::from_secs(60);
/// Longest any check waits for a redelivery.
pub const REDELIVERY_TIMEOUT: Duration = Duration::from_secs(15);

/// Options for one check's queue.
pub fn options(lease: Duration, max_deliveries: u32) -> TransportOptions {
    TransportOptions {
        queue: unique("conf"),
        function: "conformance".into(),
        url: String::new(),
        lease,
        max_deliveries,
        poll_interval: Duration::from_millis(20),
        // The suite's queues are its own: created on first use.
        declare: true,
    }
}

async fn publish_one<T: Transport>(t: &T, body: &[u8]) -> String {
    t.publish(vec![OutgoingMessage::new(body.to_vec())])
        .await
        .expect("publish")
        .remove(0)
}

async fn receive_one<T: Transport>(t: &T) -> crate::message::Delivery {
    poll_until(REDELIVERY_TIMEOUT, "a delivery", || async {
        t.receive(1, Duration::from_millis(200))
            .await
            .expect("receive")
            .pop()
    })
    .await
}

/// Ack removes the message for good.
pub async fn ack_removes_the_message<T, F, Fut>(make: F)
where
    T: Transport,
    F: Fn(TransportOptions) -> Fut,
    Fut: Future<Output = T>,
{
    let t = make(options(LONG_LEASE, 5)).await;
    let id = publish_one(&t, br#"{"n":1}"#).await;
    let d = receive_one(&t).await;
    assert_eq!(d.id, id);
    assert_eq!(d.body, br#"{"n":1}"#);
    assert_eq!(d.attempt, 1);
    t.ack(&d).await.expect("ack");
    let s = t.stats().await.expect("stats");
    assert_eq!(
        (s.ready, s.in_flight, s.delayed, s.dead_lettered),
        (0, 0, 0, 0)
    );
    assert!(t
        .receive(1, Duration::from_millis(100))
        .await
        .unwrap()
        .is_empty());
}

/// `retry_after(d)` hides the message for `d`, then delivers it again as the next attempt;
/// meanwhile other messages are delivered (a delayed retry holds no consumer slot).
/// `rounding` is how much earlier than `d` the adapter may deliver (delay ladders round).
pub async fn retry_after_hides_the_message_until_the_delay<T, F, Fut>(make: F, rounding: Duration)
where
    T: Transport,
    F: Fn(TransportOptions) -> Fut,
    Fut: Future<Output = T>,
{
    let delay = Duration::from_millis(1500);
    let t = make(options(LONG_LEASE, 5)).await;
    publish_one(&t, b"{}").await;
    let d = receive_one(&t).await;
    let retried_at = Instant::now();
    t.retry_after(
        &d,
        delay,
        &Failure::now(FailureClass::Transient, "downstream 503"),
    )
    .await
    .expect("retry_after");
    let s = t.stats().await.unwrap();
    assert_eq!(
        (s.ready, s.delayed),
        (0, 1),
        "a delayed message is counted as delayed: {s:?}"
    );
    // The delay holds no consumer slot: a message sent meanwhile is delivered (and settled)
    // while the retried one waits.
    let other = publish_one(&t, b"{\"other\":true}").await;
    let next = receive_one(&t).await;
    assert_eq!(
        next.id, other,
        "while a retry waits its delay, other messages flow"
    );
    t.ack(&next).await.expect("ack the other message");
    let again = receive_one(&t).await;
    let waited = retried_at.elapsed();
    assert!(
        waited + rounding >= delay,
        "redelivered after {waited:?}, delay was {delay:?}"
    );
    assert_eq!(again.id, d.id);
    assert_eq!(again.attempt, 2);
    assert!(
        again.first_failure_at().is_some(),
        "the first failure time travels with the message"
    );
    t.ack(&again).await.expect("ack");
}

/// Dead-lettering keeps the exact bytes and headers and records the failure history.
pub async fn dead_letter_keeps_bytes_and_history<T, F, Fut>(make: F)
where
    T: Transport,
    F: Fn(TransportOptions) -> Fut,
    Fut: Future<Output = T>,
{
    let opts = options(LONG_LEASE, 5);
    let queue = opts.queue.clone();
    let t = make(opts).await;
    let body = b"\xff\xfe not json \x00".to_vec();
    let id = t
        .publish(vec![
            OutgoingMessage::new(body.clone()).header("x-tenant", "acme")
        ])
        .await
        .unwrap()
        .remove(0);
    let d = receive_one(&t).await;
    let before = SystemTime::now();
    t.retry_after(
        &d,
        Duration::ZERO,
        &Failure::now(FailureClass::Transient, "first"),
    )
    .await
    .unwrap();
    let d = receive_one(&t).await;
    t.dead_letter(
        &d,
        &Failure::now(FailureClass::Permanent, "body is not JSON"),
    )
    .await
    .expect("dead_letter");
    let s = t.stats().await.unwrap();
    assert_eq!((s.ready, s.in_flight, s.dead_lettered), (0, 0, 1));
    let dl = t.dlq_get(&id).await.unwrap().expect("dead letter by id");
    assert_eq!(dl.raw_body, body, "bytes intact");
    assert_eq!(dl.body, None);
    assert_eq!(dl.body_hex.as_deref(), Some(hex::encode(&body).as_str()));
    assert_eq!(dl.headers.get("x-tenant").map(String::as_str), Some("acme"));
    assert_eq!(dl.error_class, FailureClass::Permanent);
    assert_eq!(dl.last_error, "body is not JSON");
    assert_eq!(dl.attempts, 2);
    assert_eq!(dl.function, "conformance");
    assert_eq!(dl.original_queue, queue);
    let first = humantime::parse_rfc3339(&dl.first_failure_at).unwrap();
    let last = humantime::parse_rfc3339(&dl.last_failure_at).unwrap();
    assert!(first <= last);
    assert!(
        first + Duration::from_secs(1) >= before,
        "first failure is the retry's"
    );
    let listed = t.dlq_list(10).await.unwrap();
    assert_eq!(listed.len(), 1, "dlq list peeks without consuming");
    assert_eq!(t.dlq_list(10).await.unwrap().len(), 1);
}

/// A message whose deliveries keep crashing (never settled) is dead-lettered by the transport
/// once `max_deliveries` is used up, with class `crash_loop`.
pub async fn crash_loop_guard_dead_letters_after_max_deliveries<T, F, Fut>(make: F)
where
    T: Transport,
    F: Fn(TransportOptions) -> Fut,
    Fut: Future<Output = T>,
{
    let t = make(options(SHORT_LEASE, 3)).await;
    let id = publish_one(&t, b"{}").await;
    for attempt in 1..=3 {
        let d = receive_one(&t).await;
        assert_eq!(d.attempt, attempt);
        // Not settled: the lease runs out, as when a worker is killed.
    }
    let dl = poll_until(REDELIVERY_TIMEOUT, "the crash-loop dead letter", || async {
        let got = t.receive(1, Duration::from_millis(100)).await.unwrap();
        assert!(got.is_empty(), "delivered a 4th time: {got:?}");
        t.dlq_get(&id).await.unwrap()
    })
    .await;
    assert_eq!(dl.error_class, FailureClass::CrashLoop);
    assert_eq!(dl.attempts, 3);
}

/// When a lease runs out the message is delivered again; the old holder can no longer
/// settle it.
pub async fn expired_lease_redelivers_and_stale_holder_cannot_settle<T, F, Fut>(make: F)
where
    T: Transport,
    F: Fn(TransportOptions) -> Fut,
    Fut: Future<Output = T>,
{
    let t = make(options(SHORT_LEASE, 5)).await;
    publish_one(&t, b"{}").await;
    let first = receive_one(&t).await;
    let leased_at = Instant::now();
    let second = receive_one(&t).await;
    assert!(leased_at.elapsed() + Duration::from_millis(50) >= SHORT_LEASE);
    assert_eq!(second.id, first.id);
    assert_eq!(second.attempt, 2);
    assert!(
        matches!(t.ack(&first).await, Err(Error::LeaseLost(_))),
        "stale ack refused"
    );
    t.ack(&second).await.expect("current holder acks");
}

/// Extending keeps the message away from other consumers past its original lease.
pub async fn extend_keeps_the_message_leased<T, F, Fut>(make: F)
where
    T: Transport,
    F: Fn(TransportOptions) -> Fut,
    Fut: Future<Output = T>,
{
    let opts = options(SHORT_LEASE, 5);
    let holder = make(opts.clone()).await;
    let other = make(opts).await;
    publish_one(&holder, b"{}").await;
    let d = receive_one(&holder).await;
    let until = Instant::now() + SHORT_LEASE * 4;
    while Instant::now() < until {
        holder.extend(&d, SHORT_LEASE).await.expect("extend");
        let got = other.receive(1, SHORT_LEASE / 4).await.unwrap();
        assert!(
            got.is_empty(),
            "an extended lease was delivered to another consumer"
        );
    }
    holder.ack(&d).await.expect("ack after extensions");
}

/// Release (shutdown) makes the message available again at once.
pub async fn release_returns_the_message_at_once<T, F, Fut>(make: F)
where
    T: Transport,
    F: Fn(TransportOptions) -> Fut,
    Fut: Future<Output = T>,
{
    let t = make(options(LONG_LEASE, 5)).await;
    publish_one(&t, b"{}").await;
    let d = receive_one(&t).await;
    t.release(&d).await.expect("release");
    let again = t.receive(1, Duration::from_secs(5)).await.unwrap();
    assert_eq!(
        again.len(),
        1,
        "released message is deliverable long before its lease ends"
    );
    assert_eq!(again[0].id, d.id);
}

/// Redrive: a dry run moves nothing; a filter by class and a limit are honoured; redriven
/// messages start again at attempt 1.
pub async fn redrive_moves_dead_letters_back_with_attempts_reset<T, F, Fut>(make: F)
where
    T: Transport,
    F: Fn(TransportOptions) -> Fut,
    Fut: Future<Output = T>,
{
    let t = make(options(LONG_LEASE, 5)).await;
    for (i, class) in [
        FailureClass::Transient,
        FailureClass::Permanent,
        FailureClass::Transient,
    ]
    .into_iter()
    .enumerate()
    {
        publish_one(&t, format!("{{\"n\":{i}}}").as_bytes()).await;
        let d = receive_one(&t).await;
        t.dead_letter(&d, &Failure::now(class, format!("failure {i}")))
            .await
            .unwrap();
    }
    let dry = t
        .redrive(&RedriveFilter {
            dry_run: true,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(dry.len(), 3);
    assert_eq!(
        t.stats().await.unwrap().dead_lettered,
        3,
        "dry run moves nothing"
    );
    let moved = t
        .redrive(&RedriveFilter {
            error_class: Some(FailureClass::Transient),
            limit: Some(1),
            dry_run: false,
            rate: None,
        })
        .await
        .unwrap();
    assert_eq!(moved.len(), 1);
    assert_eq!(moved[0].error_class, FailureClass::Transient);
    let s = t.stats().await.unwrap();
    assert_eq!((s.ready, s.dead_lettered), (1, 2));
    let d = receive_one(&t).await;
    assert_eq!(d.id, moved[0].id);
    assert_eq!(d.attempt, 1, "attempts reset on redrive");
    t.ack(&d).await.unwrap();
    let rest = t.redrive(&RedriveFilter::default()).await.unwrap();
    assert_eq!(rest.len(), 2);
    assert_eq!(t.stats().await.unwrap().dead_lettered, 0);
}

/// Whether two consumers racing for one message can both be handed it within its lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RacingReceives {
    /// Never: the broker hands a message to one consumer per lease (RabbitMQ, SQS, SQLite).
    Exclusive,
    /// Now and then: moto's `ReceiveMessage` is not atomic under concurrent calls
    /// (docs/emulators.md), so the check bounds the repeats instead of forbidding them.
    EmulatorMayRepeat,
}

/// Several consumers working one queue at once never hold the same message at the same time
/// (with a lease longer than the work, each message is handled exactly once; on an emulator
/// that repeats racing receives, at most one in twenty is handed out twice).
pub async fn concurrent_consumers_never_share_a_lease<T, F, Fut>(make: F, racing: RacingReceives)
where
    T: Transport,
    F: Fn(TransportOptions) -> Fut,
    Fut: Future<Output = T>,
{
    const MESSAGES: usize = 200;
    const CONSUMERS: usize = 4;
    let opts = options(LONG_LEASE, 5);
    let producer = make(opts.clone()).await;
    let batch = (0..MESSAGES)
        .map(|i| OutgoingMessage::new(format!("{{\"n\":{i}}}")))
        .collect();
    producer.publish(batch).await.unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let mut handles = Vec::new();
    for _ in 0..CONSUMERS {
        let t = make(opts.clone()).await;
        let seen = seen.clone();
        handles.push(tokio::spawn(async move {
            loop {
                let got = t.receive(10, Duration::from_millis(200)).await.unwrap();
                if got.is_empty() {
                    if t.stats().await.unwrap().is_drained() {
                        break;
                    }
                    continue;
                }
                for d in got {
                    seen.lock().unwrap().push(d.id.clone());
                    t.ack(&d).await.expect("ack of a message we hold");
                }
            }
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    let seen = seen.lock().unwrap();
    let distinct: HashSet<_> = seen.iter().collect();
    assert_eq!(distinct.len(), MESSAGES, "every message handled");
    match racing {
        RacingReceives::Exclusive => {
            assert_eq!(seen.len(), MESSAGES, "no message handled twice")
        }
        RacingReceives::EmulatorMayRepeat => {
            let repeats = seen.len() - MESSAGES;
            assert!(
                repeats <= MESSAGES / 20,
                "{repeats} of {MESSAGES} messages handed out twice: more than the emulator's race explains"
            );
            if repeats > 0 {
                eprintln!("the emulator handed out {repeats} of {MESSAGES} messages twice");
            }
        }
    }
}

/// Stats count ready, in-flight, delayed and dead-lettered messages, and tell the oldest
/// ready message's age, or say why they cannot: the age grows while a message waits and is
/// zero once none is ready (a delayed one is not ready).
pub async fn stats_count_each_state<T, F, Fut>(make: F)
where
    T: Transport,
    F: Fn(TransportOptions) -> Fut,
    Fut: Future<Output = T>,
{
    let t = make(options(LONG_LEASE, 5)).await;
    t.publish(vec![
        OutgoingMessage::new("{}"),
        OutgoingMessage::new("{}"),
        OutgoingMessage::new("{}"),
        OutgoingMessage {
            body: b"{}".to_vec(),
            delay: Duration::from_secs(60),
            ..Default::default()
        },
    ])
    .await
    .unwrap();
    let a = receive_one(&t).await;
    let b = receive_one(&t).await;
    t.dead_letter(&b, &Failure::now(FailureClass::Permanent, "no"))
        .await
        .unwrap();
    let s = t.stats().await.unwrap();
    assert_eq!(
        (s.ready, s.in_flight, s.delayed, s.dead_lettered),
        (1, 1, 1, 1),
        "{s:?}"
    );
    t.ack(&a).await.unwrap();
    match s.oldest_ready {
        OldestAge::Unknown(why) => assert!(!why.is_empty()),
        OldestAge::Known(_) => {
            // The third message is still ready: its age grows (polled, not slept for).
            let waited = Duration::from_millis(50);
            poll_until(REDELIVERY_TIMEOUT, "the oldest age to grow", || async {
                let age = t.stats().await.unwrap().oldest_ready.known()?;
                (age >= waited).then_some(())
            })
            .await;
            let c = receive_one(&t).await;
            let s = t.stats().await.unwrap();
            assert_eq!(s.ready, 0, "{s:?}");
            assert_eq!(s.oldest_ready, OldestAge::Known(Duration::ZERO), "{s:?}");
            t.ack(&c).await.unwrap();
        }
    }
}

/// A message put on the queue by a raw client of the broker, not through the adapter.
#[derive(Debug, Clone)]
pub struct Forged {
    /// The body.
    pub body: Vec<u8>,
    /// `sluice-*` names and raw text values.
    pub fields: Vec<(String, String)>,
    /// Written where the transport writes the envelope of its own copies (AMQP: through the
    /// default exchange with `sluice-retries`; SQS: in `sluice-meta`; SQLite: the envelope
    /// column). Otherwise the fields are plain producer headers.
    pub as_copy: bool,
}

impl Forged {
    fn copy(fields: &[(&str, &str)]) -> Self {
        Self {
            body: b"{\"forged\":true}".to_vec(),
            fields: fields
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            as_copy: true,
        }
    }
}

/// Envelope fields a producer could forge on something that looks like one of our copies:
/// every malformed or overflowing value makes the delivery carry a defect that names the
/// field (the pipeline dead-letters it at once as bad input), the forged count never becomes
/// the attempt, and nothing panics. The largest real count only raises the attempt, without
/// wrapping. `forge(handle, queue, message)` publishes to the work queue named `queue` with
/// the broker's own client.
pub async fn forged_envelope_fields_are_defects_and_never_wrap_the_attempt<T, F, Fut>(
    make: F,
    forge: impl AsyncFn(&T, &str, Forged),
) where
    T: Transport,
    F: Fn(TransportOptions) -> Fut,
    Fut: Future<Output = T>,
{
    use crate::envelope::field;
    let long = "x".repeat(crate::envelope::MAX_FIELD_BYTES + 1);
    let cases: Vec<(Vec<(&str, &str)>, &str)> = vec![
        (vec![(field::RETRIES, "4294967296")], field::RETRIES),
        (vec![(field::RETRIES, "-3")], field::RETRIES),
        (vec![(field::RETRIES, "1e9")], field::RETRIES),
        (
            vec![(field::RETRIES, "1"), (field::DUE_AT, "tomorrow")],
            field::DUE_AT,
        ),
        (
            vec![
                (field::RETRIES, "1"),
                (field::FIRST_FAILURE_AT, "2026-01-01T00:00:00Z"),
                (field::LAST_FAILURE_AT, "2026-01-01T00:00:00Z"),
                (field::ERROR_CLASS, "fatal"),
            ],
            field::ERROR_CLASS,
        ),
        (
            vec![(field::RETRIES, "1"), (field::LAST_ERROR, &long)],
            field::LAST_ERROR,
        ),
        (
            vec![(field::RETRIES, "1"), ("sluice-bogus", "1")],
            "sluice-bogus",
        ),
        (
            vec![(field::RETRIES, "1"), (field::ATTEMPTS, "3")],
            "dead-letter mark",
        ),
    ];
    let opts = options(LONG_LEASE, 5);
    let queue = opts.queue.clone();
    let t = make(opts).await;
    for (fields, named) in &cases {
        forge(&t, &queue, Forged::copy(fields)).await;
        let d = receive_one(&t).await;
        let (label, reason) = d
            .defect
            .clone()
            .unwrap_or_else(|| panic!("{fields:?} was believed: {:?}", d.envelope));
        assert_eq!(label, "malformed envelope", "{reason}");
        assert!(reason.contains(named), "{named} not named in {reason:?}");
        assert_believed_nothing(&d.envelope);
        assert!(
            d.attempt <= 2,
            "the forged count is not the attempt: {}",
            d.attempt
        );
        assert_eq!(d.body, b"{\"forged\":true}", "bytes intact");
        // The dead-letter copy of a defective message is always possible.
        t.dead_letter(&d, &Failure::now(FailureClass::Permanent, reason))
            .await
            .expect("dead-letter the forged message");
    }
    forge(&t, &queue, Forged::copy(&[(field::RETRIES, "4294967295")])).await;
    let d = receive_one(&t).await;
    assert_eq!(d.defect, None, "{:?}", d.defect);
    assert_eq!(
        d.attempt,
        u32::MAX,
        "the largest count saturates, never wraps"
    );
    t.ack(&d).await.expect("ack");
    assert_eq!(
        t.stats().await.unwrap().dead_lettered,
        cases.len() as u64,
        "every forged message dead-lettered"
    );
}

/// Nothing a forged envelope said was taken: no carried retries, history, marks, due time,
/// trace context or slip (identity and enqueue time are the transport's own).
fn assert_believed_nothing(e: &crate::envelope::Envelope) {
    let believed = e.retries > 0
        || e.due_at.is_some()
        || e.failure.is_some()
        || e.dead_letter.is_some()
        || e.redrive.is_some()
        || e.trace.is_some()
        || e.slip.is_some();
    assert!(!believed, "a defective envelope is not believed: {e:?}");
}

/// `sluice-*` headers on a message that is not one of our copies are the producer's: they
/// reach `Delivery::headers` (where the pipeline rejects them as forged) and change nothing.
pub async fn sluice_headers_from_a_producer_stay_producer_headers<T, F, Fut>(
    make: F,
    forge: impl AsyncFn(&T, &str, Forged),
) where
    T: Transport,
    F: Fn(TransportOptions) -> Fut,
    Fut: Future<Output = T>,
{
    use crate::envelope::field;
    let opts = options(LONG_LEASE, 5);
    let queue = opts.queue.clone();
    let t = make(opts).await;
    let mut forged = Forged::copy(&[(field::RETRIES, "7"), (field::REDRIVEN, "99")]);
    forged.as_copy = false;
    forge(&t, &queue, forged).await;
    let d = receive_one(&t).await;
    assert_eq!(
        d.attempt, 1,
        "a producer's sluice-retries is not an attempt count"
    );
    assert!(d.envelope.failure.is_none() && d.envelope.redrive.is_none());
    assert_eq!(d.headers.get(field::RETRIES).map(String::as_str), Some("7"));
    let limits = crate::config::LimitSettings::default();
    let (label, _) = crate::message::check_input(&d.body, &d.headers, &limits).unwrap_err();
    assert_eq!(label, "forged header");
    t.ack(&d).await.unwrap();
}
