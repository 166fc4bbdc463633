//! charge-payment as real processes on the real RabbitMQ broker: killed mid-batch and
//! restarted, cut off by the broker, stopped with SIGTERM, three at once, and a poison message
//! through the DLQ and back. Nothing is lost and no payment is charged twice.
//!
//! Needs the broker and `rabbitmqctl` (`scripts/services.sh rabbitmq`) and the debug build of
//! charge-payment (`cargo build -p charge-payment`; `just test` builds it). Every test runs in
//! a virtual host of its own ([`Vhost`], deleted with its queues when the test ends, also on
//! failure) and names its own queue with `--set queue=...`; its SQLite idempotency store and
//! ledger live in a temporary directory.

use std::{ops::Deref, process::Child, time::Duration};

use sluice::conformance::{poll_until, unique};
use sluice_tests::rabbit::{rabbitmqctl, Vhost};

use crate::support::{pending, sigterm, wait_exit, FunctionRun, CHARGE_TEMPLATE};

/// Longest a worker may take to finish what is left (well above what it needs: a few seconds).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(120);
/// Longest wait for the broker to show what a worker did (requeues after a process exits).
const BROKER_TIMEOUT: Duration = Duration::from_secs(30);

/// One test's charge-payment on RabbitMQ: its virtual host, its queue, its files; every
/// command gets `--set queue=<queue>` and the rig's `sets` (they must agree on
/// `retry.max_deliveries`: it is fixed in the queue's arguments).
struct Rig {
    run: FunctionRun,
    vhost: Vhost,
    queue: String,
}

impl Rig {
    /// The rig, its topology provisioned.
    fn new(name: &str, sets: &[&str]) -> Self {
        let vhost = Vhost::create(name).expect("a test virtual host (is RabbitMQ up?)");
        let queue = unique(name);
        let mut run = FunctionRun::new("charge-payment")
            .env("SLUICE__TRANSPORT__KIND", "rabbitmq")
            .env("SLUICE__TRANSPORT__URL", &vhost.url)
            .set(format!("queue={queue}"));
        for s in sets {
            run = run.set(*s);
        }
        run.cli(&["provision"]);
        Self { run, vhost, queue }
    }

    /// Waits for a worker of this rig to exit; after [`DRAIN_TIMEOUT`] kills it and fails the
    /// test, naming its log.
    async fn wait(&self, worker: &mut Child, log: &str) -> std::process::ExitStatus {
        wait_exit(worker, DRAIN_TIMEOUT, Some(&self.path(log))).await
    }
}

impl Deref for Rig {
    type Target = FunctionRun;

    fn deref(&self) -> &FunctionRun {
        &self.run
    }
}

/// SIGKILL twice while messages are being charged (slow gateway, 5% outages, so deliveries are
/// in flight and retries are waiting): the broker takes back what the dead connection held,
/// two restarted workers finish, every payment is charged exactly once.
#[tokio::test]
async fn sigkill_mid_batch_then_restart_loses_nothing_and_charges_each_payment_once() {
    const PAYMENTS: u64 = 400;
    // The broker redelivers a dead connection's messages at once, but the killed worker's
    // idempotency claims stay "in progress" until their lease (transport.lease) runs out, and
    // each delivery that finds one is retried and counts: a short lease keeps that well within
    // retry.max_deliveries (with 30 s and retries from 100 ms it would not be).
    let rig = Rig::new(
        "e2e-kill",
        &[
            "app.latency=15ms",
            "app.failure_rate=0.05",
            "retry.base=100ms",
            "transport.lease=1s",
        ],
    );
    rig.cli(&["send", "--count", &PAYMENTS.to_string(), CHARGE_TEMPLATE]);
    // A hundred duplicates of the first hundred payments.
    rig.cli(&["send", "--count", "100", CHARGE_TEMPLATE]);

    for kill_at in [80, 200] {
        let mut worker = rig.worker(&[], "worker.log");
        poll_until(DRAIN_TIMEOUT, "charges to reach the kill point", || async {
            (rig.ledger().charges >= kill_at).then_some(())
        })
        .await;
        worker.kill().unwrap(); // SIGKILL: no shutdown path runs.
        worker.wait().unwrap();
        // The broker returns the dead connection's unacked deliveries to the queue.
        let left = poll_until(
            BROKER_TIMEOUT,
            "the killed worker's deliveries to return",
            || {
                let s = rig.stats();
                async move { (pending(&s) > 0).then_some(s) }
            },
        )
        .await;
        assert!(
            rig.ledger().charges < PAYMENTS,
            "the kill must land mid-run: {left}"
        );
    }

    let mut a = rig.worker(&["--drain"], "worker-a.log");
    let mut b = rig.worker(&["--drain"], "worker-b.log");
    assert!(rig.wait(&mut a, "worker-a.log").await.success());
    assert!(rig.wait(&mut b, "worker-b.log").await.success());

    let s = rig.stats();
    assert_eq!(pending(&s), 0, "{s}");
    assert_eq!(
        s["dead_lettered"],
        0,
        "nothing dead-lettered: {s}\n{}",
        rig.cli(&["dlq", "list"])
    );
    poll_until(BROKER_TIMEOUT, "the broker to count nothing left", || {
        let counts = rig.vhost.queue_counts(&rig.queue).unwrap();
        async move { (counts == Some((0, 0))).then_some(()) }
    })
    .await;
    let ledger = rig.ledger();
    assert_eq!(ledger.distinct_payments, PAYMENTS, "every payment charged");
    assert_eq!(ledger.charges, PAYMENTS, "no payment charged twice");
}

/// The broker closes every connection of the virtual host while the worker runs: the worker
/// reconnects by itself (a new connection and consumer), finishes the queue, and the
/// deliveries the old connection held are redelivered and absorbed by idempotency.
#[tokio::test]
async fn closed_connections_make_the_worker_reconnect_and_finish() {
    const PAYMENTS: u64 = 300;
    let rig = Rig::new("e2e-reconnect", &["app.latency=10ms"]);
    rig.cli(&["send", "--count", &PAYMENTS.to_string(), CHARGE_TEMPLATE]);
    let mut worker = rig.worker(&["--drain"], "worker.log");
    poll_until(DRAIN_TIMEOUT, "the first charges", || async {
        (rig.ledger().charges >= 50).then_some(())
    })
    .await;
    rig.vhost
        .close_all_connections("test: simulated broker-side connection loss")
        .unwrap();
    let status = rig.wait(&mut worker, "worker.log").await;
    assert!(status.success(), "the worker finished: {status:?}");

    let log = rig.log("worker.log");
    assert!(
        log.contains("RabbitMQ connection lost; reconnecting"),
        "the worker saw the connection go and reconnected:\n{log}"
    );
    let ledger = rig.ledger();
    let s = rig.stats();
    assert_eq!(pending(&s), 0, "{s}");
    assert_eq!(s["dead_lettered"], 0, "{s}");
    assert_eq!(ledger.distinct_payments, PAYMENTS, "every payment charged");
    assert_eq!(ledger.charges, PAYMENTS, "no payment charged twice");
}

/// SIGTERM: the worker stops taking messages, lets the ones in its handlers finish and acks
/// them, and exits; everything else (including what it had prefetched) is back in the queue.
#[tokio::test]
async fn sigterm_finishes_in_flight_messages_and_leaves_the_rest_queued() {
    const PAYMENTS: u64 = 200;
    let rig = Rig::new("e2e-term", &["app.latency=300ms", "worker.concurrency=4"]);
    rig.cli(&["send", "--count", &PAYMENTS.to_string(), CHARGE_TEMPLATE]);
    let mut worker = rig.worker(&[], "worker.log");
    poll_until(DRAIN_TIMEOUT, "the first charges", || async {
        (rig.ledger().charges >= 4).then_some(())
    })
    .await;
    sigterm(&worker);
    let status = rig.wait(&mut worker, "worker.log").await;
    assert!(status.success(), "graceful exit: {status:?}");

    let ledger = rig.ledger();
    assert!(ledger.charges < PAYMENTS, "it stopped early: {ledger:?}");
    // Every message is either charged or ready again (the broker requeues what the closed
    // connection held unacked): nothing lost, nothing charged and left queued.
    let s = poll_until(BROKER_TIMEOUT, "charged + ready = sent", || {
        let s = rig.stats();
        let ledger = rig.ledger();
        async move { (ledger.charges + s["ready"].as_u64().unwrap() == PAYMENTS).then_some(s) }
    })
    .await;
    assert_eq!(s["delayed"], 0, "{s}");
    assert_eq!(s["dead_lettered"], 0, "{s}");
    let expected = Some((PAYMENTS - ledger.charges, 0));
    poll_until(
        BROKER_TIMEOUT,
        "the broker to count the rest as ready, none unacked",
        || {
            let counts = rig.vhost.queue_counts(&rig.queue).unwrap();
            async move { (counts == expected).then_some(()) }
        },
    )
    .await;
    assert_eq!(ledger.charges, ledger.distinct_payments);
}

/// Three workers on one queue at once, with duplicates and gateway outages: each payment is
/// charged exactly once.
#[tokio::test]
async fn three_workers_at_once_charge_each_payment_exactly_once() {
    const PAYMENTS: u64 = 600;
    let rig = Rig::new(
        "e2e-three",
        &[
            "app.latency=5ms",
            "app.failure_rate=0.05",
            "retry.base=100ms",
        ],
    );
    rig.cli(&["send", "--count", &PAYMENTS.to_string(), CHARGE_TEMPLATE]);
    rig.cli(&["send", "--count", "150", CHARGE_TEMPLATE]);
    let mut workers: Vec<(Child, String)> = ["a", "b", "c"]
        .iter()
        .map(|n| {
            let log = format!("worker-{n}.log");
            (rig.worker(&["--drain"], &log), log)
        })
        .collect();
    for (w, log) in &mut workers {
        let status = rig.wait(w, log).await;
        assert!(status.success(), "{log}: {status:?}\n{}", rig.log(log));
    }
    let s = rig.stats();
    assert_eq!(pending(&s), 0, "{s}");
    assert_eq!(s["dead_lettered"], 0, "{s}");
    let ledger = rig.ledger();
    assert_eq!(ledger.distinct_payments, PAYMENTS);
    assert_eq!(ledger.charges, ledger.distinct_payments, "{ledger:?}");
    for (_, log) in &workers {
        assert!(rig.log(log).contains("worker started"), "{log} took part");
    }
}

/// A payment whose gateway always fails is retried (delayed, through the delay ladder) until
/// `retry.max_deliveries` (3), then dead-lettered with its history; `dlq list` shows it;
/// `redrive` moves it back exactly once (a second redrive finds nothing), `dlq list` no longer
/// shows it, and with the gateway healthy again it is charged once.
#[tokio::test]
async fn poison_message_reaches_the_dlq_with_history_and_redrive_brings_it_back_once() {
    const SETS: [&str; 5] = [
        "retry.max_deliveries=3",
        "retry.immediate=0",
        "retry.base=300ms",
        "retry.cap=600ms",
        "breaker.enabled=false",
    ];
    let rig = Rig::new("e2e-poison", &SETS);
    let id = rig
        .cli(&[
            "send",
            r#"{"payment_id":"pay-poison","amount_cents":500,"currency":"EUR","customer":"c-9"}"#,
        ])
        .trim()
        .to_owned();

    let mut worker = rig.worker(&["--drain", "--set", "app.failure_rate=1.0"], "worker.log");
    let status = rig.wait(&mut worker, "worker.log").await;
    assert!(status.success(), "{status:?}");
    assert_eq!(rig.ledger().charges, 0);

    let listed = rig.json(&["dlq", "list", "--json"]);
    let dl = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["id"] == id.as_str())
        .unwrap_or_else(|| panic!("{id} in the DLQ: {listed}"))
        .clone();
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
    assert_eq!(dl["attempts"], 3, "{dl}");
    assert_eq!(dl["error_class"], "transient", "{dl}");
    assert_eq!(dl["function"], "charge-payment", "{dl}");
    assert_eq!(dl["original_queue"], rig.queue.as_str(), "{dl}");
    assert_eq!(dl["redriven"], 0, "{dl}");
    let last_error = dl["last_error"].as_str().unwrap();
    assert!(last_error.contains("gave up after 3 deliveries"), "{dl}");
    let (first, last) = (
        dl["first_failure_at"].as_str().unwrap(),
        dl["last_failure_at"].as_str().unwrap(),
    );
    assert!(first < last, "two failures apart at least one delay: {dl}");
    assert_eq!(
        dl["body"].as_str().unwrap(),
        r#"{"payment_id":"pay-poison","amount_cents":500,"currency":"EUR","customer":"c-9"}"#
    );
    let shown = rig.json(&["dlq", "show", &id, "--json"]);
    assert_eq!(shown["attempts"], 3, "peeking did not consume it: {shown}");

    let moved = rig.json(&["redrive", "--json"]);
    assert_eq!(moved.as_array().unwrap().len(), 1, "{moved}");
    assert_eq!(moved[0]["id"], id.as_str());
    let again = rig.json(&["redrive", "--json"]);
    assert_eq!(again.as_array().unwrap().len(), 0, "redriven once: {again}");
    assert_eq!(rig.json(&["dlq", "list", "--json"]), serde_json::json!([]));
    let s = rig.stats();
    assert_eq!(
        (s["ready"].as_u64(), s["dead_lettered"].as_u64()),
        (Some(1), Some(0)),
        "{s}"
    );

    let mut worker = rig.worker(&["--drain"], "worker-2.log");
    let status = rig.wait(&mut worker, "worker-2.log").await;
    assert!(status.success(), "{status:?}");
    let ledger = rig.ledger();
    assert_eq!((ledger.charges, ledger.distinct_payments), (1, 1));
    let s = rig.stats();
    assert_eq!(pending(&s), 0, "{s}");
    assert_eq!(s["dead_lettered"], 0, "{s}");
}

/// `transport.prefetch` reaches the broker: by default the worker's consumer takes
/// 2 x `worker.concurrency`, and an explicit value wins; read back from the broker with
/// `rabbitmqctl list_consumers`.
#[tokio::test]
async fn the_prefetch_setting_reaches_the_brokers_consumer() {
    let rig = Rig::new("e2e-prefetch", &[]);
    for (sets, expected) in [
        (["--set", "worker.concurrency=3"], 6),
        (["--set", "transport.prefetch=7"], 7),
    ] {
        let log = format!("worker-{expected}.log");
        let mut worker = rig.worker(&sets, &log);
        let seen = poll_until(BROKER_TIMEOUT, "the worker's consumer", || async {
            let listing = rabbitmqctl(&[
                "list_consumers",
                "-p",
                &rig.vhost.name,
                "-q",
                "--no-table-headers",
                "queue_name",
                "prefetch_count",
            ])
            .unwrap();
            listing
                .lines()
                .filter_map(|l| l.split_once('\t'))
                .find(|(queue, _)| queue.trim() == rig.queue)
                .map(|(_, prefetch)| prefetch.trim().parse::<u64>().unwrap())
        })
        .await;
        sigterm(&worker);
        rig.wait(&mut worker, &log).await;
        assert_eq!(seen, expected, "{sets:?}");
    }
}
