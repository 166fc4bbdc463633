//! The idempotency store conformance suite on the embedded SQLite store.

use std::path::PathBuf;

use sluice::{conformance::store as suite, store::sqlite::SqliteStore};

/// One file per test binary run; every handle opens its own connection to it.
fn path() -> PathBuf {
    static PATH: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    PATH.get_or_init(|| {
        std::env::temp_dir().join(format!("sluice-store-{}.db", uuid::Uuid::new_v4().simple()))
    })
    .clone()
}

async fn make() -> SqliteStore {
    SqliteStore::open(&path().to_string_lossy(), suite::OUTPUT_LIMIT)
        .await
        .expect("open sqlite store")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn claim_race_has_exactly_one_winner() {
    suite::claim_race_has_exactly_one_winner(make).await;
}

#[tokio::test]
async fn completed_record_replays_the_output() {
    suite::completed_record_replays_the_output(make).await;
}

#[tokio::test]
async fn live_lease_reports_in_progress() {
    suite::live_lease_reports_in_progress(make).await;
}

#[tokio::test]
async fn expired_lease_is_taken_over_and_the_old_token_is_stale() {
    suite::expired_lease_is_taken_over_and_the_old_token_is_stale(make).await;
}

#[tokio::test]
async fn fingerprint_mismatch_is_reported() {
    suite::fingerprint_mismatch_is_reported(make).await;
}

#[tokio::test]
async fn record_ttl_expires() {
    suite::record_ttl_expires(make).await;
}

#[tokio::test]
async fn release_lets_the_key_be_claimed_again() {
    suite::release_lets_the_key_be_claimed_again(make).await;
}

#[tokio::test]
async fn extend_keeps_the_lease() {
    suite::extend_keeps_the_lease(make).await;
}

#[tokio::test]
async fn oversized_output_is_refused() {
    suite::oversized_output_is_refused(make).await;
}

#[tokio::test]
async fn odd_keys_are_safe_and_distinct() {
    suite::odd_keys_are_safe_and_distinct(make).await;
}

#[tokio::test]
async fn claim_many_answers_like_single_claims() {
    suite::claim_many_answers_like_single_claims(make).await;
}
