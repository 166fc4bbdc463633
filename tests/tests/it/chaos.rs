//! The short form of `just chaos` on each transport: the harness binary (tests/chaos) runs
//! charge-payment exactly-once with 2 workers for about 15 s of SIGKILLs, broker and store
//! cuts and a store outage, and its JSON report must show nothing lost, nothing charged
//! twice, every poison message dead-lettered, and that the faults did happen.

use std::process::Command;

use sluice_tests::function_binary;

/// Runs `chaos <transport> --json` in its own directory and returns its report.
fn chaos(transport: &str) -> serde_json::Value {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(function_binary("chaos").unwrap())
        .args([
            transport,
            "--messages",
            "300",
            "--workers",
            "2",
            "--duration",
            "15",
            "--kill-every",
            "2.5",
            "--cut-every",
            "2",
            "--json",
            "--dir",
        ])
        .arg(dir.path().join("run"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "no JSON report ({e}): {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert!(
        out.status.success(),
        "chaos {transport} exited with {}: {report}",
        out.status
    );
    report
}

fn assert_nothing_lost_nothing_twice(r: &serde_json::Value, broker_cuts: bool) {
    assert_eq!(r["sent"], 300, "{r}");
    assert_eq!(r["lost"], 0, "{r}");
    assert_eq!(r["charged_twice"], 0, "{r}");
    assert_eq!(r["poison_charged"], 0, "{r}");
    assert!(r["poison"].as_u64().unwrap() > 0, "the mix has poison: {r}");
    assert_eq!(r["dead_lettered"], r["poison"], "{r}");
    assert_eq!(r["charged"], r["distinct"], "{r}");
    assert!(
        r["kills"].as_u64().unwrap() >= 3,
        "workers were killed: {r}"
    );
    // Cuts alternate broker and store where there is a broker connection to cut.
    let min_cuts = if broker_cuts { 4 } else { 2 };
    assert!(
        r["cuts"].as_u64().unwrap() >= min_cuts,
        "connections were cut: {r}"
    );
    assert!(
        r["store_down_s"].as_f64().unwrap() >= 2.0,
        "the store was held down: {r}"
    );
}

#[test]
fn embedded_under_kills_and_store_cuts_loses_nothing_and_charges_nothing_twice() {
    assert_nothing_lost_nothing_twice(&chaos("embedded"), false);
}

#[cfg(feature = "rabbitmq")]
#[test]
fn rabbitmq_under_kills_and_broker_and_store_cuts_loses_nothing_and_charges_nothing_twice() {
    assert_nothing_lost_nothing_twice(&chaos("rabbitmq"), true);
}

#[cfg(feature = "sqs")]
#[test]
fn sqs_under_kills_and_broker_and_store_cuts_loses_nothing_and_charges_nothing_twice() {
    sluice_tests::moto("SQS");
    assert_nothing_lost_nothing_twice(&chaos("sqs"), true);
}
