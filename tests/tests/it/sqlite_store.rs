//! The idempotency store conformance suite on the embedded SQLite store.

use std::path::PathBuf;

use sluice::{conformance::store as suite, store::sqlite::SqliteStore};

use crate::support;

/// One file per test process; every handle opens its own connection to it.
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

support::store_conformance!(make);
