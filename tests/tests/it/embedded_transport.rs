//! The transport conformance suite on the embedded SQLite queue.

use std::time::Duration;

use sluice::{
    conformance::transport as suite,
    transport::{embedded::EmbeddedTransport, TransportOptions},
};

/// Each check gets its own file; handles made with the same queue share it.
async fn make(mut opts: TransportOptions) -> EmbeddedTransport {
    let dir = std::env::temp_dir().join("sluice-conformance");
    opts.url = dir
        .join(format!("{}.db", opts.queue))
        .to_string_lossy()
        .into_owned();
    EmbeddedTransport::open(opts)
        .await
        .expect("open embedded transport")
}

#[tokio::test]
async fn ack_removes_the_message() {
    suite::ack_removes_the_message(make).await;
}

#[tokio::test]
async fn retry_after_hides_the_message_until_the_delay() {
    // The embedded queue stores exact times: no rounding allowed.
    suite::retry_after_hides_the_message_until_the_delay(make, Duration::ZERO).await;
}

#[tokio::test]
async fn dead_letter_keeps_bytes_and_history() {
    suite::dead_letter_keeps_bytes_and_history(make).await;
}

#[tokio::test]
async fn crash_loop_guard_dead_letters_after_max_deliveries() {
    suite::crash_loop_guard_dead_letters_after_max_deliveries(make).await;
}

#[tokio::test]
async fn expired_lease_redelivers_and_stale_holder_cannot_settle() {
    suite::expired_lease_redelivers_and_stale_holder_cannot_settle(make).await;
}

#[tokio::test]
async fn extend_keeps_the_message_leased() {
    suite::extend_keeps_the_message_leased(make).await;
}

#[tokio::test]
async fn release_returns_the_message_at_once() {
    suite::release_returns_the_message_at_once(make).await;
}

#[tokio::test]
async fn redrive_moves_dead_letters_back_with_attempts_reset() {
    suite::redrive_moves_dead_letters_back_with_attempts_reset(make).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_consumers_never_share_a_lease() {
    suite::concurrent_consumers_never_share_a_lease(make).await;
}

#[tokio::test]
async fn stats_count_each_state() {
    suite::stats_count_each_state(make).await;
}
