//! The incident drills (`just drill partition|auth|exhaustion`, tests/chaos/src/bin/drill.rs):
//! each reproduces its incident against the local RabbitMQ and PostgreSQL, runs the commands
//! of docs/runbook.md "Incidents" as written (a missing block fails the drill), recovers, and
//! exits 0 only if every payment was charged once and nothing was dead-lettered.

use std::process::Command;

use sluice_tests::function_binary;

fn drill(which: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(function_binary("drill").unwrap())
        .arg(which)
        .arg("--dir")
        .arg(dir.path().join("run"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "drill {which} exited with {}:\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("drill passed"), "{stdout}");
    stdout
}

#[test]
fn partition_drill_the_worker_rides_out_a_cut_broker_path_and_loses_nothing() {
    let out = drill("partition");
    assert!(
        out.contains("$ logs | grep -c 'could not connect to RabbitMQ'"),
        "{out}"
    );
    assert!(out.contains("dead-letter queue is empty"), "{out}");
}

#[test]
fn auth_drill_a_rotated_password_is_refused_named_and_fixed_by_the_new_secret() {
    let out = drill("auth");
    assert!(out.contains("refused the login"), "{out}");
    assert!(
        out.contains("Success"),
        "the new credentials authenticate: {out}"
    );
}

#[test]
fn exhaustion_drill_a_store_role_at_its_connection_limit_delays_but_loses_nothing() {
    let out = drill("exhaustion");
    assert!(
        out.contains("too many connections") || out.contains("rolconnlimit"),
        "{out}"
    );
    assert!(out.contains("ALTER ROLE"), "{out}");
}
