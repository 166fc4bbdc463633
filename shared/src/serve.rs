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

use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

use crate::{
    error::{Error, Result},
    telemetry::{exposition, health::Health, Labels},
};

/// The largest request head read; probes and scrapers send a few hundred bytes.
const MAX_HEAD: usize = 8 * 1024;
/// How long a client may take to send its request head.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Binds `telemetry.listen` and serves the probes and metrics until the process exits.
/// Called before the transport and store are opened, so a pod is alive (not ready) while
/// they connect, and a port already in use fails at start naming the key. `labels` label
/// `sluice_ready`, which is answered before the worker (and its own series) exists.
pub async fn start(addr: SocketAddr, health: Arc<Health>, labels: Labels) -> Result<SocketAddr> {
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
                    let (health, labels) = (health.clone(), labels.clone());
                    tokio::spawn(async move {
                        if let Err(e) = answer(stream, &health, &labels).await {
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

async fn answer(mut stream: TcpStream, health: &Health, labels: &Labels) -> std::io::Result<()> {
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
    let (status, content_type, body) = route(method, path, health, labels);
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

fn route(
    method: &str,
    path: &str,
    health: &Health,
    labels: &Labels,
) -> (&'static str, &'static str, String) {
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
            metrics_text(health, labels),
        ),
        _ => (
            "404 Not Found",
            TEXT,
            "try /healthz, /readyz or /metrics\n".into(),
        ),
    }
}

/// `/metrics`: the exposition text (`telemetry/exposition.rs`).
fn metrics_text(health: &Health, labels: &Labels) -> String {
    let mut out = String::new();
    if let Some(s) = health.source() {
        exposition::render(s.metrics(), s.breaker(), &mut out);
    }
    exposition::render_ready(labels, health.readiness().0, &mut out);
    out
}

#[cfg(test)]
mod tests {
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
