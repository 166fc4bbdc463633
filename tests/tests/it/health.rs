//! `telemetry.listen`: charge-payment as a real process serving `/healthz`, `/readyz` and
//! `/metrics` (shared/src/serve.rs), as kubelet and Prometheus would call them: ready once the
//! queue is open, counters equal to what was processed, not ready from the moment SIGTERM
//! starts the drain, and a bad address refused at start with the key named.

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    path::Path,
    process::Stdio,
    time::Duration,
};

use sluice_tests::{function_binary, ledger_counts, Sandbox};

use crate::support::{free_port, metric_sample, poll_blocking, sigterm, KillOnDrop};

const BODY: &str =
    r#"{"payment_id":"h-{{seq}}","amount_cents":700,"currency":"EUR","customer":"c"}"#;
const DEADLINE: Duration = Duration::from_secs(60);

/// One GET; `None` when nothing listens (refused or reset).
fn get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").ok()?;
    let mut reply = String::new();
    s.read_to_string(&mut reply).ok()?;
    let (head, body) = reply.split_once("\r\n\r\n")?;
    let status = head.split(' ').nth(1)?.parse().ok()?;
    Some((status, body.to_owned()))
}

/// The labels every series of the worker carries. The version is charge-payment's crate
/// version (`Function::version`), which is the workspace's, as this crate's is.
const LABELS: [(&str, &str); 3] = [
    ("function", "charge-payment"),
    ("queue", "charge-payment"),
    ("version", env!("CARGO_PKG_VERSION")),
];

/// One sample of the worker's series, with `extra` labels beyond [`LABELS`].
fn sample(metrics: &str, name: &str, extra: &[(&str, &str)]) -> Option<f64> {
    let labels: Vec<(&str, &str)> = LABELS.iter().chain(extra).copied().collect();
    metric_sample(metrics, name, &labels)
}

fn counter(port: u16, name: &str, extra: &[(&str, &str)]) -> Option<f64> {
    let (status, body) = get(port, "/metrics")?;
    assert_eq!(status, 200, "{body}");
    sample(&body, name, extra)
}

const SUCCEEDED: [(&str, &str); 2] = [("outcome", "succeeded"), ("error_class", "none")];

fn send(sandbox: &Sandbox, bin: &Path, count: u32, first: u32) {
    let body = BODY.replace("{{seq}}", &format!("{first}-{{{{seq}}}}"));
    let out = sandbox
        .command(
            bin,
            &["send", "--count", &count.to_string(), &body],
            "cli.log",
        )
        .unwrap()
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
}

#[test]
fn probes_and_metrics_follow_the_worker_from_start_to_drain() {
    let dir = tempfile::tempdir().unwrap();
    let sandbox = Sandbox::new(dir.path()).unwrap();
    let bin = function_binary("charge-payment").unwrap();
    send(&sandbox, &bin, 5, 1);
    let port = free_port();
    let listen = format!("telemetry.listen=127.0.0.1:{port}");
    // Every gateway call takes 2 s, so messages are still in flight when SIGTERM lands, and
    // the grace (30 s) is long enough for them to finish.
    let mut worker = KillOnDrop(
        sandbox
            .spawn_worker(
                &bin,
                &[
                    "--set",
                    &listen,
                    "--set",
                    "transport.wait=100ms",
                    "--set",
                    "app.latency=2s",
                    "--set",
                    "worker.shutdown_grace=30s",
                ],
                "worker.log",
            )
            .unwrap(),
    );

    let ready = poll_blocking(DEADLINE, "/readyz 200", || {
        get(port, "/readyz").filter(|(status, _)| *status == 200)
    });
    assert_eq!(ready.1.trim(), "ready");
    let (status, body) = get(port, "/healthz").unwrap();
    assert_eq!((status, body.trim()), (200, "alive"));

    // The counters say exactly what happened: 5 received, 5 succeeded, nothing else.
    poll_blocking(DEADLINE, "5 messages settled", || {
        (counter(port, "sluice_messages_total", &SUCCEEDED)? == 5.0).then_some(())
    });
    let (_, metrics) = get(port, "/metrics").unwrap();
    let outcome = |o, c| [("outcome", o), ("error_class", c)];
    for (name, extra, want) in [
        ("sluice_received_total", &[][..], 5.0),
        ("sluice_messages_total", &SUCCEEDED[..], 5.0),
        (
            "sluice_messages_total",
            &outcome("retried", "transient")[..],
            0.0,
        ),
        (
            "sluice_messages_total",
            &outcome("dead_lettered", "permanent")[..],
            0.0,
        ),
        (
            "sluice_messages_total",
            &outcome("duplicate", "none")[..],
            0.0,
        ),
        ("sluice_in_flight", &[], 0.0),
        ("sluice_process_duration_seconds_count", &[], 5.0),
        ("sluice_handler_duration_seconds_count", &[], 5.0),
        ("sluice_ready", &[], 1.0),
    ] {
        let got = sample(&metrics, name, extra);
        assert_eq!(got, Some(want), "{name} {extra:?} in\n{metrics}");
    }
    assert!(
        metrics.contains("# TYPE sluice_messages_total counter\n"),
        "{metrics}"
    );
    // Each call slept 2 s in the gateway: no handler try and no delivery took 1 s or less.
    for name in [
        "sluice_handler_duration_seconds_bucket",
        "sluice_process_duration_seconds_bucket",
    ] {
        assert_eq!(
            sample(&metrics, name, &[("le", "1")]),
            Some(0.0),
            "{metrics}"
        );
        assert_eq!(
            sample(&metrics, name, &[("le", "+Inf")]),
            Some(5.0),
            "{metrics}"
        );
    }

    // Two more, caught in flight by SIGTERM: /readyz turns 503 while they finish.
    send(&sandbox, &bin, 2, 2);
    poll_blocking(DEADLINE, "both messages in flight", || {
        (counter(port, "sluice_in_flight", &[])? == 2.0).then_some(())
    });
    sigterm(&worker.0);
    let (status, body) = poll_blocking(DEADLINE, "/readyz 503 after SIGTERM", || {
        get(port, "/readyz").filter(|(status, _)| *status != 200)
    });
    assert_eq!((status, body.trim()), (503, "draining"));
    // Still alive while draining: kubelet must not restart a pod that is shutting down well.
    let (status, _) = get(port, "/healthz").unwrap();
    assert_eq!(status, 200);
    assert_eq!(
        counter(port, "sluice_ready", &[]),
        Some(0.0),
        "sluice_ready follows /readyz"
    );

    let status = poll_blocking(DEADLINE, "the worker to exit", || {
        worker.0.try_wait().unwrap()
    });
    assert!(status.success(), "graceful exit: {status:?}");
    assert_eq!(ledger_counts(&sandbox.ledger_db()).unwrap().charges, 7);
    assert!(
        get(port, "/readyz").is_none(),
        "the listener closes with the process"
    );
}

#[test]
fn a_bad_listen_address_or_a_busy_port_exits_2_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let sandbox = Sandbox::new(dir.path()).unwrap();
    let bin = function_binary("charge-payment").unwrap();
    let busy = TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = format!("telemetry.listen={}", busy.local_addr().unwrap());
    for listen in [
        "telemetry.listen=localhost:9090",
        "telemetry.listen=9090",
        &busy,
    ] {
        let out = sandbox
            .command(&bin, &["run", "--set", listen], "cli.log")
            .unwrap()
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{listen}: {stderr}");
        assert!(stderr.contains("telemetry.listen"), "{listen}: {stderr}");
    }
    // The environment variable form is checked the same way.
    let out = sandbox
        .command(&bin, &["run"], "cli.log")
        .unwrap()
        .env("SLUICE__TELEMETRY__LISTEN", "not an address")
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("telemetry.listen"), "{stderr}");
}
