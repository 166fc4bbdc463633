//! SQLite idempotency store: the embedded default. One `BEGIN IMMEDIATE` transaction per
//! operation; the claim is an `INSERT ... ON CONFLICT DO UPDATE ... WHERE <takeover allowed>`,
//! so the race among claimers is decided by SQLite's write lock.

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, SystemTime},
};

use rusqlite::{params, Connection, OptionalExtension};

use super::{check_key, Claim, ClaimRequest, IdempotencyStore, Token};
use crate::{
    error::{Error, Result},
    sync::Mutex,
    time::unix_ms,
    transport::embedded::open_sqlite,
};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS idempotency (
    key         TEXT PRIMARY KEY,
    state       TEXT NOT NULL CHECK (state IN ('in_progress', 'completed')),
    token       INTEGER NOT NULL,
    fingerprint TEXT NOT NULL,
    lease_until INTEGER NOT NULL,
    output      BLOB,
    expires_at  INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS idempotency_by_expiry ON idempotency (expires_at);
CREATE TABLE IF NOT EXISTS workflow_status (
    id          TEXT PRIMARY KEY,
    workflow    TEXT NOT NULL,
    state       TEXT NOT NULL,
    rank        INTEGER NOT NULL,
    doc         TEXT NOT NULL,
    updated_at  INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS workflow_status_by_state ON workflow_status (state, id);
";

/// How long an in-progress record lives at most (its lease is what matters; this only lets
/// the sweep remove records of workers that died).
const IN_PROGRESS_TTL: Duration = Duration::from_secs(24 * 3600);

/// SQLite idempotency store.
#[derive(Clone)]
pub struct SqliteStore {
    conn: Arc<Mutex<Connection>>,
    max_output_bytes: usize,
}

impl SqliteStore {
    /// Opens (and creates) the store file.
    pub async fn open(path: &str, max_output_bytes: usize) -> Result<Self> {
        let path = PathBuf::from(path);
        let conn = tokio::task::spawn_blocking(move || -> Result<Connection> {
            let conn = open_sqlite(&path).map_err(|e| {
                Error::Config(format!(
                    "key `store.url`: cannot open the idempotency store file {}: {e}",
                    path.display()
                ))
            })?;
            conn.execute_batch(SCHEMA).map_err(store_err)?;
            sweep_expired(&conn)?;
            Ok(conn)
        })
        .await
        .map_err(|e| Error::store("sqlite: opening the store", e))??;
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
            max_output_bytes,
        })
    }

    pub(super) async fn tx<T: Send + 'static>(
        &self,
        f: impl FnOnce(&rusqlite::Transaction<'_>) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            let mut conn = conn.lock();
            let tx = conn
                .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                .map_err(store_err)?;
            let out = f(&tx)?;
            tx.commit().map_err(store_err)?;
            Ok(out)
        })
        .await
        .map_err(|e| Error::store("sqlite: a blocking task failed", e))?
    }

    /// Deletes expired records now; returns how many (claims also do it now and then).
    pub async fn sweep(&self) -> Result<usize> {
        self.tx(|tx| sweep_expired(tx)).await
    }
}

/// One claim in this many also deletes expired records, so a long-running worker's file stays
/// bounded without a separate sweeper (the `expires_at` index keeps it cheap).
const SWEEP_EVERY: u32 = 1000;

fn sweep_expired(conn: &Connection) -> Result<usize> {
    conn.execute(
        "DELETE FROM idempotency WHERE expires_at <= ?1",
        params![unix_ms(SystemTime::now())],
    )
    .map_err(store_err)
}

/// The claim, inside a transaction: insert, or take over a record whose TTL ran out, or whose
/// lease ran out while in progress with the same payload; anything else leaves the row alone.
fn claim_in(tx: &rusqlite::Transaction<'_>, key: &str, fp: &str, lease: Duration) -> Result<Claim> {
    if rand::random::<u32>().is_multiple_of(SWEEP_EVERY) {
        sweep_expired(tx)?;
    }
    let now = unix_ms(SystemTime::now());
    let token: i64 = rand::random::<i64>() & i64::MAX;
    let lease_until = now + lease.as_millis() as i64;
    let expires = now + IN_PROGRESS_TTL.as_millis() as i64;
    let won = tx
        .query_row(
            "INSERT INTO idempotency (key, state, token, fingerprint, lease_until, output, expires_at)
             VALUES (?1, 'in_progress', ?2, ?3, ?4, NULL, ?5)
             ON CONFLICT (key) DO UPDATE SET
                 state = 'in_progress', token = excluded.token,
                 fingerprint = excluded.fingerprint, lease_until = excluded.lease_until,
                 output = NULL, expires_at = excluded.expires_at
             WHERE idempotency.expires_at <= ?6
                OR (idempotency.state = 'in_progress' AND idempotency.lease_until <= ?6
                    AND idempotency.fingerprint = excluded.fingerprint)
             RETURNING token",
            params![key, token, fp, lease_until, expires, now],
            |r| r.get::<_, i64>(0),
        )
        .optional()
        .map_err(store_err)?;
    if let Some(t) = won {
        return Ok(Claim::Acquired(Token(t)));
    }
    let (state, stored_fp, lease_until, output): (String, String, i64, Option<Vec<u8>>) = tx
        .query_row(
            "SELECT state, fingerprint, lease_until, output FROM idempotency WHERE key = ?1",
            params![key],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
        .map_err(store_err)?;
    if stored_fp != fp {
        return Ok(Claim::FingerprintMismatch);
    }
    if state == "completed" {
        return Ok(Claim::Completed(output.unwrap_or_default()));
    }
    Ok(Claim::InProgress(Duration::from_millis(
        (lease_until - now).max(0) as u64,
    )))
}

pub(super) fn store_err(e: rusqlite::Error) -> Error {
    Error::store("sqlite", e)
}

fn stale(key: &str) -> Error {
    Error::StaleToken(key.to_owned())
}

impl IdempotencyStore for SqliteStore {
    async fn claim(&self, key: &str, fingerprint: &str, lease: Duration) -> Result<Claim> {
        check_key(key)?;
        let (key, fp) = (key.to_owned(), fingerprint.to_owned());
        self.tx(move |tx| claim_in(tx, &key, &fp, lease)).await
    }

    async fn claim_many(&self, items: &[ClaimRequest], lease: Duration) -> Result<Vec<Claim>> {
        for item in items {
            check_key(&item.key)?;
        }
        let items = items.to_vec();
        // One transaction for the batch: one lock acquisition and one commit.
        self.tx(move |tx| {
            items
                .iter()
                .map(|i| claim_in(tx, &i.key, &i.fingerprint, lease))
                .collect()
        })
        .await
    }

    async fn complete(&self, key: &str, token: Token, output: &[u8], ttl: Duration) -> Result<()> {
        if output.len() > self.max_output_bytes {
            return Err(Error::OutputTooLarge {
                size: output.len(),
                limit: self.max_output_bytes,
            });
        }
        let (key, output) = (key.to_owned(), output.to_vec());
        self.tx(move |tx| {
            let now = unix_ms(SystemTime::now());
            let n = tx
                .execute(
                    "UPDATE idempotency SET state = 'completed', output = ?1, expires_at = ?2
                     WHERE key = ?3 AND token = ?4 AND state = 'in_progress'",
                    params![output, now + ttl.as_millis() as i64, key, token.0],
                )
                .map_err(store_err)?;
            if n == 1 {
                Ok(())
            } else {
                Err(stale(&key))
            }
        })
        .await
    }

    async fn release(&self, key: &str, token: Token) -> Result<()> {
        let key = key.to_owned();
        self.tx(move |tx| {
            let n = tx
                .execute(
                    "DELETE FROM idempotency WHERE key = ?1 AND token = ?2 AND state = 'in_progress'",
                    params![key, token.0],
                )
                .map_err(store_err)?;
            if n == 1 {
                Ok(())
            } else {
                Err(stale(&key))
            }
        })
        .await
    }

    async fn extend(&self, key: &str, token: Token, lease: Duration) -> Result<()> {
        let key = key.to_owned();
        self.tx(move |tx| {
            let n = tx
                .execute(
                    "UPDATE idempotency SET lease_until = ?1
                     WHERE key = ?2 AND token = ?3 AND state = 'in_progress'",
                    params![
                        unix_ms(SystemTime::now()) + lease.as_millis() as i64,
                        key,
                        token.0
                    ],
                )
                .map_err(store_err)?;
            if n == 1 {
                Ok(())
            } else {
                Err(stale(&key))
            }
        })
        .await
    }
}
