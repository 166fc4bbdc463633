//! charge-payment as a real process on the embedded queue: killed mid-run and restarted, and
//! stopped with SIGTERM. Nothing is lost and no payment is charged twice.

use std::{
    path::Path,
    process::{Child, Command, ExitStatus},
    time::{Duration, Instant},
};

use sluice::conformance::poll_until;
use sluice_tests::{function_binary, ledger_counts, Sandbox};

/// Longest a worker may take to drain what is left (well above what it needs: ~2 s).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(90);

const BODY: &str =
    r#"{"payment_id":"pay-{{seq}}","amount_cents":1000,"currency":"EUR","customer":"c-1"}"#;

fn cli(sandbox: &Sandbox, bin: &Path, args: &[&str]) -> String {
    let out = sandbox
        .command(bin, args, "cli.log")
        .unwrap()
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "charge-payment {args:?} failed: {:?}",
        out.status
    );
    String::from_utf8(out.stdout).unwrap()
}

fn stats(sandbox: &Sandbox, bin: &Path) -> serde_json::Value {
    serde_json::from_str(&cli(sandbox, bin, &["stats", "--json"])).unwrap()
}

async fn wait_exit(child: &mut Child, timeout: Duration) -> ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("worker did not exit within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn sigkill_mid_run_then_restart_loses_nothing_and_charges_each_payment_once() {
    const PAYMENTS: u64 = 400;
    let dir = tempfile::tempdir().unwrap();
    let sandbox = Sandbox::new(dir.path()).unwrap();
    let bin = function_binary("charge-payment").unwrap();
    cli(
        &sandbox,
        &bin,
        &["send", "--count", &PAYMENTS.to_string(), BODY],
    );
    // A hundred duplicates of the first hundred payments.
    cli(&sandbox, &bin, &["send", "--count", "100", BODY]);

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
        let mut worker = sandbox.spawn_worker(&bin, &settings, "worker.log").unwrap();
        poll_until(DRAIN_TIMEOUT, "charges to reach the kill point", || async {
            (ledger_counts(&sandbox.ledger_db()).unwrap().charges >= kill_at).then_some(())
        })
        .await;
        worker.kill().unwrap(); // SIGKILL: no shutdown path runs.
        worker.wait().unwrap();
        let left = stats(&sandbox, &bin);
        let pending = left["ready"].as_u64().unwrap()
            + left["in_flight"].as_u64().unwrap()
            + left["delayed"].as_u64().unwrap();
        assert!(pending > 0, "the kill must land mid-run: {left}");
    }

    // Restart: two processes share the queue file and drain it.
    let mut drain = vec!["--drain"];
    drain.extend_from_slice(&settings);
    let mut a = sandbox.spawn_worker(&bin, &drain, "worker-a.log").unwrap();
    let mut b = sandbox.spawn_worker(&bin, &drain, "worker-b.log").unwrap();
    assert!(wait_exit(&mut a, DRAIN_TIMEOUT).await.success());
    assert!(wait_exit(&mut b, DRAIN_TIMEOUT).await.success());

    let s = stats(&sandbox, &bin);
    assert_eq!(s["ready"], 0, "{s}");
    assert_eq!(s["in_flight"], 0, "{s}");
    assert_eq!(s["delayed"], 0, "{s}");
    assert_eq!(s["dead_lettered"], 0, "nothing dead-lettered: {s}");
    let ledger = ledger_counts(&sandbox.ledger_db()).unwrap();
    assert_eq!(ledger.distinct_payments, PAYMENTS, "every payment charged");
    assert_eq!(ledger.charges, PAYMENTS, "no payment charged twice");
}

#[tokio::test]
async fn sigterm_finishes_in_flight_messages_and_leaves_the_rest_queued() {
    const PAYMENTS: u64 = 200;
    let dir = tempfile::tempdir().unwrap();
    let sandbox = Sandbox::new(dir.path()).unwrap();
    let bin = function_binary("charge-payment").unwrap();
    cli(
        &sandbox,
        &bin,
        &["send", "--count", &PAYMENTS.to_string(), BODY],
    );
    let mut worker = sandbox
        .spawn_worker(
            &bin,
            &[
                "--set",
                "app.latency=300ms",
                "--set",
                "worker.concurrency=4",
            ],
            "worker.log",
        )
        .unwrap();
    poll_until(DRAIN_TIMEOUT, "the first charges", || async {
        (ledger_counts(&sandbox.ledger_db()).unwrap().charges >= 4).then_some(())
    })
    .await;
    let term = Command::new("kill")
        .args(["-TERM", &worker.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    let status = wait_exit(&mut worker, DRAIN_TIMEOUT).await;
    assert!(status.success(), "graceful exit: {status:?}");

    let s = stats(&sandbox, &bin);
    let ledger = ledger_counts(&sandbox.ledger_db()).unwrap();
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
