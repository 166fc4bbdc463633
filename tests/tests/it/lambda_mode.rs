//! Lambda mode, black box: the real `charge-payment` binary, built with
//! `--no-default-features --features lambda`, started with `AWS_LAMBDA_RUNTIME_API` pointing at
//! a Runtime API stub in this test, and fed SQS events built from messages received from moto
//! (so receipt handles, receive counts and attributes are real). Retries and dead letters go to
//! moto's queues, where the test reads them back.
//!
//! Needs moto (`eval "$(scripts/moto.sh start)"`) and the Lambda build
//! (`cargo build -p charge-payment --no-default-features --features lambda --target
//! x86_64-unknown-linux-gnu`); `just test` does both.

use std::{
    path::Path,
    process::Child,
    time::{Duration, Instant},
};

use serde_json::Value;
use sluice::{
    conformance::unique,
    message::FailureClass,
    transport::{
        sqs::{
            aws_sdk_sqs::{
                self,
                types::{Message, MessageSystemAttributeName, QueueAttributeName},
            },
            SqsTransport,
        },
        Transport, TransportOptions,
    },
};
use sluice_tests::{
    charge_body,
    lambda::{lambda_binary, queue_arn, spawn_lambda, sqs_event, Outcome, RuntimeApi},
    ledger_counts,
};

use crate::support::sqs_client;

const FUNCTION: &str = "charge-payment";
/// The invocation's time: the deadline the stub gives each event.
const BUDGET: Duration = Duration::from_secs(30);
/// Retry delay envelope used by the retry tests (full jitter draws below it; SQS rounds up).
const RETRY_BASE: &str = "3s";

/// A JSON fixture of tests/fixtures/.
fn fixture(name: &str) -> Value {
    let path = sluice_tests::fixture(name);
    serde_json::from_slice(&std::fs::read(&path).expect("read fixture")).expect("fixture JSON")
}

/// One record of the shipped SQS event fixture: the shape every test event is built from.
fn record_template() -> Value {
    fixture("sqs-event.json")["Records"][0].clone()
}

/// A queue on moto (and its DLQ, with the redrive policy), plus a raw client.
struct Queue {
    name: String,
    sqs: SqsTransport,
    client: aws_sdk_sqs::Client,
}

impl Queue {
    async fn new(prefix: &str, fifo: bool) -> Self {
        sluice_tests::moto("SQS");
        let name = if fifo {
            format!("{}.fifo", unique(prefix))
        } else {
            unique(prefix)
        };
        let sqs = SqsTransport::open(TransportOptions {
            queue: name.clone(),
            function: FUNCTION.into(),
            url: name.clone(),
            lease: Duration::from_secs(30),
            max_deliveries: 5,
            poll_interval: Duration::from_millis(100),
            // The test's own queue: created on first use.
            declare: true,
        })
        .await
        .expect("provision the queue on moto");
        let client = sqs_client().await;
        Self { name, sqs, client }
    }

    fn fifo(&self) -> bool {
        self.name.ends_with(".fifo")
    }

    async fn send(&self, body: &str, group: &str) -> String {
        let mut req = self
            .client
            .send_message()
            .queue_url(self.sqs.queue_url().await.unwrap())
            .message_body(body);
        if self.fifo() {
            req = req
                .message_group_id(group)
                .message_deduplication_id(uuid::Uuid::new_v4().simple().to_string());
        }
        req.send()
            .await
            .expect("send")
            .message_id()
            .expect("id")
            .to_owned()
    }

    /// Receives `n` messages (waiting up to `wait`), hidden for `visibility` seconds.
    async fn receive(&self, n: usize, visibility: i32, wait: Duration) -> Vec<Message> {
        let until = Instant::now() + wait;
        let mut got = Vec::new();
        while got.len() < n && Instant::now() < until {
            let left = until
                .saturating_duration_since(Instant::now())
                .as_secs()
                .clamp(1, 20);
            let out = self
                .client
                .receive_message()
                .queue_url(self.sqs.queue_url().await.unwrap())
                .max_number_of_messages((n - got.len()).min(10) as i32)
                .visibility_timeout(visibility)
                .wait_time_seconds(left as i32)
                .message_system_attribute_names(MessageSystemAttributeName::All)
                .message_attribute_names("All")
                .send()
                .await
                .expect("receive");
            got.extend(out.messages.unwrap_or_default());
        }
        got
    }

    fn event(&self, messages: &[Message]) -> Value {
        sqs_event(&record_template(), &queue_arn(&self.name), messages)
    }

    async fn delayed(&self) -> u64 {
        let attrs = self
            .client
            .get_queue_attributes()
            .queue_url(self.sqs.queue_url().await.unwrap())
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesDelayed)
            .send()
            .await
            .expect("queue attributes");
        attrs
            .attributes()
            .and_then(|a| a.get(&QueueAttributeName::ApproximateNumberOfMessagesDelayed))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }
}

/// The function binary in Lambda mode against its own Runtime API stub.
struct Lambda {
    api: RuntimeApi,
    child: Child,
}

impl Lambda {
    async fn start(queue: &Queue, dir: &Path, extra: &[(&str, &str)]) -> Self {
        let bin = lambda_binary(FUNCTION).expect("lambda build of charge-payment");
        let api = RuntimeApi::start(FUNCTION).await.expect("runtime API stub");
        let mut env: Vec<(String, String)> = vec![
            ("SLUICE__TRANSPORT__KIND".into(), "sqs".into()),
            ("SLUICE__TRANSPORT__URL".into(), queue.name.clone()),
            (
                "SLUICE__STORE__URL".into(),
                dir.join("idempotency.db").display().to_string(),
            ),
            (
                "SLUICE__APP__LEDGER".into(),
                dir.join("ledger.db").display().to_string(),
            ),
            ("SLUICE__RETRY__IMMEDIATE".into(), "0".into()),
            ("SLUICE__RETRY__BASE".into(), RETRY_BASE.into()),
            ("SLUICE__RETRY__CAP".into(), RETRY_BASE.into()),
        ];
        env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let child = spawn_lambda(&bin, api.addr, FUNCTION, &env, &dir.join("lambda.log"))
            .expect("start the function");
        api.wait_ready(Duration::from_secs(30))
            .await
            .unwrap_or_else(|e| panic!("{e}; log: {}", log(dir)));
        Self { api, child }
    }

    async fn invoke(&self, event: &Value) -> Outcome {
        self.api.invoke(event, BUDGET).await.expect("invocation")
    }
}

impl Drop for Lambda {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn log(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("lambda.log")).unwrap_or_default()
}

fn ledger(dir: &Path) -> sluice_tests::LedgerCounts {
    ledger_counts(&dir.join("ledger.db")).expect("ledger")
}

#[tokio::test]
async fn all_ok_batch_reports_no_failures() {
    let q = Queue::new("lam-ok", false).await;
    let dir = tempfile::tempdir().unwrap();
    for i in 0..3 {
        q.send(&charge_body(&format!("ok-{i}"), 100 + i), "g").await;
    }
    let msgs = q.receive(3, 60, Duration::from_secs(10)).await;
    assert_eq!(msgs.len(), 3);
    let fx = Lambda::start(&q, dir.path(), &[]).await;
    let out = fx.invoke(&q.event(&msgs)).await;
    assert_eq!(
        out,
        Outcome::Response(serde_json::json!({ "batchItemFailures": [] })),
        "log: {}",
        log(dir.path())
    );
    let l = ledger(dir.path());
    assert_eq!((l.charges, l.distinct_payments), (3, 3));
}

#[tokio::test]
async fn transient_failure_on_a_standard_queue_becomes_a_delayed_copy() {
    let q = Queue::new("lam-retry", false).await;
    let dir = tempfile::tempdir().unwrap();
    let body = charge_body("retry-1", 500);
    let id = q.send(&body, "g").await;
    let msgs = q.receive(1, 60, Duration::from_secs(10)).await;
    let fx = Lambda::start(&q, dir.path(), &[("SLUICE__APP__FAILURE_RATE", "1")]).await;
    let out = fx.invoke(&q.event(&msgs)).await;
    // Settled before the response: the copy replaces the record, which is not reported.
    assert_eq!(
        out.failed_ids(),
        Vec::<String>::new(),
        "log: {}",
        log(dir.path())
    );
    assert_eq!(q.delayed().await, 1, "the delayed copy waits on the queue");
    assert_eq!(ledger(dir.path()).charges, 0);
    // It comes back within the retry envelope (rounded up to whole seconds), as a new
    // message with the same body and the failure history in `sluice-meta`.
    let started = Instant::now();
    let back = q.receive(1, 60, Duration::from_secs(10)).await;
    assert_eq!(back.len(), 1, "the copy came back");
    assert!(started.elapsed() <= Duration::from_secs(3 + 2));
    let copy = &back[0];
    assert_ne!(copy.message_id(), Some(id.as_str()));
    assert_eq!(copy.body(), Some(body.as_str()));
    let meta = copy
        .message_attributes()
        .and_then(|a| a.get("sluice-meta"))
        .and_then(|v| v.string_value())
        .expect("the copy carries sluice-meta")
        .to_owned();
    assert!(
        meta.contains("injected") || meta.contains("503") || meta.contains("unavailable"),
        "the history names the failure: {meta}"
    );
    // The original is gone: nothing else arrives.
    assert!(q.receive(1, 60, Duration::from_secs(2)).await.is_empty());
}

#[tokio::test]
async fn transient_failure_on_a_fifo_queue_is_reported_and_hidden_for_the_delay() {
    let q = Queue::new("lam-retry", true).await;
    let dir = tempfile::tempdir().unwrap();
    let id = q.send(&charge_body("fifo-retry-1", 700), "g1").await;
    // Received with a 60 s visibility: only the function's retry delay can bring it back sooner.
    let msgs = q.receive(1, 60, Duration::from_secs(10)).await;
    let fx = Lambda::start(&q, dir.path(), &[("SLUICE__APP__FAILURE_RATE", "1")]).await;
    let out = fx.invoke(&q.event(&msgs)).await;
    assert_eq!(
        out.failed_ids(),
        vec![id.clone()],
        "log: {}",
        log(dir.path())
    );
    let started = Instant::now();
    let back = q.receive(1, 60, Duration::from_secs(15)).await;
    assert_eq!(back.len(), 1, "the record came back after its retry delay");
    assert!(
        started.elapsed() <= Duration::from_secs(3 + 3),
        "back after {:?}, not after the retry delay",
        started.elapsed()
    );
    assert_eq!(
        back[0].message_id(),
        Some(id.as_str()),
        "the same message (FIFO order holds)"
    );
    let count = back[0]
        .attributes()
        .and_then(|a| a.get(&MessageSystemAttributeName::ApproximateReceiveCount))
        .cloned();
    assert_eq!(count.as_deref(), Some("2"));
    assert_eq!(ledger(dir.path()).charges, 0);
}

#[tokio::test]
async fn poison_record_lands_in_the_dlq_with_history_and_is_not_reported() {
    let q = Queue::new("lam-poison", false).await;
    let dir = tempfile::tempdir().unwrap();
    let poison_id = q.send("not json {", "g").await;
    q.send(&charge_body("poison-ok-1", 300), "g").await;
    let msgs = q.receive(2, 60, Duration::from_secs(10)).await;
    assert_eq!(msgs.len(), 2);
    let fx = Lambda::start(&q, dir.path(), &[]).await;
    let out = fx.invoke(&q.event(&msgs)).await;
    assert_eq!(
        out.failed_ids(),
        Vec::<String>::new(),
        "log: {}",
        log(dir.path())
    );
    let dead = q.sqs.dlq_list(10).await.expect("dlq list");
    assert_eq!(dead.len(), 1, "{dead:?}");
    let d = &dead[0];
    assert_eq!(d.id, poison_id);
    assert_eq!(d.error_class, FailureClass::Permanent);
    assert_eq!(d.body.as_deref(), Some("not json {"));
    assert_eq!(d.function, FUNCTION);
    assert!(d.attempts >= 1);
    assert!(!d.last_error.is_empty());
    assert_eq!(
        ledger(dir.path()).charges,
        1,
        "the good record of the batch was charged"
    );
}

#[tokio::test]
async fn a_panic_fails_its_record_only() {
    // There is no per-record panic trigger in charge-payment: `fault.panic_rate = 1` makes
    // every handler call panic. Records that never reach the handler (a duplicate, a poison
    // body) share the batch with one that does, each in its own FIFO group.
    let q = Queue::new("lam-panic", true).await;
    let dir = tempfile::tempdir().unwrap();
    q.send(&charge_body("panic-dup", 100), "a").await;
    let first = q.receive(1, 60, Duration::from_secs(10)).await;
    {
        let fx = Lambda::start(&q, dir.path(), &[]).await;
        assert_eq!(
            fx.invoke(&q.event(&first)).await.failed_ids(),
            Vec::<String>::new()
        );
        q.client
            .delete_message()
            .queue_url(q.sqs.queue_url().await.unwrap())
            .receipt_handle(first[0].receipt_handle().unwrap())
            .send()
            .await
            .expect("delete as Lambda would");
    }
    assert_eq!(ledger(dir.path()).charges, 1);

    q.send(&charge_body("panic-dup", 100), "a").await; // delivered again
    let poison_id = q.send("{\"payment_id\":", "b").await;
    let panicking = q.send(&charge_body("panic-new", 200), "c").await;
    let msgs = q.receive(3, 60, Duration::from_secs(10)).await;
    assert_eq!(msgs.len(), 3);
    let fx = Lambda::start(&q, dir.path(), &[("SLUICE__FAULT__PANIC_RATE", "1")]).await;
    let out = fx.invoke(&q.event(&msgs)).await;
    assert_eq!(
        out.failed_ids(),
        vec![panicking],
        "log: {}",
        log(dir.path())
    );
    let dead = q.sqs.dlq_list(10).await.expect("dlq list");
    assert_eq!(
        dead.iter().map(|d| d.id.clone()).collect::<Vec<_>>(),
        vec![poison_id]
    );
    let l = ledger(dir.path());
    assert_eq!(
        (l.charges, l.distinct_payments),
        (1, 1),
        "nothing charged twice or by the panic"
    );
    // The process survived the panic: it serves the next invocation.
    q.send(&charge_body("after-panic", 300), "d").await;
    let next = q.receive(1, 60, Duration::from_secs(10)).await;
    assert!(matches!(
        fx.invoke(&q.event(&next)).await,
        Outcome::Response(_)
    ));
}

#[tokio::test]
async fn malformed_event_fails_the_invocation_and_the_function_goes_on() {
    let q = Queue::new("lam-malformed", false).await;
    let dir = tempfile::tempdir().unwrap();
    let fx = Lambda::start(&q, dir.path(), &[]).await;
    let out = fx.invoke(&fixture("not-sqs-event.json")).await;
    let Outcome::Error(err) = out else {
        panic!("expected an /error post, got {out:?}");
    };
    let text = err.to_string();
    assert!(text.contains("not an SQS event"), "{text}");
    // The type names the problem, not a Rust type path (CloudWatch shows it).
    assert_eq!(err["errorType"], "NotAnSqsEvent", "{text}");
    // Same process, next invocation.
    q.send(&charge_body("after-malformed", 400), "g").await;
    let msgs = q.receive(1, 60, Duration::from_secs(10)).await;
    assert_eq!(
        fx.invoke(&q.event(&msgs)).await.failed_ids(),
        Vec::<String>::new()
    );
    assert_eq!(ledger(dir.path()).charges, 1);
}

#[tokio::test]
async fn the_same_record_in_two_invocations_is_charged_once() {
    let q = Queue::new("lam-dup", false).await;
    let dir = tempfile::tempdir().unwrap();
    q.send(&charge_body("dup-1", 1250), "g").await;
    let first = q.receive(1, 1, Duration::from_secs(10)).await;
    {
        let fx = Lambda::start(&q, dir.path(), &[]).await;
        assert_eq!(
            fx.invoke(&q.event(&first)).await.failed_ids(),
            Vec::<String>::new()
        );
    }
    // Not deleted (as if the invocation's response was lost): SQS delivers it again, to a
    // new execution environment (a fresh process).
    let again = q.receive(1, 60, Duration::from_secs(10)).await;
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].message_id(), first[0].message_id());
    let fx = Lambda::start(&q, dir.path(), &[]).await;
    assert_eq!(
        fx.invoke(&q.event(&again)).await.failed_ids(),
        Vec::<String>::new()
    );
    // And the very same event once more to the warm process.
    assert_eq!(
        fx.invoke(&q.event(&again)).await.failed_ids(),
        Vec::<String>::new()
    );
    let l = ledger(dir.path());
    assert_eq!((l.charges, l.distinct_payments), (1, 1));
}

/// The EMF documents the function wrote to stdout, in order, picked out of its log stream as
/// CloudWatch Logs does (a JSON line with an `_aws` member).
fn emf_documents(dir: &Path) -> Vec<Value> {
    log(dir)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v.get("_aws").is_some())
        .collect()
}

/// One document against the EMF specification (a Timestamp; one directive whose dimension
/// set is `[function, queue]`, each a string member; every metric defined has a numeric
/// member, an array of at most 100 numbers for a list), against what the generated alarms
/// read (infra/aws/charge-payment.json: namespace, metric names, dimensions), and against
/// the batch: the outcomes add up to `Records`, with one duration per record. Returns the
/// metric values by name.
fn check_emf(doc: &Value, queue: &str, namespace: &str) -> serde_json::Map<String, Value> {
    let aws = &doc["_aws"];
    assert!(aws["Timestamp"].as_u64().is_some(), "{doc}");
    let directives = aws["CloudWatchMetrics"].as_array().expect("directives");
    assert_eq!(directives.len(), 1, "{doc}");
    let directive = &directives[0];
    assert_eq!(directive["Namespace"], namespace, "{doc}");
    assert_eq!(
        directive["Dimensions"],
        serde_json::json!([["function", "queue"]])
    );
    assert_eq!(doc["function"], FUNCTION);
    assert_eq!(doc["queue"], queue);
    let mut values = serde_json::Map::new();
    for m in directive["Metrics"].as_array().expect("metric definitions") {
        let name = m["Name"].as_str().expect("a name");
        let value = doc
            .get(name)
            .unwrap_or_else(|| panic!("{name} has no member: {doc}"));
        let unit = if name == "HandlerDuration" {
            "Milliseconds"
        } else {
            "Count"
        };
        assert_eq!(m["Unit"], unit, "{name}");
        match value {
            Value::Number(_) => {}
            Value::Array(a) => {
                assert!(
                    a.len() <= 100 && a.iter().all(Value::is_number),
                    "{name}: {value}"
                )
            }
            _ => panic!("{name} is not numeric: {value}"),
        }
        values.insert(name.to_owned(), value.clone());
    }
    let n = |k: &str| values.get(k).and_then(Value::as_u64).unwrap_or(0);
    assert_eq!(
        n("Records"),
        n("Succeeded") + n("Duplicates") + n("Retried") + n("DeadLettered"),
        "{doc}"
    );
    let durations = values.get("HandlerDuration").and_then(Value::as_array);
    assert_eq!(durations.map_or(0, Vec::len) as u64, n("Records"), "{doc}");

    // What the alarms of the generated template read is what the document has.
    let template: Value = serde_json::from_str(
        &std::fs::read_to_string(sluice_tests::repo_root().join("infra/aws/charge-payment.json"))
            .expect("infra/aws/charge-payment.json"),
    )
    .unwrap();
    let mut read = Vec::new();
    for alarm in ["ErrorRatioAlarm", "DurationAlarm"] {
        let p = &template["Resources"][alarm]["Properties"];
        let metrics: Vec<&Value> = match p["Metrics"].as_array() {
            Some(ms) => ms
                .iter()
                .filter_map(|m| m.pointer("/MetricStat/Metric"))
                .collect(),
            None => vec![p],
        };
        for m in metrics {
            let dims: Vec<&str> = m["Dimensions"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d["Name"].as_str().unwrap())
                .collect();
            assert_eq!(dims, ["function", "queue"], "{alarm}");
            read.push((m["Namespace"].clone(), m["MetricName"].clone()));
        }
    }
    for (ns, name) in read {
        assert_eq!(ns, "Sluice", "the template's namespace is the default");
        let name = name.as_str().unwrap();
        assert!(values.contains_key(name), "the alarms read {name}: {doc}");
    }
    values
}

#[tokio::test]
async fn each_invocation_writes_one_emf_document_with_its_batch() {
    let q = Queue::new("lam-emf", false).await;
    let dir = tempfile::tempdir().unwrap();
    for i in 0..3 {
        q.send(&charge_body(&format!("emf-{i}"), 100 + i), "g")
            .await;
    }
    q.send("not json {", "g").await;
    let msgs = q.receive(4, 60, Duration::from_secs(10)).await;
    assert_eq!(msgs.len(), 4);
    let good: Vec<Message> = msgs
        .iter()
        .filter(|m| m.body() != Some("not json {"))
        .cloned()
        .collect();
    // The queue's name as the generated template gives it (the `queue` dimension the
    // alarms read is the queue's own name).
    let queue = [("SLUICE__QUEUE", q.name.as_str())];
    let fx = Lambda::start(&q, dir.path(), &queue).await;
    assert_eq!(
        fx.invoke(&q.event(&msgs)).await.failed_ids(),
        Vec::<String>::new()
    );
    // The three good records again, to the warm process: duplicates, and no cold start.
    assert_eq!(
        fx.invoke(&q.event(&good)).await.failed_ids(),
        Vec::<String>::new()
    );

    let docs = emf_documents(dir.path());
    assert_eq!(docs.len(), 2, "one a invocation; log: {}", log(dir.path()));
    let first = check_emf(&docs[0], &q.name, "Sluice");
    for (name, want) in [
        ("Records", 4),
        ("Succeeded", 3),
        ("DeadLettered", 1),
        ("Retried", 0),
        ("Duplicates", 0),
        ("Panics", 0),
        ("ColdStart", 1),
    ] {
        assert_eq!(first[name], want, "{name} in {}", docs[0]);
    }
    // telemetry.version unset: Lambda's own version of the function.
    assert_eq!(docs[0]["version"], "$LATEST");
    let second = check_emf(&docs[1], &q.name, "Sluice");
    assert_eq!(
        (&second["Records"], &second["Duplicates"]),
        (&3.into(), &3.into())
    );
    assert!(
        !second.contains_key("ColdStart"),
        "once a process: {}",
        docs[1]
    );
    drop(fx);

    // A transient failure in a new process, under a namespace of its own.
    let dir = tempfile::tempdir().unwrap();
    q.send(&charge_body("emf-retry", 900), "g").await;
    let msgs = q.receive(1, 60, Duration::from_secs(10)).await;
    let fx = Lambda::start(
        &q,
        dir.path(),
        &[
            queue[0],
            ("SLUICE__APP__FAILURE_RATE", "1"),
            ("SLUICE__TELEMETRY__EMF_NAMESPACE", "Sluice/Test"),
            ("SLUICE__TELEMETRY__VERSION", "canary-7"),
        ],
    )
    .await;
    fx.invoke(&q.event(&msgs)).await;
    let docs = emf_documents(dir.path());
    assert_eq!(docs.len(), 1, "log: {}", log(dir.path()));
    let retried = check_emf(&docs[0], &q.name, "Sluice/Test");
    assert_eq!(
        (&retried["Records"], &retried["Retried"]),
        (&1.into(), &1.into())
    );
    assert_eq!(retried["ColdStart"], 1, "a new process starts cold");
    assert_eq!(docs[0]["version"], "canary-7");
}

/// A cold start calls no AWS service, and neither does a batch that succeeds (Lambda deletes
/// the records): the function points at an endpoint that counts connections and reaches `/next`,
/// then answers a valid record with no failure, and the endpoint saw no connection. The queues
/// are looked up only for a retry or a dead-letter copy (the other tests of this module).
#[tokio::test]
async fn a_cold_start_and_a_successful_batch_make_no_aws_call() {
    let endpoint = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", endpoint.local_addr().unwrap());
    let calls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = calls.clone();
    let counter = tokio::spawn(async move {
        while let Ok((conn, _)) = endpoint.accept().await {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            drop(conn);
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let queue = unique("lam-lazy");
    let env: Vec<(String, String)> = [
        ("SLUICE__TRANSPORT__KIND", "sqs".to_owned()),
        ("SLUICE__TRANSPORT__URL", queue.clone()),
        (
            "SLUICE__STORE__URL",
            dir.path().join("idempotency.db").display().to_string(),
        ),
        (
            "SLUICE__APP__LEDGER",
            dir.path().join("ledger.db").display().to_string(),
        ),
        ("AWS_ENDPOINT_URL", url),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let api = RuntimeApi::start(FUNCTION).await.unwrap();
    let bin = lambda_binary(FUNCTION).expect("lambda build of charge-payment");
    let mut child = spawn_lambda(
        &bin,
        api.addr,
        FUNCTION,
        &env,
        &dir.path().join("lambda.log"),
    )
    .expect("start the function");
    api.wait_ready(Duration::from_secs(30))
        .await
        .unwrap_or_else(|e| panic!("{e}; log: {}", log(dir.path())));

    let mut record = record_template();
    record["messageId"] = Value::from("lazy-1");
    record["receiptHandle"] = Value::from("rh-lazy-1");
    record["body"] = Value::from(charge_body("lazy-1", 100));
    record["eventSourceARN"] = Value::from(queue_arn(&queue));
    record["messageAttributes"] = serde_json::json!({});
    let out = api
        .invoke(&serde_json::json!({ "Records": [record] }), BUDGET)
        .await
        .expect("invocation");
    let _ = child.kill();
    let _ = child.wait();
    counter.abort();
    assert_eq!(
        out,
        Outcome::Response(serde_json::json!({ "batchItemFailures": [] })),
        "log: {}",
        log(dir.path())
    );
    assert_eq!(ledger(dir.path()).charges, 1, "log: {}", log(dir.path()));
    assert_eq!(
        calls.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "AWS calls at start or for a successful batch; log: {}",
        log(dir.path())
    );
}
