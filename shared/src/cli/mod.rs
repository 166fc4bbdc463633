//! The command line every function binary gets: `run`, `send`, `dlq list|show`, `redrive`,
//! `stats`, `invoke`, `provision`.
//!
//! Only `run` and `invoke` run the function's state initializer; `run` alone opens the
//! idempotency store (and, with `transport.declare` on, creates missing queues). The queue
//! commands open the transport alone, and only `provision` creates anything. Errors are one
//! line on stderr; machine output goes to stdout. `app.rs` turns the outcome into the exit
//! code (docs/cli.md lists them).

mod admin;
mod event;
mod print;
mod workflow;

use std::{io::Read, path::PathBuf, sync::Arc, time::Duration};

use clap::{Args, Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::{
    envelope::FailureClass,
    error::{Error, Result},
    function::Definition,
    handler::ErrorKind,
    telemetry::init_logging,
    transport::{AnyTransport, Purpose},
    worker::RunOptions,
};

/// How a command ended, when it did not fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Done.
    Done,
    /// `dlq show` of an unknown id.
    NotFound,
    /// The handler failed under `invoke`.
    HandlerFailed,
}

#[derive(Parser, Debug)]
#[command(about = "A Sluice function: a task handler with a reliable queue worker around it")]
pub(crate) struct Cli {
    /// A sluice.toml to use instead of the one built into the binary.
    #[arg(long, global = true, env = "SLUICE_CONFIG")]
    config: Option<PathBuf>,
    /// Override a setting, e.g. --set worker.concurrency=4 (repeatable; wins over env).
    #[arg(long = "set", value_name = "KEY=VALUE", global = true)]
    overrides: Vec<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
pub(crate) enum Command {
    /// Work the queue until SIGTERM/SIGINT (or, with --drain, until it is empty).
    Run {
        /// Exit once the queue is empty and nothing is in flight.
        #[arg(long)]
        drain: bool,
        /// Messages handled at once (same as --set worker.concurrency=N).
        #[arg(long)]
        concurrency: Option<usize>,
        /// Write the run summary (counters, latency percentiles) as JSON to this file.
        #[arg(long)]
        summary: Option<PathBuf>,
    },
    /// Enqueue a JSON message from an argument, a file, or stdin.
    Send(SendArgs),
    /// Inspect the dead-letter queue.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
    /// Move dead letters back to the work queue (attempts reset).
    Redrive {
        /// At most this many.
        #[arg(long)]
        limit: Option<usize>,
        /// Show what would move; move nothing.
        #[arg(long)]
        dry_run: bool,
        /// Only those that failed with this class.
        #[arg(long, value_enum)]
        error_class: Option<FailureClass>,
        /// At most this many messages per second (spares a downstream that just recovered).
        #[arg(long)]
        rate: Option<f64>,
        /// Print the moved messages as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Queue depths and the oldest ready message's age.
    Stats {
        /// Print as a JSON object (with --watch, one a line).
        #[arg(long)]
        json: bool,
        /// Refresh until Ctrl-C (SIGINT) or SIGTERM: a table redrawn in place on a terminal,
        /// one line a refresh otherwise.
        #[arg(long)]
        watch: bool,
        /// Time between refreshes of --watch.
        #[arg(long, value_parser = parse_interval, default_value = "2s", requires = "watch")]
        interval: Duration,
    },
    /// Run the handler once on a message, with no queue; prints its output. Given a Lambda
    /// SQS event, runs each record and prints the partial batch response.
    Invoke {
        /// The JSON input, or a Lambda SQS event (or --file, or stdin).
        json: Option<String>,
        /// Read the input from this file.
        #[arg(long)]
        file: Option<PathBuf>,
    },
    /// Declare the queue and dead-letter queue (idempotent).
    Provision,
    /// Where workflow runs stand (their status records in the idempotency store).
    Workflow {
        #[command(subcommand)]
        command: workflow::WorkflowCommand,
    },
}

#[derive(Args, Debug)]
pub(crate) struct SendArgs {
    /// The JSON body. Without it (or with "-"), stdin is read.
    json: Option<String>,
    /// Read the body from this file.
    #[arg(long)]
    file: Option<PathBuf>,
    /// Send this many copies; `{{seq}}` in the body becomes 0, 1, 2, ...
    #[arg(long, default_value_t = 1)]
    count: usize,
    /// A header, e.g. --header schema-version=2 (repeatable).
    #[arg(long = "header", value_name = "NAME=VALUE")]
    headers: Vec<String>,
    /// Deliver after this delay, e.g. 5s.
    #[arg(long, value_parser = humantime::parse_duration)]
    delay: Option<Duration>,
    /// Start a run of this workflow (`<workflows dir>/NAME.toml`): the body goes to its first
    /// step's queue with a routing slip.
    #[arg(long, value_name = "NAME")]
    workflow: Option<String>,
    /// Where workflow definitions are (default `workflows`).
    #[arg(
        long,
        value_name = "DIR",
        env = "SLUICE_WORKFLOWS",
        requires = "workflow"
    )]
    workflows: Option<PathBuf>,
    /// The run's tracking id (`{{seq}}` becomes 0, 1, 2, ...); default a fresh UUID each.
    #[arg(long, requires = "workflow")]
    id: Option<String>,
    /// The caller's W3C trace context to continue (default: the `TRACEPARENT` variable, with
    /// `TRACESTATE`); one that does not parse is ignored with a warning.
    #[arg(long, value_name = "TRACEPARENT")]
    traceparent: Option<String>,
}

#[derive(Subcommand, Debug)]
pub(crate) enum DlqCommand {
    /// List dead letters, oldest first, without consuming them.
    List {
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Print a JSON array.
        #[arg(long)]
        json: bool,
    },
    /// Show one dead letter with its failure history.
    Show {
        /// The message id.
        id: String,
        /// Print as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Parses the command line (clap exits with its own message on bad usage or `--help`).
pub(crate) fn parse() -> Cli {
    Cli::parse()
}

/// Runs the parsed command for a function.
pub(crate) async fn run(def: Definition, cli: Cli) -> Result<Outcome> {
    let result = run_command(def, cli).await;
    // The spans of the command leave before the process does.
    let _ = tokio::task::spawn_blocking(crate::telemetry::trace::shutdown).await;
    result
}

async fn run_command(def: Definition, cli: Cli) -> Result<Outcome> {
    let file_toml = match &cli.config {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .map_err(|e| Error::Config(format!("--config {}: {e}", path.display())))?,
        ),
        None => None,
    };
    // clap keeps only the occurrences after the subcommand when a global option is given on
    // both sides; every `--set` counts, in command-line order, so collect them ourselves.
    let mut overrides = all_sets(std::env::args().skip(1));
    debug_assert!(cli.overrides.iter().all(|o| overrides.contains(o)));
    if let Command::Run {
        concurrency: Some(n),
        ..
    } = &cli.command
    {
        overrides.push(format!("worker.concurrency={n}"));
    }
    let settings = def.load_settings(file_toml.as_deref(), &overrides)?;
    init_logging(&settings.telemetry, &def.name);
    let name = def.name.clone();
    let admin = |settings| {
        let name = name.clone();
        async move { AnyTransport::open(&name, &settings, Purpose::Admin).await }
    };
    match cli.command {
        Command::Run { drain, summary, .. } => {
            if let Some(addr) = settings.telemetry.listen {
                // Before the transport and store open: alive, not ready, while they connect.
                let labels = crate::telemetry::Labels {
                    function: def.name.clone(),
                    queue: settings.queue.clone(),
                    version: settings.telemetry.version.clone(),
                };
                crate::serve::start(addr, def.health.clone(), labels).await?;
            }
            let rt = Arc::new(def.open(settings).await?);
            let shutdown = CancellationToken::new();
            spawn_signal_listener(shutdown.clone());
            let s = rt.run(RunOptions { drain }, shutdown).await?;
            if let Some(path) = summary {
                let json = serde_json::to_vec_pretty(&s).expect("summary serializes");
                std::fs::write(&path, json)?;
            }
            Ok(Outcome::Done)
        }
        Command::Invoke { json, file } => {
            let body = read_body(json, file)?;
            let schema_versions = def.schema_versions.clone();
            let (_, jobs) = def.bind(settings.clone()).await?;
            let metrics = crate::telemetry::Metrics::default();
            let handle = crate::worker::Handle {
                job: &*jobs.main,
                settings: &settings,
                schema_versions: &schema_versions,
                metrics: &metrics,
            };
            // A Lambda SQS event (a file saved from the console, a test fixture): its records.
            if let Some(records) = event::sqs_records(&body) {
                return Ok(event::invoke_records(&handle, records).await);
            }
            Ok(match handle.invoke(&body).await {
                Ok(output) => {
                    println!("{}", String::from_utf8_lossy(&output));
                    Outcome::Done
                }
                Err(e) => {
                    let class = match e.kind {
                        ErrorKind::Transient => "transient",
                        ErrorKind::Permanent => "permanent",
                        ErrorKind::RetryAfter(_) => "retry_after",
                    };
                    eprintln!("error: handler failed ({class}): {}", e.message);
                    Outcome::HandlerFailed
                }
            })
        }
        Command::Send(mut args) => {
            if let Some(name) = args.workflow.take() {
                return workflow::send(&settings, &name, args).await;
            }
            let t = admin(settings.clone()).await?;
            admin::send(&t, &settings, args).await
        }
        Command::Dlq { command } => admin::dlq(&admin(settings).await?, command).await,
        Command::Redrive {
            limit,
            dry_run,
            error_class,
            rate,
            json,
        } => {
            let filter = crate::message::RedriveFilter {
                limit,
                error_class,
                dry_run,
                rate: if dry_run { None } else { rate },
            };
            admin::redrive(&admin(settings).await?, &filter, json).await
        }
        Command::Stats {
            json,
            watch,
            interval,
        } => {
            let t = admin(settings.clone()).await?;
            if watch {
                admin::watch_stats(&t, &settings, json, interval).await
            } else {
                admin::stats(&t, &settings, json).await
            }
        }
        Command::Provision => admin::provision(admin(settings.clone()).await?, &settings).await,
        Command::Workflow { command } => workflow::workflow(&settings, command).await,
    }
}

/// `stats --interval`: a duration of at least 100 ms (a tighter loop only loads the broker).
fn parse_interval(text: &str) -> std::result::Result<Duration, String> {
    let d = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    if d < Duration::from_millis(100) {
        return Err("must be at least 100ms".into());
    }
    Ok(d)
}

/// Every `--set KEY=VALUE` and `--set=KEY=VALUE`, in order. Arguments after `--` are not
/// options.
fn all_sets(args: impl Iterator<Item = String>) -> Vec<String> {
    let mut out = Vec::new();
    let mut args = args.take_while(|a| a != "--");
    while let Some(a) = args.next() {
        if a == "--set" {
            out.extend(args.next());
        } else if let Some(v) = a.strip_prefix("--set=") {
            out.push(v.to_owned());
        }
    }
    out
}

fn spawn_signal_listener(shutdown: CancellationToken) {
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(error = %e, "cannot listen for SIGTERM");
                    return;
                }
            };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
        }
        shutdown.cancel();
        // A second signal means "now": exit at once. Messages in flight are not lost: their
        // leases run out and they are delivered again.
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        tracing::warn!("second signal: exiting without waiting for in-flight messages");
        std::process::exit(130);
    });
}

fn read_body(json: Option<String>, file: Option<PathBuf>) -> Result<Vec<u8>> {
    match (json, file) {
        (Some(_), Some(_)) => Err(Error::Invalid(
            "give the body as an argument or --file, not both".into(),
        )),
        (Some(j), None) if j != "-" => Ok(j.into_bytes()),
        (_, Some(path)) => std::fs::read(&path)
            .map_err(|e| Error::Invalid(format!("--file {}: {e}", path.display()))),
        _ => {
            let mut buf = Vec::new();
            std::io::stdin().read_to_end(&mut buf)?;
            Ok(buf)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_set_counts_before_and_after_the_subcommand() {
        let args = [
            "--set",
            "queue=a",
            "run",
            "--set=worker.concurrency=2",
            "--set",
            "x=1",
        ];
        let got = all_sets(args.iter().map(|s| s.to_string()));
        assert_eq!(got, vec!["queue=a", "worker.concurrency=2", "x=1"]);
        let cli = Cli::try_parse_from(["fn", "--set", "queue=a", "run", "--set", "x=1"]).unwrap();
        assert!(cli.overrides.iter().all(|o| got.contains(o)));
    }
}
