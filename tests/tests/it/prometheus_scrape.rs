//! A real Prometheus (Debian's package, `scripts/prometheus.sh`) scraping a running
//! charge-payment worker (`telemetry.listen`), with infra/prometheus/alerts.yml loaded as its
//! rule file: through Prometheus's HTTP API, the counters equal what was sent (good messages,
//! poison and duplicates, by outcome and error class), `histogram_quantile` over the duration
//! buckets answers, the polled queue gauges follow the queue, and every Grafana dashboard
//! query answers with data (scripts/grafana-queries.py). The worker's `/metrics` passes
//! `promtool check metrics` too.
//!
//! `just test` installs Prometheus first (scripts/infra-check.sh); run alone, the script
//! installs it (apt-get, root or sudo) when it is missing.

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use serde_json::Value;
use sluice_tests::repo_root;

use crate::support::{free_port, poll_blocking, FunctionRun, KillOnDrop, CHARGE_TEMPLATE};

const FUNCTION: &str = "charge-payment";
/// The `telemetry.version` the worker runs with (the deploy sets it to the image tag).
const VERSION: &str = "9.9.9-scrape";
const GOOD: u64 = 20;
const POISON: u64 = 3;
/// Payments sent a second time once the first copies are done: answered from the record.
const DUPLICATES: u64 = 4;
const DEADLINE: Duration = Duration::from_secs(90);

/// A path from `scripts/prometheus.sh path <binary>` (which installs the package when the
/// binaries are missing).
fn binary(name: &str) -> PathBuf {
    let out = Command::new(repo_root().join("scripts/prometheus.sh"))
        .args(["path", name])
        .stderr(Stdio::inherit())
        .output()
        .expect("run scripts/prometheus.sh");
    assert!(
        out.status.success(),
        "scripts/prometheus.sh path {name}: {out:?}"
    );
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

/// One GET over HTTP/1.0 (so the answer is never chunked); the status and the body.
fn get(port: u16, target: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(s, "GET {target} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut reply = String::new();
    s.read_to_string(&mut reply).ok()?;
    let (head, body) = reply.split_once("\r\n\r\n")?;
    let status = head.split(' ').nth(1)?.parse().ok()?;
    Some((status, body.to_owned()))
}

/// Percent-encodes a query parameter.
fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A Prometheus server of this test, on a free loopback port, scraping one target every
/// second and evaluating the rules every second.
struct Prometheus {
    port: u16,
    _process: KillOnDrop,
}

impl Prometheus {
    fn start(dir: &Path, target: u16) -> Self {
        let rules = repo_root().join("infra/prometheus/alerts.yml");
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 rule_files:\n  - {rules:?}\n\
                 scrape_configs:\n  - job_name: {FUNCTION}\n    static_configs:\n\
                 \x20     - targets: ['127.0.0.1:{target}']\n"
            ),
        )
        .unwrap();
        let port = free_port();
        let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
        let process = Command::new(binary("prometheus"))
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start prometheus");
        let p = Self {
            port,
            _process: KillOnDrop(process),
        };
        poll_blocking(DEADLINE, "prometheus to be ready", || {
            get(port, "/-/ready").filter(|(status, _)| *status == 200)
        });
        p
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// An instant query's result vector; panics on an error answer.
    fn query(&self, expr: &str) -> Vec<Value> {
        let (status, body) = get(self.port, &format!("/api/v1/query?query={}", encode(expr)))
            .expect("prometheus answers");
        let v: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{body}: {e}"));
        assert_eq!(
            (status, &v["status"]),
            (200, &Value::from("success")),
            "{expr}: {body}"
        );
        v["data"]["result"].as_array().cloned().unwrap_or_default()
    }

    /// The value of a query that answers one sample (`None` when it answers none).
    fn value(&self, expr: &str) -> Option<f64> {
        let result = self.query(expr);
        assert!(result.len() <= 1, "{expr} answered {result:?}");
        result.first()?["value"][1].as_str()?.parse().ok()
    }
}

/// The worker's series, as a PromQL selector with `extra` matchers.
fn series(name: &str, extra: &str) -> String {
    format!("{name}{{function=\"{FUNCTION}\",queue=\"{FUNCTION}\",version=\"{VERSION}\"{extra}}}")
}

fn settled(p: &Prometheus, outcome: &str, class: &str) -> Option<f64> {
    p.value(&format!(
        "sum({})",
        series(
            "sluice_messages_total",
            &format!(",outcome=\"{outcome}\",error_class=\"{class}\"")
        )
    ))
}

#[test]
fn prometheus_sees_what_was_sent_and_every_dashboard_query_answers() {
    let metrics_port = free_port();
    let run = FunctionRun::new(FUNCTION)
        .set(format!("telemetry.listen=127.0.0.1:{metrics_port}"))
        .set(format!("telemetry.version={VERSION}"))
        .set("telemetry.queue_poll_interval=1s")
        .set("transport.wait=100ms")
        // Every handler try takes at least 50 ms: a lower bound the quantiles must respect.
        .set("app.latency=50ms");
    let _worker = KillOnDrop(run.worker(&[], "worker.log"));
    let prometheus = Prometheus::start(&run.sandbox.dir, metrics_port);

    // Scraped before anything is sent, with every counter at 0, so that rate() and
    // increase() see each message arrive.
    poll_blocking(DEADLINE, "a first scrape with the counters at 0", || {
        (settled(&prometheus, "succeeded", "none")? == 0.0).then_some(())
    });
    run.cli(&["send", "--count", &GOOD.to_string(), CHARGE_TEMPLATE]);
    run.cli(&["send", "--count", &POISON.to_string(), "not json {{seq}}"]);
    poll_blocking(DEADLINE, "the first messages settled, as scraped", || {
        (settled(&prometheus, "succeeded", "none")? == GOOD as f64
            && settled(&prometheus, "dead_lettered", "permanent")? == POISON as f64)
            .then_some(())
    });
    // pay-1 .. pay-4 again: each answered from its completed record.
    run.cli(&["send", "--count", &DUPLICATES.to_string(), CHARGE_TEMPLATE]);
    poll_blocking(DEADLINE, "the duplicates settled, as scraped", || {
        (settled(&prometheus, "duplicate", "none")? == DUPLICATES as f64).then_some(())
    });

    // Every (outcome, error class) the worker counts, exactly.
    let by_outcome: BTreeMap<(String, String), f64> = prometheus
        .query(&format!(
            "sum by (outcome, error_class) ({})",
            series("sluice_messages_total", "")
        ))
        .iter()
        .map(|s| {
            let key = (
                s["metric"]["outcome"].as_str().unwrap().to_owned(),
                s["metric"]["error_class"].as_str().unwrap().to_owned(),
            );
            (key, s["value"][1].as_str().unwrap().parse().unwrap())
        })
        .collect();
    let want: BTreeMap<(String, String), f64> = [
        ("succeeded", "none", GOOD),
        ("duplicate", "none", DUPLICATES),
        ("retried", "transient", 0),
        ("retried", "retry_after", 0),
        ("dead_lettered", "transient", 0),
        ("dead_lettered", "permanent", POISON),
        ("released", "none", 0),
    ]
    .into_iter()
    .map(|(o, c, n)| ((o.to_owned(), c.to_owned()), n as f64))
    .collect();
    assert_eq!(by_outcome, want);
    assert_eq!(
        prometheus.value(&format!("sum({})", series("sluice_received_total", ""))),
        Some((GOOD + POISON + DUPLICATES) as f64)
    );
    assert_eq!(
        prometheus.value(&format!(
            "sum({})",
            series(
                "sluice_dead_lettered_by_reason_total",
                ",reason=\"malformed JSON\""
            )
        )),
        Some(POISON as f64)
    );
    assert_eq!(run.ledger().charges, GOOD, "each payment charged once");

    // The polled queue gauges: nothing left to work, the poison in the DLQ, no age.
    poll_blocking(DEADLINE, "the queue gauges to follow the queue", || {
        let state = |s: &str| {
            prometheus.value(&series("sluice_queue_messages", &format!(",state=\"{s}\"")))
        };
        (state("dead_lettered")? == POISON as f64 && state("ready")? == 0.0).then_some(())
    });
    assert_eq!(
        prometheus.value(&series("sluice_queue_oldest_age_seconds", "")),
        Some(0.0)
    );
    assert_eq!(
        prometheus.value(&series(
            "sluice_build_info",
            &format!(",sluice_version=\"{}\"", env!("CARGO_PKG_VERSION"))
        )),
        Some(1.0)
    );

    // The quantiles answer a number of seconds, no lower than the 50 ms every try slept.
    for (histogram, window) in [
        ("sluice_handler_duration_seconds_bucket", "1m"),
        ("sluice_process_duration_seconds_bucket", "1m"),
    ] {
        let expr = format!(
            "histogram_quantile(0.95, sum by (le) (rate({}[{window}])))",
            series(histogram, "")
        );
        let p95 = prometheus
            .value(&expr)
            .unwrap_or_else(|| panic!("{expr}: no answer"));
        assert!(p95.is_finite() && p95 >= 0.05, "{expr} = {p95}");
    }

    // The recording rules the dashboard reads, evaluated over what was scraped.
    poll_blocking(DEADLINE, "the recording rules to have results", || {
        [
            "sluice:slo_errors:ratio_rate5m",
            "sluice:slo_errors:ratio_rate3d",
            "sluice:process_duration_seconds:p95_rate5m",
            "sluice:queue_oldest_age_seconds:max",
            "sluice:queue_dead_lettered:max",
        ]
        .iter()
        .all(|rule| {
            !prometheus
                .query(&format!("{rule}{{function=\"{FUNCTION}\"}}"))
                .is_empty()
        })
        .then_some(())
    });
    assert_eq!(
        prometheus.value(&format!(
            "sluice:slo_errors:ratio_rate5m{{function=\"{FUNCTION}\"}}"
        )),
        Some(0.0),
        "bad input is the producer's error, not the service's"
    );

    let out = Command::new("python3")
        .arg(repo_root().join("scripts/grafana-queries.py"))
        .args([
            "run",
            "--prometheus",
            &prometheus.url(),
            "--function",
            FUNCTION,
        ])
        .args(["--rate-interval", "1m", "--require-data"])
        .output()
        .expect("run scripts/grafana-queries.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "a dashboard query failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary = stdout.lines().last().unwrap_or_default();
    assert!(summary.ends_with("queries answered with data"), "{summary}");

    // The exposition itself passes Prometheus's own linter.
    let (status, metrics) = get(metrics_port, "/metrics").expect("/metrics");
    assert_eq!(status, 200);
    let mut promtool = Command::new(binary("promtool"))
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start promtool");
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(metrics.as_bytes())
        .unwrap();
    let lint = promtool.wait_with_output().unwrap();
    assert!(
        lint.status.success() && lint.stdout.is_empty() && lint.stderr.is_empty(),
        "promtool check metrics: {lint:?}\n{metrics}"
    );
}
