//! Conformance suites: generic checks that every transport adapter and every idempotency
//! store must pass, each a plain `async fn` that an adapter's test file calls once per check
//! with its constructor (one `#[tokio::test]` per check, so failures name the behaviour).
//!
//! Timing constants are short and documented at their definition; every wait for something
//! that can be observed is a poll with a deadline, never a fixed sleep.

pub mod store;
pub mod transport;

use std::{
    future::Future,
    time::{Duration, Instant},
};

/// How often the suites poll while waiting for something to happen.
pub const POLL: Duration = Duration::from_millis(20);

/// Polls `f` until it returns `Some`, or panics with `what` after `timeout`.
pub async fn poll_until<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// A name no other test uses (queues, keys).
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}
