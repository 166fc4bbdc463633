//! The probe and metrics listener of `run` (container mode), on when `telemetry.listen` is
//! set: `GET /healthz` (liveness), `GET /readyz` (readiness) and `GET /metrics` (Prometheus
//! text exposition, version 0.0.4). docs/operations.md "Health and metrics" is the user's view.
//!
//! A hand-written HTTP/1.1 responder on a tokio `TcpListener` rather than hyper: hyper 1 is in
//! `Cargo.lock` only through the AWS SDK, so the default (embedded) and RabbitMQ builds would
//! link it for three fixed GET routes that kubelet and Prometheus call with one request per
//! connection. Each connection reads one request head (at most 8 KiB, 5 s), answers with
//! `Connection: close` and ends; nothing else of HTTP is needed here.
//!
//! Liveness is about the intake loop, not the handlers: the loop ticks on every turn, and
//! `/healthz` fails (503) once it has not ticked for a window longer than any wait the loop
//! takes legitimately (a receive long poll, a receive-error backoff, a rate-limit token),
//! unless every slot is busy (then the loop waits for a slot by design; slow handlers are the
//! handler timeout's business, not a reason to restart the pod). Readiness is "the transport
//! and store are open, the loop runs, and no shutdown was asked": at SIGTERM `/readyz` turns
//! 503 at once, while in-flight messages finish within `worker.shutdown_grace`.

use std::{
    fmt::Write as _,
    net::SocketAddr,
    sync::{atomic::Ordering::Relaxed, Arc},
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

use crate::{
    breaker::BreakerState,
    error::{Error, Result},
    telemetry::{health::Health, Metrics},
};

/// The largest request head read; probes and scrapers send a few hundred bytes.
const MAX_HEAD: usize = 8 * 1024;
/// How long a client may take to send its request head.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// The latency quantiles exported.
const QUANTILES: [f64; 3] = [0.5, 0.95, 0.99];

/// Binds `telemetry.listen` and serves the probes and metrics until the process exits.
/// Called before the transport and store are opened, so a pod is alive (not ready) while
/// they connect, and a port already in use fails at start naming the key.
pub async fn start(addr: SocketAddr, health: Arc<Health>) -> Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await.map_err(|e| {
        Error::Config(format!(
            "key `telemetry.listen`: cannot listen on {addr}: {e}"
        ))
    })?;
    let local = listener.local_addr()?;
    health.now_ms();
    tracing::info!(listen = %local, "serving /healthz, /readyz and /metrics");
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    let health = health.clone();
                    tokio::spawn(async move {
                        if let Err(e) = answer(stream, &health).await {
                            tracing::debug!(error = %e, "telemetry request failed");
                        }
                    });
                }
                // Out of file descriptors and the like: back off instead of spinning.
                Err(e) => {
                    tracing::warn!(error = %e, "telemetry accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
    Ok(local)
}

async fn answer(mut stream: TcpStream, health: &Health) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    let complete = tokio::time::timeout(READ_TIMEOUT, async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_HEAD {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&buf[..n]);
        }
        std::io::Result::Ok(())
    })
    .await;
    if !matches!(complete, Ok(Ok(()))) {
        return Ok(());
    }
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split(' ');
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let (status, content_type, body) = route(method, path, health);
    let reply = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(reply.as_bytes()).await?;
    if method != "HEAD" {
        stream.write_all(body.as_bytes()).await?;
    }
    stream.shutdown().await
}

fn route(method: &str, path: &str, health: &Health) -> (&'static str, &'static str, String) {
    const TEXT: &str = "text/plain; charset=utf-8";
    if method != "GET" && method != "HEAD" {
        return ("405 Method Not Allowed", TEXT, "GET only\n".into());
    }
    let status = |ok: bool| {
        if ok {
            "200 OK"
        } else {
            "503 Service Unavailable"
        }
    };
    match path {
        "/healthz" => {
            let (ok, why) = health.liveness();
            (status(ok), TEXT, why + "\n")
        }
        "/readyz" => {
            let (ok, why) = health.readiness();
            (status(ok), TEXT, format!("{why}\n"))
        }
        "/metrics" => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            metrics_text(health),
        ),
        _ => (
            "404 Not Found",
            TEXT,
            "try /healthz, /readyz or /metrics\n".into(),
        ),
    }
}

/// `/metrics`: the exposition text.
fn metrics_text(health: &Health) -> String {
    let mut out = String::new();
    let source = health.source();
    if let Some(s) = &source {
        render(s.function(), s.metrics(), s.breaker(), &mut out);
    }
    let ready = u8::from(health.readiness().0);
    let label = source
        .as_ref()
        .map(|s| format!("{{function=\"{}\"}}", escape(s.function())))
        .unwrap_or_default();
    metric(
        &mut out,
        "sluice_ready",
        "gauge",
        "1 when /readyz answers 200.",
    );
    let _ = writeln!(out, "sluice_ready{label} {ready}");
    out
}

fn metric(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// A label value in the exposition format: backslash, double quote and newline escaped.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The counters and gauges of telemetry.rs as `sluice_*` series labelled with the function.
fn render(function: &str, m: &Metrics, breaker: BreakerState, out: &mut String) {
    let f = escape(function);
    let s = m.summary();
    for (name, value, help) in [
        ("received", s.received, "Deliveries received."),
        (
            "succeeded",
            s.succeeded,
            "Handler succeeded and the message was acked.",
        ),
        (
            "retried",
            s.retried,
            "Sent back to the broker with a delay.",
        ),
        (
            "immediate_retries",
            s.immediate_retries,
            "In-slot retries of the handler.",
        ),
        ("dead_lettered", s.dead_lettered, "Dead-lettered messages."),
        (
            "duplicates_skipped",
            s.duplicates_skipped,
            "Duplicates whose stored result was replayed (handler not run).",
        ),
        ("panics", s.panics, "Handler panics caught."),
        ("released", s.released, "Returned to the queue at shutdown."),
    ] {
        let name = format!("sluice_{name}_total");
        metric(out, &name, "counter", help);
        let _ = writeln!(out, "{name}{{function=\"{f}\"}} {value}");
    }
    let name = "sluice_dead_lettered_by_reason_total";
    metric(out, name, "counter", "Dead-lettered messages by reason.");
    for (reason, n) in &s.dead_letter_reasons {
        let _ = writeln!(
            out,
            "{name}{{function=\"{f}\",reason=\"{}\"}} {n}",
            escape(reason)
        );
    }
    metric(
        out,
        "sluice_in_flight",
        "gauge",
        "Messages being worked now.",
    );
    let _ = writeln!(
        out,
        "sluice_in_flight{{function=\"{f}\"}} {}",
        m.in_flight.load(Relaxed)
    );
    let state = match breaker {
        BreakerState::Closed => 0,
        BreakerState::HalfOpen => 1,
        BreakerState::Open => 2,
    };
    metric(
        out,
        "sluice_breaker_state",
        "gauge",
        "Circuit breaker: 0 closed, 1 half-open, 2 open.",
    );
    let _ = writeln!(out, "sluice_breaker_state{{function=\"{f}\"}} {state}");
    let name = "sluice_latency_seconds";
    metric(
        out,
        name,
        "summary",
        "Receive-to-settle time of each delivery.",
    );
    let (count, sum, at) = m.latency(&QUANTILES);
    for (q, v) in QUANTILES.iter().zip(at) {
        let _ = writeln!(out, "{name}{{function=\"{f}\",quantile=\"{q}\"}} {v}");
    }
    let _ = writeln!(out, "{name}_sum{{function=\"{f}\"}} {sum}");
    let _ = writeln!(out, "{name}_count{{function=\"{f}\"}} {count}");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::inc;

    #[test]
    fn exposition_names_every_counter_with_the_function_label() {
        let m = Metrics::default();
        for _ in 0..3 {
            inc(&m.received);
        }
        inc(&m.succeeded);
        m.dead_letter_reason("poison \"x\"");
        m.observe(Duration::from_millis(20));
        let mut out = String::new();
        render("fn-a", &m, BreakerState::Open, &mut out);
        assert!(
            out.contains("sluice_received_total{function=\"fn-a\"} 3\n"),
            "{out}"
        );
        assert!(out.contains("sluice_succeeded_total{function=\"fn-a\"} 1\n"));
        assert!(out.contains("sluice_dead_lettered_total{function=\"fn-a\"} 1\n"));
        assert!(out.contains(
            "sluice_dead_lettered_by_reason_total{function=\"fn-a\",reason=\"poison \\\"x\\\"\"} 1\n"
        ));
        assert!(out.contains("sluice_breaker_state{function=\"fn-a\"} 2\n"));
        assert!(out.contains("sluice_latency_seconds_count{function=\"fn-a\"} 1\n"));
        let p50: f64 = out
            .lines()
            .find_map(|l| {
                l.strip_prefix("sluice_latency_seconds{function=\"fn-a\",quantile=\"0.5\"} ")
            })
            .unwrap()
            .parse()
            .unwrap();
        assert!((0.0199..0.0201).contains(&p50), "{p50}");
        // Every sample line belongs to a family announced by # TYPE before it.
        let mut typed = Vec::new();
        for line in out.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                typed.push(rest.split(' ').next().unwrap().to_owned());
            } else if !line.starts_with('#') {
                let name = line.split(['{', ' ']).next().unwrap();
                assert!(typed.iter().any(|t| name.starts_with(t.as_str())), "{line}");
            }
        }
    }

    #[test]
    fn listen_key_parses_and_a_bad_value_names_the_key() {
        let load = |v: &str| {
            crate::config::Settings::load(
                "fn-a",
                Some(&format!("[telemetry]\nlisten = \"{v}\"\n")),
                std::iter::empty(),
                &[],
            )
        };
        assert_eq!(load("").unwrap().telemetry.listen, None);
        assert_eq!(
            load("0.0.0.0:9090").unwrap().telemetry.listen,
            Some("0.0.0.0:9090".parse().unwrap())
        );
        let err = load("localhost").unwrap_err().to_string();
        assert!(err.contains("telemetry.listen"), "{err}");
    }
}
