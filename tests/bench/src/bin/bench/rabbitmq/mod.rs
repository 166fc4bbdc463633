//! `just bench rabbitmq`: the Sluice pipeline on RabbitMQ against the fastest raw lapin
//! consume+ack loop, in one run on the same broker. `--json` prints one object
//! (`raw_msgs_per_s`, `sluice_msgs_per_s`, `ratio`, `p99_ms`, `peak_rss_mb`, ...).
//!
//! Every consumer works the same quorum queue (the topology `provision` declares, so the
//! queue type is the one Sluice uses), with the same prefetch, the same persistent 200-byte
//! messages (a JSON body whose `t` is the publish time in microseconds), on the same tokio
//! runtime (two worker threads here, as in a function binary):
//!
//! - **raw**: one lapin consumer that acks with `multiple = true` after at most `--ack-batch`
//!   deliveries, or as soon as no further delivery is waiting (so it never sits on acks when
//!   idle); it does not even read the body.
//! - **Sluice no-op**: a [`Function`](sluice::Function) whose handler decodes the body and
//!   returns, built and run in-process (`Runtime::run`) with `store.kind = none`, concurrency
//!   `prefetch / 2` (DESIGN: prefetch = concurrency x 2), logs as a container writes them
//!   (JSON, `info`).
//! - **Sluice no-op + SQLite**: the same with the SQLite idempotency store (a fresh file a run).
//! - **Sluice no-op, traced**: the no-op with its spans exported over OTLP/HTTP (feature
//!   `otlp`) to a receiver in this process ([`sink`]): the cost of trace export, next to the
//!   no-op without it in the same run. Throughput only (its latency run would not export).
//!
//! Throughput: `--messages` are published (with confirms) before each run, then drained by the
//! consumer in a child process of its own (this binary's hidden `rabbitmq-drain`); the clock
//! runs from starting the consumer to the last ack. Runs are interleaved over `--rounds`
//! rounds and the median is reported. Peak RSS is the child's `VmHWM` when it has drained; CPU
//! time per message is the child's (lapin's I/O thread included) and the broker's (`beam.smp`)
//! over the drain.
//!
//! Latency: a separate run per consumer while messages are published at `--latency-rate`, so
//! that the figure is the pipeline's and not the time spent waiting behind a backlog. It is
//! measured on the wire, the same way for every consumer: the consumer connects through
//! [`AckProxy`], which reads the AMQP frames passing through it, keeps the `t` of every
//! delivery, and on every `basic.ack` (single or multiple) records now - `t` for each delivery
//! it covers. The proxy adds one local hop to every consumer alike.

mod pipeline;
mod procfs;
mod proxy;
mod raw;
mod report;
mod sink;

use std::{
    collections::BTreeMap,
    sync::atomic::Ordering::Relaxed,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{bail, Context as _};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use sluice::{
    config::{LogFormat, TelemetrySettings},
    telemetry::init_logging,
    transport::{
        rabbitmq::{RabbitConfig, RabbitTransport},
        Transport, TransportOptions,
    },
    CancellationToken,
};

use pipeline::{sluice_consume, sluice_drain, transport_consume};
use procfs::{cpu_seconds, CpuClock};
use proxy::AckProxy;
use raw::{raw_consume, Publisher};
use report::{median, print, Figures, Report};

/// The message size every consumer gets.
const BODY_BYTES: usize = 200;
/// Messages published per round of publisher confirms while filling the backlog.
const CONFIRM_WINDOW: usize = 1_000;
/// Longest any one run may take before the bench gives up.
const RUN_LIMIT: Duration = Duration::from_secs(600);
/// How often a run's progress is looked at (Sluice's success counter, the proxy's acks).
const POLL: Duration = Duration::from_millis(2);

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Messages per throughput run (published first, then drained).
    #[arg(long, default_value_t = 50_000)]
    pub messages: u64,
    /// Prefetch of every consumer.
    #[arg(long, default_value_t = 200)]
    pub prefetch: u16,
    /// Sluice's worker.concurrency (default: prefetch / 2).
    #[arg(long)]
    pub concurrency: Option<usize>,
    /// Raw loop: ack (multiple) after at most this many deliveries; below the prefetch.
    #[arg(long, default_value_t = 50)]
    pub ack_batch: u64,
    /// Throughput runs per consumer, interleaved; the median is reported.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Latency runs: messages per second published while the consumer works.
    #[arg(long, default_value_t = 2_000)]
    pub latency_rate: u64,
    /// Latency runs: seconds of publishing.
    #[arg(long, default_value_t = 5)]
    pub latency_secs: u64,
    /// Only these consumers (raw, noop, sqlite; default: all). Ratios need raw.
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    /// Skip the latency runs.
    #[arg(long)]
    pub no_latency: bool,
    /// Log level of the Sluice worker (JSON on stderr, as in a container).
    #[arg(long, default_value = "info")]
    pub log_level: String,
    /// Print one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
}

/// One drain, in a child process (see [`drain_child`]).
#[derive(clap::Args, Debug)]
pub struct DrainArgs {
    #[arg(long)]
    kind: String,
    #[arg(long)]
    url: String,
    #[arg(long)]
    queue: String,
    #[arg(long)]
    messages: u64,
    #[arg(long)]
    pub prefetch: u16,
    #[arg(long)]
    ack_batch: u64,
    #[arg(long)]
    concurrency: usize,
    #[arg(long)]
    store: String,
    #[arg(long)]
    log_level: String,
    /// The traced consumer's OTLP endpoint.
    #[arg(long, default_value = "")]
    otlp_endpoint: String,
}

/// What a drain child reports.
#[derive(Debug, Serialize, Deserialize)]
struct Drained {
    elapsed_s: f64,
    peak_rss_mb: f64,
    cpu_s: f64,
}

/// The child side: drains `messages` with one consumer and prints [`Drained`].
pub async fn drain_child(a: DrainArgs) -> anyhow::Result<()> {
    let kind = Kind::ALL
        .into_iter()
        .find(|k| k.short() == a.kind)
        .context("--kind")?;
    if matches!(kind, Kind::Noop | Kind::Sqlite | Kind::Traced) {
        let mut telemetry = TelemetrySettings {
            log_format: LogFormat::Json,
            log_level: a.log_level.clone(),
            ..Default::default()
        };
        telemetry.otlp.endpoint = a.otlp_endpoint.clone();
        init_logging(&telemetry, "bench");
    }
    let cpu = cpu_seconds("self");
    let stop = CancellationToken::new();
    let n = Some(a.messages);
    let (elapsed, peak_rss_mb) = match kind {
        Kind::Raw => raw_consume(&a.url, &a.queue, a.prefetch, a.ack_batch, n, stop).await?,
        Kind::Transport => transport_consume(&a.url, &a.queue, a.prefetch, n, stop).await?,
        Kind::Noop | Kind::Sqlite | Kind::Traced => {
            sluice_drain(&a.url, &a.queue, &a.store, a.concurrency, a.messages).await?
        }
    };
    // The spans still queued leave before the child reports (outside the timed drain).
    tokio::task::spawn_blocking(sluice::telemetry::trace::shutdown).await?;
    let out = Drained {
        elapsed_s: elapsed.as_secs_f64(),
        peak_rss_mb,
        cpu_s: cpu_seconds("self") - cpu,
    };
    println!("{}", serde_json::to_string(&out)?);
    Ok(())
}

/// Runs one drain in a child process; returns it with the broker's CPU time meanwhile.
async fn drain_in_child(
    a: &Args,
    kind: Kind,
    url: &str,
    queue: &str,
    store: &str,
    concurrency: usize,
    otlp_endpoint: &str,
) -> anyhow::Result<(Drained, f64)> {
    let broker = CpuClock::start();
    let out = tokio::process::Command::new(std::env::current_exe()?)
        .args([
            "rabbitmq-drain",
            "--kind",
            kind.short(),
            "--url",
            url,
            "--queue",
            queue,
        ])
        .args(["--messages", &a.messages.to_string()])
        .args(["--prefetch", &a.prefetch.to_string()])
        .args(["--ack-batch", &a.ack_batch.to_string()])
        .args(["--concurrency", &concurrency.to_string()])
        .args(["--store", store, "--log-level", &a.log_level])
        .args(["--otlp-endpoint", otlp_endpoint])
        .stdin(std::process::Stdio::null())
        .output()
        .await?;
    if !out.status.success() {
        bail!(
            "the {} drain failed ({}): {}",
            kind.short(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let drained: Drained = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("drain output: {}", String::from_utf8_lossy(&out.stdout)))?;
    Ok((drained, broker.broker_seconds()))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Raw,
    Transport,
    Noop,
    Sqlite,
    Traced,
}

impl Kind {
    const ALL: [Kind; 5] = [
        Kind::Raw,
        Kind::Transport,
        Kind::Noop,
        Kind::Sqlite,
        Kind::Traced,
    ];

    fn key(self) -> &'static str {
        match self {
            Kind::Raw => "raw",
            Kind::Transport => "sluice_transport_only",
            Kind::Noop => "sluice_noop",
            Kind::Sqlite => "sluice_sqlite",
            Kind::Traced => "sluice_noop_traced",
        }
    }

    fn short(self) -> &'static str {
        match self {
            Kind::Raw => "raw",
            Kind::Transport => "transport",
            Kind::Noop => "noop",
            Kind::Sqlite => "sqlite",
            Kind::Traced => "traced",
        }
    }

    fn chosen(a: &Args) -> Vec<Kind> {
        Kind::ALL
            .into_iter()
            .filter(|k| a.only.is_empty() || a.only.iter().any(|o| o == k.short()))
            .collect()
    }

    fn label(self, a: &Args) -> String {
        match self {
            Kind::Raw => format!("raw lapin, multiple ack every <= {}", a.ack_batch),
            Kind::Transport => "Sluice transport alone: receive + ack, no pipeline".into(),
            Kind::Noop => "Sluice no-op, store none".into(),
            Kind::Sqlite => "Sluice no-op, SQLite store".into(),
            Kind::Traced => "Sluice no-op, store none, spans exported (OTLP/HTTP)".into(),
        }
    }
}

pub async fn run(a: Args) -> anyhow::Result<()> {
    if a.ack_batch == 0 || a.ack_batch >= u64::from(a.prefetch) {
        bail!("--ack-batch must be from 1 to prefetch - 1: a batch that fills the prefetch stalls delivery");
    }
    let concurrency = a.concurrency.unwrap_or(usize::from(a.prefetch / 2).max(1));
    init_logging(
        &TelemetrySettings {
            log_format: LogFormat::Json,
            log_level: a.log_level.clone(),
            ..Default::default()
        },
        "bench",
    );
    let url = sluice_tests::rabbit::url();
    let queue = sluice::conformance::unique("bench-rabbitmq");
    // The bench declares the topology once (with `x-expires`, so that an interrupted run
    // leaves nothing for long); the workers only check that it is there (main sets
    // SLUICE__TRANSPORT__DECLARE=false).
    let admin = RabbitTransport::open_with(
        options(&queue, &url),
        RabbitConfig {
            queue_expires: Some(Duration::from_secs(3600)),
            ..RabbitConfig::default()
        },
    )
    .await
    .context("connecting to RabbitMQ (is it up? `just bench` starts it)")?;
    let result = measure(&a, concurrency, &url, &queue, &admin).await;
    admin.delete_topology().await?;
    let report = result?;
    print(&a, &report)
}

async fn measure(
    a: &Args,
    concurrency: usize,
    url: &str,
    queue: &str,
    admin: &RabbitTransport,
) -> anyhow::Result<Report> {
    let dir = tempfile::tempdir()?;
    let publisher = Publisher::connect(url, queue).await?;
    eprintln!(
        "RabbitMQ bench on queue {queue}: {} persistent {BODY_BYTES}-byte messages a run, prefetch {}, Sluice concurrency {concurrency}, {} round(s)",
        a.messages, a.prefetch, a.rounds
    );
    let mut figures: BTreeMap<Kind, Figures> = BTreeMap::new();
    let kinds = Kind::chosen(a);
    if kinds.is_empty() {
        bail!("--only: none of raw, transport, noop, sqlite, traced");
    }
    let sink = sink::Sink::start().await?;
    for round in 1..=a.rounds {
        for &kind in &kinds {
            eprint!(
                "round {round}/{}: publishing {} messages... ",
                a.rounds, a.messages
            );
            let published = Instant::now();
            publisher.publish_backlog(a.messages).await?;
            wait_ready(admin, a.messages).await?;
            eprint!(
                "{:.0} msg/s; {}: draining... ",
                a.messages as f64 / published.elapsed().as_secs_f64(),
                kind.label(a)
            );
            let store = store_of(kind, dir.path(), round);
            let endpoint = if kind == Kind::Traced {
                sink.url.as_str()
            } else {
                ""
            };
            let (drained, broker_s) =
                drain_in_child(a, kind, url, queue, &store, concurrency, endpoint).await?;
            let per_msg = |s: f64| s * 1e6 / a.messages as f64;
            let (client_us, broker_us) = (per_msg(drained.cpu_s), per_msg(broker_s));
            let rss = drained.peak_rss_mb;
            let rate = a.messages as f64 / drained.elapsed_s;
            eprintln!(
                "{rate:.0} msg/s, CPU/msg {client_us:.1} us here + {broker_us:.1} us broker, peak RSS {rss:.1} MB"
            );
            let f = figures.entry(kind).or_default();
            f.rounds_msgs_per_s.push(rate);
            f.rounds_cpu.push((client_us, broker_us));
            f.peak_rss_mb = f.peak_rss_mb.max(rss);
        }
    }
    if kinds.contains(&Kind::Traced) {
        let (n, b) = (sink.requests.load(Relaxed), sink.bytes.load(Relaxed));
        eprintln!("traced: the receiver took {n} export request(s), {b} bytes of spans");
        if n == 0 {
            bail!("the traced consumer exported nothing: its figures would not be a traced run");
        }
    }
    for &kind in kinds
        .iter()
        .filter(|k| !a.no_latency && **k != Kind::Traced)
    {
        eprint!(
            "latency: {}: {} msg/s for {} s... ",
            kind.label(a),
            a.latency_rate,
            a.latency_secs
        );
        let store = store_of(kind, dir.path(), 0);
        let hist = latency_run(a, concurrency, url, queue, &publisher, kind, &store).await?;
        let ms = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
        let f = figures.entry(kind).or_default();
        (f.p50_ms, f.p95_ms, f.p99_ms) = (ms(0.50), ms(0.95), ms(0.99));
        eprintln!("p50 {:.2} ms, p99 {:.2} ms", f.p50_ms, f.p99_ms);
    }
    for f in figures.values_mut() {
        f.msgs_per_s = median(&f.rounds_msgs_per_s);
        let client: Vec<f64> = f.rounds_cpu.iter().map(|c| c.0).collect();
        let broker: Vec<f64> = f.rounds_cpu.iter().map(|c| c.1).collect();
        f.client_cpu_us_per_msg = median(&client);
        f.broker_cpu_us_per_msg = median(&broker);
    }
    let raw = figures.get(&Kind::Raw).map_or(f64::NAN, |f| f.msgs_per_s);
    for f in figures.values_mut() {
        f.vs_raw = f.msgs_per_s / raw;
    }
    let noop = figures.get(&Kind::Noop).cloned().unwrap_or_default();
    let sqlite = figures.get(&Kind::Sqlite).cloned().unwrap_or_default();
    let traced = figures.get(&Kind::Traced).cloned().unwrap_or_default();
    Ok(Report {
        sluice_traced_msgs_per_s: traced.msgs_per_s,
        traced_ratio: traced.vs_raw,
        raw_msgs_per_s: raw,
        sluice_msgs_per_s: noop.msgs_per_s,
        sluice_sqlite_msgs_per_s: sqlite.msgs_per_s,
        ratio: noop.vs_raw,
        sqlite_ratio: sqlite.vs_raw,
        p50_ms: noop.p50_ms,
        p95_ms: noop.p95_ms,
        p99_ms: noop.p99_ms,
        peak_rss_mb: noop.peak_rss_mb,
        messages: a.messages,
        body_bytes: BODY_BYTES,
        prefetch: a.prefetch,
        concurrency,
        ack_batch: a.ack_batch,
        rounds: a.rounds,
        latency_rate: a.latency_rate,
        consumers: figures.into_iter().map(|(k, f)| (k.key(), f)).collect(),
    })
}

fn options(queue: &str, url: &str) -> TransportOptions {
    TransportOptions {
        queue: queue.into(),
        function: "bench".into(),
        url: url.into(),
        lease: Duration::from_secs(30),
        // As the workers' settings (retry.max_deliveries), so that their checks agree.
        max_deliveries: 10,
        poll_interval: Duration::from_millis(50),
        declare: true,
    }
}

/// `none`, or a SQLite file of its own.
fn store_of(kind: Kind, dir: &std::path::Path, round: usize) -> String {
    match kind {
        Kind::Sqlite => format!(
            "sqlite:{}",
            dir.join(format!("idempotency-{round}.db")).display()
        ),
        _ => "none".into(),
    }
}

/// Waits until the queue holds `n` ready messages (confirmed publishes are counted a
/// moment later).
async fn wait_ready(admin: &RabbitTransport, n: u64) -> anyhow::Result<()> {
    let deadline = Instant::now() + RUN_LIMIT;
    loop {
        let s = admin.stats().await?;
        if s.ready == n {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the queue holds {} ready messages, expected {n}", s.ready);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// One consumer, through the proxy, while messages are published at a steady rate.
async fn latency_run(
    a: &Args,
    concurrency: usize,
    url: &str,
    queue: &str,
    publisher: &Publisher,
    kind: Kind,
    store: &str,
) -> anyhow::Result<Histogram<u64>> {
    let proxy = AckProxy::start(url).await?;
    let via = proxy.url(url);
    let total = a.latency_rate * a.latency_secs;
    let stop = CancellationToken::new();
    let consumer = {
        let (via, queue, store, stop) = (
            via.clone(),
            queue.to_owned(),
            store.to_owned(),
            stop.clone(),
        );
        let (prefetch, ack_batch) = (a.prefetch, a.ack_batch);
        tokio::spawn(async move {
            match kind {
                Kind::Raw => raw_consume(&via, &queue, prefetch, ack_batch, None, stop).await,
                Kind::Transport => transport_consume(&via, &queue, prefetch, None, stop).await,
                Kind::Noop | Kind::Sqlite | Kind::Traced => {
                    let stopped = stop.clone();
                    sluice_consume(
                        &via,
                        &queue,
                        &store,
                        concurrency,
                        || {},
                        move |_| stopped.is_cancelled(),
                    )
                    .await
                }
            }
        })
    };
    // Publishing starts once the consumer is subscribed (the proxy saw basic.consume-ok).
    proxy
        .wait_until(
            |s| s.consuming.load(Relaxed) > 0,
            "the consumer to subscribe",
        )
        .await?;
    publisher
        .publish_paced(a.latency_rate, a.latency_secs)
        .await?;
    proxy
        .wait_until(
            |s| s.acked.load(Relaxed) >= total,
            "every message to be acked",
        )
        .await?;
    stop.cancel();
    consumer.await??;
    let hist = proxy.state.latency_us.lock().expect("proxy lock").clone();
    Ok(hist)
}
