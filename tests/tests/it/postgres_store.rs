//! The idempotency store conformance suite on the PostgreSQL store, and the exactly-once
//! primitive (`begin_effects` / `commit_with_complete`) on the real server.
//!
//! Needs a server at `SLUICE_TEST_POSTGRES_URL` (default
//! `postgres://root@127.0.0.1:5432/test`); keys are unique per check, so runs can share it.

use sluice::{
    conformance::{poll_until, store as suite, unique},
    error::Error,
    store::{
        postgres::{tokio_postgres, PgEffects, PostgresStore},
        Claim, ClaimRequest, IdempotencyStore,
    },
};
use sluice_tests::postgres_url;

use crate::support::{self, postgres_client};

/// A new store (its own pool) on the shared server.
async fn make() -> PostgresStore {
    PostgresStore::open(&postgres_url(), suite::OUTPUT_LIMIT)
        .await
        .expect("open postgres store")
}

support::store_conformance!(make);

// ---- The exactly-once primitive ------------------------------------------------------------

/// A plain connection of the test's own, outside any store, to set up and to look.
async fn plain() -> tokio_postgres::Client {
    let client = postgres_client().await;
    // One table for every effects test (ids are unique); the lock serializes the creation
    // between test processes.
    client
        .batch_execute(
            "BEGIN;
             SELECT pg_advisory_xact_lock(7308623989547099200);
             CREATE TABLE IF NOT EXISTS sluice_test_effects (id TEXT PRIMARY KEY, note TEXT NOT NULL);
             COMMIT;",
        )
        .await
        .expect("create the effects table");
    client
}

async fn backend_pid(fx: &PgEffects) -> i32 {
    fx.client()
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0)
}

async fn effect_exists(client: &tokio_postgres::Client, id: &str) -> bool {
    client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM sluice_test_effects WHERE id = $1)",
            &[&id],
        )
        .await
        .expect("look for the effect")
        .get(0)
}

#[tokio::test]
async fn effects_commit_with_the_completion() {
    let (store, outside) = (make().await, plain().await);
    let key = unique("fx-commit");
    let Claim::Acquired(token) = store.claim(&key, "fp", suite::LONG).await.unwrap() else {
        panic!("fresh key must be acquired")
    };
    let fx = store.begin_effects().await.unwrap();
    fx.client()
        .execute(
            "INSERT INTO sluice_test_effects (id, note) VALUES ($1, 'charged')",
            &[&key],
        )
        .await
        .unwrap();
    assert!(
        !effect_exists(&outside, &key).await,
        "not visible before commit"
    );
    fx.commit_with_complete(&key, token, b"receipt", suite::LONG)
        .await
        .unwrap();
    assert!(effect_exists(&outside, &key).await, "visible after commit");
    assert_eq!(
        make().await.claim(&key, "fp", suite::LONG).await.unwrap(),
        Claim::Completed(b"receipt".to_vec())
    );
}

#[tokio::test]
async fn stale_token_rolls_the_effects_back() {
    let (old, new, outside) = (make().await, make().await, plain().await);
    let key = unique("fx-stale");
    let Claim::Acquired(old_token) = old.claim(&key, "fp", suite::SHORT).await.unwrap() else {
        panic!("fresh key must be acquired")
    };
    let fx = old.begin_effects().await.unwrap();
    fx.client()
        .execute(
            "INSERT INTO sluice_test_effects (id, note) VALUES ($1, 'old holder')",
            &[&key],
        )
        .await
        .unwrap();
    // The old holder stalls past its lease; another worker takes the record over.
    let new_token = poll_until(
        suite::EXPIRY_TIMEOUT,
        "a takeover after lease expiry",
        || async {
            match new.claim(&key, "fp", suite::LONG).await.unwrap() {
                Claim::Acquired(t) => Some(t),
                Claim::InProgress(_) => None,
                other => panic!("unexpected {other:?}"),
            }
        },
    )
    .await;
    match fx
        .commit_with_complete(&key, old_token, b"old", suite::LONG)
        .await
    {
        Err(Error::StaleToken(k)) => assert_eq!(k, key),
        other => panic!("expected StaleToken, got {other:?}"),
    }
    assert!(
        !effect_exists(&outside, &key).await,
        "the stale holder's effect was rolled back"
    );
    // The new holder is unaffected and completes.
    new.complete(&key, new_token, b"new", suite::LONG)
        .await
        .unwrap();
    assert_eq!(
        old.claim(&key, "fp", suite::LONG).await.unwrap(),
        Claim::Completed(b"new".to_vec())
    );
}

#[tokio::test]
async fn oversized_output_rolls_the_effects_back() {
    let (store, outside) = (make().await, plain().await);
    let key = unique("fx-big");
    let Claim::Acquired(token) = store.claim(&key, "fp", suite::LONG).await.unwrap() else {
        panic!("fresh key must be acquired")
    };
    let fx = store.begin_effects().await.unwrap();
    fx.client()
        .execute(
            "INSERT INTO sluice_test_effects (id, note) VALUES ($1, 'big')",
            &[&key],
        )
        .await
        .unwrap();
    let big = vec![b'x'; suite::OUTPUT_LIMIT + 1];
    assert!(matches!(
        fx.commit_with_complete(&key, token, &big, suite::LONG)
            .await,
        Err(Error::OutputTooLarge { .. })
    ));
    assert!(!effect_exists(&outside, &key).await);
    // The record is still ours and in progress.
    store
        .complete(&key, token, b"small", suite::LONG)
        .await
        .unwrap();
}

#[tokio::test]
async fn dropped_effects_leave_nothing_and_no_open_transaction() {
    let (store, outside) = (make().await, plain().await);
    let key = unique("fx-drop");
    let fx = store.begin_effects().await.unwrap();
    fx.client()
        .execute(
            "INSERT INTO sluice_test_effects (id, note) VALUES ($1, 'abandoned')",
            &[&key],
        )
        .await
        .unwrap();
    let pid = backend_pid(&fx).await;
    drop(fx); // a panic or a cancelled handler future

    // No session of the pool is left idle in a transaction (holding the row lock).
    poll_until(
        suite::EXPIRY_TIMEOUT,
        "the abandoned transaction to end",
        || async {
            let open: bool = outside
                .query_one(
                    "SELECT EXISTS (SELECT 1 FROM pg_stat_activity
                                    WHERE pid = $1 AND state LIKE 'idle in transaction%')",
                    &[&pid],
                )
                .await
                .unwrap()
                .get(0);
            (!open).then_some(())
        },
    )
    .await;
    assert!(!effect_exists(&outside, &key).await, "the effect is gone");

    // The next connection from the pool starts a transaction of its own: no write (so no
    // transaction id) is assigned in it yet, and the abandoned row is not visible there.
    let fx = store.begin_effects().await.unwrap();
    let fresh: bool = fx
        .client()
        .query_one("SELECT pg_current_xact_id_if_assigned() IS NULL", &[])
        .await
        .unwrap()
        .get(0);
    assert!(fresh, "the next transaction is a fresh one");
    assert!(!effect_exists(fx.client(), &key).await);
    fx.rollback().await.unwrap();

    // And the store works on.
    assert!(matches!(
        store.claim(&key, "fp", suite::LONG).await.unwrap(),
        Claim::Acquired(_)
    ));
}

#[tokio::test]
async fn rollback_returns_a_clean_connection_to_the_pool() {
    let (store, outside) = (make().await, plain().await);
    let key = unique("fx-rollback");
    let fx = store.begin_effects().await.unwrap();
    fx.client()
        .execute(
            "INSERT INTO sluice_test_effects (id, note) VALUES ($1, 'rolled back')",
            &[&key],
        )
        .await
        .unwrap();
    let first = backend_pid(&fx).await;
    fx.rollback().await.unwrap();
    assert!(!effect_exists(&outside, &key).await);
    // The only idle connection of this pool is the one just returned: it is reused.
    let fx = store.begin_effects().await.unwrap();
    assert_eq!(
        backend_pid(&fx).await,
        first,
        "the connection went back to the pool"
    );
    fx.rollback().await.unwrap();
}

#[tokio::test]
async fn key_with_nul_is_refused_as_invalid() {
    let store = make().await;
    assert!(matches!(
        store.claim("a\0b", "fp", suite::LONG).await,
        Err(Error::Invalid(_))
    ));
}

#[tokio::test]
async fn store_errors_do_not_show_the_password() {
    // Nothing listens on port 1: the connection is refused at once.
    let url = "postgres://root:hunter2@127.0.0.1:1/test?connect_timeout=2";
    let err = match PostgresStore::open(url, suite::OUTPUT_LIMIT).await {
        Err(e) => e.to_string(),
        Ok(_) => panic!("opened a store on a closed port"),
    };
    assert!(!err.contains("hunter2"), "{err}");
    assert!(err.contains("127.0.0.1:1"), "names the server: {err}");
}

// ---- Round trips -----------------------------------------------------------------------------

/// Counts request/response exchanges between a store and the server through a proxy: one
/// exchange each time the client speaks after the server did. The claim and batch statements
/// must take one each (after the first use on a connection, which prepares them).
#[tokio::test]
async fn claim_complete_and_claim_many_take_one_round_trip_each() {
    use std::sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    };
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::{TcpListener, TcpStream},
    };

    let config: tokio_postgres::Config = postgres_url().parse().unwrap();
    let tokio_postgres::config::Host::Tcp(host) = &config.get_hosts()[0] else {
        return; // a Unix socket URL: nothing to proxy
    };
    let upstream = format!("{host}:{}", config.get_ports().first().unwrap_or(&5432));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let trips = Arc::new(AtomicUsize::new(0));
    let server_spoke = Arc::new(AtomicBool::new(true));
    let (t, s) = (trips.clone(), server_spoke.clone());
    tokio::spawn(async move {
        loop {
            let (client, _) = listener.accept().await.unwrap();
            let server = TcpStream::connect(&upstream).await.unwrap();
            let ((mut cr, mut cw), (mut sr, mut sw)) = (client.into_split(), server.into_split());
            let (t, s1, s2) = (t.clone(), s.clone(), s.clone());
            tokio::spawn(async move {
                let mut buf = vec![0; 64 * 1024];
                while let Ok(n @ 1..) = cr.read(&mut buf).await {
                    if s1.swap(false, Ordering::SeqCst) {
                        t.fetch_add(1, Ordering::SeqCst);
                    }
                    if sw.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
            tokio::spawn(async move {
                let mut buf = vec![0; 64 * 1024];
                while let Ok(n @ 1..) = sr.read(&mut buf).await {
                    s2.store(true, Ordering::SeqCst);
                    if cw.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    let mut proxy_url = format!(
        "host=127.0.0.1 port={port} user={} dbname={}",
        config.get_user().unwrap_or("postgres"),
        config.get_dbname().unwrap_or("postgres")
    );
    if let Some(password) = config.get_password() {
        proxy_url.push_str(" password=");
        proxy_url.push_str(&String::from_utf8_lossy(password));
    }
    let store = PostgresStore::open(&proxy_url, suite::OUTPUT_LIMIT)
        .await
        .unwrap();
    let exchanges = || trips.swap(0, Ordering::SeqCst);

    // Warm up: the first use of each statement on a connection prepares it.
    let warm = unique("rt-warm");
    let Claim::Acquired(t) = store.claim(&warm, "fp", suite::LONG).await.unwrap() else {
        panic!("fresh key must be acquired")
    };
    store.complete(&warm, t, b"ok", suite::LONG).await.unwrap();
    exchanges();

    let key = unique("rt");
    let Claim::Acquired(t) = store.claim(&key, "fp", suite::LONG).await.unwrap() else {
        panic!("fresh key must be acquired")
    };
    assert_eq!(exchanges(), 1, "claim");
    store.complete(&key, t, b"ok", suite::LONG).await.unwrap();
    assert_eq!(exchanges(), 1, "complete");
    let batch: Vec<_> = (0..50)
        .map(|_| unique("rt-many"))
        .chain([key])
        .map(|key| ClaimRequest {
            key,
            fingerprint: "fp".into(),
        })
        .collect();
    let got = store.claim_many(&batch, suite::LONG).await.unwrap();
    assert_eq!(exchanges(), 1, "claim_many of 51 keys");
    assert!(got[..50].iter().all(|c| matches!(c, Claim::Acquired(_))));
    assert_eq!(got[50], Claim::Completed(b"ok".to_vec()));

    // Timing on this server, for the record (run with --nocapture).
    let n: u32 = 200;
    let start = std::time::Instant::now();
    for _ in 0..n {
        let key = unique("rt-time");
        let Claim::Acquired(t) = store.claim(&key, "fp", suite::LONG).await.unwrap() else {
            panic!("fresh key must be acquired")
        };
        store.complete(&key, t, b"ok", suite::LONG).await.unwrap();
    }
    let took = start.elapsed();
    println!(
        "claim + complete: {:?} per pair through the proxy, {} exchanges for {n} pairs",
        took / n,
        exchanges()
    );
}
