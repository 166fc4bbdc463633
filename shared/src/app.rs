//! The entry point of a function binary: `Function::main` builds the async runtime, chooses
//! the CLI or Lambda mode, and turns the outcome into the exit code.
//!
//! | code | meaning |
//! |---|---|
//! | 0 | success |
//! | 1 | runtime failure (broker or store error) |
//! | 2 | bad usage or configuration (the key is named) |
//! | 3 | not found (`dlq show` of an unknown id) |
//! | 4 | the handler failed under `invoke` |
//! | 130 | a second SIGTERM/SIGINT cut the shutdown short |

use std::process::ExitCode;

use serde::de::DeserializeOwned;

use crate::{
    cli::{self, Outcome},
    error::Error,
    function::Function,
    handler::Handler,
};

/// Exit code: a runtime failure.
pub const EXIT_FAILURE: u8 = 1;
/// Exit code: bad usage or configuration.
pub const EXIT_CONFIG: u8 = 2;
/// Exit code: not found.
pub const EXIT_NOT_FOUND: u8 = 3;
/// Exit code: the handler failed under `invoke`.
pub const EXIT_HANDLER: u8 = 4;

impl<T, S, H> Function<T, S, H>
where
    T: DeserializeOwned + Send + 'static,
    S: Send + Sync + 'static,
    H: for<'a> Handler<'a, T, S>,
{
    /// Parses the command line and runs the chosen command; returns the process exit code.
    /// Under a Lambda runtime (`AWS_LAMBDA_RUNTIME_API` set, feature `lambda`) it serves SQS
    /// events instead.
    pub fn main(self) -> ExitCode {
        let def = self.into_definition();
        #[cfg(feature = "lambda")]
        if crate::lambda::in_lambda() {
            let runtime = match async_runtime() {
                Ok(rt) => rt,
                Err(code) => return code,
            };
            return match runtime.block_on(crate::lambda::serve(def)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    // Start-up errors reach CloudWatch as one line; Lambda reports an init error.
                    eprintln!("error: {}", e.report());
                    ExitCode::from(EXIT_CONFIG)
                }
            };
        }
        let args = cli::parse();
        let runtime = match async_runtime() {
            Ok(rt) => rt,
            Err(code) => return code,
        };
        match runtime.block_on(cli::run(def, args)) {
            Ok(Outcome::Done) => ExitCode::SUCCESS,
            Ok(Outcome::NotFound) => ExitCode::from(EXIT_NOT_FOUND),
            Ok(Outcome::HandlerFailed) => ExitCode::from(EXIT_HANDLER),
            Err(e) => {
                eprintln!("error: {}", e.report());
                ExitCode::from(exit_code(&e))
            }
        }
    }
}

/// The exit code of a failed command.
fn exit_code(e: &Error) -> u8 {
    if e.is_usage() {
        EXIT_CONFIG
    } else {
        EXIT_FAILURE
    }
}

/// The multi-threaded tokio runtime every mode runs on; on failure, the exit code to return.
fn async_runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("error: cannot start the async runtime: {e}");
            ExitCode::from(EXIT_FAILURE)
        })
}
