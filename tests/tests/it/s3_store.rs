//! The idempotency store conformance suite on the S3 conditional-write store, against moto.
//!
//! Needs moto: `eval "$(scripts/moto.sh start)"` (sets `SLUICE_TEST_MOTO` and the AWS
//! variables). Without it the tests fail: they never fall back to real AWS.

use std::sync::Arc;

use sluice::{
    conformance::{store as suite, unique},
    error::Error,
    store::{s3::S3Store, Claim, IdempotencyStore},
};
use tokio::sync::{Barrier, OnceCell};

use crate::support;

/// One bucket per test process, created on first use.
async fn url() -> String {
    static BUCKET: OnceCell<String> = OnceCell::const_new();
    let bucket = BUCKET
        .get_or_init(|| async {
            sluice_tests::moto("S3");
            let bucket = unique("sluice-test").to_lowercase();
            S3Store::open(&format!("s3://{bucket}"), suite::OUTPUT_LIMIT)
                .await
                .expect("open s3 store")
                .ensure_bucket()
                .await
                .unwrap_or_else(|e| panic!("create bucket {bucket} on moto: {e}"));
            bucket
        })
        .await;
    format!("s3://{bucket}/conformance")
}

/// A new handle (its own client and connections) on the shared bucket.
async fn make() -> S3Store {
    S3Store::open(&url().await, suite::OUTPUT_LIMIT)
        .await
        .expect("open s3 store")
}

support::store_conformance!(make);

/// All claimers read the object as absent before any of them writes (each waits at a barrier
/// after its first read), so every one sends `If-None-Match: *`: S3 lets exactly one through,
/// and the others, re-reading, see the winner's live lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conditional_create_race_has_exactly_one_winner() {
    const CLAIMERS: usize = 8;
    let key = unique("s3-race");
    let barrier = Arc::new(Barrier::new(CLAIMERS));
    let mut handles = Vec::new();
    for _ in 0..CLAIMERS {
        let store = make().await.pause_claims_after_read(barrier.clone());
        let key = key.clone();
        handles.push(tokio::spawn(async move {
            store.claim(&key, "fp", suite::LONG).await.expect("claim")
        }));
    }
    let mut won = 0;
    for h in handles {
        match h.await.unwrap() {
            Claim::Acquired(_) => won += 1,
            Claim::InProgress(_) => {}
            other => panic!("unexpected claim outcome {other:?}"),
        }
    }
    assert_eq!(won, 1, "exactly one conditional create wins");
}

/// Each record object is named by the key's hash and holds the raw key; keys that differ only
/// in odd characters get distinct objects.
#[tokio::test]
async fn objects_hold_the_raw_key_and_odd_keys_get_distinct_objects() {
    let s = make().await;
    let base = unique("raw");
    let keys: Vec<String> = ["a/b", "a\\b", "a:b", "a b", "a\nb", "ключ", "🔑", "a%2Fb"]
        .iter()
        .map(|sfx| format!("{base}{sfx}"))
        .collect();
    let mut names = std::collections::HashSet::new();
    for key in &keys {
        let name = s.object_name(key);
        let hash = name
            .strip_prefix("conformance/")
            .unwrap_or_else(|| panic!("object {name:?} is not under the prefix"));
        assert!(
            hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_hexdigit()),
            "{name:?}"
        );
        assert!(names.insert(name), "two keys map to one object");
        assert!(
            matches!(
                s.claim(key, "fp", suite::LONG).await.unwrap(),
                Claim::Acquired(_)
            ),
            "key {key:?} collided with another"
        );
    }
    for key in &keys {
        let body = s
            .read_object(key)
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("no object for {key:?}"));
        let record: serde_json::Value = serde_json::from_slice(&body).expect("JSON record");
        assert_eq!(record["key"], serde_json::json!(key), "{record}");
        assert_eq!(record["state"], "in_progress", "{record}");
    }
}

/// A missing bucket is a clear store error, not an absent record.
#[tokio::test]
async fn a_missing_bucket_is_a_store_error() {
    url().await;
    let s = S3Store::open(
        &format!("s3://{}/x", unique("sluice-missing")),
        suite::OUTPUT_LIMIT,
    )
    .await
    .unwrap();
    match s.claim("k", "fp", suite::LONG).await {
        Err(e @ Error::Store { .. }) => {
            let msg = e.report().to_string();
            assert!(msg.contains("NoSuchBucket"), "{msg}")
        }
        other => panic!("expected a store error, got {other:?}"),
    }
}
