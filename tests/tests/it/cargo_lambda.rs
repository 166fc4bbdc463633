//! The Lambda build of charge-payment invoked through cargo-lambda's emulator, with the event
//! fixtures under tests/fixtures/: `cargo lambda watch --only-lambda-apis` serves the Runtime
//! API (no rebuild: the prebuilt binary is started against its `/.rt`), `cargo lambda invoke
//! --data-file` sends the events.
//!
//! Needs cargo-lambda (`scripts/lambda.sh install`, into the venv of scripts/moto.sh), moto
//! (the function opens its SQS queue at start) and the Lambda build (see lambda_mode.rs).

use std::{
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::Duration,
};

use sluice::conformance::unique;
use sluice_tests::{fixture, lambda::lambda_binary, ledger_counts};

use crate::support::{free_port, poll_blocking, KillOnDrop};

fn cargo_lambda() -> PathBuf {
    let bin = sluice_tests::venv_dir().join("bin/cargo-lambda");
    assert!(
        bin.exists(),
        "{} is missing: install it with scripts/lambda.sh install (or `just emulators`)",
        bin.display()
    );
    bin
}

fn invoke(cl: &Path, port: u16, file: &Path) -> Output {
    // Long flags only (`-A` means two things); the function of `--only-lambda-apis` is `_`.
    Command::new(cl)
        .args(["lambda", "invoke", "_", "--data-file"])
        .arg(file)
        .args(["--invoke-address", "127.0.0.1", "--invoke-port"])
        .arg(port.to_string())
        .args(["--output-format", "json"])
        .output()
        .expect("cargo lambda invoke")
}

#[test]
fn the_function_answers_sqs_fixtures_through_cargo_lambda() {
    sluice_tests::moto("SQS");
    let cl = cargo_lambda();
    let bin = lambda_binary("charge-payment").expect("lambda build");
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let venv_bin = cl.parent().unwrap().to_owned();
    let _watch = KillOnDrop(
        Command::new(&cl)
            .args([
                "lambda",
                "watch",
                "--only-lambda-apis",
                "--invoke-address",
                "127.0.0.1",
            ])
            .args(["--invoke-port", &port.to_string()])
            .env(
                "PATH",
                format!(
                    "{}:{}",
                    venv_bin.display(),
                    std::env::var("PATH").unwrap_or_default()
                ),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("watch.log")).unwrap())
            .spawn()
            .expect("cargo lambda watch"),
    );
    poll_blocking(
        Duration::from_secs(20),
        "cargo lambda watch to listen",
        || TcpStream::connect(("127.0.0.1", port)).ok(),
    );
    let _function = KillOnDrop(
        Command::new(&bin)
            .env(
                "AWS_LAMBDA_RUNTIME_API",
                format!("http://127.0.0.1:{port}/.rt"),
            )
            .env("AWS_LAMBDA_FUNCTION_NAME", "charge-payment")
            .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "128")
            .env("AWS_LAMBDA_FUNCTION_VERSION", "1")
            .env("SLUICE__TRANSPORT__KIND", "sqs")
            .env("SLUICE__TRANSPORT__URL", unique("cl"))
            .env("SLUICE__STORE__URL", dir.path().join("idempotency.db"))
            .env("SLUICE__APP__LEDGER", dir.path().join("ledger.db"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("function.log")).unwrap())
            .spawn()
            .expect("start the function"),
    );
    let logs = || {
        format!(
            "watch: {}\nfunction: {}",
            std::fs::read_to_string(dir.path().join("watch.log")).unwrap_or_default(),
            std::fs::read_to_string(dir.path().join("function.log")).unwrap_or_default()
        )
    };

    // Two good records (their receipt handles are never used: success is reported, the
    // trigger deletes).
    let out = invoke(&cl, port, &fixture("sqs-event.json"));
    assert!(out.status.success(), "{out:?}\n{}", logs());
    let response: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON response");
    assert_eq!(response, serde_json::json!({ "batchItemFailures": [] }));
    assert_eq!(
        ledger_counts(&dir.path().join("ledger.db"))
            .unwrap()
            .charges,
        2
    );

    // Not an SQS event: the invocation fails with a clear error...
    let out = invoke(&cl, port, &fixture("not-sqs-event.json"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("not an SQS event"), "{text}\n{}", logs());

    // ...and the same process serves the next one; the replayed batch charges nothing more.
    let out = invoke(&cl, port, &fixture("sqs-event.json"));
    assert!(out.status.success(), "{out:?}\n{}", logs());
    assert_eq!(
        ledger_counts(&dir.path().join("ledger.db"))
            .unwrap()
            .charges,
        2
    );
}
