//! What the worker puts in front of a store: a claim batcher, so that the claims of messages
//! arriving together cost one round trip (`claim_many`), and an optional bounded cache of
//! completed keys, so that duplicates of recent work cost none.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    sync::Arc,
    time::{Duration, Instant},
};

use super::{AnyStore, Claim, ClaimRequest, IdempotencyStore, Token};
use crate::{
    batch::Batcher,
    error::{Error, Result},
    sync::Mutex,
};

/// Most claims sent in one `claim_many` call.
const MAX_BATCH: usize = 64;

/// The store as the pipeline uses it.
pub struct StoreFront {
    store: Arc<AnyStore>,
    claims: Batcher<(ClaimRequest, Duration), Result<Claim>>,
    cache: Option<CompletedCache>,
    timeout: Duration,
}

impl StoreFront {
    /// Starts the batcher task (needs a tokio runtime). `cache_entries = 0` turns the cache off;
    /// every call gives up with `Error::Timeout` after `timeout`.
    pub fn new(
        store: AnyStore,
        cache_entries: usize,
        cache_ttl: Duration,
        timeout: Duration,
    ) -> Self {
        let store = Arc::new(store);
        let batched = store.clone();
        let claims = Batcher::spawn(MAX_BATCH, move |batch| {
            let store = batched.clone();
            async move { claim_rounds(&store, batch, timeout).await }
        });
        Self {
            store,
            claims,
            cache: (cache_entries > 0).then(|| CompletedCache::new(cache_entries, cache_ttl)),
            timeout,
        }
    }

    /// The store named by the settings behind a front; `None` for `store.kind = "none"`.
    pub async fn open(settings: &crate::config::Settings) -> Result<Option<Self>> {
        let store = AnyStore::open(settings).await?;
        Ok(store.map(|s| {
            Self::new(
                s,
                settings.store.cache_entries,
                settings.store.ttl,
                settings.store.timeout,
            )
        }))
    }

    /// Bounds a store call: a store that does not answer is treated as down.
    async fn bounded<T>(&self, call: impl std::future::Future<Output = Result<T>>) -> Result<T> {
        tokio::time::timeout(self.timeout, call)
            .await
            .map_err(|_| Error::Timeout(self.timeout))?
    }

    /// The store behind the front.
    pub fn store(&self) -> &AnyStore {
        &self.store
    }

    /// Remembers a completion made outside [`StoreFront::complete`] (the effects transaction).
    pub fn remember(&self, key: &str, fingerprint: &str, output: &[u8]) {
        if let Some(cache) = &self.cache {
            cache.put(key, fingerprint, output);
        }
    }

    /// Extends our lease on the record.
    pub async fn extend(&self, key: &str, token: Token, lease: Duration) -> Result<()> {
        self.bounded(self.store.extend(key, token, lease)).await
    }

    /// Releases our in-progress record.
    pub async fn release(&self, key: &str, token: Token) -> Result<()> {
        self.bounded(self.store.release(key, token)).await
    }

    /// Claims through the cache, then the batcher.
    pub async fn claim(&self, key: &str, fingerprint: &str, lease: Duration) -> Result<Claim> {
        if let Some(hit) = self.cache.as_ref().and_then(|c| c.get(key, fingerprint)) {
            return Ok(hit);
        }
        let req = ClaimRequest {
            key: key.to_owned(),
            fingerprint: fingerprint.to_owned(),
        };
        let claim = self
            .bounded(async {
                self.claims
                    .call((req, lease))
                    .await
                    .ok_or_else(|| Error::store_msg("the claim batcher has stopped"))?
            })
            .await?;
        if let (Some(cache), Claim::Completed(output)) = (&self.cache, &claim) {
            cache.put(key, fingerprint, output);
        }
        Ok(claim)
    }

    /// Completes the record (and remembers it in the cache).
    pub async fn complete(
        &self,
        key: &str,
        fingerprint: &str,
        token: Token,
        output: &[u8],
        ttl: Duration,
    ) -> Result<()> {
        self.bounded(self.store.complete(key, token, output, ttl))
            .await?;
        if let Some(cache) = &self.cache {
            cache.put(key, fingerprint, output);
        }
        Ok(())
    }
}

/// Claims a batch of waiting requests (`crate::batch`) with as few `claim_many` calls as
/// it can: a key may appear only once per call, so a repeat waits for the next round, where
/// it sees the first one's claim.
async fn claim_rounds(
    store: &AnyStore,
    batch: Vec<(ClaimRequest, Duration)>,
    timeout: Duration,
) -> Vec<Result<Claim>> {
    let mut answers: Vec<Option<Result<Claim>>> = batch.iter().map(|_| None).collect();
    let mut waiting: Vec<usize> = (0..batch.len()).collect();
    while !waiting.is_empty() {
        let mut seen = HashSet::new();
        let (round, later): (Vec<usize>, Vec<usize>) = waiting
            .into_iter()
            .partition(|&i| seen.insert(batch[i].0.key.clone()));
        waiting = later;
        // All claims of one worker carry the same lease (transport.lease).
        let lease = batch[round[0]].1;
        let reqs: Vec<ClaimRequest> = round.iter().map(|&i| batch[i].0.clone()).collect();
        // Bounded here too: a hung call would otherwise hold up every later claim.
        let answer = tokio::time::timeout(timeout, store.claim_many(&reqs, lease))
            .await
            .unwrap_or(Err(Error::Timeout(timeout)));
        match answer {
            Ok(claims) => {
                for (&i, c) in round.iter().zip(claims) {
                    answers[i] = Some(Ok(c));
                }
            }
            Err(e) => {
                // One failure for every claim of the round, each with the whole cause.
                let msg = e.report().to_string();
                for &i in &round {
                    answers[i] = Some(Err(Error::store_msg(msg.clone())));
                }
            }
        }
    }
    answers
        .into_iter()
        .map(|a| a.unwrap_or_else(|| Err(Error::store_msg("the store gave no answer to a claim"))))
        .collect()
}

/// Key -> (fingerprint, output, valid until), and keys oldest first.
type CacheMaps = (
    HashMap<String, (String, Vec<u8>, Instant)>,
    VecDeque<String>,
);

/// A bounded cache of completed records (oldest evicted first). Only completed records are
/// cached: they never change until they expire, so a hit is as good as the store's answer.
struct CompletedCache {
    max: usize,
    ttl: Duration,
    inner: Mutex<CacheMaps>,
}

impl CompletedCache {
    fn new(max: usize, ttl: Duration) -> Self {
        Self {
            max,
            ttl,
            inner: Mutex::new((HashMap::new(), VecDeque::new())),
        }
    }

    fn get(&self, key: &str, fingerprint: &str) -> Option<Claim> {
        let g = self.inner.lock();
        let (fp, output, until) = g.0.get(key)?;
        if Instant::now() >= *until {
            return None;
        }
        Some(if fp == fingerprint {
            Claim::Completed(output.clone())
        } else {
            Claim::FingerprintMismatch
        })
    }

    fn put(&self, key: &str, fingerprint: &str, output: &[u8]) {
        let mut g = self.inner.lock();
        let (map, order) = &mut *g;
        let entry = (
            fingerprint.to_owned(),
            output.to_vec(),
            Instant::now() + self.ttl,
        );
        if map.insert(key.to_owned(), entry).is_none() {
            order.push_back(key.to_owned());
        }
        while map.len() > self.max {
            match order.pop_front() {
                Some(old) => {
                    map.remove(&old);
                }
                None => break,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_answers_completed_or_mismatch_and_evicts_the_oldest() {
        let c = CompletedCache::new(2, Duration::from_secs(60));
        c.put("a", "fa", b"1");
        c.put("b", "fb", b"2");
        assert_eq!(c.get("a", "fa"), Some(Claim::Completed(b"1".to_vec())));
        assert_eq!(c.get("a", "other"), Some(Claim::FingerprintMismatch));
        c.put("c", "fc", b"3");
        assert_eq!(c.get("a", "fa"), None, "oldest evicted");
        assert!(c.get("b", "fb").is_some() && c.get("c", "fc").is_some());
    }

    #[test]
    fn cache_entries_expire_with_the_record_ttl() {
        let c = CompletedCache::new(10, Duration::ZERO);
        c.put("a", "fa", b"1");
        assert_eq!(c.get("a", "fa"), None);
    }
}
