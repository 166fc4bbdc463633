//! The soak: one charge-payment worker (exactly-once configuration, as in `just chaos`) under
//! a steady load for N minutes with faults on (its broker and store connections cut every
//! few seconds, 5% of gateway calls failing), sampling the process's RSS, open file
//! descriptors and sockets from /proc every few seconds. Prints the samples once a minute,
//! the memory slope (least squares over the samples after the first minute, KB/min), and
//! checks at the end that nothing was lost or charged twice.
//!
//! Run with `just soak [minutes]` (docs/reliability.md "Soak"). Exit 1 if anything was lost
//! or charged twice, or if the slope exceeds `--max-slope` when given.

use std::{
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use clap::Parser;
use sluice_chaos::{
    mix,
    target::{check_servers, Kind, Ledger, Target},
    workers::Pool,
};
use sluice_tests::{function_binary, report, Sandbox};

#[derive(Parser, Debug)]
#[command(about = "Sluice soak: one worker under steady load with faults, memory and fds sampled")]
struct Args {
    /// Minutes of load.
    #[arg(default_value_t = 30.0)]
    minutes: f64,
    /// The transport.
    #[arg(long, value_enum, default_value = "rabbitmq")]
    transport: Kind,
    /// Messages per second.
    #[arg(long, default_value_t = 40.0)]
    rate: f64,
    /// Seconds between samples.
    #[arg(long, default_value_t = 5)]
    every: u64,
    /// Seconds between connection cuts (broker and store in turn).
    #[arg(long, default_value_t = 15.0)]
    cut_every: f64,
    /// Fail if memory grows faster than this many KB per minute.
    #[arg(long)]
    max_slope: Option<f64>,
    /// Working directory (wiped at start; the worker's log stays there).
    #[arg(long, default_value = ".sluice/soak")]
    dir: std::path::PathBuf,
    /// Print the result as one JSON object on stdout.
    #[arg(long)]
    json: bool,
}

/// One look at the worker process.
#[derive(Debug, Clone, Copy)]
struct Sample {
    t_s: f64,
    rss_kb: u64,
    fds: u64,
    sockets: u64,
    charged: u64,
    pending: u64,
}

/// VmRSS (KB), open fds and sockets of `pid`, from /proc.
fn proc_sample(pid: u32) -> anyhow::Result<(u64, u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .context("no VmRSS")?
        .parse()?;
    let (mut fds, mut sockets) = (0, 0);
    for e in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
        fds += 1;
        if let Ok(link) = std::fs::read_link(e?.path()) {
            if link.to_string_lossy().starts_with("socket:") {
                sockets += 1;
            }
        }
    }
    Ok((rss, fds, sockets))
}

/// Least-squares slope of `y` over `x`.
fn slope(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    if n < 2.0 {
        return 0.0;
    }
    let (sx, sy) = points
        .iter()
        .fold((0.0, 0.0), |(a, b), (x, y)| (a + x, b + y));
    let (mx, my) = (sx / n, sy / n);
    let (num, den) = points.iter().fold((0.0, 0.0), |(a, b), (x, y)| {
        (a + (x - mx) * (y - my), b + (x - mx) * (x - mx))
    });
    if den == 0.0 {
        0.0
    } else {
        num / den
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    match soak(&args).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("soak failed: {e:#}");
            ExitCode::from(2)
        }
    }
}

async fn soak(args: &Args) -> anyhow::Result<bool> {
    check_servers(args.transport)?;
    let bin = function_binary("charge-payment")?;
    if args.dir.exists() {
        std::fs::remove_dir_all(&args.dir)?;
    }
    let sandbox = Sandbox::new(&args.dir)?;
    let run = uuid::Uuid::new_v4().simple().to_string()[..10].to_owned();
    let prefix = format!("soak-{run}-");
    let target = Target::start(args.transport, &run, &sandbox).await?;
    let ledger = Ledger::connect(&prefix).await?;
    let length = Duration::from_secs_f64(args.minutes * 60.0);
    let total = (args.rate * length.as_secs_f64()) as usize;
    let mix = mix::generate(total, 11, &prefix);
    let mut env = target.worker_env.clone();
    env.push(("SLUICE__APP__FAILURE_RATE".into(), "0.05".into()));
    let mut pool = Pool::start(&bin, &sandbox.dir, env, 1)?;
    let pid = pool.pids()[0];
    eprintln!(
        "soak on {}: {total} messages at {}/s for {:.1} min, connections cut every {}s; worker pid {pid}, log in {}",
        args.transport.name(),
        args.rate,
        args.minutes,
        args.cut_every,
        sandbox.dir.display()
    );
    let started = Instant::now();
    let mut sent = 0usize;
    let mut samples: Vec<Sample> = Vec::new();
    let mut next_sample = Duration::ZERO;
    let mut next_cut = Duration::from_secs_f64(args.cut_every);
    let mut cuts = 0u64;
    let mut broker_next = target.broker.is_some();
    let mut restore_at: Option<Duration> = None;
    while started.elapsed() < length {
        let t = started.elapsed();
        let due = ((t.as_secs_f64() * args.rate) as usize).min(total);
        if due > sent {
            sluice::Transport::publish(&target.queue_handle, mix.messages[sent..due].to_vec())
                .await?;
            sent = due;
        }
        if t >= next_cut {
            match (&target.broker, broker_next) {
                (Some(b), true) => b.cut(),
                _ => target.store.cut(),
            }
            cuts += 1;
            broker_next = target.broker.is_some() && !broker_next;
            restore_at = Some(t + Duration::from_millis(500));
            next_cut += Duration::from_secs_f64(args.cut_every);
        }
        if restore_at.is_some_and(|r| t >= r) {
            restore_at = None;
            if let Some(b) = &target.broker {
                b.restore();
            }
            target.store.restore();
        }
        pool.supervise()?;
        anyhow::ensure!(
            pool.exits.is_empty(),
            "the worker exited during the soak ({:?}); see {}",
            pool.exits,
            sandbox.dir.join("worker-0.log").display()
        );
        if t >= next_sample {
            let (rss_kb, fds, sockets) = proc_sample(pid)?;
            let p = target.pending().await.unwrap_or_default();
            let s = Sample {
                t_s: t.as_secs_f64(),
                rss_kb,
                fds,
                sockets,
                charged: ledger.counts().await?.distinct,
                pending: p.ready + p.in_flight + p.delayed,
            };
            if !args.json {
                eprintln!(
                    "[{:>5.0}s] rss {:>7} KB  fds {:>3}  sockets {:>3}  charged {:>7}  pending {:>5}  cuts {cuts}",
                    s.t_s, s.rss_kb, s.fds, s.sockets, s.charged, s.pending
                );
            }
            samples.push(s);
            next_sample += Duration::from_secs(args.every);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if let Some(b) = &target.broker {
        b.restore();
    }
    target.store.restore();
    // The last messages fall due with the last tick: send them too (a soak that forgot them
    // once reported them as lost).
    if sent < total {
        sluice::Transport::publish(&target.queue_handle, mix.messages[sent..].to_vec()).await?;
    }
    // Drain, then count.
    let drain_start = Instant::now();
    let mut empty = 0;
    while drain_start.elapsed() < Duration::from_secs(300) && empty < 2 {
        empty = if target.pending().await?.is_empty() {
            empty + 1
        } else {
            0
        };
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let drained = empty >= 2;
    pool.stop(Duration::from_secs(20)).await;
    // With no worker left, whatever is still queued is ready (or delayed) again.
    let left = target.pending().await?;
    let counts = ledger.counts().await?;
    let letters = target.dead_letters(&format!("{prefix}pay-")).await?;
    let dead = letters.distinct;
    let lost = mix.distinct_valid.saturating_sub(counts.distinct);
    if lost > 0 || !drained || !left.is_empty() || !letters.valid.is_empty() {
        let missing = ledger.missing(&mix.valid_ids).await?;
        eprintln!(
            "drained: {drained}; left in the queue after the stop: {left:?}; valid payments on the DLQ: {:?}; never charged ({}): {:?}",
            letters.valid,
            missing.len(),
            &missing[..missing.len().min(10)]
        );
    }
    let twice = counts.charges - counts.distinct;
    // Warm-up (pools filling, allocator arenas growing) is the first minute.
    let steady: Vec<(f64, f64)> = samples
        .iter()
        .filter(|s| s.t_s >= 60.0)
        .map(|s| (s.t_s / 60.0, s.rss_kb as f64))
        .collect();
    let kb_per_min = slope(&steady);
    let first = samples.first().copied();
    let last = samples.last().copied();
    let max_fds = samples.iter().map(|s| s.fds).max().unwrap_or(0);
    let max_sockets = samples.iter().map(|s| s.sockets).max().unwrap_or(0);
    let slope_ok = args.max_slope.is_none_or(|m| kb_per_min <= m);
    let ok = lost == 0
        && twice == 0
        && dead == mix.poison_total()
        && letters.valid.is_empty()
        && drained
        && slope_ok;
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "transport": args.transport.name(),
                "minutes": report::round1(started.elapsed().as_secs_f64() / 60.0),
                "sent": total, "lost": lost, "charged_twice": twice,
                "dead_lettered": dead, "dead_letter_copies": letters.copies,
                "valid_dead_lettered": letters.valid.len(), "drained": drained,
                "poison": mix.poison_total(), "cuts": cuts,
                "rss_first_kb": first.map(|s| s.rss_kb), "rss_last_kb": last.map(|s| s.rss_kb),
                "rss_slope_kb_per_min": report::round1(kb_per_min),
                "fds_max": max_fds, "sockets_max": max_sockets, "ok": ok,
            })
        );
        return Ok(ok);
    }
    // One row a minute (and the last).
    println!();
    println!(
        "  {:>6}  {:>9}  {:>4}  {:>7}  {:>8}  {:>7}",
        "min", "RSS KB", "fds", "sockets", "charged", "pending"
    );
    let mut next_row = 0.0;
    for (i, s) in samples.iter().enumerate() {
        if s.t_s >= next_row || i == samples.len() - 1 {
            println!(
                "  {:>6.1}  {:>9}  {:>4}  {:>7}  {:>8}  {:>7}",
                s.t_s / 60.0,
                s.rss_kb,
                s.fds,
                s.sockets,
                s.charged,
                s.pending
            );
            next_row = (s.t_s / 60.0).floor() * 60.0 + 60.0;
        }
    }
    let n = report::fmt_n;
    report::print_table(
        &format!(
            "soak: charge-payment on {}, 1 worker",
            args.transport.name()
        ),
        &[
            (
                "duration".into(),
                format!("{:.1} min", started.elapsed().as_secs_f64() / 60.0),
            ),
            ("sent".into(), n(total as u64)),
            ("lost (must be 0)".into(), n(lost)),
            ("charged twice (must be 0)".into(), n(twice)),
            (
                "dead-lettered / poison".into(),
                format!("{} / {}", n(dead), n(mix.poison_total())),
            ),
            ("  dead letters written twice".into(), n(letters.copies)),
            ("drained at the end".into(), drained.to_string()),
            ("connections cut".into(), n(cuts)),
            (
                "RSS first / last".into(),
                format!(
                    "{} / {} KB",
                    first.map_or(0, |s| s.rss_kb),
                    last.map_or(0, |s| s.rss_kb)
                ),
            ),
            (
                "RSS slope after minute 1".into(),
                format!("{kb_per_min:.1} KB/min"),
            ),
            ("open fds (max)".into(), n(max_fds)),
            ("sockets (max)".into(), n(max_sockets)),
        ],
    );
    Ok(ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slope_of_a_line_and_of_a_flat_series() {
        assert!((slope(&[(0.0, 1.0), (1.0, 3.0), (2.0, 5.0)]) - 2.0).abs() < 1e-9);
        assert_eq!(slope(&[(0.0, 7.0), (1.0, 7.0), (2.0, 7.0)]), 0.0);
    }

    #[test]
    fn this_process_can_be_sampled() {
        let (rss, fds, _) = proc_sample(std::process::id()).unwrap();
        assert!(rss > 0 && fds >= 3);
    }
}
