//! Sluice: reliable serverless-style function workers on message queues.
//!
//! A task handler is a plain `async fn(input: T, ctx: &Context<S>) -> Result<O, HandlerError>`;
//! Sluice runs it behind a queue with retries (exponential backoff, full jitter), leases that
//! are extended while work runs, dead-letter queues with failure history and redrive,
//! idempotency records with fencing tokens, a circuit breaker, a rate limit and graceful
//! shutdown. The same function binary gets a CLI (`run`, `send`, `dlq`, `redrive`, `stats`,
//! `invoke`, `provision`).
//!
//! ```no_run
//! use serde::{Deserialize, Serialize};
//! use sluice::{Context, Function, HandlerError};
//!
//! #[derive(Deserialize)]
//! struct Resize { image: String }
//! #[derive(Serialize)]
//! struct Done { thumbnail: String }
//!
//! async fn resize(input: Resize, _ctx: &Context) -> Result<Done, HandlerError> {
//!     Ok(Done { thumbnail: format!("{}.thumb", input.image) })
//! }
//!
//! fn main() -> std::process::ExitCode {
//!     Function::new("resize-image", resize).main()
//! }
//! ```
//!
//! # Layout
//!
//! What authors write against:
//! - [`handler`]: [`HandlerError`] and its class, [`Context`], the [`Handler`] trait.
//! - [`function`]: the [`Function`] builder; [`app`] owns `Function::main`, the exit codes and
//!   the async runtime, and chooses the CLI (`cli`) or Lambda mode (`lambda`).
//!
//! The runtime:
//! - `job`: the handler with its types erased, once, where the function is built.
//! - [`worker`]: the intake loop and the per-message pipeline (docs/architecture.md).
//! - [`transport`]: the [`Transport`] contract and one folder per broker: `embedded` (SQLite
//!   queue), `rabbitmq`, `sqs`; [`topology`] is RabbitMQ's topology as plain data.
//! - [`envelope`]: what Sluice adds to a message, one meaning on every transport, checked
//!   when read; [`dead_letter`] and [`dlq`]: dead letters and the operations on them, once for
//!   every transport; [`lease`] and `batch`: the local lease clock and request batching.
//! - [`store`]: the [`IdempotencyStore`] contract, one module per backend (`sqlite`, `postgres`,
//!   `redis`, `s3`) and `front` (the claim batcher, timeouts and the completed-key cache).
//! - [`retry`], [`breaker`], [`ratelimit`]: policies as plain values.
//! - [`config`]: layered settings (defaults < `sluice.toml` < `SLUICE__*` env < `--set`).
//! - [`message`]: deliveries (bytes, headers, envelope, typed receipt) and what is sent.
//! - [`telemetry`]: JSON logs, the panic hook, per-process counters, probe state; [`serve`]:
//!   `/healthz`, `/readyz` and `/metrics` of `run` when `telemetry.listen` is set.
//! - [`error`], [`time`], [`text`], [`sync`]: errors with their causes, wire times, cut texts,
//!   a mutex a panic cannot poison; `tls`: the rustls client of the PostgreSQL and Redis stores
//!   (RabbitMQ's is lapin's own), trusting the system's roots or `*.tls_ca_file`.
//! - `conformance` (feature `conformance`): the suites every adapter and store must pass.
//!
//! `scripts/check-modules.py` keeps the module graph free of cycles.
//!
//! # Features
//!
//! One per backend, so a binary links only what it uses: `embedded` (default: the SQLite queue
//! and store), `rabbitmq` (lapin), `sqs` (aws-sdk-sqs), `lambda` (lambda_runtime and only the SQS
//! event types of aws_lambda_events; implies `sqs`), `postgres` (tokio-postgres + deadpool),
//! `redis`, `s3` (aws-sdk-s3), `conformance`; and `faults` (the `[fault]` settings: injected
//! failures, latency, panics, crashes and poison, for demos, drills and tests; a binary built
//! without it refuses a `fault.*` key at start); `fuzzing` (entry points for the fuzz targets
//! in `fuzz/`, hidden from the docs: not an API). A Lambda build (`--no-default-features
//! --features lambda`) links no lapin.
//!
//! # Dependencies
//!
//! Named by the project: tokio, serde, backoff (kept inside [`retry`] only: it carries an
//! "unmaintained" advisory), tracing, config, lapin, aws-sdk-sqs, lambda_runtime. Chosen:
//! `rusqlite` with bundled SQLite (no system library needed; synchronous, so calls run on
//! tokio's blocking pool), `clap` for the CLI, `hdrhistogram` for latency percentiles,
//! `serde_path_to_error` so a bad setting names its key, `humantime-serde` for durations such
//! as `"30s"`, `sha2` for payload fingerprints, `tokio-util` for cancellation tokens,
//! `futures-util` for catching handler panics without a task per try, `base64` (already in
//! every Lambda build through lambda_runtime) for SQS bodies that are not text; for the stores
//! `tokio-postgres` with `deadpool-postgres` (no macros or compile-time database, unlike sqlx:
//! light to build), `redis` (the maintained client, with its reconnecting connection manager)
//! and `aws-sdk-s3`; for their TLS `rustls` and `tokio-rustls` (already linked by lapin and the
//! AWS SDK; no OpenSSL) with `rustls-native-certs` for the system's roots.

#![warn(missing_docs)]

pub mod app;
mod batch;
pub mod breaker;
mod cli;
pub mod config;
#[cfg(feature = "conformance")]
pub mod conformance;
pub mod dead_letter;
pub mod dlq;
pub mod envelope;
pub mod error;
pub mod function;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
pub mod handler;
mod job;
#[cfg(feature = "lambda")]
pub mod lambda;
pub mod lease;
pub mod message;
pub mod ratelimit;
pub mod retry;
pub mod serve;
pub mod store;
pub mod sync;
pub mod telemetry;
pub mod text;
pub mod time;
#[cfg(any(feature = "postgres", feature = "redis"))]
mod tls;
pub mod topology;
pub mod tracecontext;
pub mod transport;
pub mod worker;
pub mod workflow;

pub use config::Settings;
pub use dead_letter::DeadLetter;
pub use envelope::Envelope;
pub use error::{Error, Result};
pub use function::Function;
pub use handler::{Context, ErrorKind, Handler, HandlerError};
pub use message::{Delivery, Failure, FailureClass, Headers, OutgoingMessage};
pub use store::IdempotencyStore;
/// The cancellation token `run` stops on (re-exported so callers need no tokio-util).
pub use tokio_util::sync::CancellationToken;
pub use transport::Transport;
