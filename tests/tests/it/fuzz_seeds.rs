//! The fuzz targets' committed seeds (`fuzz/seeds/<target>/`) and what the fuzzer found
//! (`fuzz/regressions/<target>/`), run through the same entry points (`sluice::fuzzing`) in
//! the ordinary test build: a property a seed or an old finding breaks fails here, without
//! the instrumented build of `just fuzz`. (`lambda_event` needs sluice's `lambda` feature,
//! which the host test build leaves out: its seeds run in `just fuzz` only.)

use std::path::PathBuf;

fn inputs(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let root = sluice_tests::repo_root().join("fuzz");
    let mut out = Vec::new();
    for dir in ["seeds", "regressions"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir).join(target)) else {
            continue;
        };
        for e in entries {
            let path = e.expect("a directory entry").path();
            let bytes = std::fs::read(&path).expect("a seed");
            out.push((path, bytes));
        }
    }
    out
}

fn run(target: &str, f: fn(&[u8])) {
    let inputs = inputs(target);
    assert!(!inputs.is_empty(), "fuzz/seeds/{target} has seeds");
    for (path, bytes) in inputs {
        let caught = std::panic::catch_unwind(|| f(&bytes));
        assert!(caught.is_ok(), "{} breaks {target}", path.display());
    }
}

#[test]
fn envelope_seeds_hold() {
    run("envelope", sluice::fuzzing::envelope);
}

#[test]
fn config_toml_seeds_hold() {
    run("config_toml", sluice::fuzzing::config_toml);
}

#[test]
fn embedded_row_seeds_hold() {
    run("embedded_row", sluice::fuzzing::embedded_row);
}

#[cfg(feature = "rabbitmq")]
#[test]
fn amqp_headers_seeds_hold() {
    run("amqp_headers", sluice::fuzzing::amqp_headers);
}

#[cfg(feature = "sqs")]
#[test]
fn sqs_message_seeds_hold() {
    run("sqs_message", sluice::fuzzing::sqs_message);
}
