//! Benchmarks, each measured against a baseline in the same run on this machine.
//!
//! `just bench stores`: claim + complete operations per second and latency per idempotency
//! store (SQLite, PostgreSQL, Redis, S3 on moto), with SQLite, the embedded default, as the
//! baseline column. `--json` prints one object keyed by store name.
//!
//! `just bench rabbitmq`: the Sluice pipeline on RabbitMQ against the fastest raw lapin
//! consume+ack loop, on the same broker, queue, prefetch and messages (see [`rabbit`]).
//! `--json` prints one object (`raw_msgs_per_s`, `sluice_msgs_per_s`, `ratio`, `p99_ms`,
//! `peak_rss_mb`, ...).

use std::{
    collections::BTreeMap,
    process::ExitCode,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use hdrhistogram::Histogram;
use sluice::{
    store::{AnyStore, Claim, IdempotencyStore},
    Settings,
};

#[derive(Parser, Debug)]
#[command(about = "Sluice benchmarks")]
struct Args {
    #[command(subcommand)]
    what: What,
}

#[derive(Subcommand, Debug)]
enum What {
    /// The Sluice pipeline on RabbitMQ against a raw lapin consume+ack loop.
    Rabbitmq(rabbit::Args),
    /// One drain of `bench rabbitmq`, run as a child process so that its peak RSS and CPU
    /// time are its own; prints one JSON line.
    #[command(hide = true)]
    RabbitmqDrain(rabbit::DrainArgs),
    /// Claim + complete per idempotency store.
    Stores {
        /// Operations per store.
        #[arg(long, default_value_t = 4000)]
        ops: usize,
        /// Concurrent claimers.
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
        /// Only these stores (default: all).
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
        /// Print one JSON object keyed by store name.
        #[arg(long)]
        json: bool,
    },
}

/// The stores and the URLs the tests use (override with SLUICE_TEST_*_URL).
fn stores(dir: &std::path::Path) -> Vec<(&'static str, String)> {
    let env = |k: &str, d: &str| std::env::var(k).unwrap_or_else(|_| d.to_owned());
    vec![
        ("sqlite", dir.join("bench.db").display().to_string()),
        (
            "postgres",
            env(
                "SLUICE_TEST_POSTGRES_URL",
                "postgres://root@127.0.0.1:5432/test",
            ),
        ),
        (
            "redis",
            env("SLUICE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0"),
        ),
        (
            "s3",
            format!("s3://sluice-bench-{}/bench", std::process::id()),
        ),
    ]
}

#[derive(Debug, serde::Serialize)]
struct StoreResult {
    ops_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    ops: usize,
    vs_sqlite: f64,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let prefetch = match &args.what {
        What::Rabbitmq(a) => Some(a.prefetch),
        What::RabbitmqDrain(a) => Some(a.prefetch),
        What::Stores { .. } => None,
    };
    if let Some(prefetch) = prefetch {
        // Read by the RabbitMQ transport when the pipeline opens it; set before any thread.
        std::env::set_var(
            sluice::transport::rabbitmq::env::PREFETCH,
            prefetch.to_string(),
        );
        // The bench declares the topology once; the workers only check that it is there.
        std::env::set_var(sluice::transport::rabbitmq::env::DECLARE, "false");
    }
    // Two worker threads, as a function binary gets on this two-core box (tokio's default).
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("bench failed: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(async {
        match args.what {
            What::Rabbitmq(a) => rabbit::run(a).await,
            What::RabbitmqDrain(a) => rabbit::drain_child(a).await,
            What::Stores {
                ops,
                concurrency,
                only,
                json,
            } => run_stores(ops, concurrency, only, json).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench failed: {e:#}");
            ExitCode::from(1)
        }
    }
}

async fn run_stores(
    ops: usize,
    concurrency: usize,
    only: Vec<String>,
    json: bool,
) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut results = BTreeMap::new();
    let mut order = Vec::new();
    for (name, url) in stores(dir.path()) {
        if !only.is_empty() && !only.iter().any(|o| o == name) {
            continue;
        }
        if !json {
            eprintln!("{name}: {ops} claim+complete operations, {concurrency} at a time...");
        }
        let settings = Settings::load(
            "bench",
            None,
            std::iter::empty(),
            &[format!("store.kind={name}"), format!("store.url={url}")],
        )?;
        let store = AnyStore::open(&settings)
            .await
            .with_context(|| {
                format!("opening the {name} store (is it running? just bench starts it)")
            })?
            .context("store.kind none")?;
        prepare(&store).await?;
        let (elapsed, hist) = claim_complete(Arc::new(store), ops, concurrency).await?;
        let ms = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
        results.insert(
            name.to_owned(),
            StoreResult {
                ops_per_s: ops as f64 / elapsed.as_secs_f64(),
                p50_ms: ms(0.5),
                p99_ms: ms(0.99),
                ops,
                vs_sqlite: 0.0,
            },
        );
        order.push(name);
    }
    if let Some(base) = results.get("sqlite").map(|r| r.ops_per_s) {
        for r in results.values_mut() {
            r.vs_sqlite = r.ops_per_s / base;
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&results)?);
        return Ok(());
    }
    println!("\nclaim + complete, {ops} operations per store, {concurrency} concurrent (one machine, 2 cores)\n");
    println!("| store | ops/s | p50 ms | p99 ms | vs sqlite |");
    println!("|---|---:|---:|---:|---:|");
    for name in order {
        let r = &results[name];
        println!(
            "| {name} | {:.0} | {:.2} | {:.2} | {:.2}x |",
            r.ops_per_s, r.p50_ms, r.p99_ms, r.vs_sqlite
        );
    }
    Ok(())
}

/// Creates what a store needs before its first call (the S3 bucket).
async fn prepare(store: &AnyStore) -> anyhow::Result<()> {
    match store {
        AnyStore::S3(s) => Ok(s.ensure_bucket().await?),
        _ => Ok(()),
    }
}

async fn claim_complete(
    store: Arc<AnyStore>,
    ops: usize,
    concurrency: usize,
) -> anyhow::Result<(Duration, Histogram<u64>)> {
    let run = uuid::Uuid::new_v4().simple().to_string();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (store, next, run) = (store.clone(), next.clone(), run.clone());
        tasks.push(tokio::spawn(async move {
            let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("bounds");
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= ops {
                    return Ok::<_, anyhow::Error>(hist);
                }
                let key = format!("bench-{run}-{i}");
                let t = Instant::now();
                let Claim::Acquired(token) =
                    store.claim(&key, "fp", Duration::from_secs(30)).await?
                else {
                    anyhow::bail!("fresh key {key} was not acquired");
                };
                store
                    .complete(&key, token, br#"{"ok":true}"#, Duration::from_secs(3600))
                    .await?;
                hist.record(t.elapsed().as_micros().max(1) as u64)?;
            }
        }));
    }
    let mut total = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    for t in tasks {
        total.add(t.await??)?;
    }
    Ok((started.elapsed(), total))
}

/// `just bench rabbitmq`: the Sluice pipeline on RabbitMQ against the fastest raw lapin
/// consume+ack loop, in one run on the same broker.
///
/// Every consumer works the same quorum queue (the topology `provision` declares, so the
/// queue type is the one Sluice uses), with the same prefetch, the same persistent 200-byte
/// messages (a JSON body whose `t` is the publish time in microseconds), on the same tokio
/// runtime (two worker threads here, as in a function binary):
///
/// - **raw**: one lapin consumer that acks with `multiple = true` after at most `--ack-batch`
///   deliveries, or as soon as no further delivery is waiting (so it never sits on acks when
///   idle); it does not even read the body.
/// - **Sluice no-op**: a [`Function`] whose handler decodes the body and returns, built and
///   run in-process (`Runtime::run`) with `store.kind = none`, concurrency `prefetch / 2`
///   (DESIGN: prefetch = concurrency x 2), logs as a container writes them (JSON, `info`).
/// - **Sluice no-op + SQLite**: the same with the SQLite idempotency store (a fresh file a run).
///
/// Throughput: `--messages` are published (with confirms) before each run, then drained by the
/// consumer in a child process of its own (this binary's hidden `rabbitmq-drain`); the clock
/// runs from starting the consumer to the last ack. Runs are interleaved over `--rounds`
/// rounds and the median is reported. Peak RSS is the child's `VmHWM` when it has drained; CPU
/// time per message is the child's (lapin's I/O thread included) and the broker's (`beam.smp`)
/// over the drain.
///
/// Latency: a separate run per consumer while messages are published at `--latency-rate`, so
/// that the figure is the pipeline's and not the time spent waiting behind a backlog. It is
/// measured on the wire, the same way for every consumer: the consumer connects through
/// [`AckProxy`], which reads the AMQP frames passing through it, keeps the `t` of every
/// delivery, and on every `basic.ack` (single or multiple) records now - `t` for each delivery
/// it covers. The proxy adds one local hop to every consumer alike.
mod rabbit {
    use std::{
        collections::{BTreeMap, HashMap},
        net::SocketAddr,
        sync::{
            atomic::{AtomicU64, Ordering::Relaxed},
            Arc, Mutex,
        },
        time::{Duration, Instant, SystemTime, UNIX_EPOCH},
    };

    use anyhow::{bail, Context as _};
    use futures_util::{FutureExt, StreamExt};
    use hdrhistogram::Histogram;
    use serde::{Deserialize, Serialize};
    use sluice::{
        config::{LogFormat, TelemetrySettings},
        telemetry::init_logging,
        transport::{
            rabbitmq::{
                lapin::{
                    options::{
                        BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
                        ConfirmSelectOptions,
                    },
                    types::FieldTable,
                    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties,
                },
                RabbitConfig, RabbitTransport,
            },
            Transport, TransportOptions,
        },
        worker::RunOptions,
        CancellationToken, Context, Function, HandlerError, Settings,
    };
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::{TcpListener, TcpStream},
    };

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
        if matches!(kind, Kind::Noop | Kind::Sqlite) {
            init_logging(&TelemetrySettings {
                log_format: LogFormat::Json,
                log_level: a.log_level.clone(),
                ..Default::default()
            });
        }
        let cpu = cpu_seconds("self");
        let stop = CancellationToken::new();
        let n = Some(a.messages);
        let (elapsed, peak_rss_mb) = match kind {
            Kind::Raw => raw_consume(&a.url, &a.queue, a.prefetch, a.ack_batch, n, stop).await?,
            Kind::Transport => transport_consume(&a.url, &a.queue, a.prefetch, n, stop).await?,
            Kind::Noop | Kind::Sqlite => {
                sluice_drain(&a.url, &a.queue, &a.store, a.concurrency, a.messages).await?
            }
        };
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
    }

    impl Kind {
        const ALL: [Kind; 4] = [Kind::Raw, Kind::Transport, Kind::Noop, Kind::Sqlite];

        fn key(self) -> &'static str {
            match self {
                Kind::Raw => "raw",
                Kind::Transport => "sluice_transport_only",
                Kind::Noop => "sluice_noop",
                Kind::Sqlite => "sluice_sqlite",
            }
        }

        fn short(self) -> &'static str {
            match self {
                Kind::Raw => "raw",
                Kind::Transport => "transport",
                Kind::Noop => "noop",
                Kind::Sqlite => "sqlite",
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
            }
        }
    }

    /// One consumer's figures.
    #[derive(Debug, Clone, Default, Serialize)]
    struct Figures {
        msgs_per_s: f64,
        /// Every round's throughput, in order.
        rounds_msgs_per_s: Vec<f64>,
        vs_raw: f64,
        /// CPU time per message while draining (median of the rounds): this process (the
        /// consumer, lapin's I/O thread included) and the broker (`beam.smp`), in us.
        client_cpu_us_per_msg: f64,
        broker_cpu_us_per_msg: f64,
        #[serde(skip)]
        rounds_cpu: Vec<(f64, f64)>,
        p50_ms: f64,
        p95_ms: f64,
        p99_ms: f64,
        peak_rss_mb: f64,
    }

    /// `--json`: the headline figures (the Sluice no-op against raw) and every consumer's.
    #[derive(Debug, Serialize)]
    struct Report {
        raw_msgs_per_s: f64,
        sluice_msgs_per_s: f64,
        sluice_sqlite_msgs_per_s: f64,
        ratio: f64,
        sqlite_ratio: f64,
        p50_ms: f64,
        p95_ms: f64,
        p99_ms: f64,
        peak_rss_mb: f64,
        messages: u64,
        body_bytes: usize,
        prefetch: u16,
        concurrency: usize,
        ack_batch: u64,
        rounds: usize,
        latency_rate: u64,
        consumers: BTreeMap<&'static str, Figures>,
    }

    /// What the Sluice handler decodes (the padding is ignored).
    #[derive(Deserialize)]
    struct Tick {
        t: u64,
    }

    async fn noop(input: Tick, _ctx: &Context) -> Result<(), HandlerError> {
        std::hint::black_box(input.t);
        Ok(())
    }

    pub async fn run(a: Args) -> anyhow::Result<()> {
        if a.ack_batch == 0 || a.ack_batch >= u64::from(a.prefetch) {
            bail!("--ack-batch must be from 1 to prefetch - 1: a batch that fills the prefetch stalls delivery");
        }
        let concurrency = a.concurrency.unwrap_or(usize::from(a.prefetch / 2).max(1));
        init_logging(&TelemetrySettings {
            log_format: LogFormat::Json,
            log_level: a.log_level.clone(),
            ..Default::default()
        });
        let url = sluice_tests::rabbit::url();
        let queue = sluice::conformance::unique("bench-rabbitmq");
        // The bench declares the topology once (with `x-expires`, so that an interrupted run
        // leaves nothing for long); the workers only check that it is there (main sets
        // SLUICE_RABBITMQ_DECLARE=false).
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
            bail!("--only: none of raw, noop, sqlite");
        }
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
                let (drained, broker_s) =
                    drain_in_child(a, kind, url, queue, &store, concurrency).await?;
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
        for &kind in kinds.iter().filter(|_| !a.no_latency) {
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
        Ok(Report {
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

    fn print(a: &Args, r: &Report) -> anyhow::Result<()> {
        if a.json {
            println!("{}", serde_json::to_string_pretty(r)?);
            return Ok(());
        }
        println!(
            "\nRabbitMQ, one quorum queue, {} persistent {BODY_BYTES}-byte messages a run, prefetch {} for every consumer (Sluice concurrency {}); throughput: median of {} round(s); latency: enqueue -> ack on the wire at {} msg/s\n",
            r.messages, r.prefetch, r.concurrency, r.rounds, r.latency_rate
        );
        println!("| consumer | msgs/s | vs raw | p50 ms | p95 ms | p99 ms | peak RSS MB | CPU us/msg: here + broker |");
        println!("|---|---:|---:|---:|---:|---:|---:|---:|");
        for kind in Kind::chosen(a) {
            let f = &r.consumers[kind.key()];
            println!(
                "| {} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} | {:.1} | {:.1} + {:.1} |",
                kind.label(a),
                f.msgs_per_s,
                f.vs_raw,
                f.p50_ms,
                f.p95_ms,
                f.p99_ms,
                f.peak_rss_mb,
                f.client_cpu_us_per_msg,
                f.broker_cpu_us_per_msg
            );
        }
        Ok(())
    }

    fn median(xs: &[f64]) -> f64 {
        let mut v = xs.to_vec();
        v.sort_by(f64::total_cmp);
        match v.len() {
            0 => 0.0,
            n if n % 2 == 1 => v[n / 2],
            n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
        }
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

    /// CPU time (user + system) of the broker's Erlang VM, from `/proc/<pid>/stat` (clock
    /// ticks of 10 ms: runs of a few seconds are accurate to ~1%).
    struct CpuClock {
        broker: f64,
        broker_pid: Option<String>,
    }

    impl CpuClock {
        fn start() -> Self {
            let broker_pid = std::fs::read_dir("/proc").ok().and_then(|dir| {
                dir.flatten().find_map(|e| {
                    let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
                    (comm.trim() == "beam.smp")
                        .then(|| e.file_name().to_string_lossy().into_owned())
                })
            });
            Self {
                broker: broker_pid.as_deref().map_or(0.0, cpu_seconds),
                broker_pid,
            }
        }

        /// The broker's CPU seconds since `start`.
        fn broker_seconds(&self) -> f64 {
            self.broker_pid
                .as_deref()
                .map_or(0.0, |p| cpu_seconds(p) - self.broker)
        }
    }

    /// utime + stime of `/proc/<pid>`, in seconds (assuming 100 ticks a second, Linux's USER_HZ).
    fn cpu_seconds(pid: &str) -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // Fields after the parenthesised command name; utime and stime are the 14th and 15th.
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let tick = |i: usize| {
            fields
                .get(i)
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        (tick(11) + tick(12)) / 100.0
    }

    /// This process's peak resident set since the last [`reset_peak_rss`], in MB.
    fn peak_rss_mb() -> f64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    }

    /// Resets the peak resident set (Linux: writing 5 to clear_refs).
    fn reset_peak_rss() {
        let _ = std::fs::write("/proc/self/clear_refs", "5");
    }

    fn now_us() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64)
    }

    /// A JSON body of exactly [`BODY_BYTES`] carrying the publish time.
    fn body(t: u64) -> Vec<u8> {
        let bare = format!(r#"{{"t":{t},"pad":""}}"#);
        let pad = "x".repeat(BODY_BYTES.saturating_sub(bare.len()));
        format!(r#"{{"t":{t},"pad":"{pad}"}}"#).into_bytes()
    }

    // --- publishing -------------------------------------------------------------------------

    /// Publishes to the work queue's exchange as a producer would: persistent, with a message
    /// id and publisher confirms.
    struct Publisher {
        _connection: Connection,
        channel: Channel,
        queue: String,
    }

    impl Publisher {
        async fn connect(url: &str, queue: &str) -> anyhow::Result<Self> {
            let connection = Connection::connect(url, ConnectionProperties::default()).await?;
            let channel = connection.create_channel().await?;
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await?;
            Ok(Self {
                _connection: connection,
                channel,
                queue: queue.into(),
            })
        }

        fn properties() -> BasicProperties {
            BasicProperties::default()
                .with_delivery_mode(2)
                .with_message_id(uuid::Uuid::new_v4().simple().to_string().into())
                .with_timestamp(now_us() / 1_000_000)
        }

        /// Publishes `n` messages, [`CONFIRM_WINDOW`] at a time, each window confirmed.
        async fn publish_backlog(&self, n: u64) -> anyhow::Result<()> {
            let mut left = n as usize;
            while left > 0 {
                let mut confirms = Vec::with_capacity(CONFIRM_WINDOW);
                for _ in 0..left.min(CONFIRM_WINDOW) {
                    confirms.push(self.publish_one().await?);
                }
                left -= confirms.len();
                for c in confirms {
                    check(c.await?)?;
                }
            }
            Ok(())
        }

        async fn publish_one(
            &self,
        ) -> anyhow::Result<sluice::transport::rabbitmq::lapin::PublisherConfirm> {
            Ok(self
                .channel
                .basic_publish(
                    self.queue.as_str().into(),
                    self.queue.as_str().into(),
                    BasicPublishOptions::default(),
                    &body(now_us()),
                    Self::properties(),
                )
                .await?)
        }

        /// Publishes `rate` messages a second for `secs` seconds (confirms awaited behind).
        async fn publish_paced(&self, rate: u64, secs: u64) -> anyhow::Result<u64> {
            let total = rate * secs;
            let started = Instant::now();
            let mut sent = 0u64;
            let mut confirms = Vec::new();
            let mut tick = tokio::time::interval(Duration::from_millis(1));
            while sent < total {
                tick.tick().await;
                let due = (started.elapsed().as_secs_f64() * rate as f64) as u64;
                while sent < due.min(total) {
                    confirms.push(self.publish_one().await?);
                    sent += 1;
                }
            }
            for c in confirms {
                check(c.await?)?;
            }
            Ok(total)
        }
    }

    fn check(c: Confirmation) -> anyhow::Result<()> {
        match c {
            Confirmation::Ack(None) => Ok(()),
            other => bail!("publish not confirmed: {other:?}"),
        }
    }

    // --- the consumers ----------------------------------------------------------------------

    /// The raw loop: drains `n` messages (or runs until `stop`), acking with `multiple` after
    /// at most `ack_batch` deliveries or when no further delivery is waiting. Returns the time
    /// from starting the consumer to the last ack and the peak RSS.
    async fn raw_consume(
        url: &str,
        queue: &str,
        prefetch: u16,
        ack_batch: u64,
        n: Option<u64>,
        stop: CancellationToken,
    ) -> anyhow::Result<(Duration, f64)> {
        reset_peak_rss();
        let connection = Connection::connect(url, ConnectionProperties::default()).await?;
        let channel = connection.create_channel().await?;
        channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await?;
        let started = Instant::now();
        let mut consumer = channel
            .basic_consume(
                queue.into(),
                "bench-raw".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let mut done = 0u64;
        while n.is_none_or(|n| done < n) {
            let first = tokio::select! {
                d = consumer.next() => d.context("the consumer ended")??,
                _ = stop.cancelled() => break,
            };
            let mut last = first.delivery_tag;
            let mut batch = 1;
            while batch < ack_batch {
                match consumer.next().now_or_never() {
                    Some(Some(Ok(d))) => {
                        last = d.delivery_tag;
                        batch += 1;
                    }
                    _ => break,
                }
            }
            channel
                .basic_ack(last, BasicAckOptions { multiple: true })
                .await?;
            done += batch;
        }
        let elapsed = started.elapsed();
        let rss = peak_rss_mb();
        let _ = connection.close(200, "bench done".into()).await;
        Ok((elapsed, rss))
    }

    /// The adapter without the pipeline: `receive` up to half the prefetch, ack them all at
    /// once (the acks coalesce), again; shows what the transport costs apart from the worker.
    async fn transport_consume(
        url: &str,
        queue: &str,
        prefetch: u16,
        n: Option<u64>,
        stop: CancellationToken,
    ) -> anyhow::Result<(Duration, f64)> {
        reset_peak_rss();
        let config = RabbitConfig {
            prefetch,
            declare: false,
            ..RabbitConfig::default()
        };
        let t = RabbitTransport::open_with(options(queue, url), config).await?;
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
            std::iter::empty(),
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
    async fn sluice_consume(
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

    async fn sluice_drain(
        url: &str,
        queue: &str,
        store: &str,
        concurrency: usize,
        n: u64,
    ) -> anyhow::Result<(Duration, f64)> {
        sluice_consume(url, queue, store, concurrency, || {}, |acked| acked >= n).await
    }

    // --- latency ----------------------------------------------------------------------------

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
                    Kind::Noop | Kind::Sqlite => {
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

    /// A TCP proxy in front of the broker that reads the AMQP 0-9-1 frames passing through:
    /// from the broker, `basic.deliver` + the body's `t`; from the client, `basic.ack`. Each
    /// ack records, for every delivery it covers (`multiple` included), the time from publish
    /// to the ack leaving the client.
    struct AckProxy {
        addr: SocketAddr,
        state: Arc<ProxyState>,
        accept: tokio::task::JoinHandle<()>,
    }

    struct ProxyState {
        /// Publish time (us) of every delivery not yet acked, by (connection, channel), tag.
        sent_at: Mutex<HashMap<(u64, u16), BTreeMap<u64, u64>>>,
        latency_us: Mutex<Histogram<u64>>,
        acked: AtomicU64,
        consuming: AtomicU64,
        connections: AtomicU64,
    }

    impl Drop for AckProxy {
        fn drop(&mut self) {
            self.accept.abort();
        }
    }

    impl AckProxy {
        async fn start(url: &str) -> anyhow::Result<Self> {
            let target = authority(url)?.1;
            let listener = TcpListener::bind("127.0.0.1:0").await?;
            let addr = listener.local_addr()?;
            let state = Arc::new(ProxyState {
                sent_at: Mutex::default(),
                latency_us: Mutex::new(Histogram::new_with_bounds(1, 600_000_000, 3)?),
                acked: AtomicU64::new(0),
                consuming: AtomicU64::new(0),
                connections: AtomicU64::new(0),
            });
            let st = state.clone();
            let accept = tokio::spawn(async move {
                while let Ok((client, _)) = listener.accept().await {
                    let Ok(server) = TcpStream::connect(&target).await else {
                        continue;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let conn = st.connections.fetch_add(1, Relaxed);
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    tokio::spawn(pump(cr, sw, FrameReader::new(true), conn, st.clone()));
                    tokio::spawn(pump(sr, cw, FrameReader::new(false), conn, st.clone()));
                }
            });
            Ok(Self {
                addr,
                state,
                accept,
            })
        }

        /// `url` with the proxy's address in place of the broker's.
        fn url(&self, url: &str) -> String {
            let (scheme_user, _, path) = authority(url).expect("checked in start");
            format!("{scheme_user}{}{path}", self.addr)
        }

        async fn wait_until(
            &self,
            f: impl Fn(&ProxyState) -> bool,
            what: &str,
        ) -> anyhow::Result<()> {
            let deadline = Instant::now() + RUN_LIMIT;
            while !f(&self.state) {
                if Instant::now() > deadline {
                    bail!("timed out waiting for {what}");
                }
                tokio::time::sleep(POLL).await;
            }
            Ok(())
        }
    }

    /// Splits an `amqp://` URL into (`amqp://user:pass@`, `host:port`, `/vhost...`).
    fn authority(url: &str) -> anyhow::Result<(String, String, String)> {
        let rest = url
            .strip_prefix("amqp://")
            .context("the latency proxy needs an amqp:// URL (no TLS)")?;
        let (auth, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        let (user, host) = match auth.rsplit_once('@') {
            Some((u, h)) => (format!("{u}@"), h),
            None => (String::new(), auth),
        };
        let host = if host.contains(':') {
            host.to_owned()
        } else {
            format!("{host}:5672")
        };
        Ok((format!("amqp://{user}"), host, path.to_owned()))
    }

    /// Copies one direction, reading the frames on the way. From the broker, frames are read
    /// before they are passed on, so a delivery is known before the client can ack it; from
    /// the client, the ack's time is taken when it arrives.
    async fn pump(
        mut from: tokio::net::tcp::OwnedReadHalf,
        mut to: tokio::net::tcp::OwnedWriteHalf,
        mut frames: FrameReader,
        conn: u64,
        state: Arc<ProxyState>,
    ) {
        let mut buf = vec![0u8; 64 * 1024];
        // From the broker, by channel: the delivery whose content is arriving (tag, body
        // size, body so far).
        let mut content: HashMap<u16, (u64, usize, Vec<u8>)> = HashMap::new();
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let now = now_us();
            let client = frames.client;
            frames.feed(&buf[..n], |kind, channel, payload| {
                if client {
                    client_frame(&state, conn, kind, channel, payload, now);
                } else {
                    broker_frame(&state, conn, &mut content, kind, channel, payload);
                }
            });
            if to.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = to.shutdown().await;
    }

    /// AMQP frame types and the methods read here (class 60 is `basic`).
    const METHOD: u8 = 1;
    const HEADER: u8 = 2;
    const BODY: u8 = 3;
    const BASIC: u16 = 60;
    const CONSUME_OK: u16 = 21;
    const DELIVER: u16 = 60;
    const ACK: u16 = 80;

    fn method_of(payload: &[u8]) -> Option<(u16, u16)> {
        Some((
            u16::from_be_bytes(payload.get(0..2)?.try_into().ok()?),
            u16::from_be_bytes(payload.get(2..4)?.try_into().ok()?),
        ))
    }

    fn u64_at(payload: &[u8], at: usize) -> Option<u64> {
        Some(u64::from_be_bytes(
            payload.get(at..at + 8)?.try_into().ok()?,
        ))
    }

    /// `basic.consume-ok`, and `basic.deliver` with its content header and body (whose `t` is
    /// kept under the delivery tag).
    fn broker_frame(
        state: &ProxyState,
        conn: u64,
        content: &mut HashMap<u16, (u64, usize, Vec<u8>)>,
        kind: u8,
        channel: u16,
        payload: &[u8],
    ) {
        match kind {
            METHOD => match method_of(payload) {
                Some((BASIC, CONSUME_OK)) => {
                    state.consuming.fetch_add(1, Relaxed);
                }
                Some((BASIC, DELIVER)) => {
                    // consumer-tag (short string), delivery-tag (u64), ...
                    let tag_len = payload.get(4).copied().unwrap_or(0) as usize;
                    if let Some(tag) = u64_at(payload, 5 + tag_len) {
                        content.insert(channel, (tag, 0, Vec::new()));
                    }
                }
                _ => {}
            },
            HEADER => {
                // class (2), weight (2), body size (8), properties...
                if let (Some(c), Some(size)) = (content.get_mut(&channel), u64_at(payload, 4)) {
                    c.1 = size as usize;
                }
            }
            BODY => {
                let Some(c) = content.get_mut(&channel) else {
                    return;
                };
                c.2.extend_from_slice(payload);
                if c.2.len() >= c.1 {
                    let (tag, _, body) = content.remove(&channel).expect("present");
                    if let Some(t) = published_at(&body) {
                        state
                            .sent_at
                            .lock()
                            .expect("proxy lock")
                            .entry((conn, channel))
                            .or_default()
                            .insert(tag, t);
                    }
                }
            }
            _ => {}
        }
    }

    /// `basic.ack`: the latency of every delivery it covers.
    fn client_frame(
        state: &ProxyState,
        conn: u64,
        kind: u8,
        channel: u16,
        payload: &[u8],
        now: u64,
    ) {
        if kind != METHOD || method_of(payload) != Some((BASIC, ACK)) {
            return;
        }
        let (Some(tag), Some(bits)) = (u64_at(payload, 4), payload.get(12)) else {
            return;
        };
        let multiple = bits & 1 == 1;
        let covered: Vec<u64> = {
            let mut sent = state.sent_at.lock().expect("proxy lock");
            let Some(tags) = sent.get_mut(&(conn, channel)) else {
                return;
            };
            if multiple {
                let rest = tags.split_off(&(tag + 1));
                std::mem::replace(tags, rest).into_values().collect()
            } else {
                tags.remove(&tag).into_iter().collect()
            }
        };
        let mut hist = state.latency_us.lock().expect("proxy lock");
        for t in &covered {
            let _ = hist.record(now.saturating_sub(*t).max(1));
        }
        state.acked.fetch_add(covered.len() as u64, Relaxed);
    }

    /// The `t` of a bench body.
    fn published_at(body: &[u8]) -> Option<u64> {
        let text = std::str::from_utf8(body).ok()?;
        let digits = text.strip_prefix(r#"{"t":"#)?;
        let end = digits.find(|c: char| !c.is_ascii_digit())?;
        digits[..end].parse().ok()
    }

    /// Reassembles frames from a byte stream: type (1), channel (2), size (4), payload,
    /// frame end (1). The client side starts with the 8-byte protocol header.
    struct FrameReader {
        client: bool,
        header_left: usize,
        buf: Vec<u8>,
    }

    impl FrameReader {
        fn new(client: bool) -> Self {
            Self {
                client,
                header_left: if client { 8 } else { 0 },
                buf: Vec::new(),
            }
        }

        fn feed(&mut self, data: &[u8], mut on: impl FnMut(u8, u16, &[u8])) {
            let skip = self.header_left.min(data.len());
            self.header_left -= skip;
            self.buf.extend_from_slice(&data[skip..]);
            let mut pos = 0;
            while self.buf.len() - pos >= 7 {
                let kind = self.buf[pos];
                let channel = u16::from_be_bytes([self.buf[pos + 1], self.buf[pos + 2]]);
                let size =
                    u32::from_be_bytes(self.buf[pos + 3..pos + 7].try_into().expect("four bytes"));
                let end = pos + 7 + size as usize;
                if self.buf.len() < end + 1 {
                    break;
                }
                on(kind, channel, &self.buf[pos + 7..end]);
                pos = end + 1;
            }
            self.buf.drain(..pos);
        }
    }
}
