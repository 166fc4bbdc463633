//! The pipeline around a store that goes down: fail closed by default (messages go back with
//! backoff and no handler runs unclaimed), fail open only when configured. The store is the
//! real Redis, reached through a TCP proxy that the test cuts and restores.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use sluice::{
    conformance::poll_until, worker::RunOptions, CancellationToken, Context, Function,
    HandlerError, OutgoingMessage, Settings, Transport,
};
use sluice_tests::TcpProxy;

/// Longest wait for the worker to react (retries are 100-300 ms apart here).
const REACT: Duration = Duration::from_secs(20);

#[derive(Deserialize)]
struct Job {
    key: String,
}

#[derive(Serialize)]
struct Done {
    key: String,
}

/// Handler calls per key.
#[derive(Clone, Default)]
struct Calls(Arc<Mutex<BTreeMap<String, u32>>>);

impl Calls {
    fn total(&self) -> u32 {
        self.0.lock().unwrap().values().sum()
    }
}

async fn handler(job: Job, ctx: &Context<Calls>) -> Result<Done, HandlerError> {
    *ctx.state()
        .0
        .lock()
        .unwrap()
        .entry(job.key.clone())
        .or_default() += 1;
    Ok(Done { key: job.key })
}

/// The test server's `host:port` (`SLUICE_TEST_REDIS_URL`), for the proxy to connect to.
fn redis_target() -> String {
    let url = sluice_tests::redis_url();
    url.trim_start_matches("redis://")
        .split('/')
        .next()
        .unwrap()
        .to_owned()
}

async fn start(
    fail_open: bool,
    cache_entries: usize,
) -> (
    tempfile::TempDir,
    TcpProxy,
    Calls,
    Arc<sluice::worker::Runtime>,
) {
    let dir = tempfile::tempdir().unwrap();
    let proxy = TcpProxy::start(&redis_target()).await.unwrap();
    let settings = Settings::load(
        "store-outage",
        None,
        std::iter::empty(),
        &[
            format!("queue=outage-{}", uuid::Uuid::new_v4().simple()),
            format!("transport.url={}", dir.path().join("q.db").display()),
            "transport.wait=50ms".into(),
            // A claim whose answer was lost in the outage (sent, applied by Redis after the
            // proxy came back, but timed out here) holds its key until its lease ends: the
            // lease (= message lease) is short so the test sees the key free up.
            "transport.lease=1s".into(),
            "store.kind=redis".into(),
            format!("store.url=redis://{}/0", proxy.addr),
            "store.timeout=500ms".into(),
            format!("store.fail_open={fail_open}"),
            format!("store.cache_entries={cache_entries}"),
            "retry.immediate=0".into(),
            "retry.base=100ms".into(),
            "retry.cap=300ms".into(),
            "retry.max_deliveries=1000".into(),
            "breaker.enabled=false".into(),
            "telemetry.log_level=error".into(),
        ],
    )
    .unwrap();
    let calls = Calls::default();
    let c = calls.clone();
    let rt = Function::new("store-outage", handler)
        .idempotency_key(|j: &Job| j.key.clone())
        .state(move |_| async move { Ok(c) })
        .build(settings)
        .await
        .unwrap();
    (dir, proxy, calls, Arc::new(rt))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_down_fails_closed_then_every_message_runs_once_when_it_is_back() {
    let (_dir, proxy, calls, rt) = start(false, 0).await;
    let run_id = uuid::Uuid::new_v4().simple().to_string();
    proxy.cut();
    let msgs = (0..5)
        .map(|i| OutgoingMessage::new(format!(r#"{{"key":"{run_id}-{i}"}}"#)))
        .collect();
    rt.transport().publish(msgs).await.unwrap();
    let stop = CancellationToken::new();
    let worker = tokio::spawn({
        let (rt, stop) = (rt.clone(), stop.clone());
        async move { rt.run(RunOptions::default(), stop).await }
    });

    // Every message goes back to the queue at least twice while the store is down...
    poll_until(REACT, "retries while the store is down", || async {
        (rt.metrics
            .retried
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 10)
            .then_some(())
    })
    .await;
    // ...and no handler ran unclaimed.
    assert_eq!(
        calls.total(),
        0,
        "fail closed: the handler never runs without a claim"
    );
    assert_eq!(rt.transport().stats().await.unwrap().dead_lettered, 0);

    proxy.restore();
    poll_until(REACT, "all five handled once the store is back", || async {
        (calls.total() == 5 && rt.transport().stats().await.unwrap().is_drained()).then_some(())
    })
    .await;
    stop.cancel();
    worker.await.unwrap().unwrap();
    let per_key = calls.0.lock().unwrap().clone();
    assert_eq!(per_key.len(), 5);
    assert!(
        per_key.values().all(|n| *n == 1),
        "each key once: {per_key:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_open_runs_the_handler_unclaimed_while_the_store_is_down() {
    let (_dir, proxy, calls, rt) = start(true, 0).await;
    let run_id = uuid::Uuid::new_v4().simple().to_string();
    proxy.cut();
    let msgs = (0..3)
        .map(|i| OutgoingMessage::new(format!(r#"{{"key":"{run_id}-{i}"}}"#)))
        .collect();
    rt.transport().publish(msgs).await.unwrap();
    let summary = rt
        .run(RunOptions { drain: true }, CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(calls.total(), 3, "fail open: handled without a claim");
    assert_eq!(summary.succeeded, 3);
    assert_eq!(summary.retried, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_completions_absorb_duplicates_without_the_store() {
    let (_dir, proxy, calls, rt) = start(false, 100).await;
    let body = format!(r#"{{"key":"{}"}}"#, uuid::Uuid::new_v4().simple());
    rt.transport()
        .publish(vec![OutgoingMessage::new(body.clone())])
        .await
        .unwrap();
    let first = rt
        .run(RunOptions { drain: true }, CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(first.succeeded, 1);
    // The store is gone, but the worker remembers the completion: the duplicate is answered
    // from the cache (no round trip, so no outage to notice).
    proxy.cut();
    rt.transport()
        .publish(vec![OutgoingMessage::new(body)])
        .await
        .unwrap();
    let second = rt
        .run(RunOptions { drain: true }, CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(
        second.duplicates_skipped, 1,
        "duplicate absorbed from the cache"
    );
    assert_eq!(second.retried, 0, "no store call was needed");
    assert_eq!(calls.total(), 1);
}
