//! The local event source mapping (`local-esm`) end to end on moto with the Lambda build of
//! charge-payment: partial failures retried, poison in the DLQ with its history, the queue's
//! `maxReceiveCount` catching a function that dies on a record, and never a double charge.
//!
//! Needs moto (`eval "$(scripts/moto.sh start)"`) and the Lambda build (see lambda_mode.rs).

use std::{path::Path, process::Command, time::Duration};

use sluice::{
    conformance::unique,
    message::FailureClass,
    transport::{sqs::SqsTransport, Transport, TransportOptions},
};
use sluice_tests::{charge_body, lambda::lambda_binary, ledger_counts};

async fn queue(name: &str, max_receive: u32) -> SqsTransport {
    sluice_tests::moto("SQS");
    SqsTransport::open(TransportOptions {
        queue: name.into(),
        function: "charge-payment".into(),
        url: name.into(),
        // The queue's visibility timeout: how long a reported failure or a crashed batch
        // stays hidden before the mapping receives it again.
        lease: Duration::from_secs(1),
        max_deliveries: max_receive,
        poll_interval: Duration::from_millis(100),
        // The test's own queue: created on first use.
        declare: true,
    })
    .await
    .expect("provision on moto")
}

async fn send(q: &SqsTransport, body: &str, group: Option<&str>) {
    use sluice::message::OutgoingMessage;
    let mut m = OutgoingMessage::new(body.as_bytes().to_vec());
    if let Some(g) = group {
        m = m.header(sluice::transport::sqs::GROUP_ID_HEADER, g);
    }
    q.publish(vec![m]).await.expect("send");
}

/// Runs local-esm until the queue is drained; returns its JSON summary.
fn run_esm(queue: &str, dir: &Path, env: &[&str]) -> serde_json::Value {
    lambda_binary("charge-payment").expect("lambda build of charge-payment");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_local-esm"));
    cmd.args(["--function", "charge-payment", "--queue", queue, "--drain"])
        .args(["--max-time", "120s", "--timeout", "20s"])
        .arg("--log")
        .arg(dir.join("lambda.log"));
    let mut all = vec![
        "SLUICE__TRANSPORT__KIND=sqs".to_owned(),
        format!("SLUICE__TRANSPORT__URL={queue}"),
        format!(
            "SLUICE__STORE__URL={}",
            dir.join("idempotency.db").display()
        ),
        format!("SLUICE__APP__LEDGER={}", dir.join("ledger.db").display()),
        "SLUICE__RETRY__IMMEDIATE=0".to_owned(),
        "SLUICE__RETRY__BASE=1s".to_owned(),
        "SLUICE__RETRY__CAP=2s".to_owned(),
    ];
    all.extend(env.iter().map(|s| s.to_string()));
    for kv in &all {
        cmd.args(["--env", kv]);
    }
    let out = cmd.output().expect("run local-esm");
    let log = std::fs::read_to_string(dir.join("lambda.log")).unwrap_or_default();
    assert!(
        out.status.success(),
        "local-esm failed: {}\nfunction log: {log}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "summary: {e}: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

async fn partial_failures_and_poison(fifo: bool) {
    let name = if fifo {
        format!("{}.fifo", unique("esm"))
    } else {
        unique("esm")
    };
    // maxReceiveCount 10: on a FIFO queue a failure also sends the rest of its group back
    // unrun, which counts as a receive for each of them.
    let q = queue(&name, 10).await;
    let dir = tempfile::tempdir().unwrap();
    for i in 0..15u64 {
        let group = format!("g{i}");
        send(
            &q,
            &charge_body(&format!("esm-{i}"), 100 + i),
            fifo.then_some(group.as_str()),
        )
        .await;
    }
    // Sent twice by the producer (a FIFO queue may drop the second as a duplicate), and two
    // poison bodies.
    send(&q, &charge_body("esm-3", 103), fifo.then_some("g3")).await;
    send(&q, &charge_body("esm-7", 107), fifo.then_some("g7")).await;
    send(&q, "not json {", fifo.then_some("p1")).await;
    send(&q, "{\"payment_id\": 42}", fifo.then_some("p2")).await;

    // The circuit breaker would open at this failure rate and hold everything back for its
    // cool-down: not what this test is about.
    let summary = run_esm(
        &name,
        dir.path(),
        &[
            "SLUICE__APP__FAILURE_RATE=0.4",
            "SLUICE__BREAKER__ENABLED=false",
        ],
    );
    let l = ledger_counts(&dir.path().join("ledger.db")).unwrap();
    assert_eq!(
        (l.charges, l.distinct_payments),
        (15, 15),
        "every payment charged exactly once; summary {summary}"
    );
    let dead = q.dlq_list(20).await.expect("dlq");
    let mut bodies: Vec<String> = dead.iter().filter_map(|d| d.body.clone()).collect();
    bodies.sort();
    assert_eq!(
        bodies,
        vec!["not json {", "{\"payment_id\": 42}"],
        "{dead:?}"
    );
    assert!(dead.iter().all(|d| d.error_class == FailureClass::Permanent
        && d.function == "charge-payment"
        && !d.last_error.is_empty()));
    assert!(q.stats().await.unwrap().is_drained());
    if fifo {
        // Failures are reported and come back after their delay; on a standard queue they
        // are replaced by delayed copies (nothing reported).
        assert!(
            summary["reported_failed"].as_u64().unwrap() > 0,
            "{summary}"
        );
    }
    assert!(summary["batches"].as_u64().unwrap() >= 2, "{summary}");
}

#[tokio::test]
async fn standard_queue_partial_failures_retried_poison_dead_lettered_charged_once() {
    partial_failures_and_poison(false).await;
}

#[tokio::test]
async fn fifo_queue_partial_failures_retried_poison_dead_lettered_charged_once() {
    partial_failures_and_poison(true).await;
}

#[tokio::test]
async fn a_record_that_kills_the_function_goes_to_the_dlq_by_max_receive_count() {
    // fault.crash_rate = 1: the process aborts after each charge, before recording it (the
    // crash between an effect and its ack). The invocation dies with it; the mapping restarts
    // the function and leaves the batch to its visibility timeout. A FIFO queue keeps the
    // original message (a standard queue would turn the next delivery, which finds the claim
    // still held, into a delayed copy with a fresh receive count), so the receive count grows
    // until the crash-loop guard (maxReceiveCount 2) moves it to the DLQ.
    let name = format!("{}.fifo", unique("esm-crash"));
    let q = queue(&name, 2).await;
    let dir = tempfile::tempdir().unwrap();
    send(&q, &charge_body("crash-1", 100), Some("g")).await;
    let summary = run_esm(&name, dir.path(), &["SLUICE__FAULT__CRASH_RATE=1"]);
    let dead = q.dlq_list(10).await.expect("dlq");
    assert_eq!(dead.len(), 1, "{dead:?} {summary}");
    assert_eq!(
        dead[0].error_class,
        FailureClass::CrashLoop,
        "{dead:?} {summary}"
    );
    assert!(summary["restarts"].as_u64().unwrap() >= 1, "{summary}");
    let l = ledger_counts(&dir.path().join("ledger.db")).unwrap();
    assert_eq!(l.charges, 1, "charged once however often it ran");
}
