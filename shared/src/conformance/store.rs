//! The idempotency store conformance suite (DESIGN.md "Idempotency without DynamoDB").
//!
//! `make()` must return a new handle (its own connection) on one shared backend, opened with
//! `max_output_bytes = OUTPUT_LIMIT`. Keys are unique per check.

use std::{future::Future, sync::Arc, time::Duration};

use tokio::sync::Barrier;

use super::{poll_until, unique};
use crate::{
    error::Error,
    store::{Claim, ClaimRequest, IdempotencyStore},
};

/// The output size limit the harness must configure.
pub const OUTPUT_LIMIT: usize = 64 * 1024;
/// A lease that outlives any check.
pub const LONG: Duration = Duration::from_secs(60);
/// A lease or TTL that a check waits out.
pub const SHORT: Duration = Duration::from_millis(300);
/// Longest wait for a short lease or TTL to run out (store clocks may be coarse).
pub const EXPIRY_TIMEOUT: Duration = Duration::from_secs(10);

/// Many claimers of one key at once: exactly one wins, the others see it in progress.
pub async fn claim_race_has_exactly_one_winner<S, F, Fut>(make: F)
where
    S: IdempotencyStore,
    F: Fn() -> Fut,
    Fut: Future<Output = S>,
{
    const CLAIMERS: usize = 32;
    let key = unique("race");
    let barrier = Arc::new(Barrier::new(CLAIMERS));
    let mut handles = Vec::new();
    for _ in 0..CLAIMERS {
        let store = make().await;
        let (key, barrier) = (key.clone(), barrier.clone());
        handles.push(tokio::spawn(async move {
            barrier.wait().await;
            store.claim(&key, "fp", LONG).await.expect("claim")
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
    assert_eq!(won, 1, "exactly one claimer wins");
}

/// After `complete`, a claim returns the stored output (the handler is not run again).
pub async fn completed_record_replays_the_output<S, F, Fut>(make: F)
where
    S: IdempotencyStore,
    F: Fn() -> Fut,
    Fut: Future<Output = S>,
{
    let s = make().await;
    let key = unique("done");
    let Claim::Acquired(token) = s.claim(&key, "fp", LONG).await.unwrap() else {
        panic!("fresh key must be acquired")
    };
    s.complete(&key, token, br#"{"charge":"ch_1"}"#, LONG)
        .await
        .unwrap();
    assert_eq!(
        make().await.claim(&key, "fp", LONG).await.unwrap(),
        Claim::Completed(br#"{"charge":"ch_1"}"#.to_vec())
    );
}

/// A live lease held by someone else means "in progress, retry later".
pub async fn live_lease_reports_in_progress<S, F, Fut>(make: F)
where
    S: IdempotencyStore,
    F: Fn() -> Fut,
    Fut: Future<Output = S>,
{
    let s = make().await;
    let key = unique("live");
    assert!(matches!(
        s.claim(&key, "fp", LONG).await.unwrap(),
        Claim::Acquired(_)
    ));
    match make().await.claim(&key, "fp", LONG).await.unwrap() {
        Claim::InProgress(remaining) => {
            assert!(remaining <= LONG && remaining > LONG / 2, "{remaining:?}")
        }
        other => panic!("expected in progress, got {other:?}"),
    }
}

/// An expired lease is taken over; the old holder can no longer complete, release or extend.
pub async fn expired_lease_is_taken_over_and_the_old_token_is_stale<S, F, Fut>(make: F)
where
    S: IdempotencyStore,
    F: Fn() -> Fut,
    Fut: Future<Output = S>,
{
    let old = make().await;
    let new = make().await;
    let key = unique("takeover");
    let Claim::Acquired(old_token) = old.claim(&key, "fp", SHORT).await.unwrap() else {
        panic!("fresh key must be acquired")
    };
    let new_token = poll_until(EXPIRY_TIMEOUT, "a takeover after lease expiry", || async {
        match new.claim(&key, "fp", LONG).await.unwrap() {
            Claim::Acquired(t) => Some(t),
            Claim::InProgress(_) => None,
            other => panic!("unexpected {other:?}"),
        }
    })
    .await;
    assert_ne!(old_token, new_token);
    assert!(matches!(
        old.complete(&key, old_token, b"old", LONG).await,
        Err(Error::StaleToken(_))
    ));
    assert!(matches!(
        old.extend(&key, old_token, LONG).await,
        Err(Error::StaleToken(_))
    ));
    assert!(matches!(
        old.release(&key, old_token).await,
        Err(Error::StaleToken(_))
    ));
    new.complete(&key, new_token, b"new", LONG).await.unwrap();
    assert_eq!(
        old.claim(&key, "fp", LONG).await.unwrap(),
        Claim::Completed(b"new".to_vec())
    );
}

/// The same key with another payload is reported, in progress or completed.
pub async fn fingerprint_mismatch_is_reported<S, F, Fut>(make: F)
where
    S: IdempotencyStore,
    F: Fn() -> Fut,
    Fut: Future<Output = S>,
{
    let s = make().await;
    let key = unique("fp");
    let Claim::Acquired(token) = s.claim(&key, "fp-a", LONG).await.unwrap() else {
        panic!("fresh key must be acquired")
    };
    assert_eq!(
        s.claim(&key, "fp-b", LONG).await.unwrap(),
        Claim::FingerprintMismatch
    );
    s.complete(&key, token, b"out", LONG).await.unwrap();
    assert_eq!(
        s.claim(&key, "fp-b", LONG).await.unwrap(),
        Claim::FingerprintMismatch
    );
}

/// A completed record expires after its TTL; the key can then be claimed afresh.
pub async fn record_ttl_expires<S, F, Fut>(make: F)
where
    S: IdempotencyStore,
    F: Fn() -> Fut,
    Fut: Future<Output = S>,
{
    let s = make().await;
    let key = unique("ttl");
    let Claim::Acquired(token) = s.claim(&key, "fp", LONG).await.unwrap() else {
        panic!("fresh key must be acquired")
    };
    s.complete(&key, token, b"out", SHORT).await.unwrap();
    assert!(matches!(
        s.claim(&key, "fp", LONG).await.unwrap(),
        Claim::Completed(_)
    ));
    poll_until(EXPIRY_TIMEOUT, "the record to expire", || async {
        match s.claim(&key, "fp", LONG).await.unwrap() {
            Claim::Acquired(_) => Some(()),
            Claim::Completed(_) => None,
            other => panic!("unexpected {other:?}"),
        }
    })
    .await;
}

/// Releasing an in-progress record lets the next delivery claim it at once.
pub async fn release_lets_the_key_be_claimed_again<S, F, Fut>(make: F)
where
    S: IdempotencyStore,
    F: Fn() -> Fut,
    Fut: Future<Output = S>,
{
    let s = make().await;
    let key = unique("release");
    let Claim::Acquired(token) = s.claim(&key, "fp", LONG).await.unwrap() else {
        panic!("fresh key must be acquired")
    };
    s.release(&key, token).await.unwrap();
    assert!(matches!(
        make().await.claim(&key, "fp", LONG).await.unwrap(),
        Claim::Acquired(_)
    ));
}

/// Extending a lease keeps others out past the original lease.
pub async fn extend_keeps_the_lease<S, F, Fut>(make: F)
where
    S: IdempotencyStore,
    F: Fn() -> Fut,
    Fut: Future<Output = S>,
{
    let s = make().await;
    let other = make().await;
    let key = unique("extend");
    let Claim::Acquired(token) = s.claim(&key, "fp", SHORT).await.unwrap() else {
        panic!("fresh key must be acquired")
    };
    s.extend(&key, token, LONG).await.unwrap();
    // Wait past the original lease by polling the other handle: it must stay in progress.
    let until = tokio::time::Instant::now() + SHORT * 3;
    while tokio::time::Instant::now() < until {
        assert!(matches!(
            other.claim(&key, "fp", LONG).await.unwrap(),
            Claim::InProgress(_)
        ));
        tokio::time::sleep(super::POLL).await;
    }
    s.complete(&key, token, b"ok", LONG).await.unwrap();
}

/// Outputs over the limit are refused with a clear error, and the record stays claimable.
pub async fn oversized_output_is_refused<S, F, Fut>(make: F)
where
    S: IdempotencyStore,
    F: Fn() -> Fut,
    Fut: Future<Output = S>,
{
    let s = make().await;
    let key = unique("big");
    let Claim::Acquired(token) = s.claim(&key, "fp", LONG).await.unwrap() else {
        panic!("fresh key must be acquired")
    };
    let big = vec![b'x'; OUTPUT_LIMIT + 1];
    match s.complete(&key, token, &big, LONG).await {
        Err(Error::OutputTooLarge { size, limit }) => {
            assert_eq!((size, limit), (OUTPUT_LIMIT + 1, OUTPUT_LIMIT))
        }
        other => panic!("expected OutputTooLarge, got {other:?}"),
    }
    s.complete(&key, token, &big[..OUTPUT_LIMIT], LONG)
        .await
        .unwrap();
}

/// Keys with quotes, wildcards, separators and non-ASCII are stored as themselves: no
/// injection, and keys that differ only in such characters do not collide.
pub async fn odd_keys_are_safe_and_distinct<S, F, Fut>(make: F)
where
    S: IdempotencyStore,
    F: Fn() -> Fut,
    Fut: Future<Output = S>,
{
    let s = make().await;
    let base = unique("odd");
    let suffixes = [
        "'; DROP TABLE idempotency; --",
        "%",
        "_",
        "*",
        "a:b",
        "a/b",
        "a\\b",
        "\"quoted\"",
        " spaced ",
        "ключ",
        "🔑",
        "line\nbreak",
        "{lua}",
        "",
    ];
    let mut tokens = Vec::new();
    for sfx in suffixes {
        let key = format!("{base}{sfx}");
        match s.claim(&key, "fp", LONG).await.unwrap() {
            Claim::Acquired(t) => tokens.push((key, t)),
            other => panic!("key {key:?} collided with another: {other:?}"),
        }
    }
    for (i, (key, token)) in tokens.iter().enumerate() {
        s.complete(key, *token, format!("{i}").as_bytes(), LONG)
            .await
            .unwrap();
    }
    for (i, (key, _)) in tokens.iter().enumerate() {
        assert_eq!(
            s.claim(key, "fp", LONG).await.unwrap(),
            Claim::Completed(format!("{i}").into_bytes()),
            "key {key:?}"
        );
    }
}

/// A batch claim answers, per key and in order, what single claims would: fresh keys are
/// acquired, completed ones replay their output, live leases are in progress, reused keys with
/// another payload are mismatches.
pub async fn claim_many_answers_like_single_claims<S, F, Fut>(make: F)
where
    S: IdempotencyStore,
    F: Fn() -> Fut,
    Fut: Future<Output = S>,
{
    let s = make().await;
    let (done, busy, other, fresh) = (
        unique("m-done"),
        unique("m-busy"),
        unique("m-fp"),
        unique("m-new"),
    );
    let Claim::Acquired(t) = s.claim(&done, "fp", LONG).await.unwrap() else {
        panic!("fresh key must be acquired")
    };
    s.complete(&done, t, b"stored", LONG).await.unwrap();
    assert!(matches!(
        s.claim(&busy, "fp", LONG).await.unwrap(),
        Claim::Acquired(_)
    ));
    assert!(matches!(
        s.claim(&other, "fp-a", LONG).await.unwrap(),
        Claim::Acquired(_)
    ));
    let req = |key: &str, fp: &str| ClaimRequest {
        key: key.to_owned(),
        fingerprint: fp.to_owned(),
    };
    let got = make()
        .await
        .claim_many(
            &[
                req(&fresh, "fp"),
                req(&done, "fp"),
                req(&busy, "fp"),
                req(&other, "fp-b"),
            ],
            LONG,
        )
        .await
        .unwrap();
    assert_eq!(got.len(), 4);
    assert!(matches!(got[0], Claim::Acquired(_)), "{:?}", got[0]);
    assert_eq!(got[1], Claim::Completed(b"stored".to_vec()));
    assert!(matches!(got[2], Claim::InProgress(_)), "{:?}", got[2]);
    assert_eq!(got[3], Claim::FingerprintMismatch);
    let Claim::Acquired(t) = got[0] else {
        unreachable!()
    };
    s.complete(&fresh, t, b"batched", LONG)
        .await
        .expect("a batch claim's token completes");
    assert!(
        make().await.claim_many(&[], LONG).await.unwrap().is_empty(),
        "an empty batch is fine"
    );
}
