//! One error type for the runtime; the retry path reads variants, never strings.

use std::time::Duration;

/// The result type of the sluice crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything the runtime, a transport or a store can fail with.
#[derive(Debug, thiserror::Error)]
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
    #[error("transport: {0}")]
    Transport(String),
    /// The idempotency store failed or is unreachable.
    #[error("idempotency store: {0}")]
    Store(String),
    /// The stored output of a handler is larger than the store accepts.
    #[error("handler output is {size} bytes, over the idempotency store limit of {limit} bytes")]
    OutputTooLarge {
        /// Serialized size of the output.
        size: usize,
        /// The configured limit (`store.max_output_bytes`).
        limit: usize,
    },
    /// An operating-system error (files, signals, processes).
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// A timeout waiting on a backend.
    #[error("timed out after {0:?}")]
    Timeout(Duration),
}

#[cfg(feature = "embedded")]
impl From<rusqlite::Error> for Error {
    fn from(e: rusqlite::Error) -> Self {
        Error::Transport(format!("sqlite: {e}"))
    }
}

impl From<tokio::task::JoinError> for Error {
    fn from(e: tokio::task::JoinError) -> Self {
        Error::Transport(format!("blocking task failed: {e}"))
    }
}
