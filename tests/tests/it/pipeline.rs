//! Black-box tests of the worker pipeline (`Runtime::run`) on the embedded SQLite queue and
//! store, in-process, through the public API only.
//!
//! Every test gets its own temporary directory (queue file, store file) and its own queue
//! name, builds a runtime around [`handler`], publishes [`Job`]s whose `mode` selects what the
//! handler does, runs the worker and asserts on the run summary, the queue, the dead-letter
//! queue and the [`Probe`] (the handler's shared state, which records every call).
//!
//! Timings are short and named below; everything that can be observed is polled with a
//! deadline (`sluice::conformance::poll_until`), never waited for with a fixed sleep. The
//! breaker tests also sample counters every `conformance::POLL` over a window, to show that
//! something does *not* happen during it.
//!
//! Run with `cargo nextest run -p sluice-tests -E 'test(/^pipeline::/)'`.

use std::{
    collections::BTreeMap,
    path::Path,
    sync::{atomic::Ordering, Arc, Mutex, Once},
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};
use sluice::{
    conformance::{poll_until, unique},
    message::QueueStats,
    telemetry::RunSummary,
    worker::{RunOptions, Runtime},
    Context, DeadLetter, ErrorKind, FailureClass, Function, Handler, HandlerError, OutgoingMessage,
    Settings, Transport,
};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

// ---------------------------------------------------------------------------------------------
// Timing constants
// ---------------------------------------------------------------------------------------------

/// Settings shared by every test. Delayed retries are short (50 ms doubling, capped at 200 ms,
/// full jitter) so a retry test takes well under a second; immediate retries are off unless a
/// test is about them; an idle receive waits 50 ms, so a drained run notices quickly.
const BASE_TOML: &str = r#"
[transport]
lease = "2s"            # no test loses a lease by accident; the lease test shortens it
wait = "50ms"           # one idle receive
poll_interval = "10ms"  # how often an idle receive looks at the file

[retry]
immediate = 0
immediate_base = "10ms"
base = "50ms"
cap = "200ms"

[worker]
handler_timeout = "10s" # only the timeout test relies on it firing
shutdown_grace = "5s"   # only the past-the-grace test relies on it running out

[telemetry]
log_format = "pretty"
log_level = "warn"
"#;

/// Deadline of every poll: far above what any awaited event needs, so only a real hang trips it.
const WAIT: Duration = Duration::from_secs(10);

/// Deadline of a whole `run`; a run that does not finish by then is a failure, not a slow box.
const RUN_LIMIT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------
// The handler under test, its input and its probe
// ---------------------------------------------------------------------------------------------

/// What the handler does with a job.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Mode {
    /// Succeed at once.
    Ok,
    /// Fail transiently, every time.
    Transient,
    /// Fail permanently, every time.
    Permanent,
    /// Panic, every time.
    Panic,
    /// Sleep `ms`, then succeed.
    Sleep,
    /// On delivery 1 ask to come back after `ms`; succeed later.
    RetryAfter,
    /// Fail transiently while the delivery number is below `n`.
    FailUntil,
    /// Fail transiently on the very first call for this key, succeed on every later call.
    FailFirstCall,
    /// On delivery 1 sleep `ms` (ignoring cancellation); succeed later.
    SleepOnFirstDelivery,
    /// On delivery 1 wait up to `ms` for `ctx.cancelled()`, recording it; succeed later.
    WaitForCancel,
}

/// The handler's input; `key` names the job in the probe (and is the derived idempotency key
/// where a test asks for one).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Job {
    key: String,
    mode: Mode,
    #[serde(default)]
    ms: u64,
    #[serde(default)]
    n: u32,
}

impl Job {
    fn new(key: &str, mode: Mode) -> Self {
        Job {
            key: key.to_owned(),
            mode,
            ms: 0,
            n: 0,
        }
    }

    fn ms(mut self, ms: u64) -> Self {
        self.ms = ms;
        self
    }

    fn n(mut self, n: u32) -> Self {
        self.n = n;
        self
    }

    fn body(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("job serializes")
    }

    fn message(&self) -> OutgoingMessage {
        OutgoingMessage::new(self.body())
    }
}

/// The handler's output.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Out {
    key: String,
    attempt: u32,
}

/// One handler call as the probe saw it.
#[derive(Debug, Clone)]
struct Call {
    key: String,
    attempt: u32,
    idempotency_key: String,
    at: Instant,
}

/// The function's shared state: a log of what the handler saw, shared with the test.
#[derive(Clone, Default)]
struct Probe(Arc<Mutex<Log>>);

#[derive(Default)]
struct Log {
    calls: Vec<Call>,
    /// (key, when the handler returned an outcome); panics do not return.
    ends: Vec<(String, Instant)>,
    /// Keys whose handler observed `ctx.cancelled()`.
    cancelled: Vec<String>,
}

impl Probe {
    /// Records a call; returns how many calls this key had before.
    fn record_call(&self, key: &str, ctx: &Context<Probe>) -> usize {
        let mut log = self.0.lock().unwrap();
        let before = log.calls.iter().filter(|c| c.key == key).count();
        log.calls.push(Call {
            key: key.to_owned(),
            attempt: ctx.attempt(),
            idempotency_key: ctx.idempotency_key().to_owned(),
            at: Instant::now(),
        });
        before
    }

    fn record_end(&self, key: &str) {
        self.0
            .lock()
            .unwrap()
            .ends
            .push((key.to_owned(), Instant::now()));
    }

    fn record_cancelled(&self, key: &str) {
        self.0.lock().unwrap().cancelled.push(key.to_owned());
    }

    fn all_calls(&self) -> Vec<Call> {
        self.0.lock().unwrap().calls.clone()
    }

    fn calls(&self, key: &str) -> Vec<Call> {
        self.all_calls()
            .into_iter()
            .filter(|c| c.key == key)
            .collect()
    }

    fn attempts(&self, key: &str) -> Vec<u32> {
        self.calls(key).iter().map(|c| c.attempt).collect()
    }

    fn ends(&self, key: &str) -> Vec<Instant> {
        let log = self.0.lock().unwrap();
        log.ends
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, t)| *t)
            .collect()
    }

    fn cancelled(&self) -> Vec<String> {
        self.0.lock().unwrap().cancelled.clone()
    }
}

/// The handler every test runs: a plain `async fn`, as function authors write them.
async fn handler(job: Job, ctx: &Context<Probe>) -> Result<Out, HandlerError> {
    let probe = ctx.state();
    let earlier_calls = probe.record_call(&job.key, ctx);
    let first_delivery = ctx.attempt() == 1;
    let outcome = match job.mode {
        Mode::Ok => Ok(()),
        Mode::Transient => Err(HandlerError::transient(format!("{} is down", job.key))),
        Mode::Permanent => Err(HandlerError::permanent(format!(
            "{} rejected: no such customer",
            job.key
        ))),
        Mode::Panic => panic!("bug in the handler for {}", job.key),
        Mode::Sleep => {
            tokio::time::sleep(Duration::from_millis(job.ms)).await;
            Ok(())
        }
        Mode::RetryAfter if first_delivery => Err(HandlerError::retry_after(
            Duration::from_millis(job.ms),
            "downstream says 429",
        )),
        Mode::FailUntil if ctx.attempt() < job.n => Err(HandlerError::transient(format!(
            "{} not ready on attempt {}",
            job.key,
            ctx.attempt()
        ))),
        Mode::FailFirstCall if earlier_calls == 0 => Err(HandlerError::transient("a short blip")),
        Mode::SleepOnFirstDelivery if first_delivery => {
            tokio::time::sleep(Duration::from_millis(job.ms)).await;
            Ok(())
        }
        Mode::WaitForCancel if first_delivery => {
            tokio::select! {
                _ = ctx.cancelled() => {
                    probe.record_cancelled(&job.key);
                    Err(HandlerError::transient("cancelled"))
                }
                _ = tokio::time::sleep(Duration::from_millis(job.ms)) => Ok(()),
            }
        }
        Mode::RetryAfter
        | Mode::FailUntil
        | Mode::FailFirstCall
        | Mode::SleepOnFirstDelivery
        | Mode::WaitForCancel => Ok(()),
    };
    probe.record_end(&job.key);
    outcome.map(|()| Out {
        key: job.key,
        attempt: ctx.attempt(),
    })
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// A temporary directory holding one test's queue and store files.
struct Sandbox {
    dir: tempfile::TempDir,
}

impl Sandbox {
    fn new() -> Self {
        Sandbox {
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// [`BASE_TOML`], pointed at this sandbox with a fresh queue name, plus `extra`
    /// `key=value` overrides (as `--set` takes them).
    fn settings(&self, extra: &[&str]) -> Settings {
        let mut overrides = vec![
            format!("queue={}", unique("pipeline")),
            format!("transport.url={}", self.path().join("queue.db").display()),
            format!("store.url={}", self.path().join("idempotency.db").display()),
        ];
        overrides.extend(extra.iter().map(|s| s.to_string()));
        let settings = Settings::load(
            "pipeline-test",
            Some(BASE_TOML),
            std::iter::empty(),
            &overrides,
        )
        .expect("test settings are valid");
        init_logs(&settings);
        settings
    }
}

/// Logs at the configured level (or `RUST_LOG`) to stderr, which the test runner captures and
/// shows for failing tests.
fn init_logs(settings: &Settings) {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        sluice::telemetry::init_logging(&settings.telemetry, "pipeline-test");
        // init_logging routes panics to a log event; test assertion failures should keep the
        // default report.
        drop(std::panic::take_hook());
    });
}

/// The function under test, its state the given probe. Tests add `.idempotency_key(...)` or
/// `.schema_versions(...)` before building.
fn function(probe: &Probe) -> Function<Job, Probe, impl for<'a> Handler<'a, Job, Probe>> {
    let probe = probe.clone();
    Function::new("pipeline-test", handler).state(move |_settings| async move { Ok(probe) })
}

async fn build<H>(f: Function<Job, Probe, H>, settings: Settings) -> Arc<Runtime>
where
    H: for<'a> Handler<'a, Job, Probe>,
{
    Arc::new(f.build(settings).await.expect("runtime builds"))
}

async fn publish(rt: &Runtime, msgs: Vec<OutgoingMessage>) -> Vec<String> {
    rt.transport().publish(msgs).await.expect("publish")
}

/// Runs with `--drain` until the queue is empty; fails the test after [`RUN_LIMIT`].
async fn drain(rt: &Arc<Runtime>) -> RunSummary {
    tokio::time::timeout(
        RUN_LIMIT,
        rt.run(RunOptions { drain: true }, CancellationToken::new()),
    )
    .await
    .expect("the run drained the queue in time")
    .expect("the run succeeded")
}

/// Starts `run` in the background.
fn spawn_run(
    rt: &Arc<Runtime>,
    drain: bool,
    shutdown: CancellationToken,
) -> JoinHandle<sluice::Result<RunSummary>> {
    let rt = rt.clone();
    tokio::spawn(async move { rt.run(RunOptions { drain }, shutdown).await })
}

/// Awaits a background run; fails the test after [`RUN_LIMIT`].
async fn finish(run: JoinHandle<sluice::Result<RunSummary>>) -> RunSummary {
    tokio::time::timeout(RUN_LIMIT, run)
        .await
        .expect("the run returned in time")
        .expect("the run task did not panic")
        .expect("the run succeeded")
}

async fn stats(rt: &Runtime) -> QueueStats {
    rt.transport().stats().await.expect("stats")
}

async fn dead_letter(rt: &Runtime, id: &str) -> DeadLetter {
    rt.transport()
        .dlq_get(id)
        .await
        .expect("dlq_get")
        .unwrap_or_else(|| panic!("message {id} is on the dead-letter queue"))
}

async fn assert_dlq_empty(rt: &Runtime) {
    let dlq = rt.transport().dlq_list(100).await.expect("dlq_list");
    assert!(dlq.is_empty(), "nothing dead-lettered, got {dlq:#?}");
}

/// Deliveries the runtime has taken from the queue so far (its intake).
fn received(rt: &Runtime) -> u64 {
    rt.metrics.received.load(Ordering::Relaxed)
}

fn reasons(pairs: &[(&str, u64)]) -> BTreeMap<String, u64> {
    pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
}

// ---------------------------------------------------------------------------------------------
// Outcomes: success, retries, dead letters
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn success_acks_the_message_and_the_queue_ends_empty() {
    let sb = Sandbox::new();
    let probe = Probe::default();
    let rt = build(function(&probe), sb.settings(&[])).await;
    let ids = publish(&rt, vec![Job::new("a", Mode::Ok).message()]).await;

    let summary = drain(&rt).await;

    assert_eq!(summary.received, 1);
    assert_eq!(summary.succeeded, 1);
    assert_eq!(summary.retried + summary.dead_lettered, 0);
    let calls = probe.calls("a");
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].attempt, 1);
    // No header and no derived key: the message id is the idempotency key.
    assert_eq!(calls[0].idempotency_key, ids[0]);
    assert_eq!(stats(&rt).await, QueueStats::default());
    assert_dlq_empty(&rt).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_failure_is_retried_with_backoff_and_succeeds_on_a_later_delivery() {
    let sb = Sandbox::new();
    let probe = Probe::default();
    let rt = build(function(&probe), sb.settings(&[])).await;
    publish(&rt, vec![Job::new("t", Mode::FailUntil).n(3).message()]).await;

    let summary = drain(&rt).await;

    assert_eq!(probe.attempts("t"), vec![1, 2, 3]);
    assert_eq!(summary.retried, 2);
    assert_eq!(summary.succeeded, 1);
    assert_eq!(summary.dead_lettered, 0);
    assert!(stats(&rt).await.is_drained());
    assert_dlq_empty(&rt).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_failures_are_dead_lettered_once_max_deliveries_is_used_up() {
    let sb = Sandbox::new();
    let probe = Probe::default();
    let rt = build(function(&probe), sb.settings(&["retry.max_deliveries=3"])).await;
    let job = Job::new("down", Mode::Transient);
    let ids = publish(&rt, vec![job.message()]).await;

    let summary = drain(&rt).await;

    assert_eq!(probe.attempts("down"), vec![1, 2, 3]);
    assert_eq!(summary.retried, 2);
    assert_eq!(summary.dead_lettered, 1);
    assert_eq!(
        summary.dead_letter_reasons,
        reasons(&[("retries exhausted", 1)])
    );
    let dl = dead_letter(&rt, &ids[0]).await;
    assert_eq!(dl.error_class, FailureClass::Transient);
    assert_eq!(dl.attempts, 3);
    assert!(
        dl.last_error.contains("gave up after 3") && dl.last_error.contains("down is down"),
        "{}",
        dl.last_error
    );
    assert_eq!(dl.raw_body, job.body());
    assert_eq!(dl.function, "pipeline-test");
    assert!(dl.first_failure_at <= dl.last_failure_at);
    let s = stats(&rt).await;
    assert!(s.is_drained());
    assert_eq!(s.dead_lettered, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_error_is_dead_lettered_at_once_with_the_handlers_message() {
    let sb = Sandbox::new();
    let probe = Probe::default();
    let rt = build(function(&probe), sb.settings(&[])).await;
    let job = Job::new("c-1", Mode::Permanent);
    let ids = publish(&rt, vec![job.message()]).await;

    let summary = drain(&rt).await;

    assert_eq!(probe.attempts("c-1"), vec![1]);
    assert_eq!(summary.retried, 0);
    assert_eq!(summary.dead_lettered, 1);
    let dl = dead_letter(&rt, &ids[0]).await;
    assert_eq!(dl.error_class, FailureClass::Permanent);
    assert_eq!(dl.attempts, 1);
    assert_eq!(dl.last_error, "c-1 rejected: no such customer");
    assert_eq!(dl.raw_body, job.body());
    assert!(stats(&rt).await.is_drained());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn panicking_handler_is_caught_counted_and_dead_lettered_as_transient_while_others_succeed() {
    let sb = Sandbox::new();
    let probe = Probe::default();
    let rt = build(function(&probe), sb.settings(&["retry.max_deliveries=2"])).await;
    let ids = publish(
        &rt,
        vec![
            Job::new("boom", Mode::Panic).message(),
            Job::new("ok-1", Mode::Ok).message(),
            Job::new("ok-2", Mode::Ok).message(),
        ],
    )
    .await;

    let summary = drain(&rt).await;

    assert_eq!(summary.panics, 2, "one panic per delivery");
    assert_eq!(probe.attempts("boom"), vec![1, 2]);
    assert_eq!(summary.retried, 1);
    assert_eq!(summary.succeeded, 2);
    assert_eq!(probe.attempts("ok-1"), vec![1]);
    assert_eq!(probe.attempts("ok-2"), vec![1]);
    let dl = dead_letter(&rt, &ids[0]).await;
    assert_eq!(dl.error_class, FailureClass::Transient);
    assert_eq!(dl.attempts, 2);
    assert!(
        dl.last_error.contains("handler panicked")
            && dl.last_error.contains("bug in the handler for boom"),
        "{}",
        dl.last_error
    );
    assert!(stats(&rt).await.is_drained());
}

// ---------------------------------------------------------------------------------------------
// Bad input never stops a worker
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_dead_lettered_with_its_bytes_and_a_reason_and_the_worker_goes_on() {
    let sb = Sandbox::new();
    let probe = Probe::default();
    let settings = sb.settings(&[
        // One at a time, in publish order: the good message comes after all the bad ones.
        "worker.concurrency=1",
        "limits.max_body_bytes=200",
        "limits.max_headers=4",
        "limits.require_idempotency_key=true",
    ]);
    // No derived key, so the idempotency-key header is required.
    let rt = build(function(&probe).schema_versions(&["1", "2"]), settings).await;

    let good = Job::new("good", Mode::Ok);
    let keyed = |body: Vec<u8>| OutgoingMessage::new(body).header("idempotency-key", unique("k"));
    // (what, message, a part of the reason)
    let bad: Vec<(&str, OutgoingMessage, &str)> = vec![
        (
            "not JSON",
            keyed(b"{\"key\": \"a\", mode".to_vec()),
            "body is not JSON",
        ),
        (
            "invalid UTF-8",
            keyed(vec![b'{', 0xff, 0xfe, b'}']),
            "body is not UTF-8",
        ),
        (
            "JSON missing a field",
            keyed(br#"{"key": "no-mode"}"#.to_vec()),
            "missing field `mode`",
        ),
        (
            "oversized body",
            keyed(Job::new(&"x".repeat(300), Mode::Ok).body()),
            "limit 200 (limits.max_body_bytes)",
        ),
        (
            "forged attempts header",
            keyed(good.body()).header("sluice-attempts", "1"),
            "\"sluice-attempts\" is reserved",
        ),
        (
            "unknown header",
            keyed(good.body()).header("priority", "high"),
            "\"priority\" is not known",
        ),
        (
            "too many headers",
            keyed(good.body())
                .header("x-a", "1")
                .header("x-b", "2")
                .header("x-c", "3")
                .header("x-d", "4"),
            "5 headers, limit 4",
        ),
        (
            "unsupported schema version",
            keyed(good.body()).header("schema-version", "3"),
            "schema-version \"3\" is not accepted",
        ),
        (
            "missing idempotency key",
            OutgoingMessage::new(good.body()),
            "idempotency-key header is required",
        ),
    ];
    let mut msgs: Vec<OutgoingMessage> = bad.iter().map(|(_, m, _)| m.clone()).collect();
    msgs.push(keyed(good.body()).header("schema-version", "2"));
    let ids = publish(&rt, msgs).await;

    let summary = drain(&rt).await;

    for ((what, msg, reason), id) in bad.iter().zip(&ids) {
        let dl = dead_letter(&rt, id).await;
        assert_eq!(dl.error_class, FailureClass::Permanent, "{what}");
        assert_eq!(dl.attempts, 1, "{what}");
        assert!(
            dl.last_error.contains(reason),
            "{what}: reason {:?} should contain {reason:?}",
            dl.last_error
        );
        assert_eq!(dl.raw_body, msg.body, "{what}: bytes kept intact");
        assert_eq!(dl.headers, msg.headers, "{what}: headers kept");
    }
    let utf8 = dead_letter(&rt, &ids[1]).await;
    assert_eq!(utf8.body, None);
    assert_eq!(utf8.body_hex.as_deref(), Some("7bfffe7d"));

    // The worker went on: the good message, last in line, succeeded.
    assert_eq!(probe.attempts("good"), vec![1]);
    assert_eq!(
        probe.all_calls().len(),
        1,
        "no bad message reached the handler"
    );
    assert_eq!(summary.succeeded, 1);
    assert_eq!(summary.dead_lettered, bad.len() as u64);
    assert_eq!(summary.retried, 0);
    assert_eq!(
        summary.dead_letter_reasons,
        reasons(&[
            ("forged header", 1),
            ("invalid UTF-8", 1),
            ("invalid input", 1),
            ("malformed JSON", 1),
            ("missing idempotency key", 1),
            ("oversized body", 1),
            ("too many headers", 1),
            ("unknown header", 1),
            ("unsupported schema version", 1),
        ])
    );
    let s = stats(&rt).await;
    assert!(s.is_drained());
    assert_eq!(s.dead_lettered, bad.len() as u64);
}

// ---------------------------------------------------------------------------------------------
// Idempotency
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_published_after_completion_is_acked_without_running_the_handler() {
    let sb = Sandbox::new();
    let probe = Probe::default();
    let rt = build(
        function(&probe).idempotency_key(|j: &Job| format!("order-{}", j.key)),
        sb.settings(&[]),
    )
    .await;
    let job = Job::new("42", Mode::Ok);

    publish(&rt, vec![job.message()]).await;
    let first = drain(&rt).await;
    assert_eq!(first.succeeded, 1);

    publish(&rt, vec![job.message()]).await;
    // The summary counts everything this runtime did, so the second one includes the first.
    let summary = drain(&rt).await;

    let calls = probe.calls("42");
    assert_eq!(calls.len(), 1, "the handler ran once: {calls:?}");
    assert_eq!(
        calls[0].idempotency_key, "order-42",
        "the derived key is used"
    );
    assert_eq!(summary.received, 2);
    assert_eq!(summary.succeeded, 1);
    assert_eq!(summary.duplicates_skipped, 1);
    assert_eq!(summary.retried + summary.dead_lettered, 0);
    assert!(stats(&rt).await.is_drained());
    assert_dlq_empty(&rt).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_duplicates_wait_for_the_first_delivery_without_using_up_deliveries() {
    let sb = Sandbox::new();
    let probe = Probe::default();
    // Three slots: the copies are received together and two find the key in progress. One
    // delivery each: a wait for the key that used up a delivery would dead-letter them.
    let rt = build(
        function(&probe).idempotency_key(|j: &Job| format!("order-{}", j.key)),
        sb.settings(&["worker.concurrency=3", "retry.max_deliveries=1"]),
    )
    .await;
    let job = Job::new("7", Mode::Sleep).ms(300);
    publish(&rt, vec![job.message(), job.message(), job.message()]).await;

    let summary = drain(&rt).await;

    assert_eq!(probe.calls("7").len(), 1, "the handler ran once");
    assert_eq!(summary.succeeded, 1);
    assert_eq!(
        summary.duplicates_skipped, 2,
        "both copies waited for the key and were absorbed: {summary:?}"
    );
    assert_eq!(
        summary.retried, 0,
        "no delivery was spent waiting: {summary:?}"
    );
    assert_eq!(summary.dead_lettered, 0, "{summary:?}");
    assert!(stats(&rt).await.is_drained());
    assert_dlq_empty(&rt).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_of_a_long_running_delivery_comes_back_when_its_claim_runs_out() {
    let sb = Sandbox::new();
    let probe = Probe::default();
    // The original runs longer than a duplicate may wait in its slot (100 ms): the duplicate
    // goes back to the broker until the original's claim would end (the lease, 1 s, kept
    // alive by the original), not on the 50-200 ms backoff that would use up its four
    // deliveries while the original is still running.
    let rt = build(
        function(&probe).idempotency_key(|j: &Job| format!("order-{}", j.key)),
        sb.settings(&[
            "worker.concurrency=2",
            "retry.max_deliveries=4",
            "retry.max_in_slot_wait=100ms",
            "transport.lease=1s",
        ]),
    )
    .await;
    let job = Job::new("8", Mode::Sleep).ms(1200);
    publish(&rt, vec![job.message(), job.message()]).await;

    let summary = drain(&rt).await;

    assert_eq!(probe.calls("8").len(), 1, "the handler ran once");
    assert_eq!(summary.succeeded, 1);
    assert_eq!(summary.duplicates_skipped, 1, "{summary:?}");
    assert!(
        (1..=2).contains(&summary.retried),
        "the duplicate came back once per claim lease, not per backoff step: {summary:?}"
    );
    assert_eq!(summary.dead_lettered, 0, "{summary:?}");
    assert!(stats(&rt).await.is_drained());
    assert_dlq_empty(&rt).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_key_header_wins_over_the_derived_key() {
    let sb = Sandbox::new();
    let probe = Probe::default();
    let rt = build(
        function(&probe).idempotency_key(|j: &Job| format!("order-{}", j.key)),
        sb.settings(&[]),
    )
    .await;
    publish(
        &rt,
        vec![Job::new("9", Mode::Ok)
            .message()
            .header("idempotency-key", "from-producer")],
    )
    .await;

    drain(&rt).await;

    assert_eq!(probe.calls("9")[0].idempotency_key, "from-producer");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_key_with_a_different_payload_is_dead_lettered_as_permanent() {
    let sb = Sandbox::new();
    let probe = Probe::default();
    let rt = build(
        function(&probe).idempotency_key(|j: &Job| j.key.clone()),
        sb.settings(&["worker.concurrency=1"]),
    )
    .await;
    let first = Job::new("k", Mode::Ok);
    let other = Job::new("k", Mode::Ok).ms(1); // same key, another payload
    let ids = publish(&rt, vec![first.message(), other.message()]).await;

    let summary = drain(&rt).await;

    assert_eq!(probe.calls("k").len(), 1, "only the first payload ran");
    assert_eq!(summary.succeeded, 1);
    assert_eq!(summary.dead_lettered, 1);
    let dl = dead_letter(&rt, &ids[1]).await;
    assert_eq!(dl.error_class, FailureClass::Permanent);
    assert_eq!(dl.attempts, 1);
    assert!(
        dl.last_error
            .contains("already used with a different payload"),
        "{}",
        dl.last_error
    );
    assert_eq!(dl.raw_body, other.body());
}

// ---------------------------------------------------------------------------------------------
// Retry placement: in the slot or on the broker
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn immediate_retry_absorbs_a_short_blip_inside_one_delivery() {
    let sb = Sandbox::new();
    let probe = Probe::default();
    let rt = build(
        function(&probe),
        sb.settings(&["retry.immediate=2", "retry.immediate_base=10ms"]),
    )
    .await;
    publish(&rt, vec![Job::new("blip", Mode::FailFirstCall).message()]).await;

    let summary = drain(&rt).await;

    assert_eq!(
        probe.attempts("blip"),
        vec![1, 1],
        "two calls, both in delivery 1"
    );
    assert_eq!(summary.immediate_retries, 1);
    assert_eq!(summary.retried, 0);
    assert_eq!(summary.received, 1);
    assert_eq!(summary.succeeded, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_longer_than_max_in_slot_wait_goes_back_to_the_broker_and_frees_the_slot() {
    const RETRY_AFTER: Duration = Duration::from_millis(1500);
    let sb = Sandbox::new();
    let probe = Probe::default();
    let settings = sb.settings(&[
        // One slot: B can only run if A gave its slot back.
        "worker.concurrency=1",
        // Immediate retries are on, so only the length of the wait sends A to the broker.
        "retry.immediate=2",
        "retry.max_in_slot_wait=500ms",
    ]);
    let rt = build(function(&probe), settings).await;
    publish(
        &rt,
        vec![
            Job::new("a", Mode::RetryAfter)
                .ms(RETRY_AFTER.as_millis() as u64)
                .message(),
            Job::new("b", Mode::Ok).message(),
        ],
    )
    .await;
    let run = spawn_run(&rt, true, CancellationToken::new());

    // B completes while A sits delayed on the broker.
    poll_until(WAIT, "b done while a is delayed", || async {
        let b_done = !probe.ends("b").is_empty();
        (b_done && probe.calls("a").len() == 1 && stats(&rt).await.delayed == 1).then_some(())
    })
    .await;
    let summary = finish(run).await;

    let a = probe.calls("a");
    assert_eq!(a.iter().map(|c| c.attempt).collect::<Vec<_>>(), vec![1, 2]);
    let gap = a[1].at - a[0].at;
    // The broker stores whole milliseconds; allow for that rounding only.
    assert!(
        gap >= RETRY_AFTER - Duration::from_millis(5),
        "a came back after {gap:?}, before its Retry-After"
    );
    assert!(probe.ends("b")[0] < a[1].at);
    assert_eq!(summary.immediate_retries, 0, "the slot was not held");
    assert_eq!(summary.retried, 1);
    assert_eq!(summary.succeeded, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handler_timeout_counts_as_transient_and_the_message_is_retried() {
    const SLOW: Duration = Duration::from_secs(2);
    let sb = Sandbox::new();
    let probe = Probe::default();
    let rt = build(
        function(&probe),
        sb.settings(&["worker.handler_timeout=100ms"]),
    )
    .await;
    publish(
        &rt,
        vec![Job::new("slow", Mode::SleepOnFirstDelivery)
            .ms(SLOW.as_millis() as u64)
            .message()],
    )
    .await;

    let summary = drain(&rt).await;

    let calls = probe.calls("slow");
    assert_eq!(
        calls.iter().map(|c| c.attempt).collect::<Vec<_>>(),
        vec![1, 2]
    );
    assert!(
        calls[1].at - calls[0].at < SLOW,
        "the timeout cut delivery 1 short"
    );
    assert_eq!(probe.ends("slow").len(), 1, "delivery 1 never returned");
    assert_eq!(summary.retried, 1);
    assert_eq!(summary.succeeded, 1);
    assert_eq!(summary.dead_lettered, 0);
}

// ---------------------------------------------------------------------------------------------
// Leases
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handler_slower_than_the_lease_keeps_it_by_extension_and_runs_once_across_two_workers() {
    let sb = Sandbox::new();
    let probe = Probe::default();
    // The handler takes four leases' worth of time; unextended, the message would be
    // redelivered to the other worker after 300 ms.
    let settings = sb.settings(&["transport.lease=300ms"]);
    let rt1 = build(function(&probe), settings.clone()).await;
    let rt2 = build(function(&probe), settings).await;
    publish(&rt1, vec![Job::new("long", Mode::Sleep).ms(1200).message()]).await;

    let (s1, s2) = tokio::join!(drain(&rt1), drain(&rt2));

    assert_eq!(probe.attempts("long"), vec![1], "one call, one delivery");
    assert_eq!(s1.received + s2.received, 1, "never redelivered");
    assert_eq!(s1.succeeded + s2.succeeded, 1);
    assert!(stats(&rt1).await.is_drained());
    assert_dlq_empty(&rt1).await;
}

// ---------------------------------------------------------------------------------------------
// Circuit breaker and rate limit
// ---------------------------------------------------------------------------------------------

/// Breaker settings for the two breaker tests: two transient failures open it for a second.
const BREAKER_OPEN_FOR: Duration = Duration::from_secs(1);

/// Publishes two jobs that fail on their first delivery (they open the breaker) and three
/// that succeed, starts a one-slot run, and returns when the breaker has just opened, with the
/// instant the second failure returned (the breaker opens right after that).
async fn open_the_breaker(
    rt: &Arc<Runtime>,
    probe: &Probe,
) -> (JoinHandle<sluice::Result<RunSummary>>, Instant) {
    publish(
        rt,
        vec![
            Job::new("f1", Mode::FailUntil).n(2).message(),
            Job::new("f2", Mode::FailUntil).n(2).message(),
            Job::new("o1", Mode::Ok).message(),
            Job::new("o2", Mode::Ok).message(),
            Job::new("o3", Mode::Ok).message(),
        ],
    )
    .await;
    let run = spawn_run(rt, true, CancellationToken::new());
    let opened = poll_until(WAIT, "the second failure", || async {
        probe.ends("f2").first().copied()
    })
    .await;
    assert_eq!(
        probe.all_calls().len(),
        2,
        "f1 then f2 ran first (publish order)"
    );
    (run, opened)
}

fn breaker_settings(sb: &Sandbox) -> Settings {
    sb.settings(&[
        "worker.concurrency=1",
        "breaker.failures=2",
        &format!("breaker.open_for={}ms", BREAKER_OPEN_FOR.as_millis()),
        "retry.max_deliveries=10",
    ])
}

/// What this proves: after `breaker.failures` transient failures no handler runs for
/// `breaker.open_for` (sampled every 20 ms over the whole open period), intake stays paused
/// (see also the next test, which checks that not a single further message is leased), and intake resumes once `open_for` has passed:
/// the next handler call (the half-open probe) starts no earlier than `open_for` after the
/// breaker opened, and everything then succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn breaker_opens_after_transient_failures_pauses_intake_and_resumes_after_open_for() {
    let sb = Sandbox::new();
    let probe = Probe::default();
    let rt = build(function(&probe), breaker_settings(&sb)).await;
    let (run, opened) = open_the_breaker(&rt, &probe).await;

    let mut most_received = 0;
    while Instant::now() < opened + BREAKER_OPEN_FOR - Duration::from_millis(100) {
        assert_eq!(
            probe.all_calls().len(),
            2,
            "no handler ran while the breaker was open"
        );
        most_received = most_received.max(received(&rt));
        tokio::time::sleep(sluice::conformance::POLL).await;
    }
    assert!(
        most_received <= 3,
        "intake paused: at most one message taken after opening, got {most_received}"
    );

    let third = poll_until(WAIT, "the probe after open_for", || async {
        probe.all_calls().get(2).cloned()
    })
    .await;
    assert!(
        third.at >= opened + BREAKER_OPEN_FOR,
        "the probe ran {:?} after the breaker opened",
        third.at - opened
    );
    let summary = finish(run).await;
    assert!(
        summary.received > most_received,
        "intake resumed after open_for"
    );
    assert_eq!(summary.succeeded, 5);
    assert_eq!(summary.retried, 2);
    assert_eq!(summary.dead_lettered, 0);
}

/// "While open the intake loop takes nothing": the slot freed by the failure that opens the
/// breaker must not be used to lease one more message (the loop asks the breaker only once it
/// holds a free slot).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]

async fn breaker_that_has_opened_leases_no_further_message_until_open_for_has_passed() {
    let sb = Sandbox::new();
    let probe = Probe::default();
    let rt = build(function(&probe), breaker_settings(&sb)).await;
    let (run, opened) = open_the_breaker(&rt, &probe).await;

    while Instant::now() < opened + BREAKER_OPEN_FOR - Duration::from_millis(100) {
        assert_eq!(
            received(&rt),
            2,
            "no message received while the breaker is open"
        );
        assert_eq!(
            stats(&rt).await.in_flight,
            0,
            "no message leased while open"
        );
        tokio::time::sleep(sluice::conformance::POLL).await;
    }
    finish(run).await;
}

/// "Half-open takes one probe message": while the probe runs, the intake loop takes nothing
/// more, even with free slots; other messages stay in the queue until the probe settles.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]

async fn half_open_breaker_leases_only_the_probe_until_it_settles() {
    /// Later messages become visible this long after publishing: after any receive that was
    /// under way when the breaker opened has ended (transport.wait, 50 ms), before open_for.
    const HIDDEN_FOR: Duration = Duration::from_millis(300);
    let sb = Sandbox::new();
    let probe = Probe::default();
    let settings = sb.settings(&[
        "worker.concurrency=4",
        "breaker.failures=1",
        "breaker.open_for=800ms",
        // The failure is dead-lettered at once, so no retry of it competes with the probe.
        "retry.max_deliveries=1",
    ]);
    let rt = build(function(&probe), settings).await;
    publish(&rt, vec![Job::new("f", Mode::Transient).message()]).await;
    let shutdown = CancellationToken::new();
    let run = spawn_run(&rt, false, shutdown.clone());
    poll_until(WAIT, "the failure that opens the breaker", || async {
        (stats(&rt).await.dead_lettered == 1).then_some(())
    })
    .await;

    let later = [
        Job::new("p", Mode::Sleep).ms(800),
        Job::new("o1", Mode::Ok),
        Job::new("o2", Mode::Ok),
        Job::new("o3", Mode::Ok),
    ];
    let msgs = later
        .iter()
        .map(|j| OutgoingMessage {
            delay: HIDDEN_FOR,
            ..j.message()
        })
        .collect();
    publish(&rt, msgs).await;
    poll_until(WAIT, "the probe started", || async {
        (!probe.calls("p").is_empty()).then_some(())
    })
    .await;
    while probe.ends("p").is_empty() {
        assert_eq!(received(&rt), 2, "only f and the probe were taken");
        assert_eq!(stats(&rt).await.in_flight, 1, "only the probe is leased");
        tokio::time::sleep(sluice::conformance::POLL).await;
    }
    shutdown.cancel();
    finish(run).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_spaces_handler_calls() {
    let sb = Sandbox::new();
    let probe = Probe::default();
    let rt = build(
        function(&probe),
        sb.settings(&["rate_limit.per_second=20", "rate_limit.burst=1"]),
    )
    .await;
    let jobs = (0..10)
        .map(|i| Job::new(&format!("r{i}"), Mode::Ok).message())
        .collect();
    publish(&rt, jobs).await;

    let summary = drain(&rt).await;

    assert_eq!(summary.succeeded, 10);
    let mut times: Vec<Instant> = probe.all_calls().iter().map(|c| c.at).collect();
    times.sort();
    let span = *times.last().unwrap() - times[0];
    // 10 calls at 20/s with a burst of 1: nine 50 ms gaps, 450 ms; a lower bound, not a speed
    // benchmark.
    assert!(
        span >= Duration::from_millis(400),
        "10 calls spread over only {span:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Shutdown and drain
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_lets_in_flight_handlers_finish_within_the_grace() {
    let sb = Sandbox::new();
    let probe = Probe::default();
    let rt = build(function(&probe), sb.settings(&["worker.shutdown_grace=5s"])).await;
    publish(&rt, vec![Job::new("busy", Mode::Sleep).ms(300).message()]).await;
    let shutdown = CancellationToken::new();
    let run = spawn_run(&rt, false, shutdown.clone());

    poll_until(WAIT, "the handler started", || async {
        (!probe.calls("busy").is_empty()).then_some(())
    })
    .await;
    shutdown.cancel();
    let summary = finish(run).await;

    assert_eq!(probe.ends("busy").len(), 1, "the handler finished");
    assert!(probe.cancelled().is_empty(), "it was not cancelled");
    assert_eq!(summary.succeeded, 1);
    assert_eq!(summary.released, 0);
    assert!(stats(&rt).await.is_drained(), "acked, not put back");
    assert_dlq_empty(&rt).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_past_the_grace_cancels_the_handler_and_returns_its_message_to_the_queue() {
    let sb = Sandbox::new();
    let probe = Probe::default();
    let settings = sb.settings(&[
        "worker.shutdown_grace=200ms",
        // A lease far longer than the test: had the idempotency record not been released,
        // the next run would find the key in progress and retry instead of running it.
        "transport.lease=20s",
    ]);
    let rt = build(function(&probe), settings).await;
    publish(
        &rt,
        vec![Job::new("stuck", Mode::WaitForCancel).ms(60_000).message()],
    )
    .await;
    let shutdown = CancellationToken::new();
    let run = spawn_run(&rt, false, shutdown.clone());

    poll_until(WAIT, "the handler started", || async {
        (!probe.calls("stuck").is_empty()).then_some(())
    })
    .await;
    let cancelled_at = Instant::now();
    shutdown.cancel();
    let summary = finish(run).await;

    assert!(
        cancelled_at.elapsed() < Duration::from_secs(5),
        "returned soon after the grace"
    );
    assert_eq!(probe.cancelled(), vec!["stuck".to_owned()]);
    assert_eq!(summary.released, 1);
    assert_eq!(
        summary.succeeded + summary.retried + summary.dead_lettered,
        0
    );
    let s = stats(&rt).await;
    assert_eq!(s.ready, 1, "the message is back, not lost: {s:?}");
    assert_eq!(s.dead_lettered, 0);

    // The next worker runs it (delivery 2) without waiting for a stale claim.
    let summary = drain(&rt).await;
    assert_eq!(probe.attempts("stuck"), vec![1, 2]);
    assert_eq!(summary.succeeded, 1);
    assert_eq!(summary.retried, 0, "the idempotency record was released");
    assert!(stats(&rt).await.is_drained());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_run_exits_when_the_queue_is_empty_even_if_nothing_was_ever_sent() {
    let sb = Sandbox::new();
    let probe = Probe::default();
    let rt = build(function(&probe), sb.settings(&[])).await;

    let summary = tokio::time::timeout(
        Duration::from_secs(5),
        rt.run(RunOptions { drain: true }, CancellationToken::new()),
    )
    .await
    .expect("a drain run on an empty queue returns")
    .expect("the run succeeded");

    assert_eq!(summary.received, 0);
    assert!(probe.all_calls().is_empty());
}

// ---------------------------------------------------------------------------------------------
// invoke
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invoke_runs_the_handler_once_without_a_queue_and_returns_its_output_or_error_class() {
    let sb = Sandbox::new();
    let probe = Probe::default();
    let rt = build(
        function(&probe).idempotency_key(|j: &Job| format!("inv-{}", j.key)),
        sb.settings(&[]),
    )
    .await;

    let out = rt
        .invoke(&Job::new("i1", Mode::Ok).body())
        .await
        .expect("ok job succeeds");
    let out: Out = serde_json::from_slice(&out).expect("output is the handler's JSON");
    assert_eq!(
        out,
        Out {
            key: "i1".into(),
            attempt: 1
        }
    );
    let calls = probe.calls("i1");
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].idempotency_key, "inv-i1");

    let err = rt
        .invoke(&Job::new("i2", Mode::Permanent).body())
        .await
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::Permanent);
    assert_eq!(err.message, "i2 rejected: no such customer");

    let err = rt
        .invoke(&Job::new("i3", Mode::Transient).body())
        .await
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::Transient);
    assert_eq!(probe.calls("i3").len(), 1, "no retries (retry.immediate=0)");

    let err = rt
        .invoke(&Job::new("i4", Mode::RetryAfter).ms(700).body())
        .await
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::RetryAfter(Duration::from_millis(700)));

    let err = rt.invoke(b"not json").await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::Permanent);
    assert!(err.message.contains("not JSON"), "{}", err.message);

    assert_eq!(
        probe.all_calls().len(),
        4,
        "bad input never reached the handler"
    );
    assert_eq!(
        stats(&rt).await,
        QueueStats::default(),
        "the queue was not touched"
    );
}
