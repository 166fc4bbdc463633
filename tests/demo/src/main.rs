//! The demo: charge-payment on the embedded queue, with duplicates, poison messages, gateway
//! outages and handler panics, worked by the real function binary as a separate process.
//!
//! Run with `just demo` (or `just demo --json`). It enqueues the messages, shows a progress
//! bar while the worker drains the queue, prints a summary table, checks that the ledger holds
//! exactly one charge per distinct valid payment, then shows the dead-letter queue and
//! redrives it (a dry run first).

use std::{
    collections::{BTreeMap, HashSet},
    path::{Path, PathBuf},
    process::{ExitCode, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use rand::{rngs::StdRng, Rng, SeedableRng};
use sluice::{
    telemetry::RunSummary,
    transport::{embedded::EmbeddedTransport, TransportOptions},
    OutgoingMessage, Transport,
};
use sluice_tests::{
    charge_body, function_binary, ledger_counts,
    report::{fmt_n, print_table, round1},
    Sandbox,
};

#[derive(Parser, Debug)]
#[command(about = "Sluice demo: charge-payment on the embedded queue")]
struct Args {
    /// Messages to enqueue.
    #[arg(long, default_value_t = 10_000)]
    messages: usize,
    /// Print the summary as one JSON object on stdout (and skip the DLQ walk-through).
    #[arg(long)]
    json: bool,
    /// Working directory (wiped at start).
    #[arg(long, default_value = ".sluice/demo")]
    dir: PathBuf,
    /// Seed of the message mix.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// The charge-payment binary (default: the one built beside this driver).
    #[arg(long)]
    function_bin: Option<PathBuf>,
}

/// Settings the demo adds to charge-payment's own: outages and panics to absorb, and a
/// breaker tuned for a burst of 10,000 messages (the default opens for 30 s). More slots than
/// the default: in-slot retry waits of the injected outages hold them.
const WORKER_SETTINGS: [&str; 9] = [
    "worker.concurrency=32",
    "app.failure_rate=0.1",
    "app.decline_over_cents=500000",
    "fault.panic_rate=0.002",
    "retry.base=200ms",
    "retry.cap=5s",
    "breaker.failures=20",
    "breaker.window=5s",
    "breaker.open_for=1s",
];

/// What the generator put in the queue.
#[derive(Debug, Default)]
struct Mix {
    bodies: Vec<OutgoingMessage>,
    distinct_valid: HashSet<String>,
    duplicates: usize,
    poison: BTreeMap<&'static str, usize>,
}

fn generate(n: usize, seed: u64) -> Mix {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut mix = Mix::default();
    let mut valid: Vec<String> = Vec::new();
    for i in 0..n {
        let r: f64 = rng.gen();
        let amount = rng.gen_range(100..50_000u64);
        let msg = if r < 0.004 {
            *mix.poison.entry("not JSON").or_default() += 1;
            OutgoingMessage::new(format!("payment {i}: charge 10 EUR please"))
        } else if r < 0.006 {
            *mix.poison.entry("invalid UTF-8").or_default() += 1;
            OutgoingMessage::new(vec![0xff, 0xfe, b'{', 0x80])
        } else if r < 0.010 {
            *mix.poison.entry("missing field").or_default() += 1;
            OutgoingMessage::new(format!(r#"{{"payment_id":"bad-{i}","currency":"EUR"}}"#))
        } else if r < 0.013 {
            *mix.poison.entry("zero amount").or_default() += 1;
            OutgoingMessage::new(charge_body(&format!("zero-{i}"), 0))
        } else if r < 0.016 {
            *mix.poison.entry("unsupported schema version").or_default() += 1;
            OutgoingMessage::new(charge_body(&format!("v2-{i}"), amount))
                .header("schema-version", "2")
        } else if r < 0.020 {
            *mix.poison.entry("declined by the gateway").or_default() += 1;
            OutgoingMessage::new(charge_body(&format!("big-{i}"), 900_000))
        } else if r < 0.070 && !valid.is_empty() {
            mix.duplicates += 1;
            let body = valid[rng.gen_range(0..valid.len())].clone();
            OutgoingMessage::new(body)
        } else {
            let id = format!("pay-{i:06}");
            let body = charge_body(&id, amount);
            mix.distinct_valid.insert(id);
            valid.push(body.clone());
            OutgoingMessage::new(body)
        };
        mix.bodies.push(msg);
    }
    mix
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    match demo(&args).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("demo failed: {e:#}");
            ExitCode::from(2)
        }
    }
}

async fn demo(args: &Args) -> anyhow::Result<bool> {
    let bin = match &args.function_bin {
        Some(path) if path.exists() => path.clone(),
        Some(path) => bail!("{} does not exist: build it first", path.display()),
        None => function_binary("charge-payment")?,
    };
    if args.dir.exists() {
        std::fs::remove_dir_all(&args.dir)
            .with_context(|| format!("wiping {}", args.dir.display()))?;
    }
    let sandbox = Sandbox::new(&args.dir)?;
    let say = |s: &str| {
        if !args.json {
            println!("{s}");
        }
    };

    // 1. Enqueue.
    let mix = generate(args.messages, args.seed);
    let total = mix.bodies.len();
    let queue = EmbeddedTransport::open(TransportOptions {
        queue: "charge-payment".into(),
        function: "demo".into(),
        url: sandbox.queue_db().display().to_string(),
        lease: Duration::from_secs(30),
        max_deliveries: 10,
        poll_interval: Duration::from_millis(50),
        declare: true,
    })
    .await?;
    say(&format!(
        "Enqueuing {total} charges into {} ({} distinct payments, {} duplicates, {} poison)...",
        sandbox.queue_db().display(),
        mix.distinct_valid.len(),
        mix.duplicates,
        mix.poison.values().sum::<usize>()
    ));
    for chunk in mix.bodies.chunks(1000) {
        queue.publish(chunk.to_vec()).await?;
    }

    // 2. Work them with the real binary, in its own process.
    let summary_path = sandbox.dir.join("summary.json");
    let mut worker_args = vec![
        "--drain".to_string(),
        "--summary".into(),
        summary_path.display().to_string(),
    ];
    for s in WORKER_SETTINGS {
        worker_args.push("--set".into());
        worker_args.push(s.into());
    }
    let worker_args: Vec<&str> = worker_args.iter().map(String::as_str).collect();
    say(&format!(
        "Running `charge-payment run --drain` (gateway fails 10% of calls, 0.2% of calls panic); logs in {}",
        sandbox.dir.join("worker.log").display()
    ));
    let started = Instant::now();
    let mut worker = sandbox.spawn_worker(&bin, &worker_args, "worker.log")?;
    let bar = ProgressBar::new(total as u64);
    if args.json {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:40.cyan/blue} {pos:>6}/{len} {per_sec:>12}  {msg}",
        )
        .expect("template")
        .progress_chars("=> "),
    );
    let status = loop {
        if let Some(status) = worker.try_wait()? {
            break status;
        }
        let s = queue.stats().await?;
        let remaining = s.ready + s.in_flight + s.delayed;
        bar.set_position(total as u64 - remaining);
        bar.set_message(format!(
            "in flight {:>3}  delayed {:>3}  dead {:>4}",
            s.in_flight, s.delayed, s.dead_lettered
        ));
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    bar.finish_and_clear();
    if !status.success() {
        bail!(
            "the worker exited with {status}; see {}",
            sandbox.dir.join("worker.log").display()
        );
    }
    let wall = started.elapsed();
    let summary: RunSummary = serde_json::from_slice(&std::fs::read(&summary_path)?)?;
    let ledger = ledger_counts(&sandbox.ledger_db())?;
    let stats = queue.stats().await?;
    let processed = summary.succeeded + summary.duplicates_skipped + summary.dead_lettered;
    let distinct_valid = mix.distinct_valid.len() as u64;
    // The gateway deduplicates by key on its own: its replays are duplicates Sluice ran the
    // handler for, so the proof that Sluice absorbed them is that there are none (the demo
    // kills no worker, so there is no crash window between a charge and its record).
    let ok = ledger.charges == distinct_valid
        && ledger.distinct_payments == distinct_valid
        && ledger.replays == 0
        && processed == total as u64
        && stats.is_drained();

    // 3. The summary.
    let msgs_per_s = processed as f64 / summary.elapsed_s.max(1e-9);
    if args.json {
        let json = serde_json::json!({
            "enqueued": total,
            "processed": processed,
            "succeeded": summary.succeeded,
            "retried": summary.retried,
            "immediate_retries": summary.immediate_retries,
            "dead_lettered": summary.dead_lettered,
            "dead_letter_reasons": summary.dead_letter_reasons,
            "duplicates_absorbed": summary.duplicates_skipped,
            "panics_caught": summary.panics,
            "ledger_charges": ledger.charges,
            "gateway_replays": ledger.replays,
            "distinct_valid_payments": distinct_valid,
            "ledger_matches": ok,
            "msgs_per_s": round1(msgs_per_s),
            "p50_ms": summary.p50_ms,
            "p95_ms": summary.p95_ms,
            "p99_ms": summary.p99_ms,
            "elapsed_s": round1(wall.as_secs_f64()),
        });
        println!("{}", serde_json::to_string_pretty(&json)?);
        return Ok(ok);
    }
    let mut rows: Vec<(String, String)> = vec![
        ("messages enqueued".into(), fmt_n(total as u64)),
        ("processed (settled for good)".into(), fmt_n(processed)),
        (
            "  charged (handler succeeded)".into(),
            fmt_n(summary.succeeded),
        ),
        (
            "  duplicates absorbed".into(),
            fmt_n(summary.duplicates_skipped),
        ),
        ("  dead-lettered".into(), fmt_n(summary.dead_lettered)),
    ];
    for (reason, n) in &summary.dead_letter_reasons {
        rows.push((format!("    {reason}"), fmt_n(*n)));
    }
    rows.extend([
        (
            "retried via the queue (delayed)".into(),
            fmt_n(summary.retried),
        ),
        (
            "retried in the slot (immediate)".into(),
            fmt_n(summary.immediate_retries),
        ),
        ("handler panics caught".into(), fmt_n(summary.panics)),
        ("charges in the ledger".into(), fmt_n(ledger.charges)),
        (
            "duplicates the gateway absorbed (Sluice ran them)".into(),
            fmt_n(ledger.replays),
        ),
        ("distinct valid payments".into(), fmt_n(distinct_valid)),
        ("throughput".into(), format!("{msgs_per_s:.0} msg/s")),
        (
            "latency p50 / p95 / p99".into(),
            format!(
                "{:.1} / {:.1} / {:.1} ms",
                summary.p50_ms, summary.p95_ms, summary.p99_ms
            ),
        ),
    ]);
    println!();
    print_table("charge-payment on the embedded queue", &rows);
    println!("  latency: receive to settle, per delivery; throughput: settled messages per second of the run");
    if ok {
        println!("  ✓ every valid payment charged exactly once, each duplicate absorbed by Sluice (none reached the gateway); nothing lost, queue empty");
    } else {
        println!(
            "  ✗ MISMATCH: ledger has {} charges for {} payments, expected {distinct_valid}; {} duplicates reached the gateway (expected 0); processed {processed} of {total}; queue {stats:?}",
            ledger.charges, ledger.distinct_payments, ledger.replays
        );
        return Ok(false);
    }

    // 4. The dead-letter queue, and a redrive (dry run first).
    let cli = |args: &[&str]| run_cli(&sandbox, &bin, args);
    println!("\n$ charge-payment dlq list --limit 6");
    cli(&["dlq", "list", "--limit", "6"])?;
    let first_id = first_dead_letter_id(&sandbox, &bin)?;
    println!("\n$ charge-payment dlq show {first_id}");
    cli(&["dlq", "show", &first_id])?;
    println!("\n$ charge-payment redrive --dry-run --limit 3");
    cli(&["redrive", "--dry-run", "--limit", "3"])?;
    println!("\n$ charge-payment redrive --error-class permanent   (they will fail again: bad input stays bad)");
    let out = run_cli_quiet(&sandbox, &bin, &["redrive", "--error-class", "permanent"])?;
    println!("{}", out.lines().next().unwrap_or_default());
    println!("\n$ charge-payment run --drain");
    let mut again_args = vec!["--drain"];
    for s in WORKER_SETTINGS {
        again_args.extend(["--set", s]);
    }
    let mut again = sandbox.spawn_worker(&bin, &again_args, "worker.log")?;
    let st = again.wait()?;
    if !st.success() {
        bail!("the second run exited with {st}");
    }
    println!("\n$ charge-payment stats");
    cli(&["stats"])?;
    let after = ledger_counts(&sandbox.ledger_db())?;
    println!(
        "\nledger after the redrive: {} charges for {} distinct valid payments (unchanged: nothing charged twice), {} duplicates reached the gateway",
        fmt_n(after.charges),
        fmt_n(distinct_valid),
        fmt_n(after.replays)
    );
    Ok(after.charges == distinct_valid && after.replays == 0)
}

fn run_cli(sandbox: &Sandbox, bin: &Path, args: &[&str]) -> anyhow::Result<()> {
    let status = sandbox
        .command(bin, args, "cli.log")?
        .stdout(Stdio::inherit())
        .status()?;
    if !status.success() {
        bail!("charge-payment {} exited with {status}", args.join(" "));
    }
    Ok(())
}

fn run_cli_quiet(sandbox: &Sandbox, bin: &Path, args: &[&str]) -> anyhow::Result<String> {
    let out = sandbox.command(bin, args, "cli.log")?.output()?;
    if !out.status.success() {
        bail!(
            "charge-payment {} exited with {}",
            args.join(" "),
            out.status
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn first_dead_letter_id(sandbox: &Sandbox, bin: &Path) -> anyhow::Result<String> {
    let json = run_cli_quiet(sandbox, bin, &["dlq", "list", "--limit", "1", "--json"])?;
    let items: Vec<serde_json::Value> = serde_json::from_str(&json)?;
    items
        .first()
        .and_then(|i| i["id"].as_str())
        .map(str::to_owned)
        .context("the dead-letter queue is empty")
}
