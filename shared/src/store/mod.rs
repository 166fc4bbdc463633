//! The idempotency store contract: conditional writes on one record per key.
//!
//! Record: key, state (`in_progress` / `completed`), lease expiry, payload fingerprint, stored
//! output, record expiry (TTL) and a fencing token. Every backend passes
//! `conformance::store`. See docs/idempotency.md for the states.

// A build without any store has nothing to delegate to.
#![cfg_attr(
    not(any(
        feature = "embedded",
        feature = "postgres",
        feature = "redis",
        feature = "s3"
    )),
    allow(unused_variables, unused_imports)
)]

pub mod front;
#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(feature = "redis")]
pub mod redis;
#[cfg(feature = "s3")]
pub mod s3;
#[cfg(feature = "embedded")]
pub mod sqlite;

use std::{future::Future, time::Duration};

use sha2::{Digest, Sha256};

use crate::{
    config::{Settings, StoreKind},
    error::{Error, Result},
};

/// Longest accepted key. Keys are opaque bytes to every backend (bound parameters, hashed
/// object names), so odd characters are safe; the bound keeps records small.
pub const MAX_KEY_BYTES: usize = 512;

/// The fencing token of a claim: `complete`, `release` and `extend` succeed only with the
/// token of the current holder, so a worker that lost its lease cannot overwrite the one that
/// took over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Token(pub i64);

/// One key to claim in [`IdempotencyStore::claim_many`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimRequest {
    /// The idempotency key.
    pub key: String,
    /// The payload fingerprint.
    pub fingerprint: String,
}

/// The outcome of a claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// The record is ours until the lease expires: run the handler.
    Acquired(Token),
    /// Already done: skip the handler, ack, replay this output.
    Completed(Vec<u8>),
    /// Someone holds a live lease: retry later (after about this long).
    InProgress(Duration),
    /// The key was used before with another payload: a permanent error.
    FingerprintMismatch,
}

/// A store of idempotency records.
pub trait IdempotencyStore: Send + Sync + 'static {
    /// Conditional create (or takeover of an expired lease).
    fn claim(
        &self,
        key: &str,
        fingerprint: &str,
        lease: Duration,
    ) -> impl Future<Output = Result<Claim>> + Send;
    /// Claims several distinct keys in one round trip where the backend allows it (PostgreSQL
    /// multi-row statement, Redis pipeline, one SQLite transaction); the answers are in input
    /// order and each is what `claim` would have answered. Callers never repeat a key within
    /// one call (the worker's claim batcher splits such batches), so backends may rely on it.
    fn claim_many(
        &self,
        items: &[ClaimRequest],
        lease: Duration,
    ) -> impl Future<Output = Result<Vec<Claim>>> + Send;
    /// Marks the record completed with the output, kept for `ttl`. `StaleToken` if not ours.
    fn complete(
        &self,
        key: &str,
        token: Token,
        output: &[u8],
        ttl: Duration,
    ) -> impl Future<Output = Result<()>> + Send;
    /// Deletes our in-progress record so a retry or a redrive can run again.
    fn release(&self, key: &str, token: Token) -> impl Future<Output = Result<()>> + Send;
    /// Moves our lease expiry to now + `lease`.
    fn extend(
        &self,
        key: &str,
        token: Token,
        lease: Duration,
    ) -> impl Future<Output = Result<()>> + Send;
}

/// The SHA-256 of the payload, hex: same key with another payload is detected by this.
pub fn fingerprint(body: &[u8]) -> String {
    hex::encode(Sha256::digest(body))
}

/// Checks a key before any backend call.
pub fn check_key(key: &str) -> Result<()> {
    if key.is_empty() {
        return Err(Error::Invalid("empty idempotency key".into()));
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(Error::Limit(format!(
            "idempotency key is {} bytes, limit {MAX_KEY_BYTES}",
            key.len()
        )));
    }
    Ok(())
}

/// The store chosen at run time from `store.kind`.
pub enum AnyStore {
    /// SQLite file.
    #[cfg(feature = "embedded")]
    Sqlite(sqlite::SqliteStore),
    /// PostgreSQL.
    #[cfg(feature = "postgres")]
    Postgres(postgres::PostgresStore),
    /// Redis.
    #[cfg(feature = "redis")]
    Redis(redis::RedisStore),
    /// S3 conditional writes.
    #[cfg(feature = "s3")]
    S3(s3::S3Store),
    /// Never constructed: keeps the enum inhabited-in-type when no store is built.
    #[doc(hidden)]
    Unbuilt(std::convert::Infallible),
}

impl AnyStore {
    /// Creates what the store needs beyond its schema (the S3 bucket); the SQL stores create
    /// their tables when they open, Redis needs nothing.
    pub async fn provision(&self) -> Result<()> {
        match self {
            #[cfg(feature = "s3")]
            AnyStore::S3(s) => s.ensure_bucket().await,
            #[allow(unreachable_patterns)]
            _ => Ok(()),
        }
    }

    /// Opens the store named by the settings; `None` for `store.kind = "none"`.
    pub async fn open(settings: &Settings) -> Result<Option<Self>> {
        match settings.store.kind {
            StoreKind::None => Ok(None),
            #[cfg(feature = "embedded")]
            StoreKind::Sqlite => Ok(Some(AnyStore::Sqlite(
                sqlite::SqliteStore::open(&settings.store.url, settings.store.max_output_bytes)
                    .await?,
            ))),
            #[cfg(feature = "postgres")]
            StoreKind::Postgres => Ok(Some(AnyStore::Postgres(
                postgres::PostgresStore::open_with_ca(
                    &settings.store.url,
                    settings.store.max_output_bytes,
                    crate::config::read_ca_file(
                        "store.tls_ca_file",
                        settings.store.tls_ca_file.as_deref(),
                    )?
                    .as_deref(),
                )
                .await?,
            ))),
            #[cfg(feature = "redis")]
            StoreKind::Redis => Ok(Some(AnyStore::Redis(
                redis::RedisStore::open_with_ca(
                    &settings.store.url,
                    settings.store.max_output_bytes,
                    crate::config::read_ca_file(
                        "store.tls_ca_file",
                        settings.store.tls_ca_file.as_deref(),
                    )?
                    .as_deref(),
                )
                .await?,
            ))),
            #[cfg(feature = "s3")]
            StoreKind::S3 => Ok(Some(AnyStore::S3(
                s3::S3Store::open(&settings.store.url, settings.store.max_output_bytes).await?,
            ))),
            #[allow(unreachable_patterns)]
            other => Err(Error::Config(format!(
                "key `store.kind`: {} is not built into this binary (enable the cargo feature `{}` of sluice)",
                other.name(),
                other.name()
            ))),
        }
    }
}

macro_rules! delegate {
    ($self:ident, $s:ident => $e:expr) => {
        match $self {
            #[cfg(feature = "embedded")]
            AnyStore::Sqlite($s) => $e,
            #[cfg(feature = "postgres")]
            AnyStore::Postgres($s) => $e,
            #[cfg(feature = "redis")]
            AnyStore::Redis($s) => $e,
            #[cfg(feature = "s3")]
            AnyStore::S3($s) => $e,
            AnyStore::Unbuilt(never) => match *never {},
        }
    };
}

impl IdempotencyStore for AnyStore {
    async fn claim(&self, key: &str, fingerprint: &str, lease: Duration) -> Result<Claim> {
        delegate!(self, s => s.claim(key, fingerprint, lease).await)
    }
    async fn claim_many(&self, items: &[ClaimRequest], lease: Duration) -> Result<Vec<Claim>> {
        delegate!(self, s => s.claim_many(items, lease).await)
    }
    async fn complete(&self, key: &str, token: Token, output: &[u8], ttl: Duration) -> Result<()> {
        delegate!(self, s => s.complete(key, token, output, ttl).await)
    }
    async fn release(&self, key: &str, token: Token) -> Result<()> {
        delegate!(self, s => s.release(key, token).await)
    }
    async fn extend(&self, key: &str, token: Token, lease: Duration) -> Result<()> {
        delegate!(self, s => s.extend(key, token, lease).await)
    }
}
