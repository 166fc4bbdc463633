//! The chaos harness: charge-payment in the exactly-once configuration (PostgreSQL store and
//! ledger, the ledger table without a unique constraint, so a double charge shows), fed
//! payments with duplicates and poison mixed in, worked by K worker processes while the
//! harness SIGKILLs a random worker every few seconds (and starts it again), cuts the
//! workers' broker and store connections through TCP proxies it owns, and holds the store
//! down for a while. Then it stops the faults, waits for the queue to drain, and counts.
//!
//! Run with `just chaos [embedded|rabbitmq|sqs] [--messages N] [--workers K] [--duration S]
//! [--json]` (docs/reliability.md "Chaos"). Exit 0: nothing lost, nothing charged twice,
//! every poison message dead-lettered; 1: a promise broken (the table says which); 2: the run
//! could not be made.
//!
//! The library beside it holds the messages, the servers and the processes; this file is the
//! schedule of faults and the report.

use std::{
    io::IsTerminal,
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use clap::Parser;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rand::{rngs::StdRng, SeedableRng};
use sluice_tests::{function_binary, report, Sandbox};

use sluice_chaos::{
    mix,
    target::{check_servers, Kind, Ledger, Target},
    workers::Pool,
};

#[derive(Parser, Debug)]
#[command(
    about = "Sluice chaos run: charge-payment exactly-once under kills, cuts and a store outage"
)]
struct Args {
    /// The transport.
    #[arg(value_enum, default_value = "embedded")]
    transport: Kind,
    /// Messages to send (valid payments, duplicates and about 2% poison).
    #[arg(long, default_value_t = 20_000)]
    messages: usize,
    /// Worker processes.
    #[arg(long, default_value_t = 3)]
    workers: usize,
    /// Seconds of faults (longer if sending takes longer: faults last until all is sent).
    #[arg(long, default_value_t = 60)]
    duration: u64,
    /// Print one JSON object on stdout instead of the table.
    #[arg(long)]
    json: bool,
    /// Seconds between SIGKILLs of a random worker.
    #[arg(long, default_value_t = 3.0)]
    kill_every: f64,
    /// Seconds between connection cuts (broker and store in turn; the store only on embedded).
    #[arg(long, default_value_t = 4.0)]
    cut_every: f64,
    /// How long a cut refuses new connections, in milliseconds.
    #[arg(long, default_value_t = 500)]
    cut_ms: u64,
    /// Seconds the store is held down once, half-way (default: a fifth of --duration, 2 to 10).
    #[arg(long)]
    store_down: Option<f64>,
    /// Longest wait for the queue to drain once the faults stop, in seconds.
    #[arg(long, default_value_t = 300)]
    drain_timeout: u64,
    /// Most messages waiting in the queue while sending (moto slows down as a queue grows).
    #[arg(long)]
    max_backlog: Option<u64>,
    /// Working directory (wiped at start; the workers' logs stay there).
    #[arg(long)]
    dir: Option<std::path::PathBuf>,
    /// Seed of the message mix and of the choice of worker to kill.
    #[arg(long, default_value_t = 7)]
    seed: u64,
}

/// What a run counted.
#[derive(Debug, Default)]
struct Outcome {
    sent: u64,
    distinct: u64,
    duplicates: u64,
    poison: u64,
    charged: u64,
    charged_distinct: u64,
    poison_charged: u64,
    /// Distinct messages on the dead-letter queue.
    dead_lettered: u64,
    /// Dead letters beyond one per message (a worker killed or cut off between writing the
    /// dead letter and acking the message writes it again on the next delivery).
    dead_letter_copies: u64,
    /// Valid payments found on the dead-letter queue (must be 0), with their reasons.
    valid_dead_lettered: Vec<String>,
    /// Messages still queued once the workers were stopped (must be 0 after a drain).
    left_after_stop: u64,
    kills: u64,
    cuts: u64,
    store_down_s: f64,
    unplanned_exits: u64,
    starts: u64,
    faults_s: f64,
    drain_s: f64,
    drained: bool,
}

impl Outcome {
    fn lost(&self) -> u64 {
        self.distinct.saturating_sub(self.charged_distinct)
    }
    fn charged_twice(&self) -> u64 {
        self.charged - self.charged_distinct
    }
    fn violations(&self) -> Vec<String> {
        let mut v = Vec::new();
        if self.lost() > 0 {
            v.push(format!("{} payments never charged", self.lost()));
        }
        if self.charged_twice() > 0 {
            v.push(format!("{} extra charges", self.charged_twice()));
        }
        if self.poison_charged > 0 {
            v.push(format!("{} poison messages charged", self.poison_charged));
        }
        if !self.valid_dead_lettered.is_empty() {
            v.push(format!(
                "{} valid payments dead-lettered: {:?}",
                self.valid_dead_lettered.len(),
                self.valid_dead_lettered
            ));
        }
        if self.dead_lettered != self.poison {
            v.push(format!(
                "{} dead-lettered, {} poison sent",
                self.dead_lettered, self.poison
            ));
        }
        if self.left_after_stop > 0 {
            v.push(format!(
                "{} messages still queued after the workers stopped",
                self.left_after_stop
            ));
        }
        if !self.drained {
            v.push("the queue did not drain".into());
        }
        v
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    match chaos(&args).await {
        Ok(outcome) => {
            let violations = outcome.violations();
            if args.json {
                println!("{}", json(&args, &outcome, &violations));
            } else {
                print_report(&args, &outcome, &violations);
            }
            if violations.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("chaos run failed: {e:#}");
            ExitCode::from(2)
        }
    }
}

async fn chaos(args: &Args) -> anyhow::Result<Outcome> {
    anyhow::ensure!(args.workers >= 1, "--workers must be at least 1");
    check_servers(args.transport)?;
    let bin = function_binary("charge-payment")?;
    let dir = args
        .dir
        .clone()
        .unwrap_or_else(|| format!(".sluice/chaos/{}", args.transport.name()).into());
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("wiping {}", dir.display()))?;
    }
    let sandbox = Sandbox::new(&dir)?;
    let run = uuid::Uuid::new_v4().simple().to_string()[..10].to_owned();
    let prefix = format!("chaos-{run}-");
    let target = Target::start(args.transport, &run, &sandbox).await?;
    let ledger = Ledger::connect(&prefix).await?;
    let mix = mix::generate(args.messages, args.seed, &prefix);
    let mut rng = StdRng::seed_from_u64(args.seed);
    let duration = Duration::from_secs(args.duration);
    let store_down = Duration::from_secs_f64(
        args.store_down
            .unwrap_or((args.duration as f64 / 5.0).clamp(2.0, 10.0)),
    );
    let max_backlog = args.max_backlog.unwrap_or(match args.transport {
        Kind::Sqs => 300,
        _ => 5_000,
    });
    let mut out = Outcome {
        sent: mix.messages.len() as u64,
        distinct: mix.distinct_valid,
        duplicates: mix.duplicates,
        poison: mix.poison_total(),
        ..Outcome::default()
    };
    if !args.json {
        eprintln!(
            "chaos on {}: {} messages ({} payments, {} duplicates, {} poison), {} workers, {}s of faults; logs in {}",
            args.transport.name(),
            out.sent,
            out.distinct,
            out.duplicates,
            out.poison,
            args.workers,
            args.duration,
            dir.display()
        );
    }

    let bar = progress(out.distinct);
    let mut pool = Pool::start(&bin, &sandbox.dir, target.worker_env.clone(), args.workers)?;
    let started = Instant::now();
    // Messages go out at an even pace over 80% of the fault period (faults then meet work
    // all along), never more than `max_backlog` ahead of the workers.
    let pace = out.sent as f64 / (duration.as_secs_f64() * 0.8).max(1.0);
    let mut next_send = 0usize;
    let mut pending = target.pending().await?;
    let mut last_stats = Instant::now();
    let mut next_kill = Duration::from_secs_f64(args.kill_every);
    let mut next_cut = Duration::from_secs_f64(args.cut_every);
    let mut cut_broker_next = target.broker.is_some();
    let store_down_at = duration / 2;
    let mut store_down_until: Option<Duration> = None;
    let mut cut_until: Option<Duration> = None;
    let mut last_line = Instant::now();
    let faults_end = loop {
        let t = started.elapsed();
        let all_sent = next_send == mix.messages.len();
        if t >= duration && all_sent {
            break t;
        }
        // Send what is due.
        let due = ((t.as_secs_f64() * pace) as usize).min(mix.messages.len());
        if due > next_send && pending.ready + pending.delayed < max_backlog {
            let upto = due.min(next_send + 500);
            sluice::Transport::publish(
                &target.queue_handle,
                mix.messages[next_send..upto].to_vec(),
            )
            .await
            .context("publishing (straight to the broker)")?;
            next_send = upto;
        }
        // Faults.
        if t >= next_kill {
            pool.kill_random(&mut rng)?;
            next_kill += Duration::from_secs_f64(args.kill_every);
        }
        if t >= next_cut && store_down_until.is_none() {
            match (&target.broker, cut_broker_next) {
                (Some(broker), true) => broker.cut(),
                _ => target.store.cut(),
            }
            out.cuts += 1;
            cut_broker_next = target.broker.is_some() && !cut_broker_next;
            cut_until = Some(t + Duration::from_millis(args.cut_ms));
            next_cut += Duration::from_secs_f64(args.cut_every);
        }
        if cut_until.is_some_and(|u| t >= u) {
            cut_until = None;
            if let Some(b) = &target.broker {
                b.restore();
            }
            if store_down_until.is_none() {
                target.store.restore();
            }
        }
        if store_down_until.is_none() && out.store_down_s == 0.0 && t >= store_down_at {
            target.store.cut();
            store_down_until = Some(t + store_down);
        }
        if store_down_until.is_some_and(|u| t >= u) {
            target.store.restore();
            store_down_until = None;
            out.store_down_s = store_down.as_secs_f64();
        }
        pool.supervise()?;
        if last_stats.elapsed() >= Duration::from_millis(500) {
            pending = target.pending().await.unwrap_or(pending);
            let charged = ledger.counts().await.unwrap_or_default();
            bar.set_position(charged.distinct);
            let status = format!(
                "sent {next_send}/{}  dead {}  kills {}  cuts {}{}",
                out.sent,
                pending.dead_lettered,
                pool.kills,
                out.cuts,
                if store_down_until.is_some() {
                    "  STORE DOWN"
                } else {
                    ""
                }
            );
            if bar.is_hidden() && !args.json && last_line.elapsed() >= Duration::from_secs(5) {
                eprintln!(
                    "[{:>4}s] charged {}/{}  {status}",
                    t.as_secs(),
                    charged.distinct,
                    out.distinct
                );
                last_line = Instant::now();
            }
            bar.set_message(status);
            last_stats = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    if let Some(b) = &target.broker {
        b.restore();
    }
    target.store.restore();
    out.faults_s = faults_end.as_secs_f64();
    if out.store_down_s == 0.0 && store_down_until.is_some() {
        out.store_down_s = (faults_end - store_down_at).as_secs_f64();
    }
    bar.set_message("faults off: draining");

    // Drain: the queue empty (nothing ready, leased or delayed) at two looks in a row.
    let drain_start = Instant::now();
    let mut empty_looks = 0;
    while drain_start.elapsed() < Duration::from_secs(args.drain_timeout) {
        pool.supervise()?;
        pending = target.pending().await?;
        empty_looks = if pending.is_empty() {
            empty_looks + 1
        } else {
            0
        };
        let charged = ledger.counts().await?;
        bar.set_position(charged.distinct);
        bar.set_message(format!(
            "draining: ready {} in flight {} delayed {} dead {}",
            pending.ready, pending.in_flight, pending.delayed, pending.dead_lettered
        ));
        if empty_looks >= 2 {
            out.drained = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    out.drain_s = drain_start.elapsed().as_secs_f64();
    pool.stop(Duration::from_secs(20)).await;
    bar.finish_and_clear();
    let final_pending = target.pending().await?;
    let counts = ledger.counts().await?;
    out.charged = counts.charges;
    out.charged_distinct = counts.distinct;
    out.poison_charged = counts.poison_charged;
    // The dead letters themselves: one per poison message, none for a valid payment.
    let letters = target.dead_letters(&format!("{prefix}pay-")).await?;
    out.dead_lettered = letters.distinct;
    out.dead_letter_copies = letters.copies;
    out.valid_dead_lettered = letters.valid;
    out.left_after_stop = final_pending.ready + final_pending.delayed + final_pending.in_flight;
    if out.lost() > 0 {
        let missing = ledger.missing(&mix.valid_ids).await?;
        eprintln!(
            "never charged ({}): {:?}",
            missing.len(),
            &missing[..missing.len().min(10)]
        );
    }
    out.kills = pool.kills;
    out.unplanned_exits = pool.exits.len() as u64;
    out.starts = pool.starts;
    if !out.drained {
        eprintln!(
            "not drained after {}s: {final_pending:?}",
            args.drain_timeout
        );
    }
    Ok(out)
}

fn progress(len: u64) -> ProgressBar {
    let bar = ProgressBar::new(len);
    if !std::io::stderr().is_terminal() {
        bar.set_draw_target(ProgressDrawTarget::hidden());
    }
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:30} {pos:>6}/{len} charged  {msg}",
        )
        .expect("template")
        .progress_chars("=> "),
    );
    bar
}

fn json(args: &Args, o: &Outcome, violations: &[String]) -> String {
    serde_json::json!({
        "transport": args.transport.name(),
        "workers": args.workers,
        "sent": o.sent,
        "distinct": o.distinct,
        "duplicates": o.duplicates,
        "poison": o.poison,
        "charged": o.charged,
        "lost": o.lost(),
        "charged_twice": o.charged_twice(),
        "poison_charged": o.poison_charged,
        "dead_lettered": o.dead_lettered,
        "dead_letter_copies": o.dead_letter_copies,
        "valid_dead_lettered": o.valid_dead_lettered.len(),
        "left_after_stop": o.left_after_stop,
        "kills": o.kills,
        "cuts": o.cuts,
        "store_down_s": report::round1(o.store_down_s),
        "unplanned_exits": o.unplanned_exits,
        "worker_starts": o.starts,
        "faults_s": report::round1(o.faults_s),
        "drain_s": report::round1(o.drain_s),
        "drained": o.drained,
        "ok": violations.is_empty(),
        "violations": violations,
    })
    .to_string()
}

fn print_report(args: &Args, o: &Outcome, violations: &[String]) {
    let n = report::fmt_n;
    let rows: Vec<(String, String)> = vec![
        ("sent".into(), n(o.sent)),
        ("  distinct payments".into(), n(o.distinct)),
        ("  duplicates".into(), n(o.duplicates)),
        ("  poison".into(), n(o.poison)),
        ("charged (ledger rows)".into(), n(o.charged)),
        ("lost (must be 0)".into(), n(o.lost())),
        ("charged twice (must be 0)".into(), n(o.charged_twice())),
        (
            "dead-lettered (must equal poison)".into(),
            n(o.dead_lettered),
        ),
        (
            "  written twice (kill or cut before the ack)".into(),
            n(o.dead_letter_copies),
        ),
        ("workers SIGKILLed".into(), n(o.kills)),
        ("connections cut".into(), n(o.cuts)),
        ("store held down".into(), format!("{:.1} s", o.store_down_s)),
        ("worker exits on their own".into(), n(o.unplanned_exits)),
        ("faults for".into(), format!("{:.1} s", o.faults_s)),
        ("drain time".into(), format!("{:.1} s", o.drain_s)),
    ];
    println!();
    report::print_table(
        &format!(
            "chaos: charge-payment on {}, {} workers",
            args.transport.name(),
            args.workers
        ),
        &rows,
    );
    if violations.is_empty() {
        println!("  ✓ nothing lost, nothing charged twice, every poison message dead-lettered");
    } else {
        for v in violations {
            println!("  ✗ {v}");
        }
    }
}
