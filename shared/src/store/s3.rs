//! S3 idempotency store: one small JSON object per key, changed only by S3 conditional writes.
//!
//! `store.url = "s3://bucket/optional/prefix"`. Region, credentials and endpoint come from the
//! standard AWS environment (`AWS_REGION`, `AWS_ENDPOINT_URL[_S3]`, profiles, the Lambda role),
//! so one binary talks to AWS or to moto; with an endpoint override the client uses path-style
//! addressing (moto and most S3 look-alikes need it).
//!
//! Object: `<prefix>/<hex SHA-256 of the key>`, so any key bytes are safe and every name has
//! the same length. Body: `{key, state, token, fingerprint, lease_until_ms, expires_at_ms,
//! output}` with the output in hex; the raw key is checked on every read.
//!
//! Conditional writes decide every race:
//! - `claim`: GET; absent -> `PutObject If-None-Match: *`; present and takeover allowed (record
//!   expired, or in progress with an expired lease and the same fingerprint) -> `PutObject
//!   If-Match: <etag>`; a 412 (or 409 `ConditionalRequestConflict`, or 404 when the object
//!   vanished) means another writer won: re-read and answer from what is there.
//! - `complete` / `extend`: GET, check token and state, `PutObject If-Match: <etag>`.
//! - `release`: GET, check token and state, `DeleteObject If-Match: <etag>`.
//!
//! Time: S3 has no server clock a condition can read, so lease and expiry timestamps are the
//! writer's clock. Workers need NTP-synchronized clocks and leases much longer than the skew
//! between them (seconds of skew against minutes of lease).
//!
//! TTL: a record past `expires_at_ms` counts as absent for `claim` (it is overwritten with a
//! conditional write). Deleting old objects is left to an S3 lifecycle rule on the prefix
//! (`infra/aws/idempotency-bucket.yaml`), set to at least the longest record TTL.
//!
//! `claim_many`: S3 has no batch conditional write, so the claims run concurrently (at most
//! [`CLAIM_MANY_CONCURRENCY`] at a time): about one claim's round trips of wall time.

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use aws_sdk_s3::{
    config::{timeout::TimeoutConfig, BehaviorVersion, Region},
    error::{DisplayErrorContext, ProvideErrorMetadata, SdkError},
    primitives::ByteStream,
    types::{BucketLocationConstraint, CreateBucketConfiguration},
    Client,
};
use futures_util::{stream, StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::Barrier;

use super::{check_key, Claim, ClaimRequest, IdempotencyStore, Token, MAX_KEY_BYTES};
use crate::{
    error::{Error, Result},
    time::unix_ms,
};

/// How long an in-progress record lives at most (its lease is what matters; this only lets a
/// record of a worker that died count as absent, and the lifecycle rule delete it).
const IN_PROGRESS_TTL: Duration = Duration::from_secs(24 * 3600);

/// A claim re-reads and retries after losing a race; each round someone else's write landed,
/// so more than a few rounds means heavy churn on one key: give up with a store error.
const MAX_CLAIM_ROUNDS: usize = 8;

/// Claims of one `claim_many` call in flight at once.
pub const CLAIM_MANY_CONCURRENCY: usize = 16;

/// Bound on one S3 request attempt, and on a whole operation with the SDK's retries.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);
const OPERATION_TIMEOUT: Duration = Duration::from_secs(15);

/// JSON around the key and the hex output: field names, token, fingerprint, timestamps.
const RECORD_OVERHEAD_BYTES: usize = 1024;

/// A record object is never larger than this for a store with `max_output_bytes`: the hex
/// output, the key escaped at worst (`\uXXXX` per byte) and the rest. Anything larger is not
/// ours and is not read.
fn max_object_bytes(max_output_bytes: usize) -> usize {
    2 * max_output_bytes + 6 * MAX_KEY_BYTES + RECORD_OVERHEAD_BYTES
}

/// The state of a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum State {
    InProgress,
    Completed,
}

/// The body of one record object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Record {
    key: String,
    state: State,
    token: i64,
    fingerprint: String,
    lease_until_ms: i64,
    expires_at_ms: i64,
    /// The handler output, hex (completed records only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    output: Option<String>,
}

impl Record {
    fn in_progress(key: &str, fingerprint: &str, token: i64, now: i64, lease: Duration) -> Self {
        Self {
            key: key.to_owned(),
            state: State::InProgress,
            token,
            fingerprint: fingerprint.to_owned(),
            lease_until_ms: now + ms(lease),
            expires_at_ms: now + ms(IN_PROGRESS_TTL.max(lease)),
            output: None,
        }
    }

    /// The takeover rule: an expired record is absent; an in-progress record whose lease ran
    /// out may be taken by a claimer with the same payload.
    fn can_take_over(&self, fingerprint: &str, now: i64) -> bool {
        self.expires_at_ms <= now
            || (self.state == State::InProgress
                && self.lease_until_ms <= now
                && self.fingerprint == fingerprint)
    }

    /// What a claim that may not take this record over answers.
    fn answer(&self, fingerprint: &str, now: i64) -> Result<Claim> {
        if self.fingerprint != fingerprint {
            return Ok(Claim::FingerprintMismatch);
        }
        match self.state {
            State::Completed => {
                let output = hex::decode(self.output.as_deref().unwrap_or_default())
                    .map_err(|e| Error::store("s3: record output is not hex", e))?;
                Ok(Claim::Completed(output))
            }
            State::InProgress => Ok(Claim::InProgress(Duration::from_millis(
                (self.lease_until_ms - now).max(0) as u64,
            ))),
        }
    }

    fn is_held_by(&self, token: Token) -> bool {
        self.token == token.0 && self.state == State::InProgress
    }
}

/// The precondition of a write.
enum Precondition {
    /// `If-None-Match: *`: create only.
    Absent,
    /// `If-Match: <etag>`: replace exactly the version we read.
    Etag(String),
}

/// Whether a conditional write landed.
#[derive(Debug, PartialEq, Eq)]
enum Write {
    Done,
    /// Another writer changed or removed the object first (412, 409, or 404 on `If-Match`).
    Lost,
}

/// S3 idempotency store.
#[derive(Clone)]
pub struct S3Store {
    client: Client,
    bucket: String,
    /// Empty, or ends with `/`.
    prefix: String,
    region: String,
    max_output_bytes: usize,
    /// Tests only: every claim waits here after its first read (see `pause_claims_after_read`).
    pause_after_read: Option<Arc<Barrier>>,
}

impl S3Store {
    /// Opens the store at `s3://bucket/optional/prefix` with the client configuration of the
    /// standard AWS environment. Makes no request: a missing bucket shows on first use.
    pub async fn open(url: &str, max_output_bytes: usize) -> Result<Self> {
        let (bucket, prefix) = parse_url(url)?;
        let shared = aws_config::load_defaults(BehaviorVersion::latest()).await;
        let region = shared.region().map(Region::to_string).ok_or_else(|| {
            Error::Config(
                "key `store.url`: an S3 store needs an AWS region (set AWS_REGION)".into(),
            )
        })?;
        let endpoint_override =
            shared.endpoint_url().is_some() || std::env::var_os("AWS_ENDPOINT_URL_S3").is_some();
        let config = aws_sdk_s3::config::Builder::from(&shared)
            .force_path_style(endpoint_override)
            .timeout_config(
                TimeoutConfig::builder()
                    .operation_attempt_timeout(ATTEMPT_TIMEOUT)
                    .operation_timeout(OPERATION_TIMEOUT)
                    .build(),
            )
            .build();
        Ok(Self {
            client: Client::from_conf(config),
            bucket,
            prefix,
            region,
            max_output_bytes,
            pause_after_read: None,
        })
    }

    /// Creates the bucket if it does not exist (tests, `provision`). The lifecycle rule that
    /// deletes old records is the deploy template's job.
    pub async fn ensure_bucket(&self) -> Result<()> {
        match self.client.head_bucket().bucket(&self.bucket).send().await {
            Ok(_) => return Ok(()),
            Err(e) if status(&e) == Some(404) => {}
            Err(e) => return Err(sdk_err("HeadBucket", &self.bucket, e)),
        }
        let mut create = self.client.create_bucket().bucket(&self.bucket);
        if self.region != "us-east-1" {
            create = create.create_bucket_configuration(
                CreateBucketConfiguration::builder()
                    .location_constraint(BucketLocationConstraint::from(self.region.as_str()))
                    .build(),
            );
        }
        match create.send().await {
            Ok(_) => Ok(()),
            Err(e) if code(&e) == Some("BucketAlreadyOwnedByYou") => Ok(()),
            Err(e) => Err(sdk_err("CreateBucket", &self.bucket, e)),
        }
    }

    /// The object that holds `key`'s record: `<prefix><hex SHA-256 of the key>`.
    pub fn object_name(&self, key: &str) -> String {
        format!(
            "{}{}",
            self.prefix,
            hex::encode(Sha256::digest(key.as_bytes()))
        )
    }

    /// The raw body of `key`'s record object, if any (inspection and tests).
    pub async fn read_object(&self, key: &str) -> Result<Option<Vec<u8>>> {
        Ok(self
            .get_raw(&self.object_name(key))
            .await?
            .map(|(body, _)| body))
    }

    /// Tests only: every claim through this handle waits at `barrier` after its first read,
    /// so several claimers can all see the same state before any of them writes.
    #[cfg(feature = "conformance")]
    pub fn pause_claims_after_read(mut self, barrier: Arc<Barrier>) -> Self {
        self.pause_after_read = Some(barrier);
        self
    }

    /// GET: the body and its etag, `None` if there is no object.
    async fn get_raw(&self, name: &str) -> Result<Option<(Vec<u8>, String)>> {
        let out = match self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(name)
            .send()
            .await
        {
            Ok(out) => out,
            Err(e) if status(&e) == Some(404) && code(&e) != Some(NO_SUCH_BUCKET) => {
                return Ok(None)
            }
            Err(e) => return Err(sdk_err("GetObject", name, e)),
        };
        let limit = max_object_bytes(self.max_output_bytes);
        if out.content_length().unwrap_or(0) as u64 > limit as u64 {
            return Err(Error::store_msg(format!(
                "s3: object {name} is over {limit} bytes: not an idempotency record"
            )));
        }
        let etag = out
            .e_tag()
            .ok_or_else(|| {
                Error::store_msg(format!("s3: GetObject {name}: no ETag in the answer"))
            })?
            .to_owned();
        let body = out
            .body
            .collect()
            .await
            .map_err(|e| Error::store(format!("s3: reading object {name}"), e))?
            .to_vec();
        Ok(Some((body, etag)))
    }

    /// GET and decode `key`'s record, checking that it holds this very key.
    async fn read(&self, name: &str, key: &str) -> Result<Option<(Record, String)>> {
        let Some((body, etag)) = self.get_raw(name).await? else {
            return Ok(None);
        };
        let record: Record = serde_json::from_slice(&body)
            .map_err(|e| Error::store(format!("s3: object {name} is not a record"), e))?;
        if record.key != key {
            return Err(Error::store_msg(format!(
                "s3: object {name} holds key {:?}, not {key:?}",
                record.key
            )));
        }
        Ok(Some((record, etag)))
    }

    /// A conditional PUT of `record`.
    async fn put(&self, name: &str, record: &Record, when: Precondition) -> Result<Write> {
        let body =
            serde_json::to_vec(record).map_err(|e| Error::store("s3: encoding record", e))?;
        let put = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(name)
            .content_type("application/json")
            .body(ByteStream::from(body));
        let put = match when {
            Precondition::Absent => put.if_none_match("*"),
            Precondition::Etag(etag) => put.if_match(etag),
        };
        match put.send().await {
            Ok(_) => Ok(Write::Done),
            Err(e) if lost_race(&e) => Ok(Write::Lost),
            Err(e) => Err(sdk_err("PutObject", name, e)),
        }
    }

    /// One claim: read, then create or take over with a conditional write; on a lost race read
    /// again and answer from what the winner wrote.
    async fn claim_one(&self, key: &str, fingerprint: &str, lease: Duration) -> Result<Claim> {
        check_key(key)?;
        let name = self.object_name(key);
        let mut attempt: Option<Record> = None;
        for round in 0..MAX_CLAIM_ROUNDS {
            let current = self.read(&name, key).await?;
            if round == 0 {
                if let Some(barrier) = &self.pause_after_read {
                    barrier.wait().await;
                }
            }
            let now = now_ms();
            let when = match current {
                // Our "lost" write landed after all: the SDK retried a request whose first
                // attempt succeeded. Tokens are random, so only we wrote this very record.
                Some((record, _)) if Some(&record) == attempt.as_ref() => {
                    return Ok(Claim::Acquired(Token(record.token)))
                }
                None => Precondition::Absent,
                Some((record, etag)) if record.can_take_over(fingerprint, now) => {
                    Precondition::Etag(etag)
                }
                Some((record, _)) => return record.answer(fingerprint, now),
            };
            let mine = Record::in_progress(key, fingerprint, new_token(), now, lease);
            if self.put(&name, &mine, when).await? == Write::Done {
                return Ok(Claim::Acquired(Token(mine.token)));
            }
            attempt = Some(mine);
        }
        Err(Error::store_msg(format!(
            "s3: claim of key {key:?} lost {MAX_CLAIM_ROUNDS} races in a row"
        )))
    }

    /// After a lost `If-Match` write: did ours land after all (the SDK retried a request whose
    /// first attempt succeeded, and the retry met our own object)?
    async fn landed(&self, name: &str, mine: &Record) -> Result<bool> {
        Ok(matches!(self.read(name, &mine.key).await?, Some((r, _)) if r == *mine))
    }

    /// The shared part of `complete` and `extend`: read, check we hold the record, write the
    /// changed record over exactly the version we read.
    async fn update_held(
        &self,
        key: &str,
        token: Token,
        change: impl FnOnce(&mut Record, i64),
    ) -> Result<()> {
        check_key(key)?;
        let name = self.object_name(key);
        let (mut record, etag) = match self.read(&name, key).await? {
            Some((record, etag)) if record.is_held_by(token) => (record, etag),
            _ => return Err(stale(key)),
        };
        change(&mut record, now_ms());
        match self.put(&name, &record, Precondition::Etag(etag)).await? {
            Write::Done => Ok(()),
            Write::Lost if self.landed(&name, &record).await? => Ok(()),
            Write::Lost => Err(stale(key)),
        }
    }
}

impl IdempotencyStore for S3Store {
    async fn claim(&self, key: &str, fingerprint: &str, lease: Duration) -> Result<Claim> {
        self.claim_one(key, fingerprint, lease).await
    }

    async fn claim_many(&self, items: &[ClaimRequest], lease: Duration) -> Result<Vec<Claim>> {
        for item in items {
            check_key(&item.key)?;
        }
        // No batch conditional write in S3: concurrent single claims, answers in input order.
        // (The futures are built first: a `map` closure in the stream trips the compiler's
        // `Send` check on higher-ranked lifetimes.)
        let claims: Vec<_> = items
            .iter()
            .map(|i| self.claim_one(&i.key, &i.fingerprint, lease))
            .collect();
        stream::iter(claims)
            .buffered(CLAIM_MANY_CONCURRENCY)
            .try_collect()
            .await
    }

    async fn complete(&self, key: &str, token: Token, output: &[u8], ttl: Duration) -> Result<()> {
        if output.len() > self.max_output_bytes {
            return Err(Error::OutputTooLarge {
                size: output.len(),
                limit: self.max_output_bytes,
            });
        }
        let output = hex::encode(output);
        self.update_held(key, token, |r, now| {
            r.state = State::Completed;
            r.output = Some(output);
            r.expires_at_ms = now + ms(ttl);
        })
        .await
    }

    async fn release(&self, key: &str, token: Token) -> Result<()> {
        check_key(key)?;
        let name = self.object_name(key);
        let etag = match self.read(&name, key).await? {
            Some((record, etag)) if record.is_held_by(token) => etag,
            _ => return Err(stale(key)),
        };
        match self
            .client
            .delete_object()
            .bucket(&self.bucket)
            .key(&name)
            .if_match(etag)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            // Gone since our read: our own retried delete, or a takeover after our lease
            // ran out and its release. Either way nobody holds it under our token.
            Err(e) if lost_race(&e) && self.read(&name, key).await?.is_none() => Ok(()),
            Err(e) if lost_race(&e) => Err(stale(key)),
            Err(e) => Err(sdk_err("DeleteObject", &name, e)),
        }
    }

    async fn extend(&self, key: &str, token: Token, lease: Duration) -> Result<()> {
        self.update_held(key, token, |r, now| {
            r.lease_until_ms = now + ms(lease);
            r.expires_at_ms = r.expires_at_ms.max(r.lease_until_ms);
        })
        .await
    }
}

/// `s3://bucket/optional/prefix` -> (`bucket`, `optional/prefix/`).
fn parse_url(url: &str) -> Result<(String, String)> {
    let bad = |why: &str| {
        Error::Config(format!(
            "key `store.url`: {why}; expected s3://bucket/optional/prefix, got {url:?}"
        ))
    };
    let rest = url
        .strip_prefix("s3://")
        .ok_or_else(|| bad("not an s3:// URL"))?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    let bucket_ok = (3..=63).contains(&bucket.len())
        && bucket
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
    if !bucket_ok {
        return Err(bad("bad bucket name (3-63 of a-z, 0-9, '-', '.')"));
    }
    if prefix.contains(['?', '#']) || prefix.starts_with('/') || prefix.contains("//") {
        return Err(bad("the prefix may not hold '?', '#' or an empty segment"));
    }
    let prefix = prefix.trim_end_matches('/');
    let prefix = if prefix.is_empty() {
        String::new()
    } else {
        format!("{prefix}/")
    };
    Ok((bucket.to_owned(), prefix))
}

/// A 404 that is a configuration error, not an absent record.
const NO_SUCH_BUCKET: &str = "NoSuchBucket";

/// The HTTP status of a failed request, if a response came back.
fn status<E>(e: &SdkError<E>) -> Option<u16> {
    e.raw_response().map(|r| r.status().as_u16())
}

/// The S3 error code of a failed request.
fn code<E: ProvideErrorMetadata>(e: &SdkError<E>) -> Option<&str> {
    e.as_service_error().and_then(|s| s.code())
}

/// A conditional write lost to another writer: 412 `PreconditionFailed`, 409
/// `ConditionalRequestConflict` (a concurrent write to the same key), or 404 (the object we
/// matched on was deleted). The code is checked too: S3 may carry it in a 200 answer.
fn lost_race<E: ProvideErrorMetadata>(e: &SdkError<E>) -> bool {
    if code(e) == Some(NO_SUCH_BUCKET) {
        return false;
    }
    matches!(status(e), Some(412 | 409 | 404))
        || matches!(
            code(e),
            Some("PreconditionFailed" | "ConditionalRequestConflict" | "NoSuchKey")
        )
}

fn sdk_err<E: std::error::Error + 'static>(op: &str, name: &str, e: SdkError<E>) -> Error {
    // DisplayErrorContext walks the SDK's own chain, which its Display alone does not print.
    Error::store_msg(format!("s3: {op} {name}: {}", DisplayErrorContext(&e)))
}

fn stale(key: &str) -> Error {
    Error::StaleToken(key.to_owned())
}

fn new_token() -> i64 {
    rand::random::<i64>() & i64::MAX
}

fn now_ms() -> i64 {
    unix_ms(SystemTime::now())
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX / 4)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_into_bucket_and_prefix() {
        let ok = |url: &str| parse_url(url).unwrap();
        assert_eq!(ok("s3://my-bucket"), ("my-bucket".into(), String::new()));
        assert_eq!(ok("s3://my-bucket/"), ("my-bucket".into(), String::new()));
        assert_eq!(ok("s3://b.c.d/idem"), ("b.c.d".into(), "idem/".into()));
        assert_eq!(ok("s3://abc/a/b/"), ("abc".into(), "a/b/".into()));
        for bad in [
            "https://abc/x",
            "s3://",
            "s3://ab",
            "s3://Upper",
            "s3://abc/x?y",
            "s3://abc//x",
        ] {
            assert!(matches!(parse_url(bad), Err(Error::Config(_))), "{bad}");
        }
    }

    #[test]
    fn takeover_follows_the_reference_rules() {
        let r = Record::in_progress("k", "fp", 1, 1_000, Duration::from_secs(1));
        assert!(!r.can_take_over("fp", 1_999));
        assert!(r.can_take_over("fp", 2_000));
        assert!(!r.can_take_over("other", 2_000));
        let done = Record {
            state: State::Completed,
            expires_at_ms: 5_000,
            ..r
        };
        assert!(!done.can_take_over("fp", 4_999));
        assert!(done.can_take_over("other", 5_000));
    }
}
