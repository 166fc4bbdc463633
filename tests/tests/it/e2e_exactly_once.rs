//! Exactly-once effects with PostgreSQL: charge-payment writes its ledger through
//! `ctx.postgres()`, and the worker process is made to die between the effect and the
//! record/ack again and again (`fault.crash_rate`). After every crash a new process picks up;
//! at the end every payment is in the ledger exactly once. The gateway's own idempotency key
//! is not involved: the ledger table has no unique constraint on the payment id.

use std::{process::ExitStatus, time::Duration};

use sluice_tests::{function_binary, postgres_url, Sandbox};

use crate::support::{postgres_client, wait_exit};

const PAYMENTS: usize = 120;
/// Most worker processes the test starts before giving up (each crash ends one).
const MAX_STARTS: usize = 150;

async fn ledger(prefix: &str) -> (i64, i64) {
    let row = postgres_client()
        .await
        .query_one(
            "SELECT COUNT(*), COUNT(DISTINCT payment_id) FROM charge_ledger WHERE payment_id LIKE $1",
            &[&format!("{prefix}%")],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

#[tokio::test]
async fn killed_between_effect_and_ack_again_and_again_the_ledger_has_each_payment_once() {
    let dir = tempfile::tempdir().unwrap();
    let sandbox = Sandbox::new(dir.path()).unwrap();
    let bin = function_binary("charge-payment").unwrap();
    let prefix = format!("x1-{}-", uuid::Uuid::new_v4().simple());
    let settings = [
        "--set",
        "store.kind=postgres",
        "--set",
        &format!("store.url={}", postgres_url()),
        "--set",
        "app.ledger=postgres",
        "--set",
        &format!("queue=exactly-once-{}", uuid::Uuid::new_v4().simple()),
        // A crash leaves the record in progress until its lease ends: keep it short.
        "--set",
        "transport.lease=1s",
        "--set",
        "retry.base=100ms",
        "--set",
        "retry.max_deliveries=1000",
        "--set",
        "breaker.enabled=false",
    ];
    let with = |extra: &[&str]| -> Vec<String> {
        settings
            .iter()
            .chain(extra)
            .map(|s| s.to_string())
            .collect()
    };
    let body = format!(
        r#"{{"payment_id":"{prefix}{{{{seq}}}}","amount_cents":500,"currency":"EUR","customer":"c"}}"#
    );
    for _ in 0..2 {
        // Every payment twice: duplicates must be absorbed as well.
        let args = with(&["send", "--count", &PAYMENTS.to_string(), &body]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = sandbox
            .command(&bin, &args, "cli.log")
            .unwrap()
            .output()
            .unwrap();
        assert!(out.status.success(), "send: {out:?}");
    }

    let run = with(&["run", "--drain", "--set", "fault.crash_rate=0.08"]);
    let run: Vec<&str> = run.iter().map(String::as_str).collect();
    let mut crashes = 0;
    let mut finished: Option<ExitStatus> = None;
    for _ in 0..MAX_STARTS {
        let mut child = sandbox
            .command(&bin, &run, "worker.log")
            .unwrap()
            .spawn()
            .unwrap();
        let log = sandbox.dir.join("worker.log");
        let status = wait_exit(&mut child, Duration::from_secs(120), Some(&log)).await;
        if status.success() {
            finished = Some(status);
            break;
        }
        // SIGABRT from fault.crash_rate; anything else is a real failure.
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            status.signal(),
            Some(6),
            "worker failed otherwise: {status:?}; see worker.log"
        );
        crashes += 1;
    }
    assert!(
        finished.is_some(),
        "the queue was not drained within {MAX_STARTS} worker starts"
    );
    assert!(
        crashes >= 3,
        "the drill must crash the worker between effect and ack several times: {crashes}"
    );
    let (rows, distinct) = ledger(&prefix).await;
    eprintln!("{crashes} crashes between effect and ack; ledger: {rows} rows, {distinct} payments");
    assert_eq!(distinct, PAYMENTS as i64, "every payment charged");
    assert_eq!(
        rows, PAYMENTS as i64,
        "no payment charged twice after {crashes} crashes"
    );
}
