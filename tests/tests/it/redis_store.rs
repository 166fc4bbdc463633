//! The idempotency store conformance suite on the Redis store, plus Redis-specific checks:
//! scripts reloaded after `SCRIPT FLUSH`, record TTLs carried by the keys, passwords kept out
//! of errors. Needs Redis at `SLUICE_TEST_REDIS_URL` (default `redis://127.0.0.1:6379/0`;
//! `scripts/services.sh redis` starts one).

use std::time::Duration;

use sluice::{
    conformance::{store as suite, unique},
    store::{
        redis::{record_key, RedisStore, IN_PROGRESS_TTL},
        Claim, ClaimRequest, IdempotencyStore,
    },
};
use sluice_tests::redis_url;

use crate::support;

async fn make() -> RedisStore {
    RedisStore::open(&redis_url(), suite::OUTPUT_LIMIT)
        .await
        .expect("open redis store (is Redis running? scripts/services.sh redis)")
}

/// A plain connection for looking behind the store's back.
async fn raw() -> redis::aio::MultiplexedConnection {
    redis::Client::open(redis_url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .expect("connect to redis")
}

support::store_conformance!(make);

async fn script_flush(conn: &mut redis::aio::MultiplexedConnection) {
    redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async::<()>(conn)
        .await
        .expect("SCRIPT FLUSH");
}

/// After the server forgets its scripts (restart, failover, `SCRIPT FLUSH`), every operation
/// of a store opened before loads them again: single claims, batches and the fenced writes.
#[tokio::test]
async fn scripts_are_reloaded_after_script_flush() {
    let store = make().await;
    let mut conn = raw().await;
    let (single, a, b) = (unique("flush"), unique("flush-a"), unique("flush-b"));

    script_flush(&mut conn).await;
    let Claim::Acquired(token) = store.claim(&single, "fp", suite::LONG).await.unwrap() else {
        panic!("fresh key must be acquired")
    };

    script_flush(&mut conn).await;
    let req = |key: &str| ClaimRequest {
        key: key.to_owned(),
        fingerprint: "fp".to_owned(),
    };
    let got = store
        .claim_many(&[req(&a), req(&b), req(&single)], suite::LONG)
        .await
        .unwrap();
    assert!(matches!(got[0], Claim::Acquired(_)), "{:?}", got[0]);
    assert!(matches!(got[1], Claim::Acquired(_)), "{:?}", got[1]);
    assert!(matches!(got[2], Claim::InProgress(_)), "{:?}", got[2]);
    let (Claim::Acquired(ta), Claim::Acquired(tb)) = (&got[0], &got[1]) else {
        unreachable!()
    };

    script_flush(&mut conn).await;
    store.extend(&single, token, suite::LONG).await.unwrap();
    script_flush(&mut conn).await;
    store
        .complete(&single, token, b"", suite::LONG)
        .await
        .unwrap();
    script_flush(&mut conn).await;
    store.release(&a, *ta).await.unwrap();
    store.complete(&b, *tb, b"b", suite::LONG).await.unwrap();

    assert_eq!(
        store.claim(&single, "fp", suite::LONG).await.unwrap(),
        Claim::Completed(Vec::new()),
        "an empty output is stored as such"
    );
    assert!(matches!(
        store.claim(&a, "fp", suite::LONG).await.unwrap(),
        Claim::Acquired(_)
    ));
    assert_eq!(
        store.claim(&b, "fp", suite::LONG).await.unwrap(),
        Claim::Completed(b"b".to_vec())
    );
}

async fn pttl(conn: &mut redis::aio::MultiplexedConnection, key: &str) -> i64 {
    redis::cmd("PTTL")
        .arg(record_key(key))
        .query_async(conn)
        .await
        .expect("PTTL")
}

/// The record TTL is the key's own expiry in Redis: bounded while in progress, stretched by a
/// lease longer than that bound, and the completion TTL once completed.
#[tokio::test]
async fn records_carry_a_ttl_in_redis() {
    let store = make().await;
    let mut conn = raw().await;
    let key = unique("pttl");
    let Claim::Acquired(token) = store.claim(&key, "fp", suite::LONG).await.unwrap() else {
        panic!("fresh key must be acquired")
    };
    let in_progress = pttl(&mut conn, &key).await;
    assert!(
        in_progress > 0 && in_progress <= IN_PROGRESS_TTL.as_millis() as i64,
        "in progress PTTL {in_progress}"
    );

    let long_lease = IN_PROGRESS_TTL * 2;
    store.extend(&key, token, long_lease).await.unwrap();
    let stretched = pttl(&mut conn, &key).await;
    assert!(
        stretched > IN_PROGRESS_TTL.as_millis() as i64
            && stretched <= long_lease.as_millis() as i64,
        "PTTL after a long extend {stretched}"
    );

    let ttl = Duration::from_secs(30);
    store.complete(&key, token, b"out", ttl).await.unwrap();
    let completed = pttl(&mut conn, &key).await;
    assert!(
        completed > 0 && completed <= ttl.as_millis() as i64,
        "completed PTTL {completed}"
    );
}

/// A password in the URL never shows in an error.
#[tokio::test]
async fn open_errors_do_not_show_the_password() {
    // Port 1 on loopback: nothing listens there, so the connection is refused at once.
    let err = RedisStore::open("redis://:sekret-pw@127.0.0.1:1/0", 1024)
        .await
        .err()
        .expect("nothing listens on port 1");
    let text = err.to_string();
    assert!(!text.contains("sekret-pw"), "{text}");
    assert!(text.contains("redis://:***@127.0.0.1:1/0"), "{text}");
}
