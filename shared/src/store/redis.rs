//! Redis idempotency store (feature `redis`): one Redis hash per idempotency key, every
//! decision taken inside a Lua script so that reading the record, deciding and writing it is
//! one atomic step on the server.
//!
//! Layout: the record of key `k` is the hash `sluice:idem:` + the raw bytes of `k` (Redis keys
//! are binary-safe, so odd keys stay distinct with no escaping), with the fields
//! `state` (`in_progress` / `completed`), `token` (decimal i64), `fp` (payload fingerprint),
//! `lease_until` (Unix ms, server clock) and, once completed, `output`. The record TTL is the
//! key's own expiry: Redis deletes the key when it runs out, which is what "expired" means
//! here. A hash rather than one encoded value: fields are binary-safe and need no codec in Lua,
//! `extend` rewrites one field, and `HGETALL` shows a record as it is.
//!
//! Clock: every lease and expiry is computed from `redis.call('TIME')` inside the scripts, so
//! workers with skewed clocks agree on who holds a lease.
//!
//! Fencing token: a random non-negative i64 drawn by the claimer (as the SQLite store does),
//! stored and compared as a decimal string (Lua numbers are doubles and would round it). A
//! counter (`INCR`) would need a second key touched by every claim; a random 63-bit token
//! repeats with negligible probability.
//!
//! Scripts are run with `EVALSHA` and loaded again when the server answers `NOSCRIPT` (after a
//! restart, a failover or `SCRIPT FLUSH`); a script that answered `NOSCRIPT` did not run, so the
//! retry cannot apply a claim twice. `claim_many` sends one script call over all the keys of a
//! batch (one round trip, atomic for the batch) rather than a pipeline of calls, which would
//! need per-call `NOSCRIPT` handling. That script touches several keys, so Redis Cluster (keys
//! in different slots) is not supported: use a standalone server or a Sentinel-managed primary.
//!
//! Durability is Redis's own: without AOF (`appendfsync everysec` or `always`) a restart loses
//! recent records, an asynchronous replica promoted on failover can miss the latest writes, and
//! a `maxmemory-policy` other than `noeviction` may evict records. A lost record means a
//! message may run its handler again; see docs/idempotency.md.

use std::{sync::LazyLock, time::Duration};

use ::redis::{
    aio::{ConnectionManager, ConnectionManagerConfig},
    Client, ErrorKind, RedisError, Script, ScriptInvocation, ServerErrorKind,
};

use super::{check_key, Claim, ClaimRequest, IdempotencyStore, Token};
use crate::{
    config::redact_url,
    error::{Error, Result},
};

/// Prefix of every record key; the idempotency key's bytes follow as they are.
pub const KEY_PREFIX: &str = "sluice:idem:";

/// How long an in-progress record lives at most (its lease is what matters; this only lets
/// Redis drop records of workers that died). A lease longer than this stretches it.
pub const IN_PROGRESS_TTL: Duration = Duration::from_secs(24 * 3600);

/// Durations sent to the scripts are capped here (about 35,000 years): it keeps `now + d`
/// exact in Lua's doubles and within what `PEXPIRE` accepts.
const MAX_MS: u64 = 1 << 50;

/// Connecting (and each reconnect attempt) gives up after this long.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A command without an answer after this long fails with `Error::Store` (the client's own
/// default, 500 ms, is too short for a busy server or machine).
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);
/// How many times a script is loaded again after `NOSCRIPT` before giving up.
const NOSCRIPT_RETRIES: usize = 3;

/// Claims every key in KEYS. ARGV[1] = lease ms, ARGV[2] = in-progress record TTL ms, then for
/// key i: ARGV[1 + 2i] = fingerprint, ARGV[2 + 2i] = the token to store if acquired.
/// Answers, per key in order, {tag, payload}: {'acquired', ''}, {'completed', output},
/// {'in_progress', remaining ms}, {'mismatch', ''}. The order of the checks is the SQLite
/// store's: absent (or expired, which Redis has deleted) or a lapsed lease with the same
/// payload -> take it; another payload -> mismatch; completed -> output; else in progress.
const CLAIM_LUA: &str = r"
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local lease = tonumber(ARGV[1])
local ttl = math.max(tonumber(ARGV[2]), lease)
local answers = {}
for i, key in ipairs(KEYS) do
  local fp, token = ARGV[1 + 2 * i], ARGV[2 + 2 * i]
  local r = redis.call('HMGET', key, 'state', 'fp', 'lease_until', 'output')
  local state, stored_fp, lease_until, output = r[1], r[2], tonumber(r[3]), r[4]
  if not state or (state == 'in_progress' and lease_until <= now and stored_fp == fp) then
    redis.call('HSET', key, 'state', 'in_progress', 'token', token, 'fp', fp,
      'lease_until', string.format('%d', now + lease))
    redis.call('PEXPIRE', key, ttl)
    answers[i] = {'acquired', ''}
  elseif stored_fp ~= fp then
    answers[i] = {'mismatch', ''}
  elseif state == 'completed' then
    answers[i] = {'completed', output or ''}
  else
    answers[i] = {'in_progress', string.format('%d', math.max(lease_until - now, 0))}
  end
end
return answers
";

/// Completes KEYS[1] if it is in progress under token ARGV[1]: stores output ARGV[2] and makes
/// the record expire in ARGV[3] ms. Answers 1, or 0 for a stale token.
const COMPLETE_LUA: &str = r"
local r = redis.call('HMGET', KEYS[1], 'state', 'token')
if r[1] ~= 'in_progress' or r[2] ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'state', 'completed', 'output', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
";

/// Deletes KEYS[1] if it is in progress under token ARGV[1]. Answers 1, or 0 for a stale token.
const RELEASE_LUA: &str = r"
local r = redis.call('HMGET', KEYS[1], 'state', 'token')
if r[1] ~= 'in_progress' or r[2] ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
return 1
";

/// Moves the lease of KEYS[1] to now + ARGV[2] ms if it is in progress under token ARGV[1],
/// stretching the key's expiry if the lease would outlive it. Answers 1, or 0 for a stale token.
const EXTEND_LUA: &str = r"
local r = redis.call('HMGET', KEYS[1], 'state', 'token')
if r[1] ~= 'in_progress' or r[2] ~= ARGV[1] then return 0 end
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local lease = tonumber(ARGV[2])
redis.call('HSET', KEYS[1], 'lease_until', string.format('%d', now + lease))
if redis.call('PTTL', KEYS[1]) < lease then redis.call('PEXPIRE', KEYS[1], lease) end
return 1
";

static CLAIM: LazyLock<Script> = LazyLock::new(|| Script::new(CLAIM_LUA));
static COMPLETE: LazyLock<Script> = LazyLock::new(|| Script::new(COMPLETE_LUA));
static RELEASE: LazyLock<Script> = LazyLock::new(|| Script::new(RELEASE_LUA));
static EXTEND: LazyLock<Script> = LazyLock::new(|| Script::new(EXTEND_LUA));

/// Redis idempotency store. Cheap to clone: clones share one multiplexed connection, which
/// reconnects on its own after a failure (the failed command returns `Error::Store`).
#[derive(Clone)]
pub struct RedisStore {
    conn: ConnectionManager,
    max_output_bytes: usize,
}

impl RedisStore {
    /// Connects to `url` (`redis://[:password@]host[:port][/db]`, or `redis://user:password@...`
    /// with ACLs) and loads the scripts. The password never appears in errors.
    pub async fn open(url: &str, max_output_bytes: usize) -> Result<Self> {
        Self::open_with_ca(url, max_output_bytes, None).await
    }

    /// [`RedisStore::open`] trusting the CA certificates of `ca_pem` (the text of
    /// `store.tls_ca_file`) for `rediss://` instead of the system's roots. A certificate the
    /// client rejects fails with `Config` naming `store.tls_ca_file`.
    pub async fn open_with_ca(
        url: &str,
        max_output_bytes: usize,
        ca_pem: Option<&str>,
    ) -> Result<Self> {
        let shown = redact_url(url);
        let fail = |e: RedisError| {
            let text = e.to_string();
            if url.starts_with("rediss://")
                && (text.contains("certificate")
                    || text.contains("TLS")
                    || text.contains("handshake"))
            {
                return Error::Config(format!(
                    "key `store.tls_ca_file`: the TLS handshake with {shown} failed ({text}): \
                     does that CA file (or, unset, the system's roots) sign the server's \
                     certificate, and does the certificate name the URL's host?"
                ));
            }
            Error::store(format!("redis {shown}"), e)
        };
        if url.starts_with("rediss://") {
            crate::tls::install_provider();
        }
        let client = match ca_pem {
            Some(pem) => Client::build_with_tls(
                url,
                ::redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(pem.as_bytes().to_vec()),
                },
            ),
            None => Client::open(url),
        }
        .map_err(fail)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT));
        let mut conn = ConnectionManager::new_with_config(client, config)
            .await
            .map_err(fail)?;
        // Loading up front saves the first calls a NOSCRIPT round trip and checks the server.
        for script in [&*CLAIM, &*COMPLETE, &*RELEASE, &*EXTEND] {
            script.load_async(&mut conn).await.map_err(fail)?;
        }
        Ok(Self {
            conn,
            max_output_bytes,
        })
    }

    /// Runs a script call; on `NOSCRIPT` (the server lost its script cache) the script is
    /// loaded and the call sent again. `invoke_async` does that once; the loop covers a flush
    /// landing between the load and the call.
    async fn eval<T: ::redis::FromRedisValue>(&self, call: &ScriptInvocation<'_>) -> Result<T> {
        let mut conn = self.conn.clone();
        let mut tries = 0;
        loop {
            match call.invoke_async(&mut conn).await {
                Err(e)
                    if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript)
                        && tries < NOSCRIPT_RETRIES =>
                {
                    tries += 1
                }
                other => return other.map_err(|e| Error::store("redis", e)),
            }
        }
    }

    /// Runs a fenced script (complete, release, extend): 1 means done, 0 a stale token.
    async fn fenced(&self, key: &str, call: &ScriptInvocation<'_>) -> Result<()> {
        match self.eval::<i64>(call).await? {
            1 => Ok(()),
            _ => Err(Error::StaleToken(key.to_owned())),
        }
    }
}

/// The Redis key of an idempotency key's record.
pub fn record_key(key: &str) -> Vec<u8> {
    [KEY_PREFIX.as_bytes(), key.as_bytes()].concat()
}

/// Milliseconds for a script argument, capped at [`MAX_MS`].
fn ms(d: Duration) -> u64 {
    d.as_millis().min(u128::from(MAX_MS)) as u64
}

/// A fresh fencing token.
fn new_token() -> Token {
    Token(rand::random::<i64>() & i64::MAX)
}

/// Turns one `{tag, payload}` answer of the claim script into a `Claim`.
fn decode_claim((tag, payload): (String, Vec<u8>), token: Token) -> Result<Claim> {
    match tag.as_str() {
        "acquired" => Ok(Claim::Acquired(token)),
        "completed" => Ok(Claim::Completed(payload)),
        "mismatch" => Ok(Claim::FingerprintMismatch),
        "in_progress" => std::str::from_utf8(&payload)
            .ok()
            .and_then(|s| s.parse().ok())
            .map(|ms| Claim::InProgress(Duration::from_millis(ms)))
            .ok_or_else(|| Error::store_msg(format!("redis: bad remaining lease {payload:?}"))),
        other => Err(Error::store_msg(format!(
            "redis: unexpected claim answer {other:?}"
        ))),
    }
}

impl IdempotencyStore for RedisStore {
    async fn claim(&self, key: &str, fingerprint: &str, lease: Duration) -> Result<Claim> {
        let request = ClaimRequest {
            key: key.to_owned(),
            fingerprint: fingerprint.to_owned(),
        };
        let mut claims = self.claim_many(&[request], lease).await?;
        Ok(claims.remove(0))
    }

    async fn claim_many(&self, items: &[ClaimRequest], lease: Duration) -> Result<Vec<Claim>> {
        for item in items {
            check_key(&item.key)?;
        }
        if items.is_empty() {
            return Ok(Vec::new());
        }
        let tokens: Vec<Token> = items.iter().map(|_| new_token()).collect();
        let mut call = CLAIM.prepare_invoke();
        call.arg(ms(lease)).arg(ms(IN_PROGRESS_TTL));
        for (item, token) in items.iter().zip(&tokens) {
            call.key(record_key(&item.key))
                .arg(&item.fingerprint)
                .arg(token.0);
        }
        let answers: Vec<(String, Vec<u8>)> = self.eval(&call).await?;
        if answers.len() != items.len() {
            return Err(Error::store_msg(format!(
                "redis: {} answers for {} claims",
                answers.len(),
                items.len()
            )));
        }
        answers
            .into_iter()
            .zip(tokens)
            .map(|(answer, token)| decode_claim(answer, token))
            .collect()
    }

    async fn complete(&self, key: &str, token: Token, output: &[u8], ttl: Duration) -> Result<()> {
        if output.len() > self.max_output_bytes {
            return Err(Error::OutputTooLarge {
                size: output.len(),
                limit: self.max_output_bytes,
            });
        }
        let mut call = COMPLETE.key(record_key(key));
        call.arg(token.0).arg(output).arg(ms(ttl));
        self.fenced(key, &call).await
    }

    async fn release(&self, key: &str, token: Token) -> Result<()> {
        let mut call = RELEASE.key(record_key(key));
        call.arg(token.0);
        self.fenced(key, &call).await
    }

    async fn extend(&self, key: &str, token: Token, lease: Duration) -> Result<()> {
        let mut call = EXTEND.key(record_key(key));
        call.arg(token.0).arg(ms(lease));
        self.fenced(key, &call).await
    }
}
