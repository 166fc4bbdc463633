//! charge-payment as real worker processes on SQS (container mode), against moto: several
//! workers with one SIGKILLed mid-run, a handler slower than the visibility timeout kept leased
//! by heartbeats, a poison message through the DLQ and back with `redrive`, and SIGTERM.
//! Nothing is lost and no payment is charged twice.
//!
//! Needs moto: `eval "$(scripts/moto.sh start)"` (sets `SLUICE_TEST_MOTO` and the AWS
//! variables). Without it the tests fail: they never fall back to real AWS. Each test uses its
//! own queue (moto slows down as a queue grows) and keeps it short.

use std::{
    path::Path,
    process::Child,
    time::{Duration, Instant},
};

use sluice::conformance::{poll_until, unique};

use crate::support::{sigterm, wait_exit, FunctionRun, CHARGE_TEMPLATE};

/// Longest a step may take (moto handles a few hundred messages a second on short queues).
const TIMEOUT: Duration = Duration::from_secs(120);

/// charge-payment on an SQS queue of its own (and its idempotency store and ledger files);
/// returns the queue's name too. Fails unless the AWS endpoint is moto, so no process this
/// test starts can reach real AWS.
fn sqs_run(prefix: &str) -> (FunctionRun, String) {
    sluice_tests::moto("SQS");
    let queue = unique(prefix);
    let run = FunctionRun::new("charge-payment")
        .env("SLUICE__TRANSPORT__KIND", "sqs")
        .env("SLUICE__TRANSPORT__URL", &queue)
        .env("SLUICE__QUEUE", &queue);
    (run, queue)
}

/// `dlq list --json`: the dead letters, peeked.
fn dead_letters(run: &FunctionRun) -> Vec<serde_json::Value> {
    run.json(&["dlq", "list", "--json"])
        .as_array()
        .unwrap()
        .clone()
}

fn read_summary(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn assert_empty(stats: &serde_json::Value) {
    assert_eq!(stats["ready"], 0, "{stats}");
    assert_eq!(stats["in_flight"], 0, "{stats}");
    assert_eq!(stats["delayed"], 0, "{stats}");
}

#[tokio::test]
async fn three_workers_one_sigkilled_mid_run_lose_nothing_and_charge_each_payment_once() {
    const PAYMENTS: u64 = 150;
    let t0 = Instant::now();
    let (run, _) = sqs_run("e2e-kill");
    // A short lease brings the killed worker's messages back soon (2 s visibility).
    let settings = [
        "--drain",
        "--set",
        "transport.lease=2s",
        "--set",
        "app.latency=40ms",
        "--set",
        "app.failure_rate=0.05",
        "--set",
        "retry.base=1s",
    ];
    run.cli(&["provision", "--set", "transport.lease=2s"]);
    run.cli(&["send", "--count", &PAYMENTS.to_string(), CHARGE_TEMPLATE]);
    // Twenty duplicates of the first twenty payments.
    run.cli(&["send", "--count", "20", CHARGE_TEMPLATE]);

    let mut workers: Vec<Child> = (0..3)
        .map(|i| run.worker(&settings, &format!("worker-{i}.log")))
        .collect();
    run.charges_at_least(30, TIMEOUT, "charges to reach the kill point")
        .await;
    let mut victim = workers.remove(0);
    victim.kill().unwrap(); // SIGKILL: no shutdown path runs, its messages stay leased.
    victim.wait().unwrap();
    let at_kill = run.ledger().charges;
    assert!(
        at_kill < PAYMENTS,
        "the kill must land mid-run: {at_kill} charged"
    );

    // A restarted worker joins the survivors; all drain the queue.
    workers.push(run.worker(&settings, "worker-restart.log"));
    for w in &mut workers {
        let status = wait_exit(w, TIMEOUT, None).await;
        assert!(status.success(), "drain exit: {status:?}");
    }

    let s = run.stats();
    assert_empty(&s);
    assert_eq!(s["dead_lettered"], 0, "nothing dead-lettered: {s}");
    let ledger = run.ledger();
    assert_eq!(ledger.distinct_payments, PAYMENTS, "every payment charged");
    assert_eq!(ledger.charges, PAYMENTS, "no payment charged twice");
    eprintln!(
        "sigkill test: {PAYMENTS} payments (+20 duplicates), killed at {at_kill} charges, {:?}",
        t0.elapsed()
    );
}

#[tokio::test]
async fn a_handler_slower_than_the_visibility_timeout_is_kept_leased_and_runs_once() {
    // One message, two workers: one works it, the other keeps polling the queue.
    const PAYMENTS: u64 = 1;
    let t0 = Instant::now();
    let (run, _) = sqs_run("e2e-slow");
    // Visibility 2 s, handler 5 s: without heartbeats the idle worker would receive the
    // message again after 2 s (and the busy one would find its receipt stale).
    let settings = [
        "--set",
        "transport.lease=2s",
        "--set",
        "app.latency=5s",
        "--set",
        "worker.concurrency=1",
    ];
    run.cli(&["provision", "--set", "transport.lease=2s"]);
    run.cli(&["send", "--count", &PAYMENTS.to_string(), CHARGE_TEMPLATE]);

    let summaries = ["summary-a.json", "summary-b.json"];
    let mut workers: Vec<Child> = summaries
        .iter()
        .map(|name| {
            let path = run.path(name).display().to_string();
            let mut args = vec!["--drain", "--summary", &path];
            args.extend_from_slice(&settings);
            run.worker(&args, &format!("worker-{name}.log"))
        })
        .collect();
    for w in &mut workers {
        let status = wait_exit(w, TIMEOUT, None).await;
        assert!(status.success(), "drain exit: {status:?}");
    }

    let ledger = run.ledger();
    assert_eq!(ledger.distinct_payments, PAYMENTS, "every payment charged");
    assert_eq!(ledger.charges, PAYMENTS, "no payment charged twice");
    let (mut received, mut duplicates) = (0, 0);
    for name in summaries {
        let s = read_summary(&run.path(name));
        received += s["received"].as_u64().unwrap();
        duplicates += s["duplicates_skipped"].as_u64().unwrap();
        assert_eq!(s["retried"], 0, "{name}: {s}");
        assert_eq!(s["dead_lettered"], 0, "{name}: {s}");
    }
    assert_eq!(
        received, PAYMENTS,
        "each message received once: the heartbeats kept it invisible ({duplicates} duplicates \
         skipped)"
    );
    let s = run.stats();
    assert_empty(&s);
    assert_eq!(s["dead_lettered"], 0, "{s}");
    eprintln!("heartbeat test: {:?}", t0.elapsed());
}

#[tokio::test]
async fn a_poison_message_reaches_the_dlq_with_its_history_and_redrive_brings_it_back_once() {
    let t0 = Instant::now();
    let (run, queue) = sqs_run("e2e-poison");
    let retry = [
        "--set",
        "retry.max_deliveries=3",
        "--set",
        "retry.immediate=0",
        "--set",
        "retry.base=1s",
        "--set",
        "retry.cap=1s",
        "--set",
        "transport.lease=5s",
    ];
    let mut provision = vec!["provision"];
    provision.extend_from_slice(&retry);
    run.cli(&provision);
    run.cli(&[
        "send",
        r#"{"payment_id":"pay-poison","amount_cents":1000,"currency":"EUR","customer":"c-1"}"#,
    ]);
    assert!(dead_letters(&run).is_empty());

    // The gateway is down for good: every delivery fails (transient) until they run out.
    let mut args = vec!["--drain", "--set", "app.failure_rate=1.0"];
    args.extend_from_slice(&retry);
    let mut w = run.worker(&args, "worker-failing.log");
    let log = run.path("worker-failing.log");
    assert!(wait_exit(&mut w, TIMEOUT, Some(&log)).await.success());

    let dlq = dead_letters(&run);
    assert_eq!(dlq.len(), 1, "{dlq:?}");
    let dead = &dlq[0];
    assert_eq!(dead["error_class"], "transient", "{dead}");
    assert_eq!(dead["attempts"], 3, "{dead}");
    assert_eq!(dead["redriven"], 0, "{dead}");
    assert_eq!(dead["original_queue"], queue.as_str(), "{dead}");
    assert!(
        dead["last_error"].as_str().unwrap().contains("503"),
        "{dead}"
    );
    assert!(
        dead["body"].as_str().unwrap().contains("pay-poison"),
        "{dead}"
    );
    let (first, last) = (
        dead["first_failure_at"].as_str().unwrap(),
        dead["last_failure_at"].as_str().unwrap(),
    );
    assert!(
        first < last,
        "the history spans the retries (RFC 3339, same format): {dead}"
    );
    // Listing peeks: it is still there, and the work queue is empty.
    assert_eq!(dead_letters(&run).len(), 1);
    let s = run.stats();
    assert_empty(&s);
    assert_eq!(s["dead_lettered"], 1, "{s}");
    assert_eq!(run.ledger().charges, 0);

    // Redrive once: back in the work queue, gone from the DLQ; a second redrive moves nothing.
    let out = run.cli(&["redrive"]);
    assert!(out.contains("redrove 1 message"), "{out}");
    assert!(
        dead_letters(&run).is_empty(),
        "redriven messages leave the DLQ"
    );
    let out = run.cli(&["redrive"]);
    assert!(out.contains("redrove 0 message"), "{out}");
    let s = run.stats();
    assert_eq!(s["ready"], 1, "{s}");
    assert_eq!(s["dead_lettered"], 0, "{s}");

    // The gateway is back: charged exactly once.
    let mut args = vec!["--drain"];
    args.extend_from_slice(&retry);
    let mut w = run.worker(&args, "worker-healthy.log");
    let log = run.path("worker-healthy.log");
    assert!(wait_exit(&mut w, TIMEOUT, Some(&log)).await.success());
    let ledger = run.ledger();
    assert_eq!((ledger.charges, ledger.distinct_payments), (1, 1));
    let s = run.stats();
    assert_empty(&s);
    assert_eq!(s["dead_lettered"], 0, "{s}");
    assert!(dead_letters(&run).is_empty());
    eprintln!("poison test: {:?}", t0.elapsed());
}

#[tokio::test]
async fn sigterm_finishes_in_flight_messages_and_leaves_the_rest_queued() {
    const PAYMENTS: u64 = 40;
    let t0 = Instant::now();
    let (run, _) = sqs_run("e2e-term");
    // A long lease: a message left in flight by the shutdown would stay invisible for 60 s,
    // so `in_flight == 0` right after exit means everything was finished or released.
    run.cli(&["provision", "--set", "transport.lease=60s"]);
    run.cli(&["send", "--count", &PAYMENTS.to_string(), CHARGE_TEMPLATE]);

    // Phase 1: the grace covers the handlers: in-flight messages finish.
    let summary = run.path("summary-graceful.json");
    let summary_arg = summary.display().to_string();
    let mut worker = run.worker(
        &[
            "--summary",
            &summary_arg,
            "--set",
            "transport.lease=60s",
            "--set",
            "app.latency=500ms",
            "--set",
            "worker.concurrency=4",
            "--set",
            "worker.shutdown_grace=20s",
        ],
        "worker-graceful.log",
    );
    run.charges_at_least(4, TIMEOUT, "the first charges").await;
    sigterm(&worker);
    let status = wait_exit(&mut worker, TIMEOUT, None).await;
    assert!(status.success(), "graceful exit: {status:?}");
    let s = run.stats();
    let ledger = run.ledger();
    assert_eq!(
        s["in_flight"], 0,
        "in-flight finished, not left leased: {s}"
    );
    assert_eq!(s["dead_lettered"], 0, "{s}");
    let ready = s["ready"].as_u64().unwrap();
    assert!(ready > 0, "the rest stays queued: {s}");
    assert_eq!(ledger.charges + ready, PAYMENTS, "charged + queued = sent");
    assert_eq!(ledger.charges, ledger.distinct_payments);
    let sum = read_summary(&summary);
    assert_eq!(sum["released"], 0, "everything in flight finished: {sum}");
    assert_eq!(sum["succeeded"].as_u64().unwrap(), ledger.charges, "{sum}");

    // Phase 2: handlers slower than the grace: they are cancelled and their messages released
    // (visibility 0), visible again at once despite the 60 s lease.
    let summary = run.path("summary-released.json");
    let summary_arg = summary.display().to_string();
    let before = ledger.charges;
    let mut worker = run.worker(
        &[
            "--summary",
            &summary_arg,
            "--set",
            "transport.lease=60s",
            "--set",
            "app.latency=30s",
            "--set",
            "worker.concurrency=4",
            "--set",
            "worker.shutdown_grace=1s",
        ],
        "worker-released.log",
    );
    poll_until(TIMEOUT, "the worker to hold messages", || async {
        (run.stats()["in_flight"].as_u64().unwrap() > 0).then_some(())
    })
    .await;
    sigterm(&worker);
    let status = wait_exit(&mut worker, TIMEOUT, None).await;
    assert!(status.success(), "exit after the grace: {status:?}");
    let s = run.stats();
    assert_eq!(s["in_flight"], 0, "released, not left leased for 60 s: {s}");
    assert_eq!(s["ready"].as_u64().unwrap() + before, PAYMENTS, "{s}");
    assert_eq!(
        run.ledger().charges,
        before,
        "cancelled handlers charged nothing"
    );
    let sum = read_summary(&summary);
    assert!(sum["released"].as_u64().unwrap() > 0, "{sum}");

    // A fresh worker drains the rest: every payment charged once.
    let mut worker = run.worker(
        &["--drain", "--set", "transport.lease=60s"],
        "worker-drain.log",
    );
    assert!(wait_exit(&mut worker, TIMEOUT, None).await.success());
    let ledger = run.ledger();
    assert_eq!(ledger.distinct_payments, PAYMENTS, "every payment charged");
    assert_eq!(ledger.charges, PAYMENTS, "no payment charged twice");
    let s = run.stats();
    assert_empty(&s);
    assert_eq!(s["dead_lettered"], 0, "{s}");
    eprintln!("sigterm test: {:?}", t0.elapsed());
}
