//! One error type for the runtime; the retry path reads variants, never strings.
//!
//! Broker and store failures keep what failed underneath as their [`std::error::Error::source`];
//! [`Report`] prints the whole chain on one line (the CLI's `error:` line, log fields).

use std::{fmt, time::Duration};

/// The result type of the sluice crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A cause carried by [`Error::Transport`] and [`Error::Store`].
pub type Source = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Everything the runtime, a transport or a store can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A configuration key is missing, unknown or has a bad value. The text names the key.
    #[error("configuration: {0}")]
    Config(String),
    /// The message lease is gone: the message was re-leased by another consumer or settled.
    #[error("lease lost for message {0}: it was redelivered or settled elsewhere")]
    LeaseLost(String),
    /// The idempotency record was taken over by another worker (fencing token mismatch).
    #[error("stale fencing token for idempotency key {0:?}: another worker took the record over")]
    StaleToken(String),
    /// A message or header breaks a limit, checked before any network call.
    #[error("limit exceeded: {0}")]
    Limit(String),
    /// A caller asked for something invalid (reserved header, empty body, unknown id).
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The transport (broker) failed; usually worth retrying.
    #[error("transport: {context}")]
    Transport {
        /// What was being done, on which queue.
        context: String,
        /// What failed underneath, when something did.
        #[source]
        source: Option<Source>,
    },
    /// The idempotency store failed or is unreachable.
    #[error("idempotency store: {context}")]
    Store {
        /// What was being done.
        context: String,
        /// What failed underneath, when something did.
        #[source]
        source: Option<Source>,
    },
    /// The stored output of a handler is larger than the store accepts.
    #[error("handler output is {size} bytes, over the idempotency store limit of {limit} bytes")]
    OutputTooLarge {
        /// Serialized size of the output.
        size: usize,
        /// The configured limit (`store.max_output_bytes`).
        limit: usize,
    },
    /// An operating-system error (files, signals, processes).
    #[error("io")]
    Io(#[from] std::io::Error),
    /// A timeout waiting on a backend.
    #[error("timed out after {0:?}")]
    Timeout(Duration),
}

impl Error {
    /// A broker failure with its cause.
    pub fn transport(context: impl Into<String>, source: impl Into<Source>) -> Self {
        Error::Transport {
            context: context.into(),
            source: Some(source.into()),
        }
    }

    /// A broker failure that has no underlying error (a refused publish, a missing queue).
    pub fn transport_msg(context: impl Into<String>) -> Self {
        Error::Transport {
            context: context.into(),
            source: None,
        }
    }

    /// A store failure with its cause.
    pub fn store(context: impl Into<String>, source: impl Into<Source>) -> Self {
        Error::Store {
            context: context.into(),
            source: Some(source.into()),
        }
    }

    /// A store failure that has no underlying error.
    pub fn store_msg(context: impl Into<String>) -> Self {
        Error::Store {
            context: context.into(),
            source: None,
        }
    }

    /// The same failure seen as a store failure (a store built on a transport's machinery,
    /// a timeout waiting for a store): never reported as a broker problem.
    pub fn into_store(self) -> Self {
        match self {
            Error::Transport { context, source } => Error::Store { context, source },
            other => other,
        }
    }

    /// Whether the caller asked for something the command line should report as usage
    /// (exit code 2) rather than a runtime failure.
    pub fn is_usage(&self) -> bool {
        matches!(self, Error::Config(_) | Error::Invalid(_) | Error::Limit(_))
    }
}

/// An error with its causes on one line: `transport: sqs ReceiveMessage jobs: dispatch
/// failure: connection refused`.
pub struct Report<'a>(pub &'a (dyn std::error::Error + 'static));

impl fmt::Display for Report<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut last = self.0.to_string();
        let mut cause = self.0.source();
        while let Some(e) = cause {
            let text = e.to_string();
            // Some libraries repeat their cause in their own text: print each part once.
            if !last.contains(&text) {
                write!(f, ": {text}")?;
            }
            last = text;
            cause = e.source();
        }
        Ok(())
    }
}

impl fmt::Debug for Report<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl Error {
    /// This error with its causes, for a log field or an `error:` line.
    pub fn report(&self) -> Report<'_> {
        Report(self)
    }
}

impl From<tokio::task::JoinError> for Error {
    fn from(e: tokio::task::JoinError) -> Self {
        // A blocking task (SQLite) that panicked or was cancelled at shutdown.
        Error::transport("a blocking task failed", e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_prints_the_cause_once() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "connection refused");
        let e = Error::transport("rabbitmq connect to amqp://h/%2f", io);
        assert_eq!(
            e.report().to_string(),
            "transport: rabbitmq connect to amqp://h/%2f: connection refused"
        );
        assert!(std::error::Error::source(&e).is_some());
        assert_eq!(
            Error::store_msg("the claim batcher has stopped")
                .report()
                .to_string(),
            "idempotency store: the claim batcher has stopped"
        );
        let io = std::io::Error::other("disk full");
        assert_eq!(Error::from(io).report().to_string(), "io: disk full");
    }
}
