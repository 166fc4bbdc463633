//! PostgreSQL idempotency store (feature `postgres`).
//!
//! # Why
//!
//! Teams that already run PostgreSQL get shared idempotency records without another service,
//! and, more than that, handlers whose effects live in the same database can commit those
//! effects in the same transaction as `complete` ([`PostgresStore::begin_effects`]): an
//! exactly-once effect, not only at-least-once delivery with an idempotent record.
//!
//! # How
//!
//! One table, `sluice_idempotency`, created by a migration at [`PostgresStore::open`]
//! (idempotent, serialized between concurrent opens by a transaction-scoped advisory lock).
//! The semantics are those of the SQLite store, statement for statement:
//!
//! - claim: `INSERT ... ON CONFLICT (key) DO UPDATE ... WHERE <takeover allowed>` inside a CTE
//!   whose outer `SELECT` also reads the existing row when the insert did nothing, so a claim,
//!   and a whole `claim_many` batch, is one statement and one round trip. (The statement runs
//!   again, for those keys only, when another claimer inserted a key while ours was waiting on
//!   it: the row is then invisible to our snapshot. Only contended keys pay that.) A single
//!   `claim` is a batch of one: there is only one claim statement to reason about. Takeover is
//!   allowed when the record's TTL ran out, or when it is in progress, its lease ran out and
//!   the payload fingerprint is the same.
//! - complete / release / extend: `UPDATE` / `DELETE ... WHERE key = $1 AND token = $2 AND
//!   state = 'in_progress'`; no row means the fencing token is stale.
//! - All times (lease, record expiry) come from the database clock (`clock_timestamp()`), so
//!   workers with skewed clocks agree on who holds a lease.
//! - Statements are prepared once per pooled connection (`prepare_cached`), so after the first
//!   use an operation is a single Bind/Execute/Sync exchange.
//! - Exactly-once effects: [`PgEffects`] is a transaction on a pooled connection; the
//!   handler's statements and the conditional completion commit together, or not at all.
//! - Expired records are swept at open, every [`SWEEP_EVERY`] claims in the background, and by
//!   [`PostgresStore::sweep`]; an expired record is treated as absent by claims anyway.
//!
//! Connections come from a `deadpool-postgres` pool of [`POOL_SIZE`], encrypted when the URL
//! asks for it (`sslmode=require`) or `store.tls_ca_file` is set (rustls, the certificate
//! always verified: `crate::tls`); otherwise plain, as before TLS was added. URLs are only
//! ever shown redacted ([`redact_url`]). The store assumes the default `READ COMMITTED`
//! isolation for its own statements (a serialization failure or deadlock is retried anyway).

use std::{
    collections::HashSet,
    sync::{
        atomic::{AtomicU32, Ordering},
        Arc,
    },
    time::Duration,
};

use deadpool_postgres::{
    Manager, ManagerConfig, Object, Pool, PoolError, RecyclingMethod, Runtime,
};
use tokio_postgres::{error::SqlState, NoTls, Row};

use super::{check_key, Claim, ClaimRequest, IdempotencyStore, Token};
use crate::{
    config::redact_url,
    error::{Error, Result},
};

/// The client library of [`PgEffects::client`], re-exported so handler code uses the same
/// version (`Row`, `types::ToSql`, ...) without naming it as a dependency.
pub use tokio_postgres;

/// The migration run by every open. `CREATE TABLE IF NOT EXISTS` alone is not safe for
/// concurrent opens (two sessions can both decide to create the table and one fails on the
/// catalog's unique index), hence the advisory lock, held until COMMIT. The index is created
/// only when missing: `CREATE INDEX IF NOT EXISTS` would take a SHARE lock on the table even
/// when the index exists, and so wait for (and block) claims of running workers. The key is
/// `TEXT COLLATE "C"`: byte-wise comparison, the same sort order everywhere.
const MIGRATION: &str = r#"
BEGIN;
SELECT pg_advisory_xact_lock(7308623989547099137); -- "sluice" + 1: the migration lock
CREATE TABLE IF NOT EXISTS sluice_idempotency (
    key         TEXT COLLATE "C" PRIMARY KEY,
    state       TEXT NOT NULL CHECK (state IN ('in_progress', 'completed')),
    token       BIGINT NOT NULL,
    fingerprint TEXT NOT NULL,
    lease_until TIMESTAMPTZ NOT NULL,
    output      BYTEA,
    expires_at  TIMESTAMPTZ NOT NULL
);
DO $$
BEGIN
    IF to_regclass('sluice_idempotency_by_expiry') IS NULL THEN
        CREATE INDEX sluice_idempotency_by_expiry ON sluice_idempotency (expires_at);
    END IF;
END
$$;
COMMIT;
"#;

/// Claims a batch: `$1` keys, `$2` fingerprints, `$3` fresh tokens (parallel arrays), `$4`
/// the lease in milliseconds. One row per input, in input order: `won` with our token, or the
/// existing record as our statement's snapshot saw it.
///
/// - The insert takes its rows ordered by key, so two batches lock common keys in the same
///   order and cannot deadlock each other.
/// - The outer `SELECT` sees the snapshot taken when the statement started, not the rows the
///   CTE wrote: for a lost key that is exactly the record that beat us. Except in one race: a
///   row inserted by a transaction that committed after our snapshot was taken (we waited on
///   it in ON CONFLICT) is invisible, and the key comes back with neither `won` nor a state.
///   [`PostgresStore::claim_many`] runs the statement again for such keys (a fresh statement
///   sees the row); it only happens between concurrent claimers of one key.
/// - The existing row is read by a LATERAL lookup per key (the primary key index), whatever
///   plan the batch size suggests.
const CLAIM: &str = r#"
WITH req AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[]) WITH ORDINALITY
        AS t (key, fingerprint, token, ord)
), ins AS (
    INSERT INTO sluice_idempotency AS r
        (key, state, token, fingerprint, lease_until, output, expires_at)
    SELECT key, 'in_progress', token, fingerprint,
           clock_timestamp() + $4::bigint * interval '1 millisecond', NULL,
           clock_timestamp() + interval '24 hours'
    FROM req
    ORDER BY key
    ON CONFLICT (key) DO UPDATE SET
        state = 'in_progress', token = excluded.token, fingerprint = excluded.fingerprint,
        lease_until = excluded.lease_until, output = NULL, expires_at = excluded.expires_at
    WHERE r.expires_at <= clock_timestamp()
       OR (r.state = 'in_progress' AND r.lease_until <= clock_timestamp()
           AND r.fingerprint = excluded.fingerprint)
    RETURNING r.key, r.token
)
SELECT ins.key IS NOT NULL AS won, ins.token, old.state, old.fingerprint, old.output,
       old.remaining_ms
FROM req
LEFT JOIN ins ON ins.key = req.key
LEFT JOIN LATERAL (
    SELECT r.state, r.fingerprint, r.output,
           GREATEST(0, ceil(extract(epoch FROM r.lease_until - clock_timestamp()) * 1000))::bigint
               AS remaining_ms
    FROM sluice_idempotency r
    WHERE r.key = req.key
) old ON ins.key IS NULL
ORDER BY req.ord
"#;

/// `$1` output, `$2` TTL in milliseconds, `$3` key, `$4` token.
const COMPLETE: &str = "
UPDATE sluice_idempotency
SET state = 'completed', output = $1,
    expires_at = clock_timestamp() + $2::bigint * interval '1 millisecond'
WHERE key = $3 AND token = $4 AND state = 'in_progress'";

/// `$1` key, `$2` token.
const RELEASE: &str = "
DELETE FROM sluice_idempotency WHERE key = $1 AND token = $2 AND state = 'in_progress'";

/// `$1` lease in milliseconds, `$2` key, `$3` token.
const EXTEND: &str = "
UPDATE sluice_idempotency
SET lease_until = clock_timestamp() + $1::bigint * interval '1 millisecond'
WHERE key = $2 AND token = $3 AND state = 'in_progress'";

/// Deletes up to [`SWEEP_BATCH`] expired records. `SKIP LOCKED`: a sweep never waits for a
/// claim, and a claim never waits for a sweep longer than one short statement.
const SWEEP: &str = "
DELETE FROM sluice_idempotency
WHERE key IN (
    SELECT key FROM sluice_idempotency
    WHERE expires_at <= clock_timestamp()
    LIMIT 1000
    FOR UPDATE SKIP LOCKED
)";

/// Rows one sweep statement deletes at most (the `LIMIT` in [`SWEEP`]).
const SWEEP_BATCH: u64 = 1000;

/// Every this many claims (per store) one also sweeps expired records, in a background task,
/// so the table stays bounded without a separate sweeper (the `expires_at` index keeps it
/// cheap). Counted rather than drawn at random so a claim's cost is predictable.
pub const SWEEP_EVERY: u32 = 1000;

/// Connections per store (per worker process).
pub const POOL_SIZE: usize = 16;

/// How long to wait for a connection (new or from the pool) before failing with `Store`.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How often a claim statement is run for keys that raced (see [`CLAIM`]) before giving up.
const CLAIM_ATTEMPTS: usize = 10;

/// Durations beyond this (about 100 years) are clamped, so `interval` arithmetic cannot
/// overflow.
const MAX_MILLIS: u128 = 100 * 365 * 24 * 3600 * 1000;

/// PostgreSQL idempotency store: a connection pool over one table.
#[derive(Clone)]
pub struct PostgresStore {
    pool: Pool,
    max_output_bytes: usize,
    /// Claims (calls) since open, for [`SWEEP_EVERY`].
    claims: Arc<AtomicU32>,
}

impl PostgresStore {
    /// Connects, runs the migration and sweeps expired records. Fails with `Config` for a URL
    /// that does not parse, `Store` when the server cannot be reached or refuses the schema.
    pub async fn open(url: &str, max_output_bytes: usize) -> Result<Self> {
        Self::open_with_ca(url, max_output_bytes, None).await
    }

    /// [`PostgresStore::open`] trusting the CA certificates of `ca_pem` (the text of
    /// `store.tls_ca_file`) for TLS instead of the system's roots. A certificate the client
    /// rejects fails with `Config` naming `store.tls_ca_file`.
    pub async fn open_with_ca(
        url: &str,
        max_output_bytes: usize,
        ca_pem: Option<&str>,
    ) -> Result<Self> {
        let shown = redact_url(url);
        // Errors of the open name the server, never with its password.
        let at = |e: Error| match e {
            Error::Store { context, source } => Error::Store {
                context: format!("{context} (at {shown})"),
                source,
            },
            other => other,
        };
        let mut config: tokio_postgres::Config = url.parse().map_err(|e| {
            Error::Config(format!(
                "key `store.url`: {shown} is not a PostgreSQL URL: {}",
                chain(&e)
            ))
        })?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        if config.get_application_name().is_none() {
            config.application_name("sluice");
        }
        // `Fast` recycling: no statement on checkout, so a claim stays one round trip. A
        // connection that may be inside a transaction never goes back to the pool (see
        // `PgEffects`), so nothing needs resetting on checkout.
        let manager_config = ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        };
        let manager = match tls_connector(&config, ca_pem)? {
            Some(tls) => Manager::from_config(config, tls, manager_config),
            None => Manager::from_config(config, NoTls, manager_config),
        };
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(CONNECT_TIMEOUT))
            .create_timeout(Some(CONNECT_TIMEOUT))
            .build()
            .map_err(|e| Error::store("postgres: connection pool", e))
            .map_err(at)?;
        let store = Self {
            pool,
            max_output_bytes,
            claims: Arc::default(),
        };
        let conn = store
            .conn()
            .await
            .map_err(|e| tls_hint(e, &shown))
            .map_err(at)?;
        conn.batch_execute(MIGRATION)
            .await
            .map_err(|e| Error::store("postgres: migration", e))
            .map_err(at)?;
        drop(conn);
        store.sweep_once().await.map_err(at)?;
        Ok(store)
    }

    /// Deletes expired records now; returns how many (claims also do it now and then).
    pub async fn sweep(&self) -> Result<u64> {
        let mut total = 0;
        loop {
            let n = self.sweep_once().await?;
            total += n;
            if n < SWEEP_BATCH {
                return Ok(total);
            }
        }
    }

    /// Starts a transaction for a handler's own effects on a pooled connection: the
    /// exactly-once primitive. Run the effects through [`PgEffects::client`], then
    /// [`PgEffects::commit_with_complete`] commits them together with the record's completion,
    /// or not at all.
    pub async fn begin_effects(&self) -> Result<PgEffects> {
        let effects = PgEffects {
            conn: Some(self.conn().await?),
            max_output_bytes: self.max_output_bytes,
        };
        // Should BEGIN fail, dropping `effects` discards the connection.
        effects
            .client()
            .batch_execute("BEGIN")
            .await
            .map_err(pg_err)?;
        Ok(effects)
    }

    async fn conn(&self) -> Result<Object> {
        self.pool.get().await.map_err(pool_err)
    }

    async fn sweep_once(&self) -> Result<u64> {
        let conn = self.conn().await?;
        let stmt = conn.prepare_cached(SWEEP).await.map_err(pg_err)?;
        conn.execute(&stmt, &[]).await.map_err(pg_err)
    }

    /// Every [`SWEEP_EVERY`]th claim sweeps in a background task (errors are only logged: the
    /// next sweep retries, and expired records are treated as absent meanwhile).
    fn maybe_sweep(&self) {
        if self.claims.fetch_add(1, Ordering::Relaxed) % SWEEP_EVERY != SWEEP_EVERY - 1 {
            return;
        }
        let store = self.clone();
        tokio::spawn(async move {
            if let Err(e) = store.sweep_once().await {
                tracing::warn!(error = %e, "sweeping expired idempotency records failed");
            }
        });
    }

    /// Runs [`CLAIM`] once for `items`: `None` for a key that raced (see there), and for every
    /// key when the statement failed with a serialization failure or a deadlock.
    async fn claim_once(
        &self,
        items: &[&ClaimRequest],
        lease: Duration,
    ) -> Result<Vec<Option<Claim>>> {
        let keys: Vec<&str> = items.iter().map(|i| i.key.as_str()).collect();
        let fingerprints: Vec<&str> = items.iter().map(|i| i.fingerprint.as_str()).collect();
        let tokens: Vec<i64> = items
            .iter()
            .map(|_| rand::random::<i64>() & i64::MAX)
            .collect();
        let conn = self.conn().await?;
        let stmt = conn.prepare_cached(CLAIM).await.map_err(pg_err)?;
        let rows = match conn
            .query(&stmt, &[&keys, &fingerprints, &tokens, &millis(lease)])
            .await
        {
            Ok(rows) => rows,
            Err(e) if retryable(&e) => return Ok(vec![None; items.len()]),
            Err(e) => return Err(pg_err(e)),
        };
        if rows.len() != items.len() {
            return Err(Error::store_msg(format!(
                "postgres: claim returned {} rows for {} keys",
                rows.len(),
                items.len()
            )));
        }
        rows.iter()
            .zip(items)
            .map(|(row, item)| decode_claim(row, &item.fingerprint))
            .collect()
    }

    /// Runs a conditional UPDATE or DELETE of our record: `StaleToken` unless it hit a row.
    async fn fenced(
        &self,
        sql: &str,
        key: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<()> {
        let conn = self.conn().await?;
        let stmt = conn.prepare_cached(sql).await.map_err(pg_err)?;
        match conn.execute(&stmt, params).await.map_err(pg_err)? {
            1 => Ok(()),
            _ => Err(Error::StaleToken(key.to_owned())),
        }
    }
}

/// A handler's transaction on a pooled connection (from [`PostgresStore::begin_effects`]).
///
/// Run the effects with [`client`](Self::client) (plain statements: never `BEGIN`, `COMMIT`
/// or `ROLLBACK` yourself, that would split the effects from the completion), then end with
/// [`commit_with_complete`](Self::commit_with_complete) or [`rollback`](Self::rollback).
///
/// Dropping it without either (a panic, a cancelled future, an early `?`) rolls the effects
/// back: the connection is taken out of the pool for good (`Object::take`) and closed, and
/// the server aborts the open transaction when the session ends. That is sound whatever state
/// the connection was left in, needs no async work in `Drop` and no runtime, and costs nothing
/// on the happy path. The alternatives are worse: a `ROLLBACK` on every checkout (a custom
/// recycling statement) would add a round trip to every claim, and a `ROLLBACK` spawned from
/// `Drop` may never run (runtime shutting down) while the connection is already back in the
/// pool. The price is one reconnect after an abandoned transaction, which is rare.
pub struct PgEffects {
    /// `Some` while the transaction may be open; taken once it is known to be closed (and the
    /// connection goes back to the pool). Still `Some` in `Drop`: the connection is discarded.
    conn: Option<Object>,
    max_output_bytes: usize,
}

impl PgEffects {
    /// The connection, inside the transaction: run the handler's statements on it.
    pub fn client(&self) -> &tokio_postgres::Client {
        self.conn
            .as_ref()
            .expect("PgEffects holds its connection until it is consumed")
    }

    /// Completes the record (like [`IdempotencyStore::complete`]) in the same transaction as
    /// the effects, then commits both. If our token is stale (another worker took the record
    /// over) or the output is over the limit, rolls back and returns `StaleToken` /
    /// `OutputTooLarge`: the effects are undone, nothing is half-done.
    ///
    /// A `Store` error from the COMMIT itself (connection lost) leaves the outcome unknown, but
    /// still all or nothing: the next delivery either replays the stored output or runs the
    /// handler again on untouched data.
    pub async fn commit_with_complete(
        mut self,
        key: &str,
        token: Token,
        output: &[u8],
        ttl: Duration,
    ) -> Result<()> {
        if output.len() > self.max_output_bytes {
            self.end("ROLLBACK").await?;
            return Err(Error::OutputTooLarge {
                size: output.len(),
                limit: self.max_output_bytes,
            });
        }
        let conn = self.conn.as_ref().expect("open until consumed");
        let updated = match conn.prepare_cached(COMPLETE).await {
            Ok(stmt) => {
                conn.execute(&stmt, &[&output, &millis(ttl), &key, &token.0])
                    .await
            }
            Err(e) => Err(e),
        };
        match updated {
            Ok(1) => self.end("COMMIT").await,
            Ok(_) => {
                self.end("ROLLBACK").await?;
                Err(Error::StaleToken(key.to_owned()))
            }
            Err(e) => {
                // The transaction is aborted server-side; end it so the connection can be
                // reused (if even that fails, `Drop` discards the connection).
                let _ = self.end("ROLLBACK").await;
                Err(pg_err(e))
            }
        }
    }

    /// Rolls the effects back; the record is left as it is (release or retry as usual).
    pub async fn rollback(mut self) -> Result<()> {
        self.end("ROLLBACK").await
    }

    /// Ends the transaction; on success the connection goes back to the pool.
    async fn end(&mut self, sql: &str) -> Result<()> {
        let conn = self.conn.as_ref().expect("open until consumed");
        conn.batch_execute(sql).await.map_err(pg_err)?;
        self.conn = None;
        Ok(())
    }
}

impl Drop for PgEffects {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            // Out of the pool, then closed (ClientWrapper's drop aborts the connection task).
            drop(Object::take(conn));
        }
    }
}

/// The answer for one row of [`CLAIM`]; `None` if the key raced (neither won nor visible).
fn decode_claim(row: &Row, fingerprint: &str) -> Result<Option<Claim>> {
    if row.try_get::<_, bool>("won").map_err(pg_err)? {
        return Ok(Some(Claim::Acquired(Token(
            row.try_get("token").map_err(pg_err)?,
        ))));
    }
    let Some(state) = row.try_get::<_, Option<String>>("state").map_err(pg_err)? else {
        return Ok(None);
    };
    let stored_fp: String = row.try_get("fingerprint").map_err(pg_err)?;
    if stored_fp != fingerprint {
        return Ok(Some(Claim::FingerprintMismatch));
    }
    if state == "completed" {
        let output: Option<Vec<u8>> = row.try_get("output").map_err(pg_err)?;
        return Ok(Some(Claim::Completed(output.unwrap_or_default())));
    }
    let remaining: i64 = row.try_get("remaining_ms").map_err(pg_err)?;
    Ok(Some(Claim::InProgress(Duration::from_millis(
        remaining.max(0) as u64,
    ))))
}

/// A duration as whole milliseconds for an `interval` parameter.
fn millis(d: Duration) -> i64 {
    d.as_millis().min(MAX_MILLIS) as i64
}

/// PostgreSQL `text` cannot hold NUL, which `check_key` allows (SQLite stores it): refused
/// here with a clear reason rather than a store error that would be retried.
fn check_pg_key(key: &str) -> Result<()> {
    check_key(key)?;
    if key.contains('\0') {
        return Err(Error::Invalid(
            "idempotency key contains a NUL character, which PostgreSQL text cannot store".into(),
        ));
    }
    Ok(())
}

/// Whether running the statement again can succeed (snapshot or lock-order conflicts: only
/// under an isolation level above the default, or with lock orders the store does not use).
fn retryable(e: &tokio_postgres::Error) -> bool {
    e.code().is_some_and(|code| {
        *code == SqlState::T_R_SERIALIZATION_FAILURE || *code == SqlState::T_R_DEADLOCK_DETECTED
    })
}

/// An error with its causes: tokio-postgres prints only "db error" for a server error, the
/// server's message is in the source.
/// The TLS connector for `config`: `None` (plain) unless the URL requires TLS or a CA file is
/// set. `sslmode=prefer` (the default) with a CA file tries TLS and falls back to plain only
/// when the server offers no TLS at all.
fn tls_connector(
    config: &tokio_postgres::Config,
    ca_pem: Option<&str>,
) -> Result<Option<crate::tls::postgres::MakeRustls>> {
    let wants =
        ca_pem.is_some() || config.get_ssl_mode() == tokio_postgres::config::SslMode::Require;
    if !wants {
        return Ok(None);
    }
    let client = crate::tls::client_config("store.tls_ca_file", ca_pem)?;
    Ok(Some(crate::tls::postgres::MakeRustls(Arc::new(client))))
}

/// A failed TLS handshake is configuration (the CA, the host name): said so, naming the key.
fn tls_hint(e: Error, shown: &str) -> Error {
    let text = match &e {
        Error::Store {
            source: Some(source),
            ..
        } => chain(source.as_ref()),
        _ => return e,
    };
    if text.contains("TLS") || text.contains("certificate") {
        return Error::Config(format!(
            "key `store.tls_ca_file`: the TLS handshake with {shown} failed ({text}): does that \
             CA file (or, unset, the system's roots) sign the server's certificate, and does \
             the certificate name the URL's host?"
        ));
    }
    e
}

/// A client of its own (not pooled) to the store's database, with the store's TLS settings
/// (`store.url`, `store.tls_ca_file`), for a function's set-up statements (charge-payment
/// creates its ledger table with it); its connection runs on a spawned task.
pub async fn connect(store: &crate::config::StoreSettings) -> Result<tokio_postgres::Client> {
    let ca = crate::config::read_ca_file("store.tls_ca_file", store.tls_ca_file.as_deref())?;
    let ca_pem = ca.as_deref();
    let url = store.url.as_str();
    let shown = redact_url(url);
    let config: tokio_postgres::Config = url.parse().map_err(|e| {
        Error::Config(format!(
            "key `store.url`: {shown} is not a PostgreSQL URL: {}",
            chain(&e)
        ))
    })?;
    let fail = |e: tokio_postgres::Error| {
        tls_hint(
            Error::store(format!("postgres: connecting (at {shown})"), e),
            &shown,
        )
    };
    let client = match tls_connector(&config, ca_pem)? {
        Some(tls) => {
            let (client, conn) = config.connect(tls).await.map_err(fail)?;
            tokio::spawn(conn);
            client
        }
        None => {
            let (client, conn) = config.connect(NoTls).await.map_err(fail)?;
            tokio::spawn(conn);
            client
        }
    };
    Ok(client)
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let next = s.to_string();
        if !text.ends_with(&next) {
            text = format!("{text}: {next}");
        }
        source = s.source();
    }
    text
}

fn pg_err(e: tokio_postgres::Error) -> Error {
    Error::store("postgres", e)
}

fn pool_err(e: PoolError) -> Error {
    match e {
        PoolError::Backend(e) => Error::store("postgres: connecting", e),
        other => Error::store("postgres: connection pool", other),
    }
}

impl IdempotencyStore for PostgresStore {
    async fn claim(&self, key: &str, fingerprint: &str, lease: Duration) -> Result<Claim> {
        let item = ClaimRequest {
            key: key.to_owned(),
            fingerprint: fingerprint.to_owned(),
        };
        let mut claims = self.claim_many(std::slice::from_ref(&item), lease).await?;
        Ok(claims.pop().expect("one answer per key"))
    }

    async fn claim_many(&self, items: &[ClaimRequest], lease: Duration) -> Result<Vec<Claim>> {
        let mut seen = HashSet::with_capacity(items.len());
        for item in items {
            check_pg_key(&item.key)?;
            // Callers never repeat a key; were one to, PostgreSQL would refuse the whole batch
            // ("ON CONFLICT DO UPDATE command cannot affect row a second time").
            if !seen.insert(item.key.as_str()) {
                return Err(Error::Invalid(format!(
                    "idempotency key {:?} appears twice in one claim batch",
                    item.key
                )));
            }
        }
        if items.is_empty() {
            return Ok(Vec::new());
        }
        self.maybe_sweep();
        let mut answers: Vec<Option<Claim>> = vec![None; items.len()];
        let mut pending: Vec<usize> = (0..items.len()).collect();
        for _ in 0..CLAIM_ATTEMPTS {
            let batch: Vec<&ClaimRequest> = pending.iter().map(|&i| &items[i]).collect();
            let claims = self.claim_once(&batch, lease).await?;
            let mut raced = Vec::new();
            for (i, claim) in pending.into_iter().zip(claims) {
                match claim {
                    Some(c) => answers[i] = Some(c),
                    None => raced.push(i),
                }
            }
            if raced.is_empty() {
                return Ok(answers.into_iter().flatten().collect());
            }
            pending = raced;
        }
        Err(Error::store_msg(format!(
            "postgres: claim of {} key(s) kept racing with other claimers; try again",
            pending.len()
        )))
    }

    async fn complete(&self, key: &str, token: Token, output: &[u8], ttl: Duration) -> Result<()> {
        if output.len() > self.max_output_bytes {
            return Err(Error::OutputTooLarge {
                size: output.len(),
                limit: self.max_output_bytes,
            });
        }
        self.fenced(COMPLETE, key, &[&output, &millis(ttl), &key, &token.0])
            .await
    }

    async fn release(&self, key: &str, token: Token) -> Result<()> {
        self.fenced(RELEASE, key, &[&key, &token.0]).await
    }

    async fn extend(&self, key: &str, token: Token, lease: Duration) -> Result<()> {
        self.fenced(EXTEND, key, &[&millis(lease), &key, &token.0])
            .await
    }
}
