//! charge-payment as a real process on the embedded queue: killed mid-run and restarted, and
//! stopped with SIGTERM. Nothing is lost and no payment is charged twice.

use std::time::Duration;

use crate::support::{pending, sigterm, wait_exit, FunctionRun, CHARGE_TEMPLATE};

/// Longest a worker may take to drain what is left (well above what it needs: ~2 s).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(90);

#[tokio::test]
async fn sigkill_mid_run_then_restart_loses_nothing_and_charges_each_payment_once() {
    const PAYMENTS: u64 = 400;
    let run = FunctionRun::new("charge-payment");
    run.cli(&["send", "--count", &PAYMENTS.to_string(), CHARGE_TEMPLATE]);
    // A hundred duplicates of the first hundred payments.
    run.cli(&["send", "--count", "100", CHARGE_TEMPLATE]);

    // Slow gateway calls and outages keep messages in flight when the kill lands; a short
    // lease brings the killed worker's messages back quickly.
    let settings = [
        "--set",
        "app.latency=15ms",
        "--set",
        "app.failure_rate=0.05",
        "--set",
        "transport.lease=1s",
        "--set",
        "retry.base=100ms",
    ];
    for kill_at in [80, 200] {
        let mut worker = run.worker(&settings, "worker.log");
        run.charges_at_least(kill_at, DRAIN_TIMEOUT, "charges to reach the kill point")
            .await;
        worker.kill().unwrap(); // SIGKILL: no shutdown path runs.
        worker.wait().unwrap();
        let left = run.stats();
        assert!(pending(&left) > 0, "the kill must land mid-run: {left}");
    }

    // Restart: two processes share the queue file and drain it.
    let mut drain = vec!["--drain"];
    drain.extend_from_slice(&settings);
    let mut a = run.worker(&drain, "worker-a.log");
    let mut b = run.worker(&drain, "worker-b.log");
    for (w, log) in [(&mut a, "worker-a.log"), (&mut b, "worker-b.log")] {
        assert!(wait_exit(w, DRAIN_TIMEOUT, Some(&run.path(log)))
            .await
            .success());
    }

    let s = run.stats();
    assert_eq!(s["ready"], 0, "{s}");
    assert_eq!(s["in_flight"], 0, "{s}");
    assert_eq!(s["delayed"], 0, "{s}");
    assert_eq!(s["dead_lettered"], 0, "nothing dead-lettered: {s}");
    let ledger = run.ledger();
    assert_eq!(ledger.distinct_payments, PAYMENTS, "every payment charged");
    assert_eq!(ledger.charges, PAYMENTS, "no payment charged twice");
}

#[tokio::test]
async fn sigterm_finishes_in_flight_messages_and_leaves_the_rest_queued() {
    const PAYMENTS: u64 = 200;
    let run = FunctionRun::new("charge-payment");
    run.cli(&["send", "--count", &PAYMENTS.to_string(), CHARGE_TEMPLATE]);
    let mut worker = run.worker(
        &[
            "--set",
            "app.latency=300ms",
            "--set",
            "worker.concurrency=4",
        ],
        "worker.log",
    );
    run.charges_at_least(4, DRAIN_TIMEOUT, "the first charges")
        .await;
    sigterm(&worker);
    let status = wait_exit(&mut worker, DRAIN_TIMEOUT, Some(&run.path("worker.log"))).await;
    assert!(status.success(), "graceful exit: {status:?}");

    let s = run.stats();
    let ledger = run.ledger();
    assert_eq!(
        s["in_flight"], 0,
        "in-flight messages were finished, not left leased: {s}"
    );
    assert_eq!(s["dead_lettered"], 0, "{s}");
    let ready = s["ready"].as_u64().unwrap();
    assert!(ready > 0, "the rest stays queued: {s}");
    assert_eq!(
        ledger.charges + ready,
        PAYMENTS,
        "charged + still queued = sent: nothing lost"
    );
    assert_eq!(ledger.charges, ledger.distinct_payments);
}
