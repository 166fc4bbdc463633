//! The Sluice consumers of `bench rabbitmq`: the transport alone (receive + ack, no pipeline),
//! and the no-op function run in-process by the worker, with or without an idempotency store.

use std::{
    sync::{atomic::Ordering::Relaxed, Arc},
    time::{Duration, Instant},
};

use anyhow::bail;
use serde::Deserialize;
use sluice::{
    transport::{
        rabbitmq::{RabbitConfig, RabbitTransport},
        Transport, TransportOptions,
    },
    worker::RunOptions,
    CancellationToken, Context, Function, HandlerError, Settings,
};

use super::{
    options,
    procfs::{peak_rss_mb, reset_peak_rss},
    POLL, RUN_LIMIT,
};

/// What the Sluice handler decodes (the padding is ignored).
#[derive(Deserialize)]
struct Tick {
    t: u64,
}

async fn noop(input: Tick, _ctx: &Context) -> Result<(), HandlerError> {
    std::hint::black_box(input.t);
    Ok(())
}

/// The adapter without the pipeline: `receive` up to half the prefetch, ack them all at
/// once (the acks coalesce), again; shows what the transport costs apart from the worker.
pub(super) async fn transport_consume(
    url: &str,
    queue: &str,
    prefetch: u16,
    n: Option<u64>,
    stop: CancellationToken,
) -> anyhow::Result<(Duration, f64)> {
    reset_peak_rss();
    let config = RabbitConfig {
        prefetch,
        ..RabbitConfig::default()
    };
    // The topology was declared once before the rounds: this handle only checks it.
    let opts = TransportOptions {
        declare: false,
        ..options(queue, url)
    };
    let t = RabbitTransport::open_with(opts, config).await?;
    let started = Instant::now();
    let mut done = 0u64;
    while n.is_none_or(|n| done < n) && !stop.is_cancelled() {
        let got = t
            .receive(usize::from(prefetch / 2).max(1), Duration::from_millis(100))
            .await?;
        for r in futures_util::future::join_all(got.iter().map(|d| t.ack(d))).await {
            r?;
        }
        done += got.len() as u64;
    }
    Ok((started.elapsed(), peak_rss_mb()))
}

fn sluice_settings(
    url: &str,
    queue: &str,
    store: &str,
    concurrency: usize,
) -> anyhow::Result<Settings> {
    let (kind, store_url) = match store.split_once(':') {
        Some((kind, path)) => (kind, path),
        None => (store, "unused"),
    };
    Ok(Settings::load(
        "bench-noop",
        None,
        // `transport.prefetch` and `transport.declare`, set by `main`.
        std::env::vars(),
        &[
            format!("queue={queue}"),
            "transport.kind=rabbitmq".into(),
            format!("transport.url={url}"),
            format!("store.kind={kind}"),
            format!("store.url={store_url}"),
            format!("worker.concurrency={concurrency}"),
        ],
    )?)
}

/// Runs the no-op function in this process until `done` says so; returns the time from
/// starting the worker to then, and the peak RSS since it was built.
pub(super) async fn sluice_consume(
    url: &str,
    queue: &str,
    store: &str,
    concurrency: usize,
    started_consuming: impl FnOnce(),
    done: impl Fn(u64) -> bool,
) -> anyhow::Result<(Duration, f64)> {
    reset_peak_rss();
    let settings = sluice_settings(url, queue, store, concurrency)?;
    let rt = Arc::new(Function::new("bench-noop", noop).build(settings).await?);
    let stop = CancellationToken::new();
    let started = Instant::now();
    let worker = {
        let (rt, stop) = (rt.clone(), stop.clone());
        tokio::spawn(async move { rt.run(RunOptions::default(), stop).await })
    };
    started_consuming();
    let deadline = started + RUN_LIMIT;
    while !done(rt.metrics.succeeded.load(Relaxed)) {
        if Instant::now() > deadline || worker.is_finished() {
            stop.cancel();
            let ended = worker.await?;
            bail!("the Sluice worker did not finish in time ({ended:?})");
        }
        tokio::time::sleep(POLL).await;
    }
    let elapsed = started.elapsed();
    let rss = peak_rss_mb();
    stop.cancel();
    worker.await??;
    Ok((elapsed, rss))
}

pub(super) async fn sluice_drain(
    url: &str,
    queue: &str,
    store: &str,
    concurrency: usize,
    n: u64,
) -> anyhow::Result<(Duration, f64)> {
    sluice_consume(url, queue, store, concurrency, || {}, |acked| acked >= n).await
}
