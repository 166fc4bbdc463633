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
//! - [`handler`]: what authors write against: [`HandlerError`] and its class, [`Context`].
//! - [`function`]: the [`Function`] builder (`main` is three lines over it).
//! - [`worker`]: the intake loop and the per-message pipeline (DESIGN.md "flow of one message").
//! - [`transport`]: the [`Transport`] contract and one module per broker: `embedded` (SQLite
//!   queue), `rabbitmq`, `sqs`.
//! - [`store`]: the [`IdempotencyStore`] contract, one module per backend (`sqlite`, `postgres`,
//!   `redis`, `s3`) and `front` (the claim batcher, timeouts and the completed-key cache).
//! - [`retry`], [`breaker`], [`ratelimit`]: policies as plain values.
//! - [`config`]: layered settings (defaults < `sluice.toml` < `SLUICE__*` env < `--set`).
//! - [`message`]: bytes + headers, failure history, dead letters.
//! - [`telemetry`]: JSON logs and per-process counters.
//! - [`serve`]: `/healthz`, `/readyz` and `/metrics` of `run` when `telemetry.listen` is set.
//! - [`cli`]: the command line every function gets.
//! - `lambda` (feature `lambda`): SQS events through the same pipeline under `lambda_runtime`.
//! - `conformance` (feature `conformance`): the suites every adapter and store must pass.
//!
//! # Features
//!
//! One per backend, so a binary links only what it uses: `embedded` (default: the SQLite queue
//! and store), `rabbitmq` (lapin), `sqs` (aws-sdk-sqs), `lambda` (lambda_runtime and only the SQS
//! event types of aws_lambda_events; implies `sqs`), `postgres` (tokio-postgres + deadpool),
//! `redis`, `s3` (aws-sdk-s3), `conformance`. A Lambda build (`--no-default-features --features
//! lambda`) links no lapin.
//!
//! # Dependencies
//!
//! Named by the project: tokio, serde, backoff (kept inside [`retry`] only: it carries an
//! "unmaintained" advisory), tracing, config, lapin, aws-sdk-sqs, lambda_runtime. Chosen:
//! `rusqlite` with bundled SQLite (no system library needed; synchronous, so calls run on
//! tokio's blocking pool), `clap` for the CLI, `hdrhistogram` for latency percentiles,
//! `serde_path_to_error` so a bad setting names its key, `humantime-serde` for durations such
//! as `"30s"`, `sha2` for payload fingerprints, `tokio-util` for cancellation tokens,
//! `futures-util` for catching handler panics without a task per try; for the stores
//! `tokio-postgres` with `deadpool-postgres` (no macros or compile-time database, unlike sqlx:
//! light to build), `redis` (the maintained client, with its reconnecting connection manager)
//! and `aws-sdk-s3`.

#![warn(missing_docs)]

pub mod breaker;
pub mod cli;
pub mod config;
#[cfg(feature = "conformance")]
pub mod conformance;
pub mod error;
pub mod function;
pub mod handler;
#[cfg(feature = "lambda")]
pub mod lambda;
pub mod message;
pub mod ratelimit;
pub mod retry;
pub mod serve;
pub mod store;
pub mod telemetry;
pub mod transport;
pub mod worker;

pub use config::Settings;
pub use error::{Error, Result};
pub use function::Function;
pub use handler::{Context, ErrorKind, Handler, HandlerError};
pub use message::{Delivery, Failure, FailureClass, Headers, OutgoingMessage};
pub use store::IdempotencyStore;
/// The cancellation token `run` stops on (re-exported so callers need no tokio-util).
pub use tokio_util::sync::CancellationToken;
pub use transport::Transport;
