//! Benchmarks, each measured against a baseline in the same run on this machine.
//!
//! `just bench stores`: claim + complete operations per second and latency per idempotency
//! store (SQLite, PostgreSQL, Redis, S3 on moto), with SQLite, the embedded default, as the
//! baseline column. `--json` prints one object keyed by store name.
//!
//! `just bench rabbitmq`: the Sluice pipeline on RabbitMQ against the fastest raw lapin
//! consume+ack loop, on the same broker, queue, prefetch and messages (see [`rabbitmq`]).
//! `--json` prints one object (`raw_msgs_per_s`, `sluice_msgs_per_s`, `ratio`, `p99_ms`,
//! `peak_rss_mb`, ...).
//!
//! The modules: [`stores`] (the store benchmark), [`rabbitmq`] (the RabbitMQ one: its runs in
//! `mod.rs`, the raw lapin baseline and the publisher in `raw.rs`, the Sluice consumers in
//! `pipeline.rs`, the latency proxy in `proxy.rs`, CPU and memory from /proc in `procfs.rs`,
//! the table and JSON in `report.rs`).

mod rabbitmq;
mod stores;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(about = "Sluice benchmarks")]
struct Args {
    #[command(subcommand)]
    what: What,
}

#[derive(Subcommand, Debug)]
enum What {
    /// The Sluice pipeline on RabbitMQ against a raw lapin consume+ack loop.
    Rabbitmq(rabbitmq::Args),
    /// One drain of `bench rabbitmq`, run as a child process so that its peak RSS and CPU
    /// time are its own; prints one JSON line.
    #[command(hide = true)]
    RabbitmqDrain(rabbitmq::DrainArgs),
    /// Claim + complete per idempotency store.
    Stores(stores::Args),
}

fn main() -> ExitCode {
    let args = Args::parse();
    let prefetch = match &args.what {
        What::Rabbitmq(a) => Some(a.prefetch),
        What::RabbitmqDrain(a) => Some(a.prefetch),
        What::Stores(_) => None,
    };
    if let Some(prefetch) = prefetch {
        // Settings of the in-process worker (`sluice_settings` reads the environment); set
        // before any thread.
        std::env::set_var("SLUICE__TRANSPORT__PREFETCH", prefetch.to_string());
        // The bench declares the topology once; the workers only check that it is there.
        std::env::set_var("SLUICE__TRANSPORT__DECLARE", "false");
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
            What::Rabbitmq(a) => rabbitmq::run(a).await,
            What::RabbitmqDrain(a) => rabbitmq::drain_child(a).await,
            What::Stores(a) => stores::run(a).await,
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
