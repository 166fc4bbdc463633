//! The command line every function binary gets: `run`, `send`, `dlq list|show`, `redrive`,
//! `stats`, `invoke`, `provision`.
//!
//! Exit codes: 0 success; 1 runtime failure (broker or store error); 2 bad usage or
//! configuration (the key is named); 3 not found (`dlq show` of an unknown id); 4 the handler
//! failed under `invoke`. Errors are one line on stderr; machine output goes to stdout.

use std::{io::Read, path::PathBuf, process::ExitCode, sync::Arc, time::Duration};

use clap::{Args, Parser, Subcommand};
use rand::Rng;
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;

use crate::{
    error::{Error, Result},
    function::Function,
    handler::{ErrorKind, Handler},
    message::{check_envelope, DeadLetter, FailureClass, OutgoingMessage, RedriveFilter},
    telemetry::init_logging,
    transport::Transport,
    worker::{RunOptions, Runtime},
};

/// Exit code: a runtime failure.
pub const EXIT_FAILURE: u8 = 1;
/// Exit code: bad usage or configuration.
pub const EXIT_CONFIG: u8 = 2;
/// Exit code: not found.
pub const EXIT_NOT_FOUND: u8 = 3;
/// Exit code: the handler failed under `invoke`.
pub const EXIT_HANDLER: u8 = 4;

/// Most messages published per transaction by `send --count`.
const SEND_CHUNK: usize = 500;

#[derive(Parser, Debug)]
#[command(about = "A Sluice function: a task handler with a reliable queue worker around it")]
struct Cli {
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
enum Command {
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
    /// Queue depths.
    Stats {
        /// Print as a JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Run the handler once on a message, with no queue; prints its output.
    Invoke {
        /// The JSON input (or --file, or stdin).
        json: Option<String>,
        /// Read the input from this file.
        #[arg(long)]
        file: Option<PathBuf>,
    },
    /// Declare the queue and dead-letter queue (idempotent).
    Provision,
}

#[derive(Args, Debug)]
struct SendArgs {
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
}

#[derive(Subcommand, Debug)]
enum DlqCommand {
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

/// Runs the CLI for a function; the exit code follows the table at the top of this file.
pub(crate) fn main<T, S, H>(function: Function<T, S, H>) -> ExitCode
where
    T: DeserializeOwned + Send + 'static,
    S: Send + Sync + 'static,
    H: for<'a> Handler<'a, T, S>,
{
    let cli = Cli::parse();
    let runtime = match async_runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    match runtime.block_on(dispatch(function, cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(match e {
                Error::Config(_) | Error::Invalid(_) | Error::Limit(_) => EXIT_CONFIG,
                _ => EXIT_FAILURE,
            })
        }
    }
}

async fn dispatch<T, S, H>(function: Function<T, S, H>, cli: Cli) -> Result<ExitCode>
where
    T: DeserializeOwned + Send + 'static,
    S: Send + Sync + 'static,
    H: for<'a> Handler<'a, T, S>,
{
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
    let settings = function.load_settings(file_toml.as_deref(), &overrides)?;
    init_logging(&settings.telemetry);
    if let (Command::Run { .. }, Some(addr)) = (&cli.command, settings.telemetry.listen) {
        crate::serve::start(addr, function.health.clone()).await?;
    }
    let rt = Arc::new(function.build(settings).await?);
    match cli.command {
        Command::Run { drain, summary, .. } => {
            let shutdown = CancellationToken::new();
            spawn_signal_listener(shutdown.clone());
            let s = rt.run(RunOptions { drain }, shutdown).await?;
            if let Some(path) = summary {
                let json = serde_json::to_vec_pretty(&s).expect("summary serializes");
                std::fs::write(&path, json)?;
            }
        }
        Command::Send(args) => send(&rt, args).await?,
        Command::Dlq { command } => match command {
            DlqCommand::List { limit, json } => {
                let items = rt.transport().dlq_list(limit).await?;
                if json {
                    println!(
                        "{}",
                        serde_json::to_string_pretty(&items).expect("serializes")
                    );
                } else {
                    print_dead_letters(&items);
                }
            }
            DlqCommand::Show { id, json } => match rt.transport().dlq_get(&id).await? {
                None => {
                    eprintln!("error: no dead letter with id {id}");
                    return Ok(ExitCode::from(EXIT_NOT_FOUND));
                }
                Some(dl) if json => {
                    println!("{}", serde_json::to_string_pretty(&dl).expect("serializes"))
                }
                Some(dl) => print_dead_letter(&dl),
            },
        },
        Command::Redrive {
            limit,
            dry_run,
            error_class,
            rate,
            json,
        } => {
            let filter = RedriveFilter {
                limit,
                error_class,
                dry_run,
            };
            let moved = match rate {
                Some(rate) if !dry_run => redrive_paced(rt.transport(), &filter, rate).await?,
                _ => rt.transport().redrive(&filter).await?,
            };
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&moved).expect("serializes")
                );
            } else {
                let verb = if dry_run { "would redrive" } else { "redrove" };
                println!("{verb} {} message(s)", moved.len());
                for dl in &moved {
                    println!(
                        "  {}  {:<10} {}",
                        dl.id,
                        dl.error_class.as_str(),
                        one_line(&dl.last_error, 90)
                    );
                }
            }
        }
        Command::Stats { json } => {
            let s = rt.transport().stats().await?;
            if json {
                println!("{}", serde_json::to_string(&s).expect("serializes"));
            } else {
                println!("queue          {}", rt.settings().queue);
                println!("ready          {}", s.ready);
                println!("in_flight      {}", s.in_flight);
                println!("delayed        {}", s.delayed);
                println!("dead_lettered  {}", s.dead_lettered);
            }
        }
        Command::Invoke { json, file } => {
            let body = read_body(json, file)?;
            return Ok(match rt.invoke(&body).await {
                Ok(output) => {
                    println!("{}", String::from_utf8_lossy(&output));
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    let class = match e.kind {
                        ErrorKind::Transient => "transient",
                        ErrorKind::Permanent => "permanent",
                        ErrorKind::RetryAfter(_) => "retry_after",
                    };
                    eprintln!("error: handler failed ({class}): {}", e.message);
                    ExitCode::from(EXIT_HANDLER)
                }
            });
        }
        Command::Provision => {
            rt.transport().provision().await?;
            println!("provisioned queue {}", rt.settings().queue);
            if let Some(store) = &rt.store {
                store.store().provision().await?;
                println!(
                    "provisioned the {} idempotency store",
                    rt.settings().store.kind.name()
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Redrives one message at a time, `rate` per second at most.
async fn redrive_paced(
    transport: &impl Transport,
    filter: &RedriveFilter,
    rate: f64,
) -> Result<Vec<DeadLetter>> {
    if !(rate > 0.0 && rate.is_finite()) {
        return Err(Error::Invalid(format!(
            "--rate {rate}: must be a positive number of messages per second"
        )));
    }
    let every = Duration::from_secs_f64(1.0 / rate);
    let one = RedriveFilter {
        limit: Some(1),
        ..filter.clone()
    };
    let mut moved = Vec::new();
    let mut next = tokio::time::Instant::now();
    while filter.limit.is_none_or(|l| moved.len() < l) {
        tokio::time::sleep_until(next).await;
        next += every;
        let got = transport.redrive(&one).await?;
        if got.is_empty() {
            break;
        }
        moved.extend(got);
    }
    Ok(moved)
}

/// The multi-threaded tokio runtime every mode runs on; on failure, the exit code to return.
pub(crate) fn async_runtime() -> std::result::Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("error: cannot start the async runtime: {e}");
            ExitCode::from(EXIT_FAILURE)
        })
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

async fn send<T, S, H>(rt: &Runtime<T, S, H>, args: SendArgs) -> Result<()>
where
    T: DeserializeOwned + Send + 'static,
    S: Send + Sync + 'static,
    H: for<'a> Handler<'a, T, S>,
{
    let body = read_body(args.json, args.file)?;
    let mut headers = crate::message::Headers::new();
    for h in &args.headers {
        let (name, value) = h
            .split_once('=')
            .ok_or_else(|| Error::Invalid(format!("--header {h:?}: expected NAME=VALUE")))?;
        headers.insert(name.trim().to_ascii_lowercase(), value.to_owned());
    }
    // Refuse here what the worker would dead-letter: limits and header rules (not the body's
    // JSON, so that bad input can still be sent on purpose).
    check_envelope(&body, &headers, &rt.settings().limits)
        .map_err(|(_, reason)| Error::Limit(reason))?;
    let text = String::from_utf8_lossy(&body).into_owned();
    let templated = text.contains("{{seq}}");
    let poison_rate = rt.settings().fault.poison_rate;
    let mut sent = 0usize;
    let mut batch = Vec::with_capacity(SEND_CHUNK.min(args.count));
    for seq in 0..args.count {
        let mut b = if templated {
            text.replace("{{seq}}", &seq.to_string()).into_bytes()
        } else {
            body.clone()
        };
        if poison_rate > 0.0 && rand::thread_rng().gen::<f64>() < poison_rate {
            // fault.poison_rate: a corrupted body exercises the bad-input path.
            b.truncate(b.len() / 2);
            b.extend_from_slice(b"\xff<poison>");
        }
        batch.push(OutgoingMessage {
            body: b,
            headers: headers.clone(),
            delay: args.delay.unwrap_or_default(),
        });
        if batch.len() == SEND_CHUNK || seq + 1 == args.count {
            let n = batch.len();
            let ids = rt.transport().publish(std::mem::take(&mut batch)).await?;
            sent += n;
            if args.count == 1 {
                println!("{}", ids[0]);
            }
        }
    }
    if args.count != 1 {
        println!("sent {sent} message(s) to {}", rt.settings().queue);
    }
    Ok(())
}

fn one_line(s: &str, max: usize) -> String {
    let s = s.replace('\n', " ");
    if s.chars().count() > max {
        let cut: String = s.chars().take(max - 1).collect();
        format!("{cut}…")
    } else {
        s
    }
}

fn print_dead_letters(items: &[DeadLetter]) {
    if items.is_empty() {
        println!("dead-letter queue is empty");
        return;
    }
    println!(
        "{:<36}  {:>8}  {:<10}  last error",
        "id", "attempts", "class"
    );
    for dl in items {
        println!(
            "{:<36}  {:>8}  {:<10}  {}",
            dl.id,
            dl.attempts,
            dl.error_class.as_str(),
            one_line(&dl.last_error, 80)
        );
    }
}

fn print_dead_letter(dl: &DeadLetter) {
    println!("id                {}", dl.id);
    println!("function          {}", dl.function);
    println!("original queue    {}", dl.original_queue);
    println!("error class       {}", dl.error_class.as_str());
    println!("attempts          {}", dl.attempts);
    println!("first failure at  {}", dl.first_failure_at);
    println!("last failure at   {}", dl.last_failure_at);
    println!("redriven before   {}", dl.redriven);
    println!("last error        {}", dl.last_error);
    for (k, v) in &dl.headers {
        println!("header            {k}: {v}");
    }
    match (&dl.body, &dl.body_hex) {
        (Some(b), _) => println!("body              {b}"),
        (None, Some(h)) => println!("body (hex)        {h}"),
        _ => {}
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
